//! Byte ranges of a complete stored response (RFC 9110 §14): which part of it a request's
//! `Range` asks for, after its `If-Range` (§13.1.5).
//!
//! Invariants: only the `bytes` unit is answered; a range-specifier that does not parse
//! is ignored (the whole response answers, §14.2: a server "MAY ignore or reject a Range
//! header field that contains an invalid ranges-specifier"); several ranges that do not
//! coalesce into one are answered as `multipart/byteranges` (§14.6), as nginx does,
//! ascending and with overlaps and small gaps merged (§14.3), unless that would be
//! larger than the whole response or than [`MAX_MULTIPART_BYTES`], when the whole
//! answers (§14.2: a server "MAY ignore the Range header field"); a part is never empty
//! and never reaches past the end.
//!
//! What it must not do: read the response body; decide whether a response may answer
//! at all (the caller has a stored 200 for a GET).

use std::collections::hash_map::RandomState;
use std::hash::BuildHasher;
use std::ops::Range;
use std::sync::atomic::{AtomicU64, Ordering};

use super::headers::{self, HeaderList};

/// How to answer a request for a stored representation of `len` bytes.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RangeAnswer {
    /// No usable Range, or `If-Range` did not match: `200` with the whole body.
    Whole,
    /// `206` with these bytes and `Content-Range: bytes first-last/len`.
    Part(Range<u64>),
    /// `206` as `multipart/byteranges`: these parts (at least two, ascending, apart by
    /// at least [`MERGE_GAP`] bytes) in this `boundary`.
    Parts {
        parts: Vec<Range<u64>>,
        boundary: String,
    },
    /// `416` with `Content-Range: bytes */len` (§15.5.17).
    Unsatisfiable,
}

/// More range-specs than this in one request are not looked at (the whole answers):
/// a client has no use for them, and each costs work (§14.2 warns of such requests).
const MAX_SPECS: usize = 64;

/// Ranges closer than this are sent as one part: a part's own lines (boundary,
/// Content-Type, Content-Range) cost about as much (§14.3: "separated by a gap that is
/// smaller than the overhead of sending multiple parts").
const MERGE_GAP: u64 = 80;

/// A multipart answer is built in memory; a larger one is not built, and the whole
/// answers instead (sent from its memfd without a copy): a few requests for large
/// ranges of large objects must not each cost a copy of them.
pub const MAX_MULTIPART_BYTES: u64 = 1024 * 1024;

/// Does the request ask for byte ranges (a `Range` with the `bytes` unit, valid or not)?
/// A Range in another unit is not Echo's to answer.
pub fn asks_for_bytes(req: &HeaderList) -> bool {
    headers::header(req, "range").is_some_and(|v| {
        let v = v.trim_ascii_start();
        v.len() >= 6 && v[..5].eq_ignore_ascii_case(b"bytes") && v[5] == b'='
    })
}

