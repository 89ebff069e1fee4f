//! Drain and migration by REDIRECT (PROTOCOL.md 10.7) over real sockets, a real
//! nats-server, state, ipconfig and three gateways, with SDK devices: a drain moves every
//! device with no QoS1 message lost or duplicated and no error seen; migrations by dids and
//! by share move exactly the chosen devices; a stopping gateway drains before it exits.

#![allow(clippy::unwrap_used)]

mod support;

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use support::stack::{push_round, redirect_request, start_ipconfig, start_state};
use support::{APP, Fixture, GW, TestResult};
use tether_business::Business;
use tether_client::{Client, ClientConfig, Endpoint, Event};
use tether_gateway::RunningGateway;
use tether_nats::subjects;
use tether_schemas::bus::{MigrationStatus, RedirectReply};
use tokio_util::sync::CancellationToken;

/// What one device saw.
#[derive(Default)]
struct Log {
    seqs: Vec<u64>,
    bodies: Vec<Bytes>,
    gateways: Vec<String>,
    troubles: Vec<String>,
}

type Logs = HashMap<String, Arc<Mutex<Log>>>;

/// The stack: the fixture's gateway (`gw-test`, the one drained), state, ipconfig, and
/// the other gateways.
struct Stack {
    fixture: Fixture,
    others: Vec<(RunningGateway, CancellationToken)>,
    _state: tether_state::RunningState,
    _ipconfig: tether_ipconfig::RunningIpconfig,
    _key_dir: tempfile::TempDir,
    stop: CancellationToken,
}

impl Stack {
    async fn start(others: &[&str]) -> Stack {
        let fixture = Fixture::start(|c| {
            c.await_registration = true;
            c.heartbeat_interval_ms = 200;
            // A debug build on a busy machine: fewer logins at once than the default, and
            // more time for each (this test checks what is delivered, not how fast).
            c.migrate_window = 200;
            c.migrate_timeout_secs = 300;
            c.registration_timeout_ms = 120_000;
        })
        .await;
        let stop = CancellationToken::new();
        let state = start_state(&fixture, stop.clone()).await;
        let (ipconfig, key_dir) = start_ipconfig(&fixture, stop.clone()).await;
        let mut started = Vec::new();
        for id in others {
            let mut config = fixture.gateway_config(id);
            config.await_registration = true;
            config.heartbeat_interval_ms = 200;
            config.registration_timeout_ms = 120_000;
            let shutdown = CancellationToken::new();
            let gateway = tether_gateway::start(config, shutdown.clone())
                .await
                .unwrap();
            started.push((gateway, shutdown));
        }
        let stack = Stack {
            fixture,
            others: started,
            _state: state,
            _ipconfig: ipconfig,
            _key_dir: key_dir,
            stop,
        };
        stack.until_ipconfig_offers(others).await;
        stack
    }

    /// Waits until ipconfig hands out redirect tokens for every gateway in `ids`.
    async fn until_ipconfig_offers(&self, ids: &[&str]) {
        let devices: Vec<_> = (0..40)
            .map(|i| serde_json::json!({"app": APP, "uid": "u", "did": format!("probe{i}"), "transport": "tcp"}))
            .collect();
        eventually("ipconfig offers every other gateway", async || {
            let reply = self
                .redirect_request(serde_json::json!({"target": "ipconfig", "devices": devices}))
                .await;
            ids.iter()
                .all(|id| reply.grants.iter().any(|g| g.gw.as_deref() == Some(*id)))
        })
        .await;
    }

    /// A redirect-token request as gateway `gw-test` sends it.
    async fn redirect_request(&self, body: serde_json::Value) -> RedirectReply {
        redirect_request(&self.fixture, GW, body).await
    }

    /// Sends a control op to `gw-test` and reads its status answer.
    async fn control(&self, op: serde_json::Value) -> MigrationStatus {
        let answer = self
            .fixture
            .nats_client
            .request(
                subjects::gateway_ctl(GW),
                serde_json::to_vec(&op).unwrap().into(),
            )
            .await
            .unwrap();
        serde_json::from_slice(&answer.payload)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&answer.payload)))
    }

    /// Waits until the running migration of `gw-test` is over; returns its status.
    async fn migration_done(&self) -> MigrationStatus {
        let mut status = self
            .control(serde_json::json!({"op": "migration_status"}))
            .await;
        for _ in 0..3000 {
            if !status.running && status.pending == 0 {
                return status;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
            status = self
                .control(serde_json::json!({"op": "migration_status"}))
                .await;
        }
        panic!("migration still running: {status:?}");
    }

    /// Connects `n` SDK devices `<prefix><i>` to `gw-test`, 100 at a time.
    async fn devices(&self, prefix: &str, n: usize) -> (Vec<Client>, Logs) {
        let addr = self.fixture.tcp;
        let connected = futures::stream::iter(0..n)
            .map(|i| {
                let did = format!("{prefix}{i}");
                let token = self.fixture.token(&did);
                async move { connect(addr, did, token).await }
            })
            .buffer_unordered(100)
            .collect::<Vec<_>>()
            .await;
        let mut clients = Vec::new();
        let mut logs = HashMap::new();
        for (did, client, log) in connected {
            clients.push(client);
            logs.insert(did, log);
        }
        (clients, logs)
    }
}

