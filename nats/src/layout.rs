//! JetStream streams and KV buckets: their settings in one place, created idempotently.
//!
//! Every service calls [`ensure_layout`] at start. It creates what is missing and updates
//! settings that changed, so a fresh cluster and an upgraded one converge on the same layout.

use std::time::Duration;

use async_nats::jetstream::consumer::{AckPolicy, DeliverPolicy, pull};
use async_nats::jetstream::{self, kv, stream};

use crate::connect::BusError;
use crate::subjects;

/// Stream of uplink frames (`tether.*.up.*.*`), de-duplicated by `app:did:client_msg_id`.
pub const UPLINK_STREAM: &str = "TETHER_UPLINK";
/// The event log (`tether.*.evt.>`): connects, disconnects, session changes.
pub const EVENTS_STREAM: &str = "TETHER_EVENTS";
/// Per-device QoS1 inboxes (`tether.*.inbox.*.*`).
pub const INBOX_STREAM: &str = "TETHER_INBOX";
/// Recoverable room broadcasts (`tether.*.room.*`).
pub const ROOMS_STREAM: &str = "TETHER_ROOMS";
/// KV bucket: did → gateway, region, conn.
pub const ROUTES_BUCKET: &str = "tether_routes";
/// KV bucket: gateway heartbeats, expiring after [`BusLayout::gateway_ttl`].
pub const GATEWAYS_BUCKET: &str = "tether_gateways";
/// KV bucket: records of other long-running instances (`ipconfig.<id>`), expiring after
/// [`BusLayout::gateway_ttl`] like gateway heartbeats.
pub const INSTANCES_BUCKET: &str = "tether_instances";
/// KV bucket: session memberships per device, the session → devices index and room
/// settings.
pub const SESSIONS_BUCKET: &str = "tether_sessions";
/// KV bucket: UP_ACK frames of processed uplinks, kept for the de-duplication window so a
/// resent UP whose first receipt was lost gets it again.
pub const RECEIPTS_BUCKET: &str = "tether_receipts";
/// KV bucket: app configuration and secrets.
pub const APPS_BUCKET: &str = "tether_apps";
/// KV bucket: home regions of users (`a.<app>.<uid>`), set by business services and read
/// by every region's ipconfig.
pub const AFFINITY_BUCKET: &str = "tether_affinity";
/// KV bucket: state partition leases (`member.<instance>`, `part.<partition>`), each
/// expiring after the lease TTL unless renewed.
pub const LEASES_BUCKET: &str = "tether_leases";

/// KV bucket: the audit log of operations (ops API and `tether app set`), one key per
/// operation (`<unix_ms>-<random>`), kept for [`AUDIT_MAX_AGE`].
pub const AUDIT_BUCKET: &str = "tether_audit";
/// How long audit entries are kept.
pub const AUDIT_MAX_AGE: Duration = Duration::from_secs(90 * 24 * 3600);

