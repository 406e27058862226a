//! The Redis backplane client: Redis pub/sub, several independent Redis servers used as
//! shards by a stable hash of the topic ([`shard_of`]).
//!
//! One std thread (`wsring-broker`) runs a tokio current-thread runtime with one task per
//! shard. A shard has two connections: a RESP3 connection that only subscribes (messages
//! arrive as RESP3 pushes) and a multiplexed connection that only publishes (in batches, as
//! one pipeline, in the order [`Broker::publish`] was called). The engine's calls never
//! block: subscriptions go through an unbounded channel per shard, publishes through a
//! bounded one ([`RedisOptions::queue_capacity`]).
//!
//! Each shard keeps the set of topics the node wants. After any error both connections of
//! the shard are dropped, and after a [`Backoff`] pause the shard connects again and
//! subscribes to the whole set (pipelined batches of [`RedisOptions::subscribe_batch`]
//! channels), timing it into [`BrokerStats::resubscribe_micros`]. While a shard is down,
//! what is published to it is counted in [`BrokerStats::out_failed`] and dropped: across
//! nodes, delivery is at most once.
//!
//! Every [`RedisOptions::probe_interval`] a shard publishes a probe through each server it
//! is connected to, on a channel private to the node: the prefix, a `0xFF` byte, then
//! `probe:<node id in hex>` (no topic's channel can be equal to it: a topic is UTF-8 and
//! `0xFF` never is). A probe that does not come back within [`RedisOptions::probe_timeout`]
//! is counted in [`BrokerStats::probes_failed`] and the shard's connections are rebuilt:
//! this catches a subscription that a failover left silently dead.
//!
//! Requirements: a server that speaks RESP3 (Redis 6 or later, or a compatible one); for
//! [`RedisOptions::sharded`] (SSUBSCRIBE / SUNSUBSCRIBE / SPUBLISH), Redis 7 or later.
//!
//! With [`RedisOptions::cluster`] the URLs are seed nodes of one Redis Cluster, and the
//! client is one shard that routes by key slot ([`cluster`]): at every connect it reads
//! `CLUSTER SLOTS` from the first seed that answers, opens the two connections to every
//! master, and subscribes and publishes each channel on the master that owns its slot
//! (sharded pub/sub, so a message travels only inside that master's shard instead of over
//! the whole cluster bus). A `MOVED` answer, a SUNSUBSCRIBE the server sends because a slot
//! left the node, or any lost connection ends the session; the next one reads the slot map
//! again and resubscribes everything where it now lives.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::{
    AsyncConnectionConfig, Client, ConnectionAddr, ConnectionInfo, IntoConnectionInfo,
    ProtocolVersion, PushInfo, PushKind, RedisResult, Value,
};
use tokio::sync::{mpsc, watch};

use super::{
    Backoff, Broker, BrokerState, BrokerStats, ClientThread, Cmd, Incoming, NodeId, Sink, shard_of,
    wire,
};
use crate::proto::OpCode;

pub mod cluster;
mod history;

/// The Redis client's settings. [`RedisOptions::default`] gives the production values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RedisOptions {
    /// Put before every topic to make its channel name. Default `"wsring:"`.
    pub prefix: String,
    /// Use sharded pub/sub (SSUBSCRIBE / SUNSUBSCRIBE / SPUBLISH, Redis 7) instead of
    /// SUBSCRIBE / PUBLISH. Default `false`. Each URL is still its own shard; for a Redis
    /// Cluster set [`RedisOptions::cluster`].
    pub sharded: bool,
    /// The URLs are seed nodes of one Redis Cluster (Redis 7 or later): sharded pub/sub,
    /// each channel on the master that owns its key slot (see the module documentation).
    /// Implies [`RedisOptions::sharded`]. Default `false`.
    pub cluster: bool,
    /// How often each shard sends an idle probe through itself. Default 5 s.
    pub probe_interval: Duration,
    /// How long a probe may take to come back before the shard is rebuilt. Default 3 s.
    pub probe_timeout: Duration,
    /// The bound on establishing one connection. Default 2 s.
    pub connect_timeout: Duration,
    /// The bound on one command's (or pipeline's) response. Default 2 s.
    pub command_timeout: Duration,
    /// The first reconnect pause (it doubles per failed attempt, with jitter). Default 100 ms.
    pub backoff_base: Duration,
    /// The longest reconnect pause. Default 5 s.
    pub backoff_max: Duration,
    /// Publishes queued per shard before [`Broker::publish`] returns `false`. Default 65,536.
    pub queue_capacity: usize,
    /// Channels per SUBSCRIBE command when subscribing the whole set. Default 500.
    pub subscribe_batch: usize,
    /// Most messages sent in one PUBLISH pipeline, and delivered to the sink in one
    /// batch. Default 256.
    pub batch: usize,
}

impl Default for RedisOptions {
    fn default() -> RedisOptions {
        RedisOptions {
            prefix: "wsring:".to_owned(),
            sharded: false,
            cluster: false,
            probe_interval: Duration::from_secs(5),
            probe_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(2),
            command_timeout: Duration::from_secs(2),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            queue_capacity: 65_536,
            subscribe_batch: 500,
            batch: 256,
        }
    }
}

