//! The lab: everything the load bench starts, and its cleanup. One temp dir for the
//! processes' files; each server as a child on a free port (`Proc`, stopped on drop:
//! SIGTERM, then SIGKILL after 5 s); Redis from the tests' fixture; `stop_on_signals` so
//! that SIGINT/SIGTERM end the run between two wrk runs and everything is stopped and
//! removed on the way out. Also the small tools the bench needs around them: `http_get`
//! (one plain GET: readiness, warm-up, hit checks, metrics), `find_tool`, `version_of`
//! and `proc_kb` (a process's memory).

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::AtomicBool;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use crate::redis_fixture::RedisServer;
use crate::Res;

/// The lab's directory under `TMPDIR`, removed on drop.
struct TempDir(PathBuf);

impl TempDir {
    fn new() -> Res<TempDir> {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.subsec_nanos());
        let path =
            std::env::temp_dir().join(format!("echo-load-bench-{}-{nanos}", std::process::id()));
        fs::create_dir_all(&path).map_err(|e| format!("temp dir {}: {e}", path.display()))?;
        // nginx workers run as nobody and varnishd's child as vcache when started by root:
        // they must be able to reach their own directories inside.
        fs::set_permissions(&path, fs::Permissions::from_mode(0o755))
            .map_err(|e| format!("temp dir permissions: {e}"))?;
        Ok(TempDir(path))
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

/// A child process, stopped on drop: SIGTERM (nginx's master and varnishd's manager take
/// their own children down with them), SIGKILL after 5 s.
pub(crate) struct Proc {
    pub(crate) name: String,
    child: Child,
    /// Its stdout and stderr.
    pub(crate) log: PathBuf,
}

impl Proc {
    pub(crate) fn pid(&self) -> u32 {
        self.child.id()
    }

    pub(crate) fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    pub(crate) fn log_tail(&self, lines: usize) -> String {
        let text = fs::read_to_string(&self.log).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    fn stop(&mut self) {
        if self.exited() {
            return;
        }
        let _ = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline {
            if self.exited() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        self.stop();
    }
}

/// Everything the bench started. Processes stop in reverse order of start, then Redis
/// (the Echo on it has stopped by then), then the temp dir goes.
pub(crate) struct Lab {
    procs: Vec<Proc>,
    /// The Redis master and replica, from the tests' fixture (killed on drop).
    redis: Vec<RedisServer>,
    dir: TempDir,
}

impl Drop for Lab {
    fn drop(&mut self) {
        while let Some(p) = self.procs.pop() {
            drop(p);
        }
    }
}

impl Lab {
    /// An empty lab with its temp dir.
    pub(crate) fn new() -> Res<Lab> {
        Ok(Lab {
            procs: Vec::new(),
            redis: Vec::new(),
            dir: TempDir::new()?,
        })
    }

    /// The temp dir.
    pub(crate) fn dir(&self) -> &Path {
        &self.dir.0
    }

    /// `name` in the temp dir.
    pub(crate) fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
    }

    /// The processes started, in order of start.
    pub(crate) fn procs(&self) -> &[Proc] {
        &self.procs
    }

    /// Keeps a Redis server until the lab is dropped.
    pub(crate) fn keep_redis(&mut self, server: RedisServer) {
        self.redis.push(server);
    }

    fn spawn(&mut self, name: &str, cmd: &mut Command) -> Res<()> {
        let log = self.path(&format!("{}.out", name.replace([' ', '(', ')'], "")));
        let out = File::create(&log).map_err(|e| format!("{name} log: {e}"))?;
        let err = out.try_clone().map_err(|e| format!("{name} log: {e}"))?;
        let child = cmd
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .spawn()
            .map_err(|e| format!("cannot start {name} ({:?}): {e}", cmd.get_program()))?;
        self.procs.push(Proc {
            name: name.to_string(),
            child,
            log,
        });
        Ok(())
    }

    /// Waits until the last started process answers HTTP on `port`; stops and forgets it
    /// when it exits or does not answer in time.
    fn wait_http(&mut self, port: u16, within: Duration) -> Res<()> {
        let deadline = Instant::now() + within;
        let outcome = loop {
            let p = self.procs.last_mut().expect("a process was started");
            if p.exited() {
                break Err(format!("{} exited:\n{}", p.name, p.log_tail(10)));
            }
            if http_get(port, "/health-check", &[]).is_ok() {
                break Ok(());
            }
            if Instant::now() > deadline {
                break Err(format!(
                    "{} did not answer on port {port} within {within:?}:\n{}",
                    p.name,
                    p.log_tail(10)
                ));
            }
            std::thread::sleep(Duration::from_millis(50));
        };
        if outcome.is_err() {
            self.procs.pop();
        }
        outcome
    }

    /// Starts a server on a free port, trying again on another port when the one found
    /// free was taken meanwhile (the server exits). `command` gets the port.
    pub(crate) fn start_http(
        &mut self,
        name: &str,
        within: Duration,
        mut command: impl FnMut(&Lab, u16) -> Res<Command>,
    ) -> Res<(u16, u32)> {
        let mut last = String::new();
        for _ in 0..3 {
            let port = free_port()?;
            let mut cmd = command(self, port)?;
            self.spawn(name, &mut cmd)?;
            match self.wait_http(port, within) {
                Ok(()) => return Ok((port, self.procs.last().expect("started").pid())),
                Err(e) => last = e,
            }
        }
        Err(last)
    }

    pub(crate) fn proc_by_pid(&mut self, pid: u32) -> Option<&mut Proc> {
        self.procs.iter_mut().find(|p| p.pid() == pid)
    }
}

pub(crate) fn free_port() -> Res<u16> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// `name` on PATH or in the usual sbin directories (PATH lacks them for non-root users).
pub(crate) fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// `cmd args` stdout and stderr, first non-empty line (tools print versions on either).
pub(crate) fn version_of(cmd: &Path, args: &[&str]) -> String {
    Command::new(cmd)
        .args(args)
        .output()
        .ok()
        .and_then(|o| {
            let text = format!(
                "{}{}",
                String::from_utf8_lossy(&o.stdout),
                String::from_utf8_lossy(&o.stderr)
            );
            text.lines().find(|l| !l.trim().is_empty()).map(|l| {
                // wrk: "wrk 4.1.0 [epoll] Copyright (C) 2012 Will Glozer"
                l.split(" Copyright").next().unwrap_or(l).trim().to_string()
            })
        })
        .unwrap_or_else(|| "?".to_string())
}

/// A flag set by SIGINT or SIGTERM: the run stops before its next wrk run, and the lab is
/// dropped on the way out (every process stopped, the temp dir removed).
pub(crate) fn stop_on_signals() -> Res<Arc<AtomicBool>> {
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).map_err(|e| e.to_string())?;
    }
    Ok(stop)
}

