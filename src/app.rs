//! Echo as a running program: the listeners, store, origin services, cache, admin API
//! and invalidation thread built from a validated config and wired together
//! ([`start`]); a reload (SIGHUP) that applies what can change live; and a drain.
//!
//! Invariants: everything that can fail is built before anything is swapped in (a
//! failed start or reload changes nothing); every component gets its settings from the
//! config, none re-derives a default; a start error names what failed and, for a
//! listener, the key it came from.

use std::fmt;
use std::io;
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::{self, Config, StoreKind};
use crate::server::{self, ServerHandle};
use crate::store::memory::MemoryStore;
use crate::store::{self, Store, StoreError};
use crate::{access_log, admin, cache, invalidator, live, metrics, upstream};

/// Why Echo could not start (or a reload could not be applied).
#[derive(Debug)]
pub enum StartError {
    /// A listener could not be bound: its address and the key it came from.
    Bind {
        addr: String,
        key: &'static str,
        source: io::Error,
    },
    /// The store could not be set up (a bad Redis URL).
    Store(StoreError),
    /// The origin services could not be set up (a CA file, a health-check thread).
    Upstreams(String),
    /// The access log could not be opened.
    AccessLog { path: PathBuf, source: io::Error },
    /// A thread could not be started.
    Thread(io::Error),
    /// The config lacks what validation should have required (a bug, not the file's).
    Config(&'static str),
}

impl fmt::Display for StartError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            StartError::Bind { addr, key, source } => {
                write!(f, "cannot listen on {addr} ({key}): {source}")
            }
            StartError::Store(e) => write!(f, "{e}"),
            StartError::Upstreams(why) => f.write_str(why),
            StartError::AccessLog { path, source } => {
                write!(f, "log.access_log {}: {source}", path.display())
            }
            StartError::Thread(e) => write!(f, "cannot start a thread: {e}"),
            StartError::Config(what) => write!(f, "{what} missing"),
        }
    }
}

impl std::error::Error for StartError {}

impl From<io::Error> for StartError {
    /// Spawning threads is the only other I/O a start does.
    fn from(e: io::Error) -> StartError {
        StartError::Thread(e)
    }
}

/// Opens the access log at `path`.
fn open_access_log(
    path: &std::path::Path,
    format: access_log::AccessFormat,
    metrics: &Arc<metrics::Metrics>,
) -> Result<access_log::AccessLog, StartError> {
    access_log::AccessLog::open(path, format, Some(Arc::clone(metrics))).map_err(|source| {
        StartError::AccessLog {
            path: path.to_path_buf(),
            source,
        }
    })
}

/// A running Echo: the proxy listener (and what it needs to stay up), and what a
/// reload or a drain acts on.
pub struct Echo {
    pub proxy: ServerHandle,
    pub admin: Option<ServerHandle>,
    handler: Arc<cache::Cache>,
    admin_handler: Option<Arc<admin::Admin>>,
    upstreams: Arc<live::Live<upstream::Upstreams>>,
    metrics: Arc<metrics::Metrics>,
    draining: Arc<std::sync::atomic::AtomicBool>,
    /// The config running now: what a reload compares against.
    running: Config,
}

/// What a reload did.
#[derive(Debug, Default)]
pub struct Reloaded {
    /// Settings now in effect (`origin`, `route`, `admin.token`, `log.level`, ...).
    pub applied: Vec<String>,
    /// Changed settings that only a restart applies; they keep their running value.
    pub need_restart: Vec<String>,
}

impl Echo {
    /// Graceful stop of every listener: see `ServerHandle::drain`. True if every
    /// connection finished within `timeout`. `/ready` fails from the start; for `grace`
    /// Echo still accepts and serves as before (a balancer polling `/ready` stops
    /// sending new clients meanwhile), then stops accepting and drains; the admin
    /// listener stops last.
    pub fn drain(&mut self, grace: Duration, timeout: Duration) -> bool {
        self.draining
            .store(true, std::sync::atomic::Ordering::SeqCst);
        if !grace.is_zero() {
            log::info!(
                "draining: /ready fails; still serving for {} ms",
                grace.as_millis()
            );
            std::thread::sleep(grace);
        }
        let mut clean = self.proxy.drain(timeout);
        if let Some(log) = self.handler.access_log().as_ref() {
            log.flush(Duration::from_secs(2));
        }
        if let Some(admin) = self.admin.as_mut() {
            clean &= admin.drain(Duration::from_secs(1));
        }
        clean
    }

