//! The contract between the engine and the application it runs: the [`Handler`] callbacks
//! and the values they take and return ([`Message`], [`Decision`], [`Accept`], [`Reject`],
//! [`HttpResponse`], and the [`Deferred`] token of an upgrade decided later). The engine
//! owns them because it calls them; `wsring::api` is where an embedder finds them, beside
//! [`Conn`] and the pub/sub result types.
//!
//! One handler instance runs per worker, on that worker's thread, so a handler needs no
//! locks: the engine calls it with the connection it concerns.

use std::marker::PhantomData;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};

use bytes::Bytes;

use super::{Command, GlobalConnId, Shared, ShutdownState};
use crate::engine::core::ConnId;
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

/// What `on_upgrade` decides: accept (with a subprotocol, topics and user data), reject
/// with an HTTP status, or decide later ([`Decision::Defer`]).
pub enum Decision<D> {
    /// Upgrade the connection.
    Accept(Accept<D>),
    /// Answer with this status and close.
    Reject(Reject),
    /// Decide later, from any thread: the function is called at once (on the worker's
    /// thread, before `on_upgrade`'s caller goes on) with the [`Deferred`] token that
    /// carries the decision; hand it to a task that checks the request (a token against a
    /// database...). Build it with [`Decision::defer`].
    Defer(Box<dyn FnOnce(Deferred<D>)>),
}

impl<D> Decision<D> {
    /// [`Decision::Defer`] with `f` as the function that receives the token.
    ///
    /// ```no_run
    /// use wsring::api::{Accept, Decision, Handler, Reject};
    /// use wsring::proto::handshake::{Request, Upgrade};
    ///
    /// struct App;
    ///
    /// impl Handler for App {
    ///     type Data = String; // the user
    ///
    ///     fn on_upgrade(&mut self, req: &Request, _up: &Upgrade) -> Decision<String> {
    ///         let token = req.query_param("token").unwrap_or_default().to_string();
    ///         Decision::defer(move |deferred| {
    ///             // Any thread or async task (a tokio `spawn` in a service).
    ///             std::thread::spawn(move || {
    ///                 let _ = match token.strip_suffix("-secret") {
    ///                     Some(user) => deferred.accept(Accept::new(user.to_string())),
    ///                     None => deferred.reject(Reject::status(401)),
    ///                 };
    ///             });
    ///         })
    ///     }
    /// }
    /// ```
    pub fn defer(f: impl FnOnce(Deferred<D>) + 'static) -> Decision<D> {
        Decision::Defer(Box::new(f))
    }
}

impl<D: std::fmt::Debug> std::fmt::Debug for Decision<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Decision::Accept(a) => f.debug_tuple("Accept").field(a).finish(),
            Decision::Reject(r) => f.debug_tuple("Reject").field(r).finish(),
            Decision::Defer(_) => f.write_str("Defer"),
        }
    }
}

/// The client of a deferred upgrade went away (closed, reset, or timed out at the
/// handshake deadline), or the server is shutting down: the decision was not applied
/// (an accept's data is dropped).
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[error("the client of the deferred upgrade is gone")]
pub struct Gone;

/// An upgrade waiting for its decision ([`Decision::Defer`]): `Send`, so the decision can
/// come from any thread or async task, and typed with the handler's data, so an accept
/// carries the right `D`. [`Deferred::accept`] and [`Deferred::reject`] take it by value:
/// one decision per upgrade. Dropped undecided, it rejects with 503.
///
/// While it waits, the connection stays in its handshake: the handshake deadline
/// (`handshake_timeout`, 10 s by default) still applies, bytes the client sends are held
/// (up to the header limit, beyond which the connection is dropped) and handed to the
/// connection once accepted.
pub struct Deferred<D> {
    shared: Arc<Shared>,
    worker: usize,
    id: ConnId,
    gone: Arc<AtomicBool>,
    decided: bool,
    _data: PhantomData<fn(D)>,
}

