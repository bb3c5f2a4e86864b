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

use std::io;
use std::net::TcpListener;
use std::sync::Arc;

use config::{Config, StoreKind};
use server::ServerHandle;
use store::memory::MemoryStore;
use store::Store;

/// A running Echo: the proxy listener (and what it needs to stay up).
pub struct Echo {
    pub proxy: ServerHandle,
    pub admin: Option<ServerHandle>,
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
    let origin = origin::Origin::new(&cfg.origin);
    let metrics = metrics::Metrics::new();
    let proxy = Arc::new(
        proxy::Proxy::new(
            Arc::clone(&store),
            origin,
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
    let proxy = server::start("echo", listener, cfg.server.clone(), handler)?;
    let admin = match (admin, &cfg.admin) {
        (Some(listener), Some(a)) => {
            // The admin side needs few workers; its limits are the proxy's.
            let admin_cfg = config::ServerConfig {
                workers: 2,
                ..cfg.server.clone()
            };
            let handler = Arc::new(admin::Admin::new(
                a.token.clone(),
                Arc::clone(&invalidator),
                cfg.invalidation.wait_timeout,
                Arc::clone(&metrics),
            ));
            Some(server::start("echo-admin", listener, admin_cfg, handler)?)
        }
        _ => None,
    };
    Ok(Echo { proxy, admin })
}
