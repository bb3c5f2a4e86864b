//! Real `redis-server` processes for the tests and the benches: a master and replicas
//! (`replicaof`) on free ports, each in its own temp dir, killed on drop; optionally with
//! a password (`requirepass` + `masterauth`), TLS only (`port 0` + `tls-port`) or extra
//! config; and a group of real Sentinels (`redis-server --sentinel`, three with quorum
//! 2 by default, 500 ms down-after, internal periods shortened) that watch such a master
//! and fail it over.
//!
//! Never a mock, and never the machine's own Redis on 6379: every test starts its own,
//! so the suite runs the same on a bare machine (where `make test` installs
//! redis-server) as here. A missing redis-server fails loudly; nothing is skipped.
//!
//! Each server reads its settings from a config file in its temp dir, as in production:
//! Sentinel rewrites it (`CONFIG REWRITE`) when it promotes or repoints a server, so a
//! server [`restart`](RedisServer::restart)ed after a failover comes back in the role
//! Sentinel gave it, and a killed old master comes back a master until Sentinel demotes it.
//!
//! Every wait polls a condition against a deadline and names what it waited for (with
//! the last state seen) when it times out; no sleep stands in for a condition.
//!
//! The file stands alone (std and the `redis` crate, nothing from `super`): the benches
//! include it with `#[path = "../tests/echo/support/redis.rs"] mod redis_fixture;`, so
//! Redis is started one way everywhere. Certificates for TLS are made elsewhere
//! (`redis_tls.rs`, with rcgen) and handed in as file paths ([`TlsFiles`]); the
//! fixture talks to a TLS-only server over the crate's own TLS (`tls-rustls`), trusting
//! that CA only, so every helper works on it as on a plain one. A group of sentinels
//! watching a TLS-only master keeps a plain port for clients and links to the servers
//! and to each other over TLS (`tls-replication`).

use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

/// How long a server or a sentinel may take to answer after it is spawned.
const START_WITHIN: Duration = Duration::from_secs(10);
/// How long a replica may take to finish its first sync.
const LINK_UP_WITHIN: Duration = Duration::from_secs(10);
/// How long the sentinels may take to find each other and the replicas: they announce
/// themselves on the master's hello channel every publish period (2 s in production).
const SETTLE_WITHIN: Duration = Duration::from_secs(20);
/// Read and write timeout of the fixture's own connections.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// Sentinel's internal periods (ms) as the fixture sets them with `SENTINEL DEBUG`,
/// against Redis's 1000 / 10000 / 1000 / 2000. Why: with Redis's periods and a 500 ms
/// down-after, one kill of the master was seen here to set off four failovers in a row,
/// each new master found down about 500 ms after its promotion. A sentinel reconnects a
/// dropped link at most once per ping period, and sentinels drop the normal clients of
/// a server they reconfigure (`CLIENT KILL TYPE normal`, other sentinels' links
/// included), so a down-after below the ping period can expire before the reconnect.
/// The shorter periods also make discovery (hello messages), the replica state in
/// `SENTINEL REPLICAS` (info), and the demotion of a returning old master (after 4
/// publish periods) take a fraction of the time.
const FAST_PERIODS: [(&str, u64); 4] = [
    ("ping-period", 100),
    ("info-period", 1000),
    ("ask-period", 200),
    ("publish-period", 500),
];

/// A free TCP port on 127.0.0.1 (bind :0, read port, drop); the starts retry when
/// another process takes it first.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port on 127.0.0.1")
        .port()
}

/// Calls `attempt` every 10 ms until it returns `Ok`; after `within`, panics naming
/// `what` and the last reason `attempt` gave for "not yet". Always tried at least once,
/// and once more at the deadline.
fn poll_for<T>(what: &str, within: Duration, mut attempt: impl FnMut() -> Result<T, String>) -> T {
    let deadline = Instant::now() + within;
    loop {
        let why = match attempt() {
            Ok(value) => return value,
            Err(why) => why,
        };
        let now = Instant::now();
        assert!(
            now < deadline,
            "timed out after {within:?} waiting until {what} (last seen: {why})"
        );
        std::thread::sleep((deadline - now).min(Duration::from_millis(10)));
    }
}

/// Polls `cond` until it holds; panics naming `what` after `within`.
fn poll_until(what: &str, within: Duration, cond: impl Fn() -> bool) {
    poll_for(what, within, || {
        if cond() {
            Ok(())
        } else {
            Err("condition false".to_string())
        }
    })
}

fn binary() -> &'static str {
    let found = Command::new("redis-server")
        .arg("--version")
        .stdout(Stdio::null())
        .status()
        .map(|s| s.success())
        .unwrap_or(false);
    assert!(
        found,
        "redis-server is not installed: the Redis tests need it (`make test` installs it \
         with apt-get; or run `apt-get install redis-server`)"
    );
    "redis-server"
}

