//! Answering from the store: which stored variant a request selects (Vary, as the
//! request would be sent), whether RFC 9111 lets it answer (fresh, or stale within a
//! window the origin or the client allows), and the answer itself (a 304 when the
//! client's validators match, the whole stored response otherwise).
//!
//! Invariants: nothing here blocks on the origin (a refresh is queued, never run);
//! every answer carries `Age` and its [`Outcome`]; a variant is selected only by the
//! field values the request would be sent with, since those are what it was stored for.

use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use log::debug;

use super::compress;
use super::fill::Fallback;
use super::forward::{PRECONDITIONS, SET_BY_ECHO};
use super::outcome::{Fwd, OriginTrouble, Outcome, StaleReason};
use super::{Cache, Since, StaleCopy};
use crate::http::exchange::Exchange;
use crate::http::range::{self, RangeAnswer};
use crate::http::{headers, Headers, Request};
use crate::key::CacheKey;
use crate::policy::{self, CacheControl, PolicyOptions, Reuse};
use crate::store::{Entry, Lookup};

impl Cache {
    /// Answers from the stored `variants` when RFC 9111 allows (fresh; stale within
    /// stale-while-revalidate, refreshing in the background; stale as the client's
    /// max-stale accepts). None: answered. Otherwise why the origin must be asked, with
    /// the stale copy the request selected (to revalidate, and what may answer if that
    /// fails). Never blocks.
    pub(super) fn answer_from_store(
        &self,
        ex: &mut Exchange<'_>,
        key: &CacheKey,
        variants: &[Arc<Entry>],
        since: Since,
        tier: Option<&'static str>,
    ) -> Option<(Fwd, Option<StaleCopy>)> {
        let Some(entry) = self.select(variants, &ex.req) else {
            let fwd = if variants.is_empty() {
                Fwd::UriMiss
            } else {
                Fwd::VaryMiss
            };
            return Some((fwd, None));
        };
        let req_cc = CacheControl::parse_request(&ex.req.headers);
        let cc = CacheControl::for_cache(&entry.headers, &self.policy);
        let withheld = &cc.no_cache_fields;
        let age = policy::current_age(entry.initial_age, entry.response_time, SystemTime::now());
        let ttl = ttl(entry, age);
        match policy::reuse(&cc, entry.freshness, age, &req_cc, &self.policy) {
            Reuse::Fresh => {
                debug!("HIT {key}");
                // Refresh-ahead: a hot entry close to expiry is revalidated in the
                // background, so the next requests never find it stale.
                let left = entry.freshness.saturating_sub(age);
                if !self.refresh_ahead.is_zero() && left <= self.refresh_ahead {
                    self.refresh_later(key, &ex.req, entry, since);
                }
                let outcome = Outcome::Hit {
                    ttl,
                    collapsed: None,
                    tier,
                };
                serve_stored(ex, entry, age, outcome, withheld);
                None
            }
            Reuse::StaleWhileRevalidate => {
                debug!("STALE {key} (stale-while-revalidate)");
                self.refresh_later(key, &ex.req, entry, since);
                let why = StaleReason::WhileRevalidate;
                serve_stored(ex, entry, age, Outcome::Stale { ttl, why }, withheld);
                None
            }
            Reuse::StaleAccepted => {
                debug!("STALE {key} (the client's max-stale)");
                let why = StaleReason::MaxStale;
                serve_stored(ex, entry, age, Outcome::Stale { ttl, why }, withheld);
                None
            }
            Reuse::Revalidate {
                if_error,
                never_stale,
            } => Some((
                Fwd::Stale,
                Some((
                    Arc::clone(entry),
                    Fallback {
                        if_error,
                        never_stale,
                    },
                )),
            )),
        }
    }

