//! `wsring-load`: a WebSocket load generator that speaks the bench protocol (docs/PROTOCOL.md)
//! against any server, so servers can be compared side by side in one run.
//!
//! Modes (`--mode`): `echo`, `fanout`, `idle`, `handshake`; `--scenario NAME` fills in the
//! shapes of BENCH_PROTOCOL.md's table. Every client frame is masked with a fresh random
//! key; every upgrade's `Sec-WebSocket-Accept` is checked; every echoed or delivered
//! message is checked for opcode, length, content and order — a loss, gap, reorder or
//! corruption is counted and reported, never hidden.
//!
//! It is efficient enough not to be the bottleneck: each process runs one edge-triggered
//! epoll loop with batched writes, and `--procs N` spreads the sockets over N child
//! processes (one process may hold at most 20,000 descriptors here). The parent starts the
//! children, waits until every child has its connections open (a barrier), measures the
//! server (`--server-pid`: CPU seconds from /proc/PID/stat, RSS from /proc/PID/status, and
//! the kernel's Slab from /proc/meminfo), releases the children, and prints one JSON line
//! of results at the end (and a progress line on stderr every second).
//!
//! Idle memory is measured from a cold server by default, as a server's first connections
//! arrive: its RSS before any connection (the base), after a first fill of a third of the
//! connections, and after all of them; the JSON has the RSS per connection over the base
//! and the slope between the two fills. `--warm-up` measures the old way instead (traffic
//! first, then one fill), which hides memory a first fill leaves resident.
//!
//! One file (about 1,200 lines): a standalone program whose modes share the client, the
//! barrier and the measurement code; nothing else links it.

use std::collections::VecDeque;
use std::io::{BufRead, BufReader, Write};
use std::net::SocketAddr;
use std::process::{Command, ExitCode, Stdio};
use std::time::{Duration, Instant};

use clap::{Parser, ValueEnum};
use wsring::proto::frame::{FrameHeader, OpCode, Parsed};
use wsring::proto::handshake::accept_key;
use wsring::proto::mask::unmask;

#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Mode {
    Echo,
    Fanout,
    Idle,
    Handshake,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Scenario {
    Echo,
    EchoLarge,
    Fanout,
    FanoutWide,
    Idle,
    Handshake,
}

#[derive(Parser, Debug, Clone)]
#[command(
    name = "wsring-load",
    version,
    about = "Load generator for servers that speak wsring's BENCH_PROTOCOL"
)]
struct Args {
    /// Server address.
    #[arg(long, default_value = "127.0.0.1:9001")]
    target: SocketAddr,
    /// Fan-out across nodes (several servers joined through a broker): another server's
    /// address; repeat for several. Subscribers are spread round robin over `--target`
    /// and these; the publisher stays on `--target`, so every message it publishes must
    /// reach the other nodes through the broker.
    #[arg(long = "also-target", value_name = "ADDR")]
    also_targets: Vec<SocketAddr>,
    /// A scenario of BENCH_PROTOCOL.md (sets mode, connections, size, window, duration;
    /// flags given explicitly still win).
    #[arg(long, value_enum)]
    scenario: Option<Scenario>,
    /// What to do.
    #[arg(long, value_enum, default_value_t = Mode::Echo)]
    mode: Mode,
    /// Connections (echo, idle), subscribers (fanout), or concurrent workers (handshake).
    #[arg(long)]
    connections: Option<usize>,
    /// Message size in bytes (at least 16: sequence number and timestamp).
    #[arg(long)]
    size: Option<usize>,
    /// Messages in flight per connection (echo) or outstanding at the publisher (fanout).
    #[arg(long)]
    window: Option<usize>,
    /// Measurement time in seconds (idle: how long to hold the connections).
    #[arg(long)]
    duration: Option<f64>,
    /// Processes to spread the sockets over.
    #[arg(long, default_value_t = 1)]
    procs: usize,
    /// PID of the server, to report its CPU seconds per million messages and its RSS.
    #[arg(long)]
    server_pid: Option<u32>,
    /// Pub/sub topic (fanout, and idle, whose connections subscribe to it).
    #[arg(long, default_value = "bench")]
    topic: String,
    /// Send text frames instead of binary.
    #[arg(long)]
    text: bool,
    /// Offer permessage-deflate (RFC 7692) on every connection. Where the server agrees,
    /// every message sent is compressed (level 1, no context kept) and every compressed
    /// message received is inflated before it is checked; message bodies are then
    /// compressible JSON-like text instead of random bytes (about 3x at level 1). The
    /// report counts the connections that agreed and the compressed messages received.
    #[arg(long)]
    deflate: bool,
    /// Idle: warm the server up first (traffic through 4 connections, then a pause) and
    /// open all connections at once: the marginal cost of a connection once per-worker
    /// buffers are touched. By default the idle figures are from a cold server: the base,
    /// the RSS per connection after the whole fill, and the slope between a first fill of
    /// a third and the whole.
    #[arg(long)]
    warm_up: bool,
    /// Internal: run as child `i` of `n` (spawned by the parent).
    #[arg(long, hide = true, num_args = 2)]
    child: Option<Vec<usize>>,
}

/// The resolved shape of a run.
#[derive(Debug, Clone, Copy)]
struct Shape {
    mode: Mode,
    connections: usize,
    size: usize,
    window: usize,
    duration: f64,
}

fn shape(a: &Args) -> Shape {
    let base = match a.scenario {
        Some(Scenario::Echo) => (Mode::Echo, 100, 32, 16, 5.0),
        Some(Scenario::EchoLarge) => (Mode::Echo, 10, 64 * 1024, 2, 5.0),
        Some(Scenario::Fanout) => (Mode::Fanout, 1000, 64, 64, 5.0),
        Some(Scenario::FanoutWide) => (Mode::Fanout, 10_000, 64, 16, 5.0),
        Some(Scenario::Idle) => (Mode::Idle, 15_000, 0, 0, 10.0),
        Some(Scenario::Handshake) => (Mode::Handshake, 32, 0, 0, 5.0),
        None => (a.mode, 100, 32, 16, 5.0),
    };
    Shape {
        mode: base.0,
        connections: a.connections.unwrap_or(base.1),
        size: a.size.unwrap_or(base.2).max(16),
        window: a.window.unwrap_or(base.3).max(1),
        duration: a.duration.unwrap_or(base.4),
    }
}

fn monotonic_ns() -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes into a valid local timespec.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A small xorshift generator for mask keys and handshake keys (seeded per process).
struct Rng(u64);

