//! Per-topic history: a bounded ring of a topic's most recent publications, each with its
//! offset, from which a reconnecting subscriber is given exactly what it missed.
//!
//! A topic's [`Stream`] numbers its publications from 1, one more per publication, within
//! an [`Epoch`]: a random id that changes whenever the numbering may restart or history may
//! have been lost (a new stream: the first publication after a node start, or after an
//! idle stream was dropped). A position is therefore `(offset, epoch)`, and a resume from
//! a position of another epoch is never taken for a recovery.
//!
//! The ring keeps the publications' already-encoded frames as [`Bytes`] (shared, never
//! copied per subscriber): a replay re-encodes nothing. It is bounded three ways
//! ([`Limits`]): publications kept, their bytes, and their age; whatever a limit pushes out
//! is gone, and a resume from before it is answered with what is left and
//! `recovered: false`.
//!
//! [`History`] is a node's streams, one per topic that was published to, behind sharded
//! locks: the one place on a node where a topic's offsets are assigned (or, with a broker,
//! taken in order from it), so they are the same for every subscriber on every worker.
//! How a replay is merged with live delivery is the engine's business (see
//! `engine/core/history.rs`).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::proto::{OpCode, encode_frame};

/// A stream's epoch: random, shown as 16 hex digits.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Epoch(pub u64);

impl Epoch {
    /// A fresh random epoch.
    pub fn random() -> Epoch {
        use std::hash::{BuildHasher, Hasher};
        // The std hasher's keys are random per process (and per `RandomState`); the clock
        // and a counter make two epochs of one process differ too.
        static COUNTER: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let mut h = std::collections::hash_map::RandomState::new().build_hasher();
        h.write_u128(
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos()),
        );
        h.write_u64(COUNTER.fetch_add(1, std::sync::atomic::Ordering::Relaxed));
        Epoch(h.finish())
    }

    /// Parses the 16-hex-digit form (as [`Epoch`]'s `Display` writes it).
    pub fn parse(s: &str) -> Option<Epoch> {
        (s.len() == 16)
            .then(|| u64::from_str_radix(s, 16).ok())
            .flatten()
            .map(Epoch)
    }
}

impl std::fmt::Display for Epoch {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:016x}", self.0)
    }
}

/// How much history a topic keeps. A publication is dropped as soon as any limit is
/// exceeded (oldest first).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Publications kept (at least 1).
    pub count: usize,
    /// Bytes of frames kept (at least one publication is kept whatever its size).
    pub bytes: usize,
    /// How long a publication is kept.
    pub ttl: Duration,
}

impl Default for Limits {
    /// What `wsring serve` uses: 1,000 publications, 16 MiB, 5 minutes.
    fn default() -> Limits {
        Limits {
            count: 1000,
            bytes: 16 * 1024 * 1024,
            ttl: Duration::from_secs(300),
        }
    }
}

/// A place in a topic's stream: the offset of the last publication seen, in its epoch.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Position {
    /// The offset of the last publication seen (0: none yet).
    pub offset: u64,
    /// The epoch it belongs to.
    pub epoch: Epoch,
}

/// How a connection subscribes to a topic with history.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Subscription {
    /// Resume after this position: every publication after it that is still kept is
    /// replayed first (`None`: from now on).
    pub since: Option<Position>,
    /// Get every publication in the history's [`Envelope`] (which carries its offset)
    /// instead of the plain frame.
    pub envelope: bool,
}

impl Subscription {
    /// From now on, plain frames.
    pub fn live() -> Subscription {
        Subscription::default()
    }

    /// Resuming after `since` (if any).
    pub fn since(since: Option<Position>) -> Subscription {
        Subscription {
            since,
            envelope: false,
        }
    }

    /// The same, in the envelope.
    pub fn enveloped(mut self) -> Subscription {
        self.envelope = true;
        self
    }
}

/// What a subscription to a topic with history got: handed to
/// [`Handler::on_subscribed`](crate::api::Handler::on_subscribed) before the replay is
/// queued.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Resumed {
    /// The last publication before live delivery: the replay ends here, and live
    /// publications follow from `position.offset + 1`.
    pub position: Position,
    /// Every publication after the requested position was replayed (same epoch, nothing
    /// aged out or trimmed away). `false` for a subscription without a position.
    pub recovered: bool,
    /// Publications replayed.
    pub replayed: usize,
}

