//! Coalescing under any herd (issue 16): one origin fetch per key whatever the herd's
//! size, however long the origin takes within its timeouts, and whichever node dies;
//! answers that cannot be shared are fetched side by side, not in waves.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::thread;
use std::time::{Duration, Instant};

use crate::cli::spawn_echod;
use crate::support::admin::{self, sample};
use crate::support::client::{self, RawResponse};
use crate::support::echo::{config, redis_sections, EchoUnderTest};
use crate::support::redis::RedisServer;
use crate::support::{free_port, wait_until, Gate, Hold, OriginResponse, TempDir, TestOrigin};

const TOKEN: &str = "herd-token";

/// An origin that holds the first request for each `/held/*` target until `gate`
/// opens (20 s at most) and answers every request with its target and its number.
fn first_held(gate: Hold, cache_control: &'static str) -> TestOrigin {
    let count = Arc::new(AtomicUsize::new(0));
    let seen = Arc::new(std::sync::Mutex::new(std::collections::HashSet::new()));
    TestOrigin::start(move |req| {
        let n = count.fetch_add(1, Ordering::SeqCst);
        let first = seen.lock().expect("seen").insert(req.target.clone());
        if first && req.target.starts_with("/held") {
            gate.wait(Duration::from_secs(20));
        }
        OriginResponse::ok(format!("{} answer {n}", req.target))
            .header("Cache-Control", cache_control)
    })
}

/// `n` concurrent GETs of `target` on `addr`, each on its own connection.
fn herd(addr: SocketAddr, n: usize, target: &str) -> Vec<thread::JoinHandle<RawResponse>> {
    (0..n)
        .map(|_| {
            let target = target.to_string();
            thread::spawn(move || client::get(addr, &target, &[]))
        })
        .collect()
}

fn join_all(handles: Vec<thread::JoinHandle<RawResponse>>) -> Vec<RawResponse> {
    handles
        .into_iter()
        .map(|h| h.join().expect("client thread"))
        .collect()
}

fn admin(extra: &str) -> String {
    format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n{extra}")
}

fn metrics(admin: SocketAddr) -> String {
    admin::metrics(admin, TOKEN)
}

/// Fill-lock attempts a node has made (each one a round trip, after which it holds the
/// lock or waits for whoever does).
fn lock_attempts(admin: SocketAddr) -> f64 {
    sample(
        &metrics(admin),
        "echo_store_operation_duration_seconds_count{store=\"redis\",op=\"lock_fill\"}",
    )
    .unwrap_or(0.0)
}

fn all_same(responses: &[RawResponse]) {
    let first = &responses[0];
    for r in responses {
        assert_eq!(r.status, 200, "{}", r.body_str());
        assert_eq!(
            r.body, first.body,
            "every client gets the one fetch's answer"
        );
    }
}

/// 300 concurrent misses on one key, with 16 workers and 4 fetch workers: one origin
/// fetch, every answer the same. Waiting holds no pool thread: a hit and a miss for
/// other keys are answered while the herd waits.
#[test]
fn three_hundred_concurrent_misses_cost_one_fetch_and_other_keys_are_served_meanwhile() {
    let gate = Gate::new();
    let origin = first_held(gate.hold(), "max-age=600");
    let echo = EchoUnderTest::with_config(config(
        &origin.url(),
        &admin("[server]\nworkers = 16\nfetch_workers = 4\n"),
    ));
    // A stored key, to hit during the herd.
    assert_eq!(
        client::get(echo.addr, "/other", &[]).header("x-cache-status"),
        Some("MISS")
    );

    let clients = herd(echo.addr, 300, "/held/hot");
    wait_until(
        "the leader reaches the origin",
        Duration::from_secs(10),
        || origin.hits("/held/hot") == 1,
    );
    // Every client connected and waiting (or about to): none of them holds a pool
    // thread, so others are answered while the gate is shut.
    wait_until("the herd is connected", Duration::from_secs(20), || {
        sample(
            &metrics(echo.admin.expect("admin")),
            "echo_connections_open",
        )
        .is_some_and(|n| n >= 300.0)
    });
    let hit = client::get(echo.addr, "/other", &[]);
    assert_eq!(hit.header("x-cache-status"), Some("HIT"));
    let miss = client::get(echo.addr, "/cold", &[]);
    assert_eq!(miss.header("x-cache-status"), Some("MISS"));
    assert_eq!(origin.hits("/held/hot"), 1, "the herd is still waiting");

    gate.open();
    let responses = join_all(clients);
    assert_eq!(
        origin.hits("/held/hot"),
        1,
        "one origin fetch for 300 requests"
    );
    all_same(&responses);
    let text = metrics(echo.admin.expect("admin"));
    assert!(
        sample(&text, "echo_coalesced_requests_total").is_some_and(|n| n >= 200.0),
        "{text}"
    );
}

