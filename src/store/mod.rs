//! What a cached response is ([`Entry`]) and where it lives ([`Store`]).
//!
//! A key holds every Vary variant of its resource: a lookup returns them all and the
//! policy picks the one the request selects, so a hit costs one store round trip.
//!
//! Stores shared by several Echo nodes also coordinate fills: a cluster-wide fill lock
//! per key ([`Store::lock_fill`]) and a [`FillWaiter`] woken when it is released, so one
//! node fetches a key from the origin while the others wait for it. Single-node stores
//! keep the defaults (the local coalescer is enough).
//!
//! Invariants: a store never fails a request: errors are returned for the caller to
//! treat as a miss; entries are immutable once stored (shared as `Arc`).

pub mod codec;
pub mod memory;
pub mod redis;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crossbeam_channel::Receiver;

/// Moved below `http` and `store` (issue 14); this path stays until the final cleanup.
use crate::body_file;
use crate::http::Headers;
use crate::invalidation::{Job, JobOutcome, Progress};
use crate::key::CacheKey;
use crate::policy::VarySnapshot;

/// A stored response.
#[derive(Debug, Clone)]
pub struct Entry {
    pub status: u16,
    /// End-to-end response fields as received (no hop-by-hop, no framing, no Age).
    pub headers: Headers,
    /// The body, unless it is in `file`.
    pub body: Vec<u8>,
    /// The body in a sealed memfd (the memory store's large bodies); `body` is then
    /// empty. Sent with sendfile.
    pub file: Option<Arc<body_file::BodyFile>>,
    /// When the response was received (RFC 9111 §4.2.3 `response_time`).
    pub response_time: SystemTime,
    /// RFC 9111 §4.2.3 `corrected_initial_age`.
    pub initial_age: Duration,
    /// Freshness lifetime (RFC 9111 §4.2.1).
    pub freshness: Duration,
    /// The request's values of the fields named by Vary, when stored.
    pub vary: VarySnapshot,
    /// The origin's `Surrogate-Key` tags, for invalidation by tag.
    pub tags: Vec<String>,
}

impl Entry {
    /// Approximate bytes this entry occupies, for the memory bound: what its body holds
    /// allocated, not only what it uses, so slack in a buffer cannot escape the bound.
    pub(crate) fn size(&self) -> usize {
        let headers: usize = self
            .headers
            .iter()
            .map(|(n, v)| n.len() + v.len() + 48)
            .sum();
        let vary: usize = self
            .vary
            .iter()
            .map(|(n, v)| n.len() + v.as_ref().map_or(0, |v| v.len()) + 48)
            .sum();
        let tags: usize = self.tags.iter().map(|t| t.len() + 24).sum();
        let body = match &self.file {
            Some(f) => f.len() as usize,
            None => self.body.capacity(),
        };
        body + headers + vary + tags + std::mem::size_of::<Entry>()
    }

    /// The same entry with its body moved into a memfd when it is large enough and a
    /// file can be had (else unchanged).
    pub(crate) fn with_body_in_file(entry: Arc<Entry>) -> Arc<Entry> {
        if entry.file.is_some() || entry.body.len() < body_file::MIN_BYTES {
            return entry;
        }
        match body_file::BodyFile::create(&entry.body) {
            Some(file) => Arc::new(Entry {
                status: entry.status,
                headers: entry.headers.clone(),
                body: Vec::new(),
                file: Some(Arc::new(file)),
                response_time: entry.response_time,
                initial_age: entry.initial_age,
                freshness: entry.freshness,
                vary: entry.vary.clone(),
                tags: entry.tags.clone(),
            }),
            None => entry,
        }
    }

    /// The variants under one key are told apart by the Vary field names and the
    /// request's values for them.
    pub(crate) fn same_variant(&self, other: &Entry) -> bool {
        self.vary == other.vary
    }
}

/// Makes room in `variants` for `new`: drops the variant it replaces, every variant stored
/// under a different set of Vary fields (the origin changed its Vary), and the oldest
/// ones beyond `max_variants - 1` (e.g. `Vary: User-Agent`). The caller then pushes `new`.
pub(crate) fn merge_variant(variants: &mut Vec<Arc<Entry>>, max_variants: usize, new: &Entry) {
    let fields = |e: &Entry| e.vary.iter().map(|(n, _)| n.clone()).collect::<Vec<_>>();
    let new_fields = fields(new);
    variants.retain(|v| !v.same_variant(new) && fields(v) == new_fields);
    let keep = max_variants.saturating_sub(1);
    if variants.len() > keep {
        variants.drain(..variants.len() - keep);
    }
}

