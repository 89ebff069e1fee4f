//! Business-service SDK for Tether.
//!
//! A business service (chat, push, live rooms, …) talks to Tether through three subjects of
//! its app, all documented in `schemas/PROTOCOL.md`, section 11, so any NATS client in any
//! language can do the same:
//!
//! - **uplinks**: [`Business::serve_uplinks`] answers the requests state sends on
//!   `tether.<app>.biz.up` with [`UplinkReply`] (the device gets UP_ACK 0 only after
//!   `UplinkReply::Stored`). Requests can repeat (state retries on timeout), so handlers must be
//!   idempotent on (app, did, msg_id).
//! - **pushes**: [`Business::push`] (request, with a [`PushReply`]) and
//!   [`Business::push_nowait`] (publish) send a [`Push`] on `tether.<app>.push`.
//! - **presence**: [`Business::presence`] streams [`PresenceEvent`]s from
//!   `tether.<app>.presence`; [`Business::memberships`] streams the joined/left
//!   [`MembershipEvent`]s sent on the same subject.
//! - **sessions**: [`Business::sessions`] binds, unbinds and replaces devices' sessions
//!   and marks rooms recoverable, on `tether.<app>.session`.
//!
//! ```no_run
//! # async fn run() -> Result<(), Box<dyn std::error::Error>> {
//! use tether_business::{Business, Push, UplinkReply};
//!
//! let nats = async_nats::connect("nats://127.0.0.1:4222").await?;
//! let biz = Business::new(nats, "demo");
//! let pusher = biz.clone();
//! biz.serve_uplinks("tether-biz", move |up| {
//!     let pusher = pusher.clone();
//!     async move {
//!         // store `up.body` keyed by (up.did, up.msg_id) here, then echo it back
//!         let _ = pusher.push_nowait(Push::to_dids([up.did.clone()], up.body)).await;
//!         UplinkReply::stored(None)
//!     }
//! })
//! .await?;
//! # Ok(())
//! # }
//! ```
//!
//! The JSON shapes (the bus contract, `tether_schemas::bus`) and the header codec
//! ([`HeaderCodec`]) are re-exported in [`wire`]; the state service uses the same types.

pub mod answers;
pub mod session;
pub mod wire;

use std::future::Future;
use std::sync::Arc;
use std::time::Duration;

use async_nats::Client;
use futures::{Stream, StreamExt, future};
use tether_nats::subjects;

use tokio::sync::Semaphore;
use tracing::{debug, warn};

pub use session::{MembershipChange, MembershipEvent, SessionOp, SessionReply, SessionRequest};
pub use tether_schemas::ErrorCode;
pub use wire::HeaderCodec;
pub use wire::{Accepted, PresenceEvent, Push, PushReply, Uplink, UplinkReply};
#[doc(hidden)]
pub use wire::{PresenceEvent as Presence, UplinkReply as Stored};

/// How many uplink handlers run at once by default (per [`Business::serve_uplinks`] call).
pub const DEFAULT_CONCURRENCY: usize = 256;

