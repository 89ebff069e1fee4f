//! Tether's client wire protocol: the fixed header, framing, protobuf variable headers,
//! typed frames and the shared error codes. `PROTOCOL.md` in this crate is the
//! byte-level specification with test vectors; this crate is its reference codec.
//!
//! # Layout
//!
//! - [`limits`]: protocol constants (magic, version, header length, frame size limits,
//!   login/heartbeat/idle timers).
//! - [`frame`]: the 10-byte fixed header, [`split_frame`] for TCP streams,
//!   [`RawFrame::from_bytes`] for one-frame messages (WebSocket, NATS), and
//!   [`encode_frame`]. This is all a gateway needs on the hot path.
//! - [`message`]: [`Frame`], a raw frame decoded into its protobuf var header, flags and
//!   body, and back.
//! - [`pb`]: prost types generated from `proto/tether.proto`.
//! - [`codes`]: [`ErrorCode`], the one code enum shared by ERROR frames, UP_ACK, HTTP
//!   answers and business replies.
//! - [`error`]: [`FrameError`], why bytes are not a valid frame.
//! - [`bus`]: the bus contract: every JSON message that crosses a process over NATS
//!   (events, gateway control, business API, discovery, the error body, the id rule).
//!
//! # Example
//!
//! ```
//! use bytes::BytesMut;
//! use tether_schemas::{Frame, limits::DEFAULT_MAX_FRAME_LEN, pb, split_frame};
//!
//! let ack = Frame::DownAck(pb::DownAck { seq: 42 });
//! let mut buf = BytesMut::from(&ack.encode()[..]);
//! let raw = split_frame(&mut buf, DEFAULT_MAX_FRAME_LEN).unwrap().unwrap();
//! assert_eq!(Frame::decode(&raw).unwrap(), ack);
//! assert!(buf.is_empty());
//! ```

#![forbid(unsafe_code)]

pub mod bus;
pub mod codes;
pub mod error;
pub mod frame;
pub mod limits;
pub mod message;
pub mod pb;

pub use codes::{ErrorCode, UnknownErrorCode};
pub use error::FrameError;
pub use frame::{
    FixedHeader, FrameType, RawFrame, encode_frame, flags, split_frame, try_encode_frame,
};
pub use message::Frame;

#[cfg(test)]
mod tests;
