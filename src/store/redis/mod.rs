//! The Redis store: entries written and deleted on the master, read from the replicas
//! (spread round robin), so read capacity grows with replicas and every Echo node on the
//! same Redis shares one cache.
//!
//! A key's variants are one STRING (`echo:v1:<cache key>`, see `codec`), so a hit is one
//! round trip (the entry and the control hash, pipelined); every entry is written with a
//! TTL (freshness + `ttl_margin`): nothing Echo caches is immortal. Control state (the
//! control hash, bans, node records, tag sets) has no TTL, so a `volatile-*` eviction
//! policy evicts entries only.
//!
//! This file is the [`Store`]; its mechanisms have their own files: `topology` (where
//! the master and replicas are, listed or through Sentinel), `endpoint` (one server: its
//! pool and its circuit breaker), `fill_lock` (one fetch per key across nodes), `bans`
//! (the generation and the bans that keep an invalidation from being undone), `fence`
//! (an invalidation's reach over replicas and nodes), `jobs` (invalidation jobs: tag
//! sets, path index ranges, URL lists, SCANs), `tidy` (the indexes' background upkeep),
//! `monitor` (what each server is doing).
//!
//! Invariants:
//! - all writes and deletes go to the master pool; reads go to replicas that have
//!   applied every invalidation this node knows of, else to the master;
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
mod index;
mod jobs;
mod local;
mod monitor;
mod tidy;
mod topology;
mod tracking;

use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use super::{
    codec, Entry, FillLockAttempt, FillWaiter, LocalTierReport, Lookup, ServerHealth, Store,
    StoreError,
};
use crate::config::RedisConfig;
use crate::invalidation::{Job, JobOutcome, Matcher, Progress};
use crate::key::CacheKey;
use crate::policy;
use endpoint::{millis, Endpoint};
use fence::{Fence, CONTROL_KEY};
pub use fill_lock::fill_lock_key;
use fill_lock::FillLocks;
pub use index::{index_entries, indexed_targets};
use index::{unlink_indexed, SITES_KEY};
use local::LocalTier;
use monitor::Monitor;
use topology::Topology;
use tracking::{TierState, Tracking};

/// Every key Echo writes starts with this: namespaced, and versioned with the codec.
const KEY_PREFIX: &str = "echo:v1:";
/// Entry keys: the prefix, then the readable cache key.
const ENTRY_PREFIX: &str = "echo:v1:http";
/// Tag index: one set of entry keys per `Surrogate-Key` tag.
const TAG_PREFIX: &str = "echo:v1:tag:";
/// Keys deleted or rewritten per round trip.
const BATCH: usize = 500;

/// Stores an entry only if no invalidation happened since the fill began; indexes its
/// path and tags and forgets the key's hit-for-pass marker in the same step. KEYS:
/// entry, the control hash, the pass marker, the site's index directory (see `index`),
/// the sites, the key's fill lock, tag sets. ARGV: the generation the fill saw, the
/// value, the TTL in ms, the target, the site, the fill lock's owner to release it for
/// ("" for none), its release channel. Returns -1 when stored (and the lock released as
/// `UNLOCK_SCRIPT` does), else the generation now. Tag sets have no TTL (a `volatile-*`
/// eviction policy never takes an index away from its entries): each addition checks
/// two random members and drops those whose entry is gone, so a set written to holds at
/// most about twice its live entries (and `tidy` walks the others).
const STORE_SCRIPT: &str = concat!(
    index::index_lua!(),
    r#"
local generation = tonumber(redis.call('HGET', KEYS[2], 'g') or '0')
if generation ~= tonumber(ARGV[1]) then return generation end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
redis.call('DEL', KEYS[3])
index_add(ARGV[5], ARGV[4])
redis.call('SADD', KEYS[5], ARGV[5])
if ARGV[6] ~= '' then
  local holder = redis.call('GET', KEYS[6])
  if holder == ARGV[6] then redis.call('DEL', KEYS[6]) end
  if (not holder) or holder == ARGV[6] then redis.call('PUBLISH', ARGV[7], '') end
end
for i = 7, #KEYS do
  redis.call('SADD', KEYS[i], KEYS[1])
  for _, member in ipairs(redis.call('SRANDMEMBER', KEYS[i], 2)) do
    if member ~= KEYS[1] and redis.call('EXISTS', member) == 0 then
      redis.call('SREM', KEYS[i], member)
    end
  end
end
return -1
"#
);

/// The Redis key for a cache key.
pub fn redis_key(key: &CacheKey) -> String {
    format!("{KEY_PREFIX}{}", key.as_str())
}

