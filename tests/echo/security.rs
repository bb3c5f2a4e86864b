//! Regression tests for issue 13, "close the cache-poisoning, deception and resource-
//! pinning holes found by an outside probe": one test (or a few) per finding, each named
//! for what broke. A shared cache's first duty is that one client can never decide what
//! other clients get; these tests play the attacking client, or the origin that turns a
//! client's input against others, over real sockets.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::support::client::{self, RawClient};
use crate::support::echo::{config, EchoUnderTest};
use crate::support::raw_origin::{RawConn, RawOrigin};
use crate::support::{wait_until, OriginRequest, OriginResponse, TestOrigin};

const TOKEN: &str = "s3cret-token";

/// A header name compared as origins built on CGI/WSGI/Rack compare them: case-folded
/// and with `_` and `-` the same.
fn folded(name: &str) -> String {
    name.to_ascii_lowercase().replace('_', "-")
}

/// The request fields the origin saw, by folded name.
fn saw(request: &OriginRequest, name: &str) -> Vec<String> {
    request
        .headers
        .iter()
        .filter(|(n, _)| folded(n) == folded(name))
        .map(|(_, v)| v.clone())
        .collect()
}

// -----------------------------------------------------------------------------------------
// Finding 1: poisoning headers by other spellings.

/// The fields origins and their frameworks act on or reflect, in spellings that exact-
/// name matching misses; none may reach the origin on a request that may fill the cache.
const POISONING: &[(&str, &str)] = &[
    ("X_Forwarded_Scheme", "https"),
    ("X-Forwarded_Host", "evil.example"),
    ("X_Original_URL", "/admin"),
    ("X_HTTP_Method_Override", "DELETE"),
    ("X-Forwarded-Ssl", "on"),
    ("Front-End-Https", "on"),
    ("X-Original-Host", "evil.example"),
    ("X-Forwarded-Uri", "/admin"),
    ("X-Forwarded-Port", "4443"),
    ("X-Forwarded-Prefix", "/evil"),
    ("X-Forwarded-Server", "evil.example"),
    ("X-Rewrite-Url", "/admin"),
    ("X-Method-Override", "PUT"),
    ("Forwarded", "host=evil.example;proto=https"),
];

#[test]
fn issue13_poisoning_headers_in_any_spelling_never_reach_the_origin_on_a_fill() {
    let origin =
        TestOrigin::start(|_| OriginResponse::ok("page").header("Cache-Control", "max-age=600"));
    let echo = EchoUnderTest::start(&origin.url());
    let resp = client::get(echo.addr, "/page", POISONING);
    assert_eq!(resp.status, 200);
    let seen = origin.last_request().expect("the origin saw the fill");
    for (name, _) in POISONING {
        let folded_name = folded(name);
        // Echo sets its own X-Forwarded-Host; the client's value must not be it.
        let got = saw(&seen, name);
        let leaked = match folded_name.as_str() {
            "x-forwarded-host" => got.iter().any(|v| v == "evil.example"),
            _ => !got.is_empty(),
        };
        assert!(
            !leaked,
            "{name} reached the origin on a fill: {:?}",
            seen.headers
        );
    }
}

#[test]
fn issue13_a_scheme_redirect_triggered_by_x_forwarded_scheme_is_never_served_to_others() {
    // The reproduced attack: the origin redirects to https when it believes the request
    // came over http (any spelling of X-Forwarded-Scheme, as Rack reads it), and the
    // redirect is cacheable for 600 s.
    let origin = TestOrigin::start(|r| {
        let scheme = r
            .headers
            .iter()
            .find(|(n, _)| folded(n) == "x-forwarded-scheme")
            .map(|(_, v)| v.clone());
        match scheme.as_deref() {
            Some("https") => OriginResponse::status(301)
                .header("Location", "https://victim.example/")
                .header("Cache-Control", "max-age=600"),
            _ => OriginResponse::ok("home").header("Cache-Control", "max-age=600"),
        }
    });
    let echo = EchoUnderTest::start(&origin.url());
    let attack = client::get(
        echo.addr,
        "/",
        &[("Host", "victim.example"), ("X_Forwarded_Scheme", "https")],
    );
    assert_eq!(attack.status, 200, "the attacker's own answer");
    let victim = client::get(echo.addr, "/", &[("Host", "victim.example")]);
    assert_eq!(
        victim.status, 200,
        "another client got the attacker's redirect"
    );
    assert_eq!(victim.body_str(), "home");
}

