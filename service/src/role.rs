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

/// How to start a role that works through NATS: name and NATS URL, then optional parts.
///
/// ```no_run
/// # async fn run() -> Result<(), tether_service::RoleError> {
/// use tether_service::{NatsRoleBuilder, Shutdown};
/// let role = NatsRoleBuilder::new("ops", "nats://127.0.0.1:4222")
///     .auth(tether_nats::NatsAuth {
///         creds_file: Some("/etc/tether/tether.creds".into()),
///         ..Default::default()
///     })
///     .admin("127.0.0.1:7430".parse().unwrap())
///     .start(Shutdown::new())
///     .await?;
/// # Ok(()) }
/// ```
pub struct NatsRoleBuilder {
    name: &'static str,
    nats_url: String,
    auth: tether_nats::NatsAuth,
    replicas: usize,
    admin_listen: SocketAddr,
    admin_bound: Option<std::net::TcpListener>,
    registry: Registry,
    routes: axum::Router,
    checks: Vec<(&'static str, CheckFn)>,
}

/// One extra health check: `(ok, state)`, e.g. `(false, "2 partitions failing")`.
pub type CheckFn = Arc<dyn Fn() -> (bool, String) + Send + Sync>;

impl NatsRoleBuilder {
    /// Role `name` (used in the NATS client name and `/healthz`) connecting to `nats_url`
    /// (comma-separated list allowed); anonymous, one replica, admin on `127.0.0.1:0`, no
    /// metrics.
    pub fn new(name: &'static str, nats_url: &str) -> Self {
        NatsRoleBuilder {
            name,
            nats_url: nats_url.to_string(),
            auth: tether_nats::NatsAuth::default(),
            replicas: 1,
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 0)),
            admin_bound: None,
            registry: Registry::default(),
            routes: axum::Router::new(),
            checks: Vec::new(),
        }
    }

    /// An extra `/healthz` check beside the NATS connection.
    pub fn check(mut self, name: &'static str, check: CheckFn) -> Self {
        self.checks.push((name, check));
        self
    }

    /// Credentials and TLS settings of the NATS connection (the role's `[nats]` table).
    pub fn auth(mut self, auth: tether_nats::NatsAuth) -> Self {
        self.auth = auth;
        self
    }

    /// Replicas of the streams and buckets the role creates when they are missing.
    pub fn replicas(mut self, replicas: usize) -> Self {
        self.replicas = replicas;
        self
    }

    /// Where `/healthz` and `/metrics` are served.
    pub fn admin(mut self, listen: SocketAddr) -> Self {
        self.admin_listen = listen;
        self
    }

    /// Serves the admin routes on this listener, bound already (e.g. handed over by the
    /// process this one replaces), instead of binding the `admin` address.
    pub fn admin_listener(mut self, listener: std::net::TcpListener) -> Self {
        self.admin_bound = Some(listener);
        self
    }

    /// The role's metrics, served on `/metrics`.
    pub fn metrics(mut self, registry: Registry) -> Self {
        self.registry = registry;
        self
    }

    /// Extra routes of the admin server.
    pub fn routes(mut self, routes: axum::Router) -> Self {
        self.routes = routes;
        self
    }

    /// Connects, ensures the bus layout, and starts the admin server (until `shutdown`).
    pub async fn start(self, shutdown: Shutdown) -> Result<NatsRole, RoleError> {
        let NatsRoleBuilder {
            name,
            nats_url,
            auth,
            replicas,
            admin_listen,
            admin_bound,
            registry,
            routes,
            checks,
        } = self;
        let client = tether_nats::connect_with(&nats_url, &format!("tether-{name}"), &auth).await?;
        let layout = tether_nats::BusLayout {
            replicas,
            ..Default::default()
        };
        tether_nats::ensure_layout(&async_nats::jetstream::new(client.clone()), &layout).await?;
        crate::layout_keeper::spawn(client.clone(), layout, name.to_string(), shutdown.clone());
        let health_client = client.clone();
        let health = Arc::new(move || {
            let (mut ok, state) = nats_health(&health_client);
            let mut report = vec![("nats".into(), state)];
            for (name, check) in &checks {
                let (passed, state) = check();
                ok &= passed;
                report.push(((*name).to_string(), state));
            }
            Health { ok, checks: report }
        });
        let admin = AdminServer::start(
            admin_listen,
            admin_bound,
            name,
            Arc::new(registry),
            health,
            routes,
            shutdown,
        )
        .await
        .map_err(|error| RoleError::Bind {
            addr: admin_listen,
            error,
        })?;
        Ok(NatsRole { client, admin })
    }
}
