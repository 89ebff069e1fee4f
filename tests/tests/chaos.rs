//! The chaos suite (issue 13): Tether's roles as real `tether` processes on a 3-node NATS
//! cluster (streams and buckets with 3 replicas), steady QoS1 traffic both ways, one
//! fault per scenario, and a row of figures per scenario:
//!
//! - **sent**: UPs sent by devices + QoS1 pushes requested by the business;
//! - **acked**: UP_ACK code 0 received by the device + pushes whose reply accepted the
//!   device;
//! - **delivered**: distinct message ids the app saw (the business for UPs, the device
//!   for pushes);
//! - **lost**: acknowledged but never delivered after the fault healed and a drain period;
//! - **dup**: message ids delivered to the app more than once (counted by id; bodies are
//!   never de-duplicated before counting);
//! - **recovery**: from the fault to the moment every device has had a successful
//!   end-to-end message (an acknowledged UP or a delivered push, sent after the fault).
//!
//! The big runs are `#[ignore]` (`make chaos`); three small versions run in `make test`.
//! Nothing here asserts a timing: waits are generous and only the loss of acknowledged
//! messages is asserted, where the current code keeps it.

#![allow(missing_docs, clippy::unwrap_used)]

use std::collections::{HashMap, HashSet};
use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tether_auth::TokenSigner;
use tether_business::{Business, Push, UplinkReply};
use tether_client::{Client, ClientConfig, ClientError, Endpoint, Event};
use tether_nats::harness::{self, Cluster};
use tokio::time::Instant;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const APP: &str = "chaos";
/// Generous: how long a role or a device may take to come up on a busy 2-core machine.
const START_WAIT: Duration = Duration::from_secs(90);

// ---------------------------------------------------------------------------------------
// Role processes
// ---------------------------------------------------------------------------------------

fn free_addr() -> SocketAddr {
    tether_nats::harness::free_addr().expect("free loopback port")
}

/// The `tether` binary: `$TETHER_BIN`, else `target/debug/tether` of the workspace (built
/// with `cargo build -p tether` when missing).
fn tether_bin() -> PathBuf {
    if let Some(path) = std::env::var_os("TETHER_BIN") {
        return PathBuf::from(path);
    }
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bin = target.join("debug").join("tether");
    if !bin.is_file() {
        let cargo = option_env!("CARGO").unwrap_or("cargo");
        let status = Command::new(cargo)
            .args(["build", "-p", "tether"])
            .current_dir(&root)
            .status()
            .expect("cargo build -p tether");
        assert!(status.success(), "cargo build -p tether failed");
    }
    bin
}

/// One role process (`tether <role> …`), killed and reaped when dropped (also on panic).
struct Role {
    name: String,
    bin: PathBuf,
    args: Vec<String>,
    envs: Vec<(String, String)>,
    admin: SocketAddr,
    log: PathBuf,
    child: Option<Child>,
}

impl Role {
    fn spawn(
        bin: &Path,
        name: &str,
        args: Vec<String>,
        envs: Vec<(String, String)>,
        admin: SocketAddr,
        log_dir: &Path,
    ) -> Role {
        let mut role = Role {
            name: name.into(),
            bin: bin.into(),
            args,
            envs,
            admin,
            log: log_dir.join(format!("{name}.log")),
            child: None,
        };
        role.start();
        role
    }

    fn start(&mut self) {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.log)
            .expect("role log");
        let err = log.try_clone().expect("role log");
        let child = Command::new(&self.bin)
            .args(&self.args)
            .args(["--admin", &self.admin.to_string()])
            .envs(self.envs.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(err)
            .spawn()
            .expect("tether role starts");
        eprintln!("chaos: {} started (pid {})", self.name, child.id());
        self.child = Some(child);
    }

