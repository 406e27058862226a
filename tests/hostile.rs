//! Hostile peers: what a client can do to the server on purpose, and the bound that holds
//! each time. A real server on 127.0.0.1 (one worker, so that an attacker and the
//! well-behaved probe share it) driven by raw sockets that write what a well-behaved client
//! never would. Every test runs on both backends (`io_uring::<name>`, `epoll::<name>`).
//!
//! The bounds asserted: RSS growth (the server runs in this process), the close code, the
//! counters of `/metrics` (through `Shared`), and that a well-behaved connection on the
//! same worker is still answered within a second while the attack runs. The tests take a
//! lock one at a time, so one test's memory never shows in another's RSS bound.

#[macro_use]
mod common;

use std::net::SocketAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use common::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use wsring::engine::{BackendChoice, EngineConfig};

static ONE_AT_A_TIME: Mutex<()> = Mutex::new(());

fn serial() -> std::sync::MutexGuard<'static, ()> {
    ONE_AT_A_TIME.lock().unwrap_or_else(|e| e.into_inner())
}

/// A one-worker server with `configure` applied.
fn one_worker(backend: BackendChoice, configure: impl FnOnce(&mut EngineConfig)) -> TestServer {
    TestServer::start_with(backend, |c| {
        c.threads = 1;
        configure(c);
    })
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .expect("/proc/self/status")
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|v| v.parse().ok())
        .expect("VmRSS")
}

/// Opens a TCP connection with a 4 KiB receive buffer (so that a client that does not
/// read pushes back at once) and upgrades it to `path`.
async fn upgrade_tiny_window(addr: SocketAddr, path: &str) -> TcpStream {
    let socket = TcpSocket::new_v4().expect("socket");
    socket.set_recv_buffer_size(4096).expect("SO_RCVBUF");
    let mut tcp = within(WAIT, "TCP connect", socket.connect(addr))
        .await
        .expect("connect");
    tcp.set_nodelay(true).expect("nodelay");
    tcp.write_all(upgrade_request(path).as_bytes())
        .await
        .expect("write the upgrade request");
    let mut head = Vec::new();
    within(WAIT, "the 101", async {
        let mut b = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            tcp.read_exact(&mut b).await.expect("read the 101");
            head.push(b[0]);
        }
    })
    .await;
    assert!(head.starts_with(b"HTTP/1.1 101"), "{head:?}");
    tcp
}

/// Writes `frame` over and over for `duration` or until `limit` bytes, never reading;
/// returns the bytes the server took. Writes that block (the server stopped reading) end
/// the flood early once they have blocked for a second.
async fn flood(tcp: &mut TcpStream, frame: &[u8], duration: Duration, limit: usize) -> usize {
    let burst: Vec<u8> = frame.repeat((64 * 1024 / frame.len()).max(1));
    let end = Instant::now() + duration;
    let mut sent = 0;
    while Instant::now() < end && sent < limit {
        match tokio::time::timeout(Duration::from_secs(1), tcp.write_all(&burst)).await {
            Ok(Ok(())) => sent += burst.len(),
            Ok(Err(_)) | Err(_) => break,
        }
    }
    sent
}

/// The probe: an echo of a small message on a well-behaved connection comes back within
/// a second (the worker is not held by the attack).
async fn probe_answers_within_a_second(probe: &mut RawClient, n: u32) {
    let payload = format!("probe {n}");
    probe.send(&frame(true, TEXT, payload.as_bytes())).await;
    let echo = within(
        Duration::from_secs(1),
        "the probe's echo while the attack runs",
        probe.read_frame(),
    )
    .await;
    assert_eq!(echo.payload, payload.as_bytes());
}

// ---------------------------------------------------------------------------------------
// Queues

