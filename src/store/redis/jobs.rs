//! Invalidation jobs on Redis: a job's ban, its sweep over what it matches (a SCAN
//! narrowed by the pattern's literal prefix, or the tag's set) in batches on one
//! connection, and its completion (see `fence`).
//!
//! Invariants:
//! - the ban is recorded before the first delete, except with Redis full (`maxmemory`
//!   under `noeviction`): then deletes come first (they free memory), the ban next, and a
//!   second sweep removes what a fill stored in between; what could not be done is in
//!   the outcome's warnings;
//! - a key SCAN returns twice is counted once; a tag set's members are matched only if
//!   their entry exists (checked on the master, the missing ones removed from the set);
//! - a cancel or the job's budget stops it at its next check, with what it did reported
//!   and no completion (the job is not done).

use std::collections::HashSet;
use std::hash::{Hash, Hasher};
use std::sync::atomic::Ordering;

use super::endpoint::{is_out_of_memory, Endpoint};
use super::fence::ReplicaWait;
use super::tidy::index_complete;
use super::topology::Servers;
use super::{
    bans, codec, index, unlink_indexed, RedisStore, BATCH, ENTRY_PREFIX, KEY_PREFIX, SITES_KEY,
    TAG_PREFIX,
};
use crate::invalidation::{Checkpoint, Job, JobOutcome, Matcher, Mode, Progress, Stop, SAMPLE};
use crate::store::StoreError;

/// Of some members of a tag set, those whose entry is still stored. The others (deleted
/// or expired since: nothing takes them out of their sets then) are removed from the set
/// too when ARGV[1] is 1, atomically with the check, so a fill storing one of them again
/// (SET and SADD, one step) is either seen or keeps its SADD. KEYS: the tag set, then the
/// members. ARGV: 1 to remove the missing, 0 to leave the set alone (dry runs).
pub(super) const TAG_MEMBERS_SCRIPT: &str = r#"
local present = {}
for i = 2, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    present[#present + 1] = KEYS[i]
  elseif ARGV[1] == '1' then
    redis.call('SREM', KEYS[1], KEYS[i])
  end
end
return present
"#;

/// One sweep's state: the batch waiting for its mode, the keys already counted (as
/// fingerprints), its checkpoint, and the entries deleted where a stale copy could not
/// be written.
struct Pass<'p> {
    batch: Vec<String>,
    seen: HashSet<u64>,
    checkpoint: Checkpoint<'p>,
    deleted_instead: u64,
}

impl RedisStore {
    /// The SCAN glob for a matcher: the literal prefix of the pattern narrows it.
    fn scan_glob(matcher: &Matcher) -> String {
        let host = matcher.host().map_or("*".to_string(), glob_escape);
        let prefix = matcher.prefix().map(glob_escape).unwrap_or_default();
        // `http*`: both schemes (`https` keys too).
        format!("{ENTRY_PREFIX}*://{host}{prefix}*")
    }

    /// The members of a tag set (one SSCAN reply) whose entries are still stored, checked
    /// on the master `BATCH` at a time, with the job's progress checked between batches;
    /// the missing ones are removed from the set unless `keep_missing` (a dry run).
    pub(super) fn present_members(
        &self,
        conn: &mut redis::Connection,
        tag_set: &str,
        members: Vec<String>,
        keep_missing: bool,
        progress: &Progress,
    ) -> redis::RedisResult<Result<Vec<String>, Stop>> {
        let mut present = Vec::with_capacity(members.len());
        for (i, batch) in members.chunks(BATCH).enumerate() {
            if i > 0 {
                if let Err(stop) = progress.check() {
                    return Ok(Err(stop));
                }
            }
            let mut invocation = self.tag_members_script.prepare_invoke();
            invocation.key(tag_set);
            for member in batch {
                invocation.key(member);
            }
            invocation.arg(u8::from(!keep_missing));
            present.extend(invocation.invoke::<Vec<String>>(conn)?);
        }
        Ok(Ok(present))
    }

    /// What a job's WAIT asks of the replicas.
    pub(super) fn replica_wait(&self, servers: &Servers) -> ReplicaWait {
        ReplicaWait {
            replicas: self.wait_replicas.unwrap_or(servers.replicas.len() as u64),
            timeout: self.wait_timeout,
            read_timeout: self.read_timeout,
        }
    }

