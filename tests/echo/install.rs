//! `make install` and `make uninstall` as packagers and operators run them: the layout
//! under DESTDIR/PREFIX, the systemd unit written for PREFIX, an operator's config kept
//! across installs, and uninstall removing exactly what install added.
//!
//! Each test installs the debug `echod` cargo already built (`ECHOD=... NOBUILD=1`), so
//! none waits on a release build, into a fresh temp dir of its own that is removed on
//! drop: nothing is ever written outside it. Every command runs with a deadline and
//! its exit status is checked, with what it printed in the failure message.

use std::ffi::OsString;
use std::fs::File;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use echo::config::Config;

use crate::support::{wait_until, TempDir};

const ECHOD: &str = env!("CARGO_BIN_EXE_echod");
const REPO: &str = env!("CARGO_MANIFEST_DIR");
const DEFAULT_PREFIX: &str = "/opt/echo";
/// How long make or systemd-analyze may take on a loaded machine.
const EXIT_WITHIN: Duration = Duration::from_secs(60);

/// One install: a fresh temp dir (removed on drop) holding the DESTDIR tree and the
/// output of every command run against it.
struct Staging {
    /// Removed with the staging, whatever the test did.
    _temp: TempDir,
    dir: PathBuf,
    destdir: OsString,
    prefix: String,
    commands: AtomicUsize,
}

impl Staging {
    /// DESTDIR is `<temp>/dest`: the way packagers stage an install.
    fn new(label: &str, prefix: &str) -> Staging {
        let temp = TempDir::new(&format!("install-{label}"));
        let dir = temp.0.clone();
        let destdir = dir.join("dest").into_os_string();
        Staging {
            _temp: temp,
            dir,
            destdir,
            prefix: prefix.to_string(),
            commands: AtomicUsize::new(0),
        }
    }

    /// No DESTDIR, PREFIX inside the temp dir: the installed unit names files that
    /// exist, so tools that follow its paths (systemd-analyze) can check them.
    fn live(label: &str) -> Staging {
        let temp = TempDir::new(&format!("install-{label}"));
        let dir = temp.0.clone();
        let prefix = dir
            .join("echo")
            .to_str()
            .expect("temp paths are UTF-8")
            .to_string();
        Staging {
            _temp: temp,
            dir,
            destdir: OsString::new(),
            prefix,
            commands: AtomicUsize::new(0),
        }
    }

    /// `$(DESTDIR)$(PREFIX)/rel`, spelled as make spells it (concatenation: PREFIX is
    /// absolute, so `Path::join` would drop DESTDIR).
    fn path(&self, rel: &str) -> PathBuf {
        let mut path = self.destdir.clone();
        path.push(&self.prefix);
        path.push("/");
        path.push(rel);
        PathBuf::from(path)
    }

