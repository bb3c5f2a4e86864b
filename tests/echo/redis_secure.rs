//! Echo on Redis that asks for credentials or speaks TLS only (issue 15, point 1:
//! "Sentinel auth/password and `rediss://` for every Redis connection"), against real
//! redis-server processes and real sentinels: every connection Echo makes (its pools,
//! the fill subscriber, the Sentinel watcher) must carry the password and the TLS that
//! the config gives, or caching silently stops (everything becomes a BYPASS).
//!
//! Each happy path is shown end to end (MISS, then a HIT read on the replica, then an
//! admin invalidation), read back from Redis itself; each wrong setting (a CA that did
//! not sign the server, a wrong password) must leave Echo serving from the origin, with
//! `/health` naming the store as degraded and never showing a password.

use std::time::Duration;

use serde_json::Value;

use crate::cli::{path_str, spawn_echod};
use crate::support::admin;
use crate::support::client::{self, RawClient};
use crate::support::echo::{config, redis_sections, EchoUnderTest, QUICK_REDIS};
use crate::support::redis::{RedisServer, Sentinels};
use crate::support::redis_tls::{Reply, TestPki, TlsClient};
use crate::support::{free_port, wait_until, OriginResponse, TempDir, TestOrigin};

const TOKEN: &str = "secure-token";
const KEY: &str = "echo:v1:http://test.local";
/// The data servers' `requirepass` (and `masterauth`).
const DATA_PASSWORD: &str = "data-pw-7f3a9c";
/// The sentinels' own `requirepass`.
const SENTINEL_PASSWORD: &str = "sentinel-pw-41d2e8";
/// Generous timeouts for the paths that must work: a TLS handshake in a debug build on
/// a loaded machine must not turn a HIT into a BYPASS.
const PATIENT_REDIS: &str = "connect_timeout_ms = 2000\nread_timeout_ms = 2000\n\
     write_timeout_ms = 2000\npool_timeout_ms = 2000\nwait_timeout_ms = 2000\n";
/// How long the first heartbeat (the fill subscriber connected) may take.
const SUBSCRIBED_WITHIN: Duration = Duration::from_secs(10);

fn cacheable_origin() -> TestOrigin {
    TestOrigin::start(|req| {
        OriginResponse::ok(format!("body of {}", req.target)).header("Cache-Control", "max-age=60")
    })
}

/// Echo with the admin API, on the `[cache]`/`[redis]` sections `redis`.
fn node(origin: &TestOrigin, redis: &str) -> EchoUnderTest {
    let text = format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n{redis}");
    EchoUnderTest::with_config(config(&origin.url(), &text))
}

/// `[cache]` and `[redis]` for Sentinel: `redis` goes under `[redis]`.
fn sentinel_sections(sentinels: &Sentinels, urls: &[String], redis: &str) -> String {
    let urls: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    format!(
        "[cache]\nstore = \"redis\"\n[redis]\nsentinels = [{}]\nsentinel_master = \"{}\"\n{redis}",
        urls.join(", "),
        sentinels.master_name()
    )
}

fn status(echo: &EchoUnderTest, target: &str) -> String {
    let resp = client::get(echo.addr, target, &[]);
    assert_eq!(resp.status, 200, "{target}: {}", resp.body_str());
    assert_eq!(resp.body_str(), format!("body of {target}"));
    resp.header("x-cache-status").unwrap_or("?").to_string()
}

/// POST /invalidate on `echo`; the job's report.
fn invalidate(echo: &EchoUnderTest, body: &str) -> Value {
    let (status, report) = admin::invalidate(echo.admin.expect("admin listener"), TOKEN, body);
    assert_eq!(status, 200, "{report}");
    report
}

/// GET /health on `admin`: its status, JSON and raw text.
fn health(admin: std::net::SocketAddr) -> (u16, Value, String) {
    let auth = format!("Bearer {TOKEN}");
    let resp =
        RawClient::connect(admin).request("GET", "/health", &[("Authorization", &auth)], b"");
    let json = serde_json::from_slice(&resp.body)
        .unwrap_or_else(|e| panic!("/health: not JSON ({e}): {}", resp.body_str()));
    (resp.status, json, resp.body_str())
}

