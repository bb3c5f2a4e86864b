//! The one set of field helpers, used by the front end (`http`), the cache policy
//! (`policy`) and the request path alike: reading a header list (first value, single
//! value, joined values, presence), comma-separated lists that respect quoted strings,
//! tokens in lists, HTTP dates, delta-seconds, field-name folding, and the hop-by-hop
//! fields a proxy removes.
//!
//! Invariants:
//! - A header list is `[(name, value)]` with raw value bytes; repeated fields are separate
//!   lines, in order. Names are lower case past the parser; lookups here still compare them
//!   ASCII case-insensitively (RFC 9110 §5.1: "Field names are case-insensitive"), so a list
//!   built by hand finds the same fields.
//! - There is one list parser, `split_list`: every comma-separated field read here
//!   (Connection, Cache-Control, Pragma, Vary, Age, Cache-Status, ...) is split by it, so a
//!   comma inside a quoted-string splits nothing, anywhere.
//! - Every delta-seconds value is at most 2^31 (RFC 9111 §1.2.2).
//!
//! What it must not do: import anything else from the crate (it sits below `http`,
//! `policy` and the request path); read a clock; panic on any input (no `unwrap`, no
//! panicking indexing or unchecked arithmetic on values that come from the network).

use std::borrow::Cow;
use std::time::SystemTime;

/// A header section: field name, raw value; repeated fields stay separate, in order.
pub type HeaderList = [(String, Vec<u8>)];

// ---------------------------------------------------------------------------------------------
// Reading fields
// ---------------------------------------------------------------------------------------------

/// Is `n` the field `name`? Field names are case-insensitive (RFC 9110 §5.1).
fn is_named(n: &str, name: &str) -> bool {
    n.eq_ignore_ascii_case(name)
}

/// The first value of a field, if any.
pub fn header<'a>(headers: &'a HeaderList, name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(n, _)| is_named(n, name))
        .map(|(_, v)| v.as_slice())
}

/// The single value of a field if present exactly once.
pub(crate) fn header_one<'a>(headers: &'a HeaderList, name: &str) -> Option<&'a [u8]> {
    let mut found: Option<&'a [u8]> = None;
    for (n, v) in headers {
        if is_named(n, name) {
            if found.is_some() {
                return None;
            }
            found = Some(v.as_slice());
        }
    }
    found
}

/// Is the field present (with any value, even empty)?
pub(crate) fn has_header(headers: &HeaderList, name: &str) -> bool {
    headers.iter().any(|(n, _)| is_named(n, name))
}

/// All field lines of `name`, combined into one list value (raw bytes).
// RFC 9110 §5.3: "A recipient MAY combine multiple field lines within a field section that
// have the same field name into one field line, without changing the semantics of the message,
// by appending each subsequent field line value to the initial field line value in order,
// separated by a comma (",") and optional whitespace (OWS, defined in Section 5.6.3)."
// A single line is borrowed, not copied: most fields have one, and this runs on every
// request (Cache-Control, Vary, Age).
pub(crate) fn header_joined_bytes<'a>(
    headers: &'a HeaderList,
    name: &str,
) -> Option<Cow<'a, [u8]>> {
    let mut out: Option<Cow<'a, [u8]>> = None;
    for (n, v) in headers {
        if is_named(n, name) {
            match out.as_mut() {
                Some(buf) => {
                    let buf = buf.to_mut();
                    buf.extend_from_slice(b", ");
                    buf.extend_from_slice(v);
                }
                None => out = Some(Cow::Borrowed(v)),
            }
        }
    }
    out
}

/// All values of a field joined with ", " (None if absent).
/// Non-UTF-8 bytes are replaced (lossy).
pub(crate) fn header_joined(headers: &HeaderList, name: &str) -> Option<String> {
    let mut out: Option<String> = None;
    for (n, v) in headers {
        if is_named(n, name) {
            let v = String::from_utf8_lossy(v);
            match out.as_mut() {
                Some(s) => {
                    s.push_str(", ");
                    s.push_str(&v);
                }
                None => out = Some(v.into_owned()),
            }
        }
    }
    out
}

// ---------------------------------------------------------------------------------------------
// Lists and tokens
// ---------------------------------------------------------------------------------------------

