//! Where and as whom to log in: the endpoint rotation and the current token, and one
//! connect round over the endpoints (with the one token refresh a refused token earns).

use tether_schemas::ErrorCode;

use crate::config::{ClientConfig, Endpoint, TokenSource};
use crate::error::ClientError;
use crate::login::{Link, LoginParams, login};

/// Login identity and endpoint rotation; survives reconnects.
pub(crate) struct Session {
    pub config: ClientConfig,
    /// Token for the next LOGIN (from the config, the provider or a REDIRECT).
    token: String,
    /// Endpoints in the order to try them; a REDIRECT target goes first.
    endpoints: Vec<Endpoint>,
    /// Index of the endpoint last logged in to (where the next round starts).
    current: usize,
    /// Room cursors (session → highest room_seq delivered), shared with the handles.
    pub rooms: RoomCursors,
}

/// Room cursors shared by the connection task (which advances them) and the
/// [`crate::Client`] handles (which read them).
pub(crate) type RoomCursors =
    std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, u64>>>;

impl Session {
    /// A session with its first token (calls the provider, if there is one).
    pub async fn new(config: ClientConfig) -> Result<Session, ClientError> {
        let token = config.token.fetch().await?;
        let endpoints = match &config.discovery {
            Some(discovery) => discovery.endpoints(&config.endpoints),
            None => config.endpoints.clone(),
        };
        let rooms = std::sync::Arc::new(std::sync::Mutex::new(config.room_cursors.clone()));
        Ok(Session {
            config,
            token,
            endpoints,
            current: 0,
            rooms,
        })
    }

    /// LOGIN parameters with `token` and `resume_seq`.
    pub fn params(&self, token: String, resume_seq: u64) -> LoginParams {
        LoginParams {
            app: self.config.app.clone(),
            did: self.config.did.clone(),
            sdk: self.config.sdk.clone(),
            token,
            resume_seq,
            rooms: self
                .rooms
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .iter()
                .map(|(session, seq)| (session.clone(), *seq))
                .collect(),
            timeout: self.config.connect_timeout,
            max_frame_len: self.config.max_frame_len,
        }
    }

    /// Makes the next round start at the endpoint after the current one (`going_away`).
    pub fn skip_current(&mut self) {
        self.current = (self.current + 1) % self.endpoints.len().max(1);
    }

    /// After a successful REDIRECT: the new endpoint goes first, with its token.
    pub fn adopt(&mut self, endpoint: Endpoint, token: String) {
        // Earlier redirect targets are dropped: the list stays the configured endpoints
        // plus at most this one.
        let configured = self.config.endpoints.iter().filter(|e| **e != endpoint);
        let endpoints: Vec<Endpoint> = configured.cloned().collect();
        self.endpoints = std::iter::once(endpoint).chain(endpoints).collect();
        self.current = 0;
        self.token = token;
    }

    /// Tries every endpoint once, in order from the current one. A refused token
    /// (`bad_token`, `token_expired`) is replaced from the token source once per round;
    /// a second refusal ends the round with that error. Returns the last error if no
    /// endpoint let us in.
    pub async fn connect_round(&mut self, resume_seq: u64) -> Result<Link, ClientError> {
        if let Some(discovery) = self.config.discovery.clone()
            && let Some((endpoints, token)) = discovery.refresh(&self.config).await
        {
            self.endpoints = endpoints;
            self.token = token;
            self.current = 0;
        }
        let n = self.endpoints.len();
        let mut refreshed = false;
        let mut last = ClientError::Config("no endpoint".into());
        let mut i = 0;
        while i < n {
            let index = (self.current + i) % n;
            let Some(endpoint) = self.endpoints.get(index).cloned() else {
                break;
            };
            match login(
                endpoint.clone(),
                self.params(self.token.clone(), resume_seq),
            )
            .await
            {
                Ok(link) => {
                    self.current = index;
                    return Ok(link);
                }
                Err(ClientError::Login {
                    code: code @ (ErrorCode::BadToken | ErrorCode::TokenExpired),
                    text,
                    retry_after_ms,
                }) => {
                    tracing::info!(%endpoint, %code, %text, "token refused");
                    let error = ClientError::Login {
                        code,
                        text,
                        retry_after_ms,
                    };
                    if refreshed {
                        return Err(error);
                    }
                    refreshed = true;
                    let fresh = self.config.token.fetch().await?;
                    if fresh == self.token && matches!(self.config.token, TokenSource::Static(_)) {
                        return Err(error);
                    }
                    self.token = fresh;
                    continue; // the same endpoint again, with the new token
                }
                Err(error @ ClientError::Login { code, .. }) if !code.is_retryable() => {
                    return Err(error);
                }
                Err(error) => {
                    tracing::debug!(%endpoint, %error, "endpoint failed");
                    last = error;
                }
            }
            i += 1;
        }
        Err(last)
    }
}

/// Whether a failed round means giving up rather than trying again later.
pub(crate) fn is_fatal(error: &ClientError) -> bool {
    match error {
        ClientError::Login { code, .. } => !code.is_retryable(),
        ClientError::Config(_) => true,
        _ => false,
    }
}
