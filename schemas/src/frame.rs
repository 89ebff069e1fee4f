//! The fixed header and framing: finding whole frames in a byte stream and building
//! frame bytes, without looking inside the variable header.
//!
//! This is the layer a gateway runs on every byte it reads, so it never allocates on the
//! read path (frames are zero-copy slices of the read buffer) and rejects an oversized
//! frame from its 10-byte fixed header alone, before buffering the rest.

use std::fmt;

use bytes::{BufMut, Bytes, BytesMut};

use crate::error::FrameError;
use crate::limits::{FIXED_HEADER_LEN, MAGIC, MAX_FRAME_LEN_CAP, MAX_VAR_HEADER_LEN, VERSION};

/// Frame type, byte 2 of the fixed header.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
#[repr(u8)]
pub enum FrameType {
    /// Client → server: log in (var header `Login`).
    Login = 1,
    /// Server → client: login accepted (var header `LoginAck`).
    LoginAck = 2,
    /// Client → server: heartbeat; optional body echoed by PONG.
    Ping = 3,
    /// Server → client: heartbeat answer, echoing the PING body.
    Pong = 4,
    /// Client → server: uplink message (var header `Up`, app body).
    Up = 5,
    /// Server → client: uplink receipt (var header `UpAck`).
    UpAck = 6,
    /// Server → client: downlink message (var header `Down`, app body; flag `QOS1`).
    Down = 7,
    /// Client → server: cumulative downlink ack (var header `DownAck`).
    DownAck = 8,
    /// Server → client: move to another gateway (var header `Redirect`).
    Redirect = 9,
    /// Server → client: error (var header `Error`; flag `CLOSE`).
    Error = 10,
}

impl FrameType {
    /// Every frame type, in numeric order.
    pub const ALL: [FrameType; 10] = [
        FrameType::Login,
        FrameType::LoginAck,
        FrameType::Ping,
        FrameType::Pong,
        FrameType::Up,
        FrameType::UpAck,
        FrameType::Down,
        FrameType::DownAck,
        FrameType::Redirect,
        FrameType::Error,
    ];

    /// The protocol name, e.g. `"LOGIN_ACK"` (for logs and metric labels).
    pub const fn as_str(self) -> &'static str {
        match self {
            FrameType::Login => "LOGIN",
            FrameType::LoginAck => "LOGIN_ACK",
            FrameType::Ping => "PING",
            FrameType::Pong => "PONG",
            FrameType::Up => "UP",
            FrameType::UpAck => "UP_ACK",
            FrameType::Down => "DOWN",
            FrameType::DownAck => "DOWN_ACK",
            FrameType::Redirect => "REDIRECT",
            FrameType::Error => "ERROR",
        }
    }
}

impl TryFrom<u8> for FrameType {
    type Error = FrameError;

    fn try_from(n: u8) -> Result<Self, FrameError> {
        match n {
            1..=10 => Ok(FrameType::ALL[usize::from(n - 1)]),
            _ => Err(FrameError::UnknownType(n)),
        }
    }
}

impl fmt::Display for FrameType {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// Flag bits, byte 3 of the fixed header. Unknown bits are sent as 0 and ignored.
pub mod flags {
    /// On DOWN: at-least-once delivery, the client must answer with DOWN_ACK.
    pub const QOS1: u8 = 1;
    /// On ERROR: the sender closes the connection right after this frame.
    pub const CLOSE: u8 = 2;
}

/// The 10-byte fixed header, big-endian on the wire.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct FixedHeader {
    /// Frame type byte; may be a reserved value (see [`FixedHeader::kind`]).
    pub frame_type: u8,
    /// Flag bits (see [`flags`]).
    pub flags: u8,
    /// Length of the protobuf variable header in bytes.
    pub header_len: u16,
    /// Length of the body in bytes.
    pub body_len: u32,
}

