//! The io_uring backend.
//!
//! Per worker: one ring (`SINGLE_ISSUER | DEFER_TASKRUN | TASKRUN_FLAG`: only this
//! thread touches it, completions are run when it enters, and the flag lets an enter that
//! does not wait — between write batches — still run them),
//! a sparse direct-descriptor table that multishot accept allocates into (accepted sockets
//! never enter the process's descriptor table), one provided-buffer ring shared by every
//! connection's multishot recv (a buffer is taken only when bytes arrive and is given back
//! as soon as the core has parsed it, so an idle connection holds none), one send in flight
//! per connection (a plain `send` for one frame, `sendmsg` gathering every queued frame
//! otherwise), a repeating kernel timeout that drives the timer wheel, and a read on the
//! worker's eventfd for cross-worker wake-ups.
//!
//! Completion `user_data` = op kind (8 bits) | generation (24 bits) | slot (32 bits).
//! A slot is freed only after its last operation completed, and a completion whose
//! generation does not match the slot's is ignored.
//!
//! A turn consumes completions carrying at most [`TURN_READ_BYTES`] of received data; the
//! rest stay in the completion queue for the next turn, which comes without sleeping, so
//! the timers and the writes of a turn never wait behind a flood. (Between connections
//! the kernel already interleaves: a multishot recv posts as data arrives and is requeued
//! after a bounded number of retries.) Accept failures for lack of resources pause
//! accepting (`AcceptBackoff` in the engine module).
//!
//! Leaving the loop: every operation is cancelled and the loop waits (briefly) for their
//! completions, and the ring is declared after everything it points into (buffers,
//! iovecs, the tick's timespec, the eventfd's read buffer, the connections' queues), so it
//! is dropped first.
//!
//! Ownership of memory handed to the kernel: receive buffers belong to the kernel while
//! they are in the buffer ring and to us from the completion that names them until we put
//! them back; a send's bytes are `Bytes` held in the connection's transmit queue, which is
//! not advanced (so not dropped) until the send completes; `SendBuf` (iovecs + msghdr) is
//! taken from a per-worker pool for the send (its index in the slot's `SlotIo`) and
//! returned when it completes.
//!
//! One file (about 900 lines) on purpose: every `unsafe` submission here is sound only
//! because of what a completion handler further down does with the same buffer or
//! `SendBuf`, and each `SAFETY` comment names that handler; split across files, a change
//! to one half could not be checked against the other at a glance.

use std::io;
use std::os::fd::AsRawFd;
use std::sync::Arc;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::mpsc::Sender;
use std::time::{Duration, Instant};

use io_uring::types::{BufRingEntry, Fd, Fixed, TimeoutFlags, Timespec};
use io_uring::{IoUring, Probe, Submitter, cqueue, opcode, squeue};
use socket2::Socket;

use super::core::{ConnId, Core, Driver, GENERATION_MASK, SendOutcome};
use super::handler::Handler;
use super::wheel::TICK;
use super::{AcceptBackoff, EngineConfig, Shared, ShutdownState};

const OP_ACCEPT: u64 = 1;
const OP_RECV: u64 = 2;
const OP_SEND: u64 = 3;
const OP_CLOSE: u64 = 4;
const OP_CANCEL: u64 = 5;
const OP_TICK: u64 = 6;
const OP_WAKE: u64 = 7;
const OP_SHUTDOWN: u64 = 8;

/// Received bytes one turn hands to the core before it runs the timers and the writes.
pub const TURN_READ_BYTES: usize = 1024 * 1024;

/// Buffer group id of the worker's provided-buffer ring.
const BGID: u16 = 0;
/// The buffer group of the upgrade requests' ring (see [`HS_RING_BUFFERS`]).
const HS_BGID: u16 = 1;
/// Upgrade requests are read into a ring of their own, 64 buffers of 1 KiB (a request
/// larger than one buffer takes several reads), one single-shot recv at a time, and only
/// once the 101 is queued does the connection's multishot recv on the main ring start.
/// Every byte received goes through the main ring in order, so its pages are touched as
/// bytes arrive, up to its 4 MiB: 15,000 upgrade requests of about 200 B touched 3 MB of
/// it, about 200 B of resident memory per connection opened, cold. This ring's pages are
/// reused from request to request: 64 KiB, whatever the number of connections. (With
/// 4 KiB buffers each request touched its buffer's first page: 256 KiB resident, 17 B per
/// connection of a cold 15,000. Most requests are 200 B to 1 KiB: a browser's with
/// cookies may take two reads.)
const HS_RING_BUFFERS: u16 = 64;
const HS_BUFFER_SIZE: usize = 1024;
/// Receive buffers per worker, and their size: with incremental consumption (kernel 6.12+,
/// each completion takes only the bytes it needs from a buffer) few large buffers; without
/// it more, smaller ones. 4 MiB per worker either way.
/// (`wsring check` sets up rings of the same geometry to measure what they cost.)
pub(crate) const INC_RING_BUFFERS: u16 = 64;
const INC_BUFFER_SIZE: usize = 64 * 1024;
pub(crate) const RING_BUFFERS: u16 = 256;
const BUFFER_SIZE: usize = 16 * 1024;
const MAX_IOV: usize = 64;
pub(crate) const SQ_ENTRIES: u32 = 4096;
const CQ_ENTRIES: u32 = 32768;
/// `IOU_PBUF_RING_INC`: the provided-buffer ring flag for incremental consumption (6.12+).
pub(crate) const IOU_PBUF_RING_INC: u16 = 2;

