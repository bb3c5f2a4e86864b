//! Tests of the Redis fixture itself (`support/redis.rs`, `support/redis_tls.rs`), with
//! no Echo running: real sentinels see a master and its replicas and fail it over when it
//! is killed or when asked; a killed old master comes back demoted; replicas can be
//! repointed and refuse stale reads when told to; passwords are required where set;
//! TLS-only servers answer over TLS and nothing else. Echo's Sentinel tests stand on
//! these, so each helper they use is shown to work here first.
//!
//! Failovers take seconds (down-after, then agreement, election and promotion; Sentinel
//! demotes a returning old master after 4 hello periods: 2 s with the fixture's periods,
//! 8 s with Redis's own). The tests that wait for them run in parallel, and each prints
//! what it measured (`--nocapture` shows it).

use std::time::{Duration, Instant};

use crate::support::redis::{RedisServer, Sentinels};
use crate::support::redis_tls::{Reply, TestPki, TlsClient};
use crate::support::{free_port, wait_until};

/// Bound of a failover, from the kill (or the SENTINEL FAILOVER) to a quorum reporting
/// the new master: generous for a loaded 2-core machine; measured values are printed.
const FAILOVER_WITHIN: Duration = Duration::from_secs(20);
/// Bound of Sentinel demoting a returning old master (4 hello periods, plus polling).
const DEMOTION_WITHIN: Duration = Duration::from_secs(15);

/// A replica as `etc/redis-replica.conf` will ship it: no stale reads.
fn strict_replica(master: &RedisServer) -> RedisServer {
    RedisServer::builder()
        .replica_of(master)
        .serve_stale_data(false)
        .start()
}

/// The error code (`NOAUTH`, `MASTERDOWN`, ...) of a command sent on `url`, or "ok".
fn outcome(url: &str, args: &[&str]) -> String {
    let client = redis::Client::open(url).expect("redis URL");
    let mut conn = match client.get_connection_with_timeout(Duration::from_secs(2)) {
        Ok(conn) => conn,
        Err(e) => return e.code().unwrap_or("connect-error").to_string(),
    };
    conn.set_read_timeout(Some(Duration::from_secs(2))).unwrap();
    let mut cmd = redis::cmd(args[0]);
    for arg in &args[1..] {
        cmd.arg(*arg);
    }
    match cmd.query::<redis::Value>(&mut conn) {
        Ok(_) => "ok".to_string(),
        Err(e) => e.code().unwrap_or("io-error").to_string(),
    }
}

fn set(server: &RedisServer, key: &str, value: &str) {
    let _: () = redis::cmd("SET")
        .arg(key)
        .arg(value)
        .query(&mut server.connection())
        .expect("SET");
}

fn get(server: &RedisServer, key: &str) -> redis::RedisResult<Option<String>> {
    redis::cmd("GET").arg(key).query(&mut server.connection())
}

