//! One client connection: the socket and its read buffer, shared by head parsing and
//! body decoding so bytes a client pipelines behind a request are never lost.
//!
//! Invariants: the buffer never grows past the limit it was created with; every read
//! waits at most until a deadline the caller passes; nothing here interprets HTTP.

use std::io::{self, IoSlice, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::{Duration, Instant};

/// Reads start with this much buffer; it grows on demand up to the connection's limit.
const INITIAL_BUFFER: usize = 4096;

pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    /// First unconsumed byte in `buf`.
    start: usize,
    limit: usize,
    read_timeout: Option<Duration>,
    pub peer: SocketAddr,
}

impl Conn {
    /// `limit` bounds the buffer (the largest head plus room for pipelined bytes).
    pub fn new(stream: TcpStream, peer: SocketAddr, limit: usize) -> Conn {
        Conn {
            stream,
            buf: Vec::with_capacity(INITIAL_BUFFER.min(limit)),
            start: 0,
            limit,
            read_timeout: None,
            peer,
        }
    }

    pub fn stream(&self) -> &TcpStream {
        &self.stream
    }

    /// The bytes received and not yet consumed.
    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    pub fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.buf.len());
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
    }

    /// Is the buffer at its limit with nothing consumed (so a fill cannot add bytes)?
    pub fn is_full(&self) -> bool {
        self.buf.len() - self.start >= self.limit
    }

    /// Reads more bytes into the buffer, waiting until `deadline` at the latest.
    /// Returns the number of bytes read; 0 means the peer closed. A deadline that
    /// passes is `ErrorKind::TimedOut`.
    pub fn fill(&mut self, deadline: Instant) -> io::Result<usize> {
        let now = Instant::now();
        if now >= deadline {
            return Err(io::ErrorKind::TimedOut.into());
        }
        self.set_read_timeout(deadline - now)?;
        if self.start > 0 && self.buf.len() == self.buf.capacity() {
            self.buf.drain(..self.start);
            self.start = 0;
        }
        let used = self.buf.len();
        let room = self.limit.saturating_sub(used - self.start);
        if room == 0 {
            return Err(io::Error::other("connection buffer full"));
        }
        if self.buf.capacity() == used {
            let grow = used.max(INITIAL_BUFFER).min(room);
            self.buf.reserve_exact(grow);
        }
        let spare = (self.buf.capacity() - used).min(room);
        self.buf.resize(used + spare, 0);
        let result = self.stream.read(&mut self.buf[used..]);
        let n = *result.as_ref().unwrap_or(&0);
        self.buf.truncate(used + n);
        match result {
            Ok(n) => Ok(n),
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock) => {
                Err(io::ErrorKind::TimedOut.into())
            }
            Err(e) => Err(e),
        }
    }

    fn set_read_timeout(&mut self, timeout: Duration) -> io::Result<()> {
        // Round up to whole milliseconds so the socket option is not re-set on every read.
        let timeout = Duration::from_millis(timeout.as_millis().max(1) as u64);
        if self.read_timeout != Some(timeout) {
            self.stream.set_read_timeout(Some(timeout))?;
            self.read_timeout = Some(timeout);
        }
        Ok(())
    }

    /// Writes all of `parts` in as few system calls as the kernel allows.
    pub fn write_all_vectored(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        let mut parts: Vec<&[u8]> = parts.iter().copied().filter(|p| !p.is_empty()).collect();
        while !parts.is_empty() {
            let slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
            let mut n = match self.stream.write_vectored(&slices) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => return Err(e),
            };
            while let Some(first) = parts.first_mut() {
                if n >= first.len() {
                    n -= first.len();
                    parts.remove(0);
                } else {
                    *first = &first[n..];
                    break;
                }
            }
        }
        Ok(())
    }

    pub fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.stream.write_all(data)
    }

    /// Writes all of `data` with MSG_MORE: the kernel holds it to go out with what the
    /// next write or sendfile sends. Only when more follows at once.
    pub fn write_all_more(&mut self, mut data: &[u8]) -> io::Result<()> {
        while !data.is_empty() {
            match rustix::net::send(&self.stream, data, rustix::net::SendFlags::MORE) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(n) => data = &data[n..],
                Err(rustix::io::Errno::INTR) => {}
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }
}