/// Why a [`RedisBroker`] could not be configured.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RedisConfigError {
    /// No URL at all.
    #[error("no Redis URL given")]
    NoUrl,
    /// A URL that is not `redis://host[:port][/db]`.
    #[error("Redis URL {url:?}: {reason}")]
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An option out of range.
    #[error("Redis options: {0}")]
    Options(&'static str),
}

/// One message to publish: the channel name and the encoded payload.
#[derive(Debug)]
struct Outgoing {
    channel: Vec<u8>,
    payload: Bytes,
    /// For a topic with history: published through the numbering script.
    numbered: Option<history::Numbering>,
}

/// What the engine's side holds per shard.
struct ShardHandle {
    cmds: mpsc::UnboundedSender<Cmd>,
    publish: mpsc::Sender<Outgoing>,
}

/// The receiving ends, created with the client and moved into its thread by `start`.
struct ShardQueues {
    cmds: mpsc::UnboundedReceiver<Cmd>,
    publish: mpsc::Receiver<Outgoing>,
}

/// A [`Broker`] over Redis pub/sub. See the [module documentation](self).
pub struct RedisBroker {
    opts: Arc<RedisOptions>,
    /// Per shard, the servers it connects to: one (its own) or, for a cluster, the seeds.
    seeds: Vec<Vec<ConnectionInfo>>,
    shards: Vec<ShardHandle>,
    stats: Arc<BrokerStats>,
    node: std::sync::atomic::AtomicU64,
    thread: ClientThread<Vec<ShardQueues>>,
    description: String,
}

impl std::fmt::Debug for RedisBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RedisBroker")
            .field("servers", &self.description)
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

fn parse_url(url: &str) -> Result<ConnectionInfo, RedisConfigError> {
    let bad = |reason: String| RedisConfigError::Url {
        url: url.to_owned(),
        reason,
    };
    if !url.starts_with("redis://") {
        return Err(bad(
            "only redis://host[:port][/db] is supported (no TLS, no unix sockets)".to_owned(),
        ));
    }
    let info = url.into_connection_info().map_err(|e| bad(e.to_string()))?;
    match info.addr() {
        ConnectionAddr::Tcp(host, _) if !host.is_empty() => Ok(info),
        _ => Err(bad("no host".to_owned())),
    }
}

impl RedisBroker {
    /// A client for the Redis servers at `urls` (`redis://host[:port][/db]`). Each one is a
    /// shard: a topic lives on shard [`shard_of`]`(topic, urls.len())`, so every node must
    /// list the same servers in the same order. With [`RedisOptions::cluster`] they are
    /// instead seed nodes of one Redis Cluster (any of its nodes; the slot map is read from
    /// the first that answers). Nothing connects until [`Broker::start`].
    ///
    /// # Errors
    /// No URL, a URL that does not parse or is not `redis://`, or an option of zero.
    pub fn new(urls: &[String], mut opts: RedisOptions) -> Result<RedisBroker, RedisConfigError> {
        if urls.is_empty() {
            return Err(RedisConfigError::NoUrl);
        }
        let infos = urls
            .iter()
            .map(|u| parse_url(u))
            .collect::<Result<Vec<_>, _>>()?;
        if opts.queue_capacity == 0 || opts.subscribe_batch == 0 || opts.batch == 0 {
            return Err(RedisConfigError::Options(
                "queue_capacity, subscribe_batch and batch must be at least 1",
            ));
        }
        if opts.probe_interval.is_zero()
            || opts.probe_timeout.is_zero()
            || opts.connect_timeout.is_zero()
            || opts.command_timeout.is_zero()
        {
            return Err(RedisConfigError::Options(
                "probe_interval, probe_timeout, connect_timeout and command_timeout must not be zero",
            ));
        }
        if opts.backoff_base.is_zero() || opts.backoff_max < opts.backoff_base {
            return Err(RedisConfigError::Options(
                "backoff_base must not be zero and backoff_max not below it",
            ));
        }
        if opts.cluster {
            opts.sharded = true;
            if infos.iter().any(|i| i.redis_settings().db() != 0) {
                return Err(RedisConfigError::Options(
                    "a Redis Cluster has only database 0: no /db in its URLs",
                ));
            }
        }
        let addrs: Vec<String> = infos.iter().map(|i| i.addr().to_string()).collect();
        let (description, seeds) = if opts.cluster {
            let d = format!(
                "redis cluster (seeds {}; sharded pub/sub by key slot)",
                addrs.join(", ")
            );
            (d, vec![infos])
        } else {
            let d = format!(
                "redis {} ({} shard{}{})",
                addrs.join(", "),
                infos.len(),
                if infos.len() == 1 { "" } else { "s" },
                if opts.sharded {
                    ", sharded pub/sub"
                } else {
                    ""
                }
            );
            (d, infos.into_iter().map(|i| vec![i]).collect())
        };
        let mut shards = Vec::with_capacity(seeds.len());
        let mut queues = Vec::with_capacity(seeds.len());
        for _ in &seeds {
            let (ctx, crx) = mpsc::unbounded_channel();
            let (ptx, prx) = mpsc::channel(opts.queue_capacity);
            shards.push(ShardHandle {
                cmds: ctx,
                publish: ptx,
            });
            queues.push(ShardQueues {
                cmds: crx,
                publish: prx,
            });
        }
        Ok(RedisBroker {
            opts: Arc::new(opts),
            seeds,
            shards,
            stats: Arc::new(BrokerStats::default()),
            node: std::sync::atomic::AtomicU64::new(0),
            thread: ClientThread::new("Redis", queues),
            description,
        })
    }

