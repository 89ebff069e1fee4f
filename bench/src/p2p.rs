//! The `p2p` scenario: pairs of devices messaging through an echo service at a fixed
//! open-loop rate. Device 2k sends, device 2k+1 receives; latency runs from the
//! *intended* send time (stamped by a pacer thread, so a late sender counts against the
//! system: coordinated omission) to the arrival at the receiver.
//!
//! - Tether: UP → gateway → uplink stream → state → business request → the echo (a
//!   [`Business`] service in this process) pushes a DOWN to the receiver (QoS0, or QoS1
//!   with `qos1`) and answers `UplinkReply::Stored` → UP_ACK to the sender.
//! - nats: NATS request/reply: the sender publishes on `p.echo` with the receiver's
//!   subject as reply-to; an echo service (async-nats) answers to it.
//! - mosquitto: the sender publishes on `p/up`; an echo client republishes to
//!   `p/<receiver>`, which the receiver subscribed.

use std::net::IpAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures::StreamExt;
use serde::Serialize;
use serde_json::{Value, json};
use tether_business::{Business, Push, UplinkReply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;

use crate::BenchError;
use crate::client_codec::{self, Incoming, Proto, now_ns};
use crate::compare::Figure;
use crate::fleet::{self, Plan};
use crate::progress::Progress;
use crate::reader::{self, Counters};
use crate::scenario::{self, CommonArgs, Report, RunningArgs, Scenario, source_range};
use crate::stack::{Target, nats_client};
use crate::stats::{Percentiles, Sink};

/// Arguments of the `p2p` scenario.
#[derive(Debug, Clone, clap::Args)]
pub struct P2pArgs {
    /// Sender/receiver pairs.
    #[arg(long, default_value_t = 100)]
    pub pairs: usize,
    /// Messages per second offered (all pairs).
    #[arg(long, default_value_t = 10_000)]
    pub rate: u32,
    /// Seconds of sending.
    #[arg(long = "duration", value_name = "DURATION", default_value_t = 10.0)]
    pub duration_secs: f64,
    /// The echo pushes QoS1 (stored in the device inbox) instead of QoS0.
    #[arg(long)]
    pub qos1: bool,
    /// A running Tether stack to target.
    #[command(flatten)]
    pub running: RunningArgs,
    /// The flags of every scenario.
    #[command(flatten)]
    pub common: CommonArgs,
}

impl Default for P2pArgs {
    fn default() -> Self {
        scenario::defaults()
    }
}

/// Results of one p2p run.
#[derive(Debug, Clone, Serialize)]
pub struct P2pReport {
    /// `tether`, `nats` or `mosquitto`.
    pub target: String,
    /// Pairs.
    pub pairs: usize,
    /// Offered messages per second.
    pub offered_rate: u32,
    /// Messages sent.
    pub sent: u64,
    /// Messages that reached their receiver.
    pub delivered: u64,
    /// Receipts the senders got (Tether UP_ACK).
    pub receipts: u64,
    /// Delivered per second (first intended send → last arrival).
    pub achieved_rate: f64,
    /// Intended send → arrival at the receiver.
    pub latency: Percentiles,
}

impl std::fmt::Display for P2pReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "p2p [{}]: {} pairs at {}/s offered: {}/{} delivered ({} receipts), {:.0}/s achieved",
            self.target,
            self.pairs,
            self.offered_rate,
            self.delivered,
            self.sent,
            self.receipts,
            self.achieved_rate
        )?;
        write!(
            f,
            "  end-to-end latency (from intended send): {}",
            self.latency
        )
    }
}

impl Report for P2pReport {
    fn target(&self) -> &str {
        &self.target
    }

    fn figures(&self) -> Vec<Figure> {
        let rate = Figure::new("achieved_rate", self.achieved_rate, "/s");
        std::iter::once(rate)
            .chain(self.latency.figures(true))
            .collect()
    }
}

