//! The engine: thread per core, one `SO_REUSEPORT` listener and one reactor per worker.
//!
//! [`Server::start`] binds a listener per worker (the first resolves port 0, the others
//! join its port), decides the backend once (io_uring if the probe says it has every
//! operation we use, else epoll, with the reason logged), and starts the workers. Each
//! worker is pinned to a CPU and owns its connections, its timer wheel and its topic
//! registry; nothing on the data path is shared or locked. Workers reach each other only
//! through a per-worker inbox (a mutex-guarded batch plus one coalesced eventfd wake-up):
//! a pub/sub frame published on one worker is handed once to every other worker, which
//! fans it out to its own subscribers.
//!
//! Backends: [`uring`] (multishot accept into the direct-descriptor table, multishot recv on
//! a provided-buffer ring, one send in flight per connection, a repeating kernel timeout)
//! and [`epoll`] (edge-triggered, one shared read buffer per worker). Both drive the same
//! [`core::Core`], which holds every protocol and application rule.

pub mod core;
pub mod epoll;
pub mod status;
pub mod uring;
pub mod wheel;

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use socket2::{Domain, Protocol, Socket, Type};

use crate::api::Handler;
use crate::proto::{self, CloseCode, OpCode};
use crate::pubsub::Policy;
pub use core::ConnId;

/// Which I/O backend to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    /// io_uring when the kernel has every operation wsring uses, else epoll.
    Auto,
    /// io_uring, or fail to start.
    IoUring,
    /// epoll.
    Epoll,
}

/// The backend actually running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// io_uring.
    IoUring,
    /// epoll.
    Epoll,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::IoUring => "io-uring",
            Backend::Epoll => "epoll",
        })
    }
}

/// Everything the engine can be told. Defaults are DESIGN.md's table.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EngineConfig {
    /// Address to listen on.
    pub listen: SocketAddr,
    /// Worker threads (0: one per online CPU).
    pub threads: usize,
    /// Backend.
    pub backend: BackendChoice,
    /// Largest message or frame (close 1009 beyond).
    pub max_message_size: u64,
    /// Largest handshake header block (431 beyond).
    pub max_header_bytes: usize,
    /// Time allowed for the whole upgrade request.
    pub handshake_timeout: Duration,
    /// Ping a connection silent for this long (`None`: never).
    pub ping_interval: Option<Duration>,
    /// Drop a connection whose pong does not come within this.
    pub pong_timeout: Duration,
    /// Drop a connection whose close reply does not come within this; also how long a
    /// closed connection's last bytes may wait for a peer that does not read them.
    pub close_timeout: Duration,
    /// A frame or message that has begun must be complete within this (close 1008
    /// beyond; `None`: no limit): slow-drip senders cannot hold reassembly memory.
    pub message_timeout: Option<Duration>,
    /// Drop a connection whose queued bytes make no progress for this long (a peer that
    /// stopped reading; `None`: never).
    pub send_timeout: Option<Duration>,
    /// Graceful shutdown: how long to wait for close handshakes.
    pub drain_timeout: Duration,
    /// Graceful shutdown: the close code sent (1001 going away; 1012 for a restart).
    pub drain_close_code: CloseCode,
    /// Upgraded connections allowed over all workers (0: from RLIMIT_NOFILE); 503 beyond.
    pub max_connections: usize,
    /// Pin worker `i` to CPU `i`.
    pub pin_threads: bool,
    /// A connection's send queue: past this many bytes `send`/`publish` report
    /// backpressure.
    pub send_queue_soft: usize,
    /// A connection's send queue: past this many bytes the [`Policy`] applies.
    pub send_queue_hard: usize,
    /// What happens past the hard limit.
    pub policy: Policy,
    /// Per worker: bytes that messages split across frames or reads may hold while they
    /// are reassembled, summed over the worker's connections. A connection whose message
    /// grows past it stops being read (TCP flow control pushes back on its peer) until
    /// others finish theirs; one connection always keeps reading, so a single message up
    /// to `max_message_size` still completes.
    pub reassembly_budget: usize,
    /// Most connections a worker writes per loop turn. A fan-out to more subscribers is
    /// written over several turns, with completions and reads handled in between, and a
    /// publisher's own copy comes at the end of its turn (see `Conn::publish`). Smaller
    /// batches put more frames in each write of a wide fan-out (more deliveries per
    /// second, longer queues, higher latency); a batch larger than the fan-out writes all
    /// of it before the publisher's copy (lowest latency, fewest deliveries).
    pub write_batch: usize,
    /// Origins allowed to upgrade (exact match of the `Origin` header); empty allows all.
    /// Others get HTTP 403.
    pub allowed_origins: Vec<String>,
}

/// A chainable way to fill an [`EngineConfig`] and start a [`Server`]:
///
/// ```no_run
/// # use wsring::engine::Server;
/// let server = Server::builder()
///     .listen("127.0.0.1:9001".parse().unwrap())
///     .threads(2)
///     .start(wsring::serve::BenchProtocol::new)?;
/// # Ok::<(), std::io::Error>(())
/// ```
#[derive(Clone, Debug, Default)]
pub struct ServerBuilder {
    config: EngineConfig,
}

