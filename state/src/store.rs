//! What state keeps in NATS: routes, user indexes and cursors (KV), inbox messages
//! (stream), and how it reads and appends them. Everything a restarted or new owner needs
//! to rebuild a device comes from here.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tether_nats::keys;
use tether_nats::layout::{INBOX_STREAM, ROUTES_BUCKET};
use tether_nats::subjects::{self, headers};

/// Errors talking to the store.
#[derive(Debug, thiserror::Error)]
#[error("store: {0}")]
pub struct StoreError(pub String);

fn err(e: impl std::fmt::Display) -> StoreError {
    StoreError(e.to_string())
}

/// Where a device is connected.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Route {
    /// User id.
    pub uid: String,
    /// Gateway id.
    pub gw: String,
    /// Connection id.
    pub conn: u64,
    /// Gateway region.
    #[serde(default)]
    pub region: String,
}

/// How far a device has acknowledged.
#[derive(Debug, Clone, Copy, Default, PartialEq, Serialize, Deserialize)]
pub struct Cursor {
    /// Highest acknowledged per-device sequence.
    pub acked: u64,
    /// Inbox stream sequence of that message (reading resumes after it).
    pub stream_seq: u64,
}

/// One stored QoS1 message.
#[derive(Debug, Clone)]
pub struct InboxMessage {
    /// Per-device sequence.
    pub seq: u64,
    /// Inbox stream sequence.
    pub stream_seq: u64,
    /// The complete DOWN frame.
    pub frame: Bytes,
}

/// Handles to the KV bucket and the inbox stream.
#[derive(Clone)]
pub struct Store {
    js: jetstream::Context,
    routes: kv::Store,
    inbox: stream::Stream,
}

impl Store {
    /// Opens the bucket and stream (they must exist: see `ensure_layout`).
    pub async fn open(js: jetstream::Context) -> Result<Self, StoreError> {
        let routes = js.get_key_value(ROUTES_BUCKET).await.map_err(err)?;
        let inbox = js.get_stream(INBOX_STREAM).await.map_err(err)?;
        Ok(Self { js, routes, inbox })
    }

    /// The route of a device, if connected.
    pub async fn route(&self, app: &str, did: &str) -> Result<Option<Route>, StoreError> {
        let value = self.routes.get(keys::route(app, did)).await.map_err(err)?;
        Ok(value.and_then(|v| serde_json::from_slice(&v).ok()))
    }

    /// Records where a device is connected.
    pub async fn put_route(&self, app: &str, did: &str, route: &Route) -> Result<(), StoreError> {
        let value = serde_json::to_vec(route).map_err(err)?;
        self.routes
            .put(keys::route(app, did), value.into())
            .await
            .map_err(err)?;
        Ok(())
    }

    /// Forgets a device's route.
    pub async fn delete_route(&self, app: &str, did: &str) -> Result<(), StoreError> {
        self.routes.delete(keys::route(app, did)).await.map_err(err)
    }

    /// Every route of one partition: `(app, did, route)`.
    pub async fn routes_of_partition(
        &self,
        partition: u16,
    ) -> Result<Vec<(String, String, Route)>, StoreError> {
        use futures::StreamExt;
        let mut watch = self
            .routes
            .watch_with_history(keys::routes_of_partition(partition))
            .await
            .map_err(err)?;
        let mut found = Vec::new();
        loop {
            let next = tokio::time::timeout(Duration::from_millis(500), watch.next()).await;
            let Ok(Some(Ok(entry))) = next else { break };
            if entry.operation == kv::Operation::Put {
                let mut parts = entry.key.splitn(4, '.');
                let (_, _, app, did) = (parts.next(), parts.next(), parts.next(), parts.next());
                if let (Some(app), Some(did), Ok(route)) =
                    (app, did, serde_json::from_slice::<Route>(&entry.value))
                {
                    found.push((app.to_string(), did.to_string(), route));
                }
            }
            if entry.delta == 0 {
                break;
            }
        }
        Ok(found)
    }

    /// The devices of a user.
    pub async fn user_devices(&self, app: &str, uid: &str) -> Result<Vec<String>, StoreError> {
        let value = self.routes.get(keys::user(app, uid)).await.map_err(err)?;
        Ok(value
            .and_then(|v| serde_json::from_slice(&v).ok())
            .unwrap_or_default())
    }

