//! The backplane's broker clients: what joins several wsring nodes into one pub/sub space.
//!
//! A node publishes every message it gets to the broker once (beside delivering it to its
//! own subscribers at once, without a round trip), and subscribes on the broker to a topic
//! only while it has local subscribers of it. A message from the broker is encoded once per
//! node and fanned out like a local publish. The engine reaches a broker only through the
//! [`Broker`] trait, whose methods never block (they hand work to the client's own thread),
//! and the client reaches the engine only through the [`Sink`] it is given.
//!
//! On the wire every message carries a small binary header ([`wire`]): a version byte, the
//! WebSocket opcode, and the origin node's id, so that a node drops its own messages when
//! the broker echoes them back.
//!
//! Implementations: [`redis`] (Redis pub/sub, several instances by a stable hash of the
//! topic) and [`nats`] (core NATS subjects), each behind the cargo feature of that name;
//! [`memory`] joins nodes inside one process (tests, several servers in one program).

pub mod memory;
#[cfg(feature = "nats")]
pub mod nats;
#[cfg(feature = "redis")]
pub mod redis;
pub mod wire;

use std::sync::Arc;
use std::sync::atomic::{AtomicU8, AtomicU64, Ordering};
use std::time::Duration;

use bytes::Bytes;

use crate::proto::OpCode;

/// A node's id in the broker payload (random at start unless configured).
pub type NodeId = u64;

/// A fresh random node id (no crate needed: the std hasher's keys are random per process).
pub fn random_node_id() -> NodeId {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    );
    h.write_u32(std::process::id());
    h.finish()
}

/// One message another node published, as the broker client hands it to the engine.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Incoming {
    /// The topic (the broker's channel or subject name, decoded).
    pub topic: Arc<str>,
    /// Text or binary.
    pub opcode: OpCode,
    /// The message as published.
    pub payload: Bytes,
    /// For a publication to a topic with history that the broker numbered: its epoch and
    /// offset (the same on every node).
    pub number: Option<(crate::pubsub::history::Epoch, u64)>,
}

/// A topic's stream as a broker keeps it ([`Broker::load`]): its epoch, the last offset
/// it gave out, and the publications it still keeps, oldest first.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Loaded {
    /// The topic.
    pub topic: Arc<str>,
    /// The stream's epoch.
    pub epoch: crate::pubsub::history::Epoch,
    /// The last offset given out (0: none yet).
    pub last: u64,
    /// `(offset, opcode, payload)` of each publication kept, oldest first.
    pub entries: Vec<(u64, OpCode, Bytes)>,
}

/// Where a broker client delivers what other nodes published. The engine implements it
/// (encode once, hand to every worker with subscribers of the topic).
pub trait Sink: Send + Sync + 'static {
    /// Messages from other nodes, never this node's own, in the order the broker delivered
    /// them. Called on the broker client's thread; must not block for long.
    fn deliver(&self, batch: &[Incoming]);

    /// A topic's stream, loaded because [`Broker::load`] asked for it (after the node
    /// subscribed, so nothing published since is missing from it and what it delivers).
    fn loaded(&self, stream: Loaded) {
        let _ = stream;
    }
}

/// A broker client. Every method but [`Broker::start`] and [`Broker::stop`] returns at
/// once: the work is handed to the client's own thread(s), which do all network I/O.
pub trait Broker: Send + Sync + 'static {
    /// Starts the client's thread(s), which connect (and reconnect, with capped exponential
    /// backoff and jitter) and deliver what other nodes publish to `sink`. Called once,
    /// before any other method. An unreachable broker is not an error here: the node serves
    /// locally and the client keeps trying.
    ///
    /// # Errors
    /// If a thread cannot be started.
    fn start(&self, node: NodeId, sink: Arc<dyn Sink>) -> std::io::Result<()>;

    /// Subscribes this node to `topic` (kept across reconnects until
    /// [`Broker::unsubscribe`]). Idempotent.
    fn subscribe(&self, topic: &str);

    /// Unsubscribes this node from `topic`. Idempotent.
    fn unsubscribe(&self, topic: &str);

    /// Publishes one message for the other nodes. `false` if it could not even be queued
    /// for sending (the client's outgoing queue is full); counted in
    /// [`BrokerStats::out_failed`] either way, as is a message lost on a broken connection.
    fn publish(&self, topic: &str, opcode: OpCode, payload: &[u8]) -> bool;

    /// Whether this broker numbers publications to topics with history
    /// ([`Broker::publish_numbered`], [`Broker::load`]), so that offsets and epochs are
    /// the same on every node. Without, each node numbers its own.
    fn numbers(&self) -> bool {
        false
    }

    /// Publishes a message to a topic with history, for the broker to number (offset and
    /// epoch), keep (within `limits`) and deliver to every node, this one included.
    /// `false` as [`Broker::publish`].
    fn publish_numbered(
        &self,
        topic: &str,
        opcode: OpCode,
        payload: &[u8],
        limits: &crate::pubsub::history::Limits,
    ) -> bool {
        let _ = limits;
        self.publish(topic, opcode, payload)
    }

    /// Asks for `topic`'s stream as the broker keeps it (kept within `limits`), delivered
    /// to [`Sink::loaded`] once read, after what this node subscribed before (and again
    /// after every reconnect, while subscribed).
    fn load(&self, topic: &str, limits: &crate::pubsub::history::Limits) {
        let _ = (topic, limits);
    }

    /// The client's counters and state.
    fn stats(&self) -> &BrokerStats;

    /// What it connects to, for logs and `/metrics` (e.g. `redis 127.0.0.1:6379 (2 shards)`).
    fn describe(&self) -> String;

    /// Stops the client's threads and waits for them (bounded: at most about a second).
    fn stop(&self);
}

