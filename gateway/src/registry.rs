//! Which device is on which connection: `(app, did) → connection`, sharded by did, plus
//! per-app connection counts for the per-app limit.

use std::collections::HashMap;
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::conn::ConnShared;

const SHARDS: usize = 64;

type AppMap = HashMap<Arc<str>, HashMap<Arc<str>, Arc<ConnShared>>>;

/// The in-memory index of logged-in connections.
pub struct Registry {
    shards: Box<[Mutex<AppMap>]>,
    per_app: Mutex<HashMap<Arc<str>, usize>>,
    hasher: RandomState,
}

impl Default for Registry {
    fn default() -> Self {
        Self {
            shards: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            per_app: Mutex::new(HashMap::new()),
            hasher: RandomState::new(),
        }
    }
}

impl Registry {
    fn shard(&self, did: &str) -> MutexGuard<'_, AppMap> {
        let index = (self.hasher.hash_one(did) as usize) % SHARDS;
        self.shards[index]
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Reserves a slot for `app` under `limit` (0 = no limit); false when full.
    pub fn reserve_app(&self, app: &Arc<str>, limit: usize) -> bool {
        let mut counts = self.per_app.lock().unwrap_or_else(PoisonError::into_inner);
        let count = counts.entry(app.clone()).or_insert(0);
        if limit != 0 && *count >= limit {
            return false;
        }
        *count += 1;
        true
    }

    /// Logged-in (or logging-in) connections per app, for the heartbeat.
    pub fn app_counts(&self) -> std::collections::BTreeMap<String, u64> {
        let counts = self.per_app.lock().unwrap_or_else(PoisonError::into_inner);
        counts
            .iter()
            .map(|(app, n)| (app.to_string(), *n as u64))
            .collect()
    }

    /// Gives back a slot taken by [`Registry::reserve_app`].
    pub fn release_app(&self, app: &str) {
        let mut counts = self.per_app.lock().unwrap_or_else(PoisonError::into_inner);
        if let Some(count) = counts.get_mut(app) {
            *count = count.saturating_sub(1);
            if *count == 0 {
                counts.remove(app);
            }
        }
    }

    /// Registers a logged-in connection; returns the connection it replaces, if any.
    pub fn insert(&self, conn: Arc<ConnShared>) -> Option<Arc<ConnShared>> {
        let identity = conn.identity()?;
        let (app, did) = (identity.app.clone(), identity.did.clone());
        self.shard(&did).entry(app).or_default().insert(did, conn)
    }

    /// Removes `conn` if it is still the connection registered for its device.
    pub fn remove(&self, conn: &ConnShared) -> bool {
        let Some(identity) = conn.identity() else {
            return false;
        };
        let mut shard = self.shard(&identity.did);
        let Some(devices) = shard.get_mut(&*identity.app) else {
            return false;
        };
        if devices.get(&*identity.did).is_some_and(|c| c.id == conn.id) {
            devices.remove(&*identity.did);
            if devices.is_empty() {
                shard.remove(&*identity.app);
            }
            return true;
        }
        false
    }

    /// The connection of `did` in `app`.
    pub fn get(&self, app: &str, did: &str) -> Option<Arc<ConnShared>> {
        self.shard(did).get(app)?.get(did).cloned()
    }

    /// Every connection of `app`.
    pub fn app_connections(&self, app: &str) -> Vec<Arc<ConnShared>> {
        let mut found = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(devices) = shard.get(app) {
                found.extend(devices.values().cloned());
            }
        }
        found
    }

    /// Every registered connection.
    pub fn all(&self) -> Vec<Arc<ConnShared>> {
        let mut found = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            found.extend(shard.values().flat_map(|devices| devices.values().cloned()));
        }
        found
    }

    /// Number of registered connections.
    pub fn len(&self) -> usize {
        self.shards
            .iter()
            .map(|s| {
                s.lock()
                    .unwrap_or_else(PoisonError::into_inner)
                    .values()
                    .map(HashMap::len)
                    .sum::<usize>()
            })
            .sum()
    }

    /// Whether no connection is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
