//! Uplink with receipts: forward an UP to the app's business services and turn their answer
//! into an UP_ACK. No answer is retried with backoff; the device gets `timeout`, never a
//! false "stored".

use std::time::Duration;

use async_nats::HeaderMap;
use async_nats::jetstream::{AckKind, Message};
use bytes::Bytes;
use tether_nats::headers;
use tether_nats::subjects::Subject;
use tether_schemas::bus::ReceiptMode;
use tether_schemas::{ErrorCode, Frame, pb};
use tokio::time::Instant;

use crate::context::StateCtx;
use crate::inputs;
use crate::receipt_book::ReceiptBook;
use crate::uplink_lines::Turn;

/// An UP_ACK to deliver to a device.
#[derive(Debug)]
pub struct UplinkDone {
    /// App id.
    pub app: String,
    /// Device id.
    pub did: String,
    /// Gateway the UP came through (used if the device's route is unknown).
    pub gw: String,
    /// The encoded UP_ACK frame; `None` when the gateway answered already (the app's
    /// receipt mode is `stored`).
    pub frame: Option<Bytes>,
}

/// The device an uplink stream message is from (app, did), from its subject; an empty
/// key for a subject that is not an uplink (such messages are terminated).
pub type DeviceKey = (String, String);

/// The device of an uplink stream message.
pub fn device_of(message: &Message) -> DeviceKey {
    match Subject::parse(&message.subject) {
        Some(Subject::Uplink { app, did }) => (app.to_string(), did.to_string()),
        _ => (String::new(), String::new()),
    }
}

/// How often an uplink waiting for the business (or queued behind its device's earlier
/// ones) tells JetStream it is still in progress; well below the uplink ack wait.
pub const KEEP_ALIVE: Duration = Duration::from_secs(1);

/// The uplink consumer's ack wait: how soon an uplink held by an instance that died is
/// redelivered to the next owner (progress keeps live ones from being redelivered).
pub const ACK_WAIT: Duration = Duration::from_secs(5);

