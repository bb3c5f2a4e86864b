//! Configuration: the TOML file mirrored as-is, then validated once into the typed
//! [`Config`] the rest of Echo uses.
//!
//! Owns: the typed sections ([`Config`], [`ServerConfig`], [`CacheConfig`], ...), their
//! `Default`s where a section can stand without the file, [`Config::load`] /
//! [`Config::parse`] and [`ConfigError`]. The mirror and every default are in `raw.rs`,
//! the checks in `validate.rs`, finding a key's line in `locate.rs`.
//!
//! Invariants: every default lives in `raw.rs`, once; a typed section's `Default` is the
//! raw section's default put through validation, never a second copy of the values.
//! Every duration is a [`Duration`] after validation (only the TOML keys carry units,
//! `_ms`); every error names the offending key and, when the file has it, its line.
//! Typed sections are plain comparable data (`PartialEq`, `Eq`): a reload compares them.
//! Config is at the bottom of the crate: it imports no other Echo module.
//! `etc/echo.toml` documents every key and a test parses it.

mod locate;
mod raw;
mod validate;
mod validate_cache;
mod validate_redis;

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

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
// Typed: what the program uses.

/// The most header fields a request may have: the ceiling of `server.max_headers`, and
/// the number of slots the request parser keeps on its stack (256 × 32 bytes).
pub(crate) const MAX_HEADERS_CAP: usize = 256;

#[derive(Debug, Clone, PartialEq)]
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
    /// The file as written, for telling which keys a reload changes.
    pub source: Source,
}

/// A config file's keys as written (defaults not filled in).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Source(toml::Table);

impl Source {
    /// The dotted keys whose values differ between `self` and `newer` (added, removed
    /// or changed; `[[route]]` lists compare whole, as `route`).
    pub fn changed_keys(&self, newer: &Source) -> Vec<String> {
        fn diff(
            key: &str,
            a: Option<&toml::Value>,
            b: Option<&toml::Value>,
            out: &mut Vec<String>,
        ) {
            let empty = toml::Value::Table(toml::Table::new());
            // A section added or removed: its keys, one by one.
            let (a, b) = match (a, b) {
                (None, Some(t @ toml::Value::Table(_))) => (Some(&empty), Some(t)),
                (Some(t @ toml::Value::Table(_)), None) => (Some(t), Some(&empty)),
                other => other,
            };
            match (a, b) {
                (Some(toml::Value::Table(a)), Some(toml::Value::Table(b))) => {
                    let mut names: Vec<&String> = a.keys().chain(b.keys()).collect();
                    names.sort();
                    names.dedup();
                    for name in names {
                        let sub = if key.is_empty() {
                            name.clone()
                        } else {
                            format!("{key}.{name}")
                        };
                        diff(&sub, a.get(name), b.get(name), out);
                    }
                }
                (a, b) if a != b => out.push(key.to_string()),
                _ => {}
            }
        }
        let mut out = Vec::new();
        let (a, b) = (
            toml::Value::Table(self.0.clone()),
            toml::Value::Table(newer.0.clone()),
        );
        diff("", Some(&a), Some(&b), &mut out);
        out
    }
}

/// The invalidation API and thread.
#[derive(Debug, Clone, PartialEq, Eq)]
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

/// `[invalidation]` as the file has it when the section is left out.
impl Default for InvalidationConfig {
    fn default() -> Self {
        // The defaults are valid by construction; a test checks it.
        validate::validate_invalidation(&raw::RawInvalidation::default())
            .unwrap_or_else(|e| panic!("default invalidation config invalid: {e}"))
    }
}

/// The Redis store: where it is and how long Echo waits for it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RedisConfig {
    /// Where the master and the replicas are.
    pub servers: RedisServers,
    /// Username and password for the servers Sentinel names (listed URLs carry their own).
    pub username: Option<String>,
    pub password: Option<String>,
    /// Connect to the servers Sentinel names over TLS (listed URLs say so by `rediss://`).
    pub tls: bool,
    /// PEM roots trusted for TLS instead of the system's.
    pub ca_file: Option<PathBuf>,
    /// A replica further behind its master than this is not read from.
    pub max_replica_lag: Duration,
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
    /// Tag-set members (or keys walked) checked per second while the invalidation
    /// thread idles, trimming tag sets of gone entries; 0: never.
    pub tag_sweep_per_sec: usize,
    /// The in-process tier in front of Redis: its bound in bytes (0: no tier) ...
    pub local_cache_max_bytes: usize,
    /// ... and the longest it holds an entry (never past the entry's freshness).
    pub local_cache_max_ttl: Duration,
}

/// Where Echo finds the Redis master and its replicas.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RedisServers {
    /// Listed: `redis[s]://[[user]:password@]host:port[/db]` URLs.
    Listed {
        /// Writes, deletes, and reads of last resort.
        master: String,
        /// Read from these, round robin; empty: read from the master.
        replicas: Vec<String>,
    },
    /// Discovered from Sentinel, and followed through failovers.
    Sentinel {
        /// The sentinels' URLs (a password in one is the sentinel's own).
        sentinels: Vec<String>,
        /// The name they monitor the master under.
        master_name: String,
    },
}

