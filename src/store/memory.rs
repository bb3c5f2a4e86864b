//! The embedded store: an in-process map bounded by bytes (`cache.memory_max_bytes`),
//! least recently used key evicted first, with at most `cache.max_variants` Vary
//! variants per key.
//!
//! Invariants: the accounted size never exceeds the bound after a `put` returns; a lock
//! poisoned by a panic elsewhere is recovered (the map holds no partial updates: each
//! operation leaves it consistent before anything can panic).

use std::sync::{Arc, Mutex, MutexGuard};

use lru::LruCache;

use super::{Entry, Store, StoreError};
use crate::key::CacheKey;

struct Inner {
    lru: LruCache<String, Vec<Arc<Entry>>>,
    bytes: usize,
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
    pub fn new(max_bytes: usize, max_variants: usize) -> MemoryStore {
        MemoryStore {
            inner: Mutex::new(Inner {
                lru: LruCache::unbounded(),
                bytes: 0,
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

    fn get(&self, key: &CacheKey) -> Result<Vec<Arc<Entry>>, StoreError> {
        Ok(self
            .lock()
            .lru
            .get(key.as_str())
            .cloned()
            .unwrap_or_default())
    }

    fn put(&self, key: &CacheKey, entry: Arc<Entry>) -> Result<(), StoreError> {
        let k = key.as_str();
        if entry.size() + k.len() > self.max_bytes {
            return Ok(());
        }
        let mut inner = self.lock();
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
        Ok(())
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
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, SystemTime};

    fn entry(body: usize, vary: &[(&str, Option<&str>)]) -> Arc<Entry> {
        Arc::new(Entry {
            status: 200,
            headers: vec![("content-type".into(), b"text/plain".to_vec())],
            body: vec![b'x'; body],
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
        let store = MemoryStore::new(one * 3, 4);
        for t in ["/1", "/2", "/3"] {
            store.put(&key(t), entry(1000, &[])).unwrap();
        }
        // Touch /1 so /2 is the least recently used.
        assert_eq!(store.get(&key("/1")).unwrap().len(), 1);
        store.put(&key("/4"), entry(1000, &[])).unwrap();
        assert!(store.get(&key("/2")).unwrap().is_empty());
        assert_eq!(store.get(&key("/1")).unwrap().len(), 1);
        let (bytes, keys) = store.usage();
        assert!(bytes <= one * 3, "{bytes} > {}", one * 3);
        assert_eq!(keys, 3);
    }

    #[test]
    fn an_object_larger_than_the_store_is_not_stored() {
        let store = MemoryStore::new(1 << 16, 4);
        store.put(&key("/big"), entry(1 << 17, &[])).unwrap();
        assert_eq!(store.usage(), (0, 0));
    }

    #[test]
    fn variants_replace_their_match_and_are_capped() {
        let store = MemoryStore::new(1 << 20, 2);
        let k = key("/v");
        store
            .put(&k, entry(10, &[("accept-encoding", Some("gzip"))]))
            .unwrap();
        store
            .put(&k, entry(20, &[("accept-encoding", Some("br"))]))
            .unwrap();
        store
            .put(&k, entry(30, &[("accept-encoding", Some("gzip"))]))
            .unwrap();
        let v = store.get(&k).unwrap();
        assert_eq!(v.len(), 2);
        assert_eq!(v[1].body.len(), 30);
        store
            .put(&k, entry(40, &[("accept-encoding", None)]))
            .unwrap();
        assert_eq!(store.get(&k).unwrap().len(), 2, "capped at max_variants");
        // A different set of Vary fields replaces every old variant.
        store
            .put(&k, entry(50, &[("accept-language", Some("en"))]))
            .unwrap();
        assert_eq!(store.get(&k).unwrap().len(), 1);
        assert_eq!(store.remove(&k).unwrap(), 1);
        assert_eq!(store.usage(), (0, 0));
    }
}
