//! The server: one acceptor thread, one small-stack thread per client connection, a
//! fixed pool of workers and a fixed pool of fetch workers, each fed by a bounded queue.
//!
//! A connection thread reads and validates request heads (a slow or half-sent head holds
//! only its own thread), then offers each request to the handler inline
//! (`Handler::inline`): what it answers at once (a cache hit) costs no hand-off. What the
//! handler defers (`Step::Defer`: its own typed job, which would wait on the origin) goes
//! straight to the fetch workers; the rest (requests with a body, what the handler
//! declines) to the workers, whose `handle` may defer to the fetch workers in turn. A connection is
//! lent to one thread at a time and comes back when the response is written, so responses
//! on a connection leave in request order (pipelined requests wait in its buffer). A full
//! queue is a 503, never an unbounded wait: `workers + fetch_workers` bounds the requests
//! that may block.
//!
//! Invariants: an accept error is logged and survived; a handler panic answers 500 (or
//! cuts an unfinished response) and the thread lives on; every read waits at most until
//! a deadline from config; at most `max_connections` connections are served at once.

use std::collections::HashMap;
use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Receiver, SendTimeoutError, Sender};
use log::{debug, error, info, warn};

use crate::config::ServerConfig;
use crate::http::body::chunked_length;
use crate::http::conn::Conn;
use crate::http::exchange::{Exchange, ExchangeTimeouts};
use crate::http::handler::{Handler, Step};
use crate::http::parse::{parse_head, HttpError, Limits, Parsed};
use crate::http::{BodyFraming, Request};

/// Stack of a connection thread: it parses heads, looks requests up (a Redis round trip
/// at most) and answers hits.
const CONNECTION_STACK: usize = 256 * 1024;
/// Stack of a fetch worker: an origin client call and body copies (buffers on the heap).
const FETCH_STACK: usize = 512 * 1024;
/// Bodies up to this size are read by the connection thread before a worker is involved,
/// so a client that trickles a small body does not hold a worker.
const PREREAD_BODY: u64 = 64 * 1024;
/// Extra buffer beyond the largest head, for pipelined requests and pre-read bodies.
const BUFFER_SLACK: usize = PREREAD_BODY as usize + 16 * 1024;

/// Where a connection thread sends exchanges: the worker pool and the fetch pool.
struct Queues<J> {
    jobs: Sender<Job<J>>,
    fetch: Sender<Job<J>>,
}

/// An exchange on its way to a pool: for the fetch pool with the handler's job.
struct Job<J> {
    conn: Conn,
    req: Request,
    deferred: Option<J>,
    /// Where the connection goes back after the exchange, with whether it may carry
    /// another request.
    back: Sender<(Conn, bool)>,
}

struct Shared {
    name: String,
    cfg: ServerConfig,
    limits: Limits,
    shutting_down: Arc<AtomicBool>,
    open: AtomicUsize,
    next_id: AtomicU64,
    /// Every open client socket (a clone), and whether it is idle between requests, so
    /// shutdown can close the idle ones at once and let the busy ones finish.
    conns: Mutex<HashMap<u64, (TcpStream, Arc<AtomicBool>)>>,
    /// The depths of the worker and fetch queues.
    queued: Box<dyn Fn() -> (usize, usize) + Send + Sync>,
}

impl Shared {
    fn conns(&self) -> MutexGuard<'_, HashMap<u64, (TcpStream, Arc<AtomicBool>)>> {
        // A panic elsewhere cannot leave the map inconsistent: recover it.
        self.conns
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// Connections and queue depths of a running server.
pub struct ServerStats(Arc<Shared>);

impl ServerStats {
    pub fn open_connections(&self) -> usize {
        self.0.open.load(Ordering::Relaxed)
    }

    /// Requests waiting for a worker, and for a fetch worker.
    pub fn queued(&self) -> (usize, usize) {
        (self.0.queued)()
    }

    /// Set once a drain has begun.
    pub fn draining(&self) -> bool {
        self.0.shutting_down.load(Ordering::SeqCst)
    }
}

/// A running server; dropping it shuts it down.
pub struct ServerHandle {
    addr: SocketAddr,
    shared: Arc<Shared>,
    acceptor: Option<JoinHandle<()>>,
}

impl ServerHandle {
    pub fn local_addr(&self) -> SocketAddr {
        self.addr
    }

