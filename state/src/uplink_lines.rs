//! Per-device order of uplinks with several in flight (a pipeline per device).
//!
//! Up to `depth` uplinks of one device are processed at once; the rest wait in the
//! device's queue. Two chains keep the device's order while they run concurrently:
//! - *ask*: an uplink sends its business request only after the previous uplink of the
//!   device has sent its own (first attempt), so requests leave in stream order;
//! - *settle*: an uplink is acknowledged to JetStream and its UP_ACK handed to the
//!   partition only after the previous one was, so receipts go out in stream order.
//!
//! Each link of a chain is a oneshot: sending or dropping it releases the next uplink, so
//! an uplink that ends early (refused, or its task gone) never blocks the device.

use std::collections::hash_map::Entry;
use std::collections::{HashMap, VecDeque};

use async_nats::jetstream::{AckKind, Message};
use tokio::sync::oneshot;
use tokio::time::Instant;

use crate::uplink::{DeviceKey, KEEP_ALIVE, device_of};

/// One uplink's place in its device's order (see the module documentation).
#[derive(Debug)]
pub struct Turn {
    ask_after: Option<oneshot::Receiver<()>>,
    asked: Option<oneshot::Sender<()>>,
    settle_after: Option<oneshot::Receiver<()>>,
    settled: Option<oneshot::Sender<()>>,
}

impl Turn {
    /// Waits until the device's previous uplink has sent its business request (or will
    /// send none).
    pub async fn wait_to_ask(&mut self) {
        if let Some(before) = self.ask_after.take() {
            let _ = before.await;
        }
    }

    /// This uplink's request is sent (or it sends none): the next one may send its own.
    /// Waits for the previous one first, so the order holds across uplinks that send none.
    pub async fn pass_ask(&mut self) {
        self.wait_to_ask().await;
        self.asked.take();
    }

    /// Waits until the device's previous uplink is settled (acknowledged, UP_ACK handed on).
    pub async fn wait_to_settle(&mut self) {
        self.pass_ask().await;
        if let Some(before) = self.settle_after.take() {
            let _ = before.await;
        }
    }

    /// This uplink is settled: the next one may settle (dropping the turn does the same).
    pub fn settled(mut self) {
        if let Some(next) = self.settled.take() {
            let _ = next.send(());
        }
    }
}

/// The uplinks of one device being processed or waiting.
#[derive(Default)]
struct Line {
    in_flight: usize,
    /// The last started uplink's links: the next one started waits on them.
    ask_tail: Option<oneshot::Receiver<()>>,
    settle_tail: Option<oneshot::Receiver<()>>,
    queue: VecDeque<(Message, Instant)>,
}

impl Line {
    fn start(&mut self, message: Message) -> (Message, Turn) {
        let (asked, ask_next) = oneshot::channel();
        let (settled, settle_next) = oneshot::channel();
        let turn = Turn {
            ask_after: self.ask_tail.replace(ask_next),
            asked: Some(asked),
            settle_after: self.settle_tail.replace(settle_next),
            settled: Some(settled),
        };
        self.in_flight += 1;
        (message, turn)
    }
}

/// The devices' lines of one partition.
pub struct DeviceLines {
    depth: usize,
    in_flight: usize,
    lines: HashMap<DeviceKey, Line>,
}

impl DeviceLines {
    /// Lines letting at most `depth` (≥ 1) uplinks of one device run at once.
    pub fn new(depth: usize) -> Self {
        DeviceLines {
            depth: depth.max(1),
            in_flight: 0,
            lines: HashMap::new(),
        }
    }

    /// Uplinks being processed (all devices).
    pub fn in_flight(&self) -> usize {
        self.in_flight
    }

    /// The message to start now with its turn, or `None` when its device has `depth`
    /// uplinks in flight already (it waits in the device's queue).
    pub fn admit(&mut self, message: Message) -> Option<(Message, Turn)> {
        let line = match self.lines.entry(device_of(&message)) {
            Entry::Occupied(line) => line.into_mut(),
            Entry::Vacant(slot) => slot.insert(Line::default()),
        };
        if line.in_flight >= self.depth || !line.queue.is_empty() {
            line.queue.push_back((message, Instant::now()));
            return None;
        }
        self.in_flight += 1;
        Some(line.start(message))
    }

