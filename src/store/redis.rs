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
//! Fill coalescing across nodes: the fill lock of a key is `echo:v1:lock:<cache key>`,
//! taken with `SET NX PX` on the master (it expires by itself if its holder dies), and
//! released by a script that deletes it only for its owner and, in the same step,
//! PUBLISHes `echo:v1:filled:<cache key>`. Each store runs one subscriber thread on its
//! own connection to the master (`PSUBSCRIBE echo:v1:filled:*`) that wakes the local
//! waiters of that key; waiting never polls Redis. After every (re)subscription it
//! wakes every registered waiter, since a release may have been published while it was
//! not listening (a waiter woken early only re-checks). The thread stops when the store
//! is dropped.
//!
//! redis and r2d2 types stay in this file.

use std::collections::{HashMap, HashSet};
use std::hash::{Hash, Hasher};
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant, SystemTime};

use crossbeam_channel::{RecvTimeoutError, Sender, TryRecvError};
use log::{debug, info, warn};

use super::{codec, Entry, FillWaiter, Lookup, Store, StoreError};
use crate::config::RedisConfig;
use crate::invalidation::{
    ban_names, Checkpoint, Job, JobOutcome, Matcher, Mode, Progress, SAMPLE,
};
use crate::key::CacheKey;
use crate::policy;

/// Every key Echo writes starts with this: namespaced, and versioned with the codec.
pub const KEY_PREFIX: &str = "echo:v1:";
/// Entry keys: the prefix, then the readable cache key.
const ENTRY_PREFIX: &str = "echo:v1:http";
/// The invalidation generation: incremented by every invalidation.
const GENERATION_KEY: &str = "echo:v1:generation";
/// Recent invalidations, scored by the time they expire (see `invalidation::Bans`).
const BANS_KEY: &str = "echo:v1:bans";
/// Tag index: one set of entry keys per `Surrogate-Key` tag.
const TAG_PREFIX: &str = "echo:v1:tag:";
/// Fill locks: the prefix, then the readable cache key.
const LOCK_PREFIX: &str = "echo:v1:lock:";
/// Fill-lock releases are published on this prefix and the cache key.
const FILLED_PREFIX: &str = "echo:v1:filled:";
/// What the fill subscriber listens to.
const FILLED_PATTERN: &str = "echo:v1:filled:*";
/// The subscriber's read timeout: how often it looks up from an idle connection to
/// notice that its store was dropped.
const SUBSCRIBER_TICK: Duration = Duration::from_secs(1);
/// An idle subscription is PINGed this often, so a connection that died silently
/// (no reset) is noticed and replaced.
const SUBSCRIBER_KEEPALIVE: Duration = Duration::from_secs(10);
/// Reconnection backoff of the subscriber: doubles from the first to the last.
const SUBSCRIBER_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(2));
/// At most one subscriber warning this often.
const SUBSCRIBER_WARN_EVERY: Duration = Duration::from_secs(10);
/// Keys deleted or rewritten per round trip.
const BATCH: usize = 500;

/// Stores an entry only if no invalidation happened since the fill began; indexes its
/// tags in the same step. KEYS: entry, generation, tag sets. ARGV: the generation the
/// fill saw, the value, the TTL in ms. Returns -1 when stored, else the generation now.
const STORE_SCRIPT: &str = r#"
local generation = tonumber(redis.call('GET', KEYS[2]) or '0')
if generation ~= tonumber(ARGV[1]) then return generation end
redis.call('SET', KEYS[1], ARGV[2], 'PX', ARGV[3])
for i = 3, #KEYS do
  redis.call('SADD', KEYS[i], KEYS[1])
  redis.call('PEXPIRE', KEYS[i], ARGV[3], 'NX')
  redis.call('PEXPIRE', KEYS[i], ARGV[3], 'GT')
end
return -1
"#;

/// Releases a fill lock. KEYS: the lock. ARGV: the owner, the release channel. Returns
/// -1 (and does nothing) while another owner holds the lock; otherwise deletes it if
/// `owner` held it (1) or finds it already free, expired (0), and publishes the release
/// either way: the waiters want to know the fill ended.
const UNLOCK_SCRIPT: &str = r#"
local holder = redis.call('GET', KEYS[1])
if holder and holder ~= ARGV[1] then return -1 end
if holder then redis.call('DEL', KEYS[1]) end
redis.call('PUBLISH', ARGV[2], '')
if holder then return 1 end
return 0
"#;

