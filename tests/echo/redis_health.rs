//! What `/health` and the metrics say about each Redis server, and what Echo does about
//! it: every state a server can be in (healthy, its replication link down, lagging,
//! demoted, full, under an eviction policy that may take the control state, gone and
//! back), seen by the store's monitor without a round trip per `/health` call.

use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::admin::{self, sample};
use crate::support::client;
use crate::support::echo::{config, redis_sections, EchoUnderTest, NO_LOCAL_TIER, QUICK_REDIS};
use crate::support::redis::RedisServer;
use crate::support::relay::Relay;
use crate::support::{free_port, wait_until, OriginResponse, TestOrigin};

const TOKEN: &str = "health-token";

fn origin() -> TestOrigin {
    TestOrigin::start(|req| {
        OriginResponse::ok(format!("body of {}", req.target)).header("Cache-Control", "max-age=600")
    })
}

/// Echo on `master` and `replicas` with the admin API; `redis` goes under `[redis]`.
fn echo_on(
    origin: &TestOrigin,
    master: &RedisServer,
    replicas: &[&RedisServer],
    redis: &str,
) -> EchoUnderTest {
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n{}",
        redis_sections(master, replicas, "", &format!("{QUICK_REDIS}{redis}"))
    );
    EchoUnderTest::with_config(config(&origin.url(), &text))
}

fn health(echo: &EchoUnderTest) -> Value {
    let (status, json) = admin::health(echo.admin.expect("admin"), TOKEN);
    assert_eq!(status, 200, "/health answers 200 whatever Redis does");
    json
}

fn metrics(echo: &EchoUnderTest) -> String {
    admin::metrics(echo.admin.expect("admin"), TOKEN)
}

/// `server`'s entry in `/health`'s `store.servers`.
fn server<'a>(h: &'a Value, server: &RedisServer) -> &'a Value {
    let name = format!("127.0.0.1:{}", server.port);
    h["store"]["servers"]
        .as_array()
        .and_then(|all| all.iter().find(|s| s["server"] == name.as_str()))
        .unwrap_or_else(|| panic!("{name} not in /health: {h}"))
}