    /// The options it was built with.
    pub fn options(&self) -> &RedisOptions {
        &self.opts
    }

    fn shard(&self, topic: &str) -> &ShardHandle {
        &self.shards[shard_of(topic, self.shards.len())]
    }
}

impl Broker for RedisBroker {
    fn start(&self, node: NodeId, sink: Arc<dyn Sink>) -> std::io::Result<()> {
        self.node.store(node, Ordering::Relaxed);
        let mut probe_channel = self.opts.prefix.as_bytes().to_vec();
        probe_channel.push(0xFF);
        probe_channel.extend_from_slice(format!("probe:{node:016x}").as_bytes());
        let shared = Arc::new(Shared {
            node,
            sink,
            stats: Arc::clone(&self.stats),
            opts: Arc::clone(&self.opts),
            probe_channel,
            connected: AtomicUsize::new(0),
            shards: self.seeds.len(),
        });
        let (opts, seeds) = (Arc::clone(&self.opts), self.seeds.clone());
        self.stats.set_state(BrokerState::Connecting);
        self.thread.start(
            move |queues: Vec<ShardQueues>, stop| {
                let shards = queues.into_iter().zip(seeds).enumerate();
                let tasks: Vec<ShardTask> = shards
                    .map(|(index, (q, seeds))| {
                        let addrs: Vec<String> =
                            seeds.iter().map(|i| i.addr().to_string()).collect();
                        ShardTask {
                            index,
                            addr: addrs.join(","),
                            seeds,
                            wanted: HashSet::new(),
                            loads: HashMap::new(),
                            unsubscribing: HashMap::new(),
                            ever_up: false,
                            probe_seq: 0,
                            cmds: q.cmds,
                            publish: q.publish,
                            stop: stop.clone(),
                            backoff: Backoff::new(opts.backoff_base, opts.backoff_max),
                            shared: Arc::clone(&shared),
                        }
                    })
                    .collect();
                tasks
            },
            |tasks| futures_util::future::join_all(tasks.into_iter().map(ShardTask::run)),
        )
    }

    fn subscribe(&self, topic: &str) {
        // The receiver lives as long as the thread; after stop there is nothing to do.
        let _ = self
            .shard(topic)
            .cmds
            .send(Cmd::Subscribe(Arc::from(topic)));
    }

    fn unsubscribe(&self, topic: &str) {
        let _ = self
            .shard(topic)
            .cmds
            .send(Cmd::Unsubscribe(Arc::from(topic)));
    }

    fn publish(&self, topic: &str, opcode: OpCode, payload: &[u8]) -> bool {
        let node = self.node.load(Ordering::Relaxed);
        let channel = channel_of(&self.opts.prefix, topic);
        let msg = Outgoing {
            channel,
            payload: wire::encode(node, opcode, payload),
            numbered: None,
        };
        self.enqueue(topic, msg)
    }

    fn numbers(&self) -> bool {
        // A cluster would need the history's keys and the channel in one slot.
        !self.opts.cluster
    }

    fn publish_numbered(
        &self,
        topic: &str,
        opcode: OpCode,
        payload: &[u8],
        limits: &crate::pubsub::history::Limits,
    ) -> bool {
        let node = self.node.load(Ordering::Relaxed);
        let msg = Outgoing {
            channel: channel_of(&self.opts.prefix, topic),
            payload: wire::encode_for_numbering(node, opcode, payload),
            numbered: Some(history::Numbering {
                topic: Arc::from(topic),
                cap: limits.count.max(1),
                ttl_ms: u64::try_from(limits.ttl.as_millis()).unwrap_or(u64::MAX),
            }),
        };
        self.enqueue(topic, msg)
    }

    fn load(&self, topic: &str, limits: &crate::pubsub::history::Limits) {
        let ttl = u64::try_from(limits.ttl.as_millis()).unwrap_or(u64::MAX);
        let _ = self
            .shard(topic)
            .cmds
            .send(Cmd::Load(Arc::from(topic), ttl));
    }

    fn stats(&self) -> &BrokerStats {
        &self.stats
    }

    fn describe(&self) -> String {
        self.description.clone()
    }

    fn stop(&self) {
        self.thread.stop();
        self.stats.set_state(BrokerState::Stopped);
    }
}

