//! Property-based tests (proptest) for the code that reads bytes from the network or
//! from the store: arbitrary input never panics it, what is written reads back the same,
//! and a valid request head parses the same whichever byte boundary it arrives split at.
//!
//! Case counts are kept modest so this file runs in a few seconds in a debug build; the
//! socket-based properties (chunked bodies) run fewer cases. A failure prints the
//! minimal input proptest shrank it to; add it as a regression test next to the code.

use std::io::{self, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use proptest::collection::vec;
use proptest::prelude::*;
use proptest::sample::Index;

use echo::http::body::{client_error, BodyState};
use echo::http::conn::Conn;
use echo::http::parse::{parse_head, HttpError, Limits, Parsed};
use echo::http::{BodyFraming, Headers, Request, Version};
use echo::invalidation::Matcher;
use echo::key::split_key;
use echo::policy::{
    corrected_initial_age, freshness_lifetime, storability, update_stored_headers, vary_matches,
    vary_snapshot, CacheControl, PolicyOptions,
};
use echo::store::codec::{decode, encode};
use echo::store::Entry;

// ---------------------------------------------------------------------------------------
// Request heads
// ---------------------------------------------------------------------------------------

fn limits() -> Limits {
    Limits {
        max_header_bytes: 16 * 1024,
        max_headers: 64,
        max_target_bytes: 1024,
        max_body_bytes: 1 << 20,
    }
}

fn peer() -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], 1))
}

fn parse(buf: &[u8]) -> Result<Parsed, HttpError> {
    parse_head(buf, &limits(), peer())
}

/// Every field of a parsed request, for comparing two parses (`Request` has no `PartialEq`).
type RequestFields = (
    String,
    String,
    Version,
    Headers,
    String,
    BodyFraming,
    bool,
    bool,
);

fn fields(r: &Request) -> RequestFields {
    (
        r.method.clone(),
        r.target.clone(),
        r.version,
        r.headers.clone(),
        r.host.clone(),
        r.framing,
        r.expect_continue,
        r.keep_alive,
    )
}

/// An RFC 9110 §5.6.2 token of `min..=max` characters.
fn token(min: usize, max: usize) -> impl Strategy<Value = String> {
    proptest::string::string_regex(&format!("[A-Za-z0-9!#$%&'*+.^_`|~-]{{{min},{max}}}"))
        .expect("a valid regex")
}

/// A valid request head and what parsing it must give.
#[derive(Debug, Clone)]
struct ValidRequest {
    method: String,
    target: String,
    version: Version,
    /// Field lines as sent: name as written, value with the OWS around it.
    lines: Vec<(String, String)>,
    /// The Host value as sent, and as Echo normalises it.
    host: String,
    content_length: Option<u64>,
}

impl ValidRequest {
    fn wire(&self) -> Vec<u8> {
        let version = match self.version {
            Version::Http10 => "HTTP/1.0",
            Version::Http11 => "HTTP/1.1",
        };
        let mut out = format!("{} {} {version}\r\n", self.method, self.target);
        for (name, value) in &self.lines {
            out.push_str(&format!("{name}:{value}\r\n"));
        }
        out.push_str("\r\n");
        out.into_bytes()
    }

    fn expected_headers(&self) -> Headers {
        self.lines
            .iter()
            .map(|(n, v)| (n.to_ascii_lowercase(), v.trim().as_bytes().to_vec()))
            .collect()
    }
}

fn method() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => prop::sample::select(vec!["GET", "HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"])
            .prop_map(str::to_string),
        1 => token(1, 12).prop_filter("CONNECT is refused", |m| m != "CONNECT"),
    ]
}

fn origin_form_target() -> impl Strategy<Value = String> {
    "/[A-Za-z0-9._~!$&'()*+,;=:@%/-]{0,40}(\\?[A-Za-z0-9._~!$&'()*+,;=:@%/?-]{0,40})?"
}

/// A field value: visible ASCII with inner SP/HTAB, and OWS around it that parsing trims.
fn field_value() -> impl Strategy<Value = String> {
    ("[ \t]{0,2}", "([!-~]([!-~ \t]{0,30}[!-~])?)?", "[ \t]{0,2}")
        .prop_map(|(lead, v, trail)| format!("{lead}{v}{trail}"))
}

