//! The raw-socket origin, for tests of what Echo does with an origin that misbehaves:
//! every connection is handed to a script (a closure) that reads requests and writes
//! whatever bytes it likes — late bytes after a bodiless answer, a body cut short, a
//! reset — and the origin records every request it read (method, target, headers).
//!
//! The script runs on its own thread per connection; reads are bounded by a timeout so a
//! script waiting for a request that never comes ends instead of hanging the test.

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::{self, JoinHandle};
use std::time::Duration;

use super::{body_framing, convert_headers, find_header, BodyFraming, ChunkedDecoder};

/// How long a script's read waits for the next request bytes.
const READ_TIMEOUT: Duration = Duration::from_secs(5);

/// One request as it arrived (its body is read and dropped).
#[derive(Debug, Clone)]
pub struct RawRequest {
    pub method: String,
    pub target: String,
    /// Names lower-cased, order and repeats kept.
    pub headers: Vec<(String, String)>,
}

impl RawRequest {
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }
}

/// The script's end of one origin connection.
pub struct RawConn {
    stream: TcpStream,
    buf: Vec<u8>,
    log: Arc<Mutex<Vec<RawRequest>>>,
}

impl RawConn {
    /// Reads the next request (head and body); None when the peer closed, the read timed
    /// out or the bytes do not parse.
    pub fn read_request(&mut self) -> Option<RawRequest> {
        let (head_len, method, target, headers) = loop {
            let mut slots = [httparse::EMPTY_HEADER; 128];
            let mut req = httparse::Request::new(&mut slots);
            match req.parse(&self.buf) {
                Ok(httparse::Status::Complete(n)) => {
                    break (
                        n,
                        req.method.unwrap_or("").to_string(),
                        req.path.unwrap_or("").to_string(),
                        convert_headers(req.headers),
                    )
                }
                Ok(httparse::Status::Partial) => {}
                Err(_) => return None,
            }
            if !self.fill() {
                return None;
            }
        };
        let mut used = head_len;
        match body_framing(&headers).ok()? {
            BodyFraming::Length(n) => {
                while self.buf.len() < head_len + n {
                    if !self.fill() {
                        return None;
                    }
                }
                used += n;
            }
            BodyFraming::Chunked => {
                let mut decoder = ChunkedDecoder::new();
                loop {
                    used += decoder.feed(&self.buf[used..]).ok()?;
                    if decoder.is_done() {
                        break;
                    }
                    if !self.fill() {
                        return None;
                    }
                }
            }
            _ => {}
        }
        self.buf.drain(..used);
        let request = RawRequest {
            method,
            target,
            headers,
        };
        self.log
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(request.clone());
        Some(request)
    }

    /// Writes `bytes` as given; errors (the peer went away) are ignored.
    pub fn write(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes);
        let _ = self.stream.flush();
    }

    /// Closes the connection with a reset (SO_LINGER 0) instead of a FIN.
    pub fn reset(self) {
        let _ = rustix::net::sockopt::set_socket_linger(&self.stream, Some(Duration::ZERO));
        drop(self.stream);
    }

    /// Closes the write side (a clean FIN) and keeps reading until the peer closes, so
    /// the close is not turned into a reset by unread bytes.
    pub fn close(mut self) {
        let _ = self.stream.shutdown(Shutdown::Write);
        let mut sink = [0u8; 4096];
        while matches!(self.stream.read(&mut sink), Ok(n) if n > 0) {}
    }

    fn fill(&mut self) -> bool {
        let mut tmp = [0u8; 16 * 1024];
        loop {
            match self.stream.read(&mut tmp) {
                Ok(0) => return false,
                Ok(n) => {
                    self.buf.extend_from_slice(&tmp[..n]);
                    return true;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return false,
            }
        }
    }
}

type Script = dyn Fn(RawConn) + Send + Sync;

/// An origin whose every connection is run by a script.
pub struct RawOrigin {
    addr: SocketAddr,
    log: Arc<Mutex<Vec<RawRequest>>>,
    stop: Arc<AtomicBool>,
    accept: Option<JoinHandle<()>>,
}

impl RawOrigin {
    /// Binds 127.0.0.1:0; each accepted connection runs `script` on its own thread.
    pub fn start<F>(script: F) -> RawOrigin
    where
        F: Fn(RawConn) + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").expect("RawOrigin: bind");
        let addr = listener.local_addr().expect("RawOrigin: local_addr");
        let log = Arc::new(Mutex::new(Vec::new()));
        let stop = Arc::new(AtomicBool::new(false));
        let script: Arc<Script> = Arc::new(script);
        let accept = {
            let (log, stop) = (Arc::clone(&log), Arc::clone(&stop));
            thread::Builder::new()
                .name("raw-origin-accept".into())
                .spawn(move || {
                    for stream in listener.incoming() {
                        if stop.load(Ordering::SeqCst) {
                            return;
                        }
                        let Ok(stream) = stream else { continue };
                        let _ = stream.set_read_timeout(Some(READ_TIMEOUT));
                        let _ = stream.set_nodelay(true);
                        let conn = RawConn {
                            stream,
                            buf: Vec::new(),
                            log: Arc::clone(&log),
                        };
                        let script = Arc::clone(&script);
                        let _ = thread::Builder::new()
                            .name("raw-origin-conn".into())
                            .spawn(move || script(conn));
                    }
                })
                .expect("RawOrigin: spawn")
        };
        RawOrigin {
            addr,
            log,
            stop,
            accept: Some(accept),
        }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Every request read so far, in arrival order.
    pub fn requests(&self) -> Vec<RawRequest> {
        self.log.lock().unwrap_or_else(|e| e.into_inner()).clone()
    }

    /// Requests read for `target`.
    pub fn hits(&self, target: &str) -> usize {
        self.requests()
            .iter()
            .filter(|r| r.target == target)
            .count()
    }
}

impl Drop for RawOrigin {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::SeqCst);
        if TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).is_ok() {
            if let Some(accept) = self.accept.take() {
                let _ = accept.join();
            }
        }
    }
}