fn user_data(op: u64, id: ConnId) -> u64 {
    (op << 56) | (u64::from(id.generation & GENERATION_MASK) << 32) | u64::from(id.slot)
}

fn split(ud: u64) -> (u64, u32, u32) {
    (ud >> 56, ((ud >> 32) as u32) & GENERATION_MASK, ud as u32)
}

/// The ring a worker runs on: its flags and completion-queue size (build it with
/// [`SQ_ENTRIES`]).
pub(crate) fn builder() -> io_uring::Builder {
    let mut b = IoUring::builder();
    b.setup_single_issuer()
        .setup_defer_taskrun()
        // Flags pending task work (a completed recv, say) in the SQ ring, so that an enter
        // that does not wait still runs it when there is some (`submit_and_wait(0)`).
        .setup_taskrun_flag()
        .setup_submit_all()
        .setup_cqsize(CQ_ENTRIES);
    b
}

fn kernel_at_least(major: u32, minor: u32) -> bool {
    // SAFETY: a zeroed utsname is valid; uname fills it.
    let mut u: libc::utsname = unsafe { std::mem::zeroed() };
    // SAFETY: u is a valid, writable utsname.
    if unsafe { libc::uname(&mut u) } != 0 {
        return false;
    }
    let release: String = u
        .release
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8 as char)
        .collect();
    let mut parts = release
        .split(['.', '-'])
        .filter_map(|p| p.parse::<u32>().ok());
    let (a, b) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
    (a, b) >= (major, minor)
}

/// Checks that io_uring can be set up here with every operation this backend uses.
///
/// # Errors
/// A human-readable reason (disabled by sysctl, seccomp, old kernel, missing op).
pub fn probe(_config: &EngineConfig) -> Result<(), String> {
    if !kernel_at_least(6, 1) {
        return Err("kernel older than 6.1 (multishot recv and buffer rings needed)".into());
    }
    // The workers' own size (SQ and CQ entries): where RLIMIT_MEMLOCK charges rings, a
    // small probe ring could fit while the real ones do not, and `auto` would then fail at
    // start instead of choosing epoll.
    let ring = builder()
        .build(SQ_ENTRIES)
        .map_err(|e| match e.raw_os_error() {
            Some(libc::EPERM) => {
                "io_uring_setup refused (EPERM): kernel.io_uring_disabled or a seccomp profile"
                    .to_string()
            }
            Some(libc::ENOSYS) => "io_uring_setup not implemented (ENOSYS)".to_string(),
            Some(libc::ENOMEM) => {
                "io_uring_setup: out of locked memory (ENOMEM): raise RLIMIT_MEMLOCK".to_string()
            }
            _ => format!("io_uring_setup failed: {e}"),
        })?;
    let mut probe = Probe::new();
    ring.submitter()
        .register_probe(&mut probe)
        .map_err(|e| format!("io_uring probe failed: {e}"))?;
    for (code, name) in [
        (opcode::AcceptMulti::CODE, "accept"),
        (opcode::RecvMulti::CODE, "recv"),
        (opcode::Send::CODE, "send"),
        (opcode::SendMsg::CODE, "sendmsg"),
        (opcode::AsyncCancel::CODE, "async_cancel"),
        (opcode::Close::CODE, "close"),
        (opcode::Timeout::CODE, "timeout"),
        (opcode::Read::CODE, "read"),
        (opcode::Shutdown::CODE, "shutdown"),
    ] {
        if !probe.is_supported(code) {
            return Err(format!("io_uring lacks the {name} operation"));
        }
    }
    ring.submitter()
        .register_files_sparse(8)
        .map_err(|e| format!("sparse file table not supported: {e}"))?;
    let test = BufRing::new(8, 64).map_err(|e| format!("buffer ring allocation: {e}"))?;
    // SAFETY: the ring memory lives until `test` drops, after `ring` (declared later, so
    // dropped first) has gone away.
    unsafe { test.register(&ring.submitter(), 1) }
        .map_err(|e| format!("provided-buffer rings not supported: {e}"))?;
    drop(ring);
    drop(test);
    Ok(())
}

/// A provided-buffer ring: `entries` buffers of `size` bytes, in anonymous mappings.
struct BufRing {
    ring: *mut BufRingEntry,
    ring_len: usize,
    bufs: *mut u8,
    bufs_len: usize,
    entries: u16,
    size: usize,
    /// Our copy of the tail (published with `publish`).
    tail: u16,
    /// Registered with incremental consumption (`IOU_PBUF_RING_INC`).
    incremental: bool,
    /// Incremental mode: bytes of each buffer already handed to us.
    offsets: Vec<u32>,
}

/// An anonymous private mapping of `len` bytes (also what `wsring check` registers its
/// measured buffer rings from).
pub(crate) fn map(len: usize) -> io::Result<*mut u8> {
    // SAFETY: an anonymous private mapping; the result is checked.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        Err(io::Error::last_os_error())
    } else {
        Ok(p.cast())
    }
}