/// Where a broker client stands with its broker.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum BrokerState {
    /// Not connected yet, or reconnecting.
    Connecting = 0,
    /// Connected and subscribed (every shard, for a sharded broker).
    Up = 1,
    /// Connected to some shards only.
    Degraded = 2,
    /// Stopped.
    Stopped = 3,
}

/// A broker client's counters, read by `/metrics`. Written by the client's thread (and
/// `out_failed` / `in_dropped` by whoever found the queue full).
#[derive(Debug, Default)]
pub struct BrokerStats {
    /// A [`BrokerState`] as its number.
    pub state: AtomicU8,
    /// Connections (re)established after the first one.
    pub reconnects: AtomicU64,
    /// Messages received from other nodes and handed to the sink.
    pub messages_in: AtomicU64,
    /// Messages published to the broker.
    pub messages_out: AtomicU64,
    /// Messages that could not be published (queue full, connection lost before the
    /// broker took them).
    pub out_failed: AtomicU64,
    /// Messages from the broker that the engine could not hand to a worker (its inbox
    /// was full).
    pub in_dropped: AtomicU64,
    /// This node's own messages echoed back by the broker and skipped.
    pub own_skipped: AtomicU64,
    /// Payloads without a valid header (another program publishing on our channels).
    pub decode_errors: AtomicU64,
    /// Idle probes that did not come back in time (the subscription was then rebuilt).
    pub probes_failed: AtomicU64,
    /// Topics this node is subscribed to on the broker now: 0 while it is disconnected
    /// (the client restores them when it is back).
    pub topics: AtomicU64,
    /// How long the last resubscription after a reconnect took, in microseconds.
    pub resubscribe_micros: AtomicU64,
}

impl BrokerStats {
    /// The state now.
    pub fn state(&self) -> BrokerState {
        match self.state.load(Ordering::Acquire) {
            1 => BrokerState::Up,
            2 => BrokerState::Degraded,
            3 => BrokerState::Stopped,
            _ => BrokerState::Connecting,
        }
    }

    /// Sets the state.
    pub fn set_state(&self, state: BrokerState) {
        self.state.store(state as u8, Ordering::Release);
    }
}

/// A request from the engine to a client's thread (shared by the Redis and NATS clients).
#[cfg(any(feature = "redis", feature = "nats"))]
#[derive(Debug)]
enum Cmd {
    Subscribe(Arc<str>),
    Unsubscribe(Arc<str>),
    /// Read this topic's stream (Redis only) and hand it to `Sink::loaded`; the stream's
    /// keys live this many milliseconds.
    #[cfg_attr(not(feature = "redis"), allow(dead_code))]
    Load(Arc<str>, u64),
}

/// A broker client's thread (shared by the Redis and NATS clients): built, holding the
/// queues its thread will take; running, on a current-thread tokio runtime, told to stop
/// through a watch channel; or done.
#[cfg(any(feature = "redis", feature = "nats"))]
struct ClientThread<Q> {
    life: std::sync::Mutex<Life<Q>>,
    /// The client's name, for messages.
    what: &'static str,
}

#[cfg(any(feature = "redis", feature = "nats"))]
enum Life<Q> {
    Idle(Q),
    Running {
        thread: std::thread::JoinHandle<()>,
        stop: tokio::sync::watch::Sender<bool>,
    },
    Done,
}

#[cfg(any(feature = "redis", feature = "nats"))]
impl<Q> ClientThread<Q> {
    fn new(what: &'static str, queues: Q) -> ClientThread<Q> {
        ClientThread {
            life: std::sync::Mutex::new(Life::Idle(queues)),
            what,
        }
    }