macro_rules! setters {
    ($($(#[$doc:meta])* $name:ident: $ty:ty),* $(,)?) => {
        impl ServerBuilder {
            $(
                $(#[$doc])*
                pub fn $name(mut self, value: $ty) -> Self {
                    self.config.$name = value;
                    self
                }
            )*
        }
    };
}

setters!(
    /// Address to listen on.
    listen: SocketAddr,
    /// Worker threads (0: one per CPU).
    threads: usize,
    /// Backend choice.
    backend: BackendChoice,
    /// Largest message or frame (1009 beyond).
    max_message_size: u64,
    /// Largest handshake header block (431 beyond).
    max_header_bytes: usize,
    /// Time allowed for the upgrade request.
    handshake_timeout: Duration,
    /// Ping after this much silence (`None`: never).
    ping_interval: Option<Duration>,
    /// Drop when the pong does not come within this.
    pong_timeout: Duration,
    /// Drop when the close reply does not come within this.
    close_timeout: Duration,
    /// Time allowed for a message once it has begun (`None`: no limit).
    message_timeout: Option<Duration>,
    /// Drop a connection whose queue makes no progress this long (`None`: never).
    send_timeout: Option<Duration>,
    /// Graceful shutdown deadline.
    drain_timeout: Duration,
    /// Close code of the graceful shutdown (1001, or 1012 for a restart).
    drain_close_code: CloseCode,
    /// Upgraded connections allowed (0: from RLIMIT_NOFILE).
    max_connections: usize,
    /// Pin workers to CPUs.
    pin_threads: bool,
    /// Send queue soft limit (bytes).
    send_queue_soft: usize,
    /// Send queue hard limit (bytes).
    send_queue_hard: usize,
    /// What happens past the hard limit.
    policy: Policy,
    /// Per-worker budget for messages being reassembled (bytes).
    reassembly_budget: usize,
    /// Most connections written per loop turn.
    write_batch: usize,
    /// Origins allowed to upgrade (empty: all).
    allowed_origins: Vec<String>,
);

impl ServerBuilder {
    /// The configuration built so far.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// Checks the configuration (see [`EngineConfig::validate`]).
    ///
    /// # Errors
    /// The first [`ConfigError`].
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.config.validate()
    }

    /// Starts the server with a handler per worker.
    ///
    /// # Errors
    /// As [`Server::start_with`].
    pub fn start<H, F>(self, factory: F) -> std::io::Result<Server>
    where
        H: Handler,
        F: Fn(Handle) -> H + Send + Sync + 'static,
    {
        Server::start_with(self.config, factory)
    }
}

/// A configuration value that cannot work.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ConfigError {
    /// More workers than the engine supports.
    #[error("threads must be at most {MAX_WORKERS} (got {0})")]
    TooManyThreads(usize),
    /// A size that must be positive is zero.
    #[error("{0} must be greater than zero")]
    Zero(&'static str),
    /// The soft limit is above the hard limit.
    #[error("send_queue_soft ({soft}) must not exceed send_queue_hard ({hard})")]
    SoftAboveHard {
        /// Soft limit.
        soft: usize,
        /// Hard limit.
        hard: usize,
    },
    /// A close code that may not be sent.
    #[error("drain_close_code {0} is not a code a server may send (use 1001 or 1012)")]
    BadCloseCode(u16),
    /// The header limit is too small for any real upgrade request.
    #[error("max_header_bytes must be at least 256 (got {0})")]
    HeaderLimitTooSmall(usize),
}

/// The most workers one server runs (topic directory bitmasks are 64 bits wide).
pub const MAX_WORKERS: usize = 64;

impl EngineConfig {
    /// Checks the configuration.
    ///
    /// # Errors
    /// The first [`ConfigError`] found.
    pub fn validate(&self) -> Result<(), ConfigError> {
        if self.threads > MAX_WORKERS {
            return Err(ConfigError::TooManyThreads(self.threads));
        }
        if self.max_message_size == 0 {
            return Err(ConfigError::Zero("max_message_size"));
        }
        if self.max_header_bytes < 256 {
            return Err(ConfigError::HeaderLimitTooSmall(self.max_header_bytes));
        }
        for (name, d) in [
            ("handshake_timeout", self.handshake_timeout),
            ("pong_timeout", self.pong_timeout),
            ("close_timeout", self.close_timeout),
            (
                "message_timeout",
                self.message_timeout.unwrap_or(Duration::MAX),
            ),
            ("send_timeout", self.send_timeout.unwrap_or(Duration::MAX)),
        ] {
            if d.is_zero() {
                return Err(ConfigError::Zero(name));
            }
        }
        if !self.drain_close_code.is_allowed() {
            return Err(ConfigError::BadCloseCode(u16::from(self.drain_close_code)));
        }
        if self.send_queue_hard == 0 {
            return Err(ConfigError::Zero("send_queue_hard"));
        }
        if self.reassembly_budget == 0 {
            return Err(ConfigError::Zero("reassembly_budget"));
        }
        if self.write_batch == 0 {
            return Err(ConfigError::Zero("write_batch"));
        }
        if self.send_queue_soft > self.send_queue_hard {
            return Err(ConfigError::SoftAboveHard {
                soft: self.send_queue_soft,
                hard: self.send_queue_hard,
            });
        }
        Ok(())
    }
}

impl Default for EngineConfig {
    fn default() -> Self {
        // The connection's own settings have one home, `proto::Config::default()`; the CLI's
        // flag defaults are checked against this (a test of the binary).
        let proto = proto::Config::default();
        EngineConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9001)),
            threads: 0,
            backend: BackendChoice::Auto,
            max_message_size: proto.max_message_size,
            max_header_bytes: proto::handshake::DEFAULT_MAX_HEADER_BYTES,
            handshake_timeout: Duration::from_secs(10),
            ping_interval: proto.ping_interval,
            pong_timeout: proto.pong_timeout,
            close_timeout: proto.close_timeout,
            message_timeout: proto.message_timeout,
            send_timeout: proto.send_timeout,
            drain_timeout: Duration::from_secs(10),
            drain_close_code: CloseCode::Away,
            max_connections: 0,
            pin_threads: true,
            send_queue_soft: proto.reply_queue_limit,
            send_queue_hard: 1024 * 1024,
            policy: Policy::Close,
            reassembly_budget: 256 * 1024 * 1024,
            write_batch: DEFAULT_WRITE_BATCH,
            allowed_origins: Vec::new(),
        }
    }
}

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

