//! Multi-region: a hub and two leaf regions (each its own JetStream domain), each region
//! with its own gateway and state; pushes for devices of the other region cross through
//! the relay streams (docs/multi-region.md).

#![allow(missing_docs, clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use tether_auth::TokenSigner;
use tether_business::{Business, Push, UplinkReply};
use tether_client::{Client, ClientConfig, Endpoint, Event};
use tether_gateway::{GatewayConfig, RunningGateway};
use tether_nats::harness::{self, LeafRegions};
use tether_nats::region::Region;
use tether_schemas::ErrorCode;
use tether_state::{RunningState, StateConfig};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const APP: &str = "demo";
const WAIT: Duration = Duration::from_secs(20);

/// One region's roles: a gateway and a state instance on the region's NATS server.
struct RegionStack {
    name: String,
    gateway: RunningGateway,
    _state: RunningState,
    client: async_nats::Client,
}

impl RegionStack {
    async fn start(
        name: &str,
        url: &str,
        peer: Region,
        key_file: &std::path::Path,
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
                peer_regions: vec![peer],
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
                token_public_key: key_file.to_path_buf(),
                ..Default::default()
            },
            stop.clone(),
        )
        .await
        .expect("gateway starts");
        let client = tether_nats::connect(url, &format!("test-{name}"))
            .await
            .expect("connect");
        Self {
            name: name.to_string(),
            gateway,
            _state: state,
            client,
        }
    }

    /// Whether `uid`'s device list in this region holds `did`.
    async fn knows_device(&self, uid: &str, did: &str) -> bool {
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
}

/// Two regions on a hub, with a token signer both gateways trust.
struct TwoRegions {
    nats: LeafRegions,
    a: RegionStack,
    b: RegionStack,
    signer: TokenSigner,
    stop: CancellationToken,
    _keys: tempfile::TempDir,
}

impl TwoRegions {
    async fn start() -> Self {
        let nats = harness::leaf_regions().expect("hub and regions");
        let signer = TokenSigner::generate();
        let keys = tempfile::tempdir().expect("tempdir");
        let key_file = keys.path().join("token.pub");
        std::fs::write(&key_file, signer.verifier().to_pem().expect("pem")).expect("key");
        let stop = CancellationToken::new();
        let a = RegionStack::start(
            LeafRegions::DOMAIN_A,
            &nats.url_a(),
            LeafRegions::peer_b(),
            &key_file,
            &stop,
        )
        .await;
        let b = RegionStack::start(
            LeafRegions::DOMAIN_B,
            &nats.url_b(),
            LeafRegions::peer_a(),
            &key_file,
            &stop,
        )
        .await;
        Self {
            nats,
            a,
            b,
            signer,
            stop,
            _keys: keys,
        }
    }

    /// A device `did` of user `uid` logged in to `region`'s gateway.
    async fn device(
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
        let mut config = ClientConfig::new(vec![Endpoint::tcp(endpoint)], APP, did, token);
        config.reconnect.min = Duration::from_millis(50);
        config.reconnect.max = Duration::from_millis(500);
        let (client, mut events) = Client::connect(config).await.expect("device connects");
        match tokio::time::timeout(WAIT, events.recv()).await {
            Ok(Some(Event::Connected { .. })) => {}
            other => panic!("expected Connected, got {other:?}"),
        }
        eventually(
            &format!("{did} registered in {}", region.name),
            async || region.knows_device(uid, did).await,
        )
        .await;
        (client, events)
    }
}

