//! An invalidation's reach over every node and every replica: when a job returns, no
//! node reads what it deleted from a replica that has not applied the deletes yet,
//! whatever the replica's state (lagging, paused, cut off from its master).
//!
//! The master keeps a counter of completed jobs (`a` in the control hash,
//! `echo:v1:control`), incremented by each job AFTER its deletes: replication is one
//! ordered stream, so a replica whose copy of the counter is at least C has applied the
//! deletes of every job numbered up to C. Every lookup reads the replica's counter with
//! the entry (no extra round trip) and each node keeps a fence: the highest counter it
//! knows of. A replica behind the fence is not trusted for that read (the master
//! answers instead).
//!
//! A job raises every node's fence before it returns: it publishes its number, each
//! node raises its fence and acknowledges it with its heartbeat (`echo:v1:nodes`, scored
//! by the master's clock, and `echo:v1:seen`), and the job waits until every node that
//! beat within the lease has acknowledged. A node beats only after a round trip on its
//! subscription (which delivers everything published before it), so a beating node
//! hears every announcement. A node that cannot hear or beat (its
//! subscription or the master lost) stops trusting replicas within half a lease, before
//! any job could stop waiting for it: correct by construction, whatever the network does.
//!
//! Invariants: the counter only grows, and only after a job's deletes; a node's fence
//! only grows; a node trusts replicas only while its subscription is up and its last
//! heartbeat is younger than half the lease; a job waits at most a lease and two heartbeats
//! for acknowledgements, and says how many it got; control keys have no TTL
//! (a `volatile-*` eviction policy never evicts them).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::endpoint::{millis, Endpoint};
use crate::store::StoreError;

/// The control hash: `g` the invalidation generation (bumped when a ban is recorded,
/// before a job's deletes), `a` the completed jobs (bumped after them).
pub(super) const CONTROL_KEY: &str = "echo:v1:control";
/// Where a completed job's number is announced.
pub(super) const APPLIED_CHANNEL: &str = "echo:v1:applied";
/// Live nodes, scored by their last heartbeat (the master's clock, ms).
const NODES_KEY: &str = "echo:v1:nodes";
/// The fence each node last acknowledged.
const SEEN_KEY: &str = "echo:v1:seen";
/// A node that has not beaten for this long is not waited for; a node stops trusting
/// replicas after half of it without a heartbeat.
pub(super) const LEASE: Duration = Duration::from_secs(2);
/// How often a node beats.
pub(super) const HEARTBEAT: Duration = Duration::from_millis(250);
/// How often a job looks at the acknowledgements while it waits for them.
const ACK_POLL: Duration = Duration::from_millis(2);

/// Where every known node stands with a fence: KEYS nodes, seen; ARGV lease (ms),
/// fence. Returns node => ACKED, MISSING (live, not acknowledged) or SILENT (no beat
/// within the lease), and forgets the acknowledgements of forgotten nodes.
const STANDING_SCRIPT: &str = r#"
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local live_from = now - tonumber(ARGV[1])
local out = {}
for _, node in ipairs(redis.call('HKEYS', KEYS[2])) do
  local beat = redis.call('ZSCORE', KEYS[1], node)
  if not beat then
    redis.call('HDEL', KEYS[2], node)
  else
    local standing = 2 -- SILENT
    if tonumber(redis.call('HGET', KEYS[2], node) or '0') >= tonumber(ARGV[2]) then
      standing = 0 -- ACKED
    elseif tonumber(beat) >= live_from then
      standing = 1 -- MISSING
    end
    table.insert(out, node)
    table.insert(out, standing)
  end
end
return out
"#;
/// A node's standing in what `STANDING_SCRIPT` returns.
const ACKED: u8 = 0;
const MISSING: u8 = 1;
const SILENT: u8 = 2;

