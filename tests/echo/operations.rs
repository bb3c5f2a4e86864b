//! Operations, in process: the metrics after known traffic, `/health` naming what is
//! degraded (Redis down), `/ready` failing during a drain, and the access log. The
//! signal-driven parts (SIGHUP reload and log reopen, SIGTERM drain) run the real
//! `echod` in `cli.rs`.

use std::time::Duration;

use serde_json::Value;

use crate::support::admin::{self, sample};
use crate::support::client::{self, RawClient};
use crate::support::echo::{config, redis_sections, EchoUnderTest, QUICK_REDIS};
use crate::support::origin::dead_origin_url;
use crate::support::redis::RedisServer;
use crate::support::{wait_until, Gate, OriginResponse, TempDir, TestOrigin};

const TOKEN: &str = "ops-token";

fn admin_section() -> String {
    format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n")
}

fn metrics(echo: &EchoUnderTest) -> String {
    admin::metrics(echo.admin.expect("admin"), TOKEN)
}

fn admin_json(echo: &EchoUnderTest, path: &str) -> (u16, Value) {
    let auth = format!("Bearer {TOKEN}");
    let resp = RawClient::connect(echo.admin.unwrap()).request(
        "GET",
        path,
        &[("Authorization", &auth)],
        b"",
    );
    let json = serde_json::from_slice(&resp.body)
        .unwrap_or_else(|e| panic!("{path}: not JSON ({e}): {}", resp.body_str()));
    (resp.status, json)
}

/// The memory bound counts what entries hold allocated, and a fill stores a tight body:
/// an early version of the held-back head (issue 13) stored each small body in a 64 KiB
/// read buffer, so 256 MiB of counted entries could be 16 GiB of memory.
#[test]
fn a_stored_small_response_costs_about_its_size() {
    let origin = TestOrigin::start(|req| {
        let resp = OriginResponse::ok(vec![b'x'; 1024]).header("Cache-Control", "max-age=600");
        if req.path().starts_with("/chunked") {
            resp.chunked()
        } else {
            resp
        }
    });
    let echo = EchoUnderTest::with_config(config(&origin.url(), &admin_section()));
    for i in 0..20 {
        for kind in ["length", "chunked"] {
            let resp = client::get(echo.addr, &format!("/{kind}/{i}"), &[]);
            assert_eq!(resp.body.len(), 1024);
        }
    }
    let stored = sample(&metrics(&echo), "echo_stored_bytes").expect("echo_stored_bytes");
    assert!(
        stored < 40.0 * 4096.0,
        "40 entries of 1 KiB are accounted as {stored} bytes"
    );
}

