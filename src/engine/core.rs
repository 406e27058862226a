//! The backend-independent part of a worker: the connection slab, the handshake, routing,
//! the bench-protocol application (echo and pub/sub), timers and the graceful drain.
//!
//! A backend ([`super::uring`], [`super::epoll`]) owns the sockets and the system calls.
//! It tells the core what happened (`on_accept`, `on_data`, `on_eof`, `on_sent`,
//! `on_closed`, `on_tick`) and, once per loop turn, calls [`Core::flush`], which asks the
//! backend through the [`Driver`] trait to write every connection that has bytes queued and
//! to close every connection that is done. Both backends therefore share every rule.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use slab::Slab;

use super::wheel::{Entry, TimerWheel};
use super::{Shared, WorkerStats};
use crate::proto::close::CloseCode;
use crate::proto::handshake::{self, HandshakeLimits, ParseStatus, Request};
use crate::proto::{Connection, Event, HandshakeError, OpCode, encode_frame};

/// Identifies a slot across reuse: a completion for an old generation is ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConnId {
    /// Index in the slab.
    pub slot: u32,
    /// Generation of the slot.
    pub generation: u32,
}

/// What a backend did with a write request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendOutcome {
    /// A send is in flight; `on_sent` will follow.
    InFlight,
    /// `n` bytes were written now (may be fewer than queued).
    Wrote(usize),
    /// The socket buffer is full: the backend will call `on_writable`.
    WouldBlock,
    /// The socket is broken.
    Failed,
}

/// The backend's side of [`Core::flush`].
pub trait Driver {
    /// Writes as much of `bufs` as possible to the connection's socket.
    fn send(&mut self, id: ConnId, fd: u32, bufs: &mut dyn Iterator<Item = &[u8]>) -> SendOutcome;
    /// Closes the connection's socket. Returns `true` if it is already closed (then the
    /// slot is freed at once), `false` if `on_closed` will follow.
    fn close(&mut self, id: ConnId, fd: u32) -> bool;
}

#[derive(Debug)]
enum Phase {
    /// Reading the upgrade request (boxed: an upgraded connection does not carry it).
    Handshake(Box<Handshake>),
    /// Upgraded.
    Open,
    /// Answered (an HTTP response or our close): close the socket once written.
    Finish,
}

#[derive(Debug)]
struct Handshake {
    buf: Vec<u8>,
    deadline: Instant,
}

#[derive(Debug, Clone)]
enum Route {
    None,
    Echo,
    PubSub(Arc<str>),
}

struct Slot {
    conn: Connection,
    phase: Phase,
    route: Route,
    generation: u32,
    fd: u32,
    /// A send is in flight (io_uring).
    sending: bool,
    /// In the dirty list already.
    dirty: bool,
    /// Waiting for the socket to become writable (epoll).
    blocked: bool,
    /// The peer is gone (EOF or error): write nothing more, close.
    dead: bool,
    /// The socket close has been requested.
    closing: bool,
    /// Counted as an open WebSocket.
    counted: bool,
    /// The wheel tick this slot is scheduled at (`u64::MAX`: none).
    tick: u64,
    /// The code to report on close.
    close_code: u16,
    /// Upgraded, and the 101 may still be queued.
    just_upgraded: bool,
}

/// One worker's state.
pub struct Core {
    index: usize,
    shared: Arc<Shared>,
    slots: Slab<Slot>,
    next_generation: u32,
    wheel: TimerWheel,
    expired: Vec<Entry>,
    dirty: Vec<u32>,
    topics: HashMap<Arc<str>, Vec<ConnId>>,
    limits: HandshakeLimits,
    draining: Option<Instant>,
}

impl Core {
    /// A core for worker `index`.
    pub fn new(index: usize, shared: Arc<Shared>, now: Instant) -> Core {
        let limits = HandshakeLimits {
            max_header_bytes: shared.config.max_header_bytes,
            ..HandshakeLimits::default()
        };
        Core {
            index,
            shared,
            slots: Slab::new(),
            next_generation: 0,
            wheel: TimerWheel::new(now),
            expired: Vec::new(),
            dirty: Vec::new(),
            topics: HashMap::new(),
            limits,
            draining: None,
        }
    }

    fn stats(&self) -> &WorkerStats {
        &self.shared.stats[self.index]
    }

    /// Connections this worker holds (any phase).
    pub fn len(&self) -> usize {
        self.slots.len()
    }

    /// Whether the worker holds no connection.
    pub fn is_empty(&self) -> bool {
        self.slots.is_empty()
    }

    /// Whether a graceful drain has started.
    pub fn draining(&self) -> bool {
        self.draining.is_some()
    }

