//! The embedded store: an in-process map bounded by bytes (`cache.memory_max_bytes`),
//! least recently used key evicted first, with at most `cache.max_variants` Vary
//! variants per key.
//!
//! Invalidation bans what it names (so an older fill cannot store it again, see
//! `invalidation::Bans`), then walks an ordered index of the keys a chunk at a time: it
//! takes the lock to copy the next chunk of keys (reference-count bumps: keys are
//! `Arc<str>`), matches them with no lock held, and applies its mode to the matches in
//! small batches, each under the lock briefly (tags are checked there: they live on the
//! entries). Each chunk resumes after the last key seen, so every key present from the
//! ban to the walk's end is visited; one stored after the ban is covered by it. A job
//! that names a host walks only that host's keys (and its pattern's literal prefix); a
//! pattern with a literal prefix and no host walks that prefix on each site
//! (`scheme://host`), the sites found one seek at a time: its cost is what it matches
//! plus one seek per site, not the size of the store.
//!
//! Invariants: the accounted size never exceeds the bound after a `put` returns; the
//! index holds exactly the map's keys; no regex runs and no ban is compiled under the
//! lock, which an invalidation holds for one chunk or one batch at a time (hits never
//! wait on a pattern, nor on the size of the store), and lets the lookups and fills
//! waiting for it go first before each (they are counted while they wait); a lock
//! poisoned by a panic elsewhere is recovered (the map holds no partial updates: each
//! operation leaves it consistent before anything can panic).

use std::collections::BTreeSet;
use std::ops::Bound;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, TryLockError};
use std::time::{Duration, Instant};

use lru::LruCache;

use super::{Entry, Lookup, Store, StoreError};
use crate::invalidation::{
    BanCheck, Bans, Checkpoint, Job, JobOutcome, Matcher, Mode, Progress, SAMPLE,
};
use crate::key::CacheKey;

/// Rounds of ban checks a `put` makes before giving up on storing (see `put`).
const CHECK_ROUNDS: usize = 3;
/// Matching keys handled per taking of the lock by an invalidation: small, so a hit
/// waits at most for this many deletes (or stale copies) to be made.
const BATCH: usize = 128;
/// Keys an invalidation copies out of the index per taking of the lock (tens of µs).
const CHUNK: usize = 1024;
/// How long an invalidation lets waiting lookups and fills go first, per chunk or batch.
const YIELD_AT_MOST: Duration = Duration::from_millis(1);

struct Inner {
    lru: LruCache<Arc<str>, Vec<Arc<Entry>>>,
    /// The keys of `lru`, in order (shared with it: an invalidation's copy of a chunk
    /// costs no string copies).
    keys: BTreeSet<Arc<str>>,
    bytes: usize,
    bans: Bans,
    /// Keys dropped to stay within the byte bound, since the start.
    evictions: u64,
}

impl Inner {
    /// Removes `key` and everything it holds.
    fn take(&mut self, key: &str) -> Option<Vec<Arc<Entry>>> {
        let old = self.lru.pop(key)?;
        self.keys.remove(key);
        self.bytes -= variants_size(key, &old);
        Some(old)
    }

    /// Evicts the least recently used key; false when there is none.
    fn evict_lru(&mut self) -> bool {
        match self.lru.pop_lru() {
            Some((key, old)) => {
                self.keys.remove(&*key);
                self.bytes -= variants_size(&key, &old);
                self.evictions += 1;
                true
            }
            None => false,
        }
    }

