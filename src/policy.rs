//! Cache policy: the RFC 9111 decisions of a *shared* cache, as pure functions.
//!
//! What this module owns:
//! - parsing `Cache-Control` (RFC 9111 §5.2, RFC 5861) and the request `Pragma` fallback;
//! - storability: may this response be stored, and if not, why (RFC 9111 §3, §3.5);
//! - freshness lifetime, explicit and heuristic (RFC 9111 §4.2.1, §4.2.2);
//! - age calculation (RFC 9111 §4.2.3, §5.1);
//! - `Vary` and matching a request to a stored variant (RFC 9111 §4.1);
//! - validation: the preconditions that revalidate a stored response, whether a 304 applies
//!   to it, and its fields updated from the 304 (RFC 9111 §4.3, §3.2);
//! - which responses to unsafe methods invalidate stored responses (RFC 9111 §4.4).
//!
//! Invariants:
//! - Every function is pure: the same arguments give the same answer.
//! - Header lists are `&[(String, Vec<u8>)]` with lower-case field names and raw values;
//!   repeated fields are separate entries in order, and list fields are combined with ", ".
//! - Every delta-seconds value is at most 2^31 (RFC 9111 §1.2.2).
//! - Each rule sits next to the RFC sentence it implements; where Echo is stricter than the
//!   RFC (Set-Cookie, no-cache, qualified private, 304) or looser (a 304 without validators
//!   freshens the response it validated) the comment says so.
//!
//! What it must not do:
//! - no I/O, no logging, no global state;
//! - no clock reads: every time is an argument (`SystemTime`), so tests are deterministic;
//! - no panics on any input: no `unwrap`, `expect`, panicking indexing or unchecked
//!   arithmetic on values that come from the network.

use std::time::{Duration, SystemTime};

pub use crate::http::headers::HeaderList;
use crate::http::headers::{
    has_header, header, header_joined_bytes, parse_date, parse_delta_seconds, trim_ows,
    DELTA_SECONDS_MAX,
};
// Kept at their old paths while other modules move to `http::headers` (issue 14); removed in
// the final cleanup.
pub use crate::http::headers::{header_joined, header_one, split_list};

/// The response's Date, or the time it was received if Date is absent or invalid.
// RFC 9111 §4.2.1: "using the time the message was received if it is not present, as per
// Section 6.6.1 of [HTTP]". An unparseable Date is treated as absent; of several Date lines the
// first is used.
fn date_value(resp: &HeaderList, response_time: SystemTime) -> SystemTime {
    header(resp, "date")
        .and_then(parse_date)
        .unwrap_or(response_time)
}

// ---------------------------------------------------------------------------------------------
// Cache-Control
// ---------------------------------------------------------------------------------------------