/// Processes one uplink stream message up to its receipt: the business's answer, kept.
/// `None` when the message was refused (then it is terminated here). The caller acks the
/// message and hands the UP_ACK on once the device's earlier uplinks are settled
/// ([`settle`]); the request is sent in the device's order (`turn`).
///
/// The app and did come from the subject (`tether.<app>.up.<p>.<did>`); the gateway's
/// headers add the user, gateway and connection.
pub async fn process(
    ctx: &StateCtx,
    book: &ReceiptBook,
    message: &Message,
    turn: &mut Turn,
) -> Option<UplinkDone> {
    let input = match inputs::uplink(
        &message.subject,
        message.headers.as_ref(),
        message.payload.clone(),
    ) {
        Ok(input) => input,
        Err(refusal) => {
            // Nothing to answer (no client_msg_id): terminated, never redelivered.
            tracing::warn!(subject = %message.subject, reason = refusal.reason, error = %refusal.message, "uplink terminated");
            ctx.metrics.refused(refusal.reason);
            let _ = message.ack_with(AckKind::Term).await;
            return None;
        }
    };
    let (app, did, gw) = (
        input.request.app.clone(),
        input.request.did.clone(),
        input.request.gw.clone(),
    );
    let up = &input.up;
    if (is_resend(message) || is_redelivery(message))
        && let Some(frame) = book.answered(&app, &did, up.client_msg_id)
    {
        // Answered before: a resend the gateway passed on after a `timeout` while an
        // earlier retry got a real answer, or a redelivery whose ack was lost (an owner
        // that died after answering, a consumer leader change). The kept answer is the
        // receipt; the business is not asked again.
        ctx.metrics
            .uplinks
            .get_or_create(&[("result", "resend")])
            .inc();
        ctx.metrics.receipts_reused.inc();
        return Some(UplinkDone {
            app,
            did,
            gw,
            frame: Some(frame),
        });
    }
    let outcome = match inputs::business_request_headers(&input) {
        Ok(map) => ask_business(ctx, message, turn, &app, map, input.body.clone()).await,
        Err(error) => {
            ctx.metrics.refused("up_field");
            (ErrorCode::BadRequest, error.message, String::new())
        }
    };
    let (code, text, server_id) = outcome;
    let result = match code {
        ErrorCode::Ok => "stored",
        ErrorCode::Timeout => "timeout",
        _ => "error",
    };
    ctx.metrics
        .uplinks
        .get_or_create(&[("result", result)])
        .inc();
    if gateway_answered(message) {
        // Receipt mode `stored`: the device has its UP_ACK; the business's answer stays
        // here. Unanswered, the uplink is redelivered later (it is stored and confirmed:
        // it must reach the business); refused, it is counted and logged.
        if code == ErrorCode::Timeout {
            let _ = message.ack_with(AckKind::Nak(Some(STORED_RETRY))).await;
            return None;
        }
        if code != ErrorCode::Ok {
            tracing::warn!(%app, %did, client_msg_id = up.client_msg_id, code = code.as_u16(), "business refused an uplink confirmed on store");
        }
        return Some(UplinkDone {
            app,
            did,
            gw,
            frame: None,
        });
    }
    // The business's text and id are outside data: bounded before they enter a frame.
    let frame = Frame::UpAck(pb::UpAck {
        client_msg_id: up.client_msg_id,
        code: u32::from(code.as_u16()),
        message: truncated(text, MAX_REPLY_TEXT),
        server_msg_id: truncated(server_id, MAX_SERVER_MSG_ID),
    })
    .try_encode()
    .unwrap_or_else(|_| {
        Frame::UpAck(pb::UpAck {
            client_msg_id: up.client_msg_id,
            code: u32::from(ErrorCode::Internal.as_u16()),
            message: "receipt too large".into(),
            server_msg_id: String::new(),
        })
        .encode()
    });
    // A resend of this UP is dropped by JetStream's de-duplication; its gateway then asks
    // this owner, which answers from this copy, in case the first UP_ACK was lost with its
    // connection. Kept before the UP_ACK goes out, so no resend can miss both. A `timeout`
    // receipt is only a marker: the owner answers "unknown" for it and the gateway passes
    // the resend on under a retry id so that it is processed again (PROTOCOL 6.3).
    book.keep(&app, &did, up.client_msg_id, frame.clone());
    ctx.metrics.receipts_kept.inc();
    Some(UplinkDone {
        app,
        did,
        gw,
        frame: Some(frame),
    })
}

/// Waits (keeping the message in progress) until the device's earlier uplinks are
/// settled, then acks the message when it was answered (`answered`; a refused one is
/// terminated already). The caller hands the UP_ACK on, then settles `turn`.
pub async fn settle(message: &Message, turn: &mut Turn, answered: bool) {
    with_progress(message, turn.wait_to_settle()).await;
    if answered && let Err(error) = message.ack().await {
        tracing::warn!(subject = %message.subject, %error, "uplink ack failed");
    }
}

/// How long an uplink the gateway confirmed on store (receipt mode `stored`) waits before
/// JetStream redelivers it when no business service answered.
const STORED_RETRY: Duration = Duration::from_secs(5);

/// Whether the gateway sent the uplink's UP_ACK when JetStream stored it
/// (`Tether-Receipt: stored`, receipt mode `stored`).
fn gateway_answered(message: &Message) -> bool {
    message
        .headers
        .as_ref()
        .and_then(|map| map.get(headers::RECEIPT))
        .is_some_and(|v| v.as_str() == ReceiptMode::Stored.as_str())
}

/// Whether the stream message is a resend the gateway republished under a retry id
/// (`<app>:<did>:<client_msg_id>:r<n>`, PROTOCOL 10.2) because the UP had been answered
/// `timeout`.
fn is_resend(message: &Message) -> bool {
    message
        .headers
        .as_ref()
        .and_then(|map| map.get(headers::MSG_ID))
        .is_some_and(|id| id.as_str().split(':').nth(3).is_some())
}

/// Whether JetStream delivered the message before (its ack was lost, or its owner died
/// before acking).
fn is_redelivery(message: &Message) -> bool {
    message.info().is_ok_and(|info| info.delivered > 1)
}

