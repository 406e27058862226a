//! Graceful exit on SIGINT/SIGTERM for a program that embeds the engine: the first signal
//! drains (every connection is closed with the drain code, 1001 by default, and the
//! server waits up to `drain_timeout` for the close handshakes), a second one exits at once.
//!
//! ```no_run
//! use wsring::engine::Server;
//! use wsring::cli::serve::BenchProtocol;
//!
//! // Before the server starts: its worker threads inherit the blocked signals.
//! let signals = wsring::signals::ShutdownSignals::block();
//! let server = Server::start(Default::default(), BenchProtocol::new)?;
//! let signal = signals.drain_on_signal(server); // returns once the server has stopped
//! eprintln!("stopped by signal {signal}");
//! # Ok::<(), std::io::Error>(())
//! ```
//!
//! The signals are taken synchronously (`sigwait`) on the thread that waits, so no handler
//! runs on a worker and nothing async-signal-unsafe happens; `SIGPIPE` is ignored (a write
//! to a peer that went away is an error, not a signal).

use crate::engine::{Handle, Server};

/// SIGINT and SIGTERM, blocked in the calling thread (and in every thread it starts
/// afterwards) so that they wait for [`ShutdownSignals::wait`] instead of killing the
/// process.
#[derive(Clone, Copy)]
pub struct ShutdownSignals {
    set: libc::sigset_t,
}

impl std::fmt::Debug for ShutdownSignals {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("ShutdownSignals(SIGINT, SIGTERM)")
    }
}

impl ShutdownSignals {
    /// Blocks SIGINT and SIGTERM in this thread and ignores SIGPIPE. Call it before
    /// starting the server or any other thread: threads inherit the mask, and a signal
    /// delivered to a thread that does not block it would still kill the process.
    pub fn block() -> ShutdownSignals {
        // SAFETY: sigset operations on a local set; pthread_sigmask and signal with valid
        // arguments.
        unsafe {
            let mut set: libc::sigset_t = std::mem::zeroed();
            libc::sigemptyset(&mut set);
            libc::sigaddset(&mut set, libc::SIGINT);
            libc::sigaddset(&mut set, libc::SIGTERM);
            libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
            libc::signal(libc::SIGPIPE, libc::SIG_IGN);
            ShutdownSignals { set }
        }
    }

    /// Waits for SIGINT or SIGTERM; returns its number.
    pub fn wait(&self) -> i32 {
        let mut sig = 0;
        // SAFETY: `set` is an initialised sigset; `sig` is a valid out pointer.
        unsafe { libc::sigwait(&self.set, &mut sig) };
        sig
    }

    /// Waits for the first signal, then drains `handle`'s server (close with the drain
    /// code, wait for the close handshakes up to the drain timeout); a second signal ends
    /// the process at once (exit status 130 after SIGINT, 143 after SIGTERM, as a shell
    /// reports a process killed by it). Returns the first signal's number without waiting
    /// for the drain to finish: join the server for that, or use
    /// [`ShutdownSignals::drain_on_signal`].
    pub fn shutdown_on_signal(self, handle: &Handle) -> i32 {
        let sig = self.wait();
        tracing::info!(signal = sig, "shutting down: closing connections");
        handle.shutdown();
        std::thread::spawn(move || {
            let second = self.wait();
            eprintln!("second signal ({second}): exiting now");
            std::process::exit(128 + second);
        });
        sig
    }

    /// [`ShutdownSignals::shutdown_on_signal`], then waits for the server to stop.
    pub fn drain_on_signal(self, server: Server) -> i32 {
        let sig = self.shutdown_on_signal(&server.handle());
        server.join();
        sig
    }
}
