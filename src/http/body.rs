//! Request-body decoding: Content-Length and chunked (RFC 9112 §6.3, §7.1), strictly,
//! streamed from the connection buffer with a size limit.
//!
//! Invariants: never reads past the end of the body (pipelined bytes stay in the buffer);
//! a malformed chunk, an oversized body or a client that stops sending is an error, never
//! a silently short body; a body not in by its deadline is a 408; trailers are read and
//! dropped (Echo forwards none).

use std::io;
use std::time::Instant;

use super::conn::Conn;
use super::parse::HttpError;
use super::BodyFraming;

/// Longest chunk-size line accepted, extensions included.
const MAX_CHUNK_LINE: usize = 4096;
/// Largest trailer section accepted.
const MAX_TRAILERS: usize = 16 * 1024;

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    /// Content-Length body with this many bytes left.
    Length(u64),
    /// Expecting a chunk-size line.
    ChunkSize,
    /// Inside a chunk with this many data bytes left.
    ChunkData(u64),
    /// Expecting the CRLF after chunk data.
    ChunkEnd,
    Done,
}

/// Where a request body is in its decoding; lives as long as the exchange.
#[derive(Debug)]
pub struct BodyState {
    state: State,
    received: u64,
    max: u64,
    trailer_bytes: usize,
}

impl BodyState {
    pub fn new(framing: BodyFraming, max: u64) -> BodyState {
        let state = match framing {
            BodyFraming::None => State::Done,
            BodyFraming::Length(n) => State::Length(n),
            BodyFraming::Chunked => State::ChunkSize,
        };
        BodyState {
            state,
            received: 0,
            max,
            trailer_bytes: 0,
        }
    }

    pub fn is_done(&self) -> bool {
        self.state == State::Done
    }

    /// Decoded body bytes so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Reads decoded body bytes into `out`; 0 means the body has ended. Waits for the
    /// client until `deadline` at the latest.
    pub fn read(&mut self, conn: &mut Conn, out: &mut [u8], timeout: Instant) -> io::Result<usize> {
        if out.is_empty() {
            return Ok(0);
        }
        loop {
            match self.state {
                State::Done => return Ok(0),
                State::Length(0) => {
                    self.state = State::Done;
                    return Ok(0);
                }
                State::Length(left) => {
                    let n = self.take(conn, out, left, timeout)?;
                    self.state = State::Length(left - n as u64);
                    return Ok(n);
                }
                State::ChunkData(0) => self.state = State::ChunkEnd,
                State::ChunkData(left) => {
                    let n = self.take(conn, out, left, timeout)?;
                    self.state = State::ChunkData(left - n as u64);
                    return Ok(n);
                }
                State::ChunkEnd => {
                    let line = read_line(conn, 2, timeout)?;
                    if !line.is_empty() {
                        return Err(bad("chunk data not followed by CRLF"));
                    }
                    self.state = State::ChunkSize;
                }
                State::ChunkSize => {
                    let line = read_line(conn, MAX_CHUNK_LINE, timeout)?;
                    let size = parse_chunk_size(&line)?;
                    if size == 0 {
                        self.read_trailers(conn, timeout)?;
                        self.state = State::Done;
                        return Ok(0);
                    }
                    if self.received.saturating_add(size) > self.max {
                        return Err(too_large());
                    }
                    self.state = State::ChunkData(size);
                }
            }
        }
    }

    /// Copies up to `left` buffered (or newly received) body bytes into `out`.
    fn take(
        &mut self,
        conn: &mut Conn,
        out: &mut [u8],
        left: u64,
        timeout: Instant,
    ) -> io::Result<usize> {
        if conn.buffered().is_empty() {
            fill(conn, timeout)?;
        }
        let avail = conn.buffered();
        let n = avail
            .len()
            .min(out.len())
            .min(usize::try_from(left).unwrap_or(usize::MAX));
        out[..n].copy_from_slice(&avail[..n]);
        conn.consume(n);
        self.received += n as u64;
        if self.received > self.max {
            return Err(too_large());
        }
        Ok(n)
    }

    /// RFC 9112 §7.1.2: trailer fields are read and discarded.
    fn read_trailers(&mut self, conn: &mut Conn, timeout: Instant) -> io::Result<()> {
        loop {
            let line = read_line(conn, MAX_TRAILERS, timeout)?;
            if line.is_empty() {
                return Ok(());
            }
            self.trailer_bytes += line.len() + 2;
            if self.trailer_bytes > MAX_TRAILERS {
                return Err(bad("trailer section too large"));
            }
            let colon = line.iter().position(|&b| b == b':');
            let valid = colon.is_some_and(|c| {
                c > 0
                    && !line[..c].iter().any(|&b| b == b' ' || b == b'\t')
                    && !line.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f)
            });
            if !valid {
                return Err(bad("malformed trailer field"));
            }
        }
    }

    /// Reads and discards what is left of the body, up to `budget` bytes; true if the
    /// body ended (so the connection can carry another request).
    pub fn drain(&mut self, conn: &mut Conn, budget: u64, timeout: Instant) -> bool {
        let mut scratch = [0u8; 8192];
        let start = self.received;
        while !self.is_done() {
            if self.received - start > budget {
                return false;
            }
            match self.read(conn, &mut scratch, timeout) {
                Ok(0) => return self.is_done(),
                Ok(_) => {}
                Err(_) => return false,
            }
        }
        true
    }
}

