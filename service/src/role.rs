//! The common start of a role that works through NATS: connect, make sure the bus layout
//! exists, serve `/healthz` (NATS connection state) and `/metrics`.

use std::net::SocketAddr;
use std::sync::Arc;

use prometheus_client::registry::Registry;

use crate::admin::{AdminServer, Health, nats_health};
use crate::shutdown::Shutdown;

/// Why a role could not start.
#[derive(Debug, thiserror::Error)]
pub enum RoleError {
    /// NATS could not be reached or set up.
    #[error(transparent)]
    Bus(#[from] tether_nats::BusError),
    /// The admin listener could not be bound.
    #[error("cannot listen on {addr}: {error}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        error: std::io::Error,
    },
}

/// A started role: its NATS client and admin server.
pub struct NatsRole {
    /// Connected NATS client.
    pub client: async_nats::Client,
    /// The admin server.
    pub admin: AdminServer,
}

/// Connects role `name` to `nats_url`, ensures the bus layout with `replicas`, and serves
/// the admin endpoints on `admin_listen` with `registry` and `extra` routes.
pub async fn start_nats_role(
    name: &'static str,
    nats_url: &str,
    replicas: usize,
    admin_listen: SocketAddr,
    registry: Registry,
    extra: axum::Router,
    shutdown: Shutdown,
) -> Result<NatsRole, RoleError> {
    let client = tether_nats::connect(nats_url, &format!("tether-{name}")).await?;
    let layout = tether_nats::BusLayout {
        replicas,
        ..Default::default()
    };
    tether_nats::ensure_layout(&async_nats::jetstream::new(client.clone()), &layout).await?;
    let health_client = client.clone();
    let health = Arc::new(move || {
        let (ok, state) = nats_health(&health_client);
        Health {
            ok,
            checks: vec![("nats".into(), state)],
        }
    });
    let admin = AdminServer::start(
        admin_listen,
        name,
        Arc::new(registry),
        health,
        extra,
        shutdown,
    )
    .await
    .map_err(|error| RoleError::Bind {
        addr: admin_listen,
        error,
    })?;
    Ok(NatsRole { client, admin })
}
