//! Per-app pipeline settings applied live (PROTOCOL.md 12.4): the gateway watches the
//! `tether_apps` bucket and keeps, per app, whether it is paused, its connection share and
//! token buckets for its uplink rates.
//!
//! A limit in the record is for the whole app on all gateways; this gateway enforces its
//! share, `ceil(limit / live gateways)`, where live gateways are the records of the
//! `tether_gateways` bucket (counted every few seconds). The sum is approximate when load is
//! uneven, as the issue allows. An app without a record, or with no limit set, is not limited
//! here (the gateway's own `max_connections_per_app` still applies).

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use futures::StreamExt;
use tether_schemas::ErrorCode;
use tether_schemas::bus::{AppPipeline, AppPipelineView, ReceiptMode};
use tether_service::Shutdown;

use crate::conn::CloseReason;
use crate::context::GatewayCtx;

/// How often the count of live gateways is refreshed.
const COUNT_EVERY: Duration = Duration::from_secs(3);
/// A heartbeat's lifetime when the bucket does not say (its `max_age`).
const FALLBACK_TTL: Duration = Duration::from_secs(15);
/// The retry hint of connections closed because their app was paused.
pub const PAUSED_RETRY_MS: u32 = 30_000;

/// A token bucket refilled at `rate` per second, holding at most one second's worth.
#[derive(Debug)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

impl Bucket {
    fn full(rate: f64) -> Bucket {
        Bucket {
            tokens: rate,
            at: Instant::now(),
        }
    }

    /// Takes `n` tokens, or says in how many milliseconds they will be there.
    fn take(&mut self, rate: f64, n: f64, now: Instant) -> Result<(), u32> {
        let elapsed = now.saturating_duration_since(self.at).as_secs_f64();
        self.at = now;
        self.tokens = (self.tokens + elapsed * rate).min(rate.max(n));
        if self.tokens >= n {
            self.tokens -= n;
            return Ok(());
        }
        let wait_ms = ((n - self.tokens) / rate * 1000.0).ceil().max(1.0);
        Err(wait_ms.min(f64::from(u32::MAX)) as u32)
    }
}

/// One app's settings and buckets.
#[derive(Debug)]
struct AppState {
    pipeline: AppPipeline,
    msgs: Mutex<Bucket>,
    bytes: Mutex<Bucket>,
}

/// The per-app settings this gateway applies.
#[derive(Debug, Default)]
pub struct AppLimits {
    apps: RwLock<HashMap<String, Arc<AppState>>>,
    gateways: AtomicU64,
}

/// Why an uplink was refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RateRefusal {
    /// What was exceeded (for the UP_ACK message).
    pub what: &'static str,
    /// The app-wide limit.
    pub limit: u64,
    /// When a retry can succeed, milliseconds.
    pub retry_after_ms: u32,
}

impl AppLimits {
    fn get(&self, app: &str) -> Option<Arc<AppState>> {
        self.apps
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(app)
            .cloned()
    }

    /// This gateway's share of an app-wide `limit` (0 = none).
    fn share(&self, limit: u64) -> u64 {
        limit.div_ceil(self.gateways.load(Ordering::Relaxed).max(1))
    }

    /// Whether an operator paused `app`.
    pub fn paused(&self, app: &str) -> bool {
        self.get(app).is_some_and(|s| s.pipeline.paused)
    }

    /// What an UP_ACK code 0 confirms for `app`'s uplinks.
    pub fn receipt_mode(&self, app: &str) -> ReceiptMode {
        self.get(app)
            .map_or(ReceiptMode::Business, |s| s.pipeline.receipt_mode)
    }

    /// The connection limit of `app` on this gateway: the smaller of `configured` and the
    /// app's share (0 = no limit).
    pub fn connection_limit(&self, app: &str, configured: usize) -> usize {
        let share = self
            .get(app)
            .map(|s| s.pipeline.max_connections)
            .filter(|&l| l > 0)
            .map(|l| usize::try_from(self.share(l)).unwrap_or(usize::MAX));
        match (configured, share) {
            (0, Some(s)) => s,
            (c, Some(s)) => c.min(s),
            (c, None) => c,
        }
    }

