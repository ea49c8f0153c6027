//! The embedded broker (`broker.mode = "embedded"`): the local hub with no
//! upstream, like Spring's simple broker. Single node: sessions of one
//! process see each other's messages, nothing else does.
//!
//! It serves `/topic/…` publish-subscribe and `/queue/…` point-to-point
//! (round-robin over the queue's subscribers; a message sent to a queue
//! nobody listens on is dropped, nothing is stored), receipts and
//! `ack:auto`. ACK, NACK and transactions get an ERROR naming
//! `broker.mode = "relay"`.
//!
//! Each session reaches it the way it reaches RabbitMQ: as a STOMP peer, over
//! an in-memory stream ([`EmbeddedBroker::connect`]), so the session state
//! machine and its driver are the same in both modes. Behind the stream, one
//! task reads the session's frames and one writes what the session gets
//! from its [`Outbox`]. A message is encoded once per STOMP version
//! ([`SharedMessage`]); delivering it only appends a short per-subscriber
//! prefix plus the shared bytes to each subscriber's outbox, under one lock,
//! never waiting for a session. A session whose outbox holds more than
//! `hub.max_queued_bytes`, or whose oldest queued message has waited more
//! than `hub.max_queued_ms`, is a slow consumer: its queue is dropped, it
//! gets an ERROR `message:slow consumer` and is closed, and the
//! `slow_consumers_total` metric counts it. Nobody else waits for it.

use crate::outlet::{OutletLimits, Pushed};
use bytes::{Bytes, BytesMut};
use prometheus::IntCounter;
use relay_core::codec::{encode_to_bytes, Decoder, Item, Limits};
use relay_core::hub::{Distribution, Hub, SessionKey, SharedMessage};
use relay_core::{Command, Frame, Version};
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Instant;
use tokio::io::{AsyncRead, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};
use tokio::sync::Notify;
use tracing::{debug, warn};

/// Bytes buffered in the in-memory stream between a session and the
/// embedded broker, each way.
const STREAM_BUFFER: usize = 64 * 1024;

/// The `server` header of the embedded broker's CONNECTED.
const SERVER: &str = concat!("stomp-gateway-embedded/", env!("CARGO_PKG_VERSION"));

/// Where to read how to switch to RabbitMQ, quoted in ERROR frames.
const SWITCH: &str = "set broker.mode = \"relay\" to use RabbitMQ";

/// Messages and replies on their way to one session.
#[derive(Debug, Default)]
struct Outbox {
    inner: Mutex<OutboxInner>,
    wake: Notify,
}

#[derive(Debug, Default)]
struct OutboxInner {
    items: VecDeque<(Instant, Bytes)>,
    bytes: usize,
    /// The session's STOMP version (set at CONNECT).
    version: Option<Version>,
    /// No more input: write what is queued, then close the stream.
    closing: bool,
}

impl Outbox {
    fn lock(&self) -> MutexGuard<'_, OutboxInner> {
        // A panic while holding it cannot leave the queue half-updated in a
        // way that matters more than losing the session; keep serving.
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues a reply (CONNECTED, RECEIPT, ERROR): small, one per client
    /// frame, so not counted against the limits.
    fn push_reply(&self, bytes: Bytes, close: bool) {
        let mut inner = self.lock();
        if inner.closing {
            return;
        }
        inner.bytes += bytes.len();
        inner.items.push_back((Instant::now(), bytes));
        inner.closing |= close;
        drop(inner);
        self.wake.notify_one();
    }

