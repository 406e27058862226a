//! The Redis and NATS broker clients against real servers (`redis-server`, `nats-server`
//! started per test on a free loopback port by `support::brokers`): delivery exactly once
//! and in order with the own echo skipped, unsubscribe, reconnect after the server was
//! killed and restarted, resubscription of 1,000 topics, two Redis shards, sharded pub/sub,
//! and the idle probe catching a frozen server. A missing server binary skips its tests
//! (fails them with `WSRING_REQUIRE_BROKERS=1`). Every wait is bounded.
#![cfg(all(feature = "redis", feature = "nats"))]

mod support {
    pub mod brokers;
}

use std::sync::atomic::Ordering;
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use support::brokers::{BrokerServer, Kind};
use wsring::proto::OpCode;
use wsring::pubsub::broker::nats::{NatsBroker, NatsOptions};
use wsring::pubsub::broker::redis::{RedisBroker, RedisOptions};
use wsring::pubsub::broker::{Broker, BrokerState, Incoming, NodeId, Sink, shard_of};

/// How long a client may take to reconnect after its server came back (the backoff cap is
/// 5 s, so it tries at least once in any 5 s).
const RECONNECT_BOUND: Duration = Duration::from_secs(10);
/// The bound on anything that should happen within a few round trips.
const WAIT: Duration = Duration::from_secs(10);

/// A sink that records what it is given.
#[derive(Default)]
struct Recorder {
    got: Mutex<Vec<Incoming>>,
    changed: Condvar,
}

impl Sink for Recorder {
    fn deliver(&self, batch: &[Incoming]) {
        let mut got = self.got.lock().unwrap();
        got.extend_from_slice(batch);
        self.changed.notify_all();
    }
}

impl Recorder {
    /// The payloads delivered on `topic`, as text.
    fn on(&self, topic: &str) -> Vec<String> {
        self.got
            .lock()
            .unwrap()
            .iter()
            .filter(|m| &*m.topic == topic)
            .map(|m| String::from_utf8_lossy(&m.payload).into_owned())
            .collect()
    }

    /// Waits (bounded) until `done` holds for what was delivered.
    fn wait(&self, what: &str, bound: Duration, done: impl Fn(&[Incoming]) -> bool) {
        let deadline = Instant::now() + bound;
        let mut got = self.got.lock().unwrap();
        while !done(&got) {
            let left = deadline.saturating_duration_since(Instant::now());
            assert!(
                !left.is_zero(),
                "timed out after {bound:?} waiting for {what}"
            );
            got = self.changed.wait_timeout(got, left).unwrap().0;
        }
    }

    fn clear(&self) {
        self.got.lock().unwrap().clear();
    }
}

