//! The opening handshake (RFC 6455 §4.2): parse an HTTP/1.1 upgrade request incrementally,
//! validate it, and encode the `101 Switching Protocols` answer or an error response.
//!
//! Parsing is `httparse`'s; this module adds the WebSocket rules and the size limits. It
//! owns no socket and reads no clock: the engine feeds it the bytes read so far and applies
//! the handshake deadline itself.

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use sha1::{Digest, Sha1};

use super::error::HandshakeError;

/// The GUID every accept key is derived with (§1.3).
pub const GUID: &str = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11";
/// Default limit on the request header block, in bytes (431 beyond).
pub const DEFAULT_MAX_HEADER_BYTES: usize = 8 * 1024;
/// Default limit on the number of request headers (431 beyond).
pub const DEFAULT_MAX_HEADERS: usize = 64;

/// Limits applied while parsing a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct HandshakeLimits {
    /// Largest header block, request line included.
    pub max_header_bytes: usize,
    /// Most headers.
    pub max_headers: usize,
}

impl Default for HandshakeLimits {
    fn default() -> Self {
        HandshakeLimits {
            max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            max_headers: DEFAULT_MAX_HEADERS,
        }
    }
}

/// A parsed HTTP request (upgrade or not), with the parts a server routes and authorises on.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Request {
    /// The method, e.g. `GET`.
    pub method: String,
    /// The path without the query, e.g. `/pubsub/prices`.
    pub path: String,
    /// The query string without `?`, if any.
    pub query: Option<String>,
    /// HTTP minor version (0 for HTTP/1.0, 1 for HTTP/1.1).
    pub http_minor: u8,
    /// Every header, names as sent.
    pub headers: Vec<(String, Vec<u8>)>,
}

/// What [`parse_request`] found in the bytes read so far.
#[derive(Debug, PartialEq, Eq)]
pub enum ParseStatus {
    /// The header block is not complete yet: read more.
    Partial,
    /// A whole request; `consumed` bytes were its header block. Bytes after it (frames a
    /// client sent right away) belong to the WebSocket stream.
    Complete {
        /// The request.
        request: Request,
        /// Length of the header block.
        consumed: usize,
    },
}

/// Parses the request at the start of `buf` (all bytes read so far).
///
/// # Errors
/// [`HandshakeError::HeadersTooLarge`] once `buf` holds more than the limit without a
/// complete header block, or the request has too many headers;
/// [`HandshakeError::Malformed`] for bytes that are not HTTP/1.x.
pub fn parse_request(buf: &[u8], limits: &HandshakeLimits) -> Result<ParseStatus, HandshakeError> {
    let mut storage = [httparse::EMPTY_HEADER; DEFAULT_MAX_HEADERS];
    let mut heap;
    let headers: &mut [httparse::Header<'_>] = if limits.max_headers <= DEFAULT_MAX_HEADERS {
        storage.get_mut(..limits.max_headers).unwrap_or_default()
    } else {
        heap = vec![httparse::EMPTY_HEADER; limits.max_headers];
        &mut heap
    };
    let mut req = httparse::Request::new(headers);
    let window = buf.get(..limits.max_header_bytes).unwrap_or(buf);
    match req.parse(window) {
        Ok(httparse::Status::Partial) => {
            if buf.len() >= limits.max_header_bytes {
                Err(HandshakeError::HeadersTooLarge)
            } else {
                Ok(ParseStatus::Partial)
            }
        }
        Ok(httparse::Status::Complete(consumed)) => {
            let target = req.path.unwrap_or("/");
            let (path, query) = match target.split_once('?') {
                Some((p, q)) => (p.to_owned(), Some(q.to_owned())),
                None => (target.to_owned(), None),
            };
            let request = Request {
                method: req.method.unwrap_or_default().to_owned(),
                path,
                query,
                http_minor: req.version.unwrap_or(0),
                headers: req
                    .headers
                    .iter()
                    .map(|h| (h.name.to_owned(), h.value.to_vec()))
                    .collect(),
            };
            Ok(ParseStatus::Complete { request, consumed })
        }
        Err(httparse::Error::TooManyHeaders) => Err(HandshakeError::HeadersTooLarge),
        Err(_) => Err(HandshakeError::Malformed),
    }
}