    /// One uplink of `device` finished: the device's next queued one to start, if any.
    pub fn finished(&mut self, device: &DeviceKey) -> Option<(Message, Turn)> {
        let line = self.lines.get_mut(device)?;
        line.in_flight = line.in_flight.saturating_sub(1);
        self.in_flight = self.in_flight.saturating_sub(1);
        match line.queue.pop_front() {
            Some((message, _)) => {
                self.in_flight += 1;
                Some(line.start(message))
            }
            None => {
                if line.in_flight == 0 {
                    self.lines.remove(device);
                }
                None
            }
        }
    }

    /// Tells JetStream that queued uplinks are still being handled (so they are not
    /// redelivered while they wait their turn).
    pub async fn keep_alive(&mut self) {
        let now = Instant::now();
        for line in self.lines.values_mut() {
            for (message, since) in line.queue.iter_mut() {
                if now.duration_since(*since) >= KEEP_ALIVE {
                    let _ = message.ack_with(AckKind::Progress).await;
                    *since = now;
                }
            }
        }
    }

    /// Gives every queued uplink back to JetStream (redelivered at once, in order).
    pub async fn release(&mut self) {
        for (_, line) in self.lines.drain() {
            for (message, _) in line.queue {
                let _ = message.ack_with(AckKind::Nak(None)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn chained(n: usize) -> Vec<Turn> {
        let mut line = Line::default();
        let mut turns = Vec::new();
        for _ in 0..n {
            let (asked, ask_next) = oneshot::channel();
            let (settled, settle_next) = oneshot::channel();
            turns.push(Turn {
                ask_after: line.ask_tail.replace(ask_next),
                asked: Some(asked),
                settle_after: line.settle_tail.replace(settle_next),
                settled: Some(settled),
            });
        }
        turns
    }

    /// Waits for every task, then returns the indexes they sent, in the order sent.
    async fn finish(
        tasks: Vec<tokio::task::JoinHandle<()>>,
        rx: &mut tokio::sync::mpsc::UnboundedReceiver<usize>,
    ) -> Vec<usize> {
        for task in tasks {
            task.await.expect("task");
        }
        let mut order = Vec::new();
        while let Some(i) = rx.recv().await {
            order.push(i);
        }
        order
    }

    #[tokio::test]
    async fn turns_settle_in_order_whatever_order_they_finish_in() {
        let turns = chained(20);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for (i, mut turn) in turns.into_iter().enumerate() {
            let tx = tx.clone();
            tasks.push(tokio::spawn(async move {
                // Later ones finish their work first.
                tokio::time::sleep(Duration::from_millis((20 - i as u64) * 2)).await;
                turn.wait_to_settle().await;
                let _ = tx.send(i);
            }));
        }
        drop(tx);
        let order = finish(tasks, &mut rx).await;
        assert_eq!(order, (0..20).collect::<Vec<_>>());
    }

    #[tokio::test]
    async fn a_turn_dropped_early_releases_its_successors() {
        let mut turns = chained(3);
        let mut third = turns.pop().expect("third");
        let second = turns.pop().expect("second");
        let mut first = turns.pop().expect("first");
        drop(second);
        first.wait_to_settle().await;
        drop(first);
        tokio::time::timeout(Duration::from_secs(5), third.wait_to_settle())
            .await
            .expect("the third is released");
    }

    #[tokio::test]
    async fn asks_leave_in_order() {
        let turns = chained(10);
        let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel();
        let mut tasks = Vec::new();
        for (i, mut turn) in turns.into_iter().enumerate().rev() {
            let tx = tx.clone();
            tasks.push(tokio::spawn(async move {
                turn.wait_to_ask().await;
                let _ = tx.send(i);
                turn.pass_ask().await;
                turn.wait_to_settle().await;
            }));
        }
        drop(tx);
        let order = finish(tasks, &mut rx).await;
        assert_eq!(order, (0..10).collect::<Vec<_>>());
    }
}