    /// Whether the worker may exit: drained and empty, or past the drain deadline.
    pub fn finished(&self, now: Instant) -> bool {
        match self.draining {
            Some(deadline) => self.slots.is_empty() || now >= deadline,
            None => false,
        }
    }

    /// The socket of a live connection (`None` once it is closing or gone).
    pub fn fd_of(&self, id: ConnId) -> Option<u32> {
        self.slots
            .get(id.slot as usize)
            .filter(|s| s.generation == id.generation && !s.closing)
            .map(|s| s.fd)
    }

    /// The id of the connection in `slot`, if any.
    pub fn id_of(&self, slot: u32) -> Option<ConnId> {
        self.slots.get(slot as usize).map(|s| ConnId {
            slot,
            generation: s.generation,
        })
    }

    /// A new socket was accepted (`fd`: descriptor or direct-table index).
    pub fn on_accept(&mut self, fd: u32, now: Instant) -> ConnId {
        self.stats().accepted.fetch_add(1, Ordering::Relaxed);
        let generation = self.next_generation;
        self.next_generation = self.next_generation.wrapping_add(1);
        let deadline = now + self.shared.config.handshake_timeout;
        let slot = self.slots.insert(Slot {
            conn: Connection::new(self.shared.proto.clone(), now),
            phase: Phase::Handshake(Box::new(Handshake {
                buf: Vec::new(),
                deadline,
            })),
            route: Route::None,
            generation,
            fd,
            sending: false,
            dirty: false,
            blocked: false,
            dead: false,
            closing: false,
            counted: false,
            tick: u64::MAX,
            close_code: 1006,
            just_upgraded: false,
        }) as u32;
        let id = ConnId { slot, generation };
        self.schedule(id, deadline);
        if self.draining.is_some() {
            // Accepted just before the listener closed: refuse politely.
            self.respond_error(id, HandshakeError::Full);
        }
        id
    }

    fn schedule(&mut self, id: ConnId, at: Instant) {
        let tick = self.wheel.tick_of(at);
        if let Some(s) = slot_of(&mut self.slots, id)
            && tick < s.tick
        {
            s.tick = tick;
            self.wheel.schedule(id.slot, id.generation, tick);
        }
    }

    fn mark_dirty(&mut self, id: ConnId) {
        if let Some(s) = slot_of(&mut self.slots, id)
            && !s.dirty
        {
            s.dirty = true;
            self.dirty.push(id.slot);
        }
    }

    /// Bytes arrived on a connection. `data` is the backend's receive buffer: it is
    /// processed (and unmasked) in place and not kept.
    pub fn on_data(&mut self, id: ConnId, data: &mut [u8], now: Instant) {
        self.shared.stats[self.index]
            .bytes_in
            .fetch_add(data.len() as u64, Ordering::Relaxed);
        let limits = self.limits;
        let Some(slot) = slot_of(&mut self.slots, id) else {
            return;
        };
        if slot.dead || slot.closing {
            return;
        }
        match &mut slot.phase {
            Phase::Handshake(hs) => {
                let buf = &mut hs.buf;
                let status = if buf.is_empty() {
                    handshake::parse_request(data, &limits)
                } else {
                    buf.extend_from_slice(data);
                    handshake::parse_request(buf, &limits)
                };
                match status {
                    Ok(ParseStatus::Partial) => {
                        if buf.is_empty() {
                            buf.extend_from_slice(data);
                        }
                    }
                    Ok(ParseStatus::Complete { request, consumed }) => {
                        let rest = if buf.is_empty() {
                            data.get_mut(consumed..).map(|r| r.to_vec())
                        } else {
                            buf.get(consumed..).map(|r| r.to_vec())
                        };
                        self.on_request(id, request, rest.unwrap_or_default(), now);
                    }
                    Err(e) => self.respond_error(id, e),
                }
            }
            Phase::Open => {
                slot.conn.handle_read(data, now);
                self.drain_events(id);
            }
            Phase::Finish => {}
        }
    }