/// Waits until `/health` of `case` reports the store degraded and its errors name one
/// of `causes` (lower case): an endpoint whose breaker is open is reported only as
/// skipped, until a health check probes it again. Returns the `/health` text.
fn wait_store_degraded(admin: std::net::SocketAddr, case: &str, causes: &[&str]) -> String {
    let mut last = String::new();
    wait_until(
        &format!("/health ({case}) reports the store degraded, naming one of {causes:?}"),
        Duration::from_secs(10),
        || {
            let (code, h, text) = health(admin);
            assert_eq!(code, 200, "Echo still serves: {text}");
            assert_ne!(h["store"]["status"], "ok", "{text}");
            let errors = h["store"]["errors"].to_string().to_ascii_lowercase();
            last = text;
            h["status"] == "degraded"
                && h["degraded"] == serde_json::json!(["store"])
                && causes.iter().any(|c| errors.contains(c))
        },
    );
    last
}

/// Requests through an Echo whose Redis cannot be used: each is answered from the
/// origin as a BYPASS for a store error, none is stored.
fn assert_fails_open(echo: &EchoUnderTest, origin: &TestOrigin, prefix: &str) {
    let before = origin.total_hits();
    for i in 0..4 {
        let target = format!("{prefix}/{}", i % 2);
        let resp = client::get(echo.addr, &target, &[]);
        assert_eq!(resp.status, 200, "{target}");
        assert_eq!(resp.body_str(), format!("body of {target}"));
        assert_eq!(resp.header("x-cache-status"), Some("BYPASS"), "{target}");
        assert!(
            resp.header("cache-status")
                .unwrap_or("")
                .contains("detail=store-error"),
            "{:?}",
            resp.header("cache-status")
        );
    }
    assert_eq!(
        origin.total_hits(),
        before + 4,
        "every request reached the origin"
    );
}

// ---------------------------------------------------------------------------------------
// TLS, listed servers

/// A numeric field of `INFO <section>`, read over TLS.
fn tls_info_u64(c: &mut TlsClient, section: &str, field: &str) -> u64 {
    let prefix = format!("{field}:");
    c.text(&["INFO", section])
        .lines()
        .find_map(|l| l.strip_prefix(&prefix).map(|v| v.trim().to_string()))
        .and_then(|v| v.parse().ok())
        .unwrap_or(0)
}

fn tls_exists(c: &mut TlsClient, key: &str) -> bool {
    c.command(&["EXISTS", key]).expect("EXISTS over TLS") == Reply::Integer(1)
}

/// The ids of the master's clients subscribed to a pattern: Echo's fill subscribers
/// (sentinels subscribe to their hello channel, no pattern), over TLS.
fn tls_subscriber_ids(c: &mut TlsClient) -> Vec<String> {
    c.text(&["CLIENT", "LIST", "TYPE", "pubsub"])
        .lines()
        .filter(|l| l.split(' ').any(|f| f == "psub=1"))
        .filter_map(|l| l.split(' ').find_map(|f| f.strip_prefix("id=")))
        .map(str::to_string)
        .collect()
}

/// The score of the one node in `echo:v1:nodes`: its last heartbeat, in the master's
/// milliseconds.
fn tls_last_beat(c: &mut TlsClient) -> u64 {
    match c.command(&["ZRANGE", "echo:v1:nodes", "0", "0", "WITHSCORES"]) {
        Ok(Reply::Array(Some(pair))) if pair.len() == 2 => {
            pair[1].text().and_then(|t| t.parse().ok()).unwrap_or(0)
        }
        _ => 0,
    }
}

