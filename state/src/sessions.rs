//! The session binding API (`tether.<app>.session`, queue group `tether-state`).
//!
//! A bind, unbind or replace becomes one event per device on the events stream
//! (`tether.<app>.evt.sess.<p>`), so the change is in the event log, replayable, before the
//! request is answered; the device's partition owner applies it (membership, index,
//! gateway sync). `configure` writes the session's settings straight to the bucket.

use std::sync::Arc;

use async_nats::Message;
use tether_nats::subjects::{self, Subject};
use tether_schemas::ErrorCode;
use tether_schemas::bus::{
    Event, SessionChange, SessionOp, SessionReply, SessionReplyWire, SessionRequest, WireError,
    unix_now_ms,
};

use crate::context::{StateCtx, serve_queue};
use crate::store::SessionSettings;

/// Serves session requests until `shutdown`.
pub async fn serve(
    ctx: Arc<StateCtx>,
    shutdown: tether_service::Shutdown,
) -> Result<(), async_nats::SubscribeError> {
    let subject = subjects::session_all();
    serve_queue(ctx, subject, shutdown, |ctx, message| async move {
        handle(&ctx, message).await
    })
    .await
}

async fn handle(ctx: &StateCtx, message: Message) {
    let reply = match Subject::parse(&message.subject).and_then(|s| s.app()) {
        None => SessionReplyWire::error(ErrorCode::BadRequest, "session subject has no app"),
        Some(app) => match apply(ctx, app, &message.payload).await {
            Ok(reply) => SessionReplyWire::Ok(reply),
            Err((code, text)) => SessionReplyWire::error(code, text),
        },
    };
    let result = if matches!(reply, SessionReplyWire::Ok(_)) {
        "ok"
    } else {
        "error"
    };
    ctx.metrics
        .session_requests
        .get_or_create(&[("result", result)])
        .inc();
    if let Some(reply_to) = message.reply.clone() {
        let _ = ctx.client.publish(reply_to, reply.to_json()).await;
    }
}

async fn apply(
    ctx: &StateCtx,
    app: &str,
    body: &[u8],
) -> Result<SessionReply, (ErrorCode, String)> {
    let bad = |e: WireError| (e.code, e.message);
    let request = SessionRequest::from_json(body).map_err(bad)?;
    let op = request.validate().map_err(bad)?;
    let unavailable = |e: &dyn std::fmt::Display| (ErrorCode::Unavailable, e.to_string());
    if op == SessionOp::Configure {
        let Some(session) = request.session.as_deref() else {
            return Err((ErrorCode::BadRequest, "configure needs a session".into()));
        };
        let settings = SessionSettings {
            recoverable: request.recoverable.unwrap_or(false),
        };
        ctx.store
            .put_session_settings(app, session, settings)
            .await
            .map_err(|e| unavailable(&e))?;
        return Ok(SessionReply { devices: 0 });
    }
    let mut dids = request.all_dids();
    for uid in request.all_uids() {
        let devices = ctx
            .store
            .user_devices(app, &uid)
            .await
            .map_err(|e| unavailable(&e))?;
        dids.extend(devices);
    }
    dids.sort();
    dids.dedup();
    let sessions = request.all_sessions();
    let at_ms = unix_now_ms();
    // Publish every event first, then wait for the acks: one round trip for the batch.
    let mut acks = Vec::with_capacity(dids.len());
    for did in &dids {
        let change = SessionChange {
            app: app.to_string(),
            did: did.clone(),
            sessions: sessions.clone(),
            at_ms,
        };
        let Some(event) = Event::session(op, change) else {
            break;
        };
        let body = event.to_json().map_err(|e| unavailable(&e))?;
        let ack = ctx
            .js
            .publish(subjects::session_events(app, did), body)
            .await
            .map_err(|e| unavailable(&e))?;
        acks.push(ack);
    }
    for ack in acks {
        ack.await.map_err(|e| unavailable(&e))?;
    }
    Ok(SessionReply {
        devices: dids.len(),
    })
}
