//! RFC 9111 §4.3 validation and §4.4 invalidation: the preconditions that revalidate a
//! stored response, whether a 304 applies to it (`freshens`), its fields updated from the
//! 304 (§3.2, `update_stored_headers`), what to do next once a 304 arrived
//! (`after_not_modified`, the one decision every revalidating path uses), and which answers
//! to unsafe methods invalidate stored responses.
//!
//! Invariants: a 304 with a strong validator updates only a response with the same strong
//! validator, one with a weak validator only a response whose tag matches weakly (RFC 9110
//! §8.8.3.2); a 304 never brings hop-by-hop fields, `Content-Length` or the proxy fields
//! into a stored response; only a 2xx or 3xx to an unsafe method invalidates. Where Echo is
//! looser than the RFC (a 304 without validators freshens the response it validated) the
//! comment says so.
//!
//! What it must not do: read a clock; panic on any input.

use std::time::SystemTime;

use super::{storability, HeaderList, PolicyOptions, Storability};
use crate::http::headers::{header_one, parse_date, trim_ows, HOP_BY_HOP};

/// The precondition fields that revalidate a stored response: `If-None-Match` with its entity
/// tag and `If-Modified-Since` with its Last-Modified date. Empty when it has no validator (the
/// request then goes unconditional).
// RFC 9111 §4.3.1: the cache "updates that request with one or more precondition header fields.
// These contain validator metadata sourced from a stored response(s)".
// RFC 9110 §8.8.4: a client "MUST send that entity tag in any cache validation request (using
// If-Match or If-None-Match) if an entity tag has been provided by the origin server"; "SHOULD
// send the Last-Modified value in non-subrange cache validation requests (using
// If-Modified-Since) if only a Last-Modified value has been provided"; and "SHOULD send both
// validators in cache validation requests if both an entity tag and a Last-Modified value have
// been provided by the origin server".
pub(crate) fn validation_preconditions(stored: &HeaderList) -> Vec<(String, Vec<u8>)> {
    let mut out = Vec::new();
    // ETag is a singleton field (RFC 9110 §8.8.3): several lines name no one validator.
    if let Some(etag) = header_one(stored, "etag")
        .map(trim_ows)
        .filter(|e| !e.is_empty())
    {
        out.push(("if-none-match".to_string(), etag.to_vec()));
    }
    // RFC 9110 §13.1.3: "A recipient MUST ignore the If-Modified-Since header field if the
    // received field value is not a valid HTTP-date", so only a valid date is worth sending.
    if let Some(last_modified) = header_one(stored, "last-modified")
        .map(trim_ows)
        .filter(|v| parse_date(v).is_some())
    {
        out.push(("if-modified-since".to_string(), last_modified.to_vec()));
    }
    out
}

/// An entity tag split into (weak, opaque-tag with its quotes); None when malformed.
// RFC 9110 §8.8.3: "entity-tag = [ weak ] opaque-tag", "weak = %s"W/"" (case-sensitive),
// "opaque-tag = DQUOTE *etagc DQUOTE".
pub(crate) fn entity_tag(value: &[u8]) -> Option<(bool, &[u8])> {
    let value = trim_ows(value);
    let (weak, opaque) = match value.strip_prefix(b"W/") {
        Some(rest) => (true, rest),
        None => (false, value),
    };
    match opaque {
        [b'"', inner @ .., b'"'] if !inner.contains(&b'"') => Some((weak, opaque)),
        _ => None,
    }
}

