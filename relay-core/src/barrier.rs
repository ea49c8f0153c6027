//! Per-session causality between a session's SUBSCRIBEs and its later
//! publishes that reach RabbitMQ by another connection.
//!
//! A SUBSCRIBE travels on the session's own broker connection; an
//! application SEND (`/app/...`) is published over AMQP, a different
//! connection, so RabbitMQ may route the SEND (and a backend may answer it)
//! before it has bound the subscription's queue: the session would miss the
//! answer to its own message. The [`SubscribeBarrier`] closes that gap: every
//! SUBSCRIBE carries a receipt (the client's, or one of the gateway's own),
//! and a later publish is held until the receipts of every SUBSCRIBE sent
//! before it have arrived, that is until RabbitMQ has set those
//! subscriptions up. The wait is bounded: after `timeout` a missing receipt
//! no longer holds anything back (the publish goes out as it would have
//! without the barrier).
//!
//! Sans-IO like the session: the time is passed in.

use std::collections::{HashSet, VecDeque};
use std::time::{Duration, Instant};

/// Prefix of the receipts the gateway adds to SUBSCRIBEs that carry none.
pub const OWN_RECEIPT_PREFIX: &str = "stomp-gateway-sub-";

/// What to do with a RECEIPT from the broker.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiptFor {
    /// Not a SUBSCRIBE the barrier waits for: relay it as usual.
    Other,
    /// The client's own receipt on a SUBSCRIBE: relay it to the client.
    ClientSubscribe,
    /// A receipt the gateway asked for: the client never sees it.
    Own,
}

#[derive(Debug)]
struct Outstanding {
    seq: u64,
    receipt: String,
    own: bool,
    sent: Instant,
}

/// Holds items (publishes) until the SUBSCRIBEs sent before them took
/// effect. See the module docs.
#[derive(Debug)]
pub struct SubscribeBarrier<T> {
    timeout: Duration,
    next_seq: u64,
    next_own: u64,
    /// SUBSCRIBEs awaiting their receipt, in the order they were sent.
    outstanding: VecDeque<Outstanding>,
    /// Own receipts given up on (timed out): swallowed if they come late.
    abandoned: HashSet<String>,
    /// Held items with the sequence number of the last SUBSCRIBE before them.
    held: VecDeque<(u64, T)>,
}

impl<T> SubscribeBarrier<T> {
    /// A barrier that waits at most `timeout` for a SUBSCRIBE's receipt.
    pub fn new(timeout: Duration) -> SubscribeBarrier<T> {
        SubscribeBarrier {
            timeout,
            next_seq: 1,
            next_own: 1,
            outstanding: VecDeque::new(),
            abandoned: HashSet::new(),
            held: VecDeque::new(),
        }
    }

    /// A SUBSCRIBE is being sent at `now` with the client's `receipt`
    /// header, if any: returns the receipt it must carry.
    pub fn subscribe(&mut self, now: Instant, client_receipt: Option<&str>) -> String {
        let (receipt, own) = match client_receipt {
            Some(r) => (r.to_owned(), false),
            None => {
                let r = format!("{OWN_RECEIPT_PREFIX}{}", self.next_own);
                self.next_own += 1;
                (r, true)
            }
        };
        self.outstanding.push_back(Outstanding {
            seq: self.next_seq,
            receipt: receipt.clone(),
            own,
            sent: now,
        });
        self.next_seq += 1;
        receipt
    }

    /// Whether a publish arriving now must be held (a SUBSCRIBE before it
    /// has no receipt yet, or earlier publishes are still held).
    pub fn must_hold(&self) -> bool {
        !self.outstanding.is_empty() || !self.held.is_empty()
    }

    /// Holds `item` behind every SUBSCRIBE sent so far.
    pub fn hold(&mut self, item: T) {
        self.held.push_back((self.next_seq - 1, item));
    }

    /// Items held now.
    pub fn held(&self) -> usize {
        self.held.len()
    }

    /// Nothing is held and no SUBSCRIBE is awaited.
    pub fn is_idle(&self) -> bool {
        !self.must_hold()
    }

    /// A RECEIPT with this `receipt-id` arrived from the broker.
    pub fn on_receipt(&mut self, receipt_id: &str) -> ReceiptFor {
        if let Some(i) = self
            .outstanding
            .iter()
            .position(|o| o.receipt == receipt_id)
        {
            let own = self.outstanding.remove(i).is_some_and(|o| o.own);
            return if own {
                ReceiptFor::Own
            } else {
                ReceiptFor::ClientSubscribe
            };
        }
        if self.abandoned.remove(receipt_id) {
            return ReceiptFor::Own;
        }
        ReceiptFor::Other
    }

    /// The next held item that may go now, in order.
    pub fn release(&mut self) -> Option<T> {
        let oldest_awaited = self.outstanding.front().map(|o| o.seq);
        match (self.held.front(), oldest_awaited) {
            (Some((needs, _)), Some(awaited)) if awaited <= *needs => None,
            (Some(_), _) => self.held.pop_front().map(|(_, item)| item),
            (None, _) => None,
        }
    }

