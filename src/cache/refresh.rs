//! Revalidation off the request path: stale-while-revalidate and refresh-ahead queue a
//! background refresh of an entry, run by a small pool of its own; invalidation's
//! refresh mode fetches entries again through the same code ([`Refresher`]).
//!
//! Invariants: one refresh per key at a time; the queue is bounded and a full queue
//! drops the refresh (the next request tries again), never blocks a request; a refresh
//! stores through the same generation check as a fill; the pool's threads hold the
//! cache weakly and end when it is dropped.

use std::collections::HashSet;
use std::io::Read;
use std::sync::{Arc, Mutex};
use std::time::{Instant, SystemTime};

use log::debug;

use super::fill::{freshened, new_entry, Fill, Lead};
use super::forward::{final_response, response_headers, VIA};
use super::{Cache, Since};
use crate::http::{Headers, Request};
use crate::invalidator::Refresher;
use crate::key::CacheKey;
use crate::policy::{self, AfterNotModified, Storability};
use crate::store::{Entry, Lookup};
use crate::upstream::OriginRequest;

impl Cache {
    /// Starts the background refresh pool (stale-while-revalidate, refresh-ahead). Its
    /// threads hold the proxy weakly: they end when it is dropped.
    pub fn start_background(self: &Arc<Self>, workers: usize, queue: usize) -> std::io::Result<()> {
        let (tx, rx) = crossbeam_channel::bounded::<Task>(queue);
        for i in 0..workers {
            let rx = rx.clone();
            let proxy = Arc::downgrade(self);
            std::thread::Builder::new()
                .name(format!("echo-refresh-{i}"))
                .spawn(move || {
                    for task in rx.iter() {
                        let Some(proxy) = proxy.upgrade() else {
                            return;
                        };
                        let done_key = task.key.as_str().to_string();
                        proxy.fetch_and_store(
                            &task.key,
                            task.headers,
                            &task.req_headers,
                            Some(&task.stale),
                            task.since,
                        );
                        if let Some(background) = proxy.background.get() {
                            background.done(&done_key);
                        }
                    }
                })?;
        }
        let _ = self.background.set(Background {
            tx,
            refreshing: Mutex::new(HashSet::new()),
        });
        Ok(())
    }

    /// Fetches `key` with `headers` (conditionally on `validate`'s validators) and stores
    /// the answer when HTTP allows: a 304 freshens `validate`, a full response replaces it.
    /// No client is involved (background refreshes, invalidation's refresh mode).
    fn fetch_and_store(
        &self,
        key: &CacheKey,
        mut headers: Headers,
        req_headers: &Headers,
        validate: Option<&Entry>,
        since: Since,
    ) -> bool {
        // The Vary values stored come from the request as sent, preconditions aside.
        let sent = headers.clone();
        if let Some(stored) = validate {
            headers.extend(policy::validation_preconditions(&stored.headers));
        }
        let request_time = SystemTime::now();
        let response = match self
            .origin
            .get()
            .send(OriginRequest {
                method: "GET",
                target: key.target(),
                host: key.host(),
                headers: &headers,
                body: None,
            })
            .and_then(final_response)
        {
            Ok(r) => r,
            Err(e) => {
                self.warn_limited(format_args!("background fetch of {key} failed: {e}"));
                return false;
            }
        };
        let response_time = SystemTime::now();
        if response.status == 304 {
            let Some(stored) = validate else {
                return false;
            };
            let not_modified = response_headers(&response.headers, response_time);
            let after = policy::after_not_modified(
                &stored.headers,
                stored.status,
                &not_modified,
                req_headers,
                response_time,
                &self.policy,
            );
            let AfterNotModified::Update {
                headers,
                storability: Storability::Store { freshness, .. },
            } = after
            else {
                return false;
            };
            let times = (request_time, response_time);
            let entry = freshened(stored, &sent, &headers, freshness, times, &self.policy);
            return self.store_entry(key, since, Arc::new(entry));
        }
        let Storability::Store { freshness, .. } = policy::storability(
            "GET",
            req_headers,
            response.status,
            &response.headers,
            response_time,
            &self.policy,
        ) else {
            return false;
        };
        let base = response_headers(&response.headers, response_time);
        let mut entry = new_entry(
            &sent,
            &base,
            response.status,
            freshness,
            (request_time, response_time),
            &self.policy,
        );
        let limit = self.max_object_bytes as u64;
        let mut body = Vec::new();
        let read = response.body.take(limit + 1).read_to_end(&mut body);
        body.shrink_to_fit();
        if read.is_err() || body.len() as u64 > limit {
            return false;
        }
        entry.body = body;
        let alone = Lead::Alone;
        self.store(Fill {
            key,
            since,
            entry,
            lead: &alone,
        })
    }

