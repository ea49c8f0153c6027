//! A session's way out to its client: the queue of WebSocket messages its
//! writer task has not written yet, counted in bytes, with how long the
//! writer has gone without progress, and the slow-consumer verdict.
//!
//! Two kinds of producers fill it: the session's own driver
//! ([`crate::client`]: CONNECTED, RECEIPT, ERROR, relayed MESSAGE frames)
//! and the pod's shared fan-out ([`crate::fanout::shared`]), which pushes a
//! delivered message into every subscriber's queue under one lock and never
//! waits for a session. A shared message goes in only while the queue is
//! within [`OutletLimits`]: more than `max_bytes` unwritten, or a writer that
//! made no progress for `max_wait` while holding data, makes the session a
//! slow consumer. Then the writer drops the shared messages still queued
//! (they are nobody else's), the driver is woken to send ERROR
//! `slow consumer` and close, and nobody else waits.

use crate::config::MessageType;
use bytes::Bytes;
use relay_core::Version;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

/// What the client writer task is handed.
pub(crate) enum ClientOut {
    /// A message, its length, and when the broker frame it carries was read
    /// (for the relay latency; `None` for what the gateway says itself).
    Message(Message, usize, Option<Instant>),
    /// A message from the shared fan-out and its length: dropped unwritten
    /// once the session is a slow consumer.
    Shared(Message, usize),
    Close(u16, String),
}

/// Limits of one session's outbound queue for shared messages (`[hub]`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OutletLimits {
    /// Bytes queued for one session before it counts as a slow consumer
    /// (`hub.max_queued_bytes`).
    pub max_bytes: usize,
    /// How long the writer may hold queued data without writing any of it
    /// (`hub.max_queued_ms`).
    pub max_wait: Duration,
}

/// Bytes queued for one writer task and not yet written, whether it failed,
/// and the verdicts the shared fan-out hands to the driver.
#[derive(Debug)]
pub(crate) struct Queue {
    bytes: AtomicUsize,
    failed: AtomicBool,
    /// Set once: shared messages went over a limit.
    slow: AtomicBool,
    /// Set once: the shared upstream lost messages and the gap policy is
    /// "close".
    lost: AtomicBool,
    /// Milliseconds after `base` since the writer last made progress while
    /// holding data (0: nothing queued).
    stalled_since: AtomicU64,
    base: Instant,
    pub(crate) wake: Arc<Notify>,
}

impl Queue {
    pub(crate) fn new(wake: Arc<Notify>) -> Arc<Queue> {
        Arc::new(Queue {
            bytes: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
            slow: AtomicBool::new(false),
            lost: AtomicBool::new(false),
            stalled_since: AtomicU64::new(0),
            base: Instant::now(),
            wake,
        })
    }

    fn now_ms(&self) -> u64 {
        // +1 keeps 0 free for "nothing queued".
        u64::try_from(self.base.elapsed().as_millis())
            .unwrap_or(u64::MAX)
            .saturating_add(1)
    }

    pub(crate) fn add(&self, n: usize) {
        if self.bytes.fetch_add(n, Ordering::Relaxed) == 0 {
            self.stalled_since.store(self.now_ms(), Ordering::Relaxed);
        }
    }

    /// The writer wrote `n` bytes: progress.
    pub(crate) fn done(&self, n: usize) {
        let left = self.bytes.fetch_sub(n, Ordering::Relaxed).saturating_sub(n);
        let since = if left == 0 { 0 } else { self.now_ms() };
        self.stalled_since.store(since, Ordering::Relaxed);
        self.wake.notify_one();
    }

    /// The writer dropped `n` bytes unwritten (a slow consumer's messages).
    fn dropped(&self, n: usize) {
        self.bytes.fetch_sub(n, Ordering::Relaxed);
    }

    pub(crate) fn fail(&self) {
        self.failed.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }

    pub(crate) fn len(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }

    pub(crate) fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }

    pub(crate) fn is_slow(&self) -> bool {
        self.slow.load(Ordering::Relaxed)
    }

    /// How long the writer has held data without writing any.
    fn stalled_for(&self) -> Duration {
        match self.stalled_since.load(Ordering::Relaxed) {
            0 => Duration::ZERO,
            since => Duration::from_millis(self.now_ms().saturating_sub(since)),
        }
    }

    /// Marks the session as having lost shared messages (wakes the driver
    /// the first time).
    pub(crate) fn mark_lost(&self) {
        if !self.lost.swap(true, Ordering::Relaxed) {
            self.wake.notify_one();
        }
    }

    /// Whether [`Queue::mark_lost`] was called.
    pub(crate) fn is_lost(&self) -> bool {
        self.lost.load(Ordering::Relaxed)
    }

    /// What the writer does with a queued item: `false` drops it.
    pub(crate) fn keep(&self, out: &ClientOut) -> bool {
        match out {
            ClientOut::Shared(_, len) if self.is_slow() => {
                self.dropped(*len);
                false
            }
            _ => true,
        }
    }
}

/// What [`Outlet::push_shared`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pushed {
    Queued,
    /// The session is closing or already a slow consumer: dropped.
    Dropped,
    /// This message made the session a slow consumer (count it once).
    SlowConsumer,
}

/// The shared fan-out's handle on one session's outbound queue.
#[derive(Debug, Clone)]
pub struct Outlet {
    tx: mpsc::UnboundedSender<ClientOut>,
    queue: Arc<Queue>,
    /// The session's STOMP version (how its MESSAGE frames are encoded).
    pub version: Version,
    message_type: MessageType,
}

