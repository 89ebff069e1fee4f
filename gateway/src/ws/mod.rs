//! Server side of RFC 6455 WebSocket, as a small pure codec (no I/O).
//!
//! The gateway does not use a WebSocket library: those pin a read buffer (and often a
//! write buffer) for the whole life of a connection, 5–135 KiB per idle connection,
//! while Tether's budget is about 1–2 KiB. This module only transforms bytes:
//!
//! - [`parse_upgrade`] looks at the bytes received so far on a new connection and
//!   answers with the complete HTTP response to send (101 or an error), plus how many
//!   bytes the request took.
//! - [`WsDecoder::decode`] takes at most one event off the front of the caller's
//!   read buffer. It keeps no buffer of its own, except while a fragmented message is
//!   being reassembled: an idle decoder is `size_of::<WsDecoder>()` bytes (32 on 64-bit
//!   targets) and owns no heap memory. Payloads are split off the caller's buffer,
//!   unmasked in place and frozen, so a message is never copied (fragmented messages
//!   are copied once, into the reassembly buffer).
//! - [`encode_frame_header`], [`encode_control`] and [`encode_close`] produce
//!   server→client frames (never masked), so the connection loop can write a header
//!   from a stack array followed by the payload `Bytes` it already holds.
//!
//! The connection loop owns the socket, the read buffer (which it may share or drop
//! while idle) and the write queue, and decides when to read, write and close.
//! Text messages, extensions (permessage-deflate) and subprotocols other than
//! `tether.v1` are not part of Tether's protocol.

pub mod frame;
pub mod handshake;

pub use frame::{
    WsDecoder, WsError, WsEvent, binary_header_len, close_code, encode_close, encode_control,
    encode_frame_header, opcode,
};
pub use handshake::{Handshake, parse_upgrade};

#[cfg(test)]
mod tests;