/// Why a store call failed. The request path treats every kind alike (a miss, a write
/// skipped), but each says what went wrong, for callers that match on it and for logs.
/// `server` names the Redis server (`redis master 127.0.0.1:6379`: role and address,
/// never the URL, which may carry a password). The messages read as they always have
/// (`store unavailable: ...`): `/health` shows them and operators grep for them.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    /// A call did not finish within its connect, read or write timeout.
    Timeout { server: String, detail: String },
    /// The server could not be used: connection refused, dropped or broken, or no pooled
    /// connection within the checkout timeout.
    Unavailable { server: String, detail: String },
    /// The server was skipped: its circuit breaker is open after failures in a row.
    CircuitOpen { server: String },
    /// A reply Echo could not read (of another type than asked, unparsable), or a value
    /// it could not write.
    Decode { server: String, detail: String },
    /// The server answered as no master does: READONLY (a master demoted to replica)
    /// or MASTERDOWN (a replica that lost its master and serves no stale data): where the
    /// master is must be looked up again.
    NotMaster { server: String, detail: String },
    /// Redis refused a write because it is full (`maxmemory` under `noeviction`):
    /// deletes still work, and free memory.
    OutOfMemory { server: String, detail: String },
    /// Redis refused the command with another error reply (NOSCRIPT, ...): `detail` is
    /// its text.
    Redis { server: String, detail: String },
    /// A read failed on every server it may use: the master's error (tried last), and
    /// the last replica's.
    AllFailed {
        master: Box<StoreError>,
        replica: Box<StoreError>,
    },
    /// The store could not be set up (a URL that does not parse, a thread that would not
    /// start).
    Setup(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Timeout { server, detail }
            | StoreError::Unavailable { server, detail }
            | StoreError::Decode { server, detail }
            | StoreError::NotMaster { server, detail }
            | StoreError::OutOfMemory { server, detail }
            | StoreError::Redis { server, detail } => {
                write!(f, "store unavailable: {server}: {detail}")
            }
            StoreError::CircuitOpen { server } => {
                write!(f, "store unavailable: {server} skipped (circuit open)")
            }
            StoreError::AllFailed { master, replica } => {
                write!(f, "store unavailable: {master}; and {replica}")
            }
            StoreError::Setup(why) => write!(f, "store unavailable: {why}"),
        }
    }
}

impl std::error::Error for StoreError {}

/// One server of a networked store (a Redis master or replica) as its monitor last
/// found it.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct ServerHealth {
    /// `host:port` (never a URL: it may carry a password).
    pub server: String,
    /// What Echo uses it as: `master` or `replica`.
    pub role: &'static str,
    /// False until the monitor's first look at it: nothing else is known yet.
    pub checked: bool,
    pub reachable: bool,
    /// What the server says it is (`master`, `replica`), when it answered.
    pub reported_role: Option<String>,
    /// A replica's link to its master: `up` or `down`.
    pub link: Option<String>,
    /// How far a replica is behind the master, when both answered.
    pub lag: Option<Duration>,
    /// A replica Echo reads from now.
    pub readable: Option<bool>,
    pub maxmemory_policy: Option<String>,
    pub used_memory: Option<u64>,
    /// Keys the server evicted for `maxmemory` since it started (INFO `evicted_keys`).
    pub evicted_keys: Option<u64>,
    /// 0: no limit.
    pub maxmemory: Option<u64>,
    /// Why it is degraded: a fixed reason (a metric label: `unreachable`,
    /// `breaker_open`, `readonly`, `not_replica`, `link_down`, `not_replicating`,
    /// `lagging`, `out_of_memory`, `evicting_control_state`) and what was seen.
    pub degraded: Vec<(&'static str, String)>,
}

/// The Redis store's local tier as it stands.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct LocalTierReport {
    /// `on`, `syncing` (waiting for its tracking connection to the master), or
    /// `refused` (Redis refused client tracking: no tier).
    pub state: &'static str,
    /// Why, when refused.
    pub reason: Option<String>,
    pub bytes: usize,
    pub entries: usize,
    pub hits: u64,
    pub misses: u64,
    /// Keys named by Redis's invalidation messages.
    pub invalidations: u64,
    pub flushes: u64,
}

/// What a try for a key's cluster-wide fill lock found.
#[derive(Debug)]
pub enum FillLockAttempt {
    /// Taken: this fetch fills the key; with what the store holds for it now, read where
    /// writes land (None when that could not be read).
    Taken(Option<Lookup>),
    /// Another fetch holds it; its lease ends within `expires_in` unless renewed.
    Held { expires_in: Duration },
    /// The key is remembered as uncacheable: fetch without the lock, beside the others.
    Pass,
}

