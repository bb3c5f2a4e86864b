//! Which directives Echo acts on (issue 20): targeted cache-control fields (RFC 9213) and
//! `Surrogate-Control`, `no-cache` responses stored and revalidated before each reuse
//! (RFC 9111 §5.2.2.4), qualified `no-cache` / `private` (§5.2.2.4, §5.2.2.7), and
//! serving stale on error by configuration (`cache.stale_if_error_ms`, §4.2.4).
//! Each test quotes the sentence it checks.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::client::{self, RawResponse};
use crate::support::echo::{config, EchoUnderTest};
use crate::support::{wait_until, OriginResponse, TestOrigin};

fn status(resp: &RawResponse) -> &str {
    resp.header("x-cache-status").unwrap_or("?")
}

/// RFC 9213 §2.2: "...the first targeted field that is present and valid..." governs
/// the cache that uses it, in place of Cache-Control; "Cache-Control" still goes to
/// clients unchanged. Echo's own field never leaves Echo; CDN-Cache-Control passes on
/// (a CDN further down may act on it).
#[test]
fn a_targeted_field_replaces_cache_control_for_echo_and_clients_get_cache_control_unchanged() {
    let origin = TestOrigin::start(|req| {
        let resp = OriginResponse::ok(format!("body of {}", req.path()));
        match req.path() {
            "/echo" => resp
                .header("Cache-Control", "no-store")
                .header("Echo-Cache-Control", "max-age=60")
                .header("CDN-Cache-Control", "no-store"),
            "/cdn" => resp
                .header("Cache-Control", "private")
                .header("CDN-Cache-Control", "max-age=60"),
            "/cdn-no-store" => resp
                .header("Cache-Control", "max-age=60")
                .header("CDN-Cache-Control", "no-store"),
            // RFC 9213 §2.1: "If a targeted field in a given response is empty, or a
            // parsing error is encountered, that field SHOULD be ignored by the cache".
            "/invalid" => resp
                .header("Cache-Control", "no-store")
                .header("CDN-Cache-Control", "max-age=60, no-store="),
            _ => resp.header("Cache-Control", "no-store"),
        }
    });
    let echo = EchoUnderTest::start(&origin.url());
    for (path, stored, cache_control) in [
        ("/echo", true, "no-store"),
        ("/cdn", true, "private"),
        ("/cdn-no-store", false, "max-age=60"),
        ("/invalid", false, "no-store"),
    ] {
        let first = client::get(echo.addr, path, &[]);
        let second = client::get(echo.addr, path, &[]);
        assert_eq!(second.body_str(), format!("body of {path}"));
        let want = if stored { "HIT" } else { "MISS" };
        assert_eq!(status(&second), want, "{path}");
        assert_eq!(origin.hits(path), if stored { 1 } else { 2 }, "{path}");
        for resp in [&first, &second] {
            assert_eq!(resp.header("cache-control"), Some(cache_control), "{path}");
            assert_eq!(resp.header("echo-cache-control"), None, "{path}");
        }
    }
    let cdn = client::get(echo.addr, "/cdn", &[]);
    assert_eq!(cdn.header("cdn-cache-control"), Some("max-age=60"));
}

/// `cache.targeted_cache_control` orders the fields; `cache.surrogate_control` turns
/// on `Surrogate-Control` (max-age, no-store) after them.
#[test]
fn targeted_fields_follow_the_configured_order_and_surrogate_control_is_opt_in() {
    let origin = TestOrigin::start(|req| {
        let resp = OriginResponse::ok(format!("body of {}", req.path()));
        match req.path() {
            "/order" => resp
                .header("Cache-Control", "max-age=60")
                .header("Echo-Cache-Control", "no-store")
                .header("CDN-Cache-Control", "max-age=60"),
            "/surrogate" => resp
                .header("Cache-Control", "no-store")
                .header("Surrogate-Control", "max-age=60"),
            _ => resp,
        }
    });
    let plain = EchoUnderTest::start(&origin.url());
    let reordered = EchoUnderTest::with_config(config(
        &origin.url(),
        "[cache]\ntargeted_cache_control = [\"cdn-cache-control\", \"echo-cache-control\"]\n\
         surrogate_control = true\n",
    ));
    let second = |echo: &EchoUnderTest, path: &str| {
        client::get(echo.addr, path, &[]);
        status(&client::get(echo.addr, path, &[])).to_string()
    };
    assert_eq!(second(&plain, "/order"), "MISS", "echo-cache-control first");
    assert_eq!(
        second(&reordered, "/order"),
        "HIT",
        "cdn-cache-control first"
    );
    assert_eq!(second(&plain, "/surrogate"), "MISS", "off by default");
    assert_eq!(second(&reordered, "/surrogate"), "HIT");
}

