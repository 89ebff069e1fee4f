//! `tether bench restart`: a gateway holding N connections is restarted by hand-off while
//! every connection pings at a steady rate and a broadcast stream runs; reports the pause
//! each device saw (the longest gap between two of its PONGs, minus the ping interval),
//! the connections kept, and the pings and downlinks lost or repeated. No peer has this
//! (peers pass listening sockets only, or drain).

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use serde::Serialize;
use tether_schemas::{Frame, pb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

use crate::client_codec::{self, Incoming, Proto};
use crate::fleet::{self, Plan};
use crate::scenario::source_range;
use crate::stack::{Stack, StackSpec};
use crate::{BenchError, stats};

/// Source ports one address gives towards one endpoint (about 28k; keep a margin).
const PORTS_PER_SOURCE: usize = 25_000;

/// Flags of `tether bench restart`.
#[derive(Debug, Clone, clap::Args)]
pub struct RestartArgs {
    /// Connections held by the restarted gateway (one process: at most ~19,900 here).
    #[arg(short = 'n', long = "connections", default_value_t = 1000)]
    pub connections: usize,
    /// WebSocket connections instead of raw TCP.
    #[arg(long)]
    pub ws: bool,
    /// Milliseconds between two pings of one connection.
    #[arg(long, default_value_t = 1000)]
    pub ping_ms: u64,
    /// Milliseconds between two broadcasts to every connection (0: none).
    #[arg(long, default_value_t = 500)]
    pub broadcast_ms: u64,
    /// Seconds measured before and after the restart.
    #[arg(long, default_value_t = 3)]
    pub settle_secs: u64,
    /// Connects per second while opening.
    #[arg(long, default_value_t = 5000)]
    pub rate: u32,
    /// First client source address 127.0.0.<first> (several when N needs them).
    #[arg(long, default_value_t = 2)]
    pub first_source: u16,
    /// Print one JSON object on the last line.
    #[arg(long)]
    pub json: bool,
}

/// The figures of one run.
#[derive(Debug, Clone, Serialize)]
pub struct RestartReport {
    /// Connections opened.
    pub connections: usize,
    /// Transport (`tcp` or `ws`).
    pub transport: &'static str,
    /// Takeover process started → old process exited, ms.
    pub restart_ms: u64,
    /// Pause seen by devices, ms: median, 99th percentile, maximum.
    pub pause_p50_ms: f64,
    /// 99th percentile.
    pub pause_p99_ms: f64,
    /// Maximum.
    pub pause_max_ms: f64,
    /// Connections still open at the end.
    pub kept: usize,
    /// Pings without a PONG.
    pub pings_lost: u64,
    /// Broadcasts published.
    pub broadcasts: u64,
    /// Broadcast deliveries missing.
    pub downlinks_lost: u64,
    /// Broadcast deliveries seen twice.
    pub downlinks_repeated: u64,
}

/// Set once the first connection that ended has been reported.
static FIRST_CLOSE: AtomicBool = AtomicBool::new(false);

/// Broadcast sequences some connection skipped (diagnostics of a loss), at most 64 kept.
static SKIPPED: std::sync::Mutex<Vec<u64>> = std::sync::Mutex::new(Vec::new());

/// What one connection saw.
#[derive(Default)]
struct ConnLog {
    pings: AtomicU64,
    pongs: AtomicU64,
    /// Longest gap between two PONGs inside the measured window, µs.
    max_gap_us: AtomicU64,
    /// When that gap ended, µs since the run's epoch.
    max_gap_end_us: AtomicU64,
    /// Broadcasts received (distinct, in order).
    downs: AtomicU64,
    repeated: AtomicU64,
    closed: AtomicBool,
}

/// Runs the scenario and prints its report.
pub async fn run(args: &RestartArgs) -> Result<RestartReport, BenchError> {
    if args.connections == 0 || args.ping_ms == 0 {
        return Err(BenchError::Args(
            "connections and ping_ms must be positive".into(),
        ));
    }
    let proto = if args.ws {
        Proto::TetherWs
    } else {
        Proto::Tether
    };
    let mut stack = Stack::start(&StackSpec {
        gateways: 1,
        state: false,
        key: None,
        handoff: true,
        ipconfig_apps: Vec::new(),
        ..StackSpec::default()
    })
    .await?;
    let endpoint = if args.ws {
        stack.ws_endpoints()[0]
    } else {
        stack.tcp_endpoints()[0]
    };
    let sources = args.connections.div_ceil(PORTS_PER_SOURCE).max(1);
    let plan = Plan {
        proto,
        endpoints: vec![endpoint],
        sources: source_range(args.first_source, sources as u16),
        app: "bench".into(),
        did_prefix: "r".into(),
        subscribe: None,
        rate: args.rate,
    };
    epoch();
    eprintln!("restart: opening {} connections", args.connections);
    let opened = fleet::open(&plan, Some(&stack.signer), 0..args.connections, |_, _| {})
        .await?
        .all()?;
    let measuring = Arc::new(AtomicBool::new(false));
    let stop = Arc::new(AtomicBool::new(false));
    let mut logs = Vec::with_capacity(opened.conns.len());
    let interval = Duration::from_millis(args.ping_ms);
    for (k, (_, stream, input)) in opened.conns.into_iter().enumerate() {
        let log = Arc::new(ConnLog::default());
        logs.push(log.clone());
        // Spread the pings over the interval.
        let offset = interval.mul_f64(k as f64 / args.connections as f64);
        tokio::spawn(drive(
            stream,
            input,
            proto,
            interval,
            offset,
            log,
            measuring.clone(),
            stop.clone(),
        ));
    }
    let nats = crate::stack::nats_client(&stack.nats_url).await?;
    let published = Arc::new(AtomicU64::new(0));
    let broadcasting = (args.broadcast_ms > 0).then(|| {
        let (nats, published, stop) = (nats.clone(), published.clone(), stop.clone());
        let every = Duration::from_millis(args.broadcast_ms);
        tokio::spawn(async move {
            let subject = tether_nats::subjects::broadcast("bench");
            while !stop.load(Ordering::Relaxed) {
                let seq = published.load(Ordering::Relaxed) + 1;
                let frame = Frame::Down {
                    header: pb::Down {
                        seq,
                        ..Default::default()
                    },
                    qos1: false,
                    body: Bytes::from(seq.to_be_bytes().to_vec()),
                }
                .encode();
                if nats.publish(subject.clone(), frame).await.is_err() {
                    break;
                }
                published.store(seq, Ordering::Relaxed);
                tokio::time::sleep(every).await;
            }
            let _ = nats.flush().await;
        })
    });
    // Two intervals for every connection to have a PONG, then measure.
    tokio::time::sleep(interval * 2).await;
    measuring.store(true, Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    eprintln!("restart: restarting the gateway by hand-off");
    let restart_began = Instant::now().duration_since(epoch()).as_micros() as u64;
    let seq_before = published.load(Ordering::Relaxed);
    let took = stack.restart_gateway(0, Duration::from_secs(60)).await?;
    let seq_after = published.load(Ordering::Relaxed);
    tokio::time::sleep(Duration::from_secs(args.settle_secs)).await;
    measuring.store(false, Ordering::Relaxed);
    stop.store(true, Ordering::Relaxed);
    if let Some(task) = broadcasting {
        let _ = task.await;
    }
    // In-flight pongs and broadcasts arrive: wait until every ping is answered and every
    // broadcast delivered, or nothing more came for 5 s (at most 60 s), so a backlog is
    // not counted as loss.
    let published_now = published.load(Ordering::Relaxed);
    let complete = || {
        logs.iter().all(|l| {
            l.closed.load(Ordering::Relaxed)
                || (l.pongs.load(Ordering::Relaxed) >= l.pings.load(Ordering::Relaxed)
                    && l.downs.load(Ordering::Relaxed) >= published_now)
        })
    };
    let arrived = || {
        logs.iter()
            .map(|l| l.pongs.load(Ordering::Relaxed) + l.downs.load(Ordering::Relaxed))
            .sum::<u64>()
    };
    let drain_deadline = Instant::now() + Duration::from_secs(60);
    let (mut last, mut quiet_since) = (arrived(), Instant::now());
    while !complete() && Instant::now() < drain_deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
        let now = arrived();
        if now != last {
            (last, quiet_since) = (now, Instant::now());
        } else if quiet_since.elapsed() > Duration::from_secs(5) {
            break;
        }
    }
    // Where the pause went: each side logs its commit's phases.
    for path in &stack.gateways[0].logs {
        for line in crate::stack::log_lines(path, "commit timings") {
            eprintln!("restart: {line}");
        }
    }
    let mut gap_ends = stats::histogram();
    for log in &logs {
        let end = log.max_gap_end_us.load(Ordering::Relaxed);
        if end > restart_began {
            stats::record(&mut gap_ends, end - restart_began);
        }
    }
    eprintln!(
        "restart: the longest pauses ended {:.0} ms (p50) / {:.0} ms (p99) after the takeover process was started; broadcasts {}..{} were published during the restart",
        gap_ends.value_at_quantile(0.5) as f64 / 1000.0,
        gap_ends.value_at_quantile(0.99) as f64 / 1000.0,
        seq_before,
        seq_after
    );
    let skipped = SKIPPED
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
        .clone();
    if !skipped.is_empty() {
        eprintln!("restart: broadcasts some connection skipped: {skipped:?}");
    }
    let broadcasts = published.load(Ordering::Relaxed);
    let mut pauses = stats::histogram();
    let (mut kept, mut pings_lost, mut lost, mut repeated) = (0, 0, 0, 0);
    let interval_us = interval.as_micros() as u64;
    for log in &logs {
        let gap = log.max_gap_us.load(Ordering::Relaxed);
        stats::record(&mut pauses, gap.saturating_sub(interval_us));
        if !log.closed.load(Ordering::Relaxed) {
            kept += 1;
        }
        pings_lost += log
            .pings
            .load(Ordering::Relaxed)
            .saturating_sub(log.pongs.load(Ordering::Relaxed));
        lost += broadcasts.saturating_sub(log.downs.load(Ordering::Relaxed));
        repeated += log.repeated.load(Ordering::Relaxed);
    }
    let ms = |us: u64| us as f64 / 1000.0;
    let report = RestartReport {
        connections: logs.len(),
        transport: if args.ws { "ws" } else { "tcp" },
        restart_ms: took.as_millis() as u64,
        pause_p50_ms: ms(pauses.value_at_quantile(0.5)),
        pause_p99_ms: ms(pauses.value_at_quantile(0.99)),
        pause_max_ms: ms(pauses.max()),
        kept,
        pings_lost,
        broadcasts,
        downlinks_lost: lost,
        downlinks_repeated: repeated,
    };
    println!(
        "restart [{}] {} connections: restart {} ms; pause p50 {:.1} ms, p99 {:.1} ms, max {:.1} ms; kept {}/{}; pings lost {}; broadcasts {} ({} deliveries lost, {} repeated)",
        report.transport,
        report.connections,
        report.restart_ms,
        report.pause_p50_ms,
        report.pause_p99_ms,
        report.pause_max_ms,
        report.kept,
        report.connections,
        report.pings_lost,
        report.broadcasts,
        report.downlinks_lost,
        report.downlinks_repeated
    );
    if args.json
        && let Ok(json) = serde_json::to_string(&report)
    {
        println!("{json}");
    }
    Ok(report)
}

/// The run's time origin (for when pauses ended).
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// One connection: pings every `interval`, records PONG gaps and broadcasts.
#[allow(clippy::too_many_arguments)]
async fn drive(
    stream: tokio::net::TcpStream,
    mut input: BytesMut,
    proto: Proto,
    interval: Duration,
    offset: Duration,
    log: Arc<ConnLog>,
    measuring: Arc<AtomicBool>,
    stop: Arc<AtomicBool>,
) {
    let (mut reader, mut writer) = stream.into_split();
    let ping = Frame::Ping(Bytes::from_static(b"p")).encode();
    let mut ping_bytes = BytesMut::new();
    if proto == Proto::TetherWs {
        client_codec::ws_binary(&mut ping_bytes, &ping);
    } else {
        ping_bytes.extend_from_slice(&ping);
    }
    let ping_bytes = ping_bytes.freeze();
    let pinger_log = log.clone();
    let pinger_stop = stop.clone();
    let pinger = tokio::spawn(async move {
        tokio::time::sleep(offset).await;
        let mut ticks = tokio::time::interval(interval);
        ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        while !pinger_stop.load(Ordering::Relaxed) {
            ticks.tick().await;
            if writer.write_all(&ping_bytes).await.is_err() {
                return;
            }
            pinger_log.pings.fetch_add(1, Ordering::Relaxed);
        }
        // Keep the write half: dropping it would close the connection (FIN) before the
        // figures are taken. The task ends with the process.
        std::future::pending::<()>().await;
        drop(writer);
    });
    let mut last_pong: Option<Instant> = None;
    let mut last_down = 0u64;
    loop {
        loop {
            match client_codec::decode(proto, &mut input) {
                Ok(Some(Incoming::Other)) => {
                    // After the hello, the only other frames are PONGs.
                    let now = Instant::now();
                    log.pongs.fetch_add(1, Ordering::Relaxed);
                    if let Some(before) = last_pong
                        && measuring.load(Ordering::Relaxed)
                    {
                        let gap = now.duration_since(before).as_micros() as u64;
                        if gap > log.max_gap_us.fetch_max(gap, Ordering::Relaxed) {
                            let end = now.duration_since(epoch()).as_micros() as u64;
                            log.max_gap_end_us.store(end, Ordering::Relaxed);
                        }
                    }
                    last_pong = Some(now);
                }
                Ok(Some(Incoming::Payload(body))) => {
                    let seq = body
                        .get(..8)
                        .and_then(|b| b.try_into().ok())
                        .map_or(0, u64::from_be_bytes);
                    if seq <= last_down {
                        log.repeated.fetch_add(1, Ordering::Relaxed);
                    } else {
                        if last_down > 0 && seq > last_down + 1 {
                            let mut skipped = SKIPPED
                                .lock()
                                .unwrap_or_else(std::sync::PoisonError::into_inner);
                            for missing in last_down + 1..seq {
                                if skipped.len() < 64 && !skipped.contains(&missing) {
                                    skipped.push(missing);
                                }
                            }
                        }
                        log.downs.fetch_add(1, Ordering::Relaxed);
                        last_down = seq;
                    }
                }
                Ok(Some(Incoming::Error(why))) | Err(why) => {
                    if !stop.load(Ordering::Relaxed) && !FIRST_CLOSE.swap(true, Ordering::Relaxed) {
                        eprintln!("restart: a connection ended: {why}");
                    }
                    log.closed.store(true, Ordering::Relaxed);
                    pinger.abort();
                    return;
                }
                Ok(Some(_)) => {}
                Ok(None) => break,
            }
        }
        match reader.read_buf(&mut input).await {
            Ok(n) if n > 0 => {}
            other => {
                if !stop.load(Ordering::Relaxed) && !FIRST_CLOSE.swap(true, Ordering::Relaxed) {
                    eprintln!("restart: a connection ended: {other:?}");
                }
                log.closed.store(true, Ordering::Relaxed);
                pinger.abort();
                return;
            }
        }
    }
}
