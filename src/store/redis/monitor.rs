//! What each Redis server is doing now ([`Monitor`]): a thread that asks every server
//! for `INFO replication` and `INFO memory` every half second, on connections of its own,
//! and keeps what it found for `/health` and the metrics (which never make a round trip
//! of their own).
//!
//! What it does with what it finds:
//! - a replica is read from only while it is reachable, says it is a replica, its link
//!   to the master is up, it replicates the master Echo writes to, and it is behind
//!   that master by at most `redis.max_replica_lag_ms` ([`Endpoint::set_readable`]);
//!   the fence (`fence`) keeps invalidations safe whatever this finds, this bounds how
//!   old everything else read from a replica may be;
//! - lag is measured in time, not bytes: each round records the master's replication
//!   offset; a replica at offset X is as far behind as the oldest recorded master offset
//!   above X is old (to within a round);
//! - a server it reaches again closes its breaker (caching resumes within a round, not
//!   after the breaker's open period and a request's probe); one it cannot reach has its
//!   pooled connections dropped at their next checkout;
//! - an `allkeys-*` eviction policy is warned about in the log when first seen on a
//!   server (and again after each reconnect), and shown in `/health` for as long as it
//!   stays: it may evict the control state that keeps invalidations from being undone.
//!
//! Invariants: nothing here blocks a request; each round looks at the servers the
//! topology has then (a failover is followed); the thread ends with the store.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{Receiver, RecvTimeoutError, Sender};
use log::warn;
use redis::InfoDict;

use super::endpoint::Endpoint;
use super::topology::Topology;
use crate::config::RedisConfig;
use crate::store::{ServerHealth, StoreError};

/// How often every server is looked at.
pub(super) const EVERY: Duration = Duration::from_millis(500);
/// The monitor's connect and read timeouts at least (the `[redis]` ones when longer):
/// a server that is merely busy is not reported unreachable (which drops its pooled
/// connections).
const PROBE_TIMEOUT: Duration = Duration::from_secs(1);
/// A server that refused a write as full this recently is reported out of memory.
const OOM_SHOWN_FOR: Duration = Duration::from_secs(5);
/// Master offsets kept to measure lag by (a minute of rounds).
const HISTORY: usize = 120;

/// The monitor thread's findings; the thread ends when this is dropped.
pub(super) struct Monitor {
    found: Arc<RwLock<Arc<Vec<ServerHealth>>>>,
    _stop: Sender<()>,
}

impl Monitor {
    pub(super) fn start(topology: Arc<Topology>, cfg: &RedisConfig) -> Result<Monitor, StoreError> {
        let found = Arc::new(RwLock::new(Arc::new(Vec::new())));
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let mut watch = Watch {
            topology,
            found: Arc::clone(&found),
            max_lag: cfg.max_replica_lag,
            conns: HashMap::new(),
            offsets: Offsets::default(),
            policies: HashMap::new(),
        };
        std::thread::Builder::new()
            .name("echo-redis-monitor".into())
            .spawn(move || watch.run(stopped))
            .map_err(|e| StoreError::Setup(format!("cannot start the redis monitor: {e}")))?;
        Ok(Monitor { found, _stop: stop })
    }

    /// Every server as last found (the servers of the topology then; before the first
    /// round, none).
    pub(super) fn found(&self) -> Arc<Vec<ServerHealth>> {
        Arc::clone(&self.found.read().unwrap_or_else(|e| e.into_inner()))
    }
}

/// What one round read from one server.
struct Info {
    role: String,
    replid: Option<String>,
    offset: Option<u64>,
    link: Option<String>,
    policy: Option<String>,
    used: Option<u64>,
    /// INFO stats `evicted_keys`: keys Redis dropped for `maxmemory` since it started.
    evicted: Option<u64>,
    /// Memory Redis does not count against `maxmemory` (replication and AOF buffers).
    not_counted: u64,
    max: Option<u64>,
}

struct Watch {
    topology: Arc<Topology>,
    found: Arc<RwLock<Arc<Vec<ServerHealth>>>>,
    max_lag: Duration,
    /// The monitor's own connection to each server (by `role address`).
    conns: HashMap<String, redis::Connection>,
    /// The master's replication offsets, to measure lag by.
    offsets: Offsets,
    /// The eviction policy each server had when last warned about or found fine.
    policies: HashMap<String, String>,
}

impl Watch {
    fn run(&mut self, stopped: Receiver<()>) {
        loop {
            self.round();
            match stopped.recv_timeout(EVERY) {
                Err(RecvTimeoutError::Timeout) => {}
                _ => return,
            }
        }
    }

