//! The part of a connection other tasks can reach: its identity, its bounded outbound queue
//! and the close request. Small on purpose: an idle connection costs this struct (one
//! allocation of 160 B with jemalloc, see the size test below), its identity's one string,
//! its map entries and its task, nothing more.

use std::sync::atomic::{AtomicBool, AtomicI32, AtomicU8, AtomicU32, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::task::{Context, Poll, Waker};

use bytes::Bytes;
use futures::task::AtomicWaker;
use tether_schemas::ErrorCode;

use crate::app_traffic::AppCounters;

/// Who a logged-in connection is.
///
/// Compact: the app is the gateway's shared record of it (its counters, which hold its
/// id), and the user and device ids share one allocation.
#[derive(Debug)]
pub struct Identity {
    /// The app's counters, shared by every connection of the app; they hold its id.
    app: Arc<AppCounters>,
    /// The user id followed by the device id.
    ids: Box<str>,
    /// Where the device id starts in `ids`.
    did_at: u32,
    /// Whether the token allows UP frames.
    pub may_uplink: bool,
    /// The token's rights (carried into a redirect token).
    pub rights: tether_auth::Rights,
    /// The connection's transport (a REDIRECT names an endpoint of the same kind).
    pub transport: super::Transport,
}

impl Identity {
    /// The identity of a device `did` of user `uid` in the app whose counters are `app`.
    pub fn new(
        app: Arc<AppCounters>,
        uid: &str,
        did: &str,
        may_uplink: bool,
        rights: tether_auth::Rights,
        transport: super::Transport,
    ) -> Self {
        let mut ids = String::with_capacity(uid.len() + did.len());
        ids.push_str(uid);
        ids.push_str(did);
        Self {
            app,
            // A user id longer than 4 GiB cannot arrive in a frame; clamp rather than panic.
            did_at: u32::try_from(uid.len()).unwrap_or(u32::MAX),
            ids: ids.into_boxed_str(),
            may_uplink,
            rights,
            transport,
        }
    }

    /// App id.
    pub fn app(&self) -> &str {
        self.app.name()
    }

    /// User id.
    pub fn uid(&self) -> &str {
        self.ids.get(..self.did_at as usize).unwrap_or_default()
    }

    /// Device id.
    pub fn did(&self) -> &str {
        self.ids.get(self.did_at as usize..).unwrap_or_default()
    }

    /// The message counters of the app.
    pub fn counters(&self) -> &AppCounters {
        &self.app
    }
}

/// Why a connection ends; `send_error` says whether the client gets an ERROR frame first.
#[derive(Debug, Clone, PartialEq)]
pub struct CloseReason {
    /// The code reported to the client and in the disconnect event.
    pub code: ErrorCode,
    /// A short lowercase explanation.
    pub text: String,
    /// Suggested reconnect delay, for `going_away`.
    pub retry_after_ms: u32,
    /// Whether to send an ERROR frame with the CLOSE flag before closing.
    pub send_error: bool,
}

impl CloseReason {
    /// A close that tells the client why.
    pub fn error(code: ErrorCode, text: impl Into<String>) -> Self {
        Self {
            code,
            text: text.into(),
            retry_after_ms: 0,
            send_error: true,
        }
    }

    /// A close without an ERROR frame (the peer left, or the socket failed).
    pub fn silent(code: ErrorCode, text: impl Into<String>) -> Self {
        Self {
            code,
            text: text.into(),
            retry_after_ms: 0,
            send_error: false,
        }
    }

    /// The reason label used in metrics and events (`client_closed` for a clean peer close).
    pub fn label(&self) -> &'static str {
        if self.code == ErrorCode::Ok {
            "client_closed"
        } else {
            self.code.as_str()
        }
    }
}

/// What happened to a frame offered to a connection's queue.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Enqueued {
    /// Queued for writing.
    Queued,
    /// The queue was full and the frame was QoS0: dropped.
    DroppedQos0,
    /// The queue was full and the frame was QoS1: the connection is closing (`slow_consumer`).
    Overflow,
    /// The connection is already closing.
    Closing,
}

#[derive(Debug, Default)]
struct Outbound {
    /// A `Vec`, not a `VecDeque`: the task always takes the whole queue.
    frames: Vec<Bytes>,
    /// Boxed: a pointer while no close is pending, which is almost always.
    close: Option<Box<CloseReason>>,
    /// A hand-off asked the task to stop and give its state up (see `crate::handoff`).
    park: bool,
}

