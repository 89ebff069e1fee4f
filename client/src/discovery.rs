//! Discovery through ipconfig (PROTOCOL.md section 12): the device presents the credential
//! its app's backend signed and gets ranked gateway endpoints plus a gateway token.
//!
//! The last answer is kept in memory (and, if configured, in a file), so when ipconfig is
//! unreachable the client still reconnects: to the cached endpoints, then the configured
//! seed endpoints, with the cached token while it is valid.
//!
//! ```no_run
//! use tether_client::{Client, ClientConfig, Discovery, DiscoveryConfig};
//!
//! # async fn demo() -> Result<(), tether_client::ClientError> {
//! let discovery = Discovery::new(DiscoveryConfig::new(
//!     vec!["http://127.0.0.1:7421".into()],
//!     "<credential from the app backend>",
//! ))?;
//! let config = ClientConfig::with_discovery(discovery, vec![], "demo", "phone-1");
//! let (client, events) = Client::connect(config).await?;
//! # let _ = (client, events); Ok(()) }
//! ```

use std::path::PathBuf;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use http_body_util::{BodyExt, Empty, Limited};
use hyper::Request;
use hyper::header::{AUTHORIZATION, HOST};
use hyper_util::rt::TokioIo;
use tether_schemas::ErrorCode;
use tokio::net::TcpStream;

use crate::config::{ClientConfig, Endpoint, TokenSource};
use crate::error::ClientError;

/// Largest answer body read from ipconfig.
const MAX_BODY: usize = 64 * 1024;

/// A cached token is used only while it has at least this much life left.
const TOKEN_MARGIN_SECS: u64 = 30;

/// Which transport to take from each offered gateway.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum Prefer {
    /// Raw TCP (WebSocket if a gateway has no TCP endpoint).
    #[default]
    Tcp,
    /// WebSocket (TCP if a gateway has no WebSocket endpoint).
    Ws,
}

/// Settings of discovery.
#[derive(Debug, Clone)]
pub struct DiscoveryConfig {
    /// ipconfig base URLs (`http://host:port`), tried in order.
    pub urls: Vec<String>,
    /// The credential the app's backend signed (or a provider of fresh ones).
    pub credential: TokenSource,
    /// The device's region, sent as `region`; `None` lets ipconfig decide.
    pub region: Option<String>,
    /// Transport to take from each gateway.
    pub prefer: Prefer,
    /// Time for one request to one ipconfig URL (connect included).
    pub timeout: Duration,
    /// Where to keep the last answer across restarts (optional; it holds a short-lived
    /// gateway token, so keep it private to the app).
    pub cache_file: Option<PathBuf>,
    /// A reconnect asks ipconfig again only if the last answer is at least this old.
    pub min_refresh: Duration,
}

impl DiscoveryConfig {
    /// Settings with defaults for everything but the URLs and the credential.
    pub fn new(urls: Vec<String>, credential: impl Into<TokenSource>) -> DiscoveryConfig {
        DiscoveryConfig {
            urls,
            credential: credential.into(),
            region: None,
            prefer: Prefer::Tcp,
            timeout: Duration::from_secs(3),
            cache_file: None,
            min_refresh: Duration::from_secs(1),
        }
    }
}

/// One offered gateway of an ipconfig answer (the bus contract's type).
pub use tether_schemas::bus::EndpointInfo as OfferedGateway;
/// An answer of `GET /v1/endpoints` (the bus contract's type).
pub use tether_schemas::bus::EndpointsAnswer as Answer;
use tether_schemas::bus::ErrorBody;

struct Cached {
    answer: Answer,
    fetched: Option<Instant>,
}

/// A handle on discovery; clones share the cache.
#[derive(Clone)]
pub struct Discovery {
    inner: Arc<Inner>,
}

struct Inner {
    config: DiscoveryConfig,
    cache: Mutex<Option<Cached>>,
}

impl std::fmt::Debug for Discovery {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Discovery")
            .field("urls", &self.inner.config.urls)
            .finish_non_exhaustive()
    }
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_secs())
}

impl Discovery {
    /// Discovery with `config`; loads the cache file if there is one.
    pub fn new(config: DiscoveryConfig) -> Result<Discovery, ClientError> {
        if config.urls.is_empty() {
            return Err(ClientError::Config(
                "discovery needs an ipconfig url".into(),
            ));
        }
        for url in &config.urls {
            parse_url(url)?;
        }
        let cached = config
            .cache_file
            .as_ref()
            .and_then(|path| std::fs::read(path).ok())
            .and_then(|bytes| serde_json::from_slice::<Answer>(&bytes).ok())
            .map(|answer| Cached {
                answer,
                fetched: None,
            });
        Ok(Discovery {
            inner: Arc::new(Inner {
                config,
                cache: Mutex::new(cached),
            }),
        })
    }

