//! Configuration: the TOML file mirrored as-is (`Raw*`, `deny_unknown_fields`), then
//! validated once into the typed [`Config`] the rest of Echo uses.
//!
//! Invariants: every default lives in one `Default` impl per section; every duration is a
//! [`Duration`] after validation (only the TOML keys carry units, `_ms`); every error names
//! the offending key and, when the file has it, its line. `etc/echo.toml` documents every
//! key and a test parses it.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

/// A configuration error: which key, where, and what is wrong with it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConfigError {
    /// Dotted key path, e.g. `server.workers`; `None` for errors about the whole file.
    pub key: Option<String>,
    /// 1-based line in the file, when known.
    pub line: Option<usize>,
    pub message: String,
}

impl fmt::Display for ConfigError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("config error")?;
        if let Some(line) = self.line {
            write!(f, " at line {line}")?;
        }
        if let Some(key) = &self.key {
            write!(f, ": {key}")?;
        }
        write!(f, ": {}", self.message)
    }
}

impl std::error::Error for ConfigError {}

// ---------------------------------------------------------------------------------------
// Raw: mirrors the TOML file.

#[derive(Debug, Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct RawConfig {
    #[serde(default)]
    server: RawServer,
    admin: Option<RawAdmin>,
    origin: Option<RawOrigin>,
    #[serde(default)]
    route: Vec<RawOrigin>,
    #[serde(default)]
    cache: RawCache,
    redis: Option<RawRedis>,
    #[serde(default)]
    invalidation: RawInvalidation,
    #[serde(default)]
    log: RawLog,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawInvalidation {
    queue_depth: u64,
    wait_timeout_ms: u64,
    ban_ttl_ms: u64,
    job_timeout_ms: u64,
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawServer {
    listen: String,
    workers: u64,
    fetch_workers: u64,
    fetch_queue: u64,
    drain_timeout_ms: u64,
    max_connections: u64,
    queue_depth: u64,
    queue_timeout_ms: u64,
    idle_timeout_ms: u64,
    header_timeout_ms: u64,
    body_timeout_ms: u64,
    write_timeout_ms: u64,
    max_header_bytes: u64,
    max_headers: u64,
    max_target_bytes: u64,
    max_body_bytes: u64,
    min_rate_bytes_per_sec: u64,
    underscores_in_headers: bool,
}

impl Default for RawServer {
    fn default() -> Self {
        RawServer {
            listen: "127.0.0.1:8080".into(),
            workers: 64,
            fetch_workers: 256,
            fetch_queue: 1024,
            drain_timeout_ms: 30_000,
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

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawAdmin {
    listen: Option<String>,
    token: Option<String>,
    token_file: Option<String>,
}

/// `[origin]`, and each `[[route]]` (which alone may set `path_prefix` and `host`).
/// Every field is optional here so a route can tell "unset" (inherit `[origin]`'s)
/// from a value.
#[derive(Debug, Deserialize, Default, Clone)]
#[serde(deny_unknown_fields)]
struct RawOrigin {
    url: Option<String>,
    servers: Option<Vec<String>>,
    path_prefix: Option<String>,
    host: Option<String>,
    balance: Option<String>,
    retries: Option<u64>,
    max_fails: Option<u64>,
    fail_timeout_ms: Option<u64>,
    health_check_path: Option<String>,
    health_check_interval_ms: Option<u64>,
    health_check_timeout_ms: Option<u64>,
    health_check_fails: Option<u64>,
    health_check_passes: Option<u64>,
    preserve_host: Option<bool>,
    ca_file: Option<PathBuf>,
    connect_timeout_ms: Option<u64>,
    response_timeout_ms: Option<u64>,
    read_timeout_ms: Option<u64>,
    send_timeout_ms: Option<u64>,
    total_timeout_ms: Option<u64>,
    max_idle_connections: Option<u64>,
}

impl RawOrigin {
    /// A route's settings: its own where set, `[origin]`'s otherwise. The servers, the
    /// health check path and what selects the route are never inherited: they belong
    /// to the service the route names.
    fn inherit(self, base: &RawOrigin) -> RawOrigin {
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
}

/// Request fields that are not part of the cache key and that origins are known to act
/// on or reflect (URL rewrites, method overrides, forwarding details): removed from every
/// request that may fill the cache, so one client cannot store a response others get.
/// Names are compared folded (`_` = `-`, any case: see `http::fold_name`), so one entry
/// covers every spelling CGI, WSGI and Rack servers treat alike. The families: forwarded
/// host / proto / scheme / ssl / port / prefix / uri / server, original and rewritten
/// URLs, method overrides, and Front-End-Https. (Echo replaces `X-Forwarded-For`,
/// `-Host` and `-Proto` with its own on every forwarded request.)
pub const DEFAULT_STRIPPED: &[&str] = &[
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
struct RawCache {
    store: String,
    memory_max_bytes: u64,
    max_object_bytes: u64,
    max_variants: u64,
    heuristic_max_ms: u64,
    default_ttl_ms: u64,
    max_stale_ms: u64,
    honor_request_cache_control: bool,
    refresh_ahead_ms: u64,
    background_workers: u64,
    background_queue: u64,
    coalesce_wait_ms: u64,
    coalesce_max_waiters: Option<u64>,
    coalesce_lock_ttl_ms: u64,
    strip_request_headers: Vec<String>,
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
            refresh_ahead_ms: 0,
            background_workers: 4,
            background_queue: 256,
            coalesce_wait_ms: 5_000,
            coalesce_max_waiters: None,
            coalesce_lock_ttl_ms: 30_000,
            strip_request_headers: DEFAULT_STRIPPED.iter().map(|h| h.to_string()).collect(),
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawRedis {
    master: Option<String>,
    replicas: Vec<String>,
    connect_timeout_ms: u64,
    read_timeout_ms: u64,
    write_timeout_ms: u64,
    pool_size: Option<u64>,
    pool_timeout_ms: u64,
    ttl_margin_ms: u64,
    breaker_failures: u64,
    breaker_open_ms: u64,
    wait_replicas: Option<u64>,
    wait_timeout_ms: u64,
    scan_count: u64,
}

impl Default for RawRedis {
    fn default() -> Self {
        RawRedis {
            master: None,
            replicas: Vec::new(),
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
        }
    }
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
struct RawLog {
    level: String,
    file: Option<String>,
    access_log: Option<String>,
}

impl Default for RawLog {
    fn default() -> Self {
        RawLog {
            level: "info".into(),
            file: None,
            access_log: None,
        }
    }
}

// ---------------------------------------------------------------------------------------
// Typed: what the program uses.

#[derive(Debug, Clone)]
pub struct Config {
    pub server: ServerConfig,
    pub admin: Option<AdminConfig>,
    pub origin: OriginConfig,
    /// In the file's order; the router picks the longest matching prefix.
    pub routes: Vec<RouteConfig>,
    pub cache: CacheConfig,
    pub redis: Option<RedisConfig>,
    pub invalidation: InvalidationConfig,
    pub log: LogConfig,
}

/// The invalidation API and thread.
#[derive(Debug, Clone)]
pub struct InvalidationConfig {
    /// Jobs waiting for the invalidation thread; more are refused with 503.
    pub queue_depth: usize,
    /// How long `POST /invalidate` waits for its job before answering 202 with its id.
    pub wait_timeout: Duration,
    /// How long an invalidation is held against fills that began before it.
    pub ban_ttl: Duration,
    /// A job's time budget: a job still running after it stops and is reported failed.
    pub job_timeout: Duration,
}

/// The Redis store: where it is and how long Echo waits for it.
#[derive(Debug, Clone)]
pub struct RedisConfig {
    /// `redis://[:password@]host:port[/db]`: writes, deletes, and reads of last resort.
    pub master: String,
    /// Read from these, round robin; empty: read from the master.
    pub replicas: Vec<String>,
    pub connect_timeout: Duration,
    pub read_timeout: Duration,
    pub write_timeout: Duration,
    /// Connections per Redis server (default: server.workers).
    pub pool_size: u32,
    /// Longest wait for a pooled connection.
    pub pool_timeout: Duration,
    /// Added to an entry's remaining freshness for its Redis TTL.
    pub ttl_margin: Duration,
    /// Failures in a row after which a Redis server is skipped ...
    pub breaker_failures: u32,
    /// ... for this long, before one request tries it again.
    pub breaker_open: Duration,
    /// Replicas an invalidation waits for (WAIT); default: all of `replicas`.
    pub wait_replicas: Option<u64>,
    pub wait_timeout: Duration,
    /// Keys asked for per SCAN call.
    pub scan_count: usize,
}

/// The HTTP front end: listener, worker pool, limits and client-side timeouts.
#[derive(Debug, Clone)]
pub struct ServerConfig {
    pub listen: SocketAddr,
    pub workers: usize,
    /// Threads of the fetch stage: requests waiting on the origin.
    pub fetch_workers: usize,
    /// Requests waiting for a fetch worker; more are answered 503.
    pub fetch_queue: usize,
    /// On SIGTERM/SIGINT, how long requests in flight get to finish.
    pub drain_timeout: Duration,
    pub max_connections: usize,
    pub queue_depth: usize,
    pub queue_timeout: Duration,
    pub idle_timeout: Duration,
    pub header_timeout: Duration,
    pub body_timeout: Duration,
    pub write_timeout: Duration,
    pub max_header_bytes: usize,
    pub max_headers: usize,
    pub max_target_bytes: usize,
    pub max_body_bytes: u64,
    /// The slowest a client may send a request body or take a response: the absolute
    /// deadline of a body in is `body_timeout` plus its bytes at this rate, of a
    /// response out `write_timeout` plus its bytes at this rate (bytes per second).
    pub min_rate_bytes_per_sec: u64,
    /// Forward request fields whose names hold `_` (nginx's `underscores_in_headers`);
    /// off: they are dropped from every forwarded request.
    pub underscores_in_headers: bool,
}

impl Default for ServerConfig {
    fn default() -> Self {
        let raw = RawServer::default();
        // The defaults are valid by construction; a test checks it.
        validate_server(&raw).unwrap_or_else(|e| panic!("default server config invalid: {e}"))
    }
}

#[derive(Debug, Clone)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token: String,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scheme {
    Http,
    Https,
}

impl Scheme {
    pub fn as_str(&self) -> &'static str {
        match self {
            Scheme::Http => "http",
            Scheme::Https => "https",
        }
    }
}

/// One server of a passthrough service.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerAddr {
    pub scheme: Scheme,
    /// `host[:port]` as written in the URL: the Host sent to it, and its TLS name.
    pub authority: String,
}

impl ServerAddr {
    /// `scheme://authority`, the base every request target is appended to; also the
    /// server's name in logs, `/health` and metrics.
    pub fn base_url(&self) -> String {
        format!("{}://{}", self.scheme.as_str(), self.authority)
    }
}

/// How a request picks among a service's healthy servers.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Balance {
    RoundRobin,
    /// The server with the fewest requests in flight (round robin among equals).
    LeastOutstanding,
}

/// Active health checks of a service's servers.
#[derive(Debug, Clone)]
pub struct HealthCheckConfig {
    /// Probed with a GET; a 2xx or 3xx answer within `timeout` passes.
    pub path: String,
    pub interval: Duration,
    pub timeout: Duration,
    /// Consecutive failed probes that take a server out.
    pub fails: u32,
    /// Consecutive passed probes that put it back.
    pub passes: u32,
}

/// A passthrough service (`[origin]`, or a `[[route]]`'s): its servers and how they
/// are used.
#[derive(Debug, Clone)]
pub struct OriginConfig {
    /// `origin`, or `route[N]`: the service's name in logs and `/health`.
    pub name: String,
    pub servers: Vec<ServerAddr>,
    pub balance: Balance,
    /// Other servers tried after a failed connect (idempotent requests whose body was
    /// not read yet).
    pub retries: usize,
    /// Consecutive connect failures or timeouts that take a server out for
    /// `fail_timeout`; zero: never.
    pub max_fails: u32,
    pub fail_timeout: Duration,
    pub health_check: Option<HealthCheckConfig>,
    /// Send the client's Host instead of the server's authority.
    pub preserve_host: bool,
    /// PEM roots trusted for https servers instead of the system's.
    pub ca_file: Option<PathBuf>,
    pub connect_timeout: Duration,
    /// Until the response head arrives (first byte).
    pub response_timeout: Duration,
    /// Between reads of the body.
    pub read_timeout: Duration,
    pub send_timeout: Duration,
    /// The whole exchange, body included; `None`: no limit beyond the others.
    pub total_timeout: Option<Duration>,
    /// Idle keep-alive connections kept per server.
    pub max_idle_connections: usize,
}

/// A `[[route]]`: requests whose path starts with `path_prefix` (and, when set, whose
/// Host is `host`) go to its service; the longest prefix wins.
#[derive(Debug, Clone)]
pub struct RouteConfig {
    pub path_prefix: String,
    /// Lower case, without a port.
    pub host: Option<String>,
    pub origin: OriginConfig,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub enum StoreKind {
    Memory,
    Redis,
}

#[derive(Debug, Clone)]
pub struct CacheConfig {
    pub store: StoreKind,
    pub memory_max_bytes: usize,
    pub max_object_bytes: usize,
    pub max_variants: usize,
    pub heuristic_max: Duration,
    /// Lifetime for heuristically cacheable responses without freshness information;
    /// zero: off.
    pub default_ttl: Duration,
    /// Cap on serving stale (stale-while-revalidate, stale-if-error, max-stale).
    pub max_stale: Duration,
    /// Act on clients' Cache-Control request directives.
    pub honor_request_cache_control: bool,
    /// Refresh an entry read within this long of its expiry in the background; zero: off.
    pub refresh_ahead: Duration,
    /// Threads and queue for background refreshes (stale-while-revalidate, refresh-ahead).
    pub background_workers: usize,
    pub background_queue: usize,
    /// How long a request waits for another's fetch of the same key before fetching itself.
    pub coalesce_wait: Duration,
    /// Requests allowed to wait on one key; more fetch themselves.
    pub coalesce_max_waiters: usize,
    /// Lifetime of the cross-node fill lock (Redis), in case its holder dies.
    pub coalesce_lock_ttl: Duration,
    /// Request fields removed from requests that may fill the cache (folded: lower
    /// case, `_` as `-`).
    pub strip_request_headers: Vec<String>,
}

#[derive(Debug, Clone)]
pub struct LogConfig {
    pub level: log::LevelFilter,
    pub file: Option<PathBuf>,
    /// One line per answered request; reopened on SIGHUP. None: no access log.
    pub access_log: Option<PathBuf>,
}

impl Config {
    /// Reads and validates a config file.
    pub fn load(path: &Path) -> Result<Config, ConfigError> {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError {
            key: None,
            line: None,
            message: format!("cannot read {}: {e}", path.display()),
        })?;
        Config::parse(&text)
    }

    /// Parses and validates config text; errors name the key and its line.
    pub fn parse(text: &str) -> Result<Config, ConfigError> {
        let raw: RawConfig = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| line_of(text, s.start));
            let key = e.span().and_then(|s| key_at(text, s.start));
            ConfigError {
                key,
                line,
                message: e.message().trim().to_string(),
            }
        })?;
        validate(raw).map_err(|mut e| {
            if e.line.is_none() {
                if let Some(key) = &e.key {
                    e.line = line_of_key(text, key);
                }
            }
            e
        })
    }
}

fn err(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: Some(key.to_string()),
        line: None,
        message: message.into(),
    }
}

