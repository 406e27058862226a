//! Fan-out to permessage-deflate subscribers (issue 16): the server's CPU per delivery
//! when every subscriber negotiated deflate (each broadcast compressed once per worker)
//! against the same fan-out to plain subscribers, and the bytes each delivery puts on the
//! wire.
//!
//! N raw subscribers (tokio tasks reading frames) join `/pubsub/<topic>`, offering
//! permessage-deflate or not; one publisher (plain) sends a changing JSON message of 1-4 KB
//! (an order book: prices and sizes move) at a fixed rate for S seconds. Subscribers count
//! frames and bytes; the first one inflates and parses every message it gets, so what is
//! measured is also checked. With `--server-pid` the server's CPU seconds come from
//! /proc/PID/stat.
//!
//! ```sh
//! cargo bench --bench deflate_fanout -- --target 127.0.0.1:9001 --server-pid PID \
//!     --subscribers 1000 --deflate on --rate 500 --seconds 5
//! ```
//! `scripts/deflate-bench.sh` runs it against `wsring serve`, deflate on and off, in
//! turn. Without `--target` it starts an in-process server (one worker).

mod support;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Opts {
    target: Option<SocketAddr>,
    server_pid: Option<u32>,
    subscribers: usize,
    deflate: bool,
    rate: u64,
    seconds: u64,
}

fn opts() -> Opts {
    let mut o = Opts {
        target: None,
        server_pid: None,
        subscribers: 1_000,
        deflate: true,
        rate: 500,
        seconds: 5,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--target" => o.target = Some(value().parse().expect("--target ADDR")),
            "--server-pid" => o.server_pid = Some(value().parse().expect("--server-pid PID")),
            "--subscribers" => o.subscribers = value().parse().expect("--subscribers N"),
            "--deflate" => o.deflate = value() == "on",
            "--rate" => o.rate = value().parse().expect("--rate MSGS_PER_S"),
            "--seconds" => o.seconds = value().parse().expect("--seconds S"),
            "--bench" => {}
            other => panic!("unknown argument {other:?}"),
        }
    }
    o
}

/// Connects and upgrades; returns the stream and whether deflate was agreed.
async fn upgrade(addr: SocketAddr, path: &str, deflate: bool) -> (TcpStream, bool, Vec<u8>) {
    let mut s = TcpStream::connect(addr).await.expect("connect");
    s.set_nodelay(true).expect("nodelay");
    let ext = if deflate {
        "Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n"
    } else {
        ""
    };
    let req = format!(
        "GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n{ext}\r\n"
    );
    s.write_all(req.as_bytes()).await.expect("request");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        let n = s.read(&mut chunk).await.expect("read 101");
        assert!(n > 0, "closed during the upgrade");
        buf.extend_from_slice(&chunk[..n]);
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            assert!(head.starts_with("http/1.1 101"), "{head}");
            let agreed = head.contains("sec-websocket-extensions: permessage-deflate");
            return (s, agreed, buf[end + 4..].to_vec());
        }
    }
}

/// One header's length and the payload length, if `b` holds a whole header.
fn header(b: &[u8]) -> Option<(usize, usize)> {
    let len = *b.get(1)? & 0x7f;
    match len {
        126 => Some((4, u16::from_be_bytes([*b.get(2)?, *b.get(3)?]) as usize)),
        127 => {
            let mut v = [0u8; 8];
            v.copy_from_slice(b.get(2..10)?);
            Some((10, u64::from_be_bytes(v) as usize))
        }
        n => Some((2, n as usize)),
    }
}

fn inflate(z: &[u8]) -> Vec<u8> {
    let mut input = z.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut d = flate2::Decompress::new(false);
    let mut out = Vec::with_capacity(z.len() * 8 + 1024);
    loop {
        let at = d.total_in() as usize;
        let st = d
            .decompress_vec(&input[at..], &mut out, flate2::FlushDecompress::Sync)
            .expect("valid deflate from the server");
        let done = st == flate2::Status::StreamEnd || d.total_in() as usize == input.len();
        if done && out.len() < out.capacity() {
            return out;
        }
        out.reserve(out.capacity());
    }
}

#[derive(Default)]
struct Totals {
    frames: AtomicU64,
    bytes: AtomicU64,
    compressed: AtomicU64,
    checked: AtomicU64,
    closed: AtomicU64,
}

async fn subscriber(mut s: TcpStream, mut buf: Vec<u8>, check: bool, totals: Arc<Totals>) {
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        while let Some((h, len)) = header(&buf) {
            if buf.len() < h + len {
                break;
            }
            let b0 = buf[0];
            if b0 & 0x0f == 0x8 {
                // Closed by the server (a subscriber that fell behind, under the close
                // policy): counted, and this subscriber is done.
                totals.closed.fetch_add(1, Ordering::Relaxed);
                return;
            }
            totals.frames.fetch_add(1, Ordering::Relaxed);
            totals.bytes.fetch_add((h + len) as u64, Ordering::Relaxed);
            if b0 & 0x40 != 0 {
                totals.compressed.fetch_add(1, Ordering::Relaxed);
            }
            if check {
                let payload = &buf[h..h + len];
                let plain = if b0 & 0x40 != 0 {
                    inflate(payload)
                } else {
                    payload.to_vec()
                };
                let v: serde_json::Value = serde_json::from_slice(&plain).expect("JSON");
                assert_eq!(v["type"], "book");
                totals.checked.fetch_add(1, Ordering::Relaxed);
            }
            buf.drain(..h + len);
        }
        match s.read(&mut chunk).await {
            Ok(0) | Err(_) => return,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
        }
    }
}

