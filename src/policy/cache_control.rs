//! RFC 9111 §5.2 `Cache-Control` (with the RFC 5861 extensions) and the request's `Pragma`
//! fallback (RFC 9111 §5.4), parsed into one `CacheControl` value per message.
//!
//! Invariants: comma lists and quoted-string arguments are understood (one list parser,
//! `http::headers::split_list`); directive names compare case-insensitively; unknown
//! directives are ignored; an invalid or repeated `max-age` / `s-maxage` reads as `Some(0)`
//! (stale), an invalid RFC 5861 argument disables the extension, and of several values the
//! most restrictive wins; every delta-seconds value saturates at 2^31.
//!
//! What it must not do: decide anything (storability, freshness and reuse read this value);
//! panic on any input.

use std::borrow::Cow;

use super::HeaderList;
use crate::http::headers::{
    has_header, header_joined_bytes, parse_delta_seconds, split_list, trim_ows,
};

/// The parsed Cache-Control directives of one message (request or response).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CacheControl {
    /// `no-store` (§5.2.1.5 request, §5.2.2.5 response).
    pub no_store: bool,
    /// Unqualified `no-cache` (§5.2.1.4, §5.2.2.4): reuse only after revalidation.
    pub no_cache: bool,
    /// Lower-case field names from `no-cache="a, b"` (response only): without
    /// revalidation the response goes out without them.
    pub no_cache_fields: Vec<String>,
    /// Unqualified `private` (§5.2.2.7): not stored.
    pub private: bool,
    /// Lower-case field names from `private="a, b"`: the response may be stored without
    /// them. Empty for the unqualified form (not stored at all).
    pub private_fields: Vec<String>,
    /// `public` (§5.2.2.9).
    pub public: bool,
    /// `max-age` in seconds (§5.2.1.1, §5.2.2.1); Some(0) if invalid or repeated.
    pub max_age: Option<u64>,
    /// `s-maxage` in seconds (§5.2.2.10); Some(0) if invalid or repeated.
    pub s_maxage: Option<u64>,
    /// `must-revalidate` (§5.2.2.2).
    pub must_revalidate: bool,
    /// `proxy-revalidate` (§5.2.2.8).
    pub proxy_revalidate: bool,
    /// `no-transform` (§5.2.1.6, §5.2.2.6).
    pub no_transform: bool,
    /// `immutable` (RFC 8246).
    pub immutable: bool,
    /// `must-understand` (§5.2.2.3).
    pub must_understand: bool,
    /// `stale-while-revalidate` (RFC 5861 §3); None if absent or invalid.
    pub stale_while_revalidate: Option<u64>,
    /// `stale-if-error` (RFC 5861 §4); None if absent or invalid.
    pub stale_if_error: Option<u64>,
    /// Request `max-stale` (§5.2.1.2): Some(None) = any staleness.
    pub max_stale: Option<Option<u64>>,
    /// Request `min-fresh` (§5.2.1.3).
    pub min_fresh: Option<u64>,
    /// Request `only-if-cached` (§5.2.1.7).
    pub only_if_cached: bool,
}

/// The argument of one directive: borrowed from the field unless unquoting changed it
/// (this runs on every hit, for the stored response's field).
enum Arg<'a> {
    /// `name` with no `=`.
    Absent,
    /// `name=token` or `name="quoted"` (unquoted, escapes resolved).
    Value(Cow<'a, [u8]>),
    /// `name="unterminated`.
    Malformed,
}

impl Arg<'_> {
    fn delta_seconds(&self) -> Option<u64> {
        match self {
            Arg::Value(v) => parse_delta_seconds(v),
            Arg::Absent | Arg::Malformed => None,
        }
    }
}

/// The longest directive name Echo knows (`stale-while-revalidate`); a longer one is an
/// extension, ignored.
const LONGEST_NAME: usize = 22;

/// Splits one list member `name[=arg]` into a lower-case name (in `buf`; empty when too
/// long to be one Echo knows) and its argument.
fn parse_directive<'a, 'b>(
    member: &'a [u8],
    buf: &'b mut [u8; LONGEST_NAME],
) -> (&'b [u8], Arg<'a>) {
    let (name, arg) = match member.iter().position(|&b| b == b'=') {
        Some(eq) => (
            member.get(..eq).unwrap_or_default(),
            Some(member.get(eq + 1..).unwrap_or_default()),
        ),
        None => (member, None),
    };
    let name = trim_ows(name);
    let name = match buf.get_mut(..name.len()) {
        Some(lower) => {
            lower.copy_from_slice(name);
            lower.make_ascii_lowercase();
            &*lower
        }
        None => &[],
    };
    let arg = match arg.map(trim_ows) {
        None => Arg::Absent,
        Some([b'"', rest @ ..]) => unquote(rest),
        Some(v) => Arg::Value(Cow::Borrowed(v)),
    };
    (name, arg)
}

