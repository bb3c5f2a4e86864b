//! The herd scenarios: N clients ask a proxy for one new URL of a slow origin at the same
//! moment (each on a connection opened beforehand), a few rounds in a row. What counts
//! is how many origin fetches a herd costs (the origin's own count, `GET /counts`) and
//! how long the waiters take beyond the one fetch they need (each answer's time minus
//! the origin's delay).

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::sync::{Arc, Barrier};
use std::thread;
use std::time::{Duration, Instant};

use crate::lab::http_get;
use crate::Res;

/// How long the origin takes for each herd's URL.
pub(crate) const ORIGIN_DELAY: Duration = Duration::from_millis(200);
/// Herds per proxy and scenario.
const ROUNDS: usize = 5;

/// What the herds of one proxy cost.
pub(crate) struct HerdResult {
    /// Origin fetches per herd (each round's).
    pub(crate) fetches: Vec<u64>,
    /// Every answer's time beyond the origin's delay, sorted (µs).
    pub(crate) beyond_us: Vec<u64>,
    /// Requests that failed (no connection, no 200).
    pub(crate) errors: usize,
}

impl HerdResult {
    fn percentile(&self, p: f64) -> u64 {
        if self.beyond_us.is_empty() {
            return 0;
        }
        let i = ((self.beyond_us.len() - 1) as f64 * p).round() as usize;
        self.beyond_us[i]
    }

    /// One line for the report.
    pub(crate) fn line(&self, name: &str, n: usize) -> String {
        let fetches: Vec<String> = self.fetches.iter().map(u64::to_string).collect();
        format!(
            "{name}: {n} requests at once, {} rounds: origin fetches per herd {}; beyond the \
             origin's {} ms: p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; errors {}",
            self.fetches.len(),
            fetches.join("/"),
            ORIGIN_DELAY.as_millis(),
            self.percentile(0.5) as f64 / 1000.0,
            self.percentile(0.99) as f64 / 1000.0,
            self.beyond_us.last().copied().unwrap_or(0) as f64 / 1000.0,
            self.errors
        )
    }
}

/// The origin's count of `/slow/` answers.
fn origin_count(origin: u16) -> Res<u64> {
    let resp = http_get(origin, "/counts", &[])?;
    String::from_utf8_lossy(&resp.body)
        .trim()
        .strip_prefix("slow ")
        .and_then(|n| n.parse().ok())
        .ok_or_else(|| "the origin's /counts did not answer a count".to_string())
}

/// One request on an open connection: its time from `start`, when it got a whole 200.
fn ask(mut s: TcpStream, request: &[u8], start: Instant) -> Option<Duration> {
    s.write_all(request).ok()?;
    let mut raw = Vec::with_capacity(512);
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).ok()?;
        if n == 0 {
            break;
        }
        raw.extend_from_slice(&buf[..n]);
        // The bodies are small: the whole answer is in by the time its head is, nearly.
        if let Some(end) = raw.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&raw[..end]).to_ascii_lowercase();
            let length = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse::<usize>().ok())?;
            if raw.len() >= end + 4 + length {
                return head.starts_with("http/1.1 200").then(|| start.elapsed());
            }
        }
    }
    None
}

/// `ROUNDS` herds of `n` on the proxy at `port`, each on a new URL of `run`.
pub(crate) fn run(port: u16, origin: u16, n: usize, run: &str) -> Res<HerdResult> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut result = HerdResult {
        fetches: Vec::new(),
        beyond_us: Vec::new(),
        errors: 0,
    };
    for round in 0..ROUNDS {
        let path = format!("/slow/{}/{run}-{round}", ORIGIN_DELAY.as_millis());
        let request = Arc::new(
            format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n\r\n")
                .into_bytes(),
        );
        let before = origin_count(origin)?;
        // Connected first, so the herd is the requests, not the handshakes.
        let conns: Vec<Option<TcpStream>> = (0..n)
            .map(|_| {
                let s = TcpStream::connect_timeout(&addr, Duration::from_secs(5)).ok()?;
                s.set_read_timeout(Some(Duration::from_secs(30))).ok()?;
                s.set_nodelay(true).ok()?;
                Some(s)
            })
            .collect();
        let barrier = Arc::new(Barrier::new(n + 1));
        let clients: Vec<_> = conns
            .into_iter()
            .map(|conn| {
                let (barrier, request) = (Arc::clone(&barrier), Arc::clone(&request));
                thread::Builder::new()
                    .stack_size(64 * 1024)
                    .spawn(move || {
                        barrier.wait();
                        let start = Instant::now();
                        conn.and_then(|s| ask(s, &request, start))
                    })
                    .map_err(|e| format!("herd thread: {e}"))
            })
            .collect::<Res<_>>()?;
        barrier.wait();
        for c in clients {
            match c.join().ok().flatten() {
                Some(took) => result.beyond_us.push(
                    u64::try_from(took.saturating_sub(ORIGIN_DELAY).as_micros())
                        .unwrap_or(u64::MAX),
                ),
                None => result.errors += 1,
            }
        }
        result.fetches.push(origin_count(origin)? - before);
        // Let sockets settle between herds.
        thread::sleep(Duration::from_millis(200));
    }
    result.beyond_us.sort_unstable();
    Ok(result)
}
