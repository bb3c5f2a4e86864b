//! RFC 9111 §4.1 `Vary`: the response's Vary field, the snapshot of the request values it
//! names (what a stored variant is kept with), and matching a new request to that snapshot.
//!
//! Invariants: `Vary: *` never matches; field names are lower-cased, sorted and deduplicated;
//! request values are normalised only as §4.1 allows (lines combined, OWS and empty members
//! dropped) and keep their case; a field absent from a request matches only its absence;
//! distinct byte strings stay distinct (no lossy decoding).
//!
//! What it must not do: panic on any input.

use super::HeaderList;
use crate::http::headers::{header_joined_bytes, split_list};

/// The response's Vary field.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Vary {
    /// No Vary field (or an empty one).
    None,
    /// A member "*": never matches.
    Star,
    /// Lower-case, deduplicated, sorted field names.
    Fields(Vec<String>),
}

/// Parses every Vary field line of a response.
// RFC 9110 §12.5.5: "Vary = #( "*" / field-name )"; field names are case-insensitive
// (RFC 9110 §5.1), so they are lower-cased.
pub fn vary(resp: &HeaderList) -> Vary {
    let Some(joined) = header_joined_bytes(resp, "vary") else {
        return Vary::None;
    };
    let mut fields = Vec::new();
    for member in split_list(&joined) {
        // RFC 9111 §4.1: "A stored response with a Vary header field value containing a
        // member "*" always fails to match."
        if member == b"*" {
            return Vary::Star;
        }
        fields.push(String::from_utf8_lossy(member).to_ascii_lowercase());
    }
    fields.sort();
    fields.dedup();
    if fields.is_empty() {
        Vary::None
    } else {
        Vary::Fields(fields)
    }
}

/// The request's values for the Vary fields, normalised: `(field, value)` with `None` for a
/// field absent from the request.
pub type VarySnapshot = Vec<(String, Option<String>)>;

/// The normalised value of one request field, for Vary comparison.
// RFC 9111 §4.1: "The header fields from two requests are defined to match if and only if
// those in the first request can be transformed to those in the second request by applying any
// of the following: adding or removing whitespace, where allowed in the header field's syntax;
// combining multiple header field lines with the same field name (see Section 5.2 of [HTTP])".
// Echo combines all lines, splits on commas outside quoted-strings, trims OWS around each
// member, drops empty members and joins with ", ". Case is kept (it may be significant).
fn vary_value(req: &HeaderList, field: &str) -> Option<String> {
    let joined = header_joined_bytes(req, field)?;
    let mut out: Vec<u8> = Vec::with_capacity(joined.len());
    for (i, member) in split_list(&joined).into_iter().enumerate() {
        if i > 0 {
            out.extend_from_slice(b", ");
        }
        out.extend_from_slice(member);
    }
    Some(match String::from_utf8(out) {
        Ok(s) => s,
        // Keep distinct byte strings distinct (lossy decoding would merge them): a NUL, which
        // a valid field value never contains (RFC 9110 §5.5), marks a hex rendering.
        Err(e) => {
            let mut s = String::from("\0");
            for b in e.into_bytes() {
                s.push_str(&format!("{b:02x}"));
            }
            s
        }
    })
}

/// Records the request's normalised values for the given Vary fields.
pub fn vary_snapshot(fields: &[String], req: &HeaderList) -> VarySnapshot {
    fields
        .iter()
        .map(|f| {
            let f = f.to_ascii_lowercase();
            let v = vary_value(req, &f);
            (f, v)
        })
        .collect()
}

