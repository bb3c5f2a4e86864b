//! Caching by RFC 9111 for a shared cache: what is stored, for how long, which variant
//! answers which request, Age, HEAD, validators, revalidation of stale entries, and
//! invalidation by unsafe methods.
//! Every test counts origin hits: a hit is a request the origin did not see.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::support::client::{self, RawClient, RawResponse};
use crate::support::echo::{config, EchoUnderTest};
use crate::support::{wait_until, OriginResponse, TestOrigin};

/// An origin answering every path with `headers` and a body naming the path.
fn origin_with(headers: &'static [(&'static str, &'static str)]) -> TestOrigin {
    TestOrigin::start(move |req| {
        headers.iter().fold(
            OriginResponse::ok(format!("body of {}", req.target)),
            |r, (n, v)| r.header(n, v),
        )
    })
}

#[test]
fn a_miss_then_a_hit_with_one_origin_fetch() {
    let origin = origin_with(&[("Cache-Control", "max-age=60")]);
    let echo = EchoUnderTest::start(&origin.url());
    let first = client::get(echo.addr, "/a?x=1", &[]);
    assert_eq!(first.header("x-cache-status"), Some("MISS"));
    assert_eq!(
        first.header("cache-status"),
        Some("echo; fwd=uri-miss; fwd-status=200; stored")
    );
    let second = client::get(echo.addr, "/a?x=1", &[]);
    assert_eq!(second.header("x-cache-status"), Some("HIT"));
    assert!(second
        .header("cache-status")
        .unwrap_or("")
        .starts_with("echo; hit; ttl="));
    assert_eq!(second.header("age"), Some("0"));
    assert_eq!(second.body, first.body);
    assert_eq!(origin.hits("/a?x=1"), 1);
    // The query is part of the key.
    let other = client::get(echo.addr, "/a?x=2", &[]);
    assert_eq!(other.header("x-cache-status"), Some("MISS"));
    assert_eq!(origin.total_hits(), 2);
}

/// (response fields, request fields, stored?, detail in Cache-Status when not stored)
type StoreCase = (
    &'static [(&'static str, &'static str)],
    &'static [(&'static str, &'static str)],
    bool,
    &'static str,
);

#[test]
fn only_what_http_allows_is_stored() {
    let cases: &[StoreCase] = &[
        (&[("Cache-Control", "max-age=60")], &[], true, ""),
        (&[("Cache-Control", "s-maxage=60")], &[], true, ""),
        (
            &[("Expires", "Thu, 01 Jan 2099 00:00:00 GMT")],
            &[],
            true,
            "",
        ),
        // RFC 9111 §4.2: "a cache recipient SHOULD match the field value
        // case-insensitively"; RFC 9110 §5.6.7: all three HTTP-date formats are accepted.
        (
            &[("Expires", "thu, 01 JAN 2099 00:00:00 gmt")],
            &[],
            true,
            "",
        ),
        (&[("Expires", "Thu Jan  1 00:00:00 2099")], &[], true, ""),
        // RFC 9111 §5.3: "A cache recipient MUST interpret invalid date formats [...] as
        // representing a time in the past (i.e., "already expired")."
        (&[("Expires", "01/01/2099")], &[], false, "not-fresh"),
        (
            &[("Cache-Control", "no-store, max-age=60")],
            &[],
            false,
            "no-store",
        ),
        (
            &[("Cache-Control", "private, max-age=60")],
            &[],
            false,
            "private",
        ),
        (
            &[("Cache-Control", "no-cache, max-age=60")],
            &[],
            false,
            "no-cache",
        ),
        (
            &[("Cache-Control", "max-age=60"), ("Vary", "*")],
            &[],
            false,
            "vary-star",
        ),
        (
            &[("Cache-Control", "max-age=60"), ("Set-Cookie", "s=1")],
            &[],
            false,
            "set-cookie",
        ),
        // No freshness information at all.
        (&[], &[], false, "not-fresh"),
        (&[("Expires", "0")], &[], false, "not-fresh"),
        (&[("Cache-Control", "max-age=0")], &[], false, "not-fresh"),
        // s-maxage wins over max-age for a shared cache.
        (
            &[("Cache-Control", "max-age=60, s-maxage=0")],
            &[],
            false,
            "not-fresh",
        ),
        // Heuristic freshness from Last-Modified for a 200.
        (
            &[("Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT")],
            &[],
            true,
            "",
        ),
        // Authorization: only public, s-maxage or must-revalidate make it shareable.
        (
            &[("Cache-Control", "max-age=60")],
            &[("Authorization", "Basic eDp5")],
            false,
            "authorization",
        ),
        (
            &[("Cache-Control", "public, max-age=60")],
            &[("Authorization", "Basic eDp5")],
            true,
            "",
        ),
        (
            &[("Cache-Control", "s-maxage=60")],
            &[("Authorization", "Basic eDp5")],
            true,
            "",
        ),
        (
            &[("Cache-Control", "must-revalidate, max-age=60")],
            &[("Authorization", "Basic eDp5")],
            true,
            "",
        ),
        // The client's no-store forbids storing this response.
        (
            &[("Cache-Control", "max-age=60")],
            &[("Cache-Control", "no-store")],
            false,
            "request-no-store",
        ),
    ];
    for (i, (resp_fields, req_fields, stored, detail)) in cases.iter().enumerate() {
        let origin = origin_with(resp_fields);
        let echo = EchoUnderTest::start(&origin.url());
        let target = format!("/case/{i}");
        let first = client::get(echo.addr, &target, req_fields);
        assert_eq!(first.status, 200);
        let cache_status = first.header("cache-status").unwrap_or("").to_string();
        if !*stored {
            assert!(
                cache_status.ends_with(&format!("detail={detail}")),
                "case {i} {resp_fields:?}: {cache_status}"
            );
        }
        let second = client::get(echo.addr, &target, req_fields);
        let want = if *stored { "HIT" } else { "MISS" };
        assert_eq!(
            second.header("x-cache-status"),
            Some(want),
            "case {i}: {resp_fields:?} with request {req_fields:?}"
        );
        assert_eq!(
            origin.hits(&target),
            if *stored { 1 } else { 2 },
            "case {i}"
        );
    }
}

