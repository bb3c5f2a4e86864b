//! One request/response exchange on a connection, as a handler sees it: the parsed
//! request, its body as a stream, and a response writer that frames what it is given.
//!
//! Every exchange has absolute deadlines: its request body must be in by
//! `body_timeout` after the head plus the body's bytes at `min_rate`, its response out
//! by `write_timeout` after it starts plus the response's bytes at `min_rate`.
//!
//! Invariants: the response is written once, in order, with the framing Echo chose;
//! an exchange whose response did not complete, or whose request body was not read to
//! its end, closes the connection (the next bytes on it cannot be trusted); the
//! `100 Continue` interim response is sent only when the body is actually wanted.

use std::io::{self, Read};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::body::BodyState;
use super::conn::Conn;
use super::interim;
use super::response::{self, BodyLength, Framing};
use super::{Request, Version};
use crate::body_file::BodyFile;

/// Body bytes left over after a handler, read and discarded to keep the connection.
const DRAIN_BUDGET: u64 = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum ResponseState {
    NotStarted,
    /// Head written; body bytes still expected in this framing.
    Body(Framing, u64),
    Done,
}

/// How a response head is written.
#[derive(Clone, Copy)]
enum Head<'a> {
    /// On its own (the body, if any, follows in later writes).
    Alone,
    /// Together with the first body bytes, in one vectored write.
    With(&'a [u8]),
    /// With MSG_MORE: a sendfile of the body follows at once.
    BeforeMore,
}

/// Deadlines an exchange holds the client to.
#[derive(Debug, Clone, Copy)]
pub struct ExchangeTimeouts {
    /// The request body must be in this long after the head, plus its bytes at
    /// `min_rate`.
    pub body: Duration,
    /// The response must be out this long after it starts, plus its bytes at
    /// `min_rate`.
    pub write: Duration,
    /// Bytes per second (at least 1).
    pub min_rate: u64,
}

impl ExchangeTimeouts {
    /// How long `bytes` take at the minimum rate.
    pub(crate) fn at_min_rate(&self, bytes: u64) -> Duration {
        Duration::try_from_secs_f64(bytes as f64 / self.min_rate.max(1) as f64)
            .unwrap_or(Duration::MAX)
    }

    /// When a body that has `received` bytes so far must be in, for a request whose head
    /// arrived at `since`.
    pub(crate) fn body_deadline(&self, since: Instant, received: u64) -> Instant {
        later(since, self.body.saturating_add(self.at_min_rate(received)))
    }
}

/// `t + d`, or far in the future when that does not fit.
fn later(t: Instant, d: Duration) -> Instant {
    t.checked_add(d)
        .unwrap_or_else(|| t + Duration::from_secs(100 * 365 * 86_400))
}

pub struct Exchange<'c> {
    pub req: Request,
    conn: &'c mut Conn,
    body: BodyState,
    continue_sent: bool,
    response: ResponseState,
    close: bool,
    timeouts: ExchangeTimeouts,
    head_buf: Vec<u8>,
    /// Status of the response sent, for logs.
    status: u16,
    /// Body bytes written (framing excluded), for logs.
    body_bytes: u64,
    /// What the handler says it did, for logs and metrics (`none` unless it says).
    label: &'static str,
    /// The origin server that answered, when one did.
    origin: Option<Arc<str>>,
    /// The server is draining: the response says it is the connection's last.
    draining: Option<Arc<AtomicBool>>,
    /// Fields the handler leaves out of what it sends.
    omit: response::Omit,
}

