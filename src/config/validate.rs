//! Validation: the raw mirror of the file (`raw.rs`) checked once into the typed
//! sections (`mod.rs`).
//!
//! Owns: every check on a value (ranges, addresses, URLs, cross-key rules such as
//! `admin.listen` ≠ `server.listen`), the conversion of `_ms` keys to [`Duration`]s, and
//! the order in which errors are found (the first one found is the one reported).
//!
//! Invariants: every error names its dotted key (`route[1].path_prefix`); the line is
//! added by `Config::parse`. No default is invented here: an unset key's value comes from
//! `raw.rs`. A section checked here alone (`validate_server`, `validate_cache`, ...) is
//! also how that section's typed `Default` is built, so the defaults are valid by
//! construction and a test checks it.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use super::raw::{
    OriginDefaults, RawAdmin, RawConfig, RawInvalidation, RawListen, RawLog, RawOrigin, RawServer,
};
use super::validate_cache::{store_kind, validate_cache};
use super::{
    AdminConfig, Balance, Config, ConfigError, HealthCheckConfig, InvalidationConfig, ListenAddr,
    LogConfig, OriginConfig, RouteConfig, Scheme, ServerAddr, ServerConfig, StoreKind,
    MAX_HEADERS_CAP,
};

pub(super) fn err(key: &str, message: impl Into<String>) -> ConfigError {
    ConfigError {
        key: Some(key.to_string()),
        line: None,
        message: message.into(),
    }
}

pub(super) fn ms(key: &str, value: u64) -> Result<Duration, ConfigError> {
    if value == 0 {
        return Err(err(key, "must be greater than 0"));
    }
    Ok(Duration::from_millis(value))
}