#[test]
fn statuses_without_heuristic_freshness_need_an_explicit_lifetime() {
    let origin = TestOrigin::start(|req| match req.path() {
        "/found" => OriginResponse::status(302)
            .header("Location", "/x")
            .header("Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT"),
        "/found-60" => OriginResponse::status(302)
            .header("Location", "/x")
            .header("Cache-Control", "max-age=60"),
        "/gone" => OriginResponse::ok("not here")
            .with_status(404)
            .header("Cache-Control", "max-age=60"),
        _ => OriginResponse::ok("error")
            .with_status(500)
            .header("Cache-Control", "max-age=60"),
    });
    let echo = EchoUnderTest::start(&origin.url());
    for (target, stored) in [
        ("/found", false),
        ("/found-60", true),
        ("/gone", true),
        ("/error", true),
    ] {
        client::get(echo.addr, target, &[]);
        let again = client::get(echo.addr, target, &[]);
        let want = if stored { "HIT" } else { "MISS" };
        assert_eq!(again.header("x-cache-status"), Some(want), "{target}");
    }
}

#[test]
fn age_counts_the_origin_age_and_an_entry_expires() {
    let origin = TestOrigin::start(|req| match req.path() {
        "/aged" => OriginResponse::ok("old")
            .header("Cache-Control", "max-age=600")
            .header("Age", "100"),
        "/stale" => OriginResponse::ok("older")
            .header("Cache-Control", "max-age=60")
            .header("Age", "100"),
        _ => OriginResponse::ok("brief").header("Cache-Control", "max-age=1"),
    });
    let echo = EchoUnderTest::start(&origin.url());
    let first = client::get(echo.addr, "/aged", &[]);
    assert_eq!(
        first.header("age"),
        Some("100"),
        "the origin's Age passes through"
    );
    let hit = client::get(echo.addr, "/aged", &[]);
    assert_eq!(hit.header("x-cache-status"), Some("HIT"));
    let age: u64 = hit
        .header("age")
        .and_then(|a| a.parse().ok())
        .expect("an Age");
    assert!((100..=102).contains(&age), "age {age}");
    let ttl = hit
        .header("cache-status")
        .unwrap_or("")
        .rsplit("ttl=")
        .next()
        .unwrap_or("")
        .to_string();
    let ttl: i64 = ttl.parse().expect("a ttl");
    assert!((498..=500).contains(&ttl), "ttl {ttl}");

    // Older than its lifetime on arrival: never served from the store.
    client::get(echo.addr, "/stale", &[]);
    assert_eq!(
        client::get(echo.addr, "/stale", &[]).header("x-cache-status"),
        Some("MISS")
    );

    // A one-second lifetime runs out and the next request goes to the origin.
    client::get(echo.addr, "/brief", &[]);
    assert_eq!(
        client::get(echo.addr, "/brief", &[]).header("x-cache-status"),
        Some("HIT")
    );
    wait_until("the entry expires", Duration::from_secs(5), || {
        client::get(echo.addr, "/brief", &[]).header("x-cache-status") == Some("MISS")
    });
    assert_eq!(origin.hits("/brief"), 2);
}

