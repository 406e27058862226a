//! Helpers shared by the engine's integration tests: an in-process server per test, bounded
//! awaits, a tokio-tungstenite client, and a raw TCP client that writes requests and frames
//! byte for byte and parses what the server answers.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::CloseFrame;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use wsring::cli::serve::BenchProtocol;
use wsring::engine::{BackendChoice, EngineConfig, Server, Shared};

/// The bound on one await that should complete at once (a round trip on loopback). Generous:
/// it only decides how long a broken test hangs before it fails.
pub const WAIT: Duration = Duration::from_secs(5);

/// Opcodes as they go on the wire.
pub const CONTINUATION: u8 = 0x0;
pub const TEXT: u8 = 0x1;
pub const BINARY: u8 = 0x2;
pub const CLOSE: u8 = 0x8;
pub const PING: u8 = 0x9;
pub const PONG: u8 = 0xA;

/// The RFC 6455 §1.3 example key and its accept value.
pub const KEY: &str = "dGhlIHNhbXBsZSBub25jZQ==";
pub const ACCEPT: &str = "s3pPLMBiTxaQ9kYGzzhZRbK+xOo=";

/// The test defaults: 127.0.0.1 on a free port, 2 workers, not pinned, on `backend`.
pub fn test_config(backend: BackendChoice) -> EngineConfig {
    EngineConfig {
        listen: "127.0.0.1:0".parse().unwrap(),
        threads: 2,
        backend,
        pin_threads: false,
        ..Default::default()
    }
}

/// A server started in-process for one test, on 127.0.0.1 with a free port. Dropping it
/// aborts and joins the server, so a failing test does not leave workers behind.
pub struct TestServer {
    server: Option<Server>,
    /// The address it listens on.
    pub addr: SocketAddr,
}

impl TestServer {
    /// Starts a server with the default configuration on `backend`.
    pub fn start(backend: BackendChoice) -> TestServer {
        TestServer::start_with(backend, |_| {})
    }

    /// Starts a server on `backend` with the test defaults (2 workers, not pinned, port 0)
    /// changed by `configure`.
    pub fn start_with(backend: BackendChoice, configure: impl FnOnce(&mut EngineConfig)) -> Self {
        let mut config = test_config(backend);
        configure(&mut config);
        let server = Server::start(config, BenchProtocol::new)
            .unwrap_or_else(|e| panic!("{backend:?} server must start: {e}"));
        let expected = match backend {
            BackendChoice::IoUring => Some(wsring::engine::Backend::IoUring),
            BackendChoice::Epoll => Some(wsring::engine::Backend::Epoll),
            BackendChoice::Auto => None,
        };
        if let Some(expected) = expected {
            assert_eq!(server.backend(), expected, "the backend asked for runs");
        }
        let addr = server.local_addr();
        TestServer {
            server: Some(server),
            addr,
        }
    }

    /// Starts one node of several joined through `broker` (2 workers, `node` as its id).
    pub fn start_node(
        backend: BackendChoice,
        broker: Arc<dyn wsring::pubsub::broker::Broker>,
        node: u64,
    ) -> TestServer {
        let builder = wsring::engine::ServerBuilder::from(test_config(backend))
            .broker(broker)
            .node_id(node);
        TestServer::built(backend, builder)
    }

    /// Starts `wsring serve`'s handler with its history (limits `limits`, its envelope) on
    /// `backend` (2 workers, not pinned, port 0), the builder changed by `configure`
    /// (e.g. a broker).
    pub fn start_history(
        backend: BackendChoice,
        limits: wsring::api::HistoryLimits,
        configure: impl FnOnce(wsring::engine::ServerBuilder) -> wsring::engine::ServerBuilder,
    ) -> TestServer {
        let builder = wsring::engine::ServerBuilder::from(test_config(backend)).history(
            wsring::api::HistoryConfig {
                limits,
                envelope: Some(Arc::new(wsring::cli::serve::envelope)),
                ..Default::default()
            },
        );
        TestServer::built(backend, configure(builder))
    }

