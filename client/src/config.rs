//! The client's configuration: where to connect, who to be, and its timers.

use std::fmt;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

use futures::future::BoxFuture;
use tether_schemas::limits;

use crate::backoff::Backoff;
use crate::error::ClientError;

/// A gateway endpoint.
///
/// Written as `tcp://host:port` or plain `host:port` (raw TCP, the form REDIRECT uses),
/// or `ws://host:port/ws` (WebSocket). `wss://` parses, but this build has no TLS yet,
/// so [`ClientConfig::validate`] refuses it.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum Endpoint {
    /// Raw TCP, frames back to back.
    Tcp {
        /// `host:port` as given (IPv6 hosts in brackets).
        addr: String,
    },
    /// WebSocket, one binary message per frame.
    Ws {
        /// The whole URL, e.g. `ws://10.0.0.2:7401/ws`.
        url: String,
    },
}

impl Endpoint {
    /// A TCP endpoint for `host:port`.
    pub fn tcp(addr: impl fmt::Display) -> Endpoint {
        Endpoint::Tcp {
            addr: addr.to_string(),
        }
    }

    /// A WebSocket endpoint at `ws://<addr>/ws`.
    pub fn ws(addr: impl fmt::Display) -> Endpoint {
        Endpoint::Ws {
            url: format!("ws://{addr}/ws"),
        }
    }

    /// Whether this endpoint needs TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, Endpoint::Ws { url } if url.starts_with("wss://"))
    }
}

impl FromStr for Endpoint {
    type Err = ClientError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        if s.starts_with("ws://") || s.starts_with("wss://") {
            let rest = s.split_once("://").map_or("", |(_, rest)| rest);
            if rest.is_empty() || rest.starts_with('/') {
                return Err(ClientError::Config(format!("endpoint {s:?} has no host")));
            }
            return Ok(Endpoint::Ws { url: s.to_string() });
        }
        let addr = s.strip_prefix("tcp://").unwrap_or(s);
        if addr.contains("://") {
            return Err(ClientError::Config(format!(
                "endpoint {s:?}: scheme must be tcp://, ws:// or wss://"
            )));
        }
        let port_ok = addr
            .rsplit_once(':')
            .is_some_and(|(host, port)| !host.is_empty() && port.parse::<u16>().is_ok());
        if !port_ok || addr.contains('/') {
            return Err(ClientError::Config(format!(
                "endpoint {s:?} must be host:port"
            )));
        }
        Ok(Endpoint::Tcp {
            addr: addr.to_string(),
        })
    }
}

impl fmt::Display for Endpoint {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Endpoint::Tcp { addr } => write!(f, "tcp://{addr}"),
            Endpoint::Ws { url } => f.write_str(url),
        }
    }
}

/// Error type a token provider may return.
pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// A callback that fetches a fresh token (typically from ipconfig `GET /v1/endpoints`).
pub type TokenProvider =
    Arc<dyn Fn() -> BoxFuture<'static, Result<String, BoxError>> + Send + Sync>;

/// Where LOGIN tokens come from.
#[derive(Clone)]
pub enum TokenSource {
    /// One fixed token; a `bad_token` or `token_expired` login ends the client.
    Static(String),
    /// Called for the first token, and again once when the gateway refuses a token.
    Provider(TokenProvider),
}

impl TokenSource {
    /// A provider from an async closure.
    pub fn provider<F, Fut>(f: F) -> TokenSource
    where
        F: Fn() -> Fut + Send + Sync + 'static,
        Fut: Future<Output = Result<String, BoxError>> + Send + 'static,
    {
        TokenSource::Provider(Arc::new(move || Box::pin(f())))
    }

    /// Gets a token: the static one, or a fresh one from the provider.
    pub(crate) async fn fetch(&self) -> Result<String, ClientError> {
        match self {
            TokenSource::Static(token) => Ok(token.clone()),
            TokenSource::Provider(provider) => {
                provider()
                    .await
                    .map_err(|e| match e.downcast::<ClientError>() {
                        Ok(error) => *error,
                        Err(e) => ClientError::Token(e.to_string()),
                    })
            }
        }
    }
}

impl Default for TokenSource {
    fn default() -> Self {
        TokenSource::Static(String::new())
    }
}

impl fmt::Debug for TokenSource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never log a token.
        match self {
            TokenSource::Static(_) => f.write_str("Static(<redacted>)"),
            TokenSource::Provider(_) => f.write_str("Provider(..)"),
        }
    }
}

impl From<String> for TokenSource {
    fn from(token: String) -> Self {
        TokenSource::Static(token)
    }
}

impl From<&str> for TokenSource {
    fn from(token: &str) -> Self {
        TokenSource::Static(token.to_string())
    }
}