    /// Adds a device to its user's list (compare-and-set, retried on conflict).
    pub async fn add_user_device(&self, app: &str, uid: &str, did: &str) -> Result<(), StoreError> {
        let key = keys::user(app, uid);
        for _ in 0..10 {
            let entry = self.routes.entry(key.clone()).await.map_err(err)?;
            let (mut dids, revision) = match &entry {
                Some(e) if e.operation == kv::Operation::Put => (
                    serde_json::from_slice::<Vec<String>>(&e.value).unwrap_or_default(),
                    Some(e.revision),
                ),
                _ => (Vec::new(), None),
            };
            if dids.iter().any(|d| d == did) {
                return Ok(());
            }
            dids.push(did.to_string());
            let value: Bytes = serde_json::to_vec(&dids).map_err(err)?.into();
            let written = match revision {
                Some(revision) => self
                    .routes
                    .update(&key, value, revision)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
                None => self
                    .routes
                    .create(&key, value)
                    .await
                    .map(|_| ())
                    .map_err(|e| e.to_string()),
            };
            if written.is_ok() {
                return Ok(());
            }
        }
        Err(StoreError(format!("user index {key} kept changing")))
    }

    /// A device's cursor (zero if none).
    pub async fn cursor(&self, app: &str, did: &str) -> Result<Cursor, StoreError> {
        let value = self.routes.get(keys::cursor(app, did)).await.map_err(err)?;
        Ok(value
            .and_then(|v| serde_json::from_slice(&v).ok())
            .unwrap_or_default())
    }

    /// Saves a device's cursor.
    pub async fn put_cursor(&self, app: &str, did: &str, cursor: Cursor) -> Result<(), StoreError> {
        let value = serde_json::to_vec(&cursor).map_err(err)?;
        self.routes
            .put(keys::cursor(app, did), value.into())
            .await
            .map_err(err)?;
        Ok(())
    }

    /// The newest inbox message of a device: `(seq, stream_seq)`.
    pub async fn last_inbox(&self, app: &str, did: &str) -> Result<Option<(u64, u64)>, StoreError> {
        match self
            .inbox
            .direct_get_last_for_subject(subjects::inbox(app, did))
            .await
        {
            Ok(message) => Ok(Some((seq_of(&message.headers), message.sequence))),
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(None),
            Err(e) => Err(err(e)),
        }
    }

    /// Appends a QoS1 message to a device's inbox with the next per-device sequence.
    ///
    /// The sequence is the last one in the inbox (or the acked cursor, when retention
    /// removed older messages) plus one; the append states the subject's last stream
    /// sequence, so two writers racing for one device cannot both win (JetStream arbitrates).
    pub async fn append_inbox(
        &self,
        app: &str,
        did: &str,
        encode: impl Fn(u64) -> Bytes,
    ) -> Result<u64, StoreError> {
        let subject = subjects::inbox(app, did);
        let cursor = self.cursor(app, did).await?;
        for _ in 0..20 {
            let last = self.last_inbox(app, did).await?;
            let (last_seq, last_stream_seq) = last.unwrap_or((0, 0));
            let seq = last_seq.max(cursor.acked) + 1;
            let mut map = HeaderMap::new();
            map.insert(headers::SEQ, seq.to_string().as_str());
            map.insert(
                "Nats-Expected-Last-Subject-Sequence",
                last_stream_seq.to_string().as_str(),
            );
            let ack = self
                .js
                .publish_with_headers(subject.clone(), map, encode(seq))
                .await
                .map_err(err)?;
            match ack.await {
                Ok(_) => return Ok(seq),
                Err(e) if e.to_string().contains("wrong last sequence") => continue,
                Err(e) => return Err(err(e)),
            }
        }
        Err(StoreError(format!("inbox {subject} kept changing")))
    }

    /// Inbox messages of a device after stream sequence `after`, in order, at most `limit`.
    pub async fn read_inbox(
        &self,
        app: &str,
        did: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<InboxMessage>, StoreError> {
        let subject = subjects::inbox(app, did);
        let mut found = Vec::new();
        let mut next = after + 1;
        while found.len() < limit {
            match self
                .inbox
                .direct_get_next_for_subject(subject.clone(), Some(next))
                .await
            {
                Ok(message) => {
                    next = message.sequence + 1;
                    found.push(InboxMessage {
                        seq: seq_of(&message.headers),
                        stream_seq: message.sequence,
                        frame: message.payload,
                    });
                }
                Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => break,
                Err(e) => return Err(err(e)),
            }
        }
        Ok(found)
    }
}

/// The `Tether-Seq` header of an inbox message (0 if missing).
pub fn seq_of(map: &HeaderMap) -> u64 {
    map.get(headers::SEQ)
        .and_then(|v| v.as_str().parse().ok())
        .unwrap_or(0)
}
