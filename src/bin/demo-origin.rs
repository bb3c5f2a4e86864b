//! `demo-origin`: a small backend to put Echo in front of, for `make run` and for
//! trying things by hand. Not installed.
//!
//! - `GET /data`: a JSON document with an ETag, `Cache-Control: public, max-age=60`,
//!   `Surrogate-Key: data demo` and a counter of how many times the origin itself was
//!   asked (so a cache HIT shows the same count as the MISS before it); a 304 to an
//!   `If-None-Match` that names the current version.
//! - `PUT /data`: replaces the document (Echo invalidates its cached copy).
//! - `GET /bytes/N`: N bytes (at most 16 MiB), `Cache-Control: public, max-age=60`, for
//!   benchmarks.
//! - `GET /slow/MS/...`: a small body after MS milliseconds (at most 60 s),
//!   `Cache-Control: public, max-age=60`: a slow origin, for the herd benchmark.
//! - `GET /counts`: how many `/slow/` requests it has answered (not cacheable).
//! - `GET /health-check`: `ok`.
//! - anything else: 404.
//!
//! It runs on Echo's own HTTP front end with a handler of its own.

use std::io::Read;
use std::net::TcpListener;
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use echo::config::ServerConfig;
use echo::http::exchange::Exchange;
use echo::http::handler::{Handler, Step};
use echo::server;

struct Demo {
    data: Mutex<(u64, String)>,
    hits: AtomicU64,
    /// `/slow/` requests answered.
    slow: AtomicU64,
}

fn field(name: &str, value: &str) -> (String, Vec<u8>) {
    (name.to_string(), value.as_bytes().to_vec())
}

/// A `/slow/` request: how long to wait before answering, on a fetch worker (so the
/// few workers stay free).
struct Slow(u64);

impl Handler for Demo {
    type Job = Slow;

    fn handle(&self, ex: &mut Exchange<'_>) -> Step<Self::Job> {
        if let Some(rest) = ex.req.target.strip_prefix("/slow/") {
            let ms = rest
                .split('/')
                .next()
                .and_then(|ms| ms.parse::<u64>().ok())
                .filter(|ms| *ms <= 60_000);
            if let Some(ms) = ms {
                return Step::Defer(Slow(ms));
            }
        }
        self.answer(ex);
        Step::Answered
    }

    fn fetch(&self, ex: &mut Exchange<'_>, Slow(ms): Slow) {
        std::thread::sleep(std::time::Duration::from_millis(ms));
        self.slow.fetch_add(1, Ordering::Relaxed);
        let headers = [
            field("content-type", "text/plain"),
            field("cache-control", "public, max-age=60"),
        ];
        let body = format!("slow {}\n", ex.req.target);
        let _ = ex.respond(200, &headers, body.as_bytes());
    }
}

impl Demo {
    fn answer(&self, ex: &mut Exchange<'_>) {
        let path = ex.req.target.split('?').next().unwrap_or("/").to_string();
        let method = ex.req.method.clone();
        match (method.as_str(), path.as_str()) {
            ("GET" | "HEAD", "/data") => {
                let hits = self.hits.fetch_add(1, Ordering::Relaxed) + 1;
                let (version, text) = self.data.lock().map(|d| d.clone()).unwrap_or_default();
                let etag = format!("\"v{version}\"");
                // Tags for invalidation by tag (`{"tag": "data"}`); Echo strips the field
                // before answering (cache.strip_surrogate_key).
                let headers = [
                    field("content-type", "application/json"),
                    field("etag", &etag),
                    field("cache-control", "public, max-age=60"),
                    field("surrogate-key", "data demo"),
                ];
                // A revalidation that names the current version: 304, no body (the
                // counter in a stored copy then stays as it was).
                let current = ex.req.header("if-none-match").is_some_and(|v| {
                    v.split(|&b| b == b',')
                        .any(|t| t.trim_ascii() == etag.as_bytes())
                });
                if current {
                    let _ = ex.respond(304, &headers[1..], b"");
                    return;
                }
                let body = format!(
                    "{{\"version\": {version}, \"data\": {text:?}, \"origin_hits\": {hits}}}\n"
                );
                let _ = ex.respond(200, &headers, body.as_bytes());
            }
            ("PUT", "/data") => {
                let mut text = String::new();
                if ex.body().take(64 * 1024).read_to_string(&mut text).is_err() {
                    ex.respond_error(400, "the body must be UTF-8 text", true);
                    return;
                }
                let version = match self.data.lock() {
                    Ok(mut d) => {
                        d.0 += 1;
                        d.1 = text.trim_end().to_string();
                        d.0
                    }
                    Err(_) => 0,
                };
                let body = format!("{{\"version\": {version}}}\n");
                let headers = [field("content-type", "application/json")];
                let _ = ex.respond(200, &headers, body.as_bytes());
            }
            ("GET" | "HEAD", p) if p.starts_with("/bytes/") => {
                match p["/bytes/".len()..].parse::<usize>() {
                    Ok(n) if n <= 16 << 20 => {
                        let headers = [
                            field("content-type", "application/octet-stream"),
                            field("cache-control", "public, max-age=60"),
                        ];
                        let _ = ex.respond(200, &headers, &vec![b'e'; n]);
                    }
                    _ => {
                        let headers = [field("content-type", "text/plain")];
                        let _ = ex.respond(400, &headers, b"size must be 0..=16777216\n");
                    }
                }
            }
            ("GET" | "HEAD", p) if p.starts_with("/slow/") => {
                let headers = [field("content-type", "text/plain")];
                let _ = ex.respond(400, &headers, b"usage: /slow/MS/... (MS <= 60000)\n");
            }
            ("GET" | "HEAD", "/counts") => {
                let headers = [
                    field("content-type", "text/plain"),
                    field("cache-control", "no-store"),
                ];
                let body = format!("slow {}\n", self.slow.load(Ordering::Relaxed));
                let _ = ex.respond(200, &headers, body.as_bytes());
            }
            ("GET" | "HEAD", "/health-check") => {
                let headers = [
                    field("content-type", "text/plain"),
                    field("cache-control", "no-store"),
                ];
                let _ = ex.respond(200, &headers, b"ok\n");
            }
            _ => {
                let headers = [field("content-type", "text/plain")];
                let _ = ex.respond(404, &headers, b"not found\n");
            }
        }
    }
}

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut listen = "127.0.0.1:9000".to_string();
    while let Some(arg) = args.next() {
        match (arg.as_str(), args.next()) {
            ("--listen", Some(addr)) => listen = addr,
            _ => {
                eprintln!("usage: demo-origin [--listen 127.0.0.1:9000]");
                return ExitCode::from(2);
            }
        }
    }
    let listener = match TcpListener::bind(&listen) {
        Ok(l) => l,
        Err(e) => {
            eprintln!("demo-origin: cannot listen on {listen}: {e}");
            return ExitCode::from(2);
        }
    };
    let demo = Arc::new(Demo {
        data: Mutex::new((1, "hello from the demo origin".to_string())),
        hits: AtomicU64::new(0),
        slow: AtomicU64::new(0),
    });
    let cfg = ServerConfig {
        workers: 4,
        ..ServerConfig::default()
    };
    match server::start("demo-origin", vec![listener.into()], cfg, demo) {
        Ok(handle) => {
            eprintln!("demo-origin: listening on {listen}");
            handle.join();
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("demo-origin: {e}");
            ExitCode::from(2)
        }
    }
}
