//! The business API (PROTOCOL.md section 11): uplink requests and their replies, pushes,
//! presence. The header side of [`Uplink`] and [`Push`] is in the bus crate
//! (`tether_nats::headers::HeaderCodec`), which owns every header name.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::errors::{ReplyWire, WireError, default_code as rejected, read_code as lenient_code};
use super::ids::valid_id;
use crate::ErrorCode;

/// Most dids plus uids one push may name (a session push names none).
pub const MAX_PUSH_TARGETS: usize = 10_000;
/// Most `Tether-Meta-*` entries of one push.
pub const MAX_META_ENTRIES: usize = 32;
/// Longest meta value, in bytes.
pub const MAX_META_VALUE_LEN: usize = 1024;

/// Queue group the documentation suggests for uplink handlers (any name works).
pub const DEFAULT_QUEUE_GROUP: &str = "tether-biz";

/// The reply of a business service to an uplink request (the body of the NATS reply).
///
/// `{"status":"stored","id":"m-17"}` (`id` optional) or
/// `{"status":"error","code":"rejected","message":"blocked"}` (`code` defaults to
/// `rejected`, `message` to empty). Re-exported by the business SDK as `Stored`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "status", rename_all = "snake_case")]
pub enum UplinkReply {
    /// Stored (now, or already by an earlier delivery of the same msg id): the device
    /// gets UP_ACK code 0 with `server_msg_id` = `id`.
    Stored {
        /// Id the business gave the stored message; becomes `UpAck.server_msg_id`.
        #[serde(default, skip_serializing_if = "Option::is_none")]
        id: Option<String>,
    },
    /// Not stored: the device gets UP_ACK with this code and message.
    Error {
        /// Error code (section 8 name); missing or unknown names read as `rejected`.
        #[serde(default = "rejected", deserialize_with = "lenient_code")]
        code: ErrorCode,
        /// Human-readable detail (may be empty).
        #[serde(default)]
        message: String,
    },
}

impl UplinkReply {
    /// Stored, with the business service's id for the message (if any).
    pub fn stored(id: Option<String>) -> Self {
        UplinkReply::Stored { id }
    }

    /// Not stored, with `code` and detail.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        UplinkReply::Error {
            code,
            message: message.into(),
        }
    }

    /// Refused by the business rules (`rejected`).
    pub fn rejected(message: impl Into<String>) -> Self {
        UplinkReply::error(ErrorCode::Rejected, message)
    }

    /// The JSON body.
    pub fn to_json(&self) -> Bytes {
        super::to_json_or(
            self,
            br#"{"status":"error","code":"internal","message":"encode"}"#,
        )
    }

    /// Parses a reply body.
    pub fn from_json(body: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(body)
    }
}

/// One uplink request as a business service sees it (headers decoded, body unchanged).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Uplink {
    /// App id (`Tether-App`).
    pub app: String,
    /// User id of the sender (`Tether-Uid`).
    pub uid: String,
    /// Device id of the sender (`Tether-Did`).
    pub did: String,
    /// The UP's `client_msg_id` (`Tether-Msg-Id`); dedupe on (app, did, msg_id).
    pub msg_id: u64,
    /// The UP's session (`Tether-Session`), absent when empty.
    pub session: Option<String>,
    /// Gateway that holds the sender's connection (`Tether-Gw`).
    pub gw: String,
    /// Connection id (`Tether-Conn`).
    pub conn: u64,
    /// The UP body, unchanged.
    pub body: Bytes,
}

