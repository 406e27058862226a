//! The floor that issue 18 measures wsring against: a minimal BENCH_PROTOCOL server that
//! does framing and batching and nothing else. One thread, one edge-triggered epoll, no
//! validation (no UTF-8 check, no limits beyond a 16 MiB frame, no timers, no
//! fragmentation: every frame is handled on its own), so it is not a server to deploy:
//! it is what a fan-out costs when only the kernel's work is left.
//!
//! - `/echo`: every text or binary frame back to its sender.
//! - `/pubsub/<topic>`: every text or binary frame to every subscriber of the topic, the
//!   sender included. A publication is encoded once into the topic's log; at the end of a
//!   turn up to 1,024 subscribers (as `wsring serve --write-batch`) get one write each
//!   carrying everything queued for them (their own pending bytes and the log since their
//!   last write, gathered with `sendmsg`); a connection that published gets its copy in
//!   that turn (wsring's two policies, so that what differs is the machinery).
//! - ping: a pong; close: the close echoed, then the socket closed once it is written.
//!
//! `--threads` is accepted for the script's sake and ignored (one thread).

use std::collections::HashMap;
use std::io::Write;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, IntoRawFd, RawFd};

use base64::Engine;
use clap::Parser;
use sha1::{Digest, Sha1};
use wsring_peers::{Args, MAX_MESSAGE_SIZE, Route};

const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
const LISTENER: u64 = u64::MAX;

#[derive(Default)]
struct Conn {
    /// Bytes read and not yet handled (a partial request or frame); empty when idle.
    rbuf: Vec<u8>,
    /// Bytes the socket did not take yet.
    out: Vec<u8>,
    upgraded: bool,
    /// The topic it subscribed to (`/pubsub/<topic>`), or none (`/echo`).
    topic: Option<usize>,
    /// Close once `out` is written.
    closing: bool,
    /// In this turn's list of connections to write.
    dirty: bool,
}

#[derive(Default)]
struct Topic {
    /// Each subscriber and the offset in the topic's stream up to which it was written.
    subscribers: Vec<(RawFd, u64)>,
    /// The frames published and not yet written to every subscriber, encoded once;
    /// `log[0]` is at offset `base` of the stream.
    log: Vec<u8>,
    base: u64,
    /// The next subscriber to write (a pass over all of them may span several turns).
    cursor: usize,
}

impl Topic {
    fn end(&self) -> u64 {
        self.base + self.log.len() as u64
    }
}

/// Subscribers written per loop turn, over all topics, as `wsring serve --write-batch`
/// (default 1,024): a pass over a wide topic spans turns, so each write carries what was
/// published meanwhile, and reads are not starved by a long pass.
const WRITE_BATCH: usize = 1024;

struct Server {
    epfd: RawFd,
    conns: Vec<Option<Conn>>,
    topics: Vec<Topic>,
    names: HashMap<String, usize>,
    dirty_topics: Vec<usize>,
    /// Connections that published in this turn: they get their copy in it, whatever the
    /// pass over their topic, as wsring writes it: after everyone else's of the turn, or
    /// first when the pass spans turns.
    publishers: Vec<RawFd>,
    dirty_conns: Vec<RawFd>,
    scratch: Vec<u8>,
}

fn encode(out: &mut Vec<u8>, opcode: u8, payload: &[u8]) {
    out.push(0x80 | opcode);
    match payload.len() {
        n @ 0..=125 => out.push(n as u8),
        n @ 126..=0xFFFF => {
            out.push(126);
            out.extend_from_slice(&(n as u16).to_be_bytes());
        }
        n => {
            out.push(127);
            out.extend_from_slice(&(n as u64).to_be_bytes());
        }
    }
    out.extend_from_slice(payload);
}

/// What one complete frame at the start of `buf` is: (opcode, payload range, its length).
fn frame(buf: &mut [u8]) -> Option<(u8, std::ops::Range<usize>, usize)> {
    let (&b0, &b1) = (buf.first()?, buf.get(1)?);
    let mut at = 2;
    let len = match b1 & 0x7F {
        126 => {
            let l = u16::from_be_bytes(buf.get(2..4)?.try_into().ok()?) as usize;
            at = 4;
            l
        }
        127 => {
            let l = u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?) as usize;
            at = 10;
            l
        }
        l => usize::from(l),
    };
    let mask: Option<[u8; 4]> = if b1 & 0x80 != 0 {
        let m = buf.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(m)
    } else {
        None
    };
    let end = at.checked_add(len)?;
    let payload = buf.get_mut(at..end)?;
    if let Some(m) = mask {
        for (i, b) in payload.iter_mut().enumerate() {
            *b ^= m[i & 3];
        }
    }
    Some((b0 & 0x0F, at..end, end))
}