/// A cache key's site (`scheme://host`) and target (from the first `/` after the host).
fn site_and_target(key: &str) -> Option<(&str, &str)> {
    let host = key.find("://")? + 3;
    let slash = host + key[host..].find('/')?;
    Some((&key[..slash], &key[slash..]))
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
        local: false,
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
    tag_sweep_per_sec: usize,
    /// The cache's policy, for the stale window in TTLs (`policy::stale_window`).
    stale_options: policy::PolicyOptions,
    fills: FillLocks,
    /// How far the walk that trims tag sets has got.
    tag_tidy: std::sync::Mutex<tidy::TagTidy>,
    /// How far the walks that fill and trim the path index have got.
    index_tidy: std::sync::Mutex<tidy::IndexTidy>,
    /// What each server is doing (roles, links, lag, memory), looked at twice a second.
    monitor: Monitor,
    /// The local tier and what keeps it coherent; None when `local_cache_max_bytes` is 0.
    tracking: Option<TrackingHandle>,
}

/// The store's hold on its tracking: dropping the store stops its threads.
struct TrackingHandle(Arc<Tracking>);

impl Drop for TrackingHandle {
    fn drop(&mut self) {
        self.0.shutdown();
    }
}

impl RedisStore {
    /// `ban_ttl`: how long an invalidation is remembered against fills that began before
    /// it (`invalidation.ban_ttl_ms`). `policy`: the cache's; entries are kept long enough
    /// to be served stale as their directives (targeted fields included) and
    /// `cache.stale_if_error_ms` allow, up to `cache.max_stale_ms`.
    pub fn new(
        cfg: &RedisConfig,
        max_variants: usize,
        ban_ttl: Duration,
        policy: policy::PolicyOptions,
    ) -> Result<RedisStore, StoreError> {
        let topology = Topology::start(cfg)?;
        let node = format!(
            "{}-{}",
            std::process::id(),
            SystemTime::now()
                .duration_since(SystemTime::UNIX_EPOCH)
                .map_or(0, |d| d.as_nanos())
        );
        let tracking = match cfg.local_cache_max_bytes {
            0 => None,
            bytes => Some(TrackingHandle(Tracking::start(
                Arc::new(LocalTier::new(bytes, cfg.local_cache_max_ttl)),
                Arc::clone(&topology),
                node.clone(),
                cfg.connect_timeout,
                cfg.write_timeout,
            )?)),
        };
        let fence = Arc::new(Fence::new(node));
        let fills = FillLocks::start(
            cfg,
            Arc::clone(&topology),
            Arc::clone(&fence),
            tracking.as_ref().map(|t| Arc::clone(&t.0)),
        )?;
        let monitor = Monitor::start(Arc::clone(&topology), cfg)?;
        Ok(RedisStore {
            topology,
            fence,
            next_replica: AtomicUsize::new(0),
            ttl_margin: cfg.ttl_margin,
            max_variants: max_variants.max(1),
            store_script: redis::Script::new(STORE_SCRIPT),
            tag_members_script: redis::Script::new(jobs::TAG_MEMBERS_SCRIPT),
            ban_ttl,
            wait_replicas: cfg.wait_replicas,
            wait_timeout: cfg.wait_timeout,
            read_timeout: cfg.read_timeout,
            scan_count: cfg.scan_count,
            tag_sweep_per_sec: cfg.tag_sweep_per_sec,
            stale_options: policy,
            fills,
            tag_tidy: Default::default(),
            index_tidy: Default::default(),
            monitor,
            tracking,
        })
    }

    /// Fill waiters registered now (for tests: none may outlive its `FillWaiter`).
    #[doc(hidden)]
    pub fn waiters_registered(&self) -> usize {
        self.fills.waiters_registered()
    }

    /// One round trip: the entry and the control hash together, from a replica fit to
    /// read from that has applied every invalidation this node knows of (else from the
    /// master), with the server that answered.
    fn read(&self, key: &CacheKey) -> Result<(Lookup, String), StoreError> {
        let pipe = look_pipe(key);
        let servers = self.topology.servers();
        let n = servers.replicas.len();
        if n > 0 && self.fence.trusted() {
            let fence = self.fence.current();
            let start = self.next_replica.fetch_add(1, Ordering::Relaxed);
            for i in 0..n {
                let replica = &servers.replicas[(start + i) % n];
                if !replica.readable() {
                    continue;
                }
                match replica.with_conn(|c| pipe.query::<Look>(c)) {
                    Ok((value, (generation, applied))) if applied.unwrap_or(0) >= fence => {
                        return Ok((lookup_of(value, generation), replica.name.clone()));
                    }
                    // Behind an invalidation this node knows of: not for this read.
                    Ok(_) => {}
                    Err(_) => {}
                }
            }
        }
        self.read_master(key)
    }