/// Shared state of one connection.
#[derive(Debug)]
pub struct ConnShared {
    /// Unique 64-bit connection id.
    pub id: u64,
    /// Gateway-clock second the socket was accepted.
    pub accepted_at: u32,
    identity: OnceLock<Identity>,
    last_seen: AtomicU32,
    /// Gateway-clock second frames were last written to the client.
    last_written: AtomicU32,
    outbound: Mutex<Outbound>,
    /// Set when frames were queued or a close requested since the task last looked.
    woken: AtomicBool,
    /// Dormancy ([`super::dormant`]): [`AWAKE`], [`SLEEP_ASKED`] or [`ASLEEP`].
    sleep: AtomicU8,
    /// The plain socket's descriptor, for a hand-off (-1: TLS, which cannot move).
    fd: AtomicI32,
    /// The connection task, polled directly by its idle loop (no waiter node, unlike
    /// `Notify`, so the idle task's future stays small).
    waker: AtomicWaker,
}

impl ConnShared {
    /// A new, not yet logged-in connection.
    pub fn new(id: u64, now: u32) -> Self {
        Self {
            id,
            accepted_at: now,
            identity: OnceLock::new(),
            last_seen: AtomicU32::new(now),
            last_written: AtomicU32::new(now),
            outbound: Mutex::new(Outbound::default()),
            woken: AtomicBool::new(false),
            sleep: AtomicU8::new(AWAKE),
            fd: AtomicI32::new(-1),
            waker: AtomicWaker::new(),
        }
    }

    /// Records the plain socket's descriptor (a hand-off sends it to the next process).
    pub fn set_fd(&self, fd: i32) {
        self.fd.store(fd, Ordering::Relaxed);
    }

    /// The plain socket's descriptor, if the connection can move (not TLS).
    pub fn movable_fd(&self) -> Option<i32> {
        Some(self.fd.load(Ordering::Relaxed)).filter(|fd| *fd >= 0)
    }

    /// Asks the task to stop at its next idle point and hand its state over.
    pub fn request_park(&self) {
        lock(&self.outbound).park = true;
        self.wake();
    }

    /// Whether the task should park now (asked to, and no close pending).
    pub fn should_park(&self) -> bool {
        let out = lock(&self.outbound);
        out.park && out.close.is_none()
    }

    /// Clears a park request (the hand-off was aborted).
    pub fn clear_park(&self) {
        lock(&self.outbound).park = false;
    }

    /// The identity, once logged in.
    pub fn identity(&self) -> Option<&Identity> {
        self.identity.get()
    }

    /// The message counters of the connection's app (`None` before login).
    pub fn app_counters(&self) -> Option<&AppCounters> {
        self.identity().map(Identity::counters)
    }

    /// Records a successful login; false if already logged in.
    pub fn set_identity(&self, identity: Identity) -> bool {
        self.identity.set(identity).is_ok()
    }

    /// Marks activity at gateway-clock second `now` (any frame from the client).
    pub fn touch(&self, now: u32) {
        self.last_seen.store(now, Ordering::Relaxed);
    }

    /// Gateway-clock second of the last frame from the client.
    pub fn last_seen(&self) -> u32 {
        self.last_seen.load(Ordering::Relaxed)
    }

    /// Marks frames written to the client at gateway-clock second `now`.
    pub fn wrote(&self, now: u32) {
        self.last_written.store(now, Ordering::Relaxed);
    }

    /// Gateway-clock second of the last frame in either direction (a connection that
    /// only receives pushes is not silent).
    pub fn last_active(&self) -> u32 {
        self.last_seen()
            .max(self.last_written.load(Ordering::Relaxed))
    }

    /// Offers a frame; applies the slow-consumer policy when `limit` frames are queued.
    pub fn push(&self, frame: Bytes, qos1: bool, limit: usize) -> Enqueued {
        let outcome = {
            let mut out = lock(&self.outbound);
            if out.close.is_some() {
                Enqueued::Closing
            } else if out.frames.len() < limit {
                out.frames.push(frame);
                Enqueued::Queued
            } else if qos1 {
                out.close = Some(Box::new(CloseReason::error(
                    ErrorCode::SlowConsumer,
                    "outbound queue full",
                )));
                Enqueued::Overflow
            } else {
                Enqueued::DroppedQos0
            }
        };
        if matches!(outcome, Enqueued::Queued | Enqueued::Overflow) {
            self.wake();
        }
        outcome
    }

    /// Asks the connection to close (first reason wins).
    pub fn close(&self, reason: CloseReason) {
        {
            let mut out = lock(&self.outbound);
            if out.close.is_some() {
                return;
            }
            out.close = Some(Box::new(reason));
        }
        self.wake();
    }

    /// Wakes the connection task so it looks at its queue and close request again.
    pub fn wake_task(&self) {
        self.wake();
    }

    /// A copy of the frames queued and not written yet, in order.
    pub fn queued(&self) -> Vec<Bytes> {
        lock(&self.outbound).frames.to_vec()
    }

    /// Wakes the connection task (a wake-up before it waits is kept, like a permit).
    fn wake(&self) {
        self.woken.store(true, Ordering::Release);
        self.waker.wake();
    }

    /// Whether a close was requested.
    pub fn is_closing(&self) -> bool {
        lock(&self.outbound).close.is_some()
    }