/// Splits a comma-separated header list into trimmed, non-empty tokens.
fn tokens(value: &[u8]) -> impl Iterator<Item = &str> {
    std::str::from_utf8(value)
        .unwrap_or("")
        .split(',')
        .map(str::trim)
        .filter(|t| !t.is_empty())
}

/// A validated upgrade: what the 101 response needs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Upgrade {
    /// The `Sec-WebSocket-Key` as sent (24 base64 characters).
    pub key: String,
    /// Subprotocols the client offered, in its order of preference.
    pub protocols: Vec<String>,
    /// Extensions the client offered (raw list entries, e.g. `permessage-deflate; ...`).
    pub extensions: Vec<String>,
}

impl Request {
    /// The first header named `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_slice())
    }

    /// Every value of the headers named `name`, as UTF-8 (non-UTF-8 values are skipped).
    fn header_strs<'a>(&'a self, name: &'a str) -> impl Iterator<Item = &'a str> {
        self.headers
            .iter()
            .filter(move |(n, _)| n.eq_ignore_ascii_case(name))
            .filter_map(|(_, v)| std::str::from_utf8(v).ok())
    }

    /// Whether any header named `name` lists `token` (case-insensitive).
    fn has_token(&self, name: &str, token: &str) -> bool {
        self.headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case(name))
            .any(|(_, v)| tokens(v).any(|t| t.eq_ignore_ascii_case(token)))
    }

    /// Whether the client asks for an upgrade at all (has an `Upgrade` header). A request
    /// without one is plain HTTP (a status page, say).
    pub fn wants_upgrade(&self) -> bool {
        self.header("upgrade").is_some()
    }

    /// The `Origin` header.
    pub fn origin(&self) -> Option<&str> {
        self.header("origin")
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// The `Host` header.
    pub fn host(&self) -> Option<&str> {
        self.header("host")
            .and_then(|v| std::str::from_utf8(v).ok())
    }

    /// Cookies as `(name, value)` pairs from every `Cookie` header.
    pub fn cookies(&self) -> impl Iterator<Item = (&str, &str)> {
        self.header_strs("cookie")
            .flat_map(|v| v.split(';'))
            .filter_map(|kv| {
                let (k, v) = kv.split_once('=')?;
                Some((k.trim(), v.trim()))
            })
    }

    /// The value of query parameter `name` (no percent-decoding).
    pub fn query_param(&self, name: &str) -> Option<&str> {
        self.query
            .as_deref()?
            .split('&')
            .filter_map(|kv| kv.split_once('=').or(Some((kv, ""))))
            .find(|(k, _)| *k == name)
            .map(|(_, v)| v)
    }

    /// Validates the request as a WebSocket upgrade (§4.2.1), in the order that gives the
    /// most useful answer.
    ///
    /// # Errors
    /// The [`HandshakeError`] for the first rule broken; its [`HandshakeError::status`] is
    /// the HTTP answer.
    pub fn validate_upgrade(&self) -> Result<Upgrade, HandshakeError> {
        if self.method != "GET" {
            return Err(HandshakeError::MethodNotAllowed);
        }
        if self.http_minor < 1 {
            return Err(HandshakeError::HttpVersion);
        }
        if self.host().is_none_or(str::is_empty) {
            return Err(HandshakeError::MissingHost);
        }
        if !self.has_token("upgrade", "websocket") {
            return Err(HandshakeError::MissingUpgrade);
        }
        if !self.has_token("connection", "upgrade") {
            return Err(HandshakeError::MissingConnectionUpgrade);
        }
        let key = self
            .header("sec-websocket-key")
            .and_then(|k| std::str::from_utf8(k).ok())
            .map(str::trim)
            .ok_or(HandshakeError::InvalidKey)?;
        match BASE64.decode(key) {
            Ok(raw) if raw.len() == 16 => {}
            _ => return Err(HandshakeError::InvalidKey),
        }
        match self.header("sec-websocket-version") {
            Some(v) if v.trim_ascii() == b"13" => {}
            _ => return Err(HandshakeError::UnsupportedVersion),
        }
        let protocols = self
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("sec-websocket-protocol"))
            .flat_map(|(_, v)| tokens(v))
            .map(str::to_owned)
            .collect();
        let extensions = self
            .headers
            .iter()
            .filter(|(n, _)| n.eq_ignore_ascii_case("sec-websocket-extensions"))
            .flat_map(|(_, v)| tokens(v))
            .map(str::to_owned)
            .collect();
        Ok(Upgrade {
            key: key.to_owned(),
            protocols,
            extensions,
        })
    }
}