impl BufRing {
    fn new(entries: u16, size: usize) -> io::Result<BufRing> {
        let ring_len = usize::from(entries) * size_of::<BufRingEntry>();
        let ring = map(ring_len)?.cast::<BufRingEntry>();
        let bufs_len = usize::from(entries) * size;
        let bufs = match map(bufs_len) {
            Ok(b) => b,
            Err(e) => {
                // SAFETY: unmapping the mapping made just above.
                unsafe { libc::munmap(ring.cast(), ring_len) };
                return Err(e);
            }
        };
        let mut r = BufRing {
            ring,
            ring_len,
            bufs,
            bufs_len,
            entries,
            size,
            tail: 0,
            incremental: false,
            offsets: vec![0; usize::from(entries)],
        };
        for bid in 0..entries {
            r.push(bid);
        }
        r.publish();
        Ok(r)
    }

    /// # Safety
    /// `self` must outlive the ring it is registered with (or be unregistered first).
    unsafe fn register(&self, submitter: &Submitter<'_>, bgid: u16) -> io::Result<()> {
        // SAFETY: the ring memory is page-aligned (mmap), holds `entries` entries, and
        // outlives the registration per this function's contract.
        unsafe { submitter.register_buf_ring_with_flags(self.ring as u64, self.entries, bgid, 0) }
    }

    /// Registers with incremental consumption (`IOU_PBUF_RING_INC`).
    ///
    /// # Safety
    /// As [`BufRing::register`].
    unsafe fn register_incremental(
        &mut self,
        submitter: &Submitter<'_>,
        bgid: u16,
    ) -> io::Result<()> {
        // SAFETY: as in `register`.
        unsafe {
            submitter.register_buf_ring_with_flags(
                self.ring as u64,
                self.entries,
                bgid,
                IOU_PBUF_RING_INC,
            )
        }?;
        self.incremental = true;
        Ok(())
    }

    /// Gives buffer `bid` (back) to the kernel; visible after `publish`.
    fn push(&mut self, bid: u16) {
        let index = usize::from(self.tail & (self.entries - 1));
        // SAFETY: index < entries, inside the ring mapping; the kernel only reads entries
        // between its head and the published tail, and this one is past the tail.
        let entry = unsafe { &mut *self.ring.add(index) };
        // SAFETY: bid < entries, so the buffer lies inside the buffers mapping.
        entry.set_addr(unsafe { self.bufs.add(usize::from(bid) * self.size) } as u64);
        entry.set_len(self.size as u32);
        entry.set_bid(bid);
        self.tail = self.tail.wrapping_add(1);
    }

    /// Publishes the tail to the kernel.
    fn publish(&self) {
        // SAFETY: the tail field overlays entry 0's `resv`, inside the mapping; the kernel
        // reads it atomically, so we store it atomically with release ordering.
        unsafe {
            let tail = BufRingEntry::tail(self.ring).cast_mut().cast::<AtomicU16>();
            (*tail).store(self.tail, Ordering::Release);
        }
    }

    /// The `len` bytes a completion put into buffer `bid`, and whether the buffer goes
    /// back to the kernel after them (`false` in incremental mode while the kernel keeps
    /// filling the rest of it: the completion carried `IORING_CQE_F_BUF_MORE`).
    ///
    /// # Safety
    /// A completion must have named `bid` with `len` bytes, and the bytes must not have
    /// been taken before; they stay ours until the buffer is pushed back.
    unsafe fn take(&mut self, bid: u16, len: usize, more: bool) -> (&mut [u8], bool) {
        let b = usize::from(bid % self.entries);
        let offset = if self.incremental {
            self.offsets.get(b).map_or(0, |o| *o as usize)
        } else {
            0
        };
        let start = offset.min(self.size);
        let len = len.min(self.size - start);
        let recycle = !(self.incremental && more);
        if let Some(o) = self.offsets.get_mut(b) {
            *o = if recycle { 0 } else { (start + len) as u32 };
        }
        // SAFETY: the bytes lie inside buffer `b` of the mapping and, per the contract,
        // the kernel wrote them and handed them to us.
        let data =
            unsafe { std::slice::from_raw_parts_mut(self.bufs.add(b * self.size + start), len) };
        (data, recycle)
    }
}

impl Drop for BufRing {
    fn drop(&mut self) {
        // SAFETY: unmapping our own mappings; the io_uring using them is gone by now.
        unsafe {
            libc::munmap(self.ring.cast(), self.ring_len);
            libc::munmap(self.bufs.cast(), self.bufs_len);
        }
    }
}

/// What is in flight for one slot: 4 bytes per slot beside the core's slot, the flags
/// below in the low [`FLAG_BITS`] bits and the index of its gathering send's buffers
/// above them ([`NO_SEND_BUF`]: none). A completion's generation is checked against the
/// core's slot (`Core::current`), which lives until the last operation completed: no
/// second copy of it here.
#[derive(Clone, Copy)]
struct SlotIo(u32);

/// Bits of a [`SlotIo`] that hold its flags.
const FLAG_BITS: u32 = 9;
const FLAG_MASK: u32 = (1 << FLAG_BITS) - 1;

/// No `SendBuf` in use (the largest index the bits above the flags hold).
const NO_SEND_BUF: u32 = u32::MAX >> FLAG_BITS;

/// The most `SendBuf`s a worker makes (about 8 million: one per send in flight, so far
/// more than the descriptors a process may hold). Past it a send carries one slice.
const MAX_SEND_BUFS: usize = NO_SEND_BUF as usize;

impl Default for SlotIo {
    fn default() -> SlotIo {
        SlotIo(NO_SEND_BUF << FLAG_BITS)
    }
}

