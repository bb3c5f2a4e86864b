//! The local tier in front of Redis (issue 18): hits from each node's memory, kept
//! coherent by Redis's client-side caching. Three nodes on a master and a replica: a
//! hit comes from the tier once read; after `POST /invalidate` returns, and after a PUT
//! through one node, no node serves the old version; a FLUSHALL and a killed tracking
//! connection empty it; a paused replica cannot leave a stale copy behind an
//! invalidation; the byte bound holds under a flood of keys; a Redis that refuses
//! tracking runs Echo without the tier, and says so; a node cut off from Redis empties
//! its tier before a job stops waiting for it.

use std::time::Duration;

use serde_json::Value;

use crate::support::admin;
use crate::support::client::{self, RawClient};
use crate::support::echo::{config, redis_node, EchoUnderTest, QUICK_REDIS};
use crate::support::redis::RedisServer;
use crate::support::{wait_until, OriginResponse, TestOrigin, Versioned};

const TOKEN: &str = "local-token";
const HOST: &str = "local.example";

/// An Echo node on `master` and `replicas`, with the admin API; `redis` is added to
/// `[redis]`.
fn node(
    origin: &TestOrigin,
    master: &RedisServer,
    replicas: &[&RedisServer],
    redis: &str,
) -> EchoUnderTest {
    redis_node(&origin.url(), master, replicas, TOKEN, redis)
}

/// `/health`'s `store.local_tier`.
fn tier(echo: &EchoUnderTest) -> Value {
    let auth = format!("Bearer {TOKEN}");
    let resp = RawClient::connect(echo.admin.expect("admin")).request(
        "GET",
        "/health",
        &[("Authorization", &auth)],
        b"",
    );
    let health: Value = serde_json::from_slice(&resp.body).expect("health JSON");
    health["store"]["local_tier"].clone()
}

fn wait_tier_on(echo: &EchoUnderTest) {
    wait_until("the local tier is on", Duration::from_secs(5), || {
        tier(echo)["state"] == "on"
    });
}

/// GET `target` on `echo`: (Cache-Status, body).
fn get(echo: &EchoUnderTest, target: &str) -> (String, String) {
    let resp = client::get(echo.addr, target, &[("Host", HOST)]);
    assert_eq!(resp.status, 200, "{target}: {}", resp.body_str());
    let status = resp.header("cache-status").unwrap_or("?").to_string();
    (status, resp.body_str())
}

/// Reads `target` on `echo` until it is a hit from the local tier.
fn until_local(echo: &EchoUnderTest, target: &str) -> String {
    let mut body = String::new();
    wait_until("a hit from the local tier", Duration::from_secs(5), || {
        let (status, b) = get(echo, target);
        body = b;
        status.contains("detail=local")
    });
    body
}

/// `n` nodes on a master and a replica, each with its tier on and holding `targets`
/// (filled through the first node).
struct Cluster {
    v: Versioned,
    master: RedisServer,
    replica: RedisServer,
    nodes: Vec<EchoUnderTest>,
}

fn cluster(n: usize, targets: &[&str]) -> Cluster {
    let v = Versioned::start();
    let master = RedisServer::master();
    let replica = RedisServer::replica_of(&master);
    let nodes: Vec<EchoUnderTest> = (0..n)
        .map(|_| node(&v.origin, &master, &[&replica], ""))
        .collect();
    for n in &nodes {
        wait_tier_on(n);
    }
    for t in targets {
        get(&nodes[0], t);
        for n in &nodes {
            assert!(until_local(n, t).ends_with("v1"));
        }
    }
    Cluster {
        v,
        master,
        replica,
        nodes,
    }
}

fn invalidate(echo: &EchoUnderTest, body: &str) -> Value {
    let (status, report) = admin::invalidate(echo.admin.expect("admin"), TOKEN, body);
    assert_eq!(status, 200, "{report}");
    report
}

