//! A hashed timer wheel: one per worker, driven by one repeating tick (a multishot kernel
//! timeout on io_uring, the `epoll_wait` timeout on epoll). No kernel timer per connection.
//!
//! Entries are `(slot, generation, tick)`. The wheel never removes entries: a connection
//! whose deadline moved simply schedules again, and the owner ignores stale entries (a
//! generation that no longer matches, or a tick that is not the slot's current one). A
//! connection schedules at most one entry earlier than its current one, so stale entries
//! stay bounded by the connection count.

use std::time::{Duration, Instant};

/// The wheel's resolution.
pub const TICK: Duration = Duration::from_millis(20);
const BUCKETS: usize = 1024;

/// One scheduled check.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Entry {
    /// Slab slot.
    pub slot: u32,
    /// Generation of the slot when scheduled.
    pub generation: u32,
    /// The tick it is due at.
    pub tick: u64,
}

/// The wheel.
pub struct TimerWheel {
    start: Instant,
    buckets: Vec<Vec<Entry>>,
    /// The next tick not yet expired.
    current: u64,
}

impl TimerWheel {
    /// A wheel whose tick 0 is `start`.
    pub fn new(start: Instant) -> TimerWheel {
        TimerWheel {
            start,
            buckets: (0..BUCKETS).map(|_| Vec::new()).collect(),
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

    /// Schedules a check of `slot` at `tick`.
    pub fn schedule(&mut self, slot: u32, generation: u32, tick: u64) {
        let b = (tick % BUCKETS as u64) as usize;
        if let Some(bucket) = self.buckets.get_mut(b) {
            bucket.push(Entry {
                slot,
                generation,
                tick,
            });
        }
    }

    /// Moves every entry due at or before `now` into `out`.
    pub fn expire(&mut self, now: Instant, out: &mut Vec<Entry>) {
        let now_tick =
            u64::try_from(now.saturating_duration_since(self.start).as_nanos() / TICK.as_nanos())
                .unwrap_or(u64::MAX);
        // Never walk more than one full turn: beyond that every bucket has been seen.
        let end = now_tick.min(self.current + BUCKETS as u64);
        while self.current <= end {
            let b = (self.current % BUCKETS as u64) as usize;
            if let Some(bucket) = self.buckets.get_mut(b) {
                let mut i = 0;
                while i < bucket.len() {
                    if bucket.get(i).is_some_and(|e| e.tick <= now_tick) {
                        out.push(bucket.swap_remove(i));
                    } else {
                        i += 1;
                    }
                }
                if bucket.is_empty() && bucket.capacity() > 64 {
                    bucket.shrink_to(64);
                }
            }
            self.current += 1;
        }
        self.current = self.current.max(now_tick);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fires_at_or_after_the_deadline_and_far_entries_wait() {
        let t0 = Instant::now();
        let mut w = TimerWheel::new(t0);
        let near = w.tick_of(t0 + Duration::from_millis(50));
        let far = w.tick_of(t0 + TICK * (BUCKETS as u32 + 10));
        w.schedule(1, 0, near);
        w.schedule(2, 0, far);
        let mut out = Vec::new();
        w.expire(t0 + Duration::from_millis(30), &mut out);
        assert!(out.is_empty());
        w.expire(t0 + Duration::from_millis(60), &mut out);
        assert_eq!(out.iter().map(|e| e.slot).collect::<Vec<_>>(), vec![1]);
        out.clear();
        w.expire(t0 + TICK * (BUCKETS as u32), &mut out);
        assert!(
            out.is_empty(),
            "the far entry shares a bucket but is not due"
        );
        w.expire(t0 + TICK * (BUCKETS as u32 + 11), &mut out);
        assert_eq!(out.iter().map(|e| e.slot).collect::<Vec<_>>(), vec![2]);
    }
}
