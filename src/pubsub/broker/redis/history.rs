//! Topics with history over Redis: the broker numbers every publication, so offsets and
//! epochs are the same on every node and a client can resume on any of them.
//!
//! Per topic three keys, beside its channel: `<prefix>o:<topic>` (the last offset, by
//! `INCR`), `<prefix>s:<topic>` (a stream capped at the history's count, entry id
//! `<offset>-0`, field `m`: the message as [`wire::encode_for_numbering`] wrote it) and
//! `<prefix>e:<topic>` (the epoch, 16 hex digits). One script ([`SCRIPT`]) runs a
//! publication atomically: it takes the epoch (a new one, and the numbering restarted,
//! when the key is gone: the history may have been lost), increments the offset, appends
//! to the stream, refreshes the keys' lifetime (the history's age limit) and publishes the
//! message with its epoch and offset in its header. A node reads a topic's stream
//! ([`load`]) after it subscribed to its channel, so that what was published before is in
//! the stream and what comes after arrives on the channel: merged by offset, nothing is
//! missing and nothing counted twice.
//!
//! Not with a Redis Cluster: the keys and the channel would have to share a slot; there
//! each node numbers its own history ([`RedisBroker::numbers`](super::RedisBroker)).

use std::sync::Arc;

use bytes::Bytes;
use redis::aio::MultiplexedConnection;
use redis::{RedisResult, Value};

use super::super::{Loaded, wire};
use crate::pubsub::history::Epoch;

/// The publication script. KEYS: offset, stream, epoch. ARGV: the message (header,
/// payload), the stream's cap, the keys' lifetime in ms, a candidate epoch, the channel,
/// the publish command (`PUBLISH` or `SPUBLISH`).
pub(super) const SCRIPT: &str = r"
local e = redis.call('GET', KEYS[3])
if not e then
  e = ARGV[4]
  redis.call('SET', KEYS[3], e)
  redis.call('DEL', KEYS[1], KEYS[2])
end
local o = redis.call('INCR', KEYS[1])
redis.call('XADD', KEYS[2], 'MAXLEN', ARGV[2], o .. '-0', 'm', ARGV[1])
for i = 1, 3 do redis.call('PEXPIRE', KEYS[i], ARGV[3]) end
local m = ARGV[1]
redis.call(ARGV[6], ARGV[5], string.sub(m, 1, 10) .. e .. string.format('%016x', o) .. string.sub(m, 11))
return o
";

/// The three keys of `topic`: offset, stream, epoch.
pub(super) fn keys(prefix: &str, topic: &str) -> [String; 3] {
    ["o", "s", "e"].map(|k| format!("{prefix}{k}:{topic}"))
}

/// Reads `topic`'s stream: sets its epoch if it has none (so that every node agrees on
/// the one this node would otherwise invent), then the last offset and what is kept.
pub(super) async fn load(
    conn: &mut MultiplexedConnection,
    prefix: &str,
    topic: &Arc<str>,
    ttl_ms: u64,
) -> RedisResult<Result<Loaded, String>> {
    let [okey, skey, ekey] = keys(prefix, topic);
    let mut pipe = redis::pipe();
    pipe.cmd("SET")
        .arg(&ekey)
        .arg(Epoch::random().to_string())
        .arg("NX")
        .arg("PX")
        .arg(ttl_ms.max(1))
        .ignore()
        .cmd("GET")
        .arg(&ekey)
        .cmd("GET")
        .arg(&okey)
        .cmd("XRANGE")
        .arg(&skey)
        .arg("-")
        .arg("+");
    let (epoch, last, range): (Option<String>, Option<u64>, Value) = pipe.query_async(conn).await?;
    Ok(parse(topic, epoch, last, range))
}

fn parse(
    topic: &Arc<str>,
    epoch: Option<String>,
    last: Option<u64>,
    range: Value,
) -> Result<Loaded, String> {
    let epoch = epoch
        .as_deref()
        .and_then(Epoch::parse)
        .ok_or_else(|| format!("{topic}: no readable epoch"))?;
    let Value::Array(items) = range else {
        return Err(format!("{topic}: XRANGE answered {range:?}"));
    };
    let mut entries = Vec::with_capacity(items.len());
    for item in items {
        let Value::Array(parts) = item else { continue };
        let [id, fields] = &parts[..] else { continue };
        let offset = match id {
            Value::BulkString(b) => std::str::from_utf8(b)
                .ok()
                .and_then(|s| s.strip_suffix("-0"))
                .and_then(|s| s.parse::<u64>().ok()),
            _ => None,
        };
        let message = match fields {
            Value::Array(kv) => kv.chunks(2).find_map(|kv| match kv {
                [Value::BulkString(k), Value::BulkString(v)] if k == b"m" => Some(v.clone()),
                _ => None,
            }),
            _ => None,
        };
        let (Some(offset), Some(message)) = (offset, message) else {
            continue;
        };
        let mut raw = message;
        // The stored form has no number yet; clear the flag to read it as a plain one.
        if let Some(op) = raw.get_mut(1) {
            *op &= !wire::NUMBERED;
        }
        if let Ok(d) = wire::decode(Bytes::from(raw)) {
            entries.push((offset, d.opcode, d.payload));
        }
    }
    let last = last.unwrap_or(0).max(entries.last().map_or(0, |e| e.0));
    Ok(Loaded {
        topic: topic.clone(),
        epoch,
        last,
        entries,
    })
}

/// Adds one publication through [`SCRIPT`] to `pipe`.
pub(super) fn add_publication(
    pipe: &mut redis::Pipeline,
    prefix: &str,
    topic: &str,
    channel: &[u8],
    message: &[u8],
    numbering: &Numbering,
    verb: &str,
) {
    let [okey, skey, ekey] = keys(prefix, topic);
    pipe.cmd("EVAL")
        .arg(SCRIPT)
        .arg(3)
        .arg(okey)
        .arg(skey)
        .arg(ekey)
        .arg(message)
        .arg(numbering.cap)
        .arg(numbering.ttl_ms.max(1))
        .arg(Epoch::random().to_string())
        .arg(channel)
        .arg(verb)
        .ignore();
}

/// How a numbered publication is kept: the stream's cap and the keys' lifetime.
#[derive(Clone, Debug)]
pub(super) struct Numbering {
    pub(super) topic: Arc<str>,
    pub(super) cap: usize,
    pub(super) ttl_ms: u64,
}
