//! The Redis store: entries written and deleted on the master, read from the replicas
//! (spread round robin), so read capacity grows with replicas and every Echo node on the
//! same Redis shares one cache.
//!
//! A key's variants are one STRING (`echo:v1:<cache key>`, see `codec`), so a hit is one
//! GET; every value is written with a TTL (freshness + `ttl_margin`): nothing is immortal.
//!
//! This file is the [`Store`]; its mechanisms have their own files: `endpoint` (one
//! server: its pool and its circuit breaker), `fill_lock` (one fetch per key across
//! nodes), `bans` (the generation and the bans that keep an invalidation from being
//! undone).
//!
//! Invariants:
//! - all writes and deletes go to the master pool; reads go to replicas, then the master
//!   when no replica answers;
//! - an entry is stored only if no invalidation since its fill began names it: the store
//!   script compares the generation, and newer bans are checked before it tries again;
//! - a tag set (`echo:v1:tag:<tag>`) may still name entries deleted or expired since it
//!   indexed them: a tag job matches only members whose entry exists, checked on the
//!   master by a script that removes the missing ones from the set in the same step;
//! - every error is returned as a [`StoreError`] for the caller to treat as a miss, and
//!   a value that does not decode is a miss too;
//! - redis and r2d2 types stay in `store/redis/`.

mod bans;
mod endpoint;
mod fence;
mod fill_lock;
mod topology;

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{codec, Entry, FillWaiter, Lookup, Store, StoreError};
use crate::config::RedisConfig;
use crate::invalidation::{Checkpoint, Job, JobOutcome, Matcher, Mode, Progress, Stop, SAMPLE};
use crate::key::CacheKey;
use crate::policy;
use endpoint::{millis, Endpoint};
use fence::{Fence, CONTROL_KEY};
pub use fill_lock::fill_lock_key;
use fill_lock::FillLocks;
use topology::Topology;

/// Every key Echo writes starts with this: namespaced, and versioned with the codec.
const KEY_PREFIX: &str = "echo:v1:";
/// Entry keys: the prefix, then the readable cache key.
const ENTRY_PREFIX: &str = "echo:v1:http";
/// Tag index: one set of entry keys per `Surrogate-Key` tag.
const TAG_PREFIX: &str = "echo:v1:tag:";
/// Keys deleted or rewritten per round trip.
const BATCH: usize = 500;

/// Stores an entry only if no invalidation happened since the fill began; indexes its
/// tags in the same step. KEYS: entry, the control hash, tag sets. ARGV: the generation
/// the fill saw, the value, the TTL in ms. Returns -1 when stored, else the generation
/// now.
const STORE_SCRIPT: &str = r#"
local generation = tonumber(redis.call('HGET', KEYS[2], 'g') or '0')
if generation ~= tonumber(ARGV[1]) then return generation end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
for i = 3, #KEYS do
  redis.call('SADD', KEYS[i], KEYS[1])
  redis.call('PEXPIRE', KEYS[i], ARGV[3], 'NX')
  redis.call('PEXPIRE', KEYS[i], ARGV[3], 'GT')
end
return -1
"#;