    /// Reopens the access log at its path (SIGHUP, after logrotate moved the file).
    pub fn reopen_logs(&self) {
        if let Some(log) = self.handler.access_log().as_ref() {
            log.reopen();
        }
    }

    /// Waits until the access log lines so far are written (tests, drain).
    pub fn flush_logs(&self, timeout: Duration) -> bool {
        match self.handler.access_log().as_ref() {
            Some(log) => log.flush(timeout),
            None => true,
        }
    }

    /// Applies a new, already validated config to the running Echo (SIGHUP). Live:
    /// `[origin]` and `[[route]]` (new servers, health checks, timeouts: requests in
    /// flight finish on the old ones), `admin.token`, `log.level` and
    /// `log.access_log`. Anything else that changed is listed in `need_restart` and
    /// keeps its running value. On an error nothing has changed.
    pub fn reload(&mut self, new: &Config) -> Result<Reloaded, StartError> {
        let old = &self.running;
        let mut done = Reloaded::default();
        // What changed is what the file says differently: a value derived from another
        // key (an origin's pool size from server.workers) is not a change of its own.
        let changed = old.source.changed_keys(&new.source);
        let touches = |section: &str| {
            changed.iter().any(|k| {
                k == section
                    || k.strip_prefix(section)
                        .is_some_and(|rest| rest.starts_with('.') || rest.starts_with('['))
            })
        };
        // Build everything that can fail first, then swap.
        let upstreams_changed = touches("origin") || touches("route");
        let upstreams = if upstreams_changed {
            Some(
                upstream::Upstreams::new(
                    &new.origin,
                    &new.routes,
                    Some(Arc::clone(&self.metrics)),
                    Some(&self.upstreams.get()),
                )
                .map_err(StartError::Upstreams)?,
            )
        } else {
            None
        };
        let access_log = if old.log.access_log != new.log.access_log
            || old.log.access_format != new.log.access_format
        {
            Some(match &new.log.access_log {
                Some(path) => Some(open_access_log(path, new.log.access_format, &self.metrics)?),
                None => None,
            })
        } else {
            None
        };
        if let Some(u) = upstreams {
            self.upstreams.set(Arc::new(u));
            // Servers no longer configured leave the metrics (their old series would
            // report a state nobody updates).
            let servers = |c: &Config| -> Vec<String> {
                std::iter::once(&c.origin)
                    .chain(c.routes.iter().map(|r| &r.origin))
                    .flat_map(|o| o.servers.iter().map(|s| s.base_url()))
                    .collect()
            };
            let kept = servers(new);
            for gone in servers(old).into_iter().filter(|s| !kept.contains(s)) {
                for kind in ["connect", "timeout", "protocol"] {
                    self.metrics
                        .origin_errors
                        .remove(&vec![("server", gone.clone()), ("kind", kind.to_string())]);
                }
                let labels = vec![("server", gone)];
                self.metrics.origin_server_up.remove(&labels);
                self.metrics.origin_duration.remove(&labels);
            }
            done.applied.push("origin and routes".into());
        }
        if let Some(log) = access_log {
            self.handler.set_access_log(log);
            done.applied.push("log.access_log".into());
        }
        if old.log.level != new.log.level || old.log.dependencies != new.log.dependencies {
            crate::logging::set_levels(new.log.level, new.log.dependencies);
            if old.log.level != new.log.level {
                done.applied.push("log.level".into());
            }
            if old.log.dependencies != new.log.dependencies {
                done.applied.push("log.dependencies".into());
            }
        }
        // The admin tokens (a token file's new content included), live when there is an
        // admin listener to give them to.
        let tokens = |c: &Config| {
            c.admin
                .as_ref()
                .map(|a| (a.token.clone(), a.metrics_token.clone()))
        };
        let (old_tokens, new_tokens) = (tokens(old), tokens(new));
        if old_tokens != new_tokens {
            match (&self.admin_handler, new_tokens) {
                (Some(admin), Some((token, metrics_token))) => {
                    let (old_token, old_metrics) = old_tokens.unzip();
                    if old_token.as_ref() != Some(&token) {
                        done.applied.push("admin.token".into());
                    }
                    if old_metrics.as_ref() != Some(&metrics_token) {
                        done.applied.push("admin.metrics_token".into());
                    }
                    admin.set_token(token);
                    admin.set_metrics_token(metrics_token);
                }
                _ => done.need_restart.push("admin".into()),
            }
        }
        // Every other key that changed needs a restart, and is named.
        const LIVE: [&str; 7] = [
            "log.level",
            "log.dependencies",
            "log.access_log",
            "log.access_format",
            "admin.token",
            "admin.token_file",
            "admin.metrics_token",
        ];
        for key in &changed {
            let live = LIVE.contains(&key.as_str())
                || key == "origin"
                || key.starts_with("origin.")
                || key.starts_with("route");
            if !live && !done.need_restart.contains(key) {
                done.need_restart.push(key.clone());
            }
        }
        // What a restart would change stays as it runs, so the next reload compares
        // against the truth.
        let mut running = self.running.clone();
        if upstreams_changed {
            running.origin = new.origin.clone();
            running.routes = new.routes.clone();
        }
        running.source = new.source.clone();
        running.log.level = new.log.level;
        running.log.dependencies = new.log.dependencies;
        running.log.access_log = new.log.access_log.clone();
        running.log.access_format = new.log.access_format;
        if let (Some(r), Some(n)) = (running.admin.as_mut(), new.admin.as_ref()) {
            r.token = n.token.clone();
            r.metrics_token = n.metrics_token.clone();
        }
        self.running = running;
        Ok(done)
    }
}

