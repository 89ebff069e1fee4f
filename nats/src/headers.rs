//! Header names of Tether's NATS messages and their typed access.
//!
//! Data-plane messages carry raw frames as payload and their metadata in these headers
//! (PROTOCOL.md 10.2); the business API carries pushes and uplink requests the same way
//! (11.1, 11.2). Every header name lives here; [`HeaderCodec`] turns the business API's
//! header-carried messages into typed values and back, never panicking on outside data.

use std::collections::{BTreeMap, BTreeSet};

use async_nats::HeaderMap;
use bytes::Bytes;
use tether_schemas::bus::{Push, Uplink, WireError};

/// The subject's last stream sequence an append expects
/// (`Nats-Expected-Last-Subject-Sequence`): JetStream arbitrates racing writers of one
/// per-device or per-room subject.
pub use async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE as EXPECTED_LAST_SUBJECT_SEQUENCE;
/// JetStream de-duplication id (`Nats-Msg-Id`: `<did>:<client_msg_id>` on uplinks).
pub use async_nats::header::NATS_MESSAGE_ID as MSG_ID;
/// App id.
pub const APP: &str = "Tether-App";
/// User id.
pub const UID: &str = "Tether-Uid";
/// Device id; on downlinks, one header value per addressed device (or a comma list).
pub const DID: &str = "Tether-Did";
/// Gateway id.
pub const GATEWAY: &str = "Tether-Gw";
/// Connection id (unique 64-bit id, decimal).
pub const CONN: &str = "Tether-Conn";
/// Session id.
pub const SESSION: &str = "Tether-Session";
/// The client's message id of an uplink (decimal), on business requests.
pub const MSG_ID_CLIENT: &str = "Tether-Msg-Id";
/// Quality of service of a push: `0` or `1`.
pub const QOS: &str = "Tether-Qos";
/// Per-message TTL of a JetStream message (seconds), honoured by streams with
/// `allow_message_ttl` (INBOX: an app's `inbox_retention`).
pub const MSG_TTL: &str = "Nats-TTL";
/// Per-device sequence of an inbox message, or room sequence of a room message (decimal).
pub const SEQ: &str = "Tether-Seq";
/// Push id: a retried push with the same id stores nothing new (PROTOCOL 11.2).
pub const PUSH_ID: &str = "Tether-Push-Id";
/// The id of one relayed push for one device (`<app>:<push id>:<did>`, or a fresh id for
/// a push without id): the target region de-duplicates its inbox append by it.
pub const RELAY_ID: &str = "Tether-Relay-Id";
/// On a session event (state to state): the inbox the applying partition owner tells,
/// with the device id as body, once the change is written and its gateway has it; the
/// session request is answered after every device's notice (PROTOCOL 11.5).
pub const APPLIED_TO: &str = "Tether-Applied-To";
/// On an uplink: `stored` when the gateway sent the UP_ACK once JetStream stored it (the
/// app's `receipt_mode` is `stored`): state then sends none (PROTOCOL 11.1). On the answer
/// to a receipt question: [`RECEIPT_PENDING`] or [`RECEIPT_UNKNOWN`] (PROTOCOL 10.2).
pub const RECEIPT: &str = "Tether-Receipt";
/// `Tether-Receipt` of a partition owner's answer about a duplicate UP (PROTOCOL 10.2): its
/// first copy is still to be answered, the UP_ACK follows.
pub const RECEIPT_PENDING: &str = "pending";
/// `Tether-Receipt` of a partition owner's answer about a duplicate UP: not known there
/// (answered `timeout`, or by an earlier owner): the gateway has the UP processed again.
pub const RECEIPT_UNKNOWN: &str = "unknown";
/// Prefix of push metadata headers (`Tether-Meta-<name>`).
pub const META_PREFIX: &str = "Tether-Meta-";

/// The `Tether-Seq` header of an inbox or room message (0 when missing or malformed).
pub fn seq(map: &HeaderMap) -> u64 {
    map.get(SEQ)
        .and_then(|v| v.as_str().parse().ok())
        .unwrap_or(0)
}

/// The first value of header `name`, if present.
pub fn get<'a>(map: Option<&'a HeaderMap>, name: &str) -> Option<&'a str> {
    map?.get(name).map(|v| v.as_str())
}

/// Every device named by `Tether-Did` headers (repeatable, or comma separated), trimmed,
/// empties skipped.
pub fn dids(map: Option<&HeaderMap>) -> Vec<&str> {
    map.map(|h| {
        h.get_all(DID)
            .flat_map(|v| v.as_str().split(','))
            .map(str::trim)
            .filter(|d| !d.is_empty())
            .collect()
    })
    .unwrap_or_default()
}

/// Header (de)coding of the business API's header-carried messages ([`Uplink`], [`Push`]).
pub trait HeaderCodec: Sized {
    /// The NATS headers of the message. Values that are not valid header values (CR/LF)
    /// are refused with `bad_request`, never a panic.
    fn to_headers(&self) -> Result<HeaderMap, WireError>;
    /// Decodes the message from its headers and body; malformed input gives `bad_request`.
    fn from_message(headers: Option<&HeaderMap>, body: Bytes) -> Result<Self, WireError>;
}

