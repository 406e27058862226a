//! The broadcast engine and the embedding API, driven by real tokio-tungstenite clients
//! against an in-process server on 127.0.0.1, on both backends.

#[macro_use]
mod common;

use std::cell::Cell;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::tungstenite::Message as WsMessage;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use wsring::api::{Accept, Conn, Decision, Handler, HttpResponse, Message, Reject};
use wsring::engine::{BackendChoice, EngineConfig, Handle, Server};
use wsring::proto::OpCode;
use wsring::proto::handshake::{Request, Upgrade};
use wsring::{Policy, PublishReport};

// ---- a counting allocator: allocations per thread, so a handler can count its own ----

struct Counting;

thread_local! {
    static ALLOCS: Cell<u64> = const { Cell::new(0) };
}

// SAFETY: forwards every call to the system allocator unchanged; only counts.
unsafe impl std::alloc::GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: std::alloc::Layout) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { std::alloc::System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: std::alloc::Layout) {
        // SAFETY: same contract as ours.
        unsafe { std::alloc::System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: std::alloc::Layout, new: usize) -> *mut u8 {
        let _ = ALLOCS.try_with(|c| c.set(c.get() + 1));
        // SAFETY: same contract as ours.
        unsafe { std::alloc::System.realloc(ptr, layout, new) }
    }
}

#[global_allocator]
static GLOBAL: Counting = Counting;

fn allocs() -> u64 {
    ALLOCS.with(|c| c.get())
}

// ---- a test application ----

/// Routes: `/sub/<topic>` subscribes; messages on it are published to the topic (text
/// "unsub" unsubscribes, "measure" publishes once and reports the allocations it took);
/// `/auth?token=good` is the only way in on `/auth`; `/proto` picks the `v2` subprotocol.
#[derive(Clone, Default)]
struct App {
    opened: Arc<AtomicUsize>,
    closed: Arc<AtomicUsize>,
    last_close: Arc<AtomicU64>,
    publish_allocs: Arc<AtomicU64>,
    publish_queued: Arc<AtomicU64>,
    /// Allocations counted from a "measure" publish to the next "count": the publish, its
    /// hand-out at the end of the turn, the writes and their completions.
    turn_allocs: Arc<AtomicU64>,
    measured_at: Arc<AtomicU64>,
}

impl Handler for App {
    type Data = String;

    fn on_upgrade(&mut self, request: &Request, upgrade: &Upgrade) -> Decision<String> {
        if let Some(topic) = request.path.strip_prefix("/sub/") {
            return Decision::Accept(Accept::new(topic.to_string()).subscribe(topic));
        }
        match request.path.as_str() {
            "/auth" => {
                if request.query_param("token") == Some("good") {
                    Decision::Accept(Accept::new("room".to_string()).subscribe("room"))
                } else {
                    let mut r = Reject::status(401);
                    r.headers.push(("WWW-Authenticate".into(), "Token".into()));
                    Decision::Reject(r)
                }
            }
            "/proto" => match upgrade.select_protocol(&["v2", "v1"]) {
                Some(p) => Decision::Accept(Accept::new(String::new()).protocol(p)),
                None => Decision::Reject(Reject::status(400)),
            },
            _ => Decision::Reject(Reject::status(404)),
        }
    }

    fn on_http(&mut self, _request: &Request) -> Option<HttpResponse> {
        None
    }

    fn on_open(&mut self, _conn: &mut Conn<'_, String>) {
        self.opened.fetch_add(1, Ordering::SeqCst);
    }

