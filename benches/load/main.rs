//! Load comparison (`harness = false`): Echo with the memory store, Echo with the Redis
//! store, nginx (`proxy_cache`) and Varnish, all in front of the same demo origin, driven
//! by wrk in one run on 127.0.0.1.
//!
//! It builds nothing: it runs the release binaries `target/release/echod` and
//! `target/release/demo-origin` (`make bench` runs `cargo build --release --bins` first)
//! and warns when a file under src/ is newer than them. It needs `wrk` (exits with a
//! message without it); nginx and varnishd are each skipped, with the command that
//! installs them, when missing or when they fail to start; Echo on Redis (and the
//! baseline on Redis) is skipped when redis-server is missing (a redis-server that does
//! not start ends the bench).
//!
//! Against a previous build: `ECHO_BENCH_BASELINE=<path to an echod>` (`make
//! bench-baseline BASE=<git ref>` builds one) runs that binary twice, as two more proxies
//! in every scenario and in the same rotation as the others:
//! - "echo (baseline)": the memory store, the same generated config as Echo memory;
//! - "echo redis (baseline)": the Redis store, the same generated config as Echo redis
//!   but on a Redis master and replica of its own (both builds use the `echo:v1:` key
//!   prefix, so on a shared pair each would serve entries the other stored).
//!
//! Both configs hold only long-standing keys, so an older echod accepts them. The report
//! then adds a "vs baseline" column (to the memory baseline) and a "vs redis baseline"
//! column, and the ratios current / baseline (req/s and p99) of Echo memory to "echo
//! (baseline)" and of Echo redis to "echo redis (baseline)", also written above the
//! chart's bars ("mem" and "redis"). A baseline named but missing, or that does not start
//! on either store, ends the bench with an error.
//!
//! Every process is started here, on free ports: the origin, Echo twice (memory; Redis
//! with its own master and one replica), the baseline twice when asked for (memory;
//! Redis with another master and replica), nginx and varnishd, each in the foreground as
//! a child with its files in one temp dir; the Redis masters and replicas are started by
//! the tests' fixture (tests/echo/support/redis.rs), each in a temp dir of its own. All are stopped (SIGTERM, then SIGKILL; Redis with SIGKILL) and
//! the temp dirs removed when the bench ends, fails, panics or gets SIGINT/SIGTERM (after
//! the wrk run under way). The temp dirs are under `TMPDIR` (default /tmp), and nginx's
//! cache files are in the lab's: `TMPDIR=/dev/shm` puts them on tmpfs.
//!
//! Scenarios, every run `wrk -t1 --latency` for `ECHO_BENCH_SECONDS` (default 5) seconds,
//! each proxy `ECHO_BENCH_ROUNDS` (default 3) times in turn: the table shows each proxy's
//! run of median req/s, and a section each Echo's req/s over nginx's round by round;
//! `ECHO_BENCH_SCENARIOS` (a comma list of the ids in brackets, or of their prefixes up to
//! a `-`: `hit` is the four hit scenarios) runs only those, all by default. For each
//! scenario the proxies run back to back (the starting one rotates, from scenario to
//! scenario and from round to round), so they share the machine's conditions. Before each hit run the object is fetched through that proxy
//! until the proxy says it is a hit.
//! - hits on `/bytes/1024` with 16, 64, 256 and 1024 connections, on `/bytes/65536` with
//!   64 [`hit-1k-16`, `hit-1k-64`, `hit-1k-256`, `hit-1k-1024`, `hit-64k-64`];
//! - misses [`miss-1`, `miss-16`]: a wrk script puts a counter in the query
//!   (`?r=<run>&n=<counter>`), so every request is a new URL; with 1 connection (pure
//!   per-request overhead) and with 16. The origin is run directly with the same script,
//!   which gives Echo's miss overhead: its p50 minus the origin's;
//! - coalesced misses [`coalesced-64`]: 64 connections, and the script changes the URL
//!   every 50 requests, so a new URL's first request is a miss and most of the rest of its
//!   batch arrive while that fetch is in flight (they wait on it: coalesced) or just after
//!   (hits);
//! - herds [`herd-64`, `herd-1024`] (`herd.rs`, not wrk): N clients, each on a connection
//!   opened beforehand, ask for one new URL of the origin's `/slow/200/...` (200 ms) at
//!   the same moment, five times; reported: the origin's fetches per herd (its own count)
//!   and each answer's time beyond the origin's 200 ms (p50, p99, max). nginx runs with
//!   `proxy_cache_lock on` (5 s), Varnish with its default waiting list;
//! - idle connections [`idle-2000`, `idle-10000`] (`idle.rs`, not wrk): N connections,
//!   each after one request, held open; reported: the proxy's threads and RSS (its child
//!   processes' included) with none and with them held.
//!
//! Output: a table (req/s, p50, p99, wrk's errors, req/s relative to nginx, to Varnish and
//! to each baseline when there is one), the ratios to the baselines, Echo's RSS (idle after start, and the peak of the
//! run, VmHWM), and the same as `target/bench/load.md` and an SVG chart
//! `target/bench/load.svg`.
//!
//! The machine this was written for has 2 cores: wrk takes about one, and the proxy under
//! test shares the other with the origin (and Redis). The numbers compare the proxies
//! with each other on one machine; they are not capacity figures.
//!
//! Files: `main.rs` (the scenarios and the run), `lab.rs` (temp dir, free ports, the
//! processes and their cleanup, signals), `peers.rs` (starting each peer with its config,
//! and what is read from them), `wrk.rs` (running wrk, reading its output), `report.rs`
//! (table, Markdown, SVG chart).

