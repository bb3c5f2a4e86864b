//! Purge by URL and inspection (issue 17): `{"url": ...}` / `{"urls": [...]}` removes
//! exactly those URLs, every Vary variant, with no regex escaping, on both stores; and
//! `GET /cache?url=` shows what is stored for a URL.

use serde_json::Value;

use crate::support::client::{self, RawClient};
use crate::support::echo::{config, redis_sections, EchoUnderTest};
use crate::support::redis::RedisServer;
use crate::support::{OriginResponse, TestOrigin};

const TOKEN: &str = "urls-token";

fn origin() -> TestOrigin {
    TestOrigin::start(|req| {
        OriginResponse::ok(format!(
            "{} in {}",
            req.target,
            req.header("accept-language").unwrap_or("-")
        ))
        .header("Cache-Control", "max-age=600")
        .header("Vary", "Accept-Language")
        .header("ETag", "\"v1\"")
        .header("Surrogate-Key", "org-7")
    })
}

fn echo_on(origin: &TestOrigin, store: &str) -> EchoUnderTest {
    EchoUnderTest::with_config(config(
        &origin.url(),
        &format!("[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{TOKEN}\"\n{store}"),
    ))
}

fn admin(echo: &EchoUnderTest, method: &str, target: &str, body: &str) -> (u16, Value) {
    let auth = format!("Bearer {TOKEN}");
    let resp = RawClient::connect(echo.admin.expect("admin")).request(
        method,
        target,
        &[
            ("Authorization", &auth),
            ("Content-Type", "application/json"),
        ],
        body.as_bytes(),
    );
    let json = serde_json::from_slice(&resp.body).unwrap_or(Value::Null);
    (resp.status, json)
}

fn status(echo: &EchoUnderTest, target: &str, lang: &str) -> String {
    let resp = client::get(echo.addr, target, &[("Accept-Language", lang)]);
    assert_eq!(resp.status, 200);
    resp.header("x-cache-status").unwrap_or("?").to_string()
}

/// Two Vary variants of a URL full of regex metacharacters, and a neighbour.
fn warm(echo: &EchoUnderTest) {
    for (t, lang) in [
        ("/a?x=(1)+[2]", "en"),
        ("/a?x=(1)+[2]", "fr"),
        ("/a?x=2", "en"),
    ] {
        assert_eq!(status(echo, t, lang), "MISS");
        assert_eq!(status(echo, t, lang), "HIT");
    }
}

fn purge_one_url_every_variant(echo: &EchoUnderTest) {
    warm(echo);
    let (code, report) = admin(
        echo,
        "POST",
        "/invalidate",
        r#"{"url": "http://TEST.local:80/a?x=(1)+[2]"}"#,
    );
    assert_eq!(code, 200, "{report}");
    assert_eq!(
        report["what"], "url=http://test.local/a?x=(1)+[2]",
        "{report}"
    );
    assert_eq!(
        (report["matched"].as_u64(), report["deleted"].as_u64()),
        (Some(1), Some(1)),
        "{report}"
    );
    assert_eq!(status(echo, "/a?x=(1)+[2]", "en"), "MISS");
    assert_eq!(status(echo, "/a?x=(1)+[2]", "fr"), "MISS");
    assert_eq!(status(echo, "/a?x=2", "en"), "HIT", "a neighbour stays");
    // A list: what is stored goes, what is not is not counted.
    let (code, report) = admin(
        echo,
        "POST",
        "/invalidate",
        r#"{"urls": ["http://test.local/a?x=2", "http://test.local/a?x=(1)+[2]", "http://test.local/never"]}"#,
    );
    assert_eq!(code, 200, "{report}");
    assert_eq!(report["matched"], 2, "{report}");
    assert_eq!(status(echo, "/a?x=2", "en"), "MISS");
}

#[test]
fn a_url_purge_removes_that_url_only_in_memory() {
    let o = origin();
    purge_one_url_every_variant(&echo_on(&o, ""));
}

