//! One origin fetch per key: the leader of a key's flight (and, on a shared store,
//! the holder of its cluster-wide fill lock) fetches; the others wait and answer from
//! what it stored, or fetch themselves when its answer may not be shared. A fill is a
//! conditional GET when a stale copy with validators exists (RFC 9111 §4.3): a 304
//! freshens that copy, a full answer replaces it.
//!
//! Invariants: a fill lock is released on every path (its guard's drop), after the fill
//! has stored; nothing is stored that an invalidation since the lookup names (the
//! store checks the generation the fill began at), nor after `invalidation.ban_ttl`;
//! a fill request carries none of the client's preconditions (see `forward`).

use std::cell::Cell;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use log::debug;

use super::coalesce::{FlightWatch, Join, Outcome as FlightOutcome, Permit, Subscribe};
use super::compress;
use super::forward::{final_response, response_headers};
use super::hit::{serve_stale_on_error, serve_stored};
use super::outcome::{Fwd, OriginTrouble, Outcome};
use super::{Cache, Job, Since, StaleCopy};
use crate::http::exchange::Exchange;
use crate::http::handler::{Await, Step, Waiting};
use crate::http::{headers, Headers};
use crate::key::CacheKey;
use crate::policy::{self, AfterNotModified, CacheControl, PolicyOptions, Storability};
use crate::store::{Entry, FillLockAttempt, Store};
use crate::upstream::{OriginError, OriginRequest, Phase};

/// How long after a lease's announced end a waiting node looks again (the holder's
/// renewal in flight, clocks).
const LEASE_SLACK: Duration = Duration::from_millis(50);

/// What may answer if revalidation fails (RFC 5861 stale-if-error; RFC 9111 §5.2.2.2).
#[derive(Debug, Clone, Copy, Default)]
pub struct Fallback {
    /// The stale copy may answer when the origin fails.
    pub(super) if_error: bool,
    /// It may never answer stale: an unreachable origin is a 504.
    pub(super) never_stale: bool,
}

/// A response on its way into the store: everything but the body, which is collected
/// as it streams to the client.
pub(super) struct Fill<'k> {
    pub(super) key: &'k CacheKey,
    pub(super) since: Since,
    pub(super) entry: Entry,
    /// Whom it fills for: its waiters wait on while the body arrives.
    pub(super) lead: &'k Lead,
}

/// A stored entry for a response (its body still to come): the stored fields, the Vary
/// values of the request as it was sent to the origin (`sent`), the origin's Age folded into the initial age, and the
/// `Surrogate-Key` tags. The fields a qualified `private` names are left out (RFC 9111
/// §5.2.2.7: "a shared cache MUST NOT store the specified field name(s)").
pub(super) fn new_entry(
    sent: &Headers,
    base: &Headers,
    status: u16,
    freshness: Duration,
    (request_time, response_time): (SystemTime, SystemTime),
    opts: &PolicyOptions,
) -> Entry {
    let vary = match policy::vary(base) {
        policy::Vary::Fields(fields) => policy::vary_snapshot(&fields, sent),
        _ => Vec::new(),
    };
    // The origin's Age goes into the initial age; hits send their own Age.
    let initial_age = policy::corrected_initial_age(base, request_time, response_time);
    let private = CacheControl::for_cache(base, opts).private_fields;
    let mut headers = base.clone();
    headers.retain(|(n, _)| n != "age" && !private.contains(n));
    // Surrogate-Key: space-separated tags an invalidation can name.
    let tags = headers::header_joined(&headers, "surrogate-key")
        .map(|v| {
            v.split([' ', ','])
                .filter(|t| !t.is_empty())
                .map(str::to_string)
                .collect()
        })
        .unwrap_or_default();
    Entry {
        status,
        headers,
        body: Vec::new(),
        file: None,
        response_time,
        initial_age,
        freshness,
        vary,
        tags,
    }
}

/// The `stored` response freshened by a 304: its fields updated to `headers`, its
/// content the stored one, its age started again from the 304's Age and Date and this
/// exchange's request and response times (RFC 9111 §4.2.3, in `new_entry`).
pub(super) fn freshened(
    stored: &Entry,
    sent: &Headers,
    headers: &Headers,
    freshness: Duration,
    times: (SystemTime, SystemTime),
    opts: &PolicyOptions,
) -> Entry {
    let mut entry = new_entry(sent, headers, stored.status, freshness, times, opts);
    entry.body = stored.body.clone();
    entry.file = stored.file.clone();
    entry
}

