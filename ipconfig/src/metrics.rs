//! ipconfig's Prometheus metrics.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::registry::Registry;

/// One label, e.g. `("code", "bad_token")`.
pub type Label = [(&'static str, &'static str); 1];

/// Counters, gauges and histograms of one ipconfig instance.
#[derive(Clone)]
pub struct IpconfigMetrics {
    /// Requests to `/v1/endpoints` by status class (`2xx`, `4xx`, `5xx`).
    pub requests: Family<Label, Counter>,
    /// Refused requests by error code.
    pub errors: Family<Label, Counter>,
    /// Time to answer `/v1/endpoints`, seconds.
    pub latency: Histogram,
    /// Gateway tokens issued.
    pub tokens_issued: Counter,
    /// Devices a gateway asked a redirect token for (drain, migration).
    pub redirect_grants: Counter,
    /// Live gateways (fresh heartbeats), updated on every scrape and request.
    pub gateways_seen: Gauge,
    /// Apps known (bucket and config file).
    pub apps: Gauge,
}

impl Default for IpconfigMetrics {
    fn default() -> Self {
        Self {
            requests: Family::default(),
            errors: Family::default(),
            // 50 µs to ~0.4 s.
            latency: Histogram::new(prometheus_client::metrics::histogram::exponential_buckets(
                0.000_05, 2.0, 14,
            )),
            tokens_issued: Counter::default(),
            redirect_grants: Counter::default(),
            gateways_seen: Gauge::default(),
            apps: Gauge::default(),
        }
    }
}

impl IpconfigMetrics {
    /// Registers every metric under `registry`.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "requests",
            "endpoint requests by status class",
            self.requests.clone(),
        );
        registry.register(
            "errors",
            "refused endpoint requests by error code",
            self.errors.clone(),
        );
        registry.register(
            "request_seconds",
            "time to answer an endpoint request",
            self.latency.clone(),
        );
        registry.register(
            "tokens_issued",
            "gateway tokens issued",
            self.tokens_issued.clone(),
        );
        registry.register(
            "redirect_requests",
            "devices gateways asked a redirect token for",
            self.redirect_grants.clone(),
        );
        registry.register(
            "gateways_seen",
            "gateways with a fresh heartbeat",
            self.gateways_seen.clone(),
        );
        registry.register("apps", "apps known", self.apps.clone());
    }
}