#[test]
fn metrics_count_known_traffic() {
    let origin = TestOrigin::start(|req| match req.path() {
        "/fresh" => OriginResponse::ok("cached").header("Cache-Control", "max-age=600"),
        _ => OriginResponse::ok("passed"),
    });
    let echo = EchoUnderTest::with_config(config(&origin.url(), &admin_section()));
    for _ in 0..3 {
        client::get(echo.addr, "/fresh", &[]);
    }
    let mut c = RawClient::connect(echo.addr);
    assert_eq!(c.request("POST", "/form", &[], b"a=1").status, 200);
    assert_eq!(c.request("BREW", "/pot", &[], b"").status, 200);
    // A request is counted just after its response went out: wait for all five.
    let mut text = String::new();
    wait_until("every request counted", Duration::from_secs(5), || {
        text = metrics(&echo);
        [("miss", 1.0), ("hit", 2.0), ("bypass", 2.0)]
            .iter()
            .all(|(status, n)| {
                let series =
                    format!("echo_request_duration_seconds_count{{cache_status=\"{status}\"}}");
                sample(&text, &series) == Some(*n)
            })
    });
    let url = origin.url();
    let expect = [
        (
            "echo_requests_total{cache_status=\"miss\",method=\"get\",code=\"200\"}",
            1.0,
        ),
        (
            "echo_requests_total{cache_status=\"hit\",method=\"get\",code=\"200\"}",
            2.0,
        ),
        (
            "echo_requests_total{cache_status=\"bypass\",method=\"post\",code=\"200\"}",
            1.0,
        ),
        // Methods outside the registered set share one label value.
        (
            "echo_requests_total{cache_status=\"bypass\",method=\"other\",code=\"200\"}",
            1.0,
        ),
        (
            "echo_request_duration_seconds_count{cache_status=\"hit\"}",
            2.0,
        ),
        (
            "echo_request_duration_seconds_count{cache_status=\"miss\"}",
            1.0,
        ),
        (
            &format!("echo_origin_request_duration_seconds_count{{server=\"{url}\"}}"),
            3.0,
        ),
        (&format!("echo_origin_server_up{{server=\"{url}\"}}"), 1.0),
        ("echo_stored_objects", 1.0),
        ("echo_worker_queue_depth{pool=\"fetch\"}", 0.0),
        ("echo_worker_queue_depth{pool=\"workers\"}", 0.0),
        ("echo_coalesced_requests_total", 0.0),
    ];
    for (series, value) in expect {
        assert_eq!(sample(&text, series), Some(value), "{series}\n{text}");
    }
    // Every lookup was timed: three GETs (and the fill's second look, if any).
    let gets = sample(
        &text,
        "echo_store_operation_duration_seconds_count{store=\"memory\",op=\"get\"}",
    )
    .unwrap();
    assert!(gets >= 3.0, "{text}");
    assert!(sample(&text, "echo_stored_bytes").unwrap() > 0.0);
    // This scrape's own connection is not a proxy connection; `c` is.
    assert!(
        sample(&text, "echo_connections_open").unwrap() >= 1.0,
        "{text}"
    );
    // Error and invalidation series exist at 0 before anything happened.
    for series in [
        "echo_invalidations_total{mode=\"delete\",outcome=\"done\"}",
        "echo_invalidated_entries_total{mode=\"stale\"}",
        &format!("echo_origin_errors_total{{server=\"{url}\",kind=\"timeout\"}}"),
        "echo_store_errors_total{store=\"memory\",op=\"put\"}",
        "echo_access_log_dropped_lines_total",
    ] {
        assert_eq!(sample(&text, series), Some(0.0), "{series}\n{text}");
    }
}

#[test]
fn origin_errors_are_counted_by_server_and_kind() {
    let dead = dead_origin_url();
    // `config` writes the [origin] section first: keys before [admin] land in it.
    let echo = EchoUnderTest::with_config(config(
        &dead,
        &format!(
            "max_fails = 3\nfail_timeout_ms = 60000\n{}",
            admin_section()
        ),
    ));
    // Three refusals take the only server out; the fourth request is not sent.
    for _ in 0..4 {
        assert_eq!(client::get(echo.addr, "/down", &[]).status, 502);
    }
    let mut text = String::new();
    wait_until("every request counted", Duration::from_secs(5), || {
        text = metrics(&echo);
        sample(
            &text,
            "echo_request_duration_seconds_count{cache_status=\"miss\"}",
        ) == Some(4.0)
    });
    assert_eq!(
        sample(
            &text,
            &format!("echo_origin_errors_total{{server=\"{dead}\",kind=\"connect\"}}")
        ),
        Some(3.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            "echo_origin_errors_total{server=\"origin\",kind=\"unavailable\"}"
        ),
        Some(1.0),
        "{text}"
    );
    assert_eq!(
        sample(
            &text,
            &format!("echo_origin_server_up{{server=\"{dead}\"}}")
        ),
        Some(0.0)
    );
    assert_eq!(
        sample(
            &text,
            "echo_requests_total{cache_status=\"miss\",method=\"get\",code=\"502\"}"
        ),
        Some(4.0),
        "{text}"
    );
}