fn send(fd: RawFd, bufs: &[&[u8]]) -> usize {
    let iov: Vec<libc::iovec> = bufs
        .iter()
        .filter(|b| !b.is_empty())
        .map(|b| libc::iovec {
            iov_base: b.as_ptr() as *mut libc::c_void,
            iov_len: b.len(),
        })
        .collect();
    if iov.is_empty() {
        return 0;
    }
    let msg = libc::msghdr {
        msg_name: std::ptr::null_mut(),
        msg_namelen: 0,
        msg_iov: iov.as_ptr() as *mut libc::iovec,
        msg_iovlen: iov.len(),
        msg_control: std::ptr::null_mut(),
        msg_controllen: 0,
        msg_flags: 0,
    };
    // SAFETY: the iovecs point into live slices for the call's duration.
    let n = unsafe { libc::sendmsg(fd, &msg, libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT) };
    usize::try_from(n).unwrap_or(0)
}

impl Server {
    fn conn(&mut self, fd: RawFd) -> Option<&mut Conn> {
        self.conns.get_mut(fd as usize)?.as_mut()
    }

    fn mark(&mut self, fd: RawFd) {
        if let Some(c) = self.conn(fd)
            && !c.dirty
        {
            c.dirty = true;
            self.dirty_conns.push(fd);
        }
    }

    fn drop_conn(&mut self, fd: RawFd) {
        let Some(c) = self.conns.get_mut(fd as usize).and_then(Option::take) else {
            return;
        };
        if let Some(t) = c.topic
            && let Some(p) = self.topics[t]
                .subscribers
                .iter()
                .position(|&(s, _)| s == fd)
        {
            self.topics[t].subscribers.swap_remove(p);
        }
        // SAFETY: our socket, closed once (its slot is emptied above).
        unsafe { libc::close(fd) };
    }

    fn accept(&mut self, listener: &TcpListener) {
        while let Ok((stream, _)) = listener.accept() {
            if stream.set_nodelay(true).is_err() || stream.set_nonblocking(true).is_err() {
                continue;
            }
            let fd = stream.into_raw_fd();
            let mut ev = libc::epoll_event {
                events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
                u64: fd as u64,
            };
            // SAFETY: registering our socket.
            unsafe { libc::epoll_ctl(self.epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) };
            if self.conns.len() <= fd as usize {
                self.conns.resize_with(fd as usize + 1, || None);
            }
            self.conns[fd as usize] = Some(Conn::default());
        }
    }

    /// Reads until the socket would block; handles what came.
    fn read(&mut self, fd: RawFd) {
        loop {
            let mut buf = std::mem::take(&mut self.scratch);
            buf.resize(64 * 1024, 0);
            // SAFETY: reading into our buffer of that length.
            let n = unsafe { libc::read(fd, buf.as_mut_ptr().cast(), buf.len()) };
            if n == 0
                || (n < 0
                    && std::io::Error::last_os_error().kind() != std::io::ErrorKind::WouldBlock)
            {
                self.scratch = buf;
                return self.drop_conn(fd);
            }
            if n < 0 {
                self.scratch = buf;
                return;
            }
            buf.truncate(n as usize);
            let Some(kept) = self.conn(fd).map(|c| std::mem::take(&mut c.rbuf)) else {
                self.scratch = buf;
                return;
            };
            let mut data = if kept.is_empty() {
                buf
            } else {
                let mut kept = kept;
                kept.extend_from_slice(&buf);
                buf.clear();
                self.scratch = buf;
                kept
            };
            let used = self.handle(fd, &mut data);
            let Some(c) = self.conn(fd) else { return };
            if used < data.len() {
                c.rbuf = data[used..].to_vec();
            }
            if self.scratch.capacity() < data.capacity() {
                data.clear();
                self.scratch = data;
            }
        }
    }

