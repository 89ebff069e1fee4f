//! Shared fixtures of the end-to-end tests: a real nats-server, a gateway started
//! in-process on free ports, tokens, and a raw frame client over TCP or WebSocket.

#![allow(dead_code, missing_docs, clippy::unwrap_used)]

use std::net::SocketAddr;
use std::time::Duration;

use bytes::{Buf, BufMut, Bytes, BytesMut};
use tether_auth::TokenSigner;
use tether_gateway::{GatewayConfig, RunningGateway};
use tether_nats::NatsAuth;
use tether_nats::harness::{self, Single};
use tether_schemas::{Frame, RawFrame, limits, pb, split_frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_util::sync::CancellationToken;

pub type TestResult = Result<(), Box<dyn std::error::Error + Send + Sync>>;

/// How long a test waits for something that should happen at once.
pub const WAIT: Duration = Duration::from_secs(10);

pub const APP: &str = "demo";
pub const GW: &str = "gw-test";

/// A nats-server, a gateway and a token signer.
pub struct Fixture {
    pub nats: Single,
    pub nats_client: async_nats::Client,
    pub signer: TokenSigner,
    pub gateway: Option<RunningGateway>,
    pub tcp: SocketAddr,
    pub ws: SocketAddr,
    pub admin: SocketAddr,
    pub shutdown: CancellationToken,
    /// How the gateway, the fixture's client and the states of `stack::start_state`
    /// connect (anonymous on a plain node).
    pub nats_auth: NatsAuth,
    _key_dir: tempfile::TempDir,
}

impl Fixture {
    /// Starts everything; `tweak` adjusts the gateway config.
    pub async fn start(tweak: impl FnOnce(&mut GatewayConfig)) -> Self {
        let nats = harness::single().expect("nats-server");
        Self::start_on(nats, NatsAuth::default(), tweak).await
    }

    /// Starts a gateway on `nats` (e.g. `harness::single_with_accounts`); the gateway, the
    /// fixture's client and the states of `stack::start_state` connect with `auth` (e.g.
    /// `nats.system_auth()`); `tweak` adjusts the gateway config.
    pub async fn start_on(
        nats: Single,
        auth: NatsAuth,
        tweak: impl FnOnce(&mut GatewayConfig),
    ) -> Self {
        let nats_client = tether_nats::connect_with(&nats.client_url(), "test", &auth)
            .await
            .expect("connect");
        let signer = TokenSigner::generate();
        let key_dir = tempfile::tempdir().expect("tempdir");
        let public_key = key_dir.path().join("token.pub");
        std::fs::write(&public_key, signer.verifier().to_pem().expect("pem")).expect("write key");
        let mut config = GatewayConfig {
            id: GW.into(),
            nats_url: nats.client_url(),
            nats: auth.clone(),
            tcp_listen: Some("127.0.0.1:0".parse().expect("addr")),
            ws_listen: Some("127.0.0.1:0".parse().expect("addr")),
            admin_listen: "127.0.0.1:0".parse().expect("addr"),
            token_public_key: public_key,
            // Most tests run the gateway alone; those with state opt in (`registered`).
            await_registration: false,
            ..Default::default()
        };
        tweak(&mut config);
        let shutdown = CancellationToken::new();
        let gateway = tether_gateway::start(config, shutdown.clone())
            .await
            .expect("gateway starts");
        let (tcp, ws, admin) = (
            gateway.tcp_addr.expect("tcp"),
            gateway.ws_addr.expect("ws"),
            gateway.admin_addr,
        );
        Self {
            nats,
            nats_client,
            signer,
            gateway: Some(gateway),
            tcp,
            ws,
            admin,
            shutdown,
            nats_auth: auth,
            _key_dir: key_dir,
        }
    }

    /// A number field (`acked`, `event_seq`, ...) of the cursor state keeps for `did` in
    /// [`APP`]; 0 until a cursor is written.
    pub async fn cursor_field(&self, did: &str, field: &str) -> u64 {
        let js = async_nats::jetstream::new(self.nats_client.clone());
        let Ok(kv) = js.get_key_value(tether_nats::layout::ROUTES_BUCKET).await else {
            return 0;
        };
        let Ok(Some(value)) = kv.get(tether_nats::keys::cursor(APP, did)).await else {
            return 0;
        };
        serde_json::from_slice::<serde_json::Value>(&value)
            .ok()
            .and_then(|v| v[field].as_u64())
            .unwrap_or(0)
    }

    /// A token of `did` (user `u-<did>`) in `app`.
    pub fn token_for(&self, app: &str, did: &str) -> String {
        self.signer
            .issue(app, &format!("u-{did}"), did, Duration::from_secs(3600))
            .expect("token")
    }

    /// A LOGIN of `did` in `app`.
    pub fn login_frame_for(&self, app: &str, did: &str) -> Bytes {
        Frame::Login(pb::Login {
            token: self.token_for(app, did),
            did: did.into(),
            app: app.into(),
            ..Default::default()
        })
        .encode()
    }

    /// Connects over TCP and logs in as `did` of `app`; returns the client and its LOGIN_ACK.
    pub async fn login_as(&self, app: &str, did: &str) -> (RawClient, pb::LoginAck) {
        let mut client = RawClient::connect(Transport::Tcp, self.tcp).await;
        client.send(&self.login_frame_for(app, did)).await;
        match client.next_frame().await {
            Some(Frame::LoginAck(ack)) => (client, ack),
            other => panic!("{app}/{did}: expected LOGIN_ACK, got {other:?}"),
        }
    }

    pub fn token(&self, did: &str) -> String {
        self.signer
            .issue(APP, &format!("u-{did}"), did, Duration::from_secs(3600))
            .expect("token")
    }

    pub fn login_frame(&self, did: &str) -> Bytes {
        Frame::Login(pb::Login {
            token: self.token(did),
            did: did.into(),
            app: APP.into(),
            ..Default::default()
        })
        .encode()
    }

    /// Connects over `transport` and logs in as `did`; returns the client and its LOGIN_ACK.
    pub async fn login(&self, transport: Transport, did: &str) -> (RawClient, pb::LoginAck) {
        let mut client = RawClient::connect(transport, self.addr(transport)).await;
        client.send(&self.login_frame(did)).await;
        match client.next_frame().await {
            Some(Frame::LoginAck(ack)) => (client, ack),
            other => panic!("expected LOGIN_ACK, got {other:?}"),
        }
    }

    pub fn addr(&self, transport: Transport) -> SocketAddr {
        match transport {
            Transport::Tcp => self.tcp,
            Transport::Ws => self.ws,
        }
    }

    /// Publishes `frame` to `dids` through the gateway's downlink subject.
    pub async fn push(&self, dids: &[&str], frame: Bytes) {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert("Tether-App", APP);
        for did in dids {
            headers.append("Tether-Did", *did);
        }
        self.nats_client
            .publish_with_headers(tether_nats::subjects::gateway_down(GW), headers, frame)
            .await
            .expect("publish");
        self.nats_client.flush().await.expect("flush");
    }

    /// A gateway configuration like the fixture's (same NATS, same token key, free ports),
    /// for starting more gateways or restarting one.
    pub fn gateway_config(&self, id: &str) -> GatewayConfig {
        GatewayConfig {
            id: id.into(),
            nats_url: self.nats.client_url(),
            nats: self.nats_auth.clone(),
            tcp_listen: Some("127.0.0.1:0".parse().expect("addr")),
            ws_listen: Some("127.0.0.1:0".parse().expect("addr")),
            admin_listen: "127.0.0.1:0".parse().expect("addr"),
            token_public_key: self._key_dir.path().join("token.pub"),
            await_registration: false,
            ..Default::default()
        }
    }

    /// Stops the gateway gracefully and waits for it.
    pub async fn stop_gateway(&mut self) {
        self.shutdown.cancel();
        if let Some(gateway) = self.gateway.take() {
            gateway.wait().await;
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    Tcp,
    Ws,
}

/// A bare client that speaks frames, for testing the gateway without the SDK.
pub struct RawClient {
    stream: TcpStream,
    transport: Transport,
    input: BytesMut,
}

impl RawClient {
    pub async fn connect(transport: Transport, addr: SocketAddr) -> Self {
        let mut stream = TcpStream::connect(addr).await.expect("connect");
        let mut input = BytesMut::new();
        if transport == Transport::Ws {
            let request = format!(
                "GET /ws HTTP/1.1\r\nHost: {addr}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\
                 Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\nSec-WebSocket-Version: 13\r\n\r\n"
            );
            stream
                .write_all(request.as_bytes())
                .await
                .expect("handshake");
            loop {
                let n = tokio::time::timeout(WAIT, stream.read_buf(&mut input))
                    .await
                    .expect("handshake answer")
                    .expect("read");
                assert!(n > 0, "closed during handshake");
                if let Some(end) = input.windows(4).position(|w| w == b"\r\n\r\n") {
                    let head = String::from_utf8_lossy(&input[..end]).to_string();
                    assert!(head.starts_with("HTTP/1.1 101"), "upgrade refused: {head}");
                    input.advance(end + 4);
                    break;
                }
            }
        }
        Self {
            stream,
            transport,
            input,
        }
    }

    /// Connects without a handshake, to see whether anyone listens.
    pub async fn try_connect(addr: SocketAddr) -> std::io::Result<TcpStream> {
        TcpStream::connect(addr).await
    }

    /// Sends one frame (as one masked binary message on WebSocket).
    pub async fn send(&mut self, frame: &[u8]) {
        let bytes = match self.transport {
            Transport::Tcp => Bytes::copy_from_slice(frame),
            Transport::Ws => ws_masked(0x2, frame),
        };
        let _ = self.stream.write_all(&bytes).await;
    }

    /// Sends raw bytes, unframed.
    pub async fn send_raw(&mut self, bytes: &[u8]) {
        let _ = self.stream.write_all(bytes).await;
    }

    /// The next frame as raw bytes, or `None` when the server closed the connection.
    pub async fn next_raw(&mut self) -> Option<RawFrame> {
        loop {
            match self.transport {
                Transport::Tcp => {
                    if let Some(raw) = split_frame(&mut self.input, limits::MAX_FRAME_LEN_CAP)
                        .expect("valid frame")
                    {
                        return Some(raw);
                    }
                }
                Transport::Ws => {
                    if let Some((opcode, payload)) = ws_unmasked(&mut self.input) {
                        match opcode {
                            0x2 => {
                                return Some(
                                    RawFrame::from_bytes(payload, limits::MAX_FRAME_LEN_CAP)
                                        .expect("frame"),
                                );
                            }
                            0x8 => return None,
                            _ => continue,
                        }
                    }
                }
            }
            let n = tokio::time::timeout(WAIT, self.stream.read_buf(&mut self.input))
                .await
                .expect("frame in time");
            match n {
                Ok(0) | Err(_) => return None,
                Ok(_) => {}
            }
        }
    }

    pub async fn next_frame(&mut self) -> Option<Frame> {
        let raw = self.next_raw().await?;
        Some(Frame::decode(&raw).expect("decodable frame"))
    }

    /// Expects an ERROR frame with `code` and the CLOSE flag, then the end of the stream.
    pub async fn expect_close(&mut self, code: tether_schemas::ErrorCode) {
        match self.next_frame().await {
            Some(Frame::Error { error, close }) => {
                assert_eq!(
                    error.code,
                    u32::from(code.as_u16()),
                    "error code (text: {})",
                    error.text
                );
                assert!(close, "CLOSE flag");
            }
            other => panic!("expected ERROR {code}, got {other:?}"),
        }
        assert!(
            self.next_frame().await.is_none(),
            "connection closed after the error"
        );
    }
}

fn ws_masked(opcode: u8, payload: &[u8]) -> Bytes {
    let mut out = BytesMut::with_capacity(payload.len() + 14);
    out.put_u8(0x80 | opcode);
    let len = payload.len();
    if len < 126 {
        out.put_u8(0x80 | len as u8);
    } else if len <= 0xFFFF {
        out.put_u8(0x80 | 126);
        out.put_u16(len as u16);
    } else {
        out.put_u8(0x80 | 127);
        out.put_u64(len as u64);
    }
    let mask = [0x11u8, 0x22, 0x33, 0x44];
    out.put_slice(&mask);
    out.extend(payload.iter().enumerate().map(|(i, b)| b ^ mask[i % 4]));
    out.freeze()
}

fn ws_unmasked(input: &mut BytesMut) -> Option<(u8, Bytes)> {
    if input.len() < 2 {
        return None;
    }
    let opcode = input[0] & 0x0F;
    let (len, header) = match input[1] & 0x7F {
        126 if input.len() >= 4 => (u16::from_be_bytes([input[2], input[3]]) as usize, 4),
        127 if input.len() >= 10 => (
            u64::from_be_bytes(input[2..10].try_into().ok()?) as usize,
            10,
        ),
        126 | 127 => return None,
        n => (n as usize, 2),
    };
    if input.len() < header + len {
        return None;
    }
    input.advance(header);
    Some((opcode, input.split_to(len).freeze()))
}

/// Reads the next `count` messages of `stream_name` filtered by `subject`.
pub async fn read_stream(
    nats: &async_nats::Client,
    stream_name: &str,
    subject: &str,
    count: usize,
) -> Vec<async_nats::jetstream::Message> {
    use futures::StreamExt;
    let js = async_nats::jetstream::new(nats.clone());
    let stream = js.get_stream(stream_name).await.expect("stream");
    let consumer = stream
        .create_consumer(async_nats::jetstream::consumer::pull::Config {
            filter_subject: subject.into(),
            ..Default::default()
        })
        .await
        .expect("consumer");
    let mut messages = consumer.messages().await.expect("messages");
    let mut found = Vec::new();
    while found.len() < count {
        let message = tokio::time::timeout(WAIT, messages.next())
            .await
            .expect("stream message in time");
        found.push(message.expect("some").expect("ok"));
    }
    found
}

pub mod python;
pub mod stack;

/// `GET path` on an HTTP/1.0 server (the admin endpoints); the whole response, head
/// included.
pub async fn http_get(addr: SocketAddr, path: &str) -> String {
    let mut stream = TcpStream::connect(addr).await.expect("admin");
    let request = format!("GET {path} HTTP/1.0\r\nHost: {addr}\r\n\r\n");
    stream.write_all(request.as_bytes()).await.expect("request");
    let mut body = String::new();
    stream.read_to_string(&mut body).await.expect("response");
    body
}
