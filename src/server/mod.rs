//! The server: one acceptor thread per listener, a few I/O threads (`server.io_threads`,
//! one per core by default) that own every client connection, a fixed pool of workers
//! and a fixed pool of fetch workers, each fed by a bounded queue.
//!
//! An I/O thread waits on all its connections at once (epoll, through `mio`: readiness
//! notification, no async runtime) and never blocks: it reads and validates request
//! heads, pre-reads small bodies, offers each request to the handler inline
//! (`Handler::inline`: a hit in an in-process store is answered there, with no
//! hand-off), and writes responses as the sockets accept them. What may block goes to
//! the pools through the typed hand-off: what the handler defers (`Step::Defer`, its
//! own job, which would wait on the origin) straight to the fetch workers; the rest
//! (requests with a body, what the handler declines: a Redis lookup) to the workers,
//! whose `handle` may defer to the fetch workers in turn (`worker`). A connection is
//! lent to one pool thread at a time and comes back to its I/O thread with the response
//! written or queued (`io_loop`), so responses on a connection leave in request order
//! (pipelined requests wait in its buffer). An idle connection or a slow reader costs a
//! buffer, never a thread. A full queue is a 503, never an unbounded wait:
//! `workers + fetch_workers` bounds the requests that may block.
//!
//! Invariants: an accept error is logged and survived; a handler panic answers 500 (or
//! cuts an unfinished response) and the thread lives on; every read and write is bounded
//! by a deadline from config; at most `max_connections` connections are served at once.

use std::io;
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::os::unix::net::{UnixListener, UnixStream};

use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, Sender};
use log::{info, warn};

mod connection;
mod io_loop;
mod proxy_protocol;
mod worker;

use crate::config::{ListenAddr, ServerConfig};
use crate::http::conn::Conn;
use crate::http::exchange::ExchangeTimeouts;
use crate::http::handler::Handler;
use crate::http::parse::{HttpError, Limits};
use crate::http::response::Omit;
use crate::http::socket::Socket;
use crate::http::Request;
use io_loop::{Arrival, Back, LoopHandle};

use worker::worker;
/// Stack of a fetch worker: an origin client call and body copies (buffers on the heap).
const FETCH_STACK: usize = 512 * 1024;
/// Bodies up to this size are read by the connection thread before a worker is involved,
/// so a client that trickles a small body does not hold a worker.
const PREREAD_BODY: u64 = 64 * 1024;
/// Extra buffer beyond the largest head, for pipelined requests and pre-read bodies.
const BUFFER_SLACK: usize = PREREAD_BODY as usize + 16 * 1024;

/// Where an I/O thread sends exchanges: the worker pool and the fetch pool.
struct Queues<J> {
    jobs: Sender<Job<J>>,
    fetch: Sender<Job<J>>,
}

/// An exchange on its way to a pool: for the fetch pool with the handler's job.
struct Job<J> {
    conn: Conn,
    req: Request,
    deferred: Option<J>,
    /// Where the connection goes back after the exchange (its I/O thread), with
    /// whether it may carry another request.
    back: Back<J>,
}

struct Shared {
    name: String,
    cfg: ServerConfig,
    limits: Limits,
    shutting_down: Arc<AtomicBool>,
    open: AtomicUsize,
    /// The depths of the worker and fetch queues.
    queued: Box<dyn Fn() -> (usize, usize) + Send + Sync>,
    /// What the handler leaves out of its answers, left out of every exchange's answer
    /// and of the server's own refusals too.
    omit: Omit,
}

/// One client connection's open-connections slot, given back when it is dropped.
pub(super) struct Slot(Arc<Shared>);

impl Drop for Slot {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::SeqCst);
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

/// A bound listener: TCP, or a Unix stream socket.
pub enum Listener {
    Tcp(TcpListener),
    /// With the path it is bound to (removed when the server stops).
    Unix(UnixListener, std::path::PathBuf),
}

/// What a Unix socket's client is reported as (access log, `X-Forwarded-For`, the
/// PROXY protocol's trust check): a process on this machine, with no address of its own.
pub const UNIX_PEER: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(std::net::Ipv4Addr::LOCALHOST), 0);

impl Listener {
    fn accept(&self) -> io::Result<(Socket, SocketAddr)> {
        match self {
            Listener::Tcp(l) => l.accept().map(|(s, peer)| (Socket::Tcp(s), peer)),
            Listener::Unix(l, _) => l.accept().map(|(s, _)| (Socket::Unix(s), UNIX_PEER)),
        }
    }

    fn local_addr(&self) -> io::Result<ListenAddr> {
        match self {
            Listener::Tcp(l) => l.local_addr().map(ListenAddr::Tcp),
            Listener::Unix(_, path) => Ok(ListenAddr::Unix(path.clone())),
        }
    }
}

impl From<TcpListener> for Listener {
    fn from(l: TcpListener) -> Listener {
        Listener::Tcp(l)
    }
}

