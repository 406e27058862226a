//! The backend-independent part of a worker: the connection slab, the handshake, the
//! handler callbacks, the per-worker topic registry, backpressure, timers and the graceful
//! drain.
//!
//! A backend ([`super::uring`], [`super::epoll`]) owns the sockets and the system calls.
//! It tells the core what happened (`on_accept`, `on_data`, `on_eof`, `on_sent`,
//! `on_closed`, `on_tick`, `on_commands`) and, once per loop turn, calls [`Core::flush`],
//! which asks the backend through the [`Driver`] trait to write every connection that has
//! bytes queued (so all the sends of a fan-out go out in one submission), to pause or
//! resume reading, and to close every connection that is done. Both backends therefore
//! share every rule.
//!
//! Fan-out: a publish checks every local subscriber's queue limits and encodes the frame
//! once onto the turn's pending run of frames for its topic; the run is handed to every
//! subscriber as one queue entry at the end of the turn (or before anything that could
//! reorder it), so a subscriber costs one queue operation and one write per turn, not
//! per message. Other workers that have subscribers get the encoded `Bytes` once each,
//! through their command inbox.
//!
//! Hostile peers: every queue and buffer a peer can fill is bounded here. A queue past
//! the hard limit after a read (or refused by the drop/conflate policy) stops reading
//! (`Flags::QUEUE_PAUSED`); the reassembly budget pauses the connections holding the most
//! (`check_budget`); sockets in any phase count against `Shared::socket_limit`; an HTTP
//! answer ends with a FIN and a linger (`Flags::LINGERING`); every deadline of
//! `proto::Connection` (message, send, close) is scheduled on the wheel when a read or a
//! write starts it. [`fuzzing`] drives a core through a fake backend to check all of it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use slab::Slab;

use super::wheel::{Entry, TimerWheel};
use super::{Bump, Command, Shared, WorkerStats};
use crate::api::{Decision, Handler, Message};
use crate::proto::close::CloseCode;
use crate::proto::handshake::{self, HandshakeLimits, ParseStatus, Request};
use crate::proto::{Connection, Event, HandshakeError, OpCode, State, encode_frame};
use crate::pubsub::{Frame, Policy, PublishReport, Registry, Room, SendStatus};

/// Identifies a connection on its worker across slot reuse: a completion or command for an
/// old generation is ignored.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct ConnId {
    /// Index in the worker's slab.
    pub slot: u32,
    /// Generation of the slot.
    pub generation: u32,
}

/// Generations are 24 bits wide: the io_uring backend packs op (8 bits), generation (24)
/// and slot (32) into a completion's `user_data`; the core wraps generations at this mask.
pub const GENERATION_MASK: u32 = 0xFF_FFFF;

/// What a backend did with a write request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SendOutcome {
    /// A send is in flight; `on_sent` will follow.
    InFlight,
    /// `n` bytes were written now; `all`: every byte offered was taken (the socket may
    /// take more), otherwise the socket buffer is full and `on_writable` will follow.
    Wrote {
        /// Bytes written.
        n: usize,
        /// Whether all offered bytes were written.
        all: bool,
    },
    /// The socket buffer is full: the backend will call `on_writable`.
    WouldBlock,
    /// The socket is broken.
    Failed,
}

