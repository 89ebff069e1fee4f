//! The state service end to end: real nats-server, gateway, state, device SDK, business SDK.

mod support;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use support::stack::{Proxy, device, next_message, start_state};
use support::{APP, Fixture, TestResult, WAIT};
use tether_business::{Business, Push, UplinkReply};
use tether_client::ClientError;
use tether_schemas::ErrorCode;
use tokio_util::sync::CancellationToken;

/// What the test's business service stored: (did, client msg id, body).
type StoredUplink = (String, u64, Vec<u8>);

/// Waits until `check` holds, polling.
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

async fn cursor_acked(fixture: &Fixture, did: &str) -> u64 {
    fixture.cursor_field(did, "acked").await
}

#[tokio::test]
async fn chat_round_trip_with_receipts_after_store() -> TestResult {
    let fixture = Fixture::start(|_| {}).await;
    let _state = start_state(&fixture, CancellationToken::new()).await;
    let business = Business::new(fixture.nats_client.clone(), APP);
    let stored: Arc<Mutex<Vec<StoredUplink>>> = Arc::default();
    let serving = business.clone();
    let log = stored.clone();
    tokio::spawn(async move {
        let pusher = serving.clone();
        let _ = serving
            .serve_uplinks("tether-biz", move |uplink| {
                let (log, pusher) = (log.clone(), pusher.clone());
                async move {
                    log.lock().expect("lock").push((
                        uplink.did.clone(),
                        uplink.msg_id,
                        uplink.body.to_vec(),
                    ));
                    let to = Push::to_uids(["u-bob1"], uplink.body.clone());
                    match pusher.push(to).await {
                        Ok(_) => UplinkReply::stored(Some(format!("m{}", uplink.msg_id))),
                        Err(error) => UplinkReply::error(ErrorCode::Unavailable, error.to_string()),
                    }
                }
            })
            .await;
    });
    // bob1's two devices share the uid u-bob1 when their token says so.
    let (b1, mut b1_events) = device(&fixture, fixture.tcp, "bob1").await;
    let mut b2_config = tether_client::ClientConfig::new(
        vec![tether_client::Endpoint::tcp(fixture.tcp)],
        APP,
        "bob1-tablet",
        fixture
            .signer
            .issue(APP, "u-bob1", "bob1-tablet", Duration::from_secs(3600))?,
    );
    b2_config.reconnect.min = Duration::from_millis(50);
    let (_b2, mut b2_events) = tether_client::Client::connect(b2_config).await?;
    let (alice, _alice_events) = device(&fixture, fixture.tcp, "alice").await;
    // Both of bob's devices are known to state before alice writes.
    eventually("bob's devices indexed", async || {
        let js = async_nats::jetstream::new(fixture.nats_client.clone());
        let Ok(kv) = js.get_key_value(tether_nats::layout::ROUTES_BUCKET).await else {
            return false;
        };
        let Ok(Some(value)) = kv.get(tether_nats::keys::user(APP, "u-bob1")).await else {
            return false;
        };
        serde_json::from_slice::<Vec<String>>(&value)
            .map(|d| d.len() == 2)
            .unwrap_or(false)
    })
    .await;

    let ack = alice.send(Bytes::from_static(b"hello bob")).await?;
    assert_eq!(ack.server_msg_id, format!("m{}", ack.client_msg_id));
    assert_eq!(
        stored.lock().expect("lock").len(),
        1,
        "UP_ACK came after the business stored it"
    );
    assert_eq!(
        next_message(&mut b1_events).await,
        (1, b"hello bob".to_vec())
    );
    assert_eq!(
        next_message(&mut b2_events).await,
        (1, b"hello bob".to_vec())
    );
    // Their acks clear the in-flight set and move the cursors.
    eventually("bob1 acked", async || {
        cursor_acked(&fixture, "bob1").await == 1
    })
    .await;
    eventually("bob1-tablet acked", async || {
        cursor_acked(&fixture, "bob1-tablet").await == 1
    })
    .await;
    drop(b1);
    Ok(())
}

#[tokio::test]
async fn thousand_qos1_messages_survive_three_connection_losses() -> TestResult {
    let fixture = Fixture::start(|_| {}).await;
    let _state = start_state(&fixture, CancellationToken::new()).await;
    let proxy = Proxy::start(fixture.tcp).await;
    let (_client, mut events) = device(&fixture, proxy.addr, "d1").await;
    let business = Business::new(fixture.nats_client.clone(), APP);
    let pushing = tokio::spawn(async move {
        for i in 1..=1000u32 {
            business
                .push(Push::to_dids(["d1"], i.to_string().into_bytes()))
                .await
                .expect("push accepted");
        }
    });
    let mut seen = Vec::new();
    while seen.len() < 1000 {
        let (seq, body) = next_message(&mut events).await;
        assert_eq!(body, seq.to_string().into_bytes());
        seen.push(seq);
        if [250, 500, 750].contains(&seen.len()) {
            proxy.cut();
        }
    }
    pushing.await?;
    assert_eq!(
        seen,
        (1..=1000).collect::<Vec<u64>>(),
        "each message once, in order"
    );
    Ok(())
}

