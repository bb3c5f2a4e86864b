//! Request-head parsing: `httparse` for the grammar, then Echo's own strict checks for
//! what httparse leaves to its caller (RFC 9112 §2.2, §3, §5, §6): bare CR/LF, obs-fold,
//! control characters in values, Host, request-target forms, and message framing.
//!
//! Invariants: a head is either accepted whole or refused with the status the client
//! gets; a refused head always closes the connection (the framing of what follows it is
//! unknown). Limits are checked before anything is allocated for the request.

use std::fmt;
use std::net::SocketAddr;

use super::{BodyFraming, Headers, Request, Version};
// `server.max_headers` is capped here, so the parser's slots live on the stack.
use crate::config::MAX_HEADERS_CAP;

/// Why a request was refused: the status sent and a reason in Echo's own words.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct HttpError {
    pub status: u16,
    pub reason: &'static str,
}

impl HttpError {
    pub const fn new(status: u16, reason: &'static str) -> HttpError {
        HttpError { status, reason }
    }
}

impl fmt::Display for HttpError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{} {}", self.status, self.reason)
    }
}

/// Size limits applied while parsing.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_target_bytes: usize,
    pub max_body_bytes: u64,
}

/// The outcome of one parse attempt over the bytes received so far.
#[derive(Debug)]
pub enum Parsed {
    /// A whole head: the request and how many bytes it took.
    Complete(Request, usize),
    /// More bytes are needed.
    Partial,
}

/// Parses a request head from `buf`.
pub fn parse_head(buf: &[u8], limits: &Limits, peer: SocketAddr) -> Result<Parsed, HttpError> {
    let mut slots = [httparse::EMPTY_HEADER; MAX_HEADERS_CAP];
    let mut req = httparse::Request::new(&mut slots[..limits.max_headers.min(MAX_HEADERS_CAP)]);
    let status = match req.parse(buf) {
        Ok(s) => s,
        Err(httparse::Error::TooManyHeaders) => {
            return Err(HttpError::new(431, "too many header fields"))
        }
        Err(httparse::Error::Version) => {
            return Err(HttpError::new(
                505,
                "only HTTP/1.0 and HTTP/1.1 are supported",
            ))
        }
        Err(httparse::Error::Token) | Err(httparse::Error::HeaderName) => {
            return Err(HttpError::new(400, "malformed header field name"))
        }
        Err(httparse::Error::HeaderValue) => {
            return Err(HttpError::new(400, "malformed header field value"))
        }
        Err(_) => return Err(HttpError::new(400, "malformed request line or header")),
    };
    let len = match status {
        httparse::Status::Complete(len) => len,
        httparse::Status::Partial => return partial(buf, limits),
    };
    if len > limits.max_header_bytes {
        return Err(HttpError::new(431, "request header section too large"));
    }
    check_line_endings(&buf[..len])?;

    let method = req.method.unwrap_or_default();
    let raw_target = req.path.unwrap_or_default();
    if raw_target.len() > limits.max_target_bytes {
        return Err(HttpError::new(414, "request-target too long"));
    }
    let version = match req.version {
        Some(0) => Version::Http10,
        Some(1) => Version::Http11,
        _ => {
            return Err(HttpError::new(
                505,
                "only HTTP/1.0 and HTTP/1.1 are supported",
            ))
        }
    };

    let mut headers: Headers = Vec::with_capacity(req.headers.len());
    for h in req.headers.iter() {
        // RFC 9110 §5.5: field values are VCHAR, SP, HTAB and obs-text; CR, LF, NUL and
        // other controls are refused rather than replaced.
        if h.value
            .iter()
            .any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f)
        {
            return Err(HttpError::new(
                400,
                "control character in a header field value",
            ));
        }
        headers.push((h.name.to_ascii_lowercase(), h.value.trim_ascii().to_vec()));
    }

    if method == "CONNECT" {
        return Err(HttpError::new(501, "CONNECT is not supported"));
    }
    let (target, target_host) = split_target(method, raw_target)?;

    // RFC 9112 §3.2: "A server MUST respond with a 400 (Bad Request) status code to any
    // HTTP/1.1 request message that lacks a Host header field and to any request message
    // that contains more than one Host header field line or a Host header field with an
    // invalid field value."
    let mut hosts = headers.iter().filter(|(n, _)| n == "host");
    let host_field = hosts.next().map(|(_, v)| v.as_slice());
    if hosts.next().is_some() {
        return Err(HttpError::new(400, "more than one Host header field"));
    }
    let host = match (target_host, host_field) {
        // RFC 9112 §3.2.2: with an absolute-form target, the Host field is ignored.
        (Some(h), _) => h,
        (None, Some(h)) => normalize_host(h)?,
        (None, None) if version == Version::Http10 => String::new(),
        (None, None) => return Err(HttpError::new(400, "missing Host header field")),
    };

    let framing = framing(&headers, version, limits)?;

    let expect_continue = match super::headers::header(&headers, "expect") {
        None => false,
        Some(v) if v.eq_ignore_ascii_case(b"100-continue") => version == Version::Http11,
        Some(_) => return Err(HttpError::new(417, "unsupported Expect value")),
    };

    let keep_alive = match version {
        Version::Http11 => !super::headers::has_token(&headers, "connection", "close"),
        Version::Http10 => super::headers::has_token(&headers, "connection", "keep-alive"),
    };

    Ok(Parsed::Complete(
        Request {
            method: method.to_string(),
            target,
            version,
            headers,
            host,
            framing,
            expect_continue,
            keep_alive,
            peer,
            received: std::time::Instant::now(),
        },
        len,
    ))
}