    fn read(&self, rel: &str) -> String {
        let path = self.path(rel);
        std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("read {}: {e}", path.display()))
    }

    /// `make -C <repo> <target>` for this DESTDIR and PREFIX, installing the debug echod.
    fn make(&self, target: &str) -> Finished {
        let mut destdir = OsString::from("DESTDIR=");
        destdir.push(&self.destdir);
        let mut cmd = Command::new("make");
        cmd.arg("-C")
            .arg(REPO)
            .arg("--no-print-directory")
            .arg(target)
            .arg(destdir)
            .arg(format!("PREFIX={}", self.prefix))
            .arg(format!("ECHOD={ECHOD}"))
            .arg("NOBUILD=1")
            // Under `make test` these carry the outer make's flags and jobserver.
            .env_remove("MAKEFLAGS")
            .env_remove("MFLAGS")
            .env_remove("MAKELEVEL");
        self.run(&format!("make {target}"), &mut cmd)
    }

    /// Like `make`, and fails the test unless it exits 0.
    fn make_ok(&self, target: &str) -> Finished {
        let out = self.make(target);
        out.assert_success();
        out
    }

    /// Runs `cmd` and waits, bounded, for it to exit; fails the test if it cannot start.
    fn run(&self, what: &str, cmd: &mut Command) -> Finished {
        self.try_run(what, cmd)
            .unwrap_or_else(|e| panic!("cannot start {what}: {e}"))
    }

    /// Runs `cmd` with its output in files in the temp dir (no pipe can fill up) and
    /// waits, bounded, for it to exit; `Err` when it cannot start (not installed).
    fn try_run(&self, what: &str, cmd: &mut Command) -> std::io::Result<Finished> {
        let n = self.commands.fetch_add(1, Ordering::SeqCst);
        let stdout = self.dir.join(format!("cmd-{n}.stdout"));
        let stderr = self.dir.join(format!("cmd-{n}.stderr"));
        cmd.stdin(Stdio::null())
            .stdout(File::create(&stdout).expect("stdout file"))
            .stderr(File::create(&stderr).expect("stderr file"));
        let mut child = Running(cmd.spawn()?);
        let mut status = None;
        wait_until(&format!("{what} exits"), EXIT_WITHIN, || {
            status = child.0.try_wait().ok().flatten();
            status.is_some()
        });
        let text = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
        Ok(Finished {
            what: what.to_string(),
            status: status.expect("exit status"),
            stdout: text(&stdout),
            stderr: text(&stderr),
        })
    }
}

/// A child process killed (and reaped) on drop, so a command that overruns its
/// deadline does not outlive the test.
struct Running(Child);

impl Drop for Running {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// What a finished command printed.
struct Finished {
    what: String,
    status: ExitStatus,
    stdout: String,
    stderr: String,
}

impl Finished {
    fn assert_success(&self) {
        assert!(
            self.status.success(),
            "{} failed ({})\nstdout:\n{}\nstderr:\n{}",
            self.what,
            self.status,
            self.stdout,
            self.stderr
        );
    }
}

fn assert_exists(path: &Path) {
    assert!(path.exists(), "{} is missing", path.display());
}

fn assert_gone(path: &Path) {
    assert!(!path.exists(), "{} is still there", path.display());
}

/// The unit's `Key=value` settings for `key`, in order.
fn unit_values<'a>(unit: &'a str, key: &str) -> Vec<&'a str> {
    unit.lines()
        .filter_map(|line| line.strip_prefix(key)?.strip_prefix('='))
        .collect()
}

// ---------------------------------------------------------------------------------------
// Layout.

