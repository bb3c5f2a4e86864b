//! Several origin servers: balancing, active health checks, passive failure detection
//! and retries, routing by path prefix and host, https origins and per-route timeouts.
//! Every server is a real programmable origin (or a real TLS server) on its own port.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use echo::config::Config;
use serde_json::Value;

use crate::support::admin;
use crate::support::client::{self, RawClient, RawResponse};
use crate::support::echo::EchoUnderTest;
use crate::support::origin::dead_origin_url;
use crate::support::{wait_until, Gate, OriginResponse, TempDir, TestOrigin};

const TOKEN: &str = "origins-token";

/// Echo with the admin API, `[origin]` and `rest` (routes, other sections) as given.
fn echo_with(origin_section: &str, rest: &str) -> EchoUnderTest {
    // Test-friendly timeouts, unless the test sets its own.
    let defaults: String = [
        ("connect_timeout_ms", 1000),
        ("response_timeout_ms", 2000),
        ("read_timeout_ms", 2000),
    ]
    .iter()
    .filter(|(k, _)| !origin_section.contains(k))
    .map(|(k, v)| format!("{k} = {v}\n"))
    .collect();
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n[origin]\n\
         {defaults}{origin_section}\n{rest}"
    );
    let cfg = Config::parse(&text).unwrap_or_else(|e| panic!("test config invalid: {e}\n{text}"));
    EchoUnderTest::with_config(cfg)
}

fn servers(urls: &[String]) -> String {
    let quoted: Vec<String> = urls.iter().map(|u| format!("\"{u}\"")).collect();
    format!("servers = [{}]", quoted.join(", "))
}

/// An origin that answers everything with `no-store` (every request reaches it) and
/// names itself in the body; `/hc` passes while `healthy` is set.
fn named_origin(name: &'static str, healthy: Arc<AtomicBool>) -> TestOrigin {
    TestOrigin::start(move |req| {
        if req.path() == "/hc" {
            return if healthy.load(Ordering::SeqCst) {
                OriginResponse::ok("ok")
            } else {
                OriginResponse::status(503)
            };
        }
        OriginResponse::ok(name).header("Cache-Control", "no-store")
    })
}

fn data_hits(origin: &TestOrigin) -> usize {
    origin
        .requests()
        .iter()
        .filter(|r| r.path() != "/hc")
        .count()
}

fn health(echo: &EchoUnderTest) -> Value {
    let (status, json) = crate::support::admin::health(echo.admin.expect("admin"), TOKEN);
    assert_eq!(status, 200, "{json}");
    json
}

/// Whether `/health` lists `url` with `up`.
fn server_up(echo: &EchoUnderTest, url: &str) -> Option<bool> {
    let h = health(echo);
    h["origins"]
        .as_array()?
        .iter()
        .flat_map(|o| o["servers"].as_array().cloned().unwrap_or_default())
        .find(|s| s["url"] == url)
        .and_then(|s| s["up"].as_bool())
}

fn metrics(echo: &EchoUnderTest) -> String {
    admin::metrics(echo.admin.expect("admin"), TOKEN)
}

#[test]
fn round_robin_spreads_requests_evenly() {
    let up = Arc::new(AtomicBool::new(true));
    let origins: Vec<TestOrigin> = ["a", "b", "c"]
        .into_iter()
        .map(|n| named_origin(n, Arc::clone(&up)))
        .collect();
    let urls: Vec<String> = origins.iter().map(TestOrigin::url).collect();
    let echo = echo_with(&servers(&urls), "");
    let mut bodies = Vec::new();
    for i in 0..30 {
        let resp = client::get(echo.addr, &format!("/spread/{i}"), &[]);
        assert_eq!(resp.status, 200);
        bodies.push(resp.body_str());
    }
    for (name, origin) in ["a", "b", "c"].iter().zip(&origins) {
        assert_eq!(data_hits(origin), 10, "server {name}");
        assert_eq!(bodies.iter().filter(|b| b == name).count(), 10);
    }
    // Each server gets its own Host: its own authority.
    for origin in &origins {
        let req = origin.last_request().unwrap();
        assert_eq!(req.header("host"), Some(origin.addr().to_string().as_str()));
    }
}

