//! The admin listener (`admin.listen`, never the proxy port): `GET /health` and
//! `GET /ready` without a token; every other call needs `Authorization: Bearer
//! <admin.token>`.
//!
//! - `GET /health`: 200 while Echo serves, JSON naming what is degraded (store, origins,
//!   invalidation thread). `GET /ready`: 200, or 503 once a drain has begun.
//! - `POST /invalidate` `{"pattern": "^/orgs/42/", "host": ..., "tag": ..., "mode":
//!   "delete"|"refresh"|"stale", "dry_run": bool, "async": bool, "all": bool}`:
//!   validates (a pattern that matches every entry needs `"all": true`), queues the job
//!   for the invalidation thread, and answers when it is done (200; 503 if it failed,
//!   409 if it was cancelled), or at once with a job id (202) for `async` or a job still
//!   running after `invalidation.wait_timeout`.
//! - `GET /invalidate/<id>`: a job's report, with live counters while it runs.
//! - `DELETE /invalidate/<id>`: cancels a job: a queued one at once (200, `cancelled`),
//!   a running one at its next check (202, `running` with `cancel_requested`); 409 for a
//!   job already finished, 404 for an unknown one.
//! - `GET /metrics`: Prometheus / OpenMetrics text.
//!
//! `client` is the other side, for `echod invalidate`.
//!
//! Invariants: the token is compared in constant time and never logged; nothing is done
//! for a request without the token; bad input is a 400 naming what is wrong, and a
//! full queue a 503 with Retry-After.

pub mod client;

use std::io::Read;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crossbeam_channel::RecvTimeoutError;
use serde::Deserialize;
use serde_json::{json, Value};

use crate::http::exchange::Exchange;
use crate::http::handler::{Handler, Step};
use crate::invalidation::{Job, Matcher, Mode};
use crate::invalidator::{CancelRefused, Invalidator, Refused, Report, State};
use crate::live::Live;
use crate::metrics::Metrics;
use crate::store::Store;
use crate::upstream::Upstreams;

/// Largest `POST /invalidate` body read.
pub(crate) const MAX_BODY: u64 = 64 * 1024;

pub struct Admin {
    /// Replaced by a config reload that changes `admin.token`.
    token: Live<String>,
    /// `admin.metrics_token` (read-only), replaced by a reload that changes it.
    metrics_token: Live<Option<String>>,
    invalidator: Arc<Invalidator>,
    wait: Duration,
    metrics: Arc<Metrics>,
    upstreams: Arc<Live<Upstreams>>,
    store: Arc<dyn Store>,
    /// Set when the proxy starts draining: `/ready` fails from then on.
    draining: Arc<AtomicBool>,
    /// The cache's policy: `GET /cache` reports the directives Echo acts on.
    policy: crate::policy::PolicyOptions,
}

/// What the admin API reports on and acts through.
pub struct AdminParts {
    pub token: String,
    pub metrics_token: Option<String>,
    pub invalidator: Arc<Invalidator>,
    pub wait: Duration,
    pub metrics: Arc<Metrics>,
    pub upstreams: Arc<Live<Upstreams>>,
    pub store: Arc<dyn Store>,
    pub draining: Arc<AtomicBool>,
    pub policy: crate::policy::PolicyOptions,
}

/// The JSON body of `POST /invalidate`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct InvalidateRequest {
    /// Exactly this URL (`http://host/path?query`), every Vary variant under it.
    url: Option<String>,
    /// Exactly these URLs, at most 1,000.
    urls: Option<Vec<String>>,
    pattern: Option<String>,
    tag: Option<String>,
    host: Option<String>,
    mode: Option<String>,
    #[serde(default)]
    dry_run: bool,
    #[serde(default, rename = "async")]
    asynchronous: bool,
    /// Required when the pattern matches every entry: says that was meant.
    #[serde(default)]
    all: bool,
}

impl Admin {
    pub fn new(parts: AdminParts) -> Admin {
        Admin {
            token: Live::new(Arc::new(parts.token)),
            metrics_token: Live::new(Arc::new(parts.metrics_token)),
            invalidator: parts.invalidator,
            wait: parts.wait,
            metrics: parts.metrics,
            upstreams: parts.upstreams,
            store: parts.store,
            draining: parts.draining,
            policy: parts.policy,
        }
    }

