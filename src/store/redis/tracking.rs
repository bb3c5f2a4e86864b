//! What keeps the local tier coherent: Redis's client-side caching. One tracking
//! connection per server this node reads from (the master and every replica: a replica
//! applying a change sends its own message, so a node that read from a lagging replica
//! hears when that replica catches up), in RESP3 broadcasting mode on the entry keys
//! (`CLIENT TRACKING ON BCAST PREFIX echo:v1:http`) and on the sync markers
//! (`echo:v1:hb:`). A thread per connection blocks on it and drops each key it names.
//!
//! Sync markers make what a connection delivered provable. A marker is a key
//! (`echo:v1:hb:<node>:<n>`, short TTL) this node writes on the master; replication is
//! one ordered stream and a server sends its messages in the order of its changes, so
//! once a connection delivered marker n, it delivered every change the master made
//! before marker n was written. Markers go out with every heartbeat (four a second) and
//! before every acknowledgement of an invalidation (see `fence`): a node acknowledges a
//! job only once each connection delivered a marker written after the job's deletes, so
//! when the job returns, no node holds what it deleted. A connection that delivers no
//! marker in time, loses its server, or names no key (FLUSHALL, a full resync) flushes
//! the tier; a connection reconnects by itself.
//!
//! Invariants: the tier serves only while the master's connection is in sync; an entry
//! read from a server is inserted only if that server's connection was in sync before
//! the read began; a connection out of sync has flushed the tier.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use log::{debug, info, warn};

use super::endpoint::Endpoint;
use super::local::LocalTier;
use super::topology::Topology;
use super::KEY_PREFIX;
use crate::store::StoreError;

/// Where sync markers live (tracked with the entries).
const MARKER_PREFIX: &str = "echo:v1:hb:";
/// The tracked prefix of entry keys.
const ENTRY_PREFIX: &str = "echo:v1:http";
/// A marker's TTL: long past any wait for it.
const MARKER_TTL_MS: u64 = 5_000;
/// A connection that delivered no marker for this long is out of sync (markers go out
/// four times a second).
const SILENCE: Duration = Duration::from_secs(1);
/// How long a sync waits for every connection to deliver its marker.
const SYNC_WAIT: Duration = Duration::from_millis(250);
/// How often a connection's thread looks up from its socket (stop, silence).
const TICK: Duration = Duration::from_millis(100);
/// How often the supervisor compares connections with the servers.
const SUPERVISE_EVERY: Duration = Duration::from_millis(100);
/// Between two tries of a connection that failed.
const RETRY: Duration = Duration::from_millis(250);

/// Not in sync: no insert from this source may happen.
const UNSYNCED: u64 = u64::MAX;

/// One server's tracking connection, as the tier sees it.
struct Source {
    name: String,
    /// The tier's clock when this connection came in sync; `UNSYNCED` while it is not.
    synced_since: AtomicU64,
    /// The highest of this node's markers it delivered.
    seen: AtomicU64,
    /// The marker it must deliver to come (back) in sync.
    want: AtomicU64,
    /// Ends its thread.
    stop: AtomicBool,
}

/// Why the tier is not serving, for `/health` and the log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(super) enum TierState {
    /// Serving.
    On,
    /// Waiting for the master's tracking connection to come in sync.
    Syncing,
    /// Redis refused client tracking (a provider that disables it): Echo runs without
    /// the tier.
    Refused(String),
}

pub(super) struct Tracking {
    pub(super) tier: Arc<LocalTier>,
    topology: Arc<Topology>,
    node: String,
    connect_timeout: Duration,
    write_timeout: Duration,
    sources: Mutex<HashMap<String, Arc<Source>>>,
    /// The last marker number written.
    marker: AtomicU64,
    /// Woken when a connection delivers a marker.
    delivered: (Mutex<()>, Condvar),
    state: Mutex<TierState>,
    stop: AtomicBool,
}

impl Tracking {
    /// Starts the supervisor, which keeps one tracking connection per server.
    pub(super) fn start(
        tier: Arc<LocalTier>,
        topology: Arc<Topology>,
        node: String,
        connect_timeout: Duration,
        write_timeout: Duration,
    ) -> Result<Arc<Tracking>, StoreError> {
        let tracking = Arc::new(Tracking {
            tier,
            topology,
            node,
            connect_timeout,
            write_timeout,
            sources: Mutex::new(HashMap::new()),
            marker: AtomicU64::new(0),
            delivered: (Mutex::new(()), Condvar::new()),
            state: Mutex::new(TierState::Syncing),
            stop: AtomicBool::new(false),
        });
        let supervisor = Arc::clone(&tracking);
        std::thread::Builder::new()
            .name("echo-tracking".into())
            .spawn(move || {
                while !supervisor.stop.load(Ordering::Acquire) {
                    supervisor.supervise();
                    std::thread::sleep(SUPERVISE_EVERY);
                }
            })
            .map_err(|e| StoreError::Setup(format!("cannot start tracking: {e}")))?;
        Ok(tracking)
    }

