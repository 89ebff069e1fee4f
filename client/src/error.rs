//! [`ClientError`]: every way a client operation can fail, with the protocol
//! [`ErrorCode`] it maps to.

use tether_schemas::{ErrorCode, FrameError};

/// Why a client operation failed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[non_exhaustive]
pub enum ClientError {
    /// The configuration cannot work (no endpoint, bad endpoint syntax, empty did, …).
    #[error("invalid client configuration: {0}")]
    Config(String),
    /// No endpoint could be reached (TCP connect, WebSocket handshake or timeout).
    #[error("cannot connect to {endpoint}: {reason}")]
    Connect {
        /// The endpoint that failed last.
        endpoint: String,
        /// Why.
        reason: String,
    },
    /// The gateway refused the LOGIN with an ERROR frame.
    #[error("login refused: {code}: {text}")]
    Login {
        /// The code of the ERROR frame (`bad_token`, `token_expired`, `wrong_app`, …).
        code: ErrorCode,
        /// The ERROR frame's text.
        text: String,
        /// The ERROR frame's `retry_after_ms` (0 if none).
        retry_after_ms: u32,
    },
    /// The gateway answered an UP with a non-zero UP_ACK code.
    #[error("rejected: {0}: {1}")]
    Rejected(ErrorCode, String),
    /// No UP_ACK arrived within the ack timeout. The outcome is unknown: the message may
    /// or may not have been stored.
    #[error("no up_ack within the ack timeout")]
    Timeout,
    /// The client is closed (by [`crate::Client::close`], a `replaced` ERROR, a fatal
    /// error or because reconnecting is off); nothing more is sent.
    #[error("client closed")]
    Closed,
    /// A frame could not be encoded or decoded (e.g. an UP body larger than the frame limit).
    #[error("frame: {0}")]
    Frame(#[from] FrameError),
    /// The connection broke or the peer broke the protocol.
    #[error("connection: {0}")]
    Transport(String),
    /// ipconfig refused the discovery request (credential refused, no gateway, …).
    #[error("ipconfig refused: {code}: {message}")]
    Discovery {
        /// The code of ipconfig's error answer (`bad_token`, `token_expired`, `wrong_app`,
        /// `unavailable`, …).
        code: ErrorCode,
        /// Its message.
        message: String,
    },
    /// The token provider failed.
    #[error("token provider: {0}")]
    Token(String),
    /// Reading or writing a local stream failed (interactive mode).
    #[error("io: {0}")]
    Io(String),
}

impl ClientError {
    /// The protocol code closest to this error (for logs, metrics and `tether client`).
    pub fn code(&self) -> ErrorCode {
        match self {
            ClientError::Config(_) => ErrorCode::BadRequest,
            ClientError::Connect { .. } | ClientError::Closed | ClientError::Transport(_) => {
                ErrorCode::Unavailable
            }
            ClientError::Login { code, .. }
            | ClientError::Rejected(code, _)
            | ClientError::Discovery { code, .. } => *code,
            ClientError::Timeout => ErrorCode::Timeout,
            ClientError::Frame(error) => error.code(),
            ClientError::Token(_) => ErrorCode::BadToken,
            ClientError::Io(_) => ErrorCode::Internal,
        }
    }

    /// Whether the same request may succeed later unchanged (an UP may be sent again:
    /// the gateway de-duplicates by `client_msg_id` only for the same id).
    pub fn is_retryable(&self) -> bool {
        match self {
            ClientError::Connect { .. } | ClientError::Timeout | ClientError::Transport(_) => true,
            ClientError::Login { code, .. }
            | ClientError::Rejected(code, _)
            | ClientError::Discovery { code, .. } => code.is_retryable(),
            _ => false,
        }
    }
}

/// The code for a wire number; unknown numbers count as `internal` (PROTOCOL.md §8).
pub(crate) fn code_of(n: u32) -> ErrorCode {
    ErrorCode::from_u32(n).unwrap_or(ErrorCode::Internal)
}

impl From<std::io::Error> for ClientError {
    fn from(error: std::io::Error) -> Self {
        ClientError::Io(error.to_string())
    }
}
