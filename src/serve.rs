//! The handler behind `wsring serve`: ../shared/BENCH_PROTOCOL.md plus a status page.
//!
//! - `/echo` sends every message back with the same opcode;
//! - `/pubsub/<topic>` subscribes the connection to `<topic>` and publishes every message
//!   it sends to all subscribers of `<topic>` (the sender included);
//! - `GET /` is a status page with a browser demo on `/pubsub/demo`, `GET /metrics` the
//!   counters in Prometheus text format; any other path is 404, and a plain GET to an
//!   upgrade-only path is 426.

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

/// The bench-protocol handler (one per worker).
pub struct BenchProtocol {
    handle: Handle,
}

impl BenchProtocol {
    /// A handler for one worker.
    pub fn new(handle: Handle) -> BenchProtocol {
        BenchProtocol { handle }
    }
}

impl Handler for BenchProtocol {
    type Data = Route;

    fn on_upgrade(&mut self, request: &Request, _upgrade: &Upgrade) -> Decision<Route> {
        if request.path == "/echo" {
            return Decision::Accept(Accept::new(Route::Echo));
        }
        match request.path.strip_prefix("/pubsub/") {
            Some(topic) if !topic.is_empty() => {
                Decision::Accept(Accept::new(Route::PubSub(Arc::from(topic))).subscribe(topic))
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