/// A fresh temp dir for one process.
fn temp_dir(kind: &str) -> PathBuf {
    let dir = std::env::temp_dir().join(format!(
        "echo-{kind}-{}-{}",
        std::process::id(),
        NEXT_DIR.fetch_add(1, Ordering::Relaxed)
    ));
    std::fs::create_dir_all(&dir).expect("redis temp dir");
    dir
}

/// One config-file argument, quoted as redis-server's parser reads it.
fn quoted(value: &str) -> String {
    format!("\"{}\"", value.replace('\\', "\\\\").replace('"', "\\\""))
}

/// Sends SIGSTOP / SIGCONT / ... to `pid`.
fn signal(pid: u32, which: &str) {
    let status = Command::new("kill")
        .args([which, &pid.to_string()])
        .status()
        .expect("run kill");
    assert!(status.success(), "kill {which} {pid} failed: {status}");
}

/// A connection to `url` whose reads and writes time out after `io`, over TLS trusting
/// only the CA in `ca` when given (`rediss://`); `None` when it cannot be opened.
fn open(url: &str, ca: Option<&Path>, io: Duration) -> Option<redis::Connection> {
    let client = match ca {
        None => redis::Client::open(url).ok()?,
        Some(ca) => redis::Client::build_with_tls(
            url,
            redis::TlsCertificates {
                client_tls: None,
                root_cert: Some(std::fs::read(ca).ok()?),
            },
        )
        .ok()?,
    };
    let conn = client
        .get_connection_with_timeout(Duration::from_secs(1))
        .ok()?;
    conn.set_read_timeout(Some(io)).ok()?;
    conn.set_write_timeout(Some(io)).ok()?;
    Some(conn)
}

/// `redis://[:password@]127.0.0.1:port` (`rediss://` with `tls`).
fn url_for(port: u16, password: Option<&str>, tls: bool) -> String {
    let scheme = if tls { "rediss" } else { "redis" };
    match password {
        Some(password) => format!("{scheme}://:{password}@127.0.0.1:{port}"),
        None => format!("{scheme}://127.0.0.1:{port}"),
    }
}

/// PEM files for a TLS-only server: its certificate and key, and the CA that signed it
/// (which also verifies the master's certificate when a TLS replica connects).
#[derive(Clone, Debug)]
pub struct TlsFiles {
    pub cert: PathBuf,
    pub key: PathBuf,
    pub ca: PathBuf,
}

/// How to start one redis-server: [`RedisServer::builder`], then [`start`](Self::start).
#[derive(Clone, Debug, Default)]
pub struct RedisBuilder {
    replica_of: Option<u16>,
    password: Option<String>,
    tls: Option<TlsFiles>,
    options: Vec<(String, String)>,
}

impl RedisBuilder {
    /// A replica of `master`; it takes the master's password and TLS files unless set.
    pub fn replica_of(mut self, master: &RedisServer) -> RedisBuilder {
        self.replica_of = Some(master.port);
        if self.password.is_none() {
            self.password = master.password.clone();
        }
        if self.tls.is_none() {
            self.tls = master.tls.clone();
        }
        self
    }

    /// `requirepass` for clients and `masterauth` for its link to a master: masters get
    /// both too, since Sentinel may make any of them a replica.
    pub fn password(mut self, password: &str) -> RedisBuilder {
        self.password = Some(password.to_string());
        self
    }

    /// TLS only: `tls-port` on the server's port, `port 0`, clients not asked for a
    /// certificate, replication over TLS. The fixture's helpers reach it over TLS,
    /// trusting `files.ca`.
    pub fn tls(mut self, files: TlsFiles) -> RedisBuilder {
        self.tls = Some(files);
        self
    }

    /// One more config-file line, `key "value"`; a later one wins over an earlier one
    /// and over the fixture's defaults (e.g. `maxmemory`, `maxmemory-policy`).
    pub fn option(mut self, key: &str, value: &str) -> RedisBuilder {
        self.options.push((key.to_string(), value.to_string()));
        self
    }

    /// `replica-serve-stale-data`: `false` (what `etc/redis-replica.conf` ships) makes a
    /// replica whose link to its master is down answer reads with MASTERDOWN.
    pub fn serve_stale_data(self, serve: bool) -> RedisBuilder {
        self.option("replica-serve-stale-data", if serve { "yes" } else { "no" })
    }

    /// Starts it on a free port; a replica is returned once its link to the master is up.
    pub fn start(self) -> RedisServer {
        let mut server = RedisServer {
            child: None,
            port: 0,
            dir: temp_dir("redis"),
            replica_of: self.replica_of,
            password: self.password,
            tls: self.tls,
            options: self.options,
        };
        // A free port can be taken between finding it and binding it: try a few.
        for _ in 0..5 {
            server.port = free_port();
            server.write_config();
            server.spawn();
            if server.wait_answering(START_WITHIN) {
                if server.replica_of.is_some() {
                    server.wait_link_up();
                }
                return server;
            }
            server.kill();
        }
        panic!("redis-server did not start (see {})", server.dir.display());
    }
}

