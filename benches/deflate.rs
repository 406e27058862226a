//! Which deflate implementation permessage-deflate should use (issue 16), measured, not
//! assumed: flate2 on the zlib-rs backend, libdeflater (one-shot, which is what
//! compress-once needs) and miniz_oxide, on a corpus of 1-4 KB JSON messages of the kind
//! that broadcast servers send (tickers, order books, chat), each message compressed on its
//! own (no context takeover: the form every subscriber of a broadcast can share).
//!
//! `cargo bench --bench deflate` prints, per implementation and level, the compressed size
//! of the corpus against the original (ratio), and criterion's time to compress every
//! message; then what compressing costs and saves for messages cut to 32-512 bytes (where
//! the `--deflate-threshold` default comes from); then the time to inflate the corpus
//! (streaming inflaters only: an inbound message's size is not known in advance, which
//! rules out libdeflater there).

use std::hint::black_box;

use criterion::{Criterion, Throughput, criterion_group, criterion_main};

/// A deterministic corpus: 64 messages of 1-4 KB, half order-book snapshots, a quarter
/// trade lists, a quarter chat messages.
fn corpus() -> Vec<Vec<u8>> {
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = move || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let words = [
        "the", "order", "filled", "market", "price", "moved", "again", "today", "and", "we", "are",
        "watching", "closely", "volume", "spiked", "after", "news", "hello", "team",
    ];
    let mut out = Vec::new();
    for i in 0..64u64 {
        let target = 1024 + (next() % 3072) as usize;
        let mut m = String::new();
        match i % 4 {
            0 | 1 => {
                m.push_str(&format!(
                    r#"{{"type":"book","symbol":"BTC-USD","seq":{},"ts":{},"bids":["#,
                    1_000_000 + i,
                    1_733_000_000_000u64 + next() % 100_000
                ));
                let mut side = 0;
                while m.len() < target {
                    let price = 97_000.0 + (next() % 100_000) as f64 / 100.0;
                    let size = (next() % 100_000) as f64 / 10_000.0;
                    m.push_str(&format!("[\"{price:.2}\",\"{size:.4}\"],"));
                    side += 1;
                    if side == 20 {
                        m.pop();
                        m.push_str(r#"],"asks":["#);
                    }
                }
                m.pop();
                m.push_str("]}");
            }
            2 => {
                m.push_str(r#"{"type":"trades","symbol":"ETH-USD","trades":["#);
                while m.len() < target {
                    m.push_str(&format!(
                        r#"{{"id":{},"price":"{:.2}","size":"{:.5}","side":"{}","time":"2026-12-02T19:{:02}:{:02}.{:03}Z"}},"#,
                        next() % 10_000_000,
                        3_500.0 + (next() % 10_000) as f64 / 100.0,
                        (next() % 1_000_000) as f64 / 100_000.0,
                        if next() % 2 == 0 { "buy" } else { "sell" },
                        next() % 60,
                        next() % 60,
                        next() % 1000
                    ));
                }
                m.pop();
                m.push_str("]}");
            }
            _ => {
                m.push_str(r#"{"type":"chat","room":"general","messages":["#);
                while m.len() < target {
                    let n = 5 + next() % 20;
                    let text: Vec<&str> = (0..n)
                        .map(|_| words[(next() % words.len() as u64) as usize])
                        .collect();
                    m.push_str(&format!(
                        r#"{{"user":"user{}","text":"{}","at":{}}},"#,
                        next() % 500,
                        text.join(" "),
                        1_733_000_000 + next() % 100_000
                    ));
                }
                m.pop();
                m.push_str("]}");
            }
        }
        out.push(m.into_bytes());
    }
    out
}

/// Raw deflate of one message with flate2 (zlib-rs), flushed the way RFC 7692 §7.2.1 says
/// (a sync flush, its 4-byte tail removed).
fn flate2_compress(c: &mut flate2::Compress, input: &[u8], out: &mut Vec<u8>) {
    c.reset();
    out.clear();
    out.reserve(input.len() + 64);
    let _ = c.compress_vec(input, out, flate2::FlushCompress::Sync);
    while out.len() == out.capacity() {
        out.reserve(1024);
        let before = c.total_in() as usize;
        let _ = c.compress_vec(&input[before..], out, flate2::FlushCompress::Sync);
    }
    if out.ends_with(&[0, 0, 0xff, 0xff]) {
        out.truncate(out.len() - 4);
    }
}

/// One-shot raw deflate with libdeflater (ends in a final block: RFC 7692 §7.2.3.5).
fn libdeflate_compress(c: &mut libdeflater::Compressor, input: &[u8], out: &mut Vec<u8>) {
    out.resize(c.deflate_compress_bound(input.len()), 0);
    let n = c.deflate_compress(input, out).unwrap_or(0);
    out.truncate(n);
}

fn miniz_compress(input: &[u8], level: u8) -> Vec<u8> {
    miniz_oxide::deflate::compress_to_vec(input, level)
}

/// Inflates one message (raw, with the RFC's tail appended) with flate2.
fn flate2_inflate(d: &mut flate2::Decompress, input: &[u8], out: &mut Vec<u8>) {
    d.reset(false);
    out.clear();
    let mut framed = input.to_vec();
    framed.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut at = 0;
    loop {
        out.reserve(4096);
        let before = d.total_in() as usize;
        let _ = d.decompress_vec(&framed[at..], out, flate2::FlushDecompress::Sync);
        at += d.total_in() as usize - before;
        if at >= framed.len() || d.total_in() as usize == before && out.len() < out.capacity() {
            break;
        }
    }
}

/// A message as received (the RFC's tail put back) and closed with an empty final block,
/// for miniz_oxide's one-shot inflater, which wants a complete stream.
fn terminated(z: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(z.len() + 6);
    v.extend_from_slice(z);
    v.extend_from_slice(&[0, 0, 0xff, 0xff, 0x03, 0x00]);
    v
}

fn bench(c: &mut Criterion) {
    let corpus = corpus();
    let total: usize = corpus.iter().map(Vec::len).sum();
    let mut out = Vec::new();
    // Ratios first (printed once).
    for level in [1u32, 6] {
        let mut f = flate2::Compress::new(flate2::Compression::new(level), false);
        let mut l = libdeflater::Compressor::new(
            libdeflater::CompressionLvl::new(level as i32).expect("level"),
        );
        let (mut fz, mut ld, mut mz) = (0, 0, 0);
        for m in &corpus {
            flate2_compress(&mut f, m, &mut out);
            fz += out.len();
            libdeflate_compress(&mut l, m, &mut out);
            ld += out.len();
            mz += miniz_compress(m, level as u8).len();
        }
        let r = |n: usize| total as f64 / n as f64;
        println!(
            "deflate corpus {total} B, level {level}: flate2/zlib-rs {fz} B ({:.2}x), libdeflater {ld} B ({:.2}x), miniz_oxide {mz} B ({:.2}x)",
            r(fz),
            r(ld),
            r(mz)
        );
    }
    let mut g = c.benchmark_group("compress_corpus");
    g.throughput(Throughput::Bytes(total as u64));
    for level in [1u32, 6] {
        let mut f = flate2::Compress::new(flate2::Compression::new(level), false);
        g.bench_function(format!("flate2_zlib_rs_l{level}"), |b| {
            b.iter(|| {
                for m in &corpus {
                    flate2_compress(&mut f, black_box(m), &mut out);
                }
            })
        });
        let mut l = libdeflater::Compressor::new(
            libdeflater::CompressionLvl::new(level as i32).expect("level"),
        );
        g.bench_function(format!("libdeflater_l{level}"), |b| {
            b.iter(|| {
                for m in &corpus {
                    libdeflate_compress(&mut l, black_box(m), &mut out);
                }
            })
        });
        g.bench_function(format!("miniz_oxide_l{level}"), |b| {
            b.iter(|| {
                for m in &corpus {
                    black_box(miniz_compress(black_box(m), level as u8));
                }
            })
        });
    }
    g.finish();
    // Inflating what flate2 wrote at level 6 (the usual browser level).
    let mut f = flate2::Compress::new(flate2::Compression::new(6), false);
    let compressed: Vec<Vec<u8>> = corpus
        .iter()
        .map(|m| {
            flate2_compress(&mut f, m, &mut out);
            out.clone()
        })
        .collect();
    let mut d = flate2::Decompress::new(false);
    for (m, z) in corpus.iter().zip(&compressed) {
        flate2_inflate(&mut d, z, &mut out);
        assert_eq!(&out, m, "flate2 round trip");
        let back = miniz_oxide::inflate::decompress_to_vec(&terminated(z)).unwrap_or_default();
        assert_eq!(&back, m, "miniz_oxide reads flate2's");
    }
    threshold(c, &corpus);
    let mut g = c.benchmark_group("inflate_corpus");
    g.throughput(Throughput::Bytes(total as u64));
    g.bench_function("flate2_zlib_rs", |b| {
        b.iter(|| {
            for z in &compressed {
                flate2_inflate(&mut d, black_box(z), &mut out);
            }
        })
    });
    g.bench_function("miniz_oxide", |b| {
        b.iter(|| {
            for z in &compressed {
                black_box(miniz_oxide::inflate::decompress_to_vec(&terminated(black_box(z))).ok());
            }
        })
    });
    g.finish();
}

/// Where compressing a message starts to pay (`DeflateConfig::threshold`): the corpus's
/// messages cut to S bytes (JSON text, as small messages are), compressed on their own
/// with libdeflate at level 1 as `wsring serve` does. Printed per size: what a message
/// becomes, the bytes saved, and the compression's cost per message; criterion times the
/// same in the `threshold` group. Below a size where deflate saves nearly nothing (its
/// block header and Huffman tables cost bytes too) compressing only spends CPU.
fn threshold(c: &mut Criterion, corpus: &[Vec<u8>]) {
    let mut l = libdeflater::Compressor::new(libdeflater::CompressionLvl::new(1).expect("level"));
    let mut out = Vec::new();
    let mut g = c.benchmark_group("threshold");
    for size in [32usize, 64, 96, 128, 192, 256, 512] {
        let cut: Vec<&[u8]> = corpus.iter().map(|m| &m[..size.min(m.len())]).collect();
        let (mut plain, mut z) = (0usize, 0usize);
        for m in &cut {
            libdeflate_compress(&mut l, m, &mut out);
            plain += m.len();
            z += out.len().min(m.len());
        }
        let n = cut.len() as f64;
        // Timed loops only under `cargo bench` (criterion gets `--bench`); `cargo test`
        // runs this once, in a debug build, to check that it works.
        let reps = if std::env::args().any(|a| a == "--bench") {
            2_000
        } else {
            1
        };
        let t = std::time::Instant::now();
        for _ in 0..reps {
            for m in &cut {
                libdeflate_compress(&mut l, black_box(m), &mut out);
            }
        }
        let ns = t.elapsed().as_nanos() as f64 / (reps as f64 * n);
        // The same with zlib-rs (flate2), reset per message.
        let mut f = flate2::Compress::new(flate2::Compression::new(1), false);
        let (mut fz_bytes, t) = (0usize, std::time::Instant::now());
        for _ in 0..reps {
            for m in &cut {
                flate2_compress(&mut f, black_box(m), &mut out);
                fz_bytes += out.len().min(m.len());
            }
        }
        let fz_ns = t.elapsed().as_nanos() as f64 / (reps as f64 * n);
        let fz_bytes = fz_bytes as f64 / (reps as f64 * n);
        println!(
            "threshold {size} B: libdeflate L1 compresses to {:.0} B on average ({:.2}x), {:.0} B saved per message, {ns:.0} ns to compress one; zlib-rs L1 {fz_bytes:.0} B, {fz_ns:.0} ns",
            z as f64 / n,
            plain as f64 / z as f64,
            (plain - z) as f64 / n
        );
        g.throughput(Throughput::Elements(cut.len() as u64));
        g.bench_function(format!("libdeflater_l1_{size}B"), |b| {
            b.iter(|| {
                for m in &cut {
                    libdeflate_compress(&mut l, black_box(m), &mut out);
                }
            })
        });
    }
    g.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(20).measurement_time(std::time::Duration::from_secs(2));
    targets = bench
}
criterion_main!(benches);
