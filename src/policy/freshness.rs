//! RFC 9111 §4.2 freshness: a response's freshness lifetime, explicit (§4.2.1) or heuristic
//! (§4.2.2, and the operator's `default_ttl`), whether it is fresh, and its age (§4.2.3,
//! with the `Age` field of §5.1).
//!
//! Invariants: `s-maxage` beats `max-age`, which beats `Expires` − `Date`; a heuristic
//! lifetime is never used when an explicit one is present, and only for heuristically
//! cacheable statuses; lifetimes saturate at 2^31 seconds; ages never go negative and
//! saturate instead of overflowing.
//!
//! What it must not do: read a clock (every time is an argument); panic on any input.

use std::time::{Duration, SystemTime};

use super::{CacheControl, HeaderList, PolicyOptions};
use crate::http::headers::{
    has_header, header, header_joined_bytes, header_one, parse_date, parse_delta_seconds,
    split_list, DELTA_SECONDS_MAX,
};

/// The response's Date, or the time it was received if Date is absent or invalid.
// RFC 9111 §4.2.1: "using the time the message was received if it is not present, as per
// Section 6.6.1 of [HTTP]". An unparseable Date is treated as absent; of several Date lines the
// first is used.
fn date_value(resp: &HeaderList, response_time: SystemTime) -> SystemTime {
    header(resp, "date")
        .and_then(parse_date)
        .unwrap_or(response_time)
}

/// Statuses that may get a heuristic freshness lifetime (206 left out: Echo never stores it).
// RFC 9110 §15.1: "Responses with status codes that are defined as heuristically cacheable
// (e.g., 200, 203, 204, 206, 300, 301, 308, 404, 405, 410, 414, and 501 in this specification)
// can be reused by a cache with heuristic expiration unless otherwise indicated by the method
// definition or explicit cache controls".
fn heuristically_cacheable(status: u16) -> bool {
    matches!(
        status,
        200 | 203 | 204 | 300 | 301 | 308 | 404 | 405 | 410 | 414 | 501
    )
}

/// RFC 9111 §4.2.1 freshness lifetime: explicit (s-maxage, then max-age, then Expires − Date)
/// or, when none of those is present, heuristic. Returns `(lifetime, heuristic)`, or None if
/// no lifetime applies. `cc` is the response's parsed Cache-Control.
pub fn freshness_lifetime(
    status: u16,
    resp: &HeaderList,
    cc: &CacheControl,
    response_time: SystemTime,
    opts: &PolicyOptions,
) -> Option<(Duration, bool)> {
    // RFC 9111 §4.2.1: "If the cache is shared and the s-maxage response directive
    // (Section 5.2.2.10) is present, use its value".
    if let Some(s) = cc.s_maxage {
        return Some((Duration::from_secs(s), false));
    }
    // RFC 9111 §4.2.1: "If the max-age response directive (Section 5.2.2.1) is present, use
    // its value".
    // RFC 9111 §5.3: "If a response includes a Cache-Control header field with the max-age
    // directive (Section 5.2.2.1), a recipient MUST ignore the Expires header field."
    if let Some(m) = cc.max_age {
        return Some((Duration::from_secs(m), false));
    }
    // RFC 9111 §4.2.1: "If the Expires response header field (Section 5.3) is present, use its
    // value minus the value of the Date response header field (using the time the message was
    // received if it is not present, as per Section 6.6.1 of [HTTP])".
    if has_header(resp, "expires") {
        // RFC 9111 §5.3: "A cache recipient MUST interpret invalid date formats, especially the
        // value "0", as representing a time in the past (i.e., "already expired")."
        // Several Expires lines: RFC 9111 §4.2.1 lets the cache consider the response stale.
        let expires = header_one(resp, "expires").and_then(parse_date);
        let lifetime = match expires {
            Some(expires) => expires
                .duration_since(date_value(resp, response_time))
                .unwrap_or(Duration::ZERO),
            None => Duration::ZERO,
        };
        return Some((cap_delta(lifetime), false));
    }
    // RFC 9111 §4.2.2: "A cache MUST NOT use heuristics to determine freshness when an
    // explicit expiration time is present in the stored response." (We only get here when
    // none is.)
    heuristic_lifetime(status, resp, response_time, opts)
        .map(|d| (d, true))
        // An operator's default lifetime, for heuristically cacheable responses the origin
        // said nothing about (the same responses RFC 9111 §4.2.2 lets a cache guess for).
        .or_else(|| {
            (heuristically_cacheable(status) && !opts.default_ttl.is_zero())
                .then_some((opts.default_ttl, true))
        })
}

