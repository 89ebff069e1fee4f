//! The operations API (HTTP JSON, docs/ops-api.md) behind bearer admin tokens, and the
//! dashboard's live stream.
//!
//! Every route under `/v1/` needs `Authorization: Bearer <admin token>` (or, for browsers'
//! `EventSource`, `?access_token=`); without a valid one the answer is 401. With no token
//! configured the API is open on a loopback listener only (403 elsewhere). Every operation
//! that changes something is written to the audit log with its outcome.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

use axum::Json;
use axum::extract::{Path, Query, Request, State};
use axum::http::header;
use axum::middleware::{self, Next};
use axum::response::sse::{Event, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use futures::Stream;
use serde::Deserialize;
use serde_json::{Value, json};
use tether_schemas::ErrorCode;

use crate::actions::Ops;
use crate::audit::AuditEntry;
use crate::error::ApiError;

/// Filled once ops is connected (the listener starts first).
pub type OpsCell = Arc<OnceLock<Arc<Ops>>>;

/// Who called: `token-<n>` or `loopback`.
#[derive(Debug, Clone)]
struct Actor(String);

/// Who may call the API.
#[derive(Debug, Clone)]
pub struct TokenGuard {
    tokens: Arc<[String]>,
    loopback: bool,
}

impl TokenGuard {
    /// A guard with `tokens` for a listener on `listen`.
    pub fn new(tokens: &[String], listen: SocketAddr) -> TokenGuard {
        TokenGuard {
            tokens: tokens.iter().filter(|t| !t.is_empty()).cloned().collect(),
            loopback: listen.ip().is_loopback(),
        }
    }

    /// The actor of a request presenting `given`, or the refusal.
    fn actor(&self, given: Option<&str>) -> Result<Actor, ApiError> {
        if self.tokens.is_empty() {
            return if self.loopback {
                Ok(Actor("loopback".into()))
            } else {
                Err(ApiError::new(
                    ErrorCode::Forbidden,
                    "the ops API needs admin_tokens when it does not listen on loopback",
                ))
            };
        }
        let given = given.unwrap_or_default().as_bytes();
        self.tokens
            .iter()
            .position(|t| constant_time_eq(t.as_bytes(), given))
            .map(|i| Actor(format!("token-{}", i + 1)))
            .ok_or_else(|| {
                ApiError::new(ErrorCode::BadToken, "missing or wrong admin bearer token")
            })
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// The bearer token of a request: the header, else `access_token` in the query.
fn presented(request: &Request) -> Option<String> {
    if let Some(token) = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer "))
    {
        return Some(token.trim().to_string());
    }
    request.uri().query().and_then(|q| {
        q.split('&')
            .find_map(|pair| pair.strip_prefix("access_token="))
            .map(str::to_string)
    })
}

async fn authorize(
    State((guard, cell)): State<(TokenGuard, OpsCell)>,
    mut request: Request,
    next: Next,
) -> Response {
    match guard.actor(presented(&request).as_deref()) {
        Ok(actor) => {
            request.extensions_mut().insert(actor);
            next.run(request).await
        }
        Err(error) => {
            if let Some(ops) = cell.get() {
                ops.metrics.unauthorized.inc();
            }
            error.into_response()
        }
    }
}

/// The `/v1/` routes.
pub fn router(cell: OpsCell, guard: TokenGuard) -> axum::Router {
    axum::Router::new()
        .route("/v1/cluster", get(cluster))
        .route("/v1/gateways", get(gateways))
        .route("/v1/apps", get(apps))
        .route("/v1/ipconfigs", get(ipconfigs))
        .route("/v1/apps/{app}", get(show_app).post(set_app))
        .route("/v1/apps/{app}/pause", post(pause_app))
        .route("/v1/apps/{app}/resume", post(resume_app))
        .route("/v1/gateways/{gw}/drain", post(drain).delete(undrain))
        .route("/v1/gateways/{gw}/migrate", post(migrate))
        .route("/v1/gateways/{gw}/migration", get(migration))
        .route("/v1/restart", post(restart).get(restart_status))
        .route("/v1/kick", post(kick))
        .route("/v1/audit", get(audit))
        .route("/v1/stream", get(stream))
        .layer(middleware::from_fn_with_state(
            (guard, cell.clone()),
            authorize,
        ))
        .with_state(cell)
}

fn ops(cell: &OpsCell) -> Result<Arc<Ops>, ApiError> {
    cell.get()
        .cloned()
        .ok_or_else(|| ApiError::new(ErrorCode::Unavailable, "ops starting"))
}

type Answer = Result<Json<Value>, ApiError>;

/// Runs an operation and writes its audit entry.
async fn audited(
    ops: &Ops,
    actor: &Actor,
    op: &str,
    target: &str,
    params: Value,
    result: Result<Value, ApiError>,
) -> Answer {
    let (outcome, message) = match &result {
        Ok(_) => ("ok", String::new()),
        Err(e) => ("error", e.message.clone()),
    };
    ops.metrics
        .operations
        .get_or_create(&crate::metrics::OpLabels {
            op: op.to_string(),
            outcome: outcome.to_string(),
        })
        .inc();
    tracing::info!(actor = %actor.0, %op, %target, %outcome, %message, "operation");
    let entry = AuditEntry {
        actor: actor.0.clone(),
        op: op.to_string(),
        target: target.to_string(),
        params,
        outcome: outcome.to_string(),
        message,
        ..Default::default()
    };
    if let Err(error) = ops.audit.record(entry).await {
        tracing::warn!(%error, %op, "audit entry not written");
    }
    result.map(Json)
}

async fn cluster(State(cell): State<OpsCell>) -> Answer {
    Ok(Json(json!(ops(&cell)?.view.snapshot())))
}

async fn gateways(State(cell): State<OpsCell>) -> Answer {
    Ok(Json(json!(ops(&cell)?.view.snapshot().gateways)))
}

async fn apps(State(cell): State<OpsCell>) -> Answer {
    Ok(Json(json!(ops(&cell)?.view.snapshot().apps)))
}

async fn ipconfigs(State(cell): State<OpsCell>) -> Answer {
    Ok(Json(json!(ops(&cell)?.view.snapshot().ipconfigs)))
}

async fn show_app(State(cell): State<OpsCell>, Path(app): Path<String>) -> Answer {
    ops(&cell)?.show_app(&app).await.map(Json)
}

/// `{"set": {"max_msgs_per_sec": 100, "paused": false, "pool": "vip"}}`
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SetBody {
    set: BTreeMap<String, Value>,
}

fn text(value: &Value) -> String {
    match value {
        Value::String(s) => s.clone(),
        Value::Null => String::new(),
        other => other.to_string(),
    }
}

async fn set_app(
    State(cell): State<OpsCell>,
    axum::Extension(actor): axum::Extension<Actor>,
    Path(app): Path<String>,
    body: Result<Json<SetBody>, axum::extract::rejection::JsonRejection>,
) -> Answer {
    let ops = ops(&cell)?;
    let Json(body) = body.map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))?;
    let changes: Vec<(String, String)> =
        body.set.iter().map(|(k, v)| (k.clone(), text(v))).collect();
    let result = ops.set_app(&app, &changes).await;
    audited(&ops, &actor, "app.set", &app, json!(body.set), result).await
}

async fn pause_app(
    State(cell): State<OpsCell>,
    axum::Extension(actor): axum::Extension<Actor>,
    Path(app): Path<String>,
) -> Answer {
    let ops = ops(&cell)?;
    let result = ops.set_app(&app, &[("paused".into(), "true".into())]).await;
    audited(&ops, &actor, "app.pause", &app, json!({}), result).await
}

async fn resume_app(
    State(cell): State<OpsCell>,
    axum::Extension(actor): axum::Extension<Actor>,
    Path(app): Path<String>,
) -> Answer {
    let ops = ops(&cell)?;
    let result = ops
        .set_app(&app, &[("paused".into(), "false".into())])
        .await;
    audited(&ops, &actor, "app.resume", &app, json!({}), result).await
}

async fn drain(
    State(cell): State<OpsCell>,
    axum::Extension(actor): axum::Extension<Actor>,
    Path(gw): Path<String>,
) -> Answer {
    let ops = ops(&cell)?;
    let result = ops.drain(&gw, true).await;
    audited(&ops, &actor, "drain", &gw, json!({}), result).await
}

async fn undrain(
    State(cell): State<OpsCell>,
    axum::Extension(actor): axum::Extension<Actor>,
    Path(gw): Path<String>,
) -> Answer {
    let ops = ops(&cell)?;
    let result = ops.drain(&gw, false).await;
    audited(&ops, &actor, "undrain", &gw, json!({}), result).await
}

fn json_body(
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Result<Value, ApiError> {
    body.map(|Json(v)| v)
        .map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))
}