/// Configuration of one client (one device of one app).
#[derive(Debug, Clone)]
pub struct ClientConfig {
    /// Gateways to try, in order (from ipconfig). The first that answers is used; on
    /// reconnect they are tried in order again, starting with the one last used.
    pub endpoints: Vec<Endpoint>,
    /// App id the token was issued for.
    pub app: String,
    /// Device id (stable per installation).
    pub did: String,
    /// The LOGIN token, or a provider of fresh ones.
    pub token: TokenSource,
    /// Discovery through ipconfig: when set, the endpoints to try come from its last
    /// answer, with `endpoints` as seeds after them (see [`ClientConfig::with_discovery`]).
    pub discovery: Option<crate::discovery::Discovery>,
    /// PING interval; `None` uses LOGIN_ACK `heartbeat_secs` (300 s if the gateway says 0).
    pub heartbeat: Option<Duration>,
    /// Random ± jitter on each PING interval; `None` is a tenth of the interval, at most
    /// 30 s. Always clamped to half the interval.
    pub heartbeat_jitter: Option<Duration>,
    /// Time for one connection attempt: TCP connect, WebSocket handshake and LOGIN → LOGIN_ACK.
    pub connect_timeout: Duration,
    /// How long [`crate::Client::send`] waits for the UP_ACK, reconnects included.
    pub ack_timeout: Duration,
    /// Delay between reconnect rounds (each round tries every endpoint once).
    pub reconnect: Backoff,
    /// Reconnect after a lost connection (never after `replaced` or [`crate::Client::close`]).
    pub auto_reconnect: bool,
    /// Highest contiguous QoS1 seq the app already processed (persisted by the app across
    /// restarts, 0 on a fresh install); sent as LOGIN `resume_seq`.
    pub resume_seq: u64,
    /// Room cursors the app persisted (session → highest `room_seq` processed), sent in
    /// LOGIN `rooms` so recoverable rooms replay what was missed. The client keeps them
    /// current itself while it runs ([`crate::Client::room_cursors`]).
    pub room_cursors: std::collections::BTreeMap<String, u64>,
    /// First `client_msg_id`; `None` takes the current Unix time in microseconds, so ids
    /// keep growing across restarts without being persisted.
    pub first_msg_id: Option<u64>,
    /// Largest frame accepted from the gateway (whole frame, header included).
    pub max_frame_len: usize,
    /// Largest UP frame [`crate::Client::send`] accepts (the gateway's limit, 64 KiB by
    /// default); bigger ones fail locally instead of closing the connection.
    pub max_up_frame_len: usize,
    /// Capacity of the event channel; when it is full, reading from the gateway waits.
    pub event_capacity: usize,
    /// Capacity of the command channel between [`crate::Client`] handles and the task.
    pub command_capacity: usize,
    /// LOGIN `sdk` field.
    pub sdk: String,
}

impl Default for ClientConfig {
    fn default() -> Self {
        Self {
            endpoints: Vec::new(),
            app: String::new(),
            did: String::new(),
            token: TokenSource::default(),
            discovery: None,
            heartbeat: None,
            heartbeat_jitter: None,
            connect_timeout: Duration::from_secs(10),
            ack_timeout: Duration::from_secs(10),
            reconnect: Backoff::default(),
            auto_reconnect: true,
            resume_seq: 0,
            room_cursors: std::collections::BTreeMap::new(),
            first_msg_id: None,
            max_frame_len: limits::MAX_FRAME_LEN_CAP,
            max_up_frame_len: limits::DEFAULT_MAX_FRAME_LEN,
            event_capacity: 1024,
            command_capacity: 1024,
            sdk: concat!("rust/", env!("CARGO_PKG_VERSION")).to_string(),
        }
    }
}

impl ClientConfig {
    /// A configuration with defaults for everything but identity and endpoints.
    pub fn new(
        endpoints: Vec<Endpoint>,
        app: impl Into<String>,
        did: impl Into<String>,
        token: impl Into<TokenSource>,
    ) -> Self {
        Self {
            endpoints,
            app: app.into(),
            did: did.into(),
            token: token.into(),
            ..Self::default()
        }
    }

    /// A configuration that finds gateways and tokens through ipconfig (`discovery`), with
    /// `seeds` tried after the discovered endpoints (and alone when ipconfig was never
    /// reached).
    pub fn with_discovery(
        discovery: crate::discovery::Discovery,
        seeds: Vec<Endpoint>,
        app: impl Into<String>,
        did: impl Into<String>,
    ) -> Self {
        let app = app.into();
        Self {
            endpoints: seeds,
            token: discovery.token_source(&app),
            discovery: Some(discovery),
            app,
            did: did.into(),
            ..Self::default()
        }
    }