/// The backend's side of [`Core::flush`].
pub trait Driver {
    /// Writes as much of `bufs` as possible to the connection's socket. `last`: these are
    /// the connection's final bytes and `close` follows once they are written, so the
    /// backend may hold them back (`MSG_MORE`) for the FIN to ride in the same segment.
    ///
    /// The contract a backend's `unsafe` may rely on: the core has at most one write in
    /// flight per connection (after [`SendOutcome::InFlight`] it calls `send` for that
    /// connection again only after `Core::on_sent`), and the slices stay valid and
    /// unchanged until `on_sent` reports them written (see `Connection::transmit`).
    fn send(
        &mut self,
        id: ConnId,
        fd: u32,
        bufs: &mut dyn Iterator<Item = &[u8]>,
        last: bool,
    ) -> SendOutcome;
    /// Closes the connection's socket, cancelling what is in flight on it. Returns `true`
    /// if it is already closed (the slot is freed at once), `false` if `on_closed` follows.
    fn close(&mut self, id: ConnId, fd: u32) -> bool;
    /// Stops (`false`) or resumes (`true`) reading from the connection.
    fn set_reading(&mut self, id: ConnId, fd: u32, on: bool);
    /// Sends the FIN (`shutdown(SHUT_WR)`) after an HTTP answer, reading on: the peer's
    /// unread request bytes then do not turn the close into a reset that would destroy
    /// the answer. `close` follows once the peer's EOF arrives or the linger time ends.
    fn shutdown_write(&mut self, id: ConnId, fd: u32);
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Phase {
    /// Reading the upgrade request (its buffer and deadline are in the slot's [`Extra`]).
    Handshake,
    /// Upgraded.
    Open,
    /// Answered (an HTTP response): close the socket once written.
    Finish,
}

#[derive(Debug)]
struct Handshake {
    buf: Vec<u8>,
    deadline: Instant,
}

/// Flags of a slot, packed in two bytes (the slot is in every connection's footprint).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Flags(u16);

impl Flags {
    /// A send is in flight (io_uring).
    const SENDING: u16 = 1;
    /// In the dirty list already.
    const DIRTY: u16 = 1 << 1;
    /// Waiting for the socket to become writable (epoll).
    const BLOCKED: u16 = 1 << 2;
    /// The peer is gone (EOF, error, timeout): write nothing more, close.
    const DEAD: u16 = 1 << 3;
    /// The socket close has been requested.
    const CLOSING: u16 = 1 << 4;
    /// Counted as an open WebSocket (and `on_open` was called).
    const COUNTED: u16 = 1 << 5;
    /// Upgraded, and the 101 may still be queued.
    const JUST_UPGRADED: u16 = 1 << 6;
    /// The handler paused reading.
    const PAUSED: u16 = 1 << 7;
    /// What the backend was last told about reading.
    const READING_OFF: u16 = 1 << 8;
    /// It published in this loop turn: its writes go after everyone else's.
    const PUBLISHED: u16 = 1 << 9;
    /// Not read because the worker's reassembly budget is spent (see `Core::check_budget`).
    const BUDGET_PAUSED: u16 = 1 << 10;
    /// Not read because the send queue passed the hard limit (replies to what it reads
    /// would have nowhere to go); resumed below the soft limit.
    const QUEUE_PAUSED: u16 = 1 << 11;
    /// An HTTP answer is out and the FIN sent: waiting for the peer's EOF (or the linger
    /// deadline) before closing.
    const LINGERING: u16 = 1 << 12;

    /// Whether reading should be off (the handler's pause, the budget's or the queue's).
    fn reading_paused(self) -> bool {
        self.0 & (Self::PAUSED | Self::BUDGET_PAUSED | Self::QUEUE_PAUSED) != 0
    }

    fn has(self, flag: u16) -> bool {
        self.0 & flag != 0
    }

    fn set(&mut self, flag: u16, on: bool) {
        if on {
            self.0 |= flag;
        } else {
            self.0 &= !flag;
        }
    }
}

/// The newest frame per topic held back by the conflation policy.
type Conflated = Vec<(Arc<str>, Bytes)>;

/// What only some connections need: boxed, and dropped when empty, so that an idle
/// upgraded connection without topics is its [`Slot`] alone.
#[derive(Debug, Default)]
struct Extra {
    /// While reading the upgrade request.
    handshake: Option<Handshake>,
    /// Topics this connection is subscribed to.
    topics: Vec<Arc<str>>,
    /// Conflation: the newest frame per topic, held while the queue is over its hard limit.
    conflated: Conflated,
    /// The peer's close reason (only when it sent one).
    close_reason: Option<Box<str>>,
}

impl Extra {
    fn is_empty(&self) -> bool {
        self.handshake.is_none()
            && self.topics.is_empty()
            && self.conflated.is_empty()
            && self.close_reason.is_none()
    }
}

/// One connection. Kept at 64 bytes (asserted below): with the timer-wheel entry and the
/// backend's per-slot bytes it is the whole user-space cost of an idle connection.
struct Slot<D> {
    conn: Connection,
    extra: Option<Box<Extra>>,
    /// The wheel tick this slot is scheduled at (`u64::MAX`: none).
    tick: u64,
    generation: u32,
    fd: u32,
    /// The code to report on close.
    close_code: CloseCode,
    flags: Flags,
    phase: Phase,
    /// The handler's per-connection data.
    data: Option<D>,
}

impl<D> Slot<D> {
    /// The queue limits, in one place for a direct send and a fan-out: room for a frame of
    /// `len` bytes with `ahead` more bytes already promised to this connection.
    fn room(&self, len: usize, ahead: usize, soft: usize, hard: usize) -> Room {
        if self.conn.state() != State::Open
            || self.flags.has(Flags::DEAD)
            || self.flags.has(Flags::CLOSING)
        {
            return Room::Closed;
        }
        let queued = self.conn.queued_bytes() + ahead;
        // An empty queue always takes one frame, so a message larger than the hard limit
        // can still be sent to a reader that keeps up.
        if queued > 0 && queued + len > hard {
            Room::Full
        } else {
            Room::Fits {
                over_soft: queued + len > soft,
            }
        }
    }

