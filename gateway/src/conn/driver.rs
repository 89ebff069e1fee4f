//! The task of one connection: read frames, handle them, write what is queued, close with
//! a reason. One task per connection, holding no buffer while the connection is idle.
//!
//! Memory of an idle connection (BENCHMARKS.md): tokio allocates a task as one cell
//! aligned to 128 bytes (header, future, trailer), so the future's size decides between a
//! 256- and a 384-byte task. The task's future is [`ConnTask`], a hand-written state
//! machine: while idle it is the [`Driver`] and a tag, nothing else; the handling of a
//! wake-up runs as a boxed future that owns the driver and gives it back.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tether_schemas::{ErrorCode, Frame, FrameError, FrameType, RawFrame, pb, split_frame};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::{Instrument, Span};

use std::os::fd::AsRawFd;

use super::io::Stream;
use super::shared::{CloseReason, ConnShared, Identity};
use super::state::{ConnState, Transport};
use crate::context::GatewayCtx;
use crate::handoff::messages::{MovedConn, MovedIdentity};
use crate::ws::{self, WsDecoder, WsEvent};
use tether_schemas::bus::{ConnEvent, Event, unix_now_ms, valid_id};
use tether_schemas::limits;

const WRITE_TIMEOUT: Duration = Duration::from_secs(30);
const CLOSE_TIMEOUT: Duration = Duration::from_secs(2);

/// Starts the task of a connection, which runs until it closes. `input` holds bytes
/// already read (after a WebSocket handshake); `permit` is its slot under the gateway's
/// connection limit, given back when the task ends.
pub fn spawn(
    ctx: Arc<GatewayCtx>,
    stream: Stream,
    transport: Transport,
    tls: bool,
    remote: SocketAddr,
    input: BytesMut,
    permit: OwnedSemaphorePermit,
) {
    let shared = Arc::new(ConnShared::new(ctx.next_conn_id(), ctx.clock.now()));
    ctx.timers.track(&shared);
    ctx.metrics.connections.inc();
    let span =
        tracing::debug_span!("conn", conn = shared.id, %remote, transport = transport.as_str());
    let burst = ctx
        .config
        .max_frames_per_sec
        .saturating_mul(2)
        .saturating_mul(1000);
    let ws = (transport == Transport::Ws).then(Box::default);
    let span = (!span.is_disabled()).then(|| Box::new(span));
    if let Stream::Plain(socket) = &stream {
        shared.set_fd(socket.as_raw_fd());
    }
    let rate_refilled_ms = ctx.clock.now_ms();
    launch(Driver {
        ctx,
        shared,
        stream,
        ws,
        span,
        input: boxed_input(input),
        remote,
        acked_seq: 0,
        rate_refilled_ms,
        rate_tokens_milli: burst,
        tls,
        _slot: ConnSlot::new(permit),
    });
}

/// Runs a connection's task until it closes, or parks it for a hand-off.
fn launch(driver: Driver) {
    tokio::spawn(ConnTask::new(driver));
}

/// Starts the task of a dormant connection again (see [`super::dormant`]).
pub(super) fn relaunch(driver: Driver) {
    launch(driver);
}

/// A connection's place under the gateway's connection limit, given back on drop. The
/// semaphore alone (8 bytes), where a tokio permit also carries its count (16).
struct ConnSlot(Arc<Semaphore>);

impl ConnSlot {
    fn new(permit: OwnedSemaphorePermit) -> Self {
        let semaphore = permit.semaphore().clone();
        let permits = permit.num_permits();
        permit.forget();
        if permits != 1 {
            // Never happens (one permit per connection); keep the count right regardless.
            semaphore.add_permits(permits);
            semaphore.forget_permits(1);
        }
        Self(semaphore)
    }
}

impl Drop for ConnSlot {
    fn drop(&mut self) {
        self.0.add_permits(1);
    }
}

/// A connection task stopped for a hand-off: everything it owns, its socket included.
pub struct Parked(Box<Driver>);

impl Parked {
    /// The connection's id.
    pub fn id(&self) -> u64 {
        self.0.shared.id
    }

    /// The connection's shared part.
    pub fn shared(&self) -> &Arc<ConnShared> {
        &self.0.shared
    }

    /// The connection's state for the next process (nothing is taken from it: an aborted
    /// hand-off resumes it as it was).
    pub fn export(&self) -> MovedConn {
        let driver = &self.0;
        let identity = driver.shared.identity().map(|id| MovedIdentity {
            app: id.app().to_string(),
            uid: id.uid().to_string(),
            did: id.did().to_string(),
            may_uplink: id.may_uplink,
            rights: id.rights,
        });
        let joined = driver
            .shared
            .identity()
            .map(|id| driver.ctx.sessions.sessions_of(id.app(), id.did()))
            .unwrap_or_default();
        MovedConn {
            state: driver.state(),
            identity,
            joined,
            queued: driver.shared.queued(),
            ws_partial: driver
                .ws
                .as_ref()
                .and_then(|ws| ws.partial().map(<[u8]>::to_vec)),
            ws: driver.ws.is_some(),
            silent_secs: driver
                .ctx
                .clock
                .now()
                .saturating_sub(driver.shared.last_seen()),
        }
    }

