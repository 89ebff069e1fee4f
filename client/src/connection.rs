//! The task that owns the connection: it serves one logged-in link at a time (commands
//! from [`crate::Client`] handles, frames from the gateway, heartbeats, redirects) and
//! reconnects between links. It alone touches the socket, the pending UPs and the QoS1
//! inbox, so none of them needs a lock.

use std::collections::BTreeMap;
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use futures::future::BoxFuture;
use tether_schemas::{ErrorCode, Frame, pb};
use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;

use self::inbound::Flow;
use crate::backoff::jittered;
use crate::config::Endpoint;
use crate::dedupe::Inbox;
use crate::error::ClientError;
use crate::event::{Event, UpAck};
use crate::login::{Link, login};
use crate::session::{Session, is_fatal};

mod inbound;

/// Frames handled back to back before the DOWN_ACK for them is sent.
const BURST: usize = 64;
/// QoS1 messages held for a gap at most.
const MAX_EARLY: usize = 1024;
/// Time given to a polite close.
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Reply to one UP.
pub(crate) type UpReply = oneshot::Sender<Result<UpAck, ClientError>>;

/// What a [`crate::Client`] handle asks the task to do.
pub(crate) enum Command {
    /// Send an encoded UP frame and answer `reply` when its UP_ACK arrives.
    Up {
        id: u64,
        frame: Bytes,
        reply: UpReply,
    },
    /// Close the connection and stop; `done` fires when it is closed.
    Close { done: oneshot::Sender<()> },
}

/// Why a link or a reconnect ended.
enum End {
    /// The app closed the client (or dropped every handle).
    Closed(Option<oneshot::Sender<()>>),
    /// The connection is gone; reconnect, no sooner than `retry_after`.
    Lost {
        code: Option<ErrorCode>,
        reason: String,
        retry_after: Duration,
        skip_current: bool,
    },
    /// Stop for good; `report` adds an [`Event::Error`] before the disconnect.
    Stop {
        code: ErrorCode,
        reason: String,
        report: bool,
    },
}

impl End {
    fn lost(reason: impl Into<String>) -> End {
        End::Lost {
            code: None,
            reason: reason.into(),
            retry_after: Duration::ZERO,
            skip_current: false,
        }
    }
}

type RedirectFuture = BoxFuture<'static, (Endpoint, String, Result<Link, ClientError>)>;

/// The connection task.
pub(crate) struct Task {
    session: Session,
    inbox: Inbox<Event>,
    /// UPs sent (or waiting to be) and not yet acknowledged, by client_msg_id.
    pending: BTreeMap<u64, (Bytes, UpReply)>,
    commands: mpsc::Receiver<Command>,
    events: mpsc::Sender<Event>,
}

impl Task {
    pub fn new(
        session: Session,
        commands: mpsc::Receiver<Command>,
        events: mpsc::Sender<Event>,
    ) -> Task {
        let inbox = Inbox::new(session.config.resume_seq, MAX_EARLY);
        Task {
            session,
            inbox,
            pending: BTreeMap::new(),
            commands,
            events,
        }
    }

    /// The first login, done before [`crate::Client::connect`] returns.
    pub async fn first_link(&mut self) -> Result<Link, ClientError> {
        self.session.connect_round(self.inbox.delivered()).await
    }

    /// Serves links and reconnects until the client stops.
    pub async fn run(mut self, mut link: Link) {
        loop {
            let end = match self.serve(link).await {
                End::Lost {
                    code,
                    reason,
                    retry_after,
                    skip_current,
                } if self.session.config.auto_reconnect => {
                    tracing::info!(did = %self.session.config.did, ?code, %reason, "connection lost, reconnecting");
                    self.emit(Event::Disconnected {
                        code,
                        reason,
                        reconnecting: true,
                    })
                    .await;
                    if skip_current {
                        self.session.skip_current();
                    }
                    match self.reconnect(retry_after).await {
                        Ok(next) => {
                            link = next;
                            continue;
                        }
                        Err(end) => end,
                    }
                }
                end => end,
            };
            self.stop(end).await;
            return;
        }
    }

