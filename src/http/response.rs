//! Response framing and head serialisation (RFC 9112 §4, §6.1, §6.3, §9.6).
//!
//! Invariants: Echo alone decides the framing fields (`Content-Length`,
//! `Transfer-Encoding`, `Connection`); callers pass end-to-end fields only, and any
//! framing field among them is dropped here so a response can never carry two framings.

use super::{reason, Version};

/// What the caller knows of the body it will send.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BodyLength {
    Known(u64),
    Unknown,
}

/// How the body goes on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Framing {
    /// No body bytes follow (HEAD, 1xx, 204, 304).
    NoBody,
    Length(u64),
    Chunked,
    /// The body ends when the connection closes (HTTP/1.0 clients, unknown length).
    Close,
}

/// RFC 9110 §6.4.1: responses to HEAD and 1xx/204/304 have no content.
pub(crate) fn has_no_body(status: u16, head_request: bool) -> bool {
    head_request || status < 200 || status == 204 || status == 304
}

/// Chooses the framing for a response to a client speaking `version`.
pub(crate) fn choose(
    status: u16,
    head_request: bool,
    length: BodyLength,
    version: Version,
) -> Framing {
    if has_no_body(status, head_request) {
        return Framing::NoBody;
    }
    match (length, version) {
        (BodyLength::Known(n), _) => Framing::Length(n),
        (BodyLength::Unknown, Version::Http11) => Framing::Chunked,
        (BodyLength::Unknown, Version::Http10) => Framing::Close,
    }
}

/// Response fields a handler has left out of its answers, by configuration (they stay
/// in what is stored; only what goes out loses them).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Omit {
    /// `X-Cache-Status` and `Cache-Status` (`cache.expose_status_headers = false`).
    pub status_fields: bool,
    /// `Surrogate-Key` (`cache.strip_surrogate_key`).
    pub surrogate_key: bool,
}

impl Omit {
    pub(crate) fn omits(self, name: &str) -> bool {
        (self.status_fields && (name == "x-cache-status" || name == "cache-status"))
            || (self.surrogate_key && name == "surrogate-key")
    }
}

/// Serialises a response head into `out`.
///
/// `keep_alive` is whether the connection stays open after this response; `length` is
/// kept for HEAD responses, which announce the length a GET would have had.
/// `fields` are written in order, slice after slice (stored fields, then the ones added
/// for this answer), so no caller has to join them into a new list; those `omit` names
/// are left out.
// One argument per part of the head: bundling them would only rename them.
#[allow(clippy::too_many_arguments)]
pub(crate) fn write_head(
    out: &mut Vec<u8>,
    version: Version,
    status: u16,
    fields: &[&[(String, Vec<u8>)]],
    framing: Framing,
    head_length: Option<u64>,
    keep_alive: bool,
    omit: Omit,
) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(itoa::Buffer::new().format(status).as_bytes());
    out.push(b' ');
    out.extend_from_slice(reason(status).as_bytes());
    out.extend_from_slice(b"\r\n");
    for (name, value) in fields.iter().flat_map(|f| f.iter()) {
        // Framing is written below; Echo's own targeted cache-control field is for Echo
        // alone (RFC 9213 §2) and never leaves it, nor does its note of how a stored body
        // is held.
        if matches!(
            name.as_str(),
            "content-length" | "transfer-encoding" | "connection" | "keep-alive"
        ) || name == crate::policy::ECHO_CACHE_CONTROL
            || name == crate::cache::STORED_CODING
            || omit.omits(name)
        {
            continue;
        }
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(value);
        out.extend_from_slice(b"\r\n");
    }
    match framing {
        Framing::Length(n) => {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        Framing::Chunked => out.extend_from_slice(b"transfer-encoding: chunked\r\n"),
        // RFC 9110 §8.6: "A server MUST NOT send a Content-Length header field in any
        // response with a status code of 1xx (Informational) or 204 (No Content)."
        Framing::NoBody if status < 200 || status == 204 => {}
        Framing::NoBody => {
            if let Some(n) = head_length {
                out.extend_from_slice(b"content-length: ");
                out.extend_from_slice(itoa::Buffer::new().format(n).as_bytes());
                out.extend_from_slice(b"\r\n");
            }
        }
        Framing::Close => {}
    }
    if !keep_alive || framing == Framing::Close {
        out.extend_from_slice(b"connection: close\r\n");
    } else if version == Version::Http10 {
        out.extend_from_slice(b"connection: keep-alive\r\n");
    }
    out.extend_from_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn head(status: u16, framing: Framing, keep_alive: bool, version: Version) -> String {
        let mut out = Vec::new();
        let headers = vec![
            ("x-a".to_string(), b"1".to_vec()),
            ("content-length".to_string(), b"999".to_vec()),
            ("transfer-encoding".to_string(), b"gzip".to_vec()),
        ];
        write_head(
            &mut out,
            version,
            status,
            &[&headers],
            framing,
            None,
            keep_alive,
            Omit::default(),
        );
        String::from_utf8(out).unwrap()
    }

    #[test]
    fn framing_follows_status_method_and_version() {
        use BodyLength::*;
        assert_eq!(
            choose(200, true, Known(5), Version::Http11),
            Framing::NoBody
        );
        assert_eq!(
            choose(304, false, Known(5), Version::Http11),
            Framing::NoBody
        );
        assert_eq!(
            choose(204, false, Unknown, Version::Http11),
            Framing::NoBody
        );
        assert_eq!(
            choose(200, false, Known(5), Version::Http10),
            Framing::Length(5)
        );
        assert_eq!(
            choose(200, false, Unknown, Version::Http11),
            Framing::Chunked
        );
        assert_eq!(choose(200, false, Unknown, Version::Http10), Framing::Close);
    }

    #[test]
    fn no_content_length_on_1xx_or_204_even_for_head() {
        for status in [103, 204] {
            let mut out = Vec::new();
            write_head(
                &mut out,
                Version::Http11,
                status,
                &[],
                Framing::NoBody,
                Some(0),
                true,
                Omit::default(),
            );
            let head = String::from_utf8(out).unwrap();
            assert!(!head.contains("content-length"), "{head}");
        }
        let mut out = Vec::new();
        write_head(
            &mut out,
            Version::Http11,
            200,
            &[],
            Framing::NoBody,
            Some(7),
            true,
            Omit::default(),
        );
        assert!(String::from_utf8(out)
            .unwrap()
            .contains("content-length: 7"));
    }

    #[test]
    fn caller_framing_fields_never_reach_the_wire() {
        let h = head(200, Framing::Chunked, true, Version::Http11);
        assert_eq!(
            h,
            "HTTP/1.1 200 OK\r\nx-a: 1\r\ntransfer-encoding: chunked\r\n\r\n"
        );
        let h = head(404, Framing::Length(3), false, Version::Http11);
        assert_eq!(
            h,
            "HTTP/1.1 404 Not Found\r\nx-a: 1\r\ncontent-length: 3\r\nconnection: close\r\n\r\n"
        );
        let h = head(200, Framing::Length(3), true, Version::Http10);
        assert!(
            h.ends_with("content-length: 3\r\nconnection: keep-alive\r\n\r\n"),
            "{h}"
        );
    }
}
