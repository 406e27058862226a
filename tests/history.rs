//! History and resume (issue 15) against an in-process server on 127.0.0.1 speaking
//! `wsring serve`'s protocol with history on, driven by tokio-tungstenite, on both
//! backends: a subscriber that drops and resumes mid-stream gets every publication exactly
//! once and in order; a resume from trimmed history, a stale epoch or a future offset says
//! `recovered: false`; binary payloads travel as base64; the library's own calls
//! (`Conn::subscribe_at`, `Handle::publish_recorded`, `Handle::position`); a storm of
//! thousands of clients resuming at once, every one checked, memory bounded; and, through
//! a real `redis-server` that numbers the publications, a client that resumes on another
//! node, and on a node that started after the publications.

#[macro_use]
mod common;
#[cfg(feature = "redis")]
mod support {
    pub mod brokers;
}

use std::time::Duration;

use common::*;
use futures_util::{SinkExt, StreamExt};
use serde_json::Value;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use wsring::api::{HistoryLimits, Position, Subscription};
use wsring::engine::BackendChoice;

fn limits(count: usize) -> HistoryLimits {
    HistoryLimits {
        count,
        bytes: 64 * 1024 * 1024,
        ttl: Duration::from_secs(300),
    }
}

/// What the server said first on a `recover=1` connection.
#[derive(Debug, Clone)]
struct Subscribed {
    epoch: String,
    offset: u64,
    recovered: bool,
    replayed: u64,
}

fn path(topic: &str, since: Option<(u64, &str)>) -> String {
    match since {
        Some((offset, epoch)) => format!("/pubsub/{topic}?recover=1&since={offset}&epoch={epoch}"),
        None => format!("/pubsub/{topic}?recover=1"),
    }
}

async fn next_json(ws: &mut Ws, what: &str) -> Value {
    match next_data_for(ws, what).await {
        WsMessage::Text(t) => {
            serde_json::from_str(&t).unwrap_or_else(|e| panic!("{what}: {e}: {t}"))
        }
        other => panic!("{what}: expected a text frame, got {other:?}"),
    }
}

async fn subscribe(
    addr: std::net::SocketAddr,
    topic: &str,
    since: Option<(u64, &str)>,
) -> (Ws, Subscribed) {
    let mut ws = connect(addr, &path(topic, since)).await;
    let v = next_json(&mut ws, "the subscribed message").await;
    assert_eq!(v["type"], "subscribed", "{v}");
    assert_eq!(v["topic"], topic, "{v}");
    let s = Subscribed {
        epoch: v["epoch"].as_str().expect("epoch").to_string(),
        offset: v["offset"].as_u64().expect("offset"),
        recovered: v["recovered"].as_bool().expect("recovered"),
        replayed: v["replayed"].as_u64().expect("replayed"),
    };
    assert_eq!(s.epoch.len(), 16, "{v}");
    (ws, s)
}

/// The next publication: its offset and its text.
async fn next_pub(ws: &mut Ws, what: &str) -> (u64, String) {
    let v = next_json(ws, what).await;
    assert_eq!(v["type"], "pub", "{what}: {v}");
    (
        v["offset"].as_u64().expect("offset"),
        v["data"].as_str().expect("data").to_string(),
    )
}

fn resume_mid_stream(backend: BackendChoice) {
    let server = TestServer::start_history(backend, limits(10_000), |b| b);
    let addr = server.addr;
    const N: usize = 2_000;
    block_on(async move {
        let (mut ws, first) = subscribe(addr, "t", None).await;
        assert_eq!(
            (first.offset, first.recovered, first.replayed),
            (0, false, 0)
        );
        let publisher = tokio::spawn(async move {
            let mut p = connect(addr, "/pubsub/t").await;
            for i in 0..N {
                p.send(WsMessage::text(format!("p{i}")))
                    .await
                    .expect("publish");
                if i % 25 == 24 {
                    tokio::time::sleep(Duration::from_millis(2)).await;
                }
            }
            p
        });
        let epoch = first.epoch.clone();
        let mut last = 0u64;
        let mut round = 0u64;
        while last < N as u64 {
            // Read a varying number, then drop the connection without a close.
            let take = 37 + (round * 53) % 150;
            for _ in 0..take {
                if last == N as u64 {
                    break;
                }
                let (offset, data) = within(WAIT, "a publication", next_pub(&mut ws, "pub")).await;
                assert_eq!(offset, last + 1, "round {round}: no gap, no repeat");
                assert_eq!(
                    data,
                    format!("p{}", offset - 1),
                    "offset {offset} is that publication"
                );
                last = offset;
            }
            drop(ws);
            round += 1;
            let (next, s) = subscribe(addr, "t", Some((last, &epoch))).await;
            assert!(s.recovered, "round {round}: resumed from {last}: {s:?}");
            assert_eq!(s.epoch, epoch, "one epoch while the server runs");
            assert!(s.offset >= last);
            assert_eq!(s.replayed, s.offset - last, "{s:?}");
            ws = next;
        }
        assert!(round >= 5, "dropped and resumed several times ({round})");
        let _ = publisher.await;
        // Nothing more after the last one.
        assert!(
            tokio::time::timeout(Duration::from_millis(200), ws.next())
                .await
                .is_err(),
            "no repeat after the last publication"
        );
    });
    let shared = server.shared();
    assert!(shared.total(|s| &s.history_resumes) >= 5);
    assert_eq!(
        shared.total(|s| &s.history_resumes),
        shared.total(|s| &s.history_recovered)
    );
    assert_eq!(shared.total(|s| &s.history_lost), 0);
}

