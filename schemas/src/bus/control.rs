//! Control messages from state to one gateway (`tether.gw.<gw>.ctl`, PROTOCOL.md 10.6).
//!
//! JSON tagged by `op`. A gateway ignores ops it does not know, so newer state versions can
//! add some.

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::ErrorCode;

/// One control message.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum GatewayControl {
    /// The device's complete set of sessions:
    /// `{"op":"sessions","app":"demo","did":"d1","sessions":["room-1"]}`.
    Sessions {
        /// App id.
        app: String,
        /// Device id.
        did: String,
        /// Every session the device is bound to now.
        #[serde(default)]
        sessions: Vec<String>,
    },
    /// Close one connection of a device (it logged in elsewhere):
    /// `{"op":"close","app":"demo","did":"d1","conn":42,"code":"replaced"}`. Applied only
    /// when the device's connection here has that id.
    Close {
        /// App id.
        app: String,
        /// Device id.
        did: String,
        /// The connection to close.
        conn: u64,
        /// The close code sent to the device.
        code: ErrorCode,
    },
    /// State registered a connection (its route, user index and token sessions are
    /// written): `{"op":"registered","app":"demo","did":"d1","conn":42,"last_acked_seq":7}`.
    /// The gateway answers the device's LOGIN_ACK now, with `last_acked_seq`.
    Registered {
        /// App id.
        app: String,
        /// Device id.
        did: String,
        /// The registered connection.
        conn: u64,
        /// Highest per-device sequence the device acknowledged (the floor of its replay).
        last_acked_seq: u64,
    },
    /// Move connections to other gateways by REDIRECT (PROTOCOL.md 10.7); answered with a
    /// [`MigrationStatus`](crate::bus::MigrationStatus).
    Migrate(crate::bus::MigrateRequest),
    /// Mark the gateway draining and move every connection away (10.7).
    Drain(crate::bus::DrainRequest),
    /// Stop a drain or migration and clear the draining flag (10.7).
    Undrain,
    /// Answer where the migration stands (10.7).
    MigrationStatus,
    /// Start a successor process that takes this gateway over by hand-off (10.7);
    /// answered with a [`RestartStatus`](crate::bus::RestartStatus).
    Restart,
    /// Answer where the restart stands (10.7).
    RestartStatus,
    /// An op this version does not know (ignored).
    #[serde(other)]
    Unknown,
}

impl GatewayControl {
    /// The JSON body.
    pub fn to_json(&self) -> Result<Bytes, serde_json::Error> {
        serde_json::to_vec(self).map(Bytes::from)
    }

    /// Parses a control message.
    pub fn from_json(body: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(body)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sessions_round_trip_and_unknown_ops() -> Result<(), serde_json::Error> {
        let control = GatewayControl::Sessions {
            app: "demo".into(),
            did: "d1".into(),
            sessions: vec!["room-1".into()],
        };
        let json = control.to_json()?;
        assert_eq!(
            String::from_utf8_lossy(&json),
            r#"{"op":"sessions","app":"demo","did":"d1","sessions":["room-1"]}"#
        );
        assert_eq!(GatewayControl::from_json(&json)?, control);
        assert_eq!(
            GatewayControl::from_json(br#"{"op":"later","x":1}"#)?,
            GatewayControl::Unknown
        );
        assert!(GatewayControl::from_json(b"nope").is_err());
        Ok(())
    }
}
