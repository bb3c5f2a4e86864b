//! The PROXY protocol (HAProxy's; v1 text and v2 binary) from trusted balancers: with
//! `server.proxy_protocol`, a connection from an address in `server.trusted_proxies`
//! starts with the header, and the client it names becomes the connection's peer (the
//! access log's client, `X-Forwarded-For`). The parsing is the `ppp` crate's.
//!
//! Invariants: only a trusted peer's header is believed; a trusted peer without a valid
//! header, and an untrusted peer that sends one (a client naming itself), are closed
//! before any request is read; the header is read before the head deadline and within
//! the head buffer's bound.

use std::net::SocketAddr;

use ipnet::IpNet;
use ppp::{v1, v2, HeaderResult, PartialResult};

use crate::http::conn::Conn;

/// What starts a v1 and a v2 header.
const V1_SIGNATURE: &[u8] = b"PROXY ";
const V2_SIGNATURE: &[u8] = b"\r\n\r\n\0\r\nQUIT\n";
/// The longest header read (v1 is at most 107 bytes; v2 addresses take 216 at most,
/// the rest is TLVs Echo does not use).
const MAX_HEADER: usize = 4096;

/// Looks at what a new connection has sent so far: with a trusted balancer's PROXY
/// header complete, makes the client it names the peer. Ok(true): done, the first
/// request follows; Ok(false): more bytes are needed to tell; Err: why the connection
/// is closed (an untrusted peer that sends a header, a malformed or overlong one).
pub(super) fn examine(conn: &mut Conn, trusted: &[IpNet]) -> Result<bool, String> {
    let peer = conn.peer;
    if !trusted.iter().any(|net| net.contains(&peer.ip())) {
        return refuse_header(conn.buffered());
    }
    let parsed = HeaderResult::parse(conn.buffered());
    if parsed.is_incomplete() {
        if conn.buffered().len() >= MAX_HEADER {
            return Err(format!("a PROXY header longer than {MAX_HEADER} bytes"));
        }
        return Ok(false);
    }
    let (len, source) = match parsed {
        HeaderResult::V1(Ok(header)) => (header.header.len(), v1_source(&header)),
        HeaderResult::V2(Ok(header)) => (header.len(), v2_source(&header)),
        HeaderResult::V1(Err(e)) => {
            return Err(format!(
                "no valid PROXY header from a trusted balancer: {e}"
            ))
        }
        HeaderResult::V2(Err(e)) => {
            return Err(format!(
                "no valid PROXY header from a trusted balancer: {e}"
            ))
        }
    };
    conn.consume(len);
    if let Some(source) = source {
        conn.peer = source;
    }
    Ok(true)
}

/// An untrusted peer is a client: served as it is, unless it starts with a PROXY
/// header (it would name any address it likes).
fn refuse_header(got: &[u8]) -> Result<bool, String> {
    let could_be = |signature: &[u8]| {
        let n = got.len().min(signature.len());
        got[..n] == signature[..n]
    };
    let (v1, v2) = (could_be(V1_SIGNATURE), could_be(V2_SIGNATURE));
    if !got.is_empty() && !v1 && !v2 {
        return Ok(true);
    }
    if (v1 && got.len() >= V1_SIGNATURE.len()) || (v2 && got.len() >= V2_SIGNATURE.len()) {
        return Err("a PROXY header from an address not in server.trusted_proxies".into());
    }
    Ok(false)
}

/// The client a v1 header names (None: `UNKNOWN`, keep the balancer's address).
fn v1_source(header: &v1::Header<'_>) -> Option<SocketAddr> {
    match header.addresses {
        v1::Addresses::Tcp4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v1::Addresses::Tcp6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v1::Addresses::Unknown => None,
    }
}

/// The client a v2 header names (None: `LOCAL`, the balancer's own health check, or an
/// address family without one).
fn v2_source(header: &v2::Header<'_>) -> Option<SocketAddr> {
    if header.command == v2::Command::Local {
        return None;
    }
    match header.addresses {
        v2::Addresses::IPv4(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v2::Addresses::IPv6(a) => Some(SocketAddr::from((a.source_address, a.source_port))),
        v2::Addresses::Unspecified | v2::Addresses::Unix(_) => None,
    }
}