#[test]
fn least_outstanding_sends_new_requests_to_the_idle_server() {
    // Both servers hold /slow until released; /fast answers at once.
    let gate = Gate::new();
    let make = |name: &'static str| {
        let held = gate.hold();
        TestOrigin::start(move |req| {
            if req.path() == "/slow" {
                held.wait(Duration::from_secs(20));
            }
            OriginResponse::ok(name).header("Cache-Control", "no-store")
        })
    };
    let (a, b) = (make("a"), make("b"));
    // A connect that times out on a loaded machine would hold a server down and send
    // its requests to the other: generous, so only the balancing is tested.
    let echo = echo_with(
        &format!(
            "{}\nbalance = \"least_outstanding\"\nresponse_timeout_ms = 20000\n\
             connect_timeout_ms = 10000",
            servers(&[a.url(), b.url()])
        ),
        "",
    );
    let addr = echo.addr;
    let slow = std::thread::spawn(move || client::get(addr, "/slow", &[]));
    wait_until("/slow reaches a server", Duration::from_secs(10), || {
        a.hits("/slow") + b.hits("/slow") == 1
    });
    let (busy, idle) = if a.hits("/slow") == 1 {
        (&a, &b)
    } else {
        (&b, &a)
    };
    for _ in 0..10 {
        assert_eq!(client::get(echo.addr, "/fast", &[]).status, 200);
    }
    assert_eq!(busy.hits("/fast"), 0, "the busy server got new requests");
    assert_eq!(idle.hits("/fast"), 10);
    gate.open();
    assert_eq!(slow.join().unwrap().status, 200);
    // Its request done, the first server is a candidate again.
    for _ in 0..4 {
        client::get(echo.addr, "/after", &[]);
    }
    assert!(busy.hits("/after") > 0);
}

#[test]
fn a_server_failing_health_checks_gets_no_traffic_until_it_passes_again() {
    let a_up = Arc::new(AtomicBool::new(true));
    let b_up = Arc::new(AtomicBool::new(true));
    let a = named_origin("a", Arc::clone(&a_up));
    let b = named_origin("b", Arc::clone(&b_up));
    let echo = echo_with(
        &format!(
            "{}\nhealth_check_path = \"/hc\"\nhealth_check_interval_ms = 30\n\
             health_check_timeout_ms = 1000\nhealth_check_fails = 2\nhealth_check_passes = 2",
            servers(&[a.url(), b.url()])
        ),
        "",
    );
    wait_until("both servers probed", Duration::from_secs(5), || {
        a.hits("/hc") >= 1 && b.hits("/hc") >= 1
    });
    b_up.store(false, Ordering::SeqCst);
    wait_until("b taken out", Duration::from_secs(5), || {
        server_up(&echo, &b.url()) == Some(false)
    });
    let h = health(&echo);
    assert_eq!(h["status"], "ok", "one server is enough to serve: {h}");
    assert_eq!(h["origins"][0]["status"], "degraded", "{h}");
    assert!(metrics(&echo).contains(&format!(
        "echo_origin_server_up{{server=\"{}\"}} 0",
        b.url()
    )));
    let b_before = data_hits(&b);
    for i in 0..20 {
        let resp = client::get(echo.addr, &format!("/x/{i}"), &[]);
        assert_eq!((resp.status, resp.body_str().as_str()), (200, "a"));
    }
    assert_eq!(
        data_hits(&b),
        b_before,
        "a server out of rotation got traffic"
    );

    b_up.store(true, Ordering::SeqCst);
    wait_until("b back", Duration::from_secs(5), || {
        server_up(&echo, &b.url()) == Some(true)
    });
    for i in 0..20 {
        client::get(echo.addr, &format!("/y/{i}"), &[]);
    }
    assert_eq!(data_hits(&b) - b_before, 10, "b is back in the rotation");
    assert!(metrics(&echo).contains(&format!(
        "echo_origin_server_up{{server=\"{}\"}} 1",
        b.url()
    )));
}