/// An origin that takes 7 s (within its 10 s response timeout): the followers wait it
/// out, one fetch.
#[test]
fn a_seven_second_origin_costs_one_fetch() {
    let origin = TestOrigin::start(|req| {
        OriginResponse::ok(format!("{} slow", req.target))
            .header("Cache-Control", "max-age=600")
            .delay(Duration::from_secs(7))
    });
    let echo = EchoUnderTest::with_config(
        echo::config::Config::parse(&format!(
            "[origin]\nurl = \"{}\"\nresponse_timeout_ms = 10000\n",
            origin.url()
        ))
        .expect("config"),
    );
    let first = herd(echo.addr, 1, "/slow");
    wait_until(
        "the leader reaches the origin",
        Duration::from_secs(5),
        || origin.hits("/slow") == 1,
    );
    let followers = herd(echo.addr, 30, "/slow");
    let mut responses = join_all(first);
    responses.extend(join_all(followers));
    assert_eq!(origin.hits("/slow"), 1);
    all_same(&responses);
    let collapsed = responses
        .iter()
        .filter(|r| {
            r.header("cache-status")
                .is_some_and(|s| s.contains("collapsed; detail=waited-"))
        })
        .count();
    assert!(collapsed >= 1, "followers say they waited");
}

/// 150 requests over three nodes sharing Redis: one origin fetch.
#[test]
fn one_hundred_fifty_requests_over_three_nodes_cost_one_fetch() {
    let gate = Gate::new();
    let origin = first_held(gate.hold(), "max-age=600");
    let master = RedisServer::master();
    let replica = RedisServer::replica_of(&master);
    let nodes: Vec<EchoUnderTest> = (0..3)
        .map(|_| {
            EchoUnderTest::with_config(config(
                &origin.url(),
                &admin(&redis_sections(&master, &[&replica], "", "")),
            ))
        })
        .collect();
    let first = herd(nodes[0].addr, 1, "/held/shared");
    wait_until(
        "the leader reaches the origin",
        Duration::from_secs(5),
        || origin.hits("/held/shared") == 1,
    );
    let mut clients = first;
    for (i, node) in nodes.iter().enumerate() {
        clients.extend(herd(
            node.addr,
            if i == 0 { 49 } else { 50 },
            "/held/shared",
        ));
    }
    // The other nodes' leaders find the lock held, and wait.
    wait_until(
        "the other nodes wait on the lock",
        Duration::from_secs(10),
        || {
            nodes[1..]
                .iter()
                .all(|n| lock_attempts(n.admin.expect("admin")) >= 1.0)
        },
    );
    gate.open();
    let responses = join_all(clients);
    assert_eq!(origin.hits("/held/shared"), 1, "one fetch for three nodes");
    all_same(&responses);
}

/// The node fetching a key is killed (SIGKILL) mid-fetch: its lock's lease is no longer
/// renewed, the other node takes over within about a second, and its waiters are
/// answered; two fetches at most.
#[test]
fn a_leader_node_killed_mid_fetch_is_taken_over_within_a_lease() {
    let gate = Gate::new();
    let origin = first_held(gate.hold(), "max-age=600");
    let master = RedisServer::master();
    let dir = TempDir::new("herd-kill");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let file = dir.file(
        "echo.toml",
        &format!(
            "[server]\nlisten = \"{addr}\"\n[origin]\nurl = \"{}\"\n{}",
            origin.url(),
            redis_sections(&master, &[], "", "")
        ),
    );
    let mut doomed = spawn_echod(&dir, &file);
    doomed.wait_listening(addr);
    let survivor = EchoUnderTest::with_config(config(
        &origin.url(),
        &admin(&redis_sections(&master, &[], "", "")),
    ));

    // The doomed node's client: its answer dies with the node, so it is never read.
    let mut lost = std::net::TcpStream::connect(addr).expect("connect to the doomed node");
    std::io::Write::write_all(
        &mut lost,
        b"GET /held/orphan HTTP/1.1\r\nHost: test.local\r\n\r\n",
    )
    .expect("send");
    wait_until(
        "the doomed node's fetch reaches the origin",
        Duration::from_secs(5),
        || origin.hits("/held/orphan") == 1,
    );
    let waiters = herd(survivor.addr, 20, "/held/orphan");
    wait_until(
        "the survivor waits on the lock",
        Duration::from_secs(10),
        || lock_attempts(survivor.admin.expect("admin")) >= 1.0,
    );
    let killed = Instant::now();
    drop(doomed);
    let responses = join_all(waiters);
    let took = killed.elapsed();
    all_same(&responses);
    assert!(
        took < Duration::from_secs(3),
        "the survivor's waiters were answered {took:?} after the kill"
    );
    assert_eq!(
        origin.hits("/held/orphan"),
        2,
        "the dead node's fetch and one more"
    );
    let text = metrics(survivor.admin.expect("admin"));
    assert_eq!(
        sample(&text, "echo_fill_lock_takeovers_total"),
        Some(1.0),
        "{text}"
    );
    gate.open();
    drop(lost);
}

