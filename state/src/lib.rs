//! State service: event-sourced dispatch, receipts, in-flight retransmission, resume and
//! presence (DESIGN.md sections 2-4, 6, 10-12).
//!
//! Layout:
//! - [`config`]: the one configuration struct; [`app_pipelines`]: per-app settings from
//!   `tether_apps`, applied live.
//! - [`leases`]: which partitions this instance owns (KV leases, compare-and-set);
//!   [`instance_lock`]: proof that no earlier process of this instance id is alive.
//! - [`partition`]: the owner of one partition — events, uplinks, inbox delivery, acks,
//!   retransmission, recycling; rebuilt from streams and KV on takeover.
//! - [`uplink`]: business requests with retries and UP_ACK receipts; [`uplink_lines`]:
//!   several uplinks of one device at once, asked and settled in the device's order.
//! - [`push`]: business pushes: QoS1 to inboxes with per-device sequences, QoS0 direct,
//!   session pushes per member, as one broadcast, or through a recoverable room.
//! - [`sessions`]: the session binding API; [`index`]: the session → devices index.
//! - [`store`]: routes, user index, cursors (KV) and inboxes (stream); [`route_cache`]:
//!   every route in memory for QoS0 pushes.
//! - [`crossregion`]: pushes for devices in other regions (relay streams) and delivery
//!   of the pushes other regions relay here.
//! - [`presence_query`]: which devices of some users are online, in every region.
//! - [`moves`]: a device that moves here from another region (its sequence, and what the
//!   region it left still holds for it).
//! - [`context`]: shared handles; [`metrics`]. The JSON bodies are the bus contract
//!   (`tether_schemas::bus`).

pub mod app_pipelines;
pub mod config;
pub mod context;
pub mod crossregion;
pub mod index;
pub mod inputs;
pub mod instance_lock;
pub mod leases;
pub mod liveness;
pub mod metrics;
pub mod moves;
pub mod partition;
pub mod presence_query;
pub mod push;
pub mod receipt_book;
pub mod route_cache;
pub mod sessions;
pub mod store;
pub mod supervise;
pub mod uplink;
pub mod uplink_lines;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry;
use tether_service::{NatsRole, NatsRoleBuilder, RoleError, Shutdown};

pub use config::StateConfig;

use crate::context::StateCtx;
use crate::metrics::StateMetrics;

