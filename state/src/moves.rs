//! A device that moves into this region from another one (its region failed, or ipconfig
//! sent it here): its per-device sequence goes on above what it processed elsewhere, and
//! what the region it left still holds for it is copied here (docs/multi-region.md, "A
//! device moving region").
//!
//! Each region numbers a device's inbox on its own. A device that moves keeps its `H` (the
//! highest sequence it processed, sent as LOGIN `resume_seq`) and drops every DOWN with a
//! `seq` at or below it, so this region must number on from `H`:
//!
//! 1. A `resume_seq` above every sequence sent here is checked against the peers' inboxes
//!    (direct get across domains) and cursors. A peer that sent it: the device moved. Every peer
//!    answered and none sent it: a client bug, refused as in one region. A peer that cannot
//!    be asked (its region is down): the device's word is taken (it can only skip its own
//!    messages), counted in `tether_state_relay_moves_unverified`.
//! 2. A marker is appended to the device's inbox with `seq` = `resume_seq` (never
//!    delivered: the cursor moves to it), so every later push, from any instance, numbers
//!    above it (the append's expected-last-subject-sequence arbitrates a racing push).
//! 3. Messages stored here that the device never acknowledged here, numbered below the
//!    marker, are appended again above it (they were stored while it was elsewhere).
//! 4. For each peer that held the device or could not be asked, a task copies that peer's
//!    inbox messages numbered above `resume_seq` into this region's inbox, de-duplicated
//!    by the peer's stream sequence; it retries while the peer is unreachable and stops
//!    after the peer has answered for [`FOLLOW_AFTER_REACHABLE`] (so pushes relayed to the
//!    peer while it was down, and stored there once it returns, are copied too), or after
//!    the relay max age, or until the peer's cursor shows the device acknowledged a
//!    sequence above `resume` there (it moved back). Markers and the peer's copies of this
//!    region's messages are never copied (no echo between two regions). The task lives in
//!    memory: a restart of this instance before the peer returns forgets it (the messages
//!    stay in the peer's inbox).

use std::sync::Arc;
use std::time::{Duration, Instant};

use bytes::Bytes;
use tether_nats::region::Region;
use tether_nats::{direct, layout::INBOX_STREAM, subjects};
use tether_schemas::{Frame, RawFrame, limits};

use crate::context::StateCtx;
use crate::crossregion::Relay;

/// The metadata key that tags a move's marker in the inbox (never sent to a device).
pub const MARKER_META: &str = "tether-move-marker";
/// After the peer first answers, how long its inbox is still followed for the device.
pub const FOLLOW_AFTER_REACHABLE: Duration = Duration::from_secs(60);
/// Pause between two reads of a peer's inbox.
const FOLLOW_EVERY: Duration = Duration::from_secs(1);
/// Pause between two looks at the device's cursor once the peer is no longer followed.
const RELEASE_EVERY: Duration = Duration::from_secs(5);
/// Most messages of the local inbox re-numbered at a move.
const MAX_RENUMBERED: usize = 10_000;

/// What a peer said about the device's inbox there.
enum PeerLast {
    /// The highest sequence it stored for the device (0: none).
    Answered(u64),
    /// It could not be asked.
    Unreachable,
}

