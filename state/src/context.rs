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
/// message, at most `max_requests_in_progress` at once (more are refused "busy"). The subscription is confirmed with the server before this returns, so requests
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
    let permits = Arc::new(tokio::sync::Semaphore::new(
        ctx.config.max_requests_in_progress,
    ));
    tokio::spawn(tether_nats::serve::serve_subscription(
        subscription,
        shutdown,
        move |message| match permits.clone().try_acquire_owned() {
            Ok(permit) => {
                let work = handle(ctx.clone(), message);
                tokio::spawn(async move {
                    work.await;
                    drop(permit);
                });
            }
            Err(_) => refuse_busy(&ctx, message),
        },
    ));
    Ok(())
}

/// Answers a request this instance has no room for with `unavailable` ("busy"): the
/// business retries with backoff (with the same push id, a retried push stores nothing
/// twice) instead of the instance piling up tasks.
fn refuse_busy(ctx: &Arc<StateCtx>, message: async_nats::Message) {
    ctx.metrics.busy.inc();
    let Some(reply) = message.reply else {
        return;
    };
    let body = tether_schemas::bus::ReplyWire::<()>::error(
        tether_schemas::ErrorCode::Unavailable,
        "state busy: too many requests in progress; retry with backoff",
    )
    .to_json();
    let client = ctx.client.clone();
    tokio::spawn(async move {
        let _ = client.publish(reply, body).await;
    });
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
    /// Routes in memory, for QoS0 pushes (a KV watch of every route record).
    pub route_cache: Arc<crate::route_cache::RouteCache>,
    /// Per-app pipeline settings from `tether_apps` (live overrides).
    pub pipelines: Arc<crate::app_pipelines::AppPipelines>,
    /// Cross-region delivery, when this region has peers (`region`, `peer_regions`).
    pub relay: Option<Arc<crate::crossregion::Relay>>,
}

impl StateCtx {
    /// The broadcast threshold of `app` (its `tether_apps` record, else the config).
    pub fn broadcast_threshold(&self, app: &str) -> usize {
        self.pipelines.broadcast_threshold(&self.config, app)
    }

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

    /// Sends a control message and waits (at most `limit`) until the gateway says it is
    /// applied; false when it did not answer in time (gone, or slow).
    pub async fn control_confirmed(
        &self,
        gw: &str,
        control: &GatewayControl,
        limit: std::time::Duration,
    ) -> bool {
        let Ok(body) = control.to_json() else {
            return false;
        };
        let request = async_nats::Request::new()
            .payload(body)
            .timeout(Some(limit));
        match self
            .client
            .send_request(subjects::gateway_ctl(gw), request)
            .await
        {
            Ok(_) => true,
            Err(error) => {
                tracing::debug!(gw, %error, "gateway did not confirm a control message");
                false
            }
        }
    }

    /// The devices of a user that pushes and binds address: the user's device list, less
    /// the devices offline for longer than `forget_devices_after_secs` (removed from the
    /// list as they are found; a login adds a device back).
    pub async fn user_devices(
        &self,
        app: &str,
        uid: &str,
    ) -> Result<Vec<String>, crate::store::StoreError> {
        let dids = self.store.user_devices(app, uid).await?;
        let forget_ms = self.config.forget_devices_after_secs.saturating_mul(1000);
        if forget_ms == 0 {
            return Ok(dids);
        }
        let now = tether_schemas::bus::unix_now_ms();
        let mut kept = Vec::with_capacity(dids.len());
        for did in dids {
            let cursor = self.store.cursor(app, &did).await?;
            let stale = cursor.last_seen_ms > 0
                && now.saturating_sub(cursor.last_seen_ms) > forget_ms
                && self.store.route(app, &did).await?.is_none();
            if stale {
                self.store.remove_user_device(app, uid, &did).await?;
                self.metrics.devices_forgotten.inc();
                tracing::info!(app, uid, did = %did, "device offline too long, left its user's list");
            } else {
                kept.push(did);
            }
        }
        Ok(kept)
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