#[test]
fn health_names_the_store_when_redis_is_down_and_stays_200() {
    let master = RedisServer::master();
    let replica = RedisServer::replica_of(&master);
    let origin = TestOrigin::fixed(OriginResponse::ok("x").header("Cache-Control", "max-age=60"));
    let text = format!(
        "{}{}",
        admin_section(),
        redis_sections(&master, &[&replica], "", QUICK_REDIS)
    );
    let echo = EchoUnderTest::with_config(config(&origin.url(), &text));
    // The store's monitor looks at every server twice a second: /health reads what it
    // found last.
    let mut h = Value::Null;
    wait_until("/health ok", Duration::from_secs(5), || {
        let status;
        (status, h) = admin_json(&echo, "/health");
        assert_eq!(status, 200, "{h}");
        h["status"] == "ok"
    });
    assert_eq!(h["store"]["name"], "redis");

    drop(replica);
    drop(master);
    wait_until("/health names both servers", Duration::from_secs(5), || {
        let status;
        (status, h) = admin_json(&echo, "/health");
        assert_eq!(status, 200, "Echo still serves: {h}");
        h["store"]["errors"].as_array().map(Vec::len) == Some(2)
    });
    assert_eq!(h["status"], "degraded", "{h}");
    assert_eq!(h["degraded"], serde_json::json!(["store"]), "{h}");
    assert_eq!(h["store"]["status"], "degraded");
    assert_eq!(
        h["store"]["errors"].as_array().map(Vec::len),
        Some(2),
        "{h}"
    );
    assert_eq!(h["invalidation"]["status"], "ok");
    // And requests still get answers (from the origin).
    assert_eq!(client::get(echo.addr, "/still", &[]).status, 200);
    let text = metrics(&echo);
    assert!(
        sample(&text, "echo_store_errors_total{store=\"redis\",op=\"get\"}")
            .is_some_and(|n| n >= 1.0),
        "{text}"
    );
}

#[test]
fn ready_fails_once_a_drain_begins_while_health_still_answers() {
    let gate = Gate::new();
    let held = gate.hold();
    let origin = TestOrigin::start(move |_| {
        held.wait(Duration::from_secs(10));
        OriginResponse::ok("slow")
    });
    let mut echo = EchoUnderTest::with_config(config(&origin.url(), &admin_section()));
    assert_eq!(
        admin_json(&echo, "/ready"),
        (200, serde_json::json!({"ready": true}))
    );
    let addr = echo.addr;
    let in_flight = std::thread::spawn(move || client::get(addr, "/slow", &[]));
    wait_until(
        "the request is at the origin",
        Duration::from_secs(5),
        || origin.hits("/slow") == 1,
    );
    let admin = echo.admin.unwrap();
    let drainer = std::thread::spawn(move || {
        let clean = echo.echo.drain(Duration::ZERO, Duration::from_secs(10));
        (clean, echo)
    });
    wait_until("/ready fails", Duration::from_secs(5), || {
        client::get(admin, "/ready", &[]).status == 503
    });
    let resp = client::get(admin, "/health", &[]);
    assert_eq!(resp.status, 200);
    assert!(
        resp.body_str().contains("\"draining\":true"),
        "{}",
        resp.body_str()
    );
    gate.open();
    assert_eq!(in_flight.join().unwrap().status, 200);
    let (clean, _echo) = drainer.join().unwrap();
    assert!(clean, "the request in flight finished within the drain");
}

