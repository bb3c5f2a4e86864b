//! `Accept-Encoding` normalised before a request is looked up (as Varnish does with
//! `http_gzip_support`): `gzip`, `gzip, deflate` and `deflate;q=0.5, gzip` all become
//! `gzip`, so `Vary: Accept-Encoding` keeps one variant per coding Echo would choose,
//! not one per way browsers spell their lists.
//!
//! Invariants: the value becomes exactly one of the configured codings
//! (`cache.normalize_accept_encoding`, in preference order) or `identity`; the highest
//! q-value the client gives wins, ties go to the earlier coding in the list; a coding
//! with q=0 is never chosen (RFC 9110 §12.5.3); fills send the normalised value, so the
//! origin answers for exactly the variant the key names.
//!
//! What it must not do: touch requests that may not be stored (they go through as sent);
//! compress or decompress anything.

use crate::http::headers::split_list;
use crate::http::Request;

/// The normalised `Accept-Encoding` for a request's field value: the configured coding
/// the client prefers, or `identity` when it accepts none of them.
pub(super) fn normalize(value: &[u8], codings: &[String]) -> &'static str {
    let mut best: Option<(u16, usize)> = None;
    let mut star: Option<u16> = None;
    let mut explicit: Vec<(usize, u16)> = Vec::new();
    for member in split_list(value) {
        let Some((coding, q)) = member_q(member) else {
            continue;
        };
        if coding == "*" {
            star = Some(q);
            continue;
        }
        // RFC 9110 §8.4.1.3: "A recipient SHOULD consider "x-gzip" to be equivalent to
        // "gzip"."
        let coding = if coding == "x-gzip" { "gzip" } else { &coding };
        if let Some(i) = codings.iter().position(|c| c == coding) {
            explicit.push((i, q));
        }
    }
    for i in 0..codings.len() {
        // RFC 9110 §12.5.3: "An "*" member in the field value matches any available
        // content coding not explicitly listed in the field value."
        let q = explicit
            .iter()
            .filter(|(j, _)| *j == i)
            .map(|(_, q)| *q)
            .max()
            .or(star)
            .unwrap_or(0);
        if q > 0 && best.is_none_or(|(bq, _)| q > bq) {
            best = Some((q, i));
        }
    }
    best.and_then(|(_, i)| known(&codings[i]))
        .unwrap_or("identity")
}

/// The configured codings Echo knows by name (the config accepts only these).
fn known(coding: &str) -> Option<&'static str> {
    match coding {
        "gzip" => Some("gzip"),
        "br" => Some("br"),
        "zstd" => Some("zstd"),
        "deflate" => Some("deflate"),
        "compress" => Some("compress"),
        _ => None,
    }
}

/// One member `coding[;q=value]`: the coding lower case, q in thousandths. None when the
/// q-value is malformed (the member is ignored).
// RFC 9110 §12.4.2: qvalue = ( "0" [ "." 0*3DIGIT ] ) / ( "1" [ "." 0*3("0") ] ).
fn member_q(member: &[u8]) -> Option<(String, u16)> {
    let text = std::str::from_utf8(member).ok()?;
    let mut parts = text.split(';');
    let coding = parts.next()?.trim().to_ascii_lowercase();
    if coding.is_empty() {
        return None;
    }
    let mut q = 1000;
    for param in parts {
        let (name, value) = param.split_once('=')?;
        if name.trim().eq_ignore_ascii_case("q") {
            q = qvalue(value.trim())?;
        }
    }
    Some((coding, q))
}

fn qvalue(v: &str) -> Option<u16> {
    let (int, frac) = v.split_once('.').unwrap_or((v, ""));
    if frac.len() > 3 || !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let thousandths = frac
        .bytes()
        .chain(std::iter::repeat(b'0'))
        .take(3)
        .fold(0u16, |n, d| n * 10 + u16::from(d - b'0'));
    match int {
        "0" => Some(thousandths),
        "1" if thousandths == 0 => Some(1000),
        _ => None,
    }
}

/// Replaces the request's `Accept-Encoding` lines with the normalised value (nothing to
/// do when it has none: such a client takes any coding the origin sends).
pub(super) fn normalize_request(req: &mut Request, codings: &[String]) {
    if codings.is_empty() {
        return;
    }
    let mut joined: Option<Vec<u8>> = None;
    for (name, value) in &req.headers {
        if name == "accept-encoding" {
            let buf = joined.get_or_insert_with(Vec::new);
            if !buf.is_empty() {
                buf.extend_from_slice(b", ");
            }
            buf.extend_from_slice(value);
        }
    }
    let Some(joined) = joined else {
        return;
    };
    let chosen = normalize(&joined, codings);
    if joined == chosen.as_bytes() {
        return;
    }
    req.headers.retain(|(n, _)| n != "accept-encoding");
    req.headers
        .push(("accept-encoding".into(), chosen.as_bytes().to_vec()));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spellings_of_one_choice_become_one_value() {
        let prefs: Vec<String> = ["gzip", "br", "zstd"]
            .iter()
            .map(|s| s.to_string())
            .collect();
        for (value, want) in [
            ("gzip", "gzip"),
            ("gzip, deflate", "gzip"),
            ("deflate, gzip", "gzip"),
            ("deflate;q=0.5, GZIP", "gzip"),
            ("x-gzip", "gzip"),
            ("gzip, deflate, br, zstd", "gzip"),
            ("br", "br"),
            ("gzip;q=0.5, br", "br"),
            ("br;q=0.9, gzip;q=0.9", "gzip"),
            ("zstd, gzip;q=0", "zstd"),
            ("deflate", "identity"),
            ("identity", "identity"),
            ("", "identity"),
            ("*", "gzip"),
            ("*;q=0.1, gzip;q=0", "br"),
            ("gzip;q=0", "identity"),
            ("gzip;q=2", "identity"),
            ("gzip;q=0.0001", "identity"),
            ("gzip;q=1.000, br;q=0.999", "gzip"),
            ("gzip;q=", "identity"),
        ] {
            assert_eq!(normalize(value.as_bytes(), &prefs), want, "{value:?}");
        }
        let br_first: Vec<String> = ["br", "gzip"].iter().map(|s| s.to_string()).collect();
        assert_eq!(normalize(b"gzip, deflate, br", &br_first), "br");
        assert_eq!(normalize(b"gzip, deflate", &br_first), "gzip");
    }
}