    /// When [`SubscribeBarrier::expire`] must run: while something is held,
    /// the oldest awaited SUBSCRIBE's deadline.
    pub fn deadline(&self) -> Option<Instant> {
        if self.held.is_empty() {
            return None;
        }
        self.outstanding.front().map(|o| o.sent + self.timeout)
    }

    /// Stops waiting for the SUBSCRIBEs whose deadline passed at `now`;
    /// returns how many. Their own receipts are swallowed if they come late.
    pub fn expire(&mut self, now: Instant) -> usize {
        let mut n = 0;
        while let Some(o) = self.outstanding.front() {
            if o.sent + self.timeout > now {
                break;
            }
            if let Some(o) = self.outstanding.pop_front() {
                if o.own {
                    self.abandoned.insert(o.receipt);
                }
                n += 1;
            }
        }
        n
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    const TIMEOUT: Duration = Duration::from_secs(10);

    fn drain(b: &mut SubscribeBarrier<&'static str>) -> Vec<&'static str> {
        std::iter::from_fn(|| b.release()).collect()
    }

    #[test]
    fn nothing_is_held_without_an_awaited_subscribe() {
        let b: SubscribeBarrier<&str> = SubscribeBarrier::new(TIMEOUT);
        assert!(!b.must_hold());
        assert!(b.is_idle());
        assert_eq!(b.deadline(), None);
    }

    #[test]
    fn a_publish_waits_for_the_receipt_of_the_subscribe_before_it() {
        let t0 = Instant::now();
        let mut b = SubscribeBarrier::new(TIMEOUT);
        let r = b.subscribe(t0, None);
        assert_eq!(r, "stomp-gateway-sub-1");
        assert!(b.must_hold());
        b.hold("hello");
        assert_eq!(b.release(), None);
        assert_eq!(b.deadline(), Some(t0 + TIMEOUT));
        assert_eq!(b.on_receipt("unrelated"), ReceiptFor::Other);
        assert_eq!(b.release(), None);
        assert_eq!(b.on_receipt(&r), ReceiptFor::Own);
        assert_eq!(drain(&mut b), ["hello"]);
        assert!(b.is_idle());
    }

    #[test]
    fn the_clients_receipt_is_used_and_relayed() {
        let t0 = Instant::now();
        let mut b = SubscribeBarrier::new(TIMEOUT);
        assert_eq!(b.subscribe(t0, Some("sub-1")), "sub-1");
        b.hold("a");
        assert_eq!(b.on_receipt("sub-1"), ReceiptFor::ClientSubscribe);
        assert_eq!(drain(&mut b), ["a"]);
    }

    #[test]
    fn a_publish_waits_only_for_subscribes_sent_before_it_and_order_holds() {
        let t0 = Instant::now();
        let mut b = SubscribeBarrier::new(TIMEOUT);
        let r1 = b.subscribe(t0, None);
        b.hold("a");
        let r2 = b.subscribe(t0, None);
        b.hold("b");
        // r1 done: "a" may go, "b" still waits for r2.
        assert_eq!(b.on_receipt(&r1), ReceiptFor::Own);
        assert_eq!(drain(&mut b), ["a"]);
        assert!(b.must_hold());
        // A publish now queues behind "b", whatever the receipts say.
        b.hold("c");
        assert_eq!(b.on_receipt(&r2), ReceiptFor::Own);
        assert_eq!(drain(&mut b), ["b", "c"]);
        assert!(b.is_idle());
    }

    #[test]
    fn receipts_out_of_order_release_nothing_early() {
        let t0 = Instant::now();
        let mut b = SubscribeBarrier::new(TIMEOUT);
        let r1 = b.subscribe(t0, None);
        let r2 = b.subscribe(t0, None);
        b.hold("a");
        assert_eq!(b.on_receipt(&r2), ReceiptFor::Own);
        assert_eq!(b.release(), None);
        assert_eq!(b.on_receipt(&r1), ReceiptFor::Own);
        assert_eq!(drain(&mut b), ["a"]);
    }

    #[test]
    fn the_wait_is_bounded_and_late_own_receipts_are_swallowed() {
        let t0 = Instant::now();
        let mut b = SubscribeBarrier::new(TIMEOUT);
        let r1 = b.subscribe(t0, None);
        let r2 = b.subscribe(t0 + Duration::from_secs(5), Some("client"));
        b.hold("a");
        assert_eq!(b.deadline(), Some(t0 + TIMEOUT));
        assert_eq!(b.expire(t0 + TIMEOUT - Duration::from_millis(1)), 0);
        assert_eq!(b.release(), None);
        assert_eq!(b.expire(t0 + TIMEOUT), 1);
        // r2 (sent 5 s later) still holds "a".
        assert_eq!(b.release(), None);
        assert_eq!(b.deadline(), Some(t0 + Duration::from_secs(15)));
        assert_eq!(b.expire(t0 + Duration::from_secs(15)), 1);
        assert_eq!(drain(&mut b), ["a"]);
        // The late receipts: ours is swallowed once, the client's relayed.
        assert_eq!(b.on_receipt(&r1), ReceiptFor::Own);
        assert_eq!(b.on_receipt(&r1), ReceiptFor::Other);
        assert_eq!(b.on_receipt(&r2), ReceiptFor::Other);
    }
}
