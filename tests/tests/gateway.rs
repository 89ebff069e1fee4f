//! The gateway end to end: real nats-server, gateway started in-process, raw clients over
//! TCP and WebSocket.

mod support;

use std::net::SocketAddr;
use std::time::Duration;

use bytes::Bytes;
use support::{APP, Fixture, GW, RawClient, TestResult, Transport, http_get, read_stream};
use tether_nats::layout::{EVENTS_STREAM, UPLINK_STREAM};
use tether_nats::subjects;
use tether_schemas::{ErrorCode, Frame, RawFrame, limits, pb};

fn up(id: u64, body: &'static [u8]) -> Bytes {
    Frame::Up {
        header: pb::Up {
            client_msg_id: id,
            session: String::new(),
        },
        body: Bytes::from_static(body),
    }
    .encode()
}

fn down(seq: u64, qos1: bool, body: &'static [u8]) -> Bytes {
    Frame::Down {
        header: pb::Down {
            seq,
            ..Default::default()
        },
        qos1,
        body: Bytes::from_static(body),
    }
    .encode()
}

fn header<'a>(message: &'a async_nats::jetstream::Message, name: &str) -> &'a str {
    message
        .headers
        .as_ref()
        .and_then(|h| h.get(name))
        .map(|v| v.as_str())
        .unwrap_or("")
}

#[tokio::test]
async fn tcp_and_ws_clients_uplink_downlink_and_events() -> TestResult {
    let fixture = Fixture::start(|_| {}).await;
    let mut connected = Vec::new();
    for (transport, did) in [(Transport::Tcp, "dev-tcp"), (Transport::Ws, "dev-ws")] {
        let (mut client, ack) = fixture.login(transport, did).await;
        assert_eq!(ack.gateway, GW);
        assert!(ack.conn_id > 0);

        // UP goes to the uplink stream unchanged, deduplicated by app:did:client_msg_id.
        let frame = up(7, b"hello from the device");
        client.send(&frame).await;
        client.send(&frame).await;
        let stored = read_stream(
            &fixture.nats_client,
            UPLINK_STREAM,
            &subjects::uplink(APP, did),
            1,
        )
        .await;
        assert_eq!(stored[0].payload, frame, "frame stored byte for byte");
        let raw = RawFrame::from_bytes(stored[0].payload.clone(), limits::DEFAULT_MAX_FRAME_LEN)?;
        assert_eq!(&raw.body()[..], b"hello from the device");
        assert_eq!(
            header(&stored[0], tether_nats::headers::MSG_ID.as_ref()),
            format!("{APP}:{did}:7")
        );
        assert_eq!(header(&stored[0], "Tether-Gw"), GW);
        assert_eq!(header(&stored[0], "Tether-Conn"), ack.conn_id.to_string());

        // A downlink for the did arrives as the same DOWN frame.
        let frame = down(1, true, b"hello device");
        fixture.push(&[did], frame.clone()).await;
        let received = client.next_raw().await.expect("down frame");
        assert_eq!(received.bytes, frame);

        // PING answered by PONG with the same body.
        client
            .send(&Frame::Ping(Bytes::from_static(b"p")).encode())
            .await;
        assert_eq!(
            client.next_frame().await,
            Some(Frame::Pong(Bytes::from_static(b"p")))
        );
        connected.push(client);
    }
    // The duplicate UPs were stored once per device under their id. No state runs here,
    // so nobody answers the gateway's receipt question about the duplicate: it stores the
    // UP again under a retry id, to be processed again (PROTOCOL 6.3, 10.2).
    for did in ["dev-tcp", "dev-ws"] {
        let stored = read_stream(
            &fixture.nats_client,
            UPLINK_STREAM,
            &subjects::uplink(APP, did),
            2,
        )
        .await;
        let ids: Vec<&str> = stored
            .iter()
            .map(|m| header(m, tether_nats::headers::MSG_ID.as_ref()))
            .collect();
        assert_eq!(ids[0], format!("{APP}:{did}:7"), "{did}: {ids:?}");
        assert!(
            ids[1].starts_with(&format!("{APP}:{did}:7:r")),
            "{did}: the resend under a retry id: {ids:?}"
        );
    }
    let js = async_nats::jetstream::new(fixture.nats_client.clone());
    assert_eq!(
        js.get_stream(UPLINK_STREAM)
            .await?
            .info()
            .await?
            .state
            .messages,
        4,
        "no other copy"
    );

    // Both connects are events with app, uid, did, gateway, conn.
    let events = read_stream(
        &fixture.nats_client,
        EVENTS_STREAM,
        &subjects::conn_events_all(APP),
        2,
    )
    .await;
    let mut dids = Vec::new();
    for event in &events {
        let json: serde_json::Value = serde_json::from_slice(&event.payload)?;
        assert_eq!(json["kind"], "conn.up");
        assert_eq!(json["app"], APP);
        assert_eq!(json["gw"], GW);
        assert!(json["conn"].as_u64().is_some());
        assert_eq!(
            json["uid"],
            format!("u-{}", json["did"].as_str().unwrap_or_default())
        );
        dids.push(json["did"].as_str().unwrap_or_default().to_string());
    }
    dids.sort();
    assert_eq!(dids, ["dev-tcp", "dev-ws"]);
    Ok(())
}

