//! What the gateway writes to NATS: uplink frames (JetStream, de-duplicated), device acks
//! (core) and connection events (JetStream, the event log).

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream;
use bytes::Bytes;
use tether_nats::{headers, subjects, unavailable};
use tether_schemas::bus::{Event, ReceiptMode};
use tether_schemas::{ErrorCode, Frame, pb};
use tokio_util::task::TaskTracker;
use tokio_util::task::task_tracker::TaskTrackerToken;

use crate::conn::{ConnShared, Identity};
use crate::metrics::GatewayMetrics;

/// What the gateway writes to NATS (a cheap clone over one client).
#[derive(Clone)]
pub struct Outbound {
    client: async_nats::Client,
    js: jetstream::Context,
    gw: Arc<str>,
    metrics: GatewayMetrics,
    /// Connection events whose JetStream confirmation is still awaited (and connections
    /// about to publish one): the shutdown waits for them before closing NATS.
    events: TaskTracker,
    /// Numbers the republished resends of timed-out uplinks (6.3).
    resends: Arc<AtomicU64>,
    /// How long an UP is published again while the uplink stream has no leader.
    unavailable_retry: Duration,
}

impl Outbound {
    /// Wraps a connected client.
    pub fn new(client: async_nats::Client, gw: &str, metrics: GatewayMetrics) -> Self {
        let js = jetstream::new(client.clone());
        Self {
            client,
            js,
            gw: gw.into(),
            metrics,
            events: TaskTracker::new(),
            // Retry ids stay unique across restarts of a gateway within the window.
            resends: Arc::new(AtomicU64::new(tether_schemas::bus::unix_now_ms())),
            unavailable_retry: Duration::from_secs(4),
        }
    }

    /// Sets how long an UP is published again while the uplink stream has no leader (an
    /// election after a NATS node died: "no responders", so nothing was stored) before the
    /// device is answered `unavailable`.
    pub fn with_unavailable_retry(mut self, retry: Duration) -> Self {
        self.unavailable_retry = retry;
        self
    }

    /// The NATS client.
    pub fn client(&self) -> &async_nats::Client {
        &self.client
    }

    /// JetStream (room recovery reads the room stream through it).
    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    fn identity_headers(&self, id: &Identity, conn: u64) -> HeaderMap {
        let mut map = HeaderMap::new();
        map.insert(headers::APP, id.app());
        map.insert(headers::UID, id.uid());
        map.insert(headers::DID, id.did());
        map.insert(headers::GATEWAY, &*self.gw);
        map.insert(headers::CONN, conn.to_string().as_str());
        map
    }