#[test]
fn the_access_log_has_one_line_per_request_with_every_field() {
    let dir = TempDir::new("access-log");
    let path = dir.0.join("access.log");
    let origin =
        TestOrigin::fixed(OriginResponse::ok("0123456789").header("Cache-Control", "max-age=60"));
    let echo = EchoUnderTest::with_config(config(
        &origin.url(),
        &format!("[log]\naccess_log = \"{}\"\n", path.display()),
    ));
    client::get(echo.addr, "/logged?q=\"x\"", &[]);
    client::get(echo.addr, "/logged?q=\"x\"", &[]);
    // The origin got the quotes percent-encoded (its URI type refuses them raw).
    assert_eq!(origin.requests()[0].target, "/logged?q=%22x%22");
    // A line is queued just after its response went out: wait for both.
    let mut text = String::new();
    wait_until("two access log lines", Duration::from_secs(5), || {
        echo.echo.flush_logs(Duration::from_secs(1));
        text = std::fs::read_to_string(&path).unwrap_or_default();
        text.lines().count() >= 2
    });
    let lines: Vec<&str> = text.lines().collect();
    assert_eq!(lines.len(), 2, "{text}");
    let url = origin.url();
    // The miss and the hit in either order: the hit, answered on the connection
    // thread, can end before the miss's fetch worker queues its line.
    let find = |status: &str| {
        *lines
            .iter()
            .find(|l| l.contains(&format!(" {status} ")))
            .unwrap_or_else(|| panic!("no {status} line: {text}"))
    };
    for (line, status, origin) in [
        (find("miss"), "miss", url.as_str()),
        (find("hit"), "hit", "-"),
    ] {
        let fields: Vec<&str> = line.split(' ').collect();
        assert!(
            fields[0].ends_with('Z') && fields[0].contains('T'),
            "{line}"
        );
        assert_eq!(fields[1], "127.0.0.1", "{line}");
        // The quotes the client sent are escaped inside the quoted request line.
        assert_eq!(
            fields[2..5].join(" "),
            "\"GET /logged?q=\\x22x\\x22 HTTP/1.1\"",
            "{line}"
        );
        assert_eq!(&fields[5..7], &["200", "10"], "{line}");
        let seconds: f64 = fields[7].parse().unwrap();
        assert!(seconds > 0.0 && seconds < 10.0, "{line}");
        assert_eq!(&fields[8..10], &[status, origin], "{line}");
        // Issue 21: the Host and the User-Agent (the test client sends none: `-`).
        assert_eq!(&fields[10..], &["\"test.local\"", "\"-\""], "{line}");
    }
    drop(echo);
}

/// Issue 21: `log.access_format = "json"` writes one JSON object per line, with the
/// Host and User-Agent.
#[test]
fn the_access_log_can_be_json() {
    let dir = TempDir::new("access-json");
    let path = dir.0.join("access.log");
    let origin = TestOrigin::fixed(OriginResponse::ok("x").header("Cache-Control", "max-age=60"));
    let echo = EchoUnderTest::with_config(config(
        &origin.url(),
        &format!(
            "[log]\naccess_log = \"{}\"\naccess_format = \"json\"\n",
            path.display()
        ),
    ));
    client::get(echo.addr, "/j", &[("User-Agent", "probe/1.0 \"quoted\"")]);
    let mut text = String::new();
    wait_until("a JSON line", Duration::from_secs(5), || {
        echo.echo.flush_logs(Duration::from_secs(1));
        text = std::fs::read_to_string(&path).unwrap_or_default();
        text.lines().count() >= 1
    });
    let line: Value = serde_json::from_str(text.lines().next().unwrap_or("")).expect("JSON");
    assert_eq!(line["target"], "/j");
    assert_eq!(line["host"], "test.local");
    assert_eq!(line["user_agent"], "probe/1.0 \"quoted\"");
    assert_eq!(line["cache"], "miss");
    assert_eq!(line["status"], 200);
}

#[test]
fn requests_refused_before_parsing_are_counted_and_logged() {
    let dir = TempDir::new("refused-log");
    let path = dir.0.join("access.log");
    let origin = TestOrigin::fixed(OriginResponse::ok("x"));
    let echo = EchoUnderTest::with_config(config(
        &origin.url(),
        &format!(
            "{}[log]\naccess_log = \"{}\"\n",
            admin_section(),
            path.display()
        ),
    ));
    let mut c = RawClient::connect(echo.addr);
    c.send(
        b"GET /a HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n",
    );
    assert_eq!(c.read_response(false).unwrap().status, 400);
    let mut text = String::new();
    wait_until("the refusal is counted", Duration::from_secs(5), || {
        text = metrics(&echo);
        sample(
            &text,
            "echo_requests_total{cache_status=\"none\",method=\"other\",code=\"400\"}",
        ) == Some(1.0)
    });
    assert_eq!(origin.total_hits(), 0);
    let mut log = String::new();
    wait_until("the refusal is logged", Duration::from_secs(5), || {
        echo.echo.flush_logs(Duration::from_secs(1));
        log = std::fs::read_to_string(&path).unwrap_or_default();
        !log.is_empty()
    });
    assert!(log.contains(" 127.0.0.1 \"- - -\" 400 0 "), "{log}");
    assert!(log.trim_end().ends_with(" none - \"-\" \"-\""), "{log}");
}