mod herd;
mod idle;
mod lab;
mod peers;
mod report;
mod scenarios;
mod wrk;

// The tests' redis-server fixture; the bench starts each master and replica with it.
#[allow(dead_code)]
#[path = "../../tests/echo/support/redis.rs"]
mod redis_fixture;

use std::fs;
use std::path::{Path, PathBuf};
use std::process::{Command, ExitCode};
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use lab::{find_tool, proc_kb, tree_cpu_seconds, version_of, Lab};
use peers::{
    echo_coalesced, logged_warnings, rss_lines, start_echo, start_nginx, start_origin, start_redis,
    start_varnish, varnish_backend_reqs, warm, Kind,
};
use report::{baseline_lines, fmt_rps, fmt_us, miss_overhead, round_lines, Report, Row, Section};
use scenarios::{Load, SCENARIOS};
use wrk::{coalesced_script, miss_script, wrk, WrkResult};

/// What every step of the bench returns: an error is a sentence for the terminal.
type Res<T> = Result<T, String>;

/// Echo's admin token in the generated configs.
const TOKEN: &str = "load-bench";
/// Requests that share a URL in the coalesced-miss scenario.
const BATCH: u64 = 50;
/// The object of the miss scenarios.
const MISS_PATH: &str = "/bytes/1024";
/// Runs of each proxy in each wrk scenario (`ECHO_BENCH_ROUNDS`): one run's req/s on this
/// machine moves by up to a fifth from one run to the next, the same build against
/// itself included, so one run decides nothing; three give a median.
const DEFAULT_ROUNDS: usize = 3;

