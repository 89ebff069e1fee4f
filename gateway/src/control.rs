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

use std::sync::Arc;

use tether_schemas::bus::{GatewayControl, valid_id};

use crate::conn::CloseReason;
use crate::context::GatewayCtx;
use crate::rooms;

/// Closes the device's connection `conn` if it is here (a newer login elsewhere replaced it,
/// or an operator kicked the device).
fn close(ctx: &GatewayCtx, app: &str, did: &str, conn: u64, code: tether_schemas::ErrorCode) {
    let Some(found) = ctx.registry.get(app, did).filter(|c| c.id == conn) else {
        return; // gone already, or a newer connection of the device is here
    };
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

/// Applies one control message.
pub fn apply(ctx: &Arc<GatewayCtx>, payload: &[u8]) {
    let (app, did, sessions) = match GatewayControl::from_json(payload) {
        Ok(GatewayControl::Sessions { app, did, sessions }) => (app, did, sessions),
        Ok(GatewayControl::Close {
            app,
            did,
            conn,
            code,
        }) => {
            close(ctx, &app, &did, conn, code);
            return;
        }
        Ok(GatewayControl::Registered {
            app,
            did,
            conn,
            last_acked_seq,
        }) => {
            registered(ctx, &app, &did, conn, last_acked_seq);
            return;
        }
        Ok(_) => {
            tracing::debug!("control op not handled by this gateway, ignored");
            return;
        }
        Err(error) => {
            tracing::warn!(%error, "unreadable control message, dropped");
            return;
        }
    };
    if !valid_id(&app) || !valid_id(&did) || !sessions.iter().all(|s| valid_id(s)) {
        tracing::warn!(%app, %did, "control message with invalid ids, dropped");
        return;
    }
    let Some(conn) = ctx.registry.get(&app, &did) else {
        return; // not here (any more): the gateway that holds it gets its own sync
    };
    let Some(identity) = conn.identity() else {
        return;
    };
    let (app, did) = (identity.app.clone(), identity.did.clone());
    let recoveries = ctx.sessions.set(&conn, &app, &did, &sessions);
    ctx.metrics.session_syncs.inc();
    rooms::start(ctx, recoveries);
}