    /// Open client connections right now.
    pub fn open_connections(&self) -> usize {
        self.shared.open.load(Ordering::Relaxed)
    }

    /// Live figures of this server, for metrics: it can outlive the handle's borrow.
    pub fn stats(&self) -> ServerStats {
        ServerStats(Arc::clone(&self.shared))
    }

    /// Blocks until the server stops.
    pub fn join(mut self) {
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
    }

    /// Stops accepting, and ends every connection once its current exchange is done.
    pub fn shutdown(&mut self) {
        if self.shared.shutting_down.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wake the acceptor out of accept(); when it ends, the listener closes and new
        // connections are refused.
        let _ = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1));
        if let Some(acceptor) = self.acceptor.take() {
            let _ = acceptor.join();
        }
        self.close_idle();
        info!("{}: stopped accepting on {}", self.shared.name, self.addr);
    }

    /// Closes the connections that wait for a next request; busy ones finish theirs.
    fn close_idle(&self) {
        for (stream, idle) in self.shared.conns().values() {
            if idle.load(Ordering::SeqCst) {
                let _ = stream.shutdown(Shutdown::Both);
            }
        }
    }

    /// Graceful stop: no new connections, idle ones closed, requests in flight given
    /// until `timeout` to finish. True if every connection ended in time.
    pub fn drain(&mut self, timeout: Duration) -> bool {
        self.shutdown();
        let deadline = Instant::now() + timeout;
        while self.open_connections() > 0 {
            if Instant::now() >= deadline {
                return false;
            }
            // A connection that finished its exchange becomes idle (or closes itself).
            self.close_idle();
            thread::sleep(Duration::from_millis(10));
        }
        true
    }
}

impl Drop for ServerHandle {
    fn drop(&mut self) {
        self.shutdown();
    }
}

/// Starts serving `listener` with `handler`; `name` labels threads and logs.
pub fn start<H: Handler>(
    name: &str,
    listener: TcpListener,
    cfg: ServerConfig,
    handler: Arc<H>,
) -> io::Result<ServerHandle> {
    let addr = listener.local_addr()?;
    let limits = Limits {
        max_header_bytes: cfg.max_header_bytes,
        max_headers: cfg.max_headers,
        max_target_bytes: cfg.max_target_bytes,
        max_body_bytes: cfg.max_body_bytes,
    };
    let (jobs_tx, jobs_rx) = bounded::<Job<H::Job>>(cfg.queue_depth);
    let (fetch_tx, fetch_rx) = bounded::<Job<H::Job>>(cfg.fetch_queue);
    let queued = {
        let (jobs, fetch) = (jobs_rx.clone(), fetch_rx.clone());
        Box::new(move || (jobs.len(), fetch.len()))
    };
    let shared = Arc::new(Shared {
        name: name.to_string(),
        cfg,
        limits,
        shutting_down: Arc::new(AtomicBool::new(false)),
        open: AtomicUsize::new(0),
        next_id: AtomicU64::new(0),
        conns: Mutex::new(HashMap::new()),
        queued,
    });
    for i in 0..shared.cfg.workers {
        let rx = jobs_rx.clone();
        let fetch = fetch_tx.clone();
        let handler = Arc::clone(&handler);
        let shared = Arc::clone(&shared);
        thread::Builder::new()
            .name(format!("{name}-worker-{i}"))
            .spawn(move || worker(&shared, &rx, Some(&fetch), handler.as_ref()))?;
    }
    for i in 0..shared.cfg.fetch_workers {
        let rx = fetch_rx.clone();
        let handler = Arc::clone(&handler);
        let shared = Arc::clone(&shared);
        thread::Builder::new()
            .name(format!("{name}-fetch-{i}"))
            .stack_size(FETCH_STACK)
            .spawn(move || worker(&shared, &rx, None, handler.as_ref()))?;
    }
    let acceptor = {
        let shared = Arc::clone(&shared);
        let acceptor_handler = Arc::clone(&handler);
        let queues = Queues {
            jobs: jobs_tx,
            fetch: fetch_tx.clone(),
        };
        thread::Builder::new()
            .name(format!("{name}-acceptor"))
            .spawn(move || accept_loop(&shared, &acceptor_handler, &listener, &queues))?
    };
    info!(
        "{name}: listening on {addr} with {} workers",
        shared.cfg.workers
    );
    Ok(ServerHandle {
        addr,
        shared,
        acceptor: Some(acceptor),
    })
}

