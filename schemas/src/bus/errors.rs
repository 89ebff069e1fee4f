//! The one error body of the bus: `{"error":{"code":"bad_request","message":"…"}}`.
//!
//! Every refusal on a request subject (push, session), every HTTP error of ipconfig, ops and
//! the admin endpoints uses it, with a code from the shared [`ErrorCode`] table.

use bytes::Bytes;
use serde::{Deserialize, Deserializer, Serialize};

use crate::ErrorCode;

/// An error as carried in JSON: `{"code":"bad_request","message":"no target"}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireError {
    /// Error code, serialized as its section-8 name. Missing or unknown names read as
    /// `rejected`.
    #[serde(default = "rejected", deserialize_with = "lenient_code")]
    pub code: ErrorCode,
    /// Human-readable detail (may be empty).
    #[serde(default)]
    pub message: String,
}

impl WireError {
    /// An error with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        WireError {
            code,
            message: message.into(),
        }
    }

    /// A `bad_request` error.
    pub fn bad_request(message: impl Into<String>) -> Self {
        WireError::new(ErrorCode::BadRequest, message)
    }
}

impl std::fmt::Display for WireError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}: {}", self.code, self.message)
    }
}

impl std::error::Error for WireError {}

fn rejected() -> ErrorCode {
    ErrorCode::Rejected
}

/// Reads an error code name; an unknown name (a newer code, or a typo of the business
/// service) becomes `rejected` instead of failing the whole reply.
fn lenient_code<'de, D: Deserializer<'de>>(de: D) -> Result<ErrorCode, D::Error> {
    let name = String::deserialize(de)?;
    Ok(name.parse().unwrap_or(ErrorCode::Rejected))
}

/// An error answer on its own: `{"error":{"code":…,"message":…}}` (HTTP bodies, refusals).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ErrorBody {
    /// The error.
    pub error: WireError,
}

impl ErrorBody {
    /// An error body with `code` and `message`.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> Self {
        ErrorBody {
            error: WireError::new(code, message),
        }
    }

    /// The JSON body.
    pub fn to_json(&self) -> Bytes {
        super::to_json_or(self, br#"{"error":{"code":"internal","message":"encode"}}"#)
    }
}

/// The reply body to a request of the business API (push, session): the success value
/// or `{"error":{…}}`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ReplyWire<T> {
    /// Refused (nothing was delivered, stored or changed).
    Error {
        /// Why.
        error: WireError,
    },
    /// Handled.
    Ok(T),
}

impl<T: Serialize + serde::de::DeserializeOwned> ReplyWire<T> {
    /// A refusal with `code` and detail.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        ReplyWire::Error {
            error: WireError::new(code, message),
        }
    }

    /// The JSON body.
    pub fn to_json(&self) -> Bytes {
        super::to_json_or(self, br#"{"error":{"code":"internal","message":"encode"}}"#)
    }

    /// Parses a reply body.
    pub fn from_json(body: &[u8]) -> Result<Self, serde_json::Error> {
        serde_json::from_slice(body)
    }

    /// The success value, or the refusal as an error.
    pub fn into_result(self) -> Result<T, WireError> {
        match self {
            ReplyWire::Ok(value) => Ok(value),
            ReplyWire::Error { error } => Err(error),
        }
    }
}

impl<T> From<Result<T, WireError>> for ReplyWire<T> {
    fn from(result: Result<T, WireError>) -> Self {
        match result {
            Ok(value) => ReplyWire::Ok(value),
            Err(error) => ReplyWire::Error { error },
        }
    }
}

/// `code` of a reply whose `code` is missing: `rejected`.
pub(crate) fn default_code() -> ErrorCode {
    rejected()
}

/// Reads an error code leniently (see [`WireError`]).
pub(crate) fn read_code<'de, D: Deserializer<'de>>(de: D) -> Result<ErrorCode, D::Error> {
    lenient_code(de)
}