fn not_recovered_when_history_cannot_cover_it(backend: BackendChoice) {
    let server = TestServer::start_history(backend, limits(10), |b| b);
    let addr = server.addr;
    let handle = server.server().handle();
    block_on(async move {
        for i in 1..=30u64 {
            let pos = handle
                .publish_recorded(
                    "old",
                    wsring::proto::OpCode::Text,
                    format!("m{i}").as_bytes(),
                )
                .expect("a topic with history");
            assert_eq!(pos.offset, i, "offsets grow by one from 1");
        }
        let (_, now) = subscribe(addr, "old", None).await;
        assert_eq!((now.offset, now.recovered, now.replayed), (30, false, 0));
        let epoch = now.epoch.clone();
        assert_eq!(handle.position("old").map(|p| p.offset), Some(30));
        assert_eq!(
            handle.position("old").map(|p| p.epoch.to_string()),
            Some(epoch.clone())
        );

        // Trimmed: 10 kept (21..30); from 5, 6..20 are gone.
        let (mut ws, s) = subscribe(addr, "old", Some((5, &epoch))).await;
        assert_eq!(
            (s.recovered, s.replayed, s.offset),
            (false, 10, 30),
            "{s:?}"
        );
        for want in 21..=30 {
            assert_eq!(
                next_pub(&mut ws, "replay").await,
                (want, format!("m{want}"))
            );
        }
        // From 20: exactly what is kept.
        let (_, s) = subscribe(addr, "old", Some((20, &epoch))).await;
        assert_eq!((s.recovered, s.replayed), (true, 10), "{s:?}");
        // Up to date.
        let (_, s) = subscribe(addr, "old", Some((30, &epoch))).await;
        assert_eq!((s.recovered, s.replayed), (true, 0), "{s:?}");
        // Another epoch, or an offset from the future.
        let stale = if epoch == "0000000000000001" {
            "0000000000000002"
        } else {
            "0000000000000001"
        };
        let (_, s) = subscribe(addr, "old", Some((25, stale))).await;
        assert_eq!(
            (s.recovered, s.replayed, s.epoch.as_str()),
            (false, 0, epoch.as_str())
        );
        let (_, s) = subscribe(addr, "old", Some((31, &epoch))).await;
        assert_eq!((s.recovered, s.replayed), (false, 0));

        // Malformed resumes are refused before the upgrade.
        for bad in [
            "/pubsub/old?recover=1&since=5",
            "/pubsub/old?recover=1&epoch=0000000000000001",
            "/pubsub/old?recover=1&since=x&epoch=0000000000000001",
            "/pubsub/old?recover=1&since=1&epoch=xyz",
            "/pubsub/old?recover=2",
        ] {
            let response = http_exchange(addr, &upgrade_request(bad)).await;
            assert_eq!(response.status, 400, "{bad}: {}", response.body_text());
        }
    });
}

fn binary_payloads_travel_as_base64(backend: BackendChoice) {
    let server = TestServer::start_history(backend, limits(100), |b| b);
    let addr = server.addr;
    block_on(async move {
        let (mut sub, s) = subscribe(addr, "bin", None).await;
        let mut p = connect(addr, "/pubsub/bin").await;
        p.send(WsMessage::binary(vec![0u8, 255, 1, 2]))
            .await
            .unwrap();
        p.send(WsMessage::text("quote \" and \\ and \u{e9}"))
            .await
            .unwrap();
        let v = next_json(&mut sub, "binary").await;
        assert_eq!(v["offset"], s.offset + 1);
        assert_eq!(v["data_b64"], "AP8BAg==", "{v}");
        assert!(v.get("data").is_none());
        let (_, text) = next_pub(&mut sub, "text").await;
        assert_eq!(text, "quote \" and \\ and \u{e9}");
        // A plain subscriber of the same topic gets the plain frames.
        match next_data(&mut p).await {
            WsMessage::Binary(b) => assert_eq!(&b[..], &[0, 255, 1, 2]),
            other => panic!("{other:?}"),
        }
    });
}

