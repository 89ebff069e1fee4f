//! `tether client`: connect as a device, send lines, print what arrives.

use anyhow::Context;
use clap::Args;
use tokio::io::BufReader;

/// Flags of `tether client`.
#[derive(Args)]
pub struct ClientArgs {
    /// Gateway endpoint: tcp://host:port or ws://host:port/ws.
    #[arg(long, default_value = "tcp://127.0.0.1:7400")]
    endpoint: String,
    /// App id.
    #[arg(long)]
    app: String,
    /// Device id.
    #[arg(long)]
    did: String,
    /// Gateway token (from `tether token issue`).
    #[arg(long, env = "TETHER_TOKEN")]
    token: String,
}

/// Runs the interactive client until stdin ends.
pub async fn run(args: ClientArgs) -> anyhow::Result<()> {
    let args = tether_client::interactive::InteractiveArgs {
        endpoint: args.endpoint,
        app: args.app,
        did: args.did,
        token: args.token,
    };
    tether_client::interactive::run(
        args,
        BufReader::new(tokio::io::stdin()),
        tokio::io::stdout(),
    )
    .await
    .context("client stopped")
}
