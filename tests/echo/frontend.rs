//! The HTTP/1.1 front end over real sockets: keep-alive and pipelining, connection
//! persistence rules, `100 Continue`, large bodies both ways, slow and idle clients,
//! framing violations and header bombs (refused, closed, never forwarded), garbage,
//! the connection limit and the worker queue; and, with a handler of the test's own,
//! what the server does for any handler (panics, missing responses, unread bodies).
//!
//! Every test asserts on bytes received and on what the test origin recorded; every
//! wait is bounded by a read timeout or `wait_until`.

use std::io::Write;
use std::net::TcpStream;
use std::time::{Duration, Instant};

use crate::support::client::build_request;
use crate::support::echo::config;
use crate::support::{wait_until, EchoUnderTest, Gate, OriginResponse, RawClient, TestOrigin};

/// An origin that says which request it got: `METHOD TARGET <body length>`, never
/// cacheable, so every request to Echo is one origin hit.
fn describing_origin() -> TestOrigin {
    TestOrigin::start(|req| {
        OriginResponse::ok(format!("{} {} {}", req.method, req.target, req.body.len()))
            .header("Cache-Control", "no-store")
    })
}

fn echo_with(origin: &TestOrigin, extra: &str) -> EchoUnderTest {
    EchoUnderTest::with_config(config(&origin.url(), extra))
}

/// `n` pseudo-random bytes from a fixed-seed LCG (Knuth's MMIX constants).
fn lcg_bytes(seed: u64, n: usize) -> Vec<u8> {
    let mut state = seed;
    (0..n)
        .map(|_| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 33) as u8
        })
        .collect()
}

/// Asserts `client` gets a response with `status` that announces `connection: close`,
/// and that the connection then closes.
fn assert_refused_and_closed(client: &mut RawClient, status: u16, what: &str) {
    let resp = client
        .read_response(false)
        .unwrap_or_else(|e| panic!("{what}: no response: {e}"));
    assert_eq!(resp.status, status, "{what}: {}", resp.body_str());
    assert_eq!(resp.header("connection"), Some("close"), "{what}");
    assert!(
        client.closed_within(Duration::from_secs(3)),
        "{what}: connection not closed after the refusal"
    );
}

// ---------------------------------------------------------------------------------------
// Keep-alive, pipelining, persistence.

#[test]
fn twenty_keep_alive_connections_opened_at_once_are_all_served_twice() {
    let origin = describing_origin();
    let echo = echo_with(&origin, "");
    let mut clients: Vec<RawClient> = (0..20).map(|_| RawClient::connect(echo.addr)).collect();
    // Every request is on the wire before any response is read.
    for (i, c) in clients.iter_mut().enumerate() {
        c.send(&build_request("GET", &format!("/ka/{i}"), &[], b""));
    }
    for (i, c) in clients.iter_mut().enumerate() {
        let resp = c
            .read_response(false)
            .unwrap_or_else(|e| panic!("#{i}: {e}"));
        assert_eq!(resp.status, 200, "#{i}");
        assert_eq!(resp.body_str(), format!("GET /ka/{i} 0"));
        assert_ne!(resp.header("connection"), Some("close"), "#{i}");
    }
    assert_eq!(origin.total_hits(), 20);
    // Each connection carries a second request.
    for (i, c) in clients.iter_mut().enumerate() {
        let resp = c.get(&format!("/ka/{i}/again"), &[]);
        assert_eq!(resp.status, 200, "#{i}");
        assert_eq!(resp.body_str(), format!("GET /ka/{i}/again 0"));
    }
    assert_eq!(origin.total_hits(), 40);
    for i in 0..20 {
        assert_eq!(origin.hits(&format!("/ka/{i}")), 1, "#{i}");
        assert_eq!(origin.hits(&format!("/ka/{i}/again")), 1, "#{i}");
    }
}

#[test]
fn pipelined_requests_in_one_write_are_answered_in_order() {
    let origin = describing_origin();
    let echo = echo_with(&origin, "");
    let mut c = RawClient::connect(echo.addr);
    let mut wire = build_request("GET", "/pipe/1", &[], b"");
    wire.extend(build_request("POST", "/pipe/2", &[], b"hello"));
    wire.extend(build_request("GET", "/pipe/3", &[], b""));
    wire.extend(build_request("HEAD", "/pipe/4", &[], b""));
    wire.extend(build_request(
        "GET",
        "/pipe/5",
        &[("Connection", "close")],
        b"",
    ));
    c.send(&wire);
    let expected = [
        ("GET /pipe/1 0", false),
        ("POST /pipe/2 5", false),
        ("GET /pipe/3 0", false),
        ("", true),
        ("GET /pipe/5 0", false),
    ];
    for (i, (body, head)) in expected.iter().enumerate() {
        let resp = c
            .read_response(*head)
            .unwrap_or_else(|e| panic!("response {i}: {e}"));
        assert_eq!(resp.status, 200, "response {i}");
        assert_eq!(resp.body_str(), *body, "response {i}");
    }
    assert!(c.closed_within(Duration::from_secs(3)));
    let seen: Vec<(String, String, Vec<u8>)> = origin
        .requests()
        .into_iter()
        .map(|r| (r.method, r.target, r.body))
        .collect();
    let targets: Vec<&str> = seen.iter().map(|(_, t, _)| t.as_str()).collect();
    assert_eq!(
        targets,
        ["/pipe/1", "/pipe/2", "/pipe/3", "/pipe/4", "/pipe/5"],
        "{seen:?}"
    );
    assert_eq!(seen[1].0, "POST");
    assert_eq!(seen[1].2, b"hello");
}

