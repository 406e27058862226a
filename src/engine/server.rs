//! Starting and running a server: [`Server`] (binding, the backend choice, the workers),
//! [`Handle`] (publish, send to / close / (un)subscribe one connection, counts and
//! shutdown from any thread, blocking, non-blocking or async), and the descriptor limits.

use super::*;
use history::Publisher;

/// Why a server did not start.
#[derive(Debug, thiserror::Error)]
#[non_exhaustive]
pub enum StartError {
    /// The configuration cannot work ([`EngineConfig::validate`]).
    #[error("invalid configuration: {0}")]
    Config(#[from] ConfigError),
    /// A listener could not be set up on `addr` (in use, not an address of this host, no
    /// permission for a low port...).
    #[error("{addr}: {source}")]
    Bind {
        /// The address asked for.
        addr: SocketAddr,
        /// The system's error.
        source: std::io::Error,
    },
    /// `backend: IoUring` was asked for and the probe says why it cannot run here.
    #[error("io_uring unavailable: {0}")]
    IoUringUnavailable(String),
    /// A worker could not set up its reactor.
    #[error("worker failed to start: {0}")]
    Worker(String),
    /// Another system error (an eventfd, a thread).
    #[error(transparent)]
    Io(#[from] std::io::Error),
}

impl StartError {
    /// The closest `io::ErrorKind` (what `From<StartError> for io::Error` keeps).
    pub fn kind(&self) -> std::io::ErrorKind {
        match self {
            StartError::Config(_) => std::io::ErrorKind::InvalidInput,
            StartError::Bind { source, .. } | StartError::Io(source) => source.kind(),
            StartError::IoUringUnavailable(_) => std::io::ErrorKind::Unsupported,
            StartError::Worker(_) => std::io::ErrorKind::Other,
        }
    }
}

/// So that a program whose `main` returns `io::Result` can start a server with `?`.
impl From<StartError> for std::io::Error {
    fn from(e: StartError) -> std::io::Error {
        std::io::Error::new(e.kind(), e)
    }
}

/// A connection anywhere in the server: its worker and its id there.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct GlobalConnId {
    /// The worker.
    pub worker: usize,
    /// The connection on that worker.
    pub id: ConnId,
}

/// Why a non-blocking call on a [`Handle`] did not hand its work over.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum TryError {
    /// A worker it targets already has [`HANDLE_QUEUE_LIMIT`] bytes waiting: nothing was
    /// queued. Retry later, or await the `_async` form.
    #[error("a worker's inbox is full")]
    Full,
    /// The id names a worker this server does not have.
    #[error("no such worker")]
    NoSuchWorker,
    /// A close frame (use [`Handle::close`]) or a control frame over 125 bytes.
    #[error("frame refused (a close, or a control frame over 125 bytes)")]
    Refused,
    /// The id names a connection that has closed (its slot may hold another one now):
    /// nothing was queued. A connection that closes while the call's command is on its
    /// way is not reported here; its worker drops the command and counts it in
    /// `wsring_handle_misses_total`.
    #[error("the connection is gone (a stale id)")]
    Stale,
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
    /// was handed to (0: nobody is subscribed here; nothing was encoded). With a broker
    /// configured it is also published to the other nodes, once.
    ///
    /// Blocks while a target worker already has [`HANDLE_QUEUE_LIMIT`] bytes of frames
    /// waiting (a publisher faster than the fan-out is slowed down, memory stays bounded).
    /// Call it from your own threads, not from a handler (use [`core::Conn::publish`]).
    pub fn publish(&self, topic: &str, opcode: OpCode, payload: &[u8]) -> usize {
        if let Some(history) = self.shared.history_of(topic) {
            self.shared
                .wait_for_room(self.shared.directory.workers_with(topic, None));
            return self
                .shared
                .publish_history(history, topic, opcode, payload, Publisher::Handle)
                .1;
        }
        // To the other nodes, if a broker is configured (never blocks).
        self.shared.publish_to_broker(topic, opcode, payload);
        let workers = self.shared.directory.workers_with(topic, None);
        if workers == 0 {
            return 0;
        }
        self.shared.wait_for_room(workers);
        let frame = proto::encode_frame(opcode, payload);
        self.shared
            .forward(workers, &arcstr::ArcStr::from(topic), &frame, None)
    }