/// What a job's WAIT asks of the replicas.
pub(super) struct ReplicaWait {
    /// How many must have the job; 0: no WAIT.
    pub(super) replicas: u64,
    pub(super) timeout: Duration,
    /// What every call gets as its read timeout.
    pub(super) read_timeout: Duration,
}

/// How far a completed job reached.
pub(super) struct Reach {
    /// Replicas that acknowledged it, of those asked for (None: no WAIT).
    pub(super) replicas: Option<(u64, u64)>,
    /// Other nodes that acknowledged it, of those waited for.
    pub(super) nodes: (u64, u64),
}

/// This node's fence and its standing.
pub(super) struct Fence {
    /// This node's name among the nodes (unique per process start).
    node: String,
    fence: AtomicU64,
    /// The subscription to announcements is up (and the fence synchronised).
    subscribed: AtomicBool,
    /// When the last heartbeat was written (ms since `epoch`); 0: never.
    last_beat: AtomicU64,
    epoch: Instant,
    /// The master's clock minus this node's (ms), measured when the subscription (re)starts:
    /// heartbeats are scored in the master's time, one clock for every node.
    master_offset: std::sync::atomic::AtomicI64,
    standing_script: redis::Script,
}

impl Fence {
    pub(super) fn new(node: String) -> Fence {
        Fence {
            node,
            fence: AtomicU64::new(0),
            subscribed: AtomicBool::new(false),
            last_beat: AtomicU64::new(0),
            epoch: Instant::now(),
            master_offset: std::sync::atomic::AtomicI64::new(0),
            standing_script: redis::Script::new(STANDING_SCRIPT),
        }
    }

    /// The highest completed job this node knows of.
    pub(super) fn current(&self) -> u64 {
        self.fence.load(Ordering::Acquire)
    }

    /// Raises the fence to `applied` (never lowers it).
    pub(super) fn raise(&self, applied: u64) {
        self.fence.fetch_max(applied, Ordering::AcqRel);
    }

    /// May this node read from replicas now? Only while it hears announcements and its
    /// heartbeat is fresh: a job stops waiting for a silent node after a lease, and by
    /// then the node has stopped trusting replicas.
    pub(super) fn trusted(&self) -> bool {
        let beat = self.last_beat.load(Ordering::Acquire);
        self.subscribed.load(Ordering::Acquire) && beat > 0 && self.now() < beat + millis(LEASE) / 2
    }

    /// The subscription is up and the fence synchronised (true), or lost (false).
    pub(super) fn set_subscribed(&self, up: bool) {
        self.subscribed.store(up, Ordering::Release);
    }

    /// Measures the master's clock against this node's (one TIME), for heartbeats.
    pub(super) fn sync_clock(&self, master: &Endpoint) -> Result<(), StoreError> {
        let before = wall_millis();
        let (secs, micros): (i64, i64) = master.run(&redis::cmd("TIME"))?;
        let after = wall_millis();
        let master_now = secs * 1000 + micros / 1000;
        self.master_offset
            .store(master_now - (before + after) / 2, Ordering::Release);
        Ok(())
    }

    /// Writes this node's heartbeat (scored in the master's time) and acknowledged fence
    /// `acked` (the fence as it was before the local tier, if any, was synced past it:
    /// see `tracking`) on `master`, and forgets nodes silent for ten leases. Plain
    /// commands, not a script: they stand apart from what requests send.
    pub(super) fn beat(&self, master: &Endpoint, acked: u64) -> Result<(), StoreError> {
        // The time is taken before the call: the lease counts from no later than the
        // write.
        let sent = self.now().max(1);
        let fence = acked;
        let now = wall_millis() + self.master_offset.load(Ordering::Acquire);
        let forget = now - 10 * millis(LEASE) as i64;
        let mut pipe = redis::pipe();
        pipe.atomic()
            .cmd("ZADD")
            .arg(NODES_KEY)
            .arg(now)
            .arg(&self.node)
            .ignore()
            .cmd("HSET")
            .arg(SEEN_KEY)
            .arg(&self.node)
            .arg(fence)
            .ignore()
            .cmd("ZREMRANGEBYSCORE")
            .arg(NODES_KEY)
            .arg("-inf")
            .arg(forget)
            .ignore();
        master.with_conn(|c| pipe.query::<()>(c))?;
        self.last_beat.fetch_max(sent, Ordering::AcqRel);
        Ok(())
    }

