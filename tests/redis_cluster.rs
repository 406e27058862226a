//! Nodes joined through a real Redis Cluster (three `redis-server`s in cluster mode on
//! 127.0.0.1, joined by `redis-cli --cluster create`; a missing binary skips unless
//! `WSRING_REQUIRE_BROKERS=1`), with the client in cluster mode: sharded pub/sub, each
//! channel on the master that owns its key slot.
//! - Topics on every master: every message once, in order per publisher, on both nodes;
//!   each master carries exactly the channels of its own slots (a channel subscribed on the
//!   wrong master would be refused with MOVED, so this also shows the routing).
//! - A topic's slot moved to another master mid-stream: the nodes follow it by themselves
//!   (the server's SUNSUBSCRIBE or a MOVED ends the session, the next reads the slot map
//!   again) and cross-node delivery comes back on the new owner.

mod common;
#[cfg(feature = "redis")]
mod support {
    pub mod brokers;
}

#[cfg(feature = "redis")]
mod cluster {
    use std::collections::HashMap;
    use std::sync::Arc;
    use std::sync::atomic::Ordering;
    use std::time::{Duration, Instant};

    use super::common::*;
    use super::support::brokers::RedisCluster;
    use tokio_tungstenite::tungstenite::Message;
    use wsring::engine::BackendChoice;
    use wsring::pubsub::broker::redis::{RedisBroker, RedisOptions};
    use wsring::pubsub::broker::{Broker, BrokerState, BrokerStats};

    /// A cluster-mode client seeded with `seeds` (a fast probe, so a test sees a dead
    /// subscription soon).
    fn client(seeds: &[String]) -> Arc<dyn Broker> {
        Arc::new(
            RedisBroker::new(
                seeds,
                RedisOptions {
                    cluster: true,
                    probe_interval: Duration::from_millis(300),
                    probe_timeout: Duration::from_millis(700),
                    ..RedisOptions::default()
                },
            )
            .expect("cluster client"),
        )
    }

    fn stat(n: &TestServer, f: fn(&BrokerStats) -> u64) -> u64 {
        n.shared().backplane().map_or(0, |bp| f(bp.stats()))
    }

    async fn subscribed(nodes: &[&TestServer], topics: u64, what: &str) {
        eventually(Duration::from_secs(10), what, || {
            nodes.iter().all(|n| {
                n.shared().backplane().is_some_and(|bp| {
                    bp.stats().state() == BrokerState::Up
                        && bp.stats().topics.load(Ordering::Acquire) == topics
                })
            })
        })
        .await;
    }

    /// The topics' shard channels a master carries (`PUBSUB SHARDCHANNELS wsring:*`, less
    /// the nodes' probe channels, which hold a 0xFF byte), sorted.
    fn shard_channels(cluster: &RedisCluster, master: usize) -> Vec<String> {
        let reply = cluster.nodes[master].redis_command(&["PUBSUB", "SHARDCHANNELS", "wsring:*"]);
        let mut out: Vec<String> = reply
            .lines()
            .filter(|l| l.starts_with("wsring:") && !l.contains('\u{FFFD}'))
            .map(str::to_owned)
            .collect();
        out.sort();
        out
    }

    /// Subscribers of a shard channel on a master (`PUBSUB SHARDNUMSUB`).
    fn shard_subscribers(cluster: &RedisCluster, master: usize, channel: &str) -> u64 {
        let reply = cluster.nodes[master].redis_command(&["PUBSUB", "SHARDNUMSUB", channel]);
        reply
            .lines()
            .last()
            .and_then(|l| l.trim().trim_start_matches(':').parse().ok())
            .unwrap_or(0)
    }

    /// Topics named `t0`, `t1`, ... until every master owns at least `each` of them.
    fn topics_on_every_master(cluster: &RedisCluster, each: usize) -> Vec<(String, usize)> {
        let mut per = vec![0; cluster.nodes.len()];
        let mut topics = Vec::new();
        for k in 0.. {
            if per.iter().all(|&n| n >= each) {
                break;
            }
            let topic = format!("t{k}");
            let owner = cluster.owner_of(&format!("wsring:{topic}"));
            if per[owner] < each {
                per[owner] += 1;
                topics.push((topic, owner));
            }
        }
        topics
    }

