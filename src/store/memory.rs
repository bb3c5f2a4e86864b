//! The embedded store: an in-process map bounded by bytes (`cache.memory_max_bytes`),
//! least recently used key evicted first, with at most `cache.max_variants` Vary
//! variants per key.
//!
//! Invalidation scans every key under the lock (in-process, a regex per key), and bans
//! what it names so an older fill cannot store it again (see `invalidate::Bans`).
//!
//! Invariants: the accounted size never exceeds the bound after a `put` returns; a lock
//! poisoned by a panic elsewhere is recovered (the map holds no partial updates: each
//! operation leaves it consistent before anything can panic).

use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use lru::LruCache;

use super::{Entry, Lookup, Store, StoreError};
use crate::invalidate::{BanCheck, Bans, Job, Mode, Outcome, Progress, SAMPLE};
use crate::key::CacheKey;

/// Rounds of ban checks a `put` makes before giving up on storing (see `put`).
const CHECK_ROUNDS: usize = 3;

struct Inner {
    lru: LruCache<String, Vec<Arc<Entry>>>,
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
        inner.lru.put(k.to_string(), variants);
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
        let mut inner = self.lock();
        if !job.dry_run {
            inner.bans.add(&job.matcher);
        }
        let matching: Vec<String> = inner
            .lru
            .iter()
            .filter(|(k, variants)| {
                progress.scanned.fetch_add(1, Ordering::Relaxed);
                job.matcher.matches_key(k)
                    && variants.iter().any(|e| job.matcher.matches_tags(&e.tags))
            })
            .map(|(k, _)| k.clone())
            .collect();
        let mut outcome = Outcome {
            matched: matching.len() as u64,
            sample: matching.iter().take(SAMPLE).cloned().collect(),
            ..Outcome::default()
        };
        progress.matched.store(outcome.matched, Ordering::Relaxed);
        if job.dry_run {
            return Ok(outcome);
        }
        match job.mode {
            Mode::Delete => {
                for k in &matching {
                    if let Some(old) = inner.lru.pop(k) {
                        inner.bytes -= variants_size(k, &old);
                        outcome.changed += 1;
                    }
                }
            }
            Mode::Stale => {
                for k in &matching {
                    if let Some(variants) = inner.lru.peek_mut(k) {
                        *variants = super::mark_stale(variants);
                        outcome.changed += 1;
                    }
                }
            }
            Mode::Refresh => outcome.to_refresh = matching,
        }
        progress.changed.store(outcome.changed, Ordering::Relaxed);
        Ok(outcome)
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
}