    /// The stored variant this request selects. Vary is matched against the request as
    /// a fill would send it (a field the client named in `Connection`, or one Echo
    /// strips, is absent there), since that is what each variant was stored for.
    pub(super) fn select<'v>(
        &self,
        variants: &'v [Arc<Entry>],
        req: &Request,
    ) -> Option<&'v Arc<Entry>> {
        let mut sent: Option<Headers> = None;
        variants.iter().find(|e| {
            if e.vary
                .iter()
                .all(|(field, _)| self.fill_sends_as_is(field, req))
            {
                // The usual case (Vary: Accept-Encoding): no need to build the request.
                return policy::vary_matches(&e.vary, &req.headers);
            }
            policy::vary_matches(&e.vary, sent.get_or_insert_with(|| self.fill_headers(req)))
        })
    }

    /// Does a fill send the client's lines of `field` unchanged? False for every name
    /// `fill_headers` drops or replaces (hop-by-hop and `Connection`-named, with `_`,
    /// set by Echo, preconditions, stripped): for those, the request is built whole.
    fn fill_sends_as_is(&self, field: &str, req: &Request) -> bool {
        let special = |list: &[&str]| list.iter().any(|f| headers::same_field(field, f));
        !field.contains('_')
            && !special(headers::HOP_BY_HOP)
            && !special(SET_BY_ECHO)
            && !special(PRECONDITIONS)
            && !self.strip.iter().any(|s| headers::same_field(field, s))
            && !headers::list_members(&req.headers, "connection")
                .any(|t| headers::same_field(&String::from_utf8_lossy(t), field))
    }

    /// Answers a request that waited for another's fetch from what that fetch stored, if
    /// it stored a fresh response this request selects.
    pub(super) fn serve_collapsed(
        &self,
        ex: &mut Exchange<'_>,
        key: &CacheKey,
        waited: Duration,
    ) -> bool {
        // From where the fill was written: a lagging replica would turn this into a miss.
        let Ok(lookup) = self.store.get_latest(key) else {
            return false;
        };
        self.serve_lookup(ex, key, &lookup, waited)
    }

    /// Answers from `lookup` (read where writes land) if it holds a fresh response this
    /// request selects.
    pub(super) fn serve_lookup(
        &self,
        ex: &mut Exchange<'_>,
        key: &CacheKey,
        lookup: &Lookup,
        waited: Duration,
    ) -> bool {
        let Some(entry) = self.select(&lookup.variants, &ex.req) else {
            return false;
        };
        let age = policy::current_age(entry.initial_age, entry.response_time, SystemTime::now());
        // Only as the request's own directives allow (a client's no-cache wants its own
        // validation, not a copy another request fetched).
        let req_cc = CacheControl::parse_request(&ex.req.headers);
        let cc = CacheControl::for_cache(&entry.headers, &self.policy);
        if policy::reuse(&cc, entry.freshness, age, &req_cc, &self.policy) != Reuse::Fresh {
            return false;
        }
        self.metrics.coalesced.inc();
        debug!("HIT {key} (collapsed, waited {waited:?})");
        let outcome = Outcome::Hit {
            ttl: ttl(entry, age),
            collapsed: Some(u64::try_from(waited.as_millis()).unwrap_or(u64::MAX)),
            tier: None,
        };
        serve_stored(ex, entry, age, outcome, &cc.no_cache_fields);
        true
    }
}

/// Seconds of freshness left (negative once stale).
fn ttl(entry: &Entry, age: Duration) -> i64 {
    entry.freshness.as_secs() as i64 - age.as_secs() as i64
}

/// The stale copy answers because the origin failed and stale-if-error allows it.
pub(super) fn serve_stale_on_error(
    ex: &mut Exchange<'_>,
    stored: &Entry,
    why: OriginTrouble,
    opts: &PolicyOptions,
) {
    let age = policy::current_age(stored.initial_age, stored.response_time, SystemTime::now());
    debug!("STALE {} (stale-if-error: {why:?})", ex.req.target);
    let outcome = Outcome::Stale {
        ttl: ttl(stored, age),
        why: StaleReason::IfError(why),
    };
    let withheld = CacheControl::for_cache(&stored.headers, opts).no_cache_fields;
    serve_stored(ex, stored, age, outcome, &withheld);
}

