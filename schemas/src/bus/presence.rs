//! The presence query (`tether.<app>.presence.get`, PROTOCOL 11.3): which devices of some
//! users are online now, in every region.

use std::collections::BTreeMap;

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::errors::{ReplyWire, WireError};
use super::ids::valid_id;

/// Most uids one presence query may name.
pub const MAX_PRESENCE_UIDS: usize = 100;

/// A presence query: `{"uids":["alice","bob"]}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PresenceQuery {
    /// The users asked about (1 to [`MAX_PRESENCE_UIDS`] valid ids).
    pub uids: Vec<String>,
}

impl PresenceQuery {
    /// Parses and checks a query body.
    pub fn from_json(body: &[u8]) -> Result<Self, WireError> {
        let query: PresenceQuery = serde_json::from_slice(body).map_err(|e| {
            WireError::bad_request(format!("presence query is not valid JSON: {e}"))
        })?;
        if query.uids.is_empty() || query.uids.len() > MAX_PRESENCE_UIDS {
            return Err(WireError::bad_request(format!(
                "uids: 1 to {MAX_PRESENCE_UIDS} user ids"
            )));
        }
        if let Some(bad) = query.uids.iter().find(|uid| !valid_id(uid)) {
            return Err(WireError::bad_request(format!("uids: invalid id {bad:?}")));
        }
        Ok(query)
    }

    /// The JSON body.
    pub fn to_json(&self) -> Bytes {
        super::to_json_or(self, b"{}")
    }
}

/// One online device of a user.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OnlineDevice {
    /// Device id.
    pub did: String,
    /// Region of the gateway holding it (empty when the region has no name).
    pub region: String,
    /// Gateway holding it.
    pub gw: String,
}

/// The answer to a presence query.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct PresenceAnswer {
    /// Every asked uid → its online devices (empty: offline everywhere asked).
    pub users: BTreeMap<String, Vec<OnlineDevice>>,
    /// Peer regions that could not be asked in time: their part comes from what they
    /// answered last (up to the answer cache's age), or is missing. Absent when empty.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub unanswered: Vec<String>,
}

/// The reply body of a presence query: the answer or `{"error":{…}}`.
pub type PresenceAnswerWire = ReplyWire<PresenceAnswer>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn queries_are_checked_and_answers_round_trip() {
        assert!(PresenceQuery::from_json(br#"{"uids":["alice"]}"#).is_ok());
        for bad in [
            &br#"{"uids":[]}"#[..],
            br#"{"uids":["a.b"]}"#,
            br#"{"uids":["a"],"x":1}"#,
            b"nope",
        ] {
            assert!(PresenceQuery::from_json(bad).is_err());
        }
        let many = PresenceQuery {
            uids: (0..=MAX_PRESENCE_UIDS).map(|i| format!("u{i}")).collect(),
        };
        assert!(PresenceQuery::from_json(&many.to_json()).is_err());
        let answer = PresenceAnswerWire::Ok(PresenceAnswer {
            users: BTreeMap::from([(
                "alice".to_string(),
                vec![OnlineDevice {
                    did: "p1".into(),
                    region: "eu".into(),
                    gw: "gw-eu".into(),
                }],
            )]),
            unanswered: vec![],
        });
        assert_eq!(
            String::from_utf8_lossy(&answer.to_json()),
            r#"{"users":{"alice":[{"did":"p1","region":"eu","gw":"gw-eu"}]}}"#
        );
    }
}