fn fill(conn: &mut Conn, deadline: Instant) -> io::Result<()> {
    match conn.fill(deadline) {
        Ok(0) => Err(io::Error::new(
            io::ErrorKind::UnexpectedEof,
            "client closed the connection inside the request body",
        )),
        Ok(_) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::TimedOut => Err(io::Error::new(
            io::ErrorKind::TimedOut,
            HttpError::new(408, "request body not received in time"),
        )),
        Err(e) => Err(e),
    }
}

/// One CRLF-terminated line without its CRLF; a bare LF or CR is an error.
fn read_line(conn: &mut Conn, max: usize, timeout: Instant) -> io::Result<Vec<u8>> {
    loop {
        let buf = conn.buffered();
        if let Some(lf) = buf.iter().position(|&b| b == b'\n') {
            if lf > max {
                return Err(bad("chunk line too long"));
            }
            if lf == 0 || buf[lf - 1] != b'\r' {
                return Err(bad("bare LF in chunked body"));
            }
            let line = buf[..lf - 1].to_vec();
            if line.contains(&b'\r') {
                return Err(bad("bare CR in chunked body"));
            }
            conn.consume(lf + 1);
            return Ok(line);
        }
        if buf.len() > max {
            return Err(bad("chunk line too long"));
        }
        fill(conn, timeout)?;
    }
}

/// How many bytes of `buf` a chunked body takes (its last chunk and trailer section
/// included), when all of it is there: `Ok(None)` while more is needed and the body may
/// still end within `cap` bytes, `Ok(Some(usize::MAX))` once it cannot (a chunk that
/// ends past `cap`: not for a pre-read, the decoder takes it, and refuses it at once if
/// it passes the body limit), an error when what is there is not chunked framing (a
/// line longer than the decoder takes included). Reads nothing and consumes nothing: it
/// lets the server read a small chunked body before a worker decodes it.
pub(crate) fn chunked_length(buf: &[u8], cap: usize) -> Result<Option<usize>, HttpError> {
    let line = |at: usize| -> Result<Option<(&[u8], usize)>, HttpError> {
        let rest = buf.get(at..).unwrap_or_default();
        let Some(lf) = rest.iter().position(|&b| b == b'\n') else {
            if rest.len() > MAX_CHUNK_LINE {
                return Err(HttpError::new(400, "chunk line too long"));
            }
            return Ok(None);
        };
        if lf > MAX_CHUNK_LINE {
            return Err(HttpError::new(400, "chunk line too long"));
        }
        Ok(Some((
            rest[..lf].strip_suffix(b"\r").unwrap_or(&rest[..lf]),
            at + lf + 1,
        )))
    };
    let mut at = 0;
    loop {
        let Some((size_line, next)) = line(at)? else {
            return Ok(None);
        };
        let size =
            parse_chunk_size(size_line).map_err(|_| HttpError::new(400, "malformed chunk size"))?;
        at = next;
        if size == 0 {
            // Trailer fields, up to the empty line.
            loop {
                let Some((trailer, next)) = line(at)? else {
                    return Ok(None);
                };
                at = next;
                if trailer.is_empty() {
                    return Ok(Some(at));
                }
            }
        }
        let end = usize::try_from(size)
            .ok()
            .and_then(|n| at.checked_add(n)?.checked_add(2))
            .ok_or(HttpError::new(413, "request body too large"))?;
        if end > cap {
            return Ok(Some(usize::MAX));
        }
        if end > buf.len() {
            return Ok(None);
        }
        at = end;
    }
}

/// RFC 9112 §7.1: `chunk-size [ chunk-ext ]`, chunk-size = 1*HEXDIG.
fn parse_chunk_size(line: &[u8]) -> io::Result<u64> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(bad("malformed chunk size"));
    }
    // 15 hex digits hold any size below 2^60; more would overflow or is an attack.
    if digits > 15 {
        return Err(bad("chunk size too large"));
    }
    let rest = &line[digits..];
    // chunk-ext = *( BWS ";" BWS ext-name [ BWS "=" BWS ext-val ] ): parsed only far
    // enough to know it is one; its meaning is ignored (RFC 9112 §7.1.1).
    let rest_ok = rest.is_empty()
        || (rest.trim_ascii_start().first() == Some(&b';')
            && !rest.iter().any(|&b| (b < 0x20 && b != b'\t') || b == 0x7f));
    if !rest_ok {
        return Err(bad("malformed chunk extension"));
    }
    let text = std::str::from_utf8(&line[..digits]).map_err(|_| bad("malformed chunk size"))?;
    u64::from_str_radix(text, 16).map_err(|_| bad("malformed chunk size"))
}

fn bad(reason: &'static str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, HttpError::new(400, reason))
}

fn too_large() -> io::Error {
    io::Error::new(
        io::ErrorKind::InvalidData,
        HttpError::new(413, "request body too large"),
    )
}

