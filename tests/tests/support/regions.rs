//! Two regions on a hub (tether_nats::harness::leaf_regions), each with its own gateway,
//! state and ipconfig, for the multi-region tests (docs/multi-region.md).

#![allow(dead_code, missing_docs, clippy::unwrap_used)]

use std::path::{Path, PathBuf};
use std::time::Duration;

use async_nats::jetstream;
use tether_auth::TokenSigner;
use tether_client::{Client, ClientConfig, Discovery, DiscoveryConfig, Endpoint, Event};
use tether_gateway::{GatewayConfig, RunningGateway};
use tether_ipconfig::{AppRecord, CredentialClaims, IpconfigConfig, RunningIpconfig, sign_hs256};
use tether_nats::harness::{self, LeafRegions};
use tether_nats::region::Region;
use tether_state::{RunningState, StateConfig};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

pub const APP: &str = "demo";
pub const WAIT: Duration = Duration::from_secs(20);
/// The app's credential secret (ipconfig checks device credentials with it).
pub const SECRET: &str = "regions-secret-0123456789";

/// One region's roles: a gateway, a state instance and an ipconfig on the region's NATS
/// server.
pub struct RegionStack {
    pub name: String,
    pub gateway: RunningGateway,
    pub ipconfig: RunningIpconfig,
    _state: RunningState,
    pub client: async_nats::Client,
}

impl RegionStack {
    async fn start(
        name: &str,
        url: &str,
        peer: Region,
        key: &Path,
        stop: &CancellationToken,
    ) -> Self {
        let state = tether_state::start(
            StateConfig {
                nats_url: url.to_string(),
                admin_listen: "127.0.0.1:0".parse().expect("addr"),
                lease_ttl_ms: 1_000,
                retransmit_ms: 500,
                reconnect_window_ms: 1_000,
                region: name.to_string(),
                peer_regions: vec![peer.clone()],
                ..Default::default()
            },
            stop.clone(),
        )
        .await
        .expect("state starts");
        let gateway = tether_gateway::start(
            GatewayConfig {
                id: format!("gw-{name}"),
                region: name.to_string(),
                nats_url: url.to_string(),
                tcp_listen: Some("127.0.0.1:0".parse().expect("addr")),
                ws_listen: None,
                admin_listen: "127.0.0.1:0".parse().expect("addr"),
                token_public_key: tether_auth::public_key_path(key),
                heartbeat_interval_ms: 200,
                going_away_retry_ms: 100,
                nats_lost_close_secs: 1,
                ..Default::default()
            },
            stop.clone(),
        )
        .await
        .expect("gateway starts");
        let ipconfig = tether_ipconfig::start(
            IpconfigConfig {
                nats_url: url.to_string(),
                admin_listen: "127.0.0.1:0".parse().expect("addr"),
                http_listen: "127.0.0.1:0".parse().expect("addr"),
                token_key: key.to_path_buf(),
                stale_after_ms: 1_500,
                default_region: name.to_string(),
                peer_regions: vec![peer],
                apps: vec![AppRecord {
                    id: APP.into(),
                    secrets: vec![SECRET.into()],
                    ..Default::default()
                }],
                ..Default::default()
            },
            stop.clone(),
        )
        .await
        .expect("ipconfig starts");
        let client = tether_nats::connect(url, &format!("test-{name}"))
            .await
            .expect("connect");
        Self {
            name: name.to_string(),
            gateway,
            ipconfig,
            _state: state,
            client,
        }
    }

    /// This region's ipconfig base URL.
    pub fn ipconfig_url(&self) -> String {
        format!("http://{}", self.ipconfig.http_addr)
    }

    /// Whether `uid`'s device list in this region holds `did`.
    pub async fn knows_device(&self, uid: &str, did: &str) -> bool {
        let js = jetstream::new(self.client.clone());
        let Ok(kv) = js.get_key_value(tether_nats::layout::ROUTES_BUCKET).await else {
            return false;
        };
        let Ok(Some(value)) = kv.get(tether_nats::keys::user(APP, uid)).await else {
            return false;
        };
        serde_json::from_slice::<Vec<String>>(&value)
            .map(|dids| dids.iter().any(|d| d == did))
            .unwrap_or(false)
    }

    /// Whether `did` has a route (is online) in this region.
    pub async fn routes(&self, did: &str) -> bool {
        let js = jetstream::new(self.client.clone());
        let Ok(kv) = js.get_key_value(tether_nats::layout::ROUTES_BUCKET).await else {
            return false;
        };
        matches!(
            kv.get(tether_nats::keys::route(APP, did)).await,
            Ok(Some(_))
        )
    }
}

/// Two regions on a hub, with a token key pair every gateway and ipconfig shares.
pub struct TwoRegions {
    pub nats: LeafRegions,
    pub a: RegionStack,
    pub b: RegionStack,
    pub signer: TokenSigner,
    pub stop: CancellationToken,
    _key: PathBuf,
    _keys: tempfile::TempDir,
}