    /// A job on `master`: its ban, its sweep, and its completion (replicas and nodes).
    /// With Redis full (`maxmemory` under `noeviction`) the ban cannot be written before
    /// the deletes: they come first (they free memory), then the ban, then a second sweep
    /// for what a fill stored in between; what could not be done is reported.
    pub(super) fn run_job(
        &self,
        master: &Endpoint,
        servers: &Servers,
        job: &Job,
        progress: &Progress,
    ) -> Result<JobOutcome, StoreError> {
        let mut outcome = JobOutcome::default();
        if job.dry_run {
            self.sweep(master, job, progress, &mut outcome)?;
            return Ok(outcome);
        }
        let banned = match bans::record(master, &job.matcher, self.ban_ttl) {
            Ok(_) => true,
            Err(StoreError::OutOfMemory { .. }) => false,
            Err(e) => return Err(e),
        };
        self.sweep(master, job, progress, &mut outcome)?;
        if outcome.stopped.is_some() {
            return Ok(outcome);
        }
        if !banned {
            match bans::record(master, &job.matcher, self.ban_ttl) {
                Ok(_) if job.mode != Mode::Refresh => {
                    let mut again = JobOutcome::default();
                    self.sweep(master, job, progress, &mut again)?;
                    outcome.changed += again.changed;
                    outcome.stopped = again.stopped;
                    outcome.warnings.extend(again.warnings);
                    outcome.warnings.push(
                        "Redis was full (maxmemory, noeviction): the matched entries were \
                         deleted before the ban could be recorded, then swept again"
                            .into(),
                    );
                }
                Ok(_) => {}
                Err(e) => outcome.warnings.push(format!(
                    "the ban could not be recorded ({e}): a fill in flight during this job \
                     may still store a matched entry"
                )),
            }
            if outcome.stopped.is_some() {
                return Ok(outcome);
            }
        }
        // Done: the replicas and every node have it (nodes stop reading replicas that
        // have not applied it) before the job returns.
        match self.fence.complete(master, &self.replica_wait(servers)) {
            Ok(reach) => {
                outcome.replicas = reach.replicas;
                outcome.nodes = Some(reach.nodes);
            }
            Err(e @ StoreError::OutOfMemory { .. }) => outcome.warnings.push(format!(
                "the job could not be announced ({e}): replicas were not waited for, and \
                 other nodes may read a replica that has not applied it"
            )),
            Err(e) => return Err(e),
        }
        self.sync_own_tier(master);
        Ok(outcome)
    }

    /// One pass over what `job` matches (its sites' path index ranges when its pattern
    /// has a literal prefix and the index is complete; else its tag set, or a SCAN),
    /// applying its mode in batches on one connection.
    fn sweep(
        &self,
        master: &Endpoint,
        job: &Job,
        progress: &Progress,
        outcome: &mut JobOutcome,
    ) -> Result<(), StoreError> {
        let matcher = &job.matcher;
        let mut deleted_instead = 0;
        master.with_conn(|conn| {
            let mut pass = Pass {
                batch: Vec::with_capacity(BATCH),
                seen: HashSet::new(),
                checkpoint: Checkpoint::new(progress),
                deleted_instead: 0,
            };
            if let Some(urls) = matcher.urls() {
                self.walk_urls(conn, job, urls, progress, outcome, &mut pass)?;
            } else if matcher.tag().is_none()
                && matcher.prefix().is_some_and(|p| !p.is_empty())
                && index_complete(conn)?
            {
                self.walk_index(conn, job, progress, outcome, &mut pass)?;
            } else {
                self.walk_keys(conn, job, progress, outcome, &mut pass)?;
            }
            deleted_instead = pass.deleted_instead;
            if outcome.stopped.is_some() {
                return Ok(());
            }
            let n = self.apply(conn, job, &pass.batch, &mut pass.deleted_instead)?;
            deleted_instead = pass.deleted_instead;
            outcome.changed += n;
            progress.changed.fetch_add(n, Ordering::Relaxed);
            Ok(())
        })?;
        if deleted_instead > 0 {
            outcome.warnings.push(format!(
                "Redis is full (maxmemory, noeviction): {deleted_instead} entries were \
                 deleted instead of marked stale"
            ));
        }
        Ok(())
    }