impl Upgrade {
    /// The first of the server's `supported` subprotocols that the client offered (the
    /// server's order of preference wins), or `None`.
    pub fn select_protocol<'s>(&self, supported: &[&'s str]) -> Option<&'s str> {
        supported
            .iter()
            .find(|s| self.protocols.iter().any(|p| p == *s))
            .copied()
    }

    /// Checks a subprotocol the application chose: it must be one the client offered.
    ///
    /// # Errors
    /// [`HandshakeError::SubprotocolNotOffered`] otherwise.
    pub fn check_protocol<'a>(&self, chosen: &'a str) -> Result<&'a str, HandshakeError> {
        if self.protocols.iter().any(|p| p == chosen) {
            Ok(chosen)
        } else {
            Err(HandshakeError::SubprotocolNotOffered)
        }
    }
}

/// `Sec-WebSocket-Accept` for a key: base64(SHA-1(key + GUID)) (§4.2.2).
pub fn accept_key(key: &str) -> String {
    let mut h = Sha1::new();
    h.update(key.as_bytes());
    h.update(GUID.as_bytes());
    BASE64.encode(h.finalize())
}

/// Appends the `101 Switching Protocols` response to `out`. `extra` headers (name, value)
/// follow the required ones.
pub fn encode_accept(out: &mut Vec<u8>, key: &str, protocol: Option<&str>, extra: &[(&str, &str)]) {
    out.extend_from_slice(
        b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Accept: ",
    );
    out.extend_from_slice(accept_key(key).as_bytes());
    out.extend_from_slice(b"\r\n");
    if let Some(p) = protocol {
        push_header(out, "Sec-WebSocket-Protocol", p);
    }
    for (n, v) in extra {
        push_header(out, n, v);
    }
    out.extend_from_slice(b"\r\n");
}

fn push_header(out: &mut Vec<u8>, name: &str, value: &str) {
    // Header injection guard: CR/LF never reach the wire from a caller's value.
    let clean = |s: &str| s.replace(['\r', '\n'], " ");
    out.extend_from_slice(clean(name).as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(clean(value).as_bytes());
    out.extend_from_slice(b"\r\n");
}

/// The reason phrase for the statuses wsring sends.
pub fn reason_phrase(status: u16) -> &'static str {
    match status {
        101 => "Switching Protocols",
        200 => "OK",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        426 => "Upgrade Required",
        429 => "Too Many Requests",
        414 => "URI Too Long",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        503 => "Service Unavailable",
        _ => "Error",
    }
}

/// Appends a complete HTTP/1.1 response that closes the connection
/// (`Connection: close`, `Content-Length`).
pub fn encode_response(
    out: &mut Vec<u8>,
    status: u16,
    content_type: &str,
    body: &[u8],
    extra: &[(&str, &str)],
) {
    out.extend_from_slice(format!("HTTP/1.1 {status} {}\r\n", reason_phrase(status)).as_bytes());
    push_header(out, "Content-Type", content_type);
    push_header(out, "Content-Length", &body.len().to_string());
    push_header(out, "Connection", "close");
    for (n, v) in extra {
        push_header(out, n, v);
    }
    out.extend_from_slice(b"\r\n");
    out.extend_from_slice(body);
}

