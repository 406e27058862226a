//! permessage-deflate (RFC 7692): the negotiation. Sans-IO like the rest of `proto`.
//!
//! [`negotiate`] reads every offer the client made (`Sec-WebSocket-Extensions`, in its
//! order of preference), refuses a malformed one by skipping it (the extension is
//! declined, not the connection), and answers the first it can accept with exactly one
//! configuration ([`Agreed::response`]).
//!
//! What wsring answers, and why:
//! - `server_no_context_takeover`, always (RFC 7692 §7.1.1.1 lets a server add it): a
//!   broadcast is compressed once for every subscriber, which only works if no subscriber's
//!   stream depends on what was sent before, and an idle connection then keeps no
//!   compressor.
//! - `client_no_context_takeover` by default (§7.1.1.2 lets a server add it unasked): the
//!   client resets its compressor after every message, so the server keeps no inflater (a
//!   32 KiB window) per idle connection. [`Policy::client_no_context_takeover`] `false`
//!   leaves that to the client; a connection whose client keeps its context then keeps an
//!   [`Inflater`] for its life.
//! - `server_max_window_bits`: the offer's value if it has one (at most the server's own
//!   limit), else the server's limit when it is below 15. An offer asking for 8 is declined:
//!   zlib's raw deflate cannot write a 256-byte window (it uses 512 instead), so a client
//!   held to 8 could not read every message.
//! - `client_max_window_bits` is never sent: the server inflates with a 32 KiB window,
//!   which reads any smaller one.
//!
//! The codec ([`inflate`], [`compress`]) keeps one inflater and one compressor per
//! thread, reset for every message (no context takeover either way), so a connection that
//! negotiated deflate holds no codec state while idle. A compressed message that arrives in
//! pieces is inflated piece by piece by an [`Inflater`] of the connection's own, which
//! lives only until the message is complete. The choice of libraries was measured
//! (`benches/deflate.rs`, 1-4 KB JSON): libdeflater compresses (one-shot, 2.97x at level 1
//! at 209 MiB/s, where zlib-rs gives 2.01x at 257 MiB/s and miniz_oxide 2.68x at 140 MiB/s;
//! at level 6 all three give about 3.1x, libdeflater fastest), ending each message with a
//! final block (RFC 7692 §7.2.3.5); flate2 on zlib-rs inflates, as a stream (the size of
//! what comes out is not known in advance: libdeflater cannot), at 474 MiB/s against
//! miniz_oxide's 265, and compresses when a client limited the server's window (libdeflate
//! always uses 32 KiB).

use std::cell::RefCell;

use bytes::Bytes;

/// What the server is willing to do.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Policy {
    /// The largest window the server compresses with (9..=15).
    pub window_bits: u8,
    /// Ask clients to reset their compressor after every message.
    pub client_no_context_takeover: bool,
}

impl Default for Policy {
    fn default() -> Policy {
        Policy {
            window_bits: 15,
            client_no_context_takeover: true,
        }
    }
}

/// One permessage-deflate offer, as parsed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Offer {
    /// `server_no_context_takeover` was offered.
    pub server_no_context_takeover: bool,
    /// `client_no_context_takeover` was offered.
    pub client_no_context_takeover: bool,
    /// `server_max_window_bits=N`.
    pub server_max_window_bits: Option<u8>,
    /// `client_max_window_bits` (with its value, if it had one).
    pub client_max_window_bits: Option<Option<u8>>,
}

