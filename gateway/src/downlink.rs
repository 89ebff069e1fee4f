//! Downlink: frames from NATS to local connections.
//!
//! Three subscriptions: this gateway's own subjects `tether.gw.<id>.*` (`down`: state
//! addresses devices it knows are here; `ctl`: control messages, handled in order with the
//! downlinks), `tether.*.bcast` (broadcasts) and `tether.*.room.*`
//! (recoverable room broadcasts, as stored in the room stream). Each message carries one
//! complete client frame as its payload, encoded once and shared by every connection it
//! is written to; `Tether-Did` headers (repeatable, or comma separated) name the target
//! devices; `Tether-App` names the app on the gateway subject (elsewhere the app is the
//! subject's, and a `Tether-App` naming another app is refused). A broadcast with
//! `Tether-Session` goes to the local members of that session (only those named by
//! `Tether-Did`, if present); one with neither goes to every local connection of the app.

use std::sync::Arc;

use async_nats::Message;
use tether_nats::headers;
use tether_nats::subjects::{self, Subject};
use tether_schemas::{FixedHeader, FrameType, flags, limits};

use crate::conn::Enqueued;
use crate::context::GatewayCtx;
use crate::shutdown::Shutdown;

/// Subscribes and delivers until shutdown.
pub async fn run(
    ctx: Arc<GatewayCtx>,
    shutdown: Shutdown,
) -> Result<(), async_nats::SubscribeError> {
    let client = ctx.outbound.client().clone();
    // Downlinks and control messages of this gateway on one subscription: state's
    // `registered` must be handled before the replayed downlinks it sends after it.
    let direct = client
        .subscribe(subjects::gateway_all(&ctx.config.id))
        .await?;
    let bcast = client.subscribe(subjects::broadcast_all()).await?;
    let rooms = client.subscribe(subjects::room_all()).await?;
    // The server must know both subscriptions before the gateway accepts anyone, or the
    // first downlinks of its first clients would go nowhere.
    if let Err(error) = tether_nats::sync_with_server(&client).await {
        tracing::warn!(%error, "cannot confirm the downlink subscriptions");
    }
    for subscription in [direct, bcast, rooms] {
        let ctx = ctx.clone();
        tokio::spawn(tether_nats::serve::serve_subscription(
            subscription,
            shutdown.clone(),
            // Through the hand-off gate (open, apart from during a hand-off).
            move |message| ctx.handoff.gate.offer(&ctx, message),
        ));
    }
    Ok(())
}

/// The old process after a hand-off (docs/handoff.md "TLS"): delivers to the connections
/// still here; control messages only act on them and are never answered (the successor
/// answers).
pub fn deliver_tail(ctx: &Arc<GatewayCtx>, message: &Message) {
    if matches!(
        Subject::parse(&message.subject),
        Some(Subject::GatewayCtl { .. })
    ) {
        crate::control::apply_tail(ctx, &message.payload);
        return;
    }
    deliver(ctx, message);
}

