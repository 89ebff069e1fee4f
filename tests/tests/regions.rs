//! Multi-region: a hub and two leaf regions (each its own JetStream domain), each region
//! with its own gateway, state and ipconfig; pushes for devices of the other region cross through
//! the relay streams (docs/multi-region.md).

#![allow(missing_docs, clippy::unwrap_used)]

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, stream};
use bytes::Bytes;
use tether_business::{Business, Push, UplinkReply};
use tether_client::Event;
use tether_nats::harness::{self, LeafRegions};
use tether_schemas::ErrorCode;
use tokio::sync::mpsc;

#[path = "support/regions.rs"]
mod regions_support;
use regions_support::{APP, TwoRegions, WAIT, next_message};

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

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

/// Asks `client`'s region for the presence of `uids`.
async fn presence(
    client: &async_nats::Client,
    uids: &[&str],
) -> tether_schemas::bus::PresenceAnswer {
    let query = tether_schemas::bus::PresenceQuery {
        uids: uids.iter().map(|u| u.to_string()).collect(),
    };
    let reply = client
        .request(tether_nats::subjects::presence_get(APP), query.to_json())
        .await
        .expect("presence reply");
    tether_schemas::bus::PresenceAnswerWire::from_json(&reply.payload)
        .expect("presence json")
        .into_result()
        .expect("presence answer")
}

/// `uid`'s online devices in `answer` as `(did, region)`, sorted.
fn online(answer: &tether_schemas::bus::PresenceAnswer, uid: &str) -> Vec<(String, String)> {
    let mut devices: Vec<(String, String)> = answer.users[uid]
        .iter()
        .map(|d| (d.did.clone(), d.region.clone()))
        .collect();
    devices.sort();
    devices
}

#[tokio::test]
async fn presence_is_merged_across_regions_and_says_when_a_region_is_unanswered() -> TestResult {
    let mut regions = TwoRegions::start().await;
    let (_alice, _a_events) = regions.device(&regions.a, "u-alice", "alice-phone").await;
    let (_bob_b, _b_events) = regions.device(&regions.b, "u-bob", "bob-phone").await;
    let (_bob_a, _ba_events) = regions.device(&regions.a, "u-bob", "bob-laptop").await;
    let pair = |did: &str, region: &str| (did.to_string(), region.to_string());
    for client in [&regions.a.client, &regions.b.client] {
        let answer = presence(client, &["u-alice", "u-bob", "u-nobody"]).await;
        assert_eq!(
            online(&answer, "u-alice"),
            vec![pair("alice-phone", "region-a")]
        );
        assert_eq!(
            online(&answer, "u-bob"),
            vec![
                pair("bob-laptop", "region-a"),
                pair("bob-phone", "region-b")
            ],
            "a user is online wherever one of his devices is"
        );
        assert!(online(&answer, "u-nobody").is_empty());
        assert!(answer.unanswered.is_empty(), "{answer:?}");
    }
    // The link is cut: region A answers from its own bucket and names region B as
    // unanswered (B's part is its last answer, while it is remembered).
    regions.nats.cut_link();
    let answer = presence(&regions.a.client, &["u-alice", "u-carol"]).await;
    assert_eq!(
        online(&answer, "u-alice"),
        vec![pair("alice-phone", "region-a")]
    );
    assert!(online(&answer, "u-carol").is_empty());
    assert_eq!(answer.unanswered, vec!["region-b".to_string()]);
    Ok(())
}
