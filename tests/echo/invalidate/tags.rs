//! Issue 15, "tag sets kept clean": the Redis store's tag index (one set of entry keys
//! per `Surrogate-Key` tag, `echo:v1:tag:<tag>`) still names entries deleted or expired
//! since they were stored. A tag job must neither count, refresh nor mark those: its
//! members are checked on the master, and the ones whose entry is gone are dropped from
//! the set (a dry run only leaves them out: it writes nothing).
//!
//! Each test stores entries tagged `t` on a master and a replica, makes some of them go
//! (a DEL on the master, a pattern invalidation, or an expiry), then runs a tag job and
//! reads the answer, the origin's hit count and Redis itself.

use std::time::Duration;

use super::{invalidate, redis_echo_with, status_of, warm_with};
use crate::support::client::RawClient;
use crate::support::echo::EchoUnderTest;
use crate::support::redis::RedisServer;
use crate::support::{OriginResponse, TestOrigin};

/// The set that indexes tag `t`.
const TAG_SET: &str = "echo:v1:tag:t";
const HOST: &str = "a.example";

fn entry_key(target: &str) -> String {
    format!("echo:v1:http://{HOST}{target}")
}

/// Echo on a master and a replica, in front of an origin that tags everything `t`.
struct Tagged {
    master: RedisServer,
    replica: RedisServer,
    origin: TestOrigin,
    echo: EchoUnderTest,
}

/// The tag sets' background sweep is off here, so what a tag job does to its set is
/// all that changes it (the sweep has its own tests).
fn tagged() -> Tagged {
    tagged_with("tag_sweep_per_sec = 0\n")
}

fn tagged_with(redis: &str) -> Tagged {
    let master = RedisServer::master();
    let replica = RedisServer::replica_of(&master);
    let origin = TestOrigin::start(|req| {
        OriginResponse::ok(format!("body of {}", req.target))
            .header("Cache-Control", "max-age=600")
            .header("Surrogate-Key", "t")
    });
    let echo = redis_echo_with(&origin, &master, &[&replica], redis);
    Tagged {
        master,
        replica,
        origin,
        echo,
    }
}

const PAIR: &[&str] = &["/t/1", "/t/2"];

impl Tagged {
    /// Stores `targets` (each a hit afterwards, read from the replica).
    fn warm(&self, targets: &[&str]) {
        warm_with(&self.echo, targets, HOST, &|key| {
            self.replica.wait_for_key(key)
        });
        assert_eq!(self.members(), targets.len() as u64, "all indexed under t");
    }

    /// Members of the tag's set, on the master (0 when the set is gone).
    fn members(&self) -> u64 {
        redis::cmd("SCARD")
            .arg(TAG_SET)
            .query(&mut self.master.connection())
            .expect("SCARD")
    }

    /// Deletes the entries behind Echo's back, as an eviction would.
    fn delete(&self, targets: &[&str]) {
        let keys: Vec<String> = targets.iter().map(|t| entry_key(t)).collect();
        let _: u64 = redis::cmd("DEL")
            .arg(&keys)
            .query(&mut self.master.connection())
            .expect("DEL");
    }

