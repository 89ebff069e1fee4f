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
//!
//! With `regions: 2` Tether runs as two regions ([`crate::regions`]) and the pairs run
//! twice in one invocation, one leg after the other on the same processes: within region
//! A (senders, receivers and the echo in A), then across (senders and echo in A,
//! receivers logged in to B's gateway: A's state relays each push to B through
//! `TETHER_XR_region-a`, B's state delivers it). The report gives both legs and the ratio
//! cross/same of each figure.

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use futures::StreamExt;
use serde_json::{Value, json};
use tether_business::{Business, Push, UplinkReply};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::net::tcp::OwnedWriteHalf;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;

use crate::BenchError;
use crate::client_codec::{self, Incoming, Proto, now_ns};
use crate::fleet::{self, Plan};
use crate::progress::Progress;
use crate::reader::{self, Counters};
use crate::regions::TwoRegions;
use crate::scenario::{self, CommonArgs, RunningArgs, Scenario, source_range};
use crate::stack::{Target, nats_client};
use crate::stats::{Percentiles, Sink};

mod report;
pub use report::{CrossOverSame, CrossRegion, Leg, P2pReport};

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
    /// 2: run Tether as two regions (a hub and two leaf regions, each with its gateway and
    /// state) and measure the pairs within region A, then from A to B (docs/multi-region.md).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u8).range(1..=2))]
    pub regions: u8,
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