/// The answer to `req` from a stored representation of `len` bytes with fields `stored`.
pub fn answer(req: &HeaderList, len: u64, stored: &HeaderList) -> RangeAnswer {
    // §14.2: several Range lines are not one valid field value.
    let Some(value) = headers::header_one(req, "range") else {
        return RangeAnswer::Whole;
    };
    if !if_range_matches(req, stored) {
        return RangeAnswer::Whole;
    }
    let Some(specs) = parse(value) else {
        return RangeAnswer::Whole;
    };
    if len == 0 {
        // §14.1.2: of a zero-length representation no range is satisfiable but an
        // empty one, which a 206 cannot carry: the (empty) whole answers.
        return RangeAnswer::Whole;
    }
    let mut parts: Vec<Range<u64>> = specs.iter().filter_map(|s| s.resolve(len)).collect();
    // §14.1.2: "If a valid ranges-specifier contains no satisfiable range-specs, the
    // server responds 416".
    if parts.is_empty() {
        return RangeAnswer::Unsatisfiable;
    }
    // §14.3: "a server MAY coalesce any of the ranges that overlap, or that are separated
    // by a gap that is smaller than the overhead of sending multiple parts, regardless of
    // the order in which the corresponding range-spec appeared".
    parts.sort_by_key(|r| r.start);
    let mut merged: Vec<Range<u64>> = Vec::with_capacity(parts.len());
    for r in parts {
        match merged.last_mut() {
            Some(last) if r.start <= last.end.saturating_add(MERGE_GAP) => {
                last.end = last.end.max(r.end);
            }
            _ => merged.push(r),
        }
    }
    match merged.as_slice() {
        [one] if *one == (0..len) => RangeAnswer::Whole,
        [one] => RangeAnswer::Part(one.clone()),
        _ => {
            let boundary = boundary();
            let content_type = headers::header(stored, "content-type");
            // Many small parts can outweigh the whole: then the whole is the cheaper
            // answer (§14.2 allows ignoring the Range); so it is past the bound.
            let size = multipart_len(&merged, len, content_type, &boundary);
            if size >= len || size > MAX_MULTIPART_BYTES {
                return RangeAnswer::Whole;
            }
            RangeAnswer::Parts {
                parts: merged,
                boundary,
            }
        }
    }
}

/// A boundary for one multipart answer: `echo-` and 16 hex digits, unpredictable (a
/// per-process random hash of a counter), so a body cannot be built to contain it.
fn boundary() -> String {
    static SEQ: AtomicU64 = AtomicU64::new(0);
    let n = SEQ.fetch_add(1, Ordering::Relaxed);
    format!("echo-{:016x}", RandomState::new().hash_one(n))
}

/// The head of part `part` (§14.6): the delimiter (after a CRLF, but for the first
/// part), its `Content-Type` when the representation has one, `Content-Range`.
fn part_head(
    first: bool,
    part: &Range<u64>,
    len: u64,
    content_type: Option<&[u8]>,
    boundary: &str,
) -> Vec<u8> {
    let mut head = Vec::with_capacity(128);
    if !first {
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"--");
    head.extend_from_slice(boundary.as_bytes());
    head.extend_from_slice(b"\r\n");
    if let Some(ct) = content_type {
        head.extend_from_slice(b"content-type: ");
        head.extend_from_slice(ct);
        head.extend_from_slice(b"\r\n");
    }
    head.extend_from_slice(b"content-range: ");
    head.extend_from_slice(content_range(Some(part), len).as_bytes());
    head.extend_from_slice(b"\r\n\r\n");
    head
}

/// The close delimiter that ends a multipart body.
fn close_delimiter(boundary: &str) -> String {
    format!("\r\n--{boundary}--\r\n")
}

/// The length of the multipart body of `parts` (saturating: a representation near 2^64
/// bytes must not wrap to a small size).
fn multipart_len(parts: &[Range<u64>], len: u64, ct: Option<&[u8]>, boundary: &str) -> u64 {
    parts
        .iter()
        .enumerate()
        .map(|(i, p)| {
            (part_head(i == 0, p, len, ct, boundary).len() as u64).saturating_add(p.end - p.start)
        })
        .fold(close_delimiter(boundary).len() as u64, u64::saturating_add)
}

/// The `multipart/byteranges` body of `parts` (§14.6) of a representation of `len`
/// bytes with `Content-Type` `content_type`; `bytes` appends a part's bytes (false:
/// they cannot be read, and there is no body).
pub fn multipart_body(
    parts: &[Range<u64>],
    len: u64,
    content_type: Option<&[u8]>,
    boundary: &str,
    mut bytes: impl FnMut(&Range<u64>, &mut Vec<u8>) -> bool,
) -> Option<Vec<u8>> {
    let total = multipart_len(parts, len, content_type, boundary);
    let mut body = Vec::with_capacity(usize::try_from(total).ok()?);
    for (i, part) in parts.iter().enumerate() {
        body.extend_from_slice(&part_head(i == 0, part, len, content_type, boundary));
        if !bytes(part, &mut body) {
            return None;
        }
    }
    body.extend_from_slice(close_delimiter(boundary).as_bytes());
    Some(body)
}

