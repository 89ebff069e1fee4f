//! `tether bench …`: load scenarios with figures (see BENCHMARKS.md).

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;

use clap::{Args, Subcommand};

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
}

#[derive(Args)]
struct ConnsFlags {
    /// Connections to open (one process holds at most 19,000).
    #[arg(long, short = 'n', default_value_t = 10_000)]
    connections: usize,
    /// Target connects per second.
    #[arg(long, default_value_t = 5_000)]
    rate: u32,
    /// Gateway to target (default: start nats-server and a gateway for the run).
    #[arg(long)]
    endpoint: Option<SocketAddr>,
    /// Process id of the targeted gateway, for its RSS.
    #[arg(long)]
    gateway_pid: Option<u32>,
    /// Token signing key of the targeted gateway (PEM).
    #[arg(long)]
    key: Option<PathBuf>,
    /// Client source addresses (comma separated; default 127.0.0.2-127.0.0.9).
    #[arg(long, value_delimiter = ',')]
    source: Vec<IpAddr>,
    /// App id of the bench devices.
    #[arg(long, default_value = "bench")]
    app: String,
    /// Seconds to hold the connections idle before measuring.
    #[arg(long, default_value_t = 5)]
    hold: u64,
    /// Print one JSON object on the last line.
    #[arg(long)]
    json: bool,
}

/// Runs a scenario.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    match args.scenario {
        Scenario::Conns(flags) => {
            let mut conns = tether_bench::conns::ConnsArgs {
                gateway_pid: flags.gateway_pid,
                endpoint: flags.endpoint,
                connections: flags.connections,
                rate: flags.rate,
                key: flags.key,
                app: flags.app,
                hold_secs: flags.hold,
                json: flags.json,
                ..Default::default()
            };
            if !flags.source.is_empty() {
                conns.source_addrs = flags.source;
            }
            tether_bench::conns::run(conns).await?;
            Ok(())
        }
    }
}
