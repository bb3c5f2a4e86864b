//! The `echod` binary as users run it: flags and exit codes, config errors that name
//! the key and the line, a listen port already taken, a request end to end through the
//! real binaries (`demo-origin` behind `echod`), and `echod invalidate` against a running
//! `echod`'s admin API.
//!
//! Every process is started through a guard that kills it on drop, and every wait for
//! one is bounded, so a test that fails never leaves a process behind or hangs.

use std::fs::File;
use std::io::Read;
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::thread;
use std::time::Duration;

use serde_json::{json, Value};

use crate::support::{free_port, wait_until, RawClient, TempDir};

const ECHOD: &str = env!("CARGO_BIN_EXE_echod");
const DEMO_ORIGIN: &str = env!("CARGO_BIN_EXE_demo-origin");
/// How long a command that should exit at once may take on a loaded machine.
const EXIT_WITHIN: Duration = Duration::from_secs(10);

/// A child process that is killed (and reaped) when the guard drops.
pub(crate) struct ChildGuard {
    child: Child,
    name: &'static str,
    /// Where its stderr goes, for failure messages.
    log: Option<PathBuf>,
}

impl ChildGuard {
    fn spawn(name: &'static str, cmd: &mut Command, log: Option<PathBuf>) -> ChildGuard {
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {name}: {e}"));
        ChildGuard { child, name, log }
    }

    pub(crate) fn log_text(&self) -> String {
        self.log
            .as_ref()
            .and_then(|p| std::fs::read_to_string(p).ok())
            .unwrap_or_default()
    }

    /// Waits until the process accepts TCP connections on `addr`; panics if it exits
    /// first or the deadline passes.
    pub(crate) fn wait_listening(&mut self, addr: SocketAddr) {
        let name = self.name;
        wait_until(
            &format!("{name} accepts connections on {addr}"),
            Duration::from_secs(10),
            || {
                if let Ok(Some(status)) = self.child.try_wait() {
                    panic!("{name} exited with {status}: {}", self.log_text());
                }
                TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_ok()
            },
        );
    }
}

