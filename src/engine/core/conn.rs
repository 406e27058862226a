//! [`Conn`]: a connection as a handler sees it, inside a callback.

use super::*;

impl<D> Conn<'_, D> {
    /// This connection's id on its worker.
    pub fn id(&self) -> ConnId {
        self.id
    }

    /// The worker this connection lives on.
    pub fn worker(&self) -> usize {
        self.inner.index
    }

    /// This connection's id in the whole server: what a [`Handle`](crate::engine::Handle)
    /// takes to send to it, close it or (un)subscribe it from another thread (keep it in
    /// your own map, e.g. user -> connections, and drop it in `on_close`).
    pub fn global_id(&self) -> crate::engine::GlobalConnId {
        crate::engine::GlobalConnId {
            worker: self.inner.index,
            id: self.id,
        }
    }

    /// The handler's data for this connection.
    pub fn data(&mut self) -> Option<&mut D> {
        slot_of(&mut self.inner.slots, self.id).and_then(|s| s.data.as_mut())
    }

    /// Queues a message (or a ping/pong) on this connection. A control frame over 125
    /// bytes, or a close frame (use [`Conn::close`]), is not sent: `Dropped`.
    pub fn send(&mut self, opcode: OpCode, payload: &[u8]) -> SendStatus {
        if refused(opcode, payload.len()) {
            return SendStatus::Dropped;
        }
        self.queue(Out::Message(opcode, payload))
    }

    /// Like [`Conn::send`], taking the payload by value: a large one is written from
    /// where it is, with no copy. Echoing or forwarding a received [`Message`] this way
    /// (`conn.send_bytes(m.opcode, m.payload)`) costs no copy of its payload.
    pub fn send_bytes(&mut self, opcode: OpCode, payload: Bytes) -> SendStatus {
        if refused(opcode, payload.len()) {
            return SendStatus::Dropped;
        }
        self.queue(Out::Payload(opcode, payload))
    }

    /// Queues a text message.
    pub fn send_text(&mut self, text: &str) -> SendStatus {
        self.send(OpCode::Text, text.as_bytes())
    }

    /// Queues a binary message.
    pub fn send_binary(&mut self, payload: &[u8]) -> SendStatus {
        self.send(OpCode::Binary, payload)
    }

    /// Queues an already encoded frame (see [`crate::proto::encode_frame`]).
    pub fn send_frame(&mut self, frame: Bytes) -> SendStatus {
        self.queue(Out::Owned(frame))
    }

    fn queue(&mut self, frame: Out<'_>) -> SendStatus {
        let status = self.inner.queue_frame(self.id, frame, None);
        if matches!(status, SendStatus::Queued | SendStatus::Backpressure) {
            self.inner.shared.stats[self.inner.index]
                .messages_out
                .bump(1);
        }
        status
    }

    /// Subscribes this connection to `topic`. Returns `false` if it already was.
    pub fn subscribe(&mut self, topic: &str) -> bool {
        self.inner.subscribe(self.id, topic)
    }

    /// Subscribes this connection to `topic`, a topic with history, as `sub` says:
    /// the publications after `sub.since` that are kept are queued now (outside the queue
    /// limits: the history bounds them), live ones follow with no gap and no repeat.
    /// Returns where live delivery starts and whether the replay is complete (`None`: the
    /// topic keeps no history here, the connection is not open, or it is subscribed
    /// already; or, with a broker that numbers publications, the node's copy of the
    /// topic's history is still loading: the subscription is made once it is, and
    /// [`Handler::on_subscribed`](crate::api::Handler::on_subscribed) is called then). To send something ahead of the replay, send it before calling, or
    /// subscribe with [`Accept::subscribe_at`](crate::api::Accept::subscribe_at), whose
    /// [`Handler::on_subscribed`](crate::api::Handler::on_subscribed) runs first.
    pub fn subscribe_at(
        &mut self,
        topic: &str,
        sub: crate::pubsub::history::Subscription,
    ) -> Option<crate::pubsub::history::Resumed> {
        match self.inner.join(self.id, topic, sub, false, true) {
            super::history::Join::Joined(resumed, entries) => {
                self.inner.queue_replay(self.id, &entries, sub.envelope);
                Some(resumed)
            }
            super::history::Join::Parked | super::history::Join::No => None,
        }
    }

    /// The position of `topic`'s history on this node (`None`: no history, or nothing
    /// published to it yet).
    pub fn position(&self, topic: &str) -> Option<crate::pubsub::history::Position> {
        self.inner.position(topic)
    }

    /// Unsubscribes this connection from `topic`. Returns `false` if it was not subscribed.
    pub fn unsubscribe(&mut self, topic: &str) -> bool {
        self.inner.unsubscribe(self.id, topic)
    }

    /// The topics this connection is subscribed to.
    pub fn topics(&self) -> Vec<String> {
        self.inner
            .slots
            .get(self.id.slot as usize)
            .map(|s| s.topics().map(|t| t.to_string()).collect())
            .unwrap_or_default()
    }

    /// Publishes a message to every subscriber of `topic` on every worker (this connection
    /// included if it is subscribed). The report covers this worker's subscribers.
    ///
    /// When this connection is itself a subscriber, its own copy is written last in this
    /// turn, after every other write the turn makes: a client that paces its publishing
    /// on its own echo (a window of unacknowledged messages) then paces it on the server's
    /// progress, not on a head start. A turn writes at most `write_batch` (1,024 by
    /// default) connections; in a wider fan-out the rest are written in the next turns, in the
    /// order they became due, and the publisher's copy does not wait for them (its
    /// message is already in every subscriber's queue): it is then written first in its
    /// turn, so its next messages arrive before the turn ends and join the writes still
    /// to come, and each write carries more frames (fanout-wide, epoll: 7.3-7.7M
    /// deliveries/s at 0.13 CPU-s per 1M with the copy last, 12.0-12.8M at 0.08 first).
    pub fn publish(&mut self, topic: &str, opcode: OpCode, payload: &[u8]) -> PublishReport {
        if let Some(slot) = slot_of(&mut self.inner.slots, self.id)
            && !slot.flags.has(Flags::PUBLISHED)
        {
            slot.flags.set(Flags::PUBLISHED, true);
            self.inner.publishers.push(self.id.slot);
        }
        self.inner.publish(topic, opcode, payload)
    }

    /// Publishes a message to the first topic this connection subscribed to (the room it
    /// joined, say), as [`Conn::publish`] does; `None` when it is subscribed to none. The
    /// engine's own name of the topic is used, so a handler whose connections publish to
    /// their own topic need not keep the name in every connection's data.
    pub fn publish_to_joined(&mut self, opcode: OpCode, payload: &[u8]) -> Option<PublishReport> {
        let topic = slot_of(&mut self.inner.slots, self.id)?
            .topic
            .as_ref()?
            .key
            .clone();
        Some(self.publish(&topic, opcode, payload))
    }

    /// Starts the closing handshake.
    pub fn close(&mut self, code: CloseCode, reason: &str) {
        self.inner.close_conn(self.id, code, reason)
    }

    /// Stops reading from this connection (TCP flow control then slows the peer down).
    pub fn pause_reading(&mut self) {
        let id = self.id;
        if let Some(s) = slot_of(&mut self.inner.slots, id) {
            s.flags.set(Flags::PAUSED, true);
        }
        self.inner.mark_dirty(id);
    }

    /// Resumes reading.
    pub fn resume_reading(&mut self) {
        let id = self.id;
        if let Some(s) = slot_of(&mut self.inner.slots, id) {
            s.flags.set(Flags::PAUSED, false);
        }
        self.inner.mark_dirty(id);
    }

    /// Calls [`Handler::on_timer`](crate::api::Handler::on_timer) for this connection once
    /// `after` has passed (at the wheel's 20 ms resolution, never early), replacing a
    /// timer already set. One timer per connection; it is dropped with the connection (a
    /// connection closed before it fires gets no call) and does not fire while the
    /// connection is closing. Costs no memory on connections that do not use it.
    ///
    /// "Authenticate with the first message within 5 s": `conn.set_timer(5 s)` in
    /// `on_open`, `conn.cancel_timer()` once the first message checks out, and
    /// `conn.close(CloseCode::Policy, ...)` in `on_timer`.
    pub fn set_timer(&mut self, after: std::time::Duration) {
        let id = self.id;
        let at = self.inner.now + after;
        if !self.inner.is_open(id) {
            return;
        }
        if let Some(slot) = slot_of(&mut self.inner.slots, id) {
            slot.extra().set_timer(Some(at));
            schedule_slot(&mut self.inner.wheel, &mut self.inner.slots, id, at);
        }
    }

    /// Cancels this connection's timer, if one is set (`on_timer` is not called).
    pub fn cancel_timer(&mut self) {
        if let Some(slot) = slot_of(&mut self.inner.slots, self.id)
            && let Some(extra) = slot.extra.as_mut()
        {
            extra.set_timer(None);
            slot.tidy();
        }
    }

    /// Bytes queued on this connection and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.inner
            .slots
            .get(self.id.slot as usize)
            .map_or(0, |s| s.conn.queued_bytes())
    }
}