/// 40 concurrent requests for a URL whose answer is private, from a 0.5 s origin: the
/// first answer releases the others at once (side by side, not one after another), and
/// the next herd does not wait at all (hit-for-pass).
#[test]
fn a_private_herd_is_fetched_side_by_side() {
    let origin = TestOrigin::start(|req| {
        OriginResponse::ok(format!("{} for you", req.target))
            .header("Cache-Control", "private, max-age=600")
            .delay(Duration::from_millis(500))
    });
    let echo = EchoUnderTest::with_config(config(&origin.url(), &admin("")));
    for round in 0..2 {
        let started = Instant::now();
        let responses = join_all(herd(echo.addr, 40, "/me"));
        let took = started.elapsed();
        for r in &responses {
            assert_eq!(r.status, 200);
            assert_eq!(r.header("x-cache-status"), Some("MISS"));
        }
        // One after another would take 20 s; the first answer, then everyone at once,
        // about 1 s.
        assert!(
            took < Duration::from_millis(1500),
            "round {round}: 40 private answers took {took:?}"
        );
        assert_eq!(origin.hits("/me"), 40 * (round + 1));
        if round == 1 {
            let passed = responses
                .iter()
                .filter(|r| {
                    r.header("cache-status")
                        .is_some_and(|s| s.contains("detail=hit-for-pass"))
                })
                .count();
            assert_eq!(passed, 40, "the second herd is passed at once");
        }
    }
    let text = metrics(echo.admin.expect("admin"));
    assert!(
        sample(&text, "echo_hit_for_pass_total").is_some_and(|n| n >= 40.0),
        "{text}"
    );
}

/// On Redis, what one node learned (the answer is private) every node knows: another
/// node's herd does not wait either. A cacheable answer later makes the key cacheable
/// again.
#[test]
fn hit_for_pass_is_shared_through_redis_and_ends_with_a_cacheable_answer() {
    let private = Arc::new(std::sync::atomic::AtomicBool::new(true));
    let p = Arc::clone(&private);
    let origin = TestOrigin::start(move |req| {
        let cc = if p.load(Ordering::SeqCst) {
            "private"
        } else {
            "max-age=600"
        };
        OriginResponse::ok(format!("{} answer", req.target))
            .header("Cache-Control", cc)
            .delay(Duration::from_millis(300))
    });
    let master = RedisServer::master();
    let a =
        EchoUnderTest::with_config(config(&origin.url(), &redis_sections(&master, &[], "", "")));
    let b =
        EchoUnderTest::with_config(config(&origin.url(), &redis_sections(&master, &[], "", "")));
    assert_eq!(client::get(a.addr, "/p", &[]).status, 200);
    assert!(
        master.exists("echo:v1:pass:http://test.local/p"),
        "remembered in Redis"
    );
    let responses = join_all(herd(b.addr, 20, "/p"));
    for r in &responses {
        assert!(
            r.header("cache-status")
                .is_some_and(|s| s.contains("hit-for-pass")),
            "{:?}",
            r.header("cache-status")
        );
    }
    assert_eq!(origin.hits("/p"), 21);

    // The origin makes it cacheable: the next pass stores it, and both nodes hit.
    private.store(false, Ordering::SeqCst);
    assert_eq!(client::get(b.addr, "/p", &[]).status, 200);
    assert!(
        !master.exists("echo:v1:pass:http://test.local/p"),
        "forgotten once stored"
    );
    assert_eq!(
        client::get(a.addr, "/p", &[]).header("x-cache-status"),
        Some("HIT")
    );
    assert_eq!(
        client::get(b.addr, "/p", &[]).header("x-cache-status"),
        Some("HIT")
    );
    assert_eq!(origin.hits("/p"), 22);
}