/// Reads a quoted-string body (after the opening quote) up to its closing quote.
// RFC 9110 §5.6.4: "The backslash octet ("\") can be used as a single-octet quoting mechanism
// within quoted-string and comment constructs."
fn unquote(rest: &[u8]) -> Arg<'_> {
    let mut out = Vec::with_capacity(rest.len());
    let mut escaped = false;
    for &b in rest {
        if escaped {
            out.push(b);
            escaped = false;
        } else if b == b'\\' {
            escaped = true;
        } else if b == b'"' {
            return Arg::Value(Cow::Owned(out));
        } else {
            out.push(b);
        }
    }
    Arg::Malformed
}

impl CacheControl {
    /// Parses every Cache-Control field line of a message.
    ///
    /// Comma lists and quoted-string arguments are understood, directive names are compared
    /// case-insensitively and unknown directives are ignored. An invalid or repeated `max-age`
    /// or `s-maxage` is `Some(0)` (the response is stale); delta-seconds saturate at 2^31.
    pub fn parse(headers: &HeaderList) -> CacheControl {
        let mut cc = CacheControl::default();
        let Some(joined) = header_joined_bytes(headers, "cache-control") else {
            return cc;
        };
        let mut seen_max_age = false;
        let mut seen_s_maxage = false;
        let mut swr_invalid = false;
        let mut sie_invalid = false;

        // RFC 9111 §5.2: "Cache directives are identified by a token, to be compared
        // case-insensitively, and have an optional argument that can use both token and
        // quoted-string syntax."
        // RFC 9111 §5.2: "recipients ought to accept both forms, even if a specific form is
        // required for generation" — so `max-age="60"` is 60.
        let mut name_buf = [0u8; LONGEST_NAME];
        for member in split_list(&joined) {
            let (name, arg) = parse_directive(member, &mut name_buf);
            match name {
                b"no-store" => cc.no_store = true,
                // RFC 9111 §5.2.2.4: "If the no-cache response directive specifies one or
                // more field names, then a cache MAY use the response to satisfy a
                // subsequent request, subject to any other restrictions on caching.
                // However, any header fields in the response that have the field name(s)
                // listed MUST NOT be sent in the response to a subsequent request without
                // successful revalidation with the origin server." An empty or malformed
                // list reads as the unqualified form (the safe reading).
                b"no-cache" => {
                    cc.no_cache |= !collect_fields(&arg, &mut cc.no_cache_fields);
                }
                // RFC 9111 §5.2.2.7: "The unqualified private response directive indicates
                // that a shared cache MUST NOT store the response"; qualified, "a shared
                // cache MUST NOT store the specified field names(s), whereas it MAY store
                // the remainder of the response message."
                b"private" => {
                    cc.private |= !collect_fields(&arg, &mut cc.private_fields);
                }
                b"public" => cc.public = true,
                // RFC 9111 §4.2.1: "When there is more than one value present for a given
                // directive (e.g., two Expires header field lines or multiple Cache-Control:
                // max-age directives), either the first occurrence should be used or the
                // response should be considered stale." Echo considers it stale.
                // RFC 9111 §4.2.1: "Caches are encouraged to consider responses that have
                // invalid freshness information (e.g., a max-age directive with non-integer
                // content) to be stale."
                b"max-age" => {
                    cc.max_age = strict_delta(seen_max_age, &arg);
                    seen_max_age = true;
                }
                b"s-maxage" => {
                    cc.s_maxage = strict_delta(seen_s_maxage, &arg);
                    seen_s_maxage = true;
                }
                b"must-revalidate" => cc.must_revalidate = true,
                b"proxy-revalidate" => cc.proxy_revalidate = true,
                b"no-transform" => cc.no_transform = true,
                b"immutable" => cc.immutable = true,
                b"must-understand" => cc.must_understand = true,
                // RFC 5861 §3 / §4: stale-while-revalidate and stale-if-error take
                // delta-seconds. An invalid argument disables the extension (never serve
                // stale on a guess); of several values the smallest (most restrictive) wins,
                // after RFC 9111 §4.2.1: "the most restrictive directive should be honored".
                b"stale-while-revalidate" => match arg.delta_seconds() {
                    Some(n) => cc.stale_while_revalidate = min_opt(cc.stale_while_revalidate, n),
                    None => swr_invalid = true,
                },
                b"stale-if-error" => match arg.delta_seconds() {
                    Some(n) => cc.stale_if_error = min_opt(cc.stale_if_error, n),
                    None => sie_invalid = true,
                },
                // RFC 9111 §5.2.1.2: "If no value is assigned to max-stale, then the client
                // will accept a stale response of any age." An invalid argument is ignored;
                // of several, the most restrictive wins.
                b"max-stale" => {
                    let this = match &arg {
                        Arg::Absent => Some(None),
                        _ => arg.delta_seconds().map(Some),
                    };
                    if let Some(this) = this {
                        cc.max_stale = Some(match (cc.max_stale, this) {
                            (None, t) | (Some(None), t) => t,
                            (Some(Some(a)), None) => Some(a),
                            (Some(Some(a)), Some(b)) => Some(a.min(b)),
                        });
                    }
                }
                // RFC 9111 §5.2.1.3: "the client prefers a response whose freshness lifetime
                // is no less than its current age plus the specified time in seconds". An
                // invalid argument is ignored; of several, the largest (most restrictive) wins.
                b"min-fresh" => {
                    if let Some(n) = arg.delta_seconds() {
                        cc.min_fresh = Some(cc.min_fresh.map_or(n, |m| m.max(n)));
                    }
                }
                b"only-if-cached" => cc.only_if_cached = true,
                // RFC 9111 §5.2.3: "A cache MUST ignore unrecognized cache directives."
                _ => {}
            }
        }
        if swr_invalid {
            cc.stale_while_revalidate = None;
        }
        if sie_invalid {
            cc.stale_if_error = None;
        }
        cc
    }

