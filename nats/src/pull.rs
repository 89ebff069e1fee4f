//! Pull consumers: giving back what a worker fetched but did not handle.

use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::pull;
use futures::StreamExt;

/// How long [`release_prefetched`] waits for one more fetched message.
const QUIET: Duration = Duration::from_millis(20);

/// At most this many messages are collected to be given back (a consumer's
/// `max_ack_pending` bounds what a stream can hold anyway).
const MOST: usize = 10_000;

/// Collecting stops after this long even if messages keep coming (the stream pulls new
/// ones as it is read): those still on their way come back after their ack wait.
const SPAN: Duration = Duration::from_millis(250);

/// Gives the messages `stream` fetched and did not hand out back to its consumer at once
/// (`Nak` without delay, in order), so whoever reads the consumer next gets them without
/// waiting out their ack wait; returns how many it gave back.
///
/// A message given back is available again at once, and a stream keeps pulling while it is
/// read: naking while reading would fetch the same messages again and again, one delivery
/// each time, until the consumer's `max_deliver` gave up on them (lost events). So the
/// messages are collected until none came for `QUIET` (at most `SPAN`), the stream is
/// dropped (its pull requests lose their interest), and only then are they given back:
/// one delivery each. JetStream may redeliver them in another order.
pub async fn release_prefetched(mut stream: pull::Stream) -> usize {
    let mut fetched = Vec::new();
    let until = tokio::time::Instant::now() + SPAN;
    while fetched.len() < MOST && tokio::time::Instant::now() < until {
        match tokio::time::timeout(QUIET, stream.next()).await {
            Ok(Some(Ok(message))) => fetched.push(message),
            _ => break,
        }
    }
    drop(stream);
    for message in &fetched {
        let _ = message.ack_with(AckKind::Nak(None)).await;
    }
    fetched.len()
}

#[cfg(test)]
mod tests {
    use super::*;
    use async_nats::jetstream::consumer::{AckPolicy, PullConsumer, pull};

    /// Fifty messages fetched by a worker that handles one of them: the other 49 go back,
    /// and the next reader gets each of them once, none given up by the consumer
    /// (`max_deliver` 5 here: a release that keeps refetching what it gave back loses them).
    /// JetStream may redeliver given-back messages in another order.
    #[tokio::test]
    async fn released_messages_all_reach_the_next_reader() {
        let server = crate::harness::single().expect("nats-server");
        let client = async_nats::connect(server.client_url())
            .await
            .expect("connect");
        let js = async_nats::jetstream::new(client);
        let stream = js
            .create_stream(async_nats::jetstream::stream::Config {
                name: "RELEASE_TEST".into(),
                subjects: vec!["rt.>".into()],
                ..Default::default()
            })
            .await
            .expect("stream");
        for i in 1..=50u32 {
            js.publish("rt.x", i.to_string().into())
                .await
                .expect("publish")
                .await
                .expect("stored");
        }
        let consumer: PullConsumer = stream
            .create_consumer(pull::Config {
                durable_name: Some("worker".into()),
                ack_policy: AckPolicy::Explicit,
                ack_wait: Duration::from_secs(30),
                max_deliver: 5,
                ..Default::default()
            })
            .await
            .expect("consumer");
        let mut first = consumer.messages().await.expect("messages");
        let handled = first.next().await.expect("one").expect("message");
        assert_eq!(&handled.payload[..], b"1");
        handled.ack().await.expect("ack");
        let released = release_prefetched(first).await;
        assert!(released >= 1, "something was prefetched: {released}");

        let mut next = consumer.messages().await.expect("messages");
        let mut got = Vec::new();
        while got.len() < 49 {
            let message = tokio::time::timeout(Duration::from_secs(10), next.next())
                .await
                .unwrap_or_else(|_| panic!("only {got:?} came back"))
                .expect("some")
                .expect("message");
            got.push(
                String::from_utf8_lossy(&message.payload)
                    .parse::<u32>()
                    .expect("number"),
            );
            message.ack().await.expect("ack");
        }
        got.sort_unstable();
        assert_eq!(got, (2..=50).collect::<Vec<_>>(), "each once");
    }
}
