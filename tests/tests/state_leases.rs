//! Partition leases of state instances against a real nats-server: takeover, rebalance,
//! crash and graceful shutdown.

use std::collections::BTreeSet;
use std::time::Duration;

use async_nats::jetstream;
use tether_nats::harness;
use tether_nats::subjects::PARTITIONS;
use tether_state::leases::{self, LeaseConfig, Leases};
use tokio::time::{Instant, sleep};
use tokio_util::sync::CancellationToken;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

const TTL: Duration = Duration::from_millis(1500);
const TIMEOUT: Duration = Duration::from_secs(20);

fn all() -> BTreeSet<u16> {
    (0..PARTITIONS).collect()
}

fn config(id: &str) -> LeaseConfig {
    LeaseConfig {
        ttl: TTL,
        ..LeaseConfig::new(id)
    }
}

async fn instance(
    url: &str,
    id: &str,
) -> Result<(Leases, CancellationToken), Box<dyn std::error::Error + Send + Sync>> {
    let client = tether_nats::connect(url, id).await?;
    let token = CancellationToken::new();
    let leases = leases::start(jetstream::new(client), config(id), token.clone()).await?;
    Ok((leases, token))
}

/// Waits until `cond` holds on the owned set, or fails after `timeout`.
async fn wait_owned(
    leases: &Leases,
    timeout: Duration,
    what: &str,
    cond: impl Fn(&BTreeSet<u16>) -> bool,
) -> TestResult {
    let end = Instant::now() + timeout;
    loop {
        let now = leases.owned_now();
        if cond(&now) {
            return Ok(());
        }
        if Instant::now() >= end {
            return Err(format!("timed out waiting for {what}; owned {now:?}").into());
        }
        sleep(Duration::from_millis(50)).await;
    }
}

/// Samples both instances every 50 ms until they split the partitions between them (each
/// about half, together all), asserting they never overlap.
async fn wait_split(a: &Leases, b: &Leases, timeout: Duration) -> TestResult {
    let end = Instant::now() + timeout;
    loop {
        let (sa, sb) = (a.owned_now(), b.owned_now());
        let overlap: BTreeSet<u16> = sa.intersection(&sb).copied().collect();
        assert!(overlap.is_empty(), "partitions owned twice: {overlap:?}");
        let union: BTreeSet<u16> = sa.union(&sb).copied().collect();
        if union == all() && (15..=17).contains(&sa.len()) && (15..=17).contains(&sb.len()) {
            return Ok(());
        }
        if Instant::now() >= end {
            return Err(format!("no split: a {sa:?}, b {sb:?}").into());
        }
        sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test]
async fn single_instance_owns_all_partitions() -> TestResult {
    let node = harness::single()?;
    let (a, token) = instance(&node.client_url(), "state-a").await?;
    wait_owned(&a, TIMEOUT, "all partitions", |s| *s == all()).await?;
    token.cancel();
    a.stopped().await;
    Ok(())
}

#[tokio::test]
async fn second_instance_joins_and_they_split_without_overlap() -> TestResult {
    let node = harness::single()?;
    let url = node.client_url();
    let (a, token_a) = instance(&url, "state-a").await?;
    wait_owned(&a, TIMEOUT, "all partitions", |s| *s == all()).await?;
    let (b, token_b) = instance(&url, "state-b").await?;
    wait_split(&a, &b, TIMEOUT).await?;
    // Stays split and disjoint over a few more rounds.
    let end = Instant::now() + TTL * 2;
    while Instant::now() < end {
        let (sa, sb) = (a.owned_now(), b.owned_now());
        assert!(sa.is_disjoint(&sb), "overlap: a {sa:?}, b {sb:?}");
        sleep(Duration::from_millis(50)).await;
    }
    token_a.cancel();
    token_b.cancel();
    a.stopped().await;
    b.stopped().await;
    Ok(())
}

#[tokio::test]
async fn survivor_takes_over_after_a_crash() -> TestResult {
    let node = harness::single()?;
    let url = node.client_url();
    let (a, token_a) = instance(&url, "state-a").await?;
    let (b, _token_b) = instance(&url, "state-b").await?;
    wait_split(&a, &b, TIMEOUT).await?;
    // Crash: the task stops without releasing; the keys must expire.
    b.abort();
    let crashed = Instant::now();
    wait_owned(&a, TTL * 3 + Duration::from_secs(5), "takeover", |s| {
        *s == all()
    })
    .await?;
    eprintln!("takeover after crash in {:?}", crashed.elapsed());
    token_a.cancel();
    a.stopped().await;
    Ok(())
}

#[tokio::test]
async fn graceful_shutdown_releases_at_once() -> TestResult {
    let node = harness::single()?;
    let url = node.client_url();
    // A long TTL (rounds every 4 s): takeover well within it comes from the release.
    let long = Duration::from_secs(12);
    let connect = |id: &'static str| {
        let url = url.clone();
        async move {
            let client = tether_nats::connect(&url, id).await?;
            let token = CancellationToken::new();
            let config = LeaseConfig {
                ttl: long,
                ..LeaseConfig::new(id)
            };
            let leases = leases::start(jetstream::new(client), config, token.clone()).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((leases, token))
        }
    };
    let (a, token_a) = connect("state-a").await?;
    wait_owned(&a, TIMEOUT, "all partitions", |s| *s == all()).await?;
    let (b, token_b) = connect("state-b").await?;
    // The rebalance needs a round of each instance (ttl / 3 = 4 s).
    wait_split(&a, &b, TIMEOUT).await?;
    let held_by_b = b.owned_now();
    let b_owned = b.owned.clone();
    token_b.cancel();
    b.stopped().await;
    assert!(b_owned.borrow().is_empty(), "stopped instance owns nothing");
    // The keys are gone right after the stop, not after the TTL.
    let kv = jetstream::new(tether_nats::connect(&url, "inspect").await?)
        .get_key_value(leases::DEFAULT_BUCKET)
        .await?;
    for partition in &held_by_b {
        let value = kv.get(format!("part.{partition}")).await?;
        assert!(
            value.is_none() || value.as_deref() == Some(b"state-a".as_slice()),
            "partition {partition} still held after release: {value:?}"
        );
    }
    assert!(
        kv.get("member.state-b").await?.is_none(),
        "membership removed"
    );
    // A takes everything at its next round (<= 4 s); expiry alone would need >= 8 s.
    let released = Instant::now();
    wait_owned(&a, long * 2 / 3, "takeover after release", |s| *s == all()).await?;
    eprintln!("takeover after release in {:?}", released.elapsed());
    token_a.cancel();
    a.stopped().await;
    Ok(())
}