    /// Parses a request's Cache-Control, and also honours `Pragma: no-cache` when the request
    /// has no Cache-Control field at all.
    pub fn parse_request(headers: &HeaderList) -> CacheControl {
        let mut cc = CacheControl::parse(headers);
        // RFC 9111 §5.4: "this specification deprecates Pragma", but HTTP/1.0 clients still
        // send it. Echo keeps the RFC 7234 §5.4 rule: "When the Cache-Control header field is
        // not present in a request, caches MUST consider the no-cache request pragma-directive
        // as having the same effect as if "Cache-Control: no-cache" were present".
        if !has_header(headers, "cache-control") {
            if let Some(pragma) = header_joined_bytes(headers, "pragma") {
                if split_list(&pragma)
                    .iter()
                    .any(|m| m.eq_ignore_ascii_case(b"no-cache"))
                {
                    cc.no_cache = true;
                }
            }
        }
        cc
    }
}

/// Adds the field names of a qualified `no-cache` or `private` (`"a, b"`), lower case,
/// once each. False when the directive names none (unqualified, empty or malformed).
fn collect_fields(arg: &Arg, into: &mut Vec<String>) -> bool {
    let Arg::Value(v) = arg else {
        return false;
    };
    let mut any = false;
    for field in split_list(v) {
        let field = String::from_utf8_lossy(field).to_ascii_lowercase();
        if !field.is_empty() {
            any = true;
            if !into.contains(&field) {
                into.push(field);
            }
        }
    }
    any
}

/// max-age / s-maxage: a repeated or invalid value means "stale" (Some(0)).
fn strict_delta(already_seen: bool, arg: &Arg) -> Option<u64> {
    if already_seen {
        return Some(0);
    }
    Some(arg.delta_seconds().unwrap_or(0))
}