impl SlotIo {
    /// The recv in flight is a single-shot one on the upgrade requests' ring.
    const HANDSHAKE: u16 = 1;
    /// Reading is paused: do not re-arm the recv.
    const PAUSED: u16 = 1 << 1;
    const RECV: u16 = 1 << 2;
    const SEND: u16 = 1 << 3;
    const CLOSE: u16 = 1 << 4;
    /// A shutdown (FIN after an HTTP answer) is in flight.
    const SHUTDOWN: u16 = 1 << 5;
    /// The upgrade is done: recvs go to the main ring.
    const UPGRADED: u16 = 1 << 6;
    /// The close waits for that shutdown's completion: the kernel may run a shutdown in
    /// its worker pool after a close issued later, and by then the fixed-file index may
    /// name a newly accepted socket.
    const CLOSE_AFTER_SHUTDOWN: u16 = 1 << 7;
    const CLOSING: u16 = 1 << 8;

    fn has(&self, flag: u16) -> bool {
        self.0 & u32::from(flag) != 0
    }

    fn set(&mut self, flag: u16, on: bool) {
        if on {
            self.0 |= u32::from(flag);
        } else {
            self.0 &= !u32::from(flag);
        }
    }

    /// The flags.
    fn bits(&self) -> u16 {
        (self.0 & FLAG_MASK) as u16
    }

    /// The `SendBuf` its gathering send in flight uses ([`NO_SEND_BUF`]: none).
    fn send_buf(&self) -> u32 {
        self.0 >> FLAG_BITS
    }

    fn set_send_buf(&mut self, index: u32) {
        self.0 = (self.0 & FLAG_MASK) | (index.min(NO_SEND_BUF) << FLAG_BITS);
    }

    /// Clears `flag`; returns whether it was set.
    fn take(&mut self, flag: u16) -> bool {
        let was = self.has(flag);
        self.set(flag, false);
        was
    }

    #[cfg(test)]
    fn with(mut self, flag: u16) -> SlotIo {
        self.set(flag, true);
        self
    }
}

const _: () = assert!(std::mem::size_of::<SlotIo>() <= 4);
// Every flag fits below the send buffer's index.
const _: () = assert!((SlotIo::CLOSING as u32) < 1 << FLAG_BITS);

/// Whether a multishot recv that ended (no `MORE` flag) with `res` is armed again:
/// unless the connection is closing or paused, after data, after the buffer ring ran dry
/// (-ENOBUFS), and after a cancel whose pause was lifted before its completion arrived
/// (-ECANCELED with `paused` already false again: `set_reading(on)` saw the recv still in
/// flight and did not arm a second one). EOF (0) and socket errors end reading.
fn rearm_after(io: &SlotIo, res: i32) -> bool {
    !io.has(SlotIo::CLOSING)
        && !io.has(SlotIo::PAUSED)
        && (res > 0 || res == -libc::ENOBUFS || res == -libc::ECANCELED)
}

/// iovecs + msghdr for a gathering send: taken from the pool for one send, untouched while
/// it is in flight, returned when it completes.
struct SendBuf {
    iov: [libc::iovec; MAX_IOV],
    msg: libc::msghdr,
}

struct UringDriver<'r, 'a> {
    submitter: &'a Submitter<'r>,
    sq: &'a mut io_uring::SubmissionQueue<'r>,
    io: &'a mut Vec<SlotIo>,
    /// Every `SendBuf` made so far (as many as gathering sends were ever in flight at
    /// once), named by index in `SlotIo::send_buf`; boxed on purpose: an in-flight
    /// msghdr points into its SendBuf, which must not move when this grows.
    #[allow(clippy::vec_box)]
    send_bufs: &'a mut Vec<Box<SendBuf>>,
    /// The indices of those not in use.
    free_bufs: &'a mut Vec<u32>,
}

/// `IORING_ENTER_GETEVENTS` (linux/io_uring.h).
const ENTER_GETEVENTS: u32 = 1;

/// Submits the turn's entries and runs the completions waiting as task work, waiting for
/// `want` completions (0: none).
///
/// `submit_and_wait(0)` asks for events only when the ring flagged task work *before* the
/// submission: with `DEFER_TASKRUN`, a recv that completes while the turn's own sends are
/// being submitted (a fan-out publisher answering its copy, say: 1,000 sends take
/// milliseconds) would then wait one more turn, so a client pacing itself on its echo ran
/// at half the rate of the epoll backend's. `GETEVENTS` with no minimum runs that work
/// after the submission and returns without sleeping.
fn submit_and_run(ring: &mut IoUring, want: u32) -> io::Result<usize> {
    let pending = ring.submission().len() as u32;
    // SAFETY: every queued entry's buffers stay valid until its completion (the contract
    // of `push`, through which every entry is queued); no argument is passed.
    unsafe {
        ring.submitter()
            .enter::<libc::sigset_t>(pending, want, ENTER_GETEVENTS, None)
    }
}

/// Pushes an entry, submitting first if the queue is full.
///
/// # Safety
/// Every buffer the entry points to must stay valid until its completion.
unsafe fn push(
    submitter: &Submitter<'_>,
    sq: &mut io_uring::SubmissionQueue<'_>,
    e: &squeue::Entry,
) {
    loop {
        // SAFETY: forwarded from this function's contract.
        if unsafe { sq.push(e) }.is_ok() {
            return;
        }
        sq.sync();
        let _ = submitter.submit();
        sq.sync();
    }
}

impl UringDriver<'_, '_> {
    fn io(&mut self, slot: u32) -> &mut SlotIo {
        let i = slot as usize;
        if self.io.len() <= i {
            self.io.resize(i + 1, SlotIo::default());
        }
        &mut self.io[i]
    }

