//! Behaviour of the engine seen from the network: a real server on 127.0.0.1 (in-process, or
//! the `wsring` binary) driven by tokio-tungstenite and by a raw TCP client that writes
//! requests and frames byte for byte. Every test is written once, taking the backend, and
//! runs for both: `io_uring::<name>` and `epoll::<name>` (see the macro at the end).
//!
//! Connection churn and descriptor accounting live in `tests/churn.rs`: they count the
//! process's descriptors, which the tests here would disturb by running alongside.

#[macro_use]
mod common;

use std::io::BufRead as _;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use futures_util::SinkExt as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::{Bytes, Message};
use wsring::engine::BackendChoice;

// ---------------------------------------------------------------------------------------
// Echo

/// Text and binary messages of every length encoding (7-bit, 16-bit, 64-bit), 64 KiB, and
/// exactly 16 MiB (the default limit) come back with the same opcode and payload.
fn echo_returns_text_and_binary_up_to_the_16mib_limit(backend: BackendChoice) {
    let server = TestServer::start(backend);
    block_on(async {
        let config = WebSocketConfig::default()
            .max_message_size(Some(64 << 20))
            .max_frame_size(Some(64 << 20));
        let mut ws = connect_with(server.addr, "/echo", config).await;
        for size in [0, 5, 125, 126, 65_535, 64 << 10, 16 << 20] {
            let text = utf8_text(size);
            send(&mut ws, Message::text(text.clone())).await;
            match next_data(&mut ws).await {
                Message::Text(echoed) => assert!(
                    echoed.as_str() == text,
                    "text of {size} bytes came back as {} different bytes",
                    echoed.len()
                ),
                other => panic!("text of {size} bytes came back as {}", describe(&other)),
            }
            let binary = random_bytes(size);
            send(&mut ws, Message::binary(binary.clone())).await;
            match next_data(&mut ws).await {
                Message::Binary(echoed) => assert!(
                    echoed[..] == binary[..],
                    "binary of {size} bytes came back as {} different bytes",
                    echoed.len()
                ),
                other => panic!("binary of {size} bytes came back as {}", describe(&other)),
            }
        }
        close_normally(&mut ws).await;
    });
    server.stop();
}

/// A short description of a message (never its whole payload).
fn describe(message: &Message) -> String {
    match message {
        Message::Text(t) => format!("text of {} bytes", t.len()),
        Message::Binary(b) => format!("binary of {} bytes", b.len()),
        other => format!("{other:?}"),
    }
}

/// A text message in three fragments, a UTF-8 character split between the first two and a
/// ping between fragments: the pong comes at once, then the message as one frame.
fn fragmented_text_with_interleaved_ping_is_echoed_whole(backend: BackendChoice) {
    let server = TestServer::start(backend);
    block_on(async {
        let mut client = RawClient::upgrade(server.addr, "/echo").await;
        let message = "Hé, fragmented world".as_bytes();
        // "H" + the first byte of "é" | the second byte + ", fragmented" | " world"
        let (first, rest) = message.split_at(2);
        let (second, third) = rest.split_at(13);
        client.send(&frame(false, TEXT, first)).await;
        client.send(&frame(true, PING, b"between")).await;
        client.send(&frame(false, CONTINUATION, second)).await;
        client.send(&frame(true, CONTINUATION, third)).await;

        let pong = client.read_frame().await;
        assert_eq!(
            (pong.b0, pong.payload.as_slice()),
            (0x80 | PONG, &b"between"[..])
        );
        let echo = client.read_frame().await;
        assert_eq!(echo.b0, 0x80 | TEXT, "one final text frame: {echo:?}");
        assert_eq!(echo.payload, message);
    });
    server.stop();
}

/// A one-worker server with a small reassembly budget, and its shared state (counters).
fn one_worker_with_budget(
    backend: BackendChoice,
    budget: usize,
) -> (TestServer, std::sync::Arc<wsring::engine::Shared>) {
    let server = TestServer::start_with(backend, |c| {
        c.threads = 1;
        c.reassembly_budget = budget;
    });
    let shared = server.shared();
    (server, shared)
}

