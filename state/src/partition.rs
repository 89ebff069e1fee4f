//! One owned partition: the devices whose did hashes to it.
//!
//! The owner consumes the partition's events (routes, presence, resume), uplinks (business
//! receipts), new inbox messages (QoS1 delivery) and device acks, and runs the
//! retransmission timer of its devices. Everything it holds is rebuilt from the streams and
//! KV when another instance takes the partition over.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{AckKind, Message};
use bytes::Bytes;
use futures::StreamExt;
use tether_nats::headers;
use tether_nats::layout::PartitionConsumer;
use tether_nats::pull::Pulling;
use tether_nats::subjects::{self, Subject};
use tether_schemas::bus::{
    ConnEvent, Event, GatewayControl, MembershipChange, MembershipEvent, PresenceEvent,
    SessionChange, SessionOp, unix_now_ms,
};
use tether_schemas::{ErrorCode, Frame, RawFrame, limits};
use tokio::sync::mpsc;
use tokio::time::Instant;

use crate::context::StateCtx;
use crate::receipt_book::{MAX_RECEIPTS, ReceiptAnswer, ReceiptBook, UplinkWatermark};
use crate::store::{Cursor, InboxMessage, Membership, Route, seq_of};
use crate::uplink::{self, UplinkDone};
use crate::uplink_lines::{DeviceLines, Turn};

/// QoS1 messages in flight per device (sent, not yet acknowledged) at most; the rest
/// waits in the inbox and follows as acks come (PROTOCOL 6.4).
pub const INFLIGHT_WINDOW: usize = 256;

/// How long a session change waits for the device's gateway to confirm it (a gateway
/// that does not answer in time is gone or overloaded; the change still stands).
const GATEWAY_CONFIRM: Duration = Duration::from_millis(500);

/// Inbox reads in a row (one per 100 ms tick) that may stop below a message the inbox
/// consumer announced before the partition stops waiting for it (it expired).
const MAX_SHORT_READS: u32 = 50;

/// Devices whose cursor and inbox are read at once when a partition is taken over.
const REBUILD_READS: usize = 32;

/// Cursors written at once by one flush.
const CURSOR_WRITES: usize = 32;

/// A device of this partition, held while online or inside its reconnect window.
#[derive(Debug, Default)]
struct Device {
    route: Option<Route>,
    /// The route of the last connection, kept for the offline presence event.
    last_route: Option<Route>,
    /// Messages past the in-flight window wait in the inbox; read when acks free it.
    more_in_inbox: bool,
    /// Highest inbox stream sequence the inbox consumer announced for this device: a
    /// read of the inbox that stops below it came from a replica that lags behind (direct
    /// gets are answered by any replica) and is retried, not taken as the end.
    inbox_top: u64,
    /// Reads in a row that stopped below `inbox_top` (bounded: a message expired by
    /// retention can never be read).
    short_reads: u32,
    uid: String,
    cursor: Cursor,
    cursor_dirty: bool,
    /// Sent and not yet acknowledged, by per-device sequence.
    inflight: BTreeMap<u64, InboxMessage>,
    retransmit_at: Option<Instant>,
    offline_at: Option<Instant>,
}

type DeviceKey = (String, String);

/// The worker of one partition.
pub struct Partition {
    ctx: Arc<StateCtx>,
    partition: u16,
    devices: HashMap<DeviceKey, Device>,
}

/// Opens (creating if needed) one of the partition's durable consumers and its messages,
/// with the highest stream sequence the consumer had delivered when it was opened.
///
/// With `reclaim`, what an earlier owner fetched and never acknowledged is delivered
/// again at once ([`reclaim_pending`]) instead of after the consumer's ack wait.
async fn consumer(
    ctx: &StateCtx,
    kind: PartitionConsumer,
    partition: u16,
    ack_wait: Duration,
    reclaim: bool,
) -> Result<(Pulling, u64), String> {
    let stream = ctx
        .js
        .get_stream(kind.stream())
        .await
        .map_err(|e| e.to_string())?;
    let mut consumer: async_nats::jetstream::consumer::PullConsumer = stream
        // Create or update: a consumer made by an older version gets today's settings
        // (ack wait, max deliver).
        .create_consumer(kind.config(partition, ack_wait))
        .await
        .map_err(|e| e.to_string())?;
    if reclaim {
        reclaim_pending(ctx, &mut consumer, partition).await;
    }
    let delivered = consumer.cached_info().delivered.stream_sequence;
    // Short pull requests with idle heartbeats, replaced as soon as two heartbeats are
    // missed: when the consumer's leader moves to another NATS node (a node died), the
    // pending pull is lost with it. With the client's own handling the partition stalled
    // until the lost pull's expiry plus 5 s (15 s here; 35 s with the defaults).
    Pulling::open(consumer, PULL_EXPIRES, PULL_HEARTBEAT)
        .await
        .map(|messages| (messages, delivered))
        .map_err(|e| e.to_string())
}

/// Takes back, at a takeover, the messages an earlier owner of the partition fetched and
/// never acknowledged: the consumer is reset to its ack floor (JetStream 2.14, ADR-60), so
/// they are delivered again now, in order, instead of after the ack wait (10 s: after a
/// `kill -9` of a state instance the `conn.up`s of devices reconnecting meanwhile waited
/// that long in the dead owner's buffer).
///
/// Only for consumers whose messages are acknowledged in stream order (events, inbox):
/// nothing above the ack floor was acknowledged, so the reset repeats nothing that was
/// done. Why it is safe to do at once: the lease of the earlier owner ended before this
/// instance could take it (an owner stops working when its lease's local validity ends,
/// a third of the TTL before the key expires, `leases.rs`), so nothing else works on these
/// messages; a crashed owner works on nothing at all. It is the same margin every new
/// message of the partition relies on.
///
/// A reset also restarts the messages' delivery counts, which would let a message that
/// crashes every worker come back forever instead of ending at the consumer's
/// `max_deliver`. So a reset happens only when no pending message was delivered more than
/// once, and only on a worker's first attempt (a supervisor restart after a failure waits
/// for the ack wait, which counts the delivery). A failed reset changes nothing: the
/// messages come back after the ack wait.
async fn reclaim_pending(
    ctx: &StateCtx,
    consumer: &mut async_nats::jetstream::consumer::PullConsumer,
    partition: u16,
) {
    let info = consumer.cached_info();
    if info.num_ack_pending == 0 || info.num_redelivered > 0 {
        if info.num_ack_pending > 0 {
            tracing::info!(
                partition,
                consumer = %info.name,
                pending = info.num_ack_pending,
                redelivered = info.num_redelivered,
                "pending messages of an earlier owner come back after the ack wait"
            );
        }
        return;
    }
    let pending = info.num_ack_pending;
    match consumer.reset(None).await {
        Ok(_) => {
            ctx.metrics.consumer_resets.inc();
            tracing::info!(
                partition,
                consumer = %consumer.cached_info().name,
                pending,
                "unacknowledged messages of an earlier owner delivered again"
            );
        }
        Err(error) => {
            tracing::warn!(partition, %error, "consumer not reset; pending messages come back after the ack wait");
        }
    }
}

