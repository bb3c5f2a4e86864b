//! Staleness: stale-while-revalidate (answer at once, refresh once in the background),
//! stale-if-error (only within its window), must-revalidate (504, never stale), the
//! client's request directives, the operator's default TTL and refresh-ahead.
//! Time-dependent steps wait for a condition with a deadline, never a fixed sleep.

use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::support::client::{self, RawResponse};
use crate::support::echo::{config, EchoUnderTest};
use crate::support::{wait_until, Gate, OriginResponse, TestOrigin};

/// The first response that is not a HIT (so the entry went stale), within 10 s.
fn first_not_hit(echo: &EchoUnderTest, target: &str, headers: &[(&str, &str)]) -> RawResponse {
    let mut answer = None;
    wait_until(
        &format!("{target} is no longer fresh"),
        Duration::from_secs(10),
        || {
            let resp = client::get(echo.addr, target, headers);
            let hit = resp.header("x-cache-status") == Some("HIT");
            if !hit {
                answer = Some(resp);
            }
            !hit
        },
    );
    answer.expect("a response that was not a hit")
}

fn status(resp: &RawResponse) -> &str {
    resp.header("x-cache-status").unwrap_or("?")
}

#[test]
fn stale_while_revalidate_answers_at_once_and_refreshes_once() {
    let version = Arc::new(AtomicU64::new(1));
    // Once set, refreshes are held at the origin until the gate opens.
    let slow_refresh = Arc::new(AtomicBool::new(false));
    let gate = Gate::new();
    let (v, slow, held) = (Arc::clone(&version), Arc::clone(&slow_refresh), gate.hold());
    let origin = TestOrigin::start(move |_| {
        let resp = OriginResponse::ok(format!("v{}", v.load(Ordering::SeqCst)));
        if !slow.load(Ordering::SeqCst) {
            return resp.header("Cache-Control", "max-age=1, stale-while-revalidate=60");
        }
        held.wait(Duration::from_secs(10));
        // The refreshed copy lives long enough to outlast the time it took (its age
        // counts it, RFC 9111 §4.2.3).
        resp.header("Cache-Control", "max-age=60, stale-while-revalidate=60")
    });
    let echo = EchoUnderTest::start(&origin.url());
    assert_eq!(status(&client::get(echo.addr, "/swr", &[])), "MISS");
    version.store(2, Ordering::SeqCst);
    slow_refresh.store(true, Ordering::SeqCst);
    let stale = first_not_hit(&echo, "/swr", &[]);
    assert_eq!(status(&stale), "STALE");
    assert_eq!(stale.body_str(), "v1", "the stored copy answers");
    assert!(
        stale
            .header("cache-status")
            .unwrap_or("")
            .contains("detail=stale-while-revalidate"),
        "{:?}",
        stale.header("cache-status")
    );
    // While the (held) refresh runs, more requests get the stale copy at once, and the
    // origin sees one refresh, not one per request.
    for _ in 0..10 {
        let t = Instant::now();
        let resp = client::get(echo.addr, "/swr", &[]);
        assert_eq!((status(&resp), resp.body_str().as_str()), ("STALE", "v1"));
        // Latency is the point ("at once"): an answer that waited on the refresh would
        // wait until the gate opens, 10 s at most; 1 s is generous for an answer from
        // the store.
        assert!(
            t.elapsed() < Duration::from_secs(1),
            "a stale answer waited {:?}",
            t.elapsed()
        );
    }
    gate.open();
    wait_until(
        "the refreshed copy is served",
        Duration::from_secs(10),
        || {
            let resp = client::get(echo.addr, "/swr", &[]);
            status(&resp) == "HIT" && resp.body_str() == "v2"
        },
    );
    assert_eq!(origin.hits("/swr"), 2, "one fill, one background refresh");
}

/// An origin whose answers can be switched to 503 (or which can refuse connections by
/// being dropped), with the given Cache-Control.
fn failing_origin(cache_control: &'static str, failing: Arc<AtomicUsize>) -> TestOrigin {
    TestOrigin::start(move |_| {
        if failing.load(Ordering::SeqCst) == 1 {
            return OriginResponse::ok("down").with_status(503);
        }
        OriginResponse::ok("good copy").header("Cache-Control", cache_control)
    })
}

#[test]
fn stale_if_error_serves_the_stored_copy_while_the_origin_fails_and_not_after_the_window() {
    let failing = Arc::new(AtomicUsize::new(0));
    let origin = failing_origin("max-age=1, stale-if-error=2", Arc::clone(&failing));
    let echo = EchoUnderTest::start(&origin.url());
    client::get(echo.addr, "/sie", &[]);
    failing.store(1, Ordering::SeqCst);
    let resp = first_not_hit(&echo, "/sie", &[]);
    assert_eq!(
        (resp.status, status(&resp), resp.body_str().as_str()),
        (200, "STALE", "good copy")
    );
    assert!(resp
        .header("cache-status")
        .unwrap_or("")
        .contains("stale-if-error-status-503"));
    // The origin was tried first.
    assert_eq!(origin.hits("/sie"), 2);
    // Past freshness + stale-if-error, the error goes through.
    wait_until(
        "the stale-if-error window closes",
        Duration::from_secs(10),
        || client::get(echo.addr, "/sie", &[]).status == 503,
    );
}