/// Two peers each reassembling a message past the worker's budget: the second is not read
/// until the first completes (its last fragment waits unanswered), then both messages come
/// back whole.
fn reassembly_past_the_budget_pauses_a_reader_until_memory_frees(backend: BackendChoice) {
    let (server, shared) = one_worker_with_budget(backend, 64 * 1024);
    let pauses = || shared.total(|s| &s.reassembly_pauses);
    block_on(async {
        let mut a = RawClient::upgrade(server.addr, "/echo").await;
        let mut b = RawClient::upgrade(server.addr, "/echo").await;
        let (a1, a2) = (vec![1u8; 48 * 1024], vec![2u8; 1024]);
        let (b1, b2) = (vec![3u8; 48 * 1024], vec![4u8; 1024]);
        a.send(&frame(false, BINARY, &a1)).await;
        // Let the server take a's fragment in before b's arrives.
        tokio::time::sleep(Duration::from_millis(100)).await;
        b.send(&frame(false, BINARY, &b1)).await;
        eventually(WAIT, "b to be paused", || pauses() == 1).await;
        b.send(&frame(true, CONTINUATION, &b2)).await;
        // b is not read: its message stays incomplete, nothing comes back.
        let early = tokio::time::timeout(Duration::from_millis(300), b.read_frame()).await;
        assert!(early.is_err(), "b was answered while paused: {early:?}");
        a.send(&frame(true, CONTINUATION, &a2)).await;
        let echo_a = a.read_frame_for("a's message").await;
        assert_eq!(echo_a.b0, 0x80 | BINARY);
        assert_eq!(echo_a.payload, [a1, a2].concat());
        let echo_b = b
            .read_frame_for("b's message once a's memory is free")
            .await;
        assert_eq!(echo_b.b0, 0x80 | BINARY);
        assert_eq!(echo_b.payload, [b1, b2].concat());
        assert_eq!(pauses(), 1);
    });
    server.stop();
}

/// One message alone may pass the budget (up to the message size limit): with nobody
/// else holding memory, pausing its reader would only stall it.
fn a_lone_message_larger_than_the_budget_still_completes(backend: BackendChoice) {
    let (server, shared) = one_worker_with_budget(backend, 16 * 1024);
    block_on(async {
        let mut a = RawClient::upgrade(server.addr, "/echo").await;
        let parts: Vec<Vec<u8>> = (0..8u8).map(|i| vec![i; 20 * 1024]).collect();
        for (i, part) in parts.iter().enumerate() {
            let op = if i == 0 { BINARY } else { CONTINUATION };
            a.send(&frame(i == parts.len() - 1, op, part)).await;
        }
        let echo = a.read_frame_for("the 160 KiB message").await;
        assert_eq!(echo.payload, parts.concat());
    });
    assert_eq!(shared.total(|s| &s.reassembly_pauses), 0);
    server.stop();
}

/// A frame written one byte per TCP segment (its header cut everywhere) is reassembled.
fn frame_written_byte_by_byte_is_reassembled(backend: BackendChoice) {
    let server = TestServer::start(backend);
    block_on(async {
        let mut client = RawClient::upgrade(server.addr, "/echo").await;
        let payload = random_bytes(300); // a 16-bit length: an 8-byte header
        for byte in frame(true, BINARY, &payload) {
            client.send(&[byte]).await;
        }
        let echo = client.read_frame().await;
        assert_eq!(echo.b0, 0x80 | BINARY);
        assert_eq!(echo.payload, payload);
    });
    server.stop();
}

/// 100 messages written in one go (more than one vectored write's 64 frames) are all
/// echoed, in order, though the client sends nothing more while it waits.
fn pipelined_burst_of_100_messages_is_echoed_in_full(backend: BackendChoice) {
    let server = TestServer::start(backend);
    block_on(async {
        let mut client = RawClient::upgrade(server.addr, "/echo").await;
        let burst: Vec<u8> = (0..100)
            .flat_map(|n| frame(true, TEXT, format!("message {n}").as_bytes()))
            .collect();
        client.send(&burst).await;
        for n in 0..100 {
            let echo = client.read_frame_for(&format!("echo {n} of 100")).await;
            assert_eq!(echo.b0, 0x80 | TEXT);
            assert_eq!(echo.payload, format!("message {n}").as_bytes());
        }
    });
    server.stop();
}

/// A client ping is answered with a pong carrying the same payload.
fn ping_is_answered_with_pong_of_same_payload(backend: BackendChoice) {
    let server = TestServer::start(backend);
    block_on(async {
        let mut ws = connect(server.addr, "/echo").await;
        let payload = Bytes::from_static(b"are you there?");
        send(&mut ws, Message::Ping(payload.clone())).await;
        assert_eq!(next_message(&mut ws).await, Message::Pong(payload));
        close_normally(&mut ws).await;
    });
    server.stop();
}

/// The client closes with 1000 and a reason; the server answers 1000 and closes the TCP
/// connection, and the connection is no longer counted as open.
fn client_close_is_echoed_with_1000(backend: BackendChoice) {
    let server = TestServer::start(backend);
    let shared = server.shared();
    block_on(async {
        let mut ws = connect(server.addr, "/echo").await;
        assert_eq!(open_connections(&shared), 1);
        close_normally(&mut ws).await;
        eventually(WAIT, "the closed connection to be uncounted", || {
            open_connections(&shared) == 0
        })
        .await;
    });
    server.stop();
}