    fn cancel(&mut self, op: u64, id: ConnId) {
        let e = opcode::AsyncCancel::new(user_data(op, id))
            .build()
            .user_data(user_data(OP_CANCEL, id));
        // SAFETY: a cancel request points at no buffer.
        unsafe { push(self.submitter, self.sq, &e) };
    }

    /// Arms the connection's recv: a multishot one on the main ring once upgraded, else a
    /// single-shot one on the upgrade requests' ring (re-armed after each completion).
    fn arm_recv(&mut self, id: ConnId, fd: u32) {
        let handshake = !self.io(id.slot).has(SlotIo::UPGRADED);
        let e = if handshake {
            opcode::Recv::new(Fixed(fd), std::ptr::null_mut(), HS_BUFFER_SIZE as u32)
                .buf_group(HS_BGID)
                .build()
                .flags(squeue::Flags::BUFFER_SELECT)
        } else {
            opcode::RecvMulti::new(Fixed(fd), BGID).build()
        };
        let e = e.user_data(user_data(OP_RECV, id));
        // SAFETY: both recvs use buffers from a provided ring only (the single-shot one
        // selects its buffer: no address of ours is passed).
        unsafe { push(self.submitter, self.sq, &e) };
        let io = self.io(id.slot);
        io.set(SlotIo::RECV, true);
        io.set(SlotIo::HANDSHAKE, handshake);
    }
}

impl Driver for UringDriver<'_, '_> {
    fn send(
        &mut self,
        id: ConnId,
        fd: u32,
        bufs: &mut dyn Iterator<Item = &[u8]>,
        last: bool,
    ) -> SendOutcome {
        // Final bytes: held back by the kernel until the close that follows, which then
        // sends them and the FIN in one segment (an ACK arriving first sends them anyway).
        let more = if last { libc::MSG_MORE } else { 0 };
        let mut iov = [libc::iovec {
            iov_base: std::ptr::null_mut(),
            iov_len: 0,
        }; MAX_IOV];
        let mut n = 0;
        for (slot, b) in iov.iter_mut().zip(bufs) {
            slot.iov_base = b.as_ptr() as *mut libc::c_void;
            slot.iov_len = b.len();
            n += 1;
        }
        // A gathering send needs a `SendBuf`: past the pool's cap (never reached in
        // practice) the send carries the first slice only, and the rest follows.
        let gather = n > 1 && (!self.free_bufs.is_empty() || self.send_bufs.len() < MAX_SEND_BUFS);
        let e = if !gather {
            // One frame: a plain send, nothing to keep alive but the frame itself.
            opcode::Send::new(
                Fixed(fd),
                iov[0].iov_base as *const u8,
                iov[0].iov_len as u32,
            )
            .flags(libc::MSG_NOSIGNAL | more)
            .build()
        } else {
            // Several frames: one gathering sendmsg. Its iovecs and msghdr come from a
            // per-worker pool and go back to it when the send completes, so an idle
            // connection holds none.
            let index = self.free_bufs.pop().unwrap_or_else(|| {
                self.send_bufs.push(Box::new(SendBuf {
                    iov: [libc::iovec {
                        iov_base: std::ptr::null_mut(),
                        iov_len: 0,
                    }; MAX_IOV],
                    // SAFETY: a zeroed msghdr is a valid empty header.
                    msg: unsafe { std::mem::zeroed() },
                }));
                (self.send_bufs.len() - 1) as u32
            });
            self.io(id.slot).set_send_buf(index);
            let Some(sb) = self.send_bufs.get_mut(index as usize) else {
                return SendOutcome::Failed;
            };
            sb.iov = iov;
            sb.msg.msg_iov = sb.iov.as_mut_ptr();
            sb.msg.msg_iovlen = n;
            opcode::SendMsg::new(Fixed(fd), &raw const sb.msg)
                .flags((libc::MSG_NOSIGNAL | more) as u32)
                .build()
        }
        .user_data(user_data(OP_SEND, id));
        // SAFETY: the bytes are `Bytes` in the connection's transmit queue, kept until
        // `on_sent` advances it; the msghdr/iovecs live in this slot's boxed SendBuf,
        // which is neither moved nor rewritten while this send is in flight (the core
        // keeps at most one send in flight per connection).
        unsafe { push(self.submitter, self.sq, &e) };
        self.io(id.slot).set(SlotIo::SEND, true);
        SendOutcome::InFlight
    }

    fn set_reading(&mut self, id: ConnId, fd: u32, on: bool) {
        let io = self.io(id.slot);
        io.set(SlotIo::PAUSED, !on);
        if on {
            if !io.has(SlotIo::RECV) {
                self.arm_recv(id, fd);
            }
        } else if io.has(SlotIo::RECV) {
            self.cancel(OP_RECV, id);
        }
    }

    fn shutdown_write(&mut self, id: ConnId, fd: u32) {
        let e = opcode::Shutdown::new(Fixed(fd), libc::SHUT_WR)
            .build()
            .user_data(user_data(OP_SHUTDOWN, id));
        // SAFETY: a shutdown request points at no buffer.
        unsafe { push(self.submitter, self.sq, &e) };
        self.io(id.slot).set(SlotIo::SHUTDOWN, true);
    }