impl Drop for Stack {
    fn drop(&mut self) {
        self.stop.cancel();
        for (_, shutdown) in &self.others {
            shutdown.cancel();
        }
    }
}

/// One SDK device logged in at `addr`; a task records everything it sees.
async fn connect(
    addr: SocketAddr,
    did: String,
    token: String,
) -> (String, Client, Arc<Mutex<Log>>) {
    let mut config = ClientConfig::new(vec![Endpoint::tcp(addr)], APP, &did, token);
    config.reconnect.min = Duration::from_millis(50);
    config.reconnect.max = Duration::from_millis(500);
    // Logins wait for state's registration, slow in a debug build on a busy machine.
    config.connect_timeout = Duration::from_secs(120);
    let (client, mut events) = Client::connect(config).await.unwrap();
    let log: Arc<Mutex<Log>> = Arc::default();
    let (first_tx, first_rx) = tokio::sync::oneshot::channel();
    let mut first = Some(first_tx);
    let writer = log.clone();
    tokio::spawn(async move {
        while let Some(event) = events.recv().await {
            let mut log = writer.lock().unwrap();
            match event {
                Event::Connected { gateway, .. } => {
                    log.gateways.push(gateway);
                    if let Some(first) = first.take() {
                        let _ = first.send(());
                    }
                }
                Event::Message { seq, body, .. } => {
                    log.seqs.push(seq);
                    log.bodies.push(body);
                }
                other => log.troubles.push(format!("{other:?}")),
            }
        }
    });
    tokio::time::timeout(support::WAIT, first_rx)
        .await
        .unwrap_or_else(|_| panic!("{did} did not connect"))
        .unwrap();
    (did, client, log)
}