/// Thousands of clients resume within about a second; every one gets exactly what it
/// missed, and the server's history stays within its cap.
fn reconnect_storm(backend: BackendChoice) {
    const CLIENTS: usize = 2_000;
    const MISSED: u64 = 50;
    let server = TestServer::start_history(backend, limits(1_000), |b| b);
    let addr = server.addr;
    let handle = server.server().handle();
    block_on(async move {
        let first = handle
            .publish_recorded("storm", wsring::proto::OpCode::Text, b"m1")
            .expect("history");
        let epoch = first.epoch.to_string();
        for i in 2..=MISSED + 1 {
            handle.publish_recorded(
                "storm",
                wsring::proto::OpCode::Text,
                format!("m{i}").as_bytes(),
            );
        }
        let started = std::time::Instant::now();
        let mut clients = Vec::new();
        for c in 0..CLIENTS {
            let epoch = epoch.clone();
            clients.push(tokio::spawn(async move {
                let (mut ws, s) = subscribe(addr, "storm", Some((1, &epoch))).await;
                assert!(s.recovered && s.replayed == MISSED, "client {c}: {s:?}");
                for want in 2..=MISSED + 1 {
                    let (offset, data) = next_pub(&mut ws, "replay").await;
                    assert_eq!((offset, data), (want, format!("m{want}")), "client {c}");
                }
                ws
            }));
        }
        let mut sockets = Vec::new();
        for c in clients {
            sockets.push(
                within(Duration::from_secs(60), "a storm client", c)
                    .await
                    .expect("client"),
            );
        }
        let took = started.elapsed();
        eprintln!("{CLIENTS} resumes of {MISSED} publications each in {took:?}");
        // Live delivery continues after the replay, on every one of them.
        handle.publish_recorded("storm", wsring::proto::OpCode::Text, b"live");
        for (c, ws) in sockets.iter_mut().enumerate() {
            let (offset, data) = within(WAIT, "live", next_pub(ws, "live")).await;
            assert_eq!((offset, data.as_str()), (MISSED + 2, "live"), "client {c}");
        }
    });
    let shared = server.shared();
    assert_eq!(shared.total(|s| &s.history_recovered), CLIENTS as u64);
    assert_eq!(
        shared.total(|s| &s.history_replayed),
        CLIENTS as u64 * MISSED
    );
    let metrics = server.server().handle().metrics_text();
    let bytes: usize = metrics
        .lines()
        .find_map(|l| l.strip_prefix("wsring_history_bytes "))
        .and_then(|v| v.parse().ok())
        .expect("wsring_history_bytes");
    assert!(
        bytes < 64 * 1024,
        "one topic of 52 small publications: {bytes} B"
    );
}