#[test]
fn a_url_purge_removes_that_url_only_in_redis() {
    let o = origin();
    let master = RedisServer::master();
    let replica = RedisServer::replica_of(&master);
    let echo = echo_on(&o, &redis_sections(&master, &[&replica], "", ""));
    purge_one_url_every_variant(&echo);
    assert!(
        !replica.exists("echo:v1:http://test.local/a?x=(1)+[2]"),
        "waited for the replica"
    );
}

#[test]
fn url_purges_refuse_what_they_cannot_do_exactly() {
    let o = origin();
    let echo = echo_on(&o, "");
    let many: Vec<String> = (0..1001).map(|i| format!("\"http://h/{i}\"")).collect();
    for (body, says) in [
        (
            r#"{"url": "http://test.local/a", "pattern": "^/a"}"#.to_string(),
            "no pattern, tag or host",
        ),
        (r#"{"url": "/a"}"#.to_string(), "invalid URL"),
        (
            r#"{"url": "ftp://test.local/a"}"#.to_string(),
            "invalid URL",
        ),
        (
            r#"{"url": "http://u@test.local/a"}"#.to_string(),
            "invalid URL",
        ),
        (
            r#"{"url": "http://test.local/a", "urls": []}"#.to_string(),
            "not both",
        ),
        (r#"{"urls": []}"#.to_string(), "at least one URL"),
        (
            format!(r#"{{"urls": [{}]}}"#, many.join(",")),
            "at most 1000",
        ),
    ] {
        let (code, answer) = admin(&echo, "POST", "/invalidate", &body);
        assert_eq!(code, 400, "{body}: {answer}");
        let error = answer["error"].as_str().unwrap_or("");
        assert!(error.contains(says), "{body}: {answer}");
    }
}

fn inspect_shows_each_variant(echo: &EchoUnderTest) {
    warm(echo);
    let (code, stored) = admin(
        echo,
        "GET",
        "/cache?url=http%3A%2F%2Ftest.local%2Fa%3Fx%3D(1)%2B%5B2%5D",
        "",
    );
    assert_eq!(code, 200, "{stored}");
    assert_eq!(stored["key"], "http://test.local/a?x=(1)+[2]", "{stored}");
    let variants = stored["variants"].as_array().expect("variants");
    assert_eq!(variants.len(), 2, "{stored}");
    let langs: Vec<&str> = variants
        .iter()
        .filter_map(|v| v["vary"]["accept-language"].as_str())
        .collect();
    assert_eq!(langs.len(), 2, "{stored}");
    assert!(langs.contains(&"en") && langs.contains(&"fr"), "{stored}");
    for v in variants {
        assert_eq!(v["status"], 200, "{stored}");
        assert_eq!(v["freshness_lifetime_s"], 600, "{stored}");
        assert_eq!(v["fresh"], true, "{stored}");
        assert_eq!(v["etag"], "\"v1\"", "{stored}");
        assert_eq!(v["tags"], serde_json::json!(["org-7"]), "{stored}");
        assert!(v["size_bytes"].as_u64().is_some_and(|n| n > 0), "{stored}");
        assert!(
            v["stored_at"].as_str().is_some_and(|d| d.ends_with("GMT")),
            "{stored}"
        );
    }
    let (code, answer) = admin(echo, "GET", "/cache?url=http://test.local/never", "");
    assert_eq!(code, 404, "{answer}");
    let (code, answer) = admin(echo, "GET", "/cache", "");
    assert_eq!(code, 400, "{answer}");
    // The token is required.
    let resp = client::get(
        echo.admin.expect("admin"),
        "/cache?url=http://test.local/a",
        &[],
    );
    assert_eq!(resp.status, 401);
}

#[test]
fn inspection_shows_what_is_stored_in_memory() {
    let o = origin();
    inspect_shows_each_variant(&echo_on(&o, ""));
}

#[test]
fn inspection_shows_what_is_stored_in_redis() {
    let o = origin();
    let master = RedisServer::master();
    inspect_shows_each_variant(&echo_on(&o, &redis_sections(&master, &[], "", "")));
}