    /// Old process, hand-off aborted: the task carries on.
    pub fn resume(self) {
        self.0.shared.clear_park();
        // Frames may have been queued while it was parked.
        self.0.shared.wake_task();
        launch(*self.0);
    }

    /// New process: a connection from `moved` over `socket` (already registered with the
    /// runtime, at prepare; not running yet).
    pub fn adopt(
        ctx: &Arc<GatewayCtx>,
        moved: MovedConn,
        socket: tokio::net::TcpStream,
        permit: OwnedSemaphorePermit,
    ) -> Parked {
        let fd = socket.as_raw_fd();
        let stream = Stream::Plain(socket);
        let now = ctx.clock.now();
        let shared = Arc::new(ConnShared::new(moved.state.conn_id, now));
        shared.set_fd(fd);
        shared.touch(now.saturating_sub(moved.silent_secs));
        if let Some(id) = moved.identity {
            shared.set_identity(Identity::new(
                ctx.app_traffic.counters(&id.app),
                &id.uid,
                &id.did,
                id.may_uplink,
                id.rights,
                moved.state.transport,
            ));
        }
        for frame in moved.queued {
            shared.push(frame, true, usize::MAX);
        }
        let state = moved.state;
        let ws = moved
            .ws
            .then(|| Box::new(WsDecoder::with_partial(moved.ws_partial)));
        let span = tracing::debug_span!("conn", conn = shared.id, remote = %state.remote, transport = state.transport.as_str());
        let span = (!span.is_disabled()).then(|| Box::new(span));
        Parked(Box::new(Driver {
            ctx: ctx.clone(),
            shared,
            stream,
            ws,
            span,
            input: boxed_input(state.input),
            remote: state.remote,
            acked_seq: state.acked_seq,
            // The rate bucket's clock is this process's.
            rate_refilled_ms: ctx.clock.now_ms(),
            rate_tokens_milli: state.rate_tokens_milli,
            tls: state.tls,
            _slot: ConnSlot::new(permit),
        }))
    }

    /// New process, before it says *committed*: registers the connection (registry,
    /// sessions, timers, gauges). Nothing reaches it yet: downlinks and control messages
    /// are held by the gate until `Go`, and its task starts only then ([`Parked::start`]);
    /// an aborted hand-off ends this process, registrations included. `joined` are the
    /// sessions it was a member of.
    pub fn register(&self, joined: &[String]) {
        let driver = &self.0;
        let ctx = &driver.ctx;
        ctx.timers.track(&driver.shared);
        ctx.metrics.connections.inc();
        if let Some(identity) = driver.shared.identity() {
            ctx.registry.reserve_app(identity.app(), 0);
            ctx.registry.insert(driver.shared.clone());
            ctx.metrics.sessions.inc();
            if !joined.is_empty() {
                ctx.sessions
                    .join(&driver.shared, identity.app(), identity.did(), joined);
            }
        }
    }

    /// New process, after `Go`: starts the registered connection's task.
    pub fn start(self) {
        self.0.shared.wake_task();
        launch(*self.0);
    }
}

/// Half-read input kept only when there is some (an empty buffer costs nothing).
fn boxed_input(input: BytesMut) -> Option<Box<BytesMut>> {
    (!input.is_empty()).then(|| Box::new(input))
}

/// Everything a connection's task owns. Every field is small on purpose (see the size
/// test): rarely used parts are boxed, and what a LOGIN carries only for the `conn.up`
/// event (resume point, token sessions) is not kept after it.
pub(super) struct Driver {
    ctx: Arc<GatewayCtx>,
    shared: Arc<ConnShared>,
    stream: Stream,
    /// Boxed: WebSocket connections only, and the task's future stays small for TCP.
    ws: Option<Box<WsDecoder>>,
    /// The connection's debug span, only when debug logging is on (boxed, so it costs a
    /// pointer otherwise); it instruments frame handling and the close.
    span: Option<Box<Span>>,
    /// Bytes received but not yet a complete frame (`None`, unallocated, while idle).
    input: Option<Box<BytesMut>>,
    /// Peer address.
    remote: SocketAddr,
    /// Highest cumulative DOWN_ACK seen from the client.
    acked_seq: u64,
    /// Gateway-clock millisecond of the frame-rate bucket's last refill.
    rate_refilled_ms: u64,
    /// Frame-rate token bucket: tokens left, in thousandths.
    rate_tokens_milli: u32,
    /// Whether TLS is used.
    tls: bool,
    _slot: ConnSlot,
}

type Handled = Result<(), CloseReason>;

/// What woke an idle connection.
enum Wake {
    /// Frames were queued or a close was requested.
    Queued,
    /// Input was appended to the buffer (`Ok(0)`: the peer closed).
    Read(std::io::Result<usize>),
}

/// A boxed future that owns a driver while it handles a wake-up and gives it back.
type Busy = Pin<Box<dyn Future<Output = (Driver, Handled)> + Send>>;

