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
//! This module is only the data structure; who assigns offsets (one place per topic, so
//! they are the same for every subscriber) and how a replay is merged with live delivery
//! is the engine's business.

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use bytes::Bytes;

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

/// One publication kept in the ring.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Its offset in the stream's epoch.
    pub offset: u64,
    /// Its encoded frame(s), as delivered.
    pub frame: Bytes,
    at: Instant,
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
}

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

    /// Appends a publication, returning its offset (one more than the last), and drops
    /// what the limits no longer allow.
    pub fn append(&mut self, frame: Bytes, now: Instant, limits: &Limits) -> u64 {
        self.last += 1;
        self.bytes += frame.len();
        self.entries.push_back(Entry {
            offset: self.last,
            frame,
            at: now,
        });
        self.trim(now, limits);
        self.last
    }

    /// Appends a publication whose offset was assigned elsewhere (a broker): it must be
    /// the next one. `false` (nothing kept) if it is not: the caller has a gap to repair
    /// or a duplicate to skip.
    pub fn append_at(&mut self, offset: u64, frame: Bytes, now: Instant, limits: &Limits) -> bool {
        if offset != self.last + 1 {
            return false;
        }
        self.append(frame, now, limits);
        true
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
            self.bytes -= front.frame.len();
            self.entries.pop_front();
        }
    }

    /// What a subscriber resuming from `since` (its last offset and the epoch it was in;
    /// `None`: a first subscription) gets now.
    pub fn since(&self, since: Option<(u64, Epoch)>, now: Instant, limits: &Limits) -> Replay {
        let mut replay = Replay {
            epoch: self.epoch,
            last: self.last,
            entries: Vec::new(),
            recovered: false,
        };
        let Some((offset, epoch)) = since else {
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
        replay.recovered = first == offset + 1;
        replay
    }
}

impl Default for Stream {
    fn default() -> Stream {
        Stream::new()
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
            assert_eq!(s.append(frame(want), now, &l), want);
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
            s.append(frame(i), now, &l);
        }
        let r = s.since(Some((4, s.epoch())), now, &l);
        assert_eq!(offsets(&r), (5..=10).collect::<Vec<_>>());
        assert!(r.recovered);
        assert_eq!((r.last, r.epoch), (10, s.epoch()));
        assert_eq!(
            r.entries[0].frame,
            frame(5),
            "the kept frame, not a new one"
        );
        // Up to date: nothing to replay, and that is a full recovery.
        let r = s.since(Some((10, s.epoch())), now, &l);
        assert!(r.entries.is_empty() && r.recovered);
        // From the start of the epoch.
        let r = s.since(Some((0, s.epoch())), now, &l);
        assert_eq!(r.entries.len(), 10);
        assert!(r.recovered);
    }

    #[test]
    fn a_first_subscription_learns_the_position_and_gets_nothing() {
        let l = limits(100, 1 << 20, 60_000);
        let mut s = Stream::new();
        let now = Instant::now();
        s.append(frame(1), now, &l);
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
            s.append(frame(i), now, &l);
        }
        let other = Epoch(s.epoch().0 ^ 1);
        let r = s.since(Some((2, other)), now, &l);
        assert!(!r.recovered && r.entries.is_empty());
        let r = s.since(Some((9, s.epoch())), now, &l);
        assert!(!r.recovered && r.entries.is_empty());
    }

    #[test]
    fn trimmed_history_is_replayed_as_far_as_kept_and_not_recovered() {
        let now = Instant::now();
        // By count.
        let l = limits(3, 1 << 20, 60_000);
        let mut s = Stream::new();
        for i in 1..=10 {
            s.append(frame(i), now, &l);
        }
        let r = s.since(Some((5, s.epoch())), now, &l);
        assert_eq!(offsets(&r), vec![8, 9, 10]);
        assert!(!r.recovered);
        let r = s.since(Some((7, s.epoch())), now, &l);
        assert_eq!(offsets(&r), vec![8, 9, 10]);
        assert!(
            r.recovered,
            "7 is the last trimmed: nothing after it is missing"
        );
        // By bytes: each frame is 2 bytes; 8 bytes keep the last four.
        let l = limits(100, 8, 60_000);
        let mut s = Stream::new();
        for i in 1..=9 {
            s.append(frame(i), now, &l);
        }
        assert!(s.bytes() <= 8);
        assert_eq!(s.entries.front().map(|e| e.offset), Some(6));
        // One frame over the byte limit is still kept (the newest always is).
        s.append(Bytes::from(vec![0u8; 100]), now, &l);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn old_publications_age_out() {
        let l = limits(100, 1 << 20, 1_000);
        let t0 = Instant::now();
        let mut s = Stream::new();
        s.append(frame(1), t0, &l);
        s.append(frame(2), t0 + Duration::from_millis(600), &l);
        // At 1.2 s the first is past its TTL, even before the next append trims it.
        let at = t0 + Duration::from_millis(1_200);
        let r = s.since(Some((0, s.epoch())), at, &l);
        assert_eq!(offsets(&r), vec![2]);
        assert!(!r.recovered);
        s.trim(at, &l);
        assert_eq!(s.len(), 1);
    }

    #[test]
    fn offsets_from_a_broker_must_follow_on() {
        let l = limits(100, 1 << 20, 60_000);
        let now = Instant::now();
        let mut s = Stream::with_epoch(Epoch(7));
        assert!(s.append_at(1, frame(1), now, &l));
        assert!(!s.append_at(1, frame(1), now, &l), "a duplicate");
        assert!(!s.append_at(3, frame(3), now, &l), "a gap");
        assert!(s.append_at(2, frame(2), now, &l));
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
}
