//! Multi-region discovery and failover: every region's ipconfig offers the gateways of
//! both regions (the requester's first), and when region B's NATS is killed its devices
//! are told `going_away`, find region A through A's ipconfig, resume there with their
//! sequence, and get what B still held once B returns (docs/multi-region.md).

#![allow(missing_docs, clippy::unwrap_used)]

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tether_business::{Business, Push};
use tether_client::{Client, ClientConfig, ClientError, Endpoint, ErrorCode, Event};
use tokio::sync::mpsc;

#[path = "support/regions.rs"]
mod regions_support;
use regions_support::{
    RegionStack, TwoRegions, WAIT, discovery, eventually, eventually_within, next_message,
};

/// Time a device has to find another region: going_away after 1 s without NATS, then a
/// login attempt at its dead gateway may take the connect timeout before the next one.
const MOVE_WAIT: Duration = Duration::from_secs(60);

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// The gateway ids `ipconfig` offers a device of region `home`, best first.
async fn offered(ipconfig: &RegionStack, home: &str) -> Vec<String> {
    match discovery(&[ipconfig], home, "u-probe", "probe")
        .fetch(regions_support::APP)
        .await
    {
        Ok(answer) => answer.endpoints.into_iter().map(|e| e.gw).collect(),
        Err(_) => Vec::new(),
    }
}

/// Every QoS1 message of a device as `(seq, body)`, in arrival order, and the gateways it
/// logged in to since.
#[derive(Clone, Default)]
struct Log(Arc<Mutex<Vec<(u64, String)>>>, Arc<Mutex<Vec<String>>>);

impl Log {
    fn collect(mut events: mpsc::Receiver<Event>) -> Self {
        let log = Log::default();
        let writer = log.clone();
        tokio::spawn(async move {
            while let Some(event) = events.recv().await {
                match event {
                    Event::Message { seq, body, .. } => {
                        let body = String::from_utf8_lossy(&body).into_owned();
                        writer.0.lock().expect("lock").push((seq, body));
                    }
                    Event::Connected { gateway, .. } => {
                        writer.1.lock().expect("lock").push(gateway);
                    }
                    _ => {}
                }
            }
        });
        log
    }

    /// The gateways the device logged in to (after the log started), in order.
    fn logins(&self) -> Vec<String> {
        self.1.lock().expect("lock").clone()
    }

    fn bodies(&self) -> Vec<String> {
        self.0
            .lock()
            .expect("lock")
            .iter()
            .map(|(_, b)| b.clone())
            .collect()
    }

    fn seqs(&self) -> Vec<u64> {
        self.0
            .lock()
            .expect("lock")
            .iter()
            .map(|(s, _)| *s)
            .collect()
    }

    async fn wait_for(&self, who: &str, body: &str) {
        eventually_within(&format!("{who} received {body:?}"), MOVE_WAIT, async || {
            self.bodies().iter().any(|b| b == body)
        })
        .await;
    }
}

async fn push(business: &Business, did: &str, body: &str) {
    let reply = business
        .push(Push::to_dids([did], Bytes::from(body.to_string())))
        .await
        .expect("push accepted");
    assert!(
        !reply.accepted.is_empty() || !reply.relayed.is_empty(),
        "push {body:?} to {did} stored or relayed: {reply:?}"
    );
}

#[tokio::test]
async fn every_ipconfig_offers_both_regions_home_first() -> TestResult {
    let regions = TwoRegions::start().await;
    for ipconfig in [&regions.a, &regions.b] {
        for (home, other) in [(&regions.a, &regions.b), (&regions.b, &regions.a)] {
            let expected = vec![format!("gw-{}", home.name), format!("gw-{}", other.name)];
            eventually(
                &format!(
                    "{}'s ipconfig offers {expected:?} to {}",
                    ipconfig.name, home.name
                ),
                async || offered(ipconfig, &home.name).await == expected,
            )
            .await;
        }
    }
    Ok(())
}