#[test]
fn a_pipelined_burst_larger_than_the_connection_buffer_is_answered_in_order() {
    let origin = describing_origin();
    let echo = echo_with(&origin, "");
    let targets: Vec<String> = (0..1500).map(|i| format!("/burst/{i:04}")).collect();
    let wire: Vec<u8> = targets
        .iter()
        .flat_map(|t| build_request("GET", t, &[("X-Pad", &"p".repeat(100))], b""))
        .collect();
    assert!(
        wire.len() > 150 * 1024,
        "the burst must overflow Echo's buffer"
    );
    let mut c = RawClient::connect(echo.addr);
    // Write from another thread: Echo's answers fill our receive buffer meanwhile.
    let mut writer = c.writer();
    let sender = std::thread::spawn(move || writer.write_all(&wire));
    for (i, t) in targets.iter().enumerate() {
        let resp = c
            .read_response(false)
            .unwrap_or_else(|e| panic!("response {i}: {e}"));
        assert_eq!(resp.body_str(), format!("GET {t} 0"), "response {i}");
    }
    sender.join().expect("writer").expect("write the burst");
    assert_eq!(origin.total_hits(), targets.len());
}

#[test]
fn connection_close_from_the_client_closes_after_the_response() {
    let origin = describing_origin();
    let echo = echo_with(&origin, "");
    let mut c = RawClient::connect(echo.addr);
    let resp = c.get("/close", &[("Connection", "close")]);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("connection"), Some("close"));
    assert!(c.closed_within(Duration::from_secs(3)));
}

#[test]
fn http10_closes_unless_it_asks_for_keep_alive() {
    let origin = describing_origin();
    let echo = echo_with(&origin, "");

    let mut c = RawClient::connect(echo.addr);
    c.send(b"GET /ten HTTP/1.0\r\n\r\n");
    let resp = c.read_response(false).expect("HTTP/1.0 response");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body_str(), "GET /ten 0");
    assert_eq!(resp.header("connection"), Some("close"));
    assert!(c.closed_within(Duration::from_secs(3)));

    let mut c = RawClient::connect(echo.addr);
    for i in 0..2 {
        c.send(format!("GET /ten/ka/{i} HTTP/1.0\r\nConnection: keep-alive\r\n\r\n").as_bytes());
        let resp = c
            .read_response(false)
            .expect("HTTP/1.0 keep-alive response");
        assert_eq!(resp.status, 200);
        assert_eq!(resp.body_str(), format!("GET /ten/ka/{i} 0"));
        assert_eq!(resp.header("connection"), Some("keep-alive"));
        assert!(
            !c.closed_within(Duration::from_millis(200)),
            "keep-alive HTTP/1.0 connection closed after request {i}"
        );
    }
    assert_eq!(origin.total_hits(), 3);
}

#[test]
fn expect_100_continue_gets_an_interim_response_then_the_final_one() {
    let origin = describing_origin();
    let echo = echo_with(&origin, "");
    let mut c = RawClient::connect(echo.addr);
    let body = lcg_bytes(7, 10_000);
    c.send(
        format!(
            "PUT /upload HTTP/1.1\r\nHost: t\r\nExpect: 100-continue\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .as_bytes(),
    );
    // The body is not sent until Echo says so.
    let interim = c.read_response(false).expect("100 Continue");
    assert_eq!(interim.status, 100, "{}", interim.raw_head);
    assert!(interim.raw_head.starts_with("HTTP/1.1 100 Continue\r\n"));
    c.send(&body);
    let resp = c.read_response(false).expect("final response");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body_str(), format!("PUT /upload {}", body.len()));
    let got = origin.last_request().expect("origin request");
    assert_eq!(got.method, "PUT");
    assert!(got.body == body, "the origin received a different body");
    // The origin is not asked for 100 Continue itself: Expect is Echo's to answer.
    assert_eq!(got.header("expect"), None);
    // And the connection carries on.
    assert_eq!(c.get("/after", &[]).body_str(), "GET /after 0");
}

#[test]
fn head_responses_have_no_body_and_the_connection_stays_usable() {
    let origin = TestOrigin::start(|req| {
        let body = format!("body of {}", req.target).repeat(100);
        let resp = OriginResponse::ok(body).header("Cache-Control", "no-store");
        if req.target.starts_with("/chunked") {
            resp.chunked()
        } else {
            resp
        }
    });
    let echo = echo_with(&origin, "");
    let mut c = RawClient::connect(echo.addr);
    for target in ["/length", "/chunked"] {
        let head = c.request("HEAD", target, &[], b"");
        assert_eq!(head.status, 200, "{target}");
        assert!(head.body.is_empty());
        // Any body bytes after the HEAD response would be read as the next status line.
        let get = c.get(target, &[]);
        assert_eq!(get.status, 200, "{target}");
        assert_eq!(get.body_str(), format!("body of {target}").repeat(100));
        if target == "/length" {
            let announced = head.header("content-length");
            assert_eq!(announced, Some(get.body.len().to_string().as_str()));
        }
    }
    assert!(c.buffered().is_empty());
}

// ---------------------------------------------------------------------------------------
// Large bodies.

const TWO_MB: usize = 2 * 1024 * 1024;

