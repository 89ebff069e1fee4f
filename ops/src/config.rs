//! The one configuration struct of `tether ops` (TOML file, `TETHER_OPS_<FIELD>`, flags).

use std::net::SocketAddr;

use serde::{Deserialize, Serialize};

/// Configuration of `tether ops`.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OpsConfig {
    /// NATS server URL(s), comma separated.
    pub nats_url: String,
    /// Credentials and TLS of the NATS connection: the `[nats]` table (`creds_file`,
    /// `nkey_seed_file`, `user`/`password`, `token`, `tls_ca_file`, `tls_cert_file`/
    /// `tls_key_file`, `inbox_prefix`), also `TETHER_NATS_<FIELD>` for every role.
    pub nats: tether_service::NatsAuth,
    /// HTTP listener: `/healthz`, `/metrics`, the operations API (`/v1/…`) and the web
    /// dashboard (`/`).
    pub admin_listen: SocketAddr,
    /// Replicas of the streams and buckets created if missing (3 on a cluster).
    pub stream_replicas: usize,
    /// Bearer tokens that may use the operations API and the dashboard's data. Empty: the
    /// API is open on a loopback listener and refused (403) on any other.
    pub admin_tokens: Vec<String>,
    /// NATS monitoring endpoints (`http://host:8222`, comma separated) whose `/varz` and
    /// `/jsz` the cluster view shows; empty leaves the NATS part out.
    pub nats_monitor_urls: String,
    /// How often the cluster view polls the NATS monitoring endpoints, milliseconds.
    pub monitor_interval_ms: u64,
    /// A gateway whose last heartbeat is older than this leaves the view (milliseconds;
    /// the `tether_gateways` bucket's TTL by default).
    pub gateway_stale_ms: u64,
    /// Seconds one gateway of a rolling restart may take (its hand-off, then its
    /// successor's heartbeat with the connections it took over); past it the roll stops.
    pub restart_timeout_secs: u64,
}

impl Default for OpsConfig {
    fn default() -> Self {
        Self {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats: tether_service::NatsAuth::default(),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 7430)),
            stream_replicas: 1,
            admin_tokens: Vec::new(),
            nats_monitor_urls: String::new(),
            monitor_interval_ms: 2_000,
            gateway_stale_ms: 15_000,
            restart_timeout_secs: 120,
        }
    }
}

impl OpsConfig {
    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), String> {
        if self.admin_tokens.iter().any(|t| t.len() < 16) {
            return Err("admin_tokens must be at least 16 characters each".into());
        }
        if self.monitor_interval_ms < 100 {
            return Err("monitor_interval_ms must be at least 100".into());
        }
        if self.restart_timeout_secs == 0 {
            return Err("restart_timeout_secs must be positive".into());
        }
        if self.gateway_stale_ms < 1_000 {
            return Err("gateway_stale_ms must be at least 1000".into());
        }
        for url in self.monitor_urls() {
            if !url.starts_with("http://") {
                return Err(format!(
                    "nats_monitor_urls: {url:?} must start with http://"
                ));
            }
        }
        Ok(())
    }

    /// The monitoring endpoints, trimmed, without empty entries.
    pub fn monitor_urls(&self) -> Vec<String> {
        self.nats_monitor_urls
            .split(',')
            .map(|u| u.trim().trim_end_matches('/').to_string())
            .filter(|u| !u.is_empty())
            .collect()
    }
}
