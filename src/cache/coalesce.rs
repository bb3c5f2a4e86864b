//! Request coalescing: at most one origin fetch per cache key at a time on this node.
//!
//! The first request to [`Coalescer::subscribe`] to a key leads and gets a [`Permit`];
//! later requests for the same key follow ([`Follower`]): they wait, holding no thread
//! (the front end keeps them, and is woken when the leader finishes), then act on its
//! [`Outcome`] (look the response up in the store, or go to the origin themselves).
//! There is no cap on how many wait, beyond the connections a server takes.
//!
//! Invariants:
//! - One leader per key: a flight is inserted into the map only when the key has none,
//!   under the map lock, and only its permit removes it.
//! - A finished flight is never joined: the permit removes its flight from the map
//!   *before* publishing the outcome, so a request arriving afterwards leads a new
//!   flight, and a waiter woken with an outcome returns it without waiting again.
//! - Followers wait as long as the leader is alive: every flight has a deadline, which
//!   the leader pushes on as it makes progress ([`Permit::extend`]: the origin's own
//!   timeouts, each body read); a leader stuck past it is left ([`Join::TimedOut`]).
//! - A dropped leader never wedges a key: dropping a [`Permit`] without `finish` (error
//!   path, panic unwinding) releases the flight with [`Outcome::Failed`].
//! - No lost wake-ups: the outcome and the wakers live under the flight's mutex; a
//!   waker registered after the outcome is called at once, and blocking waiters re-check
//!   the outcome after every (possibly spurious) wake-up.
//! - The map lock is held only for map lookups and updates, never while a leader
//!   fetches or a follower waits. Lock order is map, then flight. A lock poisoned by a
//!   panic elsewhere is recovered: every critical section leaves its data consistent
//!   before anything in it can panic.
//!
//! It must not do I/O, and knows nothing of HTTP or stores: keys are opaque strings.

use std::cell::Cell;
use std::collections::HashMap;
use std::fmt;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What a leader's fetch produced, as followers need to know it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The response was stored: followers look it up in the store.
    Stored,
    /// The response may not be shared (private, Set-Cookie, uncacheable, too large):
    /// followers go to the origin themselves, at once and side by side.
    NotShared,
    /// The fetch failed, or the leader went away (panic, dropped permit): followers fetch
    /// themselves.
    Failed,
}

/// How a follower's wait ended.
#[derive(Debug)]
pub enum Join {
    /// This request leads (the blocking `join` of the unit tests).
    #[cfg(test)]
    Leader(Permit),
    /// The leader finished with this outcome while this request waited `waited`.
    Followed { outcome: Outcome, waited: Duration },
    /// The leader made no progress within its deadline (stuck past the origin's own
    /// timeouts) while this request waited `waited`.
    TimedOut { waited: Duration },
}

/// How `subscribe` ended.
#[derive(Debug)]
pub enum Subscribe {
    /// This request leads: fetch, then `permit.finish(outcome)`. Dropping the permit
    /// without finishing (error path, panic unwinding) releases the waiters with `Failed`.
    Leader(Permit),
    /// Another request leads: wait for it with the [`Follower`].
    Follower(Follower),
}

/// A request waiting for another's fetch of its key, without a thread: its
/// [`FlightWatch`] tells when the leader finishes and until when to wait (pushed on as
/// the leader makes progress), and it ends with what came of it ([`Follower::end`]).
/// Dropped, it stops counting as a waiter.
pub struct Follower {
    flight: Arc<Flight>,
    started: Instant,
    coalesced: Arc<AtomicU64>,
}

/// What a follower waits for, apart from the follower (which goes with its job).
pub struct FlightWatch(Arc<Flight>);

impl FlightWatch {
    /// Calls `wake` once when the leader finishes (now, if it has).
    pub fn on_done(&self, wake: Box<dyn FnOnce() + Send>) {
        let mut state = self.0.lock();
        if state.outcome.is_some() {
            drop(state);
            wake();
        } else {
            state.wakers.push(wake);
        }
    }