/// The future of a connection's task: the driver itself while idle (one await, no nested
/// future, no buffer), a boxed future while it handles a wake-up or says goodbye.
enum ConnTask {
    /// Waiting for input or queued frames.
    Idle(Driver),
    /// Handling input or writing queued frames.
    Busy(Busy),
    /// Saying goodbye, unregistering and reporting.
    Closing(Pin<Box<dyn Future<Output = ()> + Send>>),
    /// Closed, or parked for a hand-off.
    Done,
}

impl ConnTask {
    /// The task of `driver`: handles any input it already holds first.
    fn new(mut driver: Driver) -> Self {
        match driver.input.take() {
            Some(input) => {
                driver.input = Some(input);
                Self::process_input(driver)
            }
            None => Self::Idle(driver),
        }
    }

    /// Handles the input the driver holds, in a boxed future (instrumented with its span).
    fn process_input(mut driver: Driver) -> Self {
        let span = driver.span();
        Self::Busy(Box::pin(
            async move {
                let handled = driver.process_input().await;
                (driver, handled)
            }
            .instrument(span),
        ))
    }

    /// Writes what is queued, in a boxed future (instrumented with its span).
    fn flush(mut driver: Driver) -> Self {
        let span = driver.span();
        Self::Busy(Box::pin(
            async move {
                let handled = match driver.flush().await {
                    Some(reason) => Err(reason),
                    None => Ok(()),
                };
                (driver, handled)
            }
            .instrument(span),
        ))
    }

    /// Says goodbye with `reason`.
    fn closing(mut driver: Driver, reason: CloseReason) -> Self {
        let span = driver.span();
        Self::Closing(Box::pin(
            async move { driver.finish(reason).await }.instrument(span),
        ))
    }

    /// What an idle driver does about `wake`.
    fn on_wake(driver: Driver, wake: Wake) -> Self {
        match wake {
            Wake::Queued => {
                if driver.shared.should_park() {
                    let ctx = driver.ctx.clone();
                    ctx.handoff.park(Parked(Box::new(driver)));
                    return Self::Done;
                }
                if driver.shared.take_sleep_request() {
                    let ctx = driver.ctx.clone();
                    match ctx.dormant.put(Box::new(driver)) {
                        Ok(()) => return Self::Done,
                        Err(awake) => {
                            awake.shared.woke_up();
                            return Self::flush(*awake);
                        }
                    }
                }
                Self::flush(driver)
            }
            Wake::Read(Ok(0)) => {
                Self::closing(driver, CloseReason::silent(ErrorCode::Ok, "peer closed"))
            }
            Wake::Read(Ok(n)) => {
                driver.ctx.metrics.bytes_in.inc_by(n as u64);
                Self::process_input(driver)
            }
            Wake::Read(Err(error)) => Self::closing(
                driver,
                CloseReason::silent(ErrorCode::Ok, format!("read failed: {error}")),
            ),
        }
    }
}

impl Future for ConnTask {
    type Output = ();

    fn poll(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<()> {
        let task = self.get_mut();
        loop {
            *task = match std::mem::replace(task, ConnTask::Done) {
                ConnTask::Idle(mut driver) => match driver.poll_wake(cx) {
                    Poll::Ready(wake) => ConnTask::on_wake(driver, wake),
                    Poll::Pending => {
                        *task = ConnTask::Idle(driver);
                        return Poll::Pending;
                    }
                },
                ConnTask::Busy(mut work) => match work.as_mut().poll(cx) {
                    Poll::Ready((driver, Ok(()))) => ConnTask::Idle(driver),
                    Poll::Ready((driver, Err(reason))) => ConnTask::closing(driver, reason),
                    Poll::Pending => {
                        *task = ConnTask::Busy(work);
                        return Poll::Pending;
                    }
                },
                ConnTask::Closing(mut goodbye) => match goodbye.as_mut().poll(cx) {
                    Poll::Ready(()) => return Poll::Ready(()),
                    Poll::Pending => {
                        *task = ConnTask::Closing(goodbye);
                        return Poll::Pending;
                    }
                },
                ConnTask::Done => return Poll::Ready(()),
            };
        }
    }
}

/// What [`super::dormant`] does with a driver.
impl Driver {
    /// The connection's shared part.
    pub(super) fn shared(&self) -> &Arc<ConnShared> {
        &self.shared
    }

    /// The gateway's metrics.
    pub(super) fn metrics(&self) -> &crate::metrics::GatewayMetrics {
        &self.ctx.metrics
    }

    /// Whether the connection may go dormant: a plain socket (TLS state stays with a task).
    pub(super) fn can_sleep(&self) -> bool {
        matches!(self.stream, Stream::Plain(_))
    }

    /// Takes the plain socket out of the runtime; `Err` when that failed (the socket is
    /// then gone, and the connection closes when its task runs).
    pub(super) fn take_socket(&mut self) -> Result<std::net::TcpStream, ()> {
        match std::mem::replace(&mut self.stream, Stream::Gone) {
            Stream::Plain(socket) => socket.into_std().map_err(|error| {
                tracing::debug!(conn = self.shared.id, %error, "socket lost leaving the runtime");
            }),
            other => {
                self.stream = other;
                Err(())
            }
        }
    }