    /// Appends an UP frame, unchanged, to the uplink stream (de-duplicated by
    /// `app:did:client_msg_id`). If the stream does not confirm it, the client gets an UP_ACK
    /// with `unavailable` so it can retry. With the app's receipt mode `stored`, the client
    /// gets UP_ACK code 0 as soon as the stream confirmed it (or a copy of it), and the
    /// stream message says so (`Tether-Receipt: stored`), so state sends none.
    pub async fn publish_uplink(
        &self,
        id: &Identity,
        conn: &Arc<ConnShared>,
        client_msg_id: u64,
        frame: Bytes,
        queue_limit: usize,
        mode: ReceiptMode,
    ) {
        let msg_id = format!("{}:{}:{client_msg_id}", id.app(), id.did());
        let mut map = self.identity_headers(id, conn.id);
        map.insert(headers::MSG_ID, msg_id.as_str());
        let on_store = mode == ReceiptMode::Stored;
        if on_store {
            map.insert(headers::RECEIPT, ReceiptMode::Stored.as_str());
        }
        let subject = subjects::uplink(id.app(), id.did());
        let sent = self
            .js
            .publish_with_headers(subject.clone(), map.clone(), frame.clone())
            .await;
        let metrics = self.metrics.clone();
        let conn = conn.clone();
        let query = subjects::receipt_query(id.app(), id.did());
        let client = self.client.clone();
        let js = self.js.clone();
        let resends = self.resends.clone();
        let frame_bytes = frame;
        let deadline = tokio::time::Instant::now() + self.unavailable_retry;
        tokio::spawn(async move {
            // While the stream elects a leader the publish reaches no stream ("no
            // responders": not stored); it is sent again, same id, until the deadline.
            let stored = unavailable::settle(&js, sent, &subject, &map, &frame_bytes, deadline)
                .await
                .map(|a| (a.duplicate, a.sequence))
                .map_err(|e| e.to_string());
            match stored {
                Ok((duplicate, _)) if on_store => {
                    // Stored (now, or an earlier copy was): that is this app's receipt.
                    if duplicate {
                        metrics.uplink_duplicates.inc();
                    } else {
                        metrics.uplink_stored.inc();
                    }
                    conn.push(stored_ack(client_msg_id), true, queue_limit);
                }
                Ok((false, _)) => {
                    metrics.uplink_stored.inc();
                }
                Ok((true, first_seq)) => {
                    // A resend: the first copy's UP_ACK may have gone to a connection
                    // that is gone. The partition's owner keeps the receipts it gave.
                    metrics.uplink_duplicates.inc();
                    match ask_receipt(&client, query, client_msg_id, first_seq).await {
                        Receipt::Kept(frame) => {
                            conn.push(frame, true, queue_limit);
                            return;
                        }
                        // Not answered yet: state's UP_ACK of the first copy follows the
                        // device's route here.
                        Receipt::Pending => return,
                        // Answered `timeout` (nothing stored), or by an earlier owner, or
                        // no owner answered: processed again below.
                        Receipt::Unknown => {}
                    }
                    // The resend is processed again under a retry id, and state answers
                    // it (the business is idempotent: PROTOCOL 6.3, 10.2, 11.1).
                    let n = resends.fetch_add(1, Ordering::Relaxed);
                    map.insert(headers::MSG_ID, format!("{msg_id}:r{n}").as_str());
                    let again = match js.publish_with_headers(subject, map, frame_bytes).await {
                        Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                        Err(error) => Err(error.to_string()),
                    };
                    if let Err(error) = again {
                        metrics.uplink_failed.inc();
                        tracing::warn!(did = conn.identity().map_or("", Identity::did), conn = conn.id, client_msg_id, %error, "uplink resend not stored");
                        conn.push(unavailable(client_msg_id), true, queue_limit);
                    }
                }
                Err(error) => {
                    metrics.uplink_failed.inc();
                    tracing::warn!(did = conn.identity().map_or("", Identity::did), conn = conn.id, client_msg_id, %error, "uplink not stored");
                    conn.push(unavailable(client_msg_id), true, queue_limit);
                }
            };
        });
    }

    /// Answers a control message that asked for confirmation (an empty reply once it is
    /// applied here).
    pub fn confirm(&self, reply: async_nats::Subject, body: Bytes) {
        let client = self.client.clone();
        tokio::spawn(async move {
            if let Err(error) = client.publish(reply, body).await {
                tracing::debug!(%error, "control confirmation not sent");
            }
        });
    }

    /// Forwards a DOWN_ACK frame, unchanged, to `tether.<app>.ack.<did>`.
    pub async fn publish_ack(&self, id: &Identity, conn: u64, frame: Bytes) {
        let map = self.identity_headers(id, conn);
        if let Err(error) = self
            .client
            .publish_with_headers(subjects::ack(id.app(), id.did()), map, frame)
            .await
        {
            tracing::warn!(did = %id.did(), conn, %error, "ack not forwarded");
        }
    }

