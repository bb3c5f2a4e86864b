//! Pattern invalidation at scale (`harness = false`): how long `Store::invalidate` takes
//! to delete 0.1 % and 10 % of a large cache, on Redis (a master and one replica, so the
//! WAIT for the replica is part of every timing) and on the memory store.
//!
//! `ECHO_BENCH_KEYS` (default 1,000,000, a multiple of 1,000) is the number of cached keys;
//! `ECHO_BENCH_KEYS=20000` is a quick smoke run. `ECHO_BENCH_REPLICA=0` drops the replica;
//! `ECHO_BENCH_SCAN_COUNT` sets `redis.scan_count` (default: the config's default);
//! `ECHO_BENCH_REDIS=0` runs the memory store only.
//!
//! The key space is 1,000 organisations with N / 1,000 keys each:
//! `http://api.example.com/orgs/{org}/users/{j / 10}?page={j % 10 + 1}`, org 0..999 and j
//! 0..N/1000. So `^/orgs/7/` names exactly N / 1,000 keys (1,000 of 1,000,000) and
//! `^/orgs/1\d\d/` (orgs 100..199) exactly N / 10 (100,000); its literal prefix `/orgs/1`
//! also lets orgs 1 and 10..19 through the SCAN glob, which the regex then drops.
//! `/orgs/8/` is the unanchored twin of `^/orgs/8/`: same number of matches, no literal
//! prefix, so every key comes back from SCAN to be checked here.
//!
//! Each deletion is timed `RUNS` times (the deleted keys are written back between runs)
//! and the median and minimum are printed. "scanned" is `Progress.scanned`: the keys SCAN
//! (or, for a pattern with a literal prefix, the path index range)
//! returned to Echo (after the glob); "keyspace/s" is every key in the store divided by
//! the time, which is what Redis walks through whatever the glob (SCAN MATCH filters
//! server-side, after the walk); "SCANs" is the SCAN calls Redis counted, i.e. round trips.
//! Every count is asserted, and so are the keys left behind (DBSIZE on the master and on
//! the replica). Numbers are for comparing builds on the same, otherwise idle, machine.
//!
//! Redis runs as the tests run it: `tests/echo/support/redis.rs` starts the master and the
//! replica (free ports, temp dirs, no persistence, killed on drop).
//!
//! On the memory store a prober thread meanwhile looks up a key no job names, every
//! 100 µs, and the longest of those lookups is printed under each row: how long a hit
//! can wait for the store's lock while a job runs.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant, SystemTime};

use echo::config::{Config, RedisConfig};
use echo::invalidation::{Job, JobOutcome as Outcome, Matcher, Mode, Progress};
use echo::key::CacheKey;
use echo::store::memory::MemoryStore;
use echo::store::redis::{index_entries, redis_key, RedisStore};
use echo::store::{codec, Entry, Store};

// The tests' redis-server fixture (free port, temp dir, no persistence, killed on drop);
// this bench uses part of it (no pause, restart or key waits).
#[allow(dead_code)]
#[path = "../tests/echo/support/redis.rs"]
mod redis_fixture;

use redis_fixture::RedisServer;

const HOST: &str = "api.example.com";
const ORGS: u64 = 1000;
/// SETs per pipeline when populating Redis.
const PIPELINE: u64 = 10_000;
/// Redis TTL of the populated keys: nothing expires during the bench.
const TTL_MS: u64 = 3_600_000;
/// Timed runs of each deletion.
const RUNS: usize = 3;
/// Keys Echo itself keeps next to the entries: the control hash, bans, node records,
/// the site list and the directory of the bench's site's path index (its shards are
/// counted by `index_shape`).
const AUX_KEYS: [&str; 6] = [
    "echo:v1:control",
    "echo:v1:bans",
    "echo:v1:nodes",
    "echo:v1:seen",
    "echo:v1:sites",
    "echo:v1:ix:http://api.example.com",
];
/// The bench's one site.
const SITE: &str = "http://api.example.com";

const SMALL: &str = r"^/orgs/7/";
const UNANCHORED: &str = r"/orgs/8/";
const LARGE: &str = r"^/orgs/1\d\d/";
/// Ten keys whatever the size of the store (`users/1`, pages 1 to 10): a narrow job's
/// time against the keyspace's size.
const TEN: &str = r"^/orgs/9/users/1\?";

// -----------------------------------------------------------------------------------------
// The key space.

