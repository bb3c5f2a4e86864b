//! Passthrough services and their servers: routing, balancing, health and retries.
//!
//! A request goes to the service of the `[[route]]` with the longest `path_prefix` that
//! matches it (a route naming the request's host beats one that names none), or to
//! `[origin]`. Within a service, a server is picked among the healthy ones by round
//! robin or by fewest requests in flight. A server is out of rotation while its active
//! health checks say it is down (`health_check_fails` failed probes take it out,
//! `health_check_passes` good ones put it back), or for `fail_timeout` after
//! `max_fails` consecutive connect failures or timeouts of real requests; when that
//! hold-down ends, one request tries it again (the others keep away until it answers).
//!
//! Invariants: a request is retried on another server only when its connect failed,
//! its method is idempotent and none of its body was read from the client, at most
//! `retries` times and never twice on one server. When no server can be tried the
//! answer is [`OriginError::Unavailable`] at once: dead servers are not hammered.
//! Routing never changes the cache key or what invalidation patterns see.

use std::io::{self, Read};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use log::{debug, info, warn};

use crate::config::{Balance, HealthCheckConfig, OriginConfig, RouteConfig};
use crate::metrics::Metrics;
use crate::origin::{Origin, OriginError, OriginRequest, OriginResponse};

/// Every service, and the routes to them.
pub struct Upstreams {
    default: Pool,
    /// Most specific first: longest prefix, then a named host before none.
    routes: Vec<(Route, Pool)>,
    /// Dropping it (with the `Upstreams`) ends the health-check threads.
    _stop: Sender<()>,
}

struct Route {
    path_prefix: String,
    host: Option<String>,
}

/// One service's health, for `/health`.
#[derive(Debug, Clone)]
pub struct ServiceHealth {
    pub name: String,
    pub servers: Vec<ServerHealth>,
}

#[derive(Debug, Clone)]
pub struct ServerHealth {
    pub server: String,
    pub up: bool,
    /// Why it is out, when it is.
    pub reason: Option<String>,
}

impl Upstreams {
    /// Builds every service and starts the health checks of those that have them.
    pub fn new(
        default: &OriginConfig,
        routes: &[RouteConfig],
        metrics: Option<Arc<Metrics>>,
    ) -> Result<Upstreams, String> {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let default = Pool::new(default, metrics.clone(), &stopped)?;
        let mut built = Vec::with_capacity(routes.len());
        for r in routes {
            built.push((
                Route {
                    path_prefix: normalize_path(&r.path_prefix).into_owned(),
                    host: r.host.clone(),
                },
                Pool::new(&r.origin, metrics.clone(), &stopped)?,
            ));
        }
        built.sort_by(|(a, _), (b, _)| {
            b.path_prefix
                .len()
                .cmp(&a.path_prefix.len())
                .then(b.host.is_some().cmp(&a.host.is_some()))
        });
        Ok(Upstreams {
            default,
            routes: built,
            _stop: stop,
        })
    }

    /// The service for a request to `host` (as the client gave it) and `target`.
    /// Prefixes are matched against the normalised path (see [`normalize_path`]), so
    /// `/%62ytes/` and `/x/../bytes/` take the `/bytes/` route and `/bytes/../x` does
    /// not; the target sent upstream is the client's, unchanged.
    pub fn route(&self, host: &str, target: &str) -> &Pool {
        let raw = target.split('?').next().unwrap_or(target);
        let path = normalize_path(raw);
        let host = host_without_port(host);
        self.routes
            .iter()
            .find(|(r, _)| {
                path.starts_with(r.path_prefix.as_str())
                    && r.host
                        .as_deref()
                        .is_none_or(|h| h.eq_ignore_ascii_case(host))
            })
            .map_or(&self.default, |(_, pool)| pool)
    }

    /// Sends `req` to a server of its route's service.
    pub fn send(&self, req: OriginRequest<'_>) -> Result<OriginResponse, OriginError> {
        self.route(req.host, req.target).send(req)
    }

