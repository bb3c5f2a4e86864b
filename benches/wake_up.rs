//! Cross-node wake-up (`harness = false`): when one Echo node ends a fill, how long until
//! a request waiting on that key on another node wakes. Two `RedisStore`s on one real
//! redis-server master stand for the two nodes, as in tests/echo/redis_lock.rs: node A
//! takes the key's fill lock, node B registers waiters, A unlocks (the release's PUBLISH
//! reaches B's subscriber), and the time from A's unlock call to B's last waiter awake is
//! recorded. Reported for one waiter and for the last of 20 waiters on the key.
//!
//! This was printed by a test; the test keeps what can fail (the waiter is woken, the
//! lock is gone) and the figure is reported here. `ECHO_BENCH_ROUNDS` (default 200) sets
//! the rounds of each; numbers are for comparing builds on the same machine. Redis is
//! started by the tests' fixture (tests/echo/support/redis.rs).

use std::sync::{mpsc, Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use echo::config::Config;
use echo::key::CacheKey;
use echo::store::redis::RedisStore;
use echo::store::Store;

// The tests' redis-server fixture; this bench starts a master and nothing else of it.
#[allow(dead_code)]
#[path = "../tests/echo/support/redis.rs"]
mod redis_fixture;

use redis_fixture::RedisServer;

/// How long any one wait may take before the bench fails.
const DEADLINE: Duration = Duration::from_secs(10);

/// A store ("node") on `master`.
fn node(master: &RedisServer) -> RedisStore {
    let text = format!(
        "[origin]\nurl = \"http://127.0.0.1:9\"\n[redis]\nmaster = \"{}\"\n",
        master.url()
    );
    let cfg = Config::parse(&text).unwrap_or_else(|e| panic!("bench config invalid: {e}"));
    RedisStore::new(
        &cfg.redis.expect("[redis]"),
        32,
        Duration::from_secs(60),
        echo::policy::PolicyOptions::from_config(&cfg.cache),
    )
    .expect("redis store")
}

fn key(target: &str) -> CacheKey {
    CacheKey::new("http", "bench.local", target)
}

/// Returns once `store`'s subscriber listens: a release it publishes reaches a waiter.
fn wait_subscribed(store: &RedisStore) {
    let probe = key("/subscriber-probe");
    let deadline = Instant::now() + DEADLINE;
    loop {
        let waiter = store.fill_waiter(&probe);
        let published = store.unlock_fill(&probe, "probe").is_ok();
        if published && waiter.wait(Duration::from_millis(100)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the fill subscriber did not subscribe within {DEADLINE:?}"
        );
    }
}

/// One round: A locks `target`, `waiters` threads wait on it through B, A unlocks.
/// Returns how long after the unlock call the last waiter woke.
fn round(a: &RedisStore, b: &RedisStore, target: &str, waiters: usize) -> Duration {
    let k = key(target);
    assert!(a.lock_fill(&k, "a", DEADLINE).expect("lock_fill"));
    let ready = Arc::new(Barrier::new(waiters + 1));
    let (woke_tx, woke) = mpsc::channel();
    let threads: Vec<_> = (0..waiters)
        .map(|_| {
            // Registered here, before the unlock, as the proxy registers before it tries
            // the lock.
            let waiter = b.fill_waiter(&k);
            let (ready, woke_tx) = (Arc::clone(&ready), woke_tx.clone());
            thread::spawn(move || {
                ready.wait();
                let woken = waiter.wait(DEADLINE);
                let _ = woke_tx.send((woken, Instant::now()));
            })
        })
        .collect();
    ready.wait();
    let unlocked_at = Instant::now();
    a.unlock_fill(&k, "a").expect("unlock_fill");
    let mut last = Duration::ZERO;
    for _ in 0..waiters {
        let (woken, at) = woke.recv_timeout(DEADLINE * 2).expect("a waiter answered");
        assert!(woken, "a waiter timed out instead of being woken");
        last = last.max(at.duration_since(unlocked_at));
    }
    for t in threads {
        t.join().expect("waiter thread");
    }
    last
}

fn report(what: &str, mut latencies: Vec<Duration>) {
    latencies.sort();
    let pct = |p: usize| latencies[(latencies.len() - 1) * p / 100];
    println!(
        "{what:<44} {:>6} rounds: median {:>10.1?}, p90 {:>10.1?}, p99 {:>10.1?}, max {:>10.1?}",
        latencies.len(),
        pct(50),
        pct(90),
        pct(99),
        pct(100)
    );
}

fn main() {
    let rounds: usize = std::env::var("ECHO_BENCH_ROUNDS").ok().map_or(200, |v| {
        v.trim().parse().expect("ECHO_BENCH_ROUNDS: a number")
    });
    assert!(rounds > 0, "ECHO_BENCH_ROUNDS must be > 0");
    let master = RedisServer::master();
    let a = node(&master);
    let b = node(&master);
    wait_subscribed(&b);
    println!(
        "cross-node wake-up, unlock call on node A to waiter awake on node B \
         (redis-server {} on 127.0.0.1)",
        master.info_field("server", "redis_version")
    );
    for waiters in [1, 20] {
        let latencies = (0..rounds)
            .map(|i| round(&a, &b, &format!("/wake/{waiters}/{i}"), waiters))
            .collect();
        let what = if waiters == 1 {
            "1 waiter".to_string()
        } else {
            format!("last of {waiters} waiters on one key")
        };
        report(&what, latencies);
    }
}