/// `body` in chunked coding, with chunks of varying sizes and one chunk extension.
fn chunked(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(body.len() + 16 * 1024);
    let mut rest = body;
    let mut size = 1;
    while !rest.is_empty() {
        let n = size.min(rest.len());
        let ext = if size == 1 { ";x=1" } else { "" };
        out.extend(format!("{n:x}{ext}\r\n").as_bytes());
        out.extend(&rest[..n]);
        out.extend(b"\r\n");
        rest = &rest[n..];
        size = size * 7 % 65_521 + 1;
    }
    out.extend(b"0\r\n\r\n");
    out
}

#[test]
fn two_megabyte_request_bodies_reach_the_origin_intact() {
    let origin = describing_origin();
    let echo = echo_with(&origin, "");
    let body = lcg_bytes(42, TWO_MB);
    let mut c = RawClient::connect(echo.addr);

    let resp = c.request("POST", "/upload/length", &[], &body);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body_str(), format!("POST /upload/length {TWO_MB}"));

    let mut wire = build_request(
        "POST",
        "/upload/chunked",
        &[("Transfer-Encoding", "chunked")],
        b"",
    );
    wire.extend(chunked(&body));
    c.send(&wire);
    let resp = c.read_response(false).expect("chunked upload response");
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body_str(), format!("POST /upload/chunked {TWO_MB}"));

    let requests = origin.requests();
    assert_eq!(requests.len(), 2);
    for r in &requests {
        assert!(r.body == body, "{}: body differs at the origin", r.target);
    }
}

#[test]
fn two_megabyte_response_bodies_reach_the_client_intact() {
    let body = lcg_bytes(99, TWO_MB);
    let origin_body = body.clone();
    let origin = TestOrigin::start(move |req| {
        let cache_control = if req.target.contains("cached") {
            "public, max-age=600"
        } else {
            "no-store"
        };
        let resp = OriginResponse::ok(origin_body.clone()).header("Cache-Control", cache_control);
        if req.target.contains("chunked") {
            resp.chunked()
        } else {
            resp
        }
    });
    let echo = echo_with(&origin, "");
    let mut c = RawClient::connect(echo.addr);
    for target in ["/big/length", "/big/chunked"] {
        for round in 0..2 {
            let resp = c.get(target, &[]);
            assert_eq!(resp.status, 200, "{target}");
            assert!(resp.body == body, "{target} #{round}: body differs");
        }
        assert_eq!(origin.hits(target), 2, "{target} is not cacheable");
    }
    for target in ["/big/length/cached", "/big/chunked/cached"] {
        let first = c.get(target, &[]);
        assert_eq!(first.status, 200, "{target}");
        assert!(first.body == body, "{target}: body differs");
        assert_eq!(first.header("x-cache-status"), Some("MISS"), "{target}");
        let second = c.get(target, &[]);
        assert_eq!(second.header("x-cache-status"), Some("HIT"), "{target}");
        assert!(second.body == body, "{target}: stored body differs");
        assert_eq!(origin.hits(target), 1, "{target}");
    }
}

// ---------------------------------------------------------------------------------------
// Slow, half-sent and idle clients.

#[test]
fn half_sent_requests_do_not_delay_other_clients() {
    let origin = describing_origin();
    // One worker: if a half-sent request held it, nobody else would be served.
    let echo = echo_with(&origin, "[server]\nworkers = 1\n");
    let mut half_heads: Vec<RawClient> = (0..4)
        .map(|i| {
            let mut c = RawClient::connect(echo.addr);
            c.send(format!("GET /slow/{i} HTTP/1.1\r\nHost: te").as_bytes());
            c
        })
        .collect();
    let mut half_body = RawClient::connect(echo.addr);
    half_body.send(b"POST /slow-body HTTP/1.1\r\nHost: t\r\nContent-Length: 100\r\n\r\nabc");

    for i in 0..3 {
        let started = Instant::now();
        let mut fast = RawClient::connect(echo.addr);
        fast.set_read_timeout(Duration::from_secs(2));
        fast.send(&build_request("GET", &format!("/fast/{i}"), &[], b""));
        let resp = fast
            .read_response(false)
            .unwrap_or_else(|e| panic!("fast client #{i} not served: {e}"));
        assert_eq!(resp.body_str(), format!("GET /fast/{i} 0"));
        // Latency is the point ("do not delay"): a few ms expected.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "fast client #{i} waited"
        );
    }
    for (i, c) in half_heads.iter_mut().enumerate() {
        assert!(!c.closed_within(Duration::from_millis(20)), "slow #{i}");
        assert!(c.buffered().is_empty(), "slow #{i} got an answer");
    }
    assert_eq!(origin.total_hits(), 3);

    // The slow ones finish and are served normally.
    half_body.send(&[b'x'; 97]);
    let resp = half_body.read_response(false).expect("half body finished");
    assert_eq!(resp.body_str(), "POST /slow-body 100");
    for (i, c) in half_heads.iter_mut().enumerate() {
        c.send(b"st.local\r\n\r\n");
        let resp = c.read_response(false).expect("half head finished");
        assert_eq!(resp.body_str(), format!("GET /slow/{i} 0"));
    }
}