/// Does this request select the stored variant? All listed fields must match.
// RFC 9111 §4.1: "the cache MUST NOT use that stored response without revalidation unless all
// the presented request header fields nominated by that Vary field value match those fields in
// the original request".
// RFC 9111 §4.1: "If (after any normalization that might take place) a header field is absent
// from a request, it can only match another request if it is also absent there."
pub fn vary_matches(snapshot: &VarySnapshot, req: &HeaderList) -> bool {
    snapshot
        .iter()
        .all(|(field, stored)| vary_value(req, field) == *stored)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testing::*;

    #[test]
    fn vary_table() {
        let f = |v: &[&str]| Vary::Fields(v.iter().map(|s| s.to_string()).collect());
        let cases: Vec<(&str, Pairs, Vary)> = vec![
            ("absent", vec![], Vary::None),
            ("empty", vec![("vary", "")], Vary::None),
            ("only commas", vec![("vary", " , ")], Vary::None),
            ("star", vec![("vary", "*")], Vary::Star),
            ("star among fields", vec![("vary", "Accept, *")], Vary::Star),
            (
                "star on second line",
                vec![("vary", "accept"), ("vary", "*")],
                Vary::Star,
            ),
            (
                "one field lower-cased",
                vec![("vary", "Accept-Encoding")],
                f(&["accept-encoding"]),
            ),
            (
                "repeated lines merged, sorted, deduplicated",
                vec![
                    ("vary", "User-Agent, accept-encoding"),
                    ("vary", "Accept-Encoding,accept"),
                ],
                f(&["accept", "accept-encoding", "user-agent"]),
            ),
        ];
        for (name, resp, want) in cases {
            assert_eq!(vary(&hdrs(&resp)), want, "case {name}");
        }
    }

    #[test]
    fn snapshot_normalises() {
        let fields = vec!["accept-encoding".to_string(), "x-absent".to_string()];
        let req = hdrs(&[("accept-encoding", "gzip,  br")]);
        let snap = vary_snapshot(&fields, &req);
        assert_eq!(
            snap,
            vec![
                ("accept-encoding".to_string(), Some("gzip, br".to_string())),
                ("x-absent".to_string(), None),
            ]
        );
    }

    #[test]
    fn matches_table() {
        let fields = vec!["accept-encoding".to_string(), "accept-language".to_string()];
        let stored_req = hdrs(&[("accept-encoding", "gzip,  br"), ("accept-language", "en")]);
        let snap = vary_snapshot(&fields, &stored_req);
        let cases: Vec<(&str, Pairs, bool)> = vec![
            (
                "same after whitespace normalisation",
                vec![("accept-encoding", "gzip, br"), ("accept-language", "en")],
                true,
            ),
            (
                "split across lines",
                vec![
                    ("accept-encoding", "gzip"),
                    ("accept-encoding", "br"),
                    ("accept-language", "en"),
                ],
                true,
            ),
            (
                "tabs and empty members",
                vec![
                    ("accept-encoding", "\tgzip ,, br "),
                    ("accept-language", "en"),
                ],
                true,
            ),
            (
                "other unrelated header ignored",
                vec![
                    ("accept-encoding", "gzip, br"),
                    ("accept-language", "en"),
                    ("x", "y"),
                ],
                true,
            ),
            (
                "order differs",
                vec![("accept-encoding", "br, gzip"), ("accept-language", "en")],
                false,
            ),
            (
                "case differs",
                vec![("accept-encoding", "gzip, br"), ("accept-language", "EN")],
                false,
            ),
            ("field absent", vec![("accept-encoding", "gzip, br")], false),
            ("both absent", vec![], false),
        ];
        for (name, req, want) in cases {
            assert_eq!(vary_matches(&snap, &hdrs(&req)), want, "case {name}");
        }
    }

    #[test]
    fn absent_versus_empty() {
        let fields = vec!["x-token".to_string()];
        let absent = vary_snapshot(&fields, &[]);
        let empty = vary_snapshot(&fields, &hdrs(&[("x-token", "")]));
        assert_eq!(absent, vec![("x-token".to_string(), None)]);
        assert_eq!(empty, vec![("x-token".to_string(), Some(String::new()))]);
        assert!(vary_matches(&absent, &[]));
        assert!(!vary_matches(&absent, &hdrs(&[("x-token", "")])));
        assert!(vary_matches(&empty, &hdrs(&[("x-token", " ")])));
        assert!(!vary_matches(&empty, &[]));
        // No Vary fields: every request matches.
        assert!(vary_matches(&Vec::new(), &hdrs(&[("x-token", "a")])));
    }

    #[test]
    fn invalid_utf8_stays_distinct() {
        let fields = vec!["x".to_string()];
        let a = vec![("x".to_string(), vec![b'a', 0xff])];
        let b = vec![("x".to_string(), vec![b'a', 0xfe])];
        let snap = vary_snapshot(&fields, &a);
        assert!(vary_matches(&snap, &a));
        assert!(!vary_matches(&snap, &b));
    }
}
