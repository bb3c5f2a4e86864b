//! One Redis server as the store uses it ([`Endpoint`]): an r2d2 pool of connections
//! made with every timeout set, behind a circuit breaker.
//!
//! Invariants:
//! - every connection has connect, read and write timeouts, and a pool checkout waits
//!   at most `pool_timeout`; connections are not PINGed on checkout;
//! - a connection that failed never goes back to the pool, nor one that answered as no
//!   master does (READONLY, MASTERDOWN); and when the server fails, every connection
//!   made before that is dropped at its next checkout, without a round trip (after an
//!   outage they are dead: each would cost a failed call);
//! - no connection is made up front or kept warm by background threads: a Redis that is
//!   down at start-up does not stop Echo from starting;
//! - each endpoint has a circuit breaker: after `breaker_failures` failures in a row it
//!   is skipped for `breaker_open` (no retry storm against a dead Redis), then one request
//!   tries it again and a success closes it: caching resumes by itself. Only failures of
//!   the server count (I/O, timeout, refused, dropped, no connection), not a reply error;
//! - every call returns a [`StoreError`], never a redis error: this is the one place
//!   redis errors are turned into kinds (timeout, unavailable, decode, a Redis reply).

use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use log::{info, warn};
use redis::ConnectionLike;

use crate::config::RedisConfig;
use crate::store::StoreError;

/// A pooled connection, and what decides whether it may be used again.
pub(super) struct Conn {
    inner: redis::Connection,
    /// The endpoint's failure count when it was made.
    epoch: u64,
    /// It failed, or answered as no master does: dropped instead of pooled.
    broken: bool,
}

/// Makes connections with every timeout set (the redis crate's own r2d2 manager
/// connects without one); a connection made before the endpoint's last failure is not
/// valid, nor one marked broken.
struct Manager {
    client: redis::Client,
    connect_timeout: Duration,
    read_timeout: Duration,
    write_timeout: Duration,
    /// The endpoint's failures so far (shared with it).
    epoch: Arc<AtomicU64>,
}

impl r2d2::ManageConnection for Manager {
    type Connection = Conn;
    type Error = redis::RedisError;

    fn connect(&self) -> Result<Conn, redis::RedisError> {
        let epoch = self.epoch.load(Ordering::Acquire);
        let inner = self
            .client
            .get_connection_with_timeout(self.connect_timeout)?;
        inner.set_read_timeout(Some(self.read_timeout))?;
        inner.set_write_timeout(Some(self.write_timeout))?;
        Ok(Conn {
            inner,
            epoch,
            broken: false,
        })
    }

    /// At checkout, without a round trip: a connection made before the server's last
    /// failure is dropped (and another made).
    fn is_valid(&self, conn: &mut Conn) -> Result<(), redis::RedisError> {
        if conn.epoch < self.epoch.load(Ordering::Acquire) {
            return Err(redis::RedisError::from((
                redis::ErrorKind::Io,
                "made before the server's last failure",
            )));
        }
        Ok(())
    }

