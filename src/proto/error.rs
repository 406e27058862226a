//! Errors of the protocol core, and the one place each maps to the wire: a
//! [`ProtocolError`] to a close code ([`ProtocolError::close_code`]), a [`HandshakeError`]
//! to an HTTP status ([`HandshakeError::status`]).

use super::close::CloseCode;

/// A rule of RFC 6455 the peer broke after the upgrade. Each variant is one rule.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum ProtocolError {
    /// §5.1: a client frame must be masked.
    #[error("client frame is not masked")]
    UnmaskedFrame,
    /// §5.2: RSV bits set without a negotiated extension that defines them.
    #[error("reserved bits {0:#05b} set without an extension")]
    ReservedBits(u8),
    /// §5.2: opcodes 0x3-0x7 and 0xB-0xF are reserved.
    #[error("reserved opcode {0:#x}")]
    ReservedOpCode(u8),
    /// §5.5: control frames must not be fragmented.
    #[error("fragmented control frame")]
    FragmentedControlFrame,
    /// §5.5: control frame payloads are at most 125 bytes.
    #[error("control frame payload over 125 bytes")]
    ControlFrameTooLong,
    /// §5.2: the most significant bit of a 64-bit length must be 0.
    #[error("64-bit payload length with the top bit set")]
    InvalidLength,
    /// §5.4: a continuation frame arrived with no message open.
    #[error("continuation frame without a message in progress")]
    UnexpectedContinuation,
    /// §5.4: a new text/binary frame arrived inside a fragmented message.
    #[error("new data frame inside a fragmented message")]
    ExpectedContinuation,
    /// §5.5.1: a close payload of exactly one byte.
    #[error("close payload of 1 byte")]
    InvalidClosePayload,
    /// §7.4: a close code a peer may not send.
    #[error("close code {0} may not be sent by a peer")]
    InvalidCloseCode(u16),
    /// §8.1: a text message (or close reason) that is not UTF-8.
    #[error("invalid UTF-8 in a text message or close reason")]
    InvalidUtf8,
    /// RFC 7692: a compressed message that is not valid deflate data (close 1007).
    #[error("a compressed message is not valid deflate data")]
    BadDeflate,
    /// A frame or message above the configured limit.
    #[error("message of {0} bytes exceeds the limit")]
    MessageTooBig(u64),
    /// A frame or message that had begun was not complete within the message timeout
    /// (a slow-drip sender holding reassembly memory): a policy violation.
    #[error("message not complete within the message timeout")]
    MessageTimeout,
}

impl ProtocolError {
    /// The close code this error is answered with. The one mapping from error to wire.
    pub fn close_code(self) -> CloseCode {
        match self {
            ProtocolError::InvalidUtf8 | ProtocolError::BadDeflate => CloseCode::Invalid,
            ProtocolError::MessageTooBig(_) => CloseCode::Size,
            ProtocolError::MessageTimeout => CloseCode::Policy,
            ProtocolError::UnmaskedFrame
            | ProtocolError::ReservedBits(_)
            | ProtocolError::ReservedOpCode(_)
            | ProtocolError::FragmentedControlFrame
            | ProtocolError::ControlFrameTooLong
            | ProtocolError::InvalidLength
            | ProtocolError::UnexpectedContinuation
            | ProtocolError::ExpectedContinuation
            | ProtocolError::InvalidClosePayload
            | ProtocolError::InvalidCloseCode(_) => CloseCode::Protocol,
        }
    }
}

/// Why an upgrade request is refused. Each maps to one HTTP status.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
#[non_exhaustive]
pub enum HandshakeError {
    /// The bytes are not a valid HTTP/1.x request.
    #[error("malformed HTTP request")]
    Malformed,
    /// Only GET can upgrade (RFC 6455 §4.1).
    #[error("method is not GET")]
    MethodNotAllowed,
    /// HTTP/1.0 cannot upgrade.
    #[error("HTTP version below 1.1")]
    HttpVersion,
    /// No Host header.
    #[error("missing Host header")]
    MissingHost,
    /// `Upgrade` lacks the `websocket` token.
    #[error("Upgrade header lacks the websocket token")]
    MissingUpgrade,
    /// `Connection` lacks the `upgrade` token.
    #[error("Connection header lacks the upgrade token")]
    MissingConnectionUpgrade,
    /// `Sec-WebSocket-Key` missing or not 16 bytes in base64.
    #[error("Sec-WebSocket-Key missing or not 16 bytes of base64")]
    InvalidKey,
    /// `Sec-WebSocket-Version` missing or not 13.
    #[error("Sec-WebSocket-Version missing or not 13")]
    UnsupportedVersion,
    /// The header block is larger than the limit, or has too many headers.
    #[error("request header block too large")]
    HeadersTooLarge,
    /// The Origin is not allowed, or the application refused the request.
    #[error("forbidden")]
    Forbidden,
    /// The path is not served.
    #[error("not found")]
    NotFound,
    /// The server is at its connection cap.
    #[error("server at capacity")]
    Full,
    /// A plain HTTP request (no upgrade) to a path that only upgrades.
    #[error("this path only upgrades to WebSocket")]
    UpgradeRequired,
    /// The application chose a subprotocol the client did not offer.
    #[error("subprotocol not offered by the client")]
    SubprotocolNotOffered,
}

impl HandshakeError {
    /// The HTTP status this error is answered with. The one mapping from error to wire.
    pub fn status(self) -> u16 {
        match self {
            HandshakeError::Malformed
            | HandshakeError::HttpVersion
            | HandshakeError::MissingHost
            | HandshakeError::MissingUpgrade
            | HandshakeError::MissingConnectionUpgrade
            | HandshakeError::InvalidKey => 400,
            HandshakeError::Forbidden => 403,
            HandshakeError::NotFound => 404,
            HandshakeError::MethodNotAllowed => 405,
            HandshakeError::UnsupportedVersion | HandshakeError::UpgradeRequired => 426,
            HandshakeError::HeadersTooLarge => 431,
            HandshakeError::SubprotocolNotOffered => 500,
            HandshakeError::Full => 503,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mapping_to_the_wire() {
        assert_eq!(ProtocolError::InvalidUtf8.close_code(), CloseCode::Invalid);
        assert_eq!(
            ProtocolError::MessageTooBig(1).close_code(),
            CloseCode::Size
        );
        assert_eq!(
            ProtocolError::UnmaskedFrame.close_code(),
            CloseCode::Protocol
        );
        assert_eq!(HandshakeError::MethodNotAllowed.status(), 405);
        assert_eq!(HandshakeError::UnsupportedVersion.status(), 426);
        assert_eq!(HandshakeError::HeadersTooLarge.status(), 431);
        assert_eq!(HandshakeError::Full.status(), 503);
        assert_eq!(HandshakeError::InvalidKey.status(), 400);
    }
}
