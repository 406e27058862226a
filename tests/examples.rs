//! The examples as a user runs them: `chat` and `ticker` started as processes (the
//! binaries `cargo test` builds under target/<profile>/examples/), a tokio-tungstenite
//! client connected, then SIGINT or SIGTERM: the client gets close 1001 and the example
//! exits 0. The chat's rooms too: a percent-encoded room in the path, `/join`, `/leave`.
//! And `tokio_service` end to end: its token checks (deferred and first-message), its
//! HTTP API publishing and sending to one user, and its 5 s authentication deadline.

mod common;

use std::io::BufRead as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::*;
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;

/// Kills the child if the test fails before it exits.
struct ChildGuard(Child);

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// target/<profile>/examples/<name>, next to this test's own deps/ folder, built first
/// (`cargo test` builds examples only as test targets, not as the programs a user runs).
fn example(name: &str) -> PathBuf {
    static BUILT: std::sync::Once = std::sync::Once::new();
    BUILT.call_once(|| {
        let mut cargo = Command::new(env!("CARGO"));
        cargo
            .args(["build", "--quiet", "--examples"])
            .current_dir(env!("CARGO_MANIFEST_DIR"));
        if !cfg!(debug_assertions) {
            cargo.arg("--release");
        }
        let status = cargo.status().expect("run cargo build --examples");
        assert!(status.success(), "cargo build --examples: {status}");
    });
    let exe = std::env::current_exe().expect("test executable");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target/<profile>");
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.exists(),
        "{} is missing after cargo build --examples",
        path.display()
    );
    path
}

/// Starts `name` with `args` and `env`, and returns it with the address of the first
/// printed line that names one (`... ws://ADDR/...` or `http://ADDR/`).
fn start(name: &str, args: &[&str], env: &[(&str, &str)]) -> (ChildGuard, SocketAddr) {
    let (child, addr, _) = start_with_line(name, args, env);
    (child, addr)
}

/// [`start`], also returning the line the address was on.
fn start_with_line(
    name: &str,
    args: &[&str],
    env: &[(&str, &str)],
) -> (ChildGuard, SocketAddr, String) {
    let child = Command::new(example(name))
        .args(args)
        .envs(env.iter().copied())
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap_or_else(|e| panic!("spawn {name}: {e}"));
    let mut child = ChildGuard(child);
    let stdout = child.0.stdout.take().expect("stdout");
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in std::io::BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
        {
            let _ = tx.send(line);
        }
    });
    let until = Instant::now() + Duration::from_secs(20);
    loop {
        let line = rx
            .recv_timeout(until.saturating_duration_since(Instant::now()))
            .unwrap_or_else(|_| panic!("{name} printed no address"));
        let addr = line
            .split("://")
            .nth(1)
            .and_then(|rest| rest.split(['/', ' ']).next())
            .and_then(|a| a.parse().ok());
        if let Some(addr) = addr {
            return (child, addr, line);
        }
    }
}

fn signal(child: &ChildGuard, sig: libc::c_int) {
    let pid = libc::pid_t::try_from(child.0.id()).expect("pid");
    // SAFETY: kill() has no memory preconditions; pid is our live child.
    assert_eq!(unsafe { libc::kill(pid, sig) }, 0);
}

fn exits_0(mut child: ChildGuard, what: &str) {
    let until = Instant::now() + Duration::from_secs(15);
    let status = loop {
        if let Some(status) = child.0.try_wait().expect("wait") {
            break status;
        }
        assert!(Instant::now() < until, "{what} should exit after the drain");
        std::thread::sleep(Duration::from_millis(20));
    };
    assert!(status.success(), "{what} exits with 0: {status}");
}

async fn next_text(ws: &mut Ws) -> String {
    loop {
        match next_message(ws).await {
            Message::Text(t) => return t.to_string(),
            Message::Ping(_) | Message::Pong(_) => {}
            other => panic!("expected text, got {other:?}"),
        }
    }
}

#[test]
fn chat_rooms_and_sigterm_closes_its_clients_with_1001() {
    let (chat, addr) = start("chat", &[], &[("CHAT_LISTEN", "127.0.0.1:0")]);
    block_on(async {
        let mut bob = connect(addr, "/chat/tea%20room?token=bob-secret").await;
        assert_eq!(next_text(&mut bob).await, "* bob joined tea room");
        send(&mut bob, Message::text("/who")).await;
        assert_eq!(next_text(&mut bob).await, "* 1 in tea room");
        send(&mut bob, Message::text("/leave")).await;
        assert_eq!(next_text(&mut bob).await, "* bob left");
        assert_eq!(
            next_text(&mut bob).await,
            "* you left tea room; you are in lobby"
        );
        send(&mut bob, Message::text("/leave")).await;
        assert!(next_text(&mut bob).await.starts_with("* you are in lobby"));
        send(&mut bob, Message::text("/join tea room")).await;
        assert_eq!(next_text(&mut bob).await, "* you are in tea room");
        signal(&chat, libc::SIGTERM);
        let close = next_close(&mut bob).await.expect("a close code");
        assert_eq!(close.code, CloseCode::Away);
    });
    exits_0(chat, "chat");
}

