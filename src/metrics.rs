//! Echo's metrics, exposed on the admin listener at `GET /metrics` in the Prometheus /
//! OpenMetrics text format by `prometheus-client` (no hand-formatting).
//!
//! Invariants: label values are lower case; a metric is registered once, here, with its
//! help text; recording never blocks a request for long (atomic counters).

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use prometheus_client::encoding::text::encode;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// A label set: `(name, value)` pairs (for metrics off the hot path).
pub type Labels = Vec<(&'static str, String)>;

/// `echo_requests_total`'s labels: fixed values only, so a client cannot grow the
/// family (unknown methods are `other`), and recording allocates nothing.
#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RequestLabels {
    pub cache_status: &'static str,
    pub method: &'static str,
    pub code: u16,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct CacheStatusLabel {
    pub cache_status: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StoreLabels {
    pub store: &'static str,
    pub op: &'static str,
}

type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// Latency buckets from 50 µs to 10 s: cache hits sit in the first ones, origin
/// fetches in the middle, timeouts in the last.
fn latency_histogram() -> Histogram {
    Histogram::new([
        0.00005, 0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
        1.0, 2.5, 5.0, 10.0,
    ])
}

/// The Redis servers' gauges, by `server` (`host:port`).
pub struct RedisMetrics {
    /// `echo_redis_server_up{server, role}`: 1 while the monitor reaches it.
    pub up: Family<Labels, Gauge>,
    /// `echo_redis_replica_lag_seconds{server}`: how far a replica is behind the master.
    pub lag: Family<Labels, Gauge<f64, AtomicU64>>,
    /// `echo_redis_replica_readable{server}`: 1 while a replica is read from.
    pub readable: Family<Labels, Gauge>,
    /// `echo_redis_degraded{server, reason}`: 1 for each reason a server is degraded.
    pub degraded: Family<Labels, Gauge>,
    /// `echo_redis_used_memory_bytes{server}` and `echo_redis_maxmemory_bytes{server}`.
    pub used_memory: Family<Labels, Gauge>,
    pub maxmemory: Family<Labels, Gauge>,
    /// `echo_redis_evicted_keys{server}`: INFO `evicted_keys` (Redis's own running total).
    pub evicted_keys: Family<Labels, Gauge>,
    /// The local tier in front of Redis: `echo_local_cache_{hits,misses,invalidations,
    /// flushes}_total`, `echo_local_cache_bytes`, `echo_local_cache_entries`, and
    /// `echo_local_cache_on` (1 while it serves).
    pub local_hits: Counter,
    pub local_misses: Counter,
    pub local_invalidations: Counter,
    pub local_flushes: Counter,
    pub local_bytes: Gauge,
    pub local_entries: Gauge,
    pub local_on: Gauge,
}

impl RedisMetrics {
    fn register(r: &mut Registry) -> RedisMetrics {
        let m = RedisMetrics {
            up: Family::default(),
            lag: Family::default(),
            readable: Family::default(),
            degraded: Family::default(),
            used_memory: Family::default(),
            maxmemory: Family::default(),
            evicted_keys: Family::default(),
            local_hits: Counter::default(),
            local_misses: Counter::default(),
            local_invalidations: Counter::default(),
            local_flushes: Counter::default(),
            local_bytes: Gauge::default(),
            local_entries: Gauge::default(),
            local_on: Gauge::default(),
        };
        for (name, help, counter) in [
            (
                "echo_local_cache_hits",
                "Lookups the local tier in front of Redis answered (no round trip)",
                &m.local_hits,
            ),
            (
                "echo_local_cache_misses",
                "Lookups the local tier did not hold (read from Redis)",
                &m.local_misses,
            ),
            (
                "echo_local_cache_invalidations",
                "Keys Redis's invalidation messages named to the local tier",
                &m.local_invalidations,
            ),
            (
                "echo_local_cache_flushes",
                "Times the local tier was emptied (a tracking connection lost or late, FLUSHALL)",
                &m.local_flushes,
            ),
        ] {
            r.register(name, help, counter.clone());
        }
        for (name, help, gauge) in [
            (
                "echo_local_cache_bytes",
                "Bytes the local tier holds",
                &m.local_bytes,
            ),
            (
                "echo_local_cache_entries",
                "Entries (URLs) the local tier holds",
                &m.local_entries,
            ),
            (
                "echo_local_cache_on",
                "Whether the local tier serves (1) or not (0: syncing, or Redis refused tracking)",
                &m.local_on,
            ),
        ] {
            r.register(name, help, gauge.clone());
        }
        r.register(
            "echo_redis_server_up",
            "Whether the Redis monitor reaches a server (1) or not (0), by server and the role Echo uses it as",
            m.up.clone(),
        );
        r.register(
            "echo_redis_replica_lag_seconds",
            "How far a Redis replica is behind its master, in time",
            m.lag.clone(),
        );
        r.register(
            "echo_redis_replica_readable",
            "Whether Echo reads from a Redis replica now (1: reachable, linked, not lagging)",
            m.readable.clone(),
        );
        r.register(
            "echo_redis_degraded",
            "1 for each reason a Redis server is degraded (unreachable, breaker_open, readonly, not_replica, link_down, not_replicating, lagging, out_of_memory, evicting_control_state)",
            m.degraded.clone(),
        );
        r.register(
            "echo_redis_used_memory_bytes",
            "Memory a Redis server uses (INFO used_memory)",
            m.used_memory.clone(),
        );
        r.register(
            "echo_redis_maxmemory_bytes",
            "A Redis server's maxmemory (0: no limit)",
            m.maxmemory.clone(),
        );
        r.register(
            "echo_redis_evicted_keys",
            "Keys a Redis server evicted for maxmemory since it started (INFO evicted_keys)",
            m.evicted_keys.clone(),
        );
        m
    }

    /// Sets the local tier's series from what it reports (its counters are its own).
    pub fn set_local(&self, tier: &crate::store::LocalTierReport) {
        self.local_hits.inner().store(tier.hits, Ordering::Relaxed);
        self.local_misses
            .inner()
            .store(tier.misses, Ordering::Relaxed);
        self.local_invalidations
            .inner()
            .store(tier.invalidations, Ordering::Relaxed);
        self.local_flushes
            .inner()
            .store(tier.flushes, Ordering::Relaxed);
        self.local_bytes
            .set(i64::try_from(tier.bytes).unwrap_or(i64::MAX));
        self.local_entries
            .set(i64::try_from(tier.entries).unwrap_or(i64::MAX));
        self.local_on.set(i64::from(tier.state == "on"));
    }

    /// Sets every gauge from `servers`, dropping those of servers and reasons gone.
    pub fn set(&self, servers: &[crate::store::ServerHealth]) {
        for family in [
            &self.up,
            &self.readable,
            &self.degraded,
            &self.used_memory,
            &self.maxmemory,
            &self.evicted_keys,
        ] {
            family.clear();
        }
        self.lag.clear();
        for s in servers.iter().filter(|s| s.checked) {
            let server = || vec![("server", s.server.clone())];
            self.up
                .get_or_create(&vec![
                    ("server", s.server.clone()),
                    ("role", s.role.to_string()),
                ])
                .set(i64::from(s.reachable));
            if let Some(lag) = s.lag {
                self.lag.get_or_create(&server()).set(lag.as_secs_f64());
            }
            if let Some(readable) = s.readable {
                self.readable
                    .get_or_create(&server())
                    .set(i64::from(readable));
            }
            for (reason, _) in &s.degraded {
                self.degraded
                    .get_or_create(&vec![
                        ("server", s.server.clone()),
                        ("reason", reason.to_string()),
                    ])
                    .set(1);
            }
            if let Some(used) = s.used_memory {
                self.used_memory
                    .get_or_create(&server())
                    .set(i64::try_from(used).unwrap_or(i64::MAX));
            }
            if let Some(evicted) = s.evicted_keys {
                self.evicted_keys
                    .get_or_create(&server())
                    .set(i64::try_from(evicted).unwrap_or(i64::MAX));
            }
            if let Some(max) = s.maxmemory {
                self.maxmemory
                    .get_or_create(&server())
                    .set(i64::try_from(max).unwrap_or(i64::MAX));
            }
        }
    }
}

/// The conventional `process_*` metrics of a Prometheus client.
pub struct ProcessMetrics {
    cpu: Counter<f64, AtomicU64>,
    /// The CPU time already counted.
    cpu_seen: Mutex<f64>,
    resident: Gauge,
    open_fds: Gauge,
    max_fds: Gauge,
    threads: Gauge,
    start_time: Gauge<f64, AtomicU64>,
}

impl ProcessMetrics {
    fn register(r: &mut Registry) -> ProcessMetrics {
        let m = ProcessMetrics {
            cpu: Counter::default(),
            cpu_seen: Mutex::new(0.0),
            resident: Gauge::default(),
            open_fds: Gauge::default(),
            max_fds: Gauge::default(),
            threads: Gauge::default(),
            start_time: Gauge::default(),
        };
        r.register(
            "process_cpu_seconds",
            "User and system CPU time spent, in seconds",
            m.cpu.clone(),
        );
        r.register(
            "process_resident_memory_bytes",
            "Resident memory size in bytes",
            m.resident.clone(),
        );
        r.register(
            "process_open_fds",
            "Open file descriptors",
            m.open_fds.clone(),
        );
        r.register(
            "process_max_fds",
            "The open-files limit (soft)",
            m.max_fds.clone(),
        );
        r.register("process_threads", "Threads", m.threads.clone());
        r.register(
            "process_start_time_seconds",
            "When the process started, in seconds since the Unix epoch",
            m.start_time.clone(),
        );
        m
    }
}

/// Read at each scrape (gauges whose truth lives elsewhere: the store's size, the
/// server's connections and queues).
type Sampler = Box<dyn Fn(&Metrics) + Send + Sync>;

pub struct Metrics {
    registry: Registry,
    /// `echo_requests_total{cache_status, method, code}`: proxied requests answered.
    pub requests: Family<RequestLabels, Counter>,
    /// `echo_request_duration_seconds{cache_status}`: from the request head to the
    /// response's last byte.
    pub request_duration: HistogramFamily<CacheStatusLabel>,
    /// `echo_origin_request_duration_seconds{server}`: from sending to the response head.
    pub origin_duration: HistogramFamily<Labels>,
    /// `echo_origin_errors_total{server, kind}`: connect, timeout, protocol, ...
    pub origin_errors: Family<Labels, Counter>,
    /// `echo_store_errors_total{store, op}`.
    pub store_errors: Family<StoreLabels, Counter>,
    /// `echo_store_operation_duration_seconds{store, op}`.
    pub store_duration: HistogramFamily<StoreLabels>,
    /// `echo_invalidations_total{mode, outcome}`: invalidation jobs run.
    pub invalidations: Family<Labels, Counter>,
    /// `echo_invalidated_entries_total{mode}`: entries deleted, marked stale or refreshed.
    pub invalidated_entries: Family<Labels, Counter>,
    /// `echo_coalesced_requests_total`: requests answered from another's fetch.
    pub coalesced: Counter,
    /// `echo_fill_lock_takeovers_total`: fills that took a key over from a node whose
    /// fill lock lease ran out (the node died or stalled mid-fetch).
    pub fill_lock_takeovers: Counter,
    /// `echo_hit_for_pass_total`: requests sent to the origin without waiting on others
    /// because their key's answer could not be shared a moment ago.
    pub hit_for_pass: Counter,
    /// `echo_origin_server_up{server}`: 1 while a server is in rotation, 0 while out.
    pub origin_server_up: Family<Labels, Gauge>,
    /// `echo_stored_bytes` / `echo_stored_objects`: the memory store's contents.
    pub stored_bytes: Gauge,
    pub stored_objects: Gauge,
    /// `echo_connections_open`: client connections to the proxy listener.
    pub connections_open: Gauge,
    /// `echo_worker_queue_depth{pool}`: requests waiting for a worker or fetch worker.
    pub queue_depth: Family<Labels, Gauge>,
    /// `echo_access_log_dropped_lines_total`: lines lost because the writer fell behind.
    pub access_log_dropped: Counter,
    /// `echo_store_entries{store}`, `echo_store_bytes{store}`: what each store (the
    /// memory store; the Redis store's local tier as `redis_local`) holds.
    pub store_entries: Family<Labels, Gauge>,
    pub store_bytes: Family<Labels, Gauge>,
    /// `echo_store_evictions_total{store}`: entries a store dropped for room.
    pub store_evictions: Family<Labels, Counter>,
    /// `process_*`: what the process uses (`crate::process`).
    pub process: ProcessMetrics,
    /// Each Redis server as the store's monitor last found it (set at each scrape).
    pub redis: RedisMetrics,
    samplers: Mutex<Vec<Sampler>>,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut r = Registry::default();
        let requests = Family::<RequestLabels, Counter>::default();
        r.register(
            "echo_requests",
            "Proxied requests answered, by X-Cache-Status, method and status code",
            requests.clone(),
        );
        let request_duration: HistogramFamily<CacheStatusLabel> =
            Family::new_with_constructor(latency_histogram);
        r.register(
            "echo_request_duration_seconds",
            "Time from a request's head to its response's last byte, by X-Cache-Status",
            request_duration.clone(),
        );
        let origin_duration: HistogramFamily<Labels> =
            Family::new_with_constructor(latency_histogram);
        r.register(
            "echo_origin_request_duration_seconds",
            "Time from sending a request to an origin server to its response head, by server",
            origin_duration.clone(),
        );
        let origin_errors = Family::<Labels, Counter>::default();
        r.register(
            "echo_origin_errors",
            "Failed origin requests, by server and kind (connect, timeout, protocol, unavailable)",
            origin_errors.clone(),
        );
        let store_errors = Family::<StoreLabels, Counter>::default();
        r.register(
            "echo_store_errors",
            "Failed store operations, by store and operation (each one answered as a miss or skipped)",
            store_errors.clone(),
        );
        let store_duration: HistogramFamily<StoreLabels> =
            Family::new_with_constructor(latency_histogram);
        r.register(
            "echo_store_operation_duration_seconds",
            "Time taken by store operations, by store and operation",
            store_duration.clone(),
        );
        let invalidations = Family::<Labels, Counter>::default();
        r.register(
            "echo_invalidations",
            "Invalidation jobs run, by mode and outcome (done, failed, dry_run)",
            invalidations.clone(),
        );
        let invalidated_entries = Family::<Labels, Counter>::default();
        r.register(
            "echo_invalidated_entries",
            "Entries deleted, marked stale or refreshed by invalidation jobs, by mode",
            invalidated_entries.clone(),
        );
        let coalesced = Counter::default();
        r.register(
            "echo_coalesced_requests",
            "Requests answered from another request's origin fetch of the same key",
            coalesced.clone(),
        );
        let fill_lock_takeovers = Counter::default();
        r.register(
            "echo_fill_lock_takeovers",
            "Fills that took a key over from a node whose fill lock lease ran out (it died or stalled mid-fetch)",
            fill_lock_takeovers.clone(),
        );
        let hit_for_pass = Counter::default();
        r.register(
            "echo_hit_for_pass",
            "Requests sent to the origin side by side, without waiting on each other, because their key's answer could not be shared a moment ago",
            hit_for_pass.clone(),
        );
        let origin_server_up = Family::<Labels, Gauge>::default();
        r.register(
            "echo_origin_server_up",
            "Whether an origin server is in rotation (1) or out after failed health checks or requests (0)",
            origin_server_up.clone(),
        );
        let stored_bytes = Gauge::default();
        r.register(
            "echo_stored_bytes",
            "Bytes held by the memory store (keys, fields and bodies)",
            stored_bytes.clone(),
        );
        let stored_objects = Gauge::default();
        r.register(
            "echo_stored_objects",
            "Entries (URLs) held by the memory store",
            stored_objects.clone(),
        );
        let connections_open = Gauge::default();
        r.register(
            "echo_connections_open",
            "Client connections open on the proxy listener",
            connections_open.clone(),
        );
        let queue_depth = Family::<Labels, Gauge>::default();
        r.register(
            "echo_worker_queue_depth",
            "Requests waiting for a thread, by pool (workers: requests with bodies; fetch: requests waiting on the origin)",
            queue_depth.clone(),
        );
        let access_log_dropped = Counter::default();
        r.register(
            "echo_access_log_dropped_lines",
            "Access log lines dropped because the writer could not keep up",
            access_log_dropped.clone(),
        );
        let store_entries = Family::<Labels, Gauge>::default();
        r.register(
            "echo_store_entries",
            "Entries (URLs) a store holds in this process, by store (memory; redis_local, the Redis store's local tier)",
            store_entries.clone(),
        );
        let store_bytes = Family::<Labels, Gauge>::default();
        r.register(
            "echo_store_bytes",
            "Bytes a store holds in this process, by store",
            store_bytes.clone(),
        );
        let store_evictions = Family::<Labels, Counter>::default();
        r.register(
            "echo_store_evictions",
            "Entries a store dropped to stay within its bound, by store (Redis's own evictions: echo_redis_evicted_keys)",
            store_evictions.clone(),
        );
        let build_info = Family::<Labels, Gauge>::default();
        build_info
            .get_or_create(&vec![("version", env!("CARGO_PKG_VERSION").to_string())])
            .set(1);
        r.register(
            "echo_build_info",
            "Always 1; the version is the label",
            build_info,
        );
        let process = ProcessMetrics::register(&mut r);
        let redis = RedisMetrics::register(&mut r);
        Arc::new(Metrics {
            registry: r,
            requests,
            request_duration,
            origin_duration,
            origin_errors,
            store_errors,
            store_duration,
            invalidations,
            invalidated_entries,
            coalesced,
            fill_lock_takeovers,
            hit_for_pass,
            origin_server_up,
            stored_bytes,
            stored_objects,
            connections_open,
            queue_depth,
            access_log_dropped,
            store_entries,
            store_bytes,
            store_evictions,
            process,
            redis,
            samplers: Mutex::new(Vec::new()),
        })
    }

    /// Runs `sample` before every scrape, to set gauges read from elsewhere.
    pub fn add_sampler(&self, sample: impl Fn(&Metrics) + Send + Sync + 'static) {
        self.samplers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(Box::new(sample));
    }

    /// Counts one answered proxy request.
    pub fn request(&self, cache_status: &'static str, method: &str, code: u16, took: Duration) {
        self.requests
            .get_or_create(&RequestLabels {
                cache_status,
                method: method_label(method),
                code,
            })
            .inc();
        self.request_duration
            .get_or_create(&CacheStatusLabel { cache_status })
            .observe(took.as_secs_f64());
    }

    /// Records one store operation: its time, and whether it failed.
    pub fn store_op(&self, store: &'static str, op: &'static str, took: Duration, failed: bool) {
        let labels = StoreLabels { store, op };
        self.store_duration
            .get_or_create(&labels)
            .observe(took.as_secs_f64());
        if failed {
            self.store_errors.get_or_create(&labels).inc();
        }
    }

    /// Reads the process (`process_*`) and sets its gauges; CPU time is a counter.
    fn sample_process(&self) {
        let now = crate::process::read();
        let p = &self.process;
        if let Some(cpu) = now.cpu {
            let seconds = cpu.as_secs_f64();
            let mut last = p.cpu_seen.lock().unwrap_or_else(|e| e.into_inner());
            if seconds > *last {
                p.cpu.inc_by(seconds - *last);
                *last = seconds;
            }
        }
        let set = |g: &Gauge, v: Option<u64>| {
            if let Some(v) = v {
                g.set(i64::try_from(v).unwrap_or(i64::MAX));
            }
        };
        set(&p.resident, now.resident_bytes);
        set(&p.open_fds, now.open_fds);
        set(&p.max_fds, now.max_fds);
        set(&p.threads, now.threads);
        if let Some(t) = now.start_time {
            p.start_time.set(t);
        }
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        self.sample_process();
        for sample in self
            .samplers
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .iter()
        {
            sample(self);
        }
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
    }
}

/// The method as a label: the registered methods Echo sees, `other` for the rest.
fn method_label(method: &str) -> &'static str {
    match method {
        "GET" => "get",
        "HEAD" => "head",
        "POST" => "post",
        "PUT" => "put",
        "DELETE" => "delete",
        "PATCH" => "patch",
        "OPTIONS" => "options",
        "TRACE" => "trace",
        "CONNECT" => "connect",
        _ => "other",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_are_exposed_with_their_labels() {
        let m = Metrics::new();
        m.invalidations
            .get_or_create(&vec![("mode", "delete".into()), ("outcome", "done".into())])
            .inc();
        m.invalidated_entries
            .get_or_create(&vec![("mode", "delete".into())])
            .inc_by(42);
        let text = m.encode();
        assert!(
            text.contains("echo_invalidations_total{mode=\"delete\",outcome=\"done\"} 1"),
            "{text}"
        );
        assert!(
            text.contains("echo_invalidated_entries_total{mode=\"delete\"} 42"),
            "{text}"
        );
        assert!(text.contains("# HELP echo_invalidations"), "{text}");
    }

    #[test]
    fn requests_are_counted_by_bounded_labels() {
        let m = Metrics::new();
        m.request("hit", "GET", 200, Duration::from_micros(80));
        m.request("hit", "GET", 200, Duration::from_micros(90));
        m.request("bypass", "BREW", 501, Duration::from_millis(3));
        let text = m.encode();
        assert!(
            text.contains(
                "echo_requests_total{cache_status=\"hit\",method=\"get\",code=\"200\"} 2"
            ),
            "{text}"
        );
        assert!(text.contains("method=\"other\",code=\"501\"} 1"), "{text}");
        assert!(
            text.contains(
                "echo_request_duration_seconds_bucket{le=\"0.0001\",cache_status=\"hit\"} 2"
            ),
            "{text}"
        );
    }

    #[test]
    fn samplers_run_before_each_scrape() {
        let m = Metrics::new();
        m.add_sampler(|m| {
            m.stored_objects.set(7);
        });
        assert!(m.encode().contains("echo_stored_objects 7"));
    }
}
