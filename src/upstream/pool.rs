//! One passthrough service: its servers, how a request picks one (round robin or
//! fewest in flight), their health (active checks, and a hold-down after failed
//! requests), and retries on another server.
//!
//! Invariants: a request is retried on another server only when its connect failed,
//! its method is idempotent and none of its body was read from the client, at most
//! `retries` times and never twice on one server. When no server can be tried the
//! answer is [`OriginError::Unavailable`] at once: dead servers are not hammered.
//! Health state changes are plain assignments under a lock a panic cannot leave half
//! done.

use std::io::{self, Read};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::Instant;

use crossbeam_channel::{Receiver, RecvTimeoutError};
use log::{debug, info, warn};

use super::error::{OriginError, Phase};
use super::origin::{Origin, OriginRequest, OriginResponse};
use super::{ServerHealth, ServiceHealth};
use crate::config::{Balance, HealthCheckConfig, OriginConfig};
use crate::metrics::Metrics;

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
    /// The service `cfg` names. `known`: what Echo knew of servers before a reload
    /// (a server that stays keeps its health: one failing its checks stays out).
    pub(super) fn new(
        cfg: &OriginConfig,
        metrics: Option<Arc<Metrics>>,
        stopped: &Receiver<()>,
        known: &dyn Fn(&str) -> Option<State>,
    ) -> Result<Pool, String> {
        let roots = match &cfg.ca_file {
            None => None,
            Some(path) => Some(read_roots(path).map_err(|e| format!("{}.ca_file: {e}", cfg.name))?),
        };
        let servers: Vec<Arc<Server>> = cfg
            .servers
            .iter()
            .map(|addr| {
                let origin = Origin::new(addr, cfg, roots.as_ref());
                let state = known(&origin.name).unwrap_or_default();
                Arc::new(Server {
                    origin,
                    outstanding: AtomicUsize::new(0),
                    state: Mutex::new(state),
                    max_fails: cfg.max_fails,
                    fail_timeout: cfg.fail_timeout,
                    metrics: metrics.clone(),
                })
            })
            .collect();
        for server in &servers {
            let up = server.available(Instant::now());
            server.publish(up);
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
                    let connect_failed = matches!(
                        e,
                        OriginError::Connect(_) | OriginError::Timeout(Phase::Connect)
                    );
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

    /// What is known of the server named `name` (`scheme://authority`), if it is one
    /// of this service's.
    pub(super) fn state_of(&self, name: &str) -> Option<State> {
        self.servers
            .iter()
            .find(|s| &*s.origin.name == name)
            .map(|s| s.lock().clone())
    }

    pub(super) fn health(&self) -> ServiceHealth {
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

#[derive(Debug, Clone)]
pub(super) struct State {
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