#[test]
fn refused_connections_are_retried_on_another_server_without_client_errors() {
    let up = Arc::new(AtomicBool::new(true));
    let live = named_origin("live", up);
    let dead = dead_origin_url();
    let echo = echo_with(
        &format!(
            "{}\nmax_fails = 2\nfail_timeout_ms = 60000",
            servers(&[dead.clone(), live.url()])
        ),
        "",
    );
    for i in 0..20 {
        let resp = client::get(echo.addr, &format!("/r/{i}"), &[]);
        assert_eq!(
            (resp.status, resp.body_str().as_str()),
            (200, "live"),
            "request {i}"
        );
    }
    // A PUT's body was not read when its connect was refused: it may be retried too.
    let mut c = RawClient::connect(echo.addr);
    let resp = c.request("PUT", "/put", &[], b"payload");
    assert_eq!(resp.status, 200);
    assert_eq!(live.last_request().unwrap().body, b"payload");
    assert_eq!(data_hits(&live), 21);
    // Two refusals took the dead server out; /health says why.
    assert_eq!(server_up(&echo, &dead), Some(false));
    let h = health(&echo).to_string();
    assert!(h.contains("failed requests"), "{h}");
}

#[test]
fn a_post_is_never_retried_once_its_body_was_sent() {
    // The first server reads the whole request, then closes without answering.
    let eater = TcpListener::bind("127.0.0.1:0").unwrap();
    let eater_url = format!("http://{}", eater.local_addr().unwrap());
    let eaten = Arc::new(Mutex::new(Vec::<u8>::new()));
    let sink = Arc::clone(&eaten);
    std::thread::spawn(move || {
        for stream in eater.incoming() {
            let Ok(mut stream) = stream else { return };
            stream
                .set_read_timeout(Some(Duration::from_secs(5)))
                .unwrap();
            let mut buf = [0u8; 4096];
            let mut got = Vec::new();
            while !got.ends_with(b"payload") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => got.extend_from_slice(&buf[..n]),
                }
            }
            sink.lock().unwrap().extend_from_slice(&got);
            drop(stream);
        }
    });
    let up = Arc::new(AtomicBool::new(true));
    let other = named_origin("other", up);
    let echo = echo_with(&servers(&[eater_url, other.url()]), "");
    // Round robin starts with the first server.
    let mut c = RawClient::connect(echo.addr);
    let resp = c.request("POST", "/orders", &[], b"payload");
    assert_eq!(resp.status, 502, "{}", resp.body_str());
    assert!(String::from_utf8_lossy(&eaten.lock().unwrap()).ends_with("payload"));
    assert_eq!(other.hits("/orders"), 0, "the POST was sent twice");
}

#[test]
fn routes_choose_services_by_longest_prefix_then_host() {
    let up = Arc::new(AtomicBool::new(true));
    let default = named_origin("default", Arc::clone(&up));
    let api = named_origin("api", Arc::clone(&up));
    let v2 = named_origin("v2", Arc::clone(&up));
    let admin = named_origin("admin", Arc::clone(&up));
    let echo = echo_with(
        &format!("url = \"{}\"", default.url()),
        &format!(
            "[[route]]\npath_prefix = \"/api/\"\nurl = \"{}\"\n\
             [[route]]\npath_prefix = \"/api/v2/\"\nurl = \"{}\"\n\
             [[route]]\npath_prefix = \"/api/\"\nhost = \"admin.example\"\nurl = \"{}\"\n",
            api.url(),
            v2.url(),
            admin.url()
        ),
    );
    let cases: &[(&str, Option<&str>, &str)] = &[
        ("/", None, "default"),
        ("/apix", None, "default"),
        ("/api/users?page=2", None, "api"),
        ("/api/v2/users", None, "v2"),
        ("/api/users", Some("admin.example:8080"), "admin"),
        ("/api/users", Some("ADMIN.example"), "admin"),
        // A longer prefix beats a host match.
        ("/api/v2/users", Some("admin.example"), "v2"),
        ("/other", Some("admin.example"), "default"),
    ];
    for (target, host, expected) in cases {
        let headers: Vec<(&str, &str)> = host.iter().map(|h| ("Host", *h)).collect();
        let resp = client::get(echo.addr, target, &headers);
        assert_eq!(resp.body_str(), *expected, "{target} for host {host:?}");
    }
    assert_eq!(
        api.requests()[0].target,
        "/api/users?page=2",
        "target unchanged"
    );
}

