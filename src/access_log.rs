//! The access log (`log.access_log`): one line per answered request, written by a
//! thread of its own so no request ever waits on the disk.
//!
//! A line is
//! `2026-11-21T22:45:01.123Z 10.0.0.7 "GET /orgs/42?page=2 HTTP/1.1" 200 1234 0.000345 hit http://10.0.0.1:9000`:
//! time the request arrived (UTC), client address, request line, status, body bytes
//! sent, seconds taken, cache status, and the origin server that answered (`-` when
//! none did). Bytes a client controls are escaped (`"`, `\`, controls and non-ASCII as
//! `\xHH`), so a line is always one line and its quoted field always ends where it seems.
//!
//! Invariants: logging never blocks a request: lines go through a bounded queue, and a
//! full queue drops the line and counts it (`echo_access_log_dropped_lines_total`).
//! `reopen` (on SIGHUP) makes the writer close and reopen the path, so logrotate can
//! move the file away; lines queued before it go to the old file.

use std::fmt::Write as _;
use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::thread;
use std::time::{Duration, SystemTime};

use crossbeam_channel::{bounded, RecvTimeoutError, Sender};
use log::{error, warn};

use crate::metrics::Metrics;

/// Lines waiting for the writer; beyond it they are dropped.
const QUEUE: usize = 16 * 1024;
/// Buffered lines are written out after this long without new ones.
const FLUSH_AFTER: Duration = Duration::from_millis(200);

/// What one line says.
pub struct Record<'a> {
    pub received: SystemTime,
    pub client: IpAddr,
    pub method: &'a str,
    pub target: &'a str,
    pub version: &'a str,
    pub status: u16,
    pub bytes: u64,
    pub took: Duration,
    pub cache_status: &'a str,
    pub origin: Option<&'a str>,
    /// The request's Host (`-` when it had none).
    pub host: &'a str,
    pub user_agent: Option<&'a str>,
}

pub use crate::config::AccessFormat;

enum Message {
    Line(String),
    Reopen,
    /// Write everything queued before this, then answer.
    Flush(Sender<()>),
}

pub struct AccessLog {
    tx: Sender<Message>,
    metrics: Option<Arc<Metrics>>,
    format: AccessFormat,
}

impl AccessLog {
    /// Opens (appends to) `path` and starts the writer thread; it ends when the
    /// `AccessLog` is dropped, after writing what was queued.
    pub fn open(
        path: &Path,
        format: AccessFormat,
        metrics: Option<Arc<Metrics>>,
    ) -> io::Result<AccessLog> {
        let file = open_append(path)?;
        let (tx, rx) = bounded::<Message>(QUEUE);
        let writer_path = path.to_path_buf();
        thread::Builder::new()
            .name("echo-access-log".into())
            .spawn(move || {
                let mut out = BufWriter::with_capacity(64 * 1024, file);
                loop {
                    let message = match rx.recv_timeout(FLUSH_AFTER) {
                        Ok(m) => m,
                        Err(RecvTimeoutError::Timeout) => {
                            flush(&mut out, &writer_path);
                            continue;
                        }
                        Err(RecvTimeoutError::Disconnected) => break,
                    };
                    match message {
                        Message::Line(line) => {
                            if let Err(e) = out.write_all(line.as_bytes()) {
                                error!("access log {}: {e}", writer_path.display());
                            }
                        }
                        Message::Reopen => {
                            flush(&mut out, &writer_path);
                            match open_append(&writer_path) {
                                Ok(file) => out = BufWriter::with_capacity(64 * 1024, file),
                                Err(e) => error!(
                                    "cannot reopen the access log {}: {e}; still writing to the old file",
                                    writer_path.display()
                                ),
                            }
                        }
                        Message::Flush(done) => {
                            flush(&mut out, &writer_path);
                            let _ = done.send(());
                        }
                    }
                }
                flush(&mut out, &writer_path);
            })?;
        Ok(AccessLog {
            tx,
            metrics,
            format,
        })
    }

    /// Queues one line; drops it (and counts it) if the writer is that far behind.
    pub fn log(&self, r: &Record<'_>) {
        let line = match self.format {
            AccessFormat::Text => format_line(r),
            AccessFormat::Json => format_json(r),
        };
        if self.tx.try_send(Message::Line(line)).is_err() {
            if let Some(m) = &self.metrics {
                m.access_log_dropped.inc();
            }
        }
    }