/// Delivers one downlink message to its local targets.
pub fn deliver(ctx: &Arc<GatewayCtx>, message: &Message) {
    if matches!(
        Subject::parse(&message.subject),
        Some(Subject::GatewayCtl { .. })
    ) {
        let answer = crate::control::apply(ctx, &message.payload);
        // State asked to know when it is applied (a session change a business waits for);
        // migration ops answer with their status.
        if let Some(reply) = message.reply.clone() {
            ctx.outbound.confirm(reply, answer.unwrap_or_default());
        }
        return;
    }
    let metrics = &ctx.metrics;
    metrics.downlink_messages.inc();
    let frame = &message.payload;
    let header = match FixedHeader::parse(frame) {
        Ok(Some(header))
            if header.frame_len() == frame.len() && frame.len() <= limits::MAX_FRAME_LEN_CAP =>
        {
            header
        }
        _ => {
            metrics.downlink_invalid.inc();
            tracing::warn!(subject = %message.subject, "downlink payload is not one frame, dropped");
            return;
        }
    };
    let is_down = header.kind().is_ok_and(|k| k == FrameType::Down);
    let qos1 = is_down && header.has_flag(flags::QOS1);
    let subject = Subject::parse(&message.subject);
    let named = headers::get(message.headers.as_ref(), headers::APP);
    let app = match subject {
        // The gateway subject carries no app: state names it in `Tether-App`.
        Some(Subject::GatewayDown { .. }) => named,
        // Elsewhere the subject says whose message it is (NATS permissions guard subjects,
        // not headers): a header naming another app is refused.
        Some(subject) => match (subject.app(), named) {
            (Some(app), None) => Some(app),
            (Some(app), Some(named)) if named == app => Some(app),
            _ => None,
        },
        None => None,
    };
    if named.is_some() && app.is_none() && subject.is_some() {
        metrics.refused("foreign_app");
    }
    // Business services may publish on their app's bcast and room subjects: only DOWN
    // frames reach devices from there (no ERROR, CLOSE, REDIRECT or UP_ACK).
    let from_app_subject = matches!(
        subject,
        Some(Subject::Broadcast { .. } | Subject::Room { .. })
    );
    if from_app_subject && !is_down {
        metrics.refused("frame_type");
        tracing::warn!(subject = %message.subject, "only DOWN frames may be broadcast, dropped");
        return;
    }
    let Some(app) = app else {
        metrics.downlink_invalid.inc();
        tracing::warn!(subject = %message.subject, "downlink without a valid app (header missing or not the subject's), dropped");
        return;
    };
    let limit = ctx.config.max_queued_frames;
    let dids = headers::dids(message.headers.as_ref());
    let is_broadcast = matches!(subject, Some(Subject::Broadcast { .. }));
    if let Some(Subject::Room { session, .. }) = subject {
        // Stored by state with its room sequence; anything else on a room subject was not.
        let room_seq = message.headers.as_ref().map_or(0, headers::seq);
        if room_seq == 0 {
            metrics.refused("room_seq");
            tracing::warn!(subject = %message.subject, "room message without a room sequence, dropped");
            return;
        }
        deliver_to_session(ctx, app, session, frame, room_seq, &dids);
        return;
    }
    let session =
        headers::get(message.headers.as_ref(), headers::SESSION).filter(|s| !s.is_empty());
    if let (true, Some(session)) = (is_broadcast, session) {
        deliver_to_session(ctx, app, session, frame, 0, &dids);
        return;
    }
    let targets = if dids.is_empty() && is_broadcast {
        ctx.registry.app_connections(app)
    } else {
        let mut found = Vec::with_capacity(dids.len());
        for did in dids {
            match ctx.registry.get(app, did) {
                Some(conn) => found.push(conn),
                None if !is_broadcast => {
                    metrics.downlink_no_route.inc();
                }
                None => {}
            }
        }
        found
    };
    for conn in targets {
        if ctx.logins.is_waiting(conn.id) {
            // No LOGIN_ACK yet: nothing may precede it (QoS1 is resent after it).
            metrics.downlink_held.inc();
            continue;
        }
        match conn.push(frame.clone(), qos1, limit) {
            Enqueued::Queued => {
                metrics.downlink_delivered.inc();
            }
            Enqueued::DroppedQos0 => {
                metrics.dropped_qos0.inc();
            }
            Enqueued::Overflow => {
                tracing::info!(
                    conn = conn.id,
                    "slow consumer: qos1 queue overflow, closing"
                );
            }
            Enqueued::Closing => {}
        }
    }
}

/// A session broadcast: one lookup, one queue push per local member.
fn deliver_to_session(
    ctx: &GatewayCtx,
    app: &str,
    session: &str,
    frame: &bytes::Bytes,
    room_seq: u64,
    dids: &[&str],
) {
    let only: Option<std::collections::HashSet<&str>> =
        (!dids.is_empty()).then(|| dids.iter().copied().collect());
    let delivered = ctx.sessions.deliver(
        app,
        session,
        frame,
        room_seq,
        only.as_ref(),
        ctx.config.max_queued_frames,
    );
    let metrics = &ctx.metrics;
    metrics.session_broadcasts.inc();
    metrics.session_deliveries.inc_by(delivered.queued as u64);
    metrics.downlink_delivered.inc_by(delivered.queued as u64);
    metrics.dropped_qos0.inc_by(delivered.dropped as u64);
}
