//! Load comparison (`harness = false`): Echo with the memory store, Echo with the Redis
//! store, nginx (`proxy_cache`) and Varnish, all in front of the same demo origin, driven
//! by wrk in one run on 127.0.0.1.
//!
//! It builds nothing: it runs the release binaries `target/release/echod` and
//! `target/release/demo-origin` (`make bench` runs `cargo build --release --bins` first)
//! and warns when a file under src/ is newer than them. It needs `wrk` (exits with a
//! message without it); nginx, varnishd and redis-server are each skipped, with the
//! command that installs them, when missing or when they fail to start.
//!
//! Against a previous build: `ECHO_BENCH_BASELINE=<path to an echod>` (`make
//! bench-baseline BASE=<git ref>` builds one) adds that binary as the proxy "echo
//! (baseline)", with the memory store and the same generated config as Echo memory (only
//! long-standing config keys, so an older echod accepts it), in every scenario and in the
//! same rotation as the others. The report then adds a "vs baseline" column and Echo
//! memory's ratios to it (req/s and p99), also written above the chart's bars. A baseline
//! named but missing, or that does not start, ends the bench with an error.
//!
//! Every process is started here, on free ports, with its files in one temp dir: the
//! origin, Echo twice (memory; Redis with its own master and one replica), the baseline
//! when asked for, nginx and varnishd, each in the foreground as a child. All are stopped
//! (SIGTERM, then SIGKILL) and the temp dir removed when the bench ends, fails, panics or
//! gets SIGINT/SIGTERM (after the wrk run under way). The temp dir is under `TMPDIR`
//! (default /tmp), and nginx's cache files are in it: `TMPDIR=/dev/shm` puts them on tmpfs.
//!
//! Scenarios, every run `wrk -t1 --latency` for `ECHO_BENCH_SECONDS` (default 5) seconds;
//! `ECHO_BENCH_SCENARIOS` (a comma list of the ids in brackets, or of their prefixes up to
//! a `-`: `hit` is the four hit scenarios) runs only those, all by default. For each
//! scenario the proxies run back to back (the starting one rotates), so they share the
//! machine's conditions. Before each hit run the object is fetched through that proxy
//! until the proxy says it is a hit.
//! - hits on `/bytes/1024` with 16, 64 and 256 connections, on `/bytes/65536` with 64
//!   [`hit-1k-16`, `hit-1k-64`, `hit-1k-256`, `hit-64k-64`];
//! - misses [`miss-1`, `miss-16`]: a wrk script puts a counter in the query
//!   (`?r=<run>&n=<counter>`), so every request is a new URL; with 1 connection (pure
//!   per-request overhead) and with 16. The origin is run directly with the same script,
//!   which gives Echo's miss overhead: its p50 minus the origin's;
//! - coalesced misses [`coalesced-64`]: 64 connections, and the script changes the URL
//!   every 50 requests, so a new URL's first request is a miss and most of the rest of its
//!   batch arrive while that fetch is in flight (they wait on it: coalesced) or just after
//!   (hits).
//!
//! Output: a table (req/s, p50, p99, wrk's errors, req/s relative to nginx, to Varnish and
//! to the baseline when there is one), Echo's RSS (idle after start, and the peak of the
//! run, VmHWM), and the same as `target/bench/load.md` and an SVG chart
//! `target/bench/load.svg`.
//!
//! The machine this was written for has 2 cores: wrk takes about one, and the proxy under
//! test shares the other with the origin (and Redis). The numbers compare the proxies
//! with each other on one machine; they are not capacity figures.

use std::fmt::Write as _;
use std::fs::{self, File};
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

type Res<T> = Result<T, String>;

/// Echo's admin token in the generated configs.
const TOKEN: &str = "load-bench";
/// Requests that share a URL in the coalesced-miss scenario.
const BATCH: u64 = 50;
/// The object of the miss scenarios.
const MISS_PATH: &str = "/bytes/1024";

// -----------------------------------------------------------------------------------------
// The proxies and the scenarios.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
enum Kind {
    EchoMemory,
    /// `ECHO_BENCH_BASELINE`: another echod (an older build), memory store.
    EchoBaseline,
    EchoRedis,
    Nginx,
    Varnish,
    Origin,
}

/// Table and chart order: the baseline next to the build it is compared with.
const KINDS: [Kind; 6] = [
    Kind::EchoMemory,
    Kind::EchoBaseline,
    Kind::EchoRedis,
    Kind::Nginx,
    Kind::Varnish,
    Kind::Origin,
];

impl Kind {
    fn name(self) -> &'static str {
        match self {
            Kind::EchoMemory => "echo (memory)",
            Kind::EchoBaseline => "echo (baseline)",
            Kind::EchoRedis => "echo (redis)",
            Kind::Nginx => "nginx",
            Kind::Varnish => "varnish",
            Kind::Origin => "origin (direct)",
        }
    }

    fn is_echo(self) -> bool {
        matches!(
            self,
            Kind::EchoMemory | Kind::EchoBaseline | Kind::EchoRedis
        )
    }

    /// Echo's config and log file names: `echo-<tag>.toml`, `echo-<tag>.log`.
    fn file_tag(self) -> &'static str {
        match self {
            Kind::EchoBaseline => "baseline",
            Kind::EchoRedis => "redis",
            _ => "memory",
        }
    }

    /// Whether a response says it came from the cache.
    fn is_hit(self, resp: &Response) -> bool {
        match self {
            Kind::EchoMemory | Kind::EchoBaseline | Kind::EchoRedis | Kind::Nginx => {
                resp.header("x-cache-status") == Some("HIT")
            }
            // Varnish puts the hit's own XID and the one that stored the object.
            Kind::Varnish => resp
                .header("x-varnish")
                .is_some_and(|v| v.split_whitespace().count() == 2),
            Kind::Origin => false,
        }
    }

    fn color(self) -> (u8, u8, u8) {
        match self {
            Kind::EchoMemory => (31, 119, 180),
            Kind::EchoBaseline => (255, 127, 14),
            Kind::EchoRedis => (107, 174, 214),
            Kind::Nginx => (44, 160, 44),
            Kind::Varnish => (148, 103, 189),
            Kind::Origin => (150, 150, 150),
        }
    }
}

