//! The handler behind `wsring serve`: the bench protocol (docs/PROTOCOL.md) plus a status page.
//!
//! - `/echo` sends every message back with the same opcode;
//! - `/pubsub/<topic>` subscribes the connection to `<topic>` and publishes every message
//!   it sends to all subscribers of `<topic>` (the sender included); a topic name longer
//!   than [`MAX_TOPIC_BYTES`] (256 bytes) is refused with HTTP 414, so a peer cannot make
//!   every worker's topic registry hold names as long as the request head allows;
//! - `/pubsub/<topic>?recover=1[&since=<offset>&epoch=<epoch>]` (with history, on by
//!   default in `wsring serve`) does the same, but first sends
//!   `{"type":"subscribed","topic":..,"epoch":..,"offset":..,"recovered":..,"replayed":..}`,
//!   then the publications after `since` still kept, then live ones, each as
//!   `{"type":"pub","offset":N,"data":".."}` (`"data_b64"` for binary payloads), encoded
//!   once per publication ([`envelope`]); docs/history.md is the client's side;
//! - `GET /` is a status page with a browser demo on `/pubsub/demo`, `GET /metrics` the
//!   counters in Prometheus text format; any other path is 404, and a plain GET to an
//!   upgrade-only path is 426.
//!
//! Subprotocols (`Sec-WebSocket-Protocol`): the messages are the same whatever is
//! negotiated, but a browser fails a connection whose 101 names none of the protocols it
//! offered. A client that offers some gets the first of the server's list
//! ([`BenchProtocol::with_protocols`], `wsring serve --protocols`, in the server's order of
//! preference) that it offered; one that offers only others, or any when the list is empty
//! (the default), gets its own first offer, as Node's `ws` answers. A client that offers
//! none gets no header.

use std::sync::Arc;

use crate::proto::HandshakeError;

use super::status;
use crate::api::{Accept, Conn, Decision, Handler, HttpResponse, Message, Reject};
use crate::engine::{Handle, metrics};
use crate::proto::OpCode;
use crate::proto::handshake::{Request, Upgrade};
use crate::pubsub::history::{Epoch, Position, Resumed, Subscription};

/// What a connection of the bench protocol does with its messages. One byte in every
/// connection's slot: a `/pubsub/<topic>` connection publishes to the topic it joined
/// ([`Conn::publish_to_joined`]), whose name the engine keeps once per topic, so the
/// route holds no name of its own (an `Arc<str>` here made every idle subscriber 16 B
/// larger).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route {
    /// Echo them.
    Echo,
    /// Publish them to the topic of the path.
    PubSub,
}

/// The longest topic name `/pubsub/<topic>` accepts, in bytes; a longer one gets 414.
pub const MAX_TOPIC_BYTES: usize = 256;

/// The bench-protocol handler (one per worker).
pub struct BenchProtocol {
    handle: Handle,
    /// Subprotocols the server speaks, in its order of preference (shared by the workers).
    protocols: Arc<[String]>,
}

impl BenchProtocol {
    /// A handler for one worker, with no subprotocol list of its own (it answers a client
    /// that offers some with the client's first).
    pub fn new(handle: Handle) -> BenchProtocol {
        BenchProtocol {
            handle,
            protocols: Arc::from(Vec::new()),
        }
    }

    /// The same handler speaking `protocols`, in the server's order of preference.
    pub fn with_protocols(mut self, protocols: impl Into<Arc<[String]>>) -> BenchProtocol {
        self.protocols = protocols.into();
        self
    }

    /// The subprotocol to answer `upgrade` with: the first of the server's protocols the
    /// client offered, else the client's first offer; `None` when it offered none.
    pub fn choose_protocol<'a>(&'a self, upgrade: &'a Upgrade) -> Option<&'a str> {
        let first = upgrade.protocols.first()?;
        if !self.protocols.is_empty() {
            let supported: Vec<&str> = self.protocols.iter().map(String::as_str).collect();
            if let Some(chosen) = upgrade.select_protocol(&supported) {
                return Some(chosen);
            }
        }
        Some(first)
    }
}

impl Handler for BenchProtocol {
    type Data = Route;