#[test]
fn install_lays_out_bin_etc_and_log_under_destdir_and_prefix() {
    let staging = Staging::new("layout", DEFAULT_PREFIX);
    staging.make_ok("install");

    let echod = staging.path("bin/echod");
    let mode = std::fs::metadata(&echod)
        .unwrap_or_else(|e| panic!("{}: {e}", echod.display()))
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o755, "{} mode {mode:o}", echod.display());
    // Issue 21: stripped (no debug info), and still the echod given in ECHOD.
    let installed = std::fs::metadata(&echod).expect("installed echod").len();
    let built = std::fs::metadata(ECHOD).expect("built echod").len();
    assert!(
        installed < built / 2,
        "not stripped: {installed} bytes of {built}"
    );
    let version = staging.run(
        "installed echod --version",
        Command::new(&echod).arg("--version"),
    );
    version.assert_success();
    assert!(version.stdout.starts_with("echod "), "{}", version.stdout);
    // The demo config, its example token replaced by the token file.
    let config = staging.read("etc/echo.toml");
    let demo =
        std::fs::read_to_string(Path::new(REPO).join("etc/echo.toml")).expect("etc/echo.toml");
    assert_eq!(
        config,
        demo.replace(
            "token = \"change-me\"",
            "token_file = \"/opt/echo/etc/token\""
        )
    );
    assert!(
        !config.contains("change-me\"\n"),
        "the example token is installed"
    );
    // Issue 21: a random admin token, only for its owner.
    let token = staging.read("etc/token");
    assert_eq!(token.len(), 64, "{token:?}");
    assert!(token.bytes().all(|b| b.is_ascii_hexdigit()), "{token:?}");
    let token_mode = std::fs::metadata(staging.path("etc/token"))
        .expect("etc/token")
        .permissions()
        .mode();
    assert_eq!(token_mode & 0o777, 0o600, "etc/token mode {token_mode:o}");
    for packaging in ["etc/echo.sysusers.conf", "etc/echo.logrotate"] {
        assert_exists(&staging.path(packaging));
    }
    let sysusers = staging.read("etc/echo.sysusers.conf");
    assert!(
        sysusers.lines().any(|l| l.starts_with("u echo ")),
        "{sysusers}"
    );
    let logrotate = staging.read("etc/echo.logrotate");
    assert!(
        logrotate.contains("/opt/echo/log/access.log {"),
        "{logrotate}"
    );
    assert!(
        logrotate.contains("copytruncate"),
        "log.file is not reopened: {logrotate}"
    );
    // The config holds the admin token: not world-readable.
    let toml_mode = std::fs::metadata(staging.path("etc/echo.toml"))
        .expect("etc/echo.toml")
        .permissions()
        .mode();
    assert_eq!(toml_mode & 0o007, 0, "etc/echo.toml mode {toml_mode:o}");
    assert_exists(&staging.path("etc/echo.service"));
    assert!(staging.path("log").is_dir(), "log/ is not a directory");
}

#[test]
fn the_unit_runs_the_installed_echod_with_the_installed_config() {
    let staging = Staging::new("unit", DEFAULT_PREFIX);
    staging.make_ok("install");
    let unit = staging.read("etc/echo.service");

    assert_eq!(
        unit_values(&unit, "ExecStart"),
        ["/opt/echo/bin/echod --config /opt/echo/etc/echo.toml"]
    );
    assert_eq!(unit_values(&unit, "ReadWritePaths"), ["/opt/echo/log"]);
    assert_eq!(unit_values(&unit, "User"), ["echo"]);
    assert_eq!(
        unit_values(&unit, "ExecReload"),
        [
            "/opt/echo/bin/echod --check-config /opt/echo/etc/echo.toml",
            "/bin/kill -HUP $MAINPID"
        ],
        "a reload checks the config first, so an invalid one fails the reload"
    );
    assert_eq!(unit_values(&unit, "KillSignal"), ["SIGTERM"]);
    assert_eq!(unit_values(&unit, "Restart"), ["on-failure"]);
    // DESTDIR is where the files land, never part of what the service runs.
    let destdir = staging.destdir.to_str().expect("temp paths are UTF-8");
    assert!(!unit.contains(destdir), "the unit names DESTDIR:\n{unit}");
}

/// systemd sends SIGKILL after TimeoutStopSec: it must outlast echod's drain.
#[test]
fn the_unit_waits_longer_than_the_drain_timeout_before_killing() {
    let staging = Staging::live("stop");
    staging.make_ok("install");
    let unit = staging.read("etc/echo.service");
    let config = Config::load(&staging.path("etc/echo.toml")).expect("installed config");

    let stop = unit_values(&unit, "TimeoutStopSec");
    assert_eq!(stop.len(), 1, "one TimeoutStopSec (in seconds): {stop:?}");
    let stop = Duration::from_secs(stop[0].parse().expect("TimeoutStopSec in whole seconds"));
    assert!(
        stop > config.server.drain_grace + config.server.drain_timeout,
        "TimeoutStopSec {stop:?} <= server.drain_grace_ms {:?} + drain_timeout_ms {:?}",
        config.server.drain_grace,
        config.server.drain_timeout
    );
}

