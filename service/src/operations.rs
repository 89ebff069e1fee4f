//! Guard of a role's operations routes (drain, session lookups, …) on its admin listener.
//!
//! `/healthz` and `/metrics` stay open for probes and scrapers. Operations need
//! `Authorization: Bearer <admin_token>` when a token is configured; without one they are
//! served only when the admin listener is bound to loopback, so exposing the admin port for
//! scraping never exposes the operations by accident.

use std::net::SocketAddr;
use std::sync::Arc;

use axum::Json;
use axum::extract::{Request, State};
use axum::http::{StatusCode, header};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use tether_schemas::ErrorCode;
use tether_schemas::bus::ErrorBody;

/// Who may call the operations routes.
#[derive(Debug, Clone)]
pub struct OperationsGuard {
    token: Option<Arc<str>>,
    loopback: bool,
}

impl OperationsGuard {
    /// A guard for a listener on `listen` with an optional bearer `token` (empty = none).
    pub fn new(token: Option<&str>, listen: SocketAddr) -> Self {
        OperationsGuard {
            token: token.filter(|t| !t.is_empty()).map(Arc::from),
            loopback: listen.ip().is_loopback(),
        }
    }

    /// `routes` behind this guard.
    pub fn protect(self, routes: axum::Router) -> axum::Router {
        routes.layer(middleware::from_fn_with_state(self, check))
    }

    fn allows(&self, authorization: Option<&str>) -> Result<(), (StatusCode, &'static str)> {
        match &self.token {
            Some(token) => {
                let given = authorization.and_then(|v| v.strip_prefix("Bearer "));
                if given.is_some_and(|g| constant_time_eq(g.as_bytes(), token.as_bytes())) {
                    Ok(())
                } else {
                    Err((
                        StatusCode::UNAUTHORIZED,
                        "missing or wrong admin bearer token",
                    ))
                }
            }
            None if self.loopback => Ok(()),
            None => Err((
                StatusCode::FORBIDDEN,
                "operations need admin_token when the admin listener is not on loopback",
            )),
        }
    }
}

async fn check(State(guard): State<OperationsGuard>, request: Request, next: Next) -> Response {
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok());
    match guard.allows(authorization) {
        Ok(()) => next.run(request).await,
        Err((status, message)) => {
            let code = if status == StatusCode::UNAUTHORIZED {
                ErrorCode::BadToken
            } else {
                ErrorCode::Forbidden
            };
            (status, Json(ErrorBody::new(code, message))).into_response()
        }
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn token_or_loopback() {
        let public: SocketAddr = ([0, 0, 0, 0], 7402).into();
        let local: SocketAddr = ([127, 0, 0, 1], 7402).into();
        assert!(OperationsGuard::new(None, local).allows(None).is_ok());
        assert!(OperationsGuard::new(None, public).allows(None).is_err());
        assert!(OperationsGuard::new(Some(""), public).allows(None).is_err());
        let guarded = OperationsGuard::new(Some("s3cret"), public);
        assert!(guarded.allows(Some("Bearer s3cret")).is_ok());
        assert!(guarded.allows(Some("Bearer nope")).is_err());
        assert!(guarded.allows(None).is_err());
        let local_guarded = OperationsGuard::new(Some("s3cret"), local);
        assert!(local_guarded.allows(None).is_err());
    }
}
