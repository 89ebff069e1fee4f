//! Restart by hand-off (docs/handoff.md) over real sockets and a real nats-server: a new
//! gateway process takes the listeners and connections of the running one; devices see no
//! disconnect, downlinks published meanwhile arrive once and in order, and a failure before
//! commit leaves the old process serving.

mod support;
#[path = "support/tls.rs"]
mod tls;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use support::{APP, Fixture, GW, RawClient, TestResult, Transport, WAIT, http_get};
use tether_gateway::GatewayConfig;
use tether_schemas::{Frame, pb};
use tokio::io::{AsyncBufReadExt, BufReader};
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

fn down(seq: u64) -> Bytes {
    Frame::Down {
        header: pb::Down {
            seq,
            ..Default::default()
        },
        qos1: false,
        body: Bytes::from(seq.to_string()),
    }
    .encode()
}

/// A metric's value from a `/metrics` page (the first sample whose name and labels start
/// with `prefix`).
async fn metric(admin: std::net::SocketAddr, prefix: &str) -> f64 {
    let page = http_get(admin, "/metrics").await;
    page.lines()
        .filter(|line| line.starts_with(prefix))
        .filter_map(|line| line.rsplit(' ').next()?.parse::<f64>().ok())
        .next()
        .unwrap_or(0.0)
}

