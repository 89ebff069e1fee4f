//! The one error type of this crate.
//!
//! Messages are lowercase and never echo token bytes that were not signed by the
//! configured key, so an error can be logged as is.

/// Why a token, a key or a key file was refused.
#[derive(thiserror::Error, Debug)]
pub enum AuthError {
    /// The token is not a well-formed EdDSA JWT: wrong shape, bad base64, bad JSON,
    /// unsupported `alg`, too long, or claims of the wrong type.
    #[error("malformed token: {0}")]
    Malformed(String),
    /// The Ed25519 signature does not verify with the configured public key.
    #[error("bad token signature")]
    BadSignature,
    /// The signature is good but the token's `exp` is not after `now`.
    #[error("token expired at {exp} (now {now})")]
    Expired {
        /// The token's `exp` claim, unix seconds.
        exp: u64,
        /// The time the token was checked against, unix seconds.
        now: u64,
    },
    /// An identifier claim breaks the [`valid_id`](crate::valid_id) rule.
    #[error("invalid identifier in claim {field}")]
    InvalidId {
        /// The claim that holds the bad value: `app`, `uid`, `did`, `sess` or `gw`.
        field: &'static str,
    },
    /// A key could not be parsed, encoded or generated.
    #[error("key: {0}")]
    Key(String),
    /// Reading or writing a key file failed (the message names the path).
    #[error("io: {0}")]
    Io(#[from] std::io::Error),
}

impl AuthError {
    /// True for [`AuthError::Expired`]: the token was genuine but is too old, so the
    /// client should fetch a fresh one instead of being treated as an attacker.
    pub fn is_expired(&self) -> bool {
        matches!(self, AuthError::Expired { .. })
    }
}
