//! The discovery heartbeat: every `heartbeat_interval_ms` the gateway puts its live
//! figures (connections, capacity, CPU, memory, message rates, region, pools, endpoints,
//! draining flag) into the `tether_gateways` KV bucket under its id, where ipconfig
//! reads them (DESIGN.md flow 1, PROTOCOL.md section 12.4).
//!
//! The bucket's TTL removes the record of a gateway that dies; a gateway that stops
//! cleanly first marks itself draining (so ipconfig stops offering it while clients
//! leave) and deletes its record at the end. Operators drain a gateway with
//! `POST /v1/drain` on its admin port or the `drain` control op ([`crate::migrate`]).

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv;
use tether_nats::keys;
use tether_nats::layout::GATEWAYS_BUCKET;
use tether_schemas::bus::{AdvertisedEndpoints, AppRates, GatewayHeartbeat};
use tether_service::Shutdown;
use tokio::sync::Notify;
use tokio::task::JoinHandle;

use crate::config::GatewayConfig;
use crate::context::GatewayCtx;

/// `/proc` reports CPU times in USER_HZ, which Linux fixes at 100 per second.
const USER_HZ: f64 = 100.0;

/// The draining flag and a way to publish a change at once.
pub struct Heartbeat {
    id: String,
    draining: AtomicBool,
    keep_record: AtomicBool,
    changed: Notify,
}

impl Heartbeat {
    /// The heartbeat of the gateway configured by `config` (not draining).
    pub fn new(config: &GatewayConfig) -> Arc<Heartbeat> {
        Arc::new(Heartbeat {
            id: config.id.clone(),
            draining: AtomicBool::new(false),
            keep_record: AtomicBool::new(false),
            changed: Notify::new(),
        })
    }

    /// Whether the gateway is draining (not to be offered to new clients).
    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::Relaxed)
    }

    /// Sets the draining flag and publishes a heartbeat at once.
    pub fn set_draining(&self, draining: bool) {
        if self.draining.swap(draining, Ordering::Relaxed) != draining {
            tracing::info!(gw = %self.id, draining, "draining flag changed");
        }
        self.changed.notify_one();
    }

    /// The record stays when the task stops (a hand-off: the next process keeps it).
    pub fn keep_record(&self) {
        self.keep_record.store(true, Ordering::Relaxed);
    }

    /// Starts publishing. On `stopping` (the gateway's shutdown signal) the flag turns to
    /// draining and is published; on `stopped` (after the drain) the record is deleted and
    /// the task ends. `tcp`/`ws` are the bound listener addresses, advertised unless the
    /// configuration names other ones.
    pub fn spawn(
        self: Arc<Self>,
        ctx: Arc<GatewayCtx>,
        tcp: Option<SocketAddr>,
        ws: Option<SocketAddr>,
        stopping: Shutdown,
        stopped: Shutdown,
    ) -> JoinHandle<()> {
        let endpoints = advertised(&ctx.config, tcp, ws);
        tokio::spawn(async move {
            let js = async_nats::jetstream::new(ctx.outbound.client().clone());
            let store = loop {
                match js.get_key_value(GATEWAYS_BUCKET).await {
                    Ok(store) => break store,
                    Err(error) => {
                        tracing::warn!(gw = %self.id, %error, "cannot open tether_gateways, retrying");
                        tokio::select! {
                            _ = stopped.cancelled() => return,
                            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                        }
                    }
                }
            };
            let interval = Duration::from_millis(ctx.config.heartbeat_interval_ms.max(1));
            let mut sampler = Sampler::new(&ctx);
            let started_ms = tether_auth::unix_now_ms();
            let mut announced_stop = false;
            loop {
                let record = sampler.sample(&ctx, &self, &endpoints, started_ms, interval);
                self.put(&store, &record).await;
                tokio::select! {
                    _ = stopped.cancelled() => break,
                    _ = stopping.cancelled(), if !announced_stop => {
                        announced_stop = true;
                        self.draining.store(true, Ordering::Relaxed);
                    }
                    _ = self.changed.notified() => {}
                    _ = tokio::time::sleep(interval) => {}
                }
            }
            if self.keep_record.load(Ordering::Relaxed) {
                // Handed over: the next process of this gateway id writes the record now.
                return;
            }
            match store.delete(keys::gateway(&self.id)).await {
                Ok(()) => tracing::info!(gw = %self.id, "heartbeat record deleted"),
                Err(error) => {
                    tracing::warn!(gw = %self.id, %error, "cannot delete heartbeat record")
                }
            }
        })
    }

    async fn put(&self, store: &kv::Store, record: &GatewayHeartbeat) {
        let json = match serde_json::to_vec(record) {
            Ok(json) => json,
            Err(error) => {
                tracing::error!(gw = %self.id, %error, "cannot encode heartbeat");
                return;
            }
        };
        if let Err(error) = store.put(keys::gateway(&self.id), json.into()).await {
            tracing::warn!(gw = %self.id, %error, "heartbeat not written");
        }
    }
}

/// The endpoints to advertise: configured ones, else the bound addresses (an unspecified
/// bind address such as `0.0.0.0` is advertised as loopback, with a warning).
fn advertised(
    config: &GatewayConfig,
    tcp: Option<SocketAddr>,
    ws: Option<SocketAddr>,
) -> AdvertisedEndpoints {
    let reachable = |mut addr: SocketAddr, what: &str| {
        if addr.ip().is_unspecified() {
            tracing::warn!(gw = %config.id, %addr, "{what} listens on an unspecified address; set advertise_{what} so clients can reach it");
            addr.set_ip(if addr.is_ipv4() {
                std::net::Ipv4Addr::LOCALHOST.into()
            } else {
                std::net::Ipv6Addr::LOCALHOST.into()
            });
        }
        addr
    };
    let scheme = if config.tls.is_some() { "wss" } else { "ws" };
    AdvertisedEndpoints {
        tcp: config
            .advertise_tcp
            .clone()
            .or_else(|| tcp.map(|a| reachable(a, "tcp").to_string())),
        ws: config
            .advertise_ws
            .clone()
            .or_else(|| ws.map(|a| format!("{scheme}://{}/ws", reachable(a, "ws")))),
    }
}