    /// Takes everything queued and the close request, if any.
    pub fn take(&self) -> (Vec<Bytes>, Option<CloseReason>) {
        let mut out = lock(&self.outbound);
        (
            std::mem::take(&mut out.frames),
            out.close.as_deref().cloned(),
        )
    }

    /// Ready once frames were queued or a close requested since the last ready poll.
    /// Only the connection's own task polls this.
    pub fn poll_woken(&self, cx: &mut Context<'_>) -> Poll<()> {
        if self.woken.swap(false, Ordering::AcqRel) {
            return Poll::Ready(());
        }
        self.waker.register(cx.waker());
        if self.woken.swap(false, Ordering::AcqRel) {
            Poll::Ready(())
        } else {
            Poll::Pending
        }
    }

    /// Waits until frames are queued or a close is requested.
    pub async fn woken(&self) {
        std::future::poll_fn(|cx| self.poll_woken(cx)).await;
    }
}

/// The connection has its task.
const AWAKE: u8 = 0;
/// The task was asked to go dormant at its next idle point.
const SLEEP_ASKED: u8 = 1;
/// Dormant: no task, the socket waits in the gateway's dormant set.
const ASLEEP: u8 = 2;

impl ConnShared {
    /// Asks an awake connection's task to go dormant when it is idle; false when it is
    /// dormant or asked already.
    pub fn request_sleep(&self) -> bool {
        let asked = self
            .sleep
            .compare_exchange(AWAKE, SLEEP_ASKED, Ordering::AcqRel, Ordering::Acquire)
            .is_ok();
        if asked {
            self.wake();
        }
        asked
    }

    /// Takes a pending request to go dormant (the task is at an idle point): true when
    /// one was pending and nothing is queued, closing or parking; the connection counts
    /// as dormant from then on until [`ConnShared::woke_up`].
    pub fn take_sleep_request(&self) -> bool {
        if self.sleep.load(Ordering::Acquire) != SLEEP_ASKED {
            return false;
        }
        let out = lock(&self.outbound);
        let idle = out.frames.is_empty() && out.close.is_none() && !out.park;
        let next = if idle { ASLEEP } else { AWAKE };
        self.sleep.store(next, Ordering::Release);
        idle
    }

    /// The connection has its task again.
    pub fn woke_up(&self) {
        self.sleep.store(AWAKE, Ordering::Release);
    }

    /// Whether the connection is awake and not asked to sleep.
    pub fn is_awake(&self) -> bool {
        self.sleep.load(Ordering::Acquire) == AWAKE
    }

    /// Registers who is woken when frames are queued or a close is requested while the
    /// connection has no task (a dormant connection's reviver); true when such a wake-up
    /// is already pending (the caller wakes it itself). The flag stays set for the task.
    pub fn wake_instead(&self, waker: &Waker) -> bool {
        self.waker.register(waker);
        self.woken.load(Ordering::Acquire)
    }
}

/// Locks a mutex, recovering from poisoning (a panicking holder leaves a usable queue).
fn lock<T>(mutex: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    mutex
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The shared part is one `Arc` allocation per connection: 16 B of counts plus this
    /// struct. jemalloc's size classes around it are 128, 160 and 192 B; keep it in 160.
    #[test]
    fn shared_part_is_small() {
        let size = std::mem::size_of::<ConnShared>();
        eprintln!(
            "ConnShared: {size} bytes, Identity: {} bytes",
            std::mem::size_of::<Identity>()
        );
        assert!(size + 16 <= 160, "ConnShared grew to {size} bytes");
    }

    #[test]
    fn identity_ids_share_one_string() {
        let app = Arc::new(AppCounters::new("demo".into()));
        let id = Identity::new(
            app,
            "user-1",
            "device-1",
            true,
            tether_auth::Rights::default(),
            crate::conn::Transport::Tcp,
        );
        assert_eq!(
            (id.app(), id.uid(), id.did()),
            ("demo", "user-1", "device-1")
        );
        let empty_uid = Identity::new(
            Arc::new(AppCounters::new("a".into())),
            "",
            "d",
            false,
            tether_auth::Rights::default(),
            crate::conn::Transport::Ws,
        );
        assert_eq!((empty_uid.uid(), empty_uid.did()), ("", "d"));
    }

    #[test]
    fn slow_consumer_policy() {
        let conn = ConnShared::new(1, 0);
        assert_eq!(
            conn.push(Bytes::from_static(b"a"), false, 1),
            Enqueued::Queued
        );
        assert_eq!(
            conn.push(Bytes::from_static(b"b"), false, 1),
            Enqueued::DroppedQos0
        );
        assert_eq!(
            conn.push(Bytes::from_static(b"c"), true, 1),
            Enqueued::Overflow
        );
        assert_eq!(
            conn.push(Bytes::from_static(b"d"), false, 1),
            Enqueued::Closing
        );
        let (frames, close) = conn.take();
        assert_eq!(frames.len(), 1);
        assert_eq!(close.map(|c| c.code), Some(ErrorCode::SlowConsumer));
    }
}
