//! The Redis store: entries written and deleted on the master, read from the replicas
//! (spread round robin), so read capacity grows with replicas and every Echo node on the
//! same Redis shares one cache.
//!
//! A key's variants are one STRING (`echo:v1:<cache key>`, see `codec`), so a hit is one
//! GET; every value is written with a TTL (freshness + `ttl_margin`): nothing is immortal.
//!
//! Invariants:
//! - all writes and deletes go to the master pool; reads go to replicas, then the master
//!   when no replica answers;
//! - every connection has connect, read and write timeouts, and a pool checkout waits
//!   at most `pool_timeout`; connections are not PINGed on checkout;
//! - each endpoint has a circuit breaker: after `breaker_failures` failures in a row it
//!   is skipped for `breaker_open` (no retry storm against a dead Redis), then one request
//!   tries it again and a success closes it: caching resumes by itself;
//! - every error is returned as a [`StoreError`] for the caller to treat as a miss, and
//!   a value that does not decode is a miss too.
//!
//! redis and r2d2 types stay in this file.

use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use log::{info, warn};

use super::{codec, Entry, Store, StoreError};
use crate::config::RedisConfig;
use crate::key::CacheKey;
use crate::policy;

/// Every key Echo writes starts with this: namespaced, and versioned with the codec.
pub const KEY_PREFIX: &str = "echo:v1:";

/// The Redis key for a cache key.
pub fn redis_key(key: &CacheKey) -> String {
    format!("{KEY_PREFIX}{}", key.as_str())
}

/// Makes connections with every timeout set (the redis crate's own r2d2 manager
/// connects without one), and defers validity checks to that manager.
struct Manager {
    client: redis::Client,
    connect_timeout: Duration,
    read_timeout: Duration,
    write_timeout: Duration,
}

impl r2d2::ManageConnection for Manager {
    type Connection = redis::Connection;
    type Error = redis::RedisError;

    fn connect(&self) -> Result<redis::Connection, redis::RedisError> {
        let conn = self
            .client
            .get_connection_with_timeout(self.connect_timeout)?;
        conn.set_read_timeout(Some(self.read_timeout))?;
        conn.set_write_timeout(Some(self.write_timeout))?;
        Ok(conn)
    }

    fn is_valid(&self, conn: &mut redis::Connection) -> Result<(), redis::RedisError> {
        r2d2::ManageConnection::is_valid(&self.client, conn)
    }

    fn has_broken(&self, conn: &mut redis::Connection) -> bool {
        r2d2::ManageConnection::has_broken(&self.client, conn)
    }
}

/// Skips an endpoint that keeps failing, and lets one request probe it again later.
struct Breaker {
    failures: AtomicU32,
    /// Milliseconds since `epoch` until which the endpoint is skipped; 0 = closed.
    open_until: AtomicU64,
    threshold: u32,
    open_for: Duration,
    epoch: Instant,
}

impl Breaker {
    fn now(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }

    /// May a request use the endpoint now? When the open period has passed, exactly one
    /// caller gets through to probe it (and re-opens it for everyone else meanwhile).
    fn allow(&self) -> bool {
        let until = self.open_until.load(Ordering::Acquire);
        if until == 0 {
            return true;
        }
        let now = self.now();
        if now < until {
            return false;
        }
        let next = now + millis(self.open_for);
        self.open_until
            .compare_exchange(until, next, Ordering::AcqRel, Ordering::Acquire)
            .is_ok()
    }

    /// Records a success; true if this closed an open breaker.
    fn success(&self) -> bool {
        self.failures.store(0, Ordering::Release);
        self.open_until.swap(0, Ordering::AcqRel) != 0
    }

    /// Records a failure; true if this opened the breaker.
    fn failure(&self) -> bool {
        let failures = self.failures.fetch_add(1, Ordering::AcqRel) + 1;
        if failures < self.threshold {
            return false;
        }
        let until = self.now() + millis(self.open_for);
        self.open_until.swap(until.max(1), Ordering::AcqRel) == 0
    }
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One Redis server: its pool and its breaker.
struct Endpoint {
    /// `host:port`, for logs (never the URL: it may carry a password).
    name: String,
    role: &'static str,
    pool: r2d2::Pool<Manager>,
    breaker: Breaker,
}

impl Endpoint {
    fn new(url: &str, role: &'static str, cfg: &RedisConfig) -> Result<Endpoint, StoreError> {
        let client = redis::Client::open(url)
            .map_err(|e| StoreError::Unavailable(format!("bad redis URL for {role}: {e}")))?;
        let name = match &client.get_connection_info().addr() {
            redis::ConnectionAddr::Tcp(host, port) => format!("{host}:{port}"),
            other => other.to_string(),
        };
        let manager = Manager {
            client,
            connect_timeout: cfg.connect_timeout,
            read_timeout: cfg.read_timeout,
            write_timeout: cfg.write_timeout,
        };
        let pool = r2d2::Pool::builder()
            .max_size(cfg.pool_size)
            // No connections up front and none kept warm by background threads: a Redis
            // that is down at start-up does not stop Echo from starting.
            .min_idle(Some(0))
            .connection_timeout(cfg.pool_timeout)
            .test_on_check_out(false)
            // Failures are counted and logged here, rate-limited; r2d2 would log each.
            .error_handler(Box::new(r2d2::NopErrorHandler))
            .build_unchecked(manager);
        Ok(Endpoint {
            name,
            role,
            pool,
            breaker: Breaker {
                failures: AtomicU32::new(0),
                open_until: AtomicU64::new(0),
                threshold: cfg.breaker_failures,
                open_for: cfg.breaker_open,
                epoch: Instant::now(),
            },
        })
    }