#[test]
fn a_reload_moves_traffic_and_metrics_to_the_new_servers() {
    let old = TestOrigin::fixed(OriginResponse::ok("old").header("Cache-Control", "no-store"));
    let new = TestOrigin::fixed(OriginResponse::ok("new").header("Cache-Control", "no-store"));
    let mut echo = EchoUnderTest::with_config(config(&old.url(), &admin_section()));
    assert_eq!(client::get(echo.addr, "/r", &[]).body_str(), "old");
    let done = echo
        .echo
        .reload(&config(&new.url(), &admin_section()))
        .unwrap();
    assert_eq!(done.applied, vec!["origin and routes".to_string()]);
    assert!(done.need_restart.is_empty(), "{:?}", done.need_restart);
    assert_eq!(client::get(echo.addr, "/r", &[]).body_str(), "new");
    let text = metrics(&echo);
    let up = |url: &str| sample(&text, &format!("echo_origin_server_up{{server=\"{url}\"}}"));
    assert_eq!(up(&new.url()), Some(1.0), "{text}");
    assert_eq!(up(&old.url()), None, "{text}");
    // A restart-only change is reported, not applied.
    let bigger = config(
        &new.url(),
        &format!("{}[cache]\nmemory_max_bytes = 999999999\n", admin_section()),
    );
    let done = echo.echo.reload(&bigger).unwrap();
    assert_eq!(
        done.need_restart,
        vec!["cache.memory_max_bytes".to_string()]
    );
    assert!(done.applied.is_empty(), "{:?}", done.applied);
}

/// Issue 21: a reload that changes `server.workers` alone names that key as needing a
/// restart and applies nothing (the origin settings derived from it are not a change
/// of the origin); one that touches `[origin]` keeps what was known of the servers that
/// stay: a server out of rotation stays out.
#[test]
fn a_reload_names_the_keys_it_cannot_apply_and_keeps_server_health() {
    let good = TestOrigin::fixed(OriginResponse::ok("good").header("Cache-Control", "no-store"));
    let dead = dead_origin_url();
    let services = |retries: u32| {
        format!(
            "[origin]\nservers = [\"{}\", \"{dead}\"]\nmax_fails = 1\n\
             fail_timeout_ms = 600000\nretries = {retries}\n\
             connect_timeout_ms = 1000\nresponse_timeout_ms = 2000\n{}",
            good.url(),
            admin_section()
        )
    };
    let parse = |text: &str| echo::config::Config::parse(text).expect("config");
    let mut echo = EchoUnderTest::with_config(parse(&services(1)));
    // Round robin sends a request to the dead server: it is taken out.
    for _ in 0..4 {
        assert_eq!(client::get(echo.addr, "/h", &[]).body_str(), "good");
    }
    let down = |echo: &EchoUnderTest| {
        let (_, h) = admin::health(echo.admin.expect("admin"), TOKEN);
        h["origins"][0]["servers"]
            .as_array()
            .expect("servers")
            .iter()
            .filter(|s| s["up"] == false)
            .count()
    };
    assert_eq!(down(&echo), 1, "the dead server is out");

    let done = echo
        .echo
        .reload(&parse(&format!("[server]\nworkers = 8\n{}", services(1))))
        .unwrap();
    assert_eq!(done.need_restart, vec!["server.workers".to_string()]);
    assert!(done.applied.is_empty(), "{:?}", done.applied);

    let done = echo.echo.reload(&parse(&services(2))).unwrap();
    assert!(
        done.applied.contains(&"origin and routes".to_string()),
        "{:?}",
        done.applied
    );
    assert_eq!(
        done.need_restart,
        vec!["server.workers".to_string()],
        "workers went back to its default: still a restart-only change"
    );
    assert_eq!(
        down(&echo),
        1,
        "a reload put the failing server back in rotation"
    );
}

