//! Passthrough: what Echo sends to the origin and what it passes back, byte for byte,
//! and how it fails when the origin does.

use std::time::{Duration, Instant};

use crate::support::client::{self, RawClient};
use crate::support::echo::{config, EchoUnderTest};
use crate::support::{dead_origin_url, wait_until, Gate, OriginResponse, TestOrigin};

#[test]
fn requests_reach_the_origin_with_proxy_fields_and_without_hop_by_hop_ones() {
    let origin = TestOrigin::start(|_| OriginResponse::ok("x").header("Cache-Control", "no-store"));
    let echo = EchoUnderTest::start(&origin.url());
    let resp = client::get(
        echo.addr,
        "/path?q=1",
        &[
            ("Connection", "X-Drop-Me"),
            ("X-Drop-Me", "secret"),
            ("Keep-Alive", "timeout=5"),
            ("TE", "trailers"),
            ("X-Forwarded-For", "10.9.8.7"),
            ("X-Forwarded-Host", "evil.example"),
            ("X-Forwarded-Proto", "https"),
            ("X-Custom", "a"),
            ("X-Custom", "b"),
        ],
    );
    assert_eq!(resp.status, 200);
    let seen = origin.last_request().expect("the origin saw the request");
    assert_eq!(seen.target, "/path?q=1");
    assert_eq!(
        seen.header("host"),
        Some(origin.addr().to_string().as_str())
    );
    for gone in ["x-drop-me", "keep-alive", "te", "connection"] {
        assert_eq!(seen.header(gone), None, "{gone} was forwarded");
    }
    assert_eq!(seen.header_all("x-custom"), vec!["a", "b"]);
    assert_eq!(seen.header("via"), Some("1.1 echo"));
    assert_eq!(seen.header("x-forwarded-for"), Some("10.9.8.7, 127.0.0.1"));
    // The client's own X-Forwarded-Host/-Proto are replaced, never passed on.
    assert_eq!(seen.header("x-forwarded-host"), Some("test.local"));
    assert_eq!(seen.header("x-forwarded-proto"), Some("http"));
    assert_eq!(seen.header("user-agent"), None, "no User-Agent invented");
}

#[test]
fn responses_keep_status_repeated_fields_and_bytes_and_lose_hop_by_hop_fields() {
    let body: Vec<u8> = (0..=255u8).cycle().take(10_000).collect();
    let expected = body.clone();
    let origin = TestOrigin::start(move |_| {
        OriginResponse::ok(body.clone())
            .with_status(201)
            .header("Set-Cookie", "a=1; Path=/")
            .header("Set-Cookie", "b=2; Path=/")
            .header("Content-Encoding", "gzip")
            .header("Connection", "X-Hop")
            .header("X-Hop", "1")
            .header("Keep-Alive", "timeout=3")
    });
    let echo = EchoUnderTest::start(&origin.url());
    let resp = client::get(echo.addr, "/bytes", &[]);
    assert_eq!(resp.status, 201);
    assert_eq!(resp.body, expected, "body changed in transit");
    assert_eq!(
        resp.header_all("set-cookie"),
        vec!["a=1; Path=/", "b=2; Path=/"]
    );
    assert_eq!(
        resp.header("content-encoding"),
        Some("gzip"),
        "no decompression"
    );
    assert_eq!(resp.header("x-hop"), None);
    assert_eq!(resp.header("keep-alive"), None);
    assert_eq!(resp.header("via"), Some("1.1 echo"));
}

#[test]
fn redirects_and_errors_pass_through_untouched() {
    let origin = TestOrigin::start(|req| match req.path() {
        "/moved" => OriginResponse::status(302).header("Location", "/elsewhere"),
        "/teapot" => OriginResponse::ok("short and stout").with_status(418),
        _ => OriginResponse::ok("boom").with_status(500),
    });
    let echo = EchoUnderTest::start(&origin.url());
    let moved = client::get(echo.addr, "/moved", &[]);
    assert_eq!(moved.status, 302);
    assert_eq!(moved.header("location"), Some("/elsewhere"));
    assert_eq!(origin.hits("/elsewhere"), 0, "a redirect was followed");
    let teapot = client::get(echo.addr, "/teapot", &[]);
    assert_eq!(
        (teapot.status, teapot.body_str().as_str()),
        (418, "short and stout")
    );
    let error = client::get(echo.addr, "/error", &[]);
    assert_eq!((error.status, error.body_str().as_str()), (500, "boom"));
}

