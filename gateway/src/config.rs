//! The gateway's configuration: one struct, every field documented, defaults that work locally.

use std::net::SocketAddr;
use std::path::PathBuf;

use serde::{Deserialize, Serialize};
use tether_schemas::limits;

/// TLS certificate and key (PEM files); when set, both client listeners speak TLS.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct TlsFiles {
    /// Certificate chain, PEM.
    pub cert: PathBuf,
    /// Private key, PEM (PKCS#8, PKCS#1 or SEC1).
    pub key: PathBuf,
}

/// Configuration of one gateway process (`tether gateway`).
///
/// Loaded from defaults, `--config FILE` (TOML), `TETHER_GATEWAY_<FIELD>` environment
/// variables and flags; `TETHER_NATS_URL` sets `nats_url` for every role.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct GatewayConfig {
    /// Gateway id, unique in the cluster; used in subjects (`tether.gw.<id>.down`).
    pub id: String,
    /// NATS server URL(s), comma separated.
    pub nats_url: String,
    /// Credentials and TLS of the NATS connection: the `[nats]` table (`creds_file`,
    /// `nkey_seed_file`, `user`/`password`, `token`, `tls_ca_file`, `tls_cert_file`/
    /// `tls_key_file`, `inbox_prefix`), also `TETHER_NATS_<FIELD>` for every role.
    pub nats: tether_nats::NatsAuth,
    /// Replicas of the streams and buckets this gateway creates if missing (3 on a cluster).
    pub stream_replicas: usize,
    /// Region this gateway serves (reported in events and heartbeats; ipconfig prefers
    /// gateways in the requester's region).
    pub region: String,
    /// Dedicated gateway pools this gateway belongs to (ipconfig offers it only to apps of
    /// these pools); empty means the shared pool.
    pub pools: Vec<String>,
    /// Connections ipconfig may fill this gateway up to; 0 means `max_connections`.
    pub capacity: usize,
    /// TCP endpoint advertised to clients (`host:port`); default: the bound TCP address.
    pub advertise_tcp: Option<String>,
    /// WebSocket URL advertised to clients; default: `ws://<bound ws address>/ws`.
    pub advertise_ws: Option<String>,
    /// Milliseconds between discovery heartbeats into the `tether_gateways` bucket (keep
    /// well below the bucket's 15 s TTL).
    pub heartbeat_interval_ms: u64,
    /// Raw TCP listener for clients; `None` disables it.
    pub tcp_listen: Option<SocketAddr>,
    /// WebSocket listener (path `/ws`); `None` disables it.
    pub ws_listen: Option<SocketAddr>,
    /// Admin HTTP listener: `/healthz`, `/metrics`.
    pub admin_listen: SocketAddr,
    /// Bearer token of the operations routes on the admin listener (`/v1/drain`,
    /// `/v1/migrate`, `/v1/migration`, `/v1/sessions/…`). Empty: they are served only when `admin_listen` is loopback.
    pub admin_token: String,
    /// TLS for both client listeners.
    pub tls: Option<TlsFiles>,
    /// Ed25519 public key (PEM) that verifies gateway tokens.
    pub token_public_key: PathBuf,
    /// Verified tokens remembered, so a device that logs in again with the same token
    /// skips the signature check (its expiry is still checked); 0 turns the cache off.
    pub token_cache_entries: usize,
    /// Apps this gateway serves; empty means every app.
    pub apps: Vec<String>,
    /// Seconds a new connection has to send a valid LOGIN.
    pub login_timeout_secs: u64,
    /// Heartbeat interval announced to clients in LOGIN_ACK.
    pub heartbeat_secs: u64,
    /// LOGIN_ACK waits until state registered the connection (route, user index, token
    /// sessions written), so a push sent after LOGIN_ACK reaches the device; a login not
    /// registered within `registration_timeout_ms` is refused with `unavailable`. Off only
    /// for a gateway running without state (tests of the gateway alone).
    pub await_registration: bool,
    /// How long a login waits for its `conn.up` to be stored and registered.
    pub registration_timeout_ms: u64,
    /// How long an UP is published again while the uplink stream has no leader (a NATS
    /// node died and the stream elects another, 4–9 s) before the device gets UP_ACK
    /// `unavailable`. Keep it well below the devices' ack timeout (10 s in the SDKs).
    pub unavailable_retry_ms: u64,
    /// A logged-in connection silent for this long is closed (`heartbeat_timeout`).
    pub idle_timeout_secs: u64,
    /// A logged-in plain (not TLS) connection with no frame either way for this long goes
    /// dormant: its task and runtime registration are released until input, a frame for
    /// it or a close arrives (about 300 bytes less per idle connection; waking costs ~2
    /// µs). 0 = never.
    pub dormant_after_secs: u64,
    /// Largest frame accepted from a client, in bytes (header included).
    pub max_frame_len: usize,
    /// Frames per second a connection may send (token bucket, burst of twice this); 0 = no limit.
    pub max_frames_per_sec: u32,
    /// Connections this gateway holds at most.
    pub max_connections: usize,
    /// Connections one app may hold on this gateway; 0 = no limit.
    pub max_connections_per_app: usize,
    /// Frames queued for one connection before the slow-consumer policy applies.
    pub max_queued_frames: usize,
    /// Seconds to wait for clients to leave on shutdown before closing the rest.
    pub shutdown_grace_secs: u64,
    /// Upper bound of the random reconnect delay suggested to clients on shutdown.
    pub going_away_retry_ms: u32,
    /// REDIRECTs per second a drain or migration sends by default (the op may say another).
    pub migrate_rate: u32,
    /// Redirected devices on their way at once (sent REDIRECT, not yet gone): a migration
    /// waits below this when the targets log devices in slower than `migrate_rate`.
    pub migrate_window: usize,
    /// Seconds a redirected device has to log in elsewhere before it is closed with
    /// `going_away`.
    pub migrate_timeout_secs: u64,
    /// On SIGTERM/Ctrl-C, seconds to drain (move devices to other gateways by REDIRECT)
    /// before the rest get `going_away`; 0 = no drain, `going_away` at once.
    pub shutdown_drain_secs: u64,
    /// Seconds without a NATS connection after which every device is told `going_away`
    /// (it logs in elsewhere, in another region if this region's NATS is down); 0 = keep
    /// the devices connected however long NATS is away.
    pub nats_lost_close_secs: u64,
    /// Pending connections the kernel queues on each client listener before `accept`
    /// (capped by `net.core.somaxconn`); a login burst beyond it has SYNs dropped and
    /// retried by the clients after 1 s.
    pub listen_backlog: u32,
    /// Unix socket where this gateway offers its sockets to a process started with
    /// `tether gateway --takeover <path>` (restart by hand-off, docs/handoff.md); `None`
    /// disables hand-offs.
    pub handoff_socket: Option<PathBuf>,
    /// Each wait of a hand-off (for the other process's next step, for connections to
    /// stop) is bounded by this; past it the hand-off aborts and the old process keeps
    /// serving.
    pub handoff_timeout_ms: u64,
    /// A process taking over waits this long once prepared (every socket received,
    /// subscriptions confirmed, downlinks held) before it asks to commit: time to check
    /// it before it serves. Keep it well below `handoff_timeout_ms`.
    pub handoff_hold_ms: u64,
    /// File the successor started by the control op `restart` appends its stdout and
    /// stderr to; `None`: it inherits this process's (docs/operations.md, "Rolling restart").
    pub restart_log: Option<PathBuf>,
    /// File this process writes its process id to once it serves (a successor started by
    /// `restart` overwrites it with its own), for supervisors that follow a pid file.
    pub pid_file: Option<PathBuf>,
}