/// Issue 19 (and 21): the admin listener has limits of its own. With the proxy's
/// `max_body_bytes = 10`, `POST /invalidate` with a body of a few hundred bytes still
/// works (it was a plain-text 413), while the proxy refuses the same body.
#[test]
fn the_admin_listener_has_its_own_limits_not_the_proxys() {
    let origin =
        TestOrigin::start(|_| OriginResponse::ok("x").header("Cache-Control", "max-age=600"));
    let echo = EchoUnderTest::with_config(config(
        &origin.url(),
        &format!("[server]\nmax_body_bytes = 10\n{}", admin_section()),
    ));
    let pattern = format!(
        r#"{{"pattern": "^http://[^/]+/never/{}$"}}"#,
        "a".repeat(200)
    );
    let (status, json) = admin::invalidate(echo.admin.expect("admin"), TOKEN, &pattern);
    assert!(matches!(status, 200 | 202), "{status} {json}");
    let resp = RawClient::connect(echo.addr).request("POST", "/upload", &[], pattern.as_bytes());
    assert_eq!(resp.status, 413, "the proxy keeps its own limit");
}

/// Issue 21: `/health` without a token says how Echo is and why, never what it talks to
/// (origin URLs, Redis addresses, errors); with a token, everything.
#[test]
fn health_without_a_token_gives_status_and_reasons_only() {
    let echo = EchoUnderTest::with_config(config(&dead_origin_url(), &admin_section()));
    let admin = echo.admin.expect("admin");
    let anonymous = client::get(admin, "/health", &[]);
    assert_eq!(anonymous.status, 200);
    let brief: Value = serde_json::from_slice(&anonymous.body).expect("JSON");
    let mut keys: Vec<&str> = brief
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    keys.sort_unstable();
    assert_eq!(keys, ["degraded", "draining", "status"], "{brief}");
    assert!(
        !anonymous.body_str().contains("127.0.0.1"),
        "{}",
        anonymous.body_str()
    );
    let (status, full) = admin::health(admin, TOKEN);
    assert_eq!(status, 200);
    assert!(full["origins"].is_array(), "{full}");
    assert!(full.to_string().contains("127.0.0.1"), "{full}");
}

/// Issue 21: `admin.metrics_token` reads (`/metrics`, `GET /cache`, job status) and
/// can change nothing; the scheme of `Authorization` is case-insensitive (RFC 9110
/// §11.1: "It uses a case-insensitive token as a means to identify the authentication
/// scheme").
#[test]
fn the_metrics_token_only_reads_and_the_bearer_scheme_is_case_insensitive() {
    let origin =
        TestOrigin::start(|_| OriginResponse::ok("x").header("Cache-Control", "max-age=600"));
    let echo = EchoUnderTest::with_config(config(
        &origin.url(),
        &format!("{}metrics_token = \"scrape-only\"\n", admin_section()),
    ));
    let admin = echo.admin.expect("admin");
    let call = |method: &str, path: &str, auth: &str, body: &str| {
        RawClient::connect(admin)
            .request(method, path, &[("Authorization", auth)], body.as_bytes())
            .status
    };
    client::get(echo.addr, "/x", &[]);
    let read = "Bearer scrape-only";
    assert_eq!(call("GET", "/metrics", read, ""), 200);
    assert_eq!(call("GET", "/cache?url=http://test.local/x", read, ""), 200);
    let body = r#"{"url": "http://test.local/x"}"#;
    assert_eq!(call("POST", "/invalidate", read, body), 403);
    assert_eq!(call("DELETE", "/invalidate/1", read, ""), 403);
    assert_eq!(call("GET", "/metrics", "Bearer wrong", ""), 401);
    for scheme in ["bearer", "BEARER", "Bearer"] {
        let auth = format!("{scheme} {TOKEN}");
        assert_eq!(call("POST", "/invalidate", &auth, body), 200, "{scheme}");
    }
    let e = echo::config::Config::parse(
        "[origin]\nurl = \"http://a\"\n[admin]\ntoken = \"t\"\nmetrics_token = \"t\"\n",
    )
    .unwrap_err()
    .to_string();
    assert!(e.contains("admin.metrics_token"), "{e}");
}