/// One address a listener is bound to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ListenAddr {
    Tcp(SocketAddr),
    /// `unix:/path`: a Unix stream socket.
    Unix(PathBuf),
}

impl std::fmt::Display for ListenAddr {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ListenAddr::Tcp(addr) => write!(f, "{addr}"),
            ListenAddr::Unix(path) => write!(f, "unix:{}", path.display()),
        }
    }
}

/// The HTTP front end: listener, worker pool, limits and client-side timeouts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerConfig {
    /// Every address the proxy listens on (at least one).
    pub listen: Vec<ListenAddr>,
    /// The permissions of the Unix sockets it creates.
    pub unix_socket_mode: u32,
    /// Connections from `trusted_proxies` start with a PROXY protocol header (v1 or
    /// v2) naming the client; one from anyone else that sends it is closed.
    pub proxy_protocol: bool,
    pub trusted_proxies: Vec<ipnet::IpNet>,
    /// Threads that own the client connections (reads, parsing, inline answers,
    /// writes); 0 in the file is one per core.
    pub io_threads: usize,
    pub workers: usize,
    /// Threads of the fetch stage: requests waiting on the origin.
    pub fetch_workers: usize,
    /// Requests waiting for a fetch worker; more are answered 503.
    pub fetch_queue: usize,
    /// On SIGTERM/SIGINT, how long requests in flight get to finish.
    pub drain_timeout: Duration,
    /// After SIGTERM, how long Echo keeps accepting and serving while `/ready` says 503
    /// (so balancers polling it stop sending first); zero: stop accepting at once.
    pub drain_grace: Duration,
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

/// `[server]` as the file has it when the section is left out: [`raw::RawServer`]'s
/// defaults, validated.
impl Default for ServerConfig {
    fn default() -> Self {
        // The defaults are valid by construction; a test checks it.
        validate::validate_server(&raw::RawServer::default())
            .unwrap_or_else(|e| panic!("default server config invalid: {e}"))
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminConfig {
    pub listen: SocketAddr,
    pub token: String,
    /// A read-only token (`/metrics`, `GET /cache`, job status), if set.
    pub metrics_token: Option<String>,
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
#[derive(Debug, Clone, PartialEq, Eq)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
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

#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// Serve a stored response this long past freshness when the origin fails (where
    /// its fields allow serving stale); zero: only as its stale-if-error says.
    pub stale_if_error: Duration,
    /// Targeted cache-control fields (RFC 9213), first present and valid wins; lower
    /// case.
    pub targeted_cache_control: Vec<String>,
    /// Read `Surrogate-Control` (max-age, no-store) when no targeted field applies.
    pub surrogate_control: bool,
    /// Content codings a request's `Accept-Encoding` is normalised to, in preference
    /// order (lower case); empty: sent as the client wrote it.
    pub normalize_accept_encoding: Vec<String>,
    /// Codings compressible responses are stored in (the first is used); empty: off.
    pub compress: Vec<String>,
    /// Send `X-Cache-Status` and `Cache-Status` to clients.
    pub expose_status_headers: bool,
    /// Remove `Surrogate-Key` from responses before they leave Echo.
    pub strip_surrogate_key: bool,
    /// Refresh an entry read within this long of its expiry in the background; zero: off.
    pub refresh_ahead: Duration,
    /// Threads and queue for background refreshes (stale-while-revalidate, refresh-ahead).
    pub background_workers: usize,
    pub background_queue: usize,
    /// The lease of the cross-node fill lock (Redis): renewed while its holder fetches,
    /// so a holder that dies is noticed within one.
    pub coalesce_lock_ttl: Duration,
    /// How long a key whose answer may not be shared is remembered as such
    /// (hit-for-pass: its requests go to the origin side by side); zero: never.
    pub uncacheable_ttl: Duration,
    /// Retired keys the file still sets (`cache.coalesce_wait_ms`,
    /// `cache.coalesce_max_waiters`): ignored, named in a warning at start.
    pub retired: Vec<&'static str>,
    /// Request fields removed from requests that may fill the cache (folded: lower
    /// case, `_` as `-`).
    pub strip_request_headers: Vec<String>,
}

/// `[cache]` as the file has it when the section is left out: the defaults a component
/// or a test takes instead of inventing its own.
impl Default for CacheConfig {
    fn default() -> Self {
        // The defaults are valid by construction; a test checks it.
        validate_cache::validate_cache(&raw::RawCache::default())
            .unwrap_or_else(|e| panic!("default cache config invalid: {e}"))
    }
}

/// How lines are written (`log.access_format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum AccessFormat {
    /// One space-separated line, the request line and the client's fields quoted.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogConfig {
    pub level: log::LevelFilter,
    /// The level of dependencies' log records (`log.dependencies`).
    pub dependencies: log::LevelFilter,
    /// How access log lines are written.
    pub access_format: AccessFormat,
    pub file: Option<PathBuf>,
    /// One line per answered request; reopened on SIGHUP. None: no access log.
    pub access_log: Option<PathBuf>,
}

/// `[log]` as the file has it when the section is left out: `info`, to stderr, no
/// access log.
impl Default for LogConfig {
    fn default() -> Self {
        // The defaults are valid by construction; a test checks it.
        validate::validate_log(raw::RawLog::default())
            .unwrap_or_else(|e| panic!("default log config invalid: {e}"))
    }
}

/// The TOML reader's messages, with its Rust type names said in words ("expected u64"
/// is "expected a whole number, 0 or more").
fn in_words(message: &str) -> String {
    [
        ("expected u64", "expected a whole number, 0 or more"),
        (
            "expected u32",
            "expected a whole number from 0 to 4294967295",
        ),
        ("expected u16", "expected a whole number from 0 to 65535"),
        ("expected usize", "expected a whole number, 0 or more"),
        ("expected i64", "expected a whole number"),
        ("expected a boolean", "expected true or false"),
    ]
    .iter()
    .fold(message.to_string(), |m, (from, to)| m.replace(from, to))
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
        let source = Source(toml::from_str(text).unwrap_or_default());
        let raw: raw::RawConfig = toml::from_str(text).map_err(|e| {
            let line = e.span().map(|s| locate::line_of(text, s.start));
            let key = e
                .span()
                .and_then(|s| locate::key_at(text, s.start))
                // A document that does not parse (a duplicate key) has no key spans:
                // the key is read off its line.
                .or_else(|| line.and_then(|l| locate::key_on_line(text, l)));
            ConfigError {
                key,
                line,
                message: in_words(e.message().trim()),
            }
        })?;
        let mut cfg = validate::validate(raw).map_err(|mut e| {
            if e.line.is_none() {
                if let Some(key) = &e.key {
                    e.line = locate::line_of_key(text, key);
                }
            }
            e
        })?;
        cfg.source = source;
        Ok(cfg)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const MINIMAL: &str = "[origin]\nurl = \"http://127.0.0.1:9000\"\n";

    #[test]
    fn retired_coalescing_keys_are_accepted_and_named() {
        let c = Config::parse(&format!(
            "{MINIMAL}[cache]\ncoalesce_wait_ms = 300\ncoalesce_max_waiters = 8\n\
             uncacheable_ttl_ms = 0\n"
        ))
        .unwrap();
        assert_eq!(
            c.cache.retired,
            ["cache.coalesce_wait_ms", "cache.coalesce_max_waiters"]
        );
        assert_eq!(
            c.cache.uncacheable_ttl,
            Duration::ZERO,
            "0 turns hit-for-pass off"
        );
        assert!(Config::parse(MINIMAL).unwrap().cache.retired.is_empty());
        let short = Config::parse(&format!("{MINIMAL}[cache]\ncoalesce_lock_ttl_ms = 50\n"));
        assert!(
            short.is_err_and(|e| e.to_string().contains("cache.coalesce_lock_ttl_ms")),
            "a lease too short to renew is refused"
        );
    }

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
        let text = include_str!("../../etc/echo.toml");
        let c = Config::parse(text).unwrap();
        assert_eq!(c.cache.store, StoreKind::Memory);
        assert!(c.admin.is_some());
    }

