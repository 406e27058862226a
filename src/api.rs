//! The embedding API: what a Rust service implements ([`Handler`]) and what it is handed
//! ([`Conn`] inside callbacks, [`crate::engine::Handle`] from any thread).
//!
//! One handler instance runs per worker, on that worker's thread, so a handler needs no
//! locks: the engine calls it with the connection it concerns. Everything here is defined
//! by the layer that owns it (the callbacks and `Conn` by the engine, the send and publish
//! results by pub/sub) and gathered here, so that an embedder needs one `use`; no io_uring
//! or epoll type appears in it.
//!
//! From an async service (tokio, axum): [`Decision::defer`] and [`Deferred`] for a
//! decision taken after the handshake request arrived, [`Conn::global_id`] and
//! [`GlobalConnId`] to reach one connection through the `Handle` (`try_send`,
//! `send_async`, `subscribe`, ...; [`TryError`]), `Handle::try_publish` /
//! `publish_async`, and [`Conn::set_timer`] with [`Handler::on_timer`]. `docs/embedding.md`
//! walks through them.

pub use crate::engine::core::{Conn, ConnId};
pub use crate::engine::handler::{
    Accept, Decision, Deferred, Gone, Handler, HttpResponse, Message, Reject,
};
pub use crate::engine::{GlobalConnId, TryError};
pub use crate::pubsub::history::{
    Epoch, HistoryConfig, Limits as HistoryLimits, Position, Resumed, Subscription,
};
pub use crate::pubsub::{Policy, PublishReport, SendStatus};