/// Polls `cond` until it holds, failing after `bound`.
fn wait_until(what: &str, bound: Duration, cond: impl Fn() -> bool) -> Duration {
    let start = Instant::now();
    while !cond() {
        assert!(
            start.elapsed() < bound,
            "timed out after {bound:?} waiting for {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
    start.elapsed()
}

fn redis_opts() -> RedisOptions {
    RedisOptions {
        probe_interval: Duration::from_millis(300),
        probe_timeout: Duration::from_millis(700),
        connect_timeout: Duration::from_secs(1),
        command_timeout: Duration::from_secs(1),
        ..RedisOptions::default()
    }
}

fn nats_opts() -> NatsOptions {
    NatsOptions {
        probe_interval: Duration::from_millis(300),
        probe_timeout: Duration::from_millis(700),
        connect_timeout: Duration::from_secs(1),
        command_timeout: Duration::from_secs(1),
        ..NatsOptions::default()
    }
}

/// A started client with its recording sink.
struct Node {
    broker: Box<dyn Broker>,
    sink: Arc<Recorder>,
}

impl Node {
    fn start(broker: Box<dyn Broker>, id: NodeId) -> Node {
        let sink = Arc::new(Recorder::default());
        broker.start(id, sink.clone()).expect("start broker client");
        Node { broker, sink }
    }

    fn redis(urls: &[String], opts: RedisOptions, id: NodeId) -> Node {
        Node::start(Box::new(RedisBroker::new(urls, opts).unwrap()), id)
    }

    fn nats(urls: &[String], id: NodeId) -> Node {
        Node::start(Box::new(NatsBroker::new(urls, nats_opts()).unwrap()), id)
    }

    fn of(kind: Kind, server: &BrokerServer, id: NodeId) -> Node {
        match kind {
            Kind::Redis => Node::redis(&[server.url()], redis_opts(), id),
            Kind::Nats => Node::nats(&[server.url()], id),
        }
    }

    fn stat(&self, f: impl Fn(&wsring::pubsub::broker::BrokerStats) -> u64) -> u64 {
        f(self.broker.stats())
    }

    fn up(&self) -> bool {
        self.broker.stats().state() == BrokerState::Up
    }
}

impl Drop for Node {
    fn drop(&mut self) {
        let t = Instant::now();
        self.broker.stop();
        assert!(
            t.elapsed() < Duration::from_millis(1500),
            "stop took {:?}",
            t.elapsed()
        );
        assert_eq!(self.broker.stats().state(), BrokerState::Stopped);
    }
}

/// Makes sure `to` is subscribed on the broker to everything it asked for before: `to`
/// subscribes to a fresh topic last, and `from` publishes on it until `to` gets one (the
/// broker handles one connection's commands in order).
fn sync(from: &Node, to: &Node, name: &str) {
    to.broker.subscribe(name);
    let deadline = Instant::now() + WAIT;
    while to.sink.on(name).is_empty() {
        assert!(Instant::now() < deadline, "sync on {name} timed out");
        from.broker.publish(name, OpCode::Text, b"sync");
        std::thread::sleep(Duration::from_millis(30));
    }
}

fn publish_seq(node: &Node, topic: &str, range: std::ops::Range<usize>) {
    for i in range {
        assert!(
            node.broker
                .publish(topic, OpCode::Text, i.to_string().as_bytes())
        );
    }
}

fn seq(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(|i| i.to_string()).collect()
}

fn ordered_exactly_once_own_echo_skipped(kind: Kind) {
    let Some(server) = BrokerServer::start(kind) else {
        return;
    };
    let a = Node::of(kind, &server, 0xa);
    let b = Node::of(kind, &server, 0xb);
    wait_until("both clients up", WAIT, || a.up() && b.up());
    a.broker.subscribe("t");
    b.broker.subscribe("t");
    sync(&a, &b, "sync-b");
    sync(&b, &a, "sync-a");
    publish_seq(&a, "t", 0..1000);
    b.sink.wait("1,000 messages on b", WAIT, |g| {
        g.iter().filter(|m| &*m.topic == "t").count() >= 1000
    });
    wait_until("a's own echoes", WAIT, || {
        a.stat(|s| s.own_skipped.load(Ordering::Relaxed)) >= 1000
    });
    // Let the probes run a few rounds, and any duplicate arrive.
    std::thread::sleep(Duration::from_millis(800));
    assert_eq!(b.sink.on("t"), seq(0..1000), "exactly once, in order");
    assert!(a.sink.on("t").is_empty(), "a got its own messages");
    let st =
        |n: &Node, f: fn(&wsring::pubsub::broker::BrokerStats) -> &std::sync::atomic::AtomicU64| {
            f(n.broker.stats()).load(Ordering::Relaxed)
        };
    assert_eq!(st(&a, |s| &s.own_skipped), 1000);
    assert!(st(&a, |s| &s.messages_out) >= 1000);
    assert!(st(&b, |s| &s.messages_in) >= 1000);
    for n in [&a, &b] {
        assert_eq!(st(n, |s| &s.out_failed), 0);
        assert_eq!(st(n, |s| &s.decode_errors), 0);
        assert_eq!(st(n, |s| &s.probes_failed), 0);
        assert_eq!(st(n, |s| &s.reconnects), 0);
        assert!(n.up());
    }
}

fn unsubscribe_stops_delivery(kind: Kind) {
    let Some(server) = BrokerServer::start(kind) else {
        return;
    };
    let a = Node::of(kind, &server, 0xa);
    let b = Node::of(kind, &server, 0xb);
    b.broker.subscribe("u");
    sync(&a, &b, "sync-1");
    a.broker.publish("u", OpCode::Text, b"before");
    b.sink.wait("the message before", WAIT, |g| {
        g.iter().any(|m| &*m.topic == "u")
    });
    b.broker.unsubscribe("u");
    b.broker.unsubscribe("u"); // idempotent
    if kind == Kind::Redis {
        wait_until("the unsubscription on the server", WAIT, || {
            server
                .redis_command(&["PUBSUB", "NUMSUB", "wsring:u"])
                .contains(":0\r\n")
        });
    } else {
        std::thread::sleep(Duration::from_millis(300));
    }
    sync(&a, &b, "sync-2");
    publish_seq(&a, "u", 0..20);
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(b.sink.on("u"), vec!["before".to_owned()]);
    // And subscribing again brings it back.
    b.broker.subscribe("u");
    sync(&a, &b, "sync-3");
    a.broker.publish("u", OpCode::Text, b"again");
    b.sink.wait("the message after resubscribing", WAIT, |g| {
        g.iter()
            .any(|m| &*m.topic == "u" && &m.payload[..] == b"again")
    });
}

fn reconnects_after_restart(kind: Kind) {
    let Some(mut server) = BrokerServer::start(kind) else {
        return;
    };
    let a = Node::of(kind, &server, 0xa);
    let b = Node::of(kind, &server, 0xb);
    b.broker.subscribe("r");
    sync(&a, &b, "sync-1");
    publish_seq(&a, "r", 0..100);
    b.sink.wait("100 before the restart", WAIT, |g| {
        g.iter().filter(|m| &*m.topic == "r").count() >= 100
    });

    server.kill();
    wait_until("both clients to see the server gone", WAIT, || {
        !a.up() && !b.up()
    });
    let failed_before = a.stat(|s| s.out_failed.load(Ordering::Relaxed));
    publish_seq(&a, "r", 1000..1010);
    wait_until(
        "the messages published while down counted as failed",
        WAIT,
        || a.stat(|s| s.out_failed.load(Ordering::Relaxed)) >= failed_before + 10,
    );

    server.restart();
    let took = wait_until("both clients to reconnect", RECONNECT_BOUND, || {
        a.up()
            && b.up()
            && a.stat(|s| s.reconnects.load(Ordering::Relaxed)) >= 1
            && b.stat(|s| s.reconnects.load(Ordering::Relaxed)) >= 1
    });
    eprintln!("{kind:?}: reconnected {took:?} after the restart");
    sync(&a, &b, "sync-2");
    publish_seq(&a, "r", 100..200);
    b.sink.wait("100 after the restart", WAIT, |g| {
        g.iter().filter(|m| &*m.topic == "r").count() >= 200
    });
    assert_eq!(
        b.sink.on("r"),
        seq(0..200),
        "nothing published while down arrives"
    );
}

fn resubscribes_1000_topics(kind: Kind) {
    let Some(mut server) = BrokerServer::start(kind) else {
        return;
    };
    let a = Node::of(kind, &server, 0xa);
    let b = Node::of(kind, &server, 0xb);
    let topics: Vec<String> = (0..1000).map(|i| format!("topic-{i}")).collect();
    for t in &topics {
        b.broker.subscribe(t);
    }
    sync(&a, &b, "sync-1");
    wait_until("1,000 topics subscribed", WAIT, || {
        b.stat(|s| s.topics.load(Ordering::Relaxed)) >= 1001
    });
    server.kill();
    wait_until("b to see the server gone", WAIT, || !b.up());
    // While it is down, no topic is subscribed on the broker (the gauge says so).
    wait_until("b's broker topics gauge at 0 while down", WAIT, || {
        b.stat(|s| s.topics.load(Ordering::Relaxed)) == 0
    });
    server.restart();
    wait_until("b to reconnect", RECONNECT_BOUND, || {
        a.up() && b.up() && b.stat(|s| s.reconnects.load(Ordering::Relaxed)) >= 1
    });
    wait_until("b's 1,000 topics subscribed again", WAIT, || {
        b.stat(|s| s.topics.load(Ordering::Relaxed)) >= 1000
    });
    b.sink.clear();
    sync(&a, &b, "sync-2");
    for t in &topics {
        assert!(a.broker.publish(t, OpCode::Binary, t.as_bytes()));
    }
    b.sink
        .wait("a message on each of the 1,000 topics", WAIT, |g| {
            g.iter().filter(|m| m.topic.starts_with("topic-")).count() >= 1000
        });
    let got = b.sink.got.lock().unwrap();
    let mut seen: Vec<&str> = got
        .iter()
        .filter(|m| m.topic.starts_with("topic-"))
        .inspect(|m| {
            assert_eq!(
                (&m.payload[..], m.opcode),
                (m.topic.as_bytes(), OpCode::Binary)
            )
        })
        .map(|m| &*m.topic)
        .collect();
    seen.sort_unstable();
    seen.dedup();
    assert_eq!(seen.len(), 1000);
    let micros = b.stat(|s| s.resubscribe_micros.load(Ordering::Relaxed));
    assert!(micros > 0);
    eprintln!("{kind:?}: resubscribed 1,001 topics in {micros} us");
}

fn frozen_server_fails_the_probe(kind: Kind) {
    let Some(server) = BrokerServer::start(kind) else {
        return;
    };
    let a = Node::of(kind, &server, 0xa);
    let b = Node::of(kind, &server, 0xb);
    b.broker.subscribe("f");
    sync(&a, &b, "sync-1");
    server.freeze(true);
    let took = wait_until("a failed probe", WAIT, || {
        b.stat(|s| s.probes_failed.load(Ordering::Relaxed)) >= 1
    });
    eprintln!("{kind:?}: probe failure noticed {took:?} after the freeze");
    server.freeze(false);
    wait_until("both clients up again", RECONNECT_BOUND, || {
        a.up() && b.up()
    });
    sync(&a, &b, "sync-2");
    a.broker.publish("f", OpCode::Text, b"after");
    b.sink.wait("delivery after the thaw", WAIT, |g| {
        g.iter()
            .any(|m| &*m.topic == "f" && &m.payload[..] == b"after")
    });
}

#[test]
fn redis_ordered_exactly_once_own_echo_skipped() {
    ordered_exactly_once_own_echo_skipped(Kind::Redis);
}

#[test]
fn nats_ordered_exactly_once_own_echo_skipped() {
    ordered_exactly_once_own_echo_skipped(Kind::Nats);
}

#[test]
fn redis_unsubscribe_stops_delivery() {
    unsubscribe_stops_delivery(Kind::Redis);
}

#[test]
fn nats_unsubscribe_stops_delivery() {
    unsubscribe_stops_delivery(Kind::Nats);
}

#[test]
fn redis_reconnects_after_restart() {
    reconnects_after_restart(Kind::Redis);
}

#[test]
fn nats_reconnects_after_restart() {
    reconnects_after_restart(Kind::Nats);
}

#[test]
fn redis_resubscribes_1000_topics() {
    resubscribes_1000_topics(Kind::Redis);
}

#[test]
fn nats_resubscribes_1000_topics() {
    resubscribes_1000_topics(Kind::Nats);
}

#[test]
fn redis_frozen_server_fails_the_probe() {
    frozen_server_fails_the_probe(Kind::Redis);
}

#[test]
fn nats_frozen_server_fails_the_probe() {
    frozen_server_fails_the_probe(Kind::Nats);
}

#[test]
fn redis_two_shards_carry_their_topics() {
    let Some(s0) = BrokerServer::start(Kind::Redis) else {
        return;
    };
    let Some(s1) = BrokerServer::start(Kind::Redis) else {
        return;
    };
    let urls = [s0.url(), s1.url()];
    let a = Node::redis(&urls, redis_opts(), 0xa);
    let b = Node::redis(&urls, redis_opts(), 0xb);
    assert!(
        a.broker.describe().contains("2 shards"),
        "{}",
        a.broker.describe()
    );
    let pick = |prefix: &str, shard: usize| {
        (0..)
            .map(|i| format!("{prefix}-{i}"))
            .find(|t| shard_of(t, 2) == shard)
            .unwrap()
    };
    let (t0, t1) = (pick("shard-topic", 0), pick("shard-topic", 1));
    b.broker.subscribe(&t0);
    b.broker.subscribe(&t1);
    // One sync topic per shard.
    sync(&a, &b, &pick("sync", 0));
    sync(&a, &b, &pick("sync", 1));
    wait_until("both shards up", WAIT, || a.up() && b.up());
    for i in 0..50 {
        a.broker
            .publish(&t0, OpCode::Text, i.to_string().as_bytes());
        a.broker
            .publish(&t1, OpCode::Text, i.to_string().as_bytes());
    }
    b.sink.wait("50 on each shard", WAIT, |g| {
        g.iter()
            .filter(|m| m.topic.starts_with("shard-topic-"))
            .count()
            >= 100
    });
    assert_eq!(b.sink.on(&t0), seq(0..50));
    assert_eq!(b.sink.on(&t1), seq(0..50));
    let on0 = s0.redis_command(&["PUBSUB", "CHANNELS", "wsring:shard-topic-*"]);
    let on1 = s1.redis_command(&["PUBSUB", "CHANNELS", "wsring:shard-topic-*"]);
    assert!(on0.contains(&t0) && !on0.contains(&t1), "{on0:?}");
    assert!(on1.contains(&t1) && !on1.contains(&t0), "{on1:?}");
}

#[test]
fn redis_sharded_pubsub_on_standalone_redis7() {
    let Some(server) = BrokerServer::start(Kind::Redis) else {
        return;
    };
    let opts = RedisOptions {
        sharded: true,
        ..redis_opts()
    };
    let a = Node::redis(&[server.url()], opts.clone(), 0xa);
    let b = Node::redis(&[server.url()], opts, 0xb);
    a.broker.subscribe("s");
    b.broker.subscribe("s");
    sync(&a, &b, "sync-b");
    sync(&b, &a, "sync-a");
    publish_seq(&a, "s", 0..200);
    b.sink.wait("200 messages", WAIT, |g| {
        g.iter().filter(|m| &*m.topic == "s").count() >= 200
    });
    wait_until("a's own echoes", WAIT, || {
        a.stat(|s| s.own_skipped.load(Ordering::Relaxed)) >= 200
    });
    assert_eq!(b.sink.on("s"), seq(0..200));
    let shard_channels = server.redis_command(&["PUBSUB", "SHARDCHANNELS", "wsring:*"]);
    assert!(
        shard_channels.contains("wsring:s\r\n"),
        "{shard_channels:?}"
    );
    let plain = server.redis_command(&["PUBSUB", "CHANNELS", "wsring:*"]);
    assert!(!plain.contains("wsring:s\r\n"), "{plain:?}");
    // The probes go through sharded pub/sub too.
    std::thread::sleep(Duration::from_millis(700));
    assert_eq!(b.stat(|s| s.probes_failed.load(Ordering::Relaxed)), 0);
    b.broker.unsubscribe("s");
    wait_until("the shard unsubscription", WAIT, || {
        server
            .redis_command(&["PUBSUB", "SHARDNUMSUB", "wsring:s"])
            .contains(":1\r\n")
    });
}

#[test]
fn bad_urls_are_refused_up_front() {
    use wsring::pubsub::broker::redis::RedisConfigError;
    let r = |u: &str| RedisBroker::new(&[u.to_owned()], RedisOptions::default());
    assert!(r("redis://127.0.0.1:6379/2").is_ok());
    assert_eq!(
        RedisBroker::new(&[], RedisOptions::default()).err(),
        Some(RedisConfigError::NoUrl)
    );
    for bad in [
        "http://127.0.0.1:6379",
        "127.0.0.1:6379",
        "redis://127.0.0.1:notaport",
        "rediss://x:1",
    ] {
        assert!(matches!(r(bad), Err(RedisConfigError::Url { .. })), "{bad}");
    }
    let zero = RedisOptions {
        probe_interval: Duration::ZERO,
        ..RedisOptions::default()
    };
    assert!(matches!(
        RedisBroker::new(&["redis://127.0.0.1".to_owned()], zero),
        Err(RedisConfigError::Options(_))
    ));
    // A client that never reaches its server still stops promptly, and publishing to it
    // neither blocks nor loses count.
    let port = support::brokers::free_port();
    let n = Node::redis(&[format!("redis://127.0.0.1:{port}")], redis_opts(), 1);
    n.broker.subscribe("x");
    assert!(n.broker.publish("x", OpCode::Text, b"lost"));
    wait_until("the failed publish counted", WAIT, || {
        n.stat(|s| s.out_failed.load(Ordering::Relaxed)) == 1
    });
    assert_eq!(n.broker.stats().state(), BrokerState::Connecting);
}