    /// Queues a delivered message unless that makes the session a slow consumer.
    fn push_message(&self, now: Instant, bytes: Bytes, limits: OutletLimits) -> Pushed {
        let mut inner = self.lock();
        if inner.closing {
            return Pushed::Dropped;
        }
        let too_old = inner
            .items
            .front()
            .is_some_and(|(t, _)| now.saturating_duration_since(*t) > limits.max_wait);
        if inner.bytes + bytes.len() > limits.max_bytes || too_old {
            inner.items.clear();
            let error = Frame::error(
                "slow consumer",
                format!(
                    "this session did not read its messages fast enough (more than {} bytes \
                     queued, or one waiting more than {} ms); reconnect and resubscribe",
                    limits.max_bytes,
                    limits.max_wait.as_millis()
                ),
            );
            let error = encode_to_bytes(&error, inner.version.unwrap_or(Version::V1_2));
            inner.bytes = error.len();
            inner.items.push_back((now, error));
            inner.closing = true;
            drop(inner);
            self.wake.notify_one();
            return Pushed::SlowConsumer;
        }
        inner.bytes += bytes.len();
        inner.items.push_back((now, bytes));
        drop(inner);
        self.wake.notify_one();
        Pushed::Queued
    }

    /// Everything queued, and whether the stream closes after it.
    fn take(&self) -> (Vec<Bytes>, bool) {
        let mut inner = self.lock();
        let items = inner.items.drain(..).map(|(_, b)| b).collect();
        (items, inner.closing)
    }

    /// The writer wrote `n` bytes.
    fn written(&self, n: usize) {
        let mut inner = self.lock();
        inner.bytes = inner.bytes.saturating_sub(n);
    }
}

#[derive(Debug, Default)]
struct State {
    hub: Hub,
    outboxes: HashMap<SessionKey, Arc<Outbox>>,
}

/// Counts of what the embedded broker holds, for `/readyz` and logs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stats {
    pub sessions: usize,
    pub destinations: usize,
    pub subscriptions: usize,
}

/// The embedded broker of one process. See the module documentation.
#[derive(Debug)]
pub struct EmbeddedBroker {
    state: Mutex<State>,
    next_session: AtomicU64,
    next_message: AtomicU64,
    limits: OutletLimits,
    frame_limits: Limits,
    slow_consumers: IntCounter,
}

impl EmbeddedBroker {
    /// A broker whose sessions' outboxes have `limits`, reading session
    /// frames up to `frame_limits`, counting slow consumers in `slow_consumers`.
    pub fn new(
        limits: OutletLimits,
        frame_limits: Limits,
        slow_consumers: IntCounter,
    ) -> Arc<EmbeddedBroker> {
        Arc::new(EmbeddedBroker {
            state: Mutex::new(State::default()),
            next_session: AtomicU64::new(1),
            next_message: AtomicU64::new(1),
            limits,
            frame_limits,
            slow_consumers,
        })
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens a session's connection to the broker: the returned stream
    /// speaks STOMP (CONNECT first) like a connection to RabbitMQ would.
    /// Must be called within a Tokio runtime (it spawns the broker side).
    pub fn connect(self: &Arc<Self>) -> DuplexStream {
        let (ours, theirs) = tokio::io::duplex(STREAM_BUFFER);
        let key = self.next_session.fetch_add(1, Ordering::Relaxed);
        let outbox = Arc::new(Outbox::default());
        self.lock().outboxes.insert(key, outbox.clone());
        let (read, write) = tokio::io::split(ours);
        tokio::spawn(write_session(write, outbox.clone()));
        tokio::spawn(self.clone().read_session(key, read, outbox));
        theirs
    }

    /// What the broker holds now.
    pub fn stats(&self) -> Stats {
        let state = self.lock();
        Stats {
            sessions: state.outboxes.len(),
            destinations: state.hub.key_count(),
            subscriptions: state.hub.subscription_count(),
        }
    }

    /// Reads one session's frames until it closes, then forgets it.
    async fn read_session(
        self: Arc<Self>,
        key: SessionKey,
        mut read: ReadHalf<DuplexStream>,
        outbox: Arc<Outbox>,
    ) {
        let mut decoder = Decoder::new(self.frame_limits);
        let mut conn = Conn {
            key,
            version: None,
            outbox: outbox.clone(),
        };
        'read: loop {
            // The read buffer lives only during one poll (on the stack), so
            // an idle session holds none; what was read goes straight into
            // the decoder in that same poll.
            let read_once = std::future::poll_fn(|cx| {
                let mut chunk = [0u8; 8 * 1024];
                let mut buf = tokio::io::ReadBuf::new(&mut chunk);
                match std::pin::Pin::new(&mut read).poll_read(cx, &mut buf) {
                    std::task::Poll::Ready(Ok(())) => {
                        decoder.extend(buf.filled());
                        std::task::Poll::Ready(Ok(buf.filled().len()))
                    }
                    std::task::Poll::Ready(Err(e)) => std::task::Poll::Ready(Err(e)),
                    std::task::Poll::Pending => std::task::Poll::Pending,
                }
            });
            match read_once.await {
                Ok(0) | Err(_) => break,
                Ok(_) => {}
            }
            loop {
                match decoder.decode() {
                    Ok(Some(Item::Frame(frame))) => {
                        let done = self.handle(&mut conn, frame);
                        if let Some(v) = conn.version {
                            decoder.set_version(v);
                        }
                        if done {
                            break 'read;
                        }
                    }
                    Ok(Some(Item::Heartbeat)) => {}
                    Ok(None) => break,
                    Err(e) => {
                        conn.error("malformed frame", &e.to_string());
                        break 'read;
                    }
                }
            }
        }
        self.forget(key);
        // Let the writer finish what is queued and close the stream.
        outbox.push_reply(Bytes::new(), true);
        debug!(embedded_session = key, "embedded broker session closed");
    }