/// Handles a LOGIN of `did` whose `resume_seq` (`resume`) is above every sequence this
/// region sent it. Returns the new acknowledged sequence (the device moved here) or `None`
/// (not a move: refuse the resume point as in one region). `acked` and `after` are the
/// device's cursor here (acknowledged sequence and its inbox stream sequence).
pub async fn adopt(
    ctx: &Arc<StateCtx>,
    app: &str,
    did: &str,
    resume: u64,
    acked: u64,
    after: u64,
) -> Result<Option<u64>, String> {
    let Some(relay) = ctx.relay.clone() else {
        return Ok(None);
    };
    let mut follow = Vec::new();
    let mut verified = false;
    for peer in relay.peers() {
        match peer_last(ctx, &relay, peer, app, did).await {
            PeerLast::Answered(last) if last >= resume => {
                verified = true;
                follow.push(peer.clone());
            }
            // Retention may have removed what it sent; its cursor still says.
            PeerLast::Answered(_) => {
                if relay
                    .peer_acked(&peer.name, app, did)
                    .await
                    .is_some_and(|acked| acked >= resume)
                {
                    verified = true;
                    follow.push(peer.clone());
                }
            }
            PeerLast::Unreachable => follow.push(peer.clone()),
        }
    }
    if follow.is_empty() {
        return Ok(None);
    }
    if !verified {
        relay.metrics.moves_unverified.inc();
    }
    // The marker: numbered `resume` unless a racing push took it (then the one above).
    let marker = ctx
        .store
        .append_inbox_above(app, did, resume - 1, None, |seq| {
            Frame::Down {
                header: tether_schemas::pb::Down {
                    seq,
                    meta: [(MARKER_META.to_string(), "move".to_string())].into(),
                    ..Default::default()
                },
                qos1: true,
                body: Bytes::new(),
            }
            .encode()
        })
        .await
        .map_err(|e| format!("sequence floor not stored: {e}"))?;
    let renumbered = renumber_unacked(ctx, app, did, acked, after, marker).await?;
    relay.metrics.moves_in.inc();
    tracing::info!(
        app,
        did,
        resume,
        marker,
        renumbered,
        verified,
        "device moved in from another region"
    );
    for peer in follow {
        tokio::spawn(follow_peer(
            ctx.clone(),
            relay.clone(),
            peer,
            app.to_string(),
            did.to_string(),
            resume,
        ));
    }
    Ok(Some(marker))
}

/// Appends again, above the marker, the messages stored here after the cursor (stream
/// sequence `after`) that are numbered above `acked` and below `marker`: the device cannot
/// have processed them (its resume point counts another region's sequence).
async fn renumber_unacked(
    ctx: &StateCtx,
    app: &str,
    did: &str,
    acked: u64,
    after: u64,
    marker: u64,
) -> Result<usize, String> {
    let stored = ctx
        .store
        .read_inbox(app, did, after, MAX_RENUMBERED)
        .await
        .map_err(|e| format!("inbox not readable: {e}"))?;
    let mut renumbered = 0;
    let retention = ctx.pipelines.inbox_retention(app);
    for message in stored
        .iter()
        .filter(|m| m.seq > acked && m.seq < marker && m.seq > 0)
    {
        let Some(encode) = renumbering(&message.frame) else {
            continue;
        };
        let id = format!("{app}:mv-{}:{did}", message.stream_seq);
        ctx.store
            .append_inbox(app, did, Some(id), retention, encode)
            .await
            .map_err(|e| format!("renumbered message not stored: {e}"))?;
        renumbered += 1;
    }
    Ok(renumbered)
}

/// An encoder of `frame` (a stored QoS1 DOWN) with another sequence; `None` for anything
/// else, and for a move's marker: a peer's marker is numbered above the resume point of a
/// device that moves back, and is a sequence floor there, not a message.
pub fn renumbering(frame: &Bytes) -> Option<impl Fn(u64) -> Bytes + use<>> {
    let raw = RawFrame::from_bytes(frame.clone(), limits::MAX_FRAME_LEN_CAP).ok()?;
    let Frame::Down { header, body, .. } = Frame::decode(&raw).ok()? else {
        return None;
    };
    if is_marker(&header, &body) {
        return None;
    }
    Some(qos1_down(header, body))
}

/// Whether a stored DOWN is a move's marker: tagged with [`MARKER_META`], or (markers
/// stored before the tag) an empty DOWN without session, room or metadata, which no push
/// produces (a push's DOWN always carries its `sent_at_ms`).
fn is_marker(header: &tether_schemas::pb::Down, body: &Bytes) -> bool {
    header.meta.contains_key(MARKER_META)
        || (body.is_empty()
            && header.session.is_empty()
            && header.room_seq == 0
            && header.sent_at_ms == 0
            && header.meta.is_empty())
}

/// An encoder of a QoS1 DOWN with `header` and `body` and the sequence it is given.
pub fn qos1_down(header: tether_schemas::pb::Down, body: Bytes) -> impl Fn(u64) -> Bytes {
    move |seq: u64| {
        Frame::Down {
            header: tether_schemas::pb::Down {
                seq,
                ..header.clone()
            },
            qos1: true,
            body: body.clone(),
        }
        .encode()
    }
}

