//! What the workers share: the configuration, the counters, the cross-worker inboxes
//! (commands with one coalesced eventfd wake-up each), the shutdown state and the topic
//! directory.

use super::*;
use arcstr::ArcStr;
use std::task::{Context, Poll, Waker};

use crate::pubsub::history::{Entry, Epoch, History, HistoryConfig, Subscription};
use std::sync::atomic::AtomicU32;

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
    Publish(ArcStr, Bytes),
    /// A publication to a topic with history, with its offset in its epoch: handed to
    /// every worker with subscribers of the topic in offset order (see
    /// `engine/core/history.rs`).
    Sequenced(Arc<str>, Epoch, Entry),
    /// Subscribe one connection of this worker to a topic with history, resuming from a
    /// position ([`Handle::subscribe_at`]).
    SubscribeAt(ConnId, Arc<str>, Subscription),
    /// The topic's history is loaded from the broker: the subscription of this connection
    /// that waited for it goes ahead.
    Unpark(ConnId, Arc<str>, Subscription),
    /// Close a connection of this worker with a code and reason.
    Close(ConnId, CloseCode, String),
    /// Queue this encoded frame on one connection of this worker ([`Handle::try_send`]).
    Send(ConnId, Bytes),
    /// Subscribe one connection of this worker to a topic ([`Handle::subscribe`]).
    Subscribe(ConnId, Arc<str>),
    /// Unsubscribe one connection of this worker from a topic ([`Handle::unsubscribe`]).
    Unsubscribe(ConnId, Arc<str>),
    /// The decision on a deferred upgrade ([`handler::Deferred`]): a boxed
    /// `Result<Accept<D>, Reject>` with the handler's `D` (or `()` for a reject).
    Resolve(ConnId, Box<dyn std::any::Any + Send>),
}

impl Command {
    /// The bytes this command holds against its inbox's [`HANDLE_QUEUE_LIMIT`].
    fn bytes(&self) -> usize {
        match self {
            Command::Publish(_, f) | Command::Send(_, f) => f.len(),
            Command::Sequenced(_, _, e) => {
                e.frame.len() + e.envelope.as_ref().map_or(0, Bytes::len)
            }
            Command::SubscribeAt(..)
            | Command::Unpark(..)
            | Command::Close(..)
            | Command::Subscribe(..)
            | Command::Unsubscribe(..)
            | Command::Resolve(..) => 0,
        }
    }
}

/// A cross-worker inbox: commands for this worker, with one coalesced wake-up.
pub(super) struct Inbox {
    queue: Mutex<Vec<Command>>,
    /// Bytes of published frames queued here and not yet taken by the worker.
    pub(super) pending_bytes: AtomicUsize,
    wake_pending: AtomicBool,
    eventfd: OwnedFd,
    /// Tasks waiting for room in this inbox ([`Room`]), woken when the worker takes it.
    waiters: Mutex<Vec<Waker>>,
    /// Whether `waiters` may hold any (so that taking a batch costs no second lock when
    /// nobody waits).
    has_waiters: AtomicBool,
}

impl Inbox {
    pub(super) fn full(&self) -> bool {
        self.pending_bytes.load(Ordering::Acquire) > HANDLE_QUEUE_LIMIT
    }

    /// Wakes every task waiting for room.
    fn wake_waiters(&self) {
        std::sync::atomic::fence(Ordering::SeqCst);
        if self.has_waiters.swap(false, Ordering::SeqCst) {
            let waiters = self
                .waiters
                .lock()
                .map(|mut w| std::mem::take(&mut *w))
                .unwrap_or_default();
            for w in waiters {
                w.wake();
            }
        }
    }
}

/// State shared by the workers (read-mostly).
pub struct Shared {
    /// The configuration.
    pub config: EngineConfig,
    /// Protocol settings of every connection without an extension (tag 0, see
    /// [`Shared::proto_config`]).
    pub proto: proto::Config,
    /// The same with permessage-deflate, per window the server compresses with and whether
    /// the client keeps its context (index: the connection's tag minus 1), made on first
    /// use.
    proto_deflate: [std::sync::OnceLock<proto::Config>; 32],
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
    pub(super) inboxes: Box<[Inbox]>,
    /// A [`ShutdownState`] as its number (it only grows).
    shutdown: AtomicU8,
    /// Which workers have subscribers of which topic.
    pub(crate) directory: crate::pubsub::Directory,
    /// The broker joining this node to others, if one is configured.
    pub(crate) backplane: Option<crate::pubsub::Backplane>,
    /// The node's per-topic history, if it keeps any.
    pub(crate) history: Option<History>,
    /// Per worker, per slot: the generation of the open connection in it, with
    /// [`LIVE`] set (0: none), so that a `Handle` call with a stale id fails at once
    /// (`TryError::Stale`) instead of travelling to the worker for nothing.
    live: Box<[Box<[AtomicU32]>]>,
}