/// RFC 9111 §4.2.2 heuristic: fraction × (Date − Last-Modified), capped, whole seconds.
fn heuristic_lifetime(
    status: u16,
    resp: &HeaderList,
    response_time: SystemTime,
    opts: &PolicyOptions,
) -> Option<Duration> {
    // RFC 9111 §4.2.2: "heuristics can only be used on responses without explicit freshness
    // whose status codes are defined as heuristically cacheable (e.g., see Section 15.1 of
    // [HTTP]) and on responses without explicit freshness that have been marked as explicitly
    // cacheable (e.g., with a public response directive)". Echo uses the first case only:
    // `public` alone does not earn a heuristic lifetime.
    if !heuristically_cacheable(status) {
        return None;
    }
    // RFC 9111 §4.2.2: "If the response has a Last-Modified header field (Section 8.8.2 of
    // [HTTP]), caches are encouraged to use a heuristic expiration value that is no more than
    // some fraction of the interval since that time. A typical setting of this fraction might
    // be 10%."
    let last_modified = header(resp, "last-modified").and_then(parse_date)?;
    let date = date_value(resp, response_time);
    let interval = date.duration_since(last_modified).ok()?;
    if interval.is_zero() {
        return None;
    }
    let cap = opts.heuristic_max;
    let fraction = opts.heuristic_fraction;
    // A NaN, zero or negative fraction disables the heuristic.
    if fraction.is_nan() || fraction <= 0.0 {
        return None;
    }
    let secs = interval.as_secs_f64() * fraction;
    let lifetime = Duration::try_from_secs_f64(secs.floor()).unwrap_or(cap);
    Some(lifetime.min(cap))
}

/// Saturates a computed lifetime at 2^31 seconds (RFC 9111 §1.2.2).
fn cap_delta(d: Duration) -> Duration {
    d.min(Duration::from_secs(DELTA_SECONDS_MAX))
}

/// Is this stored response fresh at `age`?
// RFC 9111 §4.2: "response_is_fresh = (freshness_lifetime > current_age)"
pub(crate) fn is_fresh(freshness: Duration, age: Duration) -> bool {
    freshness > age
}

// ---------------------------------------------------------------------------------------------
// Age (RFC 9111 §4.2.3, §5.1)
// ---------------------------------------------------------------------------------------------

/// The Age field's value in seconds, if valid.
// RFC 9111 §5.1: "Although it is defined as a singleton header field, a cache encountering a
// message with a list-based Age field value SHOULD use the first member of the field value,
// discarding subsequent ones."
// RFC 9111 §5.1: "If the field value (after discarding additional members, as per above) is
// invalid (e.g., it contains something other than a non-negative integer), a cache SHOULD
// ignore the field."
fn age_value(resp: &HeaderList) -> Option<u64> {
    let joined = header_joined_bytes(resp, "age")?;
    let first = split_list(&joined).into_iter().next()?;
    parse_delta_seconds(first)
}

