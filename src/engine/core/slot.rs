//! A connection's slot: the 80 bytes a worker keeps per connection (the protocol state,
//! the generation, the descriptor, flags and phase, the handler's data), with what only
//! some connections need (a request split across reads, further topics, conflated frames,
//! a deferred upgrade, the application's timer, the close reason) boxed in an [`Extra`]
//! that exists only while it holds something. The close code to report is the
//! connection's own (`Connection::close_code`).

use super::*;
use arcstr::ArcStr;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(super) enum Phase {
    /// Reading the upgrade request (its buffer and deadline are in the slot's [`Extra`]).
    Handshake,
    /// Upgraded.
    Open,
    /// Answered (an HTTP response): close the socket once written.
    Finish,
}

/// An upgrade whose decision is deferred ([`Decision::Defer`]): what answering it needs,
/// the bytes the client sent meanwhile, and the flag the [`Deferred`] token reads.
#[derive(Debug)]
pub(super) struct PendingUpgrade {
    pub(super) upgrade: handshake::Upgrade,
    pub(super) rest: Vec<u8>,
    pub(super) gone: Arc<std::sync::atomic::AtomicBool>,
}

/// Flags of a slot, packed in two bytes (the slot is in every connection's footprint).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(super) struct Flags(pub(super) u16);

impl Flags {
    /// A send is in flight (io_uring).
    pub(super) const SENDING: u16 = 1;
    /// In the dirty list already.
    pub(super) const DIRTY: u16 = 1 << 1;
    /// Waiting for the socket to become writable (epoll).
    pub(super) const BLOCKED: u16 = 1 << 2;
    /// The peer is gone (EOF, error, timeout): write nothing more, close.
    pub(super) const DEAD: u16 = 1 << 3;
    /// The socket close has been requested.
    pub(super) const CLOSING: u16 = 1 << 4;
    /// Counted as an open WebSocket (and `on_open` was called).
    pub(super) const COUNTED: u16 = 1 << 5;
    /// Upgraded, and the 101 may still be queued.
    pub(super) const JUST_UPGRADED: u16 = 1 << 6;
    /// The handler paused reading.
    pub(super) const PAUSED: u16 = 1 << 7;
    /// What the backend was last told about reading.
    pub(super) const READING_OFF: u16 = 1 << 8;
    /// It published in this loop turn: its writes go after everyone else's.
    pub(super) const PUBLISHED: u16 = 1 << 9;
    /// Not read because the worker's reassembly budget is spent (see `Core::check_budget`).
    pub(super) const BUDGET_PAUSED: u16 = 1 << 10;
    /// Not read because the send queue passed the hard limit (replies to what it reads
    /// would have nowhere to go); resumed below the soft limit.
    pub(super) const QUEUE_PAUSED: u16 = 1 << 11;
    /// An HTTP answer is out and the FIN sent: waiting for the peer's EOF (or the linger
    /// deadline) before closing.
    pub(super) const LINGERING: u16 = 1 << 12;
    /// Negotiated permessage-deflate with the server's own window: takes the compressed
    /// twin of every broadcast (compressed once per worker, `pubsub::Twin`).
    pub(super) const DEFLATE: u16 = 1 << 13;

    /// Whether reading should be off (the handler's pause, the budget's or the queue's).
    pub(super) fn reading_paused(self) -> bool {
        self.0 & (Self::PAUSED | Self::BUDGET_PAUSED | Self::QUEUE_PAUSED) != 0
    }

    pub(super) fn has(self, flag: u16) -> bool {
        self.0 & flag != 0
    }

    pub(super) fn set(&mut self, flag: u16, on: bool) {
        if on {
            self.0 |= flag;
        } else {
            self.0 &= !flag;
        }
    }
}

/// One topic a connection is subscribed to, and where it is among the topic's members in
/// the worker's registry, so that leaving it costs no search.
#[derive(Debug)]
pub(super) struct Member {
    /// The registry's own name of the topic (8 bytes: an `Arc<str>` here was 16).
    pub(super) key: ArcStr,
    /// Its index in the topic's member list ([`Member::NOT_LISTED`]: not in a registry
    /// yet, while it joins after what is in flight or waits for a broker's history).
    pub(super) pos: u32,
    /// In the envelope registry (`framed`), not the plain one.
    pub(super) framed: bool,
}

impl Member {
    /// Not in a registry's member list (yet).
    pub(super) const NOT_LISTED: u32 = u32::MAX;

