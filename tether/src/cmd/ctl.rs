//! `tether ctl status|gateways|apps|drain|undrain|migrate|restart|kick|app|audit`: the ops
//! API from the command line (docs/ops-api.md). Tables for people, `--json` for scripts.
//! A refused or failed operation prints the API's error and exits 1.

use std::time::Duration;

use anyhow::{Context, bail};
use clap::{Args, Subcommand};
use serde_json::{Value, json};

/// `tether ctl …`
#[derive(Args)]
pub struct CtlArgs {
    /// The ops API (`tether up` prints it).
    #[arg(
        long = "ops",
        env = "TETHER_OPS_URL",
        default_value = "http://127.0.0.1:7430",
        global = true
    )]
    ops_url: String,
    /// Admin token (or `TETHER_OPS_TOKEN`).
    #[arg(long, env = "TETHER_OPS_TOKEN", global = true, hide_env_values = true)]
    token: Option<String>,
    /// Print the API's JSON instead of a table.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: CtlCommand,
}

#[derive(Subcommand)]
enum CtlCommand {
    /// Totals, gateways, state instances with their partitions, apps.
    Status,
    /// Live gateways with their figures.
    Gateways,
    /// Apps with their connections, message rates and settings.
    Apps,
    /// Live ipconfig instances.
    Ipconfigs,
    /// Drain a gateway: ipconfig stops offering it and its devices move elsewhere.
    Drain {
        /// Gateway id.
        gw: String,
    },
    /// Stop draining a gateway.
    Undrain {
        /// Gateway id.
        gw: String,
    },
    /// Move devices of a gateway to other gateways by REDIRECT.
    Migrate {
        /// Gateway id.
        gw: String,
        /// Only devices of this app (required with --did).
        #[arg(long)]
        app: Option<String>,
        /// These devices (of --app).
        #[arg(long = "did")]
        dids: Vec<String>,
        /// This share of the gateway's devices (0.0-1.0), chosen at random.
        #[arg(long)]
        share: Option<f64>,
        /// Every device (of --app, if given).
        #[arg(long)]
        all: bool,
        /// Target gateway (default: ipconfig ranks one per device).
        #[arg(long = "to")]
        target: Option<String>,
        /// REDIRECTs per second (default the gateway's).
        #[arg(long)]
        rate: Option<u32>,
    },
    /// Where a gateway's drain or migration stands.
    Migration {
        /// Gateway id.
        gw: String,
    },
    /// Rolling restart of gateways by socket hand-off, one after another, each waiting for
    /// the previous one to be healthy; follows it until it ends (exit 1 if it failed).
    Restart {
        /// Gateways, in this order.
        #[arg(required_unless_present = "all", conflicts_with = "all")]
        gateways: Vec<String>,
        /// Every live gateway.
        #[arg(long)]
        all: bool,
    },
    /// Close a device's connection.
    Kick {
        /// App id.
        app: String,
        /// Device id.
        did: String,
        /// Close code sent to the device (default forbidden).
        #[arg(long)]
        code: Option<String>,
    },
    /// An app's settings.
    App {
        #[command(subcommand)]
        command: CtlAppCommand,
    },
    /// The newest audit log entries.
    Audit {
        /// How many.
        #[arg(long, default_value_t = 20)]
        limit: usize,
    },
}

#[derive(Subcommand)]
enum CtlAppCommand {
    /// Show an app's settings.
    Show {
        /// App id.
        app: String,
    },
    /// Change settings live: `key=value` pairs (see `tether app set --help`).
    Set {
        /// App id.
        app: String,
        /// `key=value` pairs.
        #[arg(required = true, value_name = "KEY=VALUE")]
        settings: Vec<String>,
    },
    /// Pause an app: its logins are refused and its connections closed.
    Pause {
        /// App id.
        app: String,
    },
    /// Resume a paused app.
    Resume {
        /// App id.
        app: String,
    },
}

struct Api {
    base: String,
    token: Option<String>,
}

