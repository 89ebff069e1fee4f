//! The admin HTTP server of a role: `/healthz`, `/metrics`, plus the role's own routes.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use prometheus_client::registry::Registry;
use serde::Serialize;
use tokio::net::TcpListener;

use crate::shutdown::Shutdown;

/// What `/healthz` reports: 200 when every check passes, 503 otherwise.
#[derive(Debug, Clone, Serialize)]
pub struct Health {
    /// Whether the role can do its job.
    pub ok: bool,
    /// Named checks and their state, e.g. `("nats", "connected")`.
    pub checks: Vec<(String, String)>,
}

/// A function that computes the current health.
pub type HealthFn = Arc<dyn Fn() -> Health + Send + Sync>;

#[derive(Clone)]
struct AdminState {
    registry: Arc<Registry>,
    health: HealthFn,
    role: &'static str,
}

/// A running admin server.
pub struct AdminServer {
    /// The address it listens on.
    pub addr: SocketAddr,
    /// Finishes when the server has stopped.
    pub task: tokio::task::JoinHandle<()>,
}

impl AdminServer {
    /// Binds `addr` (or serves on `bound`, a listener bound already, e.g. one handed over
    /// by a previous process) and serves `/healthz`, `/metrics` and `extra` until
    /// `shutdown`.
    pub async fn start(
        addr: SocketAddr,
        bound: Option<std::net::TcpListener>,
        role: &'static str,
        registry: Arc<Registry>,
        health: HealthFn,
        extra: Router,
        shutdown: Shutdown,
    ) -> std::io::Result<Self> {
        let listener = match bound {
            Some(listener) => {
                listener.set_nonblocking(true)?;
                TcpListener::from_std(listener)?
            }
            None => TcpListener::bind(addr).await?,
        };
        let addr = listener.local_addr()?;
        let app = router(AdminState {
            registry,
            health,
            role,
        })
        .merge(extra);
        let task = tokio::spawn(async move {
            let stopped = shutdown.clone();
            let served = axum::serve(listener, app)
                .with_graceful_shutdown(async move { stopped.cancelled().await })
                .await;
            if let Err(error) = served {
                tracing::error!(%error, role, "admin server failed");
            }
        });
        tracing::info!(role, %addr, "admin http listening (/healthz, /metrics)");
        Ok(Self { addr, task })
    }
}

fn router(state: AdminState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .with_state(state)
}

async fn healthz(State(state): State<AdminState>) -> Response {
    let health = (state.health)();
    let status = if health.ok {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    let checks: serde_json::Map<String, serde_json::Value> = health
        .checks
        .into_iter()
        .map(|(k, v)| (k, serde_json::Value::String(v)))
        .collect();
    let body = serde_json::json!({ "role": state.role, "ok": health.ok, "checks": checks });
    (status, axum::Json(body)).into_response()
}

async fn metrics(State(state): State<AdminState>) -> Response {
    let mut text = String::new();
    match prometheus_client::encoding::text::encode(&mut text, &state.registry) {
        Ok(()) => (
            [(
                header::CONTENT_TYPE,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
            )],
            text,
        )
            .into_response(),
        Err(error) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            format!("metrics encoding failed: {error}"),
        )
            .into_response(),
    }
}

/// Health of a NATS client connection, for roles whose job needs NATS.
pub fn nats_health(client: &async_nats::Client) -> (bool, String) {
    let state = client.connection_state();
    (
        matches!(state, async_nats::connection::State::Connected),
        state.to_string(),
    )
}
