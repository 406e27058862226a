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

use crate::proto;

/// Which I/O backend to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
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
#[derive(Clone, Debug)]
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
    /// Drop a connection whose close reply does not come within this.
    pub close_timeout: Duration,
    /// Graceful shutdown: how long to wait for close handshakes.
    pub drain_timeout: Duration,
    /// Upgraded connections allowed over all workers (0: from RLIMIT_NOFILE); 503 beyond.
    pub max_connections: usize,
    /// Pin worker `i` to CPU `i`.
    pub pin_threads: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        EngineConfig {
            listen: SocketAddr::from(([127, 0, 0, 1], 9001)),
            threads: 0,
            backend: BackendChoice::Auto,
            max_message_size: proto::connection::DEFAULT_MAX_MESSAGE_SIZE,
            max_header_bytes: proto::handshake::DEFAULT_MAX_HEADER_BYTES,
            handshake_timeout: Duration::from_secs(10),
            ping_interval: Some(Duration::from_secs(25)),
            pong_timeout: Duration::from_secs(20),
            close_timeout: Duration::from_secs(5),
            drain_timeout: Duration::from_secs(10),
            max_connections: 0,
            pin_threads: true,
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
}

/// A cross-worker inbox: published frames for this worker's subscribers.
struct Inbox {
    queue: Mutex<Vec<(Arc<str>, Bytes)>>,
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
    /// When the server started.
    pub started: Instant,
    /// The backend running.
    pub backend: Backend,
    inboxes: Box<[Inbox]>,
    /// 0 running, 1 draining, 2 abort.
    shutdown: AtomicU8,
}

impl Shared {
    /// Hands a frame published on worker `from` to every other worker.
    pub fn forward(&self, from: usize, topic: &Arc<str>, frame: &Bytes) {
        for (i, inbox) in self.inboxes.iter().enumerate() {
            if i == from {
                continue;
            }
            if let Ok(mut q) = inbox.queue.lock() {
                q.push((topic.clone(), frame.clone()));
            }
            // One wake-up per batch, not per message.
            if !inbox.wake_pending.swap(true, Ordering::AcqRel) {
                wake(&inbox.eventfd);
            }
        }
    }

    /// Takes worker `index`'s inbox.
    pub fn take_inbox(&self, index: usize) -> Vec<(Arc<str>, Bytes)> {
        let Some(inbox) = self.inboxes.get(index) else {
            return Vec::new();
        };
        inbox.wake_pending.store(false, Ordering::Release);
        inbox
            .queue
            .lock()
            .map(|mut q| std::mem::take(&mut *q))
            .unwrap_or_default()
    }

    /// The eventfd that wakes worker `index`.
    pub fn eventfd(&self, index: usize) -> i32 {
        self.inboxes
            .get(index)
            .map_or(-1, |i| i.eventfd.as_raw_fd())
    }

    /// 0 running, 1 draining, 2 abort now.
    pub fn shutdown_state(&self) -> u8 {
        self.shutdown.load(Ordering::Acquire)
    }

    fn set_shutdown(&self, state: u8) {
        self.shutdown.fetch_max(state, Ordering::AcqRel);
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

/// Triggers the graceful shutdown from any thread.
#[derive(Clone)]
pub struct ShutdownHandle {
    shared: Arc<Shared>,
}

impl ShutdownHandle {
    /// Stop accepting, send close 1001 to every connection, wait for the close handshakes
    /// until the drain deadline, then drop the rest.
    pub fn shutdown(&self) {
        self.shared.set_shutdown(1);
    }

    /// Drop every connection and stop now.
    pub fn abort(&self) {
        self.shared.set_shutdown(2);
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

fn bind(addr: SocketAddr, nonblocking: bool) -> std::io::Result<Socket> {
    let socket = Socket::new(Domain::for_address(addr), Type::STREAM, Some(Protocol::TCP))?;
    socket.set_reuse_address(true)?;
    socket.set_reuse_port(true)?;
    socket.set_tcp_nodelay(true)?;
    socket.set_nonblocking(nonblocking)?;
    socket.bind(&addr.into())?;
    socket.listen(4096)?;
    Ok(socket)
}

impl Server {
    /// Binds, picks the backend and starts the workers. Returns once every worker is
    /// ready to accept.
    ///
    /// # Errors
    /// Binding failures, `--backend io-uring` on a host without usable io_uring, or a
    /// worker that could not set up its reactor.
    pub fn start(mut config: EngineConfig) -> std::io::Result<Server> {
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
        config.threads = threads;
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
        let mut inboxes = Vec::new();
        for _ in 0..threads {
            // SAFETY: eventfd has no memory preconditions; the result is checked.
            let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
            if fd < 0 {
                return Err(std::io::Error::last_os_error());
            }
            inboxes.push(Inbox {
                queue: Mutex::new(Vec::new()),
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
        });
        let shared = Arc::new(Shared {
            config,
            proto,
            stats: (0..threads).map(|_| WorkerStats::default()).collect(),
            open: AtomicUsize::new(0),
            started: Instant::now(),
            backend,
            inboxes: inboxes.into_boxed_slice(),
            shutdown: AtomicU8::new(0),
        });
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let mut workers = Vec::new();
        for (index, listener) in listeners.into_iter().enumerate() {
            let shared = shared.clone();
            let ready = ready_tx.clone();
            let handle = std::thread::Builder::new()
                .name(format!("wsring-{index}"))
                .spawn(move || {
                    if shared.config.pin_threads {
                        pin_to_cpu(index);
                    }
                    let result = match backend {
                        Backend::IoUring => uring::run(index, shared.clone(), listener, &ready),
                        Backend::Epoll => epoll::run(index, shared.clone(), listener, &ready),
                    };
                    if let Err(e) = result {
                        tracing::error!(worker = index, "worker stopped: {e}");
                        let _ = ready.send(Err(e.to_string()));
                        // One worker down means the server is not what was asked for.
                        shared.set_shutdown(2);
                    }
                })?;
            workers.push(handle);
        }
        drop(ready_tx);
        for _ in 0..threads {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    shared.set_shutdown(2);
                    return Err(std::io::Error::other(e));
                }
                Err(_) => {
                    shared.set_shutdown(2);
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

    /// A handle that shuts the server down from any thread.
    pub fn shutdown_handle(&self) -> ShutdownHandle {
        ShutdownHandle {
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