    fn new(key: ArcStr) -> Member {
        Member {
            key,
            pos: Member::NOT_LISTED,
            framed: false,
        }
    }
}

/// The newest frame per topic held back by the conflation policy.
type Conflated = Vec<(ArcStr, Bytes)>;

/// What only some connections need: boxed, and dropped when empty, so that an idle
/// upgraded connection with at most one topic is its [`Slot`] alone.
#[derive(Debug, Default)]
pub(super) struct Extra {
    /// The upgrade request read so far, when it came split across reads (one that comes
    /// whole, as nearly all do, is parsed where it was read: a socket in its handshake
    /// has no `Extra`, its deadline is its place on the timer wheel).
    pub(super) request: Vec<u8>,
    /// Topics this connection is subscribed to beyond the first ([`Slot::topic`]).
    pub(super) topics: Vec<Member>,
    /// Conflation: the newest frame per topic, held while the queue is over its hard limit.
    pub(super) conflated: Conflated,
    /// What at most one phase of a connection needs: a deferred upgrade's state, the
    /// application's timer, or the peer's close reason.
    pub(super) rare: Rare,
}

/// The parts of [`Extra`] that no two phases need at once, sharing one field so that
/// `Extra` stays the size it was before the application's timer and deferred upgrades:
/// a deferred upgrade exists only before the 101, the timer only while open (it never
/// fires once closing), the peer's close reason only once it closed.
#[derive(Debug, Default)]
pub(super) enum Rare {
    #[default]
    None,
    /// An upgrade waiting for the application's decision (handshake phase).
    Deferred(Box<PendingUpgrade>),
    /// When `Handler::on_timer` is due ([`Conn::set_timer`]).
    Timer(Instant),
    /// The peer's close reason (only when it sent one). A thin box (a `Box<str>` is two
    /// words, which would make every `Extra` a word larger for a value that exists only
    /// at the end of some connections).
    #[allow(clippy::box_collection)] // thin on purpose: see above
    CloseReason(Box<String>),
}

impl Extra {
    pub(super) fn is_empty(&self) -> bool {
        self.request.is_empty()
            && self.topics.is_empty()
            && self.conflated.is_empty()
            && matches!(self.rare, Rare::None)
    }

    pub(super) fn deferred(&self) -> Option<&PendingUpgrade> {
        match &self.rare {
            Rare::Deferred(p) => Some(p),
            _ => None,
        }
    }

    pub(super) fn deferred_mut(&mut self) -> Option<&mut PendingUpgrade> {
        match &mut self.rare {
            Rare::Deferred(p) => Some(p),
            _ => None,
        }
    }

    pub(super) fn take_deferred(&mut self) -> Option<Box<PendingUpgrade>> {
        match std::mem::take(&mut self.rare) {
            Rare::Deferred(p) => Some(p),
            other => {
                self.rare = other;
                None
            }
        }
    }

    pub(super) fn timer(&self) -> Option<Instant> {
        match self.rare {
            Rare::Timer(at) => Some(at),
            _ => None,
        }
    }

    /// Sets (`Some`) or cancels (`None`) the application's timer.
    pub(super) fn set_timer(&mut self, at: Option<Instant>) {
        match at {
            Some(at) => self.rare = Rare::Timer(at),
            None if matches!(self.rare, Rare::Timer(_)) => self.rare = Rare::None,
            None => {}
        }
    }

    /// Keeps the peer's close reason (in place of a timer: a closing connection's timer
    /// never fires).
    pub(super) fn set_close_reason(&mut self, reason: String) {
        if !matches!(self.rare, Rare::Deferred(_)) {
            self.rare = Rare::CloseReason(Box::new(reason));
        }
    }

    #[allow(clippy::box_collection)] // the variant's thin box, handed on as it is
    pub(super) fn take_close_reason(&mut self) -> Option<Box<String>> {
        match std::mem::take(&mut self.rare) {
            Rare::CloseReason(r) => Some(r),
            other => {
                self.rare = other;
                None
            }
        }
    }
}

/// The boxed part stays within the size it had before `Rare` (104 bytes on 64-bit; 88 now
/// that a split request is a plain `Vec`).
const _: () = assert!(std::mem::size_of::<Extra>() <= 88);

