//! The `conns` scenario: open N idle, logged-in connections at a target rate, hold them,
//! and measure what they cost: connect rate, login latency, server RSS per connection
//! (`/proc/PID/status`, summed over gateway processes), kernel TCP memory
//! (`/proc/net/sockstat`) and the load generator's own RSS.
//!
//! One process may hold 20,000 fds here, so above [`MAX_CONNECTIONS_PER_PROCESS`] the
//! tool re-executes itself (`tether bench conns-worker`, see [`crate::worker`]): each
//! worker opens its share, reports, and holds its sockets until told to stop. Clients
//! spread over several 127.0.0.x source addresses (~28k ports per source and
//! destination) and, with `gateways > 1`, over several gateway processes.

use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::time::Duration;

use serde::Serialize;
use serde_json::{Value, json};
use tether_auth::TokenSigner;

use crate::client_codec::Proto;
use crate::compare::Figure;
use crate::fleet::{self, Plan};
use crate::progress::Progress;
use crate::scenario::{self, CommonArgs, Report, Scenario, source_range};
use crate::stack::{PeerServer, Stack, StackSpec, rss_sum_kb};
use crate::stats::Percentiles;
use crate::{BenchError, procfs, worker};

/// Most connections one load-generator process opens (fd hard limit 20,000, minus margin).
pub const MAX_CONNECTIONS_PER_PROCESS: usize = 19_000;
/// Shortest hold before the "after" measurement.
const MIN_HOLD_SECS: u64 = 2;
/// fds kept free for the runtime, NATS clients, files.
const FD_MARGIN: u64 = 200;

/// Arguments of the `conns` scenario. It targets a running gateway by its address alone
/// (`--endpoint`, `--key`, `--gateway-pid`: no NATS needed), not [`RunningArgs`].
///
/// [`RunningArgs`]: crate::scenario::RunningArgs
#[derive(Debug, Clone, clap::Args)]
pub struct ConnsArgs {
    /// Connections to open (more than 19,000 spread over worker processes).
    #[arg(long, short = 'n', default_value_t = 10_000)]
    pub connections: usize,
    /// Target connects per second.
    #[arg(long, default_value_t = 5_000)]
    pub rate: u32,
    /// Gateway processes to start.
    #[arg(long, default_value_t = 1)]
    pub gateways: usize,
    /// Tether clients use WebSocket (`/ws`) instead of TCP.
    #[arg(long)]
    pub ws: bool,
    /// Load-generator processes (default: one per 19,000 connections).
    #[arg(long)]
    pub workers: Option<usize>,
    /// Gateway to target (default: start nats-server and gateways for the run).
    #[arg(long)]
    pub endpoint: Option<SocketAddr>,
    /// Process id of the targeted gateway, for its RSS.
    #[arg(long)]
    pub gateway_pid: Option<u32>,
    /// Token signing key of the targeted gateway (PEM).
    #[arg(long)]
    pub key: Option<PathBuf>,
    /// Seconds to hold the connections idle before measuring.
    #[arg(long = "hold", value_name = "HOLD", default_value_t = 5)]
    pub hold_secs: u64,
    /// The flags of every scenario.
    #[command(flatten)]
    pub common: CommonArgs,
}

impl Default for ConnsArgs {
    fn default() -> Self {
        scenario::defaults()
    }
}