    /// Looks at every server once and publishes what it found.
    fn round(&mut self) {
        let servers = self.topology.servers();
        let mut found = Vec::new();
        let mut master_info = None;
        if let Some(master) = &servers.master {
            let (health, info) = self.look(master);
            if let Some(Info {
                replid: Some(replid),
                offset: Some(offset),
                ..
            }) = &info
            {
                self.offsets.record(replid, *offset, Instant::now());
            }
            master_info = info;
            found.push(health);
        }
        for replica in &servers.replicas {
            let (mut health, info) = self.look(replica);
            if let Some(info) = &info {
                self.judge_replica(&mut health, info, master_info.as_ref());
            }
            let readable = health.degraded.is_empty();
            replica.set_readable(readable);
            health.readable = Some(readable);
            found.push(health);
        }
        let live: Vec<String> = servers.all().map(|e| conn_key(e)).collect();
        self.conns.retain(|k, _| live.contains(k));
        *self.found.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(found);
    }

    /// One server: what it says, and what is wrong with it whatever its role.
    fn look(&mut self, endpoint: &Endpoint) -> (ServerHealth, Option<Info>) {
        let mut health = ServerHealth {
            server: endpoint.name.clone(),
            role: endpoint.role(),
            checked: true,
            ..ServerHealth::default()
        };
        let info = match self.info(endpoint) {
            Ok(info) => {
                endpoint.reached();
                info
            }
            Err(e) => {
                endpoint.unreached();
                health
                    .degraded
                    .push(("unreachable", format!("unreachable: {}", detail(&e))));
                return (health, None);
            }
        };
        health.reachable = true;
        health.reported_role = Some(match info.role.as_str() {
            "slave" => "replica".to_string(),
            other => other.to_string(),
        });
        health.link = info.link.clone();
        health.maxmemory_policy = info.policy.clone();
        health.used_memory = info.used;
        health.evicted_keys = info.evicted;
        health.maxmemory = info.max;
        if endpoint.breaker_open() {
            health
                .degraded
                .push(("breaker_open", "skipped (circuit open)".into()));
        }
        if endpoint.role() == "master" && info.role != "master" {
            health.degraded.push((
                "readonly",
                "not a master: it says it is a replica (writes answer READONLY)".into(),
            ));
        }
        let full = info.policy.as_deref() == Some("noeviction")
            && matches!((info.used, info.max), (Some(used), Some(max))
                if max > 0 && used.saturating_sub(info.not_counted) >= max);
        if full || endpoint.refused_as_full_within(OOM_SHOWN_FOR) {
            health.degraded.push((
                "out_of_memory",
                format!(
                    "out of memory: used {} of maxmemory {} ({}): writes are refused",
                    info.used.unwrap_or(0),
                    info.max.unwrap_or(0),
                    info.policy.as_deref().unwrap_or("?"),
                ),
            ));
        }
        if let Some(policy) = &info.policy {
            let evicts_control = policy.starts_with("allkeys-");
            if evicts_control {
                health.degraded.push((
                    "evicting_control_state",
                    format!(
                        "maxmemory-policy {policy} may evict Echo's control state (bans, the \
                         invalidation counters) and undo invalidations: use volatile-ttl"
                    ),
                ));
            }
            let key = conn_key(endpoint);
            if self.policies.get(&key) != Some(policy) {
                if evicts_control {
                    warn!(
                        "{}: maxmemory-policy is {policy}: Redis may evict Echo's bans and \
                         invalidation counters, and an evicted ban lets a fill store an \
                         entry an invalidation deleted; set maxmemory-policy volatile-ttl \
                         (every entry has a TTL, control keys none)",
                        endpoint.server()
                    );
                }
                self.policies.insert(key, policy.clone());
            }
        }
        (health, Some(info))
    }

    /// A replica: linked, replicating the master Echo writes to, and how far behind.
    fn judge_replica(&self, health: &mut ServerHealth, info: &Info, master: Option<&Info>) {
        if info.role != "slave" {
            health.degraded.push((
                "not_replica",
                "not a replica: it says it is a master".into(),
            ));
            return;
        }
        if info.link.as_deref() != Some("up") {
            health
                .degraded
                .push(("link_down", "its link to the master is down".into()));
            return;
        }
        let Some(master) = master else {
            // Its lag cannot be measured this round (the master did not answer): no
            // verdict. Invalidations stay safe through the fence whatever it does.
            return;
        };
        if master.replid.is_none() || info.replid != master.replid {
            health.degraded.push((
                "not_replicating",
                "it replicates another master (its replication id is not the master's)".into(),
            ));
            return;
        }
        let lag = self.offsets.lag(info.offset.unwrap_or(0), Instant::now());
        health.lag = Some(lag);
        if lag > self.max_lag {
            health.degraded.push((
                "lagging",
                format!(
                    "lagging {} ms behind the master (redis.max_replica_lag_ms {})",
                    lag.as_millis(),
                    self.max_lag.as_millis()
                ),
            ));
        }
    }