#[test]
fn three_sentinels_see_the_master_and_both_replicas() {
    let master = RedisServer::master();
    let a = strict_replica(&master);
    let b = strict_replica(&master);
    let started = Instant::now();
    let mut sentinels = Sentinels::start(&master);
    eprintln!(
        "sentinels settled (each sees master, 2 others, 2 replicas) in {:?}",
        started.elapsed()
    );

    assert_eq!(sentinels.master_name(), "mymaster");
    assert_eq!(sentinels.quorum(), 2);
    let expected_urls: Vec<String> = sentinels
        .ports()
        .iter()
        .map(|p| format!("redis://127.0.0.1:{p}"))
        .collect();
    assert_eq!(sentinels.urls(), expected_urls);
    let mut replica_ports = vec![a.port, b.port];
    replica_ports.sort_unstable();
    for i in 0..3 {
        assert_eq!(
            sentinels.master_addr_by(i),
            Some(("127.0.0.1".to_string(), master.port))
        );
        let seen = sentinels.replicas_by(i);
        assert!(
            seen.iter().all(|r| r.usable() && r.ip == "127.0.0.1"),
            "{seen:?}"
        );
        let mut ports: Vec<u16> = seen.iter().map(|r| r.port).collect();
        ports.sort_unstable();
        assert_eq!(ports, replica_ports);
        assert_eq!(sentinels.master_field_by(i, "quorum").unwrap(), "2");
        assert_eq!(
            sentinels
                .master_field_by(i, "down-after-milliseconds")
                .unwrap(),
            "500"
        );
    }
    let _: String = redis::cmd("PING")
        .query(&mut sentinels.connection(0))
        .expect("PING a sentinel");

    assert_eq!(master.role(), "master");
    assert_eq!(master.master_port(), None);
    assert!(!master.master_link_up());
    for replica in [&a, &b] {
        assert_eq!(replica.role(), "slave");
        assert_eq!(replica.master_port(), Some(master.port));
        assert!(replica.master_link_up());
        assert_eq!(replica.config_get("replica-serve-stale-data"), "no");
    }

    // Replicas apply the master's writes up to its offset.
    set(&master, "k", "v");
    let written = master.repl_offset();
    assert!(written > 0);
    wait_until(
        "both replicas reach the master's offset",
        Duration::from_secs(10),
        || a.repl_offset() >= written && b.repl_offset() >= written,
    );

    // A frozen sentinel does not stop the others answering; it answers again when resumed.
    sentinels.pause(1);
    assert_eq!(
        sentinels.master_addr_by(0).map(|(_, p)| p),
        Some(master.port)
    );
    sentinels.resume(1);
    assert_eq!(
        sentinels.master_addr_by(1).map(|(_, p)| p),
        Some(master.port)
    );
    // A dead one neither.
    sentinels.kill(0);
    assert_eq!(
        sentinels.master_addr(),
        ("127.0.0.1".to_string(), master.port)
    );
    assert_eq!(sentinels.replicas().len(), 2);
}

#[test]
fn a_replica_pointed_at_a_dead_port_refuses_reads_unless_told_to_serve_stale_data() {
    let master = RedisServer::master();
    let replica = strict_replica(&master);
    set(&master, "k", "old");
    replica.wait_for_key("k");

    replica.replicaof(Some(("127.0.0.1", free_port())));
    wait_until(
        "the replica's link is down",
        Duration::from_secs(10),
        || !replica.master_link_up(),
    );
    let refused = get(&replica, "k").expect_err("a stale read");
    assert_eq!(refused.code(), Some("MASTERDOWN"), "{refused}");

    // What the shipped replica config says today: stale reads served.
    replica.config_set("replica-serve-stale-data", "yes");
    assert_eq!(get(&replica, "k").unwrap().as_deref(), Some("old"));

    // Back to its master, then promoted by hand.
    replica.replicaof(Some(("127.0.0.1", master.port)));
    replica.wait_link_up();
    replica.replicaof(None);
    assert_eq!(replica.role(), "master");
    replica.config_set("maxmemory-policy", "volatile-lru");
    assert_eq!(replica.config_get("maxmemory-policy"), "volatile-lru");
    assert_eq!(replica.config_get("no-such-setting"), "");
}

#[test]
fn a_killed_master_is_replaced_by_a_replica_and_comes_back_demoted() {
    let mut master = RedisServer::master();
    let a = strict_replica(&master);
    let b = strict_replica(&master);
    let sentinels = Sentinels::start(&master);
    let old = master.port;

    let killed_at = Instant::now();
    master.kill();
    let new = sentinels.wait_for_new_master(old, FAILOVER_WITHIN);
    let promoted_after = killed_at.elapsed();
    let (promoted, other) = if new == a.port { (&a, &b) } else { (&b, &a) };
    assert_eq!(promoted.port, new, "the new master is one of the replicas");
    assert_eq!(promoted.role(), "master");

    // Sentinel repoints the other replica, and writes on the new master reach it.
    wait_until(
        "the other replica follows the new master",
        FAILOVER_WITHIN,
        || other.master_port() == Some(new) && other.master_link_up(),
    );
    let repointed_after = killed_at.elapsed();
    set(promoted, "after", "failover");
    other.wait_for_key("after");

    // Once switched, a sentinel lists the dead old master as a replica that is down.
    wait_until(
        "a sentinel lists the old master as a dead replica",
        FAILOVER_WITHIN,
        || {
            (0..3).any(|i| {
                sentinels
                    .replicas_by(i)
                    .iter()
                    .any(|r| r.port == old && !r.usable() && r.flags.contains("disconnected"))
            })
        },
    );

    // Restarted, it is a master again (empty) until Sentinel demotes it; meanwhile every
    // sentinel comes to agree on the new master.
    master.restart();
    let restarted_at = Instant::now();
    let role_at_restart = master.role();
    sentinels.wait_settled(1, FAILOVER_WITHIN);
    let agreed_after = killed_at.elapsed();
    master.wait_role("slave", DEMOTION_WITHIN);
    let demoted_in = restarted_at.elapsed();
    master.wait_link_up();
    assert_eq!(master.master_port(), Some(new));
    assert_eq!(get(&master, "after").unwrap().as_deref(), Some("failover"));
    eprintln!(
        "kill -9 of the master: quorum reports replica {new} after {promoted_after:?}, \
         other replica repointed after {repointed_after:?}, all 3 sentinels agree after \
         {agreed_after:?}; old master restarted as {role_at_restart:?}, demoted \
         {demoted_in:?} after its restart"
    );
}