pub struct RedisServer {
    child: Option<Child>,
    /// The port clients use: plain, or TLS for a server built with [`RedisBuilder::tls`].
    pub port: u16,
    dir: PathBuf,
    replica_of: Option<u16>,
    password: Option<String>,
    tls: Option<TlsFiles>,
    options: Vec<(String, String)>,
}

impl RedisServer {
    /// A master on a free port.
    pub fn master() -> RedisServer {
        RedisServer::builder().start()
    }

    /// A replica of `master`, returned once its link to the master is up.
    pub fn replica_of(master: &RedisServer) -> RedisServer {
        RedisServer::builder().replica_of(master).start()
    }

    /// A server with a password, TLS, or extra config (a master unless `replica_of`).
    pub fn builder() -> RedisBuilder {
        RedisBuilder::default()
    }

    fn config_path(&self) -> PathBuf {
        self.dir.join("redis.conf")
    }

    fn log_path(&self) -> PathBuf {
        self.dir.join("redis.log")
    }

    /// The config file redis-server starts from (and Sentinel rewrites).
    fn write_config(&self) {
        let mut lines = vec![
            "bind 127.0.0.1".to_string(),
            "protected-mode yes".to_string(),
            "daemonize no".to_string(),
            "save \"\"".to_string(),
            "appendonly no".to_string(),
            format!("dir {}", quoted(&self.dir.to_string_lossy())),
            // A replica gets its first copy at once, not after the default 5 s wait.
            "repl-diskless-sync-delay 0".to_string(),
        ];
        match &self.tls {
            None => lines.push(format!("port {}", self.port)),
            Some(tls) => lines.extend([
                "port 0".to_string(),
                format!("tls-port {}", self.port),
                format!("tls-cert-file {}", quoted(&tls.cert.to_string_lossy())),
                format!("tls-key-file {}", quoted(&tls.key.to_string_lossy())),
                format!("tls-ca-cert-file {}", quoted(&tls.ca.to_string_lossy())),
                "tls-auth-clients no".to_string(),
                "tls-replication yes".to_string(),
            ]),
        }
        if let Some(password) = &self.password {
            lines.push(format!("requirepass {}", quoted(password)));
            lines.push(format!("masterauth {}", quoted(password)));
        }
        if let Some(master) = self.replica_of {
            lines.push(format!("replicaof 127.0.0.1 {master}"));
        }
        for (key, value) in &self.options {
            lines.push(format!("{key} {}", quoted(value)));
        }
        let mut text = lines.join("\n");
        text.push('\n');
        std::fs::write(self.config_path(), text).expect("write redis.conf");
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.log_path()).expect("redis log");
        let child = Command::new(binary())
            .arg(self.config_path())
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server");
        self.child = Some(child);
    }

    fn wait_answering(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    return false;
                }
            }
            if self.answers() {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    /// PING answered (over TLS for a TLS server).
    fn answers(&self) -> bool {
        self.try_connection(IO_TIMEOUT)
            .is_some_and(|mut c| redis::cmd("PING").query::<String>(&mut c).is_ok())
    }

    /// Waits until this replica's link to its master is up (its first sync finished).
    pub fn wait_link_up(&self) {
        poll_for(
            &format!("the link of replica {} to its master is up", self.port),
            LINK_UP_WITHIN,
            || {
                let link = self.info_field("replication", "master_link_status");
                if link == "up" {
                    Ok(())
                } else {
                    Err(format!("master_link_status {link:?}"))
                }
            },
        )
    }

    /// The URL Echo is given: `redis://127.0.0.1:port`, with `:password@` when the server
    /// has one, `rediss://` when it speaks TLS.
    pub fn url(&self) -> String {
        url_for(self.port, self.password.as_deref(), self.tls.is_some())
    }

    /// The password clients must send (`requirepass`), if any.
    pub fn password(&self) -> Option<&str> {
        self.password.as_deref()
    }

    /// A connection whose reads and writes time out after `io` (TLS, trusting the
    /// server's CA, for a TLS server).
    fn try_connection(&self, io: Duration) -> Option<redis::Connection> {
        open(&self.url(), self.tls.as_ref().map(|t| t.ca.as_path()), io)
    }

    /// A connection for quick commands (5 s read and write timeouts).
    pub fn connection(&self) -> redis::Connection {
        self.connection_with_timeout(IO_TIMEOUT)
    }

    /// A connection whose reads and writes may take up to `io` (large pipelines, WAIT).
    /// A failed connect or handshake is retried for up to 2 s: Sentinel drops every
    /// client of a server it reconfigures (`CLIENT KILL TYPE normal`), which must not
    /// fail a test that happened to connect at that moment.
    pub fn connection_with_timeout(&self, io: Duration) -> redis::Connection {
        poll_for(
            &format!("redis {} accepts a connection", self.port),
            Duration::from_secs(2),
            || {
                self.try_connection(io)
                    .ok_or_else(|| "cannot connect".to_string())
            },
        )
    }

    /// Runs `cmd` on a fresh connection, once more (up to three times) when the
    /// connection is dropped under it (see `connection_with_timeout`); a timeout or a
    /// Redis error is returned as it is.
    fn query_retrying<T: redis::FromRedisValue>(&self, cmd: &redis::Cmd) -> redis::RedisResult<T> {
        let mut attempt = 1;
        loop {
            match cmd.query(&mut self.connection()) {
                Err(e) if attempt < 3 && e.is_io_error() && !e.is_timeout() => attempt += 1,
                result => return result,
            }
        }
    }

    /// `INFO <section>` as text; empty when the server does not answer in time.
    pub fn info(&self, section: &str) -> String {
        self.query_retrying(redis::cmd("INFO").arg(section))
            .unwrap_or_default()
    }

    /// A field of `INFO <section>` as text, e.g. `redis_version` in `server`; empty
    /// when absent.
    pub fn info_field(&self, section: &str, field: &str) -> String {
        let prefix = format!("{field}:");
        self.info(section)
            .lines()
            .find_map(|l| l.strip_prefix(&prefix).map(|v| v.trim().to_string()))
            .unwrap_or_default()
    }

    /// A numeric field of `INFO <section>`, e.g. `keyspace_hits` in `stats`.
    pub fn info_u64(&self, section: &str, field: &str) -> u64 {
        self.info_field(section, field).parse().unwrap_or(0)
    }

    /// `"master"` or `"slave"` (INFO replication's `role`, as Redis spells it).
    pub fn role(&self) -> String {
        self.info_field("replication", "role")
    }

    /// Waits until [`role`](Self::role) is `role`, e.g. a restarted old master that
    /// Sentinel demotes to `"slave"`; returns how long that took.
    pub fn wait_role(&self, role: &str, within: Duration) -> Duration {
        let started = Instant::now();
        poll_for(
            &format!("redis {} has role {role}", self.port),
            within,
            || {
                let now = self.role();
                if now == role {
                    Ok(())
                } else {
                    Err(format!("role {now:?}"))
                }
            },
        );
        started.elapsed()
    }

    /// The port of the master this replica follows now (INFO's `master_port`), `None`
    /// on a master.
    pub fn master_port(&self) -> Option<u16> {
        self.info_field("replication", "master_port").parse().ok()
    }

    /// This replica's link to its master is up (`master_link_status:up`); false on a
    /// master.
    pub fn master_link_up(&self) -> bool {
        self.info_field("replication", "master_link_status") == "up"
    }

    /// Its replication offset (`master_repl_offset`): on a master, how far it has
    /// written; on a replica, how far it has applied.
    pub fn repl_offset(&self) -> u64 {
        self.info_u64("replication", "master_repl_offset")
    }

    /// `REPLICAOF host port`, or `REPLICAOF NO ONE` (a master) for `None`. Like an
    /// operator's command, not written to its config file: a restart forgets it.
    pub fn replicaof(&self, master: Option<(&str, u16)>) {
        let mut cmd = redis::cmd("REPLICAOF");
        match master {
            Some((host, port)) => cmd.arg(host).arg(port),
            None => cmd.arg("NO").arg("ONE"),
        };
        let answer: String = cmd
            .query(&mut self.connection())
            .unwrap_or_else(|e| panic!("REPLICAOF {master:?} on {}: {e}", self.port));
        assert!(answer.starts_with("OK"), "REPLICAOF: {answer}");
    }

    /// `CONFIG SET key value` (e.g. `maxmemory`, `maxmemory-policy`,
    /// `replica-serve-stale-data`); panics when Redis refuses it.
    pub fn config_set(&self, key: &str, value: &str) {
        let _: () = redis::cmd("CONFIG")
            .arg("SET")
            .arg(key)
            .arg(value)
            .query(&mut self.connection())
            .unwrap_or_else(|e| panic!("CONFIG SET {key} {value} on {}: {e}", self.port));
    }

    /// `CONFIG GET key`'s value; empty when there is no such key.
    pub fn config_get(&self, key: &str) -> String {
        let pair: Vec<String> = redis::cmd("CONFIG")
            .arg("GET")
            .arg(key)
            .query(&mut self.connection())
            .unwrap_or_else(|e| panic!("CONFIG GET {key} on {}: {e}", self.port));
        pair.into_iter().nth(1).unwrap_or_default()
    }

    /// Calls of one command since the last `CONFIG RESETSTAT` (from `INFO commandstats`).
    pub fn calls(&self, command: &str) -> u64 {
        let prefix = format!("cmdstat_{}:calls=", command.to_ascii_lowercase());
        self.info("commandstats")
            .lines()
            .find_map(|l| {
                l.strip_prefix(&prefix)
                    .and_then(|v| v.split(',').next())
                    .and_then(|v| v.parse().ok())
            })
            .unwrap_or(0)
    }

    pub fn reset_stats(&self) {
        let _: () = redis::cmd("CONFIG")
            .arg("RESETSTAT")
            .query(&mut self.connection())
            .expect("CONFIG RESETSTAT");
    }

    pub fn exists(&self, key: &str) -> bool {
        self.query_retrying::<u64>(redis::cmd("EXISTS").arg(key))
            .unwrap_or(0)
            == 1
    }

    /// Waits until `key` exists here (replication is asynchronous).
    pub fn wait_for_key(&self, key: &str) {
        poll_until(
            &format!("{key} reaches redis {}", self.port),
            Duration::from_secs(10),
            || self.exists(key),
        );
    }

    /// SIGKILL: no shutdown, no goodbye to replicas or sentinels.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// The process id of the running server, if it runs.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Freezes the server (SIGSTOP): connections are still accepted by the kernel, but
    /// nothing is answered until [`resume`](Self::resume). A frozen server is still
    /// killed on drop (SIGKILL works on a stopped process).
    pub fn pause(&self) {
        signal(self.running_pid(), "-STOP");
    }

    /// Lets a server frozen by [`pause`](Self::pause) run again (SIGCONT).
    pub fn resume(&self) {
        signal(self.running_pid(), "-CONT");
    }

    fn running_pid(&self) -> u32 {
        self.pid()
            .unwrap_or_else(|| panic!("redis on {} is not running", self.port))
    }

    /// Starts it again on the same port from its config file. A master comes back empty
    /// (nothing is saved) and is not waited for; a replica (as started, or as Sentinel
    /// last rewrote it) reloads the copy its last full sync left in its dir, resyncs, and
    /// this returns once its link to its master is up.
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
        assert!(
            self.wait_answering(START_WITHIN),
            "redis-server did not restart on port {} (see {})",
            self.port,
            self.dir.display()
        );
        if self.role() == "slave" {
            self.wait_link_up();
        }
    }
}

