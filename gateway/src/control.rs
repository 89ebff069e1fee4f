//! Control messages from state on `tether.gw.<gw>.ctl` (JSON), received by the downlink
//! subscription in order with the gateway's downlinks.
//!
//! `{"op":"sessions","app":"demo","did":"d1","sessions":["room-1"]}`: the device's complete
//! set of sessions. Applied only when the device is connected here; the gateway then
//! joins and leaves sessions to match (and starts room recoveries the device asked for at
//! LOGIN).
//!
//! `{"op":"close","app":"demo","did":"d1","conn":42,"code":"replaced"}`: the device logged
//! in on another gateway; its connection `conn` here (if still here) is closed with `code`.
//! Unknown ops are ignored so newer state versions can add some.
//!
//! `migrate`, `drain`, `undrain`, `migration_status` (PROTOCOL.md 10.7, from an operator):
//! handled by [`crate::migrate`]; each returns the migration status (or an error body) as
//! the answer to the request. `restart`, `restart_status`: handled by [`crate::restart`];
//! each returns the restart status (or an error body).
//!
//! The old process after a hand-off applies only what concerns the connections it still
//! serves ([`apply_tail`]).

use std::sync::Arc;

use tether_schemas::bus::{GatewayControl, valid_id};

use bytes::Bytes;
use tether_schemas::ErrorCode;
use tether_schemas::bus::ErrorBody;

use crate::conn::CloseReason;
use crate::context::GatewayCtx;
use crate::rooms;

/// Closes the device's connection `conn` if it is here (a newer login elsewhere replaced it,
/// or an operator kicked the device).
fn close(ctx: &GatewayCtx, app: &str, did: &str, conn: u64, code: tether_schemas::ErrorCode) {
    let Some(found) = ctx.registry.get(app, did).filter(|c| c.id == conn) else {
        return; // gone already, or a newer connection of the device is here
    };
    if ctx.migration.is_pending(conn) {
        // Redirected, and its new login is registered: it leaves without an error (the
        // device may not have read its new LOGIN_ACK yet, PROTOCOL.md 6.6).
        found.close(CloseReason::silent(code, "moved to another gateway"));
        return;
    }
    ctx.metrics.error(code);
    let why = if code == tether_schemas::ErrorCode::Replaced {
        "the device logged in on another connection"
    } else {
        "closed by the operator"
    };
    found.close(CloseReason::error(code, why));
}

/// State registered connection `conn`: its LOGIN_ACK is queued now, before any downlink
/// state sent after the registration, and the waiting login goes on.
fn registered(ctx: &GatewayCtx, app: &str, did: &str, conn: u64, last_acked_seq: u64) {
    let Some(found) = ctx.registry.get(app, did).filter(|c| c.id == conn) else {
        let _ = ctx.logins.cancel(conn);
        return;
    };
    if !ctx.logins.is_waiting(conn) {
        return; // timed out already, or registered twice (a redelivered conn.up)
    }
    let ack = crate::conn::driver::login_ack(ctx, conn, last_acked_seq).encode();
    found.push(ack, true, ctx.config.max_queued_frames);
    ctx.logins.complete(conn, last_acked_seq);
}

/// The JSON answer of a migration op.
fn answer(ctx: &GatewayCtx, result: Result<tether_schemas::bus::MigrationStatus, String>) -> Bytes {
    let status = match result {
        Ok(status) => status,
        Err(text) => {
            tracing::warn!(gw = %ctx.config.id, error = %text, "migration op refused");
            return ErrorBody::new(ErrorCode::BadRequest, text).to_json();
        }
    };
    serde_json::to_vec(&status)
        .map(Bytes::from)
        .unwrap_or_else(|_| ErrorBody::new(ErrorCode::Internal, "encode").to_json())
}

/// The JSON answer of a restart op.
fn restart_answer(
    ctx: &GatewayCtx,
    result: Result<tether_schemas::bus::RestartStatus, String>,
) -> Bytes {
    match result {
        Ok(status) => serde_json::to_vec(&status)
            .map(Bytes::from)
            .unwrap_or_else(|_| ErrorBody::new(ErrorCode::Internal, "encode").to_json()),
        Err(text) => {
            tracing::warn!(gw = %ctx.config.id, error = %text, "restart refused");
            ErrorBody::new(ErrorCode::Unavailable, text).to_json()
        }
    }
}

