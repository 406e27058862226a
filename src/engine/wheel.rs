//! A hashed timer wheel: one per worker, driven by one repeating tick (a multishot kernel
//! timeout on io_uring, the `epoll_wait` timeout on epoll). No kernel timer per connection.
//!
//! The wheel is intrusive: its buckets are doubly linked lists that run through the
//! worker's slab, each slot holding its own [`Link`] (12 bytes: the two neighbours and
//! the tick it is due at). A slot is on the wheel at most once, at its earliest deadline,
//! and leaves it in O(1) when it is rescheduled earlier, fires, or is freed. The wheel
//! itself is one array of 1,024 list heads, whatever the connection count.
//!
//! It replaced buckets of `(slot, generation, tick)` entries in `Vec`s, which cost an idle
//! connection its 16-byte entry, the buckets' growth by doubling and the stale entries a
//! rescheduled slot left behind: about 20-30 B per idle connection, measured cold
//! (ARCHITECTURE.md, memory per connection), against nothing now beyond the slot's link.
//!
//! Ticks are counted in 64 bits by the wheel and kept in 32 in a link, compared relative
//! to the current tick: a deadline is never scheduled more than [`MAX_AHEAD`] ticks ahead
//! (a further one is checked at that point and scheduled again by its owner), so the 32
//! bits never wrap ambiguously, however long the worker runs.

use std::time::{Duration, Instant};

/// The wheel's resolution.
pub const TICK: Duration = Duration::from_millis(20);
const BUCKETS: usize = 1024;
/// The furthest a slot is scheduled ahead of the current tick (2^30 ticks, about 248
/// days): half the 32-bit range, so a link's tick always reads unambiguously.
pub const MAX_AHEAD: u64 = 1 << 30;

/// No neighbour (the end of a list).
const NIL: u32 = u32::MAX;
/// In `prev`: the first of its bucket's list.
const HEAD: u32 = u32::MAX - 1;
/// In `prev`: not on the wheel.
const OFF: u32 = u32::MAX - 2;

/// The largest slot index the wheel takes (the values above are its markers).
pub const MAX_SLOT: u32 = OFF - 1;

/// A slot's place on the wheel, kept in the slot.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Link {
    next: u32,
    prev: u32,
    /// The low 32 bits of the tick it is due at (while on the wheel).
    tick: u32,
}

impl Link {
    /// Not on the wheel.
    pub const OFF: Link = Link {
        next: NIL,
        prev: OFF,
        tick: 0,
    };

    /// Whether the slot is on the wheel.
    pub fn is_on(&self) -> bool {
        self.prev != OFF
    }
}

impl Default for Link {
    fn default() -> Link {
        Link::OFF
    }
}

/// Where the wheel finds each slot's [`Link`] (the worker's slab). `None` for a slot that
/// does not exist: a list never reaches one, since a slot leaves the wheel before it is
/// freed ([`TimerWheel::remove`]).
pub trait Links {
    /// The link of `slot`.
    fn link(&mut self, slot: u32) -> Option<&mut Link>;
}

/// The wheel.
pub struct TimerWheel {
    start: Instant,
    /// The first slot of each bucket's list (`NIL`: empty).
    heads: Box<[u32]>,
    /// The next tick not yet expired.
    current: u64,
}

impl TimerWheel {
    /// A wheel whose tick 0 is `start`.
    pub fn new(start: Instant) -> TimerWheel {
        TimerWheel {
            start,
            heads: vec![NIL; BUCKETS].into_boxed_slice(),
            current: 0,
        }
    }

    /// The tick at or after `at` (deadlines never fire early).
    pub fn tick_of(&self, at: Instant) -> u64 {
        let d = at.saturating_duration_since(self.start);
        let t = d.as_nanos().div_ceil(TICK.as_nanos());
        u64::try_from(t).unwrap_or(u64::MAX).max(self.current)
    }

    /// The next tick not yet expired.
    pub fn current(&self) -> u64 {
        self.current
    }

    /// The tick a slot on the wheel is due at: the whole tick its link's 32 bits stand
    /// for (within [`MAX_AHEAD`] of the current one).
    pub fn due_of(&self, link: &Link) -> u64 {
        let ahead = link.tick.wrapping_sub(self.current as u32) as i32;
        self.current.saturating_add_signed(i64::from(ahead))
    }

    /// The tick `slot` is due at, if it is on the wheel.
    pub fn due<L: Links>(&self, links: &mut L, slot: u32) -> Option<u64> {
        let link = links.link(slot)?;
        link.is_on().then(|| self.due_of(link))
    }

    /// Puts `slot` on the wheel at `tick`, unless it is on it already at that tick or an
    /// earlier one (a slot is on the wheel once, at its earliest deadline).
    pub fn schedule<L: Links>(&mut self, links: &mut L, slot: u32, tick: u64) {
        debug_assert!(slot <= MAX_SLOT);
        let tick = tick.clamp(self.current, self.current + MAX_AHEAD);
        match self.due(links, slot) {
            Some(due) if due <= tick => return,
            Some(_) => self.remove(links, slot),
            None => {}
        }
        let b = (tick % BUCKETS as u64) as usize;
        let Some(head) = self.heads.get_mut(b) else {
            return;
        };
        let next = *head;
        *head = slot;
        if let Some(link) = links.link(slot) {
            *link = Link {
                next,
                prev: HEAD,
                tick: tick as u32,
            };
        }
        if let Some(n) = links.link(next) {
            n.prev = slot;
        }
    }