/// Why an offer is refused (it is skipped, the connection goes on).
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum BadOffer {
    /// Not permessage-deflate.
    #[error("not permessage-deflate")]
    OtherExtension,
    /// A parameter RFC 7692 does not define.
    #[error("unknown parameter {0:?}")]
    Unknown(String),
    /// A parameter given twice.
    #[error("parameter {0:?} given twice")]
    Duplicate(&'static str),
    /// A parameter with a value it must not have, or without one it must have.
    #[error("parameter {0:?} has a bad value")]
    Value(&'static str),
}

/// The configuration both sides use, once agreed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Agreed {
    /// The server resets its compressor after every message (always, see the module doc).
    pub server_no_context_takeover: bool,
    /// The client resets its compressor after every message: the server keeps no
    /// inflater between messages.
    pub client_no_context_takeover: bool,
    /// The window the server compresses with.
    pub server_window_bits: u8,
    /// Whether the answer names `server_max_window_bits`.
    announce_window: bool,
}

impl Agreed {
    /// The `Sec-WebSocket-Extensions` value of the 101.
    pub fn response(&self) -> String {
        let mut out = String::from("permessage-deflate");
        if self.server_no_context_takeover {
            out.push_str("; server_no_context_takeover");
        }
        if self.client_no_context_takeover {
            out.push_str("; client_no_context_takeover");
        }
        if self.announce_window {
            out.push_str(&format!(
                "; server_max_window_bits={}",
                self.server_window_bits
            ));
        }
        out
    }
}

/// A window-bits value: 8 to 15, digits only, no leading zero (RFC 7692 §7.1.2), as a
/// token or a quoted string.
fn window_bits(value: &str) -> Option<u8> {
    let v = value
        .strip_prefix('"')
        .and_then(|v| v.strip_suffix('"'))
        .unwrap_or(value);
    if v.is_empty() || v.len() > 2 || v.starts_with('0') || !v.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    v.parse::<u8>().ok().filter(|n| (8..=15).contains(n))
}

/// Parses one entry of the extension list (`permessage-deflate; a; b=c`).
///
/// # Errors
/// [`BadOffer`]: another extension, or a malformed permessage-deflate offer.
pub fn parse_offer(entry: &str) -> Result<Offer, BadOffer> {
    let mut parts = entry.split(';').map(str::trim);
    let name = parts.next().unwrap_or("");
    if !name.eq_ignore_ascii_case("permessage-deflate") {
        return Err(BadOffer::OtherExtension);
    }
    let mut offer = Offer::default();
    for param in parts {
        let (key, value) = match param.split_once('=') {
            Some((k, v)) => (k.trim(), Some(v.trim())),
            None => (param, None),
        };
        match key.to_ascii_lowercase().as_str() {
            "server_no_context_takeover" => {
                const P: &str = "server_no_context_takeover";
                if offer.server_no_context_takeover {
                    return Err(BadOffer::Duplicate(P));
                }
                if value.is_some() {
                    return Err(BadOffer::Value(P));
                }
                offer.server_no_context_takeover = true;
            }
            "client_no_context_takeover" => {
                const P: &str = "client_no_context_takeover";
                if offer.client_no_context_takeover {
                    return Err(BadOffer::Duplicate(P));
                }
                if value.is_some() {
                    return Err(BadOffer::Value(P));
                }
                offer.client_no_context_takeover = true;
            }
            "server_max_window_bits" => {
                const P: &str = "server_max_window_bits";
                if offer.server_max_window_bits.is_some() {
                    return Err(BadOffer::Duplicate(P));
                }
                let bits = value.and_then(window_bits).ok_or(BadOffer::Value(P))?;
                offer.server_max_window_bits = Some(bits);
            }
            "client_max_window_bits" => {
                const P: &str = "client_max_window_bits";
                if offer.client_max_window_bits.is_some() {
                    return Err(BadOffer::Duplicate(P));
                }
                let bits = match value {
                    None => None,
                    Some(v) => Some(window_bits(v).ok_or(BadOffer::Value(P))?),
                };
                offer.client_max_window_bits = Some(bits);
            }
            _ => return Err(BadOffer::Unknown(key.to_owned())),
        }
    }
    Ok(offer)
}

/// Accepts `offer` under `policy`, or `None` if the server cannot honour it.
pub fn accept(offer: &Offer, policy: &Policy) -> Option<Agreed> {
    let limit = policy.window_bits.clamp(9, 15);
    let (bits, announce) = match offer.server_max_window_bits {
        // See the module doc: zlib cannot hold itself to a 256-byte window.
        Some(8) => return None,
        Some(n) => (n.min(limit), true),
        None => (limit, limit < 15),
    };
    Some(Agreed {
        server_no_context_takeover: true,
        client_no_context_takeover: policy.client_no_context_takeover
            || offer.client_no_context_takeover,
        server_window_bits: bits,
        announce_window: announce,
    })
}

/// The first of the client's `offers` (entries of `Sec-WebSocket-Extensions`, in its
/// order) that is a well-formed permessage-deflate offer the server can honour.
pub fn negotiate<S: AsRef<str>>(offers: &[S], policy: &Policy) -> Option<Agreed> {
    offers
        .iter()
        .filter_map(|o| parse_offer(o.as_ref()).ok())
        .find_map(|o| accept(&o, policy))
}

/// Process-wide counters of the codec, for `/metrics` (relaxed: a compression costs
/// microseconds, an atomic add nothing in comparison).
#[derive(Debug, Default)]
pub struct Counters {
    /// Messages compressed.
    pub compressions: std::sync::atomic::AtomicU64,
    /// Their bytes before compression.
    pub compressed_in: std::sync::atomic::AtomicU64,
    /// Their bytes after.
    pub compressed_out: std::sync::atomic::AtomicU64,
    /// Messages inflated.
    pub decompressions: std::sync::atomic::AtomicU64,
    /// Their bytes as received.
    pub inflated_in: std::sync::atomic::AtomicU64,
    /// Their bytes once inflated.
    pub inflated_out: std::sync::atomic::AtomicU64,
}

/// The codec's counters.
pub static COUNTERS: Counters = Counters {
    compressions: std::sync::atomic::AtomicU64::new(0),
    compressed_in: std::sync::atomic::AtomicU64::new(0),
    compressed_out: std::sync::atomic::AtomicU64::new(0),
    decompressions: std::sync::atomic::AtomicU64::new(0),
    inflated_in: std::sync::atomic::AtomicU64::new(0),
    inflated_out: std::sync::atomic::AtomicU64::new(0),
};

fn count(a: &std::sync::atomic::AtomicU64, n: usize) {
    a.fetch_add(n as u64, std::sync::atomic::Ordering::Relaxed);
}

/// What a connection that negotiated deflate does with its messages.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Params {
    /// Messages shorter than this are sent uncompressed (not worth the CPU: RFC 7692 lets
    /// the sender choose per message).
    pub threshold: usize,
    /// Compression level, 1 (fastest) to 9.
    pub level: u8,
    /// The window the server compresses with (from the negotiation).
    pub window_bits: u8,
    /// The client keeps its compression context between messages (it agreed no
    /// `client_no_context_takeover`): the connection keeps an [`Inflater`] for its life.
    pub client_context_takeover: bool,
}

