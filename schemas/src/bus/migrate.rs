//! Drain and migration (PROTOCOL.md 10.7): the operations an operator (or `ops`) asks of one
//! gateway on `tether.gw.<gw>.ctl`, the status it answers, and the redirect-token request a
//! gateway sends to ipconfig on `tether.gw.<gw>.redirect.req`.
//!
//! The operations are variants of [`crate::bus::GatewayControl`] (`migrate`, `drain`,
//! `undrain`, `migration_status`); each is answered with a [`MigrationStatus`] or an
//! [`crate::bus::ErrorBody`] when the request carries a reply subject.

use serde::{Deserialize, Serialize};

use crate::bus::{WireError, valid_id};

/// Target name that lets ipconfig choose the gateway per device (its ranking).
pub const TARGET_IPCONFIG: &str = "ipconfig";

/// Largest number of devices in one redirect-token request.
pub const MAX_REDIRECT_BATCH: usize = 500;

/// Largest number of dids in one `migrate` request.
pub const MAX_MIGRATE_DIDS: usize = 100_000;

/// Which connections to move and where:
/// `{"op":"migrate","app":"demo","dids":["d1"],"target":"gw2","rate":1000}`,
/// `{"op":"migrate","share":0.25}` or `{"op":"migrate","all":true,"target":"ipconfig"}`.
/// Exactly one of `dids`, `share` and `all` is given.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrateRequest {
    /// Only connections of this app (required with `dids`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub app: Option<String>,
    /// These devices (of `app`).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub dids: Vec<String>,
    /// This share of the connections (0.0 to 1.0, of `app`'s if given), chosen at random.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub share: Option<f64>,
    /// Every connection (of `app`, if given).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub all: bool,
    /// A gateway id, or `"ipconfig"` (the default): ipconfig ranks the gateways per device.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// REDIRECTs per second; default the gateway's `migrate_rate` (1,000).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<u32>,
}

impl MigrateRequest {
    /// Checks the request: one selection, valid ids, a share in range, a positive rate.
    pub fn validate(&self) -> Result<(), String> {
        let chosen = usize::from(!self.dids.is_empty())
            + usize::from(self.share.is_some())
            + usize::from(self.all);
        if chosen != 1 {
            return Err("give exactly one of dids, share and all".into());
        }
        if let Some(app) = self.app.as_deref().filter(|a| !valid_id(a)) {
            return Err(format!("app {app:?} is not a valid id"));
        }
        if !self.dids.is_empty() && self.app.is_none() {
            return Err("dids need app".into());
        }
        if self.dids.len() > MAX_MIGRATE_DIDS {
            return Err(format!("at most {MAX_MIGRATE_DIDS} dids per request"));
        }
        if let Some(did) = self.dids.iter().find(|d| !valid_id(d)) {
            return Err(format!("did {did:?} is not a valid id"));
        }
        if let Some(share) = self.share
            && !(0.0..=1.0).contains(&share)
        {
            return Err("share must be between 0.0 and 1.0".into());
        }
        if let Some(target) = self.target.as_deref()
            && target != TARGET_IPCONFIG
            && !valid_id(target)
        {
            return Err(format!(
                "target {target:?} is not a gateway id or \"ipconfig\""
            ));
        }
        if self.rate == Some(0) {
            return Err("rate must be positive".into());
        }
        Ok(())
    }

    /// The target, `"ipconfig"` when none was given.
    pub fn target(&self) -> &str {
        self.target.as_deref().unwrap_or(TARGET_IPCONFIG)
    }
}

/// Options of a drain: `{"op":"drain"}`, `{"op":"drain","target":"gw2","rate":500}`.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct DrainRequest {
    /// A gateway id, or `"ipconfig"` (the default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<String>,
    /// REDIRECTs per second; default the gateway's `migrate_rate`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub rate: Option<u32>,
}