    #[test]
    fn unknown_keys_are_refused_with_their_line() {
        let e = Config::parse("[origin]\nurl = \"http://a\"\n[server]\nwokers = 3\n").unwrap_err();
        assert!(e.message.contains("wokers"), "{e}");
        assert_eq!(e.line, Some(4));
    }

    #[test]
    fn syntax_errors_have_a_line() {
        let e = Config::parse("[server]\nworkers = = 3\n").unwrap_err();
        assert_eq!(e.line, Some(2), "{e}");
    }

    #[test]
    fn typed_defaults_are_the_files_defaults() {
        // A section's `Default` is what a file without that section gets, so a component
        // or test taking `CacheConfig::default()` runs as an unconfigured Echo does.
        let c = Config::parse(MINIMAL).unwrap();
        assert_eq!(c.server, ServerConfig::default());
        assert_eq!(c.cache, CacheConfig::default());
        assert_eq!(c.invalidation, InvalidationConfig::default());
        assert_eq!(c.log, LogConfig::default());
        assert_eq!(c.cache.coalesce_lock_ttl, Duration::from_secs(1));
        assert_eq!(c.cache.uncacheable_ttl, Duration::from_secs(30));
        assert_eq!(c.cache.strip_request_headers, raw::DEFAULT_STRIPPED);
    }

    #[test]
    fn a_reload_sees_a_change_in_any_typed_value() {
        let a = Config::parse(MINIMAL).unwrap();
        let b = Config::parse(&format!("{MINIMAL}[cache]\nmax_variants = 17\n")).unwrap();
        assert_eq!(a.cache, Config::parse(MINIMAL).unwrap().cache);
        assert_ne!(a.cache, b.cache);
        assert_eq!(a.origin, b.origin);
    }
}