#[test]
fn a_forced_failover_switches_to_the_replica_and_demotes_the_old_master() {
    let master = RedisServer::master();
    let replica = strict_replica(&master);
    let sentinels = Sentinels::start(&master);

    let asked_at = Instant::now();
    sentinels.failover().expect("SENTINEL FAILOVER");
    let new = sentinels.wait_for_new_master(master.port, FAILOVER_WITHIN);
    let switched_after = asked_at.elapsed();
    assert_eq!(new, replica.port);
    assert_eq!(replica.role(), "master");
    let master_at_switch = master.role();

    let demoted_after = master.wait_role("slave", DEMOTION_WITHIN) + switched_after;
    master.wait_link_up();
    assert_eq!(master.master_port(), Some(new));
    set(&replica, "k", "v");
    master.wait_for_key("k");
    eprintln!(
        "SENTINEL FAILOVER: quorum reports {new} after {switched_after:?}; the old master \
         was still {master_at_switch:?} then, and a replica {demoted_after:?} after the call"
    );
}

#[test]
fn passwords_are_required_where_set_and_sentinels_fail_over_with_them() {
    let mut master = RedisServer::builder().password("data-secret").start();
    let replica = RedisServer::replica_of(&master);
    let sentinels = Sentinels::builder(&master)
        .name("cache")
        .count(3, 2)
        // Redis's own periods, to measure a failover as production would see it (with a
        // down-after a production setup could use; Redis ships 30 s).
        .production_periods()
        .down_after(Duration::from_secs(2))
        .failover_timeout(Duration::from_secs(3))
        .password("sentinel-secret")
        .start();
    assert_eq!(sentinels.master_name(), "cache");

    assert_eq!(master.password(), Some("data-secret"));
    assert_eq!(
        master.url(),
        format!("redis://:data-secret@127.0.0.1:{}", master.port)
    );
    let bare = format!("redis://127.0.0.1:{}", master.port);
    assert_eq!(outcome(&bare, &["PING"]), "NOAUTH");
    let wrong = format!("redis://:nope@127.0.0.1:{}", master.port);
    assert_ne!(outcome(&wrong, &["PING"]), "ok");
    assert_eq!(outcome(&master.url(), &["PING"]), "ok");
    assert_eq!(outcome(&replica.url(), &["PING"]), "ok");

    let port = sentinels.ports()[0];
    assert_eq!(
        sentinels.urls()[0],
        format!("redis://:sentinel-secret@127.0.0.1:{port}")
    );
    let get_master = ["SENTINEL", "get-master-addr-by-name", "cache"];
    assert_eq!(
        outcome(&format!("redis://127.0.0.1:{port}"), &get_master),
        "NOAUTH"
    );
    // The data password is not the sentinels'.
    assert_ne!(
        outcome(
            &format!("redis://:data-secret@127.0.0.1:{port}"),
            &get_master
        ),
        "ok"
    );
    assert_eq!(outcome(&sentinels.urls()[0], &get_master), "ok");
    assert_eq!(
        sentinels.master_field_by(0, "failover-timeout").unwrap(),
        "3000"
    );

    // A failover needs the sentinels to ask each other (their password) and to command
    // the replica (auth-pass); the promoted replica takes writes with the data password.
    let killed_at = Instant::now();
    master.kill();
    let new = sentinels.wait_for_new_master(master.port, FAILOVER_WITHIN);
    eprintln!(
        "with passwords, Redis's own periods, 2 s down-after: quorum reports {new} {:?} \
         after kill -9",
        killed_at.elapsed()
    );
    assert_eq!(new, replica.port);
    assert_eq!(replica.role(), "master");
    set(&replica, "k", "v");
}

