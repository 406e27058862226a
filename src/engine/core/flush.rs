//! Write scheduling: what a loop turn writes, pauses, resumes and closes (at most
//! `write_batch` connections, the publishers last), and dropping everything at once.

use super::*;

impl<H: Handler> Core<H> {
    /// Writes, pauses/resumes and closes what the last events made due, oldest first and
    /// at most `write_batch` connections (and the publishers of the turn: last, or first
    /// when more is due than one batch). Call once per
    /// loop turn, after handling every completion: the turn's writes go out together; while
    /// [`Core::has_dirty`] the backend must come back without sleeping.
    pub fn flush(&mut self, driver: &mut dyn Driver) {
        if std::mem::take(&mut self.inner.own_sequenced) {
            // A handler published to a topic with history in this turn: its publications
            // wait in this worker's own inbox. Delivered now, in this turn, the publisher's
            // own copy is still written last in it (as for any publish): taken a turn
            // later, it would wait behind the whole fan-out, and a publisher pacing itself
            // on its own echo would slow down (fanout-wide: 28 frames per write instead
            // of 73, 2.3x the server CPU per delivery).
            let now = self.inner.now;
            self.on_commands(now);
        }
        self.inner.flush_pending();
        let take = self
            .inner
            .dirty
            .len()
            .min(self.inner.shared.config.write_batch.max(1));
        // A pass that spans turns (more due than one batch): the publishers' copies go
        // first, not last (see `Conn::publish`).
        let spans = self.inner.dirty.len() > take;
        let mut batch = std::mem::take(&mut self.inner.batch);
        batch.extend(self.inner.dirty.drain(..take));
        let mut sends = 0u64;
        let mut publishers = std::mem::take(&mut self.inner.publishers);
        if spans {
            sends += self.flush_publishers(driver, &publishers);
        }
        for &slot_index in &batch {
            match self.inner.slots.get(slot_index as usize) {
                // A publisher of this turn: written last, below (or first, above).
                Some(s) if s.flags.has(Flags::PUBLISHED) => continue,
                // Already written (a publisher ahead of its place), or a stale entry of a
                // freed slot.
                Some(s) if !s.flags.has(Flags::DIRTY) => continue,
                None => continue,
                Some(_) => {}
            }
            sends += self.flush_one(driver, slot_index);
        }
        // Otherwise those that published in this turn go last (see `Conn::publish`).
        if !spans {
            sends += self.flush_publishers(driver, &publishers);
        }
        // Keep any marked during this flush (a handler called from it) for the next one.
        publishers.clear();
        publishers.append(&mut self.inner.publishers);
        self.inner.publishers = publishers;
        batch.clear();
        self.inner.batch = batch;
        let stats = self.inner.stats();
        stats.sends.bump(sends);
        stats.turns.bump(1);
        // Slots made dirty while flushing (a handler's on_close publishing, say) and those
        // past the batch wait for the next turn, which comes without sleeping
        // (`has_dirty`).
    }

    /// Writes the copies of the connections that published in this turn; returns the
    /// writes issued.
    fn flush_publishers(&mut self, driver: &mut dyn Driver, publishers: &[u32]) -> u64 {
        let mut sends = 0;
        for &slot_index in publishers {
            if let Some(slot) = self.inner.slots.get_mut(slot_index as usize) {
                slot.flags.set(Flags::PUBLISHED, false);
                if slot.flags.has(Flags::DIRTY) {
                    sends += self.flush_one(driver, slot_index);
                }
            }
        }
        sends
    }

