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
//! `proto::BareConnection` (message, send, close) is scheduled on the wheel when a read or a
//! write starts it. [`fuzzing`] drives a core through a fake backend to check all of it.

use std::collections::VecDeque;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Instant;

use bytes::Bytes;
use slab::Slab;

use super::handler::{Accept, Decision, Deferred, Handler, Message, Reject};
use super::wheel::{Link, Links, TimerWheel};
use super::{Bump, Command, Shared, WorkerStats};
use crate::proto::close::CloseCode;
use crate::proto::handshake::{self, HandshakeLimits, ParseStatus, Request};
use crate::proto::{BareConnection, Event, HandshakeError, OpCode, State, encode_frame};
use crate::pubsub::{Frame, Policy, PublishReport, Registry, Room, SendStatus};
use slot::{Flags, Member, PendingUpgrade, Phase, Rare, Slot};

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

/// Everything of a worker but its handler (so that a callback can hold both).
pub struct Inner<D> {
    index: usize,
    shared: Arc<Shared>,
    slots: Slab<Slot<D>>,
    next_generation: u32,
    /// Its lists run through `slots` (each slot's [`Slot::timer`]).
    wheel: TimerWheel,
    expired: Vec<u32>,
    /// The connections `expired` named, with their generations (kept for the allocation).
    due: Vec<ConnId>,
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
    /// Members are slot indexes (4 bytes each, not an 8-byte `ConnId`): a slot leaves
    /// every list before it is freed (`Core::on_closed`), so an index never names a
    /// connection that took the slot later.
    registry: Registry<u32>,
    /// Subscribers that get a topic's publications in the history's envelope (with their
    /// offsets), beside `registry`'s plain ones.
    framed: Registry<u32>,
    /// Topics with history this worker has subscribers of: what was delivered, who waits
    /// to join (`core/history.rs`).
    streams: history::Streams,
    /// When worker 0 next sweeps the node's history.
    next_sweep: Instant,
    /// A handler on this worker published to a topic with history in this turn: its own
    /// inbox is taken before the turn's writes (see `Core::flush`).
    own_sequenced: bool,
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

/// The wheel's lists run through the slab: each slot holds its own link.
impl<D> Links for Slab<Slot<D>> {
    #[inline]
    fn link(&mut self, slot: u32) -> Option<&mut Link> {
        self.get_mut(slot as usize).map(|s| &mut s.timer)
    }
}

/// Puts `id` on the wheel at `at` unless it is already due earlier: each slot is on the
/// wheel at most once, at its earliest deadline.
fn schedule_slot<D>(wheel: &mut TimerWheel, slots: &mut Slab<Slot<D>>, id: ConnId, at: Instant) {
    if slot_of(slots, id).is_some() {
        let tick = wheel.tick_of(at);
        wheel.schedule(slots, id.slot, tick);
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
        schedule_slot(&mut self.wheel, &mut self.slots, id, at);
    }

    /// Whether `id` is an upgraded connection of this worker, not closing.
    fn is_open(&mut self, id: ConnId) -> bool {
        slot_of(&mut self.slots, id).is_some_and(|s| {
            s.phase == Phase::Open
                && s.conn.state() == State::Open
                && !s.flags.has(Flags::DEAD)
                && !s.flags.has(Flags::CLOSING)
        })
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
        let deflate = shared
            .config
            .deflate
            .map(|d| crate::proto::deflate::Params {
                threshold: d.threshold,
                level: d.level,
                window_bits: d.window_bits.clamp(9, 15),
                client_context_takeover: false,
            });
        let mut registry = Registry::default();
        registry.set_deflate(deflate);
        let mut framed = Registry::default();
        framed.set_deflate(deflate);
        Core {
            handler,
            inner: Inner {
                index,
                shared,
                slots: Slab::with_capacity(presize),
                next_generation: 0,
                wheel: TimerWheel::new(now),
                expired: Vec::new(),
                due: Vec::new(),
                dirty: VecDeque::new(),
                batch: Vec::new(),
                publishers: Vec::new(),
                budget_paused: Vec::new(),
                limits,
                draining: None,
                now,
                registry,
                framed,
                streams: history::Streams::default(),
                next_sweep: now,
                own_sequenced: false,
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
    /// The application this worker runs (for tests of a handler driven through a core).
    pub fn handler(&self) -> &H {
        &self.handler
    }

    /// Whether the worker holds no connection and no socket.
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

    /// Whether the connection is still reading its upgrade request (a backend may read
    /// those bytes into other buffers than an upgraded connection's).
    pub fn handshaking(&self, id: ConnId) -> bool {
        self.held(id)
            .is_some_and(|s| s.phase == slot::Phase::Handshake)
    }

    /// Whether the connection wants its bytes read now (not paused, not closing).
    pub fn wants_read(&self, id: ConnId) -> bool {
        self.inner.slots.get(id.slot as usize).is_some_and(|s| {
            s.generation == id.generation
                && !s.flags.has(Flags::CLOSING)
                && !s.flags.reading_paused()
        })
    }

    /// The connection in `slot`, if it is the one of `generation` (a completion's): `None`
    /// for a completion of a connection that has gone, whose slot may be taken again.
    pub fn current(&self, slot: u32, generation: u32) -> Option<ConnId> {
        self.id_of(slot).filter(|id| id.generation == generation)
    }

    /// The connection in `slot` now, if the slot is in use.
    pub fn id_of(&self, slot: u32) -> Option<ConnId> {
        self.inner.slots.get(slot as usize).map(|s| ConnId {
            slot,
            generation: s.generation,
        })
    }
}

mod budget;
mod conn;
mod events;
mod flush;
mod history;
mod pubsub;
mod slot;
mod upgrade;

#[doc(hidden)]
pub mod fuzzing;

#[cfg(test)]
mod tests;