    /// Queues a background revalidation of `entry` (one per key at a time; none when the
    /// queue is full: the next request tries again).
    pub(super) fn refresh_later(
        &self,
        key: &CacheKey,
        req: &Request,
        entry: &Arc<Entry>,
        since: Since,
    ) {
        let Some(background) = self.background.get() else {
            return;
        };
        let headers = self.fill_headers(req);
        background.submit(Task {
            key: key.clone(),
            headers,
            req_headers: req.headers.clone(),
            stale: Arc::clone(entry),
            since,
        });
    }
}

impl Refresher for Cache {
    /// Fetches every stored variant of `key` again (its request rebuilt from the Vary
    /// snapshot) and stores what the origin answers, when HTTP allows.
    fn refresh(&self, key: &CacheKey) -> bool {
        // Read where writes land, not from a replica or the local tier: the generation
        // must be the one now, after the job's own ban (a local copy keeps the one it was
        // read with, and a refresh changes nothing that would drop it).
        let Ok(Lookup {
            variants,
            generation,
            ..
        }) = self.store.get_latest(key)
        else {
            return false;
        };
        let snapshots: Vec<policy::VarySnapshot> = if variants.is_empty() {
            vec![Vec::new()]
        } else {
            variants.iter().map(|e| e.vary.clone()).collect()
        };
        let mut refreshed = false;
        for snapshot in snapshots {
            let since = Since {
                generation,
                started: Instant::now(),
            };
            let mut req_headers: Headers = snapshot
                .iter()
                .filter_map(|(n, v)| v.as_ref().map(|v| (n.clone(), v.as_bytes().to_vec())))
                .collect();
            let mut headers = req_headers.clone();
            headers.push(("via".into(), VIA.to_vec()));
            headers.push(("x-forwarded-host".into(), key.host().as_bytes().to_vec()));
            headers.push(("x-forwarded-proto".into(), b"http".to_vec()));
            req_headers.push(("host".into(), key.host().as_bytes().to_vec()));
            refreshed |= self.fetch_and_store(key, headers, &req_headers, None, since);
        }
        refreshed
    }
}

/// A background revalidation.
pub(super) struct Task {
    key: CacheKey,
    /// The origin request's fields (the triggering client's, as forwarded).
    headers: Headers,
    /// The triggering client's fields, for storability and Vary.
    req_headers: Headers,
    stale: Arc<Entry>,
    since: Since,
}

/// The bounded queue of background revalidations, and the keys being revalidated (one
/// at a time per key).
pub(super) struct Background {
    tx: crossbeam_channel::Sender<Task>,
    refreshing: Mutex<HashSet<String>>,
}

impl Background {
    fn keys(&self) -> std::sync::MutexGuard<'_, HashSet<String>> {
        self.refreshing.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn submit(&self, task: Task) {
        let key = task.key.as_str().to_string();
        if !self.keys().insert(key.clone()) {
            return;
        }
        if self.tx.try_send(task).is_err() {
            debug!("background queue full; {key} is not refreshed now");
            self.keys().remove(&key);
        }
    }

    fn done(&self, key: &str) {
        self.keys().remove(key);
    }
}
