//! Validation of `[redis]` (see `validate.rs` for the rules every section follows):
//! where the servers are (listed URLs or Sentinel, never both), their credentials and
//! TLS, timeouts, WAIT, the background walks and the local tier.

use std::time::Duration;

use super::raw::RawRedis;
use super::validate::{err, ms, ranged};
use super::{ConfigError, RedisConfig, RedisServers};

fn redis_url(key: &str, url: &str) -> Result<String, ConfigError> {
    let rest = url
        .strip_prefix("redis://")
        .or_else(|| url.strip_prefix("rediss://"))
        .ok_or_else(|| {
            err(
                key,
                format!("must be a redis://host:port or rediss://host:port URL (got {url:?})"),
            )
        })?;
    if rest.is_empty() || rest.starts_with('/') {
        return Err(err(key, format!("has no host (got {url:?})")));
    }
    Ok(url.to_string())
}

pub(super) fn validate_redis(r: RawRedis, workers: usize) -> Result<RedisConfig, ConfigError> {
    let servers = match (&r.master, r.sentinels.is_empty(), &r.sentinel_master) {
        (Some(_), false, _) => {
            return Err(err(
                "redis.sentinels",
                "give master (and replicas) or sentinels and sentinel_master, not both",
            ))
        }
        (Some(m), true, _) => {
            // `tls`, `username` and `password` are for the servers Sentinel names; a
            // listed URL carries its own (`topology::client_for_url` reads only the URL).
            // Ignored, `tls = true` would leave a `redis://` master in plain text.
            let sentinel_only = [
                ("redis.tls", r.tls),
                ("redis.username", r.username.is_some()),
                ("redis.password", r.password.is_some()),
            ];
            if let Some((key, _)) = sentinel_only.iter().find(|(_, set)| *set) {
                return Err(err(
                    key,
                    "applies to the servers sentinels name; with master, give TLS and \
                     credentials in each URL (rediss://[user:password@]host:port)",
                ));
            }
            RedisServers::Listed {
                master: redis_url("redis.master", m)?,
                replicas: r
                    .replicas
                    .iter()
                    .map(|u| redis_url("redis.replicas", u))
                    .collect::<Result<Vec<_>, _>>()?,
            }
        }
        (None, false, Some(name)) => {
            if !r.replicas.is_empty() {
                return Err(err(
                    "redis.replicas",
                    "with sentinels the replicas are discovered: leave replicas out",
                ));
            }
            if name.trim().is_empty() || name.contains(char::is_whitespace) {
                return Err(err(
                    "redis.sentinel_master",
                    format!("must be the name the sentinels monitor (got {name:?})"),
                ));
            }
            RedisServers::Sentinel {
                sentinels: r
                    .sentinels
                    .iter()
                    .map(|u| redis_url("redis.sentinels", u))
                    .collect::<Result<Vec<_>, _>>()?,
                master_name: name.clone(),
            }
        }
        (None, false, None) => {
            return Err(err(
                "redis.sentinel_master",
                "is required with sentinels (the name they monitor the master under)",
            ))
        }
        (None, true, _) => {
            return Err(err(
                "redis.master",
                "is required in [redis] (or sentinels and sentinel_master)",
            ))
        }
    };
    if let Some(path) = &r.ca_file {
        match std::fs::read_to_string(path) {
            Ok(text) if text.contains("-----BEGIN CERTIFICATE-----") => {}
            Ok(_) => {
                return Err(err(
                    "redis.ca_file",
                    format!("{} holds no PEM certificate", path.display()),
                ))
            }
            Err(e) => {
                return Err(err(
                    "redis.ca_file",
                    format!("cannot read {}: {e}", path.display()),
                ))
            }
        }
    }
    let pool_size = ranged(
        "redis.pool_size",
        r.pool_size_or_workers(workers as u64),
        1,
        10_000,
    )?;
    let listed_replicas = match &servers {
        RedisServers::Listed { replicas, .. } => Some(replicas.len() as u64),
        RedisServers::Sentinel { .. } => None,
    };
    Ok(RedisConfig {
        servers,
        username: r.username.clone(),
        password: r.password.clone(),
        tls: r.tls,
        ca_file: r.ca_file.clone(),
        max_replica_lag: ms("redis.max_replica_lag_ms", r.max_replica_lag_ms)?,
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
        wait_replicas: match (r.wait_replicas, listed_replicas) {
            (Some(n), Some(listed)) if n > listed => {
                return Err(err(
                    "redis.wait_replicas",
                    format!("is more than the {listed} replicas listed"),
                ))
            }
            (other, _) => other,
        },
        wait_timeout: ms("redis.wait_timeout_ms", r.wait_timeout_ms)?,
        scan_count: ranged("redis.scan_count", r.scan_count, 10, 100_000)?,
        tag_sweep_per_sec: ranged("redis.tag_sweep_per_sec", r.tag_sweep_per_sec, 0, 1_000_000)?,
        local_cache_max_bytes: ranged(
            "redis.local_cache_max_bytes",
            r.local_cache_max_bytes,
            0,
            1 << 40,
        )?,
        local_cache_max_ttl: Duration::from_millis(ranged(
            "redis.local_cache_max_ttl_ms",
            r.local_cache_max_ttl_ms,
            1,
            86_400_000,
        )? as u64),
    })
}