impl Default for GatewayConfig {
    fn default() -> Self {
        Self {
            id: "gw1".into(),
            nats_url: "nats://127.0.0.1:4222".into(),
            nats: tether_nats::NatsAuth::default(),
            stream_replicas: 1,
            region: "local".into(),
            pools: Vec::new(),
            capacity: 0,
            advertise_tcp: None,
            advertise_ws: None,
            heartbeat_interval_ms: 2_000,
            tcp_listen: Some(SocketAddr::from(([127, 0, 0, 1], 7400))),
            ws_listen: Some(SocketAddr::from(([127, 0, 0, 1], 7401))),
            admin_listen: SocketAddr::from(([127, 0, 0, 1], 7402)),
            admin_token: String::new(),
            tls: None,
            token_public_key: PathBuf::from(".tether/token.pub"),
            token_cache_entries: tether_auth::DEFAULT_CACHED_TOKENS,
            apps: Vec::new(),
            login_timeout_secs: limits::DEFAULT_LOGIN_TIMEOUT_SECS,
            heartbeat_secs: limits::DEFAULT_HEARTBEAT_SECS,
            await_registration: true,
            registration_timeout_ms: 10_000,
            unavailable_retry_ms: 4_000,
            idle_timeout_secs: limits::DEFAULT_IDLE_TIMEOUT_SECS,
            dormant_after_secs: 2,
            max_frame_len: limits::DEFAULT_MAX_FRAME_LEN,
            max_frames_per_sec: 200,
            max_connections: 1_000_000,
            max_connections_per_app: 0,
            max_queued_frames: 1024,
            shutdown_grace_secs: 5,
            going_away_retry_ms: 5_000,
            migrate_rate: 1_000,
            migrate_window: 500,
            migrate_timeout_secs: 30,
            shutdown_drain_secs: 30,
            nats_lost_close_secs: 0,
            listen_backlog: 4096,
            handoff_socket: None,
            handoff_timeout_ms: 10_000,
            handoff_hold_ms: 0,
            restart_log: None,
            pid_file: None,
        }
    }
}

