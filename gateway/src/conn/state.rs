//! The plain, serializable state of one connection, kept apart from sockets and tasks so a
//! later graceful restart can hand it to a new process along with the socket's fd.

use serde::{Deserialize, Serialize};

/// Transport of a connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Transport {
    /// Raw frames on TCP.
    Tcp,
    /// One frame per WebSocket binary message.
    Ws,
}

impl Transport {
    /// Lowercase name for logs and metrics.
    pub fn as_str(self) -> &'static str {
        match self {
            Transport::Tcp => "tcp",
            Transport::Ws => "ws",
        }
    }
}

/// The plain state of a connection as a hand-off moves it (the task keeps a more compact
/// form of it, see `driver::Driver`).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ConnState {
    /// Connection id (also in the shared part).
    pub conn_id: u64,
    /// Transport.
    pub transport: Transport,
    /// Whether TLS is used.
    pub tls: bool,
    /// Peer address.
    pub remote: std::net::SocketAddr,
    /// Highest cumulative DOWN_ACK seen from the client.
    pub acked_seq: u64,
    /// Resume point the client sent at LOGIN. Read only for the `conn.up` event and not
    /// kept after it: a moved connection carries 0 (kept in the format for older peers).
    pub resume_seq: u64,
    /// Sessions the token joined at login, likewise only for `conn.up`: moved empty (the
    /// memberships move in [`MovedConn::joined`]).
    ///
    /// [`MovedConn::joined`]: crate::handoff::messages::MovedConn::joined
    pub sessions: Vec<String>,
    /// Frame-rate token bucket: tokens left, in thousandths.
    pub rate_tokens_milli: u32,
    /// Gateway-clock millisecond of the last refill.
    pub rate_refilled_ms: u64,
    /// Bytes received but not yet a complete frame (unallocated while idle).
    pub input: bytes::BytesMut,
}
