//! Echo's log: one logger for the process, whose levels apply to Echo's own modules
//! (`log.level`) and, separately, to its dependencies (`log.dependencies`, `warn` by
//! default), so `debug` shows Echo's decisions without a page of HTTP-client internals
//! per request.
//!
//! Invariants: both levels are set at start and by a reload; `log`'s global filter is
//! the more verbose of the two, and the rest is decided per record by its target (Echo's
//! modules are `echo::...`, its binaries `echod` and `demo_origin`).
//!
//! What it must not do: format anything the writer below would drop (records are
//! filtered before they reach it).

use std::sync::atomic::{AtomicUsize, Ordering};

use log::{LevelFilter, Log, Metadata, Record};

use crate::config::LogConfig;

/// `log.level`, as a `LevelFilter` index.
static OWN: AtomicUsize = AtomicUsize::new(LevelFilter::Info as usize);
/// `log.dependencies`.
static DEPENDENCIES: AtomicUsize = AtomicUsize::new(LevelFilter::Warn as usize);

fn level(index: usize) -> LevelFilter {
    LevelFilter::iter()
        .find(|l| *l as usize == index)
        .unwrap_or(LevelFilter::Info)
}

/// Is `target` one of Echo's own?
fn own(target: &str) -> bool {
    ["echo", "echod", "demo_origin"]
        .iter()
        .any(|t| target == *t || target.strip_prefix(t).is_some_and(|r| r.starts_with("::")))
}

/// The level that applies to records of `target`.
fn limit(target: &str) -> LevelFilter {
    if own(target) {
        level(OWN.load(Ordering::Relaxed))
    } else {
        level(DEPENDENCIES.load(Ordering::Relaxed))
    }
}

/// Sets both levels (at start, and on a reload).
pub fn set_levels(own: LevelFilter, dependencies: LevelFilter) {
    OWN.store(own as usize, Ordering::Relaxed);
    DEPENDENCIES.store(dependencies as usize, Ordering::Relaxed);
    log::set_max_level(own.max(dependencies));
}

/// The process's logger: the writer (stderr or `log.file`) behind the per-target levels.
struct Scoped(Box<dyn Log>);

impl Log for Scoped {
    fn enabled(&self, metadata: &Metadata<'_>) -> bool {
        metadata.level() <= limit(metadata.target()) && self.0.enabled(metadata)
    }

    fn log(&self, record: &Record<'_>) {
        if record.level() <= limit(record.target()) {
            self.0.log(record);
        }
    }

    fn flush(&self) {
        self.0.flush();
    }
}

/// Installs the logger `cfg` describes (once per process).
pub fn init(cfg: &LogConfig) -> Result<(), String> {
    let log_config = simplelog::ConfigBuilder::new()
        .set_time_format_rfc3339()
        .set_thread_level(LevelFilter::Off)
        .set_target_level(LevelFilter::Off)
        .build();
    // The writer passes everything: the levels are decided above it, so a reload can
    // change them.
    let writer: Box<dyn Log> = match &cfg.file {
        Some(path) => {
            let file = std::fs::OpenOptions::new()
                .create(true)
                .append(true)
                .open(path)
                .map_err(|e| format!("cannot open log file {}: {e}", path.display()))?;
            simplelog::WriteLogger::new(LevelFilter::Trace, log_config, file)
        }
        None => simplelog::TermLogger::new(
            LevelFilter::Trace,
            log_config,
            simplelog::TerminalMode::Stderr,
            simplelog::ColorChoice::Never,
        ),
    };
    log::set_boxed_logger(Box::new(Scoped(writer)))
        .map_err(|e| format!("cannot set up logging: {e}"))?;
    set_levels(cfg.level, cfg.dependencies);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn echos_targets_are_told_from_dependencies() {
        for t in ["echo", "echo::cache::fill", "echod", "demo_origin"] {
            assert!(own(t), "{t}");
        }
        for t in [
            "ureq",
            "ureq::unversioned::transport",
            "rustls::client",
            "echoes",
            "r2d2",
        ] {
            assert!(!own(t), "{t}");
        }
    }
}
