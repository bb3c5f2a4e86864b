//! An I/O thread: it owns its share of the client connections and waits on all of them
//! at once (epoll, edge-triggered, through `mio`: readiness notification, no async
//! runtime). Each connection is a small state machine ([`Phase`]) driven whenever its
//! socket is ready, a pool thread gives it back, or its deadline passes: it reads
//! request heads and small bodies, answers inline what the handler can answer without
//! blocking, lends the rest to the pools, and writes responses as the socket accepts
//! them. Nothing here blocks: an idle connection or a slow reader costs its buffer.
//!
//! Invariants: a connection's socket is non-blocking while it is here and blocking while
//! a pool thread has it (lent: nothing here touches it then); a socket is read until it
//! has nothing more (edge-triggered readiness), unless a request is in progress; every
//! phase but `Lent` has a deadline, and what passes it is refused (408, 503) or closed;
//! a connection's responses leave in request order (the next head is read only once the
//! last response is all written); a lent connection comes back, or word that it is gone
//! (`Back`'s drop), so its slot is always given back.

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::io;
use std::net::{Shutdown, SocketAddr};
use std::os::fd::{AsFd, AsRawFd};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crossbeam_channel::{unbounded, Receiver};
use log::{debug, warn};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use super::connection::{body_deadline, body_ready, next_head};
use super::{proxy_protocol, Job, Queues, Shared, Slot, BUFFER_SLACK};
use crate::http::conn::Conn;
use crate::http::handler::{Handler, Waiting};
use crate::http::parse::HttpError;
use crate::http::socket::Socket;
use crate::http::Request;

mod handoff;
mod requests;

pub(super) use handoff::{Arrival, Back, LoopHandle};

/// The waker's token: connections take the others (ids count up and are never reused,
/// so a late event or a late `Back` never reaches a newer connection).
const WAKE: Token = Token(usize::MAX);
/// How long a connection closed after its answer reads off what its client still sends,
/// so the close does not turn into a reset that destroys the answer (RFC 9112 §9.6).
const LINGER: Duration = Duration::from_millis(200);
/// ... and at most this much of it.
const LINGER_BYTES: usize = 64 * 1024;
/// While requests wait for room in the worker queue, the queue is tried this often.
const QUEUE_RETRY: Duration = Duration::from_millis(1);
/// While the server drains, idle connections are looked for this often.
const DRAIN_TICK: Duration = Duration::from_millis(10);
/// Requests one connection may have answered in a row before the others on its I/O
/// thread get their turn (a client that pipelines thousands must not hold the rest).
const FAIR_SHARE: usize = 16;
/// A connection idle this long gives its read buffer back (a busy one keeps it from one
/// request to the next).
const RELEASE_AFTER: Duration = Duration::from_secs(1);

/// Where a connection is.
enum Phase<J> {
    /// A trusted balancer's PROXY header is awaited (`server.proxy_protocol`).
    Proxy,
    /// Between requests, nothing of the next one received.
    Idle,
    /// Part of a request head received.
    Head,
    /// A small body is being read before the request is handed on.
    Body(Request),
    /// Waiting for room in the worker queue (until `queue_timeout`).
    Queued(Box<Job<J>>),
    /// Waiting, without a thread, for other work (`Step::Wait`); then its job goes to
    /// the fetch pool.
    Waiting(Request, Waiting<J>),
    /// A pool thread has it.
    Lent,
    /// Writing queued response output; then the next request, or the close.
    Flush { keep: bool },
    /// Shut down for writing, reading off what the client still sends, then closed.
    Linger { read: usize },
    /// To be closed.
    Close,
}

struct Entry<J> {
    /// None while lent.
    conn: Option<Conn>,
    phase: Phase<J>,
    deadline: Option<Instant>,
    /// The socket may hold bytes not read yet (readiness was signalled, or a read filled
    /// all the room it had): edge-triggered readiness comes once per arrival.
    readable: bool,
    /// The client has closed its side (or the socket failed): the end, which a read
    /// reports only after the bytes before it, must be read whatever a read returned.
    peer_closed: bool,
    /// When an idle connection is closed.
    idle_until: Instant,
    _slot: Slot,
}

struct IoLoop<H: Handler> {
    shared: Arc<Shared>,
    handler: Arc<H>,
    queues: Queues<H::Job>,
    me: LoopHandle<H::Job>,
    inbox: Receiver<Arrival<H::Job>>,
    poll: Poll,
    conns: HashMap<u64, Entry<H::Job>>,
    /// Deadlines in order, with the connection they belong to.
    timers: BTreeSet<(Instant, u64)>,
    /// Connections waiting for room in the worker queue, oldest first.
    waiting: VecDeque<u64>,
    /// Connections with more to do that gave others their turn (`FAIR_SHARE`).
    runnable: Vec<u64>,
    next_id: u64,
}

