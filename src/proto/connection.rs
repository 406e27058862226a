//! The per-connection WebSocket state machine (after the upgrade), sans-IO.
//!
//! Modelled on `quinn-proto`: the driver (the io_uring engine, the epoll engine, a test)
//! owns the socket and the clock; the [`Connection`] owns the protocol.
//!
//! Driving order, after every read and every timer:
//! 1. [`Connection::handle_read`] with the bytes just read (mutable: payloads are unmasked
//!    in place) and the current time, or [`Connection::handle_timeout`] when the deadline of
//!    [`Connection::poll_timeout`] has passed;
//! 2. drain [`Connection::poll_event`] (messages, pings, pongs, the peer's close, errors);
//! 3. write what [`Connection::transmit`] holds, then report the bytes written with
//!    [`Connection::advance_transmit`] (short writes are fine);
//! 4. once [`Connection::is_closed`] and the transmit queue is empty, close the socket;
//! 5. re-arm the timer at [`Connection::poll_timeout`].
//!
//! States: `Open` -> `ClosingByUs` (we sent close, waiting for the reply) or straight to
//! `Closed` (the peer sent close and we replied, or the peer broke a rule and we sent our
//! close code, or a deadline passed). Once closing, nothing but a close reply is queued.
//!
//! Bounds a peer cannot push past: a frame or message that has begun must complete within
//! [`Config::message_timeout`] (else 1008); past [`Config::reply_queue_limit`] queued bytes
//! a ping's pong is owed, not queued, and only the latest ping's (§5.5.3); once closed
//! with bytes still queued, the close deadline keeps running (a peer that never reads
//! them is dropped, [`Event::TimedOut`]); queued bytes that make no progress for
//! [`Config::send_timeout`] after the driver's [`Connection::note_unsent`] drop the
//! connection ([`Event::SendTimedOut`]); reassembly buffers grow by half from the bytes
//! received, never ahead of them.
//!
//! The idle footprint is small on purpose: an idle [`Connection`] is 32 bytes (asserted in
//! the tests) and owns no heap; a [`BareConnection`], the same state without the pointer
//! to its [`Config`] (each call takes the config instead), is 24 bytes: the engine keeps
//! that one per slot, with a 1-byte tag naming which of its worker's configs applies. The frame decoder, the event and transmit queues and the
//! reassembly buffers live in a box that exists only while something is in progress (a
//! frame split across reads, an event not yet polled, a frame not yet written); it goes
//! back to a per-thread pool of spares as soon as all of that is empty, and
//! [`trim_spares`] returns the spares a window did not need to the allocator.
//!
//! One file (about 1,200 lines, its tests apart in `connection/tests.rs`) on purpose: it is
//! one state machine, and every transition (open, closing, closed, failed) reads a field
//! another one writes, so the rules stay side by side.

use std::cell::Cell;
use std::collections::VecDeque;
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};

use super::close::{CloseCode, CloseFrame, encode_close_payload, parse_close_payload};
use super::error::ProtocolError;
use super::frame::{
    FrameHeader, MAX_CONTROL_PAYLOAD, MAX_HEADER_LEN, OpCode, Parsed, encode_frame,
    encode_frame_into, server_frame_len,
};
use super::mask::unmask;
use super::utf8::Utf8Validator;

/// Default largest message (and frame): 16 MiB.
pub const DEFAULT_MAX_MESSAGE_SIZE: u64 = 16 * 1024 * 1024;

/// Protocol settings shared by every connection of an engine (behind an `Arc`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Config {
    /// Largest frame or reassembled message (close 1009 beyond).
    pub max_message_size: u64,
    /// Send a ping after this long without receiving anything; `None` disables pings.
    pub ping_interval: Option<Duration>,
    /// Drop the connection if nothing arrives this long after our ping.
    pub pong_timeout: Duration,
    /// After we send close, drop the connection if the reply takes longer than this.
    pub close_timeout: Duration,
    /// RSV bits a negotiated extension permits (bit 2 = RSV1). 0 without extensions.
    pub allowed_rsv: u8,
    /// A frame or message that has begun must be complete within this (close 1008
    /// beyond): a peer that announces a large message and drips it, or stops halfway,
    /// holds reassembly memory only this long. `None`: no limit.
    pub message_timeout: Option<Duration>,
    /// Bytes queued for the peer that make no progress for this long drop the
    /// connection (event [`Event::SendTimedOut`]): a peer that stopped reading. Counted
    /// from the driver's [`Connection::note_unsent`]. `None`: no limit.
    pub send_timeout: Option<Duration>,
    /// Past this many queued bytes a ping's pong is not queued at once: only the pong of
    /// the latest such ping is owed, and queued once the queue is back under the limit
    /// (RFC 6455 §5.5.3 allows answering only the most recent ping). A peer flooding
    /// pings without reading then costs one pong, not one per ping.
    pub reply_queue_limit: usize,
    /// permessage-deflate, when the connection negotiated it (RFC 7692): RSV1 marks a
    /// compressed message (`allowed_rsv` must then include RSV1); messages received
    /// compressed are inflated (bounded by `max_message_size`, counted by output), and
    /// messages sent with [`Connection::send`] / [`Connection::send_bytes`] at or above the
    /// threshold are compressed. `None`: no extension.
    pub deflate: Option<super::deflate::Params>,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            max_message_size: DEFAULT_MAX_MESSAGE_SIZE,
            ping_interval: Some(Duration::from_secs(25)),
            pong_timeout: Duration::from_secs(20),
            close_timeout: Duration::from_secs(5),
            allowed_rsv: 0,
            message_timeout: Some(DEFAULT_MESSAGE_TIMEOUT),
            send_timeout: Some(DEFAULT_SEND_TIMEOUT),
            reply_queue_limit: DEFAULT_REPLY_QUEUE_LIMIT,
            deflate: None,
        }
    }
}

/// Default of [`Config::message_timeout`]: a 16 MiB message at ~2.2 Mbit/s.
pub const DEFAULT_MESSAGE_TIMEOUT: Duration = Duration::from_secs(60);
/// Default of [`Config::send_timeout`].
pub const DEFAULT_SEND_TIMEOUT: Duration = Duration::from_secs(30);
/// Default of [`Config::reply_queue_limit`] (the engine's soft send-queue limit).
pub const DEFAULT_REPLY_QUEUE_LIMIT: usize = 256 * 1024;

/// What the connection reports to the application.
///
/// Payloads up to 1 KiB share a per-thread block with other small pieces (see
/// [`super::arena`]); an application that keeps many of them for a long time should copy
/// them with `Bytes::copy_from_slice` so that they do not keep their blocks alive.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    /// A complete text message (its UTF-8 already validated).
    Text(Bytes),
    /// A complete binary message.
    Binary(Bytes),
    /// A ping arrived (a pong with the same payload is already queued).
    Ping(Bytes),
    /// A pong arrived.
    Pong(Bytes),
    /// The peer's close frame (`None`: it carried no status code). The reply is queued
    /// (or it was the reply to ours); the connection is now closed.
    Close(Option<CloseFrame>),
    /// The peer broke a rule; our close frame with the matching code is queued and the
    /// connection is closed.
    ProtocolError(ProtocolError),
    /// A deadline passed (no pong, no close reply, or the closed connection's last bytes
    /// were not taken within the close timeout): drop the connection (code 1006).
    TimedOut,
    /// Queued bytes made no progress for [`Config::send_timeout`]: the peer stopped
    /// reading. Drop the connection (code 1006); the connection is closed.
    SendTimedOut,
}

