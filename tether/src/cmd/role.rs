//! `tether gateway|state|ipconfig|ops`: one role per process.

use std::net::SocketAddr;
use std::path::PathBuf;

use anyhow::Context;
use clap::Args;
use serde::Serialize;
use tether_service::{Shutdown, load_config, shutdown};

/// Flags every role takes.
#[derive(Args, Serialize)]
pub struct RoleArgs {
    /// TOML configuration file.
    #[arg(long)]
    #[serde(skip)]
    pub config: Option<PathBuf>,
    /// NATS server URL(s), comma separated.
    #[arg(long = "nats")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nats_url: Option<String>,
    /// Admin HTTP address (`/healthz`, `/metrics`).
    #[arg(long = "admin")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub admin_listen: Option<SocketAddr>,
    /// NATS credentials and TLS (the `[nats]` table).
    #[command(flatten)]
    #[serde(rename = "nats")]
    pub nats: NatsAuthArgs,
}

/// NATS credentials and TLS flags of every role, into the `[nats]` table. A password or
/// token has no flag (it would show in the process list): set `TETHER_NATS_PASSWORD` or
/// `TETHER_NATS_TOKEN`, or put it in the config file.
#[derive(Args, Serialize)]
pub struct NatsAuthArgs {
    /// NATS credentials file (user JWT and nkey seed).
    #[arg(long = "nats-creds", global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creds_file: Option<PathBuf>,
    /// File holding a NATS user nkey seed.
    #[arg(long = "nats-nkey", global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nkey_seed_file: Option<PathBuf>,
    /// NATS user name (password from `TETHER_NATS_PASSWORD` or the config file).
    #[arg(long = "nats-user", global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// PEM file of the CA that signed the NATS server's certificate (makes TLS required).
    #[arg(long = "nats-tls-ca", global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate for mutual TLS with NATS, PEM (with `--nats-tls-key`).
    #[arg(long = "nats-tls-cert", global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// Private key of `--nats-tls-cert`, PEM.
    #[arg(long = "nats-tls-key", global = true)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
}

impl NatsAuthArgs {
    /// The NATS settings of a command without a config file (`tether app`): the shared
    /// `TETHER_NATS_<FIELD>` variables, overridden by these flags.
    pub fn resolve(&self) -> tether_nats::NatsAuth {
        let env = |field: &str| {
            tether_nats::NatsAuth::ENV
                .iter()
                .find(|(_, f)| *f == field)
                .and_then(|(var, _)| std::env::var(var).ok())
                .filter(|value| !value.is_empty())
        };
        let path = |flag: &Option<PathBuf>, field: &str| {
            flag.clone().or_else(|| env(field).map(PathBuf::from))
        };
        tether_nats::NatsAuth {
            creds_file: path(&self.creds_file, "creds_file"),
            nkey_seed_file: path(&self.nkey_seed_file, "nkey_seed_file"),
            user: self.user.clone().or_else(|| env("user")),
            password: env("password"),
            token: env("token"),
            tls_ca_file: path(&self.tls_ca_file, "tls_ca_file"),
            tls_cert_file: path(&self.tls_cert_file, "tls_cert_file"),
            tls_key_file: path(&self.tls_key_file, "tls_key_file"),
            inbox_prefix: env("inbox_prefix"),
        }
    }
}

