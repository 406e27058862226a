use super::*;
use crate::proto::close::CloseCode;

const KEY: [u8; 4] = [0xA1, 0x5B, 0x07, 0xEE];

/// Encodes a client frame with full control over the bits (for broken frames too).
fn raw_frame(b0: u8, masked: bool, payload: &[u8], len_form: u8) -> Vec<u8> {
    let mut out = vec![b0];
    let m = if masked { 0x80 } else { 0 };
    let len = payload.len();
    match len_form {
        7 => out.push(m | len as u8),
        16 => {
            out.push(m | 126);
            out.extend_from_slice(&(len as u16).to_be_bytes());
        }
        _ => {
            out.push(m | 127);
            out.extend_from_slice(&(len as u64).to_be_bytes());
        }
    }
    if masked {
        out.extend_from_slice(&KEY);
        out.extend(payload.iter().enumerate().map(|(i, b)| b ^ KEY[i & 3]));
    } else {
        out.extend_from_slice(payload);
    }
    out
}

fn frame(fin: bool, op: u8, payload: &[u8]) -> Vec<u8> {
    let form = match payload.len() {
        0..=125 => 7,
        126..=0xFFFF => 16,
        _ => 64,
    };
    raw_frame(if fin { 0x80 } else { 0 } | op, true, payload, form)
}

fn conn() -> Connection {
    Connection::new(Arc::new(Config::default()), Instant::now())
}

fn conn_with(cfg: Config) -> Connection {
    Connection::new(Arc::new(cfg), Instant::now())
}

fn events(c: &mut Connection) -> Vec<Event> {
    std::iter::from_fn(|| c.poll_event()).collect()
}

fn written(c: &mut Connection) -> Vec<u8> {
    let out: Vec<u8> = c.transmit().flatten().copied().collect();
    c.advance_transmit(out.len());
    out
}

fn feed(c: &mut Connection, bytes: &[u8]) {
    let mut b = bytes.to_vec();
    c.handle_read(&mut b, Instant::now());
}

/// A session that touches every path: all length forms, fragmentation with a control frame
/// in between, a code point split across fragments, empty frames, ping, pong, close.
fn session() -> (Vec<u8>, Vec<Event>, Vec<u8>) {
    let mut s = Vec::new();
    s.extend(frame(true, 1, b"Hello"));
    s.extend(frame(false, 2, &[1, 2, 3]));
    s.extend(frame(true, 9, b"ping!"));
    s.extend(frame(false, 0, &[]));
    s.extend(frame(true, 0, &[4, 5]));
    let euro = "a€b".as_bytes(); // € is 3 bytes: split it over two fragments
    s.extend(frame(false, 1, &euro[..2]));
    s.extend(frame(true, 0, &euro[2..]));
    s.extend(frame(true, 10, b"pong"));
    s.extend(frame(true, 2, &[7u8; 300])); // 16-bit length
    s.extend(raw_frame(0x82, true, &[9u8; 10], 64)); // 64-bit length form, small payload
    s.extend(frame(true, 1, b""));
    let mut close = 4001u16.to_be_bytes().to_vec();
    close.extend_from_slice("bye".as_bytes());
    s.extend(frame(true, 8, &close));
    s.extend(frame(true, 1, b"after close: ignored"));
    let events = vec![
        Event::Text(Bytes::from_static(b"Hello")),
        Event::Ping(Bytes::from_static(b"ping!")),
        Event::Binary(Bytes::from_static(&[1, 2, 3, 4, 5])),
        Event::Text(Bytes::from("a€b")),
        Event::Pong(Bytes::from_static(b"pong")),
        Event::Binary(Bytes::from(vec![7u8; 300])),
        Event::Binary(Bytes::from(vec![9u8; 10])),
        Event::Text(Bytes::new()),
        Event::Close(Some(CloseFrame {
            code: CloseCode::Library(4001),
            reason: "bye".into(),
        })),
    ];
    let mut tx = encode_frame(OpCode::Pong, b"ping!").to_vec();
    tx.extend_from_slice(&[0x88, 0x02, 0x0F, 0xA1]);
    (s, events, tx)
}

