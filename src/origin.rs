//! One server of a passthrough service: its own `ureq` agent (so its own keep-alive
//! connections), configured for a proxy. Choosing among servers is `upstream`'s work.
//!
//! ureq's defaults are wrong for a proxy and are all turned off here: no redirects
//! (3xx pass through), no proxy from the environment, no decompression (the crate is
//! built without it), 4xx/5xx returned as responses, no automatic User-Agent or Accept,
//! and every phase has a timeout from config.
//!
//! What ureq does not do for a proxy is done at the socket, by wrapping its transport
//! ([`Guard`]): a body cut by a reset is an error, not an end (ureq takes a reset of a
//! body read until close for its end, which would store and complete a truncated
//! response); and a connection that carried a HEAD, a 1xx, 204 or 304 answer never goes
//! back to the pool, so bytes a broken origin sends after such a bodiless answer (a HEAD
//! answered with a body, a late body after a 204) can never become another request's
//! response. (ureq also checks that a connection has nothing to read before it reuses
//! one; that cannot see bytes that arrive after the next request was sent.)
//!
//! Invariants: ureq types stay in this module; the rest of Echo sees [`OriginResponse`]
//! and [`OriginError`]. An error says which phase failed, so the proxy can pick 502 or 504.

use std::fmt;
use std::io::{self, Read};

use ureq::http;
use ureq::unversioned::resolver::DefaultResolver;
use ureq::unversioned::transport::{
    Buffers, ConnectionDetails, Connector, NextTimeout, RustlsConnector, TcpConnector, Transport,
};

use crate::config::{OriginConfig, ServerAddr};
use crate::http::Headers;

/// A request to forward.
pub struct OriginRequest<'a> {
    pub method: &'a str,
    /// Origin-form target, `/path?query`.
    pub target: &'a str,
    /// The client's Host: what routing looks at, and what is sent as Host when the
    /// service preserves it.
    pub host: &'a str,
    /// End-to-end fields to send, Host excluded (the server chosen decides it).
    pub headers: &'a Headers,
    /// The body and its length when known (None: sent chunked).
    pub body: Option<(&'a mut dyn Read, Option<u64>)>,
}

/// The head of the origin's answer, and its body as a stream.
pub struct OriginResponse {
    pub status: u16,
    /// As received, repeats kept in order (names lower-case).
    pub headers: Headers,
    /// The body length when the origin framed it with Content-Length.
    pub content_length: Option<u64>,
    pub body: Box<dyn Read + Send>,
    /// The server that answered (`scheme://authority`).
    pub server: std::sync::Arc<str>,
}

/// Why the origin did not answer.
#[derive(Debug)]
pub enum OriginError {
    /// Could not connect (refused, unreachable, DNS): 502.
    Connect(String),
    /// A phase took too long: 504.
    Timeout(&'static str),
    /// The origin broke the protocol or the connection: 502.
    Protocol(String),
    /// Reading the client's request body failed while forwarding it.
    ClientBody(io::Error),
    /// No server of the service is healthy (or out of its hold-down): 502, at once.
    Unavailable(String),
}

impl OriginError {
    /// The status a client gets for this failure.
    pub fn status(&self) -> u16 {
        match self {
            OriginError::Timeout(_) => 504,
            OriginError::ClientBody(_) => 400,
            _ => 502,
        }
    }

    /// Short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            OriginError::Connect(_) => "connect",
            OriginError::Timeout(_) => "timeout",
            OriginError::Protocol(_) => "protocol",
            OriginError::ClientBody(_) => "client-body",
            OriginError::Unavailable(_) => "unavailable",
        }
    }
}

impl fmt::Display for OriginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OriginError::Connect(why) => write!(f, "cannot connect to the origin: {why}"),
            OriginError::Timeout(phase) => write!(f, "the origin timed out ({phase})"),
            OriginError::Protocol(why) => write!(f, "the origin failed: {why}"),
            OriginError::ClientBody(e) => write!(f, "reading the request body failed: {e}"),
            OriginError::Unavailable(why) => write!(f, "no origin server available: {why}"),
        }
    }
}

