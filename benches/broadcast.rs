//! broadcast: client messages on `/pubsub/<topic>` fanned out to N local subscribers
//! by the real engine core — frame parse, unmask, handler, the admission check against
//! every subscriber's queue limits, encode once onto the turn's pending run, the
//! hand-out of the run to every subscriber and the flush that gives each subscriber's
//! queue to the backend — with a driver that writes nothing (no I/O). `wsring` is one
//! message per loop turn; `wsring-64-per-turn` is 64 messages in one read, as the
//! `fanout` scenario's publisher sends them. Throughput is in deliveries (elements). The
//! baseline beside it is the naive broadcast: copying the encoded frame into every
//! subscriber's own buffer.

use std::hint::black_box;
use std::time::Instant;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use wsring::cli::serve::BenchProtocol;
use wsring::engine::ConnId;
use wsring::engine::internals::{Core, NullDriver};
use wsring::engine::{EngineConfig, Shared};
use wsring::proto::OpCode;
use wsring::proto::frame::encode_client_frame;

fn client_frame(payload: &[u8]) -> Vec<u8> {
    encode_client_frame(OpCode::Binary, payload, [1, 2, 3, 4])
}

/// A core with `n` subscribers of topic `t`; returns it and the publisher's id.
fn setup(n: usize) -> (Core<BenchProtocol>, ConnId, NullDriver) {
    let shared = Shared::detached(EngineConfig::default()).expect("shared state");
    let handle_shared = shared.clone();
    let now = Instant::now();
    let mut core = Core::new(
        0,
        shared,
        BenchProtocol::new(handle_from(handle_shared)),
        now,
    );
    let mut driver = NullDriver { writes: 0 };
    let mut first = None;
    for i in 0..n {
        let id = core.on_accept(i as u32, now);
        let mut req = b"GET /pubsub/t HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n".to_vec();
        core.on_data(id, &mut req, now);
        first.get_or_insert(id);
    }
    core.flush(&mut driver);
    (core, first.expect("at least one subscriber"), driver)
}

fn handle_from(shared: std::sync::Arc<Shared>) -> wsring::engine::Handle {
    wsring::engine::Handle::from_shared(shared)
}

fn broadcast(c: &mut Criterion) {
    let mut g = c.benchmark_group("broadcast");
    let payload = [7u8; 64];
    for n in [1usize, 100, 1_000, 10_000] {
        g.throughput(Throughput::Elements(n as u64));
        let (mut core, publisher, mut driver) = setup(n);
        let frame = client_frame(&payload);
        g.bench_function(BenchmarkId::new("wsring", n), |b| {
            b.iter(|| {
                let mut f = frame.clone();
                core.on_data(publisher, &mut f, Instant::now());
                core.flush(&mut driver);
            })
        });
        g.throughput(Throughput::Elements(64 * n as u64));
        let burst: Vec<u8> = (0..64).flat_map(|_| frame.iter().copied()).collect();
        g.bench_function(BenchmarkId::new("wsring-64-per-turn", n), |b| {
            b.iter(|| {
                let mut f = burst.clone();
                core.on_data(publisher, &mut f, Instant::now());
                core.flush(&mut driver);
            })
        });
        g.throughput(Throughput::Elements(n as u64));
        black_box(driver.writes);
        // Baseline: the same frame copied into each subscriber's own buffer.
        let mut queues: Vec<Vec<u8>> = (0..n).map(|_| Vec::with_capacity(128)).collect();
        let encoded = wsring::proto::encode_frame(OpCode::Binary, &payload);
        g.bench_function(BenchmarkId::new("copy-per-subscriber", n), |b| {
            b.iter(|| {
                for q in queues.iter_mut() {
                    q.clear();
                    q.extend_from_slice(&encoded);
                }
                black_box(&queues);
            })
        });
    }
    g.finish();
}

criterion_group!(benches, broadcast);
criterion_main!(benches);
