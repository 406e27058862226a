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

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::{Bytes, BytesMut};
use indexmap::IndexSet;
use slab::Slab;

use super::wheel::{Entry, TimerWheel};
use super::{Bump, Command, Shared, WorkerStats};
use crate::api::{Decision, Handler, Message, Policy, PublishReport, SendStatus};
use crate::proto::close::CloseCode;
use crate::proto::frame::encode_frame_into;
use crate::proto::handshake::{self, HandshakeLimits, ParseStatus, Request};
use crate::proto::{Connection, Event, HandshakeError, OpCode, State, encode_frame};

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
    close_code: u16,
    flags: Flags,
    phase: Phase,
    /// The handler's per-connection data.
    data: Option<D>,
}

/// Whether a connection's send queue takes one more frame (see [`Slot::room`]).
enum Room {
    /// Not open for sending (closing, closed, failed).
    Closed,
    /// Past the hard limit: the policy decides.
    Full,
    /// Taken; `over_soft`: past the soft limit (backpressure).
    Fits { over_soft: bool },
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
    topics: HashMap<Arc<str>, IndexSet<ConnId>>,
    limits: HandshakeLimits,
    draining: Option<Instant>,
    now: Instant,
    /// Frames published to one topic in this loop turn and not yet handed to its
    /// subscribers (see [`Inner::fanout_local`]).
    pending: Pending,
}

/// A run of frames published to one topic, encoded back to back, handed to every
/// subscriber at once when the turn ends (or before anything else could be queued out of
/// order): each subscriber then gets one queue entry for the whole run, shared (a
/// reference count) when it is large, and the walk over the subscribers happens once per
/// run instead of once per message, which keeps each subscriber's state in cache.
#[derive(Default)]
struct Pending {
    topic: Option<Arc<str>>,
    /// The encoded frames; reused from turn to turn (reclaimed in place once the
    /// subscribers' copies have been written).
    batch: BytesMut,
}

