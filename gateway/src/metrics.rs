//! The gateway's Prometheus metrics.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;
use tether_schemas::ErrorCode;

/// One label, e.g. `("code", "bad_token")`: static strings, so counting never allocates.
pub type Label = [(&'static str, &'static str); 1];

/// Counters and gauges of one gateway.
#[derive(Clone, Default)]
pub struct GatewayMetrics {
    /// Open client connections (logged in or not).
    pub connections: Gauge,
    /// Logged-in connections.
    pub sessions: Gauge,
    /// Dormant connections: silent, without a task or a runtime registration.
    pub dormant: Gauge,
    /// Accepted sockets by transport (`tcp`, `ws`).
    pub accepted: Family<Label, Counter>,
    /// Successful logins.
    pub logins: Counter,
    /// Errors sent to clients, by code.
    pub errors: Family<Label, Counter>,
    /// Closed connections, by reason.
    pub disconnects: Family<Label, Counter>,
    /// Hand-offs offered by this process, by outcome (`committed`, `aborted`).
    pub handoffs: Family<Label, Counter>,
    /// Frames received from clients, by type.
    pub frames_in: Family<Label, Counter>,
    /// Bytes received from clients.
    pub bytes_in: Counter,
    /// Frames written to clients.
    pub frames_out: Counter,
    /// Bytes written to clients.
    pub bytes_out: Counter,
    /// QoS0 frames dropped because a client's queue was full.
    pub dropped_qos0: Counter,
    /// Uplink frames stored in the uplink stream.
    pub uplink_stored: Counter,
    /// Uplink frames the stream did not confirm.
    pub uplink_failed: Counter,
    /// Connection events that could not be written to the events stream.
    pub events_failed: Counter,
    /// Downlink messages received from NATS.
    pub downlink_messages: Counter,
    /// Downlink deliveries queued to a local connection.
    pub downlink_delivered: Counter,
    /// Downlink targets not connected to this gateway.
    pub downlink_no_route: Counter,
    /// Malformed downlink messages dropped.
    pub downlink_invalid: Counter,
    /// Downlinks not delivered because their connection had no LOGIN_ACK yet.
    pub downlink_held: Counter,
    /// Input refused at the trust boundary, by reason: device fields (`login_field`,
    /// `up_session`) and downlinks a business may not send (`foreign_app`, `frame_type`,
    /// `room_seq`).
    pub refused: Family<Label, Counter>,
    /// Drain and migration, by outcome (`redirected`, `moved`, `timed_out`, `failed`).
    pub migrations: Family<Label, Counter>,
    /// Uplinks the stream had already (resends, answered from the kept receipt).
    pub uplink_duplicates: Counter,
    /// Session broadcasts received (one per broadcast, however many local members).
    pub session_broadcasts: Counter,
    /// Session broadcast frames queued to local members.
    pub session_deliveries: Counter,
    /// Session control messages (membership syncs from state) applied.
    pub session_syncs: Counter,
    /// Room recoveries by result (`complete`, `gap`, `current`, `empty`, `failed`).
    pub room_recoveries: Family<Label, Counter>,
    /// Room messages replayed to recovering devices.
    pub room_replayed: Counter,
}