/// Starts Echo from a validated config: binds its listeners and starts serving.
pub fn start(cfg: &Config) -> Result<Echo, StartError> {
    let listeners = cfg
        .server
        .listen
        .iter()
        .map(|addr| bind_listen(addr, cfg.server.unix_socket_mode))
        .collect::<Result<Vec<_>, _>>()?;
    let admin = match &cfg.admin {
        Some(a) => Some(bind(a.listen, "admin.listen")?),
        None => None,
    };
    start_on(cfg, listeners, admin)
}

/// Says at start which store is in use and, for Redis, whether it answered: once the
/// store's monitor has looked at every server (twice a second; a thread waits up to 3 s
/// for that, so the start is not held up). A store that does not answer yet is not an
/// error: misses go to the origin meanwhile.
fn log_store(cfg: &Config, store: &Arc<dyn Store>) {
    match cfg.cache.store {
        StoreKind::Memory => {
            log::info!("store: memory, up to {} bytes", cfg.cache.memory_max_bytes)
        }
        StoreKind::Redis => {
            let store = Arc::clone(store);
            let spawned = std::thread::Builder::new()
                .name("echo-store-log".into())
                .spawn(move || {
                    let deadline = Instant::now() + Duration::from_secs(3);
                    let mut servers = store.servers();
                    // The monitor publishes its servers after its first look.
                    while (servers.is_empty() || servers.iter().any(|s| !s.checked))
                        && Instant::now() < deadline
                    {
                        std::thread::sleep(Duration::from_millis(100));
                        servers = store.servers();
                    }
                    let named = |ok: bool| -> Vec<String> {
                        servers
                            .iter()
                            .filter(|s| s.checked && s.reachable == ok)
                            .map(|s| format!("{} ({})", s.server, s.role))
                            .collect()
                    };
                    let (up, down) = (named(true), named(false));
                    if down.is_empty() && !up.is_empty() {
                        log::info!("store: redis, {} answered", up.join(", "));
                    } else {
                        log::warn!(
                            "store: redis, answered: [{}], not answering: [{}]; misses go to \
                             the origin until the master answers",
                            up.join(", "),
                            down.join(", ")
                        );
                    }
                });
            if let Err(e) = spawned {
                log::warn!("store: redis (cannot report whether it answered: {e})");
            }
        }
    }
    match &cfg.admin {
        Some(a) => log::info!("admin API on {}", a.listen),
        None => log::info!(
            "admin API off (no [admin] section): no /health, /ready, /metrics or \
             invalidation"
        ),
    }
}

/// The admin listener's front end: the same machinery as the proxy's, with few threads
/// and limits of its own (its clients are operators' tools, not the proxy's clients: a
/// proxy limit such as `server.max_body_bytes = 10` must not break `POST /invalidate`).
fn admin_server_config(proxy: &config::ServerConfig) -> config::ServerConfig {
    config::ServerConfig {
        listen: Vec::new(),
        io_threads: 1,
        workers: 2,
        fetch_workers: 1,
        fetch_queue: 16,
        max_connections: 256,
        queue_depth: 64,
        // Above the admin API's own 64 KiB, which it answers in JSON (413, "larger than").
        max_body_bytes: 16 * admin::MAX_BODY,
        // Its own listener: clients connect to it directly.
        proxy_protocol: false,
        trusted_proxies: Vec::new(),
        drain_timeout: proxy.drain_timeout,
        drain_grace: Duration::ZERO,
        // Head limits, deadlines and rates: the defaults.
        ..config::ServerConfig::default()
    }
}

