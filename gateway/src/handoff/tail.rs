//! The old process after `Go` (docs/handoff.md "TLS"): the connections that could not
//! move (TLS: their session keys live in this process) are redirected to the successor,
//! which serves the same listeners under the same gateway id, and served here until the
//! device's new login is registered there or `migrate_timeout_secs` passed; connections
//! not logged in yet are told `going_away`. Then this process may exit.

use std::sync::Arc;
use std::time::Duration;

use tether_schemas::ErrorCode;

use crate::conn::{CloseReason, ConnShared};
use crate::context::GatewayCtx;

/// What the tail did.
#[derive(Debug, Default, Clone, Copy)]
pub struct Tail {
    /// Connections handed to the successor (they left without a trace here).
    pub moved: usize,
    /// Connections redirected (TLS).
    pub redirected: usize,
    /// Connections closed with `going_away` (not logged in, or not redirected in time).
    pub closed: usize,
}

/// Lets the moved connections go, redirects the rest and serves them until they left.
pub async fn run(ctx: &Arc<GatewayCtx>) -> Tail {
    let moved = ctx.handoff.take_parked();
    // Moved connections leave this process's registry and sessions without a conn.down:
    // they live on in the successor. Nothing is delivered to them here any more.
    for parked in moved.values() {
        if let Some(id) = parked.shared().identity() {
            ctx.sessions.leave_device(id.app(), id.did());
        }
        ctx.registry.remove(parked.shared());
    }
    let mut tail = Tail {
        moved: moved.len(),
        ..Tail::default()
    };
    let mut staying: Vec<Arc<ConnShared>> = Vec::new();
    for conn in ctx.timers.all() {
        if moved.contains_key(&conn.id) || conn.is_closing() {
            continue;
        }
        if conn.identity().is_some() {
            staying.push(conn);
        } else {
            tail.closed += going_away(ctx, &[conn], "gateway restarting, log in again");
        }
    }
    drop(moved);
    // What was published since the commit, and everything after it, reaches the
    // connections that stayed (the successor delivers to the moved ones).
    ctx.handoff.gate.tail(ctx);
    if staying.is_empty() {
        return tail;
    }
    tail.redirected = staying.len();
    tracing::info!(gw = %ctx.config.id, connections = staying.len(), "redirecting the connections that could not move");
    let rate = u64::from(ctx.config.migrate_rate.max(1));
    // The migration ends by itself (every connection left, timed out or could get no
    // token); this bound only guards against a stuck one.
    let bound =
        Duration::from_secs(2 * ctx.config.migrate_timeout_secs + staying.len() as u64 / rate + 10);
    ctx.migration.hand_off(ctx, staying);
    let status = ctx.migration.finish_within(ctx, bound).await;
    // Left: no token for them (no ipconfig), or the migration was stuck.
    let left: Vec<_> = ctx
        .registry
        .all()
        .into_iter()
        .filter(|c| !c.is_closing())
        .collect();
    tail.closed += going_away(
        ctx,
        &left,
        "gateway restarting, this connection cannot move",
    );
    tracing::info!(gw = %ctx.config.id, moved = status.moved, timed_out = status.timed_out, failed = status.failed, left = left.len(), error = ?status.error, "redirects after the hand-off done");
    tail
}

/// Closes `conns` with `going_away` and a random retry hint; returns how many.
fn going_away(ctx: &GatewayCtx, conns: &[Arc<ConnShared>], text: &str) -> usize {
    for conn in conns {
        let mut reason = CloseReason::error(ErrorCode::GoingAway, text);
        reason.retry_after_ms = rand::random::<u32>() % ctx.config.going_away_retry_ms.max(1);
        ctx.metrics.error(ErrorCode::GoingAway);
        conn.close(reason);
    }
    conns.len()
}
