//! Redirect tokens for drains and migrations (PROTOCOL.md 10.7): gateways ask on
//! `tether.gw.<gw>.redirect.req` (queue group `ipconfig`) where each of their devices should
//! go; ipconfig picks the gateway (its ranking, or the named target) and signs a token bound
//! to it (`gw` claim). The requester comes from the subject and is never chosen, unless it
//! hands over to its successor and names itself (`handoff`, docs/handoff.md "TLS").

use std::time::Duration;

use async_nats::{Client, Message};
use bytes::Bytes;
use tether_auth::{Claims, Right, Rights};
use tether_nats::subjects::{self, Subject};
use tether_schemas::ErrorCode;
use tether_schemas::bus::migrate::{MAX_REDIRECT_BATCH, TARGET_IPCONFIG};
use tether_schemas::bus::{
    ErrorBody, GatewayHeartbeat, RedirectDevice, RedirectGrant, RedirectReply, RedirectRequest,
    WireError, valid_id,
};
use tether_service::Shutdown;

use crate::api::ApiState;
use crate::score::{self, Policy, Want};

/// Queue group of the redirect subscription (one instance answers each request).
pub const QUEUE_GROUP: &str = "ipconfig";

/// Subscribes and answers until `shutdown`.
pub async fn serve(
    client: Client,
    state: ApiState,
    shutdown: Shutdown,
) -> Result<(), async_nats::SubscribeError> {
    let subscription = client
        .queue_subscribe(subjects::gateway_redirect_all(), QUEUE_GROUP.into())
        .await?;
    tokio::spawn(tether_nats::serve::serve_subscription(
        subscription,
        shutdown,
        move |message| {
            let (client, state) = (client.clone(), state.clone());
            tokio::spawn(async move { answer_message(&client, state, message).await });
        },
    ));
    Ok(())
}

async fn answer_message(client: &Client, state: ApiState, message: Message) {
    let Some(reply) = message.reply.clone() else {
        return;
    };
    let body = match tokio::task::spawn_blocking(move || answer(&state, &message)).await {
        Ok(body) => body,
        Err(error) => {
            tracing::error!(%error, "redirect answer failed");
            ErrorBody::new(ErrorCode::Internal, "redirect answer failed").to_json()
        }
    };
    if let Err(error) = client.publish(reply, body).await {
        tracing::debug!(%error, "redirect answer not sent");
    }
}

/// The answer to one request message (its JSON body).
pub fn answer(state: &ApiState, message: &Message) -> Bytes {
    let refuse = |text: &str| ErrorBody::new(ErrorCode::BadRequest, text).to_json();
    let Some(Subject::GatewayRedirect { gw: from }) = Subject::parse(&message.subject) else {
        return refuse("not a redirect subject");
    };
    let request: RedirectRequest = match serde_json::from_slice(&message.payload) {
        Ok(request) => request,
        Err(error) => return refuse(&format!("unreadable request: {error}")),
    };
    if request.devices.len() > MAX_REDIRECT_BATCH {
        return refuse(&format!("at most {MAX_REDIRECT_BATCH} devices per request"));
    }
    if request.target != TARGET_IPCONFIG && !valid_id(&request.target) {
        return refuse("target must be a gateway id or \"ipconfig\"");
    }
    let grants = request
        .devices
        .iter()
        .map(|device| grant(state, from, &request, device))
        .collect();
    state
        .metrics
        .redirect_grants
        .inc_by(request.devices.len() as u64);
    serde_json::to_vec(&RedirectReply { grants })
        .map(Bytes::from)
        .unwrap_or_else(|_| ErrorBody::new(ErrorCode::Internal, "encode").to_json())
}

fn grant(
    state: &ApiState,
    from: &str,
    request: &RedirectRequest,
    device: &RedirectDevice,
) -> RedirectGrant {
    let mut grant = RedirectGrant {
        app: device.app.clone(),
        did: device.did.clone(),
        gw: None,
        endpoint: None,
        token: None,
        error: None,
    };
    let fail = |mut grant: RedirectGrant, code: ErrorCode, text: &str| {
        grant.error = Some(WireError::new(code, text));
        grant
    };
    if ![&device.app, &device.uid, &device.did]
        .iter()
        .all(|id| valid_id(id))
    {
        return fail(grant, ErrorCode::BadRequest, "invalid id");
    }
    let ws = match device.transport.as_str() {
        "tcp" => false,
        "ws" => true,
        _ => return fail(grant, ErrorCode::BadRequest, "transport must be tcp or ws"),
    };
    let Some(app) = state.apps.get(&device.app) else {
        return fail(grant, ErrorCode::BadRequest, "unknown app");
    };
    let want = Want {
        region: Some(request.region.as_str()).filter(|r| !r.is_empty()),
        pool: app.dedicated_pool(),
    };
    let endpoint_of = |g: &GatewayHeartbeat| {
        if ws {
            g.endpoints.ws.clone()
        } else {
            g.endpoints.tcp.clone()
        }
    };
    let chosen = state.gateways.with_live(|live| {
        // A gateway handing over to its successor may send its devices back to itself
        // (the successor serves its listeners), and only when it names itself.
        let back = request.handoff && request.target == from;
        let usable =
            live.filter(|g| (g.id != from || back) && !g.draining && endpoint_of(g).is_some());
        if request.target == TARGET_IPCONFIG {
            let policy = Policy {
                offer_draining: false,
                tie_band: state.config.tie_band,
                max: 1,
            };
            score::rank(usable, &want, &policy, &mut rand::thread_rng())
                .first()
                .map(|r| (r.gateway.id.clone(), endpoint_of(r.gateway)))
        } else {
            usable
                .filter(|g| g.id == request.target && score::eligible(g, &want))
                .map(|g| (g.id.clone(), endpoint_of(g)))
                .next()
        }
    });
    let Some((gw, Some(endpoint))) = chosen else {
        return fail(grant, ErrorCode::Unavailable, "no gateway to move to");
    };
    let ttl = Duration::from_secs(state.config.redirect_token_ttl_secs);
    let mut claims = Claims::new(
        &device.app,
        &device.uid,
        &device.did,
        tether_auth::unix_now(),
        ttl,
    );
    // The same rights as the device had, never more than the app grants.
    let mut rights = Rights::of(&[]);
    for right in device.rights.iter().filter_map(|r| Right::from_name(r)) {
        if right != Right::Rooms || app.rooms {
            rights = rights.with(right);
        }
    }
    claims.rights = rights;
    claims.gw = Some(gw.clone());
    match state.signer.sign(&claims) {
        Ok(token) => {
            grant.gw = Some(gw);
            grant.endpoint = Some(endpoint);
            grant.token = Some(token);
            grant
        }
        Err(error) => {
            tracing::error!(%error, "cannot sign a redirect token");
            fail(grant, ErrorCode::Internal, "cannot sign a token")
        }
    }
}
