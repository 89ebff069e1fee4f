//! The taking-over process's side: ask, check the descriptor limit, receive the listening
//! and client sockets (prepare), then the connections' state (commit), and serve on `Go`.

use std::collections::HashMap;
use std::os::fd::OwnedFd;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use tokio::net::UnixStream;
use tokio::sync::Semaphore;

use super::messages::{ListenerKind, ToNew, ToOld, VERSION};
use super::wire::Wire;
use super::{HandoffError, open_fds, raise_fd_limit};
use crate::config::GatewayConfig;
use crate::conn::driver::Parked;
use crate::context::GatewayCtx;

/// Descriptors kept free beside the handed-over sockets (NATS, admin, files, logs).
const FD_HEADROOM: u64 = 64;

/// A hand-off being received: the sockets so far.
pub struct Takeover {
    wire: Wire,
    /// Listening sockets by kind.
    pub listeners: HashMap<ListenerKind, std::net::TcpListener>,
    /// Client sockets, registered with the runtime as they arrive (not at commit).
    sockets: HashMap<u64, tokio::net::TcpStream>,
}

/// Connects to the serving process at `path`, checks that every socket it offers fits
/// under this process's descriptor limit (refusing before anything moves if not) and
/// receives the listening and client sockets.
pub async fn receive(path: &Path, config: &GatewayConfig) -> Result<Takeover, HandoffError> {
    let timeout = Duration::from_millis(config.handoff_timeout_ms);
    let stream = UnixStream::connect(path).await.map_err(|error| {
        HandoffError::Local(format!("cannot connect to {}: {error}", path.display()))
    })?;
    let mut wire = Wire::new(stream);
    let fd_limit = raise_fd_limit();
    wire.send(
        &ToOld::Hello {
            version: VERSION,
            fd_limit,
        },
        &[],
    )
    .await?;
    let (gw, connections, fds_needed) = match recv(&mut wire, timeout, "offer").await? {
        ToNew::Offer {
            gw,
            connections,
            fds_needed,
        } => (gw, connections, fds_needed),
        other => return Err(unexpected("offer", &other)),
    };
    let refusal = if gw != config.id {
        Some(format!(
            "the serving gateway is {gw:?}, this one is configured as {:?}",
            config.id
        ))
    } else {
        let needed = fds_needed + open_fds() + FD_HEADROOM;
        (needed > fd_limit).then(|| {
            format!(
                "{connections} connections need {needed} file descriptors here, the limit (RLIMIT_NOFILE) is {fd_limit}"
            )
        })
    };
    if let Some(reason) = refusal {
        let _ = wire
            .send(
                &ToOld::Refuse {
                    reason: reason.clone(),
                },
                &[],
            )
            .await;
        return Err(HandoffError::Refused(reason));
    }
    wire.send(&ToOld::Accept, &[]).await?;
    let mut listeners = HashMap::new();
    let mut sockets = HashMap::with_capacity(connections);
    loop {
        let (message, fds) = tokio::time::timeout(timeout, wire.recv::<ToNew>(ToNew::fd_count))
            .await
            .map_err(|_| HandoffError::Timeout("sockets"))??;
        match message {
            ToNew::Listeners { kinds } => {
                for (kind, fd) in kinds.into_iter().zip(fds) {
                    listeners.insert(kind, std::net::TcpListener::from(fd));
                }
            }
            ToNew::Sockets { conns } => {
                for (id, fd) in conns.into_iter().zip(fds) {
                    sockets.insert(id, adopt_socket(fd)?);
                }
            }
            ToNew::SocketsDone => break,
            ToNew::Abort { reason } => return Err(HandoffError::Aborted(reason)),
            other => return Err(unexpected("sockets", &other)),
        }
    }
    tracing::info!(gw = %gw, connections = sockets.len(), listeners = listeners.len(), "hand-off sockets received");
    Ok(Takeover {
        wire,
        listeners,
        sockets,
    })
}