    /// Removes a session and its subscriptions.
    fn forget(&self, key: SessionKey) {
        let mut state = self.lock();
        state.outboxes.remove(&key);
        state.hub.remove_session(key);
    }

    /// Handles one frame from a session; true when the session is done.
    fn handle(&self, conn: &mut Conn, frame: Frame) -> bool {
        let receipt = frame.header("receipt").map(str::to_owned);
        match frame.command {
            Command::Connect | Command::Stomp => {
                if conn.version.is_some() {
                    return conn.error("already connected", "CONNECT was sent twice");
                }
                let version =
                    relay_core::session::negotiate_version(frame.header("accept-version"))
                        .unwrap_or(Version::V1_2);
                conn.version = Some(version);
                conn.outbox.lock().version = Some(version);
                let connected = Frame::new(Command::Connected)
                    .with_header("version", version.as_str())
                    .with_header("heart-beat", "0,0")
                    .with_header("server", SERVER);
                conn.reply(&connected, false);
                return false;
            }
            _ if conn.version.is_none() => {
                return conn.error("not connected", "the first frame must be CONNECT");
            }
            Command::Subscribe => {
                let Some(destination) = frame.header("destination") else {
                    return conn.error("SUBSCRIBE without destination", "");
                };
                let id = frame.header("id").unwrap_or(destination);
                let ack = frame.header("ack").unwrap_or("auto");
                if ack != "auto" {
                    return conn.error(
                        "acknowledgements are not supported by the embedded broker",
                        &format!(
                            "SUBSCRIBE with ack:{ack} to {destination}: the embedded broker \
                             supports ack:auto only; {SWITCH}"
                        ),
                    );
                }
                let Some(distribution) = distribution(destination) else {
                    return conn.unsupported_destination("SUBSCRIBE", destination);
                };
                let res = self
                    .lock()
                    .hub
                    .subscribe(conn.key, id, destination, distribution);
                if let Err(e) = res {
                    return conn.error("subscription refused", &e.to_string());
                }
            }
            Command::Unsubscribe => {
                let Some(id) = frame.header("id").or(frame.header("destination")) else {
                    return conn.error("UNSUBSCRIBE without id", "");
                };
                self.lock().hub.unsubscribe(conn.key, id);
            }
            Command::Send => {
                let Some(destination) = frame.header("destination") else {
                    return conn.error("SEND without destination", "");
                };
                if frame.header("transaction").is_some() {
                    return conn.unsupported("transactions", "SEND with a transaction header");
                }
                if distribution(destination).is_none() {
                    return conn.unsupported_destination("SEND", destination);
                }
                self.publish(frame);
            }
            Command::Ack | Command::Nack => {
                return conn.unsupported(
                    "acknowledgements",
                    &format!("{} (only ack:auto subscriptions exist)", frame.command),
                );
            }
            Command::Begin | Command::Commit | Command::Abort => {
                return conn.unsupported("transactions", frame.command.as_str());
            }
            Command::Disconnect => {
                if let Some(r) = receipt {
                    conn.reply(
                        &Frame::new(Command::Receipt).with_header("receipt-id", r),
                        true,
                    );
                }
                return true;
            }
            other => {
                return conn.error(
                    "unexpected frame",
                    &format!("{other} is not a client frame"),
                )
            }
        }
        if let Some(r) = receipt {
            conn.reply(
                &Frame::new(Command::Receipt).with_header("receipt-id", r),
                false,
            );
        }
        false
    }