    /// Closes and reopens the file at the path (after logrotate renamed it).
    pub fn reopen(&self) {
        if self
            .tx
            .send_timeout(Message::Reopen, Duration::from_secs(1))
            .is_err()
        {
            warn!("access log writer busy: reopen skipped");
        }
    }

    /// Waits (at most `timeout`) until every line queued so far is written out.
    pub fn flush(&self, timeout: Duration) -> bool {
        let (done, wait) = bounded(1);
        self.tx.send_timeout(Message::Flush(done), timeout).is_ok()
            && wait.recv_timeout(timeout).is_ok()
    }
}

fn open_append(path: &Path) -> io::Result<File> {
    OpenOptions::new().create(true).append(true).open(path)
}

fn flush(out: &mut BufWriter<File>, path: &Path) {
    if let Err(e) = out.flush() {
        error!("access log {}: {e}", path.display());
    }
}

/// One line, newline included.
pub fn format_line(r: &Record<'_>) -> String {
    let mut line = String::with_capacity(128 + r.target.len());
    let _ = write!(
        line,
        "{} {} \"",
        humantime::format_rfc3339_millis(r.received),
        r.client
    );
    escape_into(&mut line, r.method);
    line.push(' ');
    escape_into(&mut line, r.target);
    let _ = write!(
        line,
        " {}\" {} {} {:.6} {} {} \"",
        r.version,
        r.status,
        r.bytes,
        r.took.as_secs_f64(),
        r.cache_status,
        r.origin.unwrap_or("-")
    );
    escape_into(&mut line, r.host);
    line.push_str("\" \"");
    escape_into(&mut line, r.user_agent.unwrap_or("-"));
    line.push_str("\"\n");
    line
}

/// One JSON object, newline included (serde_json escapes what needs it).
pub fn format_json(r: &Record<'_>) -> String {
    let mut line = serde_json::json!({
        "time": humantime::format_rfc3339_millis(r.received).to_string(),
        "client": r.client.to_string(),
        "method": r.method,
        "target": r.target,
        "version": r.version,
        "status": r.status,
        "bytes": r.bytes,
        "seconds": r.took.as_secs_f64(),
        "cache": r.cache_status,
        "origin": r.origin,
        "host": r.host,
        "user_agent": r.user_agent,
    })
    .to_string();
    line.push('\n');
    line
}

/// Appends `text` with `"`, `\`, control and non-ASCII bytes as `\xHH`.
fn escape_into(out: &mut String, text: &str) {
    for b in text.bytes() {
        if b.is_ascii_graphic() && b != b'"' && b != b'\\' || b == b' ' {
            out.push(char::from(b));
        } else {
            let _ = write!(out, "\\x{b:02X}");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record<'a>(target: &'a str) -> Record<'a> {
        Record {
            received: SystemTime::UNIX_EPOCH + Duration::from_millis(1_795_000_000_123),
            client: "10.0.0.7".parse().unwrap(),
            method: "GET",
            target,
            version: "HTTP/1.1",
            status: 200,
            bytes: 1234,
            took: Duration::from_micros(345),
            cache_status: "hit",
            origin: None,
            host: "api.example",
            user_agent: Some("curl/8.5"),
        }
    }

    #[test]
    fn a_line_has_every_field_in_order() {
        assert_eq!(
            format_line(&record("/orgs/42?page=2")),
            "2026-11-18T11:06:40.123Z 10.0.0.7 \"GET /orgs/42?page=2 HTTP/1.1\" 200 1234 0.000345 hit - \"api.example\" \"curl/8.5\"\n"
        );
    }

    #[test]
    fn a_json_line_is_one_object_with_every_field() {
        let mut r = record("/a\"b\n");
        r.user_agent = None;
        let line = format_json(&r);
        assert_eq!(line.matches('\n').count(), 1, "{line}");
        let v: serde_json::Value = serde_json::from_str(&line).expect("JSON");
        assert_eq!(v["target"], "/a\"b\n");
        assert_eq!(v["host"], "api.example");
        assert_eq!(v["user_agent"], serde_json::Value::Null);
        assert_eq!(v["status"], 200);
        assert_eq!(v["cache"], "hit");
        assert_eq!(v["time"], "2026-11-18T11:06:40.123Z");
    }

    #[test]
    fn client_bytes_cannot_break_the_line_or_its_quotes() {
        let line = format_line(&record("/a\"b\\c\u{e9}\n"));
        assert!(
            line.contains("\"GET /a\\x22b\\x5Cc\\xC3\\xA9\\x0A HTTP/1.1\""),
            "{line}"
        );
        assert_eq!(line.matches('\n').count(), 1);
    }
}
