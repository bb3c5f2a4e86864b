//! One server of a passthrough service: its own `ureq` agent (so its own keep-alive
//! connections), configured for a proxy. Choosing among servers is `upstream`'s work.
//!
//! ureq's defaults are wrong for a proxy and are all turned off here: no redirects
//! (3xx pass through), no proxy from the environment, no decompression (the crate is
//! built without it), 4xx/5xx returned as responses, no automatic User-Agent or Accept,
//! and every phase has a timeout from config.
//!
//! What ureq does not do for a proxy is done at the socket, by wrapping its transport
//! (`transport`).
//!
//! Invariants: ureq types stay in this module and `transport`; the rest of Echo sees
//! [`OriginResponse`] and [`OriginError`]. An error says which phase failed, so the proxy can pick 502 or 504.

use std::io::{self, Read};

use ureq::http;
use ureq::unversioned::resolver::{DefaultResolver, ResolvedSocketAddrs, Resolver};
use ureq::unversioned::transport::NextTimeout;
use ureq::unversioned::transport::{Connector, RustlsConnector, TcpConnector};

use super::error::{OriginError, Phase};
use super::transport::Guard;
use crate::config::{OriginConfig, ServerAddr};
use crate::http::Headers;

/// A request to forward.
pub struct OriginRequest<'a> {
    pub method: &'a str,
    /// Origin-form target, `/path?query`.
    pub target: &'a str,
    /// The client's Host: what routing looks at, and what is sent as Host when the
    /// service preserves it.
    pub host: &'a str,
    /// End-to-end fields to send, Host excluded (the server chosen decides it).
    pub headers: &'a Headers,
    /// The body and its length when known (None: sent chunked).
    pub body: Option<(&'a mut dyn Read, Option<u64>)>,
}

/// The head of the origin's answer, and its body as a stream.
pub struct OriginResponse {
    pub status: u16,
    /// As received, repeats kept in order (names lower-case).
    pub headers: Headers,
    /// The body length when the origin framed it with Content-Length.
    pub content_length: Option<u64>,
    pub body: Box<dyn Read + Send>,
    /// The server that answered (`scheme://authority`).
    pub server: std::sync::Arc<str>,
}

/// A client for one server.
pub struct Origin {
    agent: ureq::Agent,
    base: String,
    /// `scheme://authority`: the server's name in logs, `/health` and metrics.
    pub name: std::sync::Arc<str>,
    /// The Host sent to it (unless the service preserves the client's).
    pub authority: String,
}

impl Origin {
    /// `roots`: the trust anchors for https (None: the system's verifier).
    pub fn new(
        addr: &ServerAddr,
        cfg: &OriginConfig,
        roots: Option<&ureq::tls::RootCerts>,
    ) -> Origin {
        let tls = ureq::tls::TlsConfig::builder()
            .root_certs(
                roots
                    .cloned()
                    .unwrap_or(ureq::tls::RootCerts::PlatformVerifier),
            )
            .build();
        let config = ureq::Agent::config_builder()
            .http_status_as_error(false)
            .max_redirects(0)
            .proxy(None)
            .user_agent(ureq::config::AutoHeaderValue::None)
            .accept(ureq::config::AutoHeaderValue::None)
            .accept_encoding(ureq::config::AutoHeaderValue::None)
            .allow_non_standard_methods(true)
            .no_delay(true)
            .tls_config(tls)
            .timeout_global(cfg.total_timeout)
            .timeout_connect(Some(cfg.connect_timeout))
            .timeout_send_request(Some(cfg.send_timeout))
            .timeout_send_body(None)
            .timeout_per_write(Some(cfg.send_timeout))
            .timeout_recv_response(Some(cfg.response_timeout))
            .timeout_per_read(Some(cfg.read_timeout))
            .max_idle_connections(cfg.max_idle_connections)
            .max_idle_connections_per_host(cfg.max_idle_connections)
            .build();
        let base = addr.base_url();
        let connector =
            ().chain(TcpConnector::default())
                .chain(RustlsConnector::default())
                .chain(Guard);
        Origin {
            agent: ureq::Agent::with_parts(config, connector, Lookup(DefaultResolver::default())),
            name: base.as_str().into(),
            base,
            authority: addr.authority.clone(),
        }
    }

    /// A probe: GET `path` within `timeout`, body read (up to 64 KiB) and dropped.
    /// Passes on a 2xx or 3xx; the error says why it failed.
    pub fn probe(&self, path: &str, timeout: std::time::Duration) -> Result<u16, String> {
        let request = http::Request::get(format!("{}{}", self.base, path))
            .header("host", self.authority.as_str())
            .header("user-agent", "echo-health-check")
            .body(())
            .map_err(|e| e.to_string())?;
        let request = self
            .agent
            .configure_request(request)
            .timeout_global(Some(timeout))
            .build();
        let response = self
            .agent
            .run(request)
            .map_err(|e| map_error(e).to_string())?;
        let status = response.status().as_u16();
        let mut sink = Vec::new();
        let _ = response
            .into_body()
            .into_reader()
            .take(64 * 1024)
            .read_to_end(&mut sink);
        if (200..400).contains(&status) {
            Ok(status)
        } else {
            Err(format!("status {status}"))
        }
    }

