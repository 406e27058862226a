//! The opening handshake (`proto::handshake`) on a typical browser upgrade request
//! (~500 bytes: Origin, cookies, a long User-Agent, extensions): parse only, and the whole
//! server-side path (parse, validate, encode the 101 answer). The baseline is `httparse`
//! alone on the same bytes: the floor, since wsring parses with it and adds the rules.
//!
//! Ids: `handshake/<impl>/<what>`, throughput in request bytes.

use std::hint::black_box;

use criterion::{BenchmarkId, Criterion, Throughput, criterion_group, criterion_main};
use wsring::proto::handshake::{HandshakeLimits, ParseStatus, encode_accept, parse_request};

const REQUEST: &str = "GET /chat?room=lobby&token=3f9a HTTP/1.1\r\n\
Host: ws.example.com\r\n\
Connection: Upgrade\r\n\
Pragma: no-cache\r\n\
Cache-Control: no-cache\r\n\
User-Agent: Mozilla/5.0 (X11; Linux x86_64) AppleWebKit/537.36 (KHTML, like Gecko) \
Chrome/124.0.0.0 Safari/537.36\r\n\
Upgrade: websocket\r\n\
Origin: https://app.example.com\r\n\
Sec-WebSocket-Version: 13\r\n\
Accept-Encoding: gzip, deflate, br, zstd\r\n\
Accept-Language: en-GB,en;q=0.9,fr;q=0.8\r\n\
Cookie: session=8f14e45fceea167a5a36dedd4bea2543; theme=dark; _ga=GA1.2.1234567890.1712345678\r\n\
Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\
Sec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\n\
\r\n";

fn bench_handshake(c: &mut Criterion) {
    let bytes = REQUEST.as_bytes();
    let limits = HandshakeLimits::default();
    // The request must be a valid upgrade before it is timed.
    match parse_request(bytes, &limits) {
        Ok(ParseStatus::Complete { request, consumed }) => {
            assert_eq!(consumed, bytes.len());
            assert!(request.validate_upgrade().is_ok());
        }
        other => panic!("{other:?}"),
    }

    let mut group = c.benchmark_group("handshake");
    group.throughput(Throughput::Bytes(bytes.len() as u64));
    group.bench_function(BenchmarkId::new("wsring", "full"), |b| {
        let mut out = Vec::with_capacity(256);
        b.iter(|| {
            out.clear();
            if let Ok(ParseStatus::Complete { request, .. }) =
                parse_request(black_box(bytes), &limits)
                && let Ok(upgrade) = request.validate_upgrade()
            {
                encode_accept(&mut out, &upgrade.key, None, &[]);
            }
            black_box(out.len())
        })
    });
    group.bench_function(BenchmarkId::new("wsring", "parse"), |b| {
        b.iter(|| parse_request(black_box(bytes), &limits))
    });
    group.bench_function(BenchmarkId::new("httparse", "parse"), |b| {
        b.iter(|| {
            let mut headers = [httparse::EMPTY_HEADER; 64];
            let mut req = httparse::Request::new(&mut headers);
            black_box(req.parse(black_box(bytes)).ok());
        })
    });
    group.finish();
}

criterion_group!(benches, bench_handshake);
criterion_main!(benches);
