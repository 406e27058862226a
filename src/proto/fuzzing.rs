//! The bodies of the fuzz targets in `fuzz/fuzz_targets/`, kept in the library so that
//! `tests/fuzz_corpus.rs` replays the committed seed corpus on stable with plain
//! `cargo test`, and a crash found by `cargo fuzz` reproduces the same way.
//!
//! Each function takes arbitrary bytes, drives one part of the protocol core with them and
//! asserts its invariants; a panic (from an `assert!` here or from the code under test) is
//! a finding. Nothing here is part of the API: it is hidden from the docs and may change
//! with the targets. Like the rest of `proto`, it performs no I/O; the clock is a base
//! `Instant` plus offsets chosen by the input.

use std::sync::Arc;
use std::time::{Duration, Instant};

use super::close::{CloseCode, encode_close_payload, parse_close_payload};
use super::connection::{Config, Connection, DEFAULT_MAX_MESSAGE_SIZE, Event, State};
use super::error::ProtocolError;
use super::frame::{FrameHeader, MAX_CONTROL_PAYLOAD, OpCode, Parsed};
use super::handshake::{HandshakeLimits, ParseStatus, encode_accept, encode_error, parse_request};

/// Fuzz target `handshake`: parses `data` as an upgrade request with the default limits;
/// on a complete request also validates it, reads cookies and query parameters, selects a
/// subprotocol and encodes the answer (101 or the error response).
///
/// Invariants: the header block consumed fits the buffer and the limit; re-parsing exactly
/// the consumed bytes gives the same request, and one byte fewer is incomplete; responses
/// have a status line and end their header block once (no header injection).
pub fn handshake(data: &[u8]) {
    let limits = HandshakeLimits::default();
    let mut out = Vec::new();
    let parsed = parse_request(data, &limits);
    let (request, consumed) = match parsed {
        Ok(ParseStatus::Partial) => {
            assert!(data.len() < limits.max_header_bytes);
            return;
        }
        Err(e) => {
            encode_error(&mut out, e, &[]);
            check_response(&out, e.status());
            return;
        }
        Ok(ParseStatus::Complete { request, consumed }) => (request, consumed),
    };
    assert!(consumed <= data.len() && consumed <= limits.max_header_bytes);
    // Incremental parsing: the same bytes give the same request, and a prefix is partial.
    let head = data.get(..consumed).unwrap_or_default();
    assert_eq!(
        parse_request(head, &limits),
        Ok(ParseStatus::Complete {
            request: request.clone(),
            consumed
        })
    );
    let cut = head.get(..consumed.saturating_sub(1)).unwrap_or_default();
    assert_eq!(parse_request(cut, &limits), Ok(ParseStatus::Partial));

    let _ = (request.wants_upgrade(), request.origin(), request.host());
    for (name, value) in request.cookies() {
        assert!(!name.contains(';') && !value.contains(';'));
    }
    for name in ["token", "room", ""] {
        if let Some(v) = request.query_param(name) {
            assert!(!v.contains('&'));
        }
    }
    match request.validate_upgrade() {
        Ok(upgrade) => {
            assert_eq!(request.method, "GET");
            let protocol = upgrade.select_protocol(&["chat", "superchat", "mqtt"]);
            if let Some(p) = protocol {
                assert_eq!(upgrade.check_protocol(p), Ok(p));
            }
            // The path as an extra header value: CR/LF must never reach the wire.
            encode_accept(
                &mut out,
                &upgrade.key,
                protocol,
                &[("X-Path", &request.path)],
            );
            check_response(&out, 101);
        }
        Err(e) => {
            encode_error(&mut out, e, &[("X-Path", &request.path)]);
            check_response(&out, e.status());
        }
    }
}

/// An encoded response starts with its status line and has exactly one blank line, which
/// ends the header block (for a 101, at the very end).
fn check_response(out: &[u8], status: u16) {
    let line = format!("HTTP/1.1 {status} ");
    assert!(out.starts_with(line.as_bytes()));
    let blank = out.windows(4).filter(|w| w == b"\r\n\r\n").count();
    assert_eq!(blank, 1, "{}", String::from_utf8_lossy(out));
    if status == 101 {
        assert!(out.ends_with(b"\r\n\r\n"));
    }
}

/// A small deterministic generator (xorshift64*) for split points and actions, seeded by
/// the input so every run of the same bytes does the same thing.
/// A xorshift generator: the harnesses' choices, repeatable from the input's seed.
pub(crate) struct Rng(pub(crate) u64);