/// Waits until `check` holds, polling.
async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + WAIT;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {WAIT:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Logs `count` raw clients in, alternating TCP and WebSocket when `ws`.
async fn raw_clients(fixture: &Fixture, count: usize, ws: bool) -> Vec<(String, RawClient)> {
    let mut clients = Vec::with_capacity(count);
    for i in 0..count {
        let transport = if ws && i % 2 == 1 {
            Transport::Ws
        } else {
            Transport::Tcp
        };
        let did = format!("d{i}");
        let (client, _) = fixture.login(transport, &did).await;
        clients.push((did, client));
    }
    clients
}

/// Publishes DOWN 1..=count to `dids` on the gateway's subject, one every `every`.
fn push_stream(
    nats: async_nats::Client,
    gw: &str,
    dids: Vec<String>,
    count: u64,
    every: Duration,
) -> tokio::task::JoinHandle<()> {
    let subject = tether_nats::subjects::gateway_down(gw);
    tokio::spawn(async move {
        for seq in 1..=count {
            let mut headers = async_nats::HeaderMap::new();
            headers.insert("Tether-App", APP);
            for did in &dids {
                headers.append("Tether-Did", did.as_str());
            }
            nats.publish_with_headers(subject.clone(), headers, down(seq))
                .await
                .expect("publish");
            tokio::time::sleep(every).await;
        }
        nats.flush().await.expect("flush");
    })
}

/// Reads DOWN frames until `count` arrived; their seqs, in arrival order.
async fn read_downs(client: &mut RawClient, count: usize) -> Vec<u64> {
    let mut seqs = Vec::with_capacity(count);
    while seqs.len() < count {
        match client.next_frame().await {
            Some(Frame::Down { header, .. }) => seqs.push(header.seq),
            Some(_) => {}
            None => panic!("connection closed after {} downs", seqs.len()),
        }
    }
    seqs
}

/// A ping answered by the gateway: the connection is alive and served.
async fn ping(client: &mut RawClient) {
    client
        .send(&Frame::Ping(Bytes::from_static(b"hi")).encode())
        .await;
    loop {
        match client.next_frame().await {
            Some(Frame::Pong(body)) => {
                assert_eq!(&body[..], b"hi");
                return;
            }
            Some(_) => continue,
            None => panic!("connection closed instead of PONG"),
        }
    }
}

fn successor_config(fixture: &Fixture, socket: &Path) -> GatewayConfig {
    GatewayConfig {
        handoff_socket: Some(socket.to_path_buf()),
        ..fixture.gateway_config(GW)
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tcp_and_websocket_connections_move_and_downlinks_arrive_once_in_order() -> TestResult {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("gw.sock");
    let mut fixture = Fixture::start(|c| c.handoff_socket = Some(socket.clone())).await;
    let mut clients = raw_clients(&fixture, 40, true).await;
    let dids: Vec<String> = clients.iter().map(|(did, _)| did.clone()).collect();
    let old_admin = fixture.admin;
    assert_eq!(metric(old_admin, "tether_gateway_connections ").await, 40.0);

    const PUSHES: u64 = 300;
    let pushing = push_stream(
        fixture.nats_client.clone(),
        GW,
        dids,
        PUSHES,
        Duration::from_millis(4),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stop = CancellationToken::new();
    let successor = tether_gateway::start_with(
        successor_config(&fixture, &socket),
        stop.clone(),
        Some(&socket),
    )
    .await?;
    assert_eq!(successor.tcp_addr, Some(fixture.tcp), "same listener");
    assert_eq!(successor.ws_addr, Some(fixture.ws), "same listener");
    let old = fixture.gateway.take().ok_or("old gateway")?;
    assert!(old.handed_over());
    tokio::time::timeout(WAIT, old.wait()).await?;
    pushing.await?;

    for (did, client) in &mut clients {
        let seqs = read_downs(client, PUSHES as usize).await;
        assert_eq!(
            seqs,
            (1..=PUSHES).collect::<Vec<_>>(),
            "{did}: every downlink once, in order"
        );
        ping(client).await;
    }
    assert_eq!(
        metric(successor.admin_addr, "tether_gateway_connections ").await,
        40.0
    );
    assert_eq!(successor.sessions(), 40);
    // The successor accepts new clients on the same listener.
    let (mut late, _) = fixture.login(Transport::Tcp, "late").await;
    ping(&mut late).await;
    stop.cancel();
    successor.wait().await;
    Ok(())
}

/// What one SDK device saw: QoS1 `(seq, body)` in order, and any connection change.
#[derive(Default)]
struct Seen {
    messages: Vec<(u64, String)>,
    reconnects: usize,
    disconnects: Vec<String>,
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_devices_keep_their_connections_across_a_handoff_under_load() -> TestResult {
    use std::sync::{Arc, Mutex};
    use support::stack::{device, start_state};
    use tether_business::{Business, Push, UplinkReply};
    use tether_client::Event;

    /// Devices (about 16 s for the whole test with a debug build on two shared cores).
    const DEVICES: usize = 1000;
    /// Business pushes per second (QoS1, round robin over the devices).
    const RATE: u64 = 200;
    const PUSHES: u64 = 800;
    /// UPs per second from the devices (round robin), and how many.
    const UP_RATE: u64 = 100;
    const UPS: usize = 400;

    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("gw.sock");
    // As in production: LOGIN_ACK once state registered the device (an UP sent right after
    // an unregistered login can lose its UP_ACK under load, hand-off or not).
    let mut fixture = Fixture::start(|c| {
        c.handoff_socket = Some(socket.clone());
        c.await_registration = true;
    })
    .await;
    let _state = start_state(&fixture, CancellationToken::new()).await;
    let business = Business::new(fixture.nats_client.clone(), APP);
    let serving = business.clone();
    tokio::spawn(async move {
        let _ = serving
            .serve_uplinks("tether-biz", |up| async move {
                UplinkReply::stored(Some(format!("{}-{}", up.did, up.msg_id)))
            })
            .await;
    });

    let mut devices = Vec::with_capacity(DEVICES);
    let mut seen: Vec<Arc<Mutex<Seen>>> = Vec::with_capacity(DEVICES);
    for i in 0..DEVICES {
        let did = format!("s{i}");
        let (client, mut events) = device(&fixture, fixture.tcp, &did).await;
        let log: Arc<Mutex<Seen>> = Arc::default();
        let writer = log.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                let mut seen = writer.lock().expect("lock");
                match event {
                    Event::Message { seq, body, .. } => {
                        seen.messages
                            .push((seq, String::from_utf8_lossy(&body).to_string()));
                    }
                    Event::Connected { .. } => seen.reconnects += 1,
                    Event::Disconnected { reason, .. } => seen.disconnects.push(reason),
                    _ => {}
                }
            }
        });
        devices.push((did, client));
        seen.push(log);
    }
    assert_eq!(
        metric(fixture.admin, "tether_gateway_connections ").await,
        DEVICES as f64
    );

    // The business pushes QoS1 at RATE/s, round robin; body `<n>` = the device's n-th.
    let dids: Vec<String> = devices.iter().map(|(did, _)| did.clone()).collect();
    let pusher = business.clone();
    let pushing = tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_micros(1_000_000 / RATE));
        let mut sent = vec![0u64; dids.len()];
        for i in 0..PUSHES as usize {
            interval.tick().await;
            let d = i % dids.len();
            sent[d] += 1;
            pusher
                .push(Push::to_dids(
                    [dids[d].as_str()],
                    sent[d].to_string().into_bytes(),
                ))
                .await
                .expect("push accepted");
        }
        sent
    });
    // Devices send UPs at UP_RATE/s (round robin) before, during and after the hand-off;
    // each is awaited on its own until its UP_ACK.
    let senders: Vec<tether_client::Client> = devices.iter().map(|(_, c)| c.clone()).collect();
    let uplinks = tokio::spawn(async move {
        let mut interval = tokio::time::interval(Duration::from_micros(1_000_000 / UP_RATE));
        let mut waiting = Vec::new();
        for i in 0..UPS {
            interval.tick().await;
            let sent = senders[i % senders.len()].send(format!("up{i}").into_bytes());
            waiting.push(tokio::spawn(sent));
        }
        let mut receipts = 0;
        for (i, ack) in waiting.into_iter().enumerate() {
            let ack = ack.await.expect("uplink task");
            assert!(ack.is_ok(), "UP {i} got no receipt: {ack:?}");
            receipts += 1;
        }
        receipts
    });

    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let stop = CancellationToken::new();
    let successor = tether_gateway::start_with(
        GatewayConfig {
            await_registration: true,
            ..successor_config(&fixture, &socket)
        },
        stop.clone(),
        Some(&socket),
    )
    .await?;
    let old = fixture.gateway.take().ok_or("old gateway")?;
    tokio::time::timeout(WAIT, old.wait()).await?;

    let sent = pushing.await?;
    assert_eq!(uplinks.await?, UPS, "every UP got its receipt");
    for (d, log) in seen.iter().enumerate() {
        let expected = sent[d] as usize;
        eventually("every QoS1 message delivered", async || {
            log.lock().expect("lock").messages.len() >= expected
        })
        .await;
    }
    // Anything late or twice would show now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (d, log) in seen.iter().enumerate() {
        let seen = log.lock().expect("lock");
        let expected: Vec<(u64, String)> = (1..=sent[d]).map(|n| (n, n.to_string())).collect();
        assert_eq!(
            seen.messages, expected,
            "{}: exactly once, in order",
            devices[d].0
        );
        assert_eq!(seen.reconnects, 0, "{}: no reconnect", devices[d].0);
        assert!(
            seen.disconnects.is_empty(),
            "{}: {:?}",
            devices[d].0,
            seen.disconnects
        );
    }
    assert_eq!(
        metric(successor.admin_addr, "tether_gateway_connections ").await,
        DEVICES as f64,
        "connection gauge equal before and after"
    );
    stop.cancel();
    successor.wait().await;
    Ok(())
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
        let status = std::process::Command::new(cargo)
            .args(["build", "-p", "tether"])
            .current_dir(&root)
            .status()
            .expect("cargo build -p tether");
        assert!(status.success(), "cargo build -p tether failed");
    }
    bin
}