    /// Handles the request or the frames at the start of `data`; returns how much it used.
    fn handle(&mut self, fd: RawFd, data: &mut [u8]) -> usize {
        let mut used = 0;
        if !self.conn(fd).is_some_and(|c| c.upgraded) {
            let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
                return 0;
            };
            let head = String::from_utf8_lossy(&data[..end]).into_owned();
            used = end + 4;
            let path = head.split_whitespace().nth(1).unwrap_or("");
            let key = head.lines().find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("sec-websocket-key")
                    .then(|| value.trim().to_owned())
            });
            let (Some(route), Some(key)) = (Route::parse(path), key) else {
                if let Some(c) = self.conn(fd) {
                    c.out.extend_from_slice(
                        b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\nConnection: close\r\n\r\n",
                    );
                    c.closing = true;
                }
                self.mark(fd);
                return data.len();
            };
            let accept = base64::engine::general_purpose::STANDARD
                .encode(Sha1::digest(format!("{key}{GUID}").as_bytes()));
            let topic = match route {
                Route::Echo => None,
                Route::PubSub(name) => {
                    let next = self.topics.len();
                    let t = *self.names.entry(name).or_insert(next);
                    if t == next {
                        self.topics.push(Topic::default());
                    }
                    let end = self.topics[t].end();
                    self.topics[t].subscribers.push((fd, end));
                    Some(t)
                }
            };
            if let Some(c) = self.conn(fd) {
                let _ = write!(
                    c.out,
                    "HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n"
                );
                c.upgraded = true;
                c.topic = topic;
            }
            self.mark(fd);
        }
        while let Some((opcode, payload, len)) = frame(&mut data[used..]) {
            if len - payload.start > MAX_MESSAGE_SIZE {
                self.drop_conn(fd);
                return data.len();
            }
            let payload = &data[used + payload.start..used + payload.end];
            let topic = self.conn(fd).and_then(|c| c.topic);
            match (opcode, topic) {
                (0..=2, Some(t)) => {
                    if self.topics[t].log.is_empty() {
                        self.dirty_topics.push(t);
                    }
                    encode(&mut self.topics[t].log, opcode, payload);
                    if self.publishers.last() != Some(&fd) {
                        self.publishers.push(fd);
                    }
                }
                (0..=2, None) => {
                    if let Some(c) = self.conn(fd) {
                        encode(&mut c.out, opcode, payload);
                    }
                    self.mark(fd);
                }
                (9, _) => {
                    if let Some(c) = self.conn(fd) {
                        encode(&mut c.out, 10, payload);
                    }
                    self.mark(fd);
                }
                (8, _) => {
                    if let Some(c) = self.conn(fd) {
                        encode(&mut c.out, 8, payload.get(..2).unwrap_or_default());
                        c.closing = true;
                    }
                    self.mark(fd);
                    return data.len();
                }
                _ => {}
            }
            used += len;
        }
        used
    }

    /// Writes what `fd` has queued, with `extra` (a topic's batch) after it, in one call.
    fn write(&mut self, fd: RawFd, extra: &[u8]) {
        let Some(c) = self.conn(fd) else { return };
        let total = c.out.len() + extra.len();
        let n = send(fd, &[&c.out, extra]);
        if n < c.out.len() {
            c.out.drain(..n);
            c.out.extend_from_slice(extra);
        } else {
            let rest = &extra[n - c.out.len()..];
            c.out.clear();
            c.out.extend_from_slice(rest);
        }
        if c.out.is_empty() && c.out.capacity() > 4096 {
            c.out = Vec::new();
        }
        if n == total && c.closing {
            self.drop_conn(fd);
        }
    }

    /// Writes each publisher of the turn what it has not had of a topic's `log` (which
    /// starts at offset `base`).
    fn write_publishers(
        &mut self,
        publishers: &[RawFd],
        subscribers: &mut [(RawFd, u64)],
        log: &[u8],
        base: u64,
    ) {
        let end = base + log.len() as u64;
        for &p in publishers {
            if let Some(at) = subscribers.iter().position(|&(fd, _)| fd == p)
                && subscribers[at].1 < end
            {
                self.write(p, &log[(subscribers[at].1 - base) as usize..]);
                subscribers[at].1 = end;
            }
        }
    }

    /// The end of a turn: up to [`WRITE_BATCH`] subscribers of the topics with frames
    /// to send get one write each with everything published since their last one; then
    /// every reply. A topic whose every subscriber has everything leaves the list.
    fn flush(&mut self) {
        let mut budget = WRITE_BATCH;
        let publishers = std::mem::take(&mut self.publishers);
        let mut active = std::mem::take(&mut self.dirty_topics);
        let mut still = Vec::new();
        for t in active.drain(..) {
            let mut log = std::mem::take(&mut self.topics[t].log);
            let (base, end) = (self.topics[t].base, self.topics[t].base + log.len() as u64);
            let mut subscribers = std::mem::take(&mut self.topics[t].subscribers);
            let mut cursor = self.topics[t].cursor;
            let mut visited = 0;
            // A pass that spans turns: the publishers' copies first, as wsring writes them
            // (their next messages then arrive before the turn ends); else last, below.
            let spans = subscribers.len() > budget;
            if spans {
                self.write_publishers(&publishers, &mut subscribers, &log, base);
            }
            while budget > 0 && visited < subscribers.len() {
                if cursor >= subscribers.len() {
                    cursor = 0;
                }
                let (fd, offset) = subscribers[cursor];
                if offset < end {
                    if let Some(c) = self.conn(fd) {
                        c.dirty = false;
                    }
                    self.write(fd, &log[(offset - base) as usize..]);
                    subscribers[cursor].1 = end;
                    budget -= 1;
                }
                cursor += 1;
                visited += 1;
            }
            if !spans {
                self.write_publishers(&publishers, &mut subscribers, &log, base);
            }
            // Those the writes closed are gone from the connection table, not the list.
            let conns = &self.conns;
            subscribers.retain(|&(fd, _)| conns.get(fd as usize).is_some_and(Option::is_some));
            let low = subscribers.iter().map(|&(_, o)| o).min().unwrap_or(end);
            log.drain(..(low - base) as usize);
            let topic = &mut self.topics[t];
            topic.base = low;
            topic.log = log;
            topic.subscribers = subscribers;
            topic.cursor = cursor;
            if low < end {
                still.push(t);
            }
        }
        self.dirty_topics = still;
        for fd in std::mem::take(&mut self.dirty_conns) {
            match self.conn(fd) {
                Some(c) if c.dirty => c.dirty = false,
                _ => continue,
            }
            self.write(fd, &[]);
        }
    }
}