/// Where a server is in its shutdown; it only moves forward.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
#[repr(u8)]
pub enum ShutdownState {
    /// Serving.
    Running = 0,
    /// Closing every connection with the drain code and waiting for the close
    /// handshakes (up to the drain timeout).
    Draining = 1,
    /// Dropping every connection now.
    Aborting = 2,
}

/// Work handed to a worker by other threads.
#[derive(Debug)]
pub enum Command {
    /// Fan this frame out to the worker's subscribers of the topic.
    Publish(Arc<str>, Bytes),
    /// Close a connection of this worker with a code and reason.
    Close(ConnId, CloseCode, String),
}

/// A cross-worker inbox: commands for this worker, with one coalesced wake-up.
struct Inbox {
    queue: Mutex<Vec<Command>>,
    /// Bytes of published frames queued here and not yet taken by the worker.
    pending_bytes: AtomicUsize,
    wake_pending: AtomicBool,
    eventfd: OwnedFd,
}

/// State shared by the workers (read-mostly).
pub struct Shared {
    /// The configuration.
    pub config: EngineConfig,
    /// Protocol settings handed to every connection.
    pub proto: Arc<proto::Config>,
    /// Per-worker counters.
    pub stats: Box<[WorkerStats]>,
    /// Upgraded connections open now.
    pub open: AtomicUsize,
    /// Sockets held now, in any phase (handshake, open, closing).
    pub sockets: AtomicUsize,
    /// Sockets allowed at once, in any phase: the connection cap plus room for
    /// handshakes, within the descriptor limit. Beyond, a new socket is answered 503 at
    /// once and closed (see `Core::on_accept`).
    pub socket_limit: usize,
    /// When the server started.
    pub started: Instant,
    /// The backend running.
    pub backend: Backend,
    inboxes: Box<[Inbox]>,
    /// A [`ShutdownState`] as its number (it only grows).
    shutdown: AtomicU8,
    /// Which workers have subscribers of which topic.
    pub(crate) directory: crate::pubsub::Directory,
}

