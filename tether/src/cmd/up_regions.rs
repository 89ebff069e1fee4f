//! `tether up --regions eu,us`: several regions on one machine, for trying multi-region.
//!
//! Starts a hub nats-server (JetStream domain `hub`) and one nats-server per region (its
//! domain = the region name), joined to the hub as leaf nodes that deny the regional-only
//! subjects (docs/multi-region.md); then per region a gateway, a state instance (peering
//! with every other region) and an ipconfig. Region `i` (from 0) uses the Tether ports of
//! `base_port + 100 * i` and NATS client port `nats_port + 1 + i`; the hub uses `nats_port`
//! and leaf port `nats_port + 100`.

use std::net::SocketAddr;
use std::time::Duration;

use anyhow::Context;
use tether_nats::region::Region;
use tether_nats::server::{NatsServer, ServerSpec, locate_binary};
use tether_service::{Shutdown, shutdown};

use super::up::UpArgs;

/// One running region.
struct RunningRegion {
    name: String,
    nats: NatsServer,
    gateway: tether_gateway::RunningGateway,
    state: tether_state::RunningState,
    ipconfig: tether_ipconfig::RunningIpconfig,
}

/// Runs the regions until a signal.
pub async fn run(args: &UpArgs, names: &[String]) -> anyhow::Result<()> {
    if args.nats_url.is_some() {
        anyhow::bail!("--regions starts its own nats-servers: leave out --nats");
    }
    let mut seen = std::collections::BTreeSet::new();
    for name in names {
        if !tether_auth::valid_id(name) || name == "hub" || !seen.insert(name) {
            anyhow::bail!(
                "--regions: {name:?} must be a distinct [A-Za-z0-9_-] name other than \"hub\""
            );
        }
    }
    if names.len() < 2 {
        anyhow::bail!("--regions needs at least two region names, e.g. --regions eu,us");
    }
    let data = std::fs::canonicalize(&args.data_dir)?;
    let key_path = args.data_dir.join("token.key");
    let public_key = tether_auth::public_key_path(&key_path);
    let binary = locate_binary()?;
    let host = "127.0.0.1";
    let leaf_port = args.nats_port + 100;
    let mut hub_spec = ServerSpec::single(
        "hub",
        host,
        args.nats_port,
        args.nats_http_port,
        data.join("nats-hub"),
    );
    hub_spec.domain = Some("hub".into());
    hub_spec.leaf_listen = Some(leaf_port);
    let mut hub = NatsServer::start(hub_spec, &binary, Duration::from_secs(30))
        .context("cannot start the hub nats-server")?;

    let stop = Shutdown::new();
    shutdown::cancel_on_signal(stop.clone());
    let mut regions = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let offset = 1 + i as u16;
        let mut spec = ServerSpec::single(
            name,
            host,
            args.nats_port + offset,
            args.nats_http_port + offset,
            data.join(format!("nats-{name}")),
        );
        spec.domain = Some(name.clone());
        spec.leaf_remotes = vec![leaf_port];
        spec.leaf_deny = tether_nats::subjects::regional_only();
        let nats = NatsServer::start(spec, &binary, Duration::from_secs(30))
            .with_context(|| format!("cannot start the nats-server of region {name}"))?;
        let url = nats.client_url();
        let base = args.base_port + 100 * i as u16;
        let at = |o: u16| SocketAddr::new(args.host, base + o);
        let peers = names
            .iter()
            .filter(|other| *other != name)
            .map(|other| Region {
                name: other.clone(),
                domain: other.clone(),
            })
            .collect::<Vec<Region>>();
        let state = tether_state::start(
            tether_state::StateConfig {
                nats_url: url.clone(),
                admin_listen: at(10),
                region: name.clone(),
                peer_regions: peers.clone(),
                ..Default::default()
            },
            stop.clone(),
        )
        .await
        .with_context(|| format!("state of region {name} failed to start"))?;
        let gateway = tether_gateway::start(
            tether_gateway::GatewayConfig {
                id: format!("gw-{name}"),
                region: name.clone(),
                nats_url: url.clone(),
                tcp_listen: Some(at(0)),
                ws_listen: Some(at(1)),
                admin_listen: at(2),
                token_public_key: public_key.clone(),
                nats_lost_close_secs: 10,
                ..Default::default()
            },
            stop.clone(),
        )
        .await
        .with_context(|| format!("gateway of region {name} failed to start"))?;
        let ipconfig = tether_ipconfig::start(
            tether_ipconfig::IpconfigConfig {
                nats_url: url.clone(),
                admin_listen: at(20),
                http_listen: at(21),
                token_key: key_path.clone(),
                default_region: name.clone(),
                peer_regions: peers,
                ..Default::default()
            },
            stop.clone(),
        )
        .await
        .with_context(|| format!("ipconfig of region {name} failed to start"))?;
        super::app::ensure_demo_app(&url)
            .await
            .with_context(|| format!("cannot set up the demo app in region {name}"))?;
        regions.push(RunningRegion {
            name: name.clone(),
            nats,
            gateway,
            state,
            ipconfig,
        });
    }

    let mut banner = format!(
        "\nTether is up with {} regions.\n  hub nats        {} (leaf port {leaf_port})\n",
        regions.len(),
        hub.client_url()
    );
    for region in &regions {
        banner += &format!("\nregion {}:\n", region.name);
        banner += &format!("  nats            {}\n", region.nats.client_url());
        if let Some(addr) = region.gateway.tcp_addr {
            banner += &format!("  client tcp      tcp://{addr}\n");
        }
        banner += &format!(
            "  ipconfig        http://{}/v1/endpoints\n",
            region.ipconfig.http_addr
        );
        banner += &format!(
            "  state admin     http://{}/metrics\n",
            region.state.admin_addr
        );
    }
    banner += &format!(
        "\nA push made in one region to a device logged in to another crosses on the relay\nstreams (docs/multi-region.md). Tokens: target/release/tether token issue --key {} ...\nCtrl-C stops everything.\n",
        key_path.display()
    );
    println!("{banner}");

    stop.cancelled().await;
    for mut region in regions {
        region.gateway.wait().await;
        region.state.wait().await;
        region.ipconfig.wait().await;
        region.nats.stop();
    }
    hub.stop();
    println!("tether stopped");
    Ok(())
}
