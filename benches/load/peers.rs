//! The peers under load: Echo (memory store, Redis store, and a baseline build on each
//! store when asked for), nginx (`proxy_cache`) and Varnish, all in front of one demo origin. Each is
//! started in the lab with a generated config, on a free port, and known afterwards as a
//! `Target`; `Kind` names them for the table and the chart and says what a hit looks like
//! in each one's answers. Also what the run reads from them besides wrk's figures:
//! Echo's coalescing counter, Varnish's backend requests, memory, and the warnings they
//! logged.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::lab::{free_port, http_get, proc_kb, Lab, Response};
use crate::redis_fixture::RedisServer;
use crate::{Res, TOKEN};

// -----------------------------------------------------------------------------------------
// The proxies.

#[derive(Clone, Copy, PartialEq, Eq, Debug)]
pub(crate) enum Kind {
    EchoMemory,
    /// `ECHO_BENCH_BASELINE`: another echod (an older build), memory store.
    EchoBaseline,
    EchoRedis,
    /// The same baseline echod on the Redis store, with a master and replica of its own.
    EchoRedisBaseline,
    Nginx,
    Varnish,
    Origin,
}

/// Table and chart order: each baseline next to the build it is compared with.
pub(crate) const KINDS: [Kind; 7] = [
    Kind::EchoMemory,
    Kind::EchoBaseline,
    Kind::EchoRedis,
    Kind::EchoRedisBaseline,
    Kind::Nginx,
    Kind::Varnish,
    Kind::Origin,
];

impl Kind {
    pub(crate) fn name(self) -> &'static str {
        match self {
            Kind::EchoMemory => "echo (memory)",
            Kind::EchoBaseline => "echo (baseline)",
            Kind::EchoRedis => "echo (redis)",
            Kind::EchoRedisBaseline => "echo redis (baseline)",
            Kind::Nginx => "nginx",
            Kind::Varnish => "varnish",
            Kind::Origin => "origin (direct)",
        }
    }

    pub(crate) fn is_echo(self) -> bool {
        matches!(
            self,
            Kind::EchoMemory | Kind::EchoBaseline | Kind::EchoRedis | Kind::EchoRedisBaseline
        )
    }

    /// The baseline this peer is compared with: each current Echo with the baseline build
    /// on its own store.
    pub(crate) fn baseline(self) -> Option<Kind> {
        match self {
            Kind::EchoMemory => Some(Kind::EchoBaseline),
            Kind::EchoRedis => Some(Kind::EchoRedisBaseline),
            _ => None,
        }
    }

    /// Echo's config and log file names: `echo-<tag>.toml`, `echo-<tag>.log`.
    fn file_tag(self) -> &'static str {
        match self {
            Kind::EchoBaseline => "baseline",
            Kind::EchoRedis => "redis",
            Kind::EchoRedisBaseline => "redis-baseline",
            _ => "memory",
        }
    }

    /// Whether a response says it came from the cache.
    pub(crate) fn is_hit(self, resp: &Response) -> bool {
        match self {
            Kind::EchoMemory
            | Kind::EchoBaseline
            | Kind::EchoRedis
            | Kind::EchoRedisBaseline
            | Kind::Nginx => resp.header("x-cache-status") == Some("HIT"),
            // Varnish puts the hit's own XID and the one that stored the object.
            Kind::Varnish => resp
                .header("x-varnish")
                .is_some_and(|v| v.split_whitespace().count() == 2),
            Kind::Origin => false,
        }
    }

    pub(crate) fn color(self) -> (u8, u8, u8) {
        match self {
            Kind::EchoMemory => (31, 119, 180),
            Kind::EchoBaseline => (255, 127, 14),
            Kind::EchoRedis => (107, 174, 214),
            Kind::EchoRedisBaseline => (253, 174, 107),
            Kind::Nginx => (44, 160, 44),
            Kind::Varnish => (148, 103, 189),
            Kind::Origin => (150, 150, 150),
        }
    }
}

// -----------------------------------------------------------------------------------------
// The servers.

