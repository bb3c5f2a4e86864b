//! Invalidation: which stored entries a request names ([`Matcher`]), what to do with them
//! ([`Mode`]), the bans that stop a fill begun before an invalidation from storing after
//! it ([`Bans`]), and the dedicated thread that runs jobs one at a time from a bounded
//! queue ([`Invalidator`]).
//!
//! Invariants: a pattern is a linear-time `regex` with a size limit, searched in the
//! stored request target (path and query); a job is banned (its generation recorded)
//! before any entry is touched, so an entry written after the ban is checked against it;
//! the admin call returns only when the work is done (or, for `async`, at once with an
//! id); the queue is bounded and a full queue is refused, never waited on.

use std::collections::{HashMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use log::{info, warn};
use regex::Regex;

use crate::key::CacheKey;
use crate::metrics::Metrics;
use crate::store::Store;

/// Longest pattern accepted, in bytes.
pub const MAX_PATTERN_BYTES: usize = 4096;
/// Compiled-regex size limit: a pattern over it is refused with the regex error.
const REGEX_SIZE_LIMIT: usize = 1 << 20;

/// What happens to matching entries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Removed: the next request is a miss.
    Delete,
    /// Fetched again from the origin in the background; served from the store meanwhile.
    Refresh,
    /// Marked stale: revalidated with the origin on next use (a cheap 304 when unchanged).
    Stale,
}

impl Mode {
    pub fn parse(s: &str) -> Option<Mode> {
        match s {
            "delete" => Some(Mode::Delete),
            "refresh" => Some(Mode::Refresh),
            "stale" => Some(Mode::Stale),
            _ => None,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Delete => "delete",
            Mode::Refresh => "refresh",
            Mode::Stale => "stale",
        }
    }
}

/// Which entries an invalidation names: a regex searched in the request target, an
/// optional exact Host, an optional tag (`Surrogate-Key`). Every given part must match.
#[derive(Debug, Clone)]
pub struct Matcher {
    regex: Option<Regex>,
    /// The literal every match starts with, when the regex is anchored (`^/orgs/42/`).
    prefix: Option<String>,
    host: Option<String>,
    tag: Option<String>,
}

/// Why an invalidation request was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadRequest(pub String);

impl fmt::Display for BadRequest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Matcher {
    pub fn new(
        pattern: Option<&str>,
        host: Option<&str>,
        tag: Option<&str>,
    ) -> Result<Matcher, BadRequest> {
        if pattern.is_none() && tag.is_none() {
            return Err(BadRequest("give a pattern, a tag, or both".into()));
        }
        let (regex, prefix) = match pattern {
            None => (None, None),
            Some("") => {
                return Err(BadRequest(
                    "the pattern is empty (it would match everything)".into(),
                ))
            }
            Some(p) if p.len() > MAX_PATTERN_BYTES => {
                return Err(BadRequest(format!(
                    "the pattern is longer than {MAX_PATTERN_BYTES} bytes"
                )))
            }
            Some(p) => {
                let regex = regex::RegexBuilder::new(p)
                    .size_limit(REGEX_SIZE_LIMIT)
                    .dfa_size_limit(REGEX_SIZE_LIMIT)
                    .build()
                    .map_err(|e| BadRequest(format!("invalid pattern: {e}")))?;
                (Some(regex), literal_prefix(p))
            }
        };
        let host = match host {
            None => None,
            Some(h) if h.is_empty() || h.contains(['/', ' ', '*']) => {
                return Err(BadRequest(format!("invalid host {h:?}")))
            }
            Some(h) => {
                let h = h.to_ascii_lowercase();
                Some(h.strip_suffix(":80").unwrap_or(&h).to_string())
            }
        };
        let tag = match tag {
            None => None,
            Some(t) if t.is_empty() || t.contains([' ', ',']) => {
                return Err(BadRequest(format!("invalid tag {t:?}")))
            }
            Some(t) => Some(t.to_string()),
        };
        Ok(Matcher {
            regex,
            prefix,
            host,
            tag,
        })
    }

    pub fn pattern(&self) -> Option<&str> {
        self.regex.as_ref().map(|r| r.as_str())
    }

