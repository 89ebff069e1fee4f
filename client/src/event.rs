//! What the client reports to the app: [`Event`]s on the receiver returned by
//! [`crate::Client::connect`], and [`UpAck`], the receipt of one sent message.

use std::collections::BTreeMap;

use bytes::Bytes;
use tether_schemas::ErrorCode;

/// Something that happened on the client's connection.
#[derive(Debug, Clone, PartialEq)]
#[non_exhaustive]
pub enum Event {
    /// Logged in to a gateway (first connect, reconnect or redirect).
    Connected {
        /// Gateway id from LOGIN_ACK.
        gateway: String,
        /// Connection id from LOGIN_ACK.
        conn_id: u64,
        /// The endpoint the connection goes to.
        endpoint: String,
    },
    /// The connection ended.
    Disconnected {
        /// The ERROR code that ended it, if the gateway sent one.
        code: Option<ErrorCode>,
        /// Human-readable reason.
        reason: String,
        /// Whether the client is reconnecting; `false` means it stopped for good and the
        /// event channel closes after the last events.
        reconnecting: bool,
    },
    /// A downlink message: QoS1 ones exactly once and in seq order, QoS0 ones as they come.
    Message {
        /// Per-device sequence number (0 for QoS0).
        seq: u64,
        /// Whether it was sent at-least-once (QOS1 flag); the client has acknowledged it.
        qos1: bool,
        /// Session (conversation or room) id; may be empty.
        session: String,
        /// Per-room sequence for recoverable room broadcasts; 0 otherwise.
        room_seq: u64,
        /// When the business service sent it, Unix milliseconds.
        sent_at_ms: u64,
        /// Business metadata.
        meta: BTreeMap<String, String>,
        /// The application payload.
        body: Bytes,
    },
    /// The gateway reported an error (a non-closing ERROR frame, or why the client stopped).
    Error {
        /// Error code.
        code: ErrorCode,
        /// Detail.
        text: String,
    },
}

/// The receipt for one UP: the business service stored the message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpAck {
    /// The `client_msg_id` the message was sent with.
    pub client_msg_id: u64,
    /// Id the business service gave the stored message (may be empty).
    pub server_msg_id: String,
}
