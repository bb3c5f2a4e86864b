//! The path index on Redis (issue 17): per site, a sorted set of stored targets that a
//! job with a literal prefix reads by range instead of walking the keyspace. It stays
//! consistent with stores, overwrites, Vary variants, deletes and expiry; entries stored
//! before it existed are added by a background pass, after which it is trusted; and
//! ranged jobs find exactly what a full walk finds.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use echo::config::Config;
use echo::invalidation::{Job, Matcher, Mode, Progress};
use echo::key::CacheKey;
use echo::store::redis::{indexed_targets, RedisStore};
use echo::store::{Entry, Store};

use crate::support::redis::RedisServer;
use crate::support::wait_until;

fn store_on(master: &RedisServer, replicas: &[&RedisServer]) -> RedisStore {
    let replicas: Vec<String> = replicas
        .iter()
        .map(|r| format!("\"{}\"", r.url()))
        .collect();
    let text = format!(
        "[origin]\nurl = \"http://127.0.0.1:9\"\n[redis]\nmaster = \"{}\"\nreplicas = [{}]\n\
         ttl_margin_ms = 1\n",
        master.url(),
        replicas.join(", ")
    );
    let cfg = Config::parse(&text).unwrap_or_else(|e| panic!("test config invalid: {e}"));
    RedisStore::new(
        &cfg.redis.expect("[redis]"),
        16,
        Duration::from_secs(60),
        echo::policy::PolicyOptions::default(),
    )
    .expect("redis store")
}

fn entry(freshness: Duration, vary: Option<&str>) -> Arc<Entry> {
    Arc::new(Entry {
        status: 200,
        headers: vec![("content-type".into(), b"text/plain".to_vec())],
        body: b"x".to_vec(),
        file: None,
        response_time: SystemTime::now(),
        initial_age: Duration::ZERO,
        freshness,
        vary: vary
            .map(|v| vec![("accept-language".to_string(), Some(v.to_string()))])
            .unwrap_or_default(),
        tags: Vec::new(),
    })
}

fn job(pattern: &str, host: Option<&str>, dry_run: bool) -> Job {
    Job {
        matcher: Arc::new(Matcher::new(Some(pattern), host, None).expect("matcher")),
        mode: Mode::Delete,
        dry_run,
    }
}

/// The targets in `site`'s index.
fn indexed(master: &RedisServer, site: &str) -> BTreeSet<String> {
    let targets = indexed_targets(&mut master.connection(), site).expect("index read");
    let set: BTreeSet<String> = targets.iter().cloned().collect();
    assert_eq!(set.len(), targets.len(), "each target once, in order");
    assert!(
        targets.windows(2).all(|w| w[0] < w[1]),
        "in order: {targets:?}"
    );
    set
}

/// Runs the store's background upkeep until the index is marked complete.
fn wait_index_complete(store: &RedisStore, master: &RedisServer) {
    wait_until("the index is complete", Duration::from_secs(10), || {
        store.tidy();
        redis::cmd("HGET")
            .arg("echo:v1:control")
            .arg("ixs")
            .query::<Option<u8>>(&mut master.connection())
            .expect("HGET")
            == Some(1)
    });
}

#[test]
fn stores_overwrites_variants_and_deletes_keep_the_index_exact() {
    let master = RedisServer::master();
    let store = store_on(&master, &[]);
    let long = Duration::from_secs(600);
    for t in ["/orgs/7/a", "/orgs/7/b", "/orgs/8/a", "/x"] {
        store
            .put(
                &CacheKey::new("http", "one.example", t),
                entry(long, None),
                0,
            )
            .unwrap();
    }
    // An overwrite and a second Vary variant: still one member.
    let a = CacheKey::new("http", "one.example", "/orgs/7/a");
    store.put(&a, entry(long, Some("en")), 0).unwrap();
    store.put(&a, entry(long, Some("fr")), 0).unwrap();
    store
        .put(
            &CacheKey::new("http", "two.example", "/orgs/7/a"),
            entry(long, None),
            0,
        )
        .unwrap();
    let one = "http://one.example";
    assert_eq!(
        indexed(&master, one),
        ["/orgs/7/a", "/orgs/7/b", "/orgs/8/a", "/x"]
            .map(String::from)
            .into()
    );
    // An unsafe method's removal, and a ranged job, take their members out with them.
    assert_eq!(
        store
            .remove(&CacheKey::new("http", "one.example", "/x"))
            .unwrap(),
        1
    );
    wait_index_complete(&store, &master);
    let outcome = store
        .invalidate(&job("^/orgs/7/", None, false), &Progress::default())
        .unwrap();
    assert_eq!(
        (outcome.matched, outcome.changed),
        (3, 3),
        "both sites' /orgs/7/"
    );
    assert_eq!(indexed(&master, one), ["/orgs/8/a".to_string()].into());
    assert!(indexed(&master, "http://two.example").is_empty());
    assert!(!master.exists("echo:v1:http://one.example/orgs/7/a"));
    assert!(master.exists("echo:v1:http://one.example/orgs/8/a"));
}