    /// The last answer (from ipconfig or the cache file).
    pub fn cached(&self) -> Option<Answer> {
        self.lock().as_ref().map(|c| c.answer.clone())
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Option<Cached>> {
        self.inner
            .cache
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
    }

    /// Asks ipconfig (each URL in turn) for endpoints and a token for `app`; caches the
    /// answer. A refused credential ends the attempt at once with
    /// [`ClientError::Discovery`] and its code.
    pub async fn fetch(&self, app: &str) -> Result<Answer, ClientError> {
        let credential = self.inner.config.credential.fetch().await?;
        let mut last = ClientError::Config("no ipconfig url".into());
        for url in &self.inner.config.urls {
            match get_endpoints(url, &credential, app, &self.inner.config).await {
                Ok(answer) => {
                    self.store(&answer);
                    return Ok(answer);
                }
                Err(error @ ClientError::Discovery { .. }) if !error.is_retryable() => {
                    return Err(error);
                }
                Err(error) => {
                    tracing::debug!(%url, %error, "ipconfig request failed");
                    last = error;
                }
            }
        }
        Err(last)
    }

    fn store(&self, answer: &Answer) {
        *self.lock() = Some(Cached {
            answer: answer.clone(),
            fetched: Some(Instant::now()),
        });
        if let Some(path) = &self.inner.config.cache_file {
            let written = serde_json::to_vec(answer)
                .map_err(std::io::Error::other)
                .and_then(|json| std::fs::write(path, json));
            if let Err(error) = written {
                tracing::warn!(path = %path.display(), %error, "cannot write the discovery cache");
            }
        }
    }

    /// A fresh token: from ipconfig, else the cached one while it is still valid.
    async fn token(&self, app: &str) -> Result<String, ClientError> {
        match self.fetch(app).await {
            Ok(answer) => Ok(answer.token),
            Err(error) => {
                let cached = self
                    .cached()
                    .filter(|a| a.token_exp > now_unix() + TOKEN_MARGIN_SECS);
                match cached {
                    // A refused credential is final; anything else falls back to the cache.
                    Some(answer) if !is_refusal(&error) => {
                        tracing::info!(%error, "ipconfig unreachable, using the cached token");
                        Ok(answer.token)
                    }
                    _ => Err(error),
                }
            }
        }
    }

    /// A token source that asks this discovery (used as [`ClientConfig::token`]).
    pub fn token_source(&self, app: &str) -> TokenSource {
        let (discovery, app) = (self.clone(), app.to_string());
        TokenSource::provider(move || {
            let (discovery, app) = (discovery.clone(), app.clone());
            async move {
                discovery
                    .token(&app)
                    .await
                    .map_err(|e| Box::new(e) as crate::config::BoxError)
            }
        })
    }

    /// The endpoints to try: the last answer's (in its order), then `seeds` not already
    /// in it.
    pub fn endpoints(&self, seeds: &[Endpoint]) -> Vec<Endpoint> {
        let prefer = self.inner.config.prefer;
        let mut list: Vec<Endpoint> = self
            .cached()
            .map(|a| a.endpoints.iter().filter_map(|g| pick(g, prefer)).collect())
            .unwrap_or_default();
        for seed in seeds {
            if !list.contains(seed) {
                list.push(seed.clone());
            }
        }
        list
    }

    /// Before a reconnect round: a new endpoint list and token when ipconfig answered
    /// (and the last answer is older than `min_refresh` or its token is near expiry);
    /// `None` keeps what the session has (ipconfig unreachable, or just asked).
    pub(crate) async fn refresh(&self, config: &ClientConfig) -> Option<(Vec<Endpoint>, String)> {
        let recent = self.lock().as_ref().is_some_and(|c| {
            c.fetched
                .is_some_and(|at| at.elapsed() < self.inner.config.min_refresh)
                && c.answer.token_exp > now_unix() + TOKEN_MARGIN_SECS
        });
        if recent {
            return None;
        }
        match self.fetch(&config.app).await {
            Ok(answer) => Some((self.endpoints(&config.endpoints), answer.token)),
            Err(error) => {
                tracing::info!(%error, "ipconfig unreachable, reconnecting from the cached endpoints");
                None
            }
        }
    }
}

/// Whether ipconfig refused the request for good (the credential, the app).
fn is_refusal(error: &ClientError) -> bool {
    matches!(error, ClientError::Discovery { .. }) && !error.is_retryable()
}

/// The endpoint of `gateway` for `prefer`, falling back to its other transport.
fn pick(gateway: &OfferedGateway, prefer: Prefer) -> Option<Endpoint> {
    let tcp = gateway.tcp.as_ref().and_then(|a| a.parse().ok());
    let ws = gateway
        .ws
        .as_ref()
        .and_then(|u| u.parse::<Endpoint>().ok())
        .filter(|e| !e.is_tls());
    match prefer {
        Prefer::Tcp => tcp.or(ws),
        Prefer::Ws => ws.or(tcp),
    }
}

/// `http://host:port[/base]` → (`host:port`, base path without a trailing `/`).
fn parse_url(url: &str) -> Result<(String, String), ClientError> {
    let rest = url.strip_prefix("http://").ok_or_else(|| {
        ClientError::Config(format!(
            "ipconfig url {url:?} must start with http:// (https is not supported by this build)"
        ))
    })?;
    let (authority, path) = rest.split_once('/').unwrap_or((rest, ""));
    let port_ok = authority
        .rsplit_once(':')
        .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
    if !port_ok {
        return Err(ClientError::Config(format!(
            "ipconfig url {url:?} must name host:port"
        )));
    }
    let base = path.trim_end_matches('/');
    let base = if base.is_empty() {
        String::new()
    } else {
        format!("/{base}")
    };
    Ok((authority.to_string(), base))
}

/// Percent-encodes a query value (everything but unreserved characters).
fn encode(value: &str) -> String {
    let mut out = String::with_capacity(value.len());
    for byte in value.bytes() {
        if byte.is_ascii_alphanumeric() || b"-_.~".contains(&byte) {
            out.push(char::from(byte));
        } else {
            out.push_str(&format!("%{byte:02X}"));
        }
    }
    out
}

fn unreachable(url: &str, error: impl std::fmt::Display) -> ClientError {
    ClientError::Connect {
        endpoint: url.to_string(),
        reason: error.to_string(),
    }
}

/// One `GET /v1/endpoints` to one ipconfig, HTTP/1.1 over a fresh connection.
async fn get_endpoints(
    url: &str,
    credential: &str,
    app: &str,
    config: &DiscoveryConfig,
) -> Result<Answer, ClientError> {
    let (authority, base) = parse_url(url)?;
    let mut path = format!("{base}/v1/endpoints?app={}", encode(app));
    if let Some(region) = &config.region {
        path.push_str(&format!("&region={}", encode(region)));
    }
    let exchange = async {
        let stream = TcpStream::connect(&authority)
            .await
            .map_err(|e| unreachable(url, e))?;
        let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
            .await
            .map_err(|e| unreachable(url, e))?;
        let driver = tokio::spawn(connection);
        let request = Request::get(path)
            .header(HOST, &authority)
            .header(AUTHORIZATION, format!("Bearer {}", credential.trim()))
            .body(Empty::<Bytes>::new())
            .map_err(|e| ClientError::Config(format!("ipconfig request: {e}")))?;
        let response = sender
            .send_request(request)
            .await
            .map_err(|e| unreachable(url, e))?;
        let status = response.status();
        let body = Limited::new(response.into_body(), MAX_BODY)
            .collect()
            .await
            .map_err(|e| unreachable(url, e))?
            .to_bytes();
        driver.abort();
        Ok::<_, ClientError>((status, body))
    };
    let (status, body) = tokio::time::timeout(config.timeout, exchange)
        .await
        .map_err(|_| unreachable(url, "no answer in time"))??;
    if status.is_success() {
        let answer: Answer = serde_json::from_slice(&body)
            .map_err(|e| unreachable(url, format!("bad answer: {e}")))?;
        if answer.endpoints.is_empty() {
            return Err(unreachable(url, "no endpoints in the answer"));
        }
        return Ok(answer);
    }
    let detail = serde_json::from_slice::<ErrorBody>(&body).ok();
    let code = detail
        .as_ref()
        .map(|d| d.error.code)
        .unwrap_or(if status.is_server_error() {
            ErrorCode::Unavailable
        } else {
            ErrorCode::BadRequest
        });
    Err(ClientError::Discovery {
        code,
        message: detail.map(|d| d.error.message).unwrap_or_default(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn urls_parse() {
        assert_eq!(
            parse_url("http://127.0.0.1:7421").ok(),
            Some(("127.0.0.1:7421".into(), String::new()))
        );
        assert_eq!(
            parse_url("http://h:1/ipconfig/").ok(),
            Some(("h:1".into(), "/ipconfig".into()))
        );
        for bad in ["https://h:1", "h:1", "http://h", "http://:1"] {
            assert!(parse_url(bad).is_err(), "{bad}");
        }
        assert_eq!(encode("eu-west 1/é"), "eu-west%201%2F%C3%A9");
    }

    #[test]
    fn endpoints_follow_the_answer_then_seeds() -> Result<(), ClientError> {
        let discovery = Discovery::new(DiscoveryConfig::new(vec!["http://h:1".into()], "c"))?;
        let seed: Endpoint = "tcp://seed:1".parse()?;
        assert_eq!(
            discovery.endpoints(std::slice::from_ref(&seed)),
            std::slice::from_ref(&seed)
        );
        discovery.store(&Answer {
            endpoints: vec![
                OfferedGateway {
                    gw: "a".into(),
                    region: String::new(),
                    tcp: Some("a:1".into()),
                    ws: Some("ws://a:2/ws".into()),
                    score: 1.0,
                    draining: false,
                },
                OfferedGateway {
                    gw: "b".into(),
                    region: String::new(),
                    tcp: None,
                    ws: Some("ws://b:2/ws".into()),
                    score: 0.5,
                    draining: false,
                },
            ],
            token: "t".into(),
            token_exp: 0,
            app: String::new(),
            uid: String::new(),
            did: String::new(),
            region: String::new(),
        });
        assert_eq!(
            discovery.endpoints(&[seed.clone(), Endpoint::tcp("a:1")]),
            [Endpoint::tcp("a:1"), "ws://b:2/ws".parse()?, seed]
        );
        Ok(())
    }
}
