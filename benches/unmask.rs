//! Unmasking client payloads (`proto::mask`): every SIMD implementation this CPU has, the
//! dispatched `unmask`, and `fastwebsockets::unmask` as the baseline, in one group so one
//! run compares them.
//!
//! Ids: `unmask/<impl>/<size>`, throughput in bytes.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use wsring::proto::mask::{Impl, unmask};

const SIZES: [(usize, &str); 6] = [
    (16, "16"),
    (125, "125"),
    (1024, "1K"),
    (16 * 1024, "16K"),
    (64 * 1024, "64K"),
    (1024 * 1024, "1M"),
];

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

fn impl_name(imp: Impl) -> &'static str {
    match imp {
        Impl::Scalar => "scalar",
        Impl::Sse2 => "sse2",
        Impl::Avx2 => "avx2",
        Impl::Avx512 => "avx512",
    }
}

fn payload(len: usize) -> Vec<u8> {
    (0..len).map(|i| (i * 31 + 7) as u8).collect()
}

fn bench_unmask(c: &mut Criterion) {
    let mut group = c.benchmark_group("unmask");
    for (size, label) in SIZES {
        group.throughput(Throughput::Bytes(size as u64));
        let mut buf = payload(size);
        for imp in Impl::available() {
            group.bench_function(BenchmarkId::new(impl_name(imp), label), |b| {
                b.iter(|| imp.apply(black_box(&mut buf[..]), black_box(MASK), 0))
            });
        }
        group.bench_function(BenchmarkId::new("wsring", label), |b| {
            b.iter(|| unmask(black_box(&mut buf[..]), black_box(MASK), 0))
        });
        group.bench_function(BenchmarkId::new("fastwebsockets", label), |b| {
            b.iter(|| fastwebsockets::unmask(black_box(&mut buf[..]), black_box(MASK)))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_unmask);
criterion_main!(benches);
