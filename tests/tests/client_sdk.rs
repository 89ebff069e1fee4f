//! The device SDK (`tether-client`) against real gateways on a real nats-server.
//!
//! There is no state service here, so each test plays it where needed: it reads UPs from
//! the uplink stream and answers with UP_ACK frames, and pushes DOWN, REDIRECT frames on
//! the gateway's downlink subject. Only generous timeouts guard against hangs; no test
//! depends on how fast anything happens.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::StreamMessage};
use bytes::Bytes;
use futures::StreamExt;
use tether_auth::TokenSigner;
use tether_client::{
    Client, ClientConfig, ClientError, Endpoint, ErrorCode, Event, TokenSource, UpAck,
};
use tether_gateway::shutdown::Shutdown;
use tether_gateway::{GatewayConfig, RunningGateway};
use tether_nats::harness;
use tether_nats::{headers, subjects};
use tether_schemas::{Frame, RawFrame, limits, pb};
use tokio::sync::mpsc::Receiver;
use tokio::task::JoinHandle;

type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;
type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

const APP: &str = "chat";
const GW: &str = "gw-test";
/// Upper bound for anything to happen; only there so a broken build fails instead of hanging.
const WAIT: Duration = Duration::from_secs(20);

/// One nats-server, a token key pair and a NATS client for the test's own part.
struct Bus {
    node: harness::Single,
    nats: async_nats::Client,
    signer: TokenSigner,
    public_key: tempfile::NamedTempFile,
}

/// A gateway started in-process, with its stop signal.
struct Gateway {
    id: String,
    running: RunningGateway,
    shutdown: Shutdown,
}

impl Gateway {
    fn tcp(&self) -> Res<Endpoint> {
        Ok(Endpoint::tcp(
            self.running.tcp_addr.ok_or("no tcp listener")?,
        ))
    }

    fn ws(&self) -> Res<Endpoint> {
        Ok(Endpoint::ws(self.running.ws_addr.ok_or("no ws listener")?))
    }

    /// Stops the gateway (clients get `going_away`) and waits until it is gone.
    async fn stop(self) {
        self.shutdown.cancel();
        let _ = tokio::time::timeout(WAIT, self.running.wait()).await;
    }
}

impl Bus {
    async fn start() -> Res<Bus> {
        let node = harness::single()?;
        let nats = tether_nats::connect(&node.client_url(), "client-sdk-test").await?;
        let signer = TokenSigner::generate();
        let public_key = tempfile::NamedTempFile::new()?;
        std::fs::write(public_key.path(), signer.verifier().to_pem()?)?;
        Ok(Bus {
            node,
            nats,
            signer,
            public_key,
        })
    }

    fn token(&self, did: &str) -> Res<String> {
        Ok(self
            .signer
            .issue(APP, "user-1", did, Duration::from_secs(600))?)
    }

    /// Gateway `id`'s configuration for loopback ports (`tcp` port 0 = any free port).
    fn gateway_config(&self, id: &str, tcp: SocketAddr) -> GatewayConfig {
        GatewayConfig {
            id: id.into(),
            nats_url: self.node.client_url(),
            tcp_listen: Some(tcp),
            ws_listen: Some(loopback(0)),
            admin_listen: loopback(0),
            token_public_key: self.public_key.path().to_path_buf(),
            heartbeat_secs: 1,
            going_away_retry_ms: 200,
            // No state here: the test plays it, and does not register logins.
            await_registration: false,
            ..Default::default()
        }
    }

    /// Starts gateway `id` on loopback ports (`tcp` port 0 = any free port).
    async fn gateway(&self, id: &str, tcp: SocketAddr) -> Res<Gateway> {
        self.start_gateway(self.gateway_config(id, tcp)).await
    }

