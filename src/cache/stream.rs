//! Answering with the origin's response while it arrives, and storing it when the
//! policy allowed it and it arrived whole.
//!
//! Invariants: a body is stored only when it ended as framed and fits
//! `cache.max_object_bytes`; it is stored before the client gets its last bytes (a
//! client holding a whole stored response finds it on its next request); the head of a
//! storable answer says `stored` only when it was; an origin body that breaks off cuts
//! the client's response, never completes it.

use std::io::Read;
use std::sync::Arc;

use super::fill::Fill;
use super::hit::respond_entry;
use super::outcome::{Fwd, Outcome};
use super::Cache;
use crate::http::exchange::Exchange;
use crate::http::range;
use crate::http::response::BodyLength;
use crate::http::{headers, Headers};
use crate::store::Entry;
use crate::upstream::OriginResponse;

/// Read size when streaming an origin body; also how much of a storable body is held
/// back before its head goes out.
const CHUNK: usize = 64 * 1024;

impl Cache {
    /// Streams an origin response to the client. With a `fill`, the body is also
    /// collected (up to `max_object_bytes`) and, when it arrived whole, stored before
    /// the client gets its last bytes: a client holding a complete stored response can
    /// count on the next request finding it (the client may go away meanwhile; the
    /// body is still read to the end and stored).
    ///
    /// The head of a storable answer waits until its body has ended or passed one read
    /// buffer (a HEAD's until it has ended: it answers once stored). Most bodies are
    /// then stored before the head goes out, so `Cache-Status` says `stored` only when
    /// it is true, and head and body leave in one write; a longer body streams, and its
    /// head promises nothing. A body that breaks off is never stored, and a response
    /// already started is cut, never completed.
    pub(super) fn stream_body(
        &self,
        ex: &mut Exchange<'_>,
        mut response: OriginResponse,
        base: &Headers,
        fwd: Fwd,
        not_stored: Option<&'static str>,
        mut fill: Option<Fill<'_>>,
    ) -> bool {
        let status = response.status;
        ex.set_label(
            Outcome::Fetched {
                fwd,
                status,
                stored: false,
                not_stored,
            }
            .label(),
        );
        let answer_fields = |stored: bool| {
            let mut headers = base.clone();
            let outcome = Outcome::Fetched {
                fwd,
                status,
                stored,
                not_stored,
            };
            outcome.add_to(&mut headers);
            headers
        };
        let length = match response.content_length {
            Some(n) => BodyLength::Known(n),
            None => BodyLength::Unknown,
        };
        // A HEAD answer has no body to measure: announce the length the origin gave.
        let head_length = response.content_length.or_else(|| {
            headers::header(&response.headers, "content-length")
                .and_then(|v| std::str::from_utf8(v).ok()?.parse().ok())
        });
        let head_request = ex.req.is_head();
        if head_request && fill.is_none() {
            let _ = ex.start(status, &answer_fields(false), length, head_length);
            let _ = ex.finish();
            return false;
        }
        let mut body: Vec<u8> = Vec::new();
        // One read buffer for the whole response.
        let mut current = vec![0u8; CHUNK];
        // A byte-range request for a storable response waits for the whole body, as a
        // HEAD does: it is stored, and the range is answered from it (RFC 9110 §14).
        let ranged = !head_request && range::asks_for_bytes(&ex.req.headers);
        if fill.is_some() {
            let hold = if head_request || ranged {
                self.max_object_bytes + 1
            } else {
                CHUNK
            };
            let mut ended = false;
            while body.len() < hold {
                match response.body.read(&mut current) {
                    Ok(0) => {
                        ended = true;
                        break;
                    }
                    Ok(n) => {
                        if let Some(f) = &fill {
                            f.lead.progress(self.body_allowance);
                        }
                        body.extend_from_slice(&current[..n]);
                    }
                    Err(e) => return self.origin_body_broke(ex, &e),
                }
            }
            if body.len() > self.max_object_bytes {
                if let Some(f) = fill.take() {
                    f.lead.not_shared(self, f.key);
                }
            }
            if ended {
                let Some(f) = fill.take() else {
                    let _ = ex.respond(status, &answer_fields(false), &body);
                    return false;
                };
                body.shrink_to_fit();
                let entry = Arc::new(Entry { body, ..f.entry });
                let stored = self.store_filled(f.key, f.since, Arc::clone(&entry), f.lead);
                respond_entry(ex, &entry, [&answer_fields(stored), &Vec::new()]);
                return stored;
            }
            // Too large to store: a ranged GET gets the whole response, streamed (RFC
            // 9110 §14.2: a server "MAY ignore the Range header field").
            if head_request {
                // Too large to store: the head answers now.
                let _ = ex.start(status, &answer_fields(false), length, head_length);
                let _ = ex.finish();
                return false;
            }
        }
        let mut client_gone = ex
            .start(status, &answer_fields(false), length, head_length)
            .is_err();
        // What was held back goes first; it is also the start of what a fill collects.
        let mut held = std::mem::take(&mut body);
        if fill.is_some() {
            body.extend_from_slice(&held);
        }
        // The last chunk read is held back until the next read shows whether it ends
        // the body (and so whether the entry is stored first).
        loop {
            let n = match response.body.read(&mut current) {
                Ok(0) => break,
                Ok(n) => n,
                Err(e) => return self.origin_body_broke(ex, &e),
            };
            if let Some(f) = &fill {
                f.lead.progress(self.body_allowance);
            }
            if fill.is_some() {
                if body.len() + n > self.max_object_bytes {
                    if let Some(f) = fill.take() {
                        f.lead.not_shared(self, f.key);
                    }
                    body = Vec::new();
                } else {
                    body.extend_from_slice(&current[..n]);
                }
            }
            if !held.is_empty() && !client_gone && ex.write(&held).is_err() {
                client_gone = true;
            }
            if client_gone && fill.is_none() {
                // Nothing more can reach this client and nothing is being stored.
                return false;
            }
            held.clear();
            held.extend_from_slice(&current[..n]);
        }
        let mut stored = false;
        if let Some(mut fill) = fill {
            body.shrink_to_fit();
            fill.entry.body = body;
            stored = self.store(fill);
        }
        if !held.is_empty() && !client_gone && ex.write(&held).is_err() {
            client_gone = true;
        }
        if !client_gone {
            let _ = ex.finish();
        }
        stored
    }

    /// The origin's body broke off (a reset, a timeout, fewer bytes than announced): a
    /// response already started is cut, so the client never takes it for whole; one not
    /// started yet is a 502. Nothing is stored.
    pub(super) fn origin_body_broke(&self, ex: &mut Exchange<'_>, e: &std::io::Error) -> bool {
        self.warn_limited(format_args!(
            "origin body for {} broke off: {e}",
            ex.req.target
        ));
        if ex.response_started() {
            ex.abort();
        } else {
            ex.respond_error(502, "the origin response broke off", true);
        }
        false
    }
}
