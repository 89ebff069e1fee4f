//! Protocol constants: header layout, frame size limits and session timers.
//!
//! Timers are defaults; gateways may be configured otherwise and tell the client the
//! heartbeat interval they expect in `LoginAck.heartbeat_secs`.

/// First byte of every frame: ASCII `'T'`.
pub const MAGIC: u8 = 0x54;

/// Protocol version carried in byte 1 of every frame.
pub const VERSION: u8 = 0x01;

/// Length of the fixed header in bytes.
pub const FIXED_HEADER_LEN: usize = 10;

/// Largest variable header the 16-bit length field can describe.
pub const MAX_VAR_HEADER_LEN: usize = u16::MAX as usize;

/// Default largest whole frame (fixed header + var header + body) a receiver accepts.
pub const DEFAULT_MAX_FRAME_LEN: usize = 65_536;

/// Hard protocol cap on a frame's length; configured limits above it are clamped to it.
pub const MAX_FRAME_LEN_CAP: usize = 16 * 1024 * 1024;

/// Seconds a new connection has to send LOGIN before the server closes it.
pub const DEFAULT_LOGIN_TIMEOUT_SECS: u64 = 10;

/// Seconds between client PINGs (before jitter).
pub const DEFAULT_HEARTBEAT_SECS: u64 = 300;

/// Random jitter, in seconds, a client adds to or subtracts from each heartbeat interval.
pub const DEFAULT_HEARTBEAT_JITTER_SECS: u64 = 30;

/// Seconds without any frame from the client after which the server closes the connection
/// (two heartbeats plus jitter, so one lost PING is tolerated).
pub const DEFAULT_IDLE_TIMEOUT_SECS: u64 = 660;

/// Most room cursors one LOGIN may carry.
pub const MAX_ROOM_CURSORS: usize = 256;

/// Longest `Login.sdk` string, in bytes (printable ASCII only).
pub const MAX_SDK_LEN: usize = 64;