    /// The literal prefix's range of each site's path index (the job's host's, or every
    /// site's): the cost is what the range holds, not the size of the keyspace. Members
    /// whose entry is gone (expired, evicted) are dropped from the index as they are met,
    /// never counted.
    fn walk_index(
        &self,
        conn: &mut redis::Connection,
        job: &Job,
        progress: &Progress,
        outcome: &mut JobOutcome,
        pass: &mut Pass<'_>,
    ) -> redis::RedisResult<()> {
        let matcher = &job.matcher;
        let prefix = matcher.prefix().unwrap_or("");
        let sites: Vec<String> = match matcher.host() {
            Some(host) => vec![format!("http://{host}"), format!("https://{host}")],
            None => redis::cmd("SMEMBERS").arg(SITES_KEY).query(conn)?,
        };
        // Past every target that starts with the prefix: no UTF-8 string holds 0xFF.
        let mut end = b"(".to_vec();
        end.extend_from_slice(prefix.as_bytes());
        end.push(0xFF);
        for site in sites {
            let mut last: Option<String> = None;
            loop {
                if let Err(stop) = progress.check() {
                    outcome.stopped = Some(stop);
                    return Ok(());
                }
                let from = match &last {
                    Some(t) => index::Start::After(t),
                    None => index::Start::At(prefix),
                };
                let targets = index::range(conn, &site, from, &end, BATCH)?;
                let full = targets.len() == BATCH;
                last = targets.last().cloned();
                progress
                    .scanned
                    .fetch_add(targets.len() as u64, Ordering::Relaxed);
                let mut members = Vec::new();
                for target in targets {
                    if let Err(stop) = pass.checkpoint.key(site.len() + target.len()) {
                        outcome.stopped = Some(stop);
                        return Ok(());
                    }
                    if matcher.matches_key(&format!("{site}{target}")) {
                        members.push(target);
                    }
                }
                for rkey in index::present(conn, &site, &members, !job.dry_run)? {
                    if !self.take(conn, job, rkey, progress, outcome, pass)? {
                        return Ok(());
                    }
                }
                if !full {
                    break;
                }
            }
        }
        Ok(())
    }

    /// A purge by URL: its keys, those still stored.
    fn walk_urls(
        &self,
        conn: &mut redis::Connection,
        job: &Job,
        urls: &std::collections::BTreeSet<String>,
        progress: &Progress,
        outcome: &mut JobOutcome,
        pass: &mut Pass<'_>,
    ) -> redis::RedisResult<()> {
        let rkeys: Vec<String> = urls.iter().map(|u| format!("{KEY_PREFIX}{u}")).collect();
        for batch in rkeys.chunks(BATCH) {
            if let Err(stop) = progress.check() {
                outcome.stopped = Some(stop);
                return Ok(());
            }
            progress
                .scanned
                .fetch_add(batch.len() as u64, Ordering::Relaxed);
            let mut pipe = redis::pipe();
            for rkey in batch {
                pipe.cmd("EXISTS").arg(rkey);
            }
            let exists: Vec<bool> = pipe.query(conn)?;
            for (rkey, exists) in batch.iter().zip(exists) {
                if exists && !self.take(conn, job, rkey.clone(), progress, outcome, pass)? {
                    return Ok(());
                }
            }
        }
        Ok(())
    }