#[test]
fn a_whole_session_gives_the_same_result_split_at_every_byte_boundary() {
    let (bytes, want_events, want_tx) = session();
    let mut c = conn();
    feed(&mut c, &bytes);
    assert_eq!(events(&mut c), want_events);
    assert_eq!(written(&mut c), want_tx);
    assert!(c.is_closed());
    for cut in 0..=bytes.len() {
        let mut c = conn();
        feed(&mut c, &bytes[..cut]);
        feed(&mut c, &bytes[cut..]);
        assert_eq!(events(&mut c), want_events, "cut at {cut}");
        assert_eq!(written(&mut c), want_tx, "cut at {cut}");
    }
    // Two cuts, every pair of boundaries in the first 120 bytes (headers of every form).
    for a in 0..120 {
        for b in a..120 {
            let mut c = conn();
            feed(&mut c, &bytes[..a]);
            feed(&mut c, &bytes[a..b]);
            feed(&mut c, &bytes[b..]);
            assert_eq!(events(&mut c), want_events, "cuts at {a},{b}");
        }
    }
    // One byte at a time, draining events as we go.
    let mut c = conn();
    let mut got = Vec::new();
    for b in &bytes {
        feed(&mut c, std::slice::from_ref(b));
        got.extend(events(&mut c));
    }
    assert_eq!(got, want_events);
}

#[test]
fn large_messages_across_many_reads() {
    let big: Vec<u8> = (0..200_000u32).map(|i| (i * 7) as u8).collect();
    let bytes = frame(true, 2, &big);
    for step in [1000, 4096, 65536, 99_999] {
        let mut c = conn();
        for piece in bytes.chunks(step) {
            feed(&mut c, piece);
        }
        assert_eq!(
            events(&mut c),
            vec![Event::Binary(Bytes::from(big.clone()))]
        );
        // Nothing is kept once the message is delivered.
        assert_eq!(c.heap_bytes(), 0);
        assert!(c.bare.busy.is_none());
    }
}

fn closes_with(bytes: &[u8], code: u16) {
    closes_with_cfg(bytes, code, Config::default());
}

fn closes_with_cfg(bytes: &[u8], code: u16, cfg: Config) {
    let mut c = conn_with(cfg);
    feed(&mut c, bytes);
    let ev = events(&mut c);
    assert!(c.is_closed(), "not closed for {bytes:02x?}");
    assert!(matches!(ev.last(), Some(Event::ProtocolError(_))), "{ev:?}");
    let tx = written(&mut c);
    assert_eq!(tx.first(), Some(&0x88), "{tx:02x?}");
    assert_eq!(&tx[2..4], &code.to_be_bytes(), "{tx:02x?}");
    assert_eq!(u16::from(c.close_code()), code, "{bytes:02x?}");
    // Anything afterwards is ignored and queues nothing.
    feed(&mut c, &frame(true, 1, b"more"));
    assert!(events(&mut c).is_empty());
    assert!(written(&mut c).is_empty());
}

#[test]
fn every_frame_rule_closes_with_its_code() {
    closes_with(&raw_frame(0x81, false, b"x", 7), 1002); // unmasked
    closes_with(&raw_frame(0xC1, true, b"x", 7), 1002); // RSV1
    closes_with(&raw_frame(0xA1, true, b"x", 7), 1002); // RSV2
    closes_with(&raw_frame(0x91, true, b"x", 7), 1002); // RSV3
    for op in [3u8, 4, 5, 6, 7, 0xB, 0xC, 0xD, 0xE, 0xF] {
        closes_with(&raw_frame(0x80 | op, true, b"", 7), 1002);
    }
    closes_with(&raw_frame(0x89, true, &[0u8; 126], 16), 1002); // control > 125
    closes_with(&raw_frame(0x09, true, b"x", 7), 1002); // fragmented control
    closes_with(&frame(true, 0, b"x"), 1002); // continuation with nothing open
    let mut s = frame(false, 1, b"a");
    s.extend(frame(true, 2, b"b")); // new data frame inside a message
    closes_with(&s, 1002);
    let mut s = vec![0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0];
    s.extend_from_slice(&KEY); // 64-bit length with the top bit set
    closes_with(&s, 1002);
}

