//! Key names in the KV buckets (`tether_routes` holds routes, user indexes and cursors;
//! `tether_sessions` holds session memberships, the session index and room settings).
//!
//! Keys are dot-separated like subjects, so one partition's keys can be listed with a
//! wildcard watch (`r.<partition>.>`).

use crate::subjects::partition;

/// Where a device is connected: `r.<partition>.<app>.<did>` → JSON route.
pub fn route(app: &str, did: &str) -> String {
    format!("r.{}.{app}.{did}", partition(did))
}

/// Every route of one partition (for a watch): `r.<partition>.>`.
pub fn routes_of_partition(partition: u16) -> String {
    format!("r.{partition}.>")
}

/// The devices of a user: `u.<app>.<uid>` → JSON list of dids.
pub fn user(app: &str, uid: &str) -> String {
    format!("u.{app}.{uid}")
}

/// A device's delivery cursor: `c.<partition>.<app>.<did>` → JSON cursor.
pub fn cursor(app: &str, did: &str) -> String {
    format!("c.{}.{app}.{did}", partition(did))
}

/// The key of one processed uplink's UP_ACK: `<app>.<did>.<client_msg_id>` (kept by the
/// partition owner in memory as long as JetStream de-duplicates the uplink).
pub fn receipt(app: &str, did: &str, client_msg_id: u64) -> String {
    format!("{app}.{did}.{client_msg_id}")
}

/// The sessions a device is bound to: `m.<partition>.<app>.<did>` → JSON membership
/// (bucket `tether_sessions`, written by the device's partition owner).
pub fn membership(app: &str, did: &str) -> String {
    format!("m.{}.{app}.{did}", partition(did))
}

/// Every membership of one partition (for a watch): `m.<partition>.>`.
pub fn memberships_of_partition(partition: u16) -> String {
    format!("m.{partition}.>")
}

/// One entry of the session → devices index: `i.<app>.<session>.<did>` (value empty).
pub fn session_member(app: &str, session: &str, did: &str) -> String {
    format!("i.{app}.{session}.{did}")
}

/// Prefix of every session index key: `i.`.
pub const SESSION_INDEX_PREFIX: &str = "i.";

/// The whole session index (for a watch): `i.>`.
pub const SESSION_INDEX: &str = "i.>";

/// Settings of one session (room): `s.<app>.<session>` → JSON (`{"recoverable":true}`).
pub fn session_settings(app: &str, session: &str) -> String {
    format!("s.{app}.{session}")
}

/// Prefix of every session settings key: `s.`.
pub const SESSION_SETTINGS_PREFIX: &str = "s.";

/// Every session's settings (for a watch): `s.>`.
pub const SESSION_SETTINGS: &str = "s.>";

/// A gateway's heartbeat key in `tether_gateways`: the gateway id itself.
pub fn gateway(id: &str) -> String {
    id.to_string()
}

/// Prefix of ipconfig records in `tether_instances`.
pub const IPCONFIG_PREFIX: &str = "ipconfig.";

/// Key of an ipconfig instance's record in `tether_instances`: `ipconfig.<id>`.
pub fn ipconfig(id: &str) -> String {
    format!("{IPCONFIG_PREFIX}{id}")
}

/// A user's home region key in `tether_affinity`: `a.<app>.<uid>`.
pub fn affinity(app: &str, uid: &str) -> String {
    format!("a.{app}.{uid}")
}

/// An app's record key in `tether_apps`: `app.<app>` (JSON app record, see ipconfig).
pub fn app(app: &str) -> String {
    format!("app.{app}")
}

/// Every app record (for a watch): `app.>`.
pub const APPS: &str = "app.>";

/// Prefix of a live state instance's key in the lease bucket (`member.<instance>`).
pub const LEASE_MEMBER_PREFIX: &str = "member.";
/// Prefix of a partition's lease key in the lease bucket (`part.<partition>`).
pub const LEASE_PARTITION_PREFIX: &str = "part.";

/// A state instance's membership key in the lease bucket: `member.<instance>`.
pub fn lease_member(instance: &str) -> String {
    format!("{LEASE_MEMBER_PREFIX}{instance}")
}

/// A partition's lease key: `part.<partition>`.
pub fn lease_partition(partition: u16) -> String {
    format!("{LEASE_PARTITION_PREFIX}{partition}")
}
