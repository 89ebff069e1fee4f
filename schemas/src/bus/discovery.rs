//! Discovery (PROTOCOL.md section 12): the gateway heartbeat that gateways keep in the
//! `tether_gateways` bucket and ipconfig ranks, and ipconfig's `GET /v1/endpoints` answer
//! that device SDKs read.
//!
//! A gateway puts a fresh heartbeat every few seconds; the bucket's TTL removes the record
//! of a gateway that stopped putting, and a gateway that stops cleanly deletes its record.

use serde::{Deserialize, Serialize};

/// Where clients reach a gateway.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AdvertisedEndpoints {
    /// Raw TCP endpoint, `host:port`; absent when the gateway has no TCP listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<String>,
    /// WebSocket URL, `ws://host:port/ws` (or `wss://`); absent without a WebSocket listener.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ws: Option<String>,
}

/// One gateway's live figures, as JSON in `tether_gateways` under the gateway id.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct GatewayHeartbeat {
    /// Gateway id (also the KV key).
    pub id: String,
    /// Tether version of the gateway binary.
    pub version: String,
    /// Region the gateway serves.
    pub region: String,
    /// Dedicated pools the gateway belongs to; empty means the shared pool.
    pub pools: Vec<String>,
    /// Where clients connect.
    pub endpoints: AdvertisedEndpoints,
    /// Open client connections.
    pub connections: u64,
    /// Logged-in connections per app (apps with none are left out).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub apps: std::collections::BTreeMap<String, u64>,
    /// Connections the gateway accepts at most.
    pub capacity: u64,
    /// CPU used by the gateway process, as a share of the whole machine (0.0 to 1.0).
    pub cpu: f64,
    /// Resident memory of the gateway process, in bytes.
    pub mem_bytes: u64,
    /// Messages per second per app over the last interval (apps with no connection
    /// since the gateway started are left out).
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub app_rates: std::collections::BTreeMap<String, AppRates>,
    /// Uplink messages per second from clients (over the last interval).
    pub msgs_in_per_sec: f64,
    /// Frames per second written to clients (over the last interval).
    pub msgs_out_per_sec: f64,
    /// True while the gateway drains: it must not be offered to new clients.
    pub draining: bool,
    /// When the gateway started, unix milliseconds.
    pub started_ms: u64,
    /// The gateway's process id (changes with a restart by hand-off; 0 from older gateways).
    #[serde(default)]
    pub pid: u32,
    /// When this record was written, unix milliseconds (informational: readers judge
    /// freshness by when they received it, so clocks need not agree).
    pub at_ms: u64,
    /// Milliseconds between heartbeats.
    pub interval_ms: u64,
}

/// One app's message rates on one gateway.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct AppRates {
    /// UP frames per second received from the app's devices.
    pub msgs_in_per_sec: f64,
    /// Frames per second written to the app's devices.
    pub msgs_out_per_sec: f64,
}

/// One ipconfig instance's record in `tether_instances` (key `ipconfig.<id>`), put every
/// few seconds and removed by the bucket's TTL when it stops (PROTOCOL.md 12.4).
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default)]
pub struct IpconfigHeartbeat {
    /// Instance id (also in the key).
    pub id: String,
    /// Tether version of the binary.
    pub version: String,
    /// Region it serves.
    pub region: String,
    /// Where devices ask for endpoints (`GET /v1/endpoints`), `host:port`.
    pub http: String,
    /// Live gateways it can offer right now (its own region and peers).
    pub gateways: u64,
    /// Apps it knows.
    pub apps: u64,
    /// Endpoints requests answered since it started (refusals included).
    pub requests: u64,
    /// When it started, unix milliseconds.
    pub started_ms: u64,
    /// When this record was written, unix milliseconds (informational).
    pub at_ms: u64,
    /// Milliseconds between records.
    pub interval_ms: u64,
}

/// One offered gateway of an endpoints answer.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointInfo {
    /// Gateway id.
    pub gw: String,
    /// Its region.
    #[serde(default)]
    pub region: String,
    /// Raw TCP endpoint `host:port`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tcp: Option<String>,
    /// WebSocket URL.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ws: Option<String>,
    /// Its score for this request (higher is better).
    #[serde(default)]
    pub score: f64,
    /// Present and true only for a draining gateway offered last.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub draining: bool,
}

/// The answer of `GET /v1/endpoints`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct EndpointsAnswer {
    /// App id (from the credential).
    #[serde(default)]
    pub app: String,
    /// User id.
    #[serde(default)]
    pub uid: String,
    /// Device id.
    #[serde(default)]
    pub did: String,
    /// The region the ranking preferred (empty = none).
    #[serde(default)]
    pub region: String,
    /// Gateways, best first, at most 8.
    pub endpoints: Vec<EndpointInfo>,
    /// Gateway token for LOGIN at any of them.
    pub token: String,
    /// The token's expiry, unix seconds.
    pub token_exp: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_defaults() -> Result<(), serde_json::Error> {
        let hb = GatewayHeartbeat {
            id: "gw1".into(),
            endpoints: AdvertisedEndpoints {
                tcp: Some("127.0.0.1:7400".into()),
                ws: None,
            },
            capacity: 10,
            ..Default::default()
        };
        let json = serde_json::to_string(&hb)?;
        assert!(json.contains(r#""endpoints":{"tcp":"127.0.0.1:7400"}"#));
        assert_eq!(serde_json::from_str::<GatewayHeartbeat>(&json)?, hb);
        let minimal: GatewayHeartbeat = serde_json::from_str(r#"{"id":"x","future":1}"#)?;
        assert_eq!(minimal.id, "x");
        assert!(!minimal.draining);
        Ok(())
    }
}
