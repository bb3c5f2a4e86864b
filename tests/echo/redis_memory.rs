//! Redis at its memory limit: an eviction flood never undoes an invalidation (the
//! shipped `volatile-ttl` policy evicts entries, never control state), and a master
//! full under `noeviction` still lets an invalidation delete what it matches, with the
//! answer saying what could not be done.

use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::Duration;

use serde_json::Value;

use crate::support::admin;
use crate::support::client;
use crate::support::echo::{config, redis_sections, EchoUnderTest, QUICK_REDIS};
use crate::support::redis::RedisServer;
use crate::support::{wait_until, Gate, OriginResponse, TestOrigin};

const TOKEN: &str = "memory-token";
const HOST: &str = "memory.example";
/// Each entry's body: big enough that a few of them free what the tests need.
const BODY: usize = 50_000;

fn node(origin: &TestOrigin, master: &RedisServer, replicas: &[&RedisServer]) -> EchoUnderTest {
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n{}",
        redis_sections(master, replicas, "", QUICK_REDIS)
    );
    EchoUnderTest::with_config(config(&origin.url(), &text))
}

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

/// An origin with big bodies that end in a version the test bumps.
fn versioned() -> (TestOrigin, Arc<AtomicU64>) {
    let version = Arc::new(AtomicU64::new(1));
    let v = Arc::clone(&version);
    let origin = TestOrigin::start(move |_| {
        let body = format!("{} v{}", "x".repeat(BODY), v.load(Ordering::SeqCst));
        OriginResponse::ok(body).header("Cache-Control", "max-age=600")
    });
    (origin, version)
}

fn config_set(server: &RedisServer, key: &str, value: &str) {
    let _: () = redis::cmd("CONFIG")
        .arg("SET")
        .arg(key)
        .arg(value)
        .query(&mut server.connection())
        .expect("CONFIG SET");
}

/// Makes `master` full under `noeviction`: its limit `over` bytes below what it uses.
/// Returns once a write is refused with OOM.
fn fill_up(master: &RedisServer, over: u64) {
    config_set(master, "maxmemory-policy", "noeviction");
    let used = master.info_u64("memory", "used_memory");
    config_set(
        master,
        "maxmemory",
        &used.saturating_sub(over).max(1).to_string(),
    );
    let refused = redis::cmd("SET")
        .arg("probe")
        .arg("1")
        .query::<()>(&mut master.connection())
        .expect_err("a write to a full master");
    assert_eq!(refused.code(), Some("OOM"), "{refused}");
}

fn warm(echo: &EchoUnderTest, replica: &RedisServer, targets: &[String]) {
    for t in targets {
        assert_eq!(get(echo, t).0, "MISS");
        replica.wait_for_key(&redis_key(t));
        assert_eq!(get(echo, t).0, "HIT");
    }
}

fn targets(prefix: &str, n: usize) -> Vec<String> {
    (0..n).map(|i| format!("{prefix}{i}")).collect()
}