#[tokio::test]
async fn a_region_whose_nats_dies_hands_its_devices_to_the_other() -> TestResult {
    region_failover(false).await
}

/// The phone of the test above then moves back to its first region when the second one's
/// NATS dies too: the push the first region stored while the phone was away, which the
/// phone got as a copy in the second region, was deleted there once acknowledged, so it
/// does not come again (docs/multi-region.md, "Moving back").
#[tokio::test]
async fn a_device_moving_back_to_its_first_region_gets_every_message_once() -> TestResult {
    region_failover(true).await
}

/// B's NATS dies, B's devices move to A; B returns; with `move_back`, A's NATS then dies
/// and bob's phone moves back to B.
async fn region_failover(move_back: bool) -> TestResult {
    let mut regions = TwoRegions::start().await;
    let (a, b) = (&regions.a, &regions.b);
    let biz_a = Business::new(a.client.clone(), regions_support::APP);
    let biz_b = Business::new(b.client.clone(), regions_support::APP);
    eventually("A's ipconfig sees gw-region-b", async || {
        offered(a, &b.name).await.first().map(String::as_str) == Some("gw-region-b")
    })
    .await;

    // bob's phone lives in B (found through B's ipconfig, then A's) and gets 3 messages,
    // the last one pushed in A (so A knows the phone is in B).
    let ipconfigs = [b, a];
    let (_phone, mut phone_events) = regions
        .discovering_device(&ipconfigs, b, b, "u-bob", "bob-phone", 0)
        .await;
    for i in 1..=3u64 {
        let business = if i == 3 { &biz_a } else { &biz_b };
        push(business, "bob-phone", &format!("b{i}")).await;
        assert_eq!(
            next_message(&mut phone_events, WAIT).await,
            (i, format!("b{i}").into_bytes())
        );
    }
    let phone = Log::collect(phone_events);
    // bob's tablet processed one message in B, went offline, and B stored one more.
    let (tablet, mut tablet_events) = regions
        .discovering_device(&ipconfigs, b, b, "u-bob", "bob-tablet", 0)
        .await;
    push(&biz_b, "bob-tablet", "t1").await;
    assert_eq!(
        next_message(&mut tablet_events, WAIT).await,
        (1, b"t1".to_vec())
    );
    tablet.close().await;
    eventually("bob-tablet offline in B", async || {
        !b.routes("bob-tablet").await
    })
    .await;
    push(&biz_b, "bob-tablet", "t2").await;
    // alice lives in A.
    let (_alice, alice_events) = regions.device(a, "u-alice", "alice-phone").await;
    let alice = Log::collect(alice_events);

    eprintln!("region_failover: killing region B's nats-server");
    regions.nats.region_b.kill();
    let (a, b) = (&regions.a, &regions.b);
    // A keeps serving its own devices: every push accepted, every one delivered.
    for i in 1..=5 {
        push(&biz_a, "alice-phone", &format!("a{i}")).await;
    }
    // gw-region-b refuses a new login at once (state could not register it), with a
    // reason that sends the device elsewhere, instead of letting it wait for a
    // registration that cannot happen.
    eventually(
        "a login at gw-region-b is refused for its lost NATS",
        async || {
            let token = regions
                .signer
                .issue(
                    regions_support::APP,
                    "u-late",
                    "late-phone",
                    Duration::from_secs(60),
                )
                .expect("token");
            let endpoint = b.gateway.tcp_addr.expect("tcp");
            let config = ClientConfig::new(
                vec![Endpoint::tcp(endpoint)],
                regions_support::APP,
                "late-phone",
                token,
            );
            match Client::connect(config).await {
                Err(ClientError::Login { code, text, .. }) => {
                    code == ErrorCode::Unavailable && text.contains("lost its nats connection")
                }
                _ => false,
            }
        },
    )
    .await;
    // A push for bob's phone made in A while B is down: accepted and relayed towards B
    // (where the phone was last seen), or stored here if the phone has moved already.
    push(&biz_a, "bob-phone", "x1").await;
    // gw-region-b lost its NATS: the phone is told going_away and lands in A.
    eventually_within("bob-phone registered in A", MOVE_WAIT, async || {
        a.routes("bob-phone").await && a.knows_device("u-bob", "bob-phone").await
    })
    .await;
    for i in 1..=3 {
        push(&biz_a, "bob-phone", &format!("m{i}")).await;
    }
    for i in 1..=3 {
        phone.wait_for("bob-phone", &format!("m{i}")).await;
    }
    // Once B's gateway is stale, A's ipconfig offers A's gateways to B's devices (until
    // then it offers gw-region-b, which refuses logins while it has no NATS).
    eventually("A's ipconfig fails B's devices over to A", async || {
        offered(a, &b.name).await.first().map(String::as_str) == Some("gw-region-a")
    })
    .await;
    // The tablet comes back with its resume point (1) and finds A through A's ipconfig.
    let (_tablet, tablet_events) = regions
        .discovering_device(&ipconfigs, b, a, "u-bob", "bob-tablet", 1)
        .await;
    let tablet = Log::collect(tablet_events);
    push(&biz_a, "bob-tablet", "t3").await;
    tablet.wait_for("bob-tablet", "t3").await;
    alice.wait_for("alice-phone", "a5").await;
    assert_eq!(
        alice.bodies(),
        (1..=5).map(|i| format!("a{i}")).collect::<Vec<_>>(),
        "alice: every push once, in order"
    );

    eprintln!("region_failover: restarting region B's nats-server");
    regions.nats.region_b.restart(Duration::from_secs(30))?;
    // What B held (t2) and what was relayed towards B while it was down (x1, unless the
    // phone had moved already) reach the devices in A.
    phone.wait_for("bob-phone", "x1").await;
    tablet.wait_for("bob-tablet", "t2").await;
    // Let any copy that would come twice arrive before counting.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for (name, log, expected) in [
        ("bob-phone", &phone, vec!["m1", "m2", "m3", "x1"]),
        ("bob-tablet", &tablet, vec!["t2", "t3"]),
    ] {
        let mut counts = BTreeMap::new();
        for body in log.bodies() {
            *counts.entry(body).or_insert(0) += 1;
        }
        let want: BTreeMap<String, i32> = expected.iter().map(|b| (b.to_string(), 1)).collect();
        assert_eq!(counts, want, "{name}: every acknowledged push exactly once");
        let seqs = log.seqs();
        let first = if name == "bob-phone" { 4 } else { 2 };
        assert_eq!(
            seqs,
            (first..first + seqs.len() as u64).collect::<Vec<_>>(),
            "{name}: numbered on from its resume point, without gaps"
        );
    }

    if !move_back {
        return Ok(());
    }
    // The phone moves back: A's NATS dies, the phone finds B again (B's ipconfig is its
    // first), resumes there above what A numbered, and nothing it had comes again.
    eprintln!("region_failover: killing region A's nats-server");
    let logins_before = phone.logins().len();
    regions.nats.region_a.kill();
    let b = &regions.b;
    eventually_within("bob-phone logged in to B again", MOVE_WAIT, async || {
        phone.logins()[logins_before..]
            .iter()
            .any(|gw| gw == "gw-region-b")
    })
    .await;
    for i in 1..=3 {
        push(&biz_b, "bob-phone", &format!("r{i}")).await;
    }
    for i in 1..=3 {
        phone.wait_for("bob-phone", &format!("r{i}")).await;
    }
    assert!(b.routes("bob-phone").await, "bob-phone has a route in B");
    eprintln!("region_failover: restarting region A's nats-server");
    regions.nats.region_a.restart(Duration::from_secs(30))?;
    push(&biz_b, "bob-phone", "r4").await;
    phone.wait_for("bob-phone", "r4").await;
    // Let a copy A still held (or a message B renumbered) arrive before counting.
    tokio::time::sleep(Duration::from_secs(5)).await;
    let mut counts = BTreeMap::new();
    for body in phone.bodies() {
        *counts.entry(body).or_insert(0) += 1;
    }
    let want: BTreeMap<String, i32> = ["m1", "m2", "m3", "x1", "r1", "r2", "r3", "r4"]
        .iter()
        .map(|b| (b.to_string(), 1))
        .collect();
    assert_eq!(
        counts,
        want,
        "bob-phone after moving back: every acknowledged push exactly once; (seq, body): {:?}",
        phone.0.lock().expect("lock")
    );
    let seqs = phone.seqs();
    assert_eq!(
        seqs,
        (4..4 + seqs.len() as u64).collect::<Vec<_>>(),
        "bob-phone after moving back: numbered on without gaps"
    );
    Ok(())
}

