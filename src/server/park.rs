//! Idle keep-alive connections cost a socket, not a thread: a connection that sees
//! nothing of a next request for `PARK_AFTER` is parked here, its thread ended and its
//! read buffer given back. One thread per server waits on every parked socket at once (epoll,
//! through `mio`: readiness notification, no async runtime); when one becomes
//! readable (a request, a close, a drain's shutdown) its connection gets a thread again
//! and carries on where it stopped; when its idle deadline passes first it is closed,
//! as a waiting thread would have closed it.
//!
//! Invariants: a parked socket is registered once and removed from the poller before it
//! goes on or is dropped, so no event names a socket that is gone; a parked
//! connection keeps its open-connections slot and its idle flag (a drain closes it like
//! any idle one); dropping the parker ends its thread and closes every parked connection.

use std::collections::{BTreeSet, HashMap};
use std::io;
use std::os::fd::RawFd;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread;
use std::time::{Duration, Instant};

use log::warn;
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Registry, Token, Waker};

/// The waker's token: parked connections take the others.
const WAKE: Token = Token(usize::MAX);

/// How long a connection thread waits for a next request before it parks the
/// connection. Long enough that a loaded connection never parks (with a thousand
/// connections on two cores its requests come tens of ms apart, and a parked one's
/// wake-up waits for the parker thread among a thousand busy ones): only connections
/// that really idle leave their thread.
pub(super) const PARK_AFTER: Duration = Duration::from_secs(1);

/// Why a parked connection is handed back.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) enum Wake {
    /// Its socket is readable: a request, a close, or a drain's shutdown.
    Ready,
    /// Its idle deadline passed first.
    Expired,
}

/// What a parked connection is: its socket, its deadline, and how to carry it on.
struct Parked {
    fd: RawFd,
    deadline: Instant,
    resume: Box<dyn FnOnce(Wake) + Send>,
}

#[derive(Default)]
struct Table {
    parked: HashMap<usize, Parked>,
    /// Deadlines in order, with the key they belong to.
    deadlines: BTreeSet<(Instant, usize)>,
}

pub(super) struct Parker {
    registry: Registry,
    waker: Waker,
    table: Mutex<Table>,
    next: AtomicUsize,
    stop: AtomicBool,
}

impl Parker {
    /// Starts the parker's thread; `name` labels it.
    pub(super) fn start(name: &str) -> io::Result<Arc<Parker>> {
        let poll = Poll::new()?;
        let parker = Arc::new(Parker {
            registry: poll.registry().try_clone()?,
            waker: Waker::new(poll.registry(), WAKE)?,
            table: Mutex::new(Table::default()),
            next: AtomicUsize::new(0),
            stop: AtomicBool::new(false),
        });
        let run = Arc::clone(&parker);
        thread::Builder::new()
            .name(format!("{name}-parker"))
            .spawn(move || run.run(poll))?;
        Ok(parker)
    }

    fn table(&self) -> MutexGuard<'_, Table> {
        self.table.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Parks socket `fd` until it is readable or `deadline` passes; `resume` (which owns
    /// the socket) is then called once, on the parker's thread, and must not block.
    /// Err: it could not be parked (`resume` is given back, not called).
    pub(super) fn park(
        &self,
        fd: RawFd,
        deadline: Instant,
        resume: Box<dyn FnOnce(Wake) + Send>,
    ) -> Result<(), Box<dyn FnOnce(Wake) + Send>> {
        let key = self.next.fetch_add(1, Ordering::Relaxed);
        {
            let mut table = self.table();
            table.deadlines.insert((deadline, key));
            table.parked.insert(
                key,
                Parked {
                    fd,
                    deadline,
                    resume,
                },
            );
        }
        // Taken out of the poller (`take`) before the closure that owns the socket is
        // called or dropped.
        let added = self
            .registry
            .register(&mut SourceFd(&fd), Token(key), Interest::READABLE);
        match added {
            // Stopped meanwhile: no one would wait for it.
            Ok(()) if self.stop.load(Ordering::Acquire) => match self.take(key) {
                Some(parked) => Err(parked.resume),
                None => Ok(()),
            },
            Ok(()) => {
                // A nearer deadline than the thread waits for: let it look again.
                let _ = self.waker.wake();
                Ok(())
            }
            Err(_) => match self.take(key) {
                Some(parked) => Err(parked.resume),
                None => Ok(()),
            },
        }
    }

    /// Removes a parked connection from the table and the poller.
    fn take(&self, key: usize) -> Option<Parked> {
        let parked = {
            let mut table = self.table();
            let parked = table.parked.remove(&key)?;
            table.deadlines.remove(&(parked.deadline, key));
            parked
        };
        // The fd is still open: the closure that owns its socket is alive.
        let _ = self.registry.deregister(&mut SourceFd(&parked.fd));
        Some(parked)
    }

    fn run(&self, mut poll: Poll) {
        let mut events = Events::with_capacity(1024);
        while !self.stop.load(Ordering::Acquire) {
            let next_deadline = self.table().deadlines.first().map(|(d, _)| *d);
            let timeout = next_deadline.map(|d| d.saturating_duration_since(Instant::now()));
            if let Err(e) = poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    warn!("parked connections: wait failed: {e}");
                    thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
            for event in events.iter() {
                if event.token() == WAKE {
                    continue;
                }
                if let Some(parked) = self.take(event.token().0) {
                    (parked.resume)(Wake::Ready);
                }
            }
            let now = Instant::now();
            let expired: Vec<usize> = self
                .table()
                .deadlines
                .iter()
                .take_while(|(d, _)| *d <= now)
                .map(|(_, key)| *key)
                .collect();
            for key in expired {
                if let Some(parked) = self.take(key) {
                    (parked.resume)(Wake::Expired);
                }
            }
        }
        // Stopped: every parked connection is closed (its closure dropped, not called).
        let keys: Vec<usize> = self.table().parked.keys().copied().collect();
        for key in keys {
            drop(self.take(key));
        }
    }

    /// Parked connections now.
    pub(super) fn parked(&self) -> usize {
        self.table().parked.len()
    }

    /// Ends the thread; parked connections are closed.
    pub(super) fn stop(&self) {
        self.stop.store(true, Ordering::Release);
        let _ = self.waker.wake();
    }
}
