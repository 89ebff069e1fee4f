//! TLS in the end-to-end tests: a self-signed certificate for the gateway's listeners, a
//! client connector trusting it, and a TLS device (the Rust SDK has no TLS yet) that
//! acknowledges QoS1 DOWNs, follows REDIRECT as PROTOCOL.md 6.6 says, and logs in again
//! with its resume point when its connection ends otherwise. Test files that
//! use it declare it (`#[path = "support/tls.rs"] mod tls;`), so the binaries sharing
//! `support` need no TLS crates.

#![allow(dead_code)]

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use bytes::{Bytes, BytesMut};
use tether_gateway::TlsFiles;
use tether_schemas::{Frame, limits, pb, split_frame};
use tokio::io::{AsyncReadExt, AsyncWriteExt, WriteHalf};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, oneshot};
use tokio_rustls::TlsConnector;
use tokio_rustls::client::TlsStream;
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore, pki_types::ServerName};
use tokio_util::sync::CancellationToken;

use crate::support::{APP, WAIT};

/// A self-signed certificate for `localhost` (files for the gateway) and a connector
/// trusting it.
pub struct TlsCert {
    pub files: TlsFiles,
    pub connector: TlsConnector,
    _dir: tempfile::TempDir,
}

impl TlsCert {
    /// Generates the certificate.
    pub fn new() -> Self {
        let certified =
            rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).expect("cert");
        let dir = tempfile::tempdir().expect("tempdir");
        let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
        std::fs::write(&cert, certified.cert.pem()).expect("write cert");
        std::fs::write(&key, certified.signing_key.serialize_pem()).expect("write key");
        let mut roots = RootCertStore::empty();
        roots.add(certified.cert.der().clone()).expect("root");
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = ClientConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .expect("tls versions")
            .with_root_certificates(roots)
            .with_no_client_auth();
        Self {
            files: TlsFiles { cert, key },
            connector: TlsConnector::from(Arc::new(config)),
            _dir: dir,
        }
    }

    /// A TLS connection to `addr`.
    pub async fn connect(&self, addr: SocketAddr) -> std::io::Result<TlsStream<TcpStream>> {
        let tcp = TcpStream::connect(addr).await?;
        let name = ServerName::try_from("localhost").expect("server name");
        self.connector.connect(name, tcp).await
    }
}

/// What a [`TlsDevice`] saw.
#[derive(Debug, Default)]
pub struct TlsLog {
    /// QoS1 messages handed to the app: `(seq, body)`, each seq once (6.4).
    pub messages: Vec<(u64, Bytes)>,
    /// REDIRECT frames received on the live connection.
    pub redirects: Vec<pb::Redirect>,
    /// Each LOGIN's `resume_seq` and its LOGIN_ACK, in order.
    pub logins: Vec<(u64, pb::LoginAck)>,
    /// Logins again after the live connection ended without a redirect under way.
    pub reconnects: usize,
    /// ERROR frames, failed redirects and reconnects.
    pub troubles: Vec<String>,
}

/// A device over TLS, run by its own task until dropped.
pub struct TlsDevice {
    pub did: String,
    pub log: Arc<Mutex<TlsLog>>,
    stop: CancellationToken,
}

impl Drop for TlsDevice {
    fn drop(&mut self) {
        self.stop.cancel();
    }
}

impl TlsDevice {
    /// Logs `did` in at `addr` with `token`; returns once the first LOGIN_ACK arrived.
    pub async fn start(cert: Arc<TlsCert>, addr: SocketAddr, did: &str, token: String) -> Self {
        let log: Arc<Mutex<TlsLog>> = Arc::default();
        let stop = CancellationToken::new();
        let (ready, logged_in) = oneshot::channel();
        let device = Device {
            cert,
            did: did.to_string(),
            log: log.clone(),
            frames: mpsc::unbounded_channel(),
            writers: Vec::new(),
            resumes: Vec::new(),
        };
        tokio::spawn(device.run(addr, token, stop.clone(), ready));
        tokio::time::timeout(WAIT, logged_in)
            .await
            .unwrap_or_else(|_| panic!("{did}: no LOGIN_ACK over TLS"))
            .unwrap_or_else(|_| panic!("{did}: the TLS device stopped: {:?}", log.lock()));
        Self {
            did: did.to_string(),
            log,
            stop,
        }
    }
}

type Frames = (
    mpsc::UnboundedSender<(usize, Option<Frame>)>,
    mpsc::UnboundedReceiver<(usize, Option<Frame>)>,
);

struct Device {
    cert: Arc<TlsCert>,
    did: String,
    log: Arc<Mutex<TlsLog>>,
    /// Frames of every connection, tagged with its index (`None`: it ended).
    frames: Frames,
    writers: Vec<Option<WriteHalf<TlsStream<TcpStream>>>>,
    /// The `resume_seq` of each connection's LOGIN.
    resumes: Vec<u64>,
}

impl Device {
    fn trouble(&self, what: String) {
        self.log.lock().expect("lock").troubles.push(what);
    }