// ---------------------------------------------------------------------------------------
// Handshake rejections and plain HTTP

/// Sends `request` raw and checks the answer's status (never a 101).
fn assert_refused(backend: BackendChoice, request: &str, status: u16) -> HttpResponse {
    let server = TestServer::start(backend);
    let response = block_on(http_exchange(server.addr, request));
    server.stop();
    assert_eq!(
        response.status,
        status,
        "answer to {request:?}: {response:?} {}",
        response.body_text()
    );
    response
}

fn bad_key_is_refused_with_400(backend: BackendChoice) {
    assert_refused(
        backend,
        "GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: not-sixteen-bytes\r\nSec-WebSocket-Version: 13\r\n\r\n",
        400,
    );
}

fn missing_host_is_refused_with_400(backend: BackendChoice) {
    assert_refused(
        backend,
        "GET /echo HTTP/1.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        400,
    );
}

fn missing_connection_upgrade_is_refused_with_400(backend: BackendChoice) {
    assert_refused(
        backend,
        "GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: keep-alive\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n",
        400,
    );
}

const POST_UPGRADE: &str = "POST /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\n\
    Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
    Sec-WebSocket-Version: 13\r\nContent-Length: 0\r\n\r\n";

fn post_upgrade_is_refused_with_405(backend: BackendChoice) {
    assert_refused(backend, POST_UPGRADE, 405);
}

/// RFC 9110 §15.5.6: a 405 MUST carry `Allow` (the plain-HTTP 405 does: `Allow: GET`).
fn post_upgrade_405_names_the_allowed_method(backend: BackendChoice) {
    let response = assert_refused(backend, POST_UPGRADE, 405);
    assert_eq!(response.header("allow"), Some("GET"), "{response:?}");
}

fn plain_post_405_names_the_allowed_method(backend: BackendChoice) {
    let response = assert_refused(
        backend,
        "POST / HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 0\r\n\r\n",
        405,
    );
    assert_eq!(response.header("allow"), Some("GET"), "{response:?}");
}

fn version_8_is_refused_with_426_naming_version_13(backend: BackendChoice) {
    let response = assert_refused(
        backend,
        "GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
         Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 8\r\n\r\n",
        426,
    );
    assert_eq!(response.header("sec-websocket-version"), Some("13"));
}

const PLAIN_GET_ECHO: &str = "GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n";

fn plain_get_on_an_upgrade_path_is_answered_426(backend: BackendChoice) {
    assert_refused(backend, PLAIN_GET_ECHO, 426);
}

/// RFC 9110 §15.5.22: a 426 MUST carry `Upgrade` naming the protocol to switch to (and
/// RFC 6455 §4.2.2 has a WebSocket server name its versions).
fn plain_get_426_names_websocket_and_version_13(backend: BackendChoice) {
    let response = assert_refused(backend, PLAIN_GET_ECHO, 426);
    assert_eq!(
        response.header("upgrade"),
        Some("websocket"),
        "{response:?}"
    );
    assert_eq!(
        response.header("sec-websocket-version"),
        Some("13"),
        "{response:?}"
    );
}

fn header_block_over_8kib_is_refused_with_431(backend: BackendChoice) {
    let filler = "a".repeat(9 * 1024);
    assert_refused(
        backend,
        &format!(
            "GET /echo HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Filler: {filler}\r\nUpgrade: websocket\r\n\
             Connection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
             Sec-WebSocket-Version: 13\r\n\r\n"
        ),
        431,
    );
}

/// An upgrade request longer than one of the io_uring backend's 4 KiB request buffers
/// (7 KiB of headers, under the 8 KiB limit), written in one go with frames right behind
/// it: read over several recvs, upgraded, and the frames that came with it echoed, then
/// more read after the switch to the main receive ring.
fn long_request_with_frames_behind_it_is_upgraded_and_echoed(backend: BackendChoice) {
    let server = TestServer::start(backend);
    let filler = "a".repeat(7 * 1024);
    let request =
        upgrade_request("/echo").replace("\r\n\r\n", &format!("\r\nX-Filler: {filler}\r\n\r\n"));
    block_on(async {
        let mut client = RawClient::connect(server.addr).await;
        let mut bytes = request.into_bytes();
        for n in 0..20 {
            bytes.extend(frame(true, TEXT, format!("early {n}").as_bytes()));
        }
        client.send(&bytes).await;
        assert_eq!(client.read_head().await.status, 101);
        for n in 0..20 {
            let echo = client.read_frame_for(&format!("early echo {n}")).await;
            assert_eq!(echo.payload, format!("early {n}").as_bytes());
        }
        client.send(&frame(true, BINARY, &[7u8; 9000])).await;
        let echo = client.read_frame_for("the later echo").await;
        assert_eq!(echo.payload, vec![7u8; 9000]);
    });
    server.stop();
}

