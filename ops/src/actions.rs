//! The operations themselves, shared by the HTTP API and the CLI: kick a device, change an
//! app's settings (pause, resume, limits, pool, broadcast threshold), drain, migrate and
//! restart gateways. Each returns a JSON result or an [`ApiError`].

use std::sync::Arc;

use async_nats::jetstream::{self, kv};
use serde_json::{Value, json};
use tether_ipconfig::AppAdmin;
use tether_ipconfig::apps::AppError;
use tether_schemas::ErrorCode;
use tether_schemas::bus::{
    DrainRequest, ErrorBody, GatewayControl, MigrateRequest, MigrationStatus, valid_id,
};

use crate::audit::AuditLog;
use crate::error::ApiError;
use crate::metrics::OpsMetrics;
use crate::view::ClusterView;

/// How long a gateway has to answer a drain or migration op.
const CONTROL_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// What every operation needs.
pub struct Ops {
    /// NATS.
    pub client: async_nats::Client,
    /// The cluster view.
    pub view: Arc<ClusterView>,
    /// App records.
    pub apps: AppAdmin,
    /// Audit log.
    pub audit: AuditLog,
    /// `tether_routes` (where a device is).
    pub routes: kv::Store,
    /// Metrics.
    pub metrics: OpsMetrics,
    /// How long one gateway of a rolling restart may take (hand-off and health).
    pub restart_timeout_secs: u64,
}

impl Ops {
    /// Opens the buckets the operations use.
    pub async fn open(
        client: async_nats::Client,
        view: Arc<ClusterView>,
        replicas: usize,
        metrics: OpsMetrics,
        restart_timeout_secs: u64,
    ) -> Result<Ops, ApiError> {
        let js = jetstream::new(client.clone());
        let apps = AppAdmin::open(client.clone()).await.map_err(app_error)?;
        let audit = AuditLog::open(&js, replicas)
            .await
            .map_err(|e| ApiError::new(ErrorCode::Unavailable, e.to_string()))?;
        let routes = js
            .get_key_value(tether_nats::layout::ROUTES_BUCKET)
            .await
            .map_err(|e| ApiError::new(ErrorCode::Unavailable, format!("tether_routes: {e}")))?;
        Ok(Ops {
            client,
            view,
            apps,
            audit,
            routes,
            metrics,
            restart_timeout_secs,
        })
    }

    /// Closes the connection of `did` in `app` wherever it is, with `code`.
    pub async fn kick(&self, app: &str, did: &str, code: ErrorCode) -> Result<Value, ApiError> {
        if !valid_id(app) || !valid_id(did) {
            return Err(ApiError::new(
                ErrorCode::BadRequest,
                "app and did must be 1-64 characters of [A-Za-z0-9_-]",
            ));
        }
        let key = tether_nats::keys::route(app, did);
        let entry = self
            .routes
            .get(&key)
            .await
            .map_err(|e| ApiError::new(ErrorCode::Unavailable, format!("tether_routes: {e}")))?
            .ok_or_else(|| {
                ApiError::new(
                    ErrorCode::NotFound,
                    format!("device {app}/{did} is not connected"),
                )
            })?;
        let route: tether_state::store::Route = serde_json::from_slice(&entry).map_err(|e| {
            ApiError::new(ErrorCode::Internal, format!("route of {app}/{did}: {e}"))
        })?;
        let control = GatewayControl::Close {
            app: app.to_string(),
            did: did.to_string(),
            conn: route.conn,
            code,
        };
        let body = control
            .to_json()
            .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
        self.client
            .publish(tether_nats::subjects::gateway_ctl(&route.gw), body)
            .await
            .map_err(|e| ApiError::new(ErrorCode::Unavailable, format!("publish: {e}")))?;
        self.client
            .flush()
            .await
            .map_err(|e| ApiError::new(ErrorCode::Unavailable, format!("flush: {e}")))?;
        Ok(json!({"app": app, "did": did, "gw": route.gw, "conn": route.conn, "code": code}))
    }

    /// Applies `changes` to an app's record (see `AppRecord::set`); returns the new
    /// settings as the cluster view shows them.
    pub async fn set_app(
        &self,
        app: &str,
        changes: &[(String, String)],
    ) -> Result<Value, ApiError> {
        if changes.is_empty() {
            return Err(ApiError::new(ErrorCode::BadRequest, "no setting given"));
        }
        let record = self.apps.set(app, changes).await.map_err(app_error)?;
        self.view.put_app(record.clone());
        Ok(app_json(&record))
    }

    /// One app's record (without secrets).
    pub async fn show_app(&self, app: &str) -> Result<Value, ApiError> {
        let record = self.apps.get(app).await.map_err(app_error)?;
        Ok(app_json(&record))
    }

