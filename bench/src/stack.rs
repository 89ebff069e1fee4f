//! The processes a scenario starts and stops: nats-server, K `tether gateway` children,
//! a `tether state` child, and the peers (nats-server alone, Mosquitto). Everything
//! started here is stopped on drop; a scenario that targets running processes by URL
//! starts nothing.

use std::fs::File;
use std::io::Read;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use tether_auth::TokenSigner;
use tether_nats::server::{NatsServer, ServerSpec, free_port, locate_binary};
use tokio::net::TcpStream;

use crate::client_codec::Proto;
use crate::{BenchError, procfs};

/// The address every started process listens on.
pub const HOST: &str = "127.0.0.1";

/// A free loopback port.
pub fn port() -> Result<u16, BenchError> {
    free_port(HOST).map_err(|e| BenchError::Setup(e.to_string()))
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), port)
}

/// Kills and reaps its child on drop.
pub struct ChildGuard(Child);

impl ChildGuard {
    /// Process id.
    pub fn id(&self) -> u32 {
        self.0.id()
    }

    /// Whether the child has exited.
    pub fn exited(&mut self) -> bool {
        !matches!(self.0.try_wait(), Ok(None))
    }
}

impl Drop for ChildGuard {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

/// The `tether` binary: `$TETHER_BIN`, this executable if it is `tether`, else
/// `target/{release,debug}/tether` of the workspace (or of `$CARGO_TARGET_DIR`).
pub fn locate_tether() -> Result<PathBuf, BenchError> {
    if let Some(path) = std::env::var_os("TETHER_BIN") {
        return Ok(PathBuf::from(path));
    }
    if let Ok(exe) = std::env::current_exe()
        && exe.file_stem().is_some_and(|s| s == "tether")
    {
        return Ok(exe);
    }
    let mut roots = vec![Path::new(env!("CARGO_MANIFEST_DIR")).join("../target")];
    if let Some(dir) = std::env::var_os("CARGO_TARGET_DIR") {
        roots.insert(0, PathBuf::from(dir));
    }
    roots
        .iter()
        .flat_map(|root| ["release", "debug"].map(|p| root.join(p).join("tether")))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            BenchError::Setup(
                "tether binary not found (build it: cargo build --release -p tether, or set TETHER_BIN)"
                    .into(),
            )
        })
}

/// Tries a role gets on fresh ports: a picked free port can be taken by another process
/// before the role binds it.
const PORT_TRIES: usize = 3;

/// Whether the role failed because one of its picked ports was taken meanwhile (start it
/// again on fresh ports).
fn port_taken<T>(result: &Result<T, BenchError>, attempt: usize) -> bool {
    attempt < PORT_TRIES
        && matches!(result, Err(BenchError::Setup(text)) if text.contains("Address already in use"))
}

/// Starts `tether <args>` with its output in `log`, and waits until `ready` accepts TCP.
async fn spawn_role(
    tether: &Path,
    args: &[String],
    envs: &[(&str, &str)],
    log_path: &Path,
    ready: SocketAddr,
) -> Result<ChildGuard, BenchError> {
    let mut command = Command::new(tether);
    command
        .args(args)
        .env("RUST_LOG", "warn")
        .envs(envs.iter().copied());
    let what = format!("tether {}", args.first().map_or("", String::as_str));
    spawn_listening(command, &what, log_path, ready, Duration::from_secs(30)).await
}

