//! Echo's metrics, exposed on the admin listener at `GET /metrics` in the Prometheus /
//! OpenMetrics text format by `prometheus-client` (no hand-formatting).
//!
//! Invariants: label values are lower case; a metric is registered once, here, with its
//! help text; recording never blocks a request for long (atomic counters).

use std::sync::Arc;

use prometheus_client::encoding::text::encode;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// A label set: `(name, value)` pairs.
pub type Labels = Vec<(&'static str, String)>;

pub struct Metrics {
    registry: Registry,
    /// `echo_invalidations_total{mode, outcome}`: invalidation jobs run.
    pub invalidations: Family<Labels, Counter>,
    /// `echo_invalidated_entries_total{mode}`: entries deleted, marked stale or refreshed.
    pub invalidated_entries: Family<Labels, Counter>,
    /// `echo_coalesced_requests_total`: requests answered from another's fetch.
    pub coalesced: Counter,
    /// `echo_origin_server_up{server}`: 1 while a server is in rotation, 0 while out.
    pub origin_server_up: Family<Labels, Gauge>,
}

impl Metrics {
    pub fn new() -> Arc<Metrics> {
        let mut registry = Registry::default();
        let invalidations = Family::<Labels, Counter>::default();
        registry.register(
            "echo_invalidations",
            "Invalidation jobs run, by mode and outcome (done, failed, dry_run)",
            invalidations.clone(),
        );
        let invalidated_entries = Family::<Labels, Counter>::default();
        registry.register(
            "echo_invalidated_entries",
            "Entries deleted, marked stale or refreshed by invalidation jobs, by mode",
            invalidated_entries.clone(),
        );
        let coalesced = Counter::default();
        registry.register(
            "echo_coalesced_requests",
            "Requests answered from another request's origin fetch of the same key",
            coalesced.clone(),
        );
        let origin_server_up = Family::<Labels, Gauge>::default();
        registry.register(
            "echo_origin_server_up",
            "Whether an origin server is in rotation (1) or out after failed health checks or requests (0)",
            origin_server_up.clone(),
        );
        Arc::new(Metrics {
            registry,
            invalidations,
            invalidated_entries,
            coalesced,
            origin_server_up,
        })
    }

    /// The exposition text.
    pub fn encode(&self) -> String {
        let mut text = String::new();
        // Writing to a String cannot fail.
        let _ = encode(&mut text, &self.registry);
        text
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
}
