//! Routes in memory for QoS0 pushes: every state instance follows the route records
//! (`r.>` of `tether_routes`) with a KV watch, so a QoS0 push finds its devices' gateways
//! without a KV read per device.
//!
//! Only a found route is served from here; a device without an entry is read from KV as
//! before (so a push right after a login, whose route the watch has not brought yet, still
//! finds the device). A route that just changed can be a few milliseconds old here: a QoS0
//! frame may then go to the device's previous gateway and be lost, which QoS0 allows
//! (PROTOCOL 6.4). QoS1 pushes never use it.

use std::collections::HashMap;
use std::sync::{PoisonError, RwLock};
use std::time::Duration;

use async_nats::jetstream::kv;
use futures::StreamExt;
use tether_service::Shutdown;

use crate::store::Route;

/// The routes this instance has seen, by route key (`r.<p>.<app>.<did>`).
#[derive(Debug, Default)]
pub struct RouteCache {
    routes: RwLock<HashMap<String, Route>>,
}

impl RouteCache {
    /// The route of the device with route key `key`, if the watch has brought one.
    pub fn get(&self, key: &str) -> Option<Route> {
        self.routes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(key)
            .cloned()
    }

    /// Routes held (a gauge for the metrics and tests).
    pub fn len(&self) -> usize {
        self.routes
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// Whether no route is held.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    fn put(&self, key: String, route: Option<Route>) {
        let mut routes = self.routes.write().unwrap_or_else(PoisonError::into_inner);
        match route {
            Some(route) => {
                routes.insert(key, route);
            }
            None => {
                routes.remove(&key);
            }
        }
    }

    fn clear(&self) {
        self.routes
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .clear();
    }

    /// Follows the route records of `bucket` until `shutdown`, watching again (from a clean
    /// slate) after the watch ends or stalls.
    pub fn follow(self: std::sync::Arc<Self>, bucket: kv::Store, shutdown: Shutdown) {
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    () = shutdown.cancelled() => return,
                    () = self.watch(&bucket) => {}
                }
                // What was missed while not watching must not be served: start over.
                self.clear();
                tokio::time::sleep(Duration::from_secs(1)).await;
            }
        });
    }

    async fn watch(&self, bucket: &kv::Store) {
        let mut entries = match bucket.watch_with_history("r.>").await {
            Ok(entries) => entries,
            Err(error) => {
                tracing::warn!(%error, "route cache: cannot watch tether_routes");
                return;
            }
        };
        while let Some(entry) = entries.next().await {
            let Ok(entry) = entry else {
                continue; // transient (idle heartbeat after a server restart)
            };
            let route = match entry.operation {
                kv::Operation::Put => serde_json::from_slice::<Route>(&entry.value).ok(),
                kv::Operation::Delete | kv::Operation::Purge => None,
            };
            self.put(entry.key, route);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn put_and_delete() {
        let cache = RouteCache::default();
        let route = Route {
            uid: "u".into(),
            gw: "gw1".into(),
            conn: 7,
            region: String::new(),
        };
        cache.put("r.1.a.d".into(), Some(route.clone()));
        assert_eq!(cache.get("r.1.a.d"), Some(route));
        cache.put("r.1.a.d".into(), None);
        assert!(cache.get("r.1.a.d").is_none());
        assert!(cache.is_empty());
    }
}
