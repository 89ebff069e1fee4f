//! Subject and header names: the bus API of Tether.
//!
//! The app id comes right after the prefix so that one NATS permission (`tether.<app>.>`)
//! confines a business service to its own app. Identifiers placed in subjects (app, did,
//! gateway id, session) are restricted to `[A-Za-z0-9_-]` by the token rules, so they are
//! always single, literal subject tokens. [`Subject::parse`] is the one parser: every
//! consumer takes the app, partition and did of a message from its subject through it.

use tether_schemas::bus::valid_id;

/// Prefix of every Tether subject.
pub const PREFIX: &str = "tether";

/// The second token of gateway subjects (`tether.gw.<gw>.…`): never an app id.
pub const GATEWAY_TOKEN: &str = "gw";

/// The second token of cross-region relay subjects (`tether.xr.…`): never an app id.
pub const RELAY_TOKEN: &str = "xr";

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

/// Connection events of one app, every partition: `tether.<app>.evt.conn.*`.
pub fn conn_events_all(app: &str) -> String {
    format!("{PREFIX}.{app}.evt.conn.*")
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

/// A gateway's question about the receipt of an uplink it got a duplicate of:
/// `tether.<app>.rcpt.<partition>.<did>` (core request/reply, answered by the partition's
/// owner, PROTOCOL 10.2).
pub fn receipt_query(app: &str, did: &str) -> String {
    format!("{PREFIX}.{app}.rcpt.{}.{did}", partition(did))
}

/// Receipt questions of one partition, every app: `tether.*.rcpt.<partition>.*`.
pub fn receipt_query_partition(partition: u16) -> String {
    format!("{PREFIX}.*.rcpt.{partition}.*")
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

/// Downlinks of every gateway (for monitoring and tests): `tether.gw.*.down`.
pub fn gateway_down_all() -> String {
    format!("{PREFIX}.gw.*.down")
}

/// Everything for one gateway, downlinks and control, as one subscription (so the two
/// arrive in the order state sent them): `tether.gw.<gw>.*`.
pub fn gateway_all(gw: &str) -> String {
    format!("{PREFIX}.gw.{gw}.*")
}

/// Control messages for one gateway: `tether.gw.<gw>.ctl` (core NATS).
pub fn gateway_ctl(gw: &str) -> String {
    format!("{PREFIX}.gw.{gw}.ctl")
}

/// Redirect-token requests of one gateway to ipconfig (drain and migration):
/// `tether.gw.<gw>.redirect.req` (core NATS request/reply). Five tokens, so the gateway's
/// own `tether.gw.<gw>.*` subscription does not receive it.
pub fn gateway_redirect(gw: &str) -> String {
    format!("{PREFIX}.gw.{gw}.redirect.req")
}

/// Redirect-token requests of every gateway (ipconfig's queue subscription):
/// `tether.gw.*.redirect.req`.
pub fn gateway_redirect_all() -> String {
    format!("{PREFIX}.gw.*.redirect.req")
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

/// The longest business subject an app may name (`business_subject`), bytes.
pub const MAX_BUSINESS_SUBJECT_LEN: usize = 200;

/// Another uplink subject of the app's business services: `tether.<app>.biz.<name>` (an
/// app's `business_subject` pipeline setting, PROTOCOL.md 12.5).
pub fn business_named(app: &str, name: &str) -> String {
    format!("{PREFIX}.{app}.biz.{name}")
}

/// Checks an app's `business_subject`: `tether.<app>.biz.` followed by one or more literal
/// tokens of `[A-Za-z0-9_-]` (no wildcards), at most [`MAX_BUSINESS_SUBJECT_LEN`] bytes, so
/// one NATS permission (`tether.<app>.>`) still confines the business and no other Tether
/// subject can be named.
pub fn check_business_subject(app: &str, subject: &str) -> Result<(), String> {
    let prefix = business_named(app, "");
    let rest = subject
        .strip_prefix(&prefix)
        .ok_or_else(|| format!("business_subject: {subject:?} must start with {prefix:?}"))?;
    let literal = |t: &str| {
        !t.is_empty()
            && t.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-')
    };
    if subject.len() > MAX_BUSINESS_SUBJECT_LEN || !rest.split('.').all(literal) {
        return Err(format!(
            "business_subject: {subject:?} must be {prefix}<name> with tokens of [A-Za-z0-9_-], at most {MAX_BUSINESS_SUBJECT_LEN} bytes"
        ));
    }
    Ok(())
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

/// Home-region requests: `tether.<app>.affinity`.
pub fn affinity(app: &str) -> String {
    format!("{PREFIX}.{app}.affinity")
}

/// Home-region requests of every app (ipconfig serves them): `tether.*.affinity`.
pub fn affinity_all() -> String {
    format!("{PREFIX}.*.affinity")
}

/// Presence queries: `tether.<app>.presence.get`.
pub fn presence_get(app: &str) -> String {
    format!("{PREFIX}.{app}.presence.get")
}

/// Presence queries of every app (state serves them): `tether.*.presence.get`.
pub fn presence_get_all() -> String {
    format!("{PREFIX}.*.presence.get")
}

/// QoS1 inboxes of one partition, every app: `tether.*.inbox.<partition>.*`.
pub fn inbox_partition(partition: u16) -> String {
    format!("{PREFIX}.*.inbox.{partition}.*")
}

/// Business pushes of every app (state serves them): `tether.*.push`.
pub fn push_all() -> String {
    format!("{PREFIX}.*.push")
}

/// Session requests of every app (state serves them): `tether.*.session`.
pub fn session_all() -> String {
    format!("{PREFIX}.*.session")
}

/// Every subject of one app (the NATS permission of its business services):
/// `tether.<app>.>`.
pub fn app_all(app: &str) -> String {
    format!("{PREFIX}.{app}.>")
}

/// Subjects of the uplink stream: `tether.*.up.*.*`.
pub fn uplink_stream() -> String {
    format!("{PREFIX}.*.up.*.*")
}

/// Subjects of the event log: `tether.*.evt.>`.
pub fn events_stream() -> String {
    format!("{PREFIX}.*.evt.>")
}

/// Subjects of the inbox stream: `tether.*.inbox.*.*`.
pub fn inbox_stream() -> String {
    format!("{PREFIX}.*.inbox.*.*")
}

/// Subjects of the room stream: `tether.*.room.*`.
pub fn rooms_stream() -> String {
    room_all()
}

/// A push relayed from region `origin` to a device of `app` in region `target`:
/// `tether.xr.<origin>.<target>.<app>.<did>` (stream `TETHER_XR_<origin>` in the origin
/// region, sourced by the target region's `TETHER_XR_IN`). Parsed by
/// [`crate::region::RelaySubject::parse`].
pub fn relay(origin: &str, target: &str, app: &str, did: &str) -> String {
    format!("{PREFIX}.{RELAY_TOKEN}.{origin}.{target}.{app}.{did}")
}

/// Every relay subject written in region `origin`: `tether.xr.<origin>.>`.
pub fn relay_from(origin: &str) -> String {
    format!("{PREFIX}.{RELAY_TOKEN}.{origin}.>")
}

/// The relay subjects from `origin` towards `target`: `tether.xr.<origin>.<target>.>`.
pub fn relay_towards(origin: &str, target: &str) -> String {
    format!("{PREFIX}.{RELAY_TOKEN}.{origin}.{target}.>")
}

/// Subjects that must never cross a leaf link between regions: each region has its own
/// streams and KV buckets with the same names and subjects, so a write in one region would
/// also be stored by the other region's stream (and acknowledged twice) if its subject
/// crossed. The leaf remotes of every region deny these in both directions
/// (`nats/conf/leaf-region-*.conf`, the test harness). Pushes (`tether.<app>.push`),
/// session requests, presence and gateway subjects may cross; cross-region delivery goes
/// through the relay streams, which cross by JetStream sourcing (the `$JS.<domain>.API`
/// prefix), not by subject.
pub fn regional_only() -> Vec<String> {
    vec![
        uplink_stream(),
        events_stream(),
        inbox_stream(),
        format!("{PREFIX}.*.ack.>"),
        format!("{PREFIX}.*.rcpt.>"),
        rooms_stream(),
        format!("{PREFIX}.{RELAY_TOKEN}.>"),
        // Every KV bucket (routes, sessions, receipts, apps, gateways, leases).
        "$KV.>".to_string(),
    ]
}

/// A Tether subject, parsed: the identities it carries, each a valid id token, and for
/// device subjects a partition that matches the did. Identity comes from the subject
/// (NATS permissions guard subjects, not headers or payloads).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Subject<'a> {
    /// `tether.<app>.up.<p>.<did>`: an uplink frame.
    Uplink {
        /// App id.
        app: &'a str,
        /// Device id.
        did: &'a str,
    },
    /// `tether.<app>.evt.conn.<p>`: connection events of a partition.
    ConnEvents {
        /// App id.
        app: &'a str,
        /// Partition.
        partition: u16,
    },
    /// `tether.<app>.evt.sess.<p>`: session events of a partition.
    SessionEvents {
        /// App id.
        app: &'a str,
        /// Partition.
        partition: u16,
    },
    /// `tether.<app>.inbox.<p>.<did>`: a QoS1 message of one device.
    Inbox {
        /// App id.
        app: &'a str,
        /// Device id.
        did: &'a str,
    },
    /// `tether.<app>.ack.<p>.<did>`: a device's DOWN_ACK.
    Ack {
        /// App id.
        app: &'a str,
        /// Device id.
        did: &'a str,
    },
    /// `tether.<app>.rcpt.<p>.<did>`: a gateway asks for an uplink's receipt.
    ReceiptQuery {
        /// App id.
        app: &'a str,
        /// Device id.
        did: &'a str,
    },
    /// `tether.<app>.room.<session>`: a recoverable room broadcast.
    Room {
        /// App id.
        app: &'a str,
        /// Session (room) id.
        session: &'a str,
    },
    /// `tether.<app>.bcast`: a broadcast to every gateway.
    Broadcast {
        /// App id.
        app: &'a str,
    },
    /// `tether.<app>.biz.up`: an uplink request to business services.
    BusinessUp {
        /// App id.
        app: &'a str,
    },
    /// `tether.<app>.push`: a business push.
    Push {
        /// App id.
        app: &'a str,
    },
    /// `tether.<app>.session`: a session request.
    Session {
        /// App id.
        app: &'a str,
    },
    /// `tether.<app>.presence`: presence and membership events.
    Presence {
        /// App id.
        app: &'a str,
    },
    /// `tether.<app>.affinity`: a home-region request.
    Affinity {
        /// App id.
        app: &'a str,
    },
    /// `tether.<app>.presence.get`: a presence query.
    PresenceGet {
        /// App id.
        app: &'a str,
    },
    /// `tether.gw.<gw>.down`: downlink frames for one gateway.
    GatewayDown {
        /// Gateway id.
        gw: &'a str,
    },
    /// `tether.gw.<gw>.ctl`: control messages for one gateway.
    GatewayCtl {
        /// Gateway id.
        gw: &'a str,
    },
    /// `tether.gw.<gw>.redirect.req`: a gateway asks ipconfig for redirect tokens.
    GatewayRedirect {
        /// Gateway id (the requester).
        gw: &'a str,
    },
}

impl<'a> Subject<'a> {
    /// Parses `subject`; `None` when it is not a Tether subject, an id token breaks the id
    /// rule, or a device subject's partition does not match its did.
    pub fn parse(subject: &'a str) -> Option<Subject<'a>> {
        let mut tokens = subject.split('.');
        if tokens.next()? != PREFIX {
            return None;
        }
        let owner = tokens.next().filter(|t| valid_id(t))?;
        let rest: Vec<&'a str> = tokens.collect();
        let device = |p: &str, did: &'a str| -> Option<&'a str> {
            (valid_id(did) && p.parse::<u16>().ok()? == partition(did)).then_some(did)
        };
        let part = |p: &str| p.parse::<u16>().ok().filter(|p| *p < PARTITIONS);
        if owner == GATEWAY_TOKEN {
            return match rest.as_slice() {
                [gw, "down"] if valid_id(gw) => Some(Subject::GatewayDown { gw }),
                [gw, "ctl"] if valid_id(gw) => Some(Subject::GatewayCtl { gw }),
                [gw, "redirect", "req"] if valid_id(gw) => Some(Subject::GatewayRedirect { gw }),
                _ => None,
            };
        }
        let app = owner;
        Some(match rest.as_slice() {
            ["up", p, did] => Subject::Uplink {
                app,
                did: device(p, did)?,
            },
            ["evt", "conn", p] => Subject::ConnEvents {
                app,
                partition: part(p)?,
            },
            ["evt", "sess", p] => Subject::SessionEvents {
                app,
                partition: part(p)?,
            },
            ["inbox", p, did] => Subject::Inbox {
                app,
                did: device(p, did)?,
            },
            ["ack", p, did] => Subject::Ack {
                app,
                did: device(p, did)?,
            },
            ["rcpt", p, did] => Subject::ReceiptQuery {
                app,
                did: device(p, did)?,
            },
            ["room", session] if valid_id(session) => Subject::Room { app, session },
            ["bcast"] => Subject::Broadcast { app },
            ["biz", "up"] => Subject::BusinessUp { app },
            ["push"] => Subject::Push { app },
            ["session"] => Subject::Session { app },
            ["presence"] => Subject::Presence { app },
            ["presence", "get"] => Subject::PresenceGet { app },
            ["affinity"] => Subject::Affinity { app },
            _ => return None,
        })
    }

    /// The app the subject belongs to (`None` for gateway subjects).
    pub fn app(&self) -> Option<&'a str> {
        match *self {
            Subject::Uplink { app, .. }
            | Subject::ConnEvents { app, .. }
            | Subject::SessionEvents { app, .. }
            | Subject::Inbox { app, .. }
            | Subject::Ack { app, .. }
            | Subject::ReceiptQuery { app, .. }
            | Subject::Room { app, .. }
            | Subject::Broadcast { app }
            | Subject::BusinessUp { app }
            | Subject::Push { app }
            | Subject::Session { app }
            | Subject::Presence { app }
            | Subject::PresenceGet { app }
            | Subject::Affinity { app } => Some(app),
            Subject::GatewayDown { .. }
            | Subject::GatewayCtl { .. }
            | Subject::GatewayRedirect { .. } => None,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn business_subjects_stay_in_the_app() {
        assert!(check_business_subject("a", &business_named("a", "v2")).is_ok());
        assert!(check_business_subject("a", &business_named("a", "v2.eu-1")).is_ok());
        for bad in [
            business_named("b", "v2"),
            business_named("a", ""),
            business_named("a", "*"),
            business_named("a", ">"),
            business_named("a", "x..y"),
            business_named("a", &"x".repeat(MAX_BUSINESS_SUBJECT_LEN)),
            push("a"),
        ] {
            assert!(check_business_subject("a", &bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn names_are_scoped_by_app() {
        assert_eq!(
            uplink("chat", "d1"),
            format!("tether.chat.up.{}.d1", partition("d1"))
        );
        assert_eq!(gateway_down("gw-1"), "tether.gw.gw-1.down");
    }

    #[test]
    fn every_builder_parses_back() {
        let did = "phone-1";
        let p = partition(did);
        assert_eq!(
            Subject::parse(&uplink("chat", did)),
            Some(Subject::Uplink { app: "chat", did })
        );
        assert_eq!(
            Subject::parse(&inbox("chat", did)),
            Some(Subject::Inbox { app: "chat", did })
        );
        assert_eq!(
            Subject::parse(&ack("chat", did)),
            Some(Subject::Ack { app: "chat", did })
        );
        assert_eq!(
            Subject::parse(&receipt_query("chat", did)),
            Some(Subject::ReceiptQuery { app: "chat", did })
        );
        assert_eq!(
            Subject::parse(&conn_events("chat", did)),
            Some(Subject::ConnEvents {
                app: "chat",
                partition: p
            })
        );
        assert_eq!(
            Subject::parse(&session_events("chat", did)),
            Some(Subject::SessionEvents {
                app: "chat",
                partition: p
            })
        );
        assert_eq!(
            Subject::parse(&room("chat", "r-1")),
            Some(Subject::Room {
                app: "chat",
                session: "r-1"
            })
        );
        assert_eq!(
            Subject::parse(&broadcast("chat")),
            Some(Subject::Broadcast { app: "chat" })
        );
        assert_eq!(
            Subject::parse(&business_up("chat")),
            Some(Subject::BusinessUp { app: "chat" })
        );
        assert_eq!(
            Subject::parse(&push("chat")),
            Some(Subject::Push { app: "chat" })
        );
        assert_eq!(
            Subject::parse(&session("chat")),
            Some(Subject::Session { app: "chat" })
        );
        assert_eq!(
            Subject::parse(&presence("chat")),
            Some(Subject::Presence { app: "chat" })
        );
        assert_eq!(
            Subject::parse(&presence_get("chat")),
            Some(Subject::PresenceGet { app: "chat" })
        );
        assert_eq!(
            Subject::parse(&affinity("chat")),
            Some(Subject::Affinity { app: "chat" })
        );
        assert_eq!(
            Subject::parse(&gateway_down("gw1")),
            Some(Subject::GatewayDown { gw: "gw1" })
        );
        assert_eq!(
            Subject::parse(&gateway_ctl("gw1")),
            Some(Subject::GatewayCtl { gw: "gw1" })
        );
        assert_eq!(
            Subject::parse(&gateway_redirect("gw1")),
            Some(Subject::GatewayRedirect { gw: "gw1" })
        );
        assert_eq!(
            Subject::parse(&push("chat")).and_then(|s| s.app()),
            Some("chat")
        );
    }

    #[test]
    fn foreign_and_forged_subjects_do_not_parse() {
        let wrong_partition = format!("tether.chat.up.{}.d1", (partition("d1") + 1) % PARTITIONS);
        for subject in [
            "other.chat.push",
            "tether.chat.push.x",
            "tether.chat.room.a.b",
            "tether.chat.evt.conn.99",
            "tether.chat.evt.other.1",
            "tether.*.push",
            "tether.gw.gw1.other",
            wrong_partition.as_str(),
        ] {
            assert_eq!(Subject::parse(subject), None, "{subject}");
        }
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
