//! What every Tether role shares: configuration loading, the admin HTTP server (health and
//! Prometheus metrics), the shutdown signal and log setup.
//!
//! Layout:
//! - [`config`]: one typed struct per role, loaded from defaults, a TOML file, `TETHER_*`
//!   environment variables and command-line flags, in that order of precedence.
//! - [`admin`]: `/healthz` and `/metrics` on a role's admin port; roles add their own routes.
//! - [`layout_keeper`]: the bus layout created again after NATS comes back (a restarted
//!   single node loses its memory-stored buckets).
//! - [`shutdown`]: one cancellation token for every task, and the OS signals that trigger it.
//! - [`telemetry`]: `tracing` subscriber controlled by `RUST_LOG`.

pub mod admin;
pub mod config;
pub mod layout_keeper;
pub mod operations;
pub mod role;
pub mod shutdown;
pub mod telemetry;

pub use admin::{AdminServer, Health};
pub use config::{ConfigError, load_config};
pub use operations::OperationsGuard;
pub use role::{CheckFn, NatsRole, NatsRoleBuilder, RoleError};
pub use shutdown::Shutdown;
pub use tether_nats::NatsAuth;
