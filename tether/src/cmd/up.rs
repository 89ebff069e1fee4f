//! `tether up`: the whole stack in one process.
//!
//! Without `--nats`, starts the pinned nats-server from `.tools/` with JetStream under
//! `<data>/nats`; creates the streams and buckets; makes a token signing key under
//! `<data>/` if there is none; starts gateway, state, ipconfig and ops; prints the
//! endpoints; stops everything on Ctrl-C or SIGTERM.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use anyhow::Context;
use clap::Args;
use tether_nats::server::{NatsServer, ServerSpec, locate_binary};
use tether_service::{Shutdown, shutdown};

/// Flags of `tether up`.
#[derive(Args)]
pub struct UpArgs {
    /// Use this NATS cluster instead of starting a local nats-server.
    #[arg(long = "nats")]
    pub(crate) nats_url: Option<String>,
    /// Where the local nats-server keeps JetStream data and where keys are written.
    #[arg(long = "data", default_value = ".tether")]
    pub(crate) data_dir: PathBuf,
    /// Client port of the local nats-server.
    #[arg(long, default_value_t = 4222)]
    pub(crate) nats_port: u16,
    /// Monitoring port of the local nats-server.
    #[arg(long, default_value_t = 8222)]
    pub(crate) nats_http_port: u16,
    /// Address every Tether listener binds to.
    #[arg(long, default_value = "127.0.0.1")]
    pub(crate) host: std::net::IpAddr,
    /// First port of the Tether listeners: gateway TCP +0, WebSocket +1, gateway admin +2,
    /// state admin +10, ipconfig admin +20, ipconfig public HTTP +21, ops +30, demo chat
    /// page +40.
    #[arg(long, default_value_t = 7400)]
    pub(crate) base_port: u16,
    /// Run several regions on this machine instead (comma separated, e.g. `eu,us`): a hub
    /// and one nats-server per region joined as leaf nodes, and per region a gateway, state
    /// and ipconfig (docs/multi-region.md).
    #[arg(long, value_delimiter = ',')]
    regions: Vec<String>,
    #[command(flatten)]
    demo: super::demo::DemoArgs,
}