/// Starts the echo service of `proto`; it runs until the target stops.
async fn start_echo(
    target: &Target,
    proto: Proto,
    app: &str,
    qos1: bool,
) -> Result<(), BenchError> {
    match proto {
        Proto::Tether | Proto::TetherWs => {
            let url = target.nats_url.as_deref().unwrap_or_default();
            let business = Business::new(nats_client(url).await?, app).with_concurrency(1024);
            let pusher = business.clone();
            tokio::spawn(async move {
                let _ = business
                    .serve_uplinks("bench-echo", move |up| {
                        let pusher = pusher.clone();
                        async move {
                            if let Some((_, to)) = client_codec::read_payload(&up.body) {
                                let push = Push::to_dids([format!("p{to}")], up.body);
                                let push = if qos1 { push } else { push.qos0() };
                                let _ = pusher.push_nowait(push).await;
                            }
                            UplinkReply::stored(None)
                        }
                    })
                    .await;
            });
        }
        Proto::Nats => {
            let url = target.nats_url.as_deref().unwrap_or_default();
            let client = nats_client(url).await?;
            let mut requests = client
                .subscribe("p.echo")
                .await
                .map_err(|e| BenchError::Setup(format!("echo subscribe: {e}")))?;
            client
                .flush()
                .await
                .map_err(|e| BenchError::Setup(format!("echo flush: {e}")))?;
            tokio::spawn(async move {
                while let Some(message) = requests.next().await {
                    if let Some(reply) = message.reply {
                        let _ = client.publish(reply, message.payload).await;
                    }
                }
            });
        }
        Proto::Mqtt => {
            let mut stream = TcpStream::connect(target.endpoint)
                .await
                .map_err(BenchError::io("echo connect"))?;
            let _ = stream.set_nodelay(true);
            let hello = client_codec::mqtt_hello("echo", Some("p/up"));
            let mut buf =
                client_codec::handshake(&mut stream, proto, &hello, 2, Duration::from_secs(10))
                    .await
                    .map_err(BenchError::Setup)?;
            tokio::spawn(async move {
                let mut out = BytesMut::with_capacity(4096);
                loop {
                    while let Ok(Some(item)) = client_codec::decode(Proto::Mqtt, &mut buf) {
                        if let Incoming::Payload(p) = item
                            && let Some((_, to)) = client_codec::read_payload(&p)
                        {
                            client_codec::mqtt_publish(&mut out, &format!("p/{to}"), &p, None);
                        }
                    }
                    if !out.is_empty() && stream.write_all(&out).await.is_err() {
                        break;
                    }
                    out.clear();
                    match stream.read_buf(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(_) => {}
                    }
                }
            });
        }
    }
    Ok(())
}

/// One sender: writes a message per intended time received, batching what is queued.
async fn sender(
    proto: Proto,
    index: usize,
    mut writer: OwnedWriteHalf,
    mut stamps: mpsc::UnboundedReceiver<u64>,
) {
    let to = (index + 1) as u64;
    // Ids keep growing across runs against a running stack (its dedupe window would
    // swallow reused ids), like the SDK's.
    let mut msg_id = now_ns() / 1_000;
    let mut out = BytesMut::with_capacity(4096);
    while let Some(stamp) = stamps.recv().await {
        let mut next = Some(stamp);
        while let Some(stamp) = next {
            msg_id += 1;
            let body = client_codec::payload(stamp, to);
            match proto {
                Proto::Tether | Proto::TetherWs => {
                    client_codec::tether_up(&mut out, proto, msg_id, body);
                }
                Proto::Nats => {
                    out.extend_from_slice(
                        format!("PUB p.echo p.{to} {}\r\n", body.len()).as_bytes(),
                    );
                    out.extend_from_slice(&body);
                    out.extend_from_slice(b"\r\n");
                }
                Proto::Mqtt => client_codec::mqtt_publish(&mut out, "p/up", &body, None),
            }
            next = stamps.try_recv().ok();
        }
        if writer.write_all(&out).await.is_err() {
            break;
        }
        out.clear();
    }
}

impl Scenario for P2pArgs {
    type Report = P2pReport;
    const NAME: &'static str = "p2p";

    fn common(&self) -> &CommonArgs {
        &self.common
    }

    fn default_sources() -> Vec<IpAddr> {
        source_range(40, 2)
    }

    fn params(&self) -> Value {
        json!({
            "pairs": self.pairs,
            "rate": self.rate,
            "duration_secs": self.duration_secs,
            "qos1": self.qos1,
            "payload_bytes": client_codec::PAYLOAD_LEN,
        })
    }

