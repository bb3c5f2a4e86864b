//! Passthrough services and their servers: routing, balancing, health and retries.
//!
//! A request goes to the service of the `[[route]]` with the longest `path_prefix` that
//! matches it (a route naming the request's host beats one that names none), or to
//! `[origin]`. Within a service, a server is picked among the healthy ones by round
//! robin or by fewest requests in flight. A server is out of rotation while its active
//! health checks say it is down (`health_check_fails` failed probes take it out,
//! `health_check_passes` good ones put it back), or for `fail_timeout` after
//! `max_fails` consecutive connect failures or timeouts of real requests; when that
//! hold-down ends, one request tries it again (the others keep away until it answers).
//!
//! Invariants: a request is retried on another server only when its connect failed,
//! its method is idempotent and none of its body was read from the client, at most
//! `retries` times and never twice on one server. When no server can be tried the
//! answer is [`OriginError::Unavailable`] at once: dead servers are not hammered.
//! Routing never changes the cache key or what invalidation patterns see.

mod error;
mod origin;
mod pool;
mod transport;

use std::sync::Arc;

use crossbeam_channel::Sender;

use crate::config::{OriginConfig, RouteConfig};
use crate::metrics::Metrics;

pub use error::{OriginError, Phase};
pub use origin::{OriginRequest, OriginResponse};
pub use pool::Pool;

/// Every service, and the routes to them.
pub struct Upstreams {
    default: Pool,
    /// Most specific first: longest prefix, then a named host before none.
    routes: Vec<(Route, Pool)>,
    /// Dropping it (with the `Upstreams`) ends the health-check threads.
    _stop: Sender<()>,
}

struct Route {
    path_prefix: String,
    host: Option<String>,
}

/// One service's health, for `/health`.
#[derive(Debug, Clone)]
pub struct ServiceHealth {
    pub name: String,
    pub servers: Vec<ServerHealth>,
}

#[derive(Debug, Clone)]
pub struct ServerHealth {
    pub server: String,
    pub up: bool,
    /// Why it is out, when it is.
    pub reason: Option<String>,
}

impl Upstreams {
    /// Builds every service and starts the health checks of those that have them.
    /// The services `default` and `routes` name. `previous`: the ones a reload
    /// replaces; a server in both keeps what was known of its health (a server failing
    /// its health checks is not put back in rotation by a reload).
    pub fn new(
        default: &OriginConfig,
        routes: &[RouteConfig],
        metrics: Option<Arc<Metrics>>,
        previous: Option<&Upstreams>,
    ) -> Result<Upstreams, String> {
        let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
        let known = |name: &str| {
            let old = previous?;
            std::iter::once(&old.default)
                .chain(old.routes.iter().map(|(_, p)| p))
                .find_map(|p| p.state_of(name))
        };
        let default = Pool::new(default, metrics.clone(), &stopped, &known)?;
        let mut built = Vec::with_capacity(routes.len());
        for r in routes {
            built.push((
                Route {
                    path_prefix: normalize_path(&r.path_prefix).into_owned(),
                    host: r.host.clone(),
                },
                Pool::new(&r.origin, metrics.clone(), &stopped, &known)?,
            ));
        }
        built.sort_by(|(a, _), (b, _)| {
            b.path_prefix
                .len()
                .cmp(&a.path_prefix.len())
                .then(b.host.is_some().cmp(&a.host.is_some()))
        });
        Ok(Upstreams {
            default,
            routes: built,
            _stop: stop,
        })
    }

    /// The service for a request to `host` (as the client gave it) and `target`.
    /// Prefixes are matched against the normalised path (see [`normalize_path`]), so
    /// `/%62ytes/` and `/x/../bytes/` take the `/bytes/` route and `/bytes/../x` does
    /// not; the target sent upstream is the client's, unchanged.
    pub fn route(&self, host: &str, target: &str) -> &Pool {
        let raw = target.split('?').next().unwrap_or(target);
        let path = normalize_path(raw);
        let host = host_without_port(host);
        self.routes
            .iter()
            .find(|(r, _)| {
                path.starts_with(r.path_prefix.as_str())
                    && r.host
                        .as_deref()
                        .is_none_or(|h| h.eq_ignore_ascii_case(host))
            })
            .map_or(&self.default, |(_, pool)| pool)
    }