    fn has_broken(&self, conn: &mut Conn) -> bool {
        conn.broken || !conn.inner.is_open()
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

    /// Is the endpoint being skipped now?
    fn is_open(&self) -> bool {
        self.open_until.load(Ordering::Acquire) != 0
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

/// A duration in whole milliseconds, as Redis takes them (PX, PEXPIRE, WAIT).
pub(super) fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

/// One Redis server: its pool and its breaker.
pub(super) struct Endpoint {
    /// `host:port`, for logs (never the URL: it may carry a password).
    pub(super) name: String,
    role: &'static str,
    /// The pool's client, for connections outside the pool.
    client: redis::Client,
    pool: r2d2::Pool<Manager>,
    breaker: Breaker,
    /// Failures of the server so far: connections made before the last are dropped.
    epoch: Arc<AtomicU64>,
    /// A replica the monitor found fit to read from (reachable, linked to its master,
    /// not lagging); set by the monitor, true until its first check.
    readable: AtomicBool,
    /// When the server last refused a write as full (ms on the breaker's clock, 0: never).
    last_oom: AtomicU64,
    connect_timeout: Duration,
    read_timeout: Duration,
    write_timeout: Duration,
}

impl Endpoint {
    /// An endpoint for `client`'s server, as `role` (`master` or `replica`).
    pub(super) fn new(client: redis::Client, role: &'static str, cfg: &RedisConfig) -> Endpoint {
        let name = address(&client);
        let epoch = Arc::new(AtomicU64::new(0));
        let manager = Manager {
            client: client.clone(),
            connect_timeout: cfg.connect_timeout,
            read_timeout: cfg.read_timeout,
            write_timeout: cfg.write_timeout,
            epoch: Arc::clone(&epoch),
        };
        let pool = r2d2::Pool::builder()
            .max_size(cfg.pool_size)
            // No connections up front and none kept warm by background threads: a Redis
            // that is down at start-up does not stop Echo from starting.
            .min_idle(Some(0))
            .connection_timeout(cfg.pool_timeout)
            // `is_valid` is a check of the connection's age, not a round trip.
            .test_on_check_out(true)
            // Failures are counted and logged here, rate-limited; r2d2 would log each.
            .error_handler(Box::new(r2d2::NopErrorHandler))
            .build_unchecked(manager);
        Endpoint {
            name,
            role,
            client,
            pool,
            breaker: Breaker {
                failures: AtomicU32::new(0),
                open_until: AtomicU64::new(0),
                threshold: cfg.breaker_failures,
                open_for: cfg.breaker_open,
                epoch: Instant::now(),
            },
            epoch,
            readable: AtomicBool::new(true),
            last_oom: AtomicU64::new(0),
            connect_timeout: cfg.connect_timeout,
            read_timeout: cfg.read_timeout,
            write_timeout: cfg.write_timeout,
        }
    }

    /// `master` or `replica`.
    pub(super) fn role(&self) -> &'static str {
        self.role
    }

    /// Runs `command` on a pooled connection, through the breaker.
    pub(super) fn run<T: redis::FromRedisValue>(
        &self,
        command: &redis::Cmd,
    ) -> Result<T, StoreError> {
        self.with_conn(|conn| command.query::<T>(conn))
    }

    /// Runs `work` on one pooled connection (commands that must share a connection,
    /// like writes and the WAIT for them), through the breaker.
    pub(super) fn with_conn<T>(
        &self,
        work: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        if !self.breaker.allow() {
            return Err(StoreError::CircuitOpen {
                server: self.server(),
            });
        }
        let result = match self.pool.get() {
            Ok(mut conn) => {
                let result = work(&mut conn.inner).map_err(|e| error_of(self.server(), &e));
                if let Err(e) = &result {
                    // Only a reply error leaves the connection as it was; a demoted
                    // master's connections are no use for what the store sends them
                    // (a replica that lost its master is still a replica: MASTERDOWN
                    // there is an answer, not a broken connection).
                    conn.broken = match e {
                        StoreError::Redis { .. }
                        | StoreError::OutOfMemory { .. }
                        | StoreError::Decode { .. } => false,
                        StoreError::NotMaster { .. } => self.role == "master",
                        _ => true,
                    };
                }
                result
            }
            Err(e) => Err(StoreError::Unavailable {
                server: self.server(),
                detail: format!("no connection: {e}"),
            }),
        };
        match result {
            Ok(v) => {
                if self.breaker.success() {
                    info!("redis {} {} is answering again", self.role, self.name);
                }
                Ok(v)
            }
            Err(e) => {
                // The server failed (not the command): it counts against the breaker.
                if let StoreError::Timeout { detail, .. } | StoreError::Unavailable { detail, .. } =
                    &e
                {
                    // Every connection made before this is suspect.
                    self.epoch.fetch_add(1, Ordering::AcqRel);
                    if self.breaker.failure() {
                        warn!(
                            "redis {} {} failing ({detail}); skipping it for {:?}",
                            self.role, self.name, self.breaker.open_for
                        );
                    }
                }
                if let StoreError::OutOfMemory { .. } = &e {
                    self.last_oom
                        .store(self.breaker.now().max(1), Ordering::Release);
                }
                Err(e)
            }
        }
    }

    /// How errors name this server: role and address (`redis master 127.0.0.1:6379`).
    pub(super) fn server(&self) -> String {
        format!("redis {} {}", self.role, self.name)
    }

    /// A client for this server's URL, for a connection of its own outside the pool
    /// (the fill subscriber's).
    pub(super) fn client(&self) -> redis::Client {
        self.client.clone()
    }

    /// A connection of its own outside the pool and its breaker (the monitor's), with
    /// the pool's timeouts, or `at_least` when they are shorter.
    pub(super) fn connect(&self, at_least: Duration) -> Result<redis::Connection, StoreError> {
        let connect = || {
            let conn = self
                .client
                .get_connection_with_timeout(self.connect_timeout.max(at_least))?;
            conn.set_read_timeout(Some(self.read_timeout.max(at_least)))?;
            conn.set_write_timeout(Some(self.write_timeout.max(at_least)))?;
            Ok(conn)
        };
        connect().map_err(|e| error_of(self.server(), &e))
    }

    /// Is this replica fit to read from, as the monitor last found it?
    pub(super) fn readable(&self) -> bool {
        self.readable.load(Ordering::Acquire)
    }

    pub(super) fn set_readable(&self, readable: bool) {
        self.readable.store(readable, Ordering::Release);
    }

    /// Is the breaker skipping this server now?
    pub(super) fn breaker_open(&self) -> bool {
        self.breaker.is_open()
    }

    /// Did the server refuse a write as full within `within`?
    pub(super) fn refused_as_full_within(&self, within: Duration) -> bool {
        let at = self.last_oom.load(Ordering::Acquire);
        at != 0 && self.breaker.now().saturating_sub(at) <= millis(within)
    }

    /// The monitor reached the server: an open breaker closes now (caching resumes
    /// without waiting for the open period and a request to probe it).
    pub(super) fn reached(&self) {
        if self.breaker.success() {
            info!("redis {} {} is answering again", self.role, self.name);
        }
    }

    /// The monitor could not reach the server: every pooled connection made before now
    /// is dropped at its next checkout (after an outage they are dead).
    pub(super) fn unreached(&self) {
        self.epoch.fetch_add(1, Ordering::AcqRel);
    }
}

/// `host:port` of a client's server (never its URL: it may carry a password).
pub(super) fn address(client: &redis::Client) -> String {
    match client.get_connection_info().addr() {
        redis::ConnectionAddr::Tcp(host, port) => format!("{host}:{port}"),
        redis::ConnectionAddr::TcpTls { host, port, .. } => format!("{host}:{port}"),
        other => other.to_string(),
    }
}

/// Did Redis refuse a write because it is full (OOM), for a command or any command of
/// a pipeline?
pub(super) fn is_out_of_memory(e: &redis::RedisError) -> bool {
    e.code() == Some("OOM")
        || e.clone()
            .into_server_errors()
            .is_some_and(|errors| errors.iter().any(|(_, e)| e.code() == "OOM"))
}

/// The kind of a redis error seen on `server`: a timeout or a failed connection is the
/// server's (these count against its breaker); READONLY and MASTERDOWN say the server
/// is not (or no longer) a master that can be used; OOM that it is full; a reply Echo
/// cannot read is a decode error; anything else is Redis refusing the command, with its
/// text.
fn error_of(server: String, e: &redis::RedisError) -> StoreError {
    let detail = e.to_string();
    let code = e.code().unwrap_or("");
    if code == "READONLY" || code == "MASTERDOWN" {
        StoreError::NotMaster { server, detail }
    } else if is_out_of_memory(e) {
        StoreError::OutOfMemory { server, detail }
    } else if e.is_timeout() {
        StoreError::Timeout { server, detail }
    } else if e.is_io_error() || e.is_connection_dropped() || e.is_connection_refusal() {
        StoreError::Unavailable { server, detail }
    } else if matches!(
        e.kind(),
        redis::ErrorKind::UnexpectedReturnType | redis::ErrorKind::Parse
    ) {
        StoreError::Decode { server, detail }
    } else {
        StoreError::Redis { server, detail }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io;

    #[test]
    fn redis_errors_are_mapped_to_kinds_and_keep_their_text() {
        let server = || "redis master 127.0.0.1:6379".to_string();
        let io_error = |kind: io::ErrorKind| redis::RedisError::from(io::Error::new(kind, "x"));
        for kind in [io::ErrorKind::TimedOut, io::ErrorKind::WouldBlock] {
            assert!(matches!(
                error_of(server(), &io_error(kind)),
                StoreError::Timeout { .. }
            ));
        }
        for kind in [
            io::ErrorKind::ConnectionRefused,
            io::ErrorKind::ConnectionReset,
            io::ErrorKind::BrokenPipe,
            io::ErrorKind::UnexpectedEof,
        ] {
            assert!(matches!(
                error_of(server(), &io_error(kind)),
                StoreError::Unavailable { .. }
            ));
        }
        let wrong_type =
            redis::RedisError::from((redis::ErrorKind::UnexpectedReturnType, "not a string"));
        assert!(matches!(
            error_of(server(), &wrong_type),
            StoreError::Decode { .. }
        ));
        let oom = redis::make_extension_error(
            "OOM".into(),
            Some("command not allowed when used memory > 'maxmemory'.".into()),
        );
        let e = error_of(server(), &oom);
        assert!(matches!(e, StoreError::OutOfMemory { .. }), "{e:?}");
        let noscript = redis::make_extension_error("NOSCRIPT".into(), Some("no script".into()));
        assert!(matches!(
            error_of(server(), &noscript),
            StoreError::Redis { .. }
        ));
        // The reply's text is kept, after the server's name.
        let text = e.to_string();
        assert!(
            text.starts_with("store unavailable: redis master 127.0.0.1:6379: ")
                && text.contains("OOM")
                && text.contains("maxmemory"),
            "{text}"
        );
    }
}
