//! Real `redis-server` processes for the tests and the benches: a master and replicas
//! (`--replicaof`) on free ports, each in its own temp dir, killed on drop.
//!
//! Never a mock, and never the machine's own Redis on 6379: every test starts its own,
//! so the suite runs the same on a bare machine (where `make test` installs
//! redis-server) as here. A missing redis-server fails loudly; nothing is skipped.
//!
//! The file stands alone (std and the `redis` crate, nothing from `super`): the benches
//! include it with `#[path = "../tests/echo/support/redis.rs"] mod redis_fixture;`, so
//! Redis is started one way everywhere.

use std::net::TcpListener;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

static NEXT_DIR: AtomicUsize = AtomicUsize::new(0);

pub struct RedisServer {
    child: Option<Child>,
    pub port: u16,
    dir: PathBuf,
    replica_of: Option<u16>,
}

/// A free TCP port on 127.0.0.1 (bind :0, read port, drop); `start` retries when another
/// process takes it first.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .expect("free port on 127.0.0.1")
        .port()
}

/// Polls `cond` every 10 ms until it holds; panics naming `what` after `within`.
fn poll_until(what: &str, within: Duration, cond: impl Fn() -> bool) {
    let deadline = Instant::now() + within;
    while !cond() {
        assert!(
            Instant::now() < deadline,
            "timed out after {within:?} waiting until {what}"
        );
        std::thread::sleep(Duration::from_millis(10));
    }
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

impl RedisServer {
    /// A master on a free port.
    pub fn master() -> RedisServer {
        RedisServer::start(None)
    }

    /// A replica of `master`, returned once its link to the master is up.
    pub fn replica_of(master: &RedisServer) -> RedisServer {
        let replica = RedisServer::start(Some(master.port));
        replica.wait_link_up();
        replica
    }

    fn start(replica_of: Option<u16>) -> RedisServer {
        let dir = std::env::temp_dir().join(format!(
            "echo-redis-{}-{}",
            std::process::id(),
            NEXT_DIR.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("redis temp dir");
        let mut server = RedisServer {
            child: None,
            port: 0,
            dir,
            replica_of,
        };
        // A free port can be taken between finding it and binding it: try a few.
        for _ in 0..5 {
            server.port = free_port();
            server.spawn();
            if server.wait_answering(Duration::from_secs(10)) {
                return server;
            }
            server.kill();
        }
        panic!("redis-server did not start (see {})", server.dir.display());
    }

    fn spawn(&mut self) {
        let log = std::fs::File::create(self.dir.join("redis.log")).expect("redis log");
        let mut cmd = Command::new(binary());
        cmd.args(["--port", &self.port.to_string()])
            .args(["--bind", "127.0.0.1"])
            .args(["--save", "", "--appendonly", "no"])
            .args(["--dir", &self.dir.to_string_lossy()])
            .args(["--daemonize", "no", "--protected-mode", "yes"])
            // A replica gets its first copy at once, not after the default 5 s wait.
            .args(["--repl-diskless-sync-delay", "0"])
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(Stdio::null());
        if let Some(master) = self.replica_of {
            cmd.args(["--replicaof", "127.0.0.1", &master.to_string()]);
        }
        self.child = Some(cmd.spawn().expect("spawn redis-server"));
    }

    fn wait_answering(&mut self, within: Duration) -> bool {
        let deadline = Instant::now() + within;
        while Instant::now() < deadline {
            if let Some(child) = self.child.as_mut() {
                if let Ok(Some(_)) = child.try_wait() {
                    return false;
                }
            }
            if self
                .try_connection(Duration::from_secs(5))
                .is_some_and(|mut c| redis::cmd("PING").query::<String>(&mut c).is_ok())
            {
                return true;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        false
    }

    fn wait_link_up(&self) {
        poll_until(
            "the replica's link to its master is up",
            Duration::from_secs(10),
            || self.info("replication").contains("master_link_status:up"),
        );
    }

    pub fn url(&self) -> String {
        format!("redis://127.0.0.1:{}", self.port)
    }

    /// A connection whose reads and writes time out after `io`.
    fn try_connection(&self, io: Duration) -> Option<redis::Connection> {
        let client = redis::Client::open(self.url()).ok()?;
        let conn = client
            .get_connection_with_timeout(Duration::from_secs(1))
            .ok()?;
        conn.set_read_timeout(Some(io)).ok()?;
        conn.set_write_timeout(Some(io)).ok()?;
        Some(conn)
    }

    /// A connection for quick commands (5 s read and write timeouts).
    pub fn connection(&self) -> redis::Connection {
        self.connection_with_timeout(Duration::from_secs(5))
    }

    /// A connection whose reads and writes may take up to `io` (large pipelines, WAIT).
    pub fn connection_with_timeout(&self, io: Duration) -> redis::Connection {
        self.try_connection(io)
            .unwrap_or_else(|| panic!("cannot connect to redis on {}", self.port))
    }

    /// `INFO <section>` as text.
    pub fn info(&self, section: &str) -> String {
        redis::cmd("INFO")
            .arg(section)
            .query::<String>(&mut self.connection())
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
        redis::cmd("EXISTS")
            .arg(key)
            .query::<u64>(&mut self.connection())
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
        self.signal("-STOP");
    }

    /// Lets a server frozen by [`pause`](Self::pause) run again (SIGCONT).
    pub fn resume(&self) {
        self.signal("-CONT");
    }

    fn signal(&self, which: &str) {
        let pid = self
            .pid()
            .unwrap_or_else(|| panic!("redis on {} is not running", self.port));
        let status = Command::new("kill")
            .args([which, &pid.to_string()])
            .status()
            .expect("run kill");
        assert!(status.success(), "kill {which} {pid} failed: {status}");
    }

    /// Starts it again on the same port (a replica reconnects to its master by itself).
    pub fn restart(&mut self) {
        self.kill();
        self.spawn();
        assert!(
            self.wait_answering(Duration::from_secs(10)),
            "redis-server did not restart on port {}",
            self.port
        );
        if self.replica_of.is_some() {
            self.wait_link_up();
        }
    }
}

impl Drop for RedisServer {
    fn drop(&mut self) {
        self.kill();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