#[test]
fn a_tls_only_master_and_replica_answer_over_tls_and_nothing_else() {
    let pki = TestPki::new();
    let master = pki.master();
    let mut replica = pki.replica_of(&master);
    assert_eq!(master.url(), format!("rediss://127.0.0.1:{}", master.port));

    let mut m = TlsClient::connect(&pki, master.port).expect("TLS to the master");
    assert_eq!(m.text(&["PING"]), "PONG");
    assert_eq!(m.text(&["SET", "k", "v"]), "OK");
    let mut r = TlsClient::connect(&pki, replica.port).expect("TLS to the replica");
    wait_until(
        "the write reaches the replica over TLS replication",
        Duration::from_secs(10),
        || r.command(&["GET", "k"]).unwrap() == Reply::Bulk(Some(b"v".to_vec())),
    );
    match r.command(&["ROLE"]).unwrap() {
        Reply::Array(Some(role)) => assert_eq!(role[0], Reply::Bulk(Some(b"slave".to_vec()))),
        other => panic!("ROLE answered {other:?}"),
    }
    let refused = r.command(&["SET", "k", "w"]).unwrap();
    assert!(
        matches!(&refused, Reply::Error(e) if e.starts_with("READONLY")),
        "{refused:?}"
    );

    // Plain RESP on the TLS port gets no answer; rediss:// with the system's roots
    // (which do not hold the test CA) fails the handshake.
    let plain = format!("redis://127.0.0.1:{}", master.port);
    assert_ne!(outcome(&plain, &["PING"]), "ok");
    let rediss = redis::Client::open(master.url())
        .and_then(|c| c.get_connection_with_timeout(Duration::from_secs(2)));
    assert!(
        rediss.is_err(),
        "rediss:// opened though the system roots lack the test CA"
    );

    // A client that does not trust the CA fails the handshake.
    let stranger = TestPki::new();
    assert!(TlsClient::connect(&stranger, master.port).is_err());

    // A restarted TLS replica syncs again over TLS.
    replica.restart();
    let mut r = TlsClient::connect(&pki, replica.port).expect("TLS to the restarted replica");
    assert_eq!(r.text(&["GET", "k"]), "v");
}

#[test]
fn sentinels_watch_a_tls_only_master_over_tls_and_fail_it_over() {
    let pki = TestPki::new();
    let master = pki.master();
    let replica = pki.replica_of(&master);
    // The fixture's own helpers reach TLS-only servers (trusting the test CA).
    assert_eq!(master.role(), "master");
    assert_eq!(replica.master_port(), Some(master.port));
    let sentinels = Sentinels::start(&master);
    // Clients ask on the plain port; the sentinels found each other (over TLS) and the
    // replica.
    assert_eq!(
        sentinels.master_addr(),
        ("127.0.0.1".to_string(), master.port)
    );
    let replicas = sentinels.replicas();
    assert_eq!(replicas.len(), 1, "{replicas:?}");
    assert_eq!(replicas[0].port, replica.port);

    // A failover: the sentinels command both servers over TLS.
    let started = Instant::now();
    sentinels.failover().expect("SENTINEL FAILOVER");
    let new = sentinels.wait_for_new_master(master.port, FAILOVER_WITHIN);
    eprintln!(
        "TLS data servers: quorum reports {new} {:?} after SENTINEL FAILOVER",
        started.elapsed()
    );
    assert_eq!(new, replica.port);
    replica.wait_role("master", FAILOVER_WITHIN);
    master.wait_role("slave", FAILOVER_WITHIN);
    set(&replica, "k", "v");
    wait_until(
        "the write reaches the old master over TLS",
        FAILOVER_WITHIN,
        || get(&master, "k").ok().flatten().as_deref() == Some("v"),
    );
}
