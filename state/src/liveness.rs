//! Which gateways are alive, from their heartbeats in `tether_gateways`.
//!
//! A gateway killed with SIGKILL sends no `conn.down`: its devices would stay "online" with
//! routes to nowhere. Every state instance follows the heartbeat bucket; a gateway not
//! heard from for [`GatewayLiveness::dead_after`] (the bucket's TTL) is gone, and the
//! partition owners recycle its devices like disconnected ones (offline after the
//! reconnect window, routes removed, presence offline).

use std::collections::HashMap;
use std::sync::{Arc, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::kv;
use tether_service::Shutdown;
use tokio::time::Instant;

/// Last heartbeat of every gateway seen.
#[derive(Debug)]
pub struct GatewayLiveness {
    seen: RwLock<HashMap<String, Instant>>,
    started: Instant,
    dead_after: Duration,
}

impl GatewayLiveness {
    /// A table where a gateway silent for `dead_after` is gone.
    pub fn new(dead_after: Duration) -> Self {
        GatewayLiveness {
            seen: RwLock::default(),
            started: Instant::now(),
            dead_after,
        }
    }

    /// Follows the heartbeat bucket until `shutdown`.
    pub fn follow(self: &Arc<Self>, bucket: kv::Store, shutdown: Shutdown) {
        let table = self.clone();
        tokio::spawn(tether_nats::serve::watch_kv(
            bucket,
            ">".to_string(),
            Some(self.dead_after),
            shutdown,
            move |entry| table.apply(&entry),
        ));
    }

    fn apply(&self, entry: &kv::Entry) {
        let at = if entry.operation == kv::Operation::Put {
            let age = SystemTime::now()
                .duration_since(SystemTime::from(entry.created))
                .unwrap_or_default();
            Instant::now().checked_sub(age).unwrap_or_else(Instant::now)
        } else {
            // Deleted: the gateway stopped (it said goodbye to its devices first).
            Instant::now()
                .checked_sub(self.dead_after * 2)
                .unwrap_or_else(Instant::now)
        };
        let mut seen = self.seen.write().unwrap_or_else(PoisonError::into_inner);
        let newest = seen.get(&entry.key).is_none_or(|known| *known <= at)
            || entry.operation != kv::Operation::Put;
        if newest {
            seen.insert(entry.key.clone(), at);
        }
    }

    /// Whether gateway `gw` is alive (or this instance started too recently to know).
    pub fn is_alive(&self, gw: &str) -> bool {
        let now = Instant::now();
        match self
            .seen
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(gw)
        {
            Some(at) => now.saturating_duration_since(*at) < self.dead_after,
            None => now.saturating_duration_since(self.started) < self.dead_after,
        }
    }
}