    /// Delivers a SEND to the destination's subscribers.
    fn publish(&self, send: Frame) {
        let Frame { headers, body, .. } = send;
        let mut shared = Vec::with_capacity(headers.len());
        for (k, v) in headers {
            if matches!(
                k.as_str(),
                "receipt"
                    | "content-length"
                    | "transaction"
                    | "message-id"
                    | "subscription"
                    | "ack"
            ) || shared.iter().any(|(s, _): &(String, String)| *s == k)
            {
                continue;
            }
            shared.push((k, v));
        }
        let message = SharedMessage::new(shared, body);
        let Some(destination) = message.header("destination").map(str::to_owned) else {
            return;
        };
        let now = Instant::now();
        let mut slow = Vec::new();
        let mut state = self.lock();
        let State { hub, outboxes } = &mut *state;
        hub.deliver(&destination, |sub| {
            let Some(outbox) = outboxes.get(&sub.session) else {
                return;
            };
            let version = outbox.lock().version.unwrap_or(Version::V1_2);
            let id = self.next_message.fetch_add(1, Ordering::Relaxed);
            let mut out = BytesMut::new();
            message.write(version, &sub.subscription, &id.to_string(), None, &mut out);
            if outbox.push_message(now, out.freeze(), self.limits) == Pushed::SlowConsumer {
                slow.push(sub.session);
            }
        });
        for key in slow {
            hub.remove_session(key);
            self.slow_consumers.inc();
            warn!(
                embedded_session = key,
                destination = %destination,
                max_queued_bytes = self.limits.max_bytes,
                max_queued_ms = self.limits.max_wait.as_millis() as u64,
                "slow consumer: dropping its queued messages and closing it"
            );
        }
    }
}

/// `/topic/…` is publish-subscribe, `/queue/…` point-to-point; nothing else
/// is served.
fn distribution(destination: &str) -> Option<Distribution> {
    let served = |p: &str| destination.len() > p.len() && destination.starts_with(p);
    if served("/topic/") {
        Some(Distribution::Broadcast)
    } else if served("/queue/") {
        Some(Distribution::RoundRobin)
    } else {
        None
    }
}

/// One session as the embedded broker sees it.
#[derive(Debug)]
struct Conn {
    key: SessionKey,
    version: Option<Version>,
    outbox: Arc<Outbox>,
}

impl Conn {
    fn reply(&self, frame: &Frame, close: bool) {
        let bytes = encode_to_bytes(frame, self.version.unwrap_or(Version::V1_2));
        self.outbox.push_reply(bytes, close);
    }

    /// Sends an ERROR and closes; returns true (the session is done).
    fn error(&self, message: &str, details: &str) -> bool {
        self.reply(&Frame::error(message, details), true);
        true
    }

    fn unsupported(&self, what: &str, frame: &str) -> bool {
        self.error(
            &format!("{what} are not supported by the embedded broker"),
            &format!("{frame}: the embedded broker supports ack:auto only, without transactions; {SWITCH}"),
        )
    }