    fn on_request(&mut self, id: ConnId, request: Request, mut rest: Vec<u8>, now: Instant) {
        if !request.wants_upgrade() {
            return self.respond_http(id, &request);
        }
        let upgrade = match request.validate_upgrade() {
            Ok(u) => u,
            Err(e) => return self.respond_error(id, e),
        };
        let route = if request.path == "/echo" {
            Route::Echo
        } else if let Some(topic) = request
            .path
            .strip_prefix("/pubsub/")
            .filter(|t| !t.is_empty())
        {
            Route::PubSub(Arc::from(topic))
        } else {
            return self.respond_error(id, HandshakeError::NotFound);
        };
        if self.draining.is_some() {
            return self.respond_error(id, HandshakeError::Full);
        }
        // The cap counts upgraded connections over all workers.
        let open = self.shared.open.fetch_add(1, Ordering::AcqRel);
        if open >= self.shared.config.max_connections {
            self.shared.open.fetch_sub(1, Ordering::AcqRel);
            self.stats().rejected_full.fetch_add(1, Ordering::Relaxed);
            return self.respond_error(id, HandshakeError::Full);
        }
        let mut out = Vec::with_capacity(160);
        handshake::encode_accept(&mut out, &upgrade.key, None, &[]);
        let proto = self.shared.proto.clone();
        let Some(slot) = slot_of(&mut self.slots, id) else {
            return;
        };
        slot.counted = true;
        slot.just_upgraded = true;
        slot.phase = Phase::Open;
        slot.route = route.clone();
        // A fresh connection: its timers start now.
        slot.conn = Connection::new(proto, now);
        let _ = slot.conn.send_frame(Bytes::from(out));
        if let Route::PubSub(topic) = route {
            self.topics.entry(topic).or_default().push(id);
        }
        self.stats().upgraded.fetch_add(1, Ordering::Relaxed);
        if !rest.is_empty() {
            if let Some(slot) = slot_of(&mut self.slots, id) {
                slot.conn.handle_read(&mut rest, now);
            }
            self.drain_events(id);
        }
        if let Some(deadline) = slot_of(&mut self.slots, id).and_then(|s| s.conn.poll_timeout()) {
            self.schedule(id, deadline);
        }
        self.mark_dirty(id);
    }

    fn respond_http(&mut self, id: ConnId, request: &Request) {
        let mut out = Vec::new();
        if request.method != "GET" && request.method != "HEAD" {
            handshake::encode_error(
                &mut out,
                HandshakeError::MethodNotAllowed,
                &[("Allow", "GET")],
            );
        } else if request.path == "/" {
            let body = super::status::page(&self.shared);
            handshake::encode_response(
                &mut out,
                200,
                "text/html; charset=utf-8",
                body.as_bytes(),
                &[],
            );
        } else if request.path == "/metrics" {
            let body = super::status::metrics(&self.shared);
            handshake::encode_response(
                &mut out,
                200,
                "text/plain; version=0.0.4",
                body.as_bytes(),
                &[],
            );
        } else if request.path == "/echo" || request.path.starts_with("/pubsub/") {
            handshake::encode_error(&mut out, HandshakeError::UpgradeRequired, &[]);
        } else {
            handshake::encode_error(&mut out, HandshakeError::NotFound, &[]);
        }
        self.stats().http_requests.fetch_add(1, Ordering::Relaxed);
        self.finish_with(id, out);
    }

    fn respond_error(&mut self, id: ConnId, e: HandshakeError) {
        let mut out = Vec::new();
        handshake::encode_error(&mut out, e, &[]);
        self.shared.stats[self.index]
            .rejected
            .fetch_add(1, Ordering::Relaxed);
        tracing::debug!(
            slot = id.slot,
            status = e.status(),
            "handshake refused: {e}"
        );
        self.finish_with(id, out);
    }

    fn finish_with(&mut self, id: ConnId, response: Vec<u8>) {
        if let Some(slot) = slot_of(&mut self.slots, id) {
            slot.phase = Phase::Finish;
            let _ = slot.conn.send_frame(Bytes::from(response));
        }
        self.mark_dirty(id);
    }

    /// Handles the connection's events: the bench protocol's echo and pub/sub.
    fn drain_events(&mut self, id: ConnId) {
        loop {
            let Some(slot) = slot_of(&mut self.slots, id) else {
                return;
            };
            let Some(event) = slot.conn.poll_event() else {
                break;
            };
            let route = slot.route.clone();
            let data = match event {
                Event::Text(p) => Some((OpCode::Text, p)),
                Event::Binary(p) => Some((OpCode::Binary, p)),
                other => {
                    self.on_control(id, other);
                    None
                }
            };
            if let Some((op, payload)) = data {
                let stats = &self.shared.stats[self.index];
                stats.messages_in.fetch_add(1, Ordering::Relaxed);
                match route {
                    Route::Echo => {
                        if let Some(slot) = slot_of(&mut self.slots, id) {
                            let _ = slot.conn.send(op, &payload);
                        }
                        self.shared.stats[self.index]
                            .messages_out
                            .fetch_add(1, Ordering::Relaxed);
                    }
                    Route::PubSub(topic) => {
                        let frame = encode_frame(op, &payload);
                        self.publish_local(&topic, &frame);
                        self.shared.forward(self.index, &topic, &frame);
                    }
                    Route::None => {}
                }
            }
        }
        self.mark_dirty(id);
    }

