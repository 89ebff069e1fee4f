//! Puts the bus layout back after NATS comes back. A single-node server (a region of
//! `tether up --regions`, a small deployment) loses its memory-stored buckets
//! (`tether_gateways`, `tether_receipts`) when it restarts: without them gateways cannot
//! publish heartbeats and ipconfig offers no gateway, for good. So every role, after each
//! reconnect, creates again whatever of the layout is missing (existing streams and
//! buckets are left as they are).

use std::time::Duration;

use async_nats::connection::State;
use tether_nats::BusLayout;

use crate::shutdown::Shutdown;

/// How often the connection state is looked at.
const CHECK_EVERY: Duration = Duration::from_millis(500);
/// The longest pause between two failed attempts after a reconnect.
const MAX_RETRY: Duration = Duration::from_secs(5);

/// Watches `client` until `shutdown`; after every disconnect followed by a reconnect it
/// ensures `layout`, retrying with backoff while the server refuses (e.g. JetStream not
/// ready yet).
pub fn spawn(client: async_nats::Client, layout: BusLayout, role: String, shutdown: Shutdown) {
    tokio::spawn(async move {
        let js = async_nats::jetstream::new(client.clone());
        let mut lost = false;
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(CHECK_EVERY) => {}
            }
            if client.connection_state() != State::Connected {
                lost = true;
                continue;
            }
            if !lost {
                continue;
            }
            let mut wait = CHECK_EVERY;
            loop {
                match tether_nats::ensure_layout(&js, &layout).await {
                    Ok(()) => {
                        tracing::info!(role, "nats is back; bus layout ensured");
                        lost = false;
                        break;
                    }
                    Err(error) => {
                        tracing::warn!(role, %error, "nats is back but the bus layout cannot be ensured yet, retrying");
                    }
                }
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(wait) => {}
                }
                wait = (wait * 2).min(MAX_RETRY);
                if client.connection_state() != State::Connected {
                    break; // lost again: start over after the next reconnect
                }
            }
        }
    });
}