/// The parsed Cache-Control directives of one message (request or response).
#[derive(Debug, Clone, Default, PartialEq)]
pub struct CacheControl {
    /// `no-store` (§5.2.1.5 request, §5.2.2.5 response).
    pub no_store: bool,
    /// `no-cache`, unqualified or qualified with field names (§5.2.1.4, §5.2.2.4).
    pub no_cache: bool,
    /// Lower-case field names from `no-cache="a, b"` (response only).
    pub no_cache_fields: Vec<String>,
    /// `private`, unqualified or qualified (§5.2.2.7); Echo treats both as "do not store".
    pub private: bool,
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

/// The argument of one directive.
enum Arg {
    /// `name` with no `=`.
    Absent,
    /// `name=token` or `name="quoted"` (unquoted, escapes resolved).
    Value(Vec<u8>),
    /// `name="unterminated`.
    Malformed,
}

impl Arg {
    fn delta_seconds(&self) -> Option<u64> {
        match self {
            Arg::Value(v) => parse_delta_seconds(v),
            Arg::Absent | Arg::Malformed => None,
        }
    }
}

/// Splits one list member `name[=arg]` into a lower-case name and its argument.
fn parse_directive(member: &[u8]) -> (String, Arg) {
    let (name, arg) = match member.iter().position(|&b| b == b'=') {
        Some(eq) => (
            member.get(..eq).unwrap_or_default(),
            Some(member.get(eq + 1..).unwrap_or_default()),
        ),
        None => (member, None),
    };
    let name = String::from_utf8_lossy(trim_ows(name)).to_ascii_lowercase();
    let arg = match arg.map(trim_ows) {
        None => Arg::Absent,
        Some([b'"', rest @ ..]) => unquote(rest),
        Some(v) => Arg::Value(v.to_vec()),
    };
    (name, arg)
}

/// Reads a quoted-string body (after the opening quote) up to its closing quote.
// RFC 9110 §5.6.4: "The backslash octet ("\") can be used as a single-octet quoting mechanism
// within quoted-string and comment constructs."
fn unquote(rest: &[u8]) -> Arg {
    let mut out = Vec::with_capacity(rest.len());
    let mut escaped = false;
    for &b in rest {
        if escaped {
            out.push(b);
            escaped = false;
        } else if b == b'\\' {
            escaped = true;
        } else if b == b'"' {
            return Arg::Value(out);
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
        for member in split_list(&joined) {
            let (name, arg) = parse_directive(member);
            match name.as_str() {
                "no-store" => cc.no_store = true,
                "no-cache" => {
                    cc.no_cache = true;
                    // RFC 9111 §5.2.2.4: "If the no-cache response directive specifies one or
                    // more field names, then a cache MAY use the response to satisfy a
                    // subsequent request, subject to any other restrictions on caching."
                    // Echo records the names but treats qualified no-cache like the
                    // unqualified form (the safe reading); see `storability`.
                    if let Arg::Value(v) = &arg {
                        for field in split_list(v) {
                            let field = String::from_utf8_lossy(field).to_ascii_lowercase();
                            if !cc.no_cache_fields.contains(&field) {
                                cc.no_cache_fields.push(field);
                            }
                        }
                    }
                }
                // RFC 9111 §5.2.2.7: "The unqualified private response directive indicates
                // that a shared cache MUST NOT store the response". Echo also treats the
                // qualified form (`private="set-cookie"`) as "do not store": storing a copy
                // with the named fields removed is allowed but is not worth the risk.
                "private" => cc.private = true,
                "public" => cc.public = true,
                // RFC 9111 §4.2.1: "When there is more than one value present for a given
                // directive (e.g., two Expires header field lines or multiple Cache-Control:
                // max-age directives), either the first occurrence should be used or the
                // response should be considered stale." Echo considers it stale.
                // RFC 9111 §4.2.1: "Caches are encouraged to consider responses that have
                // invalid freshness information (e.g., a max-age directive with non-integer
                // content) to be stale."
                "max-age" => {
                    cc.max_age = strict_delta(seen_max_age, &arg);
                    seen_max_age = true;
                }
                "s-maxage" => {
                    cc.s_maxage = strict_delta(seen_s_maxage, &arg);
                    seen_s_maxage = true;
                }
                "must-revalidate" => cc.must_revalidate = true,
                "proxy-revalidate" => cc.proxy_revalidate = true,
                "no-transform" => cc.no_transform = true,
                "immutable" => cc.immutable = true,
                // RFC 5861 §3 / §4: stale-while-revalidate and stale-if-error take
                // delta-seconds. An invalid argument disables the extension (never serve
                // stale on a guess); of several values the smallest (most restrictive) wins,
                // after RFC 9111 §4.2.1: "the most restrictive directive should be honored".
                "stale-while-revalidate" => match arg.delta_seconds() {
                    Some(n) => cc.stale_while_revalidate = min_opt(cc.stale_while_revalidate, n),
                    None => swr_invalid = true,
                },
                "stale-if-error" => match arg.delta_seconds() {
                    Some(n) => cc.stale_if_error = min_opt(cc.stale_if_error, n),
                    None => sie_invalid = true,
                },
                // RFC 9111 §5.2.1.2: "If no value is assigned to max-stale, then the client
                // will accept a stale response of any age." An invalid argument is ignored;
                // of several, the most restrictive wins.
                "max-stale" => {
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
                "min-fresh" => {
                    if let Some(n) = arg.delta_seconds() {
                        cc.min_fresh = Some(cc.min_fresh.map_or(n, |m| m.max(n)));
                    }
                }
                "only-if-cached" => cc.only_if_cached = true,
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

// ---------------------------------------------------------------------------------------------
// Storability (RFC 9111 §3)
// ---------------------------------------------------------------------------------------------

/// Why a response is not stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NoStoreReason {
    /// The request method is not GET.
    Method,
    /// The status is not final, not understood, or 304.
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

/// Tunables of the policy.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct PolicyOptions {
    /// Cap on heuristic freshness (RFC 9111 §4.2.2). Default: 1 day.
    pub heuristic_max: Duration,
    /// Fraction of (Date − Last-Modified) used for the heuristic. Default: 0.1.
    pub heuristic_fraction: f64,
    /// Lifetime given to a heuristically cacheable response that has no freshness
    /// information at all (no explicit lifetime, no Last-Modified). Zero (the default): off.
    pub default_ttl: Duration,
    /// Cap on how long past its freshness a response is served stale (stale-while-
    /// revalidate, stale-if-error, a client's max-stale). Default: 1 hour.
    pub max_stale: Duration,
    /// Act on the client's request directives (max-age, max-stale, min-fresh, no-cache,
    /// only-if-cached); many operators turn this off so clients cannot bypass the cache.
    /// Default: on.
    pub honor_request: bool,
}

impl Default for PolicyOptions {
    fn default() -> Self {
        PolicyOptions {
            heuristic_max: Duration::from_secs(24 * 60 * 60),
            heuristic_fraction: 0.1,
            default_ttl: Duration::ZERO,
            max_stale: Duration::from_secs(60 * 60),
            honor_request: true,
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
    // RFC 9111 §3: "the response status code is final (see Section 15 of [HTTP])". Echo only
    // stores statuses it understands. A 304 is an answer to a conditional request, used to
    // freshen an entry (RFC 9111 §4.3.4), never stored as a response of its own.
    if status == 304 || !status_understood(status) {
        return Storability::DoNotStore(R::Status);
    }

    let req_cc = CacheControl::parse_request(req);
    let cc = CacheControl::parse(resp);

    // RFC 9111 §5.2.1.5: "The no-store request directive indicates that a cache MUST NOT store
    // any part of either this request or any response to it."
    if req_cc.no_store {
        return Storability::DoNotStore(R::RequestNoStore);
    }
    // RFC 9111 §3: "the no-store cache directive is not present in the response".
    // (must-understand, §5.2.2.3, is not implemented, so no-store is always honoured.)
    if cc.no_store {
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
    // Like the defaults of Varnish and nginx, Echo never stores such a response.
    if has_header(resp, "set-cookie") {
        return Storability::DoNotStore(R::SetCookie);
    }
    // RFC 9111 §5.2.2.4: "The no-cache response directive, in its unqualified form (without
    // an argument), indicates that the response MUST NOT be used to satisfy any other request
    // without forwarding it for validation and receiving a successful response".
    // Echo's choice in this version: it does not keep entries only for revalidation, so it
    // does not store such responses; the qualified form is treated the same way (safe).
    if cc.no_cache {
        return Storability::DoNotStore(R::NoCache);
    }

    // RFC 9111 §3: "the response contains at least one of the following: ... an Expires header
    // field ...; a max-age response directive ...; if the cache is shared: an s-maxage response
    // directive ...; ... or a status code that is defined as heuristically cacheable".
    // Echo also requires a positive lifetime (no entries stored only for revalidation).
    match freshness_lifetime(status, resp, &cc, response_time, opts) {
        Some((freshness, heuristic)) if !freshness.is_zero() => Storability::Store {
            freshness,
            heuristic,
        },
        _ => Storability::DoNotStore(R::NotFresh),
    }
}

// ---------------------------------------------------------------------------------------------
// Freshness (RFC 9111 §4.2.1, §4.2.2)
// ---------------------------------------------------------------------------------------------

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

/// How a stored response may be used for a request.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Reuse {
    /// Fresh: serve it.
    Fresh,
    /// Stale within stale-while-revalidate: serve it now, refresh it in the background.
    StaleWhileRevalidate,
    /// Stale, but the client accepts that (max-stale): serve it.
    StaleAccepted,
    /// Go to the origin first (conditionally, when the response has validators).
    /// `if_error`: the stored response may answer instead if the origin fails
    /// (stale-if-error). `never_stale`: it may never be served stale, and an origin that
    /// cannot be reached is a 504.
    Revalidate { if_error: bool, never_stale: bool },
}

/// How long past its freshness a stored response may be served stale at most (the
/// longer of its stale-while-revalidate and stale-if-error windows, capped); zero when
/// it may never be served stale. Stores keep entries at least this long past freshness.
pub fn stale_window(stored: &HeaderList, opts: &PolicyOptions) -> Duration {
    let cc = CacheControl::parse(stored);
    if never_stale(&cc) {
        return Duration::ZERO;
    }
    let secs = cc
        .stale_while_revalidate
        .unwrap_or(0)
        .max(cc.stale_if_error.unwrap_or(0));
    Duration::from_secs(secs).min(opts.max_stale)
}

/// Must this response never be served stale?
fn never_stale(cc: &CacheControl) -> bool {
    // RFC 9111 §5.2.2.2: "once the response has become stale, a cache MUST NOT reuse that
    // response to satisfy another request until it has been successfully validated by the
    // origin". §5.2.2.8: proxy-revalidate "has the same meaning as the must-revalidate
    // response directive except that it does not apply to private caches". §5.2.2.10:
    // s-maxage "also implies the semantics of the proxy-revalidate response directive".
    // (no-cache responses are not stored at all.)
    cc.must_revalidate || cc.proxy_revalidate || cc.s_maxage.is_some() || cc.no_cache
}

/// Decides how a stored response (its fields, lifetime and current age) may answer a
/// request with directives `req` (RFC 9111 §4.2.4, §5.2.1; RFC 5861).
pub fn reuse(
    stored: &HeaderList,
    freshness: Duration,
    age: Duration,
    req: &CacheControl,
    opts: &PolicyOptions,
) -> Reuse {
    let cc = CacheControl::parse(stored);
    let never_stale = never_stale(&cc);
    let staleness = age.saturating_sub(freshness);
    let cap = |secs: Option<u64>| secs.map(|s| Duration::from_secs(s).min(opts.max_stale));
    // RFC 5861 §4: "The stale-if-error Cache-Control extension indicates that when an
    // error is encountered, a cached stale response MAY be used to satisfy the request,
    // regardless of other freshness information." Within its window, and never against
    // must-revalidate and its kin.
    let if_error = !never_stale && cap(cc.stale_if_error).is_some_and(|w| staleness <= w);
    let revalidate = Reuse::Revalidate {
        if_error,
        never_stale,
    };
    let req = if opts.honor_request {
        req.clone()
    } else {
        CacheControl::default()
    };
    // RFC 9111 §5.2.1.4: "The no-cache request directive indicates that the client prefers
    // that a stored response not be used to satisfy the request without successful
    // validation on the origin server."
    if req.no_cache {
        return revalidate;
    }
    // RFC 9111 §5.2.1.1: "The max-age request directive indicates that the client prefers a
    // response whose age is less than or equal to the specified number of seconds."
    if req.max_age.is_some_and(|m| age > Duration::from_secs(m)) {
        return revalidate;
    }
    // RFC 9111 §5.2.1.3: "The min-fresh request directive indicates that the client
    // prefers a response whose freshness lifetime is no less than its current age plus the
    // specified time in seconds."
    if req
        .min_fresh
        .is_some_and(|m| freshness < age.saturating_add(Duration::from_secs(m)))
    {
        return revalidate;
    }
    if is_fresh(freshness, age) {
        return Reuse::Fresh;
    }
    if never_stale {
        return revalidate;
    }
    // RFC 9111 §5.2.1.2: "The max-stale request directive indicates that the client will
    // accept a response that has exceeded its freshness lifetime. If a value is present,
    // then the client is willing to accept a response that has exceeded its freshness
    // lifetime by no more than the specified number of seconds." (Capped by max_stale.)
    match req.max_stale {
        Some(None) if staleness <= opts.max_stale => return Reuse::StaleAccepted,
        Some(Some(n)) if staleness <= Duration::from_secs(n).min(opts.max_stale) => {
            return Reuse::StaleAccepted
        }
        _ => {}
    }
    // RFC 5861 §3: "When present in an HTTP response, the stale-while-revalidate Cache-
    // Control extension indicates that caches MAY serve the response in which it appears
    // after it becomes stale, up to the indicated number of seconds."
    if cap(cc.stale_while_revalidate).is_some_and(|w| staleness <= w) {
        return Reuse::StaleWhileRevalidate;
    }
    revalidate
}

/// Is this stored response fresh at `age`?
// RFC 9111 §4.2: "response_is_fresh = (freshness_lifetime > current_age)"
pub fn is_fresh(freshness: Duration, age: Duration) -> bool {
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
pub fn current_age(
    corrected_initial_age: Duration,
    response_time: SystemTime,
    now: SystemTime,
) -> Duration {
    let resident_time = now.duration_since(response_time).unwrap_or(Duration::ZERO);
    corrected_initial_age.saturating_add(resident_time)
}

// ---------------------------------------------------------------------------------------------
// Vary (RFC 9111 §4.1)
// ---------------------------------------------------------------------------------------------

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

// ---------------------------------------------------------------------------------------------
// Validation (RFC 9111 §4.3, §3.2; RFC 9110 §8.8)
// ---------------------------------------------------------------------------------------------

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
pub fn validation_preconditions(stored: &HeaderList) -> Vec<(String, Vec<u8>)> {
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
fn entity_tag(value: &[u8]) -> Option<(bool, &[u8])> {
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
        !crate::http::headers::HOP_BY_HOP
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

// ---------------------------------------------------------------------------------------------
// Invalidation (RFC 9111 §4.4)
// ---------------------------------------------------------------------------------------------

/// Is the method unsafe (anything but GET, HEAD, OPTIONS, TRACE; case-sensitive)?
// RFC 9110 §9.2.1: "Of the request methods defined by this specification, the GET, HEAD,
// OPTIONS, and TRACE methods are defined to be safe."
// RFC 9111 §4.4 counts "methods whose safety is unknown" as unsafe.
pub fn is_unsafe_method(method: &str) -> bool {
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

// ---------------------------------------------------------------------------------------------
// Tests
// ---------------------------------------------------------------------------------------------

#[cfg(test)]
mod tests {
    use super::*;

    /// A fixed "now": 2023-11-14T22:13:20Z.
    fn t0() -> SystemTime {
        SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000)
    }

    /// t0 shifted by `secs` (may be negative).
    fn at(secs: i64) -> SystemTime {
        if secs >= 0 {
            t0() + Duration::from_secs(secs.unsigned_abs())
        } else {
            t0() - Duration::from_secs(secs.unsigned_abs())
        }
    }

    /// An IMF-fixdate `secs` from t0.
    fn date(secs: i64) -> String {
        httpdate::fmt_http_date(at(secs))
    }

    fn hdrs<S: AsRef<str>>(pairs: &[(&str, S)]) -> Vec<(String, Vec<u8>)> {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_ref().as_bytes().to_vec()))
            .collect()
    }

    fn secs(n: u64) -> Duration {
        Duration::from_secs(n)
    }

    const DAY: u64 = 24 * 60 * 60;

    /// Header pairs as written in a table.
    type Pairs = Vec<(&'static str, &'static str)>;
    /// Header pairs whose values are computed (dates).
    type OwnedPairs = Vec<(&'static str, String)>;
    /// What `freshness_lifetime` returns.
    type Lifetime = Option<(Duration, bool)>;

    mod cache_control {
        use super::*;

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
                        no_cache: true,
                        no_cache_fields: vec!["set-cookie".into(), "x-foo".into()],
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
                        private: true,
                        max_age: Some(5),
                        ..d()
                    },
                ),
                (
                    "comma inside quotes does not split",
                    vec![r#"no-cache="a, max-age=5""#],
                    CacheControl {
                        no_cache: true,
                        no_cache_fields: vec!["a".into(), "max-age=5".into()],
                        ..d()
                    },
                ),
                (
                    "flags and whitespace",
                    vec![
                        " no-store ,must-revalidate,, proxy-revalidate",
                        "no-transform,immutable, only-if-cached",
                    ],
                    CacheControl {
                        no_store: true,
                        must_revalidate: true,
                        proxy_revalidate: true,
                        no_transform: true,
                        immutable: true,
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

    mod storability {
        use super::*;

        struct Case {
            name: &'static str,
            method: &'static str,
            req: Vec<(&'static str, String)>,
            status: u16,
            resp: Vec<(&'static str, String)>,
            want: Storability,
        }

        fn store(n: u64) -> Storability {
            Storability::Store {
                freshness: secs(n),
                heuristic: false,
            }
        }

        fn heur(n: u64) -> Storability {
            Storability::Store {
                freshness: secs(n),
                heuristic: true,
            }
        }

        fn no(r: NoStoreReason) -> Storability {
            Storability::DoNotStore(r)
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
                // Status
                case("206", "GET", &[], 206, &[ma], no(R::Partial)),
                case("100", "GET", &[], 100, &[ma], no(R::Status)),
                case("299", "GET", &[], 299, &[ma], no(R::Status)),
                case("304", "GET", &[], 304, &[ma], no(R::Status)),
                case("305", "GET", &[], 305, &[ma], no(R::Status)),
                case("306", "GET", &[], 306, &[ma], no(R::Status)),
                case("418", "GET", &[], 418, &[ma], no(R::Status)),
                case("599", "GET", &[], 599, &[ma], no(R::Status)),
                case("426 explicit", "GET", &[], 426, &[ma], store(60)),
                case("505 explicit", "GET", &[], 505, &[ma], store(60)),
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
                    "qualified private",
                    "GET",
                    &[],
                    200,
                    &[("cache-control", r#"private="set-cookie", max-age=60"#)],
                    no(R::Private),
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
                    "no-cache",
                    "GET",
                    &[],
                    200,
                    &[("cache-control", "no-cache, max-age=60")],
                    no(R::NoCache),
                ),
                case(
                    "qualified no-cache",
                    "GET",
                    &[],
                    200,
                    &[("cache-control", r#"no-cache="set-cookie", max-age=60"#)],
                    no(R::NoCache),
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
    }

    mod freshness {
        use super::*;

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

    mod vary {
        use super::*;

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

    mod revalidate {
        use super::*;

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

    mod reuse_rules {
        use super::super::*;

        fn h(cc: &str) -> Vec<(String, Vec<u8>)> {
            vec![("cache-control".to_string(), cc.as_bytes().to_vec())]
        }

        fn req(cc: &str) -> CacheControl {
            CacheControl::parse_request(&h(cc))
        }

        #[test]
        fn stored_and_requested_directives_decide_reuse() {
            let rv = |if_error, never_stale| Reuse::Revalidate {
                if_error,
                never_stale,
            };
            // (stored Cache-Control, freshness s, age s, request Cache-Control, expected)
            let cases: &[(&str, u64, u64, &str, Reuse)] = &[
                ("max-age=60", 60, 10, "", Reuse::Fresh),
                ("max-age=60", 60, 61, "", rv(false, false)),
                (
                    "max-age=60, stale-while-revalidate=30",
                    60,
                    80,
                    "",
                    Reuse::StaleWhileRevalidate,
                ),
                (
                    "max-age=60, stale-while-revalidate=30",
                    60,
                    95,
                    "",
                    rv(false, false),
                ),
                ("max-age=60, stale-if-error=30", 60, 80, "", rv(true, false)),
                (
                    "max-age=60, stale-if-error=30",
                    60,
                    95,
                    "",
                    rv(false, false),
                ),
                // must-revalidate and its kin: never stale, whatever the extensions say.
                (
                    "max-age=60, must-revalidate, stale-while-revalidate=30",
                    60,
                    70,
                    "",
                    rv(false, true),
                ),
                (
                    "max-age=60, proxy-revalidate, stale-if-error=30",
                    60,
                    70,
                    "",
                    rv(false, true),
                ),
                (
                    "s-maxage=60, stale-while-revalidate=30",
                    60,
                    70,
                    "",
                    rv(false, true),
                ),
                // Request directives.
                ("max-age=60", 60, 10, "no-cache", rv(false, false)),
                ("max-age=60", 60, 10, "max-age=5", rv(false, false)),
                ("max-age=60", 60, 10, "max-age=20", Reuse::Fresh),
                ("max-age=60", 60, 50, "min-fresh=20", rv(false, false)),
                ("max-age=60", 60, 70, "max-stale", Reuse::StaleAccepted),
                ("max-age=60", 60, 70, "max-stale=5", rv(false, false)),
                ("max-age=60", 60, 70, "max-stale=50", Reuse::StaleAccepted),
                (
                    "max-age=60, must-revalidate",
                    60,
                    70,
                    "max-stale",
                    rv(false, true),
                ),
            ];
            let opts = PolicyOptions::default();
            for (stored, fresh, age, request, want) in cases {
                let got = reuse(
                    &h(stored),
                    Duration::from_secs(*fresh),
                    Duration::from_secs(*age),
                    &req(request),
                    &opts,
                );
                assert_eq!(got, *want, "{stored} / age {age} / request {request:?}");
            }
        }

        #[test]
        fn request_directives_can_be_ignored_and_stale_windows_are_capped() {
            let opts = PolicyOptions {
                honor_request: false,
                max_stale: Duration::from_secs(10),
                ..PolicyOptions::default()
            };
            let stored = h("max-age=60, stale-while-revalidate=3600");
            let got = reuse(
                &stored,
                Duration::from_secs(60),
                Duration::from_secs(10),
                &req("no-cache"),
                &opts,
            );
            assert_eq!(got, Reuse::Fresh, "the client's no-cache is ignored");
            let got = reuse(
                &stored,
                Duration::from_secs(60),
                Duration::from_secs(65),
                &req(""),
                &opts,
            );
            assert_eq!(got, Reuse::StaleWhileRevalidate);
            let got = reuse(
                &stored,
                Duration::from_secs(60),
                Duration::from_secs(75),
                &req(""),
                &opts,
            );
            assert_eq!(
                got,
                Reuse::Revalidate {
                    if_error: false,
                    never_stale: false
                },
                "capped at 10 s"
            );
            assert_eq!(stale_window(&stored, &opts), Duration::from_secs(10));
            assert_eq!(
                stale_window(&h("max-age=60, must-revalidate, stale-if-error=99"), &opts),
                Duration::ZERO
            );
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
    }
}
