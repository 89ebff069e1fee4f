//! Opening many client connections at a paced rate: each connects from one of several
//! source addresses to one of several endpoints, sends its protocol's hello (LOGIN,
//! CONNECT+SUB+PING, CONNECT+SUBSCRIBE) and waits until it is accepted. Used by every
//! scenario; the login latency histogram is the `conns` figure.

use std::net::{IpAddr, SocketAddr};
use std::ops::Range;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::{Bytes, BytesMut};
use hdrhistogram::Histogram;
use serde::{Deserialize, Serialize};
use tether_auth::{Claims, TokenSigner};
use tokio::net::TcpStream;
use tokio::sync::{Semaphore, mpsc};

use crate::client_codec::{self, Proto};
use crate::{BenchError, stats};

/// Connects in flight at once.
const IN_FLIGHT: usize = 256;
/// Time one connection has to connect and be accepted.
const HELLO_TIMEOUT: Duration = Duration::from_secs(20);
/// Validity of the pre-generated tokens.
const TOKEN_TTL: Duration = Duration::from_secs(3600);

/// What to open.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct Plan {
    /// The server's protocol.
    pub proto: Proto,
    /// Connection `i` goes to `endpoints[i % len]`.
    pub endpoints: Vec<SocketAddr>,
    /// Connection `i` binds `sources[i % len]`.
    pub sources: Vec<IpAddr>,
    /// App id (Tether tokens and LOGIN).
    pub app: String,
    /// Device id prefix: connection `i` is `<prefix><i>`.
    pub did_prefix: String,
    /// Subscribe at hello: Tether session (token claim `sess`), NATS subject, MQTT topic;
    /// `{i}` is replaced by the connection index.
    pub subscribe: Option<String>,
    /// Target connects per second.
    pub rate: u32,
}

/// Connections opened by [`open`].
pub struct Opened {
    /// Accepted connections, in index order of success, with bytes read past the hello.
    pub conns: Vec<(usize, TcpStream, BytesMut)>,
    /// Connect start → hello accepted, µs.
    pub latency: Histogram<u64>,
    /// Connections that failed.
    pub failed: usize,
    /// First failure.
    pub first_error: Option<String>,
    /// First connect start → last completion.
    pub elapsed: Duration,
}

impl Opened {
    /// All of them, or the error saying how many devices failed and the first reason.
    pub fn all(self) -> Result<Opened, BenchError> {
        if self.failed > 0 {
            return Err(BenchError::Setup(format!(
                "{} devices failed to connect: {}",
                self.failed,
                self.first_error.unwrap_or_default()
            )));
        }
        Ok(self)
    }
}

fn unix_secs() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

/// The hellos of connections `range` (tokens are signed here, before any timing).
pub fn hellos(
    plan: &Plan,
    signer: Option<&TokenSigner>,
    range: Range<usize>,
) -> Result<Vec<Bytes>, BenchError> {
    range
        .map(|i| {
            let did = format!("{}{i}", plan.did_prefix);
            let subscribe = plan
                .subscribe
                .as_ref()
                .map(|s| s.replace("{i}", &i.to_string()));
            Ok(match plan.proto {
                Proto::Tether | Proto::TetherWs => {
                    let signer = signer.ok_or_else(|| {
                        BenchError::Args("a token signing key is needed for tether".into())
                    })?;
                    let mut claims = Claims::new(&plan.app, &did, &did, unix_secs(), TOKEN_TTL);
                    claims.sess = subscribe.into_iter().collect();
                    let token = signer
                        .sign(&claims)
                        .map_err(|e| BenchError::Setup(format!("issue token: {e}")))?;
                    let login = client_codec::tether_login(&plan.app, &did, token);
                    if plan.proto == Proto::TetherWs {
                        client_codec::ws_hello(&login)
                    } else {
                        login
                    }
                }
                Proto::Nats => client_codec::nats_hello(subscribe.as_deref()),
                Proto::Mqtt => client_codec::mqtt_hello(&did, subscribe.as_deref()),
            })
        })
        .collect()
}

