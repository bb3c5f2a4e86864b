//! The embedded store: an in-process map bounded by bytes (`cache.memory_max_bytes`),
//! least recently used key evicted first, with at most `cache.max_variants` Vary
//! variants per key.
//!
//! Invalidation bans what it names (so an older fill cannot store it again, see
//! `invalidate::Bans`) and takes a snapshot of the keys under the lock (reference-count
//! bumps: keys are `Arc<str>`), then runs the regex over the snapshot with no lock held,
//! and applies its mode to the matching keys in small batches, each under the lock
//! briefly (tags are checked there: they live on the entries). An entry stored after
//! the snapshot is covered by the ban, recorded before it.
//!
//! Invariants: the accounted size never exceeds the bound after a `put` returns; no
//! regex runs and no ban is compiled under the lock (hits never wait on a pattern); a
//! lock poisoned by a panic elsewhere is recovered (the map holds no partial updates:
//! each operation leaves it consistent before anything can panic).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use lru::LruCache;

use super::{Entry, Lookup, Store, StoreError};
use crate::invalidate::{BanCheck, Bans, Checkpoint, Job, Mode, Outcome, Progress, SAMPLE};
use crate::key::CacheKey;

/// Rounds of ban checks a `put` makes before giving up on storing (see `put`).
const CHECK_ROUNDS: usize = 3;
/// Matching keys handled per taking of the lock by an invalidation: small, so a hit
/// waits at most for this many deletes (or stale copies) to be made.
const BATCH: usize = 128;

struct Inner {
    /// Keys are shared so an invalidation's snapshot of them costs no copies.
    lru: LruCache<Arc<str>, Vec<Arc<Entry>>>,
    bytes: usize,
    bans: Bans,
}

pub struct MemoryStore {
    inner: Mutex<Inner>,
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
                bytes: 0,
                bans: Bans::new(ban_ttl),
            }),
            max_bytes,
            max_variants: max_variants.max(1),
        }
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

    fn get(&self, key: &CacheKey) -> Result<Lookup, StoreError> {
        let mut inner = self.lock();
        Ok(Lookup {
            variants: inner.lru.get(key.as_str()).cloned().unwrap_or_default(),
            generation: inner.bans.generation(),
        })
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
            let mut inner = self.lock();
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
        let mut variants = match inner.lru.pop(k) {
            Some(old) => {
                inner.bytes -= variants_size(k, &old);
                old
            }
            None => Vec::new(),
        };
        super::merge_variant(&mut variants, self.max_variants, &entry);
        variants.push(entry);
        inner.bytes += variants_size(k, &variants);
        inner.lru.put(Arc::from(k), variants);
        while inner.bytes > self.max_bytes {
            match inner.lru.pop_lru() {
                Some((old_key, old)) => inner.bytes -= variants_size(&old_key, &old),
                None => break,
            }
        }
        Ok(true)
    }

    fn remove(&self, key: &CacheKey) -> Result<usize, StoreError> {
        let mut inner = self.lock();
        match inner.lru.pop(key.as_str()) {
            Some(old) => {
                inner.bytes -= variants_size(key.as_str(), &old);
                Ok(old.len())
            }
            None => Ok(0),
        }
    }

    fn invalidate(&self, job: &Job, progress: &Progress) -> Result<Outcome, StoreError> {
        // Under the lock: the ban first, then the snapshot, so every entry is either in
        // the snapshot or stored after the ban (and checked against it).
        let keys: Vec<Arc<str>> = {
            let mut inner = self.lock();
            if !job.dry_run {
                inner.bans.add(&job.matcher);
            }
            inner.lru.iter().map(|(k, _)| Arc::clone(k)).collect()
        };
        let mut outcome = Outcome::default();
        let mut batch: Vec<Arc<str>> = Vec::with_capacity(BATCH);
        let mut checkpoint = Checkpoint::new(progress);
        for key in keys {
            // A cancel or the end of the budget stops the job here, with what it did so
            // far applied and reported (the matches not yet applied are left alone).
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
        self.apply(job, &batch, &mut outcome, progress);
        Ok(outcome)
    }
}

impl MemoryStore {
    /// Applies a job to keys whose pattern and host matched, under the lock: those still
    /// stored whose tags match too are counted, sampled, and deleted, marked stale or
    /// listed for refresh. A key gone meanwhile (evicted, deleted) is skipped.
    fn apply(&self, job: &Job, keys: &[Arc<str>], outcome: &mut Outcome, progress: &Progress) {
        if keys.is_empty() {
            return;
        }
        let mut inner = self.lock();
        let inner = &mut *inner;
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
                Mode::Delete => {
                    if let Some(old) = inner.lru.pop(&**key) {
                        inner.bytes -= variants_size(key, &old);
                    }
                }
                Mode::Stale => *variants = super::mark_stale(variants),
                Mode::Refresh => {
                    outcome.to_refresh.push(key.to_string());
                    continue;
                }
            }
            outcome.changed += 1;
            progress.changed.fetch_add(1, Ordering::Relaxed);
        }
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
            matcher: Arc::new(crate::invalidate::Matcher::new(Some(pattern), None, None).unwrap()),
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
        assert_eq!(progress.scanned.load(Ordering::Relaxed), 600);
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
}