/// Removes a process's temp dir, unless the test is failing: then its config and log
/// stay for the post-mortem, and stderr (shown for a failed test) says where.
fn remove_dir_unless_panicking(dir: &Path, what: &str) {
    if std::thread::panicking() {
        eprintln!("kept the config and log of {what} in {}", dir.display());
    } else {
        let _ = std::fs::remove_dir_all(dir);
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        remove_dir_unless_panicking(&self.dir, &format!("redis {}", self.port));
    }
}

// ---------------------------------------------------------------------------------------
// Sentinel

/// How to start a group of sentinels: [`Sentinels::builder`], then
/// [`start`](Self::start).
pub struct SentinelBuilder<'a> {
    master: &'a RedisServer,
    name: String,
    count: usize,
    quorum: usize,
    down_after: Duration,
    failover_timeout: Duration,
    password: Option<String>,
    fast_periods: bool,
}

impl SentinelBuilder<'_> {
    /// The master's name in the sentinels (`mymaster` by default).
    pub fn name(mut self, name: &str) -> Self {
        self.name = name.to_string();
        self
    }

    /// How many sentinels (3 by default) and how many must agree the master is down
    /// (2 by default). A failover also needs a majority of all sentinels to elect a
    /// leader.
    pub fn count(mut self, count: usize, quorum: usize) -> Self {
        assert!(quorum >= 1 && quorum <= count, "quorum {quorum} of {count}");
        self.count = count;
        self.quorum = quorum;
        self
    }

    /// `down-after-milliseconds` (500 ms by default: fast failovers for tests; Redis
    /// ships 30 s).
    pub fn down_after(mut self, after: Duration) -> Self {
        self.down_after = after;
        self
    }

    /// `failover-timeout` (2 s by default; Redis ships 3 min). Also the election
    /// timeout, and twice it is the pause before the same master is failed over again.
    pub fn failover_timeout(mut self, timeout: Duration) -> Self {
        self.failover_timeout = timeout;
        self
    }

    /// Keeps Redis's own internal periods (ping 1 s, info 10 s, hello 2 s) instead of the
    /// fixture's shorter ones (see `FAST_PERIODS`), to see production timing. Then keep
    /// `down_after` well above 1 s, or a failover's dropped links start another one.
    pub fn production_periods(mut self) -> Self {
        self.fast_periods = false;
        self
    }

    /// The sentinels' own `requirepass`: clients (Echo) must AUTH to ask them anything,
    /// and they use it with each other. The master's password, if any, is given to them
    /// as `sentinel auth-pass` without asking.
    pub fn password(mut self, password: &str) -> Self {
        self.password = Some(password.to_string());
        self
    }

    /// Starts the sentinels on free ports and returns once every one of them sees the
    /// master, the other sentinels and every replica the master has now. For a TLS-only
    /// master each sentinel also has a TLS port (which it announces to the others) and
    /// reaches the servers and the other sentinels over TLS (`tls-replication`), with
    /// the master's certificate files; clients still ask it on its plain port.
    pub fn start(self) -> Sentinels {
        let replicas = self.master.info_u64("replication", "connected_slaves") as usize;
        let mut group = Sentinels {
            nodes: Vec::new(),
            name: self.name.clone(),
            quorum: self.quorum,
            password: self.password.clone(),
        };
        for _ in 0..self.count {
            let node = self.start_one(&group);
            group.nodes.push(node);
        }
        group.wait_settled(replicas, SETTLE_WITHIN);
        group
    }

    fn start_one(&self, group: &Sentinels) -> SentinelNode {
        let mut node = SentinelNode {
            child: None,
            port: 0,
            tls_port: 0,
            dir: temp_dir("sentinel"),
        };
        for _ in 0..5 {
            node.port = free_port();
            if self.master.tls.is_some() {
                node.tls_port = free_port();
            }
            std::fs::write(node.dir.join("sentinel.conf"), self.config(&node))
                .expect("write sentinel.conf");
            node.spawn();
            if node.wait_answering(group) {
                if self.fast_periods {
                    let mut set = redis::cmd("SENTINEL");
                    set.arg("DEBUG");
                    for (period, ms) in FAST_PERIODS {
                        set.arg(period).arg(ms);
                    }
                    let _: String = group
                        .query(&node, &set)
                        .unwrap_or_else(|e| panic!("SENTINEL DEBUG: {e}"));
                }
                return node;
            }
            node.kill();
        }
        panic!(
            "redis-server --sentinel did not start (see {})",
            node.dir.display()
        );
    }

    /// Sentinel rewrites this file as it learns (replicas, other sentinels, epochs).
    fn config(&self, node: &SentinelNode) -> String {
        let name = &self.name;
        let mut lines = vec![
            format!("port {}", node.port),
            "bind 127.0.0.1".to_string(),
            "daemonize no".to_string(),
            format!("dir {}", quoted(&node.dir.to_string_lossy())),
            format!(
                "sentinel monitor {name} 127.0.0.1 {} {}",
                self.master.port, self.quorum
            ),
            format!(
                "sentinel down-after-milliseconds {name} {}",
                self.down_after.as_millis()
            ),
            format!(
                "sentinel failover-timeout {name} {}",
                self.failover_timeout.as_millis()
            ),
            format!("sentinel parallel-syncs {name} 1"),
        ];
        if let Some(password) = &self.master.password {
            lines.push(format!("sentinel auth-pass {name} {}", quoted(password)));
        }
        if let Some(password) = &self.password {
            lines.push(format!("requirepass {}", quoted(password)));
        }
        if let Some(tls) = &self.master.tls {
            lines.extend([
                format!("tls-port {}", node.tls_port),
                format!("tls-cert-file {}", quoted(&tls.cert.to_string_lossy())),
                format!("tls-key-file {}", quoted(&tls.key.to_string_lossy())),
                format!("tls-ca-cert-file {}", quoted(&tls.ca.to_string_lossy())),
                "tls-auth-clients no".to_string(),
                "tls-replication yes".to_string(),
            ]);
        }
        let mut text = lines.join("\n");
        text.push('\n');
        text
    }
}

