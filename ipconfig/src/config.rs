//! The ipconfig role's configuration: one struct, every field documented.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::apps::AppRecord;

/// Most endpoints one answer carries (DESIGN.md flow 1).
pub const MAX_ENDPOINTS: usize = 8;

/// Configuration of `tether ipconfig` (TOML file, `TETHER_IPCONFIG_<FIELD>`, flags).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct IpconfigConfig {
    /// This instance's id in the ops view (`tether_instances`); empty = random.
    pub id: String,
    /// Milliseconds between this instance's records in `tether_instances`.
    pub record_interval_ms: u64,
    /// NATS server URL(s), comma separated.
    pub nats_url: String,
    /// Credentials and TLS of the NATS connection: the `[nats]` table (`creds_file`,
    /// `nkey_seed_file`, `user`/`password`, `token`, `tls_ca_file`, `tls_cert_file`/
    /// `tls_key_file`, `inbox_prefix`), also `TETHER_NATS_<FIELD>` for every role.
    pub nats: tether_nats::NatsAuth,
    /// Admin HTTP listener: `/healthz`, `/metrics`.
    pub admin_listen: SocketAddr,
    /// Public HTTP listener for devices: `GET /v1/endpoints`.
    pub http_listen: SocketAddr,
    /// Replicas of the streams and buckets created if missing (3 on a cluster).
    pub stream_replicas: usize,
    /// Ed25519 private key (PKCS#8 PEM) that signs gateway tokens; the gateways hold the
    /// public half.
    pub token_key: PathBuf,
    /// Lifetime of the gateway tokens handed out, in seconds.
    pub token_ttl_secs: u64,
    /// Lifetime of the gateway-bound tokens carried by REDIRECT (drain, migration), seconds.
    pub redirect_token_ttl_secs: u64,
    /// Endpoints per answer, at most [`MAX_ENDPOINTS`].
    pub max_endpoints: usize,
    /// A gateway whose last heartbeat arrived longer ago than this is not offered
    /// (milliseconds; the `tether_gateways` bucket's TTL removes it later anyway).
    pub stale_after_ms: u64,
    /// Offer draining gateways at the end of the list instead of leaving them out.
    pub offer_draining: bool,
    /// Gateways whose scores differ by less than this are ties, shuffled per request.
    pub tie_band: f64,
    /// Region assumed for requests that name none; empty = no region preference.
    pub default_region: String,
    /// Other regions whose gateways this ipconfig also offers (after the requester's
    /// region, or instead of it when it has no live gateway): their `tether_gateways`
    /// buckets are followed through their JetStream domains (docs/multi-region.md).
    pub peer_regions: Vec<tether_nats::region::Region>,
    /// Seconds of clock skew tolerated when checking a credential's `exp`.
    pub credential_leeway_secs: u64,
    /// Apps known before anyone ran `tether app add` (first start); a record of the same
    /// id in the `tether_apps` bucket replaces the one here.
    pub apps: Vec<AppRecord>,
}

impl Default for IpconfigConfig {
    fn default() -> Self {
        Self {
            id: String::new(),
            record_interval_ms: 2_000,
            nats_url: "nats://127.0.0.1:4222".into(),
            nats: tether_nats::NatsAuth::default(),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 7420)),
            http_listen: SocketAddr::from(([127, 0, 0, 1], 7421)),
            stream_replicas: 1,
            token_key: PathBuf::from(".tether/token.key"),
            token_ttl_secs: 600,
            redirect_token_ttl_secs: 120,
            max_endpoints: MAX_ENDPOINTS,
            stale_after_ms: 15_000,
            offer_draining: false,
            tie_band: 0.05,
            default_region: String::new(),
            peer_regions: Vec::new(),
            credential_leeway_secs: 0,
            apps: Vec::new(),
        }
    }
}

impl IpconfigConfig {
    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), String> {
        if self.max_endpoints == 0 || self.max_endpoints > MAX_ENDPOINTS {
            return Err(format!("max_endpoints must be 1 to {MAX_ENDPOINTS}"));
        }
        if self.token_ttl_secs == 0 || self.redirect_token_ttl_secs == 0 {
            return Err("token_ttl_secs and redirect_token_ttl_secs must be positive".into());
        }
        if self.stale_after_ms == 0 || self.record_interval_ms == 0 {
            return Err("stale_after_ms and record_interval_ms must be positive".into());
        }
        if !self.id.is_empty() && !tether_auth::valid_id(&self.id) {
            return Err("id must be 1-64 characters of [A-Za-z0-9_-]".into());
        }
        if !(0.0..1.0).contains(&self.tie_band) {
            return Err("tie_band must be at least 0 and below 1".into());
        }
        for app in &self.apps {
            app.validate().map_err(|e| format!("apps: {e}"))?;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn defaults_are_valid_and_bounds_hold() {
        assert!(IpconfigConfig::default().validate().is_ok());
        let too_many = IpconfigConfig {
            max_endpoints: 9,
            ..Default::default()
        };
        assert!(too_many.validate().is_err());
        let bad_band = IpconfigConfig {
            tie_band: 1.5,
            ..Default::default()
        };
        assert!(bad_band.validate().is_err());
    }
}