#[test]
fn issue13_fields_with_underscores_are_dropped_on_every_forwarded_request_unless_allowed() {
    let origin = TestOrigin::start(|_| OriginResponse::ok("x").header("Cache-Control", "no-store"));
    let echo = EchoUnderTest::start(&origin.url());
    let mut c = RawClient::connect(echo.addr);
    // A passthrough (POST) and a fill (GET) alike.
    c.request(
        "POST",
        "/form",
        &[("X_Custom", "1"), ("X-Fine", "2")],
        b"a=1",
    );
    let post = origin.last_request().expect("POST forwarded");
    assert!(saw(&post, "x_custom").is_empty(), "{:?}", post.headers);
    assert_eq!(post.header("x-fine"), Some("2"));
    c.get("/page", &[("X_Custom", "1")]);
    let get = origin.last_request().expect("GET forwarded");
    assert!(saw(&get, "x_custom").is_empty(), "{:?}", get.headers);

    // With underscores allowed, an ordinary one passes, but the folded strip list still
    // catches a poisoning one.
    let allowed = EchoUnderTest::with_config(config(
        &origin.url(),
        "[server]\nunderscores_in_headers = true\n",
    ));
    client::get(
        allowed.addr,
        "/other",
        &[("X_Custom", "1"), ("X_Forwarded_Scheme", "https")],
    );
    let seen = origin.last_request().expect("forwarded");
    assert_eq!(saw(&seen, "x_custom"), vec!["1".to_string()]);
    assert!(
        saw(&seen, "x-forwarded-scheme").is_empty(),
        "{:?}",
        seen.headers
    );
}

#[test]
fn issue13_a_strip_list_from_config_matches_names_folded() {
    let origin =
        TestOrigin::start(|_| OriginResponse::ok("x").header("Cache-Control", "max-age=60"));
    let echo = EchoUnderTest::with_config(config(
        &origin.url(),
        "[server]\nunderscores_in_headers = true\n[cache]\nstrip_request_headers = [\"X_Tenant_Override\"]\n",
    ));
    client::get(
        echo.addr,
        "/t",
        &[("x-tenant-override", "7"), ("X_TENANT_OVERRIDE", "8")],
    );
    let seen = origin.last_request().expect("forwarded");
    assert!(
        saw(&seen, "x-tenant-override").is_empty(),
        "{:?}",
        seen.headers
    );
}

// -----------------------------------------------------------------------------------------
// Finding 9: client preconditions on fills.

#[test]
fn issue13_fills_carry_no_client_preconditions_so_a_412_is_never_stored_for_everyone() {
    let origin = TestOrigin::start(|r| {
        if r.header("if-match").is_some() || r.header("if-unmodified-since").is_some() {
            OriginResponse::status(412).header("Cache-Control", "max-age=600")
        } else {
            OriginResponse::ok("doc")
                .header("Cache-Control", "max-age=600")
                .header("ETag", "\"v1\"")
        }
    });
    let echo = EchoUnderTest::start(&origin.url());
    let first = client::get(
        echo.addr,
        "/doc",
        &[
            ("If-Match", "\"nope\""),
            ("If-Unmodified-Since", "Thu, 01 Jan 1970 00:00:00 GMT"),
            ("If-Range", "\"nope\""),
        ],
    );
    let seen = origin.last_request().expect("the fill");
    for field in [
        "if-match",
        "if-unmodified-since",
        "if-range",
        "if-none-match",
        "if-modified-since",
    ] {
        assert_eq!(seen.header(field), None, "{field} went out on a fill");
    }
    // The client's own preconditions are not evaluated by the origin on its behalf; what
    // matters is that nobody else gets a 412.
    assert_ne!(first.status, 0);
    let other = client::get(echo.addr, "/doc", &[]);
    assert_eq!(other.status, 200, "a 412 was served to another client");
    assert_eq!(other.body_str(), "doc");
}

// -----------------------------------------------------------------------------------------
// Finding 3: Vary keyed on fields the origin never saw.

#[test]
fn issue13_a_field_the_client_named_in_connection_is_not_part_of_the_stored_variant() {
    // The origin answers CORS for the Origin it sees, and varies on it.
    let origin = TestOrigin::start(|r| {
        let mut resp = OriginResponse::ok("api")
            .header("Cache-Control", "max-age=600")
            .header("Vary", "Origin");
        if let Some(o) = r.header("origin") {
            resp = resp.header("Access-Control-Allow-Origin", o);
        }
        resp
    });
    let echo = EchoUnderTest::start(&origin.url());
    // The attacker names Origin as hop-by-hop: Echo removes it before forwarding, so the
    // origin answers without CORS ...
    let attack = client::get(
        echo.addr,
        "/api",
        &[
            ("Origin", "https://app.example"),
            ("Connection", "keep-alive, Origin"),
        ],
    );
    assert_eq!(attack.header("access-control-allow-origin"), None);
    // ... and that answer must not be what browsers of https://app.example get.
    let browser = client::get(echo.addr, "/api", &[("Origin", "https://app.example")]);
    assert_eq!(
        browser.header("access-control-allow-origin"),
        Some("https://app.example"),
        "a variant stored for a request without Origin was served for one with it ({:?})",
        browser.header("x-cache-status")
    );
    // The same hop-by-hop trick is a hit for the variant that really lacks the field.
    let no_origin = client::get(echo.addr, "/api", &[]);
    assert_eq!(no_origin.header("x-cache-status"), Some("HIT"));
    assert_eq!(no_origin.header("access-control-allow-origin"), None);
}