struct SentinelNode {
    child: Option<Child>,
    /// Plain: where clients (the fixture, Echo) ask.
    port: u16,
    /// Watching a TLS-only master: where the other sentinels reach it; else 0.
    tls_port: u16,
    dir: PathBuf,
}

impl SentinelNode {
    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.join("sentinel.log")).expect("sentinel log");
        let child = Command::new(binary())
            .arg(self.dir.join("sentinel.conf"))
            .arg("--sentinel")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(Stdio::null())
            .spawn()
            .expect("spawn redis-server --sentinel");
        self.child = Some(child);
    }

    fn wait_answering(&mut self, group: &Sentinels) -> bool {
        let deadline = Instant::now() + START_WITHIN;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    return false;
                }
            }
            if open(&group.url_of(self.port), None, IO_TIMEOUT)
                .is_some_and(|mut c| redis::cmd("PING").query::<String>(&mut c).is_ok())
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// A replica as one sentinel reports it (`SENTINEL REPLICAS <name>`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SentinelReplica {
    pub ip: String,
    pub port: u16,
    /// e.g. `slave`, or `s_down,slave,disconnected` for a dead one (a killed old master
    /// stays listed this way after a failover).
    pub flags: String,
    /// `ok` or `err`: the replica's own link to its master, from the last INFO the
    /// sentinel read from it, once per info period (10 s in production, 1 s here; 1 s
    /// during a failover): after a switch a repointed replica can stay `err` here that
    /// long. Ask the replica itself (`INFO replication`) for its state now.
    pub master_link_status: String,
}