impl<D: Send + 'static> Deferred<D> {
    pub(super) fn new(
        shared: Arc<Shared>,
        worker: usize,
        id: ConnId,
        gone: Arc<AtomicBool>,
    ) -> Deferred<D> {
        Deferred {
            shared,
            worker,
            id,
            gone,
            decided: false,
            _data: PhantomData,
        }
    }

    /// The connection's id (the one `on_open` will see if it is accepted).
    pub fn conn(&self) -> GlobalConnId {
        GlobalConnId {
            worker: self.worker,
            id: self.id,
        }
    }

    /// Whether the client is already known to be gone (then a decision returns [`Gone`]).
    pub fn is_gone(&self) -> bool {
        self.gone.load(Ordering::Acquire) || self.shared.shutdown_state() != ShutdownState::Running
    }

    /// Upgrades the connection (101, then `on_open`), as `Decision::Accept` would have.
    ///
    /// # Errors
    /// [`Gone`] if the client left (or the server is shutting down) before the decision;
    /// `accept` is dropped. A client that leaves after this returns is closed as usual
    /// (`on_close` if it was opened).
    pub fn accept(mut self, accept: Accept<D>) -> Result<(), Gone> {
        self.resolve(Ok(accept))
    }

    /// Answers with `reject`'s status and closes, as `Decision::Reject` would have.
    ///
    /// # Errors
    /// [`Gone`] if the client left (or the server is shutting down) before the decision.
    pub fn reject(mut self, reject: Reject) -> Result<(), Gone> {
        self.resolve(Err(reject))
    }

    fn resolve(&mut self, decision: Result<Accept<D>, Reject>) -> Result<(), Gone> {
        self.decided = true;
        if self.is_gone() {
            return Err(Gone);
        }
        let inbox = &self.shared.inboxes[self.worker];
        self.shared
            .send_command(inbox, Command::Resolve(self.id, Box::new(decision)));
        Ok(())
    }
}

impl<D> std::fmt::Debug for Deferred<D> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Deferred")
            .field("worker", &self.worker)
            .field("id", &self.id)
            .finish_non_exhaustive()
    }
}

impl<D> Drop for Deferred<D> {
    /// Undecided: the application lost the token (a task that panicked or was cancelled),
    /// so the client is answered 503 instead of waiting for the handshake deadline.
    fn drop(&mut self) {
        if !self.decided
            && !self.gone.load(Ordering::Acquire)
            && self.shared.shutdown_state() == ShutdownState::Running
        {
            let inbox = &self.shared.inboxes[self.worker];
            let decision: Result<Accept<()>, Reject> = Err(Reject::status(503));
            // A reject carries no `D`: the worker recognises it whatever its data type.
            self.shared
                .send_command(inbox, Command::Resolve(self.id, Box::new(decision)));
        }
    }
}

/// Accepting an upgrade.
#[derive(Debug)]
pub struct Accept<D> {
    /// The subprotocol to answer with; it must be one the client offered (else 500).
    pub protocol: Option<String>,
    /// Topics to subscribe the connection to right away.
    pub topics: Vec<String>,
    /// Topics with history to subscribe it to right away, each from a position (see
    /// [`Accept::subscribe_at`]).
    pub resume: Vec<(String, crate::pubsub::history::Subscription)>,
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
            resume: Vec::new(),
            data,
            headers: Vec::new(),
        }
    }

    /// Also subscribe to `topic`.
    pub fn subscribe(mut self, topic: impl Into<String>) -> Self {
        self.topics.push(topic.into());
        self
    }

    /// Also subscribe to `topic`, a topic with history, as `sub` says (resuming after a
    /// position, in the envelope or not): once open, the connection gets
    /// [`Handler::on_subscribed`], then the replay, then live publications, with no gap
    /// and no repeat between them. On a server without history for `topic` it is a plain
    /// subscription and `on_subscribed` is not called.
    pub fn subscribe_at(
        mut self,
        topic: impl Into<String>,
        sub: crate::pubsub::history::Subscription,
    ) -> Self {
        self.resume.push((topic.into(), sub));
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
    /// allow-list are already checked). Decide: accept or reject now, or
    /// [`Decision::defer`] to decide later from another thread or task.
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

    /// A subscription to a topic with history was made from [`Accept::subscribe_at`] or
    /// [`Handle::subscribe_at`](crate::engine::Handle::subscribe_at): `resumed` says
    /// where live delivery starts and whether every missed publication is replayed.
    /// Called before the replay is queued, so what the handler sends here goes first
    /// (`wsring serve` sends its `subscribed` message). [`Conn::subscribe_at`] returns the
    /// same instead.
    fn on_subscribed(
        &mut self,
        conn: &mut Conn<'_, Self::Data>,
        topic: &str,
        resumed: &crate::pubsub::history::Resumed,
    ) {
        let _ = (conn, topic, resumed);
    }

    /// A complete message arrived.
    fn on_message(&mut self, conn: &mut Conn<'_, Self::Data>, message: Message) {
        let _ = (conn, message);
    }

    /// The timer this connection set with [`Conn::set_timer`] is due (the connection is
    /// open: a closed or closing one gets no call). One-shot: set it again to repeat.
    fn on_timer(&mut self, conn: &mut Conn<'_, Self::Data>) {
        let _ = conn;
    }

    /// The connection is closed: `code` is the peer's close code, ours when we failed it,
    /// 1005 when its close carried none, 1006 when it vanished or timed out.
    fn on_close(&mut self, conn: &mut Conn<'_, Self::Data>, code: CloseCode, reason: &str) {
        let _ = (conn, code, reason);
    }
}