/// RFC 9111 §4.2.3 corrected_initial_age, from the response's Age and Date fields and the
/// times the request was sent and the response received.
pub fn corrected_initial_age(
    resp: &HeaderList,
    request_time: SystemTime,
    response_time: SystemTime,
) -> Duration {
    // RFC 9111 §4.2.3: "age_value: The term "age_value" denotes the value of the Age header
    // field (Section 5.1), in a form appropriate for arithmetic operation; or 0, if not
    // available."
    let age = Duration::from_secs(age_value(resp).unwrap_or(0));
    let date = date_value(resp, response_time);
    // RFC 9111 §4.2.3: "apparent_age = max(0, response_time - date_value);"
    let apparent_age = response_time.duration_since(date).unwrap_or(Duration::ZERO);
    // RFC 9111 §4.2.3: "response_delay = response_time - request_time;"
    let response_delay = response_time
        .duration_since(request_time)
        .unwrap_or(Duration::ZERO);
    // RFC 9111 §4.2.3: "corrected_age_value = age_value + response_delay;"
    let corrected_age_value = age.saturating_add(response_delay);
    // RFC 9111 §4.2.3: "corrected_initial_age = max(apparent_age, corrected_age_value);"
    apparent_age.max(corrected_age_value)
}

/// current_age = corrected_initial_age + (now − response_time), saturating.
// RFC 9111 §4.2.3: "resident_time = now - response_time;
// current_age = corrected_initial_age + resident_time;"
pub(crate) fn current_age(
    corrected_initial_age: Duration,
    response_time: SystemTime,
    now: SystemTime,
) -> Duration {
    let resident_time = now.duration_since(response_time).unwrap_or(Duration::ZERO);
    corrected_initial_age.saturating_add(resident_time)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testing::*;
    use crate::policy::{storability, NoStoreReason, Storability};

    #[test]
    fn lifetime_table() {
        let opts = PolicyOptions::default();
        let cases: Vec<(&str, u16, OwnedPairs, Lifetime)> = vec![
            ("none", 200, vec![], None),
            (
                "max-age",
                200,
                vec![("cache-control", "max-age=5".into())],
                Some((secs(5), false)),
            ),
            (
                "max-age=0",
                200,
                vec![("cache-control", "max-age=0".into())],
                Some((secs(0), false)),
            ),
            (
                "s-maxage first",
                200,
                vec![("cache-control", "s-maxage=7, max-age=5".into())],
                Some((secs(7), false)),
            ),
            (
                "expires",
                200,
                vec![("date", date(0)), ("expires", date(100))],
                Some((secs(100), false)),
            ),
            (
                "expires uses date header, not response time",
                200,
                vec![("date", date(-50)), ("expires", date(100))],
                Some((secs(150), false)),
            ),
            (
                "invalid expires",
                200,
                vec![("expires", "0".into())],
                Some((secs(0), false)),
            ),
            (
                "heuristic",
                200,
                vec![("date", date(0)), ("last-modified", date(-1000))],
                Some((secs(100), true)),
            ),
            (
                "heuristic not for 302",
                302,
                vec![("date", date(0)), ("last-modified", date(-1000))],
                None,
            ),
            (
                "heuristic not for 206",
                206,
                vec![("date", date(0)), ("last-modified", date(-1000))],
                None,
            ),
            (
                "explicit for 302",
                302,
                vec![("cache-control", "max-age=9".into())],
                Some((secs(9), false)),
            ),
        ];
        for (name, status, resp, want) in cases {
            let resp = hdrs(&resp);
            let cc = CacheControl::parse(&resp);
            let got = freshness_lifetime(status, &resp, &cc, t0(), &opts);
            assert_eq!(got, want, "case {name}");
        }
    }

    #[test]
    fn is_fresh_is_strict() {
        assert!(is_fresh(secs(10), secs(9)));
        assert!(!is_fresh(secs(10), secs(10)));
        assert!(!is_fresh(secs(0), secs(0)));
    }

    #[test]
    fn options_change_the_heuristic() {
        let resp = hdrs(&[("date", date(0)), ("last-modified", date(-1000))]);
        let run = |heuristic_fraction: f64, cap: u64| {
            let opts = PolicyOptions {
                heuristic_max: secs(cap),
                heuristic_fraction,
                ..PolicyOptions::default()
            };
            storability("GET", &[], 200, &resp, t0(), &opts)
        };
        assert_eq!(run(0.5, DAY), heur(500));
        assert_eq!(run(0.5, 60), heur(60));
        assert_eq!(run(0.0, DAY), no(NoStoreReason::NotFresh));
        assert_eq!(run(-1.0, DAY), no(NoStoreReason::NotFresh));
        assert_eq!(run(f64::NAN, DAY), no(NoStoreReason::NotFresh));
        assert_eq!(run(f64::INFINITY, DAY), heur(DAY));
        // 10% of 5 s rounds down to zero.
        let short = hdrs(&[("date", date(0)), ("last-modified", date(-5))]);
        let got = storability("GET", &[], 200, &short, t0(), &PolicyOptions::default());
        assert_eq!(got, no(NoStoreReason::NotFresh));
    }

    #[test]
    fn a_default_ttl_covers_responses_the_origin_said_nothing_about() {
        let opts = PolicyOptions {
            default_ttl: Duration::from_secs(30),
            ..PolicyOptions::default()
        };
        let now = SystemTime::now();
        let got = storability("GET", &[], 200, &[], now, &opts);
        assert_eq!(
            got,
            Storability::Store {
                freshness: Duration::from_secs(30),
                heuristic: true
            }
        );
        // Not for statuses that need explicit freshness, and off by default.
        assert!(matches!(
            storability("GET", &[], 302, &[], now, &opts),
            Storability::DoNotStore(_)
        ));
        let off = storability("GET", &[], 200, &[], now, &PolicyOptions::default());
        assert_eq!(off, Storability::DoNotStore(NoStoreReason::NotFresh));
    }

    mod age {
        use super::*;

        #[test]
        fn corrected_initial_age_table() {
            // (name, response headers, request_time, response_time, expected)
            let cases: Vec<(&str, OwnedPairs, i64, i64, u64)> = vec![
                ("nothing, no delay", vec![], 0, 0, 0),
                ("response delay only", vec![("date", date(0))], -2, 0, 2),
                (
                    "age plus delay",
                    vec![("date", date(0)), ("age", "100".into())],
                    -2,
                    0,
                    102,
                ),
                (
                    "apparent age from date",
                    vec![("date", date(-50))],
                    -1,
                    0,
                    50,
                ),
                (
                    "apparent age beats smaller corrected age",
                    vec![("date", date(-50)), ("age", "10".into())],
                    -1,
                    0,
                    50,
                ),
                (
                    "corrected age beats smaller apparent age",
                    vec![("date", date(-50)), ("age", "100".into())],
                    -1,
                    0,
                    101,
                ),
                ("date in the future", vec![("date", date(500))], 0, 0, 0),
                (
                    "invalid date ignored",
                    vec![("date", "soon".into())],
                    -3,
                    0,
                    3,
                ),
                ("negative age ignored", vec![("age", "-5".into())], -1, 0, 1),
                (
                    "non-numeric age ignored",
                    vec![("age", "abc".into())],
                    -1,
                    0,
                    1,
                ),
                (
                    "list age: first member",
                    vec![("age", "30, 40".into())],
                    -1,
                    0,
                    31,
                ),
                (
                    "two age lines: first",
                    vec![("age", "30".into()), ("age", "40".into())],
                    0,
                    0,
                    30,
                ),
                (
                    "invalid first member ignored",
                    vec![("age", "x, 40".into())],
                    0,
                    0,
                    0,
                ),
                (
                    "age overflow saturates",
                    vec![("age", "999999999999999999999".into())],
                    -1,
                    0,
                    2_147_483_649,
                ),
                (
                    "request after response",
                    vec![("age", "5".into())],
                    10,
                    0,
                    5,
                ),
            ];
            for (name, resp, req_t, resp_t, want) in cases {
                let got = corrected_initial_age(&hdrs(&resp), at(req_t), at(resp_t));
                assert_eq!(got, secs(want), "case {name}");
            }
        }

        #[test]
        fn current_age_table() {
            let cases = [
                ("resident time added", 10, 0, 30, 40),
                ("now before response", 10, 0, -30, 10),
                ("zero", 0, 0, 0, 0),
            ];
            for (name, initial, resp_t, now, want) in cases {
                let got = current_age(secs(initial), at(resp_t), at(now));
                assert_eq!(got, secs(want), "case {name}");
            }
            assert_eq!(current_age(Duration::MAX, t0(), at(10)), Duration::MAX);
        }
    }
}