/// An origin for /nc that answers `no-cache` with an ETag: 304 to a matching
/// If-None-Match, the body otherwise. `version` changes the representation.
fn no_cache_origin(version: Arc<AtomicUsize>) -> TestOrigin {
    TestOrigin::start(move |req| {
        let v = version.load(Ordering::SeqCst);
        if v == 0 {
            return OriginResponse::ok("down").with_status(503);
        }
        let etag = format!("\"v{v}\"");
        if req.header("if-none-match") == Some(etag.as_str()) {
            return OriginResponse::status(304)
                .header("ETag", &etag)
                .header("Cache-Control", "no-cache");
        }
        OriginResponse::ok(format!("version {v}"))
            .header("ETag", &etag)
            .header("Cache-Control", "no-cache")
    })
}

/// RFC 9111 §5.2.2.4: "The no-cache response directive, in its unqualified form (without
/// an argument), indicates that the response MUST NOT be used to satisfy any other
/// request without forwarding it for validation and receiving a successful response";
/// "This allows an origin server to prevent a cache from using the response to satisfy
/// a request without contacting it, even by caches that have been configured to send
/// stale responses."
#[test]
fn no_cache_is_stored_and_every_reuse_is_revalidated() {
    let version = Arc::new(AtomicUsize::new(1));
    let origin = no_cache_origin(Arc::clone(&version));
    let echo = EchoUnderTest::with_config(config(
        &origin.url(),
        "[cache]\nstale_if_error_ms = 60000\n",
    ));
    let first = client::get(echo.addr, "/nc", &[]);
    assert_eq!(
        (first.status, first.body_str().as_str()),
        (200, "version 1")
    );
    for _ in 0..3 {
        let again = client::get(echo.addr, "/nc", &[]);
        assert_eq!(
            (again.status, again.body_str().as_str()),
            (200, "version 1")
        );
        assert_eq!(status(&again), "REVALIDATED");
        let sent = origin.last_request().expect("a revalidation");
        assert_eq!(sent.header("if-none-match"), Some("\"v1\""));
    }
    assert_eq!(origin.hits("/nc"), 4, "each reuse went to the origin");
    // A changed representation replaces the stored one.
    version.store(2, Ordering::SeqCst);
    let changed = client::get(echo.addr, "/nc", &[]);
    assert_eq!(changed.body_str(), "version 2");
    let again = client::get(echo.addr, "/nc", &[]);
    assert_eq!(
        (status(&again), again.body_str().as_str()),
        ("REVALIDATED", "version 2")
    );
    // Without a successful validation, never served: not even stale_if_error_ms applies.
    version.store(0, Ordering::SeqCst);
    let failed = client::get(echo.addr, "/nc", &[]);
    assert_ne!(failed.body_str(), "version 2");
    assert!(failed.status >= 500, "{}", failed.status);
}

/// RFC 9111 §5.2.2.4: with field names, "a cache MAY use the response to satisfy a
/// subsequent request ... However, any header fields in the response that have the field
/// name(s) listed MUST NOT be sent in the response to a subsequent request without
/// successful revalidation". §5.2.2.7: qualified private: "a shared cache MUST NOT store
/// the specified field name(s), whereas it MAY store the remainder of the response".
#[test]
fn qualified_no_cache_and_private_store_the_response_without_the_named_fields() {
    let origin = TestOrigin::start(|req| match req.path() {
        "/no-cache-field" => OriginResponse::ok("shared")
            .header(
                "Cache-Control",
                "max-age=60, no-cache=\"Set-Cookie, X-Debug\"",
            )
            .header("Set-Cookie", "session=first-client")
            .header("X-Debug", "origin-7")
            .header("X-Kept", "yes"),
        _ => OriginResponse::ok("shared")
            .header("Cache-Control", "max-age=60, private=\"x-user\"")
            .header("X-User", "alice")
            .header("X-Kept", "yes"),
    });
    let echo = EchoUnderTest::start(&origin.url());
    for (path, named) in [
        ("/no-cache-field", &["set-cookie", "x-debug"][..]),
        ("/private-field", &["x-user"][..]),
    ] {
        let first = client::get(echo.addr, path, &[]);
        for field in named {
            assert!(
                first.header(field).is_some(),
                "{path}: the fetching client gets {field}"
            );
        }
        let hit = client::get(echo.addr, path, &[]);
        assert_eq!(
            (status(&hit), hit.body_str().as_str()),
            ("HIT", "shared"),
            "{path}"
        );
        for field in named {
            assert_eq!(
                hit.header(field),
                None,
                "{path}: {field} reached another client"
            );
        }
        assert_eq!(hit.header("x-kept"), Some("yes"), "{path}");
        assert_eq!(origin.hits(path), 1, "{path}");
    }
}