#[test]
fn stale_if_error_covers_an_unreachable_origin() {
    let failing = Arc::new(AtomicUsize::new(0));
    let origin = failing_origin("max-age=1, stale-if-error=60", Arc::clone(&failing));
    let echo = EchoUnderTest::start(&origin.url());
    client::get(echo.addr, "/down", &[]);
    drop(origin);
    let resp = first_not_hit(&echo, "/down", &[]);
    assert_eq!(
        (resp.status, status(&resp), resp.body_str().as_str()),
        (200, "STALE", "good copy")
    );
    assert!(resp
        .header("cache-status")
        .unwrap_or("")
        .contains("stale-if-error-connect"));
}

#[test]
fn must_revalidate_is_never_served_stale_and_an_unreachable_origin_is_a_504() {
    let failing = Arc::new(AtomicUsize::new(0));
    let origin = failing_origin(
        "max-age=1, must-revalidate, stale-if-error=60",
        Arc::clone(&failing),
    );
    let echo = EchoUnderTest::start(&origin.url());
    client::get(echo.addr, "/mr", &[]);
    drop(origin);
    let resp = first_not_hit(&echo, "/mr", &[]);
    assert_eq!(resp.status, 504, "{}", resp.body_str());
    assert_ne!(resp.body_str(), "good copy");
}

#[test]
fn request_directives_are_honoured() {
    let origin = TestOrigin::start(|req| {
        OriginResponse::ok(format!("body of {}", req.target)).header("Cache-Control", "max-age=1")
    });
    let echo = EchoUnderTest::start(&origin.url());
    client::get(echo.addr, "/d", &[]);
    // no-cache and max-age=0 go to the origin; only-if-cached is answered from the store.
    for cc in ["no-cache", "max-age=0"] {
        let resp = client::get(echo.addr, "/d", &[("Cache-Control", cc)]);
        assert_ne!(status(&resp), "HIT", "{cc}");
    }
    let pragma = client::get(echo.addr, "/d", &[("Pragma", "no-cache")]);
    assert_ne!(
        status(&pragma),
        "HIT",
        "Pragma: no-cache from an HTTP/1.0-era client"
    );
    let hits = origin.hits("/d");
    let cached = client::get(echo.addr, "/d", &[("Cache-Control", "only-if-cached")]);
    assert_eq!((cached.status, status(&cached)), (200, "HIT"));
    let missing = client::get(
        echo.addr,
        "/nothing",
        &[("Cache-Control", "only-if-cached")],
    );
    assert_eq!(missing.status, 504);
    assert_eq!(
        origin.hits("/nothing"),
        0,
        "only-if-cached never reaches the origin"
    );
    assert_eq!(origin.hits("/d"), hits);
    // Past its freshness, max-stale accepts the stored copy.
    wait_until("the entry is stale", Duration::from_secs(10), || {
        client::get(echo.addr, "/d", &[("Cache-Control", "only-if-cached")]).status == 504
    });
    let accepted = client::get(echo.addr, "/d", &[("Cache-Control", "max-stale")]);
    assert_eq!(status(&accepted), "STALE");
}

#[test]
fn request_directives_can_be_ignored_by_config() {
    let origin =
        TestOrigin::start(|_| OriginResponse::ok("x").header("Cache-Control", "max-age=60"));
    let echo = EchoUnderTest::with_config(config(
        &origin.url(),
        "[cache]\nhonor_request_cache_control = false\n",
    ));
    client::get(echo.addr, "/i", &[]);
    let resp = client::get(echo.addr, "/i", &[("Cache-Control", "no-cache")]);
    assert_eq!(status(&resp), "HIT");
    assert_eq!(origin.hits("/i"), 1);
}

#[test]
fn a_default_ttl_stores_what_the_origin_said_nothing_about() {
    let origin = TestOrigin::start(|_| OriginResponse::ok("plain"));
    let off = EchoUnderTest::start(&origin.url());
    client::get(off.addr, "/plain", &[]);
    assert_eq!(
        status(&client::get(off.addr, "/plain", &[])),
        "MISS",
        "off by default"
    );
    let on = EchoUnderTest::with_config(config(&origin.url(), "[cache]\ndefault_ttl_ms = 60000\n"));
    client::get(on.addr, "/plain", &[]);
    assert_eq!(status(&client::get(on.addr, "/plain", &[])), "HIT");
}

#[test]
fn refresh_ahead_revalidates_hot_entries_before_they_expire() {
    let conditional = Arc::new(AtomicUsize::new(0));
    let c = Arc::clone(&conditional);
    let origin = TestOrigin::start(move |req| {
        if req.header("if-none-match") == Some("\"e1\"") {
            c.fetch_add(1, Ordering::SeqCst);
            return OriginResponse::status(304)
                .header("ETag", "\"e1\"")
                .header("Cache-Control", "max-age=3");
        }
        OriginResponse::ok("hot")
            .header("ETag", "\"e1\"")
            .header("Cache-Control", "max-age=3")
    });
    let echo =
        EchoUnderTest::with_config(config(&origin.url(), "[cache]\nrefresh_ahead_ms = 2500\n"));
    client::get(echo.addr, "/hot", &[]);
    // Every read here is a hit; one within 2.5 s of expiry sends a background revalidation.
    wait_until("a background revalidation", Duration::from_secs(10), || {
        let resp = client::get(echo.addr, "/hot", &[]);
        assert_eq!(status(&resp), "HIT");
        conditional.load(Ordering::SeqCst) >= 1
    });
}