    /// Takes one message of `len` bytes from the app's uplink buckets.
    pub fn take_uplink(&self, app: &str, len: usize) -> Result<(), RateRefusal> {
        let Some(state) = self.get(app) else {
            return Ok(());
        };
        let now = Instant::now();
        let p = &state.pipeline;
        if p.max_msgs_per_sec > 0 {
            let rate = self.share(p.max_msgs_per_sec) as f64;
            let mut bucket = state.msgs.lock().unwrap_or_else(PoisonError::into_inner);
            bucket
                .take(rate, 1.0, now)
                .map_err(|retry_after_ms| RateRefusal {
                    what: "messages per second",
                    limit: p.max_msgs_per_sec,
                    retry_after_ms,
                })?;
        }
        if p.max_bytes_per_sec > 0 {
            let rate = self.share(p.max_bytes_per_sec) as f64;
            let mut bucket = state.bytes.lock().unwrap_or_else(PoisonError::into_inner);
            bucket
                .take(rate, len as f64, now)
                .map_err(|retry_after_ms| RateRefusal {
                    what: "bytes per second",
                    limit: p.max_bytes_per_sec,
                    retry_after_ms,
                })?;
        }
        Ok(())
    }

    /// Applies an app's record; true when the app became paused by it.
    pub fn apply(&self, view: AppPipelineView) -> bool {
        let mut apps = self.apps.write().unwrap_or_else(PoisonError::into_inner);
        let was_paused = apps.get(&view.id).is_some_and(|s| s.pipeline.paused);
        let paused = view.pipeline.paused;
        let msgs = self.share(view.pipeline.max_msgs_per_sec) as f64;
        let bytes = self.share(view.pipeline.max_bytes_per_sec) as f64;
        apps.insert(
            view.id,
            Arc::new(AppState {
                pipeline: view.pipeline,
                msgs: Mutex::new(Bucket::full(msgs)),
                bytes: Mutex::new(Bucket::full(bytes)),
            }),
        );
        paused && !was_paused
    }

    /// Forgets an app whose record was removed.
    pub fn remove(&self, app: &str) {
        self.apps
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(app);
    }

    /// Sets how many gateways share the app-wide limits.
    pub fn set_gateways(&self, live: u64) {
        self.gateways.store(live.max(1), Ordering::Relaxed);
    }
}

/// Closes every connection of a just-paused app with `app_paused` and a retry hint.
fn close_paused(ctx: &GatewayCtx, app: &str) {
    let connections = ctx.registry.app_connections(app);
    tracing::info!(%app, connections = connections.len(), "app paused: closing its connections");
    for conn in connections {
        let mut reason = CloseReason::error(ErrorCode::AppPaused, "app paused by the operator");
        reason.retry_after_ms = PAUSED_RETRY_MS;
        ctx.metrics.error(ErrorCode::AppPaused);
        conn.close(reason);
    }
}

/// Follows the `tether_apps` bucket and counts live gateways until `shutdown`.
pub fn spawn(ctx: Arc<GatewayCtx>, client: async_nats::Client, shutdown: Shutdown) {
    tokio::spawn(async move {
        let js = async_nats::jetstream::new(client);
        let (apps, gateways) = match (
            js.get_key_value(tether_nats::layout::APPS_BUCKET).await,
            js.get_key_value(tether_nats::layout::GATEWAYS_BUCKET).await,
        ) {
            (Ok(apps), Ok(gateways)) => (apps, gateways),
            (Err(error), _) | (_, Err(error)) => {
                tracing::error!(%error, "app limits: buckets unavailable, per-app settings not applied");
                return;
            }
        };
        tokio::spawn(count_gateways(ctx.clone(), gateways, shutdown.clone()));
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                () = watch(&ctx, &apps) => {}
            }
            // The watch ended (server restart, stalled watcher): start it again from the
            // current values.
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    });
}

