//! Fill coalescing across nodes: one node fetches a key from the origin while the
//! others wait for it to be stored.
//!
//! The fill lock of a key is `echo:v1:lock:<cache key>`, taken with `SET NX PX` on the
//! master (it expires by itself if its holder dies), and released by a script that
//! deletes it only for its owner and, in the same step, PUBLISHes
//! `echo:v1:filled:<cache key>`. Each store runs one subscriber thread on its own
//! connection to the master (`PSUBSCRIBE echo:v1:filled:*`) that wakes the local
//! waiters of that key; when the master changes (a failover), it subscribes on the new
//! one. The same subscription carries the announcements of completed invalidations, and
//! its thread writes the node's heartbeat (see `fence`).
//!
//! A lock is a lease: `cache.coalesce_lock_ttl_ms` long, renewed by this store's lease
//! thread (a third of the lease at a time) for as long as the fetch holding it runs, so
//! a node that dies mid-fetch leaves its lock for at most one lease; the nodes waiting
//! on it wake at the release's publish, or when the lease they were told of ends, and
//! try again (one of them takes over). A key whose answers may not be shared is
//! remembered as `echo:v1:pass:<cache key>` (hit-for-pass, with its own TTL): a lock
//! attempt on it answers "pass", and storing an entry for the key deletes it.
//!
//! Invariants: locks are taken and released on the master only; waiting never polls
//! Redis (a waiter looks again once per lease at most); after every (re)subscription the subscriber wakes every registered waiter,
//! since a release may have been published while it was not listening (a waiter woken
//! early only re-checks); a waiter is unregistered when its `FillWaiter` is dropped, so
//! none outlives it; the thread stops when the store is dropped (within one tick).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, Sender, TryRecvError};
use log::{debug, info, warn};

use super::endpoint::{millis, Endpoint};
use super::fence::{Fence, APPLIED_CHANNEL, CONTROL_KEY, HEARTBEAT};
use super::topology::Topology;
use super::tracking::Tracking;
use crate::config::RedisConfig;
use crate::key::CacheKey;
use crate::store::{FillWaiter, StoreError};

/// Fill locks: the prefix, then the readable cache key.
const LOCK_PREFIX: &str = "echo:v1:lock:";
/// Fill-lock releases are published on this prefix and the cache key.
const FILLED_PREFIX: &str = "echo:v1:filled:";
/// Hit-for-pass markers: the prefix, then the readable cache key.
const PASS_PREFIX: &str = "echo:v1:pass:";
/// How often the lease thread looks for leases to renew.
const LEASE_TICK: Duration = Duration::from_millis(50);
/// What the fill subscriber listens to.
const FILLED_PATTERN: &str = "echo:v1:filled:*";
/// The subscriber's read timeout: how often it looks up from an idle connection to
/// beat, and to notice that its store was dropped or the master changed.
const SUBSCRIBER_TICK: Duration = Duration::from_millis(100);
/// Reconnection backoff of the subscriber: doubles from the first to the last.
const SUBSCRIBER_BACKOFF: (Duration, Duration) =
    (Duration::from_millis(100), Duration::from_secs(2));
/// At most one subscriber warning this often.
const SUBSCRIBER_WARN_EVERY: Duration = Duration::from_secs(10);

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

/// Takes a fill lock unless the key is remembered as uncacheable. KEYS: the lock, the
/// pass marker. ARGV: the owner, the lease (ms). Returns TAKEN, PASS, or the lease left
/// to the holder (ms).
const LOCK_SCRIPT: &str = r#"
if redis.call('EXISTS', KEYS[2]) == 1 then return -20 end
if redis.call('SET', KEYS[1], ARGV[1], 'NX', 'PX', ARGV[2]) then return -10 end
return math.max(redis.call('PTTL', KEYS[1]), 0)
"#;
/// What `LOCK_SCRIPT` answers when it took the lock, and for a pass.
pub(super) const TAKEN: i64 = -10;
pub(super) const PASS: i64 = -20;

/// Renews a lease for its owner only. KEYS: the lock. ARGV: the owner, the lease (ms).
const RENEW_SCRIPT: &str = r#"
if redis.call('GET', KEYS[1]) == ARGV[1] then
  return redis.call('PEXPIRE', KEYS[1], ARGV[2])
