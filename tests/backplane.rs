//! Several wsring nodes joined through a broker: the backplane's rules, checked end to end
//! with real servers on 127.0.0.1 and tokio-tungstenite clients on `/pubsub/<topic>`.
//!
//! Each scenario runs over the in-process [`MemoryBus`] and over real Redis and NATS
//! servers (the `real` module: each test starts its own `redis-server` or `nats-server` on
//! a free loopback port through `support::brokers`, and kills it; a missing binary skips
//! unless `WSRING_REQUIRE_BROKERS=1`). The rules:
//! - every message published on any node reaches every subscriber on every node exactly
//!   once, in publish order per publisher;
//! - a node is subscribed to a topic on the broker only while it has local subscribers
//!   (counted across its workers);
//! - a node never delivers its own message twice (the broker's echo is skipped);
//! - broker loss: local delivery never stops, what could not be published is counted, and
//!   cross-node delivery comes back by itself when the broker does.

mod common;
#[cfg(all(feature = "redis", feature = "nats"))]
mod support {
    pub mod brokers;
}

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::Duration;

use common::*;
use tokio_tungstenite::tungstenite::Message;
use wsring::engine::BackendChoice;
use wsring::pubsub::broker::Broker;
use wsring::pubsub::broker::memory::MemoryBus;

pub mod scenarios {
    //! The scenarios, over any broker: `make` builds one node's broker client.

    use super::*;

    /// Waits until every node is subscribed on the broker to `topics` topics.
    pub async fn subscribed(nodes: &[&TestServer], topics: u64, what: &str) {
        eventually(Duration::from_secs(10), what, || {
            nodes.iter().all(|n| {
                n.shared().backplane().is_some_and(|bp| {
                    bp.stats().state() == wsring::pubsub::broker::BrokerState::Up
                        && bp.stats().topics.load(Ordering::Acquire) == topics
                })
            })
        })
        .await;
    }

    /// `nodes` nodes, two subscribers each on `/pubsub/t` (each a publisher too, as the
    /// bench protocol makes them); the first subscriber of every node publishes `per`
    /// messages. Every subscriber must get every message once, in order per publisher.
    pub async fn every_message_once_in_order(
        backend: BackendChoice,
        nodes: usize,
        per: usize,
        make: &dyn Fn() -> Arc<dyn Broker>,
    ) {
        let servers: Vec<TestServer> = (0..nodes)
            .map(|i| TestServer::start_node(backend, make(), 0x1000 + i as u64))
            .collect();
        let mut clients = Vec::new();
        for s in &servers {
            clients.push(connect(s.addr, "/pubsub/t").await);
            clients.push(connect(s.addr, "/pubsub/t").await);
        }
        let refs: Vec<&TestServer> = servers.iter().collect();
        subscribed(&refs, 1, "every node subscribed to t on the broker").await;
        // Publishers interleave: node i's first client sends "i:<seq>".
        for seq in 0..per {
            for node in 0..nodes {
                send(
                    &mut clients[2 * node],
                    Message::text(format!("{node}:{seq}")),
                )
                .await;
            }
        }
        let expected = nodes * per;
        for (c, ws) in clients.iter_mut().enumerate() {
            let mut next: HashMap<usize, usize> = HashMap::new();
            for _ in 0..expected {
                let m = next_data_for(ws, &format!("message on client {c}")).await;
                let text = m.into_text().expect("text");
                let (node, seq) = text.split_once(':').expect("node:seq");
                let (node, seq): (usize, usize) = (node.parse().unwrap(), seq.parse().unwrap());
                let want = next.entry(node).or_default();
                assert_eq!(
                    seq, *want,
                    "client {c}: publisher {node} out of order or duplicated"
                );
                *want += 1;
            }
            for node in 0..nodes {
                assert_eq!(
                    next.get(&node).copied(),
                    Some(per),
                    "client {c} from {node}"
                );
            }
        }
        // Nothing more arrives (no duplicate after the last).
        for ws in clients.iter_mut() {
            send(ws, Message::Ping(b"end".to_vec().into())).await;
            match next_message_for(ws, "the pong after the last message").await {
                Message::Pong(p) => assert_eq!(&p[..], b"end"),
                other => panic!("a duplicate arrived after the last message: {other:?}"),
            }
        }
        for s in &servers {
            let bp = s.shared();
            let st = bp.backplane().expect("backplane").stats();
            assert_eq!(st.out_failed.load(Ordering::Relaxed), 0);
            assert_eq!(st.in_dropped.load(Ordering::Relaxed), 0);
            assert_eq!(
                st.messages_out.load(Ordering::Relaxed),
                per as u64,
                "each message published to the broker once"
            );
            assert_eq!(
                st.messages_in.load(Ordering::Relaxed),
                ((nodes - 1) * per) as u64,
                "every other node's messages, once"
            );
        }
    }