fn key(org: u64, j: u64) -> CacheKey {
    CacheKey::new(
        "http",
        HOST,
        &format!("/orgs/{org}/users/{}?page={}", j / 10, j % 10 + 1),
    )
}

/// The keys a case names: every key of its orgs; with none, `TEN`'s ten keys.
fn named(orgs: &[u64], per_org: u64) -> Vec<CacheKey> {
    if orgs.is_empty() {
        return (10..20).map(|j| key(9, j)).collect();
    }
    keys_of(orgs.iter().copied(), per_org).collect()
}

/// Every key of the given orgs.
fn keys_of(
    orgs: impl Iterator<Item = u64> + Clone,
    per_org: u64,
) -> impl Iterator<Item = CacheKey> {
    orgs.flat_map(move |org| (0..per_org).map(move |j| key(org, j)))
}

fn entry() -> Arc<Entry> {
    Arc::new(Entry {
        status: 200,
        headers: vec![
            ("content-type".into(), b"application/json".to_vec()),
            ("etag".into(), b"\"0123456789abcdef\"".to_vec()),
        ],
        body: vec![b'x'; 100],
        file: None,
        response_time: SystemTime::now(),
        initial_age: Duration::ZERO,
        freshness: Duration::from_secs(3600),
        vary: Vec::new(),
        tags: Vec::new(),
    })
}

fn job(pattern: &str, dry_run: bool) -> Job {
    Job {
        matcher: Arc::new(Matcher::new(Some(pattern), None, None).expect("pattern")),
        mode: Mode::Delete,
        dry_run,
    }
}

// -----------------------------------------------------------------------------------------
// What the bench reads from Redis.

/// Reads and writes on the populating connection may take this long (pipelines, WAIT).
const SLOW_IO: Duration = Duration::from_secs(120);

fn dbsize(server: &RedisServer) -> u64 {
    redis::cmd("DBSIZE")
        .query(&mut server.connection())
        .expect("DBSIZE")
}

/// The bench site's path index: how many shard keys, and how many targets they hold.
fn index_shape(server: &RedisServer) -> (u64, u64) {
    let mut conn = server.connection_with_timeout(SLOW_IO);
    let starts: Vec<String> = redis::cmd("ZRANGE")
        .arg(format!("echo:v1:ix:{SITE}"))
        .arg(0)
        .arg(-1)
        .query(&mut conn)
        .expect("ZRANGE");
    if starts.is_empty() {
        return (0, 0);
    }
    let mut pipe = redis::pipe();
    for start in &starts {
        pipe.cmd("ZCARD").arg(format!("echo:v1:ixs:{SITE} {start}"));
    }
    let cards: Vec<u64> = pipe.query(&mut conn).expect("ZCARD");
    (
        cards.iter().filter(|c| **c > 0).count() as u64,
        cards.iter().sum(),
    )
}

/// Entry keys: DBSIZE less Echo's own bookkeeping keys.
fn entries(server: &RedisServer) -> u64 {
    let aux: u64 = redis::cmd("EXISTS")
        .arg(&AUX_KEYS[..])
        .query(&mut server.connection())
        .expect("EXISTS");
    dbsize(server) - aux - index_shape(server).0
}

/// What a populate writes: the entries (as Echo's store script does, `SET PX`), their
/// path index members (Echo's own index script, `index_entries`), or both.
#[derive(Clone, Copy, PartialEq)]
enum Write {
    Entries,
    Index,
    Both,
}

/// Writes `keys` pipelined, `PIPELINE` per round trip, then waits (WAIT) until
/// `replicas` have them. Returns how many were written.
fn redis_populate(
    master: &RedisServer,
    replicas: u64,
    value: &[u8],
    keys: impl Iterator<Item = CacheKey>,
    write: Write,
) -> u64 {
    let mut conn = master.connection_with_timeout(SLOW_IO);
    let mut pipe = redis::pipe();
    let mut in_pipe = 0;
    let mut written = 0;
    let mut batch = Vec::new();
    let mut flush = |pipe: &mut redis::Pipeline, batch: &mut Vec<String>| {
        if write != Write::Index && !batch.is_empty() {
            pipe.query::<()>(&mut conn).expect("pipelined writes");
            pipe.clear();
        }
        if write != Write::Entries {
            index_entries(&mut conn, batch).expect("index the keys");
        }
        batch.clear();
    };
    for k in keys {
        let rkey = redis_key(&k);
        if write != Write::Index {
            pipe.cmd("SET")
                .arg(&rkey)
                .arg(value)
                .arg("PX")
                .arg(TTL_MS)
                .ignore();
        }
        batch.push(rkey);
        in_pipe += 1;
        if in_pipe == PIPELINE {
            flush(&mut pipe, &mut batch);
            written += in_pipe;
            in_pipe = 0;
        }
    }
    flush(&mut pipe, &mut batch);
    written += in_pipe;
    if replicas > 0 {
        let acked: u64 = redis::cmd("WAIT")
            .arg(replicas)
            .arg(120_000)
            .query(&mut conn)
            .expect("WAIT");
        assert_eq!(acked, replicas, "the replica did not get the keys");
    }
    written
}