impl std::error::Error for OriginError {}

/// A client for one server.
pub struct Origin {
    agent: ureq::Agent,
    base: String,
    /// `scheme://authority`: the server's name in logs, `/health` and metrics.
    pub name: std::sync::Arc<str>,
    /// The Host sent to it (unless the service preserves the client's).
    pub authority: String,
}

impl Origin {
    /// `roots`: the trust anchors for https (None: the system's verifier).
    pub fn new(
        addr: &ServerAddr,
        cfg: &OriginConfig,
        roots: Option<&ureq::tls::RootCerts>,
    ) -> Origin {
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(
                roots
                    .cloned()
                    .unwrap_or(ureq::tls::RootCerts::PlatformVerifier),
            )
            .build();
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .proxy(None)
            .user_agent(ureq::config::AutoHeaderValue::None)
            .accept(ureq::config::AutoHeaderValue::None)
            .accept_encoding(ureq::config::AutoHeaderValue::None)
            .allow_non_standard_methods(true)
            .no_delay(true)
            .tls_config(tls)
            .timeout_global(cfg.total_timeout)
            .timeout_connect(Some(cfg.connect_timeout))
            .timeout_send_request(Some(cfg.send_timeout))
            .timeout_send_body(None)
            .timeout_per_write(Some(cfg.send_timeout))
            .timeout_recv_response(Some(cfg.response_timeout))
            .timeout_per_read(Some(cfg.read_timeout))
            .max_idle_connections(cfg.max_idle_connections)
            .max_idle_connections_per_host(cfg.max_idle_connections)
            .build();
        let base = addr.base_url();
        let connector =
            ().chain(TcpConnector::default())
                .chain(RustlsConnector::default())
                .chain(Guard);
        Origin {
            agent: ureq::Agent::with_parts(config, connector, DefaultResolver::default()),
            name: base.as_str().into(),
            base,
            authority: addr.authority.clone(),
        }
    }

    /// A probe: GET `path` within `timeout`, body read (up to 64 KiB) and dropped.
    /// Passes on a 2xx or 3xx; the error says why it failed.
    pub fn probe(&self, path: &str, timeout: std::time::Duration) -> Result<u16, String> {
        let request = http::Request::get(format!("{}{}", self.base, path))
            .header("host", self.authority.as_str())
            .header("user-agent", "echo-health-check")
            .body(())
            .map_err(|e| e.to_string())?;
        let request = self
            .agent
            .configure_request(request)
            .timeout_global(Some(timeout))
            .build();
        let response = self
            .agent
            .run(request)
            .map_err(|e| map_error(e).to_string())?;
        let status = response.status().as_u16();
        let mut sink = Vec::new();
        let _ = response
            .into_body()
            .into_reader()
            .take(64 * 1024)
            .read_to_end(&mut sink);
        if (200..400).contains(&status) {
            Ok(status)
        } else {
            Err(format!("status {status}"))
        }
    }

    /// Sends one request and returns the response head with its body stream.
    /// `host`: the Host field to send.
    pub fn send(&self, req: OriginRequest<'_>, host: &str) -> Result<OriginResponse, OriginError> {
        let uri = format!("{}{}", self.base, uri_safe(req.target));
        let mut builder = http::Request::builder()
            .method(req.method)
            .uri(uri)
            .version(http::Version::HTTP_11)
            .header("host", host);
        for (name, value) in req.headers {
            builder = builder.header(name.as_str(), value.as_slice());
        }
        let mut client_body_error: Option<io::Error> = None;
        let result = match req.body {
            Some((reader, length)) => {
                if let Some(n) = length {
                    builder = builder.header("content-length", n);
                }
                let mut watched = WatchedReader {
                    inner: reader,
                    error: &mut client_body_error,
                };
                let request = builder
                    .body(ureq::SendBody::from_reader(&mut watched))
                    .map_err(|e| OriginError::Protocol(e.to_string()))?;
                self.agent.run(request)
            }
            None => {
                if matches!(req.method, "POST" | "PUT" | "PATCH") {
                    // Without a length ureq would send these chunked; say "empty".
                    builder = builder.header("content-length", 0);
                }
                let request = builder
                    .body(ureq::SendBody::none())
                    .map_err(|e| OriginError::Protocol(e.to_string()))?;
                self.agent.run(request)
            }
        };
        if let Some(e) = client_body_error {
            return Err(OriginError::ClientBody(e));
        }
        let response = result.map_err(map_error)?;
        let (parts, body) = response.into_parts();
        let headers = parts
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
            .collect();
        Ok(OriginResponse {
            status: parts.status.as_u16(),
            headers,
            content_length: body.content_length(),
            body: Box::new(BodyStream(body.into_reader())),
            server: std::sync::Arc::clone(&self.name),
        })
    }
}