#[tokio::test]
async fn bad_input_gets_its_error_and_close_while_others_are_served() -> TestResult {
    let fixture = Fixture::start(|c| c.max_frame_len = 1024).await;
    let (mut good, _) = fixture.login(Transport::Tcp, "good").await;

    // A token signed with another key.
    let stranger =
        tether_auth::TokenSigner::generate().issue(APP, "u", "bad", Duration::from_secs(60))?;
    let mut client = RawClient::connect(Transport::Tcp, fixture.tcp).await;
    client
        .send(
            &Frame::Login(pb::Login {
                token: stranger,
                did: "bad".into(),
                ..Default::default()
            })
            .encode(),
        )
        .await;
    client.expect_close(ErrorCode::BadToken).await;

    // An expired token.
    let mut claims = tether_auth::Claims::new(
        APP,
        "u",
        "old",
        tether_auth::unix_now() - 100,
        Duration::from_secs(10),
    );
    claims.exp = tether_auth::unix_now() - 50;
    let expired = fixture.signer.sign(&claims)?;
    let mut client = RawClient::connect(Transport::Ws, fixture.ws).await;
    client
        .send(
            &Frame::Login(pb::Login {
                token: expired,
                did: "old".into(),
                ..Default::default()
            })
            .encode(),
        )
        .await;
    client.expect_close(ErrorCode::TokenExpired).await;

    // A login that names another app than its token.
    let mut client = RawClient::connect(Transport::Tcp, fixture.tcp).await;
    let token = fixture.token("x");
    client
        .send(
            &Frame::Login(pb::Login {
                token,
                did: "x".into(),
                app: "other".into(),
                ..Default::default()
            })
            .encode(),
        )
        .await;
    client.expect_close(ErrorCode::WrongApp).await;

    // A frame over the limit, refused from its header alone.
    let (mut client, _) = fixture.login(Transport::Tcp, "big").await;
    let body = vec![7u8; 4096];
    let frame = Frame::Up {
        header: pb::Up {
            client_msg_id: 1,
            session: String::new(),
        },
        body: body.into(),
    }
    .encode();
    client.send(&frame[..limits::FIXED_HEADER_LEN]).await;
    client.expect_close(ErrorCode::FrameTooLarge).await;

    // Garbage bytes, over TCP and WebSocket.
    let mut client = RawClient::connect(Transport::Tcp, fixture.tcp).await;
    client.send_raw(b"GET / HTTP/1.1\r\n\r\n").await;
    client.expect_close(ErrorCode::BadFrame).await;
    let mut client = RawClient::connect(Transport::Ws, fixture.ws).await;
    client
        .send(b"\x00\x01\x02\x03\x04\x05\x06\x07\x08\x09\x0a")
        .await;
    client.expect_close(ErrorCode::BadFrame).await;

    // A frame before LOGIN.
    let mut client = RawClient::connect(Transport::Tcp, fixture.tcp).await;
    client.send(&Frame::Ping(Bytes::new()).encode()).await;
    client.expect_close(ErrorCode::LoginRequired).await;

    // The good client never noticed.
    good.send(&Frame::Ping(Bytes::from_static(b"still here")).encode())
        .await;
    assert_eq!(
        good.next_frame().await,
        Some(Frame::Pong(Bytes::from_static(b"still here")))
    );

    // Every refusal is counted by code.
    let metrics = http_get(fixture.admin, "/metrics").await;
    for (code, count) in [
        ("bad_token", 1),
        ("token_expired", 1),
        ("wrong_app", 1),
        ("frame_too_large", 1),
        ("bad_frame", 2),
        ("login_required", 1),
    ] {
        let line = format!("tether_gateway_errors_total{{code=\"{code}\"}} {count}");
        assert!(metrics.contains(&line), "{line} in:\n{metrics}");
    }
    Ok(())
}

