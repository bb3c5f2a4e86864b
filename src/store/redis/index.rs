//! The path index on Redis: per site (`scheme://host`), its stored targets in lexical
//! order, so a job whose pattern has a literal prefix reads only that prefix's range.
//!
//! Layout (a B-tree of depth two, kept by the scripts below): the site's directory
//! `echo:v1:ix:<site>` is a sorted set of shard starts (score 0, the first one ""), and
//! the shard `echo:v1:ixs:<site> <start>` holds the targets from its start up to the
//! next one. A shard splits in two before it would pass `SHARD_MAX` members, so it stays
//! in Redis's compact encoding (a listpack, below `zset-max-listpack-entries`, 128 by
//! default): a member costs its target and a few bytes, where one sorted set per site
//! (a skiplist and a dict) cost about 100 bytes more per entry. A shard left empty
//! leaves the directory.
//!
//! Invariants:
//! - every change to the index is a script, so a reader or a fill never sees a shard
//!   mid-split, and an entry and its member are written and deleted in one step;
//! - a member whose entry expired or was evicted may remain: whoever reads the index
//!   checks the entries (`members_script`) and drops the missing members;
//! - the scripts name the shards they compute (not in KEYS): fine on one master, and
//!   why Redis Cluster would need the index under a hash tag.

use std::sync::LazyLock;

use super::{site_and_target, KEY_PREFIX};

/// Every site with an index.
pub(super) const SITES_KEY: &str = "echo:v1:sites";
/// A site's directory of shards.
const DIRECTORY_PREFIX: &str = "echo:v1:ix:";
/// The single sorted set per site of Echo before the shards: removed once the sharded
/// index is complete.
const UNSHARDED_PREFIX: &str = "echo:v1:idx:";

/// The directory of a site's index.
pub(super) fn directory_key(site: &str) -> String {
    format!("{DIRECTORY_PREFIX}{site}")
}

/// The index before shards, for a site (see `UNSHARDED_PREFIX`).
pub(super) fn unsharded_key(site: &str) -> String {
    format!("{UNSHARDED_PREFIX}{site}")
}

/// The Lua every index script starts with: where a target's shard is, adding one target
/// (with the split), and removing targets of one site: given in order (bytewise, as Redis
/// orders them), those of one shard go with one lookup and one ZREM (any order is
/// correct, only slower: Lua compares strings by the locale, so the script never does). `SHARD_MAX` is 128 so that a shard, split when it
/// reaches it, never passes Redis's default `zset-max-listpack-entries` (128).
macro_rules! index_lua {
    () => {
        r#"
local SHARD_MAX = 128
local function directory(site) return 'echo:v1:ix:' .. site end
local function shard_key(site, start) return 'echo:v1:ixs:' .. site .. ' ' .. start end
local function shard_of(site, target)
  return redis.call('ZREVRANGEBYLEX', directory(site), '[' .. target, '-', 'LIMIT', 0, 1)[1]
end
local function index_add(site, target)
  local start = shard_of(site, target)
  if not start then
    start = ''
    redis.call('ZADD', directory(site), 0, '')
  end
  local shard = shard_key(site, start)
  local added = redis.call('ZADD', shard, 0, target)
  if added == 1 and redis.call('ZCARD', shard) >= SHARD_MAX then
    local upper = redis.call('ZRANGE', shard, SHARD_MAX / 2, -1)
    local args = {}
    for _, member in ipairs(upper) do
      args[#args + 1] = 0
      args[#args + 1] = member
    end
    redis.call('ZADD', shard_key(site, upper[1]), unpack(args))
    redis.call('ZREMRANGEBYRANK', shard, SHARD_MAX / 2, -1)
    redis.call('ZADD', directory(site), 0, upper[1])
  end
  return added
end
local function index_remove(site, targets)
  local i = 1
  while i <= #targets do
    local start = shard_of(site, targets[i])
    if not start then return end
    local shard = shard_key(site, start)
    local window = {}
    for j = i, math.min(i + SHARD_MAX - 1, #targets) do window[#window + 1] = targets[j] end
    local scores = redis.call('ZMSCORE', shard, unpack(window))
    local run = 0
    while run < #window and scores[run + 1] do run = run + 1 end
    if run > 0 then
      redis.call('ZREM', shard, unpack(window, 1, run))
      if start ~= '' and redis.call('EXISTS', shard) == 0 then
        redis.call('ZREM', directory(site), start)
      end
      i = i + run
    else
      i = i + 1
    end
  end
end
"#
    };
}
pub(super) use index_lua;

/// Adds targets to their sites' indexes and the sites to `SITES_KEY`. ARGV: site,
/// target, site, target, ... Returns how many were not there yet.
static ADD_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(concat!(
        index_lua!(),
        r#"
local added, sites = 0, {}
for i = 1, #ARGV, 2 do
  added = added + index_add(ARGV[i], ARGV[i + 1])
  if not sites[ARGV[i]] then
    sites[ARGV[i]] = true
    redis.call('SADD', 'echo:v1:sites', ARGV[i])
  end
end
return added
"#
    ))
});

/// Deletes entry keys and their members, and (ARGV[1] not "") takes them out of that
/// tag set, in one step: a fill storing one again runs wholly before or after. A script
/// is also what Redis still runs when full (`noeviction`): nothing here adds memory.
/// KEYS: entry keys. ARGV: the tag set or "", then per key its site ("" for a key with
/// none) and target. Returns how many entries existed.
static UNLINK_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(concat!(
        index_lua!(),
        r#"
local deleted = redis.call('UNLINK', unpack(KEYS))
local by_site, sites = {}, {}
for i = 1, #KEYS do
  local site = ARGV[2 * i]
  if site ~= '' then
    if not by_site[site] then
      by_site[site] = {}
      sites[#sites + 1] = site
    end
    table.insert(by_site[site], ARGV[2 * i + 1])
  end
end
for _, site in ipairs(sites) do index_remove(site, by_site[site]) end
if ARGV[1] ~= '' then redis.call('SREM', ARGV[1], unpack(KEYS)) end
return deleted
"#
    ))
});