/// Does this 304, the answer to a validation request built from `stored`'s validators,
/// identify `stored` for update (RFC 9111 §4.3.4)? `stored` is the one response the request
/// selected (Echo keeps one response per Vary variant and validates only that one).
pub fn freshens(stored: &HeaderList, not_modified: &HeaderList) -> bool {
    if let Some(new) = header_one(not_modified, "etag") {
        let old = header_one(stored, "etag");
        return match (entity_tag(new), old.and_then(entity_tag)) {
            // RFC 9111 §4.3.4: "If the new response contains one or more strong validators
            // (see Section 8.8.1 of [HTTP]), then each of those strong validators identifies a
            // selected representation for update. ... If none of the initial set contains at
            // least one of the same strong validators, then the cache MUST NOT use the new
            // response to update any stored responses."
            // RFC 9110 §8.8.3.2: "Strong comparison: two entity tags are equivalent if both are
            // not weak and their opaque-tags match character-by-character."
            (Some((false, new)), Some((old_weak, old))) => !old_weak && new == old,
            (Some((false, _)), None) => false,
            // RFC 9111 §4.3.4: "If the new response contains no strong validators but does
            // contain one or more weak validators, and those validators correspond to one of
            // the initial set's stored responses, then the most recent of those matching
            // stored responses is identified for update."
            // RFC 9110 §8.8.3.2: "Weak comparison: two entity tags are equivalent if their
            // opaque-tags match character-by-character, regardless of either or both being
            // tagged as "weak"."
            (Some((true, new)), Some((_, old))) => new == old,
            (Some((true, _)), None) => false,
            // Echo's reading: a malformed tag is no validator HTTP defines; it corresponds
            // only to the very same bytes (what such an origin compares).
            (None, _) => old.is_some_and(|old| trim_ows(old) == trim_ows(new)),
        };
    }
    if let Some(new) = header_one(not_modified, "last-modified") {
        // RFC 9110 §8.8.2.2: "A Last-Modified time, when used as a validator in a request, is
        // implicitly weak unless it is possible to deduce that it is strong"; so the weak rule
        // above applies: it must correspond to the stored response's own Last-Modified.
        let old = header_one(stored, "last-modified").and_then(parse_date);
        return matches!((parse_date(new), old), (Some(new), Some(old)) if new == old);
    }
    // RFC 9111 §4.3.4: "If the new response does not include any form of validator ..., and
    // there is only one stored response in the initial set, and that stored response also
    // lacks a validator, then that stored response is identified for update."
    // Echo is looser here: its request carried the validators of this one stored response and
    // no other, so a 304 without validators (RFC 9110 §15.4.5 requires ETag in it whenever the
    // 200 would carry one, yet origins omit it) can only be about this response.
    true
}

/// Fields a 304 never brings into a stored response.
// RFC 9111 §3.2: "the cache MUST add each header field in the provided response to the stored
// response, replacing field values that are already present, with the following exceptions:
// Header fields excepted from storage in Section 3.1, ... Header fields that are automatically
// processed and removed by the recipient, ... and The Content-Length header field."
// RFC 9111 §3.1 excepts "the Connection header field and fields whose names are listed in it"
// (the caller strips those; the hop-by-hop ones are repeated here) and the fields specific to
// the proxy a cache forwards through: "Proxy-Authenticate ..., Proxy-Authentication-Info ...,
// and Proxy-Authorization". RFC 9111 §3.2: "some fields are automatically processed and removed
// by the HTTP implementation, such as the Content-Range header field; implementations MAY
// exclude such fields from updates".
const NOT_UPDATED_BY_304: &[&str] = &[
    "content-length",
    "proxy-authenticate",
    "proxy-authentication-info",
    "proxy-authorization",
    "content-range",
];

/// The stored response's fields updated with those of a 304 (RFC 9111 §3.2, §4.3.4): every
/// field the 304 carries replaces all stored lines of that name (at the first one's place),
/// the other stored fields are kept, new ones are appended; the exceptions are never taken.
// RFC 9111 §4.3.4: "For each stored response identified, the cache MUST update its header
// fields with the header fields provided in the 304 (Not Modified) response, as per
// Section 3.2."
pub fn update_stored_headers(
    stored: &HeaderList,
    not_modified: &HeaderList,
) -> Vec<(String, Vec<u8>)> {
    // Hop-by-hop fields are never taken either (RFC 9111 §3.1), nor those they name.
    let taken = |name: &str| {
        !HOP_BY_HOP
            .iter()
            .chain(NOT_UPDATED_BY_304)
            .any(|x| x.eq_ignore_ascii_case(name))
    };
    let updates: Vec<&(String, Vec<u8>)> = not_modified.iter().filter(|(n, _)| taken(n)).collect();
    let updated = |name: &str| updates.iter().any(|(n, _)| n.eq_ignore_ascii_case(name));
    let mut out: Vec<(String, Vec<u8>)> = Vec::with_capacity(stored.len() + updates.len());
    let mut placed: Vec<&str> = Vec::new();
    for (name, value) in stored {
        if !updated(name) {
            out.push((name.clone(), value.clone()));
        } else if !placed.iter().any(|p| p.eq_ignore_ascii_case(name)) {
            // RFC 9111 §3.2: "replacing field values that are already present".
            placed.push(name);
            out.extend(
                updates
                    .iter()
                    .filter(|(n, _)| n.eq_ignore_ascii_case(name))
                    .map(|&pair| pair.clone()),
            );
        }
    }
    // RFC 9111 §3.2: "the cache MUST add each header field in the provided response".
    for &(name, value) in &updates {
        if !stored.iter().any(|(n, _)| n.eq_ignore_ascii_case(name)) {
            out.push((name.clone(), value.clone()));
        }
    }
    out
}