    fn on_message(&mut self, conn: &mut Conn<'_, String>, message: Message) {
        let topic = conn.data().cloned().unwrap_or_default();
        match message.text() {
            Some("unsub") => {
                conn.unsubscribe(&topic);
                conn.send_text("unsubscribed");
            }
            Some("order") => {
                // Publishes to two topics, a direct send and membership changes in one
                // callback (one loop turn): each subscriber must see them in this order.
                conn.subscribe("ord-b");
                conn.publish("ord-a", OpCode::Text, b"1");
                conn.publish("ord-b", OpCode::Text, b"2");
                conn.publish("ord-a", OpCode::Text, b"3");
                conn.send_text("4");
                conn.publish("ord-a", OpCode::Text, b"5");
                conn.unsubscribe("ord-a");
                conn.publish("ord-a", OpCode::Text, b"6");
                conn.subscribe("ord-a");
                conn.publish("ord-a", OpCode::Text, b"7");
                conn.close(wsring::proto::CloseCode::Normal, "done");
            }
            Some("count") => {
                self.turn_allocs.store(
                    allocs() - self.measured_at.load(Ordering::SeqCst),
                    Ordering::SeqCst,
                );
            }
            Some("measure") => {
                let before = allocs();
                self.measured_at.store(before, Ordering::SeqCst);
                let report: PublishReport = conn.publish(&topic, OpCode::Binary, &[7u8; 64]);
                let after = allocs();
                self.publish_allocs.store(after - before, Ordering::SeqCst);
                self.publish_queued
                    .store(report.queued as u64, Ordering::SeqCst);
            }
            _ => {
                conn.publish(&topic, message.opcode, &message.payload);
            }
        }
    }

    fn on_close(
        &mut self,
        _conn: &mut Conn<'_, String>,
        code: wsring::proto::CloseCode,
        _reason: &str,
    ) {
        self.last_close
            .store(u64::from(u16::from(code)), Ordering::SeqCst);
        self.closed.fetch_add(1, Ordering::SeqCst);
    }
}

/// RSS is per process and the tests of this file run in parallel threads: they take this
/// lock one at a time, so one test's memory never shows in another's RSS bound.
static SERIAL: std::sync::Mutex<()> = std::sync::Mutex::new(());

struct Running {
    server: Option<Server>,
    _serial: std::sync::MutexGuard<'static, ()>,
    handle: Handle,
    port: u16,
    app: App,
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(s) = self.server.take() {
            s.handle().abort();
            s.join();
        }
    }
}

fn start(backend: BackendChoice, configure: impl FnOnce(&mut EngineConfig)) -> Running {
    let serial = SERIAL.lock().unwrap_or_else(|e| e.into_inner());
    let mut config = EngineConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        threads: 2,
        backend,
        pin_threads: false,
        ..EngineConfig::default()
    };
    configure(&mut config);
    let app = App::default();
    let a = app.clone();
    let server = Server::start(config, move |_| a.clone()).expect("server starts");
    Running {
        _serial: serial,
        handle: server.handle(),
        port: server.local_addr().port(),
        server: Some(server),
        app,
    }
}

type Ws = tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<TcpStream>>;

async fn connect(port: u16, path: &str) -> Ws {
    let (ws, _) = tokio::time::timeout(
        Duration::from_secs(10),
        tokio_tungstenite::connect_async(format!("ws://127.0.0.1:{port}{path}")),
    )
    .await
    .expect("connect in time")
    .expect("upgrade");
    ws
}

async fn next_data(ws: &mut Ws) -> WsMessage {
    loop {
        let m = tokio::time::timeout(Duration::from_secs(10), ws.next())
            .await
            .expect("a message in time")
            .expect("stream open")
            .expect("no error");
        if m.is_text() || m.is_binary() || m.is_close() {
            return m;
        }
    }
}