    /// Appends a connection event to the events stream. The publish is sent in call order
    /// (so `conn.up` precedes `conn.down`); its confirmation is awaited in the background.
    ///
    /// The returned task ends with whether JetStream stored the event. Events are tracked:
    /// [`Outbound::events_stored`] waits for them.
    pub async fn conn_event(&self, event: &Event) -> tokio::task::JoinHandle<bool> {
        let (Event::ConnUp(conn) | Event::ConnDown(conn)) = event else {
            return tokio::spawn(async { false });
        };
        let payload = match event.to_json() {
            Ok(bytes) => bytes,
            Err(error) => {
                tracing::error!(%error, "cannot encode connection event");
                return tokio::spawn(async { false });
            }
        };
        let kind = event.kind();
        let mut map = HeaderMap::new();
        map.insert(
            headers::MSG_ID,
            format!("{}:{}:{kind}", self.gw, conn.conn).as_str(),
        );
        let subject = subjects::conn_events(&conn.app, &conn.did);
        let retry = matches!(event, Event::ConnDown(_)).then(|| {
            (
                self.js.clone(),
                subject.clone(),
                map.clone(),
                payload.clone(),
            )
        });
        let sent = self.js.publish_with_headers(subject, map, payload).await;
        let metrics = self.metrics.clone();
        let conn = conn.conn;
        self.events.spawn(async move {
            let result = match sent {
                Ok(ack) => ack.await.map(|_| ()).map_err(|e| e.to_string()),
                Err(error) => Err(error.to_string()),
            };
            match result {
                Ok(()) => true,
                Err(error) => {
                    metrics.events_failed.inc();
                    tracing::warn!(conn, kind, %error, "connection event not stored");
                    if let Some((js, subject, map, payload)) = retry {
                        tokio::spawn(retry_conn_down(js, subject, map, payload, conn, metrics));
                    }
                    false
                }
            }
        })
    }
}

/// How long a `conn.down` that JetStream did not confirm is published again.
const CONN_DOWN_RETRY_FOR: Duration = Duration::from_secs(600);
/// The longest pause between two attempts.
const CONN_DOWN_RETRY_MAX: Duration = Duration::from_secs(10);

/// Publishes a `conn.down` again (same message id: JetStream keeps one copy) with backoff
/// until it is stored, so a disconnect during a NATS outage does not leave the device
/// routed to a connection that is gone while this gateway lives on. State ignores a
/// late `conn.down` for a connection it no longer routes to (the device logged in again).
async fn retry_conn_down(
    js: jetstream::Context,
    subject: String,
    map: HeaderMap,
    payload: Bytes,
    conn: u64,
    metrics: GatewayMetrics,
) {
    let give_up = tokio::time::Instant::now() + CONN_DOWN_RETRY_FOR;
    let mut wait = Duration::from_millis(500);
    while tokio::time::Instant::now() < give_up {
        tokio::time::sleep(wait).await;
        wait = (wait * 2).min(CONN_DOWN_RETRY_MAX);
        let stored = match js
            .publish_with_headers(subject.clone(), map.clone(), payload.clone())
            .await
        {
            Ok(ack) => ack.await.is_ok(),
            Err(_) => false,
        };
        if stored {
            tracing::info!(conn, "conn.down stored on a later attempt");
            return;
        }
        metrics.events_failed.inc();
    }
    tracing::warn!(conn, "conn.down given up after {CONN_DOWN_RETRY_FOR:?}");
}

impl Outbound {
    /// Holds the shutdown's wait for events open while a connection is about to publish
    /// its `conn.down` (taken before it leaves the registry, dropped once published).
    pub fn event_pending(&self) -> TaskTrackerToken {
        self.events.token()
    }

    /// Waits, up to `timeout`, until every connection event published so far is confirmed
    /// by JetStream (or failed); whether all were. Called at shutdown, before NATS closes,
    /// so that no disconnect is lost (PROTOCOL 10.3).
    pub async fn events_stored(&self, timeout: Duration) -> bool {
        self.events.close();
        let done = tokio::time::timeout(timeout, self.events.wait())
            .await
            .is_ok();
        if !done {
            tracing::warn!(
                pending = self.events.len(),
                "connection events not confirmed before shutdown"
            );
        }
        done
    }
}

/// The UP_ACK of an uplink the stream stored, for apps whose receipt mode is `stored`.
fn stored_ack(client_msg_id: u64) -> Bytes {
    Frame::UpAck(pb::UpAck {
        client_msg_id,
        code: u32::from(ErrorCode::Ok.as_u16()),
        message: String::new(),
        server_msg_id: String::new(),
    })
    .encode()
}

