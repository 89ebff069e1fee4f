//! The session → devices index and room settings, held in memory by every state instance.
//!
//! Partition owners write the index into the `tether_sessions` bucket (`i.<app>.<session>.<did>`)
//! as they apply membership events; every instance watches the bucket and keeps the whole
//! index here, so a session push handled by any instance knows the session's size (for the
//! broadcast threshold) and, for small sessions, its members. A restarted instance rebuilds
//! it from the bucket's history.

use std::collections::{HashMap, HashSet};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{PoisonError, RwLock};

use tokio::sync::Notify;

use async_nats::jetstream::kv;
use tether_nats::keys;
use tether_nats::serve::watch_kv;

use crate::metrics::StateMetrics;
use crate::store::SessionSettings;

type SessionKey = (String, String);

/// The in-memory index.
#[derive(Default)]
pub struct SessionIndex {
    members: RwLock<HashMap<SessionKey, HashSet<String>>>,
    settings: RwLock<HashMap<SessionKey, SessionSettings>>,
    /// Highest bucket revision applied.
    revision: AtomicU64,
    advanced: Notify,
}

impl SessionIndex {
    /// The members of a session (empty if unknown).
    pub fn members(&self, app: &str, session: &str) -> Vec<String> {
        let members = self.members.read().unwrap_or_else(PoisonError::into_inner);
        members
            .get(&(app.to_string(), session.to_string()))
            .map(|set| set.iter().cloned().collect())
            .unwrap_or_default()
    }

    /// How many devices are bound to a session.
    pub fn size(&self, app: &str, session: &str) -> usize {
        let members = self.members.read().unwrap_or_else(PoisonError::into_inner);
        members
            .get(&(app.to_string(), session.to_string()))
            .map_or(0, HashSet::len)
    }

    /// A session's settings (defaults if never configured).
    pub fn settings(&self, app: &str, session: &str) -> SessionSettings {
        let settings = self.settings.read().unwrap_or_else(PoisonError::into_inner);
        settings
            .get(&(app.to_string(), session.to_string()))
            .copied()
            .unwrap_or_default()
    }

    /// Records that the watch applied `revision`.
    fn applied(&self, revision: u64) {
        self.revision.fetch_max(revision, Ordering::AcqRel);
        self.advanced.notify_waiters();
    }

    /// Waits (at most `limit`) until the index holds every write of the bucket up to
    /// `revision`: a session push after a registration or bind then sees its member.
    /// False when the limit passed first.
    pub async fn catch_up(&self, revision: u64, limit: std::time::Duration) -> bool {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let advanced = self.advanced.notified();
            if self.revision.load(Ordering::Acquire) >= revision {
                return true;
            }
            if tokio::time::timeout_at(deadline, advanced).await.is_err() {
                return self.revision.load(Ordering::Acquire) >= revision;
            }
        }
    }

    fn apply_member(&self, key: &str, present: bool) -> Option<bool> {
        // i.<app>.<session>.<did>
        let mut parts = key.splitn(4, '.');
        let (_, app, session, did) = (parts.next(), parts.next()?, parts.next()?, parts.next()?);
        let mut members = self.members.write().unwrap_or_else(PoisonError::into_inner);
        let session_key = (app.to_string(), session.to_string());
        if present {
            Some(
                members
                    .entry(session_key)
                    .or_default()
                    .insert(did.to_string()),
            )
        } else {
            let set = members.get_mut(&session_key)?;
            let removed = set.remove(did);
            if set.is_empty() {
                members.remove(&session_key);
            }
            Some(removed)
        }
    }

    fn apply_settings(&self, key: &str, value: Option<&[u8]>) {
        // s.<app>.<session>
        let mut parts = key.splitn(3, '.');
        let (Some(_), Some(app), Some(session)) = (parts.next(), parts.next(), parts.next()) else {
            return;
        };
        let mut settings = self
            .settings
            .write()
            .unwrap_or_else(PoisonError::into_inner);
        let session_key = (app.to_string(), session.to_string());
        match value.and_then(|v| serde_json::from_slice::<SessionSettings>(v).ok()) {
            Some(value) => {
                settings.insert(session_key, value);
            }
            None => {
                settings.remove(&session_key);
            }
        }
    }
}

/// Watches the bucket and keeps `index` current until `shutdown`; restarts the watch
/// after an error (a NATS reconnect, a leader change). One watch over the whole bucket, so
/// the revision applied can be compared with the bucket's last one ([`SessionIndex::catch_up`]).
pub fn spawn_watchers(
    bucket: kv::Store,
    index: std::sync::Arc<SessionIndex>,
    metrics: StateMetrics,
    shutdown: tether_service::Shutdown,
) {
    // After a restart of a watch the history is replayed: applying an entry twice is
    // harmless (sets).
    tokio::spawn(watch_kv(
        bucket,
        ">".to_string(),
        None,
        shutdown,
        move |entry| {
            let present = entry.operation == kv::Operation::Put;
            if entry.key.starts_with(keys::SESSION_INDEX_PREFIX) {
                match index.apply_member(&entry.key, present) {
                    Some(true) if present => metrics.session_index.inc(),
                    Some(true) => metrics.session_index.dec(),
                    _ => 0,
                };
            } else if entry.key.starts_with(keys::SESSION_SETTINGS_PREFIX) {
                let value = present.then_some(&entry.value[..]);
                index.apply_settings(&entry.key, value);
            }
            index.applied(entry.revision);
        },
    ));
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn members_and_settings_follow_the_keys() {
        let index = SessionIndex::default();
        assert_eq!(index.apply_member("i.demo.room.d1", true), Some(true));
        assert_eq!(index.apply_member("i.demo.room.d2", true), Some(true));
        assert_eq!(index.apply_member("i.demo.room.d1", true), Some(false));
        assert_eq!(index.size("demo", "room"), 2);
        assert_eq!(index.apply_member("i.demo.room.d1", false), Some(true));
        assert_eq!(index.members("demo", "room"), ["d2"]);
        assert_eq!(index.apply_member("i.bad", true), None);
        index.apply_settings("s.demo.room", Some(br#"{"recoverable":true}"#));
        assert!(index.settings("demo", "room").recoverable);
        index.apply_settings("s.demo.room", None);
        assert!(!index.settings("demo", "room").recoverable);
    }
}
