//! The Redis store's cross-node fill coalescing, driven directly (not through the proxy):
//! two `RedisStore`s on one real redis-server master stand for two Echo nodes. The fill
//! lock is read back from Redis; waiters are woken by the release's PUBLISH, and by the
//! subscriber itself when it resubscribes after losing the master. How long a wake-up
//! takes is reported by `benches/wake_up.rs`, not here.

use std::sync::mpsc;
use std::thread;
use std::time::{Duration, Instant};

use echo::config::Config;
use echo::key::CacheKey;
use echo::store::memory::MemoryStore;
use echo::store::redis::{fill_lock_key, RedisStore};
use echo::store::Store;

use crate::support::redis::RedisServer;
use crate::support::wait_until;

/// A store ("node") on `master`, with short timeouts so failure tests stay quick.
fn node(master: &RedisServer) -> RedisStore {
    let text = format!(
        "[origin]\nurl = \"http://127.0.0.1:9\"\n[redis]\nmaster = \"{}\"\n\
         connect_timeout_ms = 200\nread_timeout_ms = 200\nwrite_timeout_ms = 200\n\
         pool_timeout_ms = 200\nbreaker_failures = 2\nbreaker_open_ms = 300\n",
        master.url()
    );
    let cfg = Config::parse(&text).unwrap_or_else(|e| panic!("test config invalid: {e}"));
    let max_stale = cfg.cache.max_stale;
    RedisStore::new(
        &cfg.redis.expect("[redis]"),
        16,
        Duration::from_secs(60),
        echo::policy::PolicyOptions {
            max_stale,
            ..Default::default()
        },
    )
    .expect("redis store")
}

fn key(target: &str) -> CacheKey {
    CacheKey::new("http", "test.local", target)
}

/// The owner of `key`'s fill lock in Redis, if any.
fn lock_holder(master: &RedisServer, key: &CacheKey) -> Option<String> {
    redis::cmd("GET")
        .arg(fill_lock_key(key))
        .query(&mut master.connection())
        .expect("GET lock")
}

/// Returns once `store`'s subscriber listens: a release it publishes reaches a waiter
/// (the first ones may be published before the subscription is up, hence the rounds).
fn wait_subscribed(store: &RedisStore) {
    let probe = key("/subscriber-probe");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let waiter = store.fill_waiter(&probe);
        // The probe's lock is free: unlocking it only publishes the release.
        let published = store.unlock_fill(&probe, "probe").is_ok();
        if published && waiter.wait(Duration::from_millis(100)) {
            return;
        }
        assert!(
            Instant::now() < deadline,
            "the fill subscriber did not subscribe within 10 s"
        );
    }
}

/// Clients of `master` with a pattern subscription (`CLIENT LIST`, `psub`): one per
/// live subscriber (`PUBSUB NUMPAT` counts patterns, not subscribers).
fn pattern_subscribers(master: &RedisServer) -> usize {
    let clients: String = redis::cmd("CLIENT")
        .arg("LIST")
        .query(&mut master.connection())
        .expect("CLIENT LIST");
    clients
        .lines()
        .filter(|l| {
            l.split(' ')
                .any(|f| f.starts_with("psub=") && f != "psub=0")
        })
        .count()
}

#[test]
fn a_second_node_waits_for_the_first_nodes_fill_and_wakes_when_it_unlocks() {
    let master = RedisServer::master();
    let a = node(&master);
    let b = node(&master);
    wait_subscribed(&b);
    let k = key("/coalesced");

    assert!(a.lock_fill(&k, "a-1", Duration::from_secs(10)).unwrap());
    assert_eq!(lock_holder(&master, &k).as_deref(), Some("a-1"));
    // B registers before it tries the lock, as the proxy will.
    let waiter = b.fill_waiter(&k);
    assert!(!b.lock_fill(&k, "b-1", Duration::from_secs(10)).unwrap());

    let (woke_tx, woke) = mpsc::channel();
    let waiting = thread::spawn(move || {
        let woken = waiter.wait(Duration::from_secs(5));
        woke_tx.send((woken, Instant::now())).unwrap();
    });
    let unlocked_at = Instant::now();
    a.unlock_fill(&k, "a-1").unwrap();
    let (woken, at) = woke.recv_timeout(Duration::from_secs(10)).unwrap();
    waiting.join().unwrap();
    let latency = at.duration_since(unlocked_at);
    assert!(woken, "B's waiter was woken, not timed out");
    // Latency is the point ("wakes when it unlocks"): the release wakes B at once, far
    // inside its 5 s wait; 1 s is generous (the figure: benches/wake_up.rs).
    assert!(latency < Duration::from_secs(1), "woken after {latency:?}");
    assert_eq!(lock_holder(&master, &k), None, "the lock is gone");
    assert!(
        b.lock_fill(&k, "b-2", Duration::from_secs(10)).unwrap(),
        "and B can take it now"
    );
    b.unlock_fill(&k, "b-2").unwrap();
}