    /// Lets the entries expire: a 1 ms TTL, then a pause. Nothing reads them meanwhile,
    /// so some may still be in memory, expired but not yet reclaimed, as in production.
    fn expire(&self, targets: &[&str]) {
        let mut pipe = redis::pipe();
        for t in targets {
            pipe.cmd("PEXPIRE").arg(entry_key(t)).arg(1).ignore();
        }
        pipe.query::<()>(&mut self.master.connection())
            .expect("PEXPIRE");
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_tag_dry_run_does_not_count_expired_entries() {
    // issue 15: tag sets were never cleaned; a dry run counted expired entries.
    let c = tagged();
    c.warm(PAIR);
    c.expire(PAIR);
    let (status, answer) = invalidate(&c.echo, r#"{"tag": "t", "dry_run": true}"#);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["matched"], 0, "{answer}");
    assert_eq!(answer["would_change"], 0, "{answer}");
    assert_eq!(answer["sample"], serde_json::json!([]), "{answer}");
    assert_eq!(
        c.members(),
        2,
        "a dry run writes nothing, not even to the index"
    );
}

#[test]
fn a_tag_delete_after_a_pattern_invalidation_matches_nothing() {
    // issue 15: tag sets were never cleaned; a tag delete after the entries were gone
    // answered "matched 2, deleted 0".
    let c = tagged();
    c.warm(PAIR);
    let (_, answer) = invalidate(&c.echo, r#"{"pattern": "^/t/"}"#);
    assert_eq!(answer["deleted"], 2, "{answer}");
    let (status, answer) = invalidate(&c.echo, r#"{"tag": "t"}"#);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["matched"], 0, "{answer}");
    assert_eq!(answer["deleted"], 0, "{answer}");
    assert_eq!(
        c.members(),
        0,
        "the members whose entries are gone were dropped"
    );
}

#[test]
fn stale_mode_on_a_tag_whose_entries_are_gone_answers_200_with_0() {
    // issue 15: tag sets were never cleaned; stale mode on a tag whose entries were
    // deleted failed with 503 ("empty command": nothing left to rewrite).
    let c = tagged();
    c.warm(PAIR);
    c.delete(PAIR);
    let (status, answer) = invalidate(&c.echo, r#"{"tag": "t", "mode": "stale"}"#);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["matched"], 0, "{answer}");
    assert_eq!(answer["marked_stale"], 0, "{answer}");
    assert_eq!(c.members(), 0, "{answer}");
    for t in PAIR {
        assert!(!c.master.exists(&entry_key(t)), "{t} was recreated");
    }
}

#[test]
fn refresh_mode_on_a_tag_whose_entries_expired_fetches_and_stores_nothing() {
    // issue 15: tag sets were never cleaned; refresh mode fetched expired entries from
    // the origin and stored them again.
    let c = tagged();
    c.warm(PAIR);
    c.expire(PAIR);
    let before = c.origin.total_hits();
    let (status, answer) = invalidate(&c.echo, r#"{"tag": "t", "mode": "refresh"}"#);
    assert_eq!(c.origin.total_hits(), before, "nothing fetched: {answer}");
    for t in PAIR {
        assert!(!c.master.exists(&entry_key(t)), "{t} was stored again");
    }
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["matched"], 0, "{answer}");
    assert_eq!(answer["refreshed"], 0, "{answer}");
    assert_eq!(c.members(), 0, "{answer}");
}

#[test]
fn a_tag_with_many_members_some_gone_matches_every_entry_still_stored() {
    // issue 15: tag sets kept clean must not lose a live entry. More members than one
    // batch (500: one check of members, one round of deletes), present and absent mixed.
    const N: usize = 900;
    let c = tagged();
    let targets: Vec<String> = (0..N).map(|i| format!("/m/{i}")).collect();
    let mut client = RawClient::connect(c.echo.addr);
    for t in &targets {
        let resp = client.get(t, &[("Host", HOST)]);
        assert_eq!(resp.status, 200, "{}", resp.body_str());
    }
    assert_eq!(c.members(), N as u64);
    // Every third entry goes: one in two of those deleted, the others expired.
    let gone: Vec<&str> = targets.iter().step_by(3).map(String::as_str).collect();
    let deleted: Vec<&str> = gone.iter().copied().step_by(2).collect();
    let expired: Vec<&str> = gone.iter().copied().skip(1).step_by(2).collect();
    c.delete(&deleted);
    c.expire(&expired);
    let present = (N - gone.len()) as u64;

    let (status, answer) = invalidate(&c.echo, r#"{"tag": "t", "dry_run": true}"#);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["matched"], present, "{answer}");
    assert_eq!(c.members(), N as u64, "a dry run writes nothing");

    let (status, answer) = invalidate(&c.echo, r#"{"tag": "t", "mode": "stale"}"#);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["marked_stale"], present, "{answer}");
    assert_eq!(
        c.members(),
        present,
        "the members whose entries are gone were dropped"
    );

    let (status, answer) = invalidate(&c.echo, r#"{"tag": "t"}"#);
    assert_eq!(status, 200, "{answer}");
    assert_eq!(answer["matched"], present, "{answer}");
    assert_eq!(answer["deleted"], present, "{answer}");
    assert_eq!(
        c.members(),
        0,
        "deleted through the tag: out of its set too"
    );
    for t in targets.iter().step_by(50) {
        assert_eq!(status_of(&c.echo, t, HOST), "MISS", "{t}");
    }
}

#[test]
fn expired_entries_leave_their_tag_set_by_themselves() {
    // Tag sets have no TTL (eviction must never take an index away from its entries):
    // the sweep between invalidation jobs drops the members whose entry is gone, and
    // an emptied set is gone with them.
    let c = tagged_with("");
    c.warm(PAIR);
    c.expire(PAIR);
    crate::support::wait_until(
        "the sweep empties the tag set",
        Duration::from_secs(10),
        || c.members() == 0,
    );
    // Entries stored since are indexed as before.
    c.warm(&["/t/3"]);
}

#[test]
fn adding_to_a_tag_set_trims_members_whose_entry_is_gone() {
    let c = tagged();
    let old: Vec<String> = (0..10).map(|i| format!("/t/old/{i}")).collect();
    let old: Vec<&str> = old.iter().map(String::as_str).collect();
    c.warm(&old);
    c.delete(&old[..8]);
    let new: Vec<String> = (0..20).map(|i| format!("/t/new/{i}")).collect();
    let new: Vec<&str> = new.iter().map(String::as_str).collect();
    warm_with(&c.echo, &new, HOST, &|key| c.replica.wait_for_key(key));
    let members: Vec<String> = redis::cmd("SMEMBERS")
        .arg(TAG_SET)
        .query(&mut c.master.connection())
        .expect("SMEMBERS");
    for live in old[8..].iter().chain(&new) {
        assert!(
            members.contains(&entry_key(live)),
            "{live} is stored and indexed"
        );
    }
    // Each addition checks two random members: 20 additions among a set with 8 gone
    // members leave all 8 with a chance of about (1 - 8/30)^40, one in 250,000.
    assert!(
        members.len() < 30,
        "{} members: none of the gone ones was trimmed",
        members.len()
    );
}
