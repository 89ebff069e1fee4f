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
use serde_json::json;
use tether_business::{Business, Push};
use tokio::io::AsyncWriteExt;
use tokio::net::TcpStream;

use crate::BenchError;
use crate::compare::{Comparison, Figure, Outcome};
use crate::fleet::{self, Plan};
use crate::progress::Progress;
use crate::reader::{self, Counters};
use crate::stack::{Running, Target};
use crate::stats::{Percentiles, Sink};
use crate::wire::{self, Proto, now_ns};

/// Arguments of the `fanout` scenario.
#[derive(Debug, Clone)]
pub struct FanoutArgs {
    /// Members of the room (connections).
    pub members: usize,
    /// Broadcasts to send.
    pub messages: usize,
    /// Broadcasts per second.
    pub rate: u32,
    /// Connects per second while the members join.
    pub connect_rate: u32,
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

impl Default for FanoutArgs {
    fn default() -> Self {
        FanoutArgs {
            members: 1_000,
            messages: 100,
            rate: 10,
            connect_rate: 5_000,
            source_addrs: crate::conns::source_range(20, 4),
            app: "bench".into(),
            running: None,
            peers: Vec::new(),
            json: false,
        }
    }
}

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

impl FanoutReport {
    /// Figures compared with peers.
    pub fn outcome(&self) -> Outcome {
        Outcome {
            target: self.target.clone(),
            figures: vec![Figure::new(
                "deliveries_per_sec",
                self.deliveries_per_sec,
                "/s",
            )]
            .into_iter()
            .chain(self.latency.figures(true))
            .collect(),
            detail: serde_json::to_value(self).unwrap_or_default(),
        }
    }
}

/// Runs Tether and the peers, prints and returns the comparison.
pub async fn run(args: FanoutArgs) -> Result<Comparison, BenchError> {
    let mut outcomes = Vec::new();
    for (proto, sources) in crate::compare::targets(&args.peers, &args.source_addrs) {
        let mut a = args.clone();
        a.source_addrs = sources;
        match measure(&a, proto).await {
            Ok(report) => {
                println!("{report}");
                outcomes.push(report.outcome());
            }
            Err(e) if proto == Proto::Tether && !args.peers.is_empty() => {
                eprintln!("fanout [tether] failed: {e}; measuring the peers anyway");
                outcomes.push(crate::compare::failed("tether", &e));
            }
            Err(e) => return Err(e),
        }
    }
    let comparison = Comparison {
        scenario: "fanout".into(),
        params: json!({
            "members": args.members,
            "messages": args.messages,
            "rate": args.rate,
            "payload_bytes": wire::PAYLOAD_LEN,
        }),
        outcomes,
    };
    comparison.print(args.json);
    Ok(comparison)
}

enum Publisher {
    Tether(Business, String),
    Raw(Proto, TcpStream),
}

impl Publisher {
    async fn send(&mut self, seq: u64) -> Result<(), BenchError> {
        let body = wire::payload(now_ns(), seq);
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
                    Proto::Mqtt => wire::mqtt_publish(&mut out, ROOM, &body, None),
                    _ => wire::nats_pub(&mut out, ROOM, &body),
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

/// Measures one target.
pub async fn measure(args: &FanoutArgs, proto: Proto) -> Result<FanoutReport, BenchError> {
    if args.members == 0 || args.messages == 0 || args.rate == 0 {
        return Err(BenchError::Args(
            "members, messages and rate must be positive".into(),
        ));
    }
    let target = Target::start(proto, args.running.as_ref()).await?;
    let (endpoint, signer) = (target.endpoint, target.signer.clone());
    let plan = Plan {
        proto,
        endpoints: vec![endpoint],
        sources: args.source_addrs.clone(),
        app: args.app.clone(),
        did_prefix: "m".into(),
        subscribe: Some(ROOM.into()),
        rate: args.connect_rate,
    };
    let progress = Progress::start(
        format!("fanout [{}] joining", proto.target_name()),
        args.members as u64,
    );
    let p = progress.clone();
    let opened = fleet::open(&plan, signer.as_ref(), 0..args.members, |ok, failed| {
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
            let client = async_nats::connect(url.as_str())
                .await
                .map_err(|e| BenchError::Setup(format!("business nats connection: {e}")))?;
            Publisher::Tether(Business::new(client, &args.app), ROOM.to_string())
        }
        _ => {
            let mut stream = TcpStream::connect(endpoint)
                .await
                .map_err(BenchError::io("publisher connect"))?;
            let _ = stream.set_nodelay(true);
            let hello = match proto {
                Proto::Mqtt => wire::mqtt_hello("publisher", None),
                _ => wire::nats_hello(None),
            };
            wire::handshake(&mut stream, proto, &hello, 1, Duration::from_secs(10))
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
        let members_u64 = members as u64;
        let s = sink.clone();
        if reader::wait_until(
            || s.count() >= members_u64,
            || s.count(),
            Duration::from_secs(2),
            Duration::from_secs(5),
        )
        .await
        {
            warm = true;
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

    let expected = (members * args.messages) as u64;
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
    let interval = Duration::from_secs_f64(1.0 / f64::from(args.rate));
    let start_ns = now_ns();
    let start = Instant::now();
    for k in 0..args.messages {
        let due = start + interval.mul_f64(k as f64);
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
        publisher.send(k as u64).await?;
    }
    let s = sink.clone();
    reader::wait_until(
        || s.count() >= expected,
        || s.count(),
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
        messages: args.messages,
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