/// The per-thread codec: an inflater and the compressors (made on first use).
struct Codec {
    inflater: Option<flate2::Decompress>,
    /// (level, compressor).
    one_shot: Option<(u8, libdeflater::Compressor)>,
    /// (level, window bits, compressor) for a window below 15.
    windowed: Option<(u8, u8, flate2::Compress)>,
    out: Vec<u8>,
}

thread_local! {
    static CODEC: RefCell<Codec> = const {
        RefCell::new(Codec { inflater: None, one_shot: None, windowed: None, out: Vec::new() })
    };
}

/// The 4 bytes RFC 7692 §7.2.2 has the receiver append to a message before inflating it
/// (the empty stored block a sync flush ends with, which the sender removed).
const TAIL: [u8; 4] = [0, 0, 0xff, 0xff];

/// Why a message could not be inflated.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum InflateError {
    /// It inflates to more than the limit (a decompression bomb is stopped here, by
    /// what comes out, not by what went in): close 1009.
    #[error("inflates to more than {0} bytes")]
    TooBig(usize),
    /// Not valid deflate data. RFC 7692 §7.2.2 says only to fail the connection; wsring
    /// does so with 1007 (the payload is not consistent with its message).
    #[error("not valid deflate data")]
    Corrupt,
}

/// Inflates one received message (the frames' payloads, joined) into at most `limit`
/// bytes.
///
/// # Errors
/// [`InflateError`].
pub fn inflate(compressed: &[u8], limit: usize) -> Result<Bytes, InflateError> {
    let out = inflate_inner(compressed, limit)?;
    count(&COUNTERS.decompressions, 1);
    count(&COUNTERS.inflated_in, compressed.len());
    count(&COUNTERS.inflated_out, out.len());
    Ok(out)
}

