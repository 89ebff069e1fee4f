//! The business API on the wire: header names, JSON shapes and header (de)coding.
//!
//! Both sides use these types: business services (through [`crate::Business`]) and the
//! state service, so the two can never disagree on a field name. Everything here follows
//! `schemas/PROTOCOL.md`, section 11, which is the normative text for other languages.

use std::collections::{BTreeMap, BTreeSet};

use async_nats::HeaderMap;
use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize};
use tether_schemas::ErrorCode;

/// Header names of the business API.
///
/// The first six are the shared names from [`tether_nats::subjects::headers`], re-exported
/// so that a business service needs one import; the rest exist only on business subjects.
pub mod headers {
    /// Uplink requests: the UP's `client_msg_id`, decimal u64. Business services dedupe on
    /// (app, did, this).
    pub use tether_nats::subjects::headers::MSG_ID_CLIENT as MSG_ID;
    pub use tether_nats::subjects::headers::{
        APP, CONN, DID, GATEWAY, META_PREFIX, QOS, SESSION, UID,
    };
}

/// Queue group the documentation suggests for uplink handlers (any name works).
pub const DEFAULT_QUEUE_GROUP: &str = "tether-biz";

/// Longest identifier (did, uid, session, meta name), in bytes.
pub use tether_auth::MAX_ID_LEN;
/// True when `s` is 1..=64 characters of `[A-Za-z0-9_-]`, the rule for every did, uid,
/// session and meta name on the business API (the same rule as in tokens).
pub use tether_auth::valid_id;

/// An error as carried in JSON: `{"code":"bad_request","message":"no target"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    /// Error code, serialized as its section-8 name. Missing or unknown names read as
    /// `rejected`.
    #[serde(default = "rejected", deserialize_with = "lenient_code")]
    pub code: ErrorCode,
    /// Human-readable detail (may be empty).
    #[serde(default)]
    pub message: String,
}

impl WireError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        WireError {
            code,
            message: message.into(),
        }
    }

    /// A `bad_request` error.
    pub fn bad_request(message: impl Into<String>) -> Self {
        WireError::new(ErrorCode::BadRequest, message)
    }
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for WireError {}

fn rejected() -> ErrorCode {
    ErrorCode::Rejected
}

/// Reads an error code name; an unknown name (a newer code, or a typo of the business
/// service) becomes `rejected` instead of failing the whole reply.
fn lenient_code<'de, D: Deserializer<'de>>(de: D) -> Result<ErrorCode, D::Error> {
    let name = String::deserialize(de)?;
    Ok(name.parse().unwrap_or(ErrorCode::Rejected))
}

/// The reply of a business service to an uplink request (the body of the NATS reply).
///
/// `{"status":"stored","id":"m-17"}` (`id` optional) or
/// `{"status":"error","code":"rejected","message":"blocked"}` (`code` defaults to
/// `rejected`, `message` to empty). Re-exported as [`crate::Stored`].
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
        // Serializing these plain structs cannot fail; fall back to a fixed error anyway.
        serde_json::to_vec(self)
            .map(Bytes::from)
            .unwrap_or_else(|_| {
                Bytes::from_static(br#"{"status":"error","code":"internal","message":"encode"}"#)
            })
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

impl Uplink {
    /// The request headers (what state sends). Panics never: values that are not valid
    /// header values (CR/LF) are refused with `bad_request`.
    pub fn to_headers(&self) -> Result<HeaderMap, WireError> {
        let mut map = HeaderMap::new();
        put(&mut map, headers::APP, &self.app)?;
        put(&mut map, headers::UID, &self.uid)?;
        put(&mut map, headers::DID, &self.did)?;
        put(&mut map, headers::MSG_ID, &self.msg_id.to_string())?;
        if let Some(session) = self.session.as_deref().filter(|s| !s.is_empty()) {
            put(&mut map, headers::SESSION, session)?;
        }
        put(&mut map, headers::GATEWAY, &self.gw)?;
        put(&mut map, headers::CONN, &self.conn.to_string())?;
        Ok(map)
    }

    /// Decodes a request (what business services receive). Missing or malformed required
    /// headers give `bad_request`.
    pub fn from_message(headers: Option<&HeaderMap>, body: Bytes) -> Result<Self, WireError> {
        let empty = HeaderMap::new();
        let map = headers.unwrap_or(&empty);
        let required = |name: &str| {
            single(map, name)
                .filter(|v| !v.is_empty())
                .ok_or_else(|| WireError::bad_request(format!("missing header {name}")))
        };
        let number = |name: &str| {
            required(name)?
                .parse::<u64>()
                .map_err(|_| WireError::bad_request(format!("header {name} is not a u64")))
        };
        Ok(Uplink {
            app: required(headers::APP)?.to_owned(),
            uid: required(headers::UID)?.to_owned(),
            did: required(headers::DID)?.to_owned(),
            msg_id: number(headers::MSG_ID)?,
            session: single(map, headers::SESSION)
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
            gw: required(headers::GATEWAY)?.to_owned(),
            conn: number(headers::CONN)?,
            body,
        })
    }
}

/// A push: a downlink from a business service to devices.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Push {
    /// Target devices (`Tether-Did`).
    pub dids: Vec<String>,
    /// Target users: every device of each (`Tether-Uid`).
    pub uids: Vec<String>,
    /// QoS1 (stored, resent until acked; the default) or QoS0 (online devices only).
    pub qos1: bool,
    /// Copied to `DOWN.session` (`Tether-Session`).
    pub session: Option<String>,
    /// Copied to `DOWN.meta` (`Tether-Meta-<name>`); names are lowercase
    /// `[a-z0-9_-]{1,64}` on the way out (uppercase letters are lowercased).
    pub meta: BTreeMap<String, String>,
    /// The payload: becomes the DOWN body.
    pub body: Bytes,
}

