//! Test support for Echo's integration tests: owns the shared helpers (`wait_until`,
//! `free_port`, `TempDir`, the `Gate` that holds an origin until released) and the
//! chunked-body decoder used by both the test origin (`origin`) and the raw client
//! (`client`).
//!
//! Everything here talks over real sockets on 127.0.0.1, never sleeps as a means of
//! synchronisation (only as the poll interval of `wait_until`), and bounds every
//! blocking read with a timeout so that no test can hang forever.

pub mod admin;
pub mod client;
pub mod echo;
mod gate;
pub mod origin;
pub mod raw_origin;
pub mod redis;
pub mod redis_tls;
pub mod relay;

pub use client::RawClient;
pub use echo::EchoUnderTest;
pub use gate::{Gate, Hold};
pub use origin::{dead_origin_url, OriginRequest, OriginResponse, TestOrigin, Versioned};

use std::net::TcpListener;
use std::thread;
use std::time::{Duration, Instant};

/// A fresh directory under the system temp dir, removed on drop.
pub struct TempDir(pub std::path::PathBuf);

impl TempDir {
    pub fn new(label: &str) -> TempDir {
        static NEXT: std::sync::atomic::AtomicUsize = std::sync::atomic::AtomicUsize::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        let path =
            std::env::temp_dir().join(format!("echo-test-{}-{label}-{n}", std::process::id()));
        std::fs::create_dir_all(&path).expect("create temp dir");
        TempDir(path)
    }

    /// Writes `text` to `name` in the directory and returns its path.
    pub fn file(&self, name: &str, text: &str) -> std::path::PathBuf {
        let path = self.0.join(name);
        std::fs::write(&path, text).expect("write temp file");
        path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Default bound for every blocking read done by the support code.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(10);

/// Polls `cond` every 5 ms until it returns true or `deadline` passes; panics with
/// `what` on timeout. `cond` is always evaluated at least once, and once more at
/// the deadline, so a condition that becomes true at the last moment still passes.
pub fn wait_until(what: &str, deadline: Duration, mut cond: impl FnMut() -> bool) {
    let end = Instant::now() + deadline;
    loop {
        if cond() {
            return;
        }
        let now = Instant::now();
        if now >= end {
            panic!("timed out after {deadline:?} waiting until {what}");
        }
        thread::sleep((end - now).min(Duration::from_millis(5)));
    }
}

/// A free TCP port on 127.0.0.1 (bind :0, read port, drop). Another process may take
/// it before the caller binds it; good enough for tests on one machine.
pub fn free_port() -> u16 {
    let listener = TcpListener::bind("127.0.0.1:0").expect("free_port: bind 127.0.0.1:0");
    listener.local_addr().expect("free_port: local_addr").port()
}

/// Finds the first value of header `name` (case-insensitive) in a lower-cased list.
fn find_header<'a>(headers: &'a [(String, String)], name: &str) -> Option<&'a str> {
    headers
        .iter()
        .find(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
}

/// All values of header `name` (case-insensitive), in order.
fn find_header_all<'a>(headers: &'a [(String, String)], name: &str) -> Vec<&'a str> {
    headers
        .iter()
        .filter(|(n, _)| n.eq_ignore_ascii_case(name))
        .map(|(_, v)| v.as_str())
        .collect()
}

/// All comma-separated tokens of every value of header `name`, trimmed and lower-cased.
fn header_tokens(headers: &[(String, String)], name: &str) -> Vec<String> {
    find_header_all(headers, name)
        .into_iter()
        .flat_map(|v| v.split(','))
        .map(|t| t.trim().to_ascii_lowercase())
        .filter(|t| !t.is_empty())
        .collect()
}

/// Body framing announced by a message head (RFC 9112 §6.3, minus the no-body cases,
/// which the caller decides from the method and status).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum BodyFraming {
    Chunked,
    Length(usize),
    /// Transfer-Encoding present but not ending in chunked (request: error; response:
    /// read until close).
    OtherCoding,
    /// No Transfer-Encoding and no Content-Length.
    None,
}

