//! Send queues, their policies and the per-worker topic registry: a frame queued on one
//! connection (limits, close / drop / conflate), the fan-out of a publish to the local
//! subscribers (the turn's pending run of frames), the hand-off to other workers, and
//! (un)subscribing. The first step of the pub/sub layer the design asks for; it still
//! reaches connections through the slab directly.

use super::*;

impl<D> Inner<D> {
    /// Queues a frame on one connection, applying the queue limits and the policy.
    pub(super) fn queue_frame(
        &mut self,
        id: ConnId,
        frame: Out<'_>,
        topic: Option<&Arc<str>>,
    ) -> SendStatus {
        if topic.is_none() {
            // A direct send follows what was published before it.
            self.flush_pending();
        }
        let soft = self.shared.config.send_queue_soft;
        let hard = self.shared.config.send_queue_hard;
        let policy = self.shared.config.policy;
        let now = self.now;
        let Some(slot) = slot_of(&mut self.slots, id) else {
            return SendStatus::Closed;
        };
        let status = match slot.room(frame.len(), 0, soft, hard) {
            Room::Closed => return SendStatus::Closed,
            Room::Full => match (policy, topic) {
                (Policy::Close, _) => {
                    slot.conn.close(CloseCode::Again, "send queue full", now);
                    slot.close_code = 1013;
                    let stats = &self.shared.stats[self.index];
                    stats.backpressure_closes.bump(1);
                    stats.close_sent(1013);
                    if let Some(at) = slot.conn.poll_timeout() {
                        self.schedule(id, at);
                    }
                    SendStatus::Dropped
                }
                (Policy::Conflate, Some(topic)) => {
                    let frame = frame.into_bytes();
                    let held = &mut slot.extra().conflated;
                    match held.iter_mut().find(|(t, _)| t == topic) {
                        Some(entry) => entry.1 = frame,
                        None => held.push((topic.clone(), frame)),
                    }
                    self.shared.stats[self.index].conflated.bump(1);
                    self.pause_full(id);
                    return SendStatus::Conflated;
                }
                (Policy::DropNew | Policy::Conflate, _) => {
                    self.shared.stats[self.index].dropped.bump(1);
                    self.pause_full(id);
                    return SendStatus::Dropped;
                }
            },
            Room::Fits { over_soft } => {
                let sent = match frame {
                    Out::Shared(f) => slot.conn.send_shared(f),
                    Out::Owned(f) => slot.conn.send_frame(f),
                    Out::Message(opcode, payload) => slot.conn.send(opcode, payload),
                    Out::Payload(opcode, payload) => slot.conn.send_bytes(opcode, payload),
                };
                if sent.is_err() {
                    return SendStatus::Closed;
                }
                if over_soft {
                    SendStatus::Backpressure
                } else {
                    SendStatus::Queued
                }
            }
        };
        self.mark_dirty(id);
        status
    }

    /// A connection whose queue is full (the drop or conflate policy applies) is not read
    /// until the queue drains below the soft limit: whatever it sends would only queue
    /// more replies, so TCP flow control holds it back instead.
    pub(super) fn pause_full(&mut self, id: ConnId) {
        if let Some(slot) = slot_of(&mut self.slots, id)
            && !slot.flags.has(Flags::QUEUE_PAUSED)
        {
            slot.flags.set(Flags::QUEUE_PAUSED, true);
            self.shared.stats[self.index].queue_pauses.bump(1);
            self.mark_dirty(id);
        }
    }

    /// Moves conflated frames into the queue once it is back under the soft limit.
    pub(super) fn release_conflated(&mut self, id: ConnId) {
        let soft = self.shared.config.send_queue_soft;
        let Some(slot) = slot_of(&mut self.slots, id) else {
            return;
        };
        if slot.conn.queued_bytes() >= soft || !slot.has_conflated() {
            return;
        }
        let held = std::mem::take(&mut slot.extra().conflated);
        slot.tidy();
        for (_, frame) in held {
            let _ = slot.conn.send_frame(frame);
        }
    }