fn upgrade_to_unknown_path_is_refused_with_404(backend: BackendChoice) {
    assert_refused(backend, &upgrade_request("/nope"), 404);
}

/// With `max_connections: 2`, a third upgrade gets 503; once one closes, there is room again.
fn upgrade_beyond_max_connections_is_refused_with_503(backend: BackendChoice) {
    let server = TestServer::start_with(backend, |c| c.max_connections = 2);
    let shared = server.shared();
    block_on(async {
        let mut first = connect(server.addr, "/echo").await;
        let _second = connect(server.addr, "/pubsub/cap").await;
        let response = http_exchange(server.addr, &upgrade_request("/echo")).await;
        assert_eq!(response.status, 503, "{response:?}");
        assert_eq!(shared.total(|s| &s.rejected_full), 1);

        close_normally(&mut first).await;
        eventually(WAIT, "the closed connection to free its place", || {
            open_connections(&shared) == 1
        })
        .await;
        let mut third = connect(server.addr, "/echo").await;
        send(&mut third, Message::text("room again")).await;
        assert_eq!(next_data(&mut third).await, Message::text("room again"));
    });
    server.stop();
}

fn status_page_is_html_naming_wsring(backend: BackendChoice) {
    let server = TestServer::start(backend);
    let response = block_on(http_exchange(
        server.addr,
        "GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
    ));
    server.stop();
    assert_eq!(response.status, 200, "{response:?}");
    let content_type = response.header("content-type").unwrap_or_default();
    assert!(content_type.starts_with("text/html"), "{content_type:?}");
    assert!(response.body_text().contains("wsring"));
}