#[test]
fn routing_leaves_cache_keys_and_invalidation_alone() {
    let counter = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&counter);
    let api = TestOrigin::start(move |_| {
        let n = seen.fetch_add(1, Ordering::SeqCst);
        OriginResponse::ok(format!("v{n}")).header("Cache-Control", "max-age=600")
    });
    let default = TestOrigin::fixed(OriginResponse::ok("default"));
    let echo = echo_with(
        &format!("url = \"{}\"", default.url()),
        &format!(
            "[[route]]\npath_prefix = \"/api/\"\nurl = \"{}\"\n",
            api.url()
        ),
    );
    assert_eq!(
        client::get(echo.addr, "/api/1", &[]).header("x-cache-status"),
        Some("MISS")
    );
    let hit = client::get(echo.addr, "/api/1", &[]);
    assert_eq!(
        (hit.header("x-cache-status"), hit.body_str().as_str()),
        (Some("HIT"), "v0")
    );
    // The pattern sees the target as the client sent it.
    let mut c = RawClient::connect(echo.admin.unwrap());
    let auth = format!("Bearer {TOKEN}");
    let resp = c.request(
        "POST",
        "/invalidate",
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        br#"{"pattern": "^/api/1$"}"#,
    );
    assert_eq!(resp.status, 200, "{}", resp.body_str());
    let after = client::get(echo.addr, "/api/1", &[]);
    assert_eq!(
        (after.header("x-cache-status"), after.body_str().as_str()),
        (Some("MISS"), "v1")
    );
}

#[test]
fn preserve_host_sends_the_clients_host_on_its_route_only() {
    let up = Arc::new(AtomicBool::new(true));
    let default = named_origin("default", Arc::clone(&up));
    let kept = named_origin("kept", Arc::clone(&up));
    let echo = echo_with(
        &format!("url = \"{}\"", default.url()),
        &format!(
            "[[route]]\npath_prefix = \"/keep/\"\nurl = \"{}\"\npreserve_host = true\n",
            kept.url()
        ),
    );
    client::get(echo.addr, "/keep/a", &[("Host", "shop.example")]);
    client::get(echo.addr, "/b", &[("Host", "shop.example")]);
    assert_eq!(
        kept.last_request().unwrap().header("host"),
        Some("shop.example")
    );
    let d = default.last_request().unwrap();
    assert_eq!(d.header("host"), Some(default.addr().to_string().as_str()));
    assert_eq!(d.header("x-forwarded-host"), Some("shop.example"));
}

