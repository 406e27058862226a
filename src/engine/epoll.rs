//! The epoll backend: for hosts where io_uring is disabled or missing an operation.
//!
//! Edge-triggered readiness; every read goes into one receive buffer per worker, so an
//! idle connection holds no read buffer here either (the protocol core copies only an
//! incomplete trailing frame). Writes are vectored `sendmsg` calls made at the end of the
//! loop turn for every connection with bytes queued; a short write waits for `EPOLLOUT`.
//!
//! Fair reading: a connection is read at most [`READS_PER_TURN`] times per loop turn; one
//! that still has bytes waits in a list for the next turn (edge-triggered readiness is not
//! reported again), so a peer that sends as fast as loopback allows cannot keep the worker
//! in its read loop while other connections and the timers wait.
//!
//! Accept failures for lack of resources (EMFILE...) take the listener out of the epoll
//! set for a pause (`AcceptBackoff` in the engine module): level-triggered, it would wake
//! every turn.

use std::io;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};
use std::sync::Arc;
use std::sync::mpsc::Sender;
use std::time::Instant;

use socket2::Socket;

use super::core::{ConnId, Core, Driver, SendOutcome};
use super::handler::Handler;
use super::wheel::TICK;
use super::{AcceptBackoff, Shared, ShutdownState};

const LISTENER: u64 = u64::MAX;
const WAKE: u64 = u64::MAX - 1;
const READ_BUF: usize = 64 * 1024;
/// Reads of one connection per loop turn (at most 256 KiB).
pub const READS_PER_TURN: usize = 4;
const MAX_IOV: usize = 64;

fn token(id: ConnId) -> u64 {
    (u64::from(id.generation) << 32) | u64::from(id.slot)
}

fn id_of(token: u64) -> ConnId {
    ConnId {
        slot: token as u32,
        generation: (token >> 32) as u32,
    }
}

fn cvt(r: libc::c_int) -> io::Result<libc::c_int> {
    if r < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(r)
    }
}

struct EpollDriver {
    /// Connections whose reading was resumed: read them after the flush (edge-triggered
    /// readiness that arrived while paused is not reported again).
    resumed: Vec<(ConnId, u32)>,
}

impl Driver for EpollDriver {
    fn send(
        &mut self,
        _id: ConnId,
        fd: u32,
        bufs: &mut dyn Iterator<Item = &[u8]>,
        last: bool,
    ) -> SendOutcome {
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_IOV];
        let mut n = 0;
        let mut offered = 0;
        for (slot, b) in iov.iter_mut().zip(bufs) {
            slot.iov_base = b.as_ptr() as *mut libc::c_void;
            slot.iov_len = b.len();
            offered += b.len();
            n += 1;
        }
        // Final bytes: held back until the close right after, which sends them with the
        // FIN in one segment.
        let more = if last { libc::MSG_MORE } else { 0 };
        let flags = libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT | more;
        let r = if n == 1 {
            // One slice (an echo's replies, a turn's run of broadcasts): a plain send,
            // which skips sendmsg's header and iovec import.
            // SAFETY: fd is this connection's open socket; the slice is valid for the
            // duration of the call.
            unsafe { libc::send(fd as i32, iov[0].iov_base, iov[0].iov_len, flags) }
        } else {
            // SAFETY: a zeroed msghdr is valid; it points at `iov`, which outlives the call.
            let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
            msg.msg_iov = iov.as_mut_ptr();
            msg.msg_iovlen = n;
            // SAFETY: fd is this connection's open socket; msg and the buffers it points
            // to are valid for the duration of the call.
            unsafe { libc::sendmsg(fd as i32, &msg, flags) }
        };
        if r >= 0 {
            SendOutcome::Wrote {
                n: r as usize,
                all: r as usize == offered,
            }
        } else {
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EAGAIN) => SendOutcome::WouldBlock,
                Some(libc::EINTR) => SendOutcome::Wrote { n: 0, all: true },
                _ => SendOutcome::Failed,
            }
        }
    }

    fn set_reading(&mut self, id: ConnId, fd: u32, on: bool) {
        if on {
            self.resumed.push((id, fd));
        }
    }

    fn shutdown_write(&mut self, _id: ConnId, fd: u32) {
        // SAFETY: fd is this connection's open socket; shutdown takes no memory.
        unsafe {
            libc::shutdown(fd as i32, libc::SHUT_WR);
        }
    }

    fn close(&mut self, _id: ConnId, fd: u32) -> bool {
        // No EPOLL_CTL_DEL first (a system call per connection): closing the only
        // descriptor of the socket removes it from the epoll set. It is the only one: the
        // socket was accepted here and its descriptor is never duplicated.
        // SAFETY: fd is this connection's socket, owned by the slot and closed only here.
        unsafe {
            libc::close(fd as i32);
        }
        true
    }
}

