//! The TOML file mirrored as-is (`Raw*`), and **every default of every key**.
//!
//! Owns: one `Raw*` struct per section, each `deny_unknown_fields`, with the values a key
//! takes when the file leaves it out: the section's `impl Default` (or, for `[origin]`,
//! [`OriginDefaults`]). A key whose default is another key's value says so here too, in a
//! documented `*_or_workers` method beside its section.
//!
//! Invariants: nothing here checks a value (that is `validate.rs`); nothing outside this
//! file invents a default: validation, the typed sections' `Default` impls and, through
//! them, every component take their defaults from here. Plain data: imports no other
//! Echo module.

use std::path::PathBuf;

use serde::Deserialize;

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub(super) struct RawConfig {
    #[serde(default)]
    pub(super) server: RawServer,
    pub(super) admin: Option<RawAdmin>,
    pub(super) origin: Option<RawOrigin>,
    #[serde(default)]
    pub(super) route: Vec<RawOrigin>,
    #[serde(default)]
    pub(super) cache: RawCache,
    pub(super) redis: Option<RawRedis>,
    #[serde(default)]
    pub(super) invalidation: RawInvalidation,
    #[serde(default)]
    pub(super) log: RawLog,
}

// ---------------------------------------------------------------------------------------
// [server]

/// `server.listen`: one address, or a list of them.
#[derive(Debug, Deserialize)]
#[serde(untagged)]
pub(super) enum RawListen {
    One(String),
    Many(Vec<String>),
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawServer {
    pub(super) listen: RawListen,
    pub(super) unix_socket_mode: u32,
    pub(super) proxy_protocol: bool,
    /// Addresses and networks (`10.0.0.0/8`, `192.0.2.7`).
    pub(super) trusted_proxies: Vec<String>,
    /// 0: one per core.
    pub(super) io_threads: u64,
    pub(super) workers: u64,
    pub(super) fetch_workers: u64,
    pub(super) fetch_queue: u64,
    pub(super) drain_timeout_ms: u64,
    pub(super) drain_grace_ms: u64,
    pub(super) max_connections: u64,
    pub(super) queue_depth: u64,
    pub(super) queue_timeout_ms: u64,
    pub(super) idle_timeout_ms: u64,
    pub(super) header_timeout_ms: u64,
    pub(super) body_timeout_ms: u64,
    pub(super) write_timeout_ms: u64,
    pub(super) max_header_bytes: u64,
    pub(super) max_headers: u64,
    pub(super) max_target_bytes: u64,
    pub(super) max_body_bytes: u64,
    pub(super) min_rate_bytes_per_sec: u64,
    pub(super) underscores_in_headers: bool,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: RawListen::One("127.0.0.1:8080".into()),
            unix_socket_mode: 0o660,
            proxy_protocol: false,
            trusted_proxies: Vec::new(),
            io_threads: 0,
            workers: 64,
            fetch_workers: 256,
            fetch_queue: 1024,
            drain_timeout_ms: 30_000,
            drain_grace_ms: 5_000,
            max_connections: 4096,
            queue_depth: 1024,
            queue_timeout_ms: 1000,
            idle_timeout_ms: 60_000,
            header_timeout_ms: 10_000,
            body_timeout_ms: 30_000,
            write_timeout_ms: 30_000,
            max_header_bytes: 32 * 1024,
            max_headers: 100,
            max_target_bytes: 8 * 1024,
            max_body_bytes: 64 * 1024 * 1024,
            min_rate_bytes_per_sec: 4096,
            underscores_in_headers: false,
        }
    }
}

// ---------------------------------------------------------------------------------------
// [admin]: optional as a whole (no section, no admin listener).

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawAdmin {
    pub(super) listen: String,
    /// No default: one of `token` and `token_file` is required.
    pub(super) token: Option<String>,
    pub(super) token_file: Option<String>,
    /// Read-only: `/metrics`, `GET /cache`, job status. None: only `token` reads them.
    pub(super) metrics_token: Option<String>,
}

impl Default for RawAdmin {
    fn default() -> Self {
        RawAdmin {
            listen: "127.0.0.1:8081".into(),
            token: None,
            token_file: None,
            metrics_token: None,
        }
    }
}

// ---------------------------------------------------------------------------------------
// [origin] and [[route]]

