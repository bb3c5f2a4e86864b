//! What an I/O thread does with a complete request: pre-reads a small body, answers it
//! inline, lends it to a pool, keeps it waiting (`Step::Wait`), or refuses it; and what
//! it does when a deadline passes.
//!
//! Invariants: as in `io_loop`; a request refused here gets Echo's own answer and its
//! connection closes after it; a connection waiting for the worker queue gets a 503 at
//! `queue_timeout`, never an unbounded wait.

use std::time::Instant;

use crossbeam_channel::TrySendError;
use log::{debug, warn};

use super::super::connection::{body_deadline, body_ready, refusal, serve_inline, Inline};
use super::super::Job;
use super::{Arrival, Back, Entry, IoLoop, Phase};
use crate::http::conn::over_queue_bound;
use crate::http::handler::{Handler, Waiting};
use crate::http::parse::HttpError;
use crate::http::{BodyFraming, Request};

impl<H: Handler> IoLoop<H> {
    /// A complete head: pre-read a small body, or hand the request on.
    pub(super) fn start_request(&mut self, id: u64, e: &mut Entry<H::Job>, req: Request) {
        // Only a connection here has a request to start; anything else is closed.
        let Some(conn) = e.conn.as_ref() else {
            e.phase = Phase::Close;
            return;
        };
        if body_ready(conn, &req) {
            self.dispatch(id, e, req);
        } else {
            let deadline = body_deadline(&self.shared, conn, &req);
            e.phase = Phase::Body(req);
            self.set_deadline(id, e, Some(deadline));
        }
    }

    /// Answers inline what the handler can, lends the rest to a pool.
    pub(super) fn dispatch(&mut self, id: u64, e: &mut Entry<H::Job>, req: Request) {
        e.phase = Phase::Lent;
        let Some(conn) = e.conn.as_mut() else {
            e.phase = Phase::Close;
            return;
        };
        // With too much output queued for slow readers process-wide, answers are left to
        // the pools, whose writes wait for their clients.
        if req.framing != BodyFraming::None || over_queue_bound() {
            return self.lend(id, e, req, None);
        }
        let inline = serve_inline(&self.shared, self.handler.as_ref(), conn, req, None);
        self.after_inline(id, e, inline);
    }

    /// What the handler did on this thread decides where the connection goes next.
    fn after_inline(&mut self, id: u64, e: &mut Entry<H::Job>, inline: Inline<H::Job>) {
        match inline {
            Inline::Answered(keep) => e.phase = Phase::Flush { keep },
            Inline::Deferred(req, job) => self.lend(id, e, req, Some(job)),
            Inline::Declined(req) => self.lend(id, e, req, None),
            Inline::Wait(req, waiting) => self.wait(id, e, req, waiting),
        }
    }

    /// Keeps a request waiting (`Step::Wait`) until what it waits for is done or its
    /// deadline passes.
    pub(super) fn wait(
        &mut self,
        id: u64,
        e: &mut Entry<H::Job>,
        req: Request,
        waiting: Waiting<H::Job>,
    ) {
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
    pub(super) fn resume(
        &mut self,
        id: u64,
        e: &mut Entry<H::Job>,
        req: Request,
        waiting: Waiting<H::Job>,
    ) {
        self.set_deadline(id, e, None);
        let Some(conn) = e.conn.as_mut() else {
            e.phase = Phase::Close;
            return;
        };
        let job = Some(waiting.job);
        let inline = serve_inline(&self.shared, self.handler.as_ref(), conn, req, job);
        self.after_inline(id, e, inline);
    }

    /// Hands the connection and its request to a pool thread: the fetch pool with a
    /// deferred job (a full queue is a 503 at once), the workers otherwise (a full queue
    /// is waited on until `queue_timeout`, then a 503).
    pub(super) fn lend(
        &mut self,
        id: u64,
        e: &mut Entry<H::Job>,
        req: Request,
        deferred: Option<H::Job>,
    ) {
        let Some(mut conn) = e.conn.take() else {
            e.phase = Phase::Close;
            return;
        };
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
    pub(super) fn busy(&mut self, id: u64, e: &mut Entry<H::Job>, job: Job<H::Job>) {
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
    pub(super) fn refuse(
        &mut self,
        id: u64,
        e: &mut Entry<H::Job>,
        err: &HttpError,
        req: Option<&Request>,
    ) {
        let Some(conn) = e.conn.as_mut() else {
            e.phase = Phase::Close;
            return;
        };
        debug!("{}: {}: refused: {err}", self.shared.name, conn.peer);
        let deadline = Instant::now() + self.shared.cfg.write_timeout;
        conn.set_write_deadline(deadline);
        let _ = conn.write_all(&refusal(err, self.shared.omit));
        self.handler.refused(conn.peer, req, err.status);
        e.phase = Phase::Flush { keep: false };
        self.set_deadline(id, e, Some(deadline));
    }

    /// Requests waiting for the worker queue, in order, while it has room.
    pub(super) fn retry_waiting(&mut self) {
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
    pub(super) fn expire(&mut self) {
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
    pub(super) fn close_idle(&mut self) {
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
