//! Buckets of peer regions, read through their JetStream domains (docs/multi-region.md,
//! "Discovery across regions"): opened again and again until the peer answers, then
//! followed like this region's own.

use std::time::Duration;

use async_nats::jetstream::{self, kv};
use tether_service::Shutdown;

/// Opens `bucket` of the peer region reached through `js` (retrying every second while
/// the peer cannot be reached), then calls `follow` with it; gives up at `shutdown`.
pub fn open_then(
    js: jetstream::Context,
    bucket: &'static str,
    region: String,
    shutdown: Shutdown,
    follow: impl FnOnce(kv::Store, Shutdown) + Send + 'static,
) {
    tokio::spawn(async move {
        let store = loop {
            match js.get_key_value(bucket).await {
                Ok(store) => break store,
                Err(error) => {
                    tracing::debug!(%region, bucket, %error, "peer region's bucket not readable yet");
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        };
        tracing::info!(%region, bucket, "following a bucket of a peer region");
        follow(store, shutdown);
    });
}