#[test]
fn any_method_and_its_body_pass_through() {
    let origin = TestOrigin::start(|req| {
        OriginResponse::ok(format!(
            "{} {} {}",
            req.method,
            req.target,
            String::from_utf8_lossy(&req.body)
        ))
    });
    let echo = EchoUnderTest::start(&origin.url());
    let mut c = RawClient::connect(echo.addr);
    for method in ["POST", "PUT", "PATCH", "DELETE", "PROPFIND", "PURGE"] {
        let resp = c.request(method, "/m", &[], b"payload");
        assert_eq!(resp.status, 200, "{method}");
        assert_eq!(resp.body_str(), format!("{method} /m payload"));
        assert_eq!(resp.header("x-cache-status"), Some("BYPASS"));
        assert!(resp
            .header("cache-status")
            .unwrap_or("")
            .contains("fwd=method"));
    }
    // A POST without a body reaches the origin with an empty body, not a chunked one.
    let resp = c.request("POST", "/empty", &[("Content-Length", "0")], b"");
    assert_eq!(resp.body_str(), "POST /empty ");
    let seen = origin.last_request().expect("seen");
    assert_eq!(seen.header("content-length"), Some("0"));
    assert_eq!(seen.header("transfer-encoding"), None);
}

#[test]
fn chunked_and_close_delimited_origin_bodies_reach_the_client_whole() {
    let body: Vec<u8> = (0..300_000u32).map(|i| (i % 251) as u8).collect();
    let expected = body.clone();
    let origin = TestOrigin::start(move |req| {
        let resp = OriginResponse::ok(body.clone()).header("Cache-Control", "no-store");
        if req.path() == "/chunked" {
            resp.chunked()
        } else {
            resp.close_delimited()
        }
    });
    let echo = EchoUnderTest::start(&origin.url());
    let mut c = RawClient::connect(echo.addr);
    let chunked = c.get("/chunked", &[]);
    assert!(
        chunked.chunked,
        "unknown length goes to an HTTP/1.1 client chunked"
    );
    assert_eq!(chunked.body, expected);
    let closed = c.get("/close", &[]);
    assert_eq!(closed.body, expected);
}

#[test]
fn an_origin_that_refuses_connections_is_a_quick_502() {
    let echo = EchoUnderTest::start(&dead_origin_url());
    let started = Instant::now();
    let resp = client::get(echo.addr, "/", &[]);
    assert_eq!(resp.status, 502);
    assert!(resp.body_str().starts_with("echo: "), "{}", resp.body_str());
    // Latency is the point ("quick"): a refused connect fails in a few ms.
    assert!(
        started.elapsed() < Duration::from_secs(2),
        "took {:?}",
        started.elapsed()
    );
    assert_eq!(resp.header("cache-control"), Some("no-store"));
}

#[test]
fn an_origin_that_does_not_answer_in_time_is_a_504() {
    let origin = TestOrigin::start(|_| OriginResponse::ok("late").delay(Duration::from_secs(3)));
    let echo = EchoUnderTest::with_config(config(
        &origin.url(),
        "", // response_timeout_ms = 2000 in the test config
    ));
    let started = Instant::now();
    let resp = client::get(echo.addr, "/slow", &[]);
    assert_eq!(resp.status, 504, "{}", resp.body_str());
    let took = started.elapsed();
    // The point is the 2 s response timeout: the 504 comes at it, before the origin's
    // answer (3 s) would have.
    assert!(
        took >= Duration::from_millis(1900) && took < Duration::from_secs(3),
        "took {took:?}"
    );
}

#[test]
fn an_origin_body_cut_short_reaches_the_client_cut_short_and_is_not_stored() {
    let body = vec![b'z'; 100_000];
    let origin = TestOrigin::start(move |_| {
        OriginResponse::ok(body.clone())
            .header("Cache-Control", "max-age=600")
            .truncate_after(50_000)
    });
    let echo = EchoUnderTest::start(&origin.url());
    for _ in 0..2 {
        let mut c = RawClient::connect(echo.addr);
        c.send(b"GET /cut HTTP/1.1\r\nHost: test.local\r\n\r\n");
        // Cut short, or (the head was held back until the body ended) a 502: never a
        // complete 200.
        let result = c.read_response(false);
        assert!(
            result.as_ref().map_or(true, |r| r.status == 502),
            "a truncated body was completed: {result:?}"
        );
    }
    // Nothing was stored: the second request went to the origin too.
    assert_eq!(origin.hits("/cut"), 2);
}

