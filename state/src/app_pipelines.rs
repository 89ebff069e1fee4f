//! Per-app pipeline settings applied live (PROTOCOL.md 12.4): every state instance watches
//! the `tether_apps` bucket and keeps each app's overrides in memory, so an operator's
//! `tether app set <app> broadcast_threshold=…` (`membership_events`, `qos_default`,
//! `business_subject`, `inbox_retention`) takes effect on the next push, membership change
//! or uplink request, without a restart. A value in the bucket wins over `[apps.<app>]` of the config file, which wins
//! over the instance's default.

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt;
use tether_schemas::bus::{AppPipeline, AppPipelineView};
use tether_service::Shutdown;

use crate::config::StateConfig;

/// The pipeline settings of every app with a record.
#[derive(Debug, Default)]
pub struct AppPipelines {
    apps: RwLock<HashMap<String, AppPipeline>>,
}

impl AppPipelines {
    /// The broadcast threshold of `app`: the record's, else the configuration's.
    pub fn broadcast_threshold(&self, config: &StateConfig, app: &str) -> usize {
        self.apps
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(app)
            .and_then(|p| p.broadcast_threshold)
            .unwrap_or_else(|| config.broadcast_threshold(app))
    }

    /// Whether `app`'s membership changes are published: the record's, else the
    /// configuration's.
    pub fn membership_events(&self, config: &StateConfig, app: &str) -> bool {
        self.apps
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(app)
            .and_then(|p| p.membership_events)
            .unwrap_or_else(|| config.membership_events(app))
    }

    /// Whether a push of `app` without `Tether-Qos` is QoS1 (the record's `qos_default`,
    /// else QoS1).
    pub fn default_qos1(&self, app: &str) -> bool {
        self.get(app).is_none_or(|p| p.default_qos1())
    }

    /// Where `app`'s uplink requests go: the record's `business_subject`, else
    /// `tether.<app>.biz.up`.
    pub fn business_subject(&self, app: &str) -> String {
        self.get(app)
            .and_then(|p| p.business_subject)
            .unwrap_or_else(|| tether_nats::subjects::business_up(app))
    }

    /// How long `app`'s QoS1 messages stay in inboxes, when its record says (else the
    /// stream's `max_age`).
    pub fn inbox_retention(&self, app: &str) -> Option<Duration> {
        self.get(app)
            .and_then(|p| p.inbox_retention)
            .filter(|&secs| secs > 0)
            .map(Duration::from_secs)
    }

    fn get(&self, app: &str) -> Option<AppPipeline> {
        self.apps
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(app)
            .cloned()
    }

    fn apply(&self, mut view: AppPipelineView) {
        if let Some(Err(error)) = view
            .pipeline
            .business_subject
            .as_deref()
            .map(|subject| tether_nats::subjects::check_business_subject(&view.id, subject))
        {
            // Written to the bucket without `tether app set`: a subject outside the app's
            // own `biz` subjects is not followed.
            tracing::warn!(app = %view.id, %error, "app business_subject refused");
            view.pipeline.business_subject = None;
        }
        self.apps
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(view.id, view.pipeline);
    }

    fn remove(&self, app: &str) {
        self.apps
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(app);
    }

    /// Follows `store` (the `tether_apps` bucket) until `shutdown`, watching again after
    /// the watch ends (a server restart).
    pub fn follow(self: std::sync::Arc<Self>, store: kv::Store, shutdown: Shutdown) {
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = self.watch(&store) => {}
                }
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    async fn watch(&self, store: &kv::Store) {
        let mut entries = match store.watch_with_history(tether_nats::keys::APPS).await {
            Ok(entries) => entries,
            Err(error) => {
                tracing::warn!(%error, "app pipelines: cannot watch tether_apps");
                return;
            }
        };
        while let Some(entry) = entries.next().await {
            let Ok(entry) = entry else {
                continue; // transient (idle heartbeat after a server restart)
            };
            let Some(app) = entry.key.strip_prefix("app.") else {
                continue;
            };
            match entry.operation {
                kv::Operation::Put => match AppPipelineView::from_json(&entry.value) {
                    Ok(view) if view.id == app => self.apply(view),
                    Ok(_) => tracing::warn!(%app, "app record id differs from its key, ignored"),
                    Err(error) => tracing::warn!(%app, %error, "unreadable app record, ignored"),
                },
                kv::Operation::Delete | kv::Operation::Purge => self.remove(app),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn record_wins_over_config() {
        let config = StateConfig::default();
        let pipelines = AppPipelines::default();
        assert_eq!(pipelines.broadcast_threshold(&config, "a"), 100);
        pipelines.apply(AppPipelineView {
            id: "a".into(),
            pipeline: AppPipeline {
                broadcast_threshold: Some(3),
                ..Default::default()
            },
        });
        assert_eq!(pipelines.broadcast_threshold(&config, "a"), 3);
        assert_eq!(pipelines.broadcast_threshold(&config, "b"), 100);
        pipelines.remove("a");
        assert_eq!(pipelines.broadcast_threshold(&config, "a"), 100);
    }

    #[test]
    fn a_subject_outside_the_app_is_not_followed() {
        let pipelines = AppPipelines::default();
        assert!(pipelines.default_qos1("a"));
        use tether_nats::subjects::{business_named, business_up};
        assert_eq!(pipelines.business_subject("a"), business_up("a"));
        for (subject, expected) in [
            (business_named("a", "v2"), business_named("a", "v2")),
            (business_named("b", "up"), business_up("a")),
        ] {
            pipelines.apply(AppPipelineView {
                id: "a".into(),
                pipeline: AppPipeline {
                    business_subject: Some(subject),
                    qos_default: Some(0),
                    ..Default::default()
                },
            });
            assert_eq!(pipelines.business_subject("a"), expected);
            assert!(!pipelines.default_qos1("a"));
        }
    }
}
