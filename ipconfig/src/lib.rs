//! ipconfig: connection discovery, gateway scoring and tokens (DESIGN.md flow 1,
//! PROTOCOL.md section 12).
//!
//! Gateways put heartbeats into the `tether_gateways` bucket; ipconfig follows them and
//! the `tether_apps` bucket in memory and answers `GET /v1/endpoints`: a device presents a
//! credential signed by its app's backend and gets at most 8 ranked endpoints and a
//! short-lived gateway token. Instances share nothing but NATS, so run as many as needed.
//!
//! Layout:
//! - [`config`]: the one configuration struct.
//! - [`api`]: the HTTP handler, answers and error JSON.
//! - [`credential`]: client credentials (HS256 / EdDSA JWTs) and their checks.
//! - [`apps`]: app records, the app table and the `tether app` operations.
//! - [`gateways`]: live gateways from their heartbeats.
//! - [`affinity`]: users' home regions (`tether.<app>.affinity`, `tether_affinity`).
//! - [`peers`]: buckets of peer regions, followed through their JetStream domains.
//! - [`instance`]: this instance's record in `tether_instances` (the ops view).
//! - [`redirect`]: redirect tokens for gateways that drain or migrate devices.
//! - [`score`]: eligibility, score and order of gateways for one request.
//! - [`metrics`]: Prometheus metrics.

pub mod affinity;
pub mod api;
pub mod apps;
pub mod config;
pub mod credential;
pub mod gateways;
pub mod instance;
pub mod metrics;
pub mod peers;
pub mod redirect;
pub mod score;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tether_auth::TokenSigner;
use tether_service::{NatsRole, NatsRoleBuilder, RoleError, Shutdown};
use tokio::net::TcpListener;
use tokio::task::JoinHandle;

pub use apps::{AppAdmin, AppRecord, AppTable};
pub use config::IpconfigConfig;
pub use credential::{CredentialClaims, sign_hs256};

/// Why ipconfig could not start.
#[derive(Debug, thiserror::Error)]
pub enum IpconfigError {
    /// The configuration is invalid.
    #[error("invalid ipconfig configuration: {0}")]
    Config(String),
    /// The token signing key could not be read.
    #[error("token signing key: {0}")]
    Key(String),
    /// NATS could not be reached or set up, or the admin port not bound.
    #[error(transparent)]
    Role(#[from] RoleError),
    /// A KV bucket could not be opened or read.
    #[error("{0}")]
    Bucket(String),
    /// The public listener could not be bound.
    #[error("cannot listen on {addr}: {error}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        error: std::io::Error,
    },
}

/// A running ipconfig role.
pub struct RunningIpconfig {
    /// Bound admin address (`/healthz`, `/metrics`).
    pub admin_addr: SocketAddr,
    /// Bound public address (`GET /v1/endpoints`).
    pub http_addr: SocketAddr,
    role: NatsRole,
    http: JoinHandle<()>,
}

impl RunningIpconfig {
    /// Waits until the role has stopped (after its shutdown signal).
    pub async fn wait(self) {
        let _ = self.http.await;
        let _ = self.role.admin.task.await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.role.client.flush()).await;
    }
}