    /// Sends `req` to a server of its route's service.
    pub fn send(&self, req: OriginRequest<'_>) -> Result<OriginResponse, OriginError> {
        self.route(req.host, req.target).send(req)
    }

    /// Every service's servers and whether they are in rotation.
    pub fn health(&self) -> Vec<ServiceHealth> {
        std::iter::once(&self.default)
            .chain(self.routes.iter().map(|(_, p)| p))
            .map(Pool::health)
            .collect()
    }
}

/// A path as routing compares it (RFC 3986 §6.2.2): percent-escapes of unreserved
/// characters decoded (`%62` is `b`), other escapes' hex upper-cased, then dot-segments
/// removed (§5.2.4). An origin that decodes or resolves paths itself would otherwise be
/// reached, through another route's service, at a path that route was meant to own.
pub fn normalize_path(path: &str) -> std::borrow::Cow<'_, str> {
    if !path.starts_with('/') || !path.contains(['%', '.']) {
        return std::borrow::Cow::Borrowed(path);
    }
    let bytes = path.as_bytes();
    let mut decoded: Vec<u8> = Vec::with_capacity(path.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| char::from(b).to_digit(16);
        if bytes[i] == b'%' && i + 2 < bytes.len() {
            if let (Some(h), Some(l)) = (hex(bytes[i + 1]), hex(bytes[i + 2])) {
                let c = (h * 16 + l) as u8;
                if c.is_ascii_alphanumeric() || matches!(c, b'-' | b'.' | b'_' | b'~') {
                    decoded.push(c);
                } else {
                    decoded.push(b'%');
                    decoded.push(bytes[i + 1].to_ascii_uppercase());
                    decoded.push(bytes[i + 2].to_ascii_uppercase());
                }
                i += 3;
                continue;
            }
        }
        decoded.push(bytes[i]);
        i += 1;
    }
    // Only ASCII was replaced, by ASCII: still the UTF-8 it was.
    let decoded = String::from_utf8_lossy(&decoded);
    let segments: Vec<&str> = decoded.split('/').skip(1).collect();
    let last = segments.len().saturating_sub(1);
    let mut out: Vec<&str> = Vec::with_capacity(segments.len());
    for (i, segment) in segments.iter().enumerate() {
        match *segment {
            "." => {}
            ".." => {
                out.pop();
            }
            s => out.push(s),
        }
        // A path ending in a dot-segment names a directory: it keeps its final `/`.
        if i == last && matches!(*segment, "." | "..") {
            out.push("");
        }
    }
    std::borrow::Cow::Owned(format!("/{}", out.join("/")))
}

/// `example.com:8080` → `example.com`; `[::1]:80` → `[::1]`.
fn host_without_port(host: &str) -> &str {
    if host.starts_with('[') {
        return host.find(']').map_or(host, |i| &host[..=i]);
    }
    host.split(':').next().unwrap_or(host)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_are_normalised_for_routing() {
        let cases = [
            ("/bytes/1", "/bytes/1"),
            ("/%62ytes/1", "/bytes/1"),
            ("/%7Euser/%2e%2E/x", "/x"),
            ("/bytes/../x", "/x"),
            ("/bytes/./2", "/bytes/2"),
            ("/a/b/..", "/a/"),
            ("/a/.", "/a/"),
            ("/../../a", "/a"),
            ("/a%2fb", "/a%2Fb"),
            ("/a%2F..%2Fb", "/a%2F..%2Fb"),
            ("/%zz/%4", "/%zz/%4"),
            ("/caf\u{e9}", "/caf\u{e9}"),
            ("*", "*"),
        ];
        for (raw, want) in cases {
            assert_eq!(normalize_path(raw), want, "{raw}");
        }
    }

    #[test]
    fn ports_are_not_part_of_the_routed_host() {
        assert_eq!(host_without_port("example.com:8080"), "example.com");
        assert_eq!(host_without_port("example.com"), "example.com");
        assert_eq!(host_without_port("[::1]:80"), "[::1]");
    }
}