/// Results of one `conns` run against one target.
#[derive(Debug, Clone, Serialize)]
pub struct ConnsReport {
    /// `tether`, `nats` or `mosquitto`.
    pub target: String,
    /// `tcp` or `ws`.
    pub transport: &'static str,
    /// Server processes measured (gateways).
    pub servers: usize,
    /// Load-generator processes.
    pub workers: usize,
    /// Connections logged in and held.
    pub connections: usize,
    /// Connections that failed to connect or log in.
    pub failed: usize,
    /// First failure, if any.
    pub first_error: Option<String>,
    /// Achieved logins per second (first connect start → last acceptance, slowest worker).
    pub connect_rate_per_sec: f64,
    /// Login latency (connect start → LOGIN_ACK / PONG / CONNACK).
    pub login: Percentiles,
    /// Median login latency, µs.
    pub login_p50_us: u64,
    /// 99th percentile login latency, µs.
    pub login_p99_us: u64,
    /// Server RSS before connecting, KiB (sum over server processes).
    pub gateway_rss_before_kb: Option<u64>,
    /// Server RSS after the hold, KiB.
    pub gateway_rss_after_kb: Option<u64>,
    /// (after − before) / connections, bytes.
    pub gateway_rss_per_conn_bytes: Option<i64>,
    /// `/proc/net/sockstat` TCP mem before, pages (system-wide).
    pub kernel_sockstat_mem_pages_before: Option<u64>,
    /// Same after the hold.
    pub kernel_sockstat_mem_pages_after: Option<u64>,
    /// Kernel TCP memory delta per connection (both ends), bytes.
    pub kernel_mem_per_conn_bytes: Option<i64>,
    /// Kernel slab memory delta per connection (`/proc/meminfo` `Slab:`, system-wide:
    /// socket structures of both ends, and anything else the machine did meanwhile), bytes.
    pub kernel_slab_per_conn_bytes: Option<i64>,
    /// Load generator RSS after the hold, KiB (sum over its processes).
    pub loadgen_rss_kb: Option<u64>,
    /// Seconds the connections were held idle before the "after" readings.
    pub hold_secs: u64,
    /// Whether the gateway ran in this very process (RSS then includes the load generator).
    pub gateway_in_process: bool,
}

fn opt<T: fmt::Display>(v: &Option<T>) -> String {
    v.as_ref().map_or_else(|| "n/a".into(), ToString::to_string)
}

impl fmt::Display for ConnsReport {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        writeln!(
            f,
            "conns [{} {}]: {} connections held ({} failed) on {} server process(es) from {} \
             load process(es), {:.0} logins/s",
            self.target,
            self.transport,
            self.connections,
            self.failed,
            self.servers,
            self.workers,
            self.connect_rate_per_sec
        )?;
        if let Some(err) = &self.first_error {
            writeln!(f, "  first error: {err}")?;
        }
        writeln!(f, "  login latency: {}", self.login)?;
        writeln!(
            f,
            "  server RSS: {} KiB -> {} KiB after {} s idle = {} B per connection{}",
            opt(&self.gateway_rss_before_kb),
            opt(&self.gateway_rss_after_kb),
            self.hold_secs,
            opt(&self.gateway_rss_per_conn_bytes),
            if self.gateway_in_process {
                " (gateway in-process: includes the load generator)"
            } else {
                ""
            }
        )?;
        writeln!(
            f,
            "  kernel: sockstat TCP mem {} -> {} pages = {} B per connection (socket buffers), \
             slab {} B per connection (both ends, system-wide)",
            opt(&self.kernel_sockstat_mem_pages_before),
            opt(&self.kernel_sockstat_mem_pages_after),
            opt(&self.kernel_mem_per_conn_bytes),
            opt(&self.kernel_slab_per_conn_bytes)
        )?;
        write!(f, "  load generator RSS: {} KiB", opt(&self.loadgen_rss_kb))
    }
}

impl ConnsReport {
    /// The report as one JSON line.
    pub fn to_json(&self) -> String {
        serde_json::to_string(self).unwrap_or_else(|e| format!("{{\"error\":\"{e}\"}}"))
    }
}

impl Report for ConnsReport {
    fn target(&self) -> &str {
        &self.target
    }

    fn figures(&self) -> Vec<Figure> {
        let mut figures = vec![
            Figure::new("connect_rate", self.connect_rate_per_sec, "/s"),
            Figure::new("login_p50", self.login.p50_us as f64, "µs"),
            Figure::new("login_p99", self.login.p99_us as f64, "µs"),
        ];
        if let Some(rss) = self.gateway_rss_per_conn_bytes {
            figures.insert(0, Figure::new("rss_per_conn", rss as f64, "B"));
        }
        figures
    }
}

/// The server side of one run, when started here (stopped on drop).
#[derive(Default)]
struct Server {
    _stack: Option<Stack>,
    _peer: Option<PeerServer>,
}

impl Scenario for ConnsArgs {
    type Report = ConnsReport;
    const NAME: &'static str = "conns";

    fn common(&self) -> &CommonArgs {
        &self.common
    }

    /// 127.0.0.2 ..= 127.0.0.9.
    fn default_sources() -> Vec<IpAddr> {
        source_range(2, 8)
    }

    fn params(&self) -> Value {
        json!({
            "connections": self.connections,
            "rate": self.rate,
            "gateways": self.gateways,
            "transport": if self.ws { "ws" } else { "tcp" },
            "hold_secs": self.hold_secs,
        })
    }