/// The refusal a body error maps to, if it was the client's fault.
pub fn client_error(e: &io::Error) -> Option<&HttpError> {
    e.get_ref()
        .and_then(|inner| inner.downcast_ref::<HttpError>())
}

impl std::error::Error for HttpError {}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use std::net::{TcpListener, TcpStream};
    use std::time::Duration;

    /// A real socket pair: the client side writes `bytes` then closes its write half.
    fn conn_with(bytes: &[u8]) -> Conn {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let mut client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        client.write_all(bytes).unwrap();
        client.shutdown(std::net::Shutdown::Write).unwrap();
        // Keep the client alive until the server side is done with it.
        std::mem::forget(client);
        Conn::new(server.into(), peer, 64 * 1024, Duration::from_secs(5))
    }

    fn decode(framing: BodyFraming, max: u64, wire: &[u8]) -> (io::Result<Vec<u8>>, Vec<u8>) {
        let mut conn = conn_with(wire);
        let mut state = BodyState::new(framing, max);
        let mut out = Vec::new();
        let mut buf = [0u8; 7];
        let result = loop {
            match state.read(&mut conn, &mut buf, Instant::now() + Duration::from_secs(5)) {
                Ok(0) => break Ok(out),
                Ok(n) => out.extend_from_slice(&buf[..n]),
                Err(e) => break Err(e),
            }
        };
        // What is left in the buffer belongs to the next request.
        let _ = conn.fill(Instant::now() + Duration::from_millis(200));
        (result, conn.buffered().to_vec())
    }

    fn status(r: &io::Result<Vec<u8>>) -> Option<u16> {
        r.as_ref().err().and_then(client_error).map(|e| e.status)
    }

    #[test]
    fn content_length_bodies_stop_at_their_length() {
        let (body, rest) = decode(BodyFraming::Length(5), 100, b"helloGET / HTTP/1.1\r\n");
        assert_eq!(body.unwrap(), b"hello");
        assert_eq!(rest, b"GET / HTTP/1.1\r\n");
    }

    #[test]
    fn chunked_bodies_decode_with_extensions_and_trailers() {
        let wire = b"5;name=val\r\nhello\r\n6\r\n world\r\n0\r\nX-T: 1\r\n\r\nNEXT";
        let (body, rest) = decode(BodyFraming::Chunked, 100, wire);
        assert_eq!(body.unwrap(), b"hello world");
        assert_eq!(rest, b"NEXT");
    }

    #[test]
    fn malformed_chunked_bodies_are_refused() {
        let cases: &[(&[u8], u16)] = &[
            (b"x\r\nhello\r\n0\r\n\r\n", 400),   // not hex
            (b"5\r\nhelloX\r\n0\r\n\r\n", 400),  // no CRLF after data
            (b"5\nhello\r\n0\r\n\r\n", 400),     // bare LF
            (b"ffffffffffffffffff\r\n", 400),    // overflow
            (b"5 x\r\nhello\r\n0\r\n\r\n", 400), // junk after size
            (b"0\r\nbad trailer\r\n\r\n", 400),  // trailer without colon
            (b"65\r\n", 413),                    // 101 bytes > max 100
            (b"-5\r\nhello\r\n0\r\n\r\n", 400),  // sign
        ];
        for (wire, want) in cases {
            let (body, _) = decode(BodyFraming::Chunked, 100, wire);
            assert_eq!(
                status(&body),
                Some(*want),
                "{:?}",
                String::from_utf8_lossy(wire)
            );
        }
        let long_ext = [b"5;".as_slice(), &[b'a'; 5000], b"\r\nhello\r\n0\r\n\r\n"].concat();
        let (body, _) = decode(BodyFraming::Chunked, 100, &long_ext);
        assert_eq!(status(&body), Some(400));
    }

    #[test]
    fn a_whole_chunked_body_is_measured_in_the_buffer() {
        let wire = b"5;x=y\r\nhello\r\n6\r\n world\r\n0\r\nT: 1\r\n\r\nNEXT";
        assert_eq!(chunked_length(wire, 1000), Ok(Some(wire.len() - 4)));
        for cut in [1, 8, 15, 30, wire.len() - 5] {
            assert_eq!(chunked_length(&wire[..cut], 1000), Ok(None), "{cut}");
        }
        assert!(chunked_length(b"zz\r\n", 1000).is_err());
        // Found by fuzzing: a chunk past the pre-read is handed on at once (the decoder
        // refuses one past the body limit), and an endless chunk line is refused.
        assert_eq!(chunked_length(b"4000001\r\n", 1000), Ok(Some(usize::MAX)));
        let mut endless = b"1;".to_vec();
        endless.extend(std::iter::repeat_n(b'x', MAX_CHUNK_LINE));
        assert!(chunked_length(&endless, 100_000).is_err());
    }

    #[test]
    fn a_body_cut_short_is_an_error_not_a_short_body() {
        let (body, _) = decode(BodyFraming::Length(10), 100, b"hello");
        assert!(body.is_err());
        let (body, _) = decode(BodyFraming::Chunked, 100, b"5\r\nhel");
        assert!(body.is_err());
    }
}