#[test]
fn a_ranged_job_reads_its_range_not_the_keyspace() {
    let master = RedisServer::master();
    let replica = RedisServer::replica_of(&master);
    let store = store_on(&master, &[&replica]);
    let long = Duration::from_secs(600);
    // 2,000 other entries, and 20 under the prefix.
    for i in 0..2000 {
        let k = CacheKey::new("http", "big.example", &format!("/users/{i}"));
        store.put(&k, entry(long, None), 0).unwrap();
    }
    for i in 0..20 {
        let k = CacheKey::new("http", "big.example", &format!("/orgs/7/{i}"));
        store.put(&k, entry(long, None), 0).unwrap();
    }
    wait_index_complete(&store, &master);
    let progress = Progress::default();
    let outcome = store
        .invalidate(&job("^/orgs/7/", None, false), &progress)
        .unwrap();
    assert_eq!((outcome.matched, outcome.changed), (20, 20));
    let scanned = progress.scanned.load(std::sync::atomic::Ordering::Relaxed);
    assert_eq!(scanned, 20, "only the range was read");
    assert_eq!(outcome.replicas, Some((1, 1)), "waited for the replica");
    assert!(!replica.exists("echo:v1:http://big.example/orgs/7/3"));
}

#[test]
fn entries_stored_before_the_index_are_added_to_it_before_it_is_trusted() {
    let master = RedisServer::master();
    // As an Echo before the index stored them: entries with no index member. And an
    // index of the layout before shards, once complete: not trusted, and removed.
    let mut conn = master.connection();
    let _: () = redis::pipe()
        .cmd("ZADD")
        .arg("echo:v1:idx:http://old.example")
        .arg(0)
        .arg("/orgs/7/0")
        .ignore()
        .cmd("HSET")
        .arg("echo:v1:control")
        .arg("ix")
        .arg(1)
        .ignore()
        .query(&mut conn)
        .expect("the old index");
    for i in 0..50 {
        let _: () = redis::cmd("SET")
            .arg(format!("echo:v1:http://old.example/orgs/7/{i}"))
            .arg("not decodable: a miss")
            .arg("PX")
            .arg(600_000)
            .query(&mut conn)
            .expect("SET");
    }
    let store = store_on(&master, &[]);
    // Until a pass has found every entry indexed, jobs walk the keyspace.
    let progress = Progress::default();
    let outcome = store
        .invalidate(&job("^/orgs/7/", None, true), &progress)
        .unwrap();
    assert_eq!(outcome.matched, 50, "found by a full walk");
    wait_index_complete(&store, &master);
    assert_eq!(
        indexed(&master, "http://old.example").len(),
        50,
        "backfilled"
    );
    assert!(
        !master.exists("echo:v1:idx:http://old.example"),
        "the index before shards is gone"
    );
    let outcome = store
        .invalidate(&job("^/orgs/7/", None, false), &Progress::default())
        .unwrap();
    assert_eq!((outcome.matched, outcome.changed), (50, 50));
}

#[test]
fn expired_entries_leave_the_index_and_are_never_counted() {
    let master = RedisServer::master();
    let store = store_on(&master, &[]);
    // Fresh for no time: the entry's TTL is the 1 s minimum.
    for i in 0..10 {
        let k = CacheKey::new("http", "gone.example", &format!("/orgs/7/{i}"));
        store.put(&k, entry(Duration::ZERO, None), 0).unwrap();
    }
    wait_index_complete(&store, &master);
    wait_until("the entries expire", Duration::from_secs(5), || {
        (0..10).all(|i| !master.exists(&format!("echo:v1:http://gone.example/orgs/7/{i}")))
    });
    // Members of gone entries are verified at use: none counted.
    let outcome = store
        .invalidate(&job("^/orgs/7/", None, true), &Progress::default())
        .unwrap();
    assert_eq!(outcome.matched, 0);
    // And the upkeep walk drops them, and the site with them.
    wait_until("the index forgets them", Duration::from_secs(10), || {
        store.tidy();
        indexed(&master, "http://gone.example").is_empty()
            && !redis::cmd("SISMEMBER")
                .arg("echo:v1:sites")
                .arg("http://gone.example")
                .query::<bool>(&mut master.connection())
                .expect("SISMEMBER")
    });
}

