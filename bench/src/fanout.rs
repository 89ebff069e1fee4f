//! The `fanout` scenario: N connections bound to one session (room), M broadcasts at a
//! rate; reports deliveries per second and delivery latency (send stamp in the payload →
//! arrival, HDR histogram).
//!
//! - Tether: devices log in with the token claim `sess: [room]`; a business service
//!   pushes one QoS0 message to the session per broadcast.
//! - nats: N subscribers of one subject; one PUB per broadcast.
//! - mosquitto: N subscribers of one topic; one QoS0 PUBLISH per broadcast.

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::BytesMut;
use serde::Serialize;
use serde_json::{Value, json};
use tether_business::{Business, Push};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::BenchError;
use crate::client_codec::{self, Proto, now_ns};
use crate::compare::Figure;
use crate::fleet::{self, Plan};
use crate::progress::Progress;
use crate::reader::{self, Counters};
use crate::scenario::{self, CommonArgs, Report, RunningArgs, Scenario, source_range};
use crate::stack::{Target, nats_client};
use crate::stats::{Percentiles, Sink};

/// Arguments of the `fanout` scenario.
#[derive(Debug, Clone, clap::Args)]
pub struct FanoutArgs {
    /// Members of the room.
    #[arg(long, short = 'n', default_value_t = 1_000)]
    pub members: usize,
    /// Broadcasts.
    #[arg(long, short = 'm', default_value_t = 100)]
    pub messages: usize,
    /// Broadcasts per second.
    #[arg(long, default_value_t = 10)]
    pub rate: u32,
    /// A running Tether stack to target.
    #[command(flatten)]
    pub running: RunningArgs,
    /// The flags of every scenario.
    #[command(flatten)]
    pub common: CommonArgs,
}

impl Default for FanoutArgs {
    fn default() -> Self {
        scenario::defaults()
    }
}

/// Connects per second while the members join.
const CONNECT_RATE: u32 = 5_000;

/// Results of one fan-out run.
#[derive(Debug, Clone, Serialize)]
pub struct FanoutReport {
    /// `tether`, `nats` or `mosquitto`.
    pub target: String,
    /// Members connected.
    pub members: usize,
    /// Broadcasts sent.
    pub messages: usize,
    /// Deliveries expected (members × messages).
    pub expected: u64,
    /// Deliveries seen.
    pub delivered: u64,
    /// Deliveries per second (first send → last arrival).
    pub deliveries_per_sec: f64,
    /// Delivery latency.
    pub latency: Percentiles,
    /// Seconds from the first send to the last arrival.
    pub seconds: f64,
}

impl std::fmt::Display for FanoutReport {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "fanout [{}]: {} members × {} broadcasts: {}/{} delivered in {:.2} s = {:.0} deliveries/s",
            self.target,
            self.members,
            self.messages,
            self.delivered,
            self.expected,
            self.seconds,
            self.deliveries_per_sec
        )?;
        write!(f, "  delivery latency: {}", self.latency)
    }
}

impl Report for FanoutReport {
    fn target(&self) -> &str {
        &self.target
    }

    fn figures(&self) -> Vec<Figure> {
        let rate = Figure::new("deliveries_per_sec", self.deliveries_per_sec, "/s");
        std::iter::once(rate)
            .chain(self.latency.figures(true))
            .collect()
    }
}

enum Publisher {
    Tether(Business, String),
    Raw(Proto, TcpStream),
}

impl Publisher {
    async fn send(&mut self, seq: u64) -> Result<(), BenchError> {
        let body = client_codec::payload(now_ns(), seq);
        match self {
            Publisher::Tether(business, room) => {
                let push = Push::to_session(room.as_str(), body).qos0();
                business
                    .push_nowait(push)
                    .await
                    .map_err(|e| BenchError::Setup(format!("push to session: {e}")))
            }
            Publisher::Raw(proto, stream) => {
                let mut out = BytesMut::with_capacity(128);
                match proto {
                    Proto::Mqtt => client_codec::mqtt_publish(&mut out, ROOM, &body, None),
                    _ => client_codec::nats_pub(&mut out, ROOM, &body),
                }
                stream
                    .write_all(&out)
                    .await
                    .map_err(BenchError::io("publish"))
            }
        }
    }
}

const ROOM: &str = "room1";

impl Scenario for FanoutArgs {
    type Report = FanoutReport;
    const NAME: &'static str = "fanout";
    const PEERS_AFTER_TETHER_FAILURE: bool = true;

    fn common(&self) -> &CommonArgs {
        &self.common
    }

    fn default_sources() -> Vec<IpAddr> {
        source_range(20, 4)
    }