/// Where a gateway's migration stands: the answer to every migration operation.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct MigrationStatus {
    /// The gateway.
    pub gw: String,
    /// Whether the gateway is marked draining (not offered to new devices).
    pub draining: bool,
    /// Whether a migration is running.
    pub running: bool,
    /// What the last migration was: `migrate`, `drain` or `shutdown` (empty: none yet).
    #[serde(default)]
    pub kind: String,
    /// Its target (`ipconfig` or a gateway id).
    #[serde(default)]
    pub target: String,
    /// Its rate, REDIRECTs per second.
    #[serde(default)]
    pub rate: u32,
    /// Connections it chose so far.
    #[serde(default)]
    pub selected: u64,
    /// REDIRECTs sent.
    #[serde(default)]
    pub redirected: u64,
    /// Redirected devices that left (logged in elsewhere, or closed).
    #[serde(default)]
    pub moved: u64,
    /// Redirected devices that did not move within `migrate_timeout_secs` (closed with
    /// `going_away`).
    #[serde(default)]
    pub timed_out: u64,
    /// Devices no token could be had for (no gateway to move to); they stay.
    #[serde(default)]
    pub failed: u64,
    /// Redirected devices still connected here.
    #[serde(default)]
    pub pending: u64,
    /// Logged-in connections on the gateway now.
    #[serde(default)]
    pub connections: u64,
    /// When the migration started and (if it ended) finished, ms since the epoch.
    #[serde(default)]
    pub started_ms: u64,
    /// 0 while running.
    #[serde(default)]
    pub finished_ms: u64,
    /// Why it stopped early, if it did (e.g. no gateway to move to).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// One device a gateway wants a redirect token for.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedirectDevice {
    /// App id.
    pub app: String,
    /// User id (from the device's token).
    pub uid: String,
    /// Device id.
    pub did: String,
    /// `tcp` or `ws`: the endpoint form the device can use.
    pub transport: String,
    /// The rights of the device's token (`pub` claim names), carried to the new token.
    #[serde(default)]
    pub rights: Vec<String>,
}

/// `tether.gw.<gw>.redirect.req` (gateway → ipconfig, request/reply): tokens for devices to
/// move off gateway `<gw>` (taken from the subject). `target` is a gateway id or
/// `"ipconfig"`; `region` is the requesting gateway's.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedirectRequest {
    /// A gateway id, or `"ipconfig"`.
    pub target: String,
    /// Region to prefer (the requesting gateway's).
    #[serde(default)]
    pub region: String,
    /// The devices, at most [`MAX_REDIRECT_BATCH`].
    pub devices: Vec<RedirectDevice>,
    /// The requester is handing over to its successor process (same gateway id,
    /// docs/handoff.md "TLS"): with `target` naming the requester itself, it may be chosen.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub handoff: bool,
}

/// Where one device goes, or why it cannot.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedirectGrant {
    /// App id (as asked).
    pub app: String,
    /// Device id (as asked).
    pub did: String,
    /// The chosen gateway.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gw: Option<String>,
    /// Its endpoint for the device's transport (REDIRECT `endpoint`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// A gateway token bound to that gateway (`gw` claim), for REDIRECT `token`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// Why there is none (`unavailable`: no gateway to move to; `bad_request`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<WireError>,
}

/// The answer to a [`RedirectRequest`]: one grant per device, in order, or
/// `{"error":{…}}` for a request that cannot be read.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RedirectReply {
    /// One per requested device, in the request's order.
    pub grants: Vec<RedirectGrant>,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::GatewayControl;

    #[test]
    fn migrate_ops_parse_and_validate() -> Result<(), serde_json::Error> {
        let op = GatewayControl::from_json(
            br#"{"op":"migrate","app":"demo","dids":["d1","d2"],"target":"gw2","rate":50}"#,
        )?;
        let GatewayControl::Migrate(request) = op else {
            panic!("not a migrate op: {op:?}");
        };
        assert_eq!(request.validate(), Ok(()));
        assert_eq!(request.target(), "gw2");
        let share = MigrateRequest {
            share: Some(1.5),
            ..Default::default()
        };
        assert!(share.validate().is_err());
        let two = MigrateRequest {
            share: Some(0.5),
            all: true,
            ..Default::default()
        };
        assert!(two.validate().is_err());
        let no_app = MigrateRequest {
            dids: vec!["d1".into()],
            ..Default::default()
        };
        assert!(no_app.validate().is_err());
        let all = MigrateRequest {
            all: true,
            ..Default::default()
        };
        assert_eq!(all.validate(), Ok(()));
        assert_eq!(all.target(), TARGET_IPCONFIG);
        assert_eq!(
            GatewayControl::from_json(br#"{"op":"drain"}"#)?,
            GatewayControl::Drain(DrainRequest::default())
        );
        assert_eq!(
            GatewayControl::from_json(br#"{"op":"undrain"}"#)?,
            GatewayControl::Undrain
        );
        assert_eq!(
            GatewayControl::from_json(br#"{"op":"migration_status"}"#)?,
            GatewayControl::MigrationStatus
        );
        Ok(())
    }
}
