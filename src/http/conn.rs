//! One client connection: the socket, its read buffer (shared by head parsing and body
//! decoding so bytes a client pipelines behind a request are never lost), and the
//! response bytes the client has not taken yet.
//!
//! Writes run against an absolute deadline for the response being written (set by the
//! exchange: `server.write_timeout_ms` plus its size at `server.min_rate_bytes_per_sec`),
//! never a timeout that restarts with every partial write: a client that takes one byte
//! a second is cut off at the deadline like one that takes none.
//!
//! A pool thread (worker or fetch worker) must not be held by a slow reader, so while
//! the connection is lent to one ([`Conn::set_offload`]) a write first tries without
//! blocking and queues what the socket does not take; the connection's own thread
//! writes the queue out when the connection comes back ([`Conn::flush_pending`]), under
//! the same deadline. The queue is bounded, per connection and in all
//! ([`PENDING_PER_CONNECTION`], [`PENDING_TOTAL`]); past either bound a write blocks
//! (back-pressure) until it is under again or the deadline passes.
//!
//! Invariants: the read buffer never grows past the limit it was created with; every read
//! waits at most until a deadline the caller passes, every write at most until the
//! response's deadline; bytes leave in the order they were written; nothing here
//! interprets HTTP.

use std::collections::VecDeque;
use std::io::{self, IoSlice, Read};
use std::net::SocketAddr;

use super::socket::Socket;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use rustix::net::{SendAncillaryBuffer, SendFlags};

use crate::body_file::BodyFile;

/// Reads start with this much buffer; it grows on demand up to the connection's limit.
const INITIAL_BUFFER: usize = 4096;
/// Response bytes queued for one slow client before the pool thread writing them waits
/// for it: a large stored object (`cache.max_object_bytes`' default), so the answer to a
/// miss is usually queued whole and its fetch worker goes back to the pool at once.
pub(crate) const PENDING_PER_CONNECTION: usize = 8 << 20;
/// Response bytes queued for all clients together: the memory slow readers can hold.
pub(crate) const PENDING_TOTAL: usize = 256 << 20;

/// Bytes queued in every connection of the process (bounded by [`PENDING_TOTAL`]).
static QUEUED: AtomicUsize = AtomicUsize::new(0);

/// Response output not written yet, oldest first.
enum Pending {
    /// Bytes, and how many of them are already written.
    Bytes(Vec<u8>, usize),
    /// A stored body (sent with sendfile): where the next byte to send is, and where
    /// the part to send ends (exclusive).
    File(Arc<BodyFile>, u64, u64),
}

pub struct Conn {
    stream: Socket,
    buf: Vec<u8>,
    /// First unconsumed byte in `buf`.
    start: usize,
    limit: usize,
    read_timeout: Option<Duration>,
    pub peer: SocketAddr,
    pending: VecDeque<Pending>,
    /// Bytes in `pending` (files not counted: they take no memory of their own).
    pending_bytes: usize,
    /// The socket's send timeout as last set.
    write_timeout: Option<Duration>,
    /// When the response being written must be out.
    write_deadline: Option<Instant>,
    /// For writes outside a response (an interim `100 Continue`).
    default_write: Duration,
    /// Queue what the socket does not take at once (the connection is lent to a pool
    /// thread) instead of waiting for it.
    offload: bool,
    /// The socket is non-blocking (an I/O thread has it): writes queue, never wait, and
    /// the I/O thread writes the queue out as the socket accepts it.
    nonblocking: bool,
    /// The last read took less than it had room for: the socket had nothing more.
    drained: bool,
}

impl Conn {
    /// `limit` bounds the buffer (the largest head plus room for pipelined bytes);
    /// `default_write` bounds writes made outside a response.
    pub fn new(stream: Socket, peer: SocketAddr, limit: usize, default_write: Duration) -> Conn {
        Conn {
            stream,
            buf: Vec::with_capacity(INITIAL_BUFFER.min(limit)),
            start: 0,
            limit,
            read_timeout: None,
            peer,
            pending: VecDeque::new(),
            pending_bytes: 0,
            write_timeout: None,
            write_deadline: None,
            default_write,
            offload: false,
            nonblocking: false,
            drained: false,
        }
    }

    pub fn stream(&self) -> &Socket {
        &self.stream
    }

    /// Gives the read buffer back while nothing is in it (an idle connection is
    /// parked): the next `fill` takes a new one.
    pub(crate) fn release_buffer(&mut self) {
        if self.buffered().is_empty() {
            self.buf = Vec::new();
            self.start = 0;
        }
    }