/// Starts `command` with its output in `log_path` and waits until `ready` accepts TCP;
/// fails when it exits first or after `timeout` (`what` names it in the error).
async fn spawn_listening(
    mut command: Command,
    what: &str,
    log_path: &Path,
    ready: SocketAddr,
    timeout: Duration,
) -> Result<ChildGuard, BenchError> {
    let log = File::create(log_path).map_err(BenchError::io(format!("{what} log")))?;
    let log_err = log
        .try_clone()
        .map_err(BenchError::io(format!("{what} log")))?;
    let child = command
        .stdin(Stdio::null())
        .stdout(log)
        .stderr(log_err)
        .spawn()
        .map_err(BenchError::io(format!(
            "start {}",
            Path::new(command.get_program()).display()
        )))?;
    let mut guard = ChildGuard(child);
    let deadline = Instant::now() + timeout;
    loop {
        if let Ok(Some(status)) = guard.0.try_wait() {
            return Err(BenchError::Setup(format!(
                "{what} exited ({status}): {}",
                tail(log_path)
            )));
        }
        if TcpStream::connect(ready).await.is_ok() {
            return Ok(guard);
        }
        if Instant::now() > deadline {
            return Err(BenchError::Setup(format!(
                "{what} not listening on {ready} after {} s: {}",
                timeout.as_secs(),
                tail(log_path)
            )));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// A client of the NATS server at `url` (the business side of a scenario, or a client of
/// the nats peer).
pub async fn nats_client(url: &str) -> Result<async_nats::Client, BenchError> {
    async_nats::connect(url)
        .await
        .map_err(|e| BenchError::Setup(format!("nats connection: {e}")))
}

/// One gateway child.
pub struct Gateway {
    child: ChildGuard,
    /// Its command line (after the binary), for a restart by hand-off.
    args: Vec<String>,
    /// Its hand-off socket, when the stack was started with `handoff`.
    pub handoff_socket: Option<PathBuf>,
    /// TCP client listener.
    pub tcp: SocketAddr,
    /// WebSocket client listener (`/ws`).
    pub ws: SocketAddr,
    /// Admin HTTP listener.
    pub admin: SocketAddr,
    /// Log files of the processes that served it, oldest first (a hand-off adds one).
    pub logs: Vec<PathBuf>,
}

impl Gateway {
    /// Process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }
}

/// The roles of a stack as one region of several (docs/multi-region.md): they join a
/// region's nats-server started elsewhere (`crate::regions`), gateways and state name the
/// region, and state peers with the others.
#[derive(Debug, Clone, Default)]
pub struct RegionRoles {
    /// The region's name, also its JetStream domain.
    pub name: String,
    /// The other regions (name = domain): state's `peer_regions`.
    pub peers: Vec<String>,
    /// Client URL of the region's nats-server (this stack starts none).
    pub nats_url: String,
}

/// What to start.
#[derive(Debug, Clone, Default)]
pub struct StackSpec {
    /// Gateway processes (at least 1).
    pub gateways: usize,
    /// Also start a `tether state` process (needed for uplinks and pushes).
    pub state: bool,
    /// Token signing key (private PEM); a fresh one is generated when `None`.
    pub key: Option<PathBuf>,
    /// Also start a `tether ipconfig` process knowing these apps (needed for drains).
    pub ipconfig_apps: Vec<String>,
    /// Give every gateway a hand-off socket (for `Stack::restart_gateway`).
    pub handoff: bool,
    /// Run the roles as one region on its nats-server instead of starting a nats-server.
    pub region: Option<RegionRoles>,
}

/// nats-server, gateways and maybe state, started for one run; stopped on drop (gateways
/// and state first, then nats-server).
pub struct Stack {
    /// The gateway children.
    pub gateways: Vec<Gateway>,
    /// The `tether state` child.
    state: Option<ChildGuard>,
    /// Its admin HTTP listener (`/metrics`).
    pub state_admin: Option<SocketAddr>,
    /// The `tether ipconfig` child.
    ipconfig: Option<ChildGuard>,
    /// Signs device tokens.
    pub signer: TokenSigner,
    /// The private key file (for worker processes).
    pub key_path: PathBuf,
    /// NATS client URL.
    pub nats_url: String,
    nats: Option<NatsServer>,
    _dir: tempfile::TempDir,
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.gateways.clear();
        self.state = None;
        self.ipconfig = None;
        if let Some(mut nats) = self.nats.take() {
            nats.stop();
        }
    }
}

impl Stack {
    /// Starts nats-server (JetStream, in a temp dir), then the roles of `spec`.
    pub async fn start(spec: &StackSpec) -> Result<Stack, BenchError> {
        let tether = locate_tether()?;
        let dir = tempfile::tempdir().map_err(BenchError::io("temp dir"))?;
        let signer = match &spec.key {
            Some(path) => TokenSigner::from_file(path)
                .map_err(|e| BenchError::Setup(format!("signing key: {e}")))?,
            None => TokenSigner::generate(),
        };
        let key_path = dir.path().join("token.key");
        let pub_path = dir.path().join("token.pub");
        let setup = |e: tether_auth::AuthError| BenchError::Setup(format!("key: {e}"));
        std::fs::write(&key_path, signer.to_pem().map_err(setup)?)
            .map_err(BenchError::io("write key"))?;
        std::fs::write(&pub_path, signer.verifier().to_pem().map_err(setup)?)
            .map_err(BenchError::io("write public key"))?;

        let (nats, nats_url) = match &spec.region {
            Some(region) => (None, region.nats_url.clone()),
            None => {
                let nats = start_nats(dir.path().join("nats"))?;
                let url = nats.client_url();
                (Some(nats), url)
            }
        };
        let mut stack = Stack {
            gateways: Vec::new(),
            state: None,
            state_admin: None,
            ipconfig: None,
            signer,
            key_path,
            nats_url: nats_url.clone(),
            nats,
            _dir: dir,
        };
        let dir = stack._dir.path().to_path_buf();
        // Without state nobody registers logins: the gateway answers LOGIN_ACK at once.
        let register = if spec.state { "true" } else { "false" };
        let envs = [
            ("TETHER_GATEWAY_MAX_FRAMES_PER_SEC", "0"),
            ("TETHER_GATEWAY_AWAIT_REGISTRATION", register),
            // The hand-off's phase timings (`tether bench restart` prints them).
            ("RUST_LOG", "warn,tether_gateway::handoff=info"),
        ];
        let mut attempt = 0;
        let mut i = 0;
        while i < spec.gateways.max(1) {
            attempt += 1;
            let (tcp, ws, admin) = (loopback(port()?), loopback(port()?), loopback(port()?));
            // Gateway ids are unique across regions (their subjects may cross).
            let id = match &spec.region {
                Some(region) => format!("{}-bench{i}", region.name),
                None => format!("bench{i}"),
            };
            let args: Vec<String> = [
                "gateway",
                "--nats",
                &nats_url,
                "--id",
                &id,
                "--tcp",
                &tcp.to_string(),
                "--ws",
                &ws.to_string(),
                "--admin",
                &admin.to_string(),
                "--token-public-key",
                &pub_path.display().to_string(),
            ]
            .map(String::from)
            .to_vec();
            let mut args = args;
            if let Some(region) = &spec.region {
                args.extend(["--region".into(), region.name.clone()]);
            }
            let handoff_socket = spec.handoff.then(|| dir.join(format!("gateway{i}.sock")));
            if let Some(path) = &handoff_socket {
                args.extend(["--handoff-socket".into(), path.display().to_string()]);
            }
            let log = dir.join(format!("gateway{i}.log"));
            let child = spawn_role(&tether, &args, &envs, &log, tcp).await;
            if port_taken(&child, attempt) {
                continue;
            }
            let child = child?;
            stack.gateways.push(Gateway {
                child,
                args,
                handoff_socket,
                tcp,
                ws,
                admin,
                logs: vec![log],
            });
            (i, attempt) = (i + 1, 0);
        }
        if spec.state {
            let log = dir.join("state.log");
            let mut attempt = 0;
            let state = loop {
                attempt += 1;
                let admin = loopback(port()?);
                let mut args: Vec<String> =
                    ["state", "--nats", &nats_url, "--admin", &admin.to_string()]
                        .map(String::from)
                        .to_vec();
                if let Some(region) = &spec.region {
                    let config = dir.join("state.toml");
                    std::fs::write(&config, state_region_config(region))
                        .map_err(BenchError::io("state config"))?;
                    args.extend(["--config".into(), config.display().to_string()]);
                }
                let state = spawn_role(&tether, &args, &[], &log, admin).await;
                if !port_taken(&state, attempt) {
                    break (state?, admin);
                }
            };
            (stack.state, stack.state_admin) = (Some(state.0), Some(state.1));
        }
        if !spec.ipconfig_apps.is_empty() {
            let config = dir.join("ipconfig.toml");
            let apps: String = spec
                .ipconfig_apps
                .iter()
                .map(|app| {
                    format!("[[apps]]\nid = \"{app}\"\nsecrets = [\"bench-secret-0123456789\"]\n")
                })
                .collect();
            std::fs::write(&config, apps).map_err(BenchError::io("ipconfig config"))?;
            let key = stack.key_path.display().to_string();
            let log = dir.join("ipconfig.log");
            let mut attempt = 0;
            let ipconfig = loop {
                attempt += 1;
                let (admin, http) = (loopback(port()?), loopback(port()?));
                let args: Vec<String> = [
                    "ipconfig",
                    "--config",
                    &config.display().to_string(),
                    "--nats",
                    &nats_url,
                    "--admin",
                    &admin.to_string(),
                    "--http",
                    &http.to_string(),
                    "--token-key",
                    &key,
                ]
                .map(String::from)
                .to_vec();
                let ipconfig = spawn_role(&tether, &args, &[], &log, http).await;
                if !port_taken(&ipconfig, attempt) {
                    break ipconfig?;
                }
            };
            stack.ipconfig = Some(ipconfig);
        }
        for pid in stack.server_pids() {
            crate::pin::server_process(pid);
        }
        let server = match &spec.region {
            Some(region) => format!("region {} on nats-server {nats_url}:", region.name),
            None => format!("started nats-server {nats_url},"),
        };
        eprintln!(
            "{server} {} gateway(s) (pids {:?}){} from {}",
            stack.gateways.len(),
            stack.gateway_pids(),
            if spec.state { " and state" } else { "" },
            tether.display()
        );
        Ok(stack)
    }

    /// Restarts gateway `i` by hand-off: starts `tether gateway … --takeover <socket>` and
    /// waits until the old process has exited (at most `timeout`); returns how long that
    /// took. The new process is the gateway from then on.
    pub async fn restart_gateway(
        &mut self,
        i: usize,
        timeout: Duration,
    ) -> Result<Duration, BenchError> {
        let tether = locate_tether()?;
        let dir = self._dir.path().to_path_buf();
        let gateway = self
            .gateways
            .get_mut(i)
            .ok_or_else(|| BenchError::Args(format!("no gateway {i}")))?;
        let socket = gateway
            .handoff_socket
            .clone()
            .ok_or_else(|| BenchError::Args("the stack has no hand-off sockets".into()))?;
        let log_path = dir.join(format!("gateway{i}-takeover-{}.log", std::process::id()));
        let log = File::create(&log_path).map_err(BenchError::io("takeover log"))?;
        let log_err = log.try_clone().map_err(BenchError::io("takeover log"))?;
        let started = Instant::now();
        let child = Command::new(&tether)
            .args(&gateway.args)
            .arg("--takeover")
            .arg(&socket)
            .env("TETHER_GATEWAY_MAX_FRAMES_PER_SEC", "0")
            .env("TETHER_GATEWAY_AWAIT_REGISTRATION", "false")
            .env("RUST_LOG", "info")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(log_err)
            .spawn()
            .map_err(BenchError::io("start the takeover process"))?;
        let mut new = ChildGuard(child);
        crate::pin::server_process(new.id());
        loop {
            if gateway.child.exited() {
                break;
            }
            if new.exited() {
                return Err(BenchError::Setup(format!(
                    "the takeover process exited: {}",
                    tail(&log_path)
                )));
            }
            if started.elapsed() > timeout {
                return Err(BenchError::Setup(format!(
                    "the old gateway did not exit within {timeout:?}: {}",
                    tail(&log_path)
                )));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let took = started.elapsed();
        gateway.child = new;
        gateway.logs.push(log_path);
        Ok(took)
    }

    /// Process ids of the gateways.
    /// The process ids of the server side: gateways, state, ipconfig and the nats-server
    /// this stack started.
    pub fn server_pids(&self) -> Vec<u32> {
        let mut pids = self.gateway_pids();
        pids.extend(self.state.as_ref().map(ChildGuard::id));
        pids.extend(self.ipconfig.as_ref().map(ChildGuard::id));
        pids.extend(self.nats.as_ref().and_then(NatsServer::pid));
        pids
    }

    /// The process ids of the gateways.
    pub fn gateway_pids(&self) -> Vec<u32> {
        self.gateways.iter().map(Gateway::pid).collect()
    }

    /// TCP client endpoints of the gateways.
    pub fn tcp_endpoints(&self) -> Vec<SocketAddr> {
        self.gateways.iter().map(|g| g.tcp).collect()
    }

    /// WebSocket endpoints of the gateways.
    pub fn ws_endpoints(&self) -> Vec<SocketAddr> {
        self.gateways.iter().map(|g| g.ws).collect()
    }
}

/// The TOML of a region's state: its region and its peers (name = domain).
fn state_region_config(region: &RegionRoles) -> String {
    let mut text = format!("region = {:?}\n", region.name);
    for peer in &region.peers {
        text += &format!("\n[[peer_regions]]\nname = {peer:?}\ndomain = {peer:?}\n");
    }
    text
}

/// The value of the Prometheus sample `name` (without labels) on the `/metrics` page of
/// the admin listener `admin`.
pub async fn metric(admin: SocketAddr, name: &str) -> Result<f64, BenchError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(admin)
        .await
        .map_err(BenchError::io(format!("connect {admin}")))?;
    stream
        .write_all(format!("GET /metrics HTTP/1.0\r\nHost: {admin}\r\n\r\n").as_bytes())
        .await
        .map_err(BenchError::io("GET /metrics"))?;
    let mut page = String::new();
    tokio::time::timeout(Duration::from_secs(10), stream.read_to_string(&mut page))
        .await
        .map_err(|_| BenchError::Setup(format!("{admin}/metrics did not answer in 10 s")))?
        .map_err(BenchError::io("read /metrics"))?;
    sample(&page, name)
        .ok_or_else(|| BenchError::Setup(format!("no sample {name} on {admin}/metrics")))
}

/// The value of sample `name` (without labels) in a Prometheus text page.
fn sample(page: &str, name: &str) -> Option<f64> {
    page.lines().find_map(|line| {
        let (key, value) = line.split_once(' ')?;
        (key == name).then(|| value.trim().parse().ok()).flatten()
    })
}

/// The lines of `path` that contain `needle`, without terminal colour codes.
pub fn log_lines(path: &Path, needle: &str) -> Vec<String> {
    std::fs::read_to_string(path)
        .map(|text| {
            text.lines()
                .filter(|line| line.contains(needle))
                .map(strip_colours)
                .collect()
        })
        .unwrap_or_default()
}

/// `line` without ANSI escape sequences (`ESC [ … letter`).
fn strip_colours(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' {
            for c in chars.by_ref() {
                if c.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Sum of the RSS of `pids`, KiB (`None` if any cannot be read).
pub fn rss_sum_kb(pids: &[u32]) -> Option<u64> {
    pids.iter().map(|&pid| procfs::rss_kb(pid)).sum()
}

/// Starts the pinned nats-server with JetStream, its store in `store`.
pub fn start_nats(store: PathBuf) -> Result<NatsServer, BenchError> {
    let bin = locate_binary().map_err(|e| BenchError::Setup(e.to_string()))?;
    // A free port can be taken by another process before nats-server binds it: try
    // again with fresh ports, as the test harness does.
    let mut last = None;
    for _ in 0..3 {
        let spec = ServerSpec::single("bench", HOST, port()?, port()?, store.clone());
        match NatsServer::start(spec, &bin, Duration::from_secs(30)) {
            Ok(server) => return Ok(server),
            Err(error) => last = Some(error),
        }
    }
    Err(BenchError::Setup(format!(
        "nats-server: {}",
        last.map_or_else(|| "not started".to_string(), |e| e.to_string())
    )))
}

/// A peer server started for one run: nats-server alone or Mosquitto.
pub struct PeerServer {
    /// Client address.
    pub addr: SocketAddr,
    /// Process id (for RSS).
    pub pid: u32,
    nats: Option<NatsServer>,
    _mosquitto: Option<ChildGuard>,
    _dir: tempfile::TempDir,
}

impl Drop for PeerServer {
    fn drop(&mut self) {
        if let Some(mut nats) = self.nats.take() {
            nats.stop();
        }
    }
}

impl PeerServer {
    /// NATS client URL of a nats peer.
    pub fn nats_url(&self) -> String {
        format!("nats://{}", self.addr)
    }

    /// Starts nats-server alone (JetStream on, for the uplink peer).
    pub fn nats() -> Result<PeerServer, BenchError> {
        let dir = tempfile::tempdir().map_err(BenchError::io("temp dir"))?;
        let server = start_nats(dir.path().join("nats"))?;
        let addr: SocketAddr = server
            .client_url()
            .trim_start_matches("nats://")
            .parse()
            .map_err(|e| BenchError::Setup(format!("nats url: {e}")))?;
        let pid = server
            .pid()
            .ok_or_else(|| BenchError::Setup("nats-server has no pid".into()))?;
        crate::pin::server_process(pid);
        eprintln!("started peer nats-server {addr} (pid {pid})");
        Ok(PeerServer {
            addr,
            pid,
            nats: Some(server),
            _mosquitto: None,
            _dir: dir,
        })
    }

    /// Starts Mosquitto on a free port: no persistence, anonymous, no connection limit,
    /// `allow_duplicate_messages true` (its default duplicate check is quadratic in
    /// subscribers, see the field notes).
    pub async fn mosquitto() -> Result<PeerServer, BenchError> {
        let bin = locate_mosquitto()?;
        let dir = tempfile::tempdir().map_err(BenchError::io("temp dir"))?;
        let addr = loopback(port()?);
        let conf = dir.path().join("mosquitto.conf");
        std::fs::write(
            &conf,
            format!(
                "listener {} {HOST}\nallow_anonymous true\npersistence false\n\
                 max_connections -1\nallow_duplicate_messages true\nlog_dest stderr\n\
                 log_type error\nlog_type warning\n",
                addr.port()
            ),
        )
        .map_err(BenchError::io("write mosquitto.conf"))?;
        let mut command = Command::new(&bin);
        command.arg("-c").arg(&conf);
        let log_path = dir.path().join("mosquitto.log");
        let timeout = Duration::from_secs(15);
        let guard = spawn_listening(command, "mosquitto", &log_path, addr, timeout).await?;
        let pid = guard.id();
        crate::pin::server_process(pid);
        eprintln!("started peer mosquitto {addr} (pid {pid})");
        Ok(PeerServer {
            addr,
            pid,
            nats: None,
            _mosquitto: Some(guard),
            _dir: dir,
        })
    }
}

/// The `mosquitto` broker: `$MOSQUITTO_BIN`, else `mosquitto` in PATH or `/usr/sbin`.
pub fn locate_mosquitto() -> Result<PathBuf, BenchError> {
    if let Some(path) = std::env::var_os("MOSQUITTO_BIN") {
        return Ok(PathBuf::from(path));
    }
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin".into(), "/usr/local/sbin".into()])
        .map(|dir| dir.join("mosquitto"))
        .find(|p| p.is_file())
        .ok_or_else(|| {
            BenchError::Setup(
                "mosquitto not found (make bench-tools installs it: apt-get install mosquitto)"
                    .into(),
            )
        })
}

/// The last 2,000 characters of a log file.
pub fn tail(path: &Path) -> String {
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

/// A running Tether stack to target by URL instead of starting one.
#[derive(Debug, Clone)]
pub struct Running {
    /// NATS URL of the stack (the business side of the scenario connects there).
    pub nats_url: String,
    /// A gateway's TCP client address.
    pub endpoint: SocketAddr,
    /// The gateways' token signing key (private PEM).
    pub key: PathBuf,
}

/// The server side of one run (a started stack or peer, or a running stack); what was
/// started is stopped on drop.
pub struct Target {
    /// Client address.
    pub endpoint: SocketAddr,
    /// Signs Tether tokens (`None` for peers).
    pub signer: Option<TokenSigner>,
    /// NATS URL (Tether's bus, or the nats peer itself).
    pub nats_url: Option<String>,
    _stack: Option<Stack>,
    _peer: Option<PeerServer>,
}

impl Target {
    /// Starts what `proto` needs (for Tether: nats-server, one gateway and state), or
    /// uses `running` for Tether when given.
    pub async fn start(proto: Proto, running: Option<&Running>) -> Result<Target, BenchError> {
        Ok(match (proto, running) {
            (Proto::Tether | Proto::TetherWs, Some(r)) => Target {
                endpoint: r.endpoint,
                signer: Some(
                    TokenSigner::from_file(&r.key)
                        .map_err(|e| BenchError::Setup(format!("signing key: {e}")))?,
                ),
                nats_url: Some(r.nats_url.clone()),
                _stack: None,
                _peer: None,
            },
            (Proto::Tether | Proto::TetherWs, None) => {
                let stack = Stack::start(&StackSpec {
                    gateways: 1,
                    state: true,
                    key: None,
                    ipconfig_apps: Vec::new(),
                    handoff: false,
                    region: None,
                })
                .await?;
                Target {
                    endpoint: stack.tcp_endpoints()[0],
                    signer: Some(stack.signer.clone()),
                    nats_url: Some(stack.nats_url.clone()),
                    _stack: Some(stack),
                    _peer: None,
                }
            }
            (Proto::Nats | Proto::Mqtt, _) => {
                let peer = if proto == Proto::Nats {
                    PeerServer::nats()?
                } else {
                    PeerServer::mosquitto().await?
                };
                Target {
                    endpoint: peer.addr,
                    signer: None,
                    nats_url: (proto == Proto::Nats).then(|| peer.nats_url()),
                    _stack: None,
                    _peer: Some(peer),
                }
            }
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sample_is_read_by_its_exact_name() {
        let page = "# HELP x\ntether_state_relay_out_total 12\ntether_state_relay_in_total 7\n\
                    tether_state_relay_in_total_x 9\nlabelled{a=\"b\"} 3\n";
        assert_eq!(sample(page, "tether_state_relay_in_total"), Some(7.0));
        assert_eq!(sample(page, "tether_state_relay_out_total"), Some(12.0));
        assert_eq!(sample(page, "labelled"), None);
        assert_eq!(sample(page, "missing"), None);
    }

    #[test]
    fn a_region_state_config_names_its_peers() {
        let text = state_region_config(&RegionRoles {
            name: "region-a".into(),
            peers: vec!["region-b".into()],
            nats_url: String::new(),
        });
        assert_eq!(
            text,
            "region = \"region-a\"\n\n[[peer_regions]]\nname = \"region-b\"\ndomain = \"region-b\"\n"
        );
    }

    #[test]
    fn only_a_taken_port_is_tried_again_and_not_forever() {
        let taken: Result<(), BenchError> = Err(BenchError::Setup(
            "tether state exited (exit status: 1): cannot listen on 127.0.0.1:1: Address already in use (os error 98)".into(),
        ));
        assert!(port_taken(&taken, 1));
        assert!(port_taken(&taken, PORT_TRIES - 1));
        assert!(!port_taken(&taken, PORT_TRIES));
        let other: Result<(), BenchError> = Err(BenchError::Setup("bad config".into()));
        assert!(!port_taken(&other, 1));
        assert!(!port_taken(&Ok::<(), BenchError>(()), 1));
    }
}