/// Starts `echod --config <config>` with its stderr logged to `echod.log` in `dir`.
pub(crate) fn spawn_echod(dir: &TempDir, config: &Path) -> ChildGuard {
    let log = dir.0.join("echod.log");
    ChildGuard::spawn(
        "echod",
        Command::new(ECHOD)
            .args(["--config", path_str(config)])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(&log).expect("log file")),
        Some(log),
    )
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// What a finished command printed.
struct Finished {
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

/// Runs `echod args...` and waits (bounded) for it to exit.
fn echod(args: &[&str]) -> Finished {
    let mut cmd = Command::new(ECHOD);
    cmd.args(args)
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut guard = ChildGuard::spawn("echod", &mut cmd, None);
    let pipes: [Option<Box<dyn Read + Send>>; 2] = [
        guard.child.stdout.take().map(|p| Box::new(p) as _),
        guard.child.stderr.take().map(|p| Box::new(p) as _),
    ];
    let readers = pipes.map(|pipe| {
        let mut pipe = pipe.expect("piped output");
        thread::spawn(move || {
            let mut text = String::new();
            let _ = pipe.read_to_string(&mut text);
            text
        })
    });
    let mut status = None;
    wait_until(&format!("echod {args:?} exits"), EXIT_WITHIN, || {
        status = guard.child.try_wait().ok().flatten();
        status.is_some()
    });
    let [stdout, stderr] = readers.map(|r| r.join().expect("pipe reader"));
    Finished {
        status: status.expect("exit status"),
        stdout,
        stderr,
    }
}

pub(crate) fn path_str(p: &Path) -> &str {
    p.to_str().expect("temp paths are UTF-8")
}

// ---------------------------------------------------------------------------------------
// Flags.

#[test]
fn version_prints_the_version_and_exits_0() {
    let out = echod(&["--version"]);
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    assert_eq!(
        out.stdout.trim(),
        format!("echod {}", env!("CARGO_PKG_VERSION"))
    );
}

#[test]
fn help_prints_usage_and_exits_0() {
    let out = echod(&["--help"]);
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    for flag in [
        "--config",
        "--check-config",
        "--version",
        "--help",
        "invalidate",
        "--pattern",
        "--tag",
        "--status",
        "--cancel",
        "--all",
    ] {
        assert!(
            out.stdout.contains(flag),
            "usage lacks {flag}: {}",
            out.stdout
        );
    }
}

#[test]
fn unknown_flags_and_missing_values_exit_2_with_a_message() {
    let out = echod(&["--frobnicate"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stderr.contains("--frobnicate"), "{}", out.stderr);
    assert!(out.stdout.is_empty());

    let out = echod(&["--config"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stderr.contains("--config"), "{}", out.stderr);
}

// ---------------------------------------------------------------------------------------
// Config checking.

#[test]
fn the_shipped_config_checks_ok() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("etc/echo.toml");
    let out = echod(&["--check-config", "--config", path_str(&path)]);
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    assert!(out.stdout.contains("ok"), "{}", out.stdout);
}

const ORIGIN: &str = "[origin]\nurl = \"http://127.0.0.1:9000\"\n";

#[test]
fn config_errors_exit_2_naming_the_key_and_the_line() {
    let dir = TempDir::new("config-errors");
    // (file name, text, what stderr must name, line)
    let cases: Vec<(&str, String, &str, usize)> = vec![
        (
            "workers-zero",
            format!("[server]\nworkers = 0\n{ORIGIN}"),
            "server.workers",
            2,
        ),
        (
            "unknown-key",
            format!("{ORIGIN}\n[server]\nwokers = 3\n"),
            "wokers",
            5,
        ),
        (
            "ftp-origin",
            "# comment\n[origin]\nurl = \"ftp://x\"\n".to_string(),
            "origin.url",
            3,
        ),
        (
            "wrong-type",
            format!("[server]\nlisten = \"127.0.0.1:8080\"\nworkers = \"x\"\n{ORIGIN}"),
            "server.workers",
            3,
        ),
        (
            "syntax",
            format!("{ORIGIN}[server]\nworkers = = 3\n"),
            "line 4",
            4,
        ),
        (
            "empty-token",
            format!("{ORIGIN}[admin]\nlisten = \"127.0.0.1:8081\"\ntoken = \"\"\n"),
            "admin.token",
            5,
        ),
        // Issue 21: what passed --check-config and then failed, or said it in Rust.
        (
            "port-out-of-range",
            "[origin]\nurl = \"http://127.0.0.1:99999\"\n".to_string(),
            "origin.url: the port must be a number from 1 to 65535",
            2,
        ),
        (
            "no-bodies",
            format!("{ORIGIN}[server]\nmax_body_bytes = 0\n"),
            "server.max_body_bytes: must be at least 1 (got 0)",
            4,
        ),
        (
            "log-dir-missing",
            format!("{ORIGIN}[log]\nfile = \"/nonexistent-echo-dir/echo.log\"\n"),
            "log.file: the directory of /nonexistent-echo-dir/echo.log does not exist",
            4,
        ),
        (
            "access-log-dir-missing",
            format!("{ORIGIN}[log]\naccess_log = \"/nonexistent-echo-dir/a.log\"\n"),
            "log.access_log",
            4,
        ),
        (
            "negative",
            format!("{ORIGIN}[server]\nworkers = -1\n"),
            "server.workers: invalid value: integer `-1`, expected a whole number, 0 or more",
            4,
        ),
        (
            "duplicate",
            format!("{ORIGIN}[server]\nworkers = 4\nworkers = 5\n"),
            "server.workers",
            5,
        ),
    ];
    for (name, text, names, line) in &cases {
        let path = dir.file(&format!("{name}.toml"), text);
        let out = echod(&["--check-config", "--config", path_str(&path)]);
        assert_eq!(out.status.code(), Some(2), "{name}: {}", out.stderr);
        assert!(out.stderr.contains(names), "{name}: {}", out.stderr);
        assert!(
            out.stderr.contains(&format!("line {line}")),
            "{name}: no line {line}: {}",
            out.stderr
        );
        assert!(
            out.stderr.contains(path_str(&path)),
            "{name}: {}",
            out.stderr
        );
        assert!(out.stdout.is_empty(), "{name}: {}", out.stdout);
        assert!(
            !out.stderr.contains("18446744073709551615"),
            "{name}: {}",
            out.stderr
        );
        assert!(!out.stderr.contains("u64"), "{name}: {}", out.stderr);
        // Running with the file is refused the same way, before anything starts.
        let run = echod(&["--config", path_str(&path)]);
        assert_eq!(run.status.code(), Some(2), "{name} (run): {}", run.stderr);
        assert!(run.stderr.contains(names), "{name} (run): {}", run.stderr);
    }

    let out = echod(&[
        "--check-config",
        "--config",
        path_str(&dir.file("empty.toml", "")),
    ]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stderr.contains("origin.url"), "{}", out.stderr);
}

#[test]
fn a_missing_config_file_exits_2_naming_the_file() {
    let dir = TempDir::new("missing");
    let path = dir.0.join("nowhere.toml");
    let out = echod(&["--check-config", "--config", path_str(&path)]);
    assert_eq!(out.status.code(), Some(2));
    assert!(out.stderr.contains(path_str(&path)), "{}", out.stderr);
    assert!(out.stderr.contains("cannot read"), "{}", out.stderr);
}

// ---------------------------------------------------------------------------------------
// Running.

#[test]
fn a_listen_port_already_taken_exits_2_with_a_message() {
    let taken = TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = taken.local_addr().expect("addr");
    let dir = TempDir::new("port-taken");
    let path = dir.file(
        "echo.toml",
        &format!("[server]\nlisten = \"{addr}\"\n{ORIGIN}[log]\nlevel = \"warn\"\n"),
    );
    let out = echod(&["--config", path_str(&path)]);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("cannot listen"), "{}", out.stderr);
    assert!(out.stderr.contains(&addr.to_string()), "{}", out.stderr);
    assert!(out.stderr.contains("server.listen"), "{}", out.stderr);

    // The admin port taken: the message names the admin address and key.
    let free = format!("127.0.0.1:{}", free_port());
    let path = dir.file(
        "admin.toml",
        &format!(
            "[server]\nlisten = \"{free}\"\n[admin]\nlisten = \"{addr}\"\ntoken = \"t\"\n{ORIGIN}"
        ),
    );
    let out = echod(&["--config", path_str(&path)]);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(
        out.stderr
            .contains(&format!("cannot listen on {addr} (admin.listen)")),
        "{}",
        out.stderr
    );
    drop(taken);
}

/// `demo-origin` and `echod` started as processes from a temp config; both are killed
/// when this drops (fields drop in order: echod, then the origin, then the directory).
struct Binaries {
    echod: ChildGuard,
    origin: ChildGuard,
    origin_addr: SocketAddr,
    echo_addr: SocketAddr,
    admin_addr: Option<SocketAddr>,
    /// The config echod runs with.
    config: PathBuf,
    dir: TempDir,
}

impl Binaries {
    /// Starts `demo-origin`, then `echod` in front of it with the memory store; with
    /// `admin_token`, the admin API listens on a free port with that token.
    fn start(label: &str, admin_token: Option<&str>) -> Binaries {
        let dir = TempDir::new(label);
        let origin_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let origin_log = dir.0.join("demo-origin.log");
        let mut origin = ChildGuard::spawn(
            "demo-origin",
            Command::new(DEMO_ORIGIN)
                .args(["--listen", &origin_addr.to_string()])
                .stdin(Stdio::null())
                .stdout(Stdio::null())
                .stderr(File::create(&origin_log).expect("log file")),
            Some(origin_log),
        );
        origin.wait_listening(origin_addr);

        let echo_addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let admin = admin_token.map(|token| {
            let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
            (
                addr,
                format!("[admin]\nlisten = \"{addr}\"\ntoken = \"{token}\"\n"),
            )
        });
        let config = dir.file(
            "echo.toml",
            &format!(
                "[server]\nlisten = \"{echo_addr}\"\nworkers = 4\n{}\
                 [origin]\nurl = \"http://{origin_addr}\"\n[log]\nlevel = \"info\"\n",
                admin.as_ref().map_or("", |(_, section)| section.as_str())
            ),
        );
        let mut echod = spawn_echod(&dir, &config);
        echod.wait_listening(echo_addr);
        let admin_addr = admin.map(|(addr, _)| addr);
        if let Some(addr) = admin_addr {
            echod.wait_listening(addr);
        }
        Binaries {
            echod,
            origin,
            origin_addr,
            echo_addr,
            admin_addr,
            config,
            dir,
        }
    }

