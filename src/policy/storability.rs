//! RFC 9111 §3 "Storing Responses in Caches", for a shared cache: may this response be
//! stored, for how long, and if not, why (`NoStoreReason`, the label used in headers,
//! metrics and logs).
//!
//! Invariants: only GET is stored; 206 and 304 never are; `no-store`, unqualified
//! `private` and `Vary: *` are never stored, `Set-Cookie` only when a qualified `private`
//! or `no-cache` names it, `no-cache` only with a validator (and then revalidated before
//! each reuse); a request with `Authorization` only when the response allows sharing
//! (§3.5), one with `Cookie` only with explicit freshness or `public`; a stored response
//! has a positive freshness lifetime unless it is `no-cache`. The directives are the
//! targeted field's when one applies (RFC 9213, `CacheControl::for_cache`). Where Echo is
//! stricter than the RFC (Set-Cookie, Cookie, no-cache without a validator) the comment
//! says so.
//!
//! What it must not do: read a clock (the response time is an argument); panic on any input.

use std::time::{Duration, SystemTime};

use super::{freshness_lifetime, vary, CacheControl, HeaderList, PolicyOptions, Vary};
use crate::http::headers::has_header;

/// Why a response is not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoStoreReason {
    /// The request method is not GET.
    Method,
    /// The status is not final, or 304, or not understood with `must-understand`.
    Status,
    /// The response carries `no-store`.
    NoStore,
    /// The request carries `no-store`.
    RequestNoStore,
    /// The response carries `private` (any form).
    Private,
    /// The request carries Authorization and the response does not allow sharing it.
    Authorization,
    /// The response carries `Vary: *`.
    VaryStar,
    /// The response carries Set-Cookie (Echo's choice).
    SetCookie,
    /// The request carries Cookie and the response neither has explicit freshness nor
    /// says `public` (Echo's choice: no cache deception).
    Cookie,
    /// The response carries `no-cache` (Echo's choice in this version).
    NoCache,
    /// No positive freshness lifetime applies.
    NotFresh,
    /// 206 Partial Content (Echo does not store ranges).
    Partial,
}

impl NoStoreReason {
    /// Short lower-case kebab name for headers, metric labels and logs.
    pub fn as_str(self) -> &'static str {
        match self {
            NoStoreReason::Method => "method",
            NoStoreReason::Status => "status",
            NoStoreReason::NoStore => "no-store",
            NoStoreReason::RequestNoStore => "request-no-store",
            NoStoreReason::Private => "private",
            NoStoreReason::Authorization => "authorization",
            NoStoreReason::VaryStar => "vary-star",
            NoStoreReason::SetCookie => "set-cookie",
            NoStoreReason::Cookie => "cookie",
            NoStoreReason::NoCache => "no-cache",
            NoStoreReason::NotFresh => "not-fresh",
            NoStoreReason::Partial => "partial",
        }
    }
}

/// The storage decision for one response.
#[derive(Debug, Clone, PartialEq)]
pub enum Storability {
    /// May be stored; fresh for `freshness` from the response's age zero.
    Store {
        /// Freshness lifetime (RFC 9111 §4.2.1).
        freshness: Duration,
        /// True when the lifetime is heuristic (RFC 9111 §4.2.2).
        heuristic: bool,
    },
    /// Must not be stored, and why.
    DoNotStore(NoStoreReason),
}

impl Storability {
    /// "store", or the reason's name ("no-store", "private", ...).
    pub fn as_str(&self) -> &'static str {
        match self {
            Storability::Store { .. } => "store",
            Storability::DoNotStore(reason) => reason.as_str(),
        }
    }
}

/// Is this a final status code that Echo understands (defined in RFC 9110)?
fn status_understood(status: u16) -> bool {
    matches!(
        status,
        200..=206 | 300..=304 | 307 | 308 | 400..=417 | 421 | 422 | 426 | 500..=505
    )
}