/// Largest run of pending frames; a publish that would make it longer hands the run out
/// first.
const PENDING_MAX: usize = 256 * 1024;
/// Frames larger than this are never merged into a pending run.
const PENDING_FRAME_MAX: usize = 16 * 1024;

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
            && !s.flags.has(Flags::DIRTY)
        {
            s.flags.set(Flags::DIRTY, true);
            self.dirty.push_back(id.slot);
        }
    }

    fn count_close_sent(&self, code: u16) {
        self.stats().close_sent(code);
    }

    /// Queues a frame on one connection, applying the queue limits and the policy.
    fn queue_frame(&mut self, id: ConnId, frame: Out<'_>, topic: Option<&Arc<str>>) -> SendStatus {
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
    fn pause_full(&mut self, id: ConnId) {
        if let Some(slot) = slot_of(&mut self.slots, id)
            && !slot.flags.has(Flags::QUEUE_PAUSED)
        {
            slot.flags.set(Flags::QUEUE_PAUSED, true);
            self.shared.stats[self.index].queue_pauses.bump(1);
            self.mark_dirty(id);
        }
    }

    /// Moves conflated frames into the queue once it is back under the soft limit.
    fn release_conflated(&mut self, id: ConnId) {
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
    fn fanout_local(&mut self, topic: &Arc<str>, frame: Out<'_>) -> PublishReport {
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
    fn flush_pending(&mut self) {
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
    fn fanout_now(&mut self, topic: &Arc<str>, frame: &Bytes) -> PublishReport {
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

    fn subscribe(&mut self, id: ConnId, topic: &str) -> bool {
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

    fn unsubscribe(&mut self, id: ConnId, topic: &str) -> bool {
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

    fn remove_subscriber(&mut self, key: &Arc<str>, id: ConnId) {
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

    fn close_conn(&mut self, id: ConnId, code: CloseCode, reason: &str) {
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

impl<D> Conn<'_, D> {
    /// This connection's id on its worker.
    pub fn id(&self) -> ConnId {
        self.id
    }

    /// The worker this connection lives on.
    pub fn worker(&self) -> usize {
        self.inner.index
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

    /// Unsubscribes this connection from `topic`. Returns `false` if it was not subscribed.
    pub fn unsubscribe(&mut self, topic: &str) -> bool {
        self.inner.unsubscribe(self.id, topic)
    }

    /// The topics this connection is subscribed to.
    pub fn topics(&self) -> Vec<String> {
        self.inner
            .slots
            .get(self.id.slot as usize)
            .map(|s| s.topics().iter().map(|t| t.to_string()).collect())
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
    /// message is already in every subscriber's queue): its next messages then join the
    /// writes still to come, so each write carries more frames.
    pub fn publish(&mut self, topic: &str, opcode: OpCode, payload: &[u8]) -> PublishReport {
        if let Some(slot) = slot_of(&mut self.inner.slots, self.id)
            && !slot.flags.has(Flags::PUBLISHED)
        {
            slot.flags.set(Flags::PUBLISHED, true);
            self.inner.publishers.push(self.id.slot);
        }
        self.inner.publish(topic, opcode, payload)
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

    /// Bytes queued on this connection and not yet written.
    pub fn queued_bytes(&self) -> usize {
        self.inner
            .slots
            .get(self.id.slot as usize)
            .map_or(0, |s| s.conn.queued_bytes())
    }
}

impl<H: Handler> Core<H> {
    /// A core for worker `index`.
    pub fn new(index: usize, shared: Arc<Shared>, handler: H, now: Instant) -> Core<H> {
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
                topics: HashMap::new(),
                limits,
                draining: None,
                now,
                pending: Pending::default(),
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
        self.inner
            .slots
            .get(id.slot as usize)
            .filter(|s| s.generation == id.generation && !s.flags.has(Flags::CLOSING))
            .map(|s| s.fd)
    }

    /// The socket of a connection this worker still holds, closing or not (for a backend
    /// that closes it late).
    pub fn socket_of(&self, id: ConnId) -> Option<u32> {
        self.inner
            .slots
            .get(id.slot as usize)
            .filter(|s| s.generation == id.generation)
            .map(|s| s.fd)
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

    /// A new socket was accepted (`fd`: descriptor or direct-table index).
    pub fn on_accept(&mut self, fd: u32, now: Instant) -> ConnId {
        let inner = &mut self.inner;
        inner.now = now;
        inner.stats().accepted.bump(1);
        let generation = inner.next_generation;
        inner.next_generation = inner.next_generation.wrapping_add(1) & GENERATION_MASK;
        let deadline = now + inner.shared.config.handshake_timeout;
        let slot = inner.slots.insert(Slot {
            conn: Connection::new(inner.shared.proto.clone(), now),
            extra: Some(Box::new(Extra {
                handshake: Some(Handshake {
                    buf: Vec::new(),
                    deadline,
                }),
                ..Extra::default()
            })),
            tick: u64::MAX,
            generation,
            fd,
            close_code: 1006,
            flags: Flags::default(),
            phase: Phase::Handshake,
            data: None,
        }) as u32;
        let id = ConnId { slot, generation };
        inner.schedule(id, deadline);
        let sockets = inner.shared.sockets.fetch_add(1, Ordering::AcqRel) + 1;
        if inner.draining.is_some() {
            // Accepted just before the listener closed: refuse politely.
            self.respond_error(id, HandshakeError::Full);
        } else if sockets > inner.shared.socket_limit {
            // Handshakes count too: sockets that never upgrade must not fill the
            // descriptor table. Answered at once, without reading the request.
            inner.stats().refused_sockets.bump(1);
            self.respond_error(id, HandshakeError::Full);
        }
        id
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

    fn on_request(&mut self, id: ConnId, request: Request, mut rest: Vec<u8>, now: Instant) {
        if !request.wants_upgrade() {
            return self.respond_http(id, &request);
        }
        let upgrade = match request.validate_upgrade() {
            Ok(u) => u,
            Err(e) => return self.respond_error(id, e),
        };
        let origins = &self.inner.shared.config.allowed_origins;
        if !origins.is_empty()
            && !request
                .origin()
                .is_some_and(|o| origins.iter().any(|a| a == o))
        {
            return self.respond_error(id, HandshakeError::Forbidden);
        }
        if self.inner.draining.is_some() {
            return self.respond_error(id, HandshakeError::Full);
        }
        let accept = match self.handler.on_upgrade(&request, &upgrade) {
            Decision::Accept(a) => a,
            Decision::Reject(r) => {
                let mut out = Vec::new();
                let headers = header_refs(&r.headers);
                handshake::encode_response(
                    &mut out,
                    r.status,
                    "text/plain",
                    r.body.as_bytes(),
                    &headers,
                );
                self.inner.stats().rejected.bump(1);
                return self.finish_with(id, out);
            }
        };
        let protocol = match &accept.protocol {
            Some(p) => match upgrade.check_protocol(p) {
                Ok(p) => Some(p),
                Err(e) => return self.respond_error(id, e),
            },
            None => None,
        };
        // The cap counts upgraded connections over all workers.
        let shared = &self.inner.shared;
        let open = shared.open.fetch_add(1, Ordering::AcqRel);
        if open >= shared.config.max_connections {
            shared.open.fetch_sub(1, Ordering::AcqRel);
            shared.stats[self.inner.index].rejected_full.bump(1);
            return self.respond_error(id, HandshakeError::Full);
        }
        let mut out = Vec::with_capacity(160);
        let headers = header_refs(&accept.headers);
        handshake::encode_accept(&mut out, &upgrade.key, protocol, &headers);
        let proto = shared.proto.clone();
        shared.stats[self.inner.index].upgraded.bump(1);
        let Some(slot) = slot_of(&mut self.inner.slots, id) else {
            return;
        };
        slot.flags.set(Flags::COUNTED, true);
        slot.flags.set(Flags::JUST_UPGRADED, true);
        slot.phase = Phase::Open;
        slot.extra().handshake = None;
        slot.tidy();
        slot.data = Some(accept.data);
        // A fresh connection: its timers start now.
        slot.conn = Connection::new(proto, now);
        let _ = slot.conn.send_raw(Bytes::from(out));
        let deadline = slot.conn.poll_timeout();
        for topic in &accept.topics {
            self.inner.subscribe(id, topic);
        }
        self.handler.on_open(&mut Conn {
            inner: &mut self.inner,
            id,
        });
        if !rest.is_empty()
            && let Some(slot) = slot_of(&mut self.inner.slots, id)
        {
            slot.conn.handle_read(&mut rest, now);
            self.drain_events(id);
        }
        if let Some(at) = deadline {
            self.inner.schedule(id, at);
        }
        self.inner.mark_dirty(id);
    }

    fn respond_http(&mut self, id: ConnId, request: &Request) {
        let mut out = Vec::new();
        if request.method != "GET" && request.method != "HEAD" {
            handshake::encode_error(&mut out, HandshakeError::MethodNotAllowed, &[]);
        } else {
            match self.handler.on_http(request) {
                Some(r) => {
                    let headers = header_refs(&r.headers);
                    handshake::encode_response(
                        &mut out,
                        r.status,
                        &r.content_type,
                        &r.body,
                        &headers,
                    )
                }
                None => handshake::encode_error(&mut out, HandshakeError::NotFound, &[]),
            }
        }
        if request.method == "HEAD"
            && let Some(end) = out.windows(4).position(|w| w == b"\r\n\r\n")
        {
            // A HEAD answer is the GET answer's head alone (RFC 9110 §9.3.2); its
            // Content-Length still says how long the body would be.
            out.truncate(end + 4);
        }
        self.inner.stats().http_requests.bump(1);
        self.finish_with(id, out);
    }

    fn respond_error(&mut self, id: ConnId, e: HandshakeError) {
        let mut out = Vec::new();
        handshake::encode_error(&mut out, e, &[]);
        self.inner.stats().rejected.bump(1);
        tracing::debug!(
            slot = id.slot,
            status = e.status(),
            "handshake refused: {e}"
        );
        self.finish_with(id, out);
    }

    fn finish_with(&mut self, id: ConnId, response: Vec<u8>) {
        if let Some(slot) = slot_of(&mut self.inner.slots, id) {
            slot.phase = Phase::Finish;
            slot.extra().handshake = None;
            slot.tidy();
            let _ = slot.conn.send_raw(Bytes::from(response));
        }
        // The answer must be taken, and the peer's EOF come, within the close timeout.
        let at = self.inner.now + self.inner.shared.config.close_timeout;
        self.inner.schedule(id, at);
        self.inner.mark_dirty(id);
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
                    let code = frame.as_ref().map_or(1005, |f| u16::from(f.code));
                    slot.close_code = code;
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
                    let code = u16::from(e.close_code());
                    slot.close_code = code;
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
                    self.inner.fanout_local(&topic, Out::Shared(&frame));
                }
                Command::Close(id, code, reason) => {
                    self.inner.close_conn(id, CloseCode::from(code), &reason);
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

    /// After `id` read: a send queue past the hard limit (replies the handler queued, or
    /// pongs) stops reading until it drains below the soft limit, so a peer that sends
    /// without reading is held back by TCP flow control instead of growing our memory.
    fn check_queue(&mut self, id: ConnId) {
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

    /// After `id` read: when this worker's messages in reassembly hold more than the
    /// budget, stop reading `id` if it holds at least half its share (half the average
    /// over the holders) — unless every other holder is already stopped (one always reads on, so
    /// memory is eventually freed). The connections holding the most wait; a message
    /// much smaller than the average (a well-behaved peer's, beside peers that announce large
    /// messages and drip them) keeps being read and completes. Holders that never finish
    /// are closed by the message timeout (1008).
    fn check_budget(&mut self, id: ConnId) {
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
    fn rebalance_budget(&mut self) {
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
        let code = CloseCode::from(self.inner.shared.config.drain_close_code);
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

    /// Writes, pauses/resumes and closes what the last events made due, oldest first and
    /// at most `write_batch` connections (then the publishers of the turn). Call once per
    /// loop turn, after handling every completion: the turn's writes go out together; while
    /// [`Core::has_dirty`] the backend must come back without sleeping.
    pub fn flush(&mut self, driver: &mut dyn Driver) {
        self.inner.flush_pending();
        let take = self
            .inner
            .dirty
            .len()
            .min(self.inner.shared.config.write_batch.max(1));
        let mut batch = std::mem::take(&mut self.inner.batch);
        batch.extend(self.inner.dirty.drain(..take));
        let mut sends = 0u64;
        for &slot_index in &batch {
            match self.inner.slots.get(slot_index as usize) {
                // Written after everyone else, below.
                Some(s) if s.flags.has(Flags::PUBLISHED) => continue,
                // Already written (a publisher ahead of its place), or a stale entry of a
                // freed slot.
                Some(s) if !s.flags.has(Flags::DIRTY) => continue,
                None => continue,
                Some(_) => {}
            }
            sends += self.flush_one(driver, slot_index);
        }
        // Those that published in this turn go last (see `Conn::publish`).
        let mut publishers = std::mem::take(&mut self.inner.publishers);
        for &slot_index in &publishers {
            if let Some(slot) = self.inner.slots.get_mut(slot_index as usize) {
                slot.flags.set(Flags::PUBLISHED, false);
                if slot.flags.has(Flags::DIRTY) {
                    sends += self.flush_one(driver, slot_index);
                }
            }
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

    /// Writes, pauses/resumes or closes one dirty connection; returns the writes issued.
    fn flush_one(&mut self, driver: &mut dyn Driver, slot_index: u32) -> u64 {
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
        if pending && !slot.flags.has(Flags::DEAD) && matches!(slot.phase, Phase::Open) {
            // Bytes left over (a write in flight, or a full socket): they must make
            // progress within the send timeout. (The wheel is scheduled here, on the slot
            // already borrowed: `Inner::schedule` would look it up again, once per write.)
            slot.conn.note_unsent(now);
            if let Some(at) = slot.conn.poll_timeout() {
                let tick = self.inner.wheel.tick_of(at);
                if tick < slot.tick {
                    slot.tick = tick;
                    self.inner.wheel.schedule(id.slot, id.generation, tick);
                }
            }
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
    fn all_ids(&self) -> Vec<ConnId> {
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
        !self.inner.dirty.is_empty() || self.inner.pending.topic.is_some()
    }
}

#[doc(hidden)]
pub mod fuzzing;

#[cfg(test)]
mod tests {
    use super::*;
    use crate::engine::{EngineConfig, Handle};
    use crate::proto::frame::encode_client_frame;
    use crate::serve::BenchProtocol;

    /// Records the order of writes and accepts each in full.
    #[derive(Default)]
    struct Recorder {
        writes: Vec<(ConnId, Vec<u8>)>,
    }

    impl Driver for Recorder {
        fn send(
            &mut self,
            id: ConnId,
            _fd: u32,
            bufs: &mut dyn Iterator<Item = &[u8]>,
            _last: bool,
        ) -> SendOutcome {
            let bytes: Vec<u8> = bufs.flat_map(|b| b.iter().copied()).collect();
            let n = bytes.len();
            self.writes.push((id, bytes));
            SendOutcome::Wrote { n, all: true }
        }
        fn close(&mut self, _id: ConnId, _fd: u32) -> bool {
            true
        }
        fn shutdown_write(&mut self, _id: ConnId, _fd: u32) {}
        fn set_reading(&mut self, _id: ConnId, _fd: u32, _on: bool) {}
    }

    fn masked(payload: &[u8]) -> Vec<u8> {
        encode_client_frame(OpCode::Binary, payload, [9, 8, 7, 6])
    }

    /// A worker core running the bench protocol, detached from any backend.
    fn bench_core(config: EngineConfig, now: Instant) -> Core<BenchProtocol> {
        let shared = Shared::detached(config).expect("shared state");
        Core::new(
            0,
            shared.clone(),
            BenchProtocol::new(Handle::from_shared(shared)),
            now,
        )
    }

    /// Accepts socket `fd` and upgrades it on `/pubsub/t` (a subscriber of `t`).
    fn subscriber(core: &mut Core<BenchProtocol>, fd: u32, now: Instant) -> ConnId {
        let id = core.on_accept(fd, now);
        let mut req = b"GET /pubsub/t HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".to_vec();
        core.on_data(id, &mut req, now);
        id
    }

    #[test]
    fn the_bench_protocol_forgets_a_topic_name_with_its_last_connection() {
        let now = Instant::now();
        let mut core = bench_core(EngineConfig::default(), now);
        let mut driver = Recorder::default();
        let a = subscriber(&mut core, 1, now);
        let b = subscriber(&mut core, 2, now);
        core.flush(&mut driver);
        assert_eq!(core.handler.topic_names(), 1);
        core.on_eof(a);
        core.flush(&mut driver);
        assert_eq!(core.handler.topic_names(), 1, "b still holds it");
        core.on_eof(b);
        core.flush(&mut driver);
        assert!(core.is_empty());
        assert_eq!(core.handler.topic_names(), 0);
    }

    #[test]
    fn a_run_reaches_every_subscriber_in_one_write_and_the_publisher_last() {
        let now = Instant::now();
        let mut core = bench_core(EngineConfig::default(), now);
        let mut driver = Recorder::default();
        let ids: Vec<ConnId> = (0..5u32).map(|fd| subscriber(&mut core, fd, now)).collect();
        core.flush(&mut driver);
        driver.writes.clear();
        // The first subscriber publishes three messages in one read.
        let publisher = ids[0];
        let mut data: Vec<u8> = [b"one".as_slice(), b"two", b"three"]
            .iter()
            .flat_map(|p| masked(p))
            .collect();
        core.on_data(publisher, &mut data, now);
        core.flush(&mut driver);
        let expected: Vec<u8> = [b"one".as_slice(), b"two", b"three"]
            .iter()
            .flat_map(|p| encode_frame(OpCode::Binary, p).to_vec())
            .collect();
        let order: Vec<ConnId> = driver.writes.iter().map(|(id, _)| *id).collect();
        assert_eq!(order.len(), 5, "one write per subscriber: {order:?}");
        assert_eq!(order.last(), Some(&publisher), "{order:?}");
        for (id, bytes) in &driver.writes {
            assert_eq!(bytes, &expected, "what {id:?} got");
        }
    }

    #[test]
    fn a_fanout_wider_than_a_batch_is_written_over_several_turns_in_order() {
        const BATCH: usize = 16;
        let config = EngineConfig {
            write_batch: BATCH,
            ..EngineConfig::default()
        };
        let now = Instant::now();
        let mut core = bench_core(config, now);
        let mut driver = Recorder::default();
        let mut ids = Vec::new();
        let n = BATCH + BATCH / 2;
        for fd in 0..n as u32 {
            ids.push(subscriber(&mut core, fd, now));
            if core.inner.dirty.len() >= BATCH {
                core.flush(&mut driver);
            }
        }
        while core.has_dirty() {
            core.flush(&mut driver);
        }
        driver.writes.clear();
        // The last to subscribe publishes: its place in the queue is the end.
        let publisher = *ids.last().expect("connections");
        core.on_data(publisher, &mut masked(b"one"), now);
        core.flush(&mut driver);
        let first: Vec<ConnId> = driver.writes.iter().map(|(id, _)| *id).collect();
        // The publisher's own entry (its read made it due) may take a place in the batch.
        let written = first.len() - 1;
        assert!(
            (BATCH - 1..=BATCH).contains(&written),
            "one batch: {written}"
        );
        assert_eq!(first[..written], ids[..written], "queue order");
        assert_eq!(
            first.last(),
            Some(&publisher),
            "the publisher's copy ends its turn"
        );
        assert!(core.has_dirty(), "the rest waits for the next turn");
        // A second publish before the rest is written: those still waiting get both
        // messages in one write, ahead of those written already.
        core.on_data(publisher, &mut masked(b"two"), now);
        driver.writes.clear();
        let mut turns = 0;
        while core.has_dirty() {
            let before = driver.writes.len();
            core.flush(&mut driver);
            assert!(driver.writes.len() - before <= BATCH + 1);
            turns += 1;
            assert!(turns < 10, "the queue drains");
        }
        let one = encode_frame(OpCode::Binary, b"one").to_vec();
        let two = encode_frame(OpCode::Binary, b"two").to_vec();
        assert_eq!(driver.writes[0].0, ids[written], "the waiting come first");
        assert_eq!(driver.writes[0].1, [one.clone(), two.clone()].concat());
        let mut got: HashMap<ConnId, Vec<u8>> = HashMap::new();
        for (id, bytes) in first
            .iter()
            .map(|id| (*id, one.clone()))
            .chain(driver.writes)
        {
            got.entry(id).or_default().extend_from_slice(&bytes);
        }
        assert_eq!(got.len(), n);
        for id in &ids {
            assert_eq!(
                got[id],
                [one.clone(), two.clone()].concat(),
                "what {id:?} got"
            );
        }
    }
}
