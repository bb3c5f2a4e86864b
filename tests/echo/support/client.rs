//! The raw HTTP/1.1 client for exact-byte tests against Echo: sends bytes exactly as
//! given on one TCP connection and parses responses itself (httparse for the head,
//! RFC 9112 §6.3 for body framing), keeping the head bytes as received.
//!
//! The client keeps its own read buffer, so pipelined responses that arrive in one read
//! are returned one by one. Every read is bounded by the read timeout (10 s default).

use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::time::{Duration, Instant};

use super::{body_framing, convert_headers, find_header, find_header_all};
use super::{BodyFraming, ChunkedDecoder, DEFAULT_TIMEOUT};

/// Host header sent by the convenience methods.
pub const TEST_HOST: &str = "test.local";

/// One response as received.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawResponse {
    pub status: u16,
    pub reason: String,
    /// HTTP/1.x minor version.
    pub version: u8,
    /// Names lower-cased; order and repeats kept.
    pub headers: Vec<(String, String)>,
    /// Decoded body (chunked decoded).
    pub body: Vec<u8>,
    /// The head bytes as received (status line through the empty line), lossy UTF-8.
    pub raw_head: String,
    /// Whether the body was chunked.
    pub chunked: bool,
    /// The body bytes as received, before chunked decoding.
    pub raw_body: Vec<u8>,
    /// Trailer fields of a chunked body (names lower-cased).
    pub trailers: Vec<(String, String)>,
}