    /// The site (`scheme://host`) of the first key at or after `from`, and where the
    /// next site's keys begin: every key of a site starts with `scheme://host/`, and
    /// `scheme://host0` (`0` follows `/`) sorts after all of them and before any other
    /// site's. One seek in the ordered index.
    fn next_site(&self, from: &str) -> Option<(String, String)> {
        let mut from = from.to_string();
        loop {
            let key = self
                .keys
                .range::<str, _>((Bound::Included(from.as_str()), Bound::Unbounded))
                .next()?;
            let site_end = key
                .find("://")
                .and_then(|i| key[i + 3..].find('/').map(|j| i + 3 + j));
            match site_end {
                Some(end) => {
                    let site = key[..end].to_string();
                    let next = format!("{site}0");
                    return Some((site, next));
                }
                // Not a key of a site (no path): skip it.
                None => from = format!("{key}\u{0}"),
            }
        }
    }

    /// The next `CHUNK` keys that start with `prefix`, after `after` (from the start of
    /// the range when None).
    fn chunk(&self, prefix: &str, after: Option<&str>) -> Vec<Arc<str>> {
        let start = match after {
            Some(key) => Bound::Excluded(key),
            None => Bound::Included(prefix),
        };
        self.keys
            .range::<str, _>((start, Bound::Unbounded))
            .take_while(|k| k.starts_with(prefix))
            .take(CHUNK)
            .cloned()
            .collect()
    }
}

/// The ranges of keys (by prefix) a job can match: those of its host, and of its
/// pattern's literal prefix, when it names a host; with a literal prefix and no host,
/// that prefix on every site (None: found site by site, see `Inner::next_site`); else
/// every key. Sound because `Matcher::matches_key` takes only `http://` and `https://`
/// keys and compares their host exactly (a range may hold other hosts that share the
/// prefix: the matcher drops them).
fn key_ranges(matcher: &Matcher) -> Option<Vec<String>> {
    match (matcher.host(), matcher.prefix()) {
        (Some(host), target) => {
            let target = target.unwrap_or("");
            Some(vec![
                format!("http://{host}{target}"),
                format!("https://{host}{target}"),
            ])
        }
        (None, Some(prefix)) if !prefix.is_empty() => None,
        (None, _) => Some(vec![String::new()]),
    }
}

pub struct MemoryStore {
    inner: Mutex<Inner>,
    /// Lookups and fills waiting for the lock now: an invalidation lets them go first.
    waiting: AtomicUsize,
    max_bytes: usize,
    max_variants: usize,
}

fn variants_size(key: &str, variants: &[Arc<Entry>]) -> usize {
    key.len() + variants.iter().map(|e| e.size()).sum::<usize>()
}

impl MemoryStore {
    /// `ban_ttl`: how long an invalidation is remembered against older fills.
    pub fn new(max_bytes: usize, max_variants: usize, ban_ttl: Duration) -> MemoryStore {
        MemoryStore {
            inner: Mutex::new(Inner {
                lru: LruCache::unbounded(),
                keys: BTreeSet::new(),
                bytes: 0,
                bans: Bans::new(ban_ttl),
                evictions: 0,
            }),
            waiting: AtomicUsize::new(0),
            max_bytes,
            max_variants: max_variants.max(1),
        }
    }

    /// The lock, for a lookup or a fill: counted while it waits, so an invalidation
    /// between two of its chunks lets it in first.
    fn lock_first(&self) -> MutexGuard<'_, Inner> {
        // Uncontended (nearly always): no count kept.
        match self.inner.try_lock() {
            Ok(inner) => return inner,
            Err(TryLockError::Poisoned(p)) => return p.into_inner(),
            Err(TryLockError::WouldBlock) => {}
        }
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let inner = self.lock();
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        inner
    }

    /// The lock, for an invalidation's next chunk or batch: after the lookups and fills
    /// waiting for it (std's mutex would let the job, which just released it, take it
    /// again before them), for at most `YIELD_AT_MOST`.
    fn lock_after_others(&self) -> MutexGuard<'_, Inner> {
        let started = Instant::now();
        while self.waiting.load(Ordering::Relaxed) > 0 && started.elapsed() < YIELD_AT_MOST {
            std::thread::yield_now();
        }
        self.lock()
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Accounted bytes and number of keys, for tests and metrics.
    pub fn usage(&self) -> (usize, usize) {
        let inner = self.lock();
        (inner.bytes, inner.lru.len())
    }
}

