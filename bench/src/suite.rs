//! `tether bench suite` (what `make bench` runs): every scenario at the sizes of
//! BENCHMARKS.md, Tether and its peers, then `results.json`, `table.md` and the charts
//! in the output folder. `quick` runs the same at tiny sizes (the smoke test).

use std::path::PathBuf;

use serde_json::{Value, json};

use crate::BenchError;
use crate::chart::{BarChart, Group};
use crate::compare::{self, Comparison};
use crate::conns::{self, ConnsArgs, source_range};
use crate::fanout::{self, FanoutArgs};
use crate::p2p::{self, P2pArgs};
use crate::uplink::{self, UplinkArgs};
use crate::wire::Proto;

/// Arguments of the suite.
#[derive(Debug, Clone)]
pub struct SuiteArgs {
    /// Folder for results.json, table.md and the PNG charts.
    pub out: PathBuf,
    /// Tiny sizes (seconds instead of minutes).
    pub quick: bool,
    /// Peers measured beside Tether.
    pub peers: Vec<Proto>,
    /// First 127.0.0.x source address used (each run takes fresh ones after it).
    pub first_source: u16,
    /// Run only these scenarios (`conns`, `conns_ws`, `conns_multi`, `fanout`, `p2p`,
    /// `p2p_1k`, `uplink`); all when empty.
    pub only: Vec<String>,
}

/// Hands out fresh source addresses run after run.
struct Sources(u16);

impl Sources {
    fn take(&mut self, n: u16, runs: usize) -> Vec<std::net::IpAddr> {
        let out = source_range(self.0, n);
        self.0 += n * runs as u16;
        out
    }
}

/// Runs the suite; returns the comparisons (a failed scenario is recorded with its error).
pub async fn run(args: SuiteArgs) -> Result<Vec<Comparison>, BenchError> {
    std::fs::create_dir_all(&args.out).map_err(BenchError::io("create output folder"))?;
    let q = args.quick;
    let runs = 1 + args.peers.len();
    let mut src = Sources(args.first_source.max(2));
    let mut results: Vec<Comparison> = Vec::new();
    let mut record = |name: &str, r: Result<Comparison, BenchError>| match r {
        Ok(c) => results.push(c),
        Err(e) => {
            eprintln!("suite: {name} failed: {e}");
            results.push(Comparison {
                scenario: name.into(),
                params: json!({}),
                outcomes: vec![compare::failed("tether", &e)],
            });
        }
    };

    let want = |name: &str| args.only.is_empty() || args.only.iter().any(|o| o == name);

    let one = ConnsArgs {
        connections: if q { 50 } else { 19_500 },
        rate: if q { 1_000 } else { 10_000 },
        hold_secs: if q { 2 } else { 5 },
        source_addrs: src.take(4, runs),
        peers: args.peers.clone(),
        ..ConnsArgs::default()
    };
    if want("conns") {
        record("conns", conns::run(one).await.map(|(c, _)| c));
    }

    let ws = ConnsArgs {
        connections: if q { 50 } else { 19_500 },
        rate: if q { 1_000 } else { 10_000 },
        hold_secs: if q { 2 } else { 5 },
        ws: true,
        source_addrs: src.take(4, 1),
        ..ConnsArgs::default()
    };
    if want("conns_ws") {
        record(
            "conns_ws",
            conns::run(ws).await.map(|(mut c, _)| {
                c.scenario = "conns_ws".into();
                c
            }),
        );
    }

    let many = ConnsArgs {
        connections: if q { 200 } else { 100_000 },
        rate: if q { 1_000 } else { 20_000 },
        hold_secs: if q { 2 } else { 5 },
        gateways: if q { 2 } else { 6 },
        workers: Some(if q { 2 } else { 6 }),
        source_addrs: src.take(8, 1),
        ..ConnsArgs::default()
    };
    if want("conns_multi") {
        record(
            "conns_multi",
            conns::run(many).await.map(|(mut c, _)| {
                c.scenario = "conns_multi".into();
                c
            }),
        );
    }

    let fan = FanoutArgs {
        members: if q { 20 } else { 10_000 },
        messages: if q { 5 } else { 100 },
        rate: if q { 10 } else { 20 },
        source_addrs: src.take(2, runs),
        peers: args.peers.clone(),
        ..FanoutArgs::default()
    };
    if want("fanout") {
        record("fanout", fanout::run(fan).await);
    }

    let pp = P2pArgs {
        pairs: if q { 4 } else { 100 },
        rate: if q { 200 } else { 10_000 },
        duration_secs: if q { 1.0 } else { 10.0 },
        source_addrs: src.take(1, runs),
        peers: args.peers.clone(),
        ..P2pArgs::default()
    };
    if want("p2p") {
        record("p2p", p2p::run(pp).await);
    }

    // The same at a rate Tether sustains on this box, for its latency without a backlog.
    let slow = P2pArgs {
        pairs: if q { 2 } else { 100 },
        rate: if q { 100 } else { 1_000 },
        duration_secs: if q { 1.0 } else { 10.0 },
        source_addrs: src.take(1, runs),
        peers: args.peers.clone(),
        ..P2pArgs::default()
    };
    if want("p2p_1k") && !q {
        record(
            "p2p_1k",
            p2p::run(slow).await.map(|mut c| {
                c.scenario = "p2p_1k".into();
                c
            }),
        );
    }

    let up = UplinkArgs {
        devices: if q { 4 } else { 50 },
        window: if q { 4 } else { 32 },
        duration_secs: if q { 1.0 } else { 10.0 },
        source_addrs: src.take(1, runs),
        peers: args.peers.clone(),
        ..UplinkArgs::default()
    };
    if want("uplink") {
        record("uplink", uplink::run(up).await);
    }

    write_outputs(&args, &results)?;
    Ok(results)
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