    /// Until when to wait for the leader (read again when it passes: the leader may
    /// have pushed it on).
    pub fn deadline(&self) -> Instant {
        self.0.lock().deadline
    }
}

impl Follower {
    /// What it waits for, to hand to whoever waits for it.
    pub fn watch(&self) -> FlightWatch {
        FlightWatch(Arc::clone(&self.flight))
    }

    /// What the wait came to: the leader's outcome, or `TimedOut` if it has none yet.
    pub fn end(self) -> Join {
        let waited = self.started.elapsed();
        match self.flight.lock().outcome {
            Some(outcome) => {
                self.coalesced.fetch_add(1, Ordering::Relaxed);
                Join::Followed { outcome, waited }
            }
            None => Join::TimedOut { waited },
        }
    }

    /// Blocks until the leader finishes or the deadline passes, then `end`s.
    #[cfg(test)]
    fn wait(self) -> Join {
        let mut state = self.flight.lock();
        // Checked before the deadline: an outcome that arrived is always taken.
        while state.outcome.is_none() {
            // Read again after every wake-up: the leader may have pushed it on.
            let remaining = state.deadline.saturating_duration_since(Instant::now());
            if remaining.is_zero() {
                break;
            }
            state = match self.flight.done.wait_timeout(state, remaining) {
                Ok((guard, _)) => guard,
                Err(p) => p.into_inner().0,
            };
        }
        drop(state);
        self.end()
    }
}

impl Drop for Follower {
    fn drop(&mut self) {
        self.flight.lock().waiters -= 1;
    }
}

impl fmt::Debug for Follower {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Follower")
            .field("started", &self.started)
            .finish()
    }
}

/// The flights in progress, by cache key.
type Flights = Mutex<HashMap<String, Arc<Flight>>>;

/// One leader's fetch of one key, as its followers see it.
struct Flight {
    state: Mutex<FlightState>,
    /// Signalled once, when the outcome is set.
    done: Condvar,
}

struct FlightState {
    /// Set once by the permit, after the flight has left the map.
    outcome: Option<Outcome>,
    /// Followers blocked on this flight right now.
    waiters: usize,
    /// Followers give up waiting at this time, unless the leader pushes it on.
    deadline: Instant,
    /// What to call when the outcome is set (followers waiting without a thread).
    wakers: Vec<Box<dyn FnOnce() + Send>>,
}

impl Flight {
    fn new(deadline: Instant) -> Flight {
        Flight {
            state: Mutex::new(FlightState {
                outcome: None,
                waiters: 0,
                deadline,
                wakers: Vec::new(),
            }),
            done: Condvar::new(),
        }
    }

    fn lock(&self) -> MutexGuard<'_, FlightState> {
        // Each critical section writes whole fields only: recover a poisoned lock.
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn lock_flights(flights: &Flights) -> MutexGuard<'_, HashMap<String, Arc<Flight>>> {
    // Map updates are single insert/remove calls: a poisoned map is still consistent.
    flights.lock().unwrap_or_else(|p| p.into_inner())
}

/// One fetch per key at a time: shared (as `Arc`) by all worker threads.
pub struct Coalescer {
    /// Shared with every [`Permit`], which removes its own flight.
    flights: Arc<Flights>,
    /// A new flight's deadline, from its start: the leader pushes it on from there.
    allowance: Duration,
    coalesced: Arc<AtomicU64>,
}

impl Coalescer {
    /// A coalescer whose followers wait for a leader `allowance` from its start, and
    /// longer as the leader extends it (zero: followers time out at once).
    pub fn new(allowance: Duration) -> Coalescer {
        Coalescer {
            flights: Arc::new(Mutex::new(HashMap::new())),
            allowance,
            coalesced: Arc::new(AtomicU64::new(0)),
        }
    }