/// A push: a downlink from a business service to devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    /// Target devices (`Tether-Did`).
    pub dids: Vec<String>,
    /// Target users: every device of each (`Tether-Uid`).
    pub uids: Vec<String>,
    /// `Some(true)`: QoS1 (stored, resent until acked); `Some(false)`: QoS0 (online
    /// devices only); `None` (no `Tether-Qos` header): the app's `qos_default`, which is
    /// QoS1 unless an operator set it to 0 (PROTOCOL 12.4).
    pub qos1: Option<bool>,
    /// Copied to `DOWN.session` (`Tether-Session`).
    pub session: Option<String>,
    /// Copied to `DOWN.meta` (`Tether-Meta-<name>`); names are lowercase
    /// `[a-z0-9_-]{1,64}` on the way out (uppercase letters are lowercased).
    pub meta: BTreeMap<String, String>,
    /// The payload: becomes the DOWN body.
    pub body: Bytes,
    /// Push id (`Tether-Push-Id`): a retry with the same id within two minutes stores
    /// nothing new (QoS1 and rooms) and gets the first answer's sequences. The SDK gives
    /// every push a fresh id when it is built, so retrying the same value is idempotent.
    pub id: Option<String>,
}
impl Push {
    /// A push of `body` to devices, with the app's `qos_default` (QoS1 unless an operator
    /// set it to 0); [`Push::qos1`] and [`Push::qos0`] choose explicitly.
    pub fn to_dids<I, S>(dids: I, body: impl Into<Bytes>) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Push {
            dids: dids.into_iter().map(Into::into).collect(),
            uids: Vec::new(),
            qos1: None,
            session: None,
            meta: BTreeMap::new(),
            body: body.into(),
            id: Some(new_push_id()),
        }
    }

    /// A push of `body` to every device of these users (QoS as [`Push::to_dids`]).
    pub fn to_uids<I, S>(uids: I, body: impl Into<Bytes>) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Push {
            uids: uids.into_iter().map(Into::into).collect(),
            ..Push::to_dids(Vec::<String>::new(), body)
        }
    }

    /// Best effort (QoS0): delivered to devices online now, else dropped.
    pub fn qos0(mut self) -> Self {
        self.qos1 = Some(false);
        self
    }

    /// Stored and resent until acknowledged (QoS1), whatever the app's `qos_default`.
    pub fn qos1(mut self) -> Self {
        self.qos1 = Some(true);
        self
    }

    /// A push of `body` to every member of a session (no `Tether-Did`/`Tether-Uid`
    /// header): state delivers it per member (small sessions) or as one broadcast that
    /// every gateway fans out to its local members (sessions above the app's threshold,
    /// and recoverable rooms). The app's `qos_default` (QoS1 unless set); large sessions are delivered QoS0, and
    /// recoverable rooms through the room stream (section 11.5).
    pub fn to_session(session: impl Into<String>, body: impl Into<Bytes>) -> Self {
        Push {
            session: Some(session.into()),
            ..Push::to_dids(Vec::<String>::new(), body)
        }
    }

    /// Whether the session itself is the target (no dids and no uids).
    pub fn is_session_push(&self) -> bool {
        self.dids.is_empty() && self.uids.is_empty() && self.session.is_some()
    }

    /// Sets `DOWN.session`.
    pub fn session(mut self, session: impl Into<String>) -> Self {
        self.session = Some(session.into());
        self
    }

    /// Sets the push id (any valid id; unique per distinct push of the app).
    pub fn id(mut self, id: impl Into<String>) -> Self {
        self.id = Some(id.into());
        self
    }

    /// Adds a meta entry (`Tether-Meta-<name>`).
    pub fn meta(mut self, name: impl Into<String>, value: impl Into<String>) -> Self {
        self.meta.insert(name.into(), value.into());
        self
    }

    /// Checks the rules of section 11.2: at least one target (dids, uids, or a session
    /// alone), every did/uid/session a valid id, meta names valid ids, meta values without
    /// CR/LF.
    pub fn validate(&self) -> Result<(), WireError> {
        if self.dids.is_empty() && self.uids.is_empty() && self.session.is_none() {
            return Err(WireError::bad_request("no target"));
        }
        if self.dids.len() + self.uids.len() > MAX_PUSH_TARGETS {
            return Err(WireError::bad_request(format!(
                "more than {MAX_PUSH_TARGETS} dids and uids in one push"
            )));
        }
        if let Some(id) = &self.id
            && !valid_id(id)
        {
            return Err(WireError::bad_request(format!("invalid push id {id:?}")));
        }
        if self.meta.len() > MAX_META_ENTRIES {
            return Err(WireError::bad_request(format!(
                "more than {MAX_META_ENTRIES} meta entries"
            )));
        }
        if let Some((name, _)) = self.meta.iter().find(|(_, v)| v.len() > MAX_META_VALUE_LEN) {
            return Err(WireError::bad_request(format!(
                "meta {name:?}: value longer than {MAX_META_VALUE_LEN} bytes"
            )));
        }
        for did in &self.dids {
            if !valid_id(did) {
                return Err(WireError::bad_request(format!("invalid did {did:?}")));
            }
        }
        for uid in &self.uids {
            if !valid_id(uid) {
                return Err(WireError::bad_request(format!("invalid uid {uid:?}")));
            }
        }
        if let Some(session) = &self.session
            && !valid_id(session)
        {
            return Err(WireError::bad_request(format!(
                "invalid session {session:?}"
            )));
        }
        for (name, value) in &self.meta {
            if !valid_id(name) {
                return Err(WireError::bad_request(format!(
                    "invalid meta name {name:?}"
                )));
            }
            if value.contains(['\r', '\n']) {
                return Err(WireError::bad_request(format!(
                    "meta {name:?}: value contains CR or LF"
                )));
            }
        }
        Ok(())
    }
}

