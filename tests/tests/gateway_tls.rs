//! The gateway's client listeners over TLS (rustls), with a self-signed certificate.

mod support;

use std::sync::Arc;

use bytes::Bytes;
use support::{Fixture, TestResult, WAIT};
use tether_gateway::TlsFiles;
use tether_schemas::{Frame, limits, split_frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, pki_types::ServerName};

#[tokio::test]
async fn tcp_listener_speaks_tls() -> TestResult {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_string()])?;
    let dir = tempfile::tempdir()?;
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    std::fs::write(&cert, certified.cert.pem())?;
    std::fs::write(&key, certified.signing_key.serialize_pem())?;
    let files = TlsFiles { cert, key };
    let fixture = Fixture::start(move |c| c.tls = Some(files)).await;

    let mut roots = RootCertStore::empty();
    roots.add(certified.cert.der().clone())?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots)
        .with_no_client_auth();
    let socket = tokio::net::TcpStream::connect(fixture.tcp).await?;
    let mut tls = TlsConnector::from(Arc::new(config))
        .connect(ServerName::try_from("localhost")?, socket)
        .await?;

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