/// The highest sequence `peer` stored for the device, through its JetStream domain.
async fn peer_last(ctx: &StateCtx, relay: &Relay, peer: &Region, app: &str, did: &str) -> PeerLast {
    let request = serde_json::json!({ "last_by_subj": subjects::inbox(app, did) });
    let asked = ctx.client.request(
        format!("{}.DIRECT.GET.{INBOX_STREAM}", peer.api_prefix()),
        Bytes::from(request.to_string()),
    );
    match tokio::time::timeout(relay.lookup_timeout(), asked).await {
        Ok(Ok(message)) => match message.status.map(|s| s.as_u16()) {
            None => PeerLast::Answered(
                message
                    .headers
                    .as_ref()
                    .map_or(0, tether_nats::headers::seq),
            ),
            Some(404) => PeerLast::Answered(0),
            Some(_) => PeerLast::Unreachable,
        },
        _ => PeerLast::Unreachable,
    }
}

/// Copies `peer`'s inbox messages for the device numbered above `resume` into this
/// region's inbox, in order, until the peer has answered for [`FOLLOW_AFTER_REACHABLE`] or
/// the relay max age has passed; then deletes each original in the peer once the device
/// acknowledged its copy here ([`Copies::release_acknowledged`]).
async fn follow_peer(
    ctx: Arc<StateCtx>,
    relay: Arc<Relay>,
    peer: Region,
    app: String,
    did: String,
    resume: u64,
) {
    let give_up = Instant::now() + Duration::from_secs(ctx.config.relay_max_age_secs);
    let subject = subjects::inbox(&app, &did);
    let prefix = peer.api_prefix();
    let mut next = 1u64;
    let mut reachable_since: Option<Instant> = None;
    let mut copies = Copies::default();
    let stop = relay.shutdown();
    // The peer's copies of this region's messages (a device that moved there and back):
    // copying them back would deliver them twice, and echo between the regions.
    let own_copies = format!("{app}:mv-{}-", relay.region());
    while Instant::now() < give_up
        && reachable_since.is_none_or(|since| since.elapsed() < FOLLOW_AFTER_REACHABLE)
    {
        let read = direct::next_batch(
            &ctx.client,
            &prefix,
            INBOX_STREAM,
            &subject,
            next,
            direct::MAX_BATCH,
            relay.lookup_timeout(),
        )
        .await;
        if moved_back(&relay, &peer, &app, &did, resume).await {
            return;
        }
        match read {
            Ok(batch) => {
                reachable_since.get_or_insert_with(Instant::now);
                for message in batch.messages {
                    if tether_nats::headers::seq(&message.headers) > resume
                        && !copied_from(&message.headers, &own_copies)
                    {
                        match copy_one(&ctx, &relay, &peer, &app, &did, &message).await {
                            Copied::Stored(local) => copies.stored(message.sequence, local),
                            Copied::Skipped => {}
                            Copied::Failed => break,
                        }
                    }
                    next = message.sequence + 1;
                }
            }
            Err(error) => {
                tracing::debug!(region = %peer.name, did, %error, "peer inbox not readable yet")
            }
        }
        copies
            .release_acknowledged(&ctx, &relay, &peer, &app, &did)
            .await;
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(FOLLOW_EVERY) => {}
        }
    }
    tracing::info!(region = %peer.name, app, did, "stopped following the peer inbox of a moved device");
    // Copies the device has not acknowledged yet: their originals stay in the peer until
    // it does (a device that moves back before that gets them there again).
    while !copies.is_empty() && Instant::now() < give_up {
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(RELEASE_EVERY) => {}
        }
        if moved_back(&relay, &peer, &app, &did, resume).await {
            return;
        }
        copies
            .release_acknowledged(&ctx, &relay, &peer, &app, &did)
            .await;
    }
}