impl Rng {
    fn new() -> Rng {
        Rng(monotonic_ns() ^ (u64::from(std::process::id()) << 32) | 1)
    }
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Log-bucketed latency histogram (about 1.6% resolution), mergeable across processes.
#[derive(Clone)]
struct Histogram {
    counts: Vec<u64>,
}

const BUCKETS: usize = 2048;

impl Histogram {
    fn new() -> Histogram {
        Histogram {
            counts: vec![0; BUCKETS],
        }
    }
    fn bucket(ns: u64) -> usize {
        // 32 linear sub-buckets per power of two (about 3% resolution), integers only.
        let v = ns.max(1);
        let msb = 63 - v.leading_zeros() as usize;
        let sub = if msb >= 5 {
            ((v >> (msb - 5)) & 31) as usize
        } else {
            ((v << (5 - msb)) & 31) as usize
        };
        (msb * 32 + sub).min(BUCKETS - 1)
    }
    fn value(bucket: usize) -> u64 {
        let (msb, sub) = (bucket / 32, (bucket % 32) as u64);
        if msb >= 5 {
            ((32 + sub) << (msb - 5)) + (1u64 << (msb - 5)) / 2
        } else {
            (32 + sub) >> (5 - msb)
        }
    }
    fn record(&mut self, ns: u64) {
        self.counts[Self::bucket(ns)] += 1;
    }
    fn total(&self) -> u64 {
        self.counts.iter().sum()
    }
    fn percentile(&self, p: f64) -> u64 {
        let total = self.total();
        if total == 0 {
            return 0;
        }
        let want = ((total as f64) * p).ceil().max(1.0) as u64;
        let mut seen = 0;
        for (i, c) in self.counts.iter().enumerate() {
            seen += c;
            if seen >= want {
                return Self::value(i);
            }
        }
        0
    }
    fn max(&self) -> u64 {
        self.counts
            .iter()
            .rposition(|&c| c > 0)
            .map_or(0, Self::value)
    }
    fn encode(&self) -> String {
        self.counts
            .iter()
            .enumerate()
            .filter(|(_, c)| **c > 0)
            .map(|(i, c)| format!("{i}:{c}"))
            .collect::<Vec<_>>()
            .join(",")
    }
    fn merge_encoded(&mut self, s: &str) {
        for pair in s.split(',').filter(|p| !p.is_empty()) {
            if let Some((i, c)) = pair.split_once(':')
                && let (Ok(i), Ok(c)) = (i.parse::<usize>(), c.parse::<u64>())
                && i < BUCKETS
            {
                self.counts[i] += c;
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// The client: one epoll loop per process.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum St {
    Connecting,
    Upgrading,
    Open,
    Closing,
    Done,
}

struct Conn {
    fd: i32,
    st: St,
    key: String,
    rbuf: Vec<u8>,
    wbuf: VecDeque<u8>,
    /// Echo: next sequence to send / expected back. Fanout: next expected sequence.
    sent: u64,
    expect: u64,
    received: u64,
    publisher: bool,
    writable: bool,
    /// permessage-deflate was agreed.
    deflate: bool,
    /// The server may keep its compression context (it did not answer
    /// `server_no_context_takeover`): this connection's own inflater.
    inflater: Option<Box<flate2::Decompress>>,
}

#[derive(Default)]
struct Counters {
    upgrades: u64,
    messages: u64,
    errors: u64,
    bad_accept: u64,
    corrupt: u64,
    reordered: u64,
    gaps: u64,
    published: u64,
    closed_by_server: u64,
    deflate_agreed: u64,
    compressed_received: u64,
}

struct Client {
    epfd: i32,
    conns: Vec<Conn>,
    rng: Rng,
    shape: Shape,
    /// Where connections go: the publisher to the first, subscribers round robin.
    targets: Vec<SocketAddr>,
    /// How many subscribers were opened (for the round robin).
    opened: usize,
    path: String,
    text: bool,
    c: Counters,
    hist: Histogram,
    publishing: bool,
    measuring: bool,
    /// The process's one receive buffer.
    scratch: Vec<u8>,
    /// CLOCK_MONOTONIC in ns, read once per socket read and once per loop turn: the
    /// receive time of every message of one read and the send time of what it triggers.
    /// Reading the clock per message cost 14% of the tool's CPU in fan-out (a VM's vDSO).
    clock: u64,
    /// Reused buffers for building and masking outgoing payloads (no allocation per
    /// message).
    payload_buf: Vec<u8>,
    mask_buf: Vec<u8>,
    /// Connections touched in the current turn (reused).
    touched: Vec<usize>,
    /// `--deflate`: the codec (one per process; no context is kept between messages).
    deflate: Option<Box<Codec>>,
}

/// The load tool's permessage-deflate codec (flate2, independent of the server's).
struct Codec {
    compress: flate2::Compress,
    inflate: flate2::Decompress,
    /// Reused output buffers.
    out: Vec<u8>,
    plain: Vec<u8>,
}

/// The 4 bytes RFC 7692 §7.2.1 has a sender remove (and a receiver put back).
const DEFLATE_TAIL: [u8; 4] = [0, 0, 0xff, 0xff];

impl Codec {
    fn new() -> Codec {
        Codec {
            compress: flate2::Compress::new(flate2::Compression::new(1), false),
            inflate: flate2::Decompress::new(false),
            out: Vec::new(),
            plain: Vec::new(),
        }
    }

    /// Compresses one message (a fresh context each time) into `self.out`.
    fn compress(&mut self, payload: &[u8]) {
        self.compress.reset();
        self.out.clear();
        self.out.reserve(payload.len() + 64);
        loop {
            let at = self.compress.total_in() as usize;
            let _ = self.compress.compress_vec(
                payload.get(at..).unwrap_or_default(),
                &mut self.out,
                flate2::FlushCompress::Sync,
            );
            if self.out.len() < self.out.capacity() {
                break;
            }
            self.out.reserve(self.out.capacity());
        }
        if self.out.ends_with(&DEFLATE_TAIL) {
            self.out.truncate(self.out.len() - 4);
        }
    }
}

/// Inflates one message with `d` into `out` (cleared first); false if it is not valid
/// deflate data or inflates to more than 64 MiB.
fn inflate_into(d: &mut flate2::Decompress, z: &[u8], out: &mut Vec<u8>) -> bool {
    out.clear();
    for input in [z, &DEFLATE_TAIL[..]] {
        let start = d.total_in();
        loop {
            if out.len() == out.capacity() {
                if out.len() > 64 << 20 {
                    return false;
                }
                out.reserve(out.capacity().max(4096));
            }
            let at = (d.total_in() - start) as usize;
            let before = (d.total_in(), d.total_out());
            match d.decompress_vec(
                input.get(at..).unwrap_or_default(),
                out,
                flate2::FlushDecompress::Sync,
            ) {
                Ok(flate2::Status::StreamEnd) => return true,
                Ok(_) => {}
                Err(_) => return false,
            }
            let done = (d.total_in() - start) as usize >= input.len();
            let stuck = before == (d.total_in(), d.total_out());
            if (done || stuck) && out.len() < out.capacity() {
                break;
            }
        }
    }
    true
}

/// Size of the receive scratch buffer.
const SCRATCH: usize = 256 * 1024;

fn nonblocking_socket(target: SocketAddr) -> std::io::Result<i32> {
    let domain = if target.is_ipv4() {
        libc::AF_INET
    } else {
        libc::AF_INET6
    };
    // SAFETY: socket() has no memory preconditions; the result is checked.
    let fd = unsafe {
        libc::socket(
            domain,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let one: libc::c_int = 1;
    // SAFETY: setsockopt with a valid int option on our socket.
    unsafe {
        libc::setsockopt(
            fd,
            libc::IPPROTO_TCP,
            libc::TCP_NODELAY,
            (&raw const one).cast(),
            4,
        );
    }
    let addr: socket2::SockAddr = target.into();
    // SAFETY: addr points at a valid sockaddr of addr.len() bytes.
    let r = unsafe { libc::connect(fd, addr.as_ptr().cast(), addr.len()) };
    if r < 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() != Some(libc::EINPROGRESS) {
            // SAFETY: closing the socket we just made.
            unsafe { libc::close(fd) };
            return Err(e);
        }
    }
    Ok(fd)
}

impl Client {
    fn new(
        shape: Shape,
        targets: Vec<SocketAddr>,
        path: String,
        text: bool,
        deflate: bool,
    ) -> Client {
        // SAFETY: epoll_create1 has no memory preconditions.
        let epfd = unsafe { libc::epoll_create1(libc::EPOLL_CLOEXEC) };
        Client {
            epfd,
            conns: Vec::new(),
            rng: Rng::new(),
            shape,
            targets,
            opened: 0,
            path,
            text,
            c: Counters::default(),
            hist: Histogram::new(),
            publishing: false,
            measuring: false,
            scratch: Vec::new(),
            clock: monotonic_ns(),
            payload_buf: Vec::new(),
            mask_buf: Vec::new(),
            touched: Vec::new(),
            deflate: deflate.then(|| Box::new(Codec::new())),
        }
    }

    fn open(&mut self, publisher: bool) -> std::io::Result<usize> {
        let target = if publisher {
            self.targets[0]
        } else {
            self.opened += 1;
            self.targets[(self.opened - 1) % self.targets.len()]
        };
        let fd = nonblocking_socket(target)?;
        let mut raw = [0u8; 16];
        raw[..8].copy_from_slice(&self.rng.next().to_le_bytes());
        raw[8..].copy_from_slice(&self.rng.next().to_le_bytes());
        use base64::Engine as _;
        let key = base64::engine::general_purpose::STANDARD.encode(raw);
        let i = self.conns.len();
        let mut ev = libc::epoll_event {
            events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET) as u32,
            u64: i as u64,
        };
        // SAFETY: registering our socket with our epoll instance.
        unsafe { libc::epoll_ctl(self.epfd, libc::EPOLL_CTL_ADD, fd, &mut ev) };
        let ext = if self.deflate.is_some() {
            "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
        } else {
            ""
        };
        let req = format!(
            "GET {} HTTP/1.1\r\nHost: {}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {}\r\nSec-WebSocket-Version: 13\r\n{ext}\r\n",
            self.path, target, key
        );
        self.conns.push(Conn {
            fd,
            st: St::Connecting,
            key,
            rbuf: Vec::new(),
            wbuf: req.into_bytes().into(),
            sent: 0,
            expect: 0,
            received: 0,
            publisher,
            writable: false,
            deflate: false,
            inflater: None,
        });
        Ok(i)
    }

    /// Queues one masked client frame; a data message compressed (RSV1) on a connection
    /// that agreed permessage-deflate.
    fn queue_frame(&mut self, i: usize, op: OpCode, payload: &[u8]) {
        let key = (self.rng.next() as u32).to_ne_bytes();
        let mut codec = None;
        if self.conns[i].deflate && matches!(op, OpCode::Text | OpCode::Binary) {
            codec = self.deflate.take();
            if let Some(z) = codec.as_mut() {
                z.compress(payload);
            }
        }
        let payload = codec.as_ref().map_or(payload, |z| z.out.as_slice());
        let mut h = FrameHeader::whole(op, Some(key), payload.len() as u64);
        h.rsv1 = codec.is_some();
        let mut hb = [0u8; 14];
        let n = h.encode(&mut hb);
        let mut masked = std::mem::take(&mut self.mask_buf);
        masked.clear();
        masked.extend_from_slice(payload);
        unmask(&mut masked, key, 0);
        let c = &mut self.conns[i];
        c.wbuf.extend(&hb[..n]);
        c.wbuf.extend(&masked);
        self.mask_buf = masked;
        if codec.is_some() {
            self.deflate = codec;
        }
    }

    fn send_message(&mut self, i: usize) {
        let seq = self.conns[i].sent;
        self.conns[i].sent += 1;
        let mut p = std::mem::take(&mut self.payload_buf);
        p.clear();
        p.resize(self.shape.size, 0);
        p[..8].copy_from_slice(&seq.to_le_bytes());
        p[8..16].copy_from_slice(&self.clock.to_le_bytes());
        fill(&mut p[16..], seq);
        let op = if self.text {
            OpCode::Text
        } else {
            OpCode::Binary
        };
        if self.text {
            // Keep it valid UTF-8: the binary fields become hex-free ASCII digits.
            for b in &mut p[..] {
                *b = b'a' + (*b % 26);
            }
        }
        self.queue_frame(i, op, &p);
        self.payload_buf = p;
    }

    fn flush(&mut self, i: usize) {
        let c = &mut self.conns[i];
        while !c.wbuf.is_empty() {
            let (a, _) = c.wbuf.as_slices();
            // SAFETY: writing from a live slice to our socket.
            let r = unsafe {
                libc::send(
                    c.fd,
                    a.as_ptr().cast(),
                    a.len(),
                    libc::MSG_NOSIGNAL | libc::MSG_DONTWAIT,
                )
            };
            if r > 0 {
                c.wbuf.drain(..r as usize);
            } else {
                let e = std::io::Error::last_os_error().raw_os_error();
                if e == Some(libc::EAGAIN) || e == Some(libc::ENOTCONN) {
                    c.writable = false;
                } else {
                    self.c.errors += 1;
                    c.st = St::Done;
                }
                return;
            }
        }
    }

    fn close_conn(&mut self, i: usize) {
        let c = &mut self.conns[i];
        if c.fd >= 0 {
            // SAFETY: closing our own socket once (fd set to -1 after).
            unsafe { libc::close(c.fd) };
            c.fd = -1;
        }
        c.st = St::Done;
    }

    /// Handles readable bytes on connection `i`.
    fn on_readable(&mut self, i: usize) {
        // One scratch buffer per process: a connection keeps only an incomplete tail, so
        // thousands of subscribers cost no read buffer each.
        let mut scratch = std::mem::take(&mut self.scratch);
        scratch.resize(SCRATCH, 0);
        loop {
            let fd = self.conns[i].fd;
            if fd < 0 {
                break;
            }
            // SAFETY: reading into a live buffer of `scratch.len()` bytes from our socket.
            let r = unsafe { libc::read(fd, scratch.as_mut_ptr().cast(), scratch.len()) };
            if r > 0 {
                self.clock = monotonic_ns();
                let n = r as usize;
                if self.conns[i].rbuf.is_empty() {
                    let used = self.process(i, &scratch[..n]);
                    if self.conns[i].st != St::Done {
                        self.conns[i].rbuf.extend_from_slice(&scratch[used..n]);
                    }
                } else {
                    let mut buf = std::mem::take(&mut self.conns[i].rbuf);
                    buf.extend_from_slice(&scratch[..n]);
                    let used = self.process(i, &buf);
                    buf.drain(..used);
                    if self.conns[i].st != St::Done {
                        self.conns[i].rbuf = buf;
                    }
                }
                if n < scratch.len() {
                    break;
                }
            } else if r == 0 {
                if self.conns[i].st == St::Open {
                    self.c.closed_by_server += 1;
                }
                self.close_conn(i);
                break;
            } else {
                let e = std::io::Error::last_os_error().raw_os_error();
                if e != Some(libc::EAGAIN) {
                    self.c.errors += 1;
                    self.close_conn(i);
                }
                break;
            }
        }
        self.scratch = scratch;
    }

    /// Handles the bytes `data` of connection `i` (handshake answer, then frames) and
    /// returns how many it consumed; the caller keeps the rest for the next read.
    fn process(&mut self, i: usize, data: &[u8]) -> usize {
        let mut off = 0;
        if self.conns[i].st == St::Upgrading || self.conns[i].st == St::Connecting {
            let Some(end) = data.windows(4).position(|w| w == b"\r\n\r\n") else {
                return 0;
            };
            let head = String::from_utf8_lossy(&data[..end]).to_string();
            off = end + 4;
            let want = accept_key(&self.conns[i].key);
            let ok101 = head.starts_with("HTTP/1.1 101");
            let accept_ok = head.lines().any(|l| {
                l.split_once(':').is_some_and(|(n, v)| {
                    n.eq_ignore_ascii_case("sec-websocket-accept") && v.trim() == want
                })
            });
            if !ok101 {
                self.c.errors += 1;
                self.close_conn(i);
                return data.len();
            }
            if !accept_ok {
                self.c.bad_accept += 1;
            }
            if self.deflate.is_some() {
                let ext = head
                    .lines()
                    .filter_map(|l| l.split_once(':'))
                    .filter(|(n, _)| n.trim().eq_ignore_ascii_case("sec-websocket-extensions"))
                    .map(|(_, v)| v.to_ascii_lowercase())
                    .find(|v| v.contains("permessage-deflate"));
                if let Some(ext) = ext {
                    self.c.deflate_agreed += 1;
                    let c = &mut self.conns[i];
                    c.deflate = true;
                    if !ext.contains("server_no_context_takeover") {
                        c.inflater = Some(Box::new(flate2::Decompress::new(false)));
                    }
                }
            }
            self.c.upgrades += 1;
            self.conns[i].st = St::Open;
            self.on_open(i);
        }
        let rsv = if self.conns[i].deflate { 0b100 } else { 0 };
        loop {
            let rest = &data[off..];
            let (h, hl) = match FrameHeader::parse(rest, rsv) {
                Ok(Parsed::Complete { header, header_len }) => (header, header_len),
                Ok(Parsed::Incomplete { .. }) => break,
                Err(_) => {
                    self.c.corrupt += 1;
                    self.close_conn(i);
                    return data.len();
                }
            };
            let len = h.payload_len as usize;
            if rest.len() < hl + len {
                break;
            }
            off += hl + len;
            if h.rsv1 {
                self.on_compressed(i, h.opcode, &rest[hl..hl + len]);
            } else {
                self.on_frame(i, h.opcode, &rest[hl..hl + len]);
            }
            if self.conns[i].st == St::Done {
                return data.len();
            }
        }
        off
    }

    fn on_open(&mut self, i: usize) {
        match self.shape.mode {
            Mode::Handshake => {
                let mut p = 1000u16.to_be_bytes().to_vec();
                p.extend_from_slice(b"bye");
                self.queue_frame(i, OpCode::Close, &p);
                self.conns[i].st = St::Closing;
            }
            Mode::Echo if self.publishing => {
                for _ in 0..self.shape.window {
                    self.send_message(i);
                }
            }
            _ => {}
        }
    }

    /// A compressed data message (RSV1): inflated, then handled as any message; not
    /// deflate data is counted as corrupt.
    fn on_compressed(&mut self, i: usize, op: OpCode, z: &[u8]) {
        let Some(mut codec) = self.deflate.take() else {
            self.c.corrupt += 1;
            return;
        };
        let mut plain = std::mem::take(&mut codec.plain);
        let ok = match self.conns[i].inflater.as_mut() {
            Some(kept) => inflate_into(kept, z, &mut plain),
            None => {
                codec.inflate.reset(false);
                inflate_into(&mut codec.inflate, z, &mut plain)
            }
        };
        self.deflate = Some(codec);
        if ok && matches!(op, OpCode::Text | OpCode::Binary) {
            self.c.compressed_received += 1;
            self.on_message(i, op, &plain);
        } else {
            self.c.corrupt += 1;
        }
        if let Some(codec) = self.deflate.as_mut() {
            codec.plain = plain;
        }
    }

    fn on_frame(&mut self, i: usize, op: OpCode, payload: &[u8]) {
        match op {
            OpCode::Close => {
                if self.conns[i].st != St::Closing {
                    // Server-initiated: answer and count it.
                    self.queue_frame(i, OpCode::Close, payload.get(..2).unwrap_or(&[]));
                    self.flush(i);
                    self.c.closed_by_server += 1;
                }
                self.close_conn(i);
            }
            OpCode::Ping => self.queue_frame(i, OpCode::Pong, payload),
            OpCode::Pong | OpCode::Continuation => {}
            OpCode::Text | OpCode::Binary => self.on_message(i, op, payload),
        }
    }

    fn on_message(&mut self, i: usize, op: OpCode, payload: &[u8]) {
        let want_op = if self.text {
            OpCode::Text
        } else {
            OpCode::Binary
        };
        if op != want_op || payload.len() != self.shape.size {
            self.c.corrupt += 1;
            return;
        }
        let (seq, sent_at) = if self.text {
            (None, None)
        } else {
            let seq = u64::from_le_bytes(payload[..8].try_into().unwrap_or([0; 8]));
            let at = u64::from_le_bytes(payload[8..16].try_into().unwrap_or([0; 8]));
            if !check_fill(&payload[16..], seq) {
                self.c.corrupt += 1;
            }
            (Some(seq), Some(at))
        };
        let c = &mut self.conns[i];
        if let Some(seq) = seq {
            match seq.cmp(&c.expect) {
                std::cmp::Ordering::Equal => {}
                std::cmp::Ordering::Greater => self.c.gaps += seq - c.expect,
                std::cmp::Ordering::Less => self.c.reordered += 1,
            }
            c.expect = seq + 1;
        } else {
            c.expect += 1;
        }
        c.received += 1;
        if self.measuring {
            self.c.messages += 1;
            if let Some(at) = sent_at {
                self.hist.record(self.clock.saturating_sub(at));
            }
        }
        match self.shape.mode {
            Mode::Echo if self.publishing => self.send_message(i),
            Mode::Fanout if self.conns[i].publisher => self.pump_publisher(i),
            _ => {}
        }
    }

    fn pump_publisher(&mut self, i: usize) {
        if !self.publishing {
            return;
        }
        let c = &self.conns[i];
        let outstanding = c.sent - c.received.min(c.sent);
        for _ in outstanding..self.shape.window as u64 {
            self.send_message(i);
            self.c.published += 1;
        }
    }

    /// One epoll turn (up to `timeout_ms`).
    fn turn(&mut self, events: &mut [libc::epoll_event], timeout_ms: i32) {
        // SAFETY: events is a valid buffer of events.len() entries.
        let n = unsafe {
            libc::epoll_wait(
                self.epfd,
                events.as_mut_ptr(),
                events.len() as i32,
                timeout_ms,
            )
        };
        self.clock = monotonic_ns();
        let mut touched = std::mem::take(&mut self.touched);
        touched.clear();
        for ev in events.iter().take(n.max(0) as usize) {
            let (flags, i) = (ev.events, ev.u64 as usize);
            if i >= self.conns.len() || self.conns[i].st == St::Done {
                continue;
            }
            if flags & libc::EPOLLOUT as u32 != 0 {
                self.conns[i].writable = true;
                if self.conns[i].st == St::Connecting {
                    self.conns[i].st = St::Upgrading;
                }
            }
            if flags & (libc::EPOLLERR as u32) != 0 {
                self.c.errors += 1;
                self.close_conn(i);
                continue;
            }
            if flags & (libc::EPOLLIN | libc::EPOLLRDHUP | libc::EPOLLHUP) as u32 != 0 {
                self.on_readable(i);
            }
            touched.push(i);
        }
        for &i in &touched {
            if self.conns[i].st != St::Done && !self.conns[i].wbuf.is_empty() {
                self.flush(i);
            }
        }
        self.touched = touched;
    }

    fn flush_all(&mut self) {
        for i in 0..self.conns.len() {
            if self.conns[i].st != St::Done && !self.conns[i].wbuf.is_empty() {
                self.flush(i);
            }
        }
    }

    fn open_count(&self) -> usize {
        self.conns.iter().filter(|c| c.st == St::Open).count()
    }
}

/// A fixed pseudo-random table; message bodies are windows of it chosen by the sequence
/// number, so a receiver checks a body with one comparison and no allocation.
/// With `--deflate` the table is JSON-like text (prices and sizes of an order book), which
/// compresses as real payloads do.
fn fill_table() -> &'static [u8] {
    static TABLE: std::sync::OnceLock<Vec<u8>> = std::sync::OnceLock::new();
    TABLE.get_or_init(|| {
        if COMPRESSIBLE.get().copied().unwrap_or(false) {
            let mut x = 0x9E37_79B9_7F4A_7C15u64;
            let mut t = String::with_capacity(256 + 1024 * 1024 + 64);
            while t.len() < 256 + 1024 * 1024 {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                t.push_str(&format!(
                    r#"{{"px":"{}.{:02}","sz":"{}.{:04}","side":"{}"}},"#,
                    97_000 + x % 500,
                    (x >> 9) % 100,
                    (x >> 17) % 10,
                    (x >> 21) % 10_000,
                    if (x >> 40) & 1 == 0 { "buy" } else { "sell" }
                ));
            }
            return t.into_bytes();
        }
        let mut x = 0x9E37_79B9_7F4A_7C15u64;
        (0..256 + 1024 * 1024)
            .map(|_| {
                x ^= x << 7;
                x ^= x >> 9;
                x as u8
            })
            .collect()
    })
}

/// Whether message bodies are compressible text (`--deflate`); set once, before the first
/// body is made.
static COMPRESSIBLE: std::sync::OnceLock<bool> = std::sync::OnceLock::new();

fn fill_window(seq: u64, len: usize) -> &'static [u8] {
    let t = fill_table();
    let start = (seq.wrapping_mul(0x9E37_79B9) % 251) as usize;
    let len = len.min(t.len() - start);
    &t[start..start + len]
}

/// Deterministic filler for message bodies, checked on receipt.
fn fill(buf: &mut [u8], seq: u64) {
    let w = fill_window(seq, buf.len());
    buf[..w.len()].copy_from_slice(w);
}

fn check_fill(body: &[u8], seq: u64) -> bool {
    let w = fill_window(seq, body.len());
    w.len() == body.len() && w == body
}

// ---------------------------------------------------------------------------------------
// Child process: opens its share of connections, reports READY, waits for GO, runs.

/// Opens connections until `n` have been opened by `client` and none is still upgrading
/// (or the deadline passes).
fn open_upto(client: &mut Client, events: &mut [libc::epoll_event], n: usize, deadline: Instant) {
    loop {
        let in_progress = client
            .conns
            .iter()
            .filter(|c| matches!(c.st, St::Connecting | St::Upgrading))
            .count();
        if (client.opened >= n && in_progress == 0) || Instant::now() > deadline {
            break;
        }
        // At most 256 handshakes in progress: a burst beyond the listen backlog only
        // makes SYN retries.
        let mut budget = 256usize.saturating_sub(in_progress);
        while client.opened < n && budget > 0 {
            // `open` counts the attempt in `opened`, failed or not.
            if client.open(false).is_err() {
                client.c.errors += 1;
            }
            budget -= 1;
        }
        client.flush_all();
        client.turn(events, 10);
    }
}

fn child(args: &Args, index: usize, procs: usize) -> ExitCode {
    let shape = shape(args);
    let per = |total: usize| total / procs + usize::from(index < total % procs);
    let path = match shape.mode {
        // Idle connections are subscribers, as a pub/sub server's idle clients are: their
        // topic membership is part of what they cost.
        Mode::Fanout | Mode::Idle => format!("/pubsub/{}", args.topic),
        _ => "/echo".to_string(),
    };
    let targets: Vec<SocketAddr> = std::iter::once(args.target)
        .chain(args.also_targets.iter().copied())
        .collect();
    let mut client = Client::new(shape, targets, path, args.text, args.deflate);
    let mut events = vec![libc::epoll_event { events: 0, u64: 0 }; 4096];
    let stdin = std::io::stdin();
    let mut out = std::io::stdout();
    let started = Instant::now();

    if shape.mode == Mode::Handshake {
        let _ = writeln!(out, "READY");
        let _ = out.flush();
        let mut line = String::new();
        let _ = stdin.lock().read_line(&mut line);
        let workers = per(shape.connections);
        let deadline = Instant::now() + Duration::from_secs_f64(shape.duration);
        let mut active = 0usize;
        client.measuring = true;
        let t0 = Instant::now();
        let mut last_report = Instant::now();
        let mut done_before = 0u64;
        while Instant::now() < deadline {
            while active < workers {
                if client.open(false).is_err() {
                    client.c.errors += 1;
                    break;
                }
                active += 1;
            }
            client.flush_all();
            client.turn(&mut events, 5);
            // Recycle finished connections: their slots keep the vector bounded.
            let finished = client.conns.iter().filter(|c| c.st == St::Done).count();
            if finished > 0 {
                client.conns.retain(|c| c.st != St::Done);
                // Re-register remaining sockets under their new indexes.
                for (i, c) in client.conns.iter().enumerate() {
                    let mut ev = libc::epoll_event {
                        events: (libc::EPOLLIN | libc::EPOLLOUT | libc::EPOLLRDHUP | libc::EPOLLET)
                            as u32,
                        u64: i as u64,
                    };
                    // SAFETY: modifying our registered socket's token.
                    unsafe { libc::epoll_ctl(client.epfd, libc::EPOLL_CTL_MOD, c.fd, &mut ev) };
                }
                active = client.conns.len();
            }
            if last_report.elapsed() >= Duration::from_secs(1) {
                let _ = writeln!(out, "P {}", client.c.upgrades - done_before);
                done_before = client.c.upgrades;
                let _ = out.flush();
                last_report = Instant::now();
            }
        }
        let elapsed = t0.elapsed().as_secs_f64();
        report(&mut out, &client, elapsed, client.c.upgrades);
        return ExitCode::SUCCESS;
    }

    // Open this child's share of connections (the publisher is in child 0).
    let n = per(shape.connections);
    let publisher = if shape.mode == Mode::Fanout && index == 0 {
        client.open(true).ok()
    } else {
        None
    };
    let connect_deadline = Instant::now() + Duration::from_secs(60);
    if shape.mode == Mode::Idle && !args.warm_up {
        // Cold idle: a first fill of a third, reported, then (when the parent has measured
        // the server) the rest, so the parent sees the slope between two fills.
        let first = per(shape.connections / 3);
        open_upto(&mut client, &mut events, first, connect_deadline);
        let _ = writeln!(out, "FILL {}", client.open_count());
        let _ = out.flush();
        let mut line = String::new();
        let _ = stdin.lock().read_line(&mut line);
    }
    open_upto(&mut client, &mut events, n, connect_deadline);
    let _ = writeln!(
        out,
        "READY {} {:.3}",
        client.open_count(),
        started.elapsed().as_secs_f64()
    );
    let _ = out.flush();
    // Keep answering pings while waiting for the go-ahead.
    let (tx, rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let mut line = String::new();
        let _ = std::io::stdin().lock().read_line(&mut line);
        let _ = tx.send(());
    });
    while rx.try_recv().is_err() {
        client.turn(&mut events, 20);
        client.flush_all();
    }
    client.measuring = true;
    client.publishing = true;
    client.clock = monotonic_ns();
    let t0 = Instant::now();
    match shape.mode {
        Mode::Echo => {
            for i in 0..client.conns.len() {
                if client.conns[i].st == St::Open {
                    for _ in 0..shape.window {
                        client.send_message(i);
                    }
                }
            }
        }
        Mode::Fanout => {
            if let Some(p) = publisher {
                client.pump_publisher(p);
            }
        }
        _ => {}
    }
    client.flush_all();
    let deadline = t0 + Duration::from_secs_f64(shape.duration);
    let mut last_report = Instant::now();
    let mut last_count = 0;
    while Instant::now() < deadline {
        client.turn(&mut events, 10);
        if last_report.elapsed() >= Duration::from_secs(1) {
            let _ = writeln!(out, "P {}", client.c.messages - last_count);
            last_count = client.c.messages;
            let _ = out.flush();
            last_report = Instant::now();
        }
    }
    let elapsed = t0.elapsed().as_secs_f64();
    // Stop sending; let what is in flight arrive (it is not counted in the rate).
    client.publishing = false;
    let measured = client.c.messages;
    client.measuring = false;
    let drain = Instant::now() + Duration::from_secs(2);
    while Instant::now() < drain {
        client.turn(&mut events, 10);
    }
    if shape.mode == Mode::Idle {
        // Idle: the number that matters is how many stayed open.
        client.c.messages = client.open_count() as u64;
    } else {
        client.c.messages = measured;
    }
    report(&mut out, &client, elapsed, measured);
    ExitCode::SUCCESS
}

fn report(out: &mut impl Write, client: &Client, elapsed: f64, counted: u64) {
    let c = &client.c;
    // Fanout losses: every subscriber must have received every published message.
    let received: u64 = client.conns.iter().map(|c| c.received).sum();
    let subs = client.conns.len() as u64;
    let _ = writeln!(
        out,
        "R {elapsed:.6} {counted} {} {} {} {} {} {} {} {} {} {received} {subs} {} {} {} H{}",
        c.upgrades,
        c.errors,
        c.bad_accept,
        c.corrupt,
        c.reordered,
        c.gaps,
        c.published,
        c.closed_by_server,
        client.open_count(),
        client
            .conns
            .iter()
            .filter(|c| c.publisher)
            .map(|c| c.sent)
            .sum::<u64>(),
        c.deflate_agreed,
        c.compressed_received,
        client.hist.encode()
    );
    let _ = out.flush();
}

// ---------------------------------------------------------------------------------------
// Parent: spawns children, measures the server, aggregates.

struct ServerSample {
    cpu_s: f64,
    rss_kb: u64,
    /// The anonymous part of the RSS (heap, arenas, rings: what connections allocate).
    rss_anon_kb: u64,
    /// The file-backed part (mostly the executable's code pages, mapped as first run).
    rss_file_kb: u64,
}

fn sample_server(pid: u32) -> Option<ServerSample> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let f: Vec<&str> = after.split_whitespace().collect();
    // Fields after the command: state is [0]; utime is field 14 overall -> [11], stime [12].
    let utime: f64 = f.get(11)?.parse().ok()?;
    let stime: f64 = f.get(12)?.parse().ok()?;
    // SAFETY: sysconf has no memory preconditions.
    let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find(|l| l.starts_with(name))
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|v| v.parse().ok())
    };
    Some(ServerSample {
        cpu_s: (utime + stime) / hz,
        rss_kb: field("VmRSS:")?,
        rss_anon_kb: field("RssAnon:").unwrap_or(0),
        rss_file_kb: field("RssFile:").unwrap_or(0),
    })
}