    /// Sends one request and returns the response head with its body stream.
    /// `host`: the Host field to send.
    pub fn send(&self, req: OriginRequest<'_>, host: &str) -> Result<OriginResponse, OriginError> {
        let uri = format!("{}{}", self.base, uri_safe(req.target));
        let mut builder = http::Request::builder()
            .method(req.method)
            .uri(uri)
            .version(http::Version::HTTP_11)
            .header("host", host);
        for (name, value) in req.headers {
            builder = builder.header(name.as_str(), value.as_slice());
        }
        let mut client_body_error: Option<io::Error> = None;
        let result = match req.body {
            Some((reader, length)) => {
                if let Some(n) = length {
                    builder = builder.header("content-length", n);
                }
                let mut watched = WatchedReader {
                    inner: reader,
                    error: &mut client_body_error,
                };
                let request = builder
                    .body(ureq::SendBody::from_reader(&mut watched))
                    .map_err(|e| OriginError::Protocol(e.to_string()))?;
                self.agent.run(request)
            }
            None => {
                if matches!(req.method, "POST" | "PUT" | "PATCH") {
                    // Without a length ureq would send these chunked; say "empty".
                    builder = builder.header("content-length", 0);
                }
                let request = builder
                    .body(ureq::SendBody::none())
                    .map_err(|e| OriginError::Protocol(e.to_string()))?;
                self.agent.run(request)
            }
        };
        if let Some(e) = client_body_error {
            return Err(OriginError::ClientBody(e));
        }
        let response = result.map_err(map_error)?;
        let (parts, body) = response.into_parts();
        let headers = parts
            .headers
            .iter()
            .map(|(n, v)| (n.as_str().to_string(), v.as_bytes().to_vec()))
            .collect();
        Ok(OriginResponse {
            status: parts.status.as_u16(),
            headers,
            content_length: body.content_length(),
            body: Box::new(BodyStream(body.into_reader())),
            server: std::sync::Arc::clone(&self.name),
        })
    }
}

/// The target with the bytes the URI type refuses percent-encoded (`"`, `<`, `>`,
/// `\`, `^`, `` ` ``, `{`, `|`, `}` and non-ASCII: RFC 3986 does not allow them raw, but
/// clients send them and Echo's parser accepts them, as nginx does). Encoding them
/// keeps their meaning for the origin instead of failing the request.
fn uri_safe(target: &str) -> std::borrow::Cow<'_, str> {
    let refused = |b: u8| !b.is_ascii() || b"\"<>\\^`{|}".contains(&b);
    if !target.bytes().any(refused) {
        return std::borrow::Cow::Borrowed(target);
    }
    let mut out = String::with_capacity(target.len() + 16);
    for b in target.bytes() {
        if refused(b) {
            out.push_str(&format!("%{b:02X}"));
        } else {
            out.push(char::from(b));
        }
    }
    std::borrow::Cow::Owned(out)
}

/// Remembers an error from the client's body, so it is not blamed on the origin.
struct WatchedReader<'a, 'b> {
    inner: &'a mut dyn Read,
    error: &'b mut Option<io::Error>,
}

impl Read for WatchedReader<'_, '_> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.inner.read(buf).map_err(|e| {
            let copy = io::Error::new(e.kind(), e.to_string());
            *self.error = Some(e);
            copy
        })
    }
}

/// The origin body; read errors keep their phase so the proxy can log them.
struct BodyStream(ureq::BodyReader<'static>);

impl Read for BodyStream {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        self.0.read(buf)
    }
}

/// The system resolver, whose every failure is a host not found: ureq passes a lookup's
/// own error (`getaddrinfo`: "Name or service not known", a DNS server that does not
/// answer) on as an I/O error, which would count as the origin failing the protocol,
/// never as a server that cannot be reached, and so never take it out of rotation.
#[derive(Debug)]
struct Lookup(DefaultResolver);

impl Resolver for Lookup {
    fn resolve(
        &self,
        uri: &http::Uri,
        config: &ureq::config::Config,
        timeout: NextTimeout,
    ) -> Result<ResolvedSocketAddrs, ureq::Error> {
        match self.0.resolve(uri, config, timeout) {
            Err(ureq::Error::Io(e)) => {
                log::debug!("cannot resolve {uri}: {e}");
                Err(ureq::Error::HostNotFound)
            }
            other => other,
        }
    }
}

fn map_error(e: ureq::Error) -> OriginError {
    match e {
        ureq::Error::Timeout(t) => OriginError::Timeout(match t {
            ureq::Timeout::Connect | ureq::Timeout::Resolve => Phase::Connect,
            ureq::Timeout::SendRequest | ureq::Timeout::SendBody | ureq::Timeout::PerWrite => {
                Phase::Send
            }
            ureq::Timeout::RecvResponse => Phase::Response,
            ureq::Timeout::RecvBody | ureq::Timeout::PerRead => Phase::Read,
            _ => Phase::Total,
        }),
        ureq::Error::ConnectionFailed | ureq::Error::HostNotFound => {
            OriginError::Connect(e.to_string())
        }
        ureq::Error::Io(io) => match io.kind() {
            io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock => {
                OriginError::Timeout(Phase::Read)
            }
            io::ErrorKind::ConnectionRefused
            | io::ErrorKind::AddrNotAvailable
            | io::ErrorKind::HostUnreachable
            | io::ErrorKind::NetworkUnreachable => OriginError::Connect(io.to_string()),
            _ => OriginError::Protocol(io.to_string()),
        },
        other => OriginError::Protocol(other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn targets_the_uri_type_refuses_are_percent_encoded() {
        assert_eq!(uri_safe("/a?b=1"), "/a?b=1");
        assert_eq!(uri_safe("/q=\"x\"|{y}"), "/q=%22x%22%7C%7By%7D");
        assert_eq!(uri_safe("/caf\u{e9}"), "/caf%C3%A9");
        for target in ["/q=\"x\"|{y}^`<>\\", "/caf\u{e9}"] {
            let uri = format!("http://h{}", uri_safe(target));
            assert!(uri.parse::<http::Uri>().is_ok(), "{uri}");
        }
    }
}
