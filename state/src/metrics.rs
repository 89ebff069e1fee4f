//! The state service's Prometheus metrics.

use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

/// One static label.
pub type Label = [(&'static str, &'static str); 1];

/// Counters and gauges of one state instance.
#[derive(Clone, Default)]
pub struct StateMetrics {
    /// Partitions owned by this instance.
    pub partitions: Gauge,
    /// Devices held in memory (online or inside the reconnect window).
    pub devices: Gauge,
    /// Uplinks processed, by result (`stored`, `error`, `timeout`).
    pub uplinks: Family<Label, Counter>,
    /// Pushes received.
    pub pushes: Counter,
    /// QoS1 messages appended to inboxes.
    pub inbox_appended: Counter,
    /// Frames published to gateways.
    pub frames_sent: Counter,
    /// QoS1 resends after the retransmission timer.
    pub retransmits: Counter,
    /// Inbox reads that stopped below a message already announced (a lagging replica
    /// answered); retried on the next tick.
    pub inbox_short_reads: Counter,
    /// Device acks received.
    pub acks: Counter,
    /// Presence notifications published.
    pub presence: Counter,
    /// Session requests answered, by result (`ok`, `error`).
    pub session_requests: Family<Label, Counter>,
    /// Membership changes applied (one per device and event).
    pub membership_changes: Counter,
    /// Session pushes by delivery mode (`direct`, `broadcast`, `room`).
    pub session_pushes: Family<Label, Counter>,
    /// Session index entries held in memory (device-in-session pairs).
    pub session_index: Gauge,
    /// Input refused at the trust boundary, by reason (`event_identity`, `not_an_up`,
    /// `ack_above_sent`, `resume_above_sent`, `room_foreign`, `push_too_large`).
    pub refused: Family<Label, Counter>,
    /// Events skipped because a newer event of the device was applied already (stale
    /// redeliveries after a crash or an owner change).
    pub stale_events: Counter,
    /// Events whose effect could not be written, retried with backoff.
    pub event_retries: Counter,
    /// Appends sent again because their stream had no leader (a NATS node died).
    pub store_unavailable_retries: Counter,
    /// Partition consumers reset to their ack floor at a takeover (what the previous
    /// owner had fetched comes back at once instead of after the ack wait).
    pub consumer_resets: Counter,
    /// Partition worker failures (errors and panics), each followed by a restart.
    pub partition_failures: Counter,
    /// Partitions whose worker is failing right now.
    pub partitions_failing: Gauge,
    /// Devices recycled because their gateway stopped heart-beating.
    pub gateway_recycled: Counter,
    /// QoS1 messages that expired from an inbox before the device acknowledged them.
    pub expired_unacked: Counter,
    /// Uplink receipts kept in memory (for resends and redeliveries).
    pub receipts_kept: Counter,
    /// Gateways' questions about duplicate UPs, by answer (`kept`, `pending`, `unknown`).
    pub receipt_queries: Family<Label, Counter>,
    /// Uplinks answered from their kept receipt instead of asking the business again.
    pub receipts_reused: Counter,
    /// Requests (pushes, session calls) refused because too many were in progress.
    pub busy: Counter,
    /// Devices removed from their user's list after `forget_devices_after_secs` offline.
    pub devices_forgotten: Counter,
}

impl StateMetrics {
    /// Registers every metric.
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "receipts_kept",
            "uplink receipts kept in memory for resends",
            self.receipts_kept.clone(),
        );
        registry.register(
            "receipt_queries",
            "gateways' questions about duplicate uplinks, by answer",
            self.receipt_queries.clone(),
        );
        registry.register(
            "receipts_reused",
            "uplinks answered from their kept receipt (resends, redeliveries)",
            self.receipts_reused.clone(),
        );
        registry.register(
            "devices_forgotten",
            "devices removed from their user's list after being offline too long",
            self.devices_forgotten.clone(),
        );
        registry.register(
            "busy",
            "requests refused because too many were in progress",
            self.busy.clone(),
        );
        registry.register("partitions", "partitions owned", self.partitions.clone());
        registry.register("devices", "devices in memory", self.devices.clone());
        registry.register(
            "uplinks",
            "uplinks processed by result",
            self.uplinks.clone(),
        );
        registry.register("pushes", "pushes received", self.pushes.clone());
        registry.register(
            "session_requests",
            "session requests by result",
            self.session_requests.clone(),
        );
        registry.register(
            "membership_changes",
            "membership changes applied",
            self.membership_changes.clone(),
        );
        registry.register(
            "session_pushes",
            "session pushes by delivery mode",
            self.session_pushes.clone(),
        );
        registry.register(
            "session_index",
            "device-in-session pairs in the session index",
            self.session_index.clone(),
        );
        registry.register(
            "inbox_appended",
            "qos1 messages stored",
            self.inbox_appended.clone(),
        );
        registry.register(
            "frames_sent",
            "frames published to gateways",
            self.frames_sent.clone(),
        );
        registry.register("retransmits", "qos1 resends", self.retransmits.clone());
        registry.register(
            "inbox_short_reads",
            "inbox reads that stopped below an announced message, retried",
            self.inbox_short_reads.clone(),
        );
        registry.register("acks", "device acks received", self.acks.clone());
        registry.register("presence", "presence notifications", self.presence.clone());
        registry.register(
            "stale_events",
            "events skipped as stale redeliveries",
            self.stale_events.clone(),
        );
        registry.register(
            "event_retries",
            "events retried because their effect was not written",
            self.event_retries.clone(),
        );
        registry.register(
            "store_unavailable_retries",
            "appends sent again because their stream had no leader",
            self.store_unavailable_retries.clone(),
        );
        registry.register(
            "consumer_resets",
            "partition consumers reset to their ack floor at a takeover",
            self.consumer_resets.clone(),
        );
        registry.register(
            "partition_failures",
            "partition worker failures, each followed by a restart",
            self.partition_failures.clone(),
        );
        registry.register(
            "expired_unacked",
            "qos1 messages expired before the device acknowledged them",
            self.expired_unacked.clone(),
        );
        registry.register(
            "gateway_recycled",
            "devices recycled because their gateway stopped heart-beating",
            self.gateway_recycled.clone(),
        );
        registry.register(
            "partitions_failing",
            "partitions whose worker is failing now",
            self.partitions_failing.clone(),
        );
        registry.register(
            "refused",
            "input refused at the trust boundary, by reason",
            self.refused.clone(),
        );
    }

    /// Counts one refusal at the trust boundary.
    pub fn refused(&self, reason: &'static str) {
        self.refused.get_or_create(&[("reason", reason)]).inc();
    }
}
