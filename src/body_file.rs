//! A stored body in a sealed memfd, so a hit sends it with `sendfile`: the kernel takes
//! the pages as they are instead of copying the body from Echo's memory into the
//! socket (nginx gets the same from its page cache). Used by the memory store for
//! bodies of at least [`MIN_BYTES`], while fewer than the budget exist ([`MAX_FILES`],
//! or a sixteenth of the open-files limit if that is less).
//!
//! Below both `store` (which makes the files) and `http` (which sends them): it knows
//! nothing of either, only bytes, descriptors and sockets.
//!
//! Invariants: the file is written once and sealed (no write, grow or shrink) before
//! anyone can read it; readers use offsets (`sendfile` with an offset, `pread`), never
//! the shared file position, so any number of threads send one file at once. Each file
//! is one descriptor, which is why they are capped: a full cap keeps bodies in memory
//! (they are copied on the way out, as before), it never fails a store.

use std::fs::File;
use std::io;
use std::os::fd::AsFd;
use std::os::unix::fs::FileExt;
use std::sync::atomic::{AtomicUsize, Ordering};

use rustix::fs::{MemfdFlags, SealFlags};

/// Bodies smaller than this are copied: a copy of a few KiB costs less than the
/// extra system call and the descriptor.
pub(crate) const MIN_BYTES: usize = 32 * 1024;
/// Files open at once, in the whole process: descriptors are shared with client and
/// origin connections.
pub(crate) const MAX_FILES: usize = 1024;

static OPEN: AtomicUsize = AtomicUsize::new(0);
static BUDGET: AtomicUsize = AtomicUsize::new(MAX_FILES);

/// Caps the files at `n` (never above [`MAX_FILES`]): Echo gives them a sixteenth of
/// its open-files limit, so they cannot starve client connections of descriptors.
pub(crate) fn set_budget(n: usize) {
    BUDGET.store(n.min(MAX_FILES), Ordering::SeqCst);
}

#[derive(Debug)]
pub struct BodyFile {
    file: File,
    len: u64,
}

impl BodyFile {
    /// A sealed copy of `body`, or None when the cap is reached or the kernel refuses
    /// (the caller keeps the bytes in memory).
    pub(crate) fn create(body: &[u8]) -> Option<BodyFile> {
        if OPEN.fetch_add(1, Ordering::SeqCst) >= BUDGET.load(Ordering::SeqCst) {
            OPEN.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        match Self::write_sealed(body) {
            Ok(file) => Some(BodyFile {
                file,
                len: body.len() as u64,
            }),
            Err(e) => {
                OPEN.fetch_sub(1, Ordering::SeqCst);
                log::debug!("body kept in memory: memfd failed: {e}");
                None
            }
        }
    }

    fn write_sealed(body: &[u8]) -> io::Result<File> {
        let fd =
            rustix::fs::memfd_create("echo-body", MemfdFlags::CLOEXEC | MemfdFlags::ALLOW_SEALING)?;
        let file = File::from(fd);
        file.write_all_at(body, 0)?;
        rustix::fs::fcntl_add_seals(
            &file,
            SealFlags::WRITE | SealFlags::GROW | SealFlags::SHRINK | SealFlags::SEAL,
        )?;
        Ok(file)
    }

    pub(crate) fn len(&self) -> u64 {
        self.len
    }

    /// One `sendfile` of the body from `offset` (moved on by what was sent) up to `end`
    /// (exclusive; at most the body's length) to `out`: `WouldBlock` when a blocking
    /// socket's send timeout passed with nothing sent, or a non-blocking one takes
    /// nothing now.
    pub(crate) fn send_part(
        &self,
        out: impl AsFd,
        offset: &mut u64,
        end: u64,
    ) -> io::Result<usize> {
        let end = end.min(self.len);
        let left = usize::try_from(end.saturating_sub(*offset)).unwrap_or(usize::MAX);
        match rustix::fs::sendfile(out, &self.file, Some(offset), left) {
            Ok(0) if left > 0 => Err(io::ErrorKind::WriteZero.into()),
            Ok(n) => Ok(n),
            // A blocking socket's send timeout passed, or a non-blocking one is full:
            // WouldBlock, for the caller to tell apart.
            Err(e) => Err(e.into()),
        }
    }

    /// Appends bytes `range` of the body to `out` (a multipart range answer's parts).
    pub(crate) fn read_range(
        &self,
        range: std::ops::Range<u64>,
        out: &mut Vec<u8>,
    ) -> io::Result<()> {
        let end = range.end.min(self.len);
        let n = usize::try_from(end.saturating_sub(range.start))
            .map_err(|_| io::Error::from(io::ErrorKind::InvalidInput))?;
        let at = out.len();
        out.resize(at + n, 0);
        let read = self.file.read_exact_at(&mut out[at..], range.start);
        if read.is_err() {
            out.truncate(at);
        }
        read
    }

    /// The body as bytes (for the rare reader that needs them: encoding, tests).
    pub(crate) fn read(&self) -> io::Result<Vec<u8>> {
        let mut out = vec![0u8; usize::try_from(self.len).unwrap_or(0)];
        self.file.read_exact_at(&mut out, 0)?;
        Ok(out)
    }
}

impl Drop for BodyFile {
    fn drop(&mut self) {
        OPEN.fetch_sub(1, Ordering::SeqCst);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Read;
    use std::net::{TcpListener, TcpStream};

    #[test]
    fn a_body_file_sends_exactly_its_bytes_and_is_sealed() {
        let body: Vec<u8> = (0..100_000u32).map(|i| (i % 251) as u8).collect();
        let f = BodyFile::create(&body).expect("memfd");
        assert_eq!(f.len(), body.len() as u64);
        assert_eq!(f.read().unwrap(), body);
        // Sealed: no write can change what readers see.
        assert!(f.file.write_all_at(b"x", 0).is_err());
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let out = TcpStream::connect(listener.local_addr().unwrap()).unwrap();
        let (mut inbound, _) = listener.accept().unwrap();
        let reader = std::thread::spawn(move || {
            let mut got = Vec::new();
            inbound.read_to_end(&mut got).unwrap();
            got
        });
        for _ in 0..2 {
            let mut offset = 0;
            while offset < f.len() {
                f.send_part(&out, &mut offset, f.len()).unwrap();
            }
        }
        drop(out);
        let got = reader.join().unwrap();
        assert_eq!(got.len(), 2 * body.len());
        assert_eq!(&got[..body.len()], &body[..]);
        assert_eq!(&got[body.len()..], &body[..]);
    }
}