fn main() -> std::io::Result<()> {
    let args = Args::parse();
    let listener = TcpListener::bind(args.listen)?;
    listener.set_nonblocking(true)?;
    println!("listening on ws://{}", listener.local_addr()?);
    // SAFETY: epoll_create1 has no memory preconditions.
    let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
    let mut ev = libc::epoll_event {
        events: libc::EPOLLIN as u32,
        u64: LISTENER,
    };
    // SAFETY: registering our listener.
    unsafe { libc::epoll_ctl(epfd, libc::EPOLL_CTL_ADD, listener.as_raw_fd(), &mut ev) };
    let mut server = Server {
        epfd,
        conns: Vec::new(),
        topics: Vec::new(),
        names: HashMap::new(),
        dirty_topics: Vec::new(),
        publishers: Vec::new(),
        dirty_conns: Vec::new(),
        scratch: Vec::new(),
    };
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 1024];
    loop {
        // Do not sleep while a pass over a topic is unfinished.
        let timeout = if server.dirty_topics.is_empty() {
            -1
        } else {
            0
        };
        // SAFETY: waiting into our events buffer of that length.
        let n =
            unsafe { libc::epoll_wait(epfd, events.as_mut_ptr(), events.len() as i32, timeout) };
        for ev in events.iter().take(usize::try_from(n).unwrap_or(0)) {
            let (token, bits) = (ev.u64, ev.events);
            if token == LISTENER {
                server.accept(&listener);
                continue;
            }
            let fd = token as RawFd;
            if bits & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLERR | libc::EPOLLHUP) as u32
                != 0
            {
                server.read(fd);
            }
            if bits & libc::EPOLLOUT as u32 != 0
                && server.conn(fd).is_some_and(|c| !c.out.is_empty())
            {
                server.mark(fd);
            }
        }
        server.flush();
    }
}
