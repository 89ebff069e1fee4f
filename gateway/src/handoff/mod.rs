//! Restart by hand-off: a new gateway process takes the listening sockets and every plain
//! TCP and WebSocket client socket of the running one, with each connection's state, over
//! a unix socket; clients see no disconnect (docs/handoff.md).
//!
//! - [`wire`]: the unix socket framing and `SCM_RIGHTS` descriptor passing.
//! - [`messages`]: the protocol's messages and a connection's serialized state.
//! - [`gate`]: downlinks during the hand-off, neither lost nor delivered twice.
//! - [`old`]: the serving process's side (offer, prepare, commit or abort).
//! - [`new`]: the taking-over process's side.
//! - [`tail`]: the old process after the commit: its TLS connections are redirected.

pub mod gate;
pub mod messages;
pub mod new;
pub mod old;
pub mod tail;
pub mod wire;

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::{Mutex, MutexGuard, PoisonError};

use tokio::sync::watch;

use crate::conn::driver::Parked;
use crate::shutdown::Shutdown;
use messages::ListenerKind;

/// Why a hand-off did not happen.
#[derive(Debug, thiserror::Error)]
pub enum HandoffError {
    /// The socket or its messages failed.
    #[error(transparent)]
    Wire(#[from] wire::WireError),
    /// The other process did not take its next step in time.
    #[error("hand-off timed out waiting for {0}")]
    Timeout(&'static str),
    /// The other process answered out of turn.
    #[error("hand-off protocol: expected {expected}, got {got}")]
    Unexpected {
        /// What was expected.
        expected: &'static str,
        /// What came.
        got: String,
    },
    /// The new process refused (its reason, e.g. the descriptor limit).
    #[error("takeover refused: {0}")]
    Refused(String),
    /// The other process aborted.
    #[error("the other process aborted the hand-off: {0}")]
    Aborted(String),
    /// A local failure (a socket that cannot be adopted, a bound passed).
    #[error("hand-off failed: {0}")]
    Local(String),
}

/// Parked connections, while a commit collects them (`open`).
#[derive(Default)]
struct Lot {
    open: bool,
    parked: HashMap<u64, Parked>,
}

/// A gateway's hand-off state: the downlink gate, the parked connections, the accept
/// pause and the listening sockets it could hand over.
pub struct Handoff {
    /// Every downlink message passes this gate.
    pub gate: gate::Gate,
    lot: Mutex<Lot>,
    accept_paused: watch::Sender<bool>,
    listeners: Mutex<Vec<(ListenerKind, RawFd)>>,
    /// Fires once this process handed everything over (it then stops without goodbyes).
    pub handed_over: Shutdown,
}

impl Handoff {
    /// The state of a gateway; `taking_over`: it holds downlinks and does not accept until
    /// the hand-off it is receiving commits.
    pub fn new(taking_over: bool) -> Self {
        Self {
            gate: if taking_over {
                gate::Gate::holding()
            } else {
                gate::Gate::open()
            },
            lot: Mutex::default(),
            accept_paused: watch::Sender::new(taking_over),
            listeners: Mutex::default(),
            handed_over: Shutdown::new(),
        }
    }

    fn lot(&self) -> MutexGuard<'_, Lot> {
        self.lot.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Starts collecting parked connections (a commit).
    pub fn open_lot(&self) {
        self.lot().open = true;
    }

    /// A connection task stopped for the hand-off and left its state here; after an abort
    /// (the lot is closed) it carries on at once.
    pub fn park(&self, parked: Parked) {
        let mut lot = self.lot();
        if lot.open {
            lot.parked.insert(parked.id(), parked);
        } else {
            drop(lot);
            parked.resume();
        }
    }

    /// How many connections are parked.
    pub fn parked_count(&self) -> usize {
        self.lot().parked.len()
    }

    /// Exports the state of every parked connection.
    pub fn export_parked(&self) -> Vec<messages::MovedConn> {
        self.lot().parked.values().map(Parked::export).collect()
    }

    /// Closes the lot and takes every parked connection out (to resume them, or to drop
    /// them after `Go`).
    pub fn take_parked(&self) -> HashMap<u64, Parked> {
        let mut lot = self.lot();
        lot.open = false;
        std::mem::take(&mut lot.parked)
    }

    /// Stops or restarts the accept loops.
    pub fn pause_accepting(&self, paused: bool) {
        self.accept_paused.send_replace(paused);
    }

    /// Follows the accept pause.
    pub fn accept_paused(&self) -> watch::Receiver<bool> {
        self.accept_paused.subscribe()
    }

    /// Records a listening socket this process could hand over.
    pub fn add_listener(&self, kind: ListenerKind, fd: RawFd) {
        self.listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push((kind, fd));
    }

    /// The listening sockets this process could hand over.
    pub fn listeners(&self) -> Vec<(ListenerKind, RawFd)> {
        self.listeners
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }
}

/// Raises this process's descriptor limit to its hard limit; returns the soft limit now.
pub fn raise_fd_limit() -> u64 {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    match getrlimit(Resource::RLIMIT_NOFILE) {
        Ok((soft, hard)) => {
            if soft < hard && setrlimit(Resource::RLIMIT_NOFILE, hard, hard).is_ok() {
                hard
            } else {
                soft
            }
        }
        Err(_) => 1024,
    }
}

/// Descriptors this process has open now.
pub fn open_fds() -> u64 {
    std::fs::read_dir("/proc/self/fd")
        .map(|dir| dir.count() as u64)
        .unwrap_or(0)
}