    /// A node follows its local subscribers: subscribed on the broker with the first (on
    /// whichever worker), still with one left, unsubscribed with none; and a message from
    /// another node after that reaches nobody here.
    pub async fn subscribed_only_while_local_subscribers(
        backend: BackendChoice,
        make: &dyn Fn() -> Arc<dyn Broker>,
    ) {
        let a = TestServer::start_node(backend, make(), 0xa);
        let b = TestServer::start_node(backend, make(), 0xb);
        let topics = |s: &TestServer| {
            s.shared()
                .backplane()
                .map(|bp| (bp.topics(), bp.stats().topics.load(Ordering::Acquire)))
        };
        assert_eq!(topics(&a), Some((0, 0)));
        // Four connections: with two workers, both get some (SO_REUSEPORT spreads them).
        let mut subs = Vec::new();
        for _ in 0..4 {
            subs.push(connect(a.addr, "/pubsub/room").await);
        }
        subscribed(&[&a], 1, "a subscribed to room").await;
        let mut publisher = connect(b.addr, "/pubsub/room").await;
        subscribed(&[&b], 1, "b subscribed to room").await;
        send(&mut publisher, Message::text("one")).await;
        assert_eq!(next_data(&mut publisher).await, Message::text("one"));
        for ws in subs.iter_mut() {
            assert_eq!(next_data(ws).await, Message::text("one"));
        }
        while subs.len() > 1 {
            let mut ws = subs.pop().unwrap();
            close_normally(&mut ws).await;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
        assert_eq!(topics(&a).map(|t| t.0), Some(1), "one subscriber left");
        let mut last = subs.pop().unwrap();
        close_normally(&mut last).await;
        subscribed(
            &[&a],
            0,
            "a unsubscribed from room with its last subscriber",
        )
        .await;
        assert_eq!(topics(&a).map(|t| t.0), Some(0));
        let before = a.shared().total(|s| &s.messages_out);
        send(&mut publisher, Message::text("two")).await;
        assert_eq!(next_data(&mut publisher).await, Message::text("two"));
        tokio::time::sleep(Duration::from_millis(200)).await;
        assert_eq!(
            a.shared().total(|s| &s.messages_out),
            before,
            "nothing delivered on a node without subscribers"
        );
    }
}

#[test]
fn memory_bus_two_nodes_every_message_once_in_order() {
    let bus = MemoryBus::new();
    block_on(scenarios::every_message_once_in_order(
        BackendChoice::Auto,
        2,
        500,
        &|| Arc::new(bus.broker()),
    ));
}

#[test]
fn memory_bus_three_nodes_every_message_once_in_order_on_epoll() {
    let bus = MemoryBus::new();
    block_on(scenarios::every_message_once_in_order(
        BackendChoice::Epoll,
        3,
        300,
        &|| Arc::new(bus.broker()),
    ));
}

#[test]
fn memory_bus_node_subscribed_only_while_it_has_local_subscribers() {
    let bus = MemoryBus::new();
    block_on(scenarios::subscribed_only_while_local_subscribers(
        BackendChoice::Auto,
        &|| Arc::new(bus.broker()),
    ));
}

#[test]
fn metrics_show_the_broker() {
    let bus = MemoryBus::new();
    let node = TestServer::start_node(BackendChoice::Auto, Arc::new(bus.broker()), 7);
    let text = node.server().handle().metrics_text();
    for name in [
        "wsring_broker_state 1",
        "wsring_broker_topics 0",
        "wsring_broker_reconnects_total 0",
        "wsring_broker_messages_out_total 0",
        "wsring_broker_out_failed_total 0",
    ] {
        assert!(
            text.lines().any(|l| l == name),
            "/metrics lacks {name:?}:\n{text}"
        );
    }
    let plain = TestServer::start(BackendChoice::Auto);
    assert!(
        !plain
            .server()
            .handle()
            .metrics_text()
            .contains("wsring_broker"),
        "no broker lines without a broker"
    );
}

#[cfg(all(feature = "redis", feature = "nats"))]
mod real {
    //! The same scenarios over real Redis and NATS servers, and the broker killed and
    //! restarted under two nodes.

