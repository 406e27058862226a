//! permessage-deflate (RFC 7692) end to end on both backends, with a raw client that
//! compresses and inflates with flate2 itself (independently of the server's codec): the
//! negotiation in the 101, compressed echoes both ways, the threshold, fragmented
//! compressed messages, every bad input's close code (RSV1 on a continuation or a control
//! frame 1002, invalid deflate data 1007, invalid UTF-8 once inflated 1007, a
//! decompression bomb 1009 with memory bounded by the output limit, and in a first
//! fragment without waiting for the rest), client context takeover when the server allows
//! it, and no extension for a malformed offer or a server without deflate.

#[macro_use]
mod common;

use common::*;
use wsring::engine::{BackendChoice, DeflateConfig};

const EXT: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

fn server(backend: BackendChoice) -> TestServer {
    TestServer::start_with(backend, |c| c.deflate = Some(DeflateConfig::default()))
}

/// Upgrades on `/echo` offering `extensions`; returns the client and the 101.
async fn upgrade(
    addr: std::net::SocketAddr,
    extensions: Option<&str>,
) -> (RawClient, HttpResponse) {
    let mut request = upgrade_request("/echo");
    if let Some(e) = extensions {
        request = request.replace(
            "\r\n\r\n",
            &format!("\r\nSec-WebSocket-Extensions: {e}\r\n\r\n"),
        );
    }
    let mut c = RawClient::connect(addr).await;
    c.send(request.as_bytes()).await;
    let head = c.read_head().await;
    assert_eq!(head.status, 101);
    (c, head)
}

/// What a client compressor writes: raw deflate, sync-flushed, the 4-byte tail removed
/// (a fresh compressor: no context).
fn deflate(data: &[u8]) -> Vec<u8> {
    KeptDeflater::new().message(data)
}

/// What a client inflater reads: the tail put back, then inflated.
fn inflate(data: &[u8]) -> Vec<u8> {
    let mut input = data.to_vec();
    input.extend_from_slice(&[0, 0, 0xff, 0xff]);
    let mut d = flate2::Decompress::new(false);
    let mut out = Vec::with_capacity(data.len() * 8 + 1024);
    loop {
        let at = d.total_in() as usize;
        let status = d
            .decompress_vec(&input[at..], &mut out, flate2::FlushDecompress::Sync)
            .expect("the server's deflate data inflates");
        let consumed = status == flate2::Status::StreamEnd || d.total_in() as usize == input.len();
        if consumed && out.len() < out.capacity() {
            break;
        }
        out.reserve(out.capacity());
    }
    out
}

fn json(len: usize) -> String {
    let mut s = String::from("[");
    let mut i = 0;
    while s.len() < len {
        s.push_str(&format!(
            r#"{{"seq":{i},"price":"97000.{i:02}","side":"buy"}},"#
        ));
        i += 1;
    }
    s.pop();
    s.push(']');
    s
}

fn negotiation(backend: BackendChoice) {
    let s = server(backend);
    block_on(async {
        let (_, head) = upgrade(s.addr, Some("permessage-deflate; client_max_window_bits")).await;
        assert_eq!(head.header("sec-websocket-extensions"), Some(EXT));
        // The first acceptable of several offers; a limited server window is followed.
        let (_, head) = upgrade(
            s.addr,
            Some("permessage-deflate; server_max_window_bits=8, permessage-deflate; server_max_window_bits=10"),
        )
        .await;
        assert_eq!(
            head.header("sec-websocket-extensions"),
            Some(format!("{EXT}; server_max_window_bits=10").as_str())
        );
        // Malformed or unknown: declined, the connection goes on without it.
        for offer in [
            "permessage-deflate; foo",
            "x-webkit-deflate-frame",
            "permessage-deflate; server_max_window_bits",
        ] {
            let (mut c, head) = upgrade(s.addr, Some(offer)).await;
            assert_eq!(head.header("sec-websocket-extensions"), None, "{offer}");
            c.send(&frame(true, TEXT, b"plain")).await;
            let f = c.read_frame().await;
            assert_eq!(
                (f.b0, f.payload.as_slice()),
                (0x81, &b"plain"[..]),
                "{offer}"
            );
        }
    });
    // A server without deflate never answers it.
    let plain = TestServer::start(backend);
    block_on(async {
        let (_, head) = upgrade(plain.addr, Some("permessage-deflate")).await;
        assert_eq!(head.header("sec-websocket-extensions"), None);
    });
}

