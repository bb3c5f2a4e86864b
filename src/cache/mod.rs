//! The caching proxy's request path, by stage: for each request, look the key up
//! (here), answer from the store when RFC 9111 allows (`hit`), otherwise fetch once
//! per key (`fill`) while streaming the answer and storing it when allowed (`stream`),
//! refresh in the background what may be served stale (`refresh`), and pass through
//! what the cache does not serve (`forward`). What was done is one [`Outcome`]
//! (`outcome`), rendered into headers, metrics and logs.
//!
//! A request arrives on its connection's thread (`Handler::inline`): a hit is answered
//! there; anything that waits on the origin goes to the fetch pool as a typed [`Job`].
//!
//! Invariants: a store error is a miss, never a failed request; a response is stored
//! only when the policy allows it, it is complete, and it fits `cache.max_object_bytes`;
//! an origin body that breaks mid-way cuts the client's response (never a fabricated
//! complete one) and stores nothing; every proxied response says what happened in
//! `X-Cache-Status` and in an RFC 9211 `Cache-Status` member.

mod coalesce;
mod compress;
pub use compress::STORED_CODING;
mod encoding;
mod fill;
mod forward;
mod head;
mod hit;
mod outcome;
mod refresh;
mod stream;

use std::num::NonZeroUsize;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use log::{debug, warn};
use lru::LruCache;

use crate::access_log::{AccessLog, Record};
use crate::config::Config;
use crate::http::exchange::Exchange;
use crate::http::handler::{Handler, Step};
use crate::http::range;
use crate::http::response::Omit;
use crate::http::Request;
use crate::key::CacheKey;
use crate::live::Live;
use crate::metrics::Metrics;
use crate::policy::{CacheControl, PolicyOptions};
use crate::store::{Entry, Lookup, Store};
use crate::upstream::Upstreams;

use coalesce::Coalescer;
pub(crate) use outcome::{Bypass, Fwd, Outcome, OwnAnswer};

use fill::{Fallback, Lead};
use forward::VIA;
use refresh::Background;

/// Keys remembered as uncacheable per node, at most (each a few hundred bytes).
const PASSES: NonZeroUsize = match NonZeroUsize::new(65_536) {
    Some(n) => n,
    None => unreachable!(),
};

/// When a fill began: the store's invalidation generation then, and the time.
#[derive(Debug, Clone, Copy)]
pub struct Since {
    generation: u64,
    started: Instant,
}

/// The stale copy a request selected: what a fill revalidates, and what may answer
/// if that fails.
pub(crate) type StaleCopy = (Arc<Entry>, Fallback);

/// What the fetch pool does for a request the cache handed it (it may wait on the
/// origin there without holding a thread that answers hits).
pub enum Job {
    /// Pass it through (other methods, ranges, an unreadable store).
    Forward(Bypass),
    /// Fetch it once for everyone waiting on it, and store it when allowed; with the
    /// stale copy the request selected (to revalidate, and what may answer if that
    /// fails).
    Fill {
        key: CacheKey,
        fwd: Fwd,
        since: Since,
        stale: Option<StaleCopy>,
        /// Whom it fetches for: its key's waiters (leading their flight), or itself.
        lead: Lead,
    },
    /// Another request fetches the key: this one waited for it (without a thread) and
    /// now acts on what came of it.
    Follow {
        key: CacheKey,
        fwd: Fwd,
        since: Since,
        stale: Option<StaleCopy>,
        follower: coalesce::Follower,
    },
}