#[test]
fn a_head_not_received_within_the_header_timeout_gets_408_and_is_closed() {
    let origin = describing_origin();
    let echo = echo_with(&origin, "[server]\nheader_timeout_ms = 300\n");

    let started = Instant::now();
    let mut c = RawClient::connect(echo.addr);
    c.send(b"GET /half HTTP/1.1\r\nHost: te");
    assert_refused_and_closed(&mut c, 408, "half-sent head");
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(250),
        "408 too early: {elapsed:?}"
    );

    // A client that trickles its head a byte at a time is cut off just the same: at the
    // 300 ms header timeout, so well within 3 s (the whole trickle would take about 5 s).
    let started = Instant::now();
    let mut c = RawClient::connect(echo.addr);
    let head = build_request("GET", "/trickle", &[("X-Pad", &"p".repeat(200))], b"");
    for b in &head[..head.len() - 2] {
        // Stop once Echo has answered or closed.
        if c.try_send(&[*b]).is_err()
            || c.closed_within(Duration::from_millis(20))
            || !c.buffered().is_empty()
        {
            break;
        }
        assert!(
            started.elapsed() < Duration::from_secs(3),
            "trickling never cut off"
        );
    }
    assert_refused_and_closed(&mut c, 408, "trickled head");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert_eq!(origin.total_hits(), 0);
}

#[test]
fn idle_keep_alive_connections_are_closed_after_the_idle_timeout() {
    let origin = describing_origin();
    let echo = echo_with(&origin, "[server]\nidle_timeout_ms = 300\n");
    let mut c = RawClient::connect(echo.addr);
    assert_eq!(c.get("/a", &[]).status, 200);
    let started = Instant::now();
    assert!(
        c.closed_within(Duration::from_secs(3)),
        "idle connection not closed"
    );
    let elapsed = started.elapsed();
    assert!(
        elapsed >= Duration::from_millis(200),
        "closed too early: {elapsed:?}"
    );

    // A connection that never sends anything is idle too.
    let mut silent = RawClient::connect(echo.addr);
    assert!(silent.closed_within(Duration::from_secs(3)));
    assert!(silent.buffered().is_empty(), "an idle close sends nothing");
    wait_until("every connection is gone", Duration::from_secs(3), || {
        echo.echo.proxy.open_connections() == 0
    });
}

// ---------------------------------------------------------------------------------------
// Framing violations and header bombs: refused, closed, never forwarded.

