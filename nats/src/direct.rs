//! Stored messages of a stream through any JetStream API prefix (a peer region's domain
//! included): batched direct gets (`$JS.API.DIRECT.GET.<stream>` with `batch`, nats-server
//! 2.11+), up to a few hundred stored messages of one subject in a single request instead
//! of one request per message (state replays a device's inbox with it), and deleting one
//! stored message (a moved device's message once its copy was acknowledged elsewhere).

use std::time::Duration;

use async_nats::{Client, HeaderMap};
use bytes::Bytes;
use futures::StreamExt;

/// The default JetStream API prefix (no domain).
pub const JS_API_PREFIX: &str = "$JS.API";

/// Most messages asked for in one batch.
pub const MAX_BATCH: usize = 1_000;

/// One stored message from a batch.
#[derive(Debug, Clone)]
pub struct DirectMessage {
    /// Stream sequence.
    pub sequence: u64,
    /// The message's own headers (plus the server's `Nats-*` ones).
    pub headers: HeaderMap,
    /// Payload.
    pub payload: Bytes,
}

/// A batch and how many matching messages are still stored after it.
#[derive(Debug, Clone, Default)]
pub struct Batch {
    /// Messages in stream order.
    pub messages: Vec<DirectMessage>,
    /// Matching messages after the last one returned (0: the batch reached the end).
    pub pending: u64,
}

/// Why a batch could not be read.
#[derive(Debug, thiserror::Error)]
pub enum DirectError {
    /// Subscribing or publishing the request failed.
    #[error("direct get request: {0}")]
    Request(String),
    /// The server answered with an error status.
    #[error("direct get refused: {status} {description}")]
    Status {
        /// Status code.
        status: u16,
        /// The server's description.
        description: String,
    },
    /// The batch did not end within the wait.
    #[error("direct get: no end of batch within {0:?}")]
    Timeout(Duration),
    /// A message without a readable `Nats-Sequence`.
    #[error("direct get: message without a sequence")]
    Malformed,
}

/// Reads up to `limit` (at most [`MAX_BATCH`]) messages on `subject` of `stream`, with a
/// stream sequence of at least `from`, in one request. The stream must allow direct gets.
pub async fn next_batch(
    client: &Client,
    api_prefix: &str,
    stream: &str,
    subject: &str,
    from: u64,
    limit: usize,
    wait: Duration,
) -> Result<Batch, DirectError> {
    let limit = limit.clamp(1, MAX_BATCH);
    let inbox = client.new_inbox();
    let mut replies = client
        .subscribe(inbox.clone())
        .await
        .map_err(|e| DirectError::Request(e.to_string()))?;
    let request = serde_json::json!({
        "seq": from.max(1),
        "next_by_subj": subject,
        "batch": limit,
    });
    let body = Bytes::from(request.to_string());
    client
        .publish_with_reply(format!("{api_prefix}.DIRECT.GET.{stream}"), inbox, body)
        .await
        .map_err(|e| DirectError::Request(e.to_string()))?;
    let mut batch = Batch::default();
    let deadline = tokio::time::Instant::now() + wait;
    let outcome = loop {
        let Ok(Some(message)) = tokio::time::timeout_at(deadline, replies.next()).await else {
            break Err(DirectError::Timeout(wait));
        };
        match message.status.map(|s| s.as_u16()) {
            None => {
                let headers = message.headers.unwrap_or_default();
                let sequence = header_u64(&headers, "Nats-Sequence").ok_or(DirectError::Malformed);
                let sequence = match sequence {
                    Ok(sequence) => sequence,
                    Err(error) => break Err(error),
                };
                batch.messages.push(DirectMessage {
                    sequence,
                    headers,
                    payload: message.payload,
                });
            }
            // End of batch: says how many more match.
            Some(204) => {
                batch.pending = message
                    .headers
                    .as_ref()
                    .and_then(|h| header_u64(h, "Nats-Num-Pending"))
                    .unwrap_or(0);
                break Ok(batch);
            }
            // Nothing stored at or after `from`.
            Some(404) => break Ok(batch),
            Some(status) => {
                break Err(DirectError::Status {
                    status,
                    description: message
                        .description
                        .unwrap_or_default()
                        .chars()
                        .take(200)
                        .collect(),
                });
            }
        }
    };
    let _ = replies.unsubscribe().await;
    outcome
}