/// Waits until `/health` says what `cond` wants of it; returns that `/health`.
fn wait_health(echo: &EchoUnderTest, what: &str, mut cond: impl FnMut(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    wait_until(what, Duration::from_secs(10), || {
        last = health(echo);
        cond(&last)
    });
    last
}

fn reasons(s: &Value) -> Vec<String> {
    s["reasons"]
        .as_array()
        .map(|r| {
            r.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default()
}

fn cache_status(echo: &EchoUnderTest, target: &str) -> String {
    let resp = client::get(echo.addr, target, &[]);
    assert_eq!(resp.status, 200, "{target}: {}", resp.body_str());
    resp.header("x-cache-status").unwrap_or("?").to_string()
}

/// Lookups (GETs) a replica has answered.
fn gets(replica: &RedisServer) -> u64 {
    replica.calls("get")
}

#[test]
fn a_healthy_cluster_reports_each_server_role_link_lag_and_memory() {
    let master = RedisServer::builder()
        .option("maxmemory", "64mb")
        .option("maxmemory-policy", "volatile-ttl")
        .start();
    let a = RedisServer::replica_of(&master);
    let b = RedisServer::replica_of(&master);
    let o = origin();
    let echo = echo_on(&o, &master, &[&a, &b], NO_LOCAL_TIER);
    let h = wait_health(&echo, "every server checked and ok", |h| {
        h["store"]["servers"]
            .as_array()
            .is_some_and(|s| s.len() == 3 && s.iter().all(|s| s["status"] == "ok"))
    });
    assert_eq!(h["status"], "ok", "{h}");
    assert_eq!(h["store"]["status"], "ok", "{h}");
    let m = server(&h, &master);
    assert_eq!(m["role"], "master", "{h}");
    assert_eq!(m["reported_role"], "master", "{h}");
    assert_eq!(m["reachable"], true, "{h}");
    assert_eq!(m["maxmemory_policy"], "volatile-ttl", "{h}");
    assert_eq!(m["maxmemory"], 64 * 1024 * 1024, "{h}");
    assert!(m["used_memory"].as_u64().is_some_and(|u| u > 0), "{h}");
    for r in [&a, &b] {
        let s = server(&h, r);
        assert_eq!(s["role"], "replica", "{h}");
        assert_eq!(s["reported_role"], "replica", "{h}");
        assert_eq!(s["link"], "up", "{h}");
        assert_eq!(s["readable"], true, "{h}");
        assert!(
            s["lag_ms"].as_u64().is_some_and(|l| l <= 1000),
            "a replica on the same machine is not behind: {h}"
        );
        assert_eq!(reasons(s), Vec::<String>::new(), "{h}");
    }
    // Hits are read from the replicas.
    assert_eq!(cache_status(&echo, "/h/1"), "MISS");
    for r in [&a, &b] {
        r.wait_for_key("echo:v1:http://test.local/h/1");
    }
    let before = gets(&a) + gets(&b);
    for _ in 0..4 {
        assert_eq!(cache_status(&echo, "/h/1"), "HIT");
    }
    assert!(gets(&a) + gets(&b) >= before + 4, "hits read on replicas");

    let text = metrics(&echo);
    let up = |s: &RedisServer, role: &str| {
        sample(
            &text,
            &format!(
                "echo_redis_server_up{{server=\"127.0.0.1:{}\",role=\"{role}\"}}",
                s.port
            ),
        )
    };
    assert_eq!(up(&master, "master"), Some(1.0), "{text}");
    assert_eq!(up(&a, "replica"), Some(1.0), "{text}");
    // Issue 21: each server's own evictions (none here).
    for s in [&master, &a, &b] {
        let series = format!("echo_redis_evicted_keys{{server=\"127.0.0.1:{}\"}}", s.port);
        assert_eq!(sample(&text, &series), Some(0.0), "{series}: {text}");
    }
    for r in [&a, &b] {
        let port = r.port;
        assert_eq!(
            sample(
                &text,
                &format!("echo_redis_replica_readable{{server=\"127.0.0.1:{port}\"}}")
            ),
            Some(1.0),
            "{text}"
        );
        assert!(
            sample(
                &text,
                &format!("echo_redis_replica_lag_seconds{{server=\"127.0.0.1:{port}\"}}")
            )
            .is_some_and(|l| l <= 1.0),
            "{text}"
        );
    }
    assert_eq!(
        sample(
            &text,
            &format!(
                "echo_redis_maxmemory_bytes{{server=\"127.0.0.1:{}\"}}",
                master.port
            )
        ),
        Some(64.0 * 1024.0 * 1024.0),
        "{text}"
    );
    assert!(!text.contains("echo_redis_degraded{"), "{text}");
}

/// A replica whose link to its master is down (here: pointed at a dead port) is not read
/// from, even one configured to serve stale data; `/health` says why; once linked again
/// it is read from again.
#[test]
fn a_replica_whose_link_is_down_is_not_read_until_it_is_linked_again() {
    let master = RedisServer::master();
    let replica = RedisServer::builder()
        .replica_of(&master)
        .serve_stale_data(true)
        .start();
    let o = origin();
    let echo = echo_on(&o, &master, &[&replica], NO_LOCAL_TIER);
    wait_health(&echo, "the replica checked and readable", |h| {
        server(h, &replica)["readable"] == true
    });
    assert_eq!(cache_status(&echo, "/link/1"), "MISS");
    replica.wait_for_key("echo:v1:http://test.local/link/1");

    replica.replicaof(Some(("127.0.0.1", free_port())));
    // The server list and the store's status are two looks at the monitor: both see it.
    let h = wait_health(&echo, "the replica reported link down", |h| {
        reasons(server(h, &replica)).contains(&"link_down".to_string())
            && h["store"]["status"] == "degraded"
    });
    let s = server(&h, &replica);
    assert_eq!(s["link"], "down", "{h}");
    assert_eq!(s["readable"], false, "{h}");
    assert_eq!(s["status"], "degraded", "{h}");
    assert_eq!(h["store"]["status"], "degraded", "{h}");
    assert_eq!(h["degraded"], serde_json::json!(["store"]), "{h}");
    let errors = h["store"]["errors"].to_string();
    assert!(errors.contains("link to the master is down"), "{h}");
    let text = metrics(&echo);
    let port = replica.port;
    assert_eq!(
        sample(
            &text,
            &format!("echo_redis_degraded{{server=\"127.0.0.1:{port}\",reason=\"link_down\"}}")
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            &format!("echo_redis_replica_readable{{server=\"127.0.0.1:{port}\"}}")
        ),
        Some(0.0),
        "{text}"
    );
    let before = gets(&replica);
    for _ in 0..6 {
        assert_eq!(cache_status(&echo, "/link/1"), "HIT", "the master answers");
    }
    assert_eq!(gets(&replica), before, "the cut-off replica was read from");

    replica.replicaof(Some(("127.0.0.1", master.port)));
    wait_health(&echo, "the replica readable again", |h| {
        server(h, &replica)["readable"] == true && h["store"]["status"] == "ok"
    });
    for _ in 0..4 {
        assert_eq!(cache_status(&echo, "/link/1"), "HIT");
    }
    assert!(
        gets(&replica) > before,
        "the relinked replica is read again"
    );
}

/// A replica with its link up whose replication stream is held (a stalled network) falls
/// behind: past `max_replica_lag_ms` it is not read from, and it is again once it caught
/// up.
#[test]
fn a_lagging_replica_is_not_read_past_the_lag_bound() {
    let master = RedisServer::master();
    let lagging = RedisServer::master();
    let relay = Relay::to(format!("127.0.0.1:{}", master.port).parse().unwrap());
    lagging.replicaof(Some(("127.0.0.1", relay.port())));
    wait_until(
        "the replica syncs through the relay",
        Duration::from_secs(10),
        || lagging.master_link_up(),
    );
    let o = origin();
    let echo = echo_on(
        &o,
        &master,
        &[&lagging],
        &format!("max_replica_lag_ms = 300\n{NO_LOCAL_TIER}"),
    );
    wait_health(&echo, "the replica readable", |h| {
        server(h, &lagging)["readable"] == true
    });
    assert_eq!(cache_status(&echo, "/lag/1"), "MISS");
    lagging.wait_for_key("echo:v1:http://test.local/lag/1");

    relay.hold();
    // Writes move the master's offset on (the nodes' heartbeats would too).
    assert_eq!(cache_status(&echo, "/lag/2"), "MISS");
    let h = wait_health(&echo, "the held replica reported lagging", |h| {
        reasons(server(h, &lagging)).contains(&"lagging".to_string())
    });
    let s = server(&h, &lagging);
    assert_eq!(s["link"], "up", "only its offset tells: {h}");
    assert!(s["lag_ms"].as_u64().is_some_and(|l| l > 300), "{h}");
    assert_eq!(s["readable"], false, "{h}");
    let before = gets(&lagging);
    for _ in 0..4 {
        assert_eq!(cache_status(&echo, "/lag/1"), "HIT");
    }
    assert_eq!(gets(&lagging), before, "the lagging replica was read from");

    relay.release();
    wait_health(&echo, "the replica caught up and readable", |h| {
        server(h, &lagging)["readable"] == true
    });
    for _ in 0..4 {
        assert_eq!(cache_status(&echo, "/lag/1"), "HIT");
    }
    assert!(gets(&lagging) > before, "read again once caught up");
}

/// An `allkeys-*` policy may evict the control state: degraded for as long as it stays,
/// and warned about in the log; a `volatile-*` one is fine.
#[test]
fn an_allkeys_eviction_policy_is_reported_for_as_long_as_it_stays() {
    let master = RedisServer::builder()
        .option("maxmemory-policy", "allkeys-lru")
        .start();
    let o = origin();
    let echo = echo_on(&o, &master, &[], "");
    let h = wait_health(&echo, "the policy reported", |h| {
        reasons(server(h, &master)) == ["evicting_control_state"]
    });
    let m = server(&h, &master);
    assert_eq!(m["maxmemory_policy"], "allkeys-lru", "{h}");
    assert!(
        h["store"]["errors"].to_string().contains("volatile-ttl"),
        "{h}"
    );
    let text = metrics(&echo);
    assert_eq!(
        sample(
            &text,
            &format!(
                "echo_redis_degraded{{server=\"127.0.0.1:{}\",reason=\"evicting_control_state\"}}",
                master.port
            )
        ),
        Some(1.0),
        "{text}"
    );
    // Caching works meanwhile: it is a warning, not an outage.
    assert_eq!(cache_status(&echo, "/policy/1"), "MISS");
    assert_eq!(cache_status(&echo, "/policy/1"), "HIT");

    master.config_set("maxmemory-policy", "volatile-ttl");
    wait_health(&echo, "the policy no longer reported", |h| {
        h["store"]["status"] == "ok" && server(h, &master)["maxmemory_policy"] == "volatile-ttl"
    });
    assert!(!metrics(&echo).contains("echo_redis_degraded{"));
}

/// A master full under `noeviction` is reported out of memory; misses are still answered
/// (not stored); once it has room, caching resumes and the report goes.
#[test]
fn a_full_master_under_noeviction_is_reported_out_of_memory() {
    let master = RedisServer::builder()
        .option("maxmemory-policy", "noeviction")
        .start();
    let o = origin();
    let echo = echo_on(&o, &master, &[], "");
    wait_health(&echo, "ok", |h| h["store"]["status"] == "ok");
    master.config_set("maxmemory", "1");
    let h = wait_health(&echo, "out of memory reported", |h| {
        reasons(server(h, &master)).contains(&"out_of_memory".to_string())
    });
    assert!(
        h["store"]["errors"].to_string().contains("out of memory"),
        "{h}"
    );
    assert_eq!(cache_status(&echo, "/full/1"), "MISS");
    assert_eq!(
        cache_status(&echo, "/full/1"),
        "MISS",
        "nothing stored while full"
    );
    assert_eq!(o.hits("/full/1"), 2);

    master.config_set("maxmemory", "0");
    wait_health(&echo, "no longer out of memory", |h| {
        h["store"]["status"] == "ok"
    });
    assert_eq!(cache_status(&echo, "/full/1"), "MISS");
    assert_eq!(cache_status(&echo, "/full/1"), "HIT");
}

/// A listed master demoted to a replica (and its replica promoted, as an operator or a
/// failover without Sentinel would): both are named in `/health` for what they say
/// they are.
#[test]
fn a_demoted_master_and_a_promoted_replica_are_reported() {
    let master = RedisServer::master();
    let replica = RedisServer::replica_of(&master);
    let o = origin();
    let echo = echo_on(&o, &master, &[&replica], NO_LOCAL_TIER);
    wait_health(&echo, "ok", |h| {
        h["store"]["servers"]
            .as_array()
            .is_some_and(|s| s.iter().all(|s| s["status"] == "ok"))
    });
    replica.replicaof(None);
    master.replicaof(Some(("127.0.0.1", replica.port)));
    let h = wait_health(&echo, "both reported", |h| {
        reasons(server(h, &master)).contains(&"readonly".to_string())
            && reasons(server(h, &replica)).contains(&"not_replica".to_string())
    });
    assert_eq!(server(&h, &master)["reported_role"], "replica", "{h}");
    assert_eq!(server(&h, &replica)["reported_role"], "master", "{h}");
    assert_eq!(server(&h, &replica)["readable"], false, "{h}");
    // Requests are answered (from the origin) all along.
    assert_eq!(client::get(echo.addr, "/demoted/1", &[]).status, 200);
}

/// A master that goes away is reported unreachable (no request needed to notice); once
/// it is back the monitor reaches it and caching resumes within a second, whatever the
/// breaker had decided.
#[test]
fn a_master_that_is_gone_is_reported_and_caching_resumes_within_a_second_of_its_return() {
    let mut master = RedisServer::master();
    let o = origin();
    // A breaker that, by itself, would skip the master for 5 s after two failures.
    let redis = QUICK_REDIS.replace("breaker_open_ms = 300", "breaker_open_ms = 5000");
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n{}",
        redis_sections(&master, &[], "", &redis)
    );
    let echo = EchoUnderTest::with_config(config(&o.url(), &text));
    wait_health(&echo, "ok", |h| h["store"]["status"] == "ok");
    master.kill();
    let h = wait_health(&echo, "the master reported unreachable", |h| {
        reasons(server(h, &master)).contains(&"unreachable".to_string())
    });
    assert_eq!(server(&h, &master)["reachable"], false, "{h}");
    let text = metrics(&echo);
    assert_eq!(
        sample(
            &text,
            &format!(
                "echo_redis_server_up{{server=\"127.0.0.1:{}\",role=\"master\"}}",
                master.port
            )
        ),
        Some(0.0),
        "{text}"
    );
    // Requests open the breaker meanwhile.
    for i in 0..4 {
        assert_eq!(
            client::get(echo.addr, &format!("/gone/{i}"), &[]).status,
            200
        );
    }
    master.restart();
    let back = Instant::now();
    let mut took = None;
    wait_until("caching resumes", Duration::from_secs(5), || {
        let target = format!("/back/{}", back.elapsed().as_micros());
        if cache_status(&echo, &target) == "MISS" && cache_status(&echo, &target) == "HIT" {
            took = Some(back.elapsed());
            return true;
        }
        false
    });
    let took = took.expect("resumed");
    assert!(
        took < Duration::from_secs(1),
        "caching resumed {took:?} after the master came back"
    );
    wait_health(&echo, "ok again", |h| h["store"]["status"] == "ok");
}