/// The audit bucket with `replicas` (created by ops, and by `tether app set`, if missing).
pub fn audit_bucket(replicas: usize) -> kv::Config {
    kv::Config {
        bucket: AUDIT_BUCKET.to_string(),
        description: "tether operations audit log".into(),
        history: 1,
        max_age: AUDIT_MAX_AGE,
        num_replicas: replicas,
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

/// The lease bucket with `ttl` and `replicas` (state creates or updates it at start: the
/// TTL is state's setting).
pub fn leases_bucket(name: &str, ttl: Duration, replicas: usize) -> kv::Config {
    kv::Config {
        bucket: name.to_string(),
        description: "tether state partition leases".into(),
        history: 1,
        max_age: ttl,
        num_replicas: replicas,
        ..Default::default()
    }
}

/// Deliveries of one message to a partition consumer before JetStream gives up on it.
pub const MAX_DELIVER: i64 = 20;

/// The stream behind KV bucket `bucket` (`KV_<bucket>`).
pub fn kv_stream(bucket: &str) -> String {
    format!("KV_{bucket}")
}

/// The durable consumers of one state partition: which stream each reads, with which
/// filter. Every state instance uses the same names, so the owner of a partition resumes
/// where the previous owner stopped.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PartitionConsumer {
    /// Connection and session events of the partition (`state-evt-<p>`).
    Events,
    /// Uplink frames of the partition (`state-up-<p>`).
    Uplinks,
    /// New QoS1 inbox messages of the partition (`state-inbox-<p>`).
    Inbox,
}

impl PartitionConsumer {
    /// The stream it reads.
    pub fn stream(self) -> &'static str {
        match self {
            PartitionConsumer::Events => EVENTS_STREAM,
            PartitionConsumer::Uplinks => UPLINK_STREAM,
            PartitionConsumer::Inbox => INBOX_STREAM,
        }
    }

    /// Its durable name for `partition`.
    pub fn name(self, partition: u16) -> String {
        let kind = match self {
            PartitionConsumer::Events => "evt",
            PartitionConsumer::Uplinks => "up",
            PartitionConsumer::Inbox => "inbox",
        };
        format!("state-{kind}-{partition}")
    }

    /// Its definition for `partition`: explicit acks, everything from the start,
    /// redelivery after `ack_wait`.
    pub fn config(self, partition: u16, ack_wait: Duration) -> pull::Config {
        let filter_subject = match self {
            PartitionConsumer::Events => subjects::events_partition(partition),
            PartitionConsumer::Uplinks => subjects::uplink_partition(partition),
            PartitionConsumer::Inbox => subjects::inbox_partition(partition),
        };
        let name = self.name(partition);
        pull::Config {
            durable_name: Some(name),
            filter_subject,
            ack_policy: AckPolicy::Explicit,
            deliver_policy: DeliverPolicy::All,
            ack_wait,
            max_ack_pending: 10_000,
            // A message that keeps failing (a crash while processing it) is given up after
            // this many deliveries instead of blocking the partition forever.
            max_deliver: MAX_DELIVER,
            ..Default::default()
        }
    }
}

/// Settings of the streams and buckets; defaults suit a single local node.
#[derive(Debug, Clone)]
pub struct BusLayout {
    /// Replicas of every stream and bucket (1 on a single node, 3 on a 3-node cluster).
    pub replicas: usize,
    /// How long uplink frames are kept (also bounds the de-duplication horizon).
    pub uplink_max_age: Duration,
    /// De-duplication window of the uplink stream.
    pub uplink_duplicate_window: Duration,
    /// How long events are kept.
    pub events_max_age: Duration,
    /// How long inbox messages are kept for resume.
    pub inbox_max_age: Duration,
    /// Messages kept per device inbox.
    pub inbox_max_per_device: i64,
    /// How long room broadcasts are kept for recovery.
    pub rooms_max_age: Duration,
    /// Messages kept per room.
    pub rooms_max_per_room: i64,
    /// A gateway that stops heart-beating disappears from discovery after this.
    pub gateway_ttl: Duration,
}

impl Default for BusLayout {
    fn default() -> Self {
        Self {
            replicas: 1,
            uplink_max_age: Duration::from_secs(24 * 3600),
            uplink_duplicate_window: Duration::from_secs(120),
            events_max_age: Duration::from_secs(7 * 24 * 3600),
            inbox_max_age: Duration::from_secs(24 * 3600),
            inbox_max_per_device: 10_000,
            rooms_max_age: Duration::from_secs(3600),
            rooms_max_per_room: 10_000,
            gateway_ttl: Duration::from_secs(15),
        }
    }
}

impl BusLayout {
    /// The stream definitions of this layout.
    pub fn streams(&self) -> Vec<stream::Config> {
        let base = stream::Config {
            storage: stream::StorageType::File,
            num_replicas: self.replicas,
            retention: stream::RetentionPolicy::Limits,
            discard: stream::DiscardPolicy::Old,
            allow_direct: true,
            ..Default::default()
        };
        vec![
            stream::Config {
                name: UPLINK_STREAM.into(),
                description: Some(
                    "uplink frames from gateways, deduplicated by app:did:client_msg_id".into(),
                ),
                subjects: vec![subjects::uplink_stream()],
                max_age: self.uplink_max_age,
                duplicate_window: self.uplink_duplicate_window,
                ..base.clone()
            },
            stream::Config {
                name: EVENTS_STREAM.into(),
                description: Some("connection and session events (the event log)".into()),
                subjects: vec![subjects::events_stream()],
                max_age: self.events_max_age,
                duplicate_window: Duration::from_secs(120),
                ..base.clone()
            },
            stream::Config {
                name: INBOX_STREAM.into(),
                description: Some("per-device QoS1 inboxes".into()),
                subjects: vec![subjects::inbox_stream()],
                max_age: self.inbox_max_age,
                max_messages_per_subject: self.inbox_max_per_device,
                duplicate_window: Duration::from_secs(120),
                // Per-app `inbox_retention` is a per-message TTL (`Nats-TTL`).
                allow_message_ttl: true,
                ..base.clone()
            },
            stream::Config {
                name: ROOMS_STREAM.into(),
                description: Some("recoverable room broadcasts".into()),
                subjects: vec![subjects::rooms_stream()],
                max_age: self.rooms_max_age,
                max_messages_per_subject: self.rooms_max_per_room,
                duplicate_window: Duration::from_secs(120),
                ..base
            },
        ]
    }