impl Drop for TwoRegions {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

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

/// The next message event's `(seq, body)`, skipping connection events.
async fn next_message(events: &mut mpsc::Receiver<Event>, wait: Duration) -> (u64, Vec<u8>) {
    loop {
        match tokio::time::timeout(wait, events.recv()).await {
            Ok(Some(Event::Message { seq, body, .. })) => return (seq, body.to_vec()),
            Ok(Some(_)) => continue,
            Ok(None) => panic!("client stopped"),
            Err(_) => panic!("no message within {wait:?}"),
        }
    }
}

#[tokio::test]
async fn leaf_links_keep_same_named_streams_apart() -> TestResult {
    // Both regions have a stream with the same name and subjects (as every region has
    // TETHER_INBOX): with the regional-only subjects denied on the leaf links, a write in
    // one region is stored there only.
    let regions = harness::leaf_regions()?;
    let a = jetstream::new(tether_nats::connect(&regions.url_a(), "a").await?);
    let b = jetstream::new(tether_nats::connect(&regions.url_b(), "b").await?);
    let inbox = stream::Config {
        name: tether_nats::layout::INBOX_STREAM.into(),
        subjects: vec![tether_nats::subjects::inbox_stream()],
        ..Default::default()
    };
    a.create_stream(inbox.clone()).await?;
    b.create_stream(inbox).await?;
    let subject = tether_nats::subjects::inbox(APP, "d1");
    let ack = a.publish(subject.clone(), "only-a".into()).await?.await?;
    assert_eq!(ack.domain, LeafRegions::DOMAIN_A);
    let ack = b.publish(subject, "only-b".into()).await?.await?;
    assert_eq!(ack.domain, LeafRegions::DOMAIN_B);
    for js in [&a, &b] {
        let mut stream = js.get_stream(tether_nats::layout::INBOX_STREAM).await?;
        assert_eq!(
            stream.info().await?.state.messages,
            1,
            "each region stores its own write only"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_reply_to_a_user_in_another_region_arrives_once_in_order_with_its_receipt() -> TestResult
{
    let regions = TwoRegions::start().await;
    // The business runs in region A: it stores each uplink and pushes it to bob, whose
    // device is in region B.
    let business = Business::new(regions.a.client.clone(), APP);
    let serving = business.clone();
    let relayed: Arc<Mutex<Vec<Vec<String>>>> = Arc::default();
    let log = relayed.clone();
    tokio::spawn(async move {
        let pusher = serving.clone();
        let _ = serving
            .serve_uplinks("tether-biz", move |uplink| {
                let (pusher, log) = (pusher.clone(), log.clone());
                async move {
                    match pusher
                        .push(Push::to_uids(["u-bob"], uplink.body.clone()))
                        .await
                    {
                        Ok(reply) => {
                            log.lock().expect("lock").push(reply.relayed);
                            UplinkReply::stored(Some(format!("m{}", uplink.msg_id)))
                        }
                        Err(error) => UplinkReply::error(ErrorCode::Unavailable, error.to_string()),
                    }
                }
            })
            .await;
    });
    let (_bob, mut bob_events) = regions.device(&regions.b, "u-bob", "bob-phone").await;
    let (alice, _alice_events) = regions.device(&regions.a, "u-alice", "alice-phone").await;

    for i in 0..5u32 {
        let ack = alice.send(Bytes::from(format!("hello {i}"))).await?;
        assert_eq!(
            ack.server_msg_id,
            format!("m{}", ack.client_msg_id),
            "receipt after the business stored it"
        );
    }
    assert_eq!(
        *relayed.lock().expect("lock"),
        vec![vec!["bob-phone".to_string()]; 5],
        "each push names the device it relayed to region B"
    );
    for i in 0..5u64 {
        assert_eq!(
            next_message(&mut bob_events, WAIT).await,
            (i + 1, format!("hello {i}").into_bytes()),
            "in order, with bob's own sequence"
        );
    }
    // Nothing twice: the next message bob gets is a push made in his own region.
    Business::new(regions.b.client.clone(), APP)
        .push(Push::to_dids(["bob-phone"], Bytes::from_static(b"local")))
        .await?;
    assert_eq!(
        next_message(&mut bob_events, WAIT).await,
        (6, b"local".to_vec())
    );
    Ok(())
}

/// Pushes `0..` to `did` at about 100 per second until `stop`, each retried with its id
/// until accepted; returns how many were accepted.
fn steady_pushes(
    business: Business,
    did: &'static str,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<u64> {
    tokio::spawn(async move {
        let mut tick = tokio::time::interval(Duration::from_millis(10));
        let mut sent = 0u64;
        while !stop.load(Ordering::Relaxed) {
            tick.tick().await;
            let push = Push::to_dids([did], Bytes::from(sent.to_string()));
            loop {
                match business.push(push.clone()).await {
                    Ok(reply) if reply.relayed == [did.to_string()] => break,
                    Ok(reply) => panic!("push {sent} to {did} not relayed: {reply:?}"),
                    Err(error) => {
                        eprintln!("push {sent} to {did} failed, retrying: {error}");
                        tokio::time::sleep(Duration::from_millis(100)).await;
                    }
                }
            }
            sent += 1;
        }
        sent
    })
}

/// A device's messages as `(seq, pushed number)`, and when the last one arrived.
struct Received {
    got: Arc<Mutex<Vec<(u64, u64)>>>,
    last_ms: Arc<AtomicU64>,
    epoch: Instant,
}

impl Received {
    /// Collects the messages of `events`.
    fn collect(mut events: mpsc::Receiver<Event>) -> Self {
        let received = Self {
            got: Arc::default(),
            last_ms: Arc::new(AtomicU64::new(0)),
            epoch: Instant::now(),
        };
        let (log, stamp, epoch) = (
            received.got.clone(),
            received.last_ms.clone(),
            received.epoch,
        );
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                if let Event::Message { seq, body, .. } = event {
                    let value = String::from_utf8_lossy(&body)
                        .parse::<u64>()
                        .unwrap_or(u64::MAX);
                    log.lock().expect("lock").push((seq, value));
                    stamp.store(epoch.elapsed().as_millis() as u64, Ordering::Relaxed);
                }
            }
        });
        received
    }

    fn len(&self) -> usize {
        self.got.lock().expect("lock").len()
    }

    fn last_at(&self) -> Instant {
        self.epoch + Duration::from_millis(self.last_ms.load(Ordering::Relaxed))
    }
}

#[tokio::test]
async fn a_cut_link_delays_relayed_pushes_and_loses_none() -> TestResult {
    let mut regions = TwoRegions::start().await;
    let (_bob, bob_events) = regions.device(&regions.b, "u-bob", "bob-phone").await;
    let (_alice, alice_events) = regions.device(&regions.a, "u-alice", "alice-phone").await;
    let bob_got = Received::collect(bob_events);
    let alice_got = Received::collect(alice_events);
    // Steady traffic each way: A's business to bob (in B), B's business to alice (in A).
    let stop = Arc::new(AtomicBool::new(false));
    let to_bob = steady_pushes(
        Business::new(regions.a.client.clone(), APP),
        "bob-phone",
        stop.clone(),
    );
    let to_alice = steady_pushes(
        Business::new(regions.b.client.clone(), APP),
        "alice-phone",
        stop.clone(),
    );
    tokio::time::sleep(Duration::from_secs(2)).await;
    regions.nats.cut_link();
    tokio::time::sleep(Duration::from_secs(30)).await;
    let during_cut = (bob_got.len(), alice_got.len());
    regions.nats.restore_link()?;
    let restored = Instant::now();
    tokio::time::sleep(Duration::from_secs(1)).await;
    stop.store(true, Ordering::Relaxed);
    let (sent_to_bob, sent_to_alice) = (to_bob.await?, to_alice.await?);
    for (name, got, sent) in [
        ("bob", &bob_got, sent_to_bob),
        ("alice", &alice_got, sent_to_alice),
    ] {
        let deadline = tokio::time::Instant::now() + Duration::from_secs(180);
        while (got.len() as u64) < sent {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{name}: {} of {sent} delivered",
                got.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        let messages = got.got.lock().expect("lock").clone();
        let expected: Vec<(u64, u64)> = (0..sent).map(|i| (i + 1, i)).collect();
        assert_eq!(
            messages, expected,
            "{name}: every push once, in order, with consecutive sequences"
        );
        let last_at = got.last_at();
        eprintln!(
            "regions: {name} received {sent} relayed pushes; caught up {:.1} s after the link was restored",
            last_at.saturating_duration_since(restored).as_secs_f64()
        );
    }
    eprintln!(
        "regions: delivered while the link was cut: bob {}, alice {} (the pushes made before the cut)",
        during_cut.0, during_cut.1
    );
    Ok(())
}