/// What a lookup found, and the invalidation generation it saw (a fill started from
/// this lookup passes it back to `put`).
#[derive(Debug, Clone, Default)]
pub struct Lookup {
    pub variants: Vec<Arc<Entry>>,
    pub generation: u64,
    /// Found in the Redis store's local tier (no round trip).
    pub local: bool,
}

pub trait Store: Send + Sync {
    /// Short name for logs and metrics ("memory", "redis").
    fn name(&self) -> &'static str;
    /// What is degraded, for `/health`: each part that cannot be reached, with why.
    /// Empty: healthy. Default: an in-process store is always healthy.
    fn health(&self) -> Vec<String> {
        Vec::new()
    }
    /// Accounted bytes and entries, for stores that hold them in-process.
    fn usage(&self) -> Option<(usize, usize)> {
        None
    }
    /// Entries dropped to stay within an in-process bound, since the start (None: the
    /// store holds none in-process).
    fn evictions(&self) -> Option<u64> {
        None
    }
    /// Each server of a networked store as its monitor last found it (`/health`,
    /// metrics). Default: none.
    fn servers(&self) -> Vec<ServerHealth> {
        Vec::new()
    }
    /// The Redis store's local tier, when it has one (`/health`, metrics).
    fn local_tier(&self) -> Option<LocalTierReport> {
        None
    }
    /// Every stored variant of `key` (empty when none), and the current generation.
    fn get(&self, key: &CacheKey) -> Result<Lookup, StoreError>;
    /// `get`, when it can be answered without waiting on anything (an in-process store;
    /// the Redis store's local tier); None: only `get` can tell. For I/O threads.
    fn peek(&self, _key: &CacheKey) -> Option<Lookup> {
        None
    }
    /// Does every call return without waiting on another service (the memory store)?
    /// Then an I/O thread may also take a miss's fill lock.
    fn in_process(&self) -> bool {
        false
    }
    /// Stores `entry` as a variant of `key`, replacing the variant it matches, and every
    /// variant stored under a different set of Vary fields (the origin changed its Vary).
    /// `since` is the generation the fill started at: if an invalidation since then
    /// names the entry, it is not stored (false), so nothing is resurrected.
    fn put(&self, key: &CacheKey, entry: Arc<Entry>, since: u64) -> Result<bool, StoreError>;
    /// Like `get`, but from where writes land (the Redis master): for a request that
    /// waited for another's fill and must see it, replica lag or not.
    fn get_latest(&self, key: &CacheKey) -> Result<Lookup, StoreError> {
        self.get(key)
    }
    /// Removes every variant of `key`; returns how many were removed.
    fn remove(&self, key: &CacheKey) -> Result<usize, StoreError>;
    /// Runs one invalidation job: bans what it names (unless a dry run), then finds the
    /// matching entries and deletes them, marks them stale, or lists them for refresh.
    /// Checks `progress` as it goes (a `Checkpoint`, every few hundred keys) and stops at
    /// the first check that fails, with `JobOutcome::stopped` saying why and the counts of
    /// what it did. Never runs a pattern while holding a lock that lookups need.
    fn invalidate(&self, job: &Job, progress: &Progress) -> Result<JobOutcome, StoreError>;

    /// Tries to take the cluster-wide fill lock of `key` for `ttl` as `owner` (a unique id
    /// per fetch). True: this node fetches. Default (single-node stores): always true.
    fn lock_fill(&self, _key: &CacheKey, _owner: &str, _ttl: Duration) -> Result<bool, StoreError> {
        Ok(true)
    }

