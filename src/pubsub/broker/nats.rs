//! The NATS backplane client: core NATS subjects, one subject per topic.
//!
//! Several URLs are servers of one NATS cluster (not shards): async-nats connects to one of
//! them, and reconnects and resubscribes by itself. The client hooks its event callback to
//! keep [`BrokerStats::state`] and [`BrokerStats::reconnects`], and after each reconnection
//! flushes (a PING round trip behind the resubscriptions async-nats queued) to time the
//! resubscription into [`BrokerStats::resubscribe_micros`]; the state is [`BrokerState::Up`]
//! once that flush came back.
//!
//! A topic's subject is [`NatsOptions::prefix`] then the topic as one subject token
//! ([`subject_token`]: `[A-Za-z0-9_-]` kept, every other byte written `%XX`), so any topic
//! string is a valid subject and no topic can reach into another's (no `.`, `*` or `>`).
//!
//! One std thread (`wsring-broker`) runs a tokio current-thread runtime: a main task that
//! takes the engine's requests (an unbounded channel for (un)subscriptions, a bounded one
//! for publishes), one small task per subscribed topic that forwards its messages, and the
//! main task batches what arrived for the sink. Publishes go out in call order on the one
//! client connection; while the client is not connected they are counted in
//! [`BrokerStats::out_failed`] and dropped (at most once across nodes).
//!
//! Every [`NatsOptions::probe_interval`] the client publishes a probe to a subject private
//! to the node (`<prefix>__probe.<node id in hex>`, two tokens, so no topic's subject); one
//! that does not come back within [`NatsOptions::probe_timeout`] is counted in
//! [`BrokerStats::probes_failed`] and the connection is rebuilt (`force_reconnect`).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::{ConnectOptions, ServerAddr};
use bytes::Bytes;
use futures_util::StreamExt;
use tokio::sync::{mpsc, oneshot, watch};

use super::{
    Backoff, Broker, BrokerState, BrokerStats, ClientThread, Cmd, Incoming, NodeId, Sink, wire,
};
use crate::proto::OpCode;

/// The NATS client's settings. [`NatsOptions::default`] gives the production values.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct NatsOptions {
    /// Put before every topic's token to make its subject; empty, or ending in `.`.
    /// Default `"wsring."`.
    pub prefix: String,
    /// How often the client sends an idle probe through the server. Default 5 s.
    pub probe_interval: Duration,
    /// How long a probe may take to come back before the connection is rebuilt. Default 3 s.
    pub probe_timeout: Duration,
    /// The bound on establishing one connection. Default 2 s.
    pub connect_timeout: Duration,
    /// The bound on handing one command to the connection, and on a flush. Default 2 s.
    pub command_timeout: Duration,
    /// The first reconnect pause (it doubles per failed attempt, with jitter). Default 100 ms.
    pub backoff_base: Duration,
    /// The longest reconnect pause. Default 5 s.
    pub backoff_max: Duration,
    /// Publishes queued before [`Broker::publish`] returns `false`. Default 65,536.
    pub queue_capacity: usize,
    /// Most messages delivered to the sink in one batch (and published per turn). Default 256.
    pub batch: usize,
}

impl Default for NatsOptions {
    fn default() -> NatsOptions {
        NatsOptions {
            prefix: "wsring.".to_owned(),
            probe_interval: Duration::from_secs(5),
            probe_timeout: Duration::from_secs(3),
            connect_timeout: Duration::from_secs(2),
            command_timeout: Duration::from_secs(2),
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(5),
            queue_capacity: 65_536,
            batch: 256,
        }
    }
}

/// Why a [`NatsBroker`] could not be configured.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NatsConfigError {
    /// No URL at all.
    #[error("no NATS URL given")]
    NoUrl,
    /// A URL that is not `nats://host[:port]`.
    #[error("NATS URL {url:?}: {reason}")]
    Url {
        /// The URL as given.
        url: String,
        /// What is wrong with it.
        reason: String,
    },
    /// An option out of range.
    #[error("NATS options: {0}")]
    Options(&'static str),
}

