//! Recovery of recoverable rooms: replays what a device missed from the room stream.
//!
//! Room broadcasts are stored in `TETHER_ROOMS` on `tether.<app>.room.<session>` with a
//! gap-free room sequence (`Tether-Seq`). A device that logs in with a room cursor, once it
//! is a member of that room here, gets every stored broadcast above its cursor, in order,
//! before the live ones held meanwhile. The start is found by binary search over stream
//! sequences (room sequences grow with them), so a replay costs O(log n + missed) reads.
//! When retention already dropped part of what it missed, the device first gets an ERROR
//! `recovery_gap` (not closing) naming the room and the first sequence still stored.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::stream::{self, DirectGetErrorKind};
use bytes::Bytes;
use tether_nats::layout::ROOMS_STREAM;
use tether_nats::subjects;
use tether_schemas::{ErrorCode, Frame, pb};

use crate::conn::Enqueued;
use crate::context::GatewayCtx;
use crate::sessions::Recovery;

/// A stored room message: stream sequence, room sequence, frame.
struct Stored {
    stream_seq: u64,
    room_seq: u64,
    frame: Bytes,
}

/// Starts the replays (each in its own task).
pub fn start(ctx: &Arc<GatewayCtx>, recoveries: Vec<Recovery>) {
    for recovery in recoveries {
        let ctx = ctx.clone();
        tokio::spawn(async move {
            let replayed = match replay(&ctx, &recovery).await {
                Ok(last) => last,
                Err(error) => {
                    tracing::warn!(did = %recovery.did, session = %recovery.session, %error, "room recovery failed");
                    ctx.metrics
                        .room_recoveries
                        .get_or_create(&[("result", "failed")])
                        .inc();
                    recovery.after
                }
            };
            for frame in ctx.sessions.finish_recovery(&recovery, replayed) {
                if !push_paced(&ctx, &recovery, frame).await {
                    break;
                }
            }
        });
    }
}

/// Replays the room after `recovery.after`; returns the last room sequence sent.
async fn replay(ctx: &GatewayCtx, recovery: &Recovery) -> Result<u64, String> {
    let stream = ctx
        .outbound
        .jetstream()
        .get_stream(ROOMS_STREAM)
        .await
        .map_err(|e| e.to_string())?;
    let subject = subjects::room(&recovery.app, &recovery.session);
    let Some(last) = last(&stream, &subject).await? else {
        ctx.metrics
            .room_recoveries
            .get_or_create(&[("result", "empty")])
            .inc();
        return Ok(recovery.after);
    };
    if last.room_seq <= recovery.after {
        ctx.metrics
            .room_recoveries
            .get_or_create(&[("result", "current")])
            .inc();
        return Ok(recovery.after);
    }
    let Some(first) = next(&stream, &subject, 1).await? else {
        return Ok(recovery.after);
    };
    let limit = ctx.config.max_queued_frames;
    let mut position = if first.room_seq > recovery.after.saturating_add(1) {
        let gap = Frame::Error {
            error: pb::Error {
                code: u32::from(ErrorCode::RecoveryGap.as_u16()),
                text: format!(
                    "room {}: messages {}..{} are no longer stored",
                    recovery.session,
                    recovery.after + 1,
                    first.room_seq - 1
                ),
                retry_after_ms: 0,
            },
            close: false,
        };
        recovery.conn.push(gap.encode(), false, limit);
        ctx.metrics.error(ErrorCode::RecoveryGap);
        ctx.metrics
            .room_recoveries
            .get_or_create(&[("result", "gap")])
            .inc();
        first
    } else {
        ctx.metrics
            .room_recoveries
            .get_or_create(&[("result", "complete")])
            .inc();
        first_after(&stream, &subject, first, last.stream_seq, recovery.after).await?
    };
    let mut sent = recovery.after;
    loop {
        if position.room_seq > sent {
            if !push_paced(ctx, recovery, position.frame).await {
                return Ok(sent);
            }
            ctx.metrics.room_replayed.inc();
            sent = position.room_seq;
        }
        if position.stream_seq >= last.stream_seq || recovery.conn.is_closing() {
            return Ok(sent);
        }
        match next(&stream, &subject, position.stream_seq + 1).await? {
            Some(found) => position = found,
            None => return Ok(sent),
        }
    }
}

/// Queues one replayed frame, waiting while the connection's queue is full (a replay can
/// be longer than the queue); false when the connection is closing.
async fn push_paced(ctx: &GatewayCtx, recovery: &Recovery, frame: Bytes) -> bool {
    let limit = ctx.config.max_queued_frames;
    loop {
        match recovery.conn.push(frame.clone(), false, limit) {
            Enqueued::Queued => return true,
            Enqueued::DroppedQos0 => tokio::time::sleep(Duration::from_millis(5)).await,
            Enqueued::Overflow | Enqueued::Closing => return false,
        }
    }
}

/// The first stored message with a room sequence above `after`, between `low` (whose
/// room sequence is at most `after + 1`) and stream sequence `high`.
async fn first_after(
    stream: &stream::Stream,
    subject: &str,
    low: Stored,
    high: u64,
    after: u64,
) -> Result<Stored, String> {
    if low.room_seq > after {
        return Ok(low);
    }
    // Invariant: the message at `lo` has room_seq <= after; the answer is above lo.
    let (mut lo, mut hi) = (low.stream_seq, high);
    let mut best: Option<Stored> = None;
    while lo < hi {
        let mid = lo + (hi - lo).div_ceil(2);
        match next(stream, subject, mid).await? {
            Some(found) if found.room_seq > after => {
                hi = mid - 1;
                best = Some(found);
            }
            Some(found) => lo = found.stream_seq.max(mid),
            None => hi = mid - 1,
        }
    }
    match best {
        Some(found) => Ok(found),
        None => next(stream, subject, lo + 1)
            .await?
            .ok_or_else(|| "room message vanished during recovery".to_string()),
    }
}

async fn last(stream: &stream::Stream, subject: &str) -> Result<Option<Stored>, String> {
    match stream
        .direct_get_last_for_subject(subject.to_string())
        .await
    {
        Ok(message) => Ok(Some(stored(message))),
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

async fn next(stream: &stream::Stream, subject: &str, from: u64) -> Result<Option<Stored>, String> {
    match stream
        .direct_get_next_for_subject(subject.to_string(), Some(from))
        .await
    {
        Ok(message) => Ok(Some(stored(message))),
        Err(e) if e.kind() == DirectGetErrorKind::NotFound => Ok(None),
        Err(e) => Err(e.to_string()),
    }
}

fn stored(message: async_nats::jetstream::message::StreamMessage) -> Stored {
    let room_seq = tether_nats::headers::seq(&message.headers);
    Stored {
        stream_seq: message.sequence,
        room_seq,
        frame: message.payload,
    }
}
