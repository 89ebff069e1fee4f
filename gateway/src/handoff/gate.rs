//! The downlink gate: how downlinks published during a hand-off are neither lost nor
//! delivered twice.
//!
//! Both processes subscribe to the gateway's subjects during the hand-off, so both receive
//! every message published after the new one subscribed. The old process records a digest
//! of each message it delivers from the moment it offers its sockets (`Recording`), and
//! from commit on stops delivering and buffers instead (`Frozen`: on abort it delivers the
//! buffer and carries on). The new process holds everything it receives (`Holding`) until
//! `Go`; then it drops the held messages whose digests the old one delivered (counted, so
//! two equal messages are two) and delivers the rest in arrival order before going live.
//!
//! A message published just before the new process subscribed reaches only the old one,
//! and may still be on its way (socket, client buffer) when the old one would freeze. So
//! before freezing, the old process publishes a marker on its own control subject and
//! keeps delivering until the marker has come through its gate: everything published
//! before the new process subscribed came before the marker, and is delivered (and
//! recorded) by the old process.
//!
//! After `Go` the old process keeps the messages buffered since the commit until the moved
//! connections have left its registry, then delivers them and everything after them to the
//! connections that stayed (TLS, redirected to the successor: `Tail`). The new process
//! delivers only to its own connections, so each message reaches a device through exactly
//! one of the two; control messages there concern only the connections still here and are
//! never answered (the successor answers).

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, PoisonError};

use async_nats::Message;

use crate::context::GatewayCtx;

/// At most this many messages are held or recorded; beyond it the hand-off aborts rather
/// than grow without bound.
pub const MAX_HELD: usize = 2_000_000;

#[derive(Default)]
enum Mode {
    /// Deliver (the normal case).
    #[default]
    Open,
    /// Old process during a hand-off: deliver and record digests.
    Recording(Vec<u64>),
    /// Old process after commit: the recorded digests are final, messages are buffered.
    Frozen(Vec<Message>),
    /// New process before `Go`: hold everything.
    Holding(Vec<Message>),
    /// Old process after `Go`: deliver to the connections that stayed.
    Tail,
}

/// The gate every downlink message passes.
#[derive(Default)]
pub struct Gate {
    /// Fast path: true while the mode is `Open`.
    open: AtomicBool,
    mode: Mutex<Mode>,
    /// Set when a bound was passed (the hand-off must abort).
    overflowed: AtomicBool,
    /// Old process: the marker payload it waits for, and who waits.
    marker: Mutex<Option<(bytes::Bytes, tokio::sync::oneshot::Sender<()>)>>,
}

impl Gate {
    /// An open gate.
    pub fn open() -> Self {
        Self {
            open: AtomicBool::new(true),
            mode: Mutex::new(Mode::Open),
            overflowed: AtomicBool::new(false),
            marker: Mutex::default(),
        }
    }

