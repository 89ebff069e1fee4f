//! Smoke run of the `conns` scenario against an in-process gateway on a real nats-server.

use std::time::Duration;

use tether_auth::TokenSigner;
use tether_bench::conns::ConnsArgs;
use tether_bench::scenario::{self, CommonArgs};
use tether_gateway::GatewayConfig;
use tokio_util::sync::CancellationToken;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_connections_in_process() -> Result<(), Box<dyn std::error::Error>> {
    let nats = tether_nats::harness::single()?;
    let dir = tempfile::tempdir()?;
    let signer = TokenSigner::generate();
    let key = dir.path().join("token.key");
    let public = dir.path().join("token.pub");
    std::fs::write(&key, signer.to_pem()?)?;
    std::fs::write(&public, signer.verifier().to_pem()?)?;

    let shutdown = CancellationToken::new();
    let config = GatewayConfig {
        id: "benchtest".into(),
        nats_url: nats.client_url(),
        tcp_listen: Some("127.0.0.1:0".parse()?),
        ws_listen: None,
        admin_listen: "127.0.0.1:0".parse()?,
        token_public_key: public,
        await_registration: false,
        ..GatewayConfig::default()
    };
    let gateway = tether_gateway::start(config, shutdown.clone()).await?;
    let endpoint = gateway.tcp_addr.ok_or("no tcp address")?;

    let ran = scenario::run(&ConnsArgs {
        gateway_pid: Some(std::process::id()),
        endpoint: Some(endpoint),
        connections: 50,
        rate: 1_000,
        key: Some(key),
        hold_secs: 2,
        common: CommonArgs {
            json: true,
            ..CommonArgs::default()
        },
        ..ConnsArgs::default()
    })
    .await?;
    let (comparison, report) = (ran.comparison, ran.tether.ok_or("no tether report")?);
    assert_eq!(report.connections, 50, "{report}");
    assert_eq!(report.failed, 0, "{report}");
    assert!(report.gateway_rss_after_kb.is_some_and(|kb| kb > 0));
    assert!(report.loadgen_rss_kb.is_some_and(|kb| kb > 0));
    assert!(report.login_p50_us > 0);
    assert!(comparison.get("tether").is_some());

    shutdown.cancel();
    tokio::time::timeout(Duration::from_secs(15), gateway.wait()).await?;
    Ok(())
}
