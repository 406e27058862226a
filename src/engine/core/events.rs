//! What a backend reports to a worker's core: bytes read (handshake or frames, then the
//! handler's callbacks), commands from other threads, EOF, write completions and writable
//! edges, a socket closed, the timer tick, and the start of a drain.

use super::*;

impl<H: Handler> Core<H> {
    /// Bytes arrived on a connection. `data` is the backend's receive buffer: it is
    /// processed (and unmasked) in place and not kept.
    pub fn on_data(&mut self, id: ConnId, data: &mut [u8], now: Instant) {
        self.inner.now = now;
        self.inner.shared.stats[self.inner.index]
            .bytes_in
            .bump(data.len() as u64);
        let limits = self.inner.limits;
        let Some(slot) = slot_of(&mut self.inner.slots, id) else {
            return;
        };
        if slot.flags.has(Flags::DEAD) || slot.flags.has(Flags::CLOSING) {
            return;
        }
        match slot.phase {
            Phase::Handshake => {
                if let Some(pending) = slot.extra.as_mut().and_then(|e| e.deferred_mut()) {
                    // Waiting for the application: hold what the client sends, bounded.
                    if pending.rest.len() + data.len() > limits.max_header_bytes {
                        slot.flags.set(Flags::DEAD, true);
                        self.inner.mark_dirty(id);
                    } else {
                        pending.rest.extend_from_slice(data);
                    }
                    return;
                }
                // Parsed where it was read, unless an earlier read left part of it.
                let kept = slot.extra.as_mut().map(|e| &mut e.request);
                let (input, was_kept): (&[u8], bool) = match kept {
                    Some(buf) if !buf.is_empty() => {
                        buf.extend_from_slice(data);
                        (buf, true)
                    }
                    _ => (data, false),
                };
                match handshake::parse_request(input, &limits) {
                    Ok(ParseStatus::Partial) => {
                        if !was_kept {
                            slot.extra().request.extend_from_slice(data);
                        }
                    }
                    Ok(ParseStatus::Complete { request, consumed }) => {
                        let rest = input.get(consumed..).map(<[u8]>::to_vec);
                        self.on_request(id, request, rest.unwrap_or_default(), now);
                    }
                    Err(e) => self.respond_error(id, e),
                }
            }
            Phase::Open => {
                // A read may start an earlier deadline (a message's, or the close
                // deadline of a peer's close); the wheel keeps only the earliest.
                if slot
                    .conn
                    .handle_read(self.inner.shared.proto_config(slot.conn.tag()), data, now)
                    && let Some(at) = slot.conn.poll_timeout()
                {
                    self.inner.schedule(id, at);
                }
                self.drain_events(id);
                self.check_budget(id);
                self.check_queue(id);
            }
            // An answered request: what follows is discarded.
            Phase::Finish => {}
        }
    }

    /// Hands the connection's events to the handler.
    pub(super) fn drain_events(&mut self, id: ConnId) {
        loop {
            let Some(slot) = slot_of(&mut self.inner.slots, id) else {
                return;
            };
            let Some(event) = slot.conn.poll_event() else {
                break;
            };
            let message = match event {
                Event::Text(payload) => Some(Message {
                    opcode: OpCode::Text,
                    payload,
                }),
                Event::Binary(payload) => Some(Message {
                    opcode: OpCode::Binary,
                    payload,
                }),
                Event::Ping(_) | Event::Pong(_) => None,
                Event::Close(frame) => {
                    let code = u16::from(slot.conn.close_code());
                    if let Some(f) = frame.filter(|f| !f.reason.is_empty()) {
                        slot.extra().set_close_reason(f.reason);
                    }
                    let stats = self.inner.stats();
                    stats.close_received(code);
                    if code != 1005 {
                        stats.close_sent(code); // the echo of the peer's code
                    }
                    None
                }
                Event::ProtocolError(e) => {
                    tracing::debug!(slot = id.slot, "protocol error: {e}");
                    let code = u16::from(slot.conn.close_code());
                    let stats = self.inner.stats();
                    stats.close_sent(code);
                    if e == crate::proto::ProtocolError::MessageTimeout {
                        stats.message_timeouts.bump(1);
                    } else {
                        stats.protocol_errors.bump(1);
                    }
                    None
                }
                Event::TimedOut => {
                    // 1006 unless we had started a close with a code of our own.
                    slot.flags.set(Flags::DEAD, true);
                    None
                }
                Event::SendTimedOut => {
                    tracing::debug!(slot = id.slot, "send made no progress: dropped");
                    slot.flags.set(Flags::DEAD, true);
                    self.inner.stats().send_timeouts.bump(1);
                    None
                }
            };
            if let Some(m) = message {
                self.inner.stats().messages_in.bump(1);
                self.handler.on_message(
                    &mut Conn {
                        inner: &mut self.inner,
                        id,
                    },
                    m,
                );
            }
        }
        self.inner.mark_dirty(id);
    }