impl RedisBroker {
    /// Hands a publication to its shard's bounded queue; a full queue counts it in
    /// `out_failed` (never blocking the engine).
    fn enqueue(&self, topic: &str, msg: Outgoing) -> bool {
        match self.shard(topic).publish.try_send(msg) {
            Ok(()) => true,
            Err(_) => {
                self.stats.out_failed.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }
}

impl Drop for RedisBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The channel of `topic`: the prefix, then the topic.
fn channel_of(prefix: &str, topic: &str) -> Vec<u8> {
    let mut channel = Vec::with_capacity(prefix.len() + topic.len());
    channel.extend_from_slice(prefix.as_bytes());
    channel.extend_from_slice(topic.as_bytes());
    channel
}

/// What the shard tasks share (all on the client's one thread).
struct Shared {
    node: NodeId,
    sink: Arc<dyn Sink>,
    stats: Arc<BrokerStats>,
    opts: Arc<RedisOptions>,
    /// The base of the node's probe channels (see the module documentation).
    probe_channel: Vec<u8>,
    connected: AtomicUsize,
    shards: usize,
}

impl Shared {
    fn set_connected(&self, up: bool) {
        let now = if up {
            self.connected.fetch_add(1, Ordering::AcqRel) + 1
        } else {
            self.connected.fetch_sub(1, Ordering::AcqRel) - 1
        };
        self.stats.set_state(if now == 0 {
            BrokerState::Connecting
        } else if now >= self.shards {
            BrokerState::Up
        } else {
            BrokerState::Degraded
        });
    }

    fn verb(&self) -> &'static str {
        if self.opts.sharded {
            "SPUBLISH"
        } else {
            "PUBLISH"
        }
    }
}

/// Why a connected session ended.
enum End {
    /// Told to stop (or the client was dropped).
    Stop,
    /// A connection failed, a command timed out or a probe was lost: rebuild.
    Failed(String),
}

/// The two connections to one server: one that only subscribes (RESP3, its pushes go to
/// the shard's queue) and one that only publishes.
struct NodeConns {
    sub: MultiplexedConnection,
    publ: MultiplexedConnection,
}

/// A connected shard: its servers (its one server, or every master of a cluster), the
/// pushes of all their subscriber connections in one queue, and where each channel lives.
struct Conns {
    nodes: Vec<NodeConns>,
    pushes: mpsc::UnboundedReceiver<PushInfo>,
    /// The slot map of a cluster; `None`: every channel is on `nodes[0]`.
    slots: Option<cluster::SlotMap>,
    /// The probe channel of each server (as in `nodes`).
    probes: Vec<Vec<u8>>,
}

impl Conns {
    /// The server `channel` is subscribed and published on.
    fn node_of(&self, channel: &[u8]) -> usize {
        self.slots
            .as_ref()
            .map_or(0, |m| m.owner(cluster::slot(channel)))
    }
}

/// One turn of the connected loop.
enum Event {
    Stop,
    Push(Option<PushInfo>),
    Cmd(Option<Cmd>),
    Publish(usize),
    ProbeTick,
    ProbeLate,
}

/// The probe in flight: its number, when it is late, and how many servers have not sent
/// it back yet.
type Probe = Option<(u64, tokio::time::Instant, usize)>;

fn connection_config(opts: &RedisOptions) -> AsyncConnectionConfig {
    AsyncConnectionConfig::new()
        .set_connection_timeout(Some(opts.connect_timeout))
        .set_response_timeout(Some(opts.command_timeout))
}

/// Opens the two connections to one server; the subscriber's pushes go to `pushes`.
async fn open_node(
    info: &ConnectionInfo,
    pushes: mpsc::UnboundedSender<PushInfo>,
    opts: &RedisOptions,
) -> RedisResult<NodeConns> {
    let resp3 = info.clone().set_redis_settings(
        info.redis_settings()
            .clone()
            .set_protocol(ProtocolVersion::RESP3),
    );
    let config = connection_config(opts);
    let sub = Client::open(resp3)?
        .get_multiplexed_async_connection_with_config(&config.clone().set_push_sender(pushes))
        .await?;
    let publ = Client::open(info.clone())?
        .get_multiplexed_async_connection_with_config(&config)
        .await?;
    Ok(NodeConns { sub, publ })
}

/// Reads the slot map from the first seed that answers `CLUSTER SLOTS`; the map and the
/// seed (whose settings the masters' connections take).
async fn read_slot_map(
    seeds: &[ConnectionInfo],
    opts: &RedisOptions,
) -> Result<(cluster::SlotMap, ConnectionInfo), String> {
    let mut errors = Vec::new();
    for seed in seeds {
        let reply = async {
            let mut c = Client::open(seed.clone())?
                .get_multiplexed_async_connection_with_config(&connection_config(opts))
                .await?;
            redis::cmd("CLUSTER")
                .arg("SLOTS")
                .query_async::<Value>(&mut c)
                .await
        };
        let host = match seed.addr() {
            ConnectionAddr::Tcp(host, _) => host.as_str(),
            _ => "",
        };
        match reply.await {
            Ok(reply) => match cluster::SlotMap::parse(&reply, host) {
                Ok(map) => return Ok((map, seed.clone())),
                Err(e) => errors.push(format!("{}: {e}", seed.addr())),
            },
            Err(e) => errors.push(format!("{}: {e}", seed.addr())),
        }
    }
    Err(format!("no seed gave a slot map ({})", errors.join("; ")))
}

/// Connects a shard: its one server, or every master of the cluster its seeds belong to.
async fn connect(
    seeds: &[ConnectionInfo],
    opts: &RedisOptions,
    probe_channel: &[u8],
) -> Result<Conns, String> {
    let (tx, pushes) = mpsc::unbounded_channel();
    if !opts.cluster {
        let node = open_node(&seeds[0], tx, opts)
            .await
            .map_err(|e| e.to_string())?;
        return Ok(Conns {
            nodes: vec![node],
            pushes,
            slots: None,
            probes: vec![probe_channel.to_vec()],
        });
    }
    let (map, seed) = read_slot_map(seeds, opts).await?;
    let opening = map.masters.iter().map(|(host, port)| {
        let info = seed
            .clone()
            .set_addr(ConnectionAddr::Tcp(host.clone(), *port));
        let tx = tx.clone();
        async move {
            open_node(&info, tx, opts)
                .await
                .map_err(|e| format!("{}: {e}", info.addr()))
        }
    });
    let nodes = futures_util::future::try_join_all(opening).await?;
    let probes = (0..nodes.len())
        .map(|m| {
            let mut c = probe_channel.to_vec();
            c.extend_from_slice(format!(":{{{}}}", map.tag_for(m)).as_bytes());
            c
        })
        .collect();
    Ok(Conns {
        nodes,
        pushes,
        slots: Some(map),
        probes,
    })
}

/// One shard: its connections, its wanted topics, its queues.
struct ShardTask {
    index: usize,
    /// For the logs: the server, or the cluster's seeds.
    addr: String,
    seeds: Vec<ConnectionInfo>,
    wanted: HashSet<Arc<str>>,
    /// Topics with history the engine keeps a copy of: loaded again after a reconnect
    /// (what was published while down is in the stream), with their keys' lifetime.
    loads: HashMap<Arc<str>, u64>,
    /// Channels this session sent SUNSUBSCRIBE for, whose confirmations have not come
    /// back yet (a cluster only): any other SUNSUBSCRIBE is the server's, sent because the
    /// channel's slot left it.
    unsubscribing: HashMap<Vec<u8>, u32>,
    ever_up: bool,
    probe_seq: u64,
    cmds: mpsc::UnboundedReceiver<Cmd>,
    publish: mpsc::Receiver<Outgoing>,
    stop: watch::Receiver<bool>,
    backoff: Backoff,
    shared: Arc<Shared>,
}

impl ShardTask {
    async fn run(mut self) {
        loop {
            let opts = Arc::clone(&self.shared.opts);
            let attempt = tokio::select! {
                c = connect(&self.seeds, &opts, &self.shared.probe_channel) => Some(c),
                _ = self.stop.wait_for(|s| *s) => None,
            };
            let Some(attempt) = attempt else { return };
            let mut conns = match attempt {
                Ok(c) => c,
                Err(e) => {
                    tracing::debug!(shard = self.index, addr = %self.addr, "redis connect failed: {e}");
                    if self.pause().await {
                        return;
                    }
                    continue;
                }
            };
            self.drain_cmds();
            self.unsubscribing.clear();
            let started = Instant::now();
            let all: Vec<Arc<str>> = self.wanted.iter().cloned().collect();
            let mut channels: Vec<Vec<u8>> = all.iter().map(|t| self.channel(t)).collect();
            channels.extend(conns.probes.iter().cloned());
            if let Err(e) = self.change(&conns, &channels, true).await {
                tracing::warn!(shard = self.index, addr = %self.addr, "redis resubscribe failed: {e}");
                if self.pause().await {
                    return;
                }
                continue;
            }
            let stats = &self.shared.stats;
            stats.resubscribe_micros.store(
                started.elapsed().as_micros().max(1) as u64,
                Ordering::Relaxed,
            );
            let loads: Vec<(Arc<str>, u64)> = self
                .loads
                .iter()
                .map(|(t, ttl)| (t.clone(), *ttl))
                .collect();
            if let Err(e) = self.load_all(&conns, &loads).await {
                tracing::warn!(shard = self.index, addr = %self.addr, "redis history reload failed: {e}");
                if self.pause().await {
                    return;
                }
                continue;
            }
            let mut on_broker = all.len() as u64;
            stats.topics.fetch_add(on_broker, Ordering::Relaxed);
            if self.ever_up {
                stats.reconnects.fetch_add(1, Ordering::Relaxed);
            }
            self.ever_up = true;
            self.backoff.reset();
            self.shared.set_connected(true);
            tracing::info!(
                shard = self.index,
                addr = %self.addr,
                servers = conns.nodes.len(),
                topics = on_broker,
                "redis shard up"
            );

            let end = self.session(&mut conns, &mut on_broker).await;
            self.shared
                .stats
                .topics
                .fetch_sub(on_broker, Ordering::Relaxed);
            match end {
                End::Stop => return,
                End::Failed(why) => {
                    self.shared.set_connected(false);
                    tracing::warn!(shard = self.index, addr = %self.addr, "redis shard down: {why}");
                    drop(conns);
                    if self.pause().await {
                        return;
                    }
                }
            }
        }
    }

