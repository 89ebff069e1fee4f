//! [`Client`]: the cheap, cloneable handle the app holds. It talks to the connection
//! task over a bounded channel, like a nats.rs `Client`.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use tether_schemas::{Frame, FrameError, pb};
use tokio::sync::{mpsc, oneshot};

use crate::config::ClientConfig;
use crate::connection::{Command, Task};
use crate::error::ClientError;
use crate::event::{Event, UpAck};
use crate::session::Session;

/// A connected device. Clone it freely; every clone drives the same connection, which
/// closes when [`Client::close`] is called or the last clone is dropped.
#[derive(Clone)]
pub struct Client {
    inner: Arc<Inner>,
}

struct Inner {
    commands: mpsc::Sender<Command>,
    next_msg_id: AtomicU64,
    ack_timeout: Duration,
    max_up_frame_len: usize,
    did: String,
    app: String,
    rooms: crate::session::RoomCursors,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Client")
            .field("app", &self.inner.app)
            .field("did", &self.inner.did)
            .finish_non_exhaustive()
    }
}

impl Client {
    /// Connects to the first configured endpoint that answers and logs in.
    ///
    /// Returns the handle and the receiver of [`Event`]s; the first event is
    /// [`Event::Connected`]. Keep reading events: when the channel is full the client
    /// stops reading from the gateway (and UP_ACKs wait too). The channel closes when the
    /// client stops for good.
    ///
    /// A refused LOGIN gives [`ClientError::Login`] with the gateway's code (after one
    /// token refresh for `bad_token`/`token_expired` when a provider is configured).
    pub async fn connect(
        config: ClientConfig,
    ) -> Result<(Client, mpsc::Receiver<Event>), ClientError> {
        config.validate()?;
        let (command_tx, command_rx) = mpsc::channel(config.command_capacity);
        let (event_tx, event_rx) = mpsc::channel(config.event_capacity);
        let first_msg_id = config.first_msg_id.unwrap_or_else(|| {
            SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(1, |d| u64::try_from(d.as_micros()).unwrap_or(u64::MAX / 2))
        });
        let session = Session::new(config.clone()).await?;
        let inner = Inner {
            rooms: session.rooms.clone(),
            commands: command_tx,
            next_msg_id: AtomicU64::new(first_msg_id.max(1)),
            ack_timeout: config.ack_timeout,
            max_up_frame_len: config.max_up_frame_len,
            did: config.did.clone(),
            app: config.app.clone(),
        };
        let mut task = Task::new(session, command_rx, event_tx);
        let link = task.first_link().await?;
        tokio::spawn(task.run(link));
        Ok((
            Client {
                inner: Arc::new(inner),
            },
            event_rx,
        ))
    }

    /// The device id.
    pub fn did(&self) -> &str {
        &self.inner.did
    }

    /// The app id.
    pub fn app(&self) -> &str {
        &self.inner.app
    }

    /// The room cursors to persist (session → highest `room_seq` delivered); give them
    /// back in [`crate::ClientConfig::room_cursors`] after a restart.
    pub fn room_cursors(&self) -> std::collections::BTreeMap<String, u64> {
        self.inner
            .rooms
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }

    /// Whether the client has stopped (closed, replaced, or gave up reconnecting).
    pub fn is_closed(&self) -> bool {
        self.inner.commands.is_closed()
    }

    /// Sends `body` as an UP without a session; see [`Client::send_with`].
    pub fn send(
        &self,
        body: impl Into<Bytes>,
    ) -> impl Future<Output = Result<UpAck, ClientError>> + Send + 'static {
        self.send_with("", body)
    }

    /// Sends `body` as an UP to `session` and resolves on its UP_ACK.
    ///
    /// The `client_msg_id` is taken when this is called (ids grow in call order). The UP
    /// waits in memory while the client reconnects and is sent again, with the same id,
    /// after every reconnect until acknowledged; the gateway de-duplicates by it.
    ///
    /// Resolves to the receipt for code 0, [`ClientError::Rejected`] for another code,
    /// [`ClientError::Timeout`] if no UP_ACK came within the ack timeout (outcome unknown;
    /// the UP is then no longer resent), [`ClientError::Closed`] if the client stopped, or
    /// [`ClientError::Frame`] if the frame is too large. Dropping the future gives up too.
    pub fn send_with(
        &self,
        session: impl Into<String>,
        body: impl Into<Bytes>,
    ) -> impl Future<Output = Result<UpAck, ClientError>> + Send + 'static {
        let inner = self.inner.clone();
        let id = inner.next_msg_id.fetch_add(1, Ordering::Relaxed);
        let frame = Frame::Up {
            header: pb::Up {
                client_msg_id: id,
                session: session.into(),
            },
            body: body.into(),
        };
        let encoded = frame
            .try_encode()
            .map_err(ClientError::from)
            .and_then(|bytes| {
                if bytes.len() > inner.max_up_frame_len {
                    return Err(ClientError::Frame(FrameError::TooLarge {
                        len: bytes.len(),
                        max: inner.max_up_frame_len,
                    }));
                }
                Ok(bytes)
            });
        async move {
            let frame = encoded?;
            let (reply, answer) = oneshot::channel();
            let exchange = async {
                inner
                    .commands
                    .send(Command::Up { id, frame, reply })
                    .await
                    .map_err(|_| ClientError::Closed)?;
                answer.await.map_err(|_| ClientError::Closed)?
            };
            match tokio::time::timeout(inner.ack_timeout, exchange).await {
                Ok(result) => result,
                Err(_) => Err(ClientError::Timeout),
            }
        }
    }

    /// Closes the connection cleanly and stops the client. Pending sends fail with
    /// [`ClientError::Closed`]; the event channel ends with [`Event::Disconnected`].
    pub async fn close(&self) {
        let (done, closed) = oneshot::channel();
        if self
            .inner
            .commands
            .send(Command::Close { done })
            .await
            .is_ok()
        {
            let _ = closed.await;
        }
    }
}
