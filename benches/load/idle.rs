//! The idle-connection scenarios (`idle-2000`, `idle-10000`): N clients each open a
//! connection to a proxy, ask once for a warmed 1 KiB object, and keep the connection
//! open (keep-alive, idle). Read from /proc before and while they are held: the proxy's
//! threads and resident memory. What an idle keep-alive connection costs a proxy.

use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

use crate::lab::proc_kb;
use crate::Res;

/// The proxy's threads and memory with no client, and with the idle ones held.
pub(crate) struct IdleResult {
    pub(crate) held: usize,
    pub(crate) threads: (u64, u64),
    pub(crate) rss_kb: (u64, u64),
}

impl IdleResult {
    /// One line for the report.
    pub(crate) fn line(&self, name: &str, wanted: usize) -> String {
        format!(
            "{name:<21} {} of {wanted} idle connections held; threads {} -> {} (+{}), \
             RSS {:.1} -> {:.1} MiB (+{:.1} MiB)",
            self.held,
            self.threads.0,
            self.threads.1,
            self.threads.1.saturating_sub(self.threads.0),
            self.rss_kb.0 as f64 / 1024.0,
            self.rss_kb.1 as f64 / 1024.0,
            self.rss_kb.1.saturating_sub(self.rss_kb.0) as f64 / 1024.0,
        )
    }
}

/// A process and its children (nginx's workers, Varnish's cache process).
fn family(pid: u32) -> Vec<u32> {
    let mut pids = vec![pid];
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for entry in dir.flatten() {
            let Some(child) = entry.file_name().to_str().and_then(|n| n.parse().ok()) else {
                continue;
            };
            let parent = std::fs::read_to_string(format!("/proc/{child}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find_map(|l| l.strip_prefix("PPid:"))
                        .and_then(|v| v.trim().parse::<u32>().ok())
                });
            if parent == Some(pid) {
                pids.push(child);
            }
        }
    }
    pids
}

/// Threads of a process and its children.
fn threads(pid: u32) -> u64 {
    family(pid)
        .into_iter()
        .filter_map(|p| proc_kb(p, "Threads"))
        .sum()
}

/// Resident memory of a process and its children, in kB.
fn rss_kb(pid: u32) -> u64 {
    family(pid)
        .into_iter()
        .filter_map(|p| proc_kb(p, "VmRSS"))
        .sum()
}

/// One request on a new connection, its 200 read whole (by Content-Length); the
/// connection is returned open. Anything else (a 503 for too many connections) is an
/// error: the connection is not held.
fn one_request(addr: SocketAddr, path: &str) -> Res<TcpStream> {
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(5))
        .map_err(|e| format!("connect: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(5)))
        .map_err(|e| e.to_string())?;
    s.write_all(format!("GET {path} HTTP/1.1\r\nHost: bench.local\r\n\r\n").as_bytes())
        .map_err(|e| format!("send: {e}"))?;
    let mut got = Vec::new();
    let mut buf = [0u8; 4096];
    loop {
        let n = s.read(&mut buf).map_err(|e| format!("read: {e}"))?;
        if n == 0 {
            return Err("closed before its answer".into());
        }
        got.extend_from_slice(&buf[..n]);
        let Some(end) = got.windows(4).position(|w| w == b"\r\n\r\n") else {
            continue;
        };
        let head = String::from_utf8_lossy(&got[..end]).to_ascii_lowercase();
        if !head.starts_with("http/1.1 200") {
            return Err(format!("answered {:?}", head.lines().next().unwrap_or("")));
        }
        let length: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .ok_or("no content-length")?;
        if got.len() >= end + 4 + length {
            return Ok(s);
        }
    }
}

/// Holds `n` idle keep-alive connections to the proxy on `port` (process `pid`).
pub(crate) fn run(pid: u32, port: u16, n: usize, path: &str) -> Res<IdleResult> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    std::thread::sleep(Duration::from_millis(300));
    let before = (threads(pid), rss_kb(pid));
    let mut held = Vec::with_capacity(n);
    for _ in 0..n {
        match one_request(addr, path) {
            Ok(s) => held.push(s),
            Err(_) => break,
        }
    }
    // Let the proxy settle with them (threads started, buffers touched).
    std::thread::sleep(Duration::from_millis(500));
    let during = (threads(pid), rss_kb(pid));
    let result = IdleResult {
        held: held.len(),
        threads: (before.0, during.0),
        rss_kb: (before.1, during.1),
    };
    drop(held);
    std::thread::sleep(Duration::from_millis(500));
    Ok(result)
}
