//! The caching proxy: for each request, look the key up, serve what RFC 9111 allows,
//! otherwise forward to the origin, stream the answer back, and store it when allowed.
//! A stale stored response with validators is revalidated: the origin request is
//! conditional, and a 304 freshens the stored response and answers from it.
//!
//! Invariants: a store error is a miss, never a failed request; a response is stored
//! only when the policy allows it, it is complete, and it fits `cache.max_object_bytes`;
//! an origin body that breaks mid-way cuts the client's response (never a fabricated
//! complete one) and stores nothing; every proxied response says what happened in
//! `X-Cache-Status` and in an RFC 9211 `Cache-Status` member.

use std::any::Any;
use std::collections::HashSet;
use std::io::Read;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{debug, warn};

use crate::access_log::{AccessLog, Record};
use crate::coalesce::{Coalescer, Join, Outcome};
use crate::http::body::client_error;
use crate::http::exchange::Exchange;
use crate::http::response::BodyLength;
use crate::http::{self, BodyFraming, Headers, Request};
use crate::invalidate::Refresher;
use crate::key::CacheKey;
use crate::live::Live;
use crate::metrics::Metrics;
use crate::origin::{OriginError, OriginRequest, OriginResponse};
use crate::policy::{self, CacheControl, PolicyOptions, Reuse, Storability};
use crate::server::Handler;
use crate::store::{Entry, Lookup, Store};
use crate::upstream::Upstreams;

/// This cache's name in `Via` and `Cache-Status`.
const CACHE_NAME: &str = "echo";
const VIA: &[u8] = b"1.1 echo";
/// Read size when streaming an origin body.
const CHUNK: usize = 64 * 1024;

/// What the cache did with a request; the value of `X-Cache-Status` and a metric label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CacheStatus {
    Hit,
    Miss,
    Stale,
    Revalidated,
    Bypass,
}

impl CacheStatus {
    /// The `X-Cache-Status` value.
    pub fn as_str(self) -> &'static str {
        match self {
            CacheStatus::Hit => "HIT",
            CacheStatus::Miss => "MISS",
            CacheStatus::Stale => "STALE",
            CacheStatus::Revalidated => "REVALIDATED",
            CacheStatus::Bypass => "BYPASS",
        }
    }
}

/// Why a request went to the origin (RFC 9211 §2.2 `fwd` values), or why it bypassed
/// the cache altogether.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Forward {
    /// Nothing stored under the key.
    UriMiss,
    /// Stored variants, none selected by this request's Vary fields.
    VaryMiss,
    /// The stored response was stale.
    Stale,
    /// The method is not one the cache serves (only GET and HEAD are).
    Method,
    /// The request asks for a range; Echo stores and serves only whole responses.
    Range,
    /// The store could not be read.
    StoreError,
}

impl Forward {
    /// The RFC 9211 `fwd` parameter and, for bypasses, a `detail`.
    fn cache_status_params(self) -> &'static str {
        match self {
            Forward::UriMiss => "fwd=uri-miss",
            Forward::VaryMiss => "fwd=vary-miss",
            Forward::Stale => "fwd=stale",
            Forward::Method => "fwd=method",
            Forward::Range => "fwd=bypass; detail=range",
            Forward::StoreError => "fwd=bypass; detail=store-error",
        }
    }

    fn x_cache_status(self) -> CacheStatus {
        match self {
            Forward::UriMiss | Forward::VaryMiss | Forward::Stale => CacheStatus::Miss,
            Forward::Method | Forward::Range | Forward::StoreError => CacheStatus::Bypass,
        }
    }
}

/// A response on its way into the store: everything but the body, which is collected
/// as it streams to the client.
struct Fill<'k> {
    key: &'k CacheKey,
    since: Since,
    entry: Entry,
}

/// When a fill began: the store's invalidation generation then, and the time.
#[derive(Debug, Clone, Copy)]
struct Since {
    generation: u64,
    started: Instant,
}