/// Refusals decided from the head alone: nothing may reach the origin.
const HEAD_VIOLATIONS: &[(&str, &[u8], u16)] = &[
    (
        "Content-Length and Transfer-Encoding",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "space before the colon",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding : chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "chunked, identity",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked, identity\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "gzip, chunked",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: gzip, chunked\r\n\r\n0\r\n\r\n",
        501,
    ),
    (
        "xchunked",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: xchunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "chunked twice on two lines",
        b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    (
        "duplicate Content-Length",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 1\r\n\r\nx",
        400,
    ),
    (
        "Content-Length list",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1, 1\r\n\r\nx",
        400,
    ),
    (
        "negative Content-Length",
        b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: -1\r\n\r\nx",
        400,
    ),
    (
        "obs-fold",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\r\n b\r\n\r\n",
        400,
    ),
    (
        "obs-fold with a tab",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\r\n\tb\r\n\r\n",
        400,
    ),
    ("bare LF", b"GET / HTTP/1.1\nHost: a\n\n", 400),
    (
        "bare LF after one CRLF line",
        b"GET / HTTP/1.1\r\nHost: a\nX-A: b\r\n\r\n",
        400,
    ),
    (
        "vertical tab in a value",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x0bb\r\n\r\n",
        400,
    ),
    (
        "NUL in a value",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\x00b\r\n\r\n",
        400,
    ),
    (
        "bare CR in a value",
        b"GET / HTTP/1.1\r\nHost: a\r\nX-A: a\rb\r\n\r\n",
        400,
    ),
    (
        "HTTP/1.0 with chunked",
        b"POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n",
        400,
    ),
    ("no Host in HTTP/1.1", b"GET / HTTP/1.1\r\n\r\n", 400),
    (
        "two Host fields",
        b"GET / HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n",
        400,
    ),
    ("HTTP/2 request line", b"GET / HTTP/2.0\r\nHost: a\r\n\r\n", 505),
];

#[test]
fn framing_violations_in_the_head_are_refused_closed_and_not_forwarded() {
    let origin = describing_origin();
    let echo = echo_with(&origin, "");
    for (what, wire, status) in HEAD_VIOLATIONS {
        let mut c = RawClient::connect(echo.addr);
        c.set_read_timeout(Duration::from_secs(5));
        c.send(wire);
        assert_refused_and_closed(&mut c, *status, what);
    }
    assert_eq!(origin.total_hits(), 0, "{:?}", origin.requests());
    assert_eq!(origin.connections(), 0, "Echo opened an origin connection");
    // Echo itself is fine.
    assert_eq!(RawClient::connect(echo.addr).get("/ok", &[]).status, 200);
}

#[test]
fn malformed_chunked_bodies_are_refused_and_never_complete_at_the_origin() {
    let origin = describing_origin();
    let echo = echo_with(&origin, "[server]\nmax_body_bytes = 1000\n");
    let head = "POST /chunks HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n";
    let cases: &[(&str, &str, u16)] = &[
        (
            "chunk-size overflow",
            "fffffffffffffffffff\r\nabc\r\n0\r\n\r\n",
            400,
        ),
        ("bad chunk data terminator", "5\r\nhelloXX0\r\n\r\n", 400),
        (
            "chunk data longer than its size",
            "3\r\nhello\r\n0\r\n\r\n",
            400,
        ),
        ("no chunk size", "\r\nhello\r\n0\r\n\r\n", 400),
        ("non-hex chunk size", "5g\r\nhello\r\n0\r\n\r\n", 400),
        ("bare LF after the chunk size", "5\nhello\r\n0\r\n\r\n", 400),
        (
            "malformed trailer",
            "5\r\nhello\r\n0\r\nno colon\r\n\r\n",
            400,
        ),
        ("chunks over max_body_bytes", "3e9\r\n", 413),
    ];
    for (what, body, status) in cases {
        let mut c = RawClient::connect(echo.addr);
        c.set_read_timeout(Duration::from_secs(5));
        let mut wire = head.as_bytes().to_vec();
        wire.extend(body.as_bytes());
        if *status == 413 {
            // The declared chunk is over the limit on its own; its bytes follow.
            wire.extend(&[b'z'; 1001]);
            wire.extend(b"\r\n0\r\n\r\n");
        }
        c.send(&wire);
        assert_refused_and_closed(&mut c, *status, what);
    }
    // The origin may have seen a request begin, but never a complete one.
    assert_eq!(origin.total_hits(), 0, "{:?}", origin.requests());

    // The same path with a valid body does reach the origin, so the count above means
    // something.
    let mut c = RawClient::connect(echo.addr);
    c.send(format!("{head}5\r\nhello\r\n0\r\n\r\n").as_bytes());
    assert_eq!(c.read_response(false).unwrap().body_str(), "POST /chunks 5");
    assert_eq!(origin.total_hits(), 1);
}

#[test]
fn request_bodies_cut_short_by_the_client_never_complete_at_the_origin() {
    let origin = describing_origin();
    let echo = echo_with(&origin, "");
    let cases: [(&str, Vec<u8>); 3] = [
        (
            "small Content-Length body",
            [
                b"POST /cut HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n".as_slice(),
                &[b'c'; 60],
            ]
            .concat(),
        ),
        (
            "large Content-Length body",
            [
                b"POST /cut HTTP/1.1\r\nHost: a\r\nContent-Length: 500000\r\n\r\n".as_slice(),
                &[b'c'; 300_000],
            ]
            .concat(),
        ),
        (
            "chunked body",
            [
                b"POST /cut HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n".as_slice(),
                b"10000\r\n",
                &[b'c'; 30_000],
            ]
            .concat(),
        ),
    ];
    for (what, wire) in &cases {
        let mut c = RawClient::connect(echo.addr);
        c.set_read_timeout(Duration::from_secs(5));
        c.send(wire);
        c.shutdown_write();
        // No complete response can be owed for an incomplete request: Echo closes.
        let rest = c.read_to_close();
        assert!(
            !String::from_utf8_lossy(&rest).starts_with("HTTP/1.1 200"),
            "{what}: answered as if complete"
        );
    }
    // Whatever reached the origin was cut short there too: once the connections Echo
    // opened for it are gone, nothing more can complete.
    wait_until(
        "Echo's origin connections close",
        Duration::from_secs(5),
        || origin.open_connections() == 0,
    );
    assert_eq!(origin.total_hits(), 0, "{:?}", origin.requests());
    assert_eq!(RawClient::connect(echo.addr).get("/ok", &[]).status, 200);
}

/// A request and the client's close arriving together (edge-triggered readiness reports
/// both at once, and a read returns the bytes before it returns the end): a hundred
/// keep-alive clients each send a head, part of its body and their FIN in one go, and
/// every one is answered and closed at once, not at the body deadline.
#[test]
fn a_close_that_arrives_with_the_last_bytes_is_seen_at_once() {
    let origin = describing_origin();
    let echo = echo_with(&origin, "");
    let wire = [
        b"POST /cut HTTP/1.1\r\nHost: a\r\nContent-Length: 100\r\n\r\n".as_slice(),
        &[b'c'; 60],
    ]
    .concat();
    // Each connection first carries a request, so Echo is waiting on it when the bytes
    // and the close arrive (a new connection is read once when it is accepted).
    let mut clients: Vec<RawClient> = (0..100)
        .map(|_| {
            let mut c = RawClient::connect(echo.addr);
            c.set_read_timeout(Duration::from_secs(5));
            assert_eq!(c.get("/ok", &[]).status, 200);
            c
        })
        .collect();
    for c in &mut clients {
        c.send(&wire);
        c.shutdown_write();
    }
    for mut c in clients {
        let rest = c.read_to_close();
        assert!(
            !String::from_utf8_lossy(&rest).starts_with("HTTP/1.1 200"),
            "answered as if complete"
        );
    }
    let posts = origin
        .requests()
        .iter()
        .filter(|r| r.method == "POST")
        .count();
    assert_eq!(posts, 0, "an incomplete body reached the origin");
}

#[test]
fn a_bad_chunk_followed_by_more_data_still_gets_its_400() {
    // The client is still sending when Echo refuses and closes: the 400 must reach it
    // all the same, and Echo must not wait for the rest of the body.
    let origin = describing_origin();
    let echo = echo_with(&origin, "");
    for round in 0..5 {
        let mut c = RawClient::connect(echo.addr);
        let mut wire =
            b"POST /chunks HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhelloXX"
                .to_vec();
        wire.extend(&[b'y'; 200 * 1024]);
        // Echo may stop reading and close while this is still being written.
        let _ = c.try_send(&wire);
        let resp = c
            .read_response(false)
            .unwrap_or_else(|e| panic!("round {round}: 400 lost: {e}"));
        assert_eq!(resp.status, 400, "round {round}");
        assert_eq!(resp.header("connection"), Some("close"));
    }
    assert_eq!(origin.total_hits(), 0);
}

#[test]
fn header_bombs_are_refused_closed_and_not_forwarded() {
    let origin = describing_origin();
    let echo = echo_with(&origin, "[server]\nmax_body_bytes = 1000\n");
    let big_field = build_request("GET", "/", &[("X-Big", &"b".repeat(40 * 1024))], b"");
    let many: Vec<(String, String)> = (0..300)
        .map(|i| (format!("X-F{i}"), "v".to_string()))
        .collect();
    let many: Vec<(&str, &str)> = many.iter().map(|(n, v)| (n.as_str(), v.as_str())).collect();
    let many_fields = build_request("GET", "/", &many, b"");
    let long_target = build_request("GET", &format!("/{}", "t".repeat(10 * 1024)), &[], b"");
    let big_body = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1001\r\n\r\nabc".to_vec();
    let big_body_continue =
        b"PUT / HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 5000\r\n\r\n"
            .to_vec();
    let cases: [(&str, Vec<u8>, u16); 5] = [
        ("a 40 KB header field", big_field, 431),
        ("300 header fields", many_fields, 431),
        ("a 10 KB request-target", long_target, 414),
        ("Content-Length over max_body_bytes", big_body, 413),
        ("the same, waiting for 100 Continue", big_body_continue, 413),
    ];
    for (what, wire, status) in &cases {
        let mut c = RawClient::connect(echo.addr);
        c.set_read_timeout(Duration::from_secs(5));
        c.send(wire);
        assert_refused_and_closed(&mut c, *status, what);
    }
    assert_eq!(origin.total_hits(), 0);
    assert_eq!(origin.connections(), 0);
}

#[test]
fn random_garbage_is_refused_and_echo_serves_the_next_client() {
    let origin = describing_origin();
    let echo = echo_with(&origin, "[server]\nheader_timeout_ms = 2000\n");
    for seed in 1..=8u64 {
        let mut garbage = lcg_bytes(seed, 4096);
        if seed % 2 == 0 {
            // Half the rounds start like a request, so the parser gets past the method.
            garbage.splice(0..0, b"GET /".iter().copied());
        }
        let mut c = RawClient::connect(echo.addr);
        c.set_read_timeout(Duration::from_secs(5));
        let _ = c.try_send(&garbage);
        match c.read_response(false) {
            Ok(resp) => {
                assert!(
                    (400..500).contains(&resp.status) || resp.status == 505,
                    "seed {seed}: {}",
                    resp.status
                );
                assert!(c.closed_within(Duration::from_secs(3)), "seed {seed}");
            }
            Err(e) => assert!(!e.starts_with("timeout"), "seed {seed}: hung: {e}"),
        }
        let resp = RawClient::connect(echo.addr).get("/next", &[]);
        assert_eq!(resp.status, 200, "seed {seed}");
    }
    assert_eq!(origin.total_hits(), 8);
}

// ---------------------------------------------------------------------------------------
// Connection limits.

#[test]
fn connections_over_max_connections_get_503_and_are_closed() {
    let origin = describing_origin();
    let echo = echo_with(&origin, "[server]\nmax_connections = 2\n");
    let mut a = RawClient::connect(echo.addr);
    let mut b = RawClient::connect(echo.addr);
    assert_eq!(a.get("/a", &[]).status, 200);
    assert_eq!(b.get("/b", &[]).status, 200);

    // A third client that sends its request straight away, as real clients do.
    for round in 0..3 {
        let mut c = RawClient::connect(echo.addr);
        c.set_read_timeout(Duration::from_secs(5));
        c.send(&build_request("GET", "/c", &[], b""));
        let resp = c
            .read_response(false)
            .unwrap_or_else(|e| panic!("round {round}: no 503: {e}"));
        assert_eq!(resp.status, 503, "round {round}");
        assert_eq!(resp.header("connection"), Some("close"));
        assert_eq!(resp.header("retry-after"), Some("1"));
        assert!(c.closed_within(Duration::from_secs(3)), "round {round}");
    }
    assert_eq!(origin.hits("/c"), 0);

    drop(a);
    wait_until(
        "the closed connection is released",
        Duration::from_secs(5),
        || echo.echo.proxy.open_connections() == 1,
    );
    let mut d = RawClient::connect(echo.addr);
    assert_eq!(d.get("/d", &[]).status, 200);
    // The survivor still works.
    assert_eq!(b.get("/b2", &[]).status, 200);
}

#[test]
fn two_hundred_connections_opened_and_closed_without_a_request_are_survived() {
    let origin = describing_origin();
    let echo = echo_with(&origin, "");
    for i in 0..200 {
        let mut stream = TcpStream::connect(echo.addr).unwrap_or_else(|e| panic!("#{i}: {e}"));
        if i % 4 == 0 {
            // Some leave a head unfinished behind them.
            let _ = stream.write_all(b"GET / HT");
        }
        drop(stream);
    }
    wait_until(
        "all 200 connections are released",
        Duration::from_secs(10),
        || echo.echo.proxy.open_connections() == 0,
    );
    let resp = RawClient::connect(echo.addr).get("/still-here", &[]);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body_str(), "GET /still-here 0");
    assert_eq!(origin.total_hits(), 1);
}

