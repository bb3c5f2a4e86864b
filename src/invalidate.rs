//! Invalidation: which stored entries a request names ([`Matcher`]), what to do with them
//! ([`Mode`]), the bans that stop a fill begun before an invalidation from storing after
//! it ([`Bans`]), and the dedicated thread that runs jobs one at a time from a bounded
//! queue ([`Invalidator`]).
//!
//! Invariants: a pattern is a linear-time `regex` with a size limit, searched in the
//! stored request target (path and query); a job is banned (its generation recorded)
//! before any entry is touched, so an entry written after the ban is checked against it;
//! a ban keeps its source, never a compiled regex, and the bans are bounded; the admin
//! call returns only when the work is done (or, for `async`, at once with an id); the
//! queue is bounded and a full queue is refused, never waited on; every job has a time
//! budget and can be cancelled, and a store's scan checks both every few hundred keys
//! ([`Checkpoint`]), so a job stops soon after either, reporting what it did.

use std::collections::{BTreeMap, VecDeque};
use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, OnceLock};
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
/// Compiled-regex size limit (the regex's NFA): a pattern over it is refused. At 256 KiB
/// a pattern compiles in about 2 ms at most (1 MiB allowed 11 ms, and patterns like
/// `(?:.{0,30}a){0,30}Q`), and ordinary ones stay far below it (`^/orgs/\d+/` fits in
/// 16 KiB); the Unicode classes are what grow it, each copy tens of KiB (`\w{5}` fits,
/// `\w{10}` does not; `(?-u:\w){10}` or `[a-zA-Z0-9_]{10}` does).
///
/// A size limit does not bound the time a match takes (a small NFA can make the lazy DFA
/// thrash: `(?:a{0,30}a){0,30}[^a]` costs ~50 ms per 4 KB key). That is what a job's
/// time budget and cancel are for, and why no store matches under a lock.
const REGEX_SIZE_LIMIT: usize = 256 * 1024;
/// The lazy DFA's cache of a job's regex. A smaller cache is not safer, only slower:
/// it thrashes sooner (measured: 4x to 40x slower per key at 256 KiB on such patterns).
/// It lives as long as the job: bans and reports keep no compiled regex.
const REGEX_DFA_LIMIT: usize = 1 << 20;

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
                    .dfa_size_limit(REGEX_DFA_LIMIT)
                    .build()
                    .map_err(|e| match e {
                        regex::Error::CompiledTooBig(_) => BadRequest(format!(
                            "invalid pattern: it compiles to more than {} KiB; use fewer or \
                             shorter repetitions, and ASCII classes ((?-u:\\w), [0-9]) \
                             rather than Unicode ones (\\w, \\d, .) inside them",
                            REGEX_SIZE_LIMIT / 1024
                        )),
                        e => BadRequest(format!("invalid pattern: {e}")),
                    })?;
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

    /// Does the pattern name every stored entry (of its host, if one is given)? Then the
    /// request must say `"all": true`. A tag narrows it: such a matcher never does.
    ///
    /// Sound for the patterns people type by mistake: one that can match the empty
    /// string with no assertion around it (`(?:)`, `.*`, `x?`) matches at the start of
    /// every target; otherwise it is tried on probes that share nothing but the leading
    /// `/` every target has: the shortest target, and a long one made of characters no
    /// ordinary pattern asks for. `^`, `.`, `/`, `^/`, `a|.` match both; `^/orgs/` and
    /// `^/$` do not. A pattern that matches both probes without matching everything
    /// (`^/(?:$|~)`) also needs `all`: refusing is the safe side.
    pub fn matches_every_target(&self) -> bool {
        if self.tag.is_some() {
            return false;
        }
        let Some(regex) = &self.regex else {
            return false;
        };
        let empty_anywhere = regex_syntax::Parser::new()
            .parse(regex.as_str())
            .is_ok_and(|hir| {
                let props = hir.properties();
                props.minimum_len() == Some(0) && props.look_set().is_empty()
            });
        empty_anywhere || MATCH_ALL_PROBES.iter().all(|p| regex.is_match(p))
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

/// Request targets with nothing in common but their leading `/`: a pattern that matches
/// all of them is taken to match every target (see [`Matcher::matches_every_target`]).
const MATCH_ALL_PROBES: [&str; 2] = ["/", "/~%7E~.-_!$&'()*+,;=:@%25/~~~?~=~&~~=~~~~~~~~~~~~~~~~"];

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

/// Live counters of a running job, and what tells it to stop: a cancel flag and the
/// deadline of its time budget (set when it starts). Stores check it every few hundred
/// keys (see [`Checkpoint`]) and stop at the first check that fails.
#[derive(Debug, Default)]
pub struct Progress {
    pub scanned: AtomicU64,
    pub matched: AtomicU64,
    pub changed: AtomicU64,
    cancelled: AtomicBool,
    /// When the budget runs out, and the budget (for the report). Unset: no budget.
    deadline: OnceLock<(Instant, Duration)>,
}

impl Progress {
    /// The job starts now, with `budget` to finish in.
    pub fn start(&self, budget: Duration) {
        if let Some(deadline) = Instant::now().checked_add(budget) {
            let _ = self.deadline.set((deadline, budget));
        }
    }

    /// Asks the job to stop at its next check.
    pub fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    pub fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// Ok while the job may go on; why it must stop otherwise.
    pub fn check(&self) -> Result<(), Stop> {
        if self.is_cancelled() {
            return Err(Stop::Cancelled);
        }
        match self.deadline.get() {
            Some((deadline, budget)) if Instant::now() >= *deadline => {
                Err(Stop::OutOfTime(*budget))
            }
            _ => Ok(()),
        }
    }
}

/// Why a job stopped before it was done.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stop {
    /// `DELETE /invalidate/<id>`.
    Cancelled,
    /// Its time budget (`invalidation.job_timeout_ms`) ran out.
    OutOfTime(Duration),
}