end
return 0
"#;

/// The Redis key of a cache key's hit-for-pass marker.
pub(super) fn pass_key(key: &CacheKey) -> String {
    format!("{PASS_PREFIX}{}", key.as_str())
}

/// The lock attempt of `key` for `owner` with a lease of `lease` (see `LOCK_SCRIPT`),
/// as a command for a pipeline.
pub(super) fn lock_or_pass_command(key: &CacheKey, owner: &str, lease: Duration) -> redis::Cmd {
    let mut eval = redis::cmd("EVAL");
    eval.arg(LOCK_SCRIPT)
        .arg(2)
        .arg(fill_lock_key(key))
        .arg(pass_key(key))
        .arg(owner)
        .arg(millis(lease).max(1));
    eval
}

/// The Redis key of a cache key's fill lock.
pub fn fill_lock_key(key: &CacheKey) -> String {
    format!("{LOCK_PREFIX}{}", key.as_str())
}

/// The channel a cache key's fill-lock release is published on.
pub(super) fn filled_channel(key: &CacheKey) -> String {
    format!("{FILLED_PREFIX}{}", key.as_str())
}

/// `SET NX PX` of the fill lock of `key` for `owner`, expiring after `ttl` (at least
/// 1 ms): answers OK when taken, nil when another owner holds it.
pub(super) fn lock_command(key: &CacheKey, owner: &str, ttl: Duration) -> redis::Cmd {
    let mut set = redis::cmd("SET");
    set.arg(fill_lock_key(key))
        .arg(owner)
        .arg("NX")
        .arg("PX")
        .arg(millis(ttl).max(1));
    set
}

/// A store's fill locks: taken and released on the master, and the local waiters that
/// the releases wake.
pub(super) struct FillLocks {
    unlock_script: redis::Script,
    listener: FillListener,
    /// The locks this store holds, renewed by its lease thread.
    leases: Arc<Leases>,
    _stop_leases: Sender<()>,
}

/// A held lock: its owner, its lease, and when it was last renewed.
struct Held {
    owner: String,
    lease: Duration,
    renewed: Instant,
}

/// The locks this store holds, by lock key.
#[derive(Default)]
struct Leases {
    held: Mutex<HashMap<String, Held>>,
}

impl Leases {
    fn lock(&self) -> MutexGuard<'_, HashMap<String, Held>> {
        self.held.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Renews, on the master, every lease a third or more of which has passed.
    fn renew_due(&self, topology: &Topology) {
        let due: Vec<(String, String, Duration)> = {
            let mut held = self.lock();
            held.iter_mut()
                .filter(|(_, h)| h.renewed.elapsed() >= h.lease / 3)
                .map(|(key, h)| {
                    h.renewed = Instant::now();
                    (key.clone(), h.owner.clone(), h.lease)
                })
                .collect()
        };
        if due.is_empty() {
            return;
        }
        let servers = topology.servers();
        let Ok(master) = servers.master() else {
            return;
        };
        let renewed = master.with_conn(|c| {
            let mut pipe = redis::pipe();
            for (key, owner, lease) in &due {
                pipe.cmd("EVAL")
                    .arg(RENEW_SCRIPT)
                    .arg(1)
                    .arg(key)
                    .arg(owner)
                    .arg(millis(*lease).max(1))
                    .ignore();
            }
            pipe.query::<()>(c)
        });
        // A lease that could not be renewed ends by itself: another node may take the
        // key over (two fetches at most, never a wedged key).
        if let Err(e) = renewed {
            debug!("fill lock leases not renewed: {e}");
        }
    }
}

impl FillLocks {
    /// Starts the subscriber thread, on its own connection to the master of `topology`;
    /// it also keeps `fence` up (announcements and heartbeats).
    pub(super) fn start(
        cfg: &RedisConfig,
        topology: Arc<Topology>,
        fence: Arc<Fence>,
        tracking: Option<Arc<Tracking>>,
    ) -> Result<FillLocks, StoreError> {
        let leases = Arc::new(Leases::default());
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        {
            let leases = Arc::clone(&leases);
            let topology = Arc::clone(&topology);
            std::thread::Builder::new()
                .name("echo-fill-leases".into())
                .spawn(move || loop {
                    leases.renew_due(&topology);
                    if !matches!(
                        stopped.recv_timeout(LEASE_TICK),
                        Err(RecvTimeoutError::Timeout)
                    ) {
                        return;
                    }
                })
                .map_err(|e| StoreError::Setup(format!("cannot start the lease thread: {e}")))?;
        }
        Ok(FillLocks {
            unlock_script: redis::Script::new(UNLOCK_SCRIPT),
            listener: FillListener::start(cfg, topology, fence, tracking)?,
            leases,
            _stop_leases: stop,
        })
    }