#[derive(Clone, Copy)]
enum Load {
    /// Every request the same, warmed object.
    Hit(&'static str),
    /// Every request a new URL.
    Miss,
    /// `BATCH` requests in a row share a new URL.
    Coalesced,
}

struct Scenario {
    /// What `ECHO_BENCH_SCENARIOS` names it by (the name has commas).
    id: &'static str,
    name: &'static str,
    connections: u32,
    load: Load,
    /// The origin is driven directly too (misses: the baseline of the overhead).
    with_origin: bool,
}

const SCENARIOS: [Scenario; 7] = [
    Scenario {
        id: "hit-1k-16",
        name: "hit 1 KiB, 16 conns",
        connections: 16,
        load: Load::Hit("/bytes/1024"),
        with_origin: false,
    },
    Scenario {
        id: "hit-1k-64",
        name: "hit 1 KiB, 64 conns",
        connections: 64,
        load: Load::Hit("/bytes/1024"),
        with_origin: false,
    },
    Scenario {
        id: "hit-1k-256",
        name: "hit 1 KiB, 256 conns",
        connections: 256,
        load: Load::Hit("/bytes/1024"),
        with_origin: false,
    },
    Scenario {
        id: "hit-64k-64",
        name: "hit 64 KiB, 64 conns",
        connections: 64,
        load: Load::Hit("/bytes/65536"),
        with_origin: false,
    },
    Scenario {
        id: "miss-1",
        name: "miss 1 KiB, 1 conn",
        connections: 1,
        load: Load::Miss,
        with_origin: true,
    },
    Scenario {
        id: "miss-16",
        name: "miss 1 KiB, 16 conns",
        connections: 16,
        load: Load::Miss,
        with_origin: true,
    },
    Scenario {
        id: "coalesced-64",
        name: "coalesced miss, 64 conns",
        connections: 64,
        load: Load::Coalesced,
        with_origin: false,
    },
];

/// The scenarios to run, as indices into `SCENARIOS`: `ECHO_BENCH_SCENARIOS` is a comma
/// list of ids, each matching the scenario of that id and those it is a `-`-ended prefix
/// of (`hit` is every hit scenario, `hit-1k` the 1 KiB ones). Unset or empty: all.
fn selected_scenarios() -> Res<Vec<usize>> {
    let list = std::env::var("ECHO_BENCH_SCENARIOS").unwrap_or_default();
    if list.trim().is_empty() {
        return Ok((0..SCENARIOS.len()).collect());
    }
    let mut chosen = [false; SCENARIOS.len()];
    for want in list.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        let mut found = false;
        for (i, s) in SCENARIOS.iter().enumerate() {
            let by_prefix =
                s.id.strip_prefix(want)
                    .is_some_and(|rest| rest.starts_with('-'));
            if s.id == want || by_prefix {
                chosen[i] = true;
                found = true;
            }
        }
        if !found {
            let ids: Vec<&str> = SCENARIOS.iter().map(|s| s.id).collect();
            return Err(format!(
                "ECHO_BENCH_SCENARIOS: no scenario {want:?} (ids: {}; a prefix such as \
                 `hit` names several)",
                ids.join(", ")
            ));
        }
    }
    Ok((0..SCENARIOS.len()).filter(|&i| chosen[i]).collect())
}