    fn close(&mut self, id: ConnId, fd: u32) -> bool {
        let io = *self.io(id.slot);
        if io.has(SlotIo::RECV) {
            self.cancel(OP_RECV, id);
        }
        if io.has(SlotIo::SEND) {
            // A send parked on a full socket of a peer that stopped reading.
            self.cancel(OP_SEND, id);
        }
        if io.has(SlotIo::SHUTDOWN) {
            // Closed when the shutdown completes (see `SlotIo::CLOSE_AFTER_SHUTDOWN`).
            let io = self.io(id.slot);
            io.set(SlotIo::CLOSE_AFTER_SHUTDOWN, true);
            io.set(SlotIo::CLOSING, true);
            return false;
        }
        self.submit_close(id, fd);
        false
    }
}

impl UringDriver<'_, '_> {
    fn submit_close(&mut self, id: ConnId, fd: u32) {
        let e = opcode::Close::new(Fixed(fd))
            .build()
            .user_data(user_data(OP_CLOSE, id));
        // SAFETY: a close request points at no buffer.
        unsafe { push(self.submitter, self.sq, &e) };
        let io = self.io(id.slot);
        io.set(SlotIo::CLOSE, true);
        io.set(SlotIo::CLOSING, true);
    }
}

/// Runs worker `index` on io_uring until shutdown.
///
/// # Errors
/// Ring set-up failures.
pub fn run<H: Handler>(
    index: usize,
    shared: Arc<Shared>,
    handler: H,
    listener: Socket,
    ready: &Sender<Result<(), String>>,
) -> io::Result<()> {
    // Everything the kernel may point into is declared before the ring, so that the ring
    // is dropped (closed) first whichever way this function returns.
    let mut bufring = BufRing::new(INC_RING_BUFFERS, INC_BUFFER_SIZE)?;
    let mut hs_ring = BufRing::new(HS_RING_BUFFERS, HS_BUFFER_SIZE)?;
    let wake_fd = shared.eventfd(index);
    let mut wake_buf = Box::new(0u64);
    let tick = Box::new(Timespec::from(TICK));
    // Reserved for as many slots as the core reserves (see `Core::new`): growing them by
    // reallocation would leave old arrays resident in an idle server.
    let presize = super::core::presize_slots(&shared.config);
    let mut io: Vec<SlotIo> = Vec::with_capacity(presize);
    #[allow(clippy::vec_box)] // see UringDriver::send_bufs
    let mut send_bufs: Vec<Box<SendBuf>> = Vec::new();
    let mut free_bufs: Vec<u32> = Vec::new();
    let mut core = Core::new(index, shared.clone(), handler, Instant::now());
    let mut ring = builder().build(SQ_ENTRIES)?;
    let table = (shared.config.max_connections + 1024)
        .min(super::raise_nofile() as usize)
        .max(64);
    ring.submitter().register_files_sparse(table as u32)?;
    // SAFETY: `bufring` outlives `ring` (declared first, dropped last); a failed
    // registration registers nothing, so the replacement below is safe too.
    if unsafe { bufring.register_incremental(&ring.submitter(), BGID) }.is_err() {
        bufring = BufRing::new(RING_BUFFERS, BUFFER_SIZE)?;
        // SAFETY: as above.
        unsafe { bufring.register(&ring.submitter(), BGID)? };
    }
    // SAFETY: `hs_ring` outlives `ring` (declared first, dropped last).
    unsafe { hs_ring.register(&ring.submitter(), HS_BGID)? };
    if index == 0 {
        tracing::debug!(
            incremental = bufring.incremental,
            "provided-buffer ring registered"
        );
    }

    let listener_fd = listener.as_raw_fd();
    let mut listener = Some(listener);
    let none = ConnId {
        slot: 0,
        generation: 0,
    };
    let mut accept_armed = false;
    let mut backoff = AcceptBackoff::new();
    // Completions left in the queue by the last turn's read budget.
    let mut backlog = false;
    {
        let (submitter, mut sq, _) = ring.split();
        let e = opcode::Timeout::new(&*tick)
            .flags(TimeoutFlags::MULTISHOT)
            .build()
            .user_data(user_data(OP_TICK, none));
        // SAFETY: `tick` lives until the ring is dropped.
        unsafe { push(&submitter, &mut sq, &e) };
        let e = opcode::Read::new(Fd(wake_fd), (&raw mut *wake_buf).cast(), 8)
            .build()
            .user_data(user_data(OP_WAKE, none));
        // SAFETY: `wake_buf` lives until the ring is dropped.
        unsafe { push(&submitter, &mut sq, &e) };
    }
    let _ = ready.send(Ok(()));
    let mut aborting: Option<Instant> = None;
    loop {
        let now = Instant::now();
        if !accept_armed && listener.is_some() && backoff.ready(now) {
            let e = opcode::AcceptMulti::new(Fd(listener_fd))
                .allocate_file_index(true)
                .build()
                .user_data(user_data(OP_ACCEPT, none));
            let (submitter, mut sq, _) = ring.split();
            // SAFETY: accept writes no user memory (no address requested).
            unsafe { push(&submitter, &mut sq, &e) };
            accept_armed = true;
        }
        // Something left for the next flush (made due while flushing, e.g. a handler's
        // on_close publishing): submit without sleeping.
        let want = u32::from(!core.has_dirty() && !backlog);
        match submit_and_run(&mut ring, want) {
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.raw_os_error(),
                    Some(libc::EINTR | libc::EBUSY | libc::EAGAIN)
                ) => {}
            Err(e) => return Err(e),
        }
        let now = Instant::now();
        let (submitter, mut sq, mut cq) = ring.split();
        cq.sync();
        let mut rearm_wake = false;
        let mut read_budget = TURN_READ_BYTES;
        let mut drv = UringDriver {
            submitter: &submitter,
            sq: &mut sq,
            io: &mut io,
            send_bufs: &mut send_bufs,
            free_bufs: &mut free_bufs,
        };
        for cqe in &mut cq {
            let (op, generation, slot) = split(cqe.user_data());
            if op == OP_RECV && cqe.result() > 0 {
                read_budget = read_budget.saturating_sub(cqe.result() as usize);
            }
            let res = cqe.result();
            let flags = cqe.flags();
            let more = cqueue::more(flags);
            match op {
                OP_ACCEPT => {
                    if !more {
                        accept_armed = false;
                    }
                    if res >= 0 {
                        backoff.succeeded();
                        let id = core.on_accept(res as u32, now);
                        *drv.io(id.slot) = SlotIo::default();
                        drv.arm_recv(id, res as u32);
                    } else if res != -libc::ECANCELED
                        && backoff.failed(index, -res, &shared.stats[index], now)
                        && more
                    {
                        // Still armed: stop it; it is armed again once the pause ends.
                        let e = opcode::AsyncCancel::new(user_data(OP_ACCEPT, none))
                            .build()
                            .user_data(user_data(OP_CANCEL, none));
                        // SAFETY: a cancel points at no buffer.
                        unsafe { push(drv.submitter, drv.sq, &e) };
                    }
                }
                OP_RECV => {
                    let Some(id) = core.current(slot, generation) else {
                        continue;
                    };
                    if res > 0 && drv.io(slot).has(SlotIo::HANDSHAKE) {
                        if let Some(bid) = cqueue::buffer_select(flags) {
                            // SAFETY: the single-shot recv hands these bytes of the upgrade
                            // requests' buffer `bid` to us; it goes back to that ring right
                            // after the core has parsed them.
                            let (data, _) = unsafe { hs_ring.take(bid, res as usize, false) };
                            core.on_data(id, data, now);
                            hs_ring.push(bid);
                        }
                    } else if res > 0 {
                        if let Some(bid) = cqueue::buffer_select(flags) {
                            // SAFETY: the completion hands these bytes of buffer `bid` to
                            // us; the buffer goes back to the ring right after the core has
                            // parsed them (or, in incremental mode, once the kernel is done
                            // filling it).
                            let (data, recycle) = unsafe {
                                bufring.take(bid, res as usize, cqueue::buffer_more(flags))
                            };
                            core.on_data(id, data, now);
                            if recycle {
                                bufring.push(bid);
                            }
                        }
                    } else if res != -libc::ENOBUFS && res != -libc::ECANCELED {
                        // 0: the peer closed; negative: the socket failed.
                        core.on_eof(id);
                    }
                    if !more {
                        let io = drv.io(slot);
                        io.set(SlotIo::RECV, false);
                        // Upgraded: from now on the multishot recv on the main ring.
                        if !core.handshaking(id) {
                            io.set(SlotIo::UPGRADED, true);
                        }
                        if rearm_after(drv.io(slot), res)
                            && let Some(fd) = core.fd_of(id)
                        {
                            drv.arm_recv(id, fd);
                        }
                        finish_if_idle(&mut core, drv.io, slot);
                    }
                }
                OP_SEND => {
                    let Some(id) = core.current(slot, generation) else {
                        continue;
                    };
                    let sio = drv.io(slot);
                    sio.set(SlotIo::SEND, false);
                    let buf = sio.send_buf();
                    sio.set_send_buf(NO_SEND_BUF);
                    if buf != NO_SEND_BUF {
                        drv.free_bufs.push(buf);
                    }
                    core.on_sent(id, res);
                    finish_if_idle(&mut core, drv.io, slot);
                }
                OP_CLOSE | OP_SHUTDOWN => {
                    let Some(id) = core.current(slot, generation) else {
                        continue;
                    };
                    let sio = drv.io(slot);
                    if op == OP_CLOSE {
                        sio.set(SlotIo::CLOSE, false);
                    } else {
                        sio.set(SlotIo::SHUTDOWN, false);
                        if sio.take(SlotIo::CLOSE_AFTER_SHUTDOWN)
                            && let Some(fd) = core.socket_of(id)
                        {
                            drv.submit_close(id, fd);
                        }
                    }
                    finish_if_idle(&mut core, drv.io, slot);
                }
                OP_TICK if !more => {
                    {
                        let e = opcode::Timeout::new(&*tick)
                            .flags(TimeoutFlags::MULTISHOT)
                            .build()
                            .user_data(user_data(OP_TICK, none));
                        // SAFETY: `tick` lives until the ring is dropped.
                        unsafe { push(drv.submitter, drv.sq, &e) };
                    }
                }
                OP_TICK => {}
                OP_WAKE => rearm_wake = true,
                _ => {} // OP_CANCEL results carry nothing we need
            }
            if read_budget == 0 {
                break; // the rest next turn, after the timers and the writes
            }
        }
        backlog = !cq.is_empty();
        bufring.publish();
        hs_ring.publish();
        if rearm_wake {
            core.on_commands(now);
            let e = opcode::Read::new(Fd(wake_fd), (&raw mut *wake_buf).cast(), 8)
                .build()
                .user_data(user_data(OP_WAKE, none));
            // SAFETY: `wake_buf` lives until the ring is dropped.
            unsafe { push(drv.submitter, drv.sq, &e) };
        }
        core.on_tick(now);
        match shared.shutdown_state() {
            ShutdownState::Running => {}
            ShutdownState::Draining => {
                if !core.draining() {
                    if accept_armed {
                        let e = opcode::AsyncCancel::new(user_data(OP_ACCEPT, none))
                            .build()
                            .user_data(user_data(OP_CANCEL, none));
                        // SAFETY: a cancel points at no buffer.
                        unsafe { push(drv.submitter, drv.sq, &e) };
                    }
                    listener = None;
                    core.begin_drain(now, now + shared.config.drain_timeout);
                }
            }
            ShutdownState::Aborting => {
                if aborting.is_none() {
                    listener = None;
                    aborting = Some(now);
                    core.abort_all(&mut drv);
                }
            }
        }
        core.flush(&mut drv);
        if aborting.is_none() && core.finished(now) {
            aborting = Some(now);
            core.abort_all(&mut drv);
        }
        drop(sq);
        drop(cq);
        if let Some(t) = aborting {
            // Wait (briefly) for the cancelled operations so no buffer is freed while the
            // kernel may still use it.
            if core.is_empty() || now.duration_since(t) > Duration::from_secs(2) {
                quiesce(&mut ring);
                return Ok(());
            }
        }
    }
}

