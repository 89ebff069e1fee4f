//! ops: cluster view and operations (drain, migrate, pools, limits).
//!
//! Today the role connects to NATS, makes sure the streams and buckets exist, and serves
//! `/healthz` and `/metrics`; its behaviour is built on this start by its own issue.

use std::net::SocketAddr;

use prometheus_client::registry::Registry;
use serde::{Deserialize, Serialize};
use tether_service::{NatsRole, NatsRoleBuilder, RoleError, Shutdown};

/// Configuration of `tether ops` (TOML file, `TETHER_OPS_<FIELD>`, flags).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct OpsConfig {
    /// NATS server URL(s), comma separated.
    pub nats_url: String,
    /// Credentials and TLS of the NATS connection: the `[nats]` table (`creds_file`,
    /// `nkey_seed_file`, `user`/`password`, `token`, `tls_ca_file`, `tls_cert_file`/
    /// `tls_key_file`, `inbox_prefix`), also `TETHER_NATS_<FIELD>` for every role.
    pub nats: tether_service::NatsAuth,
    /// Admin HTTP listener: `/healthz`, `/metrics`.
    pub admin_listen: SocketAddr,
    /// Replicas of the streams and buckets created if missing (3 on a cluster).
    pub stream_replicas: usize,
}

impl Default for OpsConfig {
    fn default() -> Self {
        Self {
            nats_url: "nats://127.0.0.1:4222".into(),
            nats: tether_service::NatsAuth::default(),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 7430)),
            stream_replicas: 1,
        }
    }
}

/// A running ops role.
pub struct RunningOps {
    /// Bound admin address.
    pub admin_addr: SocketAddr,
    role: NatsRole,
}

impl RunningOps {
    /// Waits until the role has stopped (after its shutdown signal).
    pub async fn wait(self) {
        let _ = self.role.admin.task.await;
        let _ =
            tokio::time::timeout(std::time::Duration::from_secs(2), self.role.client.flush()).await;
    }
}

/// Starts the role; it stops when `shutdown` fires.
pub async fn start(config: OpsConfig, shutdown: Shutdown) -> Result<RunningOps, RoleError> {
    let registry = Registry::with_prefix("tether_ops");
    let role = NatsRoleBuilder::new("ops", &config.nats_url)
        .auth(config.nats.clone())
        .replicas(config.stream_replicas)
        .admin(config.admin_listen)
        .metrics(registry)
        .start(shutdown)
        .await?;
    tracing::info!(admin = %role.admin.addr, "ops started");
    Ok(RunningOps {
        admin_addr: role.admin.addr,
        role,
    })
}
