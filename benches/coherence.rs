//! How soon a change stops being served from the local tier (`harness = false`): three
//! Echo nodes (three Redis stores in this process, each with its tier and tracking) on
//! a master and a replica. A writer changes a key through node A (a fill's store) or
//! behind Echo's back (a `DEL` on the master); readers on nodes B and C, which held the
//! old version in their tiers, look it up in a loop until they see the change. Printed:
//! the time from the write's reply to each reader's first sight of the change, p50, p99
//! and max over `ECHO_BENCH_ROUNDS` rounds (default 200), per kind of change.
//!
//! Redis runs as the tests run it: `tests/echo/support/redis.rs` starts the master and
//! the replica (free ports, temp dirs, no persistence, killed on drop).

use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use echo::config::Config;
use echo::key::CacheKey;
use echo::store::redis::{redis_key, RedisStore};
use echo::store::{Entry, Store};

#[allow(dead_code)]
#[path = "../tests/echo/support/redis.rs"]
mod redis_fixture;
use redis_fixture::RedisServer;

/// The longest a reader waits for a change before the bench fails.
const GIVE_UP: Duration = Duration::from_secs(5);

fn store(master: &RedisServer, replica: &RedisServer) -> RedisStore {
    let text = format!(
        "[origin]\nurl = \"http://127.0.0.1:9\"\n[redis]\nmaster = \"{}\"\nreplicas = [\"{}\"]\n",
        master.url(),
        replica.url()
    );
    let cfg = Config::parse(&text).expect("bench config");
    RedisStore::new(
        &cfg.redis.expect("[redis]"),
        4,
        Duration::from_secs(60),
        echo::policy::PolicyOptions::default(),
    )
    .expect("redis store")
}

fn entry(version: u64) -> Arc<Entry> {
    Arc::new(Entry {
        status: 200,
        headers: vec![("content-type".into(), b"text/plain".to_vec())],
        body: format!("v{version}").into_bytes(),
        file: None,
        response_time: SystemTime::now(),
        initial_age: Duration::ZERO,
        freshness: Duration::from_secs(600),
        vary: Vec::new(),
        tags: Vec::new(),
    })
}

/// The version a node serves for `key` (0: nothing stored), and whether it came from
/// the local tier.
fn served(node: &RedisStore, key: &CacheKey) -> (u64, bool) {
    let lookup = node.get(key).expect("lookup");
    let version = lookup
        .variants
        .first()
        .and_then(|e| {
            std::str::from_utf8(&e.body)
                .ok()?
                .strip_prefix('v')?
                .parse()
                .ok()
        })
        .unwrap_or(0);
    (version, lookup.local)
}

/// Waits until `node` serves `version` for `key` from its local tier.
fn until_local(node: &RedisStore, key: &CacheKey, version: u64) {
    let start = Instant::now();
    while served(node, key) != (version, true) {
        assert!(
            start.elapsed() < GIVE_UP,
            "never held {key} v{version} locally"
        );
        thread::sleep(Duration::from_micros(200));
    }
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i]
}

#[derive(Clone, Copy, PartialEq)]
enum Change {
    /// Node A stores a new version (a fill).
    PutThroughA,
    /// A `DEL` on the master, behind Echo's back.
    DelOnMaster,
}

fn main() {
    let rounds: usize = std::env::var("ECHO_BENCH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let master = RedisServer::master();
    let replica = RedisServer::replica_of(&master);
    let nodes: Vec<Arc<RedisStore>> = (0..3).map(|_| Arc::new(store(&master, &replica))).collect();
    let key = CacheKey::new("http", "coherence.example", "/hot");
    // Every node's tier comes on once its tracking is in sync.
    let start = Instant::now();
    nodes[0].put(&key, entry(1), 0).expect("put");
    for node in &nodes {
        while !served(node, &key).1 {
            assert!(start.elapsed() < GIVE_UP, "the local tier never came on");
            thread::sleep(Duration::from_millis(10));
        }
    }
    println!(
        "local tier coherence: 3 nodes on a master and a replica (redis-server {}), {rounds} rounds",
        master.info_field("server", "redis_version")
    );
    println!(
        "{:<34} {:>10} {:>10} {:>10}   (write's reply to a reader's first sight of the change)",
        "change", "p50", "p99", "max"
    );
    let mut master_conn = master.connection();
    for change in [Change::PutThroughA, Change::DelOnMaster] {
        let mut seen: Vec<Duration> = Vec::with_capacity(rounds * 2);
        let mut version = served(&nodes[0], &key).0.max(1);
        for _ in 0..rounds {
            // Every node holds the current version locally.
            if served(&nodes[0], &key).0 != version {
                nodes[0].put(&key, entry(version), 0).expect("put");
            }
            for node in &nodes[1..] {
                until_local(node, &key, version);
            }
            let next = match change {
                Change::PutThroughA => version + 1,
                Change::DelOnMaster => 0,
            };
            let go = Arc::new(Barrier::new(3));
            let written = Arc::new(std::sync::Mutex::new(None::<Instant>));
            let readers: Vec<_> = nodes[1..]
                .iter()
                .map(|node| {
                    let (node, go, written, key) = (
                        Arc::clone(node),
                        Arc::clone(&go),
                        Arc::clone(&written),
                        key.clone(),
                    );
                    thread::spawn(move || {
                        go.wait();
                        let start = Instant::now();
                        loop {
                            if served(&node, &key).0 == next {
                                let at = Instant::now();
                                let from = written.lock().unwrap().unwrap_or(at);
                                return at.saturating_duration_since(from);
                            }
                            assert!(start.elapsed() < GIVE_UP, "the change never showed");
                            // Not a hot spin: the tracking threads share the two cores.
                            thread::sleep(Duration::from_micros(20));
                        }
                    })
                })
                .collect();
            go.wait();
            match change {
                Change::PutThroughA => {
                    nodes[0].put(&key, entry(next), 0).expect("put");
                }
                Change::DelOnMaster => {
                    let _: () = redis::cmd("DEL")
                        .arg(redis_key(&key))
                        .query(&mut master_conn)
                        .expect("DEL");
                }
            }
            *written.lock().unwrap() = Some(Instant::now());
            for reader in readers {
                seen.push(reader.join().expect("reader"));
            }
            version = next.max(1);
            if change == Change::DelOnMaster {
                nodes[0].put(&key, entry(version), 0).expect("put");
            }
        }
        seen.sort();
        let name = match change {
            Change::PutThroughA => "a new version stored through node A",
            Change::DelOnMaster => "a DEL on the master (behind Echo)",
        };
        println!(
            "{:<34} {:>7.3} ms {:>7.3} ms {:>7.3} ms",
            name,
            percentile(&seen, 0.5).as_secs_f64() * 1000.0,
            percentile(&seen, 0.99).as_secs_f64() * 1000.0,
            seen.last().copied().unwrap_or_default().as_secs_f64() * 1000.0,
        );
    }
}
