//! What an invalidation is, as plain data shared by the stores (which run jobs) and the
//! invalidation thread (`invalidator`, which queues and reports them): [`Matcher`] (which
//! entries), [`Job`], [`Mode`], [`Progress`] and [`JobOutcome`] (what to do, how far it
//! got, what it did), and the [`Bans`] that keep an invalidation from being undone.
//!
//! Invariants: this module sits below the stores and knows nothing of them, of the
//! invalidation thread, of HTTP or of Redis: it imports only `key`.

mod bans;
mod job;
mod matcher;

pub(crate) use bans::{ban_names, BanCheck, Bans};
pub(crate) use job::{Checkpoint, SAMPLE};
pub use job::{Job, JobOutcome, Mode, Progress, Stop};
pub(crate) use matcher::url_cache_key;
/// The tests of the bans and of the invalidator build patterns of the longest length.
#[cfg(test)]
pub(crate) use matcher::MAX_PATTERN_BYTES;
pub use matcher::{BadRequest, Matcher, MAX_URLS};
