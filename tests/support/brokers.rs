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
    /// Arguments after the defaults (cluster mode).
    extra: Vec<String>,
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
        Self::start_with(kind, Vec::new())
    }

    /// [`BrokerServer::start`] with more arguments for the server.
    pub fn start_with(kind: Kind, extra: Vec<String>) -> Option<BrokerServer> {
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
            extra,
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
        cmd.args(&self.extra);
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
        let args: Vec<&[u8]> = args.iter().map(|a| a.as_bytes()).collect();
        self.redis_command_bytes(&args)
    }

    /// [`BrokerServer::redis_command`] with binary arguments.
    pub fn redis_command_bytes(&self, args: &[&[u8]]) -> String {
        // An empty reply (no answer within the timeout, or the connection dropped) is
        // asked again on a new connection, twice at most: a CI run once got "" for an
        // XLEN at the end of a test whose every other step had passed.
        for attempt in 0..3 {
            match self.redis_command_once(args) {
                Ok(reply) if !reply.is_empty() => return reply,
                Ok(_) => eprintln!("redis: empty reply (attempt {attempt})"),
                Err(e) => eprintln!("redis: {e} (attempt {attempt})"),
            }
            std::thread::sleep(Duration::from_millis(200));
        }
        String::new()
    }

    fn redis_command_once(&self, args: &[&[u8]]) -> std::io::Result<String> {
        assert_eq!(self.kind, Kind::Redis);
        let mut s = TcpStream::connect_timeout(&self.addr(), Duration::from_secs(2))?;
        // A loaded machine may take its time to answer: wait up to 5 s for a whole reply.
        s.set_read_timeout(Some(Duration::from_secs(5)))
            .expect("set_read_timeout");
        let mut req = format!("*{}\r\n", args.len()).into_bytes();
        for a in args {
            req.extend_from_slice(format!("${}\r\n", a.len()).as_bytes());
            req.extend_from_slice(a);
            req.extend_from_slice(b"\r\n");
        }
        s.write_all(&req)?;
        let mut out = Vec::new();
        let mut buf = [0u8; 4096];
        while !resp_complete(&out) {
            match s.read(&mut buf) {
                Ok(0) => break,
                Err(e) if out.is_empty() => return Err(e),
                Err(_) => break,
                Ok(n) => out.extend_from_slice(&buf[..n]),
            }
            if out.first() == Some(&b'*') {
                // An array (not parsed here): once it began, take what comes without a pause.
                s.set_read_timeout(Some(Duration::from_millis(50)))
                    .expect("set_read_timeout");
            }
        }
        Ok(String::from_utf8_lossy(&out).into_owned())
    }
}

/// Whether `out` holds a whole RESP reply: a simple string, error or integer up to its
/// CRLF, a bulk string up to its announced length (arrays are read until they pause).
fn resp_complete(out: &[u8]) -> bool {
    let Some(end) = out.windows(2).position(|w| w == b"\r\n") else {
        return false;
    };
    match out.first() {
        Some(b'+' | b'-' | b':') => true,
        Some(b'$') => match std::str::from_utf8(&out[1..end])
            .ok()
            .and_then(|n| n.parse::<i64>().ok())
        {
            Some(n) if n < 0 => true,
            Some(n) => out.len() >= end + 2 + n as usize + 2,
            None => true,
        },
        _ => false,
    }
}

impl Drop for BrokerServer {
    fn drop(&mut self) {
        // A frozen server must be thawed for SIGKILL to reap it promptly; SIGKILL works on
        // a stopped process anyway, so just kill.
        self.kill();
    }
}

/// A Redis Cluster on loopback: `masters` `redis-server`s in cluster mode (no replicas),
/// joined by `redis-cli --cluster create`, and waited for until every node says
/// `cluster_state:ok`. Its node configuration files live in a directory of its own,
/// removed on drop (with the servers).
pub struct RedisCluster {
    /// The masters, in the order they were created (`redis-cli` gives them equal slot
    /// ranges in this order).
    pub nodes: Vec<BrokerServer>,
    dir: PathBuf,
}

