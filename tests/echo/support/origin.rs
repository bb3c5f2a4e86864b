//! The programmable test origin: a real HTTP/1.1 server on 127.0.0.1 whose responses
//! come from a closure, and which records (and counts) every request it receives so
//! tests can assert how often Echo went to the origin.
//!
//! One background thread accepts; each connection gets its own thread, which serves
//! keep-alive and pipelined requests in order. Requests are parsed with httparse;
//! Content-Length and chunked request bodies are decoded before the request is
//! recorded and handed to the handler.

use std::collections::HashMap;
use std::io::{ErrorKind, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::{self, JoinHandle};
use std::time::{Duration, Instant};

use super::{body_framing, convert_headers, find_header, find_header_all, header_tokens};
use super::{BodyFraming, ChunkedDecoder};

/// How often a connection thread wakes from a blocking read to check for shutdown.
const POLL: Duration = Duration::from_millis(50);
/// How long a closing connection keeps draining the peer's bytes after its last write
/// (so the kernel does not answer unread data with a reset that destroys the response).
const LINGER: Duration = Duration::from_secs(2);
/// Largest request head the origin accepts.
const MAX_HEAD: usize = 256 * 1024;
/// Chunk size used when sending a chunked response body.
const CHUNK: usize = 4096;

/// One request as the origin received it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginRequest {
    pub method: String,
    /// Request-target as received, e.g. "/a?b=1".
    pub target: String,
    /// HTTP/1.x minor version: 0 or 1.
    pub version: u8,
    /// Names lower-cased; order and repeats kept.
    pub headers: Vec<(String, String)>,
    /// Decoded body (Content-Length or chunked).
    pub body: Vec<u8>,
}

impl OriginRequest {
    /// First value of header `name` (case-insensitive).
    pub fn header(&self, name: &str) -> Option<&str> {
        find_header(&self.headers, name)
    }

    /// All values of header `name` (case-insensitive), in order.
    pub fn header_all(&self, name: &str) -> Vec<&str> {
        find_header_all(&self.headers, name)
    }

    /// The target without its query.
    pub fn path(&self) -> &str {
        self.target.split('?').next().unwrap_or("")
    }
}

/// How the origin frames a response body.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Framing {
    /// `Content-Length: <len>` (added unless the handler set Content-Length or
    /// Transfer-Encoding itself).
    #[default]
    ContentLength,
    /// `Transfer-Encoding: chunked` (added unless the handler set Transfer-Encoding or
    /// Content-Length itself); body sent in chunks of at most 4096 bytes.
    Chunked,
    /// No length at all; the origin closes the connection after the body.
    Close,
}

/// What the origin sends back. Build with [`OriginResponse::ok`] or
/// [`OriginResponse::status`] and the builder methods.
///
/// Framing headers: the origin adds `Content-Length` / `Transfer-Encoding: chunked`
/// according to `framing`, unless `headers` already contain a `Content-Length` or
/// `Transfer-Encoding` (then the head is sent exactly as given, which lets tests send
/// deliberately wrong framing). Nothing is added for 1xx, 204 and 304. With `Chunked`
/// the origin chunk-encodes `body` itself unless the handler set a Content-Length and no
/// Transfer-Encoding; otherwise `body` is sent as given. `Connection: close` is added
/// when `close` is set or the client asked to close (unless already present). `Date` is
/// never added. HEAD requests and 1xx/204/304 get the head only.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OriginResponse {
    pub status: u16,
    /// Sent exactly as given (case kept); repeats allowed.
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
    pub framing: Framing,
    /// Wait before sending the head (cut short if the origin is dropped).
    pub delay: Duration,
    /// Send the head for the full body, then only this many body bytes, then close.
    pub truncate_after: Option<usize>,
    /// Add "Connection: close" and close after the response.
    pub close: bool,
}

impl Default for OriginResponse {
    fn default() -> Self {
        OriginResponse::status(200)
    }
}

impl OriginResponse {
    /// 200 with `body`.
    pub fn ok(body: impl Into<Vec<u8>>) -> Self {
        OriginResponse::status(200).body(body)
    }

    /// `code` with an empty body.
    pub fn status(code: u16) -> Self {
        OriginResponse {
            status: code,
            headers: Vec::new(),
            body: Vec::new(),
            framing: Framing::ContentLength,
            delay: Duration::ZERO,
            truncate_after: None,
            close: false,
        }
    }

    pub fn with_status(mut self, code: u16) -> Self {
        self.status = code;
        self
    }

