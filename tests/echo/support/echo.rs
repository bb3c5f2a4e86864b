//! Starts a real Echo (the library, in this process) on a free port in front of a
//! test origin, and stops it on drop.

use std::net::{SocketAddr, TcpListener};

use echo::config::Config;

pub struct EchoUnderTest {
    pub echo: echo::Echo,
    pub addr: SocketAddr,
    pub admin: Option<SocketAddr>,
}

/// The config tests start from: the shipped defaults with small, test-friendly limits
/// and timeouts, proxying to `origin_url`. `extra` is appended TOML (section keys).
pub fn config(origin_url: &str, extra: &str) -> Config {
    let text = format!(
        "[origin]\nurl = \"{origin_url}\"\nconnect_timeout_ms = 1000\nresponse_timeout_ms = 2000\nread_timeout_ms = 2000\n{extra}"
    );
    Config::parse(&text).unwrap_or_else(|e| panic!("test config invalid: {e}\n{text}"))
}

impl EchoUnderTest {
    /// Echo with the default test config in front of `origin_url`.
    pub fn start(origin_url: &str) -> EchoUnderTest {
        EchoUnderTest::with_config(config(origin_url, ""))
    }

    pub fn with_config(cfg: Config) -> EchoUnderTest {
        let listener = TcpListener::bind("127.0.0.1:0").expect("bind proxy");
        let addr = listener.local_addr().expect("proxy addr");
        let (admin_listener, admin) = match cfg.admin {
            Some(_) => {
                let l = TcpListener::bind("127.0.0.1:0").expect("bind admin");
                let a = l.local_addr().expect("admin addr");
                (Some(l), Some(a))
            }
            None => (None, None),
        };
        let echo = echo::start_on(&cfg, listener, admin_listener).expect("start echo");
        EchoUnderTest { echo, addr, admin }
    }
}
