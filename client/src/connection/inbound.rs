//! Frames from the gateway, one at a time: receipts to the waiting senders, messages
//! through the QoS1 inbox to the app, and what REDIRECT and ERROR frames mean.

use std::time::Duration;

use tether_schemas::{ErrorCode, Frame, RawFrame, pb};

use super::{End, Task};
use crate::dedupe::Offer;
use crate::error::{ClientError, code_of};
use crate::event::{Event, UpAck};

/// What handling one frame leads to.
pub(super) enum Flow {
    Continue,
    Redirect(pb::Redirect),
    End(End),
}

impl Task {
    /// Handles one frame from the gateway.
    pub(super) async fn handle(&mut self, raw: &RawFrame) -> Flow {
        let frame = match Frame::decode(raw) {
            Ok(frame) => frame,
            Err(error) => {
                // Unknown types must be skipped; a malformed frame is skipped too (the
                // framing is intact, only its content is bad).
                tracing::warn!(%error, "frame from the gateway skipped");
                return Flow::Continue;
            }
        };
        match frame {
            Frame::Pong(_) => Flow::Continue,
            Frame::UpAck(ack) => {
                if let Some((_, reply)) = self.pending.remove(&ack.client_msg_id) {
                    let result = match code_of(ack.code) {
                        ErrorCode::Ok => Ok(UpAck {
                            client_msg_id: ack.client_msg_id,
                            server_msg_id: ack.server_msg_id,
                        }),
                        code => Err(ClientError::Rejected(code, ack.message)),
                    };
                    let _ = reply.send(result);
                }
                Flow::Continue
            }
            Frame::Down { header, qos1, body } => {
                let seq = header.seq;
                let event = Event::Message {
                    seq,
                    qos1,
                    session: header.session,
                    room_seq: header.room_seq,
                    sent_at_ms: header.sent_at_ms,
                    meta: header.meta.into_iter().collect(),
                    body,
                };
                if let Event::Message {
                    session, room_seq, ..
                } = &event
                    && *room_seq > 0
                    && !session.is_empty()
                {
                    // Recoverable room: deliver each room_seq once, advancing the cursor
                    // the next LOGIN sends.
                    let fresh = {
                        let mut rooms = self
                            .session
                            .rooms
                            .lock()
                            .unwrap_or_else(std::sync::PoisonError::into_inner);
                        let cursor = rooms.entry(session.clone()).or_insert(0);
                        let fresh = *room_seq > *cursor;
                        *cursor = (*cursor).max(*room_seq);
                        fresh
                    };
                    if !fresh {
                        tracing::debug!(room_seq, "duplicate room message dropped");
                        return Flow::Continue;
                    }
                }
                if !qos1 || seq == 0 {
                    self.emit(event).await;
                    return Flow::Continue;
                }
                match self.inbox.offer(seq, event) {
                    Offer::Deliver(events) => {
                        for event in events {
                            self.emit(event).await;
                        }
                    }
                    Offer::Duplicate => tracing::debug!(seq, "duplicate down dropped"),
                    Offer::Held => tracing::debug!(seq, "down held for a gap"),
                    Offer::Dropped => tracing::debug!(seq, "down too far ahead, dropped"),
                }
                Flow::Continue
            }
            Frame::Redirect(to) => Flow::Redirect(to),
            Frame::Error { error, close } => {
                let code = code_of(error.code);
                if !close {
                    self.emit(Event::Error {
                        code,
                        text: error.text,
                    })
                    .await;
                    return Flow::Continue;
                }
                Flow::End(closing_error(code, error.text, error.retry_after_ms))
            }
            other => {
                tracing::debug!(frame = %other.frame_type(), "unexpected frame from the gateway ignored");
                Flow::Continue
            }
        }
    }
}

/// What an ERROR with CLOSE means for the client (PROTOCOL.md §6.7).
fn closing_error(code: ErrorCode, text: String, retry_after_ms: u32) -> End {
    let retry_after = Duration::from_millis(u64::from(retry_after_ms));
    match code {
        ErrorCode::Replaced => End::Stop {
            code,
            reason: text,
            report: false,
        },
        // Reconnecting logs in again; the refused token is then replaced once.
        ErrorCode::BadToken | ErrorCode::TokenExpired => End::Lost {
            code: Some(code),
            reason: text,
            retry_after,
            skip_current: false,
        },
        ErrorCode::GoingAway => End::Lost {
            code: Some(code),
            reason: text,
            retry_after,
            skip_current: true,
        },
        code if code.is_retryable() => End::Lost {
            code: Some(code),
            reason: text,
            retry_after,
            skip_current: false,
        },
        code => End::Stop {
            code,
            reason: text,
            report: true,
        },
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn closing_errors_map_to_the_protocol_rules() {
        assert!(matches!(
            closing_error(ErrorCode::Replaced, String::new(), 0),
            End::Stop { report: false, .. }
        ));
        assert!(matches!(
            closing_error(ErrorCode::GoingAway, String::new(), 250),
            End::Lost { skip_current: true, retry_after, .. } if retry_after == Duration::from_millis(250)
        ));
        assert!(matches!(
            closing_error(ErrorCode::TokenExpired, String::new(), 0),
            End::Lost { .. }
        ));
        assert!(matches!(
            closing_error(ErrorCode::HeartbeatTimeout, String::new(), 0),
            End::Lost { .. }
        ));
        assert!(matches!(
            closing_error(ErrorCode::WrongApp, String::new(), 0),
            End::Stop { report: true, .. }
        ));
    }
}
