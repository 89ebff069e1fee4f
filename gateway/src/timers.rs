//! One timer structure for every connection: a hashed wheel of one-second slots.
//!
//! A connection is scheduled once when accepted. Frames do not touch the wheel: they only
//! store the current second in the connection ([`ConnShared::touch`]). When a slot comes
//! due, each connection in it is checked: if its deadline (login timeout before LOGIN,
//! idle timeout after) has passed it is closed, otherwise it is put back at its deadline.
//! So the cost is one wheel entry (a weak pointer) per connection and a few checks per
//! idle timeout, whatever the frame rate.

use std::sync::{Arc, Mutex, PoisonError, Weak};
use std::time::{Duration, Instant};

use tether_schemas::ErrorCode;

#[cfg(test)]
use crate::conn::Identity;
use crate::conn::{CloseReason, ConnShared};
use crate::shutdown::Shutdown;

const SLOTS: u32 = 1024;

/// Seconds since the gateway started: the clock of activity stamps and deadlines.
#[derive(Debug, Clone, Copy)]
pub struct Clock {
    epoch: Instant,
}

impl Default for Clock {
    fn default() -> Self {
        Self {
            epoch: Instant::now(),
        }
    }
}

impl Clock {
    /// The current second.
    pub fn now(&self) -> u32 {
        u32::try_from(self.epoch.elapsed().as_secs()).unwrap_or(u32::MAX)
    }

    /// The current millisecond.
    pub fn now_ms(&self) -> u64 {
        u64::try_from(self.epoch.elapsed().as_millis()).unwrap_or(u64::MAX)
    }
}

/// The wheel and its timeouts.
pub struct Timers {
    clock: Clock,
    login_timeout: u32,
    idle_timeout: u32,
    wheel: Mutex<Wheel>,
}

struct Wheel {
    slots: Vec<Vec<Weak<ConnShared>>>,
    /// The next second to process.
    next: u32,
}

impl Timers {
    /// A wheel with the given timeouts (seconds).
    pub fn new(clock: Clock, login_timeout: u64, idle_timeout: u64) -> Self {
        let secs = |s: u64| u32::try_from(s).unwrap_or(u32::MAX).max(1);
        Self {
            clock,
            login_timeout: secs(login_timeout),
            idle_timeout: secs(idle_timeout),
            wheel: Mutex::new(Wheel {
                slots: (0..SLOTS).map(|_| Vec::new()).collect(),
                next: clock.now(),
            }),
        }
    }

    /// Schedules a newly accepted connection.
    pub fn track(&self, conn: &Arc<ConnShared>) {
        let deadline = conn.accepted_at.saturating_add(self.login_timeout);
        let mut wheel = self.wheel.lock().unwrap_or_else(PoisonError::into_inner);
        wheel.insert(Arc::downgrade(conn), deadline);
    }

    /// Every connection still alive (logged in or not), e.g. for a hand-off.
    pub fn all(&self) -> Vec<Arc<ConnShared>> {
        let wheel = self.wheel.lock().unwrap_or_else(PoisonError::into_inner);
        wheel
            .slots
            .iter()
            .flatten()
            .filter_map(Weak::upgrade)
            .collect()
    }

    /// The deadline of a connection and the reason it closes then.
    fn deadline(&self, conn: &ConnShared) -> (u32, ErrorCode) {
        if conn.identity().is_some() {
            (
                conn.last_seen().saturating_add(self.idle_timeout),
                ErrorCode::HeartbeatTimeout,
            )
        } else {
            (
                conn.accepted_at.saturating_add(self.login_timeout),
                ErrorCode::LoginTimeout,
            )
        }
    }

    /// Processes every due slot; returns how many connections were closed.
    pub fn tick(&self) -> usize {
        self.tick_at(self.clock.now())
    }

    fn tick_at(&self, now: u32) -> usize {
        let mut closed = 0;
        loop {
            let (second, due) = {
                let mut wheel = self.wheel.lock().unwrap_or_else(PoisonError::into_inner);
                if wheel.next > now {
                    break;
                }
                let second = wheel.next;
                wheel.next += 1;
                (
                    second,
                    std::mem::take(&mut wheel.slots[(second % SLOTS) as usize]),
                )
            };
            let mut later = Vec::new();
            for weak in due {
                let Some(conn) = weak.upgrade() else { continue };
                if conn.is_closing() {
                    continue;
                }
                let (deadline, code) = self.deadline(&conn);
                if deadline <= second {
                    let text = match code {
                        ErrorCode::LoginTimeout => "no login in time",
                        _ => "no frame within the idle timeout",
                    };
                    conn.close(CloseReason::error(code, text));
                    closed += 1;
                } else {
                    later.push((weak, deadline));
                }
            }
            if !later.is_empty() {
                let mut wheel = self.wheel.lock().unwrap_or_else(PoisonError::into_inner);
                for (weak, deadline) in later {
                    wheel.insert(weak, deadline);
                }
            }
        }
        closed
    }

    /// Ticks every second until shutdown.
    pub async fn run(self: Arc<Self>, shutdown: Shutdown) {
        let mut interval = tokio::time::interval(Duration::from_secs(1));
        interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = interval.tick() => {
                    let closed = self.tick();
                    if closed > 0 {
                        tracing::debug!(closed, "timed out connections");
                    }
                }
                _ = shutdown.cancelled() => return,
            }
        }
    }
}

impl Wheel {
    fn insert(&mut self, conn: Weak<ConnShared>, deadline: u32) {
        // Never schedule into the past, nor further than one turn of the wheel: an entry
        // further out is checked once per turn and put back.
        let at = deadline.clamp(self.next, self.next + SLOTS - 1);
        self.slots[(at % SLOTS) as usize].push(conn);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn login_then_idle_deadlines() {
        let timers = Timers::new(Clock::default(), 2, 3);
        let silent = Arc::new(ConnShared::new(1, 0));
        let active = Arc::new(ConnShared::new(2, 0));
        timers.track(&silent);
        timers.track(&active);
        assert_eq!(timers.tick_at(1), 0);
        active.set_identity(Identity::new(
            Arc::new(crate::app_traffic::AppCounters::new("a".into())),
            "u",
            "d",
            true,
            tether_auth::Rights::default(),
            crate::conn::Transport::Tcp,
        ));
        active.touch(1);
        assert_eq!(
            timers.tick_at(2),
            1,
            "the connection without login times out at 2 s"
        );
        assert!(silent.is_closing());
        assert!(
            !active.is_closing(),
            "logged in at 1 s, idle deadline is 4 s"
        );
        assert_eq!(timers.tick_at(3), 0);
        assert_eq!(timers.tick_at(4), 1);
        assert_eq!(
            active.take().1.map(|r| r.code),
            Some(ErrorCode::HeartbeatTimeout)
        );
    }

    #[test]
    fn deadlines_beyond_one_turn_are_rechecked() {
        let timers = Timers::new(Clock::default(), 5000, 5000);
        let conn = Arc::new(ConnShared::new(1, 0));
        timers.track(&conn);
        assert_eq!(timers.tick_at(4999), 0);
        assert_eq!(timers.tick_at(5000), 1);
    }
}
