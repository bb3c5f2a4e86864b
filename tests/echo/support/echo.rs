//! Starts a real Echo (the library, in this process) on a free port in front of a
//! test origin, and stops it on drop.

use std::net::{SocketAddr, TcpListener};

use echo::config::Config;

use super::redis::RedisServer;

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

/// Timeouts the Redis failure tests use: failures show in a fraction of a second, and
/// a dead server is skipped after 2 failures for 300 ms.
pub const QUICK_REDIS: &str = "connect_timeout_ms = 200\nread_timeout_ms = 200\n\
     write_timeout_ms = 200\npool_timeout_ms = 200\nbreaker_failures = 2\nbreaker_open_ms = 300\n";

/// `[redis]` for tests of where Redis reads go (which server answers a hit): no local
/// tier, so every hit reaches Redis. The tier has its own tests (`redis_local`).
pub const NO_LOCAL_TIER: &str = "local_cache_max_bytes = 0\n";

/// The `[cache]` and `[redis]` sections for Echo on `master` and `replicas`: `cache`
/// goes under `[cache]` (after `store = "redis"`), `redis` under `[redis]`.
pub fn redis_sections(
    master: &RedisServer,
    replicas: &[&RedisServer],
    cache: &str,
    redis: &str,
) -> String {
    let replicas: Vec<String> = replicas
        .iter()
        .map(|r| format!("\"{}\"", r.url()))
        .collect();
    format!(
        "[cache]\nstore = \"redis\"\n{cache}\n[redis]\nmaster = \"{}\"\nreplicas = [{}]\n{redis}",
        master.url(),
        replicas.join(", ")
    )
}

/// An Echo node on `master` and `replicas` (the Redis store, `QUICK_REDIS` timeouts, a
/// WAIT that gives up on an unreachable replica after 300 ms) with the admin API and
/// `token`, in front of `origin_url`; `redis` is added to `[redis]`.
pub fn redis_node(
    origin_url: &str,
    master: &RedisServer,
    replicas: &[&RedisServer],
    token: &str,
    redis: &str,
) -> EchoUnderTest {
    let redis = format!("{QUICK_REDIS}wait_timeout_ms = 300\n{redis}");
    let text = format!(
        "[admin]\nlisten = \"127.0.0.1:0\"\ntoken = \"{token}\"\n{}",
        redis_sections(master, replicas, "", &redis)
    );
    EchoUnderTest::with_config(config(origin_url, &text))
}

/// Echo on the Redis store (`QUICK_REDIS` timeouts) with no local tier, for tests of
/// which Redis server a hit is read from.
pub fn redis_echo_without_tier(
    origin_url: &str,
    master: &RedisServer,
    replicas: &[&RedisServer],
) -> EchoUnderTest {
    let text = redis_sections(
        master,
        replicas,
        "",
        &format!("{QUICK_REDIS}{NO_LOCAL_TIER}"),
    );
    EchoUnderTest::with_config(config(origin_url, &text))
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
        let echo = echo::start_on(&cfg, vec![listener.into()], admin_listener).expect("start echo");
        EchoUnderTest { echo, addr, admin }
    }
}
