//! `tether bench suite` (what `make bench` runs): every scenario at the sizes of
//! BENCHMARKS.md, Tether and its peers, then `results.json`, `table.md` and the charts
//! in the output folder. `quick` runs the same at tiny sizes (the smoke test). Every
//! scenario runs through [`scenario::run`], under the name it has in the table.

use std::path::PathBuf;

use serde_json::{Value, json};

use crate::BenchError;
use crate::chart::{BarChart, Group};
use crate::client_codec::Proto;
use crate::compare::{self, Comparison};
use crate::conns::ConnsArgs;
use crate::fanout::FanoutArgs;
use crate::p2p::P2pArgs;
use crate::scenario::{self, CommonArgs, Scenario, parse_peer, source_range};
use crate::uplink::UplinkArgs;

/// Arguments of the suite.
#[derive(Debug, Clone, clap::Args)]
pub struct SuiteArgs {
    /// Output folder (results.json, table.md, PNG charts).
    #[arg(long, default_value = "docs/bench")]
    pub out: PathBuf,
    /// Tiny sizes: checks that everything runs.
    #[arg(long)]
    pub quick: bool,
    /// Peers (default nats and mosquitto).
    #[arg(long = "peer", value_delimiter = ',', value_parser = parse_peer, default_values = ["nats", "mosquitto"])]
    pub peers: Vec<Proto>,
    /// First 127.0.0.x source address (each run takes fresh ones after it).
    #[arg(long, default_value_t = 100)]
    pub first_source: u16,
    /// Only these scenarios (conns, conns_ws, conns_multi, fanout, p2p, p2p_1k, uplink).
    #[arg(long, value_delimiter = ',')]
    pub only: Vec<String>,
    /// Pin the server side and the load generator to different CPUs (`SERVER/LOAD`, as
    /// each scenario's `--pin`).
    #[arg(long, value_name = "SERVER/LOAD")]
    pub pin: Option<crate::pin::Pinning>,
}

/// Hands out fresh source addresses run after run (and the pinning to every scenario).
struct Sources(u16, Option<crate::pin::Pinning>);

impl Sources {
    /// The flags of one scenario: `n` fresh source addresses for each of its `runs`
    /// (Tether, then each peer), and `peers`.
    fn common(&mut self, n: u16, runs: usize, peers: &[Proto]) -> CommonArgs {
        let sources = source_range(self.0, n);
        self.0 += n * runs as u16;
        CommonArgs {
            sources,
            peers: peers.to_vec(),
            pin: self.1.clone(),
            ..CommonArgs::default()
        }
    }
}

/// The comparisons of the suite so far.
struct Results<'a> {
    only: &'a [String],
    done: Vec<Comparison>,
}

impl Results<'_> {
    /// Runs `scenario` under `name` (unless `--only` leaves it out); a failure is
    /// recorded with its error.
    async fn run<S: Scenario>(&mut self, name: &str, scenario: &S) {
        if !self.only.is_empty() && !self.only.iter().any(|o| o == name) {
            return;
        }
        match scenario::run(scenario).await {
            Ok(ran) => self.done.push(Comparison {
                scenario: name.into(),
                ..ran.comparison
            }),
            Err(e) => {
                eprintln!("suite: {name} failed: {e}");
                self.done.push(Comparison {
                    scenario: name.into(),
                    params: json!({}),
                    outcomes: vec![compare::failed("tether", &e)],
                });
            }
        }
    }
}