/// The caching proxy: the [`Handler`] of the proxy listener.
pub struct Cache {
    store: Arc<dyn Store>,
    /// Replaced whole by a config reload.
    origin: Arc<Live<Upstreams>>,
    policy: PolicyOptions,
    max_object_bytes: usize,
    /// A fill that takes longer than this is not stored (older invalidations are no
    /// longer remembered to check it against).
    ban_ttl: Duration,
    /// Refresh-ahead window; zero: off.
    refresh_ahead: Duration,
    background: OnceLock<Background>,
    coalescer: Coalescer,
    /// The cross-node fill lock's lease (renewed while its holder fetches).
    coalesce_lock_ttl: Duration,
    /// How long a leader may take to get the origin's answer head (every origin
    /// service's connect, send and response timeouts, over its tries): its waiters
    /// wait that long from its start.
    lead_allowance: Duration,
    /// How long a leader may take for each read of a body (the origin's read timeout,
    /// and the client's write timeout it streams to): its waiters wait on that long
    /// after each.
    body_allowance: Duration,
    /// Hit-for-pass: how long a key whose answer may not be shared is remembered.
    uncacheable_ttl: Duration,
    /// Keys remembered as uncacheable on this node, until when (bounded, least
    /// recently used dropped first).
    passes: Mutex<LruCache<String, Instant>>,
    /// Identifies this Echo process in fill-lock owner ids.
    node_id: String,
    fetches: AtomicU64,
    metrics: Arc<Metrics>,
    /// `log.access_log`, replaced by a reload that changes it.
    access_log: Live<Option<AccessLog>>,
    /// Whether there is one: lets every request without an access log skip the lock
    /// and the shared reference count of `access_log`.
    access_log_on: AtomicBool,
    /// Request fields never sent on fills (`cache.strip_request_headers`, folded).
    strip: Vec<String>,
    /// What `Accept-Encoding` is normalised to (`cache.normalize_accept_encoding`).
    codings: Vec<String>,
    /// Codings bodies are stored in (`cache.compress`; the first is used).
    compress: Vec<String>,
    /// Fields left out of every answer (`cache.expose_status_headers`,
    /// `cache.strip_surrogate_key`).
    omit: Omit,
    /// Forward fields whose names hold `_` (`server.underscores_in_headers`).
    underscores: bool,
    last_warning: AtomicU64,
}

/// What `Accept-Encoding` is normalised to, in preference order: the codings bodies are
/// stored in (`cache.compress`) first, so a client that accepts the stored coding is
/// given it, then `cache.normalize_accept_encoding`. Empty (off) stays off.
fn normalization_order(normalize: &[String], compress: &[String]) -> Vec<String> {
    if normalize.is_empty() {
        return Vec::new();
    }
    let mut order: Vec<String> = compress.to_vec();
    order.extend(normalize.iter().filter(|c| !compress.contains(c)).cloned());
    order
}