pub(super) fn ranged(key: &str, value: u64, min: u64, max: u64) -> Result<usize, ConfigError> {
    if value < min || value > max {
        let range = if max == u64::MAX {
            format!("must be at least {min}")
        } else {
            format!("must be between {min} and {max}")
        };
        return Err(err(key, format!("{range} (got {value})")));
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

/// The whole file: each section in the file's order of dependence, so a file with
/// several mistakes always reports the same one first.
pub(super) fn validate(raw: RawConfig) -> Result<Config, ConfigError> {
    let server = validate_server(&raw.server)?;
    if server.max_target_bytes > server.max_header_bytes {
        return Err(err(
            "server.max_target_bytes",
            "must not exceed server.max_header_bytes",
        ));
    }

    let admin = match raw.admin {
        None => None,
        Some(a) => Some(validate_admin(a, &server.listen)?),
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

    // `cache.store` is checked before `[redis]`, and `[redis]` before the rest of
    // `[cache]`: the order errors have always been reported in.
    let store = store_kind(&raw.cache.store)?;
    let redis = match raw.redis {
        Some(r) => Some(super::validate_redis::validate_redis(r, server.workers)?),
        None => None,
    };
    if store == StoreKind::Redis && redis.is_none() {
        return Err(err(
            "cache.store",
            "\"redis\" needs a [redis] section with a master",
        ));
    }
    let cache = validate_cache(&raw.cache)?;
    let invalidation = validate_invalidation(&raw.invalidation)?;
    let log = validate_log(raw.log)?;

    Ok(Config {
        server,
        admin,
        origin,
        routes,
        cache,
        redis,
        invalidation,
        log,
        source: super::Source::default(),
    })
}

/// `server.listen`: one address or a list (`ip:port`, or `unix:` and an absolute path),
/// none twice.
fn listen_addresses(listen: &RawListen) -> Result<Vec<ListenAddr>, ConfigError> {
    let (texts, keys): (Vec<&String>, Vec<String>) = match listen {
        RawListen::One(text) => (vec![text], vec!["server.listen".to_string()]),
        RawListen::Many(list) => list
            .iter()
            .enumerate()
            .map(|(i, text)| (text, format!("server.listen[{i}]")))
            .unzip(),
    };
    if texts.is_empty() {
        return Err(err("server.listen", "names no address"));
    }
    let mut addrs: Vec<ListenAddr> = Vec::with_capacity(texts.len());
    for (text, key) in texts.into_iter().zip(keys) {
        let addr = match text.strip_prefix("unix:") {
            Some(path) if path.starts_with('/') => ListenAddr::Unix(PathBuf::from(path)),
            Some(_) => {
                return Err(err(
                    &key,
                    format!("{text:?}: a Unix socket needs an absolute path (unix:/run/echo.sock)"),
                ))
            }
            None => ListenAddr::Tcp(socket_addr(&key, text)?),
        };
        if addrs.contains(&addr) {
            return Err(err(&key, format!("{addr} is listed twice")));
        }
        addrs.push(addr);
    }
    Ok(addrs)
}

/// `server.trusted_proxies`: networks or single addresses, and at least one when
/// `server.proxy_protocol` is on (a header believed from anyone names any client).
fn trusted_proxies(s: &RawServer) -> Result<Vec<ipnet::IpNet>, ConfigError> {
    let nets = s
        .trusted_proxies
        .iter()
        .enumerate()
        .map(|(i, text)| {
            text.parse::<ipnet::IpNet>()
                .or_else(|_| text.parse::<std::net::IpAddr>().map(ipnet::IpNet::from))
                .map_err(|_| {
                    err(
                        &format!("server.trusted_proxies[{i}]"),
                        format!("{text:?} is not an address or a network (10.0.0.0/8)"),
                    )
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    if s.proxy_protocol && nets.is_empty() {
        return Err(err(
            "server.trusted_proxies",
            "must name the balancers when server.proxy_protocol is on",
        ));
    }
    Ok(nets)
}

pub(super) fn validate_server(s: &RawServer) -> Result<ServerConfig, ConfigError> {
    Ok(ServerConfig {
        listen: listen_addresses(&s.listen)?,
        unix_socket_mode: match s.unix_socket_mode {
            mode if mode <= 0o777 => mode,
            mode => {
                return Err(err(
                    "server.unix_socket_mode",
                    format!("must be permission bits like 0o660 (got {mode:#o})"),
                ))
            }
        },
        proxy_protocol: s.proxy_protocol,
        trusted_proxies: trusted_proxies(s)?,
        io_threads: match ranged("server.io_threads", s.io_threads, 0, 256)? {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        },
        workers: ranged("server.workers", s.workers, 1, 4096)?,
        fetch_workers: ranged("server.fetch_workers", s.fetch_workers, 1, 4096)?,
        fetch_queue: ranged("server.fetch_queue", s.fetch_queue, 1, 1_000_000)?,
        drain_timeout: ms("server.drain_timeout_ms", s.drain_timeout_ms)?,
        drain_grace: Duration::from_millis(ranged(
            "server.drain_grace_ms",
            s.drain_grace_ms,
            0,
            600_000,
        )? as u64),
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
            MAX_HEADERS_CAP as u64,
        )?,
        max_target_bytes: ranged("server.max_target_bytes", s.max_target_bytes, 64, 1 << 20)?,
        // 0 would refuse every request body (every POST and PUT a 413).
        max_body_bytes: ranged("server.max_body_bytes", s.max_body_bytes, 1, u64::MAX)? as u64,
        min_rate_bytes_per_sec: ranged(
            "server.min_rate_bytes_per_sec",
            s.min_rate_bytes_per_sec,
            1,
            u64::MAX,
        )? as u64,
        underscores_in_headers: s.underscores_in_headers,
    })
}

/// The admin token of the example config (`etc/echo.toml`).
const EXAMPLE_TOKEN: &str = "change-me";

fn validate_admin(a: RawAdmin, proxy: &[ListenAddr]) -> Result<AdminConfig, ConfigError> {
    let listen = socket_addr("admin.listen", &a.listen)?;
    if proxy.contains(&ListenAddr::Tcp(listen)) {
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
    // The example config's token is public knowledge: anyone who can reach a
    // non-loopback admin listener could purge the cache with it.
    if token == EXAMPLE_TOKEN && !listen.ip().is_loopback() {
        return Err(err(
            "admin.token",
            format!(
                "{EXAMPLE_TOKEN:?} is the example token and is refused when admin.listen is \
                 not a loopback address; set a secret (make install writes one to \
                 etc/token, for admin.token_file)"
            ),
        ));
    }
    let metrics_token = match a.metrics_token {
        Some(t) if t.trim().is_empty() => {
            return Err(err("admin.metrics_token", "must not be empty when set"))
        }
        Some(t) if t == token => {
            return Err(err(
                "admin.metrics_token",
                "must differ from admin.token (it only reads)",
            ))
        }
        other => other,
    };
    Ok(AdminConfig {
        listen,
        token,
        metrics_token,
    })
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
    // A port, when given, is 1-65535 (RFC 9110 §4.1: port = *DIGIT, and TCP's range).
    let port = match authority.strip_prefix('[') {
        Some(v6) => v6
            .split_once(']')
            .and_then(|(_, after)| after.strip_prefix(':')),
        None => authority.rsplit_once(':').map(|(_, port)| port),
    };
    if let Some(port) = port {
        if port.parse::<u16>().map_or(true, |p| p == 0) {
            return Err(err(
                key,
                format!("the port must be a number from 1 to 65535 (got {port:?} in {url:?})"),
            ));
        }
    }
    Ok(ServerAddr {
        scheme,
        authority: authority.to_ascii_lowercase(),
    })
}

/// Validates a service; `name` is `origin` or `route[N]`, the prefix of its keys. A
/// route's `o` has already inherited `[origin]`'s settings; what neither sets comes from
/// [`OriginDefaults`].
fn validate_origin(name: &str, o: RawOrigin, workers: usize) -> Result<OriginConfig, ConfigError> {
    let d = OriginDefaults::default();
    let key = |k: &str| format!("{name}.{k}");
    let servers = match (o.url.clone(), o.servers.clone()) {
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
    let balance = match o.balance.as_deref().unwrap_or(d.balance) {
        "round_robin" => Balance::RoundRobin,
        "least_outstanding" => Balance::LeastOutstanding,
        other => {
            return Err(err(
                &key("balance"),
                format!("unknown balance {other:?}; use \"round_robin\" or \"least_outstanding\""),
            ))
        }
    };
    let health_check = match &o.health_check_path {
        None => None,
        Some(path)
            if path.starts_with('/') && !path.chars().any(|c| c.is_control() || c == ' ') =>
        {
            Some(HealthCheckConfig {
                path: path.clone(),
                interval: ms(
                    &key("health_check_interval_ms"),
                    o.health_check_interval_ms
                        .unwrap_or(d.health_check_interval_ms),
                )?,
                timeout: ms(
                    &key("health_check_timeout_ms"),
                    o.health_check_timeout_ms
                        .unwrap_or(d.health_check_timeout_ms),
                )?,
                fails: ranged(
                    &key("health_check_fails"),
                    o.health_check_fails.unwrap_or(d.health_check_fails),
                    1,
                    1000,
                )? as u32,
                passes: ranged(
                    &key("health_check_passes"),
                    o.health_check_passes.unwrap_or(d.health_check_passes),
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
        retries: ranged(&key("retries"), o.retries.unwrap_or(d.retries), 0, 100)?,
        servers,
        balance,
        max_fails: ranged(
            &key("max_fails"),
            o.max_fails.unwrap_or(d.max_fails),
            0,
            1000,
        )? as u32,
        fail_timeout: ms(
            &key("fail_timeout_ms"),
            o.fail_timeout_ms.unwrap_or(d.fail_timeout_ms),
        )?,
        health_check,
        preserve_host: o.preserve_host.unwrap_or(d.preserve_host),
        connect_timeout: ms(
            &key("connect_timeout_ms"),
            o.connect_timeout_ms.unwrap_or(d.connect_timeout_ms),
        )?,
        response_timeout: ms(
            &key("response_timeout_ms"),
            o.response_timeout_ms.unwrap_or(d.response_timeout_ms),
        )?,
        read_timeout: ms(
            &key("read_timeout_ms"),
            o.read_timeout_ms.unwrap_or(d.read_timeout_ms),
        )?,
        send_timeout: ms(
            &key("send_timeout_ms"),
            o.send_timeout_ms.unwrap_or(d.send_timeout_ms),
        )?,
        total_timeout: match o.total_timeout_ms {
            None => None,
            Some(v) => Some(ms(&key("total_timeout_ms"), v)?),
        },
        max_idle_connections: ranged(
            &key("max_idle_connections"),
            o.max_idle_connections_or_workers(workers as u64),
            0,
            100_000,
        )?,
        ca_file: o.ca_file,
    })
}

pub(super) fn validate_invalidation(
    inv: &RawInvalidation,
) -> Result<InvalidationConfig, ConfigError> {
    Ok(InvalidationConfig {
        queue_depth: ranged("invalidation.queue_depth", inv.queue_depth, 1, 100_000)?,
        wait_timeout: ms("invalidation.wait_timeout_ms", inv.wait_timeout_ms)?,
        ban_ttl: ms("invalidation.ban_ttl_ms", inv.ban_ttl_ms)?,
        job_timeout: ms("invalidation.job_timeout_ms", inv.job_timeout_ms)?,
    })
}

/// Can a log file be kept at `path`: its directory exists, and the file, when it
/// exists, is a writable regular file? (Nothing is created here.)
fn writable_place(key: &str, path: &std::path::Path) -> Result<(), ConfigError> {
    let dir = match path.parent() {
        Some(d) if !d.as_os_str().is_empty() => d,
        _ => std::path::Path::new("."),
    };
    if !dir.is_dir() {
        return Err(err(
            key,
            format!(
                "the directory of {} does not exist (create it, writable by echod's user)",
                path.display()
            ),
        ));
    }
    if let Ok(meta) = std::fs::metadata(path) {
        if !meta.is_file() || meta.permissions().readonly() {
            return Err(err(
                key,
                format!("{} is not a writable file", path.display()),
            ));
        }
    }
    Ok(())
}

/// A log level by name.
fn log_level(key: &str, name: &str) -> Result<log::LevelFilter, ConfigError> {
    Ok(match name.to_ascii_lowercase().as_str() {
        "off" => log::LevelFilter::Off,
        "error" => log::LevelFilter::Error,
        "warn" => log::LevelFilter::Warn,
        "info" => log::LevelFilter::Info,
        "debug" => log::LevelFilter::Debug,
        "trace" => log::LevelFilter::Trace,
        other => {
            return Err(err(
                key,
                format!("unknown level {other:?}; use off, error, warn, info, debug or trace"),
            ))
        }
    })
}

pub(super) fn validate_log(l: RawLog) -> Result<LogConfig, ConfigError> {
    let level = log_level("log.level", &l.level)?;
    let dependencies = log_level("log.dependencies", &l.dependencies)?;
    let access_format = match l.access_format.to_ascii_lowercase().as_str() {
        "text" => super::AccessFormat::Text,
        "json" => super::AccessFormat::Json,
        other => {
            return Err(err(
                "log.access_format",
                format!("unknown format {other:?}; use \"text\" or \"json\""),
            ))
        }
    };
    let access_log = match l.access_log {
        Some(p) if p.trim().is_empty() => {
            return Err(err("log.access_log", "must be a file path (or left out)"))
        }
        p => p.map(PathBuf::from),
    };
    let file = l.file.map(PathBuf::from);
    // A log that cannot be opened stops echod at start: say so at --check-config.
    for (key, path) in [("log.file", &file), ("log.access_log", &access_log)] {
        if let Some(path) = path {
            writable_place(key, path)?;
        }
    }
    Ok(LogConfig {
        level,
        dependencies,
        access_format,
        file,
        access_log,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::RedisServers;

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
    fn redis_servers_are_listed_or_found_through_sentinel() {
        let with =
            |redis: &str| Config::parse(&format!("[origin]\nurl = \"http://a\"\n[redis]\n{redis}"));
        let c =
            with("master = \"rediss://:pw@m:6379\"\nreplicas = [\"rediss://r:6380\"]\n").unwrap();
        let redis = c.redis.unwrap();
        assert!(
            matches!(&redis.servers, RedisServers::Listed { replicas, .. } if replicas.len() == 1)
        );
        assert_eq!(redis.max_replica_lag, Duration::from_millis(1000));
        let c = with(
            "sentinels = [\"redis://s1:26379\", \"redis://s2:26379\"]\nsentinel_master = \"mymaster\"\n\
             password = \"pw\"\ntls = true\n",
        )
        .unwrap();
        let redis = c.redis.unwrap();
        assert_eq!(
            redis.servers,
            RedisServers::Sentinel {
                sentinels: vec!["redis://s1:26379".into(), "redis://s2:26379".into()],
                master_name: "mymaster".into(),
            }
        );
        assert!(redis.tls);
        assert_eq!(redis.password.as_deref(), Some("pw"));
        let key = |redis: &str| with(redis).unwrap_err().key;
        assert_eq!(
            key("master = \"redis://m\"\nsentinels = [\"redis://s\"]\nsentinel_master = \"x\"\n"),
            Some("redis.sentinels".into())
        );
        assert_eq!(
            key("sentinels = [\"redis://s\"]\n"),
            Some("redis.sentinel_master".into())
        );
        assert_eq!(
            key("sentinels = [\"redis://s\"]\nsentinel_master = \"x\"\nreplicas = [\"redis://r\"]\n"),
            Some("redis.replicas".into())
        );
        assert_eq!(
            key("sentinels = [\"s:26379\"]\nsentinel_master = \"x\"\n"),
            Some("redis.sentinels".into())
        );
        assert_eq!(key("tls = true\n"), Some("redis.master".into()));
        // Sentinel-only settings are refused with listed servers, not ignored (issue 15:
        // `tls = true` beside a `redis://` master was ignored, so Redis was plain text).
        for (setting, name) in [
            ("tls = true", "redis.tls"),
            ("username = \"echo\"", "redis.username"),
            ("password = \"pw\"", "redis.password"),
        ] {
            assert_eq!(
                key(&format!("master = \"redis://m\"\n{setting}\n")),
                Some(name.into())
            );
        }
        assert!(with("master = \"redis://m\"\ntls = false\n").is_ok());
        assert_eq!(
            key("master = \"redis://m\"\nca_file = \"/nonexistent.pem\"\n"),
            Some("redis.ca_file".into())
        );
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
    fn missing_origin_is_an_error() {
        let e = Config::parse("").unwrap_err();
        assert_eq!(e.key.as_deref(), Some("origin.url"));
    }

    #[test]
    fn targeted_fields_are_folded_and_checked() {
        let cfg = |list: &str| {
            Config::parse(&format!(
                "[origin]\nurl = \"http://a\"\n[cache]\ntargeted_cache_control = {list}\n"
            ))
        };
        let c = cfg(r#"[" CDN-Cache-Control ", "Echo-Cache-Control"]"#).unwrap();
        assert_eq!(
            c.cache.targeted_cache_control,
            ["cdn-cache-control", "echo-cache-control"]
        );
        assert!(cfg("[]").unwrap().cache.targeted_cache_control.is_empty());
        for (bad, says) in [
            (r#"["cache-control"]"#, "do not list it"),
            (
                r#"["cdn-cache-control", "CDN-Cache-Control"]"#,
                "listed twice",
            ),
            (r#"["a b"]"#, "not a field name"),
            (r#"[""]"#, "not a field name"),
        ] {
            let e = cfg(bad).unwrap_err().to_string();
            assert!(
                e.contains("cache.targeted_cache_control") && e.contains(says),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn accept_encoding_codings_are_known_names_once_each() {
        let cfg = |list: &str| {
            Config::parse(&format!(
                "[origin]\nurl = \"http://a\"\n[cache]\nnormalize_accept_encoding = {list}\n"
            ))
        };
        let c = cfg(r#"[" BR", "gzip"]"#).unwrap();
        assert_eq!(c.cache.normalize_accept_encoding, ["br", "gzip"]);
        assert!(cfg("[]")
            .unwrap()
            .cache
            .normalize_accept_encoding
            .is_empty());
        for (bad, says) in [
            (r#"["gzip", "GZIP"]"#, "listed twice"),
            (r#"["lzma"]"#, "not a content coding"),
            (r#"["identity"]"#, "not a content coding"),
        ] {
            let e = cfg(bad).unwrap_err().to_string();
            assert!(
                e.contains("cache.normalize_accept_encoding") && e.contains(says),
                "{bad}: {e}"
            );
        }
        let compress = |list: &str| {
            Config::parse(&format!(
                "[origin]\nurl = \"http://a\"\n[cache]\ncompress = {list}\n"
            ))
        };
        assert_eq!(
            compress(r#"["br", "gzip"]"#).unwrap().cache.compress,
            ["br", "gzip"]
        );
        assert!(compress("[]").unwrap().cache.compress.is_empty());
        for (bad, says) in [
            (r#"["zstd"]"#, "not a content coding"),
            (r#"["gzip", "gzip"]"#, "listed twice"),
        ] {
            let e = compress(bad).unwrap_err().to_string();
            assert!(
                e.contains("cache.compress") && e.contains(says),
                "{bad}: {e}"
            );
        }
    }

    #[test]
    fn strip_list_names_are_folded_as_the_front_end_compares_them() {
        let c = Config::parse(
            "[origin]\nurl = \"http://a\"\n[cache]\nstrip_request_headers = [\" X_Forwarded_Scheme \", \"X-Debug\"]\n",
        )
        .unwrap();
        assert_eq!(
            c.cache.strip_request_headers,
            ["x-forwarded-scheme", "x-debug"]
        );
    }
}
