//! The admin listener (`admin.listen`, never the proxy port): `GET /health` without a
//! token; every other call needs `Authorization: Bearer <admin.token>`.
//!
//! This version serves health only; invalidation and metrics join it in later issues.
//! Invariants: the token is compared in constant time and never logged.

use crate::http::exchange::Exchange;
use crate::server::Handler;

pub struct Admin {
    token: String,
}

impl Admin {
    pub fn new(token: String) -> Admin {
        Admin { token }
    }

    fn authorized(&self, ex: &Exchange<'_>) -> bool {
        let Some(value) = ex.req.header("authorization") else {
            return false;
        };
        let Some(given) = value.strip_prefix(b"Bearer ") else {
            return false;
        };
        constant_time_eq(given.trim_ascii(), self.token.as_bytes())
    }
}

/// Compares without an early exit, so the time taken says nothing about how much of a
/// guessed token was right. Written here: it is four lines, not worth a dependency.
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    let mut diff = a.len() ^ b.len();
    for (i, &y) in b.iter().enumerate() {
        diff |= usize::from(a.get(i).copied().unwrap_or(!y) ^ y);
    }
    diff == 0
}

fn json_headers() -> [(String, Vec<u8>); 2] {
    [
        ("content-type".to_string(), b"application/json".to_vec()),
        ("cache-control".to_string(), b"no-store".to_vec()),
    ]
}

impl Handler for Admin {
    fn handle(&self, ex: &mut Exchange<'_>) {
        let path = ex.req.target.split('?').next().unwrap_or("").to_string();
        if path == "/health" && matches!(ex.req.method.as_str(), "GET" | "HEAD") {
            let body = "{\"status\": \"ok\"}\n";
            let _ = ex.respond(200, &json_headers(), body.as_bytes());
            return;
        }
        if !self.authorized(ex) {
            let body = "{\"error\": \"missing or wrong bearer token\"}\n";
            let mut headers = json_headers().to_vec();
            headers.push(("www-authenticate".to_string(), b"Bearer".to_vec()));
            let _ = ex.respond(401, &headers, body.as_bytes());
            return;
        }
        let body = "{\"error\": \"no such admin endpoint\"}\n";
        let _ = ex.respond(404, &json_headers(), body.as_bytes());
    }
}

#[cfg(test)]
mod tests {
    use super::constant_time_eq;

    #[test]
    fn tokens_compare_exactly() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secreT", b"secret"));
        assert!(!constant_time_eq(b"secret1", b"secret"));
        assert!(!constant_time_eq(b"secre", b"secret"));
        assert!(!constant_time_eq(b"", b"secret"));
    }
}