    /// Keeps the socket out of the runtime while dormant.
    pub(super) fn keep_socket(&mut self, socket: std::net::TcpStream) {
        self.stream = Stream::Dormant(socket);
    }

    /// The socket of a dormant connection.
    pub(super) fn dormant_socket(&self) -> Option<&std::net::TcpStream> {
        match &self.stream {
            Stream::Dormant(socket) => Some(socket),
            _ => None,
        }
    }

    /// Registers `socket` with the runtime again (no socket if that fails: the task then
    /// closes the connection).
    pub(super) fn return_socket(&mut self, socket: std::net::TcpStream) {
        self.stream = match tokio::net::TcpStream::from_std(socket) {
            Ok(socket) => Stream::Plain(socket),
            Err(error) => {
                tracing::debug!(conn = self.shared.id, %error, "socket lost returning to the runtime");
                Stream::Gone
            }
        };
    }

    /// Leaves dormancy: the socket back in the runtime, the connection awake.
    pub(super) fn wake_socket(&mut self) {
        if let Stream::Dormant(socket) = std::mem::replace(&mut self.stream, Stream::Gone) {
            self.return_socket(socket);
        }
        self.shared.woke_up();
    }
}

impl Driver {
    /// The connection's span (disabled unless debug logging is on).
    fn span(&self) -> Span {
        self.span.as_deref().cloned().unwrap_or_else(Span::none)
    }

    /// The connection's transport.
    fn transport(&self) -> Transport {
        if self.ws.is_some() {
            Transport::Ws
        } else {
            Transport::Tcp
        }
    }

    /// The plain state a hand-off moves. The LOGIN's resume point and token sessions are
    /// not kept once its `conn.up` is out (nothing reads them after), so they move empty.
    fn state(&self) -> ConnState {
        ConnState {
            conn_id: self.shared.id,
            transport: self.transport(),
            tls: self.tls,
            remote: self.remote,
            acked_seq: self.acked_seq,
            resume_seq: 0,
            sessions: Vec::new(),
            rate_tokens_milli: self.rate_tokens_milli,
            rate_refilled_ms: self.rate_refilled_ms,
            input: self.input.as_deref().cloned().unwrap_or_default(),
        }
    }

    /// Queue wake-up first (replies and closes before more input), then socket input.
    fn poll_wake(&mut self, cx: &mut Context<'_>) -> Poll<Wake> {
        if self.shared.poll_woken(cx).is_ready() {
            return Poll::Ready(Wake::Queued);
        }
        let mut input = self.input.take().map(|b| *b).unwrap_or_default();
        let read = self.stream.poll_read_into(cx, &mut input);
        self.input = boxed_input(input);
        read.map(Wake::Read)
    }

    /// Handles the complete frames of the input buffer.
    async fn process_input(&mut self) -> Handled {
        let mut input = self.input.take().map(|b| *b).unwrap_or_default();
        let handled = self.process(&mut input).await;
        // An empty buffer is dropped: an idle connection holds no allocation.
        self.input = boxed_input(input);
        handled
    }

    /// Handles every complete frame in `input`.
    async fn process(&mut self, input: &mut BytesMut) -> Handled {
        let max = self.ctx.config.max_frame_len;
        loop {
            let raw = match self.ws.as_mut() {
                None => match split_frame(input, max) {
                    Ok(Some(raw)) => raw,
                    Ok(None) => return Ok(()),
                    Err(error) => return Err(frame_error(&error)),
                },
                Some(decoder) => match decoder.decode(input, max) {
                    Ok(Some(WsEvent::Binary(message))) => {
                        RawFrame::from_bytes(message, max).map_err(|e| frame_error(&e))?
                    }
                    Ok(Some(WsEvent::Ping(payload))) => {
                        self.shared.touch(self.ctx.clock.now());
                        let pong = ws::encode_control(ws::opcode::PONG, &payload);
                        self.write_raw(&pong).await?;
                        continue;
                    }
                    Ok(Some(WsEvent::Pong(_))) => continue,
                    Ok(Some(WsEvent::Close { .. })) => {
                        return Err(CloseReason::silent(
                            ErrorCode::Ok,
                            "websocket closed by peer",
                        ));
                    }
                    Ok(None) => return Ok(()),
                    Err(error) => {
                        let code = match error {
                            ws::WsError::TooLarge { .. } => ErrorCode::FrameTooLarge,
                            _ => ErrorCode::BadFrame,
                        };
                        return Err(CloseReason::error(code, format!("websocket: {error}")));
                    }
                },
            };
            self.handle(raw).await?;
        }
    }

