//! WebSocket frames (RFC 6455 §5): decoding client→server frames, encoding
//! server→client frames.
//!
//! The decoder is pure: it looks at the caller's read buffer, splits complete frames
//! off its front, unmasks them in place and hands out the payload as [`Bytes`]. It
//! holds no memory unless a fragmented message is being reassembled.

use bytes::{Buf, Bytes, BytesMut};

/// Frame opcodes (RFC 6455 §5.2).
pub mod opcode {
    /// Continuation of a fragmented message.
    pub const CONTINUATION: u8 = 0;
    /// Text message (refused by Tether).
    pub const TEXT: u8 = 1;
    /// Binary message.
    pub const BINARY: u8 = 2;
    /// Connection close.
    pub const CLOSE: u8 = 8;
    /// Ping.
    pub const PING: u8 = 9;
    /// Pong.
    pub const PONG: u8 = 10;
}

/// Close status codes (RFC 6455 §7.4.1) used by Tether.
pub mod close_code {
    /// Normal closure.
    pub const NORMAL: u16 = 1000;
    /// The endpoint is going away (server shutdown, drain).
    pub const GOING_AWAY: u16 = 1001;
    /// Protocol error.
    pub const PROTOCOL_ERROR: u16 = 1002;
    /// A data type the endpoint cannot accept (text messages for Tether).
    pub const UNSUPPORTED_DATA: u16 = 1003;
    /// A message violated the endpoint's policy.
    pub const POLICY_VIOLATION: u16 = 1008;
    /// A message was too big to process.
    pub const MESSAGE_TOO_BIG: u16 = 1009;
    /// Unexpected condition on the server.
    pub const INTERNAL: u16 = 1011;
}

/// Largest payload of a control frame (RFC 6455 §5.5).
const MAX_CONTROL_PAYLOAD: usize = 125;

/// What one call to [`WsDecoder::decode`] produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WsEvent {
    /// One complete (possibly reassembled) binary message, unmasked.
    Binary(Bytes),
    /// A ping; answer with a pong carrying the same payload
    /// (`encode_control(opcode::PONG, &payload)`).
    Ping(Bytes),
    /// A pong (answer to a ping we sent, or unsolicited heartbeat).
    Pong(Bytes),
    /// The client closes the connection. `code` is `None` when the close frame had no
    /// payload; `reason` is empty then. Answer with a close frame, then close the socket.
    Close {
        /// Status code sent by the client, if any.
        code: Option<u16>,
        /// Reason text sent by the client (valid UTF-8, at most 123 bytes).
        reason: String,
    },
}

/// Why the client's frames were refused. The connection must then be closed, after
/// sending `encode_close(err.close_code(), ..)` if possible.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum WsError {
    /// The client broke RFC 6455 (the text tells how).
    #[error("websocket protocol error: {0}")]
    Protocol(&'static str),
    /// A message (all its fragments together) is larger than allowed.
    #[error("websocket message too large: {len} bytes, at most {max} allowed")]
    TooLarge {
        /// Declared length of the message so far (earlier fragments plus this frame).
        len: u64,
        /// The limit that was passed to [`WsDecoder::decode`].
        max: usize,
    },
    /// A text message: text messages are not part of Tether's protocol.
    #[error("websocket text messages are not supported")]
    Text,
}

impl WsError {
    /// The close code to send to the client for this error: protocol error → 1002,
    /// too large → 1009, text → 1003.
    pub fn close_code(&self) -> u16 {
        match self {
            WsError::Protocol(_) => close_code::PROTOCOL_ERROR,
            WsError::TooLarge { .. } => close_code::MESSAGE_TOO_BIG,
            WsError::Text => close_code::UNSUPPORTED_DATA,
        }
    }
}