/// Up to ARGV[5] targets of a site's index, in order, from ARGV[2] (included when ARGV[3]
/// is 1) up to the ZRANGEBYLEX bound ARGV[4], across shards. KEYS: the directory.
/// ARGV[1]: the site.
static RANGE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(concat!(
        index_lua!(),
        r#"
local site, from, limit, upto = ARGV[1], ARGV[2], tonumber(ARGV[5]), ARGV[4]
local low = (ARGV[3] == '1' and '[' or '(') .. from
local out = {}
local start = shard_of(site, from)
while start do
  local got = redis.call('ZRANGEBYLEX', shard_key(site, start), low, upto, 'LIMIT', 0, limit - #out)
  for _, member in ipairs(got) do out[#out + 1] = member end
  if #out >= limit then break end
  start = redis.call('ZRANGEBYLEX', KEYS[1], '(' .. start, upto, 'LIMIT', 0, 1)[1]
end
return out
"#
    ))
});

/// Of some members of a site's index, the entry keys still stored. The others (expired
/// or evicted since) are removed from the index when ARGV[1] is 1, atomically with the
/// check. KEYS: entry keys. ARGV: 1 or 0, the site, then each key's target in order.
static MEMBERS_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(concat!(
        index_lua!(),
        r#"
local present, missing = {}, {}
for i = 1, #KEYS do
  if redis.call('EXISTS', KEYS[i]) == 1 then
    present[#present + 1] = KEYS[i]
  else
    missing[#missing + 1] = ARGV[i + 2]
  end
end
if ARGV[1] == '1' and #missing > 0 then index_remove(ARGV[2], missing) end
return present
"#
    ))
});

/// Forgets a site whose index is empty, atomically with the check (a fill indexing it
/// again runs wholly before or after). ARGV: the site.
static FORGET_SITE_SCRIPT: LazyLock<redis::Script> = LazyLock::new(|| {
    redis::Script::new(concat!(
        index_lua!(),
        r#"
local starts = redis.call('ZRANGE', directory(ARGV[1]), 0, 1)
if #starts == 0 or (#starts == 1 and redis.call('EXISTS', shard_key(ARGV[1], starts[1])) == 0) then
  redis.call('DEL', directory(ARGV[1]))
  redis.call('SREM', 'echo:v1:sites', ARGV[1])
end
return 0
"#
    ))
});

