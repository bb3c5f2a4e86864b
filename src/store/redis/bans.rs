//! Bans and the invalidation generation, kept in Redis so that every node sees them:
//! recording an invalidation before it touches any entry, and checking a fill that began
//! before newer invalidations against them (`invalidation::Bans` is the same within one
//! process).
//!
//! Invariants: the generation (`g` in the control hash, `echo:v1:control`) is
//! incremented on the master by every invalidation, and the ban is recorded with it
//! before the job touches any entry, so an entry written after it is checked against
//! it; the bans are one sorted set on the master scored by when each expires (`ban_ttl`
//! after it was made), trimmed on every write; neither has a TTL, so a `volatile-*`
//! eviction policy never evicts them, and a fill whose newer bans are not all there
//! (evicted after all, or forgotten) is refused: it cannot be shown safe; a ban keeps its
//! source (pattern, host, tag), never a compiled regex, and one that no longer compiles
//! names everything (a refused fill costs a miss, a stored one could resurrect an entry).

use std::time::{Duration, SystemTime};

use super::endpoint::{millis, Endpoint};
use super::fence::CONTROL_KEY;
use crate::invalidation::{ban_names, Matcher};
use crate::store::StoreError;

/// Recent invalidations, scored by the time they expire (see `invalidation::Bans`).
const BANS_KEY: &str = "echo:v1:bans";

/// Records a ban (and a new generation) before a job touches any entry.
pub(super) fn record(
    master: &Endpoint,
    matcher: &Matcher,
    ttl: Duration,
) -> Result<u64, StoreError> {
    let generation: u64 = master.run(redis::cmd("HINCRBY").arg(CONTROL_KEY).arg("g").arg(1))?;
    let expires = now_millis() + millis(ttl);
    let member = serde_json::to_string(&Ban {
        generation,
        pattern: matcher.pattern().map(str::to_string),
        host: matcher.host().map(str::to_string),
        tag: matcher.tag().map(str::to_string),
        urls: matcher.urls().map(|u| u.iter().cloned().collect()),
    })
    .map_err(|e| StoreError::Decode {
        server: master.server(),
        detail: format!("ban not encoded: {e}"),
    })?;
    let mut pipe = redis::pipe();
    pipe.atomic()
        .cmd("ZADD")
        .arg(BANS_KEY)
        .arg(expires)
        .arg(member)
        .ignore()
        .cmd("ZREMRANGEBYSCORE")
        .arg(BANS_KEY)
        .arg("-inf")
        .arg(now_millis())
        .ignore();
    master.with_conn(|c| pipe.query::<()>(c))?;
    Ok(generation)
}

/// Would an invalidation recorded after generation `since` (up to `now`, the
/// generation the store script saw) refuse this entry? True too when the bans of those
/// generations are not all there: lost control state cannot show a fill safe.
pub(super) fn banned_since(
    master: &Endpoint,
    since: u64,
    now: u64,
    key: &str,
    tags: &[String],
) -> Result<bool, StoreError> {
    if now < since {
        // The generation went back: the control hash was lost (evicted, flushed).
        return Ok(true);
    }
    let mut range = redis::cmd("ZRANGEBYSCORE");
    range.arg(BANS_KEY).arg(now_millis()).arg("+inf");
    let bans: Vec<String> = master.run(&range)?;
    let mut covered = std::collections::HashSet::new();
    let mut refuse = false;
    for ban in bans {
        let Ok(ban) = serde_json::from_str::<Ban>(&ban) else {
            continue;
        };
        if ban.generation <= since || ban.generation > now {
            continue;
        }
        covered.insert(ban.generation);
        if refuse {
            continue;
        }
        if let Some(urls) = &ban.urls {
            refuse = urls.iter().any(|u| u == key);
            continue;
        }
        // Host and tag first; the pattern is compiled only when they pass, and one
        // Echo cannot compile is taken to name everything: refuse.
        refuse = ban_names(
            ban.pattern.as_deref(),
            ban.host.as_deref(),
            ban.tag.as_deref(),
            key,
            tags,
        );
    }
    // Every generation in (since, now] has its ban, or one is missing (evicted, expired,
    // or a dry run's number): then nothing can be shown safe.
    Ok(refuse || covered.len() as u64 != now - since)
}

/// A ban as kept in Redis.
#[derive(serde::Serialize, serde::Deserialize)]
struct Ban {
    #[serde(rename = "g")]
    generation: u64,
    #[serde(rename = "p", skip_serializing_if = "Option::is_none")]
    pattern: Option<String>,
    #[serde(rename = "h", skip_serializing_if = "Option::is_none")]
    host: Option<String>,
    #[serde(rename = "t", skip_serializing_if = "Option::is_none")]
    tag: Option<String>,
    /// A purge by URL: exactly these keys.
    #[serde(rename = "u", default, skip_serializing_if = "Option::is_none")]
    urls: Option<Vec<String>>,
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, millis)
}
