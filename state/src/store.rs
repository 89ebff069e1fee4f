//! What state keeps in NATS: routes, user indexes and cursors (KV), inbox messages
//! (stream), and how it reads and appends them. Everything a restarted or new owner needs
//! to rebuild a device comes from here.

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::{self, kv, stream};
use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tether_nats::keys;
use tether_nats::layout::{INBOX_STREAM, ROOMS_STREAM, ROUTES_BUCKET, SESSIONS_BUCKET};
use tether_nats::{headers, subjects, unavailable};

use crate::metrics::StateMetrics;

/// How long an append waits for a stream without leader by default (see
/// [`Store::with_unavailable_retry`]).
pub const DEFAULT_UNAVAILABLE_RETRY: Duration = Duration::from_secs(4);

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
    /// Events-stream sequence of the last connection or session event applied to the
    /// device: an event at or below it is stale (a redelivery after an owner change) and
    /// is not applied again.
    #[serde(default)]
    pub event_seq: u64,
    /// When the device last logged in or out (Unix ms; 0 = never recorded): a device
    /// offline longer than `forget_devices_after_secs` leaves its user's device list.
    #[serde(default)]
    pub last_seen_ms: u64,
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

/// The sessions a device is bound to (`m.<p>.<app>.<did>` in `tether_sessions`).
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Membership {
    /// Session ids, sorted.
    pub sessions: Vec<String>,
}

/// Settings of one session (`s.<app>.<session>` in `tether_sessions`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SessionSettings {
    /// Broadcasts go to the room stream and carry a room sequence.
    #[serde(default)]
    pub recoverable: bool,
}

/// Handles to the KV buckets and the inbox and room streams.
#[derive(Clone)]
pub struct Store {
    js: jetstream::Context,
    routes: kv::Store,
    sessions: kv::Store,
    inbox: stream::Stream,
    rooms: stream::Stream,
    metrics: StateMetrics,
    /// How long an append is sent again while its stream has no leader.
    unavailable_retry: Duration,
}

impl Store {
    /// Opens the buckets and streams (they must exist: see `ensure_layout`).
    pub async fn open(js: jetstream::Context, metrics: StateMetrics) -> Result<Self, StoreError> {
        let routes = js.get_key_value(ROUTES_BUCKET).await.map_err(err)?;
        let sessions = js.get_key_value(SESSIONS_BUCKET).await.map_err(err)?;
        let inbox = js.get_stream(INBOX_STREAM).await.map_err(err)?;
        let rooms = js.get_stream(ROOMS_STREAM).await.map_err(err)?;
        Ok(Self {
            js,
            routes,
            sessions,
            inbox,
            rooms,
            metrics,
            unavailable_retry: DEFAULT_UNAVAILABLE_RETRY,
        })
    }

    /// Sets how long an append is sent again while its stream has no leader (a NATS node
    /// died and the stream elects another: `tether_nats::unavailable`) before it fails.
    pub fn with_unavailable_retry(mut self, retry: Duration) -> Self {
        self.unavailable_retry = retry;
        self
    }

    /// The sessions bucket's last revision (every write up to it is stored).
    pub async fn sessions_revision(&self) -> Result<u64, StoreError> {
        let mut stream = self
            .js
            .get_stream(tether_nats::layout::kv_stream(SESSIONS_BUCKET))
            .await
            .map_err(err)?;
        Ok(stream.info().await.map_err(err)?.state.last_sequence)
    }

    /// The routes bucket (routes, user indexes, cursors).
    pub fn routes_bucket(&self) -> &kv::Store {
        &self.routes
    }

    /// The sessions bucket (memberships, index, settings).
    pub fn sessions_bucket(&self) -> &kv::Store {
        &self.sessions
    }

    /// A device's membership and the KV revision it was read at (`None` if never written).
    pub async fn membership(
        &self,
        app: &str,
        did: &str,
    ) -> Result<(Membership, Option<u64>), StoreError> {
        let entry = self
            .sessions
            .entry(keys::membership(app, did))
            .await
            .map_err(err)?;
        Ok(match entry {
            Some(e) if e.operation == kv::Operation::Put => (
                serde_json::from_slice(&e.value).unwrap_or_default(),
                Some(e.revision),
            ),
            Some(e) => (Membership::default(), Some(e.revision)),
            None => (Membership::default(), None),
        })
    }