    /// Starts a gateway and waits until nats-server knows its downlink subscription:
    /// `start` returns once the SUB is queued, not once the server has it, and a
    /// downlink published in between would be lost.
    async fn start_gateway(&self, config: GatewayConfig) -> Res<Gateway> {
        let id = config.id.clone();
        let before = self.down_subscribers(&id).await?;
        let shutdown = Shutdown::new();
        let running = tether_gateway::start(config, shutdown.clone()).await?;
        within(async {
            while self
                .down_subscribers(&id)
                .await?
                .iter()
                .all(|cid| before.contains(cid))
            {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
            Ok(())
        })
        .await?;
        Ok(Gateway {
            id,
            running,
            shutdown,
        })
    }

    /// Ids of the NATS connections subscribed to gateway `gw`'s downlink subject
    /// (from the server's monitoring endpoint, `/connz?subs=1`).
    async fn down_subscribers(&self, gw: &str) -> Res<Vec<u64>> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let monitor = self.node.server.monitor_url();
        let addr = monitor.trim_start_matches("http://");
        let mut http = tokio::net::TcpStream::connect(addr).await?;
        http.write_all(b"GET /connz?subs=1 HTTP/1.0\r\n\r\n")
            .await?;
        let mut answer = String::new();
        http.read_to_string(&mut answer).await?;
        let body = answer.split_once("\r\n\r\n").map_or("", |(_, body)| body);
        let connz: serde_json::Value = serde_json::from_str(body)?;
        let subject = subjects::gateway_all(gw);
        let connections = connz["connections"].as_array().cloned().unwrap_or_default();
        Ok(connections
            .iter()
            .filter(|c| {
                c["subscriptions_list"]
                    .as_array()
                    .is_some_and(|subs| subs.iter().any(|s| s.as_str() == Some(subject.as_str())))
            })
            .filter_map(|c| c["cid"].as_u64())
            .collect())
    }

    /// A client config for `did` at `endpoint`, with ids starting at 100.
    fn config(&self, endpoint: Endpoint, did: &str) -> Res<ClientConfig> {
        let mut config = ClientConfig::new(vec![endpoint], APP, did, self.token(did)?);
        config.first_msg_id = Some(100);
        Ok(config)
    }

    /// Publishes a complete frame on gateway `gw`'s downlink subject, addressed to `did`.
    async fn push(&self, gw: &str, did: &str, frame: &Frame) -> Res<()> {
        let mut map = HeaderMap::new();
        map.insert(headers::APP, APP);
        map.insert(headers::DID, did);
        self.nats
            .publish_with_headers(subjects::gateway_down(gw), map, frame.encode())
            .await?;
        self.nats.flush().await?;
        Ok(())
    }

    async fn push_down(
        &self,
        gw: &str,
        did: &str,
        seq: u64,
        qos1: bool,
        body: &'static str,
    ) -> Res<()> {
        let header = pb::Down {
            seq,
            ..Default::default()
        };
        self.push(
            gw,
            did,
            &Frame::Down {
                header,
                qos1,
                body: Bytes::from_static(body.as_bytes()),
            },
        )
        .await
    }

    async fn ack_up(
        &self,
        gw: &str,
        did: &str,
        client_msg_id: u64,
        code: ErrorCode,
        message: &str,
    ) -> Res<()> {
        let ack = pb::UpAck {
            client_msg_id,
            code: code.into(),
            message: message.into(),
            server_msg_id: format!("m-{client_msg_id}"),
        };
        self.push(gw, did, &Frame::UpAck(ack)).await
    }