    /// `X-Cache-Status` of a GET of `target` through echod.
    fn cache_status(&self, target: &str) -> String {
        let response = RawClient::connect(self.echo_addr).get(target, &[]);
        assert_eq!(
            response.status,
            200,
            "{target}: echod: {}\ndemo-origin: {}",
            self.echod.log_text(),
            self.origin.log_text()
        );
        response
            .header("x-cache-status")
            .unwrap_or_default()
            .to_string()
    }
}

#[test]
fn end_to_end_through_the_binaries_a_second_get_is_a_hit() {
    let binaries = Binaries::start("e2e", None);
    let echod = &binaries.echod;

    let mut client = RawClient::connect(binaries.echo_addr);
    let first = client.get("/data", &[]);
    assert_eq!(first.status, 200, "{}", echod.log_text());
    assert_eq!(first.header("x-cache-status"), Some("MISS"));
    assert!(
        first.body_str().contains("\"origin_hits\": 1"),
        "{}",
        first.body_str()
    );
    let second = client.get("/data", &[]);
    assert_eq!(second.status, 200);
    assert_eq!(second.header("x-cache-status"), Some("HIT"));
    assert_eq!(second.body, first.body);
    assert!(second.header("age").is_some());

    // The origin's own page agrees it was asked once.
    let direct = RawClient::connect(binaries.origin_addr).get("/data", &[]);
    assert!(
        direct.body_str().contains("\"origin_hits\": 2"),
        "{}",
        direct.body_str()
    );
    assert!(
        echod.log_text().contains("proxying"),
        "{}",
        echod.log_text()
    );
    // Issue 21: the demo origin tags /data and answers a revalidation with a 304, so
    // the README's tag and revalidation flows can be tried with `make run`.
    let tagged = RawClient::connect(binaries.origin_addr).get("/data", &[]);
    assert_eq!(tagged.header("surrogate-key"), Some("data demo"));
    let etag = tagged.header("etag").expect("an ETag").to_string();
    let revalidated =
        RawClient::connect(binaries.origin_addr).get("/data", &[("If-None-Match", &etag)]);
    assert_eq!(revalidated.status, 304);
    assert!(revalidated.body.is_empty());
    assert_eq!(
        second.header("surrogate-key"),
        None,
        "Echo keeps tags inside"
    );
    // Issue 21: the start says which store is in use, and that the admin API is off.
    let log = echod.log_text();
    assert!(log.contains("store: memory, up to"), "{log}");
    assert!(log.contains("admin API off (no [admin] section)"), "{log}");
}

// ---------------------------------------------------------------------------------------
// `echod invalidate`: the admin API from the command line.

const ADMIN_TOKEN: &str = "cli-test-admin-token-7f3a";

/// The JSON `echod invalidate` printed on stdout.
fn stdout_json(out: &Finished) -> Value {
    serde_json::from_str(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "stdout is not JSON ({e}):\n{}\nstderr:\n{}",
            out.stdout, out.stderr
        )
    })
}

/// Neither output of a finished command holds the token.
fn assert_no_token(out: &Finished, token: &str) {
    assert!(
        !out.stdout.contains(token) && !out.stderr.contains(token),
        "the token was printed:\n{}\n{}",
        out.stdout,
        out.stderr
    );
}