/// How long one pull request of a partition consumer waits for messages.
const PULL_EXPIRES: Duration = Duration::from_secs(10);

/// Idle heartbeat of a partition consumer's pull requests (a pull is re-sent after two
/// missed ones).
const PULL_HEARTBEAT: Duration = Duration::from_secs(1);

impl Partition {
    /// Serves the partition until `stop` fires (ownership lost or shutdown): one attempt;
    /// `Err` when the worker cannot go on (the supervisor restarts it).
    ///
    /// `first_attempt`: the supervisor's first attempt for this ownership (not a restart
    /// after a failure); only then are an earlier owner's pending messages reclaimed.
    pub async fn run(
        ctx: Arc<StateCtx>,
        partition: u16,
        stop: tether_service::Shutdown,
        first_attempt: bool,
    ) -> Result<(), String> {
        let mut worker = Partition {
            ctx: ctx.clone(),
            partition,
            devices: HashMap::new(),
        };
        let result = worker.serve(stop, first_attempt).await;
        ctx.metrics.devices.dec_by(worker.devices.len() as i64);
        result
    }

    async fn serve(&mut self, stop: tether_service::Shutdown, reclaim: bool) -> Result<(), String> {
        let p = self.partition;
        let ctx = self.ctx.clone();
        // Uplinks waiting for the business send progress every second (`uplink.rs`), so
        // the ack wait only decides how soon a dead owner's uplinks are redelivered.
        let uplink_wait = uplink::ACK_WAIT;
        let ack_wait = Duration::from_secs(10);
        // Taking the partition over (consumers, takeover snapshot) stops at once when the
        // lease goes again meanwhile: nothing was acknowledged yet, the next owner redoes it.
        let started = Instant::now();
        let mut consumers_ready = started;
        let setup = async {
            let (events, _) =
                consumer(&ctx, PartitionConsumer::Events, p, ack_wait, reclaim).await?;
            // Uplinks are acknowledged out of order (devices concurrently): a reset would
            // ask the business again for answered ones. Their ack wait is short instead.
            let (uplinks, delivered) =
                consumer(&ctx, PartitionConsumer::Uplinks, p, uplink_wait, false).await?;
            let (inbox, _) = consumer(&ctx, PartitionConsumer::Inbox, p, ack_wait, reclaim).await?;
            let acks = ctx
                .client
                .subscribe(subjects::ack_partition(p))
                .await
                .map_err(|e| e.to_string())?;
            let receipt_queries = ctx
                .client
                .subscribe(subjects::receipt_query_partition(p))
                .await
                .map_err(|e| e.to_string())?;
            tether_nats::sync_with_server(&ctx.client)
                .await
                .map_err(|e| e.to_string())?;
            consumers_ready = Instant::now();
            self.rebuild().await?;
            Ok::<_, String>((events, (uplinks, delivered), inbox, acks, receipt_queries))
        };
        let (mut events, (mut uplinks, delivered), mut inbox, mut acks, mut receipt_queries) = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            taken = setup => taken?,
        };
        tracing::info!(
            partition = p,
            devices = self.devices.len(),
            consumers_ms = (consumers_ready - started).as_millis() as u64,
            rebuild_ms = consumers_ready.elapsed().as_millis() as u64,
            "partition taken"
        );