    /// Starts the bench-protocol handler from `builder`.
    fn built(backend: BackendChoice, builder: wsring::engine::ServerBuilder) -> TestServer {
        let server = builder
            .start(BenchProtocol::new)
            .unwrap_or_else(|e| panic!("{backend:?} server must start: {e}"));
        let addr = server.local_addr();
        TestServer {
            server: Some(server),
            addr,
        }
    }

    /// The running server.
    pub fn server(&self) -> &Server {
        self.server.as_ref().expect("server is running")
    }

    /// The server's shared state (counters).
    pub fn shared(&self) -> Arc<Shared> {
        self.server().shared().clone()
    }

    /// Takes the server out (to shut it down some other way than abort).
    pub fn into_server(mut self) -> Server {
        self.server.take().expect("server is running")
    }

    /// Aborts the server and waits for its workers.
    pub fn stop(mut self) {
        self.abort_and_join();
    }

    fn abort_and_join(&mut self) {
        if let Some(server) = self.server.take() {
            server.handle().abort();
            server.join();
        }
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.abort_and_join();
    }
}

/// Joins `server` on another thread; returns whether it finished before `deadline`.
pub fn join_before(server: Server, deadline: Instant) -> bool {
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        server.join();
        let _ = tx.send(());
    });
    rx.recv_timeout(deadline.saturating_duration_since(Instant::now()))
        .is_ok()
}

/// A multi-threaded tokio runtime for one test.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("tokio runtime")
}

/// Runs `future` to completion on a fresh runtime.
pub fn block_on<F: Future>(future: F) -> F::Output {
    runtime().block_on(future)
}

/// Awaits `future`, failing the test with `what` if it takes longer than `limit`.
pub async fn within<T>(limit: Duration, what: &str, future: impl Future<Output = T>) -> T {
    match tokio::time::timeout(limit, future).await {
        Ok(v) => v,
        Err(_) => panic!("timed out after {limit:?}: {what}"),
    }
}