    #[test]
    fn two_nodes_topics_on_every_master_every_message_once_in_order() {
        let Some(cluster) = RedisCluster::start(3) else {
            return;
        };
        let urls = cluster.urls();
        let topics = topics_on_every_master(&cluster, 2);
        // Each node seeded with a different master: either gives the same slot map.
        let a = TestServer::start_node(BackendChoice::IoUring, client(&urls[0..1]), 0xa);
        let b = TestServer::start_node(BackendChoice::Epoll, client(&urls[1..]), 0xb);
        let per = 100;
        block_on(async {
            // Per topic, one client on each node; each publishes `per` messages.
            let mut clients = Vec::new();
            for (topic, _) in &topics {
                let path = format!("/pubsub/{topic}");
                clients.push((connect(a.addr, &path).await, connect(b.addr, &path).await));
            }
            subscribed(&[&a, &b], topics.len() as u64, "both nodes subscribed").await;
            for master in 0..cluster.nodes.len() {
                let mut want: Vec<String> = topics
                    .iter()
                    .filter(|(_, owner)| *owner == master)
                    .map(|(t, _)| format!("wsring:{t}"))
                    .collect();
                want.sort();
                assert_eq!(
                    shard_channels(&cluster, master),
                    want,
                    "master {master} carries the channels of its slots, and only those"
                );
            }
            for seq in 0..per {
                for (ca, cb) in clients.iter_mut() {
                    send(ca, Message::text(format!("0:{seq}"))).await;
                    send(cb, Message::text(format!("1:{seq}"))).await;
                }
            }
            for (i, (ca, cb)) in clients.iter_mut().enumerate() {
                for ws in [ca, cb] {
                    let mut next: HashMap<usize, usize> = HashMap::new();
                    for _ in 0..2 * per {
                        let m = next_data_for(ws, &format!("topic {i}")).await;
                        let text = m.into_text().expect("text");
                        let (node, seq) = text.split_once(':').expect("node:seq");
                        let (node, seq): (usize, usize) =
                            (node.parse().unwrap(), seq.parse().unwrap());
                        let want = next.entry(node).or_default();
                        assert_eq!(seq, *want, "topic {i}: publisher {node} out of order");
                        *want += 1;
                    }
                    assert_eq!(next.get(&0), Some(&per));
                    assert_eq!(next.get(&1), Some(&per));
                    // Nothing after the last (no duplicate).
                    send(ws, Message::Ping(b"end".to_vec().into())).await;
                    match next_message_for(ws, "the pong after the last").await {
                        Message::Pong(p) => assert_eq!(&p[..], b"end"),
                        other => panic!("a duplicate arrived after the last: {other:?}"),
                    }
                }
            }
        });
        let sent = (topics.len() * per) as u64;
        for n in [&a, &b] {
            assert_eq!(stat(n, |s| s.out_failed.load(Ordering::Relaxed)), 0);
            assert_eq!(stat(n, |s| s.messages_out.load(Ordering::Relaxed)), sent);
            assert_eq!(stat(n, |s| s.reconnects.load(Ordering::Relaxed)), 0);
        }
        block_on(eventually(
            Duration::from_secs(5),
            "each node counts the other's messages once",
            || {
                [&a, &b]
                    .iter()
                    .all(|n| stat(n, |s| s.messages_in.load(Ordering::Relaxed)) == sent)
            },
        ));
    }

    /// How long the nodes may take to follow a moved slot (a session ends at once on the
    /// server's SUNSUBSCRIBE; the reconnect pause starts at 100 ms).
    const FOLLOW_WITHIN: Duration = Duration::from_secs(10);

    #[test]
    fn a_moved_slot_is_followed_and_delivery_comes_back() {
        let Some(cluster) = RedisCluster::start(3) else {
            return;
        };
        let urls = cluster.urls();
        let a = TestServer::start_node(BackendChoice::Auto, client(&urls), 0xa);
        let b = TestServer::start_node(BackendChoice::Auto, client(&urls), 0xb);
        let channel = "wsring:moving";
        let from = cluster.owner_of(channel);
        let to = (from + 1) % cluster.nodes.len();
        block_on(async {
            let mut pa = connect(a.addr, "/pubsub/moving").await;
            let mut sb = connect(b.addr, "/pubsub/moving").await;
            subscribed(&[&a, &b], 1, "both nodes subscribed to moving").await;
            assert_eq!(shard_channels(&cluster, from), vec![channel.to_owned()]);
            assert_eq!(shard_subscribers(&cluster, from, channel), 2);
            for i in 0..20 {
                send(&mut pa, Message::text(i.to_string())).await;
            }
            for i in 0..20 {
                assert_eq!(next_data(&mut sb).await, Message::text(i.to_string()));
            }

            cluster.move_slot(cluster.slot(channel), from, to);
            let moved = Instant::now();
            eventually(
                FOLLOW_WITHIN,
                "both nodes resubscribed on the new owner",
                || {
                    shard_subscribers(&cluster, to, channel) == 2
                        && shard_channels(&cluster, from).is_empty()
                },
            )
            .await;
            eventually(FOLLOW_WITHIN, "both nodes up again", || {
                [&a, &b].iter().all(|n| {
                    n.shared()
                        .backplane()
                        .is_some_and(|bp| bp.stats().state() == BrokerState::Up)
                })
            })
            .await;
            eprintln!("followed the moved slot in {:?}", moved.elapsed());
            for n in [&a, &b] {
                assert!(
                    stat(n, |s| s.reconnects.load(Ordering::Relaxed)) >= 1,
                    "a node rebuilt its session after the slot moved"
                );
            }
            // Cross-node delivery is back: b gets what a publishes now, in order, once.
            for i in 20..40 {
                send(&mut pa, Message::text(i.to_string())).await;
            }
            for i in 20..40 {
                assert_eq!(next_data(&mut sb).await, Message::text(i.to_string()));
            }
            // On a, every message reached its own subscriber (local delivery never stopped).
            for i in 0..40 {
                assert_eq!(next_data(&mut pa).await, Message::text(i.to_string()));
            }
        });
    }
}
