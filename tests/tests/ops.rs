//! ops over real processes (issue 16): the cluster view (gateways, state instances with
//! their partitions, app counts; a killed gateway leaves it), every operation through the
//! HTTP API and through `tether ctl` / `tether app set`, 401 without a valid admin token, and
//! per-app settings (limits, pause at ipconfig and gateways, broadcast threshold, QoS
//! default, business subject, inbox retention) taking effect without a restart; ipconfig
//! instances and per-app message rates in the view.

mod support;

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::OnceLock;
use std::time::Duration;

use bytes::Bytes;
use serde_json::{Value, json};
use support::stack::{fast_state, start_state};
use support::{APP, Fixture, RawClient, TestResult, Transport};
use tether_business::{Business, Push, SessionRequest};
use tether_ipconfig::{AppAdmin, AppRecord};
use tether_ops::{OpsConfig, RunningOps};
use tether_schemas::{ErrorCode, Frame, pb};
use tokio_util::sync::CancellationToken;

const TOKEN: &str = "ops-test-admin-token-0123456789";
/// Only for waiting, never a pass/fail threshold.
const DEADLINE: Duration = Duration::from_secs(60);

/// The `tether` binary: `$TETHER_BIN`, else `target/debug/tether` (`make test` builds it
/// first; built here when missing).
fn tether_bin() -> PathBuf {
    static BIN: OnceLock<PathBuf> = OnceLock::new();
    BIN.get_or_init(|| {
        if let Some(path) = std::env::var_os("TETHER_BIN") {
            return path.into();
        }
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
        let target = std::env::var_os("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| root.join("target"));
        let bin = target.join("debug").join("tether");
        if !bin.is_file() {
            let cargo = option_env!("CARGO").unwrap_or("cargo");
            let status = std::process::Command::new(cargo)
                .args(["build", "-q", "-p", "tether"])
                .current_dir(&root)
                .status()
                .expect("cargo build -p tether");
            assert!(status.success(), "cargo build -p tether failed");
        }
        bin
    })
    .clone()
}

fn free_addr() -> SocketAddr {
    tether_nats::harness::free_addr().expect("free loopback port")
}

async fn start_ops(fixture: &Fixture) -> RunningOps {
    let config = OpsConfig {
        nats_url: fixture.nats.client_url(),
        nats: fixture.nats_auth.clone(),
        admin_listen: "127.0.0.1:0".parse().expect("addr"),
        admin_tokens: vec![TOKEN.into()],
        ..Default::default()
    };
    tether_ops::start(config, fixture.shutdown.clone())
        .await
        .expect("ops starts")
}

async fn add_app(fixture: &Fixture) {
    AppAdmin::open(fixture.nats_client.clone())
        .await
        .expect("apps bucket")
        .add(AppRecord {
            id: APP.into(),
            secrets: vec!["a-secret-of-sixteen-chars".into()],
            ..Default::default()
        })
        .await
        .expect("app added");
}

/// One API call: status and JSON body.
async fn api(
    ops: &RunningOps,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: Option<Value>,
) -> (u16, Value) {
    let url = format!("http://{}{path}", ops.admin_addr);
    let body = body.map(|b| b.to_string());
    let answer = tether_ops::http::request(
        method,
        &url,
        token,
        body.as_deref().map(str::as_bytes),
        Duration::from_secs(30),
    )
    .await
    .expect("http");
    let value = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
    (answer.status, value)
}

/// Polls `/v1/cluster` until `done` holds; panics with the last snapshot after DEADLINE.
async fn cluster_until(ops: &RunningOps, what: &str, done: impl Fn(&Value) -> bool) -> Value {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (status, cluster) = api(ops, "GET", "/v1/cluster", Some(TOKEN), None).await;
        assert_eq!(status, 200, "{cluster}");
        if done(&cluster) {
            return cluster;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "cluster view never showed {what}: {cluster:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

fn gateway_ids(cluster: &Value) -> BTreeSet<String> {
    cluster["gateways"]
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|g| g["id"].as_str().map(str::to_string))
        .collect()
}

/// Runs `tether <args>`; returns (success, stdout, stderr).
async fn tether(args: &[&str]) -> (bool, String, String) {
    let output = tokio::process::Command::new(tether_bin())
        .args(args)
        .env("RUST_LOG", "warn")
        .env_remove("TETHER_OPS_TOKEN")
        .output()
        .await
        .expect("tether runs");
    (
        output.status.success(),
        String::from_utf8_lossy(&output.stdout).into_owned(),
        String::from_utf8_lossy(&output.stderr).into_owned(),
    )
}

/// `tether ctl --ops <ops> --token <TOKEN> <args>`, which must succeed; its stdout.
async fn ctl(ops: &RunningOps, args: &[&str]) -> String {
    let url = format!("http://{}", ops.admin_addr);
    let mut all = vec!["ctl", "--ops", &url, "--token", TOKEN];
    all.extend_from_slice(args);
    let (ok, stdout, stderr) = tether(&all).await;
    assert!(ok, "tether {all:?} failed: {stderr}");
    stdout
}

fn up(id: u64) -> Bytes {
    Frame::Up {
        header: pb::Up {
            client_msg_id: id,
            session: String::new(),
        },
        body: Bytes::from_static(b"hello"),
    }
    .encode()
}

/// A gateway as its own `tether gateway` process, killed with SIGKILL on drop.
struct GatewayProcess(std::process::Child);

impl Drop for GatewayProcess {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

#[tokio::test]
async fn cluster_view_lists_gateways_states_partitions_and_apps_and_drops_a_killed_gateway()
-> TestResult {
    let fixture = Fixture::start(|_| {}).await;
    add_app(&fixture).await;
    let second = fixture.gateway_config("gw-two");
    let key = second.token_public_key.clone();
    let _gw2 = tether_gateway::start(second, fixture.shutdown.clone()).await?;
    let tcp3 = free_addr();
    let mut gw3 = GatewayProcess(
        std::process::Command::new(tether_bin())
            .args([
                "gateway",
                "--nats",
                &fixture.nats.client_url(),
                "--id",
                "gw-three",
            ])
            .args(["--tcp", &tcp3.to_string(), "--ws", &free_addr().to_string()])
            .args(["--admin", &free_addr().to_string()])
            .arg("--token-public-key")
            .arg(&key)
            .env("RUST_LOG", "warn")
            .stdout(std::process::Stdio::null())
            .spawn()?,
    );
    let stop = CancellationToken::new();
    let _s1 = start_state(&fixture, stop.clone()).await;
    let _s2 = start_state(&fixture, stop.clone()).await;
    let (_d1, _) = fixture.login_as(APP, "view-1").await;
    let (_d2, _) = fixture.login_as(APP, "view-2").await;
    let ops = start_ops(&fixture).await;

    let cluster = cluster_until(
        &ops,
        "3 gateways, 2 states owning every partition, 2 devices",
        |c| {
            let states = c["states"].as_array().cloned().unwrap_or_default();
            let owned: usize = states
                .iter()
                .map(|s| s["partitions"].as_array().map_or(0, Vec::len))
                .sum();
            gateway_ids(c).len() == 3
                && states.len() == 2
                && states
                    .iter()
                    .all(|s| s["partitions"].as_array().is_some_and(|p| !p.is_empty()))
                && owned == usize::from(tether_nats::subjects::PARTITIONS)
                && c["apps"][0]["connections"] == json!(2)
        },
    )
    .await;
    assert_eq!(
        gateway_ids(&cluster),
        ["gw-test", "gw-three", "gw-two"].map(String::from).into()
    );
    assert_eq!(cluster["apps"][0]["id"], json!(APP));
    assert_eq!(cluster["apps"][0]["gateways"]["gw-test"], json!(2));
    assert!(
        cluster["partitions"]
            .as_array()
            .is_some_and(|p| p.iter().all(Value::is_string))
    );

    // The CLI shows the same, as a table and as JSON.
    let table = ctl(&ops, &["status"]).await;
    for gw in ["gw-test", "gw-two", "gw-three"] {
        assert!(table.contains(gw), "{table}");
    }
    let json: Value = serde_json::from_str(&ctl(&ops, &["--json", "gateways"]).await)?;
    assert_eq!(json.as_array().map(Vec::len), Some(3));
    let apps = ctl(&ops, &["apps"]).await;
    assert!(
        apps.lines()
            .any(|l| l.starts_with(APP) && l.contains(" 2 ")),
        "{apps}"
    );

    // A crashed gateway (SIGKILL: it cannot delete its record) leaves the view once its
    // heartbeat is older than the bucket's TTL.
    gw3.0.kill()?;
    gw3.0.wait()?;
    let cluster = cluster_until(&ops, "gw-three gone", |c| {
        !gateway_ids(c).contains("gw-three")
    })
    .await;
    assert_eq!(
        gateway_ids(&cluster),
        ["gw-test", "gw-two"].map(String::from).into()
    );
    stop.cancel();
    Ok(())
}

#[tokio::test]
async fn operations_need_an_admin_token() -> TestResult {
    let fixture = Fixture::start(|_| {}).await;
    let ops = start_ops(&fixture).await;
    for (method, path) in [
        ("GET", "/v1/cluster"),
        ("GET", "/v1/stream"),
        ("POST", "/v1/kick"),
        ("POST", "/v1/apps/demo/pause"),
        ("POST", "/v1/gateways/gw-test/drain"),
    ] {
        for token in [None, Some("wrong-token-wrong-token")] {
            let (status, body) = api(&ops, method, path, token, Some(json!({}))).await;
            assert_eq!(status, 401, "{method} {path} with {token:?}: {body}");
            assert_eq!(body["error"]["code"], json!("bad_token"));
        }
    }
    let url = format!("http://{}", ops.admin_addr);
    let (ok, _, stderr) = tether(&["ctl", "--ops", &url, "status"]).await;
    assert!(!ok && stderr.contains("401"), "{stderr}");
    // The page itself holds no data and loads without a token.
    let (status, _) = api(&ops, "GET", "/v1/cluster", Some(TOKEN), None).await;
    assert_eq!(status, 200);
    let page = support::http_get(ops.admin_addr, "/").await;
    assert!(page.contains("Tether"), "{page}");
    Ok(())
}

#[tokio::test]
async fn every_operation_works_through_the_api_and_the_cli() -> TestResult {
    let fixture = Fixture::start(|_| {}).await;
    add_app(&fixture).await;
    let stop = CancellationToken::new();
    let _state = tether_state::start(fast_state(&fixture.nats.client_url()), stop.clone()).await?;
    let ops = start_ops(&fixture).await;
    let nats = fixture.nats.client_url();

    // Kick through the API (the route appears once state registered the device).
    let (mut k1, _) = fixture.login_as(APP, "kick-1").await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (status, body) = api(
            &ops,
            "POST",
            "/v1/kick",
            Some(TOKEN),
            Some(json!({"app": APP, "did": "kick-1"})),
        )
        .await;
        if status == 200 {
            assert_eq!(body["gw"], json!("gw-test"));
            break;
        }
        assert_eq!(status, 404, "{body}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "route never written"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    k1.expect_close(ErrorCode::Forbidden).await;
    let (status, body) = api(
        &ops,
        "POST",
        "/v1/kick",
        Some(TOKEN),
        Some(json!({"app": APP, "did": "nobody"})),
    )
    .await;
    assert_eq!(status, 404, "{body}");

    // Kick through the CLI, with a close code.
    let (mut k2, _) = fixture.login_as(APP, "kick-2").await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let url = format!("http://{}", ops.admin_addr);
    loop {
        let (ok, stdout, stderr) = tether(&[
            "ctl",
            "--ops",
            &url,
            "--token",
            TOKEN,
            "kick",
            APP,
            "kick-2",
            "--code",
            "going_away",
        ])
        .await;
        if ok {
            assert!(stdout.contains("gw-test"), "{stdout}");
            break;
        }
        assert!(stderr.contains("404"), "{stderr}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "route never written"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    k2.expect_close(ErrorCode::GoingAway).await;

    // Pause and resume: `pausing_an_app_stops_its_discovery_and_logins_until_resumed`.

    // Uplink rate limit with `tether app set` (straight to the bucket): a burst over it
    // gets UP_ACK rate_limited from the running gateway.
    let (ok, stdout, stderr) =
        tether(&["app", "--nats", &nats, "set", APP, "max_msgs_per_sec=2"]).await;
    assert!(ok, "{stderr}");
    assert!(stdout.contains("\"max_msgs_per_sec\": 2"), "{stdout}");
    let (mut sender, _) = fixture.login_as(APP, "rate-1").await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut next_id = 1;
    'limited: loop {
        for _ in 0..10 {
            sender.send(&up(next_id)).await;
            next_id += 1;
        }
        for _ in 0..10 {
            match sender.next_frame().await {
                Some(Frame::UpAck(ack))
                    if ack.code == u32::from(ErrorCode::RateLimited.as_u16()) =>
                {
                    assert!(
                        ack.message.contains("2 messages per second"),
                        "{}",
                        ack.message
                    );
                    break 'limited;
                }
                Some(_) => {}
                None => panic!("connection closed"),
            }
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "limit never applied"
        );
    }
    // The same setting through the API: 0 lifts the limit.
    let (status, body) = api(
        &ops,
        "POST",
        &format!("/v1/apps/{APP}"),
        Some(TOKEN),
        Some(json!({"set": {"max_msgs_per_sec": 0}})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["pipeline"], json!({}));
    let (status, body) = api(
        &ops,
        "POST",
        &format!("/v1/apps/{APP}"),
        Some(TOKEN),
        Some(json!({"set": {"qos": 1}})),
    )
    .await;
    assert_eq!(status, 400, "{body}");

    // Broadcast threshold with `tether app set`: a session push to 2 members goes direct
    // under state's default (100) and as one broadcast once the threshold is 1.
    let business = Business::new(fixture.nats_client.clone(), APP);
    let (_b1, _) = fixture.login_as(APP, "bcast-1").await;
    let (_b2, _) = fixture.login_as(APP, "bcast-2").await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let bound = business
            .sessions(SessionRequest::bind(["bcast-1", "bcast-2"], ["room"]))
            .await;
        if bound.is_ok_and(|r| r.devices == 2) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "bind never worked");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let pushed = business
        .push(Push::to_session("room", "before").qos0())
        .await?;
    assert_eq!(pushed.mode.as_deref(), Some("direct"));
    let (ok, _, stderr) =
        tether(&["app", "--nats", &nats, "set", APP, "broadcast_threshold=1"]).await;
    assert!(ok, "{stderr}");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let pushed = business
            .push(Push::to_session("room", "after").qos0())
            .await?;
        if pushed.mode.as_deref() == Some("broadcast") {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "threshold never applied"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let shown = ctl(&ops, &["app", "show", APP]).await;
    assert!(shown.contains("\"broadcast_threshold\": 1"), "{shown}");

    // Membership events with `tether app set`: off by default (the bind to "room" above
    // published none), on from the next change once set; the first event seen is one of
    // those later binds.
    let mut events = business.memberships().await?;
    let (ok, _, stderr) =
        tether(&["app", "--nats", &nats, "set", APP, "membership_events=true"]).await;
    assert!(ok, "{stderr}");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut n = 0;
    let event = loop {
        n += 1;
        let session = format!("ev-{n}");
        business
            .sessions(SessionRequest::bind(["bcast-1"], [session.as_str()]))
            .await?;
        use futures::StreamExt;
        if let Ok(Some(event)) =
            tokio::time::timeout(Duration::from_millis(500), events.next()).await
        {
            break event;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "membership events never turned on"
        );
    };
    assert!(event.session.starts_with("ev-"), "{event:?}");
    assert_eq!(event.did, "bcast-1");
    let shown = ctl(&ops, &["app", "show", APP]).await;
    assert!(shown.contains("\"membership_events\": true"), "{shown}");

    // A rolling restart needs gateways to name (400 otherwise); this gateway has no
    // hand-off socket, so its roll fails with that reason, through the API and the CLI
    // (the rolling restart itself: a_rolling_restart_… below).
    let (status, body) = api(&ops, "POST", "/v1/restart", Some(TOKEN), Some(json!({}))).await;
    assert_eq!(status, 400, "{body}");
    let (status, body) = api(
        &ops,
        "POST",
        "/v1/restart",
        Some(TOKEN),
        Some(json!({"gateways": ["gw-test"]})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let roll = roll_finished(&ops).await;
    assert!(
        roll["error"]
            .as_str()
            .is_some_and(|e| e.contains("handoff_socket")),
        "{roll:#}"
    );
    let (ok, _, stderr) =
        tether(&["ctl", "--ops", &url, "--token", TOKEN, "restart", "--all"]).await;
    assert!(!ok && stderr.contains("handoff_socket"), "{stderr}");

    // Every operation is in the audit log, with who did it and how it ended.
    let (status, audit) = api(&ops, "GET", "/v1/audit?limit=100", Some(TOKEN), None).await;
    assert_eq!(status, 200);
    let seen: BTreeSet<(String, String, String)> = audit
        .as_array()
        .into_iter()
        .flatten()
        .map(|e| {
            (
                e["op"].as_str().unwrap_or_default().to_string(),
                e["actor"].as_str().unwrap_or_default().to_string(),
                e["outcome"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect();
    for expected in [
        ("kick", "token-1", "ok"),
        ("kick", "token-1", "error"),
        ("app.set", "cli", "ok"),
        ("app.set", "token-1", "ok"),
        ("app.set", "token-1", "error"),
        ("restart", "token-1", "error"),
        ("restart", "token-1", "ok"),
        ("restart.gateway", "token-1", "error"),
        ("restart.done", "token-1", "error"),
    ] {
        let expected = (expected.0.into(), expected.1.into(), expected.2.into());
        assert!(seen.contains(&expected), "{expected:?} not in {seen:?}");
    }
    let table = ctl(&ops, &["audit"]).await;
    assert!(table.contains("app.set"), "{table}");
    stop.cancel();
    Ok(())
}

/// Metric names a `/metrics` page exports: every sample's name, plus the names a query may
/// use for each family (`_total` of counters; `_bucket`, `_sum`, `_count` of histograms).
fn exported(page: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    for line in page.lines() {
        if let Some(rest) = line.strip_prefix("# TYPE ") {
            let mut parts = rest.split_whitespace();
            if let (Some(name), Some(kind)) = (parts.next(), parts.next()) {
                names.insert(name.to_string());
                match kind {
                    "counter" => {
                        names.insert(format!("{name}_total"));
                    }
                    "histogram" => {
                        for suffix in ["_bucket", "_sum", "_count"] {
                            names.insert(format!("{name}{suffix}"));
                        }
                    }
                    _ => {}
                }
            }
        } else if !line.starts_with('#')
            && let Some(name) = line.split(['{', ' ']).next()
            && !name.is_empty()
        {
            names.insert(name.to_string());
        }
    }
    names
}

/// docs/grafana/tether.json queries only metrics that the roles export.
#[tokio::test]
async fn every_metric_of_the_grafana_dashboard_is_exported() -> TestResult {
    let fixture = Fixture::start(|_| {}).await;
    let stop = CancellationToken::new();
    let state = start_state(&fixture, stop.clone()).await;
    let dir = tempfile::tempdir()?;
    let key = dir.path().join("token.key");
    tether_auth::write_keypair(&key, false)?;
    let ipconfig = tether_ipconfig::start(
        tether_ipconfig::IpconfigConfig {
            nats_url: fixture.nats.client_url(),
            admin_listen: "127.0.0.1:0".parse()?,
            http_listen: "127.0.0.1:0".parse()?,
            token_key: key,
            ..Default::default()
        },
        stop.clone(),
    )
    .await?;
    let ops = start_ops(&fixture).await;
    // Labelled families show up once they have a value: give each one.
    let (mut device, _) = fixture.login_as(APP, "metrics-1").await; // frames_in
    device.send(&up(1)).await; // state's uplinks (no business: it fails, counted)
    let mut bad = RawClient::connect(Transport::Tcp, fixture.tcp).await;
    bad.send(
        &Frame::Login(pb::Login {
            token: fixture.token("x"),
            did: "not a valid did".into(),
            ..Default::default()
        })
        .encode(),
    )
    .await;
    bad.expect_close(ErrorCode::BadRequest).await; // refused, errors, disconnects
    let business = Business::new(fixture.nats_client.clone(), APP);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while business
        .push(Push::to_session("metrics-room", "x").qos0())
        .await
        .is_err()
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "session push never answered"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = support::http_get(ipconfig.http_addr, "/v1/endpoints").await; // requests
    let (status, _) = api(&ops, "POST", "/v1/restart", Some(TOKEN), Some(json!({}))).await; // operations
    assert_eq!(status, 400);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while !support::http_get(state.admin_addr, "/metrics")
        .await
        .contains("tether_state_uplinks_total")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the uplink was never counted"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    let mut names = BTreeSet::new();
    for admin in [
        fixture.admin,
        state.admin_addr,
        ipconfig.admin_addr,
        ops.admin_addr,
    ] {
        names.extend(exported(&support::http_get(admin, "/metrics").await));
    }
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../docs/grafana/tether.json");
    let dashboard: Value = serde_json::from_str(&std::fs::read_to_string(path)?)?;
    let mut queried = BTreeSet::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            let expr = target["expr"].as_str().unwrap_or_default();
            for (i, _) in expr.match_indices("tether_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                queried.insert(name);
            }
        }
    }
    assert!(queried.len() > 20, "the dashboard queries {queried:?}");
    let missing: Vec<&String> = queried.iter().filter(|n| !names.contains(*n)).collect();
    assert!(missing.is_empty(), "not exported by any role: {missing:?}");
    stop.cancel();
    Ok(())
}

fn connections_on(cluster: &Value, gw: &str) -> Option<u64> {
    cluster["gateways"]
        .as_array()?
        .iter()
        .find(|g| g["id"] == json!(gw))?["connections"]
        .as_u64()
}

/// Drain through the API and migrate through the CLI (PROTOCOL.md 10.7): SDK devices move
/// by REDIRECT, and the cluster view shows the counts move and the migration's status.
#[tokio::test]
async fn drain_and_migrate_move_devices_through_the_api_and_the_cli() -> TestResult {
    let fixture = Fixture::start(|c| {
        c.await_registration = true;
        c.heartbeat_interval_ms = 200;
    })
    .await;
    let stop = CancellationToken::new();
    let _state = start_state(&fixture, stop.clone()).await;
    let dir = tempfile::tempdir()?;
    let key = dir.path().join("token.key");
    std::fs::write(&key, fixture.signer.to_pem()?)?;
    let _ipconfig = tether_ipconfig::start(
        tether_ipconfig::IpconfigConfig {
            nats_url: fixture.nats.client_url(),
            admin_listen: "127.0.0.1:0".parse()?,
            http_listen: "127.0.0.1:0".parse()?,
            token_key: key,
            stale_after_ms: 1_000,
            apps: vec![AppRecord {
                id: APP.into(),
                secrets: vec!["a-secret-of-16-chars".into()],
                ..Default::default()
            }],
            ..Default::default()
        },
        stop.clone(),
    )
    .await?;
    let mut second = fixture.gateway_config("gw-two");
    second.await_registration = true;
    second.heartbeat_interval_ms = 200;
    let _gw2 = tether_gateway::start(second, stop.clone()).await?;
    let ops = start_ops(&fixture).await;
    let mut devices = Vec::new();
    for i in 0..5 {
        devices.push(support::stack::device(&fixture, fixture.tcp, &format!("move-{i}")).await);
    }
    cluster_until(&ops, "5 devices on gw-test, gw-two live", |c| {
        connections_on(c, "gw-test") == Some(5) && connections_on(c, "gw-two") == Some(0)
    })
    .await;

    let deadline = tokio::time::Instant::now() + DEADLINE;
    let cluster = loop {
        let (status, body) = api(
            &ops,
            "POST",
            "/v1/gateways/gw-test/drain",
            Some(TOKEN),
            None,
        )
        .await;
        assert_eq!(status, 200, "{body}");
        assert_eq!(body["draining"], json!(true));
        assert_eq!(body["kind"], json!("drain"));
        let moved = tokio::time::timeout(
            Duration::from_secs(15),
            cluster_until(&ops, "every device moved to gw-two", |c| {
                connections_on(c, "gw-test") == Some(0) && connections_on(c, "gw-two") == Some(5)
            }),
        )
        .await;
        if let Ok(cluster) = moved {
            break cluster;
        }
        // ipconfig may not offer gw-two yet (its first heartbeats): the drain found
        // nowhere to go; ask again.
        assert!(
            tokio::time::Instant::now() < deadline,
            "the drain never moved them"
        );
    };
    assert_eq!(cluster["migrations"]["gw-test"]["kind"], json!("drain"));
    let (status, body) = api(
        &ops,
        "POST",
        "/v1/gateways/nowhere/drain",
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 404, "{body}");

    // Back through the CLI: undrain, then migrate all of gw-two to gw-test.
    let shown = ctl(&ops, &["undrain", "gw-test"]).await;
    assert!(shown.contains("\"draining\": false"), "{shown}");
    cluster_until(&ops, "gw-test no longer draining", |c| {
        c["gateways"].as_array().is_some_and(|g| {
            g.iter()
                .any(|g| g["id"] == json!("gw-test") && g["draining"] == json!(false))
        })
    })
    .await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let shown = ctl(&ops, &["migrate", "gw-two", "--all", "--to", "gw-test"]).await;
        assert!(shown.contains("\"kind\": \"migrate\""), "{shown}");
        let moved = tokio::time::timeout(
            Duration::from_secs(15),
            cluster_until(&ops, "every device back on gw-test", |c| {
                connections_on(c, "gw-test") == Some(5) && connections_on(c, "gw-two") == Some(0)
            }),
        )
        .await;
        if moved.is_ok() {
            break;
        }
        // ipconfig may not have seen gw-test's cleared flag yet: the migration then found
        // nowhere to go; run it again.
        assert!(
            tokio::time::Instant::now() < deadline,
            "migration never moved them"
        );
    }
    let status: Value = serde_json::from_str(&ctl(&ops, &["--json", "migration", "gw-two"]).await)?;
    assert_eq!(status["kind"], json!("migrate"));
    assert_eq!(status["gw"], json!("gw-two"));

    let (_, audit) = api(&ops, "GET", "/v1/audit", Some(TOKEN), None).await;
    let ops_seen: BTreeSet<&str> = audit
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|e| e["op"].as_str())
        .collect();
    for op in ["drain", "undrain", "migrate"] {
        assert!(ops_seen.contains(op), "{op} not audited: {ops_seen:?}");
    }
    drop(devices);
    stop.cancel();
    Ok(())
}

/// What one SDK device saw during the rolling restarts.
#[derive(Default)]
struct DeviceLog {
    messages: Vec<(u64, String)>,
    reconnects: usize,
    disconnects: Vec<String>,
}

/// Processes started by gateways themselves (restart successors): SIGKILLed on drop.
#[derive(Default)]
struct Successors(std::sync::Mutex<BTreeSet<u32>>);

impl Successors {
    fn add(&self, status: &Value) {
        let mut pids = self.0.lock().expect("lock");
        for gw in status["gateways"].as_array().into_iter().flatten() {
            if let Some(pid) = gw["new_pid"].as_u64() {
                pids.insert(pid as u32);
            }
        }
    }
}

impl Drop for Successors {
    fn drop(&mut self) {
        for pid in self.0.lock().map(|p| p.clone()).unwrap_or_default() {
            let _ = std::process::Command::new("kill")
                .args(["-9", &pid.to_string()])
                .stderr(std::process::Stdio::null())
                .status();
        }
    }
}

/// `tether gateway <id>` with a hand-off socket in `dir`, its output (and its successors')
/// appended to `dir/<id>.log`, heartbeats every 200 ms; `limit`: `ulimit -n` for it.
fn restartable_gateway(
    fixture: &Fixture,
    dir: &std::path::Path,
    id: &str,
    tcp: SocketAddr,
    limit: Option<u32>,
) -> std::io::Result<GatewayProcess> {
    let key = fixture.gateway_config(id).token_public_key;
    let log = dir.join(format!("{id}.log"));
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&log)?;
    let ulimit = limit.map_or(String::new(), |n| format!("ulimit -n {n} && "));
    let script = format!("{ulimit}exec \"$0\" \"$@\"");
    let child = std::process::Command::new("bash")
        .args(["-c", &script])
        .arg(tether_bin())
        .args(["gateway", "--id", id, "--nats", &fixture.nats.client_url()])
        .args(["--tcp", &tcp.to_string(), "--ws", &free_addr().to_string()])
        .args(["--admin", &free_addr().to_string()])
        .arg("--token-public-key")
        .arg(&key)
        .arg("--handoff-socket")
        .arg(dir.join(format!("{id}.sock")))
        .env("RUST_LOG", "info")
        .env("TETHER_GATEWAY_AWAIT_REGISTRATION", "true")
        .env("TETHER_GATEWAY_HEARTBEAT_INTERVAL_MS", "200")
        .env("TETHER_GATEWAY_RESTART_LOG", &log)
        .stdin(std::process::Stdio::null())
        .stdout(file.try_clone()?)
        .stderr(file)
        .spawn()?;
    Ok(GatewayProcess(child))
}

/// The heartbeat pid of each gateway in `ids`, once all are live.
async fn pids(ops: &RunningOps, ids: &[&str]) -> Vec<u64> {
    let cluster = cluster_until(ops, "gateways live", |c| {
        ids.iter().all(|id| connections_on(c, id).is_some())
    })
    .await;
    ids.iter()
        .map(|id| {
            cluster["gateways"]
                .as_array()
                .and_then(|g| g.iter().find(|g| g["id"] == json!(id)))
                .and_then(|g| g["pid"].as_u64())
                .unwrap_or(0)
        })
        .collect()
}

/// Polls `GET /v1/restart` until the roll ends; its last status.
async fn roll_finished(ops: &RunningOps) -> Value {
    let deadline = tokio::time::Instant::now() + DEADLINE * 3;
    loop {
        let (status, body) = api(ops, "GET", "/v1/restart", Some(TOKEN), None).await;
        assert_eq!(status, 200, "{body}");
        if body["running"] == json!(false) {
            return body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the roll never ended: {body:#}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Rolling restart (docs/operations.md): three `tether gateway` processes with SDK devices
/// receiving QoS1 pushes and sending UPs are restarted one after another through the API
/// and through `tether ctl`; every gateway's pid changes, no device reconnects, every
/// message arrives once and in order; a gateway that cannot restart stops the roll with
/// its reason; 401 without a token.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rolling_restart_through_the_api_and_the_cli_moves_no_device_and_loses_nothing()
-> TestResult {
    use std::sync::{Arc, Mutex};
    use tether_business::UplinkReply;
    use tether_client::Event;

    const GATEWAYS: [&str; 3] = ["gw-a", "gw-b", "gw-c"];
    /// SDK devices per gateway.
    const DEVICES: usize = 4;

    let dir = tempfile::tempdir()?;
    // The fixture's own gateway (gw-test) runs inside this test process: it cannot
    // restart itself, which the failing roll below uses.
    let fixture = Fixture::start(|c| {
        c.heartbeat_interval_ms = 200;
        c.handoff_socket = Some(dir.path().join("gw-test.sock"));
    })
    .await;
    let stop = CancellationToken::new();
    let _state = start_state(&fixture, stop.clone()).await;
    let successors = Successors::default();
    let mut processes = Vec::new();
    let mut addrs = Vec::new();
    for id in GATEWAYS {
        let tcp = free_addr();
        processes.push(restartable_gateway(&fixture, dir.path(), id, tcp, None)?);
        addrs.push(tcp);
    }
    let ops = start_ops(&fixture).await;
    let before = pids(&ops, &GATEWAYS).await;

    // The business stores every UP and records its body per device.
    let business = Business::new(fixture.nats_client.clone(), APP);
    let uplinks: Arc<Mutex<std::collections::HashMap<String, Vec<String>>>> = Arc::default();
    let (serving, seen_ups) = (business.clone(), uplinks.clone());
    tokio::spawn(async move {
        let _ = serving
            .serve_uplinks("tether-biz", move |up| {
                let seen = seen_ups.clone();
                async move {
                    seen.lock()
                        .expect("lock")
                        .entry(up.did.clone())
                        .or_default()
                        .push(String::from_utf8_lossy(&up.body).into_owned());
                    UplinkReply::stored(Some(format!("{}-{}", up.did, up.msg_id)))
                }
            })
            .await;
    });

    let mut devices = Vec::new();
    let mut logs: Vec<Arc<Mutex<DeviceLog>>> = Vec::new();
    for (g, addr) in addrs.iter().enumerate() {
        for i in 0..DEVICES {
            let did = format!("roll-{g}-{i}");
            let (client, mut events) = support::stack::device(&fixture, *addr, &did).await;
            let log: Arc<Mutex<DeviceLog>> = Arc::default();
            let writer = log.clone();
            tokio::spawn(async move {
                while let Some(event) = events.recv().await {
                    let mut log = writer.lock().expect("lock");
                    match event {
                        Event::Message { seq, body, .. } => log
                            .messages
                            .push((seq, String::from_utf8_lossy(&body).into_owned())),
                        Event::Connected { .. } => log.reconnects += 1,
                        Event::Disconnected { reason, .. } => log.disconnects.push(reason),
                        _ => {}
                    }
                }
            });
            devices.push((did, client));
            logs.push(log);
        }
    }
    cluster_until(&ops, "every device on its gateway", |c| {
        GATEWAYS
            .iter()
            .all(|gw| connections_on(c, gw) == Some(DEVICES as u64))
    })
    .await;

    // Traffic during all the rolls: QoS1 pushes round robin (body `<n>` = the device's
    // n-th) and, per device, UPs one after another (`up<n>`), each awaited to its UP_ACK.
    let running = CancellationToken::new();
    let dids: Vec<String> = devices.iter().map(|(d, _)| d.clone()).collect();
    let (pusher, pushing_stop) = (business.clone(), running.clone());
    let pushing = tokio::spawn(async move {
        let mut sent = vec![0u64; dids.len()];
        let mut i = 0;
        while !pushing_stop.is_cancelled() {
            let d = i % dids.len();
            sent[d] += 1;
            pusher
                .push(Push::to_dids(
                    [dids[d].as_str()],
                    sent[d].to_string().into_bytes(),
                ))
                .await
                .expect("push accepted");
            i += 1;
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        sent
    });
    let mut sending = Vec::new();
    for (_, client) in &devices {
        let (client, until) = (client.clone(), running.clone());
        sending.push(tokio::spawn(async move {
            let mut sent = 0u64;
            while !until.is_cancelled() {
                sent += 1;
                let ack = client.send(format!("up{sent}").into_bytes()).await;
                assert!(ack.is_ok(), "UP {sent} got no receipt: {ack:?}");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
            sent
        }));
    }
    tokio::time::sleep(Duration::from_millis(500)).await;

    // Without a token: 401, nothing restarts.
    let (status, _) = api(
        &ops,
        "POST",
        "/v1/restart",
        None,
        Some(json!({"all": true})),
    )
    .await;
    assert_eq!(status, 401);
    let (status, body) = api(
        &ops,
        "POST",
        "/v1/restart",
        Some(TOKEN),
        Some(json!({"all": true, "gateways": ["gw-a"]})),
    )
    .await;
    assert_eq!(status, 400, "{body}");

    // 1. Through the API: all three, one after another.
    let (status, body) = api(
        &ops,
        "POST",
        "/v1/restart",
        Some(TOKEN),
        Some(json!({"gateways": GATEWAYS})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["running"], json!(true));
    let roll = roll_finished(&ops).await;
    successors.add(&roll);
    assert!(roll.get("error").is_none(), "{roll:#}");
    let after_api = pids(&ops, &GATEWAYS).await;
    for (g, gw) in roll["gateways"]
        .as_array()
        .into_iter()
        .flatten()
        .enumerate()
    {
        assert_eq!(gw["gw"], json!(GATEWAYS[g]), "{roll:#}");
        assert_eq!(gw["step"], json!("done"), "{roll:#}");
        assert_eq!(gw["old_pid"], json!(before[g]), "{roll:#}");
        assert_eq!(gw["new_pid"], json!(after_api[g]), "{roll:#}");
        assert_eq!(gw["moved"], json!(DEVICES), "{roll:#}");
        assert_ne!(before[g], after_api[g], "{} kept its pid", GATEWAYS[g]);
    }

    // 2. Through the CLI: the table, then --json with all three again.
    let shown = ctl(&ops, &["restart", "gw-b"]).await;
    assert!(
        shown
            .lines()
            .any(|l| l.starts_with("gw-b") && l.contains("done")),
        "{shown}"
    );
    let roll: Value =
        serde_json::from_str(&ctl(&ops, &["--json", "restart", "gw-a", "gw-b", "gw-c"]).await)?;
    successors.add(&roll);
    let after_cli = pids(&ops, &GATEWAYS).await;
    for g in 0..GATEWAYS.len() {
        assert_eq!(roll["gateways"][g]["step"], json!("done"), "{roll:#}");
        assert_eq!(
            roll["gateways"][g]["new_pid"],
            json!(after_cli[g]),
            "{roll:#}"
        );
        assert_ne!(after_api[g], after_cli[g], "{} kept its pid", GATEWAYS[g]);
    }

    // 3. A gateway that cannot restart (gw-test runs inside this process) stops the roll
    // with its reason; the gateways after it are skipped, and it keeps serving.
    let url = format!("http://{}", ops.admin_addr);
    let (ok, stdout, stderr) = tether(&[
        "ctl", "--ops", &url, "--token", TOKEN, "restart", "gw-test", "gw-c",
    ])
    .await;
    assert!(!ok, "a failed roll exits 1: {stdout}");
    assert!(stderr.contains("own process"), "{stderr}");
    assert!(
        stdout
            .lines()
            .any(|l| l.starts_with("gw-c") && l.contains("skipped")),
        "{stdout}"
    );
    let (_, roll) = api(&ops, "GET", "/v1/restart", Some(TOKEN), None).await;
    assert_eq!(roll["gateways"][0]["step"], json!("failed"), "{roll:#}");
    assert_eq!(pids(&ops, &["gw-c"]).await[0], after_cli[2]);

    // Traffic stops; every message exactly once, in order, and no device reconnected.
    running.cancel();
    let sent = pushing.await?;
    let mut ups = Vec::new();
    for task in sending {
        ups.push(task.await?);
    }
    for (d, log) in logs.iter().enumerate() {
        let expected = sent[d] as usize;
        let deadline = tokio::time::Instant::now() + DEADLINE;
        while log.lock().expect("lock").messages.len() < expected {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{}: not every push arrived",
                devices[d].0
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    // Anything late or twice would show now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let uplinks = uplinks.lock().expect("lock").clone();
    for (d, log) in logs.iter().enumerate() {
        let did = &devices[d].0;
        let log = log.lock().expect("lock");
        let pushed: Vec<(u64, String)> = (1..=sent[d]).map(|n| (n, n.to_string())).collect();
        assert_eq!(log.messages, pushed, "{did}: every push once, in order");
        assert_eq!(log.reconnects, 0, "{did}: no reconnect");
        assert!(log.disconnects.is_empty(), "{did}: {:?}", log.disconnects);
        let upped: Vec<String> = (1..=ups[d]).map(|n| format!("up{n}")).collect();
        assert_eq!(
            uplinks.get(did).cloned().unwrap_or_default(),
            upped,
            "{did}: every UP once, in order"
        );
    }

    // The audit log has the roll, gateway by gateway.
    let (_, audit) = api(&ops, "GET", "/v1/audit?limit=100", Some(TOKEN), None).await;
    let entries = audit.as_array().cloned().unwrap_or_default();
    let count = |op: &str, outcome: &str| {
        entries
            .iter()
            .filter(|e| e["op"] == json!(op) && e["outcome"] == json!(outcome))
            .count()
    };
    assert_eq!(count("restart.gateway", "ok"), 7, "{audit:#}");
    assert_eq!(count("restart.gateway", "error"), 1, "{audit:#}");
    assert_eq!(count("restart.done", "error"), 1, "{audit:#}");
    drop(devices);
    stop.cancel();
    drop(processes);
    Ok(())
}

/// A successor that cannot hold the gateway's sockets (its descriptor limit, inherited)
/// refuses the takeover: the roll reports the reason and the old process keeps serving.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_refused_takeover_stops_the_roll_and_the_old_process_keeps_serving() -> TestResult {
    const CLIENTS: usize = 60;
    let dir = tempfile::tempdir()?;
    let fixture = Fixture::start(|_| {}).await;
    let stop = CancellationToken::new();
    let _state = start_state(&fixture, stop.clone()).await;
    let tcp = free_addr();
    // 100 descriptors: enough to serve 60 clients, not to take 60 over (plus headroom).
    let _gateway = restartable_gateway(&fixture, dir.path(), "gw-lim", tcp, Some(100))?;
    let ops = start_ops(&fixture).await;
    let before = pids(&ops, &["gw-lim"]).await[0];
    let mut clients = Vec::new();
    for i in 0..CLIENTS {
        let mut client = RawClient::connect(Transport::Tcp, tcp).await;
        client.send(&fixture.login_frame(&format!("lim-{i}"))).await;
        match client.next_frame().await {
            Some(Frame::LoginAck(_)) => clients.push(client),
            other => panic!("expected LOGIN_ACK, got {other:?}"),
        }
    }
    let (status, body) = api(
        &ops,
        "POST",
        "/v1/restart",
        Some(TOKEN),
        Some(json!({"gateways": ["gw-lim"]})),
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let roll = roll_finished(&ops).await;
    let error = roll["error"].as_str().unwrap_or_default();
    assert!(
        error.contains("RLIMIT_NOFILE") && error.contains("60 connections"),
        "{roll:#}"
    );
    assert_eq!(roll["gateways"][0]["step"], json!("failed"), "{roll:#}");
    // The old process serves on: same pid, its clients answered, new logins accepted.
    assert_eq!(pids(&ops, &["gw-lim"]).await[0], before);
    for client in &mut clients {
        client
            .send(&Frame::Ping(Bytes::from_static(b"hi")).encode())
            .await;
        loop {
            match client.next_frame().await {
                Some(Frame::Pong(_)) => break,
                Some(_) => continue,
                None => panic!("the old process closed a client"),
            }
        }
    }
    let mut late = RawClient::connect(Transport::Tcp, tcp).await;
    late.send(&fixture.login_frame("lim-late")).await;
    assert!(matches!(late.next_frame().await, Some(Frame::LoginAck(_))));
    stop.cancel();
    Ok(())
}

/// `tether app --nats <url> set <APP> <setting>`: (success, stdout, stderr).
async fn app_set(fixture: &Fixture, setting: &str) -> (bool, String, String) {
    let nats = fixture.nats.client_url();
    tether(&["app", "--nats", &nats, "set", APP, setting]).await
}

/// A refused setting: `tether app set` fails naming the key, and the API answers 400.
async fn refused(fixture: &Fixture, ops: &RunningOps, key: &str, value: Value) {
    let text = match &value {
        Value::String(s) => s.clone(),
        other => other.to_string(),
    };
    let (ok, stdout, stderr) = app_set(fixture, &format!("{key}={text}")).await;
    assert!(!ok, "{key}={text} accepted: {stdout}");
    assert!(stderr.contains(key), "{stderr}");
    let (status, body) = api(
        ops,
        "POST",
        &format!("/v1/apps/{APP}"),
        Some(TOKEN),
        Some(json!({ "set": { key: value } })),
    )
    .await;
    assert_eq!(status, 400, "{body}");
    assert!(body.to_string().contains(key), "{body}");
}

/// The next DOWN with `body` (other frames, resends included, are skipped): its QoS1 flag
/// and sequence.
async fn down_with(client: &mut RawClient, body: &[u8]) -> (bool, u64) {
    loop {
        match client.next_frame().await {
            Some(Frame::Down {
                header,
                qos1,
                body: got,
            }) if got.as_ref() == body => return (qos1, header.seq),
            Some(_) => {}
            None => panic!(
                "connection closed before {:?}",
                String::from_utf8_lossy(body)
            ),
        }
    }
}

#[tokio::test]
async fn qos_default_set_live_decides_pushes_without_a_qos_header() -> TestResult {
    let fixture = Fixture::start(|_| {}).await;
    add_app(&fixture).await;
    let _state = start_state(&fixture, CancellationToken::new()).await;
    let ops = start_ops(&fixture).await;
    let business = Business::new(fixture.nats_client.clone(), APP);
    let (mut device, _) = fixture.login_as(APP, "qos-1").await;

    // No setting: a push without Tether-Qos is QoS1 (stored with a sequence).
    let reply = business.push(Push::to_dids(["qos-1"], "first")).await?;
    assert!(reply.accepted.iter().all(|a| a.seq > 0), "{reply:?}");
    assert!(down_with(&mut device, b"first").await.0);

    refused(&fixture, &ops, "qos_default", json!(2)).await;
    let (ok, stdout, stderr) = app_set(&fixture, "qos_default=0").await;
    assert!(ok, "{stderr}");
    assert!(stdout.contains("\"qos_default\": 0"), "{stdout}");
    // Applied by the running state: the same push turns QoS0 (written to the device's
    // gateway, no sequence) and arrives without the QoS1 flag.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut n = 0;
    let body = loop {
        n += 1;
        let body = format!("default-{n}");
        let reply = business
            .push(Push::to_dids(["qos-1"], body.clone()))
            .await?;
        if reply
            .accepted
            .iter()
            .any(|a| a.did == "qos-1" && a.seq == 0)
        {
            break body;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "qos_default=0 never applied: {reply:?}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(down_with(&mut device, body.as_bytes()).await, (false, 0));
    // An explicit Tether-Qos still wins.
    let reply = business
        .push(Push::to_dids(["qos-1"], "explicit").qos1())
        .await?;
    assert!(reply.accepted.iter().all(|a| a.seq > 0), "{reply:?}");
    assert!(down_with(&mut device, b"explicit").await.0);
    Ok(())
}

/// Serves `APP`'s uplinks on `subject` (default when `None`), logging their msg ids.
fn log_uplinks(
    fixture: &Fixture,
    subject: Option<String>,
) -> std::sync::Arc<std::sync::Mutex<Vec<u64>>> {
    let log: std::sync::Arc<std::sync::Mutex<Vec<u64>>> = Default::default();
    let mut business = Business::new(fixture.nats_client.clone(), APP);
    if let Some(subject) = subject {
        business = business.with_uplink_subject(subject);
    }
    let seen = log.clone();
    tokio::spawn(async move {
        let _ = business
            .serve_uplinks("tether-biz", move |uplink| {
                seen.lock().expect("lock").push(uplink.msg_id);
                async { tether_business::UplinkReply::stored(None) }
            })
            .await;
    });
    log
}

/// Sends UP `id` and waits for its UP_ACK, which must be code 0.
async fn up_stored(client: &mut RawClient, id: u64) {
    client.send(&up(id)).await;
    loop {
        match client.next_frame().await {
            Some(Frame::UpAck(ack)) if ack.client_msg_id == id => {
                assert_eq!(ack.code, 0, "{ack:?}");
                return;
            }
            Some(_) => {}
            None => panic!("connection closed before UP_ACK {id}"),
        }
    }
}

#[tokio::test]
async fn business_subject_set_live_moves_uplinks_to_another_service() -> TestResult {
    let fixture = Fixture::start(|_| {}).await;
    add_app(&fixture).await;
    let _state = start_state(&fixture, CancellationToken::new()).await;
    let ops = start_ops(&fixture).await;
    let v2 = tether_nats::subjects::business_named(APP, "v2");
    let old = log_uplinks(&fixture, None);
    let new = log_uplinks(&fixture, Some(v2.clone()));
    let (mut device, _) = fixture.login_as(APP, "biz-1").await;
    up_stored(&mut device, 1).await;
    assert_eq!(*old.lock().expect("lock"), [1]);

    // Only the app's own `biz` subjects, literal.
    refused(
        &fixture,
        &ops,
        "business_subject",
        json!(tether_nats::subjects::business_named("other", "up")),
    )
    .await;
    refused(
        &fixture,
        &ops,
        "business_subject",
        json!(tether_nats::subjects::business_named(APP, "*")),
    )
    .await;
    refused(
        &fixture,
        &ops,
        "business_subject",
        json!(tether_nats::subjects::push(APP)),
    )
    .await;

    let shown = ctl(
        &ops,
        &["app", "set", APP, &format!("business_subject={v2}")],
    )
    .await;
    assert!(shown.contains(&v2), "{shown}");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut id = 1;
    while new.lock().expect("lock").is_empty() {
        id += 1;
        up_stored(&mut device, id).await;
        assert!(
            tokio::time::Instant::now() < deadline,
            "business_subject never applied"
        );
    }
    assert_eq!(*new.lock().expect("lock"), [id]);
    // Cleared: back to tether.<app>.biz.up.
    let (ok, _, stderr) = app_set(&fixture, "business_subject=").await;
    assert!(ok, "{stderr}");
    let before = old.lock().expect("lock").len();
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while old.lock().expect("lock").len() == before {
        id += 1;
        up_stored(&mut device, id).await;
        assert!(
            tokio::time::Instant::now() < deadline,
            "cleared business_subject never applied"
        );
    }
    Ok(())
}

#[tokio::test]
async fn inbox_retention_set_live_expires_an_apps_stored_messages() -> TestResult {
    let fixture = Fixture::start(|_| {}).await;
    add_app(&fixture).await;
    let _state = start_state(&fixture, CancellationToken::new()).await;
    let ops = start_ops(&fixture).await;
    let business = Business::new(fixture.nats_client.clone(), APP);
    let inbox = async_nats::jetstream::new(fixture.nats_client.clone())
        .get_stream(tether_nats::layout::INBOX_STREAM)
        .await?;
    let mut n = 0;

    refused(&fixture, &ops, "inbox_retention", json!(0)).await;
    refused(&fixture, &ops, "inbox_retention", json!("1h")).await;
    let (ok, _, stderr) = app_set(&fixture, "inbox_retention=1").await;
    assert!(ok, "{stderr}");
    // Once the running state applied it, a QoS1 message for an offline device is stored
    // with a one-second TTL (without the setting it stays for the stream's 24 h) ...
    let did = stored_with_ttl(&business, &inbox, &mut n, Some("1")).await?;
    // ... and leaves the inbox.
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        match inbox
            .direct_get_last_for_subject(tether_nats::subjects::inbox(APP, &did))
            .await
        {
            Err(e) if e.kind() == async_nats::jetstream::stream::DirectGetErrorKind::NotFound => {
                break;
            }
            Err(e) => return Err(e.into()),
            Ok(_) => {}
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the message never expired"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    // A longer retention, so what is pushed next cannot expire before it is delivered.
    let (ok, _, stderr) = app_set(&fixture, "inbox_retention=3600").await;
    assert!(ok, "{stderr}");
    stored_with_ttl(&business, &inbox, &mut n, Some("3600")).await?;
    // The device finds nothing of the expired message, and gets what is pushed next.
    let (mut device, _) = fixture.login_as(APP, &did).await;
    business
        .push(Push::to_dids([did.as_str()], "after").qos1())
        .await?;
    assert!(down_with(&mut device, b"after").await.0);
    // Cleared: stored without a TTL again (the stream's max_age).
    let (ok, _, stderr) = app_set(&fixture, "inbox_retention=").await;
    assert!(ok, "{stderr}");
    stored_with_ttl(&business, &inbox, &mut n, None).await?;
    Ok(())
}

/// Pushes a QoS1 message to a fresh offline device (`ret-<n>`) until one is stored with
/// `ttl` as its `Nats-TTL` (state applied the app's `inbox_retention`); that device.
async fn stored_with_ttl(
    business: &Business,
    inbox: &async_nats::jetstream::stream::Stream,
    n: &mut u64,
    ttl: Option<&str>,
) -> Result<String, Box<dyn std::error::Error + Send + Sync>> {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        *n += 1;
        let did = format!("ret-{n}");
        business
            .push(Push::to_dids([did.as_str()], "stored").qos1())
            .await?;
        let stored = inbox
            .direct_get_last_for_subject(tether_nats::subjects::inbox(APP, &did))
            .await?;
        let got = stored.headers.get(tether_nats::headers::MSG_TTL);
        if got.map(|v| v.as_str()) == ttl {
            return Ok(did);
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "inbox_retention {ttl:?} never applied (last stored with {got:?})"
        );
    }
}

/// An ipconfig on the fixture's NATS (its own token key: only its answers are looked at).
async fn start_ipconfig(
    fixture: &Fixture,
    id: &str,
    stop: CancellationToken,
) -> (tether_ipconfig::RunningIpconfig, tempfile::TempDir) {
    let dir = tempfile::tempdir().expect("tempdir");
    let key = dir.path().join("token.key");
    tether_auth::write_keypair(&key, false).expect("keypair");
    let config = tether_ipconfig::IpconfigConfig {
        id: id.into(),
        record_interval_ms: 200,
        nats_url: fixture.nats.client_url(),
        nats: fixture.nats_auth.clone(),
        admin_listen: "127.0.0.1:0".parse().expect("addr"),
        http_listen: "127.0.0.1:0".parse().expect("addr"),
        token_key: key,
        ..Default::default()
    };
    let running = tether_ipconfig::start(config, stop)
        .await
        .expect("ipconfig starts");
    (running, dir)
}

/// `GET /v1/endpoints` of `ipconfig` with a credential of `did` in APP: status and body.
async fn discover(ipconfig: SocketAddr, did: &str) -> (u16, Value) {
    let credential = tether_ipconfig::sign_hs256(
        "a-secret-of-sixteen-chars",
        &tether_ipconfig::CredentialClaims {
            app: APP.into(),
            uid: format!("u-{did}"),
            did: did.into(),
            exp: tether_auth::unix_now() + 600,
            iat: None,
        },
    )
    .expect("credential");
    let answer = tether_ops::http::request(
        "GET",
        &format!("http://{ipconfig}/v1/endpoints"),
        Some(&credential),
        None,
        Duration::from_secs(30),
    )
    .await
    .expect("http");
    let body = serde_json::from_slice(&answer.body).unwrap_or(Value::Null);
    (answer.status, body)
}

#[tokio::test]
async fn pausing_an_app_stops_its_discovery_and_logins_until_resumed() -> TestResult {
    let fixture = Fixture::start(|_| {}).await;
    add_app(&fixture).await;
    let ops = start_ops(&fixture).await;
    let (ipconfig, _key) = start_ipconfig(&fixture, "ipc-pause", fixture.shutdown.clone()).await;
    // Discovery works before (the fixture's gateway heartbeat is live).
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (status, body) = discover(ipconfig.http_addr, "p-1").await;
        if status == 200 {
            assert_eq!(body["app"], json!(APP));
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{status} {body}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let (mut online, _) = fixture.login_as(APP, "p-online").await;

    // Paused through the CLI: ipconfig refuses discovery with app_paused (503,
    // retryable), the open connection is closed and a new LOGIN refused with the same code.
    let shown = ctl(&ops, &["app", "pause", APP]).await;
    assert!(shown.contains("\"paused\": true"), "{shown}");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (status, body) = discover(ipconfig.http_addr, "p-1").await;
        if status == 503 {
            assert_eq!(body["error"]["code"], json!("app_paused"), "{body}");
            assert!(
                body["error"]["message"]
                    .as_str()
                    .is_some_and(|m| m.contains("paused")),
                "{body}"
            );
            break;
        }
        assert_eq!(status, 200, "{body}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "ipconfig never applied the pause"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    online.expect_close(ErrorCode::AppPaused).await;
    let mut refused = RawClient::connect(Transport::Tcp, fixture.tcp).await;
    refused.send(&fixture.login_frame("p-2")).await;
    refused.expect_close(ErrorCode::AppPaused).await;

    // Resumed through the API: discovery and logins work again.
    let (status, body) = api(
        &ops,
        "POST",
        &format!("/v1/apps/{APP}/resume"),
        Some(TOKEN),
        None,
    )
    .await;
    assert_eq!(status, 200, "{body}");
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (status, body) = discover(ipconfig.http_addr, "p-1").await;
        if status == 200 {
            break;
        }
        assert_eq!(body["error"]["code"], json!("app_paused"), "{body}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "ipconfig never applied the resume"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let mut client = RawClient::connect(Transport::Tcp, fixture.tcp).await;
        client.send(&fixture.login_frame("p-3")).await;
        match client.next_frame().await {
            Some(Frame::LoginAck(_)) => break,
            Some(Frame::Error { error, .. }) => {
                assert_eq!(error.code, u32::from(ErrorCode::AppPaused.as_u16()))
            }
            other => panic!("expected LOGIN_ACK or app_paused, got {other:?}"),
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the gateway never applied the resume"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Both operations are in the audit log.
    let audit = ctl(&ops, &["--json", "audit"]).await;
    let audit: Value = serde_json::from_str(&audit)?;
    for op in ["app.pause", "app.resume"] {
        assert!(
            audit
                .as_array()
                .into_iter()
                .flatten()
                .any(|e| e["op"] == json!(op) && e["outcome"] == json!("ok")),
            "{op} not audited: {audit}"
        );
    }
    Ok(())
}

#[tokio::test]
async fn cluster_view_shows_ipconfig_instances_and_message_rates_per_app() -> TestResult {
    let fixture = Fixture::start(|_| {}).await;
    add_app(&fixture).await;
    let _state = start_state(&fixture, CancellationToken::new()).await;
    let _business = log_uplinks(&fixture, None);
    let ops = start_ops(&fixture).await;
    let stop_ipconfig = CancellationToken::new();
    let (ipconfig, _key) = start_ipconfig(&fixture, "ipc-view", stop_ipconfig.clone()).await;

    // The ipconfig instance is listed, with its address, through the API and the CLI.
    let http = ipconfig.http_addr.to_string();
    cluster_until(&ops, "the ipconfig instance", |c| {
        c["ipconfigs"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|i| i["id"] == json!("ipc-view") && i["http"] == json!(http))
    })
    .await;
    let table = ctl(&ops, &["ipconfigs"]).await;
    assert!(
        table.contains("ipc-view") && table.contains(&http),
        "{table}"
    );
    let listed: Value = serde_json::from_str(&ctl(&ops, &["--json", "ipconfigs"]).await)?;
    assert_eq!(listed[0]["id"], json!("ipc-view"), "{listed}");
    assert!(ctl(&ops, &["status"]).await.contains("ipc-view"));

    // Uplinks of the app (each answered by an UP_ACK) show as its rates in and out.
    let (mut device, _) = fixture.login_as(APP, "rate-view").await;
    let deadline = tokio::time::Instant::now() + DEADLINE;
    let mut id = 0;
    let rates = loop {
        id += 1;
        up_stored(&mut device, id).await;
        let (_, apps) = api(&ops, "GET", "/v1/apps", Some(TOKEN), None).await;
        let app = apps
            .as_array()
            .into_iter()
            .flatten()
            .find(|a| a["id"] == json!(APP))
            .cloned()
            .unwrap_or(Value::Null);
        let (r_in, r_out) = (
            app["msgs_in_per_sec"].as_f64().unwrap_or(0.0),
            app["msgs_out_per_sec"].as_f64().unwrap_or(0.0),
        );
        if r_in > 0.0 && r_out > 0.0 {
            break app;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "no per-app rate: {app}"
        );
        // Under the gateway's frames-per-second limit per connection.
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert!(rates["connections"].as_u64() >= Some(1), "{rates}");
    let table = ctl(&ops, &["apps"]).await;
    assert!(table.contains("IN/S") && table.contains("OUT/S"), "{table}");

    // A stopped ipconfig leaves the view (its record is deleted).
    stop_ipconfig.cancel();
    ipconfig.wait().await;
    cluster_until(&ops, "the ipconfig gone", |c| {
        !c["ipconfigs"]
            .as_array()
            .into_iter()
            .flatten()
            .any(|i| i["id"] == json!("ipc-view"))
    })
    .await;
    Ok(())
}
