//! UTF-8 validation of text messages (`proto::utf8`): the streaming validator fed the whole
//! message, fed in 4 KiB pieces (cut anywhere, as reads cut frames), and
//! `std::str::from_utf8` as the baseline.
//!
//! Ids: `utf8/<impl>/<size>`, throughput in bytes. The text is mostly ASCII with some
//! 2-, 3- and 4-byte characters, like chat or JSON with names in it, and it is valid.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use wsring::proto::utf8::Utf8Validator;

const SIZES: [(usize, &str); 6] = [
    (16, "16"),
    (125, "125"),
    (1024, "1K"),
    (16 * 1024, "16K"),
    (64 * 1024, "64K"),
    (1024 * 1024, "1M"),
];

const CHUNK: usize = 4096;

/// Exactly `len` bytes of valid UTF-8: JSON-ish ASCII with a multibyte character every
/// so often, padded with ASCII so no character is cut at the end.
fn text(len: usize) -> Vec<u8> {
    const PIECES: [&str; 8] = [
        r#"{"user":"alice","msg":"hello there, how are you today?"}"#,
        r#"{"user":"José","msg":"¿qué tal? café"}"#,
        r#"{"price":101.25,"sym":"EURUSD","ts":1712345678901}"#,
        r#"{"user":"Zoë","msg":"naïve résumé"}"#,
        r#"{"user":"bob","msg":"see you at 10:30, ok?"}"#,
        r#"{"user":"小明","msg":"你好"}"#,
        r#"{"event":"join","room":"general","count":42}"#,
        r#"{"user":"eve","msg":"nice 👍"}"#,
    ];
    let mut out = String::with_capacity(len);
    'fill: loop {
        for piece in PIECES {
            for ch in piece.chars() {
                if out.len() + ch.len_utf8() > len {
                    break 'fill;
                }
                out.push(ch);
            }
        }
    }
    while out.len() < len {
        out.push(' ');
    }
    out.into_bytes()
}

fn bench_utf8(c: &mut Criterion) {
    let mut group = c.benchmark_group("utf8");
    for (size, label) in SIZES {
        let data = text(size);
        assert!(std::str::from_utf8(&data).is_ok());
        group.throughput(Throughput::Bytes(size as u64));
        group.bench_function(BenchmarkId::new("wsring", label), |b| {
            b.iter(|| {
                let mut v = Utf8Validator::new();
                let fed = v.feed(black_box(&data));
                black_box(fed.and_then(|()| v.finish()))
            })
        });
        group.bench_function(BenchmarkId::new("wsring-stream-4K", label), |b| {
            b.iter(|| {
                let mut v = Utf8Validator::new();
                let mut result = Ok(());
                for chunk in black_box(&data).chunks(CHUNK) {
                    result = result.and_then(|()| v.feed(chunk));
                }
                black_box(result.and_then(|()| v.finish()))
            })
        });
        group.bench_function(BenchmarkId::new("std", label), |b| {
            b.iter(|| black_box(std::str::from_utf8(black_box(&data)).is_ok()))
        });
    }
    group.finish();
}

criterion_group!(benches, bench_utf8);
criterion_main!(benches);