#[test]
fn an_origin_closing_idle_connections_costs_no_client_an_error() {
    let origin = TestOrigin::start(|req| OriginResponse::ok(format!("body of {}", req.target)));
    let echo = EchoUnderTest::start(&origin.url());
    for round in 0..5 {
        let resp = client::get(echo.addr, &format!("/idle/{round}"), &[]);
        assert_eq!(resp.status, 200, "round {round}: {}", resp.body_str());
        // The origin drops every keep-alive connection Echo holds to it.
        origin.drop_connections();
        wait_until(
            "the origin has no open connections",
            Duration::from_secs(5),
            || origin.open_connections() == 0,
        );
    }
    assert_eq!(origin.total_hits(), 5);
}

#[test]
fn a_head_with_a_range_is_filled_with_a_get_and_keeps_the_length() {
    let origin = TestOrigin::start(|_| OriginResponse::ok("twelve bytes"));
    let echo = EchoUnderTest::start(&origin.url());
    let mut c = RawClient::connect(echo.addr);
    // RFC 9110 §14.2: Range means nothing on a HEAD, so this is a HEAD like any other:
    // filled with a GET (never forwarded as a HEAD, issue 13), the length announced.
    c.send(b"HEAD /len HTTP/1.1\r\nHost: test.local\r\nRange: bytes=0-1\r\n\r\n");
    let head = c.read_response(true).expect("HEAD response");
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("12"));
    let seen = origin.last_request().expect("the fill");
    assert_eq!(seen.method, "GET");
    assert_eq!(seen.header("range"), None);
    assert_eq!(
        c.get("/len", &[]).body_str(),
        "twelve bytes",
        "connection still in step"
    );
}

#[test]
fn options_asterisk_is_answered_by_echo() {
    let origin = TestOrigin::start(|_| OriginResponse::ok("x"));
    let echo = EchoUnderTest::start(&origin.url());
    let mut c = RawClient::connect(echo.addr);
    c.send(b"OPTIONS * HTTP/1.1\r\nHost: test.local\r\n\r\n");
    let resp = c.read_response(false).expect("a response");
    assert_eq!(resp.status, 200);
    assert_eq!(origin.total_hits(), 0);
    assert_eq!(c.get("/after", &[]).status, 200, "connection still in step");
}

#[test]
fn a_slow_origin_on_many_urls_does_not_starve_cache_hits() {
    // The origin holds every /slow/* request until released; /hot answers at once.
    let gate = Gate::new();
    let held = gate.hold();
    let origin = TestOrigin::start(move |req| {
        if req.target.starts_with("/slow/") {
            held.wait(Duration::from_secs(20));
        }
        OriginResponse::ok(format!("body of {}", req.target)).header("Cache-Control", "max-age=600")
    });
    // The default pools: 64 workers, 256 fetch workers.
    let echo = EchoUnderTest::start(&origin.url());
    for i in 0..5 {
        client::get(echo.addr, &format!("/hot/{i}"), &[]);
    }
    let hanging: Vec<_> = (0..64)
        .map(|i| {
            let addr = echo.addr;
            std::thread::spawn(move || client::get(addr, &format!("/slow/{i}"), &[]))
        })
        .collect();
    wait_until("64 origin requests hang", Duration::from_secs(10), || {
        (0..64).all(|i| origin.hits(&format!("/slow/{i}")) == 1)
    });
    let mut worst = Duration::ZERO;
    for round in 0..20 {
        let started = Instant::now();
        let hit = client::get(echo.addr, &format!("/hot/{}", round % 5), &[]);
        worst = worst.max(started.elapsed());
        assert_eq!(hit.header("x-cache-status"), Some("HIT"));
    }
    // Latency is the point ("does not starve"): a starved hit would wait for the
    // origin (held up to 20 s); a hit takes a few ms.
    assert!(
        worst < Duration::from_secs(1),
        "a hit took {worst:?} while the origin hung"
    );
    gate.open();
    for h in hanging {
        assert_eq!(h.join().expect("client").status, 200);
    }
}