/// One publication kept in the ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Its offset in the stream's epoch.
    pub offset: u64,
    /// Its encoded frame, as plain subscribers get it.
    pub frame: Bytes,
    /// Its encoded frame in the envelope that carries the offset, as subscribers that
    /// asked for it get it (when the history has an [`Envelope`]).
    pub envelope: Option<Bytes>,
    at: Instant,
}

impl Entry {
    /// Bytes this entry holds against the limits.
    fn size(&self) -> usize {
        self.frame.len() + self.envelope.as_ref().map_or(0, Bytes::len)
    }
}

/// What a resume gets: the publications after its position (in order) and whether they
/// are all of them.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Replay {
    /// The stream's epoch now.
    pub epoch: Epoch,
    /// The offset of the last publication so far: live delivery continues after it.
    pub last: u64,
    /// The publications after the position that are still kept, oldest first.
    pub entries: Vec<Entry>,
    /// Every publication after the position is in `entries` (same epoch, nothing trimmed
    /// away, and the position not from the future).
    pub recovered: bool,
}

/// One topic's history.
#[derive(Debug)]
pub struct Stream {
    epoch: Epoch,
    last: u64,
    entries: VecDeque<Entry>,
    bytes: usize,
    /// Offsets up to this one may have holes (publications the broker never delivered
    /// and a reload could not find): a resume from before it is not recovered.
    lost_upto: u64,
    /// With a broker that numbers publications: whether this copy follows the broker's
    /// stream (loaded since the node subscribed). Always `true` without one.
    pub(crate) synced: bool,
    /// A reload from the broker was asked for and has not come back.
    pub(crate) loading: bool,
    /// Publications from the broker that arrived while not synced (or during a repair),
    /// merged by offset when the load comes back. Bounded by [`PENDING_LIMIT`].
    pub(crate) pending: Vec<(Epoch, u64, OpCode, Bytes)>,
    /// Subscriptions waiting for the load: (worker, connection, subscription).
    pub(crate) parked: Vec<(usize, crate::engine::ConnId, Subscription)>,
}

/// Most publications buffered while a stream loads from its broker; past it, the oldest
/// go (and the reload finds them, or they are lost and reported so).
pub(crate) const PENDING_LIMIT: usize = 10_000;

impl Stream {
    /// An empty stream in a fresh epoch.
    pub fn new() -> Stream {
        Stream::with_epoch(Epoch::random())
    }

    /// An empty stream in `epoch`.
    pub fn with_epoch(epoch: Epoch) -> Stream {
        Stream {
            epoch,
            last: 0,
            entries: VecDeque::new(),
            bytes: 0,
            lost_upto: 0,
            synced: true,
            loading: false,
            pending: Vec::new(),
            parked: Vec::new(),
        }
    }

    /// Starts again in `epoch` after `last` (a broker's stream reset or loaded): what was
    /// kept goes; returns the bytes freed.
    pub(crate) fn restart(&mut self, epoch: Epoch, last: u64) -> usize {
        let freed = self.bytes;
        self.epoch = epoch;
        self.last = last;
        self.entries.clear();
        self.bytes = 0;
        self.lost_upto = last;
        freed
    }

    /// Skips ahead to `offset - 1`: the publications in between are lost (a resume from
    /// before `offset` is not recovered).
    pub(crate) fn skip_to(&mut self, offset: u64) {
        if offset > self.last + 1 {
            self.last = offset - 1;
            self.lost_upto = self.last;
        }
    }

    /// The epoch.
    pub fn epoch(&self) -> Epoch {
        self.epoch
    }

    /// The offset of the last publication (0: none yet).
    pub fn last(&self) -> u64 {
        self.last
    }

    /// Publications kept now.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether nothing is kept.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// Bytes of frames kept now.
    pub fn bytes(&self) -> usize {
        self.bytes
    }

    /// The position after the last publication.
    pub fn position(&self) -> Position {
        Position {
            offset: self.last,
            epoch: self.epoch,
        }
    }

    /// When the newest kept publication was appended.
    pub fn newest(&self) -> Option<Instant> {
        self.entries.back().map(|e| e.at)
    }