/// A gateway that stalls (a paused process: TCP still accepted, nothing answered) is left
/// after two silent heartbeat intervals, and the device logs in at the next endpoint first
/// instead of waiting out its connect timeout at the stalled one (PROTOCOL 6.2).
#[tokio::test]
async fn a_device_leaves_a_stalled_gateway_for_the_next_endpoint() -> TestResult {
    let fixture = Fixture::start(|_| {}).await;
    let _state = start_state(&fixture, CancellationToken::new()).await;
    let stop = CancellationToken::new();
    let other = tether_gateway::start(fixture.gateway_config("gw-other"), stop.clone()).await?;
    let other_tcp = other.tcp_addr.ok_or("no tcp listener")?;
    let stalled = Proxy::start(fixture.tcp).await;
    let endpoints = vec![
        tether_client::Endpoint::tcp(stalled.addr),
        tether_client::Endpoint::tcp(other_tcp),
    ];
    let mut config =
        tether_client::ClientConfig::new(endpoints, support::APP, "d1", fixture.token("d1"));
    config.heartbeat = Some(Duration::from_millis(500));
    config.reconnect.min = Duration::from_millis(50);
    config.reconnect.max = Duration::from_millis(200);
    // Far longer than the test's wait: a LOGIN sent to the stalled gateway first would
    // make the test fail.
    config.connect_timeout = WAIT * 3;
    let (client, mut events) = tether_client::Client::connect(config).await?;
    let first = tokio::time::timeout(WAIT, events.recv()).await?;
    assert!(
        matches!(&first, Some(tether_client::Event::Connected { gateway, .. }) if gateway == support::GW),
        "first login through the proxy: {first:?}"
    );
    stalled.freeze();
    let moved = tokio::time::timeout(WAIT, async {
        loop {
            match events.recv().await {
                Some(tether_client::Event::Connected { gateway, .. }) => return Some(gateway),
                Some(_) => continue,
                None => return None,
            }
        }
    })
    .await?;
    assert_eq!(moved.as_deref(), Some("gw-other"));
    let business = Business::new(fixture.nats_client.clone(), APP);
    business
        .push(Push::to_dids(["d1"], b"after".to_vec()))
        .await?;
    assert_eq!(next_message(&mut events).await.1, b"after".to_vec());
    client.close().await;
    stop.cancel();
    other.wait().await;
    Ok(())
}

#[tokio::test]
async fn messages_pushed_while_offline_arrive_in_order_at_login() -> TestResult {
    let fixture = Fixture::start(|_| {}).await;
    let _state = start_state(&fixture, CancellationToken::new()).await;
    let business = Business::new(fixture.nats_client.clone(), APP);
    for i in 1..=5u64 {
        let reply = business
            .push(Push::to_dids(["later"], format!("m{i}").into_bytes()))
            .await?;
        assert_eq!(reply.accepted.len(), 1);
        assert_eq!(reply.accepted[0].seq, i);
    }
    let (_client, mut events) = device(&fixture, fixture.tcp, "later").await;
    for i in 1..=5u64 {
        assert_eq!(
            next_message(&mut events).await,
            (i, format!("m{i}").into_bytes())
        );
    }
    Ok(())
}

#[tokio::test]
async fn uplink_without_business_times_out_and_without_right_is_refused() -> TestResult {
    let fixture = Fixture::start(|_| {}).await;
    let _state = start_state(&fixture, CancellationToken::new()).await;
    let (client, _events) = device(&fixture, fixture.tcp, "lonely").await;
    match client.send(Bytes::from_static(b"anyone?")).await {
        Err(ClientError::Rejected(code, _)) => assert_eq!(code, ErrorCode::Timeout),
        Err(ClientError::Timeout) => {}
        other => panic!("expected a timeout, never a false stored: {other:?}"),
    }
    // A receive-only token: UP is refused with forbidden.
    let mut claims = tether_auth::Claims::new(
        APP,
        "u-ro",
        "ro",
        tether_auth::unix_now(),
        Duration::from_secs(600),
    );
    claims.rights = claims.rights.without(tether_auth::Right::Up);
    let config = tether_client::ClientConfig::new(
        vec![tether_client::Endpoint::tcp(fixture.tcp)],
        APP,
        "ro",
        fixture.signer.sign(&claims)?,
    );
    let (readonly, _events) = tether_client::Client::connect(config).await?;
    match readonly.send(Bytes::from_static(b"not allowed")).await {
        Err(ClientError::Rejected(code, _)) => assert_eq!(code, ErrorCode::Forbidden),
        other => panic!("expected forbidden, got {other:?}"),
    }
    // A push with an invalid target is refused with bad_request.
    let business = Business::new(fixture.nats_client.clone(), APP);
    let refused = business
        .push(Push::to_dids(["not.valid"], Bytes::from_static(b"x")))
        .await;
    assert!(refused.is_err(), "invalid did refused: {refused:?}");
    Ok(())
}

#[tokio::test]
async fn restarted_state_rebuilds_routes_and_keeps_delivering() -> TestResult {
    let fixture = Fixture::start(|_| {}).await;
    let first = CancellationToken::new();
    let state = start_state(&fixture, first.clone()).await;
    let (_client, mut events) = device(&fixture, fixture.tcp, "steady").await;
    let business = Business::new(fixture.nats_client.clone(), APP);
    business
        .push(Push::to_dids(["steady"], Bytes::from_static(b"before")))
        .await?;
    assert_eq!(next_message(&mut events).await, (1, b"before".to_vec()));
    first.cancel();
    state.wait().await;
    let _again = start_state(&fixture, CancellationToken::new()).await;
    business
        .push(Push::to_dids(["steady"], Bytes::from_static(b"after")))
        .await?;
    assert_eq!(next_message(&mut events).await, (2, b"after".to_vec()));
    Ok(())
}

#[tokio::test]
async fn presence_online_offline_without_flapping_on_quick_reconnects() -> TestResult {
    use futures::StreamExt;
    let fixture = Fixture::start(|_| {}).await;
    let _state = start_state(&fixture, CancellationToken::new()).await;
    let mut presence = fixture
        .nats_client
        .subscribe(tether_nats::subjects::presence(APP))
        .await?;
    fixture.nats_client.flush().await?;
    let proxy = Proxy::start(fixture.tcp).await;
    let (client, mut events) = device(&fixture, proxy.addr, "flappy").await;
    let next = async |presence: &mut async_nats::Subscriber| -> serde_json::Value {
        let message = tokio::time::timeout(WAIT, presence.next())
            .await
            .expect("presence in time")
            .expect("message");
        serde_json::from_slice(&message.payload).expect("json")
    };
    let online = next(&mut presence).await;
    assert_eq!(
        (online["did"].as_str(), online["online"].as_bool()),
        (Some("flappy"), Some(true))
    );
    assert_eq!(online["uid"], "u-flappy");
    // A cut and an automatic reconnect inside the window: no offline, no second online.
    proxy.cut();
    loop {
        match tokio::time::timeout(WAIT, events.recv()).await? {
            Some(tether_client::Event::Connected { .. }) => break,
            Some(_) => continue,
            None => panic!("client stopped"),
        }
    }
    let quiet = tokio::time::timeout(Duration::from_millis(1500), presence.next()).await;
    assert!(
        quiet.is_err(),
        "no presence change for a quick reconnect: {quiet:?}"
    );
    // Leaving for good: offline once the reconnect window (1 s here) has passed.
    client.close().await;
    let offline = next(&mut presence).await;
    assert_eq!(
        (offline["did"].as_str(), offline["online"].as_bool()),
        (Some("flappy"), Some(false))
    );
    Ok(())
}