impl FixedHeader {
    /// Parses the fixed header at the start of `buf`. `Ok(None)` if fewer than 10 bytes
    /// are there yet; an error if the magic or version byte is wrong. The frame type is
    /// not checked here, so reserved types can still be skipped or refused cleanly.
    pub fn parse(buf: &[u8]) -> Result<Option<FixedHeader>, FrameError> {
        let Some(head) = buf.first_chunk::<FIXED_HEADER_LEN>() else {
            return Ok(None);
        };
        let [magic, version, frame_type, flags, h0, h1, b0, b1, b2, b3] = *head;
        if magic != MAGIC {
            return Err(FrameError::BadMagic(magic));
        }
        if version != VERSION {
            return Err(FrameError::UnsupportedVersion(version));
        }
        Ok(Some(FixedHeader {
            frame_type,
            flags,
            header_len: u16::from_be_bytes([h0, h1]),
            body_len: u32::from_be_bytes([b0, b1, b2, b3]),
        }))
    }

    /// Total frame length: 10 + var header length + body length.
    pub fn frame_len(&self) -> usize {
        // u32 fits usize on every platform we build for (64-bit; 32-bit saturates and
        // is then refused by the max frame length check).
        let body = usize::try_from(self.body_len).unwrap_or(usize::MAX);
        FIXED_HEADER_LEN
            .saturating_add(usize::from(self.header_len))
            .saturating_add(body)
    }

    /// The header's 10 bytes.
    pub fn to_bytes(&self) -> [u8; FIXED_HEADER_LEN] {
        let mut out = [0; FIXED_HEADER_LEN];
        self.write_to(&mut out);
        out
    }

    /// Writes the header's 10 bytes into `out`.
    pub fn write_to(&self, out: &mut [u8; FIXED_HEADER_LEN]) {
        let [h0, h1] = self.header_len.to_be_bytes();
        let [b0, b1, b2, b3] = self.body_len.to_be_bytes();
        *out = [
            MAGIC,
            VERSION,
            self.frame_type,
            self.flags,
            h0,
            h1,
            b0,
            b1,
            b2,
            b3,
        ];
    }

    /// Appends the header's 10 bytes to `out`.
    pub fn put(&self, out: &mut impl BufMut) {
        out.put_slice(&self.to_bytes());
    }

    /// The frame type, or [`FrameError::UnknownType`] for a reserved value.
    pub fn kind(&self) -> Result<FrameType, FrameError> {
        FrameType::try_from(self.frame_type)
    }

    /// Whether flag bit(s) `flag` are set.
    pub fn has_flag(&self, flag: u8) -> bool {
        self.flags & flag == flag
    }
}

/// One whole frame's bytes (cheap to clone: `Bytes` is reference-counted) with its
/// validated fixed header. The frame type may still be reserved; [`crate::Frame::decode`]
/// reports that.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RawFrame {
    /// The parsed fixed header.
    pub header: FixedHeader,
    /// The whole frame: fixed header, var header and body.
    pub bytes: Bytes,
}

impl RawFrame {
    /// Takes `b` as exactly one frame (a WebSocket message, a NATS payload). Fails if it
    /// is longer than `max_frame_len` (clamped to [`MAX_FRAME_LEN_CAP`]) or if its length
    /// differs from what the fixed header declares.
    pub fn from_bytes(b: Bytes, max_frame_len: usize) -> Result<RawFrame, FrameError> {
        let Some(header) = FixedHeader::parse(&b)? else {
            return Err(FrameError::LengthMismatch {
                expected: FIXED_HEADER_LEN,
                actual: b.len(),
            });
        };
        check_len(&header, max_frame_len)?;
        if header.frame_len() != b.len() {
            return Err(FrameError::LengthMismatch {
                expected: header.frame_len(),
                actual: b.len(),
            });
        }
        Ok(RawFrame { header, bytes: b })
    }

    /// The frame type, or [`FrameError::UnknownType`] for a reserved value.
    pub fn kind(&self) -> Result<FrameType, FrameError> {
        self.header.kind()
    }

    /// The protobuf variable header bytes.
    pub fn var_header(&self) -> &[u8] {
        let (start, end) = self.var_header_range();
        self.bytes.get(start..end).unwrap_or_default()
    }