    /// [`Handle::publish`] that never blocks: `Err(TryError::Full)` at once, with nothing
    /// published anywhere (not to the broker either), when a target worker already has
    /// [`HANDLE_QUEUE_LIMIT`] bytes waiting. For async code that would rather drop or
    /// retry than wait; [`Handle::publish_async`] waits without blocking a thread.
    ///
    /// # Errors
    /// [`TryError::Full`] only.
    pub fn try_publish(
        &self,
        topic: &str,
        opcode: OpCode,
        payload: &[u8],
    ) -> Result<usize, TryError> {
        let workers = self.shared.directory.workers_with(topic, None);
        if self.shared.is_full(workers) {
            return Err(TryError::Full);
        }
        if let Some(history) = self.shared.history_of(topic) {
            return Ok(self
                .shared
                .publish_history(history, topic, opcode, payload, Publisher::Handle)
                .1);
        }
        self.shared.publish_to_broker(topic, opcode, payload);
        if workers == 0 {
            return Ok(0);
        }
        let frame = proto::encode_frame(opcode, payload);
        Ok(self
            .shared
            .forward(workers, &arcstr::ArcStr::from(topic), &frame, None))
    }

    /// [`Handle::publish`] for async code: awaits room instead of blocking the thread.
    /// Runtime-agnostic (a plain future: its waker is woken when a full worker takes its
    /// inbox, or when a shutdown starts). Returns the number of workers it was handed to.
    ///
    /// ```no_run
    /// # async fn f(handle: wsring::Handle) {
    /// let workers = handle.publish_async("news", wsring::proto::OpCode::Text, b"hi").await;
    /// # let _ = workers;
    /// # }
    /// ```
    pub async fn publish_async(&self, topic: &str, opcode: OpCode, payload: &[u8]) -> usize {
        let workers = self.shared.directory.workers_with(topic, None);
        if let Some(history) = self.shared.history_of(topic) {
            // Kept even with no subscriber: a client that resumes wants it.
            shared::Room {
                shared: &self.shared,
                workers,
            }
            .await;
            return self
                .shared
                .publish_history(history, topic, opcode, payload, Publisher::Handle)
                .1;
        }
        self.shared.publish_to_broker(topic, opcode, payload);
        if workers == 0 {
            return 0;
        }
        shared::Room {
            shared: &self.shared,
            workers,
        }
        .await;
        let frame = proto::encode_frame(opcode, payload);
        // Subscribers may have moved while it waited: hand it to those there now.
        let workers = self.shared.directory.workers_with(topic, None);
        self.shared
            .forward(workers, &arcstr::ArcStr::from(topic), &frame, None)
    }

    /// Queues a message (text, binary, ping or pong) on one connection, from any thread;
    /// it counts against the connection's worker's [`HANDLE_QUEUE_LIMIT`] like a publish,
    /// and then against the connection's send queue limits and policy like
    /// [`core::Conn::send`]. Returns at once.
    ///
    /// The id is generation-checked: a connection that has closed (even if its slot now
    /// holds another one) is [`TryError::Stale`] at once. One that closes (or starts
    /// closing) while the command is on its way gets nothing; its worker counts it in
    /// [`WorkerStats::handle_misses`] (`wsring_handle_misses_total`).
    ///
    /// # Errors
    /// [`TryError::Full`] when the worker's inbox is full (nothing queued),
    /// [`TryError::Stale`], [`TryError::NoSuchWorker`], or [`TryError::Refused`] for a
    /// close or a control frame over 125 bytes.
    pub fn try_send(
        &self,
        conn: GlobalConnId,
        opcode: OpCode,
        payload: &[u8],
    ) -> Result<(), TryError> {
        let frame = self.send_frame(conn, opcode, payload)?;
        self.shared
            .try_command(conn.worker, Command::Send(conn.id, frame))
            .map_err(|_| TryError::Full)
    }

