//! Business pushes (`tether.<app>.push`): resolve targets, store QoS1 messages in each
//! device's inbox with its next sequence (the partition owner delivers them), write QoS0
//! messages straight to the gateways holding the devices, and reply with what was accepted.

use std::collections::HashMap;
use std::sync::Arc;

use async_nats::Message;
use bytes::Bytes;
use tether_nats::subjects;
use tether_schemas::bus::{Accepted, Push, PushReply, PushReplyWire, unix_now_ms};
use tether_schemas::{ErrorCode, Frame, pb};

use crate::context::{MAX_DIDS_PER_MESSAGE, StateCtx, serve_queue};

/// How long a session push waits for the session index to catch up with the bucket.
const INDEX_CATCH_UP: std::time::Duration = std::time::Duration::from_secs(2);

/// Serves pushes until `shutdown`.
pub async fn serve(
    ctx: Arc<StateCtx>,
    shutdown: tether_service::Shutdown,
) -> Result<(), async_nats::SubscribeError> {
    let subject = subjects::push_all();
    serve_queue(ctx, subject, shutdown, |ctx, message| async move {
        handle(&ctx, message).await
    })
    .await
}

async fn handle(ctx: &StateCtx, message: Message) {
    ctx.metrics.pushes.inc();
    let input = crate::inputs::push(
        &message.subject,
        message.headers.as_ref(),
        message.payload.clone(),
    );
    let reply = match input {
        Err(error) => {
            ctx.metrics.refused("push_invalid");
            PushReplyWire::Error { error }
        }
        Ok((app, push)) => match deliver(ctx, &app, push).await {
            Ok(reply) => PushReplyWire::Ok(reply),
            Err((code, text)) => PushReplyWire::error(code, text),
        },
    };
    if let Some(reply_to) = message.reply.clone() {
        let _ = ctx.client.publish(reply_to, reply.to_json()).await;
    }
}

async fn deliver(
    ctx: &StateCtx,
    app: &str,
    mut push: Push,
) -> Result<PushReply, (ErrorCode, String)> {
    // No `Tether-Qos`: the app's `qos_default` (PROTOCOL 12.5), read per push so a change
    // applies from the next one.
    push.qos1 = Some(push.qos1.unwrap_or_else(|| ctx.pipelines.default_qos1(app)));
    if let (true, Some(session)) = (push.is_session_push(), push.session.clone()) {
        return deliver_to_session(ctx, app, &session, push).await;
    }
    deliver_to_devices(ctx, app, push).await
}

/// A push to a session: through its recoverable room, as one broadcast (more members
/// than the app's threshold), or per member like a push to their dids.
async fn deliver_to_session(
    ctx: &StateCtx,
    app: &str,
    session: &str,
    mut push: Push,
) -> Result<PushReply, (ErrorCode, String)> {
    // Every membership written before this push (a registration's token sessions, a bind
    // applied by a partition owner) must be in this instance's index first.
    let revision = ctx
        .store
        .sessions_revision()
        .await
        .map_err(|e| (ErrorCode::Unavailable, e.to_string()))?;
    if !ctx.index.catch_up(revision, INDEX_CATCH_UP).await {
        tracing::warn!(
            app,
            session,
            revision,
            "session index behind the bucket; pushing with what it has"
        );
    }
    let members = ctx.index.size(app, session);
    let sent_at_ms = unix_now_ms();
    let encode = |room_seq: u64| -> Bytes {
        Frame::Down {
            header: pb::Down {
                seq: 0,
                session: session.to_string(),
                room_seq,
                sent_at_ms,
                meta: push.meta.clone(),
            },
            qos1: false,
            body: push.body.clone(),
        }
        .encode()
    };
    let mode = |mode: &'static str| {
        ctx.metrics
            .session_pushes
            .get_or_create(&[("mode", mode)])
            .inc();
        Some(mode.to_string())
    };
    if ctx.index.settings(app, session).recoverable {
        // Stored with the next room sequence; gateways receive the stored message on the
        // room subject and deliver it to their members.
        let room_seq = ctx
            .store
            .append_room(
                app,
                session,
                push.id.as_ref().map(|id| format!("{app}:{id}:room")),
                encode,
            )
            .await
            .map_err(|e| (ErrorCode::Unavailable, format!("room {session}: {e}")))?;
        return Ok(PushReply {
            mode: mode("room"),
            members: Some(members),
            room_seq: Some(room_seq),
            ..Default::default()
        });
    }
    if members > ctx.broadcast_threshold(app) {
        if !ctx
            .broadcast_frame(app, Some(session), &[], encode(0))
            .await
        {
            return Err((ErrorCode::Unavailable, "broadcast not published".into()));
        }
        return Ok(PushReply {
            mode: mode("broadcast"),
            members: Some(members),
            ..Default::default()
        });
    }
    push.dids = ctx.index.members(app, session);
    let mut reply = if push.dids.is_empty() {
        mode("direct");
        PushReply::default()
    } else {
        let reply = deliver_to_devices(ctx, app, push).await?;
        ctx.metrics
            .session_pushes
            .get_or_create(&[("mode", "direct")])
            .inc();
        reply
    };
    reply.mode = Some("direct".into());
    reply.members = Some(members);
    Ok(reply)
}