/// The Redis key for a cache key.
pub fn redis_key(key: &CacheKey) -> String {
    format!("{KEY_PREFIX}{}", key.as_str())
}

/// The Redis key of a cache key's fill lock.
pub fn fill_lock_key(key: &CacheKey) -> String {
    format!("{LOCK_PREFIX}{}", key.as_str())
}

/// The channel a cache key's fill-lock release is published on.
fn filled_channel(key: &CacheKey) -> String {
    format!("{FILLED_PREFIX}{}", key.as_str())
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

/// What an MGET of an entry and the generation read. A value Echo cannot decode
/// (another version, a hand-made key) is a miss.
fn lookup_of(value: Option<Vec<u8>>, generation: Option<u64>) -> Lookup {
    Lookup {
        variants: value
            .and_then(|v| codec::decode(&v).ok())
            .unwrap_or_default(),
        generation: generation.unwrap_or(0),
    }
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
        self.with_conn(|conn| command.query::<T>(conn))
    }

    /// Runs `work` on one pooled connection (commands that must share a connection,
    /// like writes and the WAIT for them), through the breaker.
    fn with_conn<T>(
        &self,
        work: impl FnOnce(&mut redis::Connection) -> redis::RedisResult<T>,
    ) -> Result<T, StoreError> {
        if !self.breaker.allow() {
            return Err(StoreError::Unavailable(format!(
                "redis {} {} skipped (circuit open)",
                self.role, self.name
            )));
        }
        let result = match self.pool.get() {
            Ok(mut conn) => work(&mut conn).map_err(|e| {
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

/// Each waiter's id (to unregister it) and the channel that wakes it, by cache key.
type WaitersByKey = HashMap<String, Vec<(u64, Sender<()>)>>;

/// The local waiters of fill-lock releases, by cache key: shared by the store (which
/// registers them) and its subscriber thread (which wakes them).
#[derive(Default)]
struct FillWaiters {
    by_key: Mutex<WaitersByKey>,
    next_id: AtomicU64,
}

impl FillWaiters {
    /// The map; a panic elsewhere cannot leave it half-updated, so a poisoned lock is
    /// recovered.
    fn lock(&self) -> MutexGuard<'_, WaitersByKey> {
        self.by_key.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn register(self: &Arc<Self>, key: &CacheKey) -> FillWaiter {
        let (woken_tx, woken) = crossbeam_channel::bounded(1);
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let key = key.as_str().to_string();
        self.lock()
            .entry(key.clone())
            .or_default()
            .push((id, woken_tx));
        FillWaiter::new(
            woken,
            Registration {
                waiters: Arc::clone(self),
                key,
                id,
            },
        )
    }

    /// Wakes the waiters of one key (a waiter already woken stays woken).
    fn wake(&self, key: &str) {
        if let Some(senders) = self.lock().get(key) {
            for (_, sender) in senders {
                let _ = sender.try_send(());
            }
        }
    }

    /// Wakes every waiter (after a gap in the subscription); returns how many.
    fn wake_all(&self) -> usize {
        let by_key = self.lock();
        for (_, sender) in by_key.values().flatten() {
            let _ = sender.try_send(());
        }
        by_key.values().map(Vec::len).sum()
    }

    fn count(&self) -> usize {
        self.lock().values().map(Vec::len).sum()
    }
}

/// Unregisters one waiter when its [`FillWaiter`] is dropped, so the map never keeps
/// waiters nobody waits on.
struct Registration {
    waiters: Arc<FillWaiters>,
    key: String,
    id: u64,
}

impl Drop for Registration {
    fn drop(&mut self) {
        let mut by_key = self.waiters.lock();
        if let Some(senders) = by_key.get_mut(&self.key) {
            senders.retain(|(id, _)| *id != self.id);
            if senders.is_empty() {
                by_key.remove(&self.key);
            }
        }
    }
}

/// The subscriber thread's side: listens for fill-lock releases on its own connection
/// to the master and wakes the local waiters. It runs until `stop` is disconnected (its
/// sender is held by the store).
struct FillSubscriber {
    client: redis::Client,
    /// `host:port` of the master, for logs.
    name: String,
    connect_timeout: Duration,
    write_timeout: Duration,
    waiters: Arc<FillWaiters>,
    stop: crossbeam_channel::Receiver<()>,
}

impl FillSubscriber {
    fn stopped(&self) -> bool {
        matches!(self.stop.try_recv(), Err(TryRecvError::Disconnected))
    }

    /// Subscribes, loses the connection, waits, subscribes again, until the store is
    /// dropped.
    fn run(self) {
        let mut backoff = SUBSCRIBER_BACKOFF.0;
        let mut last_warning: Option<Instant> = None;
        let mut recovering = false;
        loop {
            let mut subscribed = false;
            let error = match self.listen(&mut subscribed, recovering) {
                Ok(()) => return,
                Err(e) => e,
            };
            if subscribed {
                backoff = SUBSCRIBER_BACKOFF.0;
            }
            recovering = true;
            if last_warning.is_none_or(|t| t.elapsed() >= SUBSCRIBER_WARN_EVERY) {
                warn!(
                    "redis master {}: fill-release subscription down ({error}); retrying \
                     (waiting fills sleep out their timeout meanwhile)",
                    self.name
                );
                last_warning = Some(Instant::now());
            }
            // The backoff doubles as the shutdown check: a dropped store ends it at once.
            if !matches!(
                self.stop.recv_timeout(backoff),
                Err(RecvTimeoutError::Timeout)
            ) {
                return;
            }
            backoff = (backoff * 2).min(SUBSCRIBER_BACKOFF.1);
        }
    }

    /// One subscription: Ok when the store was dropped, Err when the connection failed.
    fn listen(&self, subscribed: &mut bool, recovering: bool) -> redis::RedisResult<()> {
        let mut conn = self
            .client
            .get_connection_with_timeout(self.connect_timeout)?;
        conn.set_read_timeout(Some(SUBSCRIBER_TICK))?;
        conn.set_write_timeout(Some(self.write_timeout))?;
        let mut pubsub = conn.as_pubsub();
        pubsub.psubscribe(FILLED_PATTERN)?;
        *subscribed = true;
        // A release published while this node was not listening is lost: every waiter
        // re-checks now rather than sleeping out its whole timeout.
        let woken = self.waiters.wake_all();
        if recovering {
            info!(
                "redis master {}: fill-release subscription is back ({woken} waiters woken \
                 to re-check)",
                self.name
            );
        }
        let mut last_heard = Instant::now();
        loop {
            if self.stopped() {
                return Ok(());
            }
            match pubsub.get_message() {
                Ok(message) => {
                    last_heard = Instant::now();
                    if let Some(key) = message.get_channel_name().strip_prefix(FILLED_PREFIX) {
                        self.waiters.wake(key);
                    }
                }
                Err(e) if e.is_timeout() => {
                    if last_heard.elapsed() >= SUBSCRIBER_KEEPALIVE {
                        pubsub.ping::<redis::Value>()?;
                        last_heard = Instant::now();
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

/// The store's side of the subscriber: dropping it stops the thread (within one tick).
struct FillListener {
    waiters: Arc<FillWaiters>,
    _stop: Sender<()>,
}

impl FillListener {
    fn start(cfg: &RedisConfig, name: &str) -> Result<FillListener, StoreError> {
        let client = redis::Client::open(cfg.master.as_str())
            .map_err(|e| StoreError::Unavailable(format!("bad redis URL for master: {e}")))?;
        let waiters = Arc::new(FillWaiters::default());
        let (stop_tx, stop) = crossbeam_channel::bounded(0);
        let subscriber = FillSubscriber {
            client,
            name: name.to_string(),
            connect_timeout: cfg.connect_timeout,
            write_timeout: cfg.write_timeout,
            waiters: Arc::clone(&waiters),
            stop,
        };
        std::thread::Builder::new()
            .name("echo-fill-subscriber".into())
            .spawn(move || subscriber.run())
            .map_err(|e| StoreError::Unavailable(format!("cannot start fill subscriber: {e}")))?;
        Ok(FillListener {
            waiters,
            _stop: stop_tx,
        })
    }
}

pub struct RedisStore {
    master: Endpoint,
    replicas: Vec<Endpoint>,
    next_replica: AtomicUsize,
    ttl_margin: Duration,
    max_variants: usize,
    store_script: redis::Script,
    ban_ttl: Duration,
    wait_replicas: u64,
    wait_timeout: Duration,
    read_timeout: Duration,
    scan_count: usize,
    /// For the stale window in TTLs: only `max_stale` is used.
    stale_options: policy::PolicyOptions,
    unlock_script: redis::Script,
    fills: FillListener,
}

impl RedisStore {
    /// `ban_ttl`: how long an invalidation is remembered against fills that began before it.
    pub fn new(
        cfg: &RedisConfig,
        max_variants: usize,
        ban_ttl: Duration,
    ) -> Result<RedisStore, StoreError> {
        let master = Endpoint::new(&cfg.master, "master", cfg)?;
        let replicas = cfg
            .replicas
            .iter()
            .map(|url| Endpoint::new(url, "replica", cfg))
            .collect::<Result<Vec<_>, _>>()?;
        let fills = FillListener::start(cfg, &master.name)?;
        Ok(RedisStore {
            master,
            replicas,
            next_replica: AtomicUsize::new(0),
            ttl_margin: cfg.ttl_margin,
            max_variants: max_variants.max(1),
            store_script: redis::Script::new(STORE_SCRIPT),
            ban_ttl,
            wait_replicas: cfg.wait_replicas.unwrap_or(cfg.replicas.len() as u64),
            wait_timeout: cfg.wait_timeout,
            read_timeout: cfg.read_timeout,
            scan_count: cfg.scan_count,
            stale_options: policy::PolicyOptions::default(),
            unlock_script: redis::Script::new(UNLOCK_SCRIPT),
            fills,
        })
    }

    /// Fill waiters registered now (for tests: none may outlive its `FillWaiter`).
    #[doc(hidden)]
    pub fn waiters_registered(&self) -> usize {
        self.fills.waiters.count()
    }

    /// Runs a read on the replicas in turn, then on the master.
    fn read<T: redis::FromRedisValue>(&self, command: &redis::Cmd) -> Result<T, StoreError> {
        let n = self.replicas.len();
        let start = self.next_replica.fetch_add(1, Ordering::Relaxed);
        let mut last_error = None;
        for i in 0..n {
            match self.replicas[(start + i) % n].run(command) {
                Ok(v) => return Ok(v),
                Err(e) => last_error = Some(e),
            }
        }
        match self.master.run(command) {
            Ok(v) => Ok(v),
            Err(e) => Err(last_error.map_or(e.clone(), |r| {
                StoreError::Unavailable(format!("{e}; and {r}"))
            })),
        }
    }

    /// Would an invalidation recorded after generation `since` refuse this entry?
    fn banned_since(&self, since: u64, key: &str, tags: &[String]) -> Result<bool, StoreError> {
        let mut range = redis::cmd("ZRANGEBYSCORE");
        range.arg(BANS_KEY).arg(now_millis()).arg("+inf");
        let bans: Vec<String> = self.master.run(&range)?;
        for ban in bans {
            let Ok(ban) = serde_json::from_str::<Ban>(&ban) else {
                continue;
            };
            if ban.generation <= since {
                continue;
            }
            // Host and tag first; the pattern is compiled only when they pass, and one
            // Echo cannot compile is taken to name everything: refuse.
            if ban_names(
                ban.pattern.as_deref(),
                ban.host.as_deref(),
                ban.tag.as_deref(),
                key,
                tags,
            ) {
                return Ok(true);
            }
        }
        Ok(false)
    }

    /// Records a ban (and a new generation) before a job touches any entry.
    fn ban(&self, matcher: &Matcher) -> Result<u64, StoreError> {
        let generation: u64 = self.master.run(redis::cmd("INCR").arg(GENERATION_KEY))?;
        let expires = now_millis() + millis(self.ban_ttl);
        let member = serde_json::to_string(&Ban {
            generation,
            pattern: matcher.pattern().map(str::to_string),
            host: matcher.host().map(str::to_string),
            tag: matcher.tag().map(str::to_string),
        })
        .map_err(|e| StoreError::Unavailable(e.to_string()))?;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("ZADD")
            .arg(BANS_KEY)
            .arg(expires)
            .arg(member)
            .ignore()
            .cmd("ZREMRANGEBYSCORE")
            .arg(BANS_KEY)
            .arg("-inf")
            .arg(now_millis())
            .ignore()
            .cmd("PEXPIRE")
            .arg(BANS_KEY)
            .arg(millis(self.ban_ttl))
            .ignore();
        self.master.with_conn(|c| pipe.query::<()>(c))?;
        Ok(generation)
    }

    /// The SCAN glob for a matcher: the literal prefix of the pattern narrows it.
    fn scan_glob(matcher: &Matcher) -> String {
        let host = matcher.host().map_or("*".to_string(), glob_escape);
        let prefix = matcher.prefix().map(glob_escape).unwrap_or_default();
        format!("{ENTRY_PREFIX}://{host}{prefix}*")
    }

    /// Applies a job's mode to one batch of matching Redis keys, on the job's connection.
    fn apply(
        &self,
        conn: &mut redis::Connection,
        job: &Job,
        keys: &[String],
    ) -> redis::RedisResult<u64> {
        match job.mode {
            Mode::Delete => redis::cmd("UNLINK").arg(keys).query(conn),
            Mode::Stale => {
                let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET").arg(keys).query(conn)?;
                let mut pipe = redis::pipe();
                let mut marked = 0;
                for (key, value) in keys.iter().zip(values) {
                    let Some(variants) = value.and_then(|v| codec::decode(&v).ok()) else {
                        continue;
                    };
                    let stale = super::mark_stale(&variants);
                    // KEEPTTL: a stale entry lives as long as it would have; XX: never
                    // recreate one deleted meanwhile.
                    pipe.cmd("SET")
                        .arg(key)
                        .arg(codec::encode(&stale))
                        .arg("KEEPTTL")
                        .arg("XX")
                        .ignore();
                    marked += 1;
                }
                pipe.query::<()>(conn)?;
                Ok(marked)
            }
            Mode::Refresh => Ok(0),
        }
    }
}

/// A ban as kept in Redis.
#[derive(serde::Serialize, serde::Deserialize)]
struct Ban {
    #[serde(rename = "g")]
    generation: u64,
    #[serde(rename = "p", skip_serializing_if = "Option::is_none")]
    pattern: Option<String>,
    #[serde(rename = "h", skip_serializing_if = "Option::is_none")]
    host: Option<String>,
    #[serde(rename = "t", skip_serializing_if = "Option::is_none")]
    tag: Option<String>,
}

fn now_millis() -> u64 {
    SystemTime::now()
        .duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, millis)
}

/// A 64-bit fingerprint of a key: remembering these (not the keys) bounds the memory a
/// job needs to count each match once.
fn fingerprint(key: &str) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    h.finish()
}

/// Escapes Redis glob characters so a literal matches itself.
fn glob_escape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for c in s.chars() {
        if matches!(c, '*' | '?' | '[' | ']' | '\\' | '^') {
            out.push('\\');
        }
        out.push(c);
    }
    out
}

impl RedisStore {
    /// Keeps entries long enough to be served stale as their `stale-while-revalidate` /
    /// `stale-if-error` allow, up to `max_stale` (cache.max_stale_ms).
    pub fn with_max_stale(mut self, max_stale: Duration) -> RedisStore {
        self.stale_options.max_stale = max_stale;
        self
    }

    /// How long Redis keeps a key's variants: the longest remaining usable life (freshness
    /// plus the stale window its fields allow) plus the margin, at least one second.
    fn ttl(&self, variants: &[Arc<Entry>], now: SystemTime) -> Duration {
        let remaining = variants
            .iter()
            .map(|e| {
                let age = policy::current_age(e.initial_age, e.response_time, now);
                let stale = policy::stale_window(&e.headers, &self.stale_options);
                (e.freshness + stale).saturating_sub(age)
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

    /// A PING to every server (through its breaker: one skipped for failing is down).
    fn health(&self) -> Vec<String> {
        std::iter::once(&self.master)
            .chain(self.replicas.iter())
            .filter_map(|e| e.run::<String>(&redis::cmd("PING")).err())
            .map(|e| e.to_string())
            .collect()
    }

    /// One round trip: the entry and the generation together.
    fn get(&self, key: &CacheKey) -> Result<Lookup, StoreError> {
        let mut mget = redis::cmd("MGET");
        mget.arg(redis_key(key)).arg(GENERATION_KEY);
        let (value, generation): (Option<Vec<u8>>, Option<u64>) = self.read(&mget)?;
        Ok(lookup_of(value, generation))
    }

    fn get_latest(&self, key: &CacheKey) -> Result<Lookup, StoreError> {
        let mut mget = redis::cmd("MGET");
        mget.arg(redis_key(key)).arg(GENERATION_KEY);
        let (value, generation): (Option<Vec<u8>>, Option<u64>) = self.master.run(&mget)?;
        Ok(lookup_of(value, generation))
    }

    fn put(&self, key: &CacheKey, entry: Arc<Entry>, since: u64) -> Result<bool, StoreError> {
        let rkey = redis_key(key);
        let tags: Vec<String> = entry
            .tags
            .iter()
            .map(|t| format!("{TAG_PREFIX}{t}"))
            .collect();
        let entry_tags = entry.tags.clone();
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
        let value = codec::encode(&variants);
        let mut since = since;
        // Invalidations since the fill began may not name this entry; each round checks
        // the new ones and tries again (a few rounds at most, under heavy invalidation).
        for _ in 0..3 {
            let result: i64 = self.master.with_conn(|c| {
                let mut invocation = self.store_script.prepare_invoke();
                invocation.key(&rkey).key(GENERATION_KEY);
                for tag in &tags {
                    invocation.key(tag);
                }
                invocation.arg(since).arg(&value).arg(millis(ttl));
                invocation.invoke(c)
            })?;
            if result < 0 {
                return Ok(true);
            }
            if self.banned_since(since, key.as_str(), &entry_tags)? {
                return Ok(false);
            }
            since = result as u64;
        }
        Ok(false)
    }

    fn remove(&self, key: &CacheKey) -> Result<usize, StoreError> {
        let mut unlink = redis::cmd("UNLINK");
        unlink.arg(redis_key(key));
        self.master.run::<usize>(&unlink)
    }

    fn invalidate(&self, job: &Job, progress: &Progress) -> Result<JobOutcome, StoreError> {
        if !job.dry_run {
            self.ban(&job.matcher)?;
        }
        let mut outcome = JobOutcome::default();
        let matcher = &job.matcher;
        // One connection for the whole job: the WAIT at the end covers every write on it.
        self.master.with_conn(|conn| {
            let mut cursor: u64 = 0;
            let mut batch: Vec<String> = Vec::with_capacity(BATCH);
            let mut seen: HashSet<u64> = HashSet::new();
            let mut checkpoint = Checkpoint::new(progress);
            // A cancel or the end of the budget stops the job at its next check: before
            // each SCAN (one may walk many keys and return none) and every few hundred
            // keys. What it did is reported; the matches not yet applied are left alone,
            // and there is no WAIT (the job is not done).
            'scan: loop {
                if let Err(stop) = progress.check() {
                    outcome.stopped = Some(stop);
                    break 'scan;
                }
                let (next, keys): (u64, Vec<String>) = match matcher.tag() {
                    Some(tag) => redis::cmd("SSCAN")
                        .arg(format!("{TAG_PREFIX}{tag}"))
                        .arg(cursor)
                        .arg("COUNT")
                        .arg(self.scan_count)
                        .query(conn)?,
                    None => redis::cmd("SCAN")
                        .arg(cursor)
                        .arg("MATCH")
                        .arg(Self::scan_glob(matcher))
                        .arg("COUNT")
                        .arg(self.scan_count)
                        .query(conn)?,
                };
                progress
                    .scanned
                    .fetch_add(keys.len() as u64, Ordering::Relaxed);
                for rkey in keys {
                    if let Err(stop) = checkpoint.key(rkey.len()) {
                        outcome.stopped = Some(stop);
                        break 'scan;
                    }
                    let Some(key) = rkey.strip_prefix(KEY_PREFIX) else {
                        continue;
                    };
                    // The tag part is already satisfied by the tag set.
                    if !matcher.matches_key(key) {
                        continue;
                    }
                    // SCAN may return a key twice (when Redis resizes its table during
                    // the scan, as this job's own deletes can make it): count it once.
                    if !seen.insert(fingerprint(&rkey)) {
                        continue;
                    }
                    outcome.matched += 1;
                    progress.matched.fetch_add(1, Ordering::Relaxed);
                    if outcome.sample.len() < SAMPLE {
                        outcome.sample.push(key.to_string());
                    }
                    if job.dry_run {
                        continue;
                    }
                    if job.mode == Mode::Refresh {
                        outcome.to_refresh.push(key.to_string());
                        continue;
                    }
                    batch.push(rkey);
                    if batch.len() >= BATCH {
                        let n = self.apply(conn, job, &batch)?;
                        outcome.changed += n;
                        progress.changed.fetch_add(n, Ordering::Relaxed);
                        batch.clear();
                    }
                }
                cursor = next;
                if cursor == 0 {
                    break;
                }
            }
            if outcome.stopped.is_some() {
                return Ok(());
            }
            if !batch.is_empty() {
                let n = self.apply(conn, job, &batch)?;
                outcome.changed += n;
                progress.changed.fetch_add(n, Ordering::Relaxed);
            }
            // Read-your-invalidation: the call returns only when the replicas have the
            // deletes (or the wait times out, which the answer reports).
            if !job.dry_run && self.wait_replicas > 0 {
                // WAIT itself blocks for up to wait_timeout: the connection's read
                // timeout must outlast it, then go back to what every call gets.
                conn.set_read_timeout(Some(self.wait_timeout + self.read_timeout))?;
                let acked: redis::RedisResult<u64> = redis::cmd("WAIT")
                    .arg(self.wait_replicas)
                    .arg(millis(self.wait_timeout))
                    .query(conn);
                conn.set_read_timeout(Some(self.read_timeout))?;
                outcome.replicas = Some((acked?, self.wait_replicas));
            }
            Ok(())
        })?;
        Ok(outcome)
    }

    fn lock_fill(&self, key: &CacheKey, owner: &str, ttl: Duration) -> Result<bool, StoreError> {
        let mut set = redis::cmd("SET");
        set.arg(fill_lock_key(key))
            .arg(owner)
            .arg("NX")
            .arg("PX")
            .arg(millis(ttl).max(1));
        Ok(self.master.run::<Option<String>>(&set)?.is_some())
    }

    /// One round trip: SET NX and, after it on the same connection, the MGET of the
    /// entry and the generation (its answer is used only when the lock was taken).
    fn lock_fill_and_look(
        &self,
        key: &CacheKey,
        owner: &str,
        ttl: Duration,
    ) -> Result<(bool, Option<Lookup>), StoreError> {
        let mut pipe = redis::pipe();
        pipe.cmd("SET")
            .arg(fill_lock_key(key))
            .arg(owner)
            .arg("NX")
            .arg("PX")
            .arg(millis(ttl).max(1))
            .cmd("MGET")
            .arg(redis_key(key))
            .arg(GENERATION_KEY);
        type Answer = (Option<String>, (Option<Vec<u8>>, Option<u64>));
        let (locked, (value, generation)): Answer = self.master.with_conn(|c| pipe.query(c))?;
        if locked.is_none() {
            return Ok((false, None));
        }
        Ok((true, Some(lookup_of(value, generation))))
    }

    fn unlock_fill(&self, key: &CacheKey, owner: &str) -> Result<(), StoreError> {
        let released: i64 = self.master.with_conn(|c| {
            self.unlock_script
                .key(fill_lock_key(key))
                .arg(owner)
                .arg(filled_channel(key))
                .invoke(c)
        })?;
        if released < 0 {
            debug!("fill lock of {key} is held by another fetch now; left to it");
        }
        Ok(())
    }

    fn fill_waiter(&self, key: &CacheKey) -> FillWaiter {
        self.fills.waiters.register(key)
    }
}