    pub(super) fn state(&self) -> TierState {
        self.state.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn set_state(&self, state: TierState) {
        let mut current = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if *current != state {
            match &state {
                TierState::On => info!("local tier: on (every tracking connection in sync)"),
                TierState::Syncing => info!("local tier: off until tracking is in sync"),
                TierState::Refused(why) => warn!(
                    "local tier: off: Redis refused client tracking ({why}); running \
                     without it, every hit from Redis"
                ),
            }
            *current = state;
        }
    }

    /// The clock value after which an entry read from `server` may be inserted
    /// (`UNSYNCED`: none may).
    pub(super) fn synced_since(&self, server: &str) -> u64 {
        let sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        sources
            .get(server)
            .map_or(UNSYNCED, |s| s.synced_since.load(Ordering::Acquire))
    }

    /// One connection per server read from; those of servers gone are stopped (and the
    /// tier flushed: what was read from them is no longer watched). The tier serves
    /// while the master's connection is in sync.
    fn supervise(self: &Arc<Self>) {
        let servers = self.topology.servers();
        let wanted: Vec<&Arc<Endpoint>> = servers.all().collect();
        let mut sources = self.sources.lock().unwrap_or_else(|p| p.into_inner());
        let before = sources.len();
        sources.retain(|name, source| {
            let keep = wanted.iter().any(|e| &e.name == name);
            if !keep {
                source.stop.store(true, Ordering::Release);
            }
            keep
        });
        if sources.len() != before {
            self.tier.flush();
        }
        for endpoint in wanted {
            if sources.contains_key(&endpoint.name) {
                continue;
            }
            let source = Arc::new(Source {
                name: endpoint.name.clone(),
                synced_since: AtomicU64::new(UNSYNCED),
                seen: AtomicU64::new(0),
                want: AtomicU64::new(u64::MAX),
                stop: AtomicBool::new(false),
            });
            sources.insert(endpoint.name.clone(), Arc::clone(&source));
            let tracking = Arc::clone(self);
            let endpoint = Arc::clone(endpoint);
            let spawned = std::thread::Builder::new()
                .name("echo-tracker".into())
                .spawn(move || tracking.follow(&endpoint, &source));
            if let Err(e) = spawned {
                warn!("local tier: cannot start a tracking thread: {e}");
            }
        }
        let master_synced = servers.master.as_ref().is_some_and(|m| {
            sources
                .get(&m.name)
                .is_some_and(|s| s.synced_since.load(Ordering::Acquire) != UNSYNCED)
        });
        drop(sources);
        if matches!(self.state(), TierState::Refused(_)) {
            return;
        }
        self.tier.set_on(master_synced);
        self.set_state(if master_synced {
            TierState::On
        } else {
            TierState::Syncing
        });
    }

    /// A source's thread: connects, tracks, delivers, and on any failure flushes the
    /// tier and connects again, until the source is stopped.
    fn follow(&self, endpoint: &Endpoint, source: &Source) {
        while !source.stop.load(Ordering::Acquire) && !self.stop.load(Ordering::Acquire) {
            let result = self.track(endpoint, source);
            if source.synced_since.swap(UNSYNCED, Ordering::AcqRel) != UNSYNCED {
                self.tier.flush();
            }
            match result {
                Ok(()) => return,
                Err(Failure::Refused(why)) => {
                    self.tier.set_on(false);
                    self.set_state(TierState::Refused(why));
                    return;
                }
                Err(Failure::Lost(why)) => {
                    debug!("local tier: tracking {} lost: {why}", source.name);
                    std::thread::sleep(RETRY);
                }
            }
        }
    }

    /// One tracking connection, until it fails or the source is stopped.
    fn track(&self, endpoint: &Endpoint, source: &Source) -> Result<(), Failure> {
        let lost = |e: redis::RedisError| Failure::Lost(e.to_string());
        let info = endpoint.client().get_connection_info().clone();
        let settings = info
            .redis_settings()
            .clone()
            .set_protocol(redis::ProtocolVersion::RESP3);
        let client = redis::Client::open(info.set_redis_settings(settings)).map_err(lost)?;
        let mut conn = client
            .get_connection_with_timeout(self.connect_timeout)
            .map_err(lost)?;
        conn.set_write_timeout(Some(self.write_timeout))
            .map_err(lost)?;
        conn.set_read_timeout(Some(self.connect_timeout.max(TICK)))
            .map_err(lost)?;
        let on: Result<(), redis::RedisError> = redis::cmd("CLIENT")
            .arg("TRACKING")
            .arg("ON")
            .arg("BCAST")
            .arg("PREFIX")
            .arg(ENTRY_PREFIX)
            .arg("PREFIX")
            .arg(MARKER_PREFIX)
            .query(&mut conn);
        if let Err(e) = on {
            return Err(match e.kind() {
                redis::ErrorKind::Io => Failure::Lost(e.to_string()),
                _ => Failure::Refused(e.to_string()),
            });
        }
        conn.set_read_timeout(Some(TICK)).map_err(lost)?;
        // In sync once it delivers a marker written after tracking began.
        source
            .want
            .store(self.marker.load(Ordering::Acquire) + 1, Ordering::Release);
        let mut last_marker = Instant::now();
        loop {
            if source.stop.load(Ordering::Acquire) || self.stop.load(Ordering::Acquire) {
                return Ok(());
            }
            match conn.recv_response() {
                Ok(redis::Value::Push { kind, data }) => {
                    if self.deliver(source, kind, data)? {
                        last_marker = Instant::now();
                    }
                }
                Ok(_) => {}
                Err(e) if e.is_timeout() => {}
                Err(e) => return Err(lost(e)),
            }
            let seen = source.seen.load(Ordering::Acquire);
            if seen >= source.want.load(Ordering::Acquire)
                && source.synced_since.load(Ordering::Acquire) == UNSYNCED
            {
                source
                    .synced_since
                    .store(self.tier.now(), Ordering::Release);
            }
            if last_marker.elapsed() > SILENCE {
                return Err(Failure::Lost(format!(
                    "no sync marker for {} ms",
                    SILENCE.as_millis()
                )));
            }
        }
    }

    /// Applies one push: the keys it names leave the tier; a marker of this node's is
    /// noted. True when it delivered a marker (any node's: the stream is alive).
    fn deliver(
        &self,
        source: &Source,
        kind: redis::PushKind,
        data: Vec<redis::Value>,
    ) -> Result<bool, Failure> {
        match kind {
            redis::PushKind::Invalidate => {}
            redis::PushKind::Disconnection => return Err(Failure::Lost("disconnected".into())),
            _ => return Ok(false),
        }
        let keys = match data.into_iter().next() {
            Some(redis::Value::Array(keys)) => keys,
            // No keys: FLUSHALL, FLUSHDB, or a full resynchronisation.
            _ => {
                self.tier.flush();
                return Ok(false);
            }
        };
        let mut marker = false;
        for key in keys {
            let Ok(key) = redis::from_redis_value::<String>(key) else {
                continue;
            };
            if let Some(rest) = key.strip_prefix(MARKER_PREFIX) {
                marker = true;
                let mine = rest
                    .strip_prefix(&self.node)
                    .and_then(|r| r.strip_prefix(':'));
                if let Some(n) = mine.and_then(|n| n.parse().ok()) {
                    source.seen.fetch_max(n, Ordering::AcqRel);
                    let _guard = self.delivered.0.lock();
                    self.delivered.1.notify_all();
                }
            } else if let Some(cache_key) = key.strip_prefix(KEY_PREFIX) {
                self.tier.invalidate(cache_key);
            }
        }
        Ok(marker)
    }

    /// Writes a marker on `master` and waits until every connection in sync delivered
    /// it: then every change the master made before now has left the tier. A
    /// connection that does not deliver it in time, or a marker that cannot be written,
    /// flushes the tier (the same guarantee, the hard way). Called before each
    /// heartbeat and before acknowledging an invalidation.
    pub(super) fn sync(&self, master: &Endpoint) {
        if matches!(self.state(), TierState::Refused(_)) {
            return;
        }
        let n = self.marker.fetch_add(1, Ordering::AcqRel) + 1;
        let written = master.run::<()>(
            redis::cmd("SET")
                .arg(format!("{MARKER_PREFIX}{}:{n}", self.node))
                .arg("")
                .arg("PX")
                .arg(MARKER_TTL_MS),
        );
        if let Err(e) = written {
            debug!("local tier: sync marker not written ({e}): flushed");
            self.tier.flush();
            return;
        }
        let deadline = Instant::now() + SYNC_WAIT;
        let sources: Vec<Arc<Source>> = self
            .sources
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .filter(|s| s.synced_since.load(Ordering::Acquire) != UNSYNCED)
            .cloned()
            .collect();
        let mut guard = self.delivered.0.lock().unwrap_or_else(|p| p.into_inner());
        loop {
            let behind: Vec<&Arc<Source>> = sources
                .iter()
                .filter(|s| {
                    s.seen.load(Ordering::Acquire) < n
                        && s.synced_since.load(Ordering::Acquire) != UNSYNCED
                })
                .collect();
            if behind.is_empty() {
                return;
            }
            let now = Instant::now();
            if now >= deadline {
                for source in behind {
                    debug!(
                        "local tier: {} did not deliver a sync marker within {} ms",
                        source.name,
                        SYNC_WAIT.as_millis()
                    );
                    // Flushed now; back in sync once it delivers this marker (what it
                    // delivers meanwhile still drops keys).
                    source.want.store(n, Ordering::Release);
                    if source.synced_since.swap(UNSYNCED, Ordering::AcqRel) != UNSYNCED {
                        self.tier.flush();
                    }
                }
                return;
            }
            guard = self
                .delivered
                .1
                .wait_timeout(guard, deadline - now)
                .unwrap_or_else(|p| p.into_inner())
                .0;
        }
    }
}

impl Tracking {
    /// Stops the supervisor and every connection's thread (within a tick).
    pub(super) fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        self.tier.set_on(false);
    }
}

enum Failure {
    /// Redis refused tracking: not retried.
    Refused(String),
    /// The connection failed or fell silent: retried.
    Lost(String),
}