/// A head that is not complete yet: is it already over a limit?
fn partial(buf: &[u8], limits: &Limits) -> Result<Parsed, HttpError> {
    let line_end = buf.iter().position(|&b| b == b'\n');
    // A request line that is over the target limit is a 414 whether or not it has ended.
    let line_len = line_end.unwrap_or(buf.len());
    if line_len > limits.max_target_bytes + 32 {
        return Err(HttpError::new(414, "request-target too long"));
    }
    if buf.len() >= limits.max_header_bytes {
        return Err(HttpError::new(431, "request header section too large"));
    }
    Ok(Parsed::Partial)
}

/// RFC 9112 §2.2: a bare CR is invalid, and Echo does not accept bare LF as a line
/// terminator (the spec allows refusing it, and lenient parsing is a smuggling vector).
/// RFC 9112 §5.2: obs-fold is refused with 400.
fn check_line_endings(head: &[u8]) -> Result<(), HttpError> {
    for (i, &b) in head.iter().enumerate() {
        match b {
            b'\n' if i == 0 || head[i - 1] != b'\r' => {
                return Err(HttpError::new(400, "bare LF in request head"))
            }
            b'\r' if head.get(i + 1) != Some(&b'\n') => {
                return Err(HttpError::new(400, "bare CR in request head"))
            }
            b'\n' => {
                if matches!(head.get(i + 1), Some(b' ') | Some(b'\t')) {
                    return Err(HttpError::new(400, "obsolete line folding in request head"));
                }
            }
            _ => {}
        }
    }
    Ok(())
}

/// Splits the request-target into its origin-form path and, for absolute-form, the
/// authority (RFC 9112 §3.2).
fn split_target(method: &str, raw: &str) -> Result<(String, Option<String>), HttpError> {
    if raw.starts_with('/') {
        return Ok((raw.to_string(), None));
    }
    if raw == "*" {
        if method == "OPTIONS" {
            return Ok((raw.to_string(), None));
        }
        return Err(HttpError::new(400, "asterisk-form is only for OPTIONS"));
    }
    let lower = raw
        .get(..8)
        .map(|s| s.to_ascii_lowercase())
        .unwrap_or_default();
    let rest = if lower.starts_with("http://") {
        &raw[7..]
    } else if lower.starts_with("https://") {
        &raw[8..]
    } else {
        return Err(HttpError::new(400, "malformed request-target"));
    };
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, ""),
    };
    let path = if path.is_empty() {
        "/".to_string()
    } else if path.starts_with('?') {
        format!("/{path}")
    } else {
        path.to_string()
    };
    Ok((path, Some(normalize_host(authority.as_bytes())?)))
}