/// Issue 21: the example config's token is refused where anyone could use it.
#[test]
fn the_example_token_is_refused_on_a_non_loopback_admin_listener() {
    let parse = |listen: &str, token: &str| {
        echo::config::Config::parse(&format!(
            "[origin]\nurl = \"http://a\"\n[admin]\nlisten = \"{listen}\"\ntoken = \"{token}\"\n"
        ))
    };
    let e = parse("0.0.0.0:8081", "change-me").unwrap_err().to_string();
    assert!(e.contains("admin.token") && e.contains("loopback"), "{e}");
    assert!(parse("10.1.2.3:8081", "change-me").is_err());
    assert!(
        parse("127.0.0.1:8081", "change-me").is_ok(),
        "the demo keeps working"
    );
    assert!(parse("0.0.0.0:8081", "a-real-secret").is_ok());
    assert!(parse("0.0.0.0:8081", "").is_err());
}

/// Issue 21: every answer of Echo's own making carries `Date` and `Via` (RFC 9110
/// §6.6.1, §7.6.3), the proxy's also `X-Cache-Status`, and a 405 `Allow` (RFC 9110
/// §15.5.6: "The origin server MUST generate an Allow header field in a 405 response").
#[test]
fn echos_own_answers_carry_date_via_cache_status_and_allow() {
    let echo = EchoUnderTest::with_config(config(
        &dead_origin_url(),
        &format!("[server]\nmax_body_bytes = 10\n{}", admin_section()),
    ));
    let too_large = RawClient::connect(echo.addr).request("POST", "/u", &[], &[b'x'; 100]);
    let bad_gateway = client::get(echo.addr, "/down", &[]);
    let mut raw = RawClient::connect(echo.addr);
    raw.send(b"GET / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n");
    let refused = raw.read_response(false).expect("a refusal");
    for (what, resp, status) in [
        ("413", &too_large, 413),
        ("502", &bad_gateway, 502),
        ("refusal", &refused, 400),
    ] {
        assert_eq!(resp.status, status, "{what}");
        let date = resp
            .header("date")
            .unwrap_or_else(|| panic!("{what}: no Date"));
        assert!(httpdate::parse_http_date(date).is_ok(), "{what}: {date}");
        assert_eq!(resp.header("via"), Some("1.1 echo"), "{what}");
        assert!(resp.header("x-cache-status").is_some(), "{what}");
    }
    let admin = echo.admin.expect("admin");
    let auth = format!("Bearer {TOKEN}");
    for (method, path, allow) in [
        ("DELETE", "/cache", "GET"),
        ("GET", "/invalidate", "POST"),
        ("POST", "/invalidate/7", "GET, DELETE"),
    ] {
        let resp =
            RawClient::connect(admin).request(method, path, &[("Authorization", &auth)], b"");
        assert_eq!(resp.status, 405, "{method} {path}");
        assert_eq!(resp.header("allow"), Some(allow), "{method} {path}");
        assert!(resp.header("date").is_some() && resp.header("via").is_some());
    }
}