    fn tether(&self) -> Proto {
        if self.ws {
            Proto::TetherWs
        } else {
            Proto::Tether
        }
    }

    async fn measure(&self, proto: Proto, sources: &[IpAddr]) -> Result<ConnsReport, BenchError> {
        if self.connections == 0 || self.rate == 0 || sources.is_empty() {
            return Err(BenchError::Args(
                "connections, rate and source addresses are needed".into(),
            ));
        }
        let in_process = self.gateway_pid == Some(std::process::id());
        let fd_limit = rlimit::increase_nofile_limit(u64::MAX)
            .map_err(BenchError::io("raise RLIMIT_NOFILE"))?;
        // An in-process gateway holds the server end of every connection too.
        let per_process =
            usize::try_from(fd_limit.saturating_sub(FD_MARGIN) / if in_process { 2 } else { 1 })
                .unwrap_or(usize::MAX)
                .min(MAX_CONNECTIONS_PER_PROCESS);
        let workers = self
            .workers
            .unwrap_or_else(|| self.connections.div_ceil(per_process))
            .max(1);
        if self.connections.div_ceil(workers) > per_process || (in_process && workers > 1) {
            return Err(BenchError::TooManyConnections {
                requested: self.connections,
                max: if in_process {
                    per_process
                } else {
                    per_process * workers
                },
            });
        }

        let (server, endpoints, pids, signer, key_path) = match (proto, self.endpoint) {
            (Proto::Tether | Proto::TetherWs, Some(endpoint)) => {
                let key = self.key.clone().ok_or_else(|| {
                    BenchError::Args("--key (token signing key) is required with --endpoint".into())
                })?;
                let signer = TokenSigner::from_file(&key)
                    .map_err(|e| BenchError::Setup(format!("signing key: {e}")))?;
                let pids = self.gateway_pid.into_iter().collect();
                (
                    Server::default(),
                    vec![endpoint],
                    pids,
                    Some(signer),
                    Some(key),
                )
            }
            (Proto::Tether | Proto::TetherWs, None) => {
                let stack = Stack::start(&StackSpec {
                    gateways: self.gateways.max(1),
                    state: false,
                    key: self.key.clone(),
                    ipconfig_apps: Vec::new(),
                    handoff: false,
                    ..StackSpec::default()
                })
                .await?;
                let endpoints = if proto == Proto::TetherWs {
                    stack.ws_endpoints()
                } else {
                    stack.tcp_endpoints()
                };
                let pids = stack.gateway_pids();
                let (signer, key) = (stack.signer.clone(), stack.key_path.clone());
                (
                    Server {
                        _stack: Some(stack),
                        _peer: None,
                    },
                    endpoints,
                    pids,
                    Some(signer),
                    Some(key),
                )
            }
            (peer, _) => {
                let server = match peer {
                    Proto::Mqtt => PeerServer::mosquitto().await?,
                    _ => PeerServer::nats()?,
                };
                let (addr, pid) = (server.addr, server.pid);
                (
                    Server {
                        _stack: None,
                        _peer: Some(server),
                    },
                    vec![addr],
                    vec![pid],
                    None,
                    None,
                )
            }
        };
        let servers = endpoints.len();
        let plan = Plan {
            proto,
            endpoints,
            sources: sources.to_vec(),
            app: self.common.app.clone(),
            did_prefix: "bench-d".into(),
            subscribe: None,
            rate: self.rate,
        };

        tokio::time::sleep(Duration::from_millis(300)).await;
        let rss_before = rss_sum_kb(&pids);
        let mem_before = procfs::tcp_mem_pages();
        let slab_before = procfs::slab_kb();
        let label = format!("conns [{}]", proto.target_name());
        let progress = Progress::start(label, self.connections as u64);

        let opened = if workers == 1 {
            let p = progress.clone();
            let opened = fleet::open(&plan, signer.as_ref(), 0..self.connections, |ok, failed| {
                p.set((ok + failed) as u64);
                if failed > 0 {
                    p.note(format!("{failed} failed"));
                }
            })
            .await?;
            Held::Local(opened)
        } else {
            Held::Workers(
                worker::spawn_all(
                    &plan,
                    key_path.as_deref(),
                    self.connections,
                    workers,
                    &progress,
                )
                .await?,
            )
        };
        progress.finish();
        let (held, failed, first_error, latency, elapsed, loadgen_extra) = opened.summary();
        if held == 0 {
            return Err(BenchError::NoConnections(first_error.unwrap_or_default()));
        }

        let hold_secs = self.hold_secs.max(MIN_HOLD_SECS);
        eprintln!("holding {held} idle connections for {hold_secs} s");
        tokio::time::sleep(Duration::from_secs(hold_secs)).await;
        let rss_after = rss_sum_kb(&pids);
        let mem_after = procfs::tcp_mem_pages();
        let slab_after = procfs::slab_kb();
        let loadgen_rss = procfs::self_rss_kb().map(|kb| kb + loadgen_extra);

        let per_conn = |before: Option<u64>, after: Option<u64>, unit: i64| {
            let (b, a) = (i64::try_from(before?).ok()?, i64::try_from(after?).ok()?);
            Some((a - b) * unit / i64::try_from(held).ok()?)
        };
        let login = Percentiles::of(&latency);
        let report = ConnsReport {
            target: proto.target_name().into(),
            transport: if proto == Proto::TetherWs {
                "ws"
            } else {
                "tcp"
            },
            servers,
            workers,
            connections: held,
            failed,
            first_error,
            connect_rate_per_sec: held as f64 / elapsed.as_secs_f64().max(1e-9),
            login,
            login_p50_us: login.p50_us,
            login_p99_us: login.p99_us,
            gateway_rss_before_kb: rss_before,
            gateway_rss_after_kb: rss_after,
            gateway_rss_per_conn_bytes: per_conn(rss_before, rss_after, 1024),
            kernel_sockstat_mem_pages_before: mem_before,
            kernel_sockstat_mem_pages_after: mem_after,
            kernel_mem_per_conn_bytes: per_conn(mem_before, mem_after, 4096),
            kernel_slab_per_conn_bytes: per_conn(slab_before, slab_after, 1024),
            loadgen_rss_kb: loadgen_rss,
            hold_secs,
            gateway_in_process: in_process,
        };
        // Close the clients before the servers.
        drop(opened);
        drop(server);
        Ok(report)
    }
}

