//! The handler behind `wsring serve`: ../shared/BENCH_PROTOCOL.md plus a status page.
//!
//! - `/echo` sends every message back with the same opcode;
//! - `/pubsub/<topic>` subscribes the connection to `<topic>` and publishes every message
//!   it sends to all subscribers of `<topic>` (the sender included); a topic name longer
//!   than [`MAX_TOPIC_BYTES`] (256 bytes) is refused with HTTP 414, so a peer cannot make
//!   every worker's topic registry hold names as long as the request head allows;
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

use bytes::Bytes;

use crate::api::{Accept, Conn, Decision, Handler, HttpResponse, Message, Reject};
use crate::engine::{Handle, status};
use crate::proto::handshake::{Request, Upgrade};

/// What a connection of the bench protocol does with its messages.
#[derive(Debug)]
pub enum Route {
    /// Echo them.
    Echo,
    /// Publish them to this topic.
    PubSub(Arc<str>),
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
        let accept = |route| {
            let accept = Accept::new(route);
            match self.choose_protocol(upgrade) {
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
                Decision::Accept(accept(Route::PubSub(Arc::from(topic))).subscribe(topic))
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
                status::metrics(shared),
            )),
            p if p == "/echo" || p.starts_with("/pubsub/") => {
                let mut r = HttpResponse::new(
                    426,
                    "text/plain",
                    Bytes::from_static(b"this path only upgrades to WebSocket\n"),
                );
                r.headers = vec![
                    ("Upgrade".into(), "websocket".into()),
                    ("Sec-WebSocket-Version".into(), "13".into()),
                ];
                Some(r)
            }
            _ => None,
        }
    }

    fn on_message(&mut self, conn: &mut Conn<'_, Route>, message: Message) {
        match conn.data() {
            Some(Route::Echo) => {
                // By value: a large payload goes out from where it was received.
                conn.send_bytes(message.opcode, message.payload);
            }
            Some(Route::PubSub(topic)) => {
                let topic = topic.clone();
                conn.publish(&topic, message.opcode, &message.payload);
            }
            None => {}
        }
    }
}
