//! wsring: a WebSocket (RFC 6455) server engine for Linux, built on io_uring, thread per
//! core, to hold very many connections and broadcast to them cheaply.
//!
//! Layers (dependencies point down only; see `ARCHITECTURE.md`):
//! - [`proto`]: the sans-IO protocol core (handshake, frames, SIMD unmask, streaming UTF-8,
//!   close codes, the connection state machine).
//! - [`pubsub`]: the per-worker topic registry and its fan-out, reaching connections only
//!   through a trait; the cross-worker directory; the send and publish result types; the
//!   backplane that joins nodes through a broker ([`pubsub::broker`]: Redis and NATS
//!   clients behind the `redis` and `nats` features, an in-process bus).
//! - [`engine`]: thread per core, the io_uring and epoll backends, the connection slab,
//!   timers, the upgrade path, write scheduling; it drives [`proto`] and [`pubsub`].
//! - [`api`]: what a handler implements and sees ([`Handler`], [`Conn`], [`Accept`]).
//! - [`signals`]: graceful exit on SIGINT/SIGTERM for a program that embeds the engine.
//! - `cli` (the `cli` feature, on by default, which the programs need): the bench-protocol
//!   handler behind `wsring serve`, its status page, the host check behind
//!   `wsring check`, and the broker `--broker` names. Nothing below imports from it.
#![deny(unsafe_op_in_unsafe_fn, clippy::undocumented_unsafe_blocks)]
#![warn(missing_docs)]

pub mod api;
#[cfg(feature = "cli")]
pub mod cli;
pub mod engine;
pub mod proto;
pub mod pubsub;
pub mod signals;

pub use api::{
    Accept, Conn, Decision, Handler, Message, Policy, PublishReport, Reject, SendStatus,
};
pub use engine::{EngineConfig, Handle, Server, StartError};

/// README.md's Rust snippets, compiled as doc tests so that they stay true.
#[cfg(doctest)]
#[doc = include_str!("../README.md")]
pub struct ReadmeDoctests;
