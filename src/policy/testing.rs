//! Helpers shared by the policy's unit tests: a fixed clock, header lists written as tables,
//! and the storability results they expect. Test-only; nothing here is compiled into Echo.

use std::time::{Duration, SystemTime};

use super::{NoStoreReason, Storability};

/// A fixed "now": 2023-11-14T22:13:20Z.
pub(crate) fn t0() -> SystemTime {
    SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
}

/// t0 shifted by `secs` (may be negative).
pub(crate) fn at(secs: i64) -> SystemTime {
    if secs >= 0 {
        t0() + Duration::from_secs(secs.unsigned_abs())
    } else {
        t0() - Duration::from_secs(secs.unsigned_abs())
    }
}

/// An IMF-fixdate `secs` from t0.
pub(crate) fn date(secs: i64) -> String {
    httpdate::fmt_http_date(at(secs))
}

pub(crate) fn hdrs<S: AsRef<str>>(pairs: &[(&str, S)]) -> Vec<(String, Vec<u8>)> {
    pairs
        .iter()
        .map(|(n, v)| (n.to_string(), v.as_ref().as_bytes().to_vec()))
        .collect()
}

pub(crate) fn secs(n: u64) -> Duration {
    Duration::from_secs(n)
}

pub(crate) const DAY: u64 = 24 * 60 * 60;

/// Header pairs as written in a table.
pub(crate) type Pairs = Vec<(&'static str, &'static str)>;
/// Header pairs whose values are computed (dates).
pub(crate) type OwnedPairs = Vec<(&'static str, String)>;
/// What `freshness_lifetime` returns.
pub(crate) type Lifetime = Option<(Duration, bool)>;

pub(crate) fn store(n: u64) -> Storability {
    Storability::Store {
        freshness: secs(n),
        heuristic: false,
    }
}

pub(crate) fn heur(n: u64) -> Storability {
    Storability::Store {
        freshness: secs(n),
        heuristic: true,
    }
}

pub(crate) fn no(r: NoStoreReason) -> Storability {
    Storability::DoNotStore(r)
}