// ---------------------------------------------------------------------------------------
// Connection persistence details.

#[test]
fn an_empty_line_between_requests_does_not_start_the_header_timeout() {
    // Regression: a stray CRLF started the header timeout on an idle connection.
    // RFC 9112 §2.2: a server SHOULD ignore at least one empty line before a
    // request-line (some clients send CRLF after a POST body). An idle keep-alive
    // connection must then be closed quietly at the idle timeout, never answered 408:
    // a 408 on an idle connection races the client's next request and is taken for
    // its answer.
    let origin = describing_origin();
    let echo = echo_with(
        &origin,
        "[server]\nheader_timeout_ms = 200\nidle_timeout_ms = 1500\n",
    );
    let mut c = RawClient::connect(echo.addr);
    let mut wire = build_request("POST", "/form", &[], b"a=1");
    wire.extend(b"\r\n");
    c.send(&wire);
    assert_eq!(c.read_response(false).unwrap().body_str(), "POST /form 3");
    // Past the header timeout, the connection is still usable...
    assert!(
        !c.closed_within(Duration::from_millis(600)),
        "closed before the idle timeout"
    );
    assert!(
        c.buffered().is_empty(),
        "answered an empty line: {}",
        String::from_utf8_lossy(c.buffered())
    );
    assert_eq!(c.get("/next", &[]).body_str(), "GET /next 0");

    // ...and a stray CRLF on its own, after a response, is ignored the same way.
    c.send(b"\r\n");
    assert!(c.closed_within(Duration::from_secs(5)), "never closed");
    assert!(
        c.buffered().is_empty(),
        "answered an empty line: {}",
        String::from_utf8_lossy(c.buffered())
    );
}

