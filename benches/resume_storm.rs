//! A reconnect storm against history and resume (issue 15): N clients subscribe to one
//! topic with `recover=1` and learn their position, all drop, M publications go by, and
//! all N reconnect at once with `since`/`epoch`. Every client must get `recovered: true`
//! and exactly the M publications it missed, in order; the figures are resumes per second
//! (N over the time from the first reconnect to the last client recovered) and each
//! client's time to recovered (reconnect to its last replayed publication), p50/p99/max,
//! plus, with `--server-pid`, the server's CPU seconds for the storm.
//!
//! ```sh
//! cargo bench --bench resume_storm                       # an in-process server, 2,000 x 50
//! cargo bench --bench resume_storm -- --target 127.0.0.1:9001 --server-pid PID \
//!     --clients 5000 --missed 100 --rounds 3              # against `wsring serve`
//! ```
//! `scripts/history-bench.sh` runs it against `wsring serve` pinned to CPU 0 (this on
//! CPU 1) and prints one JSON line per round. The clients are tokio-tungstenite on one
//! thread: on this 2-core host they, not the server, bound the rate (compare the server's
//! CPU seconds with the wall time).

mod support;

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use futures_util::{SinkExt, StreamExt};
use tokio_tungstenite::tungstenite::Message;

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_tungstenite::MaybeTlsStream<tokio::net::TcpStream>>;

struct Opts {
    target: Option<SocketAddr>,
    server_pid: Option<u32>,
    clients: usize,
    missed: u64,
    rounds: usize,
}

fn opts() -> Opts {
    let mut o = Opts {
        target: None,
        server_pid: None,
        clients: 2_000,
        missed: 50,
        rounds: 1,
    };
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut value = || args.next().unwrap_or_else(|| panic!("{a} needs a value"));
        match a.as_str() {
            "--target" => o.target = Some(value().parse().expect("--target ADDR")),
            "--server-pid" => o.server_pid = Some(value().parse().expect("--server-pid PID")),
            "--clients" => o.clients = value().parse().expect("--clients N"),
            "--missed" => o.missed = value().parse().expect("--missed M"),
            "--rounds" => o.rounds = value().parse().expect("--rounds R"),
            // What `cargo bench` passes to every bench binary.
            "--bench" => {}
            other => panic!("unknown argument {other:?}"),
        }
    }
    o
}

async fn open(addr: SocketAddr, path: &str) -> Ws {
    let url = format!("ws://{addr}{path}");
    let (ws, _) = tokio_tungstenite::connect_async(url)
        .await
        .expect("connect");
    ws
}

async fn next_json(ws: &mut Ws) -> serde_json::Value {
    loop {
        match ws.next().await.expect("open").expect("a frame") {
            Message::Text(t) => return serde_json::from_str(&t).expect("json"),
            Message::Ping(_) | Message::Pong(_) => continue,
            other => panic!("unexpected {other:?}"),
        }
    }
}

async fn round(addr: SocketAddr, o: &Opts, n: usize) -> serde_json::Value {
    let topic = format!("storm{n}-{}", std::process::id());
    let path = format!("/pubsub/{topic}?recover=1");
    // Everyone learns the position, then drops.
    let mut first = open(addr, &path).await;
    let sub = next_json(&mut first).await;
    let epoch = sub["epoch"].as_str().expect("epoch").to_string();
    let since = sub["offset"].as_u64().expect("offset");
    drop(first);
    // The publications they miss.
    let mut publisher = open(addr, &format!("/pubsub/{topic}")).await;
    for i in 0..o.missed {
        publisher
            .send(Message::text(format!("missed {i}")))
            .await
            .expect("publish");
    }
    // Until the server has numbered them all.
    loop {
        let mut probe = open(addr, &path).await;
        let s = next_json(&mut probe).await;
        if s["offset"].as_u64() == Some(since + o.missed) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let cpu0 = o.server_pid.and_then(support::cpu_seconds);
    let started = Instant::now();
    let resume = format!("{path}&since={since}&epoch={epoch}");
    let mut tasks = Vec::with_capacity(o.clients);
    for _ in 0..o.clients {
        let resume = resume.clone();
        let missed = o.missed;
        tasks.push(tokio::spawn(async move {
            let t0 = Instant::now();
            let mut ws = open(addr, &resume).await;
            let s = next_json(&mut ws).await;
            assert_eq!(s["recovered"], true, "{s}");
            for want in since + 1..=since + missed {
                let p = next_json(&mut ws).await;
                assert_eq!(p["offset"].as_u64(), Some(want), "{p}");
            }
            (t0.elapsed(), ws)
        }));
    }
    let mut times = Vec::with_capacity(o.clients);
    let mut sockets = Vec::with_capacity(o.clients);
    for t in tasks {
        let (d, ws) = t.await.expect("a client");
        times.push(d);
        sockets.push(ws);
    }
    let wall = started.elapsed();
    let cpu = match (cpu0, o.server_pid.and_then(support::cpu_seconds)) {
        (Some(a), Some(b)) => Some(b - a),
        _ => None,
    };
    drop(sockets);
    drop(publisher);
    times.sort();
    let ms = |q: f64| times[((times.len() as f64 - 1.0) * q) as usize].as_secs_f64() * 1e3;
    serde_json::json!({
        "bench": "resume_storm",
        "round": n,
        "clients": o.clients,
        "missed": o.missed,
        "recovered": times.len(),
        "wall_s": wall.as_secs_f64(),
        "resumes_per_s": o.clients as f64 / wall.as_secs_f64(),
        "recovered_p50_ms": ms(0.5),
        "recovered_p99_ms": ms(0.99),
        "recovered_max_ms": ms(1.0),
        "server_cpu_s": cpu,
        "server_cpu_us_per_resume": cpu.map(|c| c * 1e6 / o.clients as f64),
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
    for n in 0..o.rounds {
        let line = rt.block_on(round(addr, &o, n));
        println!("{line}");
    }
}