    /// Waits until the admin listener accepts connections and the process still runs a
    /// moment later. A role that exits while starting (a JetStream request timing out
    /// while the cluster elects leaders) is started again, as a supervisor would.
    async fn ready(&mut self) {
        let deadline = Instant::now() + START_WAIT;
        let mut attempts = 0;
        loop {
            if let Some(child) = self.child.as_mut()
                && let Ok(Some(status)) = child.try_wait()
            {
                attempts += 1;
                assert!(
                    attempts < 5,
                    "{} exited ({status}): {}",
                    self.name,
                    self.log_tail()
                );
                eprintln!(
                    "chaos: {} exited while starting ({status}); again",
                    self.name
                );
                self.child = None;
                tokio::time::sleep(Duration::from_secs(1)).await;
                self.start();
                continue;
            }
            if tokio::net::TcpStream::connect(self.admin).await.is_ok() {
                tokio::time::sleep(Duration::from_secs(2)).await;
                if let Some(child) = self.child.as_mut()
                    && let Ok(None) = child.try_wait()
                {
                    return;
                }
                continue;
            }
            assert!(
                Instant::now() < deadline,
                "{} not ready: {}",
                self.name,
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }

    /// SIGKILL: no drain, no lease release, no goodbye.
    fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            eprintln!("chaos: kill -9 {} (pid {})", self.name, child.id());
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Sends `signal` (`STOP`, `CONT`) with kill(1).
    fn signal(&self, signal: &str) {
        if let Some(child) = self.child.as_ref() {
            eprintln!("chaos: kill -{signal} {} (pid {})", self.name, child.id());
            let _ = Command::new("kill")
                .arg(format!("-{signal}"))
                .arg(child.id().to_string())
                .status();
        }
    }

    async fn restart(&mut self) {
        self.kill9();
        self.start();
        self.ready().await;
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let start = text.len().saturating_sub(3000);
        let start = (start..text.len())
            .find(|&i| text.is_char_boundary(i))
            .unwrap_or(text.len());
        text[start..].to_string()
    }

    async fn metric(&self, name: &str) -> Option<f64> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut stream = tokio::net::TcpStream::connect(self.admin).await.ok()?;
        stream
            .write_all(b"GET /metrics HTTP/1.0\r\n\r\n")
            .await
            .ok()?;
        let mut text = String::new();
        stream.read_to_string(&mut text).await.ok()?;
        text.lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' '))
            .and_then(|v| v.trim().parse().ok())
    }
}

impl Drop for Role {
    fn drop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// The whole deployment: 3 NATS nodes, 2 gateways, 2 state instances, ipconfig, ops.
/// Roles are declared before the cluster, so they stop first.
struct Stack {
    gateways: Vec<Role>,
    gateway_tcp: Vec<SocketAddr>,
    states: Vec<Role>,
    ipconfig: Role,
    ops: Role,
    signer: TokenSigner,
    business_client: async_nats::Client,
    cluster: Cluster,
    _dir: tempfile::TempDir,
}

impl Stack {
    async fn start() -> Stack {
        // On the test's own thread: the harness ties the servers' lives to the thread
        // that started them (a blocking-pool thread would take them down when it idles).
        let cluster = tokio::task::block_in_place(harness::cluster3).expect("3-node cluster");
        let url = cluster.client_url();
        wait_jetstream_r3(&url).await;
        let dir = tempfile::Builder::new()
            .prefix("tether-chaos-")
            .tempdir()
            .expect("temp dir");
        eprintln!("chaos: role logs in {}", dir.path().display());
        let signer = TokenSigner::generate();
        let public = dir.path().join("token.pub");
        let private = dir.path().join("token.key");
        std::fs::write(&public, signer.verifier().to_pem().expect("pem")).expect("key");
        std::fs::write(&private, signer.to_pem().expect("pem")).expect("key");
        let bin = tether_bin();
        let env = |role: &str, pairs: &[(&str, &str)]| -> Vec<(String, String)> {
            let mut envs = vec![(format!("TETHER_{role}_STREAM_REPLICAS"), "3".to_string())];
            envs.extend(
                pairs
                    .iter()
                    .map(|(k, v)| (format!("TETHER_{role}_{k}"), (*v).to_string())),
            );
            envs
        };
        let nats = |role: &str| vec![role.to_string(), "--nats".into(), url.clone()];

        // ops first: it creates the streams and buckets with 3 replicas.
        let mut ops = Role::spawn(
            &bin,
            "ops",
            nats("ops"),
            env("OPS", &[]),
            free_addr(),
            dir.path(),
        );
        ops.ready().await;
        let mut states = Vec::new();
        // The instance lock lets a restarted instance take its own leases back at once
        // (RELIABILITY.md, "Taking over a dead incarnation"), as a supervised deployment would.
        let locks = dir.path().join("instance-locks");
        std::fs::create_dir_all(&locks).expect("lock dir");
        let locks = locks.display().to_string();
        for name in ["state-a", "state-b"] {
            states.push(Role::spawn(
                &bin,
                name,
                nats("state"),
                env(
                    "STATE",
                    &[
                        ("INSTANCE_ID", name),
                        ("LEASE_TTL_MS", "2000"),
                        ("INSTANCE_LOCK_DIR", locks.as_str()),
                        ("RETRANSMIT_MS", "1000"),
                        ("RECONNECT_WINDOW_MS", "3000"),
                        ("BUSINESS_TIMEOUT_MS", "2000"),
                    ],
                ),
                free_addr(),
                dir.path(),
            ));
        }
        let mut gateways = Vec::new();
        let mut gateway_tcp = Vec::new();
        for name in ["gw-a", "gw-b"] {
            let tcp = free_addr();
            let mut args = nats("gateway");
            args.extend([
                "--id".into(),
                name.into(),
                "--tcp".into(),
                tcp.to_string(),
                "--ws".into(),
                free_addr().to_string(),
                "--token-public-key".into(),
                public.display().to_string(),
            ]);
            gateways.push(Role::spawn(
                &bin,
                name,
                args,
                // No per-connection rate limit: a reconnect burst resends many UPs at once.
                env(
                    "GATEWAY",
                    &[
                        ("MAX_FRAMES_PER_SEC", "0"),
                        ("HEARTBEAT_INTERVAL_MS", "1000"),
                    ],
                ),
                free_addr(),
                dir.path(),
            ));
            gateway_tcp.push(tcp);
        }
        let mut args = nats("ipconfig");
        args.extend([
            "--http".into(),
            free_addr().to_string(),
            "--token-key".into(),
            private.display().to_string(),
        ]);
        let mut ipconfig = Role::spawn(
            &bin,
            "ipconfig",
            args,
            env("IPCONFIG", &[]),
            free_addr(),
            dir.path(),
        );
        for role in states.iter_mut().chain(gateways.iter_mut()) {
            role.ready().await;
        }
        ipconfig.ready().await;
        let business_client = tether_nats::connect(&url, "chaos-business")
            .await
            .expect("business connects");
        let mut stack = Stack {
            gateways,
            gateway_tcp,
            states,
            ipconfig,
            ops,
            signer,
            business_client,
            cluster,
            _dir: dir,
        };
        stack.wait_partitions_shared().await;
        stack
    }