impl Shared {
    fn new(config: EngineConfig, threads: usize, backend: Backend) -> std::io::Result<Arc<Shared>> {
        let mut inboxes = Vec::new();
        for _ in 0..threads {
            // SAFETY: eventfd has no memory preconditions; the result is checked.
            let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            inboxes.push(Inbox {
                queue: Mutex::new(Vec::new()),
                pending_bytes: AtomicUsize::new(0),
                wake_pending: AtomicBool::new(false),
                // SAFETY: fd is a fresh descriptor we own.
                eventfd: unsafe { <OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) },
            });
        }
        let proto = Arc::new(proto::Config {
            max_message_size: config.max_message_size,
            ping_interval: config.ping_interval,
            pong_timeout: config.pong_timeout,
            close_timeout: config.close_timeout,
            allowed_rsv: 0,
            message_timeout: config.message_timeout,
            send_timeout: config.send_timeout,
            // Pongs past the soft limit collapse into one owed pong.
            reply_queue_limit: config.send_queue_soft,
        });
        let socket_limit = socket_limit(config.max_connections, raise_nofile());
        Ok(Arc::new(Shared {
            socket_limit,
            config,
            proto,
            stats: (0..threads).map(|_| WorkerStats::default()).collect(),
            open: AtomicUsize::new(0),
            sockets: AtomicUsize::new(0),
            started: Instant::now(),
            backend,
            inboxes: inboxes.into_boxed_slice(),
            shutdown: AtomicU8::new(0),
            directory: crate::pubsub::Directory::new(threads),
        }))
    }

    /// Shared state for one worker that no thread runs: for driving a [`core::Core`]
    /// by hand without sockets (the `broadcast` bench).
    ///
    /// # Errors
    /// If an eventfd cannot be created.
    #[doc(hidden)]
    pub fn detached(mut config: EngineConfig) -> std::io::Result<Arc<Shared>> {
        config.threads = 1;
        if config.max_connections == 0 {
            config.max_connections = usize::MAX;
        }
        Shared::new(config, 1, Backend::Epoll)
    }

    /// Hands a frame to every worker in the bitmask `workers`; returns how many took it.
    ///
    /// `from`: the worker publishing (a handler), which must not block, so a worker whose
    /// inbox already holds [`HANDLE_QUEUE_LIMIT`] bytes does not get the frame: it is
    /// counted in `forward_dropped` (and missing from the returned count) instead of
    /// growing that inbox without bound. `None` ([`Handle::publish`]) has waited for room.
    pub(crate) fn forward(
        &self,
        workers: u64,
        topic: &Arc<str>,
        frame: &Bytes,
        from: Option<usize>,
    ) -> usize {
        let mut n = 0;
        for (i, inbox) in self.inboxes.iter().enumerate() {
            if workers & (1 << i) == 0 {
                continue;
            }
            if let Some(from) = from
                && inbox.pending_bytes.load(Ordering::Acquire) > HANDLE_QUEUE_LIMIT
            {
                self.stats[from].forward_dropped.bump(1);
                continue;
            }
            inbox.pending_bytes.fetch_add(frame.len(), Ordering::AcqRel);
            self.send_command(inbox, Command::Publish(topic.clone(), frame.clone()));
            n += 1;
        }
        n
    }

    fn send_command(&self, inbox: &Inbox, cmd: Command) {
        if let Ok(mut q) = inbox.queue.lock() {
            q.push(cmd);
        }
        // One wake-up per batch, not per message: the flag is cleared by the worker
        // before it takes the batch.
        if !inbox.wake_pending.swap(true, Ordering::AcqRel) {
            wake(&inbox.eventfd);
        }
    }

    /// Takes worker `index`'s commands.
    pub(crate) fn take_commands(&self, index: usize) -> Vec<Command> {
        let Some(inbox) = self.inboxes.get(index) else {
            return Vec::new();
        };
        inbox.wake_pending.store(false, Ordering::Release);
        let batch = inbox
            .queue
            .lock()
            .map(|mut q| std::mem::take(&mut *q))
            .unwrap_or_default();
        let bytes: usize = batch
            .iter()
            .map(|c| match c {
                Command::Publish(_, f) => f.len(),
                Command::Close(..) => 0,
            })
            .sum();
        inbox.pending_bytes.fetch_sub(bytes, Ordering::AcqRel);
        batch
    }

    /// Blocks (briefly, repeatedly) while any worker in `workers` has more than
    /// [`HANDLE_QUEUE_LIMIT`] bytes of published frames waiting: a thread publishing
    /// faster than the workers fan out is slowed down instead of growing memory.
    fn wait_for_room(&self, workers: u64) {
        for (i, inbox) in self.inboxes.iter().enumerate() {
            if workers & (1 << i) == 0 {
                continue;
            }
            while inbox.pending_bytes.load(Ordering::Acquire) > HANDLE_QUEUE_LIMIT
                && self.shutdown_state() == ShutdownState::Running
            {
                std::thread::sleep(Duration::from_micros(100));
            }
        }
    }

    /// The eventfd that wakes worker `index`.
    pub fn eventfd(&self, index: usize) -> i32 {
        self.inboxes
            .get(index)
            .map_or(-1, |i| i.eventfd.as_raw_fd())
    }

    /// Where the server is in its shutdown.
    pub fn shutdown_state(&self) -> ShutdownState {
        match self.shutdown.load(Ordering::Acquire) {
            0 => ShutdownState::Running,
            1 => ShutdownState::Draining,
            _ => ShutdownState::Aborting,
        }
    }

    /// Moves the shutdown on to `state` (never back: aborting wins over draining).
    fn set_shutdown(&self, state: ShutdownState) {
        self.shutdown.fetch_max(state as u8, Ordering::AcqRel);
        for inbox in self.inboxes.iter() {
            wake(&inbox.eventfd);
        }
    }

    /// Sum of one counter over the workers.
    pub fn total(&self, f: impl Fn(&WorkerStats) -> &AtomicU64) -> u64 {
        self.stats
            .iter()
            .map(|s| f(s).load(Ordering::Relaxed))
            .sum()
    }
}

fn wake(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
    let _ = unsafe { libc::write(fd.as_raw_fd(), (&raw const one).cast(), 8) };
}

/// Default of [`EngineConfig::write_batch`]. A turn then costs ~1,024 writes of kernel
/// time (~10-15 ms on a slow 2-core VM), and in BENCH_PROTOCOL's 10,000-subscriber fan-out
/// each write carries ~70 frames instead of the publisher's window of 16.
pub const DEFAULT_WRITE_BATCH: usize = 1024;

/// Bytes of published frames that may wait in one worker's inbox before
/// [`Handle::publish`] blocks its caller.
pub const HANDLE_QUEUE_LIMIT: usize = 16 * 1024 * 1024;