/// A stored entry for a response (its body still to come): the stored fields, the Vary
/// values of the request as it was sent to the origin (`sent`), the origin's Age folded into the initial age, and the
/// `Surrogate-Key` tags.
fn new_entry(
    sent: &Headers,
    base: &Headers,
    status: u16,
    freshness: Duration,
    request_time: SystemTime,
    response_time: SystemTime,
) -> Entry {
    let vary = match policy::vary(base) {
        policy::Vary::Fields(fields) => policy::vary_snapshot(&fields, sent),
        _ => Vec::new(),
    };
    // The origin's Age goes into the initial age; hits send their own Age.
    let initial_age = policy::corrected_initial_age(base, request_time, response_time);
    let mut headers = base.clone();
    headers.retain(|(n, _)| n != "age");
    // Surrogate-Key: space-separated tags an invalidation can name.
    let tags = policy::header_joined(&headers, "surrogate-key")
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

pub struct Proxy {
    store: Arc<dyn Store>,
    /// Replaced whole by a config reload.
    origin: Arc<Live<Upstreams>>,
    policy: PolicyOptions,
    max_object_bytes: usize,
    ban_ttl: Duration,
    /// Refresh-ahead window; zero: off.
    refresh_ahead: Duration,
    background: OnceLock<Background>,
    coalescer: Coalescer,
    coalesce_wait: Duration,
    coalesce_lock_ttl: Duration,
    /// Identifies this Echo process in fill-lock owner ids.
    node_id: String,
    fetches: AtomicU64,
    metrics: Option<Arc<Metrics>>,
    /// `log.access_log`, replaced by a reload that changes it.
    access_log: Live<Option<AccessLog>>,
    /// Whether there is one: lets every request without an access log skip the lock
    /// and the shared reference count of `access_log`.
    access_log_on: AtomicBool,
    /// Request fields never sent on fills (`cache.strip_request_headers`, folded).
    strip: Vec<String>,
    /// Forward fields whose names hold `_` (`server.underscores_in_headers`).
    underscores: bool,
    last_warning: AtomicU64,
}

impl Proxy {
    /// `ban_ttl`: a fill that takes longer than this is not stored (older invalidations
    /// are no longer remembered to check it against).
    pub fn new(
        store: Arc<dyn Store>,
        origin: Arc<Live<Upstreams>>,
        policy: PolicyOptions,
        max_object_bytes: usize,
        ban_ttl: Duration,
    ) -> Proxy {
        Proxy {
            store,
            origin,
            policy,
            max_object_bytes,
            ban_ttl,
            refresh_ahead: Duration::ZERO,
            background: OnceLock::new(),
            coalescer: Coalescer::new(64, Duration::from_secs(5)),
            coalesce_wait: Duration::from_secs(5),
            coalesce_lock_ttl: Duration::from_secs(30),
            node_id: format!(
                "{}-{}",
                std::process::id(),
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos())
            ),
            fetches: AtomicU64::new(0),
            metrics: None,
            access_log: Live::new(Arc::new(None)),
            access_log_on: AtomicBool::new(false),
            strip: crate::config::DEFAULT_STRIPPED
                .iter()
                .map(|h| h.to_string())
                .collect(),
            underscores: false,
            last_warning: AtomicU64::new(0),
        }
    }

    /// `warn` level is for degraded service; at most one such line every few seconds.
    fn warn_limited(&self, message: std::fmt::Arguments<'_>) {
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let last = self.last_warning.load(Ordering::Relaxed);
        if now >= last + 5
            && self
                .last_warning
                .compare_exchange(last, now, Ordering::Relaxed, Ordering::Relaxed)
                .is_ok()
        {
            warn!("{message}");
        } else {
            debug!("{message}");
        }
    }

    fn lookup(&self, ex: &mut Exchange<'_>) {
        let key = CacheKey::new("http", &ex.req.host, &ex.req.target);
        let started = Instant::now();
        let Lookup {
            variants,
            generation,
        } = match self.store.get(&key) {
            Ok(v) => v,
            Err(e) => {
                self.warn_limited(format_args!(
                    "{} store lookup failed: {e}",
                    self.store.name()
                ));
                return self.defer(ex, Deferred::Forward(Forward::StoreError));
            }
        };
        let since = Since {
            generation,
            started,
        };
        let (forward, stale) = match self.answer_from_store(ex, &key, &variants, since) {
            Answer::Served => return,
            Answer::Fetch(forward, stale) => (forward, stale),
        };
        let req_cc = CacheControl::parse_request(&ex.req.headers);
        // RFC 9111 §5.2.1.7: "The only-if-cached request directive indicates that the client
        // only wishes to obtain a stored response. Caches that honor this request directive
        // SHOULD, upon receiving it, respond with either a stored response consistent with
        // the other constraints of the request or a 504 (Gateway Timeout) status code."
        if req_cc.only_if_cached && self.policy.honor_request {
            return only_if_cached_miss(ex, forward);
        }
        debug!("{} {key}", forward.cache_status_params());
        self.defer(
            ex,
            Deferred::Fill {
                key,
                forward,
                since,
                stale,
            },
        );
    }

    /// Answers from the stored `variants` when RFC 9111 allows (fresh; stale within
    /// stale-while-revalidate, refreshing in the background; stale as the client's
    /// max-stale accepts); otherwise says what the fetch must do. Never blocks.
    fn answer_from_store(
        &self,
        ex: &mut Exchange<'_>,
        key: &CacheKey,
        variants: &[Arc<Entry>],
        since: Since,
    ) -> Answer {
        let Some(entry) = self.select(variants, &ex.req) else {
            let forward = if variants.is_empty() {
                Forward::UriMiss
            } else {
                Forward::VaryMiss
            };
            return Answer::Fetch(forward, None);
        };
        let req_cc = CacheControl::parse_request(&ex.req.headers);
        let age = policy::current_age(entry.initial_age, entry.response_time, SystemTime::now());
        let ttl = entry.freshness.as_secs() as i64 - age.as_secs() as i64;
        match policy::reuse(&entry.headers, entry.freshness, age, &req_cc, &self.policy) {
            Reuse::Fresh => {
                debug!("HIT {key}");
                // Refresh-ahead: a hot entry close to expiry is revalidated in the
                // background, so the next requests never find it stale.
                let left = entry.freshness.saturating_sub(age);
                if !self.refresh_ahead.is_zero() && left <= self.refresh_ahead {
                    self.refresh_later(key, &ex.req, entry, since);
                }
                let cache_status = format!("{CACHE_NAME}; hit; ttl={ttl}");
                serve_stored(ex, entry, age, CacheStatus::Hit, cache_status);
                Answer::Served
            }
            Reuse::StaleWhileRevalidate => {
                debug!("STALE {key} (stale-while-revalidate)");
                self.refresh_later(key, &ex.req, entry, since);
                let cache_status =
                    format!("{CACHE_NAME}; hit; ttl={ttl}; detail=stale-while-revalidate");
                serve_stored(ex, entry, age, CacheStatus::Stale, cache_status);
                Answer::Served
            }
            Reuse::StaleAccepted => {
                debug!("STALE {key} (the client's max-stale)");
                let cache_status = format!("{CACHE_NAME}; hit; ttl={ttl}; detail=max-stale");
                serve_stored(ex, entry, age, CacheStatus::Stale, cache_status);
                Answer::Served
            }
            Reuse::Revalidate {
                if_error,
                never_stale,
            } => Answer::Fetch(
                Forward::Stale,
                Some((
                    Arc::clone(entry),
                    Fallback {
                        if_error,
                        never_stale,
                    },
                )),
            ),
        }
    }

    /// The request as it goes to the origin to fill the cache: as forwarded, less the
    /// client's preconditions (the stored response must be complete and the same for
    /// everyone) and the fields on `cache.strip_request_headers` (cache poisoning), names
    /// compared folded.
    fn fill_headers(&self, req: &Request) -> Headers {
        let mut headers = forward_headers(req, self.underscores);
        headers.retain(|(n, _)| {
            !PRECONDITIONS.iter().any(|p| http::same_field(n, p))
                && !self.strip.iter().any(|s| http::same_field(n, s))
        });
        headers
    }

    /// The stored variant this request selects. Vary is matched against the request as
    /// a fill would send it (a field the client named in `Connection`, or one Echo
    /// strips, is absent there), since that is what each variant was stored for.
    fn select<'v>(&self, variants: &'v [Arc<Entry>], req: &Request) -> Option<&'v Arc<Entry>> {
        let mut sent: Option<Headers> = None;
        variants.iter().find(|e| {
            if e.vary
                .iter()
                .all(|(field, _)| self.fill_sends_as_is(field, req))
            {
                // The usual case (Vary: Accept-Encoding): no need to build the request.
                return policy::vary_matches(&e.vary, &req.headers);
            }
            policy::vary_matches(&e.vary, sent.get_or_insert_with(|| self.fill_headers(req)))
        })
    }

    /// Does a fill send the client's lines of `field` unchanged? False for every name
    /// `fill_headers` drops or replaces (hop-by-hop and `Connection`-named, with `_`,
    /// set by Echo, preconditions, stripped): for those, the request is built whole.
    fn fill_sends_as_is(&self, field: &str, req: &Request) -> bool {
        let special = |list: &[&str]| list.iter().any(|f| http::same_field(field, f));
        !field.contains('_')
            && !special(http::HOP_BY_HOP)
            && !special(SET_BY_ECHO)
            && !special(PRECONDITIONS)
            && !self.strip.iter().any(|s| http::same_field(field, s))
            && !req
                .headers
                .iter()
                .filter(|(n, _)| http::same_field(n, "connection"))
                .flat_map(|(_, v)| v.split(|&b| b == b','))
                .any(|t| http::same_field(&String::from_utf8_lossy(t.trim_ascii()), field))
    }

    /// Hands the exchange to the fetch stage (`Handler::fetch`), which may wait on the
    /// origin without holding a worker; runs it here if it cannot be deferred.
    fn defer(&self, ex: &mut Exchange<'_>, deferred: Deferred) {
        // Not expected to fail (nothing was answered or read yet); if it does, the work
        // runs here rather than the request being lost.
        if let Err(state) = ex.defer(Box::new(deferred)) {
            if let Ok(deferred) = state.downcast::<Deferred>() {
                self.run_deferred(ex, *deferred);
            }
        }
    }

    fn run_deferred(&self, ex: &mut Exchange<'_>, deferred: Deferred) {
        match deferred {
            Deferred::Forward(forward) => self.forward(ex, forward),
            Deferred::Fill {
                key,
                forward,
                since,
                stale,
            } => {
                let stale = stale.as_ref().map(|(e, f)| (&**e, *f));
                self.fetch_once(ex, &key, forward, since, stale);
            }
        }
    }

    /// One origin fetch per key at a time. The first request leads: with a shared store
    /// it also takes the cluster-wide fill lock, or, when another node holds it, waits
    /// for that node's fill. The others wait for the leader and answer from the store
    /// (`collapsed`), or fetch themselves when its answer may not be shared (private,
    /// Set-Cookie, uncacheable), it failed, or they waited too long.
    fn fetch_once(
        &self,
        ex: &mut Exchange<'_>,
        key: &CacheKey,
        forward: Forward,
        since: Since,
        stale: Option<(&Entry, Fallback)>,
    ) {
        match self.coalescer.join(key.as_str()) {
            Join::Leader(permit) => {
                // Registered before the lock is tried, so no release can be missed.
                let waiter = self.store.fill_waiter(key);
                let owner = self.next_owner();
                let locked = self
                    .store
                    .lock_fill_and_look(key, &owner, self.coalesce_lock_ttl);
                let outcome = match locked {
                    Ok((false, _)) => {
                        let started = Instant::now();
                        waiter.wait(self.coalesce_wait);
                        if self.serve_collapsed(ex, key, started.elapsed()) {
                            Outcome::Stored
                        } else {
                            self.fill(ex, key, forward, since, stale)
                        }
                    }
                    locked => {
                        drop(waiter);
                        let taken = matches!(locked, Ok((true, _)));
                        // Released on every path (drop), after the fill has stored.
                        let _lock = taken.then(|| FillLock {
                            store: self.store.as_ref(),
                            key,
                            owner,
                        });
                        // A fill that finished between this request's lookup and its lock
                        // (here or on another node) has left what it fetched: the look
                        // taken with the lock, where writes land, before fetching again.
                        let look = locked.ok().and_then(|(_, look)| look);
                        if look.is_some_and(|l| self.serve_lookup(ex, key, &l, Duration::ZERO)) {
                            Outcome::Stored
                        } else {
                            self.fill(ex, key, forward, since, stale)
                        }
                    }
                };
                permit.finish(outcome);
            }
            Join::Followed {
                outcome: Outcome::Stored,
                waited,
            } => {
                if !self.serve_collapsed(ex, key, waited) {
                    self.fill(ex, key, forward, since, stale);
                }
            }
            Join::Followed { .. } | Join::TimedOut | Join::Overflow => {
                self.fill(ex, key, forward, since, stale);
            }
        }
    }

    /// Answers a request that waited for another's fetch from what that fetch stored, if
    /// it stored a fresh response this request selects.
    fn serve_collapsed(&self, ex: &mut Exchange<'_>, key: &CacheKey, waited: Duration) -> bool {
        // From where the fill was written: a lagging replica would turn this into a miss.
        let Ok(lookup) = self.store.get_latest(key) else {
            return false;
        };
        self.serve_lookup(ex, key, &lookup, waited)
    }

    /// Answers from `lookup` (read where writes land) if it holds a fresh response this
    /// request selects.
    fn serve_lookup(
        &self,
        ex: &mut Exchange<'_>,
        key: &CacheKey,
        lookup: &Lookup,
        waited: Duration,
    ) -> bool {
        let Some(entry) = self.select(&lookup.variants, &ex.req) else {
            return false;
        };
        let age = policy::current_age(entry.initial_age, entry.response_time, SystemTime::now());
        // Only as the request's own directives allow (a client's no-cache wants its own
        // validation, not a copy another request fetched).
        let req_cc = CacheControl::parse_request(&ex.req.headers);
        if policy::reuse(&entry.headers, entry.freshness, age, &req_cc, &self.policy)
            != Reuse::Fresh
        {
            return false;
        }
        if let Some(m) = &self.metrics {
            m.coalesced.inc();
        }
        debug!("HIT {key} (collapsed, waited {waited:?})");
        let ttl = entry.freshness.as_secs() as i64 - age.as_secs() as i64;
        let cache_status = format!("{CACHE_NAME}; hit; ttl={ttl}; collapsed");
        serve_stored(ex, entry, age, CacheStatus::Hit, cache_status);
        true
    }

    /// A unique id for one fetch, naming the holder of a fill lock.
    fn next_owner(&self) -> String {
        let n = self.fetches.fetch_add(1, Ordering::Relaxed);
        format!("{}-{n}", self.node_id)
    }

    /// Queues a background revalidation of `entry` (one per key at a time; none when the
    /// queue is full: the next request tries again).
    fn refresh_later(&self, key: &CacheKey, req: &Request, entry: &Arc<Entry>, since: Since) {
        let Some(background) = self.background.get() else {
            return;
        };
        let headers = self.fill_headers(req);
        background.submit(Task {
            key: key.clone(),
            headers,
            req_headers: req.headers.clone(),
            stale: Arc::clone(entry),
            since,
        });
    }

    /// Fetches a GET (HEAD is converted: one stored GET answers both) and stores it
    /// when the policy allows, while streaming it to the client. With the `stale`
    /// response the request selected, the fetch is conditional on its validators and a
    /// 304 freshens it (RFC 9111 §4.3).
    fn fill(
        &self,
        ex: &mut Exchange<'_>,
        key: &CacheKey,
        forward: Forward,
        since: Since,
        stale: Option<(&Entry, Fallback)>,
    ) -> Outcome {
        let fallback = stale;
        let stale = stale.map(|(e, _)| e);
        // What the origin sees of the client's request: the stored entry's Vary values
        // come from it (RFC 9111 §4.1 compares the request the response was for).
        let sent = self.fill_headers(&ex.req);
        let mut headers = sent.clone();
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
        let request_time = SystemTime::now();
        let result = self.origin.get().send(OriginRequest {
            method: "GET",
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
                        serve_stale_on_error(ex, stored, e.kind());
                        return Outcome::Failed;
                    }
                    // RFC 9111 §5.2.2.2: "if a cache is disconnected, the cache MUST
                    // generate an error response rather than reuse the stale response. The
                    // generated status code SHOULD be 504 (Gateway Timeout)".
                    if f.never_stale && !matches!(e, OriginError::ClientBody(_)) {
                        self.origin_failed(ex, &OriginError::Timeout("revalidation"), forward);
                        return Outcome::Failed;
                    }
                }
                self.origin_failed(ex, &e, forward);
                return Outcome::Failed;
            }
        };
        let response_time = SystemTime::now();
        // RFC 5861 §4: "an error is any situation that would result in a 500, 502, 503, or
        // 504 HTTP response status code being returned."
        if let Some((stored, f)) = fallback {
            if f.if_error && matches!(response.status, 500 | 502 | 503 | 504) {
                let kind = format!("status-{}", response.status);
                drop(response);
                serve_stale_on_error(ex, stored, &kind);
                return Outcome::Failed;
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
            let base = response_headers(&response.headers, response_time);
            drop(response);
            if policy::freshens(&stored.headers, &base) {
                let times = (request_time, response_time);
                return self.freshen(ex, key, since, (stored, &sent), &base, times);
            }
            // RFC 9111 §4.3.4: "If none of the initial set contains at least one of the same
            // strong validators, then the cache MUST NOT use the new response to update any
            // stored responses." Nor can it answer a client that asked unconditionally:
            // fetch the whole response instead.
            debug!("304 for {key} names another representation; fetching it whole");
            return self.fill(ex, key, forward, since, None);
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
        let base = response_headers(&response.headers, response_time);
        let fill = freshness.map(|freshness| Fill {
            key,
            since,
            entry: new_entry(
                &sent,
                &base,
                response.status,
                freshness,
                request_time,
                response_time,
            ),
        });
        if self.stream_body(ex, response, &base, forward, reason, fill) {
            Outcome::Stored
        } else {
            Outcome::NotShared
        }
    }

    /// Answers from the `stored` response freshened by a 304 (`not_modified`, its fields as
    /// Echo keeps them), and stores the freshened entry when it may still be stored.
    fn freshen(
        &self,
        ex: &mut Exchange<'_>,
        key: &CacheKey,
        since: Since,
        (stored, sent): (&Entry, &Headers),
        not_modified: &Headers,
        (request_time, response_time): (SystemTime, SystemTime),
    ) -> Outcome {
        // RFC 9111 §4.3.4: "For each stored response identified, the cache MUST update its
        // header fields with the header fields provided in the 304 (Not Modified) response,
        // as per Section 3.2." The content stays the stored one.
        let headers = policy::update_stored_headers(&stored.headers, not_modified);
        // The freshened response's lifetime and storability follow its updated fields (a
        // 304 can bring a new Cache-Control or Expires); its age starts again from the
        // 304's Age and Date and this exchange's request and response times (RFC 9111
        // §4.2.3, in `new_entry`).
        let storability = policy::storability(
            "GET",
            &ex.req.headers,
            stored.status,
            &headers,
            response_time,
            &self.policy,
        );
        let (freshness, not_stored) = match storability {
            Storability::Store { freshness, .. } => (freshness, None),
            Storability::DoNotStore(why) => (Duration::ZERO, Some(why.as_str())),
        };
        let mut entry = new_entry(
            sent,
            &headers,
            stored.status,
            freshness,
            request_time,
            response_time,
        );
        entry.body = stored.body.clone();
        entry.file = stored.file.clone();
        let entry = Arc::new(entry);
        // Stored through the same generation check as a fill, before the client is answered
        // (so its next request finds it): after an invalidation since the lookup, this
        // client still gets the freshened response, but it is not stored.
        let stored_now = not_stored.is_none() && self.store_entry(key, since, Arc::clone(&entry));
        let outcome = match (stored_now, not_stored) {
            (true, _) => "; stored".to_string(),
            (false, Some(why)) => format!("; detail={why}"),
            (false, None) => String::new(),
        };
        debug!("REVALIDATED {key}{outcome}");
        let cache_status = format!(
            "{CACHE_NAME}; {}; fwd-status=304{outcome}",
            Forward::Stale.cache_status_params()
        );
        let age = policy::current_age(entry.initial_age, entry.response_time, SystemTime::now());
        serve_stored(ex, &entry, age, CacheStatus::Revalidated, cache_status);
        if stored_now {
            Outcome::Stored
        } else {
            Outcome::NotShared
        }
    }

    /// Coalescing: at most `max_waiters` requests wait up to `wait` for another's fetch of
    /// the same key; a cross-node fill lock lives at most `lock_ttl`.
    pub fn with_coalescing(
        mut self,
        max_waiters: usize,
        wait: Duration,
        lock_ttl: Duration,
    ) -> Proxy {
        self.coalescer = Coalescer::new(max_waiters, wait);
        self.coalesce_wait = wait;
        self.coalesce_lock_ttl = lock_ttl;
        self
    }

    /// Request fields removed from requests that may fill the cache (folded names).
    pub fn with_stripped_request_headers(mut self, names: Vec<String>) -> Proxy {
        self.strip = names;
        self
    }

    /// Whether fields whose names hold `_` are forwarded (`server.underscores_in_headers`).
    pub fn with_underscores_in_headers(mut self, allowed: bool) -> Proxy {
        self.underscores = allowed;
        self
    }

    pub fn with_metrics(mut self, metrics: Arc<Metrics>) -> Proxy {
        self.metrics = Some(metrics);
        self
    }

    /// The access log requests are written to (None: none).
    pub fn access_log(&self) -> Arc<Option<AccessLog>> {
        self.access_log.get()
    }

    pub fn set_access_log(&self, log: Option<AccessLog>) {
        self.access_log_on.store(log.is_some(), Ordering::Relaxed);
        self.access_log.set(Arc::new(log));
    }

    /// The access log, if there is one, without touching it when there is none.
    fn access_log_if_on(&self) -> Option<Arc<Option<AccessLog>>> {
        self.access_log_on
            .load(Ordering::Relaxed)
            .then(|| self.access_log.get())
    }

    /// Turns refresh-ahead on: entries read within `window` of their expiry are
    /// revalidated in the background.
    pub fn with_refresh_ahead(mut self, window: Duration) -> Proxy {
        self.refresh_ahead = window;
        self
    }

    /// Stores a filled entry; a store error is logged and costs only a later miss.
    /// Returns whether it was stored.
    fn store(&self, fill: Fill<'_>) -> bool {
        self.store_entry(fill.key, fill.since, Arc::new(fill.entry))
    }

    /// [`Proxy::store`] for an entry already shared (a freshened one, also being served).
    fn store_entry(&self, key: &CacheKey, since: Since, entry: Arc<Entry>) -> bool {
        if since.started.elapsed() > self.ban_ttl {
            debug!("not storing {key}: the fill outlasted invalidation.ban_ttl");
            return false;
        }
        match self.store.put(key, entry, since.generation) {
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

    /// Streams an origin response to the client. With a `fill`, the body is also
    /// collected (up to `max_object_bytes`) and, when it arrived whole, stored before
    /// the client gets its last bytes: a client holding a complete stored response can
    /// count on the next request finding it (the client may go away meanwhile; the
    /// body is still read to the end and stored).
    ///
    /// The head of a storable answer waits until its body has ended or passed one read
    /// buffer (a HEAD's until it has ended: it answers once stored). Most bodies are
    /// then stored before the head goes out, so `Cache-Status` says `stored` only when
    /// it is true, and head and body leave in one write; a longer body streams, and its
    /// head promises nothing. A body that breaks off is never stored, and a response
    /// already started is cut, never completed.
    fn stream_body(
        &self,
        ex: &mut Exchange<'_>,
        mut response: OriginResponse,
        base: &Headers,
        forward: Forward,
        not_stored: Option<&str>,
        mut fill: Option<Fill<'_>>,
    ) -> bool {
        let status = response.status;
        let answer_fields = |stored: bool| {
            let mut headers = base.clone();
            let detail = not_stored
                .map(|r| format!("; detail={r}"))
                .unwrap_or_default();
            add_status(
                &mut headers,
                forward.x_cache_status(),
                format!(
                    "{CACHE_NAME}; {}; fwd-status={status}{}{detail}",
                    forward.cache_status_params(),
                    if stored { "; stored" } else { "" },
                ),
            );
            headers
        };
        let length = match response.content_length {
            Some(n) => BodyLength::Known(n),
            None => BodyLength::Unknown,
        };
        // A HEAD answer has no body to measure: announce the length the origin gave.
        let head_length = response.content_length.or_else(|| {
            http::header(&response.headers, "content-length")
                .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
        });
        let head_request = ex.req.is_head();
        if head_request && fill.is_none() {
            let _ = ex.start(status, &answer_fields(false), length, head_length);
            let _ = ex.finish();
            return false;
        }
        let mut body: Vec<u8> = Vec::new();
        // One read buffer for the whole response.
        let mut current = vec![0u8; CHUNK];
        if fill.is_some() {
            let hold = if head_request {
                self.max_object_bytes + 1
            } else {
                CHUNK
            };
            let mut ended = false;
            while body.len() < hold {
                match response.body.read(&mut current) {
                    Ok(0) => {
                        ended = true;
                        break;
                    }
                    Ok(n) => body.extend_from_slice(&current[..n]),
                    Err(e) => return self.origin_body_broke(ex, &e),
                }
            }
            if body.len() > self.max_object_bytes {
                fill = None;
            }
            if ended {
                let Some(f) = fill.take() else {
                    let _ = ex.respond(status, &answer_fields(false), &body);
                    return false;
                };
                body.shrink_to_fit();
                let entry = Arc::new(Entry { body, ..f.entry });
                let stored = self.store_entry(f.key, f.since, Arc::clone(&entry));
                let _ = ex.respond(status, &answer_fields(stored), &entry.body);
                return stored;
            }
            if head_request {
                // Too large to store: the head answers now.
                let _ = ex.start(status, &answer_fields(false), length, head_length);
                let _ = ex.finish();
                return false;
            }
        }
        let mut client_gone = ex
            .start(status, &answer_fields(false), length, head_length)
            .is_err();
        // What was held back goes first; it is also the start of what a fill collects.
        let mut held = std::mem::take(&mut body);
        if fill.is_some() {
            body.extend_from_slice(&held);
        }
        // The last chunk read is held back until the next read shows whether it ends
        // the body (and so whether the entry is stored first).
        loop {
            let n = match response.body.read(&mut current) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => return self.origin_body_broke(ex, &e),
            };
            if fill.is_some() {
                if body.len() + n > self.max_object_bytes {
                    fill = None;
                    body = Vec::new();
                } else {
                    body.extend_from_slice(&current[..n]);
                }
            }
            if !held.is_empty() && !client_gone && ex.write(&held).is_err() {
                client_gone = true;
            }
            if client_gone && fill.is_none() {
                // Nothing more can reach this client and nothing is being stored.
                return false;
            }
            held.clear();
            held.extend_from_slice(&current[..n]);
        }
        let mut stored = false;
        if let Some(mut fill) = fill {
            body.shrink_to_fit();
            fill.entry.body = body;
            stored = self.store(fill);
        }
        if !held.is_empty() && !client_gone && ex.write(&held).is_err() {
            client_gone = true;
        }
        if !client_gone {
            let _ = ex.finish();
        }
        stored
    }

    /// The origin's body broke off (a reset, a timeout, fewer bytes than announced): a
    /// response already started is cut, so the client never takes it for whole; one not
    /// started yet is a 502. Nothing is stored.
    fn origin_body_broke(&self, ex: &mut Exchange<'_>, e: &std::io::Error) -> bool {
        self.warn_limited(format_args!(
            "origin body for {} broke off: {e}",
            ex.req.target
        ));
        if ex.response_started() {
            ex.abort();
        } else {
            ex.respond_error(502, "the origin response broke off", true);
        }
        false
    }

    /// Passes a request through without the cache (other methods, ranges), streaming
    /// the body both ways; unsafe methods invalidate what they may have changed.
    fn forward(&self, ex: &mut Exchange<'_>, forward: Forward) {
        let headers = forward_headers(&ex.req, self.underscores);
        let method = ex.req.method.clone();
        let target = ex.req.target.clone();
        let host = ex.req.host.clone();
        let length = match ex.req.framing {
            BodyFraming::None => None,
            BodyFraming::Length(n) => Some(Some(n)),
            BodyFraming::Chunked => Some(None),
        };
        let result = {
            let mut body = ex.body();
            self.origin.get().send(OriginRequest {
                method: &method,
                target: &target,
                host: &host,
                headers: &headers,
                body: length.map(|len| (&mut body as &mut dyn Read, len)),
            })
        };
        let response = match result.and_then(final_response) {
            Ok(r) => r,
            Err(e) => return self.origin_failed(ex, &e, forward),
        };
        ex.set_origin(Arc::clone(&response.server));
        if policy::invalidates(&method, response.status) {
            self.invalidate_after_unsafe(&ex.req, &response.headers);
        }
        let base = response_headers(&response.headers, SystemTime::now());
        self.stream_body(ex, response, &base, forward, None, None);
    }

    /// RFC 9111 §4.4: "A cache MUST invalidate the target URI ... when it receives a
    /// non-error status code in response to an unsafe request method", and "MAY
    /// invalidate the URIs in the Location and Content-Location response header fields"
    /// when they share the target's origin (Echo does).
    fn invalidate_after_unsafe(&self, req: &Request, response: &Headers) {
        let mut keys = vec![CacheKey::new("http", &req.host, &req.target)];
        for field in ["location", "content-location"] {
            if let Some(target) =
                http::header(response, field).and_then(|v| same_origin_target(v, &req.host))
            {
                keys.push(CacheKey::new("http", &req.host, &target));
            }
        }
        for key in keys {
            match self.store.remove(&key) {
                Ok(n) if n > 0 => debug!("invalidated {key} after {}", req.method),
                Ok(_) => {}
                Err(e) => self.warn_limited(format_args!("store delete of {key} failed: {e}")),
            }
        }
    }

    fn origin_failed(&self, ex: &mut Exchange<'_>, e: &OriginError, forward: Forward) {
        if let OriginError::ClientBody(io) = e {
            match client_error(io) {
                Some(refusal) => ex.respond_error(refusal.status, refusal.reason, true),
                None => ex.abort(),
            }
            return;
        }
        self.warn_limited(format_args!(
            "origin {} for {} {}: {e}",
            e.kind(),
            ex.req.method,
            ex.req.target
        ));
        let reason = match e {
            OriginError::Timeout(_) => "the origin did not answer in time",
            _ => "the origin could not be reached",
        };
        let cache_status = format!(
            "{CACHE_NAME}; {}; detail=origin-{}",
            forward.cache_status_params(),
            e.kind()
        );
        own_error(
            ex,
            e.status(),
            forward.x_cache_status(),
            cache_status,
            reason,
        );
    }
}

impl Handler for Proxy {
    fn handle(&self, ex: &mut Exchange<'_>) {
        if ex.req.target == "*" {
            // `OPTIONS *` asks about this server, not a resource; Echo answers it (as
            // most servers do) rather than invent a resource on the origin.
            let headers = [("via".to_string(), VIA.to_vec())];
            let _ = ex.respond(200, &headers, b"");
            return;
        }
        let cacheable_method = matches!(ex.req.method.as_str(), "GET" | "HEAD");
        if !cacheable_method {
            return self.defer(ex, Deferred::Forward(Forward::Method));
        }
        // RFC 9110 §14.2: "A server MUST ignore a Range header field received with a
        // request method that is unrecognized or for which range handling is not
        // defined" — GET is the only one. A HEAD with a Range is a HEAD: filled with a
        // GET like any other, never forwarded as a HEAD to be answered from the origin.
        if ex.req.header("range").is_some() && !ex.req.is_head() {
            return self.defer(ex, Deferred::Forward(Forward::Range));
        }
        self.lookup(ex);
    }

    /// Lookups on the connection thread: a hit is answered at once (no hand-off to a
    /// worker and back), anything that waits on the origin goes straight to the fetch
    /// stage with what the lookup found. A lookup in Redis blocks this thread only, within
    /// the Redis timeouts, and the Redis pool bounds how many run at once.
    fn handle_inline(&self, ex: &mut Exchange<'_>) {
        self.handle(ex);
    }

    /// The fetch stage: whatever waits on the origin.
    fn fetch(&self, ex: &mut Exchange<'_>, state: Box<dyn Any + Send>) {
        match state.downcast::<Deferred>() {
            Ok(deferred) => self.run_deferred(ex, *deferred),
            Err(_) => ex.respond_error(500, "internal error", true),
        }
    }

    /// Counts a request the server refused before any handler saw it (cache status
    /// `none`; method `other` when its head could not be parsed), and logs it.
    fn refused(&self, peer: std::net::SocketAddr, request: Option<&Request>, status: u16) {
        let took = request.map_or(Duration::ZERO, |r| r.received.elapsed());
        let method = request.map_or("-", |r| r.method.as_str());
        if let Some(m) = &self.metrics {
            m.request("none", method, status, took);
        }
        if let Some(log) = self.access_log_if_on().as_deref().and_then(Option::as_ref) {
            log.log(&Record {
                received: SystemTime::now() - took,
                client: peer.ip(),
                method,
                target: request.map_or("-", |r| r.target.as_str()),
                version: request.map_or("-", |r| r.version.as_str()),
                status,
                bytes: 0,
                took,
                cache_status: "none",
                origin: None,
            });
        }
    }

    /// Counts the request (`echo_requests_total`, `echo_request_duration_seconds`) and
    /// writes its access log line.
    fn finished(&self, ex: &Exchange<'_>) {
        let took = ex.req.received.elapsed();
        if let Some(m) = &self.metrics {
            m.request(ex.cache_status(), &ex.req.method, ex.status(), took);
        }
        if let Some(log) = self.access_log_if_on().as_deref().and_then(Option::as_ref) {
            log.log(&Record {
                received: SystemTime::now() - took,
                client: ex.req.peer.ip(),
                method: &ex.req.method,
                target: &ex.req.target,
                version: ex.req.version.as_str(),
                status: ex.status(),
                bytes: ex.body_bytes(),
                took,
                cache_status: ex.cache_status(),
                origin: ex.origin(),
            });
        }
    }
}

impl Refresher for Proxy {
    /// Fetches every stored variant of `key` again (its request rebuilt from the Vary
    /// snapshot) and stores what the origin answers, when HTTP allows.
    fn refresh(&self, key: &CacheKey) -> bool {
        let Ok(Lookup {
            variants,
            generation,
        }) = self.store.get(key)
        else {
            return false;
        };
        let snapshots: Vec<policy::VarySnapshot> = if variants.is_empty() {
            vec![Vec::new()]
        } else {
            variants.iter().map(|e| e.vary.clone()).collect()
        };
        let mut refreshed = false;
        for snapshot in snapshots {
            let since = Since {
                generation,
                started: Instant::now(),
            };
            let mut req_headers: Headers = snapshot
                .iter()
                .filter_map(|(n, v)| v.as_ref().map(|v| (n.clone(), v.as_bytes().to_vec())))
                .collect();
            let mut headers = req_headers.clone();
            headers.push(("via".into(), VIA.to_vec()));
            headers.push(("x-forwarded-host".into(), key.host().as_bytes().to_vec()));
            headers.push(("x-forwarded-proto".into(), b"http".to_vec()));
            req_headers.push(("host".into(), key.host().as_bytes().to_vec()));
            refreshed |= self.fetch_and_store(key, headers, &req_headers, None, since);
        }
        refreshed
    }
}

impl Proxy {
    /// Starts the background refresh pool (stale-while-revalidate, refresh-ahead). Its
    /// threads hold the proxy weakly: they end when it is dropped.
    pub fn start_background(self: &Arc<Self>, workers: usize, queue: usize) -> std::io::Result<()> {
        let (tx, rx) = crossbeam_channel::bounded::<Task>(queue);
        for i in 0..workers {
            let rx = rx.clone();
            let proxy = Arc::downgrade(self);
            std::thread::Builder::new()
                .name(format!("echo-refresh-{i}"))
                .spawn(move || {
                    for task in rx.iter() {
                        let Some(proxy) = proxy.upgrade() else {
                            return;
                        };
                        let done_key = task.key.as_str().to_string();
                        proxy.fetch_and_store(
                            &task.key,
                            task.headers,
                            &task.req_headers,
                            Some(&task.stale),
                            task.since,
                        );
                        if let Some(background) = proxy.background.get() {
                            background.done(&done_key);
                        }
                    }
                })?;
        }
        let _ = self.background.set(Background {
            tx,
            refreshing: Mutex::new(HashSet::new()),
        });
        Ok(())
    }

    /// Fetches `key` with `headers` (conditionally on `validate`'s validators) and stores
    /// the answer when HTTP allows: a 304 freshens `validate`, a full response replaces it.
    /// No client is involved (background refreshes, invalidation's refresh mode).
    fn fetch_and_store(
        &self,
        key: &CacheKey,
        mut headers: Headers,
        req_headers: &Headers,
        validate: Option<&Entry>,
        since: Since,
    ) -> bool {
        // The Vary values stored come from the request as sent, preconditions aside.
        let sent = headers.clone();
        if let Some(stored) = validate {
            headers.extend(policy::validation_preconditions(&stored.headers));
        }
        let request_time = SystemTime::now();
        let response = match self
            .origin
            .get()
            .send(OriginRequest {
                method: "GET",
                target: key.target(),
                host: key.host(),
                headers: &headers,
                body: None,
            })
            .and_then(final_response)
        {
            Ok(r) => r,
            Err(e) => {
                self.warn_limited(format_args!("background fetch of {key} failed: {e}"));
                return false;
            }
        };
        let response_time = SystemTime::now();
        if response.status == 304 {
            let Some(stored) = validate else {
                return false;
            };
            let not_modified = response_headers(&response.headers, response_time);
            if !policy::freshens(&stored.headers, &not_modified) {
                return false;
            }
            let updated = policy::update_stored_headers(&stored.headers, &not_modified);
            let Storability::Store { freshness, .. } = policy::storability(
                "GET",
                req_headers,
                stored.status,
                &updated,
                response_time,
                &self.policy,
            ) else {
                return false;
            };
            let mut entry = new_entry(
                &sent,
                &updated,
                stored.status,
                freshness,
                request_time,
                response_time,
            );
            entry.body = stored.body.clone();
            entry.file = stored.file.clone();
            return self.store_entry(key, since, Arc::new(entry));
        }
        let Storability::Store { freshness, .. } = policy::storability(
            "GET",
            req_headers,
            response.status,
            &response.headers,
            response_time,
            &self.policy,
        ) else {
            return false;
        };
        let base = response_headers(&response.headers, response_time);
        let mut entry = new_entry(
            &sent,
            &base,
            response.status,
            freshness,
            request_time,
            response_time,
        );
        let limit = self.max_object_bytes as u64;
        let mut body = Vec::new();
        let read = response.body.take(limit + 1).read_to_end(&mut body);
        body.shrink_to_fit();
        if read.is_err() || body.len() as u64 > limit {
            return false;
        }
        entry.body = body;
        self.store(Fill { key, since, entry })
    }
}

/// What the store could do for a request.
enum Answer {
    Served,
    /// Go to the origin, for this reason; with the stale copy the request selected (to
    /// revalidate, and what may answer if that fails).
    Fetch(Forward, Option<(Arc<Entry>, Fallback)>),
}

/// What the fetch stage does for an exchange the worker deferred.
enum Deferred {
    /// Pass it through (other methods, ranges, an unreadable store).
    Forward(Forward),
    /// Fetch it once for everyone waiting on it, and store it when allowed.
    Fill {
        key: CacheKey,
        forward: Forward,
        since: Since,
        stale: Option<(Arc<Entry>, Fallback)>,
    },
}

/// A background revalidation.
struct Task {
    key: CacheKey,
    /// The origin request's fields (the triggering client's, as forwarded).
    headers: Headers,
    /// The triggering client's fields, for storability and Vary.
    req_headers: Headers,
    stale: Arc<Entry>,
    since: Since,
}

/// The bounded queue of background revalidations, and the keys being revalidated (one
/// at a time per key).
struct Background {
    tx: crossbeam_channel::Sender<Task>,
    refreshing: Mutex<HashSet<String>>,
}

impl Background {
    fn keys(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.refreshing.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn submit(&self, task: Task) {
        let key = task.key.as_str().to_string();
        if !self.keys().insert(key.clone()) {
            return;
        }
        if self.tx.try_send(task).is_err() {
            debug!("background queue full; {key} is not refreshed now");
            self.keys().remove(&key);
        }
    }

    fn done(&self, key: &str) {
        self.keys().remove(key);
    }
}

/// The cluster-wide fill lock of one key while this node fetches it; released (and the
/// waiting nodes woken) when dropped, on every path.
struct FillLock<'a> {
    store: &'a dyn Store,
    key: &'a CacheKey,
    owner: String,
}

impl Drop for FillLock<'_> {
    fn drop(&mut self) {
        // A lock that cannot be released expires after coalesce_lock_ttl.
        let _ = self.store.unlock_fill(self.key, &self.owner);
    }
}

