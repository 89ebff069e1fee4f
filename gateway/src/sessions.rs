//! The gateway's session index: session → its local members, in memory.
//!
//! A device joins sessions at login (the token's `sess` claim) and whenever state sends
//! its complete set on `tether.gw.<gw>.ctl`; it leaves them all when its connection goes.
//! A session broadcast then costs one lookup and one queue push per local member, with the
//! frame encoded once and shared.
//!
//! Recoverable rooms: a device that gave a room cursor at LOGIN is first a *recovering*
//! member of that room: live broadcasts for it are held back while [`crate::rooms`]
//! replays what it missed from the room stream, then released in order.

use std::collections::{HashMap, HashSet};
use std::hash::{BuildHasher, RandomState};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};

use bytes::Bytes;

use crate::conn::{ConnShared, Enqueued};

const SHARDS: usize = 64;
/// Live broadcasts held for one recovering member at most (older ones are dropped and the
/// client recovers them on its next reconnect).
const MAX_BACKLOG: usize = 10_000;

type Key = (Arc<str>, Arc<str>);
/// One shard of the rooms: (app, session) → did → member.
type RoomShard = HashMap<Key, HashMap<Arc<str>, Member>>;

/// One local member of a session.
struct Member {
    conn: Arc<ConnShared>,
    /// `Some` while the room history is being replayed: live frames with their room seq.
    backlog: Option<Vec<(u64, Bytes)>>,
}

/// What a device holds: its sessions, and the room cursors it sent at LOGIN that no join
/// has used yet.
#[derive(Default)]
struct DeviceRooms {
    sessions: HashSet<Arc<str>>,
    cursors: HashMap<Arc<str>, u64>,
}

/// A replay to start: the device joined a room it gave a cursor for.
#[derive(Debug, Clone)]
pub struct Recovery {
    /// App id.
    pub app: Arc<str>,
    /// Device id.
    pub did: Arc<str>,
    /// Room (session) id.
    pub session: Arc<str>,
    /// The highest room sequence the device has; replay starts after it.
    pub after: u64,
    /// The connection to replay to.
    pub conn: Arc<ConnShared>,
}

/// Counts of one delivery.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Delivered {
    /// Frames queued to connections.
    pub queued: usize,
    /// QoS0 frames dropped on full queues.
    pub dropped: usize,
    /// Frames held for recovering members.
    pub held: usize,
}

/// The index.
pub struct Sessions {
    rooms: Box<[Mutex<RoomShard>]>,
    devices: Mutex<HashMap<Key, DeviceRooms>>,
    hasher: RandomState,
}

