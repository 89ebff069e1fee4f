//! The line-oriented client behind `tether client`: each input line is sent as an UP,
//! receipts and received messages are printed as they come.
//!
//! Output lines:
//! - `connected to <gateway> as <did>` on every login;
//! - `stored <id>` for an UP the business service stored (its server id, or the
//!   client_msg_id when the service gave none), `error <code> <text>` otherwise;
//! - `<- [seq N] <body>` for each received message (body as lossy UTF-8);
//! - `disconnected: <reason>` when the connection drops, `error <code> <text>` for errors.

use bytes::Bytes;
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use tokio::io::{AsyncBufRead, AsyncBufReadExt, AsyncWrite, AsyncWriteExt};

use crate::client::Client;
use crate::config::ClientConfig;
use crate::error::ClientError;
use crate::event::Event;

/// What `tether client` needs to connect.
#[derive(Debug, Clone)]
pub struct InteractiveArgs {
    /// `tcp://host:port`, `host:port` or `ws://host:port/ws`.
    pub endpoint: String,
    /// App id.
    pub app: String,
    /// Device id.
    pub did: String,
    /// Gateway token.
    pub token: String,
}

/// Connects with `args` and runs until `stdin` ends (then closes cleanly and returns
/// `Ok`) or the client stops on its own (`Err(ClientError::Closed)`, e.g. `replaced`).
pub async fn run(
    args: InteractiveArgs,
    stdin: impl AsyncBufRead + Unpin,
    stdout: impl AsyncWrite + Unpin,
) -> Result<(), ClientError> {
    let endpoint = args.endpoint.parse()?;
    run_with(
        ClientConfig::new(vec![endpoint], args.app, args.did, args.token),
        stdin,
        stdout,
    )
    .await
}

/// [`run`] with a full configuration.
pub async fn run_with(
    config: ClientConfig,
    stdin: impl AsyncBufRead + Unpin,
    mut stdout: impl AsyncWrite + Unpin,
) -> Result<(), ClientError> {
    let did = config.did.clone();
    let (client, mut events) = Client::connect(config).await?;
    let mut lines = stdin.lines();
    let mut in_flight = FuturesUnordered::new();
    let mut reading = true;
    loop {
        if !reading && in_flight.is_empty() {
            client.close().await;
            return Ok(());
        }
        tokio::select! {
            line = lines.next_line(), if reading => match line? {
                Some(line) if line.trim().is_empty() => {}
                Some(line) => in_flight.push(client.send(Bytes::from(line))),
                None => reading = false,
            },
            Some(result) = in_flight.next(), if !in_flight.is_empty() => {
                let text = match result {
                    Ok(ack) if ack.server_msg_id.is_empty() => format!("stored {}", ack.client_msg_id),
                    Ok(ack) => format!("stored {}", ack.server_msg_id),
                    Err(ClientError::Rejected(code, message)) => format!("error {code} {message}"),
                    Err(error) => format!("error {} {error}", error.code()),
                };
                print(&mut stdout, &text).await?;
            },
            event = events.recv() => match event {
                Some(event) => {
                    if let Some(text) = describe(&event, &did) {
                        print(&mut stdout, &text).await?;
                    }
                }
                None => return Err(ClientError::Closed),
            },
        }
    }
}

/// The output line for an event.
fn describe(event: &Event, did: &str) -> Option<String> {
    Some(match event {
        Event::Connected { gateway, .. } => format!("connected to {gateway} as {did}"),
        Event::Message { seq, body, .. } => {
            format!("<- [seq {seq}] {}", String::from_utf8_lossy(body))
        }
        Event::Disconnected {
            reason,
            reconnecting: true,
            ..
        } => format!("disconnected: {reason} (reconnecting)"),
        Event::Disconnected { reason, .. } => format!("disconnected: {reason}"),
        Event::Error { code, text } => format!("error {code} {text}"),
        #[allow(unreachable_patterns)]
        _ => return None,
    })
}

async fn print(out: &mut (impl AsyncWrite + Unpin), line: &str) -> Result<(), ClientError> {
    out.write_all(line.as_bytes()).await?;
    out.write_all(b"\n").await?;
    out.flush().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn lines_follow_the_documented_format() {
        let message = Event::Message {
            seq: 7,
            qos1: true,
            session: String::new(),
            room_seq: 0,
            sent_at_ms: 0,
            meta: Default::default(),
            body: Bytes::from_static(b"hi \xff"),
        };
        assert_eq!(
            describe(&message, "d").as_deref(),
            Some("<- [seq 7] hi \u{fffd}")
        );
        let connected = Event::Connected {
            gateway: "gw-1".into(),
            conn_id: 1,
            endpoint: String::new(),
        };
        assert_eq!(
            describe(&connected, "d1").as_deref(),
            Some("connected to gw-1 as d1")
        );
    }
}