/// What may answer if revalidation fails (RFC 5861 stale-if-error; RFC 9111 §5.2.2.2).
#[derive(Debug, Clone, Copy, Default)]
struct Fallback {
    /// The stale copy may answer when the origin fails.
    if_error: bool,
    /// It may never answer stale: an unreachable origin is a 504.
    never_stale: bool,
}

/// The stale copy answers because the origin failed and stale-if-error allows it.
fn serve_stale_on_error(ex: &mut Exchange<'_>, stored: &Entry, why: &str) {
    let age = policy::current_age(stored.initial_age, stored.response_time, SystemTime::now());
    let ttl = stored.freshness.as_secs() as i64 - age.as_secs() as i64;
    debug!("STALE {} (stale-if-error: {why})", ex.req.target);
    let cache_status = format!("{CACHE_NAME}; hit; ttl={ttl}; detail=stale-if-error-{why}");
    serve_stored(ex, stored, age, CacheStatus::Stale, cache_status);
}

/// A request with only-if-cached that nothing stored may answer.
fn only_if_cached_miss(ex: &mut Exchange<'_>, forward: Forward) {
    let cache_status = format!(
        "{CACHE_NAME}; {}; detail=only-if-cached",
        forward.cache_status_params()
    );
    own_error(
        ex,
        504,
        CacheStatus::Miss,
        cache_status,
        "only-if-cached and nothing stored may answer",
    );
}