    /// `INFO replication` and `INFO memory` of `endpoint`, on the monitor's connection
    /// (made again after any failure).
    fn info(&mut self, endpoint: &Endpoint) -> Result<Info, StoreError> {
        let key = conn_key(endpoint);
        let mut conn = match self.conns.remove(&key) {
            Some(conn) => conn,
            None => {
                // A new connection: the eviction policy is checked (and warned about)
                // again.
                self.policies.remove(&key);
                endpoint.connect(PROBE_TIMEOUT)?
            }
        };
        let mut pipe = redis::pipe();
        pipe.cmd("INFO")
            .arg("replication")
            .cmd("INFO")
            .arg("memory")
            .cmd("INFO")
            .arg("stats");
        let (replication, memory, stats): (InfoDict, InfoDict, InfoDict) =
            pipe.query(&mut conn).map_err(|e| StoreError::Unavailable {
                server: endpoint.server(),
                detail: e.to_string(),
            })?;
        self.conns.insert(key, conn);
        let offset = replication
            .get::<u64>("slave_repl_offset")
            .or_else(|| replication.get("master_repl_offset"));
        Ok(Info {
            role: replication.get("role").unwrap_or_default(),
            replid: replication.get("master_replid"),
            offset,
            link: replication.get("master_link_status"),
            policy: memory.get("maxmemory_policy"),
            used: memory.get("used_memory"),
            evicted: stats.get("evicted_keys"),
            not_counted: memory.get("mem_not_counted_for_evict").unwrap_or(0),
            max: memory.get("maxmemory"),
        })
    }
}

/// The master's replication offset at each round, to tell how long ago it had written
/// what a replica has not applied yet.
#[derive(Default)]
struct Offsets {
    /// The replication id the offsets are of (a new master starts a new history).
    replid: Option<String>,
    /// Oldest first.
    history: VecDeque<(Instant, u64)>,
}

impl Offsets {
    fn record(&mut self, replid: &str, offset: u64, at: Instant) {
        if self.replid.as_deref() != Some(replid) {
            self.replid = Some(replid.to_string());
            self.history.clear();
        }
        self.history.push_back((at, offset));
        if self.history.len() > HISTORY {
            self.history.pop_front();
        }
    }

    /// How far behind a replica at `offset` is at `now`: since the first round that saw
    /// the master past it (zero if none did).
    fn lag(&self, offset: u64, now: Instant) -> Duration {
        self.history
            .iter()
            .find(|(_, o)| *o > offset)
            .map_or(Duration::ZERO, |(at, _)| now.saturating_duration_since(*at))
    }
}

/// The monitor's name for a server's connection.
fn conn_key(endpoint: &Endpoint) -> String {
    format!("{} {}", endpoint.role(), endpoint.name)
}

/// An error's text without the server's name (the report names it already).
fn detail(e: &StoreError) -> String {
    match e {
        StoreError::Timeout { detail, .. }
        | StoreError::Unavailable { detail, .. }
        | StoreError::Decode { detail, .. }
        | StoreError::NotMaster { detail, .. }
        | StoreError::OutOfMemory { detail, .. }
        | StoreError::Redis { detail, .. } => detail.clone(),
        other => other.to_string(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lag_is_the_age_of_the_first_master_offset_a_replica_has_not_reached() {
        let t0 = Instant::now();
        let at = |ms| t0 + Duration::from_millis(ms);
        let mut offsets = Offsets::default();
        for (ms, offset) in [(0, 100), (500, 200), (1000, 300)] {
            offsets.record("a", offset, at(ms));
        }
        let now = at(1200);
        assert_eq!(offsets.lag(300, now), Duration::ZERO, "caught up");
        assert_eq!(
            offsets.lag(400, now),
            Duration::ZERO,
            "ahead of the last round"
        );
        assert_eq!(offsets.lag(250, now), Duration::from_millis(200));
        assert_eq!(offsets.lag(150, now), Duration::from_millis(700));
        assert_eq!(offsets.lag(0, now), Duration::from_millis(1200));
        // A new master: offsets of the old one say nothing.
        offsets.record("b", 10, at(1100));
        assert_eq!(offsets.lag(150, now), Duration::ZERO);
        assert_eq!(offsets.lag(5, now), Duration::from_millis(100));
        // The history is bounded.
        for i in 0..(HISTORY as u64 * 2) {
            offsets.record("b", 20 + i, at(1100 + i));
        }
        assert_eq!(offsets.history.len(), HISTORY);
    }
}
