//! Conformance with `schemas/PROTOCOL.md`: every MUST of the spec, over real sockets,
//! against a real stack (nats-server, gateway with `await_registration`, state, a business
//! service). Each test names the section it checks (`s6_1_…` is section 6.1).

mod support;

use std::collections::HashSet;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::{BufMut, Bytes, BytesMut};
use futures::StreamExt;
use support::{APP, Fixture, GW, RawClient, TestResult, Transport, WAIT};
use tether_auth::{Claims, Right};
use tether_business::{Business, Push};
use tether_gateway::GatewayConfig;
use tether_nats::{headers, subjects};
use tether_schemas::{ErrorCode, Frame, pb};
use tether_state::{RunningState, StateConfig};
use tokio_util::sync::CancellationToken;

/// A gateway, a state instance and their NATS.
struct Stack {
    fixture: Fixture,
    _state: RunningState,
    _stop: tokio_util::sync::DropGuard,
}

impl Stack {
    async fn start() -> Self {
        Self::with(|_| {}, |_| {}).await
    }

    /// `gateway` and `state` adjust the configurations (the gateway waits for state's
    /// registration before LOGIN_ACK, as in production).
    async fn with(
        gateway: impl FnOnce(&mut GatewayConfig),
        state: impl FnOnce(&mut StateConfig),
    ) -> Self {
        let fixture = Fixture::start(|config| {
            config.await_registration = true;
            gateway(config);
        })
        .await;
        let mut config = StateConfig {
            nats: fixture.nats_auth.clone(),
            ..support::stack::fast_state(&fixture.nats.client_url())
        };
        state(&mut config);
        let stop = CancellationToken::new();
        let running = tether_state::start(config, stop.clone())
            .await
            .expect("state starts");
        Self {
            fixture,
            _state: running,
            _stop: stop.drop_guard(),
        }
    }

    fn business(&self) -> Business {
        Business::new(self.fixture.nats_client.clone(), APP)
    }

    /// Logs `did` in over TCP with a default token.
    async fn login(&self, did: &str) -> (RawClient, pb::LoginAck) {
        self.fixture.login(Transport::Tcp, did).await
    }

    /// Connects and sends LOGIN with a token signed from `claims`.
    async fn login_with(&self, claims: &Claims, did: &str) -> RawClient {
        let mut client = RawClient::connect(Transport::Tcp, self.fixture.tcp).await;
        let login = Frame::Login(pb::Login {
            token: self.fixture.signer.sign(claims).expect("token"),
            did: did.into(),
            app: APP.into(),
            ..Default::default()
        });
        client.send(&login.encode()).await;
        client
    }
}

fn claims(did: &str) -> Claims {
    Claims::new(
        APP,
        format!("u-{did}"),
        did,
        tether_auth::unix_now(),
        Duration::from_secs(3600),
    )
}

/// The next frame within `within`, or `None` (the connection stays open).
async fn frame_within(client: &mut RawClient, within: Duration) -> Option<Option<Frame>> {
    tokio::time::timeout(within, client.next_frame()).await.ok()
}

/// Asserts that no frame arrives for `how_long` (read in slices shorter than the raw
/// client's own read timeout).
async fn silent_for(client: &mut RawClient, how_long: Duration) {
    let deadline = tokio::time::Instant::now() + how_long;
    loop {
        let left = deadline.saturating_duration_since(tokio::time::Instant::now());
        if left.is_zero() {
            return;
        }
        if let Some(frame) = frame_within(client, left.min(Duration::from_secs(5))).await {
            panic!("no frame expected, got {frame:?}");
        }
    }
}

/// Expects a non-closing ERROR with `code`; returns it.
async fn expect_open_error(client: &mut RawClient, code: ErrorCode) -> pb::Error {
    match client.next_frame().await {
        Some(Frame::Error { error, close }) => {
            assert_eq!(error.code, u32::from(code.as_u16()), "{}", error.text);
            assert!(!close, "no CLOSE flag on {code}");
            error
        }
        other => panic!("expected ERROR {code}, got {other:?}"),
    }
}

/// PING with `body` is answered by PONG with that body: the connection is still usable.
async fn still_usable(client: &mut RawClient) {
    client
        .send(&Frame::Ping(Bytes::from_static(b"ok?")).encode())
        .await;
    loop {
        match client.next_frame().await {
            Some(Frame::Pong(body)) => {
                assert_eq!(&body[..], b"ok?");
                return;
            }
            Some(Frame::Down { .. }) => continue,
            other => panic!("expected PONG, got {other:?}"),
        }
    }
}

/// Busy-looping threads, for as long as it lives.
struct CpuHog {
    stop: Arc<AtomicBool>,
    threads: Vec<std::thread::JoinHandle<()>>,
}

impl CpuHog {
    fn start(threads: usize) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let threads = (0..threads)
            .map(|_| {
                let stop = stop.clone();
                std::thread::spawn(move || {
                    let mut x = 0u64;
                    while !stop.load(Ordering::Relaxed) {
                        x = x.wrapping_mul(6_364_136_223_846_793_005).wrapping_add(1);
                        std::hint::black_box(x);
                    }
                })
            })
            .collect();
        Self { stop, threads }
    }
}

impl Drop for CpuHog {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        for thread in self.threads.drain(..) {
            let _ = thread.join();
        }
    }
}

/// A frame with raw fixed-header fields.
fn raw_frame(kind: u8, flags: u8, header: &[u8], body: &[u8]) -> Bytes {
    let mut out = BytesMut::new();
    out.put_u8(0x54);
    out.put_u8(0x01);
    out.put_u8(kind);
    out.put_u8(flags);
    out.put_u16(u16::try_from(header.len()).expect("short"));
    out.put_u32(u32::try_from(body.len()).expect("short"));
    out.put_slice(header);
    out.put_slice(body);
    out.freeze()
}