/// Trims optional whitespace (SP / HTAB, RFC 9110 §5.6.3) from both ends.
pub(crate) fn trim_ows(mut s: &[u8]) -> &[u8] {
    while let [b' ' | b'\t', rest @ ..] = s {
        s = rest;
    }
    while let [rest @ .., b' ' | b'\t'] = s {
        s = rest;
    }
    s
}

/// Splits a comma-separated list value into trimmed, non-empty members. Commas inside a
/// quoted-string do not split.
// RFC 9110 §5.6.1.2: "a recipient MUST parse and ignore a reasonable number of empty list
// elements".
// RFC 9110 §5.6.4: "The backslash octet ("\") can be used as a single-octet quoting mechanism
// within quoted-string and comment constructs."
pub(crate) fn split_list(s: &[u8]) -> Vec<&[u8]> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut in_quote = false;
    let mut escaped = false;
    for (i, &b) in s.iter().enumerate() {
        if in_quote {
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_quote = false;
            }
        } else if b == b'"' {
            in_quote = true;
        } else if b == b',' {
            out.push(trim_ows(s.get(start..i).unwrap_or_default()));
            start = i + 1;
        }
    }
    out.push(trim_ows(s.get(start..).unwrap_or_default()));
    out.retain(|m| !m.is_empty());
    out
}

/// The members of every line of the list field `name`, in order. Each line is split on
/// its own, so a quote left open on one line cannot hide the members of the next.
pub(crate) fn list_members<'a>(
    headers: &'a HeaderList,
    name: &'a str,
) -> impl Iterator<Item = &'a [u8]> {
    headers
        .iter()
        .filter(move |(n, _)| is_named(n, name))
        .flat_map(|(_, v)| split_list(v))
}

/// Does the comma-separated list field `name` contain `token` (case-insensitive)?
// RFC 9110 §7.6.1: "Connection options are case-insensitive."
pub(crate) fn has_token(headers: &HeaderList, name: &str, token: &str) -> bool {
    list_members(headers, name).any(|item| item.eq_ignore_ascii_case(token.as_bytes()))
}

// ---------------------------------------------------------------------------------------------
// Dates and delta-seconds
// ---------------------------------------------------------------------------------------------

/// Parses an HTTP-date (IMF-fixdate, RFC 850 or asctime) from raw bytes. The parsing is
/// the `httpdate` crate's; Echo puts the names in its case first and gives an RFC 850
/// date's two-digit year its century as RFC 9110 says (the crate pivots at 1970).
// RFC 9110 §5.6.7: "A recipient that parses a timestamp value in an HTTP field MUST accept
// all three HTTP-date formats."
pub(crate) fn parse_date(v: &[u8]) -> Option<SystemTime> {
    parse_date_at(v, SystemTime::now())
}

/// [`parse_date`], with `now` deciding the century of a two-digit year.
fn parse_date_at(v: &[u8], now: SystemTime) -> Option<SystemTime> {
    let s = std::str::from_utf8(trim_ows(v)).ok()?;
    if !s.is_ascii() {
        return None;
    }
    // RFC 9111 §4.2: "Although all date formats are specified to be case-sensitive, a cache
    // recipient SHOULD match the field value case-insensitively."
    let s = names_in_their_case(s);
    let s = rfc850_as_imf_fixdate(&s, now).unwrap_or(s);
    httpdate::parse_http_date(&s).ok()
}

/// Day, month and zone names as the formats spell them (`sun` → `Sun`, `gmt` → `GMT`).
fn names_in_their_case(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut rest = s;
    while let Some(c) = rest.chars().next() {
        if !c.is_ascii_alphabetic() {
            out.push(c);
            rest = &rest[1..];
            continue;
        }
        let end = rest
            .find(|c: char| !c.is_ascii_alphabetic())
            .unwrap_or(rest.len());
        let (word, after) = rest.split_at(end);
        if word.eq_ignore_ascii_case("gmt") {
            out.push_str("GMT");
        } else {
            out.push_str(&word[..1].to_ascii_uppercase());
            out.push_str(&word[1..].to_ascii_lowercase());
        }
        rest = after;
    }
    out
}