    /// The body, as a zero-copy slice of the frame bytes.
    pub fn body(&self) -> Bytes {
        let (_, start) = self.var_header_range();
        let end = start
            .saturating_add(usize::try_from(self.header.body_len).unwrap_or(usize::MAX))
            .min(self.bytes.len());
        if start >= end {
            return Bytes::new();
        }
        self.bytes.slice(start..end)
    }

    /// Whether the bytes are exactly as long as the header declares (always true for
    /// frames made by [`split_frame`] or [`RawFrame::from_bytes`]).
    pub fn is_consistent(&self) -> bool {
        self.bytes.len() == self.header.frame_len()
            && FixedHeader::parse(&self.bytes) == Ok(Some(self.header))
    }

    fn var_header_range(&self) -> (usize, usize) {
        let len = self.bytes.len();
        let start = FIXED_HEADER_LEN.min(len);
        let end = start
            .saturating_add(usize::from(self.header.header_len))
            .min(len);
        (start, end)
    }
}

/// Incremental decoder for a TCP byte stream: takes one complete frame off the front of
/// `buf`, `Ok(None)` if more bytes are needed. An oversized frame is refused as soon as
/// its fixed header is in, whatever follows. After an error the stream is unusable.
///
/// This never grows `buf`; a reader wanting one read per frame can reserve
/// `FixedHeader::frame_len()` itself.
pub fn split_frame(
    buf: &mut BytesMut,
    max_frame_len: usize,
) -> Result<Option<RawFrame>, FrameError> {
    let Some(header) = FixedHeader::parse(buf)? else {
        return Ok(None);
    };
    check_len(&header, max_frame_len)?;
    let len = header.frame_len();
    if buf.len() < len {
        return Ok(None);
    }
    let bytes = buf.split_to(len).freeze();
    Ok(Some(RawFrame { header, bytes }))
}

fn check_len(header: &FixedHeader, max_frame_len: usize) -> Result<(), FrameError> {
    let max = max_frame_len.min(MAX_FRAME_LEN_CAP);
    let len = header.frame_len();
    if len > max {
        return Err(FrameError::TooLarge { len, max });
    }
    Ok(())
}

/// Builds one frame in a single allocation of exactly the frame's length.
///
/// # Panics
///
/// If the encoded var header is longer than 65,535 bytes or the body longer than
/// `u32::MAX` bytes. Use [`try_encode_frame`] when sizes come from outside.
pub fn encode_frame(
    frame_type: FrameType,
    flags: u8,
    var_header: &impl prost::Message,
    body: &[u8],
) -> Bytes {
    match try_encode_frame(frame_type, flags, var_header, body) {
        Ok(bytes) => bytes,
        Err(err) => panic!("encode_frame: {err}"),
    }
}

/// Like [`encode_frame`], but returns [`FrameError::TooLarge`] instead of panicking when
/// the var header or body does not fit its length field.
pub fn try_encode_frame(
    frame_type: FrameType,
    flags: u8,
    var_header: &impl prost::Message,
    body: &[u8],
) -> Result<Bytes, FrameError> {
    let hlen = var_header.encoded_len();
    let header_len = u16::try_from(hlen).map_err(|_| FrameError::TooLarge {
        len: hlen,
        max: MAX_VAR_HEADER_LEN,
    })?;
    let body_len = u32::try_from(body.len()).map_err(|_| FrameError::TooLarge {
        len: body.len(),
        max: u32::MAX as usize,
    })?;
    let header = FixedHeader {
        frame_type: frame_type as u8,
        flags,
        header_len,
        body_len,
    };
    let mut out = BytesMut::with_capacity(header.frame_len());
    header.put(&mut out);
    // `BytesMut` grows on demand, so encoding cannot run out of room.
    let encoded = var_header.encode(&mut out);
    debug_assert!(encoded.is_ok(), "prost encode into BytesMut failed");
    out.put_slice(body);
    Ok(out.freeze())
}