/// The success reply to a push sent as a request. Re-exported as the SDK.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushReply {
    /// QoS1: targets whose inbox now holds the message, with its per-device seq.
    /// QoS0: targets it was written to a gateway for (seq 0).
    #[serde(default)]
    pub accepted: Vec<Accepted>,
    /// QoS0 only: targets not connected right now (the message was dropped for them).
    #[serde(default)]
    pub offline: Vec<String>,
    /// QoS0 only: targets whose gateway could not be written to (NATS refused or lost the
    /// publish); nothing was delivered to them. Absent when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub failed: Vec<String>,
    /// How it was delivered: `direct` (per device, through each device's gateway),
    /// `broadcast` (one message every gateway fans out to its local targets) or `room`
    /// (stored in a recoverable room, then fanned out).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    /// Session pushes: the session's member count when the push was handled.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub members: Option<usize>,
    /// Recoverable rooms: the broadcast's room sequence (`DOWN.room_seq`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub room_seq: Option<u64>,
    /// Targets routed in another region: the push is stored in this region's relay
    /// stream and delivered there with the device's own sequence (not known here).
    /// Absent when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub relayed: Vec<String>,
}

/// One accepted target of a push.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Accepted {
    /// Device id.
    pub did: String,
    /// The message's per-device sequence (`DOWN.seq`); 0 for QoS0.
    #[serde(default)]
    pub seq: u64,
}

/// A fresh push id: time, process and a counter, unique without coordination.
fn new_push_id() -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos() as u64);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("p{nanos:x}-{:x}-{n:x}", std::process::id())
}

/// The reply body to a push request.
pub type PushReplyWire = ReplyWire<PushReply>;

/// A presence change, published by state as JSON on `tether.<app>.presence`.
/// Re-exported by the business SDK as `Presence`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceEvent {
    /// App id.
    pub app: String,
    /// User id.
    pub uid: String,
    /// Device id.
    pub did: String,
    /// Gateway holding (online) or that last held (offline) the connection.
    pub gw: String,
    /// Connection id.
    pub conn: u64,
    /// Online (`true`) or offline (`false`).
    pub online: bool,
    /// When it happened, milliseconds since the Unix epoch.
    pub at_ms: u64,
}

impl PresenceEvent {
    /// The JSON body.
    pub fn to_json(&self) -> Bytes {
        super::to_json_or(self, b"{}")
    }

    /// Parses an event body.
    pub fn from_json(body: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uplink_reply_json() -> Result<(), serde_json::Error> {
        let stored = UplinkReply::stored(Some("m1".into()));
        assert_eq!(
            String::from_utf8_lossy(&stored.to_json()),
            r#"{"status":"stored","id":"m1"}"#
        );
        assert_eq!(
            String::from_utf8_lossy(&UplinkReply::stored(None).to_json()),
            r#"{"status":"stored"}"#
        );
        assert_eq!(
            String::from_utf8_lossy(&UplinkReply::rejected("no").to_json()),
            r#"{"status":"error","code":"rejected","message":"no"}"#
        );
        assert_eq!(
            UplinkReply::from_json(br#"{"status":"error"}"#)?,
            UplinkReply::error(ErrorCode::Rejected, "")
        );
        assert_eq!(
            UplinkReply::from_json(br#"{"status":"error","code":"what","message":"x"}"#)?,
            UplinkReply::error(ErrorCode::Rejected, "x")
        );
        assert_eq!(
            UplinkReply::from_json(br#"{"status":"error","code":"rate_limited"}"#)?,
            UplinkReply::error(ErrorCode::RateLimited, "")
        );
        assert_eq!(
            UplinkReply::from_json(br#"{"status":"stored","extra":1}"#)?,
            UplinkReply::stored(None)
        );
        assert!(UplinkReply::from_json(br#"{"status":"maybe"}"#).is_err());
        Ok(())
    }

    #[test]
    fn push_reply_json() -> Result<(), serde_json::Error> {
        let ok = PushReplyWire::Ok(PushReply {
            accepted: vec![Accepted {
                did: "d1".into(),
                seq: 12,
            }],
            offline: vec!["d9".into()],
            ..Default::default()
        });
        let json = ok.to_json();
        assert_eq!(
            String::from_utf8_lossy(&json),
            r#"{"accepted":[{"did":"d1","seq":12}],"offline":["d9"]}"#
        );
        assert_eq!(PushReplyWire::from_json(&json)?, ok);
        let err = PushReplyWire::error(ErrorCode::BadRequest, "no target");
        assert_eq!(
            String::from_utf8_lossy(&err.to_json()),
            r#"{"error":{"code":"bad_request","message":"no target"}}"#
        );
        assert_eq!(
            PushReplyWire::from_json(br#"{"error":{"code":"bad_request","message":"no target"}}"#)?,
            err
        );
        assert_eq!(
            PushReplyWire::from_json(b"{}")?,
            PushReplyWire::Ok(PushReply::default())
        );
        Ok(())
    }

    #[test]
    fn presence_json() -> Result<(), serde_json::Error> {
        let json = br#"{"app":"demo","uid":"alice","did":"phone1","gw":"gw1","conn":4295032833,"online":true,"at_ms":1795686000000}"#;
        let event = PresenceEvent::from_json(json)?;
        assert!(event.online);
        assert_eq!(event.conn, 4_295_032_833);
        assert_eq!(event.to_json().as_ref(), json.as_slice());
        Ok(())
    }
}
