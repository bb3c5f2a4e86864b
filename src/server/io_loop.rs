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

use crossbeam_channel::{unbounded, Receiver, Sender, TrySendError};
use log::{debug, warn};
use mio::unix::SourceFd;
use mio::{Events, Interest, Poll, Token, Waker};

use super::connection::{body_deadline, body_ready, next_head, refusal, serve_inline, Inline};
use super::{proxy_protocol, Job, Queues, Shared, Slot, BUFFER_SLACK};
use crate::http::conn::{over_queue_bound, Conn};
use crate::http::handler::{Handler, Waiting};
use crate::http::parse::HttpError;
use crate::http::socket::Socket;
use crate::http::{BodyFraming, Request};

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

/// What reaches an I/O thread from other threads.
pub(super) enum Arrival<J> {
    /// A new connection, with its open-connections slot.
    New(Socket, SocketAddr, Slot),
    /// A lent connection back from a pool thread, with whether it may carry another
    /// request (None: the pool thread dropped it).
    Back(u64, Option<(Conn, bool)>),
    /// A lent connection back from a pool thread, its request to wait (`Step::Wait`).
    Wait(u64, Conn, Request, Waiting<J>),
    /// What a waiting request waits for is done.
    Ready(u64),
}

/// How other threads reach an I/O thread.
pub(super) struct LoopHandle<J> {
    tx: Sender<Arrival<J>>,
    waker: Arc<Waker>,
}

impl<J> Clone for LoopHandle<J> {
    fn clone(&self) -> Self {
        LoopHandle {
            tx: self.tx.clone(),
            waker: Arc::clone(&self.waker),
        }
    }
}

impl<J> LoopHandle<J> {
    /// Delivers `arrival`; dropped (the connection closes) if the thread has ended.
    pub(super) fn send(&self, arrival: Arrival<J>) {
        if self.tx.send(arrival).is_ok() {
            let _ = self.waker.wake();
        }
    }

    /// Makes the thread look around (a drain has begun).
    pub(super) fn wake(&self) {
        let _ = self.waker.wake();
    }
}

/// Where a lent connection goes back. Dropped without being used (the pool thread gave
/// up on the connection), it tells the I/O thread the connection is gone.
pub(super) struct Back<J> {
    id: u64,
    to: LoopHandle<J>,
    used: bool,
}

impl<J> Back<J> {
    pub(super) fn send(mut self, conn: Conn, keep: bool) {
        self.used = true;
        self.to.send(Arrival::Back(self.id, Some((conn, keep))));
    }

    /// The request waits (`Step::Wait`) on its I/O thread, holding no pool thread.
    pub(super) fn wait(mut self, conn: Conn, req: Request, waiting: Waiting<J>) {
        self.used = true;
        self.to.send(Arrival::Wait(self.id, conn, req, waiting));
    }

    /// Not lent after all: the I/O thread keeps the connection.
    fn cancel(mut self) {
        self.used = true;
    }
}