#[test]
fn an_unlock_by_another_owner_leaves_the_lock_and_wakes_nobody() {
    let master = RedisServer::master();
    let a = node(&master);
    let b = node(&master);
    wait_subscribed(&b);
    let k = key("/owned");

    assert!(a.lock_fill(&k, "a-1", Duration::from_secs(10)).unwrap());
    let waiter = b.fill_waiter(&k);
    b.unlock_fill(&k, "b-1").unwrap();
    assert_eq!(
        lock_holder(&master, &k).as_deref(),
        Some("a-1"),
        "A still holds it"
    );
    assert!(
        !waiter.wait(Duration::from_millis(300)),
        "no release was published"
    );

    let waiter = b.fill_waiter(&k);
    a.unlock_fill(&k, "a-1").unwrap();
    assert!(
        waiter.wait(Duration::from_secs(5)),
        "the owner's unlock wakes"
    );
    assert_eq!(lock_holder(&master, &k), None);
}

#[test]
fn a_lock_whose_holder_never_unlocks_expires_and_its_late_unlock_still_wakes() {
    let master = RedisServer::master();
    let a = node(&master);
    let b = node(&master);
    wait_subscribed(&b);
    let k = key("/expiring");

    let locked_at = Instant::now();
    assert!(a.lock_fill(&k, "a-1", Duration::from_millis(200)).unwrap());
    assert!(!b.lock_fill(&k, "b-1", Duration::from_secs(10)).unwrap());
    let pttl: i64 = redis::cmd("PTTL")
        .arg(fill_lock_key(&k))
        .query(&mut master.connection())
        .unwrap();
    assert!(pttl > 0 && pttl <= 200, "lock ttl {pttl} ms");
    wait_until(
        "B takes the lock A let expire",
        Duration::from_secs(5),
        || b.lock_fill(&k, "b-1", Duration::from_secs(10)).unwrap(),
    );
    let expired_after = locked_at.elapsed();
    assert!(
        expired_after >= Duration::from_millis(150),
        "{expired_after:?}"
    );

    // A's late unlock must not release B's lock.
    a.unlock_fill(&k, "a-1").unwrap();
    assert_eq!(lock_holder(&master, &k).as_deref(), Some("b-1"));

    // A lock that expired is free: its holder's (late) unlock still wakes the waiters,
    // who want to know the fill ended.
    b.unlock_fill(&k, "b-1").unwrap();
    assert!(a.lock_fill(&k, "a-2", Duration::from_millis(100)).unwrap());
    wait_until("A's second lock expires", Duration::from_secs(5), || {
        lock_holder(&master, &k).is_none()
    });
    let waiter = b.fill_waiter(&k);
    a.unlock_fill(&k, "a-2").unwrap();
    assert!(waiter.wait(Duration::from_secs(5)));
}

#[test]
fn a_waiter_nobody_wakes_times_out() {
    let master = RedisServer::master();
    let a = node(&master);
    let b = node(&master);
    wait_subscribed(&b);
    let k = key("/never-released");

    assert!(a.lock_fill(&k, "a-1", Duration::from_secs(10)).unwrap());
    let waiter = b.fill_waiter(&k);
    let started = Instant::now();
    assert!(!waiter.wait(Duration::from_millis(200)));
    let waited = started.elapsed();
    // The point is the timeout itself: not before its 200 ms, and not much after.
    assert!(
        waited >= Duration::from_millis(200) && waited < Duration::from_secs(1),
        "waited {waited:?}"
    );
}

#[test]
fn a_dropped_or_finished_waiter_is_unregistered() {
    let master = RedisServer::master();
    let a = node(&master);
    let b = node(&master);
    wait_subscribed(&b);
    assert_eq!(b.waiters_registered(), 0, "the probe's waiters are gone");
    let (k1, k2) = (key("/one"), key("/two"));

    let w1 = b.fill_waiter(&k1);
    let w2 = b.fill_waiter(&k1);
    let w3 = b.fill_waiter(&k2);
    assert_eq!(b.waiters_registered(), 3);
    drop(w1);
    assert_eq!(b.waiters_registered(), 2);
    assert!(!w3.wait(Duration::from_millis(10)), "timed out");
    assert_eq!(b.waiters_registered(), 1);
    a.unlock_fill(&k1, "a-1").unwrap();
    assert!(w2.wait(Duration::from_secs(5)), "woken");
    assert_eq!(b.waiters_registered(), 0);
}