    fn channel(&self, topic: &str) -> Vec<u8> {
        channel_of(&self.shared.opts.prefix, topic)
    }

    /// Takes the subscription requests that are waiting into the wanted set.
    fn drain_cmds(&mut self) {
        while let Ok(cmd) = self.cmds.try_recv() {
            self.apply(cmd);
        }
    }

    /// Applies one request to the wanted set; `Some((topic, now wanted))` if it changed it.
    fn apply(&mut self, cmd: Cmd) -> Option<(Arc<str>, bool)> {
        match cmd {
            Cmd::Subscribe(t) => self.wanted.insert(Arc::clone(&t)).then_some((t, true)),
            Cmd::Unsubscribe(t) => {
                self.loads.remove(&t);
                self.wanted.remove(&t).then_some((t, false))
            }
            Cmd::Load(t, ttl) => {
                if self.wanted.contains(&t) {
                    self.loads.insert(t, ttl);
                }
                None
            }
        }
    }

    /// Reads the streams of `topics` (subscribed already) and hands each to the sink.
    async fn load_all(&self, conns: &Conns, topics: &[(Arc<str>, u64)]) -> RedisResult<()> {
        for (topic, ttl) in topics {
            let channel = self.channel(topic);
            let mut c = conns.nodes[conns.node_of(&channel)].publ.clone();
            let timeout = self.shared.opts.command_timeout;
            let read = history::load(&mut c, &self.shared.opts.prefix, topic, *ttl);
            match tokio::time::timeout(timeout, read).await {
                Ok(Ok(Ok(loaded))) => self.shared.sink.loaded(loaded),
                Ok(Ok(Err(why))) => tracing::warn!("redis history load: {why}"),
                Ok(Err(e)) => return Err(e),
                Err(_) => {
                    return Err(redis::RedisError::from((
                        redis::ErrorKind::Io,
                        "history load timed out",
                    )));
                }
            }
        }
        Ok(())
    }

