//! The state service's configuration.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Configuration of `tether state` (TOML file, `TETHER_STATE_<FIELD>`, flags).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StateConfig {
    /// NATS server URL(s), comma separated.
    pub nats_url: String,
    /// Credentials and TLS of the NATS connection: the `[nats]` table (`creds_file`,
    /// `nkey_seed_file`, `user`/`password`, `token`, `tls_ca_file`, `tls_cert_file`/
    /// `tls_key_file`, `inbox_prefix`), also `TETHER_NATS_<FIELD>` for every role.
    pub nats: tether_nats::NatsAuth,
    /// Admin HTTP listener: `/healthz`, `/metrics`.
    pub admin_listen: SocketAddr,
    /// Replicas of the streams and buckets created if missing (3 on a cluster).
    pub stream_replicas: usize,
    /// This instance's id (unique among state instances); empty = random.
    pub instance_id: String,
    /// A directory for the instance lock (`tether-state-<instance_id>.lock`), the same for
    /// every process that may run this `instance_id` (the host's, or a volume that moves
    /// with the id). With it, a second live process of the id refuses to start, and a
    /// process restarted after a crash takes its dead predecessor's partition leases over
    /// at once instead of after `lease_ttl_ms`. Empty = no lock (leases expire).
    pub instance_lock_dir: String,
    /// Partition lease time-to-live: a dead instance's partitions move after about this long.
    pub lease_ttl_ms: u64,
    /// How long an inbox or room append is sent again while its stream has no leader (a
    /// NATS node died and the stream elects another, 4–9 s) before the push is answered
    /// `unavailable`. Keep it below the business's push request timeout (5–10 s).
    pub unavailable_retry_ms: u64,
    /// How long to wait for a business service to answer an uplink.
    pub business_timeout_ms: u64,
    /// How long a session request waits for the partition owners to apply its change
    /// before it answers `timeout` (the change is stored and still applies); plus 1 ms per
    /// device of the request.
    pub session_apply_timeout_ms: u64,
    /// Retries of an unanswered uplink request (with backoff 200, 400, 800 ms, …).
    pub business_retries: u32,
    /// Unacknowledged QoS1 messages are resent after this long (and again after each resend).
    pub retransmit_ms: u64,
    /// A device that reconnects within this window is not reported offline.
    pub reconnect_window_ms: u64,
    /// Uplinks processed at once per partition (all devices).
    pub uplink_concurrency: usize,
    /// Uplinks of one device processed at once: their business requests are sent in the
    /// device's order and their UP_ACKs go out in that order; 1 = one at a time (the
    /// business never sees a device's next uplink before it answered the previous one).
    pub uplink_pipeline: usize,
    /// Business requests (pushes, session calls) handled at once by this instance; more
    /// are answered `unavailable` at once ("busy"), so the business backs off.
    pub max_requests_in_progress: usize,
    /// A device offline for longer than this leaves its user's device list (pushes to the
    /// user stop storing for it until it logs in again); 0 keeps every device forever.
    pub forget_devices_after_secs: u64,
    /// How long QoS1 messages stay in a device's inbox for resume (seconds).
    pub inbox_max_age_secs: u64,
    /// QoS1 messages kept per device inbox (older ones are dropped first).
    pub inbox_max_per_device: i64,
    /// How long recoverable room broadcasts are kept for recovery (seconds).
    pub rooms_max_age_secs: u64,
    /// Broadcasts kept per recoverable room (older ones are dropped first).
    pub rooms_max_per_room: i64,
    /// Session pushes to sessions with more members than this go out as one broadcast
    /// that every gateway fans out (throughput first); smaller sessions get one downlink
    /// per member's gateway (latency first, QoS1 possible). Per-app value in `apps`.
    pub broadcast_threshold: usize,
    /// Publish joined/left membership events on `tether.<app>.presence` (per-app value in
    /// `apps`).
    pub membership_events: bool,
    /// Per-app pipeline settings, overriding the defaults above: `[apps.demo]`.
    pub apps: BTreeMap<String, AppPipeline>,
    /// This region's name (the `region` of its gateways); empty = one region, no
    /// cross-region delivery (docs/multi-region.md).
    pub region: String,
    /// The other regions (`[[peer_regions]]` with `name` and JetStream `domain`): pushes
    /// for devices routed there are relayed through `TETHER_XR_<region>`, and theirs are
    /// delivered here from `TETHER_XR_IN`.
    pub peer_regions: Vec<tether_nats::region::Region>,
    /// How long relayed pushes are kept in the relay streams (seconds): the longest
    /// inter-region link outage that loses nothing.
    pub relay_max_age_secs: u64,
    /// How long a push waits for a peer region's route bucket before it uses the region
    /// the device was last found in.
    pub relay_lookup_timeout_ms: u64,
}

