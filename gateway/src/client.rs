//! One task per client session: the I/O around [`relay_core::session::Session`].
//!
//! ```text
//!  WebSocket read ──decode──▶ Session ──ToBroker──▶ broker writer task ──▶ TCP
//!  TCP read ──FrameReader──▶ Session ──ToClient──▶ client writer task ──▶ WebSocket
//! ```
//!
//! Backpressure: each writer task counts the bytes queued for it and not yet
//! flushed. While the client's count is over `session.outbound_buffer_bytes`
//! the task stops reading the broker connection (so a slow browser slows its
//! own broker leg, and RabbitMQ's flow control takes over), and stops reading
//! the client too. While the broker's count is over the limit it stops
//! reading the client. Every input produces a bounded amount of output, so
//! nothing grows without bound in either direction.

use crate::amqp::{OutboundMessage, PublishError};
use crate::broker::{
    self, BrokerError, BrokerReadHalf, BrokerStream, BrokerWriteHalf, FrameReader,
};
use crate::config::MessageType;
use crate::state::{SessionSlot, Shared};
use bytes::{Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, SplitSink, StreamExt};
use futures_util::{FutureExt, Sink, SinkExt, Stream};
use relay_core::codec::{encode_to_bytes, HEARTBEAT};
use relay_core::session::{Action, AppPublish, CloseReason, Session};
use relay_core::{Decoder, Frame, Item, Version};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, Notify, OwnedSemaphorePermit};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message, Utf8Bytes};
use tracing::{debug, info};

/// Broker frames handled per wake-up before other work gets a turn.
const BROKER_BURST: usize = 64;
/// Client WebSocket messages handled per wake-up, likewise.
const CLIENT_BURST: usize = 64;

/// How long the writers get to flush the last frames after the session ended.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

/// Bytes queued for one writer task and not yet written, plus whether it failed.
#[derive(Debug)]
struct Queue {
    bytes: AtomicUsize,
    failed: AtomicBool,
    wake: Arc<Notify>,
}

impl Queue {
    fn new(wake: Arc<Notify>) -> Arc<Queue> {
        Arc::new(Queue {
            bytes: AtomicUsize::new(0),
            failed: AtomicBool::new(false),
            wake,
        })
    }
    fn add(&self, n: usize) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }
    fn done(&self, n: usize) {
        self.bytes.fetch_sub(n, Ordering::Relaxed);
        self.wake.notify_one();
    }
    fn fail(&self) {
        self.failed.store(true, Ordering::Relaxed);
        self.wake.notify_one();
    }
    fn len(&self) -> usize {
        self.bytes.load(Ordering::Relaxed)
    }
    fn has_failed(&self) -> bool {
        self.failed.load(Ordering::Relaxed)
    }
}

enum ClientOut {
    Message(Message, usize),
    Close(u16, String),
}

enum BrokerOut {
    Data(Bytes),
    Close,
}

struct BrokerLeg {
    reader: FrameReader<BrokerReadHalf>,
    tx: mpsc::UnboundedSender<BrokerOut>,
    queue: Arc<Queue>,
    writer: tokio::task::JoinHandle<()>,
    address: String,
}

type ConnectFuture =
    Pin<Box<dyn Future<Output = Result<(BrokerStream, String), BrokerError>> + Send>>;
type PublishFuture = Pin<Box<dyn Future<Output = (u64, Result<(), PublishError>)> + Send>>;

/// The client side of a session: messages in, messages out, and a close
/// with code and reason (`Message::Close`). A WebSocket is one; a SockJS
/// session ([`crate::sockjs::Conn`]) is another.
pub trait ClientTransport:
    Stream<Item = Result<Message, WsError>> + Sink<Message, Error = WsError> + Send + Unpin + 'static
{
}

impl<T> ClientTransport for T where
    T: Stream<Item = Result<Message, WsError>>
        + Sink<Message, Error = WsError>
        + Send
        + Unpin
        + 'static
{
}