/// Runs the stack until a signal.
pub async fn run(args: UpArgs) -> anyhow::Result<()> {
    std::fs::create_dir_all(&args.data_dir)
        .with_context(|| format!("cannot create data dir {}", args.data_dir.display()))?;
    let key_path = args.data_dir.join("token.key");
    if !key_path.is_file() {
        tether_auth::write_keypair(&key_path, false)
            .with_context(|| format!("cannot write token key {}", key_path.display()))?;
    }
    let public_key = tether_auth::public_key_path(&key_path);
    if !args.regions.is_empty() {
        return super::up_regions::run(&args, &args.regions).await;
    }

    // The local server is started here, on the main thread, so it dies with this process.
    let (nats_url, mut local_nats) = match &args.nats_url {
        Some(url) => (url.clone(), None),
        None => {
            let binary = locate_binary()?;
            let spec = ServerSpec::single(
                "tether-local",
                "127.0.0.1",
                args.nats_port,
                args.nats_http_port,
                std::fs::canonicalize(&args.data_dir)?.join("nats"),
            );
            let server = NatsServer::start(spec, &binary, Duration::from_secs(30)).with_context(|| {
                format!(
                    "cannot start nats-server on ports {}/{} (in use? try --nats-port/--nats-http-port)",
                    args.nats_port, args.nats_http_port
                )
            })?;
            (server.client_url(), Some(server))
        }
    };

    let stop = Shutdown::new();
    shutdown::cancel_on_signal(stop.clone());
    let at = |offset: u16| SocketAddr::new(args.host, args.base_port + offset);

    let gateway_config = tether_gateway::GatewayConfig {
        nats_url: nats_url.clone(),
        tcp_listen: Some(at(0)),
        ws_listen: Some(at(1)),
        admin_listen: at(2),
        token_public_key: public_key.clone(),
        ..Default::default()
    };
    let gateway = tether_gateway::start(gateway_config, stop.clone())
        .await
        .context("gateway failed to start")?;
    let state = tether_state::start(
        tether_state::StateConfig {
            nats_url: nats_url.clone(),
            admin_listen: at(10),
            ..Default::default()
        },
        stop.clone(),
    )
    .await
    .context("state failed to start")?;
    let ipconfig = tether_ipconfig::start(
        tether_ipconfig::IpconfigConfig {
            nats_url: nats_url.clone(),
            admin_listen: at(20),
            http_listen: at(21),
            token_key: key_path.clone(),
            ..Default::default()
        },
        stop.clone(),
    )
    .await
    .context("ipconfig failed to start")?;
    let demo_app = super::app::ensure_demo_app(&nats_url)
        .await
        .context("cannot set up the demo app")?;
    let ops = tether_ops::start(
        tether_ops::OpsConfig {
            nats_url: nats_url.clone(),
            admin_listen: at(30),
            nats_monitor_urls: local_nats
                .as_ref()
                .map(|server| server.monitor_url())
                .unwrap_or_default(),
            ..Default::default()
        },
        stop.clone(),
    )
    .await
    .context("ops failed to start")?;
    let demo = args
        .demo
        .start(&nats_url, at(40), ipconfig.http_addr, stop.clone())
        .await?;

    let mut banner = String::from("\nTether is up.\n");
    match &local_nats {
        Some(server) => {
            banner += &format!(
                "  nats            {}   (monitoring {}, data {})\n",
                server.client_url(),
                server.monitor_url(),
                args.data_dir.join("nats").display()
            )
        }
        None => banner += &format!("  nats            {nats_url}\n"),
    }
    if let Some(addr) = gateway.tcp_addr {
        banner += &format!("  client tcp      tcp://{addr}\n");
    }
    if let Some(addr) = gateway.ws_addr {
        banner += &format!("  client ws       ws://{addr}/ws\n");
    }
    banner += &format!(
        "  gateway admin   http://{}/healthz  http://{0}/metrics\n",
        gateway.admin_addr
    );
    banner += &format!(
        "  state admin     http://{}/healthz  http://{0}/metrics\n",
        state.admin_addr
    );
    banner += &format!(
        "  ipconfig        http://{}/v1/endpoints\n",
        ipconfig.http_addr
    );
    banner += &format!(
        "  ipconfig admin  http://{}/healthz  http://{0}/metrics\n",
        ipconfig.admin_addr
    );
    banner += &format!(
        "  ops             http://{}/healthz  http://{0}/metrics  (API http://{0}/v1/cluster)\n",
        ops.admin_addr
    );
    banner += &format!("  dashboard       {}\n", ops.dashboard_url());
    banner += &demo.as_ref().map(|d| d.banner()).unwrap_or_default();
    banner += &format!(
        "  token key       {} (public {})\n",
        key_path.display(),
        public_key.display()
    );
    banner += "\nTry it from another shell:\n";
    banner += &format!(
        "  TOKEN=$(target/release/tether token issue --key {} --app demo --uid alice --did phone1 --ttl 1h)\n",
        key_path.display()
    );
    if let Some(addr) = gateway.tcp_addr {
        banner += &format!(
            "  target/release/tether client --endpoint tcp://{addr} --app demo --did phone1 --token \"$TOKEN\"\n"
        );
    }
    banner += &format!(
        "\nOr through ipconfig (app {demo_app} is in the tether_apps bucket; see `tether app list`):\n  CRED=$(target/release/tether app credential {demo_app} --nats {nats_url} --uid alice --did phone1)\n  target/release/tether client --ipconfig http://{} --credential \"$CRED\" --app {demo_app} --did phone1\n",
        ipconfig.http_addr
    );
    banner += "\nCtrl-C stops everything.\n";
    println!("{banner}");

    stop.cancelled().await;
    gateway.wait().await;
    state.wait().await;
    ipconfig.wait().await;
    ops.wait().await;
    if let Some(demo) = demo {
        demo.wait().await;
    }
    if let Some(server) = local_nats.as_mut() {
        server.stop();
    }
    println!("tether stopped");
    Ok(())
}