/// One connection. Kept at 72 bytes (asserted below): with the backend's per-slot bytes
/// it is the whole user-space cost of an idle connection, one topic and its place on the
/// timer wheel included.
pub(super) struct Slot<D> {
    pub(super) conn: BareConnection,
    pub(super) extra: Option<Box<Extra>>,
    /// The first topic this connection subscribed to (the registry's own name, shared,
    /// and its place in the registry): a subscriber of one topic needs no [`Extra`] for
    /// it. Further topics are in [`Extra::topics`]. Measured cold at 15,000 idle
    /// subscribers, the `Extra` box and its topic list cost 190 B per connection; this
    /// field costs 16.
    pub(super) topic: Option<Member>,
    /// Its place on the worker's timer wheel, whose lists run through the slab (12
    /// bytes: the wheel itself holds no entry per connection).
    pub(super) timer: Link,
    pub(super) generation: u32,
    pub(super) fd: u32,
    pub(super) flags: Flags,
    pub(super) phase: Phase,
    /// The handler's per-connection data.
    pub(super) data: Option<D>,
}

impl<D> Slot<D> {
    /// The queue limits, in one place for a direct send and a fan-out: room for a frame of
    /// `len` bytes with `ahead` more bytes already promised to this connection.
    pub(super) fn room(&self, len: usize, ahead: usize, soft: usize, hard: usize) -> Room {
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
                deflate: self.flags.has(Flags::DEFLATE),
            }
        }
    }

    pub(super) fn extra(&mut self) -> &mut Extra {
        self.extra.get_or_insert_with(Box::default)
    }

    /// Drops the part of an upgrade request kept between reads (it was answered).
    pub(super) fn forget_request(&mut self) {
        if let Some(e) = self.extra.as_mut() {
            e.request = Vec::new();
        }
        self.tidy();
    }

    /// Drops the extra part once it holds nothing.
    pub(super) fn tidy(&mut self) {
        if self.extra.as_ref().is_some_and(|e| e.is_empty()) {
            self.extra = None;
        }
    }

    /// The topics this connection is subscribed to.
    pub(super) fn topics(&self) -> impl Iterator<Item = &ArcStr> {
        self.topic
            .iter()
            .chain(self.extra.as_ref().map_or(&[][..], |e| &e.topics))
            .map(|m| &m.key)
    }

    /// This connection's membership of `topic`, if it is subscribed.
    pub(super) fn member_mut(&mut self, topic: &str) -> Option<&mut Member> {
        if self.topic.as_ref().is_some_and(|m| &*m.key == topic) {
            return self.topic.as_mut();
        }
        self.extra
            .as_mut()?
            .topics
            .iter_mut()
            .find(|m| &*m.key == topic)
    }

    /// Takes every membership (the connection is going).
    pub(super) fn take_topics(&mut self) -> Vec<Member> {
        let mut all = self
            .extra
            .as_mut()
            .map(|e| std::mem::take(&mut e.topics))
            .unwrap_or_default();
        all.extend(self.topic.take());
        all
    }

    /// Whether this connection is subscribed to `topic`.
    pub(super) fn has_topic(&self, topic: &str) -> bool {
        self.topics().any(|t| &**t == topic)
    }

    /// Records a subscription to `key` (the registry's name of the topic), not in a
    /// registry's member list yet.
    pub(super) fn add_topic(&mut self, key: ArcStr) {
        if self.topic.is_none() {
            self.topic = Some(Member::new(key));
        } else {
            self.extra().topics.push(Member::new(key));
        }
    }

    /// Forgets the subscription to `topic`; returns its membership, if it was one.
    pub(super) fn remove_topic(&mut self, topic: &str) -> Option<Member> {
        let key = if self.topic.as_ref().is_some_and(|m| &*m.key == topic) {
            let key = self.topic.take();
            // The inline place is taken by another topic, if there is one.
            self.topic = self.extra.as_mut().and_then(|e| e.topics.pop());
            key
        } else {
            let extra = self.extra.as_mut()?;
            let pos = extra.topics.iter().position(|m| &*m.key == topic)?;
            Some(extra.topics.swap_remove(pos))
        };
        if let Some(e) = self.extra.as_mut()
            && e.topics.is_empty()
        {
            e.topics = Vec::new();
        }
        self.tidy();
        key
    }

    /// When the application's timer is due, if one is set.
    pub(super) fn timer(&self) -> Option<Instant> {
        self.extra.as_ref().and_then(|e| e.timer())
    }

    pub(super) fn has_conflated(&self) -> bool {
        self.extra.as_ref().is_some_and(|e| !e.conflated.is_empty())
    }
}

const _: () = assert!(std::mem::size_of::<Slot<()>>() <= 72);
