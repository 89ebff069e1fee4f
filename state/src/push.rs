//! Business pushes (`tether.<app>.push`): resolve targets, store QoS1 messages in each
//! device's inbox with its next sequence (the partition owner delivers them), write QoS0
//! messages straight to the gateways holding the devices, and reply with what was accepted.

use std::collections::HashMap;
use std::sync::Arc;

use async_nats::Message;
use bytes::Bytes;
use futures::StreamExt;
use tether_business::wire::{Accepted, Push, PushReply, PushReplyWire};
use tether_nats::subjects;
use tether_schemas::{ErrorCode, Frame, pb};

use crate::context::StateCtx;

/// The queue group all state instances share for pushes.
pub const QUEUE: &str = "tether-state";

/// Serves pushes until `shutdown`.
pub async fn serve(
    ctx: Arc<StateCtx>,
    shutdown: tether_service::Shutdown,
) -> Result<(), async_nats::SubscribeError> {
    let mut subscription = ctx
        .client
        .queue_subscribe(format!("{}.*.push", subjects::PREFIX), QUEUE.into())
        .await?;
    // Pushes sent right after start must find the subscription.
    if let Err(error) = tether_nats::sync_with_server(&ctx.client).await {
        tracing::warn!(%error, "cannot confirm the push subscription");
    }
    tokio::spawn(async move {
        loop {
            tokio::select! {
                message = subscription.next() => match message {
                    Some(message) => {
                        let ctx = ctx.clone();
                        tokio::spawn(async move { handle(&ctx, message).await });
                    }
                    None => return,
                },
                _ = shutdown.cancelled() => return,
            }
        }
    });
    Ok(())
}

async fn handle(ctx: &StateCtx, message: Message) {
    ctx.metrics.pushes.inc();
    let reply = match subjects::app_of(&message.subject) {
        None => PushReplyWire::error(ErrorCode::BadRequest, "push subject has no app"),
        Some(app) => match Push::from_message(message.headers.as_ref(), message.payload.clone()) {
            Err(error) => PushReplyWire::Error { error },
            Ok(push) => match deliver(ctx, app, push).await {
                Ok(reply) => PushReplyWire::Ok(reply),
                Err((code, text)) => PushReplyWire::error(code, text),
            },
        },
    };
    if let Some(reply_to) = message.reply.clone() {
        let _ = ctx.client.publish(reply_to, reply.to_json()).await;
    }
}

async fn deliver(ctx: &StateCtx, app: &str, push: Push) -> Result<PushReply, (ErrorCode, String)> {
    let mut dids = push.dids.clone();
    for uid in &push.uids {
        let devices = ctx
            .store
            .user_devices(app, uid)
            .await
            .map_err(|e| (ErrorCode::Unavailable, e.to_string()))?;
        dids.extend(devices);
    }
    dids.sort();
    dids.dedup();
    let sent_at_ms = tether_auth::unix_now_ms();
    let encode = |seq: u64| -> Bytes {
        Frame::Down {
            header: pb::Down {
                seq,
                session: push.session.clone().unwrap_or_default(),
                room_seq: 0,
                sent_at_ms,
                meta: push.meta.clone(),
            },
            qos1: push.qos1,
            body: push.body.clone(),
        }
        .encode()
    };
    let mut reply = PushReply::default();
    if push.qos1 {
        for did in &dids {
            let seq = ctx
                .store
                .append_inbox(app, did, &encode)
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
    let mut by_gateway: HashMap<String, Vec<&str>> = HashMap::new();
    for did in &dids {
        match ctx
            .store
            .route(app, did)
            .await
            .map_err(|e| (ErrorCode::Unavailable, e.to_string()))?
        {
            Some(route) => {
                by_gateway.entry(route.gw).or_default().push(did);
                reply.accepted.push(Accepted {
                    did: did.clone(),
                    seq: 0,
                });
            }
            None => reply.offline.push(did.clone()),
        }
    }
    for (gw, targets) in by_gateway {
        ctx.send_frame(&gw, app, &targets, frame.clone()).await;
    }
    Ok(reply)
}
