//! Smoke runs of the bench tool at tiny sizes, through the real `tether` binary: every
//! scenario against a stack the tool starts (nats-server, gateway and state processes)
//! and against the nats peer, checking that figures and ratios come out. Never timing
//! thresholds. Mosquitto is not needed here (`make bench` covers it).

use std::path::Path;
use std::process::{Command, Output};

use serde_json::Value;

fn tether(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_tether"))
        .args(args)
        .env("RUST_LOG", "warn")
        .output()
        .expect("run tether")
}

fn check(output: &Output) {
    assert!(
        output.status.success(),
        "tether bench failed: {}\nstdout:\n{}\nstderr:\n{}",
        output.status,
        String::from_utf8_lossy(&output.stdout),
        String::from_utf8_lossy(&output.stderr)
    );
}

fn positive(v: &Value, what: &str) {
    assert!(v.as_f64().is_some_and(|x| x > 0.0), "{what} = {v}");
}

/// Every scenario of the suite at tiny sizes with the nats peer: results.json with
/// figures for both targets and their ratios, the table and the PNG charts.
#[test]
fn suite_quick_with_nats_peer() {
    let dir = tempfile::tempdir().expect("temp dir");
    let out = dir.path().display().to_string();
    let output = tether(&[
        "bench",
        "suite",
        "--quick",
        "--peer",
        "nats",
        "--out",
        &out,
        "--first-source",
        "1200",
    ]);
    check(&output);
    let results: Value = serde_json::from_str(
        &std::fs::read_to_string(dir.path().join("results.json")).expect("results.json"),
    )
    .expect("json");
    let scenarios = results["results"].as_array().expect("results array");
    let names: Vec<&str> = scenarios
        .iter()
        .filter_map(|s| s["scenario"].as_str())
        .collect();
    assert_eq!(
        names,
        [
            "conns",
            "conns_ws",
            "conns_multi",
            "fanout",
            "p2p",
            "uplink"
        ],
        "{results}"
    );
    for s in scenarios {
        let name = s["scenario"].as_str().unwrap_or_default();
        let figures = &s["tether"]["figures"];
        assert!(
            figures.as_object().is_some_and(|f| !f.is_empty()),
            "{name}: no tether figures: {s}"
        );
        if !name.starts_with("conns_") {
            assert!(
                s["ratios"]["nats"]
                    .as_object()
                    .is_some_and(|r| !r.is_empty()),
                "{name}: no ratios: {s}"
            );
        }
    }
    let conns = &scenarios[0];
    positive(
        &conns["tether"]["figures"]["rss_per_conn"],
        "tether rss per conn",
    );
    positive(
        &conns["nats"]["figures"]["connect_rate"],
        "nats connect rate",
    );
    let by_name = |name: &str| {
        scenarios
            .iter()
            .find(|s| s["scenario"] == name)
            .unwrap_or_else(|| panic!("no {name} in {results}"))
    };
    let ws = &by_name("conns_ws")["tether"]["detail"];
    assert_eq!(ws["transport"], "ws", "{ws}");
    let multi = &by_name("conns_multi")["tether"]["detail"];
    assert_eq!(multi["workers"], 2, "{multi}");
    assert_eq!(multi["servers"], 2, "{multi}");
    let fanout = &by_name("fanout")["tether"]["figures"];
    positive(&fanout["deliveries_per_sec"], "fanout rate");
    positive(&by_name("p2p")["tether"]["figures"]["p50"], "p2p p50");
    let uplink = &by_name("uplink")["nats"]["figures"];
    positive(&uplink["receipts_per_sec"], "uplink nats");
    for file in ["table.md", "latency.png", "memory.png", "rates.png"] {
        let path = Path::new(&out).join(file);
        assert!(
            path.metadata().is_ok_and(|m| m.len() > 100),
            "{file} missing"
        );
    }
    let table = String::from_utf8_lossy(&output.stdout);
    assert!(table.contains("| p2p | p50 (µs) |"), "{table}");
}

/// A scenario run from the command line ends with one JSON object on the last line.
#[test]
fn p2p_prints_json_on_the_last_line() {
    let mut args = vec![
        "bench",
        "p2p",
        "--pairs",
        "2",
        "--rate",
        "100",
        "--duration",
        "1",
        "--peer",
        "nats",
        "--json",
        "--source",
        "127.0.5.10",
    ];
    // With two CPUs or more, the server side on cpu 1 and the load generator on cpu 0.
    let pinned = std::thread::available_parallelism().is_ok_and(|n| n.get() >= 2);
    if pinned {
        args.extend(["--pin", "1/0"]);
    }
    let output = tether(&args);
    check(&output);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let json: Value = serde_json::from_str(last).expect("last line is JSON");
    assert_eq!(json["scenario"], "p2p");
    positive(&json["tether"]["detail"]["delivered"], "delivered");
    positive(&json["ratios"]["nats"]["p99"], "p99 ratio");
    assert!(stdout.contains("p2p [tether]"), "{stdout}");
    if pinned {
        assert_eq!(json["params"]["pin"]["server"], serde_json::json!([1]));
        assert_eq!(json["params"]["pin"]["load"], serde_json::json!([0]));
        // nats-server, gateway and state of the stack, and the nats peer.
        let stderr = String::from_utf8_lossy(&output.stderr);
        let pinned = stderr
            .lines()
            .filter(|l| l.starts_with("pinned pid ") && l.ends_with("to cpu 1"))
            .count();
        assert!(pinned >= 4, "{pinned} processes pinned:\n{stderr}");
    }
}

/// `p2p --regions 2`: one run with both legs (a hub and two leaf regions, a gateway and
/// state in each): messages arrive within region A and from A to B, the cross-region ones
/// through the relay streams (counted out of A and into B) and none of the same-region
/// ones.
#[test]
fn p2p_across_two_regions_reports_both_legs() {
    let output = tether(&[
        "bench",
        "p2p",
        "--regions",
        "2",
        "--pairs",
        "2",
        "--rate",
        "50",
        "--duration",
        "1",
        "--json",
        "--source",
        "127.0.5.20",
    ]);
    check(&output);
    let stdout = String::from_utf8_lossy(&output.stdout);
    let last = stdout.lines().last().unwrap_or_default();
    let json: Value = serde_json::from_str(last).expect("last line is JSON");
    assert_eq!(json["params"]["regions"], 2, "{json}");
    let same = &json["tether"]["detail"];
    let cross = &same["cross_region"];
    positive(&same["delivered"], "same-region delivered");
    positive(&cross["delivered"], "cross-region delivered");
    positive(&json["tether"]["figures"]["xr_p50"], "cross-region p50");
    let count = |v: &Value| v.as_u64().unwrap_or_default();
    // The relay counters include the warm-up: at least every measured arrival crossed.
    assert!(
        count(&cross["relayed"]["into_b"]) >= count(&cross["delivered"])
            && count(&cross["relayed"]["out_of_a"]) >= count(&cross["delivered"]),
        "{cross}"
    );
    let none = &cross["relayed_in_same_region_leg"];
    assert_eq!(
        (count(&none["out_of_a"]), count(&none["into_b"])),
        (0, 0),
        "{cross}"
    );
    assert!(stdout.contains("cross/same:"), "{stdout}");
}
