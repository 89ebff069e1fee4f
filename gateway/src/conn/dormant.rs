//! Dormant connections: a logged-in plain (TCP or WebSocket) connection silent for
//! `dormant_after_secs` gives up its task and its registration with the runtime, the two
//! largest parts of an idle connection (256 bytes each). Its socket waits in one epoll set
//! of the gateway's own (one-shot, by connection id) and its task state in a map; input
//! from the socket, a frame queued for it, a close or a hand-off's park request brings it
//! back: the socket is registered again and a task started, which then carries on exactly
//! where the old one stopped (nothing is read or written while dormant, so no frame is
//! lost or reordered). TLS connections never go dormant (rustls state stays with a task).
//!
//! Once a second [`run`] asks every awake logged-in connection silent for long enough to
//! sleep ([`ConnShared::request_sleep`]); its task goes dormant at its next idle point
//! ([`super::driver`]). Traffic either way keeps a connection awake (a fan-out member
//! getting a broadcast every few hundred milliseconds never sleeps); one that gets a push
//! now and then is woken for it and sleeps again `dormant_after_secs` later.
//!
//! [`ConnShared::request_sleep`]: super::ConnShared::request_sleep

use std::collections::HashMap;
use std::os::fd::{AsFd, AsRawFd, RawFd};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError, Weak};
use std::task::{Wake, Waker};
use std::time::Duration;

use nix::sys::epoll::{Epoll, EpollCreateFlags, EpollEvent, EpollFlags, EpollTimeout};
use tokio::io::unix::AsyncFd;
use tokio::sync::Notify;

use super::driver::Driver;
use crate::context::GatewayCtx;

/// Most socket events taken from the epoll set at once.
const EVENTS: usize = 256;

/// The dormant connections of one gateway.
pub struct Dormant {
    /// Silence after which a logged-in connection goes dormant (0: never).
    after_secs: u32,
    /// The sockets of dormant connections (`None` if the set could not be created: then
    /// no connection goes dormant).
    epoll: Option<Arc<Epoll>>,
    /// Dormant task state by connection id.
    sleepers: Mutex<HashMap<u64, Box<Driver>>>,
    /// Connections to wake (frames queued, close or park requested).
    woken: Mutex<Vec<u64>>,
    /// Tells [`run`] that `woken` has ids.
    notify: Notify,
}

/// Wakes one dormant connection when frames are queued for it (its shared part's waker
/// while it has no task).
struct Reviver {
    conn: u64,
    dormant: Weak<Dormant>,
}

impl Wake for Reviver {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        if let Some(dormant) = self.dormant.upgrade() {
            lock(&dormant.woken).push(self.conn);
            dormant.notify.notify_one();
        }
    }
}

/// The epoll set, as the runtime polls it.
struct EpollFd(Arc<Epoll>);

impl AsRawFd for EpollFd {
    fn as_raw_fd(&self) -> RawFd {
        self.0.0.as_raw_fd()
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    mutex.lock().unwrap_or_else(PoisonError::into_inner)
}

impl Dormant {
    /// A dormant set for connections silent for `after_secs` (0: none ever sleeps).
    pub fn new(after_secs: u64) -> Self {
        let epoll = if after_secs == 0 {
            None
        } else {
            match Epoll::new(EpollCreateFlags::EPOLL_CLOEXEC) {
                Ok(epoll) => Some(Arc::new(epoll)),
                Err(error) => {
                    tracing::warn!(%error, "no epoll set: connections never go dormant");
                    None
                }
            }
        };
        Self {
            after_secs: u32::try_from(after_secs).unwrap_or(u32::MAX),
            epoll,
            sleepers: Mutex::new(HashMap::new()),
            woken: Mutex::new(Vec::new()),
            notify: Notify::new(),
        }
    }

    /// Dormant connections now.
    pub fn len(&self) -> usize {
        lock(&self.sleepers).len()
    }