/// Starts the echo service of `proto` against the server at `nats_url` (Tether's bus, the
/// nats peer) or `endpoint` (Mosquitto); it runs until the server stops.
async fn start_echo(
    proto: Proto,
    nats_url: Option<&str>,
    endpoint: SocketAddr,
    app: &str,
    qos1: bool,
) -> Result<(), BenchError> {
    match proto {
        Proto::Tether | Proto::TetherWs => {
            let url = nats_url.unwrap_or_default();
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
            let url = nats_url.unwrap_or_default();
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
            let mut stream = TcpStream::connect(endpoint)
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

/// Pairs of logged-in devices: connection `2k` (of its range) sends to `2k + 1` (the
/// index in the payload is the receiver's connection index); what the receivers get is
/// recorded in one sink. Dropping it closes the connections.
struct Pairs {
    senders: Vec<mpsc::UnboundedSender<u64>>,
    sink: Arc<Sink>,
    counters: Arc<Counters>,
    tasks: Vec<JoinHandle<()>>,
}

impl Drop for Pairs {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

impl Pairs {
    /// Opens connections `range` (an even start) of `plan` and starts their tasks.
    async fn open(
        plan: &Plan,
        signer: Option<&tether_auth::TokenSigner>,
        range: Range<usize>,
    ) -> Result<Pairs, BenchError> {
        let first = range.start;
        let opened = fleet::open(plan, signer, range.clone(), |_, _| {})
            .await?
            .all()?;
        let sink = Arc::new(Sink::default());
        let counters = Arc::new(Counters::default());
        let mut senders = vec![None; range.len() / 2];
        let mut tasks = Vec::new();
        for (i, stream, rest) in opened.conns {
            let (r, w) = stream.into_split();
            if (i - first).is_multiple_of(2) {
                let (tx, rx) = mpsc::unbounded_channel();
                senders[(i - first) / 2] = Some(tx);
                tasks.push(tokio::spawn(sender(plan.proto, i, w, rx)));
                let w: Option<OwnedWriteHalf> = None;
                let (sink, counters) = (Arc::new(Sink::default()), counters.clone());
                tasks.push(tokio::spawn(reader::read_loop(
                    i, plan.proto, r, w, rest, sink, counters,
                )));
            } else {
                let (sink, counters) = (sink.clone(), counters.clone());
                tasks.push(tokio::spawn(reader::read_loop(
                    i,
                    plan.proto,
                    r,
                    Some(w),
                    rest,
                    sink,
                    counters,
                )));
            }
        }
        Ok(Pairs {
            senders: senders.into_iter().flatten().collect(),
            sink,
            counters,
            tasks,
        })
    }

    /// Warms up, then sends `rate × secs` messages and waits for them; `label` names the
    /// progress bar and the errors.
    async fn run(&self, rate: u32, secs: f64, label: &str) -> Result<Leg, BenchError> {
        let (sink, counters, senders) = (&self.sink, &self.counters, &self.senders);
        // Warm-up: a round of one message per pair until a round fully arrives (state
        // partitions leased, subscriptions settled, relay sources running), then a second
        // of traffic at the rate.
        let mut warm = false;
        for _ in 0..15 {
            sink.reset();
            for tx in senders {
                let _ = tx.send(now_ns());
            }
            let n = senders.len() as u64;
            warm = reader::arrived(sink, n, Duration::from_secs(2), Duration::from_secs(4)).await;
            if warm {
                break;
            }
        }
        if !warm {
            return Err(BenchError::Setup(format!(
                "{label} warm-up: {} of {} echoes arrived",
                sink.count(),
                senders.len()
            )));
        }
        // The second of traffic drains before the measurement starts: under a backlog its
        // late arrivals would otherwise be counted as the measurement's.
        sink.reset();
        pace(senders, rate, 1.0, None).await;
        let warm_total = u64::from(rate);
        reader::arrived(
            sink,
            warm_total,
            Duration::from_secs(3),
            Duration::from_secs(60),
        )
        .await;
        tokio::time::sleep(Duration::from_millis(500)).await;
        sink.reset();
        counters.receipts.store(0, Ordering::Relaxed);
        counters.repeated.store(0, Ordering::Relaxed);

        let total = (f64::from(rate) * secs).round() as u64;
        let progress = Progress::start(label, total);
        let start_ns = now_ns();
        pace(senders, rate, secs, Some(&progress)).await;
        reader::arrived(sink, total, Duration::from_secs(3), Duration::from_secs(60)).await;
        progress.set(sink.count());
        progress.finish();
        let delivered = sink.count();
        let last = sink.span_ns().map_or(start_ns, |(_, last)| last);
        Ok(Leg {
            sent: total,
            delivered,
            repeated: counters.repeated.load(Ordering::Relaxed),
            receipts: counters.receipts.load(Ordering::Relaxed),
            achieved_rate: delivered as f64
                / ((last.saturating_sub(start_ns)) as f64 / 1e9).max(1e-9),
            latency: Percentiles::of(&sink.merged()),
        })
    }
}

impl P2pArgs {
    /// The plan of `proto`'s devices, connection `i` to `endpoints[i % len]`.
    fn plan(&self, proto: Proto, endpoints: Vec<SocketAddr>, sources: &[IpAddr]) -> Plan {
        Plan {
            proto,
            endpoints,
            sources: sources.to_vec(),
            app: self.common.app.clone(),
            did_prefix: "p".into(),
            subscribe: match proto {
                Proto::Tether | Proto::TetherWs => None,
                Proto::Nats => Some("p.{i}".into()),
                Proto::Mqtt => Some("p/{i}".into()),
            },
            rate: 5_000,
        }
    }

    /// Tether as two regions: both sets of pairs open first (so no login or logout
    /// happens during a leg), then the same-region leg, then the cross-region one.
    async fn measure_regions(&self, sources: &[IpAddr]) -> Result<P2pReport, BenchError> {
        if self.running.running().is_some() {
            return Err(BenchError::Args(
                "--regions 2 starts its own regions: leave out --nats, --endpoint and --key".into(),
            ));
        }
        let regions = TwoRegions::start().await?;
        let (a, b) = (regions.a.tcp_endpoints()[0], regions.b.tcp_endpoints()[0]);
        let signer = Some(&regions.a.signer);
        let (app, qos1) = (&self.common.app, self.qos1);
        start_echo(Proto::Tether, Some(&regions.a.nats_url), a, app, qos1).await?;
        let n = 2 * self.pairs;
        let same = self.plan(Proto::Tether, vec![a], sources);
        let same = Pairs::open(&same, signer, 0..n).await?;
        // Senders (even indices) to A's gateway, receivers (odd) to B's.
        let cross = self.plan(Proto::Tether, vec![a, b], sources);
        let cross = Pairs::open(&cross, signer, n..2 * n).await?;
        let (rate, secs) = (self.rate, self.duration_secs);
        let before = regions.relayed().await?;
        let same = same.run(rate, secs, "p2p [tether, same-region]").await?;
        let between = regions.relayed().await?;
        let cross = cross.run(rate, secs, "p2p [tether, cross-region]").await?;
        let after = regions.relayed().await?;
        let vs_same_region = CrossOverSame::of(&cross, &same);
        Ok(P2pReport {
            target: "tether".into(),
            pairs: self.pairs,
            offered_rate: self.rate,
            regions: 2,
            qos1: self.qos1,
            leg: same,
            cross_region: Some(CrossRegion {
                leg: cross,
                vs_same_region,
                relayed: after.since(between),
                relayed_in_same_region_leg: between.since(before),
            }),
        })
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
            "regions": self.regions,
            "payload_bytes": client_codec::PAYLOAD_LEN,
        })
    }

    async fn measure(&self, proto: Proto, sources: &[IpAddr]) -> Result<P2pReport, BenchError> {
        if self.pairs == 0 || self.rate == 0 || self.duration_secs <= 0.0 {
            return Err(BenchError::Args(
                "pairs, rate and duration must be positive".into(),
            ));
        }
        if self.regions == 2 && matches!(proto, Proto::Tether | Proto::TetherWs) {
            return self.measure_regions(sources).await;
        }
        let target = Target::start(proto, self.running.running().as_ref()).await?;
        let nats_url = target.nats_url.as_deref();
        start_echo(
            proto,
            nats_url,
            target.endpoint,
            &self.common.app,
            self.qos1,
        )
        .await?;
        let plan = self.plan(proto, vec![target.endpoint], sources);
        let pairs = Pairs::open(&plan, target.signer.as_ref(), 0..2 * self.pairs).await?;
        let label = format!("p2p [{}]", proto.target_name());
        let leg = pairs.run(self.rate, self.duration_secs, &label).await?;
        drop(pairs);
        drop(target);
        Ok(P2pReport {
            target: proto.target_name().into(),
            pairs: self.pairs,
            offered_rate: self.rate,
            regions: 1,
            qos1: self.qos1,
            leg,
            cross_region: None,
        })
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

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[test]
    fn regions_is_one_or_two() {
        #[derive(Parser)]
        struct Cli {
            #[command(flatten)]
            p2p: P2pArgs,
        }
        let parse = |n: &str| Cli::try_parse_from(["p2p", "--regions", n]).map(|c| c.p2p.regions);
        assert_eq!(parse("2").ok(), Some(2));
        assert!(parse("3").is_err() && parse("0").is_err());
    }
}