/// Wraps every origin connection's transport in a [`Guarded`] one.
#[derive(Debug)]
struct Guard;

impl<In: Transport> Connector<In> for Guard {
    type Out = Guarded<In>;

    fn connect(
        &self,
        _: &ConnectionDetails,
        chained: Option<In>,
    ) -> Result<Option<Self::Out>, ureq::Error> {
        Ok(chained.map(|inner| Guarded {
            inner,
            awaiting_status: false,
            reusable: true,
        }))
    }
}

/// An origin connection as Echo needs it: what ureq would take for the end of a body
/// when it is a cut is an error, and the connection leaves the pool for good after an
/// exchange whose answer has no body by rule (HEAD; 1xx, 204, 304).
#[derive(Debug)]
struct Guarded<T> {
    inner: T,
    /// A request went out and its status line has not been seen yet.
    awaiting_status: bool,
    /// False once the connection carried an exchange after which it is not reused.
    reusable: bool,
}

impl<T: Transport> Transport for Guarded<T> {
    fn buffers(&mut self) -> &mut dyn Buffers {
        self.inner.buffers()
    }

    fn transmit_output(&mut self, amount: usize, timeout: NextTimeout) -> Result<(), ureq::Error> {
        if !self.awaiting_status {
            // The first bytes of a request: its request line.
            let output = &self.inner.buffers().output()[..amount];
            if output.starts_with(b"HEAD ") {
                self.reusable = false;
            }
            self.awaiting_status = true;
        }
        self.inner.transmit_output(amount, timeout)
    }

    fn await_input(&mut self, timeout: NextTimeout) -> Result<bool, ureq::Error> {
        let result = self.inner.await_input(timeout).map_err(cut_is_an_error);
        if self.awaiting_status {
            if let Some(status) = status_code(self.inner.buffers().input()) {
                self.awaiting_status = false;
                if status < 200 || status == 204 || status == 304 {
                    self.reusable = false;
                }
            }
        }
        result
    }

    fn is_open(&mut self) -> bool {
        self.reusable && self.inner.is_open()
    }

    fn is_tls(&self) -> bool {
        self.inner.is_tls()
    }
}

/// ureq ends a body read until close on a reset or an unexpected EOF as if the origin
/// had closed cleanly; for a cache that is a truncated response taken for whole. Those
/// errors keep their message but lose the kinds ureq swallows, so they surface as read
/// errors of the body (and, earlier, of the head, where they failed already).
fn cut_is_an_error(e: ureq::Error) -> ureq::Error {
    match e {
        ureq::Error::Io(io)
            if matches!(
                io.kind(),
                io::ErrorKind::ConnectionReset
                    | io::ErrorKind::ConnectionAborted
                    | io::ErrorKind::UnexpectedEof
            ) =>
        {
            ureq::Error::Io(io::Error::other(format!("connection cut: {io}")))
        }
        other => other,
    }
}

