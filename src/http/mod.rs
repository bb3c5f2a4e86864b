//! Echo's own HTTP/1.1 front end, on `httparse`: request heads parsed strictly
//! (`parse`), request bodies decoded and limited (`body`), responses framed and
//! written (`response`).
//!
//! Invariants: header names are lower-case everywhere past the parser; repeated fields
//! keep their order; nothing here panics on any input; every refusal carries the status
//! the client gets and a short reason in Echo's own words.

pub mod body;
pub mod conn;
pub mod exchange;
pub mod handler;
pub mod parse;
pub mod response;

use std::net::SocketAddr;

/// A header list: lower-case name, raw value bytes; repeats kept in order.
pub type Headers = Vec<(String, Vec<u8>)>;

/// The HTTP/1.x minor version of a request.
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
        header(&self.headers, name)
    }

    pub fn is_head(&self) -> bool {
        self.method == "HEAD"
    }
}

/// The first value of `name` (lower case) in `headers`.
pub fn header<'a>(headers: &'a [(String, Vec<u8>)], name: &str) -> Option<&'a [u8]> {
    headers
        .iter()
        .find(|(n, _)| n == name)
        .map(|(_, v)| v.as_slice())
}

/// Does the comma-separated list field `name` contain `token` (case-insensitive)?
pub fn has_token(headers: &[(String, Vec<u8>)], name: &str, token: &str) -> bool {
    headers
        .iter()
        .filter(|(n, _)| n == name)
        .flat_map(|(_, v)| v.split(|&b| b == b','))
        .any(|item| item.trim_ascii().eq_ignore_ascii_case(token.as_bytes()))
}

/// Hop-by-hop fields (RFC 9110 §7.6.1), never forwarded and never stored, plus
/// the framing fields Echo sets itself.
pub const HOP_BY_HOP: &[&str] = &[
    "connection",
    "keep-alive",
    "proxy-connection",
    "te",
    "trailer",
    "transfer-encoding",
    "upgrade",
];

/// A field name as CGI, WSGI and Rack servers read it: `_` and `-` are the same (names
/// are already lower case past the parser). Every comparison of a request field name
/// against a list Echo acts on (hop-by-hop, its own forwarding fields, the strip list)
/// goes through this, so `X_Forwarded_Host` is `x-forwarded-host` (the Puma
/// CVE-2024-45614 class of cache poisoning).
pub fn fold_name(name: &str) -> std::borrow::Cow<'_, str> {
    if name.contains('_') || name.bytes().any(|b| b.is_ascii_uppercase()) {
        std::borrow::Cow::Owned(name.to_ascii_lowercase().replace('_', "-"))
    } else {
        std::borrow::Cow::Borrowed(name)
    }
}

/// Do two field names name the same field once folded (`_` = `-`, any case)?
pub fn same_field(a: &str, b: &str) -> bool {
    a.len() == b.len()
        && a.bytes().zip(b.bytes()).all(|(x, y)| {
            let fold = |c: u8| {
                if c == b'_' {
                    b'-'
                } else {
                    c.to_ascii_lowercase()
                }
            };
            fold(x) == fold(y)
        })
}

/// Removes the hop-by-hop fields and every field named in `Connection`
/// (RFC 9110 §7.6.1: "a proxy or gateway MUST ... remove any header or trailer field
/// ... identified in the Connection header field"), names compared folded.
pub fn strip_hop_by_hop(headers: &mut Headers) {
    let named: Vec<String> = headers
        .iter()
        .filter(|(n, _)| same_field(n, "connection"))
        .flat_map(|(_, v)| v.split(|&b| b == b','))
        .map(|item| fold_name(&String::from_utf8_lossy(item.trim_ascii())).into_owned())
        .filter(|s| !s.is_empty())
        .collect();
    headers.retain(|(n, _)| {
        let n = fold_name(n);
        !HOP_BY_HOP.contains(&n.as_ref()) && !named.iter().any(|c| *c == n)
    });
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

#[cfg(test)]
mod tests {
    use super::*;

    fn h(pairs: &[(&str, &str)]) -> Headers {
        pairs
            .iter()
            .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec()))
            .collect()
    }

    #[test]
    fn hop_by_hop_and_connection_named_fields_are_removed() {
        let mut headers = h(&[
            ("connection", "close, X-Secret"),
            ("x-secret", "1"),
            ("keep-alive", "timeout=5"),
            ("set-cookie", "a=1"),
            ("set-cookie", "b=2"),
            ("transfer-encoding", "chunked"),
        ]);
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers, h(&[("set-cookie", "a=1"), ("set-cookie", "b=2")]));
    }

    #[test]
    fn names_fold_underscores_and_case() {
        assert_eq!(fold_name("x-forwarded-host"), "x-forwarded-host");
        assert_eq!(fold_name("X_Forwarded_Host"), "x-forwarded-host");
        assert!(same_field("x_original_url", "X-Original-URL"));
        assert!(!same_field("x-original-url", "x-original-uri"));
        let mut headers = h(&[
            ("connection", "X_Secret"),
            ("x-secret", "1"),
            ("transfer_encoding", "chunked"),
            ("keep", "1"),
        ]);
        strip_hop_by_hop(&mut headers);
        assert_eq!(headers, h(&[("keep", "1")]));
    }

    #[test]
    fn tokens_are_found_in_lists_across_lines() {
        let headers = h(&[("connection", "keep-alive"), ("connection", " Close ")]);
        assert!(has_token(&headers, "connection", "close"));
        assert!(!has_token(&headers, "connection", "upgrade"));
    }
}
