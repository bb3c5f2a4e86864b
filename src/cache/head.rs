//! A HEAD whose stored GET response is stale is validated with a HEAD to the origin (no
//! body comes for a client that wants none), and the answer freshens the stored response
//! or marks it stale (RFC 9111 §4.3.5).
//!
//! Invariants: nothing of a HEAD answer is ever stored as a response of its own (it has
//! no content); a stored response is updated only from a 200 whose validators and length
//! match it (`policy::head_freshens`), with the field update rules of a 304 (§3.2);
//! otherwise it is stored again as stale, so the next GET revalidates it.
//!
//! What it must not do: answer a GET (only a HEAD request sends a HEAD).

use std::sync::Arc;
use std::time::{Duration, SystemTime};

use log::debug;

use super::coalesce::Outcome as FlightOutcome;
use super::forward::response_headers;
use super::outcome::Fwd;
use super::{Cache, Since};
use crate::http::exchange::Exchange;
use crate::http::Headers;
use crate::key::CacheKey;
use crate::policy::{self, AfterNotModified};
use crate::store::Entry;
use crate::upstream::OriginResponse;

impl Cache {
    /// What the origin's answer to a HEAD (other than a 304, which freshens like any)
    /// does to the `stored` response the HEAD validated, and the client's answer: from
    /// the freshened entry when it still describes it, else the origin's own head.
    pub(super) fn after_head(
        &self,
        ex: &mut Exchange<'_>,
        (key, since, fwd): (&CacheKey, Since, Fwd),
        (stored, sent): (&Entry, &Headers),
        response: OriginResponse,
        (request_time, response_time): (SystemTime, SystemTime),
    ) -> FlightOutcome {
        let fields = response_headers(&response.headers, response_time);
        if response.status == 200 {
            let len = stored
                .file
                .as_ref()
                .map_or(stored.body.len() as u64, |f| f.len());
            if policy::head_freshens(&stored.headers, len, &fields) {
                // RFC 9111 §4.3.5: "If a cache updates a stored response with the
                // metadata provided in a HEAD response, the cache MUST use the header
                // fields provided in the HEAD response to update the stored response
                // (see Section 3.2)."
                let after = policy::after_not_modified(
                    &stored.headers,
                    stored.status,
                    &fields,
                    &ex.req.headers,
                    response_time,
                    &self.policy,
                );
                if let AfterNotModified::Update {
                    headers,
                    storability,
                } = after
                {
                    drop(response);
                    let times = (request_time, response_time);
                    return self.freshen(
                        ex,
                        key,
                        since,
                        (stored, sent),
                        (headers, storability),
                        times,
                    );
                }
            }
            debug!("HEAD for {key} describes another representation: stored copy now stale");
            let stale = Entry {
                freshness: Duration::ZERO,
                ..stored.clone()
            };
            self.store_entry(key, since, Arc::new(stale));
        }
        // The origin's head answers this client; nothing of it is stored.
        self.stream_body(ex, response, &fields, fwd, Some("head"), None);
        FlightOutcome::NotShared
    }
}