    /// [`Handle::try_send`] that awaits room in the worker's inbox instead of failing with
    /// [`TryError::Full`] (runtime-agnostic, like [`Handle::publish_async`]).
    ///
    /// # Errors
    /// [`TryError::NoSuchWorker`], [`TryError::Stale`] or [`TryError::Refused`]; once a
    /// shutdown started, the message is queued without waiting.
    pub async fn send_async(
        &self,
        conn: GlobalConnId,
        opcode: OpCode,
        payload: &[u8],
    ) -> Result<(), TryError> {
        let frame = self.send_frame(conn, opcode, payload)?;
        shared::Room {
            shared: &self.shared,
            workers: 1 << conn.worker,
        }
        .await;
        let inbox = &self.shared.inboxes[conn.worker];
        inbox.pending_bytes.fetch_add(frame.len(), Ordering::AcqRel);
        self.shared
            .send_command(inbox, Command::Send(conn.id, frame));
        Ok(())
    }

    /// Checks a [`Handle::try_send`] and encodes its frame.
    fn send_frame(
        &self,
        conn: GlobalConnId,
        opcode: OpCode,
        payload: &[u8],
    ) -> Result<Bytes, TryError> {
        self.check(conn)?;
        if opcode == OpCode::Close || (opcode.is_control() && payload.len() > 125) {
            return Err(TryError::Refused);
        }
        Ok(proto::encode_frame(opcode, payload))
    }

    /// `conn` names a worker of this server and a connection that has not closed.
    fn check(&self, conn: GlobalConnId) -> Result<(), TryError> {
        if conn.worker >= self.shared.inboxes.len() {
            return Err(TryError::NoSuchWorker);
        }
        if !self.shared.may_be_live(conn.worker, conn.id) {
            return Err(TryError::Stale);
        }
        Ok(())
    }

    /// Subscribes one connection to `topic`, from any thread (done by its worker, in
    /// order with the other commands; an id that goes stale or closing on the way is
    /// counted in [`WorkerStats::handle_misses`] and changes nothing).
    ///
    /// # Errors
    /// [`TryError::NoSuchWorker`], [`TryError::Stale`].
    pub fn subscribe(&self, conn: GlobalConnId, topic: &str) -> Result<(), TryError> {
        self.membership(conn, Command::Subscribe(conn.id, Arc::from(topic)))
    }

    /// Subscribes one connection to `topic`, a topic with history, from a position (see
    /// [`Accept::subscribe_at`](crate::api::Accept::subscribe_at)): its worker calls
    /// [`Handler::on_subscribed`](crate::api::Handler::on_subscribed), then queues the
    /// replay. On a topic without history it is [`Handle::subscribe`].
    ///
    /// # Errors
    /// [`TryError::NoSuchWorker`], [`TryError::Stale`].
    pub fn subscribe_at(
        &self,
        conn: GlobalConnId,
        topic: &str,
        sub: crate::pubsub::history::Subscription,
    ) -> Result<(), TryError> {
        if self.shared.history_of(topic).is_none() {
            return self.subscribe(conn, topic);
        }
        self.membership(conn, Command::SubscribeAt(conn.id, Arc::from(topic), sub))
    }

    /// Publishes like [`Handle::publish`] and returns the publication's position in its
    /// topic's history: its offset and epoch (`None` for a topic without history on this
    /// node, and with a broker that numbers publications, as Redis does: the broker
    /// assigns it, and subscribers see it in the envelope).
    pub fn publish_recorded(
        &self,
        topic: &str,
        opcode: OpCode,
        payload: &[u8],
    ) -> Option<crate::pubsub::history::Position> {
        let history = self.shared.history_of(topic)?;
        self.shared
            .wait_for_room(self.shared.directory.workers_with(topic, None));
        self.shared
            .publish_history(history, topic, opcode, payload, Publisher::Handle)
            .0
    }

    /// The position of `topic`'s history on this node: the last publication's offset and
    /// the epoch (`None` for a topic without history, or none published to yet).
    pub fn position(&self, topic: &str) -> Option<crate::pubsub::history::Position> {
        let history = self.shared.history_of(topic)?;
        history.lock(topic).get(topic).map(|s| s.position())
    }

    /// Unsubscribes one connection from `topic`, from any thread (see
    /// [`Handle::subscribe`]).
    ///
    /// # Errors
    /// [`TryError::NoSuchWorker`], [`TryError::Stale`].
    pub fn unsubscribe(&self, conn: GlobalConnId, topic: &str) -> Result<(), TryError> {
        self.membership(conn, Command::Unsubscribe(conn.id, Arc::from(topic)))
    }

