//! The stored form of a key's variants: one byte string holding a version byte and every
//! Vary variant (status, fields with repeats kept, times for the Age calculation,
//! freshness, Vary snapshot, tags, body), so a hit is one read.
//!
//! Layout, version 1 (all integers big-endian):
//! ```text
//! u8 version = 1
//! u16 variants
//! per variant:
//!   u16 status, u64 response_time (ms since the epoch), u64 initial_age (ms), u64 freshness (ms)
//!   u32 fields,  per field: u16 name length, name, u32 value length, value
//!   u16 vary,    per entry: u16 name length, name, u8 present, [u32 length, value]
//!   u16 tags,    per tag:   u16 length, tag
//!   u32 body length, body
//! ```
//! Invariants: decoding never panics and never trusts a length (every read is bounds
//! checked); anything that is not exactly a version-1 value is an error, which callers
//! treat as a miss. Written here because the format is Echo's own and small; a serde
//! format crate would add a dependency for twenty lines.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use super::Entry;

const VERSION: u8 = 1;

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DecodeError(&'static str);

impl fmt::Display for DecodeError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "undecodable stored value: {}", self.0)
    }
}

/// Encodes the variants of one key.
pub fn encode(variants: &[Arc<Entry>]) -> Vec<u8> {
    let size: usize = variants.iter().map(|e| e.size()).sum();
    let mut out = Vec::with_capacity(size + 16);
    out.push(VERSION);
    put_u16(&mut out, variants.len());
    for e in variants {
        out.extend_from_slice(&e.status.to_be_bytes());
        out.extend_from_slice(&millis_since_epoch(e.response_time).to_be_bytes());
        out.extend_from_slice(&millis(e.initial_age).to_be_bytes());
        out.extend_from_slice(&millis(e.freshness).to_be_bytes());
        put_u32(&mut out, e.headers.len());
        for (name, value) in &e.headers {
            put_u16(&mut out, name.len());
            out.extend_from_slice(name.as_bytes());
            put_u32(&mut out, value.len());
            out.extend_from_slice(value);
        }
        put_u16(&mut out, e.vary.len());
        for (name, value) in &e.vary {
            put_u16(&mut out, name.len());
            out.extend_from_slice(name.as_bytes());
            match value {
                Some(v) => {
                    out.push(1);
                    put_u32(&mut out, v.len());
                    out.extend_from_slice(v.as_bytes());
                }
                None => out.push(0),
            }
        }
        put_u16(&mut out, e.tags.len());
        for tag in &e.tags {
            put_u16(&mut out, tag.len());
            out.extend_from_slice(tag.as_bytes());
        }
        // Only the memory store keeps bodies in files and it never encodes; should an
        // entry with one get here, its bytes are read back rather than lost.
        let from_file = e.file.as_ref().and_then(|f| f.read().ok());
        let body = from_file.as_deref().unwrap_or(&e.body);
        put_u32(&mut out, body.len());
        out.extend_from_slice(body);
    }
    out
}

/// Decodes what [`encode`] wrote.
pub fn decode(bytes: &[u8]) -> Result<Vec<Arc<Entry>>, DecodeError> {
    let mut r = Reader { bytes, at: 0 };
    if r.u8()? != VERSION {
        return Err(DecodeError("unknown version"));
    }
    let count = r.u16()?;
    let mut variants = Vec::with_capacity(count.min(64));
    for _ in 0..count {
        let status = r.u16()? as u16;
        let response_time = UNIX_EPOCH + Duration::from_millis(r.u64()?);
        let initial_age = Duration::from_millis(r.u64()?);
        let freshness = Duration::from_millis(r.u64()?);
        let fields = r.u32()?;
        let mut headers = Vec::with_capacity(fields.min(256));
        for _ in 0..fields {
            let name = r.string_u16()?;
            let len = r.u32()?;
            headers.push((name, r.take(len)?.to_vec()));
        }
        let vary_count = r.u16()?;
        let mut vary = Vec::with_capacity(vary_count.min(64));
        for _ in 0..vary_count {
            let name = r.string_u16()?;
            let value = match r.u8()? {
                0 => None,
                1 => {
                    let len = r.u32()?;
                    Some(utf8(r.take(len)?)?)
                }
                _ => return Err(DecodeError("bad vary flag")),
            };
            vary.push((name, value));
        }
        let tag_count = r.u16()?;
        let mut tags = Vec::with_capacity(tag_count.min(64));
        for _ in 0..tag_count {
            tags.push(r.string_u16()?);
        }
        let body_len = r.u32()?;
        let body = r.take(body_len)?.to_vec();
        variants.push(Arc::new(Entry {
            status,
            headers,
            body,
            file: None,
            response_time,
            initial_age,
            freshness,
            vary,
            tags,
        }));
    }
    if r.at != bytes.len() {
        return Err(DecodeError("trailing bytes"));
    }
    Ok(variants)
}