/// `/metrics` is Prometheus text that counts the open connection.
fn metrics_report_open_connections(backend: BackendChoice) {
    let server = TestServer::start(backend);
    block_on(async {
        let mut ws = connect(server.addr, "/echo").await;
        let response = http_exchange(
            server.addr,
            "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        )
        .await;
        assert_eq!(response.status, 200, "{response:?}");
        let body = response.body_text();
        assert!(
            body.lines().any(|l| l == "wsring_connections_open 1"),
            "{body}"
        );
        assert!(
            body.lines().any(|l| l == "wsring_upgraded_total 1"),
            "{body}"
        );
        close_normally(&mut ws).await;
    });
    server.stop();
}

/// Every echoed message counts once in and once out (`WorkerStats::messages_out`: "echoes
/// and pub/sub deliveries"), in the counters and in `/metrics`.
fn echoed_messages_count_in_and_out(backend: BackendChoice) {
    let server = TestServer::start(backend);
    let shared = server.shared();
    block_on(async {
        let mut ws = connect(server.addr, "/echo").await;
        for n in 0..3 {
            send(&mut ws, Message::text(format!("count me {n}"))).await;
            assert_eq!(
                next_data(&mut ws).await,
                Message::text(format!("count me {n}"))
            );
        }
        close_normally(&mut ws).await;
        assert_eq!(shared.total(|s| &s.messages_in), 3);
        assert_eq!(
            shared.total(|s| &s.messages_out),
            3,
            "echo replies are messages out"
        );
        let body = http_exchange(
            server.addr,
            "GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n",
        )
        .await
        .body_text();
        for line in ["wsring_messages_in_total 3", "wsring_messages_out_total 3"] {
            assert!(body.lines().any(|l| l == line), "{line:?} in\n{body}");
        }
    });
    server.stop();
}

// ---------------------------------------------------------------------------------------
// Protocol errors: each answered with its close code, then the TCP connection closed

/// Upgrades raw, sends `bytes` in one write, and expects close `code` and then EOF.
fn assert_closed_with(
    backend: BackendChoice,
    max_message_size: Option<u64>,
    bytes: &[u8],
    code: u16,
) {
    let server = TestServer::start_with(backend, |c| {
        if let Some(max) = max_message_size {
            c.max_message_size = max;
        }
    });
    block_on(async {
        let mut client = RawClient::upgrade(server.addr, "/echo").await;
        client.send(bytes).await;
        client.expect_close(code).await;
    });
    server.stop();
}

fn unmasked_frame_closes_with_1002(backend: BackendChoice) {
    assert_closed_with(
        backend,
        None,
        &raw_frame(0x80 | TEXT, false, b"hello"),
        1002,
    );
}

fn rsv1_without_extension_closes_with_1002(backend: BackendChoice) {
    assert_closed_with(backend, None, &raw_frame(0xC0 | TEXT, true, b"hello"), 1002);
}

fn reserved_data_opcode_3_closes_with_1002(backend: BackendChoice) {
    assert_closed_with(backend, None, &raw_frame(0x83, true, b"hello"), 1002);
}

/// A peer that goes on sending after the frame that fails its connection (as Autobahn's
/// 4.1.5 does with a ping) leaves bytes we never read. Closing a socket with unread input
/// resets it, and a reset throws away whatever the kernel still held back: the replies to
/// the messages before the error and our close frame must already be on their way.
fn replies_and_the_close_frame_survive_unread_input_after_an_error(backend: BackendChoice) {
    let server = TestServer::start(backend);
    block_on(async {
        let mut client = RawClient::upgrade(server.addr, "/echo").await;
        let mut bytes = frame(true, TEXT, b"Hello, world!");
        bytes.extend(raw_frame(0x83, true, b"reserved"));
        for _ in 0..900 {
            // ~118 KB after the error: more than one read takes.
            bytes.extend(frame(true, PING, &[0x55; 125]));
        }
        client.send(&bytes).await;
        let echo = client
            .read_frame_for("the echo of the message before the error")
            .await;
        assert_eq!(echo.opcode(), TEXT);
        assert_eq!(echo.payload, b"Hello, world!");
        let close = client.read_frame_for("the close frame").await;
        assert_eq!(close.opcode(), CLOSE, "{close:?}");
        assert_eq!(close.close_code(), Some(1002));
    });
    server.stop();
}

fn reserved_control_opcode_0xb_closes_with_1002(backend: BackendChoice) {
    assert_closed_with(backend, None, &raw_frame(0x8B, true, b"hello"), 1002);
}

fn ping_of_126_bytes_closes_with_1002(backend: BackendChoice) {
    assert_closed_with(backend, None, &frame(true, PING, &[b'p'; 126]), 1002);
}

fn fragmented_ping_closes_with_1002(backend: BackendChoice) {
    assert_closed_with(backend, None, &frame(false, PING, b"p"), 1002);
}

fn continuation_without_a_message_closes_with_1002(backend: BackendChoice) {
    assert_closed_with(backend, None, &frame(true, CONTINUATION, b"orphan"), 1002);
}

fn new_text_inside_a_fragmented_message_closes_with_1002(backend: BackendChoice) {
    let mut bytes = frame(false, TEXT, b"first part");
    bytes.extend(frame(true, TEXT, b"a new message"));
    assert_closed_with(backend, None, &bytes, 1002);
}

fn invalid_utf8_text_closes_with_1007(backend: BackendChoice) {
    assert_closed_with(
        backend,
        None,
        &frame(true, TEXT, b"bad \xC3\x28 utf-8"),
        1007,
    );
}

fn close_with_code_1005_closes_with_1002(backend: BackendChoice) {
    assert_closed_with(
        backend,
        None,
        &frame(true, CLOSE, &1005u16.to_be_bytes()),
        1002,
    );
}

fn one_byte_close_payload_closes_with_1002(backend: BackendChoice) {
    assert_closed_with(backend, None, &frame(true, CLOSE, &[0x03]), 1002);
}

fn frame_over_max_message_size_closes_with_1009(backend: BackendChoice) {
    assert_closed_with(
        backend,
        Some(1024),
        &frame(true, BINARY, &[7u8; 2000]),
        1009,
    );
}

/// Each fragment is under the limit; the message is not.
fn fragmented_message_over_max_message_size_closes_with_1009(backend: BackendChoice) {
    let mut bytes = frame(false, BINARY, &[1u8; 600]);
    bytes.extend(frame(true, CONTINUATION, &[2u8; 600]));
    assert_closed_with(backend, Some(1024), &bytes, 1009);
}

// ---------------------------------------------------------------------------------------
// Timers

const PING_INTERVAL: Duration = Duration::from_millis(300);
const PONG_TIMEOUT: Duration = Duration::from_millis(300);

fn start_with_fast_pings(backend: BackendChoice) -> TestServer {
    TestServer::start_with(backend, |c| {
        c.ping_interval = Some(PING_INTERVAL);
        c.pong_timeout = PONG_TIMEOUT;
    })
}

/// A client that never answers gets a ping, then the server drops the TCP connection.
fn silent_client_is_pinged_then_dropped(backend: BackendChoice) {
    let server = start_with_fast_pings(backend);
    block_on(async {
        let mut client = RawClient::upgrade(server.addr, "/echo").await;
        let ping = within(
            Duration::from_secs(3),
            "the server's ping",
            client.read_frame(),
        )
        .await;
        assert_eq!(ping.b0, 0x89, "a final ping frame: {ping:?}");
        client.expect_eof().await;
    });
    server.stop();
}

/// A client that answers pings (tokio-tungstenite does while it is polled) stays open
/// across several ping intervals and still echoes afterwards.
fn client_answering_pings_stays_open(backend: BackendChoice) {
    let server = start_with_fast_pings(backend);
    let shared = server.shared();
    block_on(async {
        let mut ws = connect(server.addr, "/echo").await;
        let until = tokio::time::Instant::now() + Duration::from_millis(1500);
        let mut pings = 0;
        loop {
            match tokio::time::timeout_at(until, futures_util::StreamExt::next(&mut ws)).await {
                Err(_) => break, // still open at the end of the window
                Ok(Some(Ok(Message::Ping(_)))) => pings += 1,
                Ok(other) => panic!("the connection should stay open, got {other:?}"),
            }
        }
        assert!(pings >= 1, "the server pings an idle connection");
        assert_eq!(open_connections(&shared), 1);
        send(&mut ws, Message::text("still here")).await;
        assert_eq!(next_data(&mut ws).await, Message::text("still here"));
        close_normally(&mut ws).await;
    });
    server.stop();
}

/// A client that drips its upgrade request one byte per 100 ms is dropped once the
/// handshake deadline passes, without any answer.
fn slow_drip_handshake_is_dropped_without_an_answer(backend: BackendChoice) {
    let server = TestServer::start_with(backend, |c| {
        c.handshake_timeout = Duration::from_millis(300);
    });
    block_on(async {
        let mut tcp = within(WAIT, "connect", tokio::net::TcpStream::connect(server.addr))
            .await
            .expect("connect");
        tcp.set_nodelay(true).expect("TCP_NODELAY");
        tcp.write_all(b"GET /echo HTTP/1.1\r\n")
            .await
            .expect("write");
        let drip = format!(
            "Host: 127.0.0.1\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: {KEY}\r\n"
        );
        let (mut reader, mut writer) = tcp.split();
        let mut received = Vec::new();
        within(Duration::from_secs(2), "the server to drop a slow-drip client", async {
            let mut ticks = tokio::time::interval(Duration::from_millis(100));
            let mut bytes = drip.bytes();
            let mut buf = [0u8; 1024];
            loop {
                tokio::select! {
                    read = reader.read(&mut buf) => match read {
                        Ok(0) => return,
                        Ok(n) => received.extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
                        Err(e) => panic!("read: {e}"),
                    },
                    _ = ticks.tick() => {
                        let byte = bytes.next().expect("the deadline passes long before the request ends");
                        // Once the server has closed, a write may fail: the read says why.
                        let _ = writer.write_all(&[byte]).await;
                    }
                }
            }
        })
        .await;
        assert!(
            received.is_empty(),
            "no answer to a slow-drip client, got {:?}",
            String::from_utf8_lossy(&received)
        );
    });
    server.stop();
}

/// A client that connects and never sends a byte is dropped without an answer: the
/// kernel holds it back for the listener's `TCP_DEFER_ACCEPT` seconds (3), then the
/// handshake deadline applies.
fn silent_connect_is_dropped_without_an_answer(backend: BackendChoice) {
    let server = TestServer::start_with(backend, |c| {
        c.handshake_timeout = Duration::from_millis(300);
    });
    block_on(async {
        let mut tcp = within(WAIT, "connect", tokio::net::TcpStream::connect(server.addr))
            .await
            .expect("connect");
        let mut received = Vec::new();
        within(
            Duration::from_secs(10),
            "the server to drop a silent client",
            async {
                let mut buf = [0u8; 1024];
                loop {
                    match tcp.read(&mut buf).await {
                        Ok(0) => return,
                        Ok(n) => received.extend_from_slice(&buf[..n]),
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => return,
                        Err(e) => panic!("read: {e}"),
                    }
                }
            },
        )
        .await;
        assert!(
            received.is_empty(),
            "no answer to a silent client, got {:?}",
            String::from_utf8_lossy(&received)
        );
    });
    server.stop();
}

// ---------------------------------------------------------------------------------------
// Graceful shutdown

/// `shutdown()` sends close 1001 to every client (echo and pub/sub), each client's reply
/// completes its handshake, and `join()` returns within the drain timeout.
fn graceful_shutdown_closes_every_client_with_1001(backend: BackendChoice) {
    const DRAIN: Duration = Duration::from_secs(2);
    let server = TestServer::start_with(backend, |c| c.drain_timeout = DRAIN);
    let shared = server.shared();
    let handle = server.server().handle();
    let addr = server.addr;
    let server = server.into_server();
    let rt = runtime();
    let clients = rt.block_on(async {
        let mut clients = Vec::new();
        for i in 0..20 {
            let path = if i % 2 == 0 { "/echo" } else { "/pubsub/x" };
            clients.push(connect(addr, path).await);
        }
        assert_eq!(open_connections(&shared), 20);
        clients
    });
    let deadline = Instant::now() + DRAIN;
    handle.shutdown();
    rt.block_on(async {
        let mut tasks = tokio::task::JoinSet::new();
        for mut ws in clients {
            tasks.spawn(async move {
                let close = next_close(&mut ws).await.expect("the close has a code");
                assert_eq!(close.code, CloseCode::Away);
                read_to_end(&mut ws).await; // sends our reply, then sees the server close
            });
        }
        while let Some(done) = within(WAIT, "every client to be closed", tasks.join_next()).await {
            done.expect("client task");
        }
    });
    assert!(
        join_before(server, deadline),
        "join() should return within the drain timeout once every client has replied"
    );
    assert_eq!(open_connections(&shared), 0);
    assert_eq!(
        shared.total(|s| &s.closed),
        shared.total(|s| &s.accepted),
        "every accepted socket is closed"
    );
}

/// Kills the child on drop, so a failing test leaves no server running.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// `wsring serve` prints its address once ready; on SIGTERM its client gets close 1001 and
/// the process exits with status 0.
fn binary_drains_on_sigterm_and_exits_0(backend: BackendChoice) {
    let name = match backend {
        BackendChoice::IoUring => "io-uring",
        BackendChoice::Epoll => "epoll",
        BackendChoice::Auto => "auto",
    };
    let child = Command::new(env!("CARGO_BIN_EXE_wsring"))
        .args(["serve", "--listen", "127.0.0.1:0", "--backend", name])
        .args(["--threads", "2", "--no-pin", "--drain-timeout", "2s"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("spawn wsring serve");
    let mut child = ChildGuard(child);
    let stdout = child.0.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let mut lines = std::io::BufReader::new(stdout).lines();
        if let Some(Ok(line)) = lines.next() {
            let _ = tx.send(line);
        }
        for _ in lines {} // keep the pipe drained
    });
    let line = rx
        .recv_timeout(WAIT)
        .expect("wsring prints its address once listening");
    assert!(line.contains(&format!("backend {name}")), "{line}");
    let addr: std::net::SocketAddr = line
        .split("ws://")
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no address in {line:?}"));
    let pid = libc::pid_t::try_from(child.0.id()).expect("pid");
    block_on(async {
        let mut ws = connect(addr, "/echo").await;
        send(&mut ws, Message::text("before the signal")).await;
        assert_eq!(next_data(&mut ws).await, Message::text("before the signal"));
        // SAFETY: kill() has no memory preconditions; pid is our live child.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGTERM) }, 0);
        let close = next_close(&mut ws).await.expect("the close has a code");
        assert_eq!(close.code, CloseCode::Away);
        read_to_end(&mut ws).await;
    });
    let until = Instant::now() + WAIT;
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait for wsring") {
            break status;
        }
        assert!(Instant::now() < until, "wsring should exit after the drain");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(
        status.success(),
        "wsring exits with 0 after SIGTERM: {status}"
    );
}