impl Store for MemoryStore {
    fn name(&self) -> &'static str {
        "memory"
    }

    fn usage(&self) -> Option<(usize, usize)> {
        Some(MemoryStore::usage(self))
    }

    fn evictions(&self) -> Option<u64> {
        Some(self.lock().evictions)
    }

    fn get(&self, key: &CacheKey) -> Result<Lookup, StoreError> {
        let mut inner = self.lock_first();
        Ok(Lookup {
            variants: inner.lru.get(key.as_str()).cloned().unwrap_or_default(),
            generation: inner.bans.generation(),
            local: false,
        })
    }

    fn peek(&self, key: &CacheKey) -> Option<Lookup> {
        self.get(key).ok()
    }

    fn in_process(&self) -> bool {
        true
    }

    fn put(&self, key: &CacheKey, entry: Arc<Entry>, since: u64) -> Result<bool, StoreError> {
        let k = key.as_str();
        if entry.size() + k.len() > self.max_bytes {
            return Ok(false);
        }
        // Before the lock: a large body goes into a memfd, for sendfile on hits.
        let entry = Entry::with_body_in_file(entry);
        let mut since = since;
        let mut rounds = 0;
        let mut inner = loop {
            let mut inner = self.lock_first();
            match inner.bans.since(since) {
                BanCheck::Clear => break inner,
                BanCheck::Forgotten => return Ok(false),
                BanCheck::Check { bans, up_to } => {
                    // Checking may compile regexes: never under the lock, where hits wait.
                    drop(inner);
                    if bans.iter().any(|b| b.names(k, &entry.tags)) {
                        return Ok(false);
                    }
                    // Invalidations may have come meanwhile: those are checked next round,
                    // a few rounds at most (under an invalidation storm, not storing is safe).
                    rounds += 1;
                    if rounds >= CHECK_ROUNDS {
                        return Ok(false);
                    }
                    since = up_to;
                }
            }
        };
        // A key already stored keeps its place in the index (and its shared string).
        let (shared, mut variants) = match inner.lru.pop_entry(k) {
            Some((shared, old)) => {
                inner.bytes -= variants_size(k, &old);
                (shared, old)
            }
            None => {
                let shared: Arc<str> = Arc::from(k);
                inner.keys.insert(Arc::clone(&shared));
                (shared, Vec::new())
            }
        };
        super::merge_variant(&mut variants, self.max_variants, &entry);
        variants.push(entry);
        inner.bytes += variants_size(k, &variants);
        inner.lru.put(shared, variants);
        while inner.bytes > self.max_bytes && inner.evict_lru() {}
        Ok(true)
    }

    /// An invalidation of one key: banned (a fill of it in flight is not stored after)
    /// and removed under one lock.
    fn remove(&self, key: &CacheKey) -> Result<usize, StoreError> {
        let mut inner = self.lock();
        inner.bans.add(&Matcher::for_key(key));
        Ok(inner.take(key.as_str()).map_or(0, |old| old.len()))
    }

    fn invalidate(&self, job: &Job, progress: &Progress) -> Result<JobOutcome, StoreError> {
        // The ban first: every entry is either present when the walk passes its key, or
        // stored after the ban (and checked against it).
        if !job.dry_run {
            self.lock().bans.add(&job.matcher);
        }
        let mut outcome = JobOutcome::default();
        let mut batch: Vec<Arc<str>> = Vec::with_capacity(BATCH);
        let mut checkpoint = Checkpoint::new(progress);
        // A purge by URL names its keys: no walk.
        if let Some(urls) = job.matcher.urls() {
            let keys: Vec<Arc<str>> = urls.iter().map(|u| Arc::from(u.as_str())).collect();
            progress
                .scanned
                .fetch_add(keys.len() as u64, Ordering::Relaxed);
            for batch in keys.chunks(BATCH) {
                if let Err(stop) = progress.check() {
                    outcome.stopped = Some(stop);
                    return Ok(outcome);
                }
                self.apply(job, batch, &mut outcome, progress);
            }
            return Ok(outcome);
        }
        // The ranges to walk: known up front, or (a literal prefix on every site) one
        // site at a time, each found by one seek under the lock.
        let mut fixed = key_ranges(&job.matcher).map(Vec::into_iter);
        let mut next_site = Some(String::new());
        loop {
            let prefix = match &mut fixed {
                Some(ranges) => match ranges.next() {
                    Some(p) => p,
                    None => break,
                },
                None => {
                    let Some(from) = next_site.take() else { break };
                    let Some((site, next)) = self.lock().next_site(&from) else {
                        break;
                    };
                    next_site = Some(next);
                    format!("{site}{}", job.matcher.prefix().unwrap_or(""))
                }
            };
            let mut after: Option<Arc<str>> = None;
            loop {
                let chunk = self.lock_after_others().chunk(&prefix, after.as_deref());
                let Some(last) = chunk.last() else {
                    break;
                };
                after = Some(Arc::clone(last));
                for key in chunk {
                    // A cancel or the end of the budget stops the job here, with what it
                    // did so far applied and reported (matches not yet applied are left).
                    if let Err(stop) = checkpoint.key(key.len()) {
                        outcome.stopped = Some(stop);
                        return Ok(outcome);
                    }
                    progress.scanned.fetch_add(1, Ordering::Relaxed);
                    // No lock held: the regex may take its time.
                    if !job.matcher.matches_key(&key) {
                        continue;
                    }
                    batch.push(key);
                    if batch.len() >= BATCH {
                        self.apply(job, &batch, &mut outcome, progress);
                        batch.clear();
                    }
                }
            }
        }
        self.apply(job, &batch, &mut outcome, progress);
        Ok(outcome)
    }
}