impl RawResponse {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// All values of header `name` (case-insensitive), in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        find_header_all(&self.headers, name)
    }

    /// The body as text (lossy).
    pub fn body_str(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One TCP connection with its own read buffer.
pub struct RawClient {
    stream: TcpStream,
    buf: Vec<u8>,
    timeout: Duration,
    peer: SocketAddr,
}

/// Result of one read from the socket.
enum Read1 {
    Data,
    Eof,
}

impl RawClient {
    /// Connects (TCP_NODELAY, read and write timeouts 10 s). Panics if the connection
    /// cannot be made.
    pub fn connect(addr: SocketAddr) -> RawClient {
        let stream = TcpStream::connect_timeout(&addr, DEFAULT_TIMEOUT)
            .unwrap_or_else(|e| panic!("RawClient: connect to {addr} failed: {e}"));
        stream.set_nodelay(true).expect("RawClient: set_nodelay");
        stream
            .set_read_timeout(Some(DEFAULT_TIMEOUT))
            .expect("RawClient: set_read_timeout");
        stream
            .set_write_timeout(Some(DEFAULT_TIMEOUT))
            .expect("RawClient: set_write_timeout");
        RawClient {
            stream,
            buf: Vec::new(),
            timeout: DEFAULT_TIMEOUT,
            peer: addr,
        }
    }

    pub fn set_read_timeout(&mut self, d: Duration) {
        let d = d.max(Duration::from_millis(1));
        self.stream
            .set_read_timeout(Some(d))
            .expect("RawClient: set_read_timeout");
        self.timeout = d;
    }

    /// Writes all of `bytes`; panics if the write fails.
    pub fn send(&mut self, bytes: &[u8]) {
        self.stream
            .write_all(bytes)
            .and_then(|_| self.stream.flush())
            .unwrap_or_else(|e| panic!("RawClient: write to {} failed: {e}", self.peer));
    }

    /// Like [`send`](Self::send) but returns the error (the peer may have closed).
    pub fn try_send(&mut self, bytes: &[u8]) -> std::io::Result<()> {
        self.stream.write_all(bytes)?;
        self.stream.flush()
    }

    /// A second handle on the socket, so another thread can write while this one reads
    /// (large pipelined bursts would otherwise deadlock on full socket buffers).
    pub fn writer(&self) -> TcpStream {
        self.stream.try_clone().expect("RawClient: try_clone")
    }

    /// Half-closes the connection (no more requests); reads still work.
    pub fn shutdown_write(&mut self) {
        let _ = self.stream.shutdown(Shutdown::Write);
    }

    /// Bytes received but not yet consumed by a `read_response`.
    pub fn buffered(&self) -> &[u8] {
        &self.buf
    }

    /// One read into the buffer, bounded by the read timeout.
    fn fill(&mut self, what: &str) -> Result<Read1, String> {
        let mut tmp = [0u8; 16 * 1024];
        loop {
            match self.stream.read(&mut tmp) {
                Ok(0) => return Ok(Read1::Eof),
                Ok(n) => {
                    self.buf.extend_from_slice(&tmp[..n]);
                    return Ok(Read1::Data);
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {
                    return Err(format!(
                        "timeout: no data for {:?} while reading {what} ({} bytes buffered: {:?})",
                        self.timeout,
                        self.buf.len(),
                        String::from_utf8_lossy(&self.buf[..self.buf.len().min(200)])
                    ))
                }
                Err(e) => return Err(format!("I/O error while reading {what}: {e}")),
            }
        }
    }

    /// Reads one response; `head_request` = the request was HEAD (no body follows).
    /// Body framing by RFC 9112 §6.3: no body for HEAD/1xx/204/304, chunked,
    /// Content-Length, else until close. A 1xx interim response is returned as is
    /// (call again for the final one). Errors start with "timeout", "malformed",
    /// "EOF" or "truncated", or describe an I/O error.
    pub fn read_response(&mut self, head_request: bool) -> Result<RawResponse, String> {
        // Head.
        let (head_len, status, reason, version, headers) = loop {
            if !self.buf.is_empty() {
                let mut n_headers = 64;
                let parsed = loop {
                    let mut header_buf = vec![httparse::EMPTY_HEADER; n_headers];
                    let mut resp = httparse::Response::new(&mut header_buf);
                    match resp.parse(&self.buf) {
                        Err(httparse::Error::TooManyHeaders) if n_headers < 4096 => n_headers *= 4,
                        Ok(httparse::Status::Complete(n)) => {
                            break Ok(Some((
                                n,
                                resp.code.unwrap_or(0),
                                resp.reason.unwrap_or("").to_string(),
                                resp.version.unwrap_or(1),
                                convert_headers(resp.headers),
                            )))
                        }
                        Ok(httparse::Status::Partial) => break Ok(None),
                        Err(e) => break Err(e),
                    }
                };
                match parsed {
                    Ok(Some(head)) => break head,
                    Ok(None) => {}
                    Err(e) => {
                        return Err(format!(
                            "malformed response head ({e}): {:?}",
                            String::from_utf8_lossy(&self.buf)
                        ))
                    }
                }
            }
            match self.fill("the response head")? {
                Read1::Data => {}
                Read1::Eof if self.buf.is_empty() => {
                    return Err("EOF: connection closed before any response bytes".into())
                }
                Read1::Eof => {
                    return Err(format!(
                        "EOF before the response head was complete; got {:?}",
                        String::from_utf8_lossy(&self.buf)
                    ))
                }
            }
        };
        let raw_head = String::from_utf8_lossy(&self.buf[..head_len]).into_owned();
        self.buf.drain(..head_len);

        let mut response = RawResponse {
            status,
            reason,
            version,
            headers,
            body: Vec::new(),
            raw_head,
            chunked: false,
            raw_body: Vec::new(),
            trailers: Vec::new(),
        };

        // Body.
        if head_request || (100..200).contains(&status) || status == 204 || status == 304 {
            return Ok(response);
        }
        let framing = body_framing(&response.headers).map_err(|e| format!("malformed: {e}"))?;
        match framing {
            BodyFraming::Chunked => {
                response.chunked = true;
                let mut decoder = ChunkedDecoder::new();
                loop {
                    let used = decoder
                        .feed(&self.buf)
                        .map_err(|e| format!("malformed chunked body: {e}"))?;
                    response.raw_body.extend(self.buf.drain(..used));
                    if decoder.is_done() {
                        break;
                    }
                    match self.fill("a chunked body")? {
                        Read1::Data => {}
                        Read1::Eof => {
                            return Err(format!(
                                "truncated chunked body: EOF before the terminating chunk \
                                 ({} body bytes decoded)",
                                decoder.body.len()
                            ))
                        }
                    }
                }
                response.body = decoder.body;
                response.trailers = decoder.trailers;
            }
            BodyFraming::Length(n) => {
                while self.buf.len() < n {
                    match self.fill("a Content-Length body")? {
                        Read1::Data => {}
                        Read1::Eof => {
                            return Err(format!(
                                "truncated body: EOF after {} of {n} Content-Length bytes",
                                self.buf.len()
                            ))
                        }
                    }
                }
                response.body = self.buf.drain(..n).collect();
                response.raw_body = response.body.clone();
            }
            BodyFraming::OtherCoding | BodyFraming::None => {
                while let Read1::Data = self.fill("a close-delimited body")? {}
                response.body = std::mem::take(&mut self.buf);
                response.raw_body = response.body.clone();
            }
        }
        Ok(response)
    }

    /// Sends "GET {target} HTTP/1.1\r\nHost: test.local\r\n{extra}\r\n" and reads the
    /// response (panics on error). If `extra_headers` has a Host, the default is not sent.
    pub fn get(&mut self, target: &str, extra_headers: &[(&str, &str)]) -> RawResponse {
        self.request("GET", target, extra_headers, b"")
    }

    /// Sends a request and reads the response (panics on error). Adds `Host: test.local`
    /// unless `headers` has a Host, and `Content-Length` when the body is non-empty or
    /// the method is POST/PUT/PATCH, unless `headers` has Content-Length or
    /// Transfer-Encoding (then `body` is sent exactly as given).
    pub fn request(
        &mut self,
        method: &str,
        target: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> RawResponse {
        let bytes = build_request(method, target, headers, body);
        self.send(&bytes);
        let head = method.eq_ignore_ascii_case("HEAD");
        self.read_response(head)
            .unwrap_or_else(|e| panic!("RawClient: {method} {target} to {} failed: {e}", self.peer))
    }

    /// Sends `bytes` and reads one response (not to a HEAD), returning what went wrong
    /// instead of panicking.
    pub fn read_response_after(&mut self, bytes: &[u8]) -> Result<RawResponse, String> {
        self.try_send(bytes)
            .map_err(|e| format!("send failed: {e}"))?;
        self.read_response(false)
    }

    /// True if the peer closed the connection (EOF or reset) within `within`, with no
    /// further bytes; false if bytes arrive (they stay buffered) or the time passes.
    pub fn closed_within(&mut self, within: Duration) -> bool {
        if !self.buf.is_empty() {
            return false;
        }
        let end = Instant::now() + within;
        let mut tmp = [0u8; 4096];
        let result = loop {
            let now = Instant::now();
            if now >= end {
                break false;
            }
            let wait = (end - now).max(Duration::from_millis(1));
            if self.stream.set_read_timeout(Some(wait)).is_err() {
                break true;
            }
            match self.stream.read(&mut tmp) {
                Ok(0) => break true,
                Ok(n) => {
                    self.buf.extend_from_slice(&tmp[..n]);
                    break false;
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) if matches!(e.kind(), ErrorKind::WouldBlock | ErrorKind::TimedOut) => {}
                Err(_) => break true,
            }
        };
        let _ = self.stream.set_read_timeout(Some(self.timeout));
        result
    }

    /// Reads everything until EOF (or a reset) and returns the raw bytes, including any
    /// already buffered. Panics if no EOF comes within the read timeout of the last byte.
    pub fn read_to_close(&mut self) -> Vec<u8> {
        loop {
            match self.fill("until close") {
                Ok(Read1::Data) => {}
                Ok(Read1::Eof) => break,
                Err(e) if e.starts_with("timeout") => panic!(
                    "RawClient::read_to_close: {e}; got so far: {:?}",
                    String::from_utf8_lossy(&self.buf)
                ),
                Err(_) => break,
            }
        }
        std::mem::take(&mut self.buf)
    }
}

/// Builds the request bytes used by [`RawClient::request`].
pub fn build_request(method: &str, target: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let has = |name: &str| headers.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
    let mut out = format!("{method} {target} HTTP/1.1\r\n");
    if !has("host") {
        out.push_str(&format!("Host: {TEST_HOST}\r\n"));
    }
    for (name, value) in headers {
        out.push_str(&format!("{name}: {value}\r\n"));
    }
    let method_has_body = ["POST", "PUT", "PATCH"]
        .iter()
        .any(|m| method.eq_ignore_ascii_case(m));
    if (!body.is_empty() || method_has_body) && !has("content-length") && !has("transfer-encoding")
    {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut bytes = out.into_bytes();
    bytes.extend_from_slice(body);
    bytes
}

/// One-shot: new connection, GET target with the extra headers, read the response.
pub fn get(addr: SocketAddr, target: &str, extra_headers: &[(&str, &str)]) -> RawResponse {
    RawClient::connect(addr).get(target, extra_headers)
}