    use std::time::Instant;

    use futures_util::StreamExt;

    use super::support::brokers::{BrokerServer, Kind};
    use super::*;
    use wsring::pubsub::broker::BrokerState;
    use wsring::pubsub::broker::nats::{NatsBroker, NatsOptions};
    use wsring::pubsub::broker::redis::{RedisBroker, RedisOptions};

    /// A client of `server` with a fast probe (so that a test sees a dead broker soon).
    fn client(kind: Kind, server: &BrokerServer) -> Arc<dyn Broker> {
        let urls = [server.url()];
        match kind {
            Kind::Redis => Arc::new(
                RedisBroker::new(
                    &urls,
                    RedisOptions {
                        probe_interval: Duration::from_millis(300),
                        probe_timeout: Duration::from_millis(700),
                        ..RedisOptions::default()
                    },
                )
                .expect("redis client"),
            ),
            Kind::Nats => Arc::new(
                NatsBroker::new(
                    &urls,
                    NatsOptions {
                        probe_interval: Duration::from_millis(300),
                        probe_timeout: Duration::from_millis(700),
                        ..NatsOptions::default()
                    },
                )
                .expect("nats client"),
            ),
        }
    }

    fn once_in_order(kind: Kind, nodes: usize, backend: BackendChoice) {
        let Some(server) = BrokerServer::start(kind) else {
            return;
        };
        block_on(scenarios::every_message_once_in_order(
            backend,
            nodes,
            300,
            &|| client(kind, &server),
        ));
    }

    #[test]
    fn redis_two_nodes_every_message_once_in_order() {
        once_in_order(Kind::Redis, 2, BackendChoice::IoUring);
    }

    #[test]
    fn redis_three_nodes_every_message_once_in_order_on_epoll() {
        once_in_order(Kind::Redis, 3, BackendChoice::Epoll);
    }

    #[test]
    fn nats_two_nodes_every_message_once_in_order() {
        once_in_order(Kind::Nats, 2, BackendChoice::IoUring);
    }

    #[test]
    fn nats_three_nodes_every_message_once_in_order_on_epoll() {
        once_in_order(Kind::Nats, 3, BackendChoice::Epoll);
    }

    #[test]
    fn redis_node_subscribed_only_while_it_has_local_subscribers() {
        let Some(server) = BrokerServer::start(Kind::Redis) else {
            return;
        };
        block_on(scenarios::subscribed_only_while_local_subscribers(
            BackendChoice::Auto,
            &|| client(Kind::Redis, &server),
        ));
        assert_eq!(
            server
                .redis_command(&["PUBSUB", "NUMSUB", "wsring:room"])
                .lines()
                .last()
                .map(|l| l.trim().trim_start_matches(':')),
            Some("0"),
            "nobody left subscribed to the channel on Redis"
        );
    }

    #[test]
    fn nats_node_subscribed_only_while_it_has_local_subscribers() {
        let Some(server) = BrokerServer::start(Kind::Nats) else {
            return;
        };
        block_on(scenarios::subscribed_only_while_local_subscribers(
            BackendChoice::Auto,
            &|| client(Kind::Nats, &server),
        ));
    }

    /// How long cross-node delivery may take to come back once the broker is back: the
    /// clients' backoff is capped at 5 s.
    const RESUME_WITHIN: Duration = Duration::from_secs(10);

    async fn reads(ws: &mut Ws, n: usize, what: &str) -> Vec<usize> {
        let mut out = Vec::new();
        for _ in 0..n {
            let m = next_data_for(ws, what).await;
            out.push(m.into_text().expect("text").parse().expect("a number"));
        }
        out
    }

    async fn publish(ws: &mut Ws, range: std::ops::Range<usize>) {
        for i in range {
            send(ws, Message::text(i.to_string())).await;
        }
    }