#[test]
fn vary_keeps_one_variant_per_request_field_value() {
    let origin = TestOrigin::start(|req| {
        let enc = req.header("accept-encoding").unwrap_or("none").to_string();
        OriginResponse::ok(format!("encoded as {enc}"))
            .header("Cache-Control", "max-age=60")
            .header("Vary", "Accept-Encoding")
    });
    let echo = EchoUnderTest::start(&origin.url());
    let gzip = [("Accept-Encoding", "gzip")];
    let br = [("Accept-Encoding", "br")];
    assert_eq!(
        client::get(echo.addr, "/v", &gzip).body_str(),
        "encoded as gzip"
    );
    let br_first = client::get(echo.addr, "/v", &br);
    assert_eq!(br_first.body_str(), "encoded as br");
    assert!(br_first
        .header("cache-status")
        .unwrap_or("")
        .contains("fwd=vary-miss"));
    let none = client::get(echo.addr, "/v", &[]);
    assert_eq!(none.body_str(), "encoded as none");
    // Each variant now answers its own requests, and only its own.
    let gzip_hit = client::get(echo.addr, "/v", &gzip);
    assert_eq!(
        (
            gzip_hit.header("x-cache-status"),
            gzip_hit.body_str().as_str()
        ),
        (Some("HIT"), "encoded as gzip")
    );
    let br_hit = client::get(echo.addr, "/v", &br);
    assert_eq!(
        (br_hit.header("x-cache-status"), br_hit.body_str().as_str()),
        (Some("HIT"), "encoded as br")
    );
    let none_hit = client::get(echo.addr, "/v", &[]);
    assert_eq!(
        (
            none_hit.header("x-cache-status"),
            none_hit.body_str().as_str()
        ),
        (Some("HIT"), "encoded as none")
    );
    assert_eq!(origin.hits("/v"), 3);
}

#[test]
fn head_is_answered_from_a_stored_get_and_fills_it() {
    let origin = origin_with(&[("Cache-Control", "max-age=60")]);
    let echo = EchoUnderTest::start(&origin.url());
    let mut c = RawClient::connect(echo.addr);
    // A HEAD miss fetches (and stores) the GET; the client gets the head only.
    c.send(b"HEAD /h HTTP/1.1\r\nHost: test.local\r\n\r\n");
    let head = c.read_response(true).expect("HEAD response");
    assert_eq!(head.status, 200);
    assert_eq!(head.header("content-length"), Some("10"));
    assert!(head.body.is_empty());
    assert_eq!(
        origin.last_request().map(|r| r.method),
        Some("GET".to_string())
    );
    let get = c.get("/h", &[]);
    assert_eq!(
        (get.header("x-cache-status"), get.body_str().as_str()),
        (Some("HIT"), "body of /h")
    );
    c.send(b"HEAD /h HTTP/1.1\r\nHost: test.local\r\n\r\n");
    let head_hit = c.read_response(true).expect("HEAD hit");
    assert_eq!(head_hit.header("x-cache-status"), Some("HIT"));
    assert_eq!(head_hit.header("content-length"), Some("10"));
    assert!(head_hit.body.is_empty());
    // The connection is still in step: one more GET works.
    assert_eq!(c.get("/h", &[]).status, 200);
    assert_eq!(origin.hits("/h"), 1);
}

#[test]
fn client_validators_are_answered_304_from_the_store() {
    let origin = origin_with(&[
        ("Cache-Control", "max-age=60"),
        ("ETag", "\"v7\""),
        ("Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT"),
    ]);
    let echo = EchoUnderTest::start(&origin.url());
    // The fill is unconditional even when the client's is not, so it can be stored.
    let first = client::get(echo.addr, "/c", &[("If-None-Match", "\"v7\"")]);
    assert_eq!(first.status, 200);
    assert_eq!(
        origin
            .last_request()
            .and_then(|r| r.header("if-none-match").map(str::to_string)),
        None
    );
    let not_modified = client::get(echo.addr, "/c", &[("If-None-Match", "\"v6\", W/\"v7\"")]);
    assert_eq!(not_modified.status, 304);
    assert!(not_modified.body.is_empty());
    assert_eq!(not_modified.header("etag"), Some("\"v7\""));
    assert_eq!(
        client::get(echo.addr, "/c", &[("If-None-Match", "\"v6\"")]).status,
        200
    );
    let since = [("If-Modified-Since", "Tue, 02 Jan 2024 00:00:00 GMT")];
    assert_eq!(client::get(echo.addr, "/c", &since).status, 304);
    let before = [("If-Modified-Since", "Sun, 31 Dec 2023 00:00:00 GMT")];
    assert_eq!(client::get(echo.addr, "/c", &before).status, 200);
    assert_eq!(origin.hits("/c"), 1);
}