    /// Tries to take the cluster-wide fill lock of `key` as `owner` for a lease of
    /// `lease`, which the store renews until `unlock_fill` (so a holder that dies is
    /// noticed within a lease). When taken, the look for a fill that finished between a
    /// request's lookup and its lock comes with it; when another fetch holds it, when its
    /// lease ends; and a key remembered as uncacheable (`mark_uncacheable`) is a pass.
    /// Stores where these are round trips send them together. Default (single-node
    /// stores): taken, with `get_latest`.
    fn lock_fill_and_look(
        &self,
        key: &CacheKey,
        owner: &str,
        lease: Duration,
    ) -> Result<FillLockAttempt, StoreError> {
        if !self.lock_fill(key, owner, lease)? {
            return Ok(FillLockAttempt::Held { expires_in: lease });
        }
        Ok(FillLockAttempt::Taken(self.get_latest(key).ok()))
    }
    /// Remembers for `ttl` that `key`'s answers may not be shared (hit-for-pass), for
    /// every node: their lock attempts answer `Pass`. Storing an entry for the key
    /// forgets it. Default (single-node stores): nothing (the cache remembers it).
    fn mark_uncacheable(&self, _key: &CacheKey, _ttl: Duration) -> Result<(), StoreError> {
        Ok(())
    }
    /// `put`, then `unlock_fill` for `owner`: one round trip where the store can (the
    /// Redis store script releases the lock and wakes the waiting nodes in the same
    /// step as the store). The lock is released whether or not the entry was stored.
    fn put_and_unlock(
        &self,
        key: &CacheKey,
        entry: Arc<Entry>,
        since: u64,
        owner: &str,
    ) -> Result<bool, StoreError> {
        let stored = self.put(key, entry, since);
        let unlocked = self.unlock_fill(key, owner);
        let stored = stored?;
        unlocked.map(|()| stored)
    }
    /// Releases the fill lock if `owner` still holds it, and wakes the nodes waiting for
    /// it. The lock holder calls this on every path, whether or not the fill stored
    /// anything.
    fn unlock_fill(&self, _key: &CacheKey, _owner: &str) -> Result<(), StoreError> {
        Ok(())
    }

    /// Registers interest in the release of `key`'s fill lock. Call it BEFORE re-checking
    /// the store and the lock, so no release between the re-check and the wait is missed.
    /// Default: a waiter that returns false at once.
    fn fill_waiter(&self, _key: &CacheKey) -> FillWaiter {
        FillWaiter::none()
    }
    /// Some background upkeep, a bounded amount per call, run by the invalidation thread
    /// between jobs. Default: none.
    fn tidy(&self) {}
}

/// Interest in the release of one key's fill lock, registered by [`Store::fill_waiter`];
/// dropping it (or waiting on it, which consumes it) unregisters it.
pub struct FillWaiter {
    woken: Option<Receiver<()>>,
    /// Unregisters the waiter when dropped (the store's own bookkeeping).
    _registration: Option<Box<dyn Send>>,
}

impl FillWaiter {
    /// A waiter nothing will wake: `wait` returns false at once.
    pub(crate) fn none() -> FillWaiter {
        FillWaiter {
            woken: None,
            _registration: None,
        }
    }

    /// A waiter woken by a message on `woken`; `registration` is dropped with it.
    pub(crate) fn new(woken: Receiver<()>, registration: impl Send + 'static) -> FillWaiter {
        FillWaiter {
            woken: Some(woken),
            _registration: Some(Box::new(registration)),
        }
    }

    /// Waits at most `timeout` for the lock to be released. True: it was released since
    /// registration, or the store may have missed a release (e.g. it reconnected) and
    /// asks the caller to re-check; false: timed out, or nothing can wake this waiter.
    pub fn wait(self, timeout: Duration) -> bool {
        match &self.woken {
            Some(woken) => woken.recv_timeout(timeout).is_ok(),
            None => false,
        }
    }
}

impl fmt::Debug for FillWaiter {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("FillWaiter")
            .field("registered", &self.woken.is_some())
            .finish()
    }
}

/// The entries of `variants` marked stale: same response, no freshness left, so the next
/// use revalidates with the origin.
pub(crate) fn mark_stale(variants: &[Arc<Entry>]) -> Vec<Arc<Entry>> {
    variants
        .iter()
        .map(|e| {
            Arc::new(Entry {
                freshness: Duration::ZERO,
                ..Entry::clone(e)
            })
        })
        .collect()
}

/// A store that times every operation and counts its errors
/// (`echo_store_operation_duration_seconds`, `echo_store_errors_total`).
pub(crate) struct Instrumented {
    inner: Arc<dyn Store>,
    metrics: Arc<crate::metrics::Metrics>,
}

impl Instrumented {
    pub(crate) fn new(
        inner: Arc<dyn Store>,
        metrics: Arc<crate::metrics::Metrics>,
    ) -> Instrumented {
        // Every series exists from the start (at 0), so alerts on rates see it.
        for op in [
            "get",
            "put",
            "get_latest",
            "remove",
            "invalidate",
            "lock_fill",
            "unlock_fill",
            "mark_uncacheable",
        ] {
            let labels = crate::metrics::StoreLabels {
                store: inner.name(),
                op,
            };
            let _ = metrics.store_errors.get_or_create(&labels);
        }
        Instrumented { inner, metrics }
    }

    fn timed<T>(
        &self,
        op: &'static str,
        run: impl FnOnce() -> Result<T, StoreError>,
    ) -> Result<T, StoreError> {
        let started = std::time::Instant::now();
        let result = run();
        self.metrics
            .store_op(self.inner.name(), op, started.elapsed(), result.is_err());
        result
    }
}

