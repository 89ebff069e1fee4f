//! Starting and stopping a gateway: listeners, downlink, timers, admin endpoint, and the
//! graceful stop (stop accepting, tell clients `going_away` with a retry hint, drain).

use std::net::SocketAddr;
use std::os::fd::AsRawFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use prometheus_client::registry::Registry as MetricsRegistry;
use tether_auth::{CachedVerifier, TokenVerifier};
use tether_schemas::ErrorCode;
use tether_service::{NatsRoleBuilder, OperationsGuard, Shutdown};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio::task::JoinHandle;

use crate::config::GatewayConfig;
use crate::conn::{CloseReason, Transport};
use crate::context::GatewayCtx;
use crate::handoff::HandoffError;
use crate::handoff::messages::ListenerKind;
use crate::metrics::GatewayMetrics;
use crate::outbound::Outbound;
use crate::{downlink, listener, tls};

/// Why a gateway could not start.
#[derive(Debug, thiserror::Error)]
pub enum GatewayError {
    /// The configuration is invalid.
    #[error("invalid gateway configuration: {0}")]
    Config(String),
    /// The token public key could not be read.
    #[error("token public key: {0}")]
    Key(String),
    /// TLS files could not be loaded.
    #[error("tls: {0}")]
    Tls(String),
    /// NATS could not be reached or set up, or the admin port not bound.
    #[error(transparent)]
    Role(#[from] tether_service::RoleError),
    /// A subscription failed.
    #[error("nats subscribe: {0}")]
    Subscribe(String),
    /// A takeover failed (the serving process keeps serving).
    #[error(transparent)]
    Handoff(#[from] crate::handoff::HandoffError),
    /// The hand-off socket could not be bound.
    #[error("cannot listen on the hand-off socket {path}: {error}")]
    HandoffSocket {
        /// The path.
        path: std::path::PathBuf,
        /// The error.
        error: std::io::Error,
    },
    /// A listener could not be bound.
    #[error("cannot listen on {addr}: {error}")]
    Bind {
        /// The address.
        addr: SocketAddr,
        /// The error.
        error: std::io::Error,
    },
}

/// A running gateway.
pub struct RunningGateway {
    /// Bound TCP client address.
    pub tcp_addr: Option<SocketAddr>,
    /// Bound WebSocket client address.
    pub ws_addr: Option<SocketAddr>,
    /// Bound admin address (`/healthz`, `/metrics`).
    pub admin_addr: SocketAddr,
    ctx: Arc<GatewayCtx>,
    task: JoinHandle<()>,
}

impl RunningGateway {
    /// Connections currently logged in.
    pub fn sessions(&self) -> usize {
        self.ctx.registry.len()
    }

    /// Whether this process handed its connections over to another one.
    pub fn handed_over(&self) -> bool {
        self.ctx.handoff.handed_over.is_cancelled()
    }

    /// Waits until the gateway has stopped (after its shutdown signal fired and it drained).
    pub async fn wait(self) {
        let _ = self.task.await;
    }
}

/// Binds a client listener with a backlog of `backlog` pending connections (the kernel
/// caps it at `net.core.somaxconn`). tokio's default of 1,024 overflows in a login burst
/// on a busy gateway: the dropped SYNs are retried by the clients' kernels after 1 s.
async fn bind(addr: SocketAddr, backlog: u32) -> Result<TcpListener, GatewayError> {
    let error = |error| GatewayError::Bind { addr, error };
    let socket = if addr.is_ipv4() {
        tokio::net::TcpSocket::new_v4()
    } else {
        tokio::net::TcpSocket::new_v6()
    }
    .map_err(error)?;
    socket.set_reuseaddr(true).map_err(error)?;
    socket.bind(addr).map_err(error)?;
    socket.listen(backlog).map_err(error)
}

fn adopt_listener(listener: std::net::TcpListener) -> Result<TcpListener, GatewayError> {
    listener
        .set_nonblocking(true)
        .and_then(|()| TcpListener::from_std(listener))
        .map_err(|e| GatewayError::Handoff(HandoffError::Local(e.to_string())))
}

/// Starts a gateway; it stops gracefully when `shutdown` fires.
pub async fn start(
    config: GatewayConfig,
    shutdown: Shutdown,
) -> Result<RunningGateway, GatewayError> {
    start_with(config, shutdown, None).await
}

/// Starts a gateway; with `takeover`, by taking the sockets and connections of the gateway
/// serving hand-offs on that unix socket (docs/handoff.md) instead of binding listeners.
/// It stops gracefully when `shutdown` fires, or without goodbyes once it handed its own
/// connections over to a successor.
pub async fn start_with(
    config: GatewayConfig,
    shutdown: Shutdown,
    takeover: Option<&Path>,
) -> Result<RunningGateway, GatewayError> {
    config.validate().map_err(GatewayError::Config)?;
    let verifier = TokenVerifier::from_file(&config.token_public_key)
        .map_err(|e| GatewayError::Key(e.to_string()))?;
    let verifier = Arc::new(CachedVerifier::new(verifier, config.token_cache_entries));
    let tls = config.tls.as_ref().map(tls::acceptor).transpose()?;
    // A takeover receives the sockets first: one that could not hold them all is refused
    // before anything moves.
    let mut received = match takeover {
        Some(path) => Some(crate::handoff::new::receive(path, &config).await?),
        None => None,
    };
    let (admin_socket, tcp, ws) = match received.as_mut() {
        Some(takeover) => (
            takeover.listeners.remove(&ListenerKind::Admin),
            takeover
                .listeners
                .remove(&ListenerKind::Tcp)
                .map(adopt_listener)
                .transpose()?,
            takeover
                .listeners
                .remove(&ListenerKind::Ws)
                .map(adopt_listener)
                .transpose()?,
        ),
        None => (None, None, None),
    };
    let admin_socket = match admin_socket {
        Some(socket) => socket,
        None => std::net::TcpListener::bind(config.admin_listen).map_err(|error| {
            GatewayError::Bind {
                addr: config.admin_listen,
                error,
            }
        })?,
    };
    let admin_fd = admin_socket.as_raw_fd();
    let metrics = GatewayMetrics::default();
    let mut registry = MetricsRegistry::with_prefix("tether_gateway");
    metrics.register(&mut registry);
    registry.register_collector(Box::new(crate::metrics::TokenCacheMetrics(
        verifier.clone(),
    )));
    // Internal tasks (admin, downlink, timers) stop after the drain; accepting stops first.
    let internal = Shutdown::new();
    let accepting = Shutdown::new();
    let heartbeat = crate::heartbeat::Heartbeat::new(&config);
    let ctx_cell = crate::admin::CtxCell::default();
    let role = NatsRoleBuilder::new("gateway", &config.nats_url)
        .auth(config.nats.clone())
        .replicas(config.stream_replicas)
        .admin(config.admin_listen)
        .admin_listener(admin_socket)
        .metrics(registry)
        .routes(
            // Operations (drain, session lookups) need the admin token, or a loopback
            // listener; /healthz and /metrics stay open.
            OperationsGuard::new(Some(&config.admin_token), config.admin_listen)
                .protect(crate::admin::router(ctx_cell.clone())),
        )
        .start(internal.clone())
        .await?;
    let (client, admin) = (role.client, role.admin);
    let outbound = Outbound::new(client.clone(), &config.id, metrics.clone())
        .with_unavailable_retry(Duration::from_millis(config.unavailable_retry_ms));
    let ctx = Arc::new(GatewayCtx::new(
        config.clone(),
        verifier,
        outbound,
        metrics,
        received.is_some(),
    ));
    ctx.migration.set_heartbeat(heartbeat.clone());
    let _ = ctx_cell.set(ctx.clone());

    let (tcp, ws) = match received.is_some() {
        true => (tcp, ws),
        false => (
            match config.tcp_listen {
                Some(addr) => Some(bind(addr, config.listen_backlog).await?),
                None => None,
            },
            match config.ws_listen {
                Some(addr) => Some(bind(addr, config.listen_backlog).await?),
                None => None,
            },
        ),
    };
    ctx.handoff.add_listener(ListenerKind::Admin, admin_fd);
    if let Some(listener) = &tcp {
        ctx.handoff
            .add_listener(ListenerKind::Tcp, listener.as_raw_fd());
    }
    if let Some(listener) = &ws {
        ctx.handoff
            .add_listener(ListenerKind::Ws, listener.as_raw_fd());
    }
    let tcp_addr = tcp.as_ref().and_then(|l| l.local_addr().ok());
    let ws_addr = ws.as_ref().and_then(|l| l.local_addr().ok());

    downlink::run(ctx.clone(), internal.clone())
        .await
        .map_err(|e| GatewayError::Subscribe(e.to_string()))?;
    tokio::spawn(ctx.timers.clone().run(internal.clone()));
    // Not stopped by the shutdown: closing a dormant connection wakes it through this task.
    tokio::spawn(crate::conn::dormant::run(ctx.clone()));
    crate::app_limits::spawn(ctx.clone(), client.clone(), internal.clone());
    let limit = Arc::new(Semaphore::new(
        config.max_connections.min(Semaphore::MAX_PERMITS),
    ));
    for (listener, transport) in [(tcp, Transport::Tcp), (ws, Transport::Ws)] {
        if let Some(listener) = listener {
            tokio::spawn(listener::accept_loop(
                ctx.clone(),
                listener,
                transport,
                tls.clone(),
                limit.clone(),
                accepting.clone(),
            ));
        }
    }
    if let Some(takeover) = received {
        // Subscribed (downlinks held) and confirmed by the server: prepared.
        match crate::handoff::new::complete(&ctx, takeover, &limit).await {
            Ok(moved) => ctx.restart.took_over(moved),
            Err(error) => {
                accepting.cancel();
                internal.cancel();
                return Err(error.into());
            }
        }
    }
    if let Some(path) = &config.handoff_socket {
        let listener = bind_handoff(path)?;
        tokio::spawn(crate::handoff::old::serve(
            ctx.clone(),
            listener,
            accepting.clone(),
        ));
    }
    crate::nats_lost::spawn(ctx.clone(), client.clone(), internal.clone());
    let beat = heartbeat.clone().spawn(
        ctx.clone(),
        tcp_addr,
        ws_addr,
        shutdown.clone(),
        internal.clone(),
    );
    crate::restart::write_pid_file(&ctx);
    tracing::info!(gw = %config.id, tcp = ?tcp_addr, ws = ?ws_addr, admin = %admin.addr, pid = std::process::id(), "gateway started");

    let drain_ctx = ctx.clone();
    let handed_over = ctx.handoff.handed_over.clone();
    let task = tokio::spawn(async move {
        tokio::select! {
            _ = shutdown.cancelled() => {}
            _ = handed_over.cancelled() => {
                // The successor serves every moved connection: no goodbyes, no conn.down,
                // the heartbeat record stays; TLS connections are redirected to it first.
                accepting.cancel();
                heartbeat.keep_record();
                let tail = crate::handoff::tail::run(&drain_ctx).await;
                let deadline = tokio::time::Instant::now()
                    + Duration::from_secs(drain_ctx.config.shutdown_grace_secs);
                while !drain_ctx.registry.is_empty() && tokio::time::Instant::now() < deadline {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
                drain_ctx.outbound.events_stored(Duration::from_secs(EVENTS_STORED_SECS)).await;
                internal.cancel();
                let _ = tokio::time::timeout(Duration::from_secs(2), beat).await;
                let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
                let _ = admin.task.await;
                tracing::info!(gw = %drain_ctx.config.id, moved = tail.moved, redirected = tail.redirected, closed = tail.closed, "gateway handed over and stopped");
                return;
            }
        }
        accepting.cancel();
        drain_by_redirect(&drain_ctx).await;
        drain(&drain_ctx).await;
        // Every disconnect is recorded (10.3): connections still saying goodbye after the
        // grace period finish (their writes are bounded), and the conn.down events of all
        // of them are confirmed by JetStream, before NATS is closed; bounded in all.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(EVENTS_STORED_SECS);
        while !drain_ctx.registry.is_empty() && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        drain_ctx
            .outbound
            .events_stored(left.max(Duration::from_secs(1)))
            .await;
        internal.cancel();
        let _ = tokio::time::timeout(Duration::from_secs(2), beat).await;
        let _ = tokio::time::timeout(Duration::from_secs(2), client.flush()).await;
        let _ = admin.task.await;
        tracing::info!(gw = %drain_ctx.config.id, "gateway stopped");
    });
    Ok(RunningGateway {
        tcp_addr,
        ws_addr,
        admin_addr: admin.addr,
        ctx,
        task,
    })
}

/// Binds the hand-off socket, replacing a stale file (or the one of the process this one
/// took over from, which no longer listens).
fn bind_handoff(path: &Path) -> Result<tokio::net::UnixListener, GatewayError> {
    let error = |error| GatewayError::HandoffSocket {
        path: path.to_path_buf(),
        error,
    };
    match std::fs::remove_file(path) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(error(e)),
    }
    let listener = tokio::net::UnixListener::bind(path).map_err(error)?;
    // Whoever can connect can take every client socket: this user only.
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600)).map_err(error)?;
    Ok(listener)
}