    async fn handle(&mut self, raw: RawFrame) -> Handled {
        self.shared.touch(self.ctx.clock.now());
        if let Err(retry_after_ms) = self.take_rate_token() {
            let mut reason =
                CloseReason::error(ErrorCode::RateLimited, "too many frames per second");
            reason.retry_after_ms = retry_after_ms;
            return Err(reason);
        }
        let kind = raw.kind().ok();
        if self.shared.identity().is_none() {
            // Before LOGIN_ACK only LOGIN is accepted: any other type, reserved ones
            // included, closes with login_required (PROTOCOL 6.1).
            return match kind {
                Some(FrameType::Login) => {
                    self.count_in(FrameType::Login);
                    self.login(&raw).await
                }
                _ => Err(CloseReason::error(
                    ErrorCode::LoginRequired,
                    "the first frame must be LOGIN",
                )),
            };
        }
        let Some(kind) = kind else {
            // A reserved type after login: skipped, the connection stays (PROTOCOL 3.3).
            self.reply_error(ErrorCode::BadFrame, "unknown frame type, ignored");
            return Ok(());
        };
        self.count_in(kind);
        match kind {
            FrameType::Ping => {
                // PING has no variable header (3.3): one is a malformed frame.
                if raw.header.header_len == 0 {
                    self.reply(&Frame::Pong(raw.body()));
                    Ok(())
                } else {
                    Err(CloseReason::error(
                        ErrorCode::BadFrame,
                        "ping must have no variable header",
                    ))
                }
            }
            FrameType::Up => self.uplink(raw).await,
            FrameType::DownAck => self.down_ack(raw).await,
            FrameType::Login => {
                self.reply_error(ErrorCode::BadRequest, "already logged in");
                Ok(())
            }
            _ => {
                self.reply_error(ErrorCode::BadRequest, "frame type is not sent by clients");
                Ok(())
            }
        }
    }

    async fn login(&mut self, raw: &RawFrame) -> Handled {
        let Frame::Login(login) = Frame::decode(raw).map_err(|e| frame_error(&e))? else {
            return Err(CloseReason::error(ErrorCode::BadFrame, "malformed login"));
        };
        if let Err(why) = check_login_fields(&login) {
            self.ctx.metrics.refused("login_field");
            return Err(CloseReason::error(ErrorCode::BadRequest, why));
        }
        let config = &self.ctx.config;
        let claims = self
            .ctx
            .verifier
            .verify(&login.token, tether_auth::unix_now())
            .map_err(|e| {
                if e.is_expired() {
                    CloseReason::error(ErrorCode::TokenExpired, "token expired")
                } else {
                    CloseReason::error(ErrorCode::BadToken, format!("invalid token: {e}"))
                }
            })?;
        if !login.did.is_empty() && login.did != claims.did {
            return Err(CloseReason::error(
                ErrorCode::BadToken,
                "did does not match the token",
            ));
        }
        if !login.app.is_empty() && login.app != claims.app {
            return Err(CloseReason::error(
                ErrorCode::WrongApp,
                "app does not match the token",
            ));
        }
        if !config.apps.is_empty() && !config.apps.contains(&claims.app) {
            return Err(CloseReason::error(
                ErrorCode::WrongApp,
                "app is not served by this gateway",
            ));
        }
        if claims.gw.as_ref().is_some_and(|gw| *gw != config.id) {
            return Err(CloseReason::error(
                ErrorCode::BadToken,
                "token is for another gateway",
            ));
        }
        if self.ctx.app_limits.paused(&claims.app) {
            self.ctx.metrics.refused("app_paused");
            let mut reason = CloseReason::error(ErrorCode::AppPaused, "app paused by the operator");
            reason.retry_after_ms = crate::app_limits::PAUSED_RETRY_MS;
            return Err(reason);
        }
        if self.ctx.outbound.client().connection_state() != async_nats::connection::State::Connected
        {
            // State could not register the login (its conn.up cannot be stored): refuse
            // at once instead of after `registration_timeout_ms`, so the SDK tries
            // another endpoint (another region when this region's NATS is down).
            self.ctx.metrics.refused("nats_down");
            let mut reason = CloseReason::error(
                ErrorCode::Unavailable,
                "gateway has lost its nats connection, try another endpoint",
            );
            reason.retry_after_ms = 1_000;
            return Err(reason);
        }
        let app_limit = self
            .ctx
            .app_limits
            .connection_limit(&claims.app, config.max_connections_per_app);
        if !self.ctx.registry.reserve_app(&claims.app, app_limit) {
            return Err(CloseReason::error(
                ErrorCode::TooManyConnections,
                "app connection limit reached",
            ));
        }
        let identity = Identity::new(
            self.ctx.app_traffic.counters(&claims.app),
            &claims.uid,
            &claims.did,
            claims.may_uplink(),
            claims.rights,
            self.transport(),
        );
        self.shared.set_identity(identity);
        // What conn.up says besides the identity (not kept after it).
        let up = Some((login.resume_seq, claims.sess.as_slice()));
        if let Some(old) = self.ctx.registry.insert(self.shared.clone()) {
            old.close(CloseReason::error(
                ErrorCode::Replaced,
                "the device logged in on another connection",
            ));
        }
        self.ctx.metrics.logins.inc();
        self.ctx.metrics.sessions.inc();
        tracing::debug!(app = %claims.app, did = %claims.did, "logged in");
        if config.await_registration {
            // LOGIN_ACK only once state has registered the connection (see `logins`): the
            // control handler queues it, ahead of any downlink sent after registration.
            let registered = self.ctx.logins.wait(self.shared.id);
            let stored = self.event(Event::ConnUp, None, up).await;
            let timeout = Duration::from_millis(config.registration_timeout_ms);
            let outcome = tokio::time::timeout(timeout, async {
                if stored.await.unwrap_or(false) {
                    registered.await.is_ok()
                } else {
                    false
                }
            })
            .await;
            if !matches!(outcome, Ok(true)) && self.ctx.logins.cancel(self.shared.id) {
                self.ctx.metrics.refused("login_unregistered");
                return Err(CloseReason::error(
                    ErrorCode::Unavailable,
                    "login not registered in time, retry",
                ));
            }
        } else {
            drop(self.event(Event::ConnUp, None, up).await);
            self.reply(&login_ack(&self.ctx, self.shared.id, 0));
        }
        // After LOGIN_ACK is queued (so no DOWN can precede it): join the token's sessions
        // here at once (state syncs the rest after conn.up) and replay the recoverable
        // rooms the client has cursors for.
        self.join_sessions(&claims, &login);
        Ok(())
    }