/// An answer in Echo's own words (never stored, with what the cache did).
fn own_error(
    ex: &mut Exchange<'_>,
    status: u16,
    cache: CacheStatus,
    cache_status: String,
    message: &str,
) {
    let mut headers = vec![
        (
            "content-type".to_string(),
            b"text/plain; charset=utf-8".to_vec(),
        ),
        ("cache-control".to_string(), b"no-store".to_vec()),
    ];
    add_status(&mut headers, cache, cache_status);
    let _ = ex.respond(status, &headers, format!("echo: {message}\n").as_bytes());
}

/// Answers from a stored entry: 304 when the client's validators match (RFC 9111
/// §4.3.2), the whole response otherwise. `cache_status` is the `Cache-Status` member.
fn serve_stored(
    ex: &mut Exchange<'_>,
    entry: &Entry,
    age: Duration,
    status: CacheStatus,
    cache_status: String,
) {
    if entry.status == 200 && not_modified(&ex.req, &entry.headers) {
        // RFC 9110 §15.4.5: a 304 carries the fields a 200 would have that describe
        // the representation's caching and validation, and no content.
        let mut headers: Headers = entry
            .headers
            .iter()
            .filter(|(n, _)| {
                matches!(
                    n.as_str(),
                    "cache-control"
                        | "content-location"
                        | "date"
                        | "etag"
                        | "expires"
                        | "vary"
                        | "last-modified"
                        | "via"
                )
            })
            .cloned()
            .collect();
        headers.push(("age".into(), age.as_secs().to_string().into_bytes()));
        add_status(&mut headers, status, cache_status);
        let _ = ex.respond(304, &headers, b"");
        return;
    }
    let mut added = Vec::with_capacity(3);
    added.push(("age".into(), age.as_secs().to_string().into_bytes()));
    add_status(&mut added, status, cache_status);
    match &entry.file {
        // A large body from the memory store: sent from its memfd (no copy).
        Some(file) => {
            let _ = ex.respond_file(entry.status, &[&entry.headers, &added], file);
        }
        None => {
            let _ = ex.respond_fields(entry.status, &[&entry.headers, &added], &entry.body);
        }
    }
}