/// Once this process has subscribed (downlinks held) and the server confirmed it: says it
/// is prepared, receives the commit, adopts every connection, and serves on `Go`.
/// Returns how many connections moved.
pub async fn complete(
    ctx: &Arc<GatewayCtx>,
    mut takeover: Takeover,
    limit: &Arc<Semaphore>,
) -> Result<usize, HandoffError> {
    let timeout = Duration::from_millis(ctx.config.handoff_timeout_ms);
    tracing::info!(
        gw = %ctx.config.id,
        hold_ms = ctx.config.handoff_hold_ms,
        "hand-off prepared"
    );
    if ctx.config.handoff_hold_ms > 0 {
        tokio::time::sleep(Duration::from_millis(ctx.config.handoff_hold_ms)).await;
    }
    let wire = &mut takeover.wire;
    wire.send(&ToOld::Prepared, &[]).await?;
    let prepared = std::time::Instant::now();
    let (conns, handled) = match recv(wire, timeout, "commit").await? {
        ToNew::Commit { conns, handled } => (conns, handled),
        other => return Err(unexpected("commit", &other)),
    };
    let commit_ms = prepared.elapsed().as_millis() as u64;
    let mut adopted = Vec::with_capacity(conns.len());
    for mut moved in conns {
        let Some(fd) = takeover.sockets.remove(&moved.state.conn_id) else {
            continue;
        };
        let permit = limit
            .clone()
            .try_acquire_owned()
            .map_err(|_| HandoffError::Local("max_connections reached".into()))?;
        let joined = std::mem::take(&mut moved.joined);
        let parked = Parked::adopt(ctx, moved, fd, permit);
        parked.register(&joined);
        adopted.push(parked);
    }
    // Sockets of connections that closed meanwhile: only this copy is left, drop it.
    takeover.sockets.clear();
    let adopted_ms = prepared.elapsed().as_millis() as u64;
    wire.send(&ToOld::Committed, &[]).await?;
    match recv(wire, timeout, "go").await? {
        ToNew::Go => {}
        other => return Err(unexpected("go", &other)),
    }
    let go_ms = prepared.elapsed().as_millis() as u64;
    let moved = adopted.len();
    for parked in adopted {
        parked.start();
    }
    let started_ms = prepared.elapsed().as_millis() as u64;
    let dropped = ctx.handoff.gate.release(ctx, &handled);
    ctx.handoff.pause_accepting(false);
    tracing::info!(
        moved,
        commit_ms,
        adopted_ms,
        go_ms,
        started_ms,
        released_ms = prepared.elapsed().as_millis() as u64,
        "hand-off commit timings (from prepared)"
    );
    tracing::info!(gw = %ctx.config.id, moved, duplicates_dropped = dropped, "hand-off done, serving");
    Ok(moved)
}

/// A received client socket, registered with the runtime (it is already non-blocking: the
/// serving process's runtime made it so, and the two share the open file).
fn adopt_socket(fd: OwnedFd) -> Result<tokio::net::TcpStream, HandoffError> {
    let socket = std::net::TcpStream::from(fd);
    socket
        .set_nonblocking(true)
        .and_then(|()| tokio::net::TcpStream::from_std(socket))
        .map_err(|error| HandoffError::Local(format!("cannot adopt a socket: {error}")))
}

async fn recv(
    wire: &mut Wire,
    timeout: Duration,
    what: &'static str,
) -> Result<ToNew, HandoffError> {
    match tokio::time::timeout(timeout, wire.recv::<ToNew>(ToNew::fd_count)).await {
        Ok(Ok((ToNew::Abort { reason }, _))) => Err(HandoffError::Aborted(reason)),
        Ok(Ok((message, _))) => Ok(message),
        Ok(Err(error)) => Err(error.into()),
        Err(_) => Err(HandoffError::Timeout(what)),
    }
}

fn unexpected(expected: &'static str, got: &ToNew) -> HandoffError {
    HandoffError::Unexpected {
        expected,
        got: format!("{got:?}").chars().take(200).collect(),
    }
}
