//! The background upkeep of Redis's indexes, a budget of work per call, run by the
//! invalidation thread while it idles (`Store::tidy`): the tag sets (members whose entry
//! expired or was evicted), and the path index (entries stored before it existed, and
//! members and sites whose entries are gone). Each walk keeps where it got to between
//! calls; an error leaves it there for the next.

use std::sync::Mutex;

use super::fence::CONTROL_KEY;
use super::index::{self, SITES_KEY};
use super::{RedisStore, ENTRY_PREFIX, TAG_PREFIX};
use crate::invalidation::Progress;

/// The control hash's field set once a pass of the index walk found every stored entry
/// in its site's index: from then on, jobs with a literal prefix read index ranges.
/// (`ix` meant the same of the index before shards, which a complete pass removes.)
const INDEX_COMPLETE: &str = "ixs";

/// Keys the index walks look at per second while the invalidation thread idles.
const INDEX_SWEEP_PER_SEC: usize = 10_000;

/// Does the path index hold every entry (see `INDEX_COMPLETE`)?
pub(super) fn index_complete(conn: &mut redis::Connection) -> redis::RedisResult<bool> {
    let done: Option<u8> = redis::cmd("HGET")
        .arg(CONTROL_KEY)
        .arg(INDEX_COMPLETE)
        .query(conn)?;
    Ok(done == Some(1))
}

impl RedisStore {
    /// Runs one walk's step on a master connection, with where it got to (nothing
    /// while no master is known; an error waits for the next call).
    fn on_master_walk<W>(
        &self,
        walk: &Mutex<W>,
        step: impl FnOnce(&mut redis::Connection, &mut W) -> redis::RedisResult<()>,
    ) {
        let servers = self.topology.servers();
        let Ok(master) = servers.master() else {
            return;
        };
        let mut walk = walk.lock().unwrap_or_else(|e| e.into_inner());
        let _ = master.with_conn(|conn| step(conn, &mut walk));
    }
}

/// Where the walk over the tag sets is: the keyspace SCAN's cursor, the sets it found
/// and not yet walked, and the set being walked (with its SSCAN cursor).
#[derive(Default)]
pub(super) struct TagTidy {
    scan: u64,
    sets: std::collections::VecDeque<String>,
    current: Option<(String, u64)>,
}

impl RedisStore {
    /// Walks the tag sets a little further, dropping members whose entry is gone
    /// (expired or evicted: nothing else takes them out of a set a fill no longer
    /// writes to). Tag sets have no TTL, so that an eviction policy on volatile keys
    /// never takes an index away from its entries; this walk, and the trim in the store
    /// script, keep them about the size of what they index. Errors wait for the next
    /// call.
    pub(super) fn tidy_tags(&self) {
        // Called about once a second: the budget is per second.
        let mut budget = self.tag_sweep_per_sec;
        if budget == 0 {
            return;
        }
        let progress = Progress::default();
        self.on_master_walk(&self.tag_tidy, |conn, walk| {
            while budget > 0 {
                if let Some((set, cursor)) = walk.current.take() {
                    let (next, members): (u64, Vec<String>) = redis::cmd("SSCAN")
                        .arg(&set)
                        .arg(cursor)
                        .arg("COUNT")
                        .arg(self.scan_count)
                        .query(conn)?;
                    budget = budget.saturating_sub(members.len().max(1));
                    let _ = self.present_members(conn, &set, members, false, &progress)?;
                    if next != 0 {
                        walk.current = Some((set, next));
                    }
                } else if let Some(set) = walk.sets.pop_front() {
                    walk.current = Some((set, 0));
                } else {
                    let (next, sets): (u64, Vec<String>) = redis::cmd("SCAN")
                        .arg(walk.scan)
                        .arg("MATCH")
                        .arg(format!("{TAG_PREFIX}*"))
                        .arg("COUNT")
                        .arg(self.scan_count)
                        .query(conn)?;
                    // A page of the keyspace costs what its keys would.
                    budget = budget.saturating_sub(self.scan_count);
                    walk.scan = next;
                    walk.sets.extend(sets);
                    if next == 0 {
                        // A whole pass: the next starts with the next call.
                        break;
                    }
                }
            }
            Ok(())
        });
    }
}

/// Where the path index walks are: the backfill's SCAN (entries stored before the index
/// existed, or by an older Echo) and what it added this pass; the prune's sites left and
/// the site index being walked (with the last target it read).
#[derive(Default)]
pub(super) struct IndexTidy {
    scan: u64,
    added: u64,
    sites: std::collections::VecDeque<String>,
    current: Option<(String, Option<String>)>,
}

impl RedisStore {
    /// Walks the path index a little further, a budget of keys per call (about once a
    /// second). Until the index is complete, a SCAN adds every entry it finds to its
    /// site's index, and a pass that had nothing to add marks it complete. Then a walk
    /// over each site's index drops members whose entry expired or was evicted, and
    /// sites left with none. Errors wait for the next call.
    pub(super) fn tidy_index(&self) {
        let mut budget = INDEX_SWEEP_PER_SEC;
        self.on_master_walk(&self.index_tidy, |conn, walk| {
            if !index_complete(conn)? {
                while budget > 0 {
                    let (next, keys): (u64, Vec<String>) = redis::cmd("SCAN")
                        .arg(walk.scan)
                        .arg("MATCH")
                        .arg(format!("{ENTRY_PREFIX}*"))
                        .arg("COUNT")
                        .arg(self.scan_count)
                        .query(conn)?;
                    budget = budget.saturating_sub(self.scan_count);
                    walk.added += index::index_entries(conn, &keys)?;
                    walk.scan = next;
                    if next == 0 {
                        if walk.added == 0 {
                            // The index before shards is no longer read.
                            let sites: Vec<String> =
                                redis::cmd("SMEMBERS").arg(SITES_KEY).query(conn)?;
                            let mut pipe = redis::pipe();
                            for site in &sites {
                                pipe.cmd("UNLINK").arg(index::unsharded_key(site)).ignore();
                            }
                            pipe.cmd("HSET")
                                .arg(CONTROL_KEY)
                                .arg(INDEX_COMPLETE)
                                .arg(1)
                                .ignore();
                            pipe.query::<()>(conn)?;
                        }
                        walk.added = 0;
                        return Ok(());
                    }
                }
                return Ok(());
            }
            while budget > 0 {
                if let Some((site, last)) = walk.current.take() {
                    let from = match &last {
                        Some(t) => index::Start::After(t),
                        None => index::Start::At(""),
                    };
                    let page = self.scan_count.max(1);
                    let targets = index::range(conn, &site, from, b"+", page)?;
                    budget = budget.saturating_sub(targets.len().max(1));
                    let _ = index::present(conn, &site, &targets, true)?;
                    if targets.len() == page {
                        walk.current = Some((site, targets.last().cloned()));
                    } else {
                        index::forget_if_empty(conn, &site)?;
                    }
                } else if let Some(site) = walk.sites.pop_front() {
                    walk.current = Some((site, None));
                } else {
                    let sites: Vec<String> = redis::cmd("SMEMBERS").arg(SITES_KEY).query(conn)?;
                    budget = budget.saturating_sub(sites.len().max(1));
                    walk.sites.extend(sites);
                    // A whole pass: the next starts with the next call.
                    break;
                }
            }
            Ok(())
        });
    }
}