    /// The KV bucket definitions of this layout.
    pub fn buckets(&self) -> Vec<kv::Config> {
        let base = kv::Config {
            history: 1,
            storage: stream::StorageType::File,
            num_replicas: self.replicas,
            ..Default::default()
        };
        vec![
            kv::Config {
                bucket: ROUTES_BUCKET.into(),
                description: "did -> gateway, region, conn".into(),
                ..base.clone()
            },
            kv::Config {
                bucket: GATEWAYS_BUCKET.into(),
                description: "gateway heartbeats (expire after the TTL)".into(),
                max_age: self.gateway_ttl,
                storage: stream::StorageType::Memory,
                ..base.clone()
            },
            kv::Config {
                bucket: INSTANCES_BUCKET.into(),
                description: "ipconfig instance records (expire after the TTL)".into(),
                max_age: self.gateway_ttl,
                storage: stream::StorageType::Memory,
                ..base.clone()
            },
            kv::Config {
                bucket: SESSIONS_BUCKET.into(),
                description: "session memberships, session index, room settings".into(),
                ..base.clone()
            },
            kv::Config {
                bucket: RECEIPTS_BUCKET.into(),
                description: "receipts of processed uplinks, for resends".into(),
                max_age: self.uplink_duplicate_window,
                storage: stream::StorageType::Memory,
                ..base.clone()
            },
            kv::Config {
                bucket: APPS_BUCKET.into(),
                description: "app configuration and secrets".into(),
                history: 5,
                ..base.clone()
            },
            kv::Config {
                bucket: AFFINITY_BUCKET.into(),
                description: "home regions of users".into(),
                ..base
            },
        ]
    }
}

/// Creates every stream and bucket of `layout` that is missing, leaving existing ones as
/// they are. Every role calls this at start; the state service, which owns the settings,
/// calls [`apply_layout`] to bring existing streams to its configured settings.
pub async fn ensure_layout(js: &jetstream::Context, layout: &BusLayout) -> Result<(), BusError> {
    converge(js, layout, false).await
}

/// Creates or updates every stream and bucket of `layout` to its settings (retention,
/// limits, replicas). Idempotent.
pub async fn apply_layout(js: &jetstream::Context, layout: &BusLayout) -> Result<(), BusError> {
    converge(js, layout, true).await
}

async fn converge(
    js: &jetstream::Context,
    layout: &BusLayout,
    update: bool,
) -> Result<(), BusError> {
    let failed = |what: String| {
        move |e: &dyn std::fmt::Display| BusError::Layout {
            what: what.clone(),
            reason: e.to_string(),
        }
    };
    for config in layout.streams() {
        let fail = failed(config.name.clone());
        if update {
            js.create_or_update_stream(config)
                .await
                .map_err(|e| fail(&e))?;
        } else {
            let mut stream = js
                .get_or_create_stream(config.clone())
                .await
                .map_err(|e| fail(&e))?;
            // A stream made by an older version gets the per-message TTL it now needs
            // (it can be turned on, never off); nothing else of an existing stream changes.
            let existing = &stream.info().await.map_err(|e| fail(&e))?.config;
            if config.allow_message_ttl && !existing.allow_message_ttl {
                let upgraded = stream::Config {
                    allow_message_ttl: true,
                    ..existing.clone()
                };
                js.update_stream(upgraded).await.map_err(|e| fail(&e))?;
            }
        }
    }
    for config in layout.buckets() {
        let fail = failed(config.bucket.clone());
        if update {
            js.create_or_update_key_value(config)
                .await
                .map_err(|e| fail(&e))?;
        } else if js.get_key_value(config.bucket.clone()).await.is_err() {
            js.create_key_value(config).await.map_err(|e| fail(&e))?;
        }
    }
    Ok(())
}