    /// Subscribes (`on`) or unsubscribes `channels`, each on its server's subscriber
    /// connection: pipelined commands of at most `subscribe_batch` channels (one channel
    /// per command when sharded, as a cluster wants them), returning once the servers
    /// confirmed all.
    async fn change(&mut self, conns: &Conns, channels: &[Vec<u8>], on: bool) -> RedisResult<()> {
        let opts = Arc::clone(&self.shared.opts);
        if opts.cluster && !on {
            for ch in channels {
                *self.unsubscribing.entry(ch.clone()).or_insert(0) += 1;
            }
        }
        let mut per_node: Vec<Vec<&[u8]>> = vec![Vec::new(); conns.nodes.len()];
        for ch in channels {
            per_node[conns.node_of(ch)].push(ch);
        }
        let requests = per_node.iter().enumerate().flat_map(|(node, chans)| {
            let opts = &opts;
            chans.chunks(opts.subscribe_batch).map(move |chunk| {
                let mut c = conns.nodes[node].sub.clone();
                async move {
                    if opts.sharded {
                        let mut pipe = redis::pipe();
                        for ch in chunk {
                            pipe.cmd(if on { "SSUBSCRIBE" } else { "SUNSUBSCRIBE" })
                                .arg(*ch);
                        }
                        pipe.query_async::<()>(&mut c).await
                    } else if on {
                        c.subscribe(chunk).await
                    } else {
                        c.unsubscribe(chunk).await
                    }
                }
            })
        });
        futures_util::future::try_join_all(requests).await?;
        Ok(())
    }

    /// Waits out the next backoff pause, still taking requests (into the wanted set) and
    /// publishes (counted as failed: the shard is down). `true` if told to stop.
    async fn pause(&mut self) -> bool {
        let until = tokio::time::Instant::now() + self.backoff.next_delay();
        let mut buf = Vec::new();
        loop {
            let event = tokio::select! {
                _ = tokio::time::sleep_until(until) => return false,
                _ = self.stop.wait_for(|s| *s) => Event::Stop,
                c = self.cmds.recv() => Event::Cmd(c),
                n = self.publish.recv_many(&mut buf, self.shared.opts.batch) => Event::Publish(n),
            };
            match event {
                Event::Cmd(Some(cmd)) => {
                    self.apply(cmd);
                }
                Event::Publish(n) if n > 0 => {
                    let failed = &self.shared.stats.out_failed;
                    failed.fetch_add(n as u64, Ordering::Relaxed);
                    buf.clear();
                }
                _ => return true,
            }
        }
    }