impl MemoryStore {
    /// Applies a job to keys whose pattern and host matched, under the lock: those still
    /// stored whose tags match too are counted, sampled, and deleted, marked stale or
    /// listed for refresh. A key gone meanwhile (evicted, deleted) is skipped.
    fn apply(&self, job: &Job, keys: &[Arc<str>], outcome: &mut JobOutcome, progress: &Progress) {
        if keys.is_empty() {
            return;
        }
        // What is deleted or replaced is freed after the lock is released (bodies, memfds).
        let mut released: Vec<Vec<Arc<Entry>>> = Vec::new();
        let mut inner = self.lock_after_others();
        for key in keys {
            let Some(variants) = inner.lru.peek_mut(&**key) else {
                continue;
            };
            if !variants.iter().any(|e| job.matcher.matches_tags(&e.tags)) {
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
            match job.mode {
                Mode::Delete => released.extend(inner.take(key)),
                Mode::Stale => {
                    let stale = super::mark_stale(variants);
                    released.push(std::mem::replace(variants, stale));
                }
                Mode::Refresh => {
                    outcome.to_refresh.push(key.to_string());
                    continue;
                }
            }
            outcome.changed += 1;
            progress.changed.fetch_add(1, Ordering::Relaxed);
        }
        drop(inner);
        drop(released);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::SystemTime;

    fn entry(body: usize, vary: &[(&str, Option<&str>)]) -> Arc<Entry> {
        Arc::new(Entry {
            status: 200,
            headers: vec![("content-type".into(), b"text/plain".to_vec())],
            body: vec![b'x'; body],
            file: None,
            response_time: SystemTime::now(),
            initial_age: Duration::ZERO,
            freshness: Duration::from_secs(60),
            vary: vary
                .iter()
                .map(|(n, v)| (n.to_string(), v.map(str::to_string)))
                .collect(),
            tags: Vec::new(),
        })
    }

    fn key(t: &str) -> CacheKey {
        CacheKey::new("http", "a", t)
    }

    #[test]
    fn the_byte_bound_evicts_least_recently_used_keys() {
        let one = entry(1000, &[]).size() + key("/1").as_str().len();
        let store = MemoryStore::new(one * 3, 4, Duration::from_secs(60));
        for t in ["/1", "/2", "/3"] {
            store.put(&key(t), entry(1000, &[]), 0).unwrap();
        }
        // Touch /1 so /2 is the least recently used.
        assert_eq!(store.get(&key("/1")).unwrap().variants.len(), 1);
        store.put(&key("/4"), entry(1000, &[]), 0).unwrap();
        assert!(store.get(&key("/2")).unwrap().variants.is_empty());
        assert_eq!(store.get(&key("/1")).unwrap().variants.len(), 1);
        let (bytes, keys) = store.usage();
        assert!(bytes <= one * 3, "{bytes} > {}", one * 3);
        assert_eq!(keys, 3);
    }

    #[test]
    fn an_object_larger_than_the_store_is_not_stored() {
        let store = MemoryStore::new(1 << 16, 4, Duration::from_secs(60));
        store.put(&key("/big"), entry(1 << 17, &[]), 0).unwrap();
        assert_eq!(store.usage(), (0, 0));
    }

    #[test]
    fn variants_replace_their_match_and_are_capped() {
        let store = MemoryStore::new(1 << 20, 2, Duration::from_secs(60));
        let k = key("/v");
        store
            .put(&k, entry(10, &[("accept-encoding", Some("gzip"))]), 0)
            .unwrap();
        store
            .put(&k, entry(20, &[("accept-encoding", Some("br"))]), 0)
            .unwrap();
        store
            .put(&k, entry(30, &[("accept-encoding", Some("gzip"))]), 0)
            .unwrap();
        let v = store.get(&k).unwrap().variants;
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].body.len(), 30);
        store
            .put(&k, entry(40, &[("accept-encoding", None)]), 0)
            .unwrap();
        assert_eq!(
            store.get(&k).unwrap().variants.len(),
            2,
            "capped at max_variants"
        );
        // A different set of Vary fields replaces every old variant.
        store
            .put(&k, entry(50, &[("accept-language", Some("en"))]), 0)
            .unwrap();
        assert_eq!(store.get(&k).unwrap().variants.len(), 1);
        assert_eq!(store.remove(&k).unwrap(), 1);
        assert_eq!(store.usage(), (0, 0));
    }