fn add(epfd: i32, fd: i32, events: u32, token: u64) -> io::Result<()> {
    let mut ev = libc::epoll_event { events, u64: token };
    // SAFETY: epfd and fd are open descriptors; ev is a valid local.
    cvt(unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) })?;
    Ok(())
}

fn remove(epfd: i32, fd: i32) {
    let mut ev = libc::epoll_event { events: 0, u64: 0 };
    // SAFETY: epfd and fd are open descriptors; ev is a valid local (ignored by DEL).
    unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_DEL, fd, &mut ev) };
}

/// Runs worker `index` on epoll until shutdown.
///
/// # Errors
/// Set-up failures (epoll_create, registering the listener).
pub fn run<H: Handler>(
    index: usize,
    shared: Arc<Shared>,
    handler: H,
    listener: Socket,
    ready: &Sender<Result<(), String>>,
) -> io::Result<()> {
    // SAFETY: epoll_create1 has no memory preconditions; the result is checked.
    let epfd = cvt(unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) })?;
    // SAFETY: epfd is a fresh descriptor we own.
    let _ep_owner = unsafe { OwnedFd::from_raw_fd(epfd) };
    let mut listener = Some(listener);
    if let Some(l) = &listener {
        add(epfd, l.as_raw_fd(), libc::EPOLLIN as u32, LISTENER)?;
    }
    let wake_fd = shared.eventfd(index);
    add(epfd, wake_fd, libc::EPOLLIN as u32, WAKE)?;
    let _ = ready.send(Ok(()));

    let mut core = Core::new(index, shared.clone(), handler, Instant::now());
    let mut driver = EpollDriver {
        resumed: Vec::new(),
    };
    let mut buf = vec![0u8; READ_BUF];
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    let tick_ms = TICK.as_millis() as i32;
    // Connections with bytes left after their reads of a turn (see the module docs).
    let mut unread: Vec<(ConnId, u32)> = Vec::new();
    let mut still_unread: Vec<(ConnId, u32)> = Vec::new();
    let mut backoff = AcceptBackoff::new();
    loop {
        let timeout = if core.has_dirty() || !unread.is_empty() {
            0
        } else {
            tick_ms
        };
        // SAFETY: events is a valid buffer of events.len() entries.
        let n =
            unsafe { libc::epoll_wait(epfd, events.as_mut_ptr(), events.len() as i32, timeout) };
        let n = if n < 0 { 0 } else { n as usize };
        let now = Instant::now();
        if backoff.paused()
            && backoff.ready(now)
            && let Some(l) = &listener
            && add(epfd, l.as_raw_fd(), libc::EPOLLIN as u32, LISTENER).is_err()
        {
            tracing::warn!(worker = index, "could not resume accepting");
        }
        for (id, fd) in unread.drain(..) {
            if core.fd_of(id) == Some(fd)
                && core.wants_read(id)
                && read_some(&mut core, id, fd, &mut buf, true, now)
            {
                still_unread.push((id, fd));
            }
        }
        std::mem::swap(&mut unread, &mut still_unread);
        for ev in events.iter().take(n) {
            let (flags, tok) = (ev.events, ev.u64);
            match tok {
                LISTENER => {
                    let Some(l) = &listener else { continue };
                    for _ in 0..256 {
                        // SAFETY: accept4 on our listener; null address pointers are allowed.
                        let fd = unsafe {
                            libc::accept4(
                                l.as_raw_fd(),
                                std::ptr::null_mut(),
                                std::ptr::null_mut(),
                                libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
                            )
                        };
                        if fd < 0 {
                            let errno = io::Error::last_os_error().raw_os_error().unwrap_or(0);
                            if errno != libc::EAGAIN
                                && backoff.failed(index, errno, &shared.stats[index], now)
                            {
                                remove(epfd, l.as_raw_fd());
                            }
                            break;
                        }
                        backoff.succeeded();
                        // TCP_NODELAY is inherited from the listener (set in `bind`).
                        let id = core.on_accept(fd as u32, now);
                        let interest =
                            (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET)
                                as u32;
                        if add(epfd, fd, interest, token(id)).is_err() {
                            core.on_eof(id);
                        }
                    }
                }
                WAKE => {
                    let mut v = 0u64;
                    // SAFETY: reads 8 bytes into a live u64 from our eventfd.
                    let _ = unsafe { libc::read(wake_fd, (&raw mut v).cast(), 8) };
                    core.on_commands(now);
                }
                tok => {
                    let id = id_of(tok);
                    let Some(fd) = core.fd_of(id) else { continue };
                    if flags
                        & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR)
                            as u32
                        != 0
                    {
                        let hup = flags
                            & (libc::EPOLLRDHUP | libc::EPOLLHUP | libc::EPOLLERR) as u32
                            != 0;
                        if core.wants_read(id) {
                            if read_some(&mut core, id, fd, &mut buf, hup, now) {
                                unread.push((id, fd));
                            }
                        } else if flags & (libc::EPOLLHUP | libc::EPOLLERR) as u32 != 0 {
                            // Paused, but the socket is dead both ways: nothing to wait for.
                            core.on_eof(id);
                        }
                        // Otherwise paused: the bytes stay in the socket (TCP flow control
                        // pushes back) until `set_reading` resumes it and it is read then.
                    }
                    if flags & libc::EPOLLOUT as u32 != 0 {
                        core.on_writable(id);
                    }
                }
            }
        }
        core.on_tick(now);
        match shared.shutdown_state() {
            ShutdownState::Running => {}
            ShutdownState::Draining => {
                if !core.draining() {
                    listener = None; // stop accepting on this worker
                    core.begin_drain(now, now + shared.config.drain_timeout);
                }
            }
            ShutdownState::Aborting => {
                core.abort_all(&mut driver);
                return Ok(());
            }
        }
        core.flush(&mut driver);
        // Resumed connections: read what arrived while paused (next turn at the latest).
        unread.append(&mut driver.resumed);
        if core.finished(now) {
            core.abort_all(&mut driver);
            return Ok(());
        }
    }
}

