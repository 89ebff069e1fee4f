//! Subject and header names: the bus API of Tether.
//!
//! The app id comes right after the prefix so that one NATS permission (`tether.<app>.>`)
//! confines a business service to its own app. Identifiers placed in subjects (app, did,
//! gateway id, session) are restricted to `[A-Za-z0-9_-]` by the token rules, so they are
//! always single, literal subject tokens.

/// Prefix of every Tether subject.
pub const PREFIX: &str = "tether";

/// Number of partitions that device-keyed work is split into. Each partition is owned by
/// one state instance at a time. Fixed: changing it re-homes every device.
pub const PARTITIONS: u16 = 32;

/// The partition of a device: FNV-1a (32-bit) of the did, modulo [`PARTITIONS`].
pub fn partition(did: &str) -> u16 {
    let mut hash: u32 = 0x811c_9dc5;
    for byte in did.bytes() {
        hash ^= u32::from(byte);
        hash = hash.wrapping_mul(0x0100_0193);
    }
    (hash % u32::from(PARTITIONS)) as u16
}

/// Uplink frames from gateways for one device: `tether.<app>.up.<partition>.<did>`
/// (stream UPLINK).
pub fn uplink(app: &str, did: &str) -> String {
    format!("{PREFIX}.{app}.up.{}.{did}", partition(did))
}

/// Uplinks of one partition, every app: `tether.*.up.<partition>.*`.
pub fn uplink_partition(partition: u16) -> String {
    format!("{PREFIX}.*.up.{partition}.*")
}

/// Connection events (`conn.up`, `conn.down`) of a device's partition:
/// `tether.<app>.evt.conn.<partition>` (stream EVENTS).
pub fn conn_events(app: &str, did: &str) -> String {
    format!("{PREFIX}.{app}.evt.conn.{}", partition(did))
}

/// Session binding events (`sess.bind`, `sess.unbind`, `sess.replace`) of a device's
/// partition: `tether.<app>.evt.sess.<partition>` (stream EVENTS). The partition owner
/// reads them in order with the device's connection events.
pub fn session_events(app: &str, did: &str) -> String {
    format!("{PREFIX}.{app}.evt.sess.{}", partition(did))
}

/// Events of one partition, every app and kind: `tether.*.evt.*.<partition>`.
pub fn events_partition(partition: u16) -> String {
    format!("{PREFIX}.*.evt.*.{partition}")
}

/// QoS1 inbox of one device: `tether.<app>.inbox.<partition>.<did>` (stream INBOX).
pub fn inbox(app: &str, did: &str) -> String {
    format!("{PREFIX}.{app}.inbox.{}.{did}", partition(did))
}

/// Device acks (cumulative sequence): `tether.<app>.ack.<partition>.<did>`.
pub fn ack(app: &str, did: &str) -> String {
    format!("{PREFIX}.{app}.ack.{}.{did}", partition(did))
}

/// Acks of one partition, every app: `tether.*.ack.<partition>.*`.
pub fn ack_partition(partition: u16) -> String {
    format!("{PREFIX}.*.ack.{partition}.*")
}

/// Recoverable room broadcasts: `tether.<app>.room.<session>` (stream ROOMS).
pub fn room(app: &str, session: &str) -> String {
    format!("{PREFIX}.{app}.room.{session}")
}

/// Recoverable room broadcasts of every app and room, as one wildcard subscription:
/// `tether.*.room.*` (gateways receive every stored room message this way).
pub fn room_all() -> String {
    format!("{PREFIX}.*.room.*")
}

/// Downlink for one gateway: `tether.gw.<gw>.down` (core NATS).
pub fn gateway_down(gw: &str) -> String {
    format!("{PREFIX}.gw.{gw}.down")
}

/// Control messages for one gateway: `tether.gw.<gw>.ctl` (core NATS).
pub fn gateway_ctl(gw: &str) -> String {
    format!("{PREFIX}.gw.{gw}.ctl")
}

/// Broadcasts of one app, received by every gateway: `tether.<app>.bcast`.
pub fn broadcast(app: &str) -> String {
    format!("{PREFIX}.{app}.bcast")
}

/// Broadcasts of every app, as one wildcard subscription: `tether.*.bcast`.
pub fn broadcast_all() -> String {
    format!("{PREFIX}.*.bcast")
}

/// Uplink requests to the app's business services (queue group): `tether.<app>.biz.up`.
pub fn business_up(app: &str) -> String {
    format!("{PREFIX}.{app}.biz.up")
}

/// Business pushes: `tether.<app>.push`.
pub fn push(app: &str) -> String {
    format!("{PREFIX}.{app}.push")
}

/// Session bind API: `tether.<app>.session`.
pub fn session(app: &str) -> String {
    format!("{PREFIX}.{app}.session")
}

/// Presence notifications: `tether.<app>.presence`.
pub fn presence(app: &str) -> String {
    format!("{PREFIX}.{app}.presence")
}

/// The app id of a subject `tether.<app>.…`, if it has one.
pub fn app_of(subject: &str) -> Option<&str> {
    let rest = subject.strip_prefix(PREFIX)?.strip_prefix('.')?;
    rest.split('.').next().filter(|app| !app.is_empty())
}

/// The `Tether-Seq` header of an inbox or room message (0 when missing or malformed).
pub fn seq_header(map: &async_nats::HeaderMap) -> u64 {
    map.get(headers::SEQ)
        .and_then(|v| v.as_str().parse().ok())
        .unwrap_or(0)
}

/// Names of the NATS headers Tether sets on data-plane messages.
pub mod headers {
    /// JetStream de-duplication id (`<did>:<client_msg_id>` on uplinks).
    pub const MSG_ID: &str = "Nats-Msg-Id";
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
    /// Per-device sequence of an inbox message (decimal).
    pub const SEQ: &str = "Tether-Seq";
    /// Prefix of push metadata headers (`Tether-Meta-<name>`).
    pub const META_PREFIX: &str = "Tether-Meta-";
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_are_scoped_by_app() {
        assert_eq!(
            uplink("chat", "d1"),
            format!("tether.chat.up.{}.d1", partition("d1"))
        );
        assert_eq!(gateway_down("gw-1"), "tether.gw.gw-1.down");
        assert_eq!(app_of(&uplink("chat", "d1")), Some("chat"));
        assert_eq!(app_of("other.chat.up"), None);
        assert_eq!(app_of("tether."), None);
    }

    #[test]
    fn partition_is_stable_fnv1a() {
        // FNV-1a 32 of "a" is 0xe40c292c; of "" the offset basis 0x811c9dc5.
        assert_eq!(
            partition("a"),
            (0xe40c_292c_u32 % u32::from(PARTITIONS)) as u16
        );
        assert_eq!(
            partition(""),
            (0x811c_9dc5_u32 % u32::from(PARTITIONS)) as u16
        );
        let spread: std::collections::HashSet<u16> =
            (0..1000).map(|i| partition(&format!("d{i}"))).collect();
        assert_eq!(spread.len(), usize::from(PARTITIONS));
    }
}