/// Answers from a stored entry: 304 when the client's validators match (RFC 9111
/// §4.3.2), the whole response otherwise. `withheld`: the fields a qualified `no-cache`
/// names, left out because this answer was not revalidated (RFC 9111 §5.2.2.4: they
/// "MUST NOT be sent in the response to a subsequent request without successful
/// revalidation with the origin server"); empty after a revalidation.
pub(super) fn serve_stored(
    ex: &mut Exchange<'_>,
    entry: &Entry,
    age: Duration,
    outcome: Outcome,
    withheld: &[String],
) {
    ex.set_label(outcome.label());
    // A body held encoded (`cache.compress`): as this client takes it.
    let as_sent;
    let entry = match compress::for_client(entry, &ex.req) {
        Some(view) => {
            as_sent = view;
            &as_sent
        }
        None => entry,
    };
    if entry.status == 200 && not_modified(&ex.req, &entry.headers) {
        // RFC 9110 §15.4.5: a 304 carries the fields a 200 would have that describe
        // the representation's caching and validation, and no content.
        let mut headers: Headers = entry
            .headers
            .iter()
            .filter(|(n, _)| {
                matches!(
                    n.as_str(),
                    "cache-control"
                        | "content-location"
                        | "date"
                        | "etag"
                        | "expires"
                        | "vary"
                        | "last-modified"
                        | "via"
                ) && !withheld.contains(n)
            })
            .cloned()
            .collect();
        headers.push(age_field(age));
        outcome.add_to(&mut headers);
        let _ = ex.respond(304, &headers, b"");
        return;
    }
    let mut added = Vec::with_capacity(3);
    added.push(age_field(age));
    outcome.add_to(&mut added);
    // The usual case withholds nothing and sends the stored fields as they are.
    let kept: Headers;
    let stored = if withheld.is_empty() {
        &entry.headers
    } else {
        kept = entry
            .headers
            .iter()
            .filter(|(n, _)| !withheld.contains(n))
            .cloned()
            .collect();
        &kept
    };
    respond_entry(ex, entry, [stored, &added]);
}

/// `Age` (RFC 9111 §5.1), in whole seconds.
fn age_field(age: Duration) -> (String, Vec<u8>) {
    let secs = itoa::Buffer::new()
        .format(age.as_secs())
        .as_bytes()
        .to_vec();
    ("age".into(), secs)
}

/// Sends a stored response: its status, `fields` and body, or the part of the body the
/// request's `Range` asks for (RFC 9110 §14: a GET for a stored 200; `206` with
/// `Content-Range`, or `416` when no range is satisfiable).
pub(super) fn respond_entry(ex: &mut Exchange<'_>, entry: &Entry, fields: [&Headers; 2]) {
    let len = entry
        .file
        .as_ref()
        .map_or(entry.body.len() as u64, |f| f.len());
    let ranged = entry.status == 200 && !ex.req.is_head() && range::asks_for_bytes(&ex.req.headers);
    let answer = if ranged {
        range::answer(&ex.req.headers, len, &entry.headers)
    } else {
        RangeAnswer::Whole
    };
    // A part's Content-Range is Echo's: one the origin put on its 200 (meaningless
    // there) must not go out beside it.
    let own_range: Headers;
    let fields = if answer == RangeAnswer::Whole {
        fields
    } else {
        own_range = without(fields[0], "content-range");
        [&own_range, fields[1]]
    };
    let (status, part) = match answer {
        RangeAnswer::Whole => (entry.status, 0..len),
        RangeAnswer::Part(part) => (206, part),
        RangeAnswer::Parts { parts, boundary } => {
            respond_parts(ex, entry, fields, &parts, len, &boundary);
            return;
        }
        RangeAnswer::Unsatisfiable => {
            // RFC 9110 §15.5.17: "a server generating a 416 (Range Not Satisfiable)
            // response to a byte-range request SHOULD send a Content-Range header field
            // with an unsatisfied-range value".
            let mut headers = vec![(
                "content-range".to_string(),
                range::content_range(None, len).into_bytes(),
            )];
            headers.extend(fields[1].iter().cloned());
            let _ = ex.respond(416, &headers, b"");
            return;
        }
    };
    let content_range: Headers = if status == 206 {
        vec![(
            "content-range".into(),
            range::content_range(Some(&part), len).into_bytes(),
        )]
    } else {
        Vec::new()
    };
    let fields: [&[(String, Vec<u8>)]; 3] = [fields[0], &content_range, fields[1]];
    match &entry.file {
        // A large body from the memory store: sent from its memfd (no copy), from the
        // part's offset.
        Some(file) => {
            let _ = ex.respond_file(status, &fields, file, part);
        }
        None => {
            let body = usize::try_from(part.start)
                .ok()
                .zip(usize::try_from(part.end).ok())
                .and_then(|(a, b)| entry.body.get(a..b))
                .unwrap_or_default();
            let _ = ex.respond_fields(status, &fields, body);
        }
    }
}