impl HeaderCodec for Uplink {
    /// The request headers (what state sends). Panics never: values that are not valid
    /// header values (CR/LF) are refused with `bad_request`.
    fn to_headers(&self) -> Result<HeaderMap, WireError> {
        let mut map = HeaderMap::new();
        put(&mut map, APP, &self.app)?;
        put(&mut map, UID, &self.uid)?;
        put(&mut map, DID, &self.did)?;
        put(&mut map, MSG_ID_CLIENT, &self.msg_id.to_string())?;
        if let Some(session) = self.session.as_deref().filter(|s| !s.is_empty()) {
            put(&mut map, SESSION, session)?;
        }
        put(&mut map, GATEWAY, &self.gw)?;
        put(&mut map, CONN, &self.conn.to_string())?;
        Ok(map)
    }

    /// Decodes a request (what business services receive). Missing or malformed required
    /// headers give `bad_request`.
    fn from_message(headers: Option<&HeaderMap>, body: Bytes) -> Result<Self, WireError> {
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
            app: required(APP)?.to_owned(),
            uid: required(UID)?.to_owned(),
            did: required(DID)?.to_owned(),
            msg_id: number(MSG_ID_CLIENT)?,
            session: single(map, SESSION)
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
            gw: required(GATEWAY)?.to_owned(),
            conn: number(CONN)?,
            body,
        })
    }
}

impl HeaderCodec for Push {
    /// The push headers (what a business service sends), after `Push::validate`.
    fn to_headers(&self) -> Result<HeaderMap, WireError> {
        self.validate()?;
        let mut map = HeaderMap::new();
        if !self.dids.is_empty() {
            put(&mut map, DID, &self.dids.join(","))?;
        }
        if !self.uids.is_empty() {
            put(&mut map, UID, &self.uids.join(","))?;
        }
        if let Some(qos1) = self.qos1 {
            put(&mut map, QOS, if qos1 { "1" } else { "0" })?;
        }
        if let Some(id) = &self.id {
            put(&mut map, PUSH_ID, id)?;
        }
        if let Some(session) = &self.session {
            put(&mut map, SESSION, session)?;
        }
        for (name, value) in &self.meta {
            let header = format!("{}{}", META_PREFIX, name.to_ascii_lowercase());
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
    fn from_message(headers: Option<&HeaderMap>, body: Bytes) -> Result<Self, WireError> {
        let empty = HeaderMap::new();
        let map = headers.unwrap_or(&empty);
        let qos1 = match single(map, QOS).map(str::trim) {
            None => None,
            Some("1") => Some(true),
            Some("0") => Some(false),
            Some(other) => {
                return Err(WireError::bad_request(format!(
                    "{} must be 0 or 1, not {other:?}",
                    QOS
                )));
            }
        };
        let session = single(map, SESSION)
            .map(str::trim)
            .filter(|s| !s.is_empty())
            .map(str::to_owned);
        let mut meta = BTreeMap::new();
        for (name, values) in map.iter() {
            let name: &str = name.as_ref();
            let Some(key) = strip_prefix_ignore_case(name, META_PREFIX) else {
                continue;
            };
            if let Some(value) = values.last() {
                meta.insert(key.to_ascii_lowercase(), value.as_str().to_owned());
            }
        }
        let push = Push {
            dids: list(map, DID),
            uids: list(map, UID),
            qos1,
            session,
            meta,
            body,
            id: single(map, PUSH_ID)
                .map(str::trim)
                .filter(|s| !s.is_empty())
                .map(str::to_owned),
        };
        push.validate()?;
        Ok(push)
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
mod codec_tests {
    use super::*;
    use tether_schemas::ErrorCode;

    #[test]
    fn push_headers_round_trip() -> Result<(), WireError> {
        let push = Push::to_dids(["d1", "d2"], "hi")
            .qos0()
            .session("room-1")
            .meta("kind", "chat");
        let map = push.to_headers()?;
        assert_eq!(single(&map, DID), Some("d1,d2"));
        assert_eq!(single(&map, QOS), Some("0"));
        assert_eq!(single(&map, "Tether-Meta-kind"), Some("chat"));
        assert_eq!(Push::from_message(Some(&map), push.body.clone())?, push);

        let mut map = HeaderMap::new();
        map.append(DID, "d1, d2");
        map.append(DID, "d3,d1");
        map.append(UID, "alice");
        map.append("TETHER-META-Trace-Id", "abc");
        let parsed = Push::from_message(Some(&map), Bytes::new())?;
        assert_eq!(parsed.dids, ["d1", "d2", "d3"]);
        assert_eq!(parsed.uids, ["alice"]);
        assert_eq!(parsed.qos1, None, "no Tether-Qos: the app's default");
        assert_eq!(parsed.meta.get("trace-id").map(String::as_str), Some("abc"));
        Ok(())
    }

    #[test]
    fn bad_pushes_are_refused() {
        let code = |map: &HeaderMap| Push::from_message(Some(map), Bytes::new()).err();
        let mut map = HeaderMap::new();
        assert_eq!(code(&map), Some(WireError::bad_request("no target")));
        map.insert(DID, "d.1");
        assert!(code(&map).is_some_and(|e| e.code == ErrorCode::BadRequest));
        map.insert(DID, "d1");
        map.insert(QOS, "2");
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
        assert_eq!(single(&map, MSG_ID_CLIENT), Some("42"));
        assert_eq!(single(&map, SESSION), None);
        assert_eq!(Uplink::from_message(Some(&map), up.body.clone())?, up);
        assert!(Uplink::from_message(None, Bytes::new()).is_err());
        Ok(())
    }
}