/// The connection's state.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum State {
    /// Messages flow both ways.
    Open,
    /// We sent close and wait for the peer's reply.
    ClosingByUs,
    /// Done: flush the transmit queue, then close the socket.
    Closed,
}

/// Why [`Connection::send`] refused a frame.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum SendError {
    /// The connection is closing or closed: only a close reply may still be sent.
    #[error("connection is closing")]
    Closing,
    /// A control frame (ping, pong, close) may carry at most 125 bytes (§5.5).
    #[error("control frame payload over 125 bytes")]
    ControlTooLong,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Timer {
    None,
    /// Ping when it fires.
    Idle,
    /// Drop when it fires (our ping went unanswered).
    AwaitPong,
    /// Drop when it fires (our close went unanswered).
    Closing,
}

/// The frame decoder's state: everything the receive side keeps between reads when no
/// frame is split. Checked to stay small below.
#[derive(Clone, Copy, Debug)]
pub struct Decoder {
    /// Payload bytes left in the current frame.
    remaining: u64,
    /// Bytes of the current data message so far (for the size limit).
    message_len: u64,
    /// Masking key of the current frame.
    mask: [u8; 4],
    /// Bytes of a header cut at the end of the last read.
    header: [u8; MAX_HEADER_LEN],
    /// How many bytes of `header` are valid.
    header_len: u8,
    /// Position in the key of the next payload byte (mod 4).
    mask_offset: u8,
    /// Opcode of the current frame, if a payload is in progress.
    frame: Option<OpCode>,
    /// Whether the current frame is the last of its message.
    fin: bool,
    /// Opcode of the open data message (Text or Binary), if any.
    message: Option<OpCode>,
    /// The open data message is compressed (RSV1 on its first frame): its text is
    /// checked once inflated.
    compressed: bool,
    /// UTF-8 state of an open text message.
    utf8: Utf8Validator,
}

const _: () = assert!(std::mem::size_of::<Decoder>() <= 48);

impl Default for Decoder {
    fn default() -> Decoder {
        Decoder::new()
    }
}

impl Decoder {
    /// Between frames, with no message open: nothing to carry over.
    fn at_boundary(&self) -> bool {
        self.frame.is_none() && self.message.is_none() && self.header_len == 0
    }

    const fn new() -> Decoder {
        Decoder {
            remaining: 0,
            message_len: 0,
            mask: [0; 4],
            header: [0; MAX_HEADER_LEN],
            header_len: 0,
            mask_offset: 0,
            frame: None,
            fin: false,
            message: None,
            compressed: false,
            utf8: Utf8Validator::new(),
        }
    }
}

/// Buffers for what is split across frames or reads (boxed: most connections never need
/// them, and the box is dropped once both are empty).
#[derive(Debug, Default)]
struct Partial {
    /// A data message split over frames or reads.
    message: Vec<u8>,
    /// A control payload split over reads.
    control: Vec<u8>,
    /// The inflater of a compressed message that arrives in pieces (`message` then holds
    /// what came out so far), or of a connection whose client keeps its context.
    inflater: Option<Box<super::deflate::Inflater>>,
    /// `message.capacity()`, plus [`super::deflate::INFLATER_COST`] and the compressed
    /// bytes it keeps while `inflater` exists, as last added to this thread's reassembly
    /// total.
    counted: usize,
}

impl Partial {
    /// Brings this thread's reassembly total up to date with `message`'s capacity (and
    /// the inflater's cost).
    fn recount(&mut self) {
        let now = self.message.capacity()
            + self
                .inflater
                .as_ref()
                .map_or(0, |z| super::deflate::INFLATER_COST + z.held());
        if now != self.counted {
            reassembly_adjust(self.counted, now);
            self.counted = now;
        }
    }
}

impl Drop for Partial {
    fn drop(&mut self) {
        reassembly_adjust(self.counted, 0);
    }
}

thread_local! {
    /// Bytes held in reassembly buffers of this thread's connections, and how many
    /// connections hold some: what an engine worker checks its inbound budget against.
    static REASSEMBLY: Cell<(usize, usize)> = const { Cell::new((0, 0)) };
}

fn reassembly_adjust(before: usize, after: usize) {
    let _ = REASSEMBLY.try_with(|cell| {
        let (bytes, holders) = cell.get();
        let bytes = bytes.saturating_sub(before).saturating_add(after);
        let holders = match (before > 0, after > 0) {
            (false, true) => holders + 1,
            (true, false) => holders.saturating_sub(1),
            _ => holders,
        };
        cell.set((bytes, holders));
    });
}

/// Bytes held in message reassembly buffers by this thread's connections, and how many
/// connections hold some. A message that arrives whole in one read is never counted: only
/// messages split across frames or reads are reassembled.
pub fn reassembly_total() -> (usize, usize) {
    REASSEMBLY.try_with(Cell::get).unwrap_or((0, 0))
}

/// Everything a connection needs only while something is in progress: a frame or message
/// split across reads, events not yet polled, frames not yet written. Boxed and dropped as
/// soon as all of it is empty again, so that an idle connection is only its small
/// [`Connection`] struct.
#[derive(Debug, Default)]
struct Busy {
    decoder: Decoder,
    /// Reassembly buffers, only while a message or control frame is split.
    partial: Option<Box<Partial>>,
    events: VecDeque<Event>,
    /// Frames to write, in order; small frames queued after the last of them wait in
    /// `tail` until the next [`Connection::transmit`] seals it into one more entry.
    transmit: VecDeque<Bytes>,
    /// Small frames (up to [`COALESCE_MAX`] bytes each) copied back to back: a broadcast
    /// of 64 small messages to a subscriber is one contiguous write, not 64 iovecs, and
    /// queuing one is a short `memcpy` instead of an atomic reference count to take and
    /// drop. Its allocation is reused in place once the sealed part has been written.
    tail: BytesMut,
    /// Bytes of the first queued frame already written.
    transmit_offset: usize,
    /// Bytes queued and not yet written.
    queued_bytes: usize,
    /// The pong owed for the latest ping that arrived while the queue was past
    /// [`Config::reply_queue_limit`]; queued once the queue drains below it.
    owed_pong: Option<Bytes>,
    /// When the frame or message in progress must be complete ([`Config::message_timeout`]).
    message_deadline: Deadline,
    /// When queued bytes that made no progress drop the connection
    /// ([`Config::send_timeout`]); set by [`Connection::note_unsent`], cleared by progress.
    send_deadline: Deadline,
}

impl Busy {
    /// Queues an encoded frame: copied into `tail` when small, else kept as it is.
    fn queue(&mut self, frame: Bytes) {
        if frame.len() <= COALESCE_MAX {
            self.append(&frame);
        } else {
            self.push_large(frame);
        }
    }

    /// Queues a frame shared with others (a broadcast): copied when small, else one more
    /// reference to it.
    fn queue_shared(&mut self, frame: &Bytes) {
        if frame.len() <= COALESCE_MAX {
            self.append(frame);
        } else {
            self.push_large(frame.clone());
        }
    }

    /// Encodes a frame straight into `tail` when small.
    fn queue_encoded(&mut self, opcode: OpCode, payload: &[u8]) {
        let len = server_frame_len(payload.len());
        if len <= COALESCE_MAX {
            self.make_room(len);
            encode_frame_into(&mut self.tail, opcode, payload);
            self.queued_bytes += len;
        } else {
            self.push_large(encode_frame(opcode, payload));
        }
    }

