//! The client side of the admin API, for `echod invalidate`: builds the `POST
//! /invalidate` body, or the `GET` / `DELETE /invalidate/<id>` call of a job, sends it
//! to `admin.listen` with
//! the bearer token from the config, and returns the status and body of the answer.
//!
//! Hand-written on a plain `TcpStream` rather than with ureq: it is a dozen lines of
//! HTTP/1.1 to our own admin listener, which always answers with Content-Length and
//! closes after a `Connection: close` request, and ureq stays in `origin` (STYLE rule 7).
//!
//! Invariants: connect, write and every read have a timeout; the token goes only into
//! the Authorization field and is never part of an error or an answer; the answer's
//! head and body are bounded in size.

use std::fmt;
use std::io::{self, Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::Duration;

use serde_json::{json, Map, Value};

use crate::config::Config;
use crate::invalidation::Mode;

/// Longest wait for the admin listener to accept the connection.
pub(crate) const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Longest wait for the admin listener to take the request bytes.
pub(crate) const WRITE_TIMEOUT: Duration = Duration::from_secs(10);
/// Added to `invalidation.wait_timeout_ms` for each read: the admin API holds a `POST
/// /invalidate` that long before answering 202, so the client must wait longer.
pub(crate) const READ_MARGIN: Duration = Duration::from_secs(10);
/// Largest answer head accepted.
const MAX_HEAD: usize = 16 * 1024;
/// Largest answer body accepted (reports are small: a sample holds at most 10 keys).
const MAX_BODY: u64 = 4 * 1024 * 1024;

/// What `POST /invalidate` is asked to do; `None` and `false` are left out of the body.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct InvalidateRequest {
    /// Exact URLs to purge (`--url`, repeatable): sent as `url` (one) or `urls`.
    pub urls: Vec<String>,
    pub pattern: Option<String>,
    pub tag: Option<String>,
    pub host: Option<String>,
    pub mode: Option<Mode>,
    pub dry_run: bool,
    pub asynchronous: bool,
    /// Says a pattern that matches every entry is meant (`"all": true`).
    pub all: bool,
}

impl InvalidateRequest {
    /// The JSON body, with only the fields given (the API's defaults apply to the rest).
    pub(crate) fn to_json(&self) -> Value {
        let mut body = Map::new();
        let mut put = |key: &str, value: Value| {
            body.insert(key.to_string(), value);
        };
        match self.urls.as_slice() {
            [] => {}
            [one] => put("url", json!(one)),
            many => put("urls", json!(many)),
        }
        if let Some(p) = &self.pattern {
            put("pattern", json!(p));
        }
        if let Some(t) = &self.tag {
            put("tag", json!(t));
        }
        if let Some(h) = &self.host {
            put("host", json!(h));
        }
        if let Some(m) = self.mode {
            put("mode", json!(m.as_str()));
        }
        if self.dry_run {
            put("dry_run", json!(true));
        }
        if self.asynchronous {
            put("async", json!(true));
        }
        if self.all {
            put("all", json!(true));
        }
        Value::Object(body)
    }
}

/// One call to the admin API.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum AdminCall {
    /// `POST /invalidate`.
    Invalidate(InvalidateRequest),
    /// `GET /invalidate/<id>`: a job's report.
    Status(u64),
    /// `DELETE /invalidate/<id>`: cancels a job.
    Cancel(u64),
    /// `GET /cache?url=<URL>`: what is stored for a URL.
    Inspect(String),
}

impl AdminCall {
    fn method(&self) -> &'static str {
        match self {
            AdminCall::Invalidate(_) => "POST",
            AdminCall::Status(_) | AdminCall::Inspect(_) => "GET",
            AdminCall::Cancel(_) => "DELETE",
        }
    }

    fn path(&self) -> String {
        match self {
            AdminCall::Invalidate(_) => "/invalidate".to_string(),
            AdminCall::Status(id) | AdminCall::Cancel(id) => format!("/invalidate/{id}"),
            AdminCall::Inspect(url) => {
                let query: String = form_urlencoded::Serializer::new(String::new())
                    .append_pair("url", url)
                    .finish();
                format!("/cache?{query}")
            }
        }
    }

    fn body(&self) -> Option<Vec<u8>> {
        match self {
            AdminCall::Invalidate(r) => Some(r.to_json().to_string().into_bytes()),
            AdminCall::Status(_) | AdminCall::Cancel(_) | AdminCall::Inspect(_) => None,
        }
    }

    /// `POST /invalidate`, `GET /invalidate/7`: for messages.
    pub fn describe(&self) -> String {
        format!("{} {}", self.method(), self.path())
    }
}