impl RedisCluster {
    /// Starts the cluster. `None` if `redis-server` or `redis-cli` is missing (unless
    /// brokers are required).
    ///
    /// # Panics
    /// A binary missing with `WSRING_REQUIRE_BROKERS=1`, or a cluster that does not form
    /// within 30 s.
    pub fn start(masters: usize) -> Option<RedisCluster> {
        let Some(cli) = find_binary("redis-cli") else {
            assert!(
                !brokers_required(),
                "redis-cli is not installed and WSRING_REQUIRE_BROKERS=1"
            );
            eprintln!("skipping: redis-cli is not installed");
            return None;
        };
        let dir = std::env::temp_dir().join(format!(
            "wsring-cluster-{}-{}",
            std::process::id(),
            free_port()
        ));
        std::fs::create_dir_all(&dir).expect("cluster dir");
        let mut nodes = Vec::new();
        for i in 0..masters {
            let extra = vec![
                "--cluster-enabled".to_owned(),
                "yes".to_owned(),
                "--cluster-config-file".to_owned(),
                dir.join(format!("nodes-{i}.conf")).display().to_string(),
                "--dir".to_owned(),
                dir.display().to_string(),
                "--cluster-node-timeout".to_owned(),
                "2000".to_owned(),
            ];
            nodes.push(BrokerServer::start_with(Kind::Redis, extra)?);
        }
        let cluster = RedisCluster { nodes, dir };
        let mut create = Command::new(cli);
        create.arg("--cluster").arg("create");
        for n in &cluster.nodes {
            create.arg(format!("127.0.0.1:{}", n.port()));
        }
        let out = create
            .args(["--cluster-replicas", "0", "--cluster-yes"])
            .stdin(Stdio::null())
            .output()
            .expect("run redis-cli --cluster create");
        assert!(
            out.status.success(),
            "redis-cli --cluster create: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        cluster.wait_ok();
        Some(cluster)
    }

    /// Waits until every node reports `cluster_state:ok` and the same slot owners.
    pub fn wait_ok(&self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let ok = self.nodes.iter().all(|n| {
                n.redis_command(&["CLUSTER", "INFO"])
                    .contains("cluster_state:ok")
            });
            let views: Vec<Vec<usize>> = (0..self.nodes.len())
                .map(|view| {
                    (0..self.nodes.len())
                        .map(|m| self.slots_seen_by(view, m))
                        .collect()
                })
                .collect();
            if ok && views.windows(2).all(|w| w[0] == w[1]) {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "the Redis Cluster did not become ok within 30 s"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Seed URLs of every node.
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(BrokerServer::url).collect()
    }

    /// A node's id (`CLUSTER MYID`).
    pub fn id(&self, node: usize) -> String {
        let reply = self.nodes[node].redis_command(&["CLUSTER", "MYID"]);
        // `$40\r\n<id>\r\n`
        reply
            .lines()
            .nth(1)
            .expect("CLUSTER MYID reply")
            .trim()
            .to_owned()
    }

    /// The slot of `key` (`CLUSTER KEYSLOT`).
    pub fn slot(&self, key: &str) -> u16 {
        let reply = self.nodes[0].redis_command(&["CLUSTER", "KEYSLOT", key]);
        reply
            .trim()
            .trim_start_matches(':')
            .parse()
            .expect("CLUSTER KEYSLOT reply")
    }

    /// The slot ranges `node` says it owns itself (its `myself` line of `CLUSTER NODES`).
    fn own_ranges(&self, node: usize) -> Vec<(u16, u16)> {
        let reply = self.nodes[node].redis_command(&["CLUSTER", "NODES"]);
        let line = reply
            .lines()
            .find(|l| l.contains("myself"))
            .expect("a myself line in CLUSTER NODES");
        slot_ranges(line)
    }

    /// How many slots `view` says `master` owns (from its `CLUSTER NODES`).
    fn slots_seen_by(&self, view: usize, master: usize) -> usize {
        let port = self.nodes[master].port();
        let reply = self.nodes[view].redis_command(&["CLUSTER", "NODES"]);
        reply
            .lines()
            .find(|l| l.contains(&format!("127.0.0.1:{port}@")))
            .map_or(0, |line| {
                slot_ranges(line)
                    .iter()
                    .map(|&(a, b)| usize::from(b - a) + 1)
                    .sum()
            })
    }

    /// The master that owns `key`'s slot.
    pub fn owner_of(&self, key: &str) -> usize {
        let slot = self.slot(key);
        (0..self.nodes.len())
            .find(|&n| {
                self.own_ranges(n)
                    .iter()
                    .any(|&(a, b)| (a..=b).contains(&slot))
            })
            .expect("an owner for every slot")
    }

    /// Moves `slot` from master `from` to master `to` (it holds no keys: pub/sub only), the
    /// way `redis-cli --cluster reshard` does it, and waits until every node agrees.
    pub fn move_slot(&self, slot: u16, from: usize, to: usize) {
        let (from_id, to_id) = (self.id(from), self.id(to));
        let slot = slot.to_string();
        let ok = |node: usize, args: &[&str]| {
            let reply = self.nodes[node].redis_command(args);
            assert!(reply.starts_with("+OK"), "{args:?} on node {node}: {reply}");
        };
        ok(to, &["CLUSTER", "SETSLOT", &slot, "IMPORTING", &from_id]);
        ok(from, &["CLUSTER", "SETSLOT", &slot, "MIGRATING", &to_id]);
        ok(to, &["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]);
        ok(from, &["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]);
        for other in (0..self.nodes.len()).filter(|&n| n != from && n != to) {
            ok(other, &["CLUSTER", "SETSLOT", &slot, "NODE", &to_id]);
        }
        self.wait_ok();
    }
}

/// The slot ranges of one `CLUSTER NODES` line (fields after the eighth; `[..]` entries
/// are slots being migrated, not owned).
fn slot_ranges(line: &str) -> Vec<(u16, u16)> {
    line.split_whitespace()
        .skip(8)
        .filter(|f| !f.starts_with('['))
        .map(|f| match f.split_once('-') {
            Some((a, b)) => (a.parse().unwrap(), b.parse().unwrap()),
            None => (f.parse().unwrap(), f.parse().unwrap()),
        })
        .collect()
}

impl Drop for RedisCluster {
    fn drop(&mut self) {
        for n in &mut self.nodes {
            n.kill();
        }
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