impl Push {
    /// A QoS1 push of `body` to devices.
    pub fn to_dids<I, S>(dids: I, body: impl Into<Bytes>) -> Self
    where
        I: IntoIterator<Item = S>,
        S: Into<String>,
    {
        Push {
            dids: dids.into_iter().map(Into::into).collect(),
            uids: Vec::new(),
            qos1: true,
            session: None,
            meta: BTreeMap::new(),
            body: body.into(),
        }
    }

    /// A QoS1 push of `body` to every device of these users.
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
        self.qos1 = false;
        self
    }

    /// A push of `body` to every member of a session (no `Tether-Did`/`Tether-Uid`
    /// header): state delivers it per member (small sessions) or as one broadcast that
    /// every gateway fans out to its local members (sessions above the app's threshold,
    /// and recoverable rooms). QoS1 by default; large sessions are delivered QoS0, and
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

    /// Adds one `DOWN.meta` entry.
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

    /// The push headers (what a business service sends), after [`Push::validate`].
    pub fn to_headers(&self) -> Result<HeaderMap, WireError> {
        self.validate()?;
        let mut map = HeaderMap::new();
        if !self.dids.is_empty() {
            put(&mut map, headers::DID, &self.dids.join(","))?;
        }
        if !self.uids.is_empty() {
            put(&mut map, headers::UID, &self.uids.join(","))?;
        }
        put(&mut map, headers::QOS, if self.qos1 { "1" } else { "0" })?;
        if let Some(session) = &self.session {
            put(&mut map, headers::SESSION, session)?;
        }
        for (name, value) in &self.meta {
            let header = format!("{}{}", headers::META_PREFIX, name.to_ascii_lowercase());
            let header: async_nats::header::HeaderName = header
                .parse()
                .map_err(|_| WireError::bad_request(format!("invalid meta name {name:?}")))?;
            let value: async_nats::HeaderValue = value
                .parse()
                .map_err(|_| WireError::bad_request(format!("invalid meta value {name:?}")))?;
            map.insert(header, value);
        }
        Ok(map)
    }

    /// Decodes a push (what state receives) and validates it. Target lists are trimmed,
    /// empty entries skipped and duplicates removed (first occurrence kept); meta names are
    /// lowercased (a later header wins on a repeated name).
    pub fn from_message(headers: Option<&HeaderMap>, body: Bytes) -> Result<Self, WireError> {
        let empty = HeaderMap::new();
        let map = headers.unwrap_or(&empty);
        let qos1 = match single(map, headers::QOS).map(str::trim) {
            None | Some("1") => true,
            Some("0") => false,
            Some(other) => {
                return Err(WireError::bad_request(format!(
                    "{} must be 0 or 1, not {other:?}",
                    headers::QOS
                )));
            }
        };
        let session = single(map, headers::SESSION)
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned);
        let mut meta = BTreeMap::new();
        for (name, values) in map.iter() {
            let name: &str = name.as_ref();
            let Some(key) = strip_prefix_ignore_case(name, headers::META_PREFIX) else {
                continue;
            };
            if let Some(value) = values.last() {
                meta.insert(key.to_ascii_lowercase(), value.as_str().to_owned());
            }
        }
        let push = Push {
            dids: list(map, headers::DID),
            uids: list(map, headers::UID),
            qos1,
            session,
            meta,
            body,
        };
        push.validate()?;
        Ok(push)
    }
}

/// The success reply to a push sent as a request. Re-exported as [`crate::PushReply`].
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushReply {
    /// QoS1: targets whose inbox now holds the message, with its per-device seq.
    /// QoS0: targets it was written to a gateway for (seq 0).
    #[serde(default)]
    pub accepted: Vec<Accepted>,
    /// QoS0 only: targets not connected right now (the message was dropped for them).
    #[serde(default)]
    pub offline: Vec<String>,
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

/// The reply body to a request of the business API (push, session): the success value
/// or `{"error":{…}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ReplyWire<T> {
    /// Refused (nothing was delivered, stored or changed).
    Error {
        /// Why.
        error: WireError,
    },
    /// Handled.
    Ok(T),
}

/// The reply body to a push request.
pub type PushReplyWire = ReplyWire<PushReply>;

