//! The RFC 6455 protocol core, sans-IO: handshake, frames, masking, UTF-8, close codes and
//! the per-connection state machine.
//!
//! Nothing here performs a system call, reads a clock (time is an argument) or owns a
//! socket: the io_uring engine, the epoll engine, the tests, the benches and the fuzz
//! targets all drive the same code, so every bug reproduces from bytes. Peer input never
//! panics: indexing is checked (`clippy::indexing_slicing` is denied), lengths are
//! converted with `try_from`. `unsafe` lives only in [`mask`] (SIMD).

#![deny(unsafe_code)]
#![deny(
    clippy::unwrap_used,
    clippy::expect_used,
    clippy::indexing_slicing,
    clippy::panic
)]
#![cfg_attr(
    test,
    allow(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::indexing_slicing,
        clippy::panic
    )
)]

pub mod arena;
pub mod close;
pub mod connection;
pub mod deflate;
pub mod error;
pub mod frame;
#[doc(hidden)]
pub mod fuzzing;
pub mod handshake;
#[allow(unsafe_code)]
pub mod mask;
pub mod utf8;

pub use close::{CloseCode, CloseFrame};
pub use connection::{BareConnection, Config, Connection, Event, SendError, State};
pub use error::{HandshakeError, ProtocolError};
pub use frame::{FrameHeader, OpCode, encode_frame};