/// Descriptors kept for everything but client connections: an origin or Redis
/// connection per worker thread, plus logs, listeners, pools' idle connections and the
/// acceptor's spare. (The memory store's body files take at most a sixteenth of the
/// limit: see `body_file::set_budget`.)
fn reserved_fds(cfg: &config::ServerConfig) -> u64 {
    64 + (cfg.workers + cfg.fetch_workers) as u64
}

/// How many client connections the open-files limit allows (each takes one descriptor:
/// its socket). Raises the soft limit as far
/// as the hard one allows first; if that is still short of `server.max_connections`,
/// serves fewer (and says so) rather than hang new clients when descriptors run out.
fn connections_within_fd_limit(cfg: &config::ServerConfig) -> usize {
    let wanted = cfg.max_connections as u64 + reserved_fds(cfg);
    let limit = match rlimit::increase_nofile_limit(wanted) {
        Ok(limit) => limit,
        Err(e) => {
            log::warn!("cannot read the open-files limit: {e}");
            return cfg.max_connections;
        }
    };
    crate::body_file::set_budget(usize::try_from(limit / 16).unwrap_or(usize::MAX));
    if limit >= wanted {
        return cfg.max_connections;
    }
    let fits = limit.saturating_sub(reserved_fds(cfg)).max(1) as usize;
    log::warn!(
        "the open-files limit ({limit}) allows {fits} client connections, not server.max_connections = {}; serving {fits} (raise the limit, e.g. LimitNOFILE in the systemd unit)",
        cfg.max_connections
    );
    fits
}

/// Binds a listener; the error names the address and the config key it came from.
fn bind(addr: SocketAddr, key: &'static str) -> Result<TcpListener, StartError> {
    TcpListener::bind(addr).map_err(|source| StartError::Bind {
        addr: addr.to_string(),
        key,
        source,
    })
}

/// Binds one of `server.listen`. A Unix socket's path may hold the socket of an Echo
/// that did not stop cleanly: a socket there is replaced, anything else is an error.
/// The new socket gets `mode`.
fn bind_listen(addr: &config::ListenAddr, mode: u32) -> Result<server::Listener, StartError> {
    use std::os::unix::fs::{FileTypeExt, PermissionsExt};
    let path = match addr {
        config::ListenAddr::Tcp(addr) => return bind(*addr, "server.listen").map(Into::into),
        config::ListenAddr::Unix(path) => path,
    };
    let failed = |source: io::Error| StartError::Bind {
        addr: addr.to_string(),
        key: "server.listen",
        source,
    };
    match std::fs::symlink_metadata(path) {
        Ok(meta) if meta.file_type().is_socket() => std::fs::remove_file(path).map_err(failed)?,
        Ok(_) => {
            return Err(failed(io::Error::new(
                io::ErrorKind::AlreadyExists,
                "a file that is not a socket is in the way",
            )))
        }
        Err(_) => {}
    }
    let listener = std::os::unix::net::UnixListener::bind(path).map_err(failed)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).map_err(failed)?;
    Ok(server::Listener::Unix(listener, path.clone()))
}