pub(crate) struct Target {
    pub(crate) kind: Kind,
    pub(crate) port: u16,
    pub(crate) pid: u32,
    /// Echo: its admin port (metrics).
    admin_port: Option<u16>,
    /// Varnish: its -n dir (varnishstat).
    varnish_dir: Option<PathBuf>,
    /// Echo: VmRSS in kB once started, before any load.
    pub(crate) idle_rss_kb: Option<u64>,
    /// Set when the process died during the run; later runs are skipped.
    pub(crate) dead: bool,
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

pub(crate) fn start_origin(lab: &mut Lab, bin: &Path) -> Res<Target> {
    let (port, pid) = lab.start_http("demo-origin", Duration::from_secs(10), |_, port| {
        let mut cmd = Command::new(bin);
        cmd.args(["--listen", &format!("127.0.0.1:{port}")]);
        Ok(cmd)
    })?;
    Ok(Target::new(Kind::Origin, port, pid))
}

/// Echo (`bin`) with a generated config: the Redis store when `redis` names a master and
/// a replica, else the memory store.
pub(crate) fn start_echo(
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
        // The baselines (ECHO_BENCH_BASELINE, maybe an older build, on either store) get
        // this same file, and echod rejects keys it does not know (deny_unknown_fields).
        // So only long-standing keys are written: DESIGN.md's contract keys, plus
        // server.drain_timeout_ms and log.file, which every echod since this bench was
        // added (9bd8324) accepts; the Redis store's cache.store, redis.master and
        // redis.replicas are there too. A key added later must be left out when `kind` is
        // `Kind::EchoBaseline` or `Kind::EchoRedisBaseline`.
        let config = format!(
            "[server]\nlisten = \"127.0.0.1:{port}\"\ndrain_timeout_ms = 1000\n\
             max_connections = 16384\n\n\
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

/// A Redis master and one replica for one Echo, started by the tests' fixture (free
/// ports, temp dirs of their own, no persistence) and kept by the lab, which stops them
/// after the Echo on them. Returns their ports. Every Echo on Redis gets its own pair:
/// builds share the key prefix (`echo:v1:`), so on one pair the baseline would serve the
/// current build's entries and the other way round. A redis-server that does not start ends the
/// bench (the fixture panics with its reason).
pub(crate) fn start_redis(lab: &mut Lab) -> (u16, u16) {
    let master = RedisServer::master();
    let replica = RedisServer::replica_of(&master);
    let ports = (master.port, replica.port);
    lab.keep_redis(master);
    lab.keep_redis(replica);
    ports
}

fn nginx_conf(dir: &Path, port: u16, origin: u16) -> String {
    let d = dir.to_string_lossy();
    format!(
        r#"# Generated by benches/load/peers.rs: nginx as a caching reverse proxy, tuned for speed.
worker_processes 2;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{
    worker_connections 16384;
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

pub(crate) fn start_nginx(lab: &mut Lab, bin: &Path, origin: u16) -> Res<Target> {
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

pub(crate) fn start_varnish(lab: &mut Lab, bin: &Path, origin: u16) -> Res<Target> {
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

pub(crate) fn echo_coalesced(t: &Target) -> Option<u64> {
    let auth = format!("Bearer {TOKEN}");
    let resp = http_get(t.admin_port?, "/metrics", &[("Authorization", &auth)]).ok()?;
    String::from_utf8_lossy(&resp.body).lines().find_map(|l| {
        l.strip_prefix("echo_coalesced_requests_total ")
            .and_then(|v| v.trim().parse().ok())
    })
}

pub(crate) fn varnish_backend_reqs(varnishstat: Option<&Path>, t: &Target) -> Option<u64> {
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
pub(crate) fn warm(t: &Target, path: &str) -> Res<()> {
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

/// Echo's memory, one line per Echo still running: RSS idle after start, the peak over
/// the whole run (VmHWM) and now.
pub(crate) fn rss_lines(targets: &[Target]) -> Vec<String> {
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
    rss
}

/// Anything the proxies logged: Echo's log (level warn), nginx's error log (warn), and
/// what each wrote on stdout/stderr (varnishd's child messages among them). One note per
/// proxy that logged warnings or errors.
pub(crate) fn logged_warnings(lab: &Lab) -> Vec<String> {
    let mut notes = Vec::new();
    for p in lab.procs() {
        let extra = match p.name.as_str() {
            n if n == Kind::EchoMemory.name() => Some("echo-memory.log"),
            n if n == Kind::EchoBaseline.name() => Some("echo-baseline.log"),
            n if n == Kind::EchoRedis.name() => Some("echo-redis.log"),
            n if n == Kind::EchoRedisBaseline.name() => Some("echo-redis-baseline.log"),
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
    notes
}