/// RFC 9110 §13.1.2 / §13.1.3 / §13.2.2: If-None-Match (weak comparison) takes
/// precedence; If-Modified-Since is evaluated only without it.
fn not_modified(req: &Request, stored: &Headers) -> bool {
    if let Some(inm) = policy::header_joined(&req.headers, "if-none-match") {
        let Some(etag) = http::header(stored, "etag") else {
            return false;
        };
        let etag = String::from_utf8_lossy(etag);
        let opaque = |t: &str| t.trim().trim_start_matches("W/").to_string();
        return inm
            .split(',')
            .any(|t| t.trim() == "*" || opaque(t) == opaque(&etag));
    }
    let (Some(ims), Some(lm)) = (
        req.header("if-modified-since"),
        http::header(stored, "last-modified"),
    ) else {
        return false;
    };
    let parse = |v: &[u8]| {
        std::str::from_utf8(v)
            .ok()
            .and_then(|s| httpdate::parse_http_date(s).ok())
    };
    matches!((parse(ims), parse(lm)), (Some(ims), Some(lm)) if lm <= ims)
}

/// Fields Echo sets itself on every forwarded request (or leaves to the client library:
/// Host is the chosen server's, framing is re-done); the client's own are removed,
/// whatever their spelling, so they cannot steer what the origin builds.
const SET_BY_ECHO: &[&str] = &[
    "host",
    "content-length",
    "expect",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
];

