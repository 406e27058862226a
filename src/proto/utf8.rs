//! Streaming UTF-8 validation for text messages (RFC 6455 §8.1), on `simdutf8`.
//!
//! A text message arrives in pieces: fragments, and reads that cut a frame anywhere. The
//! [`Utf8Validator`] checks each piece as it arrives, so a definitely-invalid sequence fails
//! as soon as it is seen (the connection is closed with 1007 before the rest of the message
//! is read), while a code point split between two pieces is carried over (at most 3 bytes).
//! [`Utf8Validator::finish`] fails a message that ends inside a code point.

use simdutf8::compat::from_utf8;

use super::error::ProtocolError;

/// Validates a whole byte string (e.g. a close reason).
///
/// # Errors
/// [`ProtocolError::InvalidUtf8`] if `bytes` is not UTF-8.
pub fn validate_complete(bytes: &[u8]) -> Result<&str, ProtocolError> {
    simdutf8::basic::from_utf8(bytes).map_err(|_| ProtocolError::InvalidUtf8)
}

/// Incremental validator state: the bytes of a code point cut at the end of the last
/// piece. 5 bytes, so it lives inline in the connection.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Utf8Validator {
    partial: [u8; 4],
    len: u8,
}

impl Utf8Validator {
    /// A validator at the start of a message.
    pub const fn new() -> Utf8Validator {
        Utf8Validator {
            partial: [0; 4],
            len: 0,
        }
    }

    /// Checks the next piece of the message.
    ///
    /// # Errors
    /// [`ProtocolError::InvalidUtf8`] as soon as the bytes so far cannot begin any valid
    /// UTF-8 string.
    pub fn feed(&mut self, mut chunk: &[u8]) -> Result<(), ProtocolError> {
        if self.len > 0 {
            // Complete the carried code point one byte at a time (at most 3 steps).
            let have = usize::from(self.len);
            let mut buf = self.partial;
            let mut used = 0;
            loop {
                let Some(&b) = chunk.get(used) else {
                    // The chunk ended inside the code point still: keep carrying it.
                    self.partial = buf;
                    self.len = (have + used) as u8;
                    return Ok(());
                };
                let Some(slot) = buf.get_mut(have + used) else {
                    return Err(ProtocolError::InvalidUtf8);
                };
                *slot = b;
                used += 1;
                let candidate = buf.get(..have + used).unwrap_or_default();
                match from_utf8(candidate) {
                    Ok(_) => break,
                    Err(e) if e.error_len().is_some() => return Err(ProtocolError::InvalidUtf8),
                    Err(_) => {}
                }
            }
            self.len = 0;
            chunk = chunk.get(used..).unwrap_or_default();
        }
        match from_utf8(chunk) {
            Ok(_) => Ok(()),
            Err(e) if e.error_len().is_some() => Err(ProtocolError::InvalidUtf8),
            Err(e) => {
                // An unfinished code point at the end: carry it (1-3 bytes).
                let tail = chunk.get(e.valid_up_to()..).unwrap_or_default();
                match self.partial.get_mut(..tail.len()) {
                    Some(dst) if tail.len() < 4 => {
                        dst.copy_from_slice(tail);
                        self.len = tail.len() as u8;
                        Ok(())
                    }
                    _ => Err(ProtocolError::InvalidUtf8),
                }
            }
        }
    }

    /// Ends the message: fails if it stopped inside a code point. Resets the validator.
    ///
    /// # Errors
    /// [`ProtocolError::InvalidUtf8`] if a code point is unfinished.
    pub fn finish(&mut self) -> Result<(), ProtocolError> {
        let pending = self.len;
        *self = Utf8Validator::new();
        if pending == 0 {
            Ok(())
        } else {
            Err(ProtocolError::InvalidUtf8)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn check_split(bytes: &[u8]) -> Result<(), ProtocolError> {
        // Feed in every two-way and one-byte split; all must agree with std.
        let want = std::str::from_utf8(bytes).is_ok();
        for cut in 0..=bytes.len() {
            let mut v = Utf8Validator::new();
            let r = v
                .feed(&bytes[..cut])
                .and_then(|_| v.feed(&bytes[cut..]))
                .and_then(|_| v.finish());
            assert_eq!(r.is_ok(), want, "cut {cut} of {bytes:?}");
        }
        let mut v = Utf8Validator::new();
        let mut r = Ok(());
        for b in bytes {
            r = r.and_then(|_| v.feed(std::slice::from_ref(b)));
        }
        let r = r.and_then(|_| v.finish());
        assert_eq!(r.is_ok(), want, "bytewise {bytes:?}");
        r
    }

    #[test]
    fn split_code_points_are_fine() {
        assert!(check_split("κόσμε".as_bytes()).is_ok());
        assert!(check_split("a€𝄞z".as_bytes()).is_ok());
        assert!(check_split(b"").is_ok());
    }

    #[test]
    fn invalid_sequences_fail() {
        for bad in [
            &b"\xff"[..],
            b"\xc0\xaf",
            b"\xed\xa0\x80",     // surrogate
            b"\xf4\x90\x80\x80", // above U+10FFFF
            b"\xce\xba\xe1\xbd", // truncated at the end
            b"a\x80b",
        ] {
            assert!(check_split(bad).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn fails_fast_before_the_message_ends() {
        // Autobahn 6.4.x: the invalid byte is in the first piece; the rest never matters.
        let mut v = Utf8Validator::new();
        assert!(v.feed("κόσμε".as_bytes()).is_ok());
        assert_eq!(
            v.feed(b"\xce\xba\xe1\xbd\xb9\xcf\x83\xce\xbc\xce\xb5\xf4\x90"),
            Err(ProtocolError::InvalidUtf8)
        );
        // A prefix that is merely incomplete is not an error until the end.
        let mut v = Utf8Validator::new();
        assert!(v.feed(b"\xf0\x9d").is_ok());
        assert_eq!(v.finish(), Err(ProtocolError::InvalidUtf8));
    }

    #[test]
    fn every_short_sequence_agrees_with_std() {
        // All 1- and 2-byte strings and a sample of 3- and 4-byte ones, every split.
        for a in 0..=255u8 {
            let _ = check_split(&[a]);
            for b in 0..=255u8 {
                let _ = check_split(&[a, b]);
            }
        }
        for a in [0xE0u8, 0xED, 0xEF, 0xF0, 0xF4, 0xF5] {
            for b in 0x70..=0xC0u8 {
                for c in [0x7F, 0x80, 0xBF, 0xC0] {
                    let _ = check_split(&[a, b, c]);
                    let _ = check_split(&[a, b, c, 0x80]);
                    let _ = check_split(&[a, b, c, 0x41]);
                }
            }
        }
    }
}