#[test]
fn the_subscriber_resubscribes_after_a_master_restart_and_wakes_its_waiters() {
    let mut master = RedisServer::master();
    let b = node(&master);
    wait_subscribed(&b);
    let k = key("/restart");

    // Nobody will publish a release: only the resubscription can wake this waiter.
    let waiter = b.fill_waiter(&k);
    let (woke_tx, woke) = mpsc::channel();
    let waiting = thread::spawn(move || {
        let woken = waiter.wait(Duration::from_secs(20));
        woke_tx.send((woken, Instant::now())).unwrap();
    });
    assert!(
        woke.try_recv().is_err(),
        "not woken before the master went away"
    );
    master.restart();
    let restarted_at = Instant::now();
    let (woken, at) = woke.recv_timeout(Duration::from_secs(25)).unwrap();
    waiting.join().unwrap();
    println!(
        "waiter woken {:?} after the master answered again",
        at.saturating_duration_since(restarted_at)
    );
    assert!(woken, "woken by the resubscription, not timed out");

    // And releases reach waiters again.
    wait_subscribed(&b);
    let a = node(&master);
    assert!(a.lock_fill(&k, "a-1", Duration::from_secs(10)).unwrap());
    let waiter = b.fill_waiter(&k);
    a.unlock_fill(&k, "a-1").unwrap();
    assert!(waiter.wait(Duration::from_secs(5)));
}

#[test]
fn the_fill_lock_fails_fast_when_the_master_is_down() {
    let mut master = RedisServer::master();
    let b = node(&master);
    wait_subscribed(&b);
    let k = key("/down");
    master.kill();

    for attempt in 0..5 {
        let started = Instant::now();
        assert!(b.lock_fill(&k, "b-1", Duration::from_secs(10)).is_err());
        assert!(b.unlock_fill(&k, "b-1").is_err());
        let took = started.elapsed();
        println!("attempt {attempt}: lock + unlock failed in {took:?}");
        // Latency is the point ("fails fast"): connect (200 ms) or pool checkout (200 ms)
        // bound each call, then the breaker skips the master without trying.
        assert!(took < Duration::from_secs(1), "took {took:?}");
    }
    // A store can still be made (Echo starts with Redis down), and its waiters time out.
    let c = node(&master);
    let started = Instant::now();
    assert!(c.lock_fill(&k, "c-1", Duration::from_secs(10)).is_err());
    // Fast here too: its first connect fails within 200 ms.
    assert!(started.elapsed() < Duration::from_secs(1));
    assert!(!c.fill_waiter(&k).wait(Duration::from_millis(50)));
}

#[test]
fn one_unlock_wakes_every_waiter_on_the_key_and_no_other() {
    let master = RedisServer::master();
    let a = node(&master);
    let b = node(&master);
    wait_subscribed(&b);
    let k = key("/popular");
    let other = b.fill_waiter(&key("/other"));

    assert!(a.lock_fill(&k, "a-1", Duration::from_secs(10)).unwrap());
    let (woke_tx, woke) = mpsc::channel();
    let threads: Vec<_> = (0..20)
        .map(|_| {
            let waiter = b.fill_waiter(&k);
            let woke_tx = woke_tx.clone();
            thread::spawn(move || {
                woke_tx.send(waiter.wait(Duration::from_secs(5))).unwrap();
            })
        })
        .collect();
    assert_eq!(b.waiters_registered(), 21);
    a.unlock_fill(&k, "a-1").unwrap();
    for _ in 0..20 {
        let woken = woke.recv_timeout(Duration::from_secs(10)).unwrap();
        assert!(woken, "woken by the unlock, not timed out");
    }
    for t in threads {
        t.join().unwrap();
    }
    assert!(
        !other.wait(Duration::ZERO),
        "a waiter on another key sleeps on"
    );
    assert_eq!(b.waiters_registered(), 0);
}

#[test]
fn dropping_the_store_stops_its_subscriber() {
    let master = RedisServer::master();
    let stores: Vec<RedisStore> = (0..3).map(|_| node(&master)).collect();
    for store in &stores {
        wait_subscribed(store);
    }
    assert_eq!(pattern_subscribers(&master), 3);
    drop(stores);
    wait_until(
        "every subscriber has left the master",
        Duration::from_secs(5),
        || pattern_subscribers(&master) == 0,
    );
}

#[test]
fn a_single_node_store_always_fills_and_never_waits() {
    let store = MemoryStore::new(1 << 20, 16, Duration::from_secs(60));
    let k = key("/local");
    assert!(store.lock_fill(&k, "x", Duration::from_secs(1)).unwrap());
    assert!(store.lock_fill(&k, "y", Duration::from_secs(1)).unwrap());
    store.unlock_fill(&k, "x").unwrap();
    let started = Instant::now();
    assert!(!store.fill_waiter(&k).wait(Duration::from_secs(5)));
    // Latency is the point ("never waits"): the waiter returns at once instead of
    // sleeping its 5 s.
    assert!(started.elapsed() < Duration::from_secs(1));
}