    /// The bytes received and not yet consumed.
    pub fn buffered(&self) -> &[u8] {
        &self.buf[self.start..]
    }

    pub(crate) fn consume(&mut self, n: usize) {
        self.start = (self.start + n).min(self.buf.len());
        if self.start == self.buf.len() {
            self.buf.clear();
            self.start = 0;
        }
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
        match self.read_more() {
            Err(e) if matches!(e.kind(), io::ErrorKind::WouldBlock) => {
                Err(io::ErrorKind::TimedOut.into())
            }
            other => other,
        }
    }

    /// Reads what the (non-blocking) socket has into the buffer: `WouldBlock` when it
    /// has nothing now, 0 when the peer closed.
    pub(crate) fn read_available(&mut self) -> io::Result<usize> {
        loop {
            match self.read_more() {
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                other => return other,
            }
        }
    }

    /// One read into the buffer's spare room (grown up to the limit).
    fn read_more(&mut self) -> io::Result<usize> {
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
        let result = (&self.stream).read(&mut self.buf[used..]);
        let n = *result.as_ref().unwrap_or(&0);
        self.buf.truncate(used + n);
        self.drained = n > 0 && n < spare;
        result
    }

    /// Did the last read leave the socket empty (it took less than it had room for)?
    pub(crate) fn drained(&self) -> bool {
        self.drained
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

    /// The deadline of the response about to be written.
    pub(crate) fn set_write_deadline(&mut self, deadline: Instant) {
        self.write_deadline = Some(deadline);
    }

    /// Moves the response's deadline later by `by` (a body of unknown length grows it
    /// as its bytes are written).
    pub(crate) fn extend_write_deadline(&mut self, by: Duration) {
        if let Some(d) = self.write_deadline.as_mut() {
            *d += by;
        }
    }

    /// Lend the connection to a pool thread (`true`: writes queue rather than wait) or
    /// take it back (`false`).
    pub(crate) fn set_offload(&mut self, offload: bool) {
        self.offload = offload;
    }

    /// Hand the connection to an I/O thread (`true`: the socket stops blocking, writes
    /// queue what it does not take) or lend it to a pool thread (`false`: reads and
    /// back-pressure wait on the socket, within their deadlines).
    pub(crate) fn set_nonblocking(&mut self, nonblocking: bool) -> io::Result<()> {
        if self.nonblocking != nonblocking {
            self.stream.set_nonblocking(nonblocking)?;
            self.nonblocking = nonblocking;
        }
        Ok(())
    }

    /// A second handle on the socket for interim (1xx) responses written while the
    /// response proper waits on the origin: only when the socket blocks (lent to a pool
    /// thread) and nothing is queued, so those bytes go out in order.
    pub(crate) fn interim_socket(&self) -> Option<Socket> {
        if self.nonblocking || !self.pending.is_empty() {
            return None;
        }
        self.stream.try_clone().ok()
    }

    /// When the response being written must be out (None: no response yet).
    pub(crate) fn write_deadline(&self) -> Option<Instant> {
        self.write_deadline
    }

    /// Is response output queued?
    #[cfg(test)]
    fn has_output(&self) -> bool {
        !self.pending.is_empty()
    }

    /// Writes what is queued as far as the non-blocking socket takes it: true when all
    /// of it is out, false when the socket is full (wait until it is writable).
    pub(crate) fn flush_available(&mut self) -> io::Result<bool> {
        while !self.pending.is_empty() {
            match self.write_front() {
                Ok(()) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(false),
                Err(e) => return Err(e),
            }
        }
        Ok(true)
    }

    /// Writes out everything queued, waiting at most until the response's deadline.
    #[cfg(test)]
    fn flush_pending(&mut self) -> io::Result<()> {
        while !self.pending.is_empty() {
            self.write_front()?;
        }
        Ok(())
    }

    /// Drops what is queued (the response is being cut).
    pub(crate) fn discard_pending(&mut self) {
        self.pending.clear();
        let n = self.pending_bytes;
        self.release(n);
    }

    /// Writes all of `parts`, in as few system calls as the kernel allows.
    pub(crate) fn write_all_vectored(&mut self, parts: &[&[u8]]) -> io::Result<()> {
        self.write_parts(parts, SendFlags::empty())
    }

    pub fn write_all(&mut self, data: &[u8]) -> io::Result<()> {
        self.write_parts(&[data], SendFlags::empty())
    }

    /// Writes all of `data` with MSG_MORE: the kernel holds it to go out with what the
    /// next write or sendfile sends. Only when more follows at once.
    pub(crate) fn write_all_more(&mut self, data: &[u8]) -> io::Result<()> {
        self.write_parts(&[data], SendFlags::MORE)
    }

    /// Sends bytes `start..end` of a stored body with sendfile (queued, not copied, when
    /// the connection is lent to a pool thread or output is already queued).
    pub(crate) fn send_file(
        &mut self,
        file: &Arc<BodyFile>,
        start: u64,
        end: u64,
    ) -> io::Result<()> {
        let end = end.min(file.len());
        if start >= end {
            return Ok(());
        }
        if self.offload || self.nonblocking || !self.pending.is_empty() {
            self.pending
                .push_back(Pending::File(Arc::clone(file), start, end));
            return Ok(());
        }
        let mut offset = start;
        while offset < end {
            self.wait_to_write()?;
            retry_interrupted(|| file.send_part(&self.stream, &mut offset, end))
                .map_err(timed_out)?;
        }
        Ok(())
    }

    fn write_parts(&mut self, parts: &[&[u8]], flags: SendFlags) -> io::Result<()> {
        let mut parts: Vec<&[u8]> = parts.iter().copied().filter(|p| !p.is_empty()).collect();
        if parts.is_empty() {
            return Ok(());
        }
        if self.pending.is_empty() {
            // Whatever the socket takes now, without waiting: most answers leave here
            // in one system call.
            let n = match self.send(&parts, flags | SendFlags::DONTWAIT) {
                Ok(n) => n,
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => 0,
                Err(e) => return Err(e),
            };
            advance(&mut parts, n);
            if parts.is_empty() {
                return Ok(());
            }
            if !self.offload && !self.nonblocking {
                while !parts.is_empty() {
                    self.wait_to_write()?;
                    let n = retry_interrupted(|| self.send(&parts, flags))?;
                    if n == 0 {
                        return Err(io::ErrorKind::WriteZero.into());
                    }
                    advance(&mut parts, n);
                }
                return Ok(());
            }
        }
        let bytes: Vec<u8> = parts.concat();
        self.queue(bytes);
        if self.nonblocking {
            // An I/O thread never waits: it answers inline only while the process-wide
            // queue is under its bound (`over_queue_bound`), and writes the queue out as
            // the socket takes it.
            return Ok(());
        }
        // Back-pressure: past the bounds, this thread waits for the client after all.
        while self.pending_bytes > PENDING_PER_CONNECTION
            || (self.pending_bytes > 0 && QUEUED.load(Ordering::Relaxed) > PENDING_TOTAL)
        {
            self.write_front()?;
        }
        Ok(())
    }

    fn queue(&mut self, bytes: Vec<u8>) {
        self.pending_bytes += bytes.len();
        QUEUED.fetch_add(bytes.len(), Ordering::Relaxed);
        self.pending.push_back(Pending::Bytes(bytes, 0));
    }

    fn release(&mut self, n: usize) {
        self.pending_bytes -= n;
        QUEUED.fetch_sub(n, Ordering::Relaxed);
    }

    /// One write of the oldest queued output: blocking (within the response's deadline),
    /// or `WouldBlock` on a non-blocking socket that takes nothing now.
    fn write_front(&mut self) -> io::Result<()> {
        let flags = if self.nonblocking {
            SendFlags::DONTWAIT
        } else {
            self.wait_to_write()?;
            SendFlags::empty()
        };
        let blocking = !self.nonblocking;
        let done = match self.pending.front_mut() {
            None => return Ok(()),
            Some(Pending::Bytes(bytes, written)) => {
                let n = retry_interrupted(|| {
                    send(&self.stream, &[IoSlice::new(&bytes[*written..])], flags)
                })?;
                if n == 0 {
                    return Err(io::ErrorKind::WriteZero.into());
                }
                *written += n;
                let done = *written == bytes.len();
                self.pending_bytes -= n;
                QUEUED.fetch_sub(n, Ordering::Relaxed);
                done
            }
            Some(Pending::File(file, offset, end)) => {
                let end = *end;
                let sent = retry_interrupted(|| file.send_part(&self.stream, offset, end));
                if blocking {
                    sent.map_err(timed_out)?;
                } else {
                    sent?;
                }
                *offset >= end
            }
        };
        if done {
            self.pending.pop_front();
        }
        Ok(())
    }

    /// Sets the socket's send timeout to what is left until the response's deadline;
    /// `TimedOut` once it has passed.
    fn wait_to_write(&mut self) -> io::Result<()> {
        let now = Instant::now();
        let deadline = self.write_deadline.unwrap_or(now + self.default_write);
        if now >= deadline {
            return Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "the client did not take the response in time",
            ));
        }
        let left = Duration::from_millis((deadline - now).as_millis().max(1) as u64);
        if self.write_timeout != Some(left) {
            self.stream.set_write_timeout(Some(left))?;
            self.write_timeout = Some(left);
        }
        Ok(())
    }

    fn send(&self, parts: &[&[u8]], flags: SendFlags) -> io::Result<usize> {
        let slices: Vec<IoSlice<'_>> = parts.iter().map(|p| IoSlice::new(p)).collect();
        send(&self.stream, &slices, flags)
    }
}

