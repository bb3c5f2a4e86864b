//! Where the master and the replicas are now ([`Servers`]): listed in the config, or
//! discovered from Sentinel and followed through failovers.
//!
//! With Sentinel a watcher thread asks the sentinels for the master
//! (`SENTINEL get-master-addr-by-name`) and its replicas (`SENTINEL replicas`), checks
//! with `ROLE` that the master is one, and publishes the result; it looks again when a
//! sentinel announces `+switch-master` (it subscribes to one sentinel at a time), when
//! the store saw a sign that the master moved (a READONLY or MASTERDOWN answer, a master
//! that cannot be reached: [`Topology::suspect`]), and every few seconds in any case. The
//! crate's own Sentinel client connects and reads without timeouts, so a sentinel that
//! hangs would hang it: these few commands are sent here, each bounded by the
//! `[redis]` timeouts.
//!
//! Invariants: readers take the current [`Servers`] (an `Arc`) and keep it for one
//! operation, so a change never tears one; an endpoint whose address and role stay is
//! kept (with its pool) across changes; with Sentinel, a master is published only after
//! it answered `ROLE` as master; nothing here blocks a request (discovery runs on the
//! watcher thread); the thread stops when the store is dropped.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use crossbeam_channel::{RecvTimeoutError, Sender};
use log::{debug, info, warn};

use super::endpoint::{address, Endpoint};
use crate::config::{RedisConfig, RedisServers};
use crate::store::StoreError;

/// How often the watcher asks the sentinels even when nothing happened (new replicas,
/// a missed announcement).
const SENTINEL_POLL: Duration = Duration::from_secs(5);
/// How long the watcher's subscription waits for a message before it looks up (to
/// notice a request to look again, or the store dropped).
const WATCH_TICK: Duration = Duration::from_millis(100);
/// At most one warning about unreachable sentinels this often.
const WARN_EVERY: Duration = Duration::from_secs(10);

/// The servers as they are now.
pub(super) struct Servers {
    /// None while no master is known (the sentinels could not be asked yet).
    pub(super) master: Option<Arc<Endpoint>>,
    pub(super) replicas: Vec<Arc<Endpoint>>,
}

impl Servers {
    /// The master, or why there is none.
    pub(super) fn master(&self) -> Result<&Arc<Endpoint>, StoreError> {
        self.master.as_ref().ok_or_else(|| StoreError::Unavailable {
            server: "redis master".into(),
            detail: "not known yet: no sentinel has named it".into(),
        })
    }

    /// Every server: the master first.
    pub(super) fn all(&self) -> impl Iterator<Item = &Arc<Endpoint>> {
        self.master.iter().chain(self.replicas.iter())
    }
}

/// Where the servers are, and (with Sentinel) the thread that follows them.
pub(super) struct Topology {
    current: RwLock<Arc<Servers>>,
    /// Bumped whenever the master changes (the fill subscriber follows it).
    master_version: AtomicU64,
    /// Asks the watcher to look again now (Sentinel only).
    recheck: Option<Sender<()>>,
    /// Dropped with the topology: ends the watcher.
    _stop: Option<Sender<()>>,
}