    /// Takes `slot` off the wheel (a no-op if it is not on it). Called before a slot is
    /// freed: the lists run through the slab.
    pub fn remove<L: Links>(&mut self, links: &mut L, slot: u32) {
        let Some(link) = links.link(slot) else {
            return;
        };
        if !link.is_on() {
            return;
        }
        let Link { next, prev, tick } = *link;
        *link = Link::OFF;
        if prev == HEAD {
            // 2^32 is a multiple of BUCKETS: the low bits name the bucket.
            if let Some(head) = self.heads.get_mut(tick as usize % BUCKETS) {
                *head = next;
            }
        } else if let Some(p) = links.link(prev) {
            p.next = next;
        }
        if let Some(n) = links.link(next) {
            n.prev = prev;
        }
    }

    /// Takes every slot due at or before `now` off the wheel, into `out`.
    pub fn expire<L: Links>(&mut self, links: &mut L, now: Instant, out: &mut Vec<u32>) {
        let now_tick =
            u64::try_from(now.saturating_duration_since(self.start).as_nanos() / TICK.as_nanos())
                .unwrap_or(u64::MAX);
        // Never walk more than one full turn: beyond that every bucket has been seen.
        let end = now_tick.min(self.current + BUCKETS as u64);
        while self.current <= end {
            let b = (self.current % BUCKETS as u64) as usize;
            let mut at = self.heads.get(b).copied().unwrap_or(NIL);
            while at != NIL {
                let Some(link) = links.link(at) else {
                    debug_assert!(false, "slot {at} on the wheel but not in the slab");
                    break;
                };
                let (next, due) = (link.next, self.due_of(link));
                if due <= now_tick {
                    self.remove(links, at);
                    out.push(at);
                }
                at = next;
            }
            self.current += 1;
        }
        self.current = self.current.max(now_tick);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A slab stand-in: one link per slot.
    struct Slots(Vec<Option<Link>>);

    impl Links for Slots {
        fn link(&mut self, slot: u32) -> Option<&mut Link> {
            self.0.get_mut(slot as usize)?.as_mut()
        }
    }

    fn slots(n: usize) -> Slots {
        Slots(vec![Some(Link::OFF); n])
    }

    fn expired(w: &mut TimerWheel, s: &mut Slots, at: Instant) -> Vec<u32> {
        let mut out = Vec::new();
        w.expire(s, at, &mut out);
        out.sort_unstable();
        out
    }

    #[test]
    fn fires_at_or_after_the_deadline_and_far_entries_wait() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0);
        let mut s = slots(3);
        let near = w.tick_of(t0 + Duration::from_millis(50));
        let far = w.tick_of(t0 + TICK * (BUCKETS as u32 + 10));
        w.schedule(&mut s, 1, near);
        w.schedule(&mut s, 2, far);
        assert!(expired(&mut w, &mut s, t0 + Duration::from_millis(30)).is_empty());
        assert_eq!(expired(&mut w, &mut s, t0 + Duration::from_millis(60)), [1]);
        assert!(!s.0[1].unwrap().is_on(), "off the wheel once fired");
        assert!(
            expired(&mut w, &mut s, t0 + TICK * (BUCKETS as u32)).is_empty(),
            "the far entry shares a bucket but is not due"
        );
        assert_eq!(
            expired(&mut w, &mut s, t0 + TICK * (BUCKETS as u32 + 11)),
            [2]
        );
    }

    #[test]
    fn a_slot_is_on_the_wheel_once_at_its_earliest_deadline() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0);
        let mut s = slots(4);
        w.schedule(&mut s, 0, 50);
        w.schedule(&mut s, 0, 80); // later: stays at 50
        assert_eq!(w.due(&mut s, 0), Some(50));
        w.schedule(&mut s, 0, 10); // earlier: moves
        assert_eq!(w.due(&mut s, 0), Some(10));
        // Neighbours in one bucket (10, 10 + BUCKETS, 10 + 2 BUCKETS): removing the
        // middle and the head keeps the rest reachable.
        w.schedule(&mut s, 1, 10 + BUCKETS as u64);
        w.schedule(&mut s, 2, 10 + 2 * BUCKETS as u64);
        w.schedule(&mut s, 3, 10);
        w.remove(&mut s, 1);
        w.remove(&mut s, 3);
        assert_eq!(w.due(&mut s, 1), None);
        let at = |t: u64| t0 + TICK * t as u32;
        assert_eq!(expired(&mut w, &mut s, at(10)), [0]);
        assert!(expired(&mut w, &mut s, at(10 + BUCKETS as u64)).is_empty());
        assert_eq!(expired(&mut w, &mut s, at(10 + 2 * BUCKETS as u64)), [2]);
        for slot in 0..4 {
            assert_eq!(w.due(&mut s, slot), None, "slot {slot}");
        }
    }

    #[test]
    fn far_deadlines_are_clamped_and_ticks_read_past_32_bits() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0);
        let mut s = slots(2);
        // A worker that has run for longer than 2^32 ticks (about 2.7 years).
        w.current = (1 << 32) + 5;
        w.schedule(&mut s, 0, u64::MAX);
        assert_eq!(w.due(&mut s, 0), Some(w.current + MAX_AHEAD));
        let soon = w.current + 3;
        w.schedule(&mut s, 1, soon);
        assert_eq!(w.due(&mut s, 1), Some(soon));
        let now = t0 + Duration::from_nanos(TICK.as_nanos() as u64 * soon);
        assert_eq!(expired(&mut w, &mut s, now), [1]);
        assert_eq!(w.due(&mut s, 0), Some((1 << 32) + 5 + MAX_AHEAD));
    }
}
