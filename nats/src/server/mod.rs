//! A real `nats-server` process: locating the pinned binary, writing its config, starting
//! it, waiting until it is ready, stopping and restarting it.
//!
//! Used by `tether up` (the embedded default) and by [`crate::harness`] in tests. A server
//! started here is killed when its [`NatsServer`] is dropped, and also when the thread that
//! started it dies (Linux parent-death signal), so a crashed test leaves no process behind.

mod config;
mod process;

use std::fs;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::Child;
use std::time::{Duration, Instant};

pub use config::{AccountSpec, ClusterSpec, ServerSpec, UserSpec};

use crate::connect::BusError;

/// Version of nats-server that Tether pins and tests against.
pub const PINNED_VERSION: &str = "2.15.1";

/// Environment variable that points to a nats-server binary, overriding the search.
pub const BINARY_ENV: &str = "TETHER_NATS_SERVER";

/// Finds the pinned nats-server binary.
///
/// Order: `$TETHER_NATS_SERVER`; `.tools/venv/bin/nats-server` in the current directory or
/// any parent; the same next to the running executable's ancestors (e.g. `target/release`);
/// the repository this crate was built from. `make tools` installs it into `.tools/`.
pub fn locate_binary() -> Result<PathBuf, BusError> {
    if let Some(path) = std::env::var_os(BINARY_ENV) {
        let path = PathBuf::from(path);
        return if path.is_file() {
            Ok(path)
        } else {
            Err(BusError::Server(format!(
                "{BINARY_ENV}={} is not a file",
                path.display()
            )))
        };
    }
    let relative = Path::new(".tools/venv/bin/nats-server");
    let mut roots: Vec<PathBuf> = Vec::new();
    if let Ok(cwd) = std::env::current_dir() {
        roots.extend(cwd.ancestors().map(Path::to_path_buf));
    }
    if let Ok(exe) = std::env::current_exe() {
        roots.extend(exe.ancestors().skip(1).map(Path::to_path_buf));
    }
    roots.push(Path::new(env!("CARGO_MANIFEST_DIR")).join(".."));
    roots
        .into_iter()
        .map(|root| root.join(relative))
        .find(|candidate| candidate.is_file())
        .ok_or_else(|| {
            BusError::Server(format!(
                "nats-server {PINNED_VERSION} not found in .tools/ (run `make tools`, or set {BINARY_ENV})"
            ))
        })
}

/// Lowest port [`free_port`] picks from when the kernel's ephemeral range starts above it.
const FIXED_PORTS_FROM: u16 = 20_000;

/// A free TCP port on `host` for a server that binds it a moment later.
///
/// Picked at random *below* the kernel's ephemeral range (`ip_local_port_range`) and checked
/// by binding it: a port from port 0 is ephemeral, so an outgoing connection of any process
/// (tests open thousands) may take it between this check and the server's bind, and the
/// server then fails with "address in use". Falls back to port 0 when the range below the
/// ephemeral one is too small or full.
pub fn free_port(host: &str) -> Result<u16, BusError> {
    let ephemeral_low = ephemeral_range_start().unwrap_or(32_768);
    if ephemeral_low > FIXED_PORTS_FROM + 1_000 {
        let span = u64::from(ephemeral_low - FIXED_PORTS_FROM);
        for _ in 0..64 {
            let port = FIXED_PORTS_FROM + (random_u64() % span) as u16;
            if TcpListener::bind((host, port)).is_ok() {
                return Ok(port);
            }
        }
    }
    TcpListener::bind((host, 0))
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .map_err(|e| BusError::Server(format!("no free port on {host}: {e}")))
}

/// First port of the kernel's ephemeral range, when it can be read.
fn ephemeral_range_start() -> Option<u16> {
    fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// A random number from the standard library's per-process random hash keys.
fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    use std::sync::atomic::{AtomicU64, Ordering};
    static CALLS: AtomicU64 = AtomicU64::new(0);
    let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
    hasher.write_u64(CALLS.fetch_add(1, Ordering::Relaxed));
    hasher.write_u32(std::process::id());
    hasher.finish()
}

/// One nats-server process and what is needed to restart it with the same identity.
#[derive(Debug)]
pub struct NatsServer {
    spec: ServerSpec,
    binary: PathBuf,
    conf_path: PathBuf,
    log_path: PathBuf,
    child: Option<Child>,
}