    /// Every service's servers and whether they are in rotation.
    pub fn health(&self) -> Vec<ServiceHealth> {
        std::iter::once(&self.default)
            .chain(self.routes.iter().map(|(_, p)| p))
            .map(Pool::health)
            .collect()
    }
}

/// A path as routing compares it (RFC 3986 §6.2.2): percent-escapes of unreserved
/// characters decoded (`%62` is `b`), other escapes' hex upper-cased, then dot-segments
/// removed (§5.2.4). An origin that decodes or resolves paths itself would otherwise be
/// reached, through another route's service, at a path that route was meant to own.
pub fn normalize_path(path: &str) -> std::borrow::Cow<'_, str> {
    if !path.starts_with('/') || !path.contains(['%', '.']) {
        return std::borrow::Cow::Borrowed(path);
    }
    let bytes = path.as_bytes();
    let mut decoded: Vec<u8> = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                let c = (h * 16 + l) as u8;
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    decoded.push(c);
                } else {
                    decoded.push(b'%');
                    decoded.push(bytes[i + 1].to_ascii_uppercase());
                    decoded.push(bytes[i + 2].to_ascii_uppercase());
                }
                i += 3;
                continue;
            }
        }
        decoded.push(bytes[i]);
        i += 1;
    }
    // Only ASCII was replaced, by ASCII: still the UTF-8 it was.
    let decoded = String::from_utf8_lossy(&decoded);
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, segment) in segments.iter().enumerate() {
        match *segment {
            "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
        // A path ending in a dot-segment names a directory: it keeps its final `/`.
        if i == last && matches!(*segment, "." | "..") {
            out.push("");
        }
    }
    std::borrow::Cow::Owned(format!("/{}", out.join("/")))
}

/// `example.com:8080` → `example.com`; `[::1]:80` → `[::1]`.
fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |i| &host[..=i]);
    }
    host.split(':').next().unwrap_or(host)
}

/// One service: its servers and how they are chosen.
pub struct Pool {
    name: String,
    servers: Vec<Arc<Server>>,
    balance: Balance,
    retries: usize,
    preserve_host: bool,
    next: AtomicUsize,
    metrics: Option<Arc<Metrics>>,
}

impl Pool {
    fn new(
        cfg: &OriginConfig,
        metrics: Option<Arc<Metrics>>,
        stopped: &Receiver<()>,
    ) -> Result<Pool, String> {
        let roots = match &cfg.ca_file {
            None => None,
            Some(path) => Some(read_roots(path).map_err(|e| format!("{}.ca_file: {e}", cfg.name))?),
        };
        let servers: Vec<Arc<Server>> = cfg
            .servers
            .iter()
            .map(|addr| {
                Arc::new(Server {
                    origin: Origin::new(addr, cfg, roots.as_ref()),
                    outstanding: AtomicUsize::new(0),
                    state: Mutex::new(State::default()),
                    max_fails: cfg.max_fails,
                    fail_timeout: cfg.fail_timeout,
                    metrics: metrics.clone(),
                })
            })
            .collect();
        for server in &servers {
            server.publish(true);
            if let Some(m) = &metrics {
                for kind in ["connect", "timeout", "protocol"] {
                    let _ = m.origin_errors.get_or_create(&vec![
                        ("server", server.origin.name.to_string()),
                        ("kind", kind.to_string()),
                    ]);
                }
            }
            if let Some(check) = &cfg.health_check {
                let server = Arc::clone(server);
                let check = check.clone();
                let stopped = stopped.clone();
                thread::Builder::new()
                    .name(format!("echo-health-{}", cfg.name))
                    .spawn(move || health_checks(&server, &check, &stopped))
                    .map_err(|e| format!("cannot start a health-check thread: {e}"))?;
            }
        }
        Ok(Pool {
            name: cfg.name.clone(),
            servers,
            balance: cfg.balance,
            retries: cfg.retries,
            preserve_host: cfg.preserve_host,
            next: AtomicUsize::new(0),
            metrics,
        })
    }