/// Validates a Host value (`uri-host [ ":" port ]`) and returns it lower-cased with a
/// default `:80` removed, so `Example.com:80` and `example.com` share cache entries.
fn normalize_host(raw: &[u8]) -> Result<String, HttpError> {
    const BAD: HttpError = HttpError::new(400, "invalid Host");
    if raw.is_empty() || raw.contains(&b'@') {
        return Err(BAD);
    }
    if !raw.iter().all(|&b| HOST_BYTE[usize::from(b)]) {
        return Err(BAD);
    }
    // The port, if any, follows the last ':' that is outside an IPv6 literal.
    let port_at = match raw.iter().rposition(|&b| b == b']') {
        Some(end) => raw[end..].iter().position(|&b| b == b':').map(|i| i + end),
        None => raw.iter().rposition(|&b| b == b':'),
    };
    let (name, port) = match port_at {
        Some(i) => (&raw[..i], &raw[i + 1..]),
        None => (raw, &b""[..]),
    };
    // RFC 3986 §3.2.2: the host is an IP literal in brackets, or an IPv4 address or
    // reg-name (no brackets, no colon; `%` only as pct-encoded); never empty here, as
    // an empty Host leaves the request without one (RFC 9112 §3.2: a 400). §3.2.3: the
    // port is digits, and Echo knows no port past 65535.
    if !valid_host_name(name)
        || !port.iter().all(u8::is_ascii_digit)
        || (!port.is_empty()
            && std::str::from_utf8(port)
                .ok()
                .and_then(|p| p.parse::<u16>().ok())
                .is_none())
    {
        return Err(BAD);
    }
    let name = if port.is_empty() || port == b"80" {
        name
    } else {
        raw
    };
    // Every byte is ASCII (checked above): one copy, lower-cased in place.
    let mut host = String::from_utf8_lossy(name).into_owned();
    host.make_ascii_lowercase();
    Ok(host)
}

/// Is `name` (a Host value less its port) an IP literal, an IPv4 address or a reg-name?
fn valid_host_name(name: &[u8]) -> bool {
    match name {
        [] => false,
        [b'[', inside @ .., b']'] => {
            // IPv6 (RFC 3986 §3.2.2), or IPvFuture: "v" 1*HEXDIG "." 1*(...).
            let future = matches!(inside.first(), Some(b'v' | b'V'))
                && inside.iter().position(|&b| b == b'.').is_some_and(|dot| {
                    dot > 1
                        && dot + 1 < inside.len()
                        && inside[1..dot].iter().all(u8::is_ascii_hexdigit)
                });
            future
                || std::str::from_utf8(inside)
                    .ok()
                    .and_then(|a| a.parse::<std::net::Ipv6Addr>().ok())
                    .is_some()
        }
        _ => {
            let mut bytes = name.iter();
            while let Some(&b) = bytes.next() {
                match b {
                    b'[' | b']' | b':' => return false,
                    b'%' => {
                        let hex = |b: Option<&u8>| b.is_some_and(u8::is_ascii_hexdigit);
                        if !(hex(bytes.next()) && hex(bytes.next())) {
                            return false;
                        }
                    }
                    _ => {}
                }
            }
            true
        }
    }
}

/// The bytes a Host value may hold: RFC 3986 reg-name (unreserved, pct-encoded,
/// sub-delims), IP literals (`[`, `]`, `:`) and the port's digits. A table: this runs on
/// every request.
const HOST_BYTE: [bool; 256] = {
    let mut table = [false; 256];
    let mut b = 0;
    while b < 256 {
        let c = b as u8;
        table[b] = c.is_ascii_alphanumeric()
            || matches!(
                c,
                b'-' | b'.'
                    | b'_'
                    | b'~'
                    | b':'
                    | b'['
                    | b']'
                    | b'%'
                    | b'!'
                    | b'$'
                    | b'&'
                    | b'\''
                    | b'('
                    | b')'
                    | b'*'
                    | b'+'
                    | b','
                    | b';'
                    | b'='
            );
        b += 1;
    }
    table
};

