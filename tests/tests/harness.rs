//! The NATS test harness itself: each topology starts, carries messages and stops.

use std::time::Duration;

use async_nats::jetstream::{self, stream};
use futures::StreamExt;
use tether_nats::harness;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

#[tokio::test]
async fn single_node_publishes_through_jetstream() -> TestResult {
    let node = harness::single()?;
    let client = tether_nats::connect(&node.client_url(), "test").await?;
    let js = jetstream::new(client);
    tether_nats::ensure_layout(&js, &tether_nats::BusLayout::default()).await?;
    // Idempotent: a second run converges without error.
    tether_nats::ensure_layout(&js, &tether_nats::BusLayout::default()).await?;
    let ack = js
        .publish(tether_nats::subjects::uplink("app", "d1"), "hello".into())
        .await?
        .await?;
    assert_eq!(ack.stream, tether_nats::layout::UPLINK_STREAM);
    let mut uplink = js.get_stream(tether_nats::layout::UPLINK_STREAM).await?;
    assert_eq!(uplink.info().await?.state.messages, 1);
    Ok(())
}

#[tokio::test]
async fn cluster_keeps_replicated_stream_when_a_node_dies() -> TestResult {
    let mut cluster = harness::cluster3()?;
    let client = tether_nats::connect(&cluster.client_url(), "test").await?;
    let js = jetstream::new(client.clone());
    js.create_stream(stream::Config {
        name: "R3".into(),
        subjects: vec!["r3.>".into()],
        num_replicas: 3,
        ..Default::default()
    })
    .await?;
    for i in 0..50u32 {
        js.publish("r3.msg", i.to_string().into()).await?.await?;
    }
    // Kill the node the client is most likely talking to, then any one other: the stream
    // must survive the loss of one of three nodes.
    cluster.kill(0);
    let survivor_url = cluster.servers[1].client_url();
    let client = tether_nats::connect(&survivor_url, "test-after-kill").await?;
    let js = jetstream::new(client);
    // The survivors elect new leaders first; JetStream answers 503 meanwhile.
    let (messages, last) = read_after_failover(&js, "R3", 50).await?;
    assert_eq!(
        messages, 50,
        "all acknowledged messages survive a node crash"
    );
    assert_eq!(&last[..], b"49");
    // The killed node comes back with its store and catches up.
    cluster.restart(0)?;
    Ok(())
}

#[tokio::test]
async fn leaf_regions_carry_messages_between_regions() -> TestResult {
    let regions = harness::leaf_regions()?;
    let a = tether_nats::connect(&regions.region_a.client_url(), "region-a").await?;
    let b = tether_nats::connect(&regions.region_b.client_url(), "region-b").await?;
    let mut sub = b.subscribe("cross.region").await?;
    b.flush().await?;
    // Interest propagates over the leaf links asynchronously: publish until it arrives.
    let received = tokio::time::timeout(Duration::from_secs(10), async {
        loop {
            a.publish("cross.region", "from-a".into()).await?;
            a.flush().await?;
            if let Ok(Some(msg)) =
                tokio::time::timeout(Duration::from_millis(200), sub.next()).await
            {
                return Ok::<_, Box<dyn std::error::Error + Send + Sync>>(msg);
            }
        }
    })
    .await??;
    assert_eq!(&received.payload[..], b"from-a");
    // Each region has its own JetStream domain.
    let js_a = jetstream::with_domain(a, harness::LeafRegions::DOMAIN_A);
    js_a.create_stream(stream::Config {
        name: "A".into(),
        subjects: vec!["a.>".into()],
        ..Default::default()
    })
    .await?;
    let ack = js_a.publish("a.x", "x".into()).await?.await?;
    assert_eq!(ack.domain, harness::LeafRegions::DOMAIN_A);
    Ok(())
}

/// Reads a stream's message count and its message `seq`, retrying while the cluster
/// recovers from a lost node (leader elections answer "temporarily unavailable").
async fn read_after_failover(
    js: &jetstream::Context,
    name: &str,
    seq: u64,
) -> Result<(u64, bytes::Bytes), async_nats::Error> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let attempt = async {
            let mut stream = js.get_stream(name).await?;
            let messages = stream.info().await?.state.messages;
            let message = stream.get_raw_message(seq).await?;
            Ok::<_, async_nats::Error>((messages, message.payload))
        };
        match attempt.await {
            Ok(found) => return Ok(found),
            Err(error) if tokio::time::Instant::now() > deadline => return Err(error),
            Err(_) => tokio::time::sleep(Duration::from_millis(200)).await,
        }
    }
}