    /// Appends a publication (its plain frame and, if the history has an envelope, its
    /// enveloped frame), returning its offset (one more than the last), and drops what
    /// the limits no longer allow.
    pub fn append(
        &mut self,
        frame: Bytes,
        envelope: Option<Bytes>,
        now: Instant,
        limits: &Limits,
    ) -> u64 {
        self.last += 1;
        let entry = Entry {
            offset: self.last,
            frame,
            envelope,
            at: now,
        };
        self.bytes += entry.size();
        self.entries.push_back(entry);
        self.trim(now, limits);
        self.last
    }

    /// Appends a publication whose offset was assigned elsewhere (a broker): it must be
    /// the next one. `false` (nothing kept) if it is not: the caller has a gap to repair
    /// or a duplicate to skip.
    pub fn append_at(
        &mut self,
        offset: u64,
        frame: Bytes,
        envelope: Option<Bytes>,
        now: Instant,
        limits: &Limits,
    ) -> bool {
        if offset != self.last + 1 {
            return false;
        }
        self.append(frame, envelope, now, limits);
        true
    }

    /// The kept publications with offsets in `(after, before)`, oldest first (what a
    /// subscriber that saw `after` and then `before` missed, as far as it is kept).
    pub fn between(&self, after: u64, before: u64) -> Vec<Entry> {
        self.entries
            .iter()
            .filter(|e| e.offset > after && e.offset < before)
            .cloned()
            .collect()
    }

    /// Drops the oldest publication (keeping the newest): for a node-wide byte cap.
    /// Returns the bytes freed.
    pub fn drop_oldest(&mut self) -> usize {
        if self.entries.len() <= 1 {
            return 0;
        }
        let freed = self.entries.pop_front().map_or(0, |e| e.size());
        self.bytes -= freed;
        freed
    }

    /// Drops publications past the limits: too many, too many bytes (the newest is always
    /// kept), too old.
    pub fn trim(&mut self, now: Instant, limits: &Limits) {
        let count = limits.count.max(1);
        while let Some(front) = self.entries.front() {
            let over = self.entries.len() > count
                || (self.bytes > limits.bytes && self.entries.len() > 1)
                || now.saturating_duration_since(front.at) > limits.ttl;
            if !over {
                break;
            }
            self.bytes -= front.size();
            self.entries.pop_front();
        }
    }

    /// What a subscriber resuming from `since` (its last offset and the epoch it was in;
    /// `None`: a first subscription) gets now.
    pub fn since(&self, since: Option<Position>, now: Instant, limits: &Limits) -> Replay {
        let mut replay = Replay {
            epoch: self.epoch,
            last: self.last,
            entries: Vec::new(),
            recovered: false,
        };
        let Some(Position { offset, epoch }) = since else {
            return replay;
        };
        if epoch != self.epoch || offset > self.last {
            return replay;
        }
        let fresh = |e: &&Entry| now.saturating_duration_since(e.at) <= limits.ttl;
        replay.entries = self
            .entries
            .iter()
            .filter(|e| e.offset > offset)
            .filter(fresh)
            .cloned()
            .collect();
        let first = replay.entries.first().map_or(self.last + 1, |e| e.offset);
        replay.recovered = first == offset + 1 && offset >= self.lost_upto;
        replay
    }
}

impl Default for Stream {
    fn default() -> Stream {
        Stream::new()
    }
}

/// Writes a publication in the envelope that carries its offset: given the topic, the
/// offset, the opcode and the payload, it appends the enveloped payload to the buffer and
/// returns the envelope's opcode. Called once per publication (never per subscriber).
pub type Envelope = Arc<dyn Fn(&str, u64, OpCode, &[u8], &mut Vec<u8>) -> OpCode + Send + Sync>;

/// Which topics keep history.
pub type TopicFilter = Arc<dyn Fn(&str) -> bool + Send + Sync>;

/// How a node keeps history.
#[derive(Clone)]
pub struct HistoryConfig {
    /// Per topic: publications, bytes and age kept.
    pub limits: Limits,
    /// Bytes kept over all topics of the node; past it, the topic being published to
    /// gives up its oldest publications first.
    pub max_bytes: usize,
    /// The envelope for subscribers that ask for offsets (none: only plain frames).
    pub envelope: Option<Envelope>,
    /// The topics that keep history (none: all of them).
    pub topics: Option<TopicFilter>,
}

