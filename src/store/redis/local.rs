//! The local tier: a bounded in-process copy of what this node read from Redis, in front
//! of it, so a hit it holds costs no round trip. Redis keeps it coherent (`tracking`):
//! every change to an entry key, on any server this node reads from, arrives as an
//! invalidation message that drops the key here.
//!
//! Races are closed by construction (the "caching in progress" guard of Redis's
//! client-side caching): a reader takes a ticket before its Redis read and inserts what
//! it read only if no invalidation of the key (of its stripe: a false positive only costs
//! an insert) and no flush came after the ticket. The check and the insert happen under
//! the shard's lock, and an invalidation marks the stripe before it takes that lock to
//! remove the key, so one of the two always sees the other.
//!
//! Invariants: what is held never exceeds the byte bound; an entry is held no longer than
//! `max_ttl` and never past the freshness of any of its variants; only entries read from
//! a server whose tracking connection is in sync (since before the ticket) are inserted;
//! a flush drops everything and refuses every insert ticketed before it.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use lru::LruCache;

use crate::store::{Entry, Lookup};

/// Shards of the map, each with its own lock and a share of the bound: hits on many
/// threads seldom meet.
const SHARDS: usize = 16;
/// Stripes of invalidation marks (a key's stripe is its hash).
const STRIPES: usize = 4096;
/// What one held entry costs beyond its variants (map node, slot, key's allocation):
/// an estimate, so that many small entries still count.
const OVERHEAD: usize = 256;

/// A ticket taken before a Redis read.
#[derive(Debug, Clone, Copy)]
pub(super) struct Ticket(u64);

struct Slot {
    variants: Vec<Arc<Entry>>,
    generation: u64,
    expires: Instant,
    bytes: usize,
}

struct Shard {
    map: LruCache<String, Slot>,
    bytes: usize,
}

/// Counters for `/metrics`.
#[derive(Debug, Default)]
pub(super) struct TierCounts {
    pub(super) hits: AtomicU64,
    pub(super) misses: AtomicU64,
    /// Keys named by invalidation messages (whether held or not).
    pub(super) invalidations: AtomicU64,
    pub(super) flushes: AtomicU64,
}

pub(super) struct LocalTier {
    shards: Vec<Mutex<Shard>>,
    max_shard_bytes: usize,
    max_ttl: Duration,
    /// Every invalidation and flush takes the next number; tickets are this counter.
    clock: AtomicU64,
    /// Per stripe, the number of the last invalidation of a key in it.
    stripes: Box<[AtomicU64]>,
    /// The number of the last flush.
    flushed: AtomicU64,
    /// False while the tier cannot be kept coherent (no tracking yet, or Redis refuses
    /// it): nothing is served or inserted.
    on: AtomicBool,
    pub(super) counts: TierCounts,
}

fn hash(key: &str) -> u64 {
    use std::hash::{BuildHasher, BuildHasherDefault};
    BuildHasherDefault::<std::collections::hash_map::DefaultHasher>::default().hash_one(key)
}

fn lock(shard: &Mutex<Shard>) -> MutexGuard<'_, Shard> {
    shard.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a held entry counts against the bound: its key and variants as the memory
/// store counts them (a body in a memfd included).
fn weight(key: &str, variants: &[Arc<Entry>]) -> usize {
    key.len() + OVERHEAD + variants.iter().map(|e| e.size()).sum::<usize>()
}

impl LocalTier {
    pub(super) fn new(max_bytes: usize, max_ttl: Duration) -> LocalTier {
        LocalTier {
            shards: (0..SHARDS)
                .map(|_| {
                    Mutex::new(Shard {
                        map: LruCache::unbounded(),
                        bytes: 0,
                    })
                })
                .collect(),
            max_shard_bytes: max_bytes / SHARDS,
            max_ttl,
            clock: AtomicU64::new(1),
            stripes: (0..STRIPES).map(|_| AtomicU64::new(0)).collect(),
            flushed: AtomicU64::new(0),
            on: AtomicBool::new(false),
            counts: TierCounts::default(),
        }
    }

    fn shard(&self, h: u64) -> &Mutex<Shard> {
        &self.shards[(h as usize) % SHARDS]
    }

    fn stripe(&self, h: u64) -> &AtomicU64 {
        &self.stripes[((h >> 32) as usize) % STRIPES]
    }

    /// Taken before a Redis read whose answer may be inserted.
    pub(super) fn ticket(&self) -> Ticket {
        Ticket(self.clock.load(Ordering::Acquire))
    }

    /// Is the tier serving?
    pub(super) fn is_on(&self) -> bool {
        self.on.load(Ordering::Acquire)
    }

    /// Turns the tier on (every tracking connection in sync) or off (flushed).
    pub(super) fn set_on(&self, on: bool) {
        if on {
            self.on.store(true, Ordering::Release);
        } else if self.on.swap(false, Ordering::AcqRel) {
            self.flush();
        }
    }