fn up(client_msg_id: u64, body: &'static [u8]) -> Bytes {
    Frame::Up {
        header: pb::Up {
            client_msg_id,
            session: String::new(),
        },
        body: Bytes::from_static(body),
    }
    .encode()
}

fn down_ack(seq: u64) -> Bytes {
    Frame::DownAck(pb::DownAck { seq }).encode()
}

async fn next_up_ack(client: &mut RawClient) -> pb::UpAck {
    loop {
        match client.next_frame().await {
            Some(Frame::UpAck(ack)) => return ack,
            Some(Frame::Down { .. } | Frame::Pong(_)) => continue,
            other => panic!("expected UP_ACK, got {other:?}"),
        }
    }
}

async fn next_down(client: &mut RawClient) -> (pb::Down, bool, Bytes) {
    match client.next_frame().await {
        Some(Frame::Down {
            header, qos1, body, ..
        }) => (header, qos1, body),
        other => panic!("expected DOWN, got {other:?}"),
    }
}

// ---- 3. Frame layout ----------------------------------------------------------------

#[tokio::test]
async fn s3_1_bad_magic_is_bad_frame_and_wrong_version_unsupported_version() -> TestResult {
    let stack = Stack::start().await;
    let mut client = RawClient::connect(Transport::Tcp, stack.fixture.tcp).await;
    client
        .send_raw(&[0x55, 0x01, 0x03, 0, 0, 0, 0, 0, 0, 0])
        .await;
    client.expect_close(ErrorCode::BadFrame).await;
    let mut client = RawClient::connect(Transport::Tcp, stack.fixture.tcp).await;
    client
        .send_raw(&[0x54, 0x02, 0x03, 0, 0, 0, 0, 0, 0, 0])
        .await;
    client.expect_close(ErrorCode::UnsupportedVersion).await;
    Ok(())
}

#[tokio::test]
async fn s3_3_ping_is_echoed_and_a_ping_with_a_var_header_is_bad_frame() -> TestResult {
    let stack = Stack::start().await;
    let (mut client, _) = stack.login("pinger").await;
    client.send(&raw_frame(3, 0, &[], b"hb-1")).await;
    match client.next_frame().await {
        Some(Frame::Pong(body)) => assert_eq!(&body[..], b"hb-1"),
        other => panic!("expected PONG, got {other:?}"),
    }
    // Issue 14 item 7: PING has no variable header; one makes the frame malformed.
    client.send(&raw_frame(3, 0, &[0x08, 0x01], b"")).await;
    client.expect_close(ErrorCode::BadFrame).await;
    Ok(())
}

#[tokio::test]
async fn s3_3_reserved_and_server_only_types_after_login_leave_the_connection_open() -> TestResult {
    let stack = Stack::start().await;
    let (mut client, _) = stack.login("skipper").await;
    for kind in [0u8, 11, 200, 255] {
        client.send(&raw_frame(kind, 0, &[], b"x")).await;
        expect_open_error(&mut client, ErrorCode::BadFrame).await;
    }
    // Server-only types (LOGIN_ACK, PONG, UP_ACK, DOWN, REDIRECT, ERROR) from a client.
    for kind in [2u8, 4, 6, 7, 9, 10] {
        client.send(&raw_frame(kind, 0, &[], b"")).await;
        expect_open_error(&mut client, ErrorCode::BadRequest).await;
    }
    still_usable(&mut client).await;
    Ok(())
}

#[tokio::test]
async fn s3_3_malformed_var_header_or_body_on_a_bodyless_type_is_bad_frame_and_close() -> TestResult
{
    let stack = Stack::start().await;
    let (mut client, _) = stack.login("malformed").await;
    // DOWN_ACK with a body.
    client.send(&raw_frame(8, 0, &[0x08, 0x01], b"x")).await;
    client.expect_close(ErrorCode::BadFrame).await;
    let (mut client, _) = stack.login("malformed").await;
    // UP whose var header is not protobuf.
    client
        .send(&raw_frame(5, 0, &[0xff, 0xff, 0xff], b"x"))
        .await;
    client.expect_close(ErrorCode::BadFrame).await;
    Ok(())
}

#[tokio::test]
async fn s3_4_oversized_frame_is_frame_too_large_and_close() -> TestResult {
    let stack = Stack::start().await;
    let (mut client, _) = stack.login("big").await;
    // The fixed header alone announces 70,000 bytes: refused before the rest is read.
    let mut header = vec![0x54, 0x01, 0x05, 0x00, 0x00, 0x00];
    header.extend_from_slice(&70_000u32.to_be_bytes());
    client.send_raw(&header).await;
    client.expect_close(ErrorCode::FrameTooLarge).await;
    Ok(())
}

// ---- 2. Transports ------------------------------------------------------------------