/// `fields` less those named `name` (lower case).
fn without(fields: &Headers, name: &str) -> Headers {
    fields.iter().filter(|(n, _)| n != name).cloned().collect()
}

/// A `206` with several parts of the stored body as `multipart/byteranges` (RFC 9110
/// §14.6) of its `len` bytes, built in memory (its size is below the body's:
/// `range::answer` sees to that). A memfd body's parts are read from it; if that fails, the whole answers.
fn respond_parts(
    ex: &mut Exchange<'_>,
    entry: &Entry,
    fields: [&Headers; 2],
    parts: &[Range<u64>],
    len: u64,
    boundary: &str,
) {
    let content_type = headers::header(fields[0], "content-type");
    let body = range::multipart_body(parts, len, content_type, boundary, |part, out| match &entry
        .file
    {
        Some(file) => file.read_range(part.clone(), out).is_ok(),
        None => usize::try_from(part.start)
            .ok()
            .zip(usize::try_from(part.end).ok())
            .and_then(|(a, b)| entry.body.get(a..b))
            .map(|bytes| out.extend_from_slice(bytes))
            .is_some(),
    });
    let Some(body) = body else {
        log::warn!("a stored body could not be read for a multipart range answer");
        let status = entry.status;
        let _ = match &entry.file {
            Some(file) => ex.respond_file(status, &[fields[0], fields[1]], file, 0..len),
            None => ex.respond_fields(status, &[fields[0], fields[1]], &entry.body),
        };
        return;
    };
    // The representation's Content-Type moves into each part; the answer's is the
    // multipart's.
    let stored = without(fields[0], "content-type");
    let multipart: Headers = vec![(
        "content-type".into(),
        format!("multipart/byteranges; boundary={boundary}").into_bytes(),
    )];
    let _ = ex.respond_fields(206, &[&stored, &multipart, fields[1]], &body);
}

/// RFC 9110 §13.1.2 / §13.1.3 / §13.2.2: If-None-Match (weak comparison) takes
/// precedence; If-Modified-Since is evaluated only without it.
fn not_modified(req: &Request, stored: &Headers) -> bool {
    if headers::has_header(&req.headers, "if-none-match") {
        // RFC 9110 §13.1.2: "If the field value is "*", the condition is false if the
        // origin server has a current representation for the target resource" (a
        // stored one stands for it), with or without an ETag.
        if headers::list_members(&req.headers, "if-none-match").any(|t| t == b"*") {
            return true;
        }
        let Some(etag) = headers::header(stored, "etag") else {
            return false;
        };
        // Weak comparison: the opaque tags, W/ aside.
        let opaque = |t: &[u8]| t.strip_prefix(b"W/").unwrap_or(t).to_vec();
        return headers::list_members(&req.headers, "if-none-match")
            .any(|t| opaque(t) == opaque(etag.trim_ascii()));
    }
    let (Some(ims), Some(lm)) = (
        req.header("if-modified-since")
            .and_then(headers::parse_date),
        headers::header(stored, "last-modified").and_then(headers::parse_date),
    ) else {
        return false;
    };
    lm <= ims
}