/// An RFC 850 date (`Sunday, 06-Nov-94 08:49:37 GMT`) as an IMF-fixdate, its year's
/// century chosen as of `now`; None for any other form.
fn rfc850_as_imf_fixdate(s: &str, now: SystemTime) -> Option<String> {
    const DAYS: [&str; 7] = [
        "Monday",
        "Tuesday",
        "Wednesday",
        "Thursday",
        "Friday",
        "Saturday",
        "Sunday",
    ];
    let (day, rest) = s.split_once(", ")?;
    let b = rest.as_bytes();
    if !DAYS.contains(&day) || b.len() != 22 || b[2] != b'-' || b[6] != b'-' || b[9] != b' ' {
        return None;
    }
    if !b[7..9].iter().all(u8::is_ascii_digit) {
        return None;
    }
    let yy: u64 = rest[7..9].parse().ok()?;
    let this_year: u64 = format_date(now).get(12..16)?.parse().ok()?;
    // RFC 9110 §5.6.7: "Recipients of a timestamp value in rfc850-date format, which uses
    // a two-digit year, MUST interpret a timestamp that appears to be more than 50 years
    // in the future as representing the most recent year in the past that had the same
    // last two digits."
    let mut year = this_year / 100 * 100 + yy;
    if year > this_year + 50 {
        year -= 100;
    }
    Some(format!(
        "{}, {} {} {year} {}",
        &day[..3],
        &rest[..2],
        &rest[3..6],
        &rest[10..]
    ))
}

/// Formats a time as an IMF-fixdate (`Sun, 06 Nov 1994 08:49:37 GMT`).
// RFC 9110 §5.6.7: "When a sender generates a field that contains one or more timestamps
// defined as HTTP-date, the sender MUST generate those timestamps in the IMF-fixdate format."
pub(crate) fn format_date(t: SystemTime) -> String {
    httpdate::fmt_http_date(t)
}

/// RFC 9111 §1.2.2: "the cache MUST consider the value to be 2147483648 (2^31) or the greatest
/// positive integer it can conveniently represent".
pub(crate) const DELTA_SECONDS_MAX: u64 = 1 << 31;

/// delta-seconds = 1*DIGIT, saturating at 2^31.
// RFC 9111 §1.2.2: "If a cache receives a delta-seconds value greater than the greatest integer
// it can represent, or if any of its subsequent calculations overflows, the cache MUST consider
// the value to be 2147483648 (2^31) or the greatest positive integer it can conveniently
// represent."
pub(crate) fn parse_delta_seconds(v: &[u8]) -> Option<u64> {
    if v.is_empty() || !v.iter().all(u8::is_ascii_digit) {
        return None;
    }
    let n = v.iter().fold(0u64, |acc, &d| {
        acc.saturating_mul(10)
            .saturating_add(u64::from(d.saturating_sub(b'0')))
    });
    Some(n.min(DELTA_SECONDS_MAX))
}

// ---------------------------------------------------------------------------------------------
// Names and hop-by-hop fields
// ---------------------------------------------------------------------------------------------

/// A field name as CGI, WSGI and Rack servers read it: `_` and `-` are the same (names
/// are already lower case past the parser). Every comparison of a request field name
/// against a list Echo acts on (hop-by-hop, its own forwarding fields, the strip list)
/// goes through this, so `X_Forwarded_Host` is `x-forwarded-host` (the Puma
/// CVE-2024-45614 class of cache poisoning).
pub(crate) fn fold_name(name: &str) -> Cow<'_, str> {
    if name.contains('_') || name.bytes().any(|b| b.is_ascii_uppercase()) {
        Cow::Owned(name.to_ascii_lowercase().replace('_', "-"))
    } else {
        Cow::Borrowed(name)
    }
}

/// Do two field names name the same field once folded (`_` = `-`, any case)?
pub(crate) fn same_field(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes().zip(b.bytes()).all(|(x, y)| {
            let fold = |c: u8| {
                if c == b'_' {
                    b'-'
                } else {
                    c.to_ascii_lowercase()
                }
            };
            fold(x) == fold(y)
        })
}