/// A connection anywhere in the server: its worker and its id there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GlobalConnId {
    /// The worker.
    pub worker: usize,
    /// The connection on that worker.
    pub id: ConnId,
}

/// `Send + Clone`: publishes, closes connections, reads counters and shuts the server
/// down from any thread.
#[derive(Clone)]
pub struct Handle {
    shared: Arc<Shared>,
}

impl Handle {
    /// A handle on shared state built without a server (see [`Shared::detached`]).
    #[doc(hidden)]
    pub fn from_shared(shared: Arc<Shared>) -> Handle {
        Handle { shared }
    }

    /// Publishes a message to every subscriber of `topic` on every worker: encoded once,
    /// handed once to each worker that has subscribers. Returns the number of workers it
    /// was handed to (0: nobody is subscribed; nothing was encoded).
    ///
    /// Blocks while a target worker already has [`HANDLE_QUEUE_LIMIT`] bytes of frames
    /// waiting (a publisher faster than the fan-out is slowed down, memory stays bounded).
    /// Call it from your own threads, not from a handler (use [`crate::api::Conn::publish`]).
    pub fn publish(&self, topic: &str, opcode: OpCode, payload: &[u8]) -> usize {
        let workers = self.shared.directory.workers_with(topic, None);
        if workers == 0 {
            return 0;
        }
        self.shared.wait_for_room(workers);
        let frame = proto::encode_frame(opcode, payload);
        self.shared
            .forward(workers, &Arc::from(topic), &frame, None)
    }

    /// Publishes a text message (see [`Handle::publish`]).
    pub fn publish_text(&self, topic: &str, text: &str) -> usize {
        self.publish(topic, OpCode::Text, text.as_bytes())
    }

    /// Asks the connection's worker to close it with `code` and `reason`.
    pub fn close(&self, conn: GlobalConnId, code: CloseCode, reason: &str) {
        if let Some(inbox) = self.shared.inboxes.get(conn.worker) {
            self.shared
                .send_command(inbox, Command::Close(conn.id, code, reason.to_string()));
        }
    }

    /// Subscribers of `topic` over all workers.
    pub fn subscriber_count(&self, topic: &str) -> usize {
        self.shared.directory.count(topic)
    }

    /// Topics with at least one subscriber.
    pub fn topic_count(&self) -> usize {
        self.shared.directory.topics()
    }

    /// Upgraded connections open now.
    pub fn connections(&self) -> usize {
        self.shared.open.load(Ordering::Acquire)
    }

    /// The counters in Prometheus text format.
    pub fn metrics_text(&self) -> String {
        status::metrics(&self.shared)
    }
    /// Stop accepting, send close 1001 to every connection, wait for the close handshakes
    /// until the drain deadline, then drop the rest.
    pub fn shutdown(&self) {
        self.shared.set_shutdown(ShutdownState::Draining);
    }

    /// Drop every connection and stop now.
    pub fn abort(&self) {
        self.shared.set_shutdown(ShutdownState::Aborting);
    }

    /// The shared state (counters).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }
}

/// A running server.
pub struct Server {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    local_addr: SocketAddr,
}

/// Raises RLIMIT_NOFILE's soft limit to the hard limit; returns the new soft limit.
pub fn raise_nofile() -> u64 {
    let mut lim = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit with a valid pointer to a local rlimit.
    unsafe {
        if libc::getrlimit(libc::RLIMIT_NOFILE, &mut lim) != 0 {
            return 1024;
        }
        if lim.rlim_cur < lim.rlim_max {
            let raised = libc::rlimit {
                rlim_cur: lim.rlim_max,
                rlim_max: lim.rlim_max,
            };
            if libc::setrlimit(libc::RLIMIT_NOFILE, &raised) == 0 {
                lim.rlim_cur = lim.rlim_max;
            }
        }
    }
    lim.rlim_cur
}

/// Descriptors kept for listeners, rings, eventfds and stdio.
pub const RESERVED_FDS: u64 = 64;

/// Sockets a server holds at once in any phase: `max_connections` upgraded ones plus an
/// eighth more (at least 16) for handshakes in progress, but never so many that accept
/// fails for lack of descriptors (half of [`RESERVED_FDS`] stays free for the answer-503
/// path and the server's own descriptors).
pub fn socket_limit(max_connections: usize, nofile: u64) -> usize {
    let wanted = max_connections
        .saturating_add(max_connections / 8)
        .saturating_add(16);
    let fds = usize::try_from(nofile.saturating_sub(RESERVED_FDS / 2)).unwrap_or(usize::MAX);
    wanted.min(fds).max(1)
}

/// What a backend does when accept fails for lack of resources (EMFILE, ENFILE,
/// ENOBUFS, ENOMEM): stop accepting for a while (10 ms, doubling to 1 s while it keeps
/// failing) instead of spinning on a listener that stays readable, and log one WARN per
/// 10 s with the number of failures in between.
#[derive(Debug)]
pub(crate) struct AcceptBackoff {
    until: Option<Instant>,
    delay: Duration,
    last_log: Option<Instant>,
    suppressed: u64,
}