/// Why a stored message could not be deleted.
#[derive(Debug, thiserror::Error)]
pub enum DeleteError {
    /// The request failed or got no answer within the wait.
    #[error("message delete request: {0}")]
    Request(String),
    /// The server answered with an API error (404-like "no message found" included).
    #[error("message delete refused: {0}")]
    Refused(String),
}

/// Deletes the message with stream sequence `sequence` from `stream` through `api_prefix`
/// (`$JS.<domain>.API` for another region), without overwriting its bytes.
pub async fn delete(
    client: &Client,
    api_prefix: &str,
    stream: &str,
    sequence: u64,
    wait: Duration,
) -> Result<(), DeleteError> {
    let body = serde_json::json!({ "seq": sequence, "no_erase": true });
    let asked = client.request(
        format!("{api_prefix}.STREAM.MSG.DELETE.{stream}"),
        Bytes::from(body.to_string()),
    );
    let answer = tokio::time::timeout(wait, asked)
        .await
        .map_err(|_| DeleteError::Request(format!("no answer within {wait:?}")))?
        .map_err(|e| DeleteError::Request(e.to_string()))?;
    #[derive(serde::Deserialize)]
    struct Answer {
        #[serde(default)]
        success: bool,
        error: Option<serde_json::Value>,
    }
    match serde_json::from_slice::<Answer>(&answer.payload) {
        Ok(Answer { success: true, .. }) => Ok(()),
        Ok(Answer { error, .. }) => Err(DeleteError::Refused(
            error.map_or_else(|| "no success".to_string(), |e| e.to_string()),
        )),
        Err(e) => Err(DeleteError::Request(format!("unreadable answer: {e}"))),
    }
}

fn header_u64(headers: &HeaderMap, name: &str) -> Option<u64> {
    headers.get(name)?.as_str().trim().parse().ok()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_batch_returns_one_subjects_messages_in_order_and_what_is_left() {
        let server = crate::harness::single().expect("nats-server");
        let client = async_nats::connect(server.client_url())
            .await
            .expect("connect");
        let js = async_nats::jetstream::new(client.clone());
        js.create_stream(async_nats::jetstream::stream::Config {
            name: "DIRECT_TEST".into(),
            subjects: vec!["dt.>".into()],
            allow_direct: true,
            ..Default::default()
        })
        .await
        .expect("stream");
        for i in 0..10u32 {
            for subject in ["dt.a", "dt.b"] {
                js.publish(subject, format!("{subject}-{i}").into())
                    .await
                    .expect("publish")
                    .await
                    .expect("stored");
            }
        }
        let wait = Duration::from_secs(5);
        let first = next_batch(&client, JS_API_PREFIX, "DIRECT_TEST", "dt.a", 1, 4, wait)
            .await
            .expect("batch");
        let bodies: Vec<_> = first.messages.iter().map(|m| m.payload.clone()).collect();
        assert_eq!(bodies, ["dt.a-0", "dt.a-1", "dt.a-2", "dt.a-3"]);
        assert_eq!(first.pending, 6);
        let after = first.messages.last().expect("last").sequence + 1;
        let rest = next_batch(
            &client,
            JS_API_PREFIX,
            "DIRECT_TEST",
            "dt.a",
            after,
            100,
            wait,
        )
        .await
        .expect("batch");
        assert_eq!(rest.messages.len(), 6);
        assert_eq!(rest.pending, 0);
        assert_eq!(rest.messages[5].payload, "dt.a-9");
        let none = next_batch(&client, JS_API_PREFIX, "DIRECT_TEST", "dt.c", 1, 10, wait)
            .await
            .expect("empty");
        assert!(none.messages.is_empty());
        let missing = next_batch(
            &client,
            JS_API_PREFIX,
            "NO_SUCH",
            "dt.a",
            1,
            10,
            Duration::from_secs(1),
        )
        .await;
        assert!(missing.is_err(), "{missing:?}");
    }
}
