//! The serving process's side: offer the sockets, wait for the new process to prepare,
//! stop every moved connection and send its state (commit), or undo everything (abort).

use std::sync::Arc;
use std::time::Duration;

use tether_nats::subjects;
use tokio::net::UnixListener;

use super::HandoffError;
use super::messages::{ToNew, ToOld, VERSION};
use super::wire::{MAX_FDS, Wire};
use crate::conn::ConnShared;
use crate::context::GatewayCtx;
use crate::shutdown::Shutdown;

/// Serves hand-off requests on `listener` until one commits (then fires
/// `ctx.handoff.handed_over`) or `stop` fires. A failed request leaves this process
/// serving as before.
pub async fn serve(ctx: Arc<GatewayCtx>, listener: UnixListener, stop: Shutdown) {
    loop {
        let stream = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok((stream, _)) => stream,
                Err(error) => {
                    tracing::warn!(%error, "hand-off socket accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
            _ = stop.cancelled() => return,
        };
        let started = std::time::Instant::now();
        let mut wire = Wire::new(stream);
        match hand_over(&ctx, &mut wire).await {
            Ok(moved) => {
                ctx.metrics
                    .handoffs
                    .get_or_create(&[("outcome", "committed")])
                    .inc();
                tracing::info!(gw = %ctx.config.id, moved, ms = started.elapsed().as_millis() as u64, "hand-off committed, this process stops");
                ctx.handoff.handed_over.cancel();
                return;
            }
            Err(error) => {
                ctx.metrics
                    .handoffs
                    .get_or_create(&[("outcome", "aborted")])
                    .inc();
                tracing::warn!(gw = %ctx.config.id, %error, "hand-off aborted, this process keeps serving");
                ctx.restart.handoff_aborted(&error.to_string());
                let _ = wire
                    .send(
                        &ToNew::Abort {
                            reason: error.to_string(),
                        },
                        &[],
                    )
                    .await;
            }
        }
    }
}

/// One hand-off; on error everything is back as it was.
async fn hand_over(ctx: &Arc<GatewayCtx>, wire: &mut Wire) -> Result<usize, HandoffError> {
    let timeout = Duration::from_millis(ctx.config.handoff_timeout_ms);
    match recv(wire, timeout, "hello").await? {
        ToOld::Hello { version, fd_limit } if version == VERSION => {
            tracing::info!(fd_limit, "hand-off requested");
        }
        ToOld::Hello { version, .. } => {
            return Err(HandoffError::Local(format!(
                "protocol version {version}, this process speaks {VERSION}"
            )));
        }
        other => return Err(unexpected("hello", &other)),
    }
    ctx.handoff.pause_accepting(true);
    ctx.handoff.gate.record();
    let outcome = transfer(ctx, wire, timeout).await;
    if outcome.is_err() {
        // Abort: every parked connection carries on, what was held is delivered.
        for (_, parked) in ctx.handoff.take_parked() {
            parked.resume();
        }
        for conn in ctx.registry.all() {
            conn.clear_park();
            conn.wake_task();
        }
        ctx.handoff.gate.release(ctx, &[]);
        ctx.handoff.pause_accepting(false);
    }
    outcome
}

async fn transfer(
    ctx: &Arc<GatewayCtx>,
    wire: &mut Wire,
    timeout: Duration,
) -> Result<usize, HandoffError> {
    let conns: Vec<Arc<ConnShared>> = ctx
        .registry
        .all()
        .into_iter()
        .filter(|c| c.movable_fd().is_some())
        .collect();
    let listeners = ctx.handoff.listeners();
    wire.send(
        &ToNew::Offer {
            gw: ctx.config.id.clone(),
            connections: conns.len(),
            fds_needed: (conns.len() + listeners.len()) as u64,
        },
        &[],
    )
    .await?;
    match recv(wire, timeout, "accept").await? {
        ToOld::Accept => {}
        ToOld::Refuse { reason } => return Err(HandoffError::Refused(reason)),
        other => return Err(unexpected("accept", &other)),
    }
    // Prepare: the sockets are duplicated into the new process; this one keeps serving.
    let (kinds, fds): (Vec<_>, Vec<_>) = listeners.into_iter().unzip();
    wire.send(&ToNew::Listeners { kinds }, &fds).await?;
    for chunk in conns.chunks(MAX_FDS) {
        let mut ids = Vec::with_capacity(chunk.len());
        let mut fds = Vec::with_capacity(chunk.len());
        for conn in chunk {
            if let Some(fd) = conn.movable_fd() {
                ids.push(conn.id);
                fds.push(fd);
            }
        }
        wire.send(&ToNew::Sockets { conns: ids }, &fds).await?;
    }
    wire.send(&ToNew::SocketsDone, &[]).await?;
    match recv(wire, timeout, "prepared").await? {
        ToOld::Prepared => {}
        other => return Err(unexpected("prepared", &other)),
    }
    // The new process subscribed: deliver here what was published before (gate.rs).
    let marker = bytes::Bytes::from(format!(
        "{{\"op\":\"handoff_marker\",\"pid\":{},\"at_ns\":{}}}",
        std::process::id(),
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos())
    ));
    let passed = ctx.handoff.gate.expect_marker(marker.clone());
    ctx.outbound
        .client()
        .publish(subjects::gateway_ctl(&ctx.config.id), marker)
        .await
        .map_err(|_| HandoffError::Timeout("the hand-off marker to be published"))?;
    match tokio::time::timeout(timeout, passed).await {
        Ok(Ok(())) => {}
        _ => return Err(HandoffError::Timeout("the hand-off marker to come back")),
    }
    // Commit: stop delivering downlinks, then stop every moved connection.
    let commit_started = std::time::Instant::now();
    let handled = ctx.handoff.gate.freeze();
    ctx.handoff.open_lot();
    for conn in &conns {
        conn.request_park();
    }
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        let parked = ctx.handoff.parked_count();
        let closing = conns.iter().filter(|c| c.is_closing()).count();
        if parked + closing >= conns.len() {
            break;
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(HandoffError::Timeout("connections to stop"));
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
    if ctx.handoff.gate.overflowed() {
        return Err(HandoffError::Local("too many downlinks held".into()));
    }
    let stopped_ms = commit_started.elapsed().as_millis() as u64;
    let moved = ctx.handoff.export_parked();
    let count = moved.len();
    let exported_ms = commit_started.elapsed().as_millis() as u64;
    wire.send(
        &ToNew::Commit {
            conns: moved,
            handled,
        },
        &[],
    )
    .await?;
    let sent_ms = commit_started.elapsed().as_millis() as u64;
    match recv(wire, timeout, "committed").await? {
        ToOld::Committed => {}
        other => return Err(unexpected("committed", &other)),
    }
    wire.send(&ToNew::Go, &[]).await?;
    tracing::info!(
        moved = count,
        stopped_ms,
        exported_ms,
        sent_ms,
        go_ms = commit_started.elapsed().as_millis() as u64,
        "hand-off commit timings (from the commit's start)"
    );
    // Past this point the new process serves: nothing here may undo the hand-off. The
    // gate stays frozen until the moved connections left the registry (`tail`).
    Ok(count)
}

async fn recv(
    wire: &mut Wire,
    timeout: Duration,
    what: &'static str,
) -> Result<ToOld, HandoffError> {
    match tokio::time::timeout(timeout, wire.recv::<ToOld>(|_| 0)).await {
        Ok(Ok((ToOld::Abort { reason }, _))) => Err(HandoffError::Aborted(reason)),
        Ok(Ok((message, _))) => Ok(message),
        Ok(Err(error)) => Err(error.into()),
        Err(_) => Err(HandoffError::Timeout(what)),
    }
}

fn unexpected(expected: &'static str, got: &ToOld) -> HandoffError {
    HandoffError::Unexpected {
        expected,
        got: format!("{got:?}"),
    }
}