    /// Writes a device's membership if it is still at `revision` (compare-and-set); false
    /// when someone else changed it first.
    pub async fn put_membership(
        &self,
        app: &str,
        did: &str,
        membership: &Membership,
        revision: Option<u64>,
    ) -> Result<bool, StoreError> {
        let key = keys::membership(app, did);
        let value: Bytes = serde_json::to_vec(membership).map_err(err)?.into();
        // A revision conflict is `false` (read again); anything else is an error to retry
        // later, never mistaken for a conflict.
        match revision {
            Some(revision) => match self.sessions.update(&key, value, revision).await {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => Ok(false),
                Err(e) => Err(err(e)),
            },
            None => match self.sessions.create(&key, value).await {
                Ok(_) => Ok(true),
                Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => Ok(false),
                Err(e) => Err(err(e)),
            },
        }
    }

    /// Adds (`true`) or removes a device from a session's index entry.
    pub async fn index_member(
        &self,
        app: &str,
        session: &str,
        did: &str,
        member: bool,
    ) -> Result<(), StoreError> {
        let key = keys::session_member(app, session, did);
        if member {
            self.sessions.put(key, Bytes::new()).await.map_err(err)?;
        } else {
            self.sessions.delete(key).await.map_err(err)?;
        }
        Ok(())
    }

    /// Writes a session's settings.
    pub async fn put_session_settings(
        &self,
        app: &str,
        session: &str,
        settings: SessionSettings,
    ) -> Result<(), StoreError> {
        let value = serde_json::to_vec(&settings).map_err(err)?;
        self.sessions
            .put(keys::session_settings(app, session), value.into())
            .await
            .map_err(err)?;
        Ok(())
    }

    /// Every membership of one partition: `(app, did, membership)`.
    pub async fn memberships_of_partition(
        &self,
        partition: u16,
    ) -> Result<Vec<(String, String, Membership)>, StoreError> {
        let entries = snapshot(&self.sessions, keys::memberships_of_partition(partition)).await?;
        Ok(entries
            .into_iter()
            .filter_map(|(key, value)| {
                let mut parts = key.splitn(4, '.');
                let (_, _, app, did) = (parts.next(), parts.next(), parts.next()?, parts.next()?);
                let membership = serde_json::from_slice(&value).ok()?;
                Some((app.to_string(), did.to_string(), membership))
            })
            .collect())
    }