/// RFC 9111 §3 "Storing Responses in Caches", for a shared cache.
///
/// `method` is the client's request method (only "GET" is stored; HEAD is not), `req` the
/// request headers, `status` and `resp` the response, `response_time` when it was received.
pub fn storability(
    method: &str,
    req: &HeaderList,
    status: u16,
    resp: &HeaderList,
    response_time: SystemTime,
    opts: &PolicyOptions,
) -> Storability {
    use NoStoreReason as R;

    // RFC 9111 §3: "the request method is understood by the cache". Echo stores GET only.
    // RFC 9110 §9.1: "The method token is case-sensitive", so "get" is not GET.
    if method != "GET" {
        return Storability::DoNotStore(R::Method);
    }
    // RFC 9111 §3: "if the response status code is 206 or 304, or the must-understand cache
    // directive (see Section 5.2.2.3) is present: the cache understands the response status
    // code". Echo does not store partial content at all.
    if status == 206 {
        return Storability::DoNotStore(R::Partial);
    }
    // RFC 9111 §3: "the response status code is final (see Section 15 of [HTTP])". Any final
    // status may be stored with explicit freshness (299, 499, 599 with max-age: RFC 9110
    // §15: "a client MUST understand the class of any status code"); only those defined as
    // heuristically cacheable get a heuristic lifetime. A 304 is an answer to a conditional
    // request, used to freshen an entry (RFC 9111 §4.3.4), never stored as a response of
    // its own.
    if status == 304 || !(200..=599).contains(&status) {
        return Storability::DoNotStore(R::Status);
    }

    let req_cc = CacheControl::parse_request(req);
    // RFC 9213 §2.2: a targeted field that is present and valid replaces Cache-Control.
    let cc = CacheControl::for_cache(resp, opts);
    // RFC 9111 §5.2.2.3: "The must-understand response directive limits caching of the
    // response to a cache that understands and conforms to the requirements for that
    // response's status code."
    if cc.must_understand && !status_understood(status) {
        return Storability::DoNotStore(R::Status);
    }

    // RFC 9111 §5.2.1.5: "The no-store request directive indicates that a cache MUST NOT store
    // any part of either this request or any response to it."
    if req_cc.no_store {
        return Storability::DoNotStore(R::RequestNoStore);
    }
    // RFC 9111 §3: "the no-store cache directive is not present in the response (see
    // Section 5.2.2.5)". RFC 9111 §5.2.2.3: "When a cache that implements the
    // must-understand directive receives a response that includes it, the cache SHOULD
    // ignore the no-store directive if it understands the status code." (It does: an
    // unknown one was refused above.)
    if cc.no_store && !cc.must_understand {
        return Storability::DoNotStore(R::NoStore);
    }
    // RFC 9111 §3: "if the cache is shared: the private response directive is either not
    // present or allows a shared cache to store a modified response". Echo never stores a
    // modified response, so any `private` means "do not store".
    if cc.private {
        return Storability::DoNotStore(R::Private);
    }
    // RFC 9111 §3: "if the cache is shared: the Authorization header field is not present in
    // the request (see Section 11.6.2 of [HTTP]) or a response directive is present that
    // explicitly allows shared caching (see Section 3.5)".
    // RFC 9111 §3.5: "In this specification, the following response directives have such an
    // effect: must-revalidate (Section 5.2.2.2), public (Section 5.2.2.9), and s-maxage
    // (Section 5.2.2.10)."
    if has_header(req, "authorization")
        && !(cc.public || cc.s_maxage.is_some() || cc.must_revalidate)
    {
        return Storability::DoNotStore(R::Authorization);
    }
    // Echo's choice, beside the Authorization rule above: a response to a request that
    // carries Cookie may be personalised though nothing says so (`/account/profile.css`:
    // the "web cache deception" class). It is stored only when the origin gave it an
    // explicit lifetime (max-age, s-maxage, Expires) or marked it `public`, never on a
    // heuristic lifetime or `cache.default_ttl_ms`, which guess for responses the origin
    // said nothing about.
    let explicit = cc.s_maxage.is_some() || cc.max_age.is_some() || has_header(resp, "expires");
    if has_header(req, "cookie") && !(cc.public || explicit) {
        return Storability::DoNotStore(R::Cookie);
    }
    // RFC 9111 §4.1: "A stored response with a Vary header field value containing a member
    // "*" always fails to match." Storing it would be useless.
    if vary(resp) == Vary::Star {
        return Storability::DoNotStore(R::VaryStar);
    }
    // Echo's choice, not an RFC rule: RFC 9111 lets a shared cache store a response carrying
    // Set-Cookie, but replaying one user's cookie to everyone is the classic cache leak.
    // Like the defaults of Varnish and nginx, Echo does not store such a response, unless
    // its directives keep the cookie from other clients: `private="set-cookie"` (the
    // field is not stored) or `no-cache="set-cookie"` (it goes out only after a
    // revalidation).
    if has_header(resp, "set-cookie")
        && !names(&cc.private_fields, "set-cookie")
        && !names(&cc.no_cache_fields, "set-cookie")
    {
        return Storability::DoNotStore(R::SetCookie);
    }
    let validated = has_header(resp, "etag") || has_header(resp, "last-modified");
    // RFC 9111 §5.2.2.4: unqualified no-cache "allows a cache to store a response" that it
    // must revalidate before each reuse. Echo stores it only when it has a validator: one
    // without could only be fetched whole again, so storing it would save nothing.
    if cc.no_cache && !validated {
        return Storability::DoNotStore(R::NoCache);
    }

    match freshness_lifetime(status, resp, &cc, response_time, opts) {
        Some((freshness, heuristic)) if !freshness.is_zero() => Storability::Store {
            freshness,
            heuristic,
        },
        // Stored stale: every reuse revalidates it first.
        _ if cc.no_cache => Storability::Store {
            freshness: Duration::ZERO,
            heuristic: false,
        },
        _ => Storability::DoNotStore(R::NotFresh),
    }
}

