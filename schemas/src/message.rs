//! Typed frames: a [`RawFrame`] decoded into its protobuf var header, flags and body, and
//! back to bytes.
//!
//! Decoding is strict about shape so that a decoded frame re-encodes to the same bytes
//! when the sender used canonical protobuf: PING and PONG must have an empty var header,
//! and only PING, PONG, UP and DOWN may carry a body.

use bytes::Bytes;
use prost::Message as _;

use crate::codes::ErrorCode;
use crate::error::FrameError;
use crate::frame::{FrameType, RawFrame, flags, try_encode_frame};
use crate::pb;

/// One decoded frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Frame {
    /// Client → server: log in.
    Login(pb::Login),
    /// Server → client: login accepted.
    LoginAck(pb::LoginAck),
    /// Client → server: heartbeat with an optional opaque body.
    Ping(Bytes),
    /// Server → client: heartbeat answer echoing the PING body.
    Pong(Bytes),
    /// Client → server: uplink message.
    Up {
        /// Var header.
        header: pb::Up,
        /// App payload.
        body: Bytes,
    },
    /// Server → client: uplink receipt.
    UpAck(pb::UpAck),
    /// Server → client: downlink message.
    Down {
        /// Var header.
        header: pb::Down,
        /// The `QOS1` flag: the client must acknowledge with DOWN_ACK.
        qos1: bool,
        /// App payload.
        body: Bytes,
    },
    /// Client → server: cumulative downlink ack.
    DownAck(pb::DownAck),
    /// Server → client: move to another gateway.
    Redirect(pb::Redirect),
    /// Server → client: error.
    Error {
        /// Var header.
        error: pb::Error,
        /// The `CLOSE` flag: the server closes the connection after this frame.
        close: bool,
    },
}

impl Frame {
    /// Decodes a raw frame. Reserved frame types give [`FrameError::UnknownType`];
    /// reserved flag bits are ignored.
    pub fn decode(raw: &RawFrame) -> Result<Frame, FrameError> {
        if !raw.is_consistent() {
            return Err(FrameError::LengthMismatch {
                expected: raw.header.frame_len(),
                actual: raw.bytes.len(),
            });
        }
        let kind = raw.kind()?;
        let head = raw.var_header();
        let has_body = raw.header.body_len != 0;
        match kind {
            FrameType::Ping | FrameType::Pong if !head.is_empty() => {
                return Err(FrameError::UnexpectedHeader(kind));
            }
            FrameType::Ping | FrameType::Pong | FrameType::Up | FrameType::Down => {}
            _ if has_body => return Err(FrameError::UnexpectedBody(kind)),
            _ => {}
        }
        Ok(match kind {
            FrameType::Login => Frame::Login(pb::Login::decode(head)?),
            FrameType::LoginAck => Frame::LoginAck(pb::LoginAck::decode(head)?),
            FrameType::Ping => Frame::Ping(raw.body()),
            FrameType::Pong => Frame::Pong(raw.body()),
            FrameType::Up => Frame::Up {
                header: pb::Up::decode(head)?,
                body: raw.body(),
            },
            FrameType::UpAck => Frame::UpAck(pb::UpAck::decode(head)?),
            FrameType::Down => Frame::Down {
                header: pb::Down::decode(head)?,
                qos1: raw.header.has_flag(flags::QOS1),
                body: raw.body(),
            },
            FrameType::DownAck => Frame::DownAck(pb::DownAck::decode(head)?),
            FrameType::Redirect => Frame::Redirect(pb::Redirect::decode(head)?),
            FrameType::Error => Frame::Error {
                error: pb::Error::decode(head)?,
                close: raw.header.has_flag(flags::CLOSE),
            },
        })
    }

    /// Encodes the frame in one allocation of exactly its length.
    ///
    /// # Panics
    ///
    /// If the var header is longer than 65,535 bytes or the body longer than `u32::MAX`
    /// bytes; use [`Frame::try_encode`] when sizes come from outside (e.g. business meta).
    pub fn encode(&self) -> Bytes {
        match self.try_encode() {
            Ok(bytes) => bytes,
            Err(err) => panic!("Frame::encode: {err}"),
        }
    }

    /// Like [`Frame::encode`], but returns [`FrameError::TooLarge`] instead of panicking.
    pub fn try_encode(&self) -> Result<Bytes, FrameError> {
        let kind = self.frame_type();
        let (flags, body) = self.flags_and_body();
        match self {
            Frame::Login(m) => try_encode_frame(kind, flags, m, body),
            Frame::LoginAck(m) => try_encode_frame(kind, flags, m, body),
            Frame::Ping(_) | Frame::Pong(_) => try_encode_frame(kind, flags, &(), body),
            Frame::Up { header, .. } => try_encode_frame(kind, flags, header, body),
            Frame::UpAck(m) => try_encode_frame(kind, flags, m, body),
            Frame::Down { header, .. } => try_encode_frame(kind, flags, header, body),
            Frame::DownAck(m) => try_encode_frame(kind, flags, m, body),
            Frame::Redirect(m) => try_encode_frame(kind, flags, m, body),
            Frame::Error { error, .. } => try_encode_frame(kind, flags, error, body),
        }
    }

    /// The frame's type.
    pub fn frame_type(&self) -> FrameType {
        match self {
            Frame::Login(_) => FrameType::Login,
            Frame::LoginAck(_) => FrameType::LoginAck,
            Frame::Ping(_) => FrameType::Ping,
            Frame::Pong(_) => FrameType::Pong,
            Frame::Up { .. } => FrameType::Up,
            Frame::UpAck(_) => FrameType::UpAck,
            Frame::Down { .. } => FrameType::Down,
            Frame::DownAck(_) => FrameType::DownAck,
            Frame::Redirect(_) => FrameType::Redirect,
            Frame::Error { .. } => FrameType::Error,
        }
    }

    /// An ERROR frame with `code` and `text`; `close` sets the `CLOSE` flag.
    pub fn error(code: ErrorCode, text: impl Into<String>, close: bool) -> Frame {
        Frame::Error {
            error: pb::Error {
                code: code.into(),
                text: text.into(),
                retry_after_ms: 0,
            },
            close,
        }
    }

    /// The fixed-header flag byte this frame is sent with.
    pub fn flags(&self) -> u8 {
        self.flags_and_body().0
    }

    fn flags_and_body(&self) -> (u8, &[u8]) {
        match self {
            Frame::Ping(body) | Frame::Pong(body) | Frame::Up { body, .. } => (0, body),
            Frame::Down { qos1, body, .. } => (if *qos1 { flags::QOS1 } else { 0 }, body),
            Frame::Error { close, .. } => (if *close { flags::CLOSE } else { 0 }, &[]),
            _ => (0, &[]),
        }
    }
}