#[test]
fn a_body_on_a_get_is_never_read_as_the_next_request() {
    let origin = describing_origin();
    let echo = echo_with(&origin, "");
    let mut c = RawClient::connect(echo.addr);
    let hidden = build_request("GET", "/smuggled", &[], b"");
    let mut wire = build_request("GET", "/first", &[], &hidden);
    wire.extend(build_request("GET", "/second", &[], b""));
    c.send(&wire);
    assert_eq!(c.read_response(false).unwrap().body_str(), "GET /first 0");
    assert_eq!(c.read_response(false).unwrap().body_str(), "GET /second 0");
    assert_eq!(origin.hits("/smuggled"), 0);
    assert_eq!(origin.total_hits(), 2);
}

#[test]
fn a_client_that_half_closes_after_its_request_still_gets_the_response() {
    let origin = describing_origin();
    let echo = echo_with(&origin, "");
    let mut c = RawClient::connect(echo.addr);
    let mut wire = build_request("GET", "/one", &[], b"");
    wire.extend(build_request("POST", "/two", &[], b"xyz"));
    c.send(&wire);
    c.shutdown_write();
    assert_eq!(c.read_response(false).unwrap().body_str(), "GET /one 0");
    assert_eq!(c.read_response(false).unwrap().body_str(), "POST /two 3");
    assert!(c.closed_within(Duration::from_secs(3)));
}

#[test]
fn an_http10_client_gets_a_close_delimited_body_when_the_length_is_unknown() {
    let origin = TestOrigin::start(|req| {
        OriginResponse::ok(format!("chunked from the origin for {}", req.target))
            .header("Cache-Control", "no-store")
            .chunked()
    });
    let echo = echo_with(&origin, "");
    let mut c = RawClient::connect(echo.addr);
    c.send(b"GET /ten HTTP/1.0\r\nConnection: keep-alive\r\n\r\n");
    let resp = c.read_response(false).expect("HTTP/1.0 response");
    assert_eq!(resp.status, 200);
    assert!(!resp.chunked, "chunked sent to an HTTP/1.0 client");
    assert_eq!(resp.header("transfer-encoding"), None);
    assert_eq!(resp.header("connection"), Some("close"));
    assert_eq!(resp.body_str(), "chunked from the origin for /ten");
}

// ---------------------------------------------------------------------------------------
// Back-pressure.

#[test]
fn a_full_worker_queue_answers_503_instead_of_waiting() {
    // The origin holds the slow requests until the test releases them, so the only worker
    // stays busy for as long as the test needs, however loaded the machine is.
    let gate = Gate::new();
    let held = gate.hold();
    let origin = TestOrigin::start(move |req| {
        if req.target.starts_with("/slow") {
            held.wait(Duration::from_secs(10));
        }
        OriginResponse::ok(format!("GET {}", req.target)).header("Cache-Control", "no-store")
    });
    let echo = echo_with(
        &origin,
        "[server]\nworkers = 1\nfetch_workers = 1\nfetch_queue = 1\n",
    );
    let mut busy = RawClient::connect(echo.addr);
    busy.send(&build_request("GET", "/slow/busy", &[], b""));
    wait_until(
        "the only worker is at the origin",
        Duration::from_secs(5),
        || origin.total_hits() == 1,
    );
    // One of these two waits in the queue; the other finds it full and gets a 503 while
    // the worker is still held.
    let (tx, rx) = std::sync::mpsc::channel();
    for target in ["/slow/b", "/slow/c"] {
        let tx = tx.clone();
        let addr = echo.addr;
        std::thread::spawn(move || {
            let mut client = RawClient::connect(addr);
            client.send(&build_request("GET", target, &[], b""));
            let _ = tx.send(client.read_response(false));
        });
    }
    let first = rx
        .recv_timeout(Duration::from_secs(5))
        .expect("an answer while the worker is busy")
        .expect("a response");
    assert_eq!(first.status, 503, "{first:?}");
    assert_eq!(first.header("retry-after"), Some("1"));
    assert_eq!(first.header("connection"), Some("close"));
    gate.open();
    let second = rx
        .recv_timeout(Duration::from_secs(10))
        .expect("the queued request is answered")
        .expect("a response");
    assert_eq!(second.status, 200, "{second:?}");
    assert_eq!(busy.read_response(false).unwrap().status, 200);
    assert_eq!(origin.total_hits(), 2);
}

// ---------------------------------------------------------------------------------------
// The server with a handler of the test's own: what it does for any handler.