fn millis(d: Duration) -> u64 {
    u64::try_from(d.as_millis()).unwrap_or(u64::MAX)
}

fn millis_since_epoch(t: SystemTime) -> u64 {
    t.duration_since(UNIX_EPOCH).map_or(0, millis)
}

// Lengths past a field's width cannot be encoded; they are clamped, and such an entry
// (a 64 KiB field name) would fail to decode and be a miss, never a wrong answer.
fn put_u16(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&u16::try_from(n).unwrap_or(u16::MAX).to_be_bytes());
}

fn put_u32(out: &mut Vec<u8>, n: usize) {
    out.extend_from_slice(&u32::try_from(n).unwrap_or(u32::MAX).to_be_bytes());
}

fn utf8(bytes: &[u8]) -> Result<String, DecodeError> {
    String::from_utf8(bytes.to_vec()).map_err(|_| DecodeError("text is not UTF-8"))
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], DecodeError> {
        let end = self
            .at
            .checked_add(n)
            .ok_or(DecodeError("length overflow"))?;
        let slice = self
            .bytes
            .get(self.at..end)
            .ok_or(DecodeError("truncated"))?;
        self.at = end;
        Ok(slice)
    }

    fn u8(&mut self) -> Result<u8, DecodeError> {
        Ok(self.take(1)?[0])
    }

    fn u16(&mut self) -> Result<usize, DecodeError> {
        let b = self.take(2)?;
        Ok(usize::from(u16::from_be_bytes([b[0], b[1]])))
    }

    fn u32(&mut self) -> Result<usize, DecodeError> {
        let b = self.take(4)?;
        usize::try_from(u32::from_be_bytes([b[0], b[1], b[2], b[3]]))
            .map_err(|_| DecodeError("length too large"))
    }

    fn u64(&mut self) -> Result<u64, DecodeError> {
        let b = self.take(8)?;
        let mut a = [0u8; 8];
        a.copy_from_slice(b);
        Ok(u64::from_be_bytes(a))
    }

    fn string_u16(&mut self) -> Result<String, DecodeError> {
        let len = self.u16()?;
        utf8(self.take(len)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn entry(body: &[u8], vary: &[(&str, Option<&str>)]) -> Arc<Entry> {
        Arc::new(Entry {
            status: 203,
            headers: vec![
                ("set-cookie".into(), b"a=1".to_vec()),
                ("set-cookie".into(), b"b=2".to_vec()),
                ("x-bin".into(), vec![0xff, 0x00, 0x80]),
            ],
            body: body.to_vec(),
            file: None,
            response_time: UNIX_EPOCH + Duration::from_millis(1_700_000_000_123),
            initial_age: Duration::from_millis(4_500),
            freshness: Duration::from_secs(60),
            vary: vary
                .iter()
                .map(|(n, v)| (n.to_string(), v.map(str::to_string)))
                .collect(),
            tags: vec!["org-42".into(), "user-7".into()],
        })
    }

    fn same(a: &Entry, b: &Entry) -> bool {
        a.status == b.status
            && a.headers == b.headers
            && a.body == b.body
            && a.response_time == b.response_time
            && a.initial_age == b.initial_age
            && a.freshness == b.freshness
            && a.vary == b.vary
            && a.tags == b.tags
    }

    #[test]
    fn variants_round_trip_exactly() {
        let variants = vec![
            entry(b"gzip body", &[("accept-encoding", Some("gzip"))]),
            entry(b"", &[("accept-encoding", None)]),
            entry(&vec![7u8; 100_000], &[]),
        ];
        let decoded = decode(&encode(&variants)).unwrap();
        assert_eq!(decoded.len(), 3);
        for (a, b) in variants.iter().zip(&decoded) {
            assert!(same(a, b));
        }
    }

    #[test]
    fn anything_but_a_whole_version_1_value_is_refused() {
        let good = encode(&[entry(b"body", &[("a", Some("b"))])]);
        // Every truncation fails; none panics.
        for cut in 0..good.len() {
            assert!(decode(&good[..cut]).is_err(), "cut at {cut}");
        }
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(decode(&trailing).is_err());
        let mut other_version = good.clone();
        other_version[0] = 2;
        assert!(decode(&other_version).is_err());
        assert!(decode(b"").is_err());
        assert!(decode(b"plain text someone SET by hand").is_err());
        // Pseudo-random bytes (fixed seed) never panic the decoder.
        let mut x: u64 = 0x9e3779b97f4a7c15;
        for _ in 0..2000 {
            let len = (x % 300) as usize;
            let bytes: Vec<u8> = (0..len)
                .map(|_| {
                    x = x
                        .wrapping_mul(6364136223846793005)
                        .wrapping_add(1442695040888963407);
                    (x >> 33) as u8
                })
                .collect();
            let _ = decode(&bytes);
        }
    }
}