/// Whom a fill fetches for.
pub(crate) enum Lead {
    /// Every request for its key: this request leads the key's flight on this node, and
    /// holds the cluster-wide fill lock when there is one (None: the store could not
    /// be asked; this node alone is coalesced).
    Leader {
        permit: Permit,
        lock: Option<FillLock>,
    },
    /// Itself only: the flight it followed failed or was left, or what it stored does
    /// not answer this request.
    Alone,
    /// Itself, side by side with the others: the key's answers were found not to be
    /// shareable a moment ago (hit-for-pass).
    Pass,
}

impl Lead {
    /// The fill learned its answer cannot be shared: the key is remembered as such, and
    /// the waiters (here and on other nodes) are released at once to fetch side by side.
    pub(super) fn not_shared(&self, cache: &Cache, key: &CacheKey) {
        if let Lead::Leader { permit, lock } = self {
            if !permit.finished() {
                cache.remember_pass(key);
                permit.finish(FlightOutcome::NotShared);
                if let Some(lock) = lock {
                    lock.release();
                }
            }
        }
    }

    /// The fill is alive and making progress (a body read): its waiters wait on.
    pub(super) fn progress(&self, by: Duration) {
        if let Lead::Leader { permit, .. } = self {
            permit.extend(by);
        }
    }
}

impl Cache {
    /// One origin fetch per key at a time, decided before the fetch pool is involved: a
    /// request that waits for another's fetch waits in the front end (`Step::Wait`),
    /// holding no thread, and any number may wait. The first request for a key leads (with a shared store it also takes the
    /// cluster-wide fill lock, or waits for the node that holds it); the others wait
    /// for it and answer from the store (`collapsed`), or fetch themselves when its
    /// answer may not be shared (at once, side by side), it failed, or it stopped making
    /// progress. A key remembered as uncacheable is fetched without waiting.
    pub(super) fn coalesce(
        &self,
        ex: &mut Exchange<'_>,
        key: CacheKey,
        fwd: Fwd,
        since: Since,
        stale: Option<StaleCopy>,
    ) -> Step<Job> {
        if self.is_pass(&key) {
            self.metrics.hit_for_pass.inc();
            return fill_job(&key, fwd, since, &stale)(Lead::Pass);
        }
        match self.coalescer.subscribe(key.as_str()) {
            Subscribe::Leader(permit) => {
                self.lead(ex, &key, permit, fill_job(&key, fwd, since, &stale))
            }
            // Waits in the front end, holding no thread, until the leader is done.
            Subscribe::Follower(follower) => {
                let until = Box::new(FlightWait(follower.watch()));
                Step::Wait(Waiting {
                    job: Job::Follow {
                        key,
                        fwd,
                        since,
                        stale,
                        follower,
                    },
                    until,
                })
            }
        }
    }

    /// A follower's wait is over (`joined`): answer from what its leader stored, or
    /// fetch (alone, or side by side when the answer may not be shared).
    pub(super) fn followed(
        &self,
        ex: &mut Exchange<'_>,
        key: CacheKey,
        fwd: Fwd,
        since: Since,
        stale: Option<StaleCopy>,
        joined: Join,
    ) -> Step<Job> {
        let fill = fill_job(&key, fwd, since, &stale);
        match joined {
            #[cfg(test)]
            Join::Leader(_) => unreachable!("a follower's wait never leads"),
            Join::Followed {
                outcome: FlightOutcome::Stored,
                waited,
            } => {
                if self.serve_collapsed(ex, &key, waited) {
                    Step::Answered
                } else {
                    fill(Lead::Alone)
                }
            }
            Join::Followed {
                outcome: FlightOutcome::NotShared,
                ..
            } => {
                self.metrics.hit_for_pass.inc();
                fill(Lead::Pass)
            }
            Join::Followed {
                outcome: FlightOutcome::Failed,
                ..
            } => fill(Lead::Alone),
            Join::TimedOut { waited } => {
                debug!("{key}: its leader made no progress for {waited:?}; fetching");
                fill(Lead::Alone)
            }
        }
    }

