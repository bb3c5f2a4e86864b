//! `echod`: parses argv, sets up logging, loads the config and runs Echo, or makes one
//! admin API call for `echod invalidate`. Every error ends here as one line on stderr
//! and exit code 2; an admin call the API refused exits 1 with its answer on stderr.
//!
//! The command line is a handful of flags and one subcommand, so it is parsed by hand
//! rather than with a crate.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use echo::admin::client::{self as admin_client, AdminCall, ClientError, InvalidateRequest};
use echo::config::Config;
use echo::invalidation::Mode;

const USAGE: &str = "\
echod: an HTTP reverse proxy cache

usage:
  echod --config FILE                 run with FILE (default: etc/echo.toml)
  echod --check-config [FILE]         validate FILE (or --config FILE) and exit
                                      (0 ok, 2 error)
  echod invalidate [--config FILE] (--pattern REGEX | --tag TAG) [--host HOST]
        [--mode delete|refresh|stale] [--dry-run] [--async] [--all]
                                      invalidate cached entries through the admin
                                      API named in FILE (admin.listen, admin.token);
                                      a pattern that matches every entry (^/, .)
                                      needs --all
  echod invalidate [--config FILE] --url URL [--url URL ...] [--mode ...]
        [--dry-run] [--async]         purge exactly these URLs (http://host/path?q,
                                      every Vary variant; up to 1000)
  echod invalidate [--config FILE] --status ID
                                      the report of invalidation job ID
  echod invalidate [--config FILE] --cancel ID
                                      cancel job ID (a running one stops at its
                                      next check: follow it with --status ID)
  echod inspect [--config FILE] URL  what is cached for URL (each Vary variant:
                                      age, freshness, validators, tags, size)
  echod --version
  echod --help

invalidate prints the API's JSON answer and exits 0 (200 done, 202 accepted:
poll --status ID), 1 when the API refused (its answer on stderr), 2 on usage,
config or connection errors.
";

enum Command {
    Run(PathBuf),
    Check(PathBuf),
    Admin(PathBuf, AdminCall),
    Version,
    Help,
}

/// The value after `flag`.
fn value_of(args: &mut impl Iterator<Item = String>, flag: &str) -> Result<String, String> {
    args.next().ok_or_else(|| format!("{flag} needs a value"))
}

fn parse_args(args: impl Iterator<Item = String>) -> Result<Command, String> {
    let mut config = PathBuf::from("etc/echo.toml");
    let mut check = false;
    let mut args = args.skip(1);
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-c" => {
                config = args
                    .next()
                    .map(PathBuf::from)
                    .ok_or("--config needs a file")?;
            }
            "--check-config" => {
                check = true;
                // `--check-config FILE` as well as `--check-config --config FILE`.
                if let Some(next) = args.next() {
                    if next == "--config" || next == "-c" {
                        config = args
                            .next()
                            .map(PathBuf::from)
                            .ok_or("--config needs a file")?;
                    } else if next.starts_with('-') || next == "invalidate" {
                        return Err(format!(
                            "unknown argument {next:?} after --check-config (see --help)"
                        ));
                    } else {
                        config = PathBuf::from(next);
                    }
                }
            }
            "--version" | "-V" => return Ok(Command::Version),
            "--help" | "-h" => return Ok(Command::Help),
            "invalidate" if !check => return parse_invalidate(config, args),
            "inspect" if !check => return parse_inspect(config, args),
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    Ok(if check {
        Command::Check(config)
    } else {
        Command::Run(config)
    })
}

/// The arguments after `inspect`: the URL, and maybe `--config FILE`.
fn parse_inspect(
    mut config: PathBuf,
    mut args: impl Iterator<Item = String>,
) -> Result<Command, String> {
    let mut url = None;
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-c" => config = PathBuf::from(value_of(&mut args, "--config")?),
            "--help" | "-h" => return Ok(Command::Help),
            other if other.starts_with('-') => {
                return Err(format!(
                    "unknown argument {other:?} to inspect (see --help)"
                ))
            }
            _ if url.is_some() => return Err("inspect takes one URL".into()),
            _ => url = Some(arg),
        }
    }
    let url = url.ok_or("inspect needs a URL: echod inspect http://host/path")?;
    Ok(Command::Admin(config, AdminCall::Inspect(url)))
}

