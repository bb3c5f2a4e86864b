//! What one invalidation asks of a store and what the store answers: the [`Job`] (a
//! matcher, a [`Mode`], a dry run), its live [`Progress`] with the cancel flag and the
//! time budget, the [`Checkpoint`] a store's scan consults, and the [`JobOutcome`].
//!
//! Invariants: a store's scan checks the progress every few hundred keys or few KiB of
//! keys ([`Checkpoint`]), so a job stops soon after a cancel or the end of its budget,
//! and its outcome then reports what it did until it stopped; the counters are atomics,
//! written by the store and read live by the invalidation thread.

use std::fmt;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, Instant};

use super::matcher::Matcher;

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
    pub(crate) fn start(&self, budget: Duration) {
        if let Some(deadline) = Instant::now().checked_add(budget) {
            let _ = self.deadline.set((deadline, budget));
        }
    }

    /// Asks the job to stop at its next check.
    pub(crate) fn cancel(&self) {
        self.cancelled.store(true, Ordering::Relaxed);
    }

    pub(crate) fn is_cancelled(&self) -> bool {
        self.cancelled.load(Ordering::Relaxed)
    }

    /// Ok while the job may go on; why it must stop otherwise.
    pub(crate) fn check(&self) -> Result<(), Stop> {
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
pub(crate) struct Checkpoint<'a> {
    progress: &'a Progress,
    keys: u32,
    bytes: usize,
}

impl<'a> Checkpoint<'a> {
    pub(crate) fn new(progress: &'a Progress) -> Checkpoint<'a> {
        Checkpoint {
            progress,
            keys: 0,
            bytes: 0,
        }
    }

    /// A key of `len` bytes is next: Err when the job must stop before it.
    pub(crate) fn key(&mut self, len: usize) -> Result<(), Stop> {
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
pub struct JobOutcome {
    pub matched: u64,
    /// Deleted or marked stale (0 for refresh and dry runs: see `refresh`).
    pub changed: u64,
    /// A few matching keys, for dry runs.
    pub sample: Vec<String>,
    /// For refresh: the matching keys, to fetch again.
    pub to_refresh: Vec<String>,
    /// Replicas that acknowledged the changes (Redis), and how many were asked for.
    pub replicas: Option<(u64, u64)>,
    /// Other Echo nodes that acknowledged the job before it returned (Redis), and how
    /// many were waited for.
    pub nodes: Option<(u64, u64)>,
    /// Why the job stopped before it was done; the counts are what it did until then.
    pub stopped: Option<Stop>,
    /// What the job could not do as asked, and what it did instead (Redis full).
    pub warnings: Vec<String>,
}

/// Sample size returned by dry runs.
pub(crate) const SAMPLE: usize = 10;

#[cfg(test)]
mod tests {
    use super::*;

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
}