fn inflate_inner(compressed: &[u8], limit: usize) -> Result<Bytes, InflateError> {
    CODEC.with(|c| {
        let mut c = c.borrow_mut();
        let d = c
            .inflater
            .get_or_insert_with(|| flate2::Decompress::new(false));
        d.reset(false);
        let mut out: Vec<u8> = Vec::with_capacity((compressed.len() * 3).min(limit).max(64));
        if !run_inflate(d, compressed, &mut out, limit, usize::MAX)?.0 {
            run_inflate(d, &TAIL, &mut out, limit, usize::MAX)?;
        }
        Ok(Bytes::from(out))
    })
}

/// Inflates `input` into `out` (grown as needed, never past `limit` bytes), stopping once
/// `out` holds `cap` bytes. Returns whether the stream ended (a final block, RFC 7692
/// §7.2.3.5: what follows it in the message is ignored) and how much of `input` was used.
fn run_inflate(
    d: &mut flate2::Decompress,
    input: &[u8],
    out: &mut Vec<u8>,
    limit: usize,
    cap: usize,
) -> Result<(bool, usize), InflateError> {
    let mut at = 0;
    loop {
        if out.len() >= cap {
            return Ok((false, at));
        }
        if out.len() == out.capacity() {
            if out.len() > limit {
                return Err(InflateError::TooBig(limit));
            }
            let more = out
                .capacity()
                .max(4096)
                .min(limit + 1 - out.len().min(limit))
                .min(cap - out.len());
            out.reserve_exact(more.max(1));
        }
        let before_in = d.total_in();
        let before_out = d.total_out();
        let rest = input.get(at..).unwrap_or_default();
        let status = d
            .decompress_vec(rest, out, flate2::FlushDecompress::Sync)
            .map_err(|_| InflateError::Corrupt)?;
        at += (d.total_in() - before_in) as usize;
        if out.len() > limit {
            return Err(InflateError::TooBig(limit));
        }
        if status == flate2::Status::StreamEnd {
            return Ok((true, input.len()));
        }
        let progressed = d.total_in() != before_in || d.total_out() != before_out;
        if (at >= input.len() || !progressed) && out.len() < out.capacity() {
            return Ok((false, at.min(input.len())));
        }
    }
}

/// What one connection's [`Inflater`] costs beyond its message: zlib-rs's inflate state
/// (about 7 KiB) and its 32 KiB window. Counted in the worker's reassembly budget while it
/// exists, so that peers holding compressed messages open are bounded like any other.
pub const INFLATER_COST: usize = 40 << 10;

/// While a compressed message is incomplete, at most this much of its output is held (or
/// `max_message_size` + 1 when that is smaller, so that a bomb within a first fragment
/// stops there): what comes after stays compressed ([`Inflater::held`]) until the last
/// frame. Without it one read of a hostile first fragment could make a connection hold
/// `max_message_size` (16 MiB by default) before the reassembly budget could pause it.
pub const INFLATE_HOLD: usize = 1 << 20;