/// Starts I/O thread `i` of a server.
pub(super) fn start<H: Handler>(
    shared: &Arc<Shared>,
    handler: &Arc<H>,
    queues: Queues<H::Job>,
    i: usize,
) -> io::Result<LoopHandle<H::Job>> {
    let poll = Poll::new()?;
    let waker = Arc::new(Waker::new(poll.registry(), WAKE)?);
    let (tx, inbox) = unbounded();
    let me = LoopHandle { tx, waker };
    let mut io_loop = IoLoop {
        shared: Arc::clone(shared),
        handler: Arc::clone(handler),
        queues,
        me: me.clone(),
        inbox,
        poll,
        conns: HashMap::new(),
        timers: BTreeSet::new(),
        waiting: VecDeque::new(),
        runnable: Vec::new(),
        next_id: 0,
    };
    thread::Builder::new()
        .name(format!("{}-io-{i}", shared.name))
        .spawn(move || io_loop.run())?;
    Ok(me)
}

/// What a read came to.
enum Read {
    /// Bytes arrived (more may follow).
    Data,
    /// Nothing more now: wait for readiness.
    Wait,
    /// The client closed its side.
    Closed,
    /// The connection failed (or its buffer is full).
    Failed,
}

impl<H: Handler> IoLoop<H> {
    fn run(&mut self) {
        let mut events = Events::with_capacity(1024);
        let mut ready = Vec::with_capacity(1024);
        loop {
            let draining = self.shared.shutting_down.load(Ordering::SeqCst);
            if draining {
                self.close_idle();
                if self.conns.is_empty() {
                    // Acceptors have stopped; whatever still arrives is dropped (closed).
                    return;
                }
            }
            let mut timeout = self
                .timers
                .first()
                .map(|(d, _)| d.saturating_duration_since(Instant::now()));
            if !self.waiting.is_empty() {
                timeout = Some(timeout.map_or(QUEUE_RETRY, |t| t.min(QUEUE_RETRY)));
            }
            if draining {
                timeout = Some(timeout.map_or(DRAIN_TICK, |t| t.min(DRAIN_TICK)));
            }
            if !self.runnable.is_empty() {
                timeout = Some(Duration::ZERO);
            }
            if let Err(e) = self.poll.poll(&mut events, timeout) {
                if e.kind() != io::ErrorKind::Interrupted {
                    warn!("{}: waiting for connections failed: {e}", self.shared.name);
                    thread::sleep(Duration::from_millis(10));
                }
                continue;
            }
            ready.clear();
            ready.extend(
                events
                    .iter()
                    .filter(|e| e.token() != WAKE)
                    .map(|e| (e.token().0 as u64, e.is_read_closed() || e.is_error())),
            );
            for &(id, closed) in &ready {
                if let Some(e) = self.conns.get_mut(&id) {
                    e.readable = true;
                    e.peer_closed |= closed;
                }
                self.drive(id);
            }
            while let Ok(arrival) = self.inbox.try_recv() {
                self.arrive(arrival);
            }
            for id in std::mem::take(&mut self.runnable) {
                self.drive(id);
            }
            self.retry_waiting();
            self.expire();
        }
    }

    fn arrive(&mut self, arrival: Arrival<H::Job>) {
        match arrival {
            Arrival::Wait(id, mut conn, req, waiting) => {
                let Some(mut e) = self.conns.remove(&id) else {
                    return;
                };
                if conn.set_nonblocking(true).is_err() {
                    e.phase = Phase::Close;
                } else {
                    self.wait(id, &mut e, req, waiting);
                }
                e.conn = Some(conn);
                e.readable = true;
                self.conns.insert(id, e);
                self.drive(id);
            }
            Arrival::Ready(id) => {
                let Some(mut e) = self.conns.remove(&id) else {
                    return;
                };
                match std::mem::replace(&mut e.phase, Phase::Lent) {
                    Phase::Waiting(req, waiting) => self.resume(id, &mut e, req, waiting),
                    other => e.phase = other,
                }
                self.conns.insert(id, e);
                self.drive(id);
            }
            Arrival::New(socket, peer, slot) => self.accept(socket, peer, slot),
            Arrival::Back(id, None) => {
                if let Some(e) = self.conns.remove(&id) {
                    self.forget(id, e);
                }
            }
            Arrival::Back(id, Some((mut conn, keep))) => {
                let Some(e) = self.conns.get_mut(&id) else {
                    return;
                };
                if conn.set_nonblocking(true).is_err() {
                    e.phase = Phase::Close;
                } else {
                    e.phase = Phase::Flush { keep };
                }
                e.conn = Some(conn);
                // Bytes may have come while it was away; their readiness was not ours.
                e.readable = true;
                self.drive(id);
            }
        }
    }