/// A client sending 125-byte pings as fast as it can and never reading: its pongs collapse
/// into one owed pong past the soft limit, so 64 MiB of pings grow the server by far less
/// than 64 MiB (before the bound, every pong was queued: RSS grew by what was sent); a
/// probe on the same worker is still answered.
fn ping_flood_without_reading_keeps_memory_bounded(backend: BackendChoice) {
    let _serial = serial();
    let server = one_worker(backend, |_| {});
    block_on(async {
        let mut probe = RawClient::upgrade(server.addr, "/echo").await;
        probe_answers_within_a_second(&mut probe, 0).await;
        let before = rss_kib();
        let mut attacker = upgrade_tiny_window(server.addr, "/echo").await;
        let ping = frame(true, PING, &[0x55; 125]);
        let flooding = tokio::spawn(async move {
            let sent = flood(&mut attacker, &ping, Duration::from_secs(10), 64 << 20).await;
            (sent, attacker)
        });
        for n in 1..=5 {
            tokio::time::sleep(Duration::from_millis(200)).await;
            probe_answers_within_a_second(&mut probe, n).await;
        }
        let (sent, _attacker) = flooding.await.expect("flood task");
        let grown = rss_kib().saturating_sub(before);
        assert!(
            sent >= 16 << 20,
            "the server stopped reading pings: {sent} bytes"
        );
        assert!(
            grown < 24 * 1024,
            "RSS grew by {grown} KiB for {} MiB of pings never read",
            sent >> 20
        );
        probe_answers_within_a_second(&mut probe, 99).await;
    });
    server.stop();
}

/// With the drop policy (nothing closes the connection), a client that sends messages to
/// `/echo` and never reads stops being read once its queue passes the hard limit: TCP flow
/// control holds it back, and memory stays near the hard limit.
fn echo_flood_without_reading_stops_reading_past_the_hard_limit(backend: BackendChoice) {
    let _serial = serial();
    let server = one_worker(backend, |c| c.policy = wsring::Policy::DropNew);
    let shared = server.shared();
    block_on(async {
        let mut probe = RawClient::upgrade(server.addr, "/echo").await;
        let before = rss_kib();
        let mut attacker = upgrade_tiny_window(server.addr, "/echo").await;
        let message = frame(true, BINARY, &[7u8; 16 * 1024]);
        let sent = flood(&mut attacker, &message, Duration::from_secs(4), 64 << 20).await;
        let pauses = shared.total(|s| &s.queue_pauses);
        assert!(pauses >= 1, "reading never paused ({sent} bytes taken)");
        assert!(
            sent < 32 << 20,
            "the server kept reading a client whose queue is full: {sent} bytes"
        );
        let grown = rss_kib().saturating_sub(before);
        assert!(grown < 16 * 1024, "RSS grew by {grown} KiB");
        probe_answers_within_a_second(&mut probe, 1).await;
        drop(attacker);
    });
    server.stop();
}

// ---------------------------------------------------------------------------------------
// Reassembly budget

/// The header of a 16 MiB frame, masked, followed by `payload_bytes` payload bytes.
fn announced_16mib(payload_bytes: usize) -> Vec<u8> {
    let mut out = vec![0x82, 0x80 | 127];
    out.extend_from_slice(&(16u64 << 20).to_be_bytes());
    out.extend_from_slice(&[1, 2, 3, 4]);
    out.extend(std::iter::repeat_n(0u8, payload_bytes));
    out
}

/// `n` connections that each announce a 16 MiB frame and send `payload_bytes` of it.
async fn holders(addr: SocketAddr, n: usize, payload_bytes: usize) -> Vec<RawClient> {
    let mut held = Vec::new();
    for _ in 0..n {
        let mut a = RawClient::upgrade(addr, "/echo").await;
        a.send(&announced_16mib(payload_bytes)).await;
        held.push(a);
    }
    held
}

/// Sends `payload` as one binary frame in two writes 5 ms apart (so that the message is
/// reassembled across reads) and reads its echo within `secs` seconds.
async fn echo_in_two_writes(
    good: &mut RawClient,
    payload: &[u8],
    secs: u64,
    what: &str,
) -> ServerFrame {
    let whole = frame(true, BINARY, payload);
    let (head, tail) = whole.split_at(whole.len() / 2);
    good.send(head).await;
    tokio::time::sleep(Duration::from_millis(5)).await;
    good.send(tail).await;
    within(Duration::from_secs(secs), what, good.read_frame()).await
}