impl<T: Serialize + serde::de::DeserializeOwned> ReplyWire<T> {
    /// A refusal with `code` and detail.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        ReplyWire::Error {
            error: WireError::new(code, message),
        }
    }

    /// The JSON body.
    pub fn to_json(&self) -> Bytes {
        serde_json::to_vec(self)
            .map(Bytes::from)
            .unwrap_or_else(|_| {
                Bytes::from_static(br#"{"error":{"code":"internal","message":"encode"}}"#)
            })
    }

    /// Parses a reply body.
    pub fn from_json(body: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(body)
    }

    /// The success value, or the refusal as an error.
    pub fn into_result(self) -> Result<T, WireError> {
        match self {
            ReplyWire::Ok(value) => Ok(value),
            ReplyWire::Error { error } => Err(error),
        }
    }
}

impl<T> From<Result<T, WireError>> for ReplyWire<T> {
    fn from(result: Result<T, WireError>) -> Self {
        match result {
            Ok(value) => ReplyWire::Ok(value),
            Err(error) => ReplyWire::Error { error },
        }
    }
}

/// A presence change, published by state as JSON on `tether.<app>.presence`.
/// Re-exported as [`crate::Presence`].
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
        serde_json::to_vec(self)
            .map(Bytes::from)
            .unwrap_or_default()
    }

    /// Parses an event body.
    pub fn from_json(body: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(body)
    }
}

fn put(map: &mut HeaderMap, name: &'static str, value: &str) -> Result<(), WireError> {
    let value: async_nats::HeaderValue = value
        .parse()
        .map_err(|_| WireError::bad_request(format!("header {name}: value contains CR or LF")))?;
    map.insert(name, value);
    Ok(())
}

/// The first value of a header.
fn single<'a>(map: &'a HeaderMap, name: &str) -> Option<&'a str> {
    map.get(name).map(|v| v.as_str())
}

/// Every value of a header, each split on commas, trimmed, empties skipped, deduplicated.
fn list(map: &HeaderMap, name: &str) -> Vec<String> {
    let mut seen = BTreeSet::new();
    let mut out = Vec::new();
    for value in map.get_all(name) {
        for item in value.as_str().split(',').map(str::trim) {
            if !item.is_empty() && seen.insert(item.to_owned()) {
                out.push(item.to_owned());
            }
        }
    }
    out
}

fn strip_prefix_ignore_case<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix)
        .then(|| &s[prefix.len()..])
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
    fn push_headers_round_trip() -> Result<(), WireError> {
        let push = Push::to_dids(["d1", "d2"], "hi")
            .qos0()
            .session("room-1")
            .meta("kind", "chat");
        let map = push.to_headers()?;
        assert_eq!(single(&map, headers::DID), Some("d1,d2"));
        assert_eq!(single(&map, headers::QOS), Some("0"));
        assert_eq!(single(&map, "Tether-Meta-kind"), Some("chat"));
        assert_eq!(Push::from_message(Some(&map), push.body.clone())?, push);

        let mut map = HeaderMap::new();
        map.append(headers::DID, "d1, d2");
        map.append(headers::DID, "d3,d1");
        map.append(headers::UID, "alice");
        map.append("TETHER-META-Trace-Id", "abc");
        let parsed = Push::from_message(Some(&map), Bytes::new())?;
        assert_eq!(parsed.dids, ["d1", "d2", "d3"]);
        assert_eq!(parsed.uids, ["alice"]);
        assert!(parsed.qos1);
        assert_eq!(parsed.meta.get("trace-id").map(String::as_str), Some("abc"));
        Ok(())
    }

    #[test]
    fn bad_pushes_are_refused() {
        let code = |map: &HeaderMap| Push::from_message(Some(map), Bytes::new()).err();
        let mut map = HeaderMap::new();
        assert_eq!(code(&map), Some(WireError::bad_request("no target")));
        map.insert(headers::DID, "d.1");
        assert!(code(&map).is_some_and(|e| e.code == ErrorCode::BadRequest));
        map.insert(headers::DID, "d1");
        map.insert(headers::QOS, "2");
        assert!(code(&map).is_some_and(|e| e.code == ErrorCode::BadRequest));
        assert!(
            Push::to_dids(["d1"], "x")
                .meta("a:b", "v")
                .to_headers()
                .is_err()
        );
        assert!(
            Push::to_dids(["d1"], "x")
                .meta("a", "v\r\n")
                .to_headers()
                .is_err()
        );
    }

    #[test]
    fn uplink_headers_round_trip() -> Result<(), WireError> {
        let up = Uplink {
            app: "demo".into(),
            uid: "alice".into(),
            did: "phone1".into(),
            msg_id: 42,
            session: None,
            gw: "gw1".into(),
            conn: 4_295_032_833,
            body: Bytes::from_static(b"hello"),
        };
        let map = up.to_headers()?;
        assert_eq!(single(&map, headers::MSG_ID), Some("42"));
        assert_eq!(single(&map, headers::SESSION), None);
        assert_eq!(Uplink::from_message(Some(&map), up.body.clone())?, up);
        assert!(Uplink::from_message(None, Bytes::new()).is_err());
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
