//! Close codes and close payloads (RFC 6455 §5.5.1, §7.4).

use super::error::ProtocolError;
use super::utf8;

/// A close status code, sorted into the RFC's classes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum CloseCode {
    /// 1000: normal closure.
    Normal,
    /// 1001: going away (server shutdown, browser leaving the page).
    Away,
    /// 1002: protocol error.
    Protocol,
    /// 1003: a data type the endpoint cannot accept.
    Unsupported,
    /// 1005: no status code was present (never sent on the wire).
    Status,
    /// 1006: closed abnormally, without a close frame (never sent on the wire).
    Abnormal,
    /// 1007: a message's data did not match its type (invalid UTF-8 in text).
    Invalid,
    /// 1008: a policy was violated.
    Policy,
    /// 1009: a message was too big to process.
    Size,
    /// 1010: the client expected an extension the server did not negotiate.
    Extension,
    /// 1011: the server hit an unexpected condition.
    Error,
    /// 1012: the service is restarting.
    Restart,
    /// 1013: try again later (used for overload / backpressure).
    Again,
    /// 1014: bad gateway.
    BadGateway,
    /// 1015: TLS handshake failure (never sent on the wire).
    Tls,
    /// 1004, 1016-2999: reserved by the RFC, never valid on the wire.
    Reserved(u16),
    /// 3000-3999: registered with IANA (libraries, frameworks).
    Iana(u16),
    /// 4000-4999: private use by applications.
    Library(u16),
    /// Below 1000 or above 4999: never valid.
    Bad(u16),
}

impl CloseCode {
    /// Whether a peer may send this code in a close frame (§7.4.1, §7.4.2): 1000-1003,
    /// 1007-1014 and 3000-4999.
    pub fn is_allowed(self) -> bool {
        !matches!(
            self,
            CloseCode::Status
                | CloseCode::Abnormal
                | CloseCode::Tls
                | CloseCode::Reserved(_)
                | CloseCode::Bad(_)
        )
    }
}

impl From<u16> for CloseCode {
    fn from(code: u16) -> CloseCode {
        match code {
            1000 => CloseCode::Normal,
            1001 => CloseCode::Away,
            1002 => CloseCode::Protocol,
            1003 => CloseCode::Unsupported,
            1005 => CloseCode::Status,
            1006 => CloseCode::Abnormal,
            1007 => CloseCode::Invalid,
            1008 => CloseCode::Policy,
            1009 => CloseCode::Size,
            1010 => CloseCode::Extension,
            1011 => CloseCode::Error,
            1012 => CloseCode::Restart,
            1013 => CloseCode::Again,
            1014 => CloseCode::BadGateway,
            1015 => CloseCode::Tls,
            1004 | 1016..=2999 => CloseCode::Reserved(code),
            3000..=3999 => CloseCode::Iana(code),
            4000..=4999 => CloseCode::Library(code),
            _ => CloseCode::Bad(code),
        }
    }
}

impl From<CloseCode> for u16 {
    fn from(code: CloseCode) -> u16 {
        match code {
            CloseCode::Normal => 1000,
            CloseCode::Away => 1001,
            CloseCode::Protocol => 1002,
            CloseCode::Unsupported => 1003,
            CloseCode::Status => 1005,
            CloseCode::Abnormal => 1006,
            CloseCode::Invalid => 1007,
            CloseCode::Policy => 1008,
            CloseCode::Size => 1009,
            CloseCode::Extension => 1010,
            CloseCode::Error => 1011,
            CloseCode::Restart => 1012,
            CloseCode::Again => 1013,
            CloseCode::BadGateway => 1014,
            CloseCode::Tls => 1015,
            CloseCode::Reserved(c)
            | CloseCode::Iana(c)
            | CloseCode::Library(c)
            | CloseCode::Bad(c) => c,
        }
    }
}

/// A decoded close frame payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct CloseFrame {
    /// The status code.
    pub code: CloseCode,
    /// The UTF-8 reason (at most 123 bytes).
    pub reason: String,
}