/// Runs one client session until both legs are closed.
pub async fn run<T: ClientTransport>(
    ws: T,
    shared: Arc<Shared>,
    id: String,
    peer: SocketAddr,
    subprotocol: Option<Version>,
    permit: OwnedSemaphorePermit,
) {
    let slot = SessionSlot::open(shared.health.clone(), permit);
    shared.metrics.sessions_opened.inc();
    let started = Instant::now();
    info!(pod = %shared.pod, session = %id, %peer, subprotocol = subprotocol.map(|v| v.subprotocol()), "session opened");

    let wake = Arc::new(Notify::new());
    let (sink, mut stream) = ws.split();
    let client_queue = Queue::new(wake.clone());
    let (client_tx, client_rx) = mpsc::unbounded_channel();
    let client_writer = tokio::spawn(write_client(sink, client_rx, client_queue.clone()));

    let mut d = Driver {
        session: Session::new(shared.session.clone(), id.clone(), started),
        decoder: Decoder::new(shared.client_limits),
        shared: shared.clone(),
        client_tx,
        client_queue,
        broker: None,
        connecting: None,
        connect_frame: None,
        closing_brokers: Vec::new(),
        broker_address: None,
        publishes: FuturesUnordered::new(),
        broker_pending: BytesMut::new(),
    };
    // Stop reading the client while half the per-session publish budget is
    // unconfirmed, so a burst in one WebSocket message rarely hits the limit.
    let publish_gate = (shared.config.app.max_inflight_per_session / 2).max(1);
    let limit = shared.config.session.outbound_buffer_bytes;
    let mut shutdown = shared.shutdown.clone();
    let mut shutdown_seen = false;
    // When this session's turn to drain comes (SIGTERM): a random moment
    // within `server.drain_period_ms`, so clients do not all reconnect at once.
    let mut drain_at: Option<tokio::time::Instant> = None;
    let mut was_full = false;
    // One timer for the session's deadlines, re-armed only when the deadline
    // moves (building a new `Sleep` per loop turn costs a timer-wheel insert
    // and removal per frame).
    let timer = tokio::time::sleep(Duration::ZERO);
    tokio::pin!(timer);
    let mut armed: Option<tokio::time::Instant> = None;

    while !d.session.is_closed() {
        let client_full = d.client_queue.len() >= limit;
        let broker_full = d.broker.as_ref().is_some_and(|b| b.queue.len() >= limit);
        let read_client =
            !client_full && !broker_full && d.session.inflight_publishes() < publish_gate;
        let read_broker = d.broker.is_some() && !client_full;
        if client_full && !was_full {
            shared.metrics.backpressure_pauses.inc();
        }
        was_full = client_full;
        let deadline = d.session.poll_timeout().map(tokio::time::Instant::from_std);
        if deadline != armed {
            if let Some(t) = deadline {
                timer.as_mut().reset(t);
            }
            armed = deadline;
        }

        tokio::select! {
            changed = shutdown.changed(), if !shutdown_seen => {
                if changed.is_err() || *shutdown.borrow() {
                    shutdown_seen = true;
                    let period = shared.config.server.drain_period_ms;
                    let delay = if period == 0 { 0 } else { rand::random_range(0..period) };
                    drain_at = Some(tokio::time::Instant::now() + Duration::from_millis(delay));
                }
            }
            msg = stream.next(), if read_client => {
                d.on_client_message(msg);
                // Then whatever else the client already sent, so a burst
                // goes to the broker in one write rather than one per frame.
                for _ in 0..CLIENT_BURST {
                    d.run_actions();
                    let open = !d.session.is_closed()
                        && d.client_queue.len() < limit
                        && d.broker.as_ref().is_none_or(|b| b.queue.len() < limit)
                        && d.session.inflight_publishes() < publish_gate;
                    if !open {
                        break;
                    }
                    match stream.next().now_or_never() {
                        Some(msg) => d.on_client_message(msg),
                        None => break,
                    }
                }
            }
            item = next_broker_item(&mut d.broker), if read_broker => {
                d.on_broker_item(item);
                d.run_actions();
                d.drain_broker(limit);
            }
            Some((id, res)) = d.publishes.next(), if !d.publishes.is_empty() => {
                match &res {
                    Ok(()) => shared.metrics.app_published.inc(),
                    Err(_) => shared.metrics.app_failed.inc(),
                }
                d.session.handle_publish_result(Instant::now(), id, res.map_err(|e| e.to_string()));
            }
            res = poll_connect(&mut d.connecting), if d.connecting.is_some() => {
                d.connecting = None;
                d.on_broker_connected(res);
            }
            _ = wake.notified() => {
                if d.client_queue.has_failed() {
                    d.session.handle_client_closed(Instant::now());
                }
                if d.broker.as_ref().is_some_and(|b| b.queue.has_failed()) {
                    d.broker = None;
                    d.broker_pending.clear();
                    d.session.handle_broker_failed(Instant::now(), "write to the broker failed");
                }
            }
            () = &mut timer, if armed.is_some() => {
                armed = None;
                d.session.handle_timeout(Instant::now());
            }
            _ = sleep_until(drain_at), if drain_at.is_some() => {
                drain_at = None;
                d.session.handle_drain(Instant::now());
            }
        }
        d.run_actions();
        d.flush_broker();
    }
    d.flush_broker();

    // Let the writers flush the last frames (an ERROR, a RECEIPT) before the
    // sockets close.
    let Driver {
        client_tx,
        broker,
        closing_brokers,
        session,
        broker_address,
        ..
    } = d;
    drop(client_tx);
    let mut writers = closing_brokers;
    if let Some(b) = broker {
        let _ = b.tx.send(BrokerOut::Close);
        writers.push(b.writer);
    }
    let _ = tokio::time::timeout(FLUSH_TIMEOUT, client_writer).await;
    for w in writers {
        let _ = tokio::time::timeout(FLUSH_TIMEOUT, w).await;
    }
    drop(slot);
    let reason = session
        .close_reason()
        .cloned()
        .unwrap_or(CloseReason::ClientGone);
    shared.metrics.session_closed(&reason);
    info!(
        pod = %shared.pod,
        session = %id,
        %peer,
        broker = broker_address.as_deref().unwrap_or("-"),
        duration_ms = started.elapsed().as_millis() as u64,
        reason = %reason,
        "session closed"
    );
}