    /// A gate holding everything (a process taking over).
    pub fn holding() -> Self {
        Self {
            open: AtomicBool::new(false),
            mode: Mutex::new(Mode::Holding(Vec::new())),
            overflowed: AtomicBool::new(false),
            marker: Mutex::default(),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Mode> {
        self.mode.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Delivers, records, buffers or holds `message`.
    pub fn offer(&self, ctx: &Arc<GatewayCtx>, message: Message) {
        if self.open.load(Ordering::Acquire) {
            crate::downlink::deliver(ctx, &message);
            return;
        }
        let mut mode = self.lock();
        match &mut *mode {
            Mode::Open => crate::downlink::deliver(ctx, &message),
            Mode::Recording(recorded) => {
                if recorded.len() >= MAX_HELD {
                    self.overflowed.store(true, Ordering::Release);
                } else {
                    recorded.push(digest(&message));
                }
                // Under the lock: a message is recorded if and only if it was delivered
                // before the freeze.
                crate::downlink::deliver(ctx, &message);
                self.note_marker(&message);
            }
            Mode::Tail => crate::downlink::deliver_tail(ctx, &message),
            Mode::Frozen(buffered) | Mode::Holding(buffered) => {
                if buffered.len() >= MAX_HELD {
                    self.overflowed.store(true, Ordering::Release);
                    crate::downlink::deliver(ctx, &message);
                } else {
                    buffered.push(message);
                }
            }
        }
    }

    /// Old process: start recording what is delivered.
    pub fn record(&self) {
        let mut mode = self.lock();
        *mode = Mode::Recording(Vec::new());
        self.open.store(false, Ordering::Release);
    }

    /// Old process: `payload` is about to be published on this gateway's control subject
    /// (after the new process subscribed); the receiver fires once it came through the
    /// gate while recording.
    pub fn expect_marker(&self, payload: bytes::Bytes) -> tokio::sync::oneshot::Receiver<()> {
        let (tx, rx) = tokio::sync::oneshot::channel();
        *self.marker.lock().unwrap_or_else(PoisonError::into_inner) = Some((payload, tx));
        rx
    }

    fn note_marker(&self, message: &Message) {
        let mut marker = self.marker.lock().unwrap_or_else(PoisonError::into_inner);
        if marker
            .as_ref()
            .is_some_and(|(payload, _)| *payload == message.payload)
            && let Some((_, waiting)) = marker.take()
        {
            let _ = waiting.send(());
        }
    }

    /// Old process: stop delivering; returns the digests of what was delivered meanwhile.
    pub fn freeze(&self) -> Vec<u64> {
        let mut mode = self.lock();
        let recorded = match std::mem::take(&mut *mode) {
            Mode::Recording(recorded) => recorded,
            _ => Vec::new(),
        };
        *mode = Mode::Frozen(Vec::new());
        recorded
    }

    /// Whether a bound was passed during this hand-off.
    pub fn overflowed(&self) -> bool {
        self.overflowed.load(Ordering::Acquire)
    }

    /// Opens the gate: delivers (in order) what was buffered or held, except the messages
    /// whose digests are in `handled` (one per occurrence); returns how many were dropped.
    pub fn release(&self, ctx: &Arc<GatewayCtx>, handled: &[u64]) -> usize {
        let mut counts: HashMap<u64, usize> = HashMap::with_capacity(handled.len());
        for digest in handled {
            *counts.entry(*digest).or_default() += 1;
        }
        let mut mode = self.lock();
        let pending = match std::mem::take(&mut *mode) {
            Mode::Frozen(buffered) | Mode::Holding(buffered) => buffered,
            Mode::Open | Mode::Recording(_) | Mode::Tail => Vec::new(),
        };
        let mut dropped = 0;
        for message in pending {
            if let Some(count) = counts.get_mut(&digest(&message)).filter(|c| **c > 0) {
                *count -= 1;
                dropped += 1;
                continue;
            }
            crate::downlink::deliver(ctx, &message);
        }
        // Still under the lock: nothing overtakes what was released.
        self.open.store(true, Ordering::Release);
        self.overflowed.store(false, Ordering::Release);
        dropped
    }

    /// Old process after `Go`, once the moved connections left its registry: delivers
    /// what was buffered since the commit, then everything that comes, to the connections
    /// still here (the successor delivers to the moved ones).
    pub fn tail(&self, ctx: &Arc<GatewayCtx>) {
        let mut mode = self.lock();
        if let Mode::Frozen(buffered) = std::mem::replace(&mut *mode, Mode::Tail) {
            // Under the lock: nothing overtakes what was buffered.
            for message in &buffered {
                crate::downlink::deliver_tail(ctx, message);
            }
        }
        self.overflowed.store(false, Ordering::Release);
    }
}

/// A stable digest of a message (subject, reply, headers in sorted order, payload): FNV-1a,
/// the same in every build, so two versions of the gateway agree.
pub fn digest(message: &Message) -> u64 {
    let mut hash = Fnv::default();
    hash.write(message.subject.as_bytes());
    hash.write(&[0]);
    if let Some(reply) = &message.reply {
        hash.write(reply.as_bytes());
    }
    hash.write(&[0]);
    if let Some(headers) = &message.headers {
        let mut pairs: Vec<(String, String)> = headers
            .iter()
            .flat_map(|(name, values)| {
                values
                    .iter()
                    .map(move |value| (name.to_string(), value.to_string()))
            })
            .collect();
        pairs.sort();
        for (name, value) in pairs {
            hash.write(name.as_bytes());
            hash.write(&[1]);
            hash.write(value.as_bytes());
            hash.write(&[2]);
        }
    }
    hash.write(&[0]);
    hash.write(&message.payload);
    hash.0
}

struct Fnv(u64);

impl Default for Fnv {
    fn default() -> Self {
        Fnv(0xcbf2_9ce4_8422_2325)
    }
}

impl Fnv {
    fn write(&mut self, bytes: &[u8]) {
        for byte in bytes {
            self.0 ^= u64::from(*byte);
            self.0 = self.0.wrapping_mul(0x0100_0000_01b3);
        }
    }
}