#[test]
fn unsafe_methods_invalidate_the_target_and_its_same_origin_locations() {
    let origin = TestOrigin::start(|req| match (req.method.as_str(), req.path()) {
        ("GET", _) => OriginResponse::ok(format!("body of {}", req.target))
            .header("Cache-Control", "max-age=60"),
        ("POST", "/items") => OriginResponse::status(201)
            .header("Location", "/items/7")
            .header("Content-Location", "http://test.local/items/8"),
        ("POST", "/fail") => OriginResponse::ok("no").with_status(500),
        _ => OriginResponse::status(204),
    });
    let echo = EchoUnderTest::start(&origin.url());
    let warm = |t: &str| {
        client::get(echo.addr, t, &[]);
        assert_eq!(
            client::get(echo.addr, t, &[]).header("x-cache-status"),
            Some("HIT"),
            "{t}"
        );
    };
    for t in ["/items", "/items/7", "/items/8", "/fail", "/kept"] {
        warm(t);
    }
    let mut c = RawClient::connect(echo.addr);
    assert_eq!(c.request("POST", "/items", &[], b"new").status, 201);
    assert_eq!(c.request("DELETE", "/kept?x", &[], b"").status, 204);
    assert_eq!(c.request("POST", "/fail", &[], b"x").status, 500);
    for (t, want) in [
        ("/items", "MISS"),
        ("/items/7", "MISS"),
        ("/items/8", "MISS"),
        // An error answer changes nothing; another URL (query differs) is not touched.
        ("/fail", "HIT"),
        ("/kept", "HIT"),
    ] {
        assert_eq!(
            client::get(echo.addr, t, &[]).header("x-cache-status"),
            Some(want),
            "{t}"
        );
    }
}

#[test]
fn hosts_are_separate_and_equivalent_authorities_share() {
    let origin = origin_with(&[("Cache-Control", "max-age=60")]);
    let echo = EchoUnderTest::start(&origin.url());
    client::get(echo.addr, "/h", &[("Host", "a.example")]);
    let other = client::get(echo.addr, "/h", &[("Host", "b.example")]);
    assert_eq!(other.header("x-cache-status"), Some("MISS"));
    let same = client::get(echo.addr, "/h", &[("Host", "A.Example:80")]);
    assert_eq!(same.header("x-cache-status"), Some("HIT"));
}

#[test]
fn objects_over_max_object_bytes_stream_whole_and_are_not_stored() {
    let big = vec![b'b'; 300_000];
    let expected = big.clone();
    let origin = TestOrigin::start(move |req| {
        let resp = OriginResponse::ok(big.clone()).header("Cache-Control", "max-age=60");
        if req.path() == "/big-chunked" {
            resp.chunked()
        } else {
            resp
        }
    });
    let echo = EchoUnderTest::with_config(config(
        &origin.url(),
        "[cache]\nmax_object_bytes = 100000\n",
    ));
    for target in ["/big", "/big-chunked"] {
        for _ in 0..2 {
            let resp = client::get(echo.addr, target, &[]);
            assert_eq!(resp.body, expected, "{target}");
            assert_eq!(resp.header("x-cache-status"), Some("MISS"), "{target}");
        }
        assert_eq!(origin.hits(target), 2, "{target} was stored");
    }
}

#[test]
fn a_large_object_within_the_limit_is_stored_and_served_intact() {
    let big: Vec<u8> = (0..2_000_000u32).map(|i| (i * 7 % 256) as u8).collect();
    let expected = big.clone();
    let origin = TestOrigin::start(move |_| {
        OriginResponse::ok(big.clone()).header("Cache-Control", "max-age=60")
    });
    let echo = EchoUnderTest::start(&origin.url());
    for want in ["MISS", "HIT"] {
        let resp = client::get(echo.addr, "/two-megabytes", &[]);
        assert_eq!(resp.header("x-cache-status"), Some(want));
        assert!(
            resp.body == expected,
            "2 MB body changed ({} bytes)",
            resp.body.len()
        );
    }
}