    fn unsupported_destination(&self, command: &str, destination: &str) -> bool {
        self.error(
            &format!("destination {destination} is not served by the embedded broker"),
            &format!(
                "{command} to {destination}: the embedded broker serves /topic/… and /queue/… only; {SWITCH}"
            ),
        )
    }
}

/// Writes a session's outbox to its stream until the outbox closes. While
/// the session does not read (its client is slow), the write waits and the
/// outbox fills until a delivery finds it over a limit.
async fn write_session(mut write: WriteHalf<DuplexStream>, outbox: Arc<Outbox>) {
    loop {
        let (items, closing) = outbox.take();
        for item in items {
            if write.write_all(&item).await.is_err() {
                return;
            }
            outbox.written(item.len());
        }
        if closing {
            let _ = write.shutdown().await;
            return;
        }
        outbox.wake.notified().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;
    use tokio::io::AsyncReadExt;

    /// A STOMP peer on the session side of the in-memory stream.
    struct Peer {
        stream: DuplexStream,
        decoder: Decoder,
    }

    impl Peer {
        async fn connect(broker: &Arc<EmbeddedBroker>) -> Peer {
            let mut p = Peer {
                stream: broker.connect(),
                decoder: Decoder::default(),
            };
            p.send(Frame::new(Command::Connect).with_header("accept-version", "1.2"))
                .await;
            let f = p.next().await;
            assert_eq!(f.command, Command::Connected);
            assert_eq!(f.header("version"), Some("1.2"));
            p
        }

        async fn send(&mut self, f: Frame) {
            let bytes = encode_to_bytes(&f, Version::V1_2);
            self.stream.write_all(&bytes).await.expect("write");
        }

        async fn next(&mut self) -> Frame {
            let read = async {
                loop {
                    if let Some(Item::Frame(f)) = self.decoder.decode().expect("valid STOMP") {
                        return f;
                    }
                    let mut buf = [0u8; 4096];
                    let n = self.stream.read(&mut buf).await.expect("read");
                    assert!(n > 0, "stream closed while waiting for a frame");
                    self.decoder.extend(&buf[..n]);
                }
            };
            tokio::time::timeout(Duration::from_secs(5), read)
                .await
                .expect("a frame within 5 s")
        }

        async fn subscribe(&mut self, id: &str, destination: &str) {
            self.send(
                Frame::new(Command::Subscribe)
                    .with_header("id", id)
                    .with_header("destination", destination)
                    .with_header("receipt", format!("sub-{id}")),
            )
            .await;
            let r = self.next().await;
            assert_eq!(r.command, Command::Receipt, "{r:?}");
        }

        async fn publish(&mut self, destination: &str, body: &str) {
            self.send(
                Frame::new(Command::Send)
                    .with_header("destination", destination)
                    .with_header("content-type", "text/plain")
                    .with_header("x-custom", "a:b")
                    .with_body(body.to_owned()),
            )
            .await;
        }
    }

    fn broker(max_bytes: usize) -> Arc<EmbeddedBroker> {
        EmbeddedBroker::new(
            OutletLimits {
                max_bytes,
                max_wait: Duration::from_secs(30),
            },
            Limits::default(),
            IntCounter::new("slow", "slow").expect("counter"),
        )
    }

    #[tokio::test]
    async fn topic_reaches_every_subscriber_with_its_own_headers() {
        let b = broker(1 << 20);
        let mut a = Peer::connect(&b).await;
        let mut c = Peer::connect(&b).await;
        a.subscribe("sa", "/topic/t").await;
        c.subscribe("sc", "/topic/t").await;
        for i in 0..3 {
            a.publish("/topic/t", &format!("m{i}")).await;
        }
        for (peer, sub) in [(&mut a, "sa"), (&mut c, "sc")] {
            let mut ids = Vec::new();
            for i in 0..3 {
                let m = peer.next().await;
                assert_eq!(m.command, Command::Message);
                assert_eq!(m.header("subscription"), Some(sub));
                assert_eq!(m.header("destination"), Some("/topic/t"));
                assert_eq!(m.header("content-type"), Some("text/plain"));
                assert_eq!(m.header("x-custom"), Some("a:b"));
                assert_eq!(m.body, Bytes::from(format!("m{i}")), "in order");
                ids.push(m.header("message-id").expect("message-id").to_owned());
            }
            ids.dedup();
            assert_eq!(ids.len(), 3, "unique message ids");
        }
        assert_eq!(b.stats().subscriptions, 2);
        drop(a);
        drop(c);
    }

    #[tokio::test]
    async fn queue_is_round_robin() {
        let b = broker(1 << 20);
        let mut a = Peer::connect(&b).await;
        let mut c = Peer::connect(&b).await;
        a.subscribe("q", "/queue/work").await;
        c.subscribe("q", "/queue/work").await;
        for i in 0..4 {
            a.publish("/queue/work", &format!("{i}")).await;
        }
        let got_a = [a.next().await.body, a.next().await.body];
        let got_c = [c.next().await.body, c.next().await.body];
        assert_eq!(got_a, [Bytes::from("0"), Bytes::from("2")]);
        assert_eq!(got_c, [Bytes::from("1"), Bytes::from("3")]);
    }

    #[tokio::test]
    async fn acks_transactions_and_other_destinations_get_an_error() {
        let b = broker(1 << 20);
        for frame in [
            Frame::new(Command::Subscribe)
                .with_header("id", "1")
                .with_header("destination", "/topic/x")
                .with_header("ack", "client"),
            Frame::new(Command::Ack).with_header("id", "1"),
            Frame::new(Command::Begin).with_header("transaction", "t"),
            Frame::new(Command::Subscribe)
                .with_header("id", "1")
                .with_header("destination", "/exchange/amq.topic/x"),
        ] {
            let mut p = Peer::connect(&b).await;
            p.send(frame.clone()).await;
            let e = p.next().await;
            assert_eq!(e.command, Command::Error, "{frame:?}");
            let message = e.header("message").expect("message");
            assert!(message.contains("embedded broker"), "{message}");
            assert!(
                String::from_utf8_lossy(&e.body).contains("broker.mode = \"relay\""),
                "{e:?}"
            );
        }
    }

    #[tokio::test]
    async fn slow_consumer_is_dropped_and_others_keep_receiving() {
        let b = broker(16 * 1024);
        let mut slow = Peer::connect(&b).await;
        let mut fast = Peer::connect(&b).await;
        let mut sender = Peer::connect(&b).await;
        slow.subscribe("s", "/topic/t").await;
        fast.subscribe("f", "/topic/t").await;
        let body = "x".repeat(1000);
        // The slow peer reads nothing: 64 KiB of stream buffer plus the
        // outbox limit fill up, then it is dropped.
        for i in 0..200 {
            sender.publish("/topic/t", &format!("{i} {body}")).await;
            let m = fast.next().await;
            assert!(m.body.starts_with(format!("{i} ").as_bytes()), "in order");
        }
        assert_eq!(b.slow_consumers.get(), 1);
        assert_eq!(b.stats().subscriptions, 1, "only the fast one is left");
        // The slow one finds its ERROR after what was already on its way.
        let error = loop {
            let f = slow.next().await;
            if f.command != Command::Message {
                break f;
            }
        };
        assert_eq!(error.command, Command::Error);
        assert_eq!(error.header("message"), Some("slow consumer"));
    }

    #[tokio::test]
    async fn disconnect_receipt_and_cleanup() {
        let b = broker(1 << 20);
        let mut p = Peer::connect(&b).await;
        p.subscribe("s", "/topic/t").await;
        p.send(Frame::new(Command::Disconnect).with_header("receipt", "bye"))
            .await;
        let r = p.next().await;
        assert_eq!(r.header("receipt-id"), Some("bye"));
        let mut rest = Vec::new();
        p.stream.read_to_end(&mut rest).await.expect("EOF");
        assert!(rest.is_empty());
        assert_eq!(b.stats().sessions, 0);
        assert_eq!(b.stats().subscriptions, 0);
    }
}