    /// The lookup on the master, with its name.
    fn read_master(&self, key: &CacheKey) -> Result<(Lookup, String), StoreError> {
        let pipe = look_pipe(key);
        self.on_master(|m| {
            let (value, (generation, _)): Look = m.with_conn(|c| pipe.query(c))?;
            Ok((lookup_of(value, generation), m.name.clone()))
        })
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
}

impl RedisStore {
    /// This node's own local tier lets go of what a job changed before the job returns.
    /// The other nodes acknowledge a job only after syncing theirs (`fence`); this one,
    /// which runs the job, is not among those it waits for, and its tracking thread may
    /// not have read the job's messages yet (a busy machine): a sync marker written now
    /// and delivered on every connection proves it has, or the tier is flushed.
    fn sync_own_tier(&self, master: &Endpoint) {
        if let Some(tracking) = &self.tracking {
            tracking.0.sync(master);
        }
    }

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

impl RedisStore {
    /// Stores an entry (see `STORE_SCRIPT`); with `unlock`, the script also releases the
    /// owner's fill lock when it stores at its first try, and says so.
    fn store_entry(
        &self,
        key: &CacheKey,
        entry: Arc<Entry>,
        since: u64,
        mut unlock: Option<(&str, &mut bool)>,
    ) -> Result<bool, StoreError> {
        let rkey = redis_key(key);
        let Some((site, target)) = site_and_target(key.as_str()) else {
            // Every cache key has a site and a path; one without is not stored.
            return Ok(false);
        };
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
                    invocation
                        .key(&rkey)
                        .key(CONTROL_KEY)
                        .key(fill_lock::pass_key(key))
                        .key(index::directory_key(site))
                        .key(SITES_KEY)
                        .key(fill_lock_key(key));
                    for tag in &tags {
                        invocation.key(tag);
                    }
                    invocation
                        .arg(since)
                        .arg(&value)
                        .arg(millis(ttl))
                        .arg(target)
                        .arg(site)
                        .arg(unlock.as_ref().map_or("", |(owner, _)| *owner))
                        .arg(fill_lock::filled_channel(key));
                    invocation.invoke(c)
                })
            })?;
            if result < 0 {
                if let Some((owner, released)) = unlock.as_mut() {
                    self.fills.forget(key, owner);
                    **released = true;
                }
                return Ok(true);
            }
            // Not released by the script: the caller releases it.
            if let Some((_, released)) = unlock.as_mut() {
                **released = false;
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
}