/// Flags of `tether gateway`.
#[derive(Args, Serialize)]
#[command(
    after_help = "Every gateway setting (TOML field, TETHER_GATEWAY_<FIELD> variable, default) is in docs/configuration.md."
)]
pub struct GatewayArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub common: RoleArgs,
    /// Gateway id (unique in the cluster).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub id: Option<String>,
    /// TCP client listener.
    #[arg(long = "tcp")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tcp_listen: Option<SocketAddr>,
    /// WebSocket client listener (path /ws).
    #[arg(long = "ws")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub ws_listen: Option<SocketAddr>,
    /// Region this gateway serves (ipconfig prefers gateways in the requester's region).
    #[arg(long)]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub region: Option<String>,
    /// Ed25519 public key (PEM) that verifies gateway tokens.
    #[arg(long = "token-public-key")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_public_key: Option<PathBuf>,
    /// Apps this gateway serves, comma separated [default: every app]. Others: wrong_app.
    #[arg(long, value_delimiter = ',', help_heading = "Limits")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub apps: Option<Vec<String>>,
    /// Frames per second one connection may send (token bucket, bursts of twice this; 0 =
    /// no limit); over it: rate_limited + CLOSE [default: 200].
    #[arg(long, help_heading = "Limits")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_frames_per_sec: Option<u32>,
    /// Connections this gateway holds at most; more: too_many_connections [default: 1000000].
    #[arg(long, help_heading = "Limits")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<usize>,
    /// Connections one app may hold on this gateway (0 = no limit) [default: 0].
    #[arg(long, help_heading = "Limits")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections_per_app: Option<usize>,
    /// Frames queued for one connection; a QoS1 DOWN beyond it: slow_consumer + CLOSE, a
    /// QoS0 one is dropped [default: 1024].
    #[arg(long, help_heading = "Limits")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_queued_frames: Option<usize>,
    /// Largest frame accepted from a client, bytes (cap 16 MiB); more: frame_too_large
    /// [default: 65536].
    #[arg(long, help_heading = "Limits")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_frame_len: Option<usize>,
    /// Seconds a new connection has to send LOGIN; then login_timeout [default: 10].
    #[arg(long, help_heading = "Limits")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub login_timeout_secs: Option<u64>,
    /// Seconds of client silence before heartbeat_timeout [default: 660].
    #[arg(long, help_heading = "Limits")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout_secs: Option<u64>,
    /// Seconds without a frame either way before a plain connection goes dormant (no
    /// task, about 300 bytes less); 0 = never [default: 2].
    #[arg(long, help_heading = "Limits")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub dormant_after_secs: Option<u64>,
    /// PING interval announced in LOGIN_ACK, seconds [default: 300].
    #[arg(long, help_heading = "Limits")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub heartbeat_secs: Option<u64>,
    /// Seconds clients get to leave at shutdown (going_away) [default: 5].
    #[arg(long, help_heading = "Limits")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub shutdown_grace_secs: Option<u64>,
    /// Unix socket where this gateway offers its connections to a successor started with
    /// --takeover (restart by hand-off) [default: none, hand-offs disabled].
    #[arg(long = "handoff-socket", help_heading = "Restart by hand-off")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub handoff_socket: Option<PathBuf>,
    /// Take over the listeners and client connections of the gateway (same id) serving
    /// hand-offs on this unix socket, instead of binding listeners; it exits once this
    /// process serves.
    #[arg(long, value_name = "UDS_PATH", help_heading = "Restart by hand-off")]
    #[serde(skip)]
    pub takeover: Option<PathBuf>,
}

/// Flags of `tether ipconfig`.
#[derive(Args, Serialize)]
pub struct IpconfigArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub common: RoleArgs,
    /// Public HTTP address (`GET /v1/endpoints`).
    #[arg(long = "http")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_listen: Option<SocketAddr>,
    /// Ed25519 private key (PEM) that signs gateway tokens.
    #[arg(long = "token-key")]
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token_key: Option<PathBuf>,
}

fn signal_shutdown() -> Shutdown {
    let token = Shutdown::new();
    shutdown::cancel_on_signal(token.clone());
    token
}

/// Runs a gateway until SIGINT/SIGTERM.
pub async fn gateway(args: GatewayArgs) -> anyhow::Result<()> {
    let config: tether_gateway::GatewayConfig =
        load_config(args.common.config.as_deref(), "TETHER_GATEWAY_", &args)?;
    let shutdown = signal_shutdown();
    // This process may start its own successor (control op `restart`) with the same
    // arguments, environment and working directory.
    tether_gateway::restart::allow_reexec(tether_gateway::restart::without_takeover(
        std::env::args_os().skip(1),
    ));
    let running = match &args.takeover {
        Some(path) => tether_gateway::start_with(config, shutdown, Some(path))
            .await
            .with_context(|| format!("takeover through {} failed", path.display()))?,
        None => tether_gateway::start(config, shutdown)
            .await
            .context("gateway failed to start")?,
    };
    running.wait().await;
    Ok(())
}

/// Runs the state role until SIGINT/SIGTERM.
pub async fn state(args: RoleArgs) -> anyhow::Result<()> {
    let config: tether_state::StateConfig =
        load_config(args.config.as_deref(), "TETHER_STATE_", &args)?;
    let running = tether_state::start(config, signal_shutdown())
        .await
        .context("state failed to start")?;
    running.wait().await;
    Ok(())
}

/// Runs the ipconfig role until SIGINT/SIGTERM.
pub async fn ipconfig(args: IpconfigArgs) -> anyhow::Result<()> {
    let config: tether_ipconfig::IpconfigConfig =
        load_config(args.common.config.as_deref(), "TETHER_IPCONFIG_", &args)?;
    let running = tether_ipconfig::start(config, signal_shutdown())
        .await
        .context("ipconfig failed to start")?;
    running.wait().await;
    Ok(())
}

/// Runs the ops role until SIGINT/SIGTERM.
pub async fn ops(args: RoleArgs) -> anyhow::Result<()> {
    let config: tether_ops::OpsConfig = load_config(args.config.as_deref(), "TETHER_OPS_", &args)?;
    let running = tether_ops::start(config, signal_shutdown())
        .await
        .context("ops failed to start")?;
    running.wait().await;
    Ok(())
}
