//! Validation of `[cache]` (see `validate.rs` for the rules every section follows): the
//! store, its bounds, the policy's tunables, targeted cache-control fields, content
//! codings, and the request fields never sent on fills.

use std::time::Duration;

use super::raw::RawCache;
use super::validate::{err, ranged};
use super::{CacheConfig, ConfigError, StoreKind};

pub(super) fn store_kind(store: &str) -> Result<StoreKind, ConfigError> {
    match store {
        "memory" => Ok(StoreKind::Memory),
        "redis" => Ok(StoreKind::Redis),
        other => Err(err(
            "cache.store",
            format!("unknown store {other:?}; use \"memory\" or \"redis\""),
        )),
    }
}

/// `[cache]`. Whether `store = "redis"` has
/// a `[redis]` section is the whole file's business ([`validate`]).
pub(super) fn validate_cache(c: &RawCache) -> Result<CacheConfig, ConfigError> {
    let store = store_kind(&c.store)?;
    let memory_max_bytes = ranged(
        "cache.memory_max_bytes",
        c.memory_max_bytes,
        1 << 16,
        u64::MAX,
    )?;
    let max_object_bytes = ranged("cache.max_object_bytes", c.max_object_bytes, 1, u64::MAX)?;
    if max_object_bytes > memory_max_bytes {
        return Err(err(
            "cache.max_object_bytes",
            "must not exceed cache.memory_max_bytes",
        ));
    }
    Ok(CacheConfig {
        store,
        memory_max_bytes,
        max_object_bytes,
        max_variants: ranged("cache.max_variants", c.max_variants, 1, 1024)?,
        heuristic_max: Duration::from_millis(c.heuristic_max_ms),
        default_ttl: Duration::from_millis(c.default_ttl_ms),
        max_stale: Duration::from_millis(c.max_stale_ms),
        honor_request_cache_control: c.honor_request_cache_control,
        stale_if_error: Duration::from_millis(c.stale_if_error_ms),
        targeted_cache_control: targeted_fields(&c.targeted_cache_control)?,
        surrogate_control: c.surrogate_control,
        normalize_accept_encoding: codings(
            "cache.normalize_accept_encoding",
            &c.normalize_accept_encoding,
            &["gzip", "br", "zstd", "deflate", "compress"],
        )?,
        compress: codings("cache.compress", &c.compress, &["gzip", "br"])?,
        expose_status_headers: c.expose_status_headers,
        strip_surrogate_key: c.strip_surrogate_key,
        refresh_ahead: Duration::from_millis(c.refresh_ahead_ms),
        background_workers: ranged("cache.background_workers", c.background_workers, 1, 256)?,
        background_queue: ranged("cache.background_queue", c.background_queue, 1, 100_000)?,
        // A lease is renewed every third of it: a round trip to Redis.
        coalesce_lock_ttl: Duration::from_millis(ranged(
            "cache.coalesce_lock_ttl_ms",
            c.coalesce_lock_ttl_ms,
            100,
            3_600_000,
        )? as u64),
        uncacheable_ttl: Duration::from_millis(c.uncacheable_ttl_ms),
        retired: [
            ("cache.coalesce_wait_ms", c.coalesce_wait_ms.is_some()),
            (
                "cache.coalesce_max_waiters",
                c.coalesce_max_waiters.is_some(),
            ),
        ]
        .into_iter()
        .filter_map(|(key, set)| set.then_some(key))
        .collect(),
        strip_request_headers: c
            .strip_request_headers
            .iter()
            .map(|h| fold_field_name(h.trim()))
            .collect(),
    })
}

/// `cache.targeted_cache_control`: field names (RFC 9110 §5.1 tokens), lower case, each
/// once; `Cache-Control` itself is not a targeted field (RFC 9213 §2).
fn targeted_fields(names: &[String]) -> Result<Vec<String>, ConfigError> {
    const KEY: &str = "cache.targeted_cache_control";
    let mut out: Vec<String> = Vec::with_capacity(names.len());
    for name in names {
        let folded = name.trim().to_ascii_lowercase();
        let token = !folded.is_empty()
            && folded
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b));
        if !token {
            return Err(err(KEY, format!("{name:?} is not a field name")));
        }
        if folded == "cache-control" {
            return Err(err(
                KEY,
                "Cache-Control applies when no targeted field does; do not list it",
            ));
        }
        if out.contains(&folded) {
            return Err(err(KEY, format!("{name:?} is listed twice")));
        }
        out.push(folded);
    }
    Ok(out)
}

/// A list of content codings (RFC 9110 §8.4.1) out of `known`, lower case, each once:
/// `cache.normalize_accept_encoding`, `cache.compress`.
fn codings(key: &str, names: &[String], known: &[&str]) -> Result<Vec<String>, ConfigError> {
    let mut out: Vec<String> = Vec::with_capacity(names.len());
    for name in names {
        let folded = name.trim().to_ascii_lowercase();
        if !known.contains(&folded.as_str()) {
            return Err(err(
                key,
                format!("{name:?} is not a content coding Echo can use here; use any of {known:?}"),
            ));
        }
        if out.contains(&folded) {
            return Err(err(key, format!("{name:?} is listed twice")));
        }
        out.push(folded);
    }
    Ok(out)
}

/// A strip-list name folded the way the front end compares request field names: lower
/// case, `_` as `-` (CGI, WSGI and Rack servers read `X_Forwarded_Host` as
/// `X-Forwarded-Host`). Config's own statement of the rule, so it needs nothing from
/// `http`; the two must agree, or a listed field would slip through under another
/// spelling.
fn fold_field_name(name: &str) -> String {
    name.to_ascii_lowercase().replace('_', "-")
}
