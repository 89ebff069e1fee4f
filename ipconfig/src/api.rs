//! The public HTTP API: `GET /v1/endpoints` (PROTOCOL.md section 12).
//!
//! One request: take the credential from `Authorization: Bearer`, find its app, verify
//! it, rank the live gateways for the app's pool and the requester's region, sign a
//! gateway token, answer. Every refusal is a JSON error with a code from the shared
//! code table; nothing here blocks or touches NATS, so answers come from memory.

use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::Json;
use axum::Router;
use axum::extract::rejection::QueryRejection;
use axum::extract::{Query, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use serde::Deserialize;
use tether_auth::{Claims, Right, TokenSigner};
use tether_schemas::ErrorCode;
use tether_schemas::bus::{ErrorBody, WireError};

use crate::apps::AppTable;
use crate::config::IpconfigConfig;
use crate::credential::{self, CredentialError};
use crate::gateways::GatewayTable;
use crate::metrics::IpconfigMetrics;
use crate::score::{self, Policy, Want};

/// Header that names the requester's region when the query does not.
pub const REGION_HEADER: &str = "x-tether-region";

/// What the handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// The role's configuration.
    pub config: Arc<IpconfigConfig>,
    /// Known apps.
    pub apps: AppTable,
    /// Live gateways.
    pub gateways: GatewayTable,
    /// Users' home regions.
    pub affinity: crate::affinity::AffinityTable,
    /// Signs gateway tokens.
    pub signer: TokenSigner,
    /// Metrics.
    pub metrics: IpconfigMetrics,
}

/// Query parameters of `GET /v1/endpoints`.
#[derive(Debug, Default, Deserialize)]
pub struct EndpointsQuery {
    /// Requester's region (overrides the `X-Tether-Region` header).
    pub region: Option<String>,
    /// App the client expects; when given it must match the credential's.
    pub app: Option<String>,
}

pub use tether_schemas::bus::{EndpointInfo, EndpointsAnswer};

/// An error answer: `{"error":{"code":"bad_token","message":"..."}}` with the code's
/// HTTP status.
#[derive(Debug, Clone)]
pub struct ApiError(WireError);

impl ApiError {
    fn new(code: ErrorCode, message: impl Into<String>) -> ApiError {
        ApiError(WireError::new(code, message))
    }
}

impl From<CredentialError> for ApiError {
    fn from(error: CredentialError) -> ApiError {
        ApiError::new(error.code(), error.to_string())
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let status = StatusCode::from_u16(self.0.code.http_status())
            .unwrap_or(StatusCode::INTERNAL_SERVER_ERROR);
        let paused = self.0.code == ErrorCode::AppPaused;
        let mut response = (status, Json(ErrorBody { error: self.0 })).into_response();
        if status == StatusCode::SERVICE_UNAVAILABLE {
            // A paused app stays paused for a while: clients come back in half a minute.
            let after = if paused { PAUSED_RETRY_AFTER } else { "1" };
            response
                .headers_mut()
                .insert(header::RETRY_AFTER, HeaderValue::from_static(after));
        }
        response
    }
}

/// `Retry-After` (seconds) of an `app_paused` answer, as the gateways' 30 s hint.
const PAUSED_RETRY_AFTER: &str = "30";

/// The public router.
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/v1/endpoints", get(endpoints))
        .with_state(state)
}

async fn endpoints(
    State(state): State<ApiState>,
    headers: HeaderMap,
    query: Result<Query<EndpointsQuery>, QueryRejection>,
) -> Response {
    let started = Instant::now();
    let result = match query {
        Ok(Query(query)) => answer(&state, &headers, &query),
        Err(rejection) => Err(ApiError::new(ErrorCode::BadRequest, rejection.body_text())),
    };
    let response = match result {
        Ok(answer) => {
            state.metrics.tokens_issued.inc();
            let mut response = Json(answer).into_response();
            response
                .headers_mut()
                .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
            response
        }
        Err(error) => {
            state
                .metrics
                .errors
                .get_or_create(&[("code", error.0.code.as_str())])
                .inc();
            tracing::debug!(code = %error.0.code.as_str(), message = %error.0.message, "endpoint request refused");
            error.into_response()
        }
    };
    let class = match response.status().as_u16() {
        200..=299 => "2xx",
        400..=499 => "4xx",
        _ => "5xx",
    };
    state
        .metrics
        .requests
        .get_or_create(&[("status", class)])
        .inc();
    state
        .metrics
        .latency
        .observe(started.elapsed().as_secs_f64());
    response
}