async fn wait_until(what: &str, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

fn rt() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn seq_payload(i: u32) -> Vec<u8> {
    let mut p = i.to_be_bytes().to_vec();
    p.extend_from_slice(&[i as u8; 28]);
    p
}

fn one_publisher_reaches_a_thousand_subscribers_once_and_in_order(backend: BackendChoice) {
    a_thousand_subscribers(backend, |_| {});
}

/// The same with a write batch far below the fan-out: each publish is written over many
/// loop turns while the publisher's next messages arrive and join the queues.
fn a_fan_out_written_over_many_turns_stays_complete_and_in_order(backend: BackendChoice) {
    a_thousand_subscribers(backend, |c| c.write_batch = 7);
}

fn a_thousand_subscribers(backend: BackendChoice, configure: impl FnOnce(&mut EngineConfig)) {
    let s = start(backend, configure);
    rt().block_on(async {
        let mut subs = Vec::new();
        for _ in 0..1000 {
            subs.push(connect(s.port, "/sub/wide").await);
        }
        wait_until("1000 subscribers", || {
            s.handle.subscriber_count("wide") == 1000
        })
        .await;
        // Spread over every worker (SO_REUSEPORT hashes connections to listeners).
        let mut publisher = subs.pop().unwrap();
        const N: u32 = 100;
        for i in 0..N {
            publisher
                .send(WsMessage::binary(seq_payload(i)))
                .await
                .unwrap();
        }
        // Every subscriber (the publisher included) gets every message exactly once, in order.
        subs.push(publisher);
        let mut readers = Vec::new();
        for mut ws in subs {
            readers.push(tokio::spawn(async move {
                for i in 0..N {
                    let m = next_data(&mut ws).await;
                    assert_eq!(m.into_data().to_vec(), seq_payload(i), "message {i}");
                }
                // Nothing more (no duplicate) arrives.
                let extra = tokio::time::timeout(Duration::from_millis(50), ws.next()).await;
                assert!(extra.is_err(), "unexpected extra message {extra:?}");
            }));
        }
        for r in readers {
            r.await.unwrap();
        }
    });
}

fn publish_from_a_plain_thread(backend: BackendChoice) {
    let s = start(backend, |_| {});
    rt().block_on(async {
        let mut subs = Vec::new();
        for _ in 0..20 {
            subs.push(connect(s.port, "/sub/ticker").await);
        }
        wait_until("subscribers", || s.handle.subscriber_count("ticker") == 20).await;
        let handle = s.handle.clone();
        std::thread::spawn(move || {
            for i in 0..50u32 {
                assert!(handle.publish("ticker", OpCode::Binary, &seq_payload(i)) >= 1);
            }
            // Nobody listens here: nothing is handed to any worker.
            assert_eq!(handle.publish("nobody", OpCode::Text, b"x"), 0);
        })
        .join()
        .unwrap();
        for ws in &mut subs {
            for i in 0..50 {
                assert_eq!(next_data(ws).await.into_data().to_vec(), seq_payload(i));
            }
        }
    });
}

fn auth_rejection_returns_the_status_and_opens_nothing(backend: BackendChoice) {
    let s = start(backend, |_| {});
    rt().block_on(async {
        let mut tcp = TcpStream::connect(("127.0.0.1", s.port)).await.unwrap();
        tcp.write_all(b"GET /auth?token=bad HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").await.unwrap();
        let mut resp = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), tcp.read_to_end(&mut resp))
            .await
            .unwrap()
            .unwrap();
        let resp = String::from_utf8_lossy(&resp);
        assert!(resp.starts_with("HTTP/1.1 401 "), "{resp}");
        assert!(resp.contains("WWW-Authenticate: Token"), "{resp}");
        assert_eq!(s.app.opened.load(Ordering::SeqCst), 0);
        assert_eq!(s.handle.connections(), 0);
        let mut ok = connect(s.port, "/auth?token=good").await;
        wait_until("open", || s.app.opened.load(Ordering::SeqCst) == 1).await;
        ok.send(WsMessage::text("hello room")).await.unwrap();
        assert_eq!(next_data(&mut ok).await.into_text().unwrap().as_str(), "hello room");
    });
}

fn origins_outside_the_allow_list_get_403(backend: BackendChoice) {
    let s = start(backend, |c| {
        c.allowed_origins = vec!["https://ok.example".into()]
    });
    rt().block_on(async {
        for (origin, want) in [
            ("https://evil.example", "HTTP/1.1 403 "),
            ("", "HTTP/1.1 403 "),
            ("https://ok.example", "HTTP/1.1 101 "),
        ] {
            let mut tcp = TcpStream::connect(("127.0.0.1", s.port)).await.unwrap();
            let origin_line = if origin.is_empty() {
                String::new()
            } else {
                format!("Origin: {origin}\r\n")
            };
            tcp.write_all(format!("GET /sub/o HTTP/1.1\r\nHost: x\r\n{origin_line}Upgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").as_bytes()).await.unwrap();
            let mut head = vec![0u8; 13];
            tokio::time::timeout(Duration::from_secs(5), tcp.read_exact(&mut head))
                .await
                .unwrap()
                .unwrap();
            assert_eq!(String::from_utf8_lossy(&head), want, "origin {origin:?}");
        }
        assert_eq!(s.app.opened.load(Ordering::SeqCst), 1);
    });
}