impl Drop for Conn {
    fn drop(&mut self) {
        QUEUED.fetch_sub(self.pending_bytes, Ordering::Relaxed);
    }
}

/// One `sendmsg`; never raises SIGPIPE. A send timeout that passes is `TimedOut`.
fn send(stream: &Socket, slices: &[IoSlice<'_>], flags: SendFlags) -> io::Result<usize> {
    let mut control = SendAncillaryBuffer::default();
    rustix::net::sendmsg(stream, slices, &mut control, flags | SendFlags::NOSIGNAL).map_err(|e| {
        let e = io::Error::from(e);
        // A blocking send whose SO_SNDTIMEO passed reports EAGAIN.
        if e.kind() == io::ErrorKind::WouldBlock && !flags.contains(SendFlags::DONTWAIT) {
            io::Error::new(
                io::ErrorKind::TimedOut,
                "the client did not take the response in time",
            )
        } else {
            e
        }
    })
}

/// A blocking write's `WouldBlock` is its send timeout passing.
fn timed_out(e: io::Error) -> io::Error {
    if e.kind() == io::ErrorKind::WouldBlock {
        io::Error::new(
            io::ErrorKind::TimedOut,
            "the client did not take the response in time",
        )
    } else {
        e
    }
}

/// Has queued response output reached the bound for all connections? An I/O thread
/// then leaves answers to the pools, whose writes wait for their clients.
pub(crate) fn over_queue_bound() -> bool {
    QUEUED.load(Ordering::Relaxed) > PENDING_TOTAL
}

fn retry_interrupted(mut op: impl FnMut() -> io::Result<usize>) -> io::Result<usize> {
    loop {
        match op() {
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            other => return other,
        }
    }
}

/// Drops the first `n` bytes of `parts`.
fn advance(parts: &mut Vec<&[u8]>, mut n: usize) {
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

/// Bytes queued in every connection now.
#[cfg(test)]
fn queued_bytes() -> usize {
    QUEUED.load(Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{TcpListener, TcpStream};

    fn pair() -> (Conn, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let client = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (server, peer) = listener.accept().unwrap();
        let _ = rustix::net::sockopt::set_socket_send_buffer_size(&server, 4096);
        (
            Conn::new(server.into(), peer, 64 * 1024, Duration::from_secs(5)),
            client,
        )
    }

    #[test]
    fn an_offloaded_write_queues_what_the_client_does_not_take_and_keeps_the_order() {
        let (mut conn, mut client) = pair();
        conn.set_write_deadline(Instant::now() + Duration::from_secs(5));
        conn.set_offload(true);
        let body: Vec<u8> = (0..3_000_000u32).map(|i| (i % 251) as u8).collect();
        // Returns at once although nobody reads: the rest is queued.
        conn.write_all_vectored(&[b"head", &body]).unwrap();
        conn.write_all(b"tail").unwrap();
        assert!(conn.has_output());
        assert!(queued_bytes() > 0);
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            client.read_to_end(&mut got).unwrap();
            got
        });
        conn.set_offload(false);
        conn.flush_pending().unwrap();
        assert!(!conn.has_output());
        drop(conn);
        let got = reader.join().unwrap();
        assert_eq!(got.len(), 4 + body.len() + 4);
        assert_eq!(&got[..4], b"head");
        assert_eq!(&got[4..4 + body.len()], &body[..]);
        assert_eq!(&got[4 + body.len()..], b"tail");
    }

    #[test]
    fn a_write_the_client_does_not_take_fails_at_the_deadline() {
        let (mut conn, _client) = pair();
        conn.set_write_deadline(Instant::now() + Duration::from_millis(300));
        let started = Instant::now();
        let body = vec![0u8; 16 << 20];
        let err = conn.write_all(&body).unwrap_err();
        assert_eq!(err.kind(), io::ErrorKind::TimedOut);
        assert!(started.elapsed() < Duration::from_secs(3));
    }
}
