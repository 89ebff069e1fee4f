//! `tether bench …`: load scenarios with figures, Tether beside its peers (see
//! BENCHMARKS.md).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Subcommand};
use tether_bench::wire::Proto;

/// `tether bench …`
#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    scenario: Scenario,
}

#[derive(Subcommand)]
enum Scenario {
    /// Open N logged-in idle connections; report connect rate, login latency and memory.
    Conns(ConnsFlags),
    /// N members of one session, M broadcasts; report deliveries/s and latency.
    Fanout(FanoutFlags),
    /// Device pairs through an echo service at a fixed open-loop rate; report latency.
    P2p(P2pFlags),
    /// Highest uplink rate with store receipts (closed loop, W in flight per device).
    Uplink(UplinkFlags),
    /// Every scenario at the sizes of BENCHMARKS.md: results.json, table.md, charts.
    Suite(SuiteFlags),
    /// Internal: one load-generator process of a multi-process `conns` run.
    #[command(hide = true)]
    ConnsWorker {
        /// The worker's spec (JSON).
        spec: String,
    },
}

#[derive(Args)]
struct Common {
    /// Peers measured in the same run: nats, mosquitto (repeat or comma separate).
    #[arg(long = "peer", value_delimiter = ',', value_parser = parse_peer)]
    peers: Vec<Proto>,
    /// Client source addresses (comma separated 127.0.0.x; peers take the next ones).
    #[arg(long, value_delimiter = ',')]
    source: Vec<IpAddr>,
    /// App id of the bench devices.
    #[arg(long, default_value = "bench")]
    app: String,
    /// Print one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

/// `--source`, when given, replaces the scenario's default source addresses.
fn override_sources(given: Vec<IpAddr>, sources: &mut Vec<IpAddr>) {
    if !given.is_empty() {
        *sources = given;
    }
}

/// A running Tether stack to target instead of starting one.
#[derive(Args)]
struct RunningFlags {
    /// NATS URL of a running stack (with --endpoint and --key; default: start one).
    #[arg(long = "nats", requires_all = ["endpoint", "key"])]
    nats_url: Option<String>,
    /// A running gateway's TCP client address.
    #[arg(long, requires = "nats_url")]
    endpoint: Option<SocketAddr>,
    /// The running gateways' token signing key (private PEM).
    #[arg(long, requires = "nats_url")]
    key: Option<PathBuf>,
}

impl RunningFlags {
    fn running(self) -> Option<tether_bench::stack::Running> {
        Some(tether_bench::stack::Running {
            nats_url: self.nats_url?,
            endpoint: self.endpoint?,
            key: self.key?,
        })
    }
}

fn parse_peer(s: &str) -> Result<Proto, String> {
    match Proto::parse(s) {
        Some(Proto::Tether) | None => Err(format!("unknown peer {s:?} (nats, mosquitto)")),
        Some(p) => Ok(p),
    }
}

#[derive(Args)]
struct ConnsFlags {
    /// Connections to open (more than 19,000 spread over worker processes).
    #[arg(long, short = 'n', default_value_t = 10_000)]
    connections: usize,
    /// Target connects per second.
    #[arg(long, default_value_t = 5_000)]
    rate: u32,
    /// Gateway processes to start.
    #[arg(long, default_value_t = 1)]
    gateways: usize,
    /// Tether clients use WebSocket (`/ws`) instead of TCP.
    #[arg(long)]
    ws: bool,
    /// Load-generator processes (default: one per 19,000 connections).
    #[arg(long)]
    workers: Option<usize>,
    /// Gateway to target (default: start nats-server and gateways for the run).
    #[arg(long)]
    endpoint: Option<SocketAddr>,
    /// Process id of the targeted gateway, for its RSS.
    #[arg(long)]
    gateway_pid: Option<u32>,
    /// Token signing key of the targeted gateway (PEM).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Seconds to hold the connections idle before measuring.
    #[arg(long, default_value_t = 5)]
    hold: u64,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct FanoutFlags {
    /// Members of the room.
    #[arg(long, short = 'n', default_value_t = 1_000)]
    members: usize,
    /// Broadcasts.
    #[arg(long, short = 'm', default_value_t = 100)]
    messages: usize,
    /// Broadcasts per second.
    #[arg(long, default_value_t = 10)]
    rate: u32,
    #[command(flatten)]
    running: RunningFlags,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct P2pFlags {
    /// Sender/receiver pairs.
    #[arg(long, default_value_t = 100)]
    pairs: usize,
    /// Messages per second offered (all pairs).
    #[arg(long, default_value_t = 10_000)]
    rate: u32,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    /// The echo pushes QoS1 (stored in the device inbox) instead of QoS0.
    #[arg(long)]
    qos1: bool,
    #[command(flatten)]
    running: RunningFlags,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct UplinkFlags {
    /// Sending devices.
    #[arg(long, default_value_t = 50)]
    devices: usize,
    /// Messages in flight per device.
    #[arg(long, default_value_t = 32)]
    window: usize,
    /// Seconds of sending.
    #[arg(long, default_value_t = 10.0)]
    duration: f64,
    #[command(flatten)]
    running: RunningFlags,
    #[command(flatten)]
    common: Common,
}

#[derive(Args)]
struct SuiteFlags {
    /// Output folder (results.json, table.md, PNG charts).
    #[arg(long, default_value = "docs/bench")]
    out: PathBuf,
    /// Tiny sizes: checks that everything runs.
    #[arg(long)]
    quick: bool,
    /// Peers (default nats and mosquitto).
    #[arg(long = "peer", value_delimiter = ',', value_parser = parse_peer, default_values = ["nats", "mosquitto"])]
    peers: Vec<Proto>,
    /// First 127.0.0.x source address (each run takes fresh ones after it).
    #[arg(long, default_value_t = 100)]
    first_source: u16,
    /// Only these scenarios (conns, conns_ws, conns_multi, fanout, p2p, p2p_1k, uplink).
    #[arg(long, value_delimiter = ',')]
    only: Vec<String>,
}

/// Runs a scenario. SIGINT or SIGTERM drops it, which stops every process it started
/// (gateways, state, peers, nats-server, load workers) before the error is returned.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = scenario(args) => result,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted; stopped what the bench started"),
        _ = term.recv() => anyhow::bail!("terminated; stopped what the bench started"),
    }
}

async fn scenario(args: BenchArgs) -> anyhow::Result<()> {
    use tether_bench::{conns, fanout, p2p, suite, uplink, worker};
    match args.scenario {
        Scenario::Conns(f) => {
            let mut a = conns::ConnsArgs {
                gateway_pid: f.gateway_pid,
                endpoint: f.endpoint,
                connections: f.connections,
                rate: f.rate,
                key: f.key,
                app: f.common.app,
                hold_secs: f.hold,
                gateways: f.gateways,
                workers: f.workers,
                ws: f.ws,
                peers: f.common.peers,
                json: f.common.json,
                ..Default::default()
            };
            override_sources(f.common.source, &mut a.source_addrs);
            conns::run(a).await?;
        }
        Scenario::Fanout(f) => {
            let mut a = fanout::FanoutArgs {
                members: f.members,
                messages: f.messages,
                rate: f.rate,
                running: f.running.running(),
                app: f.common.app,
                peers: f.common.peers,
                json: f.common.json,
                ..Default::default()
            };
            override_sources(f.common.source, &mut a.source_addrs);
            fanout::run(a).await?;
        }
        Scenario::P2p(f) => {
            let mut a = p2p::P2pArgs {
                pairs: f.pairs,
                rate: f.rate,
                duration_secs: f.duration,
                qos1: f.qos1,
                running: f.running.running(),
                app: f.common.app,
                peers: f.common.peers,
                json: f.common.json,
                ..Default::default()
            };
            override_sources(f.common.source, &mut a.source_addrs);
            p2p::run(a).await?;
        }
        Scenario::Uplink(f) => {
            let mut a = uplink::UplinkArgs {
                devices: f.devices,
                window: f.window,
                duration_secs: f.duration,
                running: f.running.running(),
                app: f.common.app,
                peers: f.common.peers,
                json: f.common.json,
                ..Default::default()
            };
            override_sources(f.common.source, &mut a.source_addrs);
            uplink::run(a).await?;
        }
        Scenario::Suite(f) => {
            suite::run(suite::SuiteArgs {
                out: f.out,
                quick: f.quick,
                peers: f.peers,
                first_source: f.first_source,
                only: f.only,
            })
            .await?;
        }
        Scenario::ConnsWorker { spec } => worker::worker_main(&spec).await?,
    }
    Ok(())
}
