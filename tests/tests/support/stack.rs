//! A whole stack for state tests: nats-server, gateway, state instance(s), device SDK
//! clients (optionally through a cuttable TCP proxy), business SDK.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use tether_client::{Client, ClientConfig, Endpoint, Event};
use tether_state::{RunningState, StateConfig};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::{APP, Fixture, WAIT};

/// State settings that make tests fast: short leases, quick retransmission.
pub fn fast_state(nats_url: &str) -> StateConfig {
    StateConfig {
        nats_url: nats_url.to_string(),
        admin_listen: "127.0.0.1:0".parse().expect("addr"),
        lease_ttl_ms: 1_000,
        retransmit_ms: 500,
        reconnect_window_ms: 1_000,
        business_timeout_ms: 1_000,
        business_retries: 1,
        ..Default::default()
    }
}

/// Starts a state instance (connecting like the fixture); it stops when `stop` fires.
pub async fn start_state(fixture: &Fixture, stop: CancellationToken) -> RunningState {
    let config = StateConfig {
        nats: fixture.nats_auth.clone(),
        ..fast_state(&fixture.nats.client_url())
    };
    tether_state::start(config, stop)
        .await
        .expect("state starts")
}

/// A device SDK client of `did` (user `u-<did>`).
pub async fn device(
    fixture: &Fixture,
    endpoint: SocketAddr,
    did: &str,
) -> (Client, mpsc::Receiver<Event>) {
    let mut config = ClientConfig::new(vec![Endpoint::tcp(endpoint)], APP, did, fixture.token(did));
    config.reconnect.min = Duration::from_millis(50);
    config.reconnect.max = Duration::from_millis(500);
    let (client, mut events) = Client::connect(config).await.expect("device connects");
    match tokio::time::timeout(WAIT, events.recv()).await {
        Ok(Some(Event::Connected { .. })) => {}
        other => panic!("expected Connected, got {other:?}"),
    }
    (client, events)
}

/// The next message event's `(seq, body)`, skipping connection events.
pub async fn next_message(events: &mut mpsc::Receiver<Event>) -> (u64, Vec<u8>) {
    loop {
        match tokio::time::timeout(WAIT, events.recv()).await {
            Ok(Some(Event::Message { seq, body, .. })) => return (seq, body.to_vec()),
            Ok(Some(_)) => continue,
            Ok(None) => panic!("client stopped"),
            Err(_) => panic!("no message within {WAIT:?}"),
        }
    }
}

/// A TCP proxy in front of the gateway whose connections can be cut, as a network would.
pub struct Proxy {
    /// Where clients connect.
    pub addr: SocketAddr,
    live: Arc<Mutex<Vec<CancellationToken>>>,
    frozen: CancellationToken,
}

impl Proxy {
    /// Proxies to `target`.
    pub async fn start(target: SocketAddr) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let live: Arc<Mutex<Vec<CancellationToken>>> = Arc::default();
        let tracked = live.clone();
        let frozen = CancellationToken::new();
        let freeze = frozen.clone();
        tokio::spawn(async move {
            while let Ok((mut inbound, _)) = listener.accept().await {
                let cut = CancellationToken::new();
                tracked.lock().expect("lock").push(cut.clone());
                let freeze = freeze.clone();
                tokio::spawn(async move {
                    if freeze.is_cancelled() {
                        // Accepted, never answered: held open until cut.
                        cut.cancelled().await;
                        return;
                    }
                    let Ok(mut outbound) = TcpStream::connect(target).await else {
                        return;
                    };
                    tokio::select! {
                        _ = tokio::io::copy_bidirectional(&mut inbound, &mut outbound) => {}
                        _ = cut.cancelled() => {}
                        // Frozen: nothing more passes either way, the sockets stay open.
                        _ = freeze.cancelled() => cut.cancelled().await,
                    }
                });
            }
        });
        Self { addr, live, frozen }
    }

    /// Stalls the gateway behind the proxy as a paused process would: connections stay
    /// open and new ones are accepted, but nothing passes any more, either way.
    pub fn freeze(&self) {
        self.frozen.cancel();
    }

    /// Drops every connection through the proxy.
    pub fn cut(&self) {
        for token in self.live.lock().expect("lock").drain(..) {
            token.cancel();
        }
    }
}

/// Starts an ipconfig for the fixture's app (signing with the fixture's token key, secret
/// `a-secret-of-16-chars`); it stops when `stop` fires. The directory holds its key.
pub async fn start_ipconfig(
    fixture: &Fixture,
    stop: CancellationToken,
) -> (tether_ipconfig::RunningIpconfig, tempfile::TempDir) {
    let key_dir = tempfile::tempdir().expect("tempdir");
    let key = key_dir.path().join("token.key");
    std::fs::write(&key, fixture.signer.to_pem().expect("pem")).expect("write key");
    let ipconfig = tether_ipconfig::start(
        tether_ipconfig::IpconfigConfig {
            nats_url: fixture.nats.client_url(),
            nats: fixture.nats_auth.clone(),
            admin_listen: "127.0.0.1:0".parse().expect("addr"),
            http_listen: "127.0.0.1:0".parse().expect("addr"),
            token_key: key,
            apps: vec![tether_ipconfig::AppRecord {
                id: APP.into(),
                secrets: vec!["a-secret-of-16-chars".into()],
                ..Default::default()
            }],
            ..Default::default()
        },
        stop,
    )
    .await
    .expect("ipconfig starts");
    (ipconfig, key_dir)
}

/// A redirect-token request as gateway `gw` sends it (PROTOCOL.md 10.7); no answer (no
/// ipconfig subscribed yet) or an unreadable one gives no grants.
pub async fn redirect_request(
    fixture: &Fixture,
    gw: &str,
    body: serde_json::Value,
) -> tether_schemas::bus::RedirectReply {
    let answer = fixture
        .nats_client
        .request(
            tether_nats::subjects::gateway_redirect(gw),
            serde_json::to_vec(&body).expect("json").into(),
        )
        .await;
    answer
        .ok()
        .and_then(|answer| serde_json::from_slice(&answer.payload).ok())
        .unwrap_or(tether_schemas::bus::RedirectReply { grants: vec![] })
}

/// Pushes one QoS1 message `<did>:<round>` to each of `dids`, 64 in flight.
pub async fn push_round(business: &tether_business::Business, dids: &[String], round: u32) {
    use futures::StreamExt;
    futures::stream::iter(dids.iter().cloned())
        .map(|did| {
            let business = business.clone();
            async move {
                let body = format!("{did}:{round}").into_bytes();
                business
                    .push(tether_business::Push::to_dids([did.as_str()], body))
                    .await
                    .unwrap_or_else(|e| panic!("push to {did}: {e}"));
            }
        })
        .buffer_unordered(64)
        .collect::<Vec<()>>()
        .await;
}