fn used_memory(server: &RedisServer) -> u64 {
    server.info_u64("memory", "used_memory")
}

// -----------------------------------------------------------------------------------------
// Measuring and reporting.

struct Row {
    what: String,
    keys: u64,
    matched: u64,
    /// Milliseconds per run.
    ms: Vec<f64>,
    scanned: u64,
    scans: Option<u64>,
}

impl Row {
    fn median(&self) -> f64 {
        let mut ms = self.ms.clone();
        ms.sort_by(f64::total_cmp);
        ms[ms.len() / 2]
    }

    fn min(&self) -> f64 {
        self.ms.iter().copied().fold(f64::INFINITY, f64::min)
    }

    fn print(&self) {
        let median = self.median();
        let per_s = |n: u64| n as f64 / (median / 1000.0);
        let scans = self.scans.map_or("-".to_string(), |s| s.to_string());
        println!(
            "{:<44} {:>9} {:>9} {:>9.1} {:>9.1} {:>9} {:>12.0} {:>12.0} {:>7}",
            self.what,
            self.keys,
            self.matched,
            median,
            self.min(),
            self.scanned,
            per_s(self.scanned),
            per_s(self.keys),
            scans
        );
    }
}

fn header(title: &str) {
    println!();
    println!("{title}");
    println!(
        "{:<44} {:>9} {:>9} {:>9} {:>9} {:>9} {:>12} {:>12} {:>7}",
        "what",
        "keys",
        "matched",
        "ms (med)",
        "ms (min)",
        "scanned",
        "scanned/s",
        "keyspace/s",
        "SCANs"
    );
}

/// Runs one job on `store`, timed; checks what it reports against `want`.
fn run_job(store: &dyn Store, job: &Job, want: u64) -> (Duration, Outcome, u64) {
    let progress = Progress::default();
    let start = Instant::now();
    let outcome = store.invalidate(job, &progress).expect("invalidate");
    let took = start.elapsed();
    let what = job.matcher.describe();
    assert_eq!(outcome.matched, want, "{what}: matched");
    assert_eq!(
        progress.matched.load(Ordering::Relaxed),
        want,
        "{what}: progress.matched"
    );
    let changed = if job.dry_run { 0 } else { want };
    assert_eq!(outcome.changed, changed, "{what}: deleted");
    assert_eq!(
        progress.changed.load(Ordering::Relaxed),
        changed,
        "{what}: progress.changed"
    );
    (took, outcome, progress.scanned.load(Ordering::Relaxed))
}

// -----------------------------------------------------------------------------------------

