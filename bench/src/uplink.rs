//! The `uplink` scenario: the highest rate of uplink messages with store receipts.
//! D devices each keep W messages in flight (closed loop) for a duration; reports
//! receipts per second and send → receipt latency.
//!
//! - Tether: UP → UP_ACK after the business service (in this process) answered
//!   `UplinkReply::Stored`.
//! - nats: JetStream publish with ack to a file stream (the receipt is the ack).
//! - mosquitto: QoS1 PUBLISH → PUBACK (in memory; Mosquitto runs without persistence).

use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use serde::Serialize;
use serde_json::{Value, json};
use tether_business::{Business, UplinkReply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::BenchError;
use crate::client_codec::{self, Incoming, Proto, now_ns};
use crate::compare::Figure;
use crate::fleet::{self, Plan};
use crate::progress::Progress;
use crate::scenario::{self, CommonArgs, Report, RunningArgs, Scenario, source_range};
use crate::stack::{Target, nats_client};
use crate::stats::{Percentiles, Sink, since_us};

/// Arguments of the `uplink` scenario.
#[derive(Debug, Clone, clap::Args)]
pub struct UplinkArgs {
    /// Sending devices.
    #[arg(long, default_value_t = 50)]
    pub devices: usize,
    /// Messages in flight per device.
    #[arg(long, default_value_t = 32)]
    pub window: usize,
    /// Seconds of sending.
    #[arg(long = "duration", value_name = "DURATION", default_value_t = 10.0)]
    pub duration_secs: f64,
    /// The bench app's receipt mode (PROTOCOL 11.1): `business` (UP_ACK after the business
    /// stored it, the default) or `stored` (UP_ACK once JetStream stored the UP). Written
    /// into the app's `tether_apps` record before the run.
    #[arg(long, default_value = "business", value_parser = ["business", "stored"])]
    pub receipt_mode: String,
    /// A running Tether stack to target.
    #[command(flatten)]
    pub running: RunningArgs,
    /// The flags of every scenario.
    #[command(flatten)]
    pub common: CommonArgs,
}

impl Default for UplinkArgs {
    fn default() -> Self {
        scenario::defaults()
    }
}

/// Results of one uplink run.
#[derive(Debug, Clone, Serialize)]
pub struct UplinkReport {
    /// `tether`, `nats` or `mosquitto`.
    pub target: String,
    /// Devices.
    pub devices: usize,
    /// In flight per device.
    pub window: usize,
    /// Receipts received.
    pub receipts: u64,
    /// Receipts per second.
    pub receipts_per_sec: f64,
    /// Send → receipt.
    pub latency: Percentiles,
}

impl std::fmt::Display for UplinkReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "uplink [{}]: {} devices × {} in flight: {} receipts = {:.0}/s",
            self.target, self.devices, self.window, self.receipts, self.receipts_per_sec
        )?;
        write!(f, "  send → receipt: {}", self.latency)
    }
}

impl Report for UplinkReport {
    fn target(&self) -> &str {
        &self.target
    }

    fn figures(&self) -> Vec<Figure> {
        let rate = Figure::new("receipts_per_sec", self.receipts_per_sec, "/s");
        std::iter::once(rate)
            .chain(self.latency.figures(false))
            .collect()
    }
}

impl Scenario for UplinkArgs {
    type Report = UplinkReport;
    const NAME: &'static str = "uplink";

    fn common(&self) -> &CommonArgs {
        &self.common
    }

    fn default_sources() -> Vec<IpAddr> {
        source_range(60, 2)
    }

    fn params(&self) -> Value {
        json!({
            "devices": self.devices,
            "window": self.window,
            "duration_secs": self.duration_secs,
            "receipt_mode": self.receipt_mode,
            "payload_bytes": client_codec::PAYLOAD_LEN,
        })
    }