    /// Joins the fetch of `key` (the cache key string): leads it, or follows the
    /// request that does, without waiting ([`Follower`]).
    pub fn subscribe(&self, key: &str) -> Subscribe {
        let start = Instant::now();
        let mut flights = lock_flights(&self.flights);
        let flight = match flights.get(key) {
            Some(flight) => Arc::clone(flight),
            None => {
                let flight = Arc::new(Flight::new(start + self.allowance));
                flights.insert(key.to_owned(), Arc::clone(&flight));
                drop(flights);
                return Subscribe::Leader(Permit {
                    flight,
                    key: key.to_owned(),
                    flights: Arc::clone(&self.flights),
                    released: Cell::new(false),
                });
            }
        };
        // Counted under the map lock (a follower is never missed by `waiting`).
        flight.lock().waiters += 1;
        drop(flights);
        Subscribe::Follower(Follower {
            flight,
            started: start,
            coalesced: Arc::clone(&self.coalesced),
        })
    }

    /// Joins the fetch of `key`, blocking (condvar, with timeout) when another request
    /// leads: the followers of the unit tests, which are threads.
    #[cfg(test)]
    pub fn join(&self, key: &str) -> Join {
        match self.subscribe(key) {
            Subscribe::Leader(permit) => Join::Leader(permit),
            Subscribe::Follower(follower) => follower.wait(),
        }
    }

    /// Requests that followed a leader so far (`Join::Followed`).
    #[cfg(test)]
    fn coalesced(&self) -> u64 {
        self.coalesced.load(Ordering::Relaxed)
    }

    /// Keys with a fetch in flight right now.
    #[cfg(test)]
    fn in_flight(&self) -> usize {
        lock_flights(&self.flights).len()
    }

    /// Followers blocked on `key` right now.
    #[cfg(test)]
    fn waiting(&self, key: &str) -> usize {
        let flight = lock_flights(&self.flights).get(key).map(Arc::clone);
        flight.map_or(0, |f| f.lock().waiters)
    }
}

/// The right (and duty) to fetch a key for everyone waiting on it. `Send`: the leader
/// may finish on any thread.
pub struct Permit {
    flight: Arc<Flight>,
    key: String,
    flights: Arc<Flights>,
    released: Cell<bool>,
}

impl Permit {
    /// Ends the flight: removes it from the map, then wakes the waiters with `outcome`.
    /// Only the first call counts (a leader that knows early that its answer cannot be
    /// shared releases its followers then, and finishes again at the end).
    pub fn finish(&self, outcome: Outcome) {
        if self.released.replace(true) {
            return;
        }
        {
            let mut flights = lock_flights(&self.flights);
            // Only this permit removes its flight, so the entry is ours; the check keeps
            // a newer flight safe should that ever change.
            if flights
                .get(&self.key)
                .is_some_and(|f| Arc::ptr_eq(f, &self.flight))
            {
                flights.remove(&self.key);
            }
        }
        let mut state = self.flight.lock();
        state.outcome = Some(outcome);
        let wakers = std::mem::take(&mut state.wakers);
        drop(state);
        self.flight.done.notify_all();
        // Outside the lock: a waker may do anything but wait on this flight.
        for wake in wakers {
            wake();
        }
    }

    /// The leader is alive and making progress: its followers wait `by` from now at
    /// least (a deadline is never moved earlier).
    pub fn extend(&self, by: Duration) {
        let until = Instant::now() + by;
        let mut state = self.flight.lock();
        if until > state.deadline {
            state.deadline = until;
        }
    }

    /// Whether `finish` was called.
    pub fn finished(&self) -> bool {
        self.released.get()
    }

    /// The cache key this permit leads.
    #[cfg(test)]
    fn key(&self) -> &str {
        &self.key
    }
}

impl Drop for Permit {
    /// A leader that never finished (error path, panic unwinding) failed: release its
    /// waiters so they fetch themselves, and free the key for a new leader.
    fn drop(&mut self) {
        self.finish(Outcome::Failed);
    }
}

