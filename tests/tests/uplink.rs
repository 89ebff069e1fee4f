//! The uplink path end to end (real nats-server, gateway, state, device SDK): several UPs of
//! one device in flight to the business at once, sent in the device's order; the app
//! pipeline key `receipt_mode` (`business` | `stored`) applied live.

mod support;

use std::collections::BTreeSet;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use support::stack::{device, start_state};
use support::{APP, Fixture, TestResult};
use tether_business::{Business, UplinkReply};
use tether_client::ClientError;
use tokio_util::sync::CancellationToken;

/// What the test's business service stored: (client msg id, body).
type StoredUp = (u64, Vec<u8>);

/// How long a check below waits for something that must happen (never a speed figure).
const PATIENCE: Duration = Duration::from_secs(60);

/// Arrival order of business requests (`Tether-Msg-Id`), and how many were unanswered at
/// once at most.
#[derive(Default)]
struct Seen {
    ids: Vec<u64>,
    open: usize,
    most_open: usize,
}

#[tokio::test]
async fn a_burst_of_one_devices_ups_is_pipelined_in_order_and_all_receipted() -> TestResult {
    let fixture = Fixture::start(|_| {}).await;
    let _state = start_state(&fixture, CancellationToken::new()).await;
    // A raw business service: records the arrival order, answers after a delay that makes
    // later requests finish first.
    let seen: Arc<Mutex<Seen>> = Arc::default();
    let mut requests = fixture
        .nats_client
        .queue_subscribe(tether_nats::subjects::business_up(APP), "biz".into())
        .await?;
    fixture.nats_client.flush().await?;
    let (client, log) = (fixture.nats_client.clone(), seen.clone());
    tokio::spawn(async move {
        while let Some(request) = requests.next().await {
            let id: u64 = request
                .headers
                .as_ref()
                .and_then(|h| h.get(tether_nats::headers::MSG_ID_CLIENT))
                .and_then(|v| v.as_str().parse().ok())
                .unwrap_or(0);
            {
                let mut seen = log.lock().expect("lock");
                seen.ids.push(id);
                seen.open += 1;
                seen.most_open = seen.most_open.max(seen.open);
            }
            let (client, log) = (client.clone(), log.clone());
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(20 + (7 - id % 7) * 5)).await;
                log.lock().expect("lock").open -= 1;
                if let Some(reply) = request.reply {
                    let body = format!(r#"{{"status":"stored","id":"m{id}"}}"#);
                    let _ = client.publish(reply, body.into()).await;
                }
            });
        }
    });
    let (alice, _events) = device(&fixture, fixture.tcp, "alice").await;
    // 200 UPs at once; the SDK numbers them in call order and writes them in that order.
    let sends: Vec<_> = (0..200)
        .map(|i| alice.send(Bytes::from(format!("up {i}"))))
        .collect();
    let acks = futures::future::join_all(sends).await;
    let mut ids = Vec::new();
    for ack in acks {
        let ack = ack?;
        assert_eq!(ack.server_msg_id, format!("m{}", ack.client_msg_id));
        ids.push(ack.client_msg_id);
    }
    // The device's order is the order its UPs were stored in the uplink stream.
    let stored = stored_order(&fixture, "alice", ids.len()).await?;
    let mut sorted = ids.clone();
    sorted.sort_unstable();
    let mut in_stream = stored.clone();
    in_stream.sort_unstable();
    assert_eq!(in_stream, sorted, "every UP stored once");
    let seen = seen.lock().expect("lock");
    // First arrivals in the device's order (a retry after a lost answer may repeat one).
    let mut first = Vec::new();
    let mut known = BTreeSet::new();
    for id in &seen.ids {
        if known.insert(*id) {
            first.push(*id);
        }
    }
    assert_eq!(
        first, stored,
        "the business got every UP, in the device's order"
    );
    assert!(
        seen.most_open > 1,
        "several UPs of the device were at the business at once"
    );
    Ok(())
}