        let (done_tx, mut done_rx) = mpsc::channel::<UplinkFinished>(1024);
        let concurrency = ctx.config.uplink_concurrency;
        let mut order = DeviceLines::new(ctx.config.uplink_pipeline);
        // Receipts live in this owner's memory (no store per UP); the watermark tells a
        // duplicate whose first copy is still to be answered from one answered before.
        let book = ReceiptBook::new(
            tether_nats::BusLayout::default().uplink_duplicate_window,
            MAX_RECEIPTS,
        );
        let mut watermark = UplinkWatermark::new(delivered);
        let mut tick = tokio::time::interval(Duration::from_millis(100));
        let outcome = loop {
            tokio::select! {
                _ = stop.cancelled() => break Ok(()),
                message = events.next() => match message {
                    Some(Ok(message)) => {
                        if !self.apply_event(&message, &stop).await {
                            // Stopped before the effect was written: the next owner gets it.
                            let _ = message.ack_with(AckKind::Nak(None)).await;
                            break Ok(());
                        }
                        let _ = message.ack().await;
                    }
                    Some(Err(error)) => tracing::debug!(partition = p, %error, "events consumer hiccup"),
                    None => break Err("events consumer ended".to_string()),
                },
                message = uplinks.next(), if order.in_flight() < concurrency => match message {
                    Some(Ok(message)) => {
                        watermark.received(stream_seq(&message));
                        // Several uplinks of one device at once, asked and settled in
                        // order; devices concurrently.
                        if let Some((message, turn)) = order.admit(message) {
                            spawn_uplink(&ctx, &book, &done_tx, message, turn);
                        }
                    }
                    Some(Err(error)) => tracing::debug!(partition = p, %error, "uplinks consumer hiccup"),
                    None => break Err("uplinks consumer ended".to_string()),
                },
                Some(finished) = done_rx.recv() => {
                    watermark.finished(finished.seq);
                    if let Some((next, turn)) = order.finished(&finished.device) {
                        spawn_uplink(&ctx, &book, &done_tx, next, turn);
                    }
                    if let Some(done) = finished.done {
                        self.on_uplink_done(done).await;
                    }
                }
                message = inbox.next() => match message {
                    Some(Ok(message)) => {
                        self.on_inbox(&message).await;
                        let _ = message.ack().await;
                    }
                    Some(Err(error)) => tracing::debug!(partition = p, %error, "inbox consumer hiccup"),
                    None => break Err("inbox consumer ended".to_string()),
                },
                Some(message) = acks.next() => self.on_ack(&message).await,
                Some(query) = receipt_queries.next() => answer_receipt_query(&ctx, &book, &watermark, query),
                _ = tick.tick() => {
                    order.keep_alive().await;
                    self.on_tick().await;
                }
            }
        };
        // Messages fetched but not handled go back at once (in order) to whoever serves
        // the partition next, instead of waiting out their ack wait.
        order.release().await;
        let reopened = events.reopened() + uplinks.reopened() + inbox.reopened();
        if reopened > 0 {
            tracing::info!(partition = p, reopened, "lost pull requests were replaced");
        }
        events.release().await;
        uplinks.release().await;
        inbox.release().await;
        self.flush_cursors().await;
        outcome
    }

    /// Applies one event, retrying with backoff while its effect cannot be written; false
    /// when `stop` fired first.
    async fn apply_event(&mut self, message: &Message, stop: &tether_service::Shutdown) -> bool {
        let mut backoff = Duration::from_millis(100);
        loop {
            match self.on_event(message).await {
                Ok(()) => return true,
                Err(error) => {
                    self.ctx.metrics.event_retries.inc();
                    tracing::warn!(partition = self.partition, %error, retry_in = ?backoff, "event not applied, retrying");
                }
            }
            tokio::select! {
                _ = stop.cancelled() => return false,
                _ = tokio::time::sleep(backoff) => {}
            }
            backoff = (backoff * 2).min(Duration::from_secs(5));
        }
    }

    /// After a takeover: every device with a route in this partition is online somewhere;
    /// resend what it has not acknowledged.
    ///
    /// Every device's cursor and first inbox window are read concurrently (at most
    /// [`REBUILD_READS`] at once): read one device after the other, a takeover of 70
    /// devices took over 3 s on a loaded machine, all of it before the partition served
    /// anything. The reads change nothing; what they found is applied one device at a time.
    async fn rebuild(&mut self) -> Result<(), String> {
        use futures::stream;
        let started = Instant::now();
        // A takeover with an incomplete picture would skip devices: fail and retry instead.
        let routes = self
            .ctx
            .store
            .routes_of_partition(self.partition)
            .await
            .map_err(|e| format!("cannot list routes: {e}"))?;
        let listed = Instant::now();
        let store = &self.ctx.store;
        let loaded: Vec<_> = stream::iter(routes)
            .map(|(app, did, route)| async move {
                let cursor = store.cursor(&app, &did).await.unwrap_or_default();
                let window = store
                    .read_inbox(&app, &did, cursor.stream_seq, INFLIGHT_WINDOW)
                    .await
                    .ok();
                (app, did, route, cursor, window)
            })
            .buffer_unordered(REBUILD_READS)
            .collect()
            .await;
        let read = Instant::now();
        for (app, did, route, cursor, window) in loaded {
            let device = Device {
                uid: route.uid.clone(),
                route: Some(route),
                cursor,
                ..Default::default()
            };
            self.ctx.metrics.devices.inc();
            self.devices.insert((app.clone(), did.clone()), device);
            if let Some((gw, frames)) = self.read_window(&app, &did, window).await {
                for frame in frames {
                    self.ctx.send_frame(&gw, &app, &[&did], frame).await;
                }
            }
        }
        let replayed = Instant::now();
        // The previous owner may have died between writing a membership and telling the
        // gateway: send every online device's sessions to its gateway again (idempotent).
        let memberships = self
            .ctx
            .store
            .memberships_of_partition(self.partition)
            .await
            .map_err(|e| format!("cannot list memberships: {e}"))?;
        for (app, did, membership) in memberships {
            if !membership.sessions.is_empty() {
                self.sync_gateway(&app, &did, &membership.sessions).await;
            }
        }
        let ms = |from: Instant, to: Instant| (to - from).as_millis() as u64;
        tracing::debug!(
            partition = self.partition,
            routes_ms = ms(started, listed),
            reads_ms = ms(listed, read),
            replay_ms = ms(read, replayed),
            memberships_ms = ms(replayed, Instant::now()),
            "partition rebuilt"
        );
        Ok(())
    }

    async fn load(&mut self, app: &str, did: &str) -> &mut Device {
        let key = (app.to_string(), did.to_string());
        if !self.devices.contains_key(&key) {
            let cursor = self.ctx.store.cursor(app, did).await.unwrap_or_default();
            self.ctx.metrics.devices.inc();
            self.devices.insert(
                key.clone(),
                Device {
                    cursor,
                    ..Default::default()
                },
            );
        }
        self.devices.entry(key).or_default()
    }

    /// Applies one event; `Err` when its effect could not be written (the caller retries
    /// with backoff and acks only after success). Refused and stale events are `Ok`.
    async fn on_event(&mut self, message: &Message) -> Result<(), String> {
        // Identity comes from the subject: a payload naming another app, a device of
        // another partition or an event kind of another subject is forged.
        let event = match crate::inputs::event(&message.subject, &message.payload) {
            Ok(event) => event,
            Err(refusal) => {
                self.ctx.metrics.refused(refusal.reason);
                tracing::warn!(subject = %message.subject, reason = refusal.reason, error = %refusal.message, "event refused");
                return Ok(());
            }
        };
        let (app, did) = match &event {
            Event::ConnUp(e) | Event::ConnDown(e) => (e.app.clone(), e.did.clone()),
            Event::SessBind(c) | Event::SessUnbind(c) | Event::SessReplace(c) => {
                (c.app.clone(), c.did.clone())
            }
        };
        // Events apply in stream order per device: one at or below the last applied is
        // a redelivery (after a crash or an owner change) and must not overwrite newer state.
        let stream_seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        let applied_to = self.applied_to(message);
        if stream_seq > 0 && stream_seq <= self.load(&app, &did).await.cursor.event_seq {
            self.ctx.metrics.stale_events.inc();
            self.tell_applied(applied_to, &did).await;
            return Ok(());
        }
        let confirm = applied_to.is_some();
        match event {
            Event::ConnUp(event) => self.on_conn_up(event).await?,
            Event::ConnDown(event) => self.on_conn_down(event).await?,
            Event::SessBind(change) => {
                self.on_session_change(change, SessionOp::Bind, confirm)
                    .await?
            }
            Event::SessUnbind(change) => {
                self.on_session_change(change, SessionOp::Unbind, confirm)
                    .await?
            }
            Event::SessReplace(change) => {
                self.on_session_change(change, SessionOp::Replace, confirm)
                    .await?
            }
        }
        if let Some(device) = self.devices.get_mut(&(app, did.clone())) {
            device.cursor.event_seq = device.cursor.event_seq.max(stream_seq);
            device.cursor_dirty = true;
        }
        self.tell_applied(applied_to, &did).await;
        Ok(())
    }

    /// The inbox a session request waits on for this event (`Tether-Applied-To`), when it
    /// is one of this service's own inboxes (anything else is ignored: state publishes
    /// only to its own reply inboxes).
    fn applied_to(&self, message: &Message) -> Option<async_nats::Subject> {
        let value = message
            .headers
            .as_ref()?
            .get(tether_nats::headers::APPLIED_TO)?;
        let own = self.ctx.client.new_inbox();
        let prefix = own.rsplit_once('.').map_or(own.as_str(), |(p, _)| p);
        let target = value.as_str();
        let token = target.strip_prefix(prefix)?.strip_prefix('.')?;
        let valid = !token.is_empty()
            && token
                .bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'_' || b == b'-');
        valid.then(|| async_nats::Subject::from(target))
    }

    /// Tells the waiting session request that the device's change is applied.
    async fn tell_applied(&self, to: Option<async_nats::Subject>, did: &str) {
        if let Some(to) = to
            && let Err(error) = self
                .ctx
                .client
                .publish(to, Bytes::copy_from_slice(did.as_bytes()))
                .await
        {
            tracing::debug!(did, %error, "applied notice not sent");
        }
    }

    /// Applies a business bind, unbind or replace of one device and tells its gateway;
    /// with `confirm`, waits (briefly) until the gateway has it too, so a broadcast sent
    /// after the session request's reply reaches the new member.
    async fn on_session_change(
        &mut self,
        change: SessionChange,
        op: SessionOp,
        confirm: bool,
    ) -> Result<(), String> {
        match self
            .change_membership(&change.app, &change.did, op, &change.sessions)
            .await
        {
            Some((sessions, true)) if confirm => {
                self.sync_gateway_confirmed(&change.app, &change.did, &sessions)
                    .await;
                Ok(())
            }
            Some((sessions, true)) => {
                self.sync_gateway(&change.app, &change.did, &sessions).await;
                Ok(())
            }
            Some((_, false)) => Ok(()),
            None => Err(format!("membership of {} not written", change.did)),
        }
    }

    /// Applies a membership change of one device: its membership record (compare-and-set),
    /// the session index, membership events. Returns the device's sessions now and whether
    /// they changed; `None` when the store failed.
    async fn change_membership(
        &mut self,
        app: &str,
        did: &str,
        op: SessionOp,
        sessions: &[String],
    ) -> Option<(Vec<String>, bool)> {
        let store = &self.ctx.store;
        for _ in 0..10 {
            let (current, revision) = match store.membership(app, did).await {
                Ok(found) => found,
                Err(error) => {
                    tracing::warn!(did, %error, "membership not readable");
                    return None;
                }
            };
            let before: BTreeSet<String> = current.sessions.iter().cloned().collect();
            let mut after = before.clone();
            match op {
                SessionOp::Bind => after.extend(sessions.iter().cloned()),
                SessionOp::Unbind => after.retain(|s| !sessions.contains(s)),
                SessionOp::Replace => after = sessions.iter().cloned().collect(),
                SessionOp::Configure => {}
            }
            if after == before {
                return Some((current.sessions, false));
            }
            let next = Membership {
                sessions: after.iter().cloned().collect(),
            };
            match store.put_membership(app, did, &next, revision).await {
                Ok(true) => {}
                Ok(false) => continue, // changed under us: read again
                Err(error) => {
                    tracing::warn!(did, %error, "membership not written");
                    return None;
                }
            }
            let joined: Vec<&String> = after.difference(&before).collect();
            let left: Vec<&String> = before.difference(&after).collect();
            let events = self.ctx.pipelines.membership_events(&self.ctx.config, app);
            for (sessions, member) in [(&joined, true), (&left, false)] {
                for session in sessions.iter() {
                    if let Err(error) = store.index_member(app, session, did, member).await {
                        // The membership is written; the index entry is retried with the
                        // event (applying it again is idempotent).
                        tracing::warn!(did, session = %session, %error, "session index not updated");
                        return None;
                    }
                    self.ctx.metrics.membership_changes.inc();
                    if events {
                        let event = MembershipEvent {
                            event: if member {
                                MembershipChange::Joined
                            } else {
                                MembershipChange::Left
                            },
                            app: app.to_string(),
                            did: did.to_string(),
                            session: session.to_string(),
                            at_ms: unix_now_ms(),
                        };
                        let _ = self
                            .ctx
                            .client
                            .publish(subjects::presence(app), event.to_json())
                            .await;
                    }
                }
            }
            return Some((next.sessions, true));
        }
        tracing::warn!(did, "membership kept changing; change dropped");
        None
    }

    /// Tells the gateway holding `did` (if online) its complete set of sessions.
    async fn sync_gateway(&self, app: &str, did: &str, sessions: &[String]) {
        let Some(gw) = self
            .devices
            .get(&(app.to_string(), did.to_string()))
            .and_then(|d| d.route.as_ref().map(|r| r.gw.clone()))
        else {
            return;
        };
        let message = GatewayControl::Sessions {
            app: app.to_string(),
            did: did.to_string(),
            sessions: sessions.to_vec(),
        };
        self.ctx.control(&gw, &message).await;
    }

    /// Like [`Self::sync_gateway`], waiting at most [`GATEWAY_CONFIRM`] for the gateway to
    /// say it applied the sessions.
    async fn sync_gateway_confirmed(&self, app: &str, did: &str, sessions: &[String]) {
        let Some(gw) = self
            .devices
            .get(&(app.to_string(), did.to_string()))
            .and_then(|d| d.route.as_ref().map(|r| r.gw.clone()))
        else {
            return;
        };
        let message = GatewayControl::Sessions {
            app: app.to_string(),
            did: did.to_string(),
            sessions: sessions.to_vec(),
        };
        self.ctx
            .control_confirmed(&gw, &message, GATEWAY_CONFIRM)
            .await;
    }

    async fn on_conn_up(&mut self, event: ConnEvent) -> Result<(), String> {
        let ctx = self.ctx.clone();
        let route = Route {
            uid: event.uid.clone(),
            gw: event.gw.clone(),
            conn: event.conn,
            region: event.region.clone(),
        };
        let key = (event.app.clone(), event.did.clone());
        self.load(&event.app, &event.did).await;
        // Written first: a push resolved after this event sees the device (route, user).
        ctx.store
            .put_route(&event.app, &event.did, &route)
            .await
            .map_err(|e| format!("route not stored: {e}"))?;
        ctx.store
            .add_user_device(&event.app, &event.uid, &event.did)
            .await
            .map_err(|e| format!("user index not updated: {e}"))?;
        let Some(device) = self.devices.get_mut(&key) else {
            return Ok(());
        };
        let returning = device.offline_at.take().is_some() || device.route.is_some();
        device.uid = event.uid.clone();
        device.cursor.last_seen_ms = unix_now_ms();
        device.cursor_dirty = true;
        let previous = device.route.replace(route.clone());
        let resume = event
            .resume_seq
            .filter(|resume| *resume > device.cursor.acked);
        if let Some(resume) = resume {
            let moved = if self.seq_was_sent(&event.app, &event.did, resume).await {
                Some(resume)
            } else {
                // Numbered in another region the device moved from (multi-region).
                let (acked, after) = self
                    .devices
                    .get(&key)
                    .map_or((0, 0), |d| (d.cursor.acked, d.cursor.stream_seq));
                crate::moves::adopt(&ctx, &event.app, &event.did, resume, acked, after).await?
            };
            if let Some(acked) = moved {
                if let Some(device) = self.devices.get_mut(&key) {
                    device.cursor.acked = acked;
                    device.cursor_dirty = true;
                }
            } else {
                self.refuse_device(
                    &event.app,
                    &event.did,
                    "resume_above_sent",
                    "login.resume_seq is above every sequence sent; resuming from the server's cursor",
                )
                .await;
            }
        }
        // A LOGIN elsewhere replaces the old connection (PROTOCOL 6.1): the gateway that
        // held it closes it with `replaced` (the same gateway already did).
        if let Some(old) = previous.filter(|old| old.gw != route.gw) {
            self.close_on_gateway(&event.app, &event.did, &old).await;
        }
        // Sessions in the token are bound like a business bind; the gateway then learns
        // every session of the device (it only knows the token's from the login).
        let Some((sessions, _)) = self
            .change_membership(&event.app, &event.did, SessionOp::Bind, &event.sessions)
            .await
        else {
            return Err(format!("membership of {} not written", event.did));
        };
        if !returning {
            ctx.presence(&presence(&event, true)).await;
        }
        // Read what the device has not acknowledged first: when retention removed some
        // of it, its floor moves past them before LOGIN_ACK (which carries the floor).
        if let Some(device) = self.devices.get_mut(&key) {
            device.inflight.clear();
        }
        let window = self.read_window(&event.app, &event.did, None).await;
        let lost = self.skip_expired(&key);
        self.registered(&event).await;
        if lost > 0 {
            // After LOGIN_ACK (whose last_acked_seq already points past the gap).
            let text = format!("{lost} messages expired before delivery; continuing after them");
            let gap = Frame::error(ErrorCode::RecoveryGap, &text, false).encode();
            ctx.send_frame(&event.gw, &event.app, &[event.did.as_str()], gap)
                .await;
        }
        for frame in window.map(|(_, frames)| frames).unwrap_or_default() {
            ctx.send_frame(&event.gw, &event.app, &[event.did.as_str()], frame)
                .await;
        }
        if !sessions.is_empty() {
            self.sync_gateway(&event.app, &event.did, &sessions).await;
        }
        Ok(())
    }

    /// When retention removed messages the device never acknowledged (the oldest one in
    /// flight is above acked + 1), moves its acked sequence to just before the oldest stored
    /// one, so LOGIN_ACK's `last_acked_seq` says where delivery continues; returns how many
    /// were lost.
    fn skip_expired(&mut self, key: &DeviceKey) -> u64 {
        let Some(device) = self.devices.get_mut(key) else {
            return 0;
        };
        let Some(&oldest) = device.inflight.keys().next() else {
            return 0;
        };
        let acked = device.cursor.acked;
        if oldest <= acked.saturating_add(1) {
            return 0;
        }
        let lost = oldest - acked - 1;
        device.cursor.acked = oldest - 1;
        device.cursor_dirty = true;
        self.ctx.metrics.expired_unacked.inc_by(lost);
        lost
    }

    /// Tells the gateway that the connection is registered (route, user index and token
    /// sessions written): the gateway answers LOGIN_ACK now, so a push sent after it
    /// reaches the device. Sent before any replayed DOWN, on the same connection, so the
    /// gateway sees it first.
    async fn registered(&self, event: &ConnEvent) {
        let acked = self
            .devices
            .get(&(event.app.clone(), event.did.clone()))
            .map_or(0, |d| d.cursor.acked);
        let control = GatewayControl::Registered {
            app: event.app.clone(),
            did: event.did.clone(),
            conn: event.conn,
            last_acked_seq: acked,
        };
        self.ctx.control(&event.gw, &control).await;
    }

    async fn on_conn_down(&mut self, event: ConnEvent) -> Result<(), String> {
        let window = Duration::from_millis(self.ctx.config.reconnect_window_ms);
        let key = (event.app.clone(), event.did.clone());
        let Some(device) = self.devices.get(&key) else {
            return Ok(());
        };
        if device.route.as_ref().is_none_or(|r| r.conn != event.conn) {
            return Ok(()); // an older connection, already replaced
        }
        self.ctx
            .store
            .delete_route(&event.app, &event.did)
            .await
            .map_err(|e| format!("route not deleted: {e}"))?;
        if let Some(device) = self.devices.get_mut(&key) {
            device.last_route = device.route.take();
            device.inflight.clear();
            device.retransmit_at = None;
            device.offline_at = Some(Instant::now() + window);
            device.cursor.last_seen_ms = unix_now_ms();
            device.cursor_dirty = true;
        }
        Ok(())
    }

    /// Reads the device's next stored messages into its in-flight window (after the last
    /// one in flight, or after its cursor) and sends them, in order.
    async fn fill(&mut self, app: &str, did: &str) {
        let Some((gw, frames)) = self.read_window(app, did, None).await else {
            return;
        };
        for frame in frames {
            self.ctx.send_frame(&gw, app, &[did], frame).await;
        }
    }

    /// Reads the device's next stored messages into its in-flight window; returns its
    /// gateway and the frames to send, in order (`None` when it is not online). `first`
    /// is the answer of the first read when the caller made it already (a full window
    /// after the cursor, for a device with nothing in flight).
    async fn read_window(
        &mut self,
        app: &str,
        did: &str,
        mut first: Option<Vec<InboxMessage>>,
    ) -> Option<(String, Vec<Bytes>)> {
        let ctx = self.ctx.clone();
        let device = self.devices.get_mut(&(app.to_string(), did.to_string()))?;
        let route = device.route.clone()?;
        let room = INFLIGHT_WINDOW.saturating_sub(device.inflight.len());
        let mut after = device
            .inflight
            .values()
            .next_back()
            .map_or(device.cursor.stream_seq, |m| m.stream_seq);
        let mut fresh = Vec::new();
        // Messages at or below the acked sequence (the cursor's stream position can lag
        // behind a resume point) are skipped and do not use the window.
        loop {
            let wanted = room.saturating_sub(fresh.len());
            if wanted == 0 {
                device.more_in_inbox = true;
                break;
            }
            let read = match first.take() {
                Some(messages) => Ok(messages),
                None => ctx.store.read_inbox(app, did, after, wanted).await,
            };
            let messages = match read {
                Ok(messages) => messages,
                Err(error) => {
                    tracing::warn!(did, %error, "inbox not readable");
                    device.more_in_inbox = true;
                    break;
                }
            };
            let complete = messages.len() < wanted;
            let read_any = !messages.is_empty();
            for message in messages {
                after = message.stream_seq;
                if message.seq <= device.cursor.acked {
                    device.cursor.stream_seq = device.cursor.stream_seq.max(message.stream_seq);
                    continue;
                }
                if let std::collections::btree_map::Entry::Vacant(slot) =
                    device.inflight.entry(message.seq)
                {
                    fresh.push(message.frame.clone());
                    slot.insert(message);
                }
            }
            if complete {
                if after < device.inbox_top && device.short_reads < MAX_SHORT_READS {
                    // Announced but not in the answer: a lagging replica answered. Read
                    // again on the next tick.
                    device.short_reads += 1;
                    ctx.metrics.inbox_short_reads.inc();
                    device.more_in_inbox = true;
                    break;
                }
                if after < device.inbox_top {
                    tracing::warn!(
                        did,
                        after,
                        announced = device.inbox_top,
                        read_any,
                        "inbox read keeps stopping below an announced message (expired?)"
                    );
                }
                device.short_reads = 0;
                device.more_in_inbox = false;
                break;
            }
        }
        if !device.inflight.is_empty() && device.retransmit_at.is_none() {
            device.retransmit_at =
                Some(Instant::now() + Duration::from_millis(ctx.config.retransmit_ms));
        }
        Some((route.gw, fresh))
    }

    async fn on_inbox(&mut self, message: &Message) {
        let Some(Subject::Inbox { app, did }) = Subject::parse(&message.subject) else {
            return;
        };
        let seq = message.headers.as_ref().map(seq_of).unwrap_or(0);
        let stream_seq = message.info().map(|i| i.stream_sequence).unwrap_or(0);
        let key = (app.to_string(), did.to_string());
        if !self.devices.contains_key(&key) {
            // Offline devices get their inbox at login; nothing to hold in memory.
            return;
        }
        let retransmit = Duration::from_millis(self.ctx.config.retransmit_ms);
        let ctx = self.ctx.clone();
        let Some(device) = self.devices.get_mut(&key) else {
            return;
        };
        let Some(route) = device.route.clone() else {
            return;
        };
        if seq <= device.cursor.acked || device.inflight.contains_key(&seq) {
            return;
        }
        device.inbox_top = device.inbox_top.max(stream_seq);
        if device.more_in_inbox || device.inflight.len() >= INFLIGHT_WINDOW {
            // Older stored messages are still unread, or the window is full: this one
            // follows in order when acks make room.
            device.more_in_inbox = true;
            return;
        }
        let frame = message.payload.clone();
        device.inflight.insert(
            seq,
            InboxMessage {
                seq,
                stream_seq,
                frame: frame.clone(),
            },
        );
        device
            .retransmit_at
            .get_or_insert_with(|| Instant::now() + retransmit);
        ctx.send_frame(&route.gw, app, &[did], frame).await;
    }

    async fn on_ack(&mut self, message: &async_nats::Message) {
        self.ctx.metrics.acks.inc();
        let Some(Subject::Ack { app, did }) = Subject::parse(&message.subject) else {
            return;
        };
        let Some(Frame::DownAck(ack)) =
            RawFrame::from_bytes(message.payload.clone(), limits::MAX_FRAME_LEN_CAP)
                .ok()
                .and_then(|raw| Frame::decode(&raw).ok())
        else {
            return;
        };
        let (app, did) = (app.to_string(), did.to_string());
        let device = self.load(&app, &did).await;
        if ack.seq <= device.cursor.acked {
            return;
        }
        let in_flight = device
            .inflight
            .keys()
            .next_back()
            .is_some_and(|top| ack.seq <= *top);
        if !in_flight && !self.seq_was_sent(&app, &did, ack.seq).await {
            // A cumulative ack above anything sent would skip messages the device has not
            // seen (and a huge one would wrap the sequence): refused, the device is told.
            self.refuse_device(
                &app,
                &did,
                "ack_above_sent",
                "down_ack.seq is above every sequence sent",
            )
            .await;
            return;
        }
        let Some(device) = self.devices.get_mut(&(app.clone(), did.clone())) else {
            return;
        };
        device.cursor.acked = ack.seq;
        let still = device.inflight.split_off(&ack.seq.saturating_add(1));
        if let Some(last) = device.inflight.values().next_back() {
            device.cursor.stream_seq = device.cursor.stream_seq.max(last.stream_seq);
        }
        device.inflight = still;
        device.cursor_dirty = true;
        if device.inflight.is_empty() {
            device.retransmit_at = None;
        }
        if device.more_in_inbox && device.inflight.len() <= INFLIGHT_WINDOW / 2 {
            self.fill(&app, &did).await;
        }
    }

    /// True when `seq` is at most the highest sequence stored for the device (or its
    /// acked cursor, when retention removed the stored ones).
    async fn seq_was_sent(&self, app: &str, did: &str, seq: u64) -> bool {
        let acked = self
            .devices
            .get(&(app.to_string(), did.to_string()))
            .map_or(0, |d| d.cursor.acked);
        if seq <= acked {
            return true;
        }
        match self.ctx.store.last_inbox_seq(app, did).await {
            Ok(last) => seq <= last,
            Err(error) => {
                tracing::warn!(did, %error, "inbox not readable, sequence check refused");
                false
            }
        }
    }

    /// Counts a refused device input and tells the device with a non-closing `bad_request`.
    async fn refuse_device(&self, app: &str, did: &str, reason: &'static str, text: &str) {
        self.ctx.metrics.refused(reason);
        let Some(gw) = self
            .devices
            .get(&(app.to_string(), did.to_string()))
            .and_then(|d| d.route.as_ref().map(|r| r.gw.clone()))
        else {
            return;
        };
        let frame = Frame::error(ErrorCode::BadRequest, text, false).encode();
        self.ctx.send_frame(&gw, app, &[did], frame).await;
    }

    /// Tells the gateway of an older connection of the device to close it (`replaced`).
    async fn close_on_gateway(&self, app: &str, did: &str, old: &Route) {
        let control = GatewayControl::Close {
            app: app.to_string(),
            did: did.to_string(),
            conn: old.conn,
            code: ErrorCode::Replaced,
        };
        self.ctx.control(&old.gw, &control).await;
    }

    async fn on_uplink_done(&mut self, done: UplinkDone) {
        let Some(frame) = done.frame else {
            return; // the gateway answered (receipt mode `stored`)
        };
        let gw = self
            .devices
            .get(&(done.app.clone(), done.did.clone()))
            .and_then(|d| d.route.as_ref().map(|r| r.gw.clone()))
            .unwrap_or(done.gw);
        self.ctx
            .send_frame(&gw, &done.app, &[done.did.as_str()], frame)
            .await;
    }

    async fn on_tick(&mut self) {
        let now = Instant::now();
        let ctx = self.ctx.clone();
        let retransmit = Duration::from_millis(ctx.config.retransmit_ms);
        let window = Duration::from_millis(ctx.config.reconnect_window_ms);
        let mut expired = Vec::new();
        let mut idle = Vec::new();
        let mut gone = Vec::new();
        let mut refill = Vec::new();
        for ((app, did), device) in self.devices.iter_mut() {
            // Stored messages wait outside the window (it was full, or a read failed):
            // read them when there is room, also without an ack to trigger it.
            if device.more_in_inbox
                && device.route.is_some()
                && device.inflight.len() <= INFLIGHT_WINDOW / 2
            {
                refill.push((app.clone(), did.clone()));
            }
            if let Some(route) = device.route.as_ref()
                && !ctx.gateways.is_alive(&route.gw)
            {
                gone.push((app.clone(), did.clone()));
                continue;
            }
            if let (Some(at), Some(route)) = (device.retransmit_at, device.route.as_ref())
                && at <= now
            {
                for message in device.inflight.values() {
                    ctx.metrics.retransmits.inc();
                    ctx.send_frame(&route.gw, app, &[did], message.frame.clone())
                        .await;
                }
                device.retransmit_at = (!device.inflight.is_empty()).then_some(now + retransmit);
            }
            if device.offline_at.is_some_and(|at| at <= now) {
                expired.push((app.clone(), did.clone()));
            } else if device.route.is_none()
                && device.offline_at.is_none()
                && device.inflight.is_empty()
                && !device.cursor_dirty
            {
                // Loaded for an ack or event of a device not online here: nothing to keep.
                idle.push((app.clone(), did.clone()));
            }
        }
        // Devices of a gateway that stopped heart-beating (killed, cut off): recycled like
        // a disconnect, so they go offline after the reconnect window.
        for (app, did) in gone {
            if let Err(error) = ctx.store.delete_route(&app, &did).await {
                tracing::warn!(%did, %error, "route of a dead gateway not deleted; retried next tick");
                continue;
            }
            if let Some(device) = self.devices.get_mut(&(app, did)) {
                ctx.metrics.gateway_recycled.inc();
                device.cursor.last_seen_ms = unix_now_ms();
                device.cursor_dirty = true;
                device.last_route = device.route.take();
                device.inflight.clear();
                device.retransmit_at = None;
                device.offline_at = Some(now + window);
            }
        }
        for (app, did) in refill {
            self.fill(&app, &did).await;
        }
        self.flush_cursors().await;
        for key in idle {
            if self.devices.get(&key).is_some_and(|d| !d.cursor_dirty) {
                self.devices.remove(&key);
                ctx.metrics.devices.dec();
            }
        }
        for key in expired {
            if let Some(device) = self.devices.remove(&key) {
                ctx.metrics.devices.dec();
                let last = device.last_route.unwrap_or(Route {
                    uid: device.uid.clone(),
                    gw: String::new(),
                    conn: 0,
                    region: String::new(),
                });
                let event = PresenceEvent {
                    app: key.0.clone(),
                    uid: device.uid.clone(),
                    did: key.1.clone(),
                    gw: last.gw,
                    conn: last.conn,
                    online: false,
                    at_ms: unix_now_ms(),
                };
                ctx.presence(&event).await;
            }
        }
    }

    /// Saves the changed cursors, all at once: written one after the other, every put that
    /// waits out its timeout (its NATS node died with it in flight) held the partition's
    /// loop for 5 s, one after the other. A cursor not saved stays dirty for the next tick.
    async fn flush_cursors(&mut self) {
        use futures::stream;
        let dirty: Vec<(DeviceKey, Cursor)> = self
            .devices
            .iter()
            .filter(|(_, device)| device.cursor_dirty)
            .map(|(key, device)| (key.clone(), device.cursor))
            .collect();
        if dirty.is_empty() {
            return;
        }
        let store = &self.ctx.store;
        let written: Vec<(DeviceKey, Cursor, bool)> = stream::iter(dirty)
            .map(|(key, cursor)| async move {
                let result = store.put_cursor(&key.0, &key.1, cursor).await;
                if let Err(error) = &result {
                    tracing::warn!(did = %key.1, %error, "cursor not saved");
                }
                (key, cursor, result.is_ok())
            })
            .buffer_unordered(CURSOR_WRITES)
            .collect()
            .await;
        let saved = written
            .into_iter()
            .filter_map(|(key, cursor, ok)| ok.then_some((key, cursor)));
        for (key, cursor) in saved {
            if let Some(device) = self.devices.get_mut(&key)
                && device.cursor == cursor
            {
                device.cursor_dirty = false;
            }
        }
    }
}