/// The node's fill subscription over TLS outlives its idle read timeouts (100 ms ticks)
/// and its heartbeat PINGs: one connection, the same over more than a lease of beats.
/// (A TLS read that timed out but was taken for a failure would reconnect each tick.)
fn assert_tls_subscription_holds(m: &mut TlsClient) {
    let ids = tls_subscriber_ids(m);
    assert_eq!(ids.len(), 1, "one fill subscriber: {ids:?}");
    let first = tls_last_beat(m);
    wait_until(
        "the node beats for 2 s more",
        Duration::from_secs(10),
        || tls_last_beat(m) >= first + 2_000,
    );
    assert_eq!(
        tls_subscriber_ids(m),
        ids,
        "the subscription never reconnected"
    );
}

/// Waits until the one Echo node beats on the master (`count` reads how many do): its
/// fill subscriber (a connection of its own, outside the pools) is up, so it trusts
/// replicas.
fn wait_for_the_node(mut count: impl FnMut() -> i64) {
    wait_until(
        "the node's fill subscriber beats",
        SUBSCRIBED_WITHIN,
        || count() == 1,
    );
}

#[test]
fn rediss_listed_master_and_replica_cache_hit_on_the_replica_and_invalidate() {
    let pki = TestPki::new();
    let master = pki.master();
    let replica = pki.replica_of(&master);
    assert!(master.url().starts_with("rediss://"), "{}", master.url());
    let origin = cacheable_origin();
    let redis = format!("{PATIENT_REDIS}ca_file = \"{}\"\n", path_str(&pki.files.ca));
    let echo = node(&origin, &redis_sections(&master, &[&replica], "", &redis));
    let mut m = TlsClient::connect(&pki, master.port).expect("TLS to the master");
    let mut r = TlsClient::connect(&pki, replica.port).expect("TLS to the replica");
    wait_for_the_node(|| match m.command(&["ZCARD", "echo:v1:nodes"]) {
        Ok(Reply::Integer(n)) => n,
        _ => -1,
    });

    assert_tls_subscription_holds(&mut m);
    assert_eq!(status(&echo, "/tls/a"), "MISS");
    let key = format!("{KEY}/tls/a");
    assert!(
        tls_exists(&mut m, &key),
        "the entry was written to the master"
    );
    wait_until(
        "the entry reaches the replica",
        Duration::from_secs(10),
        || tls_exists(&mut r, &key),
    );
    let replica_hits = tls_info_u64(&mut r, "stats", "keyspace_hits");
    assert_eq!(status(&echo, "/tls/a"), "HIT");
    assert!(
        tls_info_u64(&mut r, "stats", "keyspace_hits") > replica_hits,
        "the HIT was read on the replica"
    );
    assert_eq!(origin.hits("/tls/a"), 1);

    let report = invalidate(&echo, r#"{"pattern": "^/tls/"}"#);
    assert_eq!(report["state"], "done", "{report}");
    assert_eq!(report["deleted"], 1, "{report}");
    assert_eq!(
        report["replicas"],
        serde_json::json!({"acknowledged": 1, "expected": 1}),
        "WAIT over TLS: {report}"
    );
    assert!(!tls_exists(&mut m, &key), "deleted on the master");
    assert!(!tls_exists(&mut r, &key), "and on the replica");
    assert_eq!(status(&echo, "/tls/a"), "MISS");
    assert_eq!(origin.hits("/tls/a"), 2);
    let (code, h, text) = health(echo.admin.expect("admin"));
    assert_eq!((code, h["status"].as_str()), (200, Some("ok")), "{text}");
}

/// A `rediss://` server whose certificate Echo cannot verify: with a CA that did not
/// sign it, and with no `ca_file` (the system's roots). Echo starts, serves from the
/// origin, and says why in `/health`; it never falls back to an unverified connection.
#[test]
fn rediss_with_a_certificate_echo_cannot_verify_fails_open_and_health_says_so() {
    let pki = TestPki::new();
    let master = pki.master();
    let replica = pki.replica_of(&master);
    let stranger = TestPki::new();
    let origin = cacheable_origin();
    let settings = [
        (
            "a CA that did not sign the server",
            format!(
                "{QUICK_REDIS}ca_file = \"{}\"\n",
                path_str(&stranger.files.ca)
            ),
        ),
        ("the system's roots", QUICK_REDIS.to_string()),
    ];
    for (i, (case, redis)) in settings.iter().enumerate() {
        let echo = node(&origin, &redis_sections(&master, &[&replica], "", redis));
        assert_fails_open(&echo, &origin, &format!("/untrusted/{i}"));
        // rustls: "invalid peer certificate: UnknownIssuer" (or BadSignature: the
        // stranger CA has the same name as the one that signed the server).
        wait_store_degraded(
            echo.admin.expect("admin"),
            case,
            &["invalid peer certificate"],
        );
    }
    let mut m = TlsClient::connect(&pki, master.port).expect("TLS to the master");
    assert_eq!(
        m.command(&["DBSIZE"]).expect("DBSIZE"),
        Reply::Integer(0),
        "nothing was written through an unverified connection"
    );
}

// ---------------------------------------------------------------------------------------
// Passwords, listed servers

#[test]
fn listed_servers_with_a_password_in_their_urls_cache_hit_on_the_replica_and_invalidate() {
    let master = RedisServer::builder().password(DATA_PASSWORD).start();
    let replica = RedisServer::builder().replica_of(&master).start();
    assert!(master.url().contains(DATA_PASSWORD));
    let origin = cacheable_origin();
    let echo = node(
        &origin,
        &redis_sections(&master, &[&replica], "", PATIENT_REDIS),
    );
    wait_for_the_node(|| {
        redis::cmd("ZCARD")
            .arg("echo:v1:nodes")
            .query(&mut master.connection())
            .unwrap_or(-1)
    });

    assert_eq!(status(&echo, "/pw/a"), "MISS");
    let key = format!("{KEY}/pw/a");
    assert!(master.exists(&key));
    replica.wait_for_key(&key);
    let hits = replica.info_u64("stats", "keyspace_hits");
    assert_eq!(status(&echo, "/pw/a"), "HIT");
    assert!(
        replica.info_u64("stats", "keyspace_hits") > hits,
        "the HIT was read on the replica"
    );

    let report = invalidate(&echo, r#"{"pattern": "^/pw/"}"#);
    assert_eq!(report["state"], "done", "{report}");
    assert_eq!(report["deleted"], 1, "{report}");
    assert!(!master.exists(&key) && !replica.exists(&key));
    assert_eq!(status(&echo, "/pw/a"), "MISS");
    assert_eq!(origin.hits("/pw/a"), 2);
}

/// A wrong password, through the real `echod` so its log can be read: it starts, serves
/// from the origin, `/health` says authentication failed, and neither `/health` nor the
/// log (at debug level) nor `/metrics` shows the password it was given or the right one.
#[test]
fn a_wrong_password_fails_open_names_the_auth_error_and_never_shows_a_password() {
    const WRONG: &str = "wrong-pw-c0ffee";
    let master = RedisServer::builder().password(DATA_PASSWORD).start();
    let replica = RedisServer::builder().replica_of(&master).start();
    let origin = cacheable_origin();
    let dir = TempDir::new("redis-wrong-password");
    let addr = format!("127.0.0.1:{}", free_port());
    let admin = format!("127.0.0.1:{}", free_port());
    let url = |port: u16| format!("\"redis://:{WRONG}@127.0.0.1:{port}\"");
    let config = dir.file(
        "echo.toml",
        &format!(
            "[server]\nlisten = \"{addr}\"\nworkers = 4\n\
             [admin]\nlisten = \"{admin}\"\ntoken = \"{TOKEN}\"\n\
             [origin]\nurl = \"{}\"\n\
             [cache]\nstore = \"redis\"\n\
             [redis]\nmaster = {}\nreplicas = [{}]\n{QUICK_REDIS}\
             [log]\nlevel = \"debug\"\n",
            origin.url(),
            url(master.port),
            url(replica.port)
        ),
    );
    let mut echod = spawn_echod(&dir, &config);
    let (addr, admin) = (addr.parse().unwrap(), admin.parse().unwrap());
    echod.wait_listening(addr);
    echod.wait_listening(admin);

    let before = origin.total_hits();
    for i in 0..4 {
        let target = format!("/wrong-pw/{}", i % 2);
        let resp = client::get(addr, &target, &[]);
        assert_eq!(resp.status, 200, "{target}: {}", echod.log_text());
        assert_eq!(resp.header("x-cache-status"), Some("BYPASS"), "{target}");
    }
    assert_eq!(origin.total_hits(), before + 4);
    // The redis crate's words for Redis's WRONGPASS at connection set-up.
    let errors = wait_store_degraded(
        admin,
        "a wrong password",
        &["authentication failed", "wrongpass"],
    );
    let auth = format!("Bearer {TOKEN}");
    let metrics =
        RawClient::connect(admin).request("GET", "/metrics", &[("Authorization", &auth)], b"");
    assert_eq!(metrics.status, 200);
    let metrics = metrics.body_str();
    let log = echod.log_text();
    assert!(!log.is_empty(), "echod logged something at debug level");
    for (what, text) in [
        ("/health", &errors),
        ("/metrics", &metrics),
        ("the log", &log),
    ] {
        for password in [WRONG, DATA_PASSWORD] {
            assert!(!text.contains(password), "{what} shows a password: {text}");
        }
    }
    assert_eq!(
        redis::cmd("DBSIZE")
            .query::<u64>(&mut master.connection())
            .expect("DBSIZE"),
        0
    );
}

// ---------------------------------------------------------------------------------------
// Sentinel with passwords

/// Data servers with a password and sentinels with their own: Echo asks the sentinels
/// with theirs (in the URLs) and reaches the master and replica it is told of with
/// `[redis] password`: its pools, its fill subscriber and its Sentinel watcher. Without
/// the sentinels' password it finds no master and fails open.
#[test]
fn sentinels_and_data_servers_with_their_own_passwords_cache_hit_on_the_replica_and_invalidate() {
    let master = RedisServer::builder().password(DATA_PASSWORD).start();
    let replica = RedisServer::builder().replica_of(&master).start();
    let sentinels = Sentinels::builder(&master)
        .password(SENTINEL_PASSWORD)
        .start();
    assert!(sentinels
        .urls()
        .iter()
        .all(|u| u.contains(SENTINEL_PASSWORD)));
    let origin = cacheable_origin();
    let echo = node(
        &origin,
        &sentinel_sections(
            &sentinels,
            &sentinels.urls(),
            &format!("{PATIENT_REDIS}password = \"{DATA_PASSWORD}\"\n"),
        ),
    );
    wait_for_the_node(|| {
        redis::cmd("ZCARD")
            .arg("echo:v1:nodes")
            .query(&mut master.connection())
            .unwrap_or(-1)
    });
    let key = format!("{KEY}/sentinel/a");
    assert_eq!(status(&echo, "/sentinel/a"), "MISS");
    assert!(master.exists(&key), "written to the master Sentinel named");
    replica.wait_for_key(&key);
    // The watcher publishes the replica once a sentinel reports its link up (INFO
    // period); until then hits come from the master.
    wait_until(
        "a HIT is read on the replica",
        Duration::from_secs(10),
        || {
            let hits = replica.info_u64("stats", "keyspace_hits");
            status(&echo, "/sentinel/a") == "HIT"
                && replica.info_u64("stats", "keyspace_hits") > hits
        },
    );
    assert_eq!(origin.hits("/sentinel/a"), 1);

    let report = invalidate(&echo, r#"{"pattern": "^/sentinel/"}"#);
    assert_eq!(report["state"], "done", "{report}");
    assert_eq!(report["deleted"], 1, "{report}");
    assert!(!master.exists(&key) && !replica.exists(&key));
    assert_eq!(status(&echo, "/sentinel/a"), "MISS");
    assert_eq!(origin.hits("/sentinel/a"), 2);

    // The same sentinels asked without their password: no master is ever named.
    let unauthenticated: Vec<String> = sentinels
        .ports()
        .iter()
        .map(|p| format!("redis://127.0.0.1:{p}"))
        .collect();
    let blind = node(
        &origin,
        &sentinel_sections(
            &sentinels,
            &unauthenticated,
            &format!("{QUICK_REDIS}password = \"{DATA_PASSWORD}\"\n"),
        ),
    );
    assert_fails_open(&blind, &origin, "/sentinel/blind");
    let errors = wait_store_degraded(
        blind.admin.expect("admin"),
        "no sentinel password",
        &["no sentinel has named it"],
    );
    for password in [DATA_PASSWORD, SENTINEL_PASSWORD] {
        assert!(
            !errors.contains(password),
            "/health shows a password: {errors}"
        );
    }
}

// ---------------------------------------------------------------------------------------
// Sentinel with TLS-only data servers

/// A TLS connection to a server with a password, authenticated.
fn tls_auth(pki: &TestPki, port: u16) -> TlsClient {
    let mut c = TlsClient::connect(pki, port).expect("TLS to the server");
    assert_eq!(c.text(&["AUTH", DATA_PASSWORD]), "OK");
    c
}

/// Sentinels on plain TCP (their own password) naming TLS-only data servers with a
/// password: `tls = true`, `ca_file` and `password` apply to the servers Sentinel names,
/// for the pools, the fill subscriber and the watcher's ROLE check alike.
#[test]
fn sentinels_naming_tls_only_data_servers_cache_hit_on_the_replica_and_invalidate() {
    let pki = TestPki::new();
    let master = RedisServer::builder()
        .tls(pki.files.clone())
        .password(DATA_PASSWORD)
        .start();
    let replica = RedisServer::builder().replica_of(&master).start();
    assert!(replica.url().starts_with("rediss://"), "{}", replica.url());
    let sentinels = Sentinels::builder(&master)
        .password(SENTINEL_PASSWORD)
        .start();
    let origin = cacheable_origin();
    let echo = node(
        &origin,
        &sentinel_sections(
            &sentinels,
            &sentinels.urls(),
            &format!(
                "{PATIENT_REDIS}password = \"{DATA_PASSWORD}\"\ntls = true\nca_file = \"{}\"\n",
                path_str(&pki.files.ca)
            ),
        ),
    );
    let mut m = tls_auth(&pki, master.port);
    let mut r = tls_auth(&pki, replica.port);
    wait_for_the_node(|| match m.command(&["ZCARD", "echo:v1:nodes"]) {
        Ok(Reply::Integer(n)) => n,
        _ => -1,
    });

    assert_tls_subscription_holds(&mut m);
    let key = format!("{KEY}/sentinel-tls/a");
    assert_eq!(status(&echo, "/sentinel-tls/a"), "MISS");
    assert!(
        tls_exists(&mut m, &key),
        "written to the master Sentinel named"
    );
    wait_until(
        "the entry reaches the replica",
        Duration::from_secs(10),
        || tls_exists(&mut r, &key),
    );
    // The watcher publishes the replica once a sentinel reports its link up (INFO
    // period); until then hits come from the master.
    wait_until(
        "a HIT is read on the replica",
        Duration::from_secs(10),
        || {
            let hits = tls_info_u64(&mut r, "stats", "keyspace_hits");
            status(&echo, "/sentinel-tls/a") == "HIT"
                && tls_info_u64(&mut r, "stats", "keyspace_hits") > hits
        },
    );
    assert_eq!(origin.hits("/sentinel-tls/a"), 1);

    let report = invalidate(&echo, r#"{"pattern": "^/sentinel-tls/"}"#);
    assert_eq!(report["state"], "done", "{report}");
    assert_eq!(report["deleted"], 1, "{report}");
    assert!(!tls_exists(&mut m, &key), "deleted on the master");
    assert!(!tls_exists(&mut r, &key), "and on the replica");
    assert_eq!(status(&echo, "/sentinel-tls/a"), "MISS");
    assert_eq!(origin.hits("/sentinel-tls/a"), 2);
    let (code, h, text) = health(echo.admin.expect("admin"));
    assert_eq!((code, h["status"].as_str()), (200, Some("ok")), "{text}");
}