fn compressed_echo_both_ways(backend: BackendChoice) {
    let s = server(backend);
    block_on(async {
        let (mut c, _) = upgrade(s.addr, Some("permessage-deflate")).await;
        let big = json(2_000);
        // RSV1 + text, compressed by the client.
        c.send(&raw_frame(0xC1, true, &deflate(big.as_bytes())))
            .await;
        let f = c.read_frame().await;
        assert_eq!(f.b0, 0xC1, "the echo comes back compressed (RSV1, text)");
        assert!(
            f.payload.len() < big.len() / 3,
            "{} of {}",
            f.payload.len(),
            big.len()
        );
        assert_eq!(inflate(&f.payload), big.as_bytes());
        // Below the threshold: compressed in, plain out.
        c.send(&raw_frame(0xC1, true, &deflate(b"short"))).await;
        let f = c.read_frame().await;
        assert_eq!((f.b0, f.payload.as_slice()), (0x81, &b"short"[..]));
        // An uncompressed message on a deflate connection is fine too; binary as well.
        c.send(&frame(true, BINARY, big.as_bytes())).await;
        let f = c.read_frame().await;
        assert_eq!(f.b0, 0xC2);
        assert_eq!(inflate(&f.payload), big.as_bytes());
        // A compressed message over three frames: RSV1 on the first only.
        let z = deflate(big.as_bytes());
        let (a, rest) = z.split_at(z.len() / 3);
        let (b, d) = rest.split_at(rest.len() / 2);
        c.send(&raw_frame(0x41, true, a)).await;
        c.send(&raw_frame(0x00, true, b)).await;
        // A ping in between is not compressed and is answered.
        c.send(&frame(true, PING, b"p")).await;
        c.send(&raw_frame(0x80, true, d)).await;
        let pong = c.read_frame().await;
        assert_eq!(pong.b0, 0x8A);
        let f = c.read_frame().await;
        assert_eq!(f.b0, 0xC1);
        assert_eq!(inflate(&f.payload), big.as_bytes());
    });
    let metrics = s.server().handle().metrics_text();
    let counter = |name: &str| -> u64 {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(&format!("wsring_{name}_total ")))
            .and_then(|v| v.parse().ok())
            .unwrap_or_else(|| panic!("{name}"))
    };
    // Process-wide counters (other tests in this binary add to them): at least ours.
    assert!(counter("deflate_compressions") >= 3);
    assert!(counter("deflate_decompressions") >= 3);
    assert!(counter("deflate_compressed_out_bytes") < counter("deflate_compressed_in_bytes"));
    assert!(counter("deflate_inflated_in_bytes") < counter("deflate_inflated_out_bytes"));
}

fn bad_inputs_get_their_close_codes(backend: BackendChoice) {
    let s = server(backend);
    block_on(async {
        let z = deflate(json(500).as_bytes());
        // RSV1 on a continuation.
        let (mut c, _) = upgrade(s.addr, Some("permessage-deflate")).await;
        c.send(&raw_frame(0x41, true, &z[..10])).await;
        c.send(&raw_frame(0xC0, true, &z[10..])).await;
        c.expect_close(1002).await;
        // RSV1 on a control frame.
        let (mut c, _) = upgrade(s.addr, Some("permessage-deflate")).await;
        c.send(&raw_frame(0xC9, true, b"p")).await;
        c.expect_close(1002).await;
        // Not deflate data.
        let (mut c, _) = upgrade(s.addr, Some("permessage-deflate")).await;
        c.send(&raw_frame(0xC1, true, &[0xff; 40])).await;
        c.expect_close(1007).await;
        // Valid deflate, invalid UTF-8 once inflated.
        let (mut c, _) = upgrade(s.addr, Some("permessage-deflate")).await;
        c.send(&raw_frame(0xC1, true, &deflate(&[b'a', 0xff, 0xfe, b'b'])))
            .await;
        c.expect_close(1007).await;
        // RSV1 without the extension.
        let (mut c, _) = upgrade(s.addr, None).await;
        c.send(&raw_frame(0xC1, true, &z)).await;
        c.expect_close(1002).await;
    });
}

fn a_bomb_is_stopped_by_its_output(backend: BackendChoice) {
    let s = TestServer::start_with(backend, |c| {
        c.deflate = Some(DeflateConfig::default());
        c.max_message_size = 1 << 20;
    });
    // 64 MiB of zeros compress to about 64 KB: a frame well under the 1 MiB limit.
    let bomb = deflate(&vec![0u8; 64 << 20]);
    assert!(bomb.len() < 1 << 20, "{}", bomb.len());
    let rss_before = rss_kib();
    block_on(async {
        for _ in 0..8 {
            let (mut c, _) = upgrade(s.addr, Some("permessage-deflate")).await;
            c.send(&raw_frame(0xC2, true, &bomb)).await;
            c.expect_close(1009).await;
        }
        // The server goes on.
        let (mut c, _) = upgrade(s.addr, Some("permessage-deflate")).await;
        c.send(&frame(true, TEXT, b"still here")).await;
        assert_eq!(c.read_frame().await.payload, b"still here");
    });
    let grown = rss_kib().saturating_sub(rss_before);
    assert!(
        grown < 64 * 1024,
        "RSS grew {grown} KiB for 8 bombs of 64 MiB"
    );
}