    /// Queues a frame around a payload the caller owns: the header goes into `tail`, a
    /// large payload is queued as it is (a reference, no copy), a small one is encoded
    /// into `tail` like any small frame.
    fn queue_payload(&mut self, opcode: OpCode, payload: Bytes) {
        if server_frame_len(payload.len()) <= COALESCE_MAX {
            self.queue_encoded(opcode, &payload);
            return;
        }
        let mut h = [0u8; MAX_HEADER_LEN];
        let n = FrameHeader::whole(opcode, None, payload.len() as u64).encode(&mut h);
        self.append(h.get(..n).unwrap_or_default());
        self.push_large(payload);
    }

    fn append(&mut self, bytes: &[u8]) {
        self.make_room(bytes.len());
        self.tail.extend_from_slice(bytes);
        self.queued_bytes += bytes.len();
    }

    fn make_room(&mut self, n: usize) {
        if self.tail.capacity() - self.tail.len() < n {
            // Reclaims the block in place when every sealed piece of it has been written
            // (dropped), else allocates a new one (at least TAIL_BLOCK bytes).
            self.tail.reserve(n.max(TAIL_BLOCK));
        }
    }

    #[inline]
    fn push_large(&mut self, frame: Bytes) {
        self.seal();
        self.queued_bytes += frame.len();
        self.transmit.push_back(frame);
    }

    /// Moves what `tail` holds to the end of `transmit`. The sealed bytes are never
    /// written again (later appends go past them, or to a new block), so a write that is
    /// still in flight in the kernel may keep pointing at them.
    fn seal(&mut self) {
        if !self.tail.is_empty() {
            let sealed = self.tail.split().freeze();
            self.transmit.push_back(sealed);
        }
    }

    /// Nothing in progress: the box can go.
    fn is_idle(&self) -> bool {
        self.events.is_empty()
            && self.transmit.is_empty()
            && self.tail.is_empty()
            && self.partial.is_none()
            && self.decoder.at_boundary()
            && self.owed_pong.is_none()
    }
}

/// Smallest reassembly buffer allocation.
const RESERVE_MIN: usize = 4096;

/// Queue capacity a spare [`Busy`] may keep (more is freed with the box).
const SPARE_QUEUE_CAPACITY: usize = 64;
/// Frames up to this many bytes are copied into a connection's coalescing buffer; larger
/// ones are queued by reference (a broadcast's one encoded copy is shared).
pub const COALESCE_MAX: usize = 1024;
/// Smallest allocation of a coalescing buffer.
const TAIL_BLOCK: usize = 4096;
/// Coalescing-buffer capacity a spare [`Busy`] may keep.
const SPARE_TAIL_CAPACITY: usize = 64 * 1024;

/// Spares kept per thread no matter how long they sit unused.
const SPARE_FLOOR: usize = 64;
/// [`trim_spares`] calls per trimming window.
const SPARE_WINDOW: u32 = 64;

/// This thread's idle [`Busy`] boxes and their low-water mark in the current window.
#[derive(Default)]
struct Spares {
    // Boxed on purpose: the boxes themselves are what moves between connections and here.
    #[allow(clippy::vec_box)]
    boxes: Vec<Box<Busy>>,
    /// The fewest boxes held at any moment of this window: that many went unused all along.
    low: usize,
    /// [`trim_spares`] calls in this window.
    ticks: u32,
}

thread_local! {
    /// Idle [`Busy`] boxes of this thread (one engine worker per thread), for reuse: a
    /// subscriber goes busy (a frame queued) and idle (written) on every broadcast, and a
    /// `malloc` + `free` of the box and its queues each time would cost more than the
    /// delivery itself. Bounded by the peak number of connections busy at once; boxes that
    /// a whole window did not need are freed by [`trim_spares`]. A `Cell` (take/set), not a
    /// `RefCell`: nothing that could panic.
    static SPARE: Cell<Spares> = Cell::new(Spares::default());
}

fn with_spares<R>(f: impl FnOnce(&mut Spares) -> R) -> Option<R> {
    SPARE
        .try_with(|cell| {
            let mut spares = cell.take();
            let r = f(&mut spares);
            cell.set(spares);
            r
        })
        .ok()
}

fn take_spare() -> Box<Busy> {
    with_spares(|s| {
        let b = s.boxes.pop();
        s.low = s.low.min(s.boxes.len());
        b
    })
    .flatten()
    .unwrap_or_default()
}

fn give_spare(mut b: Box<Busy>) {
    if b.transmit.capacity() > SPARE_QUEUE_CAPACITY || b.events.capacity() > SPARE_QUEUE_CAPACITY {
        return; // a burst's big queues: free them
    }
    if b.tail.capacity() > SPARE_TAIL_CAPACITY {
        b.tail = BytesMut::new();
    }
    b.decoder = Decoder::new();
    b.transmit_offset = 0;
    b.queued_bytes = 0;
    b.owed_pong = None;
    b.message_deadline = Deadline::NONE;
    b.send_deadline = Deadline::NONE;
    with_spares(|s| s.boxes.push(b));
}

/// Call periodically (an engine does on every timer-wheel tick, 20 ms): every 64 calls,
/// the spare connection buffers that went unused for the whole window (beyond a floor of
/// 64) go back to the allocator. Steady traffic, even in bursts a second apart, keeps
/// reusing them; the spares of a one-off burst are gone within about three seconds.
pub fn trim_spares() {
    with_spares(|s| {
        s.ticks += 1;
        if s.ticks < SPARE_WINDOW {
            return;
        }
        let unused = s.low.min(s.boxes.len().saturating_sub(SPARE_FLOOR));
        s.boxes.truncate(s.boxes.len() - unused);
        if s.boxes.capacity() > 4 * s.boxes.len().max(SPARE_FLOOR) {
            s.boxes.shrink_to_fit();
        }
        s.ticks = 0;
        s.low = s.boxes.len();
    });
}

/// How many spare connection buffers this thread holds (for tests and metrics).
pub fn spare_count() -> usize {
    with_spares(|s| s.boxes.len()).unwrap_or(0)
}

/// A deadline in 8 bytes instead of an `Option<Instant>`'s 16 (this struct sits in every
/// connection's slot): nanoseconds after a process-wide epoch, 0 for none.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
struct Deadline(u64);

impl Deadline {
    const NONE: Deadline = Deadline(0);

    /// An hour before the first use, so that an instant a caller took just before it still
    /// converts exactly (the monotonic clock may be younger than that right after boot;
    /// then earlier instants round up to the epoch, i.e. fire a moment late, never early).
    fn epoch() -> Instant {
        static EPOCH: OnceLock<Instant> = OnceLock::new();
        *EPOCH.get_or_init(|| {
            let now = Instant::now();
            now.checked_sub(Duration::from_secs(3600)).unwrap_or(now)
        })
    }

    fn at(at: Instant) -> Deadline {
        let nanos = at.saturating_duration_since(Self::epoch()).as_nanos();
        Deadline(u64::try_from(nanos).unwrap_or(u64::MAX).max(1))
    }

    fn get(self) -> Option<Instant> {
        (self.0 != 0).then(|| Self::epoch() + Duration::from_nanos(self.0))
    }
}