    fn on_control(&mut self, id: ConnId, event: Event) {
        let code = match event {
            Event::Close(frame) => frame.map_or(1005, |f| u16::from(f.code)),
            Event::ProtocolError(e) => {
                tracing::debug!(slot = id.slot, "protocol error: {e}");
                u16::from(e.close_code())
            }
            Event::TimedOut => 1006,
            _ => return,
        };
        if let Some(slot) = slot_of(&mut self.slots, id) {
            slot.close_code = code;
        }
    }

    /// Queues `frame` on every local subscriber of `topic`: one reference-counted frame,
    /// no copy per subscriber.
    pub fn publish_local(&mut self, topic: &str, frame: &Bytes) {
        let Some(subs) = self.topics.get(topic) else {
            return;
        };
        let mut delivered = 0u64;
        for &sub in subs {
            let Some(slot) = self
                .slots
                .get_mut(sub.slot as usize)
                .filter(|s| s.generation == sub.generation)
            else {
                continue;
            };
            if slot.conn.send_frame(frame.clone()).is_ok() {
                delivered += 1;
                if !slot.dirty {
                    slot.dirty = true;
                    self.dirty.push(sub.slot);
                }
            }
        }
        let stats = &self.shared.stats[self.index];
        stats.messages_out.fetch_add(delivered, Ordering::Relaxed);
    }

    /// Drains frames other workers published to this one.
    pub fn on_inbox(&mut self) {
        let batch = self.shared.take_inbox(self.index);
        for (topic, frame) in batch {
            self.publish_local(&topic, &frame);
        }
    }

    /// The peer closed its side, or the socket failed.
    pub fn on_eof(&mut self, id: ConnId) {
        if let Some(slot) = slot_of(&mut self.slots, id) {
            slot.dead = true;
        }
        self.mark_dirty(id);
    }

    /// A send completed with `result` (bytes written, or a negative errno).
    pub fn on_sent(&mut self, id: ConnId, result: i32) {
        let Some(slot) = slot_of(&mut self.slots, id) else {
            return;
        };
        slot.sending = false;
        match usize::try_from(result) {
            Ok(n) => {
                slot.conn.advance_transmit(n);
                if slot.conn.transmit_frames() == 0
                    && slot.conn.heap_bytes() > 0
                    && slot.just_upgraded
                {
                    // The 101 is out: an idle connection keeps no queue allocation.
                    slot.just_upgraded = false;
                    slot.conn.shrink();
                }
                self.shared.stats[self.index]
                    .bytes_out
                    .fetch_add(n as u64, Ordering::Relaxed);
            }
            Err(_) => slot.dead = true,
        }
        self.mark_dirty(id);
    }

    /// The socket can take more bytes (epoll).
    pub fn on_writable(&mut self, id: ConnId) {
        if let Some(slot) = slot_of(&mut self.slots, id) {
            slot.blocked = false;
        }
        self.mark_dirty(id);
    }

    /// The socket is closed and no operation on it is pending: free the slot.
    pub fn on_closed(&mut self, id: ConnId) {
        let Some(slot) = slot_of(&mut self.slots, id) else {
            return;
        };
        let route = std::mem::replace(&mut slot.route, Route::None);
        let counted = slot.counted;
        self.slots.remove(id.slot as usize);
        if let Route::PubSub(topic) = route
            && let Some(subs) = self.topics.get_mut(&topic)
        {
            subs.retain(|s| *s != id);
            if subs.is_empty() {
                self.topics.remove(&topic);
            }
        }
        if counted {
            self.shared.open.fetch_sub(1, Ordering::AcqRel);
        }
        self.stats().closed.fetch_add(1, Ordering::Relaxed);
    }

    /// Runs the timers due by `now`.
    pub fn on_tick(&mut self, now: Instant) {
        let mut expired = std::mem::take(&mut self.expired);
        self.wheel.expire(now, &mut expired);
        for e in expired.drain(..) {
            let id = ConnId {
                slot: e.slot,
                generation: e.generation,
            };
            let Some(slot) = slot_of(&mut self.slots, id) else {
                continue;
            };
            if slot.tick != e.tick {
                continue; // stale: rescheduled since
            }
            slot.tick = u64::MAX;
            let next = match &slot.phase {
                Phase::Handshake(hs) => {
                    let deadline = hs.deadline;
                    if deadline <= now {
                        // A slow-drip client: drop it without an answer.
                        slot.dead = true;
                        None
                    } else {
                        Some(deadline)
                    }
                }
                Phase::Open => {
                    slot.conn.handle_timeout(now);
                    if slot.conn.transmit_frames() == 0 {
                        // The timer fires after a silence: give back what a burst left.
                        slot.conn.shrink();
                    }
                    let next = slot.conn.poll_timeout();
                    self.drain_events(id);
                    next
                }
                Phase::Finish => None,
            };
            if let Some(at) = next {
                self.schedule(id, at);
            }
            self.mark_dirty(id);
        }
        self.expired = expired;
    }

