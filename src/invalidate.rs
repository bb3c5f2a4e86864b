//! The old path of invalidation, kept while issue 14's restructuring lands: the data
//! types moved below the stores to `invalidation`, the thread above them to
//! `invalidator`, `split_key` to `key` (the key's own format). Nothing new should use
//! these re-exports; the final cleanup of issue 14 removes this file.

pub use crate::invalidation::{
    BadRequest, Job, JobOutcome as Outcome, Matcher, Mode, Progress, Stop,
};
pub(crate) use crate::invalidator::{
    CancelRefused, Invalidator, Refresher, Refused, Report, State,
};
pub use crate::key::split_key;