/// 350 connections each announcing a 16 MiB frame and sending one byte of it (~5 KB in
/// all) do not starve a well-behaved 200 KiB echo: the budget counts what peers really
/// made the server hold (before the fix, each reserved 1 MiB ahead, 350 MiB against a
/// 256 MiB budget, and every later message waited).
fn announced_huge_frames_do_not_starve_a_well_behaved_echo(backend: BackendChoice) {
    let _serial = serial();
    let server = one_worker(backend, |_| {});
    block_on(async {
        let attackers = holders(server.addr, 350, 1).await;
        let mut good = RawClient::upgrade(server.addr, "/echo").await;
        for n in 0..8u8 {
            let payload = vec![n; 200 * 1024];
            let echo = echo_in_two_writes(&mut good, &payload, 2, "the 200 KiB echo").await;
            assert_eq!(echo.payload.len(), payload.len());
            assert!(echo.payload == payload, "echo {n} differs");
        }
        drop(attackers);
    });
    server.stop();
}

/// Over a small budget, the peers holding the most wait and a smaller message of a
/// well-behaved peer still completes.
fn over_budget_the_largest_holders_wait_and_a_small_message_completes(backend: BackendChoice) {
    let _serial = serial();
    let server = one_worker(backend, |c| c.reassembly_budget = 1 << 20);
    let shared = server.shared();
    block_on(async {
        let attackers = holders(server.addr, 24, 64 * 1024).await;
        eventually(WAIT, "the budget to be spent", || {
            shared.total(|s| &s.reassembly_pauses) > 0
        })
        .await;
        let mut good = RawClient::upgrade(server.addr, "/echo").await;
        for n in 0..4u8 {
            let payload = vec![n; 32 * 1024];
            let echo = echo_in_two_writes(&mut good, &payload, 1, "the 32 KiB echo").await;
            assert!(echo.payload == payload, "echo {n} differs");
        }
        drop(attackers);
    });
    server.stop();
}

/// Slowloris after the upgrade: a frame announced and left unfinished is closed with 1008
/// when the message timeout passes, though the connection keeps sending (so the ping timer
/// never fires).
fn message_not_complete_within_its_timeout_closes_with_1008(backend: BackendChoice) {
    let _serial = serial();
    let server = one_worker(backend, |c| {
        c.message_timeout = Some(Duration::from_secs(1))
    });
    let shared = server.shared();
    block_on(async {
        let mut slow = RawClient::upgrade(server.addr, "/echo").await;
        slow.send(&announced_16mib(10)).await;
        let started = Instant::now();
        let mut dripping = true;
        while dripping && started.elapsed() < Duration::from_secs(4) {
            tokio::time::sleep(Duration::from_millis(200)).await;
            dripping = slow.stream.write_all(&[0u8]).await.is_ok();
        }
        slow.expect_close(1008).await;
        assert_eq!(shared.total(|s| &s.message_timeouts), 1);
    });
    server.stop();
}

// ---------------------------------------------------------------------------------------
// Fair reading