    /// Appends a broadcast to a recoverable room with the next room sequence (gap-free
    /// from 1, arbitrated like inbox appends). Gateways receive the stored message on the
    /// room subject.
    pub async fn append_room(
        &self,
        app: &str,
        session: &str,
        dedupe: Option<String>,
        encode: impl Fn(u64) -> Bytes,
    ) -> Result<u64, StoreError> {
        self.append_next(
            &self.rooms,
            subjects::room(app, session),
            0,
            dedupe,
            None,
            encode,
        )
        .await
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
        let entries = snapshot(&self.routes, keys::routes_of_partition(partition)).await?;
        Ok(entries
            .into_iter()
            .filter_map(|(key, value)| {
                let mut parts = key.splitn(4, '.');
                let (_, _, app, did) = (parts.next(), parts.next(), parts.next()?, parts.next()?);
                let route = serde_json::from_slice::<Route>(&value).ok()?;
                Some((app.to_string(), did.to_string(), route))
            })
            .collect())
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
                Some(revision) => match self.routes.update(&key, value, revision).await {
                    Ok(_) => true,
                    Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => false,
                    Err(e) => return Err(err(e)),
                },
                None => match self.routes.create(&key, value).await {
                    Ok(_) => true,
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => false,
                    Err(e) => return Err(err(e)),
                },
            };
            if written {
                return Ok(());
            }
        }
        Err(StoreError(format!("user index {key} kept changing")))
    }

    /// Removes a device from its user's list (compare-and-set, retried on conflict).
    pub async fn remove_user_device(
        &self,
        app: &str,
        uid: &str,
        did: &str,
    ) -> Result<(), StoreError> {
        let key = keys::user(app, uid);
        for _ in 0..10 {
            let Some(entry) = self.routes.entry(key.clone()).await.map_err(err)? else {
                return Ok(());
            };
            if entry.operation != kv::Operation::Put {
                return Ok(());
            }
            let mut dids = serde_json::from_slice::<Vec<String>>(&entry.value).unwrap_or_default();
            let before = dids.len();
            dids.retain(|d| d != did);
            if dids.len() == before {
                return Ok(());
            }
            let value: Bytes = serde_json::to_vec(&dids).map_err(err)?.into();
            match self.routes.update(&key, value, entry.revision).await {
                Ok(_) => return Ok(()),
                Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => continue,
                Err(e) => return Err(err(e)),
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

    /// Appends a QoS1 message to a device's inbox with the next per-device sequence.
    ///
    /// The sequence is the last one in the inbox (or the acked cursor, when retention
    /// removed older messages) plus one; the append states the subject's last stream
    /// sequence, so two writers racing for one device cannot both win (JetStream arbitrates).
    ///
    /// With `dedupe` (a push id), a retried push within the stream's de-duplication window
    /// stores nothing new and returns the sequence the first one got. With `ttl` (the app's
    /// `inbox_retention`) the message leaves the inbox after that long (`Nats-TTL`).
    pub async fn append_inbox(
        &self,
        app: &str,
        did: &str,
        dedupe: Option<String>,
        ttl: Option<Duration>,
        encode: impl Fn(u64) -> Bytes,
    ) -> Result<u64, StoreError> {
        let cursor = self.cursor(app, did).await?;
        self.append_next(
            &self.inbox,
            subjects::inbox(app, did),
            cursor.acked,
            dedupe,
            ttl,
            encode,
        )
        .await
    }

    /// Like [`Store::append_inbox`] with `floor` as the acknowledged sequence: the message
    /// is numbered above `floor` (a device that moved here from another region,
    /// [`crate::moves`]).
    pub async fn append_inbox_above(
        &self,
        app: &str,
        did: &str,
        floor: u64,
        dedupe: Option<String>,
        encode: impl Fn(u64) -> Bytes,
    ) -> Result<u64, StoreError> {
        self.append_next(
            &self.inbox,
            subjects::inbox(app, did),
            floor,
            dedupe,
            None,
            encode,
        )
        .await
    }

    /// Appends `encode(seq)` to `subject` in `stream`, where `seq` is the last `Tether-Seq`
    /// on the subject (or `floor`, if higher) plus one. The append states the subject's
    /// last stream sequence, so of two racing writers only one wins; the other retries.
    /// `ttl` (whole seconds, at least one) becomes the message's `Nats-TTL`.
    ///
    /// While the stream has no leader (an election after a NATS node died: the read and
    /// the append are answered "no responders", so nothing was stored), both are tried
    /// again with short backoff for up to the store's `unavailable_retry`; a timeout, whose
    /// outcome is unknown, fails at once.
    async fn append_next(
        &self,
        stream: &stream::Stream,
        subject: String,
        floor: u64,
        dedupe: Option<String>,
        ttl: Option<Duration>,
        encode: impl Fn(u64) -> Bytes,
    ) -> Result<u64, StoreError> {
        let mut backoff =
            unavailable::Backoff::until(tokio::time::Instant::now() + self.unavailable_retry);
        let mut conflicts = 0;
        while conflicts < 100 {
            let (last_seq, last_stream_seq) =
                match stream.direct_get_last_for_subject(subject.clone()).await {
                    Ok(message) => (seq_of(&message.headers), message.sequence),
                    Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => (0, 0),
                    Err(e) if unavailable::direct_get_unanswered(&e) && backoff.wait().await => {
                        self.metrics.store_unavailable_retries.inc();
                        continue;
                    }
                    Err(e) => return Err(err(e)),
                };
            if last_seq == 0 && last_stream_seq > 0 {
                // Not written by state (a raw publish on the subject, which a business may
                // do on its own app's subjects): removed, so it cannot reset the sequence.
                self.metrics.refused("foreign_sequence_message");
                tracing::warn!(%subject, stream_seq = last_stream_seq, "message without a sequence on a sequenced subject, removed");
                stream.delete_message(last_stream_seq).await.map_err(err)?;
                conflicts += 1;
                continue;
            }
            let seq = last_seq.max(floor) + 1;
            let mut map = HeaderMap::new();
            map.insert(headers::SEQ, seq.to_string().as_str());
            map.insert(
                headers::EXPECTED_LAST_SUBJECT_SEQUENCE,
                last_stream_seq.to_string().as_str(),
            );
            if let Some(id) = &dedupe {
                map.insert(headers::MSG_ID, id.as_str());
            }
            if let Some(ttl) = ttl {
                map.insert(headers::MSG_TTL, ttl.as_secs().max(1).to_string().as_str());
            }
            let answer = match self
                .js
                .publish_with_headers(subject.clone(), map, encode(seq))
                .await
            {
                Ok(ack) => ack.await,
                Err(e) => Err(e),
            };
            match answer {
                // JetStream checks the id before the expected sequence: a retry within the
                // window is answered with the first copy's stream sequence.
                Ok(ack) if ack.duplicate => {
                    let first = stream.direct_get(ack.sequence).await.map_err(err)?;
                    return Ok(seq_of(&first.headers));
                }
                Ok(_) => return Ok(seq),
                Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => conflicts += 1,
                // No leader listens: not stored. Read the last sequence again and append
                // again (the new leader may have a newer last message).
                Err(e) if unavailable::not_stored(&e) && backoff.wait().await => {
                    self.metrics.store_unavailable_retries.inc();
                }
                Err(e) => return Err(err(e)),
            }
        }
        Err(StoreError(format!("{subject} kept changing")))
    }

    /// The highest per-device sequence stored for a device (0 when its inbox is empty).
    pub async fn last_inbox_seq(&self, app: &str, did: &str) -> Result<u64, StoreError> {
        match self
            .inbox
            .direct_get_last_for_subject(subjects::inbox(app, did))
            .await
        {
            Ok(message) => Ok(seq_of(&message.headers)),
            Err(e) if e.kind() == stream::DirectGetErrorKind::NotFound => Ok(0),
            Err(e) => Err(err(e)),
        }
    }

    /// Inbox messages of a device after stream sequence `after`, in order, at most `limit`:
    /// batched direct gets (one request per [`tether_nats::direct::MAX_BATCH`] messages),
    /// so a deep inbox is one round trip, not one per message.
    pub async fn read_inbox(
        &self,
        app: &str,
        did: &str,
        after: u64,
        limit: usize,
    ) -> Result<Vec<InboxMessage>, StoreError> {
        use tether_nats::direct;
        let subject = subjects::inbox(app, did);
        let client = self.js.client();
        let mut found = Vec::new();
        let mut next = after + 1;
        while found.len() < limit {
            let batch = direct::next_batch(
                &client,
                direct::JS_API_PREFIX,
                INBOX_STREAM,
                &subject,
                next,
                limit - found.len(),
                READ_WAIT,
            )
            .await
            .map_err(err)?;
            let Some(last) = batch.messages.last() else {
                break;
            };
            next = last.sequence + 1;
            let more = batch.pending > 0;
            found.extend(batch.messages.into_iter().map(|message| InboxMessage {
                seq: seq_of(&message.headers),
                stream_seq: message.sequence,
                frame: message.payload,
            }));
            if !more {
                break;
            }
        }
        Ok(found)
    }
}

/// How long one batched inbox read may take.
const READ_WAIT: Duration = Duration::from_secs(5);

/// The current entries under `filter` (a key wildcard): `(key, value)` of every put.
///
/// Complete or an error: a takeover must not skip devices because the bucket answered
/// slowly or a leader changed mid-read. The watch says how many entries are still to come
/// (`delta`); a read that stops before the last one fails, and a watch that yields nothing
/// is checked against the bucket's stream (empty for real, or not answering).
async fn snapshot(bucket: &kv::Store, filter: String) -> Result<Vec<(String, Bytes)>, StoreError> {
    use futures::StreamExt;
    // An empty range answers at once: the stream leader says no message matches. (The
    // watch below would say so only by its silence, SNAPSHOT_QUIET later: 2 s of every
    // takeover of a partition without session members went there.)
    let subject = format!("{}{filter}", bucket.prefix);
    if let Err(e) = bucket
        .stream
        .get_last_raw_message_by_subject(&subject)
        .await
        && e.kind() == stream::LastRawMessageErrorKind::NoMessageFound
    {
        return Ok(Vec::new());
    }
    let mut watch = bucket
        .watch_with_history(filter.clone())
        .await
        .map_err(err)?;
    let mut found = Vec::new();
    let mut seen = 0usize;
    loop {
        let next = tokio::time::timeout(SNAPSHOT_QUIET, watch.next()).await;
        let entry = match next {
            Ok(Some(Ok(entry))) => entry,
            Ok(Some(Err(e))) => return Err(err(e)),
            Ok(None) => return Err(StoreError(format!("watch of {filter} ended early"))),
            Err(_) if seen == 0 => {
                // Nothing came: an empty range, or a bucket that does not answer.
                return match bucket
                    .stream
                    .get_last_raw_message_by_subject(&subject)
                    .await
                {
                    Err(e) if e.kind() == stream::LastRawMessageErrorKind::NoMessageFound => {
                        Ok(found)
                    }
                    Ok(_) => Err(StoreError(format!(
                        "{filter}: entries exist but the watch delivered none within {SNAPSHOT_QUIET:?}"
                    ))),
                    Err(e) => Err(err(e)),
                };
            }
            Err(_) => {
                return Err(StoreError(format!(
                    "{filter}: read {seen} entries, then nothing for {SNAPSHOT_QUIET:?} before the last"
                )));
            }
        };
        seen += 1;
        let last = entry.delta == 0;
        if entry.operation == kv::Operation::Put {
            found.push((entry.key, entry.value));
        }
        if last {
            return Ok(found);
        }
    }
}

/// How long a takeover snapshot waits for the next entry before it counts as incomplete.
const SNAPSHOT_QUIET: Duration = Duration::from_secs(2);

/// The `Tether-Seq` header of an inbox message (0 if missing).
pub use tether_nats::headers::seq as seq_of;