fn the_chosen_subprotocol_is_echoed(backend: BackendChoice) {
    let s = start(backend, |_| {});
    rt().block_on(async {
        let mut req = format!("ws://127.0.0.1:{}/proto", s.port)
            .into_client_request()
            .unwrap();
        req.headers_mut()
            .insert("Sec-WebSocket-Protocol", HeaderValue::from_static("v1, v2"));
        let (_ws, resp) = tokio_tungstenite::connect_async(req).await.unwrap();
        assert_eq!(
            resp.headers().get("Sec-WebSocket-Protocol").unwrap(),
            "v2",
            "the server's preference among those offered"
        );
    });
}

/// Upgrades a raw socket on `path` and never reads from it.
async fn raw_upgrade(port: u16, path: &str) -> TcpStream {
    let mut tcp = TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    tcp.write_all(format!("GET {path} HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n").as_bytes()).await.unwrap();
    let mut head = Vec::new();
    let mut b = [0u8; 1];
    while !head.ends_with(b"\r\n\r\n") {
        tcp.read_exact(&mut b).await.unwrap();
        head.push(b[0]);
    }
    assert!(head.starts_with(b"HTTP/1.1 101"));
    tcp
}

fn rss_kb() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .unwrap()
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .unwrap()
}

/// Reads server frames from a raw socket until a close frame; returns the binary payloads
/// and the close code.
async fn read_until_close(tcp: &mut TcpStream) -> (Vec<Vec<u8>>, Option<u16>) {
    let mut buf = Vec::new();
    let mut tmp = vec![0u8; 65536];
    let mut messages = Vec::new();
    loop {
        // Parse what we have.
        loop {
            if buf.len() < 2 {
                break;
            }
            let len7 = (buf[1] & 0x7F) as usize;
            let (hl, len) = match len7 {
                126 if buf.len() >= 4 => (4, u16::from_be_bytes([buf[2], buf[3]]) as usize),
                127 if buf.len() >= 10 => (
                    10,
                    u64::from_be_bytes(buf[2..10].try_into().unwrap()) as usize,
                ),
                126 | 127 => break,
                n => (2, n),
            };
            if buf.len() < hl + len {
                break;
            }
            let op = buf[0] & 0x0F;
            let payload = buf[hl..hl + len].to_vec();
            buf.drain(..hl + len);
            if op == 0x8 {
                let code =
                    (payload.len() >= 2).then(|| u16::from_be_bytes([payload[0], payload[1]]));
                return (messages, code);
            }
            messages.push(payload);
        }
        let n = match tokio::time::timeout(Duration::from_secs(10), tcp.read(&mut tmp)).await {
            Ok(Ok(n)) => n,
            _ => return (messages, None),
        };
        if n == 0 {
            return (messages, None);
        }
        buf.extend_from_slice(&tmp[..n]);
    }
}