fn slab_kb() -> u64 {
    std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find(|l| l.starts_with("Slab:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

fn parent(args: &Args) -> ExitCode {
    let shape = shape(args);
    let procs = args.procs.max(1);
    let exe = match std::env::current_exe() {
        Ok(e) => e,
        Err(e) => {
            eprintln!("wsring-load: cannot find own executable: {e}");
            return ExitCode::FAILURE;
        }
    };
    if shape.mode == Mode::Idle && args.warm_up {
        // Warm-up: push traffic through one connection first, so the server's per-worker
        // buffers (receive buffer ring, completion queue, allocator arenas) are already
        // touched when the baseline is taken; the idle figure is then the marginal cost of
        // a connection, not the first touch of fixed per-core memory.
        let warm = Command::new(&exe)
            .args(["--target", &args.target.to_string(), "--mode", "echo"])
            .args([
                "--connections",
                "4",
                "--size",
                "2048",
                "--window",
                "32",
                "--duration",
                "1",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        if !warm.is_ok_and(|s| s.success()) {
            eprintln!("wsring-load: warm-up against {} failed", args.target);
        }
    }
    if shape.mode == Mode::Idle && args.warm_up {
        // Let freed warm-up memory settle (allocators return pages after a delay).
        std::thread::sleep(Duration::from_secs(1));
    }
    let before_connect = args.server_pid.and_then(sample_server);
    let slab_before = slab_kb();
    let mut children = Vec::new();
    for i in 0..procs {
        let mut cmd = Command::new(&exe);
        cmd.args(std::env::args_os().skip(1))
            .arg("--child")
            .arg(i.to_string())
            .arg(procs.to_string())
            .stdin(Stdio::piped())
            .stdout(Stdio::piped());
        match cmd.spawn() {
            Ok(c) => children.push(c),
            Err(e) => {
                eprintln!("wsring-load: cannot start child: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    let mut readers: Vec<_> = children
        .iter_mut()
        .map(|c| BufReader::new(c.stdout.take().expect("piped stdout")))
        .collect();
    // Cold idle: every child reports its first fill; the server is measured there, then
    // the children open the rest.
    let mut first_fill = None;
    if shape.mode == Mode::Idle && !args.warm_up {
        let mut filled = 0u64;
        for r in readers.iter_mut() {
            let mut line = String::new();
            let _ = r.read_line(&mut line);
            filled += line
                .strip_prefix("FILL ")
                .and_then(|v| v.trim().parse::<u64>().ok())
                .unwrap_or(0);
        }
        std::thread::sleep(Duration::from_secs(1));
        first_fill = args
            .server_pid
            .and_then(sample_server)
            .map(|s| (filled, s.rss_kb));
        for c in children.iter_mut() {
            if let Some(stdin) = c.stdin.as_mut() {
                let _ = writeln!(stdin, "MORE");
                let _ = stdin.flush();
            }
        }
    }
    let mut ready_open = 0u64;
    for r in readers.iter_mut() {
        let mut line = String::new();
        let _ = r.read_line(&mut line);
        if let Some(n) = line
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse::<u64>().ok())
        {
            ready_open += n;
        }
    }
    if shape.mode == Mode::Idle {
        eprintln!(
            "wsring-load: {ready_open} connections open, holding {} s",
            shape.duration
        );
    }
    for c in children.iter_mut() {
        if let Some(stdin) = c.stdin.as_mut() {
            let _ = writeln!(stdin, "GO");
            let _ = stdin.flush();
        }
    }
    let start = args.server_pid.and_then(sample_server);
    // Idle: sample near the end of the hold, when the server has settled.
    let (connected, slab_connected) = if shape.mode == Mode::Idle {
        std::thread::sleep(Duration::from_secs_f64((shape.duration - 1.0).max(0.5)));
        (args.server_pid.and_then(sample_server), slab_kb())
    } else {
        (None, 0)
    };
    // Progress: one line per second, summed over children.
    let (tx, rx) = std::sync::mpsc::channel::<(usize, String)>();
    for (i, r) in readers.into_iter().enumerate() {
        let tx = tx.clone();
        std::thread::spawn(move || {
            for line in r.lines().map_while(Result::ok) {
                let _ = tx.send((i, line));
            }
        });
    }
    drop(tx);
    let mut results = Vec::new();
    let mut second = 0;
    let mut progress = vec![0u64; procs];
    let mut end_sample = None;
    while let Ok((i, line)) = rx.recv() {
        if let Some(n) = line.strip_prefix("P ") {
            progress[i] = n.trim().parse().unwrap_or(0);
            if i == 0 {
                second += 1;
                eprintln!(
                    "wsring-load: t={second}s {} per s",
                    progress.iter().sum::<u64>()
                );
            }
        } else if let Some(r) = line.strip_prefix("R ") {
            if end_sample.is_none() {
                end_sample = args.server_pid.and_then(sample_server);
            }
            results.push(r.to_string());
        }
    }
    for mut c in children {
        let _ = c.wait();
    }
    // Aggregate.
    let mut hist = Histogram::new();
    let mut sums = [0f64; 15];
    let mut elapsed: f64 = 0.0;
    for r in &results {
        let (nums, h) = r.split_once(" H").unwrap_or((r, ""));
        let v: Vec<f64> = nums
            .split_whitespace()
            .filter_map(|x| x.parse().ok())
            .collect();
        if let Some(e) = v.first() {
            elapsed = elapsed.max(*e);
        }
        for (s, x) in sums.iter_mut().zip(v.iter().skip(1)) {
            *s += x;
        }
        hist.merge_encoded(h);
    }
    let [
        counted,
        upgrades,
        errors,
        bad_accept,
        corrupt,
        reordered,
        gaps,
        published,
        closed_by_server,
        open_after,
        received,
        subs,
        pub_sent,
        deflate_agreed,
        compressed_received,
    ] = sums;
    let rate = if elapsed > 0.0 {
        counted / elapsed
    } else {
        0.0
    };
    let losses = if shape.mode == Mode::Fanout {
        // Every connection (publisher included) should have received every published message.
        (pub_sent * subs - received).max(0.0)
    } else {
        0.0
    };
    let (cpu_per_m, rss_before, rss_after) = match (&start, &end_sample) {
        (Some(a), Some(b)) if counted > 0.0 => (
            (b.cpu_s - a.cpu_s) / counted * 1e6,
            before_connect.as_ref().map_or(0, |s| s.rss_kb),
            b.rss_kb,
        ),
        _ => (0.0, 0, 0),
    };
    let idle = if shape.mode == Mode::Idle && ready_open > 0 {
        let rss_delta = connected
            .as_ref()
            .zip(before_connect.as_ref())
            .map_or(0.0, |(c, b)| {
                (c.rss_kb as f64 - b.rss_kb as f64) * 1024.0 / ready_open as f64
            });
        // The same growth split: anonymous memory per connection, and the file-backed
        // pages (code first run by the connection path: a fixed cost, not per connection).
        let (anon_delta, file_growth_kb) =
            connected
                .as_ref()
                .zip(before_connect.as_ref())
                .map_or((0.0, 0), |(c, b)| {
                    (
                        (c.rss_anon_kb as f64 - b.rss_anon_kb as f64) * 1024.0 / ready_open as f64,
                        c.rss_file_kb as i64 - b.rss_file_kb as i64,
                    )
                });
        let slab_delta = (slab_connected as f64 - slab_before as f64) * 1024.0 / ready_open as f64;
        // The slope between the first fill and the whole: what each further connection
        // costs, the fixed cost of the first ones left out.
        let slope = match (first_fill, connected.as_ref()) {
            (Some((n1, kb1)), Some(c)) if ready_open > n1 => format!(
                r#","first_fill_connections":{n1},"rss_kb_first_fill":{kb1},"rss_slope_bytes_per_conn":{:.1}"#,
                (c.rss_kb as f64 - kb1 as f64) * 1024.0 / (ready_open - n1) as f64
            ),
            _ => String::new(),
        };
        format!(
            r#","idle_connections":{ready_open},"cold":{},"rss_kb_base":{},"rss_kb_connected":{},"rss_bytes_per_conn":{rss_delta:.1},"rss_anon_bytes_per_conn":{anon_delta:.1},"rss_file_kb_growth":{file_growth_kb},"slab_bytes_per_conn":{slab_delta:.1}{slope}"#,
            !args.warm_up,
            before_connect.as_ref().map_or(0, |s| s.rss_kb),
            connected.as_ref().map_or(0, |s| s.rss_kb),
        )
    } else {
        String::new()
    };
    let _ = published;
    let unit = match shape.mode {
        Mode::Handshake => "upgrades_measured",
        Mode::Fanout => "deliveries",
        Mode::Idle => "open",
        Mode::Echo => "messages",
    };
    println!(
        r#"{{"mode":"{:?}","connections":{},"size":{},"window":{},"procs":{},"targets":{},"elapsed_s":{elapsed:.3},"{unit}":{counted},"rate_per_s":{rate:.1},"p50_us":{:.1},"p99_us":{:.1},"max_us":{:.1},"losses":{losses},"gaps":{gaps},"reordered":{reordered},"corrupt":{corrupt},"bad_accept":{bad_accept},"errors":{errors},"upgrades":{upgrades},"closed_by_server":{closed_by_server},"open_after":{open_after},"server_cpu_s_per_million":{cpu_per_m:.4},"server_rss_kb_before":{rss_before},"server_rss_kb_after":{rss_after},"deflate_agreed":{deflate_agreed},"compressed_received":{compressed_received}{idle}}}"#,
        shape.mode,
        shape.connections,
        shape.size,
        shape.window,
        procs,
        1 + args.also_targets.len(),
        hist.percentile(0.50) as f64 / 1e3,
        hist.percentile(0.99) as f64 / 1e3,
        hist.max() as f64 / 1e3,
    );
    let bad = losses > 0.0 || gaps > 0.0 || reordered > 0.0 || corrupt > 0.0 || bad_accept > 0.0;
    if bad {
        eprintln!("wsring-load: errors in the delivered data (see losses/gaps/reordered/corrupt)");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

fn main() -> ExitCode {
    let args = Args::parse();
    let _ = COMPRESSIBLE.set(args.deflate);
    // SAFETY: ignoring SIGPIPE process-wide (writes report EPIPE instead).
    unsafe { libc::signal(libc::SIGPIPE, libc::SIG_IGN) };
    match &args.child {
        Some(v) if v.len() == 2 => child(&args, v[0], v[1]),
        _ => parent(&args),
    }
}
