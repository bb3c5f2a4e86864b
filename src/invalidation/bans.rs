//! Bans: no resurrection. Every invalidation is remembered for a while, numbered by a
//! generation, so a fill that began before it cannot store after it what it named:
//! [`Bans`] in process (the memory store), [`ban_names`] for the bans the Redis store
//! keeps in Redis.
//!
//! Invariants: a job is banned (its generation recorded) before any entry is touched, so
//! an entry written after the ban is checked against it; a ban keeps its source, never a
//! compiled regex, and the bans are bounded in number and bytes; the oldest are
//! forgotten conservatively (a fill older than a forgotten ban is refused, never checked
//! against less than it must be).

use std::collections::VecDeque;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::matcher::Matcher;
use crate::key::split_key;

/// Most invalidations remembered against older fills (see [`Bans`]).
pub(crate) const MAX_BANS: usize = 1024;
/// Most bytes of ban sources remembered (patterns, hosts and tags, with their overhead).
pub(crate) const MAX_BAN_BYTES: usize = 1 << 20;

/// One remembered invalidation: its generation and its source (pattern, host, tag),
/// never its compiled regex. Compiling is the rare path: only a fill that began before
/// the ban and finished after it is checked against it.
#[derive(Debug)]
pub(crate) struct Ban {
    generation: u64,
    at: Instant,
    pattern: Option<String>,
    host: Option<String>,
    tag: Option<String>,
    /// A purge by URL: exactly these keys.
    urls: Option<Arc<std::collections::BTreeSet<String>>>,
}

impl Ban {
    fn new(generation: u64, matcher: &Matcher) -> Ban {
        Ban {
            generation,
            at: Instant::now(),
            pattern: matcher.pattern().map(str::to_string),
            host: matcher.host().map(str::to_string),
            tag: matcher.tag().map(str::to_string),
            urls: matcher.urls().map(|u| Arc::new(u.clone())),
        }
    }

    /// What remembering it costs, roughly: its strings and its own size.
    fn bytes(&self) -> usize {
        let text = |s: &Option<String>| s.as_ref().map_or(0, String::len);
        std::mem::size_of::<Ban>()
            + 2 * std::mem::size_of::<usize>()
            + text(&self.pattern)
            + text(&self.host)
            + text(&self.tag)
            + self
                .urls
                .as_ref()
                .map_or(0, |u| u.iter().map(|k| k.len() + 32).sum())
    }

    /// Does this ban name the entry stored under `key` with `tags`?
    pub(crate) fn names(&self, key: &str, tags: &[String]) -> bool {
        if let Some(urls) = &self.urls {
            return urls.contains(key);
        }
        ban_names(
            self.pattern.as_deref(),
            self.host.as_deref(),
            self.tag.as_deref(),
            key,
            tags,
        )
    }
}

/// Does the invalidation with this source name the entry stored under `key` with
/// `tags`? The host and the tag are compared first; the pattern is compiled only when
/// they pass. A source that no longer compiles (a later Echo with other limits) is
/// taken to name everything: refusing a fill costs a miss, storing it could resurrect.
pub(crate) fn ban_names(
    pattern: Option<&str>,
    host: Option<&str>,
    tag: Option<&str>,
    key: &str,
    tags: &[String],
) -> bool {
    if host.is_some_and(|h| split_key(key).is_some_and(|(kh, _)| kh != h)) {
        return false;
    }
    if tag.is_some_and(|t| !tags.iter().any(|x| x == t)) {
        return false;
    }
    match Matcher::new(pattern, host, tag) {
        Ok(m) => m.matches_key(key) && m.matches_tags(tags),
        Err(_) => true,
    }
}

/// What a fill that began at some generation must be checked against before it stores.
#[derive(Debug)]
pub(crate) enum BanCheck {
    /// No invalidation since the fill began: store.
    Clear,
    /// These invalidations came after the fill began: check them (with no lock held:
    /// each may compile a regex), then ask again from generation `up_to`.
    Check { bans: Vec<Arc<Ban>>, up_to: u64 },
    /// The fill is older than what is remembered: it cannot be shown safe, refuse it.
    Forgotten,
}