/// Applies one control message; returns the answer of an op that has one (migration ops).
pub fn apply(ctx: &Arc<GatewayCtx>, payload: &[u8]) -> Option<Bytes> {
    let migration = &ctx.migration;
    let (app, did, sessions) = match GatewayControl::from_json(payload) {
        Ok(GatewayControl::Migrate(request)) => {
            return Some(answer(ctx, migration.migrate(ctx, &request)));
        }
        Ok(GatewayControl::Drain(request)) => {
            let kind = crate::migrate::Kind::Drain;
            return Some(answer(ctx, migration.drain(ctx, &request, kind)));
        }
        Ok(GatewayControl::Undrain) => return Some(answer(ctx, Ok(migration.undrain(ctx)))),
        Ok(GatewayControl::MigrationStatus) => {
            return Some(answer(ctx, Ok(migration.status(ctx))));
        }
        Ok(GatewayControl::Restart) => return Some(restart_answer(ctx, ctx.restart.start(ctx))),
        Ok(GatewayControl::RestartStatus) => {
            return Some(restart_answer(ctx, Ok(ctx.restart.status(ctx))));
        }
        Ok(GatewayControl::Sessions { app, did, sessions }) => (app, did, sessions),
        Ok(GatewayControl::Close {
            app,
            did,
            conn,
            code,
        }) => {
            close(ctx, &app, &did, conn, code);
            return None;
        }
        Ok(GatewayControl::Registered {
            app,
            did,
            conn,
            last_acked_seq,
        }) => {
            registered(ctx, &app, &did, conn, last_acked_seq);
            return None;
        }
        Ok(GatewayControl::Unknown) => {
            tracing::debug!("unknown control op, ignored");
            return None;
        }
        Err(error) => {
            tracing::warn!(%error, "unreadable control message, dropped");
            return Some(
                ErrorBody::new(ErrorCode::BadRequest, format!("unreadable: {error}")).to_json(),
            );
        }
    };
    set_sessions(ctx, &app, &did, &sessions);
    None
}

/// The device's complete set of sessions, applied when it is connected here.
fn set_sessions(ctx: &Arc<GatewayCtx>, app: &str, did: &str, sessions: &[String]) {
    if !valid_id(app) || !valid_id(did) || !sessions.iter().all(|s| valid_id(s)) {
        tracing::warn!(%app, %did, "control message with invalid ids, dropped");
        return;
    }
    let Some(conn) = ctx.registry.get(app, did) else {
        return; // not here (any more): the gateway that holds it gets its own sync
    };
    let Some(identity) = conn.identity() else {
        return;
    };
    let recoveries = ctx
        .sessions
        .set(&conn, identity.app(), identity.did(), sessions);
    ctx.metrics.session_syncs.inc();
    rooms::start(ctx, recoveries);
}

/// The old process after a hand-off (docs/handoff.md "TLS"): applies what concerns the
/// connections still here, and answers nothing (the successor, subscribed to the same
/// subject, answers every request; operator ops are its business).
///
/// `registered` for a connection that is not the device's one here means the device
/// logged in again at the successor (same gateway id, so state sends no `close`): the one
/// here leaves, without an ERROR when it was redirected (PROTOCOL.md 6.6), else with
/// `replaced`.
pub fn apply_tail(ctx: &Arc<GatewayCtx>, payload: &[u8]) {
    match GatewayControl::from_json(payload) {
        Ok(GatewayControl::Sessions { app, did, sessions }) => {
            set_sessions(ctx, &app, &did, &sessions);
        }
        Ok(GatewayControl::Close {
            app,
            did,
            conn,
            code,
        }) => close(ctx, &app, &did, conn, code),
        Ok(GatewayControl::Registered {
            app,
            did,
            conn,
            last_acked_seq,
        }) => match ctx.registry.get(&app, &did) {
            Some(here) if here.id != conn => {
                close(
                    ctx,
                    &app,
                    &did,
                    here.id,
                    tether_schemas::ErrorCode::Replaced,
                );
            }
            _ => registered(ctx, &app, &did, conn, last_acked_seq),
        },
        _ => {}
    }
}