/// A client flooding empty pongs (the cheapest frames to send, the most events per byte)
/// does not hold the worker: a probe on the same worker is answered within a second
/// throughout, and a silent client's ping and pong deadlines still fire on time.
fn fast_sender_does_not_starve_other_connections_or_timers(backend: BackendChoice) {
    let _serial = serial();
    let server = one_worker(backend, |c| {
        c.ping_interval = Some(Duration::from_millis(500));
        c.pong_timeout = Duration::from_millis(500);
    });
    block_on(async {
        let mut probe = RawClient::upgrade(server.addr, "/echo").await;
        let mut silent = RawClient::upgrade(server.addr, "/echo").await;
        let mut attacker = RawClient::upgrade(server.addr, "/echo").await;
        let pong = frame(true, PONG, b"");
        let flooding = tokio::spawn(async move {
            flood(
                &mut attacker.stream,
                &pong,
                Duration::from_secs(4),
                usize::MAX,
            )
            .await
        });
        let started = Instant::now();
        let mut n = 0;
        // The probe answers pings too (it is read, and its own pong keeps it alive).
        while started.elapsed() < Duration::from_secs(3) {
            n += 1;
            let payload = format!("probe {n}");
            probe.send(&frame(true, TEXT, payload.as_bytes())).await;
            loop {
                let f = within(
                    Duration::from_secs(1),
                    "the probe's echo while a peer floods pongs",
                    probe.read_frame(),
                )
                .await;
                if f.opcode() == PING {
                    probe.send(&frame(true, PONG, &f.payload)).await;
                    continue;
                }
                assert_eq!(f.payload, payload.as_bytes());
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        // The silent client got its ping at ~0.5 s and was dropped at ~1 s.
        let ping = silent.read_frame_for("the silent client's ping").await;
        assert_eq!(ping.opcode(), PING);
        within(
            Duration::from_secs(1),
            "the silent client to be dropped",
            async { silent.expect_eof().await },
        )
        .await;
        let sent = flooding.await.expect("flood task");
        assert!(sent > 1 << 20, "the flood did not run: {sent} bytes");
    });
    server.stop();
}

// ---------------------------------------------------------------------------------------
// Deadlines of closed and stuck connections

/// Peers that read nothing get their echo queues pushed past the hard limit (close 1013
/// queued behind bytes they will never read), then send Close(1000): they are gone within
/// the close timeout (before the fix, closing cleared every deadline and they stayed).
fn closed_connection_whose_last_bytes_are_not_read_is_dropped_within_close_timeout(
    backend: BackendChoice,
) {
    let _serial = serial();
    let server = one_worker(backend, |c| {
        c.close_timeout = Duration::from_secs(1);
        c.send_timeout = None;
        c.ping_interval = None;
    });
    let shared = server.shared();
    block_on(async {
        let mut peers = Vec::new();
        for _ in 0..8 {
            let mut tcp = upgrade_tiny_window(server.addr, "/echo").await;
            let message = frame(true, BINARY, &[3u8; 64 * 1024]);
            // The kernel's buffers take a few MiB before the server's own queue grows.
            for _ in 0..256 {
                if tokio::time::timeout(Duration::from_millis(500), tcp.write_all(&message))
                    .await
                    .is_err()
                {
                    break;
                }
            }
            peers.push(tcp);
        }
        eventually(WAIT, "every peer to pass its hard limit", || {
            shared.total(|s| &s.backpressure_closes) == 8
        })
        .await;
        let close = frame(true, CLOSE, &1000u16.to_be_bytes());
        for tcp in &mut peers {
            let _ = tokio::time::timeout(Duration::from_millis(500), tcp.write_all(&close)).await;
        }
        // Close timeout 1 s, timer wheel ticks of 20 ms: gone well within 3 s.
        eventually(
            Duration::from_secs(3),
            "the closed peers to be dropped",
            || open_connections(&shared) == 0,
        )
        .await;
        eventually(Duration::from_secs(3), "their sockets to be freed", || {
            shared.sockets.load(std::sync::atomic::Ordering::Acquire) == 0
        })
        .await;
    });
    server.stop();
}

/// A subscriber that stops reading while its queue stays under the hard limit (so no
/// policy applies) is dropped once its queue made no progress for the send timeout.
fn send_that_makes_no_progress_drops_the_connection(backend: BackendChoice) {
    let _serial = serial();
    let server = one_worker(backend, |c| {
        c.send_timeout = Some(Duration::from_secs(1));
        c.send_queue_hard = 64 << 20;
        c.send_queue_soft = 32 << 20;
    });
    let shared = server.shared();
    block_on(async {
        let stuck = upgrade_tiny_window(server.addr, "/pubsub/stuck").await;
        let mut publisher = RawClient::upgrade(server.addr, "/pubsub/stuck").await;
        // 16 MiB: more than the kernel's socket buffers take for the stuck subscriber.
        for _ in 0..256 {
            publisher
                .send(&frame(true, BINARY, &[9u8; 64 * 1024]))
                .await;
            let echo = publisher.read_frame_for("the publisher's own copy").await;
            assert_eq!(echo.payload.len(), 64 * 1024);
        }
        eventually(WAIT, "the stuck subscriber to be dropped", || {
            shared.total(|s| &s.send_timeouts) == 1
        })
        .await;
        // Dropped, not just counted: the close completes a moment later on io_uring.
        eventually(WAIT, "the stuck subscriber's slot to be freed", || {
            open_connections(&shared) == 1
        })
        .await;
        probe_answers_within_a_second(&mut publisher, 1).await;
        assert_eq!(shared.total(|s| &s.backpressure_closes), 0);
        drop(stuck);
    });
    server.stop();
}

// ---------------------------------------------------------------------------------------
// Sockets and HTTP

/// Sockets still in their handshake count against the socket limit: beyond it a new
/// socket gets 503 at once (instead of filling the descriptor table), and once the
/// hangers-on leave, upgrades work again.
fn handshakes_count_against_the_socket_limit(backend: BackendChoice) {
    let _serial = serial();
    let server = one_worker(backend, |c| c.max_connections = 8);
    let shared = server.shared();
    let limit = shared.socket_limit;
    assert_eq!(limit, 8 + 1 + 16);
    block_on(async {
        let mut hangers = Vec::new();
        for _ in 0..limit {
            let mut c = RawClient::connect(server.addr).await;
            // A request line and no more: the socket is accepted and stays in its
            // handshake.
            c.send(b"GET /echo HTTP/1.1\r\n").await;
            hangers.push(c);
        }
        eventually(WAIT, "every hanger-on to be accepted", || {
            shared.sockets.load(std::sync::atomic::Ordering::Acquire) == limit
        })
        .await;
        let mut extra = RawClient::connect(server.addr).await;
        extra.send(upgrade_request("/echo").as_bytes()).await;
        let refused = extra.read_response().await;
        assert_eq!(refused.status, 503);
        assert!(shared.total(|s| &s.refused_sockets) >= 1);
        drop(extra);
        drop(hangers);
        eventually(WAIT, "the hangers-on to be gone", || {
            shared.sockets.load(std::sync::atomic::Ordering::Acquire) == 0
        })
        .await;
        let mut ok = RawClient::upgrade(server.addr, "/echo").await;
        probe_answers_within_a_second(&mut ok, 1).await;
    });
    server.stop();
}

/// `HEAD` gets the head of the `GET` answer (its Content-Length included) and no body.
fn head_request_gets_no_body(backend: BackendChoice) {
    let _serial = serial();
    let server = one_worker(backend, |_| {});
    block_on(async {
        let mut c = RawClient::connect(server.addr).await;
        c.send(b"HEAD / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n").await;
        let head = c.read_head().await;
        assert_eq!(head.status, 200);
        let len: usize = head
            .header("content-length")
            .and_then(|v| v.parse().ok())
            .expect("Content-Length");
        assert!(len > 0);
        c.expect_eof().await; // no body bytes before the end
    });
    server.stop();
}

/// A request whose body the server never reads (a POST, answered 405) still gets its
/// whole answer: the server sends the FIN and reads on until the client closes, instead
/// of closing on unread bytes (which resets the connection and destroys the answer).
fn answer_survives_an_unread_request_body(backend: BackendChoice) {
    let _serial = serial();
    let server = one_worker(backend, |_| {});
    let shared = server.shared();
    block_on(async {
        for _ in 0..10 {
            let c = RawClient::connect(server.addr).await;
            let body = vec![b'x'; 512 * 1024];
            let mut request = format!(
                "POST /upload HTTP/1.1\r\nHost: h\r\nContent-Length: {}\r\n\r\n",
                body.len()
            )
            .into_bytes();
            request.extend_from_slice(&body);
            // Written from a task so that the answer can be read meanwhile.
            let (mut rd, mut wr) = c.stream.into_split();
            let writer = tokio::spawn(async move {
                let _ = wr.write_all(&request).await;
                wr
            });
            let mut answer = Vec::new();
            within(WAIT, "the 405 answer", async {
                let mut b = vec![0u8; 4096];
                loop {
                    match rd.read(&mut b).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => answer.extend_from_slice(&b[..n]),
                    }
                }
            })
            .await;
            let _ = writer.await;
            assert!(
                answer.starts_with(b"HTTP/1.1 405"),
                "answer lost: {:?}",
                String::from_utf8_lossy(&answer)
            );
        }
        eventually(WAIT, "the answered sockets to be closed", || {
            shared.sockets.load(std::sync::atomic::Ordering::Acquire) == 0
        })
        .await;
    });
    server.stop();
}

for_both_backends!(
    ping_flood_without_reading_keeps_memory_bounded,
    echo_flood_without_reading_stops_reading_past_the_hard_limit,
    announced_huge_frames_do_not_starve_a_well_behaved_echo,
    over_budget_the_largest_holders_wait_and_a_small_message_completes,
    message_not_complete_within_its_timeout_closes_with_1008,
    fast_sender_does_not_starve_other_connections_or_timers,
    closed_connection_whose_last_bytes_are_not_read_is_dropped_within_close_timeout,
    send_that_makes_no_progress_drops_the_connection,
    handshakes_count_against_the_socket_limit,
    head_request_gets_no_body,
    answer_survives_an_unread_request_body,
);