/// Whether the peer's cursor shows the device acknowledged there what it had not when it
/// moved here: it is served there again (it moved back), and what is stored there is its
/// own.
async fn moved_back(relay: &Relay, peer: &Region, app: &str, did: &str, resume: u64) -> bool {
    let back = relay
        .peer_acked(&peer.name, app, did)
        .await
        .is_some_and(|acked| acked > resume);
    if back {
        tracing::info!(region = %peer.name, app, did, "the moved device is served by the peer again");
    }
    back
}

/// The peer's messages copied here whose originals are still stored in the peer.
#[derive(Default)]
struct Copies {
    /// (peer stream sequence, sequence of the copy here), in copy order.
    pending: Vec<(u64, u64)>,
}

impl Copies {
    fn stored(&mut self, peer_sequence: u64, local_seq: u64) {
        if self.pending.len() < MAX_RENUMBERED {
            self.pending.push((peer_sequence, local_seq));
        }
    }

    fn is_empty(&self) -> bool {
        self.pending.is_empty()
    }

    /// Deletes in the peer the original of every copy the device acknowledged here, so a
    /// device that later moves back to the peer does not get it again there (the peer
    /// renumbers what it holds undelivered, [`renumber_unacked`]). An original the peer
    /// did not delete (unreachable) is tried again next time.
    async fn release_acknowledged(
        &mut self,
        ctx: &StateCtx,
        relay: &Relay,
        peer: &Region,
        app: &str,
        did: &str,
    ) {
        if self.pending.is_empty() {
            return;
        }
        let acked = match ctx.store.cursor(app, did).await {
            Ok(cursor) => cursor.acked,
            Err(_) => return,
        };
        let prefix = peer.api_prefix();
        let mut kept = Vec::with_capacity(self.pending.len());
        for (peer_sequence, local_seq) in std::mem::take(&mut self.pending) {
            if local_seq > acked {
                kept.push((peer_sequence, local_seq));
                continue;
            }
            let deleted = direct::delete(
                &ctx.client,
                &prefix,
                INBOX_STREAM,
                peer_sequence,
                relay.lookup_timeout(),
            )
            .await;
            match deleted {
                Ok(()) => {
                    relay.metrics.moved_released.inc();
                }
                // Already gone (retention, or deleted by an earlier try whose answer was lost).
                Err(direct::DeleteError::Refused(reason)) => {
                    tracing::debug!(region = %peer.name, did, peer_sequence, %reason, "original of a copied message not deleted in the peer")
                }
                Err(error) => {
                    tracing::debug!(region = %peer.name, did, peer_sequence, %error, "original of a copied message not deleted yet; retrying");
                    kept.push((peer_sequence, local_seq));
                }
            }
        }
        self.pending = kept;
    }
}

/// Whether a peer's inbox message is the copy of a message of the region whose copy
/// message ids start with `prefix` (see [`copy_one`]).
fn copied_from(headers: &async_nats::HeaderMap, prefix: &str) -> bool {
    headers
        .get(tether_nats::headers::MSG_ID)
        .is_some_and(|id| id.as_str().starts_with(prefix))
}

/// What became of one of a peer's inbox messages.
enum Copied {
    /// Stored here with this sequence.
    Stored(u64),
    /// Not a message to copy (a marker, or not a QoS1 DOWN).
    Skipped,
    /// Not stored (read again next round).
    Failed,
}

/// Appends one of a peer's inbox messages here.
async fn copy_one(
    ctx: &StateCtx,
    relay: &Relay,
    peer: &Region,
    app: &str,
    did: &str,
    message: &direct::DirectMessage,
) -> Copied {
    let Some(encode) = renumbering(&message.payload) else {
        return Copied::Skipped;
    };
    let id = format!("{app}:mv-{}-{}:{did}", peer.name, message.sequence);
    let retention = ctx.pipelines.inbox_retention(app);
    match ctx
        .store
        .append_inbox(app, did, Some(id), retention, encode)
        .await
    {
        Ok(seq) => {
            relay.metrics.moved_copied.inc();
            Copied::Stored(seq)
        }
        Err(error) => {
            tracing::warn!(region = %peer.name, did, %error, "message of the region a device left not copied; retrying");
            Copied::Failed
        }
    }
}