/// RFC 9112 §6: decides how the request body is framed, refusing every ambiguity.
fn framing(headers: &Headers, version: Version, limits: &Limits) -> Result<BodyFraming, HttpError> {
    let te: Vec<&[u8]> = headers
        .iter()
        .filter(|(n, _)| n == "transfer-encoding")
        .map(|(_, v)| v.as_slice())
        .collect();
    let cl: Vec<&[u8]> = headers
        .iter()
        .filter(|(n, _)| n == "content-length")
        .map(|(_, v)| v.as_slice())
        .collect();

    if !te.is_empty() {
        // RFC 9112 §6.1: "A server MAY reject a request that contains both Content-Length
        // and Transfer-Encoding or process such a request in accordance with the
        // Transfer-Encoding alone." Echo rejects: it is the classic smuggling vector.
        if !cl.is_empty() {
            return Err(HttpError::new(
                400,
                "both Content-Length and Transfer-Encoding",
            ));
        }
        // RFC 9112 §6.1: an HTTP/1.0 message with Transfer-Encoding has faulty framing.
        if version == Version::Http10 {
            return Err(HttpError::new(
                400,
                "Transfer-Encoding in an HTTP/1.0 request",
            ));
        }
        let mut codings = Vec::new();
        for line in &te {
            for item in line.split(|&b| b == b',') {
                let item = item.trim_ascii();
                if item.is_empty() || !item.iter().all(|&b| is_tchar(b)) {
                    return Err(HttpError::new(400, "malformed Transfer-Encoding"));
                }
                codings.push(item);
            }
        }
        // RFC 9112 §6.3: "If a Transfer-Encoding header field is present in a request and
        // the chunked transfer coding is not the final encoding, the message body length
        // cannot be determined reliably; the server MUST respond with the 400".
        let chunked = |c: &[u8]| c.eq_ignore_ascii_case(b"chunked");
        if !codings.last().is_some_and(|c| chunked(c)) {
            return Err(HttpError::new(
                400,
                "chunked is not the final transfer coding",
            ));
        }
        if codings.len() > 1 {
            // RFC 9112 §6.1: chunked MUST NOT be applied more than once.
            if codings.iter().filter(|c| chunked(c)).count() > 1 {
                return Err(HttpError::new(400, "chunked applied more than once"));
            }
            // RFC 9112 §6.1: "A server that receives a request message with a transfer
            // coding it does not understand SHOULD respond with 501 (Not Implemented)."
            return Err(HttpError::new(501, "unsupported transfer coding"));
        }
        return Ok(BodyFraming::Chunked);
    }

    match cl.as_slice() {
        [] => Ok(BodyFraming::None),
        // RFC 9112 §6.3: several Content-Length values, even equal ones, make the framing
        // unreliable for some hops; Echo refuses instead of picking one.
        [one] => {
            if one.is_empty() || one.len() > 19 || !one.iter().all(u8::is_ascii_digit) {
                return Err(HttpError::new(400, "malformed Content-Length"));
            }
            let n: u64 = std::str::from_utf8(one)
                .ok()
                .and_then(|s| s.parse().ok())
                .ok_or(HttpError::new(400, "malformed Content-Length"))?;
            if n > limits.max_body_bytes {
                return Err(HttpError::new(413, "request body too large"));
            }
            Ok(if n == 0 {
                BodyFraming::None
            } else {
                BodyFraming::Length(n)
            })
        }
        _ => Err(HttpError::new(400, "more than one Content-Length")),
    }
}