/// The admin API's answer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AdminAnswer {
    pub status: u16,
    /// The reason phrase of the status line (may be empty).
    pub reason: String,
    pub body: Vec<u8>,
}

impl AdminAnswer {
    /// 200 (done) and 202 (accepted, poll its id) are successes, unless the job they
    /// report failed (`GET /invalidate/<id>` of a failed job); anything else is not.
    pub fn is_success(&self) -> bool {
        matches!(self.status, 200 | 202)
            && self
                .json()
                .is_none_or(|v| v.get("state").and_then(Value::as_str) != Some("failed"))
    }

    pub fn json(&self) -> Option<Value> {
        serde_json::from_slice(&self.body).ok()
    }

    /// The body pretty-printed when it is JSON, else as text (the front end's own
    /// errors, e.g. a 503 when overloaded, are `text/plain`).
    pub fn pretty(&self) -> String {
        match self.json() {
            Some(v) => serde_json::to_string_pretty(&v).unwrap_or_else(|_| v.to_string()),
            None => String::from_utf8_lossy(&self.body).trim_end().to_string(),
        }
    }

    /// The `warning` of a report (replicas that did not acknowledge in time).
    pub fn warning(&self) -> Option<String> {
        self.json()?.get("warning")?.as_str().map(str::to_string)
    }
}

/// Which step of the exchange timed out.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Connect,
    Send,
    Receive,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Connect => "connecting",
            Phase::Send => "sending the request",
            Phase::Receive => "waiting for the answer",
        }
    }
}

/// Why there is no answer from the admin API.
#[derive(Debug)]
pub enum ClientError {
    /// The config has no `[admin]` section.
    NoAdmin,
    /// The token cannot be sent in a header field (it holds control characters).
    UnsendableToken,
    Connect {
        addr: SocketAddr,
        source: io::Error,
    },
    Timeout {
        addr: SocketAddr,
        phase: Phase,
    },
    Io {
        addr: SocketAddr,
        source: io::Error,
    },
    /// The answer is not HTTP/1.1 as the admin API writes it.
    BadAnswer {
        addr: SocketAddr,
        reason: String,
    },
}

impl fmt::Display for ClientError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            ClientError::NoAdmin => f.write_str(
                "the config has no [admin] section: set admin.listen and admin.token \
                 (or admin.token_file) to use the admin API",
            ),
            ClientError::UnsendableToken => f.write_str(
                "admin.token holds control characters and cannot be sent as a bearer token",
            ),
            ClientError::Connect { addr, source } => write!(
                f,
                "cannot connect to the admin API at {addr} (admin.listen): {source}; is echod running?"
            ),
            ClientError::Timeout { addr, phase } => write!(
                f,
                "the admin API at {addr} timed out while {}",
                phase.as_str()
            ),
            ClientError::Io { addr, source } => {
                write!(f, "talking to the admin API at {addr}: {source}")
            }
            ClientError::BadAnswer { addr, reason } => {
                write!(f, "the admin API at {addr} gave a malformed answer: {reason}")
            }
        }
    }
}

impl std::error::Error for ClientError {}

/// Timeouts of one exchange.
#[derive(Debug, Clone, Copy)]
pub struct Timeouts {
    pub connect: Duration,
    pub write: Duration,
    /// For each read of the answer.
    pub read: Duration,
}

impl Timeouts {
    /// The timeouts for a config: reads outlast the API's own `invalidation.wait_timeout`.
    pub(crate) fn for_config(cfg: &Config) -> Timeouts {
        Timeouts {
            connect: CONNECT_TIMEOUT,
            write: WRITE_TIMEOUT,
            read: cfg.invalidation.wait_timeout + READ_MARGIN,
        }
    }
}

/// Makes `call` to the admin API named in `cfg`, with its token.
pub fn call(cfg: &Config, call: &AdminCall) -> Result<AdminAnswer, ClientError> {
    let admin = cfg.admin.as_ref().ok_or(ClientError::NoAdmin)?;
    exchange(admin.listen, &admin.token, call, Timeouts::for_config(cfg))
}

/// Where to connect for a listen address: a wildcard listener is reached on loopback.
fn connect_addr(listen: SocketAddr) -> SocketAddr {
    match listen.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), listen.port())
        }
        IpAddr::V6(ip) if ip.is_unspecified() => {
            SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), listen.port())
        }
        _ => listen,
    }
}

