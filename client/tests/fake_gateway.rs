//! The SDK against a scripted fake gateway on a loopback socket: behaviour a real gateway
//! does not show on demand (silence, exact resume points, resends on a new connection).

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use tether_client::{Client, ClientConfig, ClientError, Endpoint, Event};
use tether_schemas::{Frame, limits, pb, split_frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::mpsc::Receiver;

type Res<T> = Result<T, Box<dyn std::error::Error + Send + Sync>>;

/// Only there so that a broken client fails instead of hanging.
const WAIT: Duration = Duration::from_secs(20);

/// One accepted connection, speaking frames.
struct FakeConn {
    stream: TcpStream,
    buf: BytesMut,
}

impl FakeConn {
    async fn accept(listener: &TcpListener) -> Res<FakeConn> {
        let (stream, _) = tokio::time::timeout(WAIT, listener.accept()).await??;
        Ok(FakeConn {
            stream,
            buf: BytesMut::new(),
        })
    }

    async fn read(&mut self) -> Res<Frame> {
        tokio::time::timeout(WAIT, async {
            loop {
                if let Some(raw) = split_frame(&mut self.buf, limits::DEFAULT_MAX_FRAME_LEN)? {
                    return Ok(Frame::decode(&raw)?);
                }
                if self.stream.read_buf(&mut self.buf).await? == 0 {
                    return Err("client closed".into());
                }
            }
        })
        .await?
    }

    async fn write(&mut self, frame: Frame) -> Res<()> {
        self.stream.write_all(&frame.encode()).await?;
        Ok(())
    }

    /// Reads the LOGIN and accepts it with a 1 s heartbeat.
    async fn login(&mut self, conn_id: u64) -> Res<pb::Login> {
        let Frame::Login(login) = self.read().await? else {
            return Err("first frame is not LOGIN".into());
        };
        let ack = pb::LoginAck {
            conn_id,
            gateway: "fake".into(),
            heartbeat_secs: 1,
            ..Default::default()
        };
        self.write(Frame::LoginAck(ack)).await?;
        Ok(login)
    }
}

fn down(seq: u64, body: &'static str) -> Frame {
    Frame::Down {
        header: pb::Down {
            seq,
            ..Default::default()
        },
        qos1: true,
        body: Bytes::from_static(body.as_bytes()),
    }
}

async fn next_event(events: &mut Receiver<Event>) -> Res<Event> {
    tokio::time::timeout(WAIT, events.recv())
        .await?
        .ok_or_else(|| "event channel closed".into())
}

#[tokio::test]
async fn silent_gateway_is_left_and_the_client_resumes_elsewhere() -> Res<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let mut config = ClientConfig::new(
        vec![Endpoint::tcp(listener.local_addr()?)],
        "app",
        "dev",
        "tok",
    );
    config.first_msg_id = Some(7);
    let connecting = tokio::spawn(Client::connect(config));

    let mut first = FakeConn::accept(&listener).await?;
    let login = first.login(1).await?;
    assert_eq!(
        (login.did.as_str(), login.app.as_str(), login.resume_seq),
        ("dev", "app", 0)
    );
    let (client, mut events) = connecting.await??;
    assert!(matches!(
        next_event(&mut events).await?,
        Event::Connected { conn_id: 1, .. }
    ));

    first.write(down(1, "a")).await?;
    first.write(down(2, "b")).await?;
    let sent = tokio::spawn(client.send("up"));
    // The fake sees the UP, the cumulative ack and heartbeats, and answers nothing.
    let (mut up_id, mut acked, mut pinged) = (None, 0, false);
    while up_id.is_none() || acked < 2 || !pinged {
        match first.read().await? {
            Frame::Up { header, body } => {
                assert_eq!(&body[..], b"up");
                up_id = Some(header.client_msg_id);
            }
            Frame::DownAck(ack) => acked = ack.seq,
            Frame::Ping(_) => pinged = true,
            other => return Err(format!("unexpected {other:?}").into()),
        }
    }
    assert_eq!(up_id, Some(7));
    for want in [1, 2] {
        match next_event(&mut events).await? {
            Event::Message { seq, .. } => assert_eq!(seq, want),
            other => return Err(format!("expected message {want}, got {other:?}").into()),
        }
    }
    // No PONG ever comes: the client gives up on this connection and logs in again,
    // resuming after seq 2 and resending the unacknowledged UP with the same id.
    let mut second = FakeConn::accept(&listener).await?;
    match next_event(&mut events).await? {
        Event::Disconnected {
            code: None,
            reconnecting: true,
            ..
        } => {}
        other => return Err(format!("expected a reconnecting disconnect, got {other:?}").into()),
    }
    let login = second.login(2).await?;
    assert_eq!(login.resume_seq, 2);
    assert!(matches!(
        next_event(&mut events).await?,
        Event::Connected { conn_id: 2, .. }
    ));
    let Frame::Up { header, .. } = second.read().await? else {
        return Err("expected the resent UP".into());
    };
    assert_eq!(header.client_msg_id, 7);
    second
        .write(Frame::UpAck(pb::UpAck {
            client_msg_id: 7,
            server_msg_id: "s-7".into(),
            ..Default::default()
        }))
        .await?;
    let receipt = tokio::time::timeout(WAIT, sent).await???;
    assert_eq!(receipt.server_msg_id, "s-7");
    drop(first);
    client.close().await;
    Ok(())
}

#[tokio::test]
async fn going_away_reconnects_and_unrecoverable_errors_stop() -> Res<()> {
    let listener = TcpListener::bind("127.0.0.1:0").await?;
    let config = ClientConfig::new(
        vec![Endpoint::tcp(listener.local_addr()?)],
        "app",
        "dev",
        "tok",
    );
    let connecting = tokio::spawn(Client::connect(config));
    let mut first = FakeConn::accept(&listener).await?;
    first.login(1).await?;
    let (client, mut events) = connecting.await??;
    next_event(&mut events).await?;

    let going_away = pb::Error {
        code: 14,
        text: "drain".into(),
        retry_after_ms: 50,
    };
    first
        .write(Frame::Error {
            error: going_away,
            close: true,
        })
        .await?;
    drop(first);
    let mut second = FakeConn::accept(&listener).await?;
    second.login(2).await?;
    loop {
        if let Event::Connected { conn_id, .. } = next_event(&mut events).await? {
            assert_eq!(conn_id, 2);
            break;
        }
    }
    // A non-closing error is only reported.
    let limited = pb::Error {
        code: 12,
        text: "slow down".into(),
        retry_after_ms: 0,
    };
    second
        .write(Frame::Error {
            error: limited,
            close: false,
        })
        .await?;
    assert!(
        matches!(next_event(&mut events).await?, Event::Error { text, .. } if text == "slow down")
    );
    // wrong_app with CLOSE is a configuration problem: report it and stop.
    let wrong = pb::Error {
        code: 8,
        text: "nope".into(),
        retry_after_ms: 0,
    };
    second
        .write(Frame::Error {
            error: wrong,
            close: true,
        })
        .await?;
    assert!(matches!(next_event(&mut events).await?, Event::Error { text, .. } if text == "nope"));
    assert!(matches!(
        next_event(&mut events).await?,
        Event::Disconnected {
            reconnecting: false,
            ..
        }
    ));
    assert!(events.recv().await.is_none());
    assert!(matches!(client.send("x").await, Err(ClientError::Closed)));
    Ok(())
}