    pub fn host(&self) -> Option<&str> {
        self.host.as_deref()
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    /// The literal start of every target the pattern can match, if any.
    pub fn prefix(&self) -> Option<&str> {
        self.prefix.as_deref()
    }

    /// Does a cache key (`http://host/target`) match the pattern and host parts?
    /// The tag part is the store's to check (it knows where tags live).
    pub fn matches_key(&self, key: &str) -> bool {
        let Some((host, target)) = split_key(key) else {
            return false;
        };
        if self.host.as_deref().is_some_and(|h| h != host) {
            return false;
        }
        self.regex.as_ref().is_none_or(|r| r.is_match(target))
    }

    /// Does an entry with these tags match the tag part?
    pub fn matches_tags(&self, tags: &[String]) -> bool {
        self.tag
            .as_ref()
            .is_none_or(|t| tags.iter().any(|x| x == t))
    }

    /// A description for logs and job reports.
    pub fn describe(&self) -> String {
        let mut parts = Vec::new();
        if let Some(r) = &self.regex {
            parts.push(format!("pattern={:?}", r.as_str()));
        }
        if let Some(h) = &self.host {
            parts.push(format!("host={h}"));
        }
        if let Some(t) = &self.tag {
            parts.push(format!("tag={t}"));
        }
        parts.join(" ")
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

/// The literal prefix of an anchored pattern (`^/orgs/42/` → `/orgs/42/`), found with
/// regex-syntax so alternations, optional characters and case-insensitivity are
/// handled exactly; None when the pattern is not anchored at the start.
fn literal_prefix(pattern: &str) -> Option<String> {
    use regex_syntax::hir::literal::{ExtractKind, Extractor};
    use regex_syntax::hir::Look;
    let hir = regex_syntax::Parser::new().parse(pattern).ok()?;
    if !hir.properties().look_set_prefix().contains(Look::Start) {
        return None;
    }
    let seq = Extractor::new().kind(ExtractKind::Prefix).extract(&hir);
    let prefix = seq.longest_common_prefix()?;
    let prefix = std::str::from_utf8(prefix).ok()?;
    (!prefix.is_empty()).then(|| prefix.to_string())
}

/// What one job asks of a store.
#[derive(Debug, Clone)]
pub struct Job {
    pub matcher: Arc<Matcher>,
    pub mode: Mode,
    pub dry_run: bool,
}

/// Live counters of a running job.
#[derive(Debug, Default)]
pub struct Progress {
    pub scanned: AtomicU64,
    pub matched: AtomicU64,
    pub changed: AtomicU64,
}

/// What a store did for a job.
#[derive(Debug, Clone, Default)]
pub struct Outcome {
    pub matched: u64,
    /// Deleted or marked stale (0 for refresh and dry runs: see `refresh`).
    pub changed: u64,
    /// A few matching keys, for dry runs.
    pub sample: Vec<String>,
    /// For refresh: the matching keys, to fetch again.
    pub to_refresh: Vec<String>,
    /// Replicas that acknowledged the changes (Redis), and how many were asked for.
    pub replicas: Option<(u64, u64)>,
}

/// Sample size returned by dry runs.
pub const SAMPLE: usize = 10;

// -----------------------------------------------------------------------------------------
// Bans: no resurrection.

/// Most invalidations remembered against older fills (see [`Bans`]).
pub const MAX_BANS: usize = 1024;
/// Most bytes of ban sources remembered (patterns, hosts and tags, with their overhead).
pub const MAX_BAN_BYTES: usize = 1 << 20;

/// One remembered invalidation: its generation and its source (pattern, host, tag),
/// never its compiled regex. Compiling is the rare path: only a fill that began before
/// the ban and finished after it is checked against it.
#[derive(Debug)]
pub struct Ban {
    generation: u64,
    at: Instant,
    pattern: Option<String>,
    host: Option<String>,
    tag: Option<String>,
}

impl Ban {
    fn new(generation: u64, matcher: &Matcher) -> Ban {
        Ban {
            generation,
            at: Instant::now(),
            pattern: matcher.pattern().map(str::to_string),
            host: matcher.host().map(str::to_string),
            tag: matcher.tag().map(str::to_string),
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
    }

    /// Does this ban name the entry stored under `key` with `tags`?
    pub fn names(&self, key: &str, tags: &[String]) -> bool {
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
pub fn ban_names(
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
pub enum BanCheck {
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
pub struct Bans {
    ttl: Duration,
    generation: u64,
    bans: VecDeque<Arc<Ban>>,
    /// What `bans` holds, by [`Ban::bytes`].
    bytes: usize,
    /// Every ban up to this generation has been forgotten: older fills cannot be checked.
    forgotten_up_to: u64,
}

impl Bans {
    pub fn new(ttl: Duration) -> Bans {
        Bans {
            ttl,
            generation: 0,
            bans: VecDeque::new(),
            bytes: 0,
            forgotten_up_to: 0,
        }
    }

    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// How many bans are remembered, and the bytes of their sources.
    pub fn remembered(&self) -> (usize, usize) {
        (self.bans.len(), self.bytes)
    }

    /// Records a ban of what `matcher` names; returns its generation.
    pub fn add(&mut self, matcher: &Matcher) -> u64 {
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
    pub fn since(&mut self, since: u64) -> BanCheck {
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

// -----------------------------------------------------------------------------------------
// The invalidation thread and its jobs.

/// Refetches entries from the origin for `refresh` mode (the proxy implements it).
pub trait Refresher: Send + Sync {
    /// Fetches the resource of `key` again and stores it; false if it could not.
    fn refresh(&self, key: &CacheKey) -> bool;
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Queued,
    Running,
    Done,
    Failed,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Running => "running",
            State::Done => "done",
            State::Failed => "failed",
        }
    }
}

/// A job as the API reports it.
#[derive(Debug, Clone)]
pub struct Report {
    pub id: u64,
    pub state: State,
    pub mode: Mode,
    pub dry_run: bool,
    pub what: String,
    pub scanned: u64,
    pub matched: u64,
    /// Deleted, marked stale, or refreshed, by mode.
    pub changed: u64,
    pub sample: Vec<String>,
    pub replicas: Option<(u64, u64)>,
    pub elapsed: Duration,
    pub error: Option<String>,
}

struct Tracked {
    report: Report,
    progress: Arc<Progress>,
    started: Option<Instant>,
}

struct Queued {
    id: u64,
    job: Job,
    who: String,
    progress: Arc<Progress>,
    done: Sender<Report>,
}

/// Why a job was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    QueueFull,
    Stopped,
}

/// Keeps the reports of this many finished jobs for `GET /invalidate/<id>`.
const KEEP_REPORTS: usize = 1000;

/// The queue, the thread that drains it, and the job reports.
pub struct Invalidator {
    queue: Sender<Queued>,
    next_id: AtomicU64,
    jobs: Arc<Mutex<HashMap<u64, Tracked>>>,
    thread: thread::JoinHandle<()>,
}

fn lock<'a>(jobs: &'a Mutex<HashMap<u64, Tracked>>) -> MutexGuard<'a, HashMap<u64, Tracked>> {
    jobs.lock().unwrap_or_else(|p| p.into_inner())
}

impl Invalidator {
    /// Starts the invalidation thread.
    pub fn start(
        store: Arc<dyn Store>,
        refresher: Arc<dyn Refresher>,
        queue_depth: usize,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Invalidator> {
        let (tx, rx) = bounded::<Queued>(queue_depth);
        // Every series exists from the start (at 0), so alerts on rates see it.
        for mode in [Mode::Delete, Mode::Refresh, Mode::Stale] {
            let mode = mode.as_str().to_string();
            for outcome in ["done", "failed", "dry_run"] {
                let _ = metrics
                    .invalidations
                    .get_or_create(&vec![("mode", mode.clone()), ("outcome", outcome.into())]);
            }
            let _ = metrics
                .invalidated_entries
                .get_or_create(&vec![("mode", mode)]);
        }
        let jobs: Arc<Mutex<HashMap<u64, Tracked>>> = Arc::new(Mutex::new(HashMap::new()));
        let thread_jobs = Arc::clone(&jobs);
        let thread = thread::Builder::new()
            .name("echo-invalidate".into())
            .spawn(move || {
                run(
                    &rx,
                    store.as_ref(),
                    refresher.as_ref(),
                    &thread_jobs,
                    &metrics,
                )
            })?;
        Ok(Invalidator {
            queue: tx,
            next_id: AtomicU64::new(1),
            jobs,
            thread,
        })
    }

    /// What is wrong with the invalidation thread, for `/health`: None when it runs
    /// and has room in its queue.
    pub fn health(&self) -> Option<String> {
        if self.thread.is_finished() {
            return Some("the invalidation thread has stopped".into());
        }
        if self.queue.is_full() {
            return Some(format!(
                "the invalidation queue is full ({} jobs)",
                self.queue.len()
            ));
        }
        None
    }

    /// Jobs waiting for the thread.
    pub fn queued(&self) -> usize {
        self.queue.len()
    }

    /// Queues a job; the receiver gets its report when it is done.
    pub fn submit(&self, job: Job, who: &str) -> Result<(u64, Receiver<Report>), Refused> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let progress = Arc::new(Progress::default());
        let (done_tx, done_rx) = bounded(1);
        let report = Report {
            id,
            state: State::Queued,
            mode: job.mode,
            dry_run: job.dry_run,
            what: job.matcher.describe(),
            scanned: 0,
            matched: 0,
            changed: 0,
            sample: Vec::new(),
            replicas: None,
            elapsed: Duration::ZERO,
            error: None,
        };
        {
            let mut jobs = lock(&self.jobs);
            if jobs.len() >= KEEP_REPORTS {
                let mut finished: Vec<u64> = jobs
                    .iter()
                    .filter(|(_, t)| matches!(t.report.state, State::Done | State::Failed))
                    .map(|(id, _)| *id)
                    .collect();
                finished.sort_unstable();
                for old in finished.iter().take(jobs.len() + 1 - KEEP_REPORTS) {
                    jobs.remove(old);
                }
            }
            jobs.insert(
                id,
                Tracked {
                    report,
                    progress: Arc::clone(&progress),
                    started: None,
                },
            );
        }
        let queued = Queued {
            id,
            job,
            who: who.to_string(),
            progress,
            done: done_tx,
        };
        match self.queue.try_send(queued) {
            Ok(()) => Ok((id, done_rx)),
            Err(e) => {
                lock(&self.jobs).remove(&id);
                Err(match e {
                    TrySendError::Full(_) => Refused::QueueFull,
                    TrySendError::Disconnected(_) => Refused::Stopped,
                })
            }
        }
    }

    /// A job's report, with live counters while it runs.
    pub fn report(&self, id: u64) -> Option<Report> {
        let jobs = lock(&self.jobs);
        let t = jobs.get(&id)?;
        let mut report = t.report.clone();
        if report.state == State::Running {
            report.scanned = t.progress.scanned.load(Ordering::Relaxed);
            report.matched = t.progress.matched.load(Ordering::Relaxed);
            report.changed = t.progress.changed.load(Ordering::Relaxed);
            report.elapsed = t.started.map_or(Duration::ZERO, |s| s.elapsed());
        }
        Some(report)
    }
}

fn run(
    rx: &Receiver<Queued>,
    store: &dyn Store,
    refresher: &dyn Refresher,
    jobs: &Mutex<HashMap<u64, Tracked>>,
    metrics: &Metrics,
) {
    for q in rx.iter() {
        let started = Instant::now();
        if let Some(t) = lock(jobs).get_mut(&q.id) {
            t.report.state = State::Running;
            t.started = Some(started);
        }
        let result = store.invalidate(&q.job, &q.progress);
        let mut report = match lock(jobs).get(&q.id) {
            Some(t) => t.report.clone(),
            None => continue,
        };
        report.scanned = q.progress.scanned.load(Ordering::Relaxed);
        report.matched = q.progress.matched.load(Ordering::Relaxed);
        report.changed = q.progress.changed.load(Ordering::Relaxed);
        match result {
            Ok(outcome) => {
                report.state = State::Done;
                report.matched = outcome.matched;
                report.changed = outcome.changed;
                report.sample = outcome.sample;
                report.replicas = outcome.replicas;
                if q.job.mode == Mode::Refresh && !q.job.dry_run {
                    // One fetch at a time: a refresh never floods the origin.
                    for key in &outcome.to_refresh {
                        if let Some(key) = CacheKey::parse(key) {
                            if refresher.refresh(&key) {
                                report.changed += 1;
                                q.progress.changed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
            }
            Err(e) => {
                report.state = State::Failed;
                report.error = Some(e.to_string());
            }
        }
        report.elapsed = started.elapsed();
        let replicas = match report.replicas {
            Some((acked, wanted)) if acked < wanted => {
                warn!(
                    "invalidation {}: only {acked} of {wanted} replicas acknowledged in time",
                    report.id
                );
                format!(" replicas={acked}/{wanted}")
            }
            Some((acked, wanted)) => format!(" replicas={acked}/{wanted}"),
            None => String::new(),
        };
        info!(
            "invalidation {} by {}: {} mode={}{} matched={} changed={} scanned={} {} in {} ms{}",
            report.id,
            q.who,
            report.what,
            report.mode.as_str(),
            if report.dry_run { " dry-run" } else { "" },
            report.matched,
            report.changed,
            report.scanned,
            report.state.as_str(),
            report.elapsed.as_millis(),
            replicas
        );
        let outcome = match (report.state, report.dry_run) {
            (State::Failed, _) => "failed",
            (_, true) => "dry_run",
            _ => "done",
        };
        let mode = report.mode.as_str().to_string();
        metrics
            .invalidations
            .get_or_create(&vec![("mode", mode.clone()), ("outcome", outcome.into())])
            .inc();
        if !report.dry_run {
            let _ = metrics
                .invalidated_entries
                .get_or_create(&vec![("mode", mode)])
                .inc_by(report.changed);
        }
        if let Some(t) = lock(jobs).get_mut(&q.id) {
            t.report = report.clone();
        }
        let _ = q.done.send(report);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn literal_prefixes_are_exact() {
        let cases: &[(&str, Option<&str>)] = &[
            ("^/orgs/42/", Some("/orgs/42/")),
            ("^/orgs/42/users\\?page=\\d+", Some("/orgs/42/users?page=")),
            ("^/orgs/4?2", Some("/orgs/")),
            ("^/a|^/b", Some("/")),
            ("^/a|/b", None),
            ("^/(a|b)", Some("/")),
            ("/orgs/42/", None),
            ("^(?i)/Orgs", Some("/")),
            ("^.*", None),
        ];
        for (pattern, want) in cases {
            assert_eq!(literal_prefix(pattern).as_deref(), *want, "{pattern}");
        }
    }

    #[test]
    fn matchers_check_pattern_host_and_tag() {
        let m = Matcher::new(Some("^/orgs/42/"), Some("API.example.com:80"), None).unwrap();
        assert!(m.matches_key("http://api.example.com/orgs/42/users"));
        assert!(!m.matches_key("http://other.example.com/orgs/42/users"));
        assert!(!m.matches_key("http://api.example.com/orgs/420/users"));
        assert!(!m.matches_key("http://api.example.com/x/orgs/42/"));
        let anywhere = Matcher::new(Some("user=7(&|$)"), None, None).unwrap();
        assert!(anywhere.matches_key("http://a/list?org=1&user=7"));
        assert!(!anywhere.matches_key("http://a/list?user=70"));
        let tagged = Matcher::new(None, None, Some("org-42")).unwrap();
        assert!(tagged.matches_key("http://a/anything"));
        assert!(tagged.matches_tags(&["x".into(), "org-42".into()]));
        assert!(!tagged.matches_tags(&["org-4".into()]));
    }

    #[test]
    fn bad_requests_say_what_is_wrong() {
        let e = |p: Option<&str>, t: Option<&str>| Matcher::new(p, None, t).unwrap_err().0;
        assert!(e(None, None).contains("pattern, a tag"));
        assert!(e(Some(""), None).contains("empty"));
        assert!(e(Some("(unclosed"), None).contains("invalid pattern"));
        assert!(e(Some(&"a".repeat(5000)), None).contains("longer than"));
        // A pattern that compiles to more than the size limit: the regex error says so.
        assert!(e(Some("\\w{1000}\\w{1000}\\w{1000}"), None).contains("invalid pattern"));
        assert!(e(None, Some("two tags")).contains("invalid tag"));
    }

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