    /// A config reload's new `admin.token`.
    pub(crate) fn set_token(&self, token: String) {
        self.token.set(Arc::new(token));
    }

    /// A config reload's new `admin.metrics_token`.
    pub(crate) fn set_metrics_token(&self, token: Option<String>) {
        self.metrics_token.set(Arc::new(token));
    }

    /// `GET /health`: 200 while Echo serves (it does with Redis down, or every origin
    /// server out: misses, stale copies and errors are answers); the body says which
    /// of the store, the origins and the invalidation thread are degraded.
    fn health(&self) -> Value {
        let mut degraded = Vec::new();
        let store_errors = self.store.health();
        if !store_errors.is_empty() {
            degraded.push("store");
        }
        let services = self.upstreams.get().health();
        let origins: Vec<Value> = services
            .iter()
            .map(|s| {
                let up = s.servers.iter().filter(|v| v.up).count();
                json!({
                    "name": s.name,
                    "status": if up == 0 { "down" } else if up < s.servers.len() { "degraded" } else { "ok" },
                    "servers": s.servers.iter().map(|v| {
                        let mut o = json!({ "url": v.server, "up": v.up });
                        if let Some(r) = &v.reason {
                            o["reason"] = json!(r);
                        }
                        o
                    }).collect::<Vec<_>>(),
                })
            })
            .collect();
        if services.iter().any(|s| !s.servers.iter().any(|v| v.up)) {
            degraded.push("origins");
        }
        let invalidation = self.invalidator.health();
        if invalidation.is_some() {
            degraded.push("invalidation");
        }
        let mut store = json!({
            "name": self.store.name(),
            "status": if store_errors.is_empty() { "ok" } else { "degraded" },
        });
        if !store_errors.is_empty() {
            store["errors"] = json!(store_errors);
        }
        let servers = self.store.servers();
        if !servers.is_empty() {
            store["servers"] = servers.iter().map(server_json).collect();
        }
        if let Some(tier) = self.store.local_tier() {
            store["local_tier"] = json!({
                "state": tier.state,
                "reason": tier.reason,
                "bytes": tier.bytes,
                "entries": tier.entries,
                "hits": tier.hits,
                "misses": tier.misses,
                "invalidations": tier.invalidations,
                "flushes": tier.flushes,
            });
        }
        let mut inv = json!({
            "status": if invalidation.is_none() { "ok" } else { "degraded" },
            "queued": self.invalidator.queued(),
        });
        if let Some(why) = invalidation {
            inv["error"] = json!(why);
        }
        json!({
            "status": if degraded.is_empty() { "ok" } else { "degraded" },
            "degraded": degraded,
            "draining": self.draining.load(Ordering::SeqCst),
            "store": store,
            "origins": origins,
            "invalidation": inv,
        })
    }

    /// What the request's bearer token allows (None: no token, or a wrong one).
    fn access(&self, ex: &Exchange<'_>) -> Option<Access> {
        let given = bearer_token(ex.req.header("authorization")?)?;
        if constant_time_eq(given, self.token.get().as_bytes()) {
            return Some(Access::Full);
        }
        let read_only = self.metrics_token.get();
        match read_only.as_deref() {
            Some(t) if constant_time_eq(given, t.as_bytes()) => Some(Access::ReadOnly),
            _ => None,
        }
    }
}

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Access {
    /// `admin.token`: everything.
    Full,
    /// `admin.metrics_token`: `/metrics`, `GET /cache` and job status; never a change.
    ReadOnly,
}

/// The token of `Bearer <token>` credentials. RFC 9110 §11.1: "It uses a case-
/// insensitive token as a means to identify the authentication scheme"; §11.4:
/// `credentials = auth-scheme [ 1*SP ( token68 / ... ) ]`.
fn bearer_token(value: &[u8]) -> Option<&[u8]> {
    let space = value.iter().position(|&b| b == b' ')?;
    let (scheme, rest) = value.split_at(space);
    if !scheme.eq_ignore_ascii_case(b"bearer") {
        return None;
    }
    let token = rest.trim_ascii();
    (!token.is_empty()).then_some(token)
}

/// Compares without an early exit, so the time taken says nothing about how much of a
/// guessed token was right. Written here: it is four lines, not worth a dependency.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, &y) in b.iter().enumerate() {
        diff |= usize::from(a.get(i).copied().unwrap_or(!y) ^ y);
    }
    diff == 0
}

