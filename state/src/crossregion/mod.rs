//! Cross-region delivery: pushes for devices routed in another region go on the relay
//! stream (`TETHER_XR_<region>`), and pushes relayed here by other regions are delivered
//! from `TETHER_XR_IN` with the device's per-device sequence (docs/multi-region.md).
//!
//! Finding a device's region: a device with a route in this region is local. Otherwise the
//! peers' route buckets are read across their JetStream domains; the answer is remembered
//! (the directory), so while a link is cut pushes keep going to the region the device was
//! last seen in (they wait in the relay stream until the link returns). A user's devices
//! are this region's list plus each peer's list, remembered the same way.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use async_nats::HeaderMap;
use async_nats::jetstream::{self, kv};
use bytes::Bytes;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::registry::Registry;
use tether_nats::region::Region;
use tether_nats::{headers, keys, layout::ROUTES_BUCKET, subjects};
use tether_schemas::bus::OnlineDevice;

use crate::context::StateCtx;
use crate::store::Route;

mod incoming;
pub use incoming::start;

/// How long a peer whose bucket could not be read is skipped (pushes use the directory).
const PEER_BACKOFF: Duration = Duration::from_secs(2);

/// Counters of cross-region delivery.
#[derive(Clone, Default)]
pub struct RelayMetrics {
    /// Pushes appended to this region's relay stream (one per target device).
    pub relayed_out: Counter,
    /// Relayed pushes stored in a local inbox (or written to a gateway, QoS0).
    pub relayed_in: Counter,
    /// Relayed messages dropped as invalid (wrong subject, region or frame).
    pub relayed_invalid: Counter,
    /// Peer route lookups that failed (link down): the directory answered.
    pub lookup_failures: Counter,
    /// Devices that moved here from another region (`crate::moves`).
    pub moves_in: Counter,
    /// Moves taken on the device's word (the region it left could not be asked).
    pub moves_unverified: Counter,
    /// Messages copied from the inbox of the region a device left.
    pub moved_copied: Counter,
    /// Originals deleted in the region a device left, once it acknowledged their copies.
    pub moved_released: Counter,
}

impl RelayMetrics {
    /// Registers the counters (`tether_state_relay_*`).
    pub fn register(&self, registry: &mut Registry) {
        registry.register(
            "relay_out",
            "pushes appended to the relay stream for other regions",
            self.relayed_out.clone(),
        );
        registry.register(
            "relay_in",
            "relayed pushes delivered in this region",
            self.relayed_in.clone(),
        );
        registry.register(
            "relay_invalid",
            "relayed messages dropped as invalid",
            self.relayed_invalid.clone(),
        );
        registry.register(
            "relay_lookup_failures",
            "peer route lookups that failed",
            self.lookup_failures.clone(),
        );
        registry.register(
            "relay_moves_in",
            "devices that moved here from another region",
            self.moves_in.clone(),
        );
        registry.register(
            "relay_moves_unverified",
            "moves taken on the device's word (its old region could not be asked)",
            self.moves_unverified.clone(),
        );
        registry.register(
            "relay_moved_copied",
            "messages copied from the inbox of the region a device left",
            self.moved_copied.clone(),
        );
        registry.register(
            "relay_moved_released",
            "originals deleted in the region a device left once their copies were acknowledged",
            self.moved_released.clone(),
        );
    }
}

/// `(app, uid)` → the user's devices in other regions, as `(did, region)`.
type UserDirectory = HashMap<(String, String), Vec<(String, String)>>;

/// `(app, uid, region)` → the user's online devices there and when they were read.
type PresenceCache = HashMap<(String, String, String), (Instant, Vec<OnlineDevice>)>;

/// How long a peer's presence answer is used before the peer is asked again.
const PRESENCE_FRESH: Duration = Duration::from_secs(2);
/// Most presence answers remembered (the cache is cleared when it grows past it).
const PRESENCE_CACHE_MAX: usize = 100_000;

/// One peer region and what is known of it.
struct Peer {
    region: Region,
    js: jetstream::Context,
    routes: tokio::sync::Mutex<Option<kv::Store>>,
    down_until: Mutex<Option<Instant>>,
}

/// The cross-region side of one state instance.
pub struct Relay {
    region: String,
    peers: Vec<Peer>,
    lookup_timeout: Duration,
    /// `(app, did)` → region the device was last found routed in.
    devices: Mutex<HashMap<(String, String), String>>,
    /// `(app, uid)` → the user's devices in other regions, with their region.
    users: Mutex<UserDirectory>,
    presence: Mutex<PresenceCache>,
    shutdown: tether_service::Shutdown,
    /// Counters.
    pub metrics: RelayMetrics,
}

/// Where the devices of one push go.
#[derive(Debug, Default)]
pub struct Split {
    /// Devices delivered in this region.
    pub local: Vec<String>,
    /// Devices relayed, with their region.
    pub remote: Vec<(String, String)>,
}

