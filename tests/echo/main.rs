//! Echo's integration tests, linked into one binary: real sockets, a programmable
//! origin that counts its hits, and Echo itself started in-process on free ports.

mod support;

mod cache;
mod cli;
mod coalesce;
mod directives;
mod encoding;
mod faults;
mod frontend;
mod herd;
mod install;
mod interim;
mod invalidate;
mod listeners;
mod operations;
mod origins;
mod props;
mod proxy;
mod ranges;
mod redis;
mod redis_failover;
mod redis_fence;
mod redis_health;
mod redis_local;
mod redis_lock;
mod redis_memory;
mod redis_secure;
mod security;
mod sentinel_fixture;
mod stale;