impl Default for HistoryConfig {
    /// [`Limits::default`], 256 MiB per node, no envelope, every topic.
    fn default() -> HistoryConfig {
        HistoryConfig {
            limits: Limits::default(),
            max_bytes: 256 * 1024 * 1024,
            envelope: None,
            topics: None,
        }
    }
}

impl std::fmt::Debug for HistoryConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("HistoryConfig")
            .field("limits", &self.limits)
            .field("max_bytes", &self.max_bytes)
            .field("envelope", &self.envelope.is_some())
            .field("topics", &self.topics.as_ref().map(|_| "filtered"))
            .finish()
    }
}

/// Lock shards of a node's streams (a publish holds one while it assigns an offset and
/// hands the publication to the workers).
const SHARDS: usize = 16;

/// What became of a publication the broker numbered ([`Locked::append_numbered`]).
#[derive(Debug)]
pub enum Numbered {
    /// Kept: hand it to the workers.
    Appended(Arc<str>, Epoch, Entry),
    /// At or before the last offset kept: already seen.
    Repeat,
    /// After a hole: the ones in between must be loaded first.
    Gap,
}

/// One lock shard: the streams of the topics that hash to it.
type Shard = HashMap<Arc<str>, Stream>;

/// A node's streams, one per topic with history.
pub struct History {
    config: HistoryConfig,
    /// The broker numbers publications (offsets the same on every node); the node's
    /// streams are copies loaded from it and kept up by what it delivers.
    pub(crate) broker_numbered: bool,
    shards: Box<[Mutex<Shard>]>,
    /// Bytes kept over all streams.
    bytes: AtomicUsize,
    /// Loads of a topic's stream from the broker (first use and repairs).
    pub loads: std::sync::atomic::AtomicU64,
    /// Publications the broker numbered that neither it nor this node still had when a
    /// load looked for them.
    pub lost: std::sync::atomic::AtomicU64,
}

/// One shard of a node's streams, locked: assigning an offset, appending, and reading a
/// replay happen under it, so nothing is published to the topic in between.
pub struct Locked<'a> {
    history: &'a History,
    map: MutexGuard<'a, Shard>,
}

impl History {
    /// A node's history, empty.
    pub fn new(config: HistoryConfig) -> History {
        History {
            config,
            broker_numbered: false,
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            bytes: AtomicUsize::new(0),
            loads: Default::default(),
            lost: Default::default(),
        }
    }

    /// How it keeps history.
    pub fn config(&self) -> &HistoryConfig {
        &self.config
    }

    /// Whether `topic` keeps history.
    pub fn applies(&self, topic: &str) -> bool {
        self.config.topics.as_ref().is_none_or(|f| f(topic))
    }

    /// Locks the shard of `topic`.
    pub fn lock(&self, topic: &str) -> Locked<'_> {
        use std::hash::{BuildHasher, BuildHasherDefault, DefaultHasher};
        let shard = BuildHasherDefault::<DefaultHasher>::default().hash_one(topic) as usize;
        let map = match self.shards[shard % SHARDS].lock() {
            Ok(m) => m,
            // A panic elsewhere while holding it left nothing half-written that matters
            // more than serving on.
            Err(poisoned) => poisoned.into_inner(),
        };
        Locked { history: self, map }
    }

    /// Bytes kept over all topics.
    pub fn bytes(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    /// Topics with a stream now.
    pub fn topics(&self) -> usize {
        self.shards
            .iter()
            .map(|s| s.lock().map_or(0, |m| m.len()))
            .sum()
    }

    /// Trims every stream by age and forgets streams that hold nothing and that
    /// `in_use` says nobody is subscribed to (their epoch goes with them: a resume
    /// from it is not recovered, which is true, as everything in it aged out).
    pub fn sweep(&self, now: Instant, in_use: impl Fn(&str) -> bool) {
        let limits = self.config.limits;
        for shard in self.shards.iter() {
            let Ok(mut map) = shard.lock() else { continue };
            let mut freed = 0;
            map.retain(|topic, stream| {
                let before = stream.bytes();
                stream.trim(now, &limits);
                freed += before - stream.bytes();
                !stream.is_empty() || in_use(topic)
            });
            self.bytes.fetch_sub(freed, Ordering::Relaxed);
        }
    }
}