impl Relay {
    /// The relay of region `region` towards `peers`, reading their buckets through
    /// `client`; its background tasks stop with `shutdown`.
    pub fn new(
        client: &async_nats::Client,
        region: &str,
        peers: &[Region],
        lookup_timeout: Duration,
        metrics: RelayMetrics,
        shutdown: tether_service::Shutdown,
    ) -> Self {
        let peers = peers
            .iter()
            .map(|region| Peer {
                js: jetstream::with_domain(client.clone(), &region.domain),
                region: region.clone(),
                routes: tokio::sync::Mutex::new(None),
                down_until: Mutex::new(None),
            })
            .collect();
        Self {
            region: region.to_string(),
            peers,
            lookup_timeout,
            devices: Mutex::default(),
            users: Mutex::default(),
            presence: Mutex::default(),
            shutdown,
            metrics,
        }
    }

    /// The peer regions.
    pub fn peers(&self) -> impl Iterator<Item = &Region> {
        self.peers.iter().map(|peer| &peer.region)
    }

    /// How long one question to a peer may take.
    pub fn lookup_timeout(&self) -> Duration {
        self.lookup_timeout
    }

    /// The role's shutdown signal.
    pub fn shutdown(&self) -> tether_service::Shutdown {
        self.shutdown.clone()
    }

    /// This region's name.
    pub fn region(&self) -> &str {
        &self.region
    }

    /// Splits the targets of a push: `dids` (named devices and this region's devices of the
    /// users) stay local when routed here; the others, and the users' devices in peer
    /// regions, go to the region they are routed in (or were last seen in). A device found
    /// nowhere stays local (stored in this region's inbox).
    pub async fn split(
        &self,
        ctx: &StateCtx,
        app: &str,
        dids: Vec<String>,
        uids: &[String],
    ) -> Result<Split, String> {
        let mut split = Split::default();
        for did in dids {
            if ctx
                .store
                .route(app, &did)
                .await
                .map_err(|e| e.to_string())?
                .is_some()
            {
                split.local.push(did);
                continue;
            }
            match self.device_region(app, &did).await {
                Some(region) => split.remote.push((did, region)),
                None => split.local.push(did),
            }
        }
        for uid in uids {
            for (did, region) in self.user_devices_elsewhere(app, uid).await {
                if !split.local.contains(&did) && !split.remote.iter().any(|(d, _)| *d == did) {
                    split.remote.push((did, region));
                }
            }
        }
        Ok(split)
    }

    /// Appends one push for `did` of `app` in `target` to this region's relay stream and
    /// waits for the stream's acknowledgement.
    pub async fn relay(
        &self,
        ctx: &StateCtx,
        app: &str,
        did: &str,
        target: &str,
        relay_id: &str,
        frame: Bytes,
    ) -> Result<(), String> {
        let mut map = HeaderMap::new();
        map.insert(headers::RELAY_ID, relay_id);
        map.insert(headers::MSG_ID, relay_id);
        let ack = ctx
            .js
            .publish_with_headers(subjects::relay(&self.region, target, app, did), map, frame)
            .await
            .map_err(|e| e.to_string())?;
        ack.await.map_err(|e| e.to_string())?;
        self.metrics.relayed_out.inc();
        Ok(())
    }

    /// The region `did` is routed in, asking the peers (or, when they cannot be asked,
    /// the region it was last found in).
    async fn device_region(&self, app: &str, did: &str) -> Option<String> {
        let cache_key = (app.to_string(), did.to_string());
        let mut asked_all = true;
        for peer in &self.peers {
            match self.read_peer(peer, &keys::route(app, did)).await {
                Some(Some(value)) => {
                    if serde_json::from_slice::<Route>(&value).is_ok() {
                        self.lock_devices()
                            .insert(cache_key, peer.region.name.clone());
                        return Some(peer.region.name.clone());
                    }
                }
                Some(None) => {}
                None => asked_all = false,
            }
        }
        let mut devices = self.lock_devices();
        if asked_all {
            // Routed nowhere now: offline; it is stored here.
            devices.remove(&cache_key);
            return None;
        }
        devices.get(&cache_key).cloned()
    }

    /// The devices of `uid` in peer regions, with their region.
    async fn user_devices_elsewhere(&self, app: &str, uid: &str) -> Vec<(String, String)> {
        let cache_key = (app.to_string(), uid.to_string());
        let cached = self
            .lock_users()
            .get(&cache_key)
            .cloned()
            .unwrap_or_default();
        let mut found = Vec::new();
        for peer in &self.peers {
            match self.read_peer(peer, &keys::user(app, uid)).await {
                Some(Some(value)) => {
                    let dids: Vec<String> = serde_json::from_slice(&value).unwrap_or_default();
                    found.extend(dids.into_iter().map(|d| (d, peer.region.name.clone())));
                }
                Some(None) => {}
                None => found.extend(
                    cached
                        .iter()
                        .filter(|(_, region)| *region == peer.region.name)
                        .cloned(),
                ),
            }
        }
        self.lock_users().insert(cache_key, found.clone());
        found
    }