fn a_slow_reader_is_closed_with_1013_and_memory_stays_bounded(backend: BackendChoice) {
    let s = start(backend, |c| {
        c.send_queue_soft = 64 * 1024;
        c.send_queue_hard = 256 * 1024;
        c.policy = Policy::Close;
    });
    rt().block_on(async {
        let mut slow = raw_upgrade(s.port, "/sub/flood").await;
        let mut fast = connect(s.port, "/sub/other").await;
        wait_until("subscriber", || s.handle.subscriber_count("flood") == 1).await;
        let before = rss_kb();
        // 256 MiB offered to a reader that never reads.
        let payload = vec![0xABu8; 64 * 1024];
        for _ in 0..4096 {
            s.handle.publish("flood", OpCode::Binary, &payload);
        }
        let grown = rss_kb().saturating_sub(before);
        assert!(
            grown < 64 * 1024,
            "RSS grew by {grown} KiB for a 256 KiB hard limit"
        );
        assert!(
            s.handle
                .metrics_text()
                .contains("wsring_backpressure_closes_total 1")
        );
        // When the reader finally reads, what it gets ends with close 1013 ...
        let (_, code) = read_until_close(&mut slow).await;
        assert_eq!(code, Some(1013));
        // ... and once it answers, the server reports the close with that code.
        slow.write_all(&[0x88, 0x82, 0, 0, 0, 0, 0x03, 0xF5])
            .await
            .unwrap();
        wait_until("the slow reader closed", || {
            s.app.closed.load(Ordering::SeqCst) >= 1
        })
        .await;
        assert_eq!(s.app.last_close.load(Ordering::SeqCst), 1013);
        // Other connections are unaffected.
        fast.send(WsMessage::text("still here")).await.unwrap();
        assert_eq!(
            next_data(&mut fast).await.into_text().unwrap().as_str(),
            "still here"
        );
    });
}

