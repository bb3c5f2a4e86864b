//! An invalidation's reach on Redis, across Echo nodes and replicas in any state: once
//! `POST /invalidate` returns on one node, no node serves what it deleted, even from
//! a replica that is cut off from its master or lagging with its link up; a node that
//! is gone holds a job up for about a lease at most; an unsafe method's invalidation
//! is not undone by a fill that was in flight (both stores).

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::admin;
use crate::support::client::{self, RawClient};
use crate::support::echo::{redis_node, EchoUnderTest, NO_LOCAL_TIER};
use crate::support::redis::RedisServer;
use crate::support::relay::Relay;
use crate::support::{free_port, wait_until, Gate, Hold, OriginResponse, TestOrigin, Versioned};

const TOKEN: &str = "fence-token";
const HOST: &str = "fence.example";

/// One Echo node on `master` and `replicas`, with the admin API. WAIT gives up on an
/// unreachable replica after 300 ms.
fn node(origin: &TestOrigin, master: &RedisServer, replicas: &[&RedisServer]) -> EchoUnderTest {
    node_with(origin, master, replicas, "")
}

/// `node`, with `redis` added to `[redis]`.
fn node_with(
    origin: &TestOrigin,
    master: &RedisServer,
    replicas: &[&RedisServer],
    redis: &str,
) -> EchoUnderTest {
    redis_node(&origin.url(), master, replicas, TOKEN, redis)
}

/// POST /invalidate on `echo`; the job's report.
fn invalidate(echo: &EchoUnderTest, body: &str) -> Value {
    let (status, report) = admin::invalidate(echo.admin.expect("admin listener"), TOKEN, body);
    assert_eq!(status, 200, "{report}");
    report
}

fn get(echo: &EchoUnderTest, target: &str) -> (String, String) {
    let resp = client::get(echo.addr, target, &[("Host", HOST)]);
    assert_eq!(resp.status, 200, "{target}: {}", resp.body_str());
    let status = resp.header("x-cache-status").unwrap_or("?").to_string();
    (status, resp.body_str())
}

fn redis_key(target: &str) -> String {
    format!("echo:v1:http://{HOST}{target}")
}

/// Waits until `nodes` Echo nodes beat on `master`.
fn wait_for_nodes(master: &RedisServer, nodes: usize) {
    wait_until("every node beats", Duration::from_secs(5), || {
        let live: usize = redis::cmd("ZCARD")
            .arg("echo:v1:nodes")
            .query(&mut master.connection())
            .unwrap_or(0);
        live == nodes
    });
}

/// Fills `target` through `a` and waits until every replica holds it and `b` hits it.
fn warm(a: &EchoUnderTest, b: &EchoUnderTest, replicas: &[&RedisServer], target: &str) {
    assert_eq!(get(a, target).0, "MISS");
    for r in replicas {
        r.wait_for_key(&redis_key(target));
    }
    let (status, body) = get(b, target);
    assert_eq!(status, "HIT");
    assert!(body.ends_with(" v1"), "{body}");
}

/// After the invalidation, `node` serves the new version only, however many times (and
/// so from whichever replica) it is asked.
fn assert_never_old(node: &EchoUnderTest, target: &str) {
    for i in 0..12 {
        let (status, body) = get(node, target);
        assert!(
            body.ends_with(" v2"),
            "read {i} ({status}) served what the invalidation deleted: {body}"
        );
    }
}

