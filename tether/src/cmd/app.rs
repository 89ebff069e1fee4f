//! `tether app add|list|rotate-secret|remove|credential`: apps (tenants) and their secrets in
//! the `tether_apps` KV bucket, the one place ipconfig reads them from.

use std::path::PathBuf;

use anyhow::Context;
use clap::{Args, Subcommand};
use tether_ipconfig::apps::{AppAdmin, AppRecord, generate_secret};
use tether_ipconfig::{CredentialClaims, sign_hs256};

use super::token::parse_duration;

/// `tether app …`
#[derive(Args)]
pub struct AppArgs {
    /// NATS server URL(s), comma separated.
    #[arg(
        long = "nats",
        env = "TETHER_NATS_URL",
        default_value = "nats://127.0.0.1:4222",
        global = true
    )]
    nats_url: String,
    /// NATS credentials and TLS (also `TETHER_NATS_<FIELD>`, as for the roles).
    #[command(flatten)]
    nats: super::role::NatsAuthArgs,
    #[command(subcommand)]
    command: AppCommand,
}

#[derive(Subcommand)]
enum AppCommand {
    /// Add an app; prints its HS256 secret (generated unless --secret or --public-key).
    Add {
        /// App id (1-64 characters of [A-Za-z0-9_-]).
        id: String,
        /// Use this HS256 secret (at least 16 characters) instead of a generated one.
        #[arg(long)]
        secret: Option<String>,
        /// Ed25519 public key (PEM file) that verifies the app's EdDSA credentials.
        #[arg(long)]
        public_key: Option<PathBuf>,
        /// Dedicated gateway pool (gateways with this name in `pools`); default shared.
        #[arg(long)]
        pool: Option<String>,
        /// Lifetime of this app's gateway tokens, e.g. 10m; default ipconfig's.
        #[arg(long)]
        token_ttl: Option<String>,
        /// Gateway tokens carry the `rooms` right (room cursors at LOGIN).
        #[arg(long)]
        rooms: bool,
    },
    /// List apps (ids, pools, how many secrets and keys; never the secrets).
    List,
    /// Put a new secret first and print it; the previous one stays valid unless --drop-old.
    RotateSecret {
        /// App id.
        id: String,
        /// Keep only the new secret (credentials signed with older ones stop working).
        #[arg(long)]
        drop_old: bool,
    },
    /// Remove an app: ipconfig refuses its credentials from then on.
    Remove {
        /// App id.
        id: String,
    },
    /// Change settings of an app, live (`key=value`; pipeline settings apply on every
    /// gateway and state instance without a restart). Written to the audit log.
    Set {
        /// App id.
        id: String,
        /// `key=value` pairs: pool, rooms, token_ttl_secs, paused, max_connections,
        /// max_msgs_per_sec, max_bytes_per_sec, broadcast_threshold, receipt_mode,
        /// membership_events.
        #[arg(required = true, value_name = "KEY=VALUE")]
        settings: Vec<String>,
    },
    /// Show an app's settings (never its secrets), as JSON.
    Show {
        /// App id.
        id: String,
    },
    /// Print a client credential signed with the app's newest secret, as the app's backend
    /// would (for trying things out).
    Credential {
        /// App id.
        id: String,
        /// User id.
        #[arg(long)]
        uid: String,
        /// Device id.
        #[arg(long)]
        did: String,
        /// Lifetime, e.g. 30s, 15m, 1h, 7d.
        #[arg(long, default_value = "1h")]
        ttl: String,
    },
}