fn json_headers() -> [(String, Vec<u8>); 2] {
    [
        ("content-type".to_string(), b"application/json".to_vec()),
        ("cache-control".to_string(), b"no-store".to_vec()),
    ]
}

fn reply(ex: &mut Exchange<'_>, status: u16, body: &Value) {
    reply_with(ex, status, body, &[]);
}

/// [`reply`] with more fields (`Allow` on a 405).
fn reply_with(ex: &mut Exchange<'_>, status: u16, body: &Value, extra: &[(String, Vec<u8>)]) {
    let mut text = body.to_string();
    text.push('\n');
    let mut headers = json_headers().to_vec();
    headers.extend(crate::http::own_fields());
    headers.extend(extra.iter().cloned());
    match status {
        401 => headers.push(("www-authenticate".to_string(), b"Bearer".to_vec())),
        503 => headers.push(("retry-after".to_string(), b"1".to_vec())),
        _ => {}
    }
    let _ = ex.respond(status, &headers, text.as_bytes());
}

/// A 405 naming the methods the endpoint takes.
fn not_allowed(ex: &mut Exchange<'_>, allow: &str, message: &str) {
    let allow = [("allow".to_string(), allow.as_bytes().to_vec())];
    reply_with(ex, 405, &json!({ "error": message }), &allow);
}

fn error(ex: &mut Exchange<'_>, status: u16, message: &str) {
    reply(ex, status, &json!({ "error": message }));
}

/// A report as JSON; the count of changed entries is named after the mode.
fn report_json(r: &Report) -> Value {
    let changed = match (r.dry_run, r.mode) {
        (true, _) => "would_change",
        (false, Mode::Delete) => "deleted",
        (false, Mode::Refresh) => "refreshed",
        (false, Mode::Stale) => "marked_stale",
    };
    let mut v = json!({
        "id": r.id,
        "state": r.state.as_str(),
        "mode": r.mode.as_str(),
        "dry_run": r.dry_run,
        "what": r.what,
        "scanned": r.scanned,
        "matched": r.matched,
        changed: if r.dry_run { r.matched } else { r.changed },
        "elapsed_ms": r.elapsed.as_millis() as u64,
    });
    if r.dry_run {
        v["sample"] = json!(r.sample);
    }
    let mut warnings = r.warnings.clone();
    if let Some((acked, wanted)) = r.replicas {
        v["replicas"] = json!({ "acknowledged": acked, "expected": wanted });
        if acked < wanted {
            warnings.push(format!(
                "only {acked} of {wanted} replicas acknowledged in time: Echo reads from \
                 the master until they catch up"
            ));
        }
    }
    if let Some((acked, wanted)) = r.nodes {
        v["nodes"] = json!({ "acknowledged": acked, "expected": wanted });
        if acked < wanted {
            warnings.push(format!(
                "only {acked} of {wanted} other Echo nodes acknowledged in time: the \
                 others may read a replica behind this job until their lease runs out (2 s)"
            ));
        }
    }
    if !warnings.is_empty() {
        v["warning"] = json!(warnings.join("; "));
    }
    if let Some(e) = &r.error {
        v["error"] = json!(e);
    }
    if r.cancel_requested {
        v["cancel_requested"] = json!(true);
    }
    v
}