    /// Opens connection `n` to `addr` and sends LOGIN; its frames come through `frames`.
    async fn open(&mut self, addr: SocketAddr, token: String, resume_seq: u64) -> Option<usize> {
        match self.try_open(addr, token, resume_seq).await {
            Ok(n) => Some(n),
            Err(error) => {
                self.trouble(error);
                None
            }
        }
    }

    /// Logs in again at `addr` (the normal path after a lost connection): a few tries.
    async fn reconnect(&mut self, addr: SocketAddr, token: &str, resume_seq: u64) -> Option<usize> {
        self.log.lock().expect("lock").reconnects += 1;
        let mut last = String::new();
        for _ in 0..50 {
            match self.try_open(addr, token.to_string(), resume_seq).await {
                Ok(n) => return Some(n),
                Err(error) => last = error,
            }
            tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        }
        self.trouble(format!("no reconnect: {last}"));
        None
    }

    async fn try_open(
        &mut self,
        addr: SocketAddr,
        token: String,
        resume_seq: u64,
    ) -> Result<usize, String> {
        let stream = self
            .cert
            .connect(addr)
            .await
            .map_err(|error| format!("connect {addr}: {error}"))?;
        let (mut read, mut write) = tokio::io::split(stream);
        let login = Frame::Login(pb::Login {
            token,
            did: self.did.clone(),
            app: APP.into(),
            resume_seq,
            ..Default::default()
        });
        write
            .write_all(&login.encode())
            .await
            .map_err(|error| format!("login to {addr}: {error}"))?;
        let n = self.writers.len();
        self.writers.push(Some(write));
        self.resumes.push(resume_seq);
        let frames = self.frames.0.clone();
        tokio::spawn(async move {
            let mut input = BytesMut::new();
            loop {
                while let Ok(Some(raw)) = split_frame(&mut input, limits::DEFAULT_MAX_FRAME_LEN) {
                    if let Ok(frame) = Frame::decode(&raw) {
                        let _ = frames.send((n, Some(frame)));
                    }
                }
                match read.read_buf(&mut input).await {
                    Ok(read) if read > 0 => {}
                    _ => {
                        let _ = frames.send((n, None));
                        return;
                    }
                }
            }
        });
        Ok(n)
    }

    async fn send(&mut self, n: usize, frame: Frame) {
        if let Some(Some(writer)) = self.writers.get_mut(n) {
            let _ = writer.write_all(&frame.encode()).await;
        }
    }

    async fn run(
        mut self,
        addr: SocketAddr,
        token: String,
        stop: CancellationToken,
        ready: oneshot::Sender<()>,
    ) {
        let Some(mut live) = self.open(addr, token.clone(), 0).await else {
            return;
        };
        let mut ready = Some(ready);
        // The connection a REDIRECT opened, until its LOGIN_ACK.
        let mut moving: Option<usize> = None;
        // The highest QoS1 seq handed to the app (H).
        let mut high = 0_u64;
        loop {
            let (n, frame) = tokio::select! {
                _ = stop.cancelled() => return,
                next = self.frames.1.recv() => match next {
                    Some(next) => next,
                    None => return,
                },
            };
            let Some(frame) = frame else {
                // The old connection may end while a redirect is under way (6.6); otherwise
                // log in again where the device first connected.
                if n == live && moving.is_none() {
                    moving = self.reconnect(addr, &token, high).await;
                }
                if Some(n) == moving {
                    self.trouble(format!("connection {n} ended before its LOGIN_ACK"));
                    moving = None;
                }
                continue;
            };
            match frame {
                Frame::LoginAck(ack) => {
                    let resume = self.resumes.get(n).copied().unwrap_or_default();
                    self.log.lock().expect("lock").logins.push((resume, ack));
                    if Some(n) == moving {
                        // Logged in there: leave the old connection.
                        if let Some(Some(mut old)) = self.writers.get_mut(live).map(Option::take) {
                            let _ = old.shutdown().await;
                        }
                        live = n;
                        moving = None;
                    }
                    if let Some(ready) = ready.take() {
                        let _ = ready.send(());
                    }
                }
                Frame::Down { header, qos1, body } if qos1 => {
                    if header.seq > high {
                        high = header.seq;
                        self.log
                            .lock()
                            .expect("lock")
                            .messages
                            .push((header.seq, body));
                    }
                    self.send(n, Frame::DownAck(pb::DownAck { seq: high }))
                        .await;
                }
                Frame::Redirect(redirect) if n == live && moving.is_none() => {
                    self.log
                        .lock()
                        .expect("lock")
                        .redirects
                        .push(redirect.clone());
                    match redirect.endpoint.parse::<SocketAddr>() {
                        Ok(to) => moving = self.open(to, redirect.token, high).await,
                        Err(_) => self.trouble(format!("redirect to {:?}", redirect.endpoint)),
                    }
                }
                Frame::Error { error, close } => {
                    self.trouble(format!(
                        "connection {n}: ERROR {} {:?} (close {close})",
                        error.code, error.text
                    ));
                }
                _ => {}
            }
        }
    }
}