fn ms(key: &str, value: u64) -> Result<Duration, ConfigError> {
    if value == 0 {
        return Err(err(key, "must be greater than 0"));
    }
    Ok(Duration::from_millis(value))
}

fn ranged(key: &str, value: u64, min: u64, max: u64) -> Result<usize, ConfigError> {
    if value < min || value > max {
        return Err(err(
            key,
            format!("must be between {min} and {max} (got {value})"),
        ));
    }
    usize::try_from(value).map_err(|_| err(key, "too large for this platform"))
}

fn socket_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse().map_err(|_| {
        err(
            key,
            format!("expected an address like \"127.0.0.1:8080\", got {value:?}"),
        )
    })
}

fn validate_server(s: &RawServer) -> Result<ServerConfig, ConfigError> {
    Ok(ServerConfig {
        listen: socket_addr("server.listen", &s.listen)?,
        workers: ranged("server.workers", s.workers, 1, 4096)?,
        fetch_workers: ranged("server.fetch_workers", s.fetch_workers, 1, 4096)?,
        fetch_queue: ranged("server.fetch_queue", s.fetch_queue, 1, 1_000_000)?,
        drain_timeout: ms("server.drain_timeout_ms", s.drain_timeout_ms)?,
        max_connections: ranged("server.max_connections", s.max_connections, 1, 1_000_000)?,
        queue_depth: ranged("server.queue_depth", s.queue_depth, 1, 1_000_000)?,
        queue_timeout: ms("server.queue_timeout_ms", s.queue_timeout_ms)?,
        idle_timeout: ms("server.idle_timeout_ms", s.idle_timeout_ms)?,
        header_timeout: ms("server.header_timeout_ms", s.header_timeout_ms)?,
        body_timeout: ms("server.body_timeout_ms", s.body_timeout_ms)?,
        write_timeout: ms("server.write_timeout_ms", s.write_timeout_ms)?,
        max_header_bytes: ranged("server.max_header_bytes", s.max_header_bytes, 1024, 1 << 20)?,
        max_headers: ranged(
            "server.max_headers",
            s.max_headers,
            8,
            crate::http::parse::MAX_HEADERS_CAP as u64,
        )?,
        max_target_bytes: ranged("server.max_target_bytes", s.max_target_bytes, 64, 1 << 20)?,
        max_body_bytes: s.max_body_bytes,
        min_rate_bytes_per_sec: ranged(
            "server.min_rate_bytes_per_sec",
            s.min_rate_bytes_per_sec,
            1,
            u64::MAX,
        )? as u64,
        underscores_in_headers: s.underscores_in_headers,
    })
}

fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    let server = validate_server(&raw.server)?;
    if server.max_target_bytes > server.max_header_bytes {
        return Err(err(
            "server.max_target_bytes",
            "must not exceed server.max_header_bytes",
        ));
    }

    let admin = match raw.admin {
        None => None,
        Some(a) => Some(validate_admin(a, server.listen)?),
    };

    let Some(raw_origin) = raw.origin else {
        return Err(err("origin.url", "is required (the passthrough service)"));
    };
    for field in [
        ("path_prefix", raw_origin.path_prefix.is_some()),
        ("host", raw_origin.host.is_some()),
    ] {
        if field.1 {
            return Err(err(
                &format!("origin.{}", field.0),
                "belongs in a [[route]], not in [origin]",
            ));
        }
    }
    let origin = validate_origin("origin", raw_origin.clone(), server.workers)?;
    let mut routes = Vec::with_capacity(raw.route.len());
    for (i, r) in raw.route.into_iter().enumerate() {
        let name = format!("route[{i}]");
        let raw_route = r.inherit(&raw_origin);
        let path_prefix = match &raw_route.path_prefix {
            Some(p) if p.starts_with('/') && !p.chars().any(|c| c.is_control() || c == ' ') => {
                p.clone()
            }
            Some(p) => {
                return Err(err(
                    &format!("{name}.path_prefix"),
                    format!("must be a path starting with / (got {p:?})"),
                ))
            }
            None => {
                return Err(err(
                    &format!("{name}.path_prefix"),
                    "is required (which requests the route takes)",
                ))
            }
        };
        let host = match &raw_route.host {
            None => None,
            Some(h) if valid_host(h) => Some(h.to_ascii_lowercase()),
            Some(h) => {
                return Err(err(
                    &format!("{name}.host"),
                    format!("must be a host name without a port (got {h:?})"),
                ))
            }
        };
        if routes
            .iter()
            .any(|o: &RouteConfig| o.path_prefix == path_prefix && o.host == host)
        {
            return Err(err(
                &format!("{name}.path_prefix"),
                format!("{path_prefix:?} is already routed (for the same host)"),
            ));
        }
        let origin = validate_origin(&name, raw_route, server.workers)?;
        routes.push(RouteConfig {
            path_prefix,
            host,
            origin,
        });
    }

    let c = &raw.cache;
    let store = match c.store.as_str() {
        "memory" => StoreKind::Memory,
        "redis" => StoreKind::Redis,
        other => {
            return Err(err(
                "cache.store",
                format!("unknown store {other:?}; use \"memory\" or \"redis\""),
            ))
        }
    };
    let redis = match raw.redis {
        Some(r) => Some(validate_redis(r, server.workers)?),
        None => None,
    };
    if store == StoreKind::Redis && redis.is_none() {
        return Err(err(
            "cache.store",
            "\"redis\" needs a [redis] section with a master",
        ));
    }
    let memory_max_bytes = ranged(
        "cache.memory_max_bytes",
        c.memory_max_bytes,
        1 << 16,
        u64::MAX,
    )?;
    let max_object_bytes = ranged("cache.max_object_bytes", c.max_object_bytes, 1, u64::MAX)?;
    if max_object_bytes > memory_max_bytes {
        return Err(err(
            "cache.max_object_bytes",
            "must not exceed cache.memory_max_bytes",
        ));
    }
    let cache = CacheConfig {
        store,
        memory_max_bytes,
        max_object_bytes,
        max_variants: ranged("cache.max_variants", c.max_variants, 1, 1024)?,
        heuristic_max: Duration::from_millis(c.heuristic_max_ms),
        default_ttl: Duration::from_millis(c.default_ttl_ms),
        max_stale: Duration::from_millis(c.max_stale_ms),
        honor_request_cache_control: c.honor_request_cache_control,
        refresh_ahead: Duration::from_millis(c.refresh_ahead_ms),
        background_workers: ranged("cache.background_workers", c.background_workers, 1, 256)?,
        background_queue: ranged("cache.background_queue", c.background_queue, 1, 100_000)?,
        coalesce_wait: ms("cache.coalesce_wait_ms", c.coalesce_wait_ms)?,
        coalesce_max_waiters: match c.coalesce_max_waiters {
            Some(n) => ranged("cache.coalesce_max_waiters", n, 0, 100_000)?,
            None => server.workers,
        },
        coalesce_lock_ttl: ms("cache.coalesce_lock_ttl_ms", c.coalesce_lock_ttl_ms)?,
        strip_request_headers: c
            .strip_request_headers
            .iter()
            .map(|h| crate::http::fold_name(h.trim()).into_owned())
            .collect(),
    };

    let inv = &raw.invalidation;
    let invalidation = InvalidationConfig {
        queue_depth: ranged("invalidation.queue_depth", inv.queue_depth, 1, 100_000)?,
        wait_timeout: ms("invalidation.wait_timeout_ms", inv.wait_timeout_ms)?,
        ban_ttl: ms("invalidation.ban_ttl_ms", inv.ban_ttl_ms)?,
        job_timeout: ms("invalidation.job_timeout_ms", inv.job_timeout_ms)?,
    };

    let level = match raw.log.level.to_ascii_lowercase().as_str() {
        "off" => log::LevelFilter::Off,
        "error" => log::LevelFilter::Error,
        "warn" => log::LevelFilter::Warn,
        "info" => log::LevelFilter::Info,
        "debug" => log::LevelFilter::Debug,
        "trace" => log::LevelFilter::Trace,
        other => {
            return Err(err(
                "log.level",
                format!("unknown level {other:?}; use off, error, warn, info, debug or trace"),
            ))
        }
    };
    let access_log = match raw.log.access_log {
        Some(p) if p.trim().is_empty() => {
            return Err(err("log.access_log", "must be a file path (or left out)"))
        }
        p => p.map(PathBuf::from),
    };
    let log = LogConfig {
        level,
        file: raw.log.file.map(PathBuf::from),
        access_log,
    };

    Ok(Config {
        server,
        admin,
        origin,
        routes,
        cache,
        redis,
        invalidation,
        log,
    })
}