fn accept_loop<H: Handler>(
    shared: &Arc<Shared>,
    handler: &Arc<H>,
    listener: &TcpListener,
    queues: &Queues<H::Job>,
) {
    let mut last_warning: Option<Instant> = None;
    // A descriptor kept in reserve: out of descriptors, it is given up for a moment so a
    // waiting client can be accepted and told 503, instead of hanging in the backlog.
    let mut spare = std::fs::File::open("/dev/null").ok();
    loop {
        let (stream, peer) = match listener.accept() {
            Ok(s) => s,
            Err(e) => {
                if shared.shutting_down.load(Ordering::SeqCst) {
                    return;
                }
                let out_of_fds = matches!(e.raw_os_error(), Some(23) | Some(24));
                if out_of_fds && spare.take().is_some() {
                    if let Ok((stream, _)) = listener.accept() {
                        refuse_over_limit(stream);
                    }
                    spare = std::fs::File::open("/dev/null").ok();
                }
                if last_warning.is_none_or(|t| t.elapsed() > Duration::from_secs(5)) {
                    warn!("{}: accept failed: {e}", shared.name);
                    last_warning = Some(Instant::now());
                }
                // Out of descriptors or memory: back off instead of spinning; the
                // listener stays open and accepting resumes when resources free up.
                thread::sleep(Duration::from_millis(10));
                continue;
            }
        };
        if shared.shutting_down.load(Ordering::SeqCst) {
            return;
        }
        if shared.open.load(Ordering::SeqCst) >= shared.cfg.max_connections {
            refuse_over_limit(stream);
            continue;
        }
        shared.open.fetch_add(1, Ordering::SeqCst);
        let id = shared.next_id.fetch_add(1, Ordering::Relaxed);
        let idle = Arc::new(AtomicBool::new(true));
        if let Ok(clone) = stream.try_clone() {
            shared.conns().insert(id, (clone, Arc::clone(&idle)));
        }
        let thread_shared = Arc::clone(shared);
        let handler = Arc::clone(handler);
        let queues = Queues {
            jobs: queues.jobs.clone(),
            fetch: queues.fetch.clone(),
        };
        let spawned = thread::Builder::new()
            .name(format!("{}-conn", shared.name))
            .stack_size(CONNECTION_STACK)
            .spawn(move || {
                let _guard = OpenGuard {
                    shared: &thread_shared,
                    id,
                };
                serve_connection(
                    &thread_shared,
                    handler.as_ref(),
                    stream,
                    peer,
                    &queues,
                    &idle,
                );
            });
        if let Err(e) = spawned {
            shared.open.fetch_sub(1, Ordering::SeqCst);
            shared.conns().remove(&id);
            warn!("{}: cannot start a connection thread: {e}", shared.name);
        }
    }
}

/// Counts a connection open for as long as its thread runs.
struct OpenGuard<'a> {
    shared: &'a Shared,
    id: u64,
}

impl Drop for OpenGuard<'_> {
    fn drop(&mut self) {
        self.shared.conns().remove(&self.id);
        self.shared.open.fetch_sub(1, Ordering::SeqCst);
    }
}

fn refuse_over_limit(stream: TcpStream) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    let _ = write_refusal(&stream, &HttpError::new(503, "too many connections"));
}

fn write_refusal(mut stream: &TcpStream, e: &HttpError) -> io::Result<()> {
    use std::io::Write;
    let body = format!("echo: {}\n", e.reason);
    let retry = if e.status == 503 {
        "retry-after: 1\r\n"
    } else {
        ""
    };
    let head = format!(
        "HTTP/1.1 {} {}\r\ncontent-type: text/plain; charset=utf-8\r\ncache-control: no-store\r\n{retry}content-length: {}\r\nconnection: close\r\n\r\n",
        e.status,
        crate::http::reason(e.status),
        body.len()
    );
    stream.write_all(format!("{head}{body}").as_bytes())?;
    let _ = stream.shutdown(Shutdown::Write);
    Ok(())
}