    /// Ends the task: tells the app why, fails everything pending.
    async fn stop(&mut self, end: End) {
        let (code, reason, done) = match end {
            End::Closed(done) => (None, "closed by the app".to_string(), done),
            End::Lost { code, reason, .. } => (code, reason, None),
            End::Stop {
                code,
                reason,
                report,
            } => {
                if report {
                    self.emit_now(Event::Error {
                        code,
                        text: reason.clone(),
                    });
                }
                (Some(code), reason, None)
            }
        };
        tracing::info!(did = %self.session.config.did, ?code, %reason, "client stopped");
        self.commands.close();
        while let Ok(command) = self.commands.try_recv() {
            match command {
                Command::Up { reply, .. } => {
                    let _ = reply.send(Err(ClientError::Closed));
                }
                Command::Close { done } => {
                    let _ = done.send(());
                }
            }
        }
        for (_, (_, reply)) in std::mem::take(&mut self.pending) {
            let _ = reply.send(Err(ClientError::Closed));
        }
        // The app may not be reading events any more (it may be waiting in close()).
        self.emit_now(Event::Disconnected {
            code,
            reason,
            reconnecting: false,
        });
        if let Some(done) = done {
            let _ = done.send(());
        }
    }

    /// Hands an event to the app, waiting for room (backpressure on the gateway).
    async fn emit(&self, event: Event) {
        let _ = self.events.send(event).await;
    }

    /// Hands an event to the app if there is room.
    fn emit_now(&self, event: Event) {
        if self.events.try_send(event).is_err() {
            tracing::debug!("event channel full or closed, event dropped");
        }
    }

    /// Takes a command while no link is up: UPs wait in `pending` for the next login.
    fn offline_command(
        pending: &mut BTreeMap<u64, (Bytes, UpReply)>,
        command: Option<Command>,
    ) -> Result<(), End> {
        match command {
            Some(Command::Up { id, frame, reply }) => {
                pending.insert(id, (frame, reply));
                Ok(())
            }
            Some(Command::Close { done }) => Err(End::Closed(Some(done))),
            None => Err(End::Closed(None)),
        }
    }

    /// Reconnect rounds with backoff until one logs in (or the client must stop).
    async fn reconnect(&mut self, retry_after: Duration) -> Result<Link, End> {
        let backoff = self.session.config.reconnect;
        let mut wait = backoff.delay(0).max(retry_after);
        let mut attempt = 0u32;
        loop {
            let sleep = tokio::time::sleep(wait);
            tokio::pin!(sleep);
            loop {
                tokio::select! {
                    _ = &mut sleep => break,
                    command = self.commands.recv() => Self::offline_command(&mut self.pending, command)?,
                }
            }
            self.pending.retain(|_, (_, reply)| !reply.is_closed());
            let resume_seq = self.inbox.delivered();
            let round = self.session.connect_round(resume_seq);
            tokio::pin!(round);
            let result = loop {
                tokio::select! {
                    result = &mut round => break result,
                    command = self.commands.recv() => Self::offline_command(&mut self.pending, command)?,
                }
            };
            match result {
                Ok(link) => return Ok(link),
                Err(error) if is_fatal(&error) => {
                    return Err(End::Stop {
                        code: error.code(),
                        reason: error.to_string(),
                        report: true,
                    });
                }
                Err(error) => {
                    attempt = attempt.saturating_add(1);
                    let hint = match &error {
                        ClientError::Login { retry_after_ms, .. } => {
                            Duration::from_millis(u64::from(*retry_after_ms))
                        }
                        _ => Duration::ZERO,
                    };
                    wait = backoff.delay(attempt).max(hint);
                    tracing::debug!(%error, ?wait, "reconnect round failed");
                }
            }
        }
    }