    /// Sends `req` to a healthy server, and on a failed connect of an idempotent
    /// request whose body is untouched, to another, up to `retries` more.
    pub fn send(&self, req: OriginRequest<'_>) -> Result<OriginResponse, OriginError> {
        // RFC 9110 §9.2.2: these may be repeated without changing the outcome.
        let idempotent = matches!(
            req.method,
            "GET" | "HEAD" | "OPTIONS" | "TRACE" | "PUT" | "DELETE"
        );
        let OriginRequest {
            method,
            target,
            host,
            headers,
            mut body,
        } = req;
        let mut tried: Vec<usize> = Vec::new();
        let mut body_read = false;
        let mut last_error = None;
        loop {
            let Some(i) = self.pick(&tried) else {
                // No other server to try: the error of the last one tried, if any.
                return Err(last_error.unwrap_or_else(|| {
                    self.count_error(&self.name, "unavailable");
                    OriginError::Unavailable(format!(
                        "every server of {} is out of rotation",
                        self.name
                    ))
                }));
            };
            tried.push(i);
            let server = &self.servers[i];
            let host_field = if self.preserve_host && !host.is_empty() {
                host
            } else {
                server.origin.authority.as_str()
            };
            server.outstanding.fetch_add(1, Ordering::Relaxed);
            let started = Instant::now();
            let result = {
                let mut watched;
                let attempt_body = match &mut body {
                    Some((reader, length)) => {
                        watched = Watched {
                            inner: &mut **reader,
                            read: &mut body_read,
                        };
                        Some((&mut watched as &mut dyn Read, *length))
                    }
                    None => None,
                };
                server.origin.send(
                    OriginRequest {
                        method,
                        target,
                        host,
                        headers,
                        body: attempt_body,
                    },
                    host_field,
                )
            };
            match result {
                Ok(mut response) => {
                    if let Some(m) = &self.metrics {
                        m.origin_duration
                            .get_or_create(&vec![("server", server.origin.name.to_string())])
                            .observe(started.elapsed().as_secs_f64());
                    }
                    server.succeeded();
                    // In flight until its body is read or dropped.
                    response.body = Box::new(InFlight {
                        body: response.body,
                        server: Arc::clone(server),
                    });
                    return Ok(response);
                }
                Err(e) => {
                    server.outstanding.fetch_sub(1, Ordering::Relaxed);
                    if !matches!(e, OriginError::ClientBody(_)) {
                        self.count_error(&server.origin.name, e.kind());
                    }
                    if matches!(e, OriginError::Connect(_) | OriginError::Timeout(_)) {
                        server.failed(&e);
                    }
                    let connect_failed =
                        matches!(e, OriginError::Connect(_) | OriginError::Timeout("connect"));
                    if !(connect_failed && idempotent && !body_read && tried.len() <= self.retries)
                    {
                        return Err(e);
                    }
                    debug!(
                        "{method} {target}: {} failed ({e}); trying another server",
                        server.origin.name
                    );
                    last_error = Some(e);
                }
            }
        }
    }

    /// `echo_origin_errors_total{server, kind}`.
    fn count_error(&self, server: &str, kind: &'static str) {
        if let Some(m) = &self.metrics {
            m.origin_errors
                .get_or_create(&vec![
                    ("server", server.to_string()),
                    ("kind", kind.to_string()),
                ])
                .inc();
        }
    }

    /// The next server to try, skipping `tried`; `None` when none is in rotation.
    fn pick(&self, tried: &[usize]) -> Option<usize> {
        let n = self.servers.len();
        let start = self.next.fetch_add(1, Ordering::Relaxed);
        let order = (0..n)
            .map(|k| (start + k) % n)
            .filter(|i| !tried.contains(i));
        let now = Instant::now();
        match self.balance {
            Balance::RoundRobin => order.into_iter().find(|&i| self.servers[i].claim(now)),
            Balance::LeastOutstanding => {
                let mut candidates: Vec<usize> =
                    order.filter(|&i| self.servers[i].available(now)).collect();
                // Stable: among equals, the rotation order decides.
                candidates.sort_by_key(|&i| self.servers[i].outstanding.load(Ordering::Relaxed));
                candidates.into_iter().find(|&i| self.servers[i].claim(now))
            }
        }
    }