/// Addresses for the log: `127.0.0.1:8080, unix:/run/echo.sock`.
fn listing(addrs: &[ListenAddr]) -> String {
    addrs
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// A running server; dropping it shuts it down.
pub struct ServerHandle {
    /// Every address it listens on (one acceptor thread each).
    addrs: Vec<ListenAddr>,
    shared: Arc<Shared>,
    acceptors: Vec<JoinHandle<()>>,
    /// Wakes the I/O threads (a drain has begun).
    wake_loops: Box<dyn Fn() + Send + Sync>,
}

impl ServerHandle {
    /// The first TCP address it listens on (`0.0.0.0:0` when it listens on Unix
    /// sockets only).
    pub fn local_addr(&self) -> SocketAddr {
        self.addrs
            .iter()
            .find_map(|a| match a {
                ListenAddr::Tcp(addr) => Some(*addr),
                ListenAddr::Unix(_) => None,
            })
            .unwrap_or_else(|| SocketAddr::from(([0, 0, 0, 0], 0)))
    }

    /// Every address it listens on.
    pub fn local_addrs(&self) -> &[ListenAddr] {
        &self.addrs
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
        for acceptor in self.acceptors.drain(..) {
            let _ = acceptor.join();
        }
    }

    /// Stops accepting, and ends every connection once its current exchange is done.
    pub fn shutdown(&mut self) {
        if self.shared.shutting_down.swap(true, Ordering::SeqCst) {
            return;
        }
        // Wake each acceptor out of accept(); when it ends, its listener closes and new
        // connections are refused.
        for addr in &self.addrs {
            match addr {
                ListenAddr::Tcp(addr) => {
                    let _ = TcpStream::connect_timeout(addr, Duration::from_secs(1));
                }
                ListenAddr::Unix(path) => {
                    let _ = UnixStream::connect(path);
                }
            }
        }
        for acceptor in self.acceptors.drain(..) {
            let _ = acceptor.join();
        }
        // A Unix socket's file goes with its listener (as nginx removes its own).
        for addr in &self.addrs {
            if let ListenAddr::Unix(path) = addr {
                let _ = std::fs::remove_file(path);
            }
        }
        // Each I/O thread closes its idle connections, and the others as they finish.
        self.wake_loops();
        info!(
            "{}: stopped accepting on {}",
            self.shared.name,
            listing(&self.addrs)
        );
    }

    fn wake_loops(&self) {
        (self.wake_loops)();
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
            // A connection that finished its exchange is closed by its I/O thread.
            self.wake_loops();
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

/// Starts serving `listeners` (at least one) with `handler`; `name` labels threads and
/// logs.
pub fn start<H: Handler>(
    name: &str,
    listeners: Vec<Listener>,
    cfg: ServerConfig,
    handler: Arc<H>,
) -> io::Result<ServerHandle> {
    let addrs = listeners
        .iter()
        .map(Listener::local_addr)
        .collect::<io::Result<Vec<_>>>()?;
    if addrs.is_empty() {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "no listener"));
    }
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
        queued,
        omit: handler.omit(),
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
    let loops = (0..shared.cfg.io_threads)
        .map(|i| {
            let queues = Queues {
                jobs: jobs_tx.clone(),
                fetch: fetch_tx.clone(),
            };
            io_loop::start(&shared, &handler, queues, i)
        })
        .collect::<io::Result<Vec<_>>>()?;
    let mut acceptors = Vec::with_capacity(listeners.len());
    for listener in listeners {
        let shared = Arc::clone(&shared);
        let loops = loops.clone();
        acceptors.push(
            thread::Builder::new()
                .name(format!("{name}-acceptor"))
                .spawn(move || accept_loop(&shared, &listener, &loops))?,
        );
    }
    info!(
        "{name}: listening on {} with {} I/O threads and {} workers",
        listing(&addrs),
        shared.cfg.io_threads,
        shared.cfg.workers
    );
    Ok(ServerHandle {
        addrs,
        shared,
        acceptors,
        wake_loops: Box::new(move || {
            for l in &loops {
                l.wake();
            }
        }),
    })
}

/// Accepts connections on `listener` and hands them to the I/O threads in turn.
fn accept_loop<J>(shared: &Arc<Shared>, listener: &Listener, loops: &[LoopHandle<J>]) {
    let mut last_warning: Option<Instant> = None;
    // A descriptor kept in reserve: out of descriptors, it is given up for a moment so a
    // waiting client can be accepted and told 503, instead of hanging in the backlog.
    let mut spare = std::fs::File::open("/dev/null").ok();
    let mut next = 0usize;
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
                        refuse_over_limit(stream, shared.omit);
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
            refuse_over_limit(stream, shared.omit);
            continue;
        }
        shared.open.fetch_add(1, Ordering::SeqCst);
        let slot = Slot(Arc::clone(shared));
        loops[next % loops.len()].send(Arrival::New(stream, peer, slot));
        next = next.wrapping_add(1);
    }
}

fn refuse_over_limit(stream: Socket, omit: Omit) {
    let _ = stream.set_write_timeout(Some(Duration::from_millis(100)));
    let _ = write_refusal(&stream, &HttpError::new(503, "too many connections"), omit);
}

fn write_refusal(mut stream: &Socket, e: &HttpError, omit: Omit) -> io::Result<()> {
    use std::io::Write;
    stream.write_all(&connection::refusal(e, omit))?;
    let _ = stream.shutdown(Shutdown::Write);
    Ok(())
}

/// The deadlines every exchange of this server holds its client to.
fn exchange_timeouts(cfg: &ServerConfig) -> ExchangeTimeouts {
    ExchangeTimeouts {
        body: cfg.body_timeout,
        write: cfg.write_timeout,
        min_rate: cfg.min_rate_bytes_per_sec,
    }
}
