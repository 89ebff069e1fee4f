//! One client connection: shared part ([`ConnShared`]), task-owned state ([`ConnState`]),
//! socket I/O ([`io`]), the task that drives it ([`driver`]) and dormancy while it is
//! silent ([`dormant`]).

pub mod dormant;
pub mod driver;
pub mod io;
pub mod shared;
pub mod state;

pub use shared::{CloseReason, ConnShared, Enqueued, Identity};
pub use state::{ConnState, Transport};
