//! Cache policy: the RFC 9111 decisions of a *shared* cache, as pure functions, one file per
//! section of the RFC, each with its tests beside it:
//! - `cache_control`: parsing `Cache-Control` (§5.2, RFC 5861) and the request `Pragma`
//!   fallback (§5.4);
//! - `storability`: may this response be stored, and if not, why (§3, §3.5);
//! - `freshness`: freshness lifetime, explicit and heuristic (§4.2.1, §4.2.2), and age
//!   (§4.2.3, §5.1);
//! - `reuse`: may a stored response answer a request, fresh or stale (§4.2.4, the request
//!   directives of §5.2.1, RFC 5861's stale windows);
//! - `vary`: `Vary` and matching a request to a stored variant (§4.1);
//! - `validation`: the preconditions that revalidate a stored response, whether a 304
//!   applies to it, its fields updated from the 304 (§4.3, §3.2), and which responses to
//!   unsafe methods invalidate stored responses (§4.4).
//!
//! This file holds the tunables (`PolicyOptions`) and the module's public paths: every item
//! is used as `crate::policy::name`, whichever file it lives in. Field helpers (lists,
//! dates, delta-seconds) are `http::headers`'; the policy has none of its own.
//!
//! Invariants:
//! - Every function is pure: the same arguments give the same answer.
//! - Header lists are `&[(String, Vec<u8>)]` with lower-case field names and raw values;
//!   repeated fields are separate entries in order, and list fields are combined with ", ".
//! - Every delta-seconds value is at most 2^31 (RFC 9111 §1.2.2).
//! - Each rule sits next to the RFC sentence it implements; where Echo is stricter than the
//!   RFC (Set-Cookie, no-cache, qualified private, 304) or looser (a 304 without validators
//!   freshens the response it validated) the comment says so.
//!
//! What it must not do:
//! - no I/O, no logging, no global state;
//! - no clock reads: every time is an argument (`SystemTime`), so tests are deterministic;
//! - no panics on any input: no `unwrap`, `expect`, panicking indexing or unchecked
//!   arithmetic on values that come from the network.

mod cache_control;
mod freshness;
mod reuse;
mod storability;
mod targeted;
#[cfg(test)]
mod testing;
mod validation;
mod vary;

use std::sync::Arc;
use std::time::Duration;

use crate::config::CacheConfig;

pub use cache_control::CacheControl;
pub use freshness::{corrected_initial_age, freshness_lifetime};
pub use reuse::{reuse, Reuse};
pub use storability::{storability, NoStoreReason, Storability};
pub use targeted::ECHO_CACHE_CONTROL;
pub use validation::{
    freshens, head_freshens, invalidates, update_stored_headers, AfterNotModified,
};
pub use vary::{vary, vary_matches, vary_snapshot, Vary, VarySnapshot};

pub(crate) use freshness::{current_age, is_fresh};
pub(crate) use reuse::stale_window;
pub(crate) use validation::{after_not_modified, entity_tag, validation_preconditions};

pub use crate::http::headers::HeaderList;

/// The fraction of (Date − Last-Modified) the heuristic lifetime takes (RFC 9111
/// §4.2.2: "A typical setting of this fraction might be 10%"). Not a setting.
pub const HEURISTIC_FRACTION: f64 = 0.1;

/// Tunables of the policy: the `[cache]` settings it acts on.
#[derive(Debug, Clone, PartialEq)]
pub struct PolicyOptions {
    /// Cap on heuristic freshness (RFC 9111 §4.2.2): `cache.heuristic_max_ms`.
    pub heuristic_max: Duration,
    /// Fraction of (Date − Last-Modified) used for the heuristic: [`HEURISTIC_FRACTION`].
    pub heuristic_fraction: f64,
    /// Lifetime given to a heuristically cacheable response that has no freshness
    /// information at all (no explicit lifetime, no Last-Modified); zero: off.
    /// `cache.default_ttl_ms`.
    pub default_ttl: Duration,
    /// Cap on how long past its freshness a response is served stale (stale-while-
    /// revalidate, stale-if-error, a client's max-stale): `cache.max_stale_ms`.
    pub max_stale: Duration,
    /// Act on the client's request directives (max-age, max-stale, min-fresh, no-cache,
    /// only-if-cached); many operators turn this off so clients cannot bypass the cache.
    /// `cache.honor_request_cache_control`.
    pub honor_request: bool,
    /// How long past its freshness a stored response may answer when the origin fails,
    /// for responses that allow serving stale at all: `cache.stale_if_error_ms` (the
    /// response's own stale-if-error still applies where it is longer).
    pub stale_if_error: Duration,
    /// Targeted cache-control fields (RFC 9213), in precedence order, lower case:
    /// `cache.targeted_cache_control`.
    pub targeted: Arc<[String]>,
    /// Read `Surrogate-Control` after the targeted fields: `cache.surrogate_control`.
    pub surrogate_control: bool,
}

impl PolicyOptions {
    /// The policy as the `[cache]` section sets it.
    pub fn from_config(c: &CacheConfig) -> PolicyOptions {
        PolicyOptions {
            heuristic_max: c.heuristic_max,
            heuristic_fraction: HEURISTIC_FRACTION,
            default_ttl: c.default_ttl,
            max_stale: c.max_stale,
            honor_request: c.honor_request_cache_control,
            stale_if_error: c.stale_if_error,
            targeted: c.targeted_cache_control.clone().into(),
            surrogate_control: c.surrogate_control,
        }
    }
}

/// The policy of the default `[cache]` section: the defaults live in the config, once.
impl Default for PolicyOptions {
    fn default() -> Self {
        PolicyOptions::from_config(&CacheConfig::default())
    }
}
