//! Per-worker counters: written only by their worker, summed on read (`/metrics`).

use super::*;

/// Per-worker counters; written only by their worker (relaxed), summed on read.
#[derive(Debug, Default)]
pub struct WorkerStats {
    /// Sockets accepted.
    pub accepted: AtomicU64,
    /// Upgrades completed.
    pub upgraded: AtomicU64,
    /// Handshakes refused with an HTTP error.
    pub rejected: AtomicU64,
    /// Upgrades refused because the server was full (503).
    pub rejected_full: AtomicU64,
    /// Plain HTTP requests answered.
    pub http_requests: AtomicU64,
    /// Sockets closed.
    pub closed: AtomicU64,
    /// Messages received.
    pub messages_in: AtomicU64,
    /// Messages sent (echoes and pub/sub deliveries).
    pub messages_out: AtomicU64,
    /// Bytes read.
    pub bytes_in: AtomicU64,
    /// Bytes written.
    pub bytes_out: AtomicU64,
    /// Publishes made on this worker (handlers and `Handle`).
    pub publishes: AtomicU64,
    /// Frames dropped by the drop policy.
    pub dropped: AtomicU64,
    /// Frames conflated (replaced by a newer one of their topic).
    pub conflated: AtomicU64,
    /// Connections closed (1013) by the close policy.
    pub backpressure_closes: AtomicU64,
    /// Connections failed for a protocol error.
    pub protocol_errors: AtomicU64,
    /// Write operations issued (one per connection per loop turn in the common case:
    /// `messages_out / sends` is how many frames a write carried on average).
    pub sends: AtomicU64,
    /// Event-loop turns (wake-ups that handled completions or readiness).
    pub turns: AtomicU64,
    /// Times a connection stopped being read because the reassembly budget was spent.
    pub reassembly_pauses: AtomicU64,
    /// Times a connection stopped being read because its send queue passed the hard
    /// limit (it resumes once the queue is back under the soft limit).
    pub queue_pauses: AtomicU64,
    /// Connections dropped because their queued bytes made no progress for the send
    /// timeout.
    pub send_timeouts: AtomicU64,
    /// Connections closed (1008) because a message was not complete within the message
    /// timeout.
    pub message_timeouts: AtomicU64,
    /// Cross-worker publishes not handed to a worker because its inbox was full (a
    /// handler publishing faster than that worker fans out).
    pub forward_dropped: AtomicU64,
    /// Subscriptions to a topic with history that asked to resume from a position.
    pub history_resumes: AtomicU64,
    /// Of those, how many got every publication they missed.
    pub history_recovered: AtomicU64,
    /// Publications replayed to resuming subscribers.
    pub history_replayed: AtomicU64,
    /// Publications a worker missed in its inbox (it was full) and took from the ring.
    pub history_repaired: AtomicU64,
    /// Publications a worker missed and could not repair (no longer kept): its
    /// subscribers see a gap in the offsets.
    pub history_lost: AtomicU64,
    /// Upgrades whose decision `on_upgrade` deferred.
    pub deferred: AtomicU64,
    /// Commands from a [`Handle`](crate::engine::Handle) (send, subscribe, unsubscribe)
    /// (or a deferred upgrade's decision)
    /// for a connection this worker no longer holds (a stale id: closed, its slot maybe
    /// reused) or that is closing: nothing was done.
    pub handle_misses: AtomicU64,
    /// Sockets refused at accept because the server held its socket limit.
    pub refused_sockets: AtomicU64,
    /// Failed accepts (EMFILE, ENFILE, ENOBUFS...).
    pub accept_errors: AtomicU64,
    /// Close codes sent, by code (1000..=1015 at index code-1000; others at 16).
    pub close_codes_sent: [AtomicU64; 17],
    /// Close codes received, indexed the same way.
    pub close_codes_received: [AtomicU64; 17],
}

/// Adds to a counter that only its own worker writes: a plain load and store (no locked
/// read-modify-write on the hot path); readers on other threads see a recent value.
pub(crate) trait Bump {
    fn bump(&self, n: u64);
}

impl Bump for AtomicU64 {
    #[inline]
    fn bump(&self, n: u64) {
        self.store(
            self.load(Ordering::Relaxed).wrapping_add(n),
            Ordering::Relaxed,
        );
    }
}

fn code_index(code: u16) -> usize {
    match code {
        1000..=1015 => usize::from(code - 1000),
        _ => 16,
    }
}

impl WorkerStats {
    pub(crate) fn close_sent(&self, code: u16) {
        self.close_codes_sent[code_index(code)].bump(1);
    }

    pub(crate) fn close_received(&self, code: u16) {
        self.close_codes_received[code_index(code)].bump(1);
    }
}