impl Admin {
    fn invalidate(&self, ex: &mut Exchange<'_>) {
        let mut body = Vec::new();
        match ex.body().take(MAX_BODY + 1).read_to_end(&mut body) {
            Ok(_) if body.len() as u64 > MAX_BODY => {
                return error(ex, 413, "the request body is larger than 64 KiB")
            }
            Ok(_) => {}
            Err(_) => return error(ex, 400, "the request body could not be read"),
        }
        let request: InvalidateRequest = match serde_json::from_slice(&body) {
            Ok(r) => r,
            Err(e) => return error(ex, 400, &format!("invalid JSON: {e}")),
        };
        let mode = match request.mode.as_deref() {
            None => Mode::Delete,
            Some(m) => match Mode::parse(m) {
                Some(mode) => mode,
                None => {
                    return error(
                        ex,
                        400,
                        &format!("unknown mode {m:?}: use \"delete\", \"refresh\" or \"stale\""),
                    )
                }
            },
        };
        let urls: Option<Vec<String>> = match (request.url, request.urls) {
            (Some(_), Some(_)) => return error(ex, 400, "give \"url\" or \"urls\", not both"),
            (Some(url), None) => Some(vec![url]),
            (None, urls) => urls,
        };
        let matcher = match urls {
            Some(_)
                if request.pattern.is_some() || request.tag.is_some() || request.host.is_some() =>
            {
                return error(
                    ex,
                    400,
                    "a purge by URL names its URLs exactly: give no pattern, tag or host with it",
                )
            }
            Some(urls) => Matcher::for_urls(&urls),
            None => Matcher::new(
                request.pattern.as_deref(),
                request.host.as_deref(),
                request.tag.as_deref(),
            ),
        };
        let matcher = match matcher {
            Ok(m) => m,
            Err(e) => return error(ex, 400, &e.0),
        };
        if matcher.matches_every_target() && !request.all {
            let whose = match matcher.host() {
                Some(host) => format!("every entry of {host}"),
                None => "every entry".to_string(),
            };
            return error(
                ex,
                400,
                &format!(
                    "the pattern matches {whose}: add \"all\": true to the request if that \
                     is what you mean"
                ),
            );
        }
        let job = Job {
            matcher: Arc::new(matcher),
            mode,
            dry_run: request.dry_run,
        };
        let who = format!("admin-token from {}", ex.req.peer.ip());
        let (id, done) = match self.invalidator.submit(job, &who) {
            Ok(submitted) => submitted,
            Err(Refused::QueueFull) => {
                return error(ex, 503, "the invalidation queue is full; retry shortly")
            }
            Err(Refused::Stopped) => return error(ex, 503, "invalidation is stopped"),
        };
        let accepted = |ex: &mut Exchange<'_>, state: &str| {
            reply(
                ex,
                202,
                &json!({ "id": id, "state": state, "status": format!("/invalidate/{id}") }),
            )
        };
        if request.asynchronous {
            return accepted(ex, "queued");
        }
        match done.recv_timeout(self.wait) {
            Ok(report) if report.state == State::Failed => reply(ex, 503, &report_json(&report)),
            // Cancelled by another call while this one waited for it.
            Ok(report) if report.state == State::Cancelled => reply(ex, 409, &report_json(&report)),
            Ok(report) => reply(ex, 200, &report_json(&report)),
            Err(RecvTimeoutError::Timeout) => accepted(ex, "running"),
            Err(RecvTimeoutError::Disconnected) => error(ex, 503, "invalidation is stopped"),
        }
    }
}

/// The job id of `/invalidate/<id>`.
fn job_id(path: &str) -> Option<u64> {
    path.strip_prefix("/invalidate/")?.parse().ok()
}

impl Admin {
    /// `DELETE /invalidate/<id>`.
    fn cancel(&self, ex: &mut Exchange<'_>, id: Option<u64>) {
        let Some(id) = id else {
            return error(ex, 404, "no such invalidation job");
        };
        match self.invalidator.cancel(id) {
            Ok(report) if report.state == State::Cancelled => reply(ex, 200, &report_json(&report)),
            // Running: it stops at its next check; GET /invalidate/<id> says when.
            Ok(report) => reply(ex, 202, &report_json(&report)),
            Err(CancelRefused::Unknown) => error(ex, 404, "no such invalidation job"),
            Err(CancelRefused::Finished(state)) => reply(
                ex,
                409,
                &json!({
                    "error": format!("invalidation job {id} already ended ({})", state.as_str()),
                    "id": id,
                    "state": state.as_str(),
                }),
            ),
        }
    }

    /// `GET /health` and `GET /ready`, if that is what `ex` asks; false otherwise.
    fn probe(&self, ex: &mut Exchange<'_>) -> bool {
        let path = ex.req.target.split('?').next().unwrap_or("");
        if !matches!(ex.req.method.as_str(), "GET" | "HEAD") {
            return false;
        }
        match path {
            // Status and reasons for anyone (a balancer's probe has no token); the
            // details (servers, origin URLs, errors) only with a token.
            "/health" => {
                let full = self.health();
                if self.access(ex).is_some() {
                    reply(ex, 200, &full)
                } else {
                    let brief = json!({
                        "status": full["status"],
                        "degraded": full["degraded"],
                        "draining": full["draining"],
                    });
                    reply(ex, 200, &brief)
                }
            }
            // Load balancers take a draining node out on this; it needs no token.
            "/ready" if self.draining.load(Ordering::SeqCst) => {
                reply(ex, 503, &json!({ "ready": false, "reason": "draining" }))
            }
            "/ready" => reply(ex, 200, &json!({ "ready": true })),
            _ => return false,
        }
        true
    }
}