/// Parses a close frame's payload (already unmasked): empty (no code), or a 2-byte
/// allowed code followed by a valid UTF-8 reason.
///
/// # Errors
/// [`ProtocolError::InvalidClosePayload`] for a 1-byte payload,
/// [`ProtocolError::InvalidCloseCode`] for a code a peer may not send, and
/// [`ProtocolError::InvalidUtf8`] for a reason that is not UTF-8.
pub fn parse_close_payload(payload: &[u8]) -> Result<Option<CloseFrame>, ProtocolError> {
    match payload {
        [] => Ok(None),
        [_] => Err(ProtocolError::InvalidClosePayload),
        [hi, lo, reason @ ..] => {
            let raw = u16::from_be_bytes([*hi, *lo]);
            let code = CloseCode::from(raw);
            if !code.is_allowed() {
                return Err(ProtocolError::InvalidCloseCode(raw));
            }
            let reason = utf8::validate_complete(reason)?;
            Ok(Some(CloseFrame {
                code,
                reason: reason.to_owned(),
            }))
        }
    }
}

/// Writes a close payload (code + reason, the reason cut at a character boundary to fit the
/// 125-byte control-frame limit) into `out` and returns its length. 1005, 1006 and 1015 are
/// never sent: they are replaced by an empty payload (length 0).
pub fn encode_close_payload(code: CloseCode, reason: &str, out: &mut [u8; 125]) -> usize {
    if matches!(
        code,
        CloseCode::Status | CloseCode::Abnormal | CloseCode::Tls
    ) {
        return 0;
    }
    let mut end = reason.len().min(123);
    while !reason.is_char_boundary(end) {
        end -= 1;
    }
    let reason = reason.as_bytes().get(..end).unwrap_or_default();
    let [hi, lo] = u16::from(code).to_be_bytes();
    let (head, tail) = out.split_at_mut(2);
    head.copy_from_slice(&[hi, lo]);
    if let Some(dst) = tail.get_mut(..reason.len()) {
        dst.copy_from_slice(reason);
    }
    2 + reason.len()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn allowed_codes_match_the_rfc() {
        for code in 0u16..=u16::MAX {
            let allowed = matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999);
            assert_eq!(CloseCode::from(code).is_allowed(), allowed, "code {code}");
            assert_eq!(u16::from(CloseCode::from(code)), code);
        }
    }

    #[test]
    fn close_payloads() {
        assert_eq!(parse_close_payload(&[]), Ok(None));
        assert_eq!(
            parse_close_payload(&[0x03]),
            Err(ProtocolError::InvalidClosePayload)
        );
        assert_eq!(
            parse_close_payload(&[0x03, 0xE8, b'o', b'k']),
            Ok(Some(CloseFrame {
                code: CloseCode::Normal,
                reason: "ok".into()
            }))
        );
        assert_eq!(
            parse_close_payload(&[0x03, 0xED]),
            Err(ProtocolError::InvalidCloseCode(1005))
        );
        assert_eq!(
            parse_close_payload(&[0x03, 0xE8, 0xFF]),
            Err(ProtocolError::InvalidUtf8)
        );
        assert_eq!(
            parse_close_payload(&[0x0F, 0xA0]).map(|f| f.map(|f| f.code)),
            Ok(Some(CloseCode::Library(4000)))
        );
    }

    #[test]
    fn encoding_never_sends_reserved_codes_and_fits() {
        let mut out = [0u8; 125];
        assert_eq!(encode_close_payload(CloseCode::Abnormal, "x", &mut out), 0);
        assert_eq!(encode_close_payload(CloseCode::Status, "", &mut out), 0);
        assert_eq!(encode_close_payload(CloseCode::Tls, "", &mut out), 0);
        let long = "é".repeat(100);
        let n = encode_close_payload(CloseCode::Away, &long, &mut out);
        assert!(n <= 125);
        assert_eq!(&out[..2], &[0x03, 0xE9]);
        assert!(std::str::from_utf8(&out[2..n]).is_ok());
    }
}