/// Reads requests from one client and hands each to the worker pool, in order.
fn serve_connection<H: Handler>(
    shared: &Shared,
    handler: &H,
    stream: TcpStream,
    peer: SocketAddr,
    queues: &Queues<H::Job>,
    idle: &AtomicBool,
) {
    let cfg = &shared.cfg;
    if stream.set_nodelay(true).is_err()
        || stream.set_write_timeout(Some(cfg.write_timeout)).is_err()
    {
        return;
    }
    let mut conn = Conn::new(
        stream,
        peer,
        cfg.max_header_bytes + BUFFER_SLACK,
        cfg.write_timeout,
    );
    loop {
        let req = match read_head(shared, &mut conn, idle) {
            Ok(Some(req)) => req,
            Ok(None) => return,
            Err(e) => {
                debug!("{}: {peer}: refused: {e}", shared.name);
                let _ = write_refusal(conn.stream(), &e);
                handler.refused(peer, None, e.status);
                linger_close(&mut conn);
                return;
            }
        };
        // A small body is read here, before any worker is involved: a client that
        // trickles it holds its own thread only, until the body deadline.
        if !req.expect_continue {
            let timeouts = exchange_timeouts(cfg);
            if let Err(e) = preread(&mut conn, &req, &timeouts) {
                debug!("{}: {peer}: refused: {e}", shared.name);
                let _ = write_refusal(conn.stream(), &e);
                handler.refused(peer, Some(&req), e.status);
                linger_close(&mut conn);
                return;
            }
        }
        let (req, deferred) = if req.framing == BodyFraming::None {
            match serve_inline(shared, handler, &mut conn, req) {
                Inline::Answered(true) => continue,
                Inline::Answered(false) => {
                    let _ = conn.stream().shutdown(Shutdown::Write);
                    linger_close(&mut conn);
                    return;
                }
                Inline::Deferred(req, job) => (req, Some(job)),
                Inline::Declined(req) => (req, None),
            }
        } else {
            (req, None)
        };
        // The worker holds the only sender: if it drops the connection, or dies, this
        // thread sees the channel disconnect instead of waiting forever.
        let (back_tx, back_rx) = bounded::<(Conn, bool)>(1);
        let to_fetch = deferred.is_some();
        let job = Job {
            conn,
            req,
            deferred,
            back: back_tx,
        };
        // A request deferred here goes straight to the fetch stage; a full fetch queue is
        // answered 503 at once, as the workers do.
        let queue = if to_fetch {
            &queues.fetch
        } else {
            &queues.jobs
        };
        let wait = if to_fetch {
            Duration::ZERO
        } else {
            cfg.queue_timeout
        };
        match queue.send_timeout(job, wait) {
            Ok(()) => {}
            Err(SendTimeoutError::Timeout(mut job)) => {
                warn!("{}: queue full; answering 503", shared.name);
                let _ = write_refusal(job.conn.stream(), &HttpError::new(503, "server busy"));
                handler.refused(peer, Some(&job.req), 503);
                linger_close(&mut job.conn);
                return;
            }
            Err(SendTimeoutError::Disconnected(_)) => return,
        }
        conn = match back_rx.recv() {
            Ok((mut conn, keep)) => {
                // What the client did not take while a pool thread had the connection is
                // written here, on the client's own thread, within the response deadline.
                conn.set_offload(false);
                let flushed = conn.flush_pending().is_ok();
                if keep && flushed {
                    conn
                } else {
                    // The exchange ended the connection, maybe while the client was still
                    // sending: read that off briefly so the answer is not lost to a reset.
                    let _ = conn.stream().shutdown(Shutdown::Write);
                    if flushed {
                        linger_close(&mut conn);
                    }
                    return;
                }
            }
            Err(_) => return,
        };
        if shared.shutting_down.load(Ordering::SeqCst) {
            return;
        }
    }
}

/// What the connection thread's own attempt at a request came to.
enum Inline<J> {
    /// Answered here; true if the connection may carry another request.
    Answered(bool),
    /// Deferred by the handler: straight to the fetch stage, with its job.
    Deferred(Request, J),
    /// Left to the workers.
    Declined(Request),
}