    fn job(pattern: &str, mode: Mode, dry_run: bool) -> Job {
        Job {
            matcher: Arc::new(Matcher::new(Some(pattern), None, None).unwrap()),
            mode,
            dry_run,
        }
    }

    #[test]
    fn a_fill_that_straddles_an_invalidation_is_checked_against_it() {
        let store = MemoryStore::new(1 << 20, 4, Duration::from_secs(60));
        let since = store.get(&key("/x")).unwrap().generation;
        let outcome = store
            .invalidate(
                &job("^/orgs/42/", Mode::Delete, false),
                &Progress::default(),
            )
            .unwrap();
        assert_eq!(outcome.matched, 0);
        assert!(!store
            .put(&key("/orgs/42/a"), entry(10, &[]), since)
            .unwrap());
        assert!(store
            .put(&key("/orgs/43/a"), entry(10, &[]), since)
            .unwrap());
        let now = store.get(&key("/x")).unwrap().generation;
        assert!(store.put(&key("/orgs/42/a"), entry(10, &[]), now).unwrap());
    }

    #[test]
    fn invalidation_applies_its_mode_to_what_it_matches() {
        let store = MemoryStore::new(1 << 22, 4, Duration::from_secs(60));
        // More than one batch of matches.
        for i in 0..300 {
            store
                .put(&key(&format!("/a/{i}")), entry(10, &[]), 0)
                .unwrap();
            store
                .put(&key(&format!("/b/{i}")), entry(10, &[]), 0)
                .unwrap();
        }
        let progress = Progress::default();
        let dry = store
            .invalidate(&job("^/a/", Mode::Delete, true), &progress)
            .unwrap();
        assert_eq!(
            (dry.matched, dry.changed, dry.sample.len()),
            (300, 0, SAMPLE)
        );
        // Only the prefix's range is walked, not the other 300 keys.
        assert_eq!(progress.scanned.load(Ordering::Relaxed), 300);
        assert_eq!(store.usage().1, 600);
        let stale = store
            .invalidate(&job("^/b/1", Mode::Stale, false), &Progress::default())
            .unwrap();
        assert_eq!(stale.changed, 111);
        let marked = store.get(&key("/b/10")).unwrap().variants;
        assert_eq!(marked[0].freshness, Duration::ZERO);
        let deleted = store
            .invalidate(&job("^/a/", Mode::Delete, false), &Progress::default())
            .unwrap();
        assert_eq!((deleted.matched, deleted.changed), (300, 300));
        assert_eq!(store.usage().1, 300);
        let refresh = store
            .invalidate(&job("^/b/2", Mode::Refresh, false), &Progress::default())
            .unwrap();
        assert_eq!(refresh.to_refresh.len(), 111);
    }