    fn join_sessions(&self, claims: &tether_auth::Claims, login: &pb::Login) {
        let may_recover = claims.may_use_rooms();
        if !login.rooms.is_empty() && !may_recover {
            self.reply_error(
                ErrorCode::Forbidden,
                "room cursors ignored: the token lacks the rooms right",
            );
        }
        let Some(identity) = self.shared.identity() else {
            return;
        };
        let (app, did) = (identity.app(), identity.did());
        let recovering = may_recover && !login.rooms.is_empty();
        if claims.sess.is_empty() && !recovering && !self.ctx.sessions.knows(app, did) {
            return;
        }
        let cursors: Vec<(String, u64)> = login
            .rooms
            .iter()
            .filter(|_| may_recover)
            .map(|c| (c.session.clone(), c.room_seq))
            .collect();
        let recoveries = self
            .ctx
            .sessions
            .login(&self.shared, app, did, &claims.sess, &cursors);
        crate::rooms::start(&self.ctx, recoveries);
    }

    async fn uplink(&mut self, raw: RawFrame) -> Handled {
        let Frame::Up { header, .. } = Frame::decode(&raw).map_err(|e| frame_error(&e))? else {
            return Err(CloseReason::error(ErrorCode::BadFrame, "malformed up"));
        };
        let Some(identity) = self.shared.identity() else {
            return Ok(());
        };
        if let Some(counters) = self.shared.app_counters() {
            counters.received(1);
        }
        if !header.session.is_empty() && !valid_id(&header.session) {
            // Never published: the session becomes a NATS header on the business request.
            self.ctx.metrics.refused("up_session");
            self.reply(&Frame::UpAck(pb::UpAck {
                client_msg_id: header.client_msg_id,
                code: u32::from(ErrorCode::BadRequest.as_u16()),
                message: "up.session must be 1-64 characters of [A-Za-z0-9_-]".into(),
                server_msg_id: String::new(),
            }));
            self.ctx.metrics.error(ErrorCode::BadRequest);
            return Ok(());
        }
        if !identity.may_uplink {
            self.reply(&Frame::UpAck(pb::UpAck {
                client_msg_id: header.client_msg_id,
                code: u32::from(ErrorCode::Forbidden.as_u16()),
                message: "the token does not allow uplink".into(),
                server_msg_id: String::new(),
            }));
            self.ctx.metrics.error(ErrorCode::Forbidden);
            return Ok(());
        }
        if let Err(refused) = self
            .ctx
            .app_limits
            .take_uplink(identity.app(), raw.bytes.len())
        {
            // Over the app's limit (PROTOCOL.md 12.4): not published; the client retries.
            self.ctx.metrics.refused("app_rate");
            self.ctx.metrics.error(ErrorCode::RateLimited);
            self.reply(&Frame::UpAck(pb::UpAck {
                client_msg_id: header.client_msg_id,
                code: u32::from(ErrorCode::RateLimited.as_u16()),
                message: format!(
                    "app limit of {} {} reached; retry after {} ms",
                    refused.limit, refused.what, refused.retry_after_ms
                ),
                server_msg_id: String::new(),
            }));
            return Ok(());
        }
        let limit = self.ctx.config.max_queued_frames;
        let mode = self.ctx.app_limits.receipt_mode(identity.app());
        self.ctx
            .outbound
            .publish_uplink(
                identity,
                &self.shared,
                header.client_msg_id,
                raw.bytes,
                limit,
                mode,
            )
            .await;
        Ok(())
    }

    async fn down_ack(&mut self, raw: RawFrame) -> Handled {
        let Frame::DownAck(ack) = Frame::decode(&raw).map_err(|e| frame_error(&e))? else {
            return Err(CloseReason::error(
                ErrorCode::BadFrame,
                "malformed down_ack",
            ));
        };
        self.acked_seq = self.acked_seq.max(ack.seq);
        if let Some(identity) = self.shared.identity() {
            self.ctx
                .outbound
                .publish_ack(identity, self.shared.id, raw.bytes)
                .await;
        }
        Ok(())
    }

