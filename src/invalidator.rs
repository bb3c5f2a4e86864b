//! The invalidation thread: runs jobs one at a time from a bounded queue against a store
//! ([`Invalidator`]), keeps their reports for the admin API, cancels them, and fetches
//! the entries of `refresh` jobs again through a [`Refresher`] (the proxy).
//!
//! Invariants: the admin call returns only when the work is done (or, for `async`, at
//! once with an id); the queue is bounded and a full queue is refused, never waited on;
//! every job has a time budget and can be cancelled, and a store's scan checks both every
//! few hundred keys (`invalidation::Checkpoint`), so a job stops soon after either,
//! reporting what it did; a refresh fetches one key at a time, never flooding the
//! origin; the reports kept are bounded in number and bytes.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, Sender, TrySendError};
use log::{info, warn};

use crate::invalidation::{Job, Mode, Progress, Stop};
use crate::key::CacheKey;
use crate::metrics::Metrics;
use crate::store::Store;

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
    /// Other Echo nodes that acknowledged the job (Redis), and how many were waited for.
    pub nodes: Option<(u64, u64)>,
    /// What the job could not do as asked (Redis full), for the answer and the log.
    pub warnings: Vec<String>,
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
    /// Joined when the invalidator is dropped (see `Drop`); None after that.
    thread: Option<thread::JoinHandle<()>>,
}

/// Closes the queue, then joins the thread: it ends once the job it runs (bounded by
/// its timeout) is done. Never only dropping the handle: that detaches the thread while
/// it exits (the queue just closed), a race in which glibc's `pthread_detach` can read
/// the thread's stack after the thread has unmapped it. Seen once: a test process
/// killed by SIGSEGV in `pthread_detach` on the admin API's fetch thread, which dropped
/// the last reference to an invalidator.
impl Drop for Invalidator {
    fn drop(&mut self) {
        let (closed, _) = crossbeam_channel::bounded(1);
        drop(std::mem::replace(&mut self.queue, closed));
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
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
            thread: Some(thread),
        })
    }

    /// What is wrong with the invalidation thread, for `/health`: None when it runs
    /// and has room in its queue.
    pub fn health(&self) -> Option<String> {
        if self
            .thread
            .as_ref()
            .is_none_or(thread::JoinHandle::is_finished)
        {
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
            nodes: None,
            warnings: Vec::new(),
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

/// How long the invalidation thread idles before it does some of the store's upkeep.
const TIDY_EVERY: Duration = Duration::from_secs(1);

fn run(
    rx: &Receiver<Queued>,
    store: &dyn Store,
    refresher: &dyn Refresher,
    jobs: &Mutex<Jobs>,
    job_timeout: Duration,
    metrics: &Metrics,
) {
    loop {
        // Between jobs, the store's upkeep (Redis: tag sets trimmed of gone entries).
        let q = match rx.recv_timeout(TIDY_EVERY) {
            Ok(q) => q,
            Err(crossbeam_channel::RecvTimeoutError::Timeout) => {
                store.tidy();
                continue;
            }
            Err(crossbeam_channel::RecvTimeoutError::Disconnected) => return,
        };
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
                report.nodes = outcome.nodes;
                report.warnings = outcome.warnings;
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
        for w in &report.warnings {
            warn!("invalidation {}: {w}", report.id);
        }
        let mut reach = String::new();
        for (what, counts) in [("replicas", report.replicas), ("nodes", report.nodes)] {
            if let Some((acked, wanted)) = counts {
                if acked < wanted {
                    warn!(
                        "invalidation {}: only {acked} of {wanted} {what} acknowledged in time",
                        report.id
                    );
                }
                reach.push_str(&format!(" {what}={acked}/{wanted}"));
            }
        }
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
            reach,
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
    use crate::invalidation::{Checkpoint, JobOutcome, Matcher, MAX_PATTERN_BYTES, SAMPLE};

    fn matcher(pattern: &str) -> Matcher {
        Matcher::new(Some(pattern), None, None).unwrap()
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
        ) -> Result<JobOutcome, crate::store::StoreError> {
            let mut outcome = JobOutcome {
                sample: self.sample.clone(),
                matched: self.sample.len() as u64,
                ..JobOutcome::default()
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
}
