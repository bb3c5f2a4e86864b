//! May a stored response answer this request, and how: RFC 9111 §4.2.4 (serving stale),
//! the request directives of §5.2.1 (`no-cache`, `max-age`, `min-fresh`, `max-stale`), and
//! RFC 5861's `stale-while-revalidate` and `stale-if-error` windows (`reuse`, `Reuse`,
//! `stale_window`).
//!
//! Invariants: a response with `must-revalidate`, `proxy-revalidate` or `s-maxage` is never
//! served stale, whatever the extensions or the client say; every stale window is capped by
//! `PolicyOptions::max_stale`; the client's directives count only when
//! `PolicyOptions::honor_request` is on.
//!
//! What it must not do: read a clock (the age is an argument); panic on any input.

use std::time::Duration;

use super::{is_fresh, CacheControl, HeaderList, PolicyOptions};

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
pub(crate) fn stale_window(stored: &HeaderList, opts: &PolicyOptions) -> Duration {
    let cc = CacheControl::for_cache(stored, opts);
    if never_stale(&cc) {
        return Duration::ZERO;
    }
    let secs = cc
        .stale_while_revalidate
        .unwrap_or(0)
        .max(cc.stale_if_error.unwrap_or(0));
    Duration::from_secs(secs)
        .min(opts.max_stale)
        .max(opts.stale_if_error)
}

/// Must this response never be served stale?
fn never_stale(cc: &CacheControl) -> bool {
    // RFC 9111 §5.2.2.2: "once the response has become stale, a cache MUST NOT reuse that
    // response to satisfy another request until it has been successfully validated by the
    // origin". §5.2.2.8: proxy-revalidate "has the same meaning as the must-revalidate
    // response directive except that it does not apply to private caches". §5.2.2.10:
    // s-maxage "also implies the semantics of the proxy-revalidate response directive".
    // §5.2.2.4: no-cache, a fortiori (it is not even reused fresh without validation).
    cc.must_revalidate || cc.proxy_revalidate || cc.s_maxage.is_some() || cc.no_cache
}

/// Decides how a stored response (its directives, as `CacheControl::for_cache` reads
/// them, its lifetime and current age) may answer a request with directives `req` (RFC
/// 9111 §4.2.4, §5.2.1; RFC 5861).
pub fn reuse(
    cc: &CacheControl,
    freshness: Duration,
    age: Duration,
    req: &CacheControl,
    opts: &PolicyOptions,
) -> Reuse {
    let never_stale = never_stale(cc);
    let staleness = age.saturating_sub(freshness);
    let cap = |secs: Option<u64>| secs.map(|s| Duration::from_secs(s).min(opts.max_stale));
    // RFC 5861 §4: "The stale-if-error Cache-Control extension indicates that when an
    // error is encountered, a cached stale response MAY be used to satisfy the request,
    // regardless of other freshness information." Within its window, and never against
    // must-revalidate and its kin. RFC 9111 §4.2.4: "A cache MUST NOT generate a stale
    // response if it is prohibited by an explicit in-protocol directive"; where nothing
    // prohibits it, `cache.stale_if_error_ms` gives every response such a window (as
    // nginx's proxy_cache_use_stale and Varnish's grace do).
    let configured = (!opts.stale_if_error.is_zero()).then_some(opts.stale_if_error);
    let window = cap(cc.stale_if_error).max(configured);
    let if_error = !never_stale && window.is_some_and(|w| staleness <= w);
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
    // RFC 9111 §5.2.2.4: "The no-cache response directive, in its unqualified form (without
    // an argument), indicates that the response MUST NOT be used to satisfy any other
    // request without forwarding it for validation and receiving a successful response".
    if cc.no_cache {
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

#[cfg(test)]
mod tests {
    use super::*;

    /// [`reuse`] for a stored response given by its fields.
    fn reuse_stored(
        stored: &HeaderList,
        freshness: Duration,
        age: Duration,
        req: &CacheControl,
        opts: &PolicyOptions,
    ) -> Reuse {
        reuse(
            &CacheControl::for_cache(stored, opts),
            freshness,
            age,
            req,
            opts,
        )
    }

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
            let got = reuse_stored(
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
        let got = reuse_stored(
            &stored,
            Duration::from_secs(60),
            Duration::from_secs(10),
            &req("no-cache"),
            &opts,
        );
        assert_eq!(got, Reuse::Fresh, "the client's no-cache is ignored");
        let got = reuse_stored(
            &stored,
            Duration::from_secs(60),
            Duration::from_secs(65),
            &req(""),
            &opts,
        );
        assert_eq!(got, Reuse::StaleWhileRevalidate);
        let got = reuse_stored(
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
}
