//! The `conns` scenario: open `connections` idle, logged-in TCP client connections at
//! `rate` per second, hold them, and measure what they cost.
//!
//! Reports login latency (connect start → LOGIN_ACK), gateway RSS before and after (per
//! connection), kernel TCP socket memory (`/proc/net/sockstat`) and the load generator's
//! own RSS.
//!
//! Limits: one load-generator process holds at most [`MAX_CONNECTIONS_PER_PROCESS`]
//! sockets (20,000 fds per process on our machines). TODO: a multi-process form (children
//! of this binary, each with its own source addresses) for larger counts.

use std::fmt;
use std::fs::File;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::{Bytes, BytesMut};
use hdrhistogram::Histogram;
use serde::Serialize;
use tether_auth::TokenSigner;
use tether_nats::server::{NatsServer, ServerSpec, free_port, locate_binary};
use tether_schemas::{Frame, limits::DEFAULT_MAX_FRAME_LEN, pb, split_frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{Semaphore, mpsc};

use crate::{BenchError, procfs};

/// Most connections one load-generator process opens (fd hard limit 20,000, minus margin).
pub const MAX_CONNECTIONS_PER_PROCESS: usize = 19_000;
/// Connects in flight at once.
const IN_FLIGHT: usize = 256;
/// Time one connection has to connect and receive LOGIN_ACK.
const LOGIN_TIMEOUT: Duration = Duration::from_secs(15);
/// Shortest hold before the "after" measurement.
const MIN_HOLD_SECS: u64 = 2;
/// Validity of the pre-generated tokens.
const TOKEN_TTL: Duration = Duration::from_secs(3600);
/// fds kept free for the runtime, NATS clients, files.
const FD_MARGIN: u64 = 200;

/// Arguments of the `conns` scenario.
#[derive(Debug, Clone)]
pub struct ConnsArgs {
    /// Process whose RSS is measured. With `endpoint` unset, the scenario starts its own
    /// nats-server and gateway and measures that gateway (leave this `None` then).
    pub gateway_pid: Option<u32>,
    /// Gateway TCP client address; `None` starts a gateway (needs the `tether` binary).
    pub endpoint: Option<SocketAddr>,
    /// Connections to open and hold.
    pub connections: usize,
    /// Target connects per second.
    pub rate: u32,
    /// Client source addresses, used round-robin (each gives ~28k ports per destination).
    pub source_addrs: Vec<IpAddr>,
    /// Token signing key (private PEM). Required with `endpoint`; generated otherwise.
    pub key: Option<PathBuf>,
    /// App id put in tokens and LOGIN.
    pub app: String,
    /// Seconds to hold the idle connections before measuring (at least 2).
    pub hold_secs: u64,
    /// Print one JSON line after the human summary.
    pub json: bool,
}

impl ConnsArgs {
    /// 127.0.0.2 ..= 127.0.0.9.
    pub fn default_source_addrs() -> Vec<IpAddr> {
        (2..=9)
            .map(|i| IpAddr::V4(Ipv4Addr::new(127, 0, 0, i)))
            .collect()
    }
}

impl Default for ConnsArgs {
    fn default() -> Self {
        Self {
            gateway_pid: None,
            endpoint: None,
            connections: 10_000,
            rate: 5_000,
            source_addrs: Self::default_source_addrs(),
            key: None,
            app: "bench".into(),
            hold_secs: 5,
            json: false,
        }
    }
}

/// Results of one `conns` run.
#[derive(Debug, Clone, Serialize)]
pub struct ConnsReport {
    /// Connections logged in and held.
    pub connections: usize,
    /// Connections that failed to connect or log in.
    pub failed: usize,
    /// First failure, if any.
    pub first_error: Option<String>,
    /// Achieved logins per second (first connect start → last LOGIN_ACK).
    pub connect_rate_per_sec: f64,
    /// Median login latency, µs.
    pub login_p50_us: u64,
    /// 99th percentile login latency, µs.
    pub login_p99_us: u64,
    /// Worst login latency, µs.
    pub login_max_us: u64,
    /// Gateway RSS before connecting, KiB (`None` without a gateway pid).
    pub gateway_rss_before_kb: Option<u64>,
    /// Gateway RSS after the hold, KiB.
    pub gateway_rss_after_kb: Option<u64>,
    /// (after − before) / connections, bytes.
    pub gateway_rss_per_conn_bytes: Option<i64>,
    /// `/proc/net/sockstat` TCP mem before, pages (system-wide).
    pub kernel_sockstat_mem_pages_before: Option<u64>,
    /// Same after the hold.
    pub kernel_sockstat_mem_pages_after: Option<u64>,
    /// Kernel TCP memory delta per connection (both ends), bytes.
    pub kernel_mem_per_conn_bytes: Option<i64>,
    /// Load generator RSS after the hold, KiB.
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
            "conns: {} connections held ({} failed), {:.0} logins/s",
            self.connections, self.failed, self.connect_rate_per_sec
        )?;
        if let Some(err) = &self.first_error {
            writeln!(f, "  first error: {err}")?;
        }
        writeln!(
            f,
            "  login latency: p50 {} µs, p99 {} µs, max {} µs",
            self.login_p50_us, self.login_p99_us, self.login_max_us
        )?;
        writeln!(
            f,
            "  gateway RSS: {} KiB -> {} KiB after {} s idle = {} B per connection{}",
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
            "  kernel TCP mem: {} -> {} pages = {} B per connection (both ends)",
            opt(&self.kernel_sockstat_mem_pages_before),
            opt(&self.kernel_sockstat_mem_pages_after),
            opt(&self.kernel_mem_per_conn_bytes)
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

/// Runs the scenario, printing progress to stderr and the summary (and JSON) to stdout.
pub async fn run(args: ConnsArgs) -> Result<ConnsReport, BenchError> {
    let report = measure(&args).await?;
    println!("{report}");
    if args.json {
        println!("{}", report.to_json());
    }
    Ok(report)
}

async fn measure(args: &ConnsArgs) -> Result<ConnsReport, BenchError> {
    if args.connections == 0 || args.rate == 0 {
        return Err(BenchError::Args(
            "connections and rate must be positive".into(),
        ));
    }
    if args.source_addrs.is_empty() {
        return Err(BenchError::Args(
            "at least one source address is needed".into(),
        ));
    }
    let fd_limit =
        rlimit::increase_nofile_limit(u64::MAX).map_err(BenchError::io("raise RLIMIT_NOFILE"))?;
    let in_process = args.gateway_pid == Some(std::process::id());
    // An in-process gateway holds the server end of every connection too.
    let per_conn = if in_process { 2 } else { 1 };
    let max = usize::try_from(fd_limit.saturating_sub(FD_MARGIN) / per_conn)
        .unwrap_or(usize::MAX)
        .min(MAX_CONNECTIONS_PER_PROCESS);
    if args.connections > max {
        return Err(BenchError::TooManyConnections {
            requested: args.connections,
            max,
        });
    }

    // The stack: given, or started here (dropped at the end, which stops it).
    let (stack, endpoint, signer, gateway_pid) = match args.endpoint {
        Some(endpoint) => {
            let key = args.key.as_deref().ok_or_else(|| {
                BenchError::Args("--key (token signing key) is required with --endpoint".into())
            })?;
            let signer = TokenSigner::from_file(key)
                .map_err(|e| BenchError::Setup(format!("signing key: {e}")))?;
            (None, endpoint, signer, args.gateway_pid)
        }
        None => {
            if args.gateway_pid.is_some() {
                return Err(BenchError::Args(
                    "gateway_pid without endpoint: give both, or neither".into(),
                ));
            }
            let stack = OwnedStack::start(args.key.as_deref()).await?;
            let (endpoint, pid) = (stack.endpoint, stack.gateway.id());
            let signer = stack.signer.clone();
            (Some(stack), endpoint, signer, Some(pid))
        }
    };
    if args
        .source_addrs
        .iter()
        .any(|a| a.is_ipv4() != endpoint.is_ipv4())
    {
        return Err(BenchError::Args(format!(
            "source addresses must be of the endpoint's family ({endpoint})"
        )));
    }

    // Login frames are signed before the timed phase (~20 µs each).
    let frames: Vec<Bytes> = (0..args.connections)
        .map(|i| {
            let did = format!("bench-d{i}");
            let token = signer
                .issue(&args.app, &format!("bench-u{i}"), &did, TOKEN_TTL)
                .map_err(|e| BenchError::Setup(format!("issue token: {e}")))?;
            Ok(Frame::Login(pb::Login {
                token,
                did,
                app: args.app.clone(),
                sdk: "tether-bench".into(),
                ..Default::default()
            })
            .encode())
        })
        .collect::<Result<_, BenchError>>()?;

    tokio::time::sleep(Duration::from_millis(300)).await;
    let rss_before = gateway_pid.and_then(procfs::rss_kb);
    let mem_before = procfs::tcp_mem_pages();

    let (streams, histogram, failed, first_error, elapsed) =
        open_all(frames, endpoint, &args.source_addrs, args.rate).await;
    if streams.is_empty() {
        return Err(BenchError::NoConnections(first_error.unwrap_or_default()));
    }
    let held = streams.len();

    let hold_secs = args.hold_secs.max(MIN_HOLD_SECS);
    eprintln!("holding {held} idle connections for {hold_secs} s");
    tokio::time::sleep(Duration::from_secs(hold_secs)).await;
    let rss_after = gateway_pid.and_then(procfs::rss_kb);
    let mem_after = procfs::tcp_mem_pages();
    let loadgen_rss = procfs::self_rss_kb();

    let per_conn = |before: Option<u64>, after: Option<u64>, unit: i64| {
        let (b, a) = (i64::try_from(before?).ok()?, i64::try_from(after?).ok()?);
        Some((a - b) * unit / i64::try_from(held).ok()?)
    };
    let report = ConnsReport {
        connections: held,
        failed,
        first_error,
        connect_rate_per_sec: held as f64 / elapsed.as_secs_f64().max(1e-9),
        login_p50_us: histogram.value_at_quantile(0.5),
        login_p99_us: histogram.value_at_quantile(0.99),
        login_max_us: histogram.max(),
        gateway_rss_before_kb: rss_before,
        gateway_rss_after_kb: rss_after,
        gateway_rss_per_conn_bytes: per_conn(rss_before, rss_after, 1024),
        kernel_sockstat_mem_pages_before: mem_before,
        kernel_sockstat_mem_pages_after: mem_after,
        kernel_mem_per_conn_bytes: per_conn(mem_before, mem_after, 4096),
        loadgen_rss_kb: loadgen_rss,
        hold_secs,
        gateway_in_process: in_process,
    };
    drop(streams);
    drop(stack);
    Ok(report)
}

type ConnResult = Result<(TcpStream, Duration), String>;

/// Opens every connection, paced at `rate`/s with at most [`IN_FLIGHT`] pending; returns
/// the logged-in streams, the latency histogram (µs), failures, the first error and the
/// time from the first connect to the last LOGIN_ACK.
async fn open_all(
    frames: Vec<Bytes>,
    endpoint: SocketAddr,
    sources: &[IpAddr],
    rate: u32,
) -> (
    Vec<TcpStream>,
    Histogram<u64>,
    usize,
    Option<String>,
    Duration,
) {
    let total = frames.len();
    let (tx, mut rx) = mpsc::unbounded_channel::<ConnResult>();
    let sources: Arc<[IpAddr]> = sources.into();
    let start = Instant::now();
    let launcher = tokio::spawn(async move {
        let in_flight = Arc::new(Semaphore::new(IN_FLIGHT));
        let interval = Duration::from_secs_f64(1.0 / f64::from(rate));
        for (i, frame) in frames.into_iter().enumerate() {
            tokio::time::sleep_until((start + interval.mul_f64(i as f64)).into()).await;
            let Ok(permit) = in_flight.clone().acquire_owned().await else {
                return;
            };
            let source = sources[i % sources.len()];
            let tx = tx.clone();
            tokio::spawn(async move {
                let result = connect_login(source, endpoint, frame).await;
                drop(permit);
                let _ = tx.send(result);
            });
        }
    });

    // 1 µs .. 60 s, 3 significant digits.
    let mut histogram = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)
        .or_else(|_| Histogram::new(3))
        .unwrap_or_else(|_| unreachable!("3 significant figures are valid"));
    let mut streams = Vec::with_capacity(total);
    let (mut failed, mut first_error) = (0usize, None);
    let mut last_done = start;
    let mut tick = tokio::time::interval(Duration::from_millis(250));
    let progress = |done: usize, ok: usize, failed: usize, last_done: Instant| {
        let secs = last_done.duration_since(start).as_secs_f64().max(1e-9);
        eprint!(
            "\rconnected {ok}/{total} ({:.0}/s), failed {failed}   ",
            done as f64 / secs
        );
    };
    while streams.len() + failed < total {
        tokio::select! {
            result = rx.recv() => match result {
                Some(Ok((stream, latency))) => {
                    let us = u64::try_from(latency.as_micros()).unwrap_or(u64::MAX);
                    histogram.saturating_record(us.max(1));
                    streams.push(stream);
                    last_done = Instant::now();
                }
                Some(Err(error)) => {
                    failed += 1;
                    first_error.get_or_insert(error);
                    last_done = Instant::now();
                }
                None => break,
            },
            _ = tick.tick() => progress(streams.len() + failed, streams.len(), failed, Instant::now()),
        }
    }
    progress(streams.len() + failed, streams.len(), failed, last_done);
    eprintln!();
    let _ = launcher.await;
    (
        streams,
        histogram,
        failed,
        first_error,
        last_done.duration_since(start),
    )
}

/// One connection: bind to `source`, connect, send LOGIN, wait for LOGIN_ACK. The read
/// buffer is dropped on return: the held connection is just its `TcpStream`.
async fn connect_login(source: IpAddr, endpoint: SocketAddr, login: Bytes) -> ConnResult {
    let started = Instant::now();
    let attempt = async {
        let socket = if endpoint.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(|e| format!("socket: {e}"))?;
        // Lets many sockets share a source port (the port is picked at connect time).
        // Best effort: without it, each source address gives fewer connections.
        let _ = nix::sys::socket::setsockopt(
            &socket,
            nix::sys::socket::sockopt::IpBindAddressNoPort,
            &true,
        );
        socket
            .bind(SocketAddr::new(source, 0))
            .map_err(|e| format!("bind {source}: {e}"))?;
        let mut stream = socket
            .connect(endpoint)
            .await
            .map_err(|e| format!("connect {endpoint} from {source}: {e}"))?;
        let _ = stream.set_nodelay(true);
        stream
            .write_all(&login)
            .await
            .map_err(|e| format!("write LOGIN: {e}"))?;
        let mut buf = BytesMut::with_capacity(256);
        loop {
            let n = stream
                .read_buf(&mut buf)
                .await
                .map_err(|e| format!("read: {e}"))?;
            if n == 0 {
                return Err("closed before LOGIN_ACK".to_string());
            }
            while let Some(raw) =
                split_frame(&mut buf, DEFAULT_MAX_FRAME_LEN).map_err(|e| format!("frame: {e}"))?
            {
                match Frame::decode(&raw).map_err(|e| format!("frame: {e}"))? {
                    Frame::LoginAck(_) => return Ok(stream),
                    Frame::Error { error, .. } => {
                        return Err(format!("login refused: {} {}", error.code, error.text));
                    }
                    _ => {}
                }
            }
        }
    };
    match tokio::time::timeout(LOGIN_TIMEOUT, attempt).await {
        Ok(Ok(stream)) => Ok((stream, started.elapsed())),
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("no LOGIN_ACK within {LOGIN_TIMEOUT:?}")),
    }
}