/// A gateway is declared gone only when its heartbeat record says so: a watch that
/// stopped delivering (its NATS node died) must not recycle a gateway that still beats,
/// and a record that cannot be read leaves the gateway alive.
#[tokio::test]
async fn a_gateway_is_gone_only_when_its_heartbeat_record_says_so() -> TestResult {
    use tether_state::liveness::GatewayLiveness;
    let node = harness::single()?;
    let nats = tether_nats::connect(&node.client_url(), "liveness-test").await?;
    let js = jetstream::new(nats.clone());
    let bucket = js
        .create_key_value(jetstream::kv::Config {
            bucket: "liveness_test".into(),
            ..Default::default()
        })
        .await?;
    let dead_after = Duration::from_millis(800);
    // Never follows the bucket: this instance hears no heartbeat (a stalled watch).
    let liveness = GatewayLiveness::new(dead_after);
    let beating = CancellationToken::new();
    let beat = {
        let (bucket, beating) = (bucket.clone(), beating.clone());
        tokio::spawn(async move {
            while !beating.is_cancelled() {
                let _ = bucket.put("gw-x", "alive".into()).await;
                sleep(Duration::from_millis(100)).await;
            }
        })
    };
    sleep(dead_after * 2).await;
    assert!(
        liveness.is_alive("gw-x"),
        "unheard is not dead before a read"
    );
    for _ in 0..3 {
        liveness.verify(&bucket).await;
        assert!(
            liveness.is_alive("gw-x"),
            "a gateway whose record is fresh is alive, whatever the watch heard"
        );
        sleep(dead_after).await;
    }

    beating.cancel();
    beat.await?;
    sleep(dead_after * 2).await;
    assert!(
        liveness.is_alive("gw-x"),
        "silent but not yet checked: still alive"
    );
    liveness.verify(&bucket).await;
    assert!(
        !liveness.is_alive("gw-x"),
        "a record older than the TTL: gone"
    );

    // A gateway whose record cannot be read (the bus is gone) is not declared dead.
    let other = GatewayLiveness::new(dead_after);
    sleep(dead_after * 2).await;
    assert!(other.is_alive("gw-y"));
    drop(node);
    sleep(Duration::from_millis(200)).await;
    tokio::time::timeout(Duration::from_secs(30), other.verify(&bucket)).await?;
    assert!(other.is_alive("gw-y"), "unknown is not dead");
    Ok(())
}

/// A process restarted after a crash with the same id, holding the proof that its
/// predecessor is dead (the instance lock), takes the predecessor's leases at once instead
/// of after the TTL; an instance with another id, even with the same flag, takes none of
/// the keys of a live instance.
#[tokio::test]
async fn a_restart_with_proof_takes_its_dead_predecessors_leases_at_once() -> TestResult {
    let node = harness::single()?;
    let url = node.client_url();
    // Two minutes: without the takeover nothing would move within this test's waits.
    let long = Duration::from_secs(120);
    let start = |id: &'static str, proof: bool| {
        let url = url.clone();
        async move {
            let client = tether_nats::connect(&url, id).await?;
            let token = CancellationToken::new();
            let config = LeaseConfig {
                ttl: long,
                previous_incarnations_dead: proof,
                ..LeaseConfig::new(id)
            };
            let leases = leases::start(jetstream::new(client), config, token.clone()).await?;
            Ok::<_, Box<dyn std::error::Error + Send + Sync>>((leases, token))
        }
    };
    let (first, _first_token) = start("state-a", false).await?;
    wait_owned(&first, TIMEOUT, "all partitions", |s| *s == all()).await?;
    // kill -9: the keys stay, with "state-a" as value, for two minutes.
    first.abort();

    let (again, again_token) = start("state-a", true).await?;
    wait_owned(&again, TIMEOUT, "the predecessor's partitions", |s| {
        *s == all()
    })
    .await?;
    // Another id with the same flag: the keys name a live instance; it takes nothing
    // (its first round runs at once; two seconds cover it).
    let (other, other_token) = start("state-b", true).await?;
    sleep(Duration::from_secs(2)).await;
    let theirs = other.owned_now();
    assert!(
        theirs.is_empty(),
        "another id took leases of a live instance: {theirs:?}"
    );
    assert_eq!(
        again.owned_now(),
        all(),
        "the restarted instance keeps them"
    );
    other_token.cancel();
    again_token.cancel();
    other.stopped().await;
    again.stopped().await;
    Ok(())
}