/// Runs the suite; returns the comparisons (a failed scenario is recorded with its error).
pub async fn run(args: SuiteArgs) -> Result<Vec<Comparison>, BenchError> {
    std::fs::create_dir_all(&args.out).map_err(BenchError::io("create output folder"))?;
    let q = args.quick;
    let (peers, runs) = (&args.peers[..], 1 + args.peers.len());
    let mut src = Sources(args.first_source.max(2), args.pin.clone());
    let mut results = Results {
        only: &args.only,
        done: Vec::new(),
    };

    let one = ConnsArgs {
        connections: if q { 50 } else { 19_500 },
        rate: if q { 1_000 } else { 10_000 },
        hold_secs: if q { 2 } else { 5 },
        common: src.common(4, runs, peers),
        ..ConnsArgs::default()
    };
    results.run("conns", &one).await;

    let ws = ConnsArgs {
        ws: true,
        common: src.common(4, 1, &[]),
        ..one
    };
    results.run("conns_ws", &ws).await;

    let many = ConnsArgs {
        connections: if q { 200 } else { 100_000 },
        rate: if q { 1_000 } else { 20_000 },
        hold_secs: if q { 2 } else { 5 },
        gateways: if q { 2 } else { 6 },
        workers: Some(if q { 2 } else { 6 }),
        common: src.common(8, 1, &[]),
        ..ConnsArgs::default()
    };
    results.run("conns_multi", &many).await;

    let fan = FanoutArgs {
        members: if q { 20 } else { 10_000 },
        messages: if q { 5 } else { 100 },
        rate: if q { 10 } else { 20 },
        common: src.common(2, runs, peers),
        ..FanoutArgs::default()
    };
    results.run("fanout", &fan).await;

    let pp = P2pArgs {
        pairs: if q { 4 } else { 100 },
        rate: if q { 200 } else { 10_000 },
        duration_secs: if q { 1.0 } else { 10.0 },
        common: src.common(1, runs, peers),
        ..P2pArgs::default()
    };
    results.run("p2p", &pp).await;

    // The same at a rate Tether sustains on this box, for its latency without a backlog.
    let slow = P2pArgs {
        pairs: if q { 2 } else { 100 },
        rate: if q { 100 } else { 1_000 },
        common: src.common(1, runs, peers),
        ..pp
    };
    if !q {
        results.run("p2p_1k", &slow).await;
    }

    let up = UplinkArgs {
        devices: if q { 4 } else { 50 },
        window: if q { 4 } else { 32 },
        duration_secs: if q { 1.0 } else { 10.0 },
        common: src.common(1, runs, peers),
        ..UplinkArgs::default()
    };
    results.run("uplink", &up).await;

    write_outputs(&args, &results.done)?;
    Ok(results.done)
}

fn write_outputs(args: &SuiteArgs, results: &[Comparison]) -> Result<(), BenchError> {
    let json = json!({
        "quick": args.quick,
        "machine": machine(),
        "results": results.iter().map(Comparison::to_json).collect::<Vec<Value>>(),
    });
    let text = serde_json::to_string_pretty(&json).map_err(|e| BenchError::Setup(e.to_string()))?;
    std::fs::write(args.out.join("results.json"), text).map_err(BenchError::io("results.json"))?;
    let table = markdown_table(results, &args.peers);
    std::fs::write(args.out.join("table.md"), &table).map_err(BenchError::io("table.md"))?;
    println!("\n{table}");
    charts(args, results)?;
    eprintln!(
        "suite: wrote {}/results.json, table.md and charts",
        args.out.display()
    );
    Ok(())
}

fn machine() -> Value {
    let cpus = std::thread::available_parallelism().map_or(0, |n| n.get());
    let mem_kb = std::fs::read_to_string("/proc/meminfo").ok().and_then(|m| {
        m.lines()
            .find_map(|l| l.strip_prefix("MemTotal:"))
            .and_then(|r| r.split_whitespace().next()?.parse::<u64>().ok())
    });
    let kernel = std::fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    json!({ "cpus": cpus, "mem_kb": mem_kb, "kernel": kernel.trim() })
}