/// Bodies of 32 KiB and more live in a memfd in the memory store and go out with
/// sendfile: every way a stored response is answered keeps them byte for byte.
#[test]
fn large_bodies_sent_from_files_arrive_intact_every_way() {
    let version = Arc::new(AtomicU64::new(1));
    let v = Arc::clone(&version);
    let body_of = |v: u64| -> Vec<u8> {
        (0..100_000u32)
            .map(|i| ((i + v as u32) % 253) as u8)
            .collect()
    };
    let origin = TestOrigin::start(move |req| {
        let n = v.load(Ordering::SeqCst);
        let etag = format!("\"big{n}\"");
        if req.header("if-none-match") == Some(etag.as_str()) {
            return OriginResponse::status(304)
                .header("ETag", &etag)
                .header("Cache-Control", "max-age=1");
        }
        OriginResponse::ok(body_of(n))
            .header("ETag", &etag)
            .header("Cache-Control", "max-age=1")
    });
    let echo = EchoUnderTest::start(&origin.url());
    let expected = body_of(1);
    for want in ["MISS", "HIT", "HIT"] {
        let resp = client::get(echo.addr, "/big", &[]);
        assert_eq!(resp.header("x-cache-status"), Some(want));
        assert_eq!(resp.header("content-length"), Some("100000"));
        assert!(
            resp.body == expected,
            "{want}: body changed ({} bytes)",
            resp.body.len()
        );
    }
    // HEAD: the length, no body, and the connection still works afterwards.
    let mut c = RawClient::connect(echo.addr);
    let head = c.request("HEAD", "/big", &[], b"");
    assert_eq!(head.header("content-length"), Some("100000"));
    assert!(head.body.is_empty());
    let after = c.get("/big", &[]);
    assert!(after.body == expected, "keep-alive after HEAD");
    // Pipelined: two hits back to back on one connection, each whole.
    c.send(b"GET /big HTTP/1.1\r\nHost: x\r\n\r\nGET /big HTTP/1.1\r\nHost: x\r\n\r\n");
    for _ in 0..2 {
        let r = c.read_response(false).unwrap();
        assert!(r.body == expected, "pipelined hit");
    }
    // The client's own validator: a 304 from the store.
    let nm = client::get(echo.addr, "/big", &[("If-None-Match", "\"big1\"")]);
    assert_eq!((nm.status, nm.body.len()), (304, 0));
    // Revalidated by the origin's 304: the stored body is kept.
    let revalidated = first_after_stale("/big", || client::get(echo.addr, "/big", &[]));
    assert_eq!(revalidated.header("x-cache-status"), Some("REVALIDATED"));
    assert!(revalidated.body == expected, "revalidated body changed");
    // A new version replaces it whole.
    version.store(2, Ordering::SeqCst);
    let changed = first_after_stale("/big", || client::get(echo.addr, "/big", &[]));
    assert!(changed.body == body_of(2), "the new version");
    // HTTP/1.0 clients get it too.
    let mut old = RawClient::connect(echo.addr);
    old.send(b"GET /big HTTP/1.0\r\nHost: x\r\n\r\n");
    let r = old.read_response(false).unwrap();
    assert!(r.body == body_of(2), "HTTP/1.0");
}

// Revalidation (RFC 9111 §4.3): a stale stored response with validators is checked with
// a conditional request; a 304 freshens it and the client is answered from it.

/// Sends `request` until its answer is not a hit (the stored response went stale and this
/// request went to the origin) and returns that answer.
fn first_after_stale(what: &str, mut request: impl FnMut() -> RawResponse) -> RawResponse {
    let mut answer = None;
    wait_until(
        &format!("{what} goes stale"),
        Duration::from_secs(10),
        || {
            let resp = request();
            let hit = resp.header("x-cache-status") == Some("HIT");
            if !hit {
                answer = Some(resp);
            }
            !hit
        },
    );
    answer.expect("the answer that was not a hit")
}

/// An origin whose resource `version` the test can bump: the 200 names it in its body and
/// ETag (version 1 with `max-age=1`, so it goes stale quickly; later ones `max-age=60`); a
/// request whose If-None-Match names the current version gets a 304 with `not_modified`
/// fields.
fn versioned_origin(
    version: Arc<AtomicU64>,
    not_modified: &'static [(&'static str, &'static str)],
) -> TestOrigin {
    TestOrigin::start(move |req| {
        let v = version.load(Ordering::SeqCst);
        let etag = format!("\"v{v}\"");
        if req.header("if-none-match") == Some(etag.as_str()) {
            return not_modified.iter().fold(
                OriginResponse::status(304).header("ETag", &etag),
                |r, (n, val)| r.header(n, val),
            );
        }
        let max_age = if v == 1 { 1 } else { 60 };
        OriginResponse::ok(format!("version {v}"))
            .header("ETag", &etag)
            .header("Cache-Control", &format!("max-age={max_age}"))
            .header("X-Version", &v.to_string())
    })
}

#[test]
fn a_stale_entry_with_an_etag_is_revalidated_by_a_304() {
    let version = Arc::new(AtomicU64::new(1));
    let origin = versioned_origin(Arc::clone(&version), &[("Cache-Control", "max-age=60")]);
    let echo = EchoUnderTest::start(&origin.url());
    let first = client::get(echo.addr, "/e", &[]);
    assert_eq!(first.header("x-cache-status"), Some("MISS"));
    let resp = first_after_stale("/e", || client::get(echo.addr, "/e", &[]));
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body_str(), "version 1");
    assert_eq!(resp.header("x-cache-status"), Some("REVALIDATED"));
    assert_eq!(
        resp.header("cache-status"),
        Some("echo; fwd=stale; fwd-status=304; stored")
    );
    assert_eq!(resp.header("etag"), Some("\"v1\""));
    assert_eq!(resp.header("age"), Some("0"), "the 304 made it new");
    let requests = origin.requests();
    assert_eq!(requests.len(), 2);
    assert_eq!(requests[0].header("if-none-match"), None);
    assert_eq!(requests[1].method, "GET");
    assert_eq!(requests[1].header("if-none-match"), Some("\"v1\""));
    assert_eq!(requests[1].header("if-modified-since"), None);
    // Freshened: the next request is a hit, and the origin sees nothing.
    let next = client::get(echo.addr, "/e", &[]);
    assert_eq!(
        (next.header("x-cache-status"), next.body_str().as_str()),
        (Some("HIT"), "version 1")
    );
    assert_eq!(origin.hits("/e"), 2);
}

