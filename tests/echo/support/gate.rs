//! `Gate`: a latch for "hold the origin until the test releases it". The test keeps the
//! `Gate`; a handler that must hold gets a `Hold` (`gate.hold()`) and blocks in
//! `Hold::wait` until the test calls `Gate::open`, or its own deadline passes.
//!
//! Invariants: once open, a gate stays open (every wait after that returns at once);
//! `open` wakes every waiter (a Condvar, not a poll); a `wait` never outlasts its
//! deadline, so a test that forgets to open still ends. Dropping the `Gate` opens it: a
//! test that fails before its `open` leaves no handler held behind it.

use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

#[derive(Default)]
struct Latch {
    open: Mutex<bool>,
    opened: Condvar,
}

impl Latch {
    fn state(&self) -> MutexGuard<'_, bool> {
        // A waiter that panicked poisons nothing that matters: the flag is a plain bool.
        self.open.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// The test's end: opens the gate (by `open`, or when dropped).
pub struct Gate(Arc<Latch>);

/// A held handler's end: waits until the gate opens.
#[derive(Clone)]
pub struct Hold(Arc<Latch>);

impl Gate {
    /// A closed gate.
    pub fn new() -> Gate {
        Gate(Arc::new(Latch::default()))
    }

    /// What a handler waits on.
    pub fn hold(&self) -> Hold {
        Hold(Arc::clone(&self.0))
    }

    /// Opens the gate and wakes every waiter; opening an open gate does nothing.
    pub fn open(&self) {
        *self.0.state() = true;
        self.0.opened.notify_all();
    }
}

impl Drop for Gate {
    fn drop(&mut self) {
        self.open();
    }
}

impl Hold {
    /// Blocks until the gate is open or `within` has passed; true if it opened.
    pub fn wait(&self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        let mut open = self.0.state();
        while !*open {
            let now = Instant::now();
            if now >= deadline {
                return false;
            }
            open = self
                .0
                .opened
                .wait_timeout(open, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::thread;

    #[test]
    fn a_closed_gate_holds_until_the_deadline() {
        let gate = Gate::new();
        let started = Instant::now();
        assert!(!gate.hold().wait(Duration::from_millis(50)));
        assert!(started.elapsed() >= Duration::from_millis(50));
    }

    #[test]
    fn open_wakes_every_waiter_and_later_waits_return_at_once() {
        let gate = Gate::new();
        let waiters: Vec<_> = (0..4)
            .map(|_| {
                let hold = gate.hold();
                thread::spawn(move || hold.wait(Duration::from_secs(10)))
            })
            .collect();
        gate.open();
        for w in waiters {
            assert!(w.join().expect("waiter"), "woken by open, not the deadline");
        }
        assert!(gate.hold().wait(Duration::ZERO), "an open gate stays open");
    }

    #[test]
    fn dropping_the_gate_opens_it() {
        let gate = Gate::new();
        let hold = gate.hold();
        let waiter = thread::spawn(move || hold.wait(Duration::from_secs(10)));
        let hold = gate.hold();
        drop(gate);
        assert!(waiter.join().expect("waiter"));
        assert!(hold.wait(Duration::ZERO));
    }
}
