//! The cache key: scheme, Host and request target, one key for GET and HEAD, kept
//! readable (`http://example.com/orgs/42/users?page=2`) because invalidation patterns
//! are matched against it. Vary variants live under one key (see `store`).
//!
//! Invariants: the host is already lower-cased and stripped of a default port by the
//! parser, so equivalent authorities share entries; the target is kept byte for byte
//! (normalising percent-encoding could merge resources the origin tells apart).
//!
//! The key's string form is Echo's own format, so it is read back here too
//! ([`split_key`], [`CacheKey::parse`]): by stores, invalidation and bans alike. This
//! module imports nothing else from Echo.

use std::fmt;

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct CacheKey {
    full: String,
    /// Where the request target starts in `full`.
    target_at: usize,
}

impl CacheKey {
    pub fn new(scheme: &str, host: &str, target: &str) -> CacheKey {
        // Joined by hand: `format!` goes through the formatting machinery, and this runs
        // on every request.
        let mut full = String::with_capacity(scheme.len() + 3 + host.len() + target.len());
        full.push_str(scheme);
        full.push_str("://");
        full.push_str(host);
        let target_at = full.len();
        full.push_str(target);
        CacheKey { full, target_at }
    }

    /// Reads a key back from its string form (as stores and invalidation hold it).
    pub(crate) fn parse(full: &str) -> Option<CacheKey> {
        let (host, target) = split_key(full)?;
        let scheme = full.split("://").next()?;
        Some(CacheKey::new(scheme, host, target))
    }

    /// The host part, e.g. `example.com`.
    pub(crate) fn host(&self) -> &str {
        split_key(&self.full).map_or("", |(h, _)| h)
    }

    /// The whole key, e.g. `http://example.com/a?b`.
    pub(crate) fn as_str(&self) -> &str {
        &self.full
    }

    /// The request target part, e.g. `/a?b`.
    pub(crate) fn target(&self) -> &str {
        &self.full[self.target_at..]
    }
}

/// `http://host/target` → (host, target).
pub fn split_key(key: &str) -> Option<(&str, &str)> {
    let rest = key
        .strip_prefix("http://")
        .or_else(|| key.strip_prefix("https://"))?;
    let slash = rest.find('/')?;
    Some((&rest[..slash], &rest[slash..]))
}

impl fmt::Display for CacheKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.full)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_readable_and_keep_the_target() {
        let k = CacheKey::new("http", "example.com", "/orgs/42/users?page=2");
        assert_eq!(k.as_str(), "http://example.com/orgs/42/users?page=2");
        assert_eq!(k.target(), "/orgs/42/users?page=2");
        assert_ne!(
            k,
            CacheKey::new("http", "example.com", "/orgs/42/users?page=3")
        );
        assert_ne!(
            k,
            CacheKey::new("http", "other.com", "/orgs/42/users?page=2")
        );
    }
}
