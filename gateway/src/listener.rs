//! Accepting clients: raw TCP and WebSocket (`/ws`), each optionally behind TLS, under a
//! connection limit.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use bytes::{Buf, BytesMut};
use tether_schemas::{ErrorCode, Frame};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsAcceptor;

use crate::conn::Transport;
use crate::conn::driver;
use crate::conn::io::Stream;
use crate::context::GatewayCtx;
use crate::shutdown::Shutdown;
use crate::ws::{self, Handshake};

/// Largest WebSocket upgrade request accepted.
const MAX_HANDSHAKE_LEN: usize = 8 * 1024;
/// The WebSocket path.
pub const WS_PATH: &str = "/ws";

/// Accepts connections on `listener` until `stop` fires.
pub async fn accept_loop(
    ctx: Arc<GatewayCtx>,
    listener: TcpListener,
    transport: Transport,
    tls: Option<TlsAcceptor>,
    limit: Arc<Semaphore>,
    stop: Shutdown,
) {
    // A hand-off pauses accepting: new clients wait in the kernel's backlog for whichever
    // process serves next.
    let mut paused = ctx.handoff.accept_paused();
    loop {
        if *paused.borrow_and_update() {
            tokio::select! {
                changed = paused.changed() => if changed.is_err() { return },
                _ = stop.cancelled() => return,
            }
            continue;
        }
        let accepted = tokio::select! {
            accepted = listener.accept() => accepted,
            changed = paused.changed() => {
                if changed.is_err() {
                    return;
                }
                continue;
            }
            _ = stop.cancelled() => return,
        };
        let (socket, remote) = match accepted {
            Ok(pair) => pair,
            Err(error) => {
                // Out of fds or similar: back off instead of spinning.
                tracing::warn!(%error, "accept failed");
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        };
        ctx.metrics
            .accepted
            .get_or_create(&[("transport", transport.as_str())])
            .inc();
        let _ = socket.set_nodelay(true);
        let ctx = ctx.clone();
        let tls = tls.clone();
        let permit = limit.clone().try_acquire_owned();
        tokio::spawn(async move {
            let Ok(permit) = permit else {
                refuse_full(&ctx, socket, transport).await;
                return;
            };
            open(ctx, socket, remote, transport, tls, permit).await;
        });
    }
}

/// TLS and WebSocket handshakes, then the connection's own task.
async fn open(
    ctx: Arc<GatewayCtx>,
    socket: TcpStream,
    remote: SocketAddr,
    transport: Transport,
    tls: Option<TlsAcceptor>,
    permit: OwnedSemaphorePermit,
) {
    let deadline = Duration::from_secs(ctx.config.login_timeout_secs);
    let is_tls = tls.is_some();
    let mut stream = match tls {
        None => Stream::Plain(socket),
        Some(acceptor) => match tokio::time::timeout(deadline, acceptor.accept(socket)).await {
            Ok(Ok(stream)) => Stream::Tls(Box::new(stream)),
            Ok(Err(error)) => {
                tracing::debug!(%remote, %error, "tls handshake failed");
                return;
            }
            Err(_) => return,
        },
    };
    let mut input = BytesMut::new();
    if transport == Transport::Ws {
        match tokio::time::timeout(deadline, upgrade(&mut stream, &mut input)).await {
            Ok(Ok(())) => {}
            Ok(Err(reason)) => {
                tracing::debug!(%remote, reason, "websocket upgrade refused");
                stream.shutdown().await;
                return;
            }
            Err(_) => return,
        }
    }
    driver::spawn(ctx, stream, transport, is_tls, remote, input, permit);
}

/// Reads and answers the HTTP upgrade; leaves any bytes after it in `input`.
async fn upgrade(stream: &mut Stream, input: &mut BytesMut) -> Result<(), &'static str> {
    loop {
        match stream.read_into(input).await {
            Ok(0) | Err(_) => return Err("connection closed during handshake"),
            Ok(_) => {}
        }
        match ws::parse_upgrade(input, WS_PATH, MAX_HANDSHAKE_LEN) {
            Handshake::Incomplete => continue,
            Handshake::Accept { response, consumed } => {
                input.advance(consumed);
                return stream
                    .write_all(&response)
                    .await
                    .map_err(|_| "cannot answer the handshake");
            }
            Handshake::Reject {
                response, reason, ..
            } => {
                let _ = stream.write_all(&response).await;
                return Err(reason);
            }
        }
    }
}

/// Tells a client the gateway is full, then closes.
async fn refuse_full(ctx: &GatewayCtx, socket: TcpStream, transport: Transport) {
    ctx.metrics.error(ErrorCode::TooManyConnections);
    let mut stream = Stream::Plain(socket);
    if transport == Transport::Tcp {
        let frame = Frame::error(ErrorCode::TooManyConnections, "gateway is full", true).encode();
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(&frame)).await;
    } else {
        let answer = b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\nContent-Length: 16\r\n\r\ngateway is full\n";
        let _ = tokio::time::timeout(Duration::from_secs(1), stream.write_all(answer)).await;
    }
    stream.shutdown().await;
}