impl SentinelReplica {
    /// Up and connected to the sentinel, and linked to its master as of its last INFO.
    pub fn usable(&self) -> bool {
        self.flags == "slave" && self.master_link_status == "ok"
    }
}

/// Real sentinels (`redis-server --sentinel`) watching one master, each on a free port
/// with its own temp dir and config file; all killed on drop. Their internal periods are
/// shortened (`FAST_PERIODS`) unless built with `production_periods`: a test may count
/// on them for speed, never for correctness.
pub struct Sentinels {
    nodes: Vec<SentinelNode>,
    name: String,
    quorum: usize,
    password: Option<String>,
}

impl Sentinels {
    /// Three sentinels, quorum 2, watching `master` as `mymaster`, with 500 ms
    /// down-after and a 2 s failover timeout.
    pub fn start(master: &RedisServer) -> Sentinels {
        Sentinels::builder(master).start()
    }

    pub fn builder(master: &RedisServer) -> SentinelBuilder<'_> {
        SentinelBuilder {
            master,
            name: "mymaster".to_string(),
            count: 3,
            quorum: 2,
            down_after: Duration::from_millis(500),
            failover_timeout: Duration::from_secs(2),
            password: None,
            fast_periods: true,
        }
    }

    /// The name the master is monitored under (`sentinel_master` in Echo's config).
    pub fn master_name(&self) -> &str {
        &self.name
    }

    pub fn quorum(&self) -> usize {
        self.quorum
    }

    /// The sentinels' ports, in start order.
    pub fn ports(&self) -> Vec<u16> {
        self.nodes.iter().map(|n| n.port).collect()
    }

    /// `redis://[:password@]127.0.0.1:<port>` for each sentinel (Echo's `sentinels`).
    pub fn urls(&self) -> Vec<String> {
        self.nodes.iter().map(|n| self.url_of(n.port)).collect()
    }

    fn url_of(&self, port: u16) -> String {
        url_for(port, self.password.as_deref(), false)
    }

    /// A connection to sentinel `i` (authenticated when the sentinels have a password).
    pub fn connection(&self, i: usize) -> redis::Connection {
        let port = self.nodes[i].port;
        open(&self.url_of(port), None, IO_TIMEOUT)
            .unwrap_or_else(|| panic!("cannot connect to sentinel on {port}"))
    }

    /// The running sentinels' indexes.
    fn live(&self) -> impl Iterator<Item = usize> + '_ {
        (0..self.nodes.len()).filter(|&i| self.nodes[i].child.is_some())
    }

    fn query_node<T: redis::FromRedisValue>(
        &self,
        i: usize,
        cmd: &redis::Cmd,
    ) -> Result<T, String> {
        self.query(&self.nodes[i], cmd)
    }

    fn query<T: redis::FromRedisValue>(
        &self,
        node: &SentinelNode,
        cmd: &redis::Cmd,
    ) -> Result<T, String> {
        let port = node.port;
        let mut conn = open(&self.url_of(port), None, IO_TIMEOUT)
            .ok_or_else(|| format!("sentinel {port} does not answer"))?;
        cmd.query(&mut conn)
            .map_err(|e| format!("sentinel {port}: {e}"))
    }

    fn sentinel_cmd(sub: &str, name: &str) -> redis::Cmd {
        let mut cmd = redis::cmd("SENTINEL");
        cmd.arg(sub).arg(name);
        cmd
    }

    /// The master's address as sentinel `i` reports it (`SENTINEL
    /// get-master-addr-by-name`); `None` when it cannot say.
    pub fn master_addr_by(&self, i: usize) -> Option<(String, u16)> {
        self.query_node::<Option<(String, u16)>>(
            i,
            &Sentinels::sentinel_cmd("get-master-addr-by-name", &self.name),
        )
        .ok()
        .flatten()
    }

    /// The master's address as the first running sentinel that knows reports it.
    pub fn master_addr(&self) -> (String, u16) {
        self.live()
            .find_map(|i| self.master_addr_by(i))
            .unwrap_or_else(|| panic!("no sentinel knows master {}", self.name))
    }

    /// The replicas as sentinel `i` reports them, dead ones included (see `usable`).
    pub fn replicas_by(&self, i: usize) -> Vec<SentinelReplica> {
        self.try_replicas_by(i)
            .unwrap_or_else(|e| panic!("SENTINEL REPLICAS {}: {e}", self.name))
    }

    /// The replicas as the first running sentinel reports them.
    pub fn replicas(&self) -> Vec<SentinelReplica> {
        let first = self.live().next().expect("a running sentinel");
        self.replicas_by(first)
    }

    fn try_replicas_by(&self, i: usize) -> Result<Vec<SentinelReplica>, String> {
        let replies: Vec<Vec<String>> =
            self.query_node(i, &Sentinels::sentinel_cmd("REPLICAS", &self.name))?;
        Ok(replies
            .into_iter()
            .map(|flat| {
                let field = |key: &str| {
                    flat.chunks(2)
                        .find(|kv| kv[0] == key)
                        .and_then(|kv| kv.get(1).cloned())
                        .unwrap_or_default()
                };
                SentinelReplica {
                    ip: field("ip"),
                    port: field("port").parse().unwrap_or(0),
                    flags: field("flags"),
                    master_link_status: field("master-link-status"),
                }
            })
            .collect())
    }

    /// One field of `SENTINEL MASTER <name>` as sentinel `i` reports it (e.g. `flags`,
    /// `num-other-sentinels`, `config-epoch`).
    pub fn master_field_by(&self, i: usize, field: &str) -> Result<String, String> {
        let flat: Vec<String> =
            self.query_node(i, &Sentinels::sentinel_cmd("MASTER", &self.name))?;
        Ok(flat
            .chunks(2)
            .find(|kv| kv[0] == field)
            .and_then(|kv| kv.get(1).cloned())
            .unwrap_or_default())
    }

    /// Waits until every running sentinel reports the same master, sees it up, knows
    /// every other sentinel, and sees at least `replicas` replicas up and connected
    /// (flags exactly `slave`; their link status lags, see [`SentinelReplica`]): the
    /// state in which a failover can happen, and after one, the state it settles into.
    pub fn wait_settled(&self, replicas: usize, within: Duration) {
        let others = self.nodes.len() - 1;
        poll_for(
            &format!(
                "{} sentinels agree on master {} and see {replicas} replicas",
                self.nodes.len(),
                self.name
            ),
            within,
            || {
                let mut masters = Vec::new();
                for i in self.live() {
                    let port = self.nodes[i].port;
                    masters.push(self.master_addr_by(i));
                    let flags = self.master_field_by(i, "flags")?;
                    if flags != "master" {
                        return Err(format!("sentinel {port}: master flags {flags:?}"));
                    }
                    let known = self.master_field_by(i, "num-other-sentinels")?;
                    if known != others.to_string() {
                        return Err(format!("sentinel {port}: knows {known} other sentinels"));
                    }
                    let seen = self.try_replicas_by(i)?;
                    if seen.iter().filter(|r| r.flags == "slave").count() < replicas {
                        return Err(format!("sentinel {port}: replicas {seen:?}"));
                    }
                }
                if masters.windows(2).any(|w| w[0] != w[1]) || masters.contains(&None) {
                    return Err(format!("masters reported: {masters:?}"));
                }
                Ok(())
            },
        )
    }

    /// Polls until at least a quorum of the sentinels report the same master, on a port
    /// other than `old_port`; returns that port.
    pub fn wait_for_new_master(&self, old_port: u16, within: Duration) -> u16 {
        poll_for(
            &format!("a quorum of sentinels report a master other than {old_port}"),
            within,
            || {
                let ports: Vec<Option<u16>> = self
                    .live()
                    .map(|i| self.master_addr_by(i).map(|(_, port)| port))
                    .collect();
                ports
                    .iter()
                    .flatten()
                    .copied()
                    .filter(|&p| p != old_port)
                    .find(|p| ports.iter().filter(|&&q| q == Some(*p)).count() >= self.quorum)
                    .ok_or_else(|| format!("masters reported: {ports:?}"))
            },
        )
    }

    /// `SENTINEL FAILOVER <name>` on the first running sentinel: a clean switch, no
    /// agreement asked of the others. The answer comes at once; the switch follows
    /// (see `wait_for_new_master`). `Err` carries Sentinel's refusal (e.g. NOGOODSLAVE,
    /// INPROG).
    pub fn failover(&self) -> Result<(), String> {
        let first = self.live().next().expect("a running sentinel");
        self.query_node::<String>(first, &Sentinels::sentinel_cmd("FAILOVER", &self.name))
            .map(|_| ())
    }

    /// SIGKILLs sentinel `i` (the others go on; Echo must too).
    pub fn kill(&mut self, i: usize) {
        self.nodes[i].kill();
    }

    /// Freezes sentinel `i` (SIGSTOP) until [`resume`](Self::resume).
    pub fn pause(&self, i: usize) {
        signal(self.nodes[i].pid(), "-STOP");
    }

    pub fn resume(&self, i: usize) {
        signal(self.nodes[i].pid(), "-CONT");
    }
}

impl SentinelNode {
    fn pid(&self) -> u32 {
        self.child
            .as_ref()
            .map(Child::id)
            .unwrap_or_else(|| panic!("sentinel on {} is not running", self.port))
    }
}

impl Drop for Sentinels {
    fn drop(&mut self) {
        for node in &mut self.nodes {
            node.kill();
            remove_dir_unless_panicking(&node.dir, &format!("sentinel {}", node.port));
        }
    }
}