/// Adds entry keys (`echo:v1:<cache key>`) to their sites' indexes. Returns how many
/// were not indexed yet. Echo's background pass uses it for entries stored before the
/// index; benches use it to build one.
pub fn index_entries(conn: &mut redis::Connection, rkeys: &[String]) -> redis::RedisResult<u64> {
    let mut invocation = ADD_SCRIPT.prepare_invoke();
    let mut any = false;
    for rkey in rkeys {
        if let Some((site, target)) = rkey.strip_prefix(KEY_PREFIX).and_then(site_and_target) {
            invocation.arg(site).arg(target);
            any = true;
        }
    }
    if !any {
        return Ok(0);
    }
    invocation.invoke(conn)
}

/// Removes `rkeys` (entry keys) and their index members, and from `tag_set` when given,
/// in one step (see `UNLINK_SCRIPT`). Returns how many entries existed.
pub(super) fn unlink_indexed(
    conn: &mut redis::Connection,
    rkeys: &[String],
    tag_set: Option<&str>,
) -> redis::RedisResult<u64> {
    if rkeys.is_empty() {
        return Ok(0);
    }
    // In order, site by site: the script removes a shard's run of targets at once.
    let mut keyed: Vec<(&str, &str, &String)> = rkeys
        .iter()
        .map(|rkey| {
            let (site, target) = rkey
                .strip_prefix(KEY_PREFIX)
                .and_then(site_and_target)
                .unwrap_or(("", ""));
            (site, target, rkey)
        })
        .collect();
    keyed.sort_unstable();
    let mut invocation = UNLINK_SCRIPT.prepare_invoke();
    invocation.arg(tag_set.unwrap_or(""));
    for (site, target, rkey) in keyed {
        invocation.key(rkey).arg(site).arg(target);
    }
    invocation.invoke(conn)
}

/// Where a range read starts: at a target, or just after it.
pub(super) enum Start<'a> {
    At(&'a str),
    After(&'a str),
}

/// Up to `limit` targets of `site`'s index from `from`, in order, below `upto` (a
/// ZRANGEBYLEX bound, `+` for the end).
pub(super) fn range(
    conn: &mut redis::Connection,
    site: &str,
    from: Start<'_>,
    upto: &[u8],
    limit: usize,
) -> redis::RedisResult<Vec<String>> {
    let (from, included) = match from {
        Start::At(t) => (t, 1),
        Start::After(t) => (t, 0),
    };
    RANGE_SCRIPT
        .key(directory_key(site))
        .arg(site)
        .arg(from)
        .arg(included)
        .arg(upto)
        .arg(limit)
        .invoke(conn)
}

/// Of `targets` in `site`'s index, the entry keys still stored; with `drop_missing`,
/// the others leave the index.
pub(super) fn present(
    conn: &mut redis::Connection,
    site: &str,
    targets: &[String],
    drop_missing: bool,
) -> redis::RedisResult<Vec<String>> {
    if targets.is_empty() {
        return Ok(Vec::new());
    }
    let mut invocation = MEMBERS_SCRIPT.prepare_invoke();
    invocation.arg(u8::from(drop_missing)).arg(site);
    for target in targets {
        invocation
            .key(format!("{KEY_PREFIX}{site}{target}"))
            .arg(target);
    }
    invocation.invoke(conn)
}

/// Forgets `site` if its index is empty.
pub(super) fn forget_if_empty(conn: &mut redis::Connection, site: &str) -> redis::RedisResult<()> {
    FORGET_SITE_SCRIPT.arg(site).invoke::<i64>(conn).map(drop)
}

/// Every target in `site`'s index, in order (tests and benches: a whole index in one
/// reply).
pub fn indexed_targets(
    conn: &mut redis::Connection,
    site: &str,
) -> redis::RedisResult<Vec<String>> {
    let mut all = Vec::new();
    loop {
        let last = all.last().cloned();
        let from = last.as_deref().map_or(Start::At(""), Start::After);
        let page = range(conn, site, from, b"+", 10_000)?;
        if page.is_empty() {
            return Ok(all);
        }
        all.extend(page);
    }
}
