//! The bus crate: everything Tether knows about NATS lives here.
//!
//! Layout:
//! - [`subjects`]: every subject name, wildcard and the one parser, [`subjects::Subject`]
//!   (no subject literals elsewhere).
//! - [`headers`]: every header name and typed header access.
//! - [`keys`]: key names in the KV buckets.
//! - [`layout`]: JetStream streams, KV buckets and durable consumers with their settings,
//!   created idempotently.
//! - [`pull`]: pull consumers: a message stream that replaces a lost pull request, and
//!   giving back fetched messages a worker did not handle.
//! - [`serve`]: the shared loops: serve a subscription, watch a KV bucket, until shutdown.
//! - [`unavailable`]: writes refused while a stream has no leader, sent again within a
//!   deadline.
//! - [`connect`]: how services connect (names, reconnect logging, timeouts, credentials and
//!   TLS in [`NatsAuth`]).
//! - [`region`]: the cross-region relay streams (`TETHER_XR_<region>`, `TETHER_XR_IN`)
//!   and peer regions.
//! - [`server`]: running a real `nats-server` process (locating the pinned binary, config,
//!   readiness, stop/restart); used by `tether up` and by the test harness.
//! - [`harness`]: test topologies on free loopback ports — a single JetStream node, a
//!   3-node cluster, a hub with two leaf-node regions (each its own JetStream domain).

pub mod connect;
pub mod direct;
pub mod harness;
pub mod headers;
pub mod keys;
pub mod layout;
pub mod pull;
pub mod region;
pub mod serve;
pub mod server;
pub mod subjects;
pub mod unavailable;

pub use connect::{BusError, NatsAuth, connect, connect_with, sync_with_server};
pub use layout::{BusLayout, apply_layout, ensure_layout};
