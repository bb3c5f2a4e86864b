//! What crosses to the origin and back: the request as forwarded (and as a fill sends
//! it), the origin's fields as Echo passes them on and stores them, passing through what
//! the cache does not serve (other methods, ranges, an unreadable store), invalidation
//! by unsafe methods, and Echo's own error answers.
//!
//! Invariants: no client field that Echo sets, or that poisons a shared answer, reaches
//! the origin in any spelling (names compared folded, `_` as `-`); hop-by-hop fields
//! never cross either way; an origin's claim to be Echo (`X-Cache-Status`, a
//! `Cache-Status` member named `echo`) is dropped; only final answers pass (a 101 nobody
//! asked for is a 502).

use std::io::Read;
use std::sync::Arc;
use std::time::SystemTime;

use log::debug;

use super::outcome::{Fwd, Outcome, OwnAnswer, CACHE_NAME};
use super::Cache;
use crate::http::body::client_error;
use crate::http::exchange::Exchange;
use crate::http::{self, headers, BodyFraming, Headers, Request};
use crate::key::CacheKey;
use crate::policy;
use crate::upstream::{OriginError, OriginRequest, OriginResponse};

/// `Via` as Echo adds it, both ways.
pub(super) use crate::http::VIA;

impl Cache {
    /// The request as it goes to the origin to fill the cache: as forwarded, less the
    /// client's preconditions (the stored response must be complete and the same for
    /// everyone) and the fields on `cache.strip_request_headers` (cache poisoning), names
    /// compared folded.
    pub(super) fn fill_headers(&self, req: &Request) -> Headers {
        let mut headers = forward_headers(req, self.underscores);
        headers.retain(|(n, _)| {
            !PRECONDITIONS.iter().any(|p| headers::same_field(n, p))
                && !self.strip.iter().any(|s| headers::same_field(n, s))
        });
        headers
    }

    /// Passes a request through without the cache (other methods, ranges), streaming
    /// the body both ways; unsafe methods invalidate what they may have changed.
    pub(super) fn forward(&self, ex: &mut Exchange<'_>, fwd: Fwd) {
        let headers = forward_headers(&ex.req, self.underscores);
        let method = ex.req.method.clone();
        let target = ex.req.target.clone();
        let host = ex.req.host.clone();
        let length = match ex.req.framing {
            BodyFraming::None => None,
            BodyFraming::Length(n) => Some(Some(n)),
            BodyFraming::Chunked => Some(None),
        };
        // 1xx the origin sends while this waits go to the client at once.
        let _interim = ex.forward_interim();
        let result = {
            let mut body = ex.body();
            self.origin.get().send(OriginRequest {
                method: &method,
                target: &target,
                host: &host,
                headers: &headers,
                body: length.map(|len| (&mut body as &mut dyn Read, len)),
            })
        };
        let response = match result.and_then(final_response) {
            Ok(r) => r,
            Err(e) => return self.origin_failed(ex, &e, fwd),
        };
        ex.set_origin(Arc::clone(&response.server));
        if policy::invalidates(&method, response.status) {
            self.invalidate_after_unsafe(&ex.req, &response.headers);
        }
        let base = response_headers(&response.headers, SystemTime::now());
        self.stream_body(ex, response, &base, fwd, None, None);
    }

    /// RFC 9111 §4.4: "A cache MUST invalidate the target URI ... when it receives a
    /// non-error status code in response to an unsafe request method", and "MAY
    /// invalidate the URIs in the Location and Content-Location response header fields"
    /// when they share the target's origin (Echo does).
    fn invalidate_after_unsafe(&self, req: &Request, response: &Headers) {
        let mut keys = vec![CacheKey::new("http", &req.host, &req.target)];
        for field in ["location", "content-location"] {
            if let Some(target) =
                headers::header(response, field).and_then(|v| same_origin_target(v, &req.host))
            {
                keys.push(CacheKey::new("http", &req.host, &target));
            }
        }
        for key in keys {
            match self.store.remove(&key) {
                Ok(n) if n > 0 => debug!("invalidated {key} after {}", req.method),
                Ok(_) => {}
                Err(e) => self.warn_limited(format_args!("store delete of {key} failed: {e}")),
            }
        }
    }

    pub(super) fn origin_failed(&self, ex: &mut Exchange<'_>, e: &OriginError, fwd: Fwd) {
        if let OriginError::ClientBody(io) = e {
            match client_error(io) {
                Some(refusal) => ex.respond_error(refusal.status, refusal.reason, true),
                None => ex.abort(),
            }
            return;
        }
        self.warn_limited(format_args!(
            "origin {} for {} {}: {e}",
            e.kind(),
            ex.req.method,
            ex.req.target
        ));
        let reason = match e {
            OriginError::Timeout(_) => "the origin did not answer in time",
            _ => "the origin could not be reached",
        };
        let outcome = Outcome::Own {
            fwd,
            why: OwnAnswer::OriginFailed(e.kind()),
        };
        own_error(ex, e.status(), outcome, reason);
    }
}

/// An answer in Echo's own words (never stored, with what the cache did).
pub(super) fn own_error(ex: &mut Exchange<'_>, status: u16, outcome: Outcome, message: &str) {
    ex.set_label(outcome.label());
    let mut headers = vec![
        (
            "content-type".to_string(),
            b"text/plain; charset=utf-8".to_vec(),
        ),
        ("cache-control".to_string(), b"no-store".to_vec()),
    ];
    headers.extend(crate::http::own_fields());
    outcome.add_to(&mut headers);
    let _ = ex.respond(status, &headers, format!("echo: {message}\n").as_bytes());
}

