//! Pull consumers: a message stream that pulls again when its pull request was lost
//! ([`Pulling`]), and giving back what a worker fetched but did not handle
//! ([`release_prefetched`]).

use std::time::Duration;

use async_nats::jetstream::AckKind;
use async_nats::jetstream::consumer::pull::{self, MessagesError, MessagesErrorKind};
use async_nats::jetstream::consumer::{PullConsumer, StreamError};
use futures::StreamExt;
use tokio::time::Instant;

/// Pause before pulling again after a pull found no consumer leader (503): the consumer
/// is electing one.
pub const REPULL_AFTER_NO_LEADER: Duration = Duration::from_millis(250);

/// Pulls answered 503 in a row after which the stream ends (`None`): the consumer has no
/// leader for about 20 s, or no longer exists; its owner starts again (and creates it).
pub const MAX_UNANSWERED_PULLS: u32 = 80;

/// The messages of a pull consumer, read with pull requests that expire after `expires`
/// and carry idle heartbeats every `heartbeat`; a pull request that was lost is replaced
/// at once.
///
/// A pull request lives in the memory of the consumer's leader. When that NATS node dies
/// (or the consumer elects another leader), the request is gone, no message and no
/// heartbeat comes any more, and async-nats sends no new request for that (it reports a
/// missed heartbeat and sends the next request only when the expired one's 5 s grace has
/// passed: `expires` + 5 s after the last request, 15 s with our 10 s pulls). A pull sent
/// while the consumer has no leader is answered 503 and is not sent again either. Here a
/// missed heartbeat (two heartbeat periods without anything) drops the message stream and
/// opens a new one at once, and a 503 does the same after [`REPULL_AFTER_NO_LEADER`]; so
/// the consumer is read again within about two heartbeats of its new leader's election.
///
/// Reopening never loses a message: the dropped stream had nothing buffered (a missed
/// heartbeat or a 503 is reported only when nothing else is waiting), and anything
/// delivered to it afterwards is redelivered by JetStream after the consumer's ack wait.
/// [`Pulling::next`] is cancel-safe (usable in `select!`).
pub struct Pulling {
    consumer: PullConsumer,
    expires: Duration,
    heartbeat: Duration,
    stream: Option<pull::Stream>,
    /// No new stream before this instant (after a 503 or a failed open).
    not_before: Option<Instant>,
    reopened: u64,
    /// Pulls answered 503 in a row (each soon after the previous one).
    unanswered: u32,
    last_unanswered: Option<Instant>,
}

impl Pulling {
    /// Opens the first message stream of `consumer`.
    pub async fn open(
        consumer: PullConsumer,
        expires: Duration,
        heartbeat: Duration,
    ) -> Result<Self, StreamError> {
        let stream = messages(&consumer, expires, heartbeat).await?;
        Ok(Self {
            consumer,
            expires,
            heartbeat,
            stream: Some(stream),
            not_before: None,
            reopened: 0,
            unanswered: 0,
            last_unanswered: None,
        })
    }

    /// How many times a lost pull was replaced.
    pub fn reopened(&self) -> u64 {
        self.reopened
    }

    /// The next message; `Err` reports a hiccup (the stream goes on: call again), `None`
    /// that the stream ended (the consumer was deleted).
    pub async fn next(&mut self) -> Option<Result<async_nats::jetstream::Message, MessagesError>> {
        loop {
            let Some(stream) = self.stream.as_mut() else {
                if let Some(at) = self.not_before {
                    tokio::time::sleep_until(at).await;
                }
                match messages(&self.consumer, self.expires, self.heartbeat).await {
                    Ok(stream) => {
                        self.stream = Some(stream);
                        self.not_before = None;
                        self.reopened += 1;
                    }
                    Err(error) => {
                        tracing::debug!(%error, "pull stream not reopened, retrying");
                        self.not_before = Some(Instant::now() + REPULL_AFTER_NO_LEADER);
                    }
                }
                continue;
            };
            let item = stream.next().await;
            match &item {
                Some(Err(error)) if error.kind() == MessagesErrorKind::MissingHeartbeat => {
                    self.stream = None;
                }
                Some(Err(error)) if error.kind() == MessagesErrorKind::NoResponders => {
                    self.stream = None;
                    // A pull that lived for a while before this 503 was answered: a new run.
                    let now = Instant::now();
                    if self
                        .last_unanswered
                        .is_some_and(|at| now - at > REPULL_AFTER_NO_LEADER * 8)
                    {
                        self.unanswered = 0;
                    }
                    self.last_unanswered = Some(now);
                    self.unanswered += 1;
                    if self.unanswered >= MAX_UNANSWERED_PULLS {
                        tracing::warn!(
                            unanswered = self.unanswered,
                            "consumer unanswered for too long; ending its stream"
                        );
                        return None;
                    }
                    self.not_before = Some(Instant::now() + REPULL_AFTER_NO_LEADER);
                }
                Some(Ok(_)) => {
                    self.unanswered = 0;
                    self.last_unanswered = None;
                }
                _ => {}
            }
            return item;
        }
    }