/// Field names that change how the head is framed or validated are left to the caller.
fn plain_field_name() -> impl Strategy<Value = String> {
    token(1, 16).prop_filter("framing fields are set explicitly", |n| {
        let n = n.to_ascii_lowercase();
        !matches!(
            n.as_str(),
            "host" | "content-length" | "transfer-encoding" | "expect"
        )
    })
}

/// A Host value and its normalised form (lower case, no default port).
fn host() -> impl Strategy<Value = (String, String)> {
    (
        "[A-Za-z0-9-]{1,10}(\\.[A-Za-z0-9-]{1,10}){0,2}",
        prop_oneof![Just(None), Just(Some(80u16)), any::<u16>().prop_map(Some)],
    )
        .prop_map(|(name, port)| {
            let lower = name.to_ascii_lowercase();
            match port {
                None => (name, lower),
                Some(80) => (format!("{name}:80"), lower),
                Some(p) => (format!("{name}:{p}"), format!("{lower}:{p}")),
            }
        })
}

fn valid_request() -> impl Strategy<Value = ValidRequest> {
    (
        method(),
        origin_form_target(),
        prop_oneof![Just(Version::Http11), Just(Version::Http10)],
        vec((plain_field_name(), field_value()), 0..20),
        host(),
        any::<Index>(),
        prop::option::of((0u64..=1 << 20, any::<Index>())),
    )
        .prop_map(
            |(method, target, version, mut lines, (host, normal), host_at, cl)| {
                lines.insert(
                    host_at.index(lines.len() + 1),
                    ("Host".into(), format!(" {host}")),
                );
                let content_length = cl.map(|(n, at)| {
                    lines.insert(
                        at.index(lines.len() + 1),
                        ("Content-Length".into(), n.to_string()),
                    );
                    n
                });
                ValidRequest {
                    method,
                    target,
                    version,
                    lines,
                    host: normal,
                    content_length,
                }
            },
        )
}