    /// Stops renewing the lease of `key` held by `owner` (it is being released).
    pub(super) fn forget(&self, key: &CacheKey, owner: &str) {
        let mut held = self.leases.lock();
        let lock = fill_lock_key(key);
        if held.get(&lock).is_some_and(|h| h.owner == owner) {
            held.remove(&lock);
        }
    }

    /// Keeps the lock of `key` held by `owner` (just taken) until `unlock`: its lease is
    /// renewed meanwhile.
    pub(super) fn hold(&self, key: &CacheKey, owner: &str, lease: Duration) {
        self.leases.lock().insert(
            fill_lock_key(key),
            Held {
                owner: owner.to_string(),
                lease,
                renewed: Instant::now(),
            },
        );
    }

    /// Tries to take the lock of `key` as `owner` for `ttl`: true when taken.
    pub(super) fn lock(
        &self,
        master: &Endpoint,
        key: &CacheKey,
        owner: &str,
        ttl: Duration,
    ) -> Result<bool, StoreError> {
        Ok(master
            .run::<Option<String>>(&lock_command(key, owner, ttl))?
            .is_some())
    }

    /// Releases the lock of `key` if `owner` holds it, and publishes the release either
    /// way (see `UNLOCK_SCRIPT`).
    pub(super) fn unlock(
        &self,
        master: &Endpoint,
        key: &CacheKey,
        owner: &str,
    ) -> Result<(), StoreError> {
        self.forget(key, owner);
        let released: i64 = master.with_conn(|c| {
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

    /// A waiter woken when the lock of `key` is released (see `Store::fill_waiter`).
    pub(super) fn waiter(&self, key: &CacheKey) -> FillWaiter {
        self.listener.waiters.register(key)
    }

    /// Waiters registered now.
    pub(super) fn waiters_registered(&self) -> usize {
        self.listener.waiters.count()
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
    /// Where the master is; the subscription follows it.
    topology: Arc<Topology>,
    fence: Arc<Fence>,
    connect_timeout: Duration,
    read_timeout: Duration,
    write_timeout: Duration,
    waiters: Arc<FillWaiters>,
    stop: crossbeam_channel::Receiver<()>,
    /// The local tier's coherence, synced before each heartbeat.
    tracking: Option<Arc<Tracking>>,
}

impl FillSubscriber {
    /// The fence this node may acknowledge: taken before the local tier (if any) is
    /// synced, so every delete of the jobs it counts has left the tier (see `tracking`).
    fn sync_tier(&self, master: &Endpoint) -> u64 {
        let acked = self.fence.current();
        if let Some(tracking) = &self.tracking {
            tracking.sync(master);
        }
        acked
    }

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
            let result = self.listen(&mut subscribed, recovering);
            // Not listening: this node stops trusting replicas (see `fence`).
            self.fence.set_subscribed(false);
            let error = match result {
                Ok(()) => return,
                Err(e) => e,
            };
            if subscribed {
                backoff = SUBSCRIBER_BACKOFF.0;
            }
            recovering = true;
            if last_warning.is_none_or(|t| t.elapsed() >= SUBSCRIBER_WARN_EVERY) {
                warn!(
                    "redis master: fill-release subscription down ({error}); retrying \
                     (waiting fills sleep out their timeout meanwhile)"
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

    /// One subscription: Ok when the store was dropped, Err when the connection failed
    /// or the master changed.
    fn listen(&self, subscribed: &mut bool, recovering: bool) -> redis::RedisResult<()> {
        let version = self.topology.master_version();
        let servers = self.topology.servers();
        let master = servers.master().map_err(|e| {
            redis::RedisError::from((redis::ErrorKind::Io, "no master", e.to_string()))
        })?;
        let name = master.name.clone();
        let mut conn = master
            .client()
            .get_connection_with_timeout(self.connect_timeout)?;
        conn.set_read_timeout(Some(SUBSCRIBER_TICK))?;
        conn.set_write_timeout(Some(self.write_timeout))?;
        let mut pubsub = conn.as_pubsub();
        pubsub.psubscribe(FILLED_PATTERN)?;
        pubsub.subscribe(APPLIED_CHANNEL)?;
        // Invalidations completed before the subscription: the fence catches up with
        // the master before this node trusts a replica again.
        let applied: Option<u64> = master
            .run(redis::cmd("HGET").arg(CONTROL_KEY).arg("a"))
            .map_err(store_error)?;
        self.fence.raise(applied.unwrap_or(0));
        self.fence.sync_clock(master).map_err(store_error)?;
        self.fence
            .beat(master, self.sync_tier(master))
            .map_err(store_error)?;
        self.fence.set_subscribed(true);
        let mut last_beat = Instant::now();
        *subscribed = true;
        // A release published while this node was not listening is lost: every waiter
        // re-checks now rather than sleeping out its whole timeout.
        let woken = self.waiters.wake_all();
        if recovering {
            info!(
                "redis master {name}: fill-release subscription is back ({woken} waiters \
                 woken to re-check)"
            );
        }
        loop {
            if self.stopped() {
                return Ok(());
            }
            if self.topology.master_version() != version {
                return Err(redis::RedisError::from((
                    redis::ErrorKind::Io,
                    "the master changed",
                )));
            }
            let mut beat = false;
            match pubsub.get_message() {
                Ok(message) => {
                    let channel = message.get_channel_name();
                    if let Some(key) = channel.strip_prefix(FILLED_PREFIX) {
                        self.waiters.wake(key);
                    } else if channel == APPLIED_CHANNEL {
                        // An invalidation completed: raise the fence, and acknowledge it
                        // with a heartbeat now (the message itself shows the
                        // subscription delivers).
                        let applied: u64 = message.get_payload().unwrap_or(0);
                        self.fence.raise(applied);
                        beat = true;
                    }
                }
                Err(e) if e.is_timeout() => {}
                Err(e) => return Err(e),
            }
            if !beat && last_beat.elapsed() >= HEARTBEAT {
                // A heartbeat says "this node hears every announcement": only after a
                // round trip on the subscription itself, which delivers everything
                // published before it. A subscription that died silently stops the
                // heartbeats, and with them this node's trust in replicas.
                pubsub.set_read_timeout(Some(self.read_timeout))?;
                pubsub.ping::<redis::Value>()?;
                pubsub.set_read_timeout(Some(SUBSCRIBER_TICK))?;
                beat = true;
            }
            if beat {
                if let Err(e) = self.fence.beat(master, self.sync_tier(master)) {
                    // The fence's own clock stops trusting replicas if beats keep failing.
                    debug!("redis master {name}: heartbeat failed: {e}");
                }
                last_beat = Instant::now();
            }
        }
    }
}

/// A store error where the subscriber's loop expects a redis one.
fn store_error(e: StoreError) -> redis::RedisError {
    redis::RedisError::from((redis::ErrorKind::Io, "redis master", e.to_string()))
}

/// The store's side of the subscriber: dropping it stops the thread (within one tick).
struct FillListener {
    waiters: Arc<FillWaiters>,
    _stop: Sender<()>,
}

impl FillListener {
    fn start(
        cfg: &RedisConfig,
        topology: Arc<Topology>,
        fence: Arc<Fence>,
        tracking: Option<Arc<Tracking>>,
    ) -> Result<FillListener, StoreError> {
        let waiters = Arc::new(FillWaiters::default());
        let (stop_tx, stop) = crossbeam_channel::bounded(0);
        let subscriber = FillSubscriber {
            topology,
            fence,
            connect_timeout: cfg.connect_timeout,
            read_timeout: cfg.read_timeout,
            write_timeout: cfg.write_timeout,
            waiters: Arc::clone(&waiters),
            stop,
            tracking,
        };
        std::thread::Builder::new()
            .name("echo-fill-subscriber".into())
            .spawn(move || subscriber.run())
            .map_err(|e| StoreError::Setup(format!("cannot start fill subscriber: {e}")))?;
        Ok(FillListener {
            waiters,
            _stop: stop_tx,
        })
    }
}