/// The arguments after `invalidate`.
fn parse_invalidate(
    mut config: PathBuf,
    mut args: impl Iterator<Item = String>,
) -> Result<Command, String> {
    let mut request = InvalidateRequest::default();
    // --status ID or --cancel ID: a call on one job, which takes no other option.
    let mut on_job: Option<(&'static str, u64)> = None;
    // A flag given twice is refused: silently keeping one of two patterns could
    // invalidate something the operator did not mean.
    let once = |slot: &mut Option<String>, flag: &str, value: String| match slot {
        Some(_) => Err(format!("invalidate: {flag} given twice")),
        None => {
            *slot = Some(value);
            Ok(())
        }
    };
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--config" | "-c" => config = PathBuf::from(value_of(&mut args, "--config")?),
            "--url" => request.urls.push(value_of(&mut args, &arg)?),
            "--pattern" => once(&mut request.pattern, &arg, value_of(&mut args, &arg)?)?,
            "--tag" => once(&mut request.tag, &arg, value_of(&mut args, &arg)?)?,
            "--host" => once(&mut request.host, &arg, value_of(&mut args, &arg)?)?,
            "--mode" => {
                let mode = value_of(&mut args, "--mode")?;
                request.mode = Some(Mode::parse(&mode).ok_or_else(|| {
                    format!("invalidate: unknown --mode {mode:?}: use delete, refresh or stale")
                })?);
            }
            "--dry-run" => request.dry_run = true,
            "--async" => request.asynchronous = true,
            "--all" => request.all = true,
            "--status" | "--cancel" => {
                let flag = if arg == "--status" {
                    "--status"
                } else {
                    "--cancel"
                };
                if let Some((given, _)) = on_job {
                    return Err(if given == flag {
                        format!("invalidate: {flag} given twice")
                    } else {
                        "invalidate: --status and --cancel cannot be combined".into()
                    });
                }
                let id = value_of(&mut args, flag)?;
                let id = id.parse().map_err(|_| {
                    format!("invalidate: {flag} needs a job id (a number), got {id:?}")
                })?;
                on_job = Some((flag, id));
            }
            "--help" | "-h" => return Ok(Command::Help),
            other => {
                return Err(format!(
                    "unknown argument {other:?} to invalidate (see --help)"
                ))
            }
        }
    }
    let call = match on_job {
        Some((flag, _)) if request != InvalidateRequest::default() => {
            return Err(format!(
                "invalidate: {flag} takes no other option but --config"
            ))
        }
        Some(("--status", id)) => AdminCall::Status(id),
        Some((_, id)) => AdminCall::Cancel(id),
        None if request.pattern.is_none() && request.tag.is_none() && request.urls.is_empty() => {
            return Err(
                "invalidate needs --pattern, --tag, --url, --status or --cancel (see --help)"
                    .into(),
            )
        }
        None => AdminCall::Invalidate(request),
    };
    Ok(Command::Admin(config, call))
}

/// SIGHUP: reopens the access log (logrotate), then reloads the config. An invalid
/// config is refused and logged; the running one stays.
fn reload(echo: &mut echo::Echo, path: &Path) {
    echo.reopen_logs();
    let cfg = match Config::load(path) {
        Ok(cfg) => cfg,
        Err(e) => {
            log::error!(
                "SIGHUP: {} refused, still running the previous config: {e}",
                path.display()
            );
            return;
        }
    };
    match echo.reload(&cfg) {
        Ok(done) => {
            log::info!(
                "SIGHUP: reloaded {}; applied: {}",
                path.display(),
                if done.applied.is_empty() {
                    "nothing changed".to_string()
                } else {
                    done.applied.join(", ")
                }
            );
            if !done.need_restart.is_empty() {
                log::warn!(
                    "SIGHUP: changes to {} need a restart; they keep their running values",
                    done.need_restart.join(", ")
                );
            }
        }
        Err(e) => log::error!(
            "SIGHUP: {} refused, still running the previous config: {e}",
            path.display()
        ),
    }
}

/// Makes one admin API call and prints its answer: JSON on stdout when it succeeded,
/// the status and the answer on stderr (exit 1) when the API refused.
fn admin(path: &Path, call: &AdminCall) -> Result<ExitCode, String> {
    let cfg = Config::load(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let answer = admin_client::call(&cfg, call).map_err(|e| match e {
        ClientError::NoAdmin => format!("{}: {e}", path.display()),
        e => e.to_string(),
    })?;
    if answer.is_success() {
        println!("{}", answer.pretty());
        if let Some(warning) = answer.warning() {
            eprintln!("echod: warning: {warning}");
        }
        return Ok(ExitCode::SUCCESS);
    }
    let refused = format!(
        "echod: {} answered {} {}",
        call.describe(),
        answer.status,
        answer.reason
    );
    eprintln!("{}", refused.trim_end());
    eprintln!("{}", answer.pretty());
    Ok(ExitCode::from(1))
}

fn run() -> Result<ExitCode, String> {
    match parse_args(std::env::args())? {
        Command::Help => print!("{USAGE}"),
        Command::Version => println!("echod {}", env!("CARGO_PKG_VERSION")),
        Command::Check(path) => {
            Config::load(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            println!("{}: ok", path.display());
        }
        Command::Admin(path, call) => return admin(&path, &call),
        Command::Run(path) => {
            let cfg = Config::load(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            echo::logging::init(&cfg.log)?;
            // Registered before anything starts, so a SIGTERM is always a drain.
            let mut signals = signal_hook::iterator::Signals::new([
                signal_hook::consts::SIGTERM,
                signal_hook::consts::SIGINT,
                signal_hook::consts::SIGHUP,
            ])
            .map_err(|e| format!("cannot handle signals: {e}"))?;
            let mut echo = echo::start(&cfg).map_err(|e| e.to_string())?;
            log::info!(
                "echod {} proxying {} to {}{}",
                env!("CARGO_PKG_VERSION"),
                echo.proxy
                    .local_addrs()
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(", "),
                cfg.origin
                    .servers
                    .iter()
                    .map(|s| s.base_url())
                    .collect::<Vec<_>>()
                    .join(", "),
                match cfg.routes.len() {
                    0 => String::new(),
                    n => format!(" (and {n} route(s))"),
                }
            );
            for signal in signals.forever() {
                if signal == signal_hook::consts::SIGHUP {
                    reload(&mut echo, &path);
                    continue;
                }
                log::info!(
                    "signal {signal}: draining (grace {} ms, then up to {} ms)",
                    cfg.server.drain_grace.as_millis(),
                    cfg.server.drain_timeout.as_millis()
                );
                if echo.drain(cfg.server.drain_grace, cfg.server.drain_timeout) {
                    log::info!("drained; exiting");
                } else {
                    log::warn!("drain timeout reached with requests still in flight; exiting");
                }
                break;
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(message) => {
            eprintln!("echod: {message}");
            ExitCode::from(2)
        }
    }
}