#[test]
fn ticker_sigint_closes_its_clients_with_1001() {
    let (ticker, addr) = start("ticker", &["--subscribers", "20", "--seconds", "120"], &[]);
    block_on(async {
        let mut ws = connect(addr, "/ticker").await;
        let price = next_text(&mut ws).await;
        assert!(price.contains("\"symbol\""), "{price}");
        signal(&ticker, libc::SIGINT);
        let close = next_close(&mut ws).await.expect("a close code");
        assert_eq!(close.code, CloseCode::Away);
    });
    exits_0(ticker, "ticker");
}

/// `POST path` with `body` to the HTTP API; the response body.
async fn post(http: SocketAddr, path: &str, body: &str) -> String {
    let request = format!(
        "POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\
         Content-Length: {}\r\n\r\n{body}",
        body.len()
    );
    let response = http_exchange(http, &request).await;
    assert_eq!(response.status, 200, "POST {path}: {response:?}");
    response.body_text()
}

#[test]
fn tokio_service_authenticates_publishes_and_sends_to_one_user() {
    let (service, ws, line) = start_with_line(
        "tokio_service",
        &[],
        &[("WS_LISTEN", "127.0.0.1:0"), ("HTTP_LISTEN", "127.0.0.1:0")],
    );
    let http: SocketAddr = line
        .split("http://")
        .nth(1)
        .and_then(|rest| rest.split('/').next())
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| panic!("no HTTP address in {line:?}"));
    block_on(async {
        // A token in the query: checked (asynchronously) before the 101.
        let mut alice = connect(ws, "/ws?topic=news&token=alice-secret").await;
        assert_eq!(next_text(&mut alice).await, r#"{"welcome":"alice"}"#);
        // A bad token: 401, nothing opens.
        let mut bad = RawClient::connect(ws).await;
        bad.send(upgrade_request("/ws?topic=news&token=mallory").as_bytes())
            .await;
        assert_eq!(bad.read_head().await.status, 401);
        // No token: the first message authenticates.
        let mut bob = connect(ws, "/ws?topic=news").await;
        send(&mut bob, Message::text(r#"{"token":"bob-secret"}"#)).await;
        assert_eq!(next_text(&mut bob).await, r#"{"welcome":"bob"}"#);
        // Publish to the topic: both get it.
        let published = post(http, "/publish/news", "extra!").await;
        assert!(published.starts_with(r#"{"workers":"#), "{published}");
        assert_eq!(next_text(&mut alice).await, "extra!");
        assert_eq!(next_text(&mut bob).await, "extra!");
        // Send to one user: only that user's connections get it.
        let mut alice2 = connect(ws, "/ws?topic=sport&token=alice-secret").await;
        assert_eq!(next_text(&mut alice2).await, r#"{"welcome":"alice"}"#);
        assert_eq!(
            post(http, "/send/alice", "psst").await,
            "{\"connections\":2}\n"
        );
        assert_eq!(next_text(&mut alice).await, "psst");
        assert_eq!(next_text(&mut alice2).await, "psst");
        assert_eq!(
            post(http, "/send/nobody", "x").await,
            "{\"connections\":0}\n"
        );
        let stats = http_exchange(
            http,
            "GET /stats HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n",
        )
        .await
        .body_text();
        assert_eq!(stats, "{\"connections\":3,\"topics\":2,\"users\":2}\n");
        // Bob got nothing of alice's (his next message is the next publish).
        post(http, "/publish/news", "second").await;
        assert_eq!(next_text(&mut bob).await, "second");
        // Silent without a token for 5 s: closed with 1008.
        let mut silent = connect(ws, "/ws?topic=news").await;
        // (next_close waits 5 s at most: too short for a 5 s deadline on the wheel.)
        let close = tokio::time::timeout(Duration::from_secs(15), async {
            loop {
                match futures_util::StreamExt::next(&mut silent).await {
                    Some(Ok(Message::Close(frame))) => return frame,
                    Some(Ok(_)) => continue,
                    other => panic!("expected a close, got {other:?}"),
                }
            }
        })
        .await
        .expect("closed by the authentication deadline")
        .expect("a close code");
        assert_eq!(close.code, CloseCode::Policy);
        // A wrong first message: closed with 1008 at once.
        let mut wrong = connect(ws, "/ws?topic=news").await;
        send(&mut wrong, Message::text(r#"{"token":"nope"}"#)).await;
        let close = next_close(&mut wrong).await.expect("a close code");
        assert_eq!(close.code, CloseCode::Policy);
        signal(&service, libc::SIGTERM);
        let close = next_close(&mut alice).await.expect("a close code");
        assert_eq!(close.code, CloseCode::Away);
    });
    exits_0(service, "tokio_service");
}