/// Per-connection decoder state: must be tiny when idle (no allocation unless a
/// fragmented message is in progress).
///
/// After [`WsDecoder::decode`] returned an error or a [`WsEvent::Close`], the
/// connection is over: the decoder's state is then unspecified.
#[derive(Debug, Default)]
pub struct WsDecoder {
    /// The binary message being reassembled, when its first fragment has arrived but
    /// not its last. `Some(empty)` does not allocate.
    partial: Option<BytesMut>,
}

/// A frame header, parsed and checked.
struct Header {
    fin: bool,
    opcode: u8,
    /// Header length, mask key included.
    header_len: usize,
    payload_len: usize,
    mask: [u8; 4],
}

impl WsDecoder {
    /// A decoder continuing a message whose first fragments are `partial` (a connection
    /// handed over by another process).
    pub fn with_partial(partial: Option<Vec<u8>>) -> Self {
        Self {
            partial: partial.map(|bytes| BytesMut::from(&bytes[..])),
        }
    }

    /// The fragments of an unfinished message, if one is being reassembled.
    pub fn partial(&self) -> Option<&[u8]> {
        self.partial.as_deref()
    }

    /// Takes at most one event off the front of `buf` (client→server frames, which
    /// MUST be masked: an unmasked frame is a protocol error).
    ///
    /// Returns `Ok(None)` when `buf` holds no complete frame yet (non-final fragments
    /// of a message are consumed silently, so `Ok(None)` always means "read more").
    /// Call again after each event: `buf` may hold several frames.
    ///
    /// The declared payload length is checked against `max_message` from the frame
    /// header alone, before the payload is buffered (fragments of a message count
    /// together), so the caller never needs to read more than `max_message` plus a
    /// header. Errors are detected as early as possible, often from the first byte.
    pub fn decode(
        &mut self,
        buf: &mut BytesMut,
        max_message: usize,
    ) -> Result<Option<WsEvent>, WsError> {
        loop {
            let Some(header) = self.parse_header(buf, max_message)? else {
                return Ok(None);
            };
            let frame_len = header.header_len + header.payload_len;
            if buf.len() < frame_len {
                return Ok(None);
            }
            buf.advance(header.header_len);
            let mut payload = buf.split_to(header.payload_len);
            unmask(&mut payload, header.mask);

            match header.opcode {
                opcode::BINARY if header.fin => {
                    return Ok(Some(WsEvent::Binary(payload.freeze())));
                }
                opcode::BINARY => {
                    // First fragment: copied into a buffer of our own rather than kept
                    // as a slice of `buf`, so that a slow client cannot pin the
                    // caller's (possibly shared) read buffer between fragments, and
                    // `buffered()` tells the truth. Later fragments are appended.
                    self.partial = Some(BytesMut::from(&payload[..]));
                }
                opcode::CONTINUATION => {
                    // parse_header checked that a message is open.
                    let Some(partial) = self.partial.as_mut() else {
                        return Err(WsError::Protocol("continuation frame without a message"));
                    };
                    partial.extend_from_slice(&payload);
                    if header.fin {
                        let message = self.partial.take().unwrap_or_default();
                        return Ok(Some(WsEvent::Binary(message.freeze())));
                    }
                }
                opcode::PING => return Ok(Some(WsEvent::Ping(payload.freeze()))),
                opcode::PONG => return Ok(Some(WsEvent::Pong(payload.freeze()))),
                opcode::CLOSE => return parse_close(&payload).map(Some),
                // parse_header refused every other opcode.
                _ => return Err(WsError::Protocol("unknown opcode")),
            }
        }
    }

    /// Bytes held by this decoder (for memory accounting): the capacity of the
    /// reassembly buffer of a fragmented message in progress, 0 otherwise.
    pub fn buffered(&self) -> usize {
        self.partial.as_ref().map_or(0, BytesMut::capacity)
    }

