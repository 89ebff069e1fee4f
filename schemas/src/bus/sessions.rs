//! The session binding API on the wire (`tether.<app>.session`, PROTOCOL.md section 11.5)
//! and membership events (`tether.<app>.presence`, section 11.6).
//!
//! Business services bind devices to sessions (chat groups, live rooms), unbind them,
//! replace a device's whole set, and mark a session recoverable. State answers every
//! request after the change is written to the event log; the device's gateway learns it
//! moments later. Shared by the business SDK and the state service.

use std::collections::BTreeSet;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::errors::{ReplyWire, WireError};
use super::ids::valid_id;

/// Most devices one request may name (dids plus the devices of uids).
pub const MAX_DEVICES_PER_REQUEST: usize = 100_000;
/// Most sessions one request may name.
pub const MAX_SESSIONS_PER_REQUEST: usize = 1_000;

/// What a session request does.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SessionOp {
    /// Adds the sessions to each device's set.
    Bind,
    /// Removes the sessions from each device's set.
    Unbind,
    /// Makes each device's set exactly the sessions (empty = leave every session).
    Replace,
    /// Changes the settings of one session (`session`, `recoverable`); names no device.
    Configure,
}

/// A request on `tether.<app>.session`.
///
/// `{"op":"bind","dids":["d1"],"sessions":["room-1"]}`; `did` and `uid` take one id,
/// `dids` and `uids` a list (they add up; a uid stands for every device of that user
/// known to state). `{"op":"configure","session":"room-1","recoverable":true}` marks a
/// room recoverable.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionRequest {
    /// The operation.
    pub op: Option<SessionOp>,
    /// One device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub did: Option<String>,
    /// Devices.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dids: Vec<String>,
    /// One user (every device of it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uid: Option<String>,
    /// Users (every device of each).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub uids: Vec<String>,
    /// Sessions to bind, unbind or replace with.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sessions: Vec<String>,
    /// `configure`: the session to configure.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub session: Option<String>,
    /// `configure`: whether the session's broadcasts are kept in the room stream for
    /// recovery.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub recoverable: Option<bool>,
}

impl SessionRequest {
    /// A request binding `dids` to `sessions`.
    pub fn bind<D, S>(dids: D, sessions: S) -> Self
    where
        D: IntoIterator,
        D::Item: Into<String>,
        S: IntoIterator,
        S::Item: Into<String>,
    {
        Self::with_op(SessionOp::Bind, dids, sessions)
    }

    /// A request unbinding `dids` from `sessions`.
    pub fn unbind<D, S>(dids: D, sessions: S) -> Self
    where
        D: IntoIterator,
        D::Item: Into<String>,
        S: IntoIterator,
        S::Item: Into<String>,
    {
        Self::with_op(SessionOp::Unbind, dids, sessions)
    }

    /// A request replacing each device's sessions with `sessions`.
    pub fn replace<D, S>(dids: D, sessions: S) -> Self
    where
        D: IntoIterator,
        D::Item: Into<String>,
        S: IntoIterator,
        S::Item: Into<String>,
    {
        Self::with_op(SessionOp::Replace, dids, sessions)
    }

    /// A request marking `session` recoverable (or not).
    pub fn configure(session: impl Into<String>, recoverable: bool) -> Self {
        SessionRequest {
            op: Some(SessionOp::Configure),
            session: Some(session.into()),
            recoverable: Some(recoverable),
            ..Default::default()
        }
    }

    fn with_op<D, S>(op: SessionOp, dids: D, sessions: S) -> Self
    where
        D: IntoIterator,
        D::Item: Into<String>,
        S: IntoIterator,
        S::Item: Into<String>,
    {
        SessionRequest {
            op: Some(op),
            dids: dids.into_iter().map(Into::into).collect(),
            sessions: sessions.into_iter().map(Into::into).collect(),
            ..Default::default()
        }
    }

    /// Every named device (`did` and `dids`), deduplicated, in order.
    pub fn all_dids(&self) -> Vec<String> {
        dedup(self.did.iter().chain(&self.dids))
    }

    /// Every named user (`uid` and `uids`), deduplicated, in order.
    pub fn all_uids(&self) -> Vec<String> {
        dedup(self.uid.iter().chain(&self.uids))
    }

    /// The sessions, deduplicated, in order.
    pub fn all_sessions(&self) -> Vec<String> {
        dedup(self.sessions.iter())
    }