#[test]
fn a_full_master_under_noeviction_still_deletes_then_bans_and_says_so() {
    let master = RedisServer::master();
    let replica = RedisServer::replica_of(&master);
    let (origin, version) = versioned();
    let echo = node(&origin, &master, &[&replica]);
    let full = targets("/full/", 10);
    warm(&echo, &replica, &full);
    // 100 KB over the limit: the ten deletes (500 KB) make room for the rest.
    fill_up(&master, 100_000);

    version.store(2, Ordering::SeqCst);
    let report = invalidate(&echo, r#"{"pattern": "^/full/"}"#);
    assert_eq!(report["state"], "done", "{report}");
    assert_eq!(report["deleted"], 10, "{report}");
    let warning = report["warning"].as_str().unwrap_or_default();
    assert!(warning.contains("Redis was full"), "{report}");
    assert_eq!(
        report["replicas"]["acknowledged"], 1,
        "announced and waited for once there was room: {report}"
    );
    for t in &full {
        assert!(!replica.exists(&redis_key(t)), "{t} deleted on the replica");
        let (_, body) = get(&echo, t);
        assert!(body.ends_with(" v2"), "{t} served what was invalidated");
    }
}

#[test]
fn when_deletes_cannot_make_room_an_invalidation_deletes_and_reports_what_it_could_not_do() {
    let master = RedisServer::master();
    let replica = RedisServer::replica_of(&master);
    let (origin, version) = versioned();
    let echo = node(&origin, &master, &[&replica]);
    let full = targets("/stuck/", 4);
    warm(&echo, &replica, &full);
    // Far over the limit: nothing the job deletes makes room.
    fill_up(&master, 1 << 40);

    version.store(2, Ordering::SeqCst);
    let report = invalidate(&echo, r#"{"pattern": "^/stuck/"}"#);
    assert_eq!(report["state"], "done", "{report}");
    assert_eq!(report["deleted"], 4, "{report}");
    let warning = report["warning"].as_str().unwrap_or_default();
    assert!(
        warning.contains("ban could not be recorded") && warning.contains("not be announced"),
        "{report}"
    );
    for t in &full {
        assert!(!master.exists(&redis_key(t)), "{t} deleted on the master");
        wait_until(
            "the replica applies the deletes",
            Duration::from_secs(5),
            || !replica.exists(&redis_key(t)),
        );
        // Nothing can be stored while Redis is full: each request goes to the origin.
        let (status, body) = get(&echo, t);
        assert!(body.ends_with(" v2"), "{t} served what was invalidated");
        assert_eq!(status, "MISS");
    }
}

#[test]
fn stale_mode_on_a_full_master_deletes_instead_and_says_so() {
    let master = RedisServer::master();
    let replica = RedisServer::replica_of(&master);
    let (origin, _) = versioned();
    let echo = node(&origin, &master, &[&replica]);
    let full = targets("/stale/", 4);
    warm(&echo, &replica, &full);
    fill_up(&master, 1 << 40);

    let report = invalidate(&echo, r#"{"pattern": "^/stale/", "mode": "stale"}"#);
    assert_eq!(report["state"], "done", "{report}");
    assert_eq!(report["marked_stale"], 4, "{report}");
    assert!(
        report["warning"]
            .as_str()
            .unwrap_or_default()
            .contains("4 entries were deleted instead of marked stale"),
        "{report}"
    );
    for t in &full {
        assert!(
            !master.exists(&redis_key(t)),
            "{t} gone, never served as fresh"
        );
    }
}

#[test]
fn an_eviction_flood_during_a_slow_fill_never_resurrects_an_invalidated_entry() {
    let master = RedisServer::master();
    let replica = RedisServer::replica_of(&master);
    // The shipped policy, and room for little more than what Echo holds.
    config_set(&master, "maxmemory-policy", "volatile-ttl");
    let used = master.info_u64("memory", "used_memory");
    config_set(&master, "maxmemory", &(used + 2_000_000).to_string());
    let gate = Gate::new();
    let hold = gate.hold();
    let first = Arc::new(AtomicUsize::new(0));
    let origin = TestOrigin::start(move |req| {
        if req.target == "/slow" && first.fetch_add(1, Ordering::SeqCst) == 0 {
            hold.wait(Duration::from_secs(10));
            return OriginResponse::ok("before").header("Cache-Control", "max-age=600");
        }
        OriginResponse::ok(format!("{} after", req.target)).header("Cache-Control", "max-age=600")
    });
    let echo = node(&origin, &master, &[&replica]);

    let addr = echo.addr;
    let in_flight = thread::spawn(move || client::get(addr, "/slow", &[("Host", HOST)]));
    wait_until(
        "the fill reached the origin",
        Duration::from_secs(5),
        || origin.hits("/slow") == 1,
    );
    let report = invalidate(&echo, r#"{"pattern": "^/slow"}"#);
    assert_eq!(report["state"], "done", "{report}");

    // A flood of volatile keys, four times the room: Redis evicts and evicts.
    let mut conn = master.connection();
    let junk = "j".repeat(10_000);
    for i in 0..800 {
        let _: () = redis::cmd("SET")
            .arg(format!("flood:{i}"))
            .arg(&junk)
            .arg("EX")
            .arg(600)
            .query(&mut conn)
            .expect("a write that makes Redis evict");
    }
    assert!(
        master.info_u64("stats", "evicted_keys") > 100,
        "the flood made Redis evict"
    );
    let control: u64 = redis::cmd("EXISTS")
        .arg("echo:v1:control")
        .arg("echo:v1:bans")
        .query(&mut conn)
        .expect("EXISTS");
    assert_eq!(control, 2, "control state is never evicted");

    gate.open();
    let old = in_flight.join().expect("client thread");
    assert_eq!(old.body_str(), "before");
    let (status, body) = get(&echo, "/slow");
    assert_eq!(
        (status.as_str(), body.as_str()),
        ("MISS", "/slow after"),
        "the fill from before the invalidation was not stored"
    );
}