/// The client msg ids of `did`'s first `count` UPs, in the order the uplink stream stored
/// them.
async fn stored_order(
    fixture: &Fixture,
    did: &str,
    count: usize,
) -> Result<Vec<u64>, Box<dyn std::error::Error + Send + Sync>> {
    let js = async_nats::jetstream::new(fixture.nats_client.clone());
    let stream = js.get_stream(tether_nats::layout::UPLINK_STREAM).await?;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig {
            filter_subject: tether_nats::subjects::uplink(APP, did),
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    let mut ids = Vec::new();
    while ids.len() < count {
        let message = tokio::time::timeout(PATIENCE, messages.next())
            .await?
            .ok_or("uplink stream ended")??;
        let id = message
            .headers
            .as_ref()
            .and_then(|h| h.get(tether_nats::headers::MSG_ID))
            .and_then(|v| v.as_str().rsplit(':').next()?.parse().ok())
            .ok_or("uplink without a msg id")?;
        ids.push(id);
    }
    Ok(ids)
}

/// Writes the app's pipeline settings into its `tether_apps` record.
async fn set_pipeline(fixture: &Fixture, pipeline: serde_json::Value) -> TestResult {
    let js = async_nats::jetstream::new(fixture.nats_client.clone());
    let apps = js.get_key_value(tether_nats::layout::APPS_BUCKET).await?;
    let record = serde_json::json!({"id": APP, "pipeline": pipeline});
    apps.put(tether_nats::keys::app(APP), record.to_string().into())
        .await?;
    Ok(())
}

#[tokio::test]
async fn receipt_mode_stored_answers_on_store_and_still_reaches_the_business() -> TestResult {
    let fixture = Fixture::start(|_| {}).await;
    let _state = start_state(&fixture, CancellationToken::new()).await;
    let (alice, _events) = device(&fixture, fixture.tcp, "alice").await;
    // No business service yet: with the default mode an UP is never confirmed.
    match alice.send(Bytes::from_static(b"nobody stores me")).await {
        Err(ClientError::Rejected(code, _)) => {
            assert_eq!(code, tether_schemas::ErrorCode::Timeout)
        }
        Err(ClientError::Timeout) => {}
        other => panic!("expected a timeout, never a false stored: {other:?}"),
    }
    // Receipt mode `stored`, live: UP_ACK 0 once JetStream stored the UP.
    set_pipeline(&fixture, serde_json::json!({"receipt_mode": "stored"})).await?;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    let confirmed = loop {
        match alice.send(Bytes::from_static(b"stored on arrival")).await {
            Ok(ack) => break ack,
            Err(ClientError::Rejected(..) | ClientError::Timeout) => {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "receipt_mode stored not applied"
                );
            }
            Err(other) => return Err(other.into()),
        }
    };
    assert!(
        confirmed.server_msg_id.is_empty(),
        "a stored-mode receipt comes from the gateway, not the business"
    );
    // The confirmed UP still reaches the business once one serves (redelivered).
    let business = Business::new(fixture.nats_client.clone(), APP);
    let stored: Arc<Mutex<Vec<StoredUp>>> = Arc::default();
    let log = stored.clone();
    let serving = business.clone();
    tokio::spawn(async move {
        let _ = serving
            .serve_uplinks("tether-biz", move |uplink| {
                let log = log.clone();
                async move {
                    log.lock()
                        .expect("lock")
                        .push((uplink.msg_id, uplink.body.to_vec()));
                    UplinkReply::stored(Some(format!("m{}", uplink.msg_id)))
                }
            })
            .await;
    });
    let deadline = tokio::time::Instant::now() + PATIENCE;
    while !stored
        .lock()
        .expect("lock")
        .iter()
        .any(|(id, body)| *id == confirmed.client_msg_id && body == b"stored on arrival")
    {
        assert!(
            tokio::time::Instant::now() < deadline,
            "the UP confirmed on store never reached the business"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Back to the default, live: the receipt is the business's again.
    set_pipeline(&fixture, serde_json::json!({})).await?;
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let ack = alice.send(Bytes::from_static(b"business receipt")).await?;
        if ack.server_msg_id == format!("m{}", ack.client_msg_id) {
            break;
        }
        assert!(ack.server_msg_id.is_empty(), "{ack:?}");
        assert!(
            tokio::time::Instant::now() < deadline,
            "receipt_mode business not applied again"
        );
    }
    Ok(())
}