impl GatewayMetrics {
    /// Registers every metric under `registry` (names get the registry's prefix).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "connections",
            "open client connections",
            self.connections.clone(),
        );
        registry.register("sessions", "logged-in connections", self.sessions.clone());
        registry.register(
            "dormant",
            "silent connections without a task or runtime registration",
            self.dormant.clone(),
        );
        registry.register(
            "accepted",
            "accepted sockets by transport",
            self.accepted.clone(),
        );
        registry.register("logins", "successful logins", self.logins.clone());
        registry.register(
            "errors",
            "error frames sent to clients by code",
            self.errors.clone(),
        );
        registry.register(
            "disconnects",
            "closed connections by reason",
            self.disconnects.clone(),
        );
        registry.register(
            "handoffs",
            "restarts by hand-off offered by this process, by outcome",
            self.handoffs.clone(),
        );
        registry.register(
            "frames_in",
            "frames received from clients by type",
            self.frames_in.clone(),
        );
        registry.register(
            "bytes_in",
            "bytes received from clients",
            self.bytes_in.clone(),
        );
        registry.register(
            "frames_out",
            "frames written to clients",
            self.frames_out.clone(),
        );
        registry.register(
            "bytes_out",
            "bytes written to clients",
            self.bytes_out.clone(),
        );
        registry.register(
            "dropped_qos0",
            "qos0 frames dropped for slow clients",
            self.dropped_qos0.clone(),
        );
        registry.register(
            "uplink_stored",
            "uplink frames stored in the uplink stream",
            self.uplink_stored.clone(),
        );
        registry.register(
            "uplink_failed",
            "uplink frames not confirmed by the stream",
            self.uplink_failed.clone(),
        );
        registry.register(
            "events_failed",
            "connection events not written",
            self.events_failed.clone(),
        );
        registry.register(
            "downlink_messages",
            "downlink messages received",
            self.downlink_messages.clone(),
        );
        registry.register(
            "downlink_delivered",
            "downlink frames queued to clients",
            self.downlink_delivered.clone(),
        );
        registry.register(
            "uplink_duplicates",
            "resent uplinks the stream already had",
            self.uplink_duplicates.clone(),
        );
        registry.register(
            "session_broadcasts",
            "session broadcasts received",
            self.session_broadcasts.clone(),
        );
        registry.register(
            "session_deliveries",
            "session broadcast frames queued to local members",
            self.session_deliveries.clone(),
        );
        registry.register(
            "session_syncs",
            "membership syncs from state applied",
            self.session_syncs.clone(),
        );
        registry.register(
            "room_recoveries",
            "room recoveries by result",
            self.room_recoveries.clone(),
        );
        registry.register(
            "room_replayed",
            "room messages replayed to recovering devices",
            self.room_replayed.clone(),
        );
        registry.register(
            "downlink_no_route",
            "downlink targets not on this gateway",
            self.downlink_no_route.clone(),
        );
        registry.register(
            "downlink_invalid",
            "malformed downlink messages dropped",
            self.downlink_invalid.clone(),
        );
        registry.register(
            "downlink_held",
            "downlinks for connections still waiting for their login ack",
            self.downlink_held.clone(),
        );
        registry.register(
            "refused",
            "input refused at the trust boundary, by reason",
            self.refused.clone(),
        );
        registry.register(
            "migrations",
            "drain and migration: devices redirected, moved, timed out, or without a target",
            self.migrations.clone(),
        );
    }

    /// Counts one migration outcome.
    pub fn migration(&self, outcome: &'static str) {
        self.migrations.get_or_create(&[("outcome", outcome)]).inc();
    }

    /// Counts one refusal at the trust boundary.
    pub fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&[("reason", reason)]).inc();
    }

    /// Counts an error frame sent with `code`.
    pub fn error(&self, code: ErrorCode) {
        self.errors.get_or_create(&[("code", code.as_str())]).inc();
    }
}

/// The verified-token cache's counters, read at scrape time:
/// `tether_gateway_token_cache_hits_total` (logins whose token was answered from the cache)
/// and `tether_gateway_token_cache_misses_total` (tokens checked with the key).
#[derive(Debug)]
pub struct TokenCacheMetrics(pub std::sync::Arc<tether_auth::CachedVerifier>);

impl prometheus_client::collector::Collector for TokenCacheMetrics {
    fn encode(
        &self,
        mut encoder: prometheus_client::encoding::DescriptorEncoder,
    ) -> Result<(), std::fmt::Error> {
        use prometheus_client::encoding::EncodeMetric;
        use prometheus_client::metrics::counter::ConstCounter;
        for (name, help, value) in [
            (
                "token_cache_hits",
                "logins whose token was answered from the verified-token cache",
                self.0.hits(),
            ),
            (
                "token_cache_misses",
                "tokens checked with the public key",
                self.0.misses(),
            ),
        ] {
            let counter = ConstCounter::new(value);
            let metric = encoder.encode_descriptor(name, help, None, counter.metric_type())?;
            counter.encode(metric)?;
        }
        Ok(())
    }
}