struct Driver {
    session: Session,
    decoder: Decoder,
    shared: Arc<Shared>,
    client_tx: mpsc::UnboundedSender<ClientOut>,
    client_queue: Arc<Queue>,
    broker: Option<BrokerLeg>,
    connecting: Option<ConnectFuture>,
    connect_frame: Option<Frame>,
    closing_brokers: Vec<tokio::task::JoinHandle<()>>,
    broker_address: Option<String>,
    /// Application publishes awaiting their confirm.
    publishes: FuturesUnordered<PublishFuture>,
    /// Bytes for the broker queued during this loop turn.
    broker_pending: BytesMut,
}

impl Driver {
    fn on_client_message(&mut self, msg: Option<Result<Message, WsError>>) {
        let now = Instant::now();
        match msg {
            Some(Ok(Message::Text(t))) => self.feed(now, t.as_bytes()),
            Some(Ok(Message::Binary(b))) => self.feed(now, &b),
            Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {
                self.session.handle_client_activity(now)
            }
            Some(Ok(Message::Close(_))) | None => self.session.handle_client_closed(now),
            Some(Err(e)) => {
                debug!(session = %self.session.id(), error = %e, "client WebSocket error");
                self.session.handle_client_closed(now);
            }
        }
    }

    /// Handles broker frames that can be had without waiting (already
    /// decoded, or readable on the socket now), so a burst costs one trip
    /// through `select!` rather than one per frame. Stops when the client's
    /// queue is full (backpressure) or after a fair share.
    fn drain_broker(&mut self, limit: usize) {
        for _ in 0..BROKER_BURST {
            if self.session.is_closed() || self.client_queue.len() >= limit {
                return;
            }
            let Some(b) = self.broker.as_mut() else {
                return;
            };
            // Cancel-safe: an unfinished read leaves its bytes in the decoder.
            let Some(item) = b.reader.next().now_or_never() else {
                return;
            };
            self.on_broker_item(item);
            self.run_actions();
        }
    }

    fn feed(&mut self, now: Instant, data: &[u8]) {
        self.session.handle_client_activity(now);
        self.decoder.extend(data);
        loop {
            match self.decoder.decode() {
                Ok(Some(Item::Frame(frame))) => {
                    self.session.handle_client_frame(now, frame);
                    // CONNECT fixes the escaping rules for what follows.
                    self.decoder.set_version(self.session.client_version());
                    if self.session.is_closed() {
                        break;
                    }
                }
                Ok(Some(Item::Heartbeat)) => {}
                Ok(None) => break,
                Err(e) => {
                    self.session.handle_client_decode_error(now, &e);
                    break;
                }
            }
        }
    }

    fn on_broker_item(&mut self, item: Result<Item, BrokerError>) {
        let now = Instant::now();
        match item {
            Ok(Item::Frame(frame)) => {
                self.session.handle_broker_frame(now, frame);
                let v = self.session.broker_version();
                if let Some(b) = self.broker.as_mut() {
                    b.reader.set_version(v);
                }
            }
            Ok(Item::Heartbeat) => self.session.handle_broker_activity(now),
            Err(e) => {
                if let Some(b) = self.broker.take() {
                    self.closing_brokers.push(b.writer);
                }
                self.broker_pending.clear();
                self.session.handle_broker_failed(now, &e.to_string());
            }
        }
    }