    fn accept(&mut self, socket: Socket, peer: SocketAddr, slot: Slot) {
        let cfg = &self.shared.cfg;
        if socket.set_nodelay().is_err() {
            return;
        }
        let mut conn = Conn::new(
            socket,
            peer,
            cfg.max_header_bytes + BUFFER_SLACK,
            cfg.write_timeout,
        );
        if conn.set_nonblocking(true).is_err() {
            return;
        }
        let id = self.next_id;
        self.next_id += 1;
        let fd = conn.stream().as_fd().as_raw_fd();
        let interest = Interest::READABLE | Interest::WRITABLE;
        if let Err(e) =
            self.poll
                .registry()
                .register(&mut SourceFd(&fd), Token(id as usize), interest)
        {
            warn!("{}: cannot watch a connection: {e}", self.shared.name);
            return;
        }
        let now = Instant::now();
        let mut e = Entry {
            conn: Some(conn),
            phase: Phase::Proxy,
            deadline: None,
            readable: true,
            peer_closed: false,
            idle_until: now,
            _slot: slot,
        };
        if cfg.proxy_protocol {
            self.set_deadline(id, &mut e, Some(now + cfg.header_timeout));
        } else {
            self.enter_idle(id, &mut e, now);
        }
        self.conns.insert(id, e);
        self.drive(id);
    }

    /// Moves a connection on as far as it goes without waiting.
    fn drive(&mut self, id: u64) {
        let Some(mut e) = self.conns.remove(&id) else {
            return;
        };
        if self.step(id, &mut e) {
            self.conns.insert(id, e);
        } else {
            self.forget(id, e);
        }
    }

    /// Closes a connection: out of the poller (while its socket is still open), its
    /// deadline dropped; the socket and the slot go with the entry.
    fn forget(&mut self, id: u64, mut e: Entry<H::Job>) {
        if let Some(d) = e.deadline.take() {
            self.timers.remove(&(d, id));
        }
        if let Some(conn) = &e.conn {
            let fd = conn.stream().as_fd().as_raw_fd();
            let _ = self.poll.registry().deregister(&mut SourceFd(&fd));
        }
    }

    fn set_deadline(&mut self, id: u64, e: &mut Entry<H::Job>, deadline: Option<Instant>) {
        if e.deadline == deadline {
            return;
        }
        if let Some(d) = e.deadline.take() {
            self.timers.remove(&(d, id));
        }
        if let Some(d) = deadline {
            self.timers.insert((d, id));
        }
        e.deadline = deadline;
    }

    /// Between requests: closed at the idle timeout, its buffer given back before.
    fn enter_idle(&mut self, id: u64, e: &mut Entry<H::Job>, now: Instant) {
        e.phase = Phase::Idle;
        e.idle_until = now + self.shared.cfg.idle_timeout;
        let release = now + RELEASE_AFTER;
        self.set_deadline(id, e, Some(release.min(e.idle_until)));
    }

    /// One read, if the socket may have bytes.
    fn read(e: &mut Entry<H::Job>) -> Read {
        if !e.readable {
            return Read::Wait;
        }
        let Some(conn) = e.conn.as_mut() else {
            return Read::Failed;
        };
        match conn.read_available() {
            Ok(0) => Read::Closed,
            Ok(_) => {
                // Emptied: what comes next signals readiness again; but a close that
                // came with these bytes was signalled with them, and a read reports it
                // only after them.
                e.readable = !conn.drained() || e.peer_closed;
                Read::Data
            }
            Err(err) if err.kind() == io::ErrorKind::WouldBlock => {
                e.readable = false;
                Read::Wait
            }
            Err(_) => Read::Failed,
        }
    }