    /// Queues a frame on every local subscriber of `topic`.
    ///
    /// When every subscriber can take it under the queue limits (the usual case) it joins
    /// the pending run of frames of this topic, handed out by [`Inner::flush_pending`];
    /// the report is exact either way. When one cannot (a slow subscriber), the run is
    /// handed out first and this frame goes to each subscriber through its policy.
    pub(super) fn fanout_local(&mut self, topic: &Arc<str>, frame: Out<'_>) -> PublishReport {
        if self.pending.topic.as_ref().is_some_and(|t| t != topic) {
            self.flush_pending();
        }
        let len = frame.len();
        if len > PENDING_FRAME_MAX {
            // Nothing to gain from merging a large frame: each subscriber gets a
            // reference to its one encoded copy.
            self.flush_pending();
            return self.fanout_now(topic, &frame.into_bytes());
        }
        if self.pending.batch.len() + len > PENDING_MAX {
            self.flush_pending();
        }
        let ahead = self.pending.batch.len();
        let hard = self.shared.config.send_queue_hard;
        let soft = self.shared.config.send_queue_soft;
        let mut report = PublishReport::default();
        let Some(subs) = self.topics.get(topic) else {
            return report;
        };
        let mut fits = true;
        for sub in subs {
            let room = self
                .slots
                .get(sub.slot as usize)
                .filter(|s| s.generation == sub.generation)
                .map_or(Room::Closed, |s| s.room(len, ahead, soft, hard));
            match room {
                Room::Closed => report.dropped += 1,
                Room::Full => {
                    fits = false;
                    break;
                }
                Room::Fits { over_soft } => {
                    report.queued += 1;
                    report.backpressured += usize::from(over_soft);
                }
            }
        }
        if !fits {
            self.flush_pending();
            return self.fanout_now(topic, &frame.into_bytes());
        }
        match frame {
            Out::Message(opcode, payload) => {
                encode_frame_into(&mut self.pending.batch, opcode, payload)
            }
            Out::Payload(opcode, payload) => {
                encode_frame_into(&mut self.pending.batch, opcode, &payload)
            }
            Out::Shared(f) => self.pending.batch.extend_from_slice(f),
            Out::Owned(f) => self.pending.batch.extend_from_slice(&f),
        }
        if self.pending.topic.is_none() {
            self.pending.topic = Some(topic.clone());
        }
        self.shared.stats[self.index]
            .messages_out
            .bump(report.queued as u64);
        report
    }

    /// Hands the pending run of frames to every subscriber of its topic.
    pub(super) fn flush_pending(&mut self) {
        let Some(topic) = self.pending.topic.take() else {
            return;
        };
        if self.pending.batch.is_empty() {
            return;
        }
        let run = self.pending.batch.split().freeze();
        // Taken out of the map for the loop (mark_dirty needs `&mut self`) and put back.
        let Some(subs) = self.topics.remove(&topic) else {
            return;
        };
        for &sub in &subs {
            if let Some(slot) = slot_of(&mut self.slots, sub)
                && !slot.flags.has(Flags::DEAD)
                && !slot.flags.has(Flags::CLOSING)
                && slot.conn.send_shared(&run).is_ok()
            {
                self.mark_dirty(sub);
            }
        }
        self.topics.insert(topic, subs);
    }

    /// Queues `frame` on every local subscriber of `topic` now, each through the queue
    /// limits and the policy.
    pub(super) fn fanout_now(&mut self, topic: &Arc<str>, frame: &Bytes) -> PublishReport {
        let mut report = PublishReport::default();
        // Taken out of the map for the loop (queue_frame needs `&mut self`) and put back.
        let Some(subs) = self.topics.remove(topic) else {
            return report;
        };
        for &sub in &subs {
            match self.queue_frame(sub, Out::Shared(frame), Some(topic)) {
                SendStatus::Queued => report.queued += 1,
                SendStatus::Backpressure => {
                    report.queued += 1;
                    report.backpressured += 1;
                }
                SendStatus::Dropped | SendStatus::Closed => report.dropped += 1,
                SendStatus::Conflated => report.conflated += 1,
            }
        }
        self.topics.insert(topic.clone(), subs);
        self.shared.stats[self.index]
            .messages_out
            .bump(report.queued as u64);
        report
    }