    /// Waits until both state instances hold a share of the partitions (starting again
    /// an instance that exited).
    async fn wait_partitions_shared(&mut self) {
        let deadline = Instant::now() + START_WAIT;
        loop {
            for state in &mut self.states {
                if state
                    .child
                    .as_mut()
                    .is_some_and(|c| c.try_wait().ok().flatten().is_some())
                {
                    eprintln!("chaos: {} exited: {}", state.name, state.log_tail());
                    state.restart().await;
                }
            }
            let mut owned = Vec::new();
            for state in &self.states {
                owned.push(state.metric("tether_state_partitions").await.unwrap_or(0.0));
            }
            if owned.iter().all(|n| *n > 0.0) && owned.iter().sum::<f64>() >= 32.0 {
                eprintln!("chaos: partitions owned {owned:?}");
                return;
            }
            if Instant::now() > deadline {
                eprintln!("chaos: partitions never shared: {owned:?}; going on");
                for state in &self.states {
                    eprintln!("chaos: {} log:\n{}", state.name, state.log_tail());
                }
                return;
            }
            tokio::time::sleep(Duration::from_millis(200)).await;
        }
    }

    fn token(&self, did: &str) -> String {
        self.signer
            .issue(
                APP,
                &format!("u-{did}"),
                did,
                Duration::from_secs(24 * 3600),
            )
            .expect("token")
    }