#[test]
fn a_stale_entry_with_only_last_modified_is_revalidated_with_if_modified_since() {
    const LAST_MODIFIED: &str = "Mon, 01 Jan 2024 00:00:00 GMT";
    let origin = TestOrigin::start(|req| {
        if req.header("if-modified-since") == Some(LAST_MODIFIED) {
            return OriginResponse::status(304).header("Cache-Control", "max-age=60");
        }
        OriginResponse::ok("dated")
            .header("Last-Modified", LAST_MODIFIED)
            .header("Cache-Control", "max-age=1")
    });
    let echo = EchoUnderTest::start(&origin.url());
    assert_eq!(
        client::get(echo.addr, "/d", &[]).header("x-cache-status"),
        Some("MISS")
    );
    let resp = first_after_stale("/d", || client::get(echo.addr, "/d", &[]));
    assert_eq!(
        (
            resp.status,
            resp.header("x-cache-status"),
            resp.body_str().as_str()
        ),
        (200, Some("REVALIDATED"), "dated")
    );
    assert_eq!(resp.header("last-modified"), Some(LAST_MODIFIED));
    let revalidation = origin.last_request().expect("a revalidation request");
    assert_eq!(
        revalidation.header("if-modified-since"),
        Some(LAST_MODIFIED)
    );
    assert_eq!(revalidation.header("if-none-match"), None);
    assert_eq!(
        client::get(echo.addr, "/d", &[]).header("x-cache-status"),
        Some("HIT")
    );
    assert_eq!(origin.hits("/d"), 2);
}

#[test]
fn a_changed_resource_answers_the_revalidation_with_its_new_content() {
    let version = Arc::new(AtomicU64::new(1));
    let origin = versioned_origin(Arc::clone(&version), &[]);
    let echo = EchoUnderTest::start(&origin.url());
    assert_eq!(client::get(echo.addr, "/n", &[]).body_str(), "version 1");
    version.store(2, Ordering::SeqCst);
    let resp = first_after_stale("/n", || client::get(echo.addr, "/n", &[]));
    assert_eq!(resp.status, 200);
    assert_eq!(resp.body_str(), "version 2");
    assert_eq!(resp.header("x-cache-status"), Some("MISS"));
    assert_eq!(
        resp.header("cache-status"),
        Some("echo; fwd=stale; fwd-status=200; stored")
    );
    assert_eq!(
        origin
            .last_request()
            .and_then(|r| r.header("if-none-match").map(str::to_string)),
        Some("\"v1\"".to_string())
    );
    // The new response replaced the old one.
    let next = client::get(echo.addr, "/n", &[]);
    assert_eq!(
        (next.header("x-cache-status"), next.body_str().as_str()),
        (Some("HIT"), "version 2")
    );
    assert_eq!(origin.hits("/n"), 2);
}

#[test]
fn fields_of_the_304_update_the_stored_response() {
    let version = Arc::new(AtomicU64::new(1));
    // A longer lifetime and a new field value; the (wrong) Content-Length of a 304 is
    // never taken: the stored content is what it describes.
    let origin = versioned_origin(
        Arc::clone(&version),
        &[
            ("Cache-Control", "max-age=60"),
            ("X-Version", "2"),
            ("Content-Length", "0"),
        ],
    );
    let echo = EchoUnderTest::start(&origin.url());
    assert_eq!(
        client::get(echo.addr, "/u", &[]).header("x-version"),
        Some("1")
    );
    let resp = first_after_stale("/u", || client::get(echo.addr, "/u", &[]));
    assert_eq!(resp.header("x-cache-status"), Some("REVALIDATED"));
    assert_eq!(resp.header_all("x-version"), vec!["2"]);
    assert_eq!(resp.header_all("cache-control"), vec!["max-age=60"]);
    assert_eq!(resp.body_str(), "version 1");
    assert_eq!(resp.header("content-length"), Some("9"));
    let hit = client::get(echo.addr, "/u", &[]);
    assert_eq!(hit.header("x-cache-status"), Some("HIT"));
    assert_eq!(hit.header_all("x-version"), vec!["2"]);
    assert_eq!(hit.body_str(), "version 1");
    // Fresh for the 304's 60 seconds, not the stored response's one.
    let ttl: i64 = hit
        .header("cache-status")
        .and_then(|s| s.rsplit("ttl=").next())
        .and_then(|t| t.parse().ok())
        .expect("a ttl");
    assert!((58..=60).contains(&ttl), "ttl {ttl}");
    let mut c = RawClient::connect(echo.addr);
    c.send(b"HEAD /u HTTP/1.1\r\nHost: test.local\r\n\r\n");
    let head = c.read_response(true).expect("HEAD response");
    assert_eq!(head.header("content-length"), Some("9"));
    assert_eq!(origin.hits("/u"), 2);
}

