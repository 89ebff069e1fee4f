//! `tether bench …`: load scenarios with figures, Tether beside its peers (see
//! BENCHMARKS.md). The flags are the scenarios' own arguments (`tether_bench`); every
//! scenario runs through [`scenario::run`].

use clap::{Args, Subcommand};
use tether_bench::conns::ConnsArgs;
use tether_bench::drain::DrainArgs;
use tether_bench::fanout::FanoutArgs;
use tether_bench::p2p::P2pArgs;
use tether_bench::scenario::{self, Scenario};
use tether_bench::suite::{self, SuiteArgs};
use tether_bench::uplink::UplinkArgs;
use tether_bench::worker;

/// `tether bench …`
#[derive(Args)]
pub struct BenchArgs {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Open N logged-in idle connections; report connect rate, login latency and memory.
    Conns(ConnsArgs),
    /// N members of one session, M broadcasts; report deliveries/s and latency.
    Fanout(FanoutArgs),
    /// Device pairs through an echo service at a fixed open-loop rate; report latency.
    P2p(P2pArgs),
    /// Highest uplink rate with store receipts (closed loop, W in flight per device).
    Uplink(UplinkArgs),
    /// Drain a gateway of N devices to another by REDIRECT; report the time and QoS1 lost.
    Drain(DrainArgs),
    /// Restart a gateway holding N connections by hand-off under a steady ping stream;
    /// report the pause devices see (p50/p99/max), connections kept, messages lost.
    Restart(tether_bench::restart::RestartArgs),
    /// Every scenario at the sizes of BENCHMARKS.md: results.json, table.md, charts.
    Suite(SuiteArgs),
    /// Internal: one load-generator process of a multi-process `conns` run.
    #[command(hide = true)]
    ConnsWorker {
        /// The worker's spec (JSON).
        spec: String,
    },
}

/// Runs a scenario. SIGINT or SIGTERM drops it, which stops every process it started
/// (gateways, state, peers, nats-server, load workers) before the error is returned.
pub async fn run(args: BenchArgs) -> anyhow::Result<()> {
    let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())?;
    tokio::select! {
        result = command(args.command) => result,
        _ = tokio::signal::ctrl_c() => anyhow::bail!("interrupted; stopped what the bench started"),
        _ = term.recv() => anyhow::bail!("terminated; stopped what the bench started"),
    }
}

async fn command(command: Command) -> anyhow::Result<()> {
    match command {
        Command::Conns(args) => measure(&args).await,
        Command::Fanout(args) => measure(&args).await,
        Command::P2p(args) => measure(&args).await,
        Command::Uplink(args) => measure(&args).await,
        Command::Drain(args) => Ok(tether_bench::drain::run(&args).await.map(drop)?),
        Command::Restart(args) => Ok(tether_bench::restart::run(&args).await.map(drop)?),
        Command::Suite(args) => Ok(suite::run(args).await.map(drop)?),
        Command::ConnsWorker { spec } => Ok(worker::worker_main(&spec).await?),
    }
}

/// Tether and the peers of one scenario; the comparison is printed by the run.
async fn measure<S: Scenario>(args: &S) -> anyhow::Result<()> {
    scenario::run(args).await?;
    Ok(())
}