impl Handler for Admin {
    /// The admin API never waits on another service for an answer.
    type Job = std::convert::Infallible;

    /// `/health` and `/ready` are answered on the connection's own thread: a balancer's
    /// probe never waits behind other admin work (an invalidation waiting for its job, a
    /// client that pipelines requests and reads none of the answers).
    fn inline(&self, ex: &mut Exchange<'_>) -> Step<Self::Job> {
        if self.probe(ex) {
            Step::Answered
        } else {
            Step::Decline
        }
    }

    fn handle(&self, ex: &mut Exchange<'_>) -> Step<Self::Job> {
        self.answer(ex);
        Step::Answered
    }

    fn fetch(&self, _: &mut Exchange<'_>, job: Self::Job) {
        match job {}
    }
}

impl Admin {
    fn answer(&self, ex: &mut Exchange<'_>) {
        if self.probe(ex) {
            return;
        }
        let path = ex.req.target.split('?').next().unwrap_or("").to_string();
        let method = ex.req.method.clone();
        let Some(access) = self.access(ex) else {
            return error(ex, 401, "missing or wrong bearer token");
        };
        let reads = matches!(
            (method.as_str(), path.as_str()),
            ("GET", "/metrics") | ("GET", "/cache")
        ) || (method == "GET" && path.starts_with("/invalidate/"));
        if access == Access::ReadOnly && !reads {
            return error(
                ex,
                403,
                "admin.metrics_token only reads (/metrics, GET /cache, job status); use admin.token",
            );
        }
        match (method.as_str(), path.as_str()) {
            ("POST", "/invalidate") => self.invalidate(ex),
            ("GET", "/metrics") => {
                let [date, via] = crate::http::own_fields();
                let headers = [
                    (
                        "content-type".to_string(),
                        b"application/openmetrics-text; version=1.0.0; charset=utf-8".to_vec(),
                    ),
                    date,
                    via,
                ];
                let _ = ex.respond(200, &headers, self.metrics.encode().as_bytes());
            }
            ("GET", p) if p.starts_with("/invalidate/") => {
                let report = job_id(p).and_then(|id| self.invalidator.report(id));
                match report {
                    Some(r) => reply(ex, 200, &report_json(&r)),
                    None => error(ex, 404, "no such invalidation job"),
                }
            }
            ("DELETE", p) if p.starts_with("/invalidate/") => self.cancel(ex, job_id(p)),
            ("GET", "/cache") => self.inspect(ex),
            // RFC 9110 §15.5.6: "The origin server MUST generate an Allow header field
            // in a 405 response containing a list of the target resource's currently
            // supported methods."
            (_, "/cache") => not_allowed(ex, "GET", "use GET /cache?url=<URL>"),
            (_, "/invalidate") => not_allowed(ex, "POST", "use POST /invalidate"),
            (_, p) if p.starts_with("/invalidate/") => {
                not_allowed(ex, "GET, DELETE", "use GET or DELETE /invalidate/<id>")
            }
            _ => error(ex, 404, "no such admin endpoint"),
        }
    }
}

impl Admin {
    /// `GET /cache?url=<URL>`: what is stored for that URL, each Vary variant, read
    /// where writes land (the Redis master); 404 when nothing is.
    fn inspect(&self, ex: &mut Exchange<'_>) {
        let query = ex.req.target.split_once('?').map_or("", |(_, q)| q);
        let url = form_urlencoded::parse(query.as_bytes())
            .find(|(k, _)| k == "url")
            .map(|(_, v)| v.into_owned());
        let Some(url) = url else {
            return error(ex, 400, "give the URL: GET /cache?url=http://host/path");
        };
        let Some(key) = crate::invalidation::url_cache_key(&url) else {
            return error(
                ex,
                400,
                &format!("invalid URL {url:?}: give http://host/path?query"),
            );
        };
        let lookup = match self.store.get_latest(&key) {
            Ok(l) => l,
            Err(e) => return error(ex, 503, &e.to_string()),
        };
        if lookup.variants.is_empty() {
            return reply(
                ex,
                404,
                &json!({ "error": "nothing is stored for this URL", "url": url, "key": key.to_string() }),
            );
        }
        let now = std::time::SystemTime::now();
        let variants: Vec<Value> = lookup
            .variants
            .iter()
            .map(|e| variant_json(e, now, &self.policy))
            .collect();
        reply(
            ex,
            200,
            &json!({ "url": url, "key": key.to_string(), "store": self.store.name(), "variants": variants }),
        );
    }
}