    /// Runs the commands other threads sent to this worker (publishes, closes, sends and
    /// (un)subscriptions of one connection).
    pub fn on_commands(&mut self, now: Instant) {
        self.inner.now = now;
        let batch = self.inner.shared.take_commands(self.inner.index);
        for cmd in batch {
            match cmd {
                Command::Publish(topic, frame) => {
                    self.inner.fanout_local(&topic, Frame::Encoded(&frame));
                }
                Command::Sequenced(topic, epoch, entry) => {
                    self.inner.on_sequenced(&topic, epoch, &entry);
                }
                Command::SubscribeAt(id, topic, sub) => {
                    if !self.subscribe_at(id, &topic, sub, false) {
                        self.inner.stats().handle_misses.bump(1);
                    }
                }
                Command::Unpark(id, topic, sub) => {
                    // A connection gone meanwhile is no longer parked: nothing happens.
                    self.subscribe_at(id, &topic, sub, true);
                }
                Command::Close(id, code, reason) => {
                    self.inner.close_conn(id, code, &reason);
                }
                Command::Send(id, frame) => {
                    // Generation-checked: a stale id reaches no connection.
                    match self.inner.queue_frame(id, Out::Owned(frame), None) {
                        SendStatus::Queued | SendStatus::Backpressure => {
                            self.inner.stats().messages_out.bump(1)
                        }
                        SendStatus::Closed => self.inner.stats().handle_misses.bump(1),
                        SendStatus::Dropped | SendStatus::Conflated => {}
                    }
                }
                Command::Resolve(id, decision) => self.on_resolve(id, decision, now),
                Command::Subscribe(id, topic) => {
                    if self.inner.is_open(id) {
                        self.inner.subscribe(id, &topic);
                    } else {
                        self.inner.stats().handle_misses.bump(1);
                    }
                }
                Command::Unsubscribe(id, topic) => {
                    if self.inner.is_open(id) {
                        self.inner.unsubscribe(id, &topic);
                    } else {
                        self.inner.stats().handle_misses.bump(1);
                    }
                }
            }
        }
    }

    /// The peer closed its side, or the socket failed.
    pub fn on_eof(&mut self, id: ConnId) {
        if let Some(slot) = slot_of(&mut self.inner.slots, id) {
            slot.flags.set(Flags::DEAD, true);
        }
        self.inner.mark_dirty(id);
    }

    /// A send completed with `result` (bytes written, or a negative errno).
    pub fn on_sent(&mut self, id: ConnId, result: i32) {
        let Some(slot) = slot_of(&mut self.inner.slots, id) else {
            return;
        };
        slot.flags.set(Flags::SENDING, false);
        match usize::try_from(result) {
            Ok(n) => {
                self.written(id, n);
            }
            Err(_) => slot.flags.set(Flags::DEAD, true),
        }
        // Most completions leave nothing to do: skip the flush pass for those (a fan-out
        // to thousands of subscribers completes thousands of sends per turn).
        let idle = slot_of(&mut self.inner.slots, id).is_some_and(|s| {
            !s.flags.has(Flags::DEAD)
                && s.conn.transmit_frames() == 0
                && matches!(s.phase, Phase::Open)
                && !s.conn.is_closed()
                && s.flags.reading_paused() == s.flags.has(Flags::READING_OFF)
        });
        if !idle {
            self.inner.mark_dirty(id);
        }
    }

    /// Accounts `n` bytes written on `id`.
    pub(super) fn written(&mut self, id: ConnId, n: usize) {
        self.inner.shared.stats[self.inner.index]
            .bytes_out
            .bump(n as u64);
        let Some(slot) = slot_of(&mut self.inner.slots, id) else {
            return;
        };
        slot.conn
            .advance_transmit(self.inner.shared.proto_config(slot.conn.tag()), n);
        if slot.conn.transmit_frames() == 0 && slot.flags.has(Flags::JUST_UPGRADED) {
            // The 101 is out: an idle connection keeps no queue allocation.
            slot.flags.set(Flags::JUST_UPGRADED, false);
            slot.conn.shrink();
        }
        let conflated = slot.has_conflated();
        if slot.flags.has(Flags::QUEUE_PAUSED)
            && slot.conn.queued_bytes() <= self.inner.shared.config.send_queue_soft
        {
            slot.flags.set(Flags::QUEUE_PAUSED, false);
            self.inner.mark_dirty(id);
        }
        if conflated {
            self.inner.release_conflated(id);
        }
    }

    /// The socket can take more bytes (epoll).
    pub fn on_writable(&mut self, id: ConnId) {
        if let Some(slot) = slot_of(&mut self.inner.slots, id) {
            slot.flags.set(Flags::BLOCKED, false);
        }
        self.inner.mark_dirty(id);
    }