    /// Marks gateway `gw` draining and moves its devices away (`on`), or stops that.
    pub async fn drain(&self, gw: &str, on: bool) -> Result<Value, ApiError> {
        self.known_gateway(gw)?;
        let op = if on {
            GatewayControl::Drain(DrainRequest::default())
        } else {
            GatewayControl::Undrain
        };
        self.control(gw, op).await
    }

    /// Moves devices of `gw` as `request` says (PROTOCOL.md 10.7 `migrate`).
    pub async fn migrate(&self, gw: &str, request: &Value) -> Result<Value, ApiError> {
        self.known_gateway(gw)?;
        let request: MigrateRequest = serde_json::from_value(request.clone())
            .map_err(|e| ApiError::new(ErrorCode::BadRequest, format!("migrate: {e}")))?;
        request
            .validate()
            .map_err(|e| ApiError::new(ErrorCode::BadRequest, e))?;
        self.control(gw, GatewayControl::Migrate(request)).await
    }

    /// Where the migration of `gw` stands.
    pub async fn migration(&self, gw: &str) -> Result<Value, ApiError> {
        self.known_gateway(gw)?;
        self.control(gw, GatewayControl::MigrationStatus).await
    }

    /// Sends a drain or migration op to `gw` and returns its status answer.
    async fn control(&self, gw: &str, op: GatewayControl) -> Result<Value, ApiError> {
        let value = self.request(gw, op).await?;
        let status: MigrationStatus = serde_json::from_value(value)
            .map_err(|e| ApiError::new(ErrorCode::Internal, format!("gateway {gw} status: {e}")))?;
        self.view.put_migration(status.clone());
        Ok(json!(status))
    }

    /// Sends a control op to `gw` as a request; its JSON answer, or the error it answered.
    pub async fn request(&self, gw: &str, op: GatewayControl) -> Result<Value, ApiError> {
        let body = op
            .to_json()
            .map_err(|e| ApiError::new(ErrorCode::Internal, e.to_string()))?;
        let subject = tether_nats::subjects::gateway_ctl(gw);
        let answer = tokio::time::timeout(CONTROL_TIMEOUT, self.client.request(subject, body))
            .await
            .map_err(|_| {
                ApiError::new(
                    ErrorCode::Timeout,
                    format!("gateway {gw} did not answer in time"),
                )
            })?
            .map_err(|e| {
                ApiError::new(
                    ErrorCode::Unavailable,
                    format!("gateway {gw} does not answer control requests: {e}"),
                )
            })?;
        let value: Value = serde_json::from_slice(&answer.payload)
            .map_err(|e| ApiError::new(ErrorCode::Internal, format!("gateway {gw} answer: {e}")))?;
        if let Ok(error) = serde_json::from_value::<ErrorBody>(value.clone()) {
            return Err(ApiError::new(error.error.code, error.error.message));
        }
        Ok(value)
    }

    /// Starts a rolling restart (`{"gateways":[…]}` or `{"all":true}`) asked by `actor`;
    /// its first status (it goes on in the background, see [`crate::restart`]).
    pub fn restart(self: &Arc<Self>, request: &Value, actor: &str) -> Result<Value, ApiError> {
        crate::restart::begin(self, request, actor)
    }

    /// The running or last rolling restart.
    pub fn restart_status(&self) -> Result<Value, ApiError> {
        self.view
            .restart()
            .map(|status| json!(status))
            .ok_or_else(|| ApiError::new(ErrorCode::NotFound, "no rolling restart yet"))
    }

    fn known_gateway(&self, gw: &str) -> Result<(), ApiError> {
        if !valid_id(gw) {
            return Err(ApiError::new(ErrorCode::BadRequest, "invalid gateway id"));
        }
        if !self.view.has_gateway(gw) {
            return Err(ApiError::new(
                ErrorCode::NotFound,
                format!("gateway {gw} is not live"),
            ));
        }
        Ok(())
    }
}

/// An app record as the API shows it: never its secrets.
pub fn app_json(record: &tether_ipconfig::AppRecord) -> Value {
    json!({
        "id": record.id,
        "pool": record.dedicated_pool(),
        "rooms": record.rooms,
        "token_ttl_secs": record.token_ttl_secs,
        "secrets": record.secrets.len(),
        "public_keys": record.public_keys.len(),
        "pipeline": record.pipeline,
        "updated_ms": record.updated_ms,
    })
}

fn app_error(error: AppError) -> ApiError {
    let code = match &error {
        AppError::Invalid(_) => ErrorCode::BadRequest,
        AppError::NotFound(_) => ErrorCode::NotFound,
        AppError::Exists(_) => ErrorCode::BadRequest,
        AppError::Bucket(_) => ErrorCode::Unavailable,
        AppError::Corrupt { .. } => ErrorCode::Internal,
    };
    ApiError::new(code, error.to_string())
}