/// The UP_ACK of an uplink the stream did not confirm (the client may retry).
fn unavailable(client_msg_id: u64) -> Bytes {
    Frame::UpAck(pb::UpAck {
        client_msg_id,
        code: u32::from(ErrorCode::Unavailable.as_u16()),
        message: "uplink stream unavailable, retry".into(),
        server_msg_id: String::new(),
    })
    .encode()
}

/// What the partition owner said about a duplicate UP (PROTOCOL 10.2).
enum Receipt {
    /// Its UP_ACK, to send again.
    Kept(Bytes),
    /// The first copy is still to be answered: its UP_ACK follows.
    Pending,
    /// Not known (answered `timeout` or by an earlier owner, or no answer): process again.
    Unknown,
}

/// How long a gateway waits for the partition owner's answer about a duplicate UP.
const RECEIPT_QUERY_TIMEOUT: Duration = Duration::from_secs(2);

/// Asks the partition owner (`tether.<app>.rcpt.<p>.<did>`) for the receipt of the UP
/// `client_msg_id` whose first copy has stream sequence `first_seq`.
async fn ask_receipt(
    client: &async_nats::Client,
    subject: String,
    client_msg_id: u64,
    first_seq: u64,
) -> Receipt {
    let mut map = HeaderMap::new();
    map.insert(headers::MSG_ID_CLIENT, client_msg_id.to_string().as_str());
    map.insert(headers::SEQ, first_seq.to_string().as_str());
    let request = async_nats::Request::new()
        .headers(map)
        .payload(Bytes::new())
        .timeout(Some(RECEIPT_QUERY_TIMEOUT));
    let reply = match client.send_request(subject, request).await {
        Ok(reply) => reply,
        Err(error) => {
            tracing::debug!(%error, client_msg_id, "no receipt answer");
            return Receipt::Unknown;
        }
    };
    let said = reply
        .headers
        .as_ref()
        .and_then(|map| map.get(headers::RECEIPT))
        .map(|v| v.as_str().to_string());
    match said.as_deref() {
        Some(headers::RECEIPT_PENDING) => Receipt::Pending,
        Some(_) => Receipt::Unknown,
        // Sent to the device as is: only an UP_ACK of this very UP.
        None if is_up_ack_of(&reply.payload, client_msg_id) => Receipt::Kept(reply.payload),
        None => {
            tracing::warn!(client_msg_id, "receipt answer is not this UP's UP_ACK");
            Receipt::Unknown
        }
    }
}

/// Whether `frame` is an encoded UP_ACK for `client_msg_id`.
fn is_up_ack_of(frame: &Bytes, client_msg_id: u64) -> bool {
    let decoded = tether_schemas::RawFrame::from_bytes(
        frame.clone(),
        tether_schemas::limits::MAX_FRAME_LEN_CAP,
    )
    .ok()
    .and_then(|raw| Frame::decode(&raw).ok());
    matches!(decoded, Some(Frame::UpAck(ack)) if ack.client_msg_id == client_msg_id)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn up_ack(client_msg_id: u64) -> Bytes {
        Frame::UpAck(pb::UpAck {
            client_msg_id,
            ..Default::default()
        })
        .encode()
    }

    /// A receipt answer may come from anyone allowed on the app's subjects (its business):
    /// only an UP_ACK of the very UP asked about is forwarded to the device.
    #[test]
    fn only_an_up_ack_of_the_asked_up_is_a_receipt() {
        assert!(is_up_ack_of(&up_ack(7), 7));
        assert!(!is_up_ack_of(&up_ack(8), 7), "another UP's receipt");
        let down = Frame::Down {
            header: pb::Down::default(),
            qos1: true,
            body: Bytes::from_static(b"x"),
        }
        .encode();
        assert!(!is_up_ack_of(&down, 7), "not an UP_ACK");
        assert!(!is_up_ack_of(&Bytes::from_static(b"\xff\x00garbage"), 7));
        assert!(!is_up_ack_of(&Bytes::new(), 7));
    }
}
