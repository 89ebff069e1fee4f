//! Relayed pushes arriving here: the relay streams are created, `TETHER_XR_IN` sources the
//! peers' streams (its sources re-added as soon as a peer answers again), and one ordered
//! consumer stores each relayed push in its device's inbox (docs/multi-region.md).

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind};
use bytes::Bytes;
use futures::StreamExt;
use tether_nats::headers;
use tether_nats::region::{RelayLayout, RelaySubject};
use tether_schemas::{Frame, RawFrame, limits};

use crate::context::StateCtx;

/// How long a relayed push that could not be stored waits before it is tried again.
const RETRY_DELAY: Duration = Duration::from_millis(500);

/// Creates the relay streams and delivers relayed pushes until `shutdown`.
pub async fn start(
    ctx: Arc<StateCtx>,
    layout: RelayLayout,
    shutdown: tether_service::Shutdown,
) -> Result<(), tether_nats::BusError> {
    tether_nats::region::apply_relay_layout(&ctx.js, &layout).await?;
    tokio::spawn(resume_sources_on_reconnect(
        ctx.clone(),
        layout.clone(),
        shutdown.clone(),
    ));
    tokio::spawn(deliver_incoming(ctx, layout, shutdown));
    Ok(())
}

/// Asks each peer's JetStream API every second; when a peer answers again after it could
/// not be reached, re-adds its source to `TETHER_XR_IN`, so sourcing resumes at once
/// instead of after nats-server's source retry backoff (5 s × 2 × failures, up to 2 min:
/// 30 s after a 30 s cut). The re-added source resumes after the last message it
/// delivered (the server reads it from the stream), and a message sourced twice is
/// dropped by the relay stream's and the inbox's de-duplication.
async fn resume_sources_on_reconnect(
    ctx: Arc<StateCtx>,
    layout: RelayLayout,
    shutdown: tether_service::Shutdown,
) {
    let peers: Vec<(String, jetstream::Context)> = layout
        .peers
        .iter()
        .map(|peer| {
            (
                peer.name.clone(),
                jetstream::with_domain(ctx.client.clone(), &peer.domain),
            )
        })
        .collect();
    let mut unreachable = vec![false; peers.len()];
    let mut tick = tokio::time::interval(Duration::from_secs(1));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        for ((name, js), was_down) in peers.iter().zip(unreachable.iter_mut()) {
            let up = matches!(
                tokio::time::timeout(Duration::from_secs(1), js.query_account()).await,
                Ok(Ok(_))
            );
            if up && *was_down {
                match resume_source(&ctx.js, &layout, name).await {
                    Ok(()) => {
                        tracing::info!(region = %name, "peer region reachable again; relay source resumed")
                    }
                    Err(error) => {
                        tracing::warn!(region = %name, %error, "cannot resume the relay source")
                    }
                }
            }
            *was_down = !up;
        }
    }
}

/// Removes `peer`'s source from `TETHER_XR_IN` and adds it back.
async fn resume_source(
    js: &jetstream::Context,
    layout: &RelayLayout,
    peer: &str,
) -> Result<(), String> {
    let name = tether_nats::region::relay_stream_name(peer);
    let mut without = layout.incoming();
    if let Some(sources) = without.sources.as_mut() {
        sources.retain(|source| source.name != name);
    }
    js.update_stream(without).await.map_err(|e| e.to_string())?;
    js.update_stream(layout.incoming())
        .await
        .map_err(|e| e.to_string())?;
    Ok(())
}