    /// Every key (a SCAN narrowed by the pattern's literal prefix and host), or the
    /// job's tag set.
    fn walk_keys(
        &self,
        conn: &mut redis::Connection,
        job: &Job,
        progress: &Progress,
        outcome: &mut JobOutcome,
        pass: &mut Pass<'_>,
    ) -> redis::RedisResult<()> {
        let matcher = &job.matcher;
        let mut cursor: u64 = 0;
        // A cancel or the end of the budget stops the job at its next check: before
        // each SCAN (one may walk many keys and return none) and every few hundred
        // keys. What it did is reported; the matches not yet applied are left alone,
        // and there is no WAIT (the job is not done).
        loop {
            if let Err(stop) = progress.check() {
                outcome.stopped = Some(stop);
                return Ok(());
            }
            let (next, mut keys): (u64, Vec<String>) = match matcher.tag() {
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
            // A tag set still names the entries deleted or expired since they were
            // stored: only those still stored are matched (issue 15).
            if let Some(tag) = matcher.tag() {
                let set = format!("{TAG_PREFIX}{tag}");
                match self.present_members(conn, &set, keys, job.dry_run, progress)? {
                    Ok(present) => keys = present,
                    Err(stop) => {
                        outcome.stopped = Some(stop);
                        return Ok(());
                    }
                }
            }
            for rkey in keys {
                // A cancel or the end of the budget stops the job here, before the regex.
                if let Err(stop) = pass.checkpoint.key(rkey.len()) {
                    outcome.stopped = Some(stop);
                    return Ok(());
                }
                let Some(key) = rkey.strip_prefix(KEY_PREFIX) else {
                    continue;
                };
                // The tag part is already satisfied by the tag set.
                if !matcher.matches_key(key) {
                    continue;
                }
                if !self.take(conn, job, rkey, progress, outcome, pass)? {
                    return Ok(());
                }
            }
            cursor = next;
            if cursor == 0 {
                return Ok(());
            }
        }
    }

    /// One matching entry key: counted once (a SCAN may return a key twice, when Redis
    /// resizes its table during the scan, as this job's own deletes can make it),
    /// sampled, and batched for the job's mode. False when the job must stop.
    fn take(
        &self,
        conn: &mut redis::Connection,
        job: &Job,
        rkey: String,
        progress: &Progress,
        outcome: &mut JobOutcome,
        pass: &mut Pass<'_>,
    ) -> redis::RedisResult<bool> {
        if !pass.seen.insert(fingerprint(&rkey)) {
            return Ok(true);
        }
        let key = rkey.strip_prefix(KEY_PREFIX).unwrap_or(&rkey);
        outcome.matched += 1;
        progress.matched.fetch_add(1, Ordering::Relaxed);
        if outcome.sample.len() < SAMPLE {
            outcome.sample.push(key.to_string());
        }
        if job.dry_run {
            return Ok(true);
        }
        if job.mode == Mode::Refresh {
            outcome.to_refresh.push(key.to_string());
            return Ok(true);
        }
        pass.batch.push(rkey);
        if pass.batch.len() >= BATCH {
            let n = self.apply(conn, job, &pass.batch, &mut pass.deleted_instead)?;
            outcome.changed += n;
            progress.changed.fetch_add(n, Ordering::Relaxed);
            pass.batch.clear();
        }
        Ok(true)
    }

    /// Applies a job's mode to one batch of matching Redis keys, on the job's connection.
    fn apply(
        &self,
        conn: &mut redis::Connection,
        job: &Job,
        keys: &[String],
        deleted_instead: &mut u64,
    ) -> redis::RedisResult<u64> {
        // UNLINK and MGET with no keys, or an empty pipeline, are errors.
        if keys.is_empty() {
            return Ok(0);
        }
        match (job.mode, job.matcher.tag()) {
            // Out of their path index (and tag set) too, in one transaction (a fill
            // storing one again in between would otherwise lose its ZADD or SADD).
            (Mode::Delete, tag) => {
                let set = tag.map(|t| format!("{TAG_PREFIX}{t}"));
                unlink_indexed(conn, keys, set.as_deref())
            }
            (Mode::Stale, _) => {
                let values: Vec<Option<Vec<u8>>> = redis::cmd("MGET").arg(keys).query(conn)?;
                let mut pipe = redis::pipe();
                let mut marked = 0;
                for (key, value) in keys.iter().zip(values) {
                    let Some(variants) = value.and_then(|v| codec::decode(&v).ok()) else {
                        continue;
                    };
                    let stale = crate::store::mark_stale(&variants);
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
                // Every one may have gone since it was matched (deleted, expired).
                if marked > 0 {
                    if let Err(e) = pipe.query::<()>(conn) {
                        if !is_out_of_memory(&e) {
                            return Err(e);
                        }
                        // Full (noeviction): a stale copy cannot be written, so the
                        // entries go (which frees memory): never served as fresh.
                        let deleted: u64 = redis::cmd("UNLINK").arg(keys).query(conn)?;
                        *deleted_instead += deleted;
                        return Ok(deleted);
                    }
                }
                Ok(marked)
            }
            (Mode::Refresh, _) => Ok(0),
        }
    }
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