#[test]
fn a_stale_entry_without_validators_is_fetched_unconditionally() {
    let origin = origin_with(&[("Cache-Control", "max-age=1")]);
    let echo = EchoUnderTest::start(&origin.url());
    client::get(echo.addr, "/p", &[]);
    let resp = first_after_stale("/p", || client::get(echo.addr, "/p", &[]));
    assert_eq!(resp.header("x-cache-status"), Some("MISS"));
    assert_eq!(
        resp.header("cache-status"),
        Some("echo; fwd=stale; fwd-status=200; stored")
    );
    assert_eq!(resp.body_str(), "body of /p");
    let refetch = origin.last_request().expect("a second request");
    assert_eq!(refetch.header("if-none-match"), None);
    assert_eq!(refetch.header("if-modified-since"), None);
    assert_eq!(origin.hits("/p"), 2);
}

#[test]
fn head_and_conditional_requests_revalidate_too() {
    let version = Arc::new(AtomicU64::new(1));
    let origin = versioned_origin(Arc::clone(&version), &[("Cache-Control", "max-age=60")]);
    let echo = EchoUnderTest::start(&origin.url());
    client::get(echo.addr, "/head", &[]);
    client::get(echo.addr, "/cond", &[]);

    // A HEAD revalidates with a conditional HEAD (RFC 9111 §4.3.5: no body is fetched
    // for it) and gets the head of the stored response.
    let mut c = RawClient::connect(echo.addr);
    let head = first_after_stale("/head", || {
        c.send(b"HEAD /head HTTP/1.1\r\nHost: test.local\r\n\r\n");
        c.read_response(true).expect("HEAD response")
    });
    assert_eq!(head.status, 200);
    assert_eq!(head.header("x-cache-status"), Some("REVALIDATED"));
    assert_eq!(head.header("content-length"), Some("9"));
    assert!(head.body.is_empty());
    let revalidation = origin.last_request().expect("a revalidation");
    assert_eq!(
        (
            revalidation.method.as_str(),
            revalidation.header("if-none-match")
        ),
        ("HEAD", Some("\"v1\""))
    );
    let get = c.get("/head", &[]);
    assert_eq!(
        (get.header("x-cache-status"), get.body_str().as_str()),
        (Some("HIT"), "version 1")
    );

    // The client's own validators are not sent on; they are answered from the freshened
    // response.
    let theirs = [("If-None-Match", "\"v0\", \"v1\"")];
    let resp = first_after_stale("/cond", || client::get(echo.addr, "/cond", &theirs));
    assert_eq!(resp.status, 304);
    assert_eq!(resp.header("x-cache-status"), Some("REVALIDATED"));
    assert!(resp.body.is_empty());
    assert_eq!(
        origin
            .last_request()
            .map(|r| r.header_all("if-none-match").join("|")),
        Some("\"v1\"".to_string())
    );
    assert_eq!(origin.total_hits(), 4);
}

#[test]
fn a_304_freshens_only_the_variant_it_validated() {
    let origin = TestOrigin::start(|req| {
        let enc = req.header("accept-encoding").unwrap_or("none").to_string();
        let etag = format!("\"{enc}-1\"");
        // Stored copies go stale after a second; a freshened one lasts a minute, so
        // the checks after a revalidation do not race the clock.
        let resp = if req.header("if-none-match") == Some(etag.as_str()) {
            OriginResponse::status(304).header("Cache-Control", "max-age=60")
        } else {
            OriginResponse::ok(format!("encoded as {enc}")).header("Cache-Control", "max-age=1")
        };
        resp.header("ETag", &etag).header("Vary", "Accept-Encoding")
    });
    let echo = EchoUnderTest::start(&origin.url());
    let gzip = [("Accept-Encoding", "gzip")];
    let br = [("Accept-Encoding", "br")];
    client::get(echo.addr, "/v", &gzip);
    client::get(echo.addr, "/v", &br);
    for (fields, body) in [(&gzip, "encoded as gzip"), (&br, "encoded as br")] {
        let resp = first_after_stale(body, || client::get(echo.addr, "/v", fields));
        assert_eq!(
            (resp.header("x-cache-status"), resp.body_str().as_str()),
            (Some("REVALIDATED"), body)
        );
        let hit = client::get(echo.addr, "/v", fields);
        assert_eq!(
            (hit.header("x-cache-status"), hit.body_str().as_str()),
            (Some("HIT"), body)
        );
    }
    let requests = origin.requests();
    let sent: Vec<(Option<&str>, Option<&str>)> = requests
        .iter()
        .map(|r| (r.header("accept-encoding"), r.header("if-none-match")))
        .collect();
    assert_eq!(
        sent,
        vec![
            (Some("gzip"), None),
            (Some("br"), None),
            (Some("gzip"), Some("\"gzip-1\"")),
            (Some("br"), Some("\"br-1\"")),
        ]
    );
}