/// `[origin]`, and each `[[route]]` (which alone may set `path_prefix` and `host`).
/// Every field is optional here so a route can tell "unset" (inherit `[origin]`'s)
/// from a value; what a key is when neither sets it is [`OriginDefaults`].
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
pub(super) struct RawOrigin {
    pub(super) url: Option<String>,
    pub(super) servers: Option<Vec<String>>,
    pub(super) path_prefix: Option<String>,
    pub(super) host: Option<String>,
    pub(super) balance: Option<String>,
    pub(super) retries: Option<u64>,
    pub(super) max_fails: Option<u64>,
    pub(super) fail_timeout_ms: Option<u64>,
    /// Unset: no active health checks.
    pub(super) health_check_path: Option<String>,
    pub(super) health_check_interval_ms: Option<u64>,
    pub(super) health_check_timeout_ms: Option<u64>,
    pub(super) health_check_fails: Option<u64>,
    pub(super) health_check_passes: Option<u64>,
    pub(super) preserve_host: Option<bool>,
    /// Unset: the system's roots.
    pub(super) ca_file: Option<PathBuf>,
    pub(super) connect_timeout_ms: Option<u64>,
    pub(super) response_timeout_ms: Option<u64>,
    pub(super) read_timeout_ms: Option<u64>,
    pub(super) send_timeout_ms: Option<u64>,
    /// Unset: no deadline on the whole exchange beyond the per-phase ones.
    pub(super) total_timeout_ms: Option<u64>,
    /// Unset: see [`RawOrigin::max_idle_connections_or_workers`].
    pub(super) max_idle_connections: Option<u64>,
}

/// The value of each `[origin]` key that neither `[origin]` nor (for a route) the
/// `[[route]]` sets. Apart from [`RawOrigin`] because that keeps every key optional.
#[derive(Debug, Clone)]
pub(super) struct OriginDefaults {
    pub(super) balance: &'static str,
    pub(super) retries: u64,
    pub(super) max_fails: u64,
    pub(super) fail_timeout_ms: u64,
    pub(super) health_check_interval_ms: u64,
    pub(super) health_check_timeout_ms: u64,
    pub(super) health_check_fails: u64,
    pub(super) health_check_passes: u64,
    pub(super) preserve_host: bool,
    pub(super) connect_timeout_ms: u64,
    pub(super) response_timeout_ms: u64,
    pub(super) read_timeout_ms: u64,
    pub(super) send_timeout_ms: u64,
}

impl Default for OriginDefaults {
    fn default() -> Self {
        OriginDefaults {
            balance: "round_robin",
            retries: 1,
            max_fails: 3,
            fail_timeout_ms: 10_000,
            health_check_interval_ms: 10_000,
            health_check_timeout_ms: 2_000,
            health_check_fails: 3,
            health_check_passes: 2,
            preserve_host: false,
            connect_timeout_ms: 2_000,
            response_timeout_ms: 30_000,
            read_timeout_ms: 30_000,
            send_timeout_ms: 30_000,
        }
    }
}

impl RawOrigin {
    /// A route's settings: its own where set, `[origin]`'s otherwise. The servers, the
    /// health check path and what selects the route are never inherited: they belong
    /// to the service the route names.
    pub(super) fn inherit(self, base: &RawOrigin) -> RawOrigin {
        RawOrigin {
            url: self.url,
            servers: self.servers,
            path_prefix: self.path_prefix,
            host: self.host,
            health_check_path: self.health_check_path,
            balance: self.balance.or_else(|| base.balance.clone()),
            retries: self.retries.or(base.retries),
            max_fails: self.max_fails.or(base.max_fails),
            fail_timeout_ms: self.fail_timeout_ms.or(base.fail_timeout_ms),
            health_check_interval_ms: self
                .health_check_interval_ms
                .or(base.health_check_interval_ms),
            health_check_timeout_ms: self
                .health_check_timeout_ms
                .or(base.health_check_timeout_ms),
            health_check_fails: self.health_check_fails.or(base.health_check_fails),
            health_check_passes: self.health_check_passes.or(base.health_check_passes),
            preserve_host: self.preserve_host.or(base.preserve_host),
            ca_file: self.ca_file.or_else(|| base.ca_file.clone()),
            connect_timeout_ms: self.connect_timeout_ms.or(base.connect_timeout_ms),
            response_timeout_ms: self.response_timeout_ms.or(base.response_timeout_ms),
            read_timeout_ms: self.read_timeout_ms.or(base.read_timeout_ms),
            send_timeout_ms: self.send_timeout_ms.or(base.send_timeout_ms),
            total_timeout_ms: self.total_timeout_ms.or(base.total_timeout_ms),
            max_idle_connections: self.max_idle_connections.or(base.max_idle_connections),
        }
    }