impl fmt::Display for Stop {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Stop::Cancelled => f.write_str("cancelled (DELETE /invalidate/<id>)"),
            Stop::OutOfTime(budget) => write!(
                f,
                "stopped: ran out of its time budget of {} ms (invalidation.job_timeout_ms)",
                budget.as_millis()
            ),
        }
    }
}

/// Keys between two checks of a job, at most.
const CHECK_EVERY_KEYS: u32 = 256;
/// Key bytes between two checks, at most: a regex's cost grows with the text it reads
/// (a pathological pattern can take tens of ms per KiB), so long keys are checked
/// more often. Typical keys (tens of bytes) are checked every few dozen.
const CHECK_EVERY_BYTES: usize = 4096;

/// A scan's check of its job: [`Checkpoint::key`] before each key, which consults the
/// [`Progress`] every [`CHECK_EVERY_KEYS`] keys or [`CHECK_EVERY_BYTES`] bytes of keys,
/// whichever comes first (a clock read per key would cost more than most matches).
pub struct Checkpoint<'a> {
    progress: &'a Progress,
    keys: u32,
    bytes: usize,
}

impl<'a> Checkpoint<'a> {
    pub fn new(progress: &'a Progress) -> Checkpoint<'a> {
        Checkpoint {
            progress,
            keys: 0,
            bytes: 0,
        }
    }

    /// A key of `len` bytes is next: Err when the job must stop before it.
    pub fn key(&mut self, len: usize) -> Result<(), Stop> {
        self.keys += 1;
        self.bytes += len;
        if self.keys < CHECK_EVERY_KEYS && self.bytes < CHECK_EVERY_BYTES {
            return Ok(());
        }
        self.keys = 0;
        self.bytes = 0;
        self.progress.check()
    }
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
    /// Why the job stopped before it was done; the counts are what it did until then.
    pub stopped: Option<Stop>,
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
    /// Stopped by an error, or by its time budget; the report's `error` says which.
    Failed,
    /// Stopped by `DELETE /invalidate/<id>`, before it ran or at its next check.
    Cancelled,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Queued => "queued",
            State::Running => "running",
            State::Done => "done",
            State::Failed => "failed",
            State::Cancelled => "cancelled",
        }
    }

    /// Done, failed or cancelled: the report will not change again.
    pub fn is_final(self) -> bool {
        matches!(self, State::Done | State::Failed | State::Cancelled)
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
    /// A running job was asked to stop and has not reached its next check yet.
    pub cancel_requested: bool,
}