/// The table of BENCHMARKS.md: one row per figure, Tether, each peer and the ratio.
pub fn markdown_table(results: &[Comparison], peers: &[Proto]) -> String {
    let mut out = String::from("| scenario | figure | tether |");
    for p in peers {
        out.push_str(&format!(
            " {} | tether/{} |",
            p.target_name(),
            p.target_name()
        ));
    }
    out.push_str("\n|---|---|---:|");
    for _ in peers {
        out.push_str("---:|---:|");
    }
    out.push('\n');
    for c in results {
        let ratios = c.ratios();
        let Some(tether) = c.get("tether") else {
            continue;
        };
        if tether.figures.is_empty() {
            let error = tether.detail["error"].as_str().unwrap_or("no figures");
            out.push_str(&format!(
                "| {} | failed: {} | | \n",
                c.scenario,
                error.replace('|', "/")
            ));
        }
        let keys: Vec<_> = c
            .outcomes
            .iter()
            .flat_map(|o| o.figures.iter().map(|f| (f.key, f.unit)))
            .fold(Vec::new(), |mut acc, k| {
                if !acc.contains(&k) {
                    acc.push(k);
                }
                acc
            });
        for (key, unit) in keys {
            let value = |target: &str| {
                c.get(target)
                    .and_then(|o| o.figures.iter().find(|f| f.key == key))
                    .map_or("–".to_string(), |f| compare::fmt_num(f.value))
            };
            out.push_str(&format!(
                "| {} | {key} ({unit}) | {} |",
                c.scenario,
                value("tether")
            ));
            for p in peers {
                let name = p.target_name();
                let ratio = ratios
                    .get(name)
                    .and_then(|r| r.get(key))
                    .map_or("–".to_string(), |r| format!("{r:.2}×"));
                out.push_str(&format!(" {} | {ratio} |", value(name)));
            }
            out.push('\n');
        }
    }
    out
}

fn figure(c: Option<&Comparison>, target: &str, key: &str) -> Option<f64> {
    c?.get(target)?
        .figures
        .iter()
        .find(|f| f.key == key)
        .map(|f| f.value)
}

fn charts(args: &SuiteArgs, results: &[Comparison]) -> Result<(), BenchError> {
    let find = |name: &str| results.iter().find(|c| c.scenario == name);
    let targets: Vec<&str> = std::iter::once("tether")
        .chain(args.peers.iter().map(|p| p.target_name()))
        .collect();
    let bars = |c: Option<&Comparison>, key: &str| -> Vec<(String, Option<f64>)> {
        targets
            .iter()
            .map(|t| (t.to_string(), figure(c, t, key)))
            .collect()
    };
    let mut latency = Vec::new();
    for scenario in ["fanout", "p2p", "p2p_1k"] {
        for key in ["p50", "p99", "p999"] {
            latency.push(Group {
                label: format!("{scenario} {key}"),
                bars: bars(find(scenario), key),
            });
        }
    }
    BarChart {
        title: "Latency percentiles (lower is better)".into(),
        unit: "us".into(),
        log: true,
        groups: latency,
    }
    .draw(&args.out.join("latency.png"))?;

    let mut memory = vec![Group {
        label: "1 server process".into(),
        bars: bars(find("conns"), "rss_per_conn"),
    }];
    memory.push(Group {
        label: "WebSocket".into(),
        bars: vec![(
            "tether".into(),
            figure(find("conns_ws"), "tether", "rss_per_conn"),
        )],
    });
    memory.push(Group {
        label: "several gateways".into(),
        bars: vec![(
            "tether".into(),
            figure(find("conns_multi"), "tether", "rss_per_conn"),
        )],
    });
    BarChart {
        title: "Server RSS per idle connection (lower is better)".into(),
        unit: "bytes".into(),
        log: true,
        groups: memory,
    }
    .draw(&args.out.join("memory.png"))?;

    let rates = vec![
        Group {
            label: "logins/s".into(),
            bars: bars(find("conns"), "connect_rate"),
        },
        Group {
            label: "fan-out deliveries/s".into(),
            bars: bars(find("fanout"), "deliveries_per_sec"),
        },
        Group {
            label: "p2p msgs/s".into(),
            bars: bars(find("p2p"), "achieved_rate"),
        },
        Group {
            label: "uplink receipts/s".into(),
            bars: bars(find("uplink"), "receipts_per_sec"),
        },
    ];
    BarChart {
        title: "Rates (higher is better)".into(),
        unit: "per second".into(),
        log: true,
        groups: rates,
    }
    .draw(&args.out.join("rates.png"))?;
    Ok(())
}