/// One request on a fresh connection, one answer, then the connection closes.
pub fn exchange(
    listen: SocketAddr,
    token: &str,
    call: &AdminCall,
    timeouts: Timeouts,
) -> Result<AdminAnswer, ClientError> {
    if token.chars().any(|c| c.is_control()) {
        return Err(ClientError::UnsendableToken);
    }
    let addr = connect_addr(listen);
    let io_error = |phase: Phase| {
        move |source: io::Error| match source.kind() {
            io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut => {
                ClientError::Timeout { addr, phase }
            }
            _ if phase == Phase::Connect => ClientError::Connect { addr, source },
            _ => ClientError::Io { addr, source },
        }
    };
    let mut stream =
        TcpStream::connect_timeout(&addr, timeouts.connect).map_err(io_error(Phase::Connect))?;
    stream
        .set_write_timeout(Some(timeouts.write))
        .and_then(|()| stream.set_read_timeout(Some(timeouts.read)))
        .map_err(io_error(Phase::Connect))?;

    let mut request = format!(
        "{} {} HTTP/1.1\r\nHost: {addr}\r\nAuthorization: Bearer {token}\r\n\
         Connection: close\r\nAccept: application/json\r\nUser-Agent: echod/{}\r\n",
        call.method(),
        call.path(),
        env!("CARGO_PKG_VERSION"),
    )
    .into_bytes();
    let body = call.body();
    if let Some(body) = &body {
        request.extend_from_slice(
            format!(
                "Content-Type: application/json\r\nContent-Length: {}\r\n",
                body.len()
            )
            .as_bytes(),
        );
    }
    request.extend_from_slice(b"\r\n");
    request.extend_from_slice(body.as_deref().unwrap_or_default());
    stream
        .write_all(&request)
        .and_then(|()| stream.flush())
        .map_err(io_error(Phase::Send))?;

    read_answer(&mut stream).map_err(|e| match e {
        AnswerError::Io(source) => io_error(Phase::Receive)(source),
        AnswerError::Malformed(reason) => ClientError::BadAnswer { addr, reason },
    })
}

/// Why an answer could not be read.
#[derive(Debug)]
enum AnswerError {
    Io(io::Error),
    Malformed(String),
}

impl From<io::Error> for AnswerError {
    fn from(e: io::Error) -> Self {
        AnswerError::Io(e)
    }
}

