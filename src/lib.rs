//! Echo: an HTTP/1.1 reverse proxy cache.
//!
//! The library holds everything; `echod` (src/main.rs) only parses argv, sets up
//! logging and calls [`run`]. Tests and benches drive [`start`] directly.

#![forbid(unsafe_code)]

pub mod admin;
pub mod admin_client;
pub mod coalesce;
pub mod config;
pub mod http;
pub mod invalidate;
pub mod key;
pub mod metrics;
pub mod origin;
pub mod policy;
pub mod proxy;
pub mod server;
pub mod store;
pub mod upstream;

use std::io;
use std::net::TcpListener;
use std::sync::Arc;
use std::time::Duration;

use config::{Config, StoreKind};
use server::ServerHandle;
use store::memory::MemoryStore;
use store::Store;

/// A running Echo: the proxy listener (and what it needs to stay up).
pub struct Echo {
    pub proxy: ServerHandle,
    pub admin: Option<ServerHandle>,
}

impl Echo {
    /// Graceful stop of every listener: see `ServerHandle::drain`. True if every
    /// connection finished within `timeout`.
    pub fn drain(&mut self, timeout: Duration) -> bool {
        let mut clean = self.proxy.drain(timeout);
        if let Some(admin) = self.admin.as_mut() {
            clean &= admin.drain(Duration::from_secs(1));
        }
        clean
    }
}

/// Starts Echo from a validated config: binds its listeners and starts serving.
pub fn start(cfg: &Config) -> io::Result<Echo> {
    let listener = bind(cfg.server.listen, "server.listen")?;
    let admin = match &cfg.admin {
        Some(a) => Some(bind(a.listen, "admin.listen")?),
        None => None,
    };
    start_on(cfg, listener, admin)
}

/// Descriptors kept for everything but client connections: an origin or Redis
/// connection per worker thread, plus logs, listeners, pools' idle connections and the
/// acceptor's spare.
fn reserved_fds(cfg: &config::ServerConfig) -> u64 {
    64 + (cfg.workers + cfg.fetch_workers) as u64
}

/// How many client connections the open-files limit allows (each takes two descriptors:
/// the socket and the clone kept to close it on shutdown). Raises the soft limit as far
/// as the hard one allows first; if that is still short of `server.max_connections`,
/// serves fewer (and says so) rather than hang new clients when descriptors run out.
fn connections_within_fd_limit(cfg: &config::ServerConfig) -> usize {
    let wanted = 2 * cfg.max_connections as u64 + reserved_fds(cfg);
    let limit = match rlimit::increase_nofile_limit(wanted) {
        Ok(limit) => limit,
        Err(e) => {
            log::warn!("cannot read the open-files limit: {e}");
            return cfg.max_connections;
        }
    };
    if limit >= wanted {
        return cfg.max_connections;
    }
    let fits = (limit.saturating_sub(reserved_fds(cfg)) / 2).max(1) as usize;
    log::warn!(
        "the open-files limit ({limit}) allows {fits} client connections, not server.max_connections = {}; serving {fits} (raise the limit, e.g. LimitNOFILE in the systemd unit)",
        cfg.max_connections
    );
    fits
}

/// Binds a listener; the error names the address and the config key it came from.
fn bind(addr: std::net::SocketAddr, key: &str) -> io::Result<TcpListener> {
    TcpListener::bind(addr)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot listen on {addr} ({key}): {e}")))
}

/// Starts Echo on already bound listeners (tests bind port 0 first).
pub fn start_on(
    cfg: &Config,
    listener: TcpListener,
    admin: Option<TcpListener>,
) -> io::Result<Echo> {
    let mut server_cfg = cfg.server.clone();
    server_cfg.max_connections = connections_within_fd_limit(&server_cfg);
    let store: Arc<dyn Store> = match cfg.cache.store {
        StoreKind::Memory => Arc::new(MemoryStore::new(
            cfg.cache.memory_max_bytes,
            cfg.cache.max_variants,
            cfg.invalidation.ban_ttl,
        )),
        StoreKind::Redis => {
            let redis = cfg
                .redis
                .as_ref()
                .ok_or_else(|| io::Error::other("[redis] missing"))?;
            Arc::new(
                store::redis::RedisStore::new(
                    redis,
                    cfg.cache.max_variants,
                    cfg.invalidation.ban_ttl,
                )
                .map_err(|e| io::Error::other(e.to_string()))?
                .with_max_stale(cfg.cache.max_stale),
            )
        }
    };
    let policy = policy::PolicyOptions {
        heuristic_max: cfg.cache.heuristic_max,
        default_ttl: cfg.cache.default_ttl,
        max_stale: cfg.cache.max_stale,
        honor_request: cfg.cache.honor_request_cache_control,
        ..policy::PolicyOptions::default()
    };
    let metrics = metrics::Metrics::new();
    let upstreams = Arc::new(
        upstream::Upstreams::new(&cfg.origin, &cfg.routes, Some(Arc::clone(&metrics)))
            .map_err(io::Error::other)?,
    );
    let proxy = Arc::new(
        proxy::Proxy::new(
            Arc::clone(&store),
            Arc::clone(&upstreams),
            policy,
            cfg.cache.max_object_bytes,
            cfg.invalidation.ban_ttl,
        )
        .with_refresh_ahead(cfg.cache.refresh_ahead)
        .with_coalescing(
            cfg.cache.coalesce_max_waiters,
            cfg.cache.coalesce_wait,
            cfg.cache.coalesce_lock_ttl,
        )
        .with_stripped_request_headers(cfg.cache.strip_request_headers.clone())
        .with_metrics(Arc::clone(&metrics)),
    );
    proxy.start_background(cfg.cache.background_workers, cfg.cache.background_queue)?;
    let invalidator = Arc::new(invalidate::Invalidator::start(
        store,
        Arc::clone(&proxy) as Arc<dyn invalidate::Refresher>,
        cfg.invalidation.queue_depth,
        Arc::clone(&metrics),
    )?);
    let handler = proxy;
    let proxy = server::start("echo", listener, server_cfg.clone(), handler)?;
    let admin = match (admin, &cfg.admin) {
        (Some(listener), Some(a)) => {
            // The admin side needs few workers; its limits are the proxy's.
            let admin_cfg = config::ServerConfig {
                workers: 2,
                fetch_workers: 1,
                ..server_cfg.clone()
            };
            let handler = Arc::new(admin::Admin::new(
                a.token.clone(),
                Arc::clone(&invalidator),
                cfg.invalidation.wait_timeout,
                Arc::clone(&metrics),
                Arc::clone(&upstreams),
            ));
            Some(server::start("echo-admin", listener, admin_cfg, handler)?)
        }
        _ => None,
    };
    Ok(Echo { proxy, admin })
}
