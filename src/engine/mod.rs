//! The engine: thread per core, one `SO_REUSEPORT` listener and one reactor per worker.
//!
//! [`Server::start`] binds a listener per worker (the first resolves port 0, the others
//! join its port), decides the backend once (io_uring if the probe says it has every
//! operation we use, else epoll, with the reason logged), and starts the workers. Each
//! worker is pinned to a CPU and owns its connections, its timer wheel and its topic
//! registry; nothing on the data path is shared or locked. Workers reach each other only
//! through a per-worker inbox (a mutex-guarded batch plus one coalesced eventfd wake-up):
//! a pub/sub frame published on one worker is handed once to every other worker, which
//! fans it out to its own subscribers. The same inbox carries what a [`Handle`] asks of
//! one connection (send, (un)subscribe, close, the decision on a deferred upgrade); an
//! async caller awaits room in it through a runtime-agnostic future.
//!
//! Backends: `uring` (multishot accept into the direct-descriptor table, multishot recv on
//! a provided-buffer ring, one send in flight per connection, a repeating kernel timeout)
//! and `epoll` (edge-triggered, one shared read buffer per worker). Both drive the same
//! [`core::Core`], which holds every protocol and application rule.
//!
//! Files: `config.rs` ([`EngineConfig`], [`ServerBuilder`], [`ConfigError`]), `server.rs`
//! ([`Server`], [`Handle`], descriptor limits, binding), `shared.rs` ([`Shared`]: the
//! inboxes, the shutdown state, the topic directory), `stats.rs` ([`WorkerStats`]),
//! `accept.rs` (the accept backoff), `handler.rs` (the [`handler::Handler`] contract),
//! `metrics.rs` (the counters as Prometheus text),
//! `wheel.rs` (the timer wheel), `core/` (the worker), `uring.rs` and `epoll.rs`.

mod accept;
mod config;
pub(crate) mod core;
pub(crate) mod epoll;
pub mod handler;
pub(crate) mod history;
pub mod metrics;
mod server;
mod shared;
mod stats;
mod testing;
pub(crate) mod uring;
pub(crate) mod wheel;

/// The engine's internals that code outside the library drives directly: the `broadcast`
/// bench and the `worker` fuzz target run a [`Core`](internals::Core) through their own
/// [`Driver`](internals::Driver), with [`EchoPubSub`](internals::EchoPubSub) as the
/// application. Not a stable API.
#[doc(hidden)]
pub mod internals {
    pub use super::core::fuzzing;
    pub use super::core::{Core, Driver, SendOutcome};
    pub use super::testing::{EchoPubSub, NullDriver};
}

pub(crate) use accept::AcceptBackoff;
pub use config::{
    ConfigError, DEFAULT_WRITE_BATCH, DeflateConfig, EngineConfig, MAX_WORKERS, ServerBuilder,
};
pub use server::{
    GlobalConnId, Handle, RESERVED_FDS, Server, StartError, TryError, raise_nofile, socket_limit,
};
pub use shared::{Command, HANDLE_QUEUE_LIMIT, Shared, ShutdownState};
pub(crate) use stats::Bump;
pub use stats::WorkerStats;

use std::net::SocketAddr;
use std::os::fd::{AsRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, AtomicU8, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;
use socket2::{Domain, Protocol, Socket, Type};

use crate::proto::{self, CloseCode, OpCode};
use crate::pubsub::Policy;
pub use core::ConnId;
use handler::Handler;

/// Which I/O backend to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BackendChoice {
    /// io_uring when the kernel has every operation wsring uses, else epoll.
    Auto,
    /// io_uring, or fail to start.
    IoUring,
    /// epoll.
    Epoll,
}

/// The backend actually running.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Backend {
    /// io_uring.
    IoUring,
    /// epoll.
    Epoll,
}

impl std::fmt::Display for Backend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Backend::IoUring => "io-uring",
            Backend::Epoll => "epoll",
        })
    }
}

#[cfg(test)]
mod tests;