#[tokio::test]
async fn s2_websocket_text_message_is_bad_frame_and_close() -> TestResult {
    let stack = Stack::start().await;
    let mut client = RawClient::connect(Transport::Ws, stack.fixture.ws).await;
    client.send(&stack.fixture.login_frame("texter")).await;
    assert!(matches!(
        client.next_frame().await,
        Some(Frame::LoginAck(_))
    ));
    // A masked text message "hi".
    let mask = [1u8, 2, 3, 4];
    let mut text = vec![0x81, 0x82];
    text.extend_from_slice(&mask);
    text.extend(b"hi".iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    client.send_raw(&text).await;
    client.expect_close(ErrorCode::BadFrame).await;
    Ok(())
}

// ---- 6.1 Connect and log in -----------------------------------------------------------

#[tokio::test]
async fn s6_1_any_frame_but_login_first_is_login_required_and_close() -> TestResult {
    let stack = Stack::start().await;
    // PING, UP, DOWN_ACK, a server-only type, and reserved types (issue 14 item 7).
    for frame in [
        raw_frame(3, 0, &[], b""),
        up(1, b"x"),
        down_ack(1),
        raw_frame(2, 0, &[], b""),
        raw_frame(0, 0, &[], b""),
        raw_frame(11, 0, &[], b""),
        raw_frame(255, 0, &[], b"zz"),
    ] {
        let mut client = RawClient::connect(Transport::Tcp, stack.fixture.tcp).await;
        client.send(&frame).await;
        client.expect_close(ErrorCode::LoginRequired).await;
    }
    Ok(())
}

#[tokio::test]
async fn s6_1_login_refusals_close_with_their_codes() -> TestResult {
    let stack = Stack::start().await;
    // A token whose did differs from LOGIN's did.
    let mut client = stack.login_with(&claims("alice"), "mallory").await;
    client.expect_close(ErrorCode::BadToken).await;
    // A token bound to another gateway (`gw` claim).
    let mut bound = claims("bound");
    bound.gw = Some("gw-elsewhere".into());
    let mut client = stack.login_with(&bound, "bound").await;
    client.expect_close(ErrorCode::BadToken).await;
    // The same token for its own gateway is accepted.
    bound.gw = Some(GW.into());
    let mut client = stack.login_with(&bound, "bound").await;
    assert!(matches!(
        client.next_frame().await,
        Some(Frame::LoginAck(_))
    ));
    // A token of another app than LOGIN's app.
    let mut other = claims("visitor");
    other.app = "other".into();
    let mut client = stack.login_with(&other, "visitor").await;
    client.expect_close(ErrorCode::WrongApp).await;
    // An expired token.
    let mut old = claims("late");
    old.iat = 1_000;
    old.exp = 2_000;
    let mut client = stack.login_with(&old, "late").await;
    client.expect_close(ErrorCode::TokenExpired).await;
    // Garbage.
    let mut client = RawClient::connect(Transport::Tcp, stack.fixture.tcp).await;
    let login = Frame::Login(pb::Login {
        token: "not-a-token".into(),
        did: "x".into(),
        app: APP.into(),
        ..Default::default()
    });
    client.send(&login.encode()).await;
    client.expect_close(ErrorCode::BadToken).await;
    Ok(())
}

#[tokio::test]
async fn s6_1_login_timeout_closes() -> TestResult {
    let stack = Stack::with(|gw| gw.login_timeout_secs = 1, |_| {}).await;
    let mut client = RawClient::connect(Transport::Tcp, stack.fixture.tcp).await;
    client.expect_close(ErrorCode::LoginTimeout).await;
    Ok(())
}

#[tokio::test]
async fn s6_1_second_login_on_a_connection_is_a_non_closing_bad_request() -> TestResult {
    let stack = Stack::start().await;
    let (mut client, _) = stack.login("twice").await;
    client.send(&stack.fixture.login_frame("twice")).await;
    expect_open_error(&mut client, ErrorCode::BadRequest).await;
    still_usable(&mut client).await;
    Ok(())
}

#[tokio::test]
async fn s6_1_a_new_login_replaces_the_old_connection() -> TestResult {
    let stack = Stack::start().await;
    let (mut old, first) = stack.login("phone").await;
    let (mut new, second) = stack.login("phone").await;
    assert_ne!(first.conn_id, second.conn_id);
    old.expect_close(ErrorCode::Replaced).await;
    still_usable(&mut new).await;
    Ok(())
}

/// Issue 14 items 2 and 3: LOGIN_ACK comes before any resent DOWN, and carries state's
/// cursor in `last_acked_seq`; the resent DOWNs are those above it, in order.
#[tokio::test]
async fn s6_1_login_ack_before_any_down_with_last_acked_seq() -> TestResult {
    let stack = Stack::start().await;
    let business = stack.business();
    let (mut client, ack) = stack.login("resumer").await;
    assert_eq!(ack.last_acked_seq, 0, "fresh device");
    for i in 1..=5u64 {
        let reply = business
            .push(Push::to_dids(["resumer"], format!("m{i}").into_bytes()))
            .await?;
        assert_eq!(reply.accepted.len(), 1);
    }
    for seq in 1..=5u64 {
        let (down, qos1, _) = next_down(&mut client).await;
        assert!(qos1);
        assert_eq!(down.seq, seq);
    }
    client.send(&down_ack(3)).await;
    still_usable(&mut client).await;
    // Wait until state counts 3 as acked (its cursor), then come back without resume_seq.
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        drop(client);
        let (mut again, ack) = stack.login("resumer").await;
        if ack.last_acked_seq == 3 {
            // LOGIN_ACK was the first frame; then 4 and 5, in order.
            for seq in 4..=5u64 {
                let (down, qos1, _) = next_down(&mut again).await;
                assert!(qos1);
                assert_eq!(down.seq, seq);
            }
            return Ok(());
        }
        assert!(ack.last_acked_seq < 3, "cursor {}", ack.last_acked_seq);
        assert!(
            tokio::time::Instant::now() < deadline,
            "cursor never reached 3"
        );
        client = again;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// Issue 14 item 2 under load: many pending DOWNs, LOGIN_ACK still first, every time.
#[tokio::test]
async fn s6_1_login_ack_first_even_with_many_pending_downs() -> TestResult {
    let stack = Stack::start().await;
    let business = stack.business();
    for round in 0..5 {
        let did = format!("offline-{round}");
        // Known to state, then offline with 50 pending messages.
        let (client, _) = stack.login(&did).await;
        drop(client);
        for i in 0..50 {
            business
                .push(Push::to_dids([did.as_str()], format!("p{i}").into_bytes()))
                .await?;
        }
        let mut client = RawClient::connect(Transport::Tcp, stack.fixture.tcp).await;
        client.send(&stack.fixture.login_frame(&did)).await;
        match client.next_frame().await {
            Some(Frame::LoginAck(_)) => {}
            other => panic!("round {round}: LOGIN_ACK must come first, got {other:?}"),
        }
        let mut seqs = Vec::new();
        while seqs.len() < 50 {
            let (down, _, _) = next_down(&mut client).await;
            if !seqs.contains(&down.seq) {
                seqs.push(down.seq);
            }
        }
        assert_eq!(seqs, (1..=50).collect::<Vec<_>>(), "in order, no gap");
    }
    Ok(())
}

// ---- 6.3 / 11.1 Uplink ----------------------------------------------------------------

/// A business service that counts requests and answers `stored` only while `answer` is
/// set (deduplicating on (app, did, Tether-Msg-Id) as 11.1 requires).
struct TestBusiness {
    requests: Arc<AtomicUsize>,
    answer: Arc<AtomicBool>,
    stored: Arc<Mutex<HashSet<(String, String)>>>,
}

impl TestBusiness {
    async fn start(nats: &async_nats::Client, answering: bool) -> Self {
        let mut sub = nats
            .queue_subscribe(subjects::business_up(APP), "tether-biz".into())
            .await
            .expect("subscribe");
        nats.flush().await.expect("flush");
        let this = Self {
            requests: Arc::default(),
            answer: Arc::new(AtomicBool::new(answering)),
            stored: Arc::default(),
        };
        let (requests, answer, stored) = (
            this.requests.clone(),
            this.answer.clone(),
            this.stored.clone(),
        );
        let nats = nats.clone();
        tokio::spawn(async move {
            while let Some(message) = sub.next().await {
                requests.fetch_add(1, Ordering::SeqCst);
                if !answer.load(Ordering::SeqCst) {
                    continue;
                }
                let header = |name: &str| {
                    message
                        .headers
                        .as_ref()
                        .and_then(|h| h.get(name))
                        .map(|v| v.as_str().to_string())
                        .unwrap_or_default()
                };
                let key = (header(headers::DID), header(headers::MSG_ID_CLIENT));
                let id = format!("m-{}-{}", key.0, key.1);
                stored.lock().expect("lock").insert(key);
                if let Some(reply) = message.reply {
                    let body = format!(r#"{{"status":"stored","id":"{id}"}}"#);
                    let _ = nats.publish(reply, body.into()).await;
                }
            }
        });
        this
    }
}

/// Issue 14 item 4: a silent business gets one request plus `business_retries` retries,
/// and the device exactly one `timeout` answer (no redelivered rounds).
#[tokio::test]
async fn s11_1_silent_business_gets_one_request_plus_retries_and_one_timeout() -> TestResult {
    // Long enough that the retries outlast the uplink consumer's former ack wait (10 s).
    let stack = Stack::with(
        |_| {},
        |state| {
            state.business_timeout_ms = 2_000;
            state.business_retries = 3;
        },
    )
    .await;
    let business = TestBusiness::start(&stack.fixture.nats_client, false).await;
    let (mut client, _) = stack.login("shouter").await;
    client.send(&up(7, b"anyone?")).await;
    // Four attempts of 2 s plus backoff: longer than one read of the raw client waits.
    let ack = loop {
        match frame_within(&mut client, Duration::from_secs(5)).await {
            Some(Some(Frame::UpAck(ack))) => break ack,
            None => continue,
            other => panic!("expected UP_ACK, got {other:?}"),
        }
    };
    assert_eq!(ack.client_msg_id, 7);
    assert_eq!(ack.code, u32::from(ErrorCode::Timeout.as_u16()));
    assert_eq!(business.requests.load(Ordering::SeqCst), 4, "1 + 3 retries");
    // Nothing more: no second round, no second answer.
    silent_for(&mut client, Duration::from_secs(12)).await;
    assert_eq!(business.requests.load(Ordering::SeqCst), 4, "no redelivery");
    Ok(())
}

/// 11.1: with no business subscribed (no responders) the device still gets one `timeout`.
#[tokio::test]
async fn s11_1_no_responders_answers_timeout_without_waiting_out_each_attempt() -> TestResult {
    let stack = Stack::with(
        |_| {},
        |state| {
            state.business_timeout_ms = 5_000;
            state.business_retries = 3;
        },
    )
    .await;
    let (mut client, _) = stack.login("nobody-home").await;
    let started = tokio::time::Instant::now();
    client.send(&up(1, b"hello?")).await;
    let ack = next_up_ack(&mut client).await;
    assert_eq!(ack.code, u32::from(ErrorCode::Timeout.as_u16()));
    // Four 5 s waits would take 20 s; no responders fail at once (only the backoff).
    assert!(
        started.elapsed() < Duration::from_secs(10),
        "{:?}",
        started.elapsed()
    );
    assert!(
        frame_within(&mut client, Duration::from_secs(2))
            .await
            .is_none()
    );
    Ok(())
}

/// Issue 14 item 5: a resend after a `timeout` answer is processed again and answered; the
/// business sees the same (did, Tether-Msg-Id) and stores it once; a later resend gets the
/// kept receipt.
#[tokio::test]
async fn s6_3_resend_after_timeout_is_processed_again_and_answered() -> TestResult {
    let stack = Stack::with(
        |_| {},
        |state| {
            state.business_timeout_ms = 300;
            state.business_retries = 1;
        },
    )
    .await;
    let business = TestBusiness::start(&stack.fixture.nats_client, false).await;
    let (mut client, _) = stack.login("patient").await;
    client.send(&up(42, b"first")).await;
    let ack = next_up_ack(&mut client).await;
    assert_eq!(ack.code, u32::from(ErrorCode::Timeout.as_u16()));
    let asked = business.requests.load(Ordering::SeqCst);
    assert_eq!(asked, 2);
    // A resend while the business is still silent: processed again, timeout again.
    client.send(&up(42, b"first")).await;
    let ack = next_up_ack(&mut client).await;
    assert_eq!(ack.code, u32::from(ErrorCode::Timeout.as_u16()));
    assert_eq!(business.requests.load(Ordering::SeqCst), 4);
    // The business is back; the device resends the same UP (same client_msg_id).
    business.answer.store(true, Ordering::SeqCst);
    client.send(&up(42, b"first")).await;
    let ack = next_up_ack(&mut client).await;
    assert_eq!(ack.client_msg_id, 42);
    assert_eq!(ack.code, 0, "stored on the resend: {}", ack.message);
    assert_eq!(ack.server_msg_id, "m-patient-42");
    // Another resend (its UP_ACK lost, say): answered from the kept receipt.
    client.send(&up(42, b"first")).await;
    let again = next_up_ack(&mut client).await;
    assert_eq!(again, ack);
    assert_eq!(business.stored.lock().expect("lock").len(), 1);
    // A resend on a new connection, too.
    drop(client);
    let (mut client, _) = stack.login("patient").await;
    client.send(&up(42, b"first")).await;
    assert_eq!(next_up_ack(&mut client).await, ack);
    Ok(())
}

/// 6.3: a resend while the first copy is still being processed is dropped as a duplicate:
/// the first copy's one UP_ACK answers it, and the business stores it once.
#[tokio::test]
async fn s6_3_resend_while_in_progress_is_answered_once() -> TestResult {
    let stack = Stack::with(
        |_| {},
        |state| {
            state.business_timeout_ms = 2_000;
            state.business_retries = 3;
        },
    )
    .await;
    let business = TestBusiness::start(&stack.fixture.nats_client, false).await;
    let (mut client, _) = stack.login("eager").await;
    client.send(&up(5, b"x")).await;
    // The first attempt is out and unanswered; the business comes back and the device
    // resends before any answer.
    let deadline = tokio::time::Instant::now() + WAIT;
    while business.requests.load(Ordering::SeqCst) == 0 {
        assert!(tokio::time::Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    business.answer.store(true, Ordering::SeqCst);
    client.send(&up(5, b"x")).await;
    let first = next_up_ack(&mut client).await;
    assert_eq!(first.code, 0, "{}", first.message);
    silent_for(&mut client, Duration::from_secs(3)).await;
    assert_eq!(business.stored.lock().expect("lock").len(), 1);
    Ok(())
}

#[tokio::test]
async fn s6_3_up_with_a_receive_only_token_is_forbidden() -> TestResult {
    let stack = Stack::start().await;
    let business = TestBusiness::start(&stack.fixture.nats_client, true).await;
    let mut readonly = claims("listener");
    readonly.rights = readonly.rights.without(Right::Up);
    let mut client = stack.login_with(&readonly, "listener").await;
    assert!(matches!(
        client.next_frame().await,
        Some(Frame::LoginAck(_))
    ));
    client.send(&up(1, b"may I?")).await;
    let ack = next_up_ack(&mut client).await;
    assert_eq!(ack.code, u32::from(ErrorCode::Forbidden.as_u16()));
    still_usable(&mut client).await;
    assert_eq!(
        business.requests.load(Ordering::SeqCst),
        0,
        "never forwarded"
    );
    Ok(())
}

#[tokio::test]
async fn s6_3_stored_up_is_acked_after_the_business_stored_it() -> TestResult {
    let stack = Stack::start().await;
    let business = TestBusiness::start(&stack.fixture.nats_client, true).await;
    let (mut client, _) = stack.login("writer").await;
    for id in [3u64, 1, 2] {
        client.send(&up(id, b"hello")).await;
    }
    let mut ids = Vec::new();
    for _ in 0..3 {
        let ack = next_up_ack(&mut client).await;
        assert_eq!(ack.code, 0);
        assert_eq!(ack.server_msg_id, format!("m-writer-{}", ack.client_msg_id));
        ids.push(ack.client_msg_id);
    }
    ids.sort_unstable();
    assert_eq!(ids, vec![1, 2, 3]);
    assert_eq!(business.stored.lock().expect("lock").len(), 3);
    Ok(())
}

// ---- 6.4 Downlink -------------------------------------------------------------------------

/// Issue 14 item 8: a DOWN_ACK above anything sent is a non-closing `bad_request` and is
/// ignored; the next message keeps its sequence.
#[tokio::test]
async fn s6_4_down_ack_above_sent_is_refused_and_ignored() -> TestResult {
    let stack = Stack::start().await;
    let business = stack.business();
    let (mut client, _) = stack.login("acker").await;
    business.push(Push::to_dids(["acker"], &b"one"[..])).await?;
    let (down, _, _) = next_down(&mut client).await;
    assert_eq!(down.seq, 1);
    client.send(&down_ack(10)).await;
    expect_open_error(&mut client, ErrorCode::BadRequest).await;
    // DOWN_ACK 0 is harmless (acknowledges nothing).
    client.send(&down_ack(0)).await;
    client.send(&down_ack(1)).await;
    let reply = business.push(Push::to_dids(["acker"], &b"two"[..])).await?;
    assert_eq!(reply.accepted[0].seq, 2, "the bogus ack moved nothing");
    let (down, _, body) = next_down(&mut client).await;
    assert_eq!((down.seq, &body[..]), (2, &b"two"[..]));
    client.send(&down_ack(2)).await;
    still_usable(&mut client).await;
    Ok(())
}

/// 6.4: an unacknowledged QoS1 DOWN is resent on the timer (state `retransmit_ms`) until
/// acked; QoS0 is never resent.
#[tokio::test]
async fn s6_4_unacked_qos1_is_resent_on_the_timer() -> TestResult {
    let stack = Stack::start().await;
    let business = stack.business();
    let (mut client, _) = stack.login("forgetful").await;
    business
        .push(Push::to_dids(["forgetful"], &b"again"[..]))
        .await?;
    let (first, qos1, _) = next_down(&mut client).await;
    assert!(qos1);
    let (resent, _, body) = next_down(&mut client).await;
    assert_eq!(resent.seq, first.seq);
    assert_eq!(&body[..], b"again");
    client.send(&down_ack(first.seq)).await;
    // Drain any resend already in flight, then silence.
    tokio::time::sleep(Duration::from_millis(300)).await;
    while let Some(Some(Frame::Down { .. })) =
        frame_within(&mut client, Duration::from_millis(1_500)).await
    {}
    business
        .push(Push::to_dids(["forgetful"], &b"live"[..]).qos0())
        .await?;
    let (live, qos1, _) = next_down(&mut client).await;
    assert!(!qos1);
    assert_eq!(live.seq, 0);
    assert!(
        frame_within(&mut client, Duration::from_millis(1_500))
            .await
            .is_none()
    );
    Ok(())
}

// ---- 7. Limits ------------------------------------------------------------------------------

/// Issue 14 item 9: `rate_limited` says how long to wait (> 0).
#[tokio::test]
async fn s7_rate_limited_carries_retry_after_ms() -> TestResult {
    let stack = Stack::with(|gw| gw.max_frames_per_sec = 5, |_| {}).await;
    let (mut client, _) = stack.login("chatty").await;
    let mut burst = BytesMut::new();
    for _ in 0..40 {
        burst.extend_from_slice(&raw_frame(3, 0, &[], b""));
    }
    client.send_raw(&burst).await;
    loop {
        match client.next_frame().await {
            Some(Frame::Pong(_)) => continue,
            Some(Frame::Error { error, close }) => {
                assert_eq!(error.code, u32::from(ErrorCode::RateLimited.as_u16()));
                assert!(close);
                // One token every 200 ms at 5 frames per second.
                assert!(
                    error.retry_after_ms > 0 && error.retry_after_ms <= 200,
                    "retry_after_ms {}",
                    error.retry_after_ms
                );
                break;
            }
            other => panic!("expected rate_limited, got {other:?}"),
        }
    }
    assert!(client.next_frame().await.is_none());
    Ok(())
}

// ---- 10.3 Connection events -----------------------------------------------------------------

/// Issue 14 item 10: at a graceful stop every disconnect is in the events stream by the
/// time the gateway has stopped.
#[tokio::test]
async fn s10_3_every_disconnect_is_recorded_at_gateway_shutdown() -> TestResult {
    let mut stack = Stack::start().await;
    let mut clients = Vec::new();
    for i in 0..100 {
        clients.push(stack.login(&format!("leaver-{i}")).await.0);
    }
    stack.fixture.stop_gateway().await;
    let downs = conn_downs(&stack.fixture.nats_client, GW).await?;
    assert_eq!(
        downs.len(),
        100,
        "every conn.down stored when the gateway stopped"
    );
    drop(clients);
    Ok(())
}

/// The `tether` binary (`$TETHER_BIN`, else `target/debug/tether`, built when missing).
fn tether_bin() -> std::path::PathBuf {
    if let Some(path) = std::env::var_os("TETHER_BIN") {
        return path.into();
    }
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    let bin = target.join("debug").join("tether");
    if !bin.is_file() {
        let cargo = option_env!("CARGO").unwrap_or("cargo");
        let status = std::process::Command::new(cargo)
            .args(["build", "-p", "tether"])
            .current_dir(&root)
            .status()
            .expect("cargo build -p tether");
        assert!(status.success(), "cargo build -p tether failed");
    }
    bin
}

fn free_addr() -> std::net::SocketAddr {
    tether_nats::harness::free_addr().expect("free loopback port")
}

/// Issue 14 item 10, as in production: SIGTERM to a `tether gateway` process holding 300
/// connections; once the process has exited, every `conn.down` is in the events stream.
#[tokio::test]
async fn s10_3_every_disconnect_is_recorded_at_sigterm() -> TestResult {
    let stack = Stack::start().await;
    let dir = tempfile::tempdir()?;
    let key = dir.path().join("token.pub");
    std::fs::write(&key, stack.fixture.signer.verifier().to_pem()?)?;
    let tcp = free_addr();
    let gw = "gw-sigterm";
    let mut child = std::process::Command::new(tether_bin())
        .args([
            "gateway",
            "--nats",
            &stack.fixture.nats.client_url(),
            "--id",
            gw,
        ])
        .args(["--tcp", &tcp.to_string(), "--ws", &free_addr().to_string()])
        .args(["--admin", &free_addr().to_string()])
        .arg("--token-public-key")
        .arg(&key)
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .spawn()?;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    while tokio::net::TcpStream::connect(tcp).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "gateway listens");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let mut clients = Vec::new();
    for i in 0..300 {
        let did = format!("term-{i}");
        let mut client = RawClient::connect(Transport::Tcp, tcp).await;
        client.send(&stack.fixture.login_frame(&did)).await;
        match client.next_frame().await {
            Some(Frame::LoginAck(_)) => {}
            other => panic!("{did}: expected LOGIN_ACK, got {other:?}"),
        }
        clients.push(client);
    }
    let pid = child.id().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()?;
    assert!(killed.success());
    let status = tokio::task::spawn_blocking(move || child.wait()).await??;
    eprintln!("gateway exited: {status}");
    let downs = conn_downs(&stack.fixture.nats_client, gw).await?;
    assert_eq!(
        downs.len(),
        300,
        "every conn.down stored when the process exited"
    );
    drop(clients);
    Ok(())
}

/// A base port whose Tether listener ports (`tether up` layout) are all free.
fn free_base_port() -> u16 {
    loop {
        let base = 20_000 + u16::try_from(rand_below(30_000)).unwrap_or(0);
        let free = [0u16, 1, 2, 10, 20, 21, 30, 40]
            .iter()
            .all(|offset| std::net::TcpListener::bind(("127.0.0.1", base + offset)).is_ok());
        if free {
            return base;
        }
    }
}

fn rand_below(n: u64) -> u64 {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| u64::from(d.subsec_nanos()));
    (nanos ^ u64::from(std::process::id()).wrapping_mul(2_654_435_761)) % n
}

/// Issue 14 item 10 as reported: `tether up` holding 300 connections gets SIGTERM; it
/// stops its nats-server right after the gateway has stopped, so a `conn.down` not yet
/// confirmed by then was lost ("connection event not stored … broken pipe").
#[tokio::test]
async fn s10_3_no_disconnect_lost_when_tether_up_stops() -> TestResult {
    let dir = tempfile::tempdir()?;
    let base = free_base_port();
    let log = dir.path().join("up.log");
    let mut child = std::process::Command::new(tether_bin())
        .args(["up", "--no-demo", "--data"])
        .arg(dir.path().join("data"))
        .args(["--nats-port", &free_addr().port().to_string()])
        .args(["--nats-http-port", &free_addr().port().to_string()])
        .args(["--base-port", &base.to_string()])
        .env("RUST_LOG", "warn")
        .stdout(std::process::Stdio::null())
        .stderr(std::fs::File::create(&log)?)
        .spawn()?;
    let tcp: std::net::SocketAddr = ([127, 0, 0, 1], base).into();
    let key = dir.path().join("data").join("token.key");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    while !key.is_file() || tokio::net::TcpStream::connect(tcp).await.is_err() {
        assert!(tokio::time::Instant::now() < deadline, "tether up listens");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let signer = tether_auth::TokenSigner::from_file(&key)?;
    let mut clients = Vec::new();
    for i in 0..300 {
        let did = format!("up-{i}");
        let token = signer.issue("demo", &format!("u-{did}"), &did, Duration::from_secs(600))?;
        let mut client = RawClient::connect(Transport::Tcp, tcp).await;
        let login = Frame::Login(pb::Login {
            token,
            did: did.clone(),
            app: "demo".into(),
            ..Default::default()
        });
        client.send(&login.encode()).await;
        match client.next_frame().await {
            Some(Frame::LoginAck(_)) => {}
            other => panic!("{did}: expected LOGIN_ACK, got {other:?}"),
        }
        clients.push(client);
    }
    // Stopped on a busy machine, as in the report (a slow stop widens the window).
    let hog = CpuHog::start(2);
    let pid = child.id().to_string();
    let killed = std::process::Command::new("kill")
        .args(["-TERM", &pid])
        .status()?;
    assert!(killed.success());
    let status = tokio::task::spawn_blocking(move || child.wait()).await??;
    drop(hog);
    let text = std::fs::read_to_string(&log)?;
    let lost = text
        .lines()
        .filter(|line| line.contains("connection event not stored"))
        .count();
    assert_eq!(
        lost, 0,
        "conn.down events lost at shutdown ({status}):\n{text}"
    );
    drop(clients);
    Ok(())
}

/// The dids of the `conn.down` events of gateway `gw` in the events stream.
async fn conn_downs(
    nats: &async_nats::Client,
    gw: &str,
) -> Result<HashSet<String>, Box<dyn std::error::Error + Send + Sync>> {
    let js = async_nats::jetstream::new(nats.clone());
    let mut stream = js
        .get_stream(tether_nats::layout::EVENTS_STREAM)
        .await
        .expect("events stream");
    let messages = stream.info().await?.state.messages;
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            filter_subject: subjects::conn_events_all(APP),
            ..Default::default()
        })
        .await?;
    let mut batch = consumer
        .fetch()
        .max_messages(usize::try_from(messages).unwrap_or(usize::MAX))
        .messages()
        .await?;
    let mut downs = HashSet::new();
    while let Some(message) = batch.next().await {
        let message = message?;
        let event: serde_json::Value = serde_json::from_slice(&message.payload)?;
        if event["kind"] == "conn.down" && event["gw"] == gw {
            assert_eq!(event["reason"], "going_away");
            downs.insert(event["did"].as_str().unwrap_or_default().to_string());
        }
    }
    Ok(downs)
}

// ---- 11.2 / 11.4 Push -----------------------------------------------------------------------

/// Issue 14 item 1 and the Must-show: 200 new devices, each pushed to by uid (QoS1), by
/// did (QoS0) and by its token `sess` session the moment its LOGIN_ACK arrives, beside a
/// CPU hog: 200/200 reached for all three.
#[tokio::test]
async fn s11_2_pushes_right_after_login_ack_reach_200_of_200_new_devices() -> TestResult {
    let stack = Arc::new(Stack::start().await);
    let hog = CpuHog::start(1);
    let reached = [
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
        Arc::new(AtomicU64::new(0)),
    ];
    let business = stack.business();
    let mut tasks = tokio::task::JoinSet::new();
    for i in 0..200 {
        let (stack, business, reached) = (stack.clone(), business.clone(), reached.clone());
        tasks.spawn(async move {
            let did = format!("new-{i}");
            let session = format!("solo-{i}");
            let mut claims = claims(&did);
            claims.sess = vec![session.clone()];
            let mut client = stack.login_with(&claims, &did).await;
            match client.next_frame().await {
                Some(Frame::LoginAck(_)) => {}
                other => panic!("{did}: expected LOGIN_ACK, got {other:?}"),
            }
            // All three at once, the moment LOGIN_ACK is in.
            let (by_uid, by_did, by_session) = tokio::join!(
                business.push(Push::to_uids([format!("u-{did}")], &b"uid"[..])),
                business.push(Push::to_dids([did.as_str()], &b"did"[..]).qos0()),
                business.push(Push::to_session(session.as_str(), &b"sess"[..])),
            );
            let by_uid = by_uid.expect("uid push");
            assert_eq!(by_uid.accepted.len(), 1, "{did}: uid push {by_uid:?}");
            let by_did = by_did.expect("did push");
            assert_eq!(by_did.accepted.len(), 1, "{did}: did push {by_did:?}");
            assert!(by_did.offline.is_empty(), "{did}: did push {by_did:?}");
            let by_session = by_session.expect("session push");
            assert_eq!(by_session.members, Some(1), "{did}: {by_session:?}");
            assert_eq!(by_session.mode.as_deref(), Some("direct"));
            assert_eq!(by_session.accepted.len(), 1, "{did}: {by_session:?}");
            let mut seen = HashSet::new();
            while seen.len() < 3 {
                let (down, qos1, body) = next_down(&mut client).await;
                if qos1 {
                    client.send(&down_ack(down.seq)).await;
                }
                let which = match &body[..] {
                    b"uid" => 0,
                    b"did" => 1,
                    b"sess" => 2,
                    other => panic!("{did}: unexpected body {other:?}"),
                };
                if seen.insert(which) {
                    reached[which].fetch_add(1, Ordering::SeqCst);
                }
            }
        });
    }
    while let Some(done) = tasks.join_next().await {
        done?;
    }
    drop(hog);
    let figures: Vec<u64> = reached.iter().map(|r| r.load(Ordering::SeqCst)).collect();
    eprintln!("reached by uid / did / session: {figures:?} of 200");
    assert_eq!(figures, vec![200, 200, 200]);
    Ok(())
}

/// 11.4: the reply of a session push names its mode and size; a direct one also lists the
/// accepted members; an empty session accepts nothing.
#[tokio::test]
async fn s11_4_session_push_reply_shape() -> TestResult {
    let stack = Stack::start().await;
    let business = stack.business();
    let mut clients = Vec::new();
    for did in ["m1", "m2"] {
        let mut claims = claims(did);
        claims.sess = vec!["pair".into()];
        let mut client = stack.login_with(&claims, did).await;
        assert!(matches!(
            client.next_frame().await,
            Some(Frame::LoginAck(_))
        ));
        clients.push(client);
    }
    let reply = business.push(Push::to_session("pair", &b"hi"[..])).await?;
    assert_eq!(reply.mode.as_deref(), Some("direct"));
    assert_eq!(reply.members, Some(2));
    let mut dids: Vec<_> = reply.accepted.iter().map(|a| a.did.clone()).collect();
    dids.sort();
    assert_eq!(dids, vec!["m1", "m2"]);
    for client in &mut clients {
        let (down, _, body) = next_down(client).await;
        assert_eq!(down.session, "pair");
        assert_eq!(&body[..], b"hi");
    }
    let empty = business.push(Push::to_session("nobody", &b"?"[..])).await?;
    assert_eq!(empty.members, Some(0));
    assert!(empty.accepted.is_empty());
    Ok(())
}

/// Issue 14 item 1 for sessions: a session push the moment LOGIN_ACK arrives counts the
/// device (its token `sess` membership is registered before LOGIN_ACK), on a busy machine.
#[tokio::test]
async fn s6_1_session_push_right_after_login_ack_counts_the_member() -> TestResult {
    let stack = Stack::start().await;
    let business = stack.business();
    let hog = CpuHog::start(2);
    let mut missed = Vec::new();
    for round in 0..100 {
        let did = format!("joiner-{round}");
        let session = format!("fresh-{round}");
        let mut claims = claims(&did);
        claims.sess = vec![session.clone()];
        let mut client = stack.login_with(&claims, &did).await;
        assert!(matches!(
            client.next_frame().await,
            Some(Frame::LoginAck(_))
        ));
        let reply = business
            .push(Push::to_session(session.as_str(), &b"now"[..]))
            .await?;
        if reply.members != Some(1) {
            missed.push((round, reply.members));
        }
    }
    drop(hog);
    assert!(
        missed.is_empty(),
        "session pushes that missed the new member: {missed:?}"
    );
    Ok(())
}