    /// The role logs' warnings and errors (the evidence of a row with losses).
    fn log_excerpt(&self, lines: usize) -> String {
        let mut out = String::new();
        let roles = self
            .gateways
            .iter()
            .chain(&self.states)
            .chain([&self.ipconfig, &self.ops]);
        for role in roles {
            let text = std::fs::read_to_string(&role.log).unwrap_or_default();
            let picked: Vec<&str> = text
                .lines()
                .filter(|l| l.contains("WARN") || l.contains("ERROR"))
                .collect();
            if picked.is_empty() {
                continue;
            }
            out.push_str(&format!(
                "--- {} ({} warn/error lines, last {lines}):\n",
                role.name,
                picked.len()
            ));
            for line in picked.iter().rev().take(lines).rev() {
                out.push_str(line);
                out.push('\n');
            }
        }
        out
    }
}

/// Waits until the fresh cluster creates the bus layout with 3 replicas (the meta leader
/// is elected and every node takes part), so the roles do not time out starting.
async fn wait_jetstream_r3(url: &str) {
    let deadline = Instant::now() + START_WAIT;
    let layout = tether_nats::BusLayout {
        replicas: 3,
        ..Default::default()
    };
    loop {
        let error = match tether_nats::connect(url, "chaos-setup").await {
            Ok(client) => {
                let js = async_nats::jetstream::new(client);
                match tether_nats::ensure_layout(&js, &layout).await {
                    Ok(()) => return,
                    Err(error) => error.to_string(),
                }
            }
            Err(error) => error.to_string(),
        };
        assert!(
            Instant::now() < deadline,
            "JetStream R3 never ready: {error}"
        );
        eprintln!("chaos: JetStream not ready yet ({error})");
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
}

// ---------------------------------------------------------------------------------------
// Traffic and the ledger
// ---------------------------------------------------------------------------------------

/// Everything sent, acknowledged and delivered, by message id.
#[derive(Default)]
struct Ledger {
    up_sent: AtomicU64,
    up_failed: Mutex<HashMap<String, u64>>,
    /// (did, client_msg_id) of UPs answered UP_ACK code 0.
    up_acked: Mutex<HashSet<(String, u64)>>,
    /// (did, msg_id) → times the business was called with it.
    up_delivered: Mutex<HashMap<(String, u64), u32>>,
    push_sent: AtomicU64,
    push_failed: Mutex<HashMap<String, u64>>,
    /// (did, push number) of pushes whose reply accepted the device.
    push_acked: Mutex<HashSet<(String, u64)>>,
    /// (did, push number) → times the device's app got it.
    push_delivered: Mutex<HashMap<(String, u64), u32>>,
    /// When each push was requested (for the recovery time).
    push_sent_at: Mutex<HashMap<u64, Instant>>,
    /// When the fault was injected.
    fault_at: Mutex<Option<Instant>>,
    /// Per device: the first end-to-end success of a message sent after the fault.
    first_ok: Mutex<HashMap<String, Instant>>,
    in_flight: AtomicU64,
}

impl Ledger {
    fn success(&self, did: &str, sent_at: Instant) {
        let Some(fault) = *self.fault_at.lock().unwrap() else {
            return;
        };
        if sent_at >= fault {
            self.first_ok
                .lock()
                .unwrap()
                .entry(did.to_string())
                .or_insert_with(Instant::now);
        }
    }

    fn fail(map: &Mutex<HashMap<String, u64>>, why: String) {
        *map.lock().unwrap().entry(why).or_default() += 1;
    }
}

/// Devices: SDK clients, each with a task reading its events into the ledger.
struct Devices {
    clients: Vec<Client>,
    dids: Vec<String>,
    reconnects: Arc<AtomicU64>,
}

impl Devices {
    /// Connects `count` devices named `<prefix><n>`; even ones prefer gw-a, odd ones gw-b.
    async fn connect(stack: &Stack, ledger: &Arc<Ledger>, prefix: &str, count: usize) -> Self {
        use futures::StreamExt;
        let reconnects = Arc::new(AtomicU64::new(0));
        let connected = futures::stream::iter(0..count)
            .map(|i| {
                let did = format!("{prefix}{i}");
                let mut endpoints: Vec<Endpoint> =
                    stack.gateway_tcp.iter().map(Endpoint::tcp).collect();
                if i % 2 == 1 {
                    endpoints.reverse();
                }
                let mut config = ClientConfig::new(endpoints, APP, did.clone(), stack.token(&did));
                config.reconnect.min = Duration::from_millis(100);
                config.reconnect.max = Duration::from_millis(1000);
                config.ack_timeout = Duration::from_secs(20);
                config.connect_timeout = Duration::from_secs(10);
                // An app in the foreground: a link silent for two intervals (4 s) is given
                // up and the device moves to the other gateway (the paused-gateway row).
                config.heartbeat = Some(Duration::from_secs(2));
                let ledger = ledger.clone();
                let reconnects = reconnects.clone();
                async move {
                    let mut attempt = 0;
                    let (client, events) = loop {
                        match Client::connect(config.clone()).await {
                            Ok(ok) => break ok,
                            Err(error) => {
                                attempt += 1;
                                assert!(attempt < 20, "{did} never connected: {error}");
                                tokio::time::sleep(Duration::from_millis(200)).await;
                            }
                        }
                    };
                    tokio::spawn(device_events(did.clone(), events, ledger, reconnects));
                    (client, did)
                }
            })
            .buffered(64)
            .collect::<Vec<_>>()
            .await;
        let (clients, dids) = connected.into_iter().unzip();
        Devices {
            clients,
            dids,
            reconnects,
        }
    }
}

async fn device_events(
    did: String,
    mut events: tokio::sync::mpsc::Receiver<Event>,
    ledger: Arc<Ledger>,
    reconnects: Arc<AtomicU64>,
) {
    let mut connects = 0u64;
    while let Some(event) = events.recv().await {
        match event {
            Event::Message { body, .. } => {
                let Some(n) = std::str::from_utf8(&body)
                    .ok()
                    .and_then(|b| b.strip_prefix('p'))
                    .and_then(|n| n.parse::<u64>().ok())
                else {
                    continue;
                };
                *ledger
                    .push_delivered
                    .lock()
                    .unwrap()
                    .entry((did.clone(), n))
                    .or_default() += 1;
                let sent_at = ledger.push_sent_at.lock().unwrap().get(&n).copied();
                if let Some(sent_at) = sent_at {
                    ledger.success(&did, sent_at);
                }
            }
            Event::Connected { .. } => {
                connects += 1;
                if connects > 1 {
                    reconnects.fetch_add(1, Ordering::Relaxed);
                }
            }
            _ => {}
        }
    }
}

/// The business: stores uplinks idempotently (counting every call by (did, msg_id)).
fn serve_business(business: &Business, ledger: &Arc<Ledger>) -> tokio::task::JoinHandle<()> {
    let serving = business.clone();
    let ledger = ledger.clone();
    tokio::spawn(async move {
        let _ = serving
            .serve_uplinks("chaos-biz", move |uplink| {
                let ledger = ledger.clone();
                async move {
                    *ledger
                        .up_delivered
                        .lock()
                        .unwrap()
                        .entry((uplink.did.clone(), uplink.msg_id))
                        .or_default() += 1;
                    UplinkReply::stored(Some(format!("{}:{}", uplink.did, uplink.msg_id)))
                }
            })
            .await;
    })
}

/// Steady traffic: `rate` messages per second, half UPs from the devices round robin,
/// half QoS1 pushes to them round robin, until `stop`.
fn start_traffic(
    devices: &Devices,
    business: &Business,
    ledger: &Arc<Ledger>,
    rate: u32,
    stop: &Arc<AtomicBool>,
) -> Vec<tokio::task::JoinHandle<()>> {
    let period = Duration::from_secs_f64(2.0 / f64::from(rate.max(2)));
    let ups = {
        let clients = devices.clients.clone();
        let dids = devices.dids.clone();
        let ledger = ledger.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let i = (n as usize) % clients.len();
                n += 1;
                let sending = clients[i].send(Bytes::from(format!("u{n}")));
                let did = dids[i].clone();
                let ledger = ledger.clone();
                ledger.up_sent.fetch_add(1, Ordering::Relaxed);
                ledger.in_flight.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let sent_at = Instant::now();
                    match sending.await {
                        Ok(ack) => {
                            ledger
                                .up_acked
                                .lock()
                                .unwrap()
                                .insert((did.clone(), ack.client_msg_id));
                            ledger.success(&did, sent_at);
                        }
                        Err(error) => Ledger::fail(&ledger.up_failed, up_error(&error)),
                    }
                    ledger.in_flight.fetch_sub(1, Ordering::Relaxed);
                });
            }
        })
    };
    let pushes = {
        let dids = devices.dids.clone();
        let business = business.clone();
        let ledger = ledger.clone();
        let stop = stop.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            let mut n = 0u64;
            while !stop.load(Ordering::Relaxed) {
                tick.tick().await;
                let did = dids[(n as usize) % dids.len()].clone();
                n += 1;
                let business = business.clone();
                let ledger = ledger.clone();
                ledger.push_sent.fetch_add(1, Ordering::Relaxed);
                ledger.in_flight.fetch_add(1, Ordering::Relaxed);
                ledger
                    .push_sent_at
                    .lock()
                    .unwrap()
                    .insert(n, Instant::now());
                tokio::spawn(async move {
                    // One request, no retry: a push without an answer is not acknowledged.
                    let push = Push::to_dids([did.clone()], format!("p{n}").into_bytes());
                    match business.push(push).await {
                        Ok(reply) if reply.accepted.iter().any(|a| a.did == did) => {
                            ledger.push_acked.lock().unwrap().insert((did, n));
                        }
                        Ok(reply) => Ledger::fail(
                            &ledger.push_failed,
                            format!("not accepted (offline {})", reply.offline.len()),
                        ),
                        Err(error) => Ledger::fail(&ledger.push_failed, push_error(&error)),
                    }
                    ledger.in_flight.fetch_sub(1, Ordering::Relaxed);
                });
            }
        })
    };
    vec![ups, pushes]
}