    /// Parses and checks the header at the front of `buf`; `Ok(None)` when `buf` does
    /// not hold the whole header yet. Checks whatever the bytes present allow, so
    /// garbage is refused at once.
    fn parse_header(&self, buf: &[u8], max_message: usize) -> Result<Option<Header>, WsError> {
        let Some(&b0) = buf.first() else {
            return Ok(None);
        };
        let fin = b0 & 0x80 != 0;
        if b0 & 0x70 != 0 {
            return Err(WsError::Protocol("reserved bits set"));
        }
        let op = b0 & 0x0F;
        let open = self.partial.is_some();
        match op {
            opcode::CONTINUATION if !open => {
                return Err(WsError::Protocol("continuation frame without a message"));
            }
            opcode::TEXT | opcode::BINARY if open => {
                return Err(WsError::Protocol(
                    "new data frame while a fragmented message is open",
                ));
            }
            opcode::TEXT => return Err(WsError::Text),
            opcode::CONTINUATION | opcode::BINARY => {}
            opcode::CLOSE | opcode::PING | opcode::PONG => {
                if !fin {
                    return Err(WsError::Protocol("fragmented control frame"));
                }
            }
            _ => return Err(WsError::Protocol("unknown opcode")),
        }

        let Some(&b1) = buf.get(1) else {
            return Ok(None);
        };
        if b1 & 0x80 == 0 {
            return Err(WsError::Protocol("unmasked client frame"));
        }
        let len7 = b1 & 0x7F;
        let control = op >= opcode::CLOSE;
        if control && usize::from(len7) > MAX_CONTROL_PAYLOAD {
            return Err(WsError::Protocol(
                "control frame payload longer than 125 bytes",
            ));
        }
        let (len, ext_len): (u64, usize) = match len7 {
            126 => match buf.get(2..4) {
                Some(&[a, b]) => (u64::from(u16::from_be_bytes([a, b])), 2),
                _ => return Ok(None),
            },
            127 => match buf.get(2..10) {
                Some(ext) => {
                    let mut be = [0u8; 8];
                    be.copy_from_slice(ext);
                    let len = u64::from_be_bytes(be);
                    if len >> 63 != 0 {
                        return Err(WsError::Protocol("payload length with the high bit set"));
                    }
                    (len, 8)
                }
                None => return Ok(None),
            },
            n => (u64::from(n), 0),
        };

        if !control {
            let so_far = self.partial.as_ref().map_or(0, BytesMut::len) as u64;
            let total = so_far.saturating_add(len);
            if total > max_message as u64 {
                return Err(WsError::TooLarge {
                    len: total,
                    max: max_message,
                });
            }
        }
        // Fits in usize: either <= 125 or <= max_message.
        let payload_len = usize::try_from(len).map_err(|_| WsError::TooLarge {
            len,
            max: max_message,
        })?;

        let mask_at = 2 + ext_len;
        let Some(&[m0, m1, m2, m3]) = buf.get(mask_at..mask_at + 4) else {
            return Ok(None);
        };
        Ok(Some(Header {
            fin,
            opcode: op,
            header_len: mask_at + 4,
            payload_len,
            mask: [m0, m1, m2, m3],
        }))
    }
}

/// Parses a close frame's payload (RFC 6455 §5.5.1, §7.4).
fn parse_close(payload: &[u8]) -> Result<WsEvent, WsError> {
    match payload {
        [] => Ok(WsEvent::Close {
            code: None,
            reason: String::new(),
        }),
        [_] => Err(WsError::Protocol("close frame with a 1-byte payload")),
        [a, b, reason @ ..] => {
            let code = u16::from_be_bytes([*a, *b]);
            if !close_code_valid(code) {
                return Err(WsError::Protocol("invalid close code"));
            }
            let reason = std::str::from_utf8(reason)
                .map_err(|_| WsError::Protocol("close reason is not UTF-8"))?;
            Ok(WsEvent::Close {
                code: Some(code),
                reason: reason.to_owned(),
            })
        }
    }
}

/// Whether a client may send `code` in a close frame (RFC 6455 §7.4.1 and the IANA
/// registry: 1004, 1005, 1006 and 1015 are reserved, 1016–2999 unassigned).
fn close_code_valid(code: u16) -> bool {
    matches!(code, 1000..=1003 | 1007..=1014 | 3000..=4999)
}