/// A [`Connection`] without its configuration: every call that needs a setting takes
/// the [`Config`] the connection was made with. For a driver that holds one configuration
/// for many connections: the engine keeps 24 bytes per idle connection here instead of
/// the 32 of a [`Connection`], and its [`BareConnection::tag`] says which configuration
/// to pass. Passing another one than the connection was made with is not unsafe, but its
/// limits and its extension then apply from that call on.
///
/// Idle, it owns no heap: the decoder, the event and transmit queues and the reassembly
/// buffers live in a box that exists only while one of them is in use.
#[derive(Debug)]
pub struct BareConnection {
    deadline: Deadline,
    busy: Option<Box<Busy>>,
    state: State,
    /// The peer's close or a protocol error was read: ignore further input. The state
    /// changes (and the close frame is queued) when the driver polls that event, so that
    /// replies to the messages before it still go out first.
    input_done: bool,
    /// The peer's close frame was read (not a protocol error, not a timeout): a peer that
    /// follows §5.5.1 sends nothing after it.
    peer_closed: bool,
    timer: Timer,
    /// See [`Connection::close_code`], as its number (2 bytes: a `CloseCode` takes 4).
    code: u16,
    /// The driver's byte: see [`BareConnection::tag`].
    tag: u8,
}

impl BareConnection {
    /// A connection that has just been upgraded at `now`.
    pub fn new(config: &Config, now: Instant, tag: u8) -> BareConnection {
        let (timer, deadline) = match config.ping_interval {
            Some(d) => (Timer::Idle, Deadline::at(now + d)),
            None => (Timer::None, Deadline::NONE),
        };
        BareConnection {
            deadline,
            busy: None,
            state: State::Open,
            input_done: false,
            peer_closed: false,
            timer,
            code: 1006,
            tag,
        }
    }

    /// The byte the driver gave [`BareConnection::new`]; the connection never reads it.
    /// The engine keeps in it which of its worker's configurations the connection was
    /// made with (in what would be padding), and hands that one to every call.
    pub fn tag(&self) -> u8 {
        self.tag
    }

    /// The in-progress state, created on first use.
    fn busy(&mut self) -> &mut Busy {
        self.busy.get_or_insert_with(take_spare)
    }

    /// Gives the in-progress state back (to this thread's spares) once nothing is in
    /// progress.
    fn settle(&mut self) {
        if self.busy.as_ref().is_some_and(|b| b.is_idle())
            && let Some(b) = self.busy.take()
        {
            give_spare(b);
        }
    }

    /// The current state.
    pub fn state(&self) -> State {
        self.state
    }

    /// Whether the connection is done: nothing more will be read; close the socket once
    /// the transmit queue is empty.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Whether the connection closed by the close handshake: the peer's close frame was
    /// read, so no more input should follow. Only then may the last bytes be held back to
    /// leave with the FIN: closing a socket that still has unread input resets it, and a
    /// reset discards whatever was held back (a peer still sending after the frame that
    /// failed its connection would lose our close frame and the replies before it).
    pub fn closed_by_handshake(&self) -> bool {
        self.state == State::Closed && self.peer_closed
    }

    /// Processes bytes read from the peer. Payloads are unmasked in place in `data`; a
    /// frame cut at the end of `data` is carried over to the next call (headers inline,
    /// payloads in a buffer that is freed when the frame completes). Bytes read after the
    /// connection closed are ignored.
    ///
    /// Returns `true` when the read started a deadline that may come before the one
    /// [`Connection::poll_timeout`] gave before it (a message's, or the close deadline
    /// after the peer's close or an error): a driver that keeps one timer per connection
    /// re-arms it then (the ping deadline only ever moves later on a read).
    pub fn handle_read(&mut self, cfg: &Config, data: &mut [u8], now: Instant) -> bool {
        if self.state == State::Closed || self.input_done {
            return false;
        }
        if let (Timer::Idle | Timer::AwaitPong, Some(d)) = (self.timer, cfg.ping_interval) {
            self.timer = Timer::Idle;
            self.deadline = Deadline::at(now + d);
        }
        let mut b = self.busy.take().unwrap_or_else(take_spare);
        if let Err(e) = self.read_frames(cfg, &mut b, data) {
            self.fail(&mut b, e);
        }
        let mut started = false;
        if b.decoder.at_boundary() || self.input_done {
            b.message_deadline = Deadline::NONE;
        } else if b.message_deadline == Deadline::NONE
            && let Some(t) = cfg.message_timeout
        {
            // The clock of a frame or message starts with its first bytes.
            b.message_deadline = Deadline::at(now + t);
            started = true;
        }
        if self.input_done && self.timer != Timer::Closing {
            // The peer's close or a protocol error: what is still queued (our reply, and
            // the answers before it) must be taken within the close timeout, or the
            // connection is dropped; a peer that stopped reading cannot hold it open.
            self.timer = Timer::Closing;
            self.deadline = Deadline::at(now + cfg.close_timeout);
            started = true;
        }
        self.busy = Some(b);
        self.settle();
        started
    }

    fn read_frames(
        &mut self,
        cfg: &Config,
        b: &mut Busy,
        mut data: &mut [u8],
    ) -> Result<(), ProtocolError> {
        loop {
            if self.input_done {
                return Ok(());
            }
            if b.decoder.frame.is_none() {
                let Some((header, used)) = self.next_header(cfg, b, data)? else {
                    return Ok(());
                };
                data = data.get_mut(used..).unwrap_or_default();
                self.begin_frame(cfg, b, &header)?;
                if b.decoder.remaining == 0 {
                    self.payload(cfg, b, &mut [], true)?;
                    continue;
                }
            }
            if data.is_empty() {
                return Ok(());
            }
            let n = usize::try_from(b.decoder.remaining).map_or(data.len(), |r| r.min(data.len()));
            let (chunk, rest) = data.split_at_mut(n);
            unmask(chunk, b.decoder.mask, usize::from(b.decoder.mask_offset));
            b.decoder.mask_offset = ((usize::from(b.decoder.mask_offset) + n) & 3) as u8;
            b.decoder.remaining -= n as u64;
            let done = b.decoder.remaining == 0;
            self.payload(cfg, b, chunk, done)?;
            data = rest;
        }
    }

    /// Parses the next header from the carried bytes and/or `data`. Returns the header and
    /// how many bytes of `data` it used, or `None` (bytes carried) if it is incomplete.
    fn next_header(
        &self,
        cfg: &Config,
        b: &mut Busy,
        data: &[u8],
    ) -> Result<Option<(FrameHeader, usize)>, ProtocolError> {
        let d = &mut b.decoder;
        if d.header_len == 0 {
            match FrameHeader::parse(data, cfg.allowed_rsv)? {
                Parsed::Complete { header, header_len } => return Ok(Some((header, header_len))),
                Parsed::Incomplete { .. } => {
                    // At most 13 bytes: a header is never longer than 14.
                    if let Some(dst) = d.header.get_mut(..data.len()) {
                        dst.copy_from_slice(data);
                        d.header_len = data.len() as u8;
                    }
                    return Ok(None);
                }
            }
        }
        let have = usize::from(d.header_len);
        let take = (MAX_HEADER_LEN - have).min(data.len());
        if let (Some(dst), Some(src)) = (d.header.get_mut(have..have + take), data.get(..take)) {
            dst.copy_from_slice(src);
        }
        let buf = d.header.get(..have + take).unwrap_or_default();
        match FrameHeader::parse(buf, cfg.allowed_rsv)? {
            Parsed::Complete { header, header_len } => {
                d.header_len = 0;
                Ok(Some((header, header_len - have)))
            }
            Parsed::Incomplete { .. } => {
                d.header_len = (have + take) as u8;
                Ok(None)
            }
        }
    }