fn min_opt(current: Option<u64>, n: u64) -> Option<u64> {
    Some(current.map_or(n, |c| c.min(n)))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testing::*;

    fn cc(lines: &[&str]) -> CacheControl {
        let h: Vec<_> = lines
            .iter()
            .map(|l| ("cache-control".to_string(), l.as_bytes().to_vec()))
            .collect();
        CacheControl::parse(&h)
    }

    #[test]
    fn parse_table() {
        let d = CacheControl::default;
        let cases: Vec<(&str, Vec<&str>, CacheControl)> = vec![
            ("absent", vec![], d()),
            ("empty", vec![""], d()),
            (
                "simple max-age",
                vec!["max-age=60"],
                CacheControl {
                    max_age: Some(60),
                    ..d()
                },
            ),
            (
                "case-insensitive name",
                vec!["Max-Age=60, PUBLIC"],
                CacheControl {
                    max_age: Some(60),
                    public: true,
                    ..d()
                },
            ),
            (
                "quoted argument",
                vec![r#"max-age="60""#],
                CacheControl {
                    max_age: Some(60),
                    ..d()
                },
            ),
            (
                "duplicate max-age is stale",
                vec!["max-age=60, max-age=120"],
                CacheControl {
                    max_age: Some(0),
                    ..d()
                },
            ),
            (
                "duplicate across lines is stale",
                vec!["max-age=60", "max-age=60"],
                CacheControl {
                    max_age: Some(0),
                    ..d()
                },
            ),
            (
                "invalid max-age is stale",
                vec!["max-age=abc"],
                CacheControl {
                    max_age: Some(0),
                    ..d()
                },
            ),
            (
                "negative max-age is stale",
                vec!["max-age=-1"],
                CacheControl {
                    max_age: Some(0),
                    ..d()
                },
            ),
            (
                "max-age without value is stale",
                vec!["max-age"],
                CacheControl {
                    max_age: Some(0),
                    ..d()
                },
            ),
            (
                "unterminated quote is stale",
                vec![r#"max-age="60"#],
                CacheControl {
                    max_age: Some(0),
                    ..d()
                },
            ),
            (
                "overflow saturates",
                vec!["max-age=99999999999999999999999, s-maxage=2147483649"],
                CacheControl {
                    max_age: Some(2_147_483_648),
                    s_maxage: Some(2_147_483_648),
                    ..d()
                },
            ),
            (
                "2^31 - 1 kept",
                vec!["max-age=2147483647"],
                CacheControl {
                    max_age: Some(2_147_483_647),
                    ..d()
                },
            ),
            (
                "qualified no-cache",
                vec![r#"no-cache="Set-Cookie, x-foo""#],
                CacheControl {
                    no_cache_fields: vec!["set-cookie".into(), "x-foo".into()],
                    ..d()
                },
            ),
            (
                "empty or malformed qualified forms read as unqualified",
                vec![r#"no-cache="", private="a"#],
                CacheControl {
                    no_cache: true,
                    private: true,
                    ..d()
                },
            ),
            (
                "unqualified no-cache",
                vec!["no-cache"],
                CacheControl {
                    no_cache: true,
                    ..d()
                },
            ),
            (
                "qualified private",
                vec![r#"private="set-cookie", max-age=5"#],
                CacheControl {
                    private_fields: vec!["set-cookie".into()],
                    max_age: Some(5),
                    ..d()
                },
            ),
            (
                "comma inside quotes does not split",
                vec![r#"no-cache="a, max-age=5""#],
                CacheControl {
                    no_cache_fields: vec!["a".into(), "max-age=5".into()],
                    ..d()
                },
            ),
            (
                "flags and whitespace",
                vec![
                    " no-store ,must-revalidate,, proxy-revalidate",
                    "no-transform,immutable, only-if-cached, Must-Understand",
                ],
                CacheControl {
                    no_store: true,
                    must_revalidate: true,
                    proxy_revalidate: true,
                    no_transform: true,
                    immutable: true,
                    must_understand: true,
                    only_if_cached: true,
                    ..d()
                },
            ),
            (
                "unknown directives ignored",
                vec!["foo, bar=baz, x=\"1,2\", max-age=3"],
                CacheControl {
                    max_age: Some(3),
                    ..d()
                },
            ),
            (
                "rfc 5861",
                vec!["stale-while-revalidate=30, stale-if-error=600"],
                CacheControl {
                    stale_while_revalidate: Some(30),
                    stale_if_error: Some(600),
                    ..d()
                },
            ),
            (
                "rfc 5861 invalid disables, duplicates take min",
                vec!["stale-while-revalidate=x, stale-if-error=60, stale-if-error=30"],
                CacheControl {
                    stale_if_error: Some(30),
                    ..d()
                },
            ),
            (
                "max-stale without value",
                vec!["max-stale"],
                CacheControl {
                    max_stale: Some(None),
                    ..d()
                },
            ),
            (
                "max-stale with value, min-fresh",
                vec!["max-stale=10, min-fresh=5"],
                CacheControl {
                    max_stale: Some(Some(10)),
                    min_fresh: Some(5),
                    ..d()
                },
            ),
            (
                "max-stale most restrictive, invalid ignored",
                vec!["max-stale, max-stale=20, max-stale=x, max-stale=10"],
                CacheControl {
                    max_stale: Some(Some(10)),
                    ..d()
                },
            ),
            (
                "min-fresh most restrictive",
                vec!["min-fresh=5, min-fresh=50, min-fresh=bad"],
                CacheControl {
                    min_fresh: Some(50),
                    ..d()
                },
            ),
        ];
        for (name, lines, want) in cases {
            assert_eq!(cc(&lines), want, "case {name}");
        }
    }

    #[test]
    fn request_pragma() {
        let cases: Vec<(&str, Pairs, bool)> = vec![
            ("pragma alone", vec![("pragma", "no-cache")], true),
            ("pragma case", vec![("pragma", "No-Cache")], true),
            ("pragma list", vec![("pragma", "foo, no-cache")], true),
            ("other pragma", vec![("pragma", "foo")], false),
            (
                "cache-control present wins",
                vec![("pragma", "no-cache"), ("cache-control", "max-age=5")],
                false,
            ),
            ("nothing", vec![], false),
        ];
        for (name, h, want) in cases {
            let got = CacheControl::parse_request(&hdrs(&h)).no_cache;
            assert_eq!(got, want, "case {name}");
        }
        // A response's Pragma is not a Cache-Control substitute.
        assert!(!CacheControl::parse(&hdrs(&[("pragma", "no-cache")])).no_cache);
    }
}
