//! Home regions of users (`tether.<app>.affinity`, PROTOCOL 12.7): a business service
//! names the region a user should connect to; every region's ipconfig offers that
//! region's gateways first to the user's devices.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use super::errors::{ReplyWire, WireError};
use super::ids::valid_id;

/// A home-region request, `{"uid":"carol","region":"eu"}`; an empty `region` clears it.
/// The reply echoes it once stored.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AffinityRequest {
    /// The user.
    pub uid: String,
    /// The user's home region; empty: none (ipconfig ranks by the requester's region).
    pub region: String,
}

impl AffinityRequest {
    /// Parses and checks a request body (ids only; the region's existence is checked by
    /// ipconfig).
    pub fn from_json(body: &[u8]) -> Result<Self, WireError> {
        let request: AffinityRequest = serde_json::from_slice(body).map_err(|e| {
            WireError::bad_request(format!("affinity request is not valid JSON: {e}"))
        })?;
        if !valid_id(&request.uid) {
            return Err(WireError::bad_request("uid: not a valid id"));
        }
        if !request.region.is_empty() && !valid_id(&request.region) {
            return Err(WireError::bad_request("region: not a valid id"));
        }
        Ok(request)
    }

    /// The JSON body.
    pub fn to_json(&self) -> Bytes {
        super::to_json_or(self, b"{}")
    }
}

/// The record of a user's home region in `tether_affinity` (`a.<app>.<uid>`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct AffinityRecord {
    /// The home region; empty: cleared.
    pub region: String,
    /// When it was set, Unix milliseconds (the newest record of all regions wins).
    pub at_ms: u64,
}

/// The reply to a home-region request: the stored request or `{"error":{…}}`.
pub type AffinityReplyWire = ReplyWire<AffinityRequest>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_checked() {
        let ok = AffinityRequest::from_json(br#"{"uid":"carol","region":"eu"}"#);
        assert_eq!(
            ok.ok(),
            Some(AffinityRequest {
                uid: "carol".into(),
                region: "eu".into()
            })
        );
        assert!(AffinityRequest::from_json(br#"{"uid":"carol","region":""}"#).is_ok());
        for bad in [
            &br#"{"uid":"a.b","region":"eu"}"#[..],
            br#"{"uid":"carol","region":"e u"}"#,
            br#"{"uid":"carol"}"#,
            br#"{"uid":"carol","region":"eu","x":1}"#,
        ] {
            assert!(AffinityRequest::from_json(bad).is_err());
        }
    }
}