    /// Appends a header (repeats allowed, case kept).
    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    pub fn body(mut self, body: impl Into<Vec<u8>>) -> Self {
        self.body = body.into();
        self
    }

    pub fn chunked(mut self) -> Self {
        self.framing = Framing::Chunked;
        self
    }

    pub fn close_delimited(mut self) -> Self {
        self.framing = Framing::Close;
        self
    }

    pub fn delay(mut self, d: Duration) -> Self {
        self.delay = d;
        self
    }

    pub fn truncate_after(mut self, n: usize) -> Self {
        self.truncate_after = Some(n);
        self
    }

    /// Sets `close`: "Connection: close" is added and the connection closed afterwards.
    pub fn close(mut self) -> Self {
        self.close = true;
        self
    }
}

type Handler = dyn Fn(&OriginRequest) -> OriginResponse + Send + Sync;

struct Shared {
    handler: Box<Handler>,
    requests: Mutex<Vec<OriginRequest>>,
    connections: AtomicUsize,
    panics: Mutex<Vec<String>>,
    stop: AtomicBool,
    /// Clones of the open connections, so Drop / `drop_connections` can shut them.
    live: Mutex<HashMap<usize, TcpStream>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A programmable HTTP/1.1 origin on 127.0.0.1 that counts its hits.
pub struct TestOrigin {
    addr: SocketAddr,
    shared: Arc<Shared>,
    accept_thread: Option<JoinHandle<()>>,
}

impl TestOrigin {
    /// Binds 127.0.0.1:0, accepts on a background thread, one thread per connection,
    /// keep-alive and pipelined requests handled in order. The handler sees each
    /// request and returns the response. A panic in the handler is answered with a 500
    /// (and the connection closed) and re-raised when the origin is dropped.
    pub fn start<F>(handler: F) -> TestOrigin
    where
        F: Fn(&OriginRequest) -> OriginResponse + Send + Sync + 'static,
    {
        let listener = TcpListener::bind("127.0.0.1:0").expect("TestOrigin: bind 127.0.0.1:0");
        let addr = listener.local_addr().expect("TestOrigin: local_addr");
        let shared = Arc::new(Shared {
            handler: Box::new(handler),
            requests: Mutex::new(Vec::new()),
            connections: AtomicUsize::new(0),
            panics: Mutex::new(Vec::new()),
            stop: AtomicBool::new(false),
            live: Mutex::new(HashMap::new()),
        });
        let accept_shared = Arc::clone(&shared);
        let accept_thread = thread::Builder::new()
            .name(format!("test-origin-accept-{}", addr.port()))
            .spawn(move || accept_loop(listener, accept_shared))
            .expect("TestOrigin: spawn accept thread");
        TestOrigin {
            addr,
            shared,
            accept_thread: Some(accept_thread),
        }
    }

    /// An origin that answers every request with a clone of `response`.
    pub fn fixed(response: OriginResponse) -> TestOrigin {
        TestOrigin::start(move |_| response.clone())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// "http://127.0.0.1:PORT"
    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    /// Requests whose target equals `target` exactly.
    pub fn hits(&self, target: &str) -> usize {
        lock(&self.shared.requests)
            .iter()
            .filter(|r| r.target == target)
            .count()
    }

    pub fn total_hits(&self) -> usize {
        lock(&self.shared.requests).len()
    }

    /// All requests, in arrival order.
    pub fn requests(&self) -> Vec<OriginRequest> {
        lock(&self.shared.requests).clone()
    }

    pub fn last_request(&self) -> Option<OriginRequest> {
        lock(&self.shared.requests).last().cloned()
    }

    /// TCP connections accepted so far.
    pub fn connections(&self) -> usize {
        self.shared.connections.load(Ordering::SeqCst)
    }

    /// Connections currently open.
    pub fn open_connections(&self) -> usize {
        lock(&self.shared.live).len()
    }

    /// Closes every open connection (both directions) while still accepting new ones:
    /// simulates an origin dropping its idle keep-alive connections.
    pub fn drop_connections(&self) {
        for stream in lock(&self.shared.live).values() {
            let _ = stream.shutdown(Shutdown::Both);
        }
    }
}

impl Drop for TestOrigin {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::SeqCst);
        // Wake the accept thread; if the wake-up connection fails, leave the thread be
        // rather than risk blocking in join.
        let woke = TcpStream::connect_timeout(&self.addr, Duration::from_secs(1)).is_ok();
        if let Some(handle) = self.accept_thread.take() {
            if woke {
                let _ = handle.join();
            }
        }
        self.drop_connections();
        let panics = lock(&self.shared.panics).clone();
        if !panics.is_empty() && !thread::panicking() {
            panic!(
                "TestOrigin handler panicked {} time(s); first: {}",
                panics.len(),
                panics[0]
            );
        }
    }
}