    /// Runs `command` on a pooled connection, through the breaker.
    fn run<T: redis::FromRedisValue>(&self, command: &redis::Cmd) -> Result<T, StoreError> {
        if !self.breaker.allow() {
            return Err(StoreError::Unavailable(format!(
                "redis {} {} skipped (circuit open)",
                self.role, self.name
            )));
        }
        let result = match self.pool.get() {
            Ok(mut conn) => command.query::<T>(&mut *conn).map_err(|e| {
                let endpoint_failed = e.is_io_error()
                    || e.is_timeout()
                    || e.is_connection_dropped()
                    || e.is_connection_refusal();
                (e.to_string(), endpoint_failed)
            }),
            Err(e) => Err((format!("no connection: {e}"), true)),
        };
        match result {
            Ok(v) => {
                if self.breaker.success() {
                    info!("redis {} {} is answering again", self.role, self.name);
                }
                Ok(v)
            }
            Err((why, endpoint_failed)) => {
                if endpoint_failed && self.breaker.failure() {
                    warn!(
                        "redis {} {} failing ({why}); skipping it for {:?}",
                        self.role, self.name, self.breaker.open_for
                    );
                }
                Err(StoreError::Unavailable(format!(
                    "redis {} {}: {why}",
                    self.role, self.name
                )))
            }
        }
    }
}

pub struct RedisStore {
    master: Endpoint,
    replicas: Vec<Endpoint>,
    next_replica: AtomicUsize,
    ttl_margin: Duration,
    max_variants: usize,
}

impl RedisStore {
    pub fn new(cfg: &RedisConfig, max_variants: usize) -> Result<RedisStore, StoreError> {
        let master = Endpoint::new(&cfg.master, "master", cfg)?;
        let replicas = cfg
            .replicas
            .iter()
            .map(|url| Endpoint::new(url, "replica", cfg))
            .collect::<Result<Vec<_>, _>>()?;
        Ok(RedisStore {
            master,
            replicas,
            next_replica: AtomicUsize::new(0),
            ttl_margin: cfg.ttl_margin,
            max_variants: max_variants.max(1),
        })
    }

    /// GETs a key from the replicas in turn, then from the master.
    fn read(&self, key: &str) -> Result<Option<Vec<u8>>, StoreError> {
        let mut command = redis::cmd("GET");
        command.arg(key);
        let n = self.replicas.len();
        let start = self.next_replica.fetch_add(1, Ordering::Relaxed);
        let mut last_error = None;
        for i in 0..n {
            match self.replicas[(start + i) % n].run(&command) {
                Ok(v) => return Ok(v),
                Err(e) => last_error = Some(e),
            }
        }
        match self.master.run(&command) {
            Ok(v) => Ok(v),
            Err(e) => Err(last_error.map_or(e.clone(), |r| {
                StoreError::Unavailable(format!("{e}; and {r}"))
            })),
        }
    }

    /// How long Redis keeps a key's variants: the freshest remaining lifetime plus the
    /// margin, at least one second.
    fn ttl(&self, variants: &[Arc<Entry>], now: SystemTime) -> Duration {
        let remaining = variants
            .iter()
            .map(|e| {
                let age = policy::current_age(e.initial_age, e.response_time, now);
                e.freshness.saturating_sub(age)
            })
            .max()
            .unwrap_or(Duration::ZERO);
        (remaining + self.ttl_margin).max(Duration::from_secs(1))
    }
}

impl Store for RedisStore {
    fn name(&self) -> &'static str {
        "redis"
    }

    fn get(&self, key: &CacheKey) -> Result<Vec<Arc<Entry>>, StoreError> {
        match self.read(&redis_key(key))? {
            None => Ok(Vec::new()),
            // A value Echo cannot decode (another version, a hand-made key) is a miss.
            Some(bytes) => Ok(codec::decode(&bytes).unwrap_or_default()),
        }
    }

    fn put(&self, key: &CacheKey, entry: Arc<Entry>) -> Result<(), StoreError> {
        let rkey = redis_key(key);
        let mut variants = Vec::new();
        // Only a response that varies shares its key with other variants; they are read
        // back from the master and merged (a concurrent fill elsewhere may win the write,
        // which costs a later miss, never a wrong answer).
        if !entry.vary.is_empty() {
            let mut get = redis::cmd("GET");
            get.arg(&rkey);
            if let Some(bytes) = self.master.run::<Option<Vec<u8>>>(&get)? {
                variants = codec::decode(&bytes).unwrap_or_default();
            }
            super::merge_variant(&mut variants, self.max_variants, &entry);
        }
        variants.push(entry);
        let ttl = self.ttl(&variants, SystemTime::now());
        let mut set = redis::cmd("SET");
        set.arg(&rkey)
            .arg(codec::encode(&variants))
            .arg("PX")
            .arg(millis(ttl));
        self.master.run::<()>(&set)
    }

    fn remove(&self, key: &CacheKey) -> Result<usize, StoreError> {
        let mut unlink = redis::cmd("UNLINK");
        unlink.arg(redis_key(key));
        self.master.run::<usize>(&unlink)
    }
}
