//! The gateway: holds client sockets (TCP and WebSocket, TLS optional), parses only what
//! routing needs, and moves frames between clients and NATS.
//!
//! Layout:
//! - [`config`]: the one configuration struct.
//! - [`server`]: start, run and gracefully stop a gateway.
//! - [`listener`]: accept loops, TLS and WebSocket handshakes, connection limit.
//! - [`conn`]: one connection — shared part, task-owned state, socket I/O, its task.
//! - [`registry`]: `(app, did) → connection` and per-app counts.
//! - [`timers`]: the one timer wheel for login and idle deadlines.
//! - [`outbound`]: what the gateway writes to NATS (uplink, acks, events).
//! - [`downlink`]: what it receives from NATS and delivers.
//! - [`app_limits`]: per-app pipeline settings from `tether_apps`, applied live.
//! - [`app_traffic`]: messages in and out per app, for the heartbeat's per-app rates.
//! - [`migrate`]: drain and migration by REDIRECT (control ops, admin routes, SIGTERM).
//! - [`handoff`]: restart by hand-off (sockets and state to a new process).
//! - [`nats_lost`]: connections told `going_away` when NATS stays unreachable.
//! - [`heartbeat`]: live figures into the `tether_gateways` bucket for ipconfig; drain flag.
//! - [`ws`]: the WebSocket server codec (RFC 6455), pure and allocation-free when idle.
//! - [`tls`]: rustls acceptor from PEM files.
//! - [`metrics`]: Prometheus metrics.

pub mod admin;
pub mod app_limits;
pub mod app_traffic;
pub mod config;
pub mod conn;
pub mod context;
pub mod control;
pub mod downlink;
pub mod handoff;
pub mod heartbeat;
pub mod listener;
pub mod logins;
pub mod metrics;
pub mod migrate;
pub mod nats_lost;
pub mod outbound;
pub mod registry;
pub mod restart;
pub mod rooms;
pub mod server;
pub mod sessions;
pub mod timers;
pub mod tls;
pub mod ws;

pub use config::{GatewayConfig, TlsFiles};
pub use server::{GatewayError, RunningGateway, start, start_with};

/// The shutdown signal type shared by every task.
pub mod shutdown {
    pub use tether_service::Shutdown;
}