/// The `Content-Range` value of a part, or of a 416 (`bytes */len`).
pub fn content_range(part: Option<&Range<u64>>, len: u64) -> String {
    match part {
        Some(r) => format!("bytes {}-{}/{len}", r.start, r.end - 1),
        None => format!("bytes */{len}"),
    }
}

/// One range-spec (§14.1.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Spec {
    /// `first-last` (last: None for `first-`).
    From(u64, Option<u64>),
    /// `-suffix`: the last `suffix` bytes.
    Suffix(u64),
}

impl Spec {
    /// The bytes this spec selects of `len` (> 0), or None when it is unsatisfiable.
    // §14.1.1: "A int-range is satisfiable if the first-pos is less than the current
    // length of the selected representation"; "A suffix-range is satisfiable if the
    // suffix-length is not zero"; a last-pos past the end means the end.
    fn resolve(self, len: u64) -> Option<Range<u64>> {
        match self {
            Spec::From(first, _) if first >= len => None,
            Spec::From(first, last) => {
                let end = last.map_or(len, |l| l.saturating_add(1).min(len));
                Some(first..end)
            }
            Spec::Suffix(0) => None,
            Spec::Suffix(n) => Some(len - n.min(len)..len),
        }
    }
}

/// `bytes=spec, spec, ...` (§14.1.1, the unit case-insensitive, OWS around commas,
/// empty list elements skipped as §5.6.1 asks); None if any spec is invalid or there
/// are more than `MAX_SPECS`.
fn parse(value: &[u8]) -> Option<Vec<Spec>> {
    let value = std::str::from_utf8(value).ok()?.trim();
    let (unit, set) = value.split_once('=')?;
    if !unit.eq_ignore_ascii_case("bytes") {
        return None;
    }
    let mut specs = Vec::new();
    for member in set.split(',').map(str::trim).filter(|m| !m.is_empty()) {
        if specs.len() == MAX_SPECS {
            return None;
        }
        let (first, last) = member.split_once('-')?;
        let spec = match (first, last) {
            ("", suffix) => Spec::Suffix(digits(suffix)?),
            (first, "") => Spec::From(digits(first)?, None),
            (first, last) => {
                let (first, last) = (digits(first)?, digits(last)?);
                // §14.1.1: "A range-spec is invalid if ... the last-pos value is less
                // than the first-pos value."
                if last < first {
                    return None;
                }
                Spec::From(first, Some(last))
            }
        };
        specs.push(spec);
    }
    (!specs.is_empty()).then_some(specs)
}

/// 1*DIGIT, saturating (a position past any length is still past it).
fn digits(s: &str) -> Option<u64> {
    if s.is_empty() || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    Some(s.bytes().fold(0u64, |n, d| {
        n.saturating_mul(10).saturating_add(u64::from(d - b'0'))
    }))
}

