//! Which device is on which connection: `(app, did) → connection`, sharded by did, plus
//! per-app connection counts for the per-app limit.
//!
//! A device's entry is the connection pointer alone (8 bytes in a hash set): the set is
//! keyed by the device id the connection's identity already holds (see [`ByDid`]).

// `ByDid` holds a connection, which has interior mutability, but its hash and equality
// read only the identity's device id, set once before it is ever a key and never changed.
#![allow(clippy::mutable_key_type)]

use std::borrow::Borrow;
use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, Hash, Hasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use crate::conn::ConnShared;

const SHARDS: usize = 64;

/// A logged-in connection as a set member, hashed and compared by its device id (so a
/// set of them is a map from device id to connection without storing the id again).
/// Only made for connections with an identity, which never changes once set.
struct ByDid(Arc<ConnShared>);

impl ByDid {
    fn did(&self) -> &str {
        self.0.identity().map_or("", |id| id.did())
    }
}

impl Borrow<str> for ByDid {
    fn borrow(&self) -> &str {
        self.did()
    }
}

impl Hash for ByDid {
    fn hash<H: Hasher>(&self, state: &mut H) {
        // The same as `str`'s hash, as `Borrow<str>` requires.
        self.did().hash(state);
    }
}

impl PartialEq for ByDid {
    fn eq(&self, other: &Self) -> bool {
        self.did() == other.did()
    }
}

impl Eq for ByDid {}

type AppMap = HashMap<Arc<str>, HashSet<ByDid>>;

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
    pub fn reserve_app(&self, app: &str, limit: usize) -> bool {
        let mut counts = self.per_app.lock().unwrap_or_else(PoisonError::into_inner);
        let count = match counts.get_mut(app) {
            Some(count) => count,
            None => counts.entry(Arc::from(app)).or_insert(0),
        };
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
        let (app, did) = (identity.app(), identity.did());
        let mut shard = self.shard(did);
        let devices = match shard.get_mut(app) {
            Some(devices) => devices,
            None => shard.entry(Arc::from(app)).or_default(),
        };
        devices.replace(ByDid(conn)).map(|old| old.0)
    }

    /// Removes `conn` if it is still the connection registered for its device.
    pub fn remove(&self, conn: &ConnShared) -> bool {
        let Some(identity) = conn.identity() else {
            return false;
        };
        let (app, did) = (identity.app(), identity.did());
        let mut shard = self.shard(did);
        let Some(devices) = shard.get_mut(app) else {
            return false;
        };
        if devices.get(did).is_some_and(|c| c.0.id == conn.id) {
            devices.remove(did);
            if devices.is_empty() {
                shard.remove(app);
            }
            return true;
        }
        false
    }

    /// The connection of `did` in `app`.
    pub fn get(&self, app: &str, did: &str) -> Option<Arc<ConnShared>> {
        self.shard(did).get(app)?.get(did).map(|c| c.0.clone())
    }

    /// Every connection of `app`.
    pub fn app_connections(&self, app: &str) -> Vec<Arc<ConnShared>> {
        let mut found = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            if let Some(devices) = shard.get(app) {
                found.extend(devices.iter().map(|c| c.0.clone()));
            }
        }
        found
    }

    /// Calls `f` with every registered connection (each shard locked in turn: `f` must
    /// not use the registry).
    pub fn for_each(&self, mut f: impl FnMut(&Arc<ConnShared>)) {
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            for devices in shard.values() {
                devices.iter().for_each(|c| f(&c.0));
            }
        }
    }

    /// Every registered connection.
    pub fn all(&self) -> Vec<Arc<ConnShared>> {
        let mut found = Vec::new();
        for shard in self.shards.iter() {
            let shard = shard.lock().unwrap_or_else(PoisonError::into_inner);
            found.extend(
                shard
                    .values()
                    .flat_map(|devices| devices.iter().map(|c| c.0.clone())),
            );
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
                    .map(HashSet::len)
                    .sum::<usize>()
            })
            .sum()
    }

    /// Whether no connection is registered.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::app_traffic::AppCounters;
    use crate::conn::{Identity, Transport};

    fn logged_in(id: u64, app: &str, did: &str) -> Arc<ConnShared> {
        let conn = Arc::new(ConnShared::new(id, 0));
        conn.set_identity(Identity::new(
            Arc::new(AppCounters::new(app.into())),
            "user",
            did,
            true,
            tether_auth::Rights::default(),
            Transport::Tcp,
        ));
        conn
    }

    #[test]
    fn one_connection_per_device_and_app() {
        let registry = Registry::default();
        assert!(registry.insert(Arc::new(ConnShared::new(9, 0))).is_none());
        assert!(
            registry.is_empty(),
            "a connection without identity is not registered"
        );
        let first = logged_in(1, "a", "d1");
        assert!(registry.insert(first.clone()).is_none());
        assert!(registry.insert(logged_in(2, "a", "d2")).is_none());
        assert!(registry.insert(logged_in(3, "b", "d1")).is_none());
        assert_eq!(registry.len(), 3);
        assert_eq!(registry.get("a", "d1").map(|c| c.id), Some(1));
        assert_eq!(registry.get("b", "d1").map(|c| c.id), Some(3));
        assert!(registry.get("a", "d3").is_none());
        assert!(registry.get("c", "d1").is_none());

        let second = logged_in(4, "a", "d1");
        let replaced = registry.insert(second.clone());
        assert_eq!(
            replaced.map(|c| c.id),
            Some(1),
            "the old connection is returned"
        );
        assert_eq!(registry.get("a", "d1").map(|c| c.id), Some(4));
        assert!(
            !registry.remove(&first),
            "only the current connection is removed"
        );
        assert_eq!(registry.get("a", "d1").map(|c| c.id), Some(4));
        let mut of_a: Vec<u64> = registry.app_connections("a").iter().map(|c| c.id).collect();
        of_a.sort_unstable();
        assert_eq!(of_a, [2, 4]);
        assert!(registry.remove(&second));
        assert!(registry.get("a", "d1").is_none());
        assert_eq!(registry.all().len(), 2);
    }

    #[test]
    fn per_app_slots() {
        let registry = Registry::default();
        assert!(registry.reserve_app("a", 2));
        assert!(registry.reserve_app("a", 2));
        assert!(!registry.reserve_app("a", 2));
        assert!(registry.reserve_app("b", 0));
        registry.release_app("a");
        assert!(registry.reserve_app("a", 2));
        assert_eq!(registry.app_counts().get("a"), Some(&2));
    }
}