    /// Checks values that cannot work.
    pub fn validate(&self) -> Result<(), ClientError> {
        let bad = |msg: &str| Err(ClientError::Config(msg.to_string()));
        if self.endpoints.is_empty() && self.discovery.is_none() {
            return bad("at least one endpoint is needed");
        }
        if let Some(ep) = self.endpoints.iter().find(|e| e.is_tls()) {
            return Err(ClientError::Config(format!(
                "{ep}: tls is not supported by this build"
            )));
        }
        if self.app.is_empty() || self.did.is_empty() {
            return bad("app and did must be set");
        }
        if self.heartbeat.is_some_and(|h| h.is_zero()) {
            return bad("heartbeat must be positive");
        }
        if self.connect_timeout.is_zero() || self.ack_timeout.is_zero() {
            return bad("connect_timeout and ack_timeout must be positive");
        }
        if self.event_capacity == 0 || self.command_capacity == 0 {
            return bad("event_capacity and command_capacity must be positive");
        }
        if self.max_frame_len < limits::DEFAULT_MAX_FRAME_LEN {
            return bad("max_frame_len must be at least 65536 (PROTOCOL.md §3.4)");
        }
        self.reconnect.validate()
    }

    /// The PING interval and jitter for a connection whose LOGIN_ACK said `heartbeat_secs`.
    pub(crate) fn heartbeat_for(&self, heartbeat_secs: u32) -> (Duration, Duration) {
        let secs = if heartbeat_secs == 0 {
            limits::DEFAULT_HEARTBEAT_SECS
        } else {
            u64::from(heartbeat_secs)
        };
        let interval = self.heartbeat.unwrap_or(Duration::from_secs(secs));
        let default_jitter =
            (interval / 10).min(Duration::from_secs(limits::DEFAULT_HEARTBEAT_JITTER_SECS));
        let jitter = self
            .heartbeat_jitter
            .unwrap_or(default_jitter)
            .min(interval / 2);
        (interval, jitter)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn endpoints_parse() {
        assert_eq!(
            "10.0.0.2:7000".parse::<Endpoint>().ok(),
            Some(Endpoint::tcp("10.0.0.2:7000"))
        );
        assert_eq!(
            "tcp://h:1".parse::<Endpoint>().ok(),
            Some(Endpoint::tcp("h:1"))
        );
        assert_eq!(
            "[::1]:7".parse::<Endpoint>().ok(),
            Some(Endpoint::tcp("[::1]:7"))
        );
        assert_eq!(
            "ws://h:2/ws".parse::<Endpoint>().ok(),
            Some(Endpoint::Ws {
                url: "ws://h:2/ws".into()
            })
        );
        assert!(
            "wss://gw.example.com/ws"
                .parse::<Endpoint>()
                .is_ok_and(|e| e.is_tls())
        );
        for bad in ["h", "h:port", ":7", "http://h:1", "ws://", "tcp://h:1/x"] {
            assert!(bad.parse::<Endpoint>().is_err(), "{bad}");
        }
        assert_eq!(Endpoint::tcp("h:1").to_string(), "tcp://h:1");
    }

    #[test]
    fn heartbeat_defaults_and_jitter_clamp() {
        let mut config = ClientConfig::default();
        assert_eq!(
            config.heartbeat_for(0),
            (Duration::from_secs(300), Duration::from_secs(30))
        );
        assert_eq!(
            config.heartbeat_for(20),
            (Duration::from_secs(20), Duration::from_secs(2))
        );
        config.heartbeat = Some(Duration::from_secs(1));
        config.heartbeat_jitter = Some(Duration::from_secs(5));
        assert_eq!(
            config.heartbeat_for(300),
            (Duration::from_secs(1), Duration::from_millis(500))
        );
    }

    #[test]
    fn validate_catches_unusable_values() {
        let ok = ClientConfig::new(vec![Endpoint::tcp("h:1")], "a", "d", "t");
        assert!(ok.validate().is_ok());
        assert!(
            ClientConfig {
                endpoints: vec![],
                ..ok.clone()
            }
            .validate()
            .is_err()
        );
        assert!(
            ClientConfig {
                did: String::new(),
                ..ok.clone()
            }
            .validate()
            .is_err()
        );
        let wss = vec![Endpoint::Ws {
            url: "wss://h/ws".into(),
        }];
        assert!(
            ClientConfig {
                endpoints: wss,
                ..ok.clone()
            }
            .validate()
            .is_err()
        );
        assert!(format!("{:?}", ok.token).contains("redacted"));
    }
}