/// What can go wrong talking to Tether.
#[derive(Debug, thiserror::Error)]
pub enum BusinessError {
    /// Subscribing failed (connection closed, permissions).
    #[error("subscribe: {0}")]
    Subscribe(#[from] async_nats::SubscribeError),
    /// Publishing failed.
    #[error("publish: {0}")]
    Publish(#[from] async_nats::PublishError),
    /// A request got no answer: no state service listening (`NoResponders`), timeout, or a
    /// closed connection. A QoS1 push may or may not have been stored; resending creates a
    /// second message.
    #[error("request: {0}")]
    Request(#[from] async_nats::RequestError),
    /// Tether refused the request (`{"error":{…}}`), e.g. `bad_request`; also returned
    /// before sending when a [`Push`] breaks the rules of section 11.2.
    #[error("refused ({0}): {1}")]
    Refused(ErrorCode, String),
    /// The reply was not the documented JSON.
    #[error("bad reply: {0}")]
    BadReply(#[from] serde_json::Error),
}

impl From<wire::WireError> for BusinessError {
    fn from(error: wire::WireError) -> Self {
        BusinessError::Refused(error.code, error.message)
    }
}

/// A business service's handle on its app's subjects. Cheap to clone.
#[derive(Debug, Clone)]
pub struct Business {
    client: Client,
    app: String,
    concurrency: usize,
    uplink_subject: Option<String>,
}

/// How long a session request waits for its reply at least (more for many devices).
const SESSION_TIMEOUT_BASE: Duration = Duration::from_secs(15);

impl Business {
    /// A handle for `app` on an existing NATS connection.
    pub fn new(client: Client, app: impl Into<String>) -> Self {
        Business {
            client,
            app: app.into(),
            concurrency: DEFAULT_CONCURRENCY,
            uplink_subject: None,
        }
    }

    /// Serves uplinks on `subject` instead of `tether.<app>.biz.up`: the app's
    /// `business_subject` pipeline setting (PROTOCOL 12.5), e.g. `tether.<app>.biz.v2`
    /// for a new version of the service that an operator switches the app to.
    pub fn with_uplink_subject(mut self, subject: impl Into<String>) -> Self {
        self.uplink_subject = Some(subject.into());
        self
    }

    /// How many uplink handlers may run at once (at least 1); further requests wait in the
    /// subscription's buffer.
    pub fn with_concurrency(mut self, concurrency: usize) -> Self {
        self.concurrency = concurrency.max(1);
        self
    }

    /// The app id.
    pub fn app(&self) -> &str {
        &self.app
    }

    /// The NATS connection.
    pub fn client(&self) -> &Client {
        &self.client
    }

    /// Serves uplinks with `handler` until the subscription ends (connection closed or
    /// drained); answers each request with the handler's result.
    ///
    /// Subscribes to `tether.<app>.biz.up` (or [`Business::with_uplink_subject`]) in
    /// `queue_group` (suggested:
    /// [`wire::DEFAULT_QUEUE_GROUP`]), so several instances share the load. Each request
    /// runs in its own task, at most [`Business::with_concurrency`] at once. A request
    /// with malformed headers is answered `bad_request` without calling the handler; a
    /// handler that panics sends no answer, so state retries it.
    ///
    /// The handler sees each `(did, msg_id)` once per call of this method: a repeat that
    /// arrives while it runs gets that run's answer, and a repeat of a stored message
    /// within two minutes gets the stored answer again ([`answers`]). Error answers are
    /// not kept (a resend after `unavailable` is a new try). Other instances do not share
    /// this memory, so the app's store must still be idempotent by `(app, did, msg_id)`.
    pub async fn serve_uplinks<F, Fut>(
        &self,
        queue_group: &str,
        handler: F,
    ) -> Result<(), BusinessError>
    where
        F: Fn(Uplink) -> Fut + Send + Sync + 'static,
        Fut: Future<Output = UplinkReply> + Send,
    {
        let subject = self
            .uplink_subject
            .clone()
            .unwrap_or_else(|| subjects::business_up(&self.app));
        let mut requests = self
            .client
            .queue_subscribe(subject.clone(), queue_group.to_owned())
            .await?;
        debug!(%subject, queue_group, "serving uplinks");
        let handler = Arc::new(handler);
        let permits = Arc::new(Semaphore::new(self.concurrency));
        let answers = Arc::new(answers::Answers::default());
        while let Some(message) = requests.next().await {
            let Some(reply_to) = message.reply.clone() else {
                warn!(%subject, "uplink request without a reply subject; ignored");
                continue;
            };
            let Ok(permit) = permits.clone().acquire_owned().await else {
                break;
            };
            let handler = handler.clone();
            let client = self.client.clone();
            let answers = answers.clone();
            tokio::spawn(async move {
                let answer =
                    match Uplink::from_message(message.headers.as_ref(), message.payload.clone()) {
                        Ok(uplink) => match answers.begin(&uplink.did, uplink.msg_id) {
                            answers::Begin::Run(running) => {
                                let reply = handler(uplink).await;
                                let stored = matches!(reply, UplinkReply::Stored { .. });
                                let answer = reply.to_json();
                                running.finish(answer.clone(), stored);
                                answer
                            }
                            answers::Begin::Answer(answer) => answer,
                            answers::Begin::Wait(mut first) => {
                                // The same message is being handled: its answer is this one's.
                                let answer = match first.wait_for(Option::is_some).await {
                                    Ok(answer) => answer.clone(),
                                    Err(_) => None,
                                };
                                let Some(answer) = answer else {
                                    drop(permit);
                                    return;
                                };
                                answer
                            }
                        },
                        Err(error) => {
                            warn!(%error, "malformed uplink request");
                            UplinkReply::error(error.code, error.message).to_json()
                        }
                    };
                if let Err(error) = client.publish(reply_to, answer).await {
                    warn!(%error, "could not answer an uplink request");
                }
                drop(permit);
            });
        }
        Ok(())
    }

    /// Sends a push as a request and waits for state's answer (the client's request
    /// timeout applies, 10 s by default). `Ok` lists the accepted and offline devices;
    /// an `{"error":…}` answer or a push that breaks the rules is
    /// [`BusinessError::Refused`].
    pub async fn push(&self, push: Push) -> Result<PushReply, BusinessError> {
        let headers = push.to_headers()?;
        let reply = self
            .client
            .request_with_headers(subjects::push(&self.app), headers, push.body)
            .await?;
        Ok(wire::PushReplyWire::from_json(&reply.payload)?.into_result()?)
    }

    /// Publishes a push without waiting for an answer (fire and forget: a refusal or a
    /// missing state service goes unnoticed).
    pub async fn push_nowait(&self, push: Push) -> Result<(), BusinessError> {
        let headers = push.to_headers()?;
        self.client
            .publish_with_headers(subjects::push(&self.app), headers, push.body)
            .await?;
        Ok(())
    }

    /// Sends a session request (bind, unbind, replace, configure) and waits for state's
    /// answer: the change is in the event log once this returns `Ok`; gateways apply it
    /// moments later.
    pub async fn sessions(&self, request: SessionRequest) -> Result<SessionReply, BusinessError> {
        request.validate()?;
        // The reply comes once every device's change is applied (PROTOCOL 11.5), which
        // takes longer for a large request: state allows 10 s plus 1 ms per device.
        let devices = request.all_dids().len() + 100 * request.all_uids().len();
        let budget = SESSION_TIMEOUT_BASE + Duration::from_millis(2 * devices as u64);
        let asked = async_nats::Request::new()
            .payload(request.to_json())
            .timeout(Some(budget));
        let reply = self
            .client
            .send_request(subjects::session(&self.app), asked)
            .await?;
        Ok(session::SessionReplyWire::from_json(&reply.payload)?.into_result()?)
    }

    /// Membership events (joined/left) of the app, for apps whose state configuration
    /// turns them on (`membership_events`). The stream ends when the connection closes.
    pub async fn memberships(
        &self,
    ) -> Result<impl Stream<Item = MembershipEvent> + Send + Unpin + 'static, BusinessError> {
        let subscriber = self.client.subscribe(subjects::presence(&self.app)).await?;
        Ok(subscriber
            .filter_map(|message| future::ready(MembershipEvent::from_json(&message.payload).ok())))
    }

    /// Presence events of the app (every subscriber gets every event). Membership events
    /// on the same subject are skipped; other malformed events are logged and skipped. The stream ends when the connection closes.
    pub async fn presence(
        &self,
    ) -> Result<impl Stream<Item = PresenceEvent> + Send + Unpin + 'static, BusinessError> {
        let subscriber = self.client.subscribe(subjects::presence(&self.app)).await?;
        Ok(presence_stream(subscriber))
    }

    /// Like [`Business::presence`], but in a queue group: each event goes to one member.
    pub async fn presence_in_group(
        &self,
        queue_group: &str,
    ) -> Result<impl Stream<Item = PresenceEvent> + Send + Unpin + 'static, BusinessError> {
        let subscriber = self
            .client
            .queue_subscribe(subjects::presence(&self.app), queue_group.to_owned())
            .await?;
        Ok(presence_stream(subscriber))
    }
}

fn presence_stream(
    subscriber: async_nats::Subscriber,
) -> impl Stream<Item = PresenceEvent> + Send + Unpin + 'static {
    subscriber.filter_map(|message| {
        future::ready(match PresenceEvent::from_json(&message.payload) {
            Ok(event) => Some(event),
            Err(_) if MembershipEvent::from_json(&message.payload).is_ok() => None,
            Err(error) => {
                warn!(%error, "malformed presence event; skipped");
                None
            }
        })
    })
}