/// What to do once a 304 (Not Modified) answered a validation request built from a stored
/// response's validators.
#[derive(Debug, Clone, PartialEq)]
pub enum AfterNotModified {
    /// The 304 names another representation than the stored one: update nothing, and fetch
    /// the whole response (unconditionally) to answer the request.
    FetchWhole,
    /// The 304 identifies the stored response: its fields become `headers` (its content stays
    /// the stored one) and it answers the request. `storability` says whether the updated
    /// response may be stored again, with its new freshness lifetime, or why not (then it
    /// still answers the request it was validated for, but is not stored).
    Update {
        headers: Vec<(String, Vec<u8>)>,
        storability: Storability,
    },
}

/// Does a 200 answer to a HEAD describe the `stored` response (`stored_len` bytes), so its
/// fields may update it (RFC 9111 §4.3.5)? Otherwise the stored response is stale.
// RFC 9111 §4.3.5: "if the stored response and HEAD response have matching values for any
// received validator fields (ETag and Last-Modified) and, if the HEAD response has a
// Content-Length header field, the value of Content-Length matches that of the stored
// response, the cache SHOULD update the stored response as described below; otherwise, the
// cache SHOULD consider the stored response to be stale." Echo is stricter: a HEAD answer
// with no validator at all does not match (nothing shows it is the same representation).
pub fn head_freshens(stored: &HeaderList, stored_len: u64, head: &HeaderList) -> bool {
    let mut validators = 0;
    for field in ["etag", "last-modified"] {
        if let Some(new) = header_one(head, field) {
            validators += 1;
            let same = header_one(stored, field).is_some_and(|old| trim_ows(old) == trim_ows(new));
            if !same {
                return false;
            }
        }
    }
    let length_matches = header_one(head, "content-length").is_none_or(|v| {
        std::str::from_utf8(trim_ows(v))
            .ok()
            .and_then(|v| v.parse::<u64>().ok())
            == Some(stored_len)
    });
    validators > 0 && length_matches
}

/// Decides what a 304 does to the `stored` response (stored with status `stored_status`)
/// whose validators the request carried (RFC 9111 §4.3.3, §4.3.4). `not_modified` is the
/// 304's fields as Echo keeps them (the fields named in its `Connection` already removed),
/// `req` the request the updated response would be stored for, `response_time` when the 304
/// was received.
///
/// The request method is GET: Echo stores GET responses only, and validates only what it
/// stored. The caller still computes the entry's age from the updated fields (RFC 9111
/// §4.2.3) and keeps the stored content.
// RFC 9111 §4.3.3: "A 304 (Not Modified) response status code indicates that the stored
// response can be updated and reused; see Section 4.3.4."
pub(crate) fn after_not_modified(
    stored: &HeaderList,
    stored_status: u16,
    not_modified: &HeaderList,
    req: &HeaderList,
    response_time: SystemTime,
    opts: &PolicyOptions,
) -> AfterNotModified {
    // RFC 9111 §4.3.4: "If none of the initial set contains at least one of the same strong
    // validators, then the cache MUST NOT use the new response to update any stored
    // responses." Nor can a 304 answer a client whose request Echo made conditional: the
    // whole response is fetched instead.
    if !freshens(stored, not_modified) {
        return AfterNotModified::FetchWhole;
    }
    // RFC 9111 §4.3.4: "For each stored response identified, the cache MUST update its header
    // fields with the header fields provided in the 304 (Not Modified) response, as per
    // Section 3.2."
    let headers = update_stored_headers(stored, not_modified);
    // The updated response is stored again only as any response is (RFC 9111 §3): its
    // lifetime and storability follow its updated fields (a 304 can bring a new
    // Cache-Control, Expires or Date) and the stored status, never 304's.
    let storability = storability("GET", req, stored_status, &headers, response_time, opts);
    AfterNotModified::Update {
        headers,
        storability,
    }
}

