//! JSON bodies state reads and writes (see PROTOCOL.md sections 10 and 11).

use serde::{Deserialize, Serialize};

/// A connection event from a gateway (`tether.<app>.evt.conn.<p>`).
#[derive(Debug, Clone, Deserialize)]
pub struct ConnEventIn {
    /// `conn.up` or `conn.down`.
    pub kind: String,
    /// App id.
    pub app: String,
    /// User id.
    pub uid: String,
    /// Device id.
    pub did: String,
    /// Gateway id.
    pub gw: String,
    /// Gateway region.
    #[serde(default)]
    pub region: String,
    /// Connection id.
    pub conn: u64,
    /// Resume point sent at LOGIN.
    #[serde(default)]
    pub resume_seq: Option<u64>,
    /// Close reason.
    #[serde(default)]
    pub reason: Option<String>,
}

/// A business service's answer to an uplink request.
#[derive(Debug, Clone, Deserialize, Serialize)]
pub struct UplinkReply {
    /// `stored` or `error`.
    pub status: String,
    /// Server message id, when stored.
    #[serde(default)]
    pub id: Option<String>,
    /// Error code name, when not stored.
    #[serde(default)]
    pub code: Option<String>,
    /// Error text.
    #[serde(default)]
    pub message: Option<String>,
}

/// One accepted push target.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Accepted {
    /// Device id.
    pub did: String,
    /// Per-device sequence (QoS1), 0 for QoS0.
    pub seq: u64,
}

/// The reply to a push request.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PushReply {
    /// Targets stored (QoS1) or written to a gateway (QoS0).
    pub accepted: Vec<Accepted>,
    /// QoS0 targets not connected.
    pub offline: Vec<String>,
    /// Set when the push was refused as a whole.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<ErrorBody>,
}

/// An error in a JSON reply.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ErrorBody {
    /// Error code name (PROTOCOL.md section 8).
    pub code: String,
    /// Explanation.
    pub message: String,
}

/// A presence notification (`tether.<app>.presence`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct PresenceEvent {
    /// App id.
    pub app: String,
    /// User id.
    pub uid: String,
    /// Device id.
    pub did: String,
    /// Gateway id.
    pub gw: String,
    /// Connection id.
    pub conn: u64,
    /// Online or offline.
    pub online: bool,
    /// Unix milliseconds.
    pub at_ms: u64,
}
