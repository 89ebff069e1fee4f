//! Fills the [`ClusterView`]: KV watches of `tether_gateways`, `tether_leases`,
//! `tether_apps` and `tether_instances` (ipconfig records) (each restarted when it ends, e.g. after a server restart), and a poll of
//! the NATS monitoring endpoints.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use serde_json::Value;
use tether_nats::{keys, layout};
use tether_schemas::bus::{GatewayHeartbeat, IpconfigHeartbeat};
use tether_service::Shutdown;

use crate::http;
use crate::view::{ClusterView, ConsumerView, NatsServerView, NatsView, StreamView};

/// Starts every watcher; they stop with `shutdown`.
pub fn spawn(
    js: jetstream::Context,
    view: Arc<ClusterView>,
    monitor_urls: Vec<String>,
    monitor_every: Duration,
    shutdown: Shutdown,
) {
    for bucket in [
        layout::GATEWAYS_BUCKET,
        layout::LEASES_BUCKET,
        layout::APPS_BUCKET,
        layout::INSTANCES_BUCKET,
    ] {
        tokio::spawn(follow(js.clone(), bucket, view.clone(), shutdown.clone()));
    }
    if !monitor_urls.is_empty() {
        tokio::spawn(poll_monitoring(view, monitor_urls, monitor_every, shutdown));
    }
}