impl Store for Instrumented {
    fn name(&self) -> &'static str {
        self.inner.name()
    }
    fn health(&self) -> Vec<String> {
        self.inner.health()
    }
    fn usage(&self) -> Option<(usize, usize)> {
        self.inner.usage()
    }
    fn evictions(&self) -> Option<u64> {
        self.inner.evictions()
    }
    fn servers(&self) -> Vec<ServerHealth> {
        self.inner.servers()
    }
    fn local_tier(&self) -> Option<LocalTierReport> {
        self.inner.local_tier()
    }
    fn get(&self, key: &CacheKey) -> Result<Lookup, StoreError> {
        self.timed("get", || self.inner.get(key))
    }
    fn in_process(&self) -> bool {
        self.inner.in_process()
    }
    /// Counted as a `get` when it answers (a `get` follows when it does not).
    fn peek(&self, key: &CacheKey) -> Option<Lookup> {
        let started = std::time::Instant::now();
        let found = self.inner.peek(key)?;
        self.metrics
            .store_op(self.inner.name(), "get", started.elapsed(), false);
        Some(found)
    }
    fn put(&self, key: &CacheKey, entry: Arc<Entry>, since: u64) -> Result<bool, StoreError> {
        self.timed("put", || self.inner.put(key, entry, since))
    }
    fn get_latest(&self, key: &CacheKey) -> Result<Lookup, StoreError> {
        self.timed("get_latest", || self.inner.get_latest(key))
    }
    fn remove(&self, key: &CacheKey) -> Result<usize, StoreError> {
        self.timed("remove", || self.inner.remove(key))
    }
    fn invalidate(&self, job: &Job, progress: &Progress) -> Result<JobOutcome, StoreError> {
        self.timed("invalidate", || self.inner.invalidate(job, progress))
    }
    fn lock_fill(&self, key: &CacheKey, owner: &str, ttl: Duration) -> Result<bool, StoreError> {
        self.timed("lock_fill", || self.inner.lock_fill(key, owner, ttl))
    }
    fn lock_fill_and_look(
        &self,
        key: &CacheKey,
        owner: &str,
        lease: Duration,
    ) -> Result<FillLockAttempt, StoreError> {
        self.timed("lock_fill", || {
            self.inner.lock_fill_and_look(key, owner, lease)
        })
    }
    fn mark_uncacheable(&self, key: &CacheKey, ttl: Duration) -> Result<(), StoreError> {
        self.timed("mark_uncacheable", || self.inner.mark_uncacheable(key, ttl))
    }
    fn put_and_unlock(
        &self,
        key: &CacheKey,
        entry: Arc<Entry>,
        since: u64,
        owner: &str,
    ) -> Result<bool, StoreError> {
        self.timed("put", || {
            self.inner.put_and_unlock(key, entry, since, owner)
        })
    }
    fn unlock_fill(&self, key: &CacheKey, owner: &str) -> Result<(), StoreError> {
        self.timed("unlock_fill", || self.inner.unlock_fill(key, owner))
    }
    fn fill_waiter(&self, key: &CacheKey) -> FillWaiter {
        self.inner.fill_waiter(key)
    }
    fn tidy(&self) {
        self.inner.tidy()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn store_errors_read_as_they_did_before_they_had_kinds() {
        let replica = || "redis replica 10.0.0.2:6380".to_string();
        let timeout = StoreError::Timeout {
            server: replica(),
            detail: "timed out".into(),
        };
        assert_eq!(
            timeout.to_string(),
            "store unavailable: redis replica 10.0.0.2:6380: timed out"
        );
        let open = StoreError::CircuitOpen { server: replica() };
        assert_eq!(
            open.to_string(),
            "store unavailable: redis replica 10.0.0.2:6380 skipped (circuit open)"
        );
        let everywhere = StoreError::AllFailed {
            master: Box::new(StoreError::Unavailable {
                server: "redis master 10.0.0.1:6379".into(),
                detail: "no connection: refused".into(),
            }),
            replica: Box::new(open),
        };
        assert_eq!(
            everywhere.to_string(),
            "store unavailable: store unavailable: redis master 10.0.0.1:6379: no connection: \
             refused; and store unavailable: redis replica 10.0.0.2:6380 skipped (circuit open)"
        );
        let setup = StoreError::Setup("bad redis URL for master: invalid".into());
        assert_eq!(
            setup.to_string(),
            "store unavailable: bad redis URL for master: invalid"
        );
    }
}
