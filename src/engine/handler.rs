//! The contract between the engine and the application it runs: the [`Handler`] callbacks
//! and the values they take and return ([`Message`], [`Decision`], [`Accept`], [`Reject`],
//! [`HttpResponse`]). The engine owns them because it calls them; `wsring::api` is where
//! an embedder finds them, beside [`Conn`](super::core::Conn) and the pub/sub result types.
//!
//! One handler instance runs per worker, on that worker's thread, so a handler needs no
//! locks: the engine calls it with the connection it concerns.

use bytes::Bytes;

use crate::proto::handshake::{Request, Upgrade};
use crate::proto::{CloseCode, OpCode};

use super::core::Conn;

/// A complete message received from a peer.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Message {
    /// [`OpCode::Text`] or [`OpCode::Binary`].
    pub opcode: OpCode,
    /// The payload (for text: UTF-8, already validated). Payloads up to 1 KiB share a
    /// per-thread 32 KiB block with other small pieces instead of an allocation each; copy
    /// one (`Bytes::copy_from_slice`) before storing it for a long time. To echo or
    /// forward it, hand it over by value (`Conn::send_bytes`): a large one is then written
    /// from where it is, with no copy.
    pub payload: Bytes,
}

impl Message {
    /// Whether it is a text message.
    pub fn is_text(&self) -> bool {
        self.opcode == OpCode::Text
    }

    /// The text of a text message (`None` for binary).
    pub fn text(&self) -> Option<&str> {
        if self.is_text() {
            simdutf8::basic::from_utf8(&self.payload).ok()
        } else {
            None
        }
    }
}

/// What `on_upgrade` decides: accept (with a subprotocol, topics and user data) or
/// reject with an HTTP status.
#[derive(Debug)]
pub enum Decision<D> {
    /// Upgrade the connection.
    Accept(Accept<D>),
    /// Answer with this status and close.
    Reject(Reject),
}

/// Accepting an upgrade.
#[derive(Debug)]
pub struct Accept<D> {
    /// The subprotocol to answer with; it must be one the client offered (else 500).
    pub protocol: Option<String>,
    /// Topics to subscribe the connection to right away.
    pub topics: Vec<String>,
    /// Per-connection data, handed back in every callback.
    pub data: D,
    /// Extra response headers.
    pub headers: Vec<(String, String)>,
}

impl<D> Accept<D> {
    /// Accept with `data`, no subprotocol, no topics.
    pub fn new(data: D) -> Accept<D> {
        Accept {
            protocol: None,
            topics: Vec::new(),
            data,
            headers: Vec::new(),
        }
    }

    /// Also subscribe to `topic`.
    pub fn subscribe(mut self, topic: impl Into<String>) -> Self {
        self.topics.push(topic.into());
        self
    }

    /// Answer with subprotocol `p` (must be one the client offered).
    pub fn protocol(mut self, p: impl Into<String>) -> Self {
        self.protocol = Some(p.into());
        self
    }
}

/// Rejecting an upgrade (or answering a plain HTTP request).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Reject {
    /// HTTP status, e.g. 401 or 403.
    pub status: u16,
    /// Extra response headers.
    pub headers: Vec<(String, String)>,
    /// Response body.
    pub body: String,
}

impl Reject {
    /// A rejection with `status` and a one-line body.
    pub fn status(status: u16) -> Reject {
        Reject {
            status,
            headers: Vec::new(),
            body: format!("{}\n", crate::proto::handshake::reason_phrase(status)),
        }
    }
}

/// An HTTP response to a plain (non-upgrade) request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct HttpResponse {
    /// Status.
    pub status: u16,
    /// Content type.
    pub content_type: String,
    /// Body.
    pub body: Bytes,
    /// Extra headers.
    pub headers: Vec<(String, String)>,
}

impl HttpResponse {
    /// The answer to a refused request: the status, one-line body and headers that
    /// [`HandshakeError`](crate::proto::HandshakeError) maps to (426 names
    /// `Sec-WebSocket-Version: 13` and `Upgrade`, 405 names `Allow`), the same as the
    /// engine's own refusals.
    pub fn error(e: crate::proto::HandshakeError) -> HttpResponse {
        let (status, body, headers) = crate::proto::handshake::error_parts(e);
        HttpResponse {
            status,
            content_type: "text/plain".to_string(),
            body: Bytes::from(body),
            headers: headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.to_string()))
                .collect(),
        }
    }

    /// A response with `status`, `content_type` and `body`, no extra header.
    pub fn new(status: u16, content_type: &str, body: impl Into<Bytes>) -> HttpResponse {
        HttpResponse {
            status,
            content_type: content_type.to_string(),
            body: body.into(),
            headers: Vec::new(),
        }
    }
}

/// The application: one instance per worker, called on that worker's thread.
///
/// Every method has a default, so a handler implements only what it needs. The default
/// `on_upgrade` accepts every request with `Default` user data.
pub trait Handler: Send + 'static {
    /// Per-connection user data.
    type Data: Send + 'static;

    /// A valid WebSocket upgrade request arrived (the RFC's rules and the Origin
    /// allow-list are already checked). Decide: accept or reject.
    fn on_upgrade(&mut self, request: &Request, upgrade: &Upgrade) -> Decision<Self::Data>;

    /// A plain HTTP request (no `Upgrade` header). `None` answers 404.
    fn on_http(&mut self, request: &Request) -> Option<HttpResponse> {
        let _ = request;
        None
    }

    /// The connection is open (the 101 is queued).
    fn on_open(&mut self, conn: &mut Conn<'_, Self::Data>) {
        let _ = conn;
    }

    /// A complete message arrived.
    fn on_message(&mut self, conn: &mut Conn<'_, Self::Data>, message: Message) {
        let _ = (conn, message);
    }

    /// The connection is closed: `code` is the peer's close code, ours when we failed it,
    /// 1005 when its close carried none, 1006 when it vanished or timed out.
    fn on_close(&mut self, conn: &mut Conn<'_, Self::Data>, code: CloseCode, reason: &str) {
        let _ = (conn, code, reason);
    }
}