/// Watches one bucket (waiting for it to exist: the lease bucket appears with the first
/// state instance) until `shutdown`.
async fn follow(
    js: jetstream::Context,
    bucket: &'static str,
    view: Arc<ClusterView>,
    shutdown: Shutdown,
) {
    loop {
        let watched = async {
            let store = match js.get_key_value(bucket).await {
                Ok(store) => store,
                Err(error) => {
                    tracing::debug!(%bucket, %error, "bucket not there yet");
                    return;
                }
            };
            if bucket == layout::LEASES_BUCKET
                && let Ok(status) = store.status().await
            {
                view.set_lease_ttl(status.max_age());
            }
            // Every current value first, then each change.
            let mut entries = match store.watch_with_history(">").await {
                Ok(entries) => entries,
                Err(error) => {
                    tracing::warn!(%bucket, %error, "cannot watch");
                    return;
                }
            };
            while let Some(entry) = entries.next().await {
                match entry {
                    Ok(entry) => apply(&view, bucket, &entry),
                    Err(error) => tracing::debug!(%bucket, %error, "watch error, continuing"),
                }
            }
        };
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = watched => {}
        }
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

/// Applies one KV entry of `bucket` to the view.
fn apply(view: &ClusterView, bucket: &str, entry: &kv::Entry) {
    let put = entry.operation == kv::Operation::Put;
    match bucket {
        layout::GATEWAYS_BUCKET => {
            if !put {
                view.remove_gateway(&entry.key);
                return;
            }
            match serde_json::from_slice::<GatewayHeartbeat>(&entry.value) {
                Ok(heartbeat) if heartbeat.id == entry.key => view.put_gateway(heartbeat),
                Ok(_) => tracing::debug!(key = %entry.key, "heartbeat id differs from its key"),
                Err(error) => tracing::debug!(key = %entry.key, %error, "unreadable heartbeat"),
            }
        }
        layout::LEASES_BUCKET => {
            if let Some(member) = entry.key.strip_prefix(keys::LEASE_MEMBER_PREFIX) {
                if put {
                    view.put_member(member);
                } else {
                    view.remove_member(member);
                }
            } else if let Some(partition) = entry
                .key
                .strip_prefix(keys::LEASE_PARTITION_PREFIX)
                .and_then(|p| p.parse::<u16>().ok())
            {
                let owner = String::from_utf8_lossy(&entry.value).into_owned();
                if put && !owner.is_empty() {
                    view.put_lease(partition, owner);
                } else {
                    view.remove_lease(partition);
                }
            }
        }
        layout::APPS_BUCKET => {
            let Some(app) = entry.key.strip_prefix("app.") else {
                return;
            };
            if !put {
                view.remove_app(app);
                return;
            }
            match serde_json::from_slice::<tether_ipconfig::AppRecord>(&entry.value) {
                Ok(record) if record.id == app => view.put_app(record),
                Ok(_) => tracing::debug!(%app, "app record id differs from its key"),
                Err(error) => tracing::warn!(%app, %error, "unreadable app record"),
            }
        }
        layout::INSTANCES_BUCKET => {
            let Some(id) = entry.key.strip_prefix(keys::IPCONFIG_PREFIX) else {
                return;
            };
            if !put {
                view.remove_ipconfig(id);
                return;
            }
            match serde_json::from_slice::<IpconfigHeartbeat>(&entry.value) {
                Ok(record) if record.id == id => view.put_ipconfig(record),
                Ok(_) => tracing::debug!(%id, "ipconfig record id differs from its key"),
                Err(error) => tracing::debug!(%id, %error, "unreadable ipconfig record"),
            }
        }
        _ => {}
    }
}

async fn poll_monitoring(
    view: Arc<ClusterView>,
    urls: Vec<String>,
    every: Duration,
    shutdown: Shutdown,
) {
    loop {
        let mut nats = NatsView::default();
        for url in &urls {
            nats.servers.push(varz(url).await);
            if nats.streams.is_empty() {
                nats.streams = jsz(url).await.unwrap_or_default();
            }
        }
        view.set_nats(nats);
        tokio::select! {
            () = shutdown.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
    }
}

async fn get_json(url: &str) -> Result<Value, String> {
    let answer = http::request("GET", url, None, None, Duration::from_secs(3))
        .await
        .map_err(|e| e.to_string())?;
    if answer.status != 200 {
        return Err(format!("{url}: status {}", answer.status));
    }
    serde_json::from_slice(&answer.body).map_err(|e| format!("{url}: {e}"))
}

fn num(value: &Value, path: &[&str]) -> u64 {
    let mut v = value;
    for key in path {
        v = &v[*key];
    }
    v.as_u64().unwrap_or(0)
}

async fn varz(base: &str) -> NatsServerView {
    match get_json(&format!("{base}/varz")).await {
        Ok(v) => NatsServerView {
            url: base.to_string(),
            name: v["server_name"].as_str().unwrap_or_default().to_string(),
            version: v["version"].as_str().unwrap_or_default().to_string(),
            connections: num(&v, &["connections"]),
            in_msgs: num(&v, &["in_msgs"]),
            out_msgs: num(&v, &["out_msgs"]),
            mem: num(&v, &["mem"]),
            cpu: v["cpu"].as_f64().unwrap_or(0.0),
            js_storage: num(&v, &["jetstream", "stats", "storage"]),
            js_memory: num(&v, &["jetstream", "stats", "memory"]),
            error: None,
        },
        Err(error) => NatsServerView {
            url: base.to_string(),
            error: Some(error),
            ..Default::default()
        },
    }
}

async fn jsz(base: &str) -> Option<Vec<StreamView>> {
    let v = get_json(&format!("{base}/jsz?streams=true&consumers=true"))
        .await
        .ok()?;
    let mut streams = Vec::new();
    for account in v["account_details"].as_array()? {
        for stream in account["stream_detail"].as_array().into_iter().flatten() {
            let consumers = stream["consumer_detail"]
                .as_array()
                .into_iter()
                .flatten()
                .map(|c| ConsumerView {
                    name: c["name"].as_str().unwrap_or_default().to_string(),
                    pending: num(c, &["num_pending"]),
                    ack_pending: num(c, &["num_ack_pending"]),
                })
                .collect();
            streams.push(StreamView {
                name: stream["name"].as_str().unwrap_or_default().to_string(),
                messages: num(stream, &["state", "messages"]),
                bytes: num(stream, &["state", "bytes"]),
                consumers,
            });
        }
    }
    streams.sort_by(|a, b| a.name.cmp(&b.name));
    Some(streams)
}
