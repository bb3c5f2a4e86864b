//! Compression at store time (`cache.compress`): an uncompressed, compressible response is
//! encoded once, when it is stored, in the first configured coding; a client that accepts
//! that coding gets the stored bytes, one that does not gets them decoded.
//!
//! The stored entry keeps the origin's fields as they were (its ETag, no
//! Content-Encoding), so revalidation and 304 updates work on the origin's own
//! representation; an internal field, [`STORED_CODING`], says how the body is held. What
//! a client is sent is built per answer ([`for_client`]): the encoded representation has
//! `Content-Encoding`, `Vary: Accept-Encoding` and its own entity-tag (the origin's with
//! `-gzip` / `-br` inside the quotes, as RFC 9110 §8.8.3 requires: "a different entity
//! tag for each representation"); the decoded one is the origin's.
//!
//! Invariants: never double-encoded (a response with any `Content-Encoding`, or already
//! held encoded, is left as it is); never against `no-transform` (RFC 9110 §7.7: "A proxy
//! MUST NOT transform the content ... of a response containing the no-transform cache
//! directive"); only 200 responses of a compressible media type, from `MIN_BYTES` to
//! `MAX_BYTES`, and only when encoding makes them smaller; the internal field never
//! leaves Echo.
//!
//! What it must not do: compress on the way out (a hit costs at most a decode, for the
//! rare client that takes no compression).

use std::io::{Read, Write};
use std::sync::Arc;

use super::encoding;
use crate::http::headers;
use crate::http::Request;
use crate::policy::CacheControl;
use crate::store::Entry;

/// The internal field that says in which coding a stored body is held (removed from
/// every answer by the response writer).
pub const STORED_CODING: &str = "echo-stored-coding";

/// Smaller bodies are not worth a coding's overhead.
const MIN_BYTES: usize = 256;

/// Larger bodies are stored as they are: a hit for a client that takes no compression
/// decodes the body, possibly on an I/O thread (a memory-store hit is answered there),
/// and decoding 256 KiB of text takes well under a millisecond; megabytes would hold up
/// every connection of that thread.
const MAX_BYTES: usize = 256 * 1024;

/// Bodies larger than this are not decoded for a client (a decompression bomb guard:
/// Echo only decodes what it encoded itself, but Redis is shared).
const MAX_DECODED: usize = 256 * 1024 * 1024;

/// Is this media type worth compressing (text, not already compressed)?
fn compressible(content_type: &[u8]) -> bool {
    let ct = String::from_utf8_lossy(content_type).to_ascii_lowercase();
    let essence = ct.split(';').next().unwrap_or("").trim();
    essence.starts_with("text/")
        || essence.ends_with("+json")
        || essence.ends_with("+xml")
        || matches!(
            essence,
            "application/json"
                | "application/javascript"
                | "application/x-javascript"
                | "application/ecmascript"
                | "application/xml"
                | "application/wasm"
                | "image/svg+xml"
                | "image/x-icon"
                | "application/vnd.ms-fontobject"
                | "font/ttf"
                | "font/otf"
        )
}

/// The entry as it is to be stored: its body encoded in the first of `codings` when it
/// qualifies (see the module's invariants), else None (store it as it is).
pub(super) fn encode_for_store(entry: &Entry, codings: &[String]) -> Option<Entry> {
    let coding = codings.first()?;
    if entry.status != 200
        || entry.file.is_some()
        || entry.body.len() < MIN_BYTES
        || entry.body.len() > MAX_BYTES
        || headers::has_header(&entry.headers, STORED_CODING)
        || headers::header(&entry.headers, "content-encoding")
            .is_some_and(|v| !v.trim_ascii().eq_ignore_ascii_case(b"identity"))
        || !headers::header(&entry.headers, "content-type").is_some_and(compressible)
        || CacheControl::parse(&entry.headers).no_transform
    {
        return None;
    }
    let encoded = encode(coding, &entry.body)?;
    if encoded.len() >= entry.body.len() {
        return None;
    }
    let mut headers = entry.headers.clone();
    headers.push((STORED_CODING.into(), coding.as_bytes().to_vec()));
    Some(Entry {
        headers,
        body: encoded,
        ..entry.clone()
    })
}

fn encode(coding: &str, body: &[u8]) -> Option<Vec<u8>> {
    match coding {
        "gzip" => {
            let mut out = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::new(6));
            out.write_all(body).ok()?;
            out.finish().ok()
        }
        "br" => {
            let mut out = Vec::new();
            let params = brotli::enc::BrotliEncoderParams {
                quality: 5,
                lgwin: 22,
                ..Default::default()
            };
            brotli::BrotliCompress(&mut &body[..], &mut out, &params).ok()?;
            Some(out)
        }
        _ => None,
    }
}