impl Cache {
    /// The request path as `cfg` sets it up, on `store` and the origin services.
    pub fn new(
        cfg: &Config,
        store: Arc<dyn Store>,
        origin: Arc<Live<Upstreams>>,
        metrics: Arc<Metrics>,
    ) -> Cache {
        let c = &cfg.cache;
        for key in &c.retired {
            warn!(
                "{key} is no longer used and is ignored: a request waits for another's \
                 fetch of the same key as long as that fetch makes progress, with no cap \
                 on how many wait"
            );
        }
        let services = std::iter::once(&cfg.origin).chain(cfg.routes.iter().map(|r| &r.origin));
        let lead_allowance = services
            .clone()
            .map(|o| {
                o.total_timeout.unwrap_or(
                    (o.connect_timeout + o.send_timeout + o.response_timeout)
                        * u32::try_from(o.retries + 1).unwrap_or(u32::MAX),
                )
            })
            .max()
            .unwrap_or_default();
        let max_read = services.map(|o| o.read_timeout).max().unwrap_or_default();
        Cache {
            store,
            origin,
            policy: PolicyOptions::from_config(c),
            max_object_bytes: c.max_object_bytes,
            ban_ttl: cfg.invalidation.ban_ttl,
            refresh_ahead: c.refresh_ahead,
            background: OnceLock::new(),
            coalescer: Coalescer::new(lead_allowance),
            coalesce_lock_ttl: c.coalesce_lock_ttl,
            lead_allowance,
            body_allowance: max_read + cfg.server.write_timeout,
            uncacheable_ttl: c.uncacheable_ttl,
            passes: Mutex::new(LruCache::new(PASSES)),
            node_id: format!(
                "{}-{}",
                std::process::id(),
                SystemTime::now()
                    .duration_since(UNIX_EPOCH)
                    .map_or(0, |d| d.as_nanos())
            ),
            fetches: AtomicU64::new(0),
            metrics,
            access_log: Live::new(Arc::new(None)),
            access_log_on: AtomicBool::new(false),
            strip: c.strip_request_headers.clone(),
            codings: normalization_order(&c.normalize_accept_encoding, &c.compress),
            compress: c.compress.clone(),
            omit: Omit {
                status_fields: !c.expose_status_headers,
                surrogate_key: c.strip_surrogate_key,
            },
            underscores: cfg.server.underscores_in_headers,
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

    /// Where a request goes: Echo's own answer (`OPTIONS *`), through without the cache
    /// (methods other than GET and HEAD, ranges), or a lookup (`nonblocking`: only one
    /// the store answers in-process; declined otherwise).
    fn route(&self, ex: &mut Exchange<'_>, nonblocking: bool) -> Step<Job> {
        if ex.req.target == "*" {
            // `OPTIONS *` asks about this server, not a resource; Echo answers it (as
            // most servers do) rather than invent a resource on the origin.
            let headers = [("via".to_string(), VIA.to_vec())];
            let _ = ex.respond(200, &headers, b"");
            return Step::Answered;
        }
        let cacheable_method = matches!(ex.req.method.as_str(), "GET" | "HEAD");
        if !cacheable_method {
            return Step::Defer(Job::Forward(Bypass::Method));
        }
        encoding::normalize_request(&mut ex.req, &self.codings);
        // RFC 9110 §14.2: "A server MUST ignore a Range header field received with a
        // request method that is unrecognized or for which range handling is not
        // defined" — GET is the only one. A HEAD with a Range is a HEAD. A GET for byte
        // ranges is looked up (and filled whole) like any other, and answered from the
        // stored response (`hit::respond_entry`). A Range in another unit is not Echo's
        // to answer: it goes through (RFC 9110 §14.2: "A proxy MAY discard a Range
        // header field that contains a range unit it does not understand").
        if ex.req.header("range").is_some()
            && !ex.req.is_head()
            && !range::asks_for_bytes(&ex.req.headers)
        {
            return Step::Defer(Job::Forward(Bypass::Range));
        }
        self.lookup(ex, nonblocking)
    }

    /// Looks the request up (`nonblocking`: see `route`): a hit is answered; a miss (or a stale entry to revalidate)
    /// becomes a fill job; an unreadable store a pass-through.
    fn lookup(&self, ex: &mut Exchange<'_>, nonblocking: bool) -> Step<Job> {
        let key = CacheKey::new("http", &ex.req.host, &ex.req.target);
        let started = Instant::now();
        let found = if nonblocking {
            match self.store.peek(&key) {
                Some(found) => Ok(found),
                None => return Step::Decline,
            }
        } else {
            self.store.get(&key)
        };
        let Lookup {
            variants,
            generation,
            local,
        } = match found {
            Ok(v) => v,
            Err(e) => {
                self.warn_limited(format_args!(
                    "{} store lookup failed: {e}",
                    self.store.name()
                ));
                return Step::Defer(Job::Forward(Bypass::StoreError));
            }
        };
        let since = Since {
            generation,
            started,
        };
        // Which tier answered, for a Redis store (the memory store has one).
        let tier = match (local, self.store.name()) {
            (true, _) => Some("local"),
            (false, "redis") => Some("redis"),
            _ => None,
        };
        let Some((fwd, stale)) = self.answer_from_store(ex, &key, &variants, since, tier) else {
            return Step::Answered;
        };
        if nonblocking && !self.store.in_process() {
            // The origin must be asked, and the fill lock is a round trip: a worker looks
            // again and coalesces.
            return Step::Decline;
        }
        let req_cc = CacheControl::parse_request(&ex.req.headers);
        // RFC 9111 §5.2.1.7: "The only-if-cached request directive indicates that the client
        // only wishes to obtain a stored response. Caches that honor this request directive
        // SHOULD, upon receiving it, respond with either a stored response consistent with
        // the other constraints of the request or a 504 (Gateway Timeout) status code."
        if req_cc.only_if_cached && self.policy.honor_request {
            forward::own_error(
                ex,
                504,
                Outcome::Own {
                    fwd,
                    why: OwnAnswer::OnlyIfCached,
                },
                "only-if-cached and nothing stored may answer",
            );
            return Step::Answered;
        }
        debug!("{} {key}", fwd.params());
        self.coalesce(ex, key, fwd, since, stale)
    }

    /// Counts the request and writes its access log line; `label` is what was done
    /// (`none` when nothing of the cache was).
    fn record(&self, label: &'static str, r: Record<'_>) {
        self.metrics.request(label, r.method, r.status, r.took);
        if let Some(log) = self.access_log_if_on().as_deref().and_then(Option::as_ref) {
            log.log(&r);
        }
    }
}

impl Cache {
    /// A follower's wait is over: what came of its leader's fetch decides (`followed`).
    /// Any other job is handed back as it is.
    fn end_follow(&self, ex: &mut Exchange<'_>, job: Job) -> Step<Job> {
        let Job::Follow {
            key,
            fwd,
            since,
            stale,
            follower,
        } = job
        else {
            return Step::Defer(job);
        };
        let joined = follower.end();
        self.followed(ex, key, fwd, since, stale, joined)
    }
}

/// The request's User-Agent, for the access log (None: absent or not UTF-8).
fn user_agent(req: &Request) -> Option<&str> {
    req.header("user-agent")
        .and_then(|v| std::str::from_utf8(v).ok())
}

impl Handler for Cache {
    type Job = Job;

    /// On an I/O thread, nothing that waits: a hit the store answers in-process (the
    /// memory store, the Redis store's local tier) is answered at once, with no hand-off;
    /// what bypasses the cache, and a memory-store miss, go straight to the fetch stage
    /// (or wait for another request's fetch, holding no thread); the rest (a Redis
    /// lookup or fill lock) is declined, for a worker.
    fn inline(&self, ex: &mut Exchange<'_>) -> Step<Job> {
        self.route(ex, true)
    }

    /// `cache.expose_status_headers = false` and `cache.strip_surrogate_key`: the server
    /// applies them to every exchange and to its own refusals.
    fn omit(&self) -> Omit {
        self.omit
    }

    fn handle(&self, ex: &mut Exchange<'_>) -> Step<Job> {
        self.route(ex, false)
    }

    /// A follower whose leader is done: with an in-process store, answered from it on
    /// the I/O thread; otherwise (a read from the Redis master) on the fetch pool.
    fn resume(&self, ex: &mut Exchange<'_>, job: Job) -> Step<Job> {
        match job {
            job @ Job::Follow { .. } if self.store.in_process() => self.end_follow(ex, job),
            job => Step::Defer(job),
        }
    }

    /// The fetch stage: whatever waits on the origin.
    fn fetch(&self, ex: &mut Exchange<'_>, job: Job) {
        match job {
            Job::Forward(why) => self.forward(ex, Fwd::Bypass(why)),
            Job::Fill {
                key,
                fwd,
                since,
                stale,
                lead,
            } => {
                let stale = stale.as_ref().map(|(e, f)| (&**e, *f));
                self.fill_for(ex, &key, fwd, since, stale, lead);
            }
            job @ Job::Follow { .. } => {
                // A fill at most: it runs here.
                if let Step::Defer(next) = self.end_follow(ex, job) {
                    self.fetch(ex, next);
                }
            }
        }
    }

    /// Counts a request the server refused before any handler saw it (cache status
    /// `none`; method `other` when its head could not be parsed), and logs it.
    fn refused(&self, peer: std::net::SocketAddr, request: Option<&Request>, status: u16) {
        let took = request.map_or(Duration::ZERO, |r| r.received.elapsed());
        self.record(
            "none",
            Record {
                received: SystemTime::now() - took,
                client: peer.ip(),
                method: request.map_or("-", |r| r.method.as_str()),
                target: request.map_or("-", |r| r.target.as_str()),
                version: request.map_or("-", |r| r.version.as_str()),
                status,
                bytes: 0,
                took,
                cache_status: "none",
                origin: None,
                host: request.map_or("-", |r| r.host.as_str()),
                user_agent: request.and_then(|r| user_agent(r)),
            },
        );
    }

    /// Counts the request (`echo_requests_total`, `echo_request_duration_seconds`) and
    /// writes its access log line.
    fn finished(&self, ex: &Exchange<'_>) {
        let took = ex.req.received.elapsed();
        self.record(
            ex.label(),
            Record {
                received: SystemTime::now() - took,
                client: ex.req.peer.ip(),
                method: &ex.req.method,
                target: &ex.req.target,
                version: ex.req.version.as_str(),
                status: ex.status(),
                bytes: ex.body_bytes(),
                took,
                cache_status: ex.label(),
                origin: ex.origin(),
                host: &ex.req.host,
                user_agent: user_agent(&ex.req),
            },
        );
    }
}