/// Reads `id` until its socket is drained, it stops wanting reads, or
/// [`READS_PER_TURN`] reads; returns `true` in the last case (bytes may be left: read it
/// again next turn).
fn read_some<H: Handler>(
    core: &mut Core<H>,
    id: ConnId,
    fd: u32,
    buf: &mut [u8],
    hup: bool,
    now: Instant,
) -> bool {
    for _ in 0..READS_PER_TURN {
        // recv rather than read: the socket call skips the file layer's read path
        // (vfs_read, its access notification) that read takes for every file type.
        // SAFETY: fd is the connection's open socket; buf is valid for buf.len() bytes.
        let r = unsafe { libc::recv(fd as i32, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if r > 0 {
            let n = r as usize;
            if let Some(data) = buf.get_mut(..n) {
                core.on_data(id, data, now);
            }
            if !core.wants_read(id) {
                return false;
            }
            if n < buf.len() && !hup {
                // Edge-triggered: a short read means the socket is drained; a FIN that
                // arrives later raises a new edge (EPOLLRDHUP).
                return false;
            }
        } else if r == 0 {
            core.on_eof(id);
            return false;
        } else {
            match io::Error::last_os_error().raw_os_error() {
                Some(libc::EAGAIN) => return false,
                Some(libc::EINTR) => {}
                _ => {
                    core.on_eof(id);
                    return false;
                }
            }
        }
    }
    true
}
