//! `tether bench drain -n N`: a gateway holding N SDK devices is drained to a second one
//! (PROTOCOL.md 10.7) while a business pushes one QoS1 message to every device. Reports the
//! time until the drained gateway is empty, the move rate, and QoS1 messages lost or
//! duplicated (goal: N = 10,000 in ≤ 30 s at the default 1,000/s, 0 lost). No peer has
//! this feature, so there is no comparison.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use futures::StreamExt;
use serde::Serialize;
use tether_business::{Business, Push};
use tether_client::{Client, ClientConfig, Endpoint, Event};
use tether_schemas::bus::{MigrationStatus, RedirectReply};

use crate::BenchError;
use crate::stack::{Stack, StackSpec, nats_client};

const APP: &str = "bench";

/// Flags of `tether bench drain`.
#[derive(Debug, Clone, clap::Args)]
pub struct DrainArgs {
    /// Devices on the drained gateway.
    #[arg(short = 'n', long, default_value_t = 10_000)]
    pub devices: usize,
    /// REDIRECTs per second (default: the gateway's `migrate_rate`, 1,000).
    #[arg(long)]
    pub rate: Option<u32>,
    /// Print one JSON object on the last line.
    #[arg(long)]
    pub json: bool,
}

/// What a drain run measured.
#[derive(Debug, Serialize)]
pub struct DrainReport {
    /// Devices connected before the drain.
    pub devices: usize,
    /// REDIRECTs per second asked for.
    pub rate: u32,
    /// Seconds from the drain op until the drained gateway held no connection.
    pub drain_secs: f64,
    /// Seconds until every device had logged in on the target.
    pub all_moved_secs: f64,
    /// The gateway's final migration status.
    pub status: MigrationStatus,
    /// QoS1 messages pushed (stored by state).
    pub sent: usize,
    /// QoS1 messages that never reached their device's app.
    pub lost: usize,
    /// QoS1 messages that reached an app twice.
    pub duplicated: usize,
    /// Disconnects and errors devices reported.
    pub device_errors: usize,
}

#[derive(Default)]
struct Seen {
    seqs: std::sync::Mutex<Vec<u64>>,
}

