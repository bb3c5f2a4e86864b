//! One client connection's thread: it reads and validates request heads (a slow or
//! half-sent head holds only this thread), reads small bodies, offers each request to the
//! handler inline, and hands the rest to the pools, one request at a time so answers
//! leave in order; what a pool thread could not write to a slow client is written here.
//!
//! Invariants: every read waits at most until a deadline from config; a refused head
//! closes the connection after its answer; a connection lent to a pool comes back (or
//! its channel disconnects) before the next request is read.

use std::io;
use std::net::{Shutdown, SocketAddr};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crossbeam_channel::{bounded, SendTimeoutError};
use log::{debug, error, warn};

use super::park::{Wake, PARK_AFTER};
use super::{
    exchange_timeouts, spawn_client, write_refusal, Client, Job, Shared, BUFFER_SLACK, PREREAD_BODY,
};
use crate::http::body::chunked_length;
use crate::http::conn::Conn;
use crate::http::exchange::{Exchange, ExchangeTimeouts};
use crate::http::handler::{Handler, Step};
use crate::http::parse::{parse_head, HttpError, Parsed};
use crate::http::socket::Socket;
use crate::http::{BodyFraming, Request};

/// Reads requests from one client and hands each to the worker pool, in order.
pub(super) fn serve_connection<H: Handler>(client: Client<H>, stream: Socket, peer: SocketAddr) {
    let shared = &client.shared;
    let cfg = &shared.cfg;
    if stream.set_nodelay().is_err() || stream.set_write_timeout(Some(cfg.write_timeout)).is_err() {
        return;
    }
    let mut conn = Conn::new(
        stream,
        peer,
        cfg.max_header_bytes + BUFFER_SLACK,
        cfg.write_timeout,
    );
    if cfg.proxy_protocol {
        let deadline = Instant::now() + cfg.header_timeout;
        if let Err(why) = super::proxy_protocol::accept(&mut conn, &cfg.trusted_proxies, deadline) {
            debug!("{}: {peer}: closed: {why}", shared.name);
            return;
        }
    }
    serve(client, conn);
}

/// Serves requests on `conn` until it closes, or parks it when it idles (see `park`).
fn serve<H: Handler>(client: Client<H>, mut conn: Conn) {
    let (shared, handler, queues, idle) = (
        &*client.shared,
        client.handler.as_ref(),
        &client.queues,
        &*client.idle,
    );
    let cfg = &shared.cfg;
    // The client a trusted balancer named, or the socket's peer.
    let peer = conn.peer;
    loop {
        let req = match read_head(shared, &mut conn, idle) {
            Ok(Next::Request(req)) => req,
            Ok(Next::Closed) => return,
            // Nothing of a next request for a while: the thread goes, the connection
            // waits in the parker.
            Ok(Next::Idle(since)) => return park(client, conn, since),
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

/// Parks an idle connection: its thread ends here, and it gets a new one when the
/// client sends its next request (or closes); it is closed at its idle deadline, as
/// `read_head` would have closed it.
fn park<H: Handler>(client: Client<H>, mut conn: Conn, idle_since: Instant) {
    use std::os::fd::{AsFd, AsRawFd};
    let shared = Arc::clone(&client.shared);
    if shared.shutting_down.load(Ordering::SeqCst) {
        return;
    }
    conn.release_buffer();
    client.idle.store(true, Ordering::SeqCst);
    let fd = conn.stream().as_fd().as_raw_fd();
    let deadline = idle_since + shared.cfg.idle_timeout;
    let resume = Box::new(move |wake: Wake| {
        if wake == Wake::Ready {
            client.idle.store(false, Ordering::SeqCst);
            let name = client.shared.name.clone();
            if let Err(e) = spawn_client(client, move |client| serve(client, conn)) {
                warn!("{name}: cannot start a connection thread: {e}");
            }
        }
        // Expired (or no thread): dropped here, the connection closes.
    });
    if let Err(resume) = shared.parker.park(fd, deadline, resume) {
        resume(Wake::Expired);
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

/// What waiting for a next request came to.
enum Next {
    Request(Request),
    /// The client closed, or stayed idle past `idle_timeout` between requests.
    Closed,
    /// Nothing of a next request for `PARK_AFTER` (idle since then): park it.
    Idle(Instant),
}

/// Waits for and parses the next request head.
fn read_head(shared: &Shared, conn: &mut Conn, idle: &AtomicBool) -> Result<Next, HttpError> {
    let cfg = &shared.cfg;
    let idle_since = Instant::now();
    let idle_deadline = idle_since + cfg.idle_timeout;
    let park_at = idle_since + PARK_AFTER;
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
                        return Ok(Next::Request(req));
                    }
                    Parsed::Partial => {}
                }
                head_deadline.get_or_insert_with(|| Instant::now() + cfg.header_timeout);
            }
        }
        // Idle: nothing of a next request yet. A drain may close the socket now.
        let waiting_idle = conn.buffered().is_empty();
        let deadline = match head_deadline {
            Some(d) => d,
            None if waiting_idle => idle_deadline.min(park_at),
            None => idle_deadline,
        };
        idle.store(waiting_idle, Ordering::SeqCst);
        if waiting_idle && shared.shutting_down.load(Ordering::SeqCst) {
            return Ok(Next::Closed);
        }
        let filled = conn.fill(deadline);
        idle.store(false, Ordering::SeqCst);
        match filled {
            Ok(0) => {
                if conn.buffered().is_empty() {
                    return Ok(Next::Closed);
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
                if conn.buffered().is_empty() && Instant::now() < idle_deadline {
                    return Ok(Next::Idle(idle_since));
                }
                return Ok(Next::Closed);
            }
            Err(_) => return Ok(Next::Closed),
        }
        if shared.shutting_down.load(Ordering::SeqCst) && head_deadline.is_none() {
            return Ok(Next::Closed);
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