fn up_error(error: &ClientError) -> String {
    match error {
        ClientError::Rejected(code, _) => format!("rejected {code}"),
        ClientError::Timeout => "timeout".into(),
        ClientError::Closed => "closed".into(),
        other => format!("{other}"),
    }
}

/// The error's first 60 characters with device ids replaced by `devN`, so one cause is one
/// line of the report whatever device it hit.
fn push_error(error: &tether_business::BusinessError) -> String {
    let full = error.to_string();
    let mut text = String::new();
    let mut chars = full.chars().take(60).peekable();
    while let Some(c) = chars.next() {
        text.push(c);
        if text.ends_with("dev") && chars.peek().is_some_and(char::is_ascii_digit) {
            while chars.next_if(char::is_ascii_digit).is_some() {}
            text.push('N');
        }
    }
    text
}

// ---------------------------------------------------------------------------------------
// Scenarios
// ---------------------------------------------------------------------------------------

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Fault {
    KillGateway,
    KillState,
    KillIpconfig,
    KillOps,
    KillNatsNode,
    RestartNatsNode,
    PauseGateway,
    StateRestartDuringStorm,
}

impl fmt::Display for Fault {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Fault::KillGateway => "kill -9 gateway (1 of 2)",
            Fault::KillState => "kill -9 state (1 of 2)",
            Fault::KillIpconfig => "kill -9 ipconfig (restarted after 5 s)",
            Fault::KillOps => "kill -9 ops (restarted after 5 s)",
            Fault::KillNatsNode => "kill -9 NATS node (1 of 3)",
            Fault::RestartNatsNode => "NATS node restart (down 5 s)",
            Fault::PauseGateway => "gateway paused (SIGSTOP 10 s)",
            Fault::StateRestartDuringStorm => "state restart in reconnect storm",
        })
    }
}