/// The credential from `Authorization: Bearer <jwt>`.
fn bearer(headers: &HeaderMap) -> Result<&str, CredentialError> {
    let value = headers
        .get(header::AUTHORIZATION)
        .ok_or(CredentialError::Missing)?
        .to_str()
        .map_err(|_| CredentialError::Malformed("authorization header is not ascii"))?;
    let (scheme, credential) = value.split_once(' ').ok_or(CredentialError::Malformed(
        "expected authorization: bearer <jwt>",
    ))?;
    if !scheme.eq_ignore_ascii_case("bearer") {
        return Err(CredentialError::Malformed(
            "expected authorization: bearer <jwt>",
        ));
    }
    Ok(credential.trim())
}

fn answer(
    state: &ApiState,
    headers: &HeaderMap,
    query: &EndpointsQuery,
) -> Result<EndpointsAnswer, ApiError> {
    let unverified = credential::parse(bearer(headers)?)?;
    let app = state
        .apps
        .get(&unverified.claims.app)
        .ok_or(CredentialError::UnknownApp)?;
    let now = tether_auth::unix_now();
    let claims = unverified.verify(&app, now, state.config.credential_leeway_secs)?;
    if query.app.as_deref().is_some_and(|a| a != claims.app) {
        return Err(CredentialError::WrongApp.into());
    }
    if app.pipeline.paused {
        // Told only to a holder of a valid credential of the app.
        return Err(ApiError::new(
            ErrorCode::AppPaused,
            format!("app {} is paused by an operator", claims.app),
        ));
    }

    // A home region set by the business comes first; else the requester's region.
    let home = state.affinity.home(&claims.app, &claims.uid);
    let region = home
        .or_else(|| query.region.clone())
        .or_else(|| {
            headers
                .get(REGION_HEADER)
                .and_then(|v| v.to_str().ok())
                .map(str::to_string)
        })
        .unwrap_or_else(|| state.config.default_region.clone());
    let want = Want {
        region: Some(region.as_str()).filter(|r| !r.is_empty()),
        pool: app.dedicated_pool(),
    };
    let policy = Policy {
        offer_draining: state.config.offer_draining,
        tie_band: state.config.tie_band,
        max: state.config.max_endpoints,
    };
    let endpoints: Vec<EndpointInfo> = state.gateways.with_live(|live| {
        score::rank(live, &want, &policy, &mut rand::thread_rng())
            .into_iter()
            .map(|r| EndpointInfo {
                gw: r.gateway.id.clone(),
                region: r.gateway.region.clone(),
                tcp: r.gateway.endpoints.tcp.clone(),
                ws: r.gateway.endpoints.ws.clone(),
                score: (r.score * 1000.0).round() / 1000.0,
                draining: r.gateway.draining,
            })
            .collect()
    });
    if endpoints.is_empty() {
        return Err(ApiError::new(
            ErrorCode::Unavailable,
            "no gateway available for this app",
        ));
    }

    let ttl = match app.token_ttl_secs {
        0 => state.config.token_ttl_secs,
        ttl => ttl,
    };
    let mut token_claims = Claims::new(
        claims.app.clone(),
        claims.uid.clone(),
        claims.did.clone(),
        now,
        Duration::from_secs(ttl),
    );
    if app.rooms {
        token_claims.rights = token_claims.rights.with(Right::Rooms);
    }
    let token = state.signer.sign(&token_claims).map_err(|error| {
        tracing::error!(%error, "cannot sign a gateway token");
        ApiError::new(ErrorCode::Internal, "cannot sign a token")
    })?;
    Ok(EndpointsAnswer {
        app: claims.app,
        uid: claims.uid,
        did: claims.did,
        region,
        endpoints,
        token,
        token_exp: token_claims.exp,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::apps::AppRecord;
    use crate::credential::{CredentialClaims, sign_hs256};
    use axum::body::Body;
    use axum::http::Request;
    use tether_schemas::bus::{AdvertisedEndpoints, GatewayHeartbeat};
    use tower::ServiceExt as _;

    const SECRET: &str = "in-process-secret-01";

    fn state() -> ApiState {
        state_with(false)
    }

    fn state_with(rooms: bool) -> ApiState {
        let config = IpconfigConfig {
            apps: vec![AppRecord {
                id: "demo".into(),
                secrets: vec![SECRET.into()],
                rooms,
                ..Default::default()
            }],
            ..Default::default()
        };
        let gateways = GatewayTable::new(Duration::from_secs(60));
        gateways.put(
            GatewayHeartbeat {
                id: "gw1".into(),
                region: "eu".into(),
                endpoints: AdvertisedEndpoints {
                    tcp: Some("10.0.0.1:7400".into()),
                    ws: None,
                },
                capacity: 10,
                ..Default::default()
            },
            Instant::now(),
        );
        ApiState {
            apps: AppTable::new(&config.apps),
            config: Arc::new(config),
            gateways,
            affinity: Default::default(),
            signer: TokenSigner::generate(),
            metrics: IpconfigMetrics::default(),
        }
    }

    async fn call(state: ApiState, credential: Option<&str>) -> (StatusCode, serde_json::Value) {
        let mut request = Request::get("/v1/endpoints?region=eu");
        if let Some(credential) = credential {
            request = request.header(header::AUTHORIZATION, format!("Bearer {credential}"));
        }
        let response = router(state)
            .oneshot(request.body(Body::empty()).unwrap_or_default())
            .await
            .unwrap_or_else(|never| match never {});
        let status = response.status();
        let body = axum::body::to_bytes(response.into_body(), 1 << 20)
            .await
            .unwrap_or_default();
        (status, serde_json::from_slice(&body).unwrap_or_default())
    }

    fn credential(exp_in: i64) -> String {
        let claims = CredentialClaims {
            app: "demo".into(),
            uid: "u1".into(),
            did: "d1".into(),
            exp: (tether_auth::unix_now() as i64 + exp_in) as u64,
            iat: None,
        };
        sign_hs256(SECRET, &claims).unwrap_or_default()
    }

    #[tokio::test]
    async fn answers_endpoints_and_a_verifiable_token() {
        let state = state();
        let verifier = state.signer.verifier();
        let (status, body) = call(state, Some(&credential(60))).await;
        assert_eq!(status, StatusCode::OK, "{body}");
        assert_eq!(body["endpoints"][0]["gw"], "gw1");
        assert_eq!(body["endpoints"][0]["tcp"], "10.0.0.1:7400");
        let token = body["token"].as_str().unwrap_or_default();
        let claims = verifier.verify(token, tether_auth::unix_now());
        assert!(claims.is_ok_and(|c| c.did == "d1" && c.app == "demo"));
    }

    #[tokio::test]
    async fn the_rooms_right_follows_the_app_record() {
        for rooms in [false, true] {
            let state = state_with(rooms);
            let verifier = state.signer.verifier();
            let (status, body) = call(state, Some(&credential(60))).await;
            assert_eq!(status, StatusCode::OK, "{body}");
            let token = body["token"].as_str().unwrap_or_default();
            let claims = verifier.verify(token, tether_auth::unix_now());
            assert!(
                claims.is_ok_and(|c| c.may_use_rooms() == rooms && c.may_uplink()),
                "rooms right {rooms}"
            );
        }
    }

    #[tokio::test]
    async fn refusals_are_json_errors() {
        let (status, body) = call(state(), None).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["error"]["code"], "bad_token");
        let (status, body) = call(state(), Some(&credential(-1))).await;
        assert_eq!(status, StatusCode::UNAUTHORIZED);
        assert_eq!(body["error"]["code"], "token_expired");
        let empty = state();
        empty.gateways.remove("gw1");
        let (status, body) = call(empty, Some(&credential(60))).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(body["error"]["code"], "unavailable");
    }

    #[test]
    fn a_paused_app_is_told_to_come_back_in_half_a_minute() {
        let paused = ApiError::new(ErrorCode::AppPaused, "paused").into_response();
        assert_eq!(paused.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert_eq!(paused.headers()[header::RETRY_AFTER], PAUSED_RETRY_AFTER);
        let other = ApiError::new(ErrorCode::Unavailable, "no gateway").into_response();
        assert_eq!(other.headers()[header::RETRY_AFTER], "1");
    }
}