    /// The connected loop: deliver, (un)subscribe, publish, probe, until an error or stop.
    async fn session(&mut self, conns: &mut Conns, on_broker: &mut u64) -> End {
        let opts = Arc::clone(&self.shared.opts);
        let mut out = Vec::with_capacity(opts.batch);
        let mut incoming = Vec::with_capacity(opts.batch);
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + opts.probe_interval,
            opts.probe_interval,
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut probe: Probe = None;
        loop {
            let late = async {
                match probe {
                    Some((_, at, _)) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let event = tokio::select! {
                _ = self.stop.wait_for(|s| *s) => Event::Stop,
                p = conns.pushes.recv() => Event::Push(p),
                c = self.cmds.recv() => Event::Cmd(c),
                n = self.publish.recv_many(&mut out, opts.batch) => Event::Publish(n),
                _ = tick.tick() => Event::ProbeTick,
                _ = late => Event::ProbeLate,
            };
            match event {
                Event::Stop | Event::Cmd(None) | Event::Publish(0) => return End::Stop,
                Event::Push(None) => return End::Failed("subscriber connection closed".into()),
                Event::Push(Some(first)) => {
                    let mut lost = self.on_push(first, &conns.probes, &mut incoming, &mut probe);
                    while lost.is_ok() && incoming.len() < opts.batch {
                        match conns.pushes.try_recv() {
                            Ok(p) => {
                                lost = self.on_push(p, &conns.probes, &mut incoming, &mut probe);
                            }
                            Err(_) => break,
                        }
                    }
                    if !incoming.is_empty() {
                        self.shared.sink.deliver(&incoming);
                        self.shared
                            .stats
                            .messages_in
                            .fetch_add(incoming.len() as u64, Ordering::Relaxed);
                        incoming.clear();
                    }
                    if let Err(why) = lost {
                        return End::Failed(why);
                    }
                }
                Event::Cmd(Some(first)) => {
                    if let Err(e) = self.on_cmds(first, conns, on_broker).await {
                        return End::Failed(format!("(un)subscribe: {e}"));
                    }
                }
                Event::Publish(_) => {
                    if let Err(e) = self.publish_batch(conns, &mut out).await {
                        return End::Failed(format!("publish: {e}"));
                    }
                }
                Event::ProbeTick => {
                    if probe.is_none() {
                        if let Err(why) = self.send_probes(conns).await {
                            return End::Failed(why);
                        }
                        let deadline = tokio::time::Instant::now() + opts.probe_timeout;
                        probe = Some((self.probe_seq, deadline, conns.nodes.len()));
                    }
                }
                Event::ProbeLate => {
                    self.shared
                        .stats
                        .probes_failed
                        .fetch_add(1, Ordering::Relaxed);
                    return End::Failed(format!("probe not back within {:?}", opts.probe_timeout));
                }
            }
        }
    }

    /// Publishes `out` (emptying it): one pipeline per server, in the order they were
    /// queued, the servers at once. Counts what was sent and what failed.
    async fn publish_batch(&self, conns: &Conns, out: &mut Vec<Outgoing>) -> RedisResult<()> {
        let verb = self.shared.verb();
        let mut pipes: Vec<(redis::Pipeline, u64)> =
            conns.nodes.iter().map(|_| (redis::pipe(), 0)).collect();
        for m in out.drain(..) {
            let (pipe, n) = &mut pipes[conns.node_of(&m.channel)];
            match &m.numbered {
                Some(numbering) => history::add_publication(
                    pipe,
                    &self.shared.opts.prefix,
                    &numbering.topic,
                    &m.channel,
                    &m.payload,
                    numbering,
                    verb,
                ),
                None => {
                    pipe.cmd(verb)
                        .arg(&m.channel[..])
                        .arg(&m.payload[..])
                        .ignore();
                }
            }
            *n += 1;
        }
        let sends = pipes
            .into_iter()
            .zip(&conns.nodes)
            .filter(|((_, n), _)| *n > 0)
            .map(|((pipe, n), node)| {
                let mut c = node.publ.clone();
                async move { (n, pipe.query_async::<()>(&mut c).await) }
            });
        let stats = &self.shared.stats;
        let mut failure = Ok(());
        for (n, result) in futures_util::future::join_all(sends).await {
            match result {
                Ok(()) => stats.messages_out.fetch_add(n, Ordering::Relaxed),
                Err(e) => {
                    failure = Err(e);
                    stats.out_failed.fetch_add(n, Ordering::Relaxed)
                }
            };
        }
        failure
    }

    /// Publishes the next probe through every server.
    async fn send_probes(&mut self, conns: &Conns) -> Result<(), String> {
        self.probe_seq += 1;
        let payload = wire::encode(
            self.shared.node,
            OpCode::Binary,
            &self.probe_seq.to_le_bytes(),
        );
        let verb = self.shared.verb();
        let sends = conns
            .nodes
            .iter()
            .zip(&conns.probes)
            .map(|(node, channel)| {
                let mut c = node.publ.clone();
                let mut cmd = redis::cmd(verb);
                cmd.arg(&channel[..]).arg(&payload[..]);
                async move { cmd.query_async::<()>(&mut c).await }
            });
        let timeout = self.shared.opts.probe_timeout;
        // A wedged server may not even answer the PUBLISH: that too is a probe not back in
        // time.
        match tokio::time::timeout(timeout, futures_util::future::try_join_all(sends)).await {
            Ok(Ok(_)) => Ok(()),
            Ok(Err(e)) => Err(format!("probe publish: {e}")),
            Err(_) => {
                let failed = &self.shared.stats.probes_failed;
                failed.fetch_add(1, Ordering::Relaxed);
                Err("probe publish not answered".into())
            }
        }
    }

    /// Takes `first` and the requests waiting behind it (up to a batch), and sends the net
    /// change: one UNSUBSCRIBE and one SUBSCRIBE (batched) for the topics whose wanted
    /// state changed.
    async fn on_cmds(
        &mut self,
        first: Cmd,
        conns: &mut Conns,
        on_broker: &mut u64,
    ) -> RedisResult<()> {
        // Topic -> was it wanted before this batch of requests.
        let mut touched: HashMap<Arc<str>, bool> = HashMap::new();
        let mut next = Some(first);
        let mut taken = 0;
        let mut loads = Vec::new();
        while let Some(cmd) = next.take() {
            let topic = match &cmd {
                Cmd::Subscribe(t) | Cmd::Unsubscribe(t) => Arc::clone(t),
                Cmd::Load(t, ttl) => {
                    loads.push((Arc::clone(t), *ttl));
                    Arc::clone(t)
                }
            };
            let before = self.wanted.contains(&topic);
            touched.entry(topic).or_insert(before);
            self.apply(cmd);
            taken += 1;
            if taken < self.shared.opts.subscribe_batch {
                next = self.cmds.try_recv().ok();
            }
        }
        let mut subs = Vec::new();
        let mut unsubs = Vec::new();
        for (topic, before) in touched {
            match (before, self.wanted.contains(&topic)) {
                (false, true) => subs.push(self.channel(&topic)),
                (true, false) => unsubs.push(self.channel(&topic)),
                _ => {}
            }
        }
        let stats = Arc::clone(&self.shared.stats);
        if !unsubs.is_empty() {
            self.change(conns, &unsubs, false).await?;
            *on_broker -= unsubs.len() as u64;
            stats
                .topics
                .fetch_sub(unsubs.len() as u64, Ordering::Relaxed);
        }
        if !subs.is_empty() {
            self.change(conns, &subs, true).await?;
            *on_broker += subs.len() as u64;
            stats.topics.fetch_add(subs.len() as u64, Ordering::Relaxed);
        }
        // After the subscriptions: what is published from now on arrives on the channel.
        loads.retain(|(t, _)| self.wanted.contains(t));
        self.load_all(conns, &loads).await
    }

    /// Handles one push from a subscriber connection: a message for the batch, a probe, a
    /// confirmation to ignore, or the end of the session (`Err`, why): the connection is
    /// gone, or a cluster node dropped a subscription because its slot moved.
    fn on_push(
        &mut self,
        push: PushInfo,
        probes: &[Vec<u8>],
        batch: &mut Vec<Incoming>,
        probe: &mut Probe,
    ) -> Result<(), String> {
        match push.kind {
            PushKind::Message | PushKind::SMessage => {}
            PushKind::Disconnection => return Err("subscriber connection lost".into()),
            PushKind::SUnsubscribe if self.shared.opts.cluster => {
                let Some(Value::BulkString(channel)) = push.data.first() else {
                    return Ok(());
                };
                return match self.unsubscribing.get_mut(channel) {
                    Some(1) => {
                        self.unsubscribing.remove(channel);
                        Ok(())
                    }
                    Some(waiting) => {
                        *waiting -= 1;
                        Ok(())
                    }
                    None => Err(format!(
                        "the server dropped the subscription to {} (its slot moved)",
                        String::from_utf8_lossy(channel)
                    )),
                };
            }
            // Subscription confirmations and anything else.
            _ => return Ok(()),
        }
        let stats = &self.shared.stats;
        let mut data = push.data.into_iter();
        let (Some(Value::BulkString(channel)), Some(Value::BulkString(payload))) =
            (data.next(), data.next())
        else {
            stats.decode_errors.fetch_add(1, Ordering::Relaxed);
            return Ok(());
        };
        if probes.contains(&channel) {
            let mut done = false;
            if let (Ok(d), Some((seq, _, waiting))) =
                (wire::decode(Bytes::from(payload)), probe.as_mut())
                && d.origin == self.shared.node
                && d.payload[..] == seq.to_le_bytes()
            {
                *waiting -= 1;
                done = *waiting == 0;
            }
            if done {
                *probe = None;
            }
            return Ok(());
        }
        let topic = channel
            .strip_prefix(self.shared.opts.prefix.as_bytes())
            .and_then(|t| std::str::from_utf8(t).ok())
            .and_then(|t| self.wanted.get(t));
        // A message for a topic given up a moment ago (or not ours at all): no one wants it.
        let Some(topic) = topic else { return Ok(()) };
        match wire::decode(Bytes::from(payload)) {
            Err(_) => {
                stats.decode_errors.fetch_add(1, Ordering::Relaxed);
            }
            // A numbered publication comes back to its own node too: that is how it is
            // delivered there, in the broker's order.
            Ok(d) if d.origin == self.shared.node && d.number.is_none() => {
                stats.own_skipped.fetch_add(1, Ordering::Relaxed);
            }
            Ok(d) => batch.push(Incoming {
                topic: Arc::clone(topic),
                opcode: d.opcode,
                payload: d.payload,
                number: d.number.map(|(e, o)| (crate::pubsub::history::Epoch(e), o)),
            }),
        }
        Ok(())
    }
}