/// Cancels every operation still in flight (the tick, the eventfd read, whatever the
/// abort left) and waits up to 200 ms for the tick's and the eventfd read's last
/// completions, so that the memory they point into is not in use when it is freed.
fn quiesce(ring: &mut IoUring) {
    let none = ConnId {
        slot: 0,
        generation: 0,
    };
    let e = opcode::AsyncCancel2::new(io_uring::types::CancelBuilder::any().all())
        .build()
        .user_data(user_data(OP_CANCEL, none));
    {
        let (submitter, mut sq, _) = ring.split();
        // SAFETY: a cancel points at no buffer.
        unsafe { push(&submitter, &mut sq, &e) };
    }
    let deadline = Instant::now() + Duration::from_millis(200);
    let (mut tick_done, mut wake_done) = (false, false);
    let ts = Timespec::from(Duration::from_millis(10));
    while !(tick_done && wake_done) && Instant::now() < deadline {
        let args = io_uring::types::SubmitArgs::new().timespec(&ts);
        let _ = ring.submitter().submit_with_args(1, &args);
        for cqe in ring.completion() {
            let (op, _, _) = split(cqe.user_data());
            match op {
                OP_TICK if !cqueue::more(cqe.flags()) => tick_done = true,
                OP_WAKE => wake_done = true,
                _ => {}
            }
        }
    }
}

