//! The Redis store against real redis-server processes: a master and replicas on free
//! ports. Counts origin hits, reads Redis itself, and kills servers to show Echo fails
//! open and recovers.

use std::time::{Duration, Instant};

use crate::support::client;
use crate::support::echo::{
    config, redis_echo_without_tier, redis_sections, EchoUnderTest, QUICK_REDIS,
};
use crate::support::redis::RedisServer;
use crate::support::{wait_until, OriginResponse, TestOrigin};

/// Echo on the Redis store, with short timeouts so failure tests stay quick.
fn echo_on(
    origin: &TestOrigin,
    master: &RedisServer,
    replicas: &[&RedisServer],
    extra: &str,
) -> EchoUnderTest {
    let text = redis_sections(master, replicas, extra, QUICK_REDIS);
    EchoUnderTest::with_config(config(&origin.url(), &text))
}

fn cacheable_origin() -> TestOrigin {
    TestOrigin::start(|req| {
        OriginResponse::ok(format!("body of {}", req.target)).header("Cache-Control", "max-age=60")
    })
}

const KEY: &str = "echo:v1:http://test.local";

#[test]
fn a_hit_after_a_miss_is_read_from_a_replica_and_lives_on_the_master_with_a_ttl() {
    let master = RedisServer::master();
    let replica = RedisServer::replica_of(&master);
    let origin = cacheable_origin();
    let echo = echo_on(&origin, &master, &[&replica], "");

    let miss = client::get(echo.addr, "/orgs/42/users?page=2", &[]);
    assert_eq!(miss.header("x-cache-status"), Some("MISS"));
    let key = format!("{KEY}/orgs/42/users?page=2");
    assert!(master.exists(&key), "the entry was written to the master");
    let ttl: i64 = redis::cmd("PTTL")
        .arg(&key)
        .query(&mut master.connection())
        .expect("PTTL");
    // max-age=60 plus the 60 s default margin; never immortal (-1).
    assert!(ttl > 100_000 && ttl <= 120_000, "ttl {ttl} ms");

    replica.wait_for_key(&key);
    // A node reads replicas once it hears the master's announcements (its fence, at
    // start within a heartbeat or two); until then hits come from the master.
    wait_until(
        "a hit is read on the replica",
        Duration::from_secs(5),
        || {
            let hits_before = replica.info_u64("stats", "keyspace_hits");
            let hit = client::get(echo.addr, "/orgs/42/users?page=2", &[]);
            assert_eq!(hit.header("x-cache-status"), Some("HIT"));
            assert_eq!(hit.body, miss.body);
            replica.info_u64("stats", "keyspace_hits") == hits_before + 1
        },
    );
    assert_eq!(origin.total_hits(), 1);
}

#[test]
fn a_hit_costs_one_redis_round_trip_and_a_miss_three() {
    let master = RedisServer::master();
    let replica = RedisServer::replica_of(&master);
    let origin = cacheable_origin();
    let echo = echo_on(&origin, &master, &[&replica], "");
    // Warm the pools so connection set-up is not counted.
    client::get(echo.addr, "/warm", &[]);
    replica.wait_for_key(&format!("{KEY}/warm"));
    client::get(echo.addr, "/warm", &[]);

    // The counted miss. Under the load of the whole suite the store's monitor can judge
    // the replica behind for a moment, and then the lookup rightly goes to the master:
    // such a try is done again on a new URL (bounded), the counts are of one that read
    // the replica, as every read does when it keeps up.
    let mut tries = 0;
    let counted = loop {
        tries += 1;
        let target = format!("/counted-{tries}");
        master.reset_stats();
        replica.reset_stats();
        client::get(echo.addr, &target, &[]);
        if replica.calls("get") == 1 || tries == 10 {
            break target;
        }
    };
    // A miss: one lookup on a replica (GET of the entry and HMGET of the control hash,
    // pipelined: one round trip); on the master, the fill lock (a script: SET NX unless
    // the key is marked hit-for-pass) pipelined with a second look for a fill that
    // finished meanwhile (GET + HMGET), and the generation-checked store, which releases
    // the lock and wakes other nodes in the same step (EVALSHA: SET, DEL, PUBLISH).
    assert_eq!(replica.calls("get"), 1, "miss: one lookup on a replica");
    assert_eq!(replica.calls("hmget"), 1, "miss: with the control hash");
    assert_eq!(master.calls("eval"), 1, "the lock script");
    assert_eq!(
        master.calls("evalsha"),
        1,
        "the store script, which releases the lock"
    );
    assert_eq!(
        master.calls("set"),
        2,
        "the lock, and the entry inside the script"
    );
    assert_eq!(master.calls("publish"), 1, "waiting nodes are woken once");
    assert_eq!(master.calls("hmget"), 1, "one second look on the master");

    replica.wait_for_key(&format!("{KEY}{counted}"));
    // The counted hit: again on the replica (a try the monitor sent to the master is
    // done again, bounded).
    let mut hit;
    let mut tries = 0;
    loop {
        tries += 1;
        master.reset_stats();
        replica.reset_stats();
        hit = client::get(echo.addr, &counted, &[]);
        if replica.calls("get") == 1 || tries == 10 {
            break;
        }
    }
    assert_eq!(hit.header("x-cache-status"), Some("HIT"));
    assert_eq!(replica.calls("get"), 1, "a hit is one GET ...");
    assert_eq!(replica.calls("hmget"), 1, "... and one HMGET, pipelined");
    assert_eq!(
        total_commands(&replica),
        2,
        "and nothing else on the replica"
    );
    assert_eq!(total_commands(&master), 0, "and nothing on the master");
}

