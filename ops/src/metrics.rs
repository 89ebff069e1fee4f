//! Prometheus metrics of ops (prefix `tether_ops_`).

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// Labels of an operation.
#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct OpLabels {
    /// The operation.
    pub op: String,
    /// `ok` or `error`.
    pub outcome: String,
}

/// The metrics.
#[derive(Clone, Default)]
pub struct OpsMetrics {
    /// Operations by name and outcome.
    pub operations: Family<OpLabels, Counter>,
    /// Requests refused for a missing or wrong admin token.
    pub unauthorized: Counter,
    /// Live gateways in the view.
    pub gateways: Gauge,
    /// Live state instances in the view.
    pub states: Gauge,
    /// Connections on all live gateways.
    pub connections: Gauge,
    /// Dashboard live streams open.
    pub streams: Gauge,
}

impl OpsMetrics {
    /// Registers every metric.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "operations",
            "Operations by name and outcome",
            self.operations.clone(),
        );
        registry.register(
            "unauthorized",
            "Requests refused for a missing or wrong admin token",
            self.unauthorized.clone(),
        );
        registry.register("gateways", "Live gateways", self.gateways.clone());
        registry.register("states", "Live state instances", self.states.clone());
        registry.register(
            "connections",
            "Connections on all live gateways",
            self.connections.clone(),
        );
        registry.register(
            "dashboard_streams",
            "Dashboard live streams open",
            self.streams.clone(),
        );
    }
}