    fn life(&self) -> std::sync::MutexGuard<'_, Life<Q>> {
        self.life
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts the thread, once: `build` makes its work from the queues and the stop
    /// signal (here), `run` turns that into the future the thread runs (there).
    ///
    /// # Errors
    /// Started before, or the runtime or the thread could not be made.
    fn start<T, F>(
        &self,
        build: impl FnOnce(Q, tokio::sync::watch::Receiver<bool>) -> T,
        run: impl FnOnce(T) -> F + Send + 'static,
    ) -> std::io::Result<()>
    where
        T: Send + 'static,
        F: std::future::Future,
    {
        let mut life = self.life();
        let queues = match std::mem::replace(&mut *life, Life::Done) {
            Life::Idle(q) => q,
            other => {
                *life = other;
                return Err(std::io::Error::other(format!(
                    "the {} client was already started",
                    self.what
                )));
            }
        };
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()?;
        let (stop, stopped) = tokio::sync::watch::channel(false);
        let work = build(queues, stopped);
        let thread = std::thread::Builder::new()
            .name("wsring-broker".to_owned())
            .spawn(move || {
                let _ = runtime.block_on(run(work));
                runtime.shutdown_timeout(Duration::from_millis(100));
            })?;
        *life = Life::Running { thread, stop };
        Ok(())
    }

    /// Tells the thread to stop and joins it if it ends within a second; otherwise leaves
    /// it detached (it ends at its next await point, having been told to stop).
    fn stop(&self) {
        let mut life = self.life();
        if let Life::Running { thread, stop } = std::mem::replace(&mut *life, Life::Done) {
            let _ = stop.send(true);
            let bound = Duration::from_secs(1);
            let deadline = std::time::Instant::now() + bound;
            while !thread.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(Duration::from_millis(2));
            }
            if thread.is_finished() {
                let _ = thread.join();
            } else {
                tracing::warn!(
                    "{} broker thread did not stop within {bound:?}; detached",
                    self.what
                );
            }
        }
    }
}

/// Capped exponential backoff with full jitter, for reconnecting.
#[derive(Clone, Debug)]
pub struct Backoff {
    base: Duration,
    max: Duration,
    attempt: u32,
    seed: u64,
}

impl Backoff {
    /// Starts at `base`, doubles per attempt up to `max`.
    pub fn new(base: Duration, max: Duration) -> Backoff {
        Backoff {
            base,
            max,
            attempt: 0,
            seed: random_node_id() | 1,
        }
    }

    /// The wait before the next attempt: uniform in [ceiling/2, ceiling], where the ceiling
    /// doubles per attempt from `base` up to `max`.
    pub fn next_delay(&mut self) -> Duration {
        let ceiling = self
            .base
            .saturating_mul(1u32 << self.attempt.min(20))
            .min(self.max);
        self.attempt = self.attempt.saturating_add(1);
        // xorshift64: jitter only, not security.
        self.seed ^= self.seed << 13;
        self.seed ^= self.seed >> 7;
        self.seed ^= self.seed << 17;
        let half = ceiling / 2;
        let nanos = half.as_nanos() as u64;
        half + Duration::from_nanos(if nanos == 0 {
            0
        } else {
            self.seed % (nanos + 1)
        })
    }

    /// After a success: the next failure waits `base` again.
    pub fn reset(&mut self) {
        self.attempt = 0;
    }
}

/// A topic's shard among `n` (a stable hash: FNV-1a of the name, the same on every node
/// and every run).
pub fn shard_of(topic: &str, n: usize) -> usize {
    if n <= 1 {
        return 0;
    }
    let mut h: u64 = 0xcbf2_9ce4_8422_2325;
    for b in topic.as_bytes() {
        h ^= u64::from(*b);
        h = h.wrapping_mul(0x0100_0000_01b3);
    }
    (h % n as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn backoff_doubles_up_to_its_cap_with_jitter_and_resets() {
        let mut b = Backoff::new(Duration::from_millis(100), Duration::from_secs(2));
        let d: Vec<Duration> = (0..8).map(|_| b.next_delay()).collect();
        assert!(d[0] >= Duration::from_millis(50) && d[0] <= Duration::from_millis(100));
        assert!(d[3] >= Duration::from_millis(400) && d[3] <= Duration::from_millis(800));
        for x in &d[5..] {
            assert!(
                *x >= Duration::from_secs(1) && *x <= Duration::from_secs(2),
                "{x:?}"
            );
        }
        b.reset();
        assert!(b.next_delay() <= Duration::from_millis(100));
    }

    #[test]
    fn shards_are_stable_and_spread() {
        assert_eq!(shard_of("a", 1), 0);
        assert_eq!(shard_of("ticker", 3), shard_of("ticker", 3));
        let mut seen = [0usize; 4];
        for i in 0..400 {
            seen[shard_of(&format!("topic-{i}"), 4)] += 1;
        }
        assert!(seen.iter().all(|&n| n > 50), "{seen:?}");
    }
}
