//! The session binding API (`tether.<app>.session`, queue group `tether-state`).
//!
//! A bind, unbind or replace becomes one event per device on the events stream
//! (`tether.<app>.evt.sess.<p>`), so the change is in the event log, replayable; the
//! device's partition owner applies it (membership, index, gateway sync) and tells the
//! request's inbox, which is answered once every device's change is applied: a push sent
//! after the reply includes it. `configure` writes the session's settings straight to the
//! bucket.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::Message;
use futures::StreamExt;
use tether_nats::headers;
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
            .user_devices(app, &uid)
            .await
            .map_err(|e| unavailable(&e))?;
        dids.extend(devices);
    }
    dids.sort();
    dids.dedup();
    let sessions = request.all_sessions();
    let at_ms = unix_now_ms();
    // Each device's owner tells this inbox once the change is applied (membership, index,
    // gateway): the reply then means a push sent after it includes the change.
    let applied_to = ctx.client.new_inbox();
    let mut applied = ctx
        .client
        .subscribe(applied_to.clone())
        .await
        .map_err(|e| unavailable(&e))?;
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
        let mut map = async_nats::HeaderMap::new();
        map.insert(headers::APPLIED_TO, applied_to.as_str());
        let ack = ctx
            .js
            .publish_with_headers(subjects::session_events(app, did), map, body)
            .await
            .map_err(|e| unavailable(&e))?;
        acks.push(ack);
    }
    for ack in acks {
        ack.await.map_err(|e| unavailable(&e))?;
    }
    // Owners apply about a thousand devices a second each even when busy: large requests
    // get a millisecond more per device.
    let limit = Duration::from_millis(ctx.config.session_apply_timeout_ms)
        + Duration::from_millis(dids.len() as u64);
    let waiting = wait_applied(&mut applied, &dids, limit).await;
    let _ = applied.unsubscribe().await;
    if waiting > 0 {
        return Err((
            ErrorCode::Timeout,
            format!(
                "the change is stored but {waiting} of {} devices were not applied within {} ms; it still applies (retrying is safe)",
                dids.len(),
                limit.as_millis()
            ),
        ));
    }
    Ok(SessionReply {
        devices: dids.len(),
    })
}

/// Waits until every device of `dids` was reported applied (or `limit` passed); returns
/// how many were not.
async fn wait_applied(
    applied: &mut async_nats::Subscriber,
    dids: &[String],
    limit: Duration,
) -> usize {
    let mut waiting: HashSet<&[u8]> = dids.iter().map(|d| d.as_bytes()).collect();
    let deadline = tokio::time::Instant::now() + limit;
    while !waiting.is_empty() {
        match tokio::time::timeout_at(deadline, applied.next()).await {
            Ok(Some(notice)) => {
                waiting.remove(&notice.payload[..]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    waiting.len()
}