/// The status code of a response whose status line has begun in `input`
/// (`HTTP/1.x NNN`), once its three digits are there.
fn status_code(input: &[u8]) -> Option<u16> {
    let digits = input.get(9..12)?;
    if !input.starts_with(b"HTTP/1.") || !digits.iter().all(u8::is_ascii_digit) {
        return None;
    }
    std::str::from_utf8(digits).ok()?.parse().ok()
}

/// The target with the bytes the URI type refuses percent-encoded (`"`, `<`, `>`,
/// `\`, `^`, `` ` ``, `{`, `|`, `}` and non-ASCII: RFC 3986 does not allow them raw, but
/// clients send them and Echo's parser accepts them, as nginx does). Encoding them
/// keeps their meaning for the origin instead of failing the request.
fn uri_safe(target: &str) -> std::borrow::Cow<'_, str> {
    let refused = |b: u8| !b.is_ascii() || b"\"<>\\^`{|}".contains(&b);
    if !target.bytes().any(refused) {
        return std::borrow::Cow::Borrowed(target);
    }
    let mut out = String::with_capacity(target.len() + 16);
    for b in target.bytes() {
        if refused(b) {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push(char::from(b));
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Remembers an error from the client's body, so it is not blamed on the origin.
struct WatchedReader<'a, 'b> {
    inner: &'a mut dyn Read,
    error: &'b mut Option<io::Error>,
}

impl Read for WatchedReader<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).map_err(|e| {
            let copy = io::Error::new(e.kind(), e.to_string());
            *self.error = Some(e);
            copy
        })
    }
}