#[test]
fn close_payload_rules() {
    closes_with(&frame(true, 8, &[3]), 1002);
    for bad in [0u16, 999, 1004, 1005, 1006, 1015, 1016, 2999, 5000, 65535] {
        closes_with(&frame(true, 8, &bad.to_be_bytes()), 1002);
    }
    let mut p = 1000u16.to_be_bytes().to_vec();
    p.push(0xFF);
    closes_with(&frame(true, 8, &p), 1007);
    for good in [1000u16, 1001, 1002, 1003, 1007, 1011, 1014, 3000, 4999] {
        let mut c = conn();
        feed(&mut c, &frame(true, 8, &good.to_be_bytes()));
        events(&mut c);
        let tx = written(&mut c);
        assert_eq!(
            tx,
            [vec![0x88, 2], good.to_be_bytes().to_vec()].concat(),
            "echoes {good}"
        );
        assert!(c.is_closed());
    }
    let mut c = conn();
    feed(&mut c, &frame(true, 8, &[]));
    assert_eq!(events(&mut c), vec![Event::Close(None)]);
    assert_eq!(written(&mut c), vec![0x88, 0]);
}

#[test]
fn utf8_rules() {
    closes_with(&frame(true, 1, b"\xce\xba\xff"), 1007);
    closes_with(&frame(true, 1, b"ok\xe2\x82"), 1007); // unfinished at the end
    let mut s = frame(false, 1, b"\xe2");
    s.extend(frame(true, 0, b"\x82")); // unfinished at the end of the fragmented message
    closes_with(&s, 1007);
    // Fail fast: the first half of a frame already shows the error.
    let bytes = frame(
        true,
        1,
        b"\xce\xba\xf4\x90\x80\x80 and a lot more text to come",
    );
    let mut c = conn();
    feed(&mut c, &bytes[..10]);
    events(&mut c);
    assert!(c.is_closed());
    assert_eq!(&written(&mut c)[..4], &[0x88, 0x02, 0x03, 0xEF]);
    // Binary messages are not checked.
    let mut c = conn();
    feed(&mut c, &frame(true, 2, b"\xff"));
    assert_eq!(
        events(&mut c),
        vec![Event::Binary(Bytes::from_static(b"\xff"))]
    );
}

#[test]
fn size_limits_close_with_1009() {
    let cfg = || Config {
        max_message_size: 100,
        ..Config::default()
    };
    // The header alone decides: no payload needs to arrive.
    closes_with_cfg(&frame(true, 2, &[0u8; 101])[..8], 1009, cfg());
    let mut s = frame(false, 2, &[0u8; 60]);
    s.extend(frame(true, 0, &[0u8; 60]));
    closes_with_cfg(&s, 1009, cfg());
    let mut c = conn_with(cfg());
    feed(&mut c, &frame(true, 2, &[0u8; 100]));
    assert_eq!(events(&mut c).len(), 1);
}

#[test]
fn replies_to_messages_before_a_close_or_an_error_go_out_first() {
    for tail in [
        frame(true, 8, &1000u16.to_be_bytes()),
        raw_frame(0xC1, true, b"x", 7),
    ] {
        let mut c = conn();
        let mut s = frame(true, 1, b"first");
        s.extend(tail);
        s.extend(frame(true, 9, b"never answered"));
        feed(&mut c, &s);
        let mut tx = Vec::new();
        while let Some(ev) = c.poll_event() {
            if let Event::Text(p) = ev {
                c.send(OpCode::Text, &p).unwrap(); // the echo of "first"
            }
        }
        tx.extend(written(&mut c));
        assert_eq!(&tx[..7], &[0x81, 5, b'f', b'i', b'r', b's', b't']);
        assert_eq!(tx[7], 0x88, "then our close: {tx:02x?}");
        assert_eq!(tx.len(), 7 + 4, "and no pong: {tx:02x?}");
        assert!(c.is_closed());
    }
}

#[test]
fn pings_are_answered_and_control_frames_interleave() {
    let mut c = conn();
    let mut s = frame(false, 1, b"frag");
    s.extend(frame(true, 9, b"abc"));
    s.extend(frame(true, 0, b"ment"));
    feed(&mut c, &s);
    assert_eq!(
        events(&mut c),
        vec![
            Event::Ping(Bytes::from_static(b"abc")),
            Event::Text(Bytes::from_static(b"fragment"))
        ]
    );
    assert_eq!(written(&mut c), vec![0x8A, 3, b'a', b'b', b'c']);
}