impl fmt::Debug for Permit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Permit")
            .field("key", &self.key)
            .field("released", &self.released.get())
            .finish()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Barrier;
    use std::thread;

    use crossbeam_channel::{bounded, unbounded};

    /// Long enough never to expire in a test that expects a wake-up.
    const LONG: Duration = Duration::from_secs(10);
    /// Deadline for the test's own waits (channels, waiter counts).
    const DEADLINE: Duration = Duration::from_secs(10);

    fn assert_send_sync<T: Send + Sync>() {}
    fn assert_send<T: Send>() {}

    /// Waits until `n` followers block on `key`; panics after `DEADLINE`.
    fn wait_for_waiters(c: &Coalescer, key: &str, n: usize) {
        let deadline = Instant::now() + DEADLINE;
        while c.waiting(key) < n {
            assert!(Instant::now() < deadline, "{n} waiters on {key} never came");
            thread::yield_now();
        }
    }

    fn leader(join: Join) -> Permit {
        match join {
            Join::Leader(p) => p,
            other => panic!("expected Leader, got {other:?}"),
        }
    }

    fn followed(join: Join) -> Outcome {
        match join {
            Join::Followed { outcome, .. } => outcome,
            other => panic!("expected Followed, got {other:?}"),
        }
    }

    /// Spawns a thread that joins `key` and returns how that ended.
    fn spawn_join(c: &Arc<Coalescer>, key: &'static str) -> thread::JoinHandle<Join> {
        let c = Arc::clone(c);
        thread::spawn(move || c.join(key))
    }

    #[test]
    fn shared_across_threads() {
        assert_send_sync::<Coalescer>();
        assert_send::<Permit>();
    }

    #[test]
    fn fifty_requests_one_fetch() {
        const N: usize = 50;
        let c = Arc::new(Coalescer::new(LONG));
        let barrier = Arc::new(Barrier::new(N));
        let (lead_tx, lead_rx) = unbounded();
        let (go_tx, go_rx) = bounded::<Outcome>(1);
        let handles: Vec<_> = (0..N)
            .map(|_| {
                let (c, barrier) = (Arc::clone(&c), Arc::clone(&barrier));
                let (lead_tx, go_rx) = (lead_tx.clone(), go_rx.clone());
                thread::spawn(move || {
                    // All threads race for the key at once.
                    barrier.wait();
                    match c.join("k") {
                        Join::Leader(permit) => {
                            lead_tx.send(()).unwrap();
                            // Holds the permit (the "fetch") until the test says.
                            let outcome = go_rx.recv_timeout(DEADLINE).unwrap();
                            permit.finish(outcome);
                            None
                        }
                        other => Some(other),
                    }
                })
            })
            .collect();
        lead_rx.recv_timeout(DEADLINE).unwrap();
        wait_for_waiters(&c, "k", N - 1);
        assert_eq!(c.in_flight(), 1);
        go_tx.send(Outcome::Stored).unwrap();

        let results: Vec<_> = handles.into_iter().map(|h| h.join().unwrap()).collect();
        assert_eq!(results.iter().filter(|r| r.is_none()).count(), 1);
        for r in results.into_iter().flatten() {
            assert_eq!(followed(r), Outcome::Stored);
        }
        assert_eq!(c.coalesced(), (N - 1) as u64);
        assert_eq!(c.in_flight(), 0);
        assert!(lead_rx.try_recv().is_err(), "a second leader");
    }

    #[test]
    fn arrival_after_finish_leads_a_new_flight() {
        let c = Coalescer::new(LONG);
        leader(c.join("k")).finish(Outcome::NotShared);
        assert_eq!(c.in_flight(), 0);
        let permit = leader(c.join("k"));
        assert_eq!(permit.key(), "k");
        assert_eq!(c.in_flight(), 1);
    }

    #[test]
    fn not_shared_reaches_followers() {
        let c = Arc::new(Coalescer::new(LONG));
        let permit = leader(c.join("k"));
        let follower = spawn_join(&c, "k");
        wait_for_waiters(&c, "k", 1);
        permit.finish(Outcome::NotShared);
        assert_eq!(followed(follower.join().unwrap()), Outcome::NotShared);
    }

    #[test]
    fn dropped_permit_releases_waiters_with_failed() {
        let c = Arc::new(Coalescer::new(LONG));
        let permit = leader(c.join("k"));
        let followers: Vec<_> = (0..3).map(|_| spawn_join(&c, "k")).collect();
        wait_for_waiters(&c, "k", 3);
        drop(permit);
        for f in followers {
            match f.join().unwrap() {
                Join::Followed { outcome, waited } => {
                    assert_eq!(outcome, Outcome::Failed);
                    assert!(waited < LONG);
                }
                other => panic!("expected Followed, got {other:?}"),
            }
        }
        assert_eq!(c.in_flight(), 0);
        // Not wedged: the next request leads.
        let _permit = leader(c.join("k"));
    }

    #[test]
    fn panicking_leader_releases_waiters_with_failed() {
        let c = Arc::new(Coalescer::new(LONG));
        let (lead_tx, lead_rx) = bounded(1);
        let (go_tx, go_rx) = bounded::<()>(1);
        let leader_thread = {
            let c = Arc::clone(&c);
            thread::spawn(move || {
                let _permit = leader(c.join("k"));
                lead_tx.send(()).unwrap();
                go_rx.recv_timeout(DEADLINE).unwrap();
                panic!("leader dies mid-fetch (expected by the test)");
            })
        };
        lead_rx.recv_timeout(DEADLINE).unwrap();
        let follower = spawn_join(&c, "k");
        wait_for_waiters(&c, "k", 1);
        go_tx.send(()).unwrap();
        assert!(leader_thread.join().is_err());
        assert_eq!(followed(follower.join().unwrap()), Outcome::Failed);
        assert_eq!(c.in_flight(), 0);
        leader(c.join("k")).finish(Outcome::Stored);
    }

    #[test]
    fn panic_caught_in_place_releases_waiters() {
        let c = Arc::new(Coalescer::new(LONG));
        let permit = leader(c.join("k"));
        let follower = spawn_join(&c, "k");
        wait_for_waiters(&c, "k", 1);
        let caught = std::panic::catch_unwind(std::panic::AssertUnwindSafe(move || {
            let _permit = permit;
            panic!("leader dies mid-fetch (expected by the test)");
        }));
        assert!(caught.is_err());
        assert_eq!(followed(follower.join().unwrap()), Outcome::Failed);
        let _permit = leader(c.join("k"));
    }

    #[test]
    fn follower_times_out() {
        let wait = Duration::from_millis(100);
        let c = Arc::new(Coalescer::new(wait));
        let permit = leader(c.join("k"));
        let follower = {
            let c = Arc::clone(&c);
            thread::spawn(move || {
                let start = Instant::now();
                (c.join("k"), start.elapsed())
            })
        };
        let (join, took) = follower.join().unwrap();
        assert!(matches!(join, Join::TimedOut { .. }), "got {join:?}");
        // The leader's deadline, counted from its start (a moment before this join).
        assert!(
            took >= wait / 2 && took < Duration::from_secs(1),
            "took {took:?}"
        );
        // The timed-out follower left the queue; the flight goes on.
        assert_eq!(c.waiting("k"), 0);
        assert_eq!(c.in_flight(), 1);
        permit.finish(Outcome::Stored);
        assert_eq!(c.in_flight(), 0);
        assert_eq!(c.coalesced(), 0);
    }

    #[test]
    fn zero_wait_times_out_at_once() {
        let c = Coalescer::new(Duration::ZERO);
        let _permit = leader(c.join("k"));
        assert!(matches!(c.join("k"), Join::TimedOut { .. }));
    }

    #[test]
    fn a_leader_that_extends_keeps_its_followers_past_the_first_deadline() {
        let first = Duration::from_millis(100);
        let c = Arc::new(Coalescer::new(first));
        let permit = leader(c.join("k"));
        let follower = spawn_join(&c, "k");
        wait_for_waiters(&c, "k", 1);
        // Alive for three times the first deadline, pushing it on as a fetch does.
        let started = Instant::now();
        while started.elapsed() < first * 3 {
            permit.extend(first);
            thread::sleep(first / 4);
        }
        assert_eq!(c.waiting("k"), 1, "the follower left a live leader");
        permit.finish(Outcome::Stored);
        assert_eq!(followed(follower.join().unwrap()), Outcome::Stored);
    }

    #[test]
    fn finishing_early_releases_followers_once() {
        let c = Arc::new(Coalescer::new(LONG));
        let permit = leader(c.join("k"));
        let follower = spawn_join(&c, "k");
        wait_for_waiters(&c, "k", 1);
        permit.finish(Outcome::NotShared);
        assert!(permit.finished());
        assert_eq!(followed(follower.join().unwrap()), Outcome::NotShared);
        // A new flight began meanwhile: the old permit's later calls leave it alone.
        let next = leader(c.join("k"));
        permit.finish(Outcome::Failed);
        drop(permit);
        assert_eq!(c.in_flight(), 1);
        next.finish(Outcome::Stored);
    }

    /// Many more followers than any pool has threads all follow one leader.
    #[test]
    fn three_hundred_followers_one_leader() {
        let c = Arc::new(Coalescer::new(LONG));
        let permit = leader(c.join("k"));
        let followers: Vec<_> = (0..300).map(|_| spawn_join(&c, "k")).collect();
        wait_for_waiters(&c, "k", 300);
        permit.finish(Outcome::Stored);
        for f in followers {
            assert_eq!(followed(f.join().unwrap()), Outcome::Stored);
        }
        assert_eq!(c.coalesced(), 300);
    }

    #[test]
    fn different_keys_do_not_block_each_other() {
        let c = Arc::new(Coalescer::new(LONG));
        let a = leader(c.join("a"));
        let follower = spawn_join(&c, "a");
        wait_for_waiters(&c, "a", 1);
        // A follower waits on "a": "b" still gets its own leader at once.
        let b = leader(c.join("b"));
        assert_eq!(c.in_flight(), 2);
        b.finish(Outcome::Stored);
        assert_eq!(c.in_flight(), 1);
        a.finish(Outcome::Failed);
        assert_eq!(followed(follower.join().unwrap()), Outcome::Failed);
        assert_eq!(c.in_flight(), 0);
    }

    /// Runs `flights` flights with `followers` follower threads each and returns, per
    /// flight, how long after `finish` was called the *last* follower woke.
    fn wake_latencies(followers: usize, flights: usize) -> Vec<Duration> {
        let c = Arc::new(Coalescer::new(LONG));
        let (woke_tx, woke_rx) = unbounded::<(Join, Instant)>();
        let (key_txs, threads): (Vec<_>, Vec<_>) = (0..followers)
            .map(|_| {
                let (key_tx, key_rx) = bounded::<String>(1);
                let (c, woke_tx) = (Arc::clone(&c), woke_tx.clone());
                let thread = thread::spawn(move || {
                    while let Ok(key) = key_rx.recv_timeout(DEADLINE) {
                        let join = c.join(&key);
                        if woke_tx.send((join, Instant::now())).is_err() {
                            break;
                        }
                    }
                });
                (key_tx, thread)
            })
            .unzip();
        let mut latencies = Vec::with_capacity(flights);
        for i in 0..flights {
            let key = format!("k{i}");
            let permit = leader(c.join(&key));
            for key_tx in &key_txs {
                key_tx.send(key.clone()).unwrap();
            }
            wait_for_waiters(&c, &key, followers);
            let finished = Instant::now();
            permit.finish(Outcome::Stored);
            let mut last = finished;
            for _ in 0..followers {
                let (join, woke) = woke_rx.recv_timeout(DEADLINE).unwrap();
                assert_eq!(followed(join), Outcome::Stored);
                last = last.max(woke);
            }
            latencies.push(last.duration_since(finished));
        }
        drop(key_txs);
        for t in threads {
            t.join().unwrap();
        }
        assert_eq!(c.coalesced(), (followers * flights) as u64);
        latencies.sort();
        latencies
    }

    /// Every follower of every flight is woken with the leader's outcome, one flight
    /// after another. (How long the wake-up takes is measured where timing means
    /// something: the coalesced-miss scenario of `benches/load`, and `benches/wake_up.rs`
    /// across nodes.)
    #[test]
    fn every_follower_of_many_flights_is_woken_with_the_outcome() {
        assert_eq!(wake_latencies(1, 200).len(), 200);
        assert_eq!(wake_latencies(49, 50).len(), 50);
    }
}