impl Outlet {
    pub(crate) fn new(
        tx: mpsc::UnboundedSender<ClientOut>,
        queue: Arc<Queue>,
        version: Version,
        message_type: MessageType,
    ) -> Outlet {
        Outlet {
            tx,
            queue,
            version,
            message_type,
        }
    }

    /// Queues one encoded MESSAGE unless that makes the session a slow
    /// consumer (see the module documentation). Never waits.
    pub fn push_shared(&self, bytes: Bytes, limits: OutletLimits) -> Pushed {
        if self.queue.is_slow() || self.queue.has_failed() {
            return Pushed::Dropped;
        }
        let len = bytes.len();
        let queued = self.queue.len();
        let stalled = queued > 0 && self.queue.stalled_for() > limits.max_wait;
        if queued.saturating_add(len) > limits.max_bytes || stalled {
            if !self.queue.slow.swap(true, Ordering::Relaxed) {
                self.queue.wake.notify_one();
                return Pushed::SlowConsumer;
            }
            return Pushed::Dropped;
        }
        self.queue.add(len);
        let msg = ws_message(bytes, self.message_type);
        if self.tx.send(ClientOut::Shared(msg, len)).is_err() {
            self.queue.fail();
            return Pushed::Dropped;
        }
        Pushed::Queued
    }

    /// Wakes the driver: the shared upstream lost this session's messages.
    pub fn mark_lost(&self) {
        self.queue.mark_lost();
    }
}

/// An encoded frame as a WebSocket message: text when it is valid UTF-8
/// (unless binary is forced), binary otherwise; a text message must be
/// UTF-8, and browsers drop the socket when it isn't.
pub fn ws_message(bytes: Bytes, mode: MessageType) -> Message {
    match mode {
        MessageType::Binary => Message::Binary(bytes),
        MessageType::Auto | MessageType::Text => {
            // Cloning `Bytes` only bumps a reference count.
            match Utf8Bytes::try_from(bytes.clone()) {
                Ok(text) => Message::Text(text),
                // Not UTF-8: only a binary message can carry it (RFC 6455).
                Err(_) => Message::Binary(bytes),
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn outlet() -> (Outlet, mpsc::UnboundedReceiver<ClientOut>, Arc<Queue>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let queue = Queue::new(Arc::new(Notify::new()));
        let o = Outlet::new(tx, queue.clone(), Version::V1_2, MessageType::Auto);
        (o, rx, queue)
    }

    const LIMITS: OutletLimits = OutletLimits {
        max_bytes: 10,
        max_wait: Duration::from_secs(60),
    };

    #[test]
    fn over_the_byte_limit_is_a_slow_consumer_once() {
        let (o, mut rx, q) = outlet();
        assert_eq!(
            o.push_shared(Bytes::from_static(b"12345"), LIMITS),
            Pushed::Queued
        );
        assert_eq!(
            o.push_shared(Bytes::from_static(b"12345"), LIMITS),
            Pushed::Queued
        );
        assert_eq!(
            o.push_shared(Bytes::from_static(b"1"), LIMITS),
            Pushed::SlowConsumer
        );
        assert_eq!(
            o.push_shared(Bytes::from_static(b"1"), LIMITS),
            Pushed::Dropped
        );
        assert!(q.is_slow());
        // The writer drops what was queued and the count goes back to 0.
        let mut kept = 0;
        while let Ok(out) = rx.try_recv() {
            kept += usize::from(q.keep(&out));
        }
        assert_eq!(kept, 0);
        assert_eq!(q.len(), 0);
    }

    #[test]
    fn a_writer_without_progress_past_max_wait_is_a_slow_consumer() {
        let (o, _rx, q) = outlet();
        let limits = OutletLimits {
            max_bytes: 1 << 20,
            max_wait: Duration::from_millis(20),
        };
        assert_eq!(
            o.push_shared(Bytes::from_static(b"a"), limits),
            Pushed::Queued
        );
        std::thread::sleep(Duration::from_millis(40));
        assert_eq!(
            o.push_shared(Bytes::from_static(b"b"), limits),
            Pushed::SlowConsumer
        );
        assert!(q.is_slow());
    }

    #[test]
    fn progress_resets_the_wait() {
        let (o, _rx, q) = outlet();
        let limits = OutletLimits {
            max_bytes: 1 << 20,
            max_wait: Duration::from_millis(30),
        };
        assert_eq!(
            o.push_shared(Bytes::from_static(b"a"), limits),
            Pushed::Queued
        );
        assert_eq!(
            o.push_shared(Bytes::from_static(b"b"), limits),
            Pushed::Queued
        );
        std::thread::sleep(Duration::from_millis(40));
        q.done(1); // one written: progress, one still queued
        assert_eq!(
            o.push_shared(Bytes::from_static(b"c"), limits),
            Pushed::Queued
        );
        q.done(2);
        assert_eq!(q.len(), 0);
        std::thread::sleep(Duration::from_millis(40));
        // Nothing was queued while idle: no stall.
        assert_eq!(
            o.push_shared(Bytes::from_static(b"d"), limits),
            Pushed::Queued
        );
    }

    #[test]
    fn replies_are_kept_when_slow() {
        let (o, _rx, q) = outlet();
        let _ = o.push_shared(Bytes::from(vec![0u8; 11]), LIMITS);
        assert!(q.is_slow());
        let error = ClientOut::Message(Message::text("ERROR"), 5, None);
        assert!(q.keep(&error));
    }
}