/// A URL on 127.0.0.1 whose port refuses connections.
pub fn dead_origin_url() -> String {
    format!("http://127.0.0.1:{}", super::free_port())
}

fn accept_loop(listener: TcpListener, shared: Arc<Shared>) {
    let mut next_id = 0usize;
    for stream in listener.incoming() {
        if shared.stop.load(Ordering::SeqCst) {
            break;
        }
        let Ok(stream) = stream else { continue };
        shared.connections.fetch_add(1, Ordering::SeqCst);
        let id = next_id;
        next_id += 1;
        if let Ok(clone) = stream.try_clone() {
            lock(&shared.live).insert(id, clone);
        }
        let conn_shared = Arc::clone(&shared);
        let spawned = thread::Builder::new()
            .name(format!("test-origin-conn-{id}"))
            .spawn(move || {
                serve_connection(stream, &conn_shared);
                lock(&conn_shared.live).remove(&id);
            });
        if spawned.is_err() {
            lock(&shared.live).remove(&id);
        }
    }
}

/// Outcome of trying to read more bytes.
enum Fill {
    Data,
    Eof,
    /// Stop flag set or socket error: give up on this connection.
    Gone,
}

struct Conn<'a> {
    stream: TcpStream,
    buf: Vec<u8>,
    shared: &'a Shared,
}

impl Conn<'_> {
    fn fill(&mut self) -> Fill {
        let mut tmp = [0u8; 16 * 1024];
        loop {
            if self.shared.stop.load(Ordering::SeqCst) {
                return Fill::Gone;
            }
            match self.stream.read(&mut tmp) {
                Ok(0) => return Fill::Eof,
                Ok(n) => {
                    self.buf.extend_from_slice(&tmp[..n]);
                    return Fill::Data;
                }
                Err(e)
                    if matches!(
                        e.kind(),
                        ErrorKind::WouldBlock | ErrorKind::TimedOut | ErrorKind::Interrupted
                    ) => {}
                Err(_) => return Fill::Gone,
            }
        }
    }

    /// Shuts our side, then drains the peer's bytes until EOF or LINGER passes so the
    /// response is not destroyed by a reset.
    fn close_gracefully(&mut self) {
        let _ = self.stream.flush();
        let _ = self.stream.shutdown(Shutdown::Write);
        let end = Instant::now() + LINGER;
        self.buf.clear();
        while Instant::now() < end {
            match self.fill() {
                Fill::Data => self.buf.clear(),
                Fill::Eof | Fill::Gone => break,
            }
        }
    }

    fn write(&mut self, bytes: &[u8]) -> bool {
        self.stream.write_all(bytes).is_ok()
    }
}

enum ReadOutcome {
    Request(OriginRequest),
    /// Clean EOF between requests, or shutdown.
    Done,
    /// Unparseable request: answer 400 and close.
    Bad(String),
}

fn serve_connection(stream: TcpStream, shared: &Shared) {
    let _ = stream.set_nodelay(true);
    if stream.set_read_timeout(Some(POLL)).is_err() {
        return;
    }
    let _ = stream.set_write_timeout(Some(super::DEFAULT_TIMEOUT));
    let mut conn = Conn {
        stream,
        buf: Vec::new(),
        shared,
    };
    loop {
        let request = match read_request(&mut conn) {
            ReadOutcome::Request(r) => r,
            ReadOutcome::Done => return,
            ReadOutcome::Bad(why) => {
                let body = format!("test origin: bad request: {why}\n");
                let head = format!(
                    "HTTP/1.1 400 Bad Request\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                    body.len()
                );
                conn.write(head.as_bytes());
                conn.write(body.as_bytes());
                conn.close_gracefully();
                return;
            }
        };
        lock(&shared.requests).push(request.clone());

        let response = match catch_unwind(AssertUnwindSafe(|| (shared.handler)(&request))) {
            Ok(r) => r,
            Err(payload) => {
                let msg = payload
                    .downcast_ref::<&str>()
                    .map(|s| s.to_string())
                    .or_else(|| payload.downcast_ref::<String>().cloned())
                    .unwrap_or_else(|| "<non-string panic>".to_string());
                lock(&shared.panics).push(msg.clone());
                OriginResponse::status(500)
                    .body(format!("test origin handler panicked: {msg}\n"))
                    .close()
            }
        };

        let client_close = client_wants_close(&request);
        if !send_response(&mut conn, &request, &response, client_close) {
            return;
        }
        let keep_alive = !client_close
            && !response.close
            && response.truncate_after.is_none()
            && response.framing != Framing::Close;
        if !keep_alive {
            conn.close_gracefully();
            return;
        }
    }
}

