//! Micro benchmarks on stable Rust (`harness = false`): the cache key, the request-head
//! parser, the RFC 9111 policy and the stored-entry codec (every Redis hit decodes one),
//! the pieces every request goes through.
//!
//! Each is run for a fixed time after a warm-up and reported as ns per operation; the
//! numbers are for comparing one build with the next on the same machine. The load
//! comparison against nginx and Varnish is a separate bench (issue 7).

use std::hint::black_box;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use echo::http::parse::{parse_head, Limits, Parsed};
use echo::key::CacheKey;
use echo::policy::{self, PolicyOptions};
use echo::store::{codec, Entry};
use std::sync::Arc;

fn bench(name: &str, mut f: impl FnMut()) {
    let warm = Instant::now();
    while warm.elapsed() < Duration::from_millis(200) {
        f();
    }
    let mut iterations = 0u64;
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(1) {
        for _ in 0..1000 {
            f();
        }
        iterations += 1000;
    }
    let ns = start.elapsed().as_nanos() as f64 / iterations as f64;
    println!("{name:<40} {ns:>10.1} ns/op");
}

fn main() {
    let peer: SocketAddr = "127.0.0.1:1".parse().expect("addr");
    let limits = Limits {
        max_header_bytes: 32 * 1024,
        max_headers: 100,
        max_target_bytes: 8 * 1024,
        max_body_bytes: 1 << 20,
    };
    let head = b"GET /orgs/42/users?page=2 HTTP/1.1\r\nHost: api.example.com\r\nUser-Agent: bench/1.0\r\nAccept: application/json\r\nAccept-Encoding: gzip, br\r\nX-Request-Id: 0123456789abcdef\r\n\r\n";
    bench("parse_head (6 fields)", || {
        let parsed = parse_head(black_box(head), &limits, peer);
        assert!(matches!(parsed, Ok(Parsed::Complete(..))));
    });

    bench("CacheKey::new", || {
        black_box(CacheKey::new(
            "http",
            black_box("api.example.com"),
            black_box("/orgs/42/users?page=2"),
        ));
    });

    let req: Vec<(String, Vec<u8>)> = vec![
        ("host".into(), b"api.example.com".to_vec()),
        ("accept-encoding".into(), b"gzip, br".to_vec()),
    ];
    let resp: Vec<(String, Vec<u8>)> = vec![
        ("content-type".into(), b"application/json".to_vec()),
        (
            "cache-control".into(),
            b"public, max-age=60, stale-while-revalidate=30".to_vec(),
        ),
        ("date".into(), b"Sat, 21 Nov 2026 20:00:00 GMT".to_vec()),
        ("etag".into(), b"\"v1\"".to_vec()),
        ("vary".into(), b"Accept-Encoding".to_vec()),
    ];
    let opts = PolicyOptions::default();
    let now = SystemTime::now();
    bench("policy::storability (max-age, vary)", || {
        black_box(policy::storability(
            "GET",
            &req,
            200,
            black_box(&resp),
            now,
            &opts,
        ));
    });
    let snapshot = policy::vary_snapshot(&["accept-encoding".to_string()], &req);
    bench("policy::vary_matches", || {
        black_box(policy::vary_matches(black_box(&snapshot), &req));
    });

    let entry = Arc::new(Entry {
        status: 200,
        headers: resp.clone(),
        body: vec![b'e'; 1024],
        file: None,
        response_time: now,
        initial_age: Duration::ZERO,
        freshness: Duration::from_secs(60),
        vary: snapshot.clone(),
        tags: vec!["org-42".into()],
    });
    let variants = vec![entry];
    bench("codec::encode (1 KiB entry)", || {
        black_box(codec::encode(black_box(&variants)));
    });
    let encoded = codec::encode(&variants);
    bench("codec::decode (1 KiB entry)", || {
        let decoded = codec::decode(black_box(&encoded));
        assert!(decoded.is_ok());
    });
}
