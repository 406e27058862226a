//! A minimal application for driving the engine without the `wsring` programs: the engine's
//! own tests, the `worker` fuzz target and the `broadcast` bench run a core with it (the
//! engine must not depend on the bench-protocol handler, which lives with the programs).
//!
//! [`NullDriver`] is a backend whose sockets take every write.
//!
//! `/echo` sends every message back; `/pubsub/<topic>` subscribes to `<topic>` and
//! publishes every message to it; a plain GET of either is 426, anything else 404.

use std::sync::Arc;

use super::core::{Conn, ConnId, Driver, SendOutcome};
use super::handler::{Accept, Decision, Handler, HttpResponse, Message, Reject};
use crate::proto::HandshakeError;
use crate::proto::handshake::{Request, Upgrade};

/// Echo and pub/sub, nothing else (see the module docs).
#[derive(Debug, Default)]
pub struct EchoPubSub;

impl EchoPubSub {
    /// One per worker; the handle is not needed (the signature fits
    /// `Server::start`'s factory).
    pub fn new(_handle: super::Handle) -> EchoPubSub {
        EchoPubSub
    }
}

impl Handler for EchoPubSub {
    /// The topic of a `/pubsub/` connection; `None` for `/echo`.
    type Data = Option<Arc<str>>;

    fn on_upgrade(&mut self, request: &Request, _upgrade: &Upgrade) -> Decision<Self::Data> {
        if request.path == "/echo" {
            return Decision::Accept(Accept::new(None));
        }
        match request.path.strip_prefix("/pubsub/") {
            Some(topic) if !topic.is_empty() => {
                Decision::Accept(Accept::new(Some(Arc::from(topic))).subscribe(topic))
            }
            _ => Decision::Reject(Reject::status(404)),
        }
    }

    fn on_http(&mut self, request: &Request) -> Option<HttpResponse> {
        (request.path == "/echo" || request.path.starts_with("/pubsub/"))
            .then(|| HttpResponse::error(HandshakeError::UpgradeRequired))
    }

    fn on_message(&mut self, conn: &mut Conn<'_, Self::Data>, message: Message) {
        match conn.data() {
            Some(Some(topic)) => {
                let topic = topic.clone();
                conn.publish(&topic, message.opcode, &message.payload);
            }
            Some(None) => {
                conn.send_bytes(message.opcode, message.payload);
            }
            None => {}
        }
    }
}

/// A backend whose sockets take every write in full (a socket with room to spare); counts
/// the writes.
#[derive(Debug, Default)]
pub struct NullDriver {
    /// Writes made.
    pub writes: u64,
}

impl Driver for NullDriver {
    fn send(
        &mut self,
        _id: ConnId,
        _fd: u32,
        bufs: &mut dyn Iterator<Item = &[u8]>,
        _last: bool,
    ) -> SendOutcome {
        self.writes += 1;
        let n = bufs.map(<[u8]>::len).sum();
        SendOutcome::Wrote { n, all: true }
    }
    fn close(&mut self, _id: ConnId, _fd: u32) -> bool {
        true
    }
    fn shutdown_write(&mut self, _id: ConnId, _fd: u32) {}
    fn set_reading(&mut self, _id: ConnId, _fd: u32, _on: bool) {}
}