    fn begin_frame(
        &self,
        cfg: &Config,
        b: &mut Busy,
        h: &FrameHeader,
    ) -> Result<(), ProtocolError> {
        let mask = h.mask.ok_or(ProtocolError::UnmaskedFrame)?;
        let max = cfg.max_message_size;
        let d = &mut b.decoder;
        match h.opcode {
            OpCode::Continuation => {
                if d.message.is_none() {
                    return Err(ProtocolError::UnexpectedContinuation);
                }
                if h.rsv1 {
                    // RFC 7692 §6.1: RSV1 only on a message's first frame.
                    return Err(ProtocolError::ReservedBits(0b100));
                }
            }
            OpCode::Text | OpCode::Binary => {
                if d.message.is_some() {
                    return Err(ProtocolError::ExpectedContinuation);
                }
                d.message = Some(h.opcode);
                d.message_len = 0;
                d.compressed = h.rsv1;
            }
            OpCode::Close | OpCode::Ping | OpCode::Pong => {
                if h.rsv1 {
                    // A control frame is never compressed (RFC 7692 §6.1).
                    return Err(ProtocolError::ReservedBits(0b100));
                }
            }
        }
        if !h.opcode.is_control() {
            let total = d.message_len.saturating_add(h.payload_len);
            if h.payload_len > max || total > max {
                return Err(ProtocolError::MessageTooBig(total));
            }
        }
        d.frame = Some(h.opcode);
        d.fin = h.fin;
        d.mask = mask;
        d.mask_offset = 0;
        d.remaining = h.payload_len;
        Ok(())
    }

    /// Handles an unmasked piece of the current frame's payload; `done` on its last piece.
    fn payload(
        &mut self,
        cfg: &Config,
        b: &mut Busy,
        chunk: &mut [u8],
        done: bool,
    ) -> Result<(), ProtocolError> {
        let Some(op) = b.decoder.frame else {
            return Ok(());
        };
        if done {
            b.decoder.frame = None;
        }
        if op.is_control() {
            if done && b.partial.as_ref().is_none_or(|p| p.control.is_empty()) {
                return self.control_frame(cfg, b, op, chunk);
            }
            let p = b.partial.get_or_insert_with(Box::default);
            if p.control.len() + chunk.len() > MAX_CONTROL_PAYLOAD {
                return Err(ProtocolError::ControlFrameTooLong);
            }
            p.control.extend_from_slice(chunk);
            if done {
                let payload = std::mem::take(&mut p.control);
                if p.message.is_empty() && p.inflater.is_none() {
                    b.partial = None;
                }
                return self.control_frame(cfg, b, op, &payload);
            }
            return Ok(());
        }
        let d = &mut b.decoder;
        let text = d.message == Some(OpCode::Text);
        let compressed = d.compressed;
        if text && !compressed {
            d.utf8.feed(chunk)?;
        }
        d.message_len += chunk.len() as u64;
        let last = done && d.fin;
        if last {
            d.message = None;
            d.compressed = false;
            if text && !compressed {
                d.utf8.finish()?;
            }
        }
        if self.state != State::Open {
            // After our close, data is still parsed (to find the reply) but not delivered.
            if let Some(p) = &mut b.partial {
                p.message = Vec::new();
                p.recount();
            }
            return Ok(());
        }
        if compressed {
            return self.compressed_payload(cfg, b, chunk, last, text);
        }
        let payload = if last && b.partial.as_ref().is_none_or(|p| p.message.is_empty()) {
            // The whole message is in this read: one copy, straight out of the read buffer.
            super::arena::copy(&[chunk])
        } else {
            let p = b.partial.get_or_insert_with(Box::default);
            if p.message.capacity() - p.message.len() < chunk.len() {
                // Grow by half from what actually arrived (never ahead of it: a header that
                // announces 16 MiB reserves nothing for bytes not yet sent, so the worker's
                // budget counts memory peers really made us hold, at most 1.5x what they
                // sent; copies stay linear in the message), and no further than the end
                // of the last frame.
                let len = p.message.len();
                let need = len + chunk.len();
                let grown = p.message.capacity() + p.message.capacity() / 2;
                let mut target = need.max(grown).max(RESERVE_MIN);
                if b.decoder.fin {
                    let rest = usize::try_from(b.decoder.remaining).unwrap_or(usize::MAX);
                    target = target.min(need.saturating_add(rest));
                }
                p.message.reserve_exact(target - len);
            }
            p.message.extend_from_slice(chunk);
            p.recount();
            if !last {
                return Ok(());
            }
            Bytes::from(take_message(b))
        };
        b.events.push_back(if text {
            Event::Text(payload)
        } else {
            Event::Binary(payload)
        });
        Ok(())
    }

    /// A piece of a compressed message's payload (RFC 7692): inflated at once, within the
    /// size limit (1009 beyond, counted by what comes out: a decompression bomb stops as
    /// soon as it passes the limit), into the message being reassembled.
    ///
    /// A message whole in this read, from a client that resets its context, is inflated
    /// straight out of the read buffer by the thread's one-shot codec. Otherwise the
    /// connection's own [`super::deflate::Inflater`] takes each piece as it comes: it
    /// lives while the message is open, or for the connection's life when the client
    /// keeps its context (client context takeover), and its cost is counted in the
    /// reassembly budget meanwhile.
    fn compressed_payload(
        &mut self,
        cfg: &Config,
        b: &mut Busy,
        chunk: &[u8],
        last: bool,
        text: bool,
    ) -> Result<(), ProtocolError> {
        let limit = usize::try_from(cfg.max_message_size).unwrap_or(usize::MAX);
        let too_big = || ProtocolError::MessageTooBig(cfg.max_message_size.saturating_add(1));
        let map = |e| match e {
            super::deflate::InflateError::TooBig(_) => too_big(),
            super::deflate::InflateError::Corrupt => ProtocolError::BadDeflate,
        };
        let keep = cfg.deflate.is_some_and(|d| d.client_context_takeover);
        if last && !keep && b.partial.as_ref().is_none_or(|p| p.inflater.is_none()) {
            let plain = super::deflate::inflate(chunk, limit).map_err(map)?;
            b.events.push_back(message_event(text, plain)?);
            return Ok(());
        }
        let p = b.partial.get_or_insert_with(Box::default);
        let z = p.inflater.get_or_insert_with(Box::default);
        let mut result = z.feed(chunk, &mut p.message, limit);
        if last && result.is_ok() {
            result = z.finish(&mut p.message, limit, keep);
        }
        if !keep && (last || result.is_err()) {
            p.inflater = None;
        }
        p.recount();
        result.map_err(map)?;
        if !last {
            return Ok(());
        }
        let message = take_message(b);
        b.events
            .push_back(message_event(text, Bytes::from(message))?);
        Ok(())
    }

