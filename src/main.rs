//! `echod`: parses argv, sets up logging, loads the config and runs Echo. Every error
//! ends here as one line on stderr and exit code 2.
//!
//! The command line is four flags, so it is parsed by hand rather than with a crate.

use std::path::PathBuf;
use std::process::ExitCode;

use echo::config::{Config, LogConfig};

const USAGE: &str = "\
echod: an HTTP reverse proxy cache

usage:
  echod --config FILE                 run with FILE (default: etc/echo.toml)
  echod --check-config --config FILE  validate FILE and exit (0 ok, 2 error)
  echod --version
  echod --help
";

enum Command {
    Run(PathBuf),
    Check(PathBuf),
    Version,
    Help,
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
            "--check-config" => check = true,
            "--version" | "-V" => return Ok(Command::Version),
            "--help" | "-h" => return Ok(Command::Help),
            other => return Err(format!("unknown argument {other:?} (see --help)")),
        }
    }
    Ok(if check {
        Command::Check(config)
    } else {
        Command::Run(config)
    })
}

fn init_logging(cfg: &LogConfig) -> Result<(), String> {
    let log_config = simplelog::ConfigBuilder::new()
        .set_time_format_rfc3339()
        .set_thread_level(simplelog::LevelFilter::Off)
        .set_target_level(simplelog::LevelFilter::Off)
        .build();
    match &cfg.file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("cannot open log file {}: {e}", path.display()))?;
            simplelog::WriteLogger::init(cfg.level, log_config, file)
        }
        None => simplelog::TermLogger::init(
            cfg.level,
            log_config,
            simplelog::TerminalMode::Stderr,
            simplelog::ColorChoice::Never,
        ),
    }
    .map_err(|e| format!("cannot set up logging: {e}"))
}

fn run() -> Result<(), String> {
    match parse_args(std::env::args())? {
        Command::Help => print!("{USAGE}"),
        Command::Version => println!("echod {}", env!("CARGO_PKG_VERSION")),
        Command::Check(path) => {
            Config::load(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            println!("{}: ok", path.display());
        }
        Command::Run(path) => {
            let cfg = Config::load(&path).map_err(|e| format!("{}: {e}", path.display()))?;
            init_logging(&cfg.log)?;
            let echo = echo::start(&cfg).map_err(|e| e.to_string())?;
            log::info!(
                "echod {} proxying {} to {}",
                env!("CARGO_PKG_VERSION"),
                echo.proxy.local_addr(),
                cfg.origin.base_url()
            );
            echo.proxy.join();
        }
    }
    Ok(())
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(message) => {
            eprintln!("echod: {message}");
            ExitCode::from(2)
        }
    }
}