/// Ranged jobs find exactly what a full walk finds: random key sets over sites that
/// share the start of their names, random patterns with and without a literal prefix,
/// with and without a host.
#[test]
fn ranged_jobs_match_a_brute_force_walk() {
    let master = RedisServer::master();
    let store = store_on(&master, &[]);
    let sites = ["a", "a-b", "a0", "a.b", "b"];
    let targets = ["/o/1", "/o/1/x", "/o/12", "/o/2", "/p", "/o/1?q=1", "/"];
    let patterns = [
        "^/o/1",
        "^/o/1/",
        "^/o/",
        "^/p",
        "/x",
        r"^/o/1\?q",
        "1",
        "^/$",
        "^/o/(1|2)",
    ];
    let hosts = [None, Some("a"), Some("a-b"), Some("b")];
    // A small deterministic generator: the same cases on every run.
    let mut seed: u64 = 0x9E37_79B9_7F4A_7C15;
    let mut next = |n: usize| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        (seed % n as u64) as usize
    };
    let long = Duration::from_secs(600);
    for case in 0..40 {
        let _: () = redis::cmd("FLUSHALL")
            .query(&mut master.connection())
            .expect("FLUSHALL");
        let mut stored = BTreeSet::new();
        for _ in 0..next(40) {
            let scheme = if next(2) == 0 { "http" } else { "https" };
            let target = format!("{}{}", targets[next(targets.len())], "/z".repeat(next(3)));
            let site = sites[next(sites.len())];
            let k = CacheKey::new(scheme, site, &target);
            store.put(&k, entry(long, None), 0).unwrap();
            stored.insert(format!("{scheme}://{site}{target}"));
        }
        wait_index_complete(&store, &master);
        let (pattern, host) = (patterns[next(patterns.len())], hosts[next(hosts.len())]);
        let matcher = Matcher::new(Some(pattern), host, None).unwrap();
        let expected: BTreeSet<&String> =
            stored.iter().filter(|k| matcher.matches_key(k)).collect();
        let outcome = store
            .invalidate(&job(pattern, host, false), &Progress::default())
            .unwrap();
        assert_eq!(
            outcome.matched as usize,
            expected.len(),
            "case {case}: {pattern:?} host {host:?} over {stored:?}"
        );
        for k in &stored {
            assert_eq!(
                master.exists(&format!("echo:v1:{k}")),
                !expected.contains(k),
                "case {case}: {k} after {pattern:?} host {host:?}"
            );
        }
    }
}

/// The shard layout under churn: a site's index splits into shards of at most 128 targets
/// (each in Redis's compact encoding), survives overwrites and deletes that empty whole
/// shards, always lists exactly the stored targets in order, and ranged jobs over many
/// shards find what a full walk finds.
#[test]
fn the_index_shards_stay_exact_compact_and_ordered_under_churn() {
    let master = RedisServer::master();
    let store = store_on(&master, &[]);
    let long = Duration::from_secs(600);
    let site = "http://many.example";
    let mut seed: u64 = 0x2545_F491_4F6C_DD1D;
    let mut next = |n: u64| {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed % n
    };
    let mut stored = BTreeSet::new();
    for round in 0..6 {
        for _ in 0..400 {
            let target = format!("/o/{}/u/{}", next(12), next(60));
            let k = CacheKey::new("http", "many.example", &target);
            if next(4) == 0 {
                store.remove(&k).unwrap();
                stored.remove(&target);
            } else {
                // As a fill does: the generation read first (a removal since is a ban).
                let since = store.get_latest(&k).unwrap().generation;
                assert!(store.put(&k, entry(long, None), since).unwrap());
                stored.insert(target);
            }
        }
        assert_eq!(indexed(&master, site), stored, "round {round}");
        let mut conn = master.connection();
        let starts: Vec<String> = redis::cmd("ZRANGE")
            .arg(format!("echo:v1:ix:{site}"))
            .arg(0)
            .arg(-1)
            .query(&mut conn)
            .expect("ZRANGE");
        assert_eq!(starts.first().map(String::as_str), Some(""), "first shard");
        if round == 0 {
            assert!(starts.len() > 2, "split into shards: {starts:?}");
        }
        for start in &starts {
            let shard = format!("echo:v1:ixs:{site} {start}");
            let card: usize = redis::cmd("ZCARD").arg(&shard).query(&mut conn).unwrap();
            assert!(card < 128, "{shard}: {card} members");
            assert!(card > 0 || start.is_empty(), "an empty shard left: {shard}");
            if card > 0 {
                let encoding: String = redis::cmd("OBJECT")
                    .arg("ENCODING")
                    .arg(&shard)
                    .query(&mut conn)
                    .unwrap();
                assert_eq!(encoding, "listpack", "{shard}");
            }
        }
    }
    wait_index_complete(&store, &master);
    for pattern in [r"^/o/1/", r"^/o/1", r"^/o/3/u/5\d$", r"^/o/", "^/o/11/u/"] {
        let expected = stored
            .iter()
            .filter(|t| regex::Regex::new(pattern).unwrap().is_match(t))
            .count();
        let progress = Progress::default();
        let outcome = store
            .invalidate(&job(pattern, None, true), &progress)
            .unwrap();
        assert_eq!(outcome.matched as usize, expected, "{pattern}");
    }
    let outcome = store
        .invalidate(&job("^/o/", None, false), &Progress::default())
        .unwrap();
    assert_eq!(outcome.changed as usize, stored.len());
    assert!(indexed(&master, site).is_empty());
}