/// User + system CPU time of `pid` and every process below it (nginx's workers,
/// Varnish's child), in seconds: /proc/<pid>/stat fields 14 and 15 of each.
pub(crate) fn tree_cpu_seconds(pid: u32) -> Option<f64> {
    let mut procs: Vec<(u32, u32, u64)> = Vec::new(); // (pid, ppid, ticks)
    for entry in fs::read_dir("/proc").ok()?.flatten() {
        let Some(p) = entry
            .file_name()
            .to_str()
            .and_then(|n| n.parse::<u32>().ok())
        else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(format!("/proc/{p}/stat")) else {
            continue;
        };
        // After the command name (which may hold spaces): state, ppid, ... utime stime.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok());
        if let (Some(ppid), Some(u), Some(s)) = (num(1), num(11), num(12)) {
            procs.push((p, ppid as u32, u + s));
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(
            procs
                .iter()
                .filter(|(_, pp, _)| *pp == parent)
                .map(|(p, _, _)| *p),
        );
        i += 1;
    }
    let ticks: u64 = procs
        .iter()
        .filter(|(p, _, _)| tree.contains(p))
        .map(|(_, _, t)| t)
        .sum();
    let hz = rustix::param::clock_ticks_per_second();
    (hz > 0).then(|| ticks as f64 / hz as f64)
}

/// `field` (VmRSS, VmHWM) of /proc/<pid>/status, in kB.
pub(crate) fn proc_kb(pid: u32, field: &str) -> Option<u64> {
    let status = fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    status.lines().find_map(|l| {
        l.strip_prefix(field)?
            .strip_prefix(':')?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

// -----------------------------------------------------------------------------------------
// A plain HTTP/1.1 GET, one connection each: warm-up, hit checks, health, metrics.

/// An answer to `http_get`.
pub(crate) struct Response {
    pub(crate) status: u16,
    headers: Vec<(String, String)>,
    pub(crate) body: Vec<u8>,
}

impl Response {
    /// The first value of header `name` (case-insensitive).
    pub(crate) fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

pub(crate) fn http_get(port: u16, path: &str, extra: &[(&str, &str)]) -> Res<Response> {
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut s = TcpStream::connect_timeout(&addr, Duration::from_secs(2))
        .map_err(|e| format!("connect {addr}: {e}"))?;
    s.set_read_timeout(Some(Duration::from_secs(10)))
        .and_then(|()| s.set_write_timeout(Some(Duration::from_secs(10))))
        .map_err(|e| e.to_string())?;
    let mut req = format!("GET {path} HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nConnection: close\r\n");
    for (n, v) in extra {
        let _ = write!(req, "{n}: {v}\r\n");
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).map_err(|e| e.to_string())?;
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).map_err(|e| e.to_string())?;
    let end = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .ok_or("no complete response head")?;
    let head = String::from_utf8_lossy(&raw[..end]).to_string();
    let mut lines = head.split("\r\n");
    let status = lines
        .next()
        .and_then(|l| l.split_whitespace().nth(1))
        .and_then(|s| s.parse().ok())
        .ok_or_else(|| format!("bad status line in {head:?}"))?;
    let headers = lines
        .filter_map(|l| l.split_once(':'))
        .map(|(n, v)| (n.trim().to_string(), v.trim().to_string()))
        .collect();
    Ok(Response {
        status,
        headers,
        body: raw[end + 4..].to_vec(),
    })
}