    /// Publishes on this worker: local fan-out now, then once to each other worker that
    /// has subscribers. Encodes nothing when nobody is subscribed anywhere.
    pub(crate) fn publish(&mut self, topic: &str, opcode: OpCode, payload: &[u8]) -> PublishReport {
        self.stats().publishes.bump(1);
        let others = self.shared.directory.workers_with(topic, Some(self.index));
        let local = self.topics.get_key_value(topic).map(|(k, _)| k.clone());
        if local.is_none() && others == 0 {
            return PublishReport::default();
        }
        let topic: Arc<str> = local.unwrap_or_else(|| Arc::from(topic));
        let mut report = self.fanout_local(&topic, Out::Message(opcode, payload));
        if others > 0 {
            let frame = encode_frame(opcode, payload);
            let forwarded = self
                .shared
                .forward(others, &topic, &frame, Some(self.index));
            report.forwarded_workers = forwarded;
            report.forward_dropped = others.count_ones() as usize - forwarded;
        }
        report
    }

    pub(super) fn subscribe(&mut self, id: ConnId, topic: &str) -> bool {
        // Membership changes take effect between messages, in order.
        self.flush_pending();
        let Some(slot) = slot_of(&mut self.slots, id) else {
            return false;
        };
        if slot.topics().iter().any(|t| &**t == topic) {
            return false;
        }
        let key = match self.topics.get_key_value(topic) {
            Some((k, _)) => k.clone(),
            None => Arc::from(topic),
        };
        slot.extra().topics.push(key.clone());
        let set = self.topics.entry(key.clone()).or_default();
        set.insert(id);
        let n = set.len();
        self.shared.directory.set(&key, self.index, n);
        true
    }

    pub(super) fn unsubscribe(&mut self, id: ConnId, topic: &str) -> bool {
        self.flush_pending();
        let Some(slot) = slot_of(&mut self.slots, id) else {
            return false;
        };
        let Some(pos) = slot.topics().iter().position(|t| &**t == topic) else {
            return false;
        };
        let extra = slot.extra();
        let key = extra.topics.swap_remove(pos);
        if extra.topics.is_empty() {
            extra.topics = Vec::new();
        }
        slot.tidy();
        self.remove_subscriber(&key, id);
        true
    }

    pub(super) fn remove_subscriber(&mut self, key: &Arc<str>, id: ConnId) {
        let n = match self.topics.get_mut(key) {
            Some(set) => {
                set.swap_remove(&id);
                set.len()
            }
            None => return,
        };
        if n == 0 {
            self.topics.remove(key);
        }
        self.shared.directory.set(key, self.index, n);
    }

    pub(super) fn close_conn(&mut self, id: ConnId, code: CloseCode, reason: &str) {
        // What was published before goes out before the close frame.
        self.flush_pending();
        let now = self.now;
        let Some(slot) = slot_of(&mut self.slots, id) else {
            return;
        };
        if slot.conn.state() != State::Open {
            return;
        }
        slot.conn.close(code, reason, now);
        slot.close_code = u16::from(code);
        let at = slot.conn.poll_timeout();
        self.count_close_sent(u16::from(code));
        if let Some(at) = at {
            self.schedule(id, at);
        }
        self.mark_dirty(id);
    }
}

/// A run of frames published to one topic, encoded back to back, handed to every
/// subscriber at once when the turn ends (or before anything else could be queued out of
/// order): each subscriber then gets one queue entry for the whole run, shared (a
/// reference count) when it is large, and the walk over the subscribers happens once per
/// run instead of once per message, which keeps each subscriber's state in cache.
#[derive(Default)]
pub(super) struct Pending {
    pub(super) topic: Option<Arc<str>>,
    /// The encoded frames; reused from turn to turn (reclaimed in place once the
    /// subscribers' copies have been written).
    pub(super) batch: BytesMut,
}

/// Largest run of pending frames; a publish that would make it longer hands the run out
/// first.
const PENDING_MAX: usize = 256 * 1024;
/// Frames larger than this are never merged into a pending run.
const PENDING_FRAME_MAX: usize = 16 * 1024;