/// A topic as one subject token: `[A-Za-z0-9_-]` as they are, every other byte of its UTF-8
/// as `%XX` (upper-case hex). The empty topic is the token `%`.
pub fn subject_token(topic: &str) -> String {
    if topic.is_empty() {
        return "%".to_owned();
    }
    let mut out = String::with_capacity(topic.len());
    for &b in topic.as_bytes() {
        if b.is_ascii_alphanumeric() || b == b'_' || b == b'-' {
            out.push(char::from(b));
        } else {
            const HEX: &[u8; 16] = b"0123456789ABCDEF";
            out.push('%');
            out.push(char::from(HEX[usize::from(b >> 4)]));
            out.push(char::from(HEX[usize::from(b & 15)]));
        }
    }
    out
}

/// The topic back from a [`subject_token`]; `None` if it is not one.
pub fn topic_of_token(token: &str) -> Option<String> {
    if token == "%" {
        return Some(String::new());
    }
    let b = token.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'%' {
            let hex = token.get(i + 1..i + 3)?;
            out.push(u8::from_str_radix(hex, 16).ok()?);
            i += 3;
        } else if b[i].is_ascii_alphanumeric() || b[i] == b'_' || b[i] == b'-' {
            out.push(b[i]);
            i += 1;
        } else {
            return None;
        }
    }
    String::from_utf8(out).ok()
}

/// One message to publish.
#[derive(Debug)]
struct Outgoing {
    subject: String,
    payload: Bytes,
}

struct Queues {
    cmds: mpsc::UnboundedReceiver<Cmd>,
    publish: mpsc::Receiver<Outgoing>,
}

/// A [`Broker`] over core NATS. See the [module documentation](self).
pub struct NatsBroker {
    opts: Arc<NatsOptions>,
    servers: Vec<ServerAddr>,
    cmds: mpsc::UnboundedSender<Cmd>,
    publish: mpsc::Sender<Outgoing>,
    stats: Arc<BrokerStats>,
    node: AtomicU64,
    thread: ClientThread<Queues>,
    description: String,
}

impl std::fmt::Debug for NatsBroker {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NatsBroker")
            .field("servers", &self.description)
            .field("opts", &self.opts)
            .finish_non_exhaustive()
    }
}

fn parse_url(url: &str) -> Result<ServerAddr, NatsConfigError> {
    let bad = |reason: String| NatsConfigError::Url {
        url: url.to_owned(),
        reason,
    };
    if !url.starts_with("nats://") {
        return Err(bad(
            "only nats://host[:port] is supported (no TLS, no websocket)".to_owned(),
        ));
    }
    let addr: ServerAddr = url
        .parse()
        .map_err(|e: std::io::Error| bad(e.to_string()))?;
    if addr.host().is_empty() {
        return Err(bad("no host".to_owned()));
    }
    Ok(addr)
}