struct Plan {
    fault: Fault,
    /// Devices under steady traffic.
    devices: usize,
    /// Messages per second, both directions together.
    rate: u32,
    /// Traffic before the fault.
    warmup: Duration,
    /// Traffic after the fault (healing included).
    after: Duration,
    /// Idle devices that join the reconnect storm (StateRestartDuringStorm).
    storm: usize,
    /// Longest wait for outstanding deliveries once the traffic stopped.
    drain: Duration,
}

impl Plan {
    fn small(fault: Fault) -> Plan {
        Plan {
            fault,
            devices: 20,
            rate: 100,
            warmup: Duration::from_secs(5),
            after: Duration::from_secs(15),
            storm: 0,
            drain: Duration::from_secs(40),
        }
    }

    fn big(fault: Fault) -> Plan {
        Plan {
            fault,
            devices: 200,
            rate: 500,
            warmup: Duration::from_secs(10),
            after: Duration::from_secs(20),
            storm: if fault == Fault::StateRestartDuringStorm {
                2_000
            } else {
                0
            },
            drain: Duration::from_secs(45),
        }
    }
}

/// One row of figures.
#[derive(Debug, Clone)]
struct Row {
    scenario: String,
    up_sent: u64,
    push_sent: u64,
    up_acked: usize,
    push_acked: usize,
    up_delivered: usize,
    push_delivered: usize,
    up_lost: usize,
    push_lost: usize,
    up_dup: usize,
    push_dup: usize,
    recovery: Option<Duration>,
    devices_recovered: usize,
    devices: usize,
    reconnects: u64,
    up_failed: HashMap<String, u64>,
    push_failed: HashMap<String, u64>,
    lost_examples: Vec<String>,
}

impl Row {
    fn lost(&self) -> usize {
        self.up_lost + self.push_lost
    }

    fn header() -> &'static str {
        "| scenario | sent (up+push) | acked | delivered | lost | dup | recovery |\n\
         |---|---|---|---|---|---|---|"
    }

    fn line(&self) -> String {
        let recovery = match self.recovery {
            Some(d) if self.devices_recovered == self.devices => {
                format!("{:.1} s", d.as_secs_f64())
            }
            Some(d) => format!(
                "{:.1} s ({}/{} devices)",
                d.as_secs_f64(),
                self.devices_recovered,
                self.devices
            ),
            None => "never".into(),
        };
        format!(
            "| {} | {} ({}+{}) | {} ({}+{}) | {} ({}+{}) | {} ({}+{}) | {} ({}+{}) | {} |",
            self.scenario,
            self.up_sent + self.push_sent,
            self.up_sent,
            self.push_sent,
            self.up_acked + self.push_acked,
            self.up_acked,
            self.push_acked,
            self.up_delivered + self.push_delivered,
            self.up_delivered,
            self.push_delivered,
            self.lost(),
            self.up_lost,
            self.push_lost,
            self.up_dup + self.push_dup,
            self.up_dup,
            self.push_dup,
            recovery
        )
    }
}