mod any_handler {
    use std::io::Read;
    use std::net::TcpListener;
    use std::sync::Arc;
    use std::time::Duration;

    use echo::config::ServerConfig;
    use echo::http::exchange::Exchange;
    use echo::http::handler::{Handler, Step};
    use echo::server::{self, ServerHandle};

    use crate::support::client::build_request;
    use crate::support::RawClient;

    /// `/panic` panics, `/silent` returns without a response, `/read` reads the body,
    /// anything else answers without reading it.
    struct Quirky;

    impl Handler for Quirky {
        type Job = std::convert::Infallible;

        fn handle(&self, ex: &mut Exchange<'_>) -> Step<Self::Job> {
            let target = ex.req.target.clone();
            let mut body = Vec::new();
            match target.as_str() {
                "/panic" => panic!("the test handler panics on purpose"),
                "/silent" => return Step::Answered,
                "/read" if ex.body().read_to_end(&mut body).is_err() => {
                    ex.respond_error(400, "bad body", true);
                    return Step::Answered;
                }
                _ => {}
            }
            let text = format!("{} {} {}", ex.req.method, target, body.len());
            let _ = ex.respond(200, &[], text.as_bytes());
            Step::Answered
        }

        fn fetch(&self, _: &mut Exchange<'_>, job: Self::Job) {
            match job {}
        }
    }

    fn start() -> ServerHandle {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind");
        let cfg = ServerConfig {
            workers: 1,
            ..ServerConfig::default()
        };
        server::start("quirky", vec![listener.into()], cfg, Arc::new(Quirky)).expect("start")
    }

    #[test]
    fn a_panicking_or_silent_handler_answers_500_and_the_worker_lives_on() {
        let server = start();
        for target in ["/panic", "/silent", "/panic"] {
            let mut c = RawClient::connect(server.local_addr());
            let resp = c.get(target, &[]);
            assert_eq!(resp.status, 500, "{target}");
            assert_eq!(resp.header("connection"), Some("close"), "{target}");
            assert!(c.closed_within(Duration::from_secs(3)), "{target}");
            // One worker: it survived if this is answered.
            let ok = RawClient::connect(server.local_addr()).get("/ok", &[]);
            assert_eq!(ok.body_str(), "GET /ok 0", "after {target}");
        }
    }

    #[test]
    fn an_unread_small_body_is_drained_and_an_unread_large_one_closes() {
        let server = start();
        let mut c = RawClient::connect(server.local_addr());
        let hidden = build_request("GET", "/hidden", &[], b"");
        let mut wire = build_request("POST", "/ignore", &[], &hidden);
        wire.extend(build_request("POST", "/read", &[], b"12345"));
        c.send(&wire);
        assert_eq!(c.read_response(false).unwrap().body_str(), "POST /ignore 0");
        assert_eq!(c.read_response(false).unwrap().body_str(), "POST /read 5");

        // Too much to drain: the response says close, and the connection closes.
        let mut c = RawClient::connect(server.local_addr());
        let mut wire =
            b"POST /ignore HTTP/1.1\r\nHost: a\r\nContent-Length: 1048576\r\n\r\n".to_vec();
        wire.extend(&[b'b'; 100 * 1024]);
        c.send(&wire);
        let resp = c.read_response(false).unwrap();
        assert_eq!(resp.body_str(), "POST /ignore 0");
        assert_eq!(resp.header("connection"), Some("close"));
        assert!(c.closed_within(Duration::from_secs(3)));
    }

    #[test]
    fn an_unread_body_behind_100_continue_is_never_asked_for() {
        let server = start();
        let mut c = RawClient::connect(server.local_addr());
        c.send(b"PUT /ignore HTTP/1.1\r\nHost: a\r\nExpect: 100-continue\r\nContent-Length: 10\r\n\r\n");
        let resp = c.read_response(false).unwrap();
        assert_eq!(
            resp.status, 200,
            "got {} before the final response",
            resp.status
        );
        assert_eq!(resp.header("connection"), Some("close"));
        assert!(c.closed_within(Duration::from_secs(3)));
    }
}

/// Found by fuzzing: a chunked body whose first chunk is past the body limit is refused
/// at once (413), not pre-read until the body deadline; a chunk line longer than the
/// decoder takes, sent without its end, is refused at once too (400). Echo's body
/// deadline here is far longer than the client waits.
#[test]
fn oversized_chunks_and_endless_chunk_lines_are_refused_at_once() {
    let origin = TestOrigin::start(|_| OriginResponse::ok("posted"));
    let echo = EchoUnderTest::with_config(config(
        &origin.url(),
        "[server]\nbody_timeout_ms = 60000\nmax_body_bytes = 1048576\n",
    ));
    let head = b"POST /up HTTP/1.1\r\nHost: h\r\nTransfer-Encoding: chunked\r\n\r\n";
    let mut endless = b"1;".to_vec();
    endless.extend(std::iter::repeat_n(b'x', 5000));
    for (body, want) in [(&b"100001\r\n"[..], 413), (&endless[..], 400)] {
        let mut c = RawClient::connect(echo.addr);
        c.set_read_timeout(Duration::from_secs(5));
        let started = Instant::now();
        let resp = c
            .read_response_after(&[&head[..], body].concat())
            .expect("an answer before the client gives up");
        assert_eq!(resp.status, want, "{}", resp.raw_head);
        assert!(started.elapsed() < Duration::from_secs(5));
    }
    assert_eq!(origin.hits("/up"), 0);
}