/// Issue 21: `cache.expose_status_headers = false` hides `X-Cache-Status` and
/// `Cache-Status` from clients; `Surrogate-Key` never leaves Echo by default
/// (`cache.strip_surrogate_key`), yet invalidation by tag still works; turned off, it
/// passes through.
#[test]
fn status_headers_can_be_hidden_and_surrogate_keys_stay_inside() {
    let origin = TestOrigin::start(|_| {
        OriginResponse::ok("tagged")
            .header("Cache-Control", "max-age=600")
            .header("Surrogate-Key", "org-7 user-9")
    });
    let hidden = EchoUnderTest::with_config(config(
        &origin.url(),
        &format!(
            "[cache]\nexpose_status_headers = false\n{}",
            admin_section()
        ),
    ));
    for expect in ["MISS", "HIT"] {
        let resp = client::get(hidden.addr, "/t", &[]);
        assert_eq!(resp.body_str(), "tagged", "{expect}");
        for field in ["x-cache-status", "cache-status", "surrogate-key"] {
            assert_eq!(resp.header(field), None, "{expect}: {field}");
        }
    }
    // Refused before any cache work (conflicting lengths): the setting holds there too.
    let smuggled = b"GET /t HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n";
    let refused = RawClient::connect(hidden.addr)
        .read_response_after(smuggled)
        .expect("an answer");
    assert_eq!(refused.status, 400);
    assert_eq!(refused.header("x-cache-status"), None);
    let (status, _) = admin::invalidate(hidden.admin.expect("admin"), TOKEN, r#"{"tag": "org-7"}"#);
    assert!(matches!(status, 200 | 202));
    client::get(hidden.addr, "/t", &[]);
    assert_eq!(
        origin.hits("/t"),
        2,
        "the tag still reached the stored entry"
    );

    let shown = EchoUnderTest::with_config(config(
        &origin.url(),
        "[cache]\nstrip_surrogate_key = false\n",
    ));
    for expect in ["MISS", "HIT"] {
        let resp = client::get(shown.addr, "/s", &[]);
        assert_eq!(resp.header("x-cache-status"), Some(expect));
        assert_eq!(
            resp.header("surrogate-key"),
            Some("org-7 user-9"),
            "{expect}"
        );
    }
    let refused = RawClient::connect(shown.addr)
        .read_response_after(smuggled)
        .expect("an answer");
    assert_eq!(refused.status, 400);
    assert_eq!(refused.header("x-cache-status"), Some("BYPASS"));
}

/// Issue 21: `/metrics` has the process (`process_*`), the build, and each store's
/// entries, bytes and evictions.
#[test]
fn metrics_cover_the_process_the_build_and_what_each_store_holds() {
    let origin = TestOrigin::start(|_| {
        OriginResponse::ok(vec![b'x'; 20_000]).header("Cache-Control", "max-age=600")
    });
    let echo = EchoUnderTest::with_config(config(
        &origin.url(),
        &format!(
            "[cache]\nmemory_max_bytes = 65536\nmax_object_bytes = 32768\n{}",
            admin_section()
        ),
    ));
    // Ten 20 KB objects in a 64 KiB store: most are evicted.
    for i in 0..10 {
        client::get(echo.addr, &format!("/o/{i}"), &[]);
    }
    let text = metrics(&echo);
    let value =
        |series: &str| sample(&text, series).unwrap_or_else(|| panic!("no {series}:\n{text}"));
    assert!(value("process_cpu_seconds_total") > 0.0);
    assert!(value("process_resident_memory_bytes") > 1e6);
    assert!(value("process_open_fds") >= 3.0);
    assert!(value("process_max_fds") >= value("process_open_fds"));
    assert!(value("process_threads") >= 2.0);
    assert!(value("process_start_time_seconds") > 1.7e9);
    let version = env!("CARGO_PKG_VERSION");
    assert_eq!(
        value(&format!("echo_build_info{{version=\"{version}\"}}")),
        1.0
    );
    let entries = value("echo_store_entries{store=\"memory\"}");
    assert!((1.0..=3.0).contains(&entries), "{entries}");
    assert!(value("echo_store_bytes{store=\"memory\"}") <= 65536.0);
    assert!(value("echo_store_evictions_total{store=\"memory\"}") >= 7.0);
}