fn client_wants_close(request: &OriginRequest) -> bool {
    let tokens = header_tokens(&request.headers, "connection");
    if tokens.iter().any(|t| t == "close") {
        return true;
    }
    request.version == 0 && !tokens.iter().any(|t| t == "keep-alive")
}

fn read_request(conn: &mut Conn<'_>) -> ReadOutcome {
    // Head.
    let (head_len, mut request) = loop {
        if !conn.buf.is_empty() {
            let mut n_headers = 64;
            let parsed = loop {
                let mut header_buf = vec![httparse::EMPTY_HEADER; n_headers];
                let mut req = httparse::Request::new(&mut header_buf);
                match req.parse(&conn.buf) {
                    Err(httparse::Error::TooManyHeaders) if n_headers < 4096 => n_headers *= 4,
                    Ok(httparse::Status::Complete(n)) => {
                        break Ok(Some((
                            n,
                            OriginRequest {
                                method: req.method.unwrap_or("").to_string(),
                                target: req.path.unwrap_or("").to_string(),
                                version: req.version.unwrap_or(1),
                                headers: convert_headers(req.headers),
                                body: Vec::new(),
                            },
                        )))
                    }
                    Ok(httparse::Status::Partial) => break Ok(None),
                    Err(e) => break Err(e),
                }
            };
            match parsed {
                Ok(Some(done)) => break done,
                Ok(None) => {}
                Err(e) => return ReadOutcome::Bad(format!("unparseable request head: {e}")),
            }
            if conn.buf.len() > MAX_HEAD {
                return ReadOutcome::Bad("request head too large".into());
            }
        }
        match conn.fill() {
            Fill::Data => {}
            Fill::Eof if conn.buf.is_empty() => return ReadOutcome::Done,
            Fill::Eof => return ReadOutcome::Bad("EOF inside request head".into()),
            Fill::Gone => return ReadOutcome::Done,
        }
    };
    conn.buf.drain(..head_len);

    // Body.
    let framing = match body_framing(&request.headers) {
        Ok(f) => f,
        Err(e) => return ReadOutcome::Bad(e),
    };
    let expects_body = matches!(framing, BodyFraming::Chunked)
        || matches!(framing, BodyFraming::Length(n) if n > 0);
    let wants_continue = request.version == 1
        && find_header(&request.headers, "expect")
            .is_some_and(|v| v.eq_ignore_ascii_case("100-continue"));
    if expects_body && wants_continue && conn.buf.is_empty() {
        conn.write(b"HTTP/1.1 100 Continue\r\n\r\n");
    }
    match framing {
        BodyFraming::None => {}
        BodyFraming::OtherCoding => {
            return ReadOutcome::Bad("request Transfer-Encoding does not end in chunked".into())
        }
        BodyFraming::Length(n) => {
            while conn.buf.len() < n {
                match conn.fill() {
                    Fill::Data => {}
                    Fill::Eof => {
                        return ReadOutcome::Bad(format!(
                            "EOF after {} of {n} request body bytes",
                            conn.buf.len()
                        ))
                    }
                    Fill::Gone => return ReadOutcome::Done,
                }
            }
            request.body = conn.buf.drain(..n).collect();
        }
        BodyFraming::Chunked => {
            let mut decoder = ChunkedDecoder::new();
            loop {
                match decoder.feed(&conn.buf) {
                    Ok(used) => {
                        conn.buf.drain(..used);
                    }
                    Err(e) => return ReadOutcome::Bad(format!("bad chunked request body: {e}")),
                }
                if decoder.is_done() {
                    break;
                }
                match conn.fill() {
                    Fill::Data => {}
                    Fill::Eof => return ReadOutcome::Bad("EOF inside chunked request body".into()),
                    Fill::Gone => return ReadOutcome::Done,
                }
            }
            request.body = decoder.body;
        }
    }
    ReadOutcome::Request(request)
}