impl<'c> Exchange<'c> {
    pub fn new(
        req: Request,
        conn: &'c mut Conn,
        max_body: u64,
        timeouts: ExchangeTimeouts,
    ) -> Exchange<'c> {
        let body = BodyState::new(req.framing, max_body);
        let close = !req.keep_alive;
        Exchange {
            req,
            conn,
            body,
            continue_sent: false,
            response: ResponseState::NotStarted,
            close,
            timeouts,
            head_buf: Vec::with_capacity(512),
            status: 0,
            body_bytes: 0,
            label: "none",
            origin: None,
            draining: None,
            omit: response::Omit::default(),
        }
    }

    /// Leaves these fields out of the answer's head (set by the handler from its config).
    pub(crate) fn omit(&mut self, omit: response::Omit) {
        self.omit = omit;
    }

    /// Watches the server's drain flag: a response started after it is set closes.
    pub(crate) fn watch_drain(&mut self, draining: Arc<AtomicBool>) {
        self.draining = Some(draining);
    }

    /// Can the exchange still be run afresh elsewhere (handed to the fetch pool)? Only
    /// before its response has started and before any of its body was read.
    pub(crate) fn can_defer(&self) -> bool {
        !self.response_started() && !self.continue_sent && self.body.received() == 0
    }

    /// The request back, to run a deferred exchange elsewhere.
    pub(crate) fn into_request(self) -> Request {
        self.req
    }

    /// The request body as a stream (empty when the request has none).
    pub fn body(&mut self) -> BodyReader<'_, 'c> {
        BodyReader { ex: self }
    }

    pub(crate) fn response_started(&self) -> bool {
        self.response != ResponseState::NotStarted
    }

    pub fn status(&self) -> u16 {
        self.status
    }

    /// Body bytes sent so far.
    pub(crate) fn body_bytes(&self) -> u64 {
        self.body_bytes
    }

    /// What the handler says it did (a metric label and access-log field; opaque here).
    pub fn label(&self) -> &'static str {
        self.label
    }

    /// Notes what the handler did, for `label`.
    pub(crate) fn set_label(&mut self, label: &'static str) {
        self.label = label;
    }

    /// Notes the origin server whose answer this exchange passes on.
    pub(crate) fn set_origin(&mut self, server: Arc<str>) {
        self.origin = Some(server);
    }

    pub fn origin(&self) -> Option<&str> {
        self.origin.as_deref()
    }

    /// Starts the response. `head_length` is the length to announce for a HEAD response.
    pub fn start(
        &mut self,
        status: u16,
        headers: &[(String, Vec<u8>)],
        length: BodyLength,
        head_length: Option<u64>,
    ) -> io::Result<()> {
        self.start_with(status, &[headers], length, head_length, Head::Alone)
    }

    /// Starts the response and writes `first` body bytes with the head in one write.
    fn start_with(
        &mut self,
        status: u16,
        fields: &[&[(String, Vec<u8>)]],
        length: BodyLength,
        head_length: Option<u64>,
        how: Head<'_>,
    ) -> io::Result<()> {
        if self.response != ResponseState::NotStarted {
            return Err(io::Error::other("response already started"));
        }
        let framing = response::choose(status, self.req.is_head(), length, self.req.version);
        if self
            .draining
            .as_ref()
            .is_some_and(|d| d.load(Ordering::SeqCst))
        {
            self.close = true;
        }
        if framing == Framing::Close {
            self.close = true;
        }
        // A body the handler never read makes the connection unusable unless it can be
        // drained cheaply; decide now so the head can say `connection: close`.
        let awaiting_continue = self.req.expect_continue && !self.continue_sent;
        if !self.body.is_done() && (awaiting_continue || !self.drain_is_cheap()) {
            self.close = true;
        }
        self.status = status;
        let bytes = match framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        let budget = self
            .timeouts
            .write
            .saturating_add(self.timeouts.at_min_rate(bytes));
        self.conn.set_write_deadline(later(Instant::now(), budget));
        let mut bytes = std::mem::take(&mut self.head_buf);
        bytes.clear();
        response::write_head(
            &mut bytes,
            self.req.version,
            status,
            fields,
            framing,
            head_length,
            !self.close,
            self.omit,
        );
        let remaining = match framing {
            Framing::Length(n) => n,
            _ => 0,
        };
        self.response = ResponseState::Body(framing, remaining);
        let result = match (how, framing) {
            (Head::With(first), _) if !first.is_empty() => self.write_framed(Some(&bytes), first),
            // MSG_MORE only when body bytes follow, or the head would wait for them.
            (Head::BeforeMore, Framing::Length(n)) if n > 0 => self.conn.write_all_more(&bytes),
            _ => self.conn.write_all(&bytes),
        };
        self.head_buf = bytes;
        if result.is_err() {
            self.close = true;
        }
        result
    }

    fn drain_is_cheap(&self) -> bool {
        match self.req.framing {
            super::BodyFraming::Length(n) => n - self.body.received() <= DRAIN_BUDGET,
            _ => false,
        }
    }

    /// Writes body bytes in the response's framing.
    pub fn write(&mut self, data: &[u8]) -> io::Result<()> {
        if data.is_empty() {
            return Ok(());
        }
        let result = self.write_framed(None, data);
        if result.is_err() {
            self.close = true;
        }
        result
    }

    fn write_framed(&mut self, head: Option<&[u8]>, data: &[u8]) -> io::Result<()> {
        let head = head.unwrap_or_default();
        if !matches!(self.response, ResponseState::Body(Framing::NoBody, _)) {
            self.body_bytes += data.len() as u64;
        }
        match self.response {
            ResponseState::Body(Framing::NoBody, _) => self.conn.write_all(head),
            ResponseState::Body(Framing::Length(left), _) => {
                if data.len() as u64 > left {
                    return Err(io::Error::other("response body longer than announced"));
                }
                self.conn.write_all_vectored(&[head, data])?;
                self.response = ResponseState::Body(Framing::Length(left - data.len() as u64), 0);
                Ok(())
            }
            ResponseState::Body(Framing::Chunked, _) => {
                let grow = self.timeouts.at_min_rate(data.len() as u64);
                self.conn.extend_write_deadline(grow);
                let size = format!("{:x}\r\n", data.len());
                self.conn
                    .write_all_vectored(&[head, size.as_bytes(), data, b"\r\n"])
            }
            ResponseState::Body(Framing::Close, _) => {
                let grow = self.timeouts.at_min_rate(data.len() as u64);
                self.conn.extend_write_deadline(grow);
                self.conn.write_all_vectored(&[head, data])
            }
            ResponseState::NotStarted | ResponseState::Done => {
                Err(io::Error::other("no response in progress"))
            }
        }
    }

    /// Ends the response. An announced length that was not met is an error and closes.
    pub fn finish(&mut self) -> io::Result<()> {
        let result = match self.response {
            ResponseState::Body(Framing::Length(0), _)
            | ResponseState::Body(Framing::NoBody, _) => Ok(()),
            ResponseState::Body(Framing::Length(_), _) => {
                Err(io::Error::other("response body shorter than announced"))
            }
            ResponseState::Body(Framing::Chunked, _) => self.conn.write_all(b"0\r\n\r\n"),
            ResponseState::Body(Framing::Close, _) => {
                self.close = true;
                Ok(())
            }
            ResponseState::NotStarted | ResponseState::Done => Ok(()),
        };
        match result {
            Ok(()) => self.response = ResponseState::Done,
            Err(_) => self.close = true,
        }
        result
    }

    /// While the returned guard is held, interim (1xx) responses the origin sends are
    /// forwarded to this client at once (not to an HTTP/1.0 client, nor once the
    /// response has started).
    pub(crate) fn forward_interim(&self) -> interim::Forwarding {
        let socket = (self.req.version == Version::Http11 && !self.response_started())
            .then(|| self.conn.interim_socket())
            .flatten();
        interim::Forwarding::to(socket)
    }

    /// A whole response in one call (and, when small, one write).
    pub fn respond(
        &mut self,
        status: u16,
        headers: &[(String, Vec<u8>)],
        body: &[u8],
    ) -> io::Result<()> {
        self.respond_fields(status, &[headers], body)
    }

    /// [`Exchange::respond`] with fields in several slices, written in order (a stored
    /// response's fields and those added for this answer, without copying them).
    pub(crate) fn respond_fields(
        &mut self,
        status: u16,
        fields: &[&[(String, Vec<u8>)]],
        body: &[u8],
    ) -> io::Result<()> {
        let length = BodyLength::Known(body.len() as u64);
        if response::has_no_body(status, self.req.is_head()) {
            let head_length = (status != 204 && status != 304).then_some(body.len() as u64);
            self.start_with(status, fields, length, head_length, Head::Alone)?;
        } else {
            self.start_with(status, fields, length, None, Head::With(body))?;
        }
        self.finish()
    }

    /// [`Exchange::respond_fields`] with the body, bytes `part` of `file`, sent by
    /// sendfile (no copy through Echo's memory). The head is sent with MSG_MORE, so it
    /// leaves in one segment with the body's first bytes.
    pub(crate) fn respond_file(
        &mut self,
        status: u16,
        fields: &[&[(String, Vec<u8>)]],
        file: &Arc<BodyFile>,
        part: std::ops::Range<u64>,
    ) -> io::Result<()> {
        let part = part.start.min(file.len())..part.end.min(file.len());
        let len = part.end.saturating_sub(part.start);
        let length = BodyLength::Known(len);
        if response::has_no_body(status, self.req.is_head()) || len == 0 {
            let head_length = (status != 204 && status != 304).then_some(len);
            self.start_with(status, fields, length, head_length, Head::Alone)?;
            return self.finish();
        }
        self.start_with(status, fields, length, None, Head::BeforeMore)?;
        if let Err(e) = self.conn.send_file(file, part.start, part.end) {
            self.close = true;
            return Err(e);
        }
        self.body_bytes += len;
        self.response = ResponseState::Body(Framing::Length(0), 0);
        self.finish()
    }

    /// An error response in Echo's own words; `close` also ends the connection.
    pub fn respond_error(&mut self, status: u16, reason: &str, close: bool) {
        if close {
            self.close = true;
        }
        if self.response_started() {
            // Too late for a status: the only honest signal left is to cut the stream.
            self.abort();
            return;
        }
        let body = format!("echo: {reason}\n");
        let mut headers = vec![
            (
                "content-type".to_string(),
                b"text/plain; charset=utf-8".to_vec(),
            ),
            ("cache-control".to_string(), b"no-store".to_vec()),
            // Refused before any cache work: not looked up.
            ("x-cache-status".to_string(), b"BYPASS".to_vec()),
        ];
        headers.extend(super::own_fields());
        if status == 503 {
            headers.push(("retry-after".to_string(), b"1".to_vec()));
        }
        let _ = self.respond(status, &headers, body.as_bytes());
    }

    /// The response cannot be completed: the connection is closed without finishing it,
    /// so the client sees a truncated message rather than a fabricated complete one.
    pub(crate) fn abort(&mut self) {
        self.close = true;
        if self.response != ResponseState::Done {
            self.response = ResponseState::Body(Framing::Close, 0);
        }
        self.conn.discard_pending();
        let _ = self.conn.stream().shutdown(std::net::Shutdown::Write);
    }

    /// Finishes the exchange: true if the connection can carry another request.
    pub fn complete(mut self) -> bool {
        if self.response != ResponseState::Done {
            return false;
        }
        if self.close {
            return false;
        }
        if !self.body.is_done() {
            let deadline = self
                .timeouts
                .body_deadline(self.req.received, self.body.received());
            return self.body.drain(self.conn, DRAIN_BUDGET, deadline);
        }
        true
    }

    fn send_continue(&mut self) -> io::Result<()> {
        if self.req.expect_continue && !self.continue_sent && !self.response_started() {
            self.continue_sent = true;
            if self.req.version == Version::Http11 {
                self.conn.write_all(b"HTTP/1.1 100 Continue\r\n\r\n")?;
            }
        }
        Ok(())
    }
}

/// The request body of an exchange, as `Read`.
pub struct BodyReader<'e, 'c> {
    ex: &'e mut Exchange<'c>,
}

impl Read for BodyReader<'_, '_> {
    fn read(&mut self, out: &mut [u8]) -> io::Result<usize> {
        if self.ex.body.is_done() {
            return Ok(0);
        }
        self.ex.send_continue()?;
        let received = self.ex.body.received();
        let deadline = self
            .ex
            .timeouts
            .body_deadline(self.ex.req.received, received);
        let result = self.ex.body.read(self.ex.conn, out, deadline);
        if result.is_err() {
            self.ex.close = true;
        }
        result
    }
}