/// §13.1.5: without `If-Range` the Range applies; with it, only when its validator
/// matches the stored one: an entity-tag by strong comparison ("A client MUST NOT
/// generate an If-Range header field containing an entity tag that is marked as weak"),
/// a date only if it equals a strong `Last-Modified` ("the server ... MUST consider the
/// field value true if it is an exact match and the Last-Modified is strong").
fn if_range_matches(req: &HeaderList, stored: &HeaderList) -> bool {
    let Some(condition) = headers::header(req, "if-range").map(<[u8]>::trim_ascii) else {
        return true;
    };
    // RFC 9110 §8.8.3.2: "Strong comparison: two entity tags are equivalent if both are
    // not weak and their opaque-tags match character-by-character."
    if let Some((weak, opaque)) = crate::policy::entity_tag(condition) {
        let stored = headers::header(stored, "etag").and_then(crate::policy::entity_tag);
        return !weak && stored.is_some_and(|(stored_weak, o)| !stored_weak && o == opaque);
    }
    if condition.starts_with(b"\"") || condition.starts_with(b"W/") {
        // A malformed entity-tag matches nothing.
        return false;
    }
    let (Some(date), Some(modified)) = (
        headers::parse_date(condition),
        headers::header(stored, "last-modified").and_then(headers::parse_date),
    ) else {
        return false;
    };
    // §8.8.2.2: a Last-Modified is strong when it is at least one second before the
    // response's Date (the resource could not have changed twice within it).
    let strong = headers::header(stored, "date")
        .and_then(headers::parse_date)
        .is_some_and(|d| {
            d.duration_since(modified)
                .is_ok_and(|gap| gap.as_secs() >= 1)
        });
    strong && date == modified
}

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    fn ask(range: &str, len: u64) -> RangeAnswer {
        answer(&h(&[("range", range)]), len, &[])
    }

    #[test]
    fn every_form_of_range_spec() {
        use RangeAnswer::*;
        for (range, want) in [
            ("bytes=0-99", Part(0..100)),
            ("bytes=100-199", Part(100..200)),
            ("bytes=900-", Part(900..1000)),
            ("bytes=-100", Part(900..1000)),
            ("bytes=990-2000", Part(990..1000)),
            ("Bytes = 5-9 ", Whole),
            ("BYTES=5-9", Part(5..10)),
            ("bytes=5-9, ", Part(5..10)),
            // Closer than MERGE_GAP: one part.
            ("bytes= 5-9 ,, 20-29", Part(5..30)),
            // Overlapping or adjacent ranges coalesce.
            ("bytes=0-9,5-19", Part(0..20)),
            ("bytes=10-19,0-9", Part(0..20)),
            // The whole, asked for as a range, is the whole.
            ("bytes=0-", Whole),
            ("bytes=-5000", Whole),
            // Unsatisfiable: every spec starts past the end, or is an empty suffix.
            ("bytes=1000-", Unsatisfiable),
            ("bytes=5000-6000", Unsatisfiable),
            ("bytes=-0", Unsatisfiable),
            ("bytes=1000-1001, 2000-", Unsatisfiable),
            ("bytes=1000-, 0-9", Part(0..10)),
            // Invalid: ignored.
            ("bytes=9-5", Whole),
            ("bytes=a-b", Whole),
            ("bytes=-", Whole),
            ("bytes=", Whole),
            ("bytes=1-2-3", Whole),
            ("bytes=+1-2", Whole),
            ("items=0-9", Whole),
            ("bytes=99999999999999999999999-", Unsatisfiable),
        ] {
            assert_eq!(ask(range, 1000), want, "{range}");
        }
        // Parts apart: multipart, ascending, overlaps merged; unless the parts with
        // their own lines would outweigh the whole.
        let parts = |a: RangeAnswer| match a {
            Parts { parts, boundary } => {
                assert!(boundary.starts_with("echo-") && boundary.len() == 21);
                Some(parts)
            }
            _ => None,
        };
        assert_eq!(
            parts(ask("bytes=0-0,-1", 1000)),
            Some(vec![0..1, 999..1000])
        );
        assert_eq!(
            parts(ask("bytes=500-599,0-99,550-649", 1000)),
            Some(vec![0..100, 500..650])
        );
        assert_eq!(ask("bytes=0-0,-1", 150), Whole, "151 bytes of multipart");
        let big = 4 * MAX_MULTIPART_BYTES;
        assert!(parts(ask("bytes=0-0,-1", big)).is_some());
        let past = format!("bytes=0-0,-{}", MAX_MULTIPART_BYTES);
        assert_eq!(ask(&past, big), Whole, "past the bound");
        // Lengths near 2^64 saturate instead of wrapping to a small multipart.
        assert_eq!(ask("bytes=0-0,90-", u64::MAX), Whole);
        assert_eq!(ask("bytes=0-0,100-", u64::MAX), Whole);
        let many = format!("bytes={}", vec!["0-1"; 65].join(","));
        assert_eq!(ask(&many, 1000), Whole);
        assert_eq!(ask("bytes=0-9", 0), Whole);
        let two_lines = h(&[("range", "bytes=0-9"), ("range", "bytes=10-19")]);
        assert_eq!(answer(&two_lines, 1000, &[]), Whole);
    }

    /// §14.6: each part has its delimiter, Content-Type and Content-Range; the body ends
    /// with the close delimiter; the length announced is the length built.
    #[test]
    fn multipart_bodies_frame_every_part() {
        let whole = b"abcdefghijklmnop";
        let parts = [0..2, 10..12];
        let body = multipart_body(&parts, 16, Some(b"text/plain"), "echo-b", |p, out| {
            out.extend_from_slice(&whole[p.start as usize..p.end as usize]);
            true
        })
        .expect("a body");
        assert_eq!(
            String::from_utf8(body.clone()).expect("text"),
            "--echo-b\r\ncontent-type: text/plain\r\ncontent-range: bytes 0-1/16\r\n\r\nab\
             \r\n--echo-b\r\ncontent-type: text/plain\r\ncontent-range: bytes 10-11/16\r\n\r\nkl\
             \r\n--echo-b--\r\n"
        );
        assert_eq!(
            multipart_len(&parts, 16, Some(b"text/plain"), "echo-b"),
            body.len() as u64
        );
        assert_eq!(
            multipart_body(&parts, 16, None, "echo-b", |_, _| false),
            None
        );
        assert_ne!(boundary(), boundary());
    }

    #[test]
    fn if_range_needs_a_strong_match() {
        let stored = h(&[
            ("etag", "\"v1\""),
            ("date", "Tue, 15 Nov 1994 08:12:31 GMT"),
            ("last-modified", "Tue, 15 Nov 1994 08:00:00 GMT"),
        ]);
        let part = RangeAnswer::Part(0..10);
        for (if_range, want) in [
            ("\"v1\"", part.clone()),
            ("\"v2\"", RangeAnswer::Whole),
            ("W/\"v1\"", RangeAnswer::Whole),
            ("Tue, 15 Nov 1994 08:00:00 GMT", part.clone()),
            ("Tuesday, 15-Nov-94 08:00:00 GMT", part.clone()),
            ("Tue, 15 Nov 1994 08:00:01 GMT", RangeAnswer::Whole),
            ("yesterday", RangeAnswer::Whole),
        ] {
            let req = h(&[("range", "bytes=0-9"), ("if-range", if_range)]);
            assert_eq!(answer(&req, 100, &stored), want, "{if_range}");
        }
        // A weak stored ETag never matches; a Last-Modified within a second of Date is
        // weak.
        let weak = h(&[
            ("etag", "W/\"v1\""),
            ("date", "Tue, 15 Nov 1994 08:00:00 GMT"),
            ("last-modified", "Tue, 15 Nov 1994 08:00:00 GMT"),
        ]);
        for if_range in ["W/\"v1\"", "\"v1\"", "Tue, 15 Nov 1994 08:00:00 GMT"] {
            let req = h(&[("range", "bytes=0-9"), ("if-range", if_range)]);
            assert_eq!(answer(&req, 100, &weak), RangeAnswer::Whole, "{if_range}");
        }
    }

    #[test]
    fn content_range_values() {
        assert_eq!(content_range(Some(&(0..10)), 100), "bytes 0-9/100");
        assert_eq!(content_range(None, 100), "bytes */100");
        assert!(asks_for_bytes(&h(&[("range", "Bytes=0-1")])));
        assert!(asks_for_bytes(&h(&[("range", "bytes=garbage")])));
        assert!(!asks_for_bytes(&h(&[("range", "items=0-1")])));
        assert!(!asks_for_bytes(&h(&[])));
    }
}