/// Runs `tether app …`.
pub async fn run(args: AppArgs) -> anyhow::Result<()> {
    let client = tether_nats::connect_with(&args.nats_url, "tether-app", &args.nats.resolve())
        .await
        .with_context(|| format!("cannot connect to {}", args.nats_url))?;
    // The bucket exists once any role ran; create the layout here too for a fresh cluster.
    tether_nats::ensure_layout(
        &async_nats::jetstream::new(client.clone()),
        &tether_nats::BusLayout::default(),
    )
    .await?;
    let admin = AppAdmin::open(client.clone()).await?;
    match args.command {
        AppCommand::Set { id, settings } => {
            let changes = parse_settings(&settings)?;
            let js = async_nats::jetstream::new(client);
            let result = admin.set(&id, &changes).await;
            let audit = tether_ops::audit::AuditLog::open(&js, 1).await?;
            audit
                .record(tether_ops::audit::AuditEntry {
                    actor: "cli".into(),
                    op: "app.set".into(),
                    target: id.clone(),
                    params: serde_json::json!(
                        changes
                            .iter()
                            .cloned()
                            .collect::<std::collections::BTreeMap<_, _>>()
                    ),
                    outcome: if result.is_ok() { "ok" } else { "error" }.into(),
                    message: result
                        .as_ref()
                        .err()
                        .map(|e| e.to_string())
                        .unwrap_or_default(),
                    ..Default::default()
                })
                .await?;
            let record = result?;
            println!(
                "{}",
                serde_json::to_string_pretty(&tether_ops::actions::app_json(&record))?
            );
        }
        AppCommand::Show { id } => {
            let record = admin.get(&id).await?;
            println!(
                "{}",
                serde_json::to_string_pretty(&tether_ops::actions::app_json(&record))?
            );
        }
        AppCommand::Add {
            id,
            secret,
            public_key,
            pool,
            token_ttl,
            rooms,
        } => {
            let public_keys = match &public_key {
                Some(path) => vec![
                    std::fs::read_to_string(path)
                        .with_context(|| format!("cannot read {}", path.display()))?,
                ],
                None => Vec::new(),
            };
            let secret = secret.or_else(|| public_key.is_none().then(generate_secret));
            let token_ttl_secs = match token_ttl {
                Some(ttl) => parse_duration(&ttl)?.as_secs(),
                None => 0,
            };
            let record = admin
                .add(AppRecord {
                    id,
                    secrets: secret.iter().cloned().collect(),
                    public_keys,
                    pool,
                    token_ttl_secs,
                    rooms,
                    ..Default::default()
                })
                .await?;
            println!("added app {}", record.id);
            if let Some(secret) = secret {
                println!("secret: {secret}");
            }
        }
        AppCommand::List => {
            let apps = admin.list().await?;
            if apps.is_empty() {
                println!("no apps");
            }
            for app in apps {
                println!(
                    "{}\tpool={}\tsecrets={}\tpublic_keys={}\ttoken_ttl={}",
                    app.id,
                    app.pool.as_deref().unwrap_or("shared"),
                    app.secrets.len(),
                    app.public_keys.len(),
                    match app.token_ttl_secs {
                        0 => "default".to_string(),
                        s => format!("{s}s"),
                    }
                );
            }
        }
        AppCommand::RotateSecret { id, drop_old } => {
            let secret = admin.rotate_secret(&id, drop_old).await?;
            println!("secret: {secret}");
            if !drop_old {
                println!("the previous secret stays valid until the next rotation or --drop-old");
            }
        }
        AppCommand::Remove { id } => {
            admin.remove(&id).await?;
            println!("removed app {id}");
        }
        AppCommand::Credential { id, uid, did, ttl } => {
            let app = admin.get(&id).await?;
            let secret = app
                .secrets
                .first()
                .with_context(|| format!("app {id} has no HS256 secret"))?;
            let exp = tether_auth::unix_now() + parse_duration(&ttl)?.as_secs();
            let claims = CredentialClaims {
                app: id,
                uid,
                did,
                exp,
                iat: Some(tether_auth::unix_now()),
            };
            println!("{}", sign_hs256(secret, &claims)?);
        }
    }
    Ok(())
}

/// Splits `key=value` arguments.
pub fn parse_settings(settings: &[String]) -> anyhow::Result<Vec<(String, String)>> {
    settings
        .iter()
        .map(|pair| {
            pair.split_once('=')
                .map(|(k, v)| (k.trim().to_string(), v.trim().to_string()))
                .filter(|(k, _)| !k.is_empty())
                .with_context(|| format!("{pair:?} is not key=value"))
        })
        .collect()
}

/// The app `tether up` offers out of the box: `demo`, added to the bucket with a generated
/// secret unless it exists. Returns its id.
pub async fn ensure_demo_app(nats_url: &str) -> anyhow::Result<&'static str> {
    const DEMO: &str = "demo";
    let client = tether_nats::connect(nats_url, "tether-up").await?;
    let admin = AppAdmin::open(client).await?;
    match admin.get(DEMO).await {
        Ok(_) => {}
        Err(tether_ipconfig::apps::AppError::NotFound(_)) => {
            admin
                .add(AppRecord {
                    id: DEMO.into(),
                    secrets: vec![generate_secret()],
                    ..Default::default()
                })
                .await?;
        }
        Err(error) => return Err(error.into()),
    }
    Ok(DEMO)
}