impl NatsBroker {
    /// A client for the NATS cluster whose servers are `urls` (`nats://host[:port]`; any
    /// one of them will do, async-nats also learns the others from the cluster). Nothing
    /// connects until [`Broker::start`].
    ///
    /// # Errors
    /// No URL, a URL that does not parse or is not `nats://`, a prefix that is not empty
    /// and does not end in `.` (or holds a space or a wildcard), or an option of zero.
    pub fn new(urls: &[String], opts: NatsOptions) -> Result<NatsBroker, NatsConfigError> {
        if urls.is_empty() {
            return Err(NatsConfigError::NoUrl);
        }
        let servers = urls
            .iter()
            .map(|u| parse_url(u))
            .collect::<Result<Vec<_>, _>>()?;
        let p = &opts.prefix;
        if !(p.is_empty()
            || (p.ends_with('.')
                && !p.starts_with('.')
                && !p.contains("..")
                && !p.contains(|c: char| c.is_whitespace() || c == '*' || c == '>')))
        {
            return Err(NatsConfigError::Options(
                "prefix must be empty or subject tokens each followed by '.' (no spaces or wildcards)",
            ));
        }
        if opts.queue_capacity == 0 || opts.batch == 0 {
            return Err(NatsConfigError::Options(
                "queue_capacity and batch must be at least 1",
            ));
        }
        if opts.probe_interval.is_zero()
            || opts.probe_timeout.is_zero()
            || opts.connect_timeout.is_zero()
            || opts.command_timeout.is_zero()
        {
            return Err(NatsConfigError::Options(
                "probe_interval, probe_timeout, connect_timeout and command_timeout must not be zero",
            ));
        }
        if opts.backoff_base.is_zero() || opts.backoff_max < opts.backoff_base {
            return Err(NatsConfigError::Options(
                "backoff_base must not be zero and backoff_max not below it",
            ));
        }
        let (ctx, crx) = mpsc::unbounded_channel();
        let (ptx, prx) = mpsc::channel(opts.queue_capacity);
        let description = format!(
            "nats {}",
            servers
                .iter()
                .map(|s| format!("{}:{}", s.host(), s.port()))
                .collect::<Vec<_>>()
                .join(", ")
        );
        Ok(NatsBroker {
            opts: Arc::new(opts),
            servers,
            cmds: ctx,
            publish: ptx,
            stats: Arc::new(BrokerStats::default()),
            node: AtomicU64::new(0),
            thread: ClientThread::new(
                "NATS",
                Queues {
                    cmds: crx,
                    publish: prx,
                },
            ),
            description,
        })
    }

    /// The options it was built with.
    pub fn options(&self) -> &NatsOptions {
        &self.opts
    }
}

impl Broker for NatsBroker {
    fn start(&self, node: NodeId, sink: Arc<dyn Sink>) -> std::io::Result<()> {
        self.node.store(node, Ordering::Relaxed);
        let (stats, opts, servers) = (
            Arc::clone(&self.stats),
            Arc::clone(&self.opts),
            self.servers.clone(),
        );
        self.stats.set_state(BrokerState::Connecting);
        self.thread.start(
            move |queues: Queues, stop| Task {
                node,
                sink,
                stats,
                opts,
                servers,
                cmds: queues.cmds,
                publish: queues.publish,
                stop,
            },
            Task::run,
        )
    }

    fn subscribe(&self, topic: &str) {
        let _ = self.cmds.send(Cmd::Subscribe(Arc::from(topic)));
    }

    fn unsubscribe(&self, topic: &str) {
        let _ = self.cmds.send(Cmd::Unsubscribe(Arc::from(topic)));
    }

