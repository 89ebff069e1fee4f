//! Sessions end to end: the binding API, large-group broadcast across gateways,
//! recoverable rooms, and index rebuilds after restarts. Real nats-server, gateways, state,
//! device SDK / raw clients and business SDK.

mod support;

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use bytes::Bytes;
use futures::StreamExt;
use support::stack::{device, fast_state};
use support::{APP, Fixture, RawClient, TestResult, Transport, WAIT, http_get};
use tether_auth::{Claims, Right, Rights};
use tether_business::{Business, MembershipChange, Push, SessionRequest};
use tether_client::{Client, ClientConfig, Endpoint, Event};
use tether_nats::subjects;
use tether_schemas::{ErrorCode, Frame, pb};
use tokio_util::sync::CancellationToken;

/// Local members of `session` on the gateway whose admin address is `admin`.
async fn local_members(admin: SocketAddr, session: &str) -> u64 {
    let response = http_get(admin, &format!("/v1/sessions/{APP}/{session}")).await;
    let body = response.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str::<serde_json::Value>(body)
        .ok()
        .and_then(|v| v["members"].as_u64())
        .unwrap_or(0)
}

/// Waits until `session` has `want` local members on the gateway at `admin`.
async fn wait_members(admin: SocketAddr, session: &str, want: u64) {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let have = local_members(admin, session).await;
        if have == want {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{session} on {admin}: {have} local members, want {want}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// A gateway metric's value from `/metrics`.
async fn metric(admin: SocketAddr, name: &str) -> u64 {
    let text = http_get(admin, "/metrics").await;
    text.lines()
        .find_map(|line| line.strip_prefix(name)?.trim().parse::<f64>().ok())
        .map_or(0, |v| v as u64)
}

/// The next DOWN of a raw client: (session, room_seq, body).
async fn next_down(client: &mut RawClient) -> (String, u64, Vec<u8>) {
    match client.next_frame().await {
        Some(Frame::Down { header, body, .. }) => (header.session, header.room_seq, body.to_vec()),
        other => panic!("expected DOWN, got {other:?}"),
    }
}

/// Connects and logs in `dids` on `addr`, 200 at a time.
async fn raw_devices(fixture: &Fixture, addr: SocketAddr, dids: &[String]) -> Vec<RawClient> {
    futures::stream::iter(dids.iter().cloned())
        .map(|did| async move {
            let mut client = RawClient::connect(Transport::Tcp, addr).await;
            client.send(&fixture.login_frame(&did)).await;
            match client.next_frame().await {
                Some(Frame::LoginAck(_)) => client,
                other => panic!("{did}: expected LOGIN_ACK, got {other:?}"),
            }
        })
        .buffered(200)
        .collect()
        .await
}

/// Every client's next DOWN must carry `body` in `session`.
async fn all_receive(clients: &mut [RawClient], session: &str, body: &[u8]) {
    let received = futures::stream::iter(clients.iter_mut())
        .map(next_down)
        .buffer_unordered(1000)
        .collect::<Vec<_>>()
        .await;
    for (got_session, _, got_body) in received {
        assert_eq!(got_session, session);
        assert_eq!(got_body, body, "a device got another message first");
    }
}

/// Counts the NATS messages on `subject` from now on.
async fn count_messages(client: &async_nats::Client, subject: &str) -> Arc<AtomicUsize> {
    let count = Arc::new(AtomicUsize::new(0));
    let mut subscription = client
        .subscribe(subject.to_string())
        .await
        .expect("subscribe");
    tether_nats::sync_with_server(client)
        .await
        .expect("subscription confirmed");
    let counter = count.clone();
    tokio::spawn(async move {
        while subscription.next().await.is_some() {
            counter.fetch_add(1, Ordering::SeqCst);
        }
    });
    count
}

#[tokio::test]
async fn one_broadcast_reaches_5000_devices_on_two_gateways_exactly_once() -> TestResult {
    let fixture = Fixture::start(|_| {}).await;
    let gw2 = tether_gateway::start(fixture.gateway_config("gw-two"), fixture.shutdown.clone())
        .await
        .expect("second gateway");
    let (gw2_tcp, gw2_admin) = (gw2.tcp_addr.expect("tcp"), gw2.admin_addr);
    let _state = support::stack::start_state(&fixture, CancellationToken::new()).await;
    let business = Business::new(fixture.nats_client.clone(), APP);

    let dids: Vec<String> = (0..5000).map(|i| format!("m{i}")).collect();
    let (first_half, second_half) = dids.split_at(2500);
    let mut clients = raw_devices(&fixture, fixture.tcp, first_half).await;
    clients.extend(raw_devices(&fixture, gw2_tcp, second_half).await);
    let mut late = raw_devices(&fixture, fixture.tcp, &["late".to_string()]).await;

    let reply = business
        .sessions(SessionRequest::bind(dids.clone(), ["big"]))
        .await?;
    assert_eq!(reply.devices, 5000);
    wait_members(fixture.admin, "big", 2500).await;
    wait_members(gw2_admin, "big", 2500).await;

    let broadcasts = count_messages(&fixture.nats_client, &subjects::broadcast("demo")).await;
    let directs = count_messages(&fixture.nats_client, &subjects::gateway_down_all()).await;
    let reply = business.push(Push::to_session("big", "m1").qos0()).await?;
    assert_eq!(reply.mode.as_deref(), Some("broadcast"));
    assert_eq!(reply.members, Some(5000));
    all_receive(&mut clients, "big", b"m1").await;

    // A device bound later receives the later messages, and only those.
    business
        .sessions(SessionRequest::bind(["late"], ["big"]))
        .await?;
    wait_members(fixture.admin, "big", 2501).await;
    business.push(Push::to_session("big", "m2").qos0()).await?;
    all_receive(&mut clients, "big", b"m2").await;
    all_receive(&mut late, "big", b"m2").await;

    // Unbinding stops delivery: m0's next frame is the direct marker, not m3.
    business
        .sessions(SessionRequest::unbind(["m0"], ["big"]))
        .await?;
    wait_members(fixture.admin, "big", 2500).await;
    business.push(Push::to_session("big", "m3").qos0()).await?;
    all_receive(&mut clients[1..], "big", b"m3").await;
    let marker = Frame::Down {
        header: pb::Down::default(),
        qos1: false,
        body: bytes::Bytes::from_static(b"marker"),
    };
    fixture.push(&["m0"], marker.encode()).await;
    let (_, _, body) = next_down(&mut clients[0]).await;
    assert_eq!(body, b"marker", "an unbound device still got the broadcast");

    // One NATS message per gateway per broadcast: three publishes on the broadcast
    // subject, none per member, and each gateway received each broadcast once. (The
    // counting subscriber may still be catching up with the marker: wait for it.)
    let deadline = tokio::time::Instant::now() + WAIT;
    while (directs.load(Ordering::SeqCst) < 1 || broadcasts.load(Ordering::SeqCst) < 3)
        && tokio::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert_eq!(broadcasts.load(Ordering::SeqCst), 3);
    assert_eq!(
        directs.load(Ordering::SeqCst),
        1,
        "only the test's own marker"
    );
    assert_eq!(
        metric(fixture.admin, "tether_gateway_session_broadcasts_total").await,
        3
    );
    assert_eq!(
        metric(gw2_admin, "tether_gateway_session_broadcasts_total").await,
        3
    );
    assert_eq!(
        metric(gw2_admin, "tether_gateway_session_deliveries_total").await,
        3 * 2500
    );
    Ok(())
}

#[tokio::test]
async fn small_sessions_go_per_member_and_membership_events_are_published() -> TestResult {
    let fixture = Fixture::start(|_| {}).await;
    let mut config = fast_state(&fixture.nats.client_url());
    config.membership_events = true;
    let _state = tether_state::start(config, CancellationToken::new()).await?;
    let business = Business::new(fixture.nats_client.clone(), APP);
    let mut memberships = business.memberships().await?;
    tether_nats::sync_with_server(&fixture.nats_client).await?;

    let (_a, mut a_events) = device(&fixture, fixture.tcp, "a1").await;
    let (_b, mut b_events) = device(&fixture, fixture.tcp, "b1").await;
    business
        .sessions(SessionRequest::bind(["a1", "b1"], ["chat-1"]))
        .await?;
    let mut joined = Vec::new();
    while joined.len() < 2 {
        let event = tokio::time::timeout(WAIT, memberships.next())
            .await?
            .ok_or("membership stream ended")?;
        assert_eq!(event.event, MembershipChange::Joined);
        assert_eq!(event.session, "chat-1");
        joined.push(event.did);
    }
    joined.sort();
    assert_eq!(joined, ["a1", "b1"]);

    // Two members, under the threshold: QoS1 per member, stored in each inbox. The bind
    // reply means the change is applied, so the first push after it has both.
    let reply = business.push(Push::to_session("chat-1", "hello")).await?;
    assert_eq!(reply.mode.as_deref(), Some("direct"));
    assert_eq!(reply.accepted.len(), 2);
    for events in [&mut a_events, &mut b_events] {
        let (seq, body) = support::stack::next_message(events).await;
        assert!(seq > 0, "a QoS1 message with a per-device seq");
        assert_eq!(body, b"hello");
    }

    business
        .sessions(SessionRequest::replace(["a1"], Vec::<String>::new()))
        .await?;
    let event = tokio::time::timeout(WAIT, memberships.next())
        .await?
        .ok_or("membership stream ended")?;
    assert_eq!(
        (event.event, event.did.as_str()),
        (MembershipChange::Left, "a1")
    );

    // Bad requests get a clear error.
    let refused = business
        .sessions(SessionRequest {
            op: Some(tether_business::SessionOp::Bind),
            dids: vec!["bad.did".into()],
            sessions: vec!["x".into()],
            ..Default::default()
        })
        .await;
    assert!(matches!(
        refused,
        Err(tether_business::BusinessError::Refused(
            ErrorCode::BadRequest,
            _
        ))
    ));
    let raw = fixture
        .nats_client
        .request(tether_nats::subjects::session(APP), "{not json".into())
        .await?;
    let text = String::from_utf8_lossy(&raw.payload).to_string();
    assert!(text.contains("bad_request"), "{text}");
    Ok(())
}

#[tokio::test]
async fn a_push_sent_right_after_a_bind_reply_includes_the_new_members() -> TestResult {
    let fixture = Fixture::start(|_| {}).await;
    let gw2 = tether_gateway::start(fixture.gateway_config("gw-two"), fixture.shutdown.clone())
        .await
        .expect("second gateway");
    let mut config = fast_state(&fixture.nats.client_url());
    // Two members go per member, three as one broadcast to the gateways.
    config.broadcast_threshold = 2;
    let _state = tether_state::start(config, CancellationToken::new()).await?;
    let business = Business::new(fixture.nats_client.clone(), APP);
    let mut clients = raw_devices(&fixture, fixture.tcp, &["p1".into(), "p2".into()]).await;
    clients.extend(raw_devices(&fixture, gw2.tcp_addr.expect("tcp"), &["p3".into()]).await);

    // No waiting between the reply and the push: the reply is the guarantee.
    for round in 0..10 {
        let direct = format!("d{round}");
        let reply = business
            .sessions(SessionRequest::bind(["p1", "p2"], [direct.as_str()]))
            .await?;
        assert_eq!(reply.devices, 2);
        let body = format!("direct {round}");
        let pushed = business
            .push(Push::to_session(direct.as_str(), body.clone()).qos0())
            .await?;
        assert_eq!(pushed.mode.as_deref(), Some("direct"));
        assert_eq!(pushed.accepted.len(), 2, "round {round}: {pushed:?}");
        all_receive(&mut clients[..2], &direct, body.as_bytes()).await;

        let wide = format!("b{round}");
        business
            .sessions(SessionRequest::bind(["p1", "p2", "p3"], [wide.as_str()]))
            .await?;
        let body = format!("broadcast {round}");
        let pushed = business
            .push(Push::to_session(wide.as_str(), body.clone()).qos0())
            .await?;
        assert_eq!(pushed.mode.as_deref(), Some("broadcast"));
        assert_eq!(pushed.members, Some(3), "round {round}");
        // Each gateway has its members' new set: every device gets it, none misses it.
        all_receive(&mut clients, &wide, body.as_bytes()).await;

        // An unbind reply means the member is gone for the next push.
        business
            .sessions(SessionRequest::unbind(["p3"], [wide.as_str()]))
            .await?;
        let pushed = business
            .push(Push::to_session(wide.as_str(), "after").qos0())
            .await?;
        assert_eq!(pushed.members, Some(2), "round {round}");
        all_receive(&mut clients[..2], &wide, b"after").await;
    }
    Ok(())
}

/// A device SDK client whose token joins `sessions` and may pass room cursors.
async fn room_device(
    fixture: &Fixture,
    did: &str,
    sessions: &[&str],
    cursors: BTreeMap<String, u64>,
) -> (Client, tokio::sync::mpsc::Receiver<Event>) {
    let mut claims = Claims::new(
        APP,
        format!("u-{did}"),
        did,
        tether_auth::unix_now(),
        Duration::from_secs(3600),
    );
    claims.rights = Rights::of(&[Right::Up, Right::Rooms]);
    claims.sess = sessions.iter().map(|s| s.to_string()).collect();
    let token = fixture.signer.sign(&claims).expect("token");
    let mut config = ClientConfig::new(vec![Endpoint::tcp(fixture.tcp)], APP, did, token);
    config.room_cursors = cursors;
    let (client, mut events) = Client::connect(config).await.expect("device connects");
    match tokio::time::timeout(WAIT, events.recv()).await {
        Ok(Some(Event::Connected { .. })) => {}
        other => panic!("expected Connected, got {other:?}"),
    }
    (client, events)
}

/// The next room message: (room_seq, body); other events are skipped, a non-closing
/// ERROR is returned as `Err(code)`.
async fn next_room_message(
    events: &mut tokio::sync::mpsc::Receiver<Event>,
) -> Result<(u64, Vec<u8>), ErrorCode> {
    loop {
        match tokio::time::timeout(WAIT, events.recv()).await {
            Ok(Some(Event::Message { room_seq, body, .. })) => {
                return Ok((room_seq, body.to_vec()));
            }
            Ok(Some(Event::Error { code, .. })) => return Err(code),
            Ok(Some(_)) => continue,
            other => panic!("expected a room message, got {other:?}"),
        }
    }
}

#[tokio::test]
async fn recoverable_room_replays_exactly_what_a_device_missed() -> TestResult {
    let fixture = Fixture::start(|_| {}).await;
    let _state = support::stack::start_state(&fixture, CancellationToken::new()).await;
    let business = Business::new(fixture.nats_client.clone(), APP);
    business
        .sessions(SessionRequest::configure("live", true))
        .await?;

    let (viewer, mut events) = room_device(&fixture, "viewer", &["live"], BTreeMap::new()).await;
    wait_members(fixture.admin, "live", 1).await;
    for i in 1..=5u64 {
        let reply = business
            .push(Push::to_session("live", format!("r{i}")))
            .await?;
        assert_eq!(reply.mode.as_deref(), Some("room"));
        assert_eq!(reply.room_seq, Some(i));
    }
    for i in 1..=5u64 {
        assert_eq!(
            next_room_message(&mut events).await,
            Ok((i, format!("r{i}").into_bytes()))
        );
    }
    let cursors = viewer.room_cursors();
    assert_eq!(cursors.get("live"), Some(&5));
    viewer.close().await;
    wait_members(fixture.admin, "live", 0).await;

    for i in 6..=105u64 {
        business
            .push(Push::to_session("live", format!("r{i}")))
            .await?;
    }
    let (viewer, mut events) = room_device(&fixture, "viewer", &["live"], cursors).await;
    for i in 6..=105u64 {
        assert_eq!(
            next_room_message(&mut events).await,
            Ok((i, format!("r{i}").into_bytes())),
            "replay in order, nothing skipped or repeated"
        );
    }
    // Live again: the next one is 106, nothing replayed twice.
    business.push(Push::to_session("live", "r106")).await?;
    assert_eq!(
        next_room_message(&mut events).await,
        Ok((106, b"r106".to_vec()))
    );
    assert_eq!(viewer.room_cursors().get("live"), Some(&106));
    Ok(())
}

#[tokio::test]
async fn room_recovery_past_retention_reports_a_gap_then_replays_what_is_left() -> TestResult {
    let fixture = Fixture::start(|_| {}).await;
    let mut config = fast_state(&fixture.nats.client_url());
    config.rooms_max_per_room = 10;
    let _state = tether_state::start(config, CancellationToken::new()).await?;
    let business = Business::new(fixture.nats_client.clone(), APP);
    business
        .sessions(SessionRequest::configure("stage", true))
        .await?;
    for i in 1..=30u64 {
        business
            .push(Push::to_session("stage", format!("s{i}")))
            .await?;
    }
    let cursors = BTreeMap::from([("stage".to_string(), 3u64)]);
    let (_viewer, mut events) = room_device(&fixture, "late-viewer", &["stage"], cursors).await;
    assert_eq!(
        next_room_message(&mut events).await,
        Err(ErrorCode::RecoveryGap)
    );
    for i in 21..=30u64 {
        assert_eq!(
            next_room_message(&mut events).await,
            Ok((i, format!("s{i}").into_bytes()))
        );
    }
    Ok(())
}

#[tokio::test]
async fn indexes_are_rebuilt_after_gateway_and_state_restarts() -> TestResult {
    let mut fixture = Fixture::start(|_| {}).await;
    let mut state_config = fast_state(&fixture.nats.client_url());
    state_config.broadcast_threshold = 5;
    let first_state = CancellationToken::new();
    let state = tether_state::start(state_config.clone(), first_state.clone()).await?;
    let business = Business::new(fixture.nats_client.clone(), APP);

    let dids: Vec<String> = (0..20).map(|i| format!("g{i}")).collect();
    let mut devices = Vec::new();
    for did in &dids {
        devices.push(device(&fixture, fixture.tcp, did).await);
    }
    business
        .sessions(SessionRequest::bind(dids.clone(), ["team"]))
        .await?;
    wait_members(fixture.admin, "team", 20).await;
    let push_and_check = async |devices: &mut Vec<(Client, tokio::sync::mpsc::Receiver<Event>)>,
                                body: &str|
           -> TestResult {
        let reply = business
            .push(Push::to_session("team", body.to_string()).qos0())
            .await?;
        assert_eq!(reply.mode.as_deref(), Some("broadcast"));
        for (_, events) in devices.iter_mut() {
            let (_, got) = support::stack::next_message(events).await;
            assert_eq!(got, body.as_bytes());
        }
        Ok(())
    };
    push_and_check(&mut devices, "before").await?;

    // Gateway restart on the same port: the devices reconnect, state re-sends their
    // sessions, the new gateway's index is whole again.
    let tcp = fixture.tcp;
    fixture.stop_gateway().await;
    let mut config = fixture.gateway_config(support::GW);
    config.tcp_listen = Some(tcp);
    let shutdown = CancellationToken::new();
    let gateway = tether_gateway::start(config, shutdown.clone()).await?;
    wait_members(gateway.admin_addr, "team", 20).await;
    push_and_check(&mut devices, "after gateway restart").await?;

    // State restart: a new instance takes every partition and rebuilds its index from
    // the bucket; broadcasts and new binds still work.
    first_state.cancel();
    state.wait().await;
    let _state = tether_state::start(state_config, CancellationToken::new()).await?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        // The new instance's index is loaded once it sees the session as large.
        let reply = business
            .push(Push::to_session("team", "probe").qos0())
            .await?;
        if reply.mode.as_deref() == Some("broadcast") {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "index not rebuilt");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    for (_, events) in devices.iter_mut() {
        let (_, got) = support::stack::next_message(events).await;
        assert_eq!(got, b"probe");
    }
    let newcomer = device(&fixture, tcp, "g-new").await;
    business
        .sessions(SessionRequest::bind(["g-new"], ["team"]))
        .await?;
    wait_members(gateway.admin_addr, "team", 21).await;
    devices.push(newcomer);
    push_and_check(&mut devices, "after state restart").await?;
    shutdown.cancel();
    Ok(())
}

#[tokio::test]
async fn a_login_on_another_gateway_replaces_the_older_connection() -> TestResult {
    // PROTOCOL 6.1: a new LOGIN of the device elsewhere closes the old connection with
    // `replaced`, also when "elsewhere" is another gateway (state tells the old one).
    let fixture = Fixture::start(|c| c.await_registration = true).await;
    let mut config = fixture.gateway_config("gw-two");
    config.await_registration = true;
    let gw2 = tether_gateway::start(config, fixture.shutdown.clone())
        .await
        .expect("second gateway");
    let gw2_tcp = gw2.tcp_addr.expect("tcp");
    let _state = support::stack::start_state(&fixture, CancellationToken::new()).await;

    let (mut first, _) = fixture.login_as(APP, "roamer").await;
    let mut second = RawClient::connect(Transport::Tcp, gw2_tcp).await;
    second.send(&fixture.login_frame_for(APP, "roamer")).await;
    match second.next_frame().await {
        Some(Frame::LoginAck(_)) => {}
        other => panic!("the new connection logs in, got {other:?}"),
    }
    first.expect_close(ErrorCode::Replaced).await;
    // The new connection keeps working: it answers a PING.
    second
        .send(&Frame::Ping(Bytes::from_static(b"still-here")).encode())
        .await;
    assert_eq!(
        second.next_frame().await,
        Some(Frame::Pong(Bytes::from_static(b"still-here")))
    );
    Ok(())
}
