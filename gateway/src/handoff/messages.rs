//! The messages of the hand-off protocol and the serialized state of one connection.
//!
//! ```text
//! new → old  Hello { version, fd_limit, fds_open }
//! old → new  Offer { gw, connections }            (old stopped accepting)
//! new → old  Accept | Refuse { reason }           (fd limit checked before anything moves)
//! old → new  Listeners { kinds } + fds
//! old → new  Sockets { conns } + fds              (batches of ≤ 253)
//! old → new  SocketsDone
//! new → old  Prepared                             (subscribed, synced, downlinks held)
//! old → new  Commit { conns, handled }            (old stopped every moved connection)
//! new → old  Committed
//! old → new  Go                                   (the new process serves; the old exits)
//! either     Abort { reason }                     (before Go: the old one keeps serving)
//! ```

use bytes::Bytes;
use serde::{Deserialize, Serialize};

use crate::conn::ConnState;

/// Version of this protocol; both sides must speak the same one. Version 2: the messages are
/// externally tagged (`{"commit": {…}}`), which decodes without buffering a whole commit
/// first.
pub const VERSION: u32 = 2;

/// A listening socket handed over.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ListenerKind {
    /// The raw TCP client listener.
    Tcp,
    /// The WebSocket client listener.
    Ws,
    /// The admin HTTP listener.
    Admin,
}

/// Messages from the new process to the old one.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToOld {
    /// The new process asks to take over.
    Hello {
        /// Protocol version.
        version: u32,
        /// The new process's descriptor limit (RLIMIT_NOFILE, soft, after raising it).
        fd_limit: u64,
    },
    /// The new process can hold every socket offered.
    Accept,
    /// The new process cannot take over (e.g. its descriptor limit is too low).
    Refuse {
        /// Why, for both logs.
        reason: String,
    },
    /// Every socket received, subscriptions confirmed by the server, downlinks held.
    Prepared,
    /// The commit state arrived; the new process is ready to serve.
    Committed,
    /// The new process gives up (before `Go`).
    Abort {
        /// Why.
        reason: String,
    },
}

/// Messages from the old process to the new one.
#[derive(Debug, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ToNew {
    /// What would move.
    Offer {
        /// Gateway id (the new process must have the same one).
        gw: String,
        /// Client connections that would move (TLS ones stay and are closed).
        connections: usize,
        /// Descriptors the new process needs in all (listeners included).
        fds_needed: u64,
    },
    /// Listening sockets, one descriptor each, in this order.
    Listeners {
        /// What each descriptor is.
        kinds: Vec<ListenerKind>,
    },
    /// Client sockets, one descriptor per id, in this order.
    Sockets {
        /// Connection ids.
        conns: Vec<u64>,
    },
    /// Every socket was sent.
    SocketsDone,
    /// The old process stopped the connections below; these are their states.
    Commit {
        /// State of every moved connection (connections sent but missing here are gone).
        conns: Vec<MovedConn>,
        /// Digests of the downlink messages the old process delivered after the new one
        /// started subscribing: the new one drops these from what it held.
        handled: Vec<u64>,
    },
    /// The commit is final: serve.
    Go,
    /// The old process gives up (before `Go`).
    Abort {
        /// Why.
        reason: String,
    },
}

impl ToNew {
    /// Descriptors attached to this message.
    pub fn fd_count(&self) -> usize {
        match self {
            ToNew::Listeners { kinds } => kinds.len(),
            ToNew::Sockets { conns } => conns.len(),
            _ => 0,
        }
    }
}

/// Who a moved connection is (absent before LOGIN).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MovedIdentity {
    /// App id.
    pub app: String,
    /// User id.
    pub uid: String,
    /// Device id.
    pub did: String,
    /// Whether the token allows UP frames.
    pub may_uplink: bool,
    /// The token's rights (carried into a redirect token).
    pub rights: tether_auth::Rights,
}

/// Everything a connection is, apart from its socket.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct MovedConn {
    /// Task-owned state: ids, sequences, token sessions, rate bucket, half-read input.
    pub state: ConnState,
    /// Identity, once logged in.
    pub identity: Option<MovedIdentity>,
    /// Sessions the device is a member of here (token and state-synced).
    pub joined: Vec<String>,
    /// Frames queued but not written yet, in order.
    pub queued: Vec<Bytes>,
    /// A WebSocket message whose first fragments arrived but not its last.
    pub ws_partial: Option<Vec<u8>>,
    /// Whether the connection speaks WebSocket (its decoder moves too).
    pub ws: bool,
    /// Seconds since the last frame from the client (kept across the move, so the idle
    /// deadline does not restart).
    pub silent_secs: u32,
}