impl Default for Sessions {
    fn default() -> Self {
        Self {
            rooms: (0..SHARDS).map(|_| Mutex::new(HashMap::new())).collect(),
            devices: Mutex::new(HashMap::new()),
            hasher: RandomState::new(),
        }
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

/// The `devices` key of a device (connections hold their ids in one string of their own,
/// so the index makes its `Arc`s when a device first joins).
fn key(app: &str, did: &str) -> Key {
    (Arc::from(app), Arc::from(did))
}

impl Sessions {
    fn shard(&self, app: &str, session: &str) -> MutexGuard<'_, RoomShard> {
        let index = (self.hasher.hash_one((app, session)) as usize) % SHARDS;
        lock(&self.rooms[index])
    }

    /// A device logged in on `conn`: remembers its room cursors and joins the token's
    /// sessions. Returns the replays to start.
    pub fn login(
        &self,
        conn: &Arc<ConnShared>,
        app: &str,
        did: &str,
        sessions: &[String],
        cursors: &[(String, u64)],
    ) -> Vec<Recovery> {
        let mut all: Vec<String> = sessions.to_vec();
        {
            let mut devices = lock(&self.devices);
            let device = devices.entry(key(app, did)).or_default();
            device.cursors = cursors
                .iter()
                .filter(|(session, _)| !session.is_empty())
                .map(|(session, seq)| (Arc::from(session.as_str()), *seq))
                .collect();
            // A device logging in again here (its old connection replaced) keeps its
            // sessions, now on the new connection.
            all.extend(device.sessions.iter().map(|s| s.to_string()));
        }
        all.sort();
        all.dedup();
        self.join(conn, app, did, &all)
    }

    /// Adds the device to `sessions` (keeping the ones it has). A member already present
    /// is moved to `conn` (a new connection of the same device).
    pub fn join(
        &self,
        conn: &Arc<ConnShared>,
        app: &str,
        did: &str,
        sessions: &[String],
    ) -> Vec<Recovery> {
        let mut recoveries = Vec::new();
        let mut joined = Vec::with_capacity(sessions.len());
        // The device's key in `devices` (an existing one is reused): its members share it.
        let (app, did) = {
            let mut devices = lock(&self.devices);
            let entry = devices.entry(key(app, did));
            let ids = entry.key().clone();
            let device = entry.or_default();
            for session in sessions {
                let session: Arc<str> = Arc::from(session.as_str());
                device.sessions.insert(session.clone());
                let after = device.cursors.remove(&session);
                joined.push((session, after));
            }
            ids
        };
        for (session, after) in joined {
            let mut shard = self.shard(&app, &session);
            let members = shard.entry((app.clone(), session.clone())).or_default();
            let member = members.entry(did.clone()).or_insert_with(|| Member {
                conn: conn.clone(),
                backlog: None,
            });
            member.conn = conn.clone();
            if let Some(after) = after {
                member.backlog.get_or_insert_with(Vec::new);
                recoveries.push(Recovery {
                    app: app.clone(),
                    did: did.clone(),
                    session,
                    after,
                    conn: conn.clone(),
                });
            }
        }
        recoveries
    }

    /// Makes the device's sessions exactly `sessions` (state's complete set).
    pub fn set(
        &self,
        conn: &Arc<ConnShared>,
        app: &str,
        did: &str,
        sessions: &[String],
    ) -> Vec<Recovery> {
        let wanted: HashSet<&str> = sessions.iter().map(String::as_str).collect();
        let leaving: Vec<Arc<str>> = lock(&self.devices)
            .entry(key(app, did))
            .or_default()
            .sessions
            .extract_if(|s| !wanted.contains(&**s))
            .collect();
        if !leaving.is_empty() {
            let app: Arc<str> = app.into();
            for session in leaving {
                self.remove_member(&app, &session, did);
            }
        }
        // Joining a session the device is in already just points it at `conn`.
        self.join(conn, app, did, sessions)
    }

    /// The sessions the device is a member of here.
    pub fn sessions_of(&self, app: &str, did: &str) -> Vec<String> {
        let devices = lock(&self.devices);
        if devices.is_empty() {
            return Vec::new();
        }
        devices
            .get(&key(app, did))
            .map(|device| device.sessions.iter().map(|s| s.to_string()).collect())
            .unwrap_or_default()
    }

    /// Whether the device has sessions or pending cursors here.
    pub fn knows(&self, app: &str, did: &str) -> bool {
        let devices = lock(&self.devices);
        !devices.is_empty() && devices.contains_key(&key(app, did))
    }

    /// The device's connection is gone: it leaves every session.
    pub fn leave_device(&self, app: &str, did: &str) {
        let device = {
            let mut devices = lock(&self.devices);
            if devices.is_empty() {
                return;
            }
            devices.remove(&key(app, did))
        };
        if let Some(device) = device {
            let app: Arc<str> = app.into();
            for session in device.sessions {
                self.remove_member(&app, &session, did);
            }
        }
    }

    fn remove_member(&self, app: &Arc<str>, session: &Arc<str>, did: &str) {
        let mut shard = self.shard(app, session);
        let key = (app.clone(), session.clone());
        if let Some(members) = shard.get_mut(&key) {
            members.remove(did);
            if members.is_empty() {
                shard.remove(&key);
            }
        }
    }

    /// Delivers `frame` to the local members of a session, or only to those in `only`
    /// when given. `room_seq` > 0 marks a recoverable room broadcast: recovering members
    /// hold it until their replay is done.
    pub fn deliver(
        &self,
        app: &str,
        session: &str,
        frame: &Bytes,
        room_seq: u64,
        only: Option<&HashSet<&str>>,
        queue_limit: usize,
    ) -> Delivered {
        let mut delivered = Delivered::default();
        let mut shard = self.shard(app, session);
        let Some(members) = shard.get_mut(&(Arc::from(app), Arc::from(session))) else {
            return delivered;
        };
        for (did, member) in members.iter_mut() {
            if only.is_some_and(|only| !only.contains(&**did)) {
                continue;
            }
            if let Some(backlog) = member.backlog.as_mut() {
                if room_seq > 0 && backlog.len() < MAX_BACKLOG {
                    backlog.push((room_seq, frame.clone()));
                    delivered.held += 1;
                }
                continue;
            }
            match member.conn.push(frame.clone(), false, queue_limit) {
                Enqueued::Queued => delivered.queued += 1,
                Enqueued::DroppedQos0 => delivered.dropped += 1,
                Enqueued::Overflow | Enqueued::Closing => {}
            }
        }
        delivered
    }

    /// Ends a member's recovery: returns the live frames held meanwhile with a room
    /// sequence above `replayed` (in order), and delivers live from now on.
    pub fn finish_recovery(&self, recovery: &Recovery, replayed: u64) -> Vec<Bytes> {
        let mut shard = self.shard(&recovery.app, &recovery.session);
        let member = shard
            .get_mut(&(recovery.app.clone(), recovery.session.clone()))
            .and_then(|members| members.get_mut(&recovery.did));
        let Some(member) = member else {
            return Vec::new();
        };
        let mut held = member.backlog.take().unwrap_or_default();
        held.sort_by_key(|(seq, _)| *seq);
        held.dedup_by_key(|(seq, _)| *seq);
        held.into_iter()
            .filter(|(seq, _)| *seq > replayed)
            .map(|(_, frame)| frame)
            .collect()
    }

    /// Local members of a session.
    pub fn members(&self, app: &str, session: &str) -> usize {
        self.shard(app, session)
            .get(&(Arc::from(app), Arc::from(session)))
            .map_or(0, HashMap::len)
    }

    /// Sessions with at least one local member.
    pub fn len(&self) -> usize {
        self.rooms.iter().map(|shard| lock(shard).len()).sum()
    }

    /// Whether no session has a local member.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn(id: u64) -> Arc<ConnShared> {
        Arc::new(ConnShared::new(id, 0))
    }