fn redis_url(key: &str, url: &str) -> Result<String, ConfigError> {
    let rest = url.strip_prefix("redis://").ok_or_else(|| {
        err(
            key,
            format!("must be a redis://host:port URL (got {url:?})"),
        )
    })?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(err(key, format!("has no host (got {url:?})")));
    }
    Ok(url.to_string())
}

fn validate_redis(r: RawRedis, workers: usize) -> Result<RedisConfig, ConfigError> {
    let master = match &r.master {
        Some(m) => redis_url("redis.master", m)?,
        None => return Err(err("redis.master", "is required in [redis]")),
    };
    let replicas = r
        .replicas
        .iter()
        .map(|u| redis_url("redis.replicas", u))
        .collect::<Result<Vec<_>, _>>()?;
    let pool_size = match r.pool_size {
        Some(n) => ranged("redis.pool_size", n, 1, 10_000)?,
        None => workers,
    };
    Ok(RedisConfig {
        master,
        replicas,
        connect_timeout: ms("redis.connect_timeout_ms", r.connect_timeout_ms)?,
        read_timeout: ms("redis.read_timeout_ms", r.read_timeout_ms)?,
        write_timeout: ms("redis.write_timeout_ms", r.write_timeout_ms)?,
        pool_size: u32::try_from(pool_size).unwrap_or(u32::MAX),
        pool_timeout: ms("redis.pool_timeout_ms", r.pool_timeout_ms)?,
        ttl_margin: Duration::from_millis(r.ttl_margin_ms),
        breaker_failures: u32::try_from(ranged(
            "redis.breaker_failures",
            r.breaker_failures,
            1,
            1000,
        )?)
        .unwrap_or(1),
        breaker_open: ms("redis.breaker_open_ms", r.breaker_open_ms)?,
        wait_replicas: match r.wait_replicas {
            Some(n) if n > r.replicas.len() as u64 => {
                return Err(err(
                    "redis.wait_replicas",
                    format!("is more than the {} replicas listed", r.replicas.len()),
                ))
            }
            other => other,
        },
        wait_timeout: ms("redis.wait_timeout_ms", r.wait_timeout_ms)?,
        scan_count: ranged("redis.scan_count", r.scan_count, 10, 100_000)?,
    })
}