    /// Waits until the uplink stream's last message for `did` is the UP with `client_msg_id`.
    async fn stored_up(&self, did: &str, client_msg_id: u64) -> Res<StreamMessage> {
        let stream = jetstream::new(self.nats.clone())
            .get_stream(tether_nats::layout::UPLINK_STREAM)
            .await?;
        let want = format!("{APP}:{did}:{client_msg_id}");
        let subject = subjects::uplink(APP, did);
        within(async {
            loop {
                if let Ok(message) = stream.get_last_raw_message_by_subject(&subject).await
                    && message.headers.get(headers::MSG_ID).map(|v| v.as_str())
                        == Some(want.as_str())
                {
                    return Ok(message);
                }
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
        .await
    }

    /// Messages in the uplink stream.
    async fn uplink_count(&self) -> Res<u64> {
        let mut stream = jetstream::new(self.nats.clone())
            .get_stream(tether_nats::layout::UPLINK_STREAM)
            .await?;
        Ok(stream.info().await?.state.messages)
    }
}

fn loopback(port: u16) -> SocketAddr {
    SocketAddr::from(([127, 0, 0, 1], port))
}

/// Runs `f` under the generous timeout; a timeout names the line that waited.
#[track_caller]
fn within<T, F: Future<Output = Res<T>>>(f: F) -> impl Future<Output = Res<T>> {
    let at = std::panic::Location::caller();
    async move {
        tokio::time::timeout(WAIT, f)
            .await
            .map_err(|_| format!("timed out waiting at line {}", at.line()))?
    }
}

/// The next event; an error if the channel closed or nothing came.
async fn next_event(events: &mut Receiver<Event>) -> Res<Event> {
    within(async {
        events
            .recv()
            .await
            .ok_or_else(|| "event channel closed".into())
    })
    .await
}

/// Skips events until `Connected`, returning its gateway id.
async fn connected(events: &mut Receiver<Event>) -> Res<String> {
    loop {
        if let Event::Connected { gateway, .. } = next_event(events).await? {
            return Ok(gateway);
        }
    }
}

/// Skips events until a message, returning its seq, QoS1 flag and body.
async fn next_message(events: &mut Receiver<Event>) -> Res<(u64, bool, String)> {
    loop {
        match next_event(events).await? {
            Event::Message {
                seq, qos1, body, ..
            } => {
                return Ok((seq, qos1, String::from_utf8_lossy(&body).into_owned()));
            }
            Event::Disconnected { reason, .. } => {
                return Err(format!("unexpected disconnect: {reason}").into());
            }
            _ => {}
        }
    }
}

/// Decodes an UP frame from a NATS payload.
fn decode_up(payload: &Bytes) -> Res<(pb::Up, Bytes)> {
    match Frame::decode(&RawFrame::from_bytes(
        payload.clone(),
        limits::MAX_FRAME_LEN_CAP,
    )?)? {
        Frame::Up { header, body } => Ok((header, body)),
        other => Err(format!("expected UP, got {}", other.frame_type()).into()),
    }
}

fn spawn_send(client: &Client, body: &'static str) -> JoinHandle<Result<UpAck, ClientError>> {
    tokio::spawn(client.send(Bytes::from_static(body.as_bytes())))
}

async fn login_over(ws: bool) -> TestResult {
    let bus = Bus::start().await?;
    let gw = bus.gateway(GW, loopback(0)).await?;
    let endpoint = if ws { gw.ws()? } else { gw.tcp()? };
    let (client, mut events) = Client::connect(bus.config(endpoint.clone(), "dev-1")?).await?;
    match next_event(&mut events).await? {
        Event::Connected {
            gateway,
            conn_id,
            endpoint: at,
        } => {
            assert_eq!(gateway, GW);
            assert_ne!(conn_id, 0);
            assert_eq!(at, endpoint.to_string());
        }
        other => return Err(format!("expected Connected first, got {other:?}").into()),
    }
    within(async {
        while gw.running.sessions() != 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    })
    .await?;
    client.close().await;
    match next_event(&mut events).await? {
        Event::Disconnected {
            reconnecting: false,
            ..
        } => {}
        other => return Err(format!("expected the final Disconnected, got {other:?}").into()),
    }
    assert!(
        events.recv().await.is_none(),
        "the event channel ends after close"
    );
    assert!(matches!(
        client.send("late").await,
        Err(ClientError::Closed)
    ));
    gw.stop().await;
    Ok(())
}

#[tokio::test]
async fn login_over_tcp() -> TestResult {
    login_over(false).await
}

#[tokio::test]
async fn login_over_websocket() -> TestResult {
    login_over(true).await
}

#[tokio::test]
async fn refused_tokens_are_typed_and_refreshed_once() -> TestResult {
    let bus = Bus::start().await?;
    let gw = bus.gateway(GW, loopback(0)).await?;
    // A static bad token: the login error comes back typed.
    let config = ClientConfig::new(vec![gw.tcp()?], APP, "dev-1", "not-a-token");
    match Client::connect(config).await {
        Err(ClientError::Login { code, .. }) => assert_eq!(code, ErrorCode::BadToken),
        other => return Err(format!("expected a bad_token login error, got {other:?}").into()),
    }
    // A provider whose first token is refused: asked once more, then the login succeeds.
    let calls = Arc::new(AtomicUsize::new(0));
    let good = bus.token("dev-1")?;
    let counter = calls.clone();
    let provider = TokenSource::provider(move || {
        let n = counter.fetch_add(1, Ordering::SeqCst);
        let token = if n == 0 {
            "stale".to_string()
        } else {
            good.clone()
        };
        async move { Ok(token) }
    });
    let config = ClientConfig::new(vec![gw.tcp()?], APP, "dev-1", provider);
    let (client, mut events) = Client::connect(config).await?;
    assert_eq!(connected(&mut events).await?, GW);
    assert_eq!(calls.load(Ordering::SeqCst), 2);
    // A provider that never gives a good token: one refresh, then give up.
    let config = ClientConfig::new(
        vec![gw.tcp()?],
        APP,
        "dev-2",
        TokenSource::provider(|| async { Ok("bad".to_string()) }),
    );
    assert!(matches!(
        Client::connect(config).await,
        Err(ClientError::Login {
            code: ErrorCode::BadToken,
            ..
        })
    ));
    client.close().await;
    gw.stop().await;
    Ok(())
}

async fn send_over(ws: bool) -> TestResult {
    let bus = Bus::start().await?;
    let gw = bus.gateway(GW, loopback(0)).await?;
    let endpoint = if ws { gw.ws()? } else { gw.tcp()? };
    let (client, mut events) = Client::connect(bus.config(endpoint, "dev-1")?).await?;
    connected(&mut events).await?;

    let sent = spawn_send(&client, "hello world");
    let stored = bus.stored_up("dev-1", 100).await?;
    assert_eq!(
        stored.headers.get(headers::GATEWAY).map(|v| v.as_str()),
        Some(GW)
    );
    let (up, body) = decode_up(&stored.payload)?;
    assert_eq!(up.client_msg_id, 100);
    assert_eq!(
        &body[..],
        b"hello world",
        "the body reaches the stream intact"
    );
    bus.ack_up(GW, "dev-1", 100, ErrorCode::Ok, "").await?;
    let receipt = within(async { Ok(sent.await?) }).await??;
    assert_eq!(
        receipt,
        UpAck {
            client_msg_id: 100,
            server_msg_id: "m-100".into()
        }
    );

    // A refusal from the business service comes back as a typed rejection.
    let sent = tokio::spawn(client.send_with("s-42", Bytes::from_static(b"spam")));
    let stored = bus.stored_up("dev-1", 101).await?;
    assert_eq!(decode_up(&stored.payload)?.0.session, "s-42");
    bus.ack_up(GW, "dev-1", 101, ErrorCode::Rejected, "muted")
        .await?;
    match within(async { Ok(sent.await?) }).await? {
        Err(ClientError::Rejected(code, message)) => {
            assert_eq!(code, ErrorCode::Rejected);
            assert_eq!(message, "muted");
        }
        other => return Err(format!("expected a rejection, got {other:?}").into()),
    }
    client.close().await;
    gw.stop().await;
    Ok(())
}

#[tokio::test]
async fn send_is_stored_and_acked_over_tcp() -> TestResult {
    send_over(false).await
}

#[tokio::test]
async fn send_is_stored_and_acked_over_websocket() -> TestResult {
    send_over(true).await
}

#[tokio::test]
async fn send_without_up_ack_times_out() -> TestResult {
    let bus = Bus::start().await?;
    let gw = bus.gateway(GW, loopback(0)).await?;
    let mut config = bus.config(gw.tcp()?, "dev-1")?;
    config.ack_timeout = Duration::from_millis(500);
    let (client, mut events) = Client::connect(config).await?;
    connected(&mut events).await?;
    let result = within(async { Ok(client.send("nobody acks this").await) }).await?;
    assert!(
        matches!(result, Err(ClientError::Timeout)),
        "got {result:?}"
    );
    // It was stored all the same: a timeout means "unknown", never "failed".
    bus.stored_up("dev-1", 100).await?;
    // A late UP_ACK for it is ignored, and the next send still works.
    bus.ack_up(GW, "dev-1", 100, ErrorCode::Ok, "").await?;
    let sent = spawn_send(&client, "second");
    bus.stored_up("dev-1", 101).await?;
    bus.ack_up(GW, "dev-1", 101, ErrorCode::Ok, "").await?;
    assert_eq!(within(async { Ok(sent.await?) }).await??.client_msg_id, 101);
    client.close().await;
    gw.stop().await;
    Ok(())
}

async fn qos1_over(ws: bool) -> TestResult {
    let bus = Bus::start().await?;
    let gw = bus.gateway(GW, loopback(0)).await?;
    let mut acks = bus.nats.subscribe(subjects::ack(APP, "dev-1")).await?;
    bus.nats.flush().await?;
    let endpoint = if ws { gw.ws()? } else { gw.tcp()? };
    let (client, mut events) = Client::connect(bus.config(endpoint, "dev-1")?).await?;
    connected(&mut events).await?;

    // Duplicates and an out-of-order pair, then a QoS0 marker.
    for (seq, body) in [
        (1, "one"),
        (2, "two"),
        (2, "two"),
        (3, "three"),
        (1, "one"),
        (5, "five"),
        (4, "four"),
    ] {
        bus.push_down(GW, "dev-1", seq, true, body).await?;
    }
    bus.push_down(GW, "dev-1", 0, false, "marker").await?;
    let mut got = Vec::new();
    loop {
        let (seq, qos1, body) = next_message(&mut events).await?;
        if body == "marker" {
            assert!(!qos1);
            assert_eq!(seq, 0);
            break;
        }
        assert!(qos1);
        got.push((seq, body));
    }
    let want: Vec<(u64, String)> = [
        (1, "one"),
        (2, "two"),
        (3, "three"),
        (4, "four"),
        (5, "five"),
    ]
    .map(|(s, b)| (s, b.to_string()))
    .into();
    assert_eq!(got, want, "each QoS1 message once, in seq order");

    // Cumulative DOWN_ACKs reach the bus; they never go past what was delivered.
    let mut highest = 0;
    while highest < 5 {
        let message = within(async {
            acks.next()
                .await
                .ok_or_else(|| "ack subscription ended".into())
        })
        .await?;
        let Frame::DownAck(ack) = Frame::decode(&RawFrame::from_bytes(
            message.payload,
            limits::MAX_FRAME_LEN_CAP,
        )?)?
        else {
            return Err("expected DOWN_ACK on the ack subject".into());
        };
        assert!(
            ack.seq <= 5,
            "ack {} covers a message never delivered",
            ack.seq
        );
        assert!(ack.seq >= highest, "acks are cumulative");
        highest = ack.seq;
    }
    client.close().await;
    gw.stop().await;
    Ok(())
}

#[tokio::test]
async fn qos1_downlinks_once_in_order_with_cumulative_ack_over_tcp() -> TestResult {
    qos1_over(false).await
}

#[tokio::test]
async fn qos1_downlinks_once_in_order_with_cumulative_ack_over_websocket() -> TestResult {
    qos1_over(true).await
}

#[tokio::test]
async fn replaced_connection_stops_without_reconnecting() -> TestResult {
    let bus = Bus::start().await?;
    let gw = bus.gateway(GW, loopback(0)).await?;
    let (first, mut first_events) = Client::connect(bus.config(gw.tcp()?, "dev-1")?).await?;
    connected(&mut first_events).await?;
    // The same device logs in again from elsewhere.
    let (second, mut second_events) = Client::connect(bus.config(gw.ws()?, "dev-1")?).await?;
    connected(&mut second_events).await?;

    let mut saw_replaced = false;
    while let Some(event) = within(async { Ok(first_events.recv().await) }).await? {
        match event {
            Event::Disconnected {
                code, reconnecting, ..
            } => {
                assert_eq!(code, Some(ErrorCode::Replaced));
                assert!(!reconnecting, "a replaced client must not reconnect");
                saw_replaced = true;
            }
            Event::Connected { .. } => return Err("the replaced client reconnected".into()),
            _ => {}
        }
    }
    assert!(saw_replaced, "the first client is told it was replaced");
    assert!(first.is_closed());
    assert!(matches!(first.send("x").await, Err(ClientError::Closed)));
    // The newer connection is the one that stays and receives.
    bus.push_down(GW, "dev-1", 1, true, "for the new one")
        .await?;
    assert_eq!(
        next_message(&mut second_events).await?,
        (1, true, "for the new one".into())
    );
    assert_eq!(gw.running.sessions(), 1);
    second.close().await;
    gw.stop().await;
    Ok(())
}

#[tokio::test]
async fn reconnects_after_gateway_restart_and_resends_unacked_up() -> TestResult {
    let bus = Bus::start().await?;
    let gw = bus.gateway(GW, loopback(0)).await?;
    let tcp_addr = gw.running.tcp_addr.ok_or("no tcp listener")?;
    let mut uplinks = bus.nats.subscribe(subjects::uplink(APP, "dev-1")).await?;
    bus.nats.flush().await?;
    let (client, mut events) = Client::connect(bus.config(gw.tcp()?, "dev-1")?).await?;
    connected(&mut events).await?;
    bus.push_down(GW, "dev-1", 1, true, "before").await?;
    assert_eq!(next_message(&mut events).await?.0, 1);

    // An UP reaches the stream, but nobody acks it before the gateway goes away.
    let sent = spawn_send(&client, "in flight");
    bus.stored_up("dev-1", 100).await?;
    gw.stop().await;
    match next_event(&mut events).await? {
        Event::Disconnected {
            code, reconnecting, ..
        } => {
            assert_eq!(code, Some(ErrorCode::GoingAway));
            assert!(reconnecting);
        }
        other => return Err(format!("expected a disconnect, got {other:?}").into()),
    }

    // A new gateway process on the same port: the client comes back by itself.
    let gw = within(async {
        loop {
            match bus.gateway(GW, tcp_addr).await {
                Ok(gw) => return Ok(gw),
                Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
            }
        }
    })
    .await?;
    assert_eq!(connected(&mut events).await?, GW);

    // The unacked UP was sent again with the same client_msg_id; the stream kept one copy
    // under that id. No state answers the gateway's receipt question here, so the gateway
    // stores the resend once more under a retry id, to be processed again (PROTOCOL 6.3).
    let mut copies = 0;
    while copies < 3 {
        let message = within(async {
            uplinks
                .next()
                .await
                .ok_or_else(|| "uplink subscription ended".into())
        })
        .await?;
        let (up, body) = decode_up(&message.payload)?;
        assert_eq!((up.client_msg_id, &body[..]), (100, &b"in flight"[..]));
        copies += 1;
    }
    assert_eq!(
        bus.uplink_count().await?,
        2,
        "the resend is de-duplicated by app:did:client_msg_id, then stored under a retry id"
    );
    bus.ack_up(GW, "dev-1", 100, ErrorCode::Ok, "").await?;
    assert_eq!(within(async { Ok(sent.await?) }).await??.client_msg_id, 100);

    // Downlink continues after the resume point: a resent seq 1 is dropped, seq 2 delivered.
    bus.push_down(GW, "dev-1", 1, true, "before").await?;
    bus.push_down(GW, "dev-1", 2, true, "after").await?;
    assert_eq!(next_message(&mut events).await?, (2, true, "after".into()));
    client.close().await;
    gw.stop().await;
    Ok(())
}

#[tokio::test]
async fn redirect_moves_the_client_to_the_new_gateway() -> TestResult {
    let bus = Bus::start().await?;
    let old = bus.gateway(GW, loopback(0)).await?;
    let new = bus.gateway("gw-2", loopback(0)).await?;
    let (client, mut events) = Client::connect(bus.config(old.ws()?, "dev-1")?).await?;
    assert_eq!(connected(&mut events).await?, GW);

    let redirect = pb::Redirect {
        endpoint: new.running.tcp_addr.ok_or("no tcp listener")?.to_string(),
        token: bus.token("dev-1")?,
        reason: "migrate".into(),
    };
    bus.push(&old.id, "dev-1", &Frame::Redirect(redirect))
        .await?;
    assert_eq!(connected(&mut events).await?, "gw-2");
    within(async {
        while old.running.sessions() != 0 || new.running.sessions() != 1 {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(())
    })
    .await?;
    bus.push_down(&new.id, "dev-1", 1, true, "via gw-2").await?;
    assert_eq!(
        next_message(&mut events).await?,
        (1, true, "via gw-2".into())
    );
    client.close().await;
    old.stop().await;
    new.stop().await;
    Ok(())
}

#[tokio::test]
async fn heartbeats_keep_an_idle_connection_open() -> TestResult {
    let bus = Bus::start().await?;
    // The gateway drops connections silent for 2 s; the client pings every 1 s.
    let config = GatewayConfig {
        idle_timeout_secs: 2,
        ..bus.gateway_config(GW, loopback(0))
    };
    let gw = bus.start_gateway(config).await?;
    let (client, mut events) = Client::connect(bus.config(gw.tcp()?, "dev-1")?).await?;
    connected(&mut events).await?;
    // Stay idle for several idle timeouts.
    tokio::time::sleep(Duration::from_secs(5)).await;
    while let Ok(event) = events.try_recv() {
        assert!(
            !matches!(event, Event::Disconnected { .. }),
            "idle connection dropped: {event:?}"
        );
    }
    bus.push_down(GW, "dev-1", 0, false, "still here").await?;
    assert_eq!(
        next_message(&mut events).await?,
        (0, false, "still here".into())
    );
    client.close().await;
    gw.stop().await;
    Ok(())
}

#[tokio::test]
async fn interactive_mode_sends_lines_and_prints_messages() -> TestResult {
    let bus = Bus::start().await?;
    let gw = bus.gateway(GW, loopback(0)).await?;
    let args = tether_client::interactive::InteractiveArgs {
        endpoint: gw.running.tcp_addr.ok_or("no tcp listener")?.to_string(),
        app: APP.into(),
        did: "dev-1".into(),
        token: bus.token("dev-1")?,
    };
    let (stdin_writer, stdin) = tokio::io::duplex(1024);
    let (stdout, stdout_reader) = tokio::io::duplex(1024);
    let run = tokio::spawn(tether_client::interactive::run(
        args,
        tokio::io::BufReader::new(stdin),
        stdout,
    ));
    let mut output = tokio::io::AsyncBufReadExt::lines(tokio::io::BufReader::new(stdout_reader));
    assert_eq!(
        next_line(&mut output).await?,
        format!("connected to {GW} as dev-1")
    );

    let mut stdin_writer = stdin_writer;
    tokio::io::AsyncWriteExt::write_all(&mut stdin_writer, b"hi from stdin\n").await?;
    let stored = bus.stored_up("dev-1", decode_first_id(&bus).await?).await?;
    let (up, body) = decode_up(&stored.payload)?;
    assert_eq!(&body[..], b"hi from stdin");
    bus.ack_up(GW, "dev-1", up.client_msg_id, ErrorCode::Ok, "")
        .await?;
    assert_eq!(
        next_line(&mut output).await?,
        format!("stored m-{}", up.client_msg_id)
    );

    bus.push_down(GW, "dev-1", 1, true, "hello device").await?;
    assert_eq!(next_line(&mut output).await?, "<- [seq 1] hello device");
    drop(stdin_writer);
    within(async { Ok(run.await?) }).await??;
    gw.stop().await;
    Ok(())
}

/// The next line the interactive client printed.
async fn next_line(
    output: &mut tokio::io::Lines<tokio::io::BufReader<tokio::io::DuplexStream>>,
) -> Res<String> {
    within(async {
        output
            .next_line()
            .await?
            .ok_or_else(|| "output ended".into())
    })
    .await
}

/// The client_msg_id of the only UP in the stream for dev-1 (interactive mode picks its own).
async fn decode_first_id(bus: &Bus) -> Res<u64> {
    let stream = jetstream::new(bus.nats.clone())
        .get_stream(tether_nats::layout::UPLINK_STREAM)
        .await?;
    let subject = subjects::uplink(APP, "dev-1");
    within(async {
        loop {
            if let Ok(message) = stream.get_last_raw_message_by_subject(&subject).await {
                return Ok(decode_up(&message.payload)?.0.client_msg_id);
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    })
    .await
}
