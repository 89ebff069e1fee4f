//! The bus contract: every message that crosses a process over NATS, declared once.
//!
//! Gateways, state, ipconfig, business services and the SDKs all use these types, so the
//! two ends of a subject can never disagree on a field. Subjects, header names and their
//! typed access live in the bus crate (`tether-nats`); this module owns the bodies.
//! `PROTOCOL.md` sections 10–12 are the normative text for other languages.
//!
//! - [`ids`]: the identifier rule (app, uid, did, session, gateway ids are subject tokens).
//! - [`errors`]: the one error body (`{"error":{"code":…,"message":…}}`) and [`ReplyWire`].
//! - [`events`]: the event log (`tether.<app>.evt.…`): connection and session events.
//! - [`control`]: control messages to one gateway (`tether.gw.<gw>.ctl`).
//! - [`migrate`]: drain and migration operations, their status, redirect tokens.
//! - [`restart`]: a gateway's self-restart by hand-off and its status.
//! - [`business`]: uplink requests and replies, pushes, presence (section 11).
//! - [`presence`]: the presence query across regions (11.3).
//! - [`sessions`]: the session binding API and membership events (11.5, 11.6).
//! - [`affinity`]: users' home regions (12.7).
//! - [`apps`]: per-app pipeline settings in the `tether_apps` record (12.4).
//! - [`discovery`]: gateway heartbeats and the ipconfig answer (section 12).

pub mod affinity;
pub mod apps;
pub mod business;
pub mod control;
pub mod discovery;
pub mod errors;
pub mod events;
pub mod ids;
pub mod migrate;
pub mod presence;
pub mod restart;
pub mod sessions;

pub use affinity::{AffinityRecord, AffinityReplyWire, AffinityRequest};
pub use apps::{
    AppPipeline, AppPipelineView, MAX_INBOX_RETENTION_SECS, PIPELINE_KEYS, ReceiptMode,
};
pub use business::{Accepted, PresenceEvent, Push, PushReply, PushReplyWire, Uplink, UplinkReply};
pub use control::GatewayControl;
pub use discovery::{
    AdvertisedEndpoints, AppRates, EndpointInfo, EndpointsAnswer, GatewayHeartbeat,
    IpconfigHeartbeat,
};
pub use errors::{ErrorBody, ReplyWire, WireError};
pub use events::{ConnEvent, Event, SessionChange};
pub use ids::{MAX_ID_LEN, valid_id};
pub use migrate::{
    DrainRequest, MigrateRequest, MigrationStatus, RedirectDevice, RedirectGrant, RedirectReply,
    RedirectRequest,
};
pub use presence::{OnlineDevice, PresenceAnswer, PresenceAnswerWire, PresenceQuery};
pub use restart::{RestartState, RestartStatus};
pub use sessions::{
    MembershipChange, MembershipEvent, SessionOp, SessionReply, SessionReplyWire, SessionRequest,
};

/// Milliseconds since the unix epoch (the `at_ms` of events; 0 if the clock is before 1970).
pub fn unix_now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0)
}

/// Serializes `value` to JSON bytes, or `fallback` if it cannot be (plain structs of
/// strings and numbers never fail; the fallback keeps encoders infallible for callers).
pub(crate) fn to_json_or<T: serde::Serialize>(value: &T, fallback: &'static [u8]) -> bytes::Bytes {
    serde_json::to_vec(value)
        .map(bytes::Bytes::from)
        .unwrap_or_else(|_| bytes::Bytes::from_static(fallback))
}