    fn on_broker_connected(&mut self, res: Result<(BrokerStream, String), BrokerError>) {
        let now = Instant::now();
        match res {
            Ok((stream, address)) => {
                let (read, write) = stream.into_split();
                let queue = Queue::new(self.client_queue.wake.clone());
                let (tx, rx) = mpsc::unbounded_channel();
                let writer = tokio::spawn(write_broker(write, rx, queue.clone()));
                let mut reader = FrameReader::new(read, self.shared.broker_limits);
                reader.set_version(self.session.broker_version());
                debug!(session = %self.session.id(), broker = %address, "broker connection open");
                self.broker_address = Some(address.clone());
                self.broker = Some(BrokerLeg {
                    reader,
                    tx,
                    queue,
                    writer,
                    address,
                });
                if let Some(connect) = self.connect_frame.take() {
                    relay_core::encode(
                        &connect,
                        self.session.broker_version(),
                        &mut self.broker_pending,
                    );
                }
            }
            Err(e) => {
                self.shared.metrics.broker_connect_failures.inc();
                self.session.handle_broker_failed(now, &e.to_string())
            }
        }
    }

    fn run_actions(&mut self) {
        while let Some(action) = self.session.poll_action() {
            match action {
                Action::ConnectBroker(connect) => {
                    self.connect_frame = Some(connect);
                    let addresses = self.shared.config.broker.addresses.clone();
                    let timeout =
                        Duration::from_millis(self.shared.config.broker.connect_timeout_ms);
                    let tls = self.shared.broker_tls.clone();
                    self.connecting = Some(Box::pin(async move {
                        broker::connect(&addresses, timeout, tls.as_deref()).await
                    }));
                }
                Action::ToBroker(frame) => {
                    if self.broker.is_some() {
                        // Encoded straight into the pending write.
                        let before = self.broker_pending.len();
                        relay_core::encode(
                            &frame,
                            self.session.broker_version(),
                            &mut self.broker_pending,
                        );
                        let len = self.broker_pending.len() - before;
                        self.shared.metrics.frames_client_to_broker.inc();
                        self.shared
                            .metrics
                            .bytes_client_to_broker
                            .inc_by(len as u64);
                    }
                }
                Action::BrokerHeartbeat => self.send_broker(HEARTBEAT),
                Action::ToClient(frame) => {
                    let bytes = encode_to_bytes(&frame, self.session.client_version());
                    self.shared.metrics.frames_broker_to_client.inc();
                    self.shared
                        .metrics
                        .bytes_broker_to_client
                        .inc_by(bytes.len() as u64);
                    self.send_client(bytes);
                }
                Action::ClientHeartbeat => self.send_client(Bytes::from_static(HEARTBEAT)),
                Action::CloseBroker => {
                    self.connecting = None;
                    self.connect_frame = None;
                    // What this turn queued (a DISCONNECT) goes first.
                    self.flush_broker();
                    if let Some(b) = self.broker.take() {
                        let _ = b.tx.send(BrokerOut::Close);
                        debug!(session = %self.session.id(), broker = %b.address, "closing broker connection");
                        self.closing_brokers.push(b.writer);
                    }
                }
                Action::Publish(publish) => self.publish(publish),
                Action::CloseClient(reason) => {
                    let _ = self
                        .client_tx
                        .send(ClientOut::Close(reason.ws_code(), close_text(&reason)));
                }
            }
        }
    }
    /// Publishes a client SEND to the application exchange; the session
    /// hears the confirm (or the refusal) through `handle_publish_result`.
    fn publish(&mut self, p: AppPublish) {
        // STOMP's `persistent:true` (RabbitMQ's own convention) becomes AMQP
        // delivery mode 2, so a durable backend queue keeps the message.
        let persistent = p
            .headers
            .iter()
            .any(|(k, v)| k == "persistent" && v.eq_ignore_ascii_case("true"));
        let mut headers = p.headers;
        headers.push(("stomp-session".into(), self.session.id().to_owned()));
        if let Some(user) = self.session.user() {
            headers.push(("stomp-user".into(), user.to_owned()));
        }
        headers.push(("stomp-destination".into(), p.destination));
        let msg = OutboundMessage {
            exchange: self.shared.config.app.exchange.clone(),
            routing_key: p.routing_key,
            headers,
            content_type: p.content_type,
            message_id: None,
            body: p.body,
            mandatory: true,
            persistent,
        };
        let control = self.shared.control.clone();
        let id = p.id;
        self.publishes
            .push(Box::pin(async move { (id, control.publish(msg).await) }));
    }

    /// Queues bytes for the broker; they go out with [`Driver::flush_broker`]
    /// at the end of the loop turn, coalesced into one write.
    fn send_broker(&mut self, bytes: &[u8]) {
        if self.broker.is_some() {
            self.broker_pending.extend_from_slice(bytes);
        }
    }

