//! Frame headers (RFC 6455 §5.2): parse from bytes, encode into bytes. No I/O.
//!
//! ```text
//!  0                   1                   2                   3
//!  0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1 2 3 4 5 6 7 8 9 0 1
//! +-+-+-+-+-------+-+-------------+-------------------------------+
//! |F|R|R|R| opcode|M| Payload len |    Extended payload length    |
//! |I|S|S|S|  (4)  |A|     (7)     |             (16/64)           |
//! |N|V|V|V|       |S|             |   (if payload len==126/127)   |
//! +-+-+-+-+-------+-+-------------+-------------------------------+
//! ```
//!
//! [`FrameHeader::parse`] checks only what the header alone can tell (reserved opcodes,
//! RSV bits, control-frame rules, the 64-bit length's top bit, masking); the rules that need
//! the message context (continuation without a message, size limits) are the
//! [`Connection`](super::Connection)'s.

use bytes::{BufMut, Bytes, BytesMut};

use super::error::ProtocolError;

/// The longest frame header: 2 bytes + 8 (64-bit length) + 4 (mask key).
pub const MAX_HEADER_LEN: usize = 14;
/// The longest header a server writes (it never masks): 2 + 8.
pub const MAX_SERVER_HEADER_LEN: usize = 10;
/// The largest control-frame payload (§5.5).
pub const MAX_CONTROL_PAYLOAD: usize = 125;

/// A frame opcode (§5.2, §11.8). Reserved values are rejected by the parser.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum OpCode {
    /// Continues a fragmented message.
    Continuation = 0x0,
    /// A UTF-8 text message (or its first fragment).
    Text = 0x1,
    /// A binary message (or its first fragment).
    Binary = 0x2,
    /// Close (control).
    Close = 0x8,
    /// Ping (control).
    Ping = 0x9,
    /// Pong (control).
    Pong = 0xA,
}

impl OpCode {
    /// Decodes a 4-bit opcode.
    ///
    /// # Errors
    /// [`ProtocolError::ReservedOpCode`] for 0x3-0x7 and 0xB-0xF.
    pub fn from_u8(v: u8) -> Result<OpCode, ProtocolError> {
        Ok(match v {
            0x0 => OpCode::Continuation,
            0x1 => OpCode::Text,
            0x2 => OpCode::Binary,
            0x8 => OpCode::Close,
            0x9 => OpCode::Ping,
            0xA => OpCode::Pong,
            other => return Err(ProtocolError::ReservedOpCode(other)),
        })
    }

    /// Close, Ping and Pong are control frames.
    #[inline]
    pub fn is_control(self) -> bool {
        (self as u8) & 0x8 != 0
    }
}

/// A decoded frame header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Final fragment of a message.
    pub fin: bool,
    /// RSV1 (used by permessage-deflate; must be 0 here).
    pub rsv1: bool,
    /// RSV2 (must be 0).
    pub rsv2: bool,
    /// RSV3 (must be 0).
    pub rsv3: bool,
    /// The opcode.
    pub opcode: OpCode,
    /// The masking key, present on every client frame.
    pub mask: Option<[u8; 4]>,
    /// The payload length.
    pub payload_len: u64,
}

/// What [`FrameHeader::parse`] found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Parsed {
    /// A whole header of `header_len` bytes.
    Complete {
        /// The header.
        header: FrameHeader,
        /// How many bytes it took (2..=14).
        header_len: usize,
    },
    /// Not enough bytes yet; at least this many in total are needed.
    Incomplete {
        /// The total header length needed to go on (a lower bound).
        needed: usize,
    },
}

impl FrameHeader {
    /// Parses a header from the start of `buf`, checking the rules a header alone can
    /// break. `allowed_rsv` are the RSV bits a negotiated extension permits (bit 2 = RSV1,
    /// bit 1 = RSV2, bit 0 = RSV3); with no extension, 0.
    ///
    /// # Errors
    /// [`ProtocolError`] for a reserved opcode, an RSV bit not allowed, a fragmented or
    /// oversized control frame, or a 64-bit length with its top bit set. Masking is checked
    /// by the caller (a client must mask, a server must not).
    #[inline]
    pub fn parse(buf: &[u8], allowed_rsv: u8) -> Result<Parsed, ProtocolError> {
        let (b0, b1) = match buf {
            [b0, b1, ..] => (*b0, *b1),
            _ => return Ok(Parsed::Incomplete { needed: 2 }),
        };
        let rsv = (b0 >> 4) & 0x7;
        if rsv & !allowed_rsv != 0 {
            return Err(ProtocolError::ReservedBits(rsv));
        }
        let opcode = OpCode::from_u8(b0 & 0x0F)?;
        let fin = b0 & 0x80 != 0;
        let masked = b1 & 0x80 != 0;
        let len7 = b1 & 0x7F;
        if opcode.is_control() {
            if !fin {
                return Err(ProtocolError::FragmentedControlFrame);
            }
            if len7 > 125 {
                return Err(ProtocolError::ControlFrameTooLong);
            }
        }
        let ext = match len7 {
            126 => 2,
            127 => 8,
            _ => 0,
        };
        let header_len = 2 + ext + if masked { 4 } else { 0 };
        let Some(rest) = buf.get(2..header_len) else {
            return Ok(Parsed::Incomplete { needed: header_len });
        };
        let (payload_len, key) = match (ext, rest) {
            (0, key) => (u64::from(len7), key),
            (2, [a, b, key @ ..]) => (u64::from(u16::from_be_bytes([*a, *b])), key),
            (8, [a, b, c, d, e, f, g, h, key @ ..]) => {
                let len = u64::from_be_bytes([*a, *b, *c, *d, *e, *f, *g, *h]);
                if len >> 63 != 0 {
                    return Err(ProtocolError::InvalidLength);
                }
                (len, key)
            }
            _ => return Ok(Parsed::Incomplete { needed: header_len }),
        };
        let mask = match key {
            [a, b, c, d] => Some([*a, *b, *c, *d]),
            _ => None,
        };
        Ok(Parsed::Complete {
            header: FrameHeader {
                fin,
                rsv1: rsv & 0b100 != 0,
                rsv2: rsv & 0b010 != 0,
                rsv3: rsv & 0b001 != 0,
                opcode,
                mask,
                payload_len,
            },
            header_len,
        })
    }