struct Tracked {
    report: Report,
    progress: Arc<Progress>,
    started: Option<Instant>,
    /// Where the final report goes (a `POST /invalidate` waiting for it); taken by
    /// whoever finishes the job: the thread, or a cancel while it is queued.
    done: Option<Sender<Report>>,
}

struct Queued {
    id: u64,
    job: Job,
    who: String,
    progress: Arc<Progress>,
}

/// Why a job was not taken.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refused {
    QueueFull,
    Stopped,
}

/// Why a job could not be cancelled.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CancelRefused {
    /// No such job, or its report was forgotten.
    Unknown,
    /// It already ended, in this state.
    Finished(State),
}

/// Keeps the reports of at most this many jobs for `GET /invalidate/<id>`...
const KEEP_REPORTS: usize = 1000;
/// ... and at most this many bytes of finished reports: one can carry a 4 KiB pattern
/// and 10 sample keys of up to 8 KiB each, so 1000 of those would be 85 MB.
const KEEP_REPORT_BYTES: usize = 4 << 20;

/// What keeping a report costs, roughly: its strings and the bookkeeping around it.
fn report_bytes(report: &Report) -> usize {
    std::mem::size_of::<Tracked>()
        + std::mem::size_of::<Progress>()
        + report.what.len()
        + report.error.as_ref().map_or(0, String::len)
        + report
            .sample
            .iter()
            .map(|k| k.len() + std::mem::size_of::<String>())
            .sum::<usize>()
}

/// Every job's report, by id (so by age), with its live counters and its waiter.
#[derive(Default)]
struct Jobs {
    by_id: BTreeMap<u64, Tracked>,
    /// The [`report_bytes`] of the finished reports kept.
    finished_bytes: usize,
}

impl Jobs {
    /// Forgets the oldest finished reports beyond the bounds; jobs not finished are
    /// kept (the queue bounds them).
    fn prune(&mut self) {
        while self.by_id.len() > KEEP_REPORTS || self.finished_bytes > KEEP_REPORT_BYTES {
            let oldest = self
                .by_id
                .iter()
                .find(|(_, t)| t.report.state.is_final())
                .map(|(id, _)| *id);
            let Some(forgotten) = oldest.and_then(|id| self.by_id.remove(&id)) else {
                break;
            };
            self.finished_bytes -= report_bytes(&forgotten.report);
        }
    }

    /// Records a job's final report and hands it to whoever waits for it.
    fn finish(&mut self, report: Report) {
        let Some(t) = self.by_id.get_mut(&report.id) else {
            return;
        };
        if let Some(done) = t.done.take() {
            // The waiter may have given up (answered 202): nobody to tell.
            let _ = done.try_send(report.clone());
        }
        if !t.report.state.is_final() {
            self.finished_bytes += report_bytes(&report);
            t.report = report;
        }
        self.prune();
    }
}

/// The queue, the thread that drains it, and the job reports.
pub struct Invalidator {
    queue: Sender<Queued>,
    next_id: AtomicU64,
    jobs: Arc<Mutex<Jobs>>,
    metrics: Arc<Metrics>,
    thread: thread::JoinHandle<()>,
}

fn lock(jobs: &Mutex<Jobs>) -> MutexGuard<'_, Jobs> {
    jobs.lock().unwrap_or_else(|p| p.into_inner())
}

