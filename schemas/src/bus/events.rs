//! The event log (`tether.<app>.evt.conn.<p>`, `tether.<app>.evt.sess.<p>`, stream
//! TETHER_EVENTS): what the partition owner of a device replays to rebuild its state.
//!
//! One JSON object per event, tagged by `kind` (PROTOCOL.md 10.3 and 10.5). Gateways write
//! connection events; the session API writes session events; state reads both in order.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::sessions::SessionOp;

/// One event of the log.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "kind")]
pub enum Event {
    /// A device logged in on a gateway.
    #[serde(rename = "conn.up")]
    ConnUp(ConnEvent),
    /// A device's connection closed.
    #[serde(rename = "conn.down")]
    ConnDown(ConnEvent),
    /// Sessions added to a device's set.
    #[serde(rename = "sess.bind")]
    SessBind(SessionChange),
    /// Sessions removed from a device's set.
    #[serde(rename = "sess.unbind")]
    SessUnbind(SessionChange),
    /// A device's whole set replaced.
    #[serde(rename = "sess.replace")]
    SessReplace(SessionChange),
}

impl Event {
    /// The `kind` tag (`conn.up`, …), for logs, metrics and de-duplication ids.
    pub fn kind(&self) -> &'static str {
        match self {
            Event::ConnUp(_) => "conn.up",
            Event::ConnDown(_) => "conn.down",
            Event::SessBind(_) => "sess.bind",
            Event::SessUnbind(_) => "sess.unbind",
            Event::SessReplace(_) => "sess.replace",
        }
    }

    /// The session event of a business `op` (`None` for `configure`, which is no event).
    pub fn session(op: SessionOp, change: SessionChange) -> Option<Event> {
        match op {
            SessionOp::Bind => Some(Event::SessBind(change)),
            SessionOp::Unbind => Some(Event::SessUnbind(change)),
            SessionOp::Replace => Some(Event::SessReplace(change)),
            SessionOp::Configure => None,
        }
    }

    /// The JSON body.
    pub fn to_json(&self) -> Result<Bytes, serde_json::Error> {
        serde_json::to_vec(self).map(Bytes::from)
    }

    /// Parses an event body.
    pub fn from_json(body: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(body)
    }
}

/// A connect (`conn.up`) or disconnect (`conn.down`) of one device connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConnEvent {
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
    /// Peer address.
    #[serde(default)]
    pub remote: String,
    /// Highest contiguous QoS1 sequence the device reported processed at LOGIN (`conn.up`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resume_seq: Option<u64>,
    /// Close reason (`conn.down`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    /// Sessions the token joins (`conn.up`; state binds them).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sessions: Vec<String>,
    /// Unix milliseconds.
    #[serde(default)]
    pub at_ms: u64,
}

/// A membership change of one device, written by the session API and applied by the
/// device's partition owner.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionChange {
    /// App id.
    pub app: String,
    /// Device id.
    pub did: String,
    /// Sessions bound, unbound, or the device's new set.
    pub sessions: Vec<String>,
    /// Unix milliseconds.
    #[serde(default)]
    pub at_ms: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_tagged_by_kind() -> Result<(), serde_json::Error> {
        let up = Event::ConnUp(ConnEvent {
            app: "demo".into(),
            uid: "alice".into(),
            did: "d1".into(),
            gw: "gw1".into(),
            conn: 7,
            resume_seq: Some(3),
            ..Default::default()
        });
        let json = String::from_utf8_lossy(&up.to_json()?).to_string();
        assert!(
            json.starts_with(r#"{"kind":"conn.up","app":"demo""#),
            "{json}"
        );
        assert!(!json.contains("reason"));
        assert_eq!(Event::from_json(json.as_bytes())?, up);
        let bind = Event::from_json(
            br#"{"kind":"sess.bind","app":"demo","did":"d1","sessions":["r"],"at_ms":1}"#,
        )?;
        assert_eq!(bind.kind(), "sess.bind");
        assert!(Event::from_json(br#"{"kind":"sess.explode","app":"a"}"#).is_err());
        Ok(())
    }
}