    /// Queues a frame for this connection (replies are never dropped: overflow closes).
    fn reply(&self, frame: &Frame) {
        self.shared
            .push(frame.encode(), true, self.ctx.config.max_queued_frames);
    }

    fn reply_error(&self, code: ErrorCode, text: &str) {
        self.ctx.metrics.error(code);
        self.reply(&Frame::error(code, text, false));
    }

    fn count_in(&self, kind: FrameType) {
        self.ctx
            .metrics
            .frames_in
            .get_or_create(&[("type", kind.as_str())])
            .inc();
    }

    /// Token bucket: `max_frames_per_sec` per second, bursts of twice that. Over it: the
    /// milliseconds until the bucket holds a token again (at least 1).
    fn take_rate_token(&mut self) -> Result<(), u32> {
        let rate = self.ctx.config.max_frames_per_sec;
        if rate == 0 {
            return Ok(());
        }
        let now = self.ctx.clock.now_ms();
        let elapsed = now.saturating_sub(self.rate_refilled_ms);
        let burst = u64::from(rate) * 2000;
        let refill = elapsed.saturating_mul(u64::from(rate));
        let tokens = (u64::from(self.rate_tokens_milli) + refill).min(burst);
        self.rate_refilled_ms = now;
        if tokens < 1000 {
            self.rate_tokens_milli = u32::try_from(tokens).unwrap_or(u32::MAX);
            return Err(refill_wait_ms(tokens, rate));
        }
        self.rate_tokens_milli = u32::try_from(tokens - 1000).unwrap_or(u32::MAX);
        Ok(())
    }

    /// Writes what is queued; returns the close reason when one was requested or the write failed.
    async fn flush(&mut self) -> Option<CloseReason> {
        let (frames, close) = self.shared.take();
        if !frames.is_empty()
            && let Err(reason) = self.write_frames(&frames, WRITE_TIMEOUT).await
        {
            return Some(reason);
        }
        close
    }

    async fn write_frames(&mut self, frames: &[Bytes], timeout: Duration) -> Handled {
        let headers: Vec<Bytes> = match self.ws {
            Some(_) => frames.iter().map(|f| ws_binary_header(f.len())).collect(),
            None => Vec::new(),
        };
        let bytes = written(
            tokio::time::timeout(timeout, self.stream.write_frames(frames, &headers)).await,
        )?;
        self.ctx.metrics.frames_out.inc_by(frames.len() as u64);
        self.shared.wrote(self.ctx.clock.now());
        if let Some(counters) = self.shared.app_counters() {
            counters.written(frames.len() as u64);
        }
        self.ctx.metrics.bytes_out.inc_by(bytes as u64);
        Ok(())
    }

    async fn write_raw(&mut self, bytes: &[u8]) -> Handled {
        written(tokio::time::timeout(WRITE_TIMEOUT, self.stream.write_all(bytes)).await)
    }

    /// Publishes a connection event; `up` is the LOGIN's resume point and the token's
    /// sessions, for `conn.up`.
    async fn event(
        &self,
        kind: fn(ConnEvent) -> Event,
        reason: Option<&str>,
        up: Option<(u64, &[String])>,
    ) -> tokio::task::JoinHandle<bool> {
        let Some(identity) = self.shared.identity() else {
            return tokio::spawn(async { false });
        };
        let conn = ConnEvent {
            app: identity.app().to_string(),
            uid: identity.uid().to_string(),
            did: identity.did().to_string(),
            gw: self.ctx.config.id.clone(),
            region: self.ctx.config.region.clone(),
            conn: self.shared.id,
            remote: self.remote.to_string(),
            resume_seq: None,
            sessions: Vec::new(),
            reason: reason.map(str::to_string),
            at_ms: unix_now_ms(),
        };
        let mut event = kind(conn);
        if let (Event::ConnUp(event), Some((resume_seq, sessions))) = (&mut event, up) {
            event.resume_seq = Some(resume_seq);
            event.sessions = sessions.to_vec();
        }
        self.ctx.outbound.conn_event(&event).await
    }