/// Reads a status line, fields and a Content-Length body (to the close when there is
/// no Content-Length, which the admin API never does but a proxy in between might).
fn read_answer(stream: &mut impl Read) -> Result<AdminAnswer, AnswerError> {
    let malformed = |reason: &str| AnswerError::Malformed(reason.to_string());
    let mut buf = Vec::with_capacity(1024);
    let mut chunk = [0u8; 4096];
    let head_end = loop {
        if let Some(i) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            break i;
        }
        if buf.len() > MAX_HEAD {
            return Err(malformed("the head is larger than 16 KiB"));
        }
        let n = stream.read(&mut chunk)?;
        if n == 0 {
            return Err(malformed(if buf.is_empty() {
                "the connection closed without an answer"
            } else {
                "the connection closed inside the head"
            }));
        }
        buf.extend_from_slice(&chunk[..n]);
    };
    let head =
        std::str::from_utf8(&buf[..head_end]).map_err(|_| malformed("the head is not UTF-8"))?;
    let mut lines = head.split("\r\n");
    let status_line = lines.next().unwrap_or_default();
    let mut parts = status_line.splitn(3, ' ');
    let (version, code, reason) = (parts.next(), parts.next(), parts.next());
    if !version.is_some_and(|v| v.starts_with("HTTP/1.")) {
        return Err(AnswerError::Malformed(format!(
            "not an HTTP/1.x status line: {status_line:?}"
        )));
    }
    let status = code
        .filter(|c| c.len() == 3)
        .and_then(|c| c.parse::<u16>().ok())
        .ok_or_else(|| AnswerError::Malformed(format!("bad status line: {status_line:?}")))?;
    let mut content_length = None;
    for line in lines {
        let (name, value) = line
            .split_once(':')
            .ok_or_else(|| AnswerError::Malformed(format!("bad header line: {line:?}")))?;
        if name.eq_ignore_ascii_case("content-length") {
            let n = value
                .trim()
                .parse::<u64>()
                .map_err(|_| malformed("bad Content-Length"))?;
            if content_length.is_some_and(|m| m != n) {
                return Err(malformed("conflicting Content-Length fields"));
            }
            content_length = Some(n);
        }
    }
    if content_length.is_some_and(|n| n > MAX_BODY) {
        return Err(malformed("the body is larger than 4 MiB"));
    }
    let mut body = buf[head_end + 4..].to_vec();
    let want = content_length.unwrap_or(MAX_BODY + 1);
    if (body.len() as u64) < want {
        stream
            .take(want - body.len() as u64)
            .read_to_end(&mut body)?;
    }
    match content_length {
        Some(n) if (body.len() as u64) < n => {
            return Err(AnswerError::Malformed(format!(
                "the body ended after {} of {n} bytes",
                body.len()
            )))
        }
        Some(n) => body.truncate(n as usize),
        None if body.len() as u64 > MAX_BODY => {
            return Err(malformed("the body is larger than 4 MiB"))
        }
        None => {}
    }
    Ok(AdminAnswer {
        status,
        reason: reason.unwrap_or_default().trim().to_string(),
        body,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_given_fields_are_sent() {
        let request = InvalidateRequest {
            pattern: Some("^/orgs/42/".into()),
            ..InvalidateRequest::default()
        };
        assert_eq!(request.to_json(), json!({ "pattern": "^/orgs/42/" }));
        let request = InvalidateRequest {
            urls: Vec::new(),
            pattern: None,
            tag: Some("org-42".into()),
            host: Some("api.example.com".into()),
            mode: Some(Mode::Stale),
            dry_run: true,
            asynchronous: true,
            all: true,
        };
        assert_eq!(
            request.to_json(),
            json!({
                "tag": "org-42",
                "host": "api.example.com",
                "mode": "stale",
                "dry_run": true,
                "async": true,
                "all": true,
            })
        );
    }

    #[test]
    fn calls_name_method_and_path() {
        assert_eq!(
            AdminCall::Invalidate(InvalidateRequest::default()).describe(),
            "POST /invalidate"
        );
        assert_eq!(AdminCall::Status(7).describe(), "GET /invalidate/7");
        assert_eq!(AdminCall::Status(7).body(), None);
        assert_eq!(AdminCall::Cancel(7).describe(), "DELETE /invalidate/7");
        assert_eq!(AdminCall::Cancel(7).body(), None);
    }

    #[test]
    fn wildcard_listeners_are_reached_on_loopback() {
        let addr = |s: &str| s.parse::<SocketAddr>().unwrap();
        assert_eq!(connect_addr(addr("0.0.0.0:8081")), addr("127.0.0.1:8081"));
        assert_eq!(connect_addr(addr("[::]:8081")), addr("[::1]:8081"));
        assert_eq!(connect_addr(addr("10.0.0.1:8081")), addr("10.0.0.1:8081"));
    }

    fn parse(bytes: &[u8]) -> Result<AdminAnswer, AnswerError> {
        read_answer(&mut io::Cursor::new(bytes.to_vec()))
    }

    #[test]
    fn answers_are_read_by_content_length() {
        let a = parse(
            b"HTTP/1.1 401 Unauthorized\r\ncontent-type: application/json\r\n\
              Content-Length: 13\r\n\r\n{\"error\":\"x\"}trailing",
        )
        .unwrap();
        assert_eq!(a.status, 401);
        assert_eq!(a.reason, "Unauthorized");
        assert_eq!(a.body, b"{\"error\":\"x\"}");
        assert!(!a.is_success());
        assert_eq!(a.pretty(), "{\n  \"error\": \"x\"\n}");

        let a = parse(b"HTTP/1.1 202 Accepted\r\n\r\n{\"id\": 3, \"warning\": \"w\"}").unwrap();
        assert!(a.is_success());
        assert_eq!(a.json().unwrap()["id"], 3);
        assert_eq!(a.warning().as_deref(), Some("w"));

        let text =
            parse(b"HTTP/1.1 503 Service Unavailable\r\ncontent-length: 11\r\n\r\necho: busy\n")
                .unwrap();
        assert_eq!(text.pretty(), "echo: busy");
    }

    #[test]
    fn malformed_answers_are_errors() {
        for bytes in [
            &b""[..],
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n",
            b"SSH-2.0-OpenSSH\r\n\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 5\r\n\r\nabc",
            b"HTTP/1.1 200 OK\r\ncontent-length: x\r\n\r\n",
            b"HTTP/1.1 200 OK\r\ncontent-length: 1\r\ncontent-length: 2\r\n\r\nab",
            b"HTTP/1.1 200 OK\r\nno colon\r\n\r\n",
        ] {
            assert!(
                matches!(parse(bytes), Err(AnswerError::Malformed(_))),
                "{:?}",
                String::from_utf8_lossy(bytes)
            );
        }
    }
}