impl NatsServer {
    /// Writes the config of `spec` into its store dir and starts the process; does not wait
    /// for readiness (see [`NatsServer::wait_ready`]), so cluster peers can start together.
    pub fn spawn(spec: ServerSpec, binary: &Path) -> Result<Self, BusError> {
        fs::create_dir_all(&spec.store_dir)
            .map_err(|e| BusError::Server(format!("create {}: {e}", spec.store_dir.display())))?;
        let conf_path = spec.store_dir.join(format!("{}.conf", spec.name));
        let log_path = spec.store_dir.join(format!("{}.log", spec.name));
        fs::write(&conf_path, spec.config_text())
            .map_err(|e| BusError::Server(format!("write {}: {e}", conf_path.display())))?;
        let mut server = Self {
            spec,
            binary: binary.to_path_buf(),
            conf_path,
            log_path,
            child: None,
        };
        server.start_process()?;
        Ok(server)
    }

    /// Spawns and waits until ready.
    pub fn start(spec: ServerSpec, binary: &Path, timeout: Duration) -> Result<Self, BusError> {
        let mut server = Self::spawn(spec, binary)?;
        server.wait_ready(timeout)?;
        Ok(server)
    }

    fn start_process(&mut self) -> Result<(), BusError> {
        let child = process::spawn(&self.binary, &self.conf_path, &self.log_path)?;
        tracing::info!(server = %self.spec.name, pid = child.id(), url = %self.client_url(), "nats-server started");
        self.child = Some(child);
        Ok(())
    }

    /// The server's name.
    pub fn name(&self) -> &str {
        &self.spec.name
    }

    /// `nats://host:port` for clients.
    pub fn client_url(&self) -> String {
        format!("nats://{}:{}", self.spec.host, self.spec.client_port)
    }

    /// `http://host:port` of the monitoring endpoint.
    pub fn monitor_url(&self) -> String {
        format!("http://{}:{}", self.spec.host, self.spec.http_port)
    }

    /// The spec this server runs with.
    pub fn spec(&self) -> &ServerSpec {
        &self.spec
    }

    /// Process id while running.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    /// Whether the process is alive.
    pub fn is_running(&mut self) -> bool {
        match self.child.as_mut() {
            Some(child) => matches!(child.try_wait(), Ok(None)),
            None => false,
        }
    }

    /// Waits until `/healthz` answers 200 (JetStream ready), or fails with the server's log tail.
    pub fn wait_ready(&mut self, timeout: Duration) -> Result<(), BusError> {
        let deadline = Instant::now() + timeout;
        loop {
            if !self.is_running() {
                return Err(BusError::Server(format!(
                    "{} exited during start; log:\n{}",
                    self.spec.name,
                    self.log_tail()
                )));
            }
            if process::health_ok(&self.spec.host, self.spec.http_port) {
                return Ok(());
            }
            if Instant::now() > deadline {
                return Err(BusError::Server(format!(
                    "{} not ready after {timeout:?}; log:\n{}",
                    self.spec.name,
                    self.log_tail()
                )));
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Stops the process gracefully (SIGTERM, then SIGKILL after 10 s). Idempotent.
    pub fn stop(&mut self) {
        if let Some(child) = self.child.take() {
            let pid = child.id();
            process::terminate(child, Duration::from_secs(10));
            tracing::info!(server = %self.spec.name, pid, "nats-server stopped");
        }
    }

    /// Kills the process at once (SIGKILL), as a crash would. Idempotent.
    pub fn kill(&mut self) {
        if let Some(child) = self.child.take() {
            let pid = child.id();
            process::terminate(child, Duration::ZERO);
            tracing::info!(server = %self.spec.name, pid, "nats-server killed");
        }
    }

    /// Starts the process again with the same ports and store (after stop or kill).
    pub fn restart(&mut self, timeout: Duration) -> Result<(), BusError> {
        self.stop();
        self.start_process()?;
        self.wait_ready(timeout)
    }

    /// The last lines of the server's log, for error messages.
    pub fn log_tail(&self) -> String {
        let text = fs::read_to_string(&self.log_path).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(20)..].join("\n")
    }
}

impl Drop for NatsServer {
    fn drop(&mut self) {
        self.stop();
    }
}