// ---------------------------------------------------------------------------------------
// Pub/sub

/// A message published on t1 reaches every t1 subscriber, the sender included, and not the
/// t2 subscriber.
fn pubsub_delivers_to_every_subscriber_of_the_topic_only(backend: BackendChoice) {
    let server = TestServer::start(backend);
    let shared = server.shared();
    block_on(async {
        let mut t1 = Vec::new();
        for _ in 0..3 {
            t1.push(connect(server.addr, "/pubsub/t1").await);
        }
        let mut t2 = connect(server.addr, "/pubsub/t2").await;

        send(&mut t1[1], Message::text("hello t1")).await;
        for (i, ws) in t1.iter_mut().enumerate() {
            let what = format!("the greeting at t1 subscriber {i}");
            assert_eq!(next_data_for(ws, &what).await, Message::text("hello t1"));
        }
        // The t2 subscriber's first message is its own, not the t1 one.
        send(&mut t2, Message::binary(b"hello t2".to_vec())).await;
        assert_eq!(
            next_data(&mut t2).await,
            Message::binary(b"hello t2".to_vec())
        );
        assert_eq!(shared.total(|s| &s.messages_in), 2);
        eventually(WAIT, "every delivery to be counted", || {
            shared.total(|s| &s.messages_out) == 4
        })
        .await;
        for ws in t1.iter_mut().chain([&mut t2]) {
            close_normally(ws).await;
        }
        eventually(WAIT, "every subscriber to be uncounted", || {
            open_connections(&shared) == 0
        })
        .await;
    });
    server.stop();
}