#[tokio::test]
async fn silent_connections_time_out_with_their_reason_and_event() -> TestResult {
    let fixture = Fixture::start(|c| {
        c.login_timeout_secs = 1;
        c.idle_timeout_secs = 2;
    })
    .await;
    let mut no_login = RawClient::connect(Transport::Tcp, fixture.tcp).await;
    let (mut silent, ack) = fixture.login(Transport::Ws, "silent").await;
    no_login.expect_close(ErrorCode::LoginTimeout).await;
    silent.expect_close(ErrorCode::HeartbeatTimeout).await;
    let events = read_stream(
        &fixture.nats_client,
        EVENTS_STREAM,
        &subjects::conn_events_all(APP),
        2,
    )
    .await;
    let down: serde_json::Value = serde_json::from_slice(&events[1].payload)?;
    assert_eq!(down["kind"], "conn.down");
    assert_eq!(down["did"], "silent");
    assert_eq!(down["conn"], ack.conn_id);
    assert_eq!(down["reason"], "heartbeat_timeout");
    Ok(())
}

/// Waits until the gateway's `dormant` gauge reads `n` (or fails after a while).
async fn dormant_gauge_reaches(fixture: &Fixture, n: u64) {
    let line = format!("tether_gateway_dormant {n}");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        let metrics = http_get(fixture.admin, "/metrics").await;
        if metrics.lines().any(|l| l == line) {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "never `{line}`:\n{metrics}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Silent connections give up their task and come back exactly where they were: for a
/// downlink, for input (also a frame split across the sleep), and for the peer leaving.
#[tokio::test]
async fn silent_connections_go_dormant_and_wake_where_they_were() -> TestResult {
    let fixture = Fixture::start(|c| c.dormant_after_secs = 1).await;
    let (mut tcp, _) = fixture.login(Transport::Tcp, "sleepy-tcp").await;
    let (mut ws, _) = fixture.login(Transport::Ws, "sleepy-ws").await;
    dormant_gauge_reaches(&fixture, 2).await;

    // A downlink wakes each of them, in order with what follows.
    let (first, second) = (down(1, true, b"first"), down(2, false, b"second"));
    fixture
        .push(&["sleepy-tcp", "sleepy-ws"], first.clone())
        .await;
    fixture
        .push(&["sleepy-tcp", "sleepy-ws"], second.clone())
        .await;
    for client in [&mut tcp, &mut ws] {
        assert_eq!(
            client.next_raw().await.map(|r| r.bytes),
            Some(first.clone())
        );
        assert_eq!(
            client.next_raw().await.map(|r| r.bytes),
            Some(second.clone())
        );
    }

    // Asleep again; half a PING before the sleep, the rest after it: one PONG.
    dormant_gauge_reaches(&fixture, 2).await;
    let ping = Frame::Ping(Bytes::from_static(b"half and half")).encode();
    let (head, tail) = ping.split_at(ping.len() / 2);
    tcp.send_raw(head).await;
    dormant_gauge_reaches(&fixture, 2).await;
    tcp.send_raw(tail).await;
    assert_eq!(
        tcp.next_frame().await,
        Some(Frame::Pong(Bytes::from_static(b"half and half")))
    );
    ws.send(&Frame::Ping(Bytes::from_static(b"ws")).encode())
        .await;
    assert_eq!(
        ws.next_frame().await,
        Some(Frame::Pong(Bytes::from_static(b"ws")))
    );

    // A dormant connection whose peer leaves is closed and reported like any other.
    dormant_gauge_reaches(&fixture, 2).await;
    drop(tcp);
    dormant_gauge_reaches(&fixture, 1).await;
    let events = read_stream(
        &fixture.nats_client,
        EVENTS_STREAM,
        &subjects::conn_events_all(APP),
        3,
    )
    .await;
    let gone: serde_json::Value = serde_json::from_slice(&events[2].payload)?;
    assert_eq!(
        (gone["kind"].as_str(), gone["did"].as_str()),
        (Some("conn.down"), Some("sleepy-tcp"))
    );
    Ok(())
}

#[tokio::test]
async fn a_second_login_replaces_the_first() -> TestResult {
    let fixture = Fixture::start(|_| {}).await;
    let (mut first, _) = fixture.login(Transport::Tcp, "phone").await;
    let (mut second, _) = fixture.login(Transport::Ws, "phone").await;
    first.expect_close(ErrorCode::Replaced).await;
    let frame = down(1, false, b"to the new connection");
    fixture.push(&["phone"], frame.clone()).await;
    assert_eq!(second.next_raw().await.map(|r| r.bytes), Some(frame));
    Ok(())
}

/// A device that logs in again with the token it used before is answered from the
/// verified-token cache (counted); an altered copy of that token is still refused.
#[tokio::test]
async fn a_token_seen_before_skips_the_signature_check_and_an_altered_one_is_refused() -> TestResult
{
    let fixture = Fixture::start(|_| {}).await;
    let token = fixture.token("flappy");
    let login = |token: &str| {
        Frame::Login(pb::Login {
            token: token.to_string(),
            did: "flappy".into(),
            app: APP.into(),
            ..Default::default()
        })
        .encode()
    };
    for round in 0..3 {
        let mut client = RawClient::connect(Transport::Tcp, fixture.tcp).await;
        client.send(&login(&token)).await;
        match client.next_frame().await {
            Some(Frame::LoginAck(_)) => {}
            other => panic!("login {round}: expected LOGIN_ACK, got {other:?}"),
        }
    }
    // Same header and claims, the last signature character changed.
    let mut altered = token.clone();
    let last = altered.pop().expect("non-empty token");
    altered.push(if last == 'A' { 'B' } else { 'A' });
    let mut client = RawClient::connect(Transport::Tcp, fixture.tcp).await;
    client.send(&login(&altered)).await;
    client.expect_close(ErrorCode::BadToken).await;
    let metrics = http_get(fixture.admin, "/metrics").await;
    for line in [
        "tether_gateway_token_cache_hits_total 2",
        "tether_gateway_token_cache_misses_total 2",
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }
    Ok(())
}

#[tokio::test]
async fn limits_on_frame_rate_and_connections_per_app() -> TestResult {
    let fixture = Fixture::start(|c| {
        c.max_frames_per_sec = 5;
        c.max_connections_per_app = 1;
    })
    .await;
    let (mut flooder, _) = fixture.login(Transport::Tcp, "flood").await;
    let mut second = RawClient::connect(Transport::Tcp, fixture.tcp).await;
    second.send(&fixture.login_frame("another")).await;
    second.expect_close(ErrorCode::TooManyConnections).await;
    for _ in 0..50 {
        flooder.send(&Frame::Ping(Bytes::new()).encode()).await;
    }
    loop {
        match flooder.next_frame().await {
            Some(Frame::Pong(_)) => continue,
            Some(Frame::Error { error, close }) => {
                assert_eq!(error.code, u32::from(ErrorCode::RateLimited.as_u16()));
                assert!(close);
                break;
            }
            other => panic!("expected PONGs then rate_limited, got {other:?}"),
        }
    }
    Ok(())
}

#[tokio::test]
async fn qos1_overflow_closes_a_slow_consumer_and_spares_the_others() -> TestResult {
    let fixture = Fixture::start(|c| c.max_queued_frames = 8).await;
    let (mut slow, _) = fixture.login(Transport::Tcp, "slow").await;
    let (mut fast, _) = fixture.login(Transport::Tcp, "fast").await;
    // 64 MB of QoS1 frames to a client that does not read: socket buffers fill, the
    // queue fills, the gateway gives up on it.
    let body: &'static [u8] = Box::leak(vec![1u8; 60_000].into_boxed_slice());
    for seq in 1..=1000u64 {
        fixture.push(&["slow"], down(seq, true, body)).await;
    }
    fixture.push(&["fast"], down(1, true, b"not delayed")).await;
    assert_eq!(
        fast.next_frame().await.map(|f| f.frame_type()),
        Some(tether_schemas::FrameType::Down)
    );
    loop {
        match slow.next_frame().await {
            Some(Frame::Down { .. }) => continue,
            Some(Frame::Error { error, close }) => {
                assert_eq!(error.code, u32::from(ErrorCode::SlowConsumer.as_u16()));
                assert!(close);
                break;
            }
            other => panic!("expected DOWNs then slow_consumer, got {other:?}"),
        }
    }
    Ok(())
}

#[tokio::test]
async fn graceful_stop_tells_clients_to_go_away() -> TestResult {
    let mut fixture = Fixture::start(|_| {}).await;
    let (mut client, _) = fixture.login(Transport::Ws, "leaving").await;
    fixture.stop_gateway().await;
    match client.next_frame().await {
        Some(Frame::Error { error, close }) => {
            assert_eq!(error.code, u32::from(ErrorCode::GoingAway.as_u16()));
            assert!(close);
            assert!(error.retry_after_ms < 5_000);
        }
        other => panic!("expected going_away, got {other:?}"),
    }
    assert!(
        RawClient::try_connect(fixture.tcp).await.is_err(),
        "no longer accepting"
    );
    Ok(())
}

/// Sends one raw HTTP/1.0 request to the admin listener and returns the status line.
async fn admin_request(port: u16, method: &str, path: &str, token: Option<&str>) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let addr = SocketAddr::from(([127, 0, 0, 1], port));
    let mut stream = tokio::net::TcpStream::connect(addr).await.expect("admin");
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let request =
        format!("{method} {path} HTTP/1.0\r\nHost: {addr}\r\n{auth}Content-Length: 0\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("request");
    let mut answer = String::new();
    stream.read_to_string(&mut answer).await.expect("response");
    answer.lines().next().unwrap_or_default().to_string()
}

#[tokio::test]
async fn operations_routes_need_the_admin_token_off_loopback() -> TestResult {
    // Admin listener on every interface (reached here through loopback): drain needs the
    // bearer token; health and metrics stay open.
    let fixture = Fixture::start(|c| {
        c.admin_listen = "0.0.0.0:0".parse().expect("addr");
        c.admin_token = "s3cret-token".into();
    })
    .await;
    let port = fixture.admin.port();
    let refused = admin_request(port, "POST", "/v1/drain", None).await;
    assert!(refused.contains("401"), "no token: {refused}");
    let wrong = admin_request(port, "POST", "/v1/drain", Some("nope")).await;
    assert!(wrong.contains("401"), "wrong token: {wrong}");
    let allowed = admin_request(port, "POST", "/v1/drain", Some("s3cret-token")).await;
    assert!(allowed.contains("200"), "with the token: {allowed}");
    let health = admin_request(port, "GET", "/healthz", None).await;
    assert!(health.contains("200"), "health stays open: {health}");

    // Without a token, operations are served only on a loopback listener.
    let open = Fixture::start(|c| c.admin_listen = "0.0.0.0:0".parse().expect("addr")).await;
    let forbidden = admin_request(open.admin.port(), "POST", "/v1/drain", None).await;
    assert!(
        forbidden.contains("403"),
        "no token configured: {forbidden}"
    );
    Ok(())
}