async fn eventually(what: &str, mut check: impl AsyncFnMut() -> bool) {
    for _ in 0..3000 {
        if check().await {
            return;
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("not within 300 s: {what}");
}

fn last_gateway(log: &Arc<Mutex<Log>>) -> String {
    log.lock()
        .unwrap()
        .gateways
        .last()
        .cloned()
        .unwrap_or_default()
}

fn troubles(logs: &Logs) -> Vec<String> {
    logs.iter()
        .flat_map(|(did, log)| {
            log.lock()
                .unwrap()
                .troubles
                .iter()
                .map(|t| format!("{did}: {t}"))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// Drain of a gateway holding 2,000 devices to two others while a business pushes QoS1
/// to every device: each device ends on one of the others, gets each of its messages once
/// and in order, and sees no error or disconnect. About 30–70 s in a debug build on two
/// shared cores (longer under load). It used to stall under load: state, losing and
/// retaking partition leases, refetched what it gave back until JetStream dropped the
/// events (`max_deliver`), so some new logins were never registered and their devices
/// stayed on the drained gateway (fixed in `tether_nats::pull::release_prefetched`).
/// `RUST_LOG=warn` prints the services' logs.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_of_2000_devices_to_two_gateways_loses_and_duplicates_nothing() -> TestResult {
    drain_loses_and_duplicates_nothing(2000).await
}

async fn drain_loses_and_duplicates_nothing(devices: usize) -> TestResult {
    if std::env::var_os("RUST_LOG").is_some() {
        tether_service::telemetry::init();
    }
    const ROUNDS: u32 = 3;
    let stack = Stack::start(&["gw-b", "gw-c"]).await;
    let (_clients, logs) = stack.devices("dev", devices).await;
    let dids: Vec<String> = logs.keys().cloned().collect();
    let business = Business::new(stack.fixture.nats_client.clone(), APP);
    push_round(&business, &dids, 1).await;

    // Rounds 2 and 3 are pushed while the drain runs.
    let pushing = {
        let (business, dids) = (business.clone(), dids.clone());
        tokio::spawn(async move {
            for round in 2..=ROUNDS {
                push_round(&business, &dids, round).await;
            }
        })
    };
    let started = stack.control(serde_json::json!({"op": "drain"})).await;
    assert!(started.draining && started.running, "{started:?}");
    assert_eq!(started.kind, "drain");
    let status = stack.migration_done().await;
    pushing.await?;
    assert_eq!(status.connections, 0, "{status:?}");
    assert_eq!((status.failed, status.timed_out), (0, 0), "{status:?}");
    assert!(status.redirected >= devices as u64, "{status:?}");
    assert!(status.error.is_none(), "{status:?}");

    let on_b = stack.others[0].0.sessions();
    let on_c = stack.others[1].0.sessions();
    assert_eq!(on_b + on_c, devices, "b {on_b}, c {on_c}");
    assert!(
        on_b > 0 && on_c > 0,
        "both targets used: b {on_b}, c {on_c}"
    );
    for (did, log) in &logs {
        let gw = last_gateway(log);
        assert!(gw == "gw-b" || gw == "gw-c", "{did} ended on {gw}");
    }
    let expected: Vec<u64> = (1..=u64::from(ROUNDS)).collect();
    eventually("every device has every message", async || {
        logs.values()
            .all(|log| log.lock().unwrap().seqs.len() >= expected.len())
    })
    .await;
    // A little longer: a duplicate would show up now.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for (did, log) in &logs {
        let log = log.lock().unwrap();
        assert_eq!(log.seqs, expected, "{did}: seqs exactly once, in order");
        let bodies: Vec<Bytes> = (1..=ROUNDS)
            .map(|r| Bytes::from(format!("{did}:{r}")))
            .collect();
        assert_eq!(log.bodies, bodies, "{did}");
    }
    assert_eq!(
        troubles(&logs),
        Vec::<String>::new(),
        "no device saw an error"
    );
    Ok(())
}

/// Migrations by dids (to a named gateway) and by share (ipconfig's choice) move exactly
/// the chosen devices; the redirect-token request refuses what it cannot grant; then the
/// gateway is stopped (what SIGTERM does) and drains the rest before it exits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migrate_by_dids_and_share_then_stopping_drains_first() -> TestResult {
    const DEVICES: usize = 30;
    let mut stack = Stack::start(&["gw-b"]).await;
    let (_clients, logs) = stack.devices("m", DEVICES).await;

    // Refusals of the redirect-token request.
    let reply = stack
        .redirect_request(serde_json::json!({"target": "ipconfig", "devices": [
            {"app": APP, "uid": "u", "did": "x1", "transport": "pigeon"},
            {"app": "nope", "uid": "u", "did": "x2", "transport": "tcp"}]}))
        .await;
    let codes: Vec<_> = reply
        .grants
        .iter()
        .map(|g| g.error.as_ref().map(|e| e.code.as_str()))
        .collect();
    assert_eq!(codes, [Some("bad_request"), Some("bad_request")]);
    let reply = stack
        .redirect_request(serde_json::json!({"target": GW, "devices": [
            {"app": APP, "uid": "u", "did": "x1", "transport": "tcp"}]}))
        .await;
    assert_eq!(
        reply.grants[0].error.as_ref().map(|e| e.code.as_str()),
        Some("unavailable"),
        "never back to the requester"
    );
    let refused = stack
        .fixture
        .nats_client
        .request(
            subjects::gateway_ctl(GW),
            br#"{"op":"migrate","share":0.5,"all":true}"#.as_slice().into(),
        )
        .await?;
    assert!(
        String::from_utf8_lossy(&refused.payload).contains("bad_request"),
        "two selections are refused"
    );

    // By dids, to a named gateway.
    let moved = ["m0", "m1", "m2"];
    let started = stack
        .control(serde_json::json!({"op": "migrate", "app": APP, "dids": moved, "target": "gw-b", "rate": 100}))
        .await;
    assert_eq!((started.kind.as_str(), started.selected), ("migrate", 3));
    let status = stack.migration_done().await;
    assert_eq!((status.redirected, status.moved), (3, 3), "{status:?}");
    for (did, log) in &logs {
        let want = if moved.contains(&did.as_str()) {
            "gw-b"
        } else {
            GW
        };
        assert_eq!(last_gateway(log), want, "{did}");
    }
    assert_eq!(status.connections, (DEVICES - 3) as u64);

    // By share: half of the 27 left (rounded: 14), ipconfig's choice (gw-b is the only one).
    stack
        .control(serde_json::json!({"op": "migrate", "app": APP, "share": 0.5}))
        .await;
    let status = stack.migration_done().await;
    assert_eq!((status.selected, status.moved), (14, 14), "{status:?}");
    assert_eq!(status.connections, 13);
    let on_b = logs
        .values()
        .filter(|log| last_gateway(log) == "gw-b")
        .count();
    assert_eq!(on_b, 17);
    let admin = support::http_get(stack.fixture.admin, "/v1/migration").await;
    assert!(admin.contains("\"moved\":14"), "{admin}");

    // Stopping the gateway (SIGTERM) drains the 13 left before it exits.
    stack.fixture.stop_gateway().await;
    eventually("every device on gw-b", async || {
        logs.values().all(|log| last_gateway(log) == "gw-b")
    })
    .await;
    assert_eq!(stack.others[0].0.sessions(), DEVICES);
    assert_eq!(
        troubles(&logs),
        Vec::<String>::new(),
        "no device saw an error"
    );
    Ok(())
}