impl Topology {
    /// The servers of `cfg`: listed ones at once; with Sentinel, a watcher thread that
    /// finds them (the store starts without a master if no sentinel answers yet).
    pub(super) fn start(cfg: &RedisConfig) -> Result<Arc<Topology>, StoreError> {
        match &cfg.servers {
            RedisServers::Listed { master, replicas } => {
                let servers = Servers {
                    master: Some(Arc::new(Endpoint::new(
                        client_for_url(master, cfg)?,
                        "master",
                        cfg,
                    ))),
                    replicas: replicas
                        .iter()
                        .map(|url| {
                            Ok(Arc::new(Endpoint::new(
                                client_for_url(url, cfg)?,
                                "replica",
                                cfg,
                            )))
                        })
                        .collect::<Result<_, StoreError>>()?,
                };
                Ok(Arc::new(Topology {
                    current: RwLock::new(Arc::new(servers)),
                    master_version: AtomicU64::new(1),
                    recheck: None,
                    _stop: None,
                }))
            }
            RedisServers::Sentinel {
                sentinels,
                master_name,
            } => {
                let sentinels = sentinels
                    .iter()
                    .map(|url| client_for_url(url, cfg))
                    .collect::<Result<Vec<_>, _>>()?;
                let (recheck, rechecks) = crossbeam_channel::bounded(1);
                let (stop, stopped) = crossbeam_channel::bounded::<()>(0);
                let topology = Arc::new(Topology {
                    current: RwLock::new(Arc::new(Servers {
                        master: None,
                        replicas: Vec::new(),
                    })),
                    master_version: AtomicU64::new(0),
                    recheck: Some(recheck),
                    _stop: Some(stop),
                });
                let watcher = Watcher {
                    topology: Arc::downgrade(&topology),
                    sentinels,
                    master_name: master_name.clone(),
                    cfg: cfg.clone(),
                    rechecks,
                    stopped,
                };
                // The first look happens here, so a store whose sentinels answer starts
                // with its master known.
                watcher.look();
                std::thread::Builder::new()
                    .name("echo-redis-sentinel".into())
                    .spawn(move || watcher.run())
                    .map_err(|e| {
                        StoreError::Setup(format!("cannot start the sentinel watcher: {e}"))
                    })?;
                Ok(topology)
            }
        }
    }

    /// The servers now.
    pub(super) fn servers(&self) -> Arc<Servers> {
        // Replacing is one assignment: a panicking writer cannot leave it half done.
        Arc::clone(&self.current.read().unwrap_or_else(|e| e.into_inner()))
    }

    /// Changes whenever the master does.
    pub(super) fn master_version(&self) -> u64 {
        self.master_version.load(Ordering::Acquire)
    }

    /// The store saw `e` from the master: if it says the master moved (or is gone), the
    /// watcher looks again at once. Never blocks.
    pub(super) fn suspect(&self, e: &StoreError) {
        if let Some(recheck) = &self.recheck {
            if matches!(
                e,
                StoreError::NotMaster { .. }
                    | StoreError::Unavailable { .. }
                    | StoreError::Timeout { .. }
                    | StoreError::CircuitOpen { .. }
            ) {
                let _ = recheck.try_send(());
            }
        }
    }

    /// Publishes what the sentinels said: endpoints that stay (same address and role)
    /// keep their pools.
    fn publish(&self, master: redis::Client, replicas: Vec<redis::Client>, cfg: &RedisConfig) {
        let old = self.servers();
        let keep = |client: redis::Client, role: &'static str| -> Arc<Endpoint> {
            let name = address(&client);
            old.all()
                .find(|e| e.name == name && e.role() == role)
                .map(Arc::clone)
                .unwrap_or_else(|| Arc::new(Endpoint::new(client, role, cfg)))
        };
        let master = keep(master, "master");
        let replicas: Vec<Arc<Endpoint>> =
            replicas.into_iter().map(|c| keep(c, "replica")).collect();
        let master_moved = old.master.as_ref().is_none_or(|m| m.name != master.name);
        let replicas_changed = old.replicas.len() != replicas.len()
            || old
                .replicas
                .iter()
                .zip(&replicas)
                .any(|(a, b)| a.name != b.name);
        if !master_moved && !replicas_changed {
            return;
        }
        if master_moved {
            info!(
                "redis: the master is now {} (replicas: {})",
                master.name,
                names(&replicas)
            );
        } else {
            info!("redis: replicas now {}", names(&replicas));
        }
        *self.current.write().unwrap_or_else(|e| e.into_inner()) = Arc::new(Servers {
            master: Some(master),
            replicas,
        });
        if master_moved {
            self.master_version.fetch_add(1, Ordering::AcqRel);
        }
    }
}

fn names(endpoints: &[Arc<Endpoint>]) -> String {
    if endpoints.is_empty() {
        return "none".into();
    }
    endpoints
        .iter()
        .map(|e| e.name.as_str())
        .collect::<Vec<_>>()
        .join(", ")
}

