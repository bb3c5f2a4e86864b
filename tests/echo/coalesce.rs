//! Coalescing: concurrent misses for one key cost one origin fetch, on one node and
//! across nodes sharing Redis; answers that may not be shared are never handed to
//! another client; a failed or slow leader never wedges its key.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use crate::support::client::{self, RawResponse};
use crate::support::echo::{config, redis_sections, EchoUnderTest};
use crate::support::redis::RedisServer;
use crate::support::{wait_until, Gate, Hold, OriginResponse, TestOrigin};

/// An origin that holds requests for `/held*` until `gate` opens (10 s at most).
fn holding_origin(gate: Hold, respond: fn(&str, usize) -> OriginResponse) -> TestOrigin {
    let count = Arc::new(AtomicUsize::new(0));
    TestOrigin::start(move |req| {
        let n = count.fetch_add(1, Ordering::SeqCst);
        if req.target.starts_with("/held") {
            gate.wait(Duration::from_secs(10));
        }
        respond(&req.target, n)
    })
}

/// Sends `n` concurrent GETs to each address in `addrs`; returns their responses.
fn concurrent_gets(
    addrs: &[std::net::SocketAddr],
    n: usize,
    target: &'static str,
) -> Vec<thread::JoinHandle<RawResponse>> {
    addrs
        .iter()
        .flat_map(|addr| {
            (0..n).map(move |_| {
                let addr = *addr;
                thread::spawn(move || client::get(addr, target, &[]))
            })
        })
        .collect()
}

fn join_all(handles: Vec<thread::JoinHandle<RawResponse>>) -> Vec<RawResponse> {
    handles
        .into_iter()
        .map(|h| h.join().expect("client thread"))
        .collect()
}

fn collapsed(responses: &[RawResponse]) -> usize {
    responses
        .iter()
        .filter(|r| r.header("cache-status").unwrap_or("").contains("collapsed"))
        .count()
}

#[test]
fn fifty_concurrent_misses_cost_one_origin_fetch() {
    let gate = Gate::new();
    let origin = holding_origin(gate.hold(), |t, _| {
        OriginResponse::ok(format!("body of {t}")).header("Cache-Control", "max-age=60")
    });
    let echo = EchoUnderTest::start(&origin.url());
    let leader = concurrent_gets(&[echo.addr], 1, "/held/50");
    wait_until(
        "the leader reaches the origin",
        Duration::from_secs(5),
        || origin.hits("/held/50") == 1,
    );
    let followers = concurrent_gets(&[echo.addr], 49, "/held/50");
    wait_until(
        "every follower is connected",
        Duration::from_secs(5),
        || echo.echo.proxy.open_connections() >= 50,
    );
    gate.open();
    let mut responses = join_all(leader);
    responses.extend(join_all(followers));
    assert_eq!(
        origin.hits("/held/50"),
        1,
        "one origin fetch for 50 requests"
    );
    for r in &responses {
        assert_eq!((r.status, r.body_str().as_str()), (200, "body of /held/50"));
    }
    assert!(
        collapsed(&responses) >= 1,
        "followers answered from the leader's fetch"
    );
}

#[test]
fn answers_that_may_not_be_shared_are_fetched_by_each_request() {
    let gate = Gate::new();
    let origin = holding_origin(gate.hold(), |_, n| {
        OriginResponse::ok(format!("private answer {n}"))
            .header("Cache-Control", "private, max-age=60")
    });
    let echo = EchoUnderTest::start(&origin.url());
    let leader = concurrent_gets(&[echo.addr], 1, "/held/private");
    wait_until(
        "the leader reaches the origin",
        Duration::from_secs(5),
        || origin.hits("/held/private") == 1,
    );
    let followers = concurrent_gets(&[echo.addr], 9, "/held/private");
    wait_until(
        "every follower is connected",
        Duration::from_secs(5),
        || echo.echo.proxy.open_connections() >= 10,
    );
    gate.open();
    let mut responses = join_all(leader);
    responses.extend(join_all(followers));
    assert_eq!(
        origin.hits("/held/private"),
        10,
        "every request went to the origin itself"
    );
    let mut bodies: Vec<String> = responses.iter().map(|r| r.body_str()).collect();
    bodies.sort();
    bodies.dedup();
    assert_eq!(
        bodies.len(),
        10,
        "no private answer was handed to another client"
    );
    assert_eq!(collapsed(&responses), 0);
}