    /// The acknowledged sequence of `did` in peer region `region` (its cursor there);
    /// `None` when it has none or the peer cannot be asked.
    pub async fn peer_acked(&self, region: &str, app: &str, did: &str) -> Option<u64> {
        let peer = self.peers.iter().find(|p| p.region.name == region)?;
        let value = self.read_peer(peer, &keys::cursor(app, did)).await??;
        serde_json::from_slice::<crate::store::Cursor>(&value)
            .ok()
            .map(|cursor| cursor.acked)
    }

    /// The online devices of `uid` in the peer regions (their route buckets, answers
    /// reused for [`PRESENCE_FRESH`]), and the peers that could not be asked (their
    /// last answer, if any, is used).
    pub async fn online_elsewhere(&self, app: &str, uid: &str) -> (Vec<OnlineDevice>, Vec<String>) {
        let mut online = Vec::new();
        let mut unanswered = Vec::new();
        for peer in &self.peers {
            let key = (app.to_string(), uid.to_string(), peer.region.name.clone());
            let cached = self.lock_presence().get(&key).cloned();
            if let Some((at, devices)) = &cached
                && at.elapsed() < PRESENCE_FRESH
            {
                online.extend(devices.iter().cloned());
                continue;
            }
            match self.peer_online(peer, app, uid).await {
                Some(devices) => {
                    online.extend(devices.iter().cloned());
                    let mut cache = self.lock_presence();
                    if cache.len() >= PRESENCE_CACHE_MAX {
                        cache.clear();
                    }
                    cache.insert(key, (Instant::now(), devices));
                }
                None => {
                    unanswered.push(peer.region.name.clone());
                    online.extend(cached.into_iter().flat_map(|(_, devices)| devices));
                }
            }
        }
        (online, unanswered)
    }

    /// The online devices of `uid` in `peer`, or `None` when it could not be asked.
    async fn peer_online(&self, peer: &Peer, app: &str, uid: &str) -> Option<Vec<OnlineDevice>> {
        let Some(list) = self.read_peer(peer, &keys::user(app, uid)).await? else {
            return Some(Vec::new());
        };
        let dids: Vec<String> = serde_json::from_slice(&list).unwrap_or_default();
        let mut online = Vec::new();
        for did in dids {
            let value = self.read_peer(peer, &keys::route(app, &did)).await?;
            if let Some(route) = value.and_then(|v| serde_json::from_slice::<Route>(&v).ok()) {
                online.push(OnlineDevice {
                    did,
                    region: peer.region.name.clone(),
                    gw: route.gw,
                });
            }
        }
        Some(online)
    }

    /// Reads `key` of a peer's route bucket: `Some(value)` when the peer answered (the
    /// value `None` when the key is absent), `None` when it could not be asked.
    async fn read_peer(&self, peer: &Peer, key: &str) -> Option<Option<Bytes>> {
        if peer
            .down_until
            .lock()
            .ok()
            .and_then(|d| *d)
            .is_some_and(|until| Instant::now() < until)
        {
            return None;
        }
        let read = async {
            let mut routes = peer.routes.lock().await;
            if routes.is_none() {
                *routes = Some(
                    peer.js
                        .get_key_value(ROUTES_BUCKET)
                        .await
                        .map_err(|e| e.to_string())?,
                );
            }
            let store = routes.clone().ok_or_else(|| "no bucket".to_string())?;
            drop(routes);
            store.get(key).await.map_err(|e| e.to_string())
        };
        match tokio::time::timeout(self.lookup_timeout, read).await {
            Ok(Ok(value)) => Some(value),
            Ok(Err(error)) => {
                self.peer_down(peer, &error);
                None
            }
            Err(_) => {
                self.peer_down(peer, "timed out");
                None
            }
        }
    }

    fn peer_down(&self, peer: &Peer, error: &str) {
        self.metrics.lookup_failures.inc();
        tracing::warn!(region = %peer.region.name, %error, "peer region route lookup failed; using the directory");
        if let Ok(mut until) = peer.down_until.lock() {
            *until = Some(Instant::now() + PEER_BACKOFF);
        }
    }

    fn lock_devices(&self) -> std::sync::MutexGuard<'_, HashMap<(String, String), String>> {
        self.devices.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_users(&self) -> std::sync::MutexGuard<'_, UserDirectory> {
        self.users.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_presence(&self) -> std::sync::MutexGuard<'_, PresenceCache> {
        self.presence.lock().unwrap_or_else(|p| p.into_inner())
    }
}

/// A fresh relay id for a push without id: region, time and a counter.
pub fn fresh_relay_id(region: &str, app: &str, did: &str) -> String {
    use std::sync::atomic::{AtomicU64, Ordering};
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!(
        "{app}:xr-{region}-{:x}-{:08x}-{n}:{did}",
        tether_schemas::bus::unix_now_ms(),
        rand::random::<u32>()
    )
}
