//! Which gateways are alive, from their heartbeats in `tether_gateways`.
//!
//! A gateway killed with SIGKILL sends no `conn.down`: its devices would stay "online" with
//! routes to nowhere. Every state instance follows the heartbeat bucket; a gateway not
//! heard from for the bucket's TTL is gone, and the partition owners recycle its devices
//! like disconnected ones (offline after the reconnect window, routes removed, presence
//! offline).
//!
//! Silence of the watch is not silence of the gateway: a watch can stall when its NATS
//! node dies (the heartbeats go on, this instance just stops hearing them), and recycling
//! on that would strand every connected device without a route. So a gateway is declared
//! gone only after an authoritative read of its heartbeat record finds nothing newer than
//! the TTL; a read that fails leaves it alive (unknown is not dead).

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, PoisonError, RwLock};
use std::time::{Duration, SystemTime};

use async_nats::jetstream::kv;
use tether_service::Shutdown;
use tokio::time::Instant;

/// How often heartbeat records of silent gateways are read to confirm they are gone.
const VERIFY_EVERY: Duration = Duration::from_secs(1);

/// What this instance knows of one gateway.
#[derive(Debug, Clone, Copy)]
struct Seen {
    /// Its newest heartbeat (or the moment its record was deleted, pushed into the past).
    at: Instant,
    /// The last read of its record that found nothing newer than `at`.
    verified_silent: Option<Instant>,
}

/// Last heartbeat of every gateway seen.
#[derive(Debug)]
pub struct GatewayLiveness {
    seen: RwLock<HashMap<String, Seen>>,
    /// Gateways asked about (routes name them) but never seen in the bucket.
    unknown: Mutex<HashSet<String>>,
    started: Instant,
    dead_after: Duration,
}

impl GatewayLiveness {
    /// A table where a gateway silent for `dead_after` is gone.
    pub fn new(dead_after: Duration) -> Self {
        GatewayLiveness {
            seen: RwLock::default(),
            unknown: Mutex::default(),
            started: Instant::now(),
            dead_after,
        }
    }

    /// Follows the heartbeat bucket until `shutdown`, and confirms every second, by reading
    /// their records, which silent gateways are really gone.
    pub fn follow(self: &Arc<Self>, bucket: kv::Store, shutdown: Shutdown) {
        let table = self.clone();
        tokio::spawn(tether_nats::serve::watch_kv(
            bucket.clone(),
            ">".to_string(),
            // Heartbeats come every second: a watch silent for a third of the TTL stalled.
            Some(self.dead_after / 3),
            shutdown.clone(),
            move |entry| table.apply(&entry),
        ));
        let table = self.clone();
        tokio::spawn(async move {
            let mut every = tokio::time::interval(VERIFY_EVERY);
            loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = every.tick() => table.verify(&bucket).await,
                }
            }
        });
    }

    /// Reads the record of every gateway that looks silent (and of every gateway asked
    /// about but never seen): a newer heartbeat revives it, a missing or old one confirms
    /// it gone, a failed read changes nothing.
    pub async fn verify(&self, bucket: &kv::Store) {
        let now = Instant::now();
        let mut suspects: Vec<String> = self
            .seen
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .iter()
            .filter(|(_, seen)| {
                now.saturating_duration_since(seen.at) >= self.dead_after
                    && seen
                        .verified_silent
                        .is_none_or(|v| v < seen.at + self.dead_after)
            })
            .map(|(gw, _)| gw.clone())
            .collect();
        suspects.extend(
            self.unknown
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .drain(),
        );
        for gw in suspects {
            let read_at = Instant::now();
            let newest = match bucket.entry(gw.as_str()).await {
                Ok(Some(entry)) if entry.operation == kv::Operation::Put => Some(heard_at(&entry)),
                Ok(_) => None,
                Err(error) => {
                    tracing::debug!(gw, %error, "heartbeat record not readable; gateway kept alive");
                    continue;
                }
            };
            let mut table = self.seen.write().unwrap_or_else(PoisonError::into_inner);
            let seen = table.entry(gw.clone()).or_insert(Seen {
                at: read_at.checked_sub(self.dead_after * 2).unwrap_or(read_at),
                verified_silent: None,
            });
            if let Some(at) = newest
                && at > seen.at
            {
                seen.at = at;
            }
            seen.verified_silent = Some(read_at);
            if read_at.saturating_duration_since(seen.at) >= self.dead_after {
                tracing::info!(
                    gw,
                    "gateway heartbeat expired (record checked): gateway gone"
                );
            }
        }
    }

    fn apply(&self, entry: &kv::Entry) {
        let at = if entry.operation == kv::Operation::Put {
            heard_at(entry)
        } else {
            // Deleted: the gateway stopped (it said goodbye to its devices first).
            Instant::now()
                .checked_sub(self.dead_after * 2)
                .unwrap_or_else(Instant::now)
        };
        let mut table = self.seen.write().unwrap_or_else(PoisonError::into_inner);
        match table.get_mut(&entry.key) {
            Some(seen) if entry.operation != kv::Operation::Put || seen.at <= at => {
                seen.at = at;
            }
            Some(_) => {}
            None => {
                table.insert(
                    entry.key.clone(),
                    Seen {
                        at,
                        verified_silent: None,
                    },
                );
            }
        }
    }

    /// Whether gateway `gw` is alive: heard from within the TTL, or not yet confirmed gone
    /// by a read of its record (or this instance started too recently to know).
    pub fn is_alive(&self, gw: &str) -> bool {
        let now = Instant::now();
        let known = self
            .seen
            .read()
            .unwrap_or_else(PoisonError::into_inner)
            .get(gw)
            .copied();
        match known {
            Some(seen) => {
                now.saturating_duration_since(seen.at) < self.dead_after
                    || seen
                        .verified_silent
                        .is_none_or(|v| v.saturating_duration_since(seen.at) < self.dead_after)
            }
            None => {
                if now.saturating_duration_since(self.started) >= self.dead_after {
                    self.unknown
                        .lock()
                        .unwrap_or_else(PoisonError::into_inner)
                        .insert(gw.to_string());
                }
                true
            }
        }
    }
}

/// When the heartbeat in `entry` was written, on this process's clock.
fn heard_at(entry: &kv::Entry) -> Instant {
    let age = SystemTime::now()
        .duration_since(SystemTime::from(entry.created))
        .unwrap_or_default();
    Instant::now().checked_sub(age).unwrap_or_else(Instant::now)
}
