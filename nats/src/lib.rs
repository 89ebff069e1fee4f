//! The bus crate: everything Tether knows about NATS lives here.
//!
//! Layout:
//! - [`subjects`]: every subject name and header name (no subject literals elsewhere).
//! - [`keys`]: key names in the KV buckets.
//! - [`layout`]: JetStream streams and KV buckets with their settings, created idempotently.
//! - [`discovery`]: the gateway heartbeat record that ipconfig ranks gateways by.
//! - [`connect`]: how services connect (names, reconnect logging, timeouts).
//! - [`server`]: running a real `nats-server` process (locating the pinned binary, config,
//!   readiness, stop/restart); used by `tether up` and by the test harness.
//! - [`harness`]: test topologies on free loopback ports — a single JetStream node, a
//!   3-node cluster, a hub with two leaf-node regions (each its own JetStream domain).

pub mod connect;
pub mod discovery;
pub mod harness;
pub mod keys;
pub mod layout;
pub mod server;
pub mod subjects;

pub use connect::{BusError, connect, sync_with_server};
pub use layout::{BusLayout, apply_layout, ensure_layout};