impl<J> Drop for Back<J> {
    fn drop(&mut self) {
        if !self.used {
            self.to.send(Arrival::Back(self.id, None));
        }
    }
}

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
                    .map(|e| e.token().0 as u64),
            );
            for &id in &ready {
                if let Some(e) = self.conns.get_mut(&id) {
                    e.readable = true;
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
                // Emptied: what comes next signals readiness again.
                e.readable = !conn.drained();
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

    /// A complete head: pre-read a small body, or hand the request on.
    fn start_request(&mut self, id: u64, e: &mut Entry<H::Job>, req: Request) {
        let conn = e.conn.as_ref().expect("a connection being read is here");
        if body_ready(conn, &req) {
            self.dispatch(id, e, req);
        } else {
            let deadline = body_deadline(&self.shared, conn, &req);
            e.phase = Phase::Body(req);
            self.set_deadline(id, e, Some(deadline));
        }
    }

    /// Answers inline what the handler can, lends the rest to a pool.
    fn dispatch(&mut self, id: u64, e: &mut Entry<H::Job>, req: Request) {
        e.phase = Phase::Lent;
        let conn = e.conn.as_mut().expect("a connection being read is here");
        // With too much output queued for slow readers process-wide, answers are left to
        // the pools, whose writes wait for their clients.
        if req.framing != BodyFraming::None || over_queue_bound() {
            return self.lend(id, e, req, None);
        }
        match serve_inline(&self.shared, self.handler.as_ref(), conn, req, None) {
            Inline::Answered(keep) => e.phase = Phase::Flush { keep },
            Inline::Deferred(req, job) => self.lend(id, e, req, Some(job)),
            Inline::Declined(req) => self.lend(id, e, req, None),
            Inline::Wait(req, waiting) => self.wait(id, e, req, waiting),
        }
    }

    /// Keeps a request waiting (`Step::Wait`) until what it waits for is done or its
    /// deadline passes.
    fn wait(&mut self, id: u64, e: &mut Entry<H::Job>, req: Request, waiting: Waiting<H::Job>) {
        let deadline = waiting.until.deadline();
        let me = self.me.clone();
        waiting
            .until
            .on_done(Box::new(move || me.send(Arrival::Ready(id))));
        e.phase = Phase::Waiting(req, waiting);
        self.set_deadline(id, e, Some(deadline));
    }

    /// The wait is over: the handler answers (`Handler::resume`), or the job goes to
    /// the fetch pool.
    fn resume(&mut self, id: u64, e: &mut Entry<H::Job>, req: Request, waiting: Waiting<H::Job>) {
        self.set_deadline(id, e, None);
        let conn = e.conn.as_mut().expect("a waiting connection is here");
        let job = Some(waiting.job);
        match serve_inline(&self.shared, self.handler.as_ref(), conn, req, job) {
            Inline::Answered(keep) => e.phase = Phase::Flush { keep },
            Inline::Deferred(req, job) => self.lend(id, e, req, Some(job)),
            Inline::Declined(req) => self.lend(id, e, req, None),
            Inline::Wait(req, waiting) => self.wait(id, e, req, waiting),
        }
    }

    /// Hands the connection and its request to a pool thread: the fetch pool with a
    /// deferred job (a full queue is a 503 at once), the workers otherwise (a full queue
    /// is waited on until `queue_timeout`, then a 503).
    fn lend(&mut self, id: u64, e: &mut Entry<H::Job>, req: Request, deferred: Option<H::Job>) {
        let mut conn = e.conn.take().expect("a connection being read is here");
        if conn.set_nonblocking(false).is_err() {
            e.phase = Phase::Close;
            return;
        }
        let to_fetch = deferred.is_some();
        let job = Job {
            conn,
            req,
            deferred,
            back: Back {
                id,
                to: self.me.clone(),
                used: false,
            },
        };
        let sent = if to_fetch {
            self.queues.fetch.try_send(job)
        } else {
            self.queues.jobs.try_send(job)
        };
        match sent {
            Ok(()) => e.phase = Phase::Lent,
            Err(TrySendError::Full(job)) if !to_fetch => {
                let deadline = Instant::now() + self.shared.cfg.queue_timeout;
                e.phase = Phase::Queued(Box::new(job));
                self.set_deadline(id, e, Some(deadline));
                self.waiting.push_back(id);
            }
            Err(TrySendError::Full(job)) => self.busy(id, e, job),
            Err(TrySendError::Disconnected(job)) => {
                job.back.cancel();
                e.phase = Phase::Close;
            }
        }
    }

    /// The pools are full: 503.
    fn busy(&mut self, id: u64, e: &mut Entry<H::Job>, job: Job<H::Job>) {
        let Job {
            mut conn,
            req,
            back,
            ..
        } = job;
        back.cancel();
        warn!("{}: queue full; answering 503", self.shared.name);
        if conn.set_nonblocking(true).is_err() {
            e.phase = Phase::Close;
            return;
        }
        e.conn = Some(conn);
        self.refuse(id, e, &HttpError::new(503, "server busy"), Some(&req));
    }

    /// Echo's own answer to a request refused before a handler saw it; the connection
    /// closes after it.
    fn refuse(&mut self, id: u64, e: &mut Entry<H::Job>, err: &HttpError, req: Option<&Request>) {
        let Some(conn) = e.conn.as_mut() else {
            e.phase = Phase::Close;
            return;
        };
        debug!("{}: {}: refused: {err}", self.shared.name, conn.peer);
        let deadline = Instant::now() + self.shared.cfg.write_timeout;
        conn.set_write_deadline(deadline);
        let _ = conn.write_all(&refusal(err));
        self.handler.refused(conn.peer, req, err.status);
        e.phase = Phase::Flush { keep: false };
        self.set_deadline(id, e, Some(deadline));
    }

    /// Requests waiting for the worker queue, in order, while it has room.
    fn retry_waiting(&mut self) {
        while let Some(&id) = self.waiting.front() {
            let Some(mut e) = self.conns.remove(&id) else {
                self.waiting.pop_front();
                continue;
            };
            let Phase::Queued(job) = std::mem::replace(&mut e.phase, Phase::Lent) else {
                // Answered 503 meanwhile.
                self.waiting.pop_front();
                self.conns.insert(id, e);
                continue;
            };
            match self.queues.jobs.try_send(*job) {
                Ok(()) => {
                    self.waiting.pop_front();
                    self.set_deadline(id, &mut e, None);
                    self.conns.insert(id, e);
                }
                Err(TrySendError::Full(job)) => {
                    e.phase = Phase::Queued(Box::new(job));
                    self.conns.insert(id, e);
                    return;
                }
                Err(TrySendError::Disconnected(job)) => {
                    self.waiting.pop_front();
                    job.back.cancel();
                    // The job's connection is dropped with it: closed.
                    self.forget(id, e);
                }
            }
        }
    }

    /// Deadlines that passed: refused (a head or body not in time, a queue that stayed
    /// full) or closed.
    fn expire(&mut self) {
        let now = Instant::now();
        while let Some(&(deadline, id)) = self.timers.first() {
            if deadline > now {
                return;
            }
            self.timers.pop_first();
            let Some(mut e) = self.conns.remove(&id) else {
                continue;
            };
            e.deadline = None;
            let keep = match std::mem::replace(&mut e.phase, Phase::Lent) {
                Phase::Head => {
                    let err = HttpError::new(408, "request head not received in time");
                    self.refuse(id, &mut e, &err, None);
                    true
                }
                Phase::Body(req) => {
                    let err = HttpError::new(408, "request body not received in time");
                    self.refuse(id, &mut e, &err, Some(&req));
                    true
                }
                Phase::Queued(job) => {
                    self.busy(id, &mut e, *job);
                    true
                }
                Phase::Waiting(req, waiting) => {
                    // The work may have pushed its deadline on.
                    let deadline = waiting.until.deadline();
                    if deadline > now {
                        e.phase = Phase::Waiting(req, waiting);
                        self.set_deadline(id, &mut e, Some(deadline));
                    } else {
                        self.resume(id, &mut e, req, waiting);
                    }
                    true
                }
                Phase::Lent => true,
                Phase::Idle if now < e.idle_until => {
                    // Idle for a while: its buffer goes back until the next request.
                    if let Some(conn) = e.conn.as_mut() {
                        conn.release_buffer();
                    }
                    let until = e.idle_until;
                    e.phase = Phase::Idle;
                    self.set_deadline(id, &mut e, Some(until));
                    true
                }
                phase @ (Phase::Idle
                | Phase::Proxy
                | Phase::Flush { .. }
                | Phase::Linger { .. }
                | Phase::Close) => {
                    if let Phase::Flush { .. } = phase {
                        debug!(
                            "{}: a client did not take its response in time",
                            self.shared.name
                        );
                    }
                    e.phase = phase;
                    false
                }
            };
            if keep && self.step(id, &mut e) {
                self.conns.insert(id, e);
            } else {
                self.forget(id, e);
            }
        }
    }

    /// A drain closes the connections that wait for a next request.
    fn close_idle(&mut self) {
        let idle: Vec<u64> = self
            .conns
            .iter()
            .filter(|(_, e)| {
                matches!(e.phase, Phase::Idle)
                    && e.conn.as_ref().is_some_and(|c| c.buffered().is_empty())
            })
            .map(|(id, _)| *id)
            .collect();
        for id in idle {
            if let Some(e) = self.conns.remove(&id) {
                self.forget(id, e);
            }
        }
    }
}
