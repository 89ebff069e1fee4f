//! Receipts of the uplinks one partition owner answered, kept in its memory for the
//! de-duplication window (PROTOCOL 10.2), and what the owner tells a gateway that asks
//! about a duplicate UP.
//!
//! Before, every receipt was also a JetStream write (KV `tether_receipts`): one more store
//! per UP. Now nothing is written: a question the owner cannot answer from memory (the UP
//! was answered by an earlier owner, its receipt was evicted, or it was a `timeout`) is
//! answered "unknown", and the gateway has the UP processed again under a retry id; the
//! business is idempotent on (app, did, `Tether-Msg-Id`), so it answers the first
//! `stored` again and nothing is stored twice.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, HashSet, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use tether_nats::headers;
use tether_schemas::{ErrorCode, Frame, RawFrame, limits};
use tokio::time::Instant;

/// Receipts one partition keeps at most; the oldest go first (a question about one of
/// them is then answered "unknown": processed again, never lost).
pub const MAX_RECEIPTS: usize = 200_000;

/// What the owner answers a gateway about a duplicate UP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReceiptAnswer {
    /// The kept UP_ACK: the gateway sends it to the device.
    Kept(Bytes),
    /// The first copy is being processed or not delivered to the owner yet: its UP_ACK
    /// follows the device's route; the gateway drops the duplicate.
    Pending,
    /// Not known here (or a `timeout`): the gateway has the UP processed again.
    Unknown,
}

impl ReceiptAnswer {
    /// The `Tether-Receipt` value of a reply that carries no frame.
    pub fn header_value(&self) -> Option<&'static str> {
        match self {
            ReceiptAnswer::Kept(_) => None,
            ReceiptAnswer::Pending => Some(headers::RECEIPT_PENDING),
            ReceiptAnswer::Unknown => Some(headers::RECEIPT_UNKNOWN),
        }
    }
}

#[derive(Default)]
struct Book {
    frames: HashMap<Arc<str>, Bytes>,
    order: VecDeque<(Instant, Arc<str>)>,
}

/// The receipts of one partition, shared by its worker and its uplink tasks.
#[derive(Clone)]
pub struct ReceiptBook {
    inner: Arc<Mutex<Book>>,
    keep_for: Duration,
    max: usize,
}

impl ReceiptBook {
    /// An empty book keeping each receipt `keep_for` (the de-duplication window), at most
    /// `max` of them.
    pub fn new(keep_for: Duration, max: usize) -> Self {
        ReceiptBook {
            inner: Arc::new(Mutex::new(Book::default())),
            keep_for,
            max: max.max(1),
        }
    }

    /// Keeps `frame` as the receipt of (app, did, client_msg_id), replacing an earlier one
    /// (a real answer replaces a `timeout` marker).
    pub fn keep(&self, app: &str, did: &str, client_msg_id: u64, frame: Bytes) {
        let key: Arc<str> = tether_nats::keys::receipt(app, did, client_msg_id).into();
        let now = Instant::now();
        let Ok(mut book) = self.inner.lock() else {
            return;
        };
        while let Some((at, _)) = book.order.front() {
            if now.duration_since(*at) < self.keep_for && book.frames.len() < self.max {
                break;
            }
            if let Some((_, old)) = book.order.pop_front() {
                book.frames.remove(&old);
            }
        }
        match book.frames.entry(key.clone()) {
            Entry::Occupied(mut slot) => {
                slot.insert(frame);
            }
            Entry::Vacant(slot) => {
                slot.insert(frame);
                book.order.push_back((now, key));
            }
        }
    }

    /// The receipt kept for (app, did, client_msg_id), `timeout` markers included.
    pub fn get(&self, app: &str, did: &str, client_msg_id: u64) -> Option<Bytes> {
        let key = tether_nats::keys::receipt(app, did, client_msg_id);
        let book = self.inner.lock().ok()?;
        book.frames.get(key.as_str()).cloned()
    }

    /// The receipt kept for (app, did, client_msg_id) unless it is a `timeout` marker.
    pub fn answered(&self, app: &str, did: &str, client_msg_id: u64) -> Option<Bytes> {
        self.get(app, did, client_msg_id)
            .filter(|frame| !is_timeout(frame))
    }

    /// Receipts kept now.
    pub fn len(&self) -> usize {
        self.inner.lock().map_or(0, |book| book.frames.len())
    }

    /// Whether no receipt is kept.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Which stream messages of the uplink consumer the owner has or had in hand: tells a
/// gateway's duplicate whose first copy is still to be answered (`Pending`) from one
/// answered before (by this owner, from the book, or by an earlier one: `Unknown`).
#[derive(Debug, Default)]
pub struct UplinkWatermark {
    /// Highest stream sequence seen: delivered to this owner, or delivered by the
    /// consumer before this owner took the partition.
    top: u64,
    /// Delivered to this owner and not finished (queued or being processed).
    in_hand: HashSet<u64>,
}

impl UplinkWatermark {
    /// Starts above what the consumer had delivered when this owner took the partition
    /// (`delivered`): anything at or below it was answered by an earlier owner or will be
    /// redelivered here.
    pub fn new(delivered: u64) -> Self {
        UplinkWatermark {
            top: delivered,
            in_hand: HashSet::new(),
        }
    }