/// A changing order book of about `target` bytes.
fn book(seq: u64, target: usize) -> Vec<u8> {
    let mut x = seq.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
    let mut next = move || {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        x
    };
    let mut m = format!(r#"{{"type":"book","symbol":"BTC-USD","seq":{seq},"bids":["#);
    while m.len() < target {
        m.push_str(&format!(
            "[\"{:.2}\",\"{:.4}\"],",
            97_000.0 + (next() % 100_000) as f64 / 100.0,
            (next() % 100_000) as f64 / 10_000.0
        ));
    }
    m.pop();
    m.push_str("]}");
    m.into_bytes()
}

/// A masked client text frame.
fn client_frame(payload: &[u8]) -> Vec<u8> {
    let mut f = vec![0x81u8];
    if payload.len() < 126 {
        f.push(0x80 | payload.len() as u8);
    } else {
        f.push(0x80 | 126);
        f.extend_from_slice(&(payload.len() as u16).to_be_bytes());
    }
    let key = [0x11u8, 0x22, 0x33, 0x44];
    f.extend_from_slice(&key);
    f.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    f
}

async fn run(addr: SocketAddr, o: &Opts) -> serde_json::Value {
    let topic = format!("zf{}", std::process::id());
    let path = format!("/pubsub/{topic}");
    let totals = Arc::new(Totals::default());
    let mut agreed = 0;
    for i in 0..o.subscribers {
        let (s, z, rest) = upgrade(addr, &path, o.deflate).await;
        agreed += usize::from(z);
        tokio::spawn(subscriber(s, rest, i == 0, totals.clone()));
    }
    let (publisher, _, _) = upgrade(addr, &path, false).await;
    // The publisher is a subscriber too: drain it (the server may close it for a full
    // queue, as any subscriber that falls behind: then publishing stops).
    let (mut rd, mut wr) = publisher.into_split();
    tokio::spawn(async move {
        let mut sink = vec![0u8; 64 * 1024];
        while let Ok(n) = rd.read(&mut sink).await {
            if n == 0 {
                break;
            }
        }
    });
    let publish = async {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let cpu0 = o.server_pid.and_then(support::cpu_seconds);
        let f0 = totals.frames.load(Ordering::Relaxed);
        let started = Instant::now();
        let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / o.rate.max(1)));
        let mut sent = 0u64;
        while started.elapsed() < Duration::from_secs(o.seconds) {
            tick.tick().await;
            let size = 1024 + (sent * 7919 % 3072) as usize;
            wr.write_all(&client_frame(&book(sent, size)))
                .await
                .expect("publish");
            sent += 1;
        }
        // Let the fan-out drain.
        let want = f0 + sent * o.subscribers as u64;
        let deadline = Instant::now() + Duration::from_secs(10);
        while totals.frames.load(Ordering::Relaxed) < want && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let wall = started.elapsed().as_secs_f64();
        let cpu = match (cpu0, o.server_pid.and_then(support::cpu_seconds)) {
            (Some(a), Some(b)) => Some(b - a),
            _ => None,
        };
        (sent, wall, cpu, totals.frames.load(Ordering::Relaxed) - f0)
    };
    let (sent, wall, cpu, delivered) = publish.await;
    let frames = totals.frames.load(Ordering::Relaxed);
    serde_json::json!({
        "bench": "deflate_fanout",
        "deflate": o.deflate,
        "subscribers": o.subscribers,
        "agreed": agreed,
        "published": sent,
        "delivered": delivered,
        "expected": sent * o.subscribers as u64,
        "compressed_frames": totals.compressed.load(Ordering::Relaxed),
        "checked_by_the_first": totals.checked.load(Ordering::Relaxed),
        "closed_by_server": totals.closed.load(Ordering::Relaxed),
        "wire_bytes_per_delivery": totals.bytes.load(Ordering::Relaxed) as f64 / frames.max(1) as f64,
        "wall_s": wall,
        "server_cpu_s": cpu,
        "server_cpu_s_per_million": cpu.map(|c| c * 1e6 / delivered.max(1) as f64),
    })
}

fn main() {
    let o = opts();
    let _own;
    let addr = match o.target {
        Some(a) => a,
        None => {
            let server = support::serve_in_process();
            let a = server.local_addr();
            _own = server;
            a
        }
    };
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    println!("{}", rt.block_on(run(addr, &o)));
}
