//! The `uplink` scenario: the highest rate of uplink messages with store receipts.
//! D devices each keep W messages in flight (closed loop) for a duration; reports
//! receipts per second and send → receipt latency.
//!
//! - Tether: UP → UP_ACK after the business service (in this process) answered Stored.
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
use serde_json::json;
use tether_business::{Business, Stored};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::BenchError;
use crate::compare::{Comparison, Figure, Outcome};
use crate::fleet::{self, Plan};
use crate::p2p::{nats_client, up_frame};
use crate::progress::Progress;
use crate::stack::{Running, Target};
use crate::stats::{Percentiles, Sink, since_us};
use crate::wire::{self, Incoming, Proto, now_ns};

/// Arguments of the `uplink` scenario.
#[derive(Debug, Clone)]
pub struct UplinkArgs {
    /// Sending devices.
    pub devices: usize,
    /// Messages in flight per device.
    pub window: usize,
    /// Seconds of sending.
    pub duration_secs: f64,
    /// Client source addresses.
    pub source_addrs: Vec<IpAddr>,
    /// App id.
    pub app: String,
    /// A running Tether stack to target instead of starting one.
    pub running: Option<Running>,
    /// Peers measured after Tether.
    pub peers: Vec<Proto>,
    /// Print the JSON line.
    pub json: bool,
}

impl Default for UplinkArgs {
    fn default() -> Self {
        UplinkArgs {
            devices: 50,
            window: 32,
            duration_secs: 10.0,
            source_addrs: crate::conns::source_range(60, 2),
            app: "bench".into(),
            running: None,
            peers: Vec::new(),
            json: false,
        }
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

impl UplinkReport {
    /// Figures compared with peers.
    pub fn outcome(&self) -> Outcome {
        Outcome {
            target: self.target.clone(),
            figures: vec![Figure::new("receipts_per_sec", self.receipts_per_sec, "/s")]
                .into_iter()
                .chain(self.latency.figures(false))
                .collect(),
            detail: serde_json::to_value(self).unwrap_or_default(),
        }
    }
}

/// Runs Tether and the peers, prints and returns the comparison.
pub async fn run(args: UplinkArgs) -> Result<Comparison, BenchError> {
    let mut outcomes = Vec::new();
    for (proto, sources) in crate::compare::targets(&args.peers, &args.source_addrs) {
        let mut a = args.clone();
        a.source_addrs = sources;
        let report = measure(&a, proto).await?;
        println!("{report}");
        outcomes.push(report.outcome());
    }
    let comparison = Comparison {
        scenario: "uplink".into(),
        params: json!({
            "devices": args.devices,
            "window": args.window,
            "duration_secs": args.duration_secs,
            "payload_bytes": wire::PAYLOAD_LEN,
        }),
        outcomes,
    };
    comparison.print(args.json);
    Ok(comparison)
}

/// Measures one target.
pub async fn measure(args: &UplinkArgs, proto: Proto) -> Result<UplinkReport, BenchError> {
    if args.devices == 0 || args.window == 0 || args.duration_secs <= 0.0 {
        return Err(BenchError::Args(
            "devices, window and duration must be positive".into(),
        ));
    }
    let window = args.window.min(60_000);
    let target = Target::start(proto, args.running.as_ref()).await?;
    let sink = Arc::new(Sink::default());
    let progress = Progress::start(
        format!("uplink [{}] seconds×10", proto.target_name()),
        (args.duration_secs * 10.0) as u64,
    );
    // Warm-up of one second (state partitions, consumers), then the measured run.
    let phases = [(1.0, false), (args.duration_secs, true)];
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
                for d in 0..args.devices {
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
                let business =
                    Business::new(nats_client(url).await?, &args.app).with_concurrency(1024);
                tokio::spawn(async move {
                    let _ = business
                        .serve_uplinks("bench-store", |_| async { Stored::stored(None) })
                        .await;
                });
            }
            let plan = Plan {
                proto,
                endpoints: vec![target.endpoint],
                sources: args.source_addrs.clone(),
                app: args.app.clone(),
                did_prefix: "u".into(),
                subscribe: None,
                rate: 5_000,
            };
            let opened =
                fleet::open(&plan, target.signer.as_ref(), 0..args.devices, |_, _| {}).await?;
            if opened.failed > 0 {
                return Err(BenchError::Setup(format!(
                    "{} devices failed to connect: {}",
                    opened.failed,
                    opened.first_error.unwrap_or_default()
                )));
            }
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
                        args.devices
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
        devices: args.devices,
        window,
        receipts,
        receipts_per_sec: receipts as f64 / args.duration_secs,
        latency: Percentiles::of(&sink.merged()),
    };
    drop(target);
    Ok(report)
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
            let body = wire::payload(stamp, d as u64);
            let key = match proto {
                Proto::Mqtt => {
                    let id = (next_id % 65_535 + 1) as u16;
                    wire::mqtt_publish(&mut out, &topic, &body, Some(id));
                    u64::from(id)
                }
                Proto::TetherWs => {
                    wire::ws_binary(&mut out, &up_frame(next_id, body));
                    next_id
                }
                _ => {
                    out.extend_from_slice(&up_frame(next_id, body));
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
        while let Some(item) = wire::decode(proto, &mut buf)? {
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
                .publish(subject.clone(), wire::payload(stamp, d as u64))
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
