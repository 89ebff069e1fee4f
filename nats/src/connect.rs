//! How Tether services connect to NATS: URLs, client names, reconnect logging, timeouts,
//! and the credentials and TLS settings of [`NatsAuth`].

use std::path::PathBuf;
use std::time::Duration;

use async_nats::{Client, ConnectOptions, Event, ServerAddr};
use serde::{Deserialize, Serialize};

/// Errors of the bus crate.
#[derive(Debug, thiserror::Error)]
pub enum BusError {
    /// Could not connect to NATS.
    #[error("cannot connect to nats at {url}: {reason}")]
    Connect {
        /// The URL tried.
        url: String,
        /// Why it failed.
        reason: String,
    },
    /// Could not create or update a stream or bucket.
    #[error("cannot create or update {what}: {reason}")]
    Layout {
        /// The stream or bucket.
        what: String,
        /// Why it failed.
        reason: String,
    },
    /// A nats-server process could not be started or did not become ready.
    #[error("nats-server: {0}")]
    Server(String),
}

/// How a service authenticates to NATS and secures the connection: the `[nats]` table of
/// every role's configuration. Every field is optional; with none set the connection is
/// anonymous and plain (a local `tether up`).
///
/// Choose at most one way to authenticate: `creds_file` (a JWT and its nkey seed, as
/// `nsc` writes them, for operator/account deployments), `nkey_seed_file`, `user` with
/// `password`, or `token`. TLS: `tls_ca_file` trusts a private CA; `tls_cert_file` with
/// `tls_key_file` presents a client certificate (mutual TLS); either one makes TLS
/// required (as does a `tls://` URL).
///
/// ```toml
/// nats_url = "tls://nats-1.internal:4222,tls://nats-2.internal:4222"
/// [nats]
/// creds_file = "/etc/tether/tether.creds"
/// tls_ca_file = "/etc/tether/nats-ca.pem"
/// ```
#[derive(Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct NatsAuth {
    /// NATS credentials file (user JWT and nkey seed; decentralized auth with accounts).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub creds_file: Option<PathBuf>,
    /// File holding a user nkey seed (`SU...`), for servers that list users by nkey.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub nkey_seed_file: Option<PathBuf>,
    /// User name (with `password`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub user: Option<String>,
    /// Password of `user`. Prefer the environment (`TETHER_NATS_PASSWORD`) to a file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub password: Option<String>,
    /// Authentication token. Prefer the environment (`TETHER_NATS_TOKEN`) to a file.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
    /// PEM file of the CA(s) that signed the server's certificate; makes TLS required.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_ca_file: Option<PathBuf>,
    /// Client certificate chain, PEM (mutual TLS, with `tls_key_file`); makes TLS required.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_cert_file: Option<PathBuf>,
    /// Private key of `tls_cert_file`, PEM.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tls_key_file: Option<PathBuf>,
    /// Prefix of this client's reply subjects instead of `_INBOX`: for a user whose
    /// permissions allow only its own inbox (e.g. `_INBOX.biz-chat` with subscribe
    /// permission `_INBOX.biz-chat.>`), so that no one else's replies are readable.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub inbox_prefix: Option<String>,
}

/// Redacts the password and token.
impl std::fmt::Debug for NatsAuth {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let redacted = |v: &Option<String>| v.as_ref().map(|_| "<redacted>");
        f.debug_struct("NatsAuth")
            .field("creds_file", &self.creds_file)
            .field("nkey_seed_file", &self.nkey_seed_file)
            .field("user", &self.user)
            .field("password", &redacted(&self.password))
            .field("token", &redacted(&self.token))
            .field("tls_ca_file", &self.tls_ca_file)
            .field("tls_cert_file", &self.tls_cert_file)
            .field("tls_key_file", &self.tls_key_file)
            .field("inbox_prefix", &self.inbox_prefix)
            .finish()
    }
}