impl Invalidator {
    /// Starts the invalidation thread; each job gets `job_timeout` to finish.
    pub fn start(
        store: Arc<dyn Store>,
        refresher: Arc<dyn Refresher>,
        queue_depth: usize,
        job_timeout: Duration,
        metrics: Arc<Metrics>,
    ) -> std::io::Result<Invalidator> {
        let (tx, rx) = bounded::<Queued>(queue_depth);
        // Every series exists from the start (at 0), so alerts on rates see it.
        for mode in [Mode::Delete, Mode::Refresh, Mode::Stale] {
            let mode = mode.as_str().to_string();
            for outcome in ["done", "failed", "cancelled", "dry_run"] {
                let _ = metrics
                    .invalidations
                    .get_or_create(&vec![("mode", mode.clone()), ("outcome", outcome.into())]);
            }
            let _ = metrics
                .invalidated_entries
                .get_or_create(&vec![("mode", mode)]);
        }
        let jobs: Arc<Mutex<Jobs>> = Arc::new(Mutex::new(Jobs::default()));
        let thread_jobs = Arc::clone(&jobs);
        let thread_metrics = Arc::clone(&metrics);
        let thread = thread::Builder::new()
            .name("echo-invalidate".into())
            .spawn(move || {
                run(
                    &rx,
                    store.as_ref(),
                    refresher.as_ref(),
                    &thread_jobs,
                    job_timeout,
                    &thread_metrics,
                )
            })?;
        Ok(Invalidator {
            queue: tx,
            next_id: AtomicU64::new(1),
            jobs,
            metrics,
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
            cancel_requested: false,
        };
        {
            let mut jobs = lock(&self.jobs);
            jobs.by_id.insert(
                id,
                Tracked {
                    report,
                    progress: Arc::clone(&progress),
                    started: None,
                    done: Some(done_tx),
                },
            );
            jobs.prune();
        }
        let queued = Queued {
            id,
            job,
            who: who.to_string(),
            progress,
        };
        match self.queue.try_send(queued) {
            Ok(()) => Ok((id, done_rx)),
            Err(e) => {
                lock(&self.jobs).by_id.remove(&id);
                Err(match e {
                    TrySendError::Full(_) => Refused::QueueFull,
                    TrySendError::Disconnected(_) => Refused::Stopped,
                })
            }
        }
    }

    /// How many reports are kept, and the bytes of the finished ones.
    #[cfg(test)]
    fn kept(&self) -> (usize, usize) {
        let jobs = lock(&self.jobs);
        (jobs.by_id.len(), jobs.finished_bytes)
    }

    /// A job's report, with live counters while it runs.
    pub fn report(&self, id: u64) -> Option<Report> {
        let jobs = lock(&self.jobs);
        let t = jobs.by_id.get(&id)?;
        Some(live_report(t))
    }

    /// Cancels a job: a queued one ends now (it will not run: the report says
    /// `cancelled`); a running one is asked to stop at its next check (the report says
    /// `running` with `cancel_requested` until it does).
    pub fn cancel(&self, id: u64) -> Result<Report, CancelRefused> {
        let mut jobs = lock(&self.jobs);
        let t = jobs.by_id.get_mut(&id).ok_or(CancelRefused::Unknown)?;
        match t.report.state {
            State::Queued => {
                t.progress.cancel();
                let mut report = t.report.clone();
                report.state = State::Cancelled;
                report.error = Some(Stop::Cancelled.to_string());
                jobs.finish(report.clone());
                drop(jobs);
                info!("invalidation {id}: {} cancelled before it ran", report.what);
                count(&self.metrics, &report);
                Ok(report)
            }
            State::Running => {
                t.progress.cancel();
                Ok(live_report(t))
            }
            state => Err(CancelRefused::Finished(state)),
        }
    }
}

/// A tracked job's report, with the live counters of a running one.
fn live_report(t: &Tracked) -> Report {
    let mut report = t.report.clone();
    if report.state == State::Running {
        report.scanned = t.progress.scanned.load(Ordering::Relaxed);
        report.matched = t.progress.matched.load(Ordering::Relaxed);
        report.changed = t.progress.changed.load(Ordering::Relaxed);
        report.elapsed = t.started.map_or(Duration::ZERO, |s| s.elapsed());
        report.cancel_requested = t.progress.is_cancelled();
    }
    report
}

/// Counts a finished job in the metrics.
fn count(metrics: &Metrics, report: &Report) {
    let outcome = match (report.state, report.dry_run) {
        (State::Failed, _) => "failed",
        (State::Cancelled, _) => "cancelled",
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
}

fn run(
    rx: &Receiver<Queued>,
    store: &dyn Store,
    refresher: &dyn Refresher,
    jobs: &Mutex<Jobs>,
    job_timeout: Duration,
    metrics: &Metrics,
) {
    for q in rx.iter() {
        let started = Instant::now();
        let mut report = {
            let mut jobs = lock(jobs);
            match jobs.by_id.get_mut(&q.id) {
                // Under the jobs lock, so a cancel sees it either queued or running.
                Some(t) if t.report.state == State::Queued => {
                    t.report.state = State::Running;
                    t.started = Some(started);
                    q.progress.start(job_timeout);
                    t.report.clone()
                }
                // Cancelled while queued (its report is final), or forgotten.
                _ => continue,
            }
        };
        let result = store.invalidate(&q.job, &q.progress);
        report.scanned = q.progress.scanned.load(Ordering::Relaxed);
        report.matched = q.progress.matched.load(Ordering::Relaxed);
        report.changed = q.progress.changed.load(Ordering::Relaxed);
        let stopped = match result {
            Ok(outcome) => {
                report.matched = outcome.matched;
                report.changed = outcome.changed;
                report.sample = outcome.sample;
                report.replicas = outcome.replicas;
                let mut stopped = outcome.stopped;
                if stopped.is_none() && q.job.mode == Mode::Refresh && !q.job.dry_run {
                    // One fetch at a time: a refresh never floods the origin.
                    for key in &outcome.to_refresh {
                        if let Err(stop) = q.progress.check() {
                            stopped = Some(stop);
                            break;
                        }
                        if let Some(key) = CacheKey::parse(key) {
                            if refresher.refresh(&key) {
                                report.changed += 1;
                                q.progress.changed.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                    }
                }
                stopped
            }
            Err(e) => {
                report.state = State::Failed;
                report.error = Some(e.to_string());
                None
            }
        };
        match stopped {
            Some(Stop::Cancelled) => report.state = State::Cancelled,
            Some(Stop::OutOfTime(_)) => report.state = State::Failed,
            None if report.state == State::Running => report.state = State::Done,
            None => {}
        }
        if let Some(stop) = stopped {
            report.error = Some(stop.to_string());
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
            "invalidation {} by {}: {} mode={}{} matched={} changed={} scanned={} {} in {} ms{}{}",
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
            replicas,
            report
                .error
                .as_ref()
                .map_or(String::new(), |e| format!(": {e}")),
        );
        count(metrics, &report);
        lock(jobs).finish(report);
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
        assert!(e(Some("\\w{10}"), None).contains("more than 256 KiB"));
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

    #[test]
    fn checkpoints_look_every_few_hundred_keys_or_few_kib() {
        let progress = Progress::default();
        progress.cancel();
        let mut short = Checkpoint::new(&progress);
        for _ in 1..CHECK_EVERY_KEYS {
            assert_eq!(short.key(10), Ok(()));
        }
        assert_eq!(short.key(10), Err(Stop::Cancelled));
        let mut long = Checkpoint::new(&progress);
        assert_eq!(long.key(CHECK_EVERY_BYTES), Err(Stop::Cancelled));
        let budget = Progress::default();
        assert_eq!(budget.check(), Ok(()), "no budget before the job starts");
        budget.start(Duration::ZERO);
        assert_eq!(budget.check(), Err(Stop::OutOfTime(Duration::ZERO)));
        assert!(Stop::OutOfTime(Duration::from_millis(300))
            .to_string()
            .contains("time budget of 300 ms (invalidation.job_timeout_ms)"));
    }

    /// A store whose jobs scan until they are stopped (or 10 s pass), and report
    /// `sample` as their matches.
    struct EndlessStore {
        sample: Vec<String>,
    }

    impl Store for EndlessStore {
        fn name(&self) -> &'static str {
            "endless"
        }
        fn get(&self, _: &CacheKey) -> Result<crate::store::Lookup, crate::store::StoreError> {
            Ok(crate::store::Lookup::default())
        }
        fn put(
            &self,
            _: &CacheKey,
            _: Arc<crate::store::Entry>,
            _: u64,
        ) -> Result<bool, crate::store::StoreError> {
            Ok(false)
        }
        fn remove(&self, _: &CacheKey) -> Result<usize, crate::store::StoreError> {
            Ok(0)
        }
        fn invalidate(
            &self,
            job: &Job,
            progress: &Progress,
        ) -> Result<Outcome, crate::store::StoreError> {
            let mut outcome = Outcome {
                sample: self.sample.clone(),
                matched: self.sample.len() as u64,
                ..Outcome::default()
            };
            if job.dry_run {
                return Ok(outcome);
            }
            let give_up = Instant::now() + Duration::from_secs(10);
            let mut checkpoint = Checkpoint::new(progress);
            while Instant::now() < give_up {
                progress.scanned.fetch_add(1, Ordering::Relaxed);
                if let Err(stop) = checkpoint.key(100) {
                    outcome.stopped = Some(stop);
                    break;
                }
                thread::yield_now();
            }
            Ok(outcome)
        }
    }

    struct NoRefresh;

    impl Refresher for NoRefresh {
        fn refresh(&self, _: &CacheKey) -> bool {
            false
        }
    }

    fn invalidator(sample: Vec<String>, job_timeout: Duration) -> Invalidator {
        Invalidator::start(
            Arc::new(EndlessStore { sample }),
            Arc::new(NoRefresh),
            8,
            job_timeout,
            Metrics::new(),
        )
        .unwrap()
    }

    fn job(pattern: &str, dry_run: bool) -> Job {
        Job {
            matcher: Arc::new(matcher(pattern)),
            mode: Mode::Delete,
            dry_run,
        }
    }

    fn wait_for(inv: &Invalidator, id: u64, state: State) -> Report {
        let give_up = Instant::now() + Duration::from_secs(10);
        loop {
            let report = inv.report(id).unwrap();
            if report.state == state {
                return report;
            }
            assert!(
                Instant::now() < give_up,
                "job {id} never {state:?}: {report:?}"
            );
            thread::sleep(Duration::from_millis(2));
        }
    }

    #[test]
    fn cancels_end_queued_jobs_at_once_and_running_ones_at_their_next_check() {
        let inv = invalidator(Vec::new(), Duration::from_secs(3600));
        let (running, running_done) = inv.submit(job("^/a", false), "test").unwrap();
        wait_for(&inv, running, State::Running);
        let (queued, queued_done) = inv.submit(job("^/b", false), "test").unwrap();
        let report = inv.cancel(queued).unwrap();
        assert_eq!(report.state, State::Cancelled);
        // Its waiter hears at once, though the thread is busy with the other job.
        let told = queued_done.recv_timeout(Duration::from_secs(1)).unwrap();
        assert_eq!(told.state, State::Cancelled);
        let report = inv.cancel(running).unwrap();
        assert_eq!(
            (report.state, report.cancel_requested),
            (State::Running, true)
        );
        let told = running_done.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(told.state, State::Cancelled);
        assert!(told.scanned > 0);
        assert_eq!(
            told.error.as_deref(),
            Some("cancelled (DELETE /invalidate/<id>)")
        );
        assert_eq!(
            inv.cancel(running).unwrap_err(),
            CancelRefused::Finished(State::Cancelled)
        );
        assert_eq!(inv.cancel(999).unwrap_err(), CancelRefused::Unknown);
        // The cancelled queued job never ran.
        assert_eq!(inv.report(queued).unwrap().scanned, 0);
    }

    #[test]
    fn a_job_out_of_its_budget_fails_naming_it() {
        let inv = invalidator(Vec::new(), Duration::from_millis(50));
        let (_, done) = inv.submit(job("^/a", false), "test").unwrap();
        let report = done.recv_timeout(Duration::from_secs(10)).unwrap();
        assert_eq!(report.state, State::Failed);
        assert!(report.scanned > 0);
        assert!(report.elapsed >= Duration::from_millis(50));
        assert!(report.error.unwrap().contains("time budget of 50 ms"));
    }

    #[test]
    fn finished_reports_are_bounded_in_bytes_oldest_forgotten_first() {
        // Issue 13 finding 7: the Invalidator kept 1000 reports whatever their size,
        // each with up to a 4 KiB pattern and 10 sample keys of up to 8 KiB (85 MB).
        let sample: Vec<String> = (0..SAMPLE)
            .map(|i| format!("http://a/{i}/{}", "k".repeat(8 * 1024)))
            .collect();
        let inv = invalidator(sample, Duration::from_secs(3600));
        let mut last = 0;
        for i in 0..200 {
            let pattern = format!("^/{i}/{}", "p".repeat(MAX_PATTERN_BYTES - 16));
            let (id, done) = inv.submit(job(&pattern, true), "test").unwrap();
            let report = done.recv_timeout(Duration::from_secs(10)).unwrap();
            assert_eq!(report.state, State::Done);
            let (count, bytes) = inv.kept();
            assert!(bytes <= KEEP_REPORT_BYTES, "{count} reports, {bytes} bytes");
            last = id;
        }
        let (count, _) = inv.kept();
        assert!((20..200).contains(&count), "{count} reports kept");
        assert!(inv.report(1).is_none(), "the oldest is forgotten first");
        let newest = inv.report(last).unwrap();
        assert_eq!(newest.sample.len(), SAMPLE, "the newest is kept whole");
    }

    #[test]
    fn patterns_are_bounded_in_size_and_ordinary_ones_fit() {
        // Issue 13 finding 7: with a 1 MiB limit, `(?:.{0,30}a){0,30}Q` compiled (11 ms)
        // and cost ~90 ms per 4 KB key, under the memory store's lock.
        for pattern in [r"(?:.{0,30}a){0,30}Q", r".{300}", r"\d{64}", r"\w{10}"] {
            let err = Matcher::new(Some(pattern), None, None).unwrap_err().0;
            assert!(
                err.contains("compiles to more than 256 KiB"),
                "{pattern}: {err}"
            );
        }
        for pattern in [
            r"^/orgs/42/",
            r"^/orgs/1\d\d/",
            r"user=7(&|$)",
            r"(?i)^/api/v[0-9]+/(users|orgs|teams)/[0-9]+(/.*)?$",
            r"(?i)^/(?:api|v1|v2)/users/\w+/(?:posts|comments)/\d+",
            r"^/(?:[a-z0-9-]+/){3}\d+$",
            r"[^/]+/[^/]+/[^/]+\?.*page=\d+",
            r"^/assets/(?-u:\w){32}\.js$",
            r"^/assets/[a-f0-9]{64}\.",
            r"\w{5}",
            r".{100}",
        ] {
            assert!(Matcher::new(Some(pattern), None, None).is_ok(), "{pattern}");
        }
    }

    #[test]
    fn patterns_that_match_everything_are_recognised() {
        // Issue 13 finding 10: `(?:)`, `.` or `^` invalidated the whole cache without
        // anything in the request saying that was meant.
        for pattern in [
            "(?:)", "^", ".", "/", "^/", ".*", "a|.", "$", "x?", "^.", "(?i)/", "[^a-z]", r"\A/",
            r"(?m)^", ".+", "^/.*$", "(?s).",
        ] {
            assert!(matcher(pattern).matches_every_target(), "{pattern}");
            let on_one_host = Matcher::new(Some(pattern), Some("a.example"), None).unwrap();
            assert!(on_one_host.matches_every_target(), "{pattern} on a host");
        }
        for pattern in [
            "^/orgs/",
            "^/$",
            "^$",
            "/orgs/42/",
            r"user=7(&|$)",
            "a",
            r"\?",
            r"^/\d",
            "^/orgs/42/|^/users/7$",
            r"\bfoo\b",
        ] {
            assert!(!matcher(pattern).matches_every_target(), "{pattern}");
        }
        // A tag narrows it; a tag alone is never "everything".
        let tagged = Matcher::new(Some("."), None, Some("org-42")).unwrap();
        assert!(!tagged.matches_every_target());
        let tag_only = Matcher::new(None, None, Some("org-42")).unwrap();
        assert!(!tag_only.matches_every_target());
    }
}