/// RFC 9110 §5.6.2 token characters.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric()
        || matches!(
            b,
            b'!' | b'#'
                | b'$'
                | b'%'
                | b'&'
                | b'\''
                | b'*'
                | b'+'
                | b'-'
                | b'.'
                | b'^'
                | b'_'
                | b'`'
                | b'|'
                | b'~'
        )
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits() -> Limits {
        Limits {
            max_header_bytes: 4096,
            max_headers: 16,
            max_target_bytes: 256,
            max_body_bytes: 1000,
        }
    }

    fn parse(raw: &str) -> Result<Parsed, HttpError> {
        parse_head(raw.as_bytes(), &limits(), "127.0.0.1:1".parse().unwrap())
    }

    fn ok(raw: &str) -> Request {
        match parse(raw) {
            Ok(Parsed::Complete(r, n)) => {
                assert_eq!(n, raw.len());
                r
            }
            other => panic!("{raw:?}: {other:?}"),
        }
    }

    fn refused(raw: &str) -> u16 {
        match parse(raw) {
            Err(e) => e.status,
            other => panic!("{raw:?} was not refused: {other:?}"),
        }
    }

    #[test]
    fn a_plain_get_parses() {
        let r = ok("GET /a?b=1 HTTP/1.1\r\nHost: Example.COM:80\r\nAccept: */*\r\n\r\n");
        assert_eq!(r.method, "GET");
        assert_eq!(r.target, "/a?b=1");
        assert_eq!(r.host, "example.com");
        assert_eq!(r.framing, BodyFraming::None);
        assert!(r.keep_alive);
        assert_eq!(r.header("accept"), Some(&b"*/*"[..]));
    }

    #[test]
    fn partial_heads_wait_for_more() {
        assert!(matches!(
            parse("GET / HTTP/1.1\r\nHost: a\r\n"),
            Ok(Parsed::Partial)
        ));
    }

    #[test]
    fn hosts_are_checked_against_rfc_3986_and_normalised() {
        for (raw, want) in [
            ("Example.COM:80", "example.com"),
            ("example.com:", "example.com"),
            ("127.0.0.1:8080", "127.0.0.1:8080"),
            ("[::1]", "[::1]"),
            ("[::1]:8080", "[::1]:8080"),
            ("[v1.x]", "[v1.x]"),
            ("a%41b", "a%41b"),
            ("host:65535", "host:65535"),
        ] {
            assert_eq!(normalize_host(raw.as_bytes()).as_deref(), Ok(want), "{raw}");
        }
        // Found by fuzzing: each was a cache key (`:80` an empty host).
        for raw in [
            ":80",
            ":",
            "[::1",
            "::1",
            "[]",
            "[::1]x",
            "h:80:80",
            "h:99999",
            "h:65536",
            "a]:1",
            "[[[",
            "%",
            "%4",
            "%zz",
            "[v.x]",
            "[1.2.3.4]",
            "h:8a",
        ] {
            assert!(normalize_host(raw.as_bytes()).is_err(), "{raw}");
        }
    }

    #[test]
    fn absolute_form_takes_the_host_from_the_target() {
        let r = ok("GET http://Other.example:8080?x HTTP/1.1\r\nHost: ignored\r\n\r\n");
        assert_eq!(r.host, "other.example:8080");
        assert_eq!(r.target, "/?x");
    }

    #[test]
    fn keep_alive_follows_the_version_rules() {
        assert!(!ok("GET / HTTP/1.1\r\nHost: a\r\nConnection: close\r\n\r\n").keep_alive);
        assert!(!ok("GET / HTTP/1.0\r\n\r\n").keep_alive);
        assert!(ok("GET / HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").keep_alive);
    }

    #[test]
    fn framing_is_decided_strictly() {
        let cases: &[(&str, Result<BodyFraming, u16>)] = &[
            ("Content-Length: 5\r\n", Ok(BodyFraming::Length(5))),
            ("Content-Length: 0\r\n", Ok(BodyFraming::None)),
            ("Transfer-Encoding: chunked\r\n", Ok(BodyFraming::Chunked)),
            ("Transfer-Encoding: Chunked\r\n", Ok(BodyFraming::Chunked)),
            (
                "Content-Length: 5\r\nTransfer-Encoding: chunked\r\n",
                Err(400),
            ),
            ("Transfer-Encoding: gzip, chunked\r\n", Err(501)),
            ("Transfer-Encoding: chunked, identity\r\n", Err(400)),
            ("Transfer-Encoding: chunked, chunked\r\n", Err(400)),
            (
                "Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n",
                Err(400),
            ),
            ("Transfer-Encoding: identity\r\n", Err(400)),
            ("Transfer-Encoding: ,chunked\r\n", Err(400)),
            ("Transfer-Encoding: \"chunked\"\r\n", Err(400)),
            ("Content-Length: 5\r\nContent-Length: 5\r\n", Err(400)),
            ("Content-Length: 5, 5\r\n", Err(400)),
            ("Content-Length: +5\r\n", Err(400)),
            ("Content-Length: 0x5\r\n", Err(400)),
            ("Content-Length: 99999999999999999999\r\n", Err(400)),
            ("Content-Length: 1001\r\n", Err(413)),
        ];
        for (fields, want) in cases {
            let raw = format!("POST / HTTP/1.1\r\nHost: a\r\n{fields}\r\n");
            let got = match parse(&raw) {
                Ok(Parsed::Complete(r, _)) => Ok(r.framing),
                Ok(Parsed::Partial) => panic!("partial: {raw:?}"),
                Err(e) => Err(e.status),
            };
            assert_eq!(&got, want, "{fields:?}");
        }
        assert_eq!(
            refused("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n"),
            400
        );
    }

    #[test]
    fn malformed_heads_are_refused() {
        let cases: &[(&str, u16)] = &[
            ("GET / HTTP/1.1\r\n\r\n", 400),                          // no Host
            ("GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n", 400),    // two Hosts
            ("GET / HTTP/1.1\r\nHost: a b\r\n\r\n", 400),             // invalid Host
            ("GET / HTTP/1.1\r\nHost: u@a\r\n\r\n", 400),             // userinfo
            ("GET / HTTP/1.1\r\nHost: a:99999999\r\n\r\n", 400),      // port
            ("GET / HTTP/1.1\nHost: a\n\n", 400),                     // bare LF
            ("GET / HTTP/1.1\r\nHost: a\r\nX: a\rb\r\n\r\n", 400),    // bare CR
            ("GET / HTTP/1.1\r\nHost: a\r\nX: a\r\n b\r\n\r\n", 400), // obs-fold
            ("GET / HTTP/1.1\r\nHost: a\r\nX : a\r\n\r\n", 400),      // space before colon
            ("GET / HTTP/1.1\r\nHost: a\r\nX: a\x01b\r\n\r\n", 400),  // control char
            ("GET / HTTP/1.1\r\nHost: a\r\nX: a\x7fb\r\n\r\n", 400),  // DEL
            ("GET / HTTP/1.1\r\nHost: a\r\nX: a\x0bb\r\n\r\n", 400),  // vertical tab
            ("GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
            ("GET foo HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            ("GET * HTTP/1.1\r\nHost: a\r\n\r\n", 400),
            ("CONNECT a:443 HTTP/1.1\r\nHost: a\r\n\r\n", 501),
            ("GET / HTTP/1.1\r\nHost: a\r\nExpect: 200-ok\r\n\r\n", 417),
        ];
        for (raw, status) in cases {
            assert_eq!(refused(raw), *status, "{raw:?}");
        }
    }

    #[test]
    fn limits_are_enforced() {
        let long_target = format!("GET /{} HTTP/1.1\r\nHost: a\r\n\r\n", "a".repeat(300));
        assert_eq!(refused(&long_target), 414);
        let unfinished_line = format!("GET /{}", "a".repeat(400));
        assert_eq!(refused(&unfinished_line), 414);
        let many: String = (0..20).map(|i| format!("X-{i}: v\r\n")).collect();
        assert_eq!(
            refused(&format!("GET / HTTP/1.1\r\nHost: a\r\n{many}\r\n")),
            431
        );
        let big = format!("GET / HTTP/1.1\r\nHost: a\r\nX: {}\r\n", "v".repeat(5000));
        assert_eq!(refused(&big), 431);
    }

    #[test]
    fn expect_continue_is_noticed() {
        let r =
            ok("PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 3\r\n\r\n");
        assert!(r.expect_continue);
        assert_eq!(r.framing, BodyFraming::Length(3));
    }
}