/// An inflater owned by one connection, for what the per-thread one-shot [`inflate`]
/// cannot do: a compressed message that arrives in pieces (split over frames or reads) is
/// inflated as each piece comes, into the message being reassembled, so a bomb stops at
/// the limit as soon as it is reached, not when its last frame arrives; and a client that
/// keeps its compression context between messages (client context takeover) needs the
/// window of what it sent before. It exists only while a message is in flight, or for the
/// life of a connection that agreed client context takeover.
pub struct Inflater {
    d: flate2::Decompress,
    /// The current message's stream ended with a final block: the rest is ignored.
    ended: bool,
    /// Compressed bytes taken for the current message.
    taken: usize,
    /// Bytes that came out for the current message.
    given: usize,
    /// Compressed input of the current message not inflated yet: its output reached
    /// [`INFLATE_HOLD`] before the message was complete.
    rest: Vec<u8>,
}

impl std::fmt::Debug for Inflater {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Inflater")
            .field("ended", &self.ended)
            .finish_non_exhaustive()
    }
}

impl Default for Inflater {
    fn default() -> Inflater {
        Inflater::new()
    }
}

impl Inflater {
    /// A fresh inflater (a 32 KiB window, which reads any smaller one).
    pub fn new() -> Inflater {
        Inflater {
            d: flate2::Decompress::new(false),
            ended: false,
            taken: 0,
            given: 0,
            rest: Vec::new(),
        }
    }

    /// Compressed bytes kept for the end of the message (counted in the reassembly budget
    /// by the connection).
    pub fn held(&self) -> usize {
        self.rest.capacity()
    }

    /// Inflates the next piece of the current message, appending to `out` (which must hold
    /// only this message's output), never past `limit` bytes; once `out` holds
    /// [`INFLATE_HOLD`] bytes the rest is kept compressed for [`Inflater::finish`].
    ///
    /// # Errors
    /// [`InflateError`].
    pub fn feed(
        &mut self,
        input: &[u8],
        out: &mut Vec<u8>,
        limit: usize,
    ) -> Result<(), InflateError> {
        if self.ended {
            return Ok(());
        }
        if !self.rest.is_empty() {
            self.rest.extend_from_slice(input);
            return Ok(());
        }
        let cap = if limit <= INFLATE_HOLD {
            limit.saturating_add(1)
        } else {
            INFLATE_HOLD
        };
        let before = out.len();
        let (ended, used) = run_inflate(&mut self.d, input, out, limit, cap)?;
        self.ended = ended;
        if !ended && let Some(left) = input.get(used..).filter(|l| !l.is_empty()) {
            self.rest.extend_from_slice(left);
        }
        self.taken += used;
        self.given += out.len() - before;
        Ok(())
    }

    /// Ends the current message (the sync-flush tail RFC 7692 §7.2.2 has the receiver put
    /// back). With `keep` the window stays for the next message (client context
    /// takeover); without, or after a final block, the next message starts afresh.
    ///
    /// # Errors
    /// [`InflateError`].
    pub fn finish(
        &mut self,
        out: &mut Vec<u8>,
        limit: usize,
        keep: bool,
    ) -> Result<(), InflateError> {
        let rest = std::mem::take(&mut self.rest);
        for (input, is_tail) in [(&rest[..], false), (&TAIL[..], true)] {
            if self.ended {
                break;
            }
            let before = out.len();
            let (ended, _) = run_inflate(&mut self.d, input, out, limit, usize::MAX)?;
            self.ended = ended;
            if !is_tail {
                self.taken += input.len();
            }
            self.given += out.len() - before;
        }
        count(&COUNTERS.decompressions, 1);
        count(&COUNTERS.inflated_in, self.taken);
        count(&COUNTERS.inflated_out, self.given);
        if self.ended || !keep {
            self.d.reset(false);
        }
        self.ended = false;
        self.taken = 0;
        self.given = 0;
        Ok(())
    }
}

/// Compresses one message for sending (no context: every receiver can take the same
/// bytes), as the payload of a frame with RSV1 set.
pub fn compress(payload: &[u8], params: &Params) -> Bytes {
    let out = compress_inner(payload, params);
    count(&COUNTERS.compressions, 1);
    count(&COUNTERS.compressed_in, payload.len());
    count(&COUNTERS.compressed_out, out.len());
    out
}