#[test]
fn a_failed_leader_does_not_wedge_its_key() {
    let gate = Gate::new();
    let origin = holding_origin(gate.hold(), |_, n| {
        let resp = OriginResponse::ok(vec![b'x'; 1000]).header("Cache-Control", "max-age=60");
        // The leader's answer breaks off mid-body; later ones are whole.
        if n == 0 {
            resp.truncate_after(10)
        } else {
            resp
        }
    });
    let echo = EchoUnderTest::start(&origin.url());
    let leader = concurrent_gets(&[echo.addr], 1, "/held/fail");
    wait_until(
        "the leader reaches the origin",
        Duration::from_secs(5),
        || origin.hits("/held/fail") == 1,
    );
    let followers = concurrent_gets(&[echo.addr], 5, "/held/fail");
    wait_until(
        "every follower is connected",
        Duration::from_secs(5),
        || echo.echo.proxy.open_connections() >= 6,
    );
    gate.open();
    // The leader's own client sees a cut answer; only the followers matter here.
    for h in leader {
        let _ = h.join();
    }
    for r in join_all(followers) {
        assert_eq!(
            (r.status, r.body.len()),
            (200, 1000),
            "a follower got a whole answer"
        );
    }
    assert_eq!(
        client::get(echo.addr, "/held/fail", &[]).header("x-cache-status"),
        Some("HIT")
    );
}

/// A follower waits as long as its leader is alive, however long the origin takes
/// within its own timeouts: the retired `coalesce_wait_ms` (300 ms here) is ignored.
#[test]
fn followers_wait_as_long_as_their_leader_is_alive() {
    let gate = Gate::new();
    let origin = holding_origin(gate.hold(), |t, n| {
        OriginResponse::ok(format!("{t} answer {n}")).header("Cache-Control", "max-age=60")
    });
    let echo =
        EchoUnderTest::with_config(config(&origin.url(), "[cache]\ncoalesce_wait_ms = 300\n"));
    let leader = concurrent_gets(&[echo.addr], 1, "/held/slow");
    wait_until(
        "the leader reaches the origin",
        Duration::from_secs(5),
        || origin.hits("/held/slow") == 1,
    );
    let followers = concurrent_gets(&[echo.addr], 10, "/held/slow");
    // Well past the old 300 ms wait, within the origin's 2 s response timeout.
    thread::sleep(Duration::from_millis(1200));
    assert_eq!(origin.hits("/held/slow"), 1, "a follower stopped waiting");
    gate.open();
    let leader = join_all(leader).remove(0);
    let followers = join_all(followers);
    assert_eq!(origin.hits("/held/slow"), 1);
    for r in &followers {
        assert_eq!(r.status, 200);
        assert_eq!(r.body, leader.body);
    }
    assert_eq!(collapsed(&followers), 10);
}

#[test]
fn twenty_misses_over_two_nodes_on_one_redis_cost_one_fetch() {
    let master = RedisServer::master();
    let replica = RedisServer::replica_of(&master);
    let gate = Gate::new();
    let origin = holding_origin(gate.hold(), |t, _| {
        OriginResponse::ok(format!("body of {t}")).header("Cache-Control", "max-age=60")
    });
    let redis = redis_sections(&master, &[&replica], "", "");
    let a = EchoUnderTest::with_config(config(&origin.url(), &redis));
    let b = EchoUnderTest::with_config(config(&origin.url(), &redis));
    let first = concurrent_gets(&[a.addr], 1, "/held/nodes");
    wait_until(
        "the first fetch reaches the origin",
        Duration::from_secs(5),
        || origin.hits("/held/nodes") == 1,
    );
    let rest = concurrent_gets(&[a.addr, b.addr], 10, "/held/nodes");
    wait_until("every client is connected", Duration::from_secs(5), || {
        a.echo.proxy.open_connections() >= 11 && b.echo.proxy.open_connections() >= 10
    });
    gate.open();
    let mut responses = join_all(first);
    responses.extend(join_all(rest));
    assert_eq!(responses.len(), 21);
    for r in &responses {
        assert_eq!(
            (r.status, r.body_str().as_str()),
            (200, "body of /held/nodes")
        );
    }
    assert_eq!(origin.hits("/held/nodes"), 1, "one fetch across both nodes");
    assert!(collapsed(&responses) >= 1);
}