/// Decides the framing from the headers: Transfer-Encoding wins over Content-Length;
/// several Content-Length values must all agree.
fn body_framing(headers: &[(String, String)]) -> Result<BodyFraming, String> {
    let te = header_tokens(headers, "transfer-encoding");
    if let Some(last) = te.last() {
        return Ok(if last == "chunked" {
            BodyFraming::Chunked
        } else {
            BodyFraming::OtherCoding
        });
    }
    let values = find_header_all(headers, "content-length");
    if values.is_empty() {
        return Ok(BodyFraming::None);
    }
    let mut length: Option<usize> = None;
    for part in values.iter().flat_map(|v| v.split(',')) {
        let part = part.trim();
        if part.is_empty() || !part.bytes().all(|b| b.is_ascii_digit()) {
            return Err(format!("malformed Content-Length {values:?}"));
        }
        let n: usize = part
            .parse()
            .map_err(|_| format!("Content-Length out of range {values:?}"))?;
        match length {
            Some(prev) if prev != n => {
                return Err(format!("conflicting Content-Length values {values:?}"))
            }
            _ => length = Some(n),
        }
    }
    Ok(BodyFraming::Length(length.unwrap_or(0)))
}

/// Converts httparse headers into (lower-cased name, lossy value) pairs.
fn convert_headers(headers: &[httparse::Header<'_>]) -> Vec<(String, String)> {
    headers
        .iter()
        .map(|h| {
            (
                h.name.to_ascii_lowercase(),
                String::from_utf8_lossy(h.value).into_owned(),
            )
        })
        .collect()
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ChunkState {
    /// Reading a chunk-size line (with optional extensions).
    Size,
    /// Reading chunk data; this many bytes remain.
    Data(usize),
    /// Expecting the CRLF that ends a chunk's data.
    DataEnd,
    /// Reading trailer lines until the empty line.
    Trailer,
    Done,
}

/// Incremental decoder for the chunked transfer coding. Strict about CRLF framing
/// (so that broken framing from the proxy shows up as an error), tolerant of chunk
/// extensions and trailer fields.
#[derive(Debug)]
struct ChunkedDecoder {
    state: ChunkState,
    line: Vec<u8>,
    body: Vec<u8>,
    trailers: Vec<(String, String)>,
}

const MAX_CHUNK_LINE: usize = 64 * 1024;

impl ChunkedDecoder {
    fn new() -> Self {
        ChunkedDecoder {
            state: ChunkState::Size,
            line: Vec::new(),
            body: Vec::new(),
            trailers: Vec::new(),
        }
    }

    fn is_done(&self) -> bool {
        self.state == ChunkState::Done
    }

    /// Consumes as much of `input` as belongs to the chunked body and returns how many
    /// bytes were consumed. Stops right after the final CRLF, leaving any following
    /// (pipelined) bytes unconsumed.
    fn feed(&mut self, input: &[u8]) -> Result<usize, String> {
        let mut pos = 0;
        while pos < input.len() && self.state != ChunkState::Done {
            match self.state {
                ChunkState::Data(remaining) => {
                    let take = remaining.min(input.len() - pos);
                    self.body.extend_from_slice(&input[pos..pos + take]);
                    pos += take;
                    self.state = if remaining == take {
                        ChunkState::DataEnd
                    } else {
                        ChunkState::Data(remaining - take)
                    };
                }
                ChunkState::DataEnd => {
                    while self.line.len() < 2 && pos < input.len() {
                        self.line.push(input[pos]);
                        pos += 1;
                    }
                    if self.line.len() == 2 {
                        if self.line != b"\r\n" {
                            return Err(format!(
                                "chunk data not followed by CRLF (got {:?} after {} body bytes)",
                                String::from_utf8_lossy(&self.line),
                                self.body.len()
                            ));
                        }
                        self.line.clear();
                        self.state = ChunkState::Size;
                    }
                }
                ChunkState::Size | ChunkState::Trailer => {
                    let rest = &input[pos..];
                    match rest.iter().position(|&b| b == b'\n') {
                        None => {
                            self.line.extend_from_slice(rest);
                            pos = input.len();
                            if self.line.len() > MAX_CHUNK_LINE {
                                return Err("chunk-size or trailer line too long".into());
                            }
                        }
                        Some(i) => {
                            self.line.extend_from_slice(&rest[..=i]);
                            pos += i + 1;
                            let line = std::mem::take(&mut self.line);
                            self.finish_line(&line)?;
                        }
                    }
                }
                ChunkState::Done => unreachable!(),
            }
        }
        Ok(pos)
    }

    /// Handles one complete line (including its LF) in the Size or Trailer state.
    fn finish_line(&mut self, line: &[u8]) -> Result<(), String> {
        let Some(content) = line.strip_suffix(b"\r\n") else {
            return Err(format!(
                "chunked line not terminated by CRLF: {:?}",
                String::from_utf8_lossy(line)
            ));
        };
        if self.state == ChunkState::Trailer {
            if content.is_empty() {
                self.state = ChunkState::Done;
                return Ok(());
            }
            let text = String::from_utf8_lossy(content);
            let Some((name, value)) = text.split_once(':') else {
                return Err(format!("malformed trailer line {text:?}"));
            };
            self.trailers
                .push((name.trim().to_ascii_lowercase(), value.trim().to_string()));
            return Ok(());
        }
        let digits = content.iter().take_while(|b| b.is_ascii_hexdigit()).count();
        let rest = &content[digits..];
        let rest_ok = rest.is_empty()
            || rest
                .iter()
                .find(|b| **b != b' ' && **b != b'\t')
                .is_some_and(|b| *b == b';');
        if digits == 0 || !rest_ok {
            return Err(format!(
                "malformed chunk-size line {:?}",
                String::from_utf8_lossy(content)
            ));
        }
        let hex = std::str::from_utf8(&content[..digits]).expect("hex digits are ASCII");
        let size = usize::from_str_radix(hex, 16)
            .map_err(|_| format!("chunk size {hex:?} out of range"))?;
        self.state = if size == 0 {
            ChunkState::Trailer
        } else {
            ChunkState::Data(size)
        };
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode_all(input: &[u8], step: usize) -> Result<(ChunkedDecoder, usize), String> {
        let mut dec = ChunkedDecoder::new();
        let mut pos = 0;
        while pos < input.len() && !dec.is_done() {
            let piece = &input[pos..(pos + step).min(input.len())];
            let n = dec.feed(piece)?;
            pos += n;
            if n < piece.len() {
                // the decoder only leaves bytes unconsumed once the body is complete
                assert!(dec.is_done());
            }
        }
        Ok((dec, pos))
    }

    #[test]
    fn chunked_decoder_handles_extensions_trailers_and_split_input() {
        let wire =
            b"5;name=val\r\nhello\r\n6 ; x\r\n world\r\n0\r\nX-Sum: 1\r\nX-B:two \r\n\r\nNEXT";
        for step in [1, 2, 3, 7, wire.len()] {
            let (dec, used) = decode_all(wire, step).unwrap();
            assert!(dec.is_done());
            assert_eq!(dec.body, b"hello world");
            assert_eq!(&wire[used..], b"NEXT", "step {step}");
            assert_eq!(
                dec.trailers,
                vec![
                    ("x-sum".to_string(), "1".to_string()),
                    ("x-b".to_string(), "two".to_string())
                ]
            );
        }
    }

    #[test]
    fn chunked_decoder_rejects_bad_framing() {
        assert!(decode_all(b"5\r\nhelloXX0\r\n\r\n", 4).is_err());
        assert!(decode_all(b"zz\r\n", 4).is_err());
        assert!(decode_all(b"5\nhello\r\n", 4).is_err());
        assert!(decode_all(b"5 x\r\n", 4).is_err());
        let (dec, _) = decode_all(b"5\r\nhel", 2).unwrap();
        assert!(!dec.is_done());
    }

    #[test]
    fn framing_rules() {
        let h = |v: &[(&str, &str)]| -> Vec<(String, String)> {
            v.iter()
                .map(|(a, b)| (a.to_string(), b.to_string()))
                .collect()
        };
        assert_eq!(
            body_framing(&h(&[("content-length", "5")])),
            Ok(BodyFraming::Length(5))
        );
        assert_eq!(
            body_framing(&h(&[("content-length", "5, 5"), ("content-length", "5")])),
            Ok(BodyFraming::Length(5))
        );
        assert!(body_framing(&h(&[("content-length", "5"), ("content-length", "6")])).is_err());
        assert!(body_framing(&h(&[("content-length", "-1")])).is_err());
        assert_eq!(
            body_framing(&h(&[
                ("transfer-encoding", "gzip, chunked"),
                ("content-length", "3")
            ])),
            Ok(BodyFraming::Chunked)
        );
        assert_eq!(
            body_framing(&h(&[("transfer-encoding", "gzip")])),
            Ok(BodyFraming::OtherCoding)
        );
        assert_eq!(body_framing(&h(&[])), Ok(BodyFraming::None));
    }
}