fn decode(coding: &str, body: &[u8]) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let limit = MAX_DECODED as u64 + 1;
    let read = match coding {
        "gzip" => flate2::read::GzDecoder::new(body)
            .take(limit)
            .read_to_end(&mut out),
        "br" => brotli::Decompressor::new(body, 64 * 1024)
            .take(limit)
            .read_to_end(&mut out),
        _ => return None,
    };
    (read.is_ok() && out.len() <= MAX_DECODED).then_some(out)
}

/// The entry as this client is to get it, when it is held encoded (None: held as the
/// origin sent it, sent as it is). The encoded representation to a client that accepts
/// its coding, else the decoded one; None also when the stored bytes do not decode (the
/// caller then answers as if nothing were stored encoded — they are sent as stored).
pub(super) fn for_client(entry: &Entry, req: &Request) -> Option<Entry> {
    let coding = headers::header(&entry.headers, STORED_CODING)?;
    let coding = std::str::from_utf8(coding).ok()?.to_string();
    let accepted = headers::header_joined_bytes(&req.headers, "accept-encoding")
        .is_some_and(|ae| encoding::normalize(&ae, std::slice::from_ref(&coding)) != "identity");
    let mut fields: Vec<(String, Vec<u8>)> = entry
        .headers
        .iter()
        .filter(|(n, _)| n != STORED_CODING)
        .cloned()
        .collect();
    // RFC 9110 §12.5.5: the representation now depends on Accept-Encoding.
    if !headers::list_members(&fields, "vary").any(|m| m.eq_ignore_ascii_case(b"accept-encoding")) {
        fields.push(("vary".into(), b"Accept-Encoding".to_vec()));
    }
    if accepted {
        for (name, value) in fields.iter_mut() {
            if name == "etag" {
                *value = tagged(value, &coding);
            }
        }
        fields.push(("content-encoding".into(), coding.into_bytes()));
        return Some(Entry {
            headers: fields,
            ..entry.clone()
        });
    }
    let stored = match &entry.file {
        Some(file) => file.read().ok()?,
        None => entry.body.clone(),
    };
    let body = decode(&coding, &stored)?;
    Some(Entry {
        headers: fields,
        body,
        file: None::<Arc<_>>,
        ..entry.clone()
    })
}

/// The entity-tag of the encoded representation: the origin's, `-coding` added inside
/// its quotes (`"abc"` → `"abc-gzip"`, `W/"abc"` → `W/"abc-gzip"`).
fn tagged(etag: &[u8], coding: &str) -> Vec<u8> {
    let t = etag.trim_ascii();
    match t.strip_suffix(b"\"") {
        Some(open) if open.starts_with(b"\"") || open.starts_with(b"W/\"") => {
            let mut out = open.to_vec();
            out.push(b'-');
            out.extend_from_slice(coding.as_bytes());
            out.push(b'"');
            out
        }
        _ => t.to_vec(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn codings_round_trip() {
        let body = b"hello hello hello hello hello hello hello hello".repeat(40);
        for coding in ["gzip", "br"] {
            let enc = encode(coding, &body).expect(coding);
            assert!(enc.len() < body.len(), "{coding}");
            assert_eq!(decode(coding, &enc).as_deref(), Some(&body[..]), "{coding}");
        }
        assert!(decode("gzip", b"not gzip").is_none());
        assert!(encode("zstd", &body).is_none());
    }

    #[test]
    fn entity_tags_are_tagged_per_coding() {
        assert_eq!(tagged(b"\"abc\"", "gzip"), b"\"abc-gzip\"");
        assert_eq!(tagged(b"W/\"abc\"", "br"), b"W/\"abc-br\"");
        assert_eq!(tagged(b"\"\"", "br"), b"\"-br\"");
        assert_eq!(tagged(b"garbage", "br"), b"garbage");
    }

    #[test]
    fn what_is_compressible() {
        for ct in [
            "text/html; charset=utf-8",
            "application/json",
            "application/ld+json",
            "image/svg+xml",
        ] {
            assert!(compressible(ct.as_bytes()), "{ct}");
        }
        for ct in [
            "image/png",
            "application/octet-stream",
            "video/mp4",
            "application/zip",
        ] {
            assert!(!compressible(ct.as_bytes()), "{ct}");
        }
    }
}
