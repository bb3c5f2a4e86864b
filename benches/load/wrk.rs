//! wrk: one run (`wrk -t1 --latency`, 5 s timeout) against a port, its output read into
//! a `WrkResult` (req/s, p50, p99, requests, errors), and the Lua scripts of the miss and
//! coalesced-miss scenarios, written into the lab's dir.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::{Res, BATCH, MISS_PATH};

#[derive(Clone, Debug)]
pub(crate) struct WrkResult {
    pub(crate) rps: f64,
    pub(crate) p50_us: f64,
    pub(crate) p99_us: f64,
    pub(crate) requests: u64,
    /// Socket errors (connect, read, write, timeout) plus non-2xx/3xx answers.
    pub(crate) errors: u64,
    /// CPU time the server under test (its process and their children: nginx's and
    /// Varnish's workers) spent per request during the run, in µs; None when unread.
    pub(crate) cpu_us_per_req: Option<f64>,
}

/// wrk's latency text (`171.00us`, `1.40ms`, `2.00s`, `1.00m`) in microseconds.
fn parse_latency(s: &str) -> Option<f64> {
    let (num, mult) = if let Some(n) = s.strip_suffix("us") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1e3)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1e6)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60e6)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * mult)
}

fn parse_wrk(out: &str) -> Res<WrkResult> {
    let mut rps = None;
    let mut p50 = None;
    let mut p99 = None;
    let mut requests = None;
    let mut errors = 0;
    for line in out.lines().map(str::trim) {
        let mut words = line.split_whitespace();
        let first = words.next().unwrap_or("");
        if first == "50%" {
            p50 = words.next().and_then(parse_latency);
        } else if first == "99%" {
            p99 = words.next().and_then(parse_latency);
        } else if let Some(v) = line.strip_prefix("Requests/sec:") {
            rps = v.trim().parse::<f64>().ok();
        } else if line.contains(" requests in ") {
            requests = first.parse::<u64>().ok();
        } else if let Some(v) = line.strip_prefix("Socket errors:") {
            // "connect 0, read 0, write 0, timeout 0"
            errors += v
                .split(',')
                .filter_map(|part| part.split_whitespace().last()?.parse::<u64>().ok())
                .sum::<u64>();
        } else if let Some(v) = line.strip_prefix("Non-2xx or 3xx responses:") {
            errors += v.trim().parse::<u64>().unwrap_or(0);
        }
    }
    match (rps, p50, p99, requests) {
        (Some(rps), Some(p50_us), Some(p99_us), Some(requests)) => Ok(WrkResult {
            rps,
            p50_us,
            p99_us,
            requests,
            errors,
            cpu_us_per_req: None,
        }),
        _ => Err(format!("cannot read wrk's output:\n{out}")),
    }
}

pub(crate) fn wrk(
    port: u16,
    path: &str,
    connections: u32,
    seconds: u64,
    script: Option<&Path>,
) -> Res<WrkResult> {
    let mut cmd = Command::new("wrk");
    cmd.args(["-t1", &format!("-c{connections}"), &format!("-d{seconds}s")])
        .args(["--timeout", "5s", "--latency"]);
    if let Some(s) = script {
        cmd.arg("-s").arg(s);
    }
    cmd.arg(format!("http://127.0.0.1:{port}{path}"));
    let out = cmd.output().map_err(|e| format!("wrk: {e}"))?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    if !out.status.success() {
        return Err(format!(
            "wrk failed ({}): {}{}",
            out.status,
            stdout,
            String::from_utf8_lossy(&out.stderr)
        ));
    }
    parse_wrk(&stdout)
}

/// A wrk script whose every request is a new URL (`?r=<run>&n=<counter>`).
pub(crate) fn miss_script(dir: &Path, run: &str) -> Res<PathBuf> {
    let path = dir.join(format!("miss-{run}.lua"));
    let lua = format!(
        "-- Every request a new URL: a counter in the query.\n\
         local n = 0\n\
         request = function()\n  n = n + 1\n  \
         return wrk.format(\"GET\", \"{MISS_PATH}?r={run}&n=\" .. n)\nend\n"
    );
    fs::write(&path, lua).map_err(|e| format!("wrk script: {e}"))?;
    Ok(path)
}

/// A wrk script where each run of `BATCH` requests in a row shares a new URL.
pub(crate) fn coalesced_script(dir: &Path, run: &str) -> Res<PathBuf> {
    let path = dir.join(format!("coalesced-{run}.lua"));
    let lua = format!(
        "-- {BATCH} requests in a row share a URL, then the next URL: with many connections,\n\
         -- a batch's requests arrive together while its first one is a miss.\n\
         local n = 0\n\
         request = function()\n  local batch = math.floor(n / {BATCH})\n  n = n + 1\n  \
         return wrk.format(\"GET\", \"{MISS_PATH}?r={run}&b=\" .. batch)\nend\n"
    );
    fs::write(&path, lua).map_err(|e| format!("wrk script: {e}"))?;
    Ok(path)
}
