//! The two transports behind one type: raw TCP (frames back to back, cut with
//! [`split_frame`]) and WebSocket (one binary message = one frame). Both run over a
//! boxed byte stream, so TLS can later be slotted in under either.

use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use tether_schemas::{RawFrame, split_frame};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::client::IntoClientRequest;
use tokio_tungstenite::tungstenite::http::HeaderValue;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_tungstenite::tungstenite::{self, Message};

use crate::config::Endpoint;
use crate::error::ClientError;

/// The WebSocket subprotocol Tether offers (the gateway echoes it).
const SUBPROTOCOL: &str = "tether.v1";

/// A byte stream a transport can run over (plain TCP today, TLS later).
pub trait Io: AsyncRead + AsyncWrite + Send + Unpin {}
impl<T: AsyncRead + AsyncWrite + Send + Unpin> Io for T {}

/// One open connection to a gateway, speaking frames.
pub enum Transport {
    /// Raw TCP with its read buffer.
    Tcp {
        /// The socket.
        io: Box<dyn Io>,
        /// Bytes read but not yet cut into frames.
        buf: BytesMut,
        /// Largest frame accepted.
        max: usize,
    },
    /// WebSocket.
    Ws {
        /// The socket.
        ws: Box<WebSocketStream<Box<dyn Io>>>,
        /// Largest frame accepted.
        max: usize,
    },
}

fn transport_error(context: &str, error: impl std::fmt::Display) -> ClientError {
    ClientError::Transport(format!("{context}: {error}"))
}

impl Transport {
    /// Opens a connection (TCP connect, and the WebSocket handshake for `ws://`) within
    /// `timeout`. `max_frame_len` bounds frames read from it.
    pub async fn connect(
        endpoint: &Endpoint,
        timeout: Duration,
        max_frame_len: usize,
    ) -> Result<Transport, ClientError> {
        let connect_error = |reason: String| ClientError::Connect {
            endpoint: endpoint.to_string(),
            reason,
        };
        let open = async {
            match endpoint {
                Endpoint::Tcp { addr } => {
                    let socket = TcpStream::connect(addr.as_str())
                        .await
                        .map_err(|e| connect_error(e.to_string()))?;
                    let _ = socket.set_nodelay(true);
                    Ok(Transport::Tcp {
                        io: Box::new(socket),
                        buf: BytesMut::new(),
                        max: max_frame_len,
                    })
                }
                Endpoint::Ws { url } => {
                    let mut request = url
                        .as_str()
                        .into_client_request()
                        .map_err(|e| connect_error(e.to_string()))?;
                    request.headers_mut().insert(
                        "Sec-WebSocket-Protocol",
                        HeaderValue::from_static(SUBPROTOCOL),
                    );
                    let authority = request
                        .uri()
                        .authority()
                        .map(|a| a.as_str().to_string())
                        .ok_or_else(|| connect_error("url has no host".into()))?;
                    let port = request.uri().port_u16().unwrap_or(80);
                    let host = request
                        .uri()
                        .host()
                        .unwrap_or_default()
                        .trim_matches(['[', ']'])
                        .to_string();
                    let socket = TcpStream::connect((host.as_str(), port))
                        .await
                        .map_err(|e| connect_error(format!("{authority}: {e}")))?;
                    let _ = socket.set_nodelay(true);
                    let config = WebSocketConfig::default()
                        .max_message_size(Some(max_frame_len))
                        .max_frame_size(Some(max_frame_len));
                    let io: Box<dyn Io> = Box::new(socket);
                    let (ws, _response) =
                        tokio_tungstenite::client_async_with_config(request, io, Some(config))
                            .await
                            .map_err(|e| connect_error(format!("websocket handshake: {e}")))?;
                    Ok(Transport::Ws {
                        ws: Box::new(ws),
                        max: max_frame_len,
                    })
                }
            }
        };
        match tokio::time::timeout(timeout, open).await {
            Ok(result) => result,
            Err(_) => Err(connect_error("timed out".into())),
        }
    }

    /// Writes one complete frame.
    pub async fn send(&mut self, frame: Bytes) -> Result<(), ClientError> {
        match self {
            Transport::Tcp { io, .. } => {
                io.write_all(&frame)
                    .await
                    .map_err(|e| transport_error("write", e))?;
                io.flush().await.map_err(|e| transport_error("write", e))
            }
            Transport::Ws { ws, .. } => ws
                .send(Message::Binary(frame))
                .await
                .map_err(|e| transport_error("write", e)),
        }
    }

    /// Reads the next frame; `Ok(None)` when the gateway closed the connection cleanly.
    ///
    /// Cancel-safe: a frame is never half consumed, so this can sit in a `select!` and be
    /// polled once more with `now_or_never` to find out whether another frame is ready.
    pub async fn recv(&mut self) -> Result<Option<RawFrame>, ClientError> {
        match self {
            Transport::Tcp { io, buf, max } => loop {
                if let Some(raw) = split_frame(buf, *max)? {
                    return Ok(Some(raw));
                }
                if buf.capacity() - buf.len() < 4096 {
                    buf.reserve(8192);
                }
                let n = io
                    .read_buf(buf)
                    .await
                    .map_err(|e| transport_error("read", e))?;
                if n == 0 {
                    if buf.is_empty() {
                        return Ok(None);
                    }
                    return Err(ClientError::Transport(
                        "connection closed inside a frame".into(),
                    ));
                }
            },
            Transport::Ws { ws, max } => loop {
                let Some(message) = ws.next().await else {
                    return Ok(None);
                };
                match message {
                    Ok(Message::Binary(bytes)) => {
                        return Ok(Some(RawFrame::from_bytes(bytes, *max)?));
                    }
                    Ok(Message::Text(_)) => {
                        return Err(ClientError::Transport(
                            "text websocket message from the gateway".into(),
                        ));
                    }
                    Ok(Message::Close(_)) => return Ok(None),
                    Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_)) => {}
                    Err(
                        tungstenite::Error::ConnectionClosed | tungstenite::Error::AlreadyClosed,
                    ) => return Ok(None),
                    Err(error) => return Err(transport_error("read", error)),
                }
            },
        }
    }

    /// Closes the connection politely (WebSocket close handshake, TCP shutdown), giving up
    /// after `timeout`.
    pub async fn close(mut self, timeout: Duration) {
        let closing = async {
            match &mut self {
                Transport::Tcp { io, .. } => {
                    let _ = io.shutdown().await;
                }
                Transport::Ws { ws, .. } => {
                    let _ = WebSocketStream::close(ws.as_mut(), None).await;
                    // Wait for the gateway's close frame (or the end of the stream).
                    while let Some(Ok(_)) = ws.next().await {}
                }
            }
        };
        let _ = tokio::time::timeout(timeout, closing).await;
    }
}