/// Appends the error response for a refused handshake: the status from
/// [`HandshakeError::status`], a one-line body, and `Sec-WebSocket-Version: 13` on 426.
pub fn encode_error(out: &mut Vec<u8>, err: HandshakeError, extra: &[(&str, &str)]) {
    let (status, body, mut headers) = error_parts(err);
    for (name, value) in extra {
        if !headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)) {
            headers.push((name, value));
        }
    }
    encode_response(out, status, "text/plain", body.as_bytes(), &headers);
}

/// What a refusal with `err` answers: its status, a one-line body, and the headers that
/// status requires: `Sec-WebSocket-Version: 13` and `Upgrade` on 426 (RFC 6455 §4.4),
/// `Allow: GET` on 405 (RFC 9110 §15.5.6). The one place those rules live.
pub fn error_parts(err: HandshakeError) -> (u16, String, Vec<(&'static str, &'static str)>) {
    let status = err.status();
    let headers = match status {
        426 => vec![("Sec-WebSocket-Version", "13"), ("Upgrade", "websocket")],
        405 => vec![("Allow", "GET")],
        _ => Vec::new(),
    };
    (status, format!("{err}\n"), headers)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GOOD: &str = "GET /chat?room=1&token=abc HTTP/1.1\r\nHost: server.example.com\r\nUpgrade: websocket\r\nConnection: keep-alive, Upgrade\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nOrigin: http://example.com\r\nSec-WebSocket-Protocol: chat, superchat\r\nSec-WebSocket-Extensions: permessage-deflate; client_max_window_bits\r\nCookie: a=1; b=two\r\nSec-WebSocket-Version: 13\r\n\r\n";

    fn parse(s: &[u8]) -> Result<ParseStatus, HandshakeError> {
        parse_request(s, &HandshakeLimits::default())
    }

    fn request(s: &str) -> Request {
        match parse(s.as_bytes()) {
            Ok(ParseStatus::Complete { request, .. }) => request,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn rfc_accept_key_example() {
        assert_eq!(
            accept_key("dGhlIHNhbXBsZSBub25jZQ=="),
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
    }

    #[test]
    fn parses_incrementally_and_keeps_trailing_bytes() {
        let mut bytes = GOOD.as_bytes().to_vec();
        bytes.extend_from_slice(&[0x81, 0x80, 1, 2, 3, 4]);
        for cut in 0..GOOD.len() {
            assert_eq!(parse(&bytes[..cut]), Ok(ParseStatus::Partial), "cut {cut}");
        }
        match parse(&bytes) {
            Ok(ParseStatus::Complete { request, consumed }) => {
                assert_eq!(consumed, GOOD.len());
                assert_eq!(&bytes[consumed..], &[0x81, 0x80, 1, 2, 3, 4]);
                assert_eq!(request.path, "/chat");
                assert_eq!(request.query.as_deref(), Some("room=1&token=abc"));
                assert_eq!(request.query_param("token"), Some("abc"));
                assert_eq!(request.origin(), Some("http://example.com"));
                assert_eq!(
                    request.cookies().collect::<Vec<_>>(),
                    vec![("a", "1"), ("b", "two")]
                );
                let up = request.validate_upgrade().unwrap();
                assert_eq!(up.protocols, vec!["chat", "superchat"]);
                assert_eq!(
                    up.extensions,
                    vec!["permessage-deflate; client_max_window_bits"]
                );
                assert_eq!(
                    up.select_protocol(&["superchat", "chat"]),
                    Some("superchat")
                );
                assert_eq!(up.select_protocol(&["mqtt"]), None);
                assert_eq!(up.check_protocol("chat"), Ok("chat"));
                assert_eq!(
                    up.check_protocol("mqtt"),
                    Err(HandshakeError::SubprotocolNotOffered)
                );
            }
            other => panic!("{other:?}"),
        }
    }

    fn with(replace: &str, by: &str) -> Result<Upgrade, HandshakeError> {
        request(&GOOD.replace(replace, by)).validate_upgrade()
    }

    #[test]
    fn every_rule_has_its_answer() {
        assert_eq!(with("GET ", "POST ").unwrap_err().status(), 405);
        assert_eq!(
            with("HTTP/1.1", "HTTP/1.0"),
            Err(HandshakeError::HttpVersion)
        );
        assert_eq!(
            with("Host: server.example.com\r\n", ""),
            Err(HandshakeError::MissingHost)
        );
        assert_eq!(
            with("Upgrade: websocket", "Upgrade: h2c"),
            Err(HandshakeError::MissingUpgrade)
        );
        assert!(with("Upgrade: websocket", "Upgrade: foo, WebSocket").is_ok());
        assert_eq!(
            with("keep-alive, Upgrade", "keep-alive"),
            Err(HandshakeError::MissingConnectionUpgrade)
        );
        assert!(with("keep-alive, Upgrade", "UPGRADE").is_ok());
        assert_eq!(
            with("dGhlIHNhbXBsZSBub25jZQ==", "c2hvcnQ="),
            Err(HandshakeError::InvalidKey)
        );
        assert_eq!(
            with("dGhlIHNhbXBsZSBub25jZQ==", "!!notbase64!!"),
            Err(HandshakeError::InvalidKey)
        );
        assert_eq!(
            with("Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n", ""),
            Err(HandshakeError::InvalidKey)
        );
        let e = with("Version: 13", "Version: 8").unwrap_err();
        assert_eq!(e.status(), 426);
        assert_eq!(
            with("Sec-WebSocket-Version: 13\r\n", ""),
            Err(HandshakeError::UnsupportedVersion)
        );
        assert_eq!(
            parse(b"\x16\x03\x01 not http\r\n\r\n"),
            Err(HandshakeError::Malformed)
        );
    }

    #[test]
    fn oversized_header_blocks_get_431() {
        let big = format!(
            "GET / HTTP/1.1\r\nHost: x\r\nX-Big: {}\r\n",
            "a".repeat(9000)
        );
        assert_eq!(parse(big.as_bytes()), Err(HandshakeError::HeadersTooLarge));
        let mut many = String::from("GET / HTTP/1.1\r\n");
        for i in 0..70 {
            many.push_str(&format!("X-{i}: v\r\n"));
        }
        many.push_str("\r\n");
        assert_eq!(parse(many.as_bytes()), Err(HandshakeError::HeadersTooLarge));
        assert_eq!(HandshakeError::HeadersTooLarge.status(), 431);
    }

    #[test]
    fn responses_are_encoded() {
        let mut out = Vec::new();
        encode_accept(
            &mut out,
            "dGhlIHNhbXBsZSBub25jZQ==",
            Some("chat"),
            &[("X-A", "b\r\nX-Evil: 1")],
        );
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("HTTP/1.1 101 Switching Protocols\r\n"));
        assert!(s.contains("Sec-WebSocket-Accept: s3pPLMBiTxaQ9kYGzzhZRbK+xOo=\r\n"));
        assert!(s.contains("Sec-WebSocket-Protocol: chat\r\n"));
        assert!(!s.contains("\r\nX-Evil"));
        assert!(s.ends_with("\r\n\r\n"));
        let mut out = Vec::new();
        encode_error(&mut out, HandshakeError::UnsupportedVersion, &[]);
        let s = String::from_utf8(out).unwrap();
        assert!(s.starts_with("HTTP/1.1 426 Upgrade Required\r\n"));
        assert!(s.contains("Sec-WebSocket-Version: 13\r\n"));
        let mut out = Vec::new();
        encode_error(&mut out, HandshakeError::HeadersTooLarge, &[]);
        assert!(out.starts_with(b"HTTP/1.1 431 "));
    }
}