#[tokio::test]
async fn apps_are_isolated_a_push_never_reaches_another_apps_device() -> TestResult {
    let fixture = Fixture::start(|_| {}).await;
    let _state = start_state(&fixture, CancellationToken::new()).await;
    let (_client, mut events) = device(&fixture, fixture.tcp, "shared-name").await;
    // Another app pushes to a device id that exists in app "demo": it lands in the other
    // app's namespace only.
    let other = Business::new(fixture.nats_client.clone(), "other-app");
    other
        .push(Push::to_dids(
            ["shared-name"],
            Bytes::from_static(b"wrong app"),
        ))
        .await?;
    let business = Business::new(fixture.nats_client.clone(), APP);
    business
        .push(Push::to_dids(
            ["shared-name"],
            Bytes::from_static(b"right app"),
        ))
        .await?;
    assert_eq!(next_message(&mut events).await, (1, b"right app".to_vec()));
    let nothing = tokio::time::timeout(Duration::from_millis(700), events.recv()).await;
    assert!(
        !matches!(nothing, Ok(Some(tether_client::Event::Message { .. }))),
        "got {nothing:?}"
    );
    Ok(())
}

#[tokio::test]
async fn chat_through_the_python_business_service() -> TestResult {
    let fixture = Fixture::start(|_| {}).await;
    let _state = start_state(&fixture, CancellationToken::new()).await;
    let _service = support::python::PythonService::start(&fixture.nats.client_url()).await?;
    // Bob has two devices (one user id), Alice one.
    let bob_device = |did: &'static str| {
        let mut config = tether_client::ClientConfig::new(
            vec![tether_client::Endpoint::tcp(fixture.tcp)],
            APP,
            did,
            fixture
                .signer
                .issue(APP, "bob", did, Duration::from_secs(3600))
                .expect("token"),
        );
        config.reconnect.min = Duration::from_millis(50);
        tether_client::Client::connect(config)
    };
    let (_phone, mut phone_events) = bob_device("bob-phone").await?;
    let (_laptop, mut laptop_events) = bob_device("bob-laptop").await?;
    let (alice, _alice_events) = device(&fixture, fixture.tcp, "alice").await;
    eventually("bob's devices indexed", async || {
        let js = async_nats::jetstream::new(fixture.nats_client.clone());
        let Ok(kv) = js.get_key_value(tether_nats::layout::ROUTES_BUCKET).await else {
            return false;
        };
        let Ok(Some(value)) = kv.get(tether_nats::keys::user(APP, "bob")).await else {
            return false;
        };
        serde_json::from_slice::<Vec<String>>(&value)
            .map(|d| d.len() == 2)
            .unwrap_or(false)
    })
    .await;

    let ack = alice
        .send(Bytes::from_static(br#"{"to_uid":"bob","text":"hi bob"}"#))
        .await?;
    assert!(ack.client_msg_id > 0);
    for events in [&mut phone_events, &mut laptop_events] {
        let (seq, body) = next_message(events).await;
        assert_eq!(seq, 1);
        let json: serde_json::Value = serde_json::from_slice(&body)?;
        assert_eq!(json["from_uid"], "u-alice");
        assert_eq!(json["text"], "hi bob");
    }
    eventually("bob's devices acked", async || {
        cursor_acked(&fixture, "bob-phone").await == 1
            && cursor_acked(&fixture, "bob-laptop").await == 1
    })
    .await;
    Ok(())
}

#[tokio::test]
async fn inbox_retention_follows_the_state_configuration() -> TestResult {
    // LOGIN_ACK waits for state's registration, which carries the device's floor.
    let fixture = Fixture::start(|c| c.await_registration = true).await;
    let mut config = support::stack::fast_state(&fixture.nats.client_url());
    config.inbox_max_per_device = 3;
    config.inbox_max_age_secs = 600;
    let _state = tether_state::start(config, CancellationToken::new()).await?;
    let js = async_nats::jetstream::new(fixture.nats_client.clone());
    let mut inbox = js.get_stream(tether_nats::layout::INBOX_STREAM).await?;
    let settings = inbox.info().await?.config.clone();
    assert_eq!(settings.max_messages_per_subject, 3);
    assert_eq!(settings.max_age, Duration::from_secs(600));
    // Only the newest three stay for a device that never comes online.
    let business = Business::new(fixture.nats_client.clone(), APP);
    for i in 1..=5u64 {
        let reply = business
            .push(Push::to_dids(["away"], format!("m{i}").into_bytes()))
            .await?;
        assert_eq!(
            reply.accepted[0].seq, i,
            "sequences keep counting past the retention limit"
        );
    }
    assert_eq!(
        inbox.info().await?.state.messages,
        3,
        "only this device's newest three remain"
    );
    // The device logs in: LOGIN_ACK's last_acked_seq points past the expired two, it is
    // told of the gap, and delivery goes on with 3, 4, 5 instead of waiting for 1 forever.
    use support::{RawClient, Transport};
    use tether_schemas::{ErrorCode, Frame};
    let mut raw = RawClient::connect(Transport::Tcp, fixture.tcp).await;
    raw.send(&fixture.login_frame_for(APP, "away")).await;
    let mut acked = None;
    let mut gap = false;
    let mut seqs = Vec::new();
    while seqs.len() < 3 {
        match raw.next_frame().await {
            Some(Frame::LoginAck(ack)) => acked = Some(ack.last_acked_seq),
            Some(Frame::Error { error, .. })
                if error.code == u32::from(ErrorCode::RecoveryGap.as_u16()) =>
            {
                gap = true
            }
            Some(Frame::Down { header, .. }) => seqs.push(header.seq),
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(
        acked,
        Some(2),
        "LOGIN_ACK names the floor past the expired messages"
    );
    assert!(gap, "the device is told that messages expired");
    assert_eq!(seqs, [3, 4, 5]);
    Ok(())
}

#[tokio::test]
async fn a_resent_uplink_whose_receipt_was_lost_gets_it_again() -> TestResult {
    use support::{RawClient, Transport};
    use tether_schemas::{Frame, pb};
    let fixture = Fixture::start(|_| {}).await;
    let _state = start_state(&fixture, CancellationToken::new()).await;
    let business = Business::new(fixture.nats_client.clone(), APP);
    let calls = Arc::new(Mutex::new(0u32));
    let counted = calls.clone();
    tokio::spawn(async move {
        let _ = business
            .serve_uplinks("tether-biz", move |uplink| {
                let counted = counted.clone();
                async move {
                    *counted.lock().expect("lock") += 1;
                    UplinkReply::stored(Some(format!("m{}", uplink.msg_id)))
                }
            })
            .await;
    });
    let up = Frame::Up {
        header: pb::Up {
            client_msg_id: 77,
            session: String::new(),
        },
        body: Bytes::from_static(b"once"),
    }
    .encode();
    let receipt = |frame: Option<Frame>| match frame {
        Some(Frame::UpAck(ack)) => (ack.client_msg_id, ack.code, ack.server_msg_id),
        other => panic!("expected UP_ACK, got {other:?}"),
    };
    let (mut first, _) = fixture.login(Transport::Tcp, "resender").await;
    first.send(&up).await;
    assert_eq!(receipt(first.next_frame().await), (77, 0, "m77".into()));
    // The connection is lost before the app saw the receipt; after reconnecting it
    // resends the same UP. The stream drops the copy, the receipt comes again.
    drop(first);
    let (mut second, _): (RawClient, _) = fixture.login(Transport::Tcp, "resender").await;
    second.send(&up).await;
    assert_eq!(receipt(second.next_frame().await), (77, 0, "m77".into()));
    assert_eq!(*calls.lock().expect("lock"), 1, "stored once");
    Ok(())
}

/// Receipts live in the partition owner's memory (PROTOCOL 10.2): after the owner
/// changed, a resend of an UP answered by the previous owner is unknown to the new one,
/// so it is processed again; the business is asked again, answers its first `stored`,
/// stores nothing twice, and the device gets the same receipt.
#[tokio::test]
async fn a_resend_after_the_owner_changed_is_asked_again_and_stored_once() -> TestResult {
    use futures::StreamExt;
    use support::{RawClient, Transport};
    use tether_schemas::{Frame, pb};
    let fixture = Fixture::start(|_| {}).await;
    let first_owner = CancellationToken::new();
    let state = start_state(&fixture, first_owner.clone()).await;
    // Every request the business gets, seen by a plain subscriber beside it.
    let mut spy = fixture
        .nats_client
        .subscribe(tether_nats::subjects::business_up(APP))
        .await?;
    fixture.nats_client.flush().await?;
    let stored: Arc<Mutex<Vec<StoredUplink>>> = Arc::default();
    let kept = stored.clone();
    let business = Business::new(fixture.nats_client.clone(), APP);
    tokio::spawn(async move {
        let _ = business
            .serve_uplinks("tether-biz", move |uplink| {
                let kept = kept.clone();
                async move {
                    // Idempotent on (did, msg id), as PROTOCOL 11.1 asks.
                    let mut kept = kept.lock().expect("lock");
                    if !kept
                        .iter()
                        .any(|(did, id, _)| *did == uplink.did && *id == uplink.msg_id)
                    {
                        kept.push((uplink.did.clone(), uplink.msg_id, uplink.body.to_vec()));
                    }
                    UplinkReply::stored(Some(format!("m{}", uplink.msg_id)))
                }
            })
            .await;
    });
    let up = Frame::Up {
        header: pb::Up {
            client_msg_id: 91,
            session: String::new(),
        },
        body: Bytes::from_static(b"once"),
    }
    .encode();
    let receipt = |frame: Option<Frame>| match frame {
        Some(Frame::UpAck(ack)) => (ack.client_msg_id, ack.code, ack.server_msg_id),
        other => panic!("expected UP_ACK, got {other:?}"),
    };
    let (mut first, _) = fixture.login(Transport::Tcp, "mover").await;
    first.send(&up).await;
    assert_eq!(receipt(first.next_frame().await), (91, 0, "m91".into()));
    let asked = |spy: &mut async_nats::Subscriber| {
        let mut n = 0;
        while let Some(Some(_)) = futures::FutureExt::now_or_never(spy.next()) {
            n += 1;
        }
        n
    };
    // A flush makes sure every request sent so far reached the spy.
    fixture.nats_client.flush().await?;
    assert_eq!(asked(&mut spy), 1);
    // The partition moves to a new owner (this one stops), and the device, whose
    // connection was lost with the receipt, resends on a new connection.
    drop(first);
    first_owner.cancel();
    state.wait().await;
    let _second_owner = start_state(&fixture, CancellationToken::new()).await;
    let (mut second, _): (RawClient, _) = fixture.login(Transport::Tcp, "mover").await;
    second.send(&up).await;
    assert_eq!(receipt(second.next_frame().await), (91, 0, "m91".into()));
    fixture.nats_client.flush().await?;
    assert_eq!(asked(&mut spy), 1, "the new owner asked the business again");
    assert_eq!(
        stored.lock().expect("lock").clone(),
        vec![("mover".to_string(), 91, b"once".to_vec())],
        "stored once"
    );
    // A later resend is answered by the new owner from memory: not asked again.
    second.send(&up).await;
    assert_eq!(receipt(second.next_frame().await), (91, 0, "m91".into()));
    fixture.nats_client.flush().await?;
    assert_eq!(asked(&mut spy), 0, "answered from the new owner's memory");
    Ok(())
}

#[tokio::test]
async fn a_retried_push_stores_nothing_new_and_gets_the_first_answer() -> TestResult {
    let fixture = Fixture::start(|_| {}).await;
    let _state = start_state(&fixture, CancellationToken::new()).await;
    let business = Business::new(fixture.nats_client.clone(), APP);
    // The same push value (same Tether-Push-Id), sent twice as a retry would.
    let push = Push::to_dids(["idem"], b"once".to_vec());
    let first = business.push(push.clone()).await?;
    let again = business.push(push).await?;
    assert_eq!(
        first.accepted, again.accepted,
        "the retry gets the first answer"
    );
    assert_eq!(first.accepted[0].seq, 1);
    let next = business
        .push(Push::to_dids(["idem"], b"next".to_vec()))
        .await?;
    assert_eq!(next.accepted[0].seq, 2, "the retry used no sequence");
    let (_client, mut events) = device(&fixture, fixture.tcp, "idem").await;
    assert_eq!(next_message(&mut events).await, (1, b"once".to_vec()));
    assert_eq!(next_message(&mut events).await, (2, b"next".to_vec()));
    Ok(())
}

#[tokio::test]
async fn requests_beyond_the_instance_limit_are_refused_busy_and_succeed_on_retry() -> TestResult {
    let fixture = Fixture::start(|_| {}).await;
    let mut config = support::stack::fast_state(&fixture.nats.client_url());
    config.max_requests_in_progress = 1;
    let state = tether_state::start(config, CancellationToken::new()).await?;
    let business = Business::new(fixture.nats_client.clone(), APP);
    // A burst of QoS1 pushes: one is handled at a time, the others are told at once.
    let replies = futures::future::join_all((0..100).map(|i| {
        let business = business.clone();
        async move {
            business
                .push(Push::to_dids([format!("busy{i}")], "x").id(format!("p{i}")))
                .await
        }
    }))
    .await;
    let mut busy = Vec::new();
    for (i, reply) in replies.into_iter().enumerate() {
        match reply {
            Ok(reply) => assert_eq!(reply.accepted.len(), 1),
            Err(tether_business::BusinessError::Refused(ErrorCode::Unavailable, text)) => {
                assert!(text.contains("busy"), "{text}");
                busy.push(i);
            }
            Err(other) => panic!("push {i}: {other}"),
        }
    }
    assert!(
        !busy.is_empty(),
        "a burst of 100 over a limit of 1 was all taken"
    );
    // Retried one at a time (same push ids), every refused push is stored once.
    for i in &busy {
        let reply = business
            .push(Push::to_dids([format!("busy{i}")], "x").id(format!("p{i}")))
            .await?;
        assert_eq!(reply.accepted.len(), 1);
        assert_eq!(reply.accepted[0].seq, 1, "stored once");
    }
    let metrics = support::http_get(state.admin_addr, "/metrics").await;
    assert!(
        metrics.contains(&format!("tether_state_busy_total {}", busy.len())),
        "{metrics}"
    );
    Ok(())
}

#[tokio::test]
async fn a_device_offline_longer_than_the_forget_window_leaves_its_users_list() -> TestResult {
    // LOGIN_ACK after state registered the device: a push right after it finds the user.
    let fixture = Fixture::start(|config| config.await_registration = true).await;
    let mut config = support::stack::fast_state(&fixture.nats.client_url());
    config.forget_devices_after_secs = 1;
    let state = tether_state::start(config, CancellationToken::new()).await?;
    let business = Business::new(fixture.nats_client.clone(), APP);

    let (client, mut events) = device(&fixture, fixture.tcp, "old-phone").await;
    let reply = business.push(Push::to_uids(["u-old-phone"], "1")).await?;
    assert_eq!(reply.accepted.len(), 1, "{reply:?}");
    assert_eq!(next_message(&mut events).await.1, b"1");
    drop(client);
    drop(events);

    // Offline past the window: the user's pushes no longer store for it.
    let deadline = tokio::time::Instant::now() + WAIT;
    let forgotten = loop {
        tokio::time::sleep(Duration::from_millis(300)).await;
        let reply = business.push(Push::to_uids(["u-old-phone"], "2")).await?;
        if reply.accepted.is_empty() || tokio::time::Instant::now() > deadline {
            break reply;
        }
    };
    assert!(forgotten.accepted.is_empty(), "{forgotten:?}");
    let metrics = support::http_get(state.admin_addr, "/metrics").await;
    assert!(
        metrics.contains("tether_state_devices_forgotten_total 1"),
        "{metrics}"
    );

    // A login brings it back: the next push to the user reaches it.
    let (_client, mut events) = device(&fixture, fixture.tcp, "old-phone").await;
    let reply = business.push(Push::to_uids(["u-old-phone"], "3")).await?;
    assert_eq!(reply.accepted.len(), 1, "{reply:?}");
    // Messages stored while it was still listed come first, in order.
    let mut bodies = Vec::new();
    while bodies.last().map(Vec::as_slice) != Some(&b"3"[..]) {
        bodies.push(next_message(&mut events).await.1);
    }
    assert!(
        bodies.iter().all(|b| b.as_slice() != b"1"),
        "acked 1 came again"
    );
    Ok(())
}

/// A gateway killed without goodbye (no `conn.down`, heartbeats stop): once its heartbeat
/// record is older than the TTL, state recycles its devices like disconnects: presence
/// says offline after the reconnect window and the route is removed.
#[tokio::test]
async fn devices_of_a_gateway_that_stopped_heart_beating_go_offline() -> TestResult {
    use futures::StreamExt;
    use tether_schemas::bus::{ConnEvent, Event, PresenceEvent};
    let fixture = Fixture::start(|_| {}).await;
    let _state = start_state(&fixture, CancellationToken::new()).await;
    let js = async_nats::jetstream::new(fixture.nats_client.clone());
    let heartbeats = js
        .get_key_value(tether_nats::layout::GATEWAYS_BUCKET)
        .await?;
    let mut presence = fixture
        .nats_client
        .subscribe(tether_nats::subjects::presence(APP))
        .await?;
    fixture.nats_client.flush().await?;

    // A gateway nobody else knows: it beats, then a device logs in on it.
    let (gw, did) = ("gw-ghost", "ghost-phone");
    let beating = CancellationToken::new();
    let beat = {
        let (heartbeats, beating) = (heartbeats.clone(), beating.clone());
        tokio::spawn(async move {
            while !beating.is_cancelled() {
                let _ = heartbeats.put(gw, "{}".into()).await;
                tokio::time::sleep(Duration::from_millis(500)).await;
            }
        })
    };
    let up = Event::ConnUp(ConnEvent {
        app: APP.into(),
        uid: "u-ghost".into(),
        did: did.into(),
        gw: gw.into(),
        region: String::new(),
        conn: 7,
        remote: "127.0.0.1:1".into(),
        resume_seq: Some(0),
        reason: None,
        sessions: Vec::new(),
        at_ms: 1,
    });
    js.publish(tether_nats::subjects::conn_events(APP, did), up.to_json()?)
        .await?
        .await?;
    let online = tokio::time::timeout(WAIT, presence.next())
        .await?
        .ok_or("presence ended")?;
    let online = PresenceEvent::from_json(&online.payload)?;
    assert!(online.online && online.did == did && online.gw == gw);

    // Alive while it beats, whatever the time: no offline event for two TTLs' worth of
    // checks would be too slow for the suite; four seconds of beats must keep it online.
    let quiet = tokio::time::timeout(Duration::from_secs(4), presence.next()).await;
    assert!(
        quiet.is_err(),
        "a beating gateway's device went offline: {quiet:?}"
    );

    // SIGKILL: the beats stop, no conn.down. Offline after TTL (15 s) + window (the wait
    // is generous: a loaded machine slows every step).
    beating.cancel();
    beat.await?;
    let offline = tokio::time::timeout(Duration::from_secs(90), presence.next())
        .await?
        .ok_or("presence ended")?;
    let offline = PresenceEvent::from_json(&offline.payload)?;
    assert!(!offline.online && offline.did == did, "{offline:?}");
    let routes = js.get_key_value(tether_nats::layout::ROUTES_BUCKET).await?;
    assert!(
        routes
            .get(tether_nats::keys::route(APP, did))
            .await?
            .is_none(),
        "the dead gateway's route is removed"
    );
    Ok(())
}

/// A partition worker whose consumer disappears under it (as after a JetStream failure)
/// fails, is restarted by its supervisor, and the partition serves again: a push to a
/// device of that partition still arrives.
#[tokio::test]
async fn a_failed_partition_worker_is_restarted_and_serves_again() -> TestResult {
    use tether_nats::layout::{INBOX_STREAM, PartitionConsumer};
    let fixture = Fixture::start(|_| {}).await;
    let state = start_state(&fixture, CancellationToken::new()).await;
    let business = Business::new(fixture.nats_client.clone(), APP);
    let (_client, mut events) = device(&fixture, fixture.tcp, "sturdy").await;
    let reply = business
        .push(Push::to_dids(["sturdy"], b"before".to_vec()))
        .await?;
    assert_eq!(reply.accepted.len(), 1);
    assert_eq!(next_message(&mut events).await, (1, b"before".to_vec()));

    let metric = |text: &str, name: &str| {
        text.lines()
            .find_map(|line| line.strip_prefix(name)?.trim().parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    let failures = |text: &str| metric(text, "tether_state_partition_failures_total");
    let before = failures(&support::http_get(state.admin_addr, "/metrics").await);

    // The inbox consumer of the device's partition is deleted under the running worker.
    let partition = tether_nats::subjects::partition("sturdy");
    let js = async_nats::jetstream::new(fixture.nats_client.clone());
    js.get_stream(INBOX_STREAM)
        .await?
        .delete_consumer(&PartitionConsumer::Inbox.name(partition))
        .await?;
    eventually("the worker failure is counted", async || {
        failures(&support::http_get(state.admin_addr, "/metrics").await) > before
    })
    .await;

    let reply = business
        .push(Push::to_dids(["sturdy"], b"after".to_vec()))
        .await?;
    assert_eq!(reply.accepted.len(), 1);
    assert_eq!(next_message(&mut events).await, (2, b"after".to_vec()));
    Ok(())
}

/// A business slower than the uplink stream's ack wait: state keeps the message in
/// progress while it waits, so JetStream does not hand it out again, and the business
/// is asked once (a raw subscriber counts the requests; no SDK de-duplication).
#[tokio::test]
async fn a_business_slower_than_the_ack_wait_is_asked_once() -> TestResult {
    use futures::StreamExt;
    use std::sync::atomic::{AtomicUsize, Ordering};
    let fixture = Fixture::start(|_| {}).await;
    let mut config = support::stack::fast_state(&fixture.nats.client_url());
    config.nats = fixture.nats_auth.clone();
    config.business_timeout_ms = 15_000;
    config.business_retries = 0;
    let _state = tether_state::start(config, CancellationToken::new()).await?;
    let slow = tether_state::uplink::ACK_WAIT + Duration::from_secs(2);
    let asked = Arc::new(AtomicUsize::new(0));
    let mut requests = fixture
        .nats_client
        .subscribe(tether_nats::subjects::business_up(APP))
        .await?;
    fixture.nats_client.flush().await?;
    let (client, count) = (fixture.nats_client.clone(), asked.clone());
    let business = tokio::spawn(async move {
        while let Some(request) = requests.next().await {
            count.fetch_add(1, Ordering::SeqCst);
            let client = client.clone();
            tokio::spawn(async move {
                tokio::time::sleep(slow).await;
                if let Some(reply) = request.reply {
                    let _ = client
                        .publish(reply, UplinkReply::stored(Some("s1".into())).to_json())
                        .await;
                }
            });
        }
    });
    let mut config = tether_client::ClientConfig::new(
        vec![tether_client::Endpoint::tcp(fixture.tcp)],
        APP,
        "patient",
        fixture.token("patient"),
    );
    config.ack_timeout = Duration::from_secs(30);
    let (client, mut events) = tether_client::Client::connect(config).await?;
    let _ = tokio::time::timeout(WAIT, events.recv()).await?;
    let ack = client.send(Bytes::from_static(b"take your time")).await?;
    assert_eq!(ack.server_msg_id, "s1");
    // Past another ack wait: a redelivery would have asked again by now.
    tokio::time::sleep(tether_state::uplink::ACK_WAIT + Duration::from_secs(1)).await;
    assert_eq!(
        asked.load(Ordering::SeqCst),
        1,
        "the business was asked again"
    );
    business.abort();
    Ok(())
}

/// A login whose `conn.up` JetStream refused to store is not confirmed: the device gets
/// ERROR `unavailable` and CLOSE instead of LOGIN_ACK (it retries); once the stream takes
/// writes again the same login succeeds.
#[tokio::test]
async fn a_login_whose_conn_up_was_not_stored_is_refused_unavailable() -> TestResult {
    use async_nats::jetstream::stream::DiscardPolicy;
    use support::{RawClient, Transport};
    let fixture = Fixture::start(|c| c.await_registration = true).await;
    let _state = start_state(&fixture, CancellationToken::new()).await;
    let (_first, _) = fixture.login(Transport::Tcp, "early").await;

    // The events stream is full and refuses new writes.
    let js = async_nats::jetstream::new(fixture.nats_client.clone());
    let mut events = js.get_stream(tether_nats::layout::EVENTS_STREAM).await?;
    let info = events.info().await?.clone();
    let saved = info.config.clone();
    let mut full = saved.clone();
    full.discard = DiscardPolicy::New;
    full.max_messages = i64::try_from(info.state.messages)?.max(1);
    js.update_stream(full).await?;

    let mut refused = RawClient::connect(Transport::Tcp, fixture.tcp).await;
    refused.send(&fixture.login_frame("late")).await;
    refused.expect_close(ErrorCode::Unavailable).await;

    js.update_stream(saved).await?;
    let (_late, ack) = fixture.login(Transport::Tcp, "late").await;
    assert_eq!(ack.last_acked_seq, 0);
    Ok(())
}

/// Events of an older connection never overwrite a newer one's state: a `conn.down` of
/// connection 1 stored after the device's `conn.up` on connection 2 (the old gateway
/// noticed the disconnect late) leaves the new route and the device online.
#[tokio::test]
async fn a_late_conn_down_of_an_older_connection_leaves_the_newer_route() -> TestResult {
    use futures::StreamExt;
    use tether_schemas::bus::{ConnEvent, Event, PresenceEvent};
    let fixture = Fixture::start(|_| {}).await;
    let _state = start_state(&fixture, CancellationToken::new()).await;
    let js = async_nats::jetstream::new(fixture.nats_client.clone());
    let heartbeats = js
        .get_key_value(tether_nats::layout::GATEWAYS_BUCKET)
        .await?;
    for gw in ["gw-old", "gw-new"] {
        heartbeats.put(gw, "{}".into()).await?;
    }
    let mut presence = fixture
        .nats_client
        .subscribe(tether_nats::subjects::presence(APP))
        .await?;
    fixture.nats_client.flush().await?;
    let did = "mover";
    let event = |gw: &str, conn: u64| ConnEvent {
        app: APP.into(),
        uid: "u-mover".into(),
        did: did.into(),
        gw: gw.into(),
        region: String::new(),
        conn,
        remote: "127.0.0.1:1".into(),
        resume_seq: Some(0),
        reason: None,
        sessions: Vec::new(),
        at_ms: 1,
    };
    for stored in [
        Event::ConnUp(event("gw-old", 1)),
        Event::ConnUp(event("gw-new", 2)),
        Event::ConnDown(event("gw-old", 1)),
    ] {
        js.publish(
            tether_nats::subjects::conn_events(APP, did),
            stored.to_json()?,
        )
        .await?
        .await?;
    }
    let online = tokio::time::timeout(WAIT, presence.next())
        .await?
        .ok_or("presence ended")?;
    assert!(PresenceEvent::from_json(&online.payload)?.online);

    // Past the reconnect window: still online, still routed to the new connection.
    let routes = js.get_key_value(tether_nats::layout::ROUTES_BUCKET).await?;
    eventually("the three events are applied", async || {
        cursor_event_seq(&fixture, did).await >= 3
    })
    .await;
    let quiet = tokio::time::timeout(Duration::from_secs(3), presence.next()).await;
    assert!(quiet.is_err(), "the device went offline: {quiet:?}");
    let route = routes
        .get(tether_nats::keys::route(APP, did))
        .await?
        .ok_or("the newer route was removed")?;
    let route: serde_json::Value = serde_json::from_slice(&route)?;
    assert_eq!(route["gw"], "gw-new");
    assert_eq!(route["conn"], 2);
    Ok(())
}

/// The stream sequence of the last event state applied for `did` (its cursor).
async fn cursor_event_seq(fixture: &Fixture, did: &str) -> u64 {
    fixture.cursor_field(did, "event_seq").await
}

/// A partition's previous owner, played by hand: both gateways keep beating (so liveness
/// never recycles the device), connection events of `did` are published directly, and
/// state's own durable events consumer of the device's partition (same settings, 10 s ack
/// wait) fetches them without acknowledging.
struct PreviousOwner {
    js: async_nats::jetstream::Context,
    did: &'static str,
    consumer: async_nats::jetstream::consumer::PullConsumer,
    beats: tokio::task::JoinHandle<()>,
}

impl PreviousOwner {
    async fn start(
        fixture: &Fixture,
        did: &'static str,
    ) -> Result<Self, Box<dyn std::error::Error + Send + Sync>> {
        use tether_nats::layout::PartitionConsumer;
        let js = async_nats::jetstream::new(fixture.nats_client.clone());
        tether_nats::ensure_layout(&js, &tether_nats::BusLayout::default()).await?;
        let beating = js
            .get_key_value(tether_nats::layout::GATEWAYS_BUCKET)
            .await?;
        let beats = tokio::spawn(async move {
            loop {
                for gw in ["gw-old", "gw-new"] {
                    let _ = beating.put(gw, "{}".into()).await;
                }
                tokio::time::sleep(Duration::from_secs(2)).await;
            }
        });
        let kind = PartitionConsumer::Events;
        let consumer = js
            .get_stream(kind.stream())
            .await?
            .create_consumer(kind.config(
                tether_nats::subjects::partition(did),
                Duration::from_secs(10),
            ))
            .await?;
        Ok(Self {
            js,
            did,
            consumer,
            beats,
        })
    }

    /// Publishes a `conn.up` of the device on `gw` with connection id `conn`; returns its
    /// stream sequence.
    async fn conn_up(
        &self,
        gw: &str,
        conn: u64,
    ) -> Result<u64, Box<dyn std::error::Error + Send + Sync>> {
        use tether_schemas::bus::{ConnEvent, Event};
        let event = Event::ConnUp(ConnEvent {
            app: APP.into(),
            uid: format!("u-{}", self.did),
            did: self.did.into(),
            gw: gw.into(),
            region: String::new(),
            conn,
            remote: "127.0.0.1:1".into(),
            resume_seq: Some(0),
            reason: None,
            sessions: Vec::new(),
            at_ms: 1,
        });
        let subject = tether_nats::subjects::conn_events(APP, self.did);
        Ok(self
            .js
            .publish(subject, event.to_json()?)
            .await?
            .await?
            .sequence)
    }

    /// Fetches the next event and drops it unacknowledged.
    async fn fetch_and_forget(&self) -> TestResult {
        use futures::StreamExt;
        let mut fetched = self.consumer.fetch().max_messages(1).messages().await?;
        let message = tokio::time::timeout(WAIT, fetched.next())
            .await?
            .ok_or("the event was not fetched")??;
        drop(message);
        Ok(())
    }

    /// Stops the heartbeats and asserts that the device's route is `gw-new`, connection 2.
    async fn assert_route_is_the_newer(&self) -> TestResult {
        self.beats.abort();
        let routes = self
            .js
            .get_key_value(tether_nats::layout::ROUTES_BUCKET)
            .await?;
        let route = routes
            .get(tether_nats::keys::route(APP, self.did))
            .await?
            .ok_or("the route was removed")?;
        let route: serde_json::Value = serde_json::from_slice(&route)?;
        assert_eq!(route["gw"], "gw-new", "a stale event overwrote the route");
        assert_eq!(route["conn"], 2);
        Ok(())
    }
}

/// Issue 13 item 3, the redelivery fence: an event that the partition's previous owner
/// fetched and never acknowledged comes back after the ack wait, when the new owner has
/// already applied a newer event of the same device. It is stale (its stream sequence is
/// at or below the device's applied `event_seq`) and must not overwrite the newer route.
/// (The previous owner got it twice, so the new owner does not reclaim it at once: see
/// `an_unacknowledged_event_of_a_dead_owner_is_reclaimed_in_order`.)
#[tokio::test]
async fn an_event_redelivered_after_a_newer_one_was_applied_is_ignored() -> TestResult {
    use futures::StreamExt;
    let fixture = Fixture::start(|_| {}).await;
    let did = "prefetched";
    let owner = PreviousOwner::start(&fixture, did).await?;
    owner.conn_up("gw-old", 1).await?;
    // Fetched twice (given back once), then never acknowledged.
    let mut fetched = owner.consumer.fetch().max_messages(1).messages().await?;
    let older = tokio::time::timeout(WAIT, fetched.next())
        .await?
        .ok_or("the older event was not fetched")??;
    older
        .ack_with(async_nats::jetstream::AckKind::Nak(None))
        .await?;
    // (The nak is not confirmed: fetch until it took effect.)
    let give_up = tokio::time::Instant::now() + WAIT;
    let older = loop {
        let mut fetched = owner.consumer.fetch().max_messages(1).messages().await?;
        if let Some(message) = fetched.next().await {
            break message?;
        }
        assert!(
            tokio::time::Instant::now() < give_up,
            "the older event was not fetched again"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    };
    drop(older); // never acknowledged
    let newer = owner.conn_up("gw-new", 2).await?;

    // The new owner applies the newer event; the older one comes back after the ack wait
    // and is acknowledged as stale.
    let _state = start_state(&fixture, CancellationToken::new()).await;
    eventually("the newer event is applied", async || {
        cursor_event_seq(&fixture, did).await >= newer
    })
    .await;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(40);
    let mut consumer = owner.consumer.clone();
    loop {
        let info = consumer.info().await?;
        // Two events, four deliveries: the older one came back and was acknowledged.
        if info.delivered.consumer_sequence >= 4 && info.num_ack_pending == 0 {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the older event was not redelivered and acknowledged: {info:?}"
        );
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    owner.assert_route_is_the_newer().await?;
    assert_eq!(cursor_event_seq(&fixture, did).await, newer);
    Ok(())
}

/// A takeover reclaims what the dead previous owner fetched and never acknowledged: the
/// events consumer is reset to its ack floor, so the older event comes again at once and
/// before the newer one (none is stale), instead of after the 10 s ack wait and after it.
#[tokio::test]
async fn an_unacknowledged_event_of_a_dead_owner_is_reclaimed_in_order() -> TestResult {
    let fixture = Fixture::start(|_| {}).await;
    let did = "reclaimed";
    // The previous owner fetches the older event once and dies without acknowledging it.
    let owner = PreviousOwner::start(&fixture, did).await?;
    owner.conn_up("gw-old", 1).await?;
    owner.fetch_and_forget().await?;
    let newer = owner.conn_up("gw-new", 2).await?;

    let state = start_state(&fixture, CancellationToken::new()).await;
    eventually("the newer event is applied", async || {
        cursor_event_seq(&fixture, did).await >= newer
    })
    .await;
    let mut consumer = owner.consumer.clone();
    eventually("both events acknowledged", async || {
        consumer
            .info()
            .await
            .is_ok_and(|i| i.num_ack_pending == 0 && i.ack_floor.stream_sequence >= newer)
    })
    .await;
    let metrics = support::http_get(state.admin_addr, "/metrics").await;
    assert!(
        metrics.contains("tether_state_consumer_resets_total 1"),
        "the events consumer was reset once: {metrics}"
    );
    assert!(
        metrics.contains("tether_state_stale_events_total 0"),
        "the older event came after the newer one: {metrics}"
    );
    owner.assert_route_is_the_newer().await?;
    Ok(())
}