/// An origin for /e that answers 503 once `fail` is set.
fn failing_origin(cache_control: &'static str, fail: Arc<AtomicUsize>) -> TestOrigin {
    TestOrigin::start(move |_| match fail.load(Ordering::SeqCst) {
        0 => OriginResponse::ok("good copy").header("Cache-Control", cache_control),
        _ => OriginResponse::ok("down").with_status(503),
    })
}

/// RFC 9111 §4.2.4: "A cache MUST NOT generate a stale response if it is prohibited by an
/// explicit in-protocol directive"; where nothing prohibits it, `cache.stale_if_error_ms`
/// serves the stored copy when the origin fails (as nginx's `proxy_cache_use_stale error`
/// and Varnish's grace do) — never past that window, never for must-revalidate,
/// proxy-revalidate or s-maxage.
#[test]
fn stale_if_error_ms_serves_stale_on_origin_errors_unless_a_directive_forbids_it() {
    for (cc, allowed) in [
        ("max-age=1", true),
        ("max-age=1, must-revalidate", false),
        ("max-age=1, proxy-revalidate", false),
        ("s-maxage=1", false),
    ] {
        let fail = Arc::new(AtomicUsize::new(0));
        let mut origin = Some(failing_origin(cc, Arc::clone(&fail)));
        let url = origin.as_ref().map(TestOrigin::url).unwrap_or_default();
        let echo = EchoUnderTest::with_config(config(&url, "[cache]\nstale_if_error_ms = 60000\n"));
        assert_eq!(client::get(echo.addr, "/e", &[]).body_str(), "good copy");
        // First the origin answers 503, then it cannot be reached at all.
        for mode in ["503", "unreachable"] {
            fail.store(1, Ordering::SeqCst);
            if mode == "unreachable" {
                drop(origin.take());
            }
            let mut last = None;
            wait_until(
                &format!("{cc}: /e is stale"),
                Duration::from_secs(10),
                || {
                    let resp = client::get(echo.addr, "/e", &[]);
                    let hit = status(&resp) == "HIT";
                    last = Some(resp);
                    !hit
                },
            );
            let resp = last.expect("an answer");
            if allowed {
                assert_eq!(
                    (resp.status, status(&resp), resp.body_str().as_str()),
                    (200, "STALE", "good copy"),
                    "{cc}, {mode}"
                );
            } else {
                assert!(resp.status >= 500, "{cc}, {mode}: {}", resp.status);
                assert_ne!(resp.body_str(), "good copy", "{cc}");
            }
        }
    }
}

/// Without `cache.stale_if_error_ms` (default 0) an origin error goes through.
#[test]
fn without_stale_if_error_ms_an_origin_error_goes_through() {
    let fail = Arc::new(AtomicUsize::new(0));
    let origin = failing_origin("max-age=1", Arc::clone(&fail));
    let echo = EchoUnderTest::start(&origin.url());
    client::get(echo.addr, "/e", &[]);
    fail.store(1, Ordering::SeqCst);
    wait_until(
        "an origin 503 goes through",
        Duration::from_secs(10),
        || client::get(echo.addr, "/e", &[]).status == 503,
    );
}

