//! Everything the engine can be told ([`EngineConfig`], with DESIGN.md's defaults), the
//! builder that fills it, and the one check of what cannot work.

use super::*;
use crate::pubsub::broker::{Broker, NodeId};

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
    /// Time allowed for the whole upgrade request (kept on the worker's 20 ms timer wheel,
    /// never early; beyond the wheel's reach of about 248 days it counts as that).
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
    /// permessage-deflate (RFC 7692) for clients that offer it; `None` (the library's
    /// default): never negotiated. See [`DeflateConfig`].
    pub deflate: Option<DeflateConfig>,
}

/// permessage-deflate settings (`wsring serve --deflate on`, its default).
///
/// Both directions are negotiated without context takeover (see `proto::deflate`): a
/// connection that negotiated it keeps no compressor or inflater between messages, so an
/// idle one costs what any other does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeflateConfig {
    /// Messages shorter than this are sent uncompressed.
    pub threshold: usize,
    /// Compression level, 1 (fastest) to 9.
    pub level: u8,
    /// The largest window the server compresses with, 9 to 15 (a client may ask for
    /// less).
    pub window_bits: u8,
    /// Let clients keep their compression context between messages (client context
    /// takeover: better ratios for what clients send) when they do not ask otherwise.
    /// Off by default: the server then answers `client_no_context_takeover`, and keeps no
    /// inflater for an idle connection; on, every such connection keeps one for its life
    /// (about 40 KiB, [`crate::proto::deflate::INFLATER_COST`]).
    pub client_context_takeover: bool,
}

impl Default for DeflateConfig {
    /// 256 bytes (below it deflate saves less than a third of a JSON message for the same
    /// fixed cost of about 4 µs: `cargo bench --bench deflate`, threshold), level 1, a 32 KiB
    /// window, no client context takeover.
    fn default() -> DeflateConfig {
        DeflateConfig {
            threshold: 256,
            level: 1,
            window_bits: 15,
            client_context_takeover: false,
        }
    }
}

/// A chainable way to fill an [`EngineConfig`] and start a [`Server`]:
///
/// ```no_run
/// # use wsring::engine::Server;
/// # use wsring::proto::handshake::{Request, Upgrade};
/// # use wsring::{Accept, Decision, Handler};
/// struct AcceptAll;
/// impl Handler for AcceptAll {
///     type Data = ();
///     fn on_upgrade(&mut self, _: &Request, _: &Upgrade) -> Decision<()> {
///         Decision::Accept(Accept::new(()))
///     }
/// }
/// let server = Server::builder()
///     .listen("127.0.0.1:9001".parse().unwrap())
///     .threads(2)
///     .start(|_handle| AcceptAll)?;
/// # Ok::<(), std::io::Error>(())
/// ```
///
/// Several nodes joined through a broker (Redis or NATS, see [`crate::pubsub::broker`]):
/// `.broker(Arc::new(broker))`, and optionally `.node_id(id)` (default: random at start).
#[derive(Clone, Default)]
pub struct ServerBuilder {
    config: EngineConfig,
    broker: Option<Arc<dyn Broker>>,
    node_id: Option<NodeId>,
    history: Option<crate::pubsub::history::HistoryConfig>,
}

impl std::fmt::Debug for ServerBuilder {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ServerBuilder")
            .field("config", &self.config)
            .field("broker", &self.broker.as_ref().map(|b| b.describe()))
            .field("node_id", &self.node_id)
            .field("history", &self.history)
            .finish()
    }
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
    /// permessage-deflate for clients that offer it (`None`: never).
    deflate: Option<DeflateConfig>,
);

impl From<EngineConfig> for ServerBuilder {
    /// A builder starting from `config` (no broker).
    fn from(config: EngineConfig) -> ServerBuilder {
        ServerBuilder {
            config,
            ..ServerBuilder::default()
        }
    }
}

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

    /// Joins this node to others through `broker`: a message published here is delivered
    /// here at once and published to the broker once; one published on another node
    /// arrives through the broker, encoded once and fanned out like a local publish. The
    /// node is subscribed to a topic on the broker only while it has local subscribers.
    pub fn broker(mut self, broker: Arc<dyn Broker>) -> Self {
        self.broker = Some(broker);
        self
    }

    /// This node's id in what it publishes to the broker (default: random at start). Two
    /// nodes with the same id would skip each other's messages as their own.
    pub fn node_id(mut self, id: NodeId) -> Self {
        self.node_id = Some(id);
        self
    }

    /// Keeps per-topic history (off by default): every publication to a topic the
    /// config's filter admits gets an offset (from 1 per epoch), is kept within the
    /// limits, and can be replayed to a subscriber that resumes from a position
    /// ([`Accept::subscribe_at`](crate::api::Accept::subscribe_at)). Topics it does not
    /// admit cost nothing extra.
    pub fn history(mut self, config: crate::pubsub::history::HistoryConfig) -> Self {
        self.history = Some(config);
        self
    }

    /// Starts the server with a handler per worker.
    ///
    /// # Errors
    /// As [`Server::start`].
    pub fn start<H, F>(self, factory: F) -> Result<Server, StartError>
    where
        H: Handler,
        F: Fn(Handle) -> H + Send + Sync + 'static,
    {
        let backplane = self.broker.map(|b| {
            crate::pubsub::Backplane::new(
                b,
                self.node_id
                    .unwrap_or_else(crate::pubsub::broker::random_node_id),
            )
        });
        Server::launch(self.config, backplane, self.history, factory)
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
            deflate: None,
        }
    }
}

/// Default of [`EngineConfig::write_batch`]. A turn then costs ~1,024 writes of kernel
/// time (~10-15 ms on a slow 2-core VM), and in BENCH_PROTOCOL's 10,000-subscriber fan-out
/// each write carries ~70 frames instead of the publisher's window of 16.
pub const DEFAULT_WRITE_BATCH: usize = 1024;