#[test]
fn a_custom_prefix_is_written_into_the_unit() {
    let staging = Staging::new("prefix", "/usr/local/echo");
    staging.make_ok("install");
    for rel in [
        "bin/echod",
        "etc/echo.toml",
        "etc/echo.service",
        "etc/token",
        "log",
    ] {
        assert_exists(&staging.path(rel));
    }
    let unit = staging.read("etc/echo.service");
    // Issue 21: the installed config's paths follow PREFIX too.
    let config = staging.read("etc/echo.toml");
    assert!(
        config.contains("token_file = \"/usr/local/echo/etc/token\""),
        "{config}"
    );
    assert!(
        !config.contains("/opt/echo"),
        "the config still names /opt/echo"
    );
    for packaging in ["etc/echo.sysusers.conf", "etc/echo.logrotate"] {
        assert!(
            !staging.read(packaging).contains("/opt/echo"),
            "{packaging}"
        );
    }

    assert_eq!(
        unit_values(&unit, "ExecStart"),
        ["/usr/local/echo/bin/echod --config /usr/local/echo/etc/echo.toml"]
    );
    assert_eq!(
        unit_values(&unit, "ReadWritePaths"),
        ["/usr/local/echo/log"]
    );
    assert!(
        !unit.contains("/opt/echo"),
        "the unit still names /opt/echo:\n{unit}"
    );
}

// ---------------------------------------------------------------------------------------
// Reinstall and uninstall.

#[test]
fn reinstall_keeps_an_operators_config() {
    let staging = Staging::new("reinstall", DEFAULT_PREFIX);
    staging.make_ok("install");
    let custom = "# the operator's own\n[origin]\nurl = \"http://10.0.0.7:8000\"\n";
    std::fs::write(staging.path("etc/echo.toml"), custom).expect("edit config");

    let token = staging.read("etc/token");
    let out = staging.make_ok("install");
    assert_eq!(staging.read("etc/echo.toml"), custom);
    assert_eq!(
        staging.read("etc/token"),
        token,
        "a reinstall keeps the token"
    );
    assert!(
        out.stdout.contains("keeping existing"),
        "install did not say it kept the config:\n{}",
        out.stdout
    );
    assert_exists(&staging.path("bin/echod"));
    assert_exists(&staging.path("etc/echo.service"));
}

#[test]
fn uninstall_removes_what_install_added_and_keeps_config_and_logs() {
    let staging = Staging::new("uninstall", DEFAULT_PREFIX);
    staging.make_ok("install");
    let log = staging.path("log/echo.log");
    std::fs::write(&log, "a line echod wrote\n").expect("write log");
    let config = staging.read("etc/echo.toml");

    staging.make_ok("uninstall");
    assert_gone(&staging.path("bin/echod"));
    assert_gone(&staging.path("etc/echo.service"));
    assert_gone(&staging.path("etc/echo.sysusers.conf"));
    assert_gone(&staging.path("etc/echo.logrotate"));
    assert_gone(&staging.path("bin"));
    assert_eq!(staging.read("etc/echo.toml"), config);
    assert_exists(&staging.path("etc/token"));
    assert_eq!(
        std::fs::read_to_string(&log).expect("log kept"),
        "a line echod wrote\n"
    );

    // Uninstalling again finds nothing to remove and still succeeds.
    staging.make_ok("uninstall");
}

#[test]
fn uninstall_keeps_a_bin_dir_that_holds_other_files() {
    let staging = Staging::new("bin-kept", DEFAULT_PREFIX);
    staging.make_ok("install");
    let other = staging.path("bin/operator-script");
    std::fs::write(&other, "#!/bin/sh\n").expect("write script");

    staging.make_ok("uninstall");
    assert_gone(&staging.path("bin/echod"));
    assert_exists(&other);
}

// ---------------------------------------------------------------------------------------
// What was installed works.