async fn migrate(
    State(cell): State<OpsCell>,
    axum::Extension(actor): axum::Extension<Actor>,
    Path(gw): Path<String>,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Answer {
    let ops = ops(&cell)?;
    let body = json_body(body)?;
    let result = ops.migrate(&gw, &body).await;
    audited(&ops, &actor, "migrate", &gw, body, result).await
}

async fn migration(State(cell): State<OpsCell>, Path(gw): Path<String>) -> Answer {
    ops(&cell)?.migration(&gw).await.map(Json)
}

async fn restart(
    State(cell): State<OpsCell>,
    axum::Extension(actor): axum::Extension<Actor>,
    body: Result<Json<Value>, axum::extract::rejection::JsonRejection>,
) -> Answer {
    let ops = ops(&cell)?;
    let body = json_body(body)?;
    let result = ops.restart(&body, &actor.0);
    audited(&ops, &actor, "restart", "gateways", body, result).await
}

async fn restart_status(State(cell): State<OpsCell>) -> Answer {
    ops(&cell)?.restart_status().map(Json)
}

/// `{"app":"demo","did":"d1","code":"forbidden"}` (code optional).
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct KickBody {
    app: String,
    did: String,
    #[serde(default)]
    code: Option<String>,
}

async fn kick(
    State(cell): State<OpsCell>,
    axum::Extension(actor): axum::Extension<Actor>,
    body: Result<Json<KickBody>, axum::extract::rejection::JsonRejection>,
) -> Answer {
    let ops = ops(&cell)?;
    let Json(body) = body.map_err(|e| ApiError::new(ErrorCode::BadRequest, e.body_text()))?;
    let code = match body.code.as_deref() {
        None | Some("") => ErrorCode::Forbidden,
        Some(name) => name
            .parse::<ErrorCode>()
            .map_err(|e| ApiError::new(ErrorCode::BadRequest, e.to_string()))?,
    };
    let target = format!("{}/{}", body.app, body.did);
    let result = ops.kick(&body.app, &body.did, code).await;
    audited(&ops, &actor, "kick", &target, json!({"code": code}), result).await
}

#[derive(Debug, Deserialize)]
struct AuditQuery {
    #[serde(default)]
    limit: Option<usize>,
}

async fn audit(State(cell): State<OpsCell>, Query(query): Query<AuditQuery>) -> Answer {
    let entries = ops(&cell)?
        .audit
        .recent(query.limit.unwrap_or(50).min(1000))
        .await
        .map_err(|e| ApiError::new(ErrorCode::Unavailable, e.to_string()))?;
    Ok(Json(json!(entries)))
}

/// Server-sent events: the cluster snapshot (`event: cluster`) every second.
async fn stream(
    State(cell): State<OpsCell>,
) -> Result<Sse<impl Stream<Item = Result<Event, Infallible>>>, ApiError> {
    let ops = ops(&cell)?;
    let guard = StreamGuard::new(ops.clone());
    let progress = ops.view.progress();
    let events = futures::stream::unfold(
        (ops, guard, progress, true),
        |(ops, guard, mut progress, first)| async move {
            if !first {
                // Once a second, and at once when an operation progresses (each step of a
                // rolling restart or migration shows, however fast it goes).
                tokio::select! {
                    () = tokio::time::sleep(Duration::from_secs(1)) => {}
                    Ok(()) = progress.changed() => {}
                }
            }
            progress.mark_unchanged();
            let data = serde_json::to_string(&ops.view.snapshot()).unwrap_or_else(|_| "{}".into());
            let event = Event::default().event("cluster").data(data);
            Some((Ok(event), (ops, guard, progress, false)))
        },
    );
    Ok(Sse::new(events).keep_alive(KeepAlive::default()))
}

/// Counts open live streams.
struct StreamGuard(Arc<Ops>);

impl StreamGuard {
    fn new(ops: Arc<Ops>) -> StreamGuard {
        ops.metrics.streams.inc();
        StreamGuard(ops)
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        self.0.metrics.streams.dec();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_or_loopback() {
        let public: SocketAddr = ([0, 0, 0, 0], 7430).into();
        let local: SocketAddr = ([127, 0, 0, 1], 7430).into();
        assert!(TokenGuard::new(&[], local).actor(None).is_ok());
        let refused = TokenGuard::new(&[], public).actor(None).err();
        assert_eq!(refused.map(|e| e.status().as_u16()), Some(403));
        let guard = TokenGuard::new(&["a".repeat(16), "b".repeat(16)], local);
        assert_eq!(
            guard.actor(Some(&"b".repeat(16))).ok().map(|a| a.0),
            Some("token-2".to_string())
        );
        let refused = guard.actor(Some("nope")).err();
        assert_eq!(refused.map(|e| e.status().as_u16()), Some(401));
        assert!(guard.actor(None).is_err());
    }
}
