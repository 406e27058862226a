//! The broker payload: a 10-byte header, then the message as published.
//!
//! | byte | meaning |
//! |---|---|
//! | 0 | version, 1 |
//! | 1 | the WebSocket opcode: 1 text, 2 binary |
//! | 2..10 | the origin node's id, little-endian |
//!
//! A publication to a topic with history that the broker numbered (the Redis client's
//! script) has `0x80` added to its opcode byte and, after the header, the epoch and the
//! offset as 16 lower-case hex digits each (ASCII, so the script can write them):
//!
//! | byte | meaning |
//! |---|---|
//! | 1 | `0x81` text, `0x82` binary |
//! | 10..26 | the epoch, hex |
//! | 26..42 | the offset, hex |
//!
//! A reader rejects another version or opcode instead of guessing, so that a later format
//! can be rolled out node by node (a node counts what it cannot read in
//! `BrokerStats::decode_errors`).

use bytes::{BufMut, Bytes, BytesMut};

use super::NodeId;
use crate::proto::OpCode;

/// The format's version byte.
pub const VERSION: u8 = 1;
/// Header length in bytes.
pub const HEADER_LEN: usize = 10;

/// Encodes one message for the broker.
pub fn encode(origin: NodeId, opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::with_capacity(HEADER_LEN + payload.len());
    b.put_u8(VERSION);
    b.put_u8(match opcode {
        OpCode::Binary => 2,
        _ => 1,
    });
    b.put_u64_le(origin);
    b.put_slice(payload);
    b.freeze()
}

/// The opcode byte's flag of a numbered publication.
pub const NUMBERED: u8 = 0x80;
/// Bytes of the epoch and offset after the header of a numbered publication.
pub const NUMBER_LEN: usize = 32;

/// Encodes one message for the broker to number: the header with [`NUMBERED`], then the
/// payload; the broker's script puts the epoch and offset between them.
pub fn encode_for_numbering(origin: NodeId, opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut b = BytesMut::from(&encode(origin, opcode, payload)[..]);
    b[1] |= NUMBERED;
    b.freeze()
}

/// A decoded broker message.
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded {
    /// The node that published it.
    pub origin: NodeId,
    /// Text or binary.
    pub opcode: OpCode,
    /// The message (a slice of the input, no copy).
    pub payload: Bytes,
    /// For a publication the broker numbered: its epoch and offset.
    pub number: Option<(u64, u64)>,
}

/// Why a payload is not ours to read.
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// Shorter than the header.
    #[error("broker payload of {0} bytes is shorter than the header")]
    Short(usize),
    /// Another version of the format.
    #[error("broker payload version {0} is not understood")]
    Version(u8),
    /// Not text or binary.
    #[error("broker payload opcode {0} is not text or binary")]
    OpCode(u8),
    /// A numbered publication without a readable epoch and offset.
    #[error("numbered broker payload without its epoch and offset")]
    Number,
}

/// Decodes a broker message.
///
/// # Errors
/// See [`DecodeError`].
pub fn decode(buf: Bytes) -> Result<Decoded, DecodeError> {
    if buf.len() < HEADER_LEN {
        return Err(DecodeError::Short(buf.len()));
    }
    if buf[0] != VERSION {
        return Err(DecodeError::Version(buf[0]));
    }
    let opcode = match buf[1] & !NUMBERED {
        1 => OpCode::Text,
        2 => OpCode::Binary,
        _ => return Err(DecodeError::OpCode(buf[1])),
    };
    let mut id = [0u8; 8];
    id.copy_from_slice(&buf[2..10]);
    let (number, body) = if buf[1] & NUMBERED != 0 {
        let hex = |r: std::ops::Range<usize>| {
            buf.get(r)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u64::from_str_radix(h, 16).ok())
        };
        match (hex(10..26), hex(26..42)) {
            (Some(epoch), Some(offset)) => (Some((epoch, offset)), HEADER_LEN + NUMBER_LEN),
            _ => return Err(DecodeError::Number),
        }
    } else {
        (None, HEADER_LEN)
    };
    Ok(Decoded {
        origin: u64::from_le_bytes(id),
        opcode,
        payload: buf.slice(body..),
        number,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        let b = encode(0xdead_beef_0102, OpCode::Binary, b"\x00\xffhi");
        assert_eq!(b.len(), HEADER_LEN + 4);
        assert_eq!(b[0], VERSION);
        let d = decode(b).unwrap();
        assert_eq!(d.origin, 0xdead_beef_0102);
        assert_eq!(d.opcode, OpCode::Binary);
        assert_eq!(&d.payload[..], b"\x00\xffhi");
        let t = decode(encode(7, OpCode::Text, b"")).unwrap();
        assert_eq!((t.opcode, t.payload.len()), (OpCode::Text, 0));
    }

    #[test]
    fn numbered_round_trip() {
        let template = encode_for_numbering(5, OpCode::Text, b"hi");
        assert_eq!(template[1], 0x81);
        // What the script publishes: the header, epoch and offset in hex, the payload.
        let mut v = template[..HEADER_LEN].to_vec();
        v.extend_from_slice(format!("{:016x}{:016x}", 0xabcu64, 42u64).as_bytes());
        v.extend_from_slice(&template[HEADER_LEN..]);
        let d = decode(Bytes::from(v.clone())).unwrap();
        assert_eq!(d.number, Some((0xabc, 42)));
        assert_eq!(
            (d.origin, d.opcode, &d.payload[..]),
            (5, OpCode::Text, &b"hi"[..])
        );
        v[12] = b'z';
        assert_eq!(decode(Bytes::from(v)), Err(DecodeError::Number));
        assert_eq!(
            decode(template),
            Err(DecodeError::Number),
            "not numbered yet"
        );
    }

    #[test]
    fn foreign_payloads_are_refused() {
        assert_eq!(
            decode(Bytes::from_static(b"hello")),
            Err(DecodeError::Short(5))
        );
        let mut v = encode(1, OpCode::Text, b"x").to_vec();
        v[0] = 2;
        assert_eq!(decode(Bytes::from(v.clone())), Err(DecodeError::Version(2)));
        v[0] = 1;
        v[1] = 9;
        assert_eq!(decode(Bytes::from(v)), Err(DecodeError::OpCode(9)));
        let t = decode(encode(7, OpCode::Text, b"x")).unwrap();
        assert_eq!(t.number, None);
    }
}
