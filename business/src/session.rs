//! The session binding API (`tether.<app>.session`, PROTOCOL.md 11.5) and membership events
//! (11.6), re-exported from the bus contract (`tether_schemas::bus::sessions`).

pub use tether_schemas::bus::sessions::*;