    /// `max_idle_connections`, by default `server.workers`: a worker that just finished
    /// with a server can always park its connection for the next request.
    pub(super) fn max_idle_connections_or_workers(&self, workers: u64) -> u64 {
        self.max_idle_connections.unwrap_or(workers)
    }
}

// ---------------------------------------------------------------------------------------
// [cache]

/// Request fields that are not part of the cache key and that origins are known to act
/// on or reflect (URL rewrites, method overrides, forwarding details): removed from every
/// request that may fill the cache, so one client cannot store a response others get.
/// Names are compared folded (`_` = `-`, any case), so one entry covers every spelling
/// CGI, WSGI and Rack servers treat alike. The families: forwarded host / proto / scheme
/// / ssl / port / prefix / uri / server, original and rewritten URLs, method overrides,
/// and Front-End-Https. (Echo replaces `X-Forwarded-For`, `-Host` and `-Proto` with its
/// own on every forwarded request.) The default of `cache.strip_request_headers`.
pub(crate) const DEFAULT_STRIPPED: &[&str] = &[
    "forwarded",
    "x-forwarded-scheme",
    "x-forwarded-protocol",
    "x-forwarded-ssl",
    "x-forwarded-port",
    "x-forwarded-prefix",
    "x-forwarded-path",
    "x-forwarded-uri",
    "x-forwarded-server",
    "x-forwarded-host-override",
    "x-original-url",
    "x-original-uri",
    "x-original-host",
    "x-original-method",
    "x-rewrite-url",
    "x-http-method-override",
    "x-http-method",
    "x-method-override",
    "x-http-destinationurl",
    "x-host",
    "x-url-scheme",
    "x-scheme",
    "front-end-https",
];

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawCache {
    pub(super) store: String,
    pub(super) memory_max_bytes: u64,
    pub(super) max_object_bytes: u64,
    pub(super) max_variants: u64,
    pub(super) heuristic_max_ms: u64,
    pub(super) default_ttl_ms: u64,
    pub(super) max_stale_ms: u64,
    pub(super) honor_request_cache_control: bool,
    pub(super) stale_if_error_ms: u64,
    pub(super) targeted_cache_control: Vec<String>,
    pub(super) surrogate_control: bool,
    pub(super) normalize_accept_encoding: Vec<String>,
    pub(super) compress: Vec<String>,
    pub(super) expose_status_headers: bool,
    pub(super) strip_surrogate_key: bool,
    pub(super) refresh_ahead_ms: u64,
    pub(super) background_workers: u64,
    pub(super) background_queue: u64,
    /// Retired (issue 16): followers wait as long as their leader is alive. Accepted,
    /// ignored, named in a warning at start.
    pub(super) coalesce_wait_ms: Option<u64>,
    /// Retired (issue 16): there is no cap on followers. Accepted, ignored, warned of.
    pub(super) coalesce_max_waiters: Option<u64>,
    pub(super) coalesce_lock_ttl_ms: u64,
    pub(super) uncacheable_ttl_ms: u64,
    pub(super) strip_request_headers: Vec<String>,
}

impl Default for RawCache {
    fn default() -> Self {
        RawCache {
            store: "memory".into(),
            memory_max_bytes: 256 * 1024 * 1024,
            max_object_bytes: 8 * 1024 * 1024,
            max_variants: 16,
            heuristic_max_ms: 86_400_000,
            default_ttl_ms: 0,
            max_stale_ms: 3_600_000,
            honor_request_cache_control: true,
            stale_if_error_ms: 0,
            targeted_cache_control: vec!["echo-cache-control".into(), "cdn-cache-control".into()],
            surrogate_control: false,
            normalize_accept_encoding: vec!["gzip".into(), "br".into(), "zstd".into()],
            compress: Vec::new(),
            expose_status_headers: true,
            strip_surrogate_key: true,
            refresh_ahead_ms: 0,
            background_workers: 4,
            background_queue: 256,
            coalesce_wait_ms: None,
            coalesce_max_waiters: None,
            coalesce_lock_ttl_ms: 1_000,
            uncacheable_ttl_ms: 30_000,
            strip_request_headers: DEFAULT_STRIPPED.iter().map(|h| h.to_string()).collect(),
        }
    }
}