    /// The header's encoded length.
    #[inline]
    pub fn encoded_len(&self) -> usize {
        let ext = match self.payload_len {
            0..=125 => 0,
            126..=0xFFFF => 2,
            _ => 8,
        };
        2 + ext + if self.mask.is_some() { 4 } else { 0 }
    }

    /// Writes the header into `out` (which must hold [`MAX_HEADER_LEN`] bytes) and returns
    /// how many bytes it wrote.
    #[inline]
    pub fn encode(&self, out: &mut [u8; MAX_HEADER_LEN]) -> usize {
        let b0 = (u8::from(self.fin) << 7)
            | (u8::from(self.rsv1) << 6)
            | (u8::from(self.rsv2) << 5)
            | (u8::from(self.rsv3) << 4)
            | self.opcode as u8;
        let mbit = if self.mask.is_some() { 0x80 } else { 0 };
        out[0] = b0;
        let mut n = match self.payload_len {
            len @ 0..=125 => {
                out[1] = mbit | len as u8;
                2
            }
            len @ 126..=0xFFFF => {
                out[1] = mbit | 126;
                out[2..4].copy_from_slice(&(len as u16).to_be_bytes());
                4
            }
            len => {
                out[1] = mbit | 127;
                out[2..10].copy_from_slice(&len.to_be_bytes());
                10
            }
        };
        if let (Some(key), Some(dst)) = (self.mask, out.get_mut(n..n + 4)) {
            dst.copy_from_slice(&key);
            n += 4;
        }
        n
    }
}

/// Length of a whole unmasked (server) frame carrying `payload_len` bytes.
pub fn server_frame_len(payload_len: usize) -> usize {
    FrameHeader::whole(OpCode::Binary, None, payload_len as u64).encoded_len() + payload_len
}

impl FrameHeader {
    /// The header of a whole frame (`fin` set, no reserved bit) of `payload_len` bytes.
    pub fn whole(opcode: OpCode, mask: Option<[u8; 4]>, payload_len: u64) -> FrameHeader {
        FrameHeader {
            fin: true,
            rsv1: false,
            rsv2: false,
            rsv3: false,
            opcode,
            mask,
            payload_len,
        }
    }
}

/// Encodes one whole unmasked server frame (`fin` set) into `out`.
pub fn encode_frame_into(out: &mut BytesMut, opcode: OpCode, payload: &[u8]) {
    let mut h = [0u8; MAX_HEADER_LEN];
    let n = FrameHeader::whole(opcode, None, payload.len() as u64).encode(&mut h);
    out.reserve(n + payload.len());
    out.put_slice(h.get(..n).unwrap_or_default());
    out.put_slice(payload);
}

/// Encodes one whole frame as a client sends it, masked with `key` (for tests, benches
/// and load generators).
pub fn encode_client_frame(opcode: OpCode, payload: &[u8], key: [u8; 4]) -> Vec<u8> {
    let mut h = [0u8; MAX_HEADER_LEN];
    let n = FrameHeader::whole(opcode, Some(key), payload.len() as u64).encode(&mut h);
    let mut out = Vec::with_capacity(n + payload.len());
    out.extend_from_slice(h.get(..n).unwrap_or_default());
    out.extend_from_slice(payload);
    if let Some(body) = out.get_mut(n..) {
        super::mask::unmask(body, key, 0);
    }
    out
}