/// Per-app overrides of the session pipeline (`[apps.<app>]` in the TOML file).
#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AppPipeline {
    /// Overrides [`StateConfig::broadcast_threshold`].
    pub broadcast_threshold: Option<usize>,
    /// Overrides [`StateConfig::membership_events`].
    pub membership_events: Option<bool>,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats: tether_nats::NatsAuth::default(),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 7410)),
            stream_replicas: 1,
            instance_id: String::new(),
            instance_lock_dir: String::new(),
            lease_ttl_ms: 6_000,
            unavailable_retry_ms: 4_000,
            business_timeout_ms: 5_000,
            session_apply_timeout_ms: 10_000,
            business_retries: 3,
            retransmit_ms: 5_000,
            reconnect_window_ms: 60_000,
            uplink_concurrency: 256,
            uplink_pipeline: 32,
            max_requests_in_progress: 4_096,
            forget_devices_after_secs: 0,
            inbox_max_age_secs: 24 * 3600,
            inbox_max_per_device: 10_000,
            rooms_max_age_secs: 3600,
            rooms_max_per_room: 10_000,
            broadcast_threshold: 100,
            membership_events: false,
            apps: BTreeMap::new(),
            region: String::new(),
            peer_regions: Vec::new(),
            relay_max_age_secs: 24 * 3600,
            relay_lookup_timeout_ms: 500,
        }
    }
}

impl StateConfig {
    /// The broadcast threshold of `app`.
    pub fn broadcast_threshold(&self, app: &str) -> usize {
        self.apps
            .get(app)
            .and_then(|a| a.broadcast_threshold)
            .unwrap_or(self.broadcast_threshold)
    }

    /// Whether `app` gets membership events.
    pub fn membership_events(&self, app: &str) -> bool {
        self.apps
            .get(app)
            .and_then(|a| a.membership_events)
            .unwrap_or(self.membership_events)
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), String> {
        if self.lease_ttl_ms < 300 {
            return Err("lease_ttl_ms must be at least 300".into());
        }
        if self.retransmit_ms == 0
            || self.business_timeout_ms == 0
            || self.session_apply_timeout_ms == 0
        {
            return Err(
                "retransmit_ms, business_timeout_ms and session_apply_timeout_ms must be positive"
                    .into(),
            );
        }
        if self.inbox_max_age_secs == 0 || self.inbox_max_per_device <= 0 {
            return Err("inbox_max_age_secs and inbox_max_per_device must be positive".into());
        }
        if self.rooms_max_age_secs == 0 || self.rooms_max_per_room <= 0 {
            return Err("rooms_max_age_secs and rooms_max_per_room must be positive".into());
        }
        if self.uplink_concurrency == 0
            || self.uplink_pipeline == 0
            || self.max_requests_in_progress == 0
        {
            return Err(
                "uplink_concurrency, uplink_pipeline and max_requests_in_progress must be positive"
                    .into(),
            );
        }
        let valid = tether_schemas::bus::valid_id;
        if !self.region.is_empty() && !valid(&self.region) {
            return Err("region must be [A-Za-z0-9_-]".into());
        }
        if !self.peer_regions.is_empty() && self.region.is_empty() {
            return Err("peer_regions needs this instance's region".into());
        }
        for peer in &self.peer_regions {
            if !valid(&peer.name) || !valid(&peer.domain) || peer.name == self.region {
                return Err(format!(
                    "peer region {:?}: name and domain must be [A-Za-z0-9_-] and the name not this region",
                    peer.name
                ));
            }
        }
        if self.relay_max_age_secs == 0 || self.relay_lookup_timeout_ms == 0 {
            return Err("relay_max_age_secs and relay_lookup_timeout_ms must be positive".into());
        }
        if !self.instance_id.is_empty()
            && !self
                .instance_id
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err("instance_id must be [A-Za-z0-9_-]".into());
        }
        Ok(())
    }
}
