//! QoS1 downlink ordering (PROTOCOL.md §6.4): keeps `H`, the highest contiguous seq
//! delivered, drops duplicates, holds early arrivals until the gap before them fills,
//! and says what the cumulative DOWN_ACK should carry.

use std::collections::BTreeMap;

/// Orders QoS1 messages of type `T` by their per-device seq.
#[derive(Debug)]
pub struct Inbox<T> {
    /// `H`: every seq up to this one was delivered (or acknowledged before we started).
    delivered: u64,
    /// Messages above `H + 1`, waiting for the gap to fill.
    early: BTreeMap<u64, T>,
    /// Most early messages kept; beyond that the highest are dropped (they are resent).
    max_early: usize,
    /// A QoS1 message arrived since the last ack was taken.
    ack_due: bool,
}

/// What happened to one offered message.
#[derive(Debug, PartialEq, Eq)]
pub enum Offer<T> {
    /// Deliver these, in this order (the offered one, then any it unblocked).
    Deliver(Vec<T>),
    /// Already delivered: dropped (still acknowledged, so the server stops resending).
    Duplicate,
    /// Held until the messages before it arrive.
    Held,
    /// Too far ahead with the hold buffer full: dropped, it will be resent.
    Dropped,
}

impl<T> Inbox<T> {
    /// An inbox that has delivered everything up to `resume_seq`.
    pub fn new(resume_seq: u64, max_early: usize) -> Self {
        Self {
            delivered: resume_seq,
            early: BTreeMap::new(),
            max_early,
            ack_due: false,
        }
    }

    /// `H`, the highest contiguous seq delivered: LOGIN `resume_seq`, DOWN_ACK `seq`.
    pub fn delivered(&self) -> u64 {
        self.delivered
    }

    /// How many messages are held for a gap.
    pub fn held(&self) -> usize {
        self.early.len()
    }

    /// The server says everything up to `seq` was acknowledged (LOGIN_ACK
    /// `last_acked_seq`): nothing at or below it will come again, so move `H` there.
    pub fn acked_by_server(&mut self, seq: u64) {
        if seq > self.delivered {
            self.delivered = seq;
            self.early = self.early.split_off(&(seq + 1));
        }
    }

    /// Offers QoS1 message `seq`.
    pub fn offer(&mut self, seq: u64, message: T) -> Offer<T> {
        self.ack_due = true;
        if seq <= self.delivered {
            return Offer::Duplicate;
        }
        if seq > self.delivered + 1 {
            if self.early.contains_key(&seq) {
                return Offer::Duplicate;
            }
            if self.early.len() >= self.max_early
                && self
                    .early
                    .last_key_value()
                    .is_none_or(|(&last, _)| seq > last)
            {
                return Offer::Dropped;
            }
            self.early.insert(seq, message);
            if self.early.len() > self.max_early {
                self.early.pop_last();
            }
            return Offer::Held;
        }
        let mut ready = vec![message];
        self.delivered = seq;
        while let Some(next) = self.early.remove(&(self.delivered + 1)) {
            ready.push(next);
            self.delivered += 1;
        }
        Offer::Deliver(ready)
    }

    /// The seq to acknowledge if a DOWN_ACK is due (a QoS1 message arrived since the last
    /// call and something was delivered at all), clearing the due flag.
    pub fn take_ack(&mut self) -> Option<u64> {
        let due = std::mem::take(&mut self.ack_due);
        (due && self.delivered > 0).then_some(self.delivered)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seqs(offer: Offer<u64>) -> Vec<u64> {
        match offer {
            Offer::Deliver(v) => v,
            _ => Vec::new(),
        }
    }

    #[test]
    fn in_order_delivery_and_cumulative_ack() {
        let mut inbox = Inbox::new(0, 8);
        assert_eq!(inbox.take_ack(), None);
        assert_eq!(seqs(inbox.offer(1, 1)), [1]);
        assert_eq!(seqs(inbox.offer(2, 2)), [2]);
        assert_eq!(inbox.take_ack(), Some(2));
        assert_eq!(inbox.take_ack(), None, "ack only once per burst");
    }

    #[test]
    fn duplicates_are_dropped_but_acked() {
        let mut inbox = Inbox::new(0, 8);
        assert_eq!(seqs(inbox.offer(1, 1)), [1]);
        assert_eq!(inbox.take_ack(), Some(1));
        assert_eq!(inbox.offer(1, 1), Offer::Duplicate);
        assert_eq!(
            inbox.take_ack(),
            Some(1),
            "a resent duplicate is acknowledged again"
        );
        assert_eq!(inbox.offer(3, 3), Offer::Held);
        assert_eq!(
            inbox.offer(3, 3),
            Offer::Duplicate,
            "a held message is not held twice"
        );
    }

    #[test]
    fn gaps_are_held_and_released_in_order() {
        let mut inbox = Inbox::new(0, 8);
        assert_eq!(inbox.offer(3, 3), Offer::Held);
        assert_eq!(inbox.offer(2, 2), Offer::Held);
        assert_eq!(
            inbox.take_ack(),
            None,
            "nothing contiguous yet: no ack covers the gap"
        );
        assert_eq!(seqs(inbox.offer(1, 1)), [1, 2, 3]);
        assert_eq!(inbox.delivered(), 3);
        assert_eq!(inbox.held(), 0);
        assert_eq!(inbox.offer(5, 5), Offer::Held);
        assert_eq!(inbox.take_ack(), Some(3), "ack stops below the gap");
    }

    #[test]
    fn resume_point_counts_as_delivered() {
        let mut inbox = Inbox::new(41, 8);
        assert_eq!(inbox.offer(41, 41), Offer::Duplicate);
        assert_eq!(seqs(inbox.offer(42, 42)), [42]);
    }

    #[test]
    fn server_ack_moves_the_resume_point() {
        let mut inbox = Inbox::new(0, 8);
        assert_eq!(inbox.offer(12, 12), Offer::Held);
        assert_eq!(inbox.offer(9, 9), Offer::Held);
        inbox.acked_by_server(10);
        assert_eq!(inbox.held(), 1);
        assert_eq!(seqs(inbox.offer(11, 11)), [11, 12]);
        inbox.acked_by_server(5);
        assert_eq!(
            inbox.delivered(),
            12,
            "an older server ack never moves H back"
        );
    }

    #[test]
    fn hold_buffer_is_bounded_keeping_the_lowest() {
        let mut inbox = Inbox::new(0, 2);
        assert_eq!(inbox.offer(5, 5), Offer::Held);
        assert_eq!(inbox.offer(4, 4), Offer::Held);
        assert_eq!(inbox.offer(9, 9), Offer::Dropped);
        assert_eq!(
            inbox.offer(3, 3),
            Offer::Held,
            "a lower one evicts the highest"
        );
        assert_eq!(inbox.held(), 2);
        assert_eq!(inbox.offer(2, 2), Offer::Held);
        assert_eq!(
            seqs(inbox.offer(1, 1)),
            [1, 2, 3],
            "4 and 5 were evicted: they come again"
        );
        assert_eq!(seqs(inbox.offer(4, 4)), [4]);
    }
}
