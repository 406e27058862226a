//! Frame headers (`proto::frame`): parsing masked client headers in the three length forms,
//! and encoding server headers and whole server frames, against tungstenite's
//! `FrameHeader::parse` / `FrameHeader::format` / `Frame::format` in the same groups.
//!
//! Ids: `frame-parse/<impl>/<7bit|16bit|64bit>` (throughput: header bytes) and
//! `frame-encode/<impl>/<payload size>` (throughput: header bytes for the header-only
//! benches, header + payload bytes for the whole-frame benches).

use std::hint::black_box;
use std::io::Cursor;

use bytes::Bytes;
use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use tungstenite::protocol::frame::coding::{Data, OpCode as TOpCode};
use tungstenite::protocol::frame::{Frame as TFrame, FrameHeader as TFrameHeader};
use wsring::proto::frame::{FrameHeader, MAX_HEADER_LEN, OpCode, Parsed, encode_frame};

const MASK: [u8; 4] = [0x37, 0xfa, 0x21, 0x3d];

/// Payload sizes for encoding (they pick the length form too).
const SIZES: [(usize, &str); 5] = [
    (16, "16"),
    (125, "125"),
    (1024, "1K"),
    (16 * 1024, "16K"),
    (64 * 1024, "64K"),
];

/// A masked client header for a binary frame of `payload_len`, followed by a few payload
/// bytes (as it sits in a receive buffer).
fn client_header(payload_len: u64) -> Vec<u8> {
    let header = FrameHeader {
        fin: true,
        rsv1: false,
        rsv2: false,
        rsv3: false,
        opcode: OpCode::Binary,
        mask: Some(MASK),
        payload_len,
    };
    let mut out = [0u8; MAX_HEADER_LEN];
    let n = header.encode(&mut out);
    let mut buf = out.get(..n).unwrap_or_default().to_vec();
    buf.extend_from_slice(&[0xAB; 16]);
    buf
}

fn bench_parse(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame-parse");
    for (payload_len, form) in [(100u64, "7bit"), (1000, "16bit"), (100_000, "64bit")] {
        let buf = client_header(payload_len);
        let header_len = buf.len() - 16;
        // Both parsers must agree before they are timed.
        match FrameHeader::parse(&buf, 0) {
            Ok(Parsed::Complete {
                header,
                header_len: n,
            }) => {
                assert_eq!((header.payload_len, n), (payload_len, header_len));
            }
            other => panic!("wsring parse: {other:?}"),
        }
        match TFrameHeader::parse(&mut Cursor::new(&buf[..])) {
            Ok(Some((header, len))) => {
                assert_eq!((header.mask, len), (Some(MASK), payload_len));
            }
            other => panic!("tungstenite parse: {other:?}"),
        }
        group.throughput(Throughput::Bytes(header_len as u64));
        group.bench_function(BenchmarkId::new("wsring", form), |b| {
            b.iter(|| FrameHeader::parse(black_box(&buf), black_box(0)))
        });
        group.bench_function(BenchmarkId::new("tungstenite", form), |b| {
            b.iter(|| TFrameHeader::parse(&mut Cursor::new(black_box(&buf[..]))).ok())
        });
    }
    group.finish();
}

fn bench_encode(c: &mut Criterion) {
    let mut group = c.benchmark_group("frame-encode");
    for (size, label) in SIZES {
        // Server headers: unmasked.
        let header = FrameHeader {
            fin: true,
            rsv1: false,
            rsv2: false,
            rsv3: false,
            opcode: OpCode::Binary,
            mask: None,
            payload_len: size as u64,
        };
        let theader = TFrameHeader {
            is_final: true,
            rsv1: false,
            rsv2: false,
            rsv3: false,
            opcode: TOpCode::Data(Data::Binary),
            mask: None,
        };
        let header_len = header.encoded_len();
        assert_eq!(header_len, theader.len(size as u64));

        group.throughput(Throughput::Bytes(header_len as u64));
        group.bench_function(BenchmarkId::new("wsring-header", label), |b| {
            let mut out = [0u8; MAX_HEADER_LEN];
            b.iter(|| {
                let n = black_box(&header).encode(&mut out);
                black_box((&out, n));
            })
        });
        group.bench_function(BenchmarkId::new("tungstenite-header", label), |b| {
            let mut out = [0u8; MAX_HEADER_LEN];
            b.iter(|| {
                let mut w = &mut out[..];
                let r = black_box(&theader).format(black_box(size as u64), &mut w);
                black_box((&out, r.is_ok()));
            })
        });

        // Whole frames: each produces an owned, encoded frame (one allocation + copy).
        let payload = Bytes::from(vec![0x5Au8; size]);
        group.throughput(Throughput::Bytes((header_len + size) as u64));
        group.bench_function(BenchmarkId::new("wsring-frame", label), |b| {
            b.iter(|| encode_frame(OpCode::Binary, black_box(&payload[..])))
        });
        group.bench_function(BenchmarkId::new("tungstenite-frame", label), |b| {
            b.iter(|| {
                let frame = TFrame::message(
                    black_box(payload.clone()),
                    TOpCode::Data(Data::Binary),
                    true,
                );
                let mut out = Vec::with_capacity(header_len + size);
                let r = frame.format(&mut out);
                black_box((out, r.is_ok()))
            })
        });
    }
    group.finish();
}

criterion_group!(benches, bench_parse, bench_encode);
criterion_main!(benches);