// -----------------------------------------------------------------------------------------
// Processes and the temp dir.

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
struct Proc {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    fn log_tail(&self, lines: usize) -> String {
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

/// Everything the bench started. Processes stop in reverse order of start, then the temp
/// dir goes.
struct Lab {
    procs: Vec<Proc>,
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
    fn path(&self, name: &str) -> PathBuf {
        self.dir.0.join(name)
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
    fn start_http(
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

    fn proc_by_pid(&mut self, pid: u32) -> Option<&mut Proc> {
        self.procs.iter_mut().find(|p| p.pid() == pid)
    }
}

fn free_port() -> Res<u16> {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| format!("no free port: {e}"))
}

/// `name` on PATH or in the usual sbin directories (PATH lacks them for non-root users).
fn find_tool(name: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/usr/local/sbin", "/sbin", "/usr/bin"].map(PathBuf::from))
        .map(|d| d.join(name))
        .find(|p| p.is_file())
}

/// `cmd args` stdout and stderr, first non-empty line (tools print versions on either).
fn version_of(cmd: &Path, args: &[&str]) -> String {
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

// -----------------------------------------------------------------------------------------
// A plain HTTP/1.1 GET, one connection each: warm-up, hit checks, health, metrics.

struct Response {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Response {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

fn http_get(port: u16, path: &str, extra: &[(&str, &str)]) -> Res<Response> {
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

// -----------------------------------------------------------------------------------------
// The servers.

struct Target {
    kind: Kind,
    port: u16,
    pid: u32,
    /// Echo: its admin port (metrics).
    admin_port: Option<u16>,
    /// Varnish: its -n dir (varnishstat).
    varnish_dir: Option<PathBuf>,
    /// Echo: VmRSS in kB once started, before any load.
    idle_rss_kb: Option<u64>,
    /// Set when the process died during the run; later runs are skipped.
    dead: bool,
}

impl Target {
    fn new(kind: Kind, port: u16, pid: u32) -> Target {
        Target {
            kind,
            port,
            pid,
            admin_port: None,
            varnish_dir: None,
            idle_rss_kb: None,
            dead: false,
        }
    }
}

fn start_origin(lab: &mut Lab, bin: &Path) -> Res<Target> {
    let (port, pid) = lab.start_http("demo-origin", Duration::from_secs(10), |_, port| {
        let mut cmd = Command::new(bin);
        cmd.args(["--listen", &format!("127.0.0.1:{port}")]);
        Ok(cmd)
    })?;
    Ok(Target::new(Kind::Origin, port, pid))
}

/// Echo (`bin`) with a generated config: the Redis store when `redis` names a master and
/// a replica, else the memory store.
fn start_echo(
    lab: &mut Lab,
    bin: &Path,
    kind: Kind,
    origin: u16,
    redis: Option<(u16, u16)>,
) -> Res<Target> {
    let tag = kind.file_tag();
    let mut admin = 0;
    let (port, pid) = lab.start_http(kind.name(), Duration::from_secs(15), |lab, port| {
        admin = free_port()?;
        let store = match redis {
            Some((master, replica)) => format!(
                "store = \"redis\"\n\n[redis]\nmaster = \"redis://127.0.0.1:{master}\"\n\
                 replicas = [\"redis://127.0.0.1:{replica}\"]\n"
            ),
            None => "store = \"memory\"\n".to_string(),
        };
        // Defaults everywhere else (etc/echo.toml): workers, pools, store size.
        //
        // The baseline (ECHO_BENCH_BASELINE, maybe an older build) gets this same file, and
        // echod rejects keys it does not know (deny_unknown_fields). So only long-standing
        // keys are written: DESIGN.md's contract keys, plus server.drain_timeout_ms and
        // log.file, which every echod since this bench was added (9bd8324) accepts. A key
        // added later must be left out when `kind` is `Kind::EchoBaseline`.
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\ndrain_timeout_ms = 1000\n\n\
             [admin]\nlisten = \"127.0.0.1:{admin}\"\ntoken = \"{TOKEN}\"\n\n\
             [origin]\nurl = \"http://127.0.0.1:{origin}\"\n\n\
             [log]\nlevel = \"warn\"\nfile = {:?}\n\n\
             [cache]\n{store}",
            lab.path(&format!("echo-{tag}.log")).to_string_lossy()
        );
        let file = lab.path(&format!("echo-{tag}.toml"));
        fs::write(&file, config).map_err(|e| format!("echo config: {e}"))?;
        let mut cmd = Command::new(bin);
        cmd.arg("--config").arg(&file);
        Ok(cmd)
    })?;
    let mut t = Target::new(kind, port, pid);
    t.admin_port = Some(admin);
    Ok(t)
}

/// A redis-server of our own on a free port, no persistence; a replica when `master`.
fn start_redis(lab: &mut Lab, bin: &Path, master: Option<u16>) -> Res<u16> {
    let role = if master.is_some() {
        "replica"
    } else {
        "master"
    };
    let dir = lab.path(&format!("redis-{role}"));
    fs::create_dir_all(&dir).map_err(|e| format!("redis dir: {e}"))?;
    let mut last = String::new();
    for _ in 0..3 {
        let port = free_port()?;
        let mut cmd = Command::new(bin);
        cmd.args(["--port", &port.to_string(), "--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .arg("--dir")
            .arg(&dir)
            .args(["--daemonize", "no", "--protected-mode", "yes"])
            .args(["--repl-diskless-sync-delay", "0"]);
        if let Some(m) = master {
            cmd.args(["--replicaof", "127.0.0.1", &m.to_string()]);
        }
        lab.spawn(&format!("redis {role}"), &mut cmd)?;
        let url = format!("redis://127.0.0.1:{port}");
        let info = |section: &str| -> Option<String> {
            let client = redis::Client::open(url.as_str()).ok()?;
            let mut conn = client
                .get_connection_with_timeout(Duration::from_millis(500))
                .ok()?;
            redis::cmd("INFO").arg(section).query(&mut conn).ok()
        };
        let deadline = Instant::now() + Duration::from_secs(20);
        let ok = loop {
            let p = lab.procs.last_mut().expect("started");
            if p.exited() {
                last = format!("redis {role} exited:\n{}", p.log_tail(10));
                break false;
            }
            let ready = match (master, info("replication")) {
                (_, None) => false,
                (None, Some(_)) => true,
                (Some(_), Some(text)) => text.contains("master_link_status:up"),
            };
            if ready {
                break true;
            }
            if Instant::now() > deadline {
                last = format!("redis {role} not ready:\n{}", p.log_tail(10));
                break false;
            }
            std::thread::sleep(Duration::from_millis(20));
        };
        if ok {
            return Ok(port);
        }
        lab.procs.pop();
    }
    Err(last)
}

fn nginx_conf(dir: &Path, port: u16, origin: u16) -> String {
    let d = dir.to_string_lossy();
    format!(
        r#"# Generated by benches/load.rs: nginx as a caching reverse proxy, tuned for speed.
worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    access_log off;
    sendfile on;
    # No tcp_nopush: with it, every 64 KiB hit stalled ~40 ms here (loopback, delayed ACK).
    tcp_nodelay on;
    keepalive_timeout 65s;
    keepalive_requests 1000000;
    open_file_cache max=10000 inactive=60s;
    open_file_cache_valid 60s;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy_temp;
    fastcgi_temp_path {d}/fastcgi_temp;
    uwsgi_temp_path {d}/uwsgi_temp;
    scgi_temp_path {d}/scgi_temp;
    proxy_cache_path {d}/cache levels=1:2 keys_zone=bench:64m max_size=1g inactive=10m use_temp_path=off;
    upstream origin {{
        server 127.0.0.1:{origin};
        keepalive 64;
        keepalive_requests 1000000;
    }}
    server {{
        listen 127.0.0.1:{port} reuseport backlog=4096;
        location / {{
            proxy_pass http://origin;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_cache bench;
            proxy_cache_lock on;
            proxy_cache_lock_timeout 5s;
            add_header X-Cache-Status $upstream_cache_status;
        }}
    }}
}}
"#
    )
}

fn start_nginx(lab: &mut Lab, bin: &Path, origin: u16) -> Res<Target> {
    let dir = lab.path("nginx");
    fs::create_dir_all(&dir).map_err(|e| format!("nginx dir: {e}"))?;
    let (port, pid) = lab.start_http("nginx", Duration::from_secs(10), |_, port| {
        let conf = dir.join("nginx.conf");
        fs::write(&conf, nginx_conf(&dir, port, origin)).map_err(|e| format!("nginx.conf: {e}"))?;
        let mut cmd = Command::new(bin);
        cmd.arg("-c")
            .arg(&conf)
            .arg("-p")
            .arg(&dir)
            .args(["-g", "daemon off;"]);
        Ok(cmd)
    })?;
    Ok(Target::new(Kind::Nginx, port, pid))
}

fn start_varnish(lab: &mut Lab, bin: &Path, origin: u16) -> Res<Target> {
    let dir = lab.path("varnish");
    let (port, pid) = lab.start_http("varnish", Duration::from_secs(30), |_, port| {
        let mut cmd = Command::new(bin);
        // -F: foreground; -T none: no management port; the builtin VCL.
        cmd.arg("-F")
            .args(["-a", &format!("127.0.0.1:{port}")])
            .args(["-b", &format!("127.0.0.1:{origin}")])
            .arg("-n")
            .arg(&dir)
            .args(["-T", "none", "-s", "malloc,256m"])
            // 2 pools of at least 200 threads: no thread ramp-up at 256 connections.
            .args(["-p", "thread_pools=2", "-p", "thread_pool_min=200"]);
        Ok(cmd)
    })?;
    let mut t = Target::new(Kind::Varnish, port, pid);
    t.varnish_dir = Some(dir);
    Ok(t)
}

/// `field` (VmRSS, VmHWM) of /proc/<pid>/status, in kB.
fn proc_kb(pid: u32, field: &str) -> Option<u64> {
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

fn echo_coalesced(t: &Target) -> Option<u64> {
    let auth = format!("Bearer {TOKEN}");
    let resp = http_get(t.admin_port?, "/metrics", &[("Authorization", &auth)]).ok()?;
    String::from_utf8_lossy(&resp.body).lines().find_map(|l| {
        l.strip_prefix("echo_coalesced_requests_total ")
            .and_then(|v| v.trim().parse().ok())
    })
}

fn varnish_backend_reqs(varnishstat: Option<&Path>, t: &Target) -> Option<u64> {
    let out = Command::new(varnishstat?)
        .arg("-n")
        .arg(t.varnish_dir.as_ref()?)
        .args(["-1", "-f", "MAIN.backend_req"])
        .output()
        .ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(|l| {
        l.strip_prefix("MAIN.backend_req")?
            .split_whitespace()
            .next()?
            .parse()
            .ok()
    })
}

/// Fetches `path` through `t` until `t` answers it from its cache.
fn warm(t: &Target, path: &str) -> Res<()> {
    for _ in 0..100 {
        let resp = http_get(t.port, path, &[])?;
        if resp.status != 200 {
            return Err(format!(
                "{} answered {} to {path}",
                t.kind.name(),
                resp.status
            ));
        }
        if t.kind.is_hit(&resp) {
            return Ok(());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!(
        "{} never answered {path} from its cache",
        t.kind.name()
    ))
}

// -----------------------------------------------------------------------------------------
// wrk.

#[derive(Clone, Debug)]
struct WrkResult {
    rps: f64,
    p50_us: f64,
    p99_us: f64,
    requests: u64,
    /// Socket errors (connect, read, write, timeout) plus non-2xx/3xx answers.
    errors: u64,
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
        }),
        _ => Err(format!("cannot read wrk's output:\n{out}")),
    }
}

fn wrk(
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
fn miss_script(dir: &Path, run: &str) -> Res<PathBuf> {
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
fn coalesced_script(dir: &Path, run: &str) -> Res<PathBuf> {
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

// -----------------------------------------------------------------------------------------
// Reporting.

struct Row {
    scenario: usize,
    kind: Kind,
    result: Res<WrkResult>,
}

fn fmt_us(us: f64) -> String {
    if us < 1000.0 {
        format!("{us:.0} µs")
    } else if us < 1e6 {
        format!("{:.2} ms", us / 1e3)
    } else {
        format!("{:.2} s", us / 1e6)
    }
}

/// A latency axis label: `100 µs`, `1 ms`, `0.5 s`.
fn fmt_axis_us(us: f64) -> String {
    let short = |v: f64| (v * 100.0).round() / 100.0;
    if us < 1000.0 {
        format!("{} µs", short(us))
    } else if us < 1e6 {
        format!("{} ms", short(us / 1e3))
    } else {
        format!("{} s", short(us / 1e6))
    }
}

fn fmt_rps(rps: f64) -> String {
    if rps >= 100.0 {
        format!("{rps:.0}")
    } else {
        format!("{rps:.1}")
    }
}

fn result_of(rows: &[Row], scenario: usize, kind: Kind) -> Option<&WrkResult> {
    rows.iter()
        .find(|r| r.scenario == scenario && r.kind == kind)
        .and_then(|r| r.result.as_ref().ok())
}

fn rps_of(rows: &[Row], scenario: usize, kind: Kind) -> Option<f64> {
    result_of(rows, scenario, kind).map(|w| w.rps)
}

fn p50_of(rows: &[Row], scenario: usize, kind: Kind) -> Option<f64> {
    result_of(rows, scenario, kind).map(|w| w.p50_us)
}

/// Whether the baseline ran: its column and its comparison are shown only then.
fn has_baseline(rows: &[Row]) -> bool {
    rows.iter().any(|r| r.kind == Kind::EchoBaseline)
}

/// The table's column titles; "vs baseline" only when the baseline ran.
fn header(rows: &[Row]) -> Vec<&'static str> {
    let mut h = vec![
        "scenario",
        "proxy",
        "req/s",
        "p50",
        "p99",
        "errors",
        "vs nginx",
        "vs Varnish",
    ];
    if has_baseline(rows) {
        h.push("vs baseline");
    }
    h
}

/// The table's cells, one Vec per row, in table order, as many as `header`.
fn table_cells(rows: &[Row]) -> Vec<Vec<String>> {
    let ratio =
        |rps: f64, base: Option<f64>| base.map_or("-".to_string(), |b| format!("{:.2}x", rps / b));
    let baseline = has_baseline(rows);
    let mut out = Vec::new();
    for (i, s) in SCENARIOS.iter().enumerate() {
        for kind in KINDS {
            let Some(row) = rows.iter().find(|r| r.scenario == i && r.kind == kind) else {
                continue;
            };
            let mut bases = vec![rps_of(rows, i, Kind::Nginx), rps_of(rows, i, Kind::Varnish)];
            if baseline {
                bases.push(rps_of(rows, i, Kind::EchoBaseline));
            }
            let mut cells = vec![s.name.to_string(), kind.name().to_string()];
            match &row.result {
                Ok(w) => {
                    cells.extend([
                        fmt_rps(w.rps),
                        fmt_us(w.p50_us),
                        fmt_us(w.p99_us),
                        w.errors.to_string(),
                    ]);
                    cells.extend(bases.into_iter().map(|b| ratio(w.rps, b)));
                }
                Err(_) => {
                    cells.push("failed".into());
                    cells.extend((0..3 + bases.len()).map(|_| "-".to_string()));
                }
            }
            out.push(cells);
        }
    }
    out
}

/// Echo memory against the baseline, one line per scenario run (no ratio when either run
/// failed): current / baseline of req/s (above 1: the current build serves more) and of
/// p99 (below 1: the current build's tail is shorter). Empty without a baseline.
fn baseline_lines(rows: &[Row]) -> Vec<String> {
    let mut out = Vec::new();
    if !has_baseline(rows) {
        return out;
    }
    for (i, s) in SCENARIOS.iter().enumerate() {
        let mem = result_of(rows, i, Kind::EchoMemory);
        let base = result_of(rows, i, Kind::EchoBaseline);
        match (mem, base) {
            (Some(m), Some(b)) => out.push(format!(
                "{}: req/s {:.2}x ({} vs {}), p99 {:.2}x ({} vs {})",
                s.name,
                m.rps / b.rps,
                fmt_rps(m.rps),
                fmt_rps(b.rps),
                m.p99_us / b.p99_us,
                fmt_us(m.p99_us),
                fmt_us(b.p99_us),
            )),
            (None, None) => {}
            _ => out.push(format!("{}: no ratio (a run failed)", s.name)),
        }
    }
    out
}

fn print_table(rows: &[Row]) {
    let cells = table_cells(rows);
    // scenario, proxy, req/s, p50, p99, errors, vs nginx, vs Varnish, vs baseline.
    const WIDTHS: [usize; 9] = [26, 16, 9, 10, 10, 7, 9, 10, 11];
    let line = |c: &[String]| {
        let mut text = String::new();
        for (j, (cell, width)) in c.iter().zip(WIDTHS).enumerate() {
            let sep = if j == 0 { "" } else { " " };
            if j < 2 {
                let _ = write!(text, "{sep}{cell:<width$}");
            } else {
                let _ = write!(text, "{sep}{cell:>width$}");
            }
        }
        println!("{}", text.trim_end());
    };
    line(
        &header(rows)
            .into_iter()
            .map(String::from)
            .collect::<Vec<_>>(),
    );
    let mut last = String::new();
    for c in cells {
        if c[0] != last && !last.is_empty() {
            println!();
        }
        last.clone_from(&c[0]);
        line(&c);
    }
}

fn markdown_table(rows: &[Row]) -> String {
    let header = header(rows);
    let mut md = format!("| {} |\n|---|---|", header.join(" | "));
    md.push_str(&"---:|".repeat(header.len() - 2));
    md.push('\n');
    for c in table_cells(rows) {
        let _ = writeln!(md, "| {} |", c.join(" | "));
    }
    md
}

// -----------------------------------------------------------------------------------------
// The SVG chart: one panel per measure, scenarios along x, one bar per proxy. With a
// baseline, the req/s and p99 panels carry Echo memory's ratio to it above each scenario.

fn nice_log_bounds(values: impl Iterator<Item = f64>) -> (f64, f64) {
    let (lo, hi) = values
        .filter(|v| *v > 0.0)
        .fold((f64::INFINITY, 0.0f64), |(lo, hi), v| {
            (lo.min(v), hi.max(v))
        });
    if !lo.is_finite() {
        return (1.0, 10.0);
    }
    (
        10f64.powf(lo.log10().floor()),
        10f64.powf((hi.log10() + 0.05).ceil()),
    )
}

fn draw_chart(rows: &[Row], title: &str, path: &Path) -> Result<(), Box<dyn std::error::Error>> {
    use plotters::prelude::*;
    use plotters::style::text_anchor::{HPos, Pos, VPos};

    // Title, value, axis labels, and whether Echo memory / baseline is written above.
    type Measure = (&'static str, fn(&WrkResult) -> f64, fn(f64) -> String, bool);
    let measures: [Measure; 3] = [
        (
            "requests per second (log scale; higher is better)",
            |w| w.rps,
            |v| {
                if v >= 1e6 {
                    format!("{:.0}M", v / 1e6)
                } else if v >= 1e3 {
                    format!("{:.0}k", v / 1e3)
                } else {
                    format!("{v:.0}")
                }
            },
            true,
        ),
        (
            "p50 latency (log scale; lower is better)",
            |w| w.p50_us,
            fmt_axis_us,
            false,
        ),
        (
            "p99 latency (log scale; lower is better)",
            |w| w.p99_us,
            fmt_axis_us,
            true,
        ),
    ];
    let ok: Vec<(usize, Kind, &WrkResult)> = rows
        .iter()
        .filter_map(|r| r.result.as_ref().ok().map(|w| (r.scenario, r.kind, w)))
        .collect();
    // One slot per scenario that ran (ECHO_BENCH_SCENARIOS may leave some out).
    let slots: Vec<usize> = (0..SCENARIOS.len())
        .filter(|i| ok.iter().any(|(s, _, _)| s == i))
        .collect();
    let slot_of = |s: usize| slots.iter().position(|&i| i == s).unwrap_or(0) as f64;
    let n = slots.len().max(1);
    let baseline = ok.iter().any(|(_, k, _)| *k == Kind::EchoBaseline);
    let root = SVGBackend::new(path, (1280, 1150)).into_drawing_area();
    root.fill(&WHITE)?;
    let root = root.titled(title, ("sans-serif", 20))?;
    // The legend in a column of its own on the right, clear of the bars.
    let (plots, legend) = root.split_horizontally(1130);
    for (i, kind) in KINDS
        .into_iter()
        .filter(|k| ok.iter().any(|(_, k2, _)| k2 == k))
        .enumerate()
    {
        let (r, g, b) = kind.color();
        let y = 50 + 22 * i as i32;
        legend.draw(&Rectangle::new(
            [(4, y), (18, y + 12)],
            RGBColor(r, g, b).filled(),
        ))?;
        legend.draw(&Text::new(kind.name(), (24, y), ("sans-serif", 13)))?;
    }
    if baseline {
        let y = 60 + 22 * KINDS.len() as i32;
        for (i, line) in ["above req/s and p99:", "echo (memory) /", "echo (baseline)"]
            .into_iter()
            .enumerate()
        {
            legend.draw(&Text::new(line, (4, y + 16 * i as i32), ("sans-serif", 12)))?;
        }
    }
    let panels = plots.split_evenly((measures.len(), 1));
    for (panel, (label, value, fmt, compared)) in panels.iter().zip(measures) {
        let annotate = baseline && compared;
        let (lo, mut hi) = nice_log_bounds(ok.iter().map(|(_, _, w)| value(w)));
        if annotate {
            // Headroom for the ratios, above the tallest bar.
            hi *= (hi / lo).powf(0.12);
        }
        let mut chart = ChartBuilder::on(panel)
            .caption(label, ("sans-serif", 15))
            .margin(8)
            .x_label_area_size(28)
            .y_label_area_size(70)
            .build_cartesian_2d(-0.5f64..(n as f64 - 0.5), (lo..hi).log_scale())?;
        chart
            .configure_mesh()
            .disable_x_mesh()
            .x_labels(n)
            .x_label_formatter(&|x| {
                let i = x.round();
                if (x - i).abs() < 1e-6 && i >= 0.0 && (i as usize) < slots.len() {
                    SCENARIOS[slots[i as usize]].name.to_string()
                } else {
                    String::new()
                }
            })
            .y_label_formatter(&|v| fmt(*v))
            .label_style(("sans-serif", 12))
            .draw()?;
        for kind in KINDS {
            let (r, g, b) = kind.color();
            let color = RGBColor(r, g, b);
            let bars = ok.iter().filter(|(_, k, _)| *k == kind).map(|(s, _, w)| {
                // This scenario's proxies share 80 % of its slot.
                let present: Vec<Kind> = KINDS
                    .into_iter()
                    .filter(|k| ok.iter().any(|(s2, k2, _)| s2 == s && k2 == k))
                    .collect();
                let j = present.iter().position(|k| *k == kind).unwrap_or(0);
                let width = 0.8 / present.len() as f64;
                let x0 = slot_of(*s) - 0.4 + j as f64 * width;
                Rectangle::new([(x0, lo), (x0 + width * 0.92, value(w))], color.filled())
            });
            chart.draw_series(bars)?;
        }
        if annotate {
            let style = TextStyle::from(("sans-serif", 13).into_font())
                .pos(Pos::new(HPos::Center, VPos::Top));
            let ratios = slots.iter().filter_map(|&s| {
                let m = result_of(rows, s, Kind::EchoMemory)?;
                let b = result_of(rows, s, Kind::EchoBaseline)?;
                let text = format!("{:.2}x", value(m) / value(b));
                Some(Text::new(text, (slot_of(s), hi), style.clone()))
            });
            chart.draw_series(ratios)?;
        }
    }
    root.present()?;
    Ok(())
}

// -----------------------------------------------------------------------------------------

/// target/release, from this bench's own path (target/release/deps/load-<hash>).
fn release_dir() -> Res<PathBuf> {
    let exe = std::env::current_exe().map_err(|e| format!("current_exe: {e}"))?;
    exe.parent()
        .and_then(Path::parent)
        .map(Path::to_path_buf)
        .ok_or_else(|| format!("no target dir above {}", exe.display()))
}

/// The newest modification time of the files under `dir`.
fn newest_mtime(dir: &Path) -> Option<SystemTime> {
    let mut newest = None;
    for entry in fs::read_dir(dir).ok()?.flatten() {
        let p = entry.path();
        let t = if p.is_dir() {
            newest_mtime(&p)
        } else {
            entry.metadata().and_then(|m| m.modified()).ok()
        };
        newest = newest.max(t);
    }
    newest
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("load bench: {e}");
            ExitCode::FAILURE
        }
    }
}

fn run() -> Res<()> {
    let seconds: u64 =
        match std::env::var("ECHO_BENCH_SECONDS") {
            Ok(v) => v.trim().parse().ok().filter(|s| *s > 0).ok_or_else(|| {
                format!("ECHO_BENCH_SECONDS must be a whole number > 0, got {v:?}")
            })?,
            Err(_) => 5,
        };
    let selected = selected_scenarios()?;
    // An echod to compare with (an older build), run like Echo memory; empty is unset.
    let baseline = match std::env::var_os("ECHO_BENCH_BASELINE") {
        Some(p) if !p.is_empty() => {
            let path = PathBuf::from(&p);
            let path = fs::canonicalize(&path)
                .ok()
                .filter(|p| p.is_file())
                .ok_or_else(|| {
                    format!("ECHO_BENCH_BASELINE={p:?}: no such file (an echod binary)")
                })?;
            Some(path)
        }
        _ => None,
    };
    match Command::new("wrk").arg("-v").output() {
        Ok(_) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            return Err("wrk not found: install it (`apt-get install wrk`)".into())
        }
        Err(e) => return Err(format!("cannot run wrk: {e}")),
    }
    let stop = Arc::new(AtomicBool::new(false));
    for sig in [signal_hook::consts::SIGINT, signal_hook::consts::SIGTERM] {
        signal_hook::flag::register(sig, Arc::clone(&stop)).map_err(|e| e.to_string())?;
    }

    let release = release_dir()?;
    let echod = release.join("echod");
    let origin_bin = release.join("demo-origin");
    for bin in [&echod, &origin_bin] {
        if !bin.is_file() {
            return Err(format!(
                "{} not found: run `cargo build --release --bins` first (`make bench` does)",
                bin.display()
            ));
        }
    }
    let mut notes: Vec<String> = Vec::new();
    let src = Path::new(env!("CARGO_MANIFEST_DIR")).join("src");
    let built = fs::metadata(&echod).and_then(|m| m.modified()).ok();
    if let (Some(src_t), Some(bin_t)) = (newest_mtime(&src), built) {
        if src_t > bin_t {
            let warning = format!(
                "WARNING: src/ changed after {} was built: this measures an older Echo \
                 (run `cargo build --release --bins`, or `make bench`)",
                echod.display()
            );
            eprintln!("{warning}");
            notes.push(warning);
        }
    }
    let nginx = find_tool("nginx");
    let varnishd = find_tool("varnishd");
    let varnishstat = find_tool("varnishstat");
    let redis_server = find_tool("redis-server");
    let mut versions = vec![
        version_of(&echod, &["--version"]),
        version_of(Path::new("wrk"), &["-v"]),
    ];
    if let Some(bin) = &baseline {
        versions.push(format!(
            "baseline {} ({})",
            bin.display(),
            version_of(bin, &["--version"])
        ));
        if fs::canonicalize(&echod).is_ok_and(|e| &e == bin) {
            notes.push(format!(
                "ECHO_BENCH_BASELINE is {} itself: the baseline ratios compare a build with itself",
                echod.display()
            ));
        }
    }

    let mut lab = Lab {
        procs: Vec::new(),
        dir: TempDir::new()?,
    };
    let mut targets = Vec::new();
    let origin = start_origin(&mut lab, &origin_bin)?;
    let origin_port = origin.port;
    targets.push(start_echo(
        &mut lab,
        &echod,
        Kind::EchoMemory,
        origin_port,
        None,
    )?);
    if let Some(bin) = &baseline {
        // Asked for by name: a baseline that does not start ends the bench.
        let t = start_echo(&mut lab, bin, Kind::EchoBaseline, origin_port, None)
            .map_err(|e| format!("the baseline did not start: {e}"))?;
        targets.push(t);
    }
    match &redis_server {
        Some(bin) => {
            let master = start_redis(&mut lab, bin, None)?;
            let replica = start_redis(&mut lab, bin, Some(master))?;
            versions.push(version_of(bin, &["--version"]));
            targets.push(start_echo(
                &mut lab,
                &echod,
                Kind::EchoRedis,
                origin_port,
                Some((master, replica)),
            )?);
        }
        None => notes.push(
            "echo (redis) skipped: redis-server not found (`apt-get install redis-server`)".into(),
        ),
    }
    let mut nginx_cache = None;
    let mut skip = |what: &str, why: String| {
        let note = format!("{what} skipped: {why}");
        eprintln!("{note}");
        notes.push(note);
    };
    match &nginx {
        Some(bin) => match start_nginx(&mut lab, bin, origin_port) {
            Ok(t) => {
                versions.push(version_of(bin, &["-v"]));
                targets.push(t);
                let cache = lab.path("nginx/cache");
                let fs_type = Command::new("stat")
                    .args(["-f", "-c", "%T"])
                    .arg(&cache)
                    .output()
                    .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
                    .unwrap_or_default();
                nginx_cache = Some(format!(
                    "nginx's cache files are in {} (file system: {fs_type}; TMPDIR moves them)",
                    cache.display()
                ));
            }
            Err(e) => skip("nginx", format!("it did not start: {e}")),
        },
        None => skip(
            "nginx",
            "not installed (`apt-get install nginx-light`)".into(),
        ),
    }
    match &varnishd {
        Some(bin) => match start_varnish(&mut lab, bin, origin_port) {
            Ok(t) => {
                versions.push(version_of(bin, &["-V"]));
                targets.push(t);
            }
            Err(e) => skip("varnish", format!("it did not start: {e}")),
        },
        None => skip(
            "varnish",
            "not installed (`apt-get install varnish`)".into(),
        ),
    }
    targets.push(origin);
    notes.extend(nginx_cache);

    // Idle memory: started, nothing asked yet.
    std::thread::sleep(Duration::from_millis(500));
    for t in targets.iter_mut().filter(|t| t.kind.is_echo()) {
        t.idle_rss_kb = proc_kb(t.pid, "VmRSS");
    }

    let proxies = targets.iter().filter(|t| t.kind != Kind::Origin).count();
    let runs: usize = selected
        .iter()
        .map(|&i| proxies + usize::from(SCENARIOS[i].with_origin))
        .sum();
    println!(
        "load bench: {} proxies in front of one demo origin, {} of {} scenarios, {runs} wrk \
         runs of {seconds} s (wrk -t1), {} cores",
        proxies,
        selected.len(),
        SCENARIOS.len(),
        std::thread::available_parallelism().map_or(0, |n| n.get()),
    );
    for v in &versions {
        println!("  {v}");
    }

    // Warm-up: every proxy's threads and connections, unrecorded.
    for t in targets.iter().filter(|t| t.kind != Kind::Origin) {
        warm(t, "/bytes/1024")?;
        wrk(t.port, "/bytes/1024", 64, 1, None)?;
    }

    let mut rows: Vec<Row> = Vec::new();
    let mut run_id = 0u32;
    let mut coalescing: Vec<String> = Vec::new();
    for (nth, &i) in selected.iter().enumerate() {
        let s = &SCENARIOS[i];
        let mut order: Vec<usize> = (0..targets.len())
            .filter(|&k| s.with_origin || targets[k].kind != Kind::Origin)
            .collect();
        // Rotate who goes first, so no proxy always runs right after the same one.
        let len = order.len();
        order.rotate_left(nth % len);
        println!("\n{} ({} connections) [{}]", s.name, s.connections, s.id);
        for k in order {
            if stop.load(Ordering::Relaxed) {
                return Err("interrupted".into());
            }
            let t = &targets[k];
            if t.dead {
                continue;
            }
            run_id += 1;
            let run = format!("r{run_id}");
            let mut before = None;
            let result = match s.load {
                Load::Hit(path) => {
                    warm(t, path).and_then(|()| wrk(t.port, path, s.connections, seconds, None))
                }
                Load::Miss => miss_script(&lab.dir.0, &run)
                    .and_then(|script| wrk(t.port, "/", s.connections, seconds, Some(&script))),
                Load::Coalesced => coalesced_script(&lab.dir.0, &run).and_then(|script| {
                    before = if t.kind.is_echo() {
                        echo_coalesced(t)
                    } else {
                        varnish_backend_reqs(varnishstat.as_deref(), t)
                    };
                    wrk(t.port, "/", s.connections, seconds, Some(&script))
                }),
            };
            match &result {
                Ok(w) => {
                    println!(
                        "  {:<16} {:>9} req/s  p50 {:>9}  p99 {:>9}  errors {}",
                        t.kind.name(),
                        fmt_rps(w.rps),
                        fmt_us(w.p50_us),
                        fmt_us(w.p99_us),
                        w.errors
                    );
                    if matches!(s.load, Load::Coalesced) {
                        let urls = w.requests.div_ceil(BATCH);
                        let line = if t.kind.is_echo() {
                            echo_coalesced(t).zip(before).map(|(after, b)| {
                                format!(
                                    "{}: {} of {} requests waited on another request's fetch \
                                     (echo_coalesced_requests_total), ~{urls} URLs",
                                    t.kind.name(),
                                    after - b,
                                    w.requests
                                )
                            })
                        } else if t.kind == Kind::Varnish {
                            varnish_backend_reqs(varnishstat.as_deref(), t)
                                .zip(before)
                                .map(|(after, b)| {
                                    format!(
                                        "varnish: {} origin fetches for ~{urls} URLs \
                                         ({} requests)",
                                        after - b,
                                        w.requests
                                    )
                                })
                        } else {
                            None
                        };
                        coalescing.extend(line);
                    }
                }
                Err(e) => println!("  {:<16} failed: {e}", t.kind.name()),
            }
            if let Err(e) = &result {
                notes.push(format!("{} / {}: {e}", s.name, t.kind.name()));
            }
            rows.push(Row {
                scenario: i,
                kind: t.kind,
                result,
            });
            let pid = t.pid;
            if let Some(p) = lab.proc_by_pid(pid) {
                if p.exited() {
                    let note = format!(
                        "{} exited during \"{}\":\n{}",
                        p.name,
                        s.name,
                        p.log_tail(10)
                    );
                    eprintln!("{note}");
                    notes.push(note);
                    targets[k].dead = true;
                }
            }
            // Let sockets and threads settle between runs.
            std::thread::sleep(Duration::from_millis(300));
        }
    }

    // Echo's memory: idle after start, and the peak over the whole run.
    let mut rss = Vec::new();
    for t in targets.iter().filter(|t| t.kind.is_echo() && !t.dead) {
        let kb =
            |v: Option<u64>| v.map_or("?".to_string(), |v| format!("{:.1} MiB", v as f64 / 1024.0));
        rss.push(format!(
            "{}: RSS idle after start {}, peak during the run (VmHWM) {}, at the end {}",
            t.kind.name(),
            kb(t.idle_rss_kb),
            kb(proc_kb(t.pid, "VmHWM")),
            kb(proc_kb(t.pid, "VmRSS")),
        ));
    }

    // Miss overhead: p50 through the proxy minus p50 of the same misses straight to the origin.
    let mut overhead = Vec::new();
    for (i, s) in SCENARIOS.iter().enumerate().filter(|(_, s)| s.with_origin) {
        let Some(base) = p50_of(&rows, i, Kind::Origin) else {
            continue;
        };
        let parts: Vec<String> = KINDS
            .into_iter()
            .filter(|k| *k != Kind::Origin)
            .filter_map(|k| {
                p50_of(&rows, i, k).map(|p| {
                    let d = p - base;
                    let sign = if d < 0.0 { "-" } else { "+" };
                    format!("{} {sign}{}", k.name(), fmt_us(d.abs()))
                })
            })
            .collect();
        overhead.push(format!(
            "{} (origin p50 {}): {}",
            s.name,
            fmt_us(base),
            parts.join(", ")
        ));
    }

    // Anything the proxies logged: Echo's log (level warn), nginx's error log (warn), and
    // what each wrote on stdout/stderr (varnishd's child messages among them).
    for p in &lab.procs {
        let extra = match p.name.as_str() {
            n if n == Kind::EchoMemory.name() => Some("echo-memory.log"),
            n if n == Kind::EchoBaseline.name() => Some("echo-baseline.log"),
            n if n == Kind::EchoRedis.name() => Some("echo-redis.log"),
            "nginx" => Some("nginx/error.log"),
            "varnish" => None,
            _ => continue,
        };
        let mut text = fs::read_to_string(&p.log).unwrap_or_default();
        if let Some(file) = extra {
            text.push_str(&fs::read_to_string(lab.path(file)).unwrap_or_default());
        }
        let lines: Vec<&str> = text
            .lines()
            .filter(|l| {
                l.to_ascii_lowercase()
                    .split(|c: char| !c.is_ascii_alphabetic())
                    .any(|w| {
                        matches!(
                            w,
                            "warn" | "warning" | "error" | "emerg" | "crit" | "alert" | "panic"
                        )
                    })
            })
            .collect();
        if !lines.is_empty() {
            notes.push(format!(
                "{} logged {} warning/error lines, e.g.: {}",
                p.name,
                lines.len(),
                lines[..lines.len().min(3)].join(" | ")
            ));
        }
    }

    // Each section with its lines: printed and written only when it has some (a run of
    // the hit scenarios alone has no miss overhead).
    let against_baseline = baseline_lines(&rows);
    let sections: [(String, &[String]); 4] = [
        (
            "Miss overhead (p50 through the proxy minus p50 of the same misses sent to the \
             origin):"
                .into(),
            &overhead,
        ),
        (
            format!("Coalesced misses ({BATCH} requests in a row share a URL):"),
            &coalescing,
        ),
        (
            "Echo memory against the baseline (current / baseline: req/s above 1 and p99 \
             below 1 favour the current build; compare within one run):"
                .into(),
            &against_baseline,
        ),
        ("Echo memory:".into(), &rss),
    ];

    println!("\n");
    print_table(&rows);
    println!();
    for (title, lines) in sections.iter().filter(|(_, l)| !l.is_empty()) {
        println!("{title}");
        for l in *lines {
            println!("  {l}");
        }
    }
    for n in &notes {
        println!("note: {n}");
    }

    // The same as files, for the README.
    let out_dir = release
        .parent()
        .map(|t| t.join("bench"))
        .ok_or("no target dir")?;
    fs::create_dir_all(&out_dir).map_err(|e| format!("{}: {e}", out_dir.display()))?;
    let cores = std::thread::available_parallelism().map_or(0, |n| n.get());
    let with_baseline = if baseline.is_some() {
        ", with a baseline Echo"
    } else {
        ""
    };
    let mut md = format!("# Load comparison: Echo, nginx and Varnish{with_baseline}\n\n");
    let _ = writeln!(
        md,
        "{}. {cores} cores; one demo origin behind every proxy; wrk with 1 thread for {seconds} s \
         per run, all on 127.0.0.1 (wrk takes about one core, the proxy shares the rest with the \
         origin and Redis). Versions: {}.\n",
        httpdate::fmt_http_date(SystemTime::now()),
        versions.join("; ")
    );
    md.push_str(&markdown_table(&rows));
    for (title, lines) in sections.iter().filter(|(_, l)| !l.is_empty()) {
        let _ = writeln!(md, "\n{title}\n");
        for l in *lines {
            let _ = writeln!(md, "- {l}");
        }
    }
    if !notes.is_empty() {
        md.push_str("\nNotes:\n\n");
        for n in &notes {
            let _ = writeln!(md, "- {}", n.replace('\n', " "));
        }
    }
    let md_path = out_dir.join("load.md");
    fs::write(&md_path, md).map_err(|e| format!("{}: {e}", md_path.display()))?;
    let svg_path = out_dir.join("load.svg");
    let title = format!(
        "Echo vs nginx vs Varnish{with_baseline}, wrk -t1, {seconds} s per run, {cores} cores"
    );
    draw_chart(&rows, &title, &svg_path).map_err(|e| format!("{}: {e}", svg_path.display()))?;
    println!("\nwrote {} and {}", md_path.display(), svg_path.display());
    Ok(())
}