fn redis_bench(n: u64, per_org: u64, with_replica: bool, scan_count: Option<u64>) {
    let master = RedisServer::master();
    let replica = with_replica.then(|| RedisServer::replica_of(&master));
    let replicas = u64::from(with_replica);
    let replica_urls = replica
        .as_ref()
        .map_or(String::new(), |r| format!("\"{}\"", r.url()));
    let scan_count = scan_count.map_or(String::new(), |c| format!("scan_count = {c}\n"));
    let cfg: RedisConfig = Config::parse(&format!(
        "[origin]\nurl = \"http://{HOST}\"\n[redis]\nmaster = \"{}\"\nreplicas = [{replica_urls}]\n{scan_count}",
        master.url()
    ))
    .expect("bench config")
    .redis
    .expect("[redis]");
    // max_stale: cache.max_stale_ms's default (1 h), what the store assumed before.
    let store = RedisStore::new(
        &cfg,
        4,
        Duration::from_secs(60),
        echo::policy::PolicyOptions::default(),
    )
    .expect("redis store");
    let value = codec::encode(&[entry()]);

    header(&format!(
        "Redis store: master{} (redis-server {}), scan_count {}, UNLINK batches of 500, {}-byte values",
        if with_replica { " + 1 replica, WAIT 1" } else { " only" },
        master.info_field("server", "redis_version"),
        cfg.scan_count,
        value.len(),
    ));

    let start = Instant::now();
    let written = redis_populate(
        &master,
        replicas,
        &value,
        keys_of(0..ORGS, per_org),
        Write::Entries,
    );
    let took = start.elapsed();
    assert_eq!(written, n);
    assert_eq!(entries(&master), n);
    let before_index = used_memory(&master);
    redis_populate(
        &master,
        replicas,
        &value,
        keys_of(0..ORGS, per_org),
        Write::Index,
    );
    let index_bytes = used_memory(&master).saturating_sub(before_index);
    // What Echo's background pass would conclude after finding every entry indexed.
    let _: () = redis::cmd("HSET")
        .arg("echo:v1:control")
        .arg("ixs")
        .arg(1)
        .query(&mut master.connection())
        .expect("HSET");
    println!(
        "{:<44} {:>9} {:>9} {:>9.1} {:>9} {:>9} {:>12.0}   ({} per pipeline, used_memory {})",
        "populate: pipelined SET PX",
        n,
        "-",
        took.as_secs_f64() * 1000.0,
        "-",
        "-",
        n as f64 / took.as_secs_f64(),
        PIPELINE,
        master.info_field("memory", "used_memory_human"),
    );
    println!(
        "{:<44} {:.0} bytes per entry ({} MB for {n} entries)",
        "path index memory (every target indexed)",
        index_bytes as f64 / n as f64,
        index_bytes >> 20
    );

    let check_left = |left: u64, what: &str| {
        assert_eq!(entries(&master), left, "{what}: keys left on the master");
        let indexed = index_shape(&master).1;
        assert_eq!(indexed, left, "{what}: index members left");
        if let Some(r) = &replica {
            // WAIT returned: the replica has applied every delete already.
            assert_eq!(entries(r), left, "{what}: keys left on the replica");
        }
    };

    let mut left = n;
    // (pattern, what, dry run, orgs it names)
    let cases: [(&str, &str, bool, Vec<u64>); 5] = [
        (LARGE, "dry run, 10 %", true, (100..200).collect()),
        (TEN, "delete 10 (index range)", false, vec![]),
        (SMALL, "delete 0.1 % (index range /orgs/7/)", false, vec![7]),
        (
            UNANCHORED,
            "delete 0.1 % unanchored (full SCAN)",
            false,
            vec![8],
        ),
        (
            LARGE,
            "delete 10 % (index range /orgs/1)",
            false,
            (100..200).collect(),
        ),
    ];
    for (pattern, what, dry_run, orgs) in cases {
        let want = named(&orgs, per_org).len() as u64;
        let mut row = Row {
            what: format!("{what} {pattern}"),
            keys: left,
            matched: want,
            ms: Vec::new(),
            scanned: 0,
            scans: None,
        };
        for run in 0..RUNS {
            if run > 0 && !dry_run {
                // Put back what the last run deleted.
                let keys = named(&orgs, per_org).into_iter();
                assert_eq!(
                    redis_populate(&master, replicas, &value, keys, Write::Both),
                    want
                );
                check_left(left, "re-populated");
            }
            master.reset_stats();
            let (took, outcome, scanned) = run_job(&store, &job(pattern, dry_run), want);
            if !dry_run {
                let want_replicas = with_replica.then_some((1, 1));
                assert_eq!(outcome.replicas, want_replicas, "{what}: replicas acked");
            }
            row.ms.push(took.as_secs_f64() * 1000.0);
            row.scanned = scanned;
            row.scans = Some(master.calls("scan"));
            check_left(if dry_run { left } else { left - want }, what);
        }
        if !dry_run {
            left -= want;
        }
        row.print();
    }
}