/// XORs `data` with the 4-byte masking key, 8 bytes at a time.
fn unmask(data: &mut [u8], mask: [u8; 4]) {
    let [m0, m1, m2, m3] = mask;
    let wide = u64::from_ne_bytes([m0, m1, m2, m3, m0, m1, m2, m3]);
    // Each 8-byte chunk starts at a multiple of 4, so the key lines up with `wide`.
    let (chunks, tail) = data.as_chunks_mut::<8>();
    for chunk in chunks {
        *chunk = (u64::from_ne_bytes(*chunk) ^ wide).to_ne_bytes();
    }
    // `chunks` covered a multiple of 8 bytes, so the tail starts at key index 0.
    for (byte, key) in tail.iter_mut().zip(mask.iter().cycle()) {
        *byte ^= key;
    }
}

/// Writes the header of an unmasked server→client frame (FIN set) with `opcode` and
/// payload `len` into `out`; returns the header length (2, 4 or 10).
pub fn encode_frame_header(opcode: u8, len: usize, out: &mut [u8; 10]) -> usize {
    out[0] = 0x80 | (opcode & 0x0F);
    if len < 126 {
        out[1] = len as u8;
        2
    } else if let Ok(len16) = u16::try_from(len) {
        out[1] = 126;
        out[2..4].copy_from_slice(&len16.to_be_bytes());
        4
    } else {
        out[1] = 127;
        out[2..10].copy_from_slice(&(len as u64).to_be_bytes());
        10
    }
}

/// Header length of a server→client frame with a payload of `len` bytes (2, 4 or 10).
pub fn binary_header_len(len: usize) -> usize {
    if len < 126 {
        2
    } else if len <= usize::from(u16::MAX) {
        4
    } else {
        10
    }
}

/// A complete unmasked control frame (PONG echo, CLOSE with code + reason, PING).
///
/// The payload is truncated to 125 bytes; for a CLOSE frame the cut falls on a UTF-8
/// character boundary of the reason.
pub fn encode_control(opcode: u8, payload: &[u8]) -> Bytes {
    let len = if payload.len() <= MAX_CONTROL_PAYLOAD {
        payload.len()
    } else if opcode == self::opcode::CLOSE {
        2 + utf8_prefix_len(&payload[2..], MAX_CONTROL_PAYLOAD - 2)
    } else {
        MAX_CONTROL_PAYLOAD
    };
    let mut frame = BytesMut::with_capacity(2 + len);
    frame.extend_from_slice(&[0x80 | (opcode & 0x0F), len as u8]);
    frame.extend_from_slice(&payload[..len]);
    frame.freeze()
}

/// A CLOSE frame with a code and reason (the reason is cut to 123 bytes, on a
/// character boundary). Do not send 1005, 1006 or 1015: they are reserved for
/// reporting, not for the wire.
pub fn encode_close(code: u16, reason: &str) -> Bytes {
    let reason = reason.as_bytes();
    let reason = &reason[..utf8_prefix_len(reason, MAX_CONTROL_PAYLOAD - 2)];
    let mut frame = BytesMut::with_capacity(4 + reason.len());
    frame.extend_from_slice(&[0x80 | opcode::CLOSE, (2 + reason.len()) as u8]);
    frame.extend_from_slice(&code.to_be_bytes());
    frame.extend_from_slice(reason);
    frame.freeze()
}

/// Length of the longest prefix of `bytes` of at most `max` bytes that does not end
/// inside a UTF-8 character (if `bytes` is not UTF-8 at all, simply `max`).
fn utf8_prefix_len(bytes: &[u8], max: usize) -> usize {
    if bytes.len() <= max {
        return bytes.len();
    }
    match std::str::from_utf8(&bytes[..max]) {
        Ok(_) => max,
        // The cut fell inside a character: drop its first bytes.
        Err(e) if e.error_len().is_none() => e.valid_up_to(),
        Err(_) => max,
    }
}
