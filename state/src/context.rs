//! What every task of one state instance shares.

use std::future::Future;
use std::sync::Arc;

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;
use tether_nats::{headers, subjects};

use crate::config::StateConfig;
use crate::index::SessionIndex;
use crate::metrics::StateMetrics;
use crate::store::Store;
use tether_schemas::bus::{GatewayControl, PresenceEvent};

/// The queue group all state instances share for the business API (pushes, sessions).
pub const QUEUE: &str = "tether-state";

/// Serves requests on `subject` in the [`QUEUE`] group until `shutdown`, one task per
/// message. The subscription is confirmed with the server before this returns, so requests
/// sent right after start find it.
pub async fn serve_queue<F, Fut>(
    ctx: Arc<StateCtx>,
    subject: String,
    shutdown: tether_service::Shutdown,
    handle: F,
) -> Result<(), async_nats::SubscribeError>
where
    F: Fn(Arc<StateCtx>, async_nats::Message) -> Fut + Send + Sync + 'static,
    Fut: Future<Output = ()> + Send + 'static,
{
    let subscription = ctx
        .client
        .queue_subscribe(subject.clone(), QUEUE.into())
        .await?;
    if let Err(error) = tether_nats::sync_with_server(&ctx.client).await {
        tracing::warn!(%subject, %error, "cannot confirm the subscription");
    }
    tokio::spawn(tether_nats::serve::serve_subscription(
        subscription,
        shutdown,
        move |message| {
            tokio::spawn(handle(ctx.clone(), message));
        },
    ));
    Ok(())
}

/// Most devices named in one downlink message (`Tether-Did` values); longer target lists
/// are split, so a message never nears the server's `max_payload`.
pub const MAX_DIDS_PER_MESSAGE: usize = 256;

/// The shared context.
pub struct StateCtx {
    /// Configuration.
    pub config: StateConfig,
    /// This instance's id.
    pub instance_id: String,
    /// NATS client.
    pub client: async_nats::Client,
    /// JetStream.
    pub js: jetstream::Context,
    /// Routes, cursors, inboxes, memberships, rooms.
    pub store: Store,
    /// The session → devices index and room settings (every instance holds all of it).
    pub index: std::sync::Arc<SessionIndex>,
    /// Metrics.
    pub metrics: StateMetrics,
    /// Which gateways are alive (heartbeats).
    pub gateways: Arc<crate::liveness::GatewayLiveness>,
}

impl StateCtx {
    /// Writes one frame to devices on gateway `gw`; false when NATS did not take it.
    pub async fn send_frame(&self, gw: &str, app: &str, dids: &[&str], frame: Bytes) -> bool {
        let mut map = HeaderMap::new();
        map.insert(headers::APP, app);
        for did in dids {
            map.append(headers::DID, *did);
        }
        if let Err(error) = self
            .client
            .publish_with_headers(subjects::gateway_down(gw), map, frame)
            .await
        {
            tracing::warn!(gw, app, %error, "downlink publish failed");
            return false;
        }
        self.metrics.frames_sent.inc();
        true
    }

    /// Publishes one frame on the app's broadcast subject: every gateway delivers it to
    /// its local members of `session` (if given), restricted to `dids` (if any); false when
    /// NATS did not take it.
    pub async fn broadcast_frame(
        &self,
        app: &str,
        session: Option<&str>,
        dids: &[&str],
        frame: Bytes,
    ) -> bool {
        let mut map = HeaderMap::new();
        map.insert(headers::APP, app);
        if let Some(session) = session {
            map.insert(headers::SESSION, session);
        }
        if !dids.is_empty() {
            map.insert(headers::DID, dids.join(",").as_str());
        }
        if let Err(error) = self
            .client
            .publish_with_headers(subjects::broadcast(app), map, frame)
            .await
        {
            tracing::warn!(app, %error, "broadcast publish failed");
            return false;
        }
        self.metrics.frames_sent.inc();
        true
    }

    /// Sends a control message to gateway `gw` (`tether.gw.<gw>.ctl`); false when it was
    /// not sent.
    pub async fn control(&self, gw: &str, control: &GatewayControl) -> bool {
        let Ok(body) = control.to_json() else {
            return false;
        };
        match self.client.publish(subjects::gateway_ctl(gw), body).await {
            Ok(()) => true,
            Err(error) => {
                tracing::warn!(gw, %error, "gateway control message not sent");
                false
            }
        }
    }

    /// Publishes a presence notification.
    pub async fn presence(&self, event: &PresenceEvent) {
        if let Err(error) = self
            .client
            .publish(subjects::presence(&event.app), event.to_json())
            .await
        {
            tracing::warn!(app = %event.app, %error, "presence publish failed");
        }
        self.metrics.presence.inc();
    }
}