fn validate_admin(a: RawAdmin, proxy: SocketAddr) -> Result<AdminConfig, ConfigError> {
    let listen = socket_addr(
        "admin.listen",
        a.listen.as_deref().unwrap_or("127.0.0.1:8081"),
    )?;
    if listen == proxy {
        return Err(err("admin.listen", "must differ from server.listen"));
    }
    let token = match (a.token, a.token_file) {
        (Some(_), Some(_)) => {
            return Err(err(
                "admin.token",
                "set admin.token or admin.token_file, not both",
            ))
        }
        (Some(t), None) => t,
        (None, Some(f)) => std::fs::read_to_string(&f)
            .map_err(|e| err("admin.token_file", format!("cannot read {f}: {e}")))?
            .trim()
            .to_string(),
        (None, None) => String::new(),
    };
    if token.trim().is_empty() {
        return Err(err(
            "admin.token",
            "must not be empty (set admin.token or admin.token_file)",
        ));
    }
    Ok(AdminConfig { listen, token })
}

fn valid_host(h: &str) -> bool {
    !h.is_empty()
        && h.bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'.' | b'-' | b'_'))
}

/// `scheme://host[:port]`, with nothing after the authority but an optional `/`.
fn server_addr(key: &str, url: &str) -> Result<ServerAddr, ConfigError> {
    let (scheme, rest) = if let Some(rest) = url.strip_prefix("http://") {
        (Scheme::Http, rest)
    } else if let Some(rest) = url.strip_prefix("https://") {
        (Scheme::Https, rest)
    } else {
        return Err(err(
            key,
            format!("must start with http:// or https:// (got {url:?})"),
        ));
    };
    let authority = rest.strip_suffix('/').unwrap_or(rest);
    if authority.is_empty()
        || authority.starts_with(':')
        || authority.contains(['/', '?', '#', '@', ' '])
        || authority.chars().any(|c| c.is_control())
    {
        return Err(err(
            key,
            format!("must be scheme://host[:port] with no path (got {url:?})"),
        ));
    }
    Ok(ServerAddr {
        scheme,
        authority: authority.to_ascii_lowercase(),
    })
}

