//! State service: event-sourced dispatch, receipts, retransmission, presence (DESIGN.md sections 2-4, 6, 10-12).
//!
//! Today the role connects to NATS, makes sure the streams and buckets exist, and serves
//! `/healthz` and `/metrics`; its behaviour is built on this start by its own issue.

use std::net::SocketAddr;

use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tether_service::{NatsRole, RoleError, Shutdown, start_nats_role};

/// Configuration of `tether state` (TOML file, `TETHER_STATE_<FIELD>`, flags).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct StateConfig {
    /// NATS server URL(s), comma separated.
    pub nats_url: String,
    /// Admin HTTP listener: `/healthz`, `/metrics`.
    pub admin_listen: SocketAddr,
    /// Replicas of the streams and buckets created if missing (3 on a cluster).
    pub stream_replicas: usize,
}

impl Default for StateConfig {
    fn default() -> Self {
        Self {
            nats_url: "nats://127.0.0.1:4222".into(),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 7410)),
            stream_replicas: 1,
        }
    }
}

/// A running state role.
pub struct RunningState {
    /// Bound admin address.
    pub admin_addr: SocketAddr,
    role: NatsRole,
}

impl RunningState {
    /// Waits until the role has stopped (after its shutdown signal).
    pub async fn wait(self) {
        let _ = self.role.admin.task.await;
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(2), self.role.client.flush()).await;
    }
}

/// Starts the role; it stops when `shutdown` fires.
pub async fn start(config: StateConfig, shutdown: Shutdown) -> Result<RunningState, RoleError> {
    let registry = Registry::with_prefix("tether_state");
    let role = start_nats_role(
        "state",
        &config.nats_url,
        config.stream_replicas,
        config.admin_listen,
        registry,
        axum::Router::new(),
        shutdown,
    )
    .await?;
    tracing::info!(admin = %role.admin.addr, "state started");
    Ok(RunningState {
        admin_addr: role.admin.addr,
        role,
    })
}