    /// Two nodes, a publisher and a subscriber on A, a subscriber on B. The broker is
    /// killed mid-stream: A's subscribers keep getting everything (local delivery does not
    /// stop) and A counts what it could not publish; it is restarted: both nodes reconnect
    /// and resubscribe by themselves, and B gets what is published after that. B never
    /// gets a message twice or out of order, and A's counters account for every message:
    /// published to the broker or counted as failed.
    fn broker_killed_and_restarted(kind: Kind) {
        let Some(mut server) = BrokerServer::start(kind) else {
            return;
        };
        let a = TestServer::start_node(BackendChoice::Auto, client(kind, &server), 0xa);
        let b = TestServer::start_node(BackendChoice::Auto, client(kind, &server), 0xb);
        let state = |n: &TestServer| n.shared().backplane().map(|bp| bp.stats().state());
        let stat = |n: &TestServer, f: fn(&wsring::pubsub::broker::BrokerStats) -> u64| {
            n.shared().backplane().map_or(0, |bp| f(bp.stats()))
        };
        block_on(async {
            let mut pa = connect(a.addr, "/pubsub/live").await;
            let mut sa = connect(a.addr, "/pubsub/live").await;
            let mut sb = connect(b.addr, "/pubsub/live").await;
            scenarios::subscribed(&[&a, &b], 1, "both nodes subscribed to live").await;

            publish(&mut pa, 0..50).await;
            let want: Vec<usize> = (0..50).collect();
            assert_eq!(reads(&mut pa, 50, "phase 1 on a").await, want);
            assert_eq!(reads(&mut sa, 50, "phase 1 on a").await, want);
            assert_eq!(reads(&mut sb, 50, "phase 1 on b").await, want);

            server.kill();
            eventually(
                Duration::from_secs(10),
                "a notices the broker is gone",
                || state(&a) != Some(BrokerState::Up),
            )
            .await;
            publish(&mut pa, 50..100).await;
            let want: Vec<usize> = (50..100).collect();
            assert_eq!(
                reads(&mut pa, 50, "local delivery, broker down").await,
                want
            );
            assert_eq!(
                reads(&mut sa, 50, "local delivery, broker down").await,
                want
            );
            eventually(
                Duration::from_secs(5),
                "publishes while the broker is down counted as failed",
                || stat(&a, |s| s.out_failed.load(Ordering::Relaxed)) >= 1,
            )
            .await;

            server.restart();
            let back = Instant::now();
            eventually(
                RESUME_WITHIN,
                "both nodes reconnected and resubscribed",
                || {
                    [&a, &b].iter().all(|n| {
                        state(n) == Some(BrokerState::Up)
                            && n.shared()
                                .backplane()
                                .is_some_and(|bp| bp.stats().topics.load(Ordering::Acquire) == 1)
                    })
                },
            )
            .await;
            eprintln!(
                "{kind:?}: cross-node delivery back {:?} after the restart",
                back.elapsed()
            );
            for n in [&a, &b] {
                assert!(stat(n, |s| s.reconnects.load(Ordering::Relaxed)) >= 1);
            }
            publish(&mut pa, 100..150).await;
            let want: Vec<usize> = (100..150).collect();
            assert_eq!(reads(&mut pa, 50, "phase 3 on a").await, want);
            assert_eq!(reads(&mut sa, 50, "phase 3 on a").await, want);
            // B: everything after the restart, in order; of the messages published while
            // the broker was down, none (they were counted as failed, not queued).
            let got = reads(&mut sb, 50, "phase 3 on b").await;
            assert_eq!(
                got, want,
                "b resumes with what was published after the restart"
            );
            // The clients count a publish when the broker acknowledges it, and a delivery
            // after handing it on: a moment after the subscribers have the bytes.
            let accounted = || {
                stat(&a, |s| s.messages_out.load(Ordering::Relaxed))
                    + stat(&a, |s| s.out_failed.load(Ordering::Relaxed))
            };
            let received = || stat(&b, |s| s.messages_in.load(Ordering::Relaxed));
            eventually(
                Duration::from_secs(5),
                "every publish counted as either sent or failed",
                || accounted() >= 150,
            )
            .await;
            eventually(Duration::from_secs(5), "b counts what it received", || {
                received() >= 100
            })
            .await;
            assert_eq!(accounted(), 150, "each publish counted once");
            assert_eq!(received(), 100, "b received phase 1 and phase 3 only");
        });
    }