    proptest::proptest! {
        /// A job with a literal prefix walks only that prefix on each site, and finds
        /// exactly what a walk over every key finds: sites whose names share a start
        /// (`a`, `a-b`, `a0`, `a:81`), targets that share a start, patterns anchored or
        /// not, with a host or without.
        #[test]
        fn ranged_walks_find_what_a_full_walk_finds(
            keys in proptest::collection::vec(
                (
                    proptest::sample::select(vec!["http", "https"]),
                    proptest::sample::select(vec!["a", "a-b", "a0", "a.b", "a:81", "b", "ab"]),
                    proptest::sample::select(vec!["/o/1", "/o/1/x", "/o/12", "/o/2", "/p", "/o/1?q=1", "/"]),
                    0u8..4,
                ),
                0..60,
            ),
            pattern in proptest::sample::select(vec![
                "^/o/1", "^/o/1/", "^/o/", "^/p", "/x", "^/o/1\\?q", "1", "^/$", "^/o/(1|2)",
            ]),
            host in proptest::option::of(proptest::sample::select(vec!["a", "a-b", "a0", "b"])),
        ) {
            let store = MemoryStore::new(1 << 24, 4, Duration::from_secs(60));
            let mut stored = std::collections::BTreeSet::new();
            for (scheme, site, target, n) in &keys {
                let k = CacheKey::new(scheme, site, &format!("{target}{}", "/z".repeat(*n as usize)));
                store.put(&k, entry(1, &[]), 0).unwrap();
                stored.insert(k.as_str().to_string());
            }
            let matcher = Matcher::new(Some(pattern), host, None).unwrap();
            let expected: std::collections::BTreeSet<String> =
                stored.iter().filter(|k| matcher.matches_key(k)).cloned().collect();
            let job = Job { matcher: Arc::new(matcher), mode: Mode::Delete, dry_run: false };
            let outcome = store.invalidate(&job, &Progress::default()).unwrap();
            proptest::prop_assert_eq!(outcome.matched as usize, expected.len());
            let left: std::collections::BTreeSet<String> =
                store.lock().keys.iter().map(|k| k.to_string()).collect();
            let want: std::collections::BTreeSet<String> =
                stored.difference(&expected).cloned().collect();
            proptest::prop_assert_eq!(left, want);
        }
    }

    /// The index holds exactly the map's keys.
    fn assert_index_agrees(store: &MemoryStore) {
        let inner = store.lock();
        let mut in_map: Vec<&str> = inner.lru.iter().map(|(k, _)| &**k).collect();
        in_map.sort_unstable();
        let indexed: Vec<&str> = inner.keys.iter().map(|k| &**k).collect();
        assert_eq!(in_map, indexed);
    }

