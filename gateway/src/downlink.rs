//! Downlink: frames from NATS to local connections.
//!
//! Two subscriptions: this gateway's own subject `tether.gw.<id>.down` (state addresses
//! devices it knows are here) and `tether.*.bcast` (app-wide broadcasts). Each message
//! carries one complete client frame as its payload, encoded once and shared by every
//! connection it is written to; `Tether-Did` headers (repeatable, or comma separated)
//! name the target devices; `Tether-App` names the app on the gateway subject. A broadcast
//! without `Tether-Did` goes to every local connection of the app.

use std::sync::Arc;

use async_nats::Message;
use futures::StreamExt;
use tether_nats::subjects::{self, headers};
use tether_schemas::{FixedHeader, FrameType, flags, limits};

use crate::conn::Enqueued;
use crate::context::GatewayCtx;
use crate::shutdown::Shutdown;

/// Subscribes and delivers until shutdown.
pub async fn run(
    ctx: Arc<GatewayCtx>,
    shutdown: Shutdown,
) -> Result<(), async_nats::SubscribeError> {
    let client = ctx.bus.client().clone();
    let direct = client
        .subscribe(subjects::gateway_down(&ctx.config.id))
        .await?;
    let bcast = client.subscribe(subjects::broadcast_all()).await?;
    // The server must know both subscriptions before the gateway accepts anyone, or the
    // first downlinks of its first clients would go nowhere.
    if let Err(error) = tether_nats::sync_with_server(&client).await {
        tracing::warn!(%error, "cannot confirm the downlink subscriptions");
    }
    let mut messages = futures::stream::select(direct, bcast);
    tokio::spawn(async move {
        loop {
            tokio::select! {
                message = messages.next() => match message {
                    Some(message) => deliver(&ctx, &message),
                    None => return,
                },
                _ = shutdown.cancelled() => return,
            }
        }
    });
    Ok(())
}

/// Delivers one downlink message to its local targets.
pub fn deliver(ctx: &GatewayCtx, message: &Message) {
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
    let qos1 = header.kind().is_ok_and(|k| k == FrameType::Down) && header.has_flag(flags::QOS1);
    let app = message
        .headers
        .as_ref()
        .and_then(|h| h.get(headers::APP))
        .map(|v| v.as_str())
        .or_else(|| subjects::app_of(&message.subject));
    let Some(app) = app else {
        metrics.downlink_invalid.inc();
        tracing::warn!(subject = %message.subject, "downlink without Tether-App header, dropped");
        return;
    };
    let limit = ctx.config.max_queued_frames;
    let dids: Vec<&str> = message
        .headers
        .as_ref()
        .map(|h| {
            h.get_all(headers::DID)
                .flat_map(|v| v.as_str().split(','))
                .map(str::trim)
                .filter(|d| !d.is_empty())
                .collect()
        })
        .unwrap_or_default();
    let is_broadcast = message.subject.ends_with(".bcast");
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
