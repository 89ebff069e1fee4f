//! The live gateways: every heartbeat in the `tether_gateways` bucket, followed by a KV
//! watch, with the time the NATS server stored it.
//!
//! A gateway counts as live while its last heartbeat is younger than `stale_after`
//! (measured against the server's store time, so gateway clocks do not matter). A
//! gateway that stops cleanly deletes its record and is gone at once; one that crashed
//! goes stale, and the bucket's TTL removes its record later.
//!
//! With peer regions, their buckets are followed the same way through their JetStream
//! domains into the same table: a peer region that cannot be reached stops sending
//! heartbeats, so its gateways go stale like crashed ones.

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, Instant, SystemTime};

use async_nats::jetstream::kv;
use tether_schemas::bus::GatewayHeartbeat;
use tether_service::Shutdown;

/// A heartbeat and when it was stored.
#[derive(Debug, Clone)]
struct Live {
    heartbeat: GatewayHeartbeat,
    stored: Instant,
}

/// Heartbeats by gateway id.
#[derive(Clone)]
pub struct GatewayTable {
    inner: Arc<RwLock<HashMap<String, Live>>>,
    stale_after: Duration,
}

impl GatewayTable {
    /// An empty table whose entries go stale after `stale_after`.
    pub fn new(stale_after: Duration) -> GatewayTable {
        GatewayTable {
            inner: Arc::default(),
            stale_after,
        }
    }

    /// Calls `f` with the heartbeats of every live gateway.
    pub fn with_live<R>(
        &self,
        f: impl FnOnce(&mut dyn Iterator<Item = &GatewayHeartbeat>) -> R,
    ) -> R {
        let now = Instant::now();
        let map = self.inner.read().unwrap_or_else(PoisonError::into_inner);
        let mut live = map
            .values()
            .filter(|l| now.saturating_duration_since(l.stored) < self.stale_after)
            .map(|l| &l.heartbeat);
        f(&mut live)
    }

    /// Number of live gateways.
    pub fn live_count(&self) -> usize {
        self.with_live(|it| it.count())
    }

    /// Records a heartbeat stored at `stored`.
    pub fn put(&self, heartbeat: GatewayHeartbeat, stored: Instant) {
        let mut map = self.inner.write().unwrap_or_else(PoisonError::into_inner);
        // Drop long-dead entries while here, so the map does not grow with departed ids.
        let horizon = self.stale_after * 4;
        map.retain(|_, l| stored.saturating_duration_since(l.stored) < horizon);
        map.insert(heartbeat.id.clone(), Live { heartbeat, stored });
    }

    /// Forgets gateway `id`.
    pub fn remove(&self, id: &str) {
        self.inner
            .write()
            .unwrap_or_else(PoisonError::into_inner)
            .remove(id);
    }

    /// Applies one bucket entry.
    fn apply(&self, entry: &kv::Entry) {
        if entry.operation != kv::Operation::Put {
            tracing::info!(gw = %entry.key, "gateway left");
            self.remove(&entry.key);
            return;
        }
        match serde_json::from_slice::<GatewayHeartbeat>(&entry.value) {
            Ok(heartbeat) if heartbeat.id == entry.key => {
                let age = SystemTime::now()
                    .duration_since(SystemTime::from(entry.created))
                    .unwrap_or_default();
                let stored = Instant::now().checked_sub(age).unwrap_or_else(Instant::now);
                self.put(heartbeat, stored);
            }
            Ok(_) => tracing::warn!(key = %entry.key, "heartbeat id differs from its key, ignored"),
            Err(error) => tracing::warn!(key = %entry.key, %error, "heartbeat unreadable, ignored"),
        }
    }

    /// Follows the bucket until `shutdown`: the watch replays the current records first,
    /// then every change. A watch silent for `stale_after` is re-created (KV watches can
    /// stall after a reconnect, FIELD-NOTES), which costs nothing when it was just idle.
    pub fn follow(&self, store: kv::Store, shutdown: Shutdown) {
        let table = self.clone();
        let stale_after = Some(self.stale_after);
        tokio::spawn(tether_nats::serve::watch_kv(
            store,
            ">".to_string(),
            stale_after,
            shutdown,
            move |entry| table.apply(&entry),
        ));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn hb(id: &str) -> GatewayHeartbeat {
        GatewayHeartbeat {
            id: id.into(),
            ..Default::default()
        }
    }

    #[test]
    fn stale_entries_are_not_live() {
        let table = GatewayTable::new(Duration::from_secs(10));
        let now = Instant::now();
        table.put(hb("fresh"), now);
        if let Some(old) = now.checked_sub(Duration::from_secs(11)) {
            table.put(hb("stale"), old);
        }
        assert_eq!(
            table.with_live(|it| it.map(|h| h.id.clone()).collect::<Vec<_>>()),
            ["fresh"]
        );
        table.remove("fresh");
        assert_eq!(table.live_count(), 0);
    }
}