    /// Hands what this loop turn queued for the broker to its writer task.
    fn flush_broker(&mut self) {
        if self.broker_pending.is_empty() {
            return;
        }
        // `take` leaves no spare capacity behind on idle sessions.
        let bytes = std::mem::take(&mut self.broker_pending).freeze();
        if let Some(b) = &self.broker {
            b.queue.add(bytes.len());
            if b.tx.send(BrokerOut::Data(bytes)).is_err() {
                b.queue.fail();
            }
        }
    }

    fn send_client(&mut self, bytes: Bytes) {
        let len = bytes.len();
        let msg = ws_message(bytes, self.shared.message_type);
        self.client_queue.add(len);
        if self.client_tx.send(ClientOut::Message(msg, len)).is_err() {
            self.client_queue.fail();
        }
    }
}

/// A close reason fits in a control frame (123 bytes of UTF-8).
fn close_text(reason: &CloseReason) -> String {
    let mut s = reason.to_string();
    if s.len() > 123 {
        let mut cut = 123;
        while !s.is_char_boundary(cut) {
            cut -= 1;
        }
        s.truncate(cut);
    }
    s
}

/// Text when the frame is valid UTF-8 (unless binary is forced), binary
/// otherwise: a text message must be UTF-8, and browsers drop the socket
/// when it isn't.
pub fn ws_message(bytes: Bytes, mode: MessageType) -> Message {
    match mode {
        MessageType::Binary => Message::Binary(bytes),
        MessageType::Auto | MessageType::Text => {
            // Cloning `Bytes` only bumps a reference count.
            match Utf8Bytes::try_from(bytes.clone()) {
                Ok(t) => Message::Text(t),
                Err(_) => Message::Binary(bytes),
            }
        }
    }
}

async fn next_broker_item(broker: &mut Option<BrokerLeg>) -> Result<Item, BrokerError> {
    match broker.as_mut() {
        Some(b) => b.reader.next().await,
        None => std::future::pending().await,
    }
}

async fn poll_connect(
    connecting: &mut Option<ConnectFuture>,
) -> Result<(BrokerStream, String), BrokerError> {
    match connecting.as_mut() {
        Some(f) => f.await,
        None => std::future::pending().await,
    }
}

async fn sleep_until(deadline: Option<tokio::time::Instant>) {
    match deadline {
        Some(d) => tokio::time::sleep_until(d).await,
        None => std::future::pending().await,
    }
}

/// Writes queued messages to the client, flushing once per batch.
async fn write_client<T: ClientTransport>(
    mut sink: SplitSink<T, Message>,
    mut rx: mpsc::UnboundedReceiver<ClientOut>,
    queue: Arc<Queue>,
) {
    while let Some(first) = rx.recv().await {
        let mut batch = 0usize;
        let mut next = Some(first);
        while let Some(out) = next.take() {
            match out {
                ClientOut::Message(msg, len) => {
                    batch += len;
                    if sink.feed(msg).await.is_err() {
                        queue.fail();
                        return;
                    }
                }
                ClientOut::Close(code, reason) => {
                    let frame = CloseFrame {
                        code: CloseCode::from(code),
                        reason: reason.into(),
                    };
                    let _ = sink.send(Message::Close(Some(frame))).await;
                    queue.done(batch);
                    let _ = sink.close().await;
                    return;
                }
            }
            next = rx.try_recv().ok();
        }
        if sink.flush().await.is_err() {
            queue.fail();
            return;
        }
        queue.done(batch);
    }
    let _ = sink.close().await;
}

/// Writes queued bytes to the broker, coalescing what is ready into one write.
async fn write_broker(
    mut w: BrokerWriteHalf,
    mut rx: mpsc::UnboundedReceiver<BrokerOut>,
    queue: Arc<Queue>,
) {
    let mut buf = BytesMut::new();
    while let Some(first) = rx.recv().await {
        let mut close = false;
        let mut next = Some(first);
        while let Some(out) = next.take() {
            match out {
                BrokerOut::Data(b) => buf.extend_from_slice(&b),
                BrokerOut::Close => {
                    close = true;
                    break;
                }
            }
            next = rx.try_recv().ok();
        }
        if !buf.is_empty() {
            let n = buf.len();
            // flush: TLS may still hold encrypted records (no-op for TCP).
            if w.write_all(&buf).await.is_err() || w.flush().await.is_err() {
                queue.fail();
                return;
            }
            buf.clear();
            queue.done(n);
        }
        if close {
            break;
        }
    }
    let _ = w.shutdown().await;
}