    /// A node with subscribers on 1,000 topics: after the broker is restarted it
    /// resubscribes all of them by itself (timed in `resubscribe_micros`), and a message
    /// published on another node to each topic reaches its subscriber.
    fn thousand_topics_resubscribed(kind: Kind) {
        const TOPICS: usize = 1000;
        let Some(mut server) = BrokerServer::start(kind) else {
            return;
        };
        let a = TestServer::start_node(BackendChoice::Auto, client(kind, &server), 0xa);
        let b = TestServer::start_node(BackendChoice::Auto, client(kind, &server), 0xb);
        let topics_of = |n: &TestServer| {
            n.shared()
                .backplane()
                .map_or(0, |bp| bp.stats().topics.load(Ordering::Acquire))
        };
        block_on(async {
            let mut subs = Vec::with_capacity(TOPICS);
            for i in 0..TOPICS {
                subs.push(connect(b.addr, &format!("/pubsub/t{i}")).await);
            }
            scenarios::subscribed(&[&b], TOPICS as u64, "b subscribed to 1,000 topics").await;
            server.kill();
            eventually(
                Duration::from_secs(10),
                "b notices the broker is gone",
                || {
                    b.shared()
                        .backplane()
                        .is_some_and(|bp| bp.stats().state() != BrokerState::Up)
                },
            )
            .await;
            server.restart();
            eventually(RESUME_WITHIN, "b resubscribed 1,000 topics", || {
                b.shared().backplane().is_some_and(|bp| {
                    let st = bp.stats();
                    st.state() == BrokerState::Up
                        && st.reconnects.load(Ordering::Relaxed) >= 1
                        && st.topics.load(Ordering::Acquire) == TOPICS as u64
                })
            })
            .await;
            scenarios::subscribed(&[&a], 0, "a back up").await;
            let micros = b.shared().backplane().map_or(0, |bp| {
                bp.stats().resubscribe_micros.load(Ordering::Relaxed)
            });
            eprintln!("{kind:?}: 1,000 topics resubscribed in {micros} us");
            assert!(micros > 0, "the resubscription is timed");
            assert_eq!(topics_of(&b), TOPICS as u64);
            // Every topic delivers again: a message published on A reaches each of B's
            // subscribers. A topic whose message did not arrive within 200 ms is published
            // again (up to RESUME_WITHIN): right after a reconnect a broker may take a
            // moment to apply the last of 1,000 subscriptions, and what is published
            // before that is lost (at most once), not late.
            let handle = a.server().handle();
            let deadline = Instant::now() + RESUME_WITHIN;
            let mut pending: Vec<usize> = (0..TOPICS).collect();
            let mut rounds = 0;
            while !pending.is_empty() && Instant::now() < deadline {
                rounds += 1;
                for &i in &pending {
                    handle.publish_text(&format!("t{i}"), &format!("m{i}"));
                }
                let mut still = Vec::new();
                for &i in &pending {
                    let got =
                        tokio::time::timeout(Duration::from_millis(200), subs[i].next()).await;
                    match got {
                        Ok(Some(Ok(m))) => assert_eq!(m, Message::text(format!("m{i}"))),
                        Ok(other) => panic!("t{i}: the connection ended: {other:?}"),
                        Err(_) => still.push(i),
                    }
                }
                pending = still;
            }
            assert!(
                pending.is_empty(),
                "{} topics never delivered again: {:?}",
                pending.len(),
                &pending[..pending.len().min(10)]
            );
            eprintln!("{kind:?}: every topic delivered again after {rounds} round(s)");
        });
    }

    #[test]
    fn redis_resubscribes_a_thousand_topics_after_a_restart() {
        thousand_topics_resubscribed(Kind::Redis);
    }

    #[test]
    fn nats_resubscribes_a_thousand_topics_after_a_restart() {
        thousand_topics_resubscribed(Kind::Nats);
    }

    #[test]
    fn redis_killed_and_restarted_under_two_nodes() {
        broker_killed_and_restarted(Kind::Redis);
    }

    #[test]
    fn nats_killed_and_restarted_under_two_nodes() {
        broker_killed_and_restarted(Kind::Nats);
    }
}