#[test]
fn a_304_for_another_representation_is_not_used() {
    // A 304 naming a strong validator the stored response does not have must not update
    // it (RFC 9111 §4.3.4): Echo fetches the whole response instead.
    let origin = TestOrigin::start(|req| {
        if req.header("if-none-match").is_some() {
            return OriginResponse::status(304).header("ETag", "\"other\"");
        }
        OriginResponse::ok("whole")
            .header("ETag", "\"v1\"")
            .header("Cache-Control", "max-age=1")
    });
    let echo = EchoUnderTest::start(&origin.url());
    client::get(echo.addr, "/o", &[]);
    let resp = first_after_stale("/o", || client::get(echo.addr, "/o", &[]));
    assert_eq!(
        (
            resp.status,
            resp.header("x-cache-status"),
            resp.body_str().as_str()
        ),
        (200, Some("MISS"), "whole")
    );
    let sent: Vec<Option<String>> = origin
        .requests()
        .iter()
        .map(|r| r.header("if-none-match").map(str::to_string))
        .collect();
    assert_eq!(sent, vec![None, Some("\"v1\"".to_string()), None]);
}

#[test]
fn a_304_that_forbids_storing_is_served_but_not_stored() {
    let version = Arc::new(AtomicU64::new(1));
    let origin = versioned_origin(Arc::clone(&version), &[("Cache-Control", "no-store")]);
    let echo = EchoUnderTest::start(&origin.url());
    client::get(echo.addr, "/ns", &[]);
    let resp = first_after_stale("/ns", || client::get(echo.addr, "/ns", &[]));
    assert_eq!(resp.header("x-cache-status"), Some("REVALIDATED"));
    assert_eq!(
        resp.header("cache-status"),
        Some("echo; fwd=stale; fwd-status=304; detail=no-store")
    );
    assert_eq!(resp.body_str(), "version 1");
    // Still stale in the store: the next request revalidates again.
    let again = client::get(echo.addr, "/ns", &[]);
    assert_eq!(again.header("x-cache-status"), Some("REVALIDATED"));
    assert_eq!(origin.hits("/ns"), 3);
}

#[test]
fn an_unreachable_origin_on_revalidation_is_a_502() {
    let version = Arc::new(AtomicU64::new(1));
    let origin = versioned_origin(Arc::clone(&version), &[]);
    let echo = EchoUnderTest::start(&origin.url());
    client::get(echo.addr, "/gone", &[]);
    drop(origin);
    let resp = first_after_stale("/gone", || client::get(echo.addr, "/gone", &[]));
    assert_eq!(resp.status, 502);
    assert_eq!(resp.header("x-cache-status"), Some("MISS"));
    assert_eq!(
        resp.header("cache-status"),
        Some("echo; fwd=stale; detail=origin-connect")
    );
}

/// Issue 20, item 4. RFC 9111 §3: a response may be stored when "the response status
/// code is final" (and it has explicit freshness): 299, 499 and 599 with `max-age` are
/// stored and served. RFC 9111 §5.2.2.3: with `must-understand`, only statuses the cache
/// understands are stored, and then "the cache SHOULD ignore the no-store directive".
#[test]
fn any_final_status_with_explicit_freshness_is_stored_and_must_understand_is_honoured() {
    let origin = TestOrigin::start(|req| {
        let (status, cc) = match req.path() {
            "/s/299" => (299, "max-age=60"),
            "/s/499" => (499, "max-age=60"),
            "/s/599" => (599, "max-age=60"),
            "/mu/200" => (200, "max-age=60, must-understand, no-store"),
            "/mu/299" => (299, "max-age=60, must-understand, no-store"),
            _ => (404, "no-store"),
        };
        OriginResponse::status(status)
            .body(format!("status {status}"))
            .header("Cache-Control", cc)
    });
    let echo = EchoUnderTest::start(&origin.url());
    for (path, stored) in [
        ("/s/299", true),
        ("/s/499", true),
        ("/s/599", true),
        ("/mu/200", true),
        ("/mu/299", false),
    ] {
        let first = client::get(echo.addr, path, &[]);
        let second = client::get(echo.addr, path, &[]);
        assert_eq!(second.status, first.status, "{path}");
        assert_eq!(second.body, first.body, "{path}");
        let want = if stored { "HIT" } else { "MISS" };
        assert_eq!(second.header("x-cache-status"), Some(want), "{path}");
        assert_eq!(origin.hits(path), if stored { 1 } else { 2 }, "{path}");
    }
}