#[test]
fn closing_by_us_sends_nothing_but_the_close() {
    let now = Instant::now();
    let mut c = conn();
    c.close(CloseCode::Away, "shutting down", now);
    assert_eq!(c.state(), State::ClosingByUs);
    assert_eq!(c.send(OpCode::Text, b"late"), Err(SendError::Closing));
    let tx = written(&mut c);
    assert_eq!(&tx[..4], &[0x88, 15, 0x03, 0xE9]);
    assert_eq!(&tx[4..], b"shutting down");
    // The peer's data and pings are read but neither delivered nor answered.
    let mut s = frame(true, 1, b"data");
    s.extend(frame(true, 9, b"p"));
    s.extend(frame(true, 8, &1001u16.to_be_bytes()));
    feed(&mut c, &s);
    assert_eq!(
        events(&mut c),
        vec![
            Event::Ping(Bytes::from_static(b"p")),
            Event::Close(Some(CloseFrame {
                code: CloseCode::Away,
                reason: String::new()
            }))
        ]
    );
    assert!(written(&mut c).is_empty());
    assert!(c.is_closed());
    // A second close is a no-op.
    c.close(CloseCode::Normal, "", now);
    assert!(written(&mut c).is_empty());
}

#[test]
fn timers_ping_then_drop_a_silent_peer() {
    let t0 = Instant::now();
    let cfg = Config {
        ping_interval: Some(Duration::from_secs(10)),
        pong_timeout: Duration::from_secs(5),
        ..Config::default()
    };
    let mut c = Connection::new(Arc::new(cfg), t0);
    assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(10)));
    c.handle_timeout(t0 + Duration::from_secs(9)); // early: nothing
    assert!(written(&mut c).is_empty());
    // Activity pushes the deadline.
    let mut b = frame(true, 10, b"");
    c.handle_read(&mut b, t0 + Duration::from_secs(8));
    assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(18)));
    c.handle_timeout(t0 + Duration::from_secs(18));
    assert_eq!(written(&mut c), vec![0x89, 0x00]);
    assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(23)));
    // An answer in time puts it back to idle.
    let mut b = frame(true, 10, b"");
    c.handle_read(&mut b, t0 + Duration::from_secs(20));
    assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(30)));
    c.handle_timeout(t0 + Duration::from_secs(30));
    written(&mut c);
    c.handle_timeout(t0 + Duration::from_secs(35));
    assert!(c.is_closed());
    assert!(events(&mut c).contains(&Event::TimedOut));
    // Closed without a close frame either way.
    assert_eq!(c.close_code(), CloseCode::Abnormal);
}

#[test]
fn the_close_code_is_the_peers_else_ours_and_the_last_one_wins() {
    // The peer closes first: its code (1005 when its frame had none).
    let mut c = conn();
    assert_eq!(c.close_code(), CloseCode::Abnormal);
    feed(&mut c, &frame(true, 8, &4321u16.to_be_bytes()));
    assert_eq!(
        c.close_code(),
        CloseCode::Abnormal,
        "not before it is polled"
    );
    events(&mut c);
    assert_eq!(u16::from(c.close_code()), 4321);
    let mut c = conn();
    feed(&mut c, &frame(true, 8, b""));
    events(&mut c);
    assert_eq!(c.close_code(), CloseCode::Status);
    // We close first: ours, until the peer's reply is read, whose code then counts.
    let now = Instant::now();
    let mut c = conn();
    c.close(CloseCode::Again, "", now);
    assert_eq!(c.close_code(), CloseCode::Again);
    c.close(CloseCode::Normal, "", now); // not open: a no-op
    assert_eq!(c.close_code(), CloseCode::Again);
    feed(&mut c, &frame(true, 8, &1000u16.to_be_bytes()));
    events(&mut c);
    assert_eq!(c.close_code(), CloseCode::Normal);
}

#[test]
fn close_deadline_drops_the_connection() {
    let t0 = Instant::now();
    let mut c = conn_with(Config {
        ping_interval: None,
        close_timeout: Duration::from_secs(5),
        ..Config::default()
    });
    assert_eq!(c.poll_timeout(), None);
    c.close(CloseCode::Normal, "", t0);
    assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(5)));
    c.handle_timeout(t0 + Duration::from_secs(5));
    assert!(c.is_closed());
    assert_eq!(events(&mut c), vec![Event::TimedOut]);
}

