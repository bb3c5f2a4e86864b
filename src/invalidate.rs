//! The old path of invalidation, kept while issue 14's restructuring lands: the data
//! types moved below the stores to [`crate::invalidation`], the thread above them to
//! [`crate::invalidator`], `split_key` to [`crate::key`] (the key's own format). Nothing
//! new should use these re-exports; the final cleanup of issue 14 removes this file.

pub use crate::invalidation::{
    ban_names, BadRequest, Ban, BanCheck, Bans, Checkpoint, Job, JobOutcome as Outcome, Matcher,
    Mode, Progress, Stop, MAX_BANS, MAX_BAN_BYTES, MAX_PATTERN_BYTES, SAMPLE,
};
pub use crate::invalidator::{CancelRefused, Invalidator, Refresher, Refused, Report, State};
pub use crate::key::split_key;
