//! The one error-code enum shared by client ERROR frames, UP_ACK codes, HTTP answers
//! and business-service replies.
//!
//! Numbers and names are stable: never renumber or rename a code, only add new ones at
//! the end. On the wire the number travels (`Error.code`, `UpAck.code`); in JSON the
//! snake_case name does.

use std::fmt;
use std::str::FromStr;

use serde::{Deserialize, Serialize};

macro_rules! error_codes {
    ($( $(#[$doc:meta])* $variant:ident = $num:literal, $name:literal,
        $http:literal, $retry:literal, $meaning:literal; )+) => {
        /// Stable error code; see the module docs and `PROTOCOL.md` for the table.
        #[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
        #[serde(rename_all = "snake_case")]
        #[repr(u16)]
        pub enum ErrorCode {
            $( $(#[$doc])* $variant = $num, )+
        }

        impl ErrorCode {
            /// Every code, in numeric order.
            pub const ALL: &'static [ErrorCode] = &[ $( ErrorCode::$variant, )+ ];

            /// The snake_case name, e.g. `"bad_token"`.
            pub const fn as_str(self) -> &'static str {
                match self { $( ErrorCode::$variant => $name, )+ }
            }

            /// The code for a wire number, or `None` if this version does not know it.
            pub const fn from_u16(n: u16) -> Option<ErrorCode> {
                match n { $( $num => Some(ErrorCode::$variant), )+ _ => None }
            }

            /// HTTP status to answer with when this code ends an HTTP request.
            pub const fn http_status(self) -> u16 {
                match self { $( ErrorCode::$variant => $http, )+ }
            }

            /// Whether repeating the same request later (after `retry_after_ms`, if
            /// given) may succeed; `false` means the caller must change something first.
            pub const fn is_retryable(self) -> bool {
                match self { $( ErrorCode::$variant => $retry, )+ }
            }

            /// One-line meaning, as in the protocol docs' code table.
            pub const fn meaning(self) -> &'static str {
                match self { $( ErrorCode::$variant => $meaning, )+ }
            }
        }

        impl FromStr for ErrorCode {
            type Err = UnknownErrorCode;

            fn from_str(s: &str) -> Result<Self, Self::Err> {
                match s {
                    $( $name => Ok(ErrorCode::$variant), )+
                    _ => Err(UnknownErrorCode(s.to_owned())),
                }
            }
        }
    };
}

error_codes! {
    /// Success.
    Ok = 0, "ok", 200, false, "success";
    /// A frame could not be parsed.
    BadFrame = 1, "bad_frame", 400, false,
        "malformed frame: bad magic, unknown frame type, bad var header or lengths";
    /// A frame was longer than the receiver's limit.
    FrameTooLarge = 2, "frame_too_large", 413, false,
        "frame longer than the receiver's max frame length";
    /// The fixed header carried a protocol version the receiver does not speak.
    UnsupportedVersion = 3, "unsupported_version", 400, false,
        "protocol version byte not supported by the server";
    /// A frame other than LOGIN arrived before login succeeded.
    LoginRequired = 4, "login_required", 401, false,
        "a frame other than LOGIN was sent before LOGIN_ACK";
    /// LOGIN did not arrive within the login timeout.
    LoginTimeout = 5, "login_timeout", 408, true,
        "no LOGIN within the login timeout after connecting";
    /// The token is invalid (signature, format, or claims).
    BadToken = 6, "bad_token", 401, false,
        "token invalid: bad signature, format or claims; fetch a new one";
    /// The token has expired.
    TokenExpired = 7, "token_expired", 401, false,
        "token expired; fetch a new one from ipconfig";
    /// The token or request is for a different app.
    WrongApp = 8, "wrong_app", 403, false,
        "app id does not match the token or is unknown";
    /// A newer login for the same device replaced this connection.
    Replaced = 9, "replaced", 409, false,
        "a newer LOGIN for the same did took over; do not reconnect automatically";
    /// No frame arrived within the idle timeout.
    HeartbeatTimeout = 10, "heartbeat_timeout", 408, true,
        "no frame from the client within the idle timeout";
    /// The client did not read fast enough; its queue overflowed.
    SlowConsumer = 11, "slow_consumer", 503, true,
        "the client read too slowly and its send queue overflowed";
    /// Too many messages or bytes per second.
    RateLimited = 12, "rate_limited", 429, true,
        "message or byte rate limit exceeded; honour retry_after_ms";
    /// A connection limit (per app, per device or per gateway) was reached.
    TooManyConnections = 13, "too_many_connections", 429, true,
        "connection limit reached for the app, device or gateway";
    /// The server is shutting down or draining; reconnect elsewhere.
    GoingAway = 14, "going_away", 503, true,
        "server draining or shutting down; reconnect via ipconfig";
    /// The caller may not do this.
    Forbidden = 15, "forbidden", 403, false,
        "not allowed by the token's permissions or the app's ACL";
    /// An internal server error.
    Internal = 16, "internal", 500, true,
        "internal server error";
    /// A downstream step (business service, store) did not answer in time.
    Timeout = 17, "timeout", 504, true,
        "a downstream step did not answer in time; outcome unknown, retry is safe (deduped)";
    /// The business service refused the message.
    Rejected = 18, "rejected", 422, false,
        "the business service refused the request";
    /// The requested resume point is no longer available.
    RecoveryGap = 19, "recovery_gap", 410, false,
        "resume point too old, history gone; resync from the business service";
    /// The target (device, session, app) does not exist.
    NotFound = 20, "not_found", 404, false,
        "target device, session or app not found";
    /// A needed service is unavailable right now.
    Unavailable = 21, "unavailable", 503, true,
        "a needed service is temporarily unavailable";
    /// The request is malformed (HTTP or bus request).
    BadRequest = 22, "bad_request", 400, false,
        "malformed request: missing or invalid fields";
    /// An operator paused the app: no logins or discovery until it is resumed.
    AppPaused = 23, "app_paused", 503, true,
        "the app is paused by an operator; retry after retry_after_ms";
}

impl ErrorCode {
    /// The code for a 32-bit wire field (`Error.code`, `UpAck.code`), if known.
    pub fn from_u32(n: u32) -> Option<ErrorCode> {
        u16::try_from(n).ok().and_then(ErrorCode::from_u16)
    }

    /// The wire number.
    pub const fn as_u16(self) -> u16 {
        self as u16
    }
}

impl fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl From<ErrorCode> for u16 {
    fn from(code: ErrorCode) -> u16 {
        code as u16
    }
}

impl From<ErrorCode> for u32 {
    fn from(code: ErrorCode) -> u32 {
        u32::from(code as u16)
    }
}

/// A name that is not a known [`ErrorCode`].
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("unknown error code {0:?}")]
pub struct UnknownErrorCode(pub String);

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbers_are_dense_and_stable() {
        for (i, code) in ErrorCode::ALL.iter().enumerate() {
            assert_eq!(usize::from(code.as_u16()), i);
            assert_eq!(ErrorCode::from_u16(code.as_u16()), Some(*code));
            assert_eq!(code.as_str().parse::<ErrorCode>(), Ok(*code));
            assert!(!code.meaning().is_empty());
        }
        assert_eq!(ErrorCode::ALL.len(), 24);
        assert_eq!(ErrorCode::BadRequest as u16, 22);
        assert_eq!(ErrorCode::AppPaused as u16, 23);
        assert_eq!(ErrorCode::from_u16(24), None);
        assert_eq!(ErrorCode::from_u32(70_000), None);
        assert!("nope".parse::<ErrorCode>().is_err());
    }

    #[test]
    fn names_and_statuses() {
        assert_eq!(
            ErrorCode::TooManyConnections.as_str(),
            "too_many_connections"
        );
        assert_eq!(ErrorCode::FrameTooLarge.http_status(), 413);
        assert!(ErrorCode::RateLimited.is_retryable());
        assert!(!ErrorCode::BadToken.is_retryable());
        assert_eq!(ErrorCode::Replaced.to_string(), "replaced");
    }

    #[test]
    fn serde_uses_the_snake_case_name() {
        for code in ErrorCode::ALL {
            let json = serde_json::to_string(code).unwrap_or_default();
            assert_eq!(json, format!("\"{}\"", code.as_str()));
            assert_eq!(serde_json::from_str::<ErrorCode>(&json).ok(), Some(*code));
        }
        assert!(serde_json::from_str::<ErrorCode>("\"nope\"").is_err());
    }
}