fn finish_if_idle<H: Handler>(core: &mut Core<H>, io: &mut [SlotIo], slot: u32) {
    let Some(sio) = io.get_mut(slot as usize) else {
        return;
    };
    let busy = SlotIo::RECV | SlotIo::SEND | SlotIo::CLOSE | SlotIo::SHUTDOWN;
    if sio.has(SlotIo::CLOSING)
        && sio.bits() & busy == 0
        && let Some(id) = core.id_of(slot)
    {
        sio.set(SlotIo::CLOSING, false);
        core.on_closed(id);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_recv_is_armed_again_unless_reading_ended_or_stays_off() {
        let open = SlotIo::default();
        assert!(rearm_after(&open, 100));
        assert!(rearm_after(&open, -libc::ENOBUFS));
        // The cancel of a pause whose resume came before this completion was reaped:
        // `set_reading(on)` saw the recv still in flight and armed none, so this must.
        assert!(rearm_after(&open, -libc::ECANCELED));
        assert!(!rearm_after(&open, 0), "EOF");
        assert!(!rearm_after(&open, -libc::ECONNRESET));
        let paused = SlotIo::default().with(SlotIo::PAUSED);
        assert!(!rearm_after(&paused, -libc::ECANCELED));
        assert!(!rearm_after(&paused, 100));
        let closing = SlotIo::default().with(SlotIo::CLOSING);
        assert!(!rearm_after(&closing, -libc::ECANCELED));
        assert!(!rearm_after(&closing, -libc::ENOBUFS));
    }

    #[test]
    fn a_slot_keeps_its_flags_and_its_send_buffer_apart() {
        let mut io = SlotIo::default()
            .with(SlotIo::CLOSING)
            .with(SlotIo::HANDSHAKE);
        assert_eq!(io.send_buf(), NO_SEND_BUF);
        io.set_send_buf(NO_SEND_BUF - 1);
        assert_eq!(io.send_buf(), NO_SEND_BUF - 1);
        assert_eq!(io.bits(), SlotIo::CLOSING | SlotIo::HANDSHAKE);
        io.set(SlotIo::CLOSING, false);
        io.set(SlotIo::SEND, true);
        assert_eq!(
            io.send_buf(),
            NO_SEND_BUF - 1,
            "flags leave the index alone"
        );
        io.set_send_buf(0);
        assert_eq!(io.send_buf(), 0);
        assert_eq!(io.bits(), SlotIo::SEND | SlotIo::HANDSHAKE);
        io.set_send_buf(u32::MAX);
        assert_eq!(
            io.send_buf(),
            NO_SEND_BUF,
            "an index too large reads as none"
        );
        assert_eq!(io.bits(), SlotIo::SEND | SlotIo::HANDSHAKE);
    }
}