    fn control_frame(
        &mut self,
        cfg: &Config,
        b: &mut Busy,
        op: OpCode,
        payload: &[u8],
    ) -> Result<(), ProtocolError> {
        match op {
            OpCode::Ping => {
                if self.state == State::Open {
                    if b.queued_bytes > cfg.reply_queue_limit {
                        // Congested: owe only the latest ping's pong (§5.5.3).
                        b.owed_pong = Some(Bytes::copy_from_slice(payload));
                    } else {
                        b.queue_encoded(OpCode::Pong, payload);
                    }
                }
                b.events
                    .push_back(Event::Ping(super::arena::copy(&[payload])));
            }
            OpCode::Pong => b
                .events
                .push_back(Event::Pong(super::arena::copy(&[payload]))),
            OpCode::Close => {
                let frame = parse_close_payload(payload)?;
                self.input_done = true;
                self.peer_closed = true;
                b.events.push_back(Event::Close(frame));
            }
            OpCode::Continuation | OpCode::Text | OpCode::Binary => {}
        }
        Ok(())
    }

    /// Fails the connection (§7.1.7): reads nothing more; when the driver polls the
    /// error, our close frame with its code is queued and the connection is closed.
    fn fail(&mut self, b: &mut Busy, e: ProtocolError) {
        self.input_done = true;
        b.partial = None;
        b.events.push_back(Event::ProtocolError(e));
    }

    /// The next event, if any. Drain after every `handle_*` call. Polling the peer's close
    /// or a protocol error queues our close reply (after whatever the application sent in
    /// answer to the messages before it) and closes the connection.
    pub fn poll_event(&mut self) -> Option<Event> {
        let Some(event) = self.busy.as_mut().and_then(|b| b.events.pop_front()) else {
            self.settle();
            return None;
        };
        match &event {
            Event::Close(frame) => {
                self.code = u16::from(frame.as_ref().map_or(CloseCode::Status, |f| f.code));
                if self.state == State::Open {
                    // Echo the peer's code (§5.5.1); an empty close gets an empty reply.
                    let reply = match frame {
                        Some(f) => close_frame(f.code, ""),
                        None => encode_frame(OpCode::Close, &[]),
                    };
                    self.queue(reply);
                }
                self.closed();
            }
            Event::ProtocolError(e) => {
                self.code = u16::from(e.close_code());
                if self.state == State::Open {
                    self.queue(close_frame(e.close_code(), ""));
                }
                self.closed();
            }
            _ => {}
        }
        Some(event)
    }

    /// Closed: nothing more is read or queued. A close deadline already running (ours,
    /// or the one [`Connection::handle_read`] starts when the peer's close or an error
    /// arrives) keeps running, so that bytes the peer never takes cannot keep the
    /// connection; every other timer stops.
    fn closed(&mut self) {
        self.state = State::Closed;
        if self.timer != Timer::Closing {
            self.timer = Timer::None;
            self.deadline = Deadline::NONE;
        }
        if let Some(b) = self.busy.as_mut() {
            b.owed_pong = None;
            b.message_deadline = Deadline::NONE;
        }
    }

    /// The code this connection's close is reported with: the code of the peer's close
    /// frame once it is polled (1005 when the frame had none; RFC 6455 §7.1.5), else the
    /// code of the close this side sent (by [`Connection::close`], or for the protocol
    /// error that failed the connection), else 1006: closed without a close frame so far
    /// (a timeout, a dropped socket). The last of these to happen wins.
    pub fn close_code(&self) -> CloseCode {
        CloseCode::from(self.code)
    }

    /// Starts the closing handshake with `code` and `reason` (cut to fit 123 bytes). Does
    /// nothing unless the connection is open. 1005, 1006 and 1015 are sent as an empty close.
    pub fn close(&mut self, cfg: &Config, code: CloseCode, reason: &str, now: Instant) {
        if self.state != State::Open {
            return;
        }
        self.queue(close_frame(code, reason));
        self.code = u16::from(code);
        self.state = State::ClosingByUs;
        self.timer = Timer::Closing;
        self.deadline = Deadline::at(now + cfg.close_timeout);
    }

    /// Queues a message as one unmasked frame.
    ///
    /// # Errors
    /// [`SendError::Closing`] once the connection is closing;
    /// [`SendError::ControlTooLong`] for a control frame over 125 bytes.
    pub fn send(&mut self, cfg: &Config, opcode: OpCode, payload: &[u8]) -> Result<(), SendError> {
        if let Some(z) = compressible(cfg, opcode, payload.len()) {
            let frame = compressed_frame(opcode, payload, &z);
            self.open_queue()?.queue(frame);
            return Ok(());
        }
        self.message_queue(opcode, payload.len())?
            .queue_encoded(opcode, payload);
        Ok(())
    }

    /// Like [`Connection::send`] for a payload the caller owns: a large one is written
    /// from where it is, after a header of its own (echoing or forwarding a received
    /// message copies nothing), a small one is copied like any small frame.
    ///
    /// # Errors
    /// As [`Connection::send`].
    pub fn send_bytes(
        &mut self,
        cfg: &Config,
        opcode: OpCode,
        payload: Bytes,
    ) -> Result<(), SendError> {
        if let Some(z) = compressible(cfg, opcode, payload.len()) {
            let frame = compressed_frame(opcode, &payload, &z);
            self.open_queue()?.queue(frame);
            return Ok(());
        }
        self.message_queue(opcode, payload.len())?
            .queue_payload(opcode, payload);
        Ok(())
    }

    /// Queues an already encoded frame. Frames up to [`COALESCE_MAX`] bytes are copied
    /// into the connection's coalescing buffer (so that many small frames go out as one
    /// contiguous write); larger ones are queued as they are.
    ///
    /// # Errors
    /// [`SendError::Closing`] once the connection is closing.
    pub fn send_frame(&mut self, frame: Bytes) -> Result<(), SendError> {
        self.open_queue()?.queue(frame);
        Ok(())
    }

    /// Queues bytes as they are, never copied into the coalescing buffer: for one-off
    /// writes such as an HTTP response, so that a connection that then goes idle never
    /// made its coalescing buffer allocate.
    ///
    /// # Errors
    /// [`SendError::Closing`] once the connection is closing.
    pub fn send_raw(&mut self, bytes: Bytes) -> Result<(), SendError> {
        self.open_queue()?.push_large(bytes);
        Ok(())
    }

    /// Like [`Connection::send_frame`] for a frame shared by many connections (one
    /// broadcast frame for every subscriber): a small one is copied, a large one gains a
    /// reference (no copy of the payload).
    ///
    /// # Errors
    /// [`SendError::Closing`] once the connection is closing.
    pub fn send_shared(&mut self, frame: &Bytes) -> Result<(), SendError> {
        self.open_queue()?.queue_shared(frame);
        Ok(())
    }

    /// The send queue for a frame of `opcode` with `len` payload bytes: refused for a
    /// control frame over 125 bytes, or once the connection is closing.
    fn message_queue(&mut self, opcode: OpCode, len: usize) -> Result<&mut Busy, SendError> {
        if opcode.is_control() && len > MAX_CONTROL_PAYLOAD {
            return Err(SendError::ControlTooLong);
        }
        self.open_queue()
    }

    /// The send queue, while the connection is open for sending.
    fn open_queue(&mut self) -> Result<&mut Busy, SendError> {
        if self.state != State::Open {
            return Err(SendError::Closing);
        }
        Ok(self.busy())
    }

    fn queue(&mut self, frame: Bytes) {
        self.busy().queue(frame);
    }