/// Validates a service; `name` is `origin` or `route[N]`, the prefix of its keys.
fn validate_origin(name: &str, o: RawOrigin, workers: usize) -> Result<OriginConfig, ConfigError> {
    let key = |k: &str| format!("{name}.{k}");
    let servers = match (o.url, o.servers) {
        (Some(_), Some(_)) => {
            return Err(err(
                &key("servers"),
                "give url (one server) or servers, not both",
            ))
        }
        (Some(url), None) => vec![server_addr(&key("url"), &url)?],
        (None, Some(list)) if !list.is_empty() => {
            let mut servers = Vec::with_capacity(list.len());
            for url in &list {
                let addr = server_addr(&key("servers"), url)?;
                if servers.contains(&addr) {
                    return Err(err(&key("servers"), format!("{url:?} is listed twice")));
                }
                servers.push(addr);
            }
            servers
        }
        _ => {
            return Err(err(
                &key("url"),
                "is required (the passthrough service; or servers = [...])",
            ))
        }
    };
    let balance = match o.balance.as_deref() {
        None | Some("round_robin") => Balance::RoundRobin,
        Some("least_outstanding") => Balance::LeastOutstanding,
        Some(other) => {
            return Err(err(
                &key("balance"),
                format!("unknown balance {other:?}; use \"round_robin\" or \"least_outstanding\""),
            ))
        }
    };
    let health_check = match o.health_check_path {
        None => None,
        Some(path)
            if path.starts_with('/') && !path.chars().any(|c| c.is_control() || c == ' ') =>
        {
            Some(HealthCheckConfig {
                path,
                interval: ms(
                    &key("health_check_interval_ms"),
                    o.health_check_interval_ms.unwrap_or(10_000),
                )?,
                timeout: ms(
                    &key("health_check_timeout_ms"),
                    o.health_check_timeout_ms.unwrap_or(2_000),
                )?,
                fails: ranged(
                    &key("health_check_fails"),
                    o.health_check_fails.unwrap_or(3),
                    1,
                    1000,
                )? as u32,
                passes: ranged(
                    &key("health_check_passes"),
                    o.health_check_passes.unwrap_or(2),
                    1,
                    1000,
                )? as u32,
            })
        }
        Some(path) => {
            return Err(err(
                &key("health_check_path"),
                format!("must be a path starting with / (got {path:?})"),
            ))
        }
    };
    if let Some(path) = &o.ca_file {
        match std::fs::read_to_string(path) {
            Ok(text) if text.contains("-----BEGIN CERTIFICATE-----") => {}
            Ok(_) => {
                return Err(err(
                    &key("ca_file"),
                    format!("{} holds no PEM certificate", path.display()),
                ))
            }
            Err(e) => {
                return Err(err(
                    &key("ca_file"),
                    format!("cannot read {}: {e}", path.display()),
                ))
            }
        }
    }
    Ok(OriginConfig {
        name: name.to_string(),
        retries: ranged(&key("retries"), o.retries.unwrap_or(1), 0, 100)?,
        servers,
        balance,
        max_fails: ranged(&key("max_fails"), o.max_fails.unwrap_or(3), 0, 1000)? as u32,
        fail_timeout: ms(&key("fail_timeout_ms"), o.fail_timeout_ms.unwrap_or(10_000))?,
        health_check,
        preserve_host: o.preserve_host.unwrap_or(false),
        ca_file: o.ca_file,
        connect_timeout: ms(
            &key("connect_timeout_ms"),
            o.connect_timeout_ms.unwrap_or(2_000),
        )?,
        response_timeout: ms(
            &key("response_timeout_ms"),
            o.response_timeout_ms.unwrap_or(30_000),
        )?,
        read_timeout: ms(&key("read_timeout_ms"), o.read_timeout_ms.unwrap_or(30_000))?,
        send_timeout: ms(&key("send_timeout_ms"), o.send_timeout_ms.unwrap_or(30_000))?,
        total_timeout: match o.total_timeout_ms {
            None => None,
            Some(v) => Some(ms(&key("total_timeout_ms"), v)?),
        },
        max_idle_connections: match o.max_idle_connections {
            Some(n) => ranged(&key("max_idle_connections"), n, 0, 100_000)?,
            None => workers,
        },
    })
}