/// Fields Echo sets itself on every forwarded request (or leaves to the client library:
/// Host is the chosen server's, framing is re-done); the client's own are removed,
/// whatever their spelling, so they cannot steer what the origin builds.
pub(super) const SET_BY_ECHO: &[&str] = &[
    "host",
    "content-length",
    "expect",
    "x-forwarded-for",
    "x-forwarded-host",
    "x-forwarded-proto",
];

/// The client's preconditions, and Range: a fill is unconditional and whole (the stored
/// response must be the whole one, the same for everyone), so none of these go out on
/// it; the client's own are answered from what is stored (If-None-Match,
/// If-Modified-Since) or not at all. (A GET with a Range is passed through, not filled.)
pub(super) const PRECONDITIONS: &[&str] = &[
    "range",
    "if-match",
    "if-none-match",
    "if-modified-since",
    "if-unmodified-since",
    "if-range",
];

/// The request as it goes to the origin: hop-by-hop fields and those Echo sets removed
/// (names compared folded: `X_Forwarded_Host` is `X-Forwarded-Host`), fields whose name
/// holds `_` dropped unless `underscores` allows them (nginx's `underscores_in_headers`),
/// and `Via`, `X-Forwarded-For`, `X-Forwarded-Proto` and `X-Forwarded-Host` added.
pub fn forward_headers(req: &Request, underscores: bool) -> Headers {
    let mut headers = req.headers.clone();
    headers::strip_hop_by_hop(&mut headers);
    let prior_xff = headers::header_joined(&headers, "x-forwarded-for");
    headers.retain(|(n, _)| {
        (underscores || !n.contains('_')) && !SET_BY_ECHO.iter().any(|f| headers::same_field(n, f))
    });
    headers.push(("via".into(), VIA.to_vec()));
    let peer = req.peer.ip().to_string();
    let xff = match prior_xff {
        Some(prior) => format!("{prior}, {peer}"),
        None => peer,
    };
    headers.push(("x-forwarded-for".into(), xff.into_bytes()));
    headers.push(("x-forwarded-proto".into(), b"http".to_vec()));
    if !req.host.is_empty() {
        headers.push(("x-forwarded-host".into(), req.host.as_bytes().to_vec()));
    }
    headers
}

/// The origin's response fields as Echo passes them on (and stores them): hop-by-hop
/// removed, our `Via` added, and a `Date` when the origin sent none (RFC 9110 §6.6.1).
/// What the origin says in Echo's own name is dropped: its `X-Cache-Status`, and the
/// members of `Cache-Status` named `echo` (RFC 9211 §2: each cache adds its own member;
/// an origin's claim to be Echo would mislead whoever reads them).
pub(super) fn response_headers(origin: &Headers, response_time: SystemTime) -> Headers {
    let mut headers = origin.clone();
    headers::strip_hop_by_hop(&mut headers);
    headers.retain_mut(|(n, v)| match n.as_str() {
        "x-cache-status" => false,
        "cache-status" => {
            let kept: Vec<&[u8]> = headers::split_list(v)
                .into_iter()
                .filter(|m| cache_status_name(m) != CACHE_NAME.as_bytes())
                .collect();
            *v = kept.join(&b", "[..]);
            !v.is_empty()
        }
        _ => true,
    });
    if headers::header(&headers, "date").is_none() {
        headers.push((
            "date".into(),
            http::headers::format_date(response_time).into_bytes(),
        ));
    }
    headers.push(("via".into(), VIA.to_vec()));
    headers
}

/// The cache a `Cache-Status` member names: its item, a token or a string (RFC 9211 §2).
fn cache_status_name(member: &[u8]) -> &[u8] {
    let item = member
        .split(|&b| b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    item.strip_prefix(b"\"")
        .and_then(|s| s.strip_suffix(b"\""))
        .unwrap_or(item)
}

/// The origin's answer if it is a final one. Echo never asks for a protocol switch
/// (Upgrade is hop-by-hop and not forwarded), so a `101 Switching Protocols` — the only
/// interim answer the client library hands back — is a broken origin: 502, and the
/// client's connection goes on speaking HTTP. So is a status past 599 (RFC 9110 §15:
/// "Values outside the range 100..599 are invalid"; nginx answers 502 too): passed on,
/// it would reach clients and caches that cannot know what it means.
pub(super) fn final_response(response: OriginResponse) -> Result<OriginResponse, OriginError> {
    if response.status < 200 {
        return Err(OriginError::Protocol(format!(
            "a {} answer to a request that asked for no protocol switch",
            response.status
        )));
    }
    if response.status > 599 {
        return Err(OriginError::Protocol(format!(
            "status {} is not an HTTP status",
            response.status
        )));
    }
    Ok(response)
}

/// The target of a Location / Content-Location value if it is on the request's own
/// origin (a path, or an absolute http URL with the same host).
fn same_origin_target(value: &[u8], host: &str) -> Option<String> {
    let value = std::str::from_utf8(value).ok()?.trim();
    if value.starts_with('/') && !value.starts_with("//") {
        return Some(value.to_string());
    }
    let rest = value.strip_prefix("http://")?;
    let (authority, path) = match rest.find(['/', '?']) {
        Some(i) => (&rest[..i], &rest[i..]),
        None => (rest, "/"),
    };
    let authority = authority.to_ascii_lowercase();
    let authority = authority.strip_suffix(":80").unwrap_or(&authority);
    (authority == host).then(|| {
        if path.starts_with('?') {
            format!("/{path}")
        } else {
            path.to_string()
        }
    })
}