    fn publish(&self, topic: &str, opcode: OpCode, payload: &[u8]) -> bool {
        let node = self.node.load(Ordering::Relaxed);
        let msg = Outgoing {
            subject: format!("{}{}", self.opts.prefix, subject_token(topic)),
            payload: wire::encode(node, opcode, payload),
        };
        match self.publish.try_send(msg) {
            Ok(()) => true,
            Err(_) => {
                self.stats.out_failed.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
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

impl Drop for NatsBroker {
    fn drop(&mut self) {
        self.stop();
    }
}

/// The client's main task.
struct Task {
    node: NodeId,
    sink: Arc<dyn Sink>,
    stats: Arc<BrokerStats>,
    opts: Arc<NatsOptions>,
    servers: Vec<ServerAddr>,
    cmds: mpsc::UnboundedReceiver<Cmd>,
    publish: mpsc::Receiver<Outgoing>,
    stop: watch::Receiver<bool>,
}

/// One turn of the main loop.
enum Event {
    Stop,
    Connected(Option<Instant>),
    Cmd(Option<Cmd>),
    Messages,
    Publish(usize),
    Probe(Option<async_nats::Message>),
    ProbeTick,
    ProbeLate,
}

/// A topic's forwarding task: dropping (or sending on) `stop` unsubscribes it.
struct Subscription {
    topic: Arc<str>,
    stop: oneshot::Sender<()>,
}

impl Task {
    async fn run(mut self) {
        let stats = Arc::clone(&self.stats);
        let opts = Arc::clone(&self.opts);
        let (connected_tx, mut connected_rx) = mpsc::unbounded_channel::<Instant>();
        let ever_connected = Arc::new(AtomicBool::new(false));
        let backoff = Mutex::new(Backoff::new(opts.backoff_base, opts.backoff_max));
        let events_stats = Arc::clone(&stats);
        let options = ConnectOptions::new()
            .name("wsring")
            .retry_on_initial_connect()
            .max_reconnects(None)
            .connection_timeout(opts.connect_timeout)
            .request_timeout(Some(opts.command_timeout))
            .reconnect_delay_callback(move |attempts| {
                let mut b = backoff
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                if attempts <= 1 {
                    b.reset();
                }
                b.next_delay()
            })
            .event_callback(move |event| {
                let stats = Arc::clone(&events_stats);
                let ever = Arc::clone(&ever_connected);
                let tx = connected_tx.clone();
                async move {
                    match event {
                        async_nats::Event::Connected => {
                            if ever.swap(true, Ordering::AcqRel) {
                                stats.reconnects.fetch_add(1, Ordering::Relaxed);
                            }
                            let _ = tx.send(Instant::now());
                        }
                        async_nats::Event::Disconnected => {
                            if stats.state() != BrokerState::Stopped {
                                stats.set_state(BrokerState::Connecting);
                            }
                            // async-nats keeps the subscriptions and restores them once
                            // back; until then none is on a server.
                            stats.topics.store(0, Ordering::Relaxed);
                            tracing::warn!("NATS disconnected");
                        }
                        other => tracing::debug!("NATS event: {other}"),
                    }
                }
            });
        let connecting = tokio::select! {
            c = options.connect(self.servers.as_slice()) => Some(c),
            _ = self.stop.wait_for(|s| *s) => None,
        };
        let client = match connecting {
            None => return,
            Some(Ok(c)) => c,
            Some(Err(e)) => {
                // Only a configuration the server list cannot satisfy gets here (the
                // connection itself is retried in the background).
                tracing::error!("NATS client: {e}");
                let _ = self.stop.wait_for(|s| *s).await;
                return;
            }
        };
        let probe_subject = format!("{}__probe.{:016x}", opts.prefix, self.node);
        let mut probe_sub = match client.subscribe(probe_subject.clone()).await {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::error!("NATS probe subscription: {e}");
                None
            }
        };
        let (merged_tx, mut merged) = mpsc::channel::<async_nats::Message>(4096);
        let mut subs: HashMap<String, Subscription> = HashMap::new();
        let mut out = Vec::with_capacity(opts.batch);
        let mut arrived = Vec::with_capacity(opts.batch);
        let mut batch = Vec::with_capacity(opts.batch);
        let mut tick = tokio::time::interval_at(
            tokio::time::Instant::now() + opts.probe_interval,
            opts.probe_interval,
        );
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut probe: Option<(u64, tokio::time::Instant)> = None;
        let mut probe_seq = 0u64;
        loop {
            let late = async {
                match probe {
                    Some((_, at)) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            };
            let probe_next = async {
                match probe_sub.as_mut() {
                    Some(s) => s.next().await,
                    None => std::future::pending().await,
                }
            };
            let event = tokio::select! {
                _ = self.stop.wait_for(|s| *s) => Event::Stop,
                at = connected_rx.recv() => Event::Connected(at),
                p = probe_next => Event::Probe(p),
                _ = merged.recv_many(&mut arrived, opts.batch) => Event::Messages,
                c = self.cmds.recv() => Event::Cmd(c),
                n = self.publish.recv_many(&mut out, opts.batch) => Event::Publish(n),
                _ = tick.tick() => Event::ProbeTick,
                _ = late => Event::ProbeLate,
            };
            match event {
                Event::Stop | Event::Cmd(None) | Event::Publish(0) | Event::Connected(None) => {
                    break;
                }
                Event::Connected(Some(at)) => {
                    // async-nats queued the resubscriptions before telling us; a flush is a
                    // PING behind them, so its PONG says the server has them all.
                    match tokio::time::timeout(opts.command_timeout, client.flush()).await {
                        Ok(Ok(())) => {
                            stats
                                .resubscribe_micros
                                .store(at.elapsed().as_micros().max(1) as u64, Ordering::Relaxed);
                            stats.set_state(BrokerState::Up);
                            stats.topics.store(subs.len() as u64, Ordering::Relaxed);
                            tracing::info!(topics = subs.len(), "NATS connected");
                        }
                        Ok(Err(e)) => tracing::warn!("NATS flush after connect: {e}"),
                        Err(_) => tracing::warn!("NATS flush after connect timed out"),
                    }
                }
                Event::Probe(None) => {
                    tracing::warn!("NATS probe subscription ended");
                    probe_sub = None;
                }
                Event::Probe(Some(m)) => {
                    if let (Ok(d), Some((seq, _))) = (wire::decode(m.payload), probe)
                        && d.origin == self.node
                        && d.payload[..] == seq.to_le_bytes()
                    {
                        probe = None;
                    }
                }
                Event::Messages => {
                    for m in arrived.drain(..) {
                        let topic = m
                            .subject
                            .strip_prefix(opts.prefix.as_str())
                            .and_then(topic_of_token)
                            .and_then(|t| subs.get(&t));
                        // Given up a moment ago: no one wants it.
                        let Some(sub) = topic else { continue };
                        match wire::decode(m.payload) {
                            Err(_) => {
                                stats.decode_errors.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(d) if d.origin == self.node => {
                                stats.own_skipped.fetch_add(1, Ordering::Relaxed);
                            }
                            Ok(d) => batch.push(Incoming {
                                topic: Arc::clone(&sub.topic),
                                opcode: d.opcode,
                                payload: d.payload,
                                number: None,
                            }),
                        }
                    }
                    if !batch.is_empty() {
                        self.sink.deliver(&batch);
                        stats
                            .messages_in
                            .fetch_add(batch.len() as u64, Ordering::Relaxed);
                        batch.clear();
                    }
                }
                Event::Cmd(Some(Cmd::Subscribe(topic))) => {
                    if subs.contains_key(&*topic) {
                        continue;
                    }
                    let subject = format!("{}{}", opts.prefix, subject_token(&topic));
                    let subscribed =
                        tokio::time::timeout(opts.command_timeout, client.subscribe(subject)).await;
                    let subscriber = match subscribed {
                        Ok(Ok(s)) => s,
                        Ok(Err(e)) => {
                            tracing::warn!(%topic, "NATS subscribe: {e}");
                            continue;
                        }
                        Err(_) => {
                            tracing::warn!(%topic, "NATS subscribe timed out");
                            continue;
                        }
                    };
                    let (stop, stopped) = oneshot::channel();
                    tokio::spawn(forward(subscriber, merged_tx.clone(), stopped));
                    subs.insert(topic.to_string(), Subscription { topic, stop });
                    on_server(&stats, subs.len());
                }
                Event::Cmd(Some(Cmd::Unsubscribe(topic))) => {
                    if let Some(sub) = subs.remove(&*topic) {
                        let _ = sub.stop.send(());
                        on_server(&stats, subs.len());
                    }
                }
                // Core NATS keeps no streams: each node numbers its own history.
                Event::Cmd(Some(Cmd::Load(..))) => {}
                Event::Publish(n) => {
                    if client.connection_state() != async_nats::connection::State::Connected {
                        stats.out_failed.fetch_add(n as u64, Ordering::Relaxed);
                        out.clear();
                        continue;
                    }
                    // After one publish the connection did not take in time, the rest of
                    // the batch fails at once rather than each waiting in turn.
                    let mut stuck = false;
                    for m in out.drain(..) {
                        let sent = if stuck {
                            false
                        } else {
                            let publish = client.publish(m.subject, m.payload);
                            match tokio::time::timeout(opts.command_timeout, publish).await {
                                Ok(r) => r.is_ok(),
                                Err(_) => {
                                    stuck = true;
                                    false
                                }
                            }
                        };
                        let counter = if sent {
                            &stats.messages_out
                        } else {
                            &stats.out_failed
                        };
                        counter.fetch_add(1, Ordering::Relaxed);
                    }
                }
                Event::ProbeTick => {
                    let connected =
                        client.connection_state() == async_nats::connection::State::Connected;
                    if probe.is_none() && connected && probe_sub.is_some() {
                        probe_seq += 1;
                        let payload =
                            wire::encode(self.node, OpCode::Binary, &probe_seq.to_le_bytes());
                        probe = Some((probe_seq, tokio::time::Instant::now() + opts.probe_timeout));
                        let sent = tokio::time::timeout(
                            opts.probe_timeout,
                            client.publish(probe_subject.clone(), payload),
                        )
                        .await;
                        if !matches!(sent, Ok(Ok(()))) {
                            tracing::debug!("NATS probe not sent");
                        }
                    }
                }
                Event::ProbeLate => {
                    probe = None;
                    stats.probes_failed.fetch_add(1, Ordering::Relaxed);
                    tracing::warn!(
                        "NATS probe not back within {:?}; reconnecting",
                        opts.probe_timeout
                    );
                    let _ =
                        tokio::time::timeout(opts.command_timeout, client.force_reconnect()).await;
                }
            }
        }
        for (_, sub) in subs.drain() {
            let _ = sub.stop.send(());
        }
        stats.topics.store(0, Ordering::Relaxed);
    }
}

/// Forwards one subscription's messages to the main task until told to stop (then
/// unsubscribes) or the main task is gone.
/// Sets the topics gauge to the `subscribed` topics if they are on a server now (the
/// client is up); while it is down the gauge stays 0 and the reconnect sets it.
fn on_server(stats: &BrokerStats, subscribed: usize) {
    if stats.state() == BrokerState::Up {
        stats.topics.store(subscribed as u64, Ordering::Relaxed);
    }
}

async fn forward(
    mut subscriber: async_nats::Subscriber,
    to: mpsc::Sender<async_nats::Message>,
    mut stop: oneshot::Receiver<()>,
) {
    loop {
        tokio::select! {
            m = subscriber.next() => match m {
                Some(m) => {
                    if to.send(m).await.is_err() {
                        return;
                    }
                }
                None => return,
            },
            _ = &mut stop => {
                let _ = subscriber.unsubscribe().await;
                return;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_round_trip_and_stay_one_token() {
        for t in [
            "",
            "a",
            "ticker-1_x",
            "a.b",
            "*",
            ">",
            "sp ace",
            "ü%",
            "%41",
        ] {
            let tok = subject_token(t);
            assert!(
                tok.bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"_-%".contains(&b)),
                "{tok}"
            );
            assert_eq!(topic_of_token(&tok).as_deref(), Some(t), "{tok}");
        }
        assert_eq!(subject_token("a.b c"), "a%2Eb%20c");
        assert_eq!(topic_of_token("a%2"), None);
        assert_eq!(topic_of_token("a.b"), None);
    }

    #[test]
    fn urls_and_prefixes_are_checked() {
        let u = |s: &str| vec![s.to_owned()];
        assert!(NatsBroker::new(&u("nats://127.0.0.1:4222"), NatsOptions::default()).is_ok());
        assert_eq!(
            NatsBroker::new(&[], NatsOptions::default()).err(),
            Some(NatsConfigError::NoUrl)
        );
        assert!(matches!(
            NatsBroker::new(&u("http://x:1"), NatsOptions::default()),
            Err(NatsConfigError::Url { .. })
        ));
        let bad = NatsOptions {
            prefix: "no-dot".into(),
            ..NatsOptions::default()
        };
        assert!(matches!(
            NatsBroker::new(&u("nats://127.0.0.1"), bad),
            Err(NatsConfigError::Options(_))
        ));
    }
}