    fn health(&self) -> ServiceHealth {
        let now = Instant::now();
        ServiceHealth {
            name: self.name.clone(),
            servers: self
                .servers
                .iter()
                .map(|s| {
                    let state = s.lock();
                    let reason = if !state.probed_up {
                        Some(format!(
                            "failed health checks: {}",
                            state.last_error.as_deref().unwrap_or("?")
                        ))
                    } else if state.held_until.is_some_and(|t| now < t) {
                        Some(format!(
                            "failed requests: {}",
                            state.last_error.as_deref().unwrap_or("?")
                        ))
                    } else {
                        None
                    };
                    ServerHealth {
                        server: s.origin.name.to_string(),
                        up: reason.is_none(),
                        reason,
                    }
                })
                .collect(),
        }
    }
}

/// PEM certificates to trust instead of the system's.
fn read_roots(path: &std::path::Path) -> Result<ureq::tls::RootCerts, String> {
    let pem = std::fs::read(path).map_err(|e| format!("cannot read {}: {e}", path.display()))?;
    let mut certs = Vec::new();
    for item in ureq::tls::parse_pem(&pem) {
        match item {
            Ok(ureq::tls::PemItem::Certificate(c)) => certs.push(c),
            Ok(_) => {}
            Err(e) => return Err(format!("{}: {e}", path.display())),
        }
    }
    if certs.is_empty() {
        return Err(format!("{} holds no certificate", path.display()));
    }
    Ok(ureq::tls::RootCerts::new_with_certs(&certs))
}

/// One server and what Echo knows of its health.
struct Server {
    origin: Origin,
    /// Requests sent and not yet finished (least-outstanding balancing).
    outstanding: AtomicUsize,
    state: Mutex<State>,
    max_fails: u32,
    fail_timeout: std::time::Duration,
    metrics: Option<Arc<Metrics>>,
}

#[derive(Debug)]
struct State {
    /// The active health checks' verdict (always true without them).
    probed_up: bool,
    probe_fails: u32,
    probe_passes: u32,
    /// Consecutive failed requests.
    fails: u32,
    /// Out of rotation until then after `max_fails` failed requests; when it has
    /// passed, the request that claims the server moves it on by `fail_timeout`, so
    /// one request at a time tries a server that was failing.
    held_until: Option<Instant>,
    last_error: Option<String>,
}

impl Default for State {
    fn default() -> Self {
        State {
            probed_up: true,
            probe_fails: 0,
            probe_passes: 0,
            fails: 0,
            held_until: None,
            last_error: None,
        }
    }
}

impl Server {
    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        // The state stays consistent whatever a panicking holder did: every update is
        // a plain assignment.
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn available(&self, now: Instant) -> bool {
        let state = self.lock();
        state.probed_up && state.held_until.is_none_or(|t| now >= t)
    }

    /// Takes the server for one request if it is in rotation. A server whose
    /// hold-down has just ended is taken by this request alone, as a trial.
    fn claim(&self, now: Instant) -> bool {
        let mut state = self.lock();
        if !state.probed_up {
            return false;
        }
        match state.held_until {
            None => true,
            Some(t) if now < t => false,
            Some(_) => {
                state.held_until = Some(now + self.fail_timeout);
                debug!("{}: trying it again after its hold-down", self.origin.name);
                true
            }
        }
    }

    fn succeeded(&self) {
        let mut state = self.lock();
        state.fails = 0;
        if state.held_until.take().is_some() {
            info!(
                "origin server {} is back in rotation (a request succeeded)",
                self.origin.name
            );
            drop(state);
            self.publish(true);
        }
    }

