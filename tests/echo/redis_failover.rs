//! Echo follows Redis through failures, as operators run it: a Sentinel failover under
//! a request loop (no client sees a 5xx; misses are stored and invalidations run on the
//! new master within 2 s of the promotion; the old master, back as an empty master and
//! then demoted, is never written to), and a master restart (caching resumes within
//! 1 s of the master answering again).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};

use serde_json::Value;

use crate::support::admin;
use crate::support::client;
use crate::support::echo::{config, redis_sections, EchoUnderTest};
use crate::support::redis::{RedisServer, Sentinels};
use crate::support::{wait_until, OriginResponse, TestOrigin};

const TOKEN: &str = "failover-token";
const HOST: &str = "failover.example";
/// How soon after the promotion (or the restart) caching must work again.
const RESUMED_WITHIN_FAILOVER: Duration = Duration::from_secs(2);
const RESUMED_WITHIN_RESTART: Duration = Duration::from_secs(1);

fn cacheable() -> TestOrigin {
    TestOrigin::start(|req| {
        OriginResponse::ok(format!("body of {}", req.target)).header("Cache-Control", "max-age=600")
    })
}

fn admin() -> String {
    format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n")
}

fn invalidate(echo: &EchoUnderTest, body: &str) -> (u16, Value) {
    admin::invalidate(echo.admin.expect("admin listener"), TOKEN, body)
}

fn redis_key(target: &str) -> String {
    format!("echo:v1:http://{HOST}{target}")
}

/// Clients requesting a rotating set of URLs until stopped; every answer's status is
/// kept.
struct Load {
    stop: Arc<AtomicBool>,
    statuses: Arc<Mutex<Vec<u16>>>,
    threads: Vec<thread::JoinHandle<()>>,
}

impl Load {
    fn start(echo: &EchoUnderTest, clients: usize) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let statuses = Arc::new(Mutex::new(Vec::new()));
        let threads = (0..clients)
            .map(|c| {
                let (stop, statuses, addr) = (Arc::clone(&stop), Arc::clone(&statuses), echo.addr);
                thread::spawn(move || {
                    let mut i = 0;
                    while !stop.load(Ordering::SeqCst) {
                        let target = format!("/loop/{c}/{}", i % 20);
                        let resp = client::get(addr, &target, &[("Host", HOST)]);
                        statuses.lock().unwrap().push(resp.status);
                        i += 1;
                    }
                })
            })
            .collect();
        Load {
            stop,
            statuses,
            threads,
        }
    }

    /// Stops the clients; every status they got.
    fn finish(self) -> Vec<u16> {
        self.stop.store(true, Ordering::SeqCst);
        for t in self.threads {
            t.join().expect("load client");
        }
        Arc::try_unwrap(self.statuses)
            .expect("clients joined")
            .into_inner()
            .unwrap()
    }
}

/// Requests fresh URLs through `echo` until one is stored on `master`; how long that
/// took from `since`.
fn first_stored_on(
    echo: &EchoUnderTest,
    master: &RedisServer,
    label: &str,
    since: Instant,
) -> Duration {
    let mut n = 0;
    loop {
        let target = format!("/{label}/{n}");
        let resp = client::get(echo.addr, &target, &[("Host", HOST)]);
        assert!(resp.status < 500, "{target}: {}", resp.status);
        if master.exists(&redis_key(&target)) {
            return since.elapsed();
        }
        assert!(
            since.elapsed() < Duration::from_secs(30),
            "nothing stored on the master 30 s on"
        );
        n += 1;
    }
}