/// A nats-server and a `tether gateway` child started for this run; stopped on drop.
struct OwnedStack {
    gateway: ChildGuard,
    endpoint: SocketAddr,
    signer: TokenSigner,
    _nats: NatsServer,
    _dir: tempfile::TempDir,
}

/// Kills and reaps its child on drop.
struct ChildGuard(Child);

impl ChildGuard {
    fn id(&self) -> u32 {
        self.0.id()
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

const HOST: &str = "127.0.0.1";

fn port() -> Result<u16, BenchError> {
    free_port(HOST).map_err(|e| BenchError::Setup(e.to_string()))
}

/// The `tether` binary: `$TETHER_BIN`, this executable if it is `tether`, else
/// `target/{release,debug}/tether` of the workspace.
pub fn locate_tether() -> Result<PathBuf, BenchError> {
    if let Some(path) = std::env::var_os("TETHER_BIN") {
        return Ok(PathBuf::from(path));
    }
    if let Ok(exe) = std::env::current_exe()
        && exe.file_stem().is_some_and(|s| s == "tether")
    {
        return Ok(exe);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    ["release", "debug"]
        .iter()
        .map(|profile| root.join("target").join(profile).join("tether"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            BenchError::Setup(
                "tether binary not found (build it: cargo build --release -p tether, or set TETHER_BIN)"
                    .into(),
            )
        })
}

impl OwnedStack {
    async fn start(key: Option<&Path>) -> Result<OwnedStack, BenchError> {
        let tether = locate_tether()?;
        let dir = tempfile::tempdir().map_err(BenchError::io("temp dir"))?;
        let signer = match key {
            Some(path) => TokenSigner::from_file(path)
                .map_err(|e| BenchError::Setup(format!("signing key: {e}")))?,
            None => TokenSigner::generate(),
        };
        let pub_path = dir.path().join("token.pub");
        let pem = signer
            .verifier()
            .to_pem()
            .map_err(|e| BenchError::Setup(format!("public key pem: {e}")))?;
        std::fs::write(&pub_path, pem).map_err(BenchError::io("write public key"))?;

        // Started on this thread: nats-server dies with the thread that spawned it.
        let nats_bin = locate_binary().map_err(|e| BenchError::Setup(e.to_string()))?;
        let spec = ServerSpec::single("bench", HOST, port()?, port()?, dir.path().join("nats"));
        let nats = NatsServer::start(spec, &nats_bin, Duration::from_secs(30))
            .map_err(|e| BenchError::Setup(format!("nats-server: {e}")))?;

        let endpoint = SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port()?);
        let log_path = dir.path().join("gateway.log");
        let log = File::create(&log_path).map_err(BenchError::io("gateway log"))?;
        let log_err = log.try_clone().map_err(BenchError::io("gateway log"))?;
        let child = Command::new(&tether)
            .arg("gateway")
            .args(["--nats", &nats.client_url(), "--id", "bench"])
            .args(["--tcp", &endpoint.to_string()])
            .args(["--ws", &format!("{HOST}:{}", port()?)])
            .args(["--admin", &format!("{HOST}:{}", port()?)])
            .arg("--token-public-key")
            .arg(&pub_path)
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(BenchError::io(format!("start {}", tether.display())))?;
        let mut gateway = ChildGuard(child);
        eprintln!(
            "started nats-server {} and gateway pid {} ({}) on {endpoint}",
            nats.client_url(),
            gateway.id(),
            tether.display()
        );

        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if let Ok(Some(status)) = gateway.0.try_wait() {
                return Err(BenchError::Setup(format!(
                    "gateway exited ({status}): {}",
                    tail(&log_path)
                )));
            }
            if TcpStream::connect(endpoint).await.is_ok() {
                break;
            }
            if Instant::now() > deadline {
                return Err(BenchError::Setup(format!(
                    "gateway not listening on {endpoint} after 30 s: {}",
                    tail(&log_path)
                )));
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(OwnedStack {
            gateway,
            endpoint,
            signer,
            _nats: nats,
            _dir: dir,
        })
    }
}

fn tail(path: &Path) -> String {
    let mut text = String::new();
    if let Ok(mut f) = File::open(path) {
        let _ = f.read_to_string(&mut text);
    }
    let start = text.len().saturating_sub(2000);
    let start = (start..text.len())
        .find(|&i| text.is_char_boundary(i))
        .unwrap_or(text.len());
    text[start..].to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn report_json_is_one_line() {
        let report = ConnsReport {
            connections: 1,
            failed: 0,
            first_error: None,
            connect_rate_per_sec: 1.0,
            login_p50_us: 1,
            login_p99_us: 2,
            login_max_us: 3,
            gateway_rss_before_kb: Some(1),
            gateway_rss_after_kb: Some(2),
            gateway_rss_per_conn_bytes: Some(1024),
            kernel_sockstat_mem_pages_before: None,
            kernel_sockstat_mem_pages_after: None,
            kernel_mem_per_conn_bytes: None,
            loadgen_rss_kb: Some(5),
            hold_secs: 2,
            gateway_in_process: false,
        };
        let json = report.to_json();
        assert!(!json.contains('\n'));
        assert!(json.contains("\"gateway_rss_per_conn_bytes\":1024"));
        assert!(report.to_string().contains("1024 B per connection"));
    }
}