    /// Starts the graceful drain: close 1001 to every open connection, drop the rest.
    pub fn begin_drain(&mut self, now: Instant, deadline: Instant) {
        if self.draining.is_some() {
            return;
        }
        self.draining = Some(deadline);
        let ids: Vec<ConnId> = self
            .slots
            .iter()
            .map(|(i, s)| ConnId {
                slot: i as u32,
                generation: s.generation,
            })
            .collect();
        for id in ids {
            let Some(slot) = slot_of(&mut self.slots, id) else {
                continue;
            };
            match slot.phase {
                Phase::Open => {
                    slot.conn
                        .close(CloseCode::Away, "server shutting down", now);
                    slot.close_code = 1001;
                    if let Some(at) = slot.conn.poll_timeout() {
                        self.schedule(id, at);
                    }
                }
                Phase::Handshake(_) => slot.dead = true,
                Phase::Finish => {}
            }
            self.mark_dirty(id);
        }
    }

    /// Writes and closes what the last events made due. Call once per loop turn, after
    /// handling every completion: all the turn's writes go out together.
    pub fn flush(&mut self, driver: &mut dyn Driver) {
        let mut dirty = std::mem::take(&mut self.dirty);
        for &slot_index in &dirty {
            let Some(id) = self.id_of(slot_index) else {
                continue;
            };
            let Some(slot) = slot_of(&mut self.slots, id) else {
                continue;
            };
            slot.dirty = false;
            if slot.closing || slot.sending {
                continue;
            }
            if !slot.dead && !slot.blocked && slot.conn.transmit_frames() > 0 {
                let fd = slot.fd;
                let outcome = {
                    let mut bufs = slot.conn.transmit();
                    driver.send(id, fd, &mut bufs)
                };
                match outcome {
                    SendOutcome::InFlight => {
                        slot.sending = true;
                        continue;
                    }
                    SendOutcome::Wrote(n) => {
                        slot.conn.advance_transmit(n);
                        if slot.conn.transmit_frames() == 0 && slot.just_upgraded {
                            slot.just_upgraded = false;
                            slot.conn.shrink();
                        }
                        self.shared.stats[self.index]
                            .bytes_out
                            .fetch_add(n as u64, Ordering::Relaxed);
                        if slot.conn.transmit_frames() > 0 {
                            slot.blocked = true;
                            continue;
                        }
                    }
                    SendOutcome::WouldBlock => {
                        slot.blocked = true;
                        continue;
                    }
                    SendOutcome::Failed => slot.dead = true,
                }
            }
            let done = slot.dead
                || (slot.conn.transmit_frames() == 0
                    && (matches!(slot.phase, Phase::Finish) || slot.conn.is_closed()));
            if done && !slot.closing {
                slot.closing = true;
                if driver.close(id, slot.fd) {
                    self.on_closed(id);
                }
            }
        }
        dirty.clear();
        // Slots made dirty while flushing (none today) wait for the next turn.
        dirty.append(&mut self.dirty);
        self.dirty = dirty;
        for &s in &self.dirty {
            if let Some(slot) = self.slots.get_mut(s as usize) {
                slot.dirty = true;
            }
        }
    }

    /// Drops every connection at once (past the drain deadline, or on a second signal).
    pub fn abort_all(&mut self, driver: &mut dyn Driver) {
        let ids: Vec<ConnId> = self
            .slots
            .iter()
            .map(|(i, s)| ConnId {
                slot: i as u32,
                generation: s.generation,
            })
            .collect();
        for id in ids {
            if let Some(slot) = slot_of(&mut self.slots, id)
                && !slot.closing
            {
                slot.closing = true;
                if driver.close(id, slot.fd) {
                    self.on_closed(id);
                }
            }
        }
    }

    /// Whether any connection waits to be flushed.
    pub fn has_dirty(&self) -> bool {
        !self.dirty.is_empty()
    }
}

fn slot_of(slots: &mut Slab<Slot>, id: ConnId) -> Option<&mut Slot> {
    slots
        .get_mut(id.slot as usize)
        .filter(|s| s.generation == id.generation)
}