// ---------------------------------------------------------------------------------------
// Locating keys in the file, so every error can say where.

fn line_of(text: &str, offset: usize) -> usize {
    let end = offset.min(text.len());
    text.as_bytes()[..end]
        .iter()
        .filter(|&&b| b == b'\n')
        .count()
        + 1
}

/// Every `(dotted.key, span of key..end of value)` in the document, depth first.
fn spans(text: &str) -> Vec<(String, std::ops::Range<usize>)> {
    fn walk(
        prefix: &str,
        table: &toml::de::DeTable<'_>,
        out: &mut Vec<(String, std::ops::Range<usize>)>,
    ) {
        for (k, v) in table.iter() {
            let name = if prefix.is_empty() {
                k.get_ref().to_string()
            } else {
                format!("{prefix}.{}", k.get_ref())
            };
            let span = k.span().start.min(v.span().start)..v.span().end.max(k.span().end);
            out.push((name.clone(), span));
            if let Some(t) = v.get_ref().as_table() {
                walk(&name, t, out);
            }
            // `[[route]]` tables: `route[0].path_prefix`, ...
            if let Some(items) = v.get_ref().as_array() {
                for (i, item) in items.iter().enumerate() {
                    if let Some(t) = item.get_ref().as_table() {
                        let item_name = format!("{name}[{i}]");
                        out.push((item_name.clone(), item.span()));
                        walk(&item_name, t, out);
                    }
                }
            }
        }
    }
    let mut out = Vec::new();
    if let Ok(doc) = toml::de::DeTable::parse(text) {
        walk("", doc.get_ref(), &mut out);
    }
    out
}

/// The line of `key`, or of the closest table holding it when the key is missing
/// (`route[0].url` not given: the line of `route[0]`).
fn line_of_key(text: &str, key: &str) -> Option<usize> {
    let spans = spans(text);
    let mut key = key;
    loop {
        if let Some((_, s)) = spans.iter().find(|(k, _)| k == key) {
            return Some(line_of(text, s.start));
        }
        key = &key[..key.rfind('.')?];
    }
}

