//! Logins waiting for state's registration.
//!
//! A device may be told LOGIN_ACK only when a push sent after it reaches the device: state
//! must have written its route, user index and token sessions. So after `conn.up` is
//! stored, the login waits here until state's `registered` control message arrives (on
//! `tether.gw.<gw>.ctl`, read in order with the downlinks of `tether.gw.<gw>.down`). The
//! control handler queues LOGIN_ACK itself, before any downlink state sends afterwards
//! (the replay of unacknowledged messages), and wakes the login. Downlinks for a connection
//! still waiting are not delivered (QoS1 ones are resent after LOGIN_ACK).

use std::collections::HashMap;
use std::sync::{Mutex, PoisonError};

use tokio::sync::oneshot;

/// Connections waiting for their registration, by connection id.
#[derive(Debug, Default)]
pub struct PendingLogins {
    waiting: Mutex<HashMap<u64, oneshot::Sender<u64>>>,
}

impl PendingLogins {
    /// Starts waiting for connection `conn`'s registration.
    pub fn wait(&self, conn: u64) -> oneshot::Receiver<u64> {
        let (tx, rx) = oneshot::channel();
        self.lock().insert(conn, tx);
        rx
    }

    /// Ends the wait of `conn` with `last_acked_seq`: true when it was waiting (the
    /// caller queued its LOGIN_ACK first).
    pub fn complete(&self, conn: u64, last_acked_seq: u64) -> bool {
        match self.lock().remove(&conn) {
            Some(tx) => {
                let _ = tx.send(last_acked_seq);
                true
            }
            None => false,
        }
    }

    /// Gives up waiting for `conn`; false when its registration arrived first.
    pub fn cancel(&self, conn: u64) -> bool {
        self.lock().remove(&conn).is_some()
    }

    /// Whether `conn` still waits (its downlinks are held back).
    pub fn is_waiting(&self, conn: u64) -> bool {
        let waiting = self.lock();
        !waiting.is_empty() && waiting.contains_key(&conn)
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, oneshot::Sender<u64>>> {
        self.waiting.lock().unwrap_or_else(PoisonError::into_inner)
    }
}
