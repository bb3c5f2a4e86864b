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

pub use bans::{ban_names, Ban, BanCheck, Bans, MAX_BANS, MAX_BAN_BYTES};
pub use job::{Checkpoint, Job, JobOutcome, Mode, Progress, Stop, SAMPLE};
pub use matcher::{BadRequest, Matcher, MAX_PATTERN_BYTES};