/// The origin body; read errors keep their phase so the proxy can log them.
struct BodyStream(ureq::BodyReader<'static>);

impl Read for BodyStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

fn map_error(e: ureq::Error) -> OriginError {
    match e {
        ureq::Error::Timeout(t) => OriginError::Timeout(match t {
            ureq::Timeout::Connect | ureq::Timeout::Resolve => "connect",
            ureq::Timeout::SendRequest | ureq::Timeout::SendBody | ureq::Timeout::PerWrite => {
                "send"
            }
            ureq::Timeout::RecvResponse => "response",
            ureq::Timeout::RecvBody | ureq::Timeout::PerRead => "read",
            _ => "global",
        }),
        ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => {
            OriginError::Connect(e.to_string())
        }
        ureq::Error::Io(io) => match io.kind() {
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => OriginError::Timeout("read"),
            io::ErrorKind::ConnectionRefused
            | io::ErrorKind::AddrNotAvailable
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable => OriginError::Connect(io.to_string()),
            _ => OriginError::Protocol(io.to_string()),
        },
        other => OriginError::Protocol(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::sync::mpsc;

    /// An origin on a raw socket: each connection is handed to `script` with its index;
    /// returns the base URL and the receiver of what the scripts report.
    fn raw_origin(
        script: fn(usize, TcpStream, &mpsc::Sender<String>),
    ) -> (String, mpsc::Receiver<String>) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let url = format!("http://{}", listener.local_addr().unwrap());
        let (tx, rx) = mpsc::channel();
        std::thread::spawn(move || {
            for (i, stream) in listener.incoming().enumerate() {
                let Ok(stream) = stream else { return };
                stream
                    .set_read_timeout(Some(std::time::Duration::from_secs(5)))
                    .unwrap();
                let tx = tx.clone();
                std::thread::spawn(move || script(i, stream, &tx));
            }
        });
        (url, rx)
    }

    /// Reads one request head and reports `<connection> <request line>`.
    fn read_head(i: usize, stream: &mut TcpStream, tx: &mpsc::Sender<String>) -> bool {
        let mut head = Vec::new();
        let mut byte = [0u8; 1];
        while !head.ends_with(b"\r\n\r\n") {
            match stream.read(&mut byte) {
                Ok(1) => head.push(byte[0]),
                _ => return false,
            }
        }
        let line = String::from_utf8_lossy(&head);
        let line = line.lines().next().unwrap_or("");
        let _ = tx.send(format!("{i} {line}"));
        true
    }

    fn origin(url: &str) -> Origin {
        let cfg = crate::config::Config::parse(&format!("[origin]\nurl = \"{url}\"\n")).unwrap();
        Origin::new(&cfg.origin.servers[0], &cfg.origin, None)
    }

    fn get(origin: &Origin, method: &str, target: &str) -> Result<Vec<u8>, OriginError> {
        let headers = Vec::new();
        let mut response = origin.send(
            OriginRequest {
                method,
                target,
                host: "h",
                headers: &headers,
                body: None,
            },
            "h",
        )?;
        let mut body = Vec::new();
        response
            .body
            .read_to_end(&mut body)
            .map_err(|e| OriginError::Protocol(e.to_string()))?;
        Ok(body)
    }

    #[test]
    fn connections_are_reused_but_never_after_a_head_204_304_or_1xx() {
        let (url, seen) = raw_origin(|i, mut stream, tx| {
            while read_head(i, &mut stream, tx) {
                let answer: &[u8] = if i == 0 {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"
                } else {
                    // Every other connection answers its first request bodiless by rule.
                    b"HTTP/1.1 204 No Content\r\n\r\n"
                };
                let _ = stream.write_all(answer);
            }
        });
        let origin = origin(&url);
        // Two requests on connection 0: it is reused after a 200.
        assert_eq!(get(&origin, "GET", "/a").unwrap(), b"ok");
        assert_eq!(get(&origin, "GET", "/b").unwrap(), b"ok");
        let lines: Vec<String> = seen.try_iter().collect();
        assert_eq!(lines, ["0 GET /a HTTP/1.1", "0 GET /b HTTP/1.1"]);
        // A HEAD on connection 0 is its last exchange.
        let _ = get(&origin, "HEAD", "/c");
        assert!(get(&origin, "GET", "/d").is_ok());
        let lines: Vec<String> = seen.iter().take(2).collect();
        assert_eq!(lines, ["0 HEAD /c HTTP/1.1", "1 GET /d HTTP/1.1"]);
        // Connection 1 answered 204: the next request goes on a new connection.
        let _ = get(&origin, "GET", "/e");
        let lines: Vec<String> = seen.iter().take(1).collect();
        assert_eq!(lines, ["2 GET /e HTTP/1.1"]);
    }

    #[test]
    fn a_body_until_close_cut_by_a_reset_is_an_error_and_a_clean_close_is_its_end() {
        let (url, _seen) = raw_origin(|i, mut stream, tx| {
            if read_head(i, &mut stream, tx) {
                let _ = stream.write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\n\r\npart");
                if i == 0 {
                    // SO_LINGER 0: the close is a reset.
                    let _ = rustix::net::sockopt::set_socket_linger(
                        &stream,
                        Some(std::time::Duration::ZERO),
                    );
                }
            }
        });
        let origin = origin(&url);
        let cut = get(&origin, "GET", "/cut");
        assert!(cut.is_err(), "a reset ended the body as if whole: {cut:?}");
        assert_eq!(get(&origin, "GET", "/whole").unwrap(), b"part");
    }

    #[test]
    fn status_codes_are_read_once_their_digits_are_in() {
        assert_eq!(status_code(b"HTTP/1.1 204 No Content"), Some(204));
        assert_eq!(status_code(b"HTTP/1.1 10"), None);
        assert_eq!(status_code(b"HTTP/1.0 103 "), Some(103));
        assert_eq!(status_code(b"garbage garbage"), None);
    }

    #[test]
    fn targets_the_uri_type_refuses_are_percent_encoded() {
        assert_eq!(uri_safe("/a?b=1"), "/a?b=1");
        assert_eq!(uri_safe("/q=\"x\"|{y}"), "/q=%22x%22%7C%7By%7D");
        assert_eq!(uri_safe("/caf\u{e9}"), "/caf%C3%A9");
        for target in ["/q=\"x\"|{y}^`<>\\", "/caf\u{e9}"] {
            let uri = format!("http://h{}", uri_safe(target));
            assert!(uri.parse::<http::Uri>().is_ok(), "{uri}");
        }
    }
}