/// Of some members of a tag set, those whose entry is still stored. The others (deleted
/// or expired since: nothing takes them out of their sets then) are removed from the set
/// too when ARGV[1] is 1, atomically with the check, so a fill storing one of them again
/// (SET and SADD, one step) is either seen or keeps its SADD. KEYS: the tag set, then the
/// members. ARGV: 1 to remove the missing, 0 to leave the set alone (dry runs).
const TAG_MEMBERS_SCRIPT: &str = r#"
local present = {}
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    present[#present + 1] = KEYS[i]
  elseif ARGV[1] == '1' then
    redis.call('SREM', KEYS[1], KEYS[i])
  end
end
return present
"#;

/// The Redis key for a cache key.
pub fn redis_key(key: &CacheKey) -> String {
    format!("{KEY_PREFIX}{}", key.as_str())
}

/// What a lookup reads in one round trip: the entry, and the control hash's generation
/// and completed jobs (see `fence`).
type Look = (Option<Vec<u8>>, (Option<u64>, Option<u64>));

/// The lookup of `key`: GET of the entry, HMGET of the control hash.
fn look_pipe(key: &CacheKey) -> redis::Pipeline {
    let mut pipe = redis::pipe();
    pipe.cmd("GET")
        .arg(redis_key(key))
        .cmd("HMGET")
        .arg(CONTROL_KEY)
        .arg("g")
        .arg("a");
    pipe
}

/// What a lookup read. A value Echo cannot decode (another version, a hand-made key) is
/// a miss.
fn lookup_of(value: Option<Vec<u8>>, generation: Option<u64>) -> Lookup {
    Lookup {
        variants: value
            .and_then(|v| codec::decode(&v).ok())
            .unwrap_or_default(),
        generation: generation.unwrap_or(0),
    }
}

pub struct RedisStore {
    /// Where the master and the replicas are (listed, or followed through Sentinel).
    topology: Arc<Topology>,
    /// What replicas must have applied to be read from (see `fence`).
    fence: Arc<Fence>,
    next_replica: AtomicUsize,
    ttl_margin: Duration,
    max_variants: usize,
    store_script: redis::Script,
    tag_members_script: redis::Script,
    ban_ttl: Duration,
    /// Replicas a job's WAIT asks for; None: every replica known then.
    wait_replicas: Option<u64>,
    wait_timeout: Duration,
    read_timeout: Duration,
    scan_count: usize,
    /// For the stale window in TTLs: only `max_stale` is used.
    stale_options: policy::PolicyOptions,
    fills: FillLocks,
}

impl RedisStore {
    /// `ban_ttl`: how long an invalidation is remembered against fills that began before
    /// it (`invalidation.ban_ttl_ms`). `max_stale`: entries are kept long enough to be
    /// served stale as their `stale-while-revalidate` / `stale-if-error` allow, up to this
    /// (`cache.max_stale_ms`).
    pub fn new(
        cfg: &RedisConfig,
        max_variants: usize,
        ban_ttl: Duration,
        max_stale: Duration,
    ) -> Result<RedisStore, StoreError> {
        let topology = Topology::start(cfg)?;
        let node = format!(
            "{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        let fence = Arc::new(Fence::new(node));
        let fills = FillLocks::start(cfg, Arc::clone(&topology), Arc::clone(&fence))?;
        Ok(RedisStore {
            topology,
            fence,
            next_replica: AtomicUsize::new(0),
            ttl_margin: cfg.ttl_margin,
            max_variants: max_variants.max(1),
            store_script: redis::Script::new(STORE_SCRIPT),
            tag_members_script: redis::Script::new(TAG_MEMBERS_SCRIPT),
            ban_ttl,
            wait_replicas: cfg.wait_replicas,
            wait_timeout: cfg.wait_timeout,
            read_timeout: cfg.read_timeout,
            scan_count: cfg.scan_count,
            stale_options: policy::PolicyOptions {
                max_stale,
                ..policy::PolicyOptions::default()
            },
            fills,
        })
    }

    /// Fill waiters registered now (for tests: none may outlive its `FillWaiter`).
    #[doc(hidden)]
    pub fn waiters_registered(&self) -> usize {
        self.fills.waiters_registered()
    }

    /// Runs `work` on the master as the topology has it now; an error that says the
    /// master moved (or is gone) makes the topology look again.
    fn on_master<T>(
        &self,
        work: impl FnOnce(&Endpoint) -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let servers = self.topology.servers();
        let result = servers.master().and_then(|m| work(m));
        if let Err(e) = &result {
            self.topology.suspect(e);
        }
        result
    }

    /// The SCAN glob for a matcher: the literal prefix of the pattern narrows it.
    fn scan_glob(matcher: &Matcher) -> String {
        let host = matcher.host().map_or("*".to_string(), glob_escape);
        let prefix = matcher.prefix().map(glob_escape).unwrap_or_default();
        format!("{ENTRY_PREFIX}://{host}{prefix}*")
    }

    /// The members of a tag set (one SSCAN reply) whose entries are still stored, checked
    /// on the master `BATCH` at a time, with the job's progress checked between batches;
    /// the missing ones are removed from the set unless `keep_missing` (a dry run).
    fn present_members(
        &self,
        conn: &mut redis::Connection,
        tag_set: &str,
        members: Vec<String>,
        keep_missing: bool,
        progress: &Progress,
    ) -> redis::RedisResult<Result<Vec<String>, Stop>> {
        let mut present = Vec::with_capacity(members.len());
        for (i, batch) in members.chunks(BATCH).enumerate() {
            if i > 0 {
                if let Err(stop) = progress.check() {
                    return Ok(Err(stop));
                }
            }
            let mut invocation = self.tag_members_script.prepare_invoke();
            invocation.key(tag_set);
            for member in batch {
                invocation.key(member);
            }
            invocation.arg(u8::from(!keep_missing));
            present.extend(invocation.invoke::<Vec<String>>(conn)?);
        }
        Ok(Ok(present))
    }

    /// Applies a job's mode to one batch of matching Redis keys, on the job's connection.
    fn apply(
        &self,
        conn: &mut redis::Connection,
        job: &Job,
        keys: &[String],
    ) -> redis::RedisResult<u64> {
        // UNLINK and MGET with no keys, or an empty pipeline, are errors.
        if keys.is_empty() {
            return Ok(0);
        }
        match (job.mode, job.matcher.tag()) {
            // Deleted through their tag: out of its set too, in one transaction (a fill
            // storing one again in between would lose its SADD to the SREM otherwise).
            (Mode::Delete, Some(tag)) => {
                let (deleted,): (u64,) = redis::pipe()
                    .atomic()
                    .cmd("UNLINK")
                    .arg(keys)
                    .cmd("SREM")
                    .arg(format!("{TAG_PREFIX}{tag}"))
                    .arg(keys)
                    .ignore()
                    .query(conn)?;
                Ok(deleted)
            }
            (Mode::Delete, None) => redis::cmd("UNLINK").arg(keys).query(conn),
            (Mode::Stale, _) => {
                let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET").arg(keys).query(conn)?;
                let mut pipe = redis::pipe();
                let mut marked = 0;
                for (key, value) in keys.iter().zip(values) {
                    let Some(variants) = value.and_then(|v| codec::decode(&v).ok()) else {
                        continue;
                    };
                    let stale = super::mark_stale(&variants);
                    // KEEPTTL: a stale entry lives as long as it would have; XX: never
                    // recreate one deleted meanwhile.
                    pipe.cmd("SET")
                        .arg(key)
                        .arg(codec::encode(&stale))
                        .arg("KEEPTTL")
                        .arg("XX")
                        .ignore();
                    marked += 1;
                }
                // Every one may have gone since it was matched (deleted, expired).
                if marked > 0 {
                    pipe.query::<()>(conn)?;
                }
                Ok(marked)
            }
            (Mode::Refresh, _) => Ok(0),
        }
    }
}

/// A 64-bit fingerprint of a key: remembering these (not the keys) bounds the memory a
/// job needs to count each match once.
fn fingerprint(key: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

/// Escapes Redis glob characters so a literal matches itself.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\' | '^') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl RedisStore {
    /// How long Redis keeps a key's variants: the longest remaining usable life (freshness
    /// plus the stale window its fields allow) plus the margin, at least one second.
    fn ttl(&self, variants: &[Arc<Entry>], now: SystemTime) -> Duration {
        let remaining = variants
            .iter()
            .map(|e| {
                let age = policy::current_age(e.initial_age, e.response_time, now);
                let stale = policy::stale_window(&e.headers, &self.stale_options);
                (e.freshness + stale).saturating_sub(age)
            })
            .max()
            .unwrap_or(Duration::ZERO);
        (remaining + self.ttl_margin).max(Duration::from_secs(1))
    }
}

impl Store for RedisStore {
    fn name(&self) -> &'static str {
        "redis"
    }

    /// A PING to every server (through its breaker: one skipped for failing is down).
    fn health(&self) -> Vec<String> {
        let servers = self.topology.servers();
        if let Err(e) = servers.master() {
            return vec![e.to_string()];
        }
        servers
            .all()
            .filter_map(|e| e.run::<String>(&redis::cmd("PING")).err())
            .map(|e| e.to_string())
            .collect()
    }

    /// One round trip: the entry and the control hash together, from a replica that has
    /// applied every invalidation this node knows of (else from the master).
    fn get(&self, key: &CacheKey) -> Result<Lookup, StoreError> {
        let pipe = look_pipe(key);
        let servers = self.topology.servers();
        let n = servers.replicas.len();
        if n > 0 && self.fence.trusted() {
            let fence = self.fence.current();
            let start = self.next_replica.fetch_add(1, Ordering::Relaxed);
            for i in 0..n {
                let replica = &servers.replicas[(start + i) % n];
                match replica.with_conn(|c| pipe.query::<Look>(c)) {
                    Ok((value, (generation, applied))) if applied.unwrap_or(0) >= fence => {
                        return Ok(lookup_of(value, generation));
                    }
                    // Behind an invalidation this node knows of: not for this read.
                    Ok(_) => {}
                    Err(_) => {}
                }
            }
        }
        self.get_latest(key)
    }

    fn get_latest(&self, key: &CacheKey) -> Result<Lookup, StoreError> {
        let pipe = look_pipe(key);
        let (value, (generation, _)): Look = self.on_master(|m| m.with_conn(|c| pipe.query(c)))?;
        Ok(lookup_of(value, generation))
    }

    fn put(&self, key: &CacheKey, entry: Arc<Entry>, since: u64) -> Result<bool, StoreError> {
        let rkey = redis_key(key);
        let tags: Vec<String> = entry
            .tags
            .iter()
            .map(|t| format!("{TAG_PREFIX}{t}"))
            .collect();
        let entry_tags = entry.tags.clone();
        let mut variants = Vec::new();
        // Only a response that varies shares its key with other variants; they are read
        // back from the master and merged (a concurrent fill elsewhere may win the write,
        // which costs a later miss, never a wrong answer).
        if !entry.vary.is_empty() {
            let mut get = redis::cmd("GET");
            get.arg(&rkey);
            if let Some(bytes) = self.on_master(|m| m.run::<Option<Vec<u8>>>(&get))? {
                variants = codec::decode(&bytes).unwrap_or_default();
            }
            super::merge_variant(&mut variants, self.max_variants, &entry);
        }
        variants.push(entry);
        let ttl = self.ttl(&variants, SystemTime::now());
        let value = codec::encode(&variants);
        let mut since = since;
        // Invalidations since the fill began may not name this entry; each round checks
        // the new ones and tries again (a few rounds at most, under heavy invalidation).
        for _ in 0..3 {
            let result: i64 = self.on_master(|m| {
                m.with_conn(|c| {
                    let mut invocation = self.store_script.prepare_invoke();
                    invocation.key(&rkey).key(CONTROL_KEY);
                    for tag in &tags {
                        invocation.key(tag);
                    }
                    invocation.arg(since).arg(&value).arg(millis(ttl));
                    invocation.invoke(c)
                })
            })?;
            if result < 0 {
                return Ok(true);
            }
            let now = result as u64;
            let banned =
                self.on_master(|m| bans::banned_since(m, since, now, key.as_str(), &entry_tags))?;
            if banned {
                return Ok(false);
            }
            since = result as u64;
        }
        Ok(false)
    }

    /// An invalidation of one key, as a job's: banned first (a fill of it in flight is
    /// not stored after), deleted, waited for on the replicas, and announced to every
    /// node before it returns.
    fn remove(&self, key: &CacheKey) -> Result<usize, StoreError> {
        let servers = self.topology.servers();
        let master = servers.master()?;
        let wait_replicas = self.wait_replicas.unwrap_or(servers.replicas.len() as u64);
        let result = bans::record(master, &Matcher::for_key(key), self.ban_ttl).and_then(|_| {
            master.with_conn(|conn| {
                let removed: usize = redis::cmd("UNLINK").arg(redis_key(key)).query(conn)?;
                if wait_replicas > 0 {
                    conn.set_read_timeout(Some(self.wait_timeout + self.read_timeout))?;
                    let acked: redis::RedisResult<u64> = redis::cmd("WAIT")
                        .arg(wait_replicas)
                        .arg(millis(self.wait_timeout))
                        .query(conn);
                    conn.set_read_timeout(Some(self.read_timeout))?;
                    acked?;
                }
                Ok(removed)
            })
        });
        let removed = result.inspect_err(|e| self.topology.suspect(e))?;
        self.fence
            .complete(master)
            .inspect_err(|e| self.topology.suspect(e))?;
        Ok(removed)
    }

    fn invalidate(&self, job: &Job, progress: &Progress) -> Result<JobOutcome, StoreError> {
        // One master for the whole job (a failover meanwhile fails it: it is not done).
        let servers = self.topology.servers();
        let master = servers.master()?;
        if !job.dry_run {
            bans::record(master, &job.matcher, self.ban_ttl)
                .inspect_err(|e| self.topology.suspect(e))?;
        }
        let wait_replicas = self.wait_replicas.unwrap_or(servers.replicas.len() as u64);
        let mut outcome = JobOutcome::default();
        let matcher = &job.matcher;
        // One connection for the whole job: the WAIT at the end covers every write on it.
        let result = master.with_conn(|conn| {
            let mut cursor: u64 = 0;
            let mut batch: Vec<String> = Vec::with_capacity(BATCH);
            let mut seen: HashSet<u64> = HashSet::new();
            let mut checkpoint = Checkpoint::new(progress);
            // A cancel or the end of the budget stops the job at its next check: before
            // each SCAN (one may walk many keys and return none) and every few hundred
            // keys. What it did is reported; the matches not yet applied are left alone,
            // and there is no WAIT (the job is not done).
            'scan: loop {
                if let Err(stop) = progress.check() {
                    outcome.stopped = Some(stop);
                    break 'scan;
                }
                let (next, mut keys): (u64, Vec<String>) = match matcher.tag() {
                    Some(tag) => redis::cmd("SSCAN")
                        .arg(format!("{TAG_PREFIX}{tag}"))
                        .arg(cursor)
                        .arg("COUNT")
                        .arg(self.scan_count)
                        .query(conn)?,
                    None => redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(Self::scan_glob(matcher))
                        .arg("COUNT")
                        .arg(self.scan_count)
                        .query(conn)?,
                };
                progress
                    .scanned
                    .fetch_add(keys.len() as u64, Ordering::Relaxed);
                // A tag set still names the entries deleted or expired since they were
                // stored: only those still stored are matched (issue 15).
                if let Some(tag) = matcher.tag() {
                    let set = format!("{TAG_PREFIX}{tag}");
                    match self.present_members(conn, &set, keys, job.dry_run, progress)? {
                        Ok(present) => keys = present,
                        Err(stop) => {
                            outcome.stopped = Some(stop);
                            break 'scan;
                        }
                    }
                }
                for rkey in keys {
                    if let Err(stop) = checkpoint.key(rkey.len()) {
                        outcome.stopped = Some(stop);
                        break 'scan;
                    }
                    let Some(key) = rkey.strip_prefix(KEY_PREFIX) else {
                        continue;
                    };
                    // The tag part is already satisfied by the tag set.
                    if !matcher.matches_key(key) {
                        continue;
                    }
                    // SCAN may return a key twice (when Redis resizes its table during
                    // the scan, as this job's own deletes can make it): count it once.
                    if !seen.insert(fingerprint(&rkey)) {
                        continue;
                    }
                    outcome.matched += 1;
                    progress.matched.fetch_add(1, Ordering::Relaxed);
                    if outcome.sample.len() < SAMPLE {
                        outcome.sample.push(key.to_string());
                    }
                    if job.dry_run {
                        continue;
                    }
                    if job.mode == Mode::Refresh {
                        outcome.to_refresh.push(key.to_string());
                        continue;
                    }
                    batch.push(rkey);
                    if batch.len() >= BATCH {
                        let n = self.apply(conn, job, &batch)?;
                        outcome.changed += n;
                        progress.changed.fetch_add(n, Ordering::Relaxed);
                        batch.clear();
                    }
                }
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
            if outcome.stopped.is_some() {
                return Ok(());
            }
            if !batch.is_empty() {
                let n = self.apply(conn, job, &batch)?;
                outcome.changed += n;
                progress.changed.fetch_add(n, Ordering::Relaxed);
            }
            // Read-your-invalidation: the call returns only when the replicas have the
            // deletes (or the wait times out, which the answer reports).
            if !job.dry_run && wait_replicas > 0 {
                // WAIT itself blocks for up to wait_timeout: the connection's read
                // timeout must outlast it, then go back to what every call gets.
                conn.set_read_timeout(Some(self.wait_timeout + self.read_timeout))?;
                let acked: redis::RedisResult<u64> = redis::cmd("WAIT")
                    .arg(wait_replicas)
                    .arg(millis(self.wait_timeout))
                    .query(conn);
                conn.set_read_timeout(Some(self.read_timeout))?;
                outcome.replicas = Some((acked?, wait_replicas));
            }
            Ok(())
        });
        if let Err(e) = &result {
            self.topology.suspect(e);
        }
        result?;
        // Done: every node hears of it (and stops reading replicas that have not
        // applied it) before the job returns.
        if !job.dry_run && outcome.stopped.is_none() {
            outcome.nodes = Some(
                self.fence
                    .complete(master)
                    .inspect_err(|e| self.topology.suspect(e))?,
            );
        }
        Ok(outcome)
    }

    fn lock_fill(&self, key: &CacheKey, owner: &str, ttl: Duration) -> Result<bool, StoreError> {
        self.on_master(|m| self.fills.lock(m, key, owner, ttl))
    }

    /// One round trip: SET NX and, after it on the same connection, the MGET of the
    /// entry and the generation (its answer is used only when the lock was taken).
    fn lock_fill_and_look(
        &self,
        key: &CacheKey,
        owner: &str,
        ttl: Duration,
    ) -> Result<(bool, Option<Lookup>), StoreError> {
        let mut pipe = redis::pipe();
        pipe.add_command(fill_lock::lock_command(key, owner, ttl))
            .cmd("GET")
            .arg(redis_key(key))
            .cmd("HMGET")
            .arg(CONTROL_KEY)
            .arg("g")
            .arg("a");
        type Answer = (Option<String>, Option<Vec<u8>>, (Option<u64>, Option<u64>));
        let (locked, value, (generation, _)): Answer =
            self.on_master(|m| m.with_conn(|c| pipe.query(c)))?;
        if locked.is_none() {
            return Ok((false, None));
        }
        Ok((true, Some(lookup_of(value, generation))))
    }

    fn unlock_fill(&self, key: &CacheKey, owner: &str) -> Result<(), StoreError> {
        self.on_master(|m| self.fills.unlock(m, key, owner))
    }

    fn fill_waiter(&self, key: &CacheKey) -> FillWaiter {
        self.fills.waiter(key)
    }
}