async fn watch(ctx: &GatewayCtx, store: &kv::Store) {
    let mut entries = match store.watch_with_history(tether_nats::keys::APPS).await {
        Ok(entries) => entries,
        Err(error) => {
            tracing::warn!(%error, "app limits: cannot watch tether_apps");
            return;
        }
    };
    while let Some(entry) = entries.next().await {
        let entry = match entry {
            Ok(entry) => entry,
            Err(error) => {
                tracing::debug!(%error, "app limits: watch error, continuing");
                continue;
            }
        };
        let Some(app) = entry.key.strip_prefix("app.") else {
            continue;
        };
        match entry.operation {
            kv::Operation::Put => match AppPipelineView::from_json(&entry.value) {
                Ok(view) if view.id == app => {
                    if ctx.app_limits.apply(view) {
                        close_paused(ctx, app);
                    }
                }
                Ok(_) => tracing::warn!(%app, "app record id differs from its key, ignored"),
                Err(error) => tracing::warn!(%app, %error, "unreadable app record, ignored"),
            },
            kv::Operation::Delete | kv::Operation::Purge => ctx.app_limits.remove(app),
        }
    }
}

/// Counts the live gateways (their heartbeat records) from one long-lived watch of the
/// bucket: a key put within the bucket's TTL and not deleted is live. (Listing the keys
/// every few seconds created a consumer per gateway per round.)
async fn count_gateways(ctx: Arc<GatewayCtx>, store: kv::Store, shutdown: Shutdown) {
    let ttl = match store.status().await {
        Ok(status) if !status.max_age().is_zero() => status.max_age(),
        _ => FALLBACK_TTL,
    };
    loop {
        let mut entries = match store.watch_all().await {
            Ok(entries) => entries,
            Err(error) => {
                tracing::debug!(%error, "app limits: cannot watch tether_gateways, retrying");
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = tokio::time::sleep(COUNT_EVERY) => continue,
                }
            }
        };
        let mut seen: HashMap<String, Instant> = HashMap::new();
        let mut tick = tokio::time::interval(COUNT_EVERY);
        loop {
            tokio::select! {
                () = shutdown.cancelled() => return,
                entry = entries.next() => match entry {
                    Some(Ok(entry)) => match entry.operation {
                        kv::Operation::Put => {
                            seen.insert(entry.key, Instant::now());
                        }
                        kv::Operation::Delete | kv::Operation::Purge => {
                            seen.remove(&entry.key);
                        }
                    },
                    Some(Err(error)) => {
                        tracing::debug!(%error, "app limits: gateway watch error, continuing");
                    }
                    None => break, // the watch ended (server restart): start it again
                },
                _ = tick.tick() => {
                    seen.retain(|_, at| at.elapsed() < ttl);
                    ctx.app_limits.set_gateways(seen.len() as u64);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn view(app: &str, set: &[(&str, &str)]) -> AppPipelineView {
        let mut pipeline = AppPipeline::default();
        for (k, v) in set {
            assert!(pipeline.set(k, v).is_ok());
        }
        AppPipelineView {
            id: app.into(),
            pipeline,
        }
    }

    #[test]
    fn shares_and_rates() {
        let limits = AppLimits::default();
        assert_eq!(limits.connection_limit("a", 0), 0);
        assert!(limits.take_uplink("a", 10).is_ok());
        limits.set_gateways(2);
        assert!(!limits.apply(view(
            "a",
            &[("max_connections", "5"), ("max_msgs_per_sec", "4")]
        )));
        assert_eq!(limits.connection_limit("a", 0), 3);
        assert_eq!(limits.connection_limit("a", 2), 2);
        // A share of 2 msgs/s: two pass at once, the third waits.
        assert!(limits.take_uplink("a", 1).is_ok());
        assert!(limits.take_uplink("a", 1).is_ok());
        let refused = limits.take_uplink("a", 1).err();
        assert!(refused.is_some_and(|r| r.retry_after_ms > 0 && r.limit == 4));
        assert!(limits.apply(view("a", &[("paused", "true")])));
        assert!(limits.paused("a"));
        assert!(!limits.apply(view("a", &[("paused", "true")])));
        limits.remove("a");
        assert!(!limits.paused("a"));
    }
}