    #[test]
    fn join_set_leave_and_deliver() {
        let sessions = Sessions::default();
        let (app, a) = ("demo", "a");
        let (_, b) = ("demo", "b");
        let (ca, cb) = (conn(1), conn(2));
        assert!(sessions.login(&ca, app, a, &["r1".into()], &[]).is_empty());
        sessions.set(&cb, app, b, &["r1".into(), "r2".into()]);
        assert_eq!(sessions.members("demo", "r1"), 2);
        assert_eq!(sessions.members("demo", "r2"), 1);
        let frame = Bytes::from_static(b"x");
        let delivered = sessions.deliver("demo", "r1", &frame, 0, None, 8);
        assert_eq!(delivered.queued, 2);
        let only: HashSet<&str> = ["b"].into();
        let delivered = sessions.deliver("demo", "r1", &frame, 0, Some(&only), 8);
        assert_eq!(delivered.queued, 1);
        sessions.set(&cb, app, b, &["r2".into()]);
        assert_eq!(sessions.members("demo", "r1"), 1);
        sessions.leave_device(app, a);
        assert_eq!(sessions.members("demo", "r1"), 0);
        assert!(!sessions.knows(app, a));
        assert_eq!(sessions.len(), 1);
    }

    #[test]
    fn a_new_connection_of_the_device_takes_over_its_sessions() {
        let sessions = Sessions::default();
        let (app, a) = ("demo", "a");
        let (old, new) = (conn(1), conn(2));
        sessions.set(&old, app, a, &["r1".into()]);
        sessions.login(&new, app, a, &[], &[]);
        let frame = Bytes::from_static(b"x");
        sessions.deliver("demo", "r1", &frame, 0, None, 8);
        assert_eq!(new.take().0.len(), 1, "delivered to the new connection");
        assert!(old.take().0.is_empty());
    }

    #[test]
    fn recovering_members_hold_live_room_frames_until_replayed() {
        let sessions = Sessions::default();
        let (app, a) = ("demo", "a");
        let ca = conn(1);
        // The cursor waits for the join (state's sync), then starts a recovery.
        assert!(
            sessions
                .login(&ca, app, a, &[], &[("room".into(), 4)])
                .is_empty()
        );
        let recoveries = sessions.set(&ca, app, a, &["room".into()]);
        assert_eq!(recoveries.len(), 1);
        assert_eq!(recoveries[0].after, 4);
        for seq in [7u64, 6, 8] {
            let frame = Bytes::from(seq.to_string());
            let delivered = sessions.deliver("demo", "room", &frame, seq, None, 8);
            assert_eq!(delivered.held, 1);
        }
        // The replay sent up to 6: only 7 and 8 remain, in order.
        let rest = sessions.finish_recovery(&recoveries[0], 6);
        assert_eq!(rest, [Bytes::from("7"), Bytes::from("8")]);
        let delivered = sessions.deliver("demo", "room", &Bytes::from("9"), 9, None, 8);
        assert_eq!(delivered.queued, 1);
    }
}