    async fn measure(&self, proto: Proto, sources: &[IpAddr]) -> Result<P2pReport, BenchError> {
        if self.pairs == 0 || self.rate == 0 || self.duration_secs <= 0.0 {
            return Err(BenchError::Args(
                "pairs, rate and duration must be positive".into(),
            ));
        }
        let target = Target::start(proto, self.running.running().as_ref()).await?;
        start_echo(&target, proto, &self.common.app, self.qos1).await?;
        let plan = Plan {
            proto,
            endpoints: vec![target.endpoint],
            sources: sources.to_vec(),
            app: self.common.app.clone(),
            did_prefix: "p".into(),
            subscribe: match proto {
                Proto::Tether | Proto::TetherWs => None,
                Proto::Nats => Some("p.{i}".into()),
                Proto::Mqtt => Some("p/{i}".into()),
            },
            rate: 5_000,
        };
        let opened = fleet::open(&plan, target.signer.as_ref(), 0..2 * self.pairs, |_, _| {})
            .await?
            .all()?;
        let sink = Arc::new(Sink::default());
        let counters = Arc::new(Counters::default());
        let mut senders = vec![None; self.pairs];
        let mut tasks = Vec::new();
        for (i, stream, rest) in opened.conns {
            let (r, w) = stream.into_split();
            if i % 2 == 0 {
                let (tx, rx) = mpsc::unbounded_channel();
                senders[i / 2] = Some(tx);
                tasks.push(tokio::spawn(sender(proto, i, w, rx)));
                let w: Option<OwnedWriteHalf> = None;
                let (sink, counters) = (Arc::new(Sink::default()), counters.clone());
                tasks.push(tokio::spawn(reader::read_loop(
                    i, proto, r, w, rest, sink, counters,
                )));
            } else {
                let (sink, counters) = (sink.clone(), counters.clone());
                tasks.push(tokio::spawn(reader::read_loop(
                    i,
                    proto,
                    r,
                    Some(w),
                    rest,
                    sink,
                    counters,
                )));
            }
        }
        let senders: Vec<_> = senders.into_iter().flatten().collect();

        // Warm-up: a round of one message per pair until a round fully arrives (state
        // partitions leased, subscriptions settled), then a second of traffic at the rate.
        let mut warm = false;
        for _ in 0..15 {
            sink.reset();
            for tx in &senders {
                let _ = tx.send(now_ns());
            }
            let n = senders.len() as u64;
            warm = reader::arrived(&sink, n, Duration::from_secs(2), Duration::from_secs(4)).await;
            if warm {
                break;
            }
        }
        if !warm {
            return Err(BenchError::Setup(format!(
                "warm-up: {} of {} echoes arrived",
                sink.count(),
                senders.len()
            )));
        }
        pace(&senders, self.rate, 1.0, None).await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        sink.reset();
        counters.receipts.store(0, Ordering::Relaxed);

        let total = (f64::from(self.rate) * self.duration_secs).round() as u64;
        let progress = Progress::start(format!("p2p [{}]", proto.target_name()), total);
        let start_ns = now_ns();
        pace(&senders, self.rate, self.duration_secs, Some(&progress)).await;
        reader::arrived(
            &sink,
            total,
            Duration::from_secs(3),
            Duration::from_secs(60),
        )
        .await;
        progress.set(sink.count());
        progress.finish();
        let delivered = sink.count();
        let last = sink.span_ns().map_or(start_ns, |(_, last)| last);
        let report = P2pReport {
            target: proto.target_name().into(),
            pairs: senders.len(),
            offered_rate: self.rate,
            sent: total,
            delivered,
            receipts: counters.receipts.load(Ordering::Relaxed),
            achieved_rate: delivered as f64
                / ((last.saturating_sub(start_ns)) as f64 / 1e9).max(1e-9),
            latency: Percentiles::of(&sink.merged()),
        };
        drop(senders);
        for t in tasks {
            t.abort();
        }
        drop(target);
        Ok(report)
    }
}

/// Sends `rate × secs` messages round-robin over `senders` from a pacer thread: message
/// k is due at start + k/rate and carries that intended time as its stamp.
async fn pace(
    senders: &[mpsc::UnboundedSender<u64>],
    rate: u32,
    secs: f64,
    progress: Option<&Progress>,
) {
    let total = (f64::from(rate) * secs).round() as u64;
    let senders = senders.to_vec();
    let progress = progress.cloned();
    let pacer = std::thread::spawn(move || {
        let interval_ns = 1e9 / f64::from(rate);
        let start = Instant::now();
        let start_ns = now_ns();
        for k in 0..total {
            let offset = Duration::from_nanos((k as f64 * interval_ns) as u64);
            let due = start + offset;
            let now = Instant::now();
            if due > now {
                std::thread::sleep(due - now);
            }
            let stamp = start_ns + u64::try_from(offset.as_nanos()).unwrap_or(0);
            let _ = senders[(k as usize) % senders.len()].send(stamp);
            if let Some(p) = &progress
                && k % 256 == 0
            {
                p.set(k);
            }
        }
    });
    let _ = tokio::task::spawn_blocking(move || pacer.join()).await;
}
