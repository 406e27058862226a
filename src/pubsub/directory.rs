//! Which workers have subscribers of which topic: written when a worker's local
//! subscriber count of a topic changes, read by every publish that may cross workers (so
//! that a frame is encoded and handed over only to workers that need it).

use std::collections::HashMap;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

/// Topic -> subscribers per worker, over all workers. Written when a worker's local
/// subscriber count of a topic changes; read by every publish that may cross workers.
#[derive(Default)]
pub struct Directory {
    map: RwLock<HashMap<Arc<str>, Box<[AtomicUsize]>>>,
    workers: usize,
}

impl Directory {
    /// A directory for `workers` workers (at most 64: the answers are bitmasks).
    pub fn new(workers: usize) -> Directory {
        Directory {
            map: RwLock::new(HashMap::new()),
            workers,
        }
    }

    /// Records that `worker` has `n` subscribers of `topic`; forgets topics nobody has.
    pub fn set(&self, topic: &str, worker: usize, n: usize) {
        if let Ok(map) = self.map.read()
            && let Some(counts) = map.get(topic)
        {
            counts[worker].store(n, Ordering::Release);
            if n > 0 {
                return;
            }
        }
        let Ok(mut map) = self.map.write() else {
            return;
        };
        if n > 0 {
            let counts = map
                .entry(Arc::from(topic))
                .or_insert_with(|| (0..self.workers).map(|_| AtomicUsize::new(0)).collect());
            counts[worker].store(n, Ordering::Release);
        } else if map
            .get(topic)
            .is_some_and(|c| c.iter().all(|x| x.load(Ordering::Acquire) == 0))
        {
            map.remove(topic);
        }
    }

    /// Bitmask of the workers with subscribers of `topic`, except `except`.
    pub fn workers_with(&self, topic: &str, except: Option<usize>) -> u64 {
        let Ok(map) = self.map.read() else { return 0 };
        let Some(counts) = map.get(topic) else {
            return 0;
        };
        let mut mask = 0u64;
        for (i, c) in counts.iter().enumerate() {
            if Some(i) != except && c.load(Ordering::Acquire) > 0 {
                mask |= 1 << i;
            }
        }
        mask
    }

    /// Subscribers of `topic` over all workers.
    pub fn count(&self, topic: &str) -> usize {
        let Ok(map) = self.map.read() else { return 0 };
        map.get(topic)
            .map_or(0, |c| c.iter().map(|x| x.load(Ordering::Acquire)).sum())
    }

    /// Topics with at least one subscriber.
    pub fn topics(&self) -> usize {
        self.map.read().map_or(0, |m| m.len())
    }
}