    /// The socket is closed and no operation on it is pending: tell the handler, leave
    /// every topic, free the slot.
    pub fn on_closed(&mut self, id: ConnId) {
        let Some(slot) = slot_of(&mut self.inner.slots, id) else {
            return;
        };
        let counted = slot.flags.has(Flags::COUNTED);
        let code = slot.conn.close_code();
        let reason = slot.extra.as_mut().and_then(|e| e.take_close_reason());
        if counted {
            self.handler.on_close(
                &mut Conn {
                    inner: &mut self.inner,
                    id,
                },
                code,
                reason.as_deref().map_or("", String::as_str),
            );
        }
        let Some(slot) = slot_of(&mut self.inner.slots, id) else {
            return;
        };
        let topics = slot.take_topics();
        let extra = slot.extra.take();
        if let Some(pending) = extra.as_ref().and_then(|e| e.deferred()) {
            // A deferred upgrade's client left: its token now reports `Gone`.
            pending.gone.store(true, Ordering::Release);
        }
        drop(extra);
        if counted {
            self.inner.shared.set_live(self.inner.index, id, false);
        }
        // The wheel's lists run through the slab: off it before the slot is freed.
        self.inner.wheel.remove(&mut self.inner.slots, id.slot);
        self.inner.slots.remove(id.slot as usize);
        for m in &topics {
            self.inner.remove_subscriber(id, m);
        }
        if counted {
            self.inner.shared.open.fetch_sub(1, Ordering::AcqRel);
        }
        self.inner.shared.sockets.fetch_sub(1, Ordering::AcqRel);
        self.inner.stats().closed.bump(1);
        self.rebalance_budget();
    }

    /// Runs the timers due by `now`.
    pub fn on_tick(&mut self, now: Instant) {
        self.inner.now = now;
        self.rebalance_budget();
        // Frames published before a deadline passed go out before its ping or close.
        self.inner.flush_pending();
        self.inner.sweep_history();
        let mut expired = std::mem::take(&mut self.inner.expired);
        let tick = self.inner.wheel.current();
        self.inner
            .wheel
            .expire(&mut self.inner.slots, now, &mut expired);
        if self.inner.wheel.current() != tick {
            // Once per wheel tick (this runs every loop turn): spare connection buffers a
            // burst left behind go back to the allocator gradually.
            crate::proto::connection::trim_spares();
        }
        // Named with their generations before any callback runs (a callback may close a
        // connection whose slot another one then takes).
        let mut due = std::mem::take(&mut self.inner.due);
        due.extend(expired.drain(..).filter_map(|slot| {
            let generation = self.inner.slots.get(slot as usize)?.generation;
            Some(ConnId { slot, generation })
        }));
        self.inner.expired = expired;
        for id in due.drain(..) {
            let Some(slot) = slot_of(&mut self.inner.slots, id) else {
                continue;
            };
            let next = match slot.phase {
                Phase::Handshake => {
                    // Only its handshake deadline puts a socket in this phase on the wheel,
                    // and the wheel never fires early (ticks round up): the deadline has
                    // passed. A slow-drip client: drop it without an answer.
                    slot.flags.set(Flags::DEAD, true);
                    None
                }
                Phase::Open => {
                    slot.conn
                        .handle_timeout(self.inner.shared.proto_config(slot.conn.tag()), now);
                    if slot.conn.transmit_frames() == 0 {
                        // The timer fires after a silence: give back what a burst left.
                        slot.conn.shrink();
                    }
                    let mut next = slot.conn.poll_timeout();
                    // The application's timer shares the slot's one wheel entry.
                    let timer_due = slot.timer().is_some_and(|at| at <= now);
                    if timer_due {
                        slot.extra().set_timer(None);
                        slot.tidy();
                    } else if let Some(at) = slot.timer() {
                        next = Some(next.map_or(at, |n| n.min(at)));
                    }
                    self.drain_events(id);
                    if timer_due && self.inner.is_open(id) {
                        // It may set the timer again: that schedules the slot itself.
                        self.handler.on_timer(&mut Conn {
                            inner: &mut self.inner,
                            id,
                        });
                    }
                    next
                }
                Phase::Finish => {
                    // The answer was not taken, or the peer did not close, in time.
                    slot.flags.set(Flags::DEAD, true);
                    None
                }
            };
            if let Some(at) = next {
                self.inner.schedule(id, at);
            }
            self.inner.mark_dirty(id);
        }
        self.inner.due = due;
    }

    /// Starts the graceful drain: close 1001 to every open connection, drop the rest.
    pub fn begin_drain(&mut self, now: Instant, deadline: Instant) {
        if self.inner.draining.is_some() {
            return;
        }
        self.inner.flush_pending();
        self.inner.now = now;
        self.inner.draining = Some(deadline);
        let code = self.inner.shared.config.drain_close_code;
        let ids = self.all_ids();
        for id in ids {
            let Some(slot) = slot_of(&mut self.inner.slots, id) else {
                continue;
            };
            match slot.phase {
                Phase::Open => {
                    self.inner.close_conn(id, code, "server shutting down");
                }
                Phase::Handshake => slot.flags.set(Flags::DEAD, true),
                Phase::Finish => {}
            }
            self.inner.mark_dirty(id);
        }
    }
}
