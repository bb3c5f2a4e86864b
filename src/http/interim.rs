//! Interim (1xx) responses from the origin, forwarded to the client the moment they
//! arrive (RFC 9110 §15.2: "A proxy MUST forward 1xx responses unless the proxy itself
//! requested the generation of the 1xx response"), ahead of the final response: `103
//! Early Hints` lets a browser start fetching while the origin still works.
//!
//! The origin client (ureq) reads and drops 1xx responses inside its blocking call; the
//! origin transport (`upstream::transport`) sees each one as ureq consumes it and hands
//! it to [`deliver`]. While a request waits on the origin, the thread holds a
//! [`Forwarding`] guard: a duplicate of the client's socket, written directly (the
//! response proper has not started, and nothing else is queued for the client).
//!
//! Invariants: never to an HTTP/1.0 client (§15.2: "A server MUST NOT send a 1xx
//! response to an HTTP/1.0 client"); never `100 Continue` (Echo answers a client's
//! expectation itself) nor `101` (Echo does not switch protocols); hop-by-hop fields are
//! dropped; nothing of a 1xx is stored or merged into the final response (ureq drops it
//! from what Echo sees); a failed write stops forwarding for that request, never fails it.
//!
//! What it must not do: block the final response (a write is a few hundred bytes to a
//! socket that has nothing else pending); act on any thread without a guard (background
//! refreshes have no client).

use std::cell::RefCell;
use std::io::Write;

use super::headers;
use super::socket::Socket;

thread_local! {
    /// The socket of the client whose request this thread is sending to the origin.
    static SINK: RefCell<Option<Socket>> = const { RefCell::new(None) };
}

/// While held, 1xx responses the origin sends go to this client. Dropping it stops that.
pub struct Forwarding(());

impl Forwarding {
    /// Forwards to `socket` (None: to no one, as for an HTTP/1.0 client).
    pub(crate) fn to(socket: Option<Socket>) -> Forwarding {
        SINK.with(|s| *s.borrow_mut() = socket);
        Forwarding(())
    }
}

impl Drop for Forwarding {
    fn drop(&mut self) {
        SINK.with(|s| s.borrow_mut().take());
    }
}

/// One interim response head as the origin sent it (status line to the empty line):
/// forwarded to this thread's client, if it has one and the status is one to forward.
pub(crate) fn deliver(head: &[u8]) {
    SINK.with(|s| {
        let mut sink = s.borrow_mut();
        let Some(socket) = sink.as_mut() else {
            return;
        };
        let Some(bytes) = rewrite(head) else {
            return;
        };
        if socket.write_all(&bytes).is_err() {
            // The client is gone or stuck: the final response will find out.
            sink.take();
        }
    });
}

/// The head as Echo sends it: `HTTP/1.1 <code> <reason>`, the origin's end-to-end fields;
/// None for a status not forwarded or a head that does not parse.
fn rewrite(head: &[u8]) -> Option<Vec<u8>> {
    let mut slots = [httparse::EMPTY_HEADER; 64];
    let mut resp = httparse::Response::new(&mut slots);
    let httparse::Status::Complete(_) = resp.parse(head).ok()? else {
        return None;
    };
    let code = resp.code?;
    if !(102..200).contains(&code) {
        return None;
    }
    let mut fields: Vec<(String, Vec<u8>)> = resp
        .headers
        .iter()
        .map(|h| (h.name.to_ascii_lowercase(), h.value.to_vec()))
        .collect();
    headers::strip_hop_by_hop(&mut fields);
    let mut out = format!("HTTP/1.1 {code} {}\r\n", resp.reason.unwrap_or("")).into_bytes();
    for (name, value) in fields {
        out.extend_from_slice(name.as_bytes());
        out.extend_from_slice(b": ");
        out.extend_from_slice(&value);
        out.extend_from_slice(b"\r\n");
    }
    out.extend_from_slice(b"\r\n");
    Some(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_forwardable_interim_heads_are_rewritten() {
        let hints = b"HTTP/1.0 103 Early Hints\r\nLink: </a.css>; rel=preload\r\nConnection: x\r\nX: y\r\n\r\n";
        let out = rewrite(hints).expect("103 is forwarded");
        assert_eq!(
            String::from_utf8(out).unwrap(),
            "HTTP/1.1 103 Early Hints\r\nlink: </a.css>; rel=preload\r\n\r\n"
        );
        assert!(rewrite(b"HTTP/1.1 100 Continue\r\n\r\n").is_none());
        assert!(rewrite(b"HTTP/1.1 101 Switching Protocols\r\n\r\n").is_none());
        assert!(rewrite(b"HTTP/1.1 200 OK\r\n\r\n").is_none());
        assert!(rewrite(b"HTTP/1.1 102 Processing\r\n\r\n").is_some());
        assert!(rewrite(b"garbage\r\n\r\n").is_none());
        assert!(rewrite(b"HTTP/1.1 103 Early").is_none());
        // Without a guard nothing happens.
        deliver(hints);
    }
}
