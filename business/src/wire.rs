//! The business API on the wire (PROTOCOL.md section 11), re-exported from the bus contract
//! (`tether_schemas::bus`) and the bus crate's header names and codec, so a business
//! service needs one import. The state service uses the same types from their homes.

pub use tether_nats::headers::HeaderCodec;
pub use tether_schemas::bus::business::DEFAULT_QUEUE_GROUP;
pub use tether_schemas::bus::{
    Accepted, MAX_ID_LEN, PresenceEvent, Push, PushReply, PushReplyWire, ReplyWire, Uplink,
    UplinkReply, WireError, valid_id,
};

/// Header names of the business API (from `tether_nats::headers`).
pub mod headers {
    /// Uplink requests: the UP's `client_msg_id`, decimal u64. Business services dedupe on
    /// (app, did, this).
    pub use tether_nats::headers::MSG_ID_CLIENT as MSG_ID;
    pub use tether_nats::headers::{APP, CONN, DID, GATEWAY, META_PREFIX, QOS, SESSION, UID};
}