/// A client for a listed URL; `redis.ca_file` is trusted for `rediss://` when set.
pub(super) fn client_for_url(url: &str, cfg: &RedisConfig) -> Result<redis::Client, StoreError> {
    let bad = |e: redis::RedisError| StoreError::Setup(format!("bad redis URL: {e}"));
    match (&cfg.ca_file, url.starts_with("rediss://")) {
        (Some(ca), true) => redis::Client::build_with_tls(url, certificates(ca)?).map_err(bad),
        _ => redis::Client::open(url).map_err(bad),
    }
}

/// A client for a server Sentinel named: `redis.username`, `password` and `tls` apply
/// (its address carries no credentials).
fn client_for_node(host: &str, port: u16, cfg: &RedisConfig) -> Result<redis::Client, StoreError> {
    let bad = |e: redis::RedisError| StoreError::Setup(format!("bad address {host}:{port}: {e}"));
    let addr = if cfg.tls {
        redis::ConnectionAddr::TcpTls {
            host: host.to_string(),
            port,
            insecure: false,
            tls_params: None,
        }
    } else {
        redis::ConnectionAddr::Tcp(host.to_string(), port)
    };
    let mut settings = redis::RedisConnectionInfo::default();
    if let Some(user) = &cfg.username {
        settings = settings.set_username(user);
    }
    if let Some(password) = &cfg.password {
        settings = settings.set_password(password);
    }
    let info = redis::IntoConnectionInfo::into_connection_info(addr)
        .map_err(bad)?
        .set_redis_settings(settings);
    match (&cfg.ca_file, cfg.tls) {
        (Some(ca), true) => redis::Client::build_with_tls(info, certificates(ca)?).map_err(bad),
        _ => redis::Client::open(info).map_err(bad),
    }
}

fn certificates(ca: &std::path::Path) -> Result<redis::TlsCertificates, StoreError> {
    let root_cert = std::fs::read(ca)
        .map_err(|e| StoreError::Setup(format!("redis.ca_file {}: {e}", ca.display())))?;
    Ok(redis::TlsCertificates {
        client_tls: None,
        root_cert: Some(root_cert),
    })
}

/// The Sentinel side: asks the sentinels where the servers are, and follows them.
struct Watcher {
    topology: std::sync::Weak<Topology>,
    sentinels: Vec<redis::Client>,
    master_name: String,
    cfg: RedisConfig,
    rechecks: crossbeam_channel::Receiver<()>,
    stopped: crossbeam_channel::Receiver<()>,
}

impl Watcher {
    fn run(self) {
        let mut last_warning: Option<Instant> = None;
        let mut next = 0usize;
        loop {
            // Listens on one sentinel at a time for +switch-master, until it fails or
            // the store is dropped; then the next sentinel.
            let sentinel = &self.sentinels[next % self.sentinels.len()];
            next += 1;
            match self.watch(sentinel) {
                Ok(()) => return,
                Err(e) => {
                    if last_warning.is_none_or(|t| t.elapsed() >= WARN_EVERY) {
                        warn!(
                            "redis sentinel {}: {e}; trying the next sentinel",
                            address(sentinel)
                        );
                        last_warning = Some(Instant::now());
                    }
                }
            }
            if !matches!(
                self.stopped.recv_timeout(WATCH_TICK),
                Err(RecvTimeoutError::Timeout)
            ) {
                return;
            }
            self.look();
        }
    }

    /// Subscribes to `+switch-master` on `sentinel` and looks again on every
    /// announcement, request or poll. Ok when the store was dropped.
    fn watch(&self, sentinel: &redis::Client) -> redis::RedisResult<()> {
        let mut conn = sentinel.get_connection_with_timeout(self.cfg.connect_timeout)?;
        conn.set_read_timeout(Some(WATCH_TICK))?;
        conn.set_write_timeout(Some(self.cfg.write_timeout))?;
        let mut pubsub = conn.as_pubsub();
        pubsub.subscribe("+switch-master")?;
        // Anything that happened while this node was not listening is found now.
        self.look();
        let mut last_look = Instant::now();
        loop {
            if self.topology.upgrade().is_none()
                || !matches!(
                    self.stopped.try_recv(),
                    Err(crossbeam_channel::TryRecvError::Empty)
                )
            {
                return Ok(());
            }
            let mut look = last_look.elapsed() >= SENTINEL_POLL || self.rechecks.try_recv().is_ok();
            match pubsub.get_message() {
                Ok(message) => {
                    let text: String = message.get_payload().unwrap_or_default();
                    // `<name> <old ip> <old port> <new ip> <new port>`
                    if text.split(' ').next() == Some(self.master_name.as_str()) {
                        debug!(
                            "redis sentinel {}: +switch-master {text}",
                            address(sentinel)
                        );
                        look = true;
                    }
                }
                Err(e) if e.is_timeout() => {}
                Err(e) => return Err(e),
            }
            if look {
                self.look();
                last_look = Instant::now();
            }
        }
    }