impl GatewayConfig {
    /// Connections ipconfig may fill this gateway up to (`capacity`, else `max_connections`).
    pub fn capacity(&self) -> usize {
        match self.capacity {
            0 => self.max_connections,
            n => n.min(self.max_connections),
        }
    }

    /// Checks values that parse but cannot work.
    pub fn validate(&self) -> Result<(), String> {
        if !tether_auth::valid_id(&self.id) {
            return Err(format!(
                "gateway id {:?} must be 1-64 characters of [A-Za-z0-9_-]",
                self.id
            ));
        }
        if self.listen_backlog == 0 || self.listen_backlog > 65_535 {
            return Err("listen_backlog must be between 1 and 65535".into());
        }
        if self.tcp_listen.is_none() && self.ws_listen.is_none() {
            return Err("at least one of tcp_listen and ws_listen must be set".into());
        }
        if self.max_frame_len < limits::FIXED_HEADER_LEN
            || self.max_frame_len > limits::MAX_FRAME_LEN_CAP
        {
            return Err(format!(
                "max_frame_len must be between {} and {}",
                limits::FIXED_HEADER_LEN,
                limits::MAX_FRAME_LEN_CAP
            ));
        }
        if self.login_timeout_secs == 0 || self.idle_timeout_secs == 0 {
            return Err("login_timeout_secs and idle_timeout_secs must be positive".into());
        }
        if self.max_queued_frames == 0 {
            return Err("max_queued_frames must be positive".into());
        }
        if let Some(pool) = self.pools.iter().find(|p| !tether_auth::valid_id(p)) {
            return Err(format!(
                "pool {pool:?} must be 1-64 characters of [A-Za-z0-9_-]"
            ));
        }
        if self.migrate_rate == 0 || self.migrate_timeout_secs == 0 || self.migrate_window == 0 {
            return Err(
                "migrate_rate, migrate_window and migrate_timeout_secs must be positive".into(),
            );
        }
        if self.heartbeat_interval_ms == 0 {
            return Err("heartbeat_interval_ms must be positive".into());
        }
        if self.handoff_timeout_ms == 0 {
            return Err("handoff_timeout_ms must be positive".into());
        }
        if self.handoff_hold_ms >= self.handoff_timeout_ms {
            return Err("handoff_hold_ms must be below handoff_timeout_ms".into());
        }
        if let Some(app) = self.apps.iter().find(|a| !tether_auth::valid_id(a)) {
            return Err(format!(
                "app id {app:?} must be 1-64 characters of [A-Za-z0-9_-]"
            ));
        }
        Ok(())
    }
}