impl AcceptBackoff {
    const MIN: Duration = Duration::from_millis(10);
    const MAX: Duration = Duration::from_secs(1);
    const LOG_EVERY: Duration = Duration::from_secs(10);

    pub(crate) fn new() -> AcceptBackoff {
        AcceptBackoff {
            until: None,
            delay: Self::MIN,
            last_log: None,
            suppressed: 0,
        }
    }

    /// Whether the error is one a pause helps with; others (a client that reset before
    /// its accept completed) are not the server's problem.
    pub(crate) fn is_resource_error(errno: i32) -> bool {
        matches!(
            errno,
            libc::EMFILE | libc::ENFILE | libc::ENOBUFS | libc::ENOMEM
        )
    }

    /// Records a failed accept at `now`: counted; a resource error starts (or extends)
    /// the pause. Returns whether accepting should pause.
    pub(crate) fn failed(
        &mut self,
        worker: usize,
        errno: i32,
        stats: &WorkerStats,
        now: Instant,
    ) -> bool {
        stats.accept_errors.bump(1);
        let pause = Self::is_resource_error(errno);
        let due = self
            .last_log
            .is_none_or(|t| now.duration_since(t) >= Self::LOG_EVERY);
        if due {
            let err = std::io::Error::from_raw_os_error(errno);
            if pause {
                tracing::warn!(
                    worker,
                    failures_since_last_warning = self.suppressed,
                    "accept: {err}; pausing accepts for {:?}",
                    self.delay
                );
            } else {
                tracing::debug!(worker, "accept: {err}");
            }
            self.last_log = Some(now);
            self.suppressed = 0;
        } else {
            self.suppressed += 1;
        }
        if pause {
            self.until = Some(now + self.delay);
            self.delay = (self.delay * 2).min(Self::MAX);
        }
        pause
    }

    /// A socket was accepted: the next failure starts from the shortest pause again.
    pub(crate) fn succeeded(&mut self) {
        self.delay = Self::MIN;
    }

    /// Whether accepting may resume at `now` (`true` when not paused).
    pub(crate) fn ready(&mut self, now: Instant) -> bool {
        match self.until {
            Some(t) if now < t => false,
            Some(_) => {
                self.until = None;
                true
            }
            None => true,
        }
    }

    /// Whether a pause is running.
    pub(crate) fn paused(&self) -> bool {
        self.until.is_some()
    }
}

/// `TCP_DEFER_ACCEPT`: the kernel completes an accept only once the client's first bytes
/// (the upgrade request: a WebSocket client always speaks first) have arrived, so the
/// accept and the request come together and a connection that never sends anything
/// costs no worker a wake-up for its first seconds. Best effort: ignored where refused.
fn defer_accept(socket: &Socket) {
    use std::os::fd::AsRawFd;
    let secs: libc::c_int = 3;
    // SAFETY: setsockopt on a socket we own, with a valid int option value.
    unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_DEFER_ACCEPT,
            (&raw const secs).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        );
    }
}

/// A listener on `addr`; an error names the address ("127.0.0.1:9001: Address already in
/// use"), which the bare system error does not.
fn bind(addr: SocketAddr, nonblocking: bool) -> std::io::Result<Socket> {
    let with_addr = |e: std::io::Error| std::io::Error::new(e.kind(), format!("{addr}: {e}"));
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))
        .map_err(with_addr)?;
    socket.set_reuse_address(true).map_err(with_addr)?;
    socket.set_reuse_port(true).map_err(with_addr)?;
    socket.set_tcp_nodelay(true).map_err(with_addr)?;
    socket.set_nonblocking(nonblocking).map_err(with_addr)?;
    defer_accept(&socket);
    socket.bind(&addr.into()).map_err(with_addr)?;
    socket.listen(4096).map_err(with_addr)?;
    Ok(socket)
}

impl Server {
    /// A builder over [`EngineConfig`]'s defaults.
    pub fn builder() -> ServerBuilder {
        ServerBuilder::default()
    }

    /// Binds, picks the backend and starts the workers. Returns once every worker is
    /// ready to accept.
    ///
    /// # Errors
    /// Binding failures, `--backend io-uring` on a host without usable io_uring, or a
    /// worker that could not set up its reactor.
    pub fn start(config: EngineConfig) -> std::io::Result<Server> {
        Server::start_with(config, crate::serve::BenchProtocol::new)
    }

