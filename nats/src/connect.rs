//! How Tether services connect to NATS.

use std::time::Duration;

use async_nats::{Client, ConnectOptions, Event, ServerAddr};

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

/// Connects to `url` (comma-separated list allowed) as a client named `name`.
///
/// Reconnects forever with backoff; connection events are logged through `tracing`.
pub async fn connect(url: &str, name: &str) -> Result<Client, BusError> {
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
    ConnectOptions::new()
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