/// The invalidations of the last `ttl`, numbered by generation. A fill remembers the
/// generation it started at; at store time an entry matching any later ban is dropped.
/// Used by the memory store directly; the Redis store keeps the same in Redis.
///
/// Bounded: at most [`MAX_BANS`] bans and [`MAX_BAN_BYTES`] bytes of their sources.
/// Beyond either, the oldest are forgotten early, conservatively: a fill older than a
/// forgotten ban is refused, never checked against less than it must be.
pub(crate) struct Bans {
    ttl: Duration,
    generation: u64,
    bans: VecDeque<Arc<Ban>>,
    /// What `bans` holds, by [`Ban::bytes`].
    bytes: usize,
    /// Every ban up to this generation has been forgotten: older fills cannot be checked.
    forgotten_up_to: u64,
}

impl Bans {
    pub(crate) fn new(ttl: Duration) -> Bans {
        Bans {
            ttl,
            generation: 0,
            bans: VecDeque::new(),
            bytes: 0,
            forgotten_up_to: 0,
        }
    }

    pub(crate) fn generation(&self) -> u64 {
        self.generation
    }

    /// How many bans are remembered, and the bytes of their sources.
    #[cfg(test)]
    pub(crate) fn remembered(&self) -> (usize, usize) {
        (self.bans.len(), self.bytes)
    }

    /// Records a ban of what `matcher` names; returns its generation.
    pub(crate) fn add(&mut self, matcher: &Matcher) -> u64 {
        self.generation += 1;
        let ban = Ban::new(self.generation, matcher);
        self.bytes += ban.bytes();
        self.bans.push_back(Arc::new(ban));
        self.forget();
        self.generation
    }

    /// Forgets the expired bans, then the oldest beyond the bounds (never the newest).
    fn forget(&mut self) {
        while let Some(oldest) = self.bans.front() {
            let over = self.bans.len() > MAX_BANS || self.bytes > MAX_BAN_BYTES;
            if oldest.at.elapsed() <= self.ttl && !(over && self.bans.len() > 1) {
                break;
            }
            self.forgotten_up_to = oldest.generation;
            self.bytes -= oldest.bytes();
            self.bans.pop_front();
        }
    }

