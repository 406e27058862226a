//! Where the engine meets the pub/sub layer ([`crate::pubsub`]): a frame queued on one
//! connection through its limits and policy (close / drop / conflate), the slab lent to the
//! topic registry as its [`Subscribers`], publishing (local fan-out, then the hand-off to
//! other workers), and (un)subscribing a connection (its own topic list, the registry, the
//! cross-worker directory).

use super::*;
use crate::pubsub::Subscribers;
use crate::pubsub::history::Subscription;
use arcstr::ArcStr;

impl<D> Inner<D> {
    /// Queues a frame on one connection, applying the queue limits and the policy.
    pub(super) fn queue_frame(
        &mut self,
        id: ConnId,
        frame: Out<'_>,
        topic: Option<&ArcStr>,
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
                    let cfg = self.shared.proto_config(slot.conn.tag());
                    slot.conn
                        .close(cfg, CloseCode::Again, "send queue full", now);
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
            Room::Fits { over_soft, .. } => {
                // Only a message still to be framed needs the connection's settings
                // (its deflate); an encoded frame, the fan-out's case, does not.
                let shared = &self.shared;
                let sent = match frame {
                    Out::Shared(f) => slot.conn.send_shared(f),
                    Out::Owned(f) => slot.conn.send_frame(f),
                    Out::Message(opcode, payload) => {
                        slot.conn
                            .send(shared.proto_config(slot.conn.tag()), opcode, payload)
                    }
                    Out::Payload(opcode, payload) => {
                        slot.conn
                            .send_bytes(shared.proto_config(slot.conn.tag()), opcode, payload)
                    }
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

    /// Queues a frame on every local subscriber of `topic` (the registry decides how:
    /// onto the turn's pending run, or through each connection's policy).
    pub(super) fn fanout_local(&mut self, topic: &str, frame: Frame<'_>) -> PublishReport {
        self.fanout_in(false, topic, frame)
    }

    /// [`Inner::fanout_local`] on the plain registry or (`envelope`) on the registry of
    /// subscribers that get a topic's publications in the history's envelope.
    pub(super) fn fanout_in(
        &mut self,
        envelope: bool,
        topic: &str,
        frame: Frame<'_>,
    ) -> PublishReport {
        // Taken out for the call: the registry reaches the connections through `self`.
        let field = if envelope {
            &mut self.framed
        } else {
            &mut self.registry
        };
        let mut registry = std::mem::take(field);
        let report = registry.publish(topic, frame, self);
        if envelope {
            self.framed = registry;
        } else {
            self.registry = registry;
        }
        self.shared.stats[self.index]
            .messages_out
            .bump(report.queued as u64);
        report
    }

    /// Hands the pending runs of frames to every subscriber of their topic.
    pub(super) fn flush_pending(&mut self) {
        if self.registry.has_pending() {
            let mut registry = std::mem::take(&mut self.registry);
            registry.flush_pending(self);
            self.registry = registry;
        }
        if self.framed.has_pending() {
            let mut registry = std::mem::take(&mut self.framed);
            registry.flush_pending(self);
            self.framed = registry;
        }
    }

    /// Publishes on this worker: local fan-out now, then once to each other worker that
    /// has subscribers. Encodes nothing when nobody is subscribed anywhere.
    pub(crate) fn publish(&mut self, topic: &str, opcode: OpCode, payload: &[u8]) -> PublishReport {
        self.stats().publishes.bump(1);
        let shared = self.shared.clone();
        if let Some(history) = shared.history_of(topic) {
            // Numbered, kept, and delivered here through this worker's own inbox, in
            // offset order with every other worker's publications (`core/history.rs`).
            self.flush_pending();
            let (position, handed, dropped) = shared.publish_history(
                history,
                topic,
                opcode,
                payload,
                crate::engine::history::Publisher::Worker(self.index),
            );
            self.own_sequenced |= handed > 0;
            return PublishReport {
                forwarded_workers: handed,
                forward_dropped: dropped,
                position,
                ..PublishReport::default()
            };
        }
        // Other nodes first in code, but nothing waits: the broker client sends it on its
        // own thread while this worker fans out.
        self.shared.publish_to_broker(topic, opcode, payload);
        let others = self.shared.directory.workers_with(topic, Some(self.index));
        let local = self.registry.key(topic);
        if local.is_none() && others == 0 {
            return PublishReport::default();
        }
        let topic: ArcStr = local.unwrap_or_else(|| ArcStr::from(topic));
        let mut report = self.fanout_local(&topic, Frame::Message(opcode, payload));
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
        if self.shared.history_of(topic).is_some() {
            // Joins after what is in flight to this worker (`core/history.rs`).
            return !matches!(
                self.join(id, topic, Subscription::live(), false, false),
                super::history::Join::No
            );
        }
        // Membership changes take effect between messages, in order.
        self.flush_pending();
        let Some(slot) = slot_of(&mut self.slots, id) else {
            return false;
        };
        if slot.has_topic(topic) {
            return false;
        }
        let key = self.registry.intern(topic);
        slot.add_topic(key.clone());
        let n = self.list(&key, id, false);
        self.shared.directory.set(&key, self.index, n);
        if n == 1 {
            self.shared.interest_changed(&key);
        }
        true
    }

    pub(super) fn unsubscribe(&mut self, id: ConnId, topic: &str) -> bool {
        self.flush_pending();
        let Some(slot) = slot_of(&mut self.slots, id) else {
            return false;
        };
        let Some(member) = slot.remove_topic(topic) else {
            return false;
        };
        self.remove_subscriber(id, &member);
        true
    }

    /// `id` leaves the topic of its (former) membership `m`.
    pub(super) fn remove_subscriber(&mut self, id: ConnId, m: &Member) {
        let n = self.forget_subscriber(id, m);
        self.shared.directory.set(&m.key, self.index, n);
        if n == 0 {
            self.shared.interest_changed(&m.key);
        }
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
        slot.conn
            .close(self.shared.proto_config(slot.conn.tag()), code, reason, now);
        let at = slot.conn.poll_timeout();
        self.count_close_sent(u16::from(code));
        if let Some(at) = at {
            self.schedule(id, at);
        }
        self.mark_dirty(id);
    }
}

/// The slab as the pub/sub registry sees it: a member is a slot index (listed members are
/// never freed slots, see `Inner::registry`).
impl<D> Subscribers for Inner<D> {
    type Id = u32;

    #[inline]
    fn room(&self, slot: u32, len: usize, ahead: usize) -> Room {
        self.slots
            .get(slot as usize)
            .map_or(Room::Closed, |s| s.room(len, ahead, self.soft, self.hard))
    }

    fn queue_run(&mut self, slot: u32, run: &Bytes, twin: Option<&Bytes>) -> bool {
        let Some(s) = self.slots.get_mut(slot as usize) else {
            return false;
        };
        let run = match twin {
            Some(t) if s.flags.has(Flags::DEFLATE) => t,
            _ => run,
        };
        let queued = !s.flags.has(Flags::DEAD)
            && !s.flags.has(Flags::CLOSING)
            && s.conn.send_shared(run).is_ok();
        if queued {
            let id = ConnId {
                slot,
                generation: s.generation,
            };
            self.mark_dirty(id);
        }
        queued
    }

    fn queue_with_policy(
        &mut self,
        slot: u32,
        frame: &Bytes,
        twin: &mut crate::pubsub::Twin<'_>,
        topic: &ArcStr,
    ) -> SendStatus {
        let Some(s) = self.slots.get(slot as usize) else {
            return SendStatus::Closed;
        };
        let id = ConnId {
            slot,
            generation: s.generation,
        };
        if s.flags.has(Flags::DEFLATE) {
            let twin = twin.get().clone();
            return self.queue_frame(id, Out::Shared(&twin), Some(topic));
        }
        self.queue_frame(id, Out::Shared(frame), Some(topic))
    }
}