/// The client's preconditions, and Range: a fill is unconditional and whole (the stored
/// response must be the whole one, the same for everyone), so none of these go out on
/// it; the client's own are answered from what is stored (If-None-Match,
/// If-Modified-Since) or not at all. (A GET with a Range is passed through, not filled.)
const PRECONDITIONS: &[&str] = &[
    "range",
    "if-match",
    "if-none-match",
    "if-modified-since",
    "if-unmodified-since",
    "if-range",
];

/// The request as it goes to the origin: hop-by-hop fields and those Echo sets removed
/// (names compared folded: `X_Forwarded_Host` is `X-Forwarded-Host`), fields whose name
/// holds `_` dropped unless `underscores` allows them (nginx's `underscores_in_headers`),
/// and `Via`, `X-Forwarded-For`, `X-Forwarded-Proto` and `X-Forwarded-Host` added.
pub fn forward_headers(req: &Request, underscores: bool) -> Headers {
    let mut headers = req.headers.clone();
    http::strip_hop_by_hop(&mut headers);
    let prior_xff = policy::header_joined(&headers, "x-forwarded-for");
    headers.retain(|(n, _)| {
        (underscores || !n.contains('_')) && !SET_BY_ECHO.iter().any(|f| http::same_field(n, f))
    });
    headers.push(("via".into(), VIA.to_vec()));
    let peer = req.peer.ip().to_string();
    let xff = match prior_xff {
        Some(prior) => format!("{prior}, {peer}"),
        None => peer,
    };
    headers.push(("x-forwarded-for".into(), xff.into_bytes()));
    headers.push(("x-forwarded-proto".into(), b"http".to_vec()));
    if !req.host.is_empty() {
        headers.push(("x-forwarded-host".into(), req.host.as_bytes().to_vec()));
    }
    headers
}