    /// What an entry from a fill that started at generation `since` must be checked
    /// against before it is stored. Cheap: no regex is compiled here, so a store can
    /// call it under its lock and check the bans after releasing it.
    pub(crate) fn since(&mut self, since: u64) -> BanCheck {
        if since >= self.generation {
            return BanCheck::Clear;
        }
        self.forget();
        if since < self.forgotten_up_to {
            return BanCheck::Forgotten;
        }
        BanCheck::Check {
            bans: self
                .bans
                .iter()
                .filter(|b| b.generation > since)
                .cloned()
                .collect(),
            up_to: self.generation,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::invalidation::MAX_PATTERN_BYTES;

    /// May an entry from a fill that began at `since` be stored? (what a store does
    /// with `Bans::since`, in one step)
    fn allows(bans: &mut Bans, since: u64, key: &str, tags: &[String]) -> bool {
        match bans.since(since) {
            BanCheck::Clear => true,
            BanCheck::Forgotten => false,
            BanCheck::Check { bans, .. } => !bans.iter().any(|b| b.names(key, tags)),
        }
    }

    fn matcher(pattern: &str) -> Matcher {
        Matcher::new(Some(pattern), None, None).unwrap()
    }

    #[test]
    fn bans_refuse_only_matching_entries_of_older_fills() {
        let mut bans = Bans::new(Duration::from_secs(60));
        let before = bans.generation();
        bans.add(&matcher("^/orgs/42/"));
        assert!(!allows(&mut bans, before, "http://a/orgs/42/x", &[]));
        assert!(allows(&mut bans, before, "http://a/orgs/43/x", &[]));
        let now = bans.generation();
        assert!(allows(&mut bans, now, "http://a/orgs/42/x", &[]));
        let tagged = Matcher::new(None, Some("b"), Some("org-42")).unwrap();
        bans.add(&tagged);
        assert!(!allows(
            &mut bans,
            before + 1,
            "http://b/x",
            &["org-42".into()]
        ));
        assert!(allows(
            &mut bans,
            before + 1,
            "http://b/x",
            &["org-4".into()]
        ));
        assert!(allows(
            &mut bans,
            before + 1,
            "http://c/x",
            &["org-42".into()]
        ));
        let mut short = Bans::new(Duration::ZERO);
        let before = short.generation();
        short.add(&matcher("^/x"));
        // With a zero ttl every earlier ban is already forgotten when the next is added.
        short.add(&matcher("^/y"));
        // The first ban is forgotten: a fill from before it cannot be shown safe.
        assert!(!allows(&mut short, before, "http://a/z", &[]));
    }

    /// Issue 13 finding 7: every ban kept its compiled regex (about 1 MiB with its
    /// cache) for `ban_ttl`, so 600 jobs grew RSS by 600 MiB. Bans now keep their source
    /// only, bounded in number and bytes, and forget the oldest conservatively.
    #[test]
    fn bans_keep_sources_bounded_in_number_and_bytes() {
        let mut bans = Bans::new(Duration::from_secs(3600));
        let before = bans.generation();
        // Patterns of 4 KiB (the longest accepted), each unique.
        let long = |i: usize| format!("^/{i}/{}", "x".repeat(MAX_PATTERN_BYTES - 16));
        for i in 0..300 {
            bans.add(&matcher(&long(i)));
            let (count, bytes) = bans.remembered();
            assert!(count <= MAX_BANS, "{count} bans remembered");
            assert!(bytes <= MAX_BAN_BYTES, "{bytes} bytes of bans");
        }
        let (count, bytes) = bans.remembered();
        assert!(count >= 200, "the newest are kept: {count}");
        assert!(bytes >= count * MAX_PATTERN_BYTES - count * 16);
        // A fill older than the forgotten bans is refused, whatever its key.
        assert!(!allows(&mut bans, before, "http://a/nothing-banned", &[]));
        // A fill from after the newest ban is stored; one that straddles the newest ban
        // only is checked against exactly that one.
        let newest = bans.generation();
        assert!(allows(&mut bans, newest, "http://a/299/x", &[]));
        let target = format!("http://a{}", &long(299)[1..]);
        assert!(!allows(&mut bans, newest - 1, &target, &[]));
        assert!(allows(&mut bans, newest - 1, "http://a/298/x", &[]));
        // Many small bans: bounded by number.
        let mut small = Bans::new(Duration::from_secs(3600));
        for i in 0..MAX_BANS + 100 {
            small.add(&matcher(&format!("^/p/{i}$")));
        }
        assert_eq!(small.remembered().0, MAX_BANS);
        let since = small.generation() - 3;
        let last = MAX_BANS + 99;
        assert!(!allows(
            &mut small,
            since,
            &format!("http://a/p/{last}"),
            &[]
        ));
        assert!(allows(
            &mut small,
            since,
            &format!("http://a/p/{}", last - 3),
            &[]
        ));
        assert!(!allows(&mut small, 1, "http://a/p/5", &[]), "forgotten");
    }

    #[test]
    fn a_ban_that_no_longer_compiles_names_everything() {
        assert!(ban_names(Some("(unclosed"), None, None, "http://a/x", &[]));
        // Host and tag are compared before anything is compiled.
        assert!(!ban_names(
            Some("(unclosed"),
            Some("b"),
            None,
            "http://a/x",
            &[]
        ));
        assert!(!ban_names(
            None,
            None,
            Some("t"),
            "http://a/x",
            &["u".into()]
        ));
    }
}