    async fn measure(&self, proto: Proto, sources: &[IpAddr]) -> Result<UplinkReport, BenchError> {
        if self.devices == 0 || self.window == 0 || self.duration_secs <= 0.0 {
            return Err(BenchError::Args(
                "devices, window and duration must be positive".into(),
            ));
        }
        let window = self.window.min(60_000);
        let target = Target::start(proto, self.running.running().as_ref()).await?;
        let sink = Arc::new(Sink::default());
        let progress = Progress::start(
            format!("uplink [{}] seconds×10", proto.target_name()),
            (self.duration_secs * 10.0) as u64,
        );
        // Warm-up of one second (state partitions, consumers), then the measured run.
        let phases = [(1.0, false), (self.duration_secs, true)];
        match proto {
            Proto::Nats => {
                let url = target.nats_url.clone().unwrap_or_default();
                let client = nats_client(&url).await?;
                let js = async_nats::jetstream::new(client);
                js.get_or_create_stream(async_nats::jetstream::stream::Config {
                    name: "BENCHUP".into(),
                    subjects: vec!["up.>".into()],
                    ..Default::default()
                })
                .await
                .map_err(|e| BenchError::Setup(format!("create stream: {e}")))?;
                for (secs, measured) in phases {
                    let mut tasks = Vec::new();
                    for d in 0..self.devices {
                        let js = async_nats::jetstream::new(nats_client(&url).await?);
                        let sink = if measured {
                            sink.clone()
                        } else {
                            Arc::new(Sink::default())
                        };
                        tasks.push(tokio::spawn(js_device(js, d, window, secs, sink)));
                    }
                    tick_progress(&progress, measured, secs, tasks).await;
                }
            }
            Proto::Tether | Proto::TetherWs | Proto::Mqtt => {
                if proto != Proto::Mqtt {
                    let url = target.nats_url.as_deref().unwrap_or_default();
                    if self.receipt_mode != "business" {
                        set_receipt_mode(url, &self.common.app, &self.receipt_mode).await?;
                    }
                    let business = Business::new(nats_client(url).await?, &self.common.app)
                        .with_concurrency(1024);
                    tokio::spawn(async move {
                        let _ = business
                            .serve_uplinks("bench-store", |_| async { UplinkReply::stored(None) })
                            .await;
                    });
                }
                let plan = Plan {
                    proto,
                    endpoints: vec![target.endpoint],
                    sources: sources.to_vec(),
                    app: self.common.app.clone(),
                    did_prefix: "u".into(),
                    subscribe: None,
                    rate: 5_000,
                };
                let opened = fleet::open(&plan, target.signer.as_ref(), 0..self.devices, |_, _| {})
                    .await?
                    .all()?;
                let mut devices: Vec<(TcpStream, BytesMut, u64)> = opened
                    .conns
                    .into_iter()
                    // Ids keep growing across runs against a running stack (its dedupe window
                    // would swallow reused ids), like the SDK's.
                    .map(|(_, s, b)| (s, b, now_ns() / 1_000))
                    .collect();
                for (secs, measured) in phases {
                    let mut tasks = Vec::new();
                    for (d, (stream, buf, next_id)) in devices.drain(..).enumerate() {
                        let sink = if measured {
                            sink.clone()
                        } else {
                            Arc::new(Sink::default())
                        };
                        tasks.push(tokio::spawn(raw_device(
                            proto, d, stream, buf, next_id, window, secs, sink,
                        )));
                    }
                    let outcomes = tick_progress(&progress, measured, secs, tasks).await;
                    let failed = outcomes.iter().filter(|o| o.is_err()).count();
                    if let Some(Err(first)) = outcomes.iter().find(|o| o.is_err()) {
                        return Err(BenchError::Setup(format!(
                            "{failed} of {} devices failed: {first} (a running gateway needs \
                             max_frames_per_sec = 0 for this scenario)",
                            self.devices
                        )));
                    }
                    devices = outcomes.into_iter().flatten().collect();
                }
            }
        }
        progress.finish();
        let receipts = sink.count();
        let report = UplinkReport {
            target: proto.target_name().into(),
            devices: self.devices,
            window,
            receipts,
            receipts_per_sec: receipts as f64 / self.duration_secs,
            latency: Percentiles::of(&sink.merged()),
        };
        drop(target);
        Ok(report)
    }
}

/// Writes the app's receipt mode into its `tether_apps` record (creating a record with just
/// an id and pipeline when there is none); gateways and state apply it live, within the
/// run's one-second warm-up.
async fn set_receipt_mode(url: &str, app: &str, mode: &str) -> Result<(), BenchError> {
    let js = async_nats::jetstream::new(nats_client(url).await?);
    let setup = |e: &dyn std::fmt::Display| BenchError::Setup(format!("receipt mode: {e}"));
    let apps = js
        .get_key_value(tether_nats::layout::APPS_BUCKET)
        .await
        .map_err(|e| setup(&e))?;
    let key = tether_nats::keys::app(app);
    let mut record: Value = match apps.get(&key).await.map_err(|e| setup(&e))? {
        Some(body) => serde_json::from_slice(&body).map_err(|e| setup(&e))?,
        None => json!({ "id": app }),
    };
    record["pipeline"]["receipt_mode"] = json!(mode);
    apps.put(key, record.to_string().into())
        .await
        .map_err(|e| setup(&e))?;
    Ok(())
}