impl Rng {
    pub(crate) fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_F491_4F6C_DD1D)
    }

    /// A number in `0..n` (`n > 0`).
    pub(crate) fn below(&mut self, n: u64) -> u64 {
        self.next() % n.max(1)
    }
}

/// What the harness expects as the last close frame the server wrote.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ExpectedClose {
    /// No close frame.
    None,
    /// A close frame with an empty payload.
    Empty,
    /// A close frame with this code.
    Code(u16),
}

/// Fuzz target `frames`: feeds client bytes to a server [`Connection`] in pieces.
///
/// `data[0]` picks the configuration: bits 0-2 the message size limit (mostly small ones),
/// bit 3 whether pings are on, bit 4 whether RSV1 is allowed; bits 5-7 the split mode
/// (whole input, byte by byte, or random pieces). `data[1]` seeds the generator that picks
/// the pieces and, between them, timeouts, `close`, `send`, `shrink` and partial writes.
/// The rest is the byte stream from the client.
///
/// Invariants: events follow the rules (text is UTF-8, messages within the limit, control
/// payloads within 125 bytes, nothing after the terminal event `Close` / `ProtocolError` /
/// `TimedOut`, after which the connection is closed); states only move forward;
/// `queued_bytes` and `transmit_frames` match what `transmit` yields; and the bytes the
/// server wrote are whole unmasked frames, with at most one close frame, last, carrying
/// the expected code.
pub fn frames(data: &[u8]) {
    let (config_byte, seed, stream) = match data {
        [a, b, rest @ ..] => (*a, *b, rest),
        [a] => (*a, 0, &[][..]),
        [] => (0, 0, &[][..]),
    };
    let max_message_size = match config_byte & 0b111 {
        0 => DEFAULT_MAX_MESSAGE_SIZE,
        1 => 0,
        2 => 1,
        3 => 16,
        4 => 125,
        5 => 126,
        6 => 1024,
        _ => 65_536,
    };
    let config = Config {
        max_message_size,
        ping_interval: (config_byte & 0b1000 != 0).then_some(Duration::from_secs(25)),
        pong_timeout: Duration::from_secs(20),
        close_timeout: Duration::from_secs(5),
        allowed_rsv: if config_byte & 0b1_0000 != 0 {
            0b100
        } else {
            0
        },
        // Short enough for the harness's time steps to reach them.
        message_timeout: (config_byte & 0b1_0000 == 0).then_some(Duration::from_secs(60)),
        send_timeout: (config_byte & 0b1000 == 0).then_some(Duration::from_secs(30)),
        reply_queue_limit: if seed & 1 == 0 { 256 } else { 1 << 20 },
        // RSV1 allowed stands for "some extension": payloads are delivered as sent, which
        // the checker's model expects (deflate has its own tests).
        deflate: None,
    };
    let split_mode = config_byte >> 5;
    let mut rng = Rng((u64::from(seed) << 8) | u64::from(config_byte) | (1 << 40));

    let start = Instant::now();
    let mut elapsed = Duration::ZERO;
    let mut conn = Connection::new(Arc::new(config.clone()), start);
    let mut check = Checker {
        config,
        terminal: false,
        dropped: false,
        state: conn.state(),
        expected_close: ExpectedClose::None,
        written: Vec::new(),
    };
    let mut buf = stream.to_vec();
    let mut pos = 0;
    while pos < buf.len() {
        let len = match split_mode {
            0 => buf.len() - pos,
            1 => 1,
            2 => 1 + rng.below(16) as usize,
            3 => 1 + rng.below(200) as usize,
            _ => 1 + rng.below(1 + u64::from(seed)) as usize,
        };
        let end = pos.saturating_add(len).min(buf.len());
        let before = conn.state();
        if let Some(piece) = buf.get_mut(pos..end) {
            conn.handle_read(piece, start + elapsed);
        }
        pos = end;
        check.events(&mut conn, before);
        check.transmit(&mut conn, &mut rng, false);

        match rng.below(16) {
            0 => {
                // Let time pass: sometimes not enough, sometimes past every deadline.
                let steps = [0, 1, 5, 21, 26, 60];
                elapsed +=
                    Duration::from_secs(steps.get(rng.below(6) as usize).copied().unwrap_or(0));
                let before = conn.state();
                conn.handle_timeout(start + elapsed);
                check.events(&mut conn, before);
            }
            1 => {
                let code = [1000u16, 1001, 1008, 1011, 1013, 3000, 4000, 4999];
                let code = code.get(rng.below(8) as usize).copied().unwrap_or(1000);
                let reason = "é".repeat(rng.below(70) as usize);
                let before = conn.state();
                conn.close(CloseCode::from(code), &reason, start + elapsed);
                if before == State::Open {
                    assert_eq!(conn.state(), State::ClosingByUs);
                    check.expected_close = ExpectedClose::Code(code);
                } else {
                    assert_eq!(conn.state(), before);
                }
                check.state = conn.state();
            }
            2 => {
                let n = rng.below(300) as usize;
                let (opcode, payload) = match rng.below(3) {
                    0 => (OpCode::Text, "ü".repeat(n / 2).into_bytes()),
                    1 => (OpCode::Binary, vec![0xA5; n]),
                    _ => (OpCode::Ping, vec![7; n.min(MAX_CONTROL_PAYLOAD)]),
                };
                let sent = conn.send(opcode, &payload);
                assert_eq!(sent.is_ok(), conn.state() == State::Open);
            }
            3 => conn.shrink(),
            4 => conn.note_unsent(start + elapsed),
            _ => {}
        }
        check.transmit(&mut conn, &mut rng, false);
    }
    // A final timeout far in the future, then flush everything.
    let before = conn.state();
    conn.handle_timeout(start + elapsed + Duration::from_secs(3600));
    check.events(&mut conn, before);
    check.transmit(&mut conn, &mut rng, true);
    assert_eq!(conn.queued_bytes(), 0);
    assert_eq!(conn.transmit_frames(), 0);
    let _ = conn.heap_bytes();
    check.output();
}