/// A compressed message in fragments is inflated as they come: a bomb in its first
/// fragment is stopped (1009) without waiting for a last one that never comes.
fn a_fragmented_bomb_is_stopped_at_its_first_fragment(backend: BackendChoice) {
    let s = TestServer::start_with(backend, |c| {
        c.deflate = Some(DeflateConfig::default());
        c.max_message_size = 1 << 20;
    });
    let bomb = deflate(&vec![0u8; 8 << 20]);
    block_on(async {
        let (mut c, _) = upgrade(s.addr, Some("permessage-deflate")).await;
        // RSV1, binary, not final; no continuation follows.
        c.send(&raw_frame(0x42, true, &bomb)).await;
        c.expect_close(1009).await;
        // Within the limit, the same split message inflates whole.
        let big = json(5_000);
        let z = deflate(big.as_bytes());
        let (mut c, _) = upgrade(s.addr, Some("permessage-deflate")).await;
        for (i, piece) in z.chunks(7).enumerate() {
            let b0 = if i == 0 { 0x41 } else { 0x00 };
            c.send(&raw_frame(b0, true, piece)).await;
        }
        c.send(&raw_frame(0x80, true, b"")).await;
        let f = c.read_frame().await;
        assert_eq!(f.b0, 0xC1);
        assert_eq!(inflate(&f.payload), big.as_bytes());
    });
}

/// Hostile first fragments that would inflate to the whole 16 MiB limit each: while the
/// message is incomplete a connection holds at most 1 MiB of output (the rest stays
/// compressed until the last frame), so eight of them cannot make the server hold 128 MiB;
/// the last frame then gets 1009.
fn open_compressed_fragments_hold_a_bounded_output(backend: BackendChoice) {
    let s = server(backend);
    // 64 MiB of zeros: about 64 KB compressed, four times the 16 MiB limit.
    let bomb = deflate(&vec![0u8; 64 << 20]);
    let rss_before = rss_kib();
    block_on(async {
        let mut held = Vec::new();
        for _ in 0..8 {
            let (mut c, _) = upgrade(s.addr, Some("permessage-deflate")).await;
            c.send(&raw_frame(0x42, true, &bomb)).await;
            held.push(c);
        }
        // Let the server read them all.
        tokio::time::sleep(std::time::Duration::from_millis(500)).await;
        let grown = rss_kib().saturating_sub(rss_before);
        assert!(
            grown < 48 * 1024,
            "RSS grew {grown} KiB for 8 open compressed messages"
        );
        for c in &mut held {
            c.send(&raw_frame(0x80, true, b"")).await;
            c.expect_close(1009).await;
        }
    });
}

/// A client compressor that keeps its context between messages (no reset: what it sent
/// before is its dictionary), as a client does without `client_no_context_takeover`.
struct KeptDeflater(flate2::Compress);

impl KeptDeflater {
    fn new() -> KeptDeflater {
        KeptDeflater(flate2::Compress::new(flate2::Compression::new(6), false))
    }

    fn message(&mut self, data: &[u8]) -> Vec<u8> {
        let z = &mut self.0;
        let start = z.total_in();
        let mut out = Vec::with_capacity(data.len() + 64);
        loop {
            let at = (z.total_in() - start) as usize;
            z.compress_vec(&data[at..], &mut out, flate2::FlushCompress::Sync)
                .expect("compress");
            if out.len() < out.capacity() {
                break;
            }
            out.reserve(out.capacity());
        }
        assert!(out.ends_with(&[0, 0, 0xff, 0xff]));
        out.truncate(out.len() - 4);
        out
    }
}