/// Runs the scenario and prints its report.
pub async fn run(args: &DrainArgs) -> Result<DrainReport, BenchError> {
    if args.devices == 0 {
        return Err(BenchError::Args("-n must be positive".into()));
    }
    // Each device holds two sockets for a moment while it moves.
    rlimit::increase_nofile_limit(u64::MAX).map_err(BenchError::io("raise RLIMIT_NOFILE"))?;
    let stack = Stack::start(&StackSpec {
        gateways: 2,
        state: true,
        key: None,
        ipconfig_apps: vec![APP.into()],
        handoff: false,
        ..StackSpec::default()
    })
    .await?;
    let nats = nats_client(&stack.nats_url).await?;
    let (drained, target) = ("bench0", "bench1");
    let setup = |what: &str| {
        let what = what.to_string();
        move |e: String| BenchError::Setup(format!("{what}: {e}"))
    };

    // Every device logs in on the first gateway.
    let endpoint = stack.tcp_endpoints()[0];
    let moved = Arc::new(AtomicUsize::new(0));
    let troubles = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let devices: Vec<_> = futures::stream::iter(0..args.devices)
        .map(|i| {
            let did = format!("d{i}");
            let token = stack
                .signer
                .issue(APP, &format!("u{i}"), &did, Duration::from_secs(3600));
            let (moved, troubles) = (moved.clone(), troubles.clone());
            async move {
                let token = token.map_err(|e| e.to_string())?;
                device(endpoint, did, token, target, moved, troubles).await
            }
        })
        .buffer_unordered(256)
        .collect::<Vec<Result<_, String>>>()
        .await
        .into_iter()
        .collect::<Result<_, _>>()
        .map_err(setup("device login"))?;
    eprintln!(
        "{} devices logged in on {drained} in {:.1} s",
        devices.len(),
        started.elapsed().as_secs_f64()
    );

    // ipconfig must know the target before the drain starts.
    let probe = serde_json::json!({"target": "ipconfig", "devices": [
        {"app": APP, "uid": "u", "did": "probe", "transport": "tcp"}]});
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let answer = nats
            .request(
                tether_nats::subjects::gateway_redirect(drained),
                serde_json::to_vec(&probe).unwrap_or_default().into(),
            )
            .await;
        let offered = answer
            .ok()
            .and_then(|m| serde_json::from_slice::<RedirectReply>(&m.payload).ok())
            .is_some_and(|r| r.grants.iter().any(|g| g.gw.as_deref() == Some(target)));
        if offered {
            break;
        }
        if Instant::now() > deadline {
            return Err(BenchError::Setup(
                "ipconfig never offered the target".into(),
            ));
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // One QoS1 message per device, pushed while the drain runs.
    let business = Business::new(nats.clone(), APP);
    let dids: Vec<String> = (0..args.devices).map(|i| format!("d{i}")).collect();
    let pushing = tokio::spawn(async move {
        futures::stream::iter(dids)
            .map(|did| {
                let business = business.clone();
                async move {
                    business
                        .push(Push::to_dids([did.as_str()], did.clone().into_bytes()))
                        .await
                        .is_ok()
                }
            })
            .buffer_unordered(128)
            .filter(|ok| std::future::ready(*ok))
            .count()
            .await
    });

    let mut op = serde_json::json!({"op": "drain"});
    if let Some(rate) = args.rate {
        op["rate"] = rate.into();
    }
    let drain_started = Instant::now();
    let status = control(&nats, drained, &op).await?;
    let rate = status.rate;
    let mut all_moved_secs = None;
    let status = loop {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if all_moved_secs.is_none() && moved.load(Ordering::Relaxed) >= args.devices {
            all_moved_secs = Some(drain_started.elapsed().as_secs_f64());
        }
        let status = control(
            &nats,
            drained,
            &serde_json::json!({"op": "migration_status"}),
        )
        .await?;
        if !status.running {
            break status;
        }
        if drain_started.elapsed() > Duration::from_secs(600) {
            return Err(BenchError::Setup(format!(
                "drain not done in 600 s: {status:?}"
            )));
        }
    };
    let drain_secs = drain_started.elapsed().as_secs_f64();
    let sent = pushing
        .await
        .map_err(|e| BenchError::Setup(format!("pusher: {e}")))?;

    // Every device should now have its one message, once.
    let deadline = Instant::now() + Duration::from_secs(60);
    let count = |seen: &Seen| seen.seqs.lock().map(|s| s.len()).unwrap_or(0);
    while devices.iter().any(|(_, seen)| count(seen) == 0) && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    tokio::time::sleep(Duration::from_secs(1)).await;
    let lost = devices.iter().filter(|(_, seen)| count(seen) == 0).count();
    let duplicated = devices
        .iter()
        .map(|(_, seen)| count(seen).saturating_sub(1))
        .sum();
    let report = DrainReport {
        devices: args.devices,
        rate,
        drain_secs,
        all_moved_secs: all_moved_secs.unwrap_or(drain_secs),
        status,
        sent,
        lost,
        duplicated,
        device_errors: troubles.load(Ordering::Relaxed),
    };
    println!(
        "drain: {} devices moved off {drained} in {:.1} s (all logged in on {target} after {:.1} s; {:.0}/s at rate {}/s)",
        report.devices,
        report.drain_secs,
        report.all_moved_secs,
        report.devices as f64 / report.drain_secs.max(0.001),
        report.rate
    );
    println!(
        "  redirected {}, moved {}, timed out {}, failed {}; QoS1 pushed {}, lost {}, duplicated {}; device errors {}",
        report.status.redirected,
        report.status.moved,
        report.status.timed_out,
        report.status.failed,
        report.sent,
        report.lost,
        report.duplicated,
        report.device_errors
    );
    if args.json {
        println!("{}", serde_json::to_string(&report).unwrap_or_default());
    }
    drop(devices);
    Ok(report)
}

/// Sends a control op to gateway `gw` and reads its status answer.
async fn control(
    nats: &async_nats::Client,
    gw: &str,
    op: &serde_json::Value,
) -> Result<MigrationStatus, BenchError> {
    let body = serde_json::to_vec(op).unwrap_or_default();
    let answer = nats
        .request(tether_nats::subjects::gateway_ctl(gw), body.into())
        .await
        .map_err(|e| BenchError::Setup(format!("control {gw}: {e}")))?;
    serde_json::from_slice(&answer.payload).map_err(|_| {
        BenchError::Setup(format!(
            "control {gw}: {}",
            String::from_utf8_lossy(&answer.payload)
        ))
    })
}

/// One SDK device; a task counts its messages, its arrival on `target` and its troubles.
async fn device(
    endpoint: std::net::SocketAddr,
    did: String,
    token: String,
    target: &'static str,
    moved: Arc<AtomicUsize>,
    troubles: Arc<AtomicUsize>,
) -> Result<(Client, Arc<Seen>), String> {
    let mut config = ClientConfig::new(vec![Endpoint::tcp(endpoint)], APP, &did, token);
    config.reconnect.min = Duration::from_millis(100);
    let (client, mut events) = Client::connect(config)
        .await
        .map_err(|e| format!("{did}: {e}"))?;
    match tokio::time::timeout(Duration::from_secs(60), events.recv()).await {
        Ok(Some(Event::Connected { .. })) => {}
        other => return Err(format!("{did}: expected Connected, got {other:?}")),
    }
    let seen = Arc::new(Seen::default());
    let log = seen.clone();
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            match event {
                Event::Connected { gateway, .. } if gateway == target => {
                    moved.fetch_add(1, Ordering::Relaxed);
                }
                Event::Connected { .. } => {}
                Event::Message { seq, .. } => {
                    if let Ok(mut seqs) = log.seqs.lock() {
                        seqs.push(seq);
                    }
                }
                _ => {
                    troubles.fetch_add(1, Ordering::Relaxed);
                }
            }
        }
    });
    Ok((client, seen))
}