fn compress_inner(payload: &[u8], params: &Params) -> Bytes {
    CODEC.with(|c| {
        let mut c = c.borrow_mut();
        let c = &mut *c;
        let level = params.level.clamp(1, 9);
        if params.window_bits >= 15 {
            if c.one_shot.as_ref().is_none_or(|(l, _)| *l != level) {
                let lvl = libdeflater::CompressionLvl::new(i32::from(level))
                    .unwrap_or_else(|_| libdeflater::CompressionLvl::fastest());
                c.one_shot = Some((level, libdeflater::Compressor::new(lvl)));
            }
            if let Some((_, z)) = c.one_shot.as_mut() {
                c.out.resize(z.deflate_compress_bound(payload.len()), 0);
                if let Ok(n) = z.deflate_compress(payload, &mut c.out) {
                    return Bytes::copy_from_slice(c.out.get(..n).unwrap_or_default());
                }
            }
        }
        let bits = params.window_bits.clamp(9, 15);
        if c.windowed
            .as_ref()
            .is_none_or(|(l, b, _)| *l != level || *b != bits)
        {
            let z = flate2::Compress::new_with_window_bits(
                flate2::Compression::new(u32::from(level)),
                false,
                bits,
            );
            c.windowed = Some((level, bits, z));
        }
        let Some((_, _, z)) = c.windowed.as_mut() else {
            return Bytes::new();
        };
        z.reset();
        c.out.clear();
        c.out.reserve(payload.len() + 64);
        loop {
            let at = z.total_in() as usize;
            let rest = payload.get(at..).unwrap_or_default();
            let _ = z.compress_vec(rest, &mut c.out, flate2::FlushCompress::Sync);
            if c.out.len() < c.out.capacity() {
                break;
            }
            c.out.reserve(c.out.capacity());
        }
        let n = c.out.len();
        let n = if c.out.ends_with(&TAIL) { n - 4 } else { n };
        Bytes::copy_from_slice(c.out.get(..n).unwrap_or_default())
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn answer(offers: &[&str]) -> Option<String> {
        negotiate(offers, &Policy::default()).map(|a| a.response())
    }

    const BOTH: &str = "permessage-deflate; server_no_context_takeover; client_no_context_takeover";

    #[test]
    fn a_plain_offer_gets_no_context_takeover_both_ways() {
        assert_eq!(answer(&["permessage-deflate"]).as_deref(), Some(BOTH));
        assert_eq!(
            answer(&["permessage-deflate; client_max_window_bits"]).as_deref(),
            Some(BOTH),
            "client_max_window_bits is never answered"
        );
        assert_eq!(
            answer(&["PerMessage-Deflate ; Server_No_Context_Takeover"]).as_deref(),
            Some(BOTH)
        );
    }

    #[test]
    fn every_parameter_parses_with_and_without_values() {
        let o = parse_offer(
            "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
             server_max_window_bits=10; client_max_window_bits=\"12\"",
        )
        .unwrap();
        assert_eq!(
            o,
            Offer {
                server_no_context_takeover: true,
                client_no_context_takeover: true,
                server_max_window_bits: Some(10),
                client_max_window_bits: Some(Some(12)),
            }
        );
        let o = parse_offer("permessage-deflate;client_max_window_bits").unwrap();
        assert_eq!(o.client_max_window_bits, Some(None));
    }

    #[test]
    fn the_server_window_follows_the_offer_and_the_policy() {
        assert_eq!(
            answer(&["permessage-deflate; server_max_window_bits=10"]).as_deref(),
            Some(
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
                 server_max_window_bits=10"
            )
        );
        let small = Policy {
            window_bits: 11,
            client_no_context_takeover: false,
        };
        let a = negotiate(&["permessage-deflate; server_max_window_bits=13"], &small).unwrap();
        assert_eq!(a.server_window_bits, 11);
        assert_eq!(
            a.response(),
            "permessage-deflate; server_no_context_takeover; server_max_window_bits=11"
        );
        let a = negotiate(&["permessage-deflate"], &small).unwrap();
        assert_eq!(a.server_window_bits, 11, "announced when below 15");
        assert!(a.response().ends_with("server_max_window_bits=11"));
        let a = negotiate(&["permessage-deflate; client_no_context_takeover"], &small).unwrap();
        assert!(
            a.client_no_context_takeover,
            "what the client offered itself"
        );
    }

    #[test]
    fn malformed_offers_are_skipped_and_the_next_one_taken() {
        for bad in [
            "permessage-deflate; server_max_window_bits",
            "permessage-deflate; server_max_window_bits=7",
            "permessage-deflate; server_max_window_bits=16",
            "permessage-deflate; server_max_window_bits=010",
            "permessage-deflate; server_max_window_bits=1x",
            "permessage-deflate; client_max_window_bits=0",
            "permessage-deflate; client_max_window_bits=",
            "permessage-deflate; server_no_context_takeover=1",
            "permessage-deflate; client_no_context_takeover; client_no_context_takeover",
            "permessage-deflate; server_max_window_bits=9; server_max_window_bits=9",
            "permessage-deflate; foo",
            "permessage-deflate; foo=bar",
            "x-webkit-deflate-frame",
        ] {
            assert!(parse_offer(bad).is_err(), "{bad}");
            assert_eq!(answer(&[bad]), None, "{bad}");
            assert_eq!(
                answer(&[bad, "permessage-deflate"]).as_deref(),
                Some(BOTH),
                "after {bad}"
            );
        }
    }

    #[test]
    fn a_window_of_8_for_the_server_is_declined() {
        assert_eq!(
            answer(&["permessage-deflate; server_max_window_bits=8"]),
            None
        );
        assert_eq!(
            answer(&[
                "permessage-deflate; server_max_window_bits=8",
                "permessage-deflate; server_max_window_bits=9",
            ])
            .as_deref(),
            Some(
                "permessage-deflate; server_no_context_takeover; client_no_context_takeover; \
                 server_max_window_bits=9"
            )
        );
        // The client's own window may be anything: the server inflates with 15.
        assert_eq!(
            answer(&["permessage-deflate; client_max_window_bits=8"]).as_deref(),
            Some(BOTH)
        );
    }

    #[test]
    fn no_offer_no_extension() {
        assert_eq!(answer(&[]), None);
        assert_eq!(answer(&["permessage-foo"]), None);
    }

    fn params(window_bits: u8) -> Params {
        Params {
            threshold: 0,
            level: 1,
            window_bits,
            client_context_takeover: false,
        }
    }

    #[test]
    fn what_is_compressed_inflates_back_at_every_window() {
        let json: Vec<u8> = (0..200)
            .flat_map(|i| {
                format!(r#"{{"seq":{i},"price":"97000.{i}","side":"buy"}},"#).into_bytes()
            })
            .collect();
        for bits in [9u8, 10, 12, 15] {
            let z = compress(&json, &params(bits));
            assert!(
                z.len() < json.len() / 3,
                "{bits}: {} of {}",
                z.len(),
                json.len()
            );
            assert_eq!(inflate(&z, 1 << 20).as_deref(), Ok(&json[..]), "{bits}");
        }
        assert_eq!(
            inflate(&compress(b"", &params(15)), 10).as_deref(),
            Ok(&b""[..])
        );
    }

    #[test]
    fn a_bomb_stops_at_the_limit_by_output() {
        let zeros = vec![0u8; 16 << 20];
        let z = compress(&zeros, &params(15));
        assert!(
            z.len() < 64 * 1024,
            "16 MiB of zeros compress to {}",
            z.len()
        );
        assert_eq!(inflate(&z, 1 << 20), Err(InflateError::TooBig(1 << 20)));
        assert_eq!(inflate(&z, zeros.len()).map(|b| b.len()), Ok(zeros.len()));
    }

    #[test]
    fn garbage_is_corrupt() {
        assert_eq!(inflate(&[0xff; 32], 1 << 20), Err(InflateError::Corrupt));
    }

    #[test]
    fn a_sync_flushed_message_from_a_browser_inflates() {
        // "Hello" as RFC 7692 §7.2.3.1 shows it.
        let z = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
        assert_eq!(inflate(&z, 100).as_deref(), Ok(&b"Hello"[..]));
        // Two messages in a row with context reset, and a stored block (§7.2.3.3).
        let stored = [
            0x00, 0x05, 0x00, 0xfa, 0xff, 0x48, 0x65, 0x6c, 0x6c, 0x6f, 0x00,
        ];
        assert_eq!(inflate(&stored, 100).as_deref(), Ok(&b"Hello"[..]));
    }

    #[test]
    fn an_inflater_takes_a_message_piece_by_piece_and_keeps_context_when_asked() {
        // RFC 7692 §7.2.3.2: "Hello" twice with context takeover; the second is 5 bytes
        // that refer back to the first.
        let first = [0xf2, 0x48, 0xcd, 0xc9, 0xc9, 0x07, 0x00];
        let second = [0xf2, 0x00, 0x11, 0x00, 0x00];
        let mut z = Inflater::new();
        let mut out = Vec::new();
        for piece in first.chunks(2) {
            z.feed(piece, &mut out, 100).expect("inflates");
        }
        z.finish(&mut out, 100, true).expect("ends");
        assert_eq!(out, b"Hello");
        out.clear();
        z.feed(&second, &mut out, 100).expect("inflates");
        z.finish(&mut out, 100, true).expect("ends");
        assert_eq!(out, b"Hello", "from the kept window");
        // Without keeping, the second cannot be read on its own.
        let mut z = Inflater::new();
        out.clear();
        z.feed(&first, &mut out, 100).expect("inflates");
        z.finish(&mut out, 100, false).expect("ends");
        out.clear();
        let fresh = z
            .feed(&second, &mut out, 100)
            .and_then(|()| z.finish(&mut out, 100, false));
        assert!(fresh.is_err() || out != b"Hello", "{fresh:?} {out:?}");
        // With a limit above INFLATE_HOLD, an unfinished message holds at most that much
        // output; the rest stays compressed and is inflated at the end, whole.
        let big: Vec<u8> = (0..6u32 << 20)
            .map(|i| (i % 251) as u8 ^ (i >> 12) as u8)
            .collect();
        let z_big = compress(&big, &params(15));
        let mut z = Inflater::new();
        let mut out = Vec::new();
        let (a, b) = z_big.split_at(z_big.len() / 2);
        z.feed(a, &mut out, 16 << 20).expect("inflates");
        assert!(out.len() <= INFLATE_HOLD, "held {}", out.len());
        assert!(z.held() > 0, "the rest is kept compressed");
        z.feed(b, &mut out, 16 << 20).expect("kept");
        assert!(out.len() <= INFLATE_HOLD);
        z.finish(&mut out, 16 << 20, false).expect("ends");
        assert_eq!(out, big);
        assert_eq!(z.held(), 0);
        // ... and a bomb past the limit is still refused at the end.
        let mut z = Inflater::new();
        let mut out = Vec::new();
        let bomb = compress(&vec![0u8; 32 << 20], &params(15));
        z.feed(&bomb, &mut out, 16 << 20).expect("held");
        assert!(out.len() <= INFLATE_HOLD);
        assert_eq!(
            z.finish(&mut out, 16 << 20, false),
            Err(InflateError::TooBig(16 << 20))
        );
        // A bomb stops at the limit within its first piece.
        let bomb = compress(&vec![0u8; 4 << 20], &params(15));
        let mut z = Inflater::new();
        let mut out = Vec::new();
        let (head, _) = bomb.split_at(bomb.len() / 2);
        assert_eq!(
            z.feed(head, &mut out, 1 << 16),
            Err(InflateError::TooBig(1 << 16))
        );
        assert!(out.len() <= (1 << 16) + 1, "{}", out.len());
    }
}