    /// The bytes waiting to be written, in order: the first slice may be the rest of a
    /// partly written frame; small frames come merged into larger slices. Write as many
    /// as the socket takes (one vectored write), then call
    /// [`Connection::advance_transmit`]. The slices stay valid and unchanged until
    /// `advance_transmit` reports them written, whatever is queued meanwhile, so an
    /// asynchronous write may hold on to them.
    #[inline]
    pub fn transmit(&mut self) -> impl Iterator<Item = &[u8]> {
        if let Some(b) = self.busy.as_mut() {
            b.seal();
        }
        let (skip, frames) = match &self.busy {
            Some(b) => (b.transmit_offset, &b.transmit),
            None => (0, &EMPTY_QUEUE),
        };
        frames.iter().enumerate().map(move |(i, f)| {
            if i == 0 {
                f.get(skip..).unwrap_or_default()
            } else {
                &f[..]
            }
        })
    }

    /// How many slices [`Connection::transmit`] will yield (0: nothing to write).
    #[inline]
    pub fn transmit_frames(&self) -> usize {
        self.busy
            .as_ref()
            .map_or(0, |b| b.transmit.len() + usize::from(!b.tail.is_empty()))
    }

    /// Bytes queued and not yet written.
    #[inline]
    pub fn queued_bytes(&self) -> usize {
        self.busy.as_ref().map_or(0, |b| b.queued_bytes)
    }

    /// Reports that `n` bytes of [`Connection::transmit`] were written.
    #[inline]
    pub fn advance_transmit(&mut self, cfg: &Config, mut n: usize) {
        let Some(b) = self.busy.as_mut() else {
            return;
        };
        if n > 0 {
            b.send_deadline = Deadline::NONE; // progress
        }
        b.queued_bytes = b.queued_bytes.saturating_sub(n);
        while let Some(front) = b.transmit.front() {
            let left = front.len() - b.transmit_offset;
            if n < left {
                b.transmit_offset += n;
                break;
            }
            n -= left;
            b.transmit_offset = 0;
            b.transmit.pop_front();
        }
        if b.owed_pong.is_some() {
            self.pay_owed_pong(cfg);
        }
        self.settle();
    }

    /// Queues the pong owed for the latest ping once the queue is back under the reply
    /// limit (rare: only after a ping flood into a full queue).
    #[cold]
    fn pay_owed_pong(&mut self, cfg: &Config) {
        let open = self.state == State::Open;
        let limit = cfg.reply_queue_limit;
        if let Some(b) = self.busy.as_mut()
            && b.queued_bytes <= limit
            && let Some(payload) = b.owed_pong.take()
            && open
        {
            b.queue_encoded(OpCode::Pong, &payload);
        }
    }

    /// Tells the connection that bytes are still queued after a write at `now` (the
    /// socket took less than everything, or a write is in flight): unless the queue makes
    /// progress within [`Config::send_timeout`], [`Connection::handle_timeout`] drops the
    /// connection ([`Event::SendTimedOut`]). Cheap when the clock already runs.
    pub fn note_unsent(&mut self, cfg: &Config, now: Instant) {
        let Some(timeout) = cfg.send_timeout else {
            return;
        };
        if let Some(b) = self.busy.as_mut()
            && b.queued_bytes > 0
            && b.send_deadline == Deadline::NONE
        {
            b.send_deadline = Deadline::at(now + timeout);
        }
    }

    /// The next deadline, if any: call [`Connection::handle_timeout`] when it has passed.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut d = self.deadline;
        if let Some(b) = &self.busy {
            for other in [b.message_deadline, b.send_deadline] {
                if other != Deadline::NONE && (d == Deadline::NONE || other.0 < d.0) {
                    d = other;
                }
            }
        }
        d.get()
    }

    /// Acts on a deadline that has passed: send a ping when the peer was silent, or close
    /// (event [`Event::TimedOut`]) when a pong or a close reply did not come in time, or
    /// (event [`Event::SendTimedOut`]) when queued bytes made no progress, or fail the
    /// connection with 1008 when a message was not complete in time. Calls before the
    /// deadline do nothing, so a driver may call it early.
    pub fn handle_timeout(&mut self, cfg: &Config, now: Instant) {
        let due = |d: Deadline| d.get().is_some_and(|d| d <= now);
        if let Some(b) = self.busy.as_mut() {
            if due(b.send_deadline) && b.queued_bytes > 0 && !b.events.iter().any(is_terminal) {
                b.send_deadline = Deadline::NONE;
                self.closed();
                self.timer = Timer::None;
                self.deadline = Deadline::NONE;
                self.input_done = true;
                self.busy().events.push_back(Event::SendTimedOut);
                return;
            }
            if due(b.message_deadline) {
                b.message_deadline = Deadline::NONE;
                if self.state == State::Open && !self.input_done {
                    let mut b = self.busy.take().unwrap_or_else(take_spare);
                    self.fail(&mut b, ProtocolError::MessageTimeout);
                    self.busy = Some(b);
                    self.timer = Timer::Closing;
                    self.deadline = Deadline::at(now + cfg.close_timeout);
                    return;
                }
            }
        }
        if !due(self.deadline) {
            return;
        }
        match self.timer {
            Timer::None => self.deadline = Deadline::NONE,
            Timer::Idle => {
                if self.state == State::Open {
                    self.busy().queue_encoded(OpCode::Ping, b"");
                }
                self.timer = Timer::AwaitPong;
                self.deadline = Deadline::at(now + cfg.pong_timeout);
            }
            Timer::AwaitPong | Timer::Closing => {
                if self
                    .busy
                    .as_ref()
                    .is_some_and(|b| b.events.iter().any(is_terminal))
                {
                    return; // the end is already reported; the driver polls it first
                }
                let was_closed = self.state == State::Closed;
                self.timer = Timer::None;
                self.deadline = Deadline::NONE;
                if was_closed && self.queued_bytes() == 0 {
                    return; // closed and flushed: nothing to drop for
                }
                // Closed with bytes the peer never took, or a pong or close reply that
                // never came: drop.
                self.closed();
                self.input_done = true;
                self.busy().events.push_back(Event::TimedOut);
            }
        }
    }

    /// Gives back memory a burst left allocated. The in-progress state is dropped as soon
    /// as it empties on [`Connection::poll_event`] and [`Connection::advance_transmit`], so
    /// this matters only after calls that left it empty otherwise; it is cheap, so a driver
    /// may call it any time.
    pub fn shrink(&mut self) {
        self.settle();
    }

    /// Bytes held in this connection's message reassembly buffer (counted in
    /// [`reassembly_total`]).
    pub fn reassembly_bytes(&self) -> usize {
        self.busy
            .as_ref()
            .and_then(|b| b.partial.as_ref())
            .map_or(0, |p| p.counted)
    }

    /// Bytes of heap this connection holds beyond its own struct (buffers and queues,
    /// counting capacity, not counting shared frames).
    pub fn heap_bytes(&self) -> usize {
        self.busy.as_ref().map_or(0, |b| {
            std::mem::size_of::<Busy>()
                + b.partial.as_ref().map_or(0, |p| {
                    std::mem::size_of::<Partial>()
                        + p.message.capacity()
                        + p.control.capacity()
                        + p.inflater
                            .as_ref()
                            .map_or(0, |z| super::deflate::INFLATER_COST + z.held())
                })
                + b.events.capacity() * std::mem::size_of::<Event>()
                + b.transmit.capacity() * std::mem::size_of::<Bytes>()
                + b.tail.capacity()
        })
    }
}

