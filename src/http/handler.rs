//! The seam between a front end (`server`, which owns sockets and threads) and what
//! answers requests (the cache, the admin API): a handler looks at an [`Exchange`] and
//! says what it did with it ([`Step`]). Work that may block on another service goes back
//! to the front end as the handler's own typed job, to be run on the fetch pool; the
//! front end never learns what is inside it. Work that waits on another exchange (a
//! fetch of the same key) waits in the front end without a thread ([`Waiting`]).
//!
//! Invariants: a handler answers every exchange it does not defer or decline; a deferred
//! or declined exchange is untouched (no response started, none of its body read), so
//! it can be run afresh elsewhere; nothing here knows what a cache is.

use std::net::SocketAddr;
use std::time::Instant;

use super::exchange::Exchange;
use super::response::Omit;
use super::Request;

/// What a handler did with an exchange.
#[derive(Debug)]
pub enum Step<J> {
    /// It answered (or started answering).
    Answered,
    /// Run this job on the fetch pool, where waiting on another service holds no thread
    /// that answers hits: `Handler::fetch` gets it with the exchange.
    Defer(J),
    /// Not here: give the exchange to the worker pool (`Handler::handle`). Only the
    /// inline path may decline.
    Decline,
    /// Wait for other work (another request's fetch of the same key) holding no
    /// thread, then run the job on the fetch pool (`Handler::fetch`).
    Wait(Waiting<J>),
}

/// What an exchange waits for, told as the front end needs it.
pub trait Await: Send {
    /// Until when to wait; asked again when it passes (the work may have pushed it on).
    fn deadline(&self) -> Instant;
    /// Calls `wake` once when the work is done (now, if it is). It must not block.
    fn on_done(&self, wake: Box<dyn FnOnce() + Send>);
}

/// An exchange waiting without a thread ([`Step::Wait`]): when `until` is done or its
/// deadline passes, `job` runs on the fetch pool.
pub struct Waiting<J> {
    pub job: J,
    pub until: Box<dyn Await>,
}

impl<J> std::fmt::Debug for Waiting<J> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Waiting").finish_non_exhaustive()
    }
}

/// What answers the requests of one listener.
pub trait Handler: Send + Sync + 'static {
    /// What `inline` and `handle` hand to the fetch pool.
    type Job: Send + 'static;

    /// On an I/O thread, before any hand-off: answer what needs no blocking call (a hit
    /// in an in-process store), defer what waits on another service, decline the rest.
    /// Must not block at all: the I/O thread serves many clients.
    fn inline(&self, ex: &mut Exchange<'_>) -> Step<Self::Job> {
        let _ = ex;
        Step::Decline
    }

    /// On an I/O thread, when a waiting exchange's wait is over (`Step::Wait`): answer
    /// what needs no blocking call, or defer the job (the default) to the fetch pool.
    /// Must not block.
    fn resume(&self, ex: &mut Exchange<'_>, job: Self::Job) -> Step<Self::Job> {
        let _ = ex;
        Step::Defer(job)
    }

    /// On a worker: answer, or defer. (`Decline` here is answered 500.)
    fn handle(&self, ex: &mut Exchange<'_>) -> Step<Self::Job>;

    /// On a fetch worker: run a deferred job; it answers the exchange.
    fn fetch(&self, ex: &mut Exchange<'_>, job: Self::Job);

    /// Once per answered exchange, after its response (access log, metrics).
    fn finished(&self, ex: &Exchange<'_>) {
        let _ = ex;
    }

    /// When the front end itself refused a request (`status`): a malformed or oversized
    /// head, a head or body not received in time, a full queue. `request` is the
    /// request when it was parsed.
    fn refused(&self, peer: SocketAddr, request: Option<&Request>, status: u16) {
        let _ = (peer, request, status);
    }

    /// Fields this handler leaves out of every answer, the front end's own refusals
    /// included (read once, when the server starts).
    fn omit(&self) -> Omit {
        Omit::default()
    }
}