#[test]
fn every_server_down_serves_stale_where_allowed_and_otherwise_502_at_once() {
    let up = Arc::new(AtomicBool::new(true));
    let healthy = Arc::clone(&up);
    let origin = TestOrigin::start(move |req| match req.path() {
        "/hc" if healthy.load(Ordering::SeqCst) => OriginResponse::ok("ok"),
        "/hc" => OriginResponse::status(503),
        "/sie" => {
            OriginResponse::ok("good copy").header("Cache-Control", "max-age=1, stale-if-error=600")
        }
        _ => OriginResponse::ok("plain").header("Cache-Control", "max-age=1"),
    });
    let echo = echo_with(
        &format!(
            "url = \"{}\"\nhealth_check_path = \"/hc\"\nhealth_check_interval_ms = 30\n\
             health_check_fails = 1\nhealth_check_passes = 1",
            origin.url()
        ),
        "",
    );
    client::get(echo.addr, "/sie", &[]);
    client::get(echo.addr, "/plain", &[]);
    up.store(false, Ordering::SeqCst);
    wait_until("the only server is out", Duration::from_secs(5), || {
        server_up(&echo, &origin.url()) == Some(false)
    });
    let h = health(&echo);
    assert_eq!(h["status"], "degraded", "{h}");
    assert_eq!(h["origins"][0]["status"], "down", "{h}");
    // Once both entries are stale (max-age=1), neither can be refreshed.
    wait_until("the entries go stale", Duration::from_secs(5), || {
        client::get(echo.addr, "/plain", &[]).status == 502
    });
    let plain = client::get(echo.addr, "/plain", &[]);
    assert_eq!(plain.status, 502);
    assert!(
        plain
            .header("cache-status")
            .unwrap_or("")
            .contains("detail=origin-unavailable"),
        "{:?}",
        plain.header("cache-status")
    );
    let stale = client::get(echo.addr, "/sie", &[]);
    assert_eq!(
        (
            stale.status,
            stale.header("x-cache-status"),
            stale.body_str().as_str()
        ),
        (200, Some("STALE"), "good copy")
    );
    // The dead server was never asked: only probes reached it.
    assert_eq!(origin.hits("/plain"), 1);
    assert_eq!(origin.hits("/sie"), 1);
}

#[test]
fn a_failing_server_is_held_down_then_tried_again() {
    let dead = dead_origin_url();
    let echo = echo_with(
        &format!("url = \"{dead}\"\nmax_fails = 1\nfail_timeout_ms = 300"),
        "",
    );
    let first = client::get(echo.addr, "/h", &[]);
    assert_eq!(first.status, 502);
    assert!(first
        .header("cache-status")
        .unwrap()
        .contains("origin-connect"));
    // Held down: answered without a connect attempt.
    let second = client::get(echo.addr, "/h", &[]);
    assert_eq!(second.status, 502);
    assert!(second
        .header("cache-status")
        .unwrap()
        .contains("origin-unavailable"));
    // After the hold-down a request tries it again (and finds it refusing).
    wait_until("the hold-down ends", Duration::from_secs(5), || {
        client::get(echo.addr, "/h", &[])
            .header("cache-status")
            .unwrap_or("")
            .contains("origin-connect")
    });
}

#[test]
fn per_route_timeouts_override_the_origin_ones() {
    let slow = TestOrigin::start(|_| {
        OriginResponse::ok("slow")
            .header("Cache-Control", "no-store")
            .delay(Duration::from_millis(600))
    });
    let echo = echo_with(
        &format!("url = \"{}\"\nresponse_timeout_ms = 5000", slow.url()),
        &format!(
            "[[route]]\npath_prefix = \"/impatient/\"\nurl = \"{}\"\nresponse_timeout_ms = 100\n",
            slow.url()
        ),
    );
    assert_eq!(client::get(echo.addr, "/patient", &[]).status, 200);
    let resp = client::get(echo.addr, "/impatient/x", &[]);
    assert_eq!(resp.status, 504, "{}", resp.body_str());
}

// ---------------------------------------------------------------------------------------
// https

/// A throwaway CA and a server certificate for `localhost` and 127.0.0.1 signed by it.
struct TestPki {
    ca_pem: String,
    cert_der: rustls::pki_types::CertificateDer<'static>,
    key_der: Vec<u8>,
}

fn test_pki() -> TestPki {
    use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let key = KeyPair::generate().unwrap();
    let params =
        CertificateParams::new(vec!["localhost".to_string(), "127.0.0.1".to_string()]).unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    TestPki {
        ca_pem: ca.pem(),
        cert_der: cert.der().clone(),
        key_der: key.serialize_der(),
    }
}

/// What the TLS origin saw of each request: (SNI, Host).
type Seen = Arc<Mutex<Vec<(Option<String>, Option<String>)>>>;

/// A TLS origin on 127.0.0.1: answers every request with `body`, one per connection.
fn tls_origin(pki: &TestPki, body: &'static str) -> (u16, Seen) {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(
            vec![pki.cert_der.clone()],
            rustls::pki_types::PrivateKeyDer::Pkcs8(pki.key_der.clone().into()),
        )
        .unwrap();
    let config = Arc::new(config);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let seen: Seen = Arc::new(Mutex::new(Vec::new()));
    let record = Arc::clone(&seen);
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { return };
            let config = Arc::clone(&config);
            let record = Arc::clone(&record);
            std::thread::spawn(move || serve_tls(stream, config, record, body));
        }
    });
    (port, seen)
}