/// One WebSocket connection's protocol state (server side), with its configuration. See
/// the module docs for the order in which a driver calls it; [`BareConnection`] is the
/// same without the configuration pointer.
///
/// Idle, it is 32 bytes and owns no heap.
#[derive(Debug)]
pub struct Connection {
    bare: BareConnection,
    config: Arc<Config>,
}

impl Connection {
    /// A connection that has just been upgraded at `now`.
    pub fn new(config: Arc<Config>, now: Instant) -> Connection {
        Connection {
            bare: BareConnection::new(&config, now, 0),
            config,
        }
    }

    /// Its configuration.
    pub fn config(&self) -> &Config {
        &self.config
    }

    /// See [`BareConnection::state`].
    pub fn state(&self) -> State {
        self.bare.state()
    }

    /// Whether the connection is done: nothing more will be read; close the socket once
    /// the transmit queue is empty.
    pub fn is_closed(&self) -> bool {
        self.bare.is_closed()
    }

    /// See [`BareConnection::closed_by_handshake`].
    pub fn closed_by_handshake(&self) -> bool {
        self.bare.closed_by_handshake()
    }

    /// See [`BareConnection::handle_read`].
    pub fn handle_read(&mut self, data: &mut [u8], now: Instant) -> bool {
        self.bare.handle_read(&self.config, data, now)
    }

    /// See [`BareConnection::poll_event`].
    pub fn poll_event(&mut self) -> Option<Event> {
        self.bare.poll_event()
    }

    /// See [`BareConnection::close_code`].
    pub fn close_code(&self) -> CloseCode {
        self.bare.close_code()
    }

    /// See [`BareConnection::close`].
    pub fn close(&mut self, code: CloseCode, reason: &str, now: Instant) {
        self.bare.close(&self.config, code, reason, now);
    }

    /// See [`BareConnection::send`].
    ///
    /// # Errors
    /// [`SendError::Closing`] once the connection is closing;
    /// [`SendError::ControlTooLong`] for a control frame over 125 bytes.
    pub fn send(&mut self, opcode: OpCode, payload: &[u8]) -> Result<(), SendError> {
        self.bare.send(&self.config, opcode, payload)
    }

    /// See [`BareConnection::send_bytes`].
    ///
    /// # Errors
    /// As [`Connection::send`].
    pub fn send_bytes(&mut self, opcode: OpCode, payload: Bytes) -> Result<(), SendError> {
        self.bare.send_bytes(&self.config, opcode, payload)
    }

    /// See [`BareConnection::send_frame`].
    ///
    /// # Errors
    /// [`SendError::Closing`] once the connection is closing.
    pub fn send_frame(&mut self, frame: Bytes) -> Result<(), SendError> {
        self.bare.send_frame(frame)
    }

    /// See [`BareConnection::send_raw`].
    ///
    /// # Errors
    /// [`SendError::Closing`] once the connection is closing.
    pub fn send_raw(&mut self, bytes: Bytes) -> Result<(), SendError> {
        self.bare.send_raw(bytes)
    }

    /// See [`BareConnection::send_shared`].
    ///
    /// # Errors
    /// [`SendError::Closing`] once the connection is closing.
    pub fn send_shared(&mut self, frame: &Bytes) -> Result<(), SendError> {
        self.bare.send_shared(frame)
    }

    /// See [`BareConnection::transmit`].
    #[inline]
    pub fn transmit(&mut self) -> impl Iterator<Item = &[u8]> {
        self.bare.transmit()
    }

    /// See [`BareConnection::transmit_frames`].
    #[inline]
    pub fn transmit_frames(&self) -> usize {
        self.bare.transmit_frames()
    }

    /// Bytes queued and not yet written.
    #[inline]
    pub fn queued_bytes(&self) -> usize {
        self.bare.queued_bytes()
    }

    /// See [`BareConnection::advance_transmit`].
    #[inline]
    pub fn advance_transmit(&mut self, n: usize) {
        self.bare.advance_transmit(&self.config, n);
    }

    /// See [`BareConnection::note_unsent`].
    pub fn note_unsent(&mut self, now: Instant) {
        self.bare.note_unsent(&self.config, now);
    }

    /// See [`BareConnection::poll_timeout`].
    pub fn poll_timeout(&self) -> Option<Instant> {
        self.bare.poll_timeout()
    }

    /// See [`BareConnection::handle_timeout`].
    pub fn handle_timeout(&mut self, now: Instant) {
        self.bare.handle_timeout(&self.config, now);
    }

    /// See [`BareConnection::shrink`].
    pub fn shrink(&mut self) {
        self.bare.shrink();
    }

    /// See [`BareConnection::reassembly_bytes`].
    pub fn reassembly_bytes(&self) -> usize {
        self.bare.reassembly_bytes()
    }

    /// See [`BareConnection::heap_bytes`].
    pub fn heap_bytes(&self) -> usize {
        self.bare.heap_bytes()
    }
}

/// The deflate parameters if a message of `opcode` and `len` bytes is to be sent
/// compressed.
fn compressible(cfg: &Config, opcode: OpCode, len: usize) -> Option<super::deflate::Params> {
    cfg.deflate
        .filter(|z| !opcode.is_control() && len >= z.threshold)
}

/// Takes the reassembled message out of `b`'s partial state, which goes too when nothing
/// else is in it (a control payload in progress, or an inflater kept for the client's
/// context).
fn take_message(b: &mut Busy) -> Vec<u8> {
    let Some(p) = b.partial.as_mut() else {
        return Vec::new();
    };
    let message = std::mem::take(&mut p.message);
    p.recount();
    if p.control.is_empty() && p.inflater.is_none() {
        b.partial = None;
    }
    message
}

/// A received message as its event, a text one checked as UTF-8 (a compressed text
/// message is checked once inflated, 1007 if it is not).
fn message_event(text: bool, payload: Bytes) -> Result<Event, ProtocolError> {
    if !text {
        return Ok(Event::Binary(payload));
    }
    if simdutf8::basic::from_utf8(&payload).is_err() {
        return Err(ProtocolError::InvalidUtf8);
    }
    Ok(Event::Text(payload))
}

/// One frame with RSV1 set around `payload` compressed (RFC 7692 §6.1).
fn compressed_frame(opcode: OpCode, payload: &[u8], params: &super::deflate::Params) -> Bytes {
    let z = super::deflate::compress(payload, params);
    let mut header = FrameHeader::whole(opcode, None, z.len() as u64);
    header.rsv1 = true;
    let mut h = [0u8; MAX_HEADER_LEN];
    let n = header.encode(&mut h);
    super::arena::copy(&[h.get(..n).unwrap_or_default(), &z])
}

fn is_terminal(event: &Event) -> bool {
    matches!(
        event,
        Event::Close(_) | Event::ProtocolError(_) | Event::TimedOut | Event::SendTimedOut
    )
}

/// What [`Connection::transmit`] iterates when nothing is queued.
static EMPTY_QUEUE: VecDeque<Bytes> = VecDeque::new();

/// Encodes a close frame with `code` and `reason` (empty payload for 1005/1006/1015).
pub fn close_frame(code: CloseCode, reason: &str) -> Bytes {
    let mut payload = [0u8; MAX_CONTROL_PAYLOAD];
    let n = encode_close_payload(code, reason, &mut payload);
    encode_frame(OpCode::Close, payload.get(..n).unwrap_or_default())
}

#[cfg(test)]
mod tests;