/// Polls `condition` every 10 ms until it holds, failing with `what` after `limit`.
pub async fn eventually(limit: Duration, what: &str, mut condition: impl FnMut() -> bool) {
    within(limit, what, async {
        while !condition() {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    })
    .await;
}

/// Upgraded connections open on the server now.
pub fn open_connections(shared: &Shared) -> usize {
    shared.open.load(std::sync::atomic::Ordering::Acquire)
}

// ---------------------------------------------------------------------------------------
// tokio-tungstenite client

/// A tokio-tungstenite client connection.
pub type Ws = WebSocketStream<TcpStream>;

/// Connects a tokio-tungstenite client to `path` with its default configuration.
pub async fn connect(addr: SocketAddr, path: &str) -> Ws {
    connect_with(addr, path, WebSocketConfig::default()).await
}

/// Connects a tokio-tungstenite client to `path` with `config`.
pub async fn connect_with(addr: SocketAddr, path: &str, config: WebSocketConfig) -> Ws {
    within(WAIT, &format!("upgrade to {path}"), async {
        let tcp = TcpStream::connect(addr).await.expect("TCP connect");
        tcp.set_nodelay(true).expect("TCP_NODELAY");
        let url = format!("ws://{addr}{path}");
        let (ws, response) = tokio_tungstenite::client_async_with_config(url, tcp, Some(config))
            .await
            .unwrap_or_else(|e| panic!("upgrade to {path}: {e}"));
        assert_eq!(response.status(), 101);
        ws
    })
    .await
}

/// The next message of any kind (pings included).
pub async fn next_message(ws: &mut Ws) -> Message {
    next_message_for(ws, "the next message").await
}

/// The next message of any kind; `what` names it if it does not come.
pub async fn next_message_for(ws: &mut Ws, what: &str) -> Message {
    within(WAIT, what, ws.next())
        .await
        .unwrap_or_else(|| panic!("the connection ended while waiting for {what}"))
        .unwrap_or_else(|e| panic!("error while waiting for {what}: {e}"))
}

/// The next text or binary message (pings and pongs skipped).
pub async fn next_data(ws: &mut Ws) -> Message {
    next_data_for(ws, "the next data message").await
}

/// The next text or binary message; `what` names it if it does not come.
pub async fn next_data_for(ws: &mut Ws, what: &str) -> Message {
    loop {
        match next_message_for(ws, what).await {
            Message::Ping(_) | Message::Pong(_) => continue,
            other => return other,
        }
    }
}

/// Sends `message`.
pub async fn send(ws: &mut Ws, message: Message) {
    within(WAIT, "send", ws.send(message))
        .await
        .expect("send a message");
}

/// Reads until the stream ends, skipping data, pings and pongs. tokio-tungstenite replies to
/// a close while reading, so this also completes a close the server started.
pub async fn read_to_end(ws: &mut Ws) {
    within(WAIT, "the server to close the connection", async {
        while let Some(item) = ws.next().await {
            if let Err(e) = item {
                panic!("the connection ended with an error instead of a close: {e}");
            }
        }
    })
    .await;
}

/// Reads until the server's close frame (data, pings and pongs skipped) and returns it.
pub async fn next_close(ws: &mut Ws) -> Option<CloseFrame> {
    loop {
        match next_message(ws).await {
            Message::Close(frame) => return frame,
            Message::Ping(_) | Message::Pong(_) | Message::Text(_) | Message::Binary(_) => {}
            Message::Frame(_) => unreachable!("raw frames are not reported while reading"),
        }
    }
}

/// Runs the close handshake from the client with 1000 and checks the server echoes 1000,
/// then that the server closes the TCP connection.
pub async fn close_normally(ws: &mut Ws) {
    within(
        WAIT,
        "send close",
        ws.close(Some(CloseFrame {
            code: CloseCode::Normal,
            reason: "bye".into(),
        })),
    )
    .await
    .expect("send close");
    let reply = next_close(ws).await.expect("the close reply has a code");
    assert_eq!(reply.code, CloseCode::Normal);
    read_to_end(ws).await;
}

// ---------------------------------------------------------------------------------------
// Raw client

/// A masked client frame: `b0` is the first byte as sent (FIN, RSV bits, opcode).
pub fn raw_frame(b0: u8, masked: bool, payload: &[u8]) -> Vec<u8> {
    let mut out = vec![b0];
    let mask_bit = if masked { 0x80 } else { 0 };
    let len = payload.len();
    if len < 126 {
        out.push(mask_bit | len as u8);
    } else if let Ok(len16) = u16::try_from(len) {
        out.push(mask_bit | 126);
        out.extend_from_slice(&len16.to_be_bytes());
    } else {
        out.push(mask_bit | 127);
        out.extend_from_slice(&(len as u64).to_be_bytes());
    }
    if masked {
        let key: [u8; 4] = rand::random();
        out.extend_from_slice(&key);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ key[i % 4]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

/// A well-formed masked client frame.
pub fn frame(fin: bool, opcode: u8, payload: &[u8]) -> Vec<u8> {
    raw_frame(if fin { 0x80 } else { 0 } | opcode, true, payload)
}

/// A frame as the server sent it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerFrame {
    /// The first byte (FIN, RSV bits, opcode).
    pub b0: u8,
    /// Whether the mask bit was set (a server must not mask).
    pub masked: bool,
    /// The payload.
    pub payload: Vec<u8>,
}

impl ServerFrame {
    pub fn fin(&self) -> bool {
        self.b0 & 0x80 != 0
    }

    pub fn opcode(&self) -> u8 {
        self.b0 & 0x0F
    }

    /// The status code of a close frame.
    pub fn close_code(&self) -> Option<u16> {
        match self.payload.as_slice() {
            [a, b, ..] => Some(u16::from_be_bytes([*a, *b])),
            _ => None,
        }
    }
}

fn parse_server_frame(buf: &[u8]) -> Option<(ServerFrame, usize)> {
    let (&b0, &b1) = (buf.first()?, buf.get(1)?);
    let masked = b1 & 0x80 != 0;
    let (len, mut at) = match b1 & 0x7F {
        126 => (
            u64::from(u16::from_be_bytes([*buf.get(2)?, *buf.get(3)?])),
            4,
        ),
        127 => (u64::from_be_bytes(buf.get(2..10)?.try_into().ok()?), 10),
        n => (u64::from(n), 2),
    };
    let key: Option<[u8; 4]> = if masked {
        let k = buf.get(at..at + 4)?.try_into().ok()?;
        at += 4;
        Some(k)
    } else {
        None
    };
    let len = usize::try_from(len).expect("frame length fits usize");
    let mut payload = buf.get(at..at + len)?.to_vec();
    if let Some(key) = key {
        payload
            .iter_mut()
            .enumerate()
            .for_each(|(i, b)| *b ^= key[i % 4]);
    }
    Some((
        ServerFrame {
            b0,
            masked,
            payload,
        },
        at + len,
    ))
}

/// An HTTP response head (status and headers, names lower-cased) and its body.
#[derive(Debug)]
pub struct HttpResponse {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl HttpResponse {
    /// The first header named `name` (lower case).
    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// A raw TCP client that keeps the bytes it read but did not consume yet.
pub struct RawClient {
    pub stream: TcpStream,
    buf: Vec<u8>,
}

/// The upgrade request wsring accepts, to `path`.
pub fn upgrade_request(path: &str) -> String {
    format!(
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: {KEY}\r\nSec-WebSocket-Version: 13\r\n\r\n"
    )
}

impl RawClient {
    /// Opens a TCP connection (Nagle off, so each write goes out as written).
    pub async fn connect(addr: SocketAddr) -> RawClient {
        let stream = within(WAIT, "TCP connect", TcpStream::connect(addr))
            .await
            .expect("TCP connect");
        stream.set_nodelay(true).expect("TCP_NODELAY");
        RawClient {
            stream,
            buf: Vec::new(),
        }
    }

    /// Connects and upgrades to `path`, checking the 101 and its accept key.
    pub async fn upgrade(addr: SocketAddr, path: &str) -> RawClient {
        let mut client = RawClient::connect(addr).await;
        client.send(upgrade_request(path).as_bytes()).await;
        let head = client.read_head().await;
        assert_eq!(head.status, 101, "upgrade to {path}: {head:?}");
        assert_eq!(head.header("sec-websocket-accept"), Some(ACCEPT));
        client
    }

    /// Writes `bytes` in one write.
    pub async fn send(&mut self, bytes: &[u8]) {
        within(WAIT, "write", self.stream.write_all(bytes))
            .await
            .expect("write to the server");
    }

    /// Reads more bytes into the buffer; returns how many (0: EOF). A connection reset
    /// counts as EOF (the peer is gone either way).
    async fn fill(&mut self) -> usize {
        self.buf.reserve(64 * 1024);
        match self.stream.read_buf(&mut self.buf).await {
            Ok(n) => n,
            Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => 0,
            Err(e) => panic!("read: {e}"),
        }
    }

    /// Reads an HTTP response head (up to the blank line); the body stays buffered.
    pub async fn read_head(&mut self) -> HttpResponse {
        within(WAIT, "an HTTP response head", async {
            loop {
                if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8(self.buf[..end].to_vec()).expect("ASCII head");
                    self.buf.drain(..end + 4);
                    return parse_head(&head);
                }
                if self.fill().await == 0 {
                    panic!(
                        "EOF before a complete response head; got {:?}",
                        String::from_utf8_lossy(&self.buf)
                    );
                }
            }
        })
        .await
    }

    /// Reads a whole response (head, `Content-Length` body) and checks that the server
    /// then closes the connection.
    pub async fn read_response(&mut self) -> HttpResponse {
        let mut response = self.read_head().await;
        let len: usize = response
            .header("content-length")
            .expect("a Content-Length header")
            .parse()
            .expect("a numeric Content-Length");
        within(WAIT, "the response body", async {
            while self.buf.len() < len {
                assert!(self.fill().await > 0, "EOF inside the response body");
            }
        })
        .await;
        response.body = self.buf.drain(..len).collect();
        self.expect_eof().await;
        response
    }

    /// Reads the next frame the server sends.
    pub async fn read_frame(&mut self) -> ServerFrame {
        self.read_frame_for("a frame from the server").await
    }

    /// Reads the next frame the server sends; `what` names it if it does not come.
    pub async fn read_frame_for(&mut self, what: &str) -> ServerFrame {
        within(WAIT, what, async {
            loop {
                if let Some((frame, used)) = parse_server_frame(&self.buf) {
                    self.buf.drain(..used);
                    assert!(!frame.masked, "a server frame must not be masked");
                    return frame;
                }
                if self.fill().await == 0 {
                    panic!(
                        "EOF while waiting for a frame ({} bytes buffered)",
                        self.buf.len()
                    );
                }
            }
        })
        .await
    }

    /// Expects the next frame to be a close with `code`, then the end of the connection.
    pub async fn expect_close(&mut self, code: u16) {
        let frame = self.read_frame().await;
        assert_eq!(
            frame.opcode(),
            CLOSE,
            "expected a close frame, got {frame:?}"
        );
        assert!(frame.fin(), "a close frame is not fragmented");
        assert_eq!(frame.close_code(), Some(code), "close code of {frame:?}");
        self.expect_eof().await;
    }

    /// Expects the server to close the TCP connection (within 3 s) without sending more.
    pub async fn expect_eof(&mut self) {
        within(
            Duration::from_secs(3),
            "the server to close the TCP connection",
            async { while self.fill().await > 0 {} },
        )
        .await;
        assert!(
            self.buf.is_empty(),
            "unexpected bytes before EOF: {:?}",
            String::from_utf8_lossy(&self.buf)
        );
    }
}

fn parse_head(head: &str) -> HttpResponse {
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    assert_eq!(
        parts.next(),
        Some("HTTP/1.1"),
        "status line {status_line:?}"
    );
    let status = parts
        .next()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("status line {status_line:?}"));
    let headers = lines
        .map(|line| {
            let (name, value) = line
                .split_once(':')
                .unwrap_or_else(|| panic!("header line {line:?}"));
            (name.trim().to_ascii_lowercase(), value.trim().to_owned())
        })
        .collect();
    HttpResponse {
        status,
        headers,
        body: Vec::new(),
    }
}

/// Sends `request` on a fresh connection and reads the whole response.
pub async fn http_exchange(addr: SocketAddr, request: &str) -> HttpResponse {
    let mut client = RawClient::connect(addr).await;
    client.send(request.as_bytes()).await;
    client.read_response().await
}

/// Entries in /proc/self/fd: the process's open descriptors.
pub fn open_descriptors() -> usize {
    std::fs::read_dir("/proc/self/fd")
        .expect("/proc/self/fd")
        .count()
}

/// `len` pseudo-random bytes (xorshift from a random seed: fast even unoptimised).
pub fn random_bytes(len: usize) -> Vec<u8> {
    let mut state: u64 = rand::random::<u64>() | 1;
    let mut out = Vec::with_capacity(len + 8);
    while out.len() < len {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        out.extend_from_slice(&state.to_le_bytes());
    }
    out.truncate(len);
    out
}

/// Valid UTF-8 text of exactly `len` bytes mixing 1- to 4-byte characters, so that
/// characters straddle every read and buffer boundary.
pub fn utf8_text(len: usize) -> String {
    const PATTERN: &str = "aé€😀"; // 1 + 2 + 3 + 4 bytes
    let mut text = PATTERN.repeat(len / PATTERN.len());
    while text.len() < len {
        text.push('z');
    }
    text
}

/// Generates `io_uring::<name>` and `epoll::<name>` tests calling `<name>(backend)`.
/// Attributes before a name apply to both; `{ epoll: #[...] }` after it to epoll only.
#[allow(unused_macros)] // Not every test binary has backend-parametrised tests.
macro_rules! for_both_backends {
    ($($(#[$attr:meta])* $name:ident $({ epoll: #[$epoll_attr:meta] })?),* $(,)?) => {
        mod io_uring {
            $(
                $(#[$attr])*
                #[test]
                fn $name() {
                    super::$name(wsring::engine::BackendChoice::IoUring)
                }
            )*
        }
        mod epoll {
            $(
                $(#[$attr])*
                $(#[$epoll_attr])?
                #[test]
                fn $name() {
                    super::$name(wsring::engine::BackendChoice::Epoll)
                }
            )*
        }
    };
}
