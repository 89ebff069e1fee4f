//! The shared loops of every role: serve a subscription and follow a KV bucket until
//! shutdown. Written once here so that each service's reconnect, stall and shutdown
//! behaviour is the same.

use std::time::Duration;

use async_nats::jetstream::kv;
use async_nats::{Message, Subscriber};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

/// Hands every message of `subscription` to `handle`, in order, until `shutdown` fires or
/// the subscription ends. `handle` runs inline: spawn inside it for concurrent work.
pub async fn serve_subscription(
    mut subscription: Subscriber,
    shutdown: CancellationToken,
    mut handle: impl FnMut(Message),
) {
    loop {
        tokio::select! {
            message = subscription.next() => match message {
                Some(message) => handle(message),
                None => return,
            },
            _ = shutdown.cancelled() => return,
        }
    }
}

/// Follows the keys of `bucket` matching `filter` until `shutdown`: the current values
/// first, then every change, each handed to `apply` (puts, deletes and purges alike).
///
/// The watch is re-created after an error, after it ends, and (with `stale_after`) after it
/// was silent that long: KV watches can stall after a reconnect (FIELD-NOTES). A re-created
/// watch replays the current values again, so `apply` must be idempotent.
pub async fn watch_kv(
    bucket: kv::Store,
    filter: String,
    stale_after: Option<Duration>,
    shutdown: CancellationToken,
    mut apply: impl FnMut(kv::Entry),
) {
    let quiet = stale_after.unwrap_or(Duration::MAX);
    while !shutdown.is_cancelled() {
        match bucket.watch_with_history(filter.clone()).await {
            Ok(mut watch) => loop {
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    next = tokio::time::timeout(quiet, watch.next()) => match next {
                        Ok(Some(Ok(entry))) => apply(entry),
                        Ok(Some(Err(error))) => {
                            tracing::debug!(bucket = %bucket.name, %filter, %error, "kv watch error, re-creating");
                            break;
                        }
                        Ok(None) | Err(_) => break,
                    },
                }
            },
            Err(error) => {
                tracing::warn!(bucket = %bucket.name, %filter, %error, "cannot watch bucket, retrying");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(500)) => {}
        }
    }
}
