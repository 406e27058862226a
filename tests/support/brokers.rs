//! Real broker servers for integration tests: a `redis-server` or `nats-server` started as
//! a child process on a free loopback port, waited for until it answers, killable and
//! restartable on the same port, and killed (by its own PID, nothing else) on drop.
//!
//! A missing binary skips the test (`BrokerServer::start` returns `None` after saying so
//! on stderr) unless `WSRING_REQUIRE_BROKERS=1`, in which case it fails.

// Each test binary uses a different subset of these helpers.
#![allow(dead_code)]

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Which server.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    /// `redis-server`.
    Redis,
    /// `nats-server`.
    Nats,
}

impl Kind {
    fn binary(self) -> &'static str {
        match self {
            Kind::Redis => "redis-server",
            Kind::Nats => "nats-server",
        }
    }
}

/// Where `name` is: on `PATH`, or in the usual system directories (`nats-server` is in
/// /usr/sbin on Debian, which a user's `PATH` may lack).
pub fn find_binary(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/bin", "/usr/local/bin", "/usr/local/sbin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// Whether a missing broker binary fails the test instead of skipping it.
pub fn brokers_required() -> bool {
    std::env::var("WSRING_REQUIRE_BROKERS").is_ok_and(|v| v == "1")
}

/// A free port on 127.0.0.1 (bound and released; the server binds it again at once).
pub fn free_port() -> u16 {
    let l = TcpListener::bind("127.0.0.1:0").expect("bind 127.0.0.1:0");
    l.local_addr().expect("local_addr").port()
}

/// One broker server process.
pub struct BrokerServer {
    kind: Kind,
    binary: PathBuf,
    port: u16,
    child: Option<Child>,
}

/// The bound on a server's start (it is up in milliseconds on loopback).
pub const START_WAIT: Duration = Duration::from_secs(10);

impl BrokerServer {
    /// Starts a server of `kind` on a free port and waits until it answers. `None` (after
    /// an eprintln) if the binary is not installed, unless brokers are required.
    ///
    /// # Panics
    /// If the binary is missing and `WSRING_REQUIRE_BROKERS=1`, or the server does not
    /// come up within [`START_WAIT`].
    pub fn start(kind: Kind) -> Option<BrokerServer> {
        let Some(binary) = find_binary(kind.binary()) else {
            assert!(
                !brokers_required(),
                "{} is not installed and WSRING_REQUIRE_BROKERS=1",
                kind.binary()
            );
            eprintln!(
                "skipping: {} is not installed (set WSRING_REQUIRE_BROKERS=1 to fail instead)",
                kind.binary()
            );
            return None;
        };
        let mut s = BrokerServer {
            kind,
            binary,
            port: free_port(),
            child: None,
        };
        s.spawn();
        Some(s)
    }

    /// Its port on 127.0.0.1.
    pub fn port(&self) -> u16 {
        self.port
    }

    /// Its address.
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::from(([127, 0, 0, 1], self.port))
    }

    /// Its URL (`redis://127.0.0.1:P` or `nats://127.0.0.1:P`).
    pub fn url(&self) -> String {
        match self.kind {
            Kind::Redis => format!("redis://127.0.0.1:{}", self.port),
            Kind::Nats => format!("nats://127.0.0.1:{}", self.port),
        }
    }

    /// The child's PID while it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    fn spawn(&mut self) {
        let port = self.port.to_string();
        let mut cmd = Command::new(&self.binary);
        match self.kind {
            Kind::Redis => cmd.args([
                "--port",
                &port,
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ]),
            Kind::Nats => cmd.args(["-a", "127.0.0.1", "-p", &port]),
        };
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::null());
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("spawn {}: {e}", self.binary.display()));
        self.child = Some(child);
        self.wait_ready();
    }

    /// Waits until the server answers its protocol's hello (Redis `PING` -> `+PONG`, NATS
    /// greets with `INFO`).
    fn wait_ready(&mut self) {
        let deadline = Instant::now() + START_WAIT;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                panic!(
                    "{} on port {} exited at start: {status}",
                    self.kind.binary(),
                    self.port
                );
            }
            if self.answers() {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{} on port {} did not come up within {START_WAIT:?}",
                self.kind.binary(),
                self.port
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn answers(&self) -> bool {
        let Ok(mut s) = TcpStream::connect_timeout(&self.addr(), Duration::from_millis(200)) else {
            return false;
        };
        let _ = s.set_read_timeout(Some(Duration::from_millis(500)));
        let expect: &[u8] = match self.kind {
            Kind::Redis => {
                if s.write_all(b"PING\r\n").is_err() {
                    return false;
                }
                b"+PONG"
            }
            Kind::Nats => b"INFO",
        };
        let mut buf = [0u8; 5];
        let n = expect.len();
        s.read_exact(&mut buf[..n]).is_ok() && &buf[..n] == expect
    }

    /// Kills the server (SIGKILL to its own PID) and reaps it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Starts it again on the same port (after [`BrokerServer::kill`]; kills it first if
    /// it still runs).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
    }

    /// Freezes (`SIGSTOP`) or thaws (`SIGCONT`) the server: its connections stay open but
    /// nothing is answered, like a wedged broker.
    pub fn freeze(&self, frozen: bool) {
        let Some(pid) = self.pid() else { return };
        let status = Command::new("kill")
            .arg(if frozen { "-STOP" } else { "-CONT" })
            .arg(pid.to_string())
            .status()
            .expect("run kill");
        assert!(status.success(), "kill -STOP/-CONT {pid}");
    }

    /// One Redis command over a fresh connection; the raw RESP reply (for checks such as
    /// `PUBSUB CHANNELS`).
    pub fn redis_command(&self, args: &[&str]) -> String {
        assert_eq!(self.kind, Kind::Redis);
        let mut s = TcpStream::connect_timeout(&self.addr(), Duration::from_secs(2))
            .expect("connect to redis");
        s.set_read_timeout(Some(Duration::from_millis(300)))
            .expect("set_read_timeout");
        let mut req = format!("*{}\r\n", args.len());
        for a in args {
            req.push_str(&format!("${}\r\n{a}\r\n", a.len()));
        }
        s.write_all(req.as_bytes()).expect("write to redis");
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        // Read until the reply pauses (these replies are small and come in one piece).
        while let Ok(n) = s.read(&mut buf) {
            if n == 0 {
                break;
            }
            out.extend_from_slice(&buf[..n]);
            s.set_read_timeout(Some(Duration::from_millis(50)))
                .expect("set_read_timeout");
        }
        String::from_utf8_lossy(&out).into_owned()
    }
}

impl Drop for BrokerServer {
    fn drop(&mut self) {
        // A frozen server must be thawed for SIGKILL to reap it promptly; SIGKILL works on
        // a stopped process anyway, so just kill.
        self.kill();
    }
}