/// The harness's view of one connection, checked after every step.
struct Checker {
    config: Config,
    /// A terminal event was seen.
    terminal: bool,
    /// The connection was dropped (nothing at all may follow).
    dropped: bool,
    /// The state after the last step.
    state: State,
    expected_close: ExpectedClose,
    /// Everything the server "wrote" so far.
    written: Vec<u8>,
}

impl Checker {
    /// Drains and checks the events; `before` is the state before the last `handle_*`.
    fn events(&mut self, conn: &mut Connection, before: State) {
        let state = conn.state();
        match (self.state, state) {
            (State::Closed, s) => assert_eq!(s, State::Closed),
            (State::ClosingByUs, s) => assert_ne!(s, State::Open),
            (State::Open, _) => {}
        }
        self.state = state;
        while let Some(event) = conn.poll_event() {
            // After the end only a drop may come, and only for bytes the peer never took.
            let drop = matches!(event, Event::TimedOut | Event::SendTimedOut);
            assert!(
                !self.dropped && (!self.terminal || (drop && conn.queued_bytes() > 0)),
                "event after the terminal one: {event:?}"
            );
            match event {
                Event::Text(b) => {
                    assert!(std::str::from_utf8(&b).is_ok());
                    assert!(b.len() as u64 <= self.config.max_message_size);
                }
                Event::Binary(b) => assert!(b.len() as u64 <= self.config.max_message_size),
                Event::Ping(b) | Event::Pong(b) => assert!(b.len() <= MAX_CONTROL_PAYLOAD),
                Event::Close(frame) => {
                    self.terminal = true;
                    assert!(conn.is_closed());
                    if let Some(f) = &frame {
                        assert!(f.code.is_allowed());
                        assert!(f.reason.len() <= MAX_CONTROL_PAYLOAD - 2);
                    }
                    if before == State::Open {
                        self.expected_close = match frame {
                            Some(f) => ExpectedClose::Code(u16::from(f.code)),
                            None => ExpectedClose::Empty,
                        };
                    }
                }
                Event::ProtocolError(e) => {
                    self.terminal = true;
                    assert!(conn.is_closed());
                    assert!(e.close_code().is_allowed());
                    if let ProtocolError::MessageTooBig(n) = e {
                        assert!(n > self.config.max_message_size);
                    }
                    if before == State::Open {
                        self.expected_close = ExpectedClose::Code(u16::from(e.close_code()));
                    }
                }
                Event::TimedOut | Event::SendTimedOut => {
                    self.terminal = true;
                    self.dropped = true;
                    assert!(conn.is_closed());
                }
            }
        }
    }