async fn run(plan: Plan) -> Row {
    let mut stack = Stack::start().await;
    let ledger = Arc::new(Ledger::default());
    let business = Business::new(stack.business_client.clone(), APP).with_concurrency(256);
    let serving = serve_business(&business, &ledger);
    let devices = Devices::connect(&stack, &ledger, "dev", plan.devices).await;
    let storm = if plan.storm > 0 {
        Some(Devices::connect(&stack, &ledger, "idle", plan.storm).await)
    } else {
        None
    };
    eprintln!(
        "chaos: {} devices (+{} idle) connected; traffic {} msgs/s",
        plan.devices, plan.storm, plan.rate
    );
    let stop = Arc::new(AtomicBool::new(false));
    let traffic = start_traffic(&devices, &business, &ledger, plan.rate, &stop);
    tokio::time::sleep(plan.warmup).await;

    let fault_at = Instant::now();
    *ledger.fault_at.lock().unwrap() = Some(fault_at);
    eprintln!("chaos: fault: {}", plan.fault);
    inject(&mut stack, plan.fault).await;
    let elapsed = fault_at.elapsed();
    tokio::time::sleep(plan.after.saturating_sub(elapsed)).await;

    stop.store(true, Ordering::Relaxed);
    for task in traffic {
        let _ = task.await;
    }
    // Drain: outstanding sends end (ack or timeout), then deliveries settle.
    let deadline = Instant::now() + plan.drain;
    while ledger.in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut quiet_since = Instant::now();
    let mut last = (0, 0);
    while Instant::now() < deadline {
        let now = (
            ledger.up_delivered.lock().unwrap().len(),
            ledger.push_delivered.lock().unwrap().len(),
        );
        if now != last {
            last = now;
            quiet_since = Instant::now();
        }
        let lost = lost(&ledger);
        if lost.is_empty() || quiet_since.elapsed() > Duration::from_secs(15) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }

    let row = figures(&plan, &ledger, &devices, fault_at);
    println!("{}", Row::header());
    println!("{}", row.line());
    println!(
        "chaos: {}: reconnects {}, UP failures {:?}, push failures {:?}",
        row.scenario, row.reconnects, row.up_failed, row.push_failed
    );
    if row.lost() > 0 || row.up_dup + row.push_dup > 0 {
        println!(
            "chaos: {}: lost examples {:?}\n{}",
            row.scenario,
            row.lost_examples,
            stack.log_excerpt(15)
        );
    }
    for client in devices
        .clients
        .iter()
        .chain(storm.iter().flat_map(|s| &s.clients))
    {
        drop(tokio::time::timeout(Duration::from_secs(2), client.close()).await);
    }
    serving.abort();
    drop(stack);
    row
}

/// Acknowledged messages not delivered: "u <did> <id>" / "p <did> <n>".
fn lost(ledger: &Ledger) -> Vec<String> {
    let mut lost = Vec::new();
    let delivered = ledger.up_delivered.lock().unwrap();
    for key in ledger.up_acked.lock().unwrap().iter() {
        if !delivered.contains_key(key) {
            lost.push(format!("u {} {}", key.0, key.1));
        }
    }
    let delivered = ledger.push_delivered.lock().unwrap();
    for key in ledger.push_acked.lock().unwrap().iter() {
        if !delivered.contains_key(key) {
            lost.push(format!("p {} {}", key.0, key.1));
        }
    }
    lost.sort();
    lost
}

fn figures(plan: &Plan, ledger: &Ledger, devices: &Devices, fault_at: Instant) -> Row {
    let lost = lost(ledger);
    let first_ok = ledger.first_ok.lock().unwrap();
    let recovery = devices
        .dids
        .iter()
        .filter_map(|did| first_ok.get(did))
        .map(|t| t.saturating_duration_since(fault_at))
        .max();
    let up_delivered = ledger.up_delivered.lock().unwrap();
    let push_delivered = ledger.push_delivered.lock().unwrap();
    Row {
        scenario: plan.fault.to_string(),
        up_sent: ledger.up_sent.load(Ordering::Relaxed),
        push_sent: ledger.push_sent.load(Ordering::Relaxed),
        up_acked: ledger.up_acked.lock().unwrap().len(),
        push_acked: ledger.push_acked.lock().unwrap().len(),
        up_delivered: up_delivered.len(),
        push_delivered: push_delivered.len(),
        up_lost: lost.iter().filter(|l| l.starts_with('u')).count(),
        push_lost: lost.iter().filter(|l| l.starts_with('p')).count(),
        up_dup: up_delivered.values().filter(|n| **n > 1).count(),
        push_dup: push_delivered.values().filter(|n| **n > 1).count(),
        recovery,
        devices_recovered: devices
            .dids
            .iter()
            .filter(|did| first_ok.contains_key(*did))
            .count(),
        devices: devices.dids.len(),
        reconnects: devices.reconnects.load(Ordering::Relaxed),
        up_failed: ledger.up_failed.lock().unwrap().clone(),
        push_failed: ledger.push_failed.lock().unwrap().clone(),
        lost_examples: lost.into_iter().take(10).collect(),
    }
}