/// Lets the handler answer on the connection thread (`Handler::inline`).
fn serve_inline<H: Handler>(
    shared: &Shared,
    handler: &H,
    conn: &mut Conn,
    req: Request,
) -> Inline<H::Job> {
    let timeouts = exchange_timeouts(&shared.cfg);
    let mut ex = Exchange::new(req, conn, shared.cfg.max_body_bytes, timeouts);
    ex.watch_drain(Arc::clone(&shared.shutting_down));
    let step = match catch_unwind(AssertUnwindSafe(|| handler.inline(&mut ex))) {
        Ok(step) => step,
        Err(_) => {
            error!(
                "{}: inline handler panicked on {} {}",
                shared.name, ex.req.method, ex.req.target
            );
            ex.respond_error(500, "internal error", true);
            Step::Answered
        }
    };
    match step {
        Step::Defer(job) if ex.can_defer() => return Inline::Deferred(ex.into_request(), job),
        // Too late to hand it on (a handler bug): it runs here rather than be lost.
        Step::Defer(job) => handler.fetch(&mut ex, job),
        Step::Decline if !ex.response_started() => return Inline::Declined(ex.into_request()),
        Step::Decline | Step::Answered => {}
    }
    if !ex.response_started() {
        ex.respond_error(500, "internal error", true);
    }
    handler.finished(&ex);
    Inline::Answered(ex.complete())
}

/// Waits for and parses the next request head. `Ok(None)`: the client closed, or stayed
/// idle past `idle_timeout` between requests.
fn read_head(
    shared: &Shared,
    conn: &mut Conn,
    idle: &AtomicBool,
) -> Result<Option<Request>, HttpError> {
    let cfg = &shared.cfg;
    let idle_deadline = Instant::now() + cfg.idle_timeout;
    let mut head_deadline: Option<Instant> = None;
    loop {
        if !conn.buffered().is_empty() {
            // RFC 9112 §2.2: empty lines before a request line are ignored.
            let leading = conn
                .buffered()
                .iter()
                .take_while(|&&b| b == b'\r' || b == b'\n')
                .count();
            conn.consume(leading.min(4));
            // Empty lines alone do not start a request: the connection stays idle, so
            // a client that sent a stray CRLF after a body is closed quietly at the
            // idle timeout rather than sent a 408 it would take for its next answer.
            if !conn.buffered().is_empty() {
                match parse_head(conn.buffered(), &shared.limits, conn.peer)? {
                    Parsed::Complete(req, len) => {
                        conn.consume(len);
                        return Ok(Some(req));
                    }
                    Parsed::Partial => {}
                }
                head_deadline.get_or_insert_with(|| Instant::now() + cfg.header_timeout);
            }
        }
        let deadline = head_deadline.unwrap_or(idle_deadline);
        // Idle: nothing of a next request yet. A drain may close the socket now.
        let waiting_idle = conn.buffered().is_empty();
        idle.store(waiting_idle, Ordering::SeqCst);
        if waiting_idle && shared.shutting_down.load(Ordering::SeqCst) {
            return Ok(None);
        }
        let filled = conn.fill(deadline);
        idle.store(false, Ordering::SeqCst);
        match filled {
            Ok(0) => {
                if conn.buffered().is_empty() {
                    return Ok(None);
                }
                return Err(HttpError::new(
                    400,
                    "connection closed inside a request head",
                ));
            }
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                if head_deadline.is_some() {
                    return Err(HttpError::new(408, "request head not received in time"));
                }
                return Ok(None);
            }
            Err(_) => return Ok(None),
        }
        if shared.shutting_down.load(Ordering::SeqCst) && head_deadline.is_none() {
            return Ok(None);
        }
    }
}

/// Reads a small body (at most [`PREREAD_BODY`] bytes on the wire, Content-Length or
/// chunked) into the connection buffer before dispatch, within the body deadline. A
/// larger one is left to the exchange; a malformed one too (its decoder refuses it).
fn preread(conn: &mut Conn, req: &Request, timeouts: &ExchangeTimeouts) -> Result<(), HttpError> {
    let late = || HttpError::new(408, "request body not received in time");
    let closed = || HttpError::new(400, "connection closed inside the request body");
    loop {
        let have = conn.buffered().len();
        let complete = match req.framing {
            BodyFraming::None => return Ok(()),
            BodyFraming::Length(n) if n > PREREAD_BODY => return Ok(()),
            BodyFraming::Length(n) => have as u64 >= n,
            BodyFraming::Chunked => match chunked_length(conn.buffered()) {
                Ok(Some(_)) | Err(_) => true,
                Ok(None) if have as u64 > PREREAD_BODY => return Ok(()),
                Ok(None) => false,
            },
        };
        if complete {
            return Ok(());
        }
        match conn.fill(timeouts.body_deadline(req.received, have as u64)) {
            Ok(0) => return Err(closed()),
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::TimedOut => return Err(late()),
            Err(_) => return Err(closed()),
        }
    }
}

