//! The Tether device SDK: one long-lived connection to a gateway, with login, uplink
//! receipts, exactly-once ordered QoS1 downlink, heartbeats, reconnect with resume and
//! redirects, over TCP or WebSocket. `schemas/PROTOCOL.md` is the contract it implements.
//!
//! ```no_run
//! use tether_client::{Client, ClientConfig, Endpoint, Event};
//!
//! # async fn demo() -> Result<(), tether_client::ClientError> {
//! let config = ClientConfig::new(vec!["tcp://127.0.0.1:7400".parse()?], "chat", "phone-1", "<token>");
//! let (client, mut events) = Client::connect(config).await?;
//! let receipt = client.send("hello").await?;
//! while let Some(event) = events.recv().await {
//!     if let Event::Message { seq, body, .. } = event {
//!         println!("{seq}: {body:?}");
//!     }
//! }
//! # let _ = receipt; Ok(()) }
//! ```
//!
//! # Layout
//!
//! - [`config`]: [`ClientConfig`], [`Endpoint`], [`TokenSource`].
//! - [`client`]: [`Client`], the cloneable handle (send, close).
//! - [`discovery`]: endpoints and tokens from ipconfig, cached for when it is unreachable.
//! - [`event`]: [`Event`]s for the app and [`UpAck`] receipts.
//! - [`error`]: the error type, [`ClientError`].
//! - [`backoff`]: reconnect delays.
//! - [`dedupe`]: QoS1 ordering and de-duplication by seq.
//! - [`transport`]: TCP and WebSocket behind one frame-level type.
//! - `login`: one connect + LOGIN → LOGIN_ACK exchange.
//! - `session`: endpoint rotation and tokens across reconnects.
//! - `connection`: the task that owns the socket (`connection/inbound`: frames from the
//!   gateway).
//! - [`interactive`]: the line-oriented client behind `tether client`.

pub mod backoff;
pub mod client;
pub mod config;
mod connection;
pub mod dedupe;
pub mod discovery;
pub mod error;
pub mod event;
pub mod interactive;
mod login;
mod session;
pub mod transport;

pub use backoff::Backoff;
pub use client::Client;
pub use config::{BoxError, ClientConfig, Endpoint, TokenProvider, TokenSource};
pub use discovery::{Discovery, DiscoveryConfig};
pub use error::ClientError;
pub use event::{Event, UpAck};
pub use tether_schemas::ErrorCode;
