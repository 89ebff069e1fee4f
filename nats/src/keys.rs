//! Key names in the KV buckets (`tether_routes` holds routes, user indexes and cursors).
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