    fn extra(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Box::default)
    }

    /// Drops the extra part once it holds nothing.
    fn tidy(&mut self) {
        if self.extra.as_ref().is_some_and(|e| e.is_empty()) {
            self.extra = None;
        }
    }

    fn topics(&self) -> &[Arc<str>] {
        self.extra.as_ref().map_or(&[], |e| &e.topics)
    }

    fn has_conflated(&self) -> bool {
        self.extra.as_ref().is_some_and(|e| !e.conflated.is_empty())
    }
}

const _: () = assert!(std::mem::size_of::<Slot<()>>() <= 64);

/// Everything of a worker but its handler (so that a callback can hold both).
pub struct Inner<D> {
    index: usize,
    shared: Arc<Shared>,
    slots: Slab<Slot<D>>,
    next_generation: u32,
    wheel: TimerWheel,
    expired: Vec<Entry>,
    /// Connections with something to write (or to pause, resume or close), in the order
    /// they became due; [`Core::flush`] takes them from the front, at most
    /// [`EngineConfig::write_batch`](crate::engine::EngineConfig::write_batch) per turn (a
    /// write costs ~10 us of kernel time: unbounded, a 10,000-subscriber publish would hold
    /// every other connection of the worker for ~0.1 s).
    dirty: VecDeque<u32>,
    /// The slice of `dirty` one flush works on (kept to reuse its allocation).
    batch: Vec<u32>,
    /// Slots with [`Flags::PUBLISHED`] set in this turn.
    publishers: Vec<u32>,
    /// Connections not read for the reassembly budget, oldest first.
    budget_paused: Vec<ConnId>,
    limits: HandshakeLimits,
    draining: Option<Instant>,
    now: Instant,
    /// This worker's topics, their subscribers and the turn's pending run of frames (the
    /// pub/sub layer; it reaches the slab through `Subscribers`, see `core/pubsub.rs`).
    registry: Registry<ConnId>,
    /// The send queue's soft and hard limits (from the config, read once per room check
    /// of every subscriber of every publish).
    soft: usize,
    hard: usize,
}

/// Slots reserved up front per worker (64 B each: 4 MiB of address space at most).
const PRESIZE_SLOTS: usize = 64 * 1024;

/// How many slots a worker reserves up front (and a backend its per-slot arrays).
pub(crate) fn presize_slots(config: &crate::engine::EngineConfig) -> usize {
    config.max_connections.min(PRESIZE_SLOTS)
}

/// One worker's state: the handler and the rest.
pub struct Core<H: Handler> {
    handler: H,
    inner: Inner<H::Data>,
}

/// A connection as a handler sees it, inside a callback.
pub struct Conn<'a, D> {
    inner: &'a mut Inner<D>,
    id: ConnId,
}

/// Whether [`Conn::send`] refuses a frame: a close (that is [`Conn::close`]) or a
/// control frame over 125 bytes.
fn refused(opcode: OpCode, len: usize) -> bool {
    opcode == OpCode::Close || (opcode.is_control() && len > 125)
}

/// Borrows owned `(name, value)` headers as the `&str` pairs the encoders take.
fn header_refs(headers: &[(String, String)]) -> Vec<(&str, &str)> {
    headers
        .iter()
        .map(|(n, v)| (n.as_str(), v.as_str()))
        .collect()
}