/// Starts Echo on already bound listeners (tests bind port 0 first): the proxy's (at
/// least one) and the admin API's.
pub fn start_on(
    cfg: &Config,
    listeners: Vec<server::Listener>,
    admin: Option<TcpListener>,
) -> Result<Echo, StartError> {
    let mut server_cfg = cfg.server.clone();
    server_cfg.max_connections = connections_within_fd_limit(&server_cfg);
    let store: Arc<dyn Store> = match cfg.cache.store {
        StoreKind::Memory => Arc::new(MemoryStore::new(
            cfg.cache.memory_max_bytes,
            cfg.cache.max_variants,
            cfg.invalidation.ban_ttl,
        )),
        StoreKind::Redis => {
            let redis = cfg.redis.as_ref().ok_or(StartError::Config("[redis]"))?;
            Arc::new(
                store::redis::RedisStore::new(
                    redis,
                    cfg.cache.max_variants,
                    cfg.invalidation.ban_ttl,
                    crate::policy::PolicyOptions::from_config(&cfg.cache),
                )
                .map_err(StartError::Store)?,
            )
        }
    };
    log_store(cfg, &store);
    let metrics = metrics::Metrics::new();
    let store: Arc<dyn Store> = Arc::new(store::Instrumented::new(store, Arc::clone(&metrics)));
    {
        let store = Arc::clone(&store);
        // Evictions already counted (the store keeps a running total).
        let evictions_seen = std::sync::Mutex::new(0u64);
        metrics.add_sampler(move |m| {
            let name = store.name();
            let label = |store: &str| vec![("store", store.to_string())];
            if let Some((bytes, objects)) = store.usage() {
                m.stored_bytes.set(bytes as i64);
                m.stored_objects.set(objects as i64);
                m.store_bytes.get_or_create(&label(name)).set(bytes as i64);
                m.store_entries
                    .get_or_create(&label(name))
                    .set(objects as i64);
            }
            if let Some(total) = store.evictions() {
                let mut seen = evictions_seen.lock().unwrap_or_else(|e| e.into_inner());
                if total > *seen {
                    m.store_evictions
                        .get_or_create(&label(name))
                        .inc_by(total - *seen);
                    *seen = total;
                }
            }
            if let Some(tier) = store.local_tier() {
                let bytes = i64::try_from(tier.bytes).unwrap_or(i64::MAX);
                let entries = i64::try_from(tier.entries).unwrap_or(i64::MAX);
                m.store_bytes
                    .get_or_create(&label("redis_local"))
                    .set(bytes);
                m.store_entries
                    .get_or_create(&label("redis_local"))
                    .set(entries);
            }
            let servers = store.servers();
            if !servers.is_empty() {
                m.redis.set(&servers);
            }
            if let Some(tier) = store.local_tier() {
                m.redis.set_local(&tier);
            }
        });
    }
    let upstreams = Arc::new(live::Live::new(Arc::new(
        upstream::Upstreams::new(&cfg.origin, &cfg.routes, Some(Arc::clone(&metrics)), None)
            .map_err(StartError::Upstreams)?,
    )));
    let access_log = match &cfg.log.access_log {
        Some(path) => Some(open_access_log(path, cfg.log.access_format, &metrics)?),
        None => None,
    };
    let proxy = Arc::new(cache::Cache::new(
        cfg,
        Arc::clone(&store),
        Arc::clone(&upstreams),
        Arc::clone(&metrics),
    ));
    proxy.set_access_log(access_log);
    proxy.start_background(cfg.cache.background_workers, cfg.cache.background_queue)?;
    let invalidator = Arc::new(invalidator::Invalidator::start(
        Arc::clone(&store),
        Arc::clone(&proxy) as Arc<dyn invalidator::Refresher>,
        cfg.invalidation.queue_depth,
        cfg.invalidation.job_timeout,
        Arc::clone(&metrics),
    )?);
    let handler = Arc::clone(&proxy);
    let proxy_server = server::start("echo", listeners, server_cfg.clone(), handler)?;
    {
        let stats = proxy_server.stats();
        metrics.add_sampler(move |m| {
            m.connections_open.set(stats.open_connections() as i64);
            let (workers, fetch) = stats.queued();
            m.queue_depth
                .get_or_create(&vec![("pool", "workers".to_string())])
                .set(workers as i64);
            m.queue_depth
                .get_or_create(&vec![("pool", "fetch".to_string())])
                .set(fetch as i64);
        });
    }
    let draining = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let (admin, admin_handler) = match (admin, &cfg.admin) {
        (Some(listener), Some(a)) => {
            let admin_cfg = admin_server_config(&server_cfg);
            let handler = Arc::new(admin::Admin::new(admin::AdminParts {
                token: a.token.clone(),
                metrics_token: a.metrics_token.clone(),
                invalidator: Arc::clone(&invalidator),
                wait: cfg.invalidation.wait_timeout,
                metrics: Arc::clone(&metrics),
                upstreams: Arc::clone(&upstreams),
                store: Arc::clone(&store),
                draining: Arc::clone(&draining),
                policy: crate::policy::PolicyOptions::from_config(&cfg.cache),
            }));
            (
                Some(server::start(
                    "echo-admin",
                    vec![listener.into()],
                    admin_cfg,
                    Arc::clone(&handler),
                )?),
                Some(handler),
            )
        }
        _ => (None, None),
    };
    Ok(Echo {
        proxy: proxy_server,
        admin,
        handler: proxy,
        admin_handler,
        upstreams,
        metrics,
        draining,
        running: cfg.clone(),
    })
}