#[test]
fn control_frames_over_125_bytes_are_refused() {
    let mut c = conn();
    assert_eq!(
        c.send(OpCode::Ping, &[0; 126]),
        Err(SendError::ControlTooLong)
    );
    assert_eq!(c.send(OpCode::Ping, &[0; 125]), Ok(()));
}

#[test]
fn short_writes_resume_where_they_stopped() {
    let mut c = conn();
    c.send(OpCode::Text, b"abc").unwrap();
    c.send_frame(encode_frame(OpCode::Binary, b"de")).unwrap();
    let all: Vec<u8> = c.transmit().flatten().copied().collect();
    assert_eq!(c.queued_bytes(), all.len());
    let mut out = Vec::new();
    for step in [1, 3, 1, 100] {
        let chunk: Vec<u8> = c.transmit().flatten().copied().take(step).collect();
        c.advance_transmit(chunk.len());
        out.extend(chunk);
    }
    assert_eq!(out, all);
    assert_eq!(c.queued_bytes(), 0);
    assert_eq!(c.transmit_frames(), 0);
}

#[test]
fn small_frames_merge_into_one_slice_and_large_ones_keep_their_place() {
    let mut c = conn();
    let mut expected = Vec::new();
    for i in 0..50u8 {
        c.send(OpCode::Binary, &[i; 60]).unwrap();
        expected.extend_from_slice(&encode_frame(OpCode::Binary, &[i; 60]));
    }
    let large = encode_frame(OpCode::Binary, &[9; COALESCE_MAX + 1]);
    c.send_frame(large.clone()).unwrap();
    expected.extend_from_slice(&large);
    let shared = encode_frame(OpCode::Text, b"shared");
    c.send_shared(&shared).unwrap();
    expected.extend_from_slice(&shared);
    // 50 small frames, the large one (by reference), then the small shared one.
    assert_eq!(c.transmit_frames(), 3);
    let ptrs: Vec<usize> = c.transmit().map(|s| s.as_ptr() as usize).collect();
    assert_eq!(
        ptrs[1],
        large.as_ptr() as usize,
        "a large frame is not copied"
    );
    let slices: Vec<Vec<u8>> = c.transmit().map(<[u8]>::to_vec).collect();
    assert_eq!(slices.len(), 3);
    assert_eq!(slices.concat(), expected);
    assert_eq!(c.queued_bytes(), expected.len());
    assert_eq!(written(&mut c), expected);
    assert_eq!(c.heap_bytes(), 0);
}

#[test]
fn only_a_close_handshake_counts_as_closed_by_handshake() {
    // The peer's close: replied to, and nothing more should come from it.
    let mut c = conn();
    feed(&mut c, &frame(true, 0x8, &1000u16.to_be_bytes()));
    events(&mut c);
    assert!(c.is_closed() && c.closed_by_handshake());
    // A protocol error: closed, but the peer may still be sending.
    let mut c = conn();
    feed(&mut c, &frame(true, 0x3, b"reserved"));
    events(&mut c);
    assert!(c.is_closed() && !c.closed_by_handshake());
    // Open: neither.
    let c = conn();
    assert!(!c.is_closed() && !c.closed_by_handshake());
}

#[test]
fn an_owned_payload_goes_out_uncopied_after_its_own_header() {
    let mut c = conn();
    c.send(OpCode::Text, b"before").unwrap();
    let payload = Bytes::from(vec![7u8; 70_000]);
    c.send_bytes(OpCode::Binary, payload.clone()).unwrap();
    let small = Bytes::from_static(b"small");
    c.send_bytes(OpCode::Text, small.clone()).unwrap();
    let expected = [
        encode_frame(OpCode::Text, b"before"),
        encode_frame(OpCode::Binary, &payload),
        encode_frame(OpCode::Text, &small),
    ]
    .concat();
    // "before" and the large frame's header merged, the payload itself, the small frame.
    assert_eq!(c.transmit_frames(), 3);
    let ptrs: Vec<usize> = c.transmit().map(|s| s.as_ptr() as usize).collect();
    assert_eq!(
        ptrs[1],
        payload.as_ptr() as usize,
        "the payload is not copied"
    );
    assert_eq!(c.queued_bytes(), expected.len());
    assert_eq!(written(&mut c), expected);
    assert_eq!(
        c.send_bytes(OpCode::Ping, Bytes::from(vec![0; 126])),
        Err(SendError::ControlTooLong)
    );
}