    /// Gives back what the current stream fetched and did not hand out
    /// ([`release_prefetched`]); returns how many.
    pub async fn release(self) -> usize {
        match self.stream {
            Some(stream) => release_prefetched(stream).await,
            None => 0,
        }
    }
}

async fn messages(
    consumer: &PullConsumer,
    expires: Duration,
    heartbeat: Duration,
) -> Result<pull::Stream, StreamError> {
    consumer
        .stream()
        .expires(expires)
        .heartbeat(heartbeat)
        .messages()
        .await
}

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

    /// The consumer's leader dies with the pull request it held: the stream pulls again
    /// once the consumer has a new leader, long before the lost pull would have expired
    /// (two minutes here; the client alone sends nothing new before then). The client is
    /// connected to a node that stays up, so no reconnect hides the lost pull.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_pull_lost_with_its_consumer_leader_is_replaced() {
        let mut cluster = tokio::task::block_in_place(crate::harness::cluster3).expect("cluster");
        let names: Vec<String> = cluster
            .servers
            .iter()
            .map(|s| s.name().to_owned())
            .collect();
        let js = async_nats::jetstream::new(
            crate::connect(&cluster.client_url(), "pull-setup")
                .await
                .expect("connect"),
        );
        let deadline = || Instant::now() + Duration::from_secs(60);
        let setup_end = deadline();
        let stream = loop {
            match js
                .create_stream(async_nats::jetstream::stream::Config {
                    name: "LOST_PULL".into(),
                    subjects: vec!["lp.>".into()],
                    num_replicas: 3,
                    ..Default::default()
                })
                .await
            {
                Ok(stream) => break stream,
                Err(error) => {
                    assert!(Instant::now() < setup_end, "stream never created: {error}");
                    eprintln!("stream not created yet: {error}");
                    tokio::time::sleep(Duration::from_millis(500)).await;
                }
            }
        };
        // The consumer and its leader, once elected (a fresh cluster may take a moment).
        let leader = loop {
            let created: Result<PullConsumer, _> = stream
                .create_consumer(pull::Config {
                    durable_name: Some("reader".into()),
                    ack_policy: AckPolicy::Explicit,
                    ..Default::default()
                })
                .await;
            let leader = match created {
                Ok(mut consumer) => consumer
                    .info()
                    .await
                    .ok()
                    .and_then(|info| info.cluster.as_ref().and_then(|c| c.leader.clone())),
                Err(error) => {
                    eprintln!("consumer not created yet: {error}");
                    None
                }
            };
            if let Some(leader) = leader {
                break leader;
            }
            assert!(Instant::now() < setup_end, "consumer never got a leader");
            tokio::time::sleep(Duration::from_millis(500)).await;
        };
        let leader = names
            .iter()
            .position(|n| *n == leader)
            .expect("leader node");
        let survivor = cluster.servers[(leader + 1) % 3].client_url();
        let reader = async_nats::jetstream::new(
            crate::connect(&survivor, "pull-reader")
                .await
                .expect("connect"),
        );
        let consumer: PullConsumer = reader
            .get_stream("LOST_PULL")
            .await
            .expect("stream")
            .get_consumer("reader")
            .await
            .expect("consumer");
        let mut pulling = Pulling::open(consumer, Duration::from_secs(120), Duration::from_secs(1))
            .await
            .expect("pulling");
        let payload = bytes::Bytes::from_static(b"before");
        let headers = async_nats::HeaderMap::new();
        crate::unavailable::publish_until(&reader, "lp.a", &headers, &payload, deadline())
            .await
            .expect("stored");
        let first = next_message(&mut pulling).await;
        assert_eq!(&first.payload[..], b"before");
        first.ack().await.expect("ack");

        cluster.kill(leader);
        let payload = bytes::Bytes::from_static(b"after");
        // A publish sent just before the servers noticed the dead node can time out: sent
        // again with the same id (stored once).
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(async_nats::header::NATS_MESSAGE_ID, "after");
        let give_up = deadline();
        loop {
            match crate::unavailable::publish_until(&reader, "lp.a", &headers, &payload, give_up)
                .await
            {
                Ok(_) => break,
                Err(error) if Instant::now() < give_up => eprintln!("publish again: {error}"),
                Err(error) => panic!("not stored after the election: {error}"),
            }
        }
        // (When the new leader happens to know the pull, nothing was lost and nothing is
        // replaced: `reopened()` tells which case ran.)
        let second = next_message(&mut pulling).await;
        assert_eq!(&second.payload[..], b"after");
        eprintln!("pulls replaced: {}", pulling.reopened());
    }

    /// The next message, skipping hiccups; fails after a minute (well before the lost
    /// pull's expiry).
    async fn next_message(pulling: &mut Pulling) -> async_nats::jetstream::Message {
        let end = Instant::now() + Duration::from_secs(60);
        loop {
            match tokio::time::timeout_at(end, pulling.next()).await {
                Ok(Some(Ok(message))) => return message,
                Ok(Some(Err(error))) => eprintln!("hiccup: {error}"),
                Ok(None) => panic!("stream ended"),
                Err(_) => panic!("no message within a minute"),
            }
        }
    }

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