/// Fragments of request heads, so arbitrary input also reaches the checks after httparse.
fn head_fragments() -> impl Strategy<Value = Vec<u8>> {
    let fragment = prop_oneof![
        prop::sample::select(vec![
            "GET ",
            "POST ",
            "OPTIONS ",
            "CONNECT ",
            "/",
            "/a?b",
            "*",
            "http://",
            "https://",
            " HTTP/1.1",
            " HTTP/1.0",
            " HTTP/2.0",
            "\r\n",
            "\n",
            "\r",
            " ",
            "\t",
            ":",
            ", ",
            "Host: ",
            "host:a",
            "Content-Length: ",
            "Transfer-Encoding: ",
            "chunked",
            "gzip",
            "Expect: ",
            "100-continue",
            "Connection: close",
            "0",
            "5",
            "99999999999999999999",
            "@",
            "[::1]",
            ":80",
            "\0",
            "\x0b",
            "\x7f",
            "\u{e9}",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
        vec(any::<u8>(), 1..4),
    ];
    vec(fragment, 0..40).prop_map(|parts| parts.concat())
}

fn arbitrary_limits() -> impl Strategy<Value = Limits> {
    (0usize..4096, 0usize..300, 0usize..512, any::<u64>()).prop_map(|(hb, hs, tb, bb)| Limits {
        max_header_bytes: hb,
        max_headers: hs,
        max_target_bytes: tb,
        max_body_bytes: bb,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary bytes never panic the head parser, and a refusal is a 4xx or 5xx.
    #[test]
    fn parse_head_never_panics(
        buf in prop_oneof![vec(any::<u8>(), 0..4096), head_fragments()],
        limits in prop_oneof![Just(limits()), arbitrary_limits()],
    ) {
        match parse_head(&buf, &limits, peer()) {
            Ok(Parsed::Complete(_, len)) => prop_assert!(len <= buf.len()),
            Ok(Parsed::Partial) => {}
            Err(e) => prop_assert!((400..600).contains(&e.status), "{e}"),
        }
    }

    /// A valid head parses to what was sent, and arrives the same split at any byte.
    #[test]
    fn valid_heads_parse_the_same_at_every_split(req in valid_request()) {
        let wire = req.wire();
        let whole = match parse(&wire) {
            Ok(Parsed::Complete(r, len)) => {
                prop_assert_eq!(len, wire.len());
                r
            }
            other => return Err(TestCaseError::fail(format!("{other:?}"))),
        };
        prop_assert_eq!(&whole.method, &req.method);
        prop_assert_eq!(&whole.target, &req.target);
        prop_assert_eq!(whole.version, req.version);
        prop_assert_eq!(&whole.headers, &req.expected_headers());
        prop_assert_eq!(&whole.host, &req.host);
        let framing = match req.content_length {
            Some(n) if n > 0 => BodyFraming::Length(n),
            _ => BodyFraming::None,
        };
        prop_assert_eq!(whole.framing, framing);

        for k in 0..wire.len() {
            match parse(&wire[..k]) {
                Ok(Parsed::Partial) => {}
                other => {
                    return Err(TestCaseError::fail(format!("prefix of {k} bytes: {other:?}")))
                }
            }
        }
        match parse(&wire) {
            Ok(Parsed::Complete(again, len)) => {
                prop_assert_eq!(len, wire.len());
                prop_assert_eq!(fields(&again), fields(&whole));
            }
            other => return Err(TestCaseError::fail(format!("{other:?}"))),
        }
    }

    /// Two pipelined heads: the first takes exactly its own bytes, the rest is the second.
    #[test]
    fn pipelined_heads_parse_one_at_a_time(a in valid_request(), b in valid_request()) {
        let (first, second) = (a.wire(), b.wire());
        let both = [first.as_slice(), &second].concat();
        let len = match parse(&both) {
            Ok(Parsed::Complete(r, len)) => {
                prop_assert_eq!(&r.target, &a.target);
                prop_assert_eq!(&r.headers, &a.expected_headers());
                len
            }
            other => return Err(TestCaseError::fail(format!("{other:?}"))),
        };
        prop_assert_eq!(len, first.len());
        match parse(&both[len..]) {
            Ok(Parsed::Complete(r, len)) => {
                prop_assert_eq!(len, second.len());
                prop_assert_eq!(&r.target, &b.target);
                prop_assert_eq!(&r.headers, &b.expected_headers());
            }
            other => return Err(TestCaseError::fail(format!("{other:?}"))),
        }
    }

    /// CR, LF, NUL, VT or DEL injected into a field value, or a space before a field's
    /// colon, is refused with 400: never accepted, never another status.
    #[test]
    fn corrupted_field_lines_are_refused_with_400(
        req in valid_request(),
        line in any::<Index>(),
        at in any::<Index>(),
        bad in prop::sample::select(vec![b'\r', b'\n', 0u8, 0x0b, 0x7f, b' ']),
    ) {
        let wire = req.wire();
        // Offsets of every field line in the wire, after the request line.
        let mut starts = Vec::new();
        let mut pos = wire.iter().position(|&b| b == b'\n').unwrap_or(0) + 1;
        for (name, value) in &req.lines {
            starts.push((pos, name.len(), value.len()));
            pos += name.len() + 1 + value.len() + 2;
        }
        let (start, name_len, value_len) = starts[line.index(starts.len())];
        let insert_at = if bad == b' ' {
            // "Name :value": whitespace between the name and the colon (RFC 9112 §5.1).
            start + name_len
        } else {
            start + name_len + 1 + at.index(value_len + 1)
        };
        let mut mutated = wire.clone();
        mutated.insert(insert_at, bad);
        match parse(&mutated) {
            Err(e) => prop_assert_eq!(e.status, 400, "{:?}", String::from_utf8_lossy(&mutated)),
            other => {
                return Err(TestCaseError::fail(format!(
                    "{:?} was not refused: {other:?}",
                    String::from_utf8_lossy(&mutated)
                )))
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Chunked request bodies, over a real socket pair
// ---------------------------------------------------------------------------------------

/// A server-side connection that has received `bytes` and then the client's FIN. The
/// client socket is returned too, so it stays open until the test is done with the pair.
fn conn_with(bytes: &[u8]) -> (Conn, TcpStream) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
    let (server, peer) = listener.accept().unwrap();
    client.write_all(bytes).unwrap();
    client.shutdown(Shutdown::Write).unwrap();
    (
        Conn::new(server.into(), peer, 64 * 1024, Duration::from_secs(5)),
        client,
    )
}

/// Decodes a body from `wire` with reads of at most `step` bytes, then returns what is
/// left on the connection (every byte up to the client's FIN).
fn decode_body(
    framing: BodyFraming,
    max: u64,
    wire: &[u8],
    step: usize,
) -> (io::Result<Vec<u8>>, Vec<u8>) {
    let (mut conn, _client) = conn_with(wire);
    let mut state = BodyState::new(framing, max);
    let deadline = Instant::now() + Duration::from_secs(20);
    let mut out = Vec::new();
    let mut buf = vec![0u8; step];
    let result = loop {
        assert!(Instant::now() < deadline, "body decoding did not end");
        match state.read(&mut conn, &mut buf, Instant::now() + Duration::from_secs(5)) {
            Ok(0) => break Ok(out),
            Ok(n) => out.extend_from_slice(&buf[..n]),
            Err(e) => break Err(e),
        }
    };
    if result.is_ok() {
        while conn.fill(deadline).expect("reading the rest") > 0 {}
    }
    (result, conn.buffered().to_vec())
}

/// One data chunk: its bytes, its extensions, leading zeros and case of its size.
type Chunk = (Vec<u8>, String, usize, bool);

fn chunk_ext() -> impl Strategy<Value = String> {
    "([ \t]?;[ \t]?[a-z]{1,5}([ \t]?=[ \t]?([a-z0-9]{1,5}|\"[a-z ;=,]{0,6}\"))?){0,2}"
}

fn chunk_size_line(size: usize, ext: &str, zeros: usize, upper: bool) -> String {
    let hex = if upper {
        format!("{size:X}")
    } else {
        format!("{size:x}")
    };
    format!("{}{hex}{ext}\r\n", "0".repeat(zeros))
}

fn chunked_wire(chunks: &[Chunk], last_ext: &str, trailers: &[(String, String)]) -> Vec<u8> {
    let mut wire = Vec::new();
    for (data, ext, zeros, upper) in chunks {
        wire.extend_from_slice(chunk_size_line(data.len(), ext, *zeros, *upper).as_bytes());
        wire.extend_from_slice(data);
        wire.extend_from_slice(b"\r\n");
    }
    wire.extend_from_slice(format!("0{last_ext}\r\n").as_bytes());
    for (name, value) in trailers {
        wire.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    wire.extend_from_slice(b"\r\n");
    wire
}

/// Chunked-looking bytes: sizes, line ends, extensions and junk in any order.
fn chunked_fragments() -> impl Strategy<Value = Vec<u8>> {
    let fragment = prop_oneof![
        prop::sample::select(vec![
            "0",
            "5",
            "a",
            "F",
            "10",
            "ffffffffffffffff",
            "fffffffffffffff",
            "\r\n",
            "\n",
            "\r",
            ";",
            "=",
            "\"",
            " ",
            "\t",
            ":",
            "X-T: 1",
            "hello",
            "\0",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
        vec(any::<u8>(), 1..8),
    ];
    vec(fragment, 0..40).prop_map(|parts| parts.concat())
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(64))]

    /// Any body sent in any chunking, with extensions and trailers, decodes to exactly the
    /// body, and the bytes after it (a pipelined request) stay on the connection.
    #[test]
    fn chunked_bodies_decode_exactly(
        chunks in vec((vec(any::<u8>(), 1..300), chunk_ext(), 0usize..3, any::<bool>()), 0..12),
        last_ext in chunk_ext(),
        trailers in vec((token(1, 10), "([!-~]([!-~ ]{0,20}[!-~])?)?"), 0..3),
        next in prop_oneof![
            Just(Vec::new()),
            Just(b"GET /next HTTP/1.1\r\nHost: a\r\n\r\n".to_vec()),
            vec(any::<u8>(), 0..64),
        ],
        step in 1usize..100,
    ) {
        let body: Vec<u8> = chunks.iter().flat_map(|c| c.0.clone()).collect();
        let wire = [chunked_wire(&chunks, &last_ext, &trailers), next.clone()].concat();
        let (decoded, rest) = decode_body(BodyFraming::Chunked, 1 << 30, &wire, step);
        match decoded {
            Ok(decoded) => prop_assert_eq!(decoded, body),
            Err(e) => return Err(TestCaseError::fail(format!("{e}"))),
        }
        prop_assert_eq!(rest, next);
    }

    /// Arbitrary bytes as a chunked body never panic the decoder: the body ends or is
    /// refused (400/413) or cut short, and never yields more bytes than were sent.
    #[test]
    fn arbitrary_chunked_bodies_never_panic(
        wire in prop_oneof![vec(any::<u8>(), 0..512), chunked_fragments()],
        max in prop_oneof![Just(1u64 << 30), 0u64..64],
        step in 1usize..100,
    ) {
        let (decoded, _) = decode_body(BodyFraming::Chunked, max, &wire, step);
        match decoded {
            Ok(body) => {
                prop_assert!(body.len() <= wire.len());
                prop_assert!(body.len() as u64 <= max);
            }
            Err(e) => match client_error(&e) {
                Some(refusal) => prop_assert!(matches!(refusal.status, 400 | 413), "{e}"),
                None => prop_assert_eq!(e.kind(), io::ErrorKind::UnexpectedEof, "{}", e),
            },
        }
    }
}

// ---------------------------------------------------------------------------------------
// Cache policy
// ---------------------------------------------------------------------------------------

fn cache_control(values: &[Vec<u8>]) -> Vec<(String, Vec<u8>)> {
    values
        .iter()
        .map(|v| ("cache-control".to_string(), v.clone()))
        .collect()
}

/// One directive: its name in lower case and its argument as written (`=...` or empty).
fn directive() -> impl Strategy<Value = (String, String)> {
    let name = prop_oneof![
        3 => prop::sample::select(vec![
            "no-store", "no-cache", "private", "public", "max-age", "s-maxage",
            "must-revalidate", "proxy-revalidate", "no-transform", "immutable",
            "stale-while-revalidate", "stale-if-error", "max-stale", "min-fresh",
            "only-if-cached",
        ])
        .prop_map(str::to_string),
        1 => "[a-z-]{1,10}",
    ];
    let arg = prop_oneof![
        Just(String::new()),
        "=[0-9]{1,12}",
        "=[a-z0-9-]{1,8}",
        // Quoted arguments keep their case: only directive names are case-insensitive.
        "=\"([A-Za-z0-9 ,;=-]|\\\\[\"A-Z\\\\])*\"",
    ];
    (name, arg)
}

/// `name` with the letters whose bit is set in `mask` upper-cased.
fn recase(name: &str, mask: u64) -> String {
    name.chars()
        .enumerate()
        .map(|(i, c)| {
            if mask >> (i % 64) & 1 == 1 {
                c.to_ascii_uppercase()
            } else {
                c
            }
        })
        .collect()
}

/// A generated HTTP-date, sometimes extreme, sometimes invalid.
fn http_date() -> impl Strategy<Value = Vec<u8>> {
    prop_oneof![
        any::<u32>().prop_map(|s| {
            httpdate::fmt_http_date(UNIX_EPOCH + Duration::from_secs(u64::from(s) * 8)).into_bytes()
        }),
        prop::sample::select(vec![
            "0",
            "Thu, 01 Jan 1970 00:00:00 GMT",
            "Fri, 31 Dec 9999 23:59:59 GMT",
            "Sunday, 06-Nov-94 08:49:37 GMT",
            "Sun Nov  6 08:49:37 1994",
        ])
        .prop_map(|s| s.as_bytes().to_vec()),
        vec(any::<u8>(), 0..32),
    ]
}

/// Response or request fields from the names the policy reads, with arbitrary values.
fn policy_fields() -> impl Strategy<Value = Vec<(String, Vec<u8>)>> {
    let field = prop_oneof![
        (
            prop::sample::select(vec!["date", "expires", "last-modified"]),
            http_date()
        )
            .prop_map(|(n, v)| (n.to_string(), v)),
        (
            prop::sample::select(vec![
                "cache-control",
                "pragma",
                "age",
                "vary",
                "authorization",
                "set-cookie",
                "etag",
                "content-length",
                "connection",
                "x-other",
            ]),
            prop_oneof![
                vec(directive(), 0..4).prop_map(|ds| ds
                    .iter()
                    .map(|(n, a)| format!("{n}{a}"))
                    .collect::<Vec<_>>()
                    .join(", ")
                    .into_bytes()),
                vec(any::<u8>(), 0..24),
                "[0-9]{1,25}".prop_map(String::into_bytes),
            ]
        )
            .prop_map(|(n, v)| (n.to_string(), v)),
    ];
    vec(field, 0..8)
}

fn any_time() -> impl Strategy<Value = SystemTime> {
    prop_oneof![
        Just(UNIX_EPOCH),
        any::<u32>().prop_map(|s| UNIX_EPOCH + Duration::from_secs(u64::from(s))),
        any::<u64>().prop_map(|ms| UNIX_EPOCH + Duration::from_millis(ms)),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Arbitrary Cache-Control lines, non-UTF-8 included, never panic the parser.
    #[test]
    fn cache_control_never_panics(lines in vec(vec(any::<u8>(), 0..200), 0..4)) {
        let headers = cache_control(&lines);
        let _ = CacheControl::parse(&headers);
        let _ = CacheControl::parse_request(&headers);
    }

    /// Directive names are compared case-insensitively: re-casing only the names of a
    /// directive list changes nothing.
    #[test]
    fn cache_control_names_are_case_insensitive(
        directives in vec((directive(), any::<u64>(), "[ \t]{0,2}"), 0..8),
    ) {
        let write = |upper: &dyn Fn(&str, u64) -> String| -> Vec<u8> {
            directives
                .iter()
                .map(|((name, arg), mask, ows)| format!("{}{arg}", upper(name, *mask)) + ows)
                .collect::<Vec<_>>()
                .join(",")
                .into_bytes()
        };
        let lower = CacheControl::parse(&cache_control(&[write(&|n, _| n.to_string())]));
        let upper = CacheControl::parse(&cache_control(&[write(&|n, _| n.to_ascii_uppercase())]));
        let mixed = CacheControl::parse(&cache_control(&[write(&recase)]));
        prop_assert_eq!(&lower, &upper);
        prop_assert_eq!(&lower, &mixed);
    }

    /// Storability, freshness and age never panic on arbitrary fields and times.
    #[test]
    fn policy_decisions_never_panic(
        method in prop::sample::select(vec!["GET", "HEAD", "POST", "get"]),
        req in policy_fields(),
        status in prop_oneof![Just(200u16), Just(404), Just(206), Just(304), any::<u16>()],
        resp in policy_fields(),
        request_time in any_time(),
        response_time in any_time(),
    ) {
        let opts = PolicyOptions::default();
        let _ = storability(method, &req, status, &resp, response_time, &opts);
        let cc = CacheControl::parse(&resp);
        let _ = freshness_lifetime(status, &resp, &cc, response_time, &opts);
        let _ = corrected_initial_age(&resp, request_time, response_time);
    }

    /// A request always selects the variant stored from it, and no longer does once a
    /// field it had is removed.
    #[test]
    fn a_request_matches_its_own_vary_snapshot(
        vary in vec(prop::sample::select(vec!["Accept-Encoding", "accept", "X-A", "cookie"]), 0..4)
            .prop_map(|v| v.into_iter().map(str::to_string).collect::<Vec<_>>()),
        req in vec(
            (prop::sample::select(vec!["accept-encoding", "accept", "x-a", "x-b"]), vec(any::<u8>(), 0..16)),
            0..6,
        ).prop_map(|v| v.into_iter().map(|(n, b)| (n.to_string(), b)).collect::<Vec<_>>()),
    ) {
        let snapshot = vary_snapshot(&vary, &req);
        prop_assert!(vary_matches(&snapshot, &req));
        for (field, value) in &snapshot {
            if value.is_some() {
                let without: Vec<_> = req.iter().filter(|(n, _)| n != field).cloned().collect();
                prop_assert!(!vary_matches(&snapshot, &without), "{field}");
            }
        }
    }

    /// Updating stored fields from a 304 never panics; fields the 304 does not name are
    /// kept in order, and no field comes from anywhere but the two messages.
    #[test]
    fn updating_stored_fields_never_panics(stored in policy_fields(), not_modified in policy_fields()) {
        let updated = update_stored_headers(&stored, &not_modified);
        let kept: Vec<_> = stored
            .iter()
            .filter(|(n, _)| !not_modified.iter().any(|(m, _)| m == n))
            .collect();
        let kept_out: Vec<_> = updated.iter().filter(|f| kept.contains(f)).collect();
        prop_assert_eq!(kept_out, kept);
        for field in &updated {
            prop_assert!(stored.contains(field) || not_modified.contains(field));
        }
    }
}

// ---------------------------------------------------------------------------------------
// Stored-value codec
// ---------------------------------------------------------------------------------------

fn any_string(max: usize) -> impl Strategy<Value = String> {
    vec(any::<char>(), 0..max).prop_map(String::from_iter)
}

fn entry() -> impl Strategy<Value = Arc<Entry>> {
    (
        any::<u16>(),
        vec((any_string(12), vec(any::<u8>(), 0..40)), 0..8),
        vec(any::<u8>(), 0..1024),
        (any::<u64>(), any::<u64>(), any::<u64>()),
        vec((any_string(12), prop::option::of(any_string(20))), 0..4),
        vec(any_string(12), 0..4),
    )
        .prop_map(|(status, headers, body, (time, age, fresh), vary, tags)| {
            Arc::new(Entry {
                status,
                headers,
                body,
                file: None,
                response_time: UNIX_EPOCH + Duration::from_millis(time),
                initial_age: Duration::from_millis(age),
                freshness: Duration::from_millis(fresh),
                vary,
                tags,
            })
        })
}

fn same_entry(a: &Entry, b: &Entry) -> bool {
    a.status == b.status
        && a.headers == b.headers
        && a.body == b.body
        && a.response_time == b.response_time
        && a.initial_age == b.initial_age
        && a.freshness == b.freshness
        && a.vary == b.vary
        && a.tags == b.tags
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// What is encoded decodes to the same variants.
    #[test]
    fn codec_round_trips(variants in vec(entry(), 0..4)) {
        let decoded = decode(&encode(&variants)).map_err(|e| TestCaseError::fail(e.to_string()))?;
        prop_assert_eq!(decoded.len(), variants.len());
        for (a, b) in variants.iter().zip(&decoded) {
            prop_assert!(same_entry(a, b), "{a:?} != {b:?}");
        }
    }

    /// Arbitrary bytes never panic the decoder; whatever it accepts encodes back to
    /// exactly those bytes (the format has one encoding per value).
    #[test]
    fn codec_decode_never_panics(bytes in prop_oneof![
        vec(any::<u8>(), 0..512),
        vec(any::<u8>(), 0..64).prop_map(|mut b| { b.insert(0, 1); b }),
    ]) {
        if let Ok(variants) = decode(&bytes) {
            prop_assert_eq!(encode(&variants), bytes);
        }
    }

    /// Every truncation of a valid encoding is refused; a flipped bit never panics, and
    /// if the result still decodes, it is a value that encodes to the flipped bytes.
    #[test]
    fn codec_survives_truncation_and_bit_flips(
        variants in vec(entry(), 1..3),
        cuts in vec(any::<Index>(), 8),
        flips in vec((any::<Index>(), 0u8..8), 8),
    ) {
        let good = encode(&variants);
        for cut in &cuts {
            let cut = cut.index(good.len());
            prop_assert!(decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        for (at, bit) in &flips {
            let mut flipped = good.clone();
            flipped[at.index(good.len())] ^= 1 << bit;
            if let Ok(decoded) = decode(&flipped) {
                prop_assert_eq!(encode(&decoded), flipped);
            }
        }
    }
}

// ---------------------------------------------------------------------------------------
// Invalidation patterns
// ---------------------------------------------------------------------------------------

/// Regex-looking patterns (small alphabet, so they compile and match often) or any text.
fn pattern() -> impl Strategy<Value = String> {
    prop_oneof![
        3 => "\\^?[/ab.*+?|()\\[\\]{}0-3,^$\\\\-]{0,16}",
        1 => any_string(64),
        1 => Just("a".repeat(5000)),
    ]
}

fn key_target() -> impl Strategy<Value = String> {
    prop_oneof![3 => "/[ab/.?]{0,10}", 1 => any_string(20)]
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(256))]

    /// Any pattern, host and tag is accepted or refused without panicking; matching any
    /// key never panics; and a target the pattern matches starts with the literal prefix
    /// the Redis SCAN is narrowed to.
    #[test]
    fn matcher_never_panics(
        pattern in prop::option::of(pattern()),
        host in prop::option::of(prop_oneof!["[a-z:0-9]{1,10}", any_string(10)]),
        tag in prop::option::of(any_string(10)),
        keys in vec((prop_oneof![Just("a".to_string()), "[a-z:0-9]{1,10}"], key_target()), 0..8),
        raw_keys in vec(any_string(30), 0..4),
    ) {
        let Ok(matcher) = Matcher::new(pattern.as_deref(), host.as_deref(), tag.as_deref()) else {
            return Ok(());
        };
        let _ = matcher.describe();
        for key in &raw_keys {
            let _ = matcher.matches_key(key);
        }
        for (host, target) in &keys {
            let key = format!("http://{host}{target}");
            if matcher.matches_key(&key) {
                let target = split_key(&key).map_or("", |(_, t)| t);
                if let Some(prefix) = matcher.prefix() {
                    prop_assert!(
                        target.starts_with(prefix),
                        "{:?} matched {key:?} without its prefix {prefix:?}",
                        matcher.pattern()
                    );
                }
            }
        }
    }
}
