//! ops: the operator's cockpit — cluster view, operations API, web dashboard.
//!
//! Layout:
//! - [`config`]: the one configuration struct.
//! - [`view`]: the cluster view in memory and its snapshot; [`watch`] fills it from KV
//!   watches (heartbeats, leases, apps) and the NATS monitoring endpoints.
//! - [`actions`]: the operations (kick, app settings, drain, migrate, restart).
//! - [`restart`]: the rolling restart, one gateway after another.
//! - [`api`]: the HTTP JSON API behind admin tokens, and the live stream (SSE).
//! - [`audit`]: the audit log of operations (`tether_audit` bucket).
//! - [`dashboard`]: the embedded web page.
//! - [`http`]: a small HTTP client (monitoring endpoints, `tether ctl`).
//! - [`error`], [`metrics`].

pub mod actions;
pub mod api;
pub mod audit;
pub mod config;
pub mod dashboard;
pub mod error;
pub mod http;
pub mod metrics;
pub mod restart;
pub mod view;
pub mod watch;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tether_service::{NatsRole, NatsRoleBuilder, RoleError, Shutdown};

pub use config::OpsConfig;
pub use view::{ClusterSnapshot, ClusterView};

/// Why ops could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpsError {
    /// Invalid configuration.
    #[error("invalid ops configuration: {0}")]
    Config(String),
    /// NATS or the listener.
    #[error(transparent)]
    Role(#[from] RoleError),
    /// Buckets.
    #[error("ops: {0}")]
    Bus(String),
}

/// A running ops role.
pub struct RunningOps {
    /// Bound HTTP address (API, dashboard, `/healthz`, `/metrics`).
    pub admin_addr: SocketAddr,
    role: NatsRole,
}

impl RunningOps {
    /// The dashboard's URL.
    pub fn dashboard_url(&self) -> String {
        format!("http://{}/", self.admin_addr)
    }

    /// Waits until the role has stopped (after its shutdown signal).
    pub async fn wait(self) {
        let _ = self.role.admin.task.await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.role.client.flush()).await;
    }
}

/// Starts the role; it stops when `shutdown` fires.
pub async fn start(config: OpsConfig, shutdown: Shutdown) -> Result<RunningOps, OpsError> {
    config.validate().map_err(OpsError::Config)?;
    let metrics = metrics::OpsMetrics::default();
    let mut registry = Registry::with_prefix("tether_ops");
    metrics.register(&mut registry);
    let cell = api::OpsCell::default();
    let guard = api::TokenGuard::new(&config.admin_tokens, config.admin_listen);
    let role = NatsRoleBuilder::new("ops", &config.nats_url)
        .auth(config.nats.clone())
        .replicas(config.stream_replicas)
        .admin(config.admin_listen)
        .metrics(registry)
        .routes(api::router(cell.clone(), guard).merge(dashboard::router()))
        .start(shutdown.clone())
        .await?;
    let view = Arc::new(ClusterView::new(Duration::from_millis(
        config.gateway_stale_ms,
    )));
    let js = async_nats::jetstream::new(role.client.clone());
    watch::spawn(
        js,
        view.clone(),
        config.monitor_urls(),
        Duration::from_millis(config.monitor_interval_ms),
        shutdown.clone(),
    );
    let ops = actions::Ops::open(
        role.client.clone(),
        view.clone(),
        config.stream_replicas,
        metrics.clone(),
        config.restart_timeout_secs,
    )
    .await
    .map_err(|e| OpsError::Bus(e.message))?;
    let ops = Arc::new(ops);
    let _ = cell.set(ops.clone());
    tokio::spawn(follow_migrations(ops, shutdown.clone()));
    tokio::spawn(update_gauges(view, metrics, shutdown));
    tracing::info!(addr = %role.admin.addr, "ops started");
    Ok(RunningOps {
        admin_addr: role.admin.addr,
        role,
    })
}

/// Asks every gateway with a running migration where it stands, every second, so the
/// dashboard shows its progress live.
async fn follow_migrations(ops: Arc<actions::Ops>, stop: Shutdown) {
    loop {
        for gw in ops.view.running_migrations() {
            if let Err(error) = ops.migration(&gw).await {
                tracing::debug!(%gw, %error, "migration status not read");
            }
        }
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Keeps the view's gauges current.
async fn update_gauges(view: Arc<ClusterView>, metrics: metrics::OpsMetrics, stop: Shutdown) {
    loop {
        let snapshot = view.snapshot();
        let count = |n: usize| i64::try_from(n).unwrap_or(i64::MAX);
        metrics.gateways.set(count(snapshot.gateways.len()));
        metrics.states.set(count(snapshot.states.len()));
        metrics
            .connections
            .set(i64::try_from(snapshot.totals.connections).unwrap_or(i64::MAX));
        tokio::select! {
            () = stop.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}
