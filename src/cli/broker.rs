//! `wsring serve --broker URL`: the broker client the URLs describe.
//!
//! - one or more `redis://host:port[/db]` URLs: Redis pub/sub, the topics spread over the
//!   instances by a stable hash of their name (every node must list the same URLs in the
//!   same order); `--broker-sharded` uses Redis 7's sharded pub/sub (SSUBSCRIBE/SPUBLISH);
//!   with `--broker-cluster` the URLs are seed nodes of one Redis Cluster instead, and each
//!   topic's channel is subscribed and published on the master that owns its key slot;
//! - one or more `nats://host:port` URLs: the servers of one NATS cluster.

use std::sync::Arc;

use crate::pubsub::broker::Broker;
use crate::pubsub::broker::nats::{NatsBroker, NatsOptions};
use crate::pubsub::broker::redis::{RedisBroker, RedisOptions};

/// How the `redis://` URLs are used.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RedisMode {
    /// Each URL a shard, SUBSCRIBE/PUBLISH.
    #[default]
    Plain,
    /// Each URL a shard, SSUBSCRIBE/SPUBLISH (`--broker-sharded`).
    Sharded,
    /// The URLs are seeds of one Redis Cluster; sharded pub/sub by key slot
    /// (`--broker-cluster`).
    Cluster,
}

/// The broker client for `urls` (all of one kind).
///
/// # Errors
/// A message for the user: mixed or unknown schemes, or a URL the client refuses.
pub fn from_urls(urls: &[String], mode: RedisMode) -> Result<Arc<dyn Broker>, String> {
    let scheme = |u: &str| u.split_once("://").map(|(s, _)| s.to_ascii_lowercase());
    let schemes: Vec<Option<String>> = urls.iter().map(|u| scheme(u)).collect();
    let all = |names: &[&str]| {
        schemes
            .iter()
            .all(|s| s.as_deref().is_some_and(|s| names.contains(&s)))
    };
    if urls.is_empty() {
        return Err("no broker URL".into());
    }
    if all(&["redis", "rediss"]) {
        let opts = RedisOptions {
            sharded: mode != RedisMode::Plain,
            cluster: mode == RedisMode::Cluster,
            ..RedisOptions::default()
        };
        return RedisBroker::new(urls, opts)
            .map(|b| Arc::new(b) as Arc<dyn Broker>)
            .map_err(|e| e.to_string());
    }
    match mode {
        RedisMode::Plain => {}
        RedisMode::Sharded => {
            return Err("--broker-sharded applies to redis:// brokers only".into());
        }
        RedisMode::Cluster => {
            return Err("--broker-cluster applies to redis:// brokers only".into());
        }
    }
    if all(&["nats", "tls"]) {
        return NatsBroker::new(urls, NatsOptions::default())
            .map(|b| Arc::new(b) as Arc<dyn Broker>)
            .map_err(|e| e.to_string());
    }
    Err(format!(
        "--broker takes redis:// URLs (several: shards) or nats:// URLs (several: one cluster), \
         all of one kind; got {}",
        urls.join(", ")
    ))
}

/// Parses `--node-id`: 1 to 16 hex digits, with or without `0x`.
///
/// # Errors
/// Anything else.
pub fn parse_node_id(s: &str) -> Result<u64, String> {
    let digits = s
        .strip_prefix("0x")
        .or_else(|| s.strip_prefix("0X"))
        .unwrap_or(s);
    if digits.is_empty() || digits.len() > 16 {
        return Err(format!("{s:?}: a node id is 1 to 16 hex digits"));
    }
    u64::from_str_radix(digits, 16).map_err(|_| format!("{s:?}: a node id is 1 to 16 hex digits"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_pick_the_client_and_bad_ones_are_refused() {
        let s = |v: &[&str]| v.iter().map(|x| x.to_string()).collect::<Vec<_>>();
        let redis = from_urls(
            &s(&["redis://127.0.0.1:6379", "redis://127.0.0.1:6380"]),
            RedisMode::Plain,
        )
        .expect("redis");
        assert!(redis.describe().contains("redis"), "{}", redis.describe());
        let nats = from_urls(&s(&["nats://127.0.0.1:4222"]), RedisMode::Plain).expect("nats");
        assert!(nats.describe().contains("nats"), "{}", nats.describe());
        for bad in [
            s(&[]),
            s(&["redis://127.0.0.1:1", "nats://127.0.0.1:2"]),
            s(&["http://127.0.0.1:1"]),
            s(&["127.0.0.1:6379"]),
        ] {
            assert!(from_urls(&bad, RedisMode::Plain).is_err(), "{bad:?}");
        }
        let nats = s(&["nats://127.0.0.1:4222"]);
        assert!(from_urls(&nats, RedisMode::Sharded).is_err());
        assert!(from_urls(&nats, RedisMode::Cluster).is_err());
        let cluster = from_urls(
            &s(&["redis://127.0.0.1:7000", "redis://127.0.0.1:7001"]),
            RedisMode::Cluster,
        )
        .expect("cluster");
        assert!(
            cluster.describe().contains("cluster"),
            "{}",
            cluster.describe()
        );
        // A cluster has only database 0.
        assert!(from_urls(&s(&["redis://127.0.0.1:7000/2"]), RedisMode::Cluster).is_err());
    }

    #[test]
    fn node_ids_are_hex() {
        assert_eq!(parse_node_id("0x1f"), Ok(0x1f));
        assert_eq!(parse_node_id("ffffffffffffffff"), Ok(u64::MAX));
        for bad in ["", "0x", "12345678901234567", "zz", "-1"] {
            assert!(parse_node_id(bad).is_err(), "{bad}");
        }
    }
}
