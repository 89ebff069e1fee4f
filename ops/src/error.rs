//! The API's error: an [`ErrorCode`] and a message, answered as the shared error body
//! (`{"error":{"code":…,"message":…}}`) with the code's HTTP status.

use axum::Json;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use tether_schemas::ErrorCode;
use tether_schemas::bus::ErrorBody;

/// A failed operation.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{code}: {message}")]
pub struct ApiError {
    /// The error code.
    pub code: ErrorCode,
    /// What went wrong.
    pub message: String,
    /// Status override (501 for operations this build cannot do).
    pub status: Option<u16>,
}

impl ApiError {
    /// An error with `code`'s status.
    pub fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError {
            code,
            message: message.into(),
            status: None,
        }
    }

    /// 501: the operation needs something this build does not have.
    pub fn not_implemented(message: impl Into<String>) -> ApiError {
        ApiError {
            code: ErrorCode::Unavailable,
            message: message.into(),
            status: Some(501),
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        StatusCode::from_u16(self.status.unwrap_or(self.code.http_status()))
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.status(), Json(ErrorBody::new(self.code, self.message))).into_response()
    }
}