/// Turns counters into per-second rates between two heartbeats.
struct Sampler {
    at: Instant,
    cpu_secs: Option<f64>,
    msgs_in: u64,
    msgs_out: u64,
    apps: std::collections::BTreeMap<String, crate::app_traffic::Totals>,
    cpus: f64,
}

impl Sampler {
    fn new(ctx: &GatewayCtx) -> Sampler {
        Sampler {
            at: Instant::now(),
            cpu_secs: process_cpu_secs(),
            msgs_in: msgs_in(ctx),
            msgs_out: ctx.metrics.frames_out.get(),
            apps: ctx.app_traffic.totals(),
            cpus: std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64),
        }
    }

    fn sample(
        &mut self,
        ctx: &GatewayCtx,
        heartbeat: &Heartbeat,
        endpoints: &AdvertisedEndpoints,
        started_ms: u64,
        interval: Duration,
    ) -> GatewayHeartbeat {
        let now = Instant::now();
        let elapsed = now.duration_since(self.at).as_secs_f64();
        let (cpu_secs, msgs_in, msgs_out) = (
            process_cpu_secs(),
            msgs_in(ctx),
            ctx.metrics.frames_out.get(),
        );
        let rate = |now: u64, before: u64| {
            if elapsed > 0.0 {
                now.saturating_sub(before) as f64 / elapsed
            } else {
                0.0
            }
        };
        let apps = ctx.app_traffic.totals();
        let app_rates = apps
            .iter()
            .map(|(app, &(msgs_in, msgs_out))| {
                let (in_before, out_before) = self.apps.get(app).copied().unwrap_or_default();
                let rates = AppRates {
                    msgs_in_per_sec: rate(msgs_in, in_before),
                    msgs_out_per_sec: rate(msgs_out, out_before),
                };
                (app.clone(), rates)
            })
            .collect();
        let cpu = match (cpu_secs, self.cpu_secs) {
            (Some(now), Some(before)) if elapsed > 0.0 => {
                ((now - before) / (elapsed * self.cpus)).clamp(0.0, 1.0)
            }
            _ => 0.0,
        };
        let record = GatewayHeartbeat {
            id: ctx.config.id.clone(),
            version: env!("CARGO_PKG_VERSION").to_string(),
            region: ctx.config.region.clone(),
            pools: ctx.config.pools.clone(),
            endpoints: endpoints.clone(),
            connections: u64::try_from(ctx.metrics.connections.get()).unwrap_or(0),
            apps: ctx.registry.app_counts(),
            app_rates,
            capacity: ctx.config.capacity() as u64,
            cpu,
            mem_bytes: process_rss_bytes().unwrap_or(0),
            msgs_in_per_sec: rate(msgs_in, self.msgs_in),
            msgs_out_per_sec: rate(msgs_out, self.msgs_out),
            draining: heartbeat.is_draining(),
            started_ms,
            pid: std::process::id(),
            at_ms: tether_auth::unix_now_ms(),
            interval_ms: u64::try_from(interval.as_millis()).unwrap_or(u64::MAX),
        };
        *self = Sampler {
            at: now,
            cpu_secs,
            msgs_in,
            msgs_out,
            apps,
            cpus: self.cpus,
        };
        record
    }
}

/// Uplink messages received (stored or not).
fn msgs_in(ctx: &GatewayCtx) -> u64 {
    ctx.metrics.uplink_stored.get() + ctx.metrics.uplink_failed.get()
}

/// CPU seconds used by this process so far (user + system), from `/proc/self/stat`.
fn process_cpu_secs() -> Option<f64> {
    let stat = std::fs::read_to_string("/proc/self/stat").ok()?;
    // Fields after the command name (which may hold spaces) start at field 3 (state);
    // utime and stime are fields 14 and 15.
    let (_, rest) = stat.rsplit_once(')')?;
    let mut fields = rest.split_whitespace().skip(11);
    let utime: f64 = fields.next()?.parse().ok()?;
    let stime: f64 = fields.next()?.parse().ok()?;
    Some((utime + stime) / USER_HZ)
}

/// Resident memory of this process, from `/proc/self/status` (`VmRSS`).
fn process_rss_bytes() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmRSS:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn proc_figures_parse() {
        if cfg!(target_os = "linux") {
            assert!(process_cpu_secs().is_some());
            assert!(process_rss_bytes().is_some_and(|b| b > 0));
        }
    }

    #[test]
    fn advertised_endpoints_default_to_bound_addresses() {
        let config = GatewayConfig::default();
        let bound: SocketAddr = "0.0.0.0:7400".parse().unwrap_or_else(|_| unreachable!());
        let ws: SocketAddr = "127.0.0.1:7401".parse().unwrap_or_else(|_| unreachable!());
        let ep = advertised(&config, Some(bound), Some(ws));
        assert_eq!(ep.tcp.as_deref(), Some("127.0.0.1:7400"));
        assert_eq!(ep.ws.as_deref(), Some("ws://127.0.0.1:7401/ws"));
        let config = GatewayConfig {
            advertise_tcp: Some("gw1.example.com:7400".into()),
            ..GatewayConfig::default()
        };
        let ep = advertised(&config, Some(bound), None);
        assert_eq!(ep.tcp.as_deref(), Some("gw1.example.com:7400"));
        assert_eq!(ep.ws, None);
    }
}