/// Starts the role; it stops when `shutdown` fires.
pub async fn start(
    config: IpconfigConfig,
    shutdown: Shutdown,
) -> Result<RunningIpconfig, IpconfigError> {
    config.validate().map_err(IpconfigError::Config)?;
    let signer =
        TokenSigner::from_file(&config.token_key).map_err(|e| IpconfigError::Key(e.to_string()))?;
    let metrics = metrics::IpconfigMetrics::default();
    let mut registry = Registry::with_prefix("tether_ipconfig");
    metrics.register(&mut registry);
    let role = NatsRoleBuilder::new("ipconfig", &config.nats_url)
        .auth(config.nats.clone())
        .replicas(config.stream_replicas)
        .admin(config.admin_listen)
        .metrics(registry)
        .start(shutdown.clone())
        .await?;

    let js = async_nats::jetstream::new(role.client.clone());
    let bucket = |name: &'static str| {
        let js = js.clone();
        async move {
            js.get_key_value(name)
                .await
                .map_err(|e| IpconfigError::Bucket(format!("{name}: {e}")))
        }
    };
    let apps = AppTable::new(&config.apps);
    apps.follow(
        bucket(tether_nats::layout::APPS_BUCKET).await?,
        shutdown.clone(),
    )
    .await
    .map_err(|e| IpconfigError::Bucket(e.to_string()))?;
    let gateways = gateways::GatewayTable::new(Duration::from_millis(config.stale_after_ms));
    gateways.follow(
        bucket(tether_nats::layout::GATEWAYS_BUCKET).await?,
        shutdown.clone(),
    );
    let affinity_store = bucket(tether_nats::layout::AFFINITY_BUCKET).await?;
    let affinity = affinity::AffinityTable::default();
    affinity.follow(affinity_store.clone(), shutdown.clone());
    for peer in &config.peer_regions {
        let js = async_nats::jetstream::with_domain(role.client.clone(), &peer.domain);
        let table = gateways.clone();
        peers::open_then(
            js.clone(),
            tether_nats::layout::GATEWAYS_BUCKET,
            peer.name.clone(),
            shutdown.clone(),
            move |store, shutdown| table.follow(store, shutdown),
        );
        let table = affinity.clone();
        peers::open_then(
            js,
            tether_nats::layout::AFFINITY_BUCKET,
            peer.name.clone(),
            shutdown.clone(),
            move |store, shutdown| table.follow(store, shutdown),
        );
    }
    spawn_gauges(&metrics, &apps, &gateways, shutdown.clone());

    let listener = TcpListener::bind(config.http_listen)
        .await
        .map_err(|error| IpconfigError::Bind {
            addr: config.http_listen,
            error,
        })?;
    let http_addr = listener.local_addr().map_err(|error| IpconfigError::Bind {
        addr: config.http_listen,
        error,
    })?;
    let state = api::ApiState {
        config: Arc::new(config),
        apps,
        gateways,
        affinity,
        signer,
        metrics,
    };
    redirect::serve(role.client.clone(), state.clone(), shutdown.clone())
        .await
        .map_err(|e| IpconfigError::Bucket(format!("redirect subscription: {e}")))?;
    affinity::serve(
        role.client.clone(),
        state.clone(),
        affinity_store,
        shutdown.clone(),
    )
    .await
    .map_err(|e| IpconfigError::Bucket(format!("affinity subscription: {e}")))?;
    let id = if state.config.id.is_empty() {
        format!("ipconfig-{:08x}", rand::random::<u32>())
    } else {
        state.config.id.clone()
    };
    instance::spawn(
        bucket(tether_nats::layout::INSTANCES_BUCKET).await?,
        state.clone(),
        id,
        http_addr.to_string(),
        shutdown.clone(),
    );
    let app = api::router(state);
    let stopped = shutdown.clone();
    let http = tokio::spawn(async move {
        let served = axum::serve(listener, app)
            .with_graceful_shutdown(async move { stopped.cancelled().await })
            .await;
        if let Err(error) = served {
            tracing::error!(%error, "ipconfig http server failed");
        }
    });
    tracing::info!(admin = %role.admin.addr, http = %http_addr, "ipconfig started");
    Ok(RunningIpconfig {
        admin_addr: role.admin.addr,
        http_addr,
        role,
        http,
    })
}

/// Keeps the `gateways_seen` and `apps` gauges current.
fn spawn_gauges(
    metrics: &metrics::IpconfigMetrics,
    apps: &AppTable,
    gateways: &gateways::GatewayTable,
    shutdown: Shutdown,
) {
    let (metrics, apps, gateways) = (metrics.clone(), apps.clone(), gateways.clone());
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_secs(1));
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {
                    metrics.gateways_seen.set(i64::try_from(gateways.live_count()).unwrap_or(i64::MAX));
                    metrics.apps.set(i64::try_from(apps.len()).unwrap_or(i64::MAX));
                }
            }
        }
    });
}