    fn on_upgrade(&mut self, request: &Request, upgrade: &Upgrade) -> Decision<Route> {
        let protocol = self.choose_protocol(upgrade).map(str::to_owned);
        let accept = |route| {
            let accept = Accept::new(route);
            match protocol {
                Some(protocol) => accept.protocol(protocol),
                None => accept,
            }
        };
        if request.path == "/echo" {
            return Decision::Accept(accept(Route::Echo));
        }
        match request.path.strip_prefix("/pubsub/") {
            Some(topic) if topic.len() > MAX_TOPIC_BYTES => Decision::Reject(Reject {
                body: format!("topic name longer than {MAX_TOPIC_BYTES} bytes\n"),
                ..Reject::status(414)
            }),
            Some(topic) if !topic.is_empty() => {
                let resume = match parse_resume(request.query.as_deref()) {
                    Ok(r) => r,
                    Err(why) => {
                        return Decision::Reject(Reject {
                            body: format!("{why}\n"),
                            ..Reject::status(400)
                        });
                    }
                };
                if resume.is_some() && self.handle.shared().history_of(topic).is_none() {
                    return Decision::Reject(Reject {
                        body: "this server keeps no history (--history-size 0): recover=1 cannot be served\n".into(),
                        ..Reject::status(400)
                    });
                }
                let accept = accept(Route::PubSub);
                Decision::Accept(match resume {
                    Some(since) => {
                        accept.subscribe_at(topic, Subscription::since(since).enveloped())
                    }
                    None => accept.subscribe(topic),
                })
            }
            _ => Decision::Reject(Reject::status(404)),
        }
    }

    fn on_http(&mut self, request: &Request) -> Option<HttpResponse> {
        let shared = self.handle.shared();
        match request.path.as_str() {
            "/" => Some(HttpResponse::new(
                200,
                "text/html; charset=utf-8",
                status::page(shared),
            )),
            "/metrics" => Some(HttpResponse::new(
                200,
                "text/plain; version=0.0.4",
                metrics::metrics(shared),
            )),
            p if p == "/echo" || p.starts_with("/pubsub/") => {
                Some(HttpResponse::error(HandshakeError::UpgradeRequired))
            }
            _ => None,
        }
    }

    fn on_subscribed(&mut self, conn: &mut Conn<'_, Route>, topic: &str, resumed: &Resumed) {
        let mut out = String::with_capacity(128 + topic.len());
        out.push_str(r#"{"type":"subscribed","topic":"#);
        out.push_str(&serde_json::Value::from(topic).to_string());
        out.push_str(&format!(
            r#","epoch":"{}","offset":{},"recovered":{},"replayed":{}}}"#,
            resumed.position.epoch, resumed.position.offset, resumed.recovered, resumed.replayed
        ));
        conn.send_text(&out);
    }

    fn on_message(&mut self, conn: &mut Conn<'_, Route>, message: Message) {
        match conn.data() {
            Some(Route::Echo) => {
                // By value: a large payload goes out from where it was received.
                conn.send_bytes(message.opcode, message.payload);
            }
            Some(Route::PubSub) => {
                conn.publish_to_joined(message.opcode, &message.payload);
            }
            None => {}
        }
    }
}

/// The query of `/pubsub/<topic>`: `None` for a plain subscription, `Some(since)` for
/// `recover=1` (`since` set when both `since` and `epoch` are given).
///
/// # Errors
/// A line for the 400 answer: a value that does not parse, or `since` without `epoch`
/// (or the other way round).
pub fn parse_resume(query: Option<&str>) -> Result<Option<Option<Position>>, String> {
    let (mut recover, mut since, mut epoch) = (false, None, None);
    for pair in query.unwrap_or("").split('&').filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').unwrap_or((pair, ""));
        match key {
            "recover" => match value {
                "1" | "true" => recover = true,
                "0" | "false" => recover = false,
                _ => return Err(format!("recover must be 1 or 0, not {value:?}")),
            },
            "since" => {
                since =
                    Some(value.parse::<u64>().map_err(|_| {
                        format!("since must be an offset (a number), not {value:?}")
                    })?)
            }
            "epoch" => {
                epoch = Some(Epoch::parse(value).ok_or_else(|| {
                    format!("epoch must be the 16 hex digits the server sent, not {value:?}")
                })?)
            }
            _ => {} // other parameters are the application's
        }
    }
    if !recover {
        return Ok(None);
    }
    match (since, epoch) {
        (Some(offset), Some(epoch)) => Ok(Some(Some(Position { offset, epoch }))),
        (None, None) => Ok(Some(None)),
        _ => Err("since and epoch go together (both from the last subscribed/pub messages)".into()),
    }
}

