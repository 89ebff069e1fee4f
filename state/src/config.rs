//! The state service's configuration.

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Configuration of `tether state` (TOML file, `TETHER_STATE_<FIELD>`, flags).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StateConfig {
    /// NATS server URL(s), comma separated.
    pub nats_url: String,
    /// Admin HTTP listener: `/healthz`, `/metrics`.
    pub admin_listen: SocketAddr,
    /// Replicas of the streams and buckets created if missing (3 on a cluster).
    pub stream_replicas: usize,
    /// This instance's id (unique among state instances); empty = random.
    pub instance_id: String,
    /// Partition lease time-to-live: a dead instance's partitions move after about this long.
    pub lease_ttl_ms: u64,
    /// How long to wait for a business service to answer an uplink.
    pub business_timeout_ms: u64,
    /// Retries of an unanswered uplink request (with backoff 200, 400, 800 ms, …).
    pub business_retries: u32,
    /// Unacknowledged QoS1 messages are resent after this long (and again after each resend).
    pub retransmit_ms: u64,
    /// A device that reconnects within this window is not reported offline.
    pub reconnect_window_ms: u64,
    /// Uplinks processed at once per partition.
    pub uplink_concurrency: usize,
    /// How long QoS1 messages stay in a device's inbox for resume (seconds).
    pub inbox_max_age_secs: u64,
    /// QoS1 messages kept per device inbox (older ones are dropped first).
    pub inbox_max_per_device: i64,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            nats_url: "nats://127.0.0.1:4222".into(),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 7410)),
            stream_replicas: 1,
            instance_id: String::new(),
            lease_ttl_ms: 6_000,
            business_timeout_ms: 5_000,
            business_retries: 3,
            retransmit_ms: 5_000,
            reconnect_window_ms: 60_000,
            uplink_concurrency: 64,
            inbox_max_age_secs: 24 * 3600,
            inbox_max_per_device: 10_000,
        }
    }
}

impl StateConfig {
    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), String> {
        if self.lease_ttl_ms < 300 {
            return Err("lease_ttl_ms must be at least 300".into());
        }
        if self.retransmit_ms == 0 || self.business_timeout_ms == 0 {
            return Err("retransmit_ms and business_timeout_ms must be positive".into());
        }
        if self.inbox_max_age_secs == 0 || self.inbox_max_per_device <= 0 {
            return Err("inbox_max_age_secs and inbox_max_per_device must be positive".into());
        }
        if self.uplink_concurrency == 0 {
            return Err("uplink_concurrency must be positive".into());
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