/// The library's own calls, without the bench protocol.
fn the_library_api(backend: BackendChoice) {
    use wsring::api::{Accept, Conn, Decision, Handler};
    use wsring::proto::handshake::{Request, Upgrade};

    #[derive(Default)]
    struct App;
    impl Handler for App {
        type Data = Option<Position>;
        fn on_upgrade(&mut self, request: &Request, _: &Upgrade) -> Decision<Self::Data> {
            let since = match (request.query_param("since"), request.query_param("epoch")) {
                (Some(o), Some(e)) => Some(Position {
                    offset: o.parse().unwrap(),
                    epoch: wsring::api::Epoch::parse(e).unwrap(),
                }),
                _ => None,
            };
            Decision::Accept(Accept::new(since))
        }
        fn on_open(&mut self, conn: &mut Conn<'_, Self::Data>) {
            let since = *conn.data().unwrap();
            let before = conn.position("lib");
            let r = conn
                .subscribe_at("lib", Subscription::since(since))
                .expect("a topic with history");
            assert_eq!(
                before,
                Some(r.position),
                "live delivery starts after the last one"
            );
            // Queued after the replay (on_subscribed would have come before it).
            conn.send_text(&format!(
                "resumed {} {} {}",
                r.position.offset, r.recovered, r.replayed
            ));
            assert!(
                conn.subscribe_at("lib", Subscription::live()).is_none(),
                "once"
            );
        }
    }
    let server = wsring::engine::ServerBuilder::from(test_config(backend))
        .history(wsring::api::HistoryConfig {
            limits: limits(100),
            ..Default::default()
        })
        .start(|_| App)
        .expect("start");
    let addr = server.local_addr();
    let handle = server.handle();
    block_on(async move {
        assert_eq!(handle.position("lib"), None, "nothing published yet");
        let mut positions = Vec::new();
        for i in 1..=5 {
            positions.push(
                handle
                    .publish_recorded(
                        "lib",
                        wsring::proto::OpCode::Text,
                        format!("x{i}").as_bytes(),
                    )
                    .unwrap(),
            );
        }
        assert_eq!(
            positions.iter().map(|p| p.offset).collect::<Vec<_>>(),
            vec![1, 2, 3, 4, 5]
        );
        let epoch = positions[0].epoch;
        let mut ws = connect(addr, &format!("/r?since=2&epoch={epoch}")).await;
        for want in 3..=5 {
            match next_data(&mut ws).await {
                WsMessage::Text(t) => assert_eq!(t.as_str(), format!("x{want}")),
                other => panic!("{other:?}"),
            }
        }
        match next_data(&mut ws).await {
            WsMessage::Text(t) => assert_eq!(t.as_str(), "resumed 5 true 3"),
            other => panic!("{other:?}"),
        }
        handle.publish("lib", wsring::proto::OpCode::Text, b"x6");
        match next_data(&mut ws).await {
            WsMessage::Text(t) => assert_eq!(t.as_str(), "x6"),
            other => panic!("{other:?}"),
        }
        assert_eq!(handle.position("lib").map(|p| p.offset), Some(6));
    });
    drop(server);
}

/// Two nodes joined by Redis (which numbers the publications): a client drops on one and
/// resumes on the other, and on a third node started afterwards, with every publication
/// once and in order; both nodes show the same offsets and epoch.
#[cfg(feature = "redis")]
fn resume_on_another_node_through_redis(backend: BackendChoice) {
    use support::brokers::{BrokerServer, Kind};
    use wsring::pubsub::broker::redis::{RedisBroker, RedisOptions};
    let Some(redis) = BrokerServer::start(Kind::Redis) else {
        return;
    };
    let url = redis.url();
    let node = |backend: BackendChoice, id: u64| {
        let broker =
            RedisBroker::new(std::slice::from_ref(&url), RedisOptions::default()).expect("client");
        TestServer::start_history(backend, limits(1_000), move |b| {
            b.broker(std::sync::Arc::new(broker)).node_id(id)
        })
    };
    let other = match backend {
        BackendChoice::Epoll => BackendChoice::IoUring,
        _ => BackendChoice::Epoll,
    };
    let (a, b) = (node(backend, 1), node(other, 2));
    const N: usize = 300;
    block_on(async {
        let (mut x, first) = subscribe(a.addr, "t", None).await;
        // The first subscriber on b is a plain one: it waits for b's copy of the history
        // to load like any other, and gets plain frames, no `subscribed` message.
        let mut plain = connect(b.addr, "/pubsub/t").await;
        let (mut y, on_b) = subscribe(b.addr, "t", None).await;
        assert_eq!(
            first.epoch, on_b.epoch,
            "one epoch, from Redis, on every node"
        );
        let epoch = first.epoch.clone();
        let start = first.offset;
        let addr = a.addr;
        let publisher = tokio::spawn(async move {
            let mut p = connect(addr, "/pubsub/t").await;
            for i in 0..N {
                p.send(WsMessage::text(format!("p{i}")))
                    .await
                    .expect("publish");
                if i % 20 == 19 {
                    tokio::time::sleep(Duration::from_millis(3)).await;
                }
            }
            p
        });
        let mut last = start;
        for _ in 0..100 {
            let (offset, data) = within(WAIT, "on node a", next_pub(&mut x, "a")).await;
            assert_eq!(offset, last + 1);
            assert_eq!(data, format!("p{}", offset - start - 1));
            last = offset;
        }
        drop(x);
        // Resume on the other node.
        let (mut x, s) = subscribe(b.addr, "t", Some((last, &epoch))).await;
        assert!(s.recovered, "{s:?}");
        assert_eq!(s.epoch, epoch);
        while last < start + N as u64 {
            let (offset, data) = within(WAIT, "on node b", next_pub(&mut x, "b")).await;
            assert_eq!(offset, last + 1, "no gap, no repeat across nodes");
            assert_eq!(data, format!("p{}", offset - start - 1));
            last = offset;
        }
        // The subscriber that stayed on b saw the same numbers.
        for want in start + 1..=start + N as u64 {
            let (offset, data) = within(WAIT, "y on b", next_pub(&mut y, "y")).await;
            assert_eq!((offset, data), (want, format!("p{}", want - start - 1)));
        }
        let _ = publisher.await;
        for i in 0..N {
            match within(WAIT, "plain on b", next_data(&mut plain)).await {
                WsMessage::Text(t) => assert_eq!(t.as_str(), format!("p{i}")),
                other => panic!("plain frames only: {other:?}"),
            }
        }
        // A node that was not there: its copy is loaded from Redis first.
        let c = node(backend, 3);
        let (mut z, s) = subscribe(c.addr, "t", Some((start + 250, &epoch))).await;
        assert!(s.recovered, "{s:?}");
        assert_eq!((s.offset, s.replayed), (start + N as u64, 50));
        for want in start + 251..=start + N as u64 {
            let (offset, _) = within(WAIT, "z on c", next_pub(&mut z, "z")).await;
            assert_eq!(offset, want);
        }
        // A stale epoch is not recovered there either.
        let (_, s) = subscribe(c.addr, "t", Some((start + 250, "0000000000000001"))).await;
        assert!(!s.recovered);
    });
    assert_eq!(
        redis.redis_command(&["XLEN", "wsring:s:t"]).trim(),
        format!(":{N}"),
        "the stream Redis keeps"
    );
}