/// 200 messages from one publisher, written back to back, arrive in order at every
/// subscriber of the topic (the publisher included), whichever worker holds it.
fn pubsub_delivers_200_messages_in_order_to_every_subscriber(backend: BackendChoice) {
    const MESSAGES: usize = 200;
    let server = TestServer::start(backend);
    let shared = server.shared();
    block_on(async {
        let mut subscribers = Vec::new();
        for _ in 0..3 {
            subscribers.push(connect(server.addr, "/pubsub/t1").await);
        }
        let publisher = &mut subscribers[0];
        for n in 0..MESSAGES {
            let message = Message::text(format!("message {n}"));
            within(WAIT, "queue a message", publisher.feed(message))
                .await
                .expect("feed");
        }
        within(WAIT, "flush", publisher.flush())
            .await
            .expect("flush");
        for (i, ws) in subscribers.iter_mut().enumerate() {
            for n in 0..MESSAGES {
                let what = format!("subscriber {i}: message {n} of {MESSAGES}");
                let message = next_data_for(ws, &what).await;
                assert_eq!(message, Message::text(format!("message {n}")), "{what}");
            }
        }
        assert_eq!(shared.total(|s| &s.messages_in), MESSAGES as u64);
        eventually(WAIT, "every delivery to be counted", || {
            shared.total(|s| &s.messages_out) == 3 * MESSAGES as u64
        })
        .await;
        for ws in &mut subscribers {
            close_normally(ws).await;
        }
    });
    server.stop();
}

