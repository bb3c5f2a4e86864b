//! The pools' threads: a worker runs the handler's `handle` (handing what it defers to
//! the fetch pool), a fetch worker runs the handler's `fetch` for deferred jobs.
//!
//! Invariants: a handler panic answers 500 (or cuts an unfinished response) and the
//! thread lives on; every exchange is answered; the connection always goes back to its
//! thread, lent with writes queued rather than waited on (a slow reader holds no pool
//! thread); a full fetch queue is a 503, never a wait.

use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;

use crossbeam_channel::{Receiver, Sender};
use log::{error, warn};

use super::{exchange_timeouts, Job, Shared};
use crate::http::exchange::Exchange;
use crate::http::handler::{Handler, Step};

/// Runs exchanges: on a worker (`fetch` is the fetch stage's queue) the handler's
/// `handle`, handing deferred exchanges on; on a fetch worker (`fetch` is None) the
/// handler's `fetch` for them.
pub(super) fn worker<H: Handler>(
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
        ex.omit(shared.omit);
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
                ex.omit(shared.omit);
                ex.respond_error(503, "server busy", true);
                handler.finished(&ex);
                let keep = ex.complete();
                back.send(conn, keep);
                continue;
            }
            (Step::Wait(waiting), _) if ex.can_defer() => {
                // Back to its I/O thread, to wait there without a thread.
                let req = ex.into_request();
                back.wait(conn, req, waiting);
                continue;
            }
            // Deferred where it cannot be (from the fetch stage, or after the exchange
            // started): it runs here rather than be lost.
            (Step::Defer(job), _) => handler.fetch(&mut ex, job),
            (Step::Wait(waiting), _) => {
                error!(
                    "{}: handler asked to wait on {} {} after answering",
                    shared.name, ex.req.method, ex.req.target
                );
                drop(waiting);
                ex.respond_error(500, "internal error", true);
            }
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
        back.send(conn, keep);
    }
}