/// Connections held in this process or by worker processes.
enum Held {
    Local(fleet::Opened),
    Workers(worker::Workers),
}

impl Held {
    /// (held, failed, first error, latency, elapsed, workers' RSS KiB)
    fn summary(
        &self,
    ) -> (
        usize,
        usize,
        Option<String>,
        hdrhistogram::Histogram<u64>,
        Duration,
        u64,
    ) {
        match self {
            Held::Local(o) => (
                o.conns.len(),
                o.failed,
                o.first_error.clone(),
                o.latency.clone(),
                o.elapsed,
                0,
            ),
            Held::Workers(w) => w.summary(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::stats;

    #[test]
    fn report_json_is_one_line() {
        let mut h = stats::histogram();
        stats::record(&mut h, 10);
        let login = Percentiles::of(&h);
        let report = ConnsReport {
            target: "tether".into(),
            transport: "tcp",
            servers: 1,
            workers: 1,
            connections: 1,
            failed: 0,
            first_error: None,
            connect_rate_per_sec: 1.0,
            login,
            login_p50_us: login.p50_us,
            login_p99_us: login.p99_us,
            gateway_rss_before_kb: Some(1),
            gateway_rss_after_kb: Some(2),
            gateway_rss_per_conn_bytes: Some(1024),
            kernel_sockstat_mem_pages_before: None,
            kernel_sockstat_mem_pages_after: None,
            kernel_mem_per_conn_bytes: None,
            kernel_slab_per_conn_bytes: None,
            loadgen_rss_kb: Some(5),
            hold_secs: 2,
            gateway_in_process: false,
        };
        let json = report.to_json();
        assert!(!json.contains('\n'));
        assert!(json.contains("\"gateway_rss_per_conn_bytes\":1024"));
        assert!(report.to_string().contains("1024 B per connection"));
        assert_eq!(report.outcome().figures[0].key, "rss_per_conn");
    }

    #[test]
    fn defaults_are_the_flags_defaults() {
        let args = ConnsArgs::default();
        assert_eq!(
            (args.connections, args.rate, args.hold_secs),
            (10_000, 5_000, 5)
        );
        assert_eq!((args.gateways, args.workers, args.ws), (1, None, false));
        assert_eq!(args.tether(), Proto::Tether);
        assert_eq!(ConnsArgs::default_sources(), source_range(2, 8));
    }
}