// ---------------------------------------------------------------------------------------

for_both_backends!(
    echo_returns_text_and_binary_up_to_the_16mib_limit,
    fragmented_text_with_interleaved_ping_is_echoed_whole,
    reassembly_past_the_budget_pauses_a_reader_until_memory_frees,
    a_lone_message_larger_than_the_budget_still_completes,
    frame_written_byte_by_byte_is_reassembled,
    pipelined_burst_of_100_messages_is_echoed_in_full,
    ping_is_answered_with_pong_of_same_payload,
    client_close_is_echoed_with_1000,
    bad_key_is_refused_with_400,
    missing_host_is_refused_with_400,
    missing_connection_upgrade_is_refused_with_400,
    post_upgrade_is_refused_with_405,
    post_upgrade_405_names_the_allowed_method,
    plain_post_405_names_the_allowed_method,
    version_8_is_refused_with_426_naming_version_13,
    plain_get_on_an_upgrade_path_is_answered_426,
    plain_get_426_names_websocket_and_version_13,
    header_block_over_8kib_is_refused_with_431,
    long_request_with_frames_behind_it_is_upgraded_and_echoed,
    upgrade_to_unknown_path_is_refused_with_404,
    upgrade_beyond_max_connections_is_refused_with_503,
    status_page_is_html_naming_wsring,
    metrics_report_open_connections,
    echoed_messages_count_in_and_out,
    unmasked_frame_closes_with_1002,
    rsv1_without_extension_closes_with_1002,
    reserved_data_opcode_3_closes_with_1002,
    replies_and_the_close_frame_survive_unread_input_after_an_error,
    reserved_control_opcode_0xb_closes_with_1002,
    ping_of_126_bytes_closes_with_1002,
    fragmented_ping_closes_with_1002,
    continuation_without_a_message_closes_with_1002,
    new_text_inside_a_fragmented_message_closes_with_1002,
    invalid_utf8_text_closes_with_1007,
    close_with_code_1005_closes_with_1002,
    one_byte_close_payload_closes_with_1002,
    frame_over_max_message_size_closes_with_1009,
    fragmented_message_over_max_message_size_closes_with_1009,
    silent_client_is_pinged_then_dropped,
    silent_connect_is_dropped_without_an_answer,
    client_answering_pings_stays_open,
    slow_drip_handshake_is_dropped_without_an_answer,
    graceful_shutdown_closes_every_client_with_1001,
    binary_drains_on_sigterm_and_exits_0,
    pubsub_delivers_to_every_subscriber_of_the_topic_only,
    pubsub_delivers_200_messages_in_order_to_every_subscriber,
);
