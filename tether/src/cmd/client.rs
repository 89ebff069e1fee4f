//! `tether client`: connect as a device, send lines, print what arrives.
//!
//! Either straight to a gateway with a gateway token (`--endpoint`, `--token`), or through
//! ipconfig with a client credential (`--ipconfig`, `--credential`): then `--endpoint` is a
//! seed tried after the discovered gateways.

use anyhow::{Context, bail};
use clap::Args;
use tether_client::{ClientConfig, Discovery, DiscoveryConfig};
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
    /// Gateway token (from `tether token issue`); not needed with --ipconfig.
    #[arg(long, env = "TETHER_TOKEN")]
    token: Option<String>,
    /// ipconfig URL (http://host:port); repeat for several instances.
    #[arg(long)]
    ipconfig: Vec<String>,
    /// Client credential signed by the app's backend (or `tether app credential`).
    #[arg(long, env = "TETHER_CREDENTIAL")]
    credential: Option<String>,
    /// The device's region, passed to ipconfig.
    #[arg(long)]
    region: Option<String>,
}

/// Runs the interactive client until stdin ends.
pub async fn run(args: ClientArgs) -> anyhow::Result<()> {
    let stdin = BufReader::new(tokio::io::stdin());
    if args.ipconfig.is_empty() {
        let Some(token) = args.token else {
            bail!("give --token, or --ipconfig with --credential");
        };
        let args = tether_client::interactive::InteractiveArgs {
            endpoint: args.endpoint,
            app: args.app,
            did: args.did,
            token,
        };
        return tether_client::interactive::run(args, stdin, tokio::io::stdout())
            .await
            .context("client stopped");
    }
    let credential = args
        .credential
        .context("--ipconfig needs --credential (see `tether app credential`)")?;
    let mut discovery = DiscoveryConfig::new(args.ipconfig, credential);
    discovery.region = args.region;
    let discovery = Discovery::new(discovery)?;
    let seed = args.endpoint.parse()?;
    let config = ClientConfig::with_discovery(discovery, vec![seed], args.app, args.did);
    tether_client::interactive::run_with(config, stdin, tokio::io::stdout())
        .await
        .context("client stopped")
}