    /// Checks the transmit queue's accounting, then "writes" part of it (all if `all`).
    fn transmit(&mut self, conn: &mut Connection, rng: &mut Rng, all: bool) {
        let queued: usize = conn.transmit().map(<[u8]>::len).sum();
        assert_eq!(conn.queued_bytes(), queued);
        assert_eq!(conn.transmit_frames(), conn.transmit().count());
        let n = if all || rng.below(4) == 0 {
            queued
        } else {
            rng.below(queued as u64 + 1) as usize
        };
        let mut left = n;
        for slice in conn.transmit() {
            let take = left.min(slice.len());
            self.written
                .extend_from_slice(slice.get(..take).unwrap_or_default());
            left -= take;
            if left == 0 {
                break;
            }
        }
        conn.advance_transmit(n);
        assert_eq!(conn.queued_bytes(), queued - n);
    }

    /// The server's output is a sequence of whole, unmasked, final frames; a close frame,
    /// if any, is the last one and carries the expected code.
    fn output(&self) {
        let mut rest = &self.written[..];
        let mut close = ExpectedClose::None;
        while !rest.is_empty() {
            assert_eq!(close, ExpectedClose::None, "a frame after our close frame");
            let parsed = FrameHeader::parse(rest, 0);
            assert!(
                matches!(parsed, Ok(Parsed::Complete { .. })),
                "server output is not a frame: {parsed:?}"
            );
            let Ok(Parsed::Complete { header, header_len }) = parsed else {
                return;
            };
            assert!(header.fin && header.mask.is_none());
            let end = usize::try_from(header.payload_len)
                .ok()
                .and_then(|len| len.checked_add(header_len));
            let payload = end.and_then(|end| rest.get(header_len..end));
            assert!(payload.is_some(), "server frame cut short");
            let Some(payload) = payload else { return };
            if header.opcode == OpCode::Close {
                let parsed = parse_close_payload(payload);
                assert!(parsed.is_ok(), "our close payload: {parsed:?}");
                close = match parsed {
                    Ok(Some(f)) => ExpectedClose::Code(u16::from(f.code)),
                    _ => ExpectedClose::Empty,
                };
            }
            rest = rest.get(header_len + payload.len()..).unwrap_or_default();
        }
        assert_eq!(close, self.expected_close);
    }
}

/// Fuzz target `close_payload`: parses `data` as a close frame's payload.
///
/// Invariants: the result agrees with the rules computed independently here (empty: no
/// code; one byte: error; the code must be allowed; the reason must be UTF-8 per `std`);
/// an accepted code is allowed and maps back to the same number; re-encoding with
/// [`encode_close_payload`] and parsing again gives the same frame (the reason cut at a
/// character boundary to 123 bytes when it was longer).
pub fn close_payload(data: &[u8]) {
    let parsed = parse_close_payload(data);
    match data {
        [] => assert_eq!(parsed, Ok(None)),
        [_] => assert_eq!(parsed, Err(ProtocolError::InvalidClosePayload)),
        [hi, lo, reason @ ..] => {
            let raw = u16::from_be_bytes([*hi, *lo]);
            if !CloseCode::from(raw).is_allowed() {
                assert_eq!(parsed, Err(ProtocolError::InvalidCloseCode(raw)));
            } else if std::str::from_utf8(reason).is_err() {
                assert_eq!(parsed, Err(ProtocolError::InvalidUtf8));
            } else {
                assert!(matches!(parsed, Ok(Some(_))), "{parsed:?}");
            }
        }
    }
    let Ok(Some(frame)) = parsed else { return };
    assert!(frame.code.is_allowed());
    let mut out = [0u8; 125];
    let n = encode_close_payload(frame.code, &frame.reason, &mut out);
    assert!((2..=125).contains(&n));
    assert_eq!(out.get(..2), data.get(..2));
    let again = parse_close_payload(out.get(..n).unwrap_or_default());
    if frame.reason.len() <= 123 {
        assert_eq!(again, Ok(Some(frame)));
    } else {
        assert!(matches!(again, Ok(Some(_))), "{again:?}");
        let Ok(Some(again)) = again else { return };
        assert_eq!(again.code, frame.code);
        assert!(frame.reason.starts_with(&again.reason));
        assert!(again.reason.len() <= 123 && again.reason.len() + 4 > 123);
    }
}