    /// This node's leader of `key`: with a shared store, takes the cluster-wide fill
    /// lock, or waits for the node that holds it (woken by its release, or at the end of
    /// its lease, which a live holder renews: a dead one is taken over) and answers from
    /// what it stored. Then fills with `fill`.
    fn lead(
        &self,
        ex: &mut Exchange<'_>,
        key: &CacheKey,
        permit: Permit,
        fill: impl Fn(Lead) -> Step<Job>,
    ) -> Step<Job> {
        let started = Instant::now();
        let mut took_over = false;
        loop {
            // Registered before the lock is tried, so no release can be missed.
            let waiter = self.store.fill_waiter(key);
            let owner = self.next_owner();
            let attempt = self
                .store
                .lock_fill_and_look(key, &owner, self.coalesce_lock_ttl);
            match attempt {
                Ok(FillLockAttempt::Taken(look)) => {
                    drop(waiter);
                    // Released on every path (drop), after the fill has stored.
                    let lock = FillLock {
                        store: Arc::clone(&self.store),
                        key: key.clone(),
                        owner,
                        released: Cell::new(false),
                    };
                    if took_over {
                        self.metrics.fill_lock_takeovers.inc();
                    }
                    // A fill that finished between this request's lookup and its lock
                    // (here or on another node) has left what it fetched: the look
                    // taken with the lock, where writes land, before fetching again.
                    if look.is_some_and(|l| self.serve_lookup(ex, key, &l, started.elapsed())) {
                        permit.finish(FlightOutcome::Stored);
                        return Step::Answered;
                    }
                    return fill(Lead::Leader {
                        permit,
                        lock: Some(lock),
                    });
                }
                Ok(FillLockAttempt::Pass) => {
                    self.remember_pass_locally(key);
                    permit.finish(FlightOutcome::NotShared);
                    self.metrics.hit_for_pass.inc();
                    return fill(Lead::Pass);
                }
                Ok(FillLockAttempt::Held { expires_in }) => {
                    // Another node fetches: this node's followers wait as long as it may.
                    let until_end = expires_in + LEASE_SLACK;
                    permit.extend(until_end + self.lead_allowance);
                    let woken = waiter.wait(until_end);
                    if let Ok(look) = self.store.get_latest(key) {
                        if self.serve_lookup(ex, key, &look, started.elapsed()) {
                            permit.finish(FlightOutcome::Stored);
                            return Step::Answered;
                        }
                    }
                    // Released without storing (its answer not shareable: the next try
                    // says pass; or it failed: this node takes over), or its lease ran
                    // out (its holder is gone): try again.
                    took_over = !woken;
                    if started.elapsed() > self.lead_allowance * 2 {
                        // A holder that keeps renewing past the origin's own limits is
                        // stuck: fetch without it rather than wait on.
                        return fill(Lead::Leader { permit, lock: None });
                    }
                }
                // The store cannot be asked: this node's requests are still coalesced.
                Err(_) => return fill(Lead::Leader { permit, lock: None }),
            }
        }
    }

    /// Runs a fill job on the fetch pool, for whom `lead` says, and ends its flight.
    pub(super) fn fill_for(
        &self,
        ex: &mut Exchange<'_>,
        key: &CacheKey,
        fwd: Fwd,
        since: Since,
        stale: Option<(&Entry, Fallback)>,
        lead: Lead,
    ) {
        // The job may have waited in the fetch queue: the origin's limits start now.
        lead.progress(self.lead_allowance);
        let outcome = self.fill(ex, key, fwd, since, stale, &lead);
        match outcome {
            FlightOutcome::Stored => self.forget_pass(key),
            FlightOutcome::NotShared => lead.not_shared(self, key),
            FlightOutcome::Failed => {}
        }
        if let Lead::Leader { permit, lock } = lead {
            permit.finish(outcome);
            drop(lock);
        }
    }

    /// Is `key` remembered as uncacheable on this node?
    fn is_pass(&self, key: &CacheKey) -> bool {
        if self.uncacheable_ttl.is_zero() {
            return false;
        }
        let mut passes = self.passes.lock().unwrap_or_else(|p| p.into_inner());
        match passes.get(key.as_str()) {
            Some(until) if *until > Instant::now() => true,
            Some(_) => {
                passes.pop(key.as_str());
                false
            }
            None => false,
        }
    }

    /// Remembers `key` as uncacheable here and, through the store, on every node.
    fn remember_pass(&self, key: &CacheKey) {
        if self.uncacheable_ttl.is_zero() {
            return;
        }
        self.remember_pass_locally(key);
        if let Err(e) = self.store.mark_uncacheable(key, self.uncacheable_ttl) {
            debug!("{key}: hit-for-pass not shared with other nodes: {e}");
        }
    }