#[test]
fn the_installed_echod_accepts_the_installed_config() {
    // No DESTDIR: the config's token_file names the installed token.
    let staging = Staging::live("check");
    staging.make_ok("install");
    let config = staging.path("etc/echo.toml");
    let loaded = Config::load(&config).expect("installed config");
    let admin = loaded.admin.expect("[admin]");
    assert_eq!(
        admin.token,
        staging.read("etc/token"),
        "the config reads the token file"
    );

    let out = staging.run(
        "installed echod --check-config",
        Command::new(staging.path("bin/echod"))
            .arg("--check-config")
            .arg("--config")
            .arg(&config),
    );
    out.assert_success();
}

/// Issue 21: the seed's install line, `./bang.sh --prefix=/opt/echo`, is exactly `make
/// install PREFIX=...`; `--help` says so, and an unknown argument is an error.
#[test]
fn bang_sh_installs_as_make_install_does() {
    let staging = Staging::new("bang", "/srv/echo");
    let help = staging.run(
        "bang.sh --help",
        Command::new(Path::new(REPO).join("bang.sh")).arg("--help"),
    );
    help.assert_success();
    assert!(
        help.stdout.contains("make install PREFIX=DIR"),
        "{}",
        help.stdout
    );
    let bad = staging.run(
        "bang.sh --bogus",
        Command::new(Path::new(REPO).join("bang.sh")).arg("--bogus"),
    );
    assert_eq!(bad.status.code(), Some(2), "{}", bad.stderr);
    let out = staging.run(
        "bang.sh --prefix",
        Command::new(Path::new(REPO).join("bang.sh"))
            .arg("--prefix=/srv/echo")
            .env("DESTDIR", &staging.destdir)
            .env("ECHOD", ECHOD)
            .env("NOBUILD", "1")
            .env_remove("MAKEFLAGS")
            .env_remove("MFLAGS")
            .env_remove("MAKELEVEL"),
    );
    out.assert_success();
    for rel in [
        "bin/echod",
        "etc/echo.toml",
        "etc/token",
        "etc/echo.service",
        "log",
    ] {
        assert_exists(&staging.path(rel));
    }
    assert!(staging
        .read("etc/echo.service")
        .contains("/srv/echo/bin/echod"));
}

/// An extra check where the machine has systemd-analyze (the test never installs it):
/// the unit, installed under a PREFIX whose files exist, passes `systemd-analyze
/// verify` with no complaint about it (unknown keys are only warnings there).
#[test]
fn the_installed_unit_passes_systemd_analyze_verify_when_available() {
    let staging = Staging::live("verify");
    let version = staging.try_run(
        "systemd-analyze --version",
        Command::new("systemd-analyze").arg("--version"),
    );
    if !version.is_ok_and(|out| out.status.success()) {
        eprintln!("systemd-analyze not available: unit not verified");
        return;
    }
    staging.make_ok("install");

    // A unit that cannot be wrong: when even it fails, systemd-analyze cannot verify
    // anything on this machine (say, in a container without systemd).
    let control = staging.dir.join("echo-control.service");
    std::fs::write(
        &control,
        format!("[Service]\nType=oneshot\nExecStart={ECHOD} --version\n"),
    )
    .expect("write control unit");
    let out = staging.run(
        "systemd-analyze verify (control)",
        Command::new("systemd-analyze").arg("verify").arg(&control),
    );
    if !out.status.success() {
        eprintln!(
            "systemd-analyze cannot verify units here: unit not verified\n{}",
            out.stderr
        );
        return;
    }

    let unit = staging.path("etc/echo.service");
    let out = staging.run(
        "systemd-analyze verify",
        Command::new("systemd-analyze").arg("verify").arg(&unit),
    );
    out.assert_success();
    let complaints: Vec<&str> = out
        .stderr
        .lines()
        .filter(|line| line.contains("echo.service"))
        .collect();
    assert!(
        complaints.is_empty(),
        "systemd-analyze verify:\n{}",
        complaints.join("\n")
    );
}
