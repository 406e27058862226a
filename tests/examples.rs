//! The examples as a user runs them: `chat` and `ticker` started as processes (the
//! binaries `cargo test` builds under target/<profile>/examples/), a tokio-tungstenite
//! client connected, then SIGINT or SIGTERM: the client gets close 1001 and the example
//! exits 0. The chat's rooms too: a percent-encoded room in the path, `/join`, `/leave`.

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
            return (child, addr);
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