/// `wsring serve`'s envelope for subscribers that asked for offsets: one text frame
/// `{"type":"pub","offset":N,"data":"<text>"}`, or `"data_b64":"<base64>"` for a binary
/// payload. Called once per publication, not per subscriber.
pub fn envelope(
    _topic: &str,
    offset: u64,
    opcode: OpCode,
    payload: &[u8],
    out: &mut Vec<u8>,
) -> OpCode {
    use base64::Engine as _;
    use std::io::Write as _;
    let _ = write!(out, r#"{{"type":"pub","offset":{offset},"#);
    if opcode == OpCode::Binary {
        out.extend_from_slice(br#""data_b64":""#);
        let mut b64 = String::new();
        base64::engine::general_purpose::STANDARD.encode_string(payload, &mut b64);
        out.extend_from_slice(b64.as_bytes());
        out.push(b'"');
    } else {
        out.extend_from_slice(br#""data":"#);
        // Text payloads were checked on the way in; from a `Handle` they may not be.
        let text = String::from_utf8_lossy(payload);
        let _ = serde_json::to_writer(&mut *out, &*text);
    }
    out.push(b'}');
    OpCode::Text
}

#[cfg(test)]
mod tests {
    use std::time::Instant;

    use super::*;
    use crate::engine::internals::Core;
    use crate::engine::{ConnId, EngineConfig, Shared};

    fn connect(core: &mut Core<BenchProtocol>, fd: u32, path: &str, now: Instant) -> ConnId {
        let id = core.on_accept(fd, now);
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").into_bytes();
        core.on_data(id, &mut req, now);
        id
    }

    #[test]
    fn a_pubsub_connection_publishes_to_the_topic_of_its_path() {
        // The route holds no topic name: the engine's is used.
        const { assert!(std::mem::size_of::<Option<Route>>() == 1) };
        let now = Instant::now();
        let shared = Shared::detached(EngineConfig::default()).expect("shared state");
        let mut core = Core::new(
            0,
            shared.clone(),
            BenchProtocol::new(Handle::from_shared(shared)),
            now,
        );
        let mut driver = Wire::default();
        let a = connect(&mut core, 1, "/pubsub/t", now);
        let b = connect(&mut core, 2, "/pubsub/t", now);
        let other = connect(&mut core, 3, "/pubsub/u", now);
        let echo = connect(&mut core, 4, "/echo", now);
        core.flush(&mut driver);
        driver.0.clear();
        // A masked text frame "hi" (mask 1 2 3 4) from `a`.
        let mut frame = vec![0x81, 0x82, 1, 2, 3, 4, b'h' ^ 1, b'i' ^ 2];
        core.on_data(a, &mut frame, now);
        core.flush(&mut driver);
        let hi = [0x81, 0x02, b'h', b'i'];
        assert_eq!(driver.0.get(&a).map(Vec::as_slice), Some(&hi[..]));
        assert_eq!(driver.0.get(&b).map(Vec::as_slice), Some(&hi[..]));
        assert_eq!(driver.0.get(&other), None, "another topic");
        assert_eq!(driver.0.get(&echo), None);
    }

    /// Keeps what each connection was sent.
    #[derive(Default)]
    struct Wire(std::collections::HashMap<ConnId, Vec<u8>>);

    impl crate::engine::internals::Driver for Wire {
        fn send(
            &mut self,
            id: ConnId,
            _fd: u32,
            bufs: &mut dyn Iterator<Item = &[u8]>,
            _last: bool,
        ) -> crate::engine::internals::SendOutcome {
            let out = self.0.entry(id).or_default();
            let mut n = 0;
            for b in bufs {
                out.extend_from_slice(b);
                n += b.len();
            }
            crate::engine::internals::SendOutcome::Wrote { n, all: true }
        }
        fn close(&mut self, _id: ConnId, _fd: u32) -> bool {
            true
        }
        fn shutdown_write(&mut self, _id: ConnId, _fd: u32) {}
        fn set_reading(&mut self, _id: ConnId, _fd: u32, _on: bool) {}
    }

    /// The text frames (payloads under 126 bytes) after the 101 in what `id` was sent.
    fn texts(wire: &Wire, id: ConnId) -> Vec<String> {
        let bytes = &wire.0[&id];
        let start = bytes
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("101")
            + 4;
        let mut rest = &bytes[start..];
        let mut out = Vec::new();
        while rest.len() >= 2 {
            let len = usize::from(rest[1]);
            assert!(len < 126, "short frames only in this test");
            out.push(String::from_utf8(rest[2..2 + len].to_vec()).expect("text"));
            rest = &rest[2 + len..];
        }
        out
    }

    fn upgrade(core: &mut Core<BenchProtocol>, fd: u32, path: &str, now: Instant) -> ConnId {
        let id = core.on_accept(fd, now);
        let mut req = format!("GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").into_bytes();
        core.on_data(id, &mut req, now);
        id
    }

    /// A subscriber that resumes while publications before its position are still in the
    /// worker's inbox (published in the same turn) gets each of them once: from the
    /// replay, not again from the inbox.
    #[test]
    fn a_resume_racing_publications_in_flight_gets_each_once() {
        let now = Instant::now();
        let history = crate::pubsub::history::HistoryConfig {
            envelope: Some(Arc::new(envelope)),
            ..Default::default()
        };
        let shared =
            Shared::detached_with_history(EngineConfig::default(), history).expect("shared state");
        let handle = Handle::from_shared(shared.clone());
        let mut core = Core::new(0, shared, BenchProtocol::new(handle.clone()), now);
        let mut wire = Wire::default();
        let publisher = upgrade(&mut core, 1, "/pubsub/t", now);
        let live = upgrade(&mut core, 2, "/pubsub/t?recover=1", now);
        core.flush(&mut wire);
        let epoch = handle.position("t").expect("a stream").epoch;
        // Three publications: numbered now, still in the inbox.
        let mut data: Vec<u8> = ["a", "b", "c"]
            .iter()
            .flat_map(|p| {
                crate::proto::frame::encode_client_frame(OpCode::Text, p.as_bytes(), [1, 2, 3, 4])
            })
            .collect();
        core.on_data(publisher, &mut data, now);
        assert_eq!(handle.position("t").map(|p| p.offset), Some(3));
        let resumed = upgrade(
            &mut core,
            3,
            &format!("/pubsub/t?recover=1&since=1&epoch={epoch}"),
            now,
        );
        core.on_commands(now);
        core.on_data(
            publisher,
            &mut crate::proto::frame::encode_client_frame(OpCode::Text, b"d", [1, 2, 3, 4]),
            now,
        );
        core.on_commands(now);
        core.flush(&mut wire);
        let pubs = |id| -> Vec<String> { texts(&wire, id).into_iter().skip(1).collect() };
        let subscribed = texts(&wire, resumed)[0].clone();
        assert!(
            subscribed.contains(r#""offset":3,"recovered":true,"replayed":2"#),
            "{subscribed}"
        );
        let want = |from: u64| -> Vec<String> {
            (from..=4)
                .map(|o| {
                    format!(
                        r#"{{"type":"pub","offset":{o},"data":"{}"}}"#,
                        ["a", "b", "c", "d"][o as usize - 1]
                    )
                })
                .collect()
        };
        assert_eq!(
            pubs(resumed),
            want(2),
            "the resumed one: 2, 3 replayed, 4 live"
        );
        assert_eq!(pubs(live), want(1), "the one that was there");
        assert_eq!(
            texts(&wire, publisher),
            vec!["a", "b", "c", "d"],
            "the plain subscriber gets plain frames"
        );
    }

    /// A publication a worker never got in its inbox (it was full) is taken from the ring
    /// before the next one goes out; one no longer kept is counted as lost.
    #[test]
    fn a_gap_in_the_inbox_is_repaired_from_the_ring() {
        let now = Instant::now();
        let history = crate::pubsub::history::HistoryConfig {
            envelope: Some(Arc::new(envelope)),
            limits: crate::pubsub::history::Limits {
                count: 3,
                ..Default::default()
            },
            ..Default::default()
        };
        let shared =
            Shared::detached_with_history(EngineConfig::default(), history).expect("shared state");
        let handle = Handle::from_shared(shared.clone());
        let mut core = Core::new(0, shared.clone(), BenchProtocol::new(handle.clone()), now);
        let mut wire = Wire::default();
        let sub = upgrade(&mut core, 1, "/pubsub/t?recover=1", now);
        handle.publish("t", OpCode::Text, b"1");
        // Numbered and kept, but never handed to the worker (as when its inbox is full).
        let skip = |text: &[u8]| {
            let history = shared.history.as_ref().expect("history");
            history
                .lock("t")
                .append("t", OpCode::Text, text, Instant::now());
        };
        skip(b"2");
        handle.publish("t", OpCode::Text, b"3");
        core.on_commands(now);
        // Then four missed: only the last two of them are still kept (count 3 with 9).
        for text in [b"4", b"5", b"6", b"7"] {
            skip(text);
        }
        handle.publish("t", OpCode::Text, b"8");
        core.on_commands(now);
        core.flush(&mut wire);
        let offsets: Vec<String> = texts(&wire, sub)
            .into_iter()
            .skip(1)
            .map(|t| t[..t.find(r#","data""#).expect("data")].to_string())
            .collect();
        let want: Vec<String> = [1, 2, 3, 6, 7, 8]
            .iter()
            .map(|o| format!(r#"{{"type":"pub","offset":{o}"#))
            .collect();
        assert_eq!(offsets, want);
        assert_eq!(shared.total(|s| &s.history_repaired), 3);
        assert_eq!(shared.total(|s| &s.history_lost), 2);
    }
}