#[test]
fn reassembly_buffers_are_counted_per_thread_until_they_are_freed() {
    std::thread::spawn(|| {
        assert_eq!(reassembly_total(), (0, 0));
        let mut a = conn();
        let mut b = conn();
        // a: a binary message in two fragments; b: one frame split across two reads.
        feed(&mut a, &frame(false, 0x2, &[1; 3000]));
        let whole = frame(true, 0x2, &[2; 5000]);
        feed(&mut b, &whole[..1000]);
        let (bytes, holders) = reassembly_total();
        assert_eq!(holders, 2);
        assert!(bytes >= 3000 + 990, "{bytes}");
        assert_eq!(bytes, a.reassembly_bytes() + b.reassembly_bytes());
        // b completes: its buffer leaves the count (the message now belongs to the event).
        feed(&mut b, &whole[1000..]);
        assert!(matches!(events(&mut b).as_slice(), [Event::Binary(p)] if p.len() == 5000));
        assert_eq!(b.reassembly_bytes(), 0);
        assert_eq!(reassembly_total(), (a.reassembly_bytes(), 1));
        // a is dropped mid-message: nothing stays counted.
        drop(a);
        assert_eq!(reassembly_total(), (0, 0));
        // A protocol error mid-message frees it too.
        let mut c = conn();
        feed(&mut c, &frame(false, 0x2, &[3; 100]));
        assert_eq!(reassembly_total().1, 1);
        feed(&mut c, &frame(true, 0x2, b"not a continuation"));
        assert!(matches!(
            events(&mut c).as_slice(),
            [Event::ProtocolError(_)]
        ));
        assert_eq!(reassembly_total(), (0, 0));
    })
    .join()
    .unwrap();
}

#[test]
fn slices_handed_out_stay_put_while_more_is_queued() {
    // An io_uring send keeps pointing at the slices until it completes: queuing more in
    // the meantime (enough to outgrow any buffer) must neither move nor change them.
    let mut c = conn();
    c.send(OpCode::Binary, &[1; 100]).unwrap();
    let first: Vec<(usize, Vec<u8>)> = c
        .transmit()
        .map(|s| (s.as_ptr() as usize, s.to_vec()))
        .collect();
    for i in 0..2000u32 {
        c.send(OpCode::Binary, &i.to_be_bytes()).unwrap();
    }
    let again: Vec<(usize, Vec<u8>)> = c
        .transmit()
        .map(|s| (s.as_ptr() as usize, s.to_vec()))
        .take(first.len())
        .collect();
    assert_eq!(first, again);
    // A short write of the first slice, then more queued: its rest is still in place.
    c.advance_transmit(10);
    c.send(OpCode::Binary, &[2; 900]).unwrap();
    let rest = c.transmit().next().unwrap();
    assert_eq!(rest.as_ptr() as usize, first[0].0 + 10);
    assert_eq!(rest, &first[0].1[10..]);
}