impl Api {
    async fn call(&self, method: &str, path: &str, body: Option<Value>) -> anyhow::Result<Value> {
        let url = format!("{}{path}", self.base.trim_end_matches('/'));
        let body = body.map(|b| b.to_string());
        let answer = tether_ops::http::request(
            method,
            &url,
            self.token.as_deref(),
            body.as_deref().map(str::as_bytes),
            Duration::from_secs(30),
        )
        .await?;
        let value: Value = serde_json::from_slice(&answer.body)
            .with_context(|| format!("{url}: answer is not JSON (status {})", answer.status))?;
        if !(200..300).contains(&answer.status) {
            let message = value["error"]["message"]
                .as_str()
                .unwrap_or("request failed");
            let code = value["error"]["code"].as_str().unwrap_or("error");
            bail!("{} {code}: {message}", answer.status);
        }
        Ok(value)
    }
}

/// Runs `tether ctl …`.
pub async fn run(args: CtlArgs) -> anyhow::Result<()> {
    let api = Api {
        base: args.ops_url,
        token: args.token.filter(|t| !t.is_empty()),
    };
    let (value, table) = match args.command {
        CtlCommand::Status => {
            let v = api.call("GET", "/v1/cluster", None).await?;
            let t = status_table(&v);
            (v, t)
        }
        CtlCommand::Gateways => {
            let v = api.call("GET", "/v1/gateways", None).await?;
            let t = gateways_table(&v);
            (v, t)
        }
        CtlCommand::Apps => {
            let v = api.call("GET", "/v1/apps", None).await?;
            let t = apps_table(&v);
            (v, t)
        }
        CtlCommand::Ipconfigs => {
            let v = api.call("GET", "/v1/ipconfigs", None).await?;
            let t = ipconfigs_table(&v);
            (v, t)
        }
        CtlCommand::Drain { gw } => {
            let v = api
                .call("POST", &format!("/v1/gateways/{gw}/drain"), None)
                .await?;
            (v.clone(), pretty(&v))
        }
        CtlCommand::Undrain { gw } => {
            let v = api
                .call("DELETE", &format!("/v1/gateways/{gw}/drain"), None)
                .await?;
            (v.clone(), pretty(&v))
        }
        CtlCommand::Migrate {
            gw,
            app,
            dids,
            share,
            all,
            target,
            rate,
        } => {
            let request = tether_schemas::bus::MigrateRequest {
                app,
                dids,
                share,
                all,
                target,
                rate,
            };
            let v = api
                .call(
                    "POST",
                    &format!("/v1/gateways/{gw}/migrate"),
                    Some(serde_json::to_value(&request)?),
                )
                .await?;
            (v.clone(), pretty(&v))
        }
        CtlCommand::Migration { gw } => {
            let v = api
                .call("GET", &format!("/v1/gateways/{gw}/migration"), None)
                .await?;
            (v.clone(), pretty(&v))
        }
        CtlCommand::Restart { gateways, all } => {
            let request = if all {
                json!({"all": true})
            } else {
                json!({"gateways": gateways})
            };
            let v = follow_restart(&api, request, !args.json).await?;
            let t = restart_table(&v);
            if let Some(error) = v["error"].as_str() {
                if args.json {
                    println!("{}", serde_json::to_string_pretty(&v)?);
                } else {
                    print!("{t}");
                }
                bail!("rolling restart stopped: {error}");
            }
            (v, t)
        }
        CtlCommand::Kick { app, did, code } => {
            let body = json!({"app": app, "did": did, "code": code});
            let v = api.call("POST", "/v1/kick", Some(body)).await?;
            let t = format!(
                "kicked {app}/{did} on {} (connection {})\n",
                v["gw"].as_str().unwrap_or("?"),
                v["conn"]
            );
            (v, t)
        }
        CtlCommand::App { command } => {
            let v = match command {
                CtlAppCommand::Show { app } => {
                    api.call("GET", &format!("/v1/apps/{app}"), None).await?
                }
                CtlAppCommand::Set { app, settings } => {
                    let set: serde_json::Map<String, Value> =
                        super::app::parse_settings(&settings)?
                            .into_iter()
                            .map(|(k, v)| (k, Value::String(v)))
                            .collect();
                    api.call(
                        "POST",
                        &format!("/v1/apps/{app}"),
                        Some(json!({"set": set})),
                    )
                    .await?
                }
                CtlAppCommand::Pause { app } => {
                    api.call("POST", &format!("/v1/apps/{app}/pause"), None)
                        .await?
                }
                CtlAppCommand::Resume { app } => {
                    api.call("POST", &format!("/v1/apps/{app}/resume"), None)
                        .await?
                }
            };
            (v.clone(), pretty(&v))
        }
        CtlCommand::Audit { limit } => {
            let v = api
                .call("GET", &format!("/v1/audit?limit={limit}"), None)
                .await?;
            let t = audit_table(&v);
            (v, t)
        }
    };
    if args.json {
        println!("{}", serde_json::to_string_pretty(&value)?);
    } else {
        print!("{table}");
    }
    Ok(())
}

