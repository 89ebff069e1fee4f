//! The gateway's own admin routes, served beside `/healthz` and `/metrics`.
//!
//! `GET /v1/sessions/{app}/{session}`: how many local members a session has here
//! (`{"app":…,"session":…,"members":n}`), for operators and tests.
//!
//! Drain and migration (PROTOCOL.md 10.7), each answering the migration status:
//! `POST /v1/migrate` (body: a `migrate` op without `op`), `POST /v1/drain` (optional body:
//! `{"target":…,"rate":…}`), `DELETE /v1/drain`, `GET /v1/migration`. A process that handed
//! over to its successor (still serving its redirected TLS connections, on the same admin
//! listener) refuses the three that act (`unavailable`: ask again, the successor answers).

use std::sync::{Arc, OnceLock};
use tether_schemas::ErrorCode;
use tether_schemas::bus::ErrorBody;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::{get, post};
use serde_json::{Value, json};
use tether_schemas::bus::{DrainRequest, MigrateRequest, MigrationStatus};

use crate::context::GatewayCtx;

/// Filled once the gateway's context exists (the admin server starts before it).
pub type CtxCell = Arc<OnceLock<Arc<GatewayCtx>>>;

/// The routes.
pub fn router(cell: CtxCell) -> axum::Router {
    axum::Router::new()
        .route("/v1/sessions/{app}/{session}", get(session_members))
        .route("/v1/migrate", post(migrate))
        .route("/v1/drain", post(drain).delete(undrain))
        .route("/v1/migration", get(status))
        .with_state(cell)
}

type Answer = (StatusCode, Json<Value>);

fn starting() -> Answer {
    (
        StatusCode::SERVICE_UNAVAILABLE,
        Json(json!(ErrorBody::new(
            ErrorCode::Unavailable,
            "gateway starting"
        ))),
    )
}

/// The context of a process that may act on migrations: not starting, not handed over.
fn acting(cell: &CtxCell) -> Result<&Arc<GatewayCtx>, Answer> {
    let ctx = cell.get().ok_or_else(starting)?;
    if ctx.handoff.handed_over.is_cancelled() {
        return Err((
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!(ErrorBody::new(
                ErrorCode::Unavailable,
                "this process handed over to its successor: ask again"
            ))),
        ));
    }
    Ok(ctx)
}

fn answer(result: Result<MigrationStatus, String>) -> Answer {
    match result {
        Ok(status) => (StatusCode::OK, Json(json!(status))),
        Err(text) => (
            StatusCode::BAD_REQUEST,
            Json(json!(ErrorBody::new(ErrorCode::BadRequest, text))),
        ),
    }
}

/// Reads a JSON body; an empty one is the type's default.
fn body<T: serde::de::DeserializeOwned + Default>(bytes: &[u8]) -> Result<T, String> {
    if bytes.iter().all(u8::is_ascii_whitespace) {
        return Ok(T::default());
    }
    serde_json::from_slice(bytes).map_err(|e| format!("unreadable body: {e}"))
}

async fn migrate(State(cell): State<CtxCell>, bytes: axum::body::Bytes) -> Answer {
    let ctx = match acting(&cell) {
        Ok(ctx) => ctx,
        Err(refused) => return refused,
    };
    answer(body::<MigrateRequest>(&bytes).and_then(|request| ctx.migration.migrate(ctx, &request)))
}

async fn drain(State(cell): State<CtxCell>, bytes: axum::body::Bytes) -> Answer {
    let ctx = match acting(&cell) {
        Ok(ctx) => ctx,
        Err(refused) => return refused,
    };
    answer(body::<DrainRequest>(&bytes).and_then(|request| {
        ctx.migration
            .drain(ctx, &request, crate::migrate::Kind::Drain)
    }))
}

async fn undrain(State(cell): State<CtxCell>) -> Answer {
    let ctx = match acting(&cell) {
        Ok(ctx) => ctx,
        Err(refused) => return refused,
    };
    answer(Ok(ctx.migration.undrain(ctx)))
}

async fn status(State(cell): State<CtxCell>) -> Answer {
    let Some(ctx) = cell.get() else {
        return starting();
    };
    answer(Ok(ctx.migration.status(ctx)))
}

async fn session_members(
    State(cell): State<CtxCell>,
    Path((app, session)): Path<(String, String)>,
) -> (StatusCode, Json<Value>) {
    let Some(ctx) = cell.get() else {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!(ErrorBody::new(
                ErrorCode::Unavailable,
                "gateway starting"
            ))),
        );
    };
    let members = ctx.sessions.members(&app, &session);
    (
        StatusCode::OK,
        Json(json!({"app": app, "session": session, "members": members})),
    )
}