fn a_slow_reader_keeps_only_the_newest_frame_under_conflation(backend: BackendChoice) {
    let s = start(backend, |c| {
        c.send_queue_soft = 16 * 1024;
        c.send_queue_hard = 64 * 1024;
        c.policy = Policy::Conflate;
    });
    rt().block_on(async {
        let mut slow = raw_upgrade(s.port, "/sub/ticker").await;
        wait_until("subscriber", || s.handle.subscriber_count("ticker") == 1).await;
        let before = rss_kb();
        const N: u32 = 20_000;
        for i in 0..N {
            let mut p = i.to_be_bytes().to_vec();
            p.resize(4096, 1);
            s.handle.publish("ticker", OpCode::Binary, &p);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        let grown = rss_kb().saturating_sub(before);
        assert!(grown < 64 * 1024, "RSS grew by {grown} KiB");
        // Now read: frames arrive in order, with a gap, and the newest one comes last.
        let mut seen = Vec::new();
        let mut tmp = vec![0u8; 65536];
        let mut buf = Vec::new();
        let deadline = Instant::now() + Duration::from_secs(10);
        while seen.last() != Some(&(N - 1)) {
            assert!(
                Instant::now() < deadline,
                "the newest frame never came: {:?}\n{}",
                seen.last(),
                s.handle.metrics_text()
            );
            let n = tokio::time::timeout(Duration::from_secs(5), slow.read(&mut tmp))
                .await
                .unwrap()
                .unwrap();
            assert!(n > 0, "closed early");
            buf.extend_from_slice(&tmp[..n]);
            while buf.len() >= 4 + 4096 {
                assert_eq!(&buf[..4], &[0x82, 126, 0x10, 0x00]);
                seen.push(u32::from_be_bytes(buf[4..8].try_into().unwrap()));
                buf.drain(..4 + 4096);
            }
        }
        assert!(seen.windows(2).all(|w| w[0] < w[1]), "in publish order");
        assert!((seen.len() as u32) < N, "older frames were dropped");
        assert!(
            s.handle
                .metrics_text()
                .contains("wsring_conflated_frames_total")
        );
    });
}

fn unsubscribe_and_close_leave_no_registry_entries(backend: BackendChoice) {
    let s = start(backend, |_| {});
    rt().block_on(async {
        let mut a = connect(s.port, "/sub/t1").await;
        let b = connect(s.port, "/sub/t1").await;
        let c = connect(s.port, "/sub/t2").await;
        wait_until("subscribed", || s.handle.topic_count() == 2).await;
        assert_eq!(s.handle.subscriber_count("t1"), 2);
        a.send(WsMessage::text("unsub")).await.unwrap();
        assert_eq!(
            next_data(&mut a).await.into_text().unwrap().as_str(),
            "unsubscribed"
        );
        assert_eq!(s.handle.subscriber_count("t1"), 1);
        drop(b);
        drop(c);
        wait_until("registry empty", || s.handle.topic_count() == 0).await;
        assert_eq!(s.handle.subscriber_count("t1"), 0);
        assert_eq!(s.handle.subscriber_count("t2"), 0);
        drop(a);
        wait_until("all closed", || s.handle.connections() == 0).await;
    });
}

fn fan_out_does_not_allocate_per_subscriber(backend: BackendChoice) {
    // One worker, so every subscriber is local to the publishing handler.
    let s = start(backend, |c| c.threads = 1);
    rt().block_on(async {
        let mut subs = Vec::new();
        for _ in 0..500 {
            subs.push(connect(s.port, "/sub/alloc").await);
        }
        wait_until("subscribers", || s.handle.subscriber_count("alloc") == 500).await;
        let mut publisher = subs.pop().unwrap();
        // Warm up: the first frame to an idle connection allocates its queue.
        publisher.send(WsMessage::text("warm")).await.unwrap();
        for ws in subs.iter_mut() {
            next_data(ws).await;
        }
        next_data(&mut publisher).await;
        publisher.send(WsMessage::text("measure")).await.unwrap();
        wait_until("measured", || {
            s.app.publish_queued.load(Ordering::SeqCst) == 500
        })
        .await;
        let n = s.app.publish_allocs.load(Ordering::SeqCst);
        assert!(n <= 4, "a publish to 500 subscribers made {n} allocations");
        for ws in subs.iter_mut() {
            assert_eq!(next_data(ws).await.into_data().len(), 64);
        }
        // The whole turn: handing the frame out, 500 writes and their completions.
        assert_eq!(next_data(&mut publisher).await.into_data().len(), 64);
        s.app.turn_allocs.store(u64::MAX, Ordering::SeqCst);
        publisher.send(WsMessage::text("count")).await.unwrap();
        wait_until("counted", || {
            s.app.turn_allocs.load(Ordering::SeqCst) != u64::MAX
        })
        .await;
        let n = s.app.turn_allocs.load(Ordering::SeqCst);
        assert!(
            n <= 16,
            "publishing to 500 subscribers and writing it out made {n} allocations"
        );
    });
}

fn publishes_sends_and_membership_changes_in_one_turn_keep_their_order(backend: BackendChoice) {
    let s = start(backend, |c| c.threads = 1);
    rt().block_on(async {
        let mut x = connect(s.port, "/sub/ord-a").await;
        let mut y = connect(s.port, "/sub/ord-a").await;
        wait_until("subscribers", || s.handle.subscriber_count("ord-a") == 2).await;
        x.send(WsMessage::text("order")).await.unwrap();
        let mut got_x = Vec::new();
        loop {
            match next_data(&mut x).await {
                WsMessage::Text(t) => got_x.push(t.to_string()),
                WsMessage::Close(f) => {
                    assert_eq!(f.map(|f| u16::from(f.code)), Some(1000));
                    break;
                }
                other => panic!("unexpected {other:?}"),
            }
        }
        // x: 1..7 without 6 (it was not subscribed then), and nothing after its close.
        assert_eq!(got_x, ["1", "2", "3", "4", "5", "7"]);
        let mut got_y = Vec::new();
        for _ in 0..5 {
            got_y.push(next_data(&mut y).await.into_text().unwrap().to_string());
        }
        assert_eq!(got_y, ["1", "3", "5", "6", "7"]);
    });
}

for_both_backends!(
    one_publisher_reaches_a_thousand_subscribers_once_and_in_order,
    a_fan_out_written_over_many_turns_stays_complete_and_in_order,
    publish_from_a_plain_thread,
    auth_rejection_returns_the_status_and_opens_nothing,
    the_chosen_subprotocol_is_echoed,
    origins_outside_the_allow_list_get_403,
    a_slow_reader_is_closed_with_1013_and_memory_stays_bounded,
    a_slow_reader_keeps_only_the_newest_frame_under_conflation,
    unsubscribe_and_close_leave_no_registry_entries,
    fan_out_does_not_allocate_per_subscriber,
    publishes_sends_and_membership_changes_in_one_turn_keep_their_order,
);
