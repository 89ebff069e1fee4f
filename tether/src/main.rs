//! `tether`: one binary, a subcommand per role.
//!
//! - `tether up`: the whole stack in one process (with an embedded nats-server by default).
//! - `tether gateway|state|ipconfig|ops`: one role, for production (one process per role).
//! - `tether token`: make signing keys and gateway tokens.
//! - `tether app`: apps and their secrets (what ipconfig verifies client credentials with).
//! - `tether ctl`: the ops API from the command line (cluster view and operations).
//! - `tether client`: a device on the command line; `tether bench`: load scenarios.

mod cmd;

use clap::{Parser, Subcommand};

/// jemalloc instead of the system allocator: the message path allocates and frees per
/// message in many tasks at once, where glibc's malloc spent ~30% of state's time
/// (BENCHMARKS.md, the speed work), and it keeps idle connections smaller. Its options are
/// set at build time in `.cargo/config.toml` (a background thread gives pages unused for
/// 1 s back to the system).
#[global_allocator]
static ALLOCATOR: tikv_jemallocator::Jemalloc = tikv_jemallocator::Jemalloc;

/// Tether: the long-connection gateway platform on NATS.
#[derive(Parser)]
#[command(name = "tether", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the whole stack locally: nats-server (unless --nats), gateway, state, ipconfig, ops.
    Up(cmd::up::UpArgs),
    /// Run a gateway (client sockets ⇄ NATS).
    Gateway(Box<cmd::role::GatewayArgs>),
    /// Run the state service.
    State(cmd::role::RoleArgs),
    /// Run the ipconfig service.
    Ipconfig(cmd::role::IpconfigArgs),
    /// Run the ops service.
    Ops(cmd::role::RoleArgs),
    /// Apps (tenants) and their secrets in the tether_apps bucket.
    App(cmd::app::AppArgs),
    /// Operate a running platform through the ops API (status, drain, kick, app settings).
    Ctl(cmd::ctl::CtlArgs),
    /// Signing keys and gateway tokens.
    Token(cmd::token::TokenArgs),
    /// Connect as a device: each stdin line is sent as UP, arriving messages are printed.
    Client(cmd::client::ClientArgs),
    /// Load scenarios with figures (see BENCHMARKS.md).
    Bench(cmd::bench::BenchArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    // `tether app` prints secrets and credentials for scripts: keep its output clean.
    if !matches!(cli.command, Command::App(_) | Command::Ctl(_)) {
        tether_service::telemetry::init();
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(error) => {
            eprintln!("error: cannot start the runtime: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = runtime.block_on(async {
        match cli.command {
            Command::Up(args) => cmd::up::run(args).await,
            Command::Gateway(args) => cmd::role::gateway(*args).await,
            Command::State(args) => cmd::role::state(args).await,
            Command::Ipconfig(args) => cmd::role::ipconfig(args).await,
            Command::Ops(args) => cmd::role::ops(args).await,
            Command::App(args) => cmd::app::run(args).await,
            Command::Ctl(args) => cmd::ctl::run(args).await,
            Command::Token(args) => cmd::token::run(args),
            Command::Client(args) => cmd::client::run(args).await,
            Command::Bench(args) => cmd::bench::run(args).await,
        }
    });
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
