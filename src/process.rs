//! What the process itself uses, for the `process_*` metrics Prometheus clients
//! conventionally export: CPU time, resident memory, open descriptors and their limit,
//! threads, and the start time. Read from `/proc/self` at each scrape.
//!
//! Written here rather than taken from a crate: the maintained Rust Prometheus client
//! Echo uses (`prometheus-client`) has no process collector, and the values are a few
//! fields of three `/proc` files.
//!
//! Invariants: a value that cannot be read is absent (None), never a guess; nothing
//! here runs on a request's path.

use std::time::Duration;

/// One reading of the process.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct Reading {
    /// User plus system CPU time since the process started.
    pub cpu: Option<Duration>,
    pub resident_bytes: Option<u64>,
    pub open_fds: Option<u64>,
    pub max_fds: Option<u64>,
    pub threads: Option<u64>,
    /// Seconds since the Unix epoch.
    pub start_time: Option<f64>,
}

/// Reads the process now.
pub fn read() -> Reading {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    let field = |name: &str| -> Option<u64> {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
    };
    let ticks = rustix::param::clock_ticks_per_second();
    let stat = std::fs::read_to_string("/proc/self/stat").unwrap_or_default();
    // The fields after the command name (which may hold spaces), from field 3 on.
    let after = stat.rsplit_once(')').map(|(_, rest)| rest).unwrap_or("");
    let fields: Vec<&str> = after.split_whitespace().collect();
    // utime and stime are fields 14 and 15 (1-based), starttime 22: here 11, 12, 19.
    let tick = |i: usize| fields.get(i).and_then(|v| v.parse::<u64>().ok());
    let cpu = match (tick(11), tick(12)) {
        (Some(u), Some(s)) if ticks > 0 => {
            Some(Duration::from_secs_f64((u + s) as f64 / ticks as f64))
        }
        _ => None,
    };
    let start_time = boot_time().zip(tick(19)).and_then(|(boot, since_boot)| {
        (ticks > 0).then(|| boot + since_boot as f64 / ticks as f64)
    });
    let max_fds = rustix::process::getrlimit(rustix::process::Resource::Nofile).current;
    Reading {
        cpu,
        resident_bytes: field("VmRSS:").map(|kib| kib * 1024),
        open_fds: std::fs::read_dir("/proc/self/fd")
            .ok()
            .map(|d| d.count() as u64),
        max_fds,
        threads: field("Threads:"),
        start_time,
    }
}

/// When the machine booted, in seconds since the epoch (`/proc/stat`'s `btime`).
fn boot_time() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let btime: u64 = stat
        .lines()
        .find_map(|l| l.strip_prefix("btime "))?
        .trim()
        .parse()
        .ok()?;
    Some(btime as f64)
}

/// Seconds since the epoch now (for tests comparing a start time).
#[cfg(test)]
fn now_secs() -> f64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_process_reads_itself() {
        let r = read();
        assert!(r.resident_bytes.is_some_and(|b| b > 1 << 20), "{r:?}");
        assert!(r.threads.is_some_and(|t| t >= 1), "{r:?}");
        assert!(r.open_fds.is_some_and(|n| n >= 3), "{r:?}");
        assert!(
            r.max_fds.is_some_and(|n| n >= r.open_fds.unwrap_or(0)),
            "{r:?}"
        );
        assert!(r.cpu.is_some(), "{r:?}");
        let started = r.start_time.expect("a start time");
        assert!(started <= now_secs() + 1.0 && started > now_secs() - 86_400.0 * 365.0);
    }
}