/// An origin for /h: a 10-byte body with ETag "v<version>", fresh for a second; a HEAD
/// gets the same head (fresh for ten minutes), never a 304, so a HEAD answer is a 200
/// whose fields describe the current version.
fn head_origin(version: Arc<AtomicUsize>) -> TestOrigin {
    TestOrigin::start(move |req| {
        let v = version.load(Ordering::SeqCst);
        let etag = format!("\"v{v}\"");
        if req.method == "HEAD" {
            return OriginResponse::ok(format!("{v}23456789"))
                .header("ETag", &etag)
                .header("Cache-Control", "max-age=600")
                .header("X-Version", &v.to_string());
        }
        OriginResponse::ok(format!("{v}23456789"))
            .header("ETag", &etag)
            .header("Cache-Control", "max-age=1")
            .header("X-Version", &v.to_string())
    })
}

/// A HEAD through `echo` once its stored /h has gone stale (HEADs before that are hits).
fn head_once_stale(echo: &EchoUnderTest) -> RawResponse {
    let mut answered = None;
    wait_until("/h is stale", Duration::from_secs(10), || {
        let mut c = client::RawClient::connect(echo.addr);
        c.send(b"HEAD /h HTTP/1.1\r\nHost: test.local\r\n\r\n");
        let resp = c.read_response(true).expect("a HEAD answer");
        let hit = status(&resp) == "HIT";
        answered = Some(resp);
        !hit
    });
    answered.expect("an answer")
}

/// The seconds of freshness `Cache-Status` gives.
fn ttl(resp: &RawResponse) -> i64 {
    let cs = resp.header("cache-status").unwrap_or("");
    cs.split(';')
        .find_map(|p| p.trim().strip_prefix("ttl="))
        .and_then(|v| v.parse().ok())
        .unwrap_or(i64::MIN)
}

/// RFC 9111 §4.3.5: "When a cache makes an inbound HEAD request for a target URI and
/// receives a 200 (OK) response, the cache SHOULD update or invalidate each of its stored
/// GET responses that could have been chosen for that request": "if the stored response
/// and HEAD response have matching values for any received validator fields (ETag and
/// Last-Modified) and, if the HEAD response has a Content-Length header field, the value
/// of Content-Length matches that of the stored response, the cache SHOULD update the
/// stored response".
#[test]
fn a_head_answer_that_matches_freshens_the_stored_get() {
    let origin = head_origin(Arc::new(AtomicUsize::new(1)));
    let echo = EchoUnderTest::start(&origin.url());
    assert_eq!(client::get(echo.addr, "/h", &[]).body_str(), "123456789");
    let resp = head_once_stale(&echo);
    assert_eq!((resp.status, status(&resp)), (200, "REVALIDATED"));
    assert!(resp.body.is_empty());
    let methods: Vec<String> = origin.requests().iter().map(|r| r.method.clone()).collect();
    assert_eq!(methods, ["GET", "HEAD"], "the HEAD went out as a HEAD");
    // The stored GET took the HEAD's fields: fresh for ten minutes now, same body.
    let after = client::get(echo.addr, "/h", &[]);
    assert_eq!(
        (status(&after), after.body_str().as_str()),
        ("HIT", "123456789")
    );
    assert!(ttl(&after) > 60, "{:?}", after.header("cache-status"));
    assert_eq!(origin.total_hits(), 2);
}

/// RFC 9111 §4.3.5: "otherwise, the cache SHOULD consider the stored response to be
/// stale": the HEAD's client gets the origin's head, and the next GET goes to the origin.
#[test]
fn a_head_answer_for_another_version_makes_the_stored_get_stale() {
    let version = Arc::new(AtomicUsize::new(1));
    let origin = head_origin(Arc::clone(&version));
    let echo = EchoUnderTest::start(&origin.url());
    assert_eq!(client::get(echo.addr, "/h", &[]).body_str(), "123456789");
    version.store(2, Ordering::SeqCst);
    let resp = head_once_stale(&echo);
    assert_eq!(resp.status, 200);
    assert_eq!(resp.header("x-version"), Some("2"), "the origin's own head");
    assert_eq!(resp.header("etag"), Some("\"v2\""));
    let after = client::get(echo.addr, "/h", &[]);
    assert_eq!(after.body_str(), "223456789", "not the old stored body");
    let methods: Vec<String> = origin.requests().iter().map(|r| r.method.clone()).collect();
    assert_eq!(methods, ["GET", "HEAD", "GET"]);
}