fn memory_bench(n: u64, per_org: u64) {
    // Every key shares one entry: the bench measures the scan, not the allocator.
    let e = entry();
    let store = MemoryStore::new(usize::MAX / 2, 4, Duration::from_secs(60));
    header("Memory store: keys copied 1024 per lock, matched without it, deleted 128 per lock");
    let start = Instant::now();
    for k in keys_of(0..ORGS, per_org) {
        assert!(store.put(&k, Arc::clone(&e), 0).expect("put"));
    }
    let took = start.elapsed();
    assert_eq!(store.usage().1 as u64, n);
    println!(
        "{:<44} {:>9} {:>9} {:>9.1} {:>9} {:>9} {:>12.0}   (accounted {} MB)",
        "populate: put(key, entry, 0)",
        n,
        "-",
        took.as_secs_f64() * 1000.0,
        "-",
        "-",
        n as f64 / took.as_secs_f64(),
        store.usage().0 >> 20,
    );

    let mut left = n;
    let cases: [(&str, &str, bool, Vec<u64>); 5] = [
        (LARGE, "dry run, 10 %", true, (100..200).collect()),
        (TEN, "delete 10", false, vec![]),
        (SMALL, "delete 0.1 %", false, vec![7]),
        (UNANCHORED, "delete 0.1 % unanchored", false, vec![8]),
        (LARGE, "delete 10 %", false, (100..200).collect()),
    ];
    for (pattern, what, dry_run, orgs) in cases {
        let want = named(&orgs, per_org).len() as u64;
        let mut row = Row {
            what: format!("{what} {pattern}"),
            keys: left,
            matched: want,
            ms: Vec::new(),
            scanned: 0,
            scans: None,
        };
        let mut longest_gets = Vec::new();
        for run in 0..RUNS {
            if run > 0 && !dry_run {
                // Put back what the last run deleted (a fill from the current generation).
                let since = store.get(&key(9, 0)).expect("get").generation;
                for k in named(&orgs, per_org) {
                    assert!(store.put(&k, Arc::clone(&e), since).expect("put"));
                }
            }
            let stop = AtomicBool::new(false);
            let ((took, _, scanned), longest) = thread::scope(|s| {
                let prober = s.spawn(|| longest_lookup(&store, &stop));
                let result = run_job(&store, &job(pattern, dry_run), want);
                stop.store(true, Ordering::Relaxed);
                (result, prober.join().expect("prober"))
            });
            longest_gets.push(longest.as_secs_f64() * 1000.0);
            row.ms.push(took.as_secs_f64() * 1000.0);
            row.scanned = scanned;
            let want_left = if dry_run { left } else { left - want };
            assert_eq!(store.usage().1 as u64, want_left, "{what}: keys left");
        }
        if !dry_run {
            left -= want;
        }
        row.print();
        longest_gets.sort_by(f64::total_cmp);
        println!(
            "{:<44} longest lookup during the job: {:.2} ms (median of runs), {:.2} ms (max)",
            "",
            longest_gets[longest_gets.len() / 2],
            longest_gets[longest_gets.len() - 1],
        );
    }
}

/// Looks up a key no job names every 100 µs until `stop`; returns the longest lookup.
fn longest_lookup(store: &MemoryStore, stop: &AtomicBool) -> Duration {
    let probe = key(ORGS - 1, 0);
    let mut longest = Duration::ZERO;
    while !stop.load(Ordering::Relaxed) {
        let start = Instant::now();
        let _ = store.get(&probe).expect("get");
        longest = longest.max(start.elapsed());
        thread::sleep(Duration::from_micros(100));
    }
    longest
}

fn main() {
    let n: u64 = std::env::var("ECHO_BENCH_KEYS")
        .ok()
        .map_or(1_000_000, |v| {
            v.trim().parse().expect("ECHO_BENCH_KEYS: a number")
        });
    assert!(
        n >= ORGS && n % ORGS == 0,
        "ECHO_BENCH_KEYS must be a multiple of {ORGS} (got {n})"
    );
    let with_replica = std::env::var("ECHO_BENCH_REPLICA").map_or(true, |v| v.trim() != "0");
    let scan_count = std::env::var("ECHO_BENCH_SCAN_COUNT")
        .ok()
        .map(|v| v.trim().parse().expect("ECHO_BENCH_SCAN_COUNT: a number"));
    let per_org = n / ORGS;
    println!(
        "invalidation bench: {n} keys, {ORGS} orgs x {per_org} keys \
         (http://{HOST}/orgs/{{org}}/users/{{u}}?page={{p}}), {RUNS} runs per deletion"
    );
    if std::env::var("ECHO_BENCH_REDIS").map_or(true, |v| v.trim() != "0") {
        redis_bench(n, per_org, with_replica, scan_count);
    }
    memory_bench(n, per_org);
}