#[test]
fn idle_connection_holds_no_heap_and_the_decoder_is_small() {
    let mut c = conn();
    assert_eq!(c.heap_bytes(), 0);
    // A message: the in-progress state lives until its event is polled.
    feed(&mut c, &frame(true, 1, b"hi"));
    assert!(c.heap_bytes() > 0);
    events(&mut c);
    assert_eq!(c.heap_bytes(), 0);
    // A ping: the pong keeps it alive until written.
    feed(&mut c, &frame(true, 9, b"p"));
    events(&mut c);
    assert!(c.heap_bytes() > 0);
    written(&mut c);
    assert_eq!(c.heap_bytes(), 0);
    // A header cut after 1 byte, then a payload cut in two, then a fragmented message:
    // the state is kept across the reads and dropped when the message is complete.
    let whole = frame(true, 2, &[7u8; 300]);
    let (a, rest) = whole.split_at(1);
    let (b, d) = rest.split_at(150);
    feed(&mut c, a);
    assert!(c.bare.busy.is_some());
    feed(&mut c, b);
    assert!(c.bare.busy.is_some());
    feed(&mut c, d);
    assert_eq!(
        events(&mut c),
        vec![Event::Binary(Bytes::from(vec![7u8; 300]))]
    );
    assert!(c.bare.busy.is_none());
    feed(&mut c, &frame(false, 1, b"a"));
    assert_eq!(events(&mut c), vec![]);
    assert!(
        c.bare.busy.is_some(),
        "an open fragmented message is in progress"
    );
    feed(&mut c, &frame(true, 0, b"b"));
    assert_eq!(events(&mut c), vec![Event::Text(Bytes::from_static(b"ab"))]);
    assert_eq!(c.heap_bytes(), 0);
    assert!(std::mem::size_of::<Decoder>() <= 48);
    // The per-slot footprint the engine's 128-byte idle budget is built on: the engine
    // keeps the bare state (its configuration chosen by the tag).
    assert!(
        std::mem::size_of::<BareConnection>() <= 24,
        "{}",
        std::mem::size_of::<BareConnection>()
    );
    assert!(
        std::mem::size_of::<Connection>() <= 32,
        "{}",
        std::mem::size_of::<Connection>()
    );
}

#[test]
fn spare_buffers_are_reused_and_trimmed_when_unused_for_a_window() {
    // Thread-local: this test's thread starts with none.
    std::thread::spawn(|| {
        let mut conns: Vec<Connection> = (0..200).map(|_| conn()).collect();
        let burst = |conns: &mut Vec<Connection>| {
            for c in conns.iter_mut() {
                c.send(OpCode::Text, b"x").unwrap();
            }
            for c in conns.iter_mut() {
                written(c);
            }
        };
        burst(&mut conns);
        assert_eq!(super::spare_count(), 200);
        // A burst each window keeps them all.
        for _ in 0..3 {
            for _ in 0..super::SPARE_WINDOW {
                super::trim_spares();
            }
            burst(&mut conns);
            assert_eq!(super::spare_count(), 200);
        }
        // A window without use frees everything above the floor.
        for _ in 0..2 * super::SPARE_WINDOW {
            super::trim_spares();
        }
        assert_eq!(super::spare_count(), super::SPARE_FLOOR);
    })
    .join()
    .unwrap();
}

#[test]
fn pongs_past_the_reply_limit_collapse_into_the_latest_ping() {
    let mut c = conn_with(Config {
        reply_queue_limit: 100,
        ..Config::default()
    });
    // Fill the queue past the limit with a message the peer has not read.
    c.send(OpCode::Binary, &[0u8; 200]).unwrap();
    for i in 0..1000u32 {
        feed(&mut c, &frame(true, 9, &i.to_be_bytes()));
    }
    assert_eq!(events(&mut c).len(), 1000, "every ping is reported");
    // One message and no pong queued.
    assert_eq!(c.queued_bytes(), 204);
    let out = written(&mut c);
    assert_eq!(out.len(), 204);
    // Once written, the latest ping's pong is owed and queued, and only it.
    assert_eq!(
        written(&mut c),
        [&[0x8A, 4][..], &999u32.to_be_bytes()].concat()
    );
    assert!(written(&mut c).is_empty());
    // Under the limit pongs go out one per ping again.
    feed(&mut c, &frame(true, 9, b"a"));
    feed(&mut c, &frame(true, 9, b"b"));
    assert_eq!(written(&mut c), vec![0x8A, 1, b'a', 0x8A, 1, b'b']);
}