impl Locked<'_> {
    /// The stream of `topic`, if it has one.
    pub fn get(&self, topic: &str) -> Option<&Stream> {
        self.map.get(topic)
    }

    /// The stream of `topic` and its shared name, created (in a fresh epoch) if needed.
    pub fn stream(&mut self, topic: &str) -> (Arc<str>, &mut Stream) {
        let key = match self.map.get_key_value(topic) {
            Some((k, _)) => k.clone(),
            None => Arc::from(topic),
        };
        let numbered = self.history.broker_numbered;
        let stream = self.map.entry(key.clone()).or_insert_with(|| {
            let mut s = Stream::new();
            // A copy of the broker's: not usable until loaded.
            s.synced = !numbered;
            s
        });
        (key, stream)
    }

    /// Publishes to `topic`: assigns the next offset, encodes the frame (and its
    /// envelope) once and keeps it. Returns the topic's shared name, the epoch and the
    /// entry to hand to the workers.
    pub fn append(
        &mut self,
        topic: &str,
        opcode: OpCode,
        payload: &[u8],
        now: Instant,
    ) -> (Arc<str>, Epoch, Entry) {
        let next = self.stream(topic).1.last() + 1;
        self.push(topic, next, opcode, payload, now)
    }

    /// Keeps a publication the broker numbered (`offset` in `epoch`): appended if it is
    /// the next one (a new epoch starts the stream again), or why not.
    pub fn append_numbered(
        &mut self,
        topic: &str,
        epoch: Epoch,
        offset: u64,
        opcode: OpCode,
        payload: &[u8],
        now: Instant,
    ) -> Numbered {
        let history = self.history;
        let (_, stream) = self.stream(topic);
        if epoch != stream.epoch() {
            let freed = stream.restart(epoch, offset.saturating_sub(1));
            history.bytes.fetch_sub(freed, Ordering::Relaxed);
        }
        let last = stream.last();
        if offset <= last {
            return Numbered::Repeat;
        }
        if offset > last + 1 {
            return Numbered::Gap;
        }
        let (key, epoch, entry) = self.push(topic, offset, opcode, payload, now);
        Numbered::Appended(key, epoch, entry)
    }

    /// Encodes and keeps publication `offset` (the stream's next) of `topic`.
    fn push(
        &mut self,
        topic: &str,
        offset: u64,
        opcode: OpCode,
        payload: &[u8],
        now: Instant,
    ) -> (Arc<str>, Epoch, Entry) {
        let history = self.history;
        let (key, stream) = self.stream(topic);
        let frame = encode_frame(opcode, payload);
        let envelope = history.config.envelope.as_ref().map(|wrap| {
            let mut buf = Vec::with_capacity(payload.len() + 48);
            let op = wrap(topic, offset, opcode, payload, &mut buf);
            encode_frame(op, &buf)
        });
        let entry = Entry {
            offset,
            frame: frame.clone(),
            envelope: envelope.clone(),
            at: now,
        };
        let before = stream.bytes();
        stream.append(frame, envelope, now, &history.config.limits);
        let after = stream.bytes();
        if after >= before {
            let grown = after - before;
            let total = history.bytes.fetch_add(grown, Ordering::Relaxed) + grown;
            // The node-wide cap: the topic growing gives up its oldest first.
            let mut over = total.saturating_sub(history.config.max_bytes);
            while over > 0 {
                let freed = stream.drop_oldest();
                if freed == 0 {
                    break;
                }
                over = over.saturating_sub(freed);
                history.bytes.fetch_sub(freed, Ordering::Relaxed);
            }
        } else {
            history.bytes.fetch_sub(before - after, Ordering::Relaxed);
        }
        (key, stream.epoch(), entry)
    }

    /// Starts `topic`'s stream again in `epoch` after `last` (a load from the broker).
    pub fn restart(&mut self, topic: &str, epoch: Epoch, last: u64) {
        let history = self.history;
        let freed = self.stream(topic).1.restart(epoch, last);
        history.bytes.fetch_sub(freed, Ordering::Relaxed);
    }

    /// Access to the stream of `topic` for the engine's bookkeeping, if it exists.
    pub(crate) fn get_mut(&mut self, topic: &str) -> Option<&mut Stream> {
        self.map.get_mut(topic)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(count: usize, bytes: usize, ttl_ms: u64) -> Limits {
        Limits {
            count,
            bytes,
            ttl: Duration::from_millis(ttl_ms),
        }
    }

    fn frame(i: u64) -> Bytes {
        Bytes::from(format!("m{i}"))
    }

    fn at(offset: u64, epoch: Epoch) -> Position {
        Position { offset, epoch }
    }

    fn offsets(r: &Replay) -> Vec<u64> {
        r.entries.iter().map(|e| e.offset).collect()
    }

    #[test]
    fn offsets_start_at_one_and_grow_by_one() {
        let l = limits(10, 1 << 20, 60_000);
        let mut s = Stream::new();
        let now = Instant::now();
        assert_eq!(s.last(), 0);
        for want in 1..=25 {
            assert_eq!(s.append(frame(want), None, now, &l), want);
        }
        assert_eq!(s.last(), 25);
        assert_eq!(s.len(), 10, "the count limit keeps the newest 10");
        assert_eq!(s.entries.front().map(|e| e.offset), Some(16));
    }

    #[test]
    fn a_resume_gets_exactly_what_it_missed() {
        let l = limits(100, 1 << 20, 60_000);
        let mut s = Stream::new();
        let now = Instant::now();
        for i in 1..=10 {
            s.append(frame(i), None, now, &l);
        }
        let r = s.since(Some(at(4, s.epoch())), now, &l);
        assert_eq!(offsets(&r), (5..=10).collect::<Vec<_>>());
        assert!(r.recovered);
        assert_eq!((r.last, r.epoch), (10, s.epoch()));
        assert_eq!(
            r.entries[0].frame,
            frame(5),
            "the kept frame, not a new one"
        );
        // Up to date: nothing to replay, and that is a full recovery.
        let r = s.since(Some(at(10, s.epoch())), now, &l);
        assert!(r.entries.is_empty() && r.recovered);
        // From the start of the epoch.
        let r = s.since(Some(at(0, s.epoch())), now, &l);
        assert_eq!(r.entries.len(), 10);
        assert!(r.recovered);
    }

    #[test]
    fn a_first_subscription_learns_the_position_and_gets_nothing() {
        let l = limits(100, 1 << 20, 60_000);
        let mut s = Stream::new();
        let now = Instant::now();
        s.append(frame(1), None, now, &l);
        let r = s.since(None, now, &l);
        assert_eq!((r.last, r.epoch, r.recovered), (1, s.epoch(), false));
        assert!(r.entries.is_empty());
    }

    #[test]
    fn another_epoch_or_a_future_offset_is_not_recovered() {
        let l = limits(100, 1 << 20, 60_000);
        let mut s = Stream::new();
        let now = Instant::now();
        for i in 1..=5 {
            s.append(frame(i), None, now, &l);
        }
        let other = Epoch(s.epoch().0 ^ 1);
        let r = s.since(Some(at(2, other)), now, &l);
        assert!(!r.recovered && r.entries.is_empty());
        let r = s.since(Some(at(9, s.epoch())), now, &l);
        assert!(!r.recovered && r.entries.is_empty());
    }

    #[test]
    fn trimmed_history_is_replayed_as_far_as_kept_and_not_recovered() {
        let now = Instant::now();
        // By count.
        let l = limits(3, 1 << 20, 60_000);
        let mut s = Stream::new();
        for i in 1..=10 {
            s.append(frame(i), None, now, &l);
        }
        let r = s.since(Some(at(5, s.epoch())), now, &l);
        assert_eq!(offsets(&r), vec![8, 9, 10]);
        assert!(!r.recovered);
        let r = s.since(Some(at(7, s.epoch())), now, &l);
        assert_eq!(offsets(&r), vec![8, 9, 10]);
        assert!(
            r.recovered,
            "7 is the last trimmed: nothing after it is missing"
        );
        // By bytes: each frame is 2 bytes; 8 bytes keep the last four.
        let l = limits(100, 8, 60_000);
        let mut s = Stream::new();
        for i in 1..=9 {
            s.append(frame(i), None, now, &l);
        }
        assert!(s.bytes() <= 8);
        assert_eq!(s.entries.front().map(|e| e.offset), Some(6));
        // One frame over the byte limit is still kept (the newest always is).
        s.append(Bytes::from(vec![0u8; 100]), None, now, &l);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn old_publications_age_out() {
        let l = limits(100, 1 << 20, 1_000);
        let t0 = Instant::now();
        let mut s = Stream::new();
        s.append(frame(1), None, t0, &l);
        s.append(frame(2), None, t0 + Duration::from_millis(600), &l);
        // At 1.2 s the first is past its TTL, even before the next append trims it.
        let later = t0 + Duration::from_millis(1_200);
        let r = s.since(Some(at(0, s.epoch())), later, &l);
        assert_eq!(offsets(&r), vec![2]);
        assert!(!r.recovered);
        s.trim(later, &l);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn offsets_from_a_broker_must_follow_on() {
        let l = limits(100, 1 << 20, 60_000);
        let now = Instant::now();
        let mut s = Stream::with_epoch(Epoch(7));
        assert!(s.append_at(1, frame(1), None, now, &l));
        assert!(!s.append_at(1, frame(1), None, now, &l), "a duplicate");
        assert!(!s.append_at(3, frame(3), None, now, &l), "a gap");
        assert!(s.append_at(2, frame(2), None, now, &l));
        assert_eq!(s.last(), 2);
    }

    #[test]
    fn epochs_are_random_and_round_trip() {
        let (a, b) = (Epoch::random(), Epoch::random());
        assert_ne!(a, b);
        assert_eq!(Epoch::parse(&a.to_string()), Some(a));
        assert_eq!(a.to_string().len(), 16);
        for bad in ["", "123", "zzzzzzzzzzzzzzzz", "00000000000000001"] {
            assert_eq!(Epoch::parse(bad), None, "{bad}");
        }
    }

    #[test]
    fn the_node_keeps_its_byte_cap_and_forgets_idle_empty_streams() {
        let history = History::new(HistoryConfig {
            limits: limits(1000, 1 << 20, 1_000),
            max_bytes: 100,
            ..Default::default()
        });
        let t0 = Instant::now();
        for i in 0..50 {
            history.lock("a").append("a", OpCode::Text, &[b'x'; 8], t0);
            let _ = i;
        }
        // 10-byte frames, 100 bytes over the node: the topic growing gave up the oldest.
        assert!(history.bytes() <= 100, "{}", history.bytes());
        assert_eq!(history.lock("a").get("a").map(|s| s.last()), Some(50));
        history.lock("b").append("b", OpCode::Text, b"y", t0);
        assert_eq!(history.topics(), 2);
        // Aged out; "a" still has a subscriber somewhere, "b" has none.
        history.sweep(t0 + Duration::from_secs(2), |t| t == "a");
        assert_eq!(history.topics(), 1);
        assert_eq!(history.bytes(), 0);
        let a = history.lock("a").get("a").map(|s| (s.last(), s.len()));
        assert_eq!(a, Some((50, 0)), "kept, numbering and epoch with it");
    }

    #[test]
    fn an_envelope_is_encoded_once_per_publication() {
        let calls = Arc::new(AtomicUsize::new(0));
        let counted = calls.clone();
        let history = History::new(HistoryConfig {
            envelope: Some(Arc::new(
                move |_t: &str, offset, _op, payload: &[u8], out: &mut Vec<u8>| {
                    counted.fetch_add(1, Ordering::Relaxed);
                    out.extend_from_slice(format!("{offset}:").as_bytes());
                    out.extend_from_slice(payload);
                    OpCode::Text
                },
            )),
            ..Default::default()
        });
        let (_, _, e) = history
            .lock("t")
            .append("t", OpCode::Binary, b"hi", Instant::now());
        assert_eq!(e.offset, 1);
        assert_eq!(&e.envelope.expect("an envelope")[2..], b"1:hi");
        assert_eq!(calls.load(Ordering::Relaxed), 1);
    }
}