/// With client context takeover allowed, a client that keeps its context is understood
/// (its later messages refer back to earlier ones), whole and in fragments with control
/// frames between; by default the server asks for no client context.
fn client_context_takeover_when_allowed(backend: BackendChoice) {
    let s = TestServer::start_with(backend, |c| {
        c.deflate = Some(DeflateConfig {
            client_context_takeover: true,
            ..DeflateConfig::default()
        })
    });
    block_on(async {
        let (mut c, head) =
            upgrade(s.addr, Some("permessage-deflate; client_max_window_bits")).await;
        assert_eq!(
            head.header("sec-websocket-extensions"),
            Some("permessage-deflate; server_no_context_takeover")
        );
        let mut z = KeptDeflater::new();
        let big = json(3_000);
        let first = z.message(big.as_bytes());
        let second = z.message(big.as_bytes());
        assert!(
            second.len() * 4 < first.len(),
            "the second refers back to the first: {} vs {}",
            second.len(),
            first.len()
        );
        c.send(&raw_frame(0xC1, true, &first)).await;
        c.send(&raw_frame(0xC1, true, &second)).await;
        // A plain message between does not touch the context.
        c.send(&frame(true, TEXT, b"plain")).await;
        // Split in three around a ping, still referring back.
        let third = z.message(big.as_bytes());
        let (a, rest) = third.split_at(1);
        c.send(&raw_frame(0x41, true, a)).await;
        c.send(&frame(true, PING, b"p")).await;
        c.send(&raw_frame(0x00, true, rest)).await;
        c.send(&raw_frame(0x80, true, b"")).await;
        let fourth = z.message(json(200).as_bytes());
        c.send(&raw_frame(0xC1, true, &fourth)).await;
        // The pong may come before echoes of messages read with it: data frames in order.
        let want = [
            big.clone(),
            big.clone(),
            "plain".into(),
            big.clone(),
            json(200),
        ];
        let (mut echoes, mut pongs) = (Vec::new(), 0);
        while echoes.len() < want.len() {
            let f = c.read_frame().await;
            match f.b0 {
                0x8A => pongs += 1,
                0xC1 => echoes.push(String::from_utf8(inflate(&f.payload)).expect("text")),
                0x81 => echoes.push(String::from_utf8(f.payload).expect("text")),
                other => panic!("unexpected frame {other:#x}"),
            }
        }
        assert_eq!(echoes, want);
        if pongs == 0 {
            assert_eq!(c.read_frame().await.b0, 0x8A, "the pong");
        }
        // A client that asks for no context still gets that.
        let (_, head) = upgrade(
            s.addr,
            Some("permessage-deflate; client_no_context_takeover"),
        )
        .await;
        assert_eq!(head.header("sec-websocket-extensions"), Some(EXT));
    });
    // The default asks every client to reset its context.
    let d = server(backend);
    block_on(async {
        let (_, head) = upgrade(d.addr, Some("permessage-deflate")).await;
        assert_eq!(head.header("sec-websocket-extensions"), Some(EXT));
    });
}

fn rss_kib() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|v| v.parse().ok())
        })
        .unwrap_or(0)
}

/// A broadcast reaches deflate subscribers compressed and plain ones plain, from one
/// publication (compressed once per worker: `pubsub::Twin`).
fn a_broadcast_reaches_each_subscriber_in_its_own_form(backend: BackendChoice) {
    let s = server(backend);
    block_on(async {
        let path = "/pubsub/prices";
        let sub = |ext: Option<&'static str>| {
            let mut request = upgrade_request(path);
            if let Some(e) = ext {
                request = request.replace(
                    "\r\n\r\n",
                    &format!("\r\nSec-WebSocket-Extensions: {e}\r\n\r\n"),
                );
            }
            let addr = s.addr;
            async move {
                let mut c = RawClient::connect(addr).await;
                c.send(request.as_bytes()).await;
                assert_eq!(c.read_head().await.status, 101);
                c
            }
        };
        let mut z1 = sub(Some("permessage-deflate")).await;
        let mut z2 = sub(Some("permessage-deflate")).await;
        let mut plain = sub(None).await;
        let big = json(3_000);
        // The plain one publishes (it is a subscriber too).
        plain.send(&frame(true, TEXT, big.as_bytes())).await;
        plain.send(&frame(true, TEXT, b"tiny")).await;
        for c in [&mut z1, &mut z2] {
            let f = c.read_frame().await;
            assert_eq!(f.b0, 0xC1, "compressed");
            assert_eq!(inflate(&f.payload), big.as_bytes());
            let f = c.read_frame().await;
            assert_eq!(
                (f.b0, f.payload.as_slice()),
                (0x81, &b"tiny"[..]),
                "below the threshold"
            );
        }
        let f = plain.read_frame().await;
        assert_eq!((f.b0, f.payload.as_slice()), (0x81, big.as_bytes()));
        let f = plain.read_frame().await;
        assert_eq!(f.payload, b"tiny");
    });
}

for_both_backends!(
    negotiation,
    compressed_echo_both_ways,
    bad_inputs_get_their_close_codes,
    a_bomb_is_stopped_by_its_output,
    a_fragmented_bomb_is_stopped_at_its_first_fragment,
    open_compressed_fragments_hold_a_bounded_output,
    client_context_takeover_when_allowed,
    a_broadcast_reaches_each_subscriber_in_its_own_form,
);