impl TwoRegions {
    pub async fn start() -> Self {
        if std::env::var_os("RUST_LOG").is_some() {
            // `RUST_LOG=…` prints the roles' logs on stderr (with `--no-capture`).
            tether_service::telemetry::init();
        }
        let nats = harness::leaf_regions().expect("hub and regions");
        let keys = tempfile::tempdir().expect("tempdir");
        let key = keys.path().join("token.key");
        let signer = tether_auth::write_keypair(&key, false).expect("keypair");
        let stop = CancellationToken::new();
        let a = RegionStack::start(
            LeafRegions::DOMAIN_A,
            &nats.url_a(),
            LeafRegions::peer_b(),
            &key,
            &stop,
        )
        .await;
        let b = RegionStack::start(
            LeafRegions::DOMAIN_B,
            &nats.url_b(),
            LeafRegions::peer_a(),
            &key,
            &stop,
        )
        .await;
        Self {
            nats,
            a,
            b,
            signer,
            stop,
            _key: key,
            _keys: keys,
        }
    }

    /// A device `did` of user `uid` logged in to `region`'s gateway.
    pub async fn device(
        &self,
        region: &RegionStack,
        uid: &str,
        did: &str,
    ) -> (Client, mpsc::Receiver<Event>) {
        let token = self
            .signer
            .issue(APP, uid, did, Duration::from_secs(3600))
            .expect("token");
        let endpoint = region.gateway.tcp_addr.expect("tcp");
        let config = quick_reconnect(ClientConfig::new(
            vec![Endpoint::tcp(endpoint)],
            APP,
            did,
            token,
        ));
        connected(region, uid, did, config).await
    }

    /// A device that finds its gateway through `ipconfigs` (in order), asking as a device
    /// of `home`; it must land in `expected`.
    pub async fn discovering_device(
        &self,
        ipconfigs: &[&RegionStack],
        home: &RegionStack,
        expected: &RegionStack,
        uid: &str,
        did: &str,
        resume_seq: u64,
    ) -> (Client, mpsc::Receiver<Event>) {
        let mut config = ClientConfig::with_discovery(
            discovery(ipconfigs, &home.name, uid, did),
            vec![],
            APP,
            did,
        );
        config.resume_seq = resume_seq;
        connected(expected, uid, did, quick_reconnect(config)).await
    }
}

/// Discovery through `ipconfigs`, in order, for a device of `region`.
pub fn discovery(ipconfigs: &[&RegionStack], region: &str, uid: &str, did: &str) -> Discovery {
    let claims = CredentialClaims {
        app: APP.into(),
        uid: uid.into(),
        did: did.into(),
        exp: tether_auth::unix_now() + 3600,
        iat: None,
    };
    let credential = sign_hs256(SECRET, &claims).expect("credential");
    let urls = ipconfigs.iter().map(|r| r.ipconfig_url()).collect();
    let mut config = DiscoveryConfig::new(urls, credential);
    config.region = Some(region.to_string());
    config.min_refresh = Duration::ZERO;
    config.timeout = Duration::from_secs(1);
    Discovery::new(config).expect("discovery")
}

fn quick_reconnect(mut config: ClientConfig) -> ClientConfig {
    config.reconnect.min = Duration::from_millis(50);
    config.reconnect.max = Duration::from_millis(500);
    config.connect_timeout = Duration::from_secs(5);
    config
}

/// Connects with `config` and waits until the device is registered in `region`.
async fn connected(
    region: &RegionStack,
    uid: &str,
    did: &str,
    config: ClientConfig,
) -> (Client, mpsc::Receiver<Event>) {
    let (client, mut events) = Client::connect(config).await.expect("device connects");
    match tokio::time::timeout(WAIT, events.recv()).await {
        Ok(Some(Event::Connected { gateway, .. })) => {
            assert_eq!(gateway, format!("gw-{}", region.name), "{did} logged in to");
        }
        other => panic!("expected Connected, got {other:?}"),
    }
    eventually(
        &format!("{did} registered in {}", region.name),
        async || region.knows_device(uid, did).await && region.routes(did).await,
    )
    .await;
    (client, events)
}

impl Drop for TwoRegions {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

pub async fn eventually(what: &str, check: impl AsyncFnMut() -> bool) {
    eventually_within(what, WAIT, check).await;
}

/// Waits until `check` holds, failing after `wait`.
pub async fn eventually_within(what: &str, wait: Duration, mut check: impl AsyncFnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + wait;
    while !check().await {
        assert!(
            tokio::time::Instant::now() < deadline,
            "{what}: not within {wait:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The next message event's `(seq, body)`, skipping connection events.
pub async fn next_message(events: &mut mpsc::Receiver<Event>, wait: Duration) -> (u64, Vec<u8>) {
    loop {
        match tokio::time::timeout(wait, events.recv()).await {
            Ok(Some(Event::Message { seq, body, .. })) => return (seq, body.to_vec()),
            Ok(Some(_)) => continue,
            Ok(None) => panic!("client stopped"),
            Err(_) => panic!("no message within {wait:?}"),
        }
    }
}