/// A publication Redis numbered but whose PUBLISH this node never got is repaired from the
/// stream in Redis, once for the topic; one Redis no longer has either is skipped, and a
/// resume from before it says `recovered: false`.
#[cfg(feature = "redis")]
fn a_gap_in_what_redis_delivers_is_repaired_once(backend: BackendChoice) {
    use support::brokers::{BrokerServer, Kind};
    use wsring::pubsub::broker::redis::{RedisBroker, RedisOptions};
    use wsring::pubsub::broker::wire;
    let Some(redis) = BrokerServer::start(Kind::Redis) else {
        return;
    };
    let broker = RedisBroker::new(&[redis.url()], RedisOptions::default()).expect("client");
    let node = TestServer::start_history(backend, limits(100), move |b| {
        b.broker(std::sync::Arc::new(broker)).node_id(7)
    });
    let handle = node.server().handle();
    let text = wsring::proto::OpCode::Text;
    let metric = |name: &str| -> u64 {
        handle
            .metrics_text()
            .lines()
            .find_map(|l| l.strip_prefix(&format!("{name} ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name}"))
    };
    block_on(async {
        let (mut ws, s) = subscribe(node.addr, "g", None).await;
        assert_eq!(s.offset, 0);
        handle.publish("g", text, b"m1");
        assert_eq!(next_pub(&mut ws, "1").await, (1, "m1".into()));
        let loads = metric("wsring_history_loads_total");
        // Offset 2 numbered and kept in Redis, its PUBLISH lost.
        redis.redis_command(&["INCR", "wsring:o:g"]);
        let stored = wire::encode_for_numbering(99, text, b"m2");
        redis.redis_command_bytes(&[b"XADD", b"wsring:s:g", b"2-0", b"m", &stored]);
        handle.publish("g", text, b"m3");
        assert_eq!(next_pub(&mut ws, "2, repaired").await, (2, "m2".into()));
        assert_eq!(next_pub(&mut ws, "3").await, (3, "m3".into()));
        assert_eq!(metric("wsring_history_loads_total"), loads + 1, "one load");
        // Offset 4 given out and never kept anywhere.
        redis.redis_command(&["INCR", "wsring:o:g"]);
        handle.publish("g", text, b"m5");
        assert_eq!(
            next_pub(&mut ws, "5 after the hole").await,
            (5, "m5".into())
        );
        assert_eq!(metric("wsring_history_loads_total"), loads + 2);
        assert_eq!(metric("wsring_history_broker_lost_total"), 1);
        let (_, r) = subscribe(node.addr, "g", Some((3, &s.epoch))).await;
        assert!(!r.recovered, "4 is gone: {r:?}");
        assert_eq!(r.replayed, 1, "5 is there");
        let (_, r) = subscribe(node.addr, "g", Some((4, &s.epoch))).await;
        assert!(r.recovered, "after the hole: {r:?}");
    });
}

for_both_backends!(
    resume_mid_stream,
    not_recovered_when_history_cannot_cover_it,
    binary_payloads_travel_as_base64,
    reconnect_storm,
    the_library_api,
    #[cfg(feature = "redis")]
    resume_on_another_node_through_redis,
    #[cfg(feature = "redis")]
    a_gap_in_what_redis_delivers_is_repaired_once,
);
