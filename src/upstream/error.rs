//! Why an origin did not answer, in kinds the cache acts on: which status the client
//! gets (502 or 504), whether a server is taken out of rotation, whether a request may
//! be retried on another server, and which phase of the exchange timed out.
//!
//! Invariants: every origin failure is one of these kinds; nothing matches on message
//! text; the kind names are stable (metric labels, `Cache-Status` details).

use std::fmt;
use std::io;

/// The phase of an origin exchange that ran out of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    /// Resolving and connecting (`origin.connect_timeout_ms`).
    Connect,
    /// Sending the request (`origin.send_timeout_ms`).
    Send,
    /// Waiting for the response head (`origin.response_timeout_ms`).
    Response,
    /// Between reads of the body (`origin.read_timeout_ms`).
    Read,
    /// The whole exchange (`origin.total_timeout_ms`).
    Total,
    /// A revalidation that must succeed (must-revalidate) found the origin unreachable:
    /// a stale copy may not answer, so it is a 504 (RFC 9111 §5.2.2.2).
    Revalidation,
}

impl Phase {
    pub fn as_str(self) -> &'static str {
        match self {
            Phase::Connect => "connect",
            Phase::Send => "send",
            Phase::Response => "response",
            Phase::Read => "read",
            Phase::Total => "global",
            Phase::Revalidation => "revalidation",
        }
    }
}

/// Why the origin did not answer.
#[derive(Debug)]
pub enum OriginError {
    /// Could not connect (refused, unreachable, DNS): 502.
    Connect(String),
    /// A phase took too long: 504.
    Timeout(Phase),
    /// The origin broke the protocol or the connection: 502.
    Protocol(String),
    /// Reading the client's request body failed while forwarding it.
    ClientBody(io::Error),
    /// No server of the service is healthy (or out of its hold-down): 502, at once.
    Unavailable(String),
}

impl OriginError {
    /// The status a client gets for this failure.
    pub fn status(&self) -> u16 {
        match self {
            OriginError::Timeout(_) => 504,
            OriginError::ClientBody(_) => 400,
            _ => 502,
        }
    }

    /// Short label for logs and metrics.
    pub fn kind(&self) -> &'static str {
        match self {
            OriginError::Connect(_) => "connect",
            OriginError::Timeout(_) => "timeout",
            OriginError::Protocol(_) => "protocol",
            OriginError::ClientBody(_) => "client-body",
            OriginError::Unavailable(_) => "unavailable",
        }
    }
}

impl fmt::Display for OriginError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            OriginError::Connect(why) => write!(f, "cannot connect to the origin: {why}"),
            OriginError::Timeout(phase) => write!(f, "the origin timed out ({})", phase.as_str()),
            OriginError::Protocol(why) => write!(f, "the origin failed: {why}"),
            OriginError::ClientBody(e) => write!(f, "reading the request body failed: {e}"),
            OriginError::Unavailable(why) => write!(f, "no origin server available: {why}"),
        }
    }
}

impl std::error::Error for OriginError {}
