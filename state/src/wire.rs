//! JSON bodies state reads (PROTOCOL.md section 10); the business API's bodies are the
//! shared types of `tether_business::wire`.

use serde::Deserialize;

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