    fn params(&self) -> Value {
        json!({
            "members": self.members,
            "messages": self.messages,
            "rate": self.rate,
            "payload_bytes": client_codec::PAYLOAD_LEN,
        })
    }

    async fn measure(&self, proto: Proto, sources: &[IpAddr]) -> Result<FanoutReport, BenchError> {
        if self.members == 0 || self.messages == 0 || self.rate == 0 {
            return Err(BenchError::Args(
                "members, messages and rate must be positive".into(),
            ));
        }
        let target = Target::start(proto, self.running.running().as_ref()).await?;
        let (endpoint, signer) = (target.endpoint, target.signer.clone());
        let plan = Plan {
            proto,
            endpoints: vec![endpoint],
            sources: sources.to_vec(),
            app: self.common.app.clone(),
            did_prefix: "m".into(),
            subscribe: Some(ROOM.into()),
            rate: CONNECT_RATE,
        };
        let progress = Progress::start(
            format!("fanout [{}] joining", proto.target_name()),
            self.members as u64,
        );
        let p = progress.clone();
        let opened = fleet::open(&plan, signer.as_ref(), 0..self.members, |ok, failed| {
            p.set((ok + failed) as u64)
        })
        .await?;
        progress.finish();
        if opened.conns.is_empty() {
            return Err(BenchError::NoConnections(
                opened.first_error.unwrap_or_default(),
            ));
        }
        let members = opened.conns.len();
        let sink = Arc::new(Sink::default());
        let counters = Arc::new(Counters::default());
        let mut readers = Vec::with_capacity(members);
        for (i, stream, rest) in opened.conns {
            readers.push(tokio::spawn(reader::read_stream(
                i,
                proto,
                stream,
                rest,
                sink.clone(),
                counters.clone(),
            )));
        }

        let mut publisher = match (&target.nats_url, proto) {
            (Some(url), Proto::Tether | Proto::TetherWs) => {
                let client = nats_client(url).await?;
                Publisher::Tether(Business::new(client, &self.common.app), ROOM.to_string())
            }
            _ => {
                let mut stream = TcpStream::connect(endpoint)
                    .await
                    .map_err(BenchError::io("publisher connect"))?;
                let _ = stream.set_nodelay(true);
                let hello = match proto {
                    Proto::Mqtt => client_codec::mqtt_hello("publisher", None),
                    _ => client_codec::nats_hello(None),
                };
                client_codec::handshake(&mut stream, proto, &hello, 1, Duration::from_secs(10))
                    .await
                    .map_err(BenchError::Setup)?;
                Publisher::Raw(proto, stream)
            }
        };

        // Warm-up: one broadcast until every member got one (subscriptions and session
        // bindings settle), then start from zero.
        let mut warm = false;
        for _ in 0..10 {
            sink.reset();
            publisher.send(u64::MAX).await?;
            warm = reader::arrived(
                &sink,
                members as u64,
                Duration::from_secs(2),
                Duration::from_secs(5),
            )
            .await;
            if warm {
                break;
            }
        }
        if !warm {
            return Err(BenchError::Setup(format!(
                "warm-up broadcast reached {} of {members} members",
                sink.count()
            )));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
        sink.reset();

        let expected = (members * self.messages) as u64;
        let progress = Progress::start(
            format!("fanout [{}] deliveries", proto.target_name()),
            expected,
        );
        let ticker = {
            let (sink, progress) = (sink.clone(), progress.clone());
            tokio::spawn(async move {
                loop {
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    progress.set(sink.count());
                }
            })
        };
        let interval = Duration::from_secs_f64(1.0 / f64::from(self.rate));
        let start_ns = now_ns();
        let start = Instant::now();
        for k in 0..self.messages {
            let due = start + interval.mul_f64(k as f64);
            if due > Instant::now() {
                tokio::time::sleep_until(due.into()).await;
            }
            publisher.send(k as u64).await?;
        }
        reader::arrived(
            &sink,
            expected,
            Duration::from_secs(5),
            Duration::from_secs(120),
        )
        .await;
        ticker.abort();
        progress.set(sink.count());
        progress.finish();

        let delivered = sink.count();
        let last = sink.span_ns().map_or(start_ns, |(_, last)| last);
        let seconds = (last.saturating_sub(start_ns)) as f64 / 1e9;
        let report = FanoutReport {
            target: proto.target_name().into(),
            members,
            messages: self.messages,
            expected,
            delivered,
            deliveries_per_sec: delivered as f64 / seconds.max(1e-9),
            latency: Percentiles::of(&sink.merged()),
            seconds,
        };
        for r in readers {
            r.abort();
        }
        drop(publisher);
        drop(target);
        Ok(report)
    }
}
