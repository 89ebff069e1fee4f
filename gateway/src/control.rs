//! Control messages from state on `tether.gw.<gw>.ctl` (JSON).
//!
//! `{"op":"sessions","app":"demo","did":"d1","sessions":["room-1"]}`: the device's complete
//! set of sessions. Applied only when the device is connected here; the gateway then
//! joins and leaves sessions to match (and starts room recoveries the device asked for at
//! LOGIN). Unknown ops are ignored so newer state versions can add some.

use std::sync::Arc;

use futures::StreamExt;
use serde::Deserialize;
use tether_auth::valid_id;
use tether_nats::subjects;

use crate::context::GatewayCtx;
use crate::rooms;
use crate::shutdown::Shutdown;

/// One control message.
#[derive(Debug, Deserialize)]
struct Control {
    op: String,
    #[serde(default)]
    app: String,
    #[serde(default)]
    did: String,
    #[serde(default)]
    sessions: Vec<String>,
}

/// Subscribes and applies control messages until shutdown.
pub async fn run(
    ctx: Arc<GatewayCtx>,
    shutdown: Shutdown,
) -> Result<(), async_nats::SubscribeError> {
    let client = ctx.bus.client().clone();
    let mut messages = client
        .subscribe(subjects::gateway_ctl(&ctx.config.id))
        .await?;
    tokio::spawn(async move {
        loop {
            tokio::select! {
                message = messages.next() => match message {
                    Some(message) => apply(&ctx, &message.payload),
                    None => return,
                },
                _ = shutdown.cancelled() => return,
            }
        }
    });
    Ok(())
}

/// Applies one control message.
pub fn apply(ctx: &Arc<GatewayCtx>, payload: &[u8]) {
    let control = match serde_json::from_slice::<Control>(payload) {
        Ok(control) => control,
        Err(error) => {
            tracing::warn!(%error, "unreadable control message, dropped");
            return;
        }
    };
    if control.op != "sessions" {
        tracing::debug!(op = %control.op, "unknown control op, ignored");
        return;
    }
    if !valid_id(&control.app)
        || !valid_id(&control.did)
        || !control.sessions.iter().all(|s| valid_id(s))
    {
        tracing::warn!(app = %control.app, did = %control.did, "control message with invalid ids, dropped");
        return;
    }
    let Some(conn) = ctx.registry.get(&control.app, &control.did) else {
        return; // not here (any more): the gateway that holds it gets its own sync
    };
    let Some(identity) = conn.identity() else {
        return;
    };
    let (app, did) = (identity.app.clone(), identity.did.clone());
    let recoveries = ctx.sessions.set(&conn, &app, &did, &control.sessions);
    ctx.metrics.session_syncs.inc();
    rooms::start(ctx, recoveries);
}
