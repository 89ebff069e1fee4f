//! ipconfig end to end: real nats-server, real gateways publishing heartbeats, ipconfig
//! answering over real HTTP on loopback, the device SDK discovering through it.
//!
//! Gateways beat every 100 ms and ipconfig treats a heartbeat older than 1 s as gone, so
//! the tests wait for changes by polling ipconfig's answers (up to a generous deadline),
//! never by sleeping a fixed time.

#![allow(missing_docs, clippy::unwrap_used)]

mod support;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde_json::Value;
use support::{RawClient, Transport};
use tether_auth::TokenSigner;
use tether_client::{
    Client, ClientConfig, ClientError, Discovery, DiscoveryConfig, ErrorCode, Event,
};
use tether_gateway::GatewayConfig;
use tether_ipconfig::{AppAdmin, AppRecord, CredentialClaims, IpconfigConfig, sign_hs256};
use tether_nats::harness::{self, Single};
use tether_schemas::{Frame, pb};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// Deadline for something that happens within a few heartbeats.
const DEADLINE: Duration = Duration::from_secs(20);
const SECRET: &str = "demo-secret-0123456789";

/// nats-server, the token key pair and ipconfig settings shared by the gateways.
struct Stack {
    nats: Single,
    signer: TokenSigner,
    key: PathBuf,
    _dir: tempfile::TempDir,
}

impl Stack {
    fn start() -> Stack {
        let nats = harness::single().expect("nats-server");
        let dir = tempfile::tempdir().expect("tempdir");
        let key = dir.path().join("token.key");
        let signer = tether_auth::write_keypair(&key, false).expect("keypair");
        Stack {
            nats,
            signer,
            key,
            _dir: dir,
        }
    }

    fn gateway_config(&self, id: &str, region: &str) -> GatewayConfig {
        GatewayConfig {
            id: id.into(),
            nats_url: self.nats.client_url(),
            region: region.into(),
            capacity: 10,
            heartbeat_interval_ms: 100,
            going_away_retry_ms: 100,
            tcp_listen: Some("127.0.0.1:0".parse().unwrap()),
            ws_listen: Some("127.0.0.1:0".parse().unwrap()),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            token_public_key: tether_auth::public_key_path(&self.key),
            await_registration: false,
            ..Default::default()
        }
    }