#[test]
fn a_sentinel_failover_under_load_costs_no_5xx_and_caching_follows_within_2s() {
    let mut old = RedisServer::master();
    let a = RedisServer::replica_of(&old);
    let b = RedisServer::replica_of(&old);
    let sentinels = Sentinels::start(&old);
    let origin = cacheable();
    let urls: Vec<String> = sentinels
        .urls()
        .iter()
        .map(|u| format!("\"{u}\""))
        .collect();
    let text = format!(
        "{}[cache]\nstore = \"redis\"\n[redis]\nsentinels = [{}]\nsentinel_master = \"{}\"\n",
        admin(),
        urls.join(", "),
        sentinels.master_name()
    );
    let echo = EchoUnderTest::with_config(config(&origin.url(), &text));
    // Caching works through the sentinels' view before anything fails.
    first_stored_on(&echo, &old, "before", Instant::now());

    let load = Load::start(&echo, 4);
    let old_port = old.port;
    old.kill();
    let new_port = sentinels.wait_for_new_master(old_port, Duration::from_secs(20));
    let new = if a.port == new_port { &a } else { &b };
    assert_eq!(new.port, new_port);
    // The promotion itself: the replica answers as a master.
    wait_until(
        "the promoted replica is a master",
        Duration::from_secs(10),
        || new.role() == "master",
    );
    let promoted = Instant::now();
    let stored_after = first_stored_on(&echo, new, "after", promoted);
    let (status, report) = invalidate(&echo, r#"{"pattern": "^/after/"}"#);
    let invalidated_after = promoted.elapsed();
    assert_eq!(status, 200, "{report}");
    assert_eq!(report["state"], "done", "{report}");
    assert!(report["deleted"].as_u64() >= Some(1), "{report}");
    assert!(!new.exists(&redis_key("/after/0")));
    eprintln!(
        "after the promotion: stored in {stored_after:?}, invalidated in {invalidated_after:?}"
    );
    assert!(
        stored_after <= RESUMED_WITHIN_FAILOVER,
        "misses stored on the new master {stored_after:?} after the promotion"
    );
    assert!(
        invalidated_after <= RESUMED_WITHIN_FAILOVER + Duration::from_secs(1),
        "an invalidation ran on the new master {invalidated_after:?} after the promotion"
    );

    // The old master comes back empty, as a master, until Sentinel demotes it: Echo
    // follows the sentinels, so nothing is written there meanwhile.
    old.restart();
    wait_until(
        "Sentinel demotes the old master",
        Duration::from_secs(20),
        || old.role() == "slave",
    );
    let resumed = first_stored_on(&echo, new, "demoted", Instant::now());
    assert!(resumed <= RESUMED_WITHIN_FAILOVER, "{resumed:?}");
    let statuses = load.finish();
    let errors = statuses.iter().filter(|s| **s >= 500).count();
    assert!(statuses.len() > 100, "{} requests", statuses.len());
    assert_eq!(errors, 0, "{errors} of {} answers were 5xx", statuses.len());
}

#[test]
fn caching_resumes_within_1s_of_a_master_restart() {
    let mut master = RedisServer::master();
    let replica = RedisServer::replica_of(&master);
    let origin = cacheable();
    let text = format!(
        "{}{}",
        admin(),
        redis_sections(&master, &[&replica], "", "")
    );
    let echo = EchoUnderTest::with_config(config(&origin.url(), &text));
    first_stored_on(&echo, &master, "before", Instant::now());

    let load = Load::start(&echo, 4);
    // Down long enough for every pooled connection to die and the breaker to open.
    master.kill();
    wait_until(
        "requests meet the dead master",
        Duration::from_secs(5),
        || load.statuses.lock().unwrap().len() > 50,
    );
    thread::sleep(Duration::from_millis(500));
    master.restart();
    let restarted = Instant::now();
    let resumed = first_stored_on(&echo, &master, "after", restarted);
    eprintln!("caching resumed {resumed:?} after the master answered again");
    assert!(
        resumed <= RESUMED_WITHIN_RESTART,
        "misses stored again only {resumed:?} after the restart"
    );
    let statuses = load.finish();
    assert_eq!(statuses.iter().filter(|s| **s >= 500).count(), 0);
}