// -----------------------------------------------------------------------------------------
// Finding 4: cache deception through heuristic freshness on personalised pages.

#[test]
fn issue13_a_response_to_a_request_with_cookie_needs_explicit_freshness_or_public() {
    let origin = TestOrigin::start(|r| {
        let who = r.header("cookie").unwrap_or("anonymous").to_string();
        let resp = OriginResponse::ok(format!("profile of {who}"))
            .header("Last-Modified", "Mon, 01 Jan 2024 00:00:00 GMT");
        match r.path() {
            "/explicit.css" => resp.header("Cache-Control", "max-age=60"),
            "/public.css" => resp.header("Cache-Control", "public"),
            _ => resp,
        }
    });
    for extra in ["", "[cache]\ndefault_ttl_ms = 600000\n"] {
        let echo = EchoUnderTest::with_config(config(&origin.url(), extra));
        let target = format!("/account/profile.css?cfg={}", extra.len());
        let victim = client::get(echo.addr, &target, &[("Cookie", "session=victim")]);
        assert_eq!(victim.body_str(), "profile of session=victim");
        let attacker = client::get(echo.addr, &target, &[]);
        assert_eq!(
            attacker.body_str(),
            "profile of anonymous",
            "a personalised page stored by heuristic or default TTL ({extra:?})"
        );
        for stored in ["/explicit.css", "/public.css"] {
            let target = format!("{stored}?cfg={}", extra.len());
            client::get(echo.addr, &target, &[("Cookie", "session=1")]);
            let again = client::get(echo.addr, &target, &[]);
            assert_eq!(
                again.header("x-cache-status"),
                Some("HIT"),
                "{stored} {extra:?}"
            );
        }
    }
}

// -----------------------------------------------------------------------------------------
// Finding 10: smaller ones.

#[test]
fn issue13_origin_cache_status_fields_of_echos_name_are_replaced_not_passed_on() {
    let origin = TestOrigin::start(|_| {
        OriginResponse::ok("x")
            .header("Cache-Control", "max-age=60")
            .header("X-Cache-Status", "HIT")
            .header("Cache-Status", "upstream; hit, echo; hit; ttl=9999")
    });
    let echo = EchoUnderTest::start(&origin.url());
    for want in ["MISS", "HIT"] {
        let resp = client::get(echo.addr, "/x", &[]);
        assert_eq!(resp.header_all("x-cache-status"), vec![want]);
        let members: Vec<String> = resp
            .header_all("cache-status")
            .iter()
            .flat_map(|v| v.split(','))
            .map(|m| m.trim().to_string())
            .collect();
        assert_eq!(members.len(), 2, "{members:?}");
        assert_eq!(members[0], "upstream; hit");
        assert!(members[1].starts_with("echo; "), "{members:?}");
        assert!(!members[1].contains("9999"), "{members:?}");
    }
}

#[test]
fn issue13_cache_status_says_stored_only_when_the_entry_was_stored() {
    // A chunked body that turns out larger than max_object_bytes is not stored; its
    // answer must not claim it was.
    let origin = TestOrigin::start(|_| {
        OriginResponse::ok(vec![b'x'; 200_000])
            .header("Cache-Control", "max-age=60")
            .chunked()
    });
    let echo = EchoUnderTest::with_config(config(
        &origin.url(),
        "[cache]\nmax_object_bytes = 100000\n",
    ));
    let first = client::get(echo.addr, "/big", &[]);
    assert_eq!(first.body.len(), 200_000);
    let status = first.header("cache-status").unwrap_or("").to_string();
    assert!(!status.contains("stored"), "{status}");
    let second = client::get(echo.addr, "/big", &[]);
    assert_eq!(second.header("x-cache-status"), Some("MISS"));
    // A small one that is stored says so.
    let small = TestOrigin::start(|_| {
        OriginResponse::ok("s")
            .header("Cache-Control", "max-age=60")
            .chunked()
    });
    let echo = EchoUnderTest::start(&small.url());
    let first = client::get(echo.addr, "/s", &[]);
    assert!(first
        .header("cache-status")
        .unwrap_or("")
        .ends_with("; stored"));
    assert_eq!(
        client::get(echo.addr, "/s", &[]).header("x-cache-status"),
        Some("HIT")
    );
}