#[test]
fn a_replica_cut_off_from_its_master_never_serves_what_an_invalidation_deleted() {
    let master = RedisServer::master();
    let cut = RedisServer::replica_of(&master);
    let healthy = RedisServer::replica_of(&master);
    let o = Versioned::start();
    let a = node(&o.origin, &master, &[&cut, &healthy]);
    let b = node(&o.origin, &master, &[&cut, &healthy]);
    warm(&a, &b, &[&cut, &healthy], "/orgs/1");
    wait_for_nodes(&master, 2);

    // The replica now follows a master that is not there: it keeps serving what it has.
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(free_port())
        .query(&mut cut.connection())
        .expect("REPLICAOF");
    o.version.store(2, Ordering::SeqCst);
    let report = invalidate(&a, r#"{"pattern": "^/orgs/"}"#);
    assert_eq!(report["state"], "done", "{report}");
    assert_eq!(report["deleted"], 1, "{report}");
    assert_eq!(
        report["replicas"],
        serde_json::json!({"acknowledged": 1, "expected": 2}),
        "{report}"
    );
    assert_eq!(
        report["nodes"],
        serde_json::json!({"acknowledged": 1, "expected": 1}),
        "{report}"
    );

    assert_never_old(&b, "/orgs/1");
    assert_never_old(&a, "/orgs/1");
    assert!(
        cut.exists(&redis_key("/orgs/1")),
        "the cut-off replica still holds the deleted entry (and was never read)"
    );
    assert_eq!(o.origin.hits("/orgs/1"), 2, "one fill before, one after");
}

#[test]
fn a_lagging_replica_is_not_read_past_an_invalidation_and_is_read_again_once_caught_up() {
    let master = RedisServer::master();
    let relay = Relay::to(([127, 0, 0, 1], master.port).into());
    let lagging = RedisServer::replica_of(&master);
    let _: () = redis::cmd("REPLICAOF")
        .arg("127.0.0.1")
        .arg(relay.port())
        .query(&mut lagging.connection())
        .expect("REPLICAOF");
    wait_until(
        "the replica syncs through the relay",
        Duration::from_secs(10),
        || {
            lagging.info_field("replication", "master_link_status") == "up"
                && lagging.info_field("replication", "master_port") == relay.port().to_string()
        },
    );
    let healthy = RedisServer::replica_of(&master);
    let o = Versioned::start();
    // Which replica answers is the point: no local tier in front.
    let a = node_with(&o.origin, &master, &[&lagging, &healthy], NO_LOCAL_TIER);
    let b = node_with(&o.origin, &master, &[&lagging, &healthy], NO_LOCAL_TIER);
    warm(&a, &b, &[&lagging, &healthy], "/users/7");
    wait_for_nodes(&master, 2);

    relay.hold();
    o.version.store(2, Ordering::SeqCst);
    let report = invalidate(&a, r#"{"pattern": "^/users/"}"#);
    assert_eq!(report["state"], "done", "{report}");
    assert_eq!(report["nodes"]["acknowledged"], 1, "{report}");
    assert_eq!(
        lagging.info_field("replication", "master_link_status"),
        "up",
        "the lagging replica's link is up: nothing but its offset tells"
    );
    assert_never_old(&b, "/users/7");
    assert!(lagging.exists(&redis_key("/users/7")), "still behind");

    let target = master.info_u64("replication", "master_repl_offset");
    relay.release();
    wait_until("the replica catches up", Duration::from_secs(10), || {
        lagging.info_u64("replication", "slave_repl_offset") >= target
    });
    // Caught up, it serves reads again: Echo's nodes rotate over the replicas.
    let hits = lagging.info_u64("stats", "keyspace_hits");
    for _ in 0..6 {
        assert!(get(&b, "/users/7").1.ends_with(" v2"));
    }
    assert!(
        lagging.info_u64("stats", "keyspace_hits") > hits,
        "the caught-up replica is read again"
    );
}

#[test]
fn a_node_that_is_gone_holds_an_invalidation_up_for_about_a_lease_at_most() {
    let master = RedisServer::master();
    let replica = RedisServer::replica_of(&master);
    let o = Versioned::start();
    let a = node(&o.origin, &master, &[&replica]);
    let b = node(&o.origin, &master, &[&replica]);
    warm(&a, &b, &[&replica], "/gone/1");
    wait_for_nodes(&master, 2);

    // With every node alive, a job waits for their acknowledgements only.
    let started = Instant::now();
    let report = invalidate(&a, r#"{"pattern": "^/gone/"}"#);
    let live = started.elapsed();
    assert_eq!(
        report["nodes"],
        serde_json::json!({"acknowledged": 1, "expected": 1}),
        "{report}"
    );

    // A node that beat just now and died: its last heartbeat, as a node writes it.
    let mut conn = master.connection();
    let (secs, micros): (u64, u64) = redis::cmd("TIME").query(&mut conn).expect("TIME");
    let _: () = redis::pipe()
        .atomic()
        .cmd("ZADD")
        .arg("echo:v1:nodes")
        .arg(secs * 1000 + micros / 1000)
        .arg("gone-node")
        .cmd("HSET")
        .arg("echo:v1:seen")
        .arg("gone-node")
        .arg(0)
        .query(&mut conn)
        .expect("a dead node's heartbeat");
    let started = Instant::now();
    let report = invalidate(&a, r#"{"pattern": "^/gone/"}"#);
    let gone = started.elapsed();
    assert_eq!(report["state"], "done", "{report}");
    assert_eq!(
        report["nodes"],
        serde_json::json!({"acknowledged": 1, "expected": 2}),
        "{report}"
    );
    assert!(
        report["warning"]
            .as_str()
            .unwrap_or("")
            .contains("1 of 2 other Echo nodes"),
        "{report}"
    );
    // The lease is 2 s: the job waits for the silent node until its last beat is that
    // old, and no longer.
    assert!(
        gone >= Duration::from_millis(1_500) && gone < Duration::from_secs(4),
        "a gone node held the job up for {gone:?}"
    );
    assert!(
        live < Duration::from_secs(1),
        "live nodes acknowledged in {live:?}"
    );
}

/// An origin that holds its first GET of /item until `gate` opens, answering with the
/// version it saw when the request arrived; PUTs bump the version.
fn put_origin(gate: Hold) -> TestOrigin {
    let version = Arc::new(AtomicU64::new(1));
    let first = Arc::new(AtomicUsize::new(0));
    TestOrigin::start(move |req| {
        if req.method == "PUT" {
            version.fetch_add(1, Ordering::SeqCst);
            return OriginResponse::status(204);
        }
        let seen = version.load(Ordering::SeqCst);
        if first.fetch_add(1, Ordering::SeqCst) == 0 {
            gate.wait(Duration::from_secs(10));
        }
        OriginResponse::ok(format!("item v{seen}")).header("Cache-Control", "max-age=600")
    })
}

/// A GET's fill is in flight when a PUT to the same URL succeeds: the older answer is
/// served to its client but not stored, so the PUT's invalidation (RFC 9111 §4.4) holds.
fn check_put_during_fill(echo: &EchoUnderTest, origin: &TestOrigin, gate: &Gate) {
    let addr = echo.addr;
    let in_flight = thread::spawn(move || client::get(addr, "/item", &[("Host", HOST)]));
    wait_until(
        "the fill reached the origin",
        Duration::from_secs(5),
        || origin.hits("/item") == 1,
    );
    let mut c = RawClient::connect(echo.addr);
    let put = c.request("PUT", "/item", &[("Host", HOST)], b"new");
    assert_eq!(put.status, 204);
    gate.open();
    let old = in_flight.join().expect("client thread");
    assert_eq!(old.body_str(), "item v1");
    let (status, body) = get(echo, "/item");
    assert_eq!(
        (status.as_str(), body.as_str()),
        ("MISS", "item v2"),
        "the fill from before the PUT was not stored"
    );
    assert_eq!(
        get(echo, "/item"),
        ("HIT".to_string(), "item v2".to_string())
    );
}

#[test]
fn a_put_during_a_fill_is_not_undone_by_the_fill_in_memory() {
    let gate = Gate::new();
    let origin = put_origin(gate.hold());
    let echo = EchoUnderTest::start(&origin.url());
    check_put_during_fill(&echo, &origin, &gate);
}

#[test]
fn a_put_during_a_fill_is_not_undone_by_the_fill_in_redis() {
    let master = RedisServer::master();
    let replica = RedisServer::replica_of(&master);
    let gate = Gate::new();
    let origin = put_origin(gate.hold());
    let echo = node(&origin, &master, &[&replica]);
    check_put_during_fill(&echo, &origin, &gate);
}

#[test]
fn a_paused_replica_never_serves_what_an_invalidation_deleted() {
    // As issue 15 found it: CLIENT PAUSE ... WRITE on a replica stops it applying the
    // replication stream while it keeps answering reads.
    let master = RedisServer::master();
    let paused = RedisServer::replica_of(&master);
    let other = RedisServer::replica_of(&master);
    let o = Versioned::start();
    let a = node(&o.origin, &master, &[&paused, &other]);
    let b = node(&o.origin, &master, &[&paused, &other]);
    warm(&a, &b, &[&paused, &other], "/paused/1");
    wait_for_nodes(&master, 2);

    let _: () = redis::cmd("CLIENT")
        .arg("PAUSE")
        .arg(3_000)
        .arg("WRITE")
        .query(&mut paused.connection())
        .expect("CLIENT PAUSE");
    o.version.store(2, Ordering::SeqCst);
    let report = invalidate(&a, r#"{"pattern": "^/paused/"}"#);
    assert_eq!(report["state"], "done", "{report}");
    assert_eq!(report["nodes"]["acknowledged"], 1, "{report}");
    assert!(
        paused.exists(&redis_key("/paused/1")),
        "the paused replica has not applied the delete (and is still read from)"
    );
    assert_never_old(&b, "/paused/1");
    assert_never_old(&a, "/paused/1");
}