/// The origin's response fields as Echo passes them on (and stores them): hop-by-hop
/// removed, our `Via` added, and a `Date` when the origin sent none (RFC 9110 §6.6.1).
/// What the origin says in Echo's own name is dropped: its `X-Cache-Status`, and the
/// members of `Cache-Status` named `echo` (RFC 9211 §2: each cache adds its own member;
/// an origin's claim to be Echo would mislead whoever reads them).
fn response_headers(origin: &Headers, response_time: SystemTime) -> Headers {
    let mut headers = origin.clone();
    http::strip_hop_by_hop(&mut headers);
    headers.retain_mut(|(n, v)| match n.as_str() {
        "x-cache-status" => false,
        "cache-status" => {
            let kept: Vec<&[u8]> = policy::split_list(v)
                .into_iter()
                .filter(|m| cache_status_name(m) != CACHE_NAME.as_bytes())
                .collect();
            *v = kept.join(&b", "[..]);
            !v.is_empty()
        }
        _ => true,
    });
    if http::header(&headers, "date").is_none() {
        headers.push((
            "date".into(),
            httpdate::fmt_http_date(response_time).into_bytes(),
        ));
    }
    headers.push(("via".into(), VIA.to_vec()));
    headers
}

/// The cache a `Cache-Status` member names: its item, a token or a string (RFC 9211 §2).
fn cache_status_name(member: &[u8]) -> &[u8] {
    let item = member
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    item.strip_prefix(b"\"")
        .and_then(|s| s.strip_suffix(b"\""))
        .unwrap_or(item)
}