/// Commands run since the last CONFIG RESETSTAT for requests: INFO and CONFIG
/// themselves left out, and the nodes' heartbeats (ZADD, HSET and ZREMRANGEBYSCORE in a
/// MULTI, on the master and replicated to the replicas).
fn total_commands(r: &RedisServer) -> usize {
    r.info("commandstats")
        .lines()
        .filter(|l| {
            l.starts_with("cmdstat_")
                && ![
                    "cmdstat_info:",
                    "cmdstat_config|",
                    "cmdstat_multi:",
                    "cmdstat_exec:",
                    "cmdstat_zadd:",
                    "cmdstat_hset:",
                    "cmdstat_zremrangebyscore:",
                ]
                .iter()
                .any(|heartbeat| l.starts_with(heartbeat))
        })
        .count()
}

#[test]
fn a_second_echo_node_on_the_same_redis_hits_what_the_first_stored() {
    let master = RedisServer::master();
    let replica = RedisServer::replica_of(&master);
    let origin = cacheable_origin();
    let first = echo_on(&origin, &master, &[&replica], "");
    let second = echo_on(&origin, &master, &[&replica], "");
    assert_eq!(
        client::get(first.addr, "/shared", &[]).header("x-cache-status"),
        Some("MISS")
    );
    replica.wait_for_key(&format!("{KEY}/shared"));
    let from_second = client::get(second.addr, "/shared", &[]);
    assert_eq!(from_second.header("x-cache-status"), Some("HIT"));
    assert_eq!(from_second.body_str(), "body of /shared");
    assert_eq!(origin.hits("/shared"), 1);
}

#[test]
fn vary_variants_share_one_key_and_each_hits() {
    let master = RedisServer::master();
    let origin = TestOrigin::start(|req| {
        let lang = req.header("accept-language").unwrap_or("none").to_string();
        OriginResponse::ok(format!("in {lang}"))
            .header("Cache-Control", "max-age=60")
            .header("Vary", "Accept-Language")
    });
    let echo = echo_on(&origin, &master, &[], "");
    for lang in ["en", "fr", "de"] {
        client::get(echo.addr, "/v", &[("Accept-Language", lang)]);
    }
    for lang in ["en", "fr", "de"] {
        let resp = client::get(echo.addr, "/v", &[("Accept-Language", lang)]);
        assert_eq!(resp.header("x-cache-status"), Some("HIT"), "{lang}");
        assert_eq!(resp.body_str(), format!("in {lang}"));
    }
    assert_eq!(origin.hits("/v"), 3);
}

#[test]
fn a_killed_replica_means_hits_from_the_master() {
    let master = RedisServer::master();
    let mut replica = RedisServer::replica_of(&master);
    let origin = cacheable_origin();
    let echo = redis_echo_without_tier(&origin.url(), &master, &[&replica]);
    client::get(echo.addr, "/r", &[]);
    replica.wait_for_key(&format!("{KEY}/r"));
    replica.kill();
    let master_hits = master.info_u64("stats", "keyspace_hits");
    for _ in 0..5 {
        let resp = client::get(echo.addr, "/r", &[]);
        assert_eq!(resp.status, 200);
        assert_eq!(resp.header("x-cache-status"), Some("HIT"));
    }
    assert!(
        master.info_u64("stats", "keyspace_hits") >= master_hits + 5,
        "hits read on the master"
    );
    assert_eq!(origin.hits("/r"), 1);
}

