//! Several wsring nodes joined through a broker: the backplane's rules, checked end to end
//! with real servers on 127.0.0.1 and tokio-tungstenite clients on `/pubsub/<topic>`.
//!
//! Each scenario runs over the in-process [`MemoryBus`] (always) and over real Redis and
//! NATS servers (in `tests/brokers.rs`, which starts its own `redis-server` and
//! `nats-server`). The rules:
//! - every message published on any node reaches every subscriber on every node exactly
//!   once, in publish order per publisher;
//! - a node is subscribed to a topic on the broker only while it has local subscribers
//!   (counted across its workers);
//! - a node never delivers its own message twice (the broker's echo is skipped).

mod common;

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
                n.shared()
                    .backplane()
                    .is_some_and(|bp| bp.stats().topics.load(Ordering::Acquire) == topics)
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