    /// The held lookup for `key` (a cache key), when it is still within its local TTL.
    pub(super) fn get(&self, key: &str) -> Option<Lookup> {
        if !self.is_on() {
            return None;
        }
        let h = hash(key);
        let mut shard = lock(self.shard(h));
        let found = match shard.map.get(key) {
            Some(slot) if slot.expires > Instant::now() => Some(Lookup {
                variants: slot.variants.clone(),
                generation: slot.generation,
                local: true,
            }),
            Some(_) => {
                if let Some(slot) = shard.map.pop(key) {
                    shard.bytes -= slot.bytes;
                }
                None
            }
            None => None,
        };
        drop(shard);
        let counter = if found.is_some() {
            &self.counts.hits
        } else {
            &self.counts.misses
        };
        counter.fetch_add(1, Ordering::Relaxed);
        found
    }

    /// Holds what a Redis read found for `key`, unless an invalidation of it or a flush
    /// came after `ticket`, `synced_since` (the source's tracking was not in sync at the
    /// ticket), it is fresh for no time, or it alone would take more than a shard's
    /// share (a sixteenth of the bound). Large bodies go into memfds, for sendfile
    /// (after a first check, so a refused insert seldom makes one).
    pub(super) fn insert(&self, key: &str, lookup: &Lookup, ticket: Ticket, synced_since: u64) {
        if !self.is_on() || lookup.variants.is_empty() || ticket.0 < synced_since {
            return;
        }
        let now = SystemTime::now();
        let fresh_for = lookup
            .variants
            .iter()
            .map(|e| {
                let age = crate::policy::current_age(e.initial_age, e.response_time, now);
                e.freshness.saturating_sub(age)
            })
            .min()
            .unwrap_or_default()
            .min(self.max_ttl);
        let h = hash(key);
        if fresh_for.is_zero() || self.invalidated_after(h, ticket) {
            return;
        }
        let variants: Vec<Arc<Entry>> = lookup
            .variants
            .iter()
            .map(|e| Entry::with_body_in_file(Arc::clone(e)))
            .collect();
        let bytes = weight(key, &variants);
        if bytes > self.max_shard_bytes {
            return;
        }
        let mut shard = lock(self.shard(h));
        // Again under the lock: an invalidation marks its stripe before it takes it.
        if self.invalidated_after(h, ticket) {
            return;
        }
        let slot = Slot {
            variants,
            generation: lookup.generation,
            expires: Instant::now() + fresh_for,
            bytes,
        };
        if let Some(old) = shard.map.put(key.to_string(), slot) {
            shard.bytes -= old.bytes;
        }
        shard.bytes += bytes;
        while shard.bytes > self.max_shard_bytes {
            match shard.map.pop_lru() {
                Some((_, old)) => shard.bytes -= old.bytes,
                None => break,
            }
        }
    }

    /// Did an invalidation of `h`'s stripe, or a flush, come after `ticket`? (A ticket
    /// is the last number issued: one after it is larger.)
    fn invalidated_after(&self, h: u64, ticket: Ticket) -> bool {
        self.stripe(h).load(Ordering::Acquire) > ticket.0
            || self.flushed.load(Ordering::Acquire) > ticket.0
    }

    /// Drops `key` (a cache key), and refuses inserts of it ticketed before now.
    pub(super) fn invalidate(&self, key: &str) {
        self.counts.invalidations.fetch_add(1, Ordering::Relaxed);
        let h = hash(key);
        let now = self.clock.fetch_add(1, Ordering::AcqRel) + 1;
        self.stripe(h).fetch_max(now, Ordering::AcqRel);
        let mut shard = lock(self.shard(h));
        if let Some(old) = shard.map.pop(key) {
            shard.bytes -= old.bytes;
        }
    }

    /// Drops everything, and refuses every insert ticketed before now.
    pub(super) fn flush(&self) {
        self.counts.flushes.fetch_add(1, Ordering::Relaxed);
        let now = self.clock.fetch_add(1, Ordering::AcqRel) + 1;
        self.flushed.fetch_max(now, Ordering::AcqRel);
        for shard in &self.shards {
            let mut shard = lock(shard);
            shard.map.clear();
            shard.bytes = 0;
        }
    }

    /// The clock now: a source whose tracking comes in sync records it, and only
    /// tickets taken after it may insert what was read from that source.
    pub(super) fn now(&self) -> u64 {
        self.clock.fetch_add(1, Ordering::AcqRel) + 1
    }

    /// Bytes and entries held.
    pub(super) fn usage(&self) -> (usize, usize) {
        self.shards.iter().fold((0, 0), |(b, n), s| {
            let s = lock(s);
            (b + s.bytes, n + s.map.len())
        })
    }
}
