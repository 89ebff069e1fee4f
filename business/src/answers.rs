//! The first answer to each uplink, kept for repeats of the same `(did, msg_id)`.
//!
//! State asks again when an answer did not reach it (a NATS node restarting drops
//! replies in flight) and after a device resends a UP whose first answer was a timeout.
//! Calling the handler again would hand the app the same message twice. So within one
//! [`crate::Business::serve_uplinks`] loop, a repeat that arrives while the handler runs
//! waits for that run's answer, and a repeat of a stored message within [`WINDOW`] gets
//! the stored answer without calling the handler. Error answers are not kept: a resend
//! after a refusal (`unavailable`, `busy`) is a new try. Other instances of the service
//! (another process in the queue group) do not share this memory: the app's store must
//! still be idempotent by `(app, did, msg_id)`.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use bytes::Bytes;
use tokio::sync::watch;
use tokio::time::Instant;

/// How long a stored answer is kept: the uplink stream's de-duplication window, after
/// which state no longer retries the message.
pub const WINDOW: Duration = Duration::from_secs(120);

/// Stored answers kept at most (the oldest go first beyond it).
pub const CAPACITY: usize = 100_000;

type Key = (String, u64);

enum Slot {
    /// The handler runs; its answer is published here (`None` until then).
    Running(watch::Receiver<Option<Bytes>>),
    /// The stored answer, kept since `at`.
    Done { answer: Bytes, at: Instant },
}

/// First answers by `(did, msg_id)`.
#[derive(Default)]
pub struct Answers {
    inner: Mutex<Inner>,
}

#[derive(Default)]
struct Inner {
    slots: HashMap<Key, Slot>,
    /// Stored answers in the order they were kept, for expiry and the capacity bound.
    kept: VecDeque<(Instant, Key)>,
}

/// What to do with a request.
pub enum Begin {
    /// First of its key: run the handler, then [`Running::finish`].
    Run(Running),
    /// A stored message: answer this.
    Answer(Bytes),
    /// The handler runs for this key now: wait for its answer (`None`: it ended without
    /// one, no answer is sent and state retries).
    Wait(watch::Receiver<Option<Bytes>>),
}

/// A handler run in progress; dropped without [`Running::finish`] (a panic) it frees
/// its key and releases the waiters without an answer.
pub struct Running {
    answers: Arc<Answers>,
    key: Option<Key>,
    sender: watch::Sender<Option<Bytes>>,
}

impl Answers {
    /// Classifies a request for `did`'s `msg_id`.
    pub fn begin(self: &Arc<Self>, did: &str, msg_id: u64) -> Begin {
        let now = Instant::now();
        let key = (did.to_string(), msg_id);
        let mut inner = self.inner.lock().unwrap_or_else(PoisonError::into_inner);
        inner.expire(now);
        match inner.slots.get(&key) {
            Some(Slot::Done { answer, .. }) => return Begin::Answer(answer.clone()),
            Some(Slot::Running(receiver)) => return Begin::Wait(receiver.clone()),
            None => {}
        }
        let (sender, receiver) = watch::channel(None);
        inner.slots.insert(key.clone(), Slot::Running(receiver));
        Begin::Run(Running {
            answers: self.clone(),
            key: Some(key),
            sender,
        })
    }
}

impl Inner {
    fn expire(&mut self, now: Instant) {
        while let Some((at, _)) = self.kept.front() {
            if now.saturating_duration_since(*at) < WINDOW && self.kept.len() <= CAPACITY {
                break;
            }
            let Some((at, key)) = self.kept.pop_front() else {
                break;
            };
            if matches!(self.slots.get(&key), Some(Slot::Done { at: kept, .. }) if *kept == at) {
                self.slots.remove(&key);
            }
        }
    }
}

impl Running {
    /// The handler's answer: sent to the waiters, and kept for repeats when `keep` (the
    /// message was stored).
    pub fn finish(mut self, answer: Bytes, keep: bool) {
        let Some(key) = self.key.take() else {
            return;
        };
        {
            let mut inner = self
                .answers
                .inner
                .lock()
                .unwrap_or_else(PoisonError::into_inner);
            if keep {
                let at = Instant::now();
                inner.kept.push_back((at, key.clone()));
                inner.slots.insert(
                    key,
                    Slot::Done {
                        answer: answer.clone(),
                        at,
                    },
                );
            } else {
                inner.slots.remove(&key);
            }
        }
        self.sender.send_replace(Some(answer));
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if let Some(key) = self.key.take() {
            self.answers
                .inner
                .lock()
                .unwrap_or_else(PoisonError::into_inner)
                .slots
                .remove(&key);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn stored_answers_are_kept_errors_are_not() {
        let answers = Arc::new(Answers::default());
        let Begin::Run(run) = answers.begin("d", 1) else {
            panic!("first request runs");
        };
        let Begin::Wait(mut waiting) = answers.begin("d", 1) else {
            panic!("a repeat while running waits");
        };
        run.finish(Bytes::from_static(b"stored"), true);
        waiting.changed().await.expect("answer published");
        assert_eq!(
            waiting.borrow().clone(),
            Some(Bytes::from_static(b"stored"))
        );
        assert!(matches!(answers.begin("d", 1), Begin::Answer(a) if a == "stored"));

        let Begin::Run(run) = answers.begin("d", 2) else {
            panic!("another id runs");
        };
        run.finish(Bytes::from_static(b"busy"), false);
        assert!(matches!(answers.begin("d", 2), Begin::Run(_)));
    }

    #[tokio::test]
    async fn a_run_that_ends_without_answer_frees_its_key() {
        let answers = Arc::new(Answers::default());
        let run = answers.begin("d", 1);
        let Begin::Wait(mut waiting) = answers.begin("d", 1) else {
            panic!("a repeat while running waits");
        };
        drop(run);
        assert!(waiting.changed().await.is_err(), "waiters are released");
        assert!(matches!(answers.begin("d", 1), Begin::Run(_)));
    }
}
