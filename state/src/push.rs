//! Business pushes (`tether.<app>.push`): resolve targets, store QoS1 messages in each
//! device's inbox with its next sequence (the partition owner delivers them), write QoS0
//! messages straight to the gateways holding the devices, and reply with what was accepted.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use async_nats::{HeaderMap, Message};
use bytes::Bytes;
use futures::StreamExt;
use tether_nats::subjects::{self, headers};
use tether_schemas::{ErrorCode, Frame, pb};

use crate::context::StateCtx;
use crate::wire::{Accepted, ErrorBody, PushReply};

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

fn values(map: Option<&HeaderMap>, name: &str) -> Vec<String> {
    map.map(|h| {
        h.get_all(name)
            .flat_map(|v| {
                v.as_str()
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(String::from)
                    .collect::<Vec<_>>()
            })
            .collect()
    })
    .unwrap_or_default()
}

fn refuse(code: ErrorCode, message: impl Into<String>) -> PushReply {
    PushReply {
        error: Some(ErrorBody {
            code: code.as_str().into(),
            message: message.into(),
        }),
        ..Default::default()
    }
}

async fn handle(ctx: &StateCtx, message: Message) {
    ctx.metrics.pushes.inc();
    let reply = match subjects::app_of(&message.subject) {
        Some(app) => push(ctx, app, &message).await,
        None => refuse(ErrorCode::BadRequest, "push subject has no app"),
    };
    if let Some(reply_to) = message.reply.clone()
        && let Ok(body) = serde_json::to_vec(&reply)
    {
        let _ = ctx.client.publish(reply_to, body.into()).await;
    }
}

async fn push(ctx: &StateCtx, app: &str, message: &Message) -> PushReply {
    let map = message.headers.as_ref();
    let mut dids = values(map, headers::DID);
    let uids = values(map, headers::UID);
    let qos1 = !matches!(
        values(map, headers::QOS).first().map(String::as_str),
        Some("0")
    );
    let session = values(map, headers::SESSION)
        .into_iter()
        .next()
        .unwrap_or_default();
    let meta: BTreeMap<String, String> = map
        .map(|h| {
            h.iter()
                .filter_map(|(name, value)| {
                    let name = name.to_string();
                    let key = name.get(..headers::META_PREFIX.len())?;
                    if !key.eq_ignore_ascii_case(headers::META_PREFIX) {
                        return None;
                    }
                    let value = value
                        .first()
                        .map(|v| v.as_str().to_string())
                        .unwrap_or_default();
                    Some((
                        name[headers::META_PREFIX.len()..].to_ascii_lowercase(),
                        value,
                    ))
                })
                .collect()
        })
        .unwrap_or_default();
    if let Some(bad) = dids
        .iter()
        .chain(uids.iter())
        .find(|id| !tether_auth::valid_id(id))
    {
        return refuse(ErrorCode::BadRequest, format!("invalid id {bad:?}"));
    }
    for uid in &uids {
        match ctx.store.user_devices(app, uid).await {
            Ok(devices) => dids.extend(devices),
            Err(error) => return refuse(ErrorCode::Unavailable, error.to_string()),
        }
    }
    dids.sort();
    dids.dedup();
    if dids.is_empty() {
        return refuse(
            ErrorCode::BadRequest,
            "no target: set Tether-Did or Tether-Uid (with known devices)",
        );
    }
    let sent_at_ms = tether_auth::unix_now_ms();
    let body = message.payload.clone();
    let encode = |seq: u64| -> Bytes {
        Frame::Down {
            header: pb::Down {
                seq,
                session: session.clone(),
                room_seq: 0,
                sent_at_ms,
                meta: meta.clone(),
            },
            qos1,
            body: body.clone(),
        }
        .encode()
    };
    let mut reply = PushReply::default();
    if qos1 {
        for did in &dids {
            match ctx.store.append_inbox(app, did, &encode).await {
                Ok(seq) => {
                    ctx.metrics.inbox_appended.inc();
                    reply.accepted.push(Accepted {
                        did: did.clone(),
                        seq,
                    });
                }
                Err(error) => {
                    return refuse(ErrorCode::Unavailable, format!("inbox of {did}: {error}"));
                }
            }
        }
        return reply;
    }
    // QoS0: one frame, grouped by gateway.
    let frame = encode(0);
    let mut by_gateway: HashMap<String, Vec<&str>> = HashMap::new();
    for did in &dids {
        match ctx.store.route(app, did).await {
            Ok(Some(route)) => {
                by_gateway.entry(route.gw).or_default().push(did);
                reply.accepted.push(Accepted {
                    did: did.clone(),
                    seq: 0,
                });
            }
            Ok(None) => reply.offline.push(did.clone()),
            Err(error) => return refuse(ErrorCode::Unavailable, error.to_string()),
        }
    }
    for (gw, targets) in by_gateway {
        ctx.send_frame(&gw, app, &targets, frame.clone()).await;
    }
    reply
}
