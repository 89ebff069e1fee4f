//! A gateway cut from its NATS can neither register logins nor deliver or forward
//! anything. After `nats_lost_close_secs` without NATS it tells every connection
//! `going_away` (retryable: try another endpoint), so devices log in elsewhere, in another
//! region when their own region's NATS is down (docs/multi-region.md). Logins meanwhile
//! are refused at once with `unavailable` (state cannot register them; see the LOGIN
//! handling in `conn::driver`). 0 turns this off.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::connection::State;
use tether_service::Shutdown;

use crate::context::GatewayCtx;

/// How often the connection state is looked at.
const CHECK_EVERY: Duration = Duration::from_millis(250);

/// Watches `client` until `shutdown`; does nothing when the setting is 0.
pub fn spawn(ctx: Arc<GatewayCtx>, client: async_nats::Client, shutdown: Shutdown) {
    let limit = Duration::from_secs(ctx.config.nats_lost_close_secs);
    if limit.is_zero() {
        return;
    }
    tokio::spawn(async move {
        let mut lost_since: Option<Instant> = None;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(CHECK_EVERY) => {}
            }
            if client.connection_state() == State::Connected {
                if lost_since.take().is_some() {
                    tracing::info!(gw = %ctx.config.id, "nats is back");
                }
                continue;
            }
            let since = *lost_since.get_or_insert_with(Instant::now);
            if since.elapsed() >= limit && !ctx.registry.is_empty() {
                let closed =
                    crate::server::tell_going_away(&ctx, "gateway lost its nats connection");
                tracing::warn!(gw = %ctx.config.id, closed, lost_secs = since.elapsed().as_secs(), "nats lost: connections told going_away");
            }
        }
    });
}