fn presence(event: &ConnEvent, online: bool) -> PresenceEvent {
    PresenceEvent {
        app: event.app.clone(),
        uid: event.uid.clone(),
        did: event.did.clone(),
        gw: event.gw.clone(),
        conn: event.conn,
        online,
        at_ms: unix_now_ms(),
    }
}

/// An uplink's processing ended (answered or terminated).
struct UplinkFinished {
    device: uplink::DeviceKey,
    /// Its stream sequence.
    seq: u64,
    done: Option<UplinkDone>,
}

/// The stream sequence of a consumer message (0 when its metadata cannot be read).
fn stream_seq(message: &Message) -> u64 {
    message.info().map_or(0, |info| info.stream_sequence)
}

fn spawn_uplink(
    ctx: &Arc<StateCtx>,
    book: &ReceiptBook,
    done: &mpsc::Sender<UplinkFinished>,
    message: Message,
    mut turn: Turn,
) {
    let (ctx, book, done) = (ctx.clone(), book.clone(), done.clone());
    tokio::spawn(async move {
        let device = uplink::device_of(&message);
        let seq = stream_seq(&message);
        let outcome = uplink::process(&ctx, &book, &message, &mut turn).await;
        uplink::settle(&message, &mut turn, outcome.is_some()).await;
        // Handed on before the next uplink of the device settles: UP_ACKs leave in order.
        let _ = done
            .send(UplinkFinished {
                device,
                seq,
                done: outcome,
            })
            .await;
        turn.settled();
    });
}