/// Pulls `TETHER_XR_IN` one message at a time (the consumer allows one in flight) and
/// stores each in its device's inbox; reconnects the consumer after errors.
async fn deliver_incoming(
    ctx: Arc<StateCtx>,
    layout: RelayLayout,
    shutdown: tether_service::Shutdown,
) {
    let ack_wait = Duration::from_secs(30);
    loop {
        let messages = async {
            let stream = ctx
                .js
                .get_stream(tether_nats::region::RELAY_IN_STREAM)
                .await
                .map_err(|e| e.to_string())?;
            let consumer = stream
                .get_or_create_consumer(
                    tether_nats::region::RELAY_IN_CONSUMER,
                    layout.consumer(ack_wait),
                )
                .await
                .map_err(|e| e.to_string())?;
            consumer.messages().await.map_err(|e| e.to_string())
        };
        let mut messages = tokio::select! {
            _ = shutdown.cancelled() => return,
            m = messages => match m {
                Ok(m) => m,
                Err(error) => {
                    tracing::warn!(%error, "relay consumer unavailable; retrying");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        };
        loop {
            let next = tokio::select! {
                _ = shutdown.cancelled() => return,
                next = messages.next() => next,
            };
            match next {
                Some(Ok(message)) => deliver_one(&ctx, &layout.region, message).await,
                // Heartbeat gaps after a server restart: keep reading (FIELD-NOTES).
                Some(Err(error)) => tracing::debug!(%error, "relay consumer"),
                None => break,
            }
        }
    }
}

async fn deliver_one(ctx: &StateCtx, region: &str, message: jetstream::Message) {
    let relay = ctx.relay.as_ref();
    let invalid = |why: &'static str| {
        if let Some(relay) = relay {
            relay.metrics.relayed_invalid.inc();
        }
        ctx.metrics.refused(why);
    };
    let parsed = RelaySubject::parse(message.subject.as_str()).filter(|s| s.target == region);
    let frame = RawFrame::from_bytes(message.payload.clone(), limits::MAX_FRAME_LEN_CAP)
        .ok()
        .and_then(|raw| Frame::decode(&raw).ok());
    let relay_id = message
        .headers
        .as_ref()
        .and_then(|h| h.get(headers::RELAY_ID))
        .map(|v| v.as_str().to_string());
    let (Some(subject), Some(Frame::Down { header, qos1, body }), Some(relay_id)) =
        (parsed, frame, relay_id)
    else {
        invalid("relay_invalid");
        tracing::warn!(subject = %message.subject, "invalid relayed message dropped");
        let _ = message.ack_with(AckKind::Term).await;
        return;
    };
    let (app, did) = (subject.app, subject.did);
    // Retried here, never nak'd: the consumer allows one message in flight, so holding it
    // keeps every later relayed push behind it (per-device order).
    loop {
        match store_relayed(ctx, app, did, &relay_id, &header, qos1, &body).await {
            Ok(()) => break,
            Err(error) => {
                tracing::warn!(app, did, origin = subject.origin, %error, "relayed push not stored; retrying");
                let _ = message.ack_with(AckKind::Progress).await;
                tokio::time::sleep(RETRY_DELAY).await;
            }
        }
    }
    if let Some(relay) = relay {
        relay.metrics.relayed_in.inc();
    }
    let _ = message.ack().await;
}

/// Stores one relayed push: QoS1 in the device's inbox with its next sequence
/// (de-duplicated by the relay id), QoS0 written to the device's gateway if it is
/// connected here now (else dropped, as QoS0 is).
async fn store_relayed(
    ctx: &StateCtx,
    app: &str,
    did: &str,
    relay_id: &str,
    header: &tether_schemas::pb::Down,
    qos1: bool,
    body: &Bytes,
) -> Result<(), String> {
    if qos1 {
        let encode = crate::moves::qos1_down(header.clone(), body.clone());
        ctx.store
            .append_inbox(
                app,
                did,
                Some(relay_id.to_string()),
                ctx.pipelines.inbox_retention(app),
                encode,
            )
            .await
            .map_err(|e| e.to_string())?;
        return Ok(());
    }
    if let Some(route) = ctx.store.route(app, did).await.map_err(|e| e.to_string())? {
        let frame = Frame::Down {
            header: header.clone(),
            qos1: false,
            body: body.clone(),
        }
        .encode();
        ctx.send_frame(&route.gw, app, &[did], frame).await;
    }
    Ok(())
}