/// Hop-by-hop fields (RFC 9110 §7.6.1), never forwarded and never stored, plus
/// the framing fields Echo sets itself.
pub(crate) const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// Removes the hop-by-hop fields and every field named in `Connection`
/// (RFC 9110 §7.6.1: "a proxy or gateway MUST ... remove any header or trailer field
/// ... identified in the Connection header field"), names compared folded.
pub(crate) fn strip_hop_by_hop(headers: &mut Vec<(String, Vec<u8>)>) {
    let named: Vec<String> = headers
        .iter()
        .filter(|(n, _)| same_field(n, "connection"))
        .flat_map(|(_, v)| split_list(v))
        .map(|item| fold_name(&String::from_utf8_lossy(item)).into_owned())
        .collect();
    headers.retain(|(n, _)| {
        let n = fold_name(n);
        !HOP_BY_HOP.contains(&n.as_ref()) && !named.iter().any(|c| *c == n)
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hdrs<S: AsRef<str>>(pairs: &[(&str, S)]) -> Vec<(String, Vec<u8>)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_ref().as_bytes().to_vec()))
            .collect()
    }

    fn h(pairs: &[(&str, &str)]) -> Vec<(String, Vec<u8>)> {
        hdrs(pairs)
    }

    #[test]
    fn joined_and_one() {
        let h = hdrs(&[("vary", "a"), ("x", "1"), ("vary", "b")]);
        assert_eq!(header_joined(&h, "vary").as_deref(), Some("a, b"));
        assert_eq!(header_joined(&h, "x").as_deref(), Some("1"));
        assert_eq!(header_joined(&h, "y"), None);
        assert_eq!(header_one(&h, "x"), Some(&b"1"[..]));
        assert_eq!(header_one(&h, "vary"), None);
        assert_eq!(header_one(&h, "y"), None);
        let bad = vec![("x".to_string(), vec![b'a', 0xff])];
        assert_eq!(header_joined(&bad, "x").as_deref(), Some("a\u{fffd}"));
    }

    #[test]
    fn split_list_respects_quotes() {
        let got = split_list(br#" a , ,b="x, y",, c "#);
        assert_eq!(got, vec![&b"a"[..], &br#"b="x, y""#[..], &b"c"[..]]);
        assert!(split_list(b"").is_empty());
        assert!(split_list(b" , ,").is_empty());
    }

    #[test]
    fn hop_by_hop_and_connection_named_fields_are_removed() {
        let mut headers = h(&[
            ("connection", "close, X-Secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
            ("transfer-encoding", "chunked"),
        ]);
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers, h(&[("set-cookie", "a=1"), ("set-cookie", "b=2")]));
    }

    #[test]
    fn names_fold_underscores_and_case() {
        assert_eq!(fold_name("x-forwarded-host"), "x-forwarded-host");
        assert_eq!(fold_name("X_Forwarded_Host"), "x-forwarded-host");
        assert!(same_field("x_original_url", "X-Original-URL"));
        assert!(!same_field("x-original-url", "x-original-uri"));
        let mut headers = h(&[
            ("connection", "X_Secret"),
            ("x-secret", "1"),
            ("transfer_encoding", "chunked"),
            ("keep", "1"),
        ]);
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers, h(&[("keep", "1")]));
    }

    #[test]
    fn tokens_are_found_in_lists_across_lines() {
        let headers = h(&[("connection", "keep-alive"), ("connection", " Close ")]);
        assert!(has_token(&headers, "connection", "close"));
        assert!(!has_token(&headers, "connection", "upgrade"));
    }

    /// Issue 14: `has_token` and `strip_hop_by_hop` split lists naively on commas while
    /// `split_list` respected quoted strings; all three now read a list the same way.
    #[test]
    fn a_comma_inside_a_quoted_string_splits_no_list() {
        let headers = h(&[("connection", r#"x="a, close", keep-alive"#)]);
        assert!(!has_token(&headers, "connection", "close"));
        assert!(has_token(&headers, "connection", "keep-alive"));
        let mut headers = h(&[
            ("connection", r#""a, x-kept", x-gone"#),
            ("x-kept", "1"),
            ("x-gone", "2"),
        ]);
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers, h(&[("x-kept", "1")]));
        // A quote left open on one line does not swallow the next line's members.
        let headers = h(&[("connection", "\"open"), ("connection", "close")]);
        assert!(has_token(&headers, "connection", "close"));
        let members: Vec<&[u8]> = list_members(&headers, "connection").collect();
        assert_eq!(members, vec![&b"\"open"[..], b"close"]);
    }

    #[test]
    fn lookups_ignore_the_case_of_names() {
        let headers = h(&[("ETag", "\"v1\""), ("etag", "\"v2\"")]);
        assert_eq!(header(&headers, "etag"), Some(&b"\"v1\""[..]));
        assert_eq!(header_one(&headers, "ETAG"), None);
        assert!(has_header(&headers, "Etag"));
        assert_eq!(
            header_joined_bytes(&headers, "etag").as_deref(),
            Some(&b"\"v1\", \"v2\""[..])
        );
        assert_eq!(header(&headers, "date"), None);
    }

    #[test]
    fn dates_parse_every_http_date_form_and_format_as_imf_fixdate() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(784_111_777);
        assert_eq!(format_date(t), "Sun, 06 Nov 1994 08:49:37 GMT");
        for form in [
            &b" Sun, 06 Nov 1994 08:49:37 GMT\t"[..],
            b"Sunday, 06-Nov-94 08:49:37 GMT",
            b"Sun Nov  6 08:49:37 1994",
        ] {
            assert_eq!(parse_date(form), Some(t), "{form:?}");
        }
        assert_eq!(parse_date(b"0"), None);
        assert_eq!(parse_date(&[0xff]), None);
    }

    /// RFC 9111 §4.2: "Although all date formats are specified to be case-sensitive, a
    /// cache recipient SHOULD match the field value case-insensitively."
    #[test]
    fn dates_are_matched_case_insensitively() {
        let t = SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(784_111_777);
        for form in [
            &b"sun, 06 nov 1994 08:49:37 gmt"[..],
            b"SUN, 06 NOV 1994 08:49:37 GMT",
            b"SUNDAY, 06-NOV-94 08:49:37 Gmt",
            b"sun nov  6 08:49:37 1994",
        ] {
            assert_eq!(parse_date(form), Some(t), "{form:?}");
        }
        assert_eq!(parse_date(b"Sun, 06 Nov 1994 08:49:37 UTC"), None);
    }

    /// RFC 9110 §5.6.7: "Recipients of a timestamp value in rfc850-date format, which
    /// uses a two-digit year, MUST interpret a timestamp that appears to be more than 50
    /// years in the future as representing the most recent year in the past that had the
    /// same last two digits."
    #[test]
    fn a_two_digit_year_is_at_most_fifty_years_ahead() {
        // As of 2026: `75` is 2075 (49 years ahead; the httpdate crate alone says 1975),
        // `77` is 1977 (2077 would be 51 years ahead), `30` is 2030.
        let now = httpdate::parse_http_date("Fri, 27 Nov 2026 12:00:00 GMT").unwrap();
        let year = |v: &[u8]| parse_date_at(v, now).map(|t| format_date(t)[12..16].to_string());
        assert_eq!(
            year(b"Friday, 01-Mar-75 00:00:00 GMT").as_deref(),
            Some("2075")
        );
        assert_eq!(
            year(b"Tuesday, 01-Mar-77 00:00:00 GMT").as_deref(),
            Some("1977")
        );
        assert_eq!(
            year(b"Friday, 01-Mar-30 00:00:00 GMT").as_deref(),
            Some("2030")
        );
        assert_eq!(
            year(b"Sunday, 06-Nov-94 08:49:37 GMT").as_deref(),
            Some("1994")
        );
    }

    #[test]
    fn delta_seconds_are_digits_and_saturate() {
        assert_eq!(parse_delta_seconds(b"0"), Some(0));
        assert_eq!(parse_delta_seconds(b"2147483647"), Some(2_147_483_647));
        assert_eq!(
            parse_delta_seconds(b"99999999999999999999999"),
            Some(1 << 31)
        );
        for bad in [&b""[..], b"-1", b"1.5", b" 1", b"+1"] {
            assert_eq!(parse_delta_seconds(bad), None, "{bad:?}");
        }
    }
}