    fn remember_pass_locally(&self, key: &CacheKey) {
        if self.uncacheable_ttl.is_zero() {
            return;
        }
        let until = Instant::now() + self.uncacheable_ttl;
        self.passes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .put(key.as_str().to_string(), until);
    }

    /// A response for `key` was stored: it is cacheable again (the store forgets its
    /// own marker when it stores).
    fn forget_pass(&self, key: &CacheKey) {
        if self.uncacheable_ttl.is_zero() {
            return;
        }
        self.passes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .pop(key.as_str());
    }

    /// A unique id for one fetch, naming the holder of a fill lock.
    fn next_owner(&self) -> String {
        let n = self.fetches.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}", self.node_id)
    }

    /// Fetches a GET (HEAD is converted: one stored GET answers both) and stores it
    /// when the policy allows, while streaming it to the client. With the `stale`
    /// response the request selected, the fetch is conditional on its validators and a
    /// 304 freshens it (RFC 9111 §4.3).
    fn fill(
        &self,
        ex: &mut Exchange<'_>,
        key: &CacheKey,
        fwd: Fwd,
        since: Since,
        stale: Option<(&Entry, Fallback)>,
        lead: &Lead,
    ) -> FlightOutcome {
        let fallback = stale;
        let stale = stale.map(|(e, _)| e);
        // What the origin sees of the client's request: the stored entry's Vary values
        // come from it (RFC 9111 §4.1 compares the request the response was for).
        let sent = self.fill_headers(&ex.req);
        let mut headers = sent.clone();
        // A key found not to be storable a moment ago (hit-for-pass: too large, private,
        // ...) passes the client's byte range through: the origin answers it (206),
        // rather than the whole body coming through Echo for a part of it.
        if matches!(lead, Lead::Pass) && stale.is_none() {
            headers.extend(
                ex.req
                    .headers
                    .iter()
                    .filter(|(n, _)| {
                        n.eq_ignore_ascii_case("range") || n.eq_ignore_ascii_case("if-range")
                    })
                    .cloned(),
            );
        }
        // RFC 9111 §4.3: "When a cache has one or more stored responses for a requested URI,
        // but cannot serve any of them (e.g., because they are not fresh ...), it can use the
        // conditional request mechanism ... in the forwarded request to give the next inbound
        // server an opportunity to choose a valid stored response to use, updating the stored
        // metadata in the process, or to replace the stored response(s) with a new response."
        // Echo does whenever the stale response has a validator (an operator's "stale" mark
        // included). The request keeps the client's fields, Vary's among them: RFC 9111
        // §4.3.1: the cache "starts with a request it is attempting to satisfy".
        let preconditions = stale
            .map(|e| policy::validation_preconditions(&e.headers))
            .unwrap_or_default();
        let validating = stale.filter(|_| !preconditions.is_empty());
        headers.extend(preconditions);
        // RFC 9111 §4.3.5: a HEAD validates its stale stored response with a HEAD (its
        // client wants no body, and none is fetched for it); `after_head` applies the
        // answer.
        let head = ex.req.is_head() && validating.is_some();
        let request_time = SystemTime::now();
        // 1xx the origin sends while this waits go to the client at once (never stored).
        let _interim = ex.forward_interim();
        let result = self.origin.get().send(OriginRequest {
            method: if head { "HEAD" } else { "GET" },
            target: &ex.req.target,
            host: &ex.req.host,
            headers: &headers,
            body: None,
        });
        let response = match result.and_then(final_response) {
            Ok(r) => {
                ex.set_origin(Arc::clone(&r.server));
                r
            }
            Err(e) => {
                if let Some((stored, f)) = fallback {
                    if f.if_error {
                        serve_stale_on_error(
                            ex,
                            stored,
                            OriginTrouble::Error(e.kind()),
                            &self.policy,
                        );
                        return FlightOutcome::Failed;
                    }
                    // RFC 9111 §5.2.2.2: "if a cache is disconnected, the cache MUST
                    // generate an error response rather than reuse the stale response. The
                    // generated status code SHOULD be 504 (Gateway Timeout)".
                    if f.never_stale && !matches!(e, OriginError::ClientBody(_)) {
                        self.origin_failed(ex, &OriginError::Timeout(Phase::Revalidation), fwd);
                        return FlightOutcome::Failed;
                    }
                }
                self.origin_failed(ex, &e, fwd);
                return FlightOutcome::Failed;
            }
        };
        let response_time = SystemTime::now();
        // RFC 5861 §4: "an error is any situation that would result in a 500, 502, 503, or
        // 504 HTTP response status code being returned."
        if let Some((stored, f)) = fallback {
            if f.if_error && matches!(response.status, 500 | 502 | 503 | 504) {
                let trouble = OriginTrouble::Status(response.status);
                drop(response);
                serve_stale_on_error(ex, stored, trouble, &self.policy);
                return FlightOutcome::Failed;
            }
        }
        if let Some(stored) = validating.filter(|_| response.status == 304) {
            // RFC 9111 §4.3.3: "A 304 (Not Modified) response status code indicates that
            // the stored response can be updated and reused; see Section 4.3.4." Any other
            // status goes on below like any fill: "A full response (i.e., one containing
            // content) indicates that none of the stored responses nominated in the
            // conditional request are suitable. Instead, the cache MUST use the full response
            // to satisfy the request. The cache MAY store such a full response"; and of a 5xx,
            // the cache "can either forward this response to the requesting client or act as
            // if the server failed to respond" (Echo forwards it).
            let not_modified = response_headers(&response.headers, response_time);
            drop(response);
            let after = policy::after_not_modified(
                &stored.headers,
                stored.status,
                &not_modified,
                &ex.req.headers,
                response_time,
                &self.policy,
            );
            let AfterNotModified::Update {
                headers,
                storability,
            } = after
            else {
                // The 304 names another representation; the client asked unconditionally.
                debug!("304 for {key} names another representation; fetching it whole");
                return self.fill(ex, key, fwd, since, None, lead);
            };
            let times = (request_time, response_time);
            return self.freshen(
                ex,
                key,
                since,
                (stored, &sent),
                (headers, storability),
                times,
            );
        }
        if let Some(stored) = validating.filter(|_| head) {
            let times = (request_time, response_time);
            return self.after_head(ex, (key, since, fwd), (stored, &sent), response, times);
        }
        let storability = policy::storability(
            "GET",
            &ex.req.headers,
            response.status,
            &response.headers,
            response_time,
            &self.policy,
        );
        let fits = response
            .content_length
            .is_none_or(|n| n <= self.max_object_bytes as u64);
        let (freshness, reason) = match storability {
            Storability::Store { freshness, .. } if fits => (Some(freshness), None),
            Storability::Store { .. } => (None, Some("too-large")),
            Storability::DoNotStore(why) => (None, Some(why.as_str())),
        };
        if reason.is_some() {
            // Known at the head: the waiters need not wait for the body.
            lead.not_shared(self, key);
        }
        let base = response_headers(&response.headers, response_time);
        let fill = freshness.map(|freshness| Fill {
            key,
            since,
            lead,
            entry: new_entry(
                &sent,
                &base,
                response.status,
                freshness,
                (request_time, response_time),
                &self.policy,
            ),
        });
        let fwd = match lead {
            Lead::Pass => fwd.passed(),
            _ => fwd,
        };
        if self.stream_body(ex, response, &base, fwd, reason, fill) {
            FlightOutcome::Stored
        } else {
            FlightOutcome::NotShared
        }
    }

    /// Answers from the `stored` response freshened by a 304 (its `headers` updated, and
    /// whether it may be stored again), and stores the freshened entry when it may.
    pub(super) fn freshen(
        &self,
        ex: &mut Exchange<'_>,
        key: &CacheKey,
        since: Since,
        (stored, sent): (&Entry, &Headers),
        (headers, storability): (Headers, Storability),
        times: (SystemTime, SystemTime),
    ) -> FlightOutcome {
        // The freshened response's lifetime and storability follow its updated fields (a
        // 304 can bring a new Cache-Control or Expires): `policy::after_not_modified`.
        let (freshness, not_stored) = match storability {
            Storability::Store { freshness, .. } => (freshness, None),
            Storability::DoNotStore(why) => (Duration::ZERO, Some(why.as_str())),
        };
        let entry = freshened(stored, sent, &headers, freshness, times, &self.policy);
        let entry = Arc::new(entry);
        // Stored through the same generation check as a fill, before the client is answered
        // (so its next request finds it): after an invalidation since the lookup, this
        // client still gets the freshened response, but it is not stored.
        let stored_now = not_stored.is_none() && self.store_entry(key, since, Arc::clone(&entry));
        let outcome = Outcome::Revalidated {
            stored: stored_now,
            not_stored,
        };
        debug!("REVALIDATED {key} ({})", outcome.cache_status());
        let age = policy::current_age(entry.initial_age, entry.response_time, SystemTime::now());
        serve_stored(ex, &entry, age, outcome, &[]);
        if stored_now {
            FlightOutcome::Stored
        } else {
            FlightOutcome::NotShared
        }
    }

    /// Stores a filled entry; a store error is logged and costs only a later miss.
    /// Returns whether it was stored.
    pub(super) fn store(&self, fill: Fill<'_>) -> bool {
        self.store_filled(fill.key, fill.since, Arc::new(fill.entry), fill.lead)
    }

    /// Stores what a fill for `lead` fetched; a leader's cluster-wide lock is released in
    /// the same step where the store can (one round trip less per Redis miss).
    pub(super) fn store_filled(
        &self,
        key: &CacheKey,
        since: Since,
        entry: Arc<Entry>,
        lead: &Lead,
    ) -> bool {
        match lead {
            Lead::Leader {
                lock: Some(lock), ..
            } if !lock.released.get() => {
                lock.released.set(true);
                self.put_entry(key, since, entry, Some(&lock.owner))
            }
            _ => self.store_entry(key, since, entry),
        }
    }

    /// [`Proxy::store`] for an entry already shared (a freshened one, also being served).
    pub(super) fn store_entry(&self, key: &CacheKey, since: Since, entry: Arc<Entry>) -> bool {
        self.put_entry(key, since, entry, None)
    }

    /// Puts `entry`, and with `owner` releases that fill lock (stored or not).
    fn put_entry(
        &self,
        key: &CacheKey,
        since: Since,
        entry: Arc<Entry>,
        owner: Option<&str>,
    ) -> bool {
        if since.started.elapsed() > self.ban_ttl {
            debug!("not storing {key}: the fill outlasted invalidation.ban_ttl");
            if let Some(owner) = owner {
                let _ = self.store.unlock_fill(key, owner);
            }
            return false;
        }
        // `cache.compress`: held encoded from here on (the caller keeps its own copy,
        // as the origin sent it, for the client it answers).
        let entry = match compress::encode_for_store(&entry, &self.compress) {
            Some(encoded) => Arc::new(encoded),
            None => entry,
        };
        let put = match owner {
            Some(owner) => self
                .store
                .put_and_unlock(key, entry, since.generation, owner),
            None => self.store.put(key, entry, since.generation),
        };
        match put {
            Ok(stored) => {
                if !stored {
                    debug!("not storing {key}: invalidated while it was fetched");
                }
                stored
            }
            Err(e) => {
                self.warn_limited(format_args!(
                    "{} store write failed: {e}",
                    self.store.name()
                ));
                false
            }
        }
    }
}