#[test]
fn issue13_a_204_is_never_sent_with_content_length() {
    let origin = TestOrigin::start(|_| {
        OriginResponse::status(204)
            .header("Content-Length", "0")
            .header("Cache-Control", "max-age=60")
    });
    let echo = EchoUnderTest::start(&origin.url());
    for _ in 0..2 {
        let mut c = RawClient::connect(echo.addr);
        let resp = c.get("/empty", &[]);
        assert_eq!(resp.status, 204);
        assert_eq!(resp.header("content-length"), None, "{}", resp.raw_head);
    }
    let mut c = RawClient::connect(echo.addr);
    let resp = c.request("DELETE", "/thing", &[], b"");
    assert_eq!(resp.status, 204);
    assert_eq!(resp.header("content-length"), None, "{}", resp.raw_head);
}

#[test]
fn issue13_routes_match_the_normalised_path_and_the_raw_target_goes_upstream() {
    let default =
        TestOrigin::start(|_| OriginResponse::ok("default").header("Cache-Control", "no-store"));
    let bytes =
        TestOrigin::start(|_| OriginResponse::ok("bytes").header("Cache-Control", "no-store"));
    let echo = EchoUnderTest::with_config(config(
        &default.url(),
        &format!(
            "[[route]]\npath_prefix = \"/bytes/\"\nurl = \"{}\"\n",
            bytes.url()
        ),
    ));
    let escaped = client::get(echo.addr, "/%62ytes/1", &[]);
    assert_eq!(
        escaped.body_str(),
        "bytes",
        "an escaped unreserved byte dodged the route"
    );
    assert_eq!(
        bytes.last_request().map(|r| r.target),
        Some("/%62ytes/1".into())
    );
    let dotted = client::get(echo.addr, "/bytes/../x", &[]);
    assert_eq!(
        dotted.body_str(),
        "default",
        "a dot-segment took the request into the route"
    );
    assert_eq!(
        default.last_request().map(|r| r.target),
        Some("/bytes/../x".into())
    );
    let plain = client::get(echo.addr, "/bytes/./2", &[]);
    assert_eq!(plain.body_str(), "bytes");
}

#[test]
fn issue13_the_bearer_scheme_is_case_insensitive() {
    let origin = TestOrigin::start(|_| OriginResponse::ok("x"));
    let echo = EchoUnderTest::with_config(config(
        &origin.url(),
        &format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n"),
    ));
    let admin = echo.admin.expect("admin");
    for scheme in ["Bearer", "bearer", "BEARER", "bEaReR"] {
        let auth = format!("{scheme} {TOKEN}");
        let resp = client::get(admin, "/metrics", &[("Authorization", &auth)]);
        assert_eq!(resp.status, 200, "{scheme}");
    }
    let resp = client::get(
        admin,
        "/metrics",
        &[("Authorization", "Basic s3cret-token")],
    );
    assert_eq!(resp.status, 401);
    let resp = client::get(admin, "/metrics", &[("Authorization", "Bearer wrong")]);
    assert_eq!(resp.status, 401);
}

// -----------------------------------------------------------------------------------------
// Finding 2: origin connection pool poisoning through bodiless answers.

/// A complete, cacheable response carrying a script: what a poisoned pooled connection
/// hands to whichever request is sent on it next.
const POISON: &[u8] =
    b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Length: 24\r\n\r\n<script>evil()</script>\n";