impl NatsAuth {
    /// Environment variables every role reads into its `[nats]` table (lowest precedence
    /// after the file), with the field each sets. Role-specific variables
    /// (`TETHER_GATEWAY_NATS__CREDS_FILE`, …) and flags override them.
    pub const ENV: &'static [(&'static str, &'static str)] = &[
        ("TETHER_NATS_CREDS_FILE", "creds_file"),
        ("TETHER_NATS_NKEY_SEED_FILE", "nkey_seed_file"),
        ("TETHER_NATS_USER", "user"),
        ("TETHER_NATS_PASSWORD", "password"),
        ("TETHER_NATS_TOKEN", "token"),
        ("TETHER_NATS_TLS_CA_FILE", "tls_ca_file"),
        ("TETHER_NATS_TLS_CERT_FILE", "tls_cert_file"),
        ("TETHER_NATS_TLS_KEY_FILE", "tls_key_file"),
        ("TETHER_NATS_INBOX_PREFIX", "inbox_prefix"),
    ];

    /// User and password authentication.
    pub fn user_password(user: impl Into<String>, password: impl Into<String>) -> Self {
        Self {
            user: Some(user.into()),
            password: Some(password.into()),
            ..Self::default()
        }
    }

    /// Whether nothing is set (anonymous, plain connection).
    pub fn is_empty(&self) -> bool {
        *self == Self::default()
    }

    /// Checks that the settings fit together: one way to authenticate, user and password
    /// together, certificate and key together, an inbox prefix of literal subject tokens.
    pub fn validate(&self) -> Result<(), String> {
        let methods = [
            ("creds_file", self.creds_file.is_some()),
            ("nkey_seed_file", self.nkey_seed_file.is_some()),
            ("user", self.user.is_some() || self.password.is_some()),
            ("token", self.token.is_some()),
        ];
        let chosen: Vec<&str> = methods.iter().filter(|m| m.1).map(|m| m.0).collect();
        if chosen.len() > 1 {
            return Err(format!(
                "nats: choose one way to authenticate, not {}",
                chosen.join(" and ")
            ));
        }
        if self.user.is_some() != self.password.is_some() {
            return Err("nats: user and password go together".into());
        }
        if self.tls_cert_file.is_some() != self.tls_key_file.is_some() {
            return Err("nats: tls_cert_file and tls_key_file go together".into());
        }
        if let Some(prefix) = &self.inbox_prefix {
            let literal = |token: &str| {
                !token.is_empty()
                    && token
                        .chars()
                        .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-' || c == '$')
            };
            if !prefix.split('.').all(literal) {
                return Err(format!(
                    "nats: inbox_prefix {prefix:?} must be dot-separated tokens of [A-Za-z0-9_$-]"
                ));
            }
        }
        Ok(())
    }

    /// Applies the settings to `options` (reads the creds and nkey seed files).
    pub async fn apply(&self, mut options: ConnectOptions) -> Result<ConnectOptions, String> {
        self.validate()?;
        if let Some(path) = &self.creds_file {
            options = options
                .credentials_file(path)
                .await
                .map_err(|e| format!("nats creds_file {}: {e}", path.display()))?;
        }
        if let Some(path) = &self.nkey_seed_file {
            let seed = tokio::fs::read_to_string(path)
                .await
                .map_err(|e| format!("nats nkey_seed_file {}: {e}", path.display()))?;
            options = options.nkey(seed.trim().to_string());
        }
        if let (Some(user), Some(password)) = (&self.user, &self.password) {
            options = options.user_and_password(user.clone(), password.clone());
        }
        if let Some(token) = &self.token {
            options = options.token(token.clone());
        }
        if let Some(ca) = &self.tls_ca_file {
            options = options.add_root_certificates(ca.clone()).require_tls(true);
        }
        if let (Some(cert), Some(key)) = (&self.tls_cert_file, &self.tls_key_file) {
            options = options
                .add_client_certificate(cert.clone(), key.clone())
                .require_tls(true);
        }
        if let Some(prefix) = &self.inbox_prefix {
            options = options.custom_inbox_prefix(prefix);
        }
        Ok(options)
    }
}

/// Connects to `url` (comma-separated list allowed) as a client named `name`, anonymously
/// (see [`connect_with`] for credentials and TLS).
///
/// Reconnects forever with backoff; connection events are logged through `tracing`.
pub async fn connect(url: &str, name: &str) -> Result<Client, BusError> {
    connect_with(url, name, &NatsAuth::default()).await
}

/// Connects to `url` (comma-separated list allowed) as a client named `name`, with the
/// credentials and TLS settings of `auth`.
///
/// Reconnects forever with backoff; connection events are logged through `tracing`. A
/// refused authentication fails the connect (no retry).
pub async fn connect_with(url: &str, name: &str, auth: &NatsAuth) -> Result<Client, BusError> {
    let servers = url
        .split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| s.parse::<ServerAddr>())
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| BusError::Connect {
            url: url.to_string(),
            reason: e.to_string(),
        })?;
    let label = name.to_string();
    let options = auth
        .apply(ConnectOptions::new())
        .await
        .map_err(|reason| BusError::Connect {
            url: url.to_string(),
            reason,
        })?;
    options
        .name(name)
        .connection_timeout(Duration::from_secs(5))
        .request_timeout(Some(Duration::from_secs(5)))
        .event_callback(move |event| {
            let label = label.clone();
            async move { log_event(&label, event) }
        })
        .connect(servers)
        .await
        .map_err(|e| BusError::Connect {
            url: url.to_string(),
            reason: e.to_string(),
        })
}

fn log_event(name: &str, event: Event) {
    match event {
        Event::Connected => tracing::info!(client = name, "nats connected"),
        Event::Disconnected => tracing::warn!(client = name, "nats disconnected"),
        Event::LameDuckMode => tracing::warn!(client = name, "nats server entering lame duck mode"),
        Event::SlowConsumer(sid) => tracing::warn!(client = name, sid, "nats slow consumer"),
        other => tracing::info!(client = name, event = %other, "nats event"),
    }
}

/// Waits until the server has processed everything `client` sent before (subscriptions in
/// particular): the client sends itself a message and waits for it, which the server can
/// only deliver after the commands that came before it on the same connection.
///
/// `Client::flush` only empties the client's write buffer; it does not prove the server
/// has registered a subscription, so a message published right after by another
/// connection can miss it.
pub async fn sync_with_server(client: &Client) -> Result<(), BusError> {
    use futures::StreamExt;
    let fail = |reason: String| BusError::Connect {
        url: "(connected)".into(),
        reason,
    };
    let subject = client.new_inbox();
    let mut probe = client
        .subscribe(subject.clone())
        .await
        .map_err(|e| fail(e.to_string()))?;
    client
        .publish(subject, bytes::Bytes::new())
        .await
        .map_err(|e| fail(e.to_string()))?;
    client.flush().await.map_err(|e| fail(e.to_string()))?;
    match tokio::time::timeout(Duration::from_secs(10), probe.next()).await {
        Ok(Some(_)) => Ok(()),
        _ => Err(fail("no round trip to the server within 10 s".into())),
    }
}
