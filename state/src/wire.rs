//! JSON bodies state reads (PROTOCOL.md section 10); the business API's bodies are the
//! shared types of `tether_business::wire`.

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
    /// Sessions the token joins at login (`conn.up` only).
    #[serde(default)]
    pub sessions: Vec<String>,
}

/// Just the kind of an event, to pick its shape.
#[derive(Debug, Deserialize)]
pub struct EventKind {
    /// `conn.up`, `conn.down`, `sess.bind`, `sess.unbind` or `sess.replace`.
    pub kind: String,
}

/// A membership change of one device, written by the session API to
/// `tether.<app>.evt.sess.<p>` and applied by the device's partition owner.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionEvent {
    /// `sess.bind`, `sess.unbind` or `sess.replace`.
    pub kind: String,
    /// App id.
    pub app: String,
    /// Device id.
    pub did: String,
    /// Sessions bound, unbound, or the device's new set.
    pub sessions: Vec<String>,
    /// Unix milliseconds.
    pub at_ms: u64,
}

/// A control message to one gateway (`tether.gw.<gw>.ctl`): the device's complete set of
/// sessions (`{"op":"sessions","app":…,"did":…,"sessions":[…]}`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GatewaySessions {
    /// Always `sessions`.
    pub op: String,
    /// App id.
    pub app: String,
    /// Device id.
    pub did: String,
    /// Every session the device is bound to now.
    pub sessions: Vec<String>,
}