/// A frame on its way into a connection's send queue.
enum Out<'a> {
    /// Encoded once and shared (a broadcast): small ones are copied, large ones referenced.
    Shared(&'a Bytes),
    /// Encoded, owned by this send.
    Owned(Bytes),
    /// Not encoded yet: encoded straight into the connection's queue when small.
    Message(OpCode, &'a [u8]),
    /// Not encoded yet, the payload owned: when large, queued as it is after its header.
    Payload(OpCode, Bytes),
}

impl Out<'_> {
    /// The encoded frame's length.
    fn len(&self) -> usize {
        match self {
            Out::Shared(f) => f.len(),
            Out::Owned(f) => f.len(),
            Out::Message(_, p) => crate::proto::frame::server_frame_len(p.len()),
            Out::Payload(_, p) => crate::proto::frame::server_frame_len(p.len()),
        }
    }

    fn into_bytes(self) -> Bytes {
        match self {
            Out::Shared(f) => f.clone(),
            Out::Owned(f) => f,
            Out::Message(opcode, payload) => encode_frame(opcode, payload),
            Out::Payload(opcode, payload) => encode_frame(opcode, &payload),
        }
    }
}

/// Puts `slot` (`id`) on the wheel at `at` unless it is already due earlier: each slot is
/// on the wheel at most once, at its earliest deadline. For a caller that holds the slot.
fn schedule_slot<D>(wheel: &mut TimerWheel, slot: &mut Slot<D>, id: ConnId, at: Instant) {
    let tick = wheel.tick_of(at);
    if tick < slot.tick {
        slot.tick = tick;
        wheel.schedule(id.slot, id.generation, tick);
    }
}

fn slot_of<D>(slots: &mut Slab<Slot<D>>, id: ConnId) -> Option<&mut Slot<D>> {
    slots
        .get_mut(id.slot as usize)
        .filter(|s| s.generation == id.generation)
}

impl<D> Inner<D> {
    fn stats(&self) -> &WorkerStats {
        &self.shared.stats[self.index]
    }

    fn schedule(&mut self, id: ConnId, at: Instant) {
        if let Some(s) = slot_of(&mut self.slots, id) {
            schedule_slot(&mut self.wheel, s, id, at);
        }
    }

    fn mark_dirty(&mut self, id: ConnId) {
        if let Some(s) = slot_of(&mut self.slots, id)
            && !s.flags.has(Flags::DIRTY)
        {
            s.flags.set(Flags::DIRTY, true);
            self.dirty.push_back(id.slot);
        }
    }

    fn count_close_sent(&self, code: u16) {
        self.stats().close_sent(code);
    }
}

impl<H: Handler> Core<H> {
    /// A core for worker `index`.
    pub fn new(index: usize, shared: Arc<Shared>, handler: H, now: Instant) -> Core<H> {
        let (soft, hard) = (shared.config.send_queue_soft, shared.config.send_queue_hard);
        let limits = HandshakeLimits {
            max_header_bytes: shared.config.max_header_bytes,
            ..HandshakeLimits::default()
        };
        // Reserved, not touched: pages are only used as slots fill. Growing by
        // reallocation instead would leave the old array's pages resident until the
        // allocator next returns memory, which an idle server may never do.
        let presize = presize_slots(&shared.config);
        Core {
            handler,
            inner: Inner {
                index,
                shared,
                slots: Slab::with_capacity(presize),
                next_generation: 0,
                wheel: TimerWheel::new(now),
                expired: Vec::new(),
                dirty: VecDeque::new(),
                batch: Vec::new(),
                publishers: Vec::new(),
                budget_paused: Vec::new(),
                limits,
                draining: None,
                now,
                registry: Registry::default(),
                soft,
                hard,
            },
        }
    }

    /// Connections this worker holds (any phase).
    pub fn len(&self) -> usize {
        self.inner.slots.len()
    }

    /// Whether the worker holds no connection.
    pub fn is_empty(&self) -> bool {
        self.inner.slots.is_empty()
    }

    /// Whether a graceful drain has started.
    pub fn draining(&self) -> bool {
        self.inner.draining.is_some()
    }

    /// Whether the worker may exit: drained and empty, or past the drain deadline.
    pub fn finished(&self, now: Instant) -> bool {
        match self.inner.draining {
            Some(deadline) => self.inner.slots.is_empty() || now >= deadline,
            None => false,
        }
    }

    /// The socket of a live connection (`None` once it is closing or gone).
    pub fn fd_of(&self, id: ConnId) -> Option<u32> {
        self.held(id)
            .filter(|s| !s.flags.has(Flags::CLOSING))
            .map(|s| s.fd)
    }

    /// The socket of a connection this worker still holds, closing or not (for a backend
    /// that closes it late).
    pub fn socket_of(&self, id: ConnId) -> Option<u32> {
        self.held(id).map(|s| s.fd)
    }

    /// The slot of `id` if this worker still holds it (same generation).
    fn held(&self, id: ConnId) -> Option<&Slot<H::Data>> {
        self.inner
            .slots
            .get(id.slot as usize)
            .filter(|s| s.generation == id.generation)
    }