/// An origin that answers `bait_method /bait` with `bait` (an answer without a body) and writes the
/// poison as soon as the next request arrives on the same connection: no readability
/// check before reuse can see it coming. Everything else gets `real <target>`.
fn poisoning_origin(bait_method: &'static str, bait: &'static [u8]) -> RawOrigin {
    RawOrigin::start(move |mut conn: RawConn| {
        while let Some(req) = conn.read_request() {
            if req.target == "/bait" && req.method == bait_method {
                conn.write(bait);
                if conn.read_request().is_some() {
                    conn.write(POISON);
                }
                return;
            }
            let body = format!("real {}", req.target);
            conn.write(
                format!(
                    "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nETag: \"e\"\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        }
    })
}

/// Requests the bait, then at once the victim URL, twice; the victim must get its own
/// answer both times (the second from the cache).
fn assert_victim_unpoisoned(echo: &EchoUnderTest, bait: (&str, &[(&str, &str)])) {
    let mut c = RawClient::connect(echo.addr);
    let (method, headers) = bait;
    let _ = c.request(method, "/bait", headers, b"");
    for _ in 0..2 {
        let victim = client::get(echo.addr, "/victim", &[]);
        assert_eq!(
            victim.body_str(),
            "real /victim",
            "the victim got bytes of another response ({})",
            victim.raw_head
        );
    }
}

#[test]
fn issue13_late_bytes_after_a_204_never_reach_another_response() {
    let origin = poisoning_origin("GET", b"HTTP/1.1 204 No Content\r\n\r\n");
    let echo = EchoUnderTest::start(&origin.url());
    assert_victim_unpoisoned(&echo, ("GET", &[]));
}

#[test]
fn issue13_late_bytes_after_a_head_answer_never_reach_another_response() {
    let origin = poisoning_origin(
        "HEAD",
        b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Length: 24\r\n\r\n",
    );
    let echo = EchoUnderTest::start(&origin.url());
    // A HEAD with a Range: Range means nothing on HEAD (RFC 9110 §14.2), so this is a
    // cacheable HEAD miss, filled with a GET.
    assert_victim_unpoisoned(&echo, ("HEAD", &[("Range", "bytes=0-1")]));
    let methods: Vec<String> = origin
        .requests()
        .iter()
        .filter(|r| r.target == "/bait")
        .map(|r| r.method.clone())
        .collect();
    assert_eq!(
        methods,
        vec!["GET".to_string()],
        "a cacheable HEAD miss is filled with a GET"
    );
}

#[test]
fn issue13_late_bytes_after_a_304_never_reach_another_response() {
    // /bait304 is stored for a second with a validator; its revalidation is answered 304
    // and followed by the poison once the next request is on that connection.
    let origin = RawOrigin::start(|mut conn: RawConn| {
        while let Some(req) = conn.read_request() {
            if req.header("if-none-match").is_some() {
                conn.write(
                    b"HTTP/1.1 304 Not Modified\r\nETag: \"b\"\r\nCache-Control: max-age=1\r\n\r\n",
                );
                if conn.read_request().is_some() {
                    conn.write(POISON);
                }
                return;
            }
            let (cc, body) = match req.target.as_str() {
                "/bait304" => ("max-age=1", "bait".to_string()),
                t => ("max-age=600", format!("real {t}")),
            };
            conn.write(
                format!(
                    "HTTP/1.1 200 OK\r\nCache-Control: {cc}\r\nETag: \"b\"\r\nContent-Length: {}\r\n\r\n{body}",
                    body.len()
                )
                .as_bytes(),
            );
        }
    });
    let echo = EchoUnderTest::start(&origin.url());
    let mut c = RawClient::connect(echo.addr);
    assert_eq!(c.get("/bait304", &[]).body_str(), "bait");
    // Wait until the stored copy is stale and revalidated (a 304 freshens it).
    wait_until("the bait is revalidated", Duration::from_secs(10), || {
        c.get("/bait304", &[]).header("x-cache-status") == Some("REVALIDATED")
    });
    for _ in 0..2 {
        let victim = client::get(echo.addr, "/victim", &[]);
        assert_eq!(victim.body_str(), "real /victim", "{}", victim.raw_head);
    }
}

// -----------------------------------------------------------------------------------------
// Finding 10: a 101 nobody asked for.

#[test]
fn issue13_a_101_to_a_request_that_asked_for_no_upgrade_is_a_502() {
    let origin = RawOrigin::start(|mut conn: RawConn| {
        if conn.read_request().is_some() {
            conn.write(b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: h2c\r\nConnection: Upgrade\r\n\r\nnot http at all");
        }
    });
    let echo = EchoUnderTest::start(&origin.url());
    let mut c = RawClient::connect(echo.addr);
    let resp = c.get("/ws", &[]);
    assert_eq!(resp.status, 502, "{}", resp.raw_head);
    // The client's connection is still plain HTTP.
    let again = c.get("/ws2", &[]);
    assert_eq!(again.status, 502);
}

/// RFC 9110 §15: "Values outside the range 100..599 are invalid": a 999 from the origin
/// is a broken origin (502), neither passed on nor stored.
#[test]
fn a_status_past_599_from_the_origin_is_a_502() {
    let origin = TestOrigin::start(|_| {
        OriginResponse::ok("odd")
            .with_status(999)
            .header("Cache-Control", "max-age=600")
    });
    let echo = EchoUnderTest::start(&origin.url());
    for _ in 0..2 {
        let resp = client::get(echo.addr, "/odd", &[]);
        assert_eq!(resp.status, 502, "{}", resp.raw_head);
    }
    assert_eq!(origin.hits("/odd"), 2, "nothing was stored");
}

// -----------------------------------------------------------------------------------------
// Finding 5: truncated responses stored.

/// What a client got for one request: the bytes up to the close, and whether they form a
/// complete response.
fn read_until_close(addr: std::net::SocketAddr, target: &str) -> (Vec<u8>, bool) {
    let mut c = RawClient::connect(addr);
    c.send(&client::build_request(
        "GET",
        target,
        &[("Connection", "close")],
        b"",
    ));
    match c.read_response(false) {
        Ok(resp) => (resp.raw_body, resp.status == 200),
        Err(e) => (e.into_bytes(), false),
    }
}

/// An origin whose first answer for each target is cut by `cut` after `sent` body bytes
/// of the head `head`; later answers for the target are whole (`whole`, 10 bytes).
fn cutting_origin(
    head: &'static str,
    sent: usize,
    cut: fn(RawConn),
) -> (RawOrigin, Arc<AtomicUsize>) {
    let first_done = Arc::new(AtomicUsize::new(0));
    let done = Arc::clone(&first_done);
    let origin = RawOrigin::start(move |mut conn: RawConn| {
        let Some(_) = conn.read_request() else { return };
        if done.fetch_add(1, Ordering::SeqCst) == 0 {
            conn.write(head.as_bytes());
            conn.write(&vec![b'a'; sent]);
            cut(conn);
        } else {
            conn.write(b"HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Length: 10\r\nConnection: close\r\n\r\nwhole body");
            conn.close();
        }
    });
    (origin, first_done)
}

#[test]
fn issue13_a_body_ended_by_a_reset_or_short_is_never_stored_nor_completed() {
    const CLOSE_DELIMITED: &str =
        "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nConnection: close\r\n\r\n";
    const LENGTH: &str =
        "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nContent-Length: 300000\r\n\r\n";
    /// What the case is, the head the origin sends, the body bytes after it, the cut.
    type Case = (&'static str, &'static str, usize, fn(RawConn));
    let cases: [Case; 5] = [
        (
            "close-delimited, small, reset",
            CLOSE_DELIMITED,
            1000,
            RawConn::reset,
        ),
        (
            "close-delimited, large, reset",
            CLOSE_DELIMITED,
            200_000,
            RawConn::reset,
        ),
        (
            "content-length, small, closed early",
            LENGTH,
            1000,
            RawConn::close,
        ),
        (
            "content-length, large, closed early",
            LENGTH,
            200_000,
            RawConn::close,
        ),
        (
            "content-length, large, reset",
            LENGTH,
            200_000,
            RawConn::reset,
        ),
    ];
    for (what, head, sent, cut) in cases {
        let (origin, _) = cutting_origin(head, sent, cut);
        let echo = EchoUnderTest::start(&origin.url());
        let (bytes, complete) = read_until_close(echo.addr, "/cut");
        assert!(
            !complete,
            "{what}: the client got a complete response ({} bytes)",
            bytes.len()
        );
        let again = client::get(echo.addr, "/cut", &[]);
        assert_eq!(
            again.body_str(),
            "whole body",
            "{what}: the cut body was stored"
        );
        assert_eq!(origin.hits("/cut"), 2, "{what}");
    }
}

#[test]
fn issue13_a_close_delimited_body_that_stalls_past_the_read_timeout_is_not_stored() {
    let (origin, _) = cutting_origin(
        "HTTP/1.1 200 OK\r\nCache-Control: max-age=600\r\nConnection: close\r\n\r\n",
        1000,
        |conn| {
            // Past the test config's origin read_timeout_ms (2000).
            thread::sleep(Duration::from_millis(2500));
            drop(conn);
        },
    );
    let echo = EchoUnderTest::start(&origin.url());
    let (_, complete) = read_until_close(echo.addr, "/stall");
    assert!(!complete);
    assert_eq!(
        client::get(echo.addr, "/stall", &[]).body_str(),
        "whole body"
    );
}

// -----------------------------------------------------------------------------------------
// Finding 6: slow clients pin the fetch pool.

/// A connection whose receive buffer is small from the start (set before connecting,
/// so the window it advertises stays small): a client that reads slowly, or not at all,
/// stops the sender after a few megabytes of kernel buffers instead of tens.
fn small_window_connect(addr: std::net::SocketAddr) -> TcpStream {
    use rustix::net::{sockopt, AddressFamily, SocketType};
    let fd = rustix::net::socket(AddressFamily::INET, SocketType::STREAM, None).expect("socket");
    sockopt::set_socket_recv_buffer_size(&fd, 4096).expect("SO_RCVBUF");
    rustix::net::connect(&fd, &addr).expect("connect");
    TcpStream::from(fd)
}

/// A client that sends `request` and then reads nothing.
fn silent_reader(addr: std::net::SocketAddr, request: &[u8]) -> TcpStream {
    let stream = small_window_connect(addr);
    (&stream).write_all(request).expect("send");
    stream
}

/// Echo with two fetch workers in front of an origin serving `/big/<n>` (6 MiB, more than
/// the kernel's socket buffers take) and `/small`.
fn two_fetch_workers(server: &str) -> (TestOrigin, EchoUnderTest) {
    let origin = TestOrigin::start(|r| {
        if r.path().starts_with("/big/") {
            OriginResponse::ok(vec![b'b'; 6 << 20]).header("Cache-Control", "no-store")
        } else {
            OriginResponse::ok("small").header("Cache-Control", "no-store")
        }
    });
    let echo = EchoUnderTest::with_config(config(
        &origin.url(),
        &format!("[server]\nworkers = 2\nfetch_workers = 2\n{server}"),
    ));
    (origin, echo)
}

#[test]
fn issue13_clients_that_do_not_read_hold_no_fetch_worker() {
    let (origin, echo) = two_fetch_workers("write_timeout_ms = 30000\n");
    let _readers: Vec<TcpStream> = (0..3)
        .map(|i| {
            silent_reader(
                echo.addr,
                &client::build_request("GET", &format!("/big/{i}"), &[], b""),
            )
        })
        .collect();
    // Two of them at least are being answered (with two fetch workers).
    wait_until(
        "the origin served the large requests",
        Duration::from_secs(10),
        || origin.total_hits() >= 2,
    );
    let mut c = RawClient::connect(echo.addr);
    c.set_read_timeout(Duration::from_secs(5));
    let resp = c
        .read_response_after(&client::build_request("GET", "/small", &[], b""))
        .unwrap_or_else(|e| panic!("a miss for another client waited behind slow readers: {e}"));
    assert_eq!(resp.body_str(), "small");
}

#[test]
fn issue13_trickled_uploads_hold_no_fetch_worker() {
    let (origin, echo) = two_fetch_workers("body_timeout_ms = 30000\n");
    let tricklers: Vec<TcpStream> = (0..3)
        .map(|i| {
            let head = format!(
                "POST /upload/{i} HTTP/1.1\r\nHost: test.local\r\nTransfer-Encoding: chunked\r\n\r\n"
            );
            let stream = TcpStream::connect(echo.addr).expect("connect");
            (&stream).write_all(head.as_bytes()).expect("send");
            stream
        })
        .collect();
    // One chunk now and then, never the last one.
    let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let rounds = Arc::new(AtomicUsize::new(0));
    let trickle = {
        let (stop, rounds) = (Arc::clone(&stop), Arc::clone(&rounds));
        let streams: Vec<TcpStream> = tricklers
            .iter()
            .map(|s| s.try_clone().expect("clone"))
            .collect();
        thread::spawn(move || {
            while !stop.load(Ordering::SeqCst) {
                for mut s in &streams {
                    let _ = s.write_all(b"1\r\na\r\n");
                }
                rounds.fetch_add(1, Ordering::SeqCst);
                thread::sleep(Duration::from_millis(100));
            }
        })
    };
    // Until the uploads are where Echo keeps them: a fetch worker for each (today's
    // pool, which then queues the third), or, if they hold none, half a second of chunks.
    let stats = echo.echo.proxy.stats();
    wait_until("the uploads settle", Duration::from_secs(10), || {
        stats.queued().1 >= 1 || rounds.load(Ordering::SeqCst) >= 5
    });
    let mut c = RawClient::connect(echo.addr);
    c.set_read_timeout(Duration::from_secs(5));
    let resp = c
        .read_response_after(&client::build_request("GET", "/small", &[], b""))
        .unwrap_or_else(|e| panic!("a miss waited behind trickled uploads: {e}"));
    assert_eq!(resp.body_str(), "small");
    stop.store(true, Ordering::SeqCst);
    let _ = trickle.join();
    assert_eq!(
        origin.hits("/upload/0"),
        0,
        "an incomplete upload reached the origin"
    );
}

#[test]
fn issue13_a_slow_reader_is_cut_at_the_absolute_response_deadline() {
    // 16 MiB at about 1.3 MB/s would take 12 s; every write makes progress, so a timeout
    // that restarts on each write never fires. The deadline: 1 s plus the body at the
    // minimum rate (100 MB/s here), so about 1.2 s.
    let origin = TestOrigin::start(|_| {
        OriginResponse::ok(vec![b's'; 16 << 20]).header("Cache-Control", "no-store")
    });
    let echo = EchoUnderTest::with_config(config(
        &origin.url(),
        "[server]\nwrite_timeout_ms = 1000\nmin_rate_bytes_per_sec = 100000000\n",
    ));
    let mut stream = TcpStream::connect(echo.addr).expect("connect");
    stream
        .write_all(&client::build_request("GET", "/slow", &[], b""))
        .expect("send");
    stream
        .set_read_timeout(Some(Duration::from_secs(10)))
        .expect("timeout");
    let started = Instant::now();
    let mut received = 0usize;
    let mut buf = vec![0u8; 64 * 1024];
    loop {
        match stream.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => received += n,
        }
        assert!(started.elapsed() < Duration::from_secs(30), "never cut");
        thread::sleep(Duration::from_millis(50));
    }
    assert!(
        received < 16 << 20,
        "a slow reader got the whole body ({received} bytes in {:?})",
        started.elapsed()
    );
}

#[test]
fn issue13_a_trickled_body_is_refused_at_the_absolute_body_deadline() {
    let origin = TestOrigin::start(|_| OriginResponse::ok("stored"));
    let echo = EchoUnderTest::with_config(config(
        &origin.url(),
        "[server]\nbody_timeout_ms = 1000\nmin_rate_bytes_per_sec = 1000000\n",
    ));
    let mut stream = TcpStream::connect(echo.addr).expect("connect");
    let head = "PUT /doc HTTP/1.1\r\nHost: test.local\r\nContent-Length: 1048576\r\n\r\n";
    stream.write_all(head.as_bytes()).expect("send");
    let started = Instant::now();
    // 4 KiB every 100 ms: progress all the time, 25 s for the whole body.
    let writer = {
        let mut s = stream.try_clone().expect("clone");
        thread::spawn(move || {
            for _ in 0..256 {
                if s.write_all(&[b'x'; 4096]).is_err() {
                    return;
                }
                thread::sleep(Duration::from_millis(100));
            }
        })
    };
    stream
        .set_read_timeout(Some(Duration::from_secs(20)))
        .expect("timeout");
    let mut answer = Vec::new();
    let _ = stream.read_to_end(&mut answer);
    let took = started.elapsed();
    // The point is the absolute deadline (about 2 s here), against the 25 s the trickle
    // would take with a timeout that restarts on each read.
    assert!(
        took < Duration::from_secs(8),
        "the trickle went on for {took:?}"
    );
    let text = String::from_utf8_lossy(&answer);
    assert!(
        text.is_empty() || text.starts_with("HTTP/1.1 408"),
        "{text}"
    );
    assert_eq!(
        origin.total_hits(),
        0,
        "an incomplete body reached the origin whole"
    );
    drop(stream);
    let _ = writer.join();
}

// -----------------------------------------------------------------------------------------
// Finding 8: admin listener starvation.

#[test]
fn issue13_health_and_ready_answer_at_once_whatever_other_admin_clients_do() {
    let origin = TestOrigin::start(|_| OriginResponse::ok("x"));
    let echo = EchoUnderTest::with_config(config(
        &origin.url(),
        &format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n"),
    ));
    let admin = echo.admin.expect("admin");
    // Two clients pipeline thousands of /health requests and never read an answer.
    let burst: Vec<u8> = client::build_request("GET", "/health", &[], b"").repeat(20_000);
    let hogs: Vec<(TcpStream, thread::JoinHandle<()>)> = (0..2)
        .map(|_| {
            let stream = small_window_connect(admin);
            let mut writer = stream.try_clone().expect("clone");
            let _ = writer.set_write_timeout(Some(Duration::from_secs(20)));
            let burst = burst.clone();
            let t = thread::spawn(move || {
                let _ = writer.write_all(&burst);
            });
            (stream, t)
        })
        .collect();
    // Until the hogs hold what they can: a probe that needs the admin pool waits in its
    // queue (more than the hogs' own one request each), which is what a pool blocked on
    // the hogs shows; or, if the hogs hold none of it, two seconds of probes were answered.
    let stats = echo.echo.admin.as_ref().expect("admin server").stats();
    let bearer = format!("Bearer {TOKEN}");
    let probe = client::build_request("GET", "/metrics", &[("Authorization", &bearer)], b"");
    let until = Instant::now() + Duration::from_secs(2);
    let mut probes = Vec::new();
    while stats.queued().0 <= 2 && Instant::now() < until {
        let mut c = RawClient::connect(admin);
        c.send(&probe);
        probes.push(c);
        thread::sleep(Duration::from_millis(50));
    }
    for path in ["/health", "/ready"] {
        let started = Instant::now();
        let mut c = RawClient::connect(admin);
        c.set_read_timeout(Duration::from_secs(5));
        let resp = c
            .read_response_after(&client::build_request("GET", path, &[], b""))
            .unwrap_or_else(|e| panic!("{path} starved by other admin clients: {e}"));
        assert_eq!(resp.status, 200, "{path}");
        // Latency is the point ("at once"): a few ms expected.
        assert!(
            started.elapsed() < Duration::from_secs(1),
            "{path} took {:?}",
            started.elapsed()
        );
    }
    for (stream, t) in hogs {
        let _ = stream.shutdown(std::net::Shutdown::Both);
        let _ = t.join();
    }
}