/// Encodes one whole server frame once into shared bytes: the bytes are identical for every
/// recipient (server frames are not masked), so a broadcast clones this `Bytes` (a reference
/// count) into every subscriber's send queue instead of copying the payload.
///
/// Small frames are carved out of a per-thread block (see [`super::arena`]): no
/// allocation of their own.
pub fn encode_frame(opcode: OpCode, payload: &[u8]) -> Bytes {
    let mut h = [0u8; MAX_HEADER_LEN];
    let n = FrameHeader::whole(opcode, None, payload.len() as u64).encode(&mut h);
    super::arena::copy(&[h.get(..n).unwrap_or_default(), payload])
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_client_frame_parses_back_to_its_payload() {
        let key = [0xA1, 0x5B, 0x07, 0xEE];
        for len in [0usize, 5, 125, 126, 70_000] {
            let payload: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
            let bytes = encode_client_frame(OpCode::Text, &payload, key);
            let Ok(Parsed::Complete { header, header_len }) = FrameHeader::parse(&bytes, 0) else {
                panic!("{len}: not a complete header");
            };
            assert_eq!(
                header,
                FrameHeader::whole(OpCode::Text, Some(key), len as u64)
            );
            let mut body = bytes[header_len..].to_vec();
            crate::proto::mask::unmask(&mut body, key, 0);
            assert_eq!(body, payload, "{len}");
        }
    }

    fn parse_ok(buf: &[u8]) -> (FrameHeader, usize) {
        match FrameHeader::parse(buf, 0) {
            Ok(Parsed::Complete { header, header_len }) => (header, header_len),
            other => panic!("unexpected {other:?}"),
        }
    }

    #[test]
    fn all_three_length_forms_round_trip() {
        for (len, hlen) in [
            (0u64, 2usize),
            (125, 2),
            (126, 4),
            (0xFFFF, 4),
            (0x1_0000, 10),
            (1 << 40, 10),
        ] {
            for mask in [None, Some([9, 8, 7, 6])] {
                let h = FrameHeader {
                    fin: true,
                    rsv1: false,
                    rsv2: false,
                    rsv3: false,
                    opcode: OpCode::Binary,
                    mask,
                    payload_len: len,
                };
                let mut buf = [0u8; MAX_HEADER_LEN];
                let n = h.encode(&mut buf);
                let want = hlen + if mask.is_some() { 4 } else { 0 };
                assert_eq!(n, want);
                assert_eq!(h.encoded_len(), want);
                assert_eq!(parse_ok(&buf[..n]), (h, n));
                // Every proper prefix is incomplete, never an error.
                for cut in 0..n {
                    assert!(matches!(
                        FrameHeader::parse(&buf[..cut], 0),
                        Ok(Parsed::Incomplete { .. })
                    ));
                }
            }
        }
    }

    #[test]
    fn rfc_examples_parse() {
        // §5.7: a single-frame masked text message "Hello".
        let (h, n) = parse_ok(&[0x81, 0x85, 0x37, 0xfa, 0x21, 0x3d]);
        assert_eq!(n, 6);
        assert_eq!(h.opcode, OpCode::Text);
        assert!(h.fin);
        assert_eq!(h.mask, Some([0x37, 0xfa, 0x21, 0x3d]));
        assert_eq!(h.payload_len, 5);
        // A 256-byte binary message in a single unmasked frame.
        let (h, n) = parse_ok(&[0x82, 0x7E, 0x01, 0x00]);
        assert_eq!((n, h.payload_len), (4, 256));
    }

    #[test]
    fn header_rules_are_enforced() {
        assert_eq!(
            FrameHeader::parse(&[0x83, 0x80], 0),
            Err(ProtocolError::ReservedOpCode(3))
        );
        assert_eq!(
            FrameHeader::parse(&[0x8B, 0x80], 0),
            Err(ProtocolError::ReservedOpCode(0xB))
        );
        assert_eq!(
            FrameHeader::parse(&[0xC1, 0x80], 0),
            Err(ProtocolError::ReservedBits(4))
        );
        assert_eq!(
            FrameHeader::parse(&[0x91, 0x80], 0),
            Err(ProtocolError::ReservedBits(1))
        );
        assert!(matches!(
            FrameHeader::parse(&[0xC1, 0x80, 0, 0, 0, 0], 0b100),
            Ok(Parsed::Complete { .. })
        ));
        assert_eq!(
            FrameHeader::parse(&[0x09, 0x80], 0),
            Err(ProtocolError::FragmentedControlFrame)
        );
        assert_eq!(
            FrameHeader::parse(&[0x89, 0xFE, 0, 126], 0),
            Err(ProtocolError::ControlFrameTooLong)
        );
        let mut big = [0x82, 0xFF, 0x80, 0, 0, 0, 0, 0, 0, 0, 1, 2, 3, 4];
        assert_eq!(
            FrameHeader::parse(&big, 0),
            Err(ProtocolError::InvalidLength)
        );
        big[2] = 0x7F;
        assert!(matches!(
            FrameHeader::parse(&big, 0),
            Ok(Parsed::Complete { .. })
        ));
    }

    #[test]
    fn encode_frame_is_unmasked_and_whole() {
        let f = encode_frame(OpCode::Text, b"hi");
        assert_eq!(&f[..], &[0x81, 0x02, b'h', b'i']);
        let f = encode_frame(OpCode::Binary, &[0u8; 300]);
        assert_eq!(&f[..4], &[0x82, 126, 1, 44]);
        assert_eq!(f.len(), 304);
    }
}