    /// Completes a job on `master` after its deletes: bumps the completed-jobs counter,
    /// announces it, waits for the replicas to have it (WAIT: replication is one ordered
    /// stream, so a replica that has the counter has the deletes that came before it,
    /// whichever connection sent them), and waits for every live node to acknowledge it.
    /// A node that neither acknowledges nor beats drops out of the live ones a lease
    /// after its last beat (by then it has stopped trusting replicas), so the wait ends
    /// within about a lease.
    pub(super) fn complete(
        &self,
        master: &Endpoint,
        wait: &ReplicaWait,
    ) -> Result<Reach, StoreError> {
        // A node beats only after a round trip on its subscription, so a node that beats
        // after the announcement has heard it; one that stops beating drops out a lease
        // after its last beat, at most a heartbeat (and a round trip) after this.
        let deadline = Instant::now() + LEASE + 2 * HEARTBEAT;
        let (applied, replicas) = master.with_conn(|c| {
            let applied: u64 = redis::cmd("HINCRBY")
                .arg(CONTROL_KEY)
                .arg("a")
                .arg(1)
                .query(c)?;
            redis::cmd("PUBLISH")
                .arg(APPLIED_CHANNEL)
                .arg(applied)
                .query::<()>(c)?;
            if wait.replicas == 0 {
                return Ok((applied, None));
            }
            // WAIT itself blocks for up to its timeout: the connection's read timeout
            // must outlast it, then go back to what every call gets.
            c.set_read_timeout(Some(wait.timeout + wait.read_timeout))?;
            let acked: redis::RedisResult<u64> = redis::cmd("WAIT")
                .arg(wait.replicas)
                .arg(millis(wait.timeout))
                .query(c);
            c.set_read_timeout(Some(wait.read_timeout))?;
            Ok((applied, Some((acked?, wait.replicas))))
        })?;
        self.raise(applied);
        // The other nodes live when the job was announced are waited for; nodes that
        // start later read the counter when they subscribe.
        let mut waited: Option<Vec<String>> = None;
        loop {
            let standing: std::collections::HashMap<String, u8> = master.with_conn(|c| {
                self.standing_script
                    .key(NODES_KEY)
                    .key(SEEN_KEY)
                    .arg(millis(LEASE))
                    .arg(applied)
                    .invoke(c)
            })?;
            let waited = waited.get_or_insert_with(|| {
                standing
                    .iter()
                    .filter(|(node, s)| **s != SILENT && **node != self.node)
                    .map(|(node, _)| node.clone())
                    .collect()
            });
            let of = |want: u8| {
                waited
                    .iter()
                    .filter(|n| standing.get(*n) == Some(&want))
                    .count() as u64
            };
            let (acked, missing) = (of(ACKED), of(MISSING));
            let all = waited.len() as u64;
            let reach = Reach {
                replicas,
                nodes: (acked, all),
            };
            if missing == 0 {
                return Ok(reach);
            }
            if Instant::now() >= deadline {
                log::warn!(
                    "invalidation {applied}: {missing} node(s) neither acknowledged nor went \
                     silent within a lease: {}",
                    waited
                        .iter()
                        .filter(|n| standing.get(*n) == Some(&MISSING))
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                );
                return Ok(reach);
            }
            std::thread::sleep(ACK_POLL);
        }
    }

    fn now(&self) -> u64 {
        millis(self.epoch.elapsed())
    }
}

/// This machine's clock, in ms since the epoch.
fn wall_millis() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}