/// Writes the response; returns false if the connection is gone.
fn send_response(
    conn: &mut Conn<'_>,
    request: &OriginRequest,
    response: &OriginResponse,
    client_close: bool,
) -> bool {
    // Programmed delay, cut short if the origin is dropped.
    let end = Instant::now() + response.delay;
    loop {
        if conn.shared.stop.load(Ordering::SeqCst) {
            return false;
        }
        let now = Instant::now();
        if now >= end {
            break;
        }
        thread::sleep((end - now).min(Duration::from_millis(20)));
    }

    let status = response.status;
    let bodiless_status = (100..200).contains(&status) || status == 204 || status == 304;
    let is_head = request.method.eq_ignore_ascii_case("HEAD");
    let user_framing = response.headers.iter().any(|(n, _)| {
        n.eq_ignore_ascii_case("content-length") || n.eq_ignore_ascii_case("transfer-encoding")
    });

    let mut out = format!("HTTP/1.1 {} {}\r\n", status, reason(status)).into_bytes();
    for (name, value) in &response.headers {
        out.extend_from_slice(format!("{name}: {value}\r\n").as_bytes());
    }
    if !bodiless_status && !user_framing {
        match response.framing {
            Framing::ContentLength => out.extend_from_slice(
                format!("Content-Length: {}\r\n", response.body.len()).as_bytes(),
            ),
            Framing::Chunked => out.extend_from_slice(b"Transfer-Encoding: chunked\r\n"),
            Framing::Close => {}
        }
    }
    let user_close = header_tokens(&response.headers, "connection")
        .iter()
        .any(|t| t == "close");
    if (response.close || client_close) && !user_close {
        out.extend_from_slice(b"Connection: close\r\n");
    }
    out.extend_from_slice(b"\r\n");

    if !bodiless_status && !is_head {
        let limit = response.truncate_after.unwrap_or(usize::MAX);
        let body = &response.body[..response.body.len().min(limit)];
        if response.framing == Framing::Chunked && !user_framing_is_plain(response) {
            // Chunked: whole chunks for the full body, cut after `limit` payload bytes;
            // the terminating chunk only when not truncating.
            let mut sent = 0;
            for chunk in response.body.chunks(CHUNK) {
                if sent >= body.len() {
                    break;
                }
                out.extend_from_slice(format!("{:x}\r\n", chunk.len()).as_bytes());
                let take = chunk.len().min(body.len() - sent);
                out.extend_from_slice(&chunk[..take]);
                sent += take;
                if take == chunk.len() {
                    out.extend_from_slice(b"\r\n");
                }
            }
            if response.truncate_after.is_none() {
                out.extend_from_slice(b"0\r\n\r\n");
            }
        } else {
            out.extend_from_slice(body);
        }
    }
    conn.write(&out)
}

/// True when the handler supplied its own Content-Length (and no Transfer-Encoding):
/// then a `Chunked` framing request is ignored and the body is sent as-is.
fn user_framing_is_plain(response: &OriginResponse) -> bool {
    let has = |name: &str| {
        response
            .headers
            .iter()
            .any(|(n, _)| n.eq_ignore_ascii_case(name))
    };
    has("content-length") && !has("transfer-encoding")
}

/// Reason phrases are not what these tests are about: Echo's own table serves.
fn reason(status: u16) -> &'static str {
    match echo::http::reason(status) {
        "" => "Status",
        known => known,
    }
}

/// An origin whose bodies (`<target> v<version>`, fresh for 600 s) carry a version a
/// test bumps behind Echo's back; PUT, POST and DELETE are answered 204.
pub struct Versioned {
    pub origin: TestOrigin,
    pub version: std::sync::Arc<std::sync::atomic::AtomicU64>,
}

impl Versioned {
    pub fn start() -> Versioned {
        use std::sync::atomic::{AtomicU64, Ordering};
        let version = std::sync::Arc::new(AtomicU64::new(1));
        let v = std::sync::Arc::clone(&version);
        let origin = TestOrigin::start(move |req| {
            if matches!(req.method.as_str(), "PUT" | "POST" | "DELETE") {
                return OriginResponse::status(204);
            }
            OriginResponse::ok(format!("{} v{}", req.target, v.load(Ordering::SeqCst)))
                .header("Cache-Control", "max-age=600")
        });
        Versioned { origin, version }
    }

    /// Bodies from now on carry `version`.
    pub fn set(&self, version: u64) {
        self.version
            .store(version, std::sync::atomic::Ordering::SeqCst);
    }
}