    /// Says goodbye (ERROR frame with CLOSE, WebSocket close), unregisters and reports.
    async fn finish(&mut self, reason: CloseReason) {
        if reason.send_error {
            self.ctx.metrics.error(reason.code);
            let frame = Frame::Error {
                error: pb::Error {
                    code: u32::from(reason.code.as_u16()),
                    text: reason.text.clone(),
                    retry_after_ms: reason.retry_after_ms,
                },
                close: true,
            };
            let _ = self.write_frames(&[frame.encode()], CLOSE_TIMEOUT).await;
        }
        if self.ws.is_some() {
            let code = if reason.code == ErrorCode::Ok {
                ws::close_code::NORMAL
            } else {
                ws::close_code::POLICY_VIOLATION
            };
            let close = ws::encode_close(code, reason.code.as_str());
            let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.stream.write_all(&close)).await;
        }
        let _ = tokio::time::timeout(CLOSE_TIMEOUT, self.stream.shutdown()).await;
        self.shared.close(reason.clone());
        self.ctx.metrics.connections.dec();
        self.ctx
            .metrics
            .disconnects
            .get_or_create(&[("reason", reason.label())])
            .inc();
        if let Some(identity) = self.shared.identity() {
            // Taken before the connection leaves the registry (which the shutdown's drain
            // watches), so the shutdown also waits for this conn.down to be stored.
            let _pending = self.ctx.outbound.event_pending();
            if self.ctx.registry.remove(&self.shared) {
                self.ctx
                    .sessions
                    .leave_device(identity.app(), identity.did());
            }
            self.ctx.registry.release_app(identity.app());
            self.ctx.metrics.sessions.dec();
            tracing::debug!(did = %identity.did(), reason = reason.label(), text = %reason.text, "connection closed");
            drop(
                self.event(Event::ConnDown, Some(reason.label()), None)
                    .await,
            );
        }
    }
}

fn ws_binary_header(len: usize) -> Bytes {
    let mut header = [0u8; 10];
    let n = ws::encode_frame_header(ws::opcode::BINARY, len, &mut header);
    Bytes::copy_from_slice(&header[..n])
}

/// The close reason of a failed or timed-out write (a write that takes too long means the
/// client does not read: `slow_consumer`).
fn written<T>(
    result: Result<std::io::Result<T>, tokio::time::error::Elapsed>,
) -> Result<T, CloseReason> {
    match result {
        Ok(Ok(value)) => Ok(value),
        Ok(Err(error)) => Err(CloseReason::silent(
            ErrorCode::Ok,
            format!("write failed: {error}"),
        )),
        Err(_) => Err(CloseReason::silent(
            ErrorCode::SlowConsumer,
            "write timed out",
        )),
    }
}

/// The LOGIN_ACK of connection `conn` (also queued by the control handler on registration).
pub fn login_ack(ctx: &GatewayCtx, conn: u64, last_acked_seq: u64) -> Frame {
    Frame::LoginAck(pb::LoginAck {
        conn_id: conn,
        gateway: ctx.config.id.clone(),
        heartbeat_secs: u32::try_from(ctx.config.heartbeat_secs).unwrap_or(u32::MAX),
        server_time_ms: tether_auth::unix_now_ms(),
        last_acked_seq,
    })
}

/// Checks the LOGIN fields a token does not vouch for: ids that would become subject or
/// header tokens, the room cursors and the informational SDK string.
fn check_login_fields(login: &pb::Login) -> Result<(), &'static str> {
    if !login.did.is_empty() && !valid_id(&login.did) {
        return Err("login.did must be 1-64 characters of [A-Za-z0-9_-]");
    }
    if !login.app.is_empty() && !valid_id(&login.app) {
        return Err("login.app must be 1-64 characters of [A-Za-z0-9_-]");
    }
    if login.rooms.len() > limits::MAX_ROOM_CURSORS {
        return Err("login carries more than 256 room cursors");
    }
    if login.rooms.iter().any(|c| !valid_id(&c.session)) {
        return Err("room cursor session must be 1-64 characters of [A-Za-z0-9_-]");
    }
    if login.sdk.len() > limits::MAX_SDK_LEN
        || !login.sdk.bytes().all(|b| (0x20..0x7f).contains(&b))
    {
        return Err("login.sdk must be at most 64 printable ascii characters");
    }
    Ok(())
}

/// Milliseconds until a bucket holding `tokens_milli` thousandths of a token, refilled with
/// `rate` tokens per second, holds a whole token again (at least 1).
fn refill_wait_ms(tokens_milli: u64, rate: u32) -> u32 {
    let missing = 1000u64.saturating_sub(tokens_milli);
    let wait = missing.div_ceil(u64::from(rate.max(1)));
    u32::try_from(wait.max(1)).unwrap_or(u32::MAX)
}

fn frame_error(error: &FrameError) -> CloseReason {
    CloseReason::error(error.code(), error.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rate_limited_waits_until_the_bucket_has_a_token() {
        assert_eq!(refill_wait_ms(0, 200), 5);
        assert_eq!(refill_wait_ms(999, 200), 1);
        assert_eq!(refill_wait_ms(0, 1), 1000);
        assert_eq!(refill_wait_ms(500, 3), 167);
    }

    /// An idle connection costs its task, and the task is mostly this future: tokio
    /// allocates a task as one cell aligned to 128 bytes, about 104 bytes of header and
    /// trailer plus the future, so a future of at most 152 bytes keeps the cell at 256
    /// bytes (one more byte and it is 384). Frame handling is boxed and does not count.
    #[test]
    fn idle_connection_future_is_small() {
        let size = std::mem::size_of::<ConnTask>();
        eprintln!(
            "connection task future: {size} bytes (driver {} bytes)",
            std::mem::size_of::<Driver>()
        );
        assert!(size <= 152, "connection task future grew to {size} bytes");
    }
}