/// Runs `work` while telling JetStream every [`KEEP_ALIVE`] that `message` is in progress.
async fn with_progress<T>(message: &Message, work: impl std::future::Future<Output = T>) -> T {
    tokio::pin!(work);
    let mut ticks = tokio::time::interval_at(Instant::now() + KEEP_ALIVE, KEEP_ALIVE);
    loop {
        tokio::select! {
            out = &mut work => return out,
            _ = ticks.tick() => {
                let _ = message.ack_with(AckKind::Progress).await;
            }
        }
    }
}

/// Longest business `message` copied into an UP_ACK, in bytes (longer ones are cut).
pub const MAX_REPLY_TEXT: usize = 1024;
/// Longest business `id` copied into `UpAck.server_msg_id`, in bytes.
pub const MAX_SERVER_MSG_ID: usize = 256;

/// `text` cut to at most `max` bytes, at a character boundary.
fn truncated(mut text: String, max: usize) -> String {
    if text.len() > max {
        let mut end = max;
        while !text.is_char_boundary(end) {
            end -= 1;
        }
        text.truncate(end);
    }
    text
}

/// Requests the business service, retrying unanswered requests with backoff. The first
/// request leaves after the device's previous uplink's (`turn`).
async fn ask_business(
    ctx: &StateCtx,
    message: &Message,
    turn: &mut Turn,
    app: &str,
    map: HeaderMap,
    body: Bytes,
) -> (ErrorCode, String, String) {
    let timeout = Duration::from_millis(ctx.config.business_timeout_ms);
    let mut backoff = Duration::from_millis(200);
    for attempt in 0..=ctx.config.business_retries {
        let request = async_nats::Request::new()
            .headers(map.clone())
            .payload(body.clone())
            .timeout(Some(timeout));
        // Keep the stream message ours while the business thinks: a short ack wait then
        // only matters when this instance dies (redelivery to the next owner comes soon).
        let asked = ctx
            .client
            .send_request(ctx.pipelines.business_subject(app), request);
        tokio::pin!(asked);
        let answer = if attempt == 0 {
            // The request is queued on the client at its first poll (the client's command
            // channel is first come, first served): poll it once in the device's turn,
            // then let the next uplink of the device ask.
            turn.wait_to_ask().await;
            let first = futures::poll!(asked.as_mut());
            turn.pass_ask().await;
            match first {
                std::task::Poll::Ready(answer) => answer,
                std::task::Poll::Pending => with_progress(message, asked).await,
            }
        } else {
            with_progress(message, asked).await
        };
        match answer {
            Ok(reply) => return inputs::business_reply(&reply.payload),
            Err(error) => {
                tracing::debug!(app, attempt, %error, "business did not answer");
                // Keep the stream message ours while we wait.
                let _ = message.ack_with(AckKind::Progress).await;
                if attempt < ctx.config.business_retries {
                    tokio::time::sleep(backoff).await;
                    backoff *= 2;
                }
            }
        }
    }
    (
        ErrorCode::Timeout,
        "no business service answered".into(),
        String::new(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn replies_map_to_codes() {
        assert_eq!(
            inputs::business_reply(br#"{"status":"stored","id":"m1"}"#),
            (ErrorCode::Ok, String::new(), "m1".into())
        );
        assert_eq!(
            inputs::business_reply(br#"{"status":"error","code":"forbidden","message":"no"}"#).0,
            ErrorCode::Forbidden
        );
        assert_eq!(
            inputs::business_reply(br#"{"status":"error"}"#).0,
            ErrorCode::Rejected
        );
        assert_eq!(
            inputs::business_reply(br#"{"status":"error","code":"ok"}"#).0,
            ErrorCode::Rejected
        );
        assert_eq!(inputs::business_reply(b"nope").0, ErrorCode::Internal);
    }

    #[test]
    fn outside_text_is_bounded() {
        assert_eq!(truncated("abc".into(), 2), "ab");
        assert_eq!(truncated("é".into(), 1), "");
        assert_eq!(
            truncated("x".repeat(100_000), MAX_REPLY_TEXT).len(),
            MAX_REPLY_TEXT
        );
    }
}