/// Why the state service could not start.
#[derive(Debug, thiserror::Error)]
pub enum StateError {
    /// Invalid configuration.
    #[error("invalid state configuration: {0}")]
    Config(String),
    /// NATS or the admin listener.
    #[error(transparent)]
    Role(#[from] RoleError),
    /// Streams, buckets or subscriptions.
    #[error("state: {0}")]
    Bus(String),
}

/// A running state instance.
pub struct RunningState {
    /// Bound admin address.
    pub admin_addr: SocketAddr,
    /// This instance's id.
    pub instance_id: String,
    role: NatsRole,
    /// Held while the instance runs (released when the process ends).
    _lock: Option<instance_lock::InstanceLock>,
    task: tokio::task::JoinHandle<()>,
}

impl RunningState {
    /// Waits until the instance has stopped (after its shutdown signal).
    pub async fn wait(self) {
        let _ = self.task.await;
        let _ = self.role.admin.task.await;
        let _ = tokio::time::timeout(Duration::from_secs(2), self.role.client.flush()).await;
    }
}

/// Starts a state instance; it stops when `shutdown` fires.
pub async fn start(config: StateConfig, shutdown: Shutdown) -> Result<RunningState, StateError> {
    config.validate().map_err(StateError::Config)?;
    let instance_id = if config.instance_id.is_empty() {
        format!("state-{:08x}", rand::random::<u32>())
    } else {
        config.instance_id.clone()
    };
    // A stable id with a lock directory: no other live process has this id (else this
    // one stops here), and every earlier one is dead, so its leases can be taken at once.
    let lock = if config.instance_id.is_empty() || config.instance_lock_dir.is_empty() {
        None
    } else {
        let lock = instance_lock::InstanceLock::acquire(
            std::path::Path::new(&config.instance_lock_dir),
            &instance_id,
        )
        .map_err(|e| StateError::Config(e.to_string()))?;
        tracing::info!(instance = %instance_id, lock = %lock.path().display(), "instance lock held");
        Some(lock)
    };
    let metrics = StateMetrics::default();
    let mut registry = Registry::with_prefix("tether_state");
    metrics.register(&mut registry);
    let relay_metrics = crossregion::RelayMetrics::default();
    if !config.peer_regions.is_empty() {
        relay_metrics.register(&mut registry);
    }
    let failing = supervise::Failing::default();
    let health_failing = failing.clone();
    let role = NatsRoleBuilder::new("state", &config.nats_url)
        .check("partitions", Arc::new(move || health_failing.check()))
        .auth(config.nats.clone())
        .replicas(config.stream_replicas)
        .admin(config.admin_listen)
        .metrics(registry)
        .start(shutdown.clone())
        .await?;
    let js = async_nats::jetstream::new(role.client.clone());
    // State owns the stream settings: bring them to this instance's configuration.
    let layout = tether_nats::BusLayout {
        replicas: config.stream_replicas,
        inbox_max_age: Duration::from_secs(config.inbox_max_age_secs),
        inbox_max_per_device: config.inbox_max_per_device,
        rooms_max_age: Duration::from_secs(config.rooms_max_age_secs),
        rooms_max_per_room: config.rooms_max_per_room,
        ..Default::default()
    };
    tether_nats::apply_layout(&js, &layout)
        .await
        .map_err(|e| StateError::Bus(e.to_string()))?;
    let store = store::Store::open(js.clone(), metrics.clone())
        .await
        .map_err(|e| StateError::Bus(e.to_string()))?
        .with_unavailable_retry(Duration::from_millis(config.unavailable_retry_ms));
    let index = Arc::new(index::SessionIndex::default());
    index::spawn_watchers(
        store.sessions_bucket().clone(),
        index.clone(),
        metrics.clone(),
        shutdown.clone(),
    );
    // A gateway silent for the heartbeat bucket's TTL is gone: its devices are recycled.
    let gateways = Arc::new(liveness::GatewayLiveness::new(
        tether_nats::BusLayout::default().gateway_ttl,
    ));
    let heartbeats = js
        .get_key_value(tether_nats::layout::GATEWAYS_BUCKET)
        .await
        .map_err(|e| StateError::Bus(e.to_string()))?;
    gateways.follow(heartbeats, shutdown.clone());
    let route_cache = Arc::new(route_cache::RouteCache::default());
    route_cache
        .clone()
        .follow(store.routes_bucket().clone(), shutdown.clone());
    let pipelines = Arc::new(app_pipelines::AppPipelines::default());
    let apps = js
        .get_key_value(tether_nats::layout::APPS_BUCKET)
        .await
        .map_err(|e| StateError::Bus(e.to_string()))?;
    pipelines.clone().follow(apps, shutdown.clone());
    let relay = (!config.peer_regions.is_empty()).then(|| {
        Arc::new(crossregion::Relay::new(
            &role.client,
            &config.region,
            &config.peer_regions,
            Duration::from_millis(config.relay_lookup_timeout_ms),
            relay_metrics,
            shutdown.clone(),
        ))
    });
    let ctx = Arc::new(StateCtx {
        config: config.clone(),
        instance_id: instance_id.clone(),
        client: role.client.clone(),
        js: js.clone(),
        store,
        index,
        metrics,
        gateways,
        route_cache,
        pipelines,
        relay,
    });
    if ctx.relay.is_some() {
        let layout = tether_nats::region::RelayLayout {
            region: config.region.clone(),
            peers: config.peer_regions.clone(),
            max_age: Duration::from_secs(config.relay_max_age_secs),
            replicas: config.stream_replicas,
        };
        crossregion::start(ctx.clone(), layout, shutdown.clone())
            .await
            .map_err(|e| StateError::Bus(e.to_string()))?;
    }
    push::serve(ctx.clone(), shutdown.clone())
        .await
        .map_err(|e| StateError::Bus(e.to_string()))?;
    presence_query::serve(ctx.clone(), shutdown.clone())
        .await
        .map_err(|e| StateError::Bus(e.to_string()))?;
    sessions::serve(ctx.clone(), shutdown.clone())
        .await
        .map_err(|e| StateError::Bus(e.to_string()))?;
    let lease_config = leases::LeaseConfig {
        instance_id: instance_id.clone(),
        ttl: Duration::from_millis(config.lease_ttl_ms),
        replicas: config.stream_replicas,
        previous_incarnations_dead: lock.is_some(),
        ..Default::default()
    };
    let (workers_tx, workers_rx) = tokio::sync::watch::channel(BTreeSet::new());
    let leases = leases::start_with_workers(js, lease_config, shutdown.clone(), workers_rx)
        .await
        .map_err(|e| StateError::Bus(e.to_string()))?;
    let task = tokio::spawn(supervise::manage_partitions(
        ctx, leases, workers_tx, failing, shutdown,
    ));
    tracing::info!(instance = %instance_id, admin = %role.admin.addr, "state started");
    Ok(RunningState {
        admin_addr: role.admin.addr,
        instance_id,
        role,
        _lock: lock,
        task,
    })
}
