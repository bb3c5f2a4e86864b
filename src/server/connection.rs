//! What an I/O thread does with one connection's bytes, each step without blocking:
//! finds the next request head in its buffer (today's strict parser and limits), tells
//! when a small body is all in, and lets the handler answer a request inline.
//!
//! Invariants: nothing here reads from or waits on the socket (the I/O thread does,
//! when it is ready); a request is handed on only once its head is complete and valid;
//! an inline exchange that is not answered is untouched, to be run afresh by a pool.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use std::time::Instant;

use log::error;

use super::{exchange_timeouts, Shared, PREREAD_BODY};
use crate::http::body::chunked_length;
use crate::http::conn::Conn;
use crate::http::exchange::Exchange;
use crate::http::handler::{Handler, Step, Waiting};
use crate::http::parse::{parse_head, HttpError, Parsed};
use crate::http::response::Omit;
use crate::http::{BodyFraming, Request};

/// The next request head in the connection's buffer, if it is all there. Empty lines
/// before a request line are skipped (RFC 9112 §2.2), a few at a time: empty lines
/// alone do not start a request, so a client that sent a stray CRLF after a body stays
/// idle (closed quietly at the idle timeout, not sent a 408 it would take for its next
/// answer).
pub(super) fn next_head(shared: &Shared, conn: &mut Conn) -> Result<Option<Request>, HttpError> {
    let leading = conn
        .buffered()
        .iter()
        .take_while(|&&b| b == b'\r' || b == b'\n')
        .count();
    conn.consume(leading.min(4));
    if conn.buffered().is_empty() {
        return Ok(None);
    }
    match parse_head(conn.buffered(), &shared.limits, conn.peer)? {
        Parsed::Complete(req, len) => {
            conn.consume(len);
            Ok(Some(req))
        }
        Parsed::Partial => Ok(None),
    }
}

/// Is the request ready to be handed on? A small body (at most [`PREREAD_BODY`] bytes on
/// the wire, Content-Length or chunked) is read into the buffer first, so a client that
/// trickles it holds no pool thread; a larger one is left to the exchange, a malformed
/// one too (its decoder refuses it). A client that waits for `100 Continue` is handed on
/// at once.
pub(super) fn body_ready(conn: &Conn, req: &Request) -> bool {
    if req.expect_continue {
        return true;
    }
    let have = conn.buffered().len() as u64;
    match req.framing {
        BodyFraming::None => true,
        BodyFraming::Length(n) => n > PREREAD_BODY || have >= n,
        BodyFraming::Chunked => match chunked_length(conn.buffered(), PREREAD_BODY as usize) {
            Ok(Some(_)) | Err(_) => true,
            Ok(None) => have > PREREAD_BODY,
        },
    }
}

/// When the body being pre-read must be in.
pub(super) fn body_deadline(shared: &Shared, conn: &Conn, req: &Request) -> Instant {
    exchange_timeouts(&shared.cfg).body_deadline(req.received, conn.buffered().len() as u64)
}

/// What the I/O thread's own attempt at a request came to.
pub(super) enum Inline<J> {
    /// Answered (its output queued on the connection); true if the connection may carry
    /// another request.
    Answered(bool),
    /// Deferred by the handler: straight to the fetch stage, with its job.
    Deferred(Request, J),
    /// Left to the workers.
    Declined(Request),
    /// Waits for other work, holding no thread, then runs its job on the fetch pool.
    Wait(Request, Waiting<J>),
}

/// Lets the handler answer on the I/O thread (`Handler::inline`, or `Handler::resume`
/// with the job of a request whose wait is over); the connection is non-blocking, so
/// every write queues what the socket does not take.
pub(super) fn serve_inline<H: Handler>(
    shared: &Shared,
    handler: &H,
    conn: &mut Conn,
    req: Request,
    resumed: Option<H::Job>,
) -> Inline<H::Job> {
    let timeouts = exchange_timeouts(&shared.cfg);
    let mut ex = Exchange::new(req, conn, shared.cfg.max_body_bytes, timeouts);
    ex.omit(shared.omit);
    ex.watch_drain(Arc::clone(&shared.shutting_down));
    let run = AssertUnwindSafe(|| match resumed {
        Some(job) => handler.resume(&mut ex, job),
        None => handler.inline(&mut ex),
    });
    let step = match catch_unwind(run) {
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
        Step::Decline if !ex.response_started() => return Inline::Declined(ex.into_request()),
        Step::Wait(waiting) if ex.can_defer() => return Inline::Wait(ex.into_request(), waiting),
        // Too late to hand it on (a handler bug): cut it rather than block this thread.
        Step::Defer(_) | Step::Wait(_) => {
            error!(
                "{}: inline handler deferred {} {} after answering",
                shared.name, ex.req.method, ex.req.target
            );
            ex.respond_error(500, "internal error", true);
        }
        Step::Decline | Step::Answered => {}
    }
    if !ex.response_started() {
        ex.respond_error(500, "internal error", true);
    }
    handler.finished(&ex);
    Inline::Answered(ex.complete())
}

/// Echo's own answer to a request it refuses before any handler sees it; the connection
/// closes after it.
/// `omit`: the handler's, so `cache.expose_status_headers = false` holds here too.
pub(super) fn refusal(e: &HttpError, omit: Omit) -> Vec<u8> {
    let body = format!("echo: {}\n", e.reason);
    let retry = if e.status == 503 {
        "retry-after: 1\r\n"
    } else {
        ""
    };
    let status = if omit.omits("x-cache-status") {
        ""
    } else {
        "x-cache-status: BYPASS\r\n"
    };
    let [(_, date), _] = crate::http::own_fields();
    format!(
        "HTTP/1.1 {} {}\r\ndate: {}\r\nvia: 1.1 echo\r\ncontent-type: text/plain; charset=utf-8\r\ncache-control: no-store\r\n{status}{retry}content-length: {}\r\nconnection: close\r\n\r\n{body}",
        e.status,
        crate::http::reason(e.status),
        String::from_utf8_lossy(&date),
        body.len()
    )
    .into_bytes()
}
