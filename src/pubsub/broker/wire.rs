//! The broker payload: a 10-byte header, then the message as published.
//!
//! | byte | meaning |
//! |---|---|
//! | 0 | version, 1 |
//! | 1 | the WebSocket opcode: 1 text, 2 binary |
//! | 2..10 | the origin node's id, little-endian |
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

/// A decoded broker message.
#[derive(Debug, PartialEq, Eq)]
pub struct Decoded {
    /// The node that published it.
    pub origin: NodeId,
    /// Text or binary.
    pub opcode: OpCode,
    /// The message (a slice of the input, no copy).
    pub payload: Bytes,
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
    let opcode = match buf[1] {
        1 => OpCode::Text,
        2 => OpCode::Binary,
        x => return Err(DecodeError::OpCode(x)),
    };
    let mut id = [0u8; 8];
    id.copy_from_slice(&buf[2..10]);
    Ok(Decoded {
        origin: u64::from_le_bytes(id),
        opcode,
        payload: buf.slice(HEADER_LEN..),
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
    }
}