async fn tick_progress<T>(
    progress: &Progress,
    measured: bool,
    secs: f64,
    tasks: Vec<tokio::task::JoinHandle<T>>,
) -> Vec<T> {
    let start = Instant::now();
    let ticker = measured.then(|| {
        let progress = progress.clone();
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                progress.set((start.elapsed().as_secs_f64() * 10.0).min(secs * 10.0) as u64);
            }
        })
    });
    let mut out = Vec::new();
    for t in tasks {
        if let Ok(v) = t.await {
            out.push(v);
        }
    }
    if let Some(t) = ticker {
        t.abort();
    }
    out
}

/// A Tether or MQTT device: keeps `window` messages in flight for `secs`, records
/// send → receipt; returns its connection for the next phase, or why it failed.
#[allow(clippy::too_many_arguments)]
async fn raw_device(
    proto: Proto,
    d: usize,
    mut stream: TcpStream,
    mut buf: BytesMut,
    mut next_id: u64,
    window: usize,
    secs: f64,
    sink: Arc<Sink>,
) -> Result<(TcpStream, BytesMut, u64), String> {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let mut in_flight: HashMap<u64, u64> = HashMap::with_capacity(window);
    let mut out = BytesMut::with_capacity(4096);
    let mut latencies = Vec::with_capacity(window);
    let topic = format!("u/{d}");
    loop {
        let sending = Instant::now() < deadline;
        while sending && in_flight.len() < window {
            next_id += 1;
            let stamp = now_ns();
            let body = client_codec::payload(stamp, d as u64);
            let key = match proto {
                Proto::Mqtt => {
                    let id = (next_id % 65_535 + 1) as u16;
                    client_codec::mqtt_publish(&mut out, &topic, &body, Some(id));
                    u64::from(id)
                }
                _ => {
                    client_codec::tether_up(&mut out, proto, next_id, body);
                    next_id
                }
            };
            in_flight.insert(key, stamp);
        }
        if !out.is_empty() {
            stream
                .write_all(&out)
                .await
                .map_err(|e| format!("write: {e}"))?;
            out.clear();
        }
        if !sending && in_flight.is_empty() {
            return Ok((stream, buf, next_id));
        }
        let read = tokio::time::timeout(Duration::from_secs(5), stream.read_buf(&mut buf)).await;
        match read {
            Ok(Ok(n)) if n > 0 => {}
            Ok(Ok(_)) => return Err("connection closed".into()),
            Ok(Err(e)) => return Err(format!("read: {e}")),
            Err(_) => return Err("no receipt for 5 s".into()),
        }
        let now = now_ns();
        while let Some(item) = client_codec::decode(proto, &mut buf)? {
            match item {
                Incoming::Receipt(id) => {
                    if let Some(stamp) = in_flight.remove(&id) {
                        latencies.push(since_us(stamp, now));
                    }
                }
                Incoming::Error(e) => return Err(e),
                _ => {}
            }
        }
        sink.record_batch(d, now, &latencies);
        latencies.clear();
    }
}

/// A JetStream publisher keeping `window` publishes awaiting their ack.
async fn js_device(
    js: async_nats::jetstream::Context,
    d: usize,
    window: usize,
    secs: f64,
    sink: Arc<Sink>,
) {
    let deadline = Instant::now() + Duration::from_secs_f64(secs);
    let subject = format!("up.{d}");
    let mut acks = FuturesUnordered::new();
    loop {
        while Instant::now() < deadline && acks.len() < window {
            let stamp = now_ns();
            match js
                .publish(subject.clone(), client_codec::payload(stamp, d as u64))
                .await
            {
                Ok(ack) => acks.push(async move { (ack.await.is_ok(), stamp) }),
                Err(_) => return,
            }
        }
        match acks.next().await {
            Some((true, stamp)) => {
                let now = now_ns();
                sink.record_batch(d, now, &[since_us(stamp, now)]);
            }
            Some((false, _)) => {}
            None => return,
        }
    }
}