    /// Runs a connection's state machine until it must wait, or has had its share of
    /// the thread; false: close it.
    fn step(&mut self, id: u64, e: &mut Entry<H::Job>) -> bool {
        let mut answered = 0;
        loop {
            let now = Instant::now();
            let phase = std::mem::replace(&mut e.phase, Phase::Lent);
            let Some(conn) = e.conn.as_mut() else {
                // Lent or queued: its pool thread (or the queue) has the connection.
                e.phase = phase;
                return !matches!(e.phase, Phase::Close);
            };
            match phase {
                Phase::Lent | Phase::Queued(_) | Phase::Waiting(..) => {
                    e.phase = phase;
                    return true;
                }
                Phase::Close => return false,
                Phase::Flush { keep } => match conn.flush_available() {
                    Ok(true) => {
                        if keep && !self.shared.shutting_down.load(Ordering::SeqCst) {
                            let pipelined = !conn.buffered().is_empty();
                            self.enter_idle(id, e, now);
                            answered += 1;
                            if answered >= FAIR_SHARE && pipelined {
                                // Pipelined requests wait for the next round.
                                self.runnable.push(id);
                                return true;
                            }
                        } else {
                            let _ = conn.stream().shutdown(Shutdown::Write);
                            e.phase = Phase::Linger { read: 0 };
                            self.set_deadline(id, e, Some(now + LINGER));
                        }
                    }
                    Ok(false) => {
                        let deadline = conn
                            .write_deadline()
                            .unwrap_or(now + self.shared.cfg.write_timeout);
                        e.phase = Phase::Flush { keep };
                        self.set_deadline(id, e, Some(deadline));
                        return true;
                    }
                    Err(err) => {
                        debug!("{}: {}: response cut: {err}", self.shared.name, conn.peer);
                        return false;
                    }
                },
                Phase::Proxy => {
                    match proxy_protocol::examine(conn, &self.shared.cfg.trusted_proxies) {
                        Ok(true) => {
                            self.enter_idle(id, e, now);
                            continue;
                        }
                        Ok(false) => {}
                        Err(why) => {
                            debug!("{}: {}: closed: {why}", self.shared.name, conn.peer);
                            return false;
                        }
                    }
                    e.phase = Phase::Proxy;
                    match Self::read(e) {
                        Read::Data => {}
                        Read::Wait => return true,
                        Read::Closed | Read::Failed => return false,
                    }
                }
                Phase::Idle | Phase::Head => {
                    let was_idle = matches!(phase, Phase::Idle);
                    e.phase = phase;
                    match next_head(&self.shared, conn) {
                        Err(err) => {
                            self.refuse(id, e, &err, None);
                            continue;
                        }
                        Ok(Some(req)) => {
                            self.set_deadline(id, e, None);
                            self.start_request(id, e, req);
                            continue;
                        }
                        Ok(None) => {}
                    }
                    let idle = conn.buffered().is_empty();
                    if was_idle && !idle {
                        // The head's deadline runs from its first byte.
                        e.phase = Phase::Head;
                        let head = now + self.shared.cfg.header_timeout;
                        self.set_deadline(id, e, Some(head));
                    }
                    if idle && self.shared.shutting_down.load(Ordering::SeqCst) {
                        return false;
                    }
                    match Self::read(e) {
                        Read::Data => {}
                        Read::Wait => return true,
                        Read::Closed if idle => return false,
                        Read::Closed => {
                            let err =
                                HttpError::new(400, "connection closed inside a request head");
                            self.refuse(id, e, &err, None);
                        }
                        Read::Failed => return false,
                    }
                }
                Phase::Body(req) => {
                    if body_ready(conn, &req) {
                        self.set_deadline(id, e, None);
                        self.dispatch(id, e, req);
                        continue;
                    }
                    let deadline = body_deadline(&self.shared, conn, &req);
                    self.set_deadline(id, e, Some(deadline));
                    e.phase = Phase::Body(req);
                    match Self::read(e) {
                        Read::Data => {}
                        Read::Wait => return true,
                        Read::Closed | Read::Failed => {
                            let Phase::Body(req) = std::mem::replace(&mut e.phase, Phase::Lent)
                            else {
                                unreachable!("the phase was just set")
                            };
                            let err =
                                HttpError::new(400, "connection closed inside the request body");
                            self.refuse(id, e, &err, Some(&req));
                        }
                    }
                }
                Phase::Linger { read } => {
                    conn.consume(conn.buffered().len());
                    e.phase = Phase::Linger { read };
                    match conn.read_available() {
                        Ok(0) => return false,
                        Ok(n) if read + n >= LINGER_BYTES => return false,
                        Ok(n) => e.phase = Phase::Linger { read: read + n },
                        Err(err) if err.kind() == io::ErrorKind::WouldBlock => return true,
                        Err(_) => return false,
                    }
                }
            }
        }
    }
}