    fn ipconfig_config(&self) -> IpconfigConfig {
        IpconfigConfig {
            nats_url: self.nats.client_url(),
            admin_listen: "127.0.0.1:0".parse().unwrap(),
            http_listen: "127.0.0.1:0".parse().unwrap(),
            token_key: self.key.clone(),
            stale_after_ms: 1_000,
            // The config-file fallback: app `demo` known before any `tether app add`.
            apps: vec![AppRecord {
                id: "demo".into(),
                secrets: vec![SECRET.into()],
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    async fn ipconfig(&self) -> Ipconfig {
        self.ipconfig_with(self.ipconfig_config()).await
    }

    async fn ipconfig_with(&self, config: IpconfigConfig) -> Ipconfig {
        let stop = CancellationToken::new();
        let running = tether_ipconfig::start(config, stop.clone())
            .await
            .expect("ipconfig starts");
        Ipconfig {
            http: running.http_addr,
            admin: running.admin_addr,
            stop,
            running: Some(running),
        }
    }

    /// Opens a logged-in raw connection to `gw` (one unit of load).
    async fn load(&self, gw: &Gateway, did: &str) -> RawClient {
        let token = self
            .signer
            .issue("demo", "load", did, Duration::from_secs(600))
            .unwrap();
        let mut client = RawClient::connect(Transport::Tcp, gw.tcp).await;
        let login = Frame::Login(pb::Login {
            token,
            did: did.into(),
            app: "demo".into(),
            ..Default::default()
        });
        client.send(&login.encode()).await;
        assert!(matches!(
            client.next_frame().await,
            Some(Frame::LoginAck(_))
        ));
        client
    }
}

struct Ipconfig {
    http: SocketAddr,
    admin: SocketAddr,
    stop: CancellationToken,
    running: Option<tether_ipconfig::RunningIpconfig>,
}

impl Ipconfig {
    async fn stop(&mut self) {
        self.stop.cancel();
        if let Some(running) = self.running.take() {
            running.wait().await;
        }
    }

    fn url(&self) -> String {
        format!("http://{}", self.http)
    }
}

/// A gateway on its own runtime and thread, so it can be crashed: dropping the runtime
/// ends every task at once, without the graceful stop (no draining, no record delete).
struct Gateway {
    tcp: SocketAddr,
    admin: SocketAddr,
    control: Option<std::sync::mpsc::Sender<bool>>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Gateway {
    fn start(config: GatewayConfig) -> Gateway {
        let (ready_tx, ready_rx) = std::sync::mpsc::channel();
        let (control, commands) = std::sync::mpsc::channel::<bool>();
        let thread = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_multi_thread()
                .worker_threads(1)
                .enable_all()
                .build()
                .expect("runtime");
            let stop = CancellationToken::new();
            let running = runtime
                .block_on(tether_gateway::start(config, stop.clone()))
                .expect("gateway starts");
            let _ = ready_tx.send((running.tcp_addr.expect("tcp"), running.admin_addr));
            // true (or the test gone): crash; false: stop gracefully.
            if commands.recv().unwrap_or(true) {
                runtime.shutdown_background();
            } else {
                stop.cancel();
                runtime.block_on(running.wait());
            }
        });
        let (tcp, admin) = ready_rx.recv().expect("gateway ready");
        Gateway {
            tcp,
            admin,
            control: Some(control),
            thread: Some(thread),
        }
    }

    fn finish(&mut self, crash: bool) {
        if let Some(control) = self.control.take() {
            let _ = control.send(crash);
        }
        if let Some(thread) = self.thread.take() {
            let _ = thread.join();
        }
    }
}

impl Drop for Gateway {
    fn drop(&mut self) {
        self.finish(true);
    }
}

/// An HTTP/1.1 request over a fresh loopback connection; returns status and JSON body.
async fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, Value) {
    let (status, body) = http_text(addr, method, path, headers).await;
    (status, serde_json::from_str(&body).unwrap_or(Value::Null))
}

async fn http_text(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> (u16, String) {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let mut request = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n"
    );
    for (name, value) in headers {
        request.push_str(&format!("{name}: {value}\r\n"));
    }
    request.push_str("\r\n");
    stream.write_all(request.as_bytes()).await.expect("write");
    let mut response = Vec::new();
    tokio::time::timeout(DEADLINE, stream.read_to_end(&mut response))
        .await
        .expect("answer in time")
        .expect("read");
    let text = String::from_utf8_lossy(&response).to_string();
    let (head, body) = text.split_once("\r\n\r\n").expect("http answer");
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .expect("status");
    // Bodies here are small and, from axum, not chunked.
    (status, body.to_string())
}

fn credential(app: &str, secret: &str, exp_in: i64) -> String {
    let exp = (tether_auth::unix_now() as i64 + exp_in).max(1) as u64;
    sign_hs256(
        secret,
        &CredentialClaims {
            app: app.into(),
            uid: "alice".into(),
            did: "phone1".into(),
            exp,
            iat: None,
        },
    )
    .expect("credential")
}

async fn endpoints(ipconfig: &Ipconfig, query: &str, headers: &[(&str, &str)]) -> (u16, Value) {
    let bearer = format!("Bearer {}", credential("demo", SECRET, 600));
    let mut all = vec![("Authorization", bearer.as_str())];
    all.extend_from_slice(headers);
    http(ipconfig.http, "GET", &format!("/v1/endpoints{query}"), &all).await
}

/// The gateway ids of an answer, in order.
fn ids(answer: &Value) -> Vec<String> {
    answer["endpoints"]
        .as_array()
        .map(|list| {
            list.iter()
                .filter_map(|e| e["gw"].as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default()
}

/// Polls `GET /v1/endpoints` until the gateway ids satisfy `done`; returns the answer.
async fn until(
    ipconfig: &Ipconfig,
    query: &str,
    headers: &[(&str, &str)],
    what: &str,
    done: impl Fn(&[String]) -> bool,
) -> Value {
    until_answer(ipconfig, query, headers, what, |answer| done(&ids(answer))).await
}

/// Like [`until`], with a condition on the whole answer.
async fn until_answer(
    ipconfig: &Ipconfig,
    query: &str,
    headers: &[(&str, &str)],
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (status, answer) = endpoints(ipconfig, query, headers).await;
        if status == 200 && done(&answer) {
            return answer;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: last answer {status} {answer}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn least_loaded_first_killed_gateway_gone_two_instances_agree() -> TestResult {
    let stack = Stack::start();
    let gateways: Vec<Gateway> = ["gw-a", "gw-b", "gw-c"]
        .iter()
        .map(|id| Gateway::start(stack.gateway_config(id, "eu")))
        .collect();
    let mut load = Vec::new();
    for (gw, n) in gateways.iter().zip([6, 0, 3]) {
        for i in 0..n {
            load.push(stack.load(gw, &format!("load-{}-{i}", gw.tcp.port())).await);
        }
    }
    let first = stack.ipconfig().await;
    let second = stack.ipconfig().await;
    // The order must come from the load (clearly separated scores), not from shuffled
    // ties before the loads reach the heartbeats.
    let answer = until_answer(&first, "", &[], "ranked by load", |answer| {
        let score = |i: usize| answer["endpoints"][i]["score"].as_f64().unwrap_or(0.0);
        ids(answer) == ["gw-b", "gw-c", "gw-a"]
            && score(0) > score(1) + 0.05
            && score(1) > score(2) + 0.05
    })
    .await;
    // The answer is complete: endpoints of both transports and a token the gateways take.
    let top = &answer["endpoints"][0];
    assert_eq!(top["tcp"], gateways[1].tcp.to_string());
    assert!(top["ws"].as_str().is_some_and(|ws| ws.starts_with("ws://")));
    assert_eq!(answer["did"], "phone1");
    let token = answer["token"].as_str().unwrap_or_default();
    let claims = stack
        .signer
        .verifier()
        .verify(token, tether_auth::unix_now())?;
    assert_eq!(
        (claims.app.as_str(), claims.uid.as_str()),
        ("demo", "alice")
    );
    // A second instance, sharing nothing but NATS, ranks the same.
    until(&second, "", &[], "second instance", |ids| {
        ids == ["gw-b", "gw-c", "gw-a"]
    })
    .await;

    // gw-b crashes: no draining, no delete; it is gone once its heartbeat is stale.
    let mut gateways = gateways;
    gateways[1].finish(true);
    until(&first, "", &[], "crashed gateway gone", |ids| {
        ids == ["gw-c", "gw-a"]
    })
    .await;
    until(&second, "", &[], "crashed gateway gone (2)", |ids| {
        ids == ["gw-c", "gw-a"]
    })
    .await;

    let (status, metrics) = http_text(first.admin, "GET", "/metrics", &[]).await;
    assert_eq!(status, 200);
    assert!(
        metrics.contains("tether_ipconfig_requests_total{status=\"2xx\"}"),
        "{metrics}"
    );
    assert!(metrics.contains("tether_ipconfig_request_seconds_bucket"));
    assert!(metrics.contains("tether_ipconfig_gateways_seen"));
    assert!(metrics.contains("tether_ipconfig_tokens_issued_total"));
    drop(load);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn draining_and_stopped_gateways_are_not_offered() -> TestResult {
    let stack = Stack::start();
    let mut a = Gateway::start(stack.gateway_config("gw-a", "eu"));
    let _b = Gateway::start(stack.gateway_config("gw-b", "eu"));
    let ipconfig = stack.ipconfig().await;
    until(&ipconfig, "", &[], "both offered", |ids| ids.len() == 2).await;

    let (status, body) = http(a.admin, "POST", "/v1/drain", &[]).await;
    assert_eq!((status, &body["draining"]), (200, &Value::Bool(true)));
    until(&ipconfig, "", &[], "draining not offered", |ids| {
        ids == ["gw-b"]
    })
    .await;
    let (status, _) = http(a.admin, "DELETE", "/v1/drain", &[]).await;
    assert_eq!(status, 200);
    until(&ipconfig, "", &[], "offered again", |ids| ids.len() == 2).await;

    // With `offer_draining`, a draining gateway comes last instead.
    let lenient = stack
        .ipconfig_with(IpconfigConfig {
            offer_draining: true,
            ..stack.ipconfig_config()
        })
        .await;
    http(a.admin, "POST", "/v1/drain", &[]).await;
    // (gw-b may rank first by chance before the drain is seen: wait for the flag too.)
    let answer = until_answer(&lenient, "", &[], "draining last", |answer| {
        ids(answer) == ["gw-b", "gw-a"] && answer["endpoints"][1]["draining"] == true
    })
    .await;
    assert_eq!(answer["endpoints"][1]["draining"], true);

    // A clean stop deletes the record at once.
    a.finish(false);
    until(&ipconfig, "", &[], "stopped gateway gone", |ids| {
        ids == ["gw-b"]
    })
    .await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn region_and_dedicated_pool_rules() -> TestResult {
    let stack = Stack::start();
    let _eu = Gateway::start(stack.gateway_config("eu-1", "eu"));
    let _us = Gateway::start(stack.gateway_config("us-1", "us"));
    let mut vip_config = stack.gateway_config("vip-1", "eu");
    vip_config.pools = vec!["vip".into()];
    let _vip = Gateway::start(vip_config);
    let ipconfig = stack.ipconfig().await;

    // App `vipapp` is dedicated to pool `vip`, added to the bucket like `tether app add`.
    let nats = tether_nats::connect(&stack.nats.client_url(), "test").await?;
    let admin = AppAdmin::open(nats).await?;
    let vip_secret = tether_ipconfig::apps::generate_secret();
    admin
        .add(AppRecord {
            id: "vipapp".into(),
            secrets: vec![vip_secret.clone()],
            pool: Some("vip".into()),
            ..Default::default()
        })
        .await?;

    let answer = until(&ipconfig, "?region=eu", &[], "eu first", |ids| {
        ids == ["eu-1", "us-1"]
    })
    .await;
    assert_eq!(answer["region"], "eu");
    until(
        &ipconfig,
        "",
        &[("X-Tether-Region", "us")],
        "us by header",
        |ids| ids == ["us-1", "eu-1"],
    )
    .await;

    let bearer = format!("Bearer {}", credential("vipapp", &vip_secret, 600));
    let deadline = tokio::time::Instant::now() + DEADLINE;
    loop {
        let (status, answer) = http(
            ipconfig.http,
            "GET",
            "/v1/endpoints?region=us",
            &[("Authorization", &bearer)],
        )
        .await;
        if status == 200 {
            assert_eq!(ids(&answer), ["vip-1"], "dedicated pool only");
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "{status} {answer}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn credentials_refused_with_their_errors() -> TestResult {
    let stack = Stack::start();
    let _gw = Gateway::start(stack.gateway_config("gw-a", "eu"));
    let ipconfig = stack.ipconfig().await;
    until(&ipconfig, "", &[], "gateway offered", |ids| ids == ["gw-a"]).await;

    let refused = |credential: Option<String>, query: &'static str| {
        let addr = ipconfig.http;
        async move {
            let bearer = credential.map(|c| format!("Bearer {c}"));
            let headers: Vec<(&str, &str)> = bearer
                .as_deref()
                .map(|b| vec![("Authorization", b)])
                .unwrap_or_default();
            let (status, body) =
                http(addr, "GET", &format!("/v1/endpoints{query}"), &headers).await;
            (
                status,
                body["error"]["code"].as_str().unwrap_or("").to_string(),
            )
        }
    };
    let forged = credential("demo", "someone-elses-secret-123", 600);
    let expired = credential("demo", SECRET, -10);
    let unknown_app = credential("nope", SECRET, 600);
    let good = credential("demo", SECRET, 600);
    assert_eq!(refused(None, "").await, (401, "bad_token".into()));
    assert_eq!(
        refused(Some("garbage".into()), "").await,
        (401, "bad_token".into())
    );
    assert_eq!(
        refused(Some(forged.clone()), "").await,
        (401, "bad_token".into())
    );
    assert_eq!(
        refused(Some(expired), "").await,
        (401, "token_expired".into())
    );
    assert_eq!(
        refused(Some(unknown_app), "").await,
        (403, "wrong_app".into())
    );
    assert_eq!(
        refused(Some(good.clone()), "?app=other").await,
        (403, "wrong_app".into())
    );
    assert_eq!(refused(Some(good), "?app=demo").await.0, 200);

    // The SDK reports the refusal with its code.
    let discovery = Discovery::new(DiscoveryConfig::new(vec![ipconfig.url()], forged))?;
    let config = ClientConfig::with_discovery(discovery, vec![], "demo", "phone1");
    match Client::connect(config).await {
        Err(ClientError::Discovery { code, .. }) => assert_eq!(code, ErrorCode::BadToken),
        other => panic!("expected a bad_token refusal, got {other:?}"),
    }

    // Secrets rotate in the bucket: the old one keeps working until dropped.
    let nats = tether_nats::connect(&stack.nats.client_url(), "test").await?;
    let admin = AppAdmin::open(nats).await?;
    admin
        .add(AppRecord {
            id: "rot".into(),
            secrets: vec!["rot-secret-0000000001".into()],
            ..Default::default()
        })
        .await?;
    let old = credential("rot", "rot-secret-0000000001", 600);
    let new_secret = admin.rotate_secret("rot", false).await?;
    let new = credential("rot", &new_secret, 600);
    let deadline = tokio::time::Instant::now() + DEADLINE;
    while refused(Some(new.clone()), "").await.0 != 200 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "rotated secret not picked up"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(refused(Some(old.clone()), "").await.0, 200);
    admin.rotate_secret("rot", true).await?;
    while refused(Some(old.clone()), "").await != (401, "bad_token".into()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "dropped secret still accepted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    admin.remove("rot").await?;
    while refused(Some(new.clone()), "").await != (403, "wrong_app".into()) {
        assert!(
            tokio::time::Instant::now() < deadline,
            "removed app still accepted"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(admin.list().await?.is_empty());
    Ok(())
}

async fn next_connected(events: &mut tokio::sync::mpsc::Receiver<Event>) -> String {
    loop {
        match tokio::time::timeout(DEADLINE, events.recv()).await {
            Ok(Some(Event::Connected { gateway, .. })) => return gateway,
            Ok(Some(_)) => continue,
            other => panic!("expected Connected, got {other:?}"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_logs_in_through_ipconfig_and_reconnects_without_it() -> TestResult {
    let stack = Stack::start();
    let mut a = Gateway::start(stack.gateway_config("gw-a", "eu"));
    let b = Gateway::start(stack.gateway_config("gw-b", "eu"));
    // Load gw-b a little, so gw-a ranks first.
    let _load = stack.load(&b, "load-1").await;
    let mut ipconfig = stack.ipconfig().await;
    // Wait for the load to reach the scores (not a chance order of tied scores).
    until_answer(&ipconfig, "", &[], "gw-a first", |answer| {
        let score = |i: usize| answer["endpoints"][i]["score"].as_f64().unwrap_or(0.0);
        ids(answer) == ["gw-a", "gw-b"] && score(0) > score(1) + 0.05
    })
    .await;

    let dir = tempfile::tempdir()?;
    let url = ipconfig.url();
    let discovery_config = || {
        let mut config = DiscoveryConfig::new(vec![url.clone()], credential("demo", SECRET, 600));
        config.cache_file = Some(dir.path().join("endpoints.json"));
        config
    };
    let discovery = Discovery::new(discovery_config())?;
    let mut config = ClientConfig::with_discovery(discovery.clone(), vec![], "demo", "phone1");
    config.reconnect.min = Duration::from_millis(50);
    config.reconnect.max = Duration::from_millis(500);
    let (client, mut events) = Client::connect(config).await?;
    assert_eq!(next_connected(&mut events).await, "gw-a");
    assert_eq!(
        discovery.cached().map(|a| a.endpoints.len()),
        Some(2),
        "answer cached"
    );

    // ipconfig goes away, then gw-a stops: the client reconnects from its cached list.
    ipconfig.stop().await;
    a.finish(false);
    assert_eq!(next_connected(&mut events).await, "gw-b");
    client.close().await;

    // A new client (a restarted app) with ipconfig still down: the cache file is enough.
    let restarted = Discovery::new(discovery_config())?;
    let config = ClientConfig::with_discovery(restarted, vec![], "demo", "phone1");
    let (client, mut events) = Client::connect(config).await?;
    assert_eq!(next_connected(&mut events).await, "gw-b");
    client.close().await;
    Ok(())
}

/// PROTOCOL 6.6: when the login at a REDIRECT's endpoint fails, a client with ipconfig
/// falls back to it (here it offers the same gateway again) instead of staying on the
/// connection the old gateway is moving it off.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sdk_falls_back_to_ipconfig_when_a_redirect_fails() -> TestResult {
    let stack = Stack::start();
    let a = Gateway::start(stack.gateway_config("gw-a", "eu"));
    let ipconfig = stack.ipconfig().await;
    until(&ipconfig, "", &[], "gw-a offered", |ids| ids == ["gw-a"]).await;
    let discovery = Discovery::new(DiscoveryConfig::new(
        vec![ipconfig.url()],
        credential("demo", SECRET, 600),
    ))?;
    let mut config = ClientConfig::with_discovery(discovery, vec![], "demo", "phone1");
    config.reconnect.min = Duration::from_millis(50);
    config.reconnect.max = Duration::from_millis(500);
    let (client, mut events) = Client::connect(config).await?;
    assert_eq!(next_connected(&mut events).await, "gw-a");

    // A REDIRECT to a port nobody listens on (bound, then closed).
    let closed = std::net::TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    let redirect = Frame::Redirect(pb::Redirect {
        endpoint: closed.to_string(),
        token: "unused".into(),
        reason: "migrate".into(),
    });
    let nats = tether_nats::connect(&stack.nats.client_url(), "test").await?;
    let mut map = async_nats::HeaderMap::new();
    map.insert(tether_nats::headers::APP, "demo");
    map.insert(tether_nats::headers::DID, "phone1");
    nats.publish_with_headers(
        tether_nats::subjects::gateway_down("gw-a"),
        map,
        redirect.encode(),
    )
    .await?;
    nats.flush().await?;
    // The failed redirect is reported, and the client logs in again through ipconfig.
    assert_eq!(next_connected(&mut events).await, "gw-a");
    client.close().await;
    drop(a);
    Ok(())
}

/// Bench figure for `/v1/endpoints` with 100 gateways registered (their heartbeats are
/// re-put every 2 s during the run, as live gateways would), measured with `wrk` on
/// loopback. Run with
/// `cargo test --release -p tether-tests --test ipconfig -- --ignored --nocapture bench`;
/// `WRK_ARGS` overrides the load (default `-t1 -c32 -d10s`).
#[tokio::test(flavor = "multi_thread", worker_threads = 1)]
#[ignore = "bench: needs wrk, run in release"]
async fn bench_endpoints_100_gateways() -> TestResult {
    use tether_nats::keys::gateway as gateway_key;
    use tether_schemas::bus::{AdvertisedEndpoints, GatewayHeartbeat};
    let stack = Stack::start();
    let nats = tether_nats::connect(&stack.nats.client_url(), "bench").await?;
    tether_nats::ensure_layout(
        &async_nats::jetstream::new(nats.clone()),
        &tether_nats::BusLayout::default(),
    )
    .await?;
    let store = async_nats::jetstream::new(nats)
        .get_key_value(tether_nats::layout::GATEWAYS_BUCKET)
        .await?;
    let regions = ["eu", "us", "ap"];
    let records: Vec<GatewayHeartbeat> = (0..100u64)
        .map(|i| GatewayHeartbeat {
            id: format!("gw-{i:03}"),
            version: "bench".into(),
            region: regions[(i % 3) as usize].into(),
            pools: Vec::new(),
            endpoints: AdvertisedEndpoints {
                tcp: Some(format!("10.0.{}.{}:7400", i / 250, i % 250)),
                ws: Some(format!("ws://10.0.{}.{}:7401/ws", i / 250, i % 250)),
            },
            connections: (i * 7_919) % 90_000,
            capacity: 100_000,
            cpu: (i % 10) as f64 / 20.0,
            interval_ms: 2_000,
            ..Default::default()
        })
        .collect();
    let stop = CancellationToken::new();
    let writer = {
        let (store, stop) = (store.clone(), stop.clone());
        tokio::spawn(async move {
            while !stop.is_cancelled() {
                for record in &records {
                    let json = serde_json::to_vec(record).unwrap();
                    let _ = store.put(gateway_key(&record.id), json.into()).await;
                }
                tokio::select! {
                    _ = stop.cancelled() => {}
                    _ = tokio::time::sleep(Duration::from_secs(2)) => {}
                }
            }
        })
    };
    // Staleness as in production (15 s): the fleet re-puts every 2 s.
    let ipconfig = stack
        .ipconfig_with(IpconfigConfig {
            stale_after_ms: 15_000,
            ..stack.ipconfig_config()
        })
        .await;
    let answer = until(&ipconfig, "?region=eu", &[], "100 gateways", |ids| {
        ids.len() == 8
    })
    .await;
    println!("sample answer: {answer}");
    tokio::time::sleep(Duration::from_millis(1_100)).await; // one gauge update
    let (_, metrics) = http_text(ipconfig.admin, "GET", "/metrics", &[]).await;
    let seen = metrics
        .lines()
        .find(|l| l.starts_with("tether_ipconfig_gateways_seen"))
        .unwrap_or_default()
        .to_string();
    println!("{seen}");

    let bearer = format!("Authorization: Bearer {}", credential("demo", SECRET, 3600));
    let url = format!("http://{}/v1/endpoints?region=eu", ipconfig.http);
    let load = std::env::var("WRK_ARGS").unwrap_or_else(|_| "-t1 -c32 -d10s".into());
    let mut args: Vec<String> = load.split_whitespace().map(str::to_string).collect();
    args.extend(["--latency".into(), "-H".into(), bearer, url]);
    println!(
        "wrk {}",
        args.join(" ")
            .replace(&credential("demo", SECRET, 3600), "<credential>")
    );
    let output = tokio::process::Command::new("wrk")
        .args(&args)
        .output()
        .await?;
    println!("{}", String::from_utf8_lossy(&output.stdout));
    eprintln!("{}", String::from_utf8_lossy(&output.stderr));
    let (_, metrics) = http_text(ipconfig.admin, "GET", "/metrics", &[]).await;
    for line in metrics.lines().filter(|l| {
        l.starts_with("tether_ipconfig_requests_total") || l.starts_with("tether_ipconfig_errors")
    }) {
        println!("{line}");
    }
    stop.cancel();
    writer.await?;
    assert!(output.status.success(), "wrk failed");
    Ok(())
}
