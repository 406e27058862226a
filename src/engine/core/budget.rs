//! Reading paused for memory: a send queue past its hard limit, and the worker's
//! inbound reassembly budget (the connections holding the most wait).

use super::*;

impl<H: Handler> Core<H> {
    /// After `id` read: a send queue past the hard limit (replies the handler queued, or
    /// pongs) stops reading until it drains below the soft limit, so a peer that sends
    /// without reading is held back by TCP flow control instead of growing our memory.
    pub(super) fn check_queue(&mut self, id: ConnId) {
        let hard = self.inner.shared.config.send_queue_hard;
        if let Some(slot) = slot_of(&mut self.inner.slots, id)
            && !slot.flags.has(Flags::QUEUE_PAUSED)
            && slot.conn.queued_bytes() > hard
        {
            slot.flags.set(Flags::QUEUE_PAUSED, true);
            self.inner.stats().queue_pauses.bump(1);
            self.inner.mark_dirty(id);
        }
    }

    /// After `id` read: when this worker's messages in reassembly hold more than the
    /// budget, stop reading `id` if it holds at least half its share (half the average
    /// over the holders) — unless every other holder is already stopped (one always reads on, so
    /// memory is eventually freed). The connections holding the most wait; a message
    /// much smaller than the average (a well-behaved peer's, beside peers that announce large
    /// messages and drip them) keeps being read and completes. Holders that never finish
    /// are closed by the message timeout (1008).
    pub(super) fn check_budget(&mut self, id: ConnId) {
        let budget = self.inner.shared.config.reassembly_budget;
        let (total, holders) = crate::proto::connection::reassembly_total();
        if total > budget {
            let waiting = self.inner.budget_paused.len();
            if let Some(slot) = slot_of(&mut self.inner.slots, id)
                && !slot.flags.has(Flags::BUDGET_PAUSED)
                && slot.conn.reassembly_bytes() > 0
                && slot.conn.reassembly_bytes().saturating_mul(2 * holders) >= total
                && waiting + 1 < holders
            {
                slot.flags.set(Flags::BUDGET_PAUSED, true);
                self.inner.budget_paused.push(id);
                self.inner.stats().reassembly_pauses.bump(1);
                self.inner.mark_dirty(id);
            }
        }
        self.rebalance_budget();
    }

    /// Resumes budget-paused connections: all of them once the total is back within the
    /// budget, the oldest when no holder is left reading; forgets closed ones.
    pub(super) fn rebalance_budget(&mut self) {
        if self.inner.budget_paused.is_empty() {
            return;
        }
        let budget = self.inner.shared.config.reassembly_budget;
        let (total, holders) = crate::proto::connection::reassembly_total();
        let mut paused = std::mem::take(&mut self.inner.budget_paused);
        let mut resume_one = total > budget && paused.len() >= holders;
        paused.retain(|&id| {
            let Some(slot) = slot_of(&mut self.inner.slots, id) else {
                return false; // closed
            };
            let resume = total <= budget
                || slot.conn.reassembly_bytes() == 0
                || std::mem::take(&mut resume_one);
            if resume {
                slot.flags.set(Flags::BUDGET_PAUSED, false);
                self.inner.mark_dirty(id);
            }
            !resume
        });
        self.inner.budget_paused = paused;
    }
}
