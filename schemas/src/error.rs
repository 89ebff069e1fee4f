//! Why a frame could not be parsed or built, and which [`ErrorCode`] to answer with.

use crate::codes::ErrorCode;
use crate::frame::FrameType;

/// A frame failed to parse (or, for the `try_` encoders, to build).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    /// Byte 0 was not the magic `0x54`; the stream is not speaking Tether.
    #[error("bad magic byte {0:#04x}")]
    BadMagic(u8),
    /// Byte 1 carried a protocol version this code does not speak.
    #[error("unsupported protocol version {0}")]
    UnsupportedVersion(u8),
    /// The frame (or a part of it, when encoding) is longer than allowed.
    #[error("frame too large: {len} bytes, max {max}")]
    TooLarge {
        /// Declared or needed length in bytes.
        len: usize,
        /// The limit that was exceeded.
        max: usize,
    },
    /// Byte 2 is a frame type reserved for future use (11..=255, or 0).
    #[error("unknown frame type {0}")]
    UnknownType(u8),
    /// The variable header is not a valid protobuf message of the expected type.
    #[error("bad var header: {0}")]
    BadHeader(prost::DecodeError),
    /// A whole-frame buffer is shorter or longer than its fixed header says.
    #[error("frame length mismatch: header says {expected} bytes, got {actual}")]
    LengthMismatch {
        /// Length from the fixed header (or the fixed header length if even that is cut).
        expected: usize,
        /// Length actually given.
        actual: usize,
    },
    /// A PING or PONG carried a variable header (it must be empty).
    #[error("{0} must have an empty var header")]
    UnexpectedHeader(FrameType),
    /// A frame type without a body (LOGIN, ACKs, REDIRECT, ERROR) carried one.
    #[error("{0} must have an empty body")]
    UnexpectedBody(FrameType),
}

impl FrameError {
    /// The code to put in the ERROR frame (or HTTP answer) that reports this error.
    pub fn code(&self) -> ErrorCode {
        match self {
            FrameError::UnsupportedVersion(_) => ErrorCode::UnsupportedVersion,
            FrameError::TooLarge { .. } => ErrorCode::FrameTooLarge,
            FrameError::BadMagic(_)
            | FrameError::UnknownType(_)
            | FrameError::BadHeader(_)
            | FrameError::LengthMismatch { .. }
            | FrameError::UnexpectedHeader(_)
            | FrameError::UnexpectedBody(_) => ErrorCode::BadFrame,
        }
    }
}

impl From<prost::DecodeError> for FrameError {
    fn from(err: prost::DecodeError) -> Self {
        FrameError::BadHeader(err)
    }
}