    fn failed(&self, e: &OriginError) {
        let mut state = self.lock();
        state.fails = state.fails.saturating_add(1);
        state.last_error = Some(e.to_string());
        if self.max_fails == 0 || state.fails < self.max_fails {
            return;
        }
        let was_held = state.held_until.is_some();
        state.held_until = Some(Instant::now() + self.fail_timeout);
        drop(state);
        if !was_held {
            warn!(
                "origin server {} out of rotation for {} ms after {} failed request(s): {e}",
                self.origin.name,
                self.fail_timeout.as_millis(),
                self.max_fails
            );
            self.publish(false);
        }
    }

    /// Records a probe's result and moves the server in or out of rotation.
    fn probed(&self, result: Result<u16, String>, check: &HealthCheckConfig) {
        let mut state = self.lock();
        match result {
            Ok(_) => {
                state.probe_fails = 0;
                state.probe_passes = state.probe_passes.saturating_add(1);
                let back_from_probes = !state.probed_up && state.probe_passes >= check.passes;
                // A passing probe also ends a hold-down from failed requests.
                let back_from_hold = state.probed_up && state.held_until.is_some();
                if back_from_probes || back_from_hold {
                    state.probed_up = true;
                    state.held_until = None;
                    state.fails = 0;
                    drop(state);
                    info!(
                        "origin server {} is back in rotation (health check {} passed)",
                        self.origin.name, check.path
                    );
                    self.publish(true);
                }
            }
            Err(why) => {
                state.probe_passes = 0;
                state.probe_fails = state.probe_fails.saturating_add(1);
                state.last_error = Some(format!("GET {}: {why}", check.path));
                if state.probed_up && state.probe_fails >= check.fails {
                    state.probed_up = false;
                    drop(state);
                    warn!(
                        "origin server {} out of rotation: {} failed health check(s) of {} ({why})",
                        self.origin.name, check.fails, check.path
                    );
                    self.publish(false);
                }
            }
        }
    }

    /// `echo_origin_server_up{server}`.
    fn publish(&self, up: bool) {
        if let Some(m) = &self.metrics {
            m.origin_server_up
                .get_or_create(&vec![("server", self.origin.name.to_string())])
                .set(i64::from(up));
        }
    }
}

/// Probes `server` every `check.interval` (the first at once) until `stopped` closes.
fn health_checks(server: &Server, check: &HealthCheckConfig, stopped: &Receiver<()>) {
    loop {
        let result = server.origin.probe(&check.path, check.timeout);
        if let Err(why) = &result {
            debug!("health check of {} failed: {why}", server.origin.name);
        }
        server.probed(result, check);
        match stopped.recv_timeout(check.interval) {
            Err(RecvTimeoutError::Timeout) => {}
            _ => return,
        }
    }
}

/// Notes whether any of the client's body was read (then the request cannot be
/// retried: those bytes are gone).
struct Watched<'a, 'b> {
    inner: &'a mut dyn Read,
    read: &'b mut bool,
}

impl Read for Watched<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        *self.read = true;
        self.inner.read(buf)
    }
}

/// An origin body that counts as in flight on its server until it is dropped.
struct InFlight {
    body: Box<dyn Read + Send>,
    server: Arc<Server>,
}

impl Read for InFlight {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.body.read(buf)
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.server.outstanding.fetch_sub(1, Ordering::Relaxed);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalised_for_routing() {
        let cases = [
            ("/bytes/1", "/bytes/1"),
            ("/%62ytes/1", "/bytes/1"),
            ("/%7Euser/%2e%2E/x", "/x"),
            ("/bytes/../x", "/x"),
            ("/bytes/./2", "/bytes/2"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/../../a", "/a"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%2F..%2Fb", "/a%2F..%2Fb"),
            ("/%zz/%4", "/%zz/%4"),
            ("/caf\u{e9}", "/caf\u{e9}"),
            ("*", "*"),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize_path(raw), want, "{raw}");
        }
    }

    #[test]
    fn ports_are_not_part_of_the_routed_host() {
        assert_eq!(host_without_port("example.com:8080"), "example.com");
        assert_eq!(host_without_port("example.com"), "example.com");
        assert_eq!(host_without_port("[::1]:80"), "[::1]");
    }
}
