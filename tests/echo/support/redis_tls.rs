//! TLS for the redis-server fixture: a throwaway CA and a server certificate for
//! 127.0.0.1 (rcgen), written as PEM files a TLS-only `redis-server` starts with, and a
//! minimal RESP client over rustls that verifies the server against that CA.
//!
//! Why a hand-made client, now that the `redis` crate (and with it the fixture) speaks
//! TLS through `tls-rustls`: a test of Echo's TLS reads Redis back over a TLS stack of
//! its own, not the one Echo uses. It speaks RESP2 requests and reads the five RESP2
//! reply types, nothing more.
//!
//! Kept apart from `redis.rs`, which the benches include and which may use only std
//! and the `redis` crate. Every read and write here has a timeout.

use std::io::{BufRead, BufReader, Write};
use std::net::TcpStream;
use std::sync::Arc;
use std::time::Duration;

use super::redis::{RedisServer, TlsFiles};
use super::TempDir;

/// A CA and a server certificate for `127.0.0.1` and `localhost` signed by it, as PEM
/// files in a temp dir (removed on drop: keep it alive as long as the servers).
pub struct TestPki {
    pub files: TlsFiles,
    ca_der: rustls::pki_types::CertificateDer<'static>,
    _dir: TempDir,
}

impl TestPki {
    pub fn new() -> TestPki {
        use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, DnType, IsCa, KeyPair};
        // Distinct subject names: OpenSSL (redis-server, when a TLS replica checks its
        // master) takes a leaf whose subject equals its issuer's for self-signed.
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("CA params");
        ca_params
            .distinguished_name
            .push(DnType::CommonName, "Echo test CA");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().expect("CA key"))
            .expect("self-signed CA");
        let key = KeyPair::generate().expect("server key");
        let mut params = CertificateParams::new(vec!["127.0.0.1".to_string(), "localhost".into()])
            .expect("server params");
        params
            .distinguished_name
            .push(DnType::CommonName, "127.0.0.1");
        let cert = params.signed_by(&key, &ca).expect("server certificate");
        let dir = TempDir::new("redis-tls");
        let files = TlsFiles {
            cert: dir.file("server.pem", &cert.pem()),
            key: dir.file("server.key", &key.serialize_pem()),
            ca: dir.file("ca.pem", &ca.pem()),
        };
        TestPki {
            files,
            ca_der: ca.der().clone(),
            _dir: dir,
        }
    }

    /// A TLS-only master (`port 0`, `tls-port`) with this certificate.
    pub fn master(&self) -> RedisServer {
        RedisServer::builder().tls(self.files.clone()).start()
    }

    /// A TLS-only replica of a TLS `master`, replicating over TLS; returned once synced.
    pub fn replica_of(&self, master: &RedisServer) -> RedisServer {
        RedisServer::builder()
            .tls(self.files.clone())
            .replica_of(master)
            .start()
    }

    /// A client that trusts only this CA.
    fn client_config(&self) -> Arc<rustls::ClientConfig> {
        let mut roots = rustls::RootCertStore::empty();
        roots.add(self.ca_der.clone()).expect("CA into root store");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("TLS versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Arc::new(config)
    }
}

/// One RESP2 reply.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Reply {
    Status(String),
    Error(String),
    Integer(i64),
    Bulk(Option<Vec<u8>>),
    Array(Option<Vec<Reply>>),
}

impl Reply {
    /// Status or bulk reply as text (`None` for anything else).
    pub fn text(&self) -> Option<String> {
        match self {
            Reply::Status(s) => Some(s.clone()),
            Reply::Bulk(Some(b)) => Some(String::from_utf8_lossy(b).into_owned()),
            _ => None,
        }
    }
}

type TlsStream = rustls::StreamOwned<rustls::ClientConnection, TcpStream>;

/// A RESP connection over TLS to 127.0.0.1, the server verified against the test CA.
pub struct TlsClient {
    stream: BufReader<TlsStream>,
}

impl TlsClient {
    /// Connects and completes the TLS handshake (server certificate checked for
    /// 127.0.0.1); reads and writes time out after 5 s.
    pub fn connect(pki: &TestPki, port: u16) -> std::io::Result<TlsClient> {
        let tcp = TcpStream::connect(("127.0.0.1", port))?;
        tcp.set_read_timeout(Some(Duration::from_secs(5)))?;
        tcp.set_write_timeout(Some(Duration::from_secs(5)))?;
        let name = rustls::pki_types::ServerName::try_from("127.0.0.1")
            .expect("127.0.0.1 as a server name");
        let conn = rustls::ClientConnection::new(pki.client_config(), name)
            .map_err(std::io::Error::other)?;
        let mut tls = rustls::StreamOwned::new(conn, tcp);
        // Drive the handshake now, so a refused certificate fails here, not on a command.
        while tls.conn.is_handshaking() {
            tls.conn.complete_io(&mut tls.sock)?;
        }
        Ok(TlsClient {
            stream: BufReader::new(tls),
        })
    }

    /// Sends one command and reads its reply (an error reply is `Ok(Reply::Error)`).
    pub fn command(&mut self, args: &[&str]) -> std::io::Result<Reply> {
        let mut request = format!("*{}\r\n", args.len()).into_bytes();
        for arg in args {
            request.extend_from_slice(format!("${}\r\n", arg.len()).as_bytes());
            request.extend_from_slice(arg.as_bytes());
            request.extend_from_slice(b"\r\n");
        }
        let stream = self.stream.get_mut();
        stream.write_all(&request)?;
        stream.flush()?;
        read_reply(&mut self.stream)
    }

    /// A command whose reply is a status or bulk string; panics on anything else.
    pub fn text(&mut self, args: &[&str]) -> String {
        let reply = self
            .command(args)
            .unwrap_or_else(|e| panic!("{args:?} over TLS: {e}"));
        reply
            .text()
            .unwrap_or_else(|| panic!("{args:?} over TLS answered {reply:?}"))
    }
}

fn read_line(reader: &mut impl BufRead) -> std::io::Result<String> {
    let mut line = String::new();
    reader.read_line(&mut line)?;
    if !line.ends_with("\r\n") {
        return Err(std::io::Error::new(
            std::io::ErrorKind::UnexpectedEof,
            format!("RESP line cut short: {line:?}"),
        ));
    }
    line.truncate(line.len() - 2);
    Ok(line)
}

fn invalid(what: String) -> std::io::Error {
    std::io::Error::new(std::io::ErrorKind::InvalidData, what)
}

fn read_reply(reader: &mut impl BufRead) -> std::io::Result<Reply> {
    let line = read_line(reader)?;
    let (kind, rest) = line.split_at(line.len().min(1));
    let number = || {
        rest.parse::<i64>()
            .map_err(|_| invalid(format!("bad RESP number in {line:?}")))
    };
    Ok(match kind {
        "+" => Reply::Status(rest.to_string()),
        "-" => Reply::Error(rest.to_string()),
        ":" => Reply::Integer(number()?),
        "$" => match usize::try_from(number()?) {
            Err(_) => Reply::Bulk(None),
            Ok(len) => {
                let mut body = vec![0; len + 2];
                reader.read_exact(&mut body)?;
                body.truncate(len);
                Reply::Bulk(Some(body))
            }
        },
        "*" => match usize::try_from(number()?) {
            Err(_) => Reply::Array(None),
            Ok(len) => Reply::Array(Some(
                (0..len)
                    .map(|_| read_reply(reader))
                    .collect::<std::io::Result<_>>()?,
            )),
        },
        _ => return Err(invalid(format!("unknown RESP reply {line:?}"))),
    })
}