#[test]
fn with_every_redis_down_requests_are_answered_from_the_origin_in_time() {
    let mut master = RedisServer::master();
    let mut replica = RedisServer::replica_of(&master);
    let origin = cacheable_origin();
    let echo = echo_on(&origin, &master, &[&replica], "");
    client::get(echo.addr, "/down", &[]);
    replica.kill();
    master.kill();
    for i in 0..20 {
        let started = Instant::now();
        let resp = client::get(echo.addr, &format!("/down?{i}"), &[]);
        assert_eq!(resp.status, 200, "request {i}");
        assert_eq!(resp.body_str(), format!("body of /down?{i}"));
        assert_eq!(resp.header("x-cache-status"), Some("BYPASS"), "request {i}");
        assert!(
            resp.header("cache-status")
                .unwrap_or("")
                .contains("detail=store-error"),
            "{:?}",
            resp.header("cache-status")
        );
        // Latency is the point ("in time"): two endpoints × (connect or pool timeout) at
        // worst, far less once the breakers open.
        assert!(
            started.elapsed() < Duration::from_secs(2),
            "request {i} took {:?}",
            started.elapsed()
        );
    }
    assert_eq!(origin.total_hits(), 21);
}

#[test]
fn caching_resumes_by_itself_when_the_master_comes_back() {
    let mut master = RedisServer::master();
    let origin = cacheable_origin();
    let echo = echo_on(&origin, &master, &[], "");
    master.kill();
    assert_eq!(
        client::get(echo.addr, "/back", &[]).header("x-cache-status"),
        Some("BYPASS")
    );
    master.restart();
    wait_until("caching resumes", Duration::from_secs(10), || {
        client::get(echo.addr, "/back", &[]).header("x-cache-status") == Some("HIT")
    });
    assert!(master.exists(&format!("{KEY}/back")));
}

#[test]
fn a_value_echo_cannot_decode_is_a_miss_and_is_replaced() {
    let master = RedisServer::master();
    let origin = cacheable_origin();
    let echo = echo_on(&origin, &master, &[], "");
    let key = format!("{KEY}/garbage");
    let _: () = redis::cmd("SET")
        .arg(&key)
        .arg("not an echo value")
        .query(&mut master.connection())
        .expect("SET");
    let first = client::get(echo.addr, "/garbage", &[]);
    assert_eq!(
        (first.status, first.header("x-cache-status")),
        (200, Some("MISS"))
    );
    assert_eq!(
        client::get(echo.addr, "/garbage", &[]).header("x-cache-status"),
        Some("HIT")
    );
    assert_eq!(origin.hits("/garbage"), 1);
}

#[test]
fn objects_over_max_object_bytes_are_not_written_to_redis() {
    let master = RedisServer::master();
    let origin = TestOrigin::start(|_| {
        OriginResponse::ok(vec![b'x'; 50_000]).header("Cache-Control", "max-age=60")
    });
    let echo = echo_on(&origin, &master, &[], "max_object_bytes = 10000");
    for _ in 0..2 {
        let resp = client::get(echo.addr, "/big", &[]);
        assert_eq!(resp.body.len(), 50_000);
        assert_eq!(resp.header("x-cache-status"), Some("MISS"));
    }
    assert!(!master.exists(&format!("{KEY}/big")));
    assert_eq!(origin.hits("/big"), 2);
}

#[test]
fn writes_invalidate_in_redis_too() {
    let master = RedisServer::master();
    let origin = TestOrigin::start(|req| match req.method.as_str() {
        "GET" => OriginResponse::ok("data").header("Cache-Control", "max-age=60"),
        _ => OriginResponse::status(204),
    });
    let echo = echo_on(&origin, &master, &[], "");
    client::get(echo.addr, "/w", &[]);
    assert!(master.exists(&format!("{KEY}/w")));
    let mut c = client::RawClient::connect(echo.addr);
    assert_eq!(c.request("PUT", "/w", &[], b"new").status, 204);
    assert!(
        !master.exists(&format!("{KEY}/w")),
        "the PUT deleted the entry on the master"
    );
    assert_eq!(
        client::get(echo.addr, "/w", &[]).header("x-cache-status"),
        Some("MISS")
    );
}

#[test]
fn the_redis_ttl_covers_the_stale_window_up_to_max_stale() {
    let master = RedisServer::master();
    let origin = TestOrigin::start(|req| {
        let cc = if req.path() == "/long" {
            "max-age=60, stale-while-revalidate=600"
        } else {
            "max-age=60, stale-if-error=86400"
        };
        OriginResponse::ok("x").header("Cache-Control", cc)
    });
    let echo = echo_on(&origin, &master, &[], "max_stale_ms = 1200000");
    client::get(echo.addr, "/long", &[]);
    client::get(echo.addr, "/capped", &[]);
    let pttl = |t: &str| -> i64 {
        redis::cmd("PTTL")
            .arg(format!("{KEY}{t}"))
            .query(&mut master.connection())
            .expect("PTTL")
    };
    // freshness 60 s + stale window 600 s + margin 60 s.
    let long = pttl("/long");
    assert!(long > 700_000 && long <= 720_000, "{long}");
    // stale-if-error of a day is capped at max_stale (1200 s).
    let capped = pttl("/capped");
    assert!(capped > 1_300_000 && capped <= 1_320_000, "{capped}");
}