#[test]
fn hits_come_from_the_local_tier_and_never_outlive_an_invalidation_or_a_put() {
    let targets: Vec<String> = (0..5).map(|i| format!("/orgs/7/item/{i}")).collect();
    // Every node reads each from Redis once, then holds it.
    let refs: Vec<&str> = targets.iter().map(String::as_str).collect();
    // The servers stay up for the test (`..` would drop them).
    let Cluster {
        v,
        master: _master,
        replica: _replica,
        nodes,
    } = cluster(3, &refs);
    let before = v.origin.total_hits();

    v.set(2);
    let report = invalidate(&nodes[1], r#"{"pattern": "^/orgs/7/"}"#);
    assert_eq!(report["matched"], 5, "{report}");
    // The moment it returned: no node serves a matched entry from its tier (or
    // anywhere): the first read anywhere is the new version.
    for n in &nodes {
        for t in &targets {
            let (status, body) = get(n, t);
            assert!(body.ends_with("v2"), "{t} on a node: {status} {body}");
        }
    }
    assert!(v.origin.total_hits() > before);

    // A PUT through one node: its answer sent, every node serves the new version.
    for n in &nodes {
        assert!(until_local(n, &targets[0]).ends_with("v2"));
    }
    v.set(3);
    let put =
        RawClient::connect(nodes[2].addr).request("PUT", &targets[0], &[("Host", HOST)], b"new");
    assert_eq!(put.status, 204);
    for n in &nodes {
        let (status, body) = get(n, &targets[0]);
        assert!(body.ends_with("v3"), "after the PUT: {status} {body}");
    }
    let counts = tier(&nodes[0]);
    assert!(counts["hits"].as_u64() > Some(0), "{counts}");
    assert!(counts["invalidations"].as_u64() > Some(0), "{counts}");
    let metrics = admin::metrics(nodes[0].admin.expect("admin"), TOKEN);
    assert!(admin::sample(&metrics, "echo_local_cache_hits_total") > Some(0.0));
    assert_eq!(admin::sample(&metrics, "echo_local_cache_on"), Some(1.0));
}

#[test]
fn changes_behind_echos_back_and_lost_tracking_empty_the_tier() {
    let t = "/behind/1";
    let Cluster {
        v,
        master,
        replica,
        nodes,
    } = cluster(2, &[t]);
    // A DEL on the master behind Echo's back: gone from every tier.
    v.set(2);
    let _: () = redis::cmd("DEL")
        .arg(format!("echo:v1:http://{HOST}{t}"))
        .query(&mut master.connection())
        .expect("DEL");
    for n in &nodes {
        wait_until(
            "the DEL reaches the tier",
            Duration::from_millis(500),
            || get(n, t).1.ends_with("v2"),
        );
    }
    // FLUSHALL: every tier flushed within 100 ms.
    for n in &nodes {
        until_local(n, t);
    }
    let flushes: Vec<u64> = nodes
        .iter()
        .map(|n| tier(n)["flushes"].as_u64().unwrap_or(0))
        .collect();
    v.set(3);
    let _: () = redis::cmd("FLUSHALL")
        .query(&mut master.connection())
        .expect("FLUSHALL");
    for (n, before) in nodes.iter().zip(flushes) {
        wait_until(
            "the FLUSHALL empties the tier",
            Duration::from_millis(100),
            || tier(n)["flushes"].as_u64().unwrap_or(0) > before,
        );
        assert!(get(n, t).1.ends_with("v3"));
    }
    // A tracking connection killed: the tier is flushed, serving goes on from Redis,
    // and the tier comes back.
    for n in &nodes {
        until_local(n, t);
    }
    let flushes = || -> u64 {
        nodes
            .iter()
            .map(|n| tier(n)["flushes"].as_u64().unwrap_or(0))
            .sum()
    };
    let before = flushes();
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(&mut replica.connection())
        .expect("CLIENT LIST");
    let tracking: Vec<&str> = clients
        .lines()
        .filter(|l| {
            l.split(' ')
                .any(|f| f.starts_with("flags=") && f.contains('t'))
        })
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .collect();
    assert_eq!(
        tracking.len(),
        2,
        "one tracking connection per node: {clients}"
    );
    let _: () = redis::cmd("CLIENT")
        .arg("KILL")
        .arg("ID")
        .arg(tracking[0])
        .query(&mut replica.connection())
        .expect("CLIENT KILL");
    wait_until("its node flushes its tier", Duration::from_secs(2), || {
        flushes() > before
    });
    for n in &nodes {
        assert!(get(n, t).1.ends_with("v3"), "served on");
        until_local(n, t);
    }
}

#[test]
fn a_paused_replica_leaves_no_stale_copy_behind_an_invalidation() {
    let t = "/paused/1";
    let Cluster {
        v,
        master: _master,
        replica,
        nodes,
    } = cluster(2, &[t]);
    replica.pause();
    v.set(2);
    let report = invalidate(&nodes[0], &format!(r#"{{"url": "http://{HOST}{t}"}}"#));
    assert_eq!(report["matched"], 1, "{report}");
    for n in &nodes {
        let (status, body) = get(n, t);
        assert!(
            body.ends_with("v2"),
            "with the replica paused: {status} {body}"
        );
    }
    replica.resume();
    for n in &nodes {
        assert!(until_local(n, t).ends_with("v2"));
    }
}

#[test]
fn the_tier_holds_its_byte_bound_under_a_flood_of_keys() {
    let origin = TestOrigin::start(|req| {
        OriginResponse::ok(format!("{}{}", req.target, "x".repeat(4096)))
            .header("Cache-Control", "max-age=600")
    });
    let master = RedisServer::master();
    let bound = 256 * 1024;
    let echo = node(
        &origin,
        &master,
        &[],
        &format!("local_cache_max_bytes = {bound}\n"),
    );
    wait_tier_on(&echo);
    for i in 0..400 {
        let t = format!("/flood/{i}");
        get(&echo, &t);
        get(&echo, &t);
    }
    let report = tier(&echo);
    let bytes = report["bytes"].as_u64().expect("bytes");
    let entries = report["entries"].as_u64().expect("entries");
    assert!(bytes <= bound, "{report}");
    assert!(entries > 10 && entries < 400, "bounded, and used: {report}");
}

#[test]
fn a_redis_that_refuses_tracking_runs_echo_without_the_tier() {
    let v = Versioned::start();
    let master = RedisServer::master();
    let _: () = redis::cmd("ACL")
        .arg("SETUSER")
        .arg("echo")
        .arg("on")
        .arg(">secret")
        .arg("~*")
        .arg("&*")
        .arg("+@all")
        .arg("-client|tracking")
        .query(&mut master.connection())
        .expect("ACL SETUSER");
    let url = master.url().replace("redis://", "redis://echo:secret@");
    let redis = format!("{QUICK_REDIS}\n");
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n[cache]\nstore = \"redis\"\n\
         [redis]\nmaster = \"{url}\"\n{redis}"
    );
    let echo = EchoUnderTest::with_config(config(&v.origin.url(), &text));
    wait_until(
        "the tier says it is refused",
        Duration::from_secs(5),
        || tier(&echo)["state"] == "refused",
    );
    assert!(
        tier(&echo)["reason"]
            .as_str()
            .is_some_and(|r| !r.is_empty()),
        "{}",
        tier(&echo)
    );
    get(&echo, "/refused");
    let (status, body) = get(&echo, "/refused");
    assert!(status.contains("detail=redis"), "{status}");
    assert!(body.ends_with("v1"));
}

/// A node cut off from Redis (every connection of its held in a relay) cannot hear an
/// invalidation or acknowledge it: the job stops waiting for it after a lease, and by
/// then the node has found its tracking silent and emptied its tier, so it never serves
/// the invalidated entry from memory.
#[test]
fn a_node_cut_off_from_redis_empties_its_tier_before_a_job_stops_waiting_for_it() {
    let v = Versioned::start();
    let master = RedisServer::master();
    let relay = crate::support::relay::Relay::to(([127, 0, 0, 1], master.port).into());
    let a = node(&v.origin, &master, &[], "");
    let text = format!(
        "[cache]\nstore = \"redis\"\n[redis]\nmaster = \"redis://127.0.0.1:{}\"\n{QUICK_REDIS}",
        relay.port()
    );
    let b = EchoUnderTest::with_config(config(&v.origin.url(), &text));
    wait_tier_on(&a);
    let t = "/cut/1";
    get(&a, t);
    until_local(&a, t);
    // b has no admin API: its tier shows in its hits.
    wait_until("b holds it locally", Duration::from_secs(5), || {
        get(&b, t).0.contains("detail=local")
    });
    relay.hold();
    v.set(2);
    let report = invalidate(&a, &format!(r#"{{"url": "http://{HOST}{t}"}}"#));
    assert_eq!(report["matched"], 1, "{report}");
    let (status, body) = get(&b, t);
    assert!(
        !body.ends_with("v1"),
        "b served the invalidated entry: {status} {body}"
    );
    assert!(!status.contains("detail=local"), "{status}");
    relay.release();
}
