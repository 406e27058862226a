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
//!   32 KiB window) per idle connection.
//! - `server_max_window_bits`: the offer's value if it has one (at most the server's own
//!   limit), else the server's limit when it is below 15. An offer asking for 8 is declined:
//!   zlib's raw deflate cannot write a 256-byte window (it uses 512 instead), so a client
//!   held to 8 could not read every message.
//! - `client_max_window_bits` is never sent: the server inflates with a 32 KiB window,
//!   which reads any smaller one.

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
}
