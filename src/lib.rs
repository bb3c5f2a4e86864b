//! Echo: an HTTP/1.1 reverse proxy cache.
//!
//! The library holds everything; `echod` (src/main.rs) only parses argv, sets up
//! logging and calls [`start`]. Tests and benches drive [`start_on`] directly.

pub(crate) mod access_log;
pub mod admin;

mod app;
pub(crate) mod body_file;
pub(crate) mod cache;
pub mod config;
pub mod http;

pub mod invalidation;
pub(crate) mod invalidator;
pub mod key;
pub(crate) mod live;
pub mod logging;
pub(crate) mod metrics;
pub mod policy;
pub(crate) mod process;
pub mod server;
pub mod store;
pub(crate) mod upstream;

pub use app::{start, start_on, Echo, Reloaded, StartError};