    fn membership(&self, conn: GlobalConnId, cmd: Command) -> Result<(), TryError> {
        self.check(conn)?;
        let inbox = &self.shared.inboxes[conn.worker];
        self.shared.send_command(inbox, cmd);
        Ok(())
    }

    /// Publishes a text message (see [`Handle::publish`]).
    pub fn publish_text(&self, topic: &str, text: &str) -> usize {
        self.publish(topic, OpCode::Text, text.as_bytes())
    }

    /// Asks the connection's worker to close it with `code` and `reason`.
    ///
    /// # Errors
    /// [`TryError::NoSuchWorker`], or [`TryError::Stale`] for a connection already gone.
    pub fn close(&self, conn: GlobalConnId, code: CloseCode, reason: &str) -> Result<(), TryError> {
        self.membership(conn, Command::Close(conn.id, code, reason.to_string()))
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
        metrics::metrics(&self.shared)
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
fn bind(addr: SocketAddr, nonblocking: bool) -> Result<Socket, StartError> {
    let with_addr = |source: std::io::Error| StartError::Bind { addr, source };
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

    /// Starts the server with a handler per worker made by `factory` (called once per
    /// worker, on that worker's thread, with a [`Handle`] to the server).
    ///
    /// # Errors
    /// An invalid configuration ([`EngineConfig::validate`]), binding failures,
    /// `--backend io-uring` on a host without usable io_uring, or a worker that could not
    /// set up its reactor.
    pub fn start<H, F>(config: EngineConfig, factory: F) -> Result<Server, StartError>
    where
        H: Handler,
        F: Fn(Handle) -> H + Send + Sync + 'static,
    {
        Server::launch(config, None, None, factory)
    }

    /// [`Server::start`], joined to other nodes through `backplane` (see
    /// [`ServerBuilder::broker`]): its client starts once the shared state exists and
    /// stops when the server is joined or dropped.
    pub(super) fn launch<H, F>(
        mut config: EngineConfig,
        backplane: Option<crate::pubsub::Backplane>,
        history: Option<crate::pubsub::history::HistoryConfig>,
        factory: F,
    ) -> Result<Server, StartError>
    where
        H: Handler,
        F: Fn(Handle) -> H + Send + Sync + 'static,
    {
        config.validate()?;
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
                Err(why) => return Err(StartError::IoUringUnavailable(why)),
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
        let local_addr =
            first
                .local_addr()
                .ok()
                .and_then(|a| a.as_socket())
                .ok_or(StartError::Bind {
                    addr: config.listen,
                    source: std::io::Error::other("the listener has no IP address"),
                })?;
        let mut listeners = vec![first];
        for _ in 1..threads {
            listeners.push(bind(local_addr, backend == Backend::Epoll)?);
        }
        let shared =
            Shared::new(config, threads, backend, backplane, history).map_err(StartError::Io)?;
        if let Some(bp) = &shared.backplane {
            bp.start(Arc::new(shared::BrokerSink(Arc::downgrade(&shared))))
                .map_err(StartError::Io)?;
            tracing::info!(
                node = format_args!("{:016x}", bp.node()),
                "backplane: {}",
                bp.describe()
            );
        }
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
                })
                .map_err(StartError::Io)?;
            workers.push(handle);
        }
        drop(ready_tx);
        for _ in 0..threads {
            match ready_rx.recv() {
                Ok(Ok(())) => {}
                Ok(Err(e)) => {
                    shared.set_shutdown(ShutdownState::Aborting);
                    return Err(StartError::Worker(e));
                }
                Err(_) => {
                    shared.set_shutdown(ShutdownState::Aborting);
                    return Err(StartError::Worker("a worker exited during start-up".into()));
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

    /// Waits for every worker to exit (after a shutdown), then stops the broker client.
    pub fn join(mut self) {
        for w in std::mem::take(&mut self.workers) {
            let _ = w.join();
        }
        if let Some(bp) = &self.shared.backplane {
            bp.stop();
        }
    }
}

impl Drop for Server {
    /// A server dropped without [`Server::join`] stops its broker client (the workers stop
    /// on their own once shut down).
    fn drop(&mut self) {
        if let Some(bp) = &self.shared.backplane {
            bp.stop();
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