#[test]
fn a_message_not_complete_within_the_message_timeout_fails_with_1008() {
    let t0 = Instant::now();
    let mut c = Connection::new(
        Arc::new(Config {
            message_timeout: Some(Duration::from_secs(3)),
            ping_interval: None,
            ..Config::default()
        }),
        t0,
    );
    let whole = frame(true, 2, &[5u8; 1000]);
    let mut head = whole[..100].to_vec();
    c.handle_read(&mut head, t0);
    assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(3)));
    // Dripping more bytes does not move the deadline.
    let mut more = whole[100..200].to_vec();
    c.handle_read(&mut more, t0 + Duration::from_secs(2));
    assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(3)));
    c.handle_timeout(t0 + Duration::from_secs(3));
    assert_eq!(
        events(&mut c),
        vec![Event::ProtocolError(ProtocolError::MessageTimeout)]
    );
    assert!(c.is_closed());
    assert_eq!(written(&mut c), close_frame(CloseCode::Policy, "").to_vec());
    assert_eq!(reassembly_total(), (0, 0));

    // A message that completes in time clears its deadline.
    let mut c = Connection::new(
        Arc::new(Config {
            message_timeout: Some(Duration::from_secs(3)),
            ping_interval: None,
            ..Config::default()
        }),
        t0,
    );
    let mut head = whole[..100].to_vec();
    c.handle_read(&mut head, t0);
    let mut rest = whole[100..].to_vec();
    c.handle_read(&mut rest, t0 + Duration::from_secs(1));
    assert_eq!(c.poll_timeout(), None);
    assert_eq!(events(&mut c).len(), 1);
}

#[test]
fn a_closed_connection_whose_last_bytes_are_not_taken_times_out() {
    let t0 = Instant::now();
    let cfg = || Config {
        close_timeout: Duration::from_secs(5),
        ping_interval: Some(Duration::from_secs(25)),
        ..Config::default()
    };
    // The peer closes while our queue still holds a message it never reads.
    let mut c = Connection::new(Arc::new(cfg()), t0);
    c.send(OpCode::Binary, &[1u8; 300]).unwrap();
    let mut close = frame(true, 8, &1000u16.to_be_bytes());
    c.handle_read(&mut close, t0 + Duration::from_secs(1));
    assert!(matches!(events(&mut c).as_slice(), [Event::Close(_)]));
    assert!(c.is_closed());
    assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(6)));
    c.handle_timeout(t0 + Duration::from_secs(6));
    assert_eq!(events(&mut c), vec![Event::TimedOut]);
    assert_eq!(c.poll_timeout(), None);

    // Our close (the 1013 of a full queue), then the peer's reply: the deadline stays.
    let mut c = Connection::new(Arc::new(cfg()), t0);
    c.send(OpCode::Binary, &[1u8; 300]).unwrap();
    c.close(CloseCode::Again, "", t0);
    let mut reply = frame(true, 8, &1000u16.to_be_bytes());
    c.handle_read(&mut reply, t0 + Duration::from_secs(1));
    events(&mut c);
    assert!(c.is_closed());
    assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(5)));
    c.handle_timeout(t0 + Duration::from_secs(5));
    assert_eq!(events(&mut c), vec![Event::TimedOut]);

    // Written in time: the deadline passes with nothing to report.
    let mut c = Connection::new(Arc::new(cfg()), t0);
    let mut close = frame(true, 8, &1000u16.to_be_bytes());
    c.handle_read(&mut close, t0);
    events(&mut c);
    written(&mut c);
    c.handle_timeout(t0 + Duration::from_secs(5));
    assert!(events(&mut c).is_empty());
}

#[test]
fn queued_bytes_without_progress_for_the_send_timeout_drop_the_connection() {
    let t0 = Instant::now();
    let mut c = Connection::new(
        Arc::new(Config {
            send_timeout: Some(Duration::from_secs(30)),
            ping_interval: None,
            ..Config::default()
        }),
        t0,
    );
    // Nothing queued: nothing to time.
    c.note_unsent(t0);
    assert_eq!(c.poll_timeout(), None);
    c.send(OpCode::Binary, &[1u8; 2000]).unwrap();
    c.note_unsent(t0);
    assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(30)));
    // Progress restarts the clock at the next note.
    c.advance_transmit(100);
    assert_eq!(c.poll_timeout(), None);
    c.note_unsent(t0 + Duration::from_secs(20));
    c.note_unsent(t0 + Duration::from_secs(25)); // already running: unchanged
    assert_eq!(c.poll_timeout(), Some(t0 + Duration::from_secs(50)));
    c.handle_timeout(t0 + Duration::from_secs(49));
    assert!(events(&mut c).is_empty());
    c.handle_timeout(t0 + Duration::from_secs(50));
    assert_eq!(events(&mut c), vec![Event::SendTimedOut]);
    assert!(c.is_closed());
}