    /// A message of stream sequence `seq` was delivered here.
    pub fn received(&mut self, seq: u64) {
        self.top = self.top.max(seq);
        self.in_hand.insert(seq);
    }

    /// The message of stream sequence `seq` is finished.
    pub fn finished(&mut self, seq: u64) {
        self.in_hand.remove(&seq);
    }

    /// What to tell a gateway whose duplicate's first copy has stream sequence `seq`.
    pub fn answer(
        &self,
        book: &ReceiptBook,
        app: &str,
        did: &str,
        cmid: u64,
        seq: u64,
    ) -> ReceiptAnswer {
        if seq == 0 {
            return ReceiptAnswer::Unknown;
        }
        if seq > self.top || self.in_hand.contains(&seq) {
            return ReceiptAnswer::Pending;
        }
        match book.answered(app, did, cmid) {
            Some(frame) => ReceiptAnswer::Kept(frame),
            None => ReceiptAnswer::Unknown,
        }
    }
}

/// Whether a receipt is state's `timeout` marker (kept so a resend is processed again,
/// never sent to the device).
pub fn is_timeout(frame: &Bytes) -> bool {
    RawFrame::from_bytes(frame.clone(), limits::MAX_FRAME_LEN_CAP)
        .ok()
        .and_then(|raw| Frame::decode(&raw).ok())
        .is_some_and(|decoded| {
            matches!(decoded, Frame::UpAck(ack) if ack.code == u32::from(ErrorCode::Timeout.as_u16()))
        })
}

#[cfg(test)]
mod tests {
    use super::*;
    use tether_schemas::pb;

    fn ack(id: u64, code: ErrorCode) -> Bytes {
        Frame::UpAck(pb::UpAck {
            client_msg_id: id,
            code: u32::from(code.as_u16()),
            message: String::new(),
            server_msg_id: String::new(),
        })
        .encode()
    }

    #[tokio::test]
    async fn kept_receipts_answer_and_timeouts_do_not() {
        let book = ReceiptBook::new(Duration::from_secs(120), 10);
        book.keep("a", "d", 1, ack(1, ErrorCode::Ok));
        book.keep("a", "d", 2, ack(2, ErrorCode::Timeout));
        assert_eq!(book.answered("a", "d", 1), Some(ack(1, ErrorCode::Ok)));
        assert_eq!(book.answered("a", "d", 2), None);
        assert!(book.get("a", "d", 2).is_some());
        // A real answer replaces the marker.
        book.keep("a", "d", 2, ack(2, ErrorCode::Ok));
        assert_eq!(book.answered("a", "d", 2), Some(ack(2, ErrorCode::Ok)));
        assert_eq!(book.len(), 2);
        assert_eq!(book.answered("b", "d", 1), None, "another app's device");
    }

    #[tokio::test]
    async fn the_oldest_go_first_past_the_limit() {
        let book = ReceiptBook::new(Duration::from_secs(120), 3);
        for id in 0..5 {
            book.keep("a", "d", id, ack(id, ErrorCode::Ok));
        }
        assert_eq!(book.len(), 3);
        assert_eq!(book.answered("a", "d", 0), None);
        assert!(book.answered("a", "d", 4).is_some());
    }

    #[tokio::test(start_paused = true)]
    async fn receipts_expire_after_the_window() {
        let book = ReceiptBook::new(Duration::from_secs(120), 100);
        book.keep("a", "d", 1, ack(1, ErrorCode::Ok));
        tokio::time::advance(Duration::from_secs(121)).await;
        book.keep("a", "d", 2, ack(2, ErrorCode::Ok));
        assert_eq!(book.answered("a", "d", 1), None);
        assert!(book.answered("a", "d", 2).is_some());
    }

    #[test]
    fn the_watermark_tells_pending_from_answered_and_unknown() {
        let book = ReceiptBook::new(Duration::from_secs(120), 100);
        let mut mark = UplinkWatermark::new(10);
        // At or below what an earlier owner had: unknown here.
        assert_eq!(mark.answer(&book, "a", "d", 1, 7), ReceiptAnswer::Unknown);
        // Not delivered here yet: its answer follows.
        assert_eq!(mark.answer(&book, "a", "d", 1, 11), ReceiptAnswer::Pending);
        mark.received(11);
        assert_eq!(mark.answer(&book, "a", "d", 1, 11), ReceiptAnswer::Pending);
        book.keep("a", "d", 1, ack(1, ErrorCode::Ok));
        mark.finished(11);
        assert_eq!(
            mark.answer(&book, "a", "d", 1, 11),
            ReceiptAnswer::Kept(ack(1, ErrorCode::Ok))
        );
        // Finished without a receipt (receipt mode `stored`, or evicted): unknown.
        mark.received(12);
        mark.finished(12);
        assert_eq!(mark.answer(&book, "a", "d", 2, 12), ReceiptAnswer::Unknown);
        assert_eq!(mark.answer(&book, "a", "d", 2, 0), ReceiptAnswer::Unknown);
    }
}