    /// Starts the server with a handler per worker made by `factory` (called once per
    /// worker, on that worker's thread, with a [`Handle`] to the server).
    ///
    /// # Errors
    /// An invalid configuration ([`EngineConfig::validate`]), binding failures,
    /// `--backend io-uring` on a host without usable io_uring, or a worker that could not
    /// set up its reactor.
    pub fn start_with<H, F>(mut config: EngineConfig, factory: F) -> std::io::Result<Server>
    where
        H: Handler,
        F: Fn(Handle) -> H + Send + Sync + 'static,
    {
        config
            .validate()
            .map_err(|e| std::io::Error::new(std::io::ErrorKind::InvalidInput, e))?;
        let nofile = raise_nofile();
        if config.max_connections == 0 {
            config.max_connections =
                usize::try_from(nofile.saturating_sub(RESERVED_FDS).max(1)).unwrap_or(usize::MAX);
        }
        let threads = if config.threads == 0 {
            std::thread::available_parallelism().map_or(1, |n| n.get())
        } else {
            config.threads
        };
        config.threads = threads.min(MAX_WORKERS);
        let threads = config.threads;
        let backend = match config.backend {
            BackendChoice::Epoll => Backend::Epoll,
            BackendChoice::IoUring => match uring::probe(&config) {
                Ok(()) => Backend::IoUring,
                Err(why) => {
                    return Err(std::io::Error::other(format!(
                        "io_uring unavailable: {why}"
                    )));
                }
            },
            BackendChoice::Auto => match uring::probe(&config) {
                Ok(()) => Backend::IoUring,
                Err(why) => {
                    tracing::warn!("io_uring unavailable ({why}); using the epoll backend");
                    Backend::Epoll
                }
            },
        };
        // Bind every listener before starting: the first resolves port 0.
        let first = bind(config.listen, backend == Backend::Epoll)?;
        let local_addr = first
            .local_addr()?
            .as_socket()
            .ok_or_else(|| std::io::Error::other("listener has no IP address"))?;
        let mut listeners = vec![first];
        for _ in 1..threads {
            listeners.push(bind(local_addr, backend == Backend::Epoll)?);
        }
        let shared = Shared::new(config, threads, backend)?;
        let factory = Arc::new(factory);
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let mut workers = Vec::new();
        for (index, listener) in listeners.into_iter().enumerate() {
            let shared = shared.clone();
            let ready = ready_tx.clone();
            let factory = factory.clone();
            let handle = std::thread::Builder::new()
                .name(format!("wsring-{index}"))
                .spawn(move || {
                    if shared.config.pin_threads {
                        pin_to_cpu(index);
                    }
                    let handler = factory(Handle {
                        shared: shared.clone(),
                    });
                    let result = match backend {
                        Backend::IoUring => {
                            uring::run(index, shared.clone(), handler, listener, &ready)
                        }
                        Backend::Epoll => {
                            epoll::run(index, shared.clone(), handler, listener, &ready)
                        }
                    };
                    if let Err(e) = result {
                        tracing::error!(worker = index, "worker stopped: {e}");
                        let _ = ready.send(Err(e.to_string()));
                        // One worker down means the server is not what was asked for.
                        shared.set_shutdown(ShutdownState::Aborting);
                    }
                })?;
            workers.push(handle);
        }
        drop(ready_tx);
        for _ in 0..threads {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    shared.set_shutdown(ShutdownState::Aborting);
                    return Err(std::io::Error::other(e));
                }
                Err(_) => {
                    shared.set_shutdown(ShutdownState::Aborting);
                    return Err(std::io::Error::other("a worker exited during start-up"));
                }
            }
        }
        Ok(Server {
            shared,
            workers,
            local_addr,
        })
    }

    /// The address the listeners are bound to (port 0 resolved).
    pub fn local_addr(&self) -> SocketAddr {
        self.local_addr
    }

    /// The backend running.
    pub fn backend(&self) -> Backend {
        self.shared.backend
    }

    /// A handle that publishes, closes and shuts down from any thread.
    pub fn handle(&self) -> Handle {
        Handle {
            shared: self.shared.clone(),
        }
    }

    /// The shared state (configuration, counters).
    pub fn shared(&self) -> &Arc<Shared> {
        &self.shared
    }

    /// Waits for every worker to exit (after a shutdown).
    pub fn join(self) {
        for w in self.workers {
            let _ = w.join();
        }
    }
}

