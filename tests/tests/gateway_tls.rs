//! The gateway's client listeners over TLS (rustls), with a self-signed certificate.

mod support;
#[path = "support/tls.rs"]
mod tls;

use bytes::Bytes;
use support::{Fixture, TestResult, WAIT};
use tether_schemas::{Frame, limits, split_frame};
use tls::TlsCert;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test]
async fn tcp_listener_speaks_tls() -> TestResult {
    let cert = TlsCert::new();
    let files = cert.files.clone();
    let fixture = Fixture::start(move |c| c.tls = Some(files)).await;
    let mut tls = cert.connect(fixture.tcp).await?;

    tls.write_all(&fixture.login_frame("secure")).await?;
    tls.write_all(&Frame::Ping(Bytes::from_static(b"over tls")).encode())
        .await?;
    let mut input = bytes::BytesMut::new();
    let mut frames = Vec::new();
    while frames.len() < 2 {
        while let Some(raw) = split_frame(&mut input, limits::DEFAULT_MAX_FRAME_LEN)? {
            frames.push(Frame::decode(&raw)?);
        }
        if frames.len() < 2 {
            let n = tokio::time::timeout(WAIT, tls.read_buf(&mut input)).await??;
            assert!(n > 0, "server closed the tls connection");
        }
    }
    assert!(
        matches!(frames[0], Frame::LoginAck(_)),
        "got {:?}",
        frames[0]
    );
    assert_eq!(frames[1], Frame::Pong(Bytes::from_static(b"over tls")));
    Ok(())
}