    /// Whether the connection wants its bytes read now (not paused, not closing).
    pub fn wants_read(&self, id: ConnId) -> bool {
        self.inner.slots.get(id.slot as usize).is_some_and(|s| {
            s.generation == id.generation
                && !s.flags.has(Flags::CLOSING)
                && !s.flags.reading_paused()
        })
    }

    fn id_of(&self, slot: u32) -> Option<ConnId> {
        self.inner.slots.get(slot as usize).map(|s| ConnId {
            slot,
            generation: s.generation,
        })
    }

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
                let Some(hs) = slot.extra.as_mut().and_then(|e| e.handshake.as_mut()) else {
                    return;
                };
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
                            data.get(consumed..).map(<[u8]>::to_vec)
                        } else {
                            buf.get(consumed..).map(<[u8]>::to_vec)
                        };
                        self.on_request(id, request, rest.unwrap_or_default(), now);
                    }
                    Err(e) => self.respond_error(id, e),
                }
            }
            Phase::Open => {
                // A read may start an earlier deadline (a message's, or the close
                // deadline of a peer's close); the wheel keeps only the earliest.
                if slot.conn.handle_read(data, now)
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
    fn drain_events(&mut self, id: ConnId) {
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
                    slot.close_code = frame.as_ref().map_or(CloseCode::Status, |f| f.code);
                    let code = u16::from(slot.close_code);
                    if let Some(f) = frame.filter(|f| !f.reason.is_empty()) {
                        slot.extra().close_reason = Some(f.reason.into_boxed_str());
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
                    slot.close_code = e.close_code();
                    let code = u16::from(slot.close_code);
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

    /// Runs the commands other threads sent to this worker (publishes, closes).
    pub fn on_commands(&mut self, now: Instant) {
        self.inner.now = now;
        let batch = self.inner.shared.take_commands(self.inner.index);
        for cmd in batch {
            match cmd {
                Command::Publish(topic, frame) => {
                    self.inner.fanout_local(&topic, Frame::Encoded(&frame));
                }
                Command::Close(id, code, reason) => {
                    self.inner.close_conn(id, code, &reason);
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
    fn written(&mut self, id: ConnId, n: usize) {
        self.inner.shared.stats[self.inner.index]
            .bytes_out
            .bump(n as u64);
        let Some(slot) = slot_of(&mut self.inner.slots, id) else {
            return;
        };
        slot.conn.advance_transmit(n);
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
        let code = slot.close_code;
        let reason = slot.extra.as_mut().and_then(|e| e.close_reason.take());
        if counted {
            self.handler.on_close(
                &mut Conn {
                    inner: &mut self.inner,
                    id,
                },
                code,
                reason.as_deref().unwrap_or(""),
            );
        }
        let Some(slot) = slot_of(&mut self.inner.slots, id) else {
            return;
        };
        let topics = slot.extra.take().map(|e| e.topics).unwrap_or_default();
        self.inner.slots.remove(id.slot as usize);
        for topic in &topics {
            self.inner.remove_subscriber(topic, id);
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
        let mut expired = std::mem::take(&mut self.inner.expired);
        let tick = self.inner.wheel.current();
        self.inner.wheel.expire(now, &mut expired);
        if self.inner.wheel.current() != tick {
            // Once per wheel tick (this runs every loop turn): spare connection buffers a
            // burst left behind go back to the allocator gradually.
            crate::proto::connection::trim_spares();
        }
        for e in expired.drain(..) {
            let id = ConnId {
                slot: e.slot,
                generation: e.generation,
            };
            let Some(slot) = slot_of(&mut self.inner.slots, id) else {
                continue;
            };
            if slot.tick != e.tick {
                continue; // stale: rescheduled since
            }
            slot.tick = u64::MAX;
            let next = match slot.phase {
                Phase::Handshake => {
                    let deadline = slot
                        .extra
                        .as_ref()
                        .and_then(|e| e.handshake.as_ref())
                        .map_or(now, |hs| hs.deadline);
                    if deadline <= now {
                        // A slow-drip client: drop it without an answer.
                        slot.flags.set(Flags::DEAD, true);
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
        self.inner.expired = expired;
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

mod budget;
mod conn;
mod flush;
mod pubsub;
mod upgrade;

#[doc(hidden)]
pub mod fuzzing;

#[cfg(test)]
mod tests;
