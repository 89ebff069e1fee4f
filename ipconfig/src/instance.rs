//! This instance's record in `tether_instances` (key `ipconfig.<id>`, PROTOCOL.md 12.4):
//! put every `record_interval_ms` so the ops cluster view lists ipconfig instances, and
//! deleted on a clean stop (the bucket's TTL removes the record of one that died).

use std::time::Duration;

use async_nats::jetstream::kv;
use tether_schemas::bus::IpconfigHeartbeat;
use tether_service::Shutdown;

use crate::api::ApiState;

/// Endpoints requests answered so far, over every status class.
fn requests(state: &ApiState) -> u64 {
    ["2xx", "4xx", "5xx"]
        .iter()
        .map(|class| {
            state
                .metrics
                .requests
                .get_or_create(&[("status", class)])
                .get()
        })
        .sum()
}

/// Puts the record of instance `id` (public address `http`) until `shutdown`, then
/// deletes it.
pub fn spawn(store: kv::Store, state: ApiState, id: String, http: String, shutdown: Shutdown) {
    let interval = Duration::from_millis(state.config.record_interval_ms.max(100));
    let started_ms = tether_auth::unix_now_ms();
    tokio::spawn(async move {
        let key = tether_nats::keys::ipconfig(&id);
        loop {
            let record = IpconfigHeartbeat {
                id: id.clone(),
                version: env!("CARGO_PKG_VERSION").to_string(),
                region: state.config.default_region.clone(),
                http: http.clone(),
                gateways: u64::try_from(state.gateways.live_count()).unwrap_or(u64::MAX),
                apps: u64::try_from(state.apps.len()).unwrap_or(u64::MAX),
                requests: requests(&state),
                started_ms,
                at_ms: tether_auth::unix_now_ms(),
                interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
            };
            match serde_json::to_vec(&record) {
                Ok(json) => {
                    if let Err(error) = store.put(&key, json.into()).await {
                        tracing::warn!(%id, %error, "ipconfig record not written");
                    }
                }
                Err(error) => tracing::error!(%id, %error, "cannot encode ipconfig record"),
            }
            tokio::select! {
                () = shutdown.cancelled() => break,
                () = tokio::time::sleep(interval) => {}
            }
        }
        if let Err(error) = store.delete(&key).await {
            tracing::warn!(%id, %error, "ipconfig record not deleted");
        }
    });
}
