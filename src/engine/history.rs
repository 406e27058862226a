//! Topics with history on the node's side (the workers' side is `core/history.rs`):
//! publications numbered under their topic's lock and handed to every worker with
//! subscribers in offset order, numbered here or, with a broker that numbers them
//! (Redis), by the broker, whose numbers every node shares.
//!
//! With a numbering broker the node's stream of a topic is a copy: it becomes usable
//! (`Stream::synced`) once loaded from the broker after the node subscribed to the topic,
//! and stops being so when the node unsubscribes (what is published meanwhile does not
//! reach it). Subscriptions made while it is not usable wait in `Stream::parked` and go
//! ahead when the load comes back (`Command::Unpark`). What the broker delivers while it
//! loads waits in `Stream::pending` and is merged by offset. A gap in what it delivers is
//! repaired once per topic by loading the stream again; publications the broker no longer
//! has are lost, and a resume from before them is not recovered.

use super::*;
use crate::pubsub::Interest;
use crate::pubsub::broker::{Incoming, Loaded};
use crate::pubsub::history::{Entry, Epoch, History, Numbered, PENDING_LIMIT, Position, Stream};

/// Who hands a numbered publication to the workers, which decides what a full inbox
/// means for it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Publisher {
    /// A handler on this worker: it must not block; a full inbox is skipped (counted in
    /// the worker's `forward_dropped`) and repaired from the ring later.
    Worker(usize),
    /// The broker client's thread: it must not block either (the broker would drop the
    /// node); a full inbox is skipped (counted in `in_dropped`).
    Broker,
    /// A `Handle` on another thread, which waited for room before.
    Handle,
}

impl Shared {
    /// Publishes to a topic with history: to the broker if it numbers publications (which
    /// then delivers it here too, so no position is known yet), else numbered here (and
    /// the plain message to the broker, if any). Returns the position (if numbered here),
    /// the workers it was handed to and those skipped for a full inbox.
    pub(crate) fn publish_history(
        &self,
        history: &History,
        topic: &str,
        opcode: OpCode,
        payload: &[u8],
        from: Publisher,
    ) -> (Option<Position>, usize, usize) {
        if history.broker_numbered
            && let Some(bp) = &self.backplane
        {
            bp.publish_numbered(topic, opcode, payload, &history.config().limits);
            return (None, 0, 0);
        }
        self.publish_to_broker(topic, opcode, payload);
        let mut locked = history.lock(topic);
        let (key, epoch, entry) = locked.append(topic, opcode, payload, Instant::now());
        let position = Position {
            offset: entry.offset,
            epoch,
        };
        let (n, dropped) = self.hand_out(&key, epoch, &entry, from);
        drop(locked);
        (Some(position), n, dropped)
    }

    /// Hands a numbered publication to every worker with subscribers of its topic (the
    /// caller holds the topic's lock, so every worker gets the offsets in order). Returns
    /// (handed, skipped for a full inbox).
    fn hand_out(
        &self,
        key: &Arc<str>,
        epoch: Epoch,
        entry: &Entry,
        from: Publisher,
    ) -> (usize, usize) {
        let workers = self.directory.workers_with(key, None);
        let bytes = entry.frame.len() + entry.envelope.as_ref().map_or(0, Bytes::len);
        let (mut n, mut dropped) = (0, 0);
        for (i, inbox) in self.inboxes.iter().enumerate() {
            if workers & (1 << i) == 0 {
                continue;
            }
            // A publishing worker and the broker thread must not block: a full inbox
            // does not get it, and its worker repairs the gap from the ring.
            if from != Publisher::Handle && inbox.full() {
                dropped += 1;
                if let Publisher::Worker(w) = from
                    && let Some(stats) = self.stats.get(w)
                {
                    stats.forward_dropped.bump(1);
                }
                continue;
            }
            inbox.pending_bytes.fetch_add(bytes, Ordering::AcqRel);
            self.send_command(inbox, Command::Sequenced(key.clone(), epoch, entry.clone()));
            n += 1;
        }
        (n, dropped)
    }

    /// A message from the broker for a topic with history: numbered by the broker (kept
    /// in order, a gap repaired by a load), or plain (numbered here). Returns how many
    /// workers were skipped for a full inbox.
    pub(super) fn deliver_with_history(&self, history: &History, m: &Incoming) -> u64 {
        let now = Instant::now();
        let mut locked = history.lock(&m.topic);
        let Some((epoch, offset)) = m.number.filter(|_| history.broker_numbered) else {
            let (key, epoch, entry) = locked.append(&m.topic, m.opcode, &m.payload, now);
            return self.hand_out(&key, epoch, &entry, Publisher::Broker).1 as u64;
        };
        let (_, stream) = locked.stream(&m.topic);
        if !stream.synced || stream.loading {
            hold(stream, epoch, offset, m);
            return 0;
        }
        match locked.append_numbered(&m.topic, epoch, offset, m.opcode, &m.payload, now) {
            Numbered::Appended(key, epoch, entry) => {
                self.hand_out(&key, epoch, &entry, Publisher::Broker).1 as u64
            }
            Numbered::Repeat => 0,
            Numbered::Gap => {
                // Repaired once for the topic: later ones wait with this one.
                let (_, stream) = locked.stream(&m.topic);
                stream.loading = true;
                hold(stream, epoch, offset, m);
                drop(locked);
                if let Some(bp) = &self.backplane {
                    history.loads.fetch_add(1, Ordering::Relaxed);
                    bp.load(&m.topic, &history.config().limits);
                }
                0
            }
        }
    }

