//! An origin connection as a proxy needs it, at the socket: ureq's transport wrapped so
//! that a body cut by a reset is an error, not an end (ureq takes a reset of a body read
//! until close for its end, which would store and complete a truncated response); and
//! so that a connection that carried a HEAD, a 1xx, 204 or 304 answer never goes back to
//! the pool: bytes a broken origin sends after such a bodiless answer (a HEAD answered
//! with a body, a late body after a 204) can never become another request's response.
//! (ureq also checks that a connection has nothing to read before it reuses one; that
//! cannot see bytes that arrive after the next request was sent.)
//!
//! It is also where interim (1xx) responses are seen: ureq reads and drops them. ureq
//! asks for more input only when what it holds does not parse, having consumed every
//! complete head before; so each read that follows a request starts at a head not seen
//! yet, and every complete interim head at its front is handed to `http::interim`, in
//! order, to be forwarded to the client (RFC 9110 §15.2), until the final head.
//!
//! Invariants: the wrapper reads only what ureq already read (the first bytes of each
//! request it sends, the status line of each answer, the interim heads ureq consumes);
//! it never adds, drops or reorders bytes; once a connection is marked not reusable it
//! stays so.

use std::io;

use ureq::unversioned::transport::{Buffers, ConnectionDetails, Connector, NextTimeout, Transport};

/// Wraps every origin connection's transport in a [`Guarded`] one.
#[derive(Debug)]
pub(super) struct Guard;

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
            awaiting_final: false,
            reusable: true,
        }))
    }
}

/// An origin connection as Echo needs it: what ureq would take for the end of a body
/// when it is a cut is an error, and the connection leaves the pool for good after an
/// exchange whose answer has no body by rule (HEAD; 1xx, 204, 304).
#[derive(Debug)]
pub(super) struct Guarded<T> {
    inner: T,
    /// A request went out and its status line has not been seen yet.
    awaiting_status: bool,
    /// A request went out and ureq has not consumed its final (non-1xx) head yet.
    awaiting_final: bool,
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
            self.awaiting_final = true;
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
        if self.awaiting_final && result.is_ok() {
            self.awaiting_final = deliver_interim(self.inner.buffers().input());
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

/// Hands every complete interim (1xx) head at the front of `input` to `http::interim`,
/// in order; false once a complete final head follows them (nothing more to watch).
fn deliver_interim(mut input: &[u8]) -> bool {
    loop {
        let mut slots = [httparse::EMPTY_HEADER; 64];
        let mut head = httparse::Response::new(&mut slots);
        match head.parse(input) {
            Ok(httparse::Status::Complete(n)) if head.code.is_some_and(|c| c < 200) => {
                let (interim, rest) = input.split_at(n);
                crate::http::interim::deliver(interim);
                input = rest;
            }
            Ok(httparse::Status::Complete(_)) => return false,
            // Not all there yet (read again), or not HTTP (ureq reports it).
            Ok(httparse::Status::Partial) | Err(_) => return true,
        }
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::{Read, Write};
    use std::net::{TcpListener, TcpStream};
    use std::sync::mpsc;

    use crate::upstream::origin::{Origin, OriginRequest};
    use crate::upstream::OriginError;

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
}