#[test]
fn invalidate_drives_the_admin_api_of_a_running_echod() {
    let echo = Binaries::start("invalidate", Some(ADMIN_TOKEN));
    // The line is written as the admin listener starts; under load it can land a moment
    // after the proxy answers.
    wait_until(
        "the admin API's start line",
        Duration::from_secs(10),
        || echo.echod.log_text().contains("admin API on 127.0.0.1:"),
    );
    let config = path_str(&echo.config);
    for target in ["/data", "/bytes/10"] {
        assert_eq!(echo.cache_status(target), "MISS", "{target}");
        assert_eq!(echo.cache_status(target), "HIT", "{target}");
    }

    // A dry run names what would go and touches nothing.
    let out = echod(&[
        "invalidate",
        "--config",
        config,
        "--pattern",
        "^/data",
        "--dry-run",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    assert_no_token(&out, ADMIN_TOKEN);
    let report = stdout_json(&out);
    assert_eq!(report["state"], "done", "{report}");
    assert_eq!(report["dry_run"], true, "{report}");
    assert_eq!(report["matched"], 1, "{report}");
    assert_eq!(report["would_change"], 1, "{report}");
    assert_eq!(
        report["sample"],
        json!(["http://test.local/data"]),
        "{report}"
    );
    assert_eq!(echo.cache_status("/data"), "HIT");

    // The real thing deletes /data only.
    let out = echod(&["invalidate", "--config", config, "--pattern", "^/data"]);
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    assert_no_token(&out, ADMIN_TOKEN);
    let report = stdout_json(&out);
    assert_eq!(report["state"], "done", "{report}");
    assert_eq!(report["mode"], "delete", "{report}");
    assert_eq!(report["matched"], 1, "{report}");
    assert_eq!(report["deleted"], 1, "{report}");
    assert_eq!(echo.cache_status("/data"), "MISS");
    assert_eq!(echo.cache_status("/bytes/10"), "HIT");

    // --async answers at once with a job id; --status follows the job to its end.
    let out = echod(&[
        "invalidate",
        "--config",
        config,
        "--pattern",
        "^/bytes/",
        "--async",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    let accepted = stdout_json(&out);
    let id = accepted["id"]
        .as_u64()
        .unwrap_or_else(|| panic!("no job id: {accepted}"))
        .to_string();
    assert_eq!(
        accepted["status"],
        format!("/invalidate/{id}"),
        "{accepted}"
    );
    let mut report = Value::Null;
    wait_until(
        &format!("invalidation job {id} is done"),
        Duration::from_secs(10),
        || {
            let out = echod(&["invalidate", "--config", config, "--status", &id]);
            assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
            assert_no_token(&out, ADMIN_TOKEN);
            report = stdout_json(&out);
            report["state"] == "done"
        },
    );
    assert_eq!(report["id"].to_string(), id, "{report}");
    assert_eq!(report["deleted"], 1, "{report}");
    assert_eq!(echo.cache_status("/bytes/10"), "MISS");

    // --cancel sends DELETE /invalidate/<id>: a job already done cannot be cancelled.
    let out = echod(&["invalidate", "--config", config, "--cancel", &id]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("DELETE /invalidate/"), "{}", out.stderr);
    assert!(out.stderr.contains("409"), "{}", out.stderr);
    assert!(
        out.stderr.contains("already ended (done)"),
        "{}",
        out.stderr
    );
    assert_no_token(&out, ADMIN_TOKEN);
    let out = echod(&["invalidate", "--config", config, "--cancel", "999999"]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("404"), "{}", out.stderr);

    // The API's refusals exit 1 with its answer on stderr and nothing on stdout.
    let out = echod(&["invalidate", "--config", config, "--pattern", "("]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("400"), "{}", out.stderr);
    assert!(out.stderr.contains("invalid pattern"), "{}", out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);

    let out = echod(&["invalidate", "--config", config, "--status", "999999"]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("404"), "{}", out.stderr);
    assert!(
        out.stderr.contains("no such invalidation job"),
        "{}",
        out.stderr
    );

    let wrong_token = "not-the-admin-token-91c2";
    let text = std::fs::read_to_string(&echo.config).expect("read config");
    let wrong = echo
        .dir
        .file("wrong-token.toml", &text.replace(ADMIN_TOKEN, wrong_token));
    let out = echod(&[
        "invalidate",
        "--config",
        path_str(&wrong),
        "--pattern",
        "^/",
    ]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("401"), "{}", out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
    assert_no_token(&out, wrong_token);
    // Nothing was done for it.
    assert_eq!(echo.cache_status("/data"), "HIT");

    // A pattern that matches everything needs --all (issue 13 finding 10).
    let out = echod(&["invalidate", "--config", config, "--pattern", "^/"]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stderr);
    assert!(out.stderr.contains("400"), "{}", out.stderr);
    assert!(out.stderr.contains("all"), "{}", out.stderr);
    assert_eq!(echo.cache_status("/data"), "HIT");
    let out = echod(&["invalidate", "--config", config, "--pattern", "^/", "--all"]);
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    assert_eq!(stdout_json(&out)["deleted"], 2, "{}", out.stdout);
    assert_eq!(echo.cache_status("/data"), "MISS");
}

/// echod's resident memory, in KiB.
fn rss_kib(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap_or_else(|| panic!("no VmRSS in {status}"))
}

#[test]
fn finished_invalidation_jobs_do_not_pin_memory() {
    // Issue 13 finding 7: each finished job's ban kept its compiled regex, with the
    // lazy-DFA cache its scan had filled, for ban_ttl (300 s): 600 jobs grew echod's
    // RSS from 29 MiB to 641 MiB. Measured on echod itself, a process of its own.
    let echo = Binaries::start("rss", Some(ADMIN_TOKEN));
    let admin = echo.admin_addr.expect("admin listener");
    let tail = "a".repeat(2000);
    let mut client = RawClient::connect(echo.echo_addr);
    for i in 0..100 {
        let resp = client.get(&format!("/data?k={i}&{tail}"), &[]);
        assert_eq!(resp.status, 200, "{}", echo.echod.log_text());
    }
    assert_eq!(echo.cache_status(&format!("/data?k=0&{tail}")), "HIT");
    let pid = echo.echod.child.id();
    let before = rss_kib(pid);
    let bearer = format!("Bearer {ADMIN_TOKEN}");
    for i in 0..200 {
        // Each pattern different, each scanning the 100 long keys.
        let body = format!(r#"{{"pattern": "(?:.{{0,12}}a){{0,12}}Q{i}"}}"#);
        let resp = RawClient::connect(admin).request(
            "POST",
            "/invalidate",
            &[
                ("Authorization", &bearer),
                ("Content-Type", "application/json"),
            ],
            body.as_bytes(),
        );
        assert_eq!(resp.status, 200, "{}", resp.body_str());
    }
    let grown = rss_kib(pid).saturating_sub(before);
    assert!(
        grown < 32 * 1024,
        "echod's RSS grew by {} MiB over 200 jobs",
        grown / 1024
    );
}

/// `echod inspect URL` prints what is stored for a URL (exit 1 and a 404 when nothing
/// is); `echod invalidate --url URL` purges exactly that URL.
#[test]
fn inspect_and_purge_by_url_from_the_command_line() {
    let echo = Binaries::start("inspect", Some(ADMIN_TOKEN));
    let config = path_str(&echo.config);
    assert_eq!(echo.cache_status("/data"), "MISS");
    assert_eq!(echo.cache_status("/bytes/10"), "MISS");
    let out = echod(&["inspect", "--config", config, "http://test.local/data"]);
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    assert_no_token(&out, ADMIN_TOKEN);
    let stored = stdout_json(&out);
    assert_eq!(stored["key"], "http://test.local/data", "{stored}");
    assert_eq!(stored["variants"][0]["status"], 200, "{stored}");
    assert_eq!(stored["variants"][0]["fresh"], true, "{stored}");

    let out = echod(&[
        "invalidate",
        "--config",
        config,
        "--url",
        "http://test.local/data",
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    let report = stdout_json(&out);
    assert_eq!(
        (report["matched"].as_u64(), report["deleted"].as_u64()),
        (Some(1), Some(1)),
        "{report}"
    );
    assert_eq!(echo.cache_status("/bytes/10"), "HIT");

    let out = echod(&["inspect", "--config", config, "http://test.local/data"]);
    assert_eq!(out.status.code(), Some(1), "{}", out.stdout);
    assert!(out.stderr.contains("404"), "{}", out.stderr);
}

#[test]
fn invalidate_without_an_admin_section_exits_2() {
    let dir = TempDir::new("no-admin");
    let path = dir.file("echo.toml", ORIGIN);
    let out = echod(&["invalidate", "--config", path_str(&path), "--pattern", "^/"]);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(out.stderr.starts_with("echod: "), "{}", out.stderr);
    assert!(out.stderr.contains("[admin]"), "{}", out.stderr);
    assert!(out.stderr.contains(path_str(&path)), "{}", out.stderr);
    assert!(out.stdout.is_empty(), "{}", out.stdout);
}

#[test]
fn invalidate_with_no_echod_listening_exits_2() {
    let dir = TempDir::new("no-listener");
    let admin = format!("127.0.0.1:{}", free_port());
    let path = dir.file(
        "echo.toml",
        &format!("{ORIGIN}[admin]\nlisten = \"{admin}\"\ntoken = \"{ADMIN_TOKEN}\"\n"),
    );
    let out = echod(&["invalidate", "--config", path_str(&path), "--status", "1"]);
    assert_eq!(out.status.code(), Some(2), "{}", out.stderr);
    assert!(out.stderr.contains("cannot connect"), "{}", out.stderr);
    assert!(out.stderr.contains(&admin), "{}", out.stderr);
    assert_no_token(&out, ADMIN_TOKEN);
}

#[test]
fn invalidate_usage_errors_exit_2_before_reading_the_config() {
    // The config does not exist: a usage error is reported before it is read.
    let cases: &[(&[&str], &str)] = &[
        (
            &["invalidate"],
            "--pattern, --tag, --url, --status or --cancel",
        ),
        (
            &["invalidate", "--dry-run", "--async"],
            "--pattern, --tag, --url, --status or --cancel",
        ),
        (
            &["invalidate", "--host", "a.example"],
            "--pattern, --tag, --url, --status or --cancel",
        ),
        (&["invalidate", "--pattern"], "--pattern needs a value"),
        (
            &["invalidate", "--pattern", "^/a", "--pattern", "^/b"],
            "twice",
        ),
        (
            &["invalidate", "--pattern", "^/", "--mode", "purge"],
            "purge",
        ),
        (&["invalidate", "--status", "seven"], "seven"),
        (&["invalidate", "--status", "1", "--status", "2"], "twice"),
        (
            &["invalidate", "--status", "1", "--pattern", "^/"],
            "--status",
        ),
        (
            &["invalidate", "--pattern", "^/", "--frobnicate"],
            "--frobnicate",
        ),
        (&["--check-config", "invalidate"], "invalidate"),
        (&["invalidate", "--cancel", "seven"], "seven"),
        (&["invalidate", "--cancel", "1", "--cancel", "2"], "twice"),
        (
            &["invalidate", "--cancel", "1", "--status", "1"],
            "cannot be combined",
        ),
        (&["invalidate", "--cancel", "1", "--all"], "--cancel"),
    ];
    for (args, names) in cases {
        // `--config F` also goes before the subcommand.
        let mut all = vec!["--config", "/nonexistent/echo.toml"];
        all.extend_from_slice(args);
        let out = echod(&all);
        assert_eq!(out.status.code(), Some(2), "{args:?}: {}", out.stderr);
        assert!(
            out.stderr.starts_with("echod: "),
            "{args:?}: {}",
            out.stderr
        );
        assert!(out.stderr.contains(names), "{args:?}: {}", out.stderr);
        assert!(
            !out.stderr.contains("cannot read"),
            "{args:?}: {}",
            out.stderr
        );
        assert!(out.stdout.is_empty(), "{args:?}: {}", out.stdout);
    }
}

#[test]
fn sigterm_drains_requests_in_flight_refuses_new_ones_and_exits_0() {
    use crate::support::{client, Gate, OriginResponse, TestOrigin};

    let gate = Gate::new();
    let held = gate.hold();
    let origin = TestOrigin::start(move |req| {
        if req.target == "/in-flight" {
            held.wait(Duration::from_secs(10));
        }
        OriginResponse::ok(format!("body of {}", req.target))
    });
    let dir = TempDir::new("drain");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = dir.file(
        "echo.toml",
        &format!(
            "[server]\nlisten = \"{addr}\"\ndrain_timeout_ms = 10000\ndrain_grace_ms = 0\n[origin]\nurl = \"{}\"\n[log]\nlevel = \"info\"\n",
            origin.url()
        ),
    );
    let mut echod = spawn_echod(&dir, &config);
    echod.wait_listening(addr);
    // An idle keep-alive client, and a request in flight at the origin.
    let mut idle = RawClient::connect(addr);
    assert_eq!(idle.get("/before", &[]).status, 200);
    let in_flight = thread::spawn(move || client::get(addr, "/in-flight", &[]));
    wait_until(
        "the request is at the origin",
        Duration::from_secs(5),
        || origin.hits("/in-flight") == 1,
    );

    let pid = echod.child.id().to_string();
    let sent = Command::new("kill")
        .args(["-TERM", &pid])
        .status()
        .expect("kill");
    assert!(sent.success());
    // No new connections once draining; the idle one is closed.
    wait_until(
        "new connections are refused",
        Duration::from_secs(5),
        || TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err(),
    );
    assert!(
        idle.closed_within(Duration::from_secs(5)),
        "the idle connection was closed"
    );
    // The request in flight still completes, then echod exits 0.
    gate.open();
    let resp = in_flight.join().expect("client");
    assert_eq!(
        (resp.status, resp.body_str().as_str()),
        (200, "body of /in-flight")
    );
    assert_eq!(resp.header("connection"), Some("close"));
    let mut status = None;
    wait_until("echod exits", EXIT_WITHIN, || {
        status = echod.child.try_wait().ok().flatten();
        status.is_some()
    });
    let status = status.expect("exited");
    assert_eq!(status.code(), Some(0), "{}", echod.log_text());
    assert!(
        echod.log_text().contains("draining"),
        "{}",
        echod.log_text()
    );
}

/// Issue 21: with `server.drain_grace_ms`, a SIGTERM turns `/ready` to 503 at once, but
/// Echo keeps accepting and serving for the grace, so clients a balancer still sends
/// (it has not polled `/ready` yet) are answered; then it stops accepting and drains.
#[test]
fn sigterm_with_a_drain_grace_fails_ready_at_once_and_serves_through_the_grace() {
    use crate::support::{client, OriginResponse, TestOrigin};

    let origin = TestOrigin::start(|req| OriginResponse::ok(format!("body of {}", req.target)));
    let dir = TempDir::new("drain-grace");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let config = dir.file(
        "echo.toml",
        &format!(
            "[server]\nlisten = \"{addr}\"\ndrain_grace_ms = 1500\n[admin]\nlisten = \"{admin}\"\n\
             token = \"t\"\n[origin]\nurl = \"{}\"\n[log]\nlevel = \"info\"\n",
            origin.url()
        ),
    );
    let mut echod = spawn_echod(&dir, &config);
    echod.wait_listening(addr);
    echod.wait_listening(admin);
    assert_eq!(client::get(admin, "/ready", &[]).status, 200);
    signal(&echod, "-TERM");
    let sent = std::time::Instant::now();
    wait_until("/ready fails", Duration::from_secs(1), || {
        client::get(admin, "/ready", &[]).status == 503
    });
    // Within the grace, a new client is still accepted and answered.
    let during = client::get(addr, "/during-grace", &[]);
    assert_eq!(during.status, 200);
    assert!(
        sent.elapsed() < Duration::from_millis(1500),
        "the check ran after the grace: {:?}",
        sent.elapsed()
    );
    // After it, no new connections; echod exits 0.
    wait_until(
        "new connections are refused",
        Duration::from_secs(5),
        || TcpStream::connect_timeout(&addr, Duration::from_millis(200)).is_err(),
    );
    assert!(
        sent.elapsed() >= Duration::from_millis(1500),
        "{:?}",
        sent.elapsed()
    );
    let mut status = None;
    wait_until("echod exits", EXIT_WITHIN, || {
        status = echod.child.try_wait().ok().flatten();
        status.is_some()
    });
    assert_eq!(
        status.and_then(|s| s.code()),
        Some(0),
        "{}",
        echod.log_text()
    );
}

// ---------------------------------------------------------------------------------------
// SIGHUP: config reload and access log reopen.

/// Sends `signal` (e.g. "-HUP") to the process.
fn signal(child: &ChildGuard, signal: &str) {
    let sent = Command::new("kill")
        .args([signal, &child.child.id().to_string()])
        .status()
        .expect("kill");
    assert!(sent.success(), "kill {signal}");
}

#[test]
fn check_config_takes_the_file_as_its_argument() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("etc/echo.toml");
    let out = echod(&["--check-config", path_str(&path)]);
    assert_eq!(out.status.code(), Some(0), "{}", out.stderr);
    let out = echod(&["--check-config", "/nonexistent/echo.toml"]);
    assert_eq!(out.status.code(), Some(2));
    assert!(
        out.stderr.contains("/nonexistent/echo.toml"),
        "{}",
        out.stderr
    );
}

#[test]
fn sighup_applies_a_changed_config_and_refuses_an_invalid_one() {
    use crate::support::{client, OriginResponse, TestOrigin};

    let first = TestOrigin::fixed(OriginResponse::ok("first").header("Cache-Control", "no-store"));
    let second =
        TestOrigin::fixed(OriginResponse::ok("second").header("Cache-Control", "no-store"));
    let dir = TempDir::new("sighup");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let admin: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let write = |origin: &str, token: &str| {
        dir.file(
            "echo.toml",
            &format!(
                "[server]\nlisten = \"{addr}\"\nworkers = 4\n\
                 [admin]\nlisten = \"{admin}\"\ntoken = \"{token}\"\n\
                 [origin]\nurl = \"{origin}\"\n[log]\nlevel = \"info\"\n"
            ),
        )
    };
    let config = write(&first.url(), "token-one");
    let mut echod = spawn_echod(&dir, &config);
    echod.wait_listening(addr);
    echod.wait_listening(admin);
    let metrics_status = |token: &str| {
        let auth = format!("Bearer {token}");
        RawClient::connect(admin)
            .request("GET", "/metrics", &[("Authorization", &auth)], b"")
            .status
    };
    assert_eq!(client::get(addr, "/a", &[]).body_str(), "first");
    assert_eq!(metrics_status("token-one"), 200);

    // A new origin and a new token, applied by SIGHUP without a restart.
    write(&second.url(), "token-two");
    signal(&echod, "-HUP");
    wait_until("the reload applies", Duration::from_secs(10), || {
        client::get(addr, "/a", &[]).body_str() == "second"
    });
    assert_eq!(metrics_status("token-two"), 200);
    assert_eq!(metrics_status("token-one"), 401);

    // An invalid config is refused, logged, and the running one stays.
    dir.file(
        "echo.toml",
        &format!(
            "[server]\nlisten = \"{addr}\"\nworkers = 0\n[origin]\nurl = \"{}\"\n",
            first.url()
        ),
    );
    signal(&echod, "-HUP");
    wait_until("the refusal is logged", Duration::from_secs(10), || {
        echod.log_text().contains("refused")
    });
    assert!(
        echod.log_text().contains("server.workers"),
        "{}",
        echod.log_text()
    );
    assert!(echod.child.try_wait().unwrap().is_none(), "echod exited");
    assert_eq!(client::get(addr, "/a", &[]).body_str(), "second");
    assert_eq!(metrics_status("token-two"), 200);

    // A change only a restart applies is named in the log, and nothing breaks.
    write(&second.url(), "token-two");
    let text = std::fs::read_to_string(&config)
        .unwrap()
        .replace("workers = 4", "workers = 8");
    dir.file("echo.toml", &text);
    signal(&echod, "-HUP");
    wait_until(
        "the restart-only change is logged",
        Duration::from_secs(10),
        || echod.log_text().contains("need a restart"),
    );
    assert_eq!(client::get(addr, "/a", &[]).status, 200);
    // Issue 21: the warning names the key, and nothing else is said to be applied.
    let log = echod.log_text();
    assert!(
        log.contains("SIGHUP: changes to server.workers need a restart"),
        "{log}"
    );
    let last_applied = log
        .lines()
        .rev()
        .find(|l| l.contains("applied:"))
        .unwrap_or_default();
    assert!(last_applied.ends_with("applied: nothing changed"), "{log}");
}

#[test]
fn sighup_reopens_the_access_log_so_logrotate_can_move_it() {
    use crate::support::{client, OriginResponse, TestOrigin};

    let origin = TestOrigin::fixed(OriginResponse::ok("x").header("Cache-Control", "max-age=60"));
    let dir = TempDir::new("logrotate");
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
    let access = dir.0.join("access.log");
    let config = dir.file(
        "echo.toml",
        &format!(
            "[server]\nlisten = \"{addr}\"\nworkers = 4\n[origin]\nurl = \"{}\"\n\
             [log]\nlevel = \"info\"\naccess_log = \"{}\"\n",
            origin.url(),
            path_str(&access)
        ),
    );
    let mut echod = spawn_echod(&dir, &config);
    echod.wait_listening(addr);
    let lines = |path: &Path| {
        std::fs::read_to_string(path)
            .unwrap_or_default()
            .lines()
            .map(str::to_string)
            .collect::<Vec<_>>()
    };
    client::get(addr, "/one", &[]);
    client::get(addr, "/one", &[]);
    wait_until("two lines written", Duration::from_secs(10), || {
        lines(&access).len() == 2
    });
    // logrotate: rename, then SIGHUP.
    let rotated = dir.0.join("access.log.1");
    std::fs::rename(&access, &rotated).unwrap();
    signal(&echod, "-HUP");
    wait_until(
        "a new file after the reopen",
        Duration::from_secs(10),
        || {
            client::get(addr, "/two", &[]);
            !lines(&access).is_empty()
        },
    );
    // Lines of requests answered before the reopen stay in the rotated file.
    let old = lines(&rotated);
    assert!(old.len() >= 2, "{old:?}");
    // The miss and the hit, in either order: a line is queued as its exchange ends,
    // and the hit (answered on the connection thread) can end first.
    let ones: Vec<&String> = old.iter().filter(|l| l.contains("GET /one")).collect();
    assert_eq!(ones.len(), 2, "{old:?}");
    let url = origin.url();
    assert!(
        ones.iter()
            .any(|l| l.contains("\"GET /one HTTP/1.1\" 200 1 ")
                && l.ends_with(&format!(" miss {url} \"test.local\" \"-\""))),
        "{old:?}"
    );
    assert!(
        ones.iter()
            .any(|l| l.ends_with(" hit - \"test.local\" \"-\"")),
        "{old:?}"
    );
    assert!(
        old.iter()
            .all(|l| l.contains("GET /one") || l.contains("GET /two")),
        "{old:?}"
    );
    assert!(lines(&access).iter().all(|l| l.contains("GET /two")));
}

/// Issue 21: `log.level = "debug"` is Echo's decisions, not a page of HTTP-client
/// internals per request: dependencies stay at `warn` unless `log.dependencies` says
/// otherwise.
#[test]
fn debug_logs_are_echos_and_dependencies_speak_only_when_asked() {
    let origin = crate::support::TestOrigin::start(|_| {
        crate::support::OriginResponse::ok("x").header("Cache-Control", "max-age=60")
    });
    for (dependencies, ureq_lines) in [("", false), ("dependencies = \"debug\"\n", true)] {
        let dir = TempDir::new("log-levels");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = dir.file(
            "echo.toml",
            &format!(
                "[server]\nlisten = \"{addr}\"\nworkers = 2\n[origin]\nurl = \"{}\"\n\
                 [log]\nlevel = \"debug\"\n{dependencies}",
                origin.url()
            ),
        );
        let mut echod = spawn_echod(&dir, &config);
        echod.wait_listening(addr);
        let target = format!("/levels-{}", ureq_lines);
        assert_eq!(RawClient::connect(addr).get(&target, &[]).status, 200);
        let mut log = String::new();
        wait_until("the miss is logged", Duration::from_secs(5), || {
            log = echod.log_text();
            log.contains(&format!("fwd=uri-miss http://test.local{target}"))
        });
        assert_eq!(
            log.contains("Call<Prepare>"),
            ureq_lines,
            "dependencies {dependencies:?}:\n{log}"
        );
    }
}

/// Issue 21: the start says which store is in use and whether Redis answered (a Redis
/// that is not there is said too; Echo still starts and serves from the origin).
#[test]
fn the_start_says_whether_redis_answered() {
    use crate::support::redis::RedisServer;
    use crate::support::{OriginResponse, TestOrigin};

    let origin = TestOrigin::fixed(OriginResponse::ok("x"));
    let master = RedisServer::master();
    let dead = format!("redis://127.0.0.1:{}", free_port());
    for (url, says) in [
        (
            master.url(),
            format!("store: redis, 127.0.0.1:{} (master) answered", master.port),
        ),
        (dead.clone(), "not answering: [127.0.0.1:".to_string()),
    ] {
        let dir = TempDir::new("redis-start");
        let addr: SocketAddr = format!("127.0.0.1:{}", free_port()).parse().unwrap();
        let config = dir.file(
            "echo.toml",
            &format!(
                "[server]\nlisten = \"{addr}\"\nworkers = 2\n[origin]\nurl = \"{}\"\n\
                 [cache]\nstore = \"redis\"\n[redis]\nmaster = \"{url}\"\n\
                 [log]\nlevel = \"info\"\n",
                origin.url()
            ),
        );
        let mut echod = spawn_echod(&dir, &config);
        echod.wait_listening(addr);
        let mut log = String::new();
        wait_until("the store is reported", Duration::from_secs(10), || {
            log = echod.log_text();
            log.contains(&says)
        });
        assert_eq!(RawClient::connect(addr).get("/s", &[]).status, 200, "{log}");
    }
}