/// Answers a gateway's question about a duplicate UP (PROTOCOL 10.2): the kept UP_ACK as
/// the body, or an empty body with `Tether-Receipt: pending | unknown`. The app and did
/// come from the subject; the client message id (`Tether-Msg-Id`) and the first copy's
/// stream sequence (`Tether-Seq`) from the headers. A question without them is "unknown"
/// (the gateway then has the UP processed again, which is always safe).
fn answer_receipt_query(
    ctx: &Arc<StateCtx>,
    book: &ReceiptBook,
    watermark: &UplinkWatermark,
    query: async_nats::Message,
) {
    let Some(reply) = query.reply.clone() else {
        return;
    };
    let answer = match Subject::parse(&query.subject) {
        Some(Subject::ReceiptQuery { app, did }) => {
            let number = |name: &str| {
                query
                    .headers
                    .as_ref()
                    .and_then(|map| map.get(name))
                    .and_then(|v| v.as_str().parse::<u64>().ok())
            };
            match (number(headers::MSG_ID_CLIENT), number(headers::SEQ)) {
                (Some(cmid), Some(seq)) => watermark.answer(book, app, did, cmid, seq),
                _ => ReceiptAnswer::Unknown,
            }
        }
        _ => ReceiptAnswer::Unknown,
    };
    let label = match &answer {
        ReceiptAnswer::Kept(_) => "kept",
        ReceiptAnswer::Pending => "pending",
        ReceiptAnswer::Unknown => "unknown",
    };
    ctx.metrics
        .receipt_queries
        .get_or_create(&[("answer", label)])
        .inc();
    let client = ctx.client.clone();
    tokio::spawn(async move {
        let sent = match answer {
            ReceiptAnswer::Kept(frame) => client.publish(reply, frame).await,
            other => {
                let mut map = async_nats::HeaderMap::new();
                map.insert(
                    headers::RECEIPT,
                    other.header_value().unwrap_or(headers::RECEIPT_UNKNOWN),
                );
                client.publish_with_headers(reply, map, Bytes::new()).await
            }
        };
        if let Err(error) = sent {
            tracing::debug!(%error, "receipt answer not sent");
        }
    });
}
