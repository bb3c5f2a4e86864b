//! What a cached response is ([`Entry`]) and where it lives ([`Store`]).
//!
//! A key holds every Vary variant of its resource: a lookup returns them all and the
//! policy picks the one the request selects, so a hit costs one store round trip.
//!
//! Invariants: a store never fails a request: errors are returned for the caller to
//! treat as a miss; entries are immutable once stored (shared as `Arc`).

pub mod memory;

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use crate::http::Headers;
use crate::key::CacheKey;
use crate::policy::VarySnapshot;

/// A stored response.
#[derive(Debug, Clone)]
pub struct Entry {
    pub status: u16,
    /// End-to-end response fields as received (no hop-by-hop, no framing, no Age).
    pub headers: Headers,
    pub body: Vec<u8>,
    /// When the response was received (RFC 9111 §4.2.3 `response_time`).
    pub response_time: SystemTime,
    /// RFC 9111 §4.2.3 `corrected_initial_age`.
    pub initial_age: Duration,
    /// Freshness lifetime (RFC 9111 §4.2.1).
    pub freshness: Duration,
    /// The request's values of the fields named by Vary, when stored.
    pub vary: VarySnapshot,
}

impl Entry {
    /// Approximate bytes this entry occupies, for the memory bound.
    pub fn size(&self) -> usize {
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
        self.body.len() + headers + vary + std::mem::size_of::<Entry>()
    }

    /// The variants under one key are told apart by the Vary field names and the
    /// request's values for them.
    pub fn same_variant(&self, other: &Entry) -> bool {
        self.vary == other.vary
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreError {
    Unavailable(String),
}

impl fmt::Display for StoreError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StoreError::Unavailable(why) => write!(f, "store unavailable: {why}"),
        }
    }
}

impl std::error::Error for StoreError {}

pub trait Store: Send + Sync {
    /// Short name for logs and metrics ("memory", "redis").
    fn name(&self) -> &'static str;
    /// Every stored variant of `key` (empty when none).
    fn get(&self, key: &CacheKey) -> Result<Vec<Arc<Entry>>, StoreError>;
    /// Stores `entry` as a variant of `key`, replacing the variant it matches, and every
    /// variant stored under a different set of Vary fields (the origin changed its Vary).
    fn put(&self, key: &CacheKey, entry: Arc<Entry>) -> Result<(), StoreError>;
    /// Removes every variant of `key`; returns how many were removed.
    fn remove(&self, key: &CacheKey) -> Result<usize, StoreError>;
}
