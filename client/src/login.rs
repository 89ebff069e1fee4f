//! Opening one logged-in connection: connect the transport, send LOGIN, wait for
//! LOGIN_ACK or ERROR (PROTOCOL.md §6.1).

use std::time::Duration;

use tether_schemas::{Frame, FrameError, pb};

use crate::config::Endpoint;
use crate::error::{ClientError, code_of};
use crate::transport::Transport;

/// What goes into one LOGIN.
#[derive(Clone)]
pub(crate) struct LoginParams {
    pub app: String,
    pub did: String,
    pub sdk: String,
    pub token: String,
    pub resume_seq: u64,
    /// Room cursors: (session, highest room_seq processed).
    pub rooms: Vec<(String, u64)>,
    /// For connect, handshake and LOGIN → LOGIN_ACK together.
    pub timeout: Duration,
    pub max_frame_len: usize,
}

/// A logged-in connection. Frames the gateway sent right after LOGIN_ACK are still
/// buffered in `transport`.
pub(crate) struct Link {
    pub transport: Transport,
    pub endpoint: Endpoint,
    pub ack: pb::LoginAck,
}

/// Connects to `endpoint` and logs in, all within `params.timeout`.
pub(crate) async fn login(endpoint: Endpoint, params: LoginParams) -> Result<Link, ClientError> {
    let deadline = tokio::time::Instant::now() + params.timeout;
    let mut transport = Transport::connect(&endpoint, params.timeout, params.max_frame_len).await?;
    let frame = Frame::Login(pb::Login {
        token: params.token,
        did: params.did,
        app: params.app,
        resume_seq: params.resume_seq,
        rooms: params
            .rooms
            .into_iter()
            .map(|(session, room_seq)| pb::RoomCursor { session, room_seq })
            .collect(),
        sdk: params.sdk,
    });
    let handshake = async {
        transport.send(frame.try_encode()?).await?;
        loop {
            let Some(raw) = transport.recv().await? else {
                return Err(ClientError::Transport(
                    "gateway closed the connection during login".into(),
                ));
            };
            match Frame::decode(&raw) {
                Ok(Frame::LoginAck(ack)) => return Ok(ack),
                Ok(Frame::Error { error, .. }) => {
                    return Err(ClientError::Login {
                        code: code_of(error.code),
                        text: error.text,
                        retry_after_ms: error.retry_after_ms,
                    });
                }
                // Frames of types we do not know are skipped (PROTOCOL.md §3.3).
                Err(FrameError::UnknownType(_)) => {}
                Ok(other) => {
                    return Err(ClientError::Transport(format!(
                        "expected LOGIN_ACK, got {}",
                        other.frame_type()
                    )));
                }
                Err(error) => return Err(error.into()),
            }
        }
    };
    match tokio::time::timeout_at(deadline, handshake).await {
        Ok(Ok(ack)) => Ok(Link {
            transport,
            endpoint,
            ack,
        }),
        Ok(Err(error)) => Err(error),
        Err(_) => Err(ClientError::Connect {
            endpoint: endpoint.to_string(),
            reason: "no LOGIN_ACK in time".into(),
        }),
    }
}