fn pin_to_cpu(index: usize) {
    // SAFETY: a zeroed cpu_set_t is a valid empty set; CPU_SET writes inside it;
    // sched_getaffinity/sched_setaffinity read and write that local set only.
    unsafe {
        let mut allowed: libc::cpu_set_t = std::mem::zeroed();
        if libc::sched_getaffinity(0, size_of::<libc::cpu_set_t>(), &mut allowed) != 0 {
            return;
        }
        let cpus: Vec<usize> = (0..libc::CPU_SETSIZE as usize)
            .filter(|&c| libc::CPU_ISSET(c, &allowed))
            .collect();
        if cpus.is_empty() {
            return;
        }
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpus[index % cpus.len()], &mut set);
        libc::sched_setaffinity(0, size_of::<libc::cpu_set_t>(), &set);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validate_refuses_configurations_that_cannot_work() {
        assert_eq!(EngineConfig::default().validate(), Ok(()));
        let b = Server::builder();
        assert_eq!(
            b.clone().threads(65).validate(),
            Err(ConfigError::TooManyThreads(65))
        );
        assert_eq!(
            b.clone().max_message_size(0).validate(),
            Err(ConfigError::Zero("max_message_size"))
        );
        assert_eq!(
            b.clone().send_queue_soft(2).send_queue_hard(1).validate(),
            Err(ConfigError::SoftAboveHard { soft: 2, hard: 1 })
        );
        assert_eq!(
            b.clone().pong_timeout(Duration::ZERO).validate(),
            Err(ConfigError::Zero("pong_timeout"))
        );
        assert_eq!(
            b.clone().reassembly_budget(0).validate(),
            Err(ConfigError::Zero("reassembly_budget"))
        );
        assert_eq!(
            b.clone().write_batch(0).validate(),
            Err(ConfigError::Zero("write_batch"))
        );
        assert_eq!(
            b.clone().drain_close_code(CloseCode::Abnormal).validate(),
            Err(ConfigError::BadCloseCode(1006))
        );
        assert_eq!(
            b.clone().max_header_bytes(10).validate(),
            Err(ConfigError::HeaderLimitTooSmall(10))
        );
        assert_eq!(b.drain_close_code(CloseCode::Restart).validate(), Ok(()));
    }

    #[test]
    fn handler_publishes_to_a_full_inbox_are_counted_not_queued() {
        let config = EngineConfig {
            max_connections: 10,
            ..EngineConfig::default()
        };
        let shared = Shared::new(config, 2, Backend::Epoll).unwrap();
        let topic: Arc<str> = Arc::from("t");
        let frame = Bytes::from(vec![0u8; 64 * 1024]);
        let (mut taken, mut attempts) = (0, 0);
        while attempts < 2 * HANDLE_QUEUE_LIMIT / frame.len() {
            taken += shared.forward(1 << 1, &topic, &frame, Some(0));
            attempts += 1;
        }
        let pending = shared.inboxes[1].pending_bytes.load(Ordering::Acquire);
        assert!(
            pending <= HANDLE_QUEUE_LIMIT + frame.len(),
            "{pending} bytes queued"
        );
        let dropped = shared.stats[0].forward_dropped.load(Ordering::Relaxed);
        assert_eq!(taken + dropped as usize, attempts);
        assert!(dropped > 0);
        // Once the worker takes its commands, there is room again.
        assert_eq!(shared.take_commands(1).len(), taken);
        assert_eq!(shared.forward(1 << 1, &topic, &frame, Some(0)), 1);
        // `Handle::publish` (from = None) has waited for room itself: never refused.
        for _ in 0..2 * HANDLE_QUEUE_LIMIT / frame.len() {
            assert_eq!(shared.forward(1 << 1, &topic, &frame, None), 1);
        }
    }

    #[test]
    fn the_socket_limit_leaves_room_for_handshakes_within_the_descriptors() {
        assert_eq!(socket_limit(1000, 1 << 20), 1000 + 125 + 16);
        assert_eq!(socket_limit(19_936, 20_000), 20_000 - 32);
        assert_eq!(socket_limit(usize::MAX, u64::MAX), usize::MAX - 32);
        assert_eq!(socket_limit(0, 10), 1);
    }

    #[test]
    fn accept_failures_for_resources_pause_with_a_growing_backoff() {
        let stats = WorkerStats::default();
        let mut b = AcceptBackoff::new();
        let t0 = Instant::now();
        assert!(b.ready(t0) && !b.paused());
        // A client that reset before its accept: counted, no pause.
        assert!(!b.failed(0, libc::ECONNABORTED, &stats, t0));
        assert!(b.ready(t0));
        assert!(b.failed(0, libc::EMFILE, &stats, t0));
        assert!(b.paused());
        assert!(!b.ready(t0 + Duration::from_millis(9)));
        assert!(b.ready(t0 + Duration::from_millis(10)));
        // Failing on: 20 ms, 40 ms, ... up to 1 s.
        assert!(b.failed(0, libc::ENFILE, &stats, t0));
        assert!(!b.ready(t0 + Duration::from_millis(19)));
        for _ in 0..20 {
            b.failed(0, libc::EMFILE, &stats, t0);
        }
        assert!(!b.ready(t0 + Duration::from_millis(999)));
        assert!(b.ready(t0 + Duration::from_secs(1)));
        // Success starts again from the shortest pause.
        b.succeeded();
        assert!(b.failed(0, libc::EMFILE, &stats, t0));
        assert!(b.ready(t0 + Duration::from_millis(10)));
        assert_eq!(stats.accept_errors.load(Ordering::Relaxed), 24);
        // One WARN per 10 s: the failures in between are only counted.
        assert_eq!(b.suppressed, 23);
    }

    #[test]
    fn a_port_in_use_is_reported_with_its_address() {
        // A listener without SO_REUSEPORT holds the port, so wsring's bind fails.
        let holder = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = holder.local_addr().unwrap();
        let err = Server::builder()
            .listen(addr)
            .threads(1)
            .start(crate::serve::BenchProtocol::new)
            .err()
            .expect("the port is taken");
        assert_eq!(err.kind(), std::io::ErrorKind::AddrInUse);
        assert!(err.to_string().starts_with(&addr.to_string()), "{err}");
    }

    #[test]
    fn an_invalid_configuration_does_not_start() {
        let err = Server::builder()
            .send_queue_soft(10)
            .send_queue_hard(5)
            .listen("127.0.0.1:0".parse().unwrap())
            .start(crate::serve::BenchProtocol::new)
            .err()
            .unwrap();
        assert_eq!(err.kind(), std::io::ErrorKind::InvalidInput);
    }
}