    /// Starts using a fresh link: adopt the server's ack point, tell the app, resend
    /// every unacknowledged UP with its original client_msg_id.
    async fn on_login(&mut self, link: &mut Link) -> Result<(), End> {
        self.inbox.acked_by_server(link.ack.last_acked_seq);
        tracing::info!(did = %self.session.config.did, gw = %link.ack.gateway, conn = link.ack.conn_id, endpoint = %link.endpoint, "logged in");
        self.emit(Event::Connected {
            gateway: link.ack.gateway.clone(),
            conn_id: link.ack.conn_id,
            endpoint: link.endpoint.to_string(),
        })
        .await;
        self.pending.retain(|_, (_, reply)| !reply.is_closed());
        for (frame, _) in self.pending.values() {
            link.transport
                .send(frame.clone())
                .await
                .map_err(|e| End::lost(e.to_string()))?;
        }
        Ok(())
    }

    /// Serves one link until it ends. A REDIRECT swaps in the new link without ending.
    async fn serve(&mut self, mut link: Link) -> End {
        if let Err(end) = self.on_login(&mut link).await {
            return end;
        }
        let (mut interval, mut jitter) = self.session.config.heartbeat_for(link.ack.heartbeat_secs);
        let mut last_rx = Instant::now();
        let mut next_ping = last_rx + jittered(interval, jitter);
        let mut redirect: Option<RedirectFuture> = None;
        loop {
            let dead_at = last_rx + interval * 2;
            tokio::select! {
                command = self.commands.recv() => match command {
                    Some(Command::Up { id, frame, reply }) => {
                        if reply.is_closed() {
                            continue;
                        }
                        self.pending.insert(id, (frame.clone(), reply));
                        if let Err(error) = link.transport.send(frame).await {
                            return End::lost(error.to_string());
                        }
                    }
                    Some(Command::Close { done }) => {
                        link.transport.close(CLOSE_TIMEOUT).await;
                        return End::Closed(Some(done));
                    }
                    None => {
                        link.transport.close(CLOSE_TIMEOUT).await;
                        return End::Closed(None);
                    }
                },
                read = link.transport.recv() => {
                    let mut read = Some(read);
                    let mut handled = 0;
                    let mut ended = None;
                    // Handle the burst of frames already received, then ack it once.
                    while let Some(result) = read.take() {
                        let raw = match result {
                            Ok(Some(raw)) => raw,
                            Ok(None) => {
                                ended = Some(End::lost("connection closed by the gateway"));
                                break;
                            }
                            Err(error) => {
                                ended = Some(End::lost(error.to_string()));
                                break;
                            }
                        };
                        match self.handle(&raw).await {
                            Flow::Continue => {}
                            Flow::End(end) => {
                                ended = Some(end);
                                break;
                            }
                            Flow::Redirect(to) => {
                                if redirect.is_some() {
                                    tracing::debug!("redirect already under way, ignored");
                                } else {
                                    redirect = self.start_redirect(to);
                                }
                            }
                        }
                        handled += 1;
                        if handled < BURST {
                            read = link.transport.recv().now_or_never();
                        }
                    }
                    if let Some(end) = ended {
                        // The old gateway closes a redirected connection once the new login
                        // is registered, maybe before its LOGIN_ACK reached us (PROTOCOL.md
                        // 6.6): the redirect's outcome decides, not the old connection's end.
                        let Some(moving) = redirect.take() else {
                            return end;
                        };
                        let (endpoint, token, result) = moving.await;
                        let Ok(next) = result else {
                            return end;
                        };
                        tracing::info!(%endpoint, "redirected");
                        self.session.adopt(endpoint, token);
                        let old = std::mem::replace(&mut link, next);
                        tokio::spawn(old.transport.close(CLOSE_TIMEOUT));
                        if let Err(end) = self.on_login(&mut link).await {
                            return end;
                        }
                        (interval, jitter) = self.session.config.heartbeat_for(link.ack.heartbeat_secs);
                        last_rx = Instant::now();
                        next_ping = last_rx + jittered(interval, jitter);
                        continue;
                    }
                    if let Some(seq) = self.inbox.take_ack()
                        && let Err(error) = link.transport.send(Frame::DownAck(pb::DownAck { seq }).encode()).await
                    {
                        return End::lost(error.to_string());
                    }
                    // Time spent waiting for the app to take events is not the gateway's silence.
                    last_rx = Instant::now();
                },
                _ = tokio::time::sleep_until(next_ping.min(dead_at)) => {
                    let now = Instant::now();
                    if now >= dead_at {
                        // A stalled gateway (paused process, full event loop) still accepts
                        // TCP connections: the next round starts at another endpoint.
                        return End::Lost {
                            code: None,
                            reason: "no frame from the gateway for two heartbeat intervals".into(),
                            retry_after: Duration::ZERO,
                            skip_current: true,
                        };
                    }
                    if let Err(error) = link.transport.send(Frame::Ping(Bytes::new()).encode()).await {
                        return End::lost(error.to_string());
                    }
                    next_ping = now + jittered(interval, jitter);
                    self.pending.retain(|_, (_, reply)| !reply.is_closed());
                },
                moved = async { match redirect.as_mut() { Some(f) => f.await, None => std::future::pending().await } }, if redirect.is_some() => {
                    redirect = None;
                    let (endpoint, token, result) = moved;
                    match result {
                        Ok(next) => {
                            tracing::info!(%endpoint, "redirected");
                            self.session.adopt(endpoint, token);
                            let old = std::mem::replace(&mut link, next);
                            // Close the old connection in the background: the new one is live.
                            tokio::spawn(old.transport.close(CLOSE_TIMEOUT));
                            if let Err(end) = self.on_login(&mut link).await {
                                return end;
                            }
                            (interval, jitter) = self.session.config.heartbeat_for(link.ack.heartbeat_secs);
                            last_rx = Instant::now();
                            next_ping = last_rx + jittered(interval, jitter);
                        }
                        Err(error) => {
                            self.emit(Event::Error { code: error.code(), text: format!("redirect to {endpoint} failed: {error}") }).await;
                            if self.session.config.discovery.is_some() {
                                // PROTOCOL 6.6: fall back to ipconfig. The old gateway is
                                // moving this device away; it would close it later anyway.
                                tracing::warn!(%endpoint, %error, "redirect failed, reconnecting through ipconfig");
                                return End::Lost {
                                    code: Some(ErrorCode::GoingAway),
                                    reason: format!("redirect to {endpoint} failed: {error}"),
                                    retry_after: Duration::ZERO,
                                    skip_current: true,
                                };
                            }
                            // Nowhere else to ask: stay until the old gateway closes us.
                            tracing::warn!(%endpoint, %error, "redirect failed, staying (no ipconfig configured)");
                        }
                    }
                },
            }
        }
    }

    /// Starts logging in at a REDIRECT's endpoint; the current link keeps running.
    fn start_redirect(&self, to: pb::Redirect) -> Option<RedirectFuture> {
        let endpoint = match to.endpoint.parse::<Endpoint>() {
            Ok(endpoint) if !endpoint.is_tls() => endpoint,
            Ok(_) | Err(_) => {
                tracing::warn!(endpoint = %to.endpoint, "redirect to an endpoint this client cannot use, ignored");
                return None;
            }
        };
        tracing::info!(%endpoint, reason = %to.reason, "redirect requested");
        let params = self
            .session
            .params(to.token.clone(), self.inbox.delivered());
        let token = to.token;
        Some(Box::pin(async move {
            let result = login(endpoint.clone(), params).await;
            (endpoint, token, result)
        }))
    }
}