/// The origin's answer if it is a final one. Echo never asks for a protocol switch
/// (Upgrade is hop-by-hop and not forwarded), so a `101 Switching Protocols` — the only
/// interim answer the client library hands back — is a broken origin: 502, and the
/// client's connection goes on speaking HTTP.
fn final_response(response: OriginResponse) -> Result<OriginResponse, OriginError> {
    if response.status < 200 {
        return Err(OriginError::Protocol(format!(
            "a {} answer to a request that asked for no protocol switch",
            response.status
        )));
    }
    Ok(response)
}

fn add_status(headers: &mut Headers, status: CacheStatus, cache_status: String) {
    headers.push(("x-cache-status".into(), status.as_str().as_bytes().to_vec()));
    headers.push(("cache-status".into(), cache_status.into_bytes()));
}

/// The target of a Location / Content-Location value if it is on the request's own
/// origin (a path, or an absolute http URL with the same host).
fn same_origin_target(value: &[u8], host: &str) -> Option<String> {
    let value = std::str::from_utf8(value).ok()?.trim();
    if value.starts_with('/') && !value.starts_with("//") {
        return Some(value.to_string());
    }
    let rest = value.strip_prefix("http://")?;
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let authority = authority.to_ascii_lowercase();
    let authority = authority.strip_suffix(":80").unwrap_or(&authority);
    (authority == host).then(|| {
        if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_string()
        }
    })
}
