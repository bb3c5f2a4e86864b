//! Echo's own HTTP/1.1 front end, on `httparse`: request heads parsed strictly
//! (`parse`), request bodies decoded and limited (`body`), responses framed and written
//! (`response`) over a connection's buffers and deadlines (`conn`, `exchange`);
//! `handler` is the seam to what answers requests; `headers` is the one set of field
//! helpers (lists, tokens, dates, delta-seconds, hop-by-hop fields) that the policy and
//! the request path use too.
//!
//! Invariants: header names are lower-case everywhere past the parser; repeated fields
//! keep their order; nothing here panics on any input; every refusal carries the status
//! the client gets and a short reason in Echo's own words.

pub mod body;
pub mod conn;
pub mod exchange;
pub mod handler;
pub mod headers;
pub mod interim;
pub mod parse;
pub mod range;
pub mod response;
pub mod socket;

use std::net::SocketAddr;

/// A header list: lower-case name, raw value bytes; repeats kept in order.
pub type Headers = Vec<(String, Vec<u8>)>;

/// The HTTP/1.x minor version of a request.
/// Echo's `Via` (RFC 9110 §7.6.3): on what it forwards, and on its own answers.
pub const VIA: &[u8] = b"1.1 echo";

/// `Date` and `Via` for an answer of Echo's own making (an error, a refusal, the admin
/// API's): every answer carries them (RFC 9110 §6.6.1: "An origin server with a clock
/// ... MUST generate a Date header field" in its 2xx-5xx responses).
pub(crate) fn own_fields() -> [(String, Vec<u8>); 2] {
    [
        (
            "date".to_string(),
            headers::format_date(std::time::SystemTime::now()).into_bytes(),
        ),
        ("via".to_string(), VIA.to_vec()),
    ]
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Version {
    Http10,
    Http11,
}

impl Version {
    pub fn as_str(self) -> &'static str {
        match self {
            Version::Http10 => "HTTP/1.0",
            Version::Http11 => "HTTP/1.1",
        }
    }
}

/// How the request body is framed (RFC 9112 §6.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyFraming {
    None,
    Length(u64),
    Chunked,
}

/// A parsed, validated request head.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    /// Origin-form target (`/path?query`), or `*` for `OPTIONS *`.
    pub target: String,
    pub version: Version,
    pub headers: Headers,
    /// The authority the request is for: lower-case, without a default port.
    pub host: String,
    pub framing: BodyFraming,
    /// The client asked for `100 Continue` before sending its body.
    pub expect_continue: bool,
    /// The client allows the connection to persist after this exchange.
    pub keep_alive: bool,
    pub peer: SocketAddr,
    /// When the head was parsed: the start of the request's duration in logs.
    pub received: std::time::Instant,
}

impl Request {
    /// The first value of a header (name in lower case).
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        headers::header(&self.headers, name)
    }

    pub fn is_head(&self) -> bool {
        self.method == "HEAD"
    }
}

/// The canonical reason phrase for a status code (RFC 9110 §15); empty when unknown,
/// which RFC 9112 §4 allows.
pub fn reason(status: u16) -> &'static str {
    match status {
        100 => "Continue",
        101 => "Switching Protocols",
        200 => "OK",
        201 => "Created",
        202 => "Accepted",
        203 => "Non-Authoritative Information",
        204 => "No Content",
        205 => "Reset Content",
        206 => "Partial Content",
        300 => "Multiple Choices",
        301 => "Moved Permanently",
        302 => "Found",
        303 => "See Other",
        304 => "Not Modified",
        307 => "Temporary Redirect",
        308 => "Permanent Redirect",
        400 => "Bad Request",
        401 => "Unauthorized",
        403 => "Forbidden",
        404 => "Not Found",
        405 => "Method Not Allowed",
        406 => "Not Acceptable",
        408 => "Request Timeout",
        409 => "Conflict",
        410 => "Gone",
        411 => "Length Required",
        412 => "Precondition Failed",
        413 => "Content Too Large",
        414 => "URI Too Long",
        415 => "Unsupported Media Type",
        416 => "Range Not Satisfiable",
        417 => "Expectation Failed",
        421 => "Misdirected Request",
        422 => "Unprocessable Content",
        426 => "Upgrade Required",
        428 => "Precondition Required",
        429 => "Too Many Requests",
        431 => "Request Header Fields Too Large",
        500 => "Internal Server Error",
        501 => "Not Implemented",
        502 => "Bad Gateway",
        503 => "Service Unavailable",
        504 => "Gateway Timeout",
        505 => "HTTP Version Not Supported",
        _ => "",
    }
}
