//! The presence query (`tether.<app>.presence.get`, queue group `tether-state`, PROTOCOL
//! 11.3): the online devices of up to 100 users, in this region from its route bucket and
//! in every peer region from theirs (through their JetStream domains, answers cached
//! briefly). A peer that cannot be asked in time is named in `unanswered`; its part then
//! comes from its last answer, if any (docs/multi-region.md).

use std::sync::Arc;

use async_nats::Message;
use tether_nats::subjects::{self, Subject};
use tether_schemas::ErrorCode;
use tether_schemas::bus::{OnlineDevice, PresenceAnswer, PresenceAnswerWire, PresenceQuery};

use crate::context::{StateCtx, serve_queue};

/// Serves presence queries until `shutdown`.
pub async fn serve(
    ctx: Arc<StateCtx>,
    shutdown: tether_service::Shutdown,
) -> Result<(), async_nats::SubscribeError> {
    serve_queue(
        ctx,
        subjects::presence_get_all(),
        shutdown,
        |ctx, message| async move { handle(&ctx, message).await },
    )
    .await
}

async fn handle(ctx: &StateCtx, message: Message) {
    let reply = match Subject::parse(&message.subject).and_then(|s| s.app()) {
        None => PresenceAnswerWire::error(ErrorCode::BadRequest, "presence subject has no app"),
        Some(app) => match PresenceQuery::from_json(&message.payload) {
            Err(error) => PresenceAnswerWire::Error { error },
            Ok(query) => match answer(ctx, app, &query).await {
                Ok(answer) => PresenceAnswerWire::Ok(answer),
                Err(text) => PresenceAnswerWire::error(ErrorCode::Unavailable, text),
            },
        },
    };
    if let Some(reply_to) = message.reply {
        let _ = ctx.client.publish(reply_to, reply.to_json()).await;
    }
}

async fn answer(
    ctx: &StateCtx,
    app: &str,
    query: &PresenceQuery,
) -> Result<PresenceAnswer, String> {
    let mut answer = PresenceAnswer::default();
    for uid in &query.uids {
        let mut online = Vec::new();
        let dids = ctx
            .store
            .user_devices(app, uid)
            .await
            .map_err(|e| e.to_string())?;
        for did in dids {
            if let Some(route) = ctx
                .store
                .route(app, &did)
                .await
                .map_err(|e| e.to_string())?
            {
                let region = if route.region.is_empty() {
                    ctx.config.region.clone()
                } else {
                    route.region
                };
                online.push(OnlineDevice {
                    did,
                    region,
                    gw: route.gw,
                });
            }
        }
        if let Some(relay) = &ctx.relay {
            let (elsewhere, unanswered) = relay.online_elsewhere(app, uid).await;
            online.extend(elsewhere);
            for region in unanswered {
                if !answer.unanswered.contains(&region) {
                    answer.unanswered.push(region);
                }
            }
        }
        answer.users.insert(uid.clone(), online);
    }
    Ok(answer)
}