/// One stored variant in `GET /cache`: its status, when it was stored, its age and
/// freshness, the stale windows its fields allow, validators, tags, size and the
/// request values of the fields it varies on.
fn variant_json(
    e: &crate::store::Entry,
    now: std::time::SystemTime,
    policy: &crate::policy::PolicyOptions,
) -> Value {
    use crate::http::headers::header_joined;
    let age = crate::policy::current_age(e.initial_age, e.response_time, now);
    let cc = crate::policy::CacheControl::for_cache(&e.headers, policy);
    let text = |name: &str| header_joined(&e.headers, name);
    let vary: serde_json::Map<String, Value> = e
        .vary
        .iter()
        .map(|(name, value)| (name.clone(), json!(value)))
        .collect();
    json!({
        "status": e.status,
        "stored_at": httpdate::fmt_http_date(e.response_time),
        "age_s": age.as_secs(),
        "freshness_lifetime_s": e.freshness.as_secs(),
        "fresh": e.freshness > age,
        "ttl_s": e.freshness.as_secs() as i64 - age.as_secs() as i64,
        "stale_while_revalidate_s": cc.stale_while_revalidate,
        "stale_if_error_s": cc.stale_if_error,
        "etag": text("etag"),
        "last_modified": text("last-modified"),
        "content_type": text("content-type"),
        "tags": e.tags,
        "size_bytes": e.size(),
        "body_bytes": e.file.as_ref().map_or(e.body.len() as u64, |f| f.len()),
        "vary": vary,
    })
}

/// One store server in `/health`: what Echo uses it as, what it says it is, and why it
/// is degraded (`status`: `ok`, `degraded`, or `unknown` before its first check).
fn server_json(s: &crate::store::ServerHealth) -> Value {
    let status = if !s.checked {
        "unknown"
    } else if s.degraded.is_empty() {
        "ok"
    } else {
        "degraded"
    };
    let mut o = json!({
        "server": s.server,
        "role": s.role,
        "status": status,
        "reachable": s.reachable,
        "reasons": s.degraded.iter().map(|(kind, _)| *kind).collect::<Vec<_>>(),
        "degraded": s.degraded.iter().map(|(_, text)| text.as_str()).collect::<Vec<_>>(),
    });
    let optional = [
        ("reported_role", s.reported_role.as_ref().map(|v| json!(v))),
        ("link", s.link.as_ref().map(|v| json!(v))),
        ("lag_ms", s.lag.map(|v| json!(v.as_millis() as u64))),
        ("readable", s.readable.map(|v| json!(v))),
        (
            "maxmemory_policy",
            s.maxmemory_policy.as_ref().map(|v| json!(v)),
        ),
        ("used_memory", s.used_memory.map(|v| json!(v))),
        ("maxmemory", s.maxmemory.map(|v| json!(v))),
    ];
    for (name, value) in optional {
        if let Some(value) = value {
            o[name] = value;
        }
    }
    o
}

#[cfg(test)]
mod tests {
    use super::{bearer_token, constant_time_eq};

    #[test]
    fn the_bearer_scheme_is_case_insensitive() {
        for value in ["Bearer t", "bearer t", "BEARER  t", "bEaReR t "] {
            assert_eq!(bearer_token(value.as_bytes()), Some(&b"t"[..]), "{value}");
        }
        for value in ["Basic t", "Bearer", "Bearer ", "Bearert", ""] {
            assert_eq!(bearer_token(value.as_bytes()), None, "{value}");
        }
    }

    #[test]
    fn tokens_compare_exactly() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secreT", b"secret"));
        assert!(!constant_time_eq(b"secret1", b"secret"));
        assert!(!constant_time_eq(b"secre", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
    }
}