/// Does a qualified directive's field list name `field`?
fn names(fields: &[String], field: &str) -> bool {
    fields.iter().any(|f| f == field)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::policy::testing::*;

    struct Case {
        name: &'static str,
        method: &'static str,
        req: Vec<(&'static str, String)>,
        status: u16,
        resp: Vec<(&'static str, String)>,
        want: Storability,
    }

    fn case(
        name: &'static str,
        method: &'static str,
        req: &[(&'static str, &str)],
        status: u16,
        resp: &[(&'static str, &str)],
        want: Storability,
    ) -> Case {
        let own = |v: &[(&'static str, &str)]| -> Vec<(&'static str, String)> {
            v.iter().map(|(n, v)| (*n, v.to_string())).collect()
        };
        Case {
            name,
            method,
            req: own(req),
            status,
            resp: own(resp),
            want,
        }
    }

    #[test]
    fn table() {
        use NoStoreReason as R;
        let now = date(0);
        let d = now.as_str();
        let in_hour = date(3600);
        let past = date(-3600);
        let lm_5d = date(-5 * DAY as i64);
        let lm_100d = date(-100 * DAY as i64);
        let lm_future = date(60);
        let ma = ("cache-control", "max-age=60");
        let cases = vec![
            // Method
            case("GET max-age", "GET", &[], 200, &[ma], store(60)),
            case("HEAD", "HEAD", &[], 200, &[ma], no(R::Method)),
            case("POST", "POST", &[], 200, &[ma], no(R::Method)),
            case("lower-case get", "get", &[], 200, &[ma], no(R::Method)),
            // Status. RFC 9111 §3: "the response status code is final"; any final status
            // with explicit freshness is storable, whether Echo knows it or not.
            case("206", "GET", &[], 206, &[ma], no(R::Partial)),
            case("100", "GET", &[], 100, &[ma], no(R::Status)),
            case("304", "GET", &[], 304, &[ma], no(R::Status)),
            case("600", "GET", &[], 600, &[ma], no(R::Status)),
            case("299 explicit", "GET", &[], 299, &[ma], store(60)),
            case("305 explicit", "GET", &[], 305, &[ma], store(60)),
            case("418 explicit", "GET", &[], 418, &[ma], store(60)),
            case("499 explicit", "GET", &[], 499, &[ma], store(60)),
            case("599 explicit", "GET", &[], 599, &[ma], store(60)),
            case("426 explicit", "GET", &[], 426, &[ma], store(60)),
            case("505 explicit", "GET", &[], 505, &[ma], store(60)),
            // ... and only heuristically cacheable statuses get a heuristic lifetime.
            case(
                "299 without explicit freshness",
                "GET",
                &[],
                299,
                &[("date", d), ("last-modified", &lm_5d)],
                no(R::NotFresh),
            ),
            // RFC 9111 §5.2.2.3: "The must-understand response directive limits caching
            // of the response to a cache that understands and conforms to the requirements
            // for that response's status code." ... "the cache SHOULD ignore the no-store
            // directive if it understands the status code."
            case(
                "must-understand, a status Echo understands, no-store",
                "GET",
                &[],
                200,
                &[("cache-control", "max-age=60, must-understand, no-store")],
                store(60),
            ),
            case(
                "must-understand, a status Echo does not know",
                "GET",
                &[],
                299,
                &[("cache-control", "max-age=60, must-understand, no-store")],
                no(R::Status),
            ),
            case(
                "must-understand, unknown status, without no-store",
                "GET",
                &[],
                599,
                &[("cache-control", "max-age=60, must-understand")],
                no(R::Status),
            ),
            // no-store
            case(
                "request no-store",
                "GET",
                &[("cache-control", "no-store")],
                200,
                &[ma],
                no(R::RequestNoStore),
            ),
            case(
                "request no-cache is fine",
                "GET",
                &[("cache-control", "no-cache")],
                200,
                &[ma],
                store(60),
            ),
            case(
                "response no-store",
                "GET",
                &[],
                200,
                &[("cache-control", "max-age=60, No-Store")],
                no(R::NoStore),
            ),
            case(
                "no-store on second line",
                "GET",
                &[],
                200,
                &[ma, ("cache-control", "no-store")],
                no(R::NoStore),
            ),
            // private
            case(
                "private",
                "GET",
                &[],
                200,
                &[("cache-control", "private, max-age=60")],
                no(R::Private),
            ),
            case(
                "qualified private is stored without the field",
                "GET",
                &[],
                200,
                &[("cache-control", r#"private="x-user", max-age=60"#)],
                store(60),
            ),
            // Authorization (§3.5)
            case(
                "authorization, max-age only",
                "GET",
                &[("authorization", "Basic eDp5")],
                200,
                &[ma],
                no(R::Authorization),
            ),
            case(
                "authorization + public",
                "GET",
                &[("authorization", "Basic eDp5")],
                200,
                &[("cache-control", "public, max-age=60")],
                store(60),
            ),
            case(
                "authorization + s-maxage",
                "GET",
                &[("authorization", "Basic eDp5")],
                200,
                &[("cache-control", "s-maxage=30")],
                store(30),
            ),
            case(
                "authorization + must-revalidate",
                "GET",
                &[("authorization", "Basic eDp5")],
                200,
                &[("cache-control", "must-revalidate, max-age=60")],
                store(60),
            ),
            case(
                "authorization + public but no freshness",
                "GET",
                &[("authorization", "Basic eDp5")],
                302,
                &[("cache-control", "public")],
                no(R::NotFresh),
            ),
            // Cookie (Echo's choice: no cache deception)
            case(
                "cookie, heuristic only",
                "GET",
                &[("cookie", "session=1")],
                200,
                &[("last-modified", "Mon, 01 Jan 2024 00:00:00 GMT")],
                no(R::Cookie),
            ),
            case(
                "cookie + max-age",
                "GET",
                &[("cookie", "session=1")],
                200,
                &[ma],
                store(60),
            ),
            case(
                "cookie + expires",
                "GET",
                &[("cookie", "session=1")],
                200,
                &[
                    ("date", "Mon, 01 Jan 2024 00:00:00 GMT"),
                    ("expires", "Mon, 01 Jan 2024 00:01:00 GMT"),
                ],
                store(60),
            ),
            // Vary
            case(
                "vary star",
                "GET",
                &[],
                200,
                &[ma, ("vary", "*")],
                no(R::VaryStar),
            ),
            case(
                "vary star in list",
                "GET",
                &[],
                200,
                &[ma, ("vary", "accept-encoding"), ("vary", "x, *")],
                no(R::VaryStar),
            ),
            case(
                "vary fields ok",
                "GET",
                &[],
                200,
                &[ma, ("vary", "Accept-Encoding")],
                store(60),
            ),
            // Set-Cookie
            case(
                "set-cookie",
                "GET",
                &[],
                200,
                &[
                    ("cache-control", "public, max-age=60"),
                    ("set-cookie", "a=b"),
                ],
                no(R::SetCookie),
            ),
            // no-cache
            case(
                "no-cache without a validator",
                "GET",
                &[],
                200,
                &[("cache-control", "no-cache, max-age=60")],
                no(R::NoCache),
            ),
            case(
                "no-cache with an ETag is stored (RFC 9111 §5.2.2.4)",
                "GET",
                &[],
                200,
                &[("cache-control", "no-cache, max-age=60"), ("etag", "\"a\"")],
                store(60),
            ),
            case(
                "no-cache, no freshness, ETag: stored stale",
                "GET",
                &[],
                200,
                &[
                    ("cache-control", "no-cache"),
                    ("etag", "\"a\""),
                    ("date", d),
                ],
                store(0),
            ),
            case(
                "qualified no-cache",
                "GET",
                &[],
                200,
                &[("cache-control", r#"no-cache="set-cookie", max-age=60"#)],
                store(60),
            ),
            case(
                "set-cookie kept from other clients by no-cache=",
                "GET",
                &[],
                200,
                &[
                    ("cache-control", r#"no-cache="Set-Cookie", max-age=60"#),
                    ("set-cookie", "a=b"),
                ],
                store(60),
            ),
            case(
                "set-cookie kept from other clients by private=",
                "GET",
                &[],
                200,
                &[
                    ("cache-control", r#"private="set-cookie", max-age=60"#),
                    ("set-cookie", "a=b"),
                ],
                store(60),
            ),
            case(
                "set-cookie, another field qualified",
                "GET",
                &[],
                200,
                &[
                    ("cache-control", r#"private="x-a", max-age=60"#),
                    ("set-cookie", "a=b"),
                ],
                no(R::SetCookie),
            ),
            case(
                "a targeted field replaces Cache-Control (RFC 9213)",
                "GET",
                &[],
                200,
                &[
                    ("cache-control", "no-store"),
                    ("cdn-cache-control", "max-age=120"),
                ],
                store(120),
            ),
            case(
                "a targeted no-store beats Cache-Control's max-age",
                "GET",
                &[],
                200,
                &[
                    ("cache-control", "max-age=60"),
                    ("echo-cache-control", "no-store"),
                ],
                no(R::NoStore),
            ),
            case(
                "response pragma ignored",
                "GET",
                &[],
                200,
                &[ma, ("pragma", "no-cache")],
                store(60),
            ),
            // Explicit freshness precedence
            case(
                "s-maxage beats max-age and expires",
                "GET",
                &[],
                200,
                &[
                    ("cache-control", "max-age=60, s-maxage=10"),
                    ("date", d),
                    ("expires", &in_hour),
                ],
                store(10),
            ),
            case(
                "max-age beats expires",
                "GET",
                &[],
                200,
                &[ma, ("date", d), ("expires", &in_hour)],
                store(60),
            ),
            case(
                "max-age beats past expires",
                "GET",
                &[],
                200,
                &[ma, ("date", d), ("expires", &past)],
                store(60),
            ),
            case(
                "expires minus date",
                "GET",
                &[],
                200,
                &[("date", d), ("expires", &in_hour)],
                store(3600),
            ),
            case(
                "expires without date uses response time",
                "GET",
                &[],
                200,
                &[("expires", &in_hour)],
                store(3600),
            ),
            case(
                "expires with invalid date uses response time",
                "GET",
                &[],
                200,
                &[("date", "yesterday"), ("expires", &in_hour)],
                store(3600),
            ),
            case(
                "expires in the past",
                "GET",
                &[],
                200,
                &[("date", d), ("expires", &past), ("last-modified", &lm_5d)],
                no(R::NotFresh),
            ),
            case(
                "invalid expires 0 is expired, no heuristic",
                "GET",
                &[],
                200,
                &[("date", d), ("expires", "0"), ("last-modified", &lm_5d)],
                no(R::NotFresh),
            ),
            case(
                "two expires lines are stale",
                "GET",
                &[],
                200,
                &[("date", d), ("expires", &in_hour), ("expires", &in_hour)],
                no(R::NotFresh),
            ),
            case(
                "max-age=0",
                "GET",
                &[],
                200,
                &[("cache-control", "max-age=0")],
                no(R::NotFresh),
            ),
            case(
                "quoted, mixed-case max-age",
                "GET",
                &[],
                200,
                &[("cache-control", r#"Max-Age="60""#)],
                store(60),
            ),
            case(
                "duplicate max-age",
                "GET",
                &[],
                200,
                &[ma, ma, ("date", d), ("expires", &in_hour)],
                no(R::NotFresh),
            ),
            case(
                "invalid max-age beats expires",
                "GET",
                &[],
                200,
                &[
                    ("cache-control", "max-age=1.5"),
                    ("date", d),
                    ("expires", &in_hour),
                ],
                no(R::NotFresh),
            ),
            case(
                "overflowing max-age saturates",
                "GET",
                &[],
                200,
                &[("cache-control", "max-age=4294967296000")],
                store(2_147_483_648),
            ),
            // Heuristic freshness
            case(
                "heuristic 10%",
                "GET",
                &[],
                200,
                &[("date", d), ("last-modified", &lm_5d)],
                heur(DAY / 2),
            ),
            case(
                "heuristic without date uses response time",
                "GET",
                &[],
                200,
                &[("last-modified", &lm_5d)],
                heur(DAY / 2),
            ),
            case(
                "heuristic capped",
                "GET",
                &[],
                200,
                &[("date", d), ("last-modified", &lm_100d)],
                heur(DAY),
            ),
            case(
                "heuristic 404",
                "GET",
                &[],
                404,
                &[("date", d), ("last-modified", &lm_5d)],
                heur(DAY / 2),
            ),
            case(
                "last-modified after date",
                "GET",
                &[],
                200,
                &[("date", d), ("last-modified", &lm_future)],
                no(R::NotFresh),
            ),
            case(
                "last-modified equal to date",
                "GET",
                &[],
                200,
                &[("date", d), ("last-modified", d)],
                no(R::NotFresh),
            ),
            case(
                "invalid last-modified",
                "GET",
                &[],
                200,
                &[("date", d), ("last-modified", "last week")],
                no(R::NotFresh),
            ),
            case(
                "no freshness at all",
                "GET",
                &[],
                200,
                &[("date", d)],
                no(R::NotFresh),
            ),
            case(
                "302 without explicit freshness",
                "GET",
                &[],
                302,
                &[("date", d), ("last-modified", &lm_5d)],
                no(R::NotFresh),
            ),
            case(
                "302 public without explicit freshness",
                "GET",
                &[],
                302,
                &[("cache-control", "public"), ("last-modified", &lm_5d)],
                no(R::NotFresh),
            ),
            case("302 with max-age", "GET", &[], 302, &[ma], store(60)),
            case(
                "500 with expires",
                "GET",
                &[],
                500,
                &[("date", d), ("expires", &in_hour)],
                store(3600),
            ),
        ];
        let opts = PolicyOptions::default();
        for c in cases {
            let got = storability(
                c.method,
                &hdrs(&c.req),
                c.status,
                &hdrs(&c.resp),
                t0(),
                &opts,
            );
            assert_eq!(got, c.want, "case {}", c.name);
        }
    }

    #[test]
    fn every_reason_has_a_distinct_name() {
        use NoStoreReason as R;
        let all = [
            (R::Method, "method"),
            (R::Status, "status"),
            (R::NoStore, "no-store"),
            (R::RequestNoStore, "request-no-store"),
            (R::Private, "private"),
            (R::Authorization, "authorization"),
            (R::VaryStar, "vary-star"),
            (R::SetCookie, "set-cookie"),
            (R::Cookie, "cookie"),
            (R::NoCache, "no-cache"),
            (R::NotFresh, "not-fresh"),
            (R::Partial, "partial"),
        ];
        for (r, s) in all {
            assert_eq!(r.as_str(), s);
            assert_eq!(Storability::DoNotStore(r).as_str(), s);
        }
        assert_eq!(store(1).as_str(), "store");
    }
}