    /// A topic's stream as the broker keeps it: the node's copy catches up (or starts
    /// again, in another epoch), what waited is merged, and the subscriptions that waited
    /// go ahead.
    pub(super) fn loaded(&self, loaded: Loaded) {
        let Some(history) = self.history_of(&loaded.topic) else {
            return;
        };
        let now = Instant::now();
        let topic = &loaded.topic;
        let mut locked = history.lock(topic);
        let (_, stream) = locked.stream(topic);
        // Not in use, nobody on any worker has joined it (they wait in `parked`): the
        // loaded publications need not be handed out.
        let was_synced = stream.synced;
        let fresh = !was_synced || stream.epoch() != loaded.epoch;
        let (pending, parked) = (
            std::mem::take(&mut stream.pending),
            std::mem::take(&mut stream.parked),
        );
        stream.synced = true;
        stream.loading = false;
        if fresh {
            let first = loaded.entries.first().map_or(loaded.last, |e| e.0 - 1);
            locked.restart(topic, loaded.epoch, first);
        }
        let mut lost = 0u64;
        let entries = loaded
            .entries
            .iter()
            .map(|(o, op, p)| (loaded.epoch, *o, *op, p));
        let pending = pending.iter().map(|(e, o, op, p)| (*e, *o, *op, p));
        for (epoch, offset, opcode, payload) in entries.chain(pending) {
            let mut numbered = locked.append_numbered(topic, epoch, offset, opcode, payload, now);
            if matches!(numbered, Numbered::Gap) {
                // Not in the broker's stream any more: lost, and said so to resumes.
                let (_, stream) = locked.stream(topic);
                lost += offset - stream.last() - 1;
                stream.skip_to(offset);
                numbered = locked.append_numbered(topic, epoch, offset, opcode, payload, now);
            }
            if let Numbered::Appended(key, epoch, entry) = numbered
                && was_synced
            {
                self.hand_out(&key, epoch, &entry, Publisher::Broker);
            }
        }
        // The broker gave out offsets it no longer keeps: live delivery starts after them.
        let (key, stream) = locked.stream(topic);
        if loaded.last > stream.last() && stream.epoch() == loaded.epoch {
            lost += loaded.last - stream.last();
            stream.skip_to(loaded.last + 1);
        }
        if lost > 0 {
            history.lost.fetch_add(lost, Ordering::Relaxed);
            tracing::debug!(%topic, lost, "history: publications the broker no longer keeps");
        }
        for (worker, id, sub) in parked {
            if let Some(inbox) = self.inboxes.get(worker) {
                self.send_command(inbox, Command::Unpark(id, key.clone(), sub));
            }
        }
    }

    /// The node's interest in a topic changed on the broker: with a numbering broker, a
    /// topic given up leaves its copy unusable until loaded again (under the topic's lock,
    /// and only if nobody subscribed meanwhile), and a topic taken up is loaded.
    pub(super) fn history_interest(&self, topic: &Arc<str>, change: Interest) {
        let Some(history) = self.history_of(topic).filter(|h| h.broker_numbered) else {
            return;
        };
        match change {
            Interest::Unsubscribed => {
                let mut locked = history.lock(topic);
                if self.directory.count(topic) == 0
                    && let Some(stream) = locked.get_mut(topic)
                {
                    stream.synced = false;
                    stream.loading = false;
                    stream.pending.clear();
                }
            }
            Interest::Subscribed => {
                if let Some(bp) = &self.backplane {
                    history.loads.fetch_add(1, Ordering::Relaxed);
                    bp.load(topic, &history.config().limits);
                }
            }
            Interest::Unchanged => {}
        }
    }
}

/// Keeps a numbered publication for the merge after a load (bounded: the oldest go, and
/// the load finds them or they are lost).
fn hold(stream: &mut Stream, epoch: Epoch, offset: u64, m: &Incoming) {
    if stream.pending.len() >= PENDING_LIMIT {
        stream.pending.remove(0);
    }
    stream
        .pending
        .push((epoch, offset, m.opcode, m.payload.clone()));
}