/// The deadlines every exchange of this server holds its client to.
fn exchange_timeouts(cfg: &ServerConfig) -> ExchangeTimeouts {
    ExchangeTimeouts {
        body: cfg.body_timeout,
        write: cfg.write_timeout,
        min_rate: cfg.min_rate_bytes_per_sec,
    }
}

/// After a refusal, read briefly what the client is still sending so the close does
/// not turn into a reset that destroys the error response in flight (RFC 9112 §9.6).
fn linger_close(conn: &mut Conn) {
    let deadline = Instant::now() + Duration::from_millis(200);
    let mut read = 0;
    while read < 64 * 1024 {
        conn.consume(conn.buffered().len());
        match conn.fill(deadline) {
            Ok(0) | Err(_) => return,
            Ok(n) => read += n,
        }
    }
}

/// Runs exchanges: on a worker (`fetch` is the fetch stage's queue) the handler's
/// `handle`, handing deferred exchanges on; on a fetch worker (`fetch` is None) the
/// handler's `fetch` for them.
fn worker<H: Handler>(
    shared: &Shared,
    jobs: &Receiver<Job<H::Job>>,
    fetch: Option<&Sender<Job<H::Job>>>,
    handler: &H,
) {
    let timeouts = exchange_timeouts(&shared.cfg);
    for job in jobs.iter() {
        let Job {
            mut conn,
            req,
            deferred,
            back,
        } = job;
        // Lent to this pool thread: what the client does not take at once is queued
        // for its own thread, so a slow reader never holds this one.
        conn.set_offload(true);
        let mut ex = Exchange::new(req, &mut conn, shared.cfg.max_body_bytes, timeouts);
        // Draining (now or before the answer starts): that answer is the connection's last.
        ex.watch_drain(Arc::clone(&shared.shutting_down));
        let step = catch_unwind(AssertUnwindSafe(|| match deferred {
            Some(job) => {
                handler.fetch(&mut ex, job);
                Step::Answered
            }
            None => handler.handle(&mut ex),
        }));
        let step = step.unwrap_or_else(|_| {
            error!(
                "{}: handler panicked on {} {}",
                shared.name, ex.req.method, ex.req.target
            );
            ex.respond_error(500, "internal error", true);
            Step::Answered
        });
        match (step, fetch) {
            (Step::Defer(job), Some(fetch)) if ex.can_defer() => {
                let req = ex.into_request();
                let job = Job {
                    conn,
                    req,
                    deferred: Some(job),
                    back,
                };
                let Err(full) = fetch.try_send(job) else {
                    continue;
                };
                // Every fetch worker busy and the queue full: a quick 503 keeps this
                // worker for the requests that need none.
                let Job {
                    mut conn,
                    req,
                    back,
                    ..
                } = full.into_inner();
                warn!(
                    "{}: {} {}: fetch queue full",
                    shared.name, req.method, req.target
                );
                let mut ex = Exchange::new(req, &mut conn, shared.cfg.max_body_bytes, timeouts);
                ex.respond_error(503, "server busy", true);
                handler.finished(&ex);
                let keep = ex.complete();
                let _ = back.send((conn, keep));
                continue;
            }
            // Deferred where it cannot be (from the fetch stage, or after the exchange
            // started): it runs here rather than be lost.
            (Step::Defer(job), _) => handler.fetch(&mut ex, job),
            (Step::Answered | Step::Decline, _) => {}
        }
        if !ex.response_started() {
            error!(
                "{}: handler gave no response to {} {}",
                shared.name, ex.req.method, ex.req.target
            );
            ex.respond_error(500, "internal error", true);
        }
        handler.finished(&ex);
        let keep = ex.complete();
        let _ = back.send((conn, keep));
    }
}