    #[test]
    fn the_key_index_follows_puts_evictions_removes_and_deletes() {
        let one = entry(1000, &[]).size() + key("/0").as_str().len();
        let store = MemoryStore::new(one * 50, 4, Duration::from_secs(60));
        for i in 0..80 {
            store
                .put(&key(&format!("/{i}")), entry(1000, &[]), 0)
                .unwrap();
        }
        store.put(&key("/79"), entry(1000, &[]), 0).unwrap();
        let kept = store.usage().1;
        assert!(
            (40..=50).contains(&kept),
            "evicted down to the bound: {kept}"
        );
        assert_index_agrees(&store);
        store.remove(&key("/79")).unwrap();
        // The oldest were evicted: /40 to /49 are all still there.
        store
            .invalidate(&job("^/4", Mode::Delete, false), &Progress::default())
            .unwrap();
        assert_index_agrees(&store);
        assert_eq!(store.usage().1, kept - 1 - 10);
    }

    #[test]
    fn a_job_walks_every_chunk_and_only_its_host_when_it_names_one() {
        let store = MemoryStore::new(1 << 26, 4, Duration::from_secs(60));
        // More than two chunks on host a, a few keys on hosts sharing its prefix.
        let n = 2 * CHUNK + 10;
        for i in 0..n {
            store
                .put(&key(&format!("/k/{i}")), entry(1, &[]), 0)
                .unwrap();
        }
        for host in ["b", "ab", "a.b"] {
            let k = CacheKey::new("https", host, "/k/0");
            store.put(&k, entry(1, &[]), 0).unwrap();
        }
        let progress = Progress::default();
        let all = store
            .invalidate(&job("^/k/", Mode::Delete, true), &progress)
            .unwrap();
        assert_eq!(all.matched, n as u64 + 3);
        assert_eq!(progress.scanned.load(Ordering::Relaxed), n as u64 + 3);
        let on_a = Job {
            matcher: Arc::new(Matcher::new(Some("^/k/1"), Some("a"), None).unwrap()),
            mode: Mode::Delete,
            dry_run: false,
        };
        let progress = Progress::default();
        let deleted = store.invalidate(&on_a, &progress).unwrap();
        let ones = (0..n).filter(|i| i.to_string().starts_with('1')).count() as u64;
        assert_eq!(deleted.changed, ones);
        // Only the range http://a/k/1... (and https://a/k/1...) was walked.
        assert_eq!(progress.scanned.load(Ordering::Relaxed), ones);
        assert!(!store
            .get(&CacheKey::new("https", "ab", "/k/0"))
            .unwrap()
            .variants
            .is_empty());
        assert_index_agrees(&store);
    }

    #[test]
    fn keys_present_throughout_a_walk_are_all_visited_whatever_changes_meanwhile() {
        let store = Arc::new(MemoryStore::new(1 << 26, 4, Duration::from_secs(60)));
        let n = 4 * CHUNK;
        for i in 0..n {
            store
                .put(&key(&format!("/s/{i:05}")), entry(1, &[]), 0)
                .unwrap();
        }
        let churn = {
            let store = Arc::clone(&store);
            std::thread::spawn(move || {
                // Other keys come and go, before and after the walk's position.
                for round in 0..50 {
                    for i in 0..200 {
                        let k = key(&format!("/c/{round}/{i}"));
                        store.put(&k, entry(1, &[]), u64::MAX).unwrap();
                        store
                            .remove(&key(&format!("/c/{round}/{}", i / 2)))
                            .unwrap();
                    }
                }
            })
        };
        let outcome = store
            .invalidate(&job("^/s/", Mode::Delete, false), &Progress::default())
            .unwrap();
        churn.join().unwrap();
        assert_eq!(outcome.changed, n as u64);
        assert_index_agrees(&store);
    }
}