// ---------------------------------------------------------------------------------------
// [redis]: optional as a whole (no section, no Redis store).

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawRedis {
    /// The master's URL, or `sentinels` and `sentinel_master` (one of the two is required).
    pub(super) master: Option<String>,
    pub(super) replicas: Vec<String>,
    /// Sentinels to discover the master and replicas from (instead of `master`).
    pub(super) sentinels: Vec<String>,
    /// The name the sentinels monitor the master under (with `sentinels`).
    pub(super) sentinel_master: Option<String>,
    /// Credentials and TLS for the servers Sentinel names (their addresses carry none);
    /// unset: none, plain TCP.
    pub(super) username: Option<String>,
    pub(super) password: Option<String>,
    pub(super) tls: bool,
    /// PEM roots for `rediss://` and `tls`; unset: the system's.
    pub(super) ca_file: Option<PathBuf>,
    pub(super) max_replica_lag_ms: u64,
    pub(super) connect_timeout_ms: u64,
    pub(super) read_timeout_ms: u64,
    pub(super) write_timeout_ms: u64,
    /// Unset: see [`RawRedis::pool_size_or_workers`].
    pub(super) pool_size: Option<u64>,
    pub(super) pool_timeout_ms: u64,
    pub(super) ttl_margin_ms: u64,
    pub(super) breaker_failures: u64,
    pub(super) breaker_open_ms: u64,
    /// Unset: wait for every listed replica.
    pub(super) wait_replicas: Option<u64>,
    pub(super) wait_timeout_ms: u64,
    pub(super) scan_count: u64,
    pub(super) tag_sweep_per_sec: u64,
    pub(super) local_cache_max_bytes: u64,
    pub(super) local_cache_max_ttl_ms: u64,
}

impl Default for RawRedis {
    fn default() -> Self {
        RawRedis {
            master: None,
            replicas: Vec::new(),
            sentinels: Vec::new(),
            sentinel_master: None,
            username: None,
            password: None,
            tls: false,
            ca_file: None,
            max_replica_lag_ms: 1_000,
            connect_timeout_ms: 250,
            read_timeout_ms: 250,
            write_timeout_ms: 250,
            pool_size: None,
            pool_timeout_ms: 250,
            ttl_margin_ms: 60_000,
            breaker_failures: 3,
            breaker_open_ms: 1_000,
            wait_replicas: None,
            wait_timeout_ms: 1_000,
            scan_count: 1_000,
            tag_sweep_per_sec: 1_000,
            local_cache_max_bytes: 64 << 20,
            local_cache_max_ttl_ms: 60_000,
        }
    }
}

impl RawRedis {
    /// `pool_size`, by default `server.workers`: connections per Redis server, so no
    /// worker waits for another's connection.
    pub(super) fn pool_size_or_workers(&self, workers: u64) -> u64 {
        self.pool_size.unwrap_or(workers)
    }
}

// ---------------------------------------------------------------------------------------
// [invalidation]

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawInvalidation {
    pub(super) queue_depth: u64,
    pub(super) wait_timeout_ms: u64,
    pub(super) ban_ttl_ms: u64,
    pub(super) job_timeout_ms: u64,
}

impl Default for RawInvalidation {
    fn default() -> Self {
        RawInvalidation {
            queue_depth: 64,
            wait_timeout_ms: 60_000,
            ban_ttl_ms: 300_000,
            job_timeout_ms: 300_000,
        }
    }
}

// ---------------------------------------------------------------------------------------
// [log]

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct RawLog {
    pub(super) level: String,
    /// The level of the libraries Echo uses (HTTP client, TLS, Redis client).
    pub(super) dependencies: String,
    /// Unset: stderr.
    pub(super) file: Option<String>,
    /// Unset: no access log.
    pub(super) access_log: Option<String>,
    /// `text` or `json`.
    pub(super) access_format: String,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            level: "info".into(),
            dependencies: "warn".into(),
            access_format: "text".into(),
            file: None,
            access_log: None,
        }
    }
}