// ---------------------------------------------------------------------------------------------
// Invalidation (RFC 9111 §4.4)
// ---------------------------------------------------------------------------------------------

/// Is the method unsafe (anything but GET, HEAD, OPTIONS, TRACE; case-sensitive)?
// RFC 9110 §9.2.1: "Of the request methods defined by this specification, the GET, HEAD,
// OPTIONS, and TRACE methods are defined to be safe."
// RFC 9111 §4.4 counts "methods whose safety is unknown" as unsafe.
pub(crate) fn is_unsafe_method(method: &str) -> bool {
    !matches!(method, "GET" | "HEAD" | "OPTIONS" | "TRACE")
}

/// Does this response invalidate the target URI (and same-origin Location /
/// Content-Location)?
// RFC 9111 §4.4: "A cache MUST invalidate the target URI (Section 7.1 of [HTTP]) when it
// receives a non-error status code in response to an unsafe request method (including methods
// whose safety is unknown)."
// RFC 9111 §4.4: "Here, a "non-error response" is one with a 2xx (Successful) or 3xx
// (Redirection) status code."
// The caller also invalidates Location and Content-Location; RFC 9111 §4.4: "a cache MUST NOT
// trigger an invalidation under these conditions if the origin (Section 4.3.1 of [HTTP]) of the
// URI to be invalidated differs from that of the target URI".
pub fn invalidates(method: &str, status: u16) -> bool {
    is_unsafe_method(method) && (200..=399).contains(&status)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testing::*;
    use crate::policy::{storability, NoStoreReason, PolicyOptions, Storability};

    const LM: &str = "Mon, 01 Jan 2024 00:00:00 GMT";

    #[test]
    fn preconditions_carry_the_stored_validators() {
        let both = hdrs(&[("etag", " \"v1\" "), ("last-modified", LM)]);
        assert_eq!(
            validation_preconditions(&both),
            hdrs(&[("if-none-match", "\"v1\""), ("if-modified-since", LM)])
        );
        let weak = hdrs(&[("etag", "W/\"v1\"")]);
        assert_eq!(
            validation_preconditions(&weak),
            hdrs(&[("if-none-match", "W/\"v1\"")])
        );
        let date_only = hdrs(&[("last-modified", LM)]);
        assert_eq!(
            validation_preconditions(&date_only),
            hdrs(&[("if-modified-since", LM)])
        );
        // No validator, an invalid date, an empty or repeated ETag: nothing to send.
        let none: Vec<(String, Vec<u8>)> = Vec::new();
        for stored in [
            hdrs(&[("cache-control", "max-age=1")]),
            hdrs(&[("last-modified", "yesterday")]),
            hdrs(&[("etag", " ")]),
            hdrs(&[("etag", "\"a\""), ("etag", "\"b\"")]),
        ] {
            assert_eq!(validation_preconditions(&stored), none, "{stored:?}");
        }
    }

    #[test]
    fn entity_tags_parse_strictly() {
        assert_eq!(entity_tag(b"\"x\""), Some((false, &b"\"x\""[..])));
        assert_eq!(entity_tag(b" W/\"x\" "), Some((true, &b"\"x\""[..])));
        assert_eq!(entity_tag(b"\"\""), Some((false, &b"\"\""[..])));
        for bad in [&b"x"[..], b"w/\"x\"", b"\"", b"\"a\"b\"", b"", b"W/"] {
            assert_eq!(entity_tag(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    /// (stored fields, 304 fields, freshens?)
    type FreshenCase = (Pairs, Pairs, bool);

    #[test]
    fn which_304_freshens_the_stored_response() {
        let cases: Vec<FreshenCase> = vec![
            // Strong validator: strong comparison with the stored one.
            (vec![("etag", "\"v1\"")], vec![("etag", "\"v1\"")], true),
            (vec![("etag", "\"v1\"")], vec![("etag", "\"v2\"")], false),
            (vec![("etag", "W/\"v1\"")], vec![("etag", "\"v1\"")], false),
            (vec![("last-modified", LM)], vec![("etag", "\"v1\"")], false),
            // Weak validator: weak comparison.
            (vec![("etag", "W/\"v1\"")], vec![("etag", "W/\"v1\"")], true),
            (vec![("etag", "\"v1\"")], vec![("etag", "W/\"v1\"")], true),
            (
                vec![("etag", "W/\"v1\"")],
                vec![("etag", "W/\"v2\"")],
                false,
            ),
            (vec![], vec![("etag", "W/\"v1\"")], false),
            // The ETag decides before Last-Modified.
            (
                vec![("etag", "\"v1\""), ("last-modified", LM)],
                vec![
                    ("etag", "\"v1\""),
                    ("last-modified", "Tue, 02 Jan 2024 00:00:00 GMT"),
                ],
                true,
            ),
            // Last-Modified alone: the same date (any HTTP-date form).
            (
                vec![("last-modified", LM)],
                vec![("last-modified", LM)],
                true,
            ),
            (
                vec![("last-modified", LM)],
                vec![("last-modified", "Monday, 01-Jan-24 00:00:00 GMT")],
                true,
            ),
            (
                vec![("last-modified", LM)],
                vec![("last-modified", "Tue, 02 Jan 2024 00:00:00 GMT")],
                false,
            ),
            (vec![("etag", "\"v1\"")], vec![("last-modified", LM)], false),
            (
                vec![("last-modified", "bad")],
                vec![("last-modified", "bad")],
                false,
            ),
            // A malformed tag matches only the same bytes.
            (vec![("etag", "abc")], vec![("etag", "abc")], true),
            (vec![("etag", "abc")], vec![("etag", "abd")], false),
            // No validator in the 304: it answers for the response it validated.
            (
                vec![("etag", "\"v1\"")],
                vec![("cache-control", "max-age=5")],
                true,
            ),
        ];
        for (stored, not_modified, want) in cases {
            assert_eq!(
                freshens(&hdrs(&stored), &hdrs(&not_modified)),
                want,
                "stored {stored:?}, 304 {not_modified:?}"
            );
        }
    }

    #[test]
    fn a_304_replaces_the_fields_it_carries_and_keeps_the_rest() {
        let stored = hdrs(&[
            ("content-type", "text/plain"),
            ("cache-control", "max-age=1"),
            ("x-version", "1"),
            ("x-version", "1b"),
            ("etag", "\"v1\""),
            ("content-length", "11"),
            ("date", "old"),
        ]);
        let not_modified = hdrs(&[
            ("date", "new"),
            ("x-version", "2"),
            ("cache-control", "max-age=60"),
            ("content-length", "0"),
            ("transfer-encoding", "chunked"),
            ("proxy-authenticate", "Basic"),
            ("content-range", "bytes 0-0/1"),
            ("x-new", "yes"),
            ("age", "3"),
        ]);
        assert_eq!(
            update_stored_headers(&stored, &not_modified),
            hdrs(&[
                ("content-type", "text/plain"),
                ("cache-control", "max-age=60"),
                ("x-version", "2"),
                ("etag", "\"v1\""),
                ("content-length", "11"),
                ("date", "new"),
                ("x-new", "yes"),
                ("age", "3"),
            ])
        );
    }

    #[test]
    fn repeated_fields_in_the_304_replace_as_a_whole() {
        let stored = hdrs(&[("link", "</a>"), ("vary", "accept"), ("link", "</b>")]);
        let not_modified = hdrs(&[("link", "</c>"), ("link", "</d>")]);
        assert_eq!(
            update_stored_headers(&stored, &not_modified),
            hdrs(&[("link", "</c>"), ("link", "</d>"), ("vary", "accept")])
        );
        // An empty 304 changes nothing.
        assert_eq!(update_stored_headers(&stored, &[]), stored);
    }

    /// The updated fields drive freshness: a 304's new max-age is the new lifetime.
    #[test]
    fn freshness_comes_from_the_updated_fields() {
        let stored = hdrs(&[("cache-control", "max-age=1"), ("etag", "\"v1\"")]);
        let not_modified = hdrs(&[("cache-control", "max-age=60"), ("etag", "\"v1\"")]);
        let updated = update_stored_headers(&stored, &not_modified);
        let opts = PolicyOptions::default();
        assert_eq!(
            storability("GET", &[], 200, &updated, t0(), &opts),
            Storability::Store {
                freshness: secs(60),
                heuristic: false
            }
        );
        let no_store = hdrs(&[("cache-control", "no-store")]);
        let updated = update_stored_headers(&stored, &no_store);
        assert_eq!(
            storability("GET", &[], 200, &updated, t0(), &opts),
            Storability::DoNotStore(NoStoreReason::NoStore)
        );
    }

    /// (RFC 9111 §4.3.3, §4.3.4) What a 304 does: update and store again, update and
    /// answer without storing, or fetch the whole response.
    mod after_304 {
        use super::*;

        fn run(
            stored: &[(&str, &str)],
            status: u16,
            not_modified: &[(&str, &str)],
        ) -> AfterNotModified {
            run_for(stored, status, not_modified, &[])
        }

        fn run_for(
            stored: &[(&str, &str)],
            status: u16,
            not_modified: &[(&str, &str)],
            req: &[(&str, &str)],
        ) -> AfterNotModified {
            after_not_modified(
                &hdrs(stored),
                status,
                &hdrs(not_modified),
                &hdrs(req),
                t0(),
                &PolicyOptions::default(),
            )
        }

        /// §4.3.4: "each of those strong validators identifies a selected representation for
        /// update"; the new max-age is the new lifetime.
        #[test]
        fn a_304_with_the_same_validator_updates_and_stores_again() {
            let got = run(
                &[
                    ("cache-control", "max-age=1"),
                    ("etag", "\"v1\""),
                    ("x-a", "1"),
                ],
                200,
                &[("cache-control", "max-age=60"), ("etag", "\"v1\"")],
            );
            assert_eq!(
                got,
                AfterNotModified::Update {
                    headers: hdrs(&[
                        ("cache-control", "max-age=60"),
                        ("etag", "\"v1\""),
                        ("x-a", "1"),
                    ]),
                    storability: store(60),
                }
            );
        }

        /// §4.3.4: "If none of the initial set contains at least one of the same strong
        /// validators, then the cache MUST NOT use the new response to update any stored
        /// responses."
        #[test]
        fn a_304_naming_another_representation_updates_nothing() {
            for not_modified in [
                vec![("etag", "\"v2\"")],
                vec![("etag", "W/\"v2\"")],
                vec![("last-modified", "Tue, 02 Jan 2024 00:00:00 GMT")],
            ] {
                let got = run(
                    &[("etag", "\"v1\""), ("last-modified", LM)],
                    200,
                    &not_modified,
                );
                assert_eq!(got, AfterNotModified::FetchWhole, "{not_modified:?}");
            }
        }

        /// §4.3.3: the stored response "can be updated and reused" even when the updated
        /// fields forbid storing it: it answers this request, and is not stored.
        #[test]
        fn an_updated_response_that_may_not_be_stored_still_answers() {
            let stored = [("cache-control", "max-age=1"), ("etag", "\"v1\"")];
            let got = run(&stored, 200, &[("cache-control", "no-store")]);
            assert_eq!(
                got,
                AfterNotModified::Update {
                    headers: hdrs(&[("cache-control", "no-store"), ("etag", "\"v1\"")]),
                    storability: no(NoStoreReason::NoStore),
                }
            );
            let got = run(&stored, 200, &[("cache-control", "max-age=0")]);
            assert!(matches!(
                got,
                AfterNotModified::Update {
                    storability: Storability::DoNotStore(NoStoreReason::NotFresh),
                    ..
                }
            ));
            // The request counts as for any response (RFC 9111 §3, §3.5).
            let got = run_for(&stored, 200, &[], &[("authorization", "Basic eDp5")]);
            assert!(matches!(
                got,
                AfterNotModified::Update {
                    storability: Storability::DoNotStore(NoStoreReason::Authorization),
                    ..
                }
            ));
        }

        /// The updated response keeps the stored status: a 304 is never stored as such.
        #[test]
        fn storability_follows_the_stored_status() {
            let stored = [("etag", "\"v1\""), ("last-modified", &*date(-1000))];
            let not_modified = [("date", &*date(0))];
            // 10% of (Date - Last-Modified): a heuristic lifetime for a 200 ...
            assert!(matches!(
                run(&stored, 200, &not_modified),
                AfterNotModified::Update { storability, .. } if storability == heur(100)
            ));
            // ... but not for a 302, which needs explicit freshness.
            assert!(matches!(
                run(&stored, 302, &not_modified),
                AfterNotModified::Update { storability, .. }
                    if storability == no(NoStoreReason::NotFresh)
            ));
        }

        /// §4.2.1: Expires minus the Date the 304 brought, not the stored one.
        #[test]
        fn a_new_date_and_expires_give_the_new_lifetime() {
            let stored = [
                ("date", &*date(-3600)),
                ("expires", &*date(-3000)),
                ("etag", "\"v1\""),
            ];
            let not_modified = [("date", &*date(0)), ("expires", &*date(120))];
            assert!(matches!(
                run(&stored, 200, &not_modified),
                AfterNotModified::Update { storability, .. } if storability == store(120)
            ));
        }

        /// Echo's looser reading: a 304 without validators answers for the one response
        /// whose validators the request carried.
        #[test]
        fn a_304_without_validators_updates_the_response_it_validated() {
            let got = run(
                &[("etag", "\"v1\""), ("cache-control", "max-age=1")],
                200,
                &[("cache-control", "max-age=30")],
            );
            assert!(matches!(
                got,
                AfterNotModified::Update { storability, .. } if storability == store(30)
            ));
        }
    }

    mod invalidation {
        use super::*;

        #[test]
        fn unsafe_methods() {
            let cases = [
                ("GET", false),
                ("HEAD", false),
                ("OPTIONS", false),
                ("TRACE", false),
                ("POST", true),
                ("PUT", true),
                ("DELETE", true),
                ("PATCH", true),
                ("CONNECT", true),
                ("PURGE", true),
                ("get", true),
                ("", true),
            ];
            for (m, want) in cases {
                assert_eq!(is_unsafe_method(m), want, "method {m}");
            }
        }

        #[test]
        fn invalidates_table() {
            let cases = [
                ("POST", 200, true),
                ("POST", 201, true),
                ("PUT", 204, true),
                ("DELETE", 303, true),
                ("POST", 399, true),
                ("POST", 100, false),
                ("POST", 400, false),
                ("POST", 404, false),
                ("DELETE", 500, false),
                ("GET", 200, false),
                ("HEAD", 200, false),
            ];
            for (m, s, want) in cases {
                assert_eq!(invalidates(m, s), want, "{m} {s}");
            }
        }
    }

    /// RFC 9111 §4.3.5: matching validators and Content-Length update; anything else
    /// makes the stored response stale.
    #[test]
    fn a_head_answer_freshens_only_the_response_it_describes() {
        let stored = hdrs(&[
            ("etag", "\"v1\""),
            ("last-modified", "Tue, 15 Nov 1994 08:12:31 GMT"),
        ]);
        for (head, want) in [
            (vec![("etag", "\"v1\"")], true),
            (vec![("etag", "\"v1\""), ("content-length", "11")], true),
            (vec![("etag", "\"v1\""), ("content-length", "12")], false),
            (vec![("etag", "\"v2\"")], false),
            (vec![("etag", "W/\"v1\"")], false),
            (
                vec![
                    ("etag", "\"v1\""),
                    ("last-modified", "Tue, 15 Nov 1994 08:12:32 GMT"),
                ],
                false,
            ),
            (
                vec![("last-modified", "Tue, 15 Nov 1994 08:12:31 GMT")],
                true,
            ),
            (vec![("content-length", "11")], false),
            (vec![], false),
        ] {
            assert_eq!(head_freshens(&stored, 11, &hdrs(&head)), want, "{head:?}");
        }
    }
}