impl Store for RedisStore {
    fn name(&self) -> &'static str {
        "redis"
    }

    /// Each degraded server and why, as the monitor last found them (no round trip).
    fn health(&self) -> Vec<String> {
        if let Err(e) = self.topology.servers().master() {
            return vec![e.to_string()];
        }
        self.monitor
            .found()
            .iter()
            .filter(|s| !s.degraded.is_empty())
            .map(|s| {
                let why: Vec<&str> = s.degraded.iter().map(|(_, text)| text.as_str()).collect();
                format!(
                    "store degraded: redis {} {}: {}",
                    s.role,
                    s.server,
                    why.join("; ")
                )
            })
            .collect()
    }

    fn servers(&self) -> Vec<ServerHealth> {
        self.monitor.found().to_vec()
    }

    fn local_tier(&self) -> Option<LocalTierReport> {
        let TrackingHandle(tracking) = self.tracking.as_ref()?;
        let (state, reason) = match tracking.state() {
            TierState::On => ("on", None),
            TierState::Syncing => ("syncing", None),
            TierState::Refused(why) => ("refused", Some(why)),
        };
        let (bytes, entries) = tracking.tier.usage();
        let counts = &tracking.tier.counts;
        Some(LocalTierReport {
            state,
            reason,
            bytes,
            entries,
            hits: counts.hits.load(Ordering::Relaxed),
            misses: counts.misses.load(Ordering::Relaxed),
            invalidations: counts.invalidations.load(Ordering::Relaxed),
            flushes: counts.flushes.load(Ordering::Relaxed),
        })
    }

    /// One round trip: the entry and the control hash together, from a replica fit to
    /// read from that has applied every invalidation this node knows of (else from the
    /// master).
    fn get(&self, key: &CacheKey) -> Result<Lookup, StoreError> {
        let Some(TrackingHandle(tracking)) = &self.tracking else {
            return self.read(key).map(|(lookup, _)| lookup);
        };
        if let Some(held) = tracking.tier.get(key.as_str()) {
            return Ok(held);
        }
        // Taken before the read: an invalidation during it keeps the answer out.
        let ticket = tracking.tier.ticket();
        let (lookup, server) = self.read(key)?;
        let synced_since = tracking.synced_since(&server);
        tracking
            .tier
            .insert(key.as_str(), &lookup, ticket, synced_since);
        Ok(lookup)
    }

    /// A local-tier hit; anything else needs a round trip.
    fn peek(&self, key: &CacheKey) -> Option<Lookup> {
        let TrackingHandle(tracking) = self.tracking.as_ref()?;
        tracking.tier.get(key.as_str())
    }

    fn get_latest(&self, key: &CacheKey) -> Result<Lookup, StoreError> {
        self.read_master(key).map(|(lookup, _)| lookup)
    }

    fn put(&self, key: &CacheKey, entry: Arc<Entry>, since: u64) -> Result<bool, StoreError> {
        self.store_entry(key, entry, since, None)
    }

    /// The store script releases the lock in the same step (one round trip less per
    /// miss); when the entry is not stored at its first try, the lock is released after.
    fn put_and_unlock(
        &self,
        key: &CacheKey,
        entry: Arc<Entry>,
        since: u64,
        owner: &str,
    ) -> Result<bool, StoreError> {
        let mut released = false;
        let stored = self.store_entry(key, entry, since, Some((owner, &mut released)));
        if !released {
            let unlocked = self.unlock_fill(key, owner);
            let stored = stored?;
            return unlocked.map(|()| stored);
        }
        stored
    }

    /// An invalidation of one key, as a job's: banned first (a fill of it in flight is
    /// not stored after), deleted, waited for on the replicas, and announced to every
    /// node before it returns.
    fn remove(&self, key: &CacheKey) -> Result<usize, StoreError> {
        let servers = self.topology.servers();
        let master = servers.master()?;
        let matcher = Matcher::for_key(key);
        let rkeys = [redis_key(key)];
        let unlink = || master.with_conn(|c| unlink_indexed(c, &rkeys, None).map(|n| n as usize));
        let result = (|| {
            let removed = match bans::record(master, &matcher, self.ban_ttl) {
                Ok(_) => unlink()?,
                // Full (noeviction): the delete first, which frees memory, then the ban,
                // then the delete again for a fill that stored in between.
                Err(StoreError::OutOfMemory { .. }) => {
                    let removed = unlink()?;
                    bans::record(master, &matcher, self.ban_ttl)?;
                    removed.max(unlink()?)
                }
                Err(e) => return Err(e),
            };
            self.fence.complete(master, &self.replica_wait(&servers))?;
            self.sync_own_tier(master);
            Ok(removed)
        })();
        result.inspect_err(|e| self.topology.suspect(e))
    }

    fn invalidate(&self, job: &Job, progress: &Progress) -> Result<JobOutcome, StoreError> {
        // One master for the whole job (a failover meanwhile fails it: it is not done).
        let servers = self.topology.servers();
        let master = servers.master()?;
        self.run_job(master, &servers, job, progress)
            .inspect_err(|e| self.topology.suspect(e))
    }

    fn lock_fill(&self, key: &CacheKey, owner: &str, ttl: Duration) -> Result<bool, StoreError> {
        self.on_master(|m| self.fills.lock(m, key, owner, ttl))
    }

    /// One round trip: the lock attempt (see `fill_lock`) and, after it on the same
    /// connection, the look at the entry and the generation (used only when the lock was
    /// taken). A lock taken is renewed until `unlock_fill`.
    fn lock_fill_and_look(
        &self,
        key: &CacheKey,
        owner: &str,
        lease: Duration,
    ) -> Result<FillLockAttempt, StoreError> {
        let mut pipe = redis::pipe();
        pipe.add_command(fill_lock::lock_or_pass_command(key, owner, lease))
            .cmd("GET")
            .arg(redis_key(key))
            .cmd("HMGET")
            .arg(CONTROL_KEY)
            .arg("g")
            .arg("a");
        type Answer = (i64, Option<Vec<u8>>, (Option<u64>, Option<u64>));
        let (attempt, value, (generation, _)): Answer =
            self.on_master(|m| m.with_conn(|c| pipe.query(c)))?;
        Ok(match attempt {
            fill_lock::TAKEN => {
                self.fills.hold(key, owner, lease);
                FillLockAttempt::Taken(Some(lookup_of(value, generation)))
            }
            fill_lock::PASS => FillLockAttempt::Pass,
            left => FillLockAttempt::Held {
                expires_in: Duration::from_millis(left.max(0) as u64),
            },
        })
    }

    fn mark_uncacheable(&self, key: &CacheKey, ttl: Duration) -> Result<(), StoreError> {
        let mut set = redis::cmd("SET");
        set.arg(fill_lock::pass_key(key))
            .arg(1)
            .arg("PX")
            .arg(millis(ttl).max(1));
        self.on_master(|m| m.run::<()>(&set))
    }

    fn unlock_fill(&self, key: &CacheKey, owner: &str) -> Result<(), StoreError> {
        self.on_master(|m| self.fills.unlock(m, key, owner))
    }

    fn tidy(&self) {
        self.tidy_index();
        self.tidy_tags();
    }

    fn fill_waiter(&self, key: &CacheKey) -> FillWaiter {
        self.fills.waiter(key)
    }
}