async fn inject(stack: &mut Stack, fault: Fault) {
    match fault {
        Fault::KillGateway => stack.gateways[0].kill9(),
        Fault::KillState => stack.states[0].kill9(),
        Fault::KillIpconfig => {
            stack.ipconfig.kill9();
            tokio::time::sleep(Duration::from_secs(5)).await;
            stack.ipconfig.restart().await;
        }
        Fault::KillOps => {
            stack.ops.kill9();
            tokio::time::sleep(Duration::from_secs(5)).await;
            stack.ops.restart().await;
        }
        Fault::KillNatsNode => stack.cluster.kill(0),
        Fault::RestartNatsNode => {
            stack.cluster.kill(0);
            tokio::time::sleep(Duration::from_secs(5)).await;
            tokio::task::block_in_place(|| stack.cluster.restart(0)).expect("node restarts");
        }
        Fault::PauseGateway => {
            stack.gateways[0].signal("STOP");
            tokio::time::sleep(Duration::from_secs(10)).await;
            stack.gateways[0].signal("CONT");
        }
        Fault::StateRestartDuringStorm => {
            // Every device of gw-a reconnects to gw-b at once while a state instance dies
            // and comes back.
            stack.gateways[0].kill9();
            tokio::time::sleep(Duration::from_millis(200)).await;
            stack.states[0].kill9();
            tokio::time::sleep(Duration::from_secs(1)).await;
            stack.states[0].restart().await;
        }
    }
}

// ---------------------------------------------------------------------------------------
// Small versions (make test)
// ---------------------------------------------------------------------------------------

/// Traffic flowed both ways and every acknowledged message reached the app.
fn assert_no_loss(row: &Row) {
    assert!(
        row.up_acked > 0 && row.push_acked > 0,
        "no traffic was acknowledged: {}",
        row.line()
    );
    assert_eq!(
        row.lost(),
        0,
        "acknowledged but lost: {:?} ({})",
        row.lost_examples,
        row.line()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_kill_gateway_loses_no_acknowledged_message() -> TestResult {
    let row = run(Plan::small(Fault::KillGateway)).await;
    assert_no_loss(&row);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_kill_one_of_two_states_loses_no_acknowledged_message() -> TestResult {
    let row = run(Plan::small(Fault::KillState)).await;
    assert_no_loss(&row);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn small_kill_one_of_three_nats_nodes_loses_no_acknowledged_message() -> TestResult {
    let row = run(Plan::small(Fault::KillNatsNode)).await;
    assert_no_loss(&row);
    Ok(())
}

// ---------------------------------------------------------------------------------------
// The big runs (make chaos): figures only, printed as a table row each.
// ---------------------------------------------------------------------------------------

async fn big(fault: Fault) -> TestResult {
    let row = run(Plan::big(fault)).await;
    println!("CHAOS-ROW {}", row.line());
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "chaos suite: make chaos"]
async fn chaos_1_kill_gateway() -> TestResult {
    big(Fault::KillGateway).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "chaos suite: make chaos"]
async fn chaos_2_kill_state() -> TestResult {
    big(Fault::KillState).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "chaos suite: make chaos"]
async fn chaos_3_kill_ipconfig() -> TestResult {
    big(Fault::KillIpconfig).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "chaos suite: make chaos"]
async fn chaos_4_kill_ops() -> TestResult {
    big(Fault::KillOps).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "chaos suite: make chaos"]
async fn chaos_5_kill_nats_node() -> TestResult {
    big(Fault::KillNatsNode).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "chaos suite: make chaos"]
async fn chaos_6_restart_nats_node() -> TestResult {
    big(Fault::RestartNatsNode).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "chaos suite: make chaos"]
async fn chaos_7_pause_gateway() -> TestResult {
    big(Fault::PauseGateway).await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "chaos suite: make chaos"]
async fn chaos_8_state_restart_during_reconnect_storm() -> TestResult {
    big(Fault::StateRestartDuringStorm).await
}