/// Starts a rolling restart and polls it until it ends; with `progress`, prints each
/// gateway's step as it changes (stderr). Returns the final status.
async fn follow_restart(api: &Api, request: Value, progress: bool) -> anyhow::Result<Value> {
    let mut status = api.call("POST", "/v1/restart", Some(request)).await?;
    let mut shown: Vec<String> = Vec::new();
    loop {
        if progress {
            for (i, gw) in status["gateways"]
                .as_array()
                .into_iter()
                .flatten()
                .enumerate()
            {
                let line = format!(
                    "{} {} pid {} -> {}",
                    s(&gw["gw"]),
                    s(&gw["step"]),
                    s(&gw["old_pid"]),
                    s(&gw["new_pid"])
                );
                if shown.get(i) != Some(&line) {
                    eprintln!("{line}");
                    if i < shown.len() {
                        shown[i] = line;
                    } else {
                        shown.push(line);
                    }
                }
            }
        }
        if status["running"] != json!(true) {
            return Ok(status);
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
        status = api.call("GET", "/v1/restart", None).await?;
    }
}

/// The gateways of a rolling restart.
fn restart_table(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v["gateways"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|g| {
            vec![
                s(&g["gw"]),
                s(&g["step"]),
                s(&g["old_pid"]),
                s(&g["new_pid"]),
                s(&g["connections_before"]),
                s(&g["moved"]),
                s(&g["connections_after"]),
                s(&g["error"]),
            ]
        })
        .collect();
    table(
        &[
            "GATEWAY",
            "STEP",
            "OLD PID",
            "NEW PID",
            "CONNS BEFORE",
            "MOVED",
            "CONNS AFTER",
            "ERROR",
        ],
        &rows,
    )
}

fn pretty(v: &Value) -> String {
    format!("{}\n", serde_json::to_string_pretty(v).unwrap_or_default())
}

/// Left-aligned columns.
fn table(header: &[&str], rows: &[Vec<String>]) -> String {
    let mut widths: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            if let Some(w) = widths.get_mut(i) {
                *w = (*w).max(cell.len());
            }
        }
    }
    let line = |cells: Vec<String>| {
        let mut out = String::new();
        for (i, cell) in cells.iter().enumerate() {
            let width = widths.get(i).copied().unwrap_or(0);
            out += &format!("{cell:<width$}  ");
        }
        out.trim_end().to_string() + "\n"
    };
    let mut out = line(header.iter().map(|h| h.to_uppercase()).collect());
    for row in rows {
        out += &line(row.clone());
    }
    out
}

fn s(v: &Value) -> String {
    match v {
        Value::String(s) => s.clone(),
        Value::Null => "-".into(),
        other => other.to_string(),
    }
}

fn gateways_table(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|g| {
            vec![
                s(&g["id"]),
                s(&g["region"]),
                format!("{}/{}", s(&g["connections"]), s(&g["capacity"])),
                format!("{:.0}%", g["cpu"].as_f64().unwrap_or(0.0) * 100.0),
                format!("{} MiB", g["mem_bytes"].as_u64().unwrap_or(0) / (1 << 20)),
                format!("{:.1}", g["msgs_in_per_sec"].as_f64().unwrap_or(0.0)),
                format!("{:.1}", g["msgs_out_per_sec"].as_f64().unwrap_or(0.0)),
                if g["draining"].as_bool().unwrap_or(false) {
                    "draining".into()
                } else {
                    "serving".into()
                },
                s(&g["version"]),
            ]
        })
        .collect();
    table(
        &[
            "gateway", "region", "conns", "cpu", "mem", "in/s", "out/s", "state", "version",
        ],
        &rows,
    )
}