fn free_port() -> std::net::SocketAddr {
    tether_nats::harness::free_addr().expect("free loopback port")
}

/// `tether gateway` as its own process (killed when dropped): `id`, the fixture's NATS and
/// token key, `extra` flags; stderr piped (info logs).
fn gateway_process(fixture: &Fixture, id: &str, extra: &[&str], envs: &[(&str, &str)]) -> Child {
    let key = fixture.gateway_config(id).token_public_key;
    let mut command = Command::new(tether_bin());
    command
        .arg("gateway")
        .args(["--id", id, "--nats", &fixture.nats.client_url()])
        .arg("--token-public-key")
        .arg(&key)
        .args(extra)
        .env("TETHER_GATEWAY_AWAIT_REGISTRATION", "false")
        .env("RUST_LOG", "info")
        .envs(envs.iter().copied())
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .kill_on_drop(true);
    command.spawn().expect("tether gateway starts")
}

/// Reads a child's stderr until a line contains `needle`; the rest is drained to our
/// stderr in the background.
async fn wait_for_line(child: &mut Child, needle: &str) -> String {
    let stderr = child.stderr.take().expect("piped stderr");
    let mut lines = BufReader::new(stderr).lines();
    let found = tokio::time::timeout(WAIT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("child: {line}");
            if line.contains(needle) {
                return Some(line);
            }
        }
        None
    })
    .await
    .ok()
    .flatten()
    .unwrap_or_else(|| panic!("the child never logged {needle:?}"));
    tokio::spawn(async move {
        while let Ok(Some(line)) = lines.next_line().await {
            eprintln!("child: {line}");
        }
    });
    found
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn new_process_killed_after_prepare_leaves_the_old_one_serving() -> TestResult {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("gw.sock");
    let fixture = Fixture::start(|c| c.handoff_socket = Some(socket.clone())).await;
    let mut clients = raw_clients(&fixture, 30, true).await;
    let dids: Vec<String> = clients.iter().map(|(did, _)| did.clone()).collect();

    // The successor holds once prepared (every socket received, subscribed, downlinks
    // held): it is killed there, before it asks to commit.
    let socket_arg = socket.to_string_lossy().to_string();
    let mut successor = gateway_process(
        &fixture,
        GW,
        &["--takeover", &socket_arg],
        &[("TETHER_GATEWAY_HANDOFF_HOLD_MS", "8000")],
    );
    wait_for_line(&mut successor, "hand-off prepared").await;
    // Downlinks published while the successor held them go to the devices through the
    // old process (it was never asked to commit).
    let pushing = push_stream(
        fixture.nats_client.clone(),
        GW,
        dids.clone(),
        50,
        Duration::from_millis(2),
    );
    pushing.await?;
    successor.start_kill()?;
    successor.wait().await?;
    eventually("the old process saw the abort", async || {
        metric(
            fixture.admin,
            "tether_gateway_handoffs_total{outcome=\"aborted\"}",
        )
        .await
            == 1.0
    })
    .await;

    for (did, client) in &mut clients {
        let seqs = read_downs(client, 50).await;
        assert_eq!(seqs, (1..=50).collect::<Vec<_>>(), "{did}");
        ping(client).await;
    }
    fixture.push(&["d0"], down(51)).await;
    assert_eq!(read_downs(&mut clients[0].1, 1).await, vec![51]);
    assert_eq!(
        metric(fixture.admin, "tether_gateway_connections ").await,
        30.0
    );
    assert_eq!(
        metric(fixture.admin, "tether_gateway_disconnects_total").await,
        0.0,
        "no device was disconnected"
    );
    // Accepting resumed.
    let (mut late, _) = fixture.login(Transport::Tcp, "late").await;
    ping(&mut late).await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_process_killed_right_after_commit_loses_nothing() -> TestResult {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("gw.sock");
    let fixture = Fixture::start(|_| {}).await;
    let (tcp, ws, admin) = (free_port(), free_port(), free_port());
    let socket_arg = socket.to_string_lossy().to_string();
    let mut old = gateway_process(
        &fixture,
        "gw-proc",
        &[
            "--tcp",
            &tcp.to_string(),
            "--ws",
            &ws.to_string(),
            "--admin",
            &admin.to_string(),
            "--handoff-socket",
            &socket_arg,
        ],
        &[],
    );
    wait_for_line(&mut old, "gateway started").await;
    let mut clients = Vec::new();
    for i in 0..30 {
        let (transport, addr) = if i % 2 == 0 {
            (Transport::Tcp, tcp)
        } else {
            (Transport::Ws, ws)
        };
        let did = format!("p{i}");
        let mut client = RawClient::connect(transport, addr).await;
        client.send(&fixture.login_frame(&did)).await;
        match client.next_frame().await {
            Some(Frame::LoginAck(_)) => {}
            other => panic!("expected LOGIN_ACK, got {other:?}"),
        }
        clients.push((did, client));
    }
    let dids: Vec<String> = clients.iter().map(|(did, _)| did.clone()).collect();
    const PUSHES: u64 = 300;
    let pushing = push_stream(
        fixture.nats_client.clone(),
        "gw-proc",
        dids,
        PUSHES,
        Duration::from_millis(4),
    );
    tokio::time::sleep(Duration::from_millis(300)).await;
    let stop = CancellationToken::new();
    let config = GatewayConfig {
        handoff_socket: Some(socket.clone()),
        ..fixture.gateway_config("gw-proc")
    };
    let successor = tether_gateway::start_with(config, stop.clone(), Some(&socket)).await?;
    // Committed: the old process dies at once, without its orderly exit.
    let _ = old.start_kill();
    old.wait().await?;
    assert_eq!(successor.tcp_addr, Some(tcp));
    assert_eq!(successor.admin_addr, admin, "the admin listener moved too");
    pushing.await?;
    for (did, client) in &mut clients {
        let seqs = read_downs(client, PUSHES as usize).await;
        assert_eq!(
            seqs,
            (1..=PUSHES).collect::<Vec<_>>(),
            "{did}: every downlink once, in order"
        );
        ping(client).await;
    }
    assert_eq!(successor.sessions(), 30);
    stop.cancel();
    successor.wait().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_takeover_over_the_fd_limit_is_refused_before_anything_moves() -> TestResult {
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("gw.sock");
    let fixture = Fixture::start(|c| c.handoff_socket = Some(socket.clone())).await;
    let mut clients = raw_clients(&fixture, 60, false).await;
    let key = fixture.gateway_config(GW).token_public_key;
    let script = format!(
        "ulimit -n 100 && exec {} gateway --id {GW} --nats {} --token-public-key {} --takeover {}",
        tether_bin().display(),
        fixture.nats.client_url(),
        key.display(),
        socket.display()
    );
    let output = tokio::time::timeout(
        WAIT,
        Command::new("bash")
            .args(["-c", &script])
            .env("RUST_LOG", "warn")
            .stdin(Stdio::null())
            .output(),
    )
    .await??;
    let stderr = String::from_utf8_lossy(&output.stderr);
    assert!(!output.status.success(), "the takeover must fail");
    assert!(
        stderr.contains("RLIMIT_NOFILE") && stderr.contains("60 connections"),
        "clear error: {stderr}"
    );
    eventually("the old process saw the refusal", async || {
        metric(
            fixture.admin,
            "tether_gateway_handoffs_total{outcome=\"aborted\"}",
        )
        .await
            == 1.0
    })
    .await;
    for (_, client) in &mut clients {
        ping(client).await;
    }
    let (mut late, _) = fixture.login(Transport::Tcp, "late").await;
    ping(&mut late).await;
    Ok(())
}

/// TLS sessions cannot move: at the commit the old process redirects each TLS device to
/// the same listener (now the successor's) with a fresh token, and serves it until its new
/// login is registered there. QoS1 pushes before, during and after the hand-off reach every
/// device once and in order; no device sees an ERROR or loses its connection before its
/// new login.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_devices_are_redirected_to_the_successor_and_lose_nothing() -> TestResult {
    use crate::tls::{TlsCert, TlsDevice};
    use std::sync::Arc;
    use support::stack::{push_round, redirect_request, start_ipconfig, start_state};

    const DEVICES: usize = 40;
    const ROUNDS: u32 = 6;
    let cert = Arc::new(TlsCert::new());
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("gw.sock");
    let (files, handoff) = (cert.files.clone(), socket.clone());
    let tls_gateway = move |c: &mut GatewayConfig| {
        c.tls = Some(files.clone());
        c.handoff_socket = Some(handoff.clone());
        c.await_registration = true;
        c.heartbeat_interval_ms = 200;
    };
    let mut fixture = Fixture::start(tls_gateway.clone()).await;
    let stop = CancellationToken::new();
    let _state = start_state(&fixture, stop.clone()).await;
    let (_ipconfig, _key) = start_ipconfig(&fixture, stop.clone()).await;
    // ipconfig sends a gateway's devices back to it only when it hands over and names
    // itself.
    let device = serde_json::json!([{"app": APP, "uid": "u", "did": "probe", "transport": "tcp"}]);
    eventually("ipconfig grants the hand-off target", async || {
        let reply = redirect_request(
            &fixture,
            GW,
            serde_json::json!({"target": GW, "handoff": true, "devices": device}),
        )
        .await;
        reply.grants.first().and_then(|g| g.gw.as_deref()) == Some(GW)
    })
    .await;
    for body in [
        serde_json::json!({"target": GW, "devices": device}),
        serde_json::json!({"target": "ipconfig", "handoff": true, "devices": device}),
    ] {
        let reply = redirect_request(&fixture, GW, body).await;
        assert_eq!(
            reply.grants[0].gw, None,
            "never back to the requester otherwise"
        );
    }

    let mut devices = Vec::with_capacity(DEVICES);
    for i in 0..DEVICES {
        let did = format!("t{i}");
        let token = fixture.token(&did);
        devices.push(TlsDevice::start(cert.clone(), fixture.tcp, &did, token).await);
    }
    let dids: Vec<String> = devices.iter().map(|d| d.did.clone()).collect();
    let business = tether_business::Business::new(fixture.nats_client.clone(), APP);
    push_round(&business, &dids, 1).await;
    // Rounds 2 to 5 while the hand-off runs, round 6 once the old process is gone.
    let pushing = {
        let (business, dids) = (business.clone(), dids.clone());
        tokio::spawn(async move {
            for round in 2..ROUNDS {
                push_round(&business, &dids, round).await;
            }
        })
    };
    let successor_stop = CancellationToken::new();
    let mut config = successor_config(&fixture, &socket);
    tls_gateway(&mut config);
    let successor =
        tether_gateway::start_with(config, successor_stop.clone(), Some(&socket)).await?;
    assert_eq!(successor.tcp_addr, Some(fixture.tcp), "same listener");
    let old = fixture.gateway.take().ok_or("old gateway")?;
    assert!(old.handed_over());
    // The old process exits once every TLS device logged in again at the successor
    // (bounded by migrate_timeout_secs; this only guards against a hang).
    tokio::time::timeout(Duration::from_secs(120), old.wait()).await?;
    pushing.await?;
    push_round(&business, &dids, ROUNDS).await;

    every_round_arrived_once(&devices, ROUNDS).await;
    for device in &devices {
        let did = &device.did;
        let log = device.log.lock().expect("lock");
        assert_eq!(log.reconnects, 0, "{did}: no disconnect");
        let redirect = match &log.redirects[..] {
            [one] => one,
            other => panic!("{did}: one REDIRECT expected, got {other:?}"),
        };
        assert_eq!(
            redirect.endpoint,
            fixture.tcp.to_string(),
            "{did}: same listener"
        );
        assert_eq!(redirect.reason, "handoff");
        let [(_, first), (resume, again)] = &log.logins[..] else {
            panic!("{did}: two logins expected, got {:?}", log.logins);
        };
        assert_eq!(again.gateway, GW);
        assert_ne!(again.conn_id, first.conn_id, "{did}: a new connection");
        // Logged in again with its resume point: what it had got before the REDIRECT.
        assert!(*resume >= 1, "{did}: resumed from {resume}");
    }
    assert_eq!(successor.sessions(), DEVICES);
    successor_stop.cancel();
    successor.wait().await;
    stop.cancel();
    Ok(())
}

/// The old process dies (SIGKILL) while it redirects its TLS devices after the commit:
/// each device either finishes its redirect or, its connection gone, logs in again through
/// the normal path (which ones is up to timing); either way at the successor, with every
/// QoS1 message once and in order.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn old_process_killed_while_redirecting_tls_devices_loses_nothing() -> TestResult {
    use crate::tls::{TlsCert, TlsDevice};
    use std::sync::Arc;
    use support::stack::{push_round, redirect_request, start_ipconfig, start_state};

    const DEVICES: usize = 30;
    const ROUNDS: u32 = 5;
    const ID: &str = "gw-proc";
    let cert = Arc::new(TlsCert::new());
    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("gw.sock");
    let mut fixture = Fixture::start(|_| {}).await;
    // Its own gateway is not used: without it ipconfig has nowhere else to send devices,
    // and the successor's final drain ends at once.
    fixture.stop_gateway().await;
    let stop = CancellationToken::new();
    let _state = start_state(&fixture, stop.clone()).await;
    let (_ipconfig, _key) = start_ipconfig(&fixture, stop.clone()).await;
    let (tcp, ws, admin) = (free_port(), free_port(), free_port());
    let socket_arg = socket.to_string_lossy().to_string();
    let (cert_file, key_file) = (
        cert.files.cert.to_string_lossy().to_string(),
        cert.files.key.to_string_lossy().to_string(),
    );
    let mut old = gateway_process(
        &fixture,
        ID,
        &[
            "--tcp",
            &tcp.to_string(),
            "--ws",
            &ws.to_string(),
            "--admin",
            &admin.to_string(),
            "--handoff-socket",
            &socket_arg,
        ],
        &[
            ("TETHER_GATEWAY_TLS__CERT", &cert_file),
            ("TETHER_GATEWAY_TLS__KEY", &key_file),
            ("TETHER_GATEWAY_AWAIT_REGISTRATION", "true"),
            ("TETHER_GATEWAY_HEARTBEAT_INTERVAL_MS", "200"),
        ],
    );
    wait_for_line(&mut old, "gateway started").await;
    let device = serde_json::json!([{"app": APP, "uid": "u", "did": "probe", "transport": "tcp"}]);
    eventually("ipconfig grants the hand-off target", async || {
        let body = serde_json::json!({"target": ID, "handoff": true, "devices": device});
        let reply = redirect_request(&fixture, ID, body).await;
        reply.grants.first().and_then(|g| g.gw.as_deref()) == Some(ID)
    })
    .await;

    let mut devices = Vec::with_capacity(DEVICES);
    for i in 0..DEVICES {
        let did = format!("k{i}");
        let token = fixture.token(&did);
        devices.push(TlsDevice::start(cert.clone(), tcp, &did, token).await);
    }
    let dids: Vec<String> = devices.iter().map(|d| d.did.clone()).collect();
    let business = tether_business::Business::new(fixture.nats_client.clone(), APP);
    push_round(&business, &dids, 1).await;
    let pushing = {
        let (business, dids) = (business.clone(), dids.clone());
        tokio::spawn(async move {
            for round in 2..ROUNDS {
                push_round(&business, &dids, round).await;
            }
        })
    };
    let successor_stop = CancellationToken::new();
    let mut config = fixture.gateway_config(ID);
    config.handoff_socket = Some(socket.clone());
    config.tls = Some(cert.files.clone());
    config.await_registration = true;
    config.heartbeat_interval_ms = 200;
    let successor =
        tether_gateway::start_with(config, successor_stop.clone(), Some(&socket)).await?;
    // Committed: the old process dies while it redirects (once a first REDIRECT went out),
    // without its orderly exit.
    eventually("a first REDIRECT", async || {
        devices
            .iter()
            .any(|d| !d.log.lock().expect("lock").redirects.is_empty())
    })
    .await;
    let _ = old.start_kill();
    old.wait().await?;
    assert_eq!(successor.tcp_addr, Some(tcp), "same listener");
    pushing.await?;
    push_round(&business, &dids, ROUNDS).await;

    every_round_arrived_once(&devices, ROUNDS).await;
    for device in &devices {
        let did = &device.did;
        let log = device.log.lock().expect("lock");
        let (_, last) = log.logins.last().ok_or("no login")?;
        assert_eq!(last.gateway, ID);
        assert_eq!(
            log.logins.len(),
            2,
            "{did}: redirected or logged in again once"
        );
    }
    eventually("every device at the successor", async || {
        successor.sessions() == DEVICES
    })
    .await;
    successor_stop.cancel();
    successor.wait().await;
    stop.cancel();
    Ok(())
}

/// Waits until every TLS device got `rounds` messages, lets anything late or repeated
/// arrive, then checks each got `<did>:1..=rounds` exactly once, in order, with no trouble.
async fn every_round_arrived_once(devices: &[tls::TlsDevice], rounds: u32) {
    for device in devices {
        let log = device.log.clone();
        eventually(&format!("{} got every message", device.did), async || {
            log.lock().expect("lock").messages.len() >= rounds as usize
        })
        .await;
    }
    // Anything late or twice would show now.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for device in devices {
        let did = &device.did;
        let log = device.log.lock().expect("lock");
        let expected: Vec<(u64, Bytes)> = (1..=rounds)
            .map(|r| (u64::from(r), Bytes::from(format!("{did}:{r}"))))
            .collect();
        assert_eq!(log.messages, expected, "{did}: exactly once, in order");
        assert_eq!(log.troubles, Vec::<String>::new(), "{did}");
    }
}
