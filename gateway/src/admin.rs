//! The gateway's own admin routes, served beside `/healthz` and `/metrics`.
//!
//! `GET /v1/sessions/{app}/{session}`: how many local members a session has here
//! (`{"app":…,"session":…,"members":n}`), for operators and tests.

use std::sync::{Arc, OnceLock};
use tether_schemas::ErrorCode;
use tether_schemas::bus::ErrorBody;

use axum::Json;
use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::routing::get;
use serde_json::{Value, json};

use crate::context::GatewayCtx;

/// Filled once the gateway's context exists (the admin server starts before it).
pub type CtxCell = Arc<OnceLock<Arc<GatewayCtx>>>;

/// The routes.
pub fn router(cell: CtxCell) -> axum::Router {
    axum::Router::new()
        .route("/v1/sessions/{app}/{session}", get(session_members))
        .with_state(cell)
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