/// A push to devices (and users' devices): QoS1 to each inbox, QoS0 through each
/// device's gateway, or, for QoS0 to more devices than the threshold, one broadcast
/// carrying the did list (each gateway delivers to the listed devices it holds). The
/// push's QoS was resolved by [`deliver`].
async fn deliver_to_devices(
    ctx: &StateCtx,
    app: &str,
    push: Push,
) -> Result<PushReply, (ErrorCode, String)> {
    let qos1 = push.qos1.unwrap_or(true);
    let mut dids = push.dids.clone();
    for uid in &push.uids {
        let devices = ctx
            .user_devices(app, uid)
            .await
            .map_err(|e| (ErrorCode::Unavailable, e.to_string()))?;
        dids.extend(devices);
    }
    dids.sort();
    dids.dedup();
    let sent_at_ms = unix_now_ms();
    let encode = |seq: u64| -> Bytes {
        Frame::Down {
            header: pb::Down {
                seq,
                session: push.session.clone().unwrap_or_default(),
                room_seq: 0,
                sent_at_ms,
                meta: push.meta.clone(),
            },
            qos1,
            body: push.body.clone(),
        }
        .encode()
    };
    let mut reply = PushReply::default();
    if let Some(relay) = &ctx.relay {
        // Devices routed in other regions go on the relay stream (crossregion).
        let split = relay
            .split(ctx, app, dids, &push.uids)
            .await
            .map_err(|e| (ErrorCode::Unavailable, e))?;
        dids = split.local;
        for (did, region) in split.remote {
            let relay_id = match &push.id {
                Some(id) => format!("{app}:{id}:{did}"),
                None => crate::crossregion::fresh_relay_id(relay.region(), app, &did),
            };
            relay
                .relay(ctx, app, &did, &region, &relay_id, encode(0))
                .await
                .map_err(|e| {
                    (
                        ErrorCode::Unavailable,
                        format!("relay of {did} to {region}: {e}"),
                    )
                })?;
            reply.relayed.push(did);
        }
    }
    if qos1 {
        let ttl = ctx.pipelines.inbox_retention(app);
        for did in &dids {
            let seq = ctx
                .store
                .append_inbox(
                    app,
                    did,
                    push.id.as_ref().map(|id| format!("{app}:{id}:{did}")),
                    ttl,
                    &encode,
                )
                .await
                .map_err(|e| (ErrorCode::Unavailable, format!("inbox of {did}: {e}")))?;
            ctx.metrics.inbox_appended.inc();
            reply.accepted.push(Accepted {
                did: did.clone(),
                seq,
            });
        }
        return Ok(reply);
    }
    // QoS0: one frame, grouped by gateway.
    let frame = encode(0);
    if dids.len() > ctx.broadcast_threshold(app) {
        reply.mode = Some("broadcast".into());
        for chunk in dids.chunks(MAX_DIDS_PER_MESSAGE) {
            let targets: Vec<&str> = chunk.iter().map(String::as_str).collect();
            let sent = ctx
                .broadcast_frame(app, None, &targets, frame.clone())
                .await;
            for did in chunk {
                if sent {
                    reply.accepted.push(Accepted {
                        did: did.clone(),
                        seq: 0,
                    });
                } else {
                    reply.failed.push(did.clone());
                }
            }
        }
        return Ok(reply);
    }
    let mut by_gateway: HashMap<String, Vec<&str>> = HashMap::new();
    for did in &dids {
        // From memory when the route watch has it (and its gateway lives), else from KV.
        let cached = ctx
            .route_cache
            .get(&tether_nats::keys::route(app, did))
            .filter(|route| ctx.gateways.is_alive(&route.gw));
        let route = match cached {
            Some(route) => Some(route),
            None => ctx
                .store
                .route(app, did)
                .await
                .map_err(|e| (ErrorCode::Unavailable, e.to_string()))?,
        };
        match route {
            Some(route) => by_gateway.entry(route.gw).or_default().push(did),
            None => reply.offline.push(did.clone()),
        }
    }
    for (gw, targets) in by_gateway {
        for chunk in targets.chunks(MAX_DIDS_PER_MESSAGE) {
            let sent = ctx.send_frame(&gw, app, chunk, frame.clone()).await;
            for did in chunk {
                if sent {
                    reply.accepted.push(Accepted {
                        did: did.to_string(),
                        seq: 0,
                    });
                } else {
                    reply.failed.push(did.to_string());
                }
            }
        }
    }
    Ok(reply)
}