/// The cluster-wide fill lock of one key while this node fetches it; released (and the
/// waiting nodes woken) early when the answer turns out not shareable, or when dropped,
/// on every path.
pub(crate) struct FillLock {
    store: Arc<dyn Store>,
    key: CacheKey,
    owner: String,
    released: Cell<bool>,
}

impl FillLock {
    fn release(&self) {
        if !self.released.replace(true) {
            // A lock that cannot be released expires at the end of its lease (no longer
            // renewed).
            let _ = self.store.unlock_fill(&self.key, &self.owner);
        }
    }
}

impl Drop for FillLock {
    fn drop(&mut self) {
        self.release();
    }
}

/// The fill job of a request, for whom it fetches (`lead`).
fn fill_job<'a>(
    key: &'a CacheKey,
    fwd: Fwd,
    since: Since,
    stale: &'a Option<StaleCopy>,
) -> impl Fn(Lead) -> Step<Job> + 'a {
    move |lead| {
        Step::Defer(Job::Fill {
            key: key.clone(),
            fwd,
            since,
            stale: stale.clone(),
            lead,
        })
    }
}

/// A follower's flight, as the front end waits for it.
struct FlightWait(FlightWatch);

impl Await for FlightWait {
    fn deadline(&self) -> Instant {
        self.0.deadline()
    }

    fn on_done(&self, wake: Box<dyn FnOnce() + Send>) {
        self.0.on_done(wake);
    }
}