    /// Writes, pauses/resumes or closes one dirty connection; returns the writes issued.
    pub(super) fn flush_one(&mut self, driver: &mut dyn Driver, slot_index: u32) -> u64 {
        let mut sends = 0;
        let Some(id) = self.id_of(slot_index) else {
            return sends;
        };
        let Some(slot) = slot_of(&mut self.inner.slots, id) else {
            return sends;
        };
        slot.flags.set(Flags::DIRTY, false);
        if slot.flags.has(Flags::CLOSING) {
            return sends;
        }
        let off = slot.flags.reading_paused();
        if off != slot.flags.has(Flags::READING_OFF) && !slot.flags.has(Flags::DEAD) {
            slot.flags.set(Flags::READING_OFF, off);
            driver.set_reading(id, slot.fd, !off);
        }
        if slot.flags.has(Flags::SENDING) {
            if slot.flags.has(Flags::DEAD) {
                // A timed-out or failed peer with a send parked on a full socket.
                slot.flags.set(Flags::CLOSING, true);
                if driver.close(id, slot.fd) {
                    self.on_closed(id);
                }
            }
            return sends;
        }
        // A backend may take fewer frames per call than are queued (iovec limit):
        // write again while the socket takes everything offered.
        let mut rounds = 0;
        while let Some(slot) = slot_of(&mut self.inner.slots, id) {
            if slot.flags.has(Flags::DEAD)
                || slot.flags.has(Flags::BLOCKED)
                || slot.conn.transmit_frames() == 0
            {
                break;
            }
            let fd = slot.fd;
            // Final bytes after a close handshake: the socket closes once they are written,
            // and the peer sends nothing more, so they may wait for the FIN. Not after a
            // protocol error, a timeout or an HTTP answer: input may still be arriving,
            // closing then resets the connection, and a reset drops held-back bytes.
            let last = slot.conn.closed_by_handshake();
            let outcome = {
                let mut bufs = slot.conn.transmit();
                driver.send(id, fd, &mut bufs, last)
            };
            sends += 1;
            match outcome {
                SendOutcome::InFlight => {
                    slot.flags.set(Flags::SENDING, true);
                    break;
                }
                SendOutcome::Wrote { n, all } => {
                    self.written(id, n);
                    rounds += 1;
                    if !all
                        && let Some(slot) = slot_of(&mut self.inner.slots, id)
                        && slot.conn.transmit_frames() > 0
                    {
                        slot.flags.set(Flags::BLOCKED, true);
                        break;
                    }
                    if rounds >= 16 {
                        // Fairness: the rest goes next turn.
                        self.inner.mark_dirty(id);
                        break;
                    }
                }
                SendOutcome::WouldBlock => {
                    slot.flags.set(Flags::BLOCKED, true);
                    break;
                }
                SendOutcome::Failed => {
                    slot.flags.set(Flags::DEAD, true);
                    break;
                }
            }
        }
        let now = self.inner.now;
        let Some(slot) = slot_of(&mut self.inner.slots, id) else {
            return sends;
        };
        let pending = slot.conn.transmit_frames() > 0;
        let mut move_to = None;
        if pending && !slot.flags.has(Flags::DEAD) && matches!(slot.phase, Phase::Open) {
            // Bytes left over (a write in flight, or a full socket): they must make
            // progress within the send timeout.
            slot.conn
                .note_unsent(self.inner.shared.proto_config(slot.conn.tag()), now);
            if let Some(at) = slot.conn.poll_timeout() {
                let tick = self.inner.wheel.tick_of(at);
                let due = slot
                    .timer
                    .is_on()
                    .then(|| self.inner.wheel.due_of(&slot.timer));
                move_to = due.is_none_or(|due| due > tick).then_some(tick);
            }
        }
        let mut slot = slot;
        if let Some(tick) = move_to {
            // Through the slab, and looked up again, only when it moves on the wheel (its
            // neighbours there are other slots), not on every write.
            self.inner
                .wheel
                .schedule(&mut self.inner.slots, id.slot, tick);
            let Some(again) = slot_of(&mut self.inner.slots, id) else {
                return sends;
            };
            slot = again;
        }
        if slot.flags.has(Flags::SENDING) || slot.flags.has(Flags::DIRTY) {
            return sends;
        }
        if !pending && matches!(slot.phase, Phase::Finish) && !slot.flags.has(Flags::DEAD) {
            // The answer is out: FIN, then wait for the peer's EOF (reading and
            // discarding what it still sends) or the deadline set in `finish_with`.
            if !slot.flags.has(Flags::LINGERING) {
                slot.flags.set(Flags::LINGERING, true);
                driver.shutdown_write(id, slot.fd);
            }
            return sends;
        }
        let done = slot.flags.has(Flags::DEAD) || (!pending && slot.conn.is_closed());
        if done && !slot.flags.has(Flags::CLOSING) {
            slot.flags.set(Flags::CLOSING, true);
            if driver.close(id, slot.fd) {
                self.on_closed(id);
            }
        }
        sends
    }

    /// The ids of every connection this worker holds.
    pub(super) fn all_ids(&self) -> Vec<ConnId> {
        self.inner
            .slots
            .iter()
            .map(|(i, s)| ConnId {
                slot: i as u32,
                generation: s.generation,
            })
            .collect()
    }

    /// Drops every connection at once (past the drain deadline, or on abort).
    pub fn abort_all(&mut self, driver: &mut dyn Driver) {
        let ids = self.all_ids();
        for id in ids {
            if let Some(slot) = slot_of(&mut self.inner.slots, id)
                && !slot.flags.has(Flags::CLOSING)
            {
                slot.flags.set(Flags::CLOSING, true);
                slot.flags.set(Flags::DEAD, true);
                if driver.close(id, slot.fd) {
                    self.on_closed(id);
                }
            }
        }
    }

    /// Whether anything waits for the next [`Core::flush`] (a connection to write, or a
    /// run of published frames to hand out): the backend should then not sleep.
    pub fn has_dirty(&self) -> bool {
        !self.inner.dirty.is_empty() || self.inner.registry.has_pending()
    }
}