    /// Checks the request: an op, valid ids, targets for binds, a session for configure.
    pub fn validate(&self) -> Result<SessionOp, WireError> {
        let op = self.op.ok_or_else(|| {
            WireError::bad_request("op missing: bind, unbind, replace or configure")
        })?;
        let check = |kind: &str, id: &String| {
            if valid_id(id) {
                Ok(())
            } else {
                Err(WireError::bad_request(format!("invalid {kind} {id:?}")))
            }
        };
        for did in self.did.iter().chain(&self.dids) {
            check("did", did)?;
        }
        for uid in self.uid.iter().chain(&self.uids) {
            check("uid", uid)?;
        }
        for session in self.sessions.iter().chain(&self.session) {
            check("session", session)?;
        }
        if self.sessions.len() > MAX_SESSIONS_PER_REQUEST {
            return Err(WireError::bad_request(format!(
                "more than {MAX_SESSIONS_PER_REQUEST} sessions"
            )));
        }
        if self.dids.len() > MAX_DEVICES_PER_REQUEST {
            return Err(WireError::bad_request(format!(
                "more than {MAX_DEVICES_PER_REQUEST} devices"
            )));
        }
        match op {
            SessionOp::Configure => {
                if self.session.is_none() {
                    return Err(WireError::bad_request("configure needs a session"));
                }
            }
            SessionOp::Bind | SessionOp::Unbind | SessionOp::Replace => {
                if self.did.is_none()
                    && self.dids.is_empty()
                    && self.uid.is_none()
                    && self.uids.is_empty()
                {
                    return Err(WireError::bad_request(
                        "no device: give did, dids, uid or uids",
                    ));
                }
                if op != SessionOp::Replace && self.sessions.is_empty() {
                    return Err(WireError::bad_request("no sessions"));
                }
            }
        }
        Ok(op)
    }

    /// The JSON body.
    pub fn to_json(&self) -> Bytes {
        super::to_json_or(self, b"{}")
    }

    /// Parses a request body (without validating it).
    pub fn from_json(body: &[u8]) -> Result<Self, WireError> {
        serde_json::from_slice(body)
            .map_err(|e| WireError::bad_request(format!("session request is not valid JSON: {e}")))
    }
}

fn dedup<'a>(ids: impl Iterator<Item = &'a String>) -> Vec<String> {
    let mut seen = BTreeSet::new();
    ids.filter(|id| seen.insert(id.as_str())).cloned().collect()
}

/// The success reply to a session request.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionReply {
    /// Devices whose change was written to the event log.
    #[serde(default)]
    pub devices: usize,
}

/// The reply body to a session request: success or `{"error":{…}}`.
pub type SessionReplyWire = ReplyWire<SessionReply>;

/// Joined or left.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum MembershipChange {
    /// The device was bound to the session.
    Joined,
    /// The device was unbound from the session.
    Left,
}

/// A membership event, published by state on `tether.<app>.presence` for apps that ask
/// for them: `{"event":"joined","app":"demo","did":"d1","session":"room-1","at_ms":…}`.
/// The `event` field tells it apart from a presence event.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MembershipEvent {
    /// Joined or left.
    pub event: MembershipChange,
    /// App id.
    pub app: String,
    /// Device id.
    pub did: String,
    /// Session id.
    pub session: String,
    /// When state recorded it, milliseconds since the Unix epoch.
    pub at_ms: u64,
}

impl MembershipEvent {
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
    fn requests_parse_and_validate() -> Result<(), WireError> {
        let request = SessionRequest::from_json(
            br#"{"op":"bind","did":"d1","dids":["d2","d1"],"sessions":["r"]}"#,
        )?;
        assert_eq!(request.validate()?, SessionOp::Bind);
        assert_eq!(request.all_dids(), ["d1", "d2"]);
        let request = SessionRequest::from_json(br#"{"op":"replace","uid":"alice"}"#)?;
        assert_eq!(request.validate()?, SessionOp::Replace);
        let request = SessionRequest::configure("room-1", true);
        assert_eq!(
            SessionRequest::from_json(&request.to_json())?.validate()?,
            SessionOp::Configure
        );
        Ok(())
    }

    #[test]
    fn bad_requests_are_refused() -> Result<(), WireError> {
        let refused = |body: &[u8]| -> Result<bool, WireError> {
            Ok(SessionRequest::from_json(body)?.validate().is_err())
        };
        assert!(SessionRequest::from_json(b"not json").is_err());
        assert!(refused(br#"{"dids":["d1"],"sessions":["r"]}"#)?);
        assert!(refused(br#"{"op":"bind","sessions":["r"]}"#)?);
        assert!(refused(br#"{"op":"bind","dids":["d1"]}"#)?);
        assert!(refused(
            br#"{"op":"bind","dids":["d.1"],"sessions":["r"]}"#
        )?);
        assert!(refused(
            br#"{"op":"bind","dids":["d1"],"sessions":["a b"]}"#
        )?);
        assert!(refused(br#"{"op":"configure"}"#)?);
        assert!(SessionRequest::from_json(br#"{"op":"explode"}"#).is_err());
        Ok(())
    }

    #[test]
    fn membership_events_are_not_presence_events() {
        let event = MembershipEvent {
            event: MembershipChange::Joined,
            app: "demo".into(),
            did: "d1".into(),
            session: "room-1".into(),
            at_ms: 1,
        };
        let json = event.to_json();
        assert!(String::from_utf8_lossy(&json).starts_with(r#"{"event":"joined""#));
        assert!(super::super::business::PresenceEvent::from_json(&json).is_err());
        assert_eq!(MembershipEvent::from_json(&json).ok(), Some(event));
    }
}