fn apps_table(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|a| {
            let p = &a["pipeline"];
            let limit = |k: &str| p[k].as_u64().map_or("-".into(), |n| n.to_string());
            vec![
                s(&a["id"]),
                s(&a["connections"]),
                format!("{:.1}", a["msgs_in_per_sec"].as_f64().unwrap_or(0.0)),
                format!("{:.1}", a["msgs_out_per_sec"].as_f64().unwrap_or(0.0)),
                if p["paused"].as_bool().unwrap_or(false) {
                    "paused".into()
                } else {
                    "active".into()
                },
                a["pool"].as_str().unwrap_or("shared").to_string(),
                limit("max_connections"),
                limit("max_msgs_per_sec"),
                limit("max_bytes_per_sec"),
                limit("broadcast_threshold"),
            ]
        })
        .collect();
    table(
        &[
            "app",
            "conns",
            "in/s",
            "out/s",
            "state",
            "pool",
            "max_conns",
            "max_msgs/s",
            "max_bytes/s",
            "bcast_thr",
        ],
        &rows,
    )
}

fn ipconfigs_table(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|i| {
            vec![
                s(&i["id"]),
                s(&i["region"]),
                s(&i["http"]),
                s(&i["gateways"]),
                s(&i["apps"]),
                s(&i["requests"]),
                s(&i["version"]),
            ]
        })
        .collect();
    table(
        &[
            "ipconfig", "region", "http", "gateways", "apps", "requests", "version",
        ],
        &rows,
    )
}

fn status_table(v: &Value) -> String {
    let t = &v["totals"];
    let mut out = format!(
        "connections {} of {} capacity, {:.1} msgs/s in, {:.1} out\n\n",
        s(&t["connections"]),
        s(&t["capacity"]),
        t["msgs_in_per_sec"].as_f64().unwrap_or(0.0),
        t["msgs_out_per_sec"].as_f64().unwrap_or(0.0)
    );
    out += &gateways_table(&v["gateways"]);
    out += "\n";
    let states: Vec<Vec<String>> = v["states"]
        .as_array()
        .into_iter()
        .flatten()
        .map(|st| {
            let parts: Vec<String> = st["partitions"]
                .as_array()
                .into_iter()
                .flatten()
                .map(s)
                .collect();
            vec![s(&st["id"]), parts.len().to_string(), parts.join(",")]
        })
        .collect();
    out += &table(&["state", "count", "partitions"], &states);
    out += "\n";
    out += &apps_table(&v["apps"]);
    out += "\n";
    out += &ipconfigs_table(&v["ipconfigs"]);
    if let Some(servers) = v["nats"]["servers"].as_array() {
        out += "\n";
        let rows: Vec<Vec<String>> = servers
            .iter()
            .map(|n| {
                vec![
                    s(&n["url"]),
                    s(&n["name"]),
                    s(&n["version"]),
                    s(&n["connections"]),
                    format!("{} KiB", n["js_storage"].as_u64().unwrap_or(0) / 1024),
                    n["error"].as_str().unwrap_or("").to_string(),
                ]
            })
            .collect();
        out += &table(
            &["nats", "name", "version", "conns", "js_storage", "error"],
            &rows,
        );
    }
    out
}

fn audit_table(v: &Value) -> String {
    let rows: Vec<Vec<String>> = v
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            vec![
                s(&e["at_ms"]),
                s(&e["actor"]),
                s(&e["op"]),
                s(&e["target"]),
                s(&e["outcome"]),
                e["message"].as_str().unwrap_or("").to_string(),
            ]
        })
        .collect();
    table(
        &["at_ms", "actor", "op", "target", "outcome", "message"],
        &rows,
    )
}