/// The innermost key whose span holds `offset`, e.g. the key of a value of the wrong type.
fn key_at(text: &str, offset: usize) -> Option<String> {
    spans(text)
        .into_iter()
        .filter(|(_, s)| s.start <= offset && offset < s.end.max(s.start + 1))
        .min_by_key(|(_, s)| s.end - s.start)
        .map(|(k, _)| k)
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[origin]\nurl = \"http://127.0.0.1:9000\"\n";

    #[test]
    fn defaults_are_valid() {
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.server.workers, 64);
        assert_eq!(c.origin.servers.len(), 1);
        assert_eq!(c.origin.servers[0].authority, "127.0.0.1:9000");
        assert_eq!(c.origin.servers[0].base_url(), "http://127.0.0.1:9000");
        assert!(c.routes.is_empty());
        assert_eq!(c.origin.max_idle_connections, 64);
        assert!(c.admin.is_none());
        assert_eq!(c.invalidation.job_timeout, Duration::from_secs(300));
        let _ = ServerConfig::default();
    }

    #[test]
    fn the_shipped_config_parses() {
        let text = include_str!("../etc/echo.toml");
        let c = Config::parse(text).unwrap();
        assert_eq!(c.cache.store, StoreKind::Memory);
        assert!(c.admin.is_some());
    }

    #[test]
    fn errors_name_key_and_line() {
        let cases: &[(&str, &str, usize)] = &[
            ("[server]\nworkers = 0\n[origin]\nurl = \"http://a\"\n", "server.workers", 2),
            ("[origin]\nurl = \"ftp://a\"\n", "origin.url", 2),
            ("[server]\n\nworkers = \"many\"\n", "server.workers", 3),
            ("[origin]\nurl = \"http://a\"\n[log]\nlevel = \"loud\"\n", "log.level", 4),
            (
                "[origin]\nurl = \"http://a\"\n[cache]\nmemory_max_bytes = 70000\nmax_object_bytes = 80000\n",
                "cache.max_object_bytes",
                5,
            ),
            ("[origin]\nurl = \"http://a\"\n[admin]\ntoken = \" \"\n", "admin.token", 4),
            ("[origin]\nurl = \"http://a\"\n[cache]\nstore = \"disk\"\n", "cache.store", 4),
            (
                "[origin]\nurl = \"http://a\"\n[invalidation]\njob_timeout_ms = 0\n",
                "invalidation.job_timeout_ms",
                4,
            ),
            ("[origin]\nurl = \"http://a\"\n[cache]\nstore = \"redis\"\n", "cache.store", 4),
            ("[origin]\nurl = \"http://a\"\n[redis]\nmaster = \"http://r\"\n", "redis.master", 4),
            (
                "[origin]\nurl = \"http://a\"\n[redis]\nmaster = \"redis://r\"\nreplicas = [\"r2:6380\"]\n",
                "redis.replicas",
                5,
            ),
            (
                "[origin]\nurl = \"http://a\"\nservers = [\"http://b\"]\n",
                "origin.servers",
                3,
            ),
            ("[origin]\nservers = [\"http://a\", \"b\"]\n", "origin.servers", 2),
            ("[origin]\nurl = \"http://a\"\npath_prefix = \"/x\"\n", "origin.path_prefix", 3),
            ("[origin]\nurl = \"http://a\"\nbalance = \"random\"\n", "origin.balance", 3),
            (
                "[origin]\nurl = \"http://a\"\nhealth_check_path = \"health\"\n",
                "origin.health_check_path",
                3,
            ),
            (
                "[origin]\nurl = \"http://a\"\n[[route]]\npath_prefix = \"/api/\"\n",
                "route[0].url",
                3,
            ),
            (
                "[origin]\nurl = \"http://a\"\n[[route]]\npath_prefix = \"/a/\"\nurl = \"http://b\"\n[[route]]\npath_prefix = \"api\"\nurl = \"http://c\"\n",
                "route[1].path_prefix",
                7,
            ),
            (
                "[origin]\nurl = \"http://a\"\n[[route]]\npath_prefix = \"/a/\"\nhost = \"x.com:80\"\nurl = \"http://b\"\n",
                "route[0].host",
                5,
            ),
            (
                "[origin]\nurl = \"http://a\"\n[[route]]\npath_prefix = \"/a/\"\nurl = \"http://b\"\nca_file = \"/nonexistent.pem\"\n",
                "route[0].ca_file",
                6,
            ),
        ];
        for (text, key, line) in cases {
            let e = Config::parse(text).unwrap_err();
            assert_eq!(e.key.as_deref(), Some(*key), "{text}: {e}");
            assert_eq!(e.line, Some(*line), "{text}: {e}");
        }
    }

    #[test]
    fn routes_inherit_the_origin_settings_they_do_not_set() {
        let c = Config::parse(
            "[origin]\nservers = [\"http://a:1\", \"https://B:2/\"]\nbalance = \"least_outstanding\"\n\
             connect_timeout_ms = 111\nhealth_check_path = \"/hc\"\nretries = 3\n\
             [[route]]\npath_prefix = \"/api/\"\nhost = \"Api.Example\"\nurl = \"http://c:3\"\n\
             connect_timeout_ms = 222\npreserve_host = true\n",
        )
        .unwrap();
        assert_eq!(c.origin.servers[1].scheme, Scheme::Https);
        assert_eq!(c.origin.servers[1].authority, "b:2");
        assert!(c.origin.health_check.is_some());
        let r = &c.routes[0];
        assert_eq!(r.host.as_deref(), Some("api.example"));
        assert_eq!(r.origin.name, "route[0]");
        assert_eq!(r.origin.balance, Balance::LeastOutstanding);
        assert_eq!(r.origin.retries, 3);
        assert_eq!(r.origin.connect_timeout, Duration::from_millis(222));
        assert!(r.origin.preserve_host);
        assert!(!c.origin.preserve_host);
        // The health check belongs to the service it names.
        assert!(r.origin.health_check.is_none());
    }

    #[test]
    fn unknown_keys_are_refused_with_their_line() {
        let e = Config::parse("[origin]\nurl = \"http://a\"\n[server]\nwokers = 3\n").unwrap_err();
        assert!(e.message.contains("wokers"), "{e}");
        assert_eq!(e.line, Some(4));
    }

    #[test]
    fn missing_origin_is_an_error() {
        let e = Config::parse("").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("origin.url"));
    }

    #[test]
    fn syntax_errors_have_a_line() {
        let e = Config::parse("[server]\nworkers = = 3\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
    }
}