/// Opens connections `range` of `plan` at its rate; `progress(ok, failed)` is called
/// as they complete.
pub async fn open(
    plan: &Plan,
    signer: Option<&TokenSigner>,
    range: Range<usize>,
    progress: impl Fn(usize, usize),
) -> Result<Opened, BenchError> {
    if plan.endpoints.is_empty() || plan.sources.is_empty() || plan.rate == 0 {
        return Err(BenchError::Args(
            "endpoints, source addresses and a positive rate are needed".into(),
        ));
    }
    if plan
        .sources
        .iter()
        .any(|s| plan.endpoints.iter().any(|e| e.is_ipv4() != s.is_ipv4()))
    {
        return Err(BenchError::Args(
            "source addresses must be of the endpoints' family".into(),
        ));
    }
    let hellos = hellos(plan, signer, range.clone())?;
    let readies = if plan.proto == Proto::Mqtt && plan.subscribe.is_some() {
        2
    } else {
        1
    };
    let total = hellos.len();
    let (tx, mut rx) = mpsc::unbounded_channel();
    let permits = Arc::new(Semaphore::new(IN_FLIGHT));
    let interval = Duration::from_secs_f64(1.0 / f64::from(plan.rate));
    let start = Instant::now();
    let launcher = {
        let plan = plan.clone();
        let first = range.start;
        tokio::spawn(async move {
            for (k, hello) in hellos.into_iter().enumerate() {
                // Paced: connection k starts no earlier than start + k/rate.
                let due = start + interval.mul_f64(k as f64);
                if due > Instant::now() {
                    tokio::time::sleep_until(due.into()).await;
                }
                let Ok(permit) = permits.clone().acquire_owned().await else {
                    break;
                };
                let i = first + k;
                let source = plan.sources[i % plan.sources.len()];
                let endpoint = plan.endpoints[i % plan.endpoints.len()];
                let tx = tx.clone();
                let proto = plan.proto;
                tokio::spawn(async move {
                    let result = connect_hello(source, endpoint, proto, hello, readies).await;
                    drop(permit);
                    let _ = tx.send((i, result));
                });
            }
        })
    };

    let mut latency = stats::histogram();
    let mut conns = Vec::with_capacity(total);
    let (mut failed, mut first_error) = (0usize, None);
    let mut last_done = start;
    while conns.len() + failed < total {
        let Some((i, result)) = rx.recv().await else {
            break;
        };
        match result {
            Ok((stream, rest, took)) => {
                stats::record(
                    &mut latency,
                    u64::try_from(took.as_micros()).unwrap_or(u64::MAX),
                );
                conns.push((i, stream, rest));
            }
            Err(error) => {
                failed += 1;
                first_error.get_or_insert(error);
            }
        }
        last_done = Instant::now();
        progress(conns.len(), failed);
    }
    let _ = launcher.await;
    Ok(Opened {
        conns,
        latency,
        failed,
        first_error,
        elapsed: last_done.duration_since(start),
    })
}

async fn connect_hello(
    source: IpAddr,
    endpoint: SocketAddr,
    proto: Proto,
    hello: Bytes,
    readies: usize,
) -> Result<(TcpStream, BytesMut, Duration), String> {
    let started = Instant::now();
    let attempt = async {
        let mut stream = client_codec::connect_from(source, endpoint).await?;
        let rest =
            client_codec::handshake(&mut stream, proto, &hello, readies, HELLO_TIMEOUT).await?;
        Ok::<_, String>((stream, rest))
    };
    match tokio::time::timeout(HELLO_TIMEOUT, attempt).await {
        Ok(Ok((stream, mut rest))) => {
            // An idle connection keeps nothing but its socket.
            if rest.is_empty() {
                rest = BytesMut::new();
            }
            Ok((stream, rest, started.elapsed()))
        }
        Ok(Err(e)) => Err(e),
        Err(_) => Err(format!("not accepted within {HELLO_TIMEOUT:?}")),
    }
}