// -----------------------------------------------------------------------------------------
// The scenarios.

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
// The run.

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
    // The proxies inherit it: the idle scenarios hold thousands of connections.
    let _ = rlimit::increase_nofile_limit(65_536);
    let seconds: u64 =
        match std::env::var("ECHO_BENCH_SECONDS") {
            Ok(v) => v.trim().parse().ok().filter(|s| *s > 0).ok_or_else(|| {
                format!("ECHO_BENCH_SECONDS must be a whole number > 0, got {v:?}")
            })?,
            Err(_) => 5,
        };
    let rounds: usize =
        match std::env::var("ECHO_BENCH_ROUNDS") {
            Ok(v) => v.trim().parse().ok().filter(|r| *r > 0).ok_or_else(|| {
                format!("ECHO_BENCH_ROUNDS must be a whole number > 0, got {v:?}")
            })?,
            Err(_) => DEFAULT_ROUNDS,
        };
    let selected = selected_scenarios()?;
    // An echod to compare with (an older build), run like Echo memory and like Echo redis;
    // empty is unset.
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
    let stop = lab::stop_on_signals()?;

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

    let mut lab = Lab::new()?;
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
            let (master, replica) = start_redis(&mut lab);
            versions.push(version_of(bin, &["--version"]));
            targets.push(start_echo(
                &mut lab,
                &echod,
                Kind::EchoRedis,
                origin_port,
                Some((master, replica)),
            )?);
            if let Some(base) = &baseline {
                // A master and replica of its own: the builds share the key prefix.
                let pair = start_redis(&mut lab);
                let t = start_echo(
                    &mut lab,
                    base,
                    Kind::EchoRedisBaseline,
                    origin_port,
                    Some(pair),
                )
                .map_err(|e| format!("the baseline did not start on the Redis store: {e}"))?;
                targets.push(t);
            }
        }
        None => {
            let skipped = if baseline.is_some() {
                "echo (redis) and echo redis (baseline)"
            } else {
                "echo (redis)"
            };
            notes.push(format!(
                "{skipped} skipped: redis-server not found (`apt-get install redis-server`)"
            ));
        }
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
        .filter(|&&i| !matches!(SCENARIOS[i].load, Load::Herd(_) | Load::Idle(_)))
        .map(|&i| (proxies + usize::from(SCENARIOS[i].with_origin)) * rounds)
        .sum();
    println!(
        "load bench: {} proxies in front of one demo origin, {} of {} scenarios, {runs} wrk \
         runs of {seconds} s (wrk -t1; {rounds} rounds each), {} cores",
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
    let mut herds: Vec<String> = Vec::new();
    let mut idles: Vec<String> = Vec::new();
    let origin_port = targets
        .iter()
        .find(|t| t.kind == Kind::Origin)
        .map(|t| t.port)
        .ok_or("no origin")?;
    for (nth, &i) in selected.iter().enumerate() {
        let s = &SCENARIOS[i];
        let mut order: Vec<usize> = (0..targets.len())
            .filter(|&k| s.with_origin || targets[k].kind != Kind::Origin)
            .collect();
        // Rotate who goes first, so no proxy always runs right after the same one.
        let len = order.len();
        order.rotate_left(nth % len);
        println!("\n{} ({} connections) [{}]", s.name, s.connections, s.id);
        // Herds and idle connections measure their own rounds; wrk runs are repeated.
        let rounds_here = match s.load {
            Load::Herd(_) | Load::Idle(_) => 1,
            _ => rounds,
        };
        let mut runs_of: Vec<Vec<Res<WrkResult>>> = targets.iter().map(|_| Vec::new()).collect();
        for round in 0..rounds_here {
            if rounds_here > 1 {
                println!("  round {} of {rounds_here}", round + 1);
            }
            for &k in &order {
                if stop.load(Ordering::Relaxed) {
                    return Err("interrupted".into());
                }
                let t = &targets[k];
                if t.dead {
                    continue;
                }
                run_id += 1;
                let run = format!("r{run_id}");
                if let Load::Herd(n) = s.load {
                    match herd::run(t.port, origin_port, n, &run) {
                        Ok(h) => {
                            let line = h.line(t.kind.name(), n);
                            println!("  {line}");
                            herds.push(line);
                        }
                        Err(e) => {
                            println!("  {:<21} failed: {e}", t.kind.name());
                            notes.push(format!("{} / {}: {e}", s.name, t.kind.name()));
                        }
                    }
                    std::thread::sleep(Duration::from_millis(300));
                    continue;
                }
                if let Load::Idle(n) = s.load {
                    let line = match idle::run(t.pid, t.port, n, "/bytes/1024") {
                        Ok(r) => r.line(t.kind.name(), n),
                        Err(e) => format!("{:<21} failed: {e}", t.kind.name()),
                    };
                    println!("  {line}");
                    idles.push(line);
                    continue;
                }
                let mut before = None;
                let result = match s.load {
                    Load::Hit(path) => warm(t, path).and_then(|()| {
                        // The server's CPU per request: what a load generator that saturates
                        // a core of this machine cannot show in req/s.
                        let cpu_before = tree_cpu_seconds(t.pid);
                        let mut w = wrk(t.port, path, s.connections, seconds, None)?;
                        w.cpu_us_per_req = cpu_before
                            .zip(tree_cpu_seconds(t.pid))
                            .filter(|_| w.requests > 0)
                            .map(|(a, b)| (b - a) * 1e6 / w.requests as f64);
                        Ok(w)
                    }),
                    Load::Miss => miss_script(lab.dir(), &run)
                        .and_then(|script| wrk(t.port, "/", s.connections, seconds, Some(&script))),
                    Load::Herd(_) | Load::Idle(_) => unreachable!("herds and idles are run above"),
                    Load::Coalesced => coalesced_script(lab.dir(), &run).and_then(|script| {
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
                            "  {:<21} {:>9} req/s  p50 {:>9}  p99 {:>9}  errors {}{}",
                            t.kind.name(),
                            fmt_rps(w.rps),
                            fmt_us(w.p50_us),
                            fmt_us(w.p99_us),
                            w.errors,
                            w.cpu_us_per_req
                                .map(|c| format!("  server CPU {c:.1} µs/req"))
                                .unwrap_or_default()
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
                    Err(e) => println!("  {:<21} failed: {e}", t.kind.name()),
                }
                if let Err(e) = &result {
                    notes.push(format!("{} / {}: {e}", s.name, t.kind.name()));
                }
                runs_of[k].push(result);
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
            // The next round starts with the next proxy.
            order.rotate_left(1);
        }
        for &k in &order {
            let runs = std::mem::take(&mut runs_of[k]);
            if !runs.is_empty() {
                rows.push(Row::of_rounds(i, targets[k].kind, runs));
            }
        }
    }

    let rss = rss_lines(&targets);
    let overhead = miss_overhead(&rows);
    notes.extend(logged_warnings(&lab));
    let memory_vs_baseline = baseline_lines(&rows, Kind::EchoMemory);
    let redis_vs_baseline = baseline_lines(&rows, Kind::EchoRedis);
    let by_round = round_lines(&rows);
    let sections: [Section<'_>; 8] = [
        (
            format!(
                "Rounds ({rounds} per scenario; the table shows each proxy's run of median \
                 req/s): each Echo's req/s over nginx's in the same round:"
            ),
            &by_round,
        ),
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
            format!(
                "Herds (N clients ask for one new URL at once, the origin takes {} ms; \
                 fetches per herd over the rounds, and each answer's time beyond the \
                 origin's delay):",
                herd::ORIGIN_DELAY.as_millis()
            ),
            &herds,
        ),
        (
            "Idle keep-alive connections (each after one request; the proxy's threads and \
             RSS, its children's included, with none and with them held):"
                .into(),
            &idles,
        ),
        (
            "Echo memory against the baseline on the memory store (echo (memory) / echo \
             (baseline): req/s above 1 and p99 below 1 favour the current build; compare \
             within one run):"
                .into(),
            &memory_vs_baseline,
        ),
        (
            "Echo redis against the baseline on the Redis store, each on its own master and \
             replica (echo (redis) / echo redis (baseline): req/s above 1 and p99 below 1 \
             favour the current build; compare within one run):"
                .into(),
            &redis_vs_baseline,
        ),
        ("Echo's memory use:".into(), &rss),
    ];
    let report = Report {
        rows: &rows,
        sections: &sections,
        notes: &notes,
    };
    report.print();
    let out_dir = release
        .parent()
        .map(|t| t.join("bench"))
        .ok_or("no target dir")?;
    let (md_path, svg_path) =
        report.write_files(&out_dir, seconds, &versions, baseline.is_some())?;
    println!("\nwrote {} and {}", md_path.display(), svg_path.display());
    Ok(())
}
