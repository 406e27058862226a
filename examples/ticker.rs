//! A price ticker: a plain thread publishes prices to thousands of subscribers, with the
//! conflation policy, so a subscriber that falls behind gets the newest price of each
//! symbol instead of an ever-growing backlog.
//!
//! ```sh
//! cargo run --release --example ticker                       # 2,000 subscribers, 10 s
//! cargo run --release --example ticker -- --subscribers 5000 --seconds 20
//! ```
//! The example starts the server on 127.0.0.1 (a free port), the publisher thread (one
//! price for each of 4 symbols every millisecond: 4,000 prices/s), and the subscribers
//! (tokio-tungstenite clients in the same process), prints one line per second, then
//! shuts the server down gracefully (close 1001); SIGINT/SIGTERM does the same at once (a
//! second signal exits). One topic per symbol; every subscriber follows every symbol, and
//! any other WebSocket client can join at the address it prints. Columns: prices
//! published and deliveries made since the start, then deliveries in the last second.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use futures_util::StreamExt;
use wsring::Policy;
use wsring::api::{Accept, Decision, Handler, Reject};
use wsring::engine::{EngineConfig, Server};
use wsring::proto::OpCode;
use wsring::proto::handshake::{Request, Upgrade};

const SYMBOLS: [&str; 4] = ["BTC", "ETH", "SOL", "XRP"];

/// Subscribes `/ticker` connections to every symbol's topic.
struct Ticker;

impl Handler for Ticker {
    type Data = ();

    fn on_upgrade(&mut self, request: &Request, _upgrade: &Upgrade) -> Decision<()> {
        if request.path != "/ticker" {
            return Decision::Reject(Reject::status(404));
        }
        let mut accept = Accept::new(());
        for s in SYMBOLS {
            accept = accept.subscribe(s);
        }
        Decision::Accept(accept)
    }
}

fn arg(name: &str, default: u64) -> u64 {
    let args: Vec<String> = std::env::args().collect();
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn main() -> std::io::Result<()> {
    // Before any thread starts: they inherit the blocked signals.
    let signals = wsring::signals::ShutdownSignals::block();
    let subscribers = arg("--subscribers", 2000);
    let seconds = arg("--seconds", 10);
    let config = EngineConfig {
        listen: "127.0.0.1:0".parse().expect("address"),
        policy: Policy::Conflate,
        send_queue_soft: 16 * 1024,
        send_queue_hard: 64 * 1024,
        ..EngineConfig::default()
    };
    let server = Server::start(config, |_| Ticker)?;
    let addr = server.local_addr();
    let handle = server.handle();
    println!("ticker on ws://{addr}/ticker: {subscribers} subscribers for {seconds} s");
    let signalled = Arc::new(AtomicBool::new(false));
    {
        let (signalled, handle) = (signalled.clone(), handle.clone());
        std::thread::spawn(move || {
            signals.shutdown_on_signal(&handle);
            signalled.store(true, Ordering::Relaxed);
        });
    }

    // The subscribers.
    let delivered = Arc::new(AtomicU64::new(0));
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()?;
    let d = delivered.clone();
    runtime.block_on(async move {
        for _ in 0..subscribers {
            let d = d.clone();
            let (ws, _) = tokio_tungstenite::connect_async(format!("ws://{addr}/ticker"))
                .await
                .expect("subscriber connects");
            tokio::spawn(async move {
                let (_, mut read) = ws.split();
                while let Some(Ok(m)) = read.next().await {
                    if m.is_text() {
                        d.fetch_add(1, Ordering::Relaxed);
                    }
                }
            });
        }
    });
    while handle.subscriber_count(SYMBOLS[0]) < subscribers as usize {
        std::thread::sleep(Duration::from_millis(10));
    }

    // The publisher: a plain thread, one price per symbol every millisecond (paced by a
    // deadline, not by sleeping a millisecond after each round, which the scheduler
    // stretches to ~1.1 ms).
    let stop = Arc::new(AtomicBool::new(false));
    let published = Arc::new(AtomicU64::new(0));
    let publisher = {
        let (stop, published, handle) = (stop.clone(), published.clone(), handle.clone());
        std::thread::spawn(move || {
            let mut price = [64_000.0f64, 3_100.0, 140.0, 0.52];
            let mut tick = 0u64;
            let mut next = Instant::now();
            while !stop.load(Ordering::Relaxed) {
                for (i, s) in SYMBOLS.iter().enumerate() {
                    tick += 1;
                    price[i] *= 1.0 + (((tick * 7919) % 200) as f64 - 100.0) * 1e-6;
                    let msg = format!(
                        r#"{{"symbol":"{s}","price":{:.4},"tick":{tick}}}"#,
                        price[i]
                    );
                    handle.publish(s, OpCode::Text, msg.as_bytes());
                    published.fetch_add(1, Ordering::Relaxed);
                }
                next += Duration::from_millis(1);
                if let Some(wait) = next.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
            }
        })
    };
    let start = Instant::now();
    let mut last = 0;
    println!("    t  prices published  deliveries (total)  deliveries/s (last second)");
    for second in 1..=seconds {
        for _ in 0..10 {
            if signalled.load(Ordering::Relaxed) {
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if signalled.load(Ordering::Relaxed) {
            println!("signal: shutting down");
            break;
        }
        let now = delivered.load(Ordering::Relaxed);
        println!(
            "{second:>4}s  {:>16}  {:>18}  {:>26}",
            published.load(Ordering::Relaxed),
            now,
            now - last
        );
        last = now;
    }
    stop.store(true, Ordering::Relaxed);
    let _ = publisher.join();
    println!(
        "done: {} deliveries in {:.1} s",
        delivered.load(Ordering::Relaxed),
        start.elapsed().as_secs_f64()
    );
    handle.shutdown();
    server.join();
    drop(runtime);
    Ok(())
}