fn serve_tls(stream: TcpStream, config: Arc<rustls::ServerConfig>, seen: Seen, body: &str) {
    stream
        .set_read_timeout(Some(Duration::from_secs(5)))
        .unwrap();
    let Ok(conn) = rustls::ServerConnection::new(config) else {
        return;
    };
    let mut tls = rustls::StreamOwned::new(conn, stream);
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") {
        match tls.read(&mut buf) {
            Ok(0) | Err(_) => return,
            Ok(n) => head.extend_from_slice(&buf[..n]),
        }
    }
    let text = String::from_utf8_lossy(&head).to_string();
    let host = text
        .lines()
        .find_map(|l| {
            l.strip_prefix("host: ")
                .or_else(|| l.strip_prefix("Host: "))
        })
        .map(str::to_string);
    let sni = tls.conn.server_name().map(str::to_string);
    seen.lock().unwrap().push((sni, host));
    let response = format!(
        "HTTP/1.1 200 OK\r\ncontent-length: {}\r\ncache-control: max-age=60\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tls.write_all(response.as_bytes());
    tls.conn.send_close_notify();
    let _ = tls.flush();
}

#[test]
fn an_https_origin_is_verified_against_the_configured_ca_and_gets_sni() {
    let pki = test_pki();
    let (port, seen) = tls_origin(&pki, "secret stuff");
    let dir = TempDir::new("tls");
    let ca_file = dir.file("ca.pem", &pki.ca_pem);
    let echo = echo_with(
        &format!(
            "url = \"https://localhost:{port}\"\nca_file = \"{}\"",
            ca_file.display()
        ),
        "",
    );
    let resp = client::get(echo.addr, "/tls", &[]);
    assert_eq!(
        (resp.status, resp.body_str().as_str()),
        (200, "secret stuff")
    );
    assert_eq!(resp.header("x-cache-status"), Some("MISS"));
    assert_eq!(
        client::get(echo.addr, "/tls", &[]).header("x-cache-status"),
        Some("HIT")
    );
    let first = seen.lock().unwrap()[0].clone();
    assert_eq!(first.0.as_deref(), Some("localhost"), "SNI");
    assert_eq!(
        first.1.as_deref(),
        Some(format!("localhost:{port}").as_str())
    );

    // Without the CA, the system's roots do not trust the test certificate: 502, and
    // the request never reaches the server's HTTP layer.
    let untrusting = echo_with(&format!("url = \"https://localhost:{port}\""), "");
    let before = seen.lock().unwrap().len();
    let refused: RawResponse = client::get(untrusting.addr, "/tls", &[]);
    assert_eq!(refused.status, 502);
    assert_eq!(seen.lock().unwrap().len(), before);
}

/// Issue 21: a name that does not resolve is a server that cannot be reached (a connect
/// failure, counted as such), not an origin that broke the protocol: it takes the
/// server out like a refused connection does.
#[test]
fn a_dns_failure_is_a_connect_failure() {
    let echo = EchoUnderTest::with_config(crate::support::echo::config(
        "http://echo-test-host.invalid:8000",
        &format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n"),
    ));
    let resp = client::get(echo.addr, "/x", &[]);
    assert_eq!(resp.status, 502, "{}", resp.body_str());
    let metrics = admin::metrics(echo.admin.expect("admin"), TOKEN);
    let errors: Vec<&str> = metrics
        .lines()
        .filter(|l| l.contains("origin_errors"))
        .collect();
    let count = |kind: &str| {
        errors
            .iter()
            .find(|l| l.contains(&format!("kind=\"{kind}\"")))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert!(count("connect") >= 1.0, "{errors:?}");
    assert_eq!(count("protocol"), 0.0, "{errors:?}");
}