/// Sets (or, with `""`, clears) `uid`'s home region through `region`'s NATS.
async fn set_home(region: &RegionStack, uid: &str, home: &str) {
    let request = tether_schemas::bus::AffinityRequest {
        uid: uid.into(),
        region: home.into(),
    };
    let reply = region
        .client
        .request(
            tether_nats::subjects::affinity(regions_support::APP),
            request.to_json(),
        )
        .await
        .expect("affinity reply");
    let stored = tether_schemas::bus::AffinityReplyWire::from_json(&reply.payload)
        .expect("affinity json")
        .into_result()
        .expect("home region stored");
    assert_eq!(stored, request);
}

/// The gateway ids `ipconfig` offers `uid` asking as a device of `home`.
async fn offered_to(ipconfig: &RegionStack, home: &str, uid: &str) -> Vec<String> {
    match discovery(&[ipconfig], home, uid, "carol-phone")
        .fetch(regions_support::APP)
        .await
    {
        Ok(answer) => answer.endpoints.into_iter().map(|e| e.gw).collect(),
        Err(_) => Vec::new(),
    }
}

#[tokio::test]
async fn a_uid_with_a_home_region_is_offered_its_gateways_first_everywhere() -> TestResult {
    let regions = TwoRegions::start().await;
    let (a, b) = (&regions.a, &regions.b);
    let a_first = vec!["gw-region-a".to_string(), "gw-region-b".to_string()];
    let b_first = vec!["gw-region-b".to_string(), "gw-region-a".to_string()];
    eventually("A's ipconfig offers both regions", async || {
        offered_to(a, &a.name, "u-carol").await == a_first
    })
    .await;
    // The business (in A) gives carol the home region B: asking A's or B's ipconfig as a
    // device of region A, she is offered B's gateway first; others are not.
    set_home(a, "u-carol", &b.name).await;
    for ipconfig in [a, b] {
        eventually(
            &format!("{}'s ipconfig offers carol region B first", ipconfig.name),
            async || offered_to(ipconfig, &a.name, "u-carol").await == b_first,
        )
        .await;
    }
    assert_eq!(offered_to(a, &a.name, "u-dave").await, a_first);
    // A region that is not known is refused; clearing the home region (from B this time,
    // the newest record wins) ranks by the requester's region again.
    let refused = a
        .client
        .request(
            tether_nats::subjects::affinity(regions_support::APP),
            br#"{"uid":"u-carol","region":"mars"}"#.to_vec().into(),
        )
        .await?;
    let refused = tether_schemas::bus::AffinityReplyWire::from_json(&refused.payload)?;
    assert!(
        matches!(&refused, tether_schemas::bus::ReplyWire::Error { error } if error.code == tether_schemas::ErrorCode::BadRequest),
        "{refused:?}"
    );
    set_home(b, "u-carol", "").await;
    for ipconfig in [a, b] {
        eventually(
            &format!(
                "{}'s ipconfig ranks carol by her region again",
                ipconfig.name
            ),
            async || offered_to(ipconfig, &a.name, "u-carol").await == a_first,
        )
        .await;
    }
    Ok(())
}