/// How long the shutdown waits, after the grace period, for the last connections to close
/// and for the connection events of all of them to be stored.
const EVENTS_STORED_SECS: u64 = 10;

/// On shutdown, first moves devices to other gateways by REDIRECT for up to
/// `shutdown_drain_secs` (PROTOCOL.md 10.7); stops early when none is left or none can be
/// moved (no other gateway, no ipconfig).
async fn drain_by_redirect(ctx: &Arc<GatewayCtx>) {
    let secs = ctx.config.shutdown_drain_secs;
    if secs == 0 || ctx.registry.is_empty() {
        return;
    }
    let request = tether_schemas::bus::DrainRequest::default();
    if let Err(error) = ctx
        .migration
        .drain(ctx, &request, crate::migrate::Kind::Shutdown)
    {
        tracing::warn!(gw = %ctx.config.id, %error, "no drain on shutdown");
        return;
    }
    let status = ctx
        .migration
        .finish_within(ctx, Duration::from_secs(secs))
        .await;
    tracing::info!(gw = %ctx.config.id, moved = status.moved, left = status.connections, error = ?status.error, "shutdown drain done");
}

/// Closes every connection with `going_away` and `text`, each with a random retry hint so
/// they do not all come back at once; returns how many.
pub(crate) fn tell_going_away(ctx: &GatewayCtx, text: &str) -> usize {
    let connections = ctx.registry.all();
    for conn in &connections {
        let retry = rand::random::<u32>() % ctx.config.going_away_retry_ms.max(1);
        let mut reason = CloseReason::error(ErrorCode::GoingAway, text);
        reason.retry_after_ms = retry;
        conn.close(reason);
    }
    connections.len()
}

/// Tells every client to go away and waits for them to close, up to the grace period.
async fn drain(ctx: &GatewayCtx) {
    let connections = tell_going_away(ctx, "gateway shutting down");
    tracing::info!(connections, "draining");
    let deadline =
        tokio::time::Instant::now() + Duration::from_secs(ctx.config.shutdown_grace_secs);
    while !ctx.registry.is_empty() && tokio::time::Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