/// The bit of a [`Shared::live`] entry that says an open connection holds the slot.
const LIVE: u32 = 1 << 31;

/// `n` zeroed atomics, allocated zeroed: the pages of slots never used are never touched
/// (the table is sized for every socket the server may hold, 4 bytes each).
fn zeroed_atomics(n: usize) -> Box<[AtomicU32]> {
    let plain: Box<[u32]> = vec![0u32; n].into_boxed_slice();
    // SAFETY: `AtomicU32` has the same size, alignment and bit validity as `u32` (std's
    // documented guarantee), so a boxed slice of one is a boxed slice of the other; the
    // allocation is handed over whole and freed with the same layout.
    unsafe { Box::from_raw(Box::into_raw(plain) as *mut [AtomicU32]) }
}

impl Shared {
    pub(super) fn new(
        config: EngineConfig,
        threads: usize,
        backend: Backend,
        backplane: Option<crate::pubsub::Backplane>,
        history: Option<HistoryConfig>,
    ) -> std::io::Result<Arc<Shared>> {
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
                waiters: Mutex::new(Vec::new()),
                has_waiters: AtomicBool::new(false),
            });
        }
        let proto = proto::Config {
            max_message_size: config.max_message_size,
            ping_interval: config.ping_interval,
            pong_timeout: config.pong_timeout,
            close_timeout: config.close_timeout,
            allowed_rsv: 0,
            message_timeout: config.message_timeout,
            send_timeout: config.send_timeout,
            // Pongs past the soft limit collapse into one owed pong.
            reply_queue_limit: config.send_queue_soft,
            deflate: None,
        };
        let socket_limit = socket_limit(config.max_connections, raise_nofile());
        let backplane_numbers = backplane.as_ref().is_some_and(|b| b.numbers());
        let live = (0..threads)
            .map(|_| zeroed_atomics(socket_limit.min(1 << 24)))
            .collect();
        Ok(Arc::new(Shared {
            socket_limit,
            config,
            proto,
            proto_deflate: std::array::from_fn(|_| std::sync::OnceLock::new()),
            stats: (0..threads).map(|_| WorkerStats::default()).collect(),
            open: AtomicUsize::new(0),
            sockets: AtomicUsize::new(0),
            started: Instant::now(),
            backend,
            inboxes: inboxes.into_boxed_slice(),
            shutdown: AtomicU8::new(0),
            directory: crate::pubsub::Directory::new(threads),
            backplane,
            history: history.map(|h| {
                let mut h = History::new(h);
                h.broker_numbered = backplane_numbers;
                h
            }),
            live,
        }))
    }

    /// The tag of a connection that negotiated deflate with the server compressing with
    /// `window_bits`, the client keeping its context or not: which settings
    /// [`Shared::proto_config`] gives it (made here on first use, one per combination).
    /// Connections keep this byte instead of an 8-byte pointer to their settings.
    pub(crate) fn deflate_tag(&self, window_bits: u8, client_context_takeover: bool) -> u8 {
        let Some(d) = self.config.deflate else {
            return 0;
        };
        let bits = window_bits.clamp(9, 15);
        let index = bits | u8::from(client_context_takeover) << 4;
        self.proto_deflate[usize::from(index)].get_or_init(|| proto::Config {
            allowed_rsv: 0b100,
            deflate: Some(proto::deflate::Params {
                threshold: d.threshold,
                level: d.level,
                window_bits: bits,
                client_context_takeover,
            }),
            ..self.proto.clone()
        });
        index + 1
    }

    /// The protocol settings of a connection by its [`proto::BareConnection::tag`]: 0
    /// plain, else from [`Shared::deflate_tag`] (an unknown tag gets the plain settings).
    #[inline]
    pub(crate) fn proto_config(&self, tag: u8) -> &proto::Config {
        match tag.checked_sub(1) {
            None => &self.proto,
            Some(i) => self
                .proto_deflate
                .get(usize::from(i))
                .and_then(|c| c.get())
                .unwrap_or(&self.proto),
        }
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
        Shared::new(config, 1, Backend::Epoll, None, None)
    }

    /// [`Shared::detached`] keeping history.
    ///
    /// # Errors
    /// If an eventfd cannot be created.
    #[doc(hidden)]
    pub fn detached_with_history(
        mut config: EngineConfig,
        history: HistoryConfig,
    ) -> std::io::Result<Arc<Shared>> {
        config.threads = 1;
        if config.max_connections == 0 {
            config.max_connections = usize::MAX;
        }
        Shared::new(config, 1, Backend::Epoll, None, Some(history))
    }

    /// The node's history, if `topic` keeps one.
    pub(crate) fn history_of(&self, topic: &str) -> Option<&History> {
        self.history.as_ref().filter(|h| h.applies(topic))
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
        topic: &ArcStr,
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

    /// The broker joining this node to others, if one is configured.
    pub fn backplane(&self) -> Option<&crate::pubsub::Backplane> {
        self.backplane.as_ref()
    }

    /// A worker's local subscriber count of `topic` went to or from zero (after the
    /// directory was updated): the backplane, if any, subscribes or unsubscribes the node.
    pub(crate) fn interest_changed(&self, topic: &str) {
        if let Some(bp) = &self.backplane {
            let topic: Arc<str> = Arc::from(topic);
            let change = bp.interest_changed(&topic, &self.directory);
            self.history_interest(&topic, change);
        }
    }

    /// Publishes to the other nodes through the backplane, if any (never blocks).
    pub(crate) fn publish_to_broker(&self, topic: &str, opcode: OpCode, payload: &[u8]) {
        if let Some(bp) = &self.backplane {
            bp.publish(topic, opcode, payload);
        }
    }

    /// What other nodes published, from the broker client's thread: each message encoded
    /// once and handed to every worker with subscribers of its topic, one inbox lock and
    /// one wake-up per worker per batch. A worker whose inbox already holds
    /// [`HANDLE_QUEUE_LIMIT`] bytes does not get it (the broker thread must not block, or
    /// the broker would drop us as a slow consumer): counted in `in_dropped`.
    fn deliver_from_broker(&self, batch: &[crate::pubsub::broker::Incoming]) {
        let mut per_worker: Vec<Vec<Command>> =
            (0..self.inboxes.len()).map(|_| Vec::new()).collect();
        let mut bytes = vec![0usize; self.inboxes.len()];
        let mut dropped = 0u64;
        for m in batch {
            if let Some(history) = self.history_of(&m.topic) {
                // Numbered (by the broker, or here) and kept: see `engine/history.rs`.
                dropped += self.deliver_with_history(history, m);
                continue;
            }
            let workers = self.directory.workers_with(&m.topic, None);
            if workers == 0 {
                continue;
            }
            let frame = proto::encode_frame(m.opcode, &m.payload);
            let topic = ArcStr::from(&*m.topic);
            for (i, inbox) in self.inboxes.iter().enumerate() {
                if workers & (1 << i) == 0 {
                    continue;
                }
                if inbox.pending_bytes.load(Ordering::Acquire) + bytes[i] > HANDLE_QUEUE_LIMIT {
                    dropped += 1;
                    continue;
                }
                bytes[i] += frame.len();
                per_worker[i].push(Command::Publish(topic.clone(), frame.clone()));
            }
        }
        for (i, cmds) in per_worker.into_iter().enumerate() {
            if cmds.is_empty() {
                continue;
            }
            let inbox = &self.inboxes[i];
            inbox.pending_bytes.fetch_add(bytes[i], Ordering::AcqRel);
            push_commands(inbox, cmds);
        }
        if dropped > 0
            && let Some(bp) = &self.backplane
        {
            bp.stats().in_dropped.fetch_add(dropped, Ordering::Relaxed);
        }
    }

    pub(super) fn send_command(&self, inbox: &Inbox, cmd: Command) {
        push_commands(inbox, std::iter::once(cmd));
    }

    /// Records that worker `worker`'s slot holds the open connection `id` (`open`) or
    /// none any more.
    pub(crate) fn set_live(&self, worker: usize, id: ConnId, open: bool) {
        if let Some(entry) = self.live.get(worker).and_then(|t| t.get(id.slot as usize)) {
            entry.store(
                if open { id.generation | LIVE } else { 0 },
                Ordering::Release,
            );
        }
    }

    /// Whether `id` may name an open connection of `worker`: `false` once it closed (even
    /// if its slot holds another connection now). A connection closing while a command
    /// to it travels is still caught by its worker's own check.
    pub(crate) fn may_be_live(&self, worker: usize, id: ConnId) -> bool {
        self.live
            .get(worker)
            .and_then(|t| t.get(id.slot as usize))
            .is_none_or(|e| e.load(Ordering::Acquire) == id.generation | LIVE)
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
        let bytes: usize = batch.iter().map(Command::bytes).sum();
        inbox.pending_bytes.fetch_sub(bytes, Ordering::AcqRel);
        inbox.wake_waiters();
        batch
    }

    /// Whether any worker in `workers` has more than [`HANDLE_QUEUE_LIMIT`] bytes waiting
    /// (always `false` once a shutdown started: nothing would free the room).
    pub(super) fn is_full(&self, workers: u64) -> bool {
        self.shutdown_state() == ShutdownState::Running
            && self
                .inboxes
                .iter()
                .enumerate()
                .any(|(i, inbox)| workers & (1 << i) != 0 && inbox.full())
    }

    /// Queues `cmd` for worker `worker` unless its inbox is full; `Err` gives it back.
    pub(super) fn try_command(&self, worker: usize, cmd: Command) -> Result<(), Command> {
        let Some(inbox) = self.inboxes.get(worker) else {
            return Err(cmd);
        };
        if self.is_full(1 << worker) {
            return Err(cmd);
        }
        inbox.pending_bytes.fetch_add(cmd.bytes(), Ordering::AcqRel);
        self.send_command(inbox, cmd);
        Ok(())
    }

    /// Blocks (briefly, repeatedly) while any worker in `workers` has more than
    /// [`HANDLE_QUEUE_LIMIT`] bytes of published frames waiting: a thread publishing
    /// faster than the workers fan out is slowed down instead of growing memory.
    pub(super) fn wait_for_room(&self, workers: u64) {
        for (i, inbox) in self.inboxes.iter().enumerate() {
            if workers & (1 << i) == 0 {
                continue;
            }
            while inbox.full() && self.shutdown_state() == ShutdownState::Running {
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
    pub(super) fn set_shutdown(&self, state: ShutdownState) {
        self.shutdown.fetch_max(state as u8, Ordering::AcqRel);
        for inbox in self.inboxes.iter() {
            wake(&inbox.eventfd);
            // A task awaiting room returns: nothing will free it any more.
            inbox.wake_waiters();
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

/// Appends `cmds` to `inbox` under one lock and wakes its worker: one wake-up per batch,
/// not per message (the flag is cleared by the worker before it takes the batch).
fn push_commands(inbox: &Inbox, cmds: impl IntoIterator<Item = Command>) {
    if let Ok(mut q) = inbox.queue.lock() {
        q.extend(cmds);
    }
    if !inbox.wake_pending.swap(true, Ordering::AcqRel) {
        wake(&inbox.eventfd);
    }
}

/// A future that completes once no worker in `workers` has more than
/// [`HANDLE_QUEUE_LIMIT`] bytes waiting (or a shutdown started): the async form of
/// `Shared::wait_for_room`. Runtime-agnostic: its waker is registered in each full inbox
/// and woken when that worker takes its batch.
pub(super) struct Room<'a> {
    pub(super) shared: &'a Shared,
    pub(super) workers: u64,
}

impl Future for Room<'_> {
    type Output = ();

    fn poll(self: std::pin::Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let shared = self.shared;
        for (i, inbox) in shared.inboxes.iter().enumerate() {
            if self.workers & (1 << i) == 0 || !inbox.full() {
                continue;
            }
            if let Ok(mut w) = inbox.waiters.lock()
                && !w.iter().any(|w| w.will_wake(cx.waker()))
            {
                w.push(cx.waker().clone());
            }
            inbox.has_waiters.store(true, Ordering::SeqCst);
            // Pairs with the fence in `wake_waiters`: either the worker sees the waiter,
            // or this check sees the batch taken.
            std::sync::atomic::fence(Ordering::SeqCst);
            // Checked again after registering: a batch taken in between must not be missed.
            if inbox.full() && shared.shutdown_state() == ShutdownState::Running {
                return Poll::Pending;
            }
        }
        Poll::Ready(())
    }
}

/// The engine as a broker client sees it: where messages from other nodes go. Holds the
/// shared state weakly (the shared state holds the broker client, which holds this).
pub(super) struct BrokerSink(pub(super) std::sync::Weak<Shared>);

impl crate::pubsub::broker::Sink for BrokerSink {
    fn deliver(&self, batch: &[crate::pubsub::broker::Incoming]) {
        if let Some(shared) = self.0.upgrade() {
            shared.deliver_from_broker(batch);
        }
    }

    fn loaded(&self, stream: crate::pubsub::broker::Loaded) {
        if let Some(shared) = self.0.upgrade() {
            shared.loaded(stream);
        }
    }
}

fn wake(fd: &OwnedFd) {
    let one: u64 = 1;
    // SAFETY: writes 8 bytes from a live u64 to an eventfd we own.
    let _ = unsafe { libc::write(fd.as_raw_fd(), (&raw const one).cast(), 8) };
}

/// Bytes of published frames that may wait in one worker's inbox before
/// [`Handle::publish`] blocks its caller.
pub const HANDLE_QUEUE_LIMIT: usize = 16 * 1024 * 1024;