    /// Whether no connection is dormant.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Puts a connection to sleep; gives the driver back when it cannot sleep (TLS, or
    /// the socket could not be moved), still registered with the runtime.
    pub(super) fn put(self: &Arc<Self>, mut driver: Box<Driver>) -> Result<(), Box<Driver>> {
        let Some(epoll) = &self.epoll else {
            return Err(driver);
        };
        if !driver.can_sleep() {
            return Err(driver);
        }
        let id = driver.shared().id;
        let socket = match driver.take_socket() {
            Ok(socket) => socket,
            // The socket is lost with the registration that failed: the task closes.
            Err(()) => return Err(driver),
        };
        let shared = driver.shared().clone();
        let reviver = Waker::from(Arc::new(Reviver {
            conn: id,
            dormant: Arc::downgrade(self),
        }));
        let pending = {
            let mut sleepers = lock(&self.sleepers);
            let event = EpollEvent::new(
                EpollFlags::EPOLLIN | EpollFlags::EPOLLRDHUP | EpollFlags::EPOLLONESHOT,
                id,
            );
            if let Err(error) = epoll.add(socket.as_fd(), event) {
                tracing::debug!(conn = id, %error, "cannot make the connection dormant");
                driver.return_socket(socket);
                return Err(driver);
            }
            driver.keep_socket(socket);
            driver.metrics().dormant.inc();
            sleepers.insert(id, driver);
            // Under the lock: a revival (socket input may already have arrived) takes it
            // first, so it cannot start the new task before the reviver is in place and
            // then have the reviver replace the new task's waker.
            shared.wake_instead(&reviver)
        };
        if pending {
            // Something was queued meanwhile: wake at once.
            reviver.wake();
        }
        Ok(())
    }

    /// Wakes dormant connection `conn`: registers its socket again and starts its task.
    /// Nothing happens if it is awake already (woken twice).
    fn revive(&self, conn: u64) {
        let Some(mut driver) = lock(&self.sleepers).remove(&conn) else {
            return;
        };
        if let (Some(epoll), Some(socket)) = (&self.epoll, driver.dormant_socket()) {
            // One-shot: the entry may still be there (woken by a queued frame).
            let _ = epoll.delete(socket.as_fd());
        }
        driver.wake_socket();
        driver.metrics().dormant.dec();
        super::driver::relaunch(*driver);
    }

    /// Ids of the connections whose sockets have input (or hung up), without waiting.
    fn ready(&self, events: &mut [EpollEvent]) -> Vec<u64> {
        let Some(epoll) = &self.epoll else {
            return Vec::new();
        };
        let mut ready = Vec::new();
        loop {
            match epoll.wait(events, EpollTimeout::ZERO) {
                Ok(0) => return ready,
                Ok(n) => {
                    ready.extend(events[..n].iter().map(EpollEvent::data));
                    if n < events.len() {
                        return ready;
                    }
                }
                Err(nix::errno::Errno::EINTR) => continue,
                Err(error) => {
                    tracing::warn!(%error, "dormant set wait failed");
                    return ready;
                }
            }
        }
    }
}

/// Serves the gateway's dormant set until the runtime ends: once a second asks silent
/// connections to sleep, and wakes dormant ones on socket input or queued frames. It
/// outlives the gateway's shutdown on purpose: closing a dormant connection wakes it.
pub async fn run(ctx: Arc<GatewayCtx>) {
    let dormant = ctx.dormant.clone();
    let Some(epoll) = dormant.epoll.clone() else {
        return;
    };
    let after = dormant.after_secs;
    let ctx = Arc::downgrade(&ctx);
    // Deprecated because an `AsRawFd` may close its descriptor while registered; this
    // one holds its epoll set (an `Arc`) open for as long as the `AsyncFd` lives.
    #[allow(deprecated)]
    let polled = AsyncFd::with_interest(EpollFd(epoll), tokio::io::Interest::READABLE);
    let polled = match polled {
        Ok(polled) => polled,
        Err(error) => {
            tracing::warn!(%error, "dormant set not polled: connections never go dormant");
            return;
        }
    };
    let mut events = vec![EpollEvent::empty(); EVENTS];
    let mut sweep = tokio::time::interval(Duration::from_secs(1));
    sweep.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            readable = polled.readable() => {
                let Ok(mut guard) = readable else { return };
                // Drained: a later event makes the set readable again (clear_ready keeps
                // the readiness if the runtime saw one meanwhile).
                for conn in dormant.ready(&mut events) {
                    dormant.revive(conn);
                }
                guard.clear_ready();
            }
            () = dormant.notify.notified() => {
                let woken = std::mem::take(&mut *lock(&dormant.woken));
                for conn in woken {
                    dormant.revive(conn);
                }
            }
            _ = sweep.tick() => {
                let Some(ctx) = ctx.upgrade() else { return };
                ask_silent_to_sleep(&ctx, after);
            }
        }
    }
}

/// Asks every awake logged-in plain connection silent (nothing read or written) for
/// `after` seconds to go dormant (TLS ones, without a movable descriptor, never can).
fn ask_silent_to_sleep(ctx: &GatewayCtx, after: u32) {
    let now = ctx.clock.now();
    ctx.registry.for_each(|conn| {
        if conn.is_awake()
            && conn.movable_fd().is_some()
            && now.saturating_sub(conn.last_active()) >= after
        {
            conn.request_sleep();
        }
    });
}
