//! Writes refused because a stream has no leader right now, sent again within a deadline.
//!
//! While a replicated stream elects a leader (its leader's NATS node died or restarted;
//! nats-server's Raft election timeout is 4–9 s), nobody listens on the stream's subjects:
//! the server answers a JetStream publish at once with a 503 "no responders" status, which
//! async-nats reports as [`PublishErrorKind::StreamNotFound`] ("no stream found for given
//! subject"). Such a publish reached no stream, so it was not stored: sending it again
//! cannot store it twice, and the answer the caller finally gets (stored or not) is true.
//!
//! [`publish_until`] and [`settle`] send again with short backoff while that is the
//! answer, until the stream answers or `deadline` passes. Every other outcome is returned at
//! once: an acknowledgement, a refusal (wrong expected sequence, …), and above all a
//! timeout, whose outcome is unknown (the write may be stored: only the caller, with its
//! dedupe id or sequence check, may decide to send again). A stream that really does not
//! exist answers the same 503: it surfaces as that error once the deadline has passed.

use async_nats::HeaderMap;
use async_nats::jetstream::context::{PublishAckFuture, PublishError, PublishErrorKind};
use async_nats::jetstream::publish::PublishAck;
use async_nats::jetstream::stream::{DirectGetError, DirectGetErrorKind};
use async_nats::jetstream::{self};
use bytes::Bytes;
use std::time::Duration;
use tokio::time::Instant;

/// First pause before a refused write is sent again (doubling up to [`MAX_BACKOFF`]).
pub const FIRST_BACKOFF: Duration = Duration::from_millis(50);
/// Longest pause between two attempts.
pub const MAX_BACKOFF: Duration = Duration::from_millis(500);

/// True when the publish reached no stream: the 503 "no responders" answer (no stream
/// leader listens on the subject now, or no stream has it). Nothing was stored.
pub fn not_stored(error: &PublishError) -> bool {
    error.kind() == PublishErrorKind::StreamNotFound
}

/// True when a direct get found no replica to answer (503 "no responders"): retry.
pub fn direct_get_unanswered(error: &DirectGetError) -> bool {
    matches!(
        error.kind(),
        DirectGetErrorKind::ErrorResponse(status, _)
            if status == async_nats::StatusCode::NO_RESPONDERS
    )
}

/// Backoff between attempts: doubles from [`FIRST_BACKOFF`] up to [`MAX_BACKOFF`], never
/// past the deadline.
#[derive(Debug)]
pub struct Backoff {
    next: Duration,
    deadline: Instant,
}

impl Backoff {
    /// A backoff that gives up at `deadline`.
    pub fn until(deadline: Instant) -> Self {
        Self {
            next: FIRST_BACKOFF,
            deadline,
        }
    }

    /// Sleeps before the next attempt and returns true, or returns false at once when the
    /// next attempt would start after the deadline.
    pub async fn wait(&mut self) -> bool {
        let at = Instant::now() + self.next;
        if at >= self.deadline {
            return false;
        }
        tokio::time::sleep_until(at).await;
        self.next = (self.next * 2).min(MAX_BACKOFF);
        true
    }
}

/// Publishes to a stream and waits for its acknowledgement, sending again while the answer
/// is "no stream listening" (see the module) until `deadline`.
pub async fn publish_until(
    js: &jetstream::Context,
    subject: &str,
    headers: &HeaderMap,
    payload: &Bytes,
    deadline: Instant,
) -> Result<PublishAck, PublishError> {
    let first = js
        .publish_with_headers(subject.to_owned(), headers.clone(), payload.clone())
        .await;
    settle(js, first, subject, headers, payload, deadline).await
}

/// Waits for the acknowledgement of a publish already sent (`first`), sending the same
/// message again while the answer is "no stream listening" until `deadline`.
pub async fn settle(
    js: &jetstream::Context,
    first: Result<PublishAckFuture, PublishError>,
    subject: &str,
    headers: &HeaderMap,
    payload: &Bytes,
    deadline: Instant,
) -> Result<PublishAck, PublishError> {
    let mut backoff = Backoff::until(deadline);
    let mut sent = first;
    loop {
        let answer = match sent {
            Ok(ack) => ack.await,
            Err(error) => Err(error),
        };
        match answer {
            Err(error) if not_stored(&error) && backoff.wait().await => {
                tracing::debug!(subject, "stream has no leader, publishing again");
            }
            answer => return answer,
        }
        sent = js
            .publish_with_headers(subject.to_owned(), headers.clone(), payload.clone())
            .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn backoff_stops_before_the_deadline() {
        let started = Instant::now();
        let mut backoff = Backoff::until(started + Duration::from_millis(120));
        // 50 ms fits, 100 more would end past the deadline (whenever the first ended).
        assert!(backoff.wait().await);
        assert!(!backoff.wait().await);
        let mut past = Backoff::until(Instant::now());
        assert!(!past.wait().await, "nothing starts after the deadline");
    }

    /// A publish to a subject no stream listens on is refused with "no stream" and
    /// surfaces once the deadline passed; once a stream exists, the same call stores it.
    #[tokio::test]
    async fn a_publish_waits_for_a_stream_within_the_deadline() {
        let server = crate::harness::single().expect("nats-server");
        let client = async_nats::connect(server.client_url())
            .await
            .expect("connect");
        let js = jetstream::new(client);
        let payload = Bytes::from_static(b"x");
        let headers = HeaderMap::new();
        let deadline = Instant::now() + Duration::from_millis(300);
        let refused = publish_until(&js, "nostream.a", &headers, &payload, deadline).await;
        let error = refused.expect_err("no stream: refused");
        assert!(not_stored(&error), "{error}");
        assert!(Instant::now() >= deadline - MAX_BACKOFF);

        // The stream appears while a publish is retrying: it is stored once.
        let creator = {
            let js = js.clone();
            tokio::spawn(async move {
                tokio::time::sleep(Duration::from_millis(300)).await;
                js.create_stream(jetstream::stream::Config {
                    name: "LATE".into(),
                    subjects: vec!["nostream.>".into()],
                    ..Default::default()
                })
                .await
                .expect("stream")
            })
        };
        let deadline = Instant::now() + Duration::from_secs(30);
        let ack = publish_until(&js, "nostream.b", &headers, &payload, deadline)
            .await
            .expect("stored once the stream exists");
        let mut stream = creator.await.expect("creator");
        assert_eq!(ack.stream, "LATE");
        assert_eq!(
            stream.info().await.expect("info").state.messages,
            1,
            "stored once"
        );
    }
}