    /// Asks the sentinels (each in turn until one answers) and publishes what it said.
    fn look(&self) {
        let Some(topology) = self.topology.upgrade() else {
            return;
        };
        for sentinel in &self.sentinels {
            match self.ask(sentinel) {
                Ok((master, replicas)) => return topology.publish(master, replicas, &self.cfg),
                Err(e) => debug!("redis sentinel {}: {e}", address(sentinel)),
            }
        }
    }

    /// One sentinel's view: the master (checked with ROLE) and the replicas that are up
    /// and linked to it.
    fn ask(&self, sentinel: &redis::Client) -> Result<(redis::Client, Vec<redis::Client>), String> {
        let mut conn = sentinel
            .get_connection_with_timeout(self.cfg.connect_timeout)
            .map_err(|e| e.to_string())?;
        conn.set_read_timeout(Some(self.cfg.read_timeout))
            .and_then(|()| conn.set_write_timeout(Some(self.cfg.write_timeout)))
            .map_err(|e| e.to_string())?;
        let (host, port): (String, u16) = redis::cmd("SENTINEL")
            .arg("get-master-addr-by-name")
            .arg(&self.master_name)
            .query::<Option<(String, u16)>>(&mut conn)
            .map_err(|e| e.to_string())?
            .ok_or_else(|| format!("it monitors no master named {:?}", self.master_name))?;
        let master = client_for_node(&host, port, &self.cfg).map_err(|e| e.to_string())?;
        // The master must say it is one (a sentinel may lag behind a failover).
        let mut m = master
            .get_connection_with_timeout(self.cfg.connect_timeout)
            .map_err(|e| format!("master {host}:{port}: {e}"))?;
        m.set_read_timeout(Some(self.cfg.read_timeout))
            .map_err(|e| e.to_string())?;
        let role: redis::Value = redis::cmd("ROLE")
            .query(&mut m)
            .map_err(|e| format!("master {host}:{port}: {e}"))?;
        if !is_master_role(&role) {
            return Err(format!(
                "{host}:{port} does not answer ROLE as master (yet)"
            ));
        }
        let replicas: Vec<HashMap<String, String>> = redis::cmd("SENTINEL")
            .arg("replicas")
            .arg(&self.master_name)
            .query(&mut conn)
            .map_err(|e| e.to_string())?;
        let mut clients = Vec::new();
        for r in replicas {
            let flags = r.get("flags").map(String::as_str).unwrap_or("");
            let down = flags
                .split(',')
                .any(|f| matches!(f, "s_down" | "o_down" | "disconnected"));
            let linked = r.get("master-link-status").map(String::as_str) == Some("ok");
            let (Some(ip), Some(Ok(port))) = (r.get("ip"), r.get("port").map(|p| p.parse::<u16>()))
            else {
                continue;
            };
            if down || !linked {
                continue;
            }
            clients.push(client_for_node(ip, port, &self.cfg).map_err(|e| e.to_string())?);
        }
        clients.sort_by_key(address);
        Ok((master, clients))
    }
}

/// Is a `ROLE` answer a master's (`["master", offset, [replicas]]`)?
fn is_master_role(role: &redis::Value) -> bool {
    match role {
        redis::Value::Array(items) => matches!(
            items.first(),
            Some(redis::Value::BulkString(b)) if b == b"master"
        ),
        _ => false,
    }
}
