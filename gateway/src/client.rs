//! One task per client session: the I/O around [`relay_core::session::Session`].
//!
//! ```text
//!  client read ──decode──▶ Session ──to relay──▶ relay writer task ──▶ relay leg
//!  relay leg ──FrameReader──▶ Session ──to client──▶ client writer task ──▶ client
//!                            Session ──publish──▶ AMQP control plane (confirm back)
//! ```
//!
//! The client is any [`ClientTransport`] (a WebSocket, a SockJS session).
//! The relay leg is whatever [`crate::broker_side::BrokerSide`] hands out
//! (RabbitMQ over TCP or TLS, the embedded broker over an in-memory stream):
//! the driver only reads and writes STOMP on it.
//!
//! Backpressure: each writer task counts the bytes queued for it and not yet
//! flushed. While the client's count is over `session.outbound_buffer_bytes`
//! the task stops reading the broker connection (so a slow browser slows its
//! own broker leg, and RabbitMQ's flow control takes over), and stops reading
//! the client too. While the broker's count is over the limit it stops
//! reading the client. Every input produces a bounded amount of output, so
//! nothing grows without bound in either direction.

use crate::amqp::{OutboundMessage, PublishError, Sequence};
use crate::broker::{BrokerError, BrokerReadHalf, BrokerStream, BrokerWriteHalf, FrameReader};
use crate::broker_side::OpenLeg;
use crate::fanout::mapping;
use crate::metrics::{GaugeGuard, GaugeShare};
use crate::outlet::{ws_message, ClientOut, Outlet, Queue};
use crate::state::{SessionSlot, Shared};
use bytes::{Bytes, BytesMut};
use futures_util::stream::{FuturesUnordered, SplitSink, StreamExt};
use futures_util::{FutureExt, Sink, SinkExt, Stream};
use relay_core::codec::{encode_to_bytes, HEARTBEAT};
use relay_core::hub::SessionKey;
use relay_core::session::{Action, AppPublish, CloseReason, Session, ToClient, ToRelay, ToShared};
use relay_core::{Command, Decoder, Frame, Item, Version};
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, Notify};
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::CloseFrame;
use tokio_tungstenite::tungstenite::{Error as WsError, Message};
use tracing::{debug, info, warn};

/// Broker frames handled per wake-up before other work gets a turn.
const BROKER_BURST: usize = 64;
/// Client WebSocket messages handled per wake-up, likewise.
const CLIENT_BURST: usize = 64;

/// How long the writers get to flush the last frames after the session ended.
const FLUSH_TIMEOUT: Duration = Duration::from_secs(5);

enum BrokerOut {
    /// Bytes, and when the client frames in them were read and how many
    /// there are (for the relay latency).
    Data(Bytes, Option<(Instant, u32)>),
    Close,
}

struct BrokerLeg {
    reader: FrameReader<BrokerReadHalf>,
    tx: mpsc::UnboundedSender<BrokerOut>,
    queue: Arc<Queue>,
    writer: tokio::task::JoinHandle<()>,
    address: String,
    /// Counts this leg in `broker_links_up{link="session"}` while it lives.
    _up: GaugeGuard,
}

type PublishFuture = Pin<Box<dyn Future<Output = (u64, Result<(), PublishError>)> + Send>>;
type BindFuture = Pin<Box<dyn Future<Output = (String, Result<(), String>)> + Send>>;

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
    permit: crate::admission::Ticket,
    transport: &'static str,
) {
    let slot = SessionSlot::open(shared.health.clone(), permit);
    shared.metrics.sessions_opened.inc();
    let started = Instant::now();
    let _open = GaugeGuard::new(shared.metrics.sessions_open(transport));
    // The path serving this session's subscriptions: the embedded broker's
    // hub, or the relay leg, and the shared path for those it serves.
    let path = if shared.embedded.is_some() {
        "embedded"
    } else {
        "relay"
    };
    let mut subscriptions = GaugeShare::new(shared.metrics.subscriptions_open(path));
    let mut shared_subscriptions = GaugeShare::new(shared.metrics.subscriptions_open("shared"));
    info!(pod = %shared.pod, session = %id, %peer, subprotocol = subprotocol.map(|v| v.subprotocol()), "session opened");

    let wake = Arc::new(Notify::new());
    let (sink, mut stream) = ws.split();
    let client_queue = Queue::new(wake.clone());
    let (client_tx, client_rx) = mpsc::unbounded_channel();
    let client_writer = tokio::spawn(write_client(
        sink,
        client_rx,
        client_queue.clone(),
        shared.metrics.relay_broker_to_client_seconds.clone(),
    ));

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
        decode_paused: false,
        fanout_key: None,
        publish_key: rand::random(),
        last_publish: None,
        shared_binds: FuturesUnordered::new(),
        slow_seen: false,
        lost_seen: false,
        broker_pending: BytesMut::new(),
        pending_timing: None,
        client_read_at: None,
        broker_read_at: None,
        connect_read_at: None,
        broker_connect_started: None,
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
        let read_client = !client_full
            && !broker_full
            && d.session.inflight_publishes() < publish_gate
            && !d.session.holds_relay_frames();
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
                    // The broker queue's count grows only at flush: what
                    // this turn queued counts too, so one turn cannot take
                    // more than the budget plus one message.
                    let open = !d.session.is_closed()
                        && d.client_queue.len() < limit
                        && d.broker
                            .as_ref()
                            .is_none_or(|b| b.queue.len() + d.broker_pending.len() < limit)
                        && d.session.inflight_publishes() < publish_gate
                        && !d.session.holds_relay_frames();
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
                    Err(e) => {
                        shared.metrics.app_failed.inc();
                        if matches!(e, PublishError::Overloaded) {
                            shared.metrics.limit_hit("amqp.max_inflight_publishes");
                        }
                    }
                }
                d.session.handle_publish_result(Instant::now(), id, res.map_err(|e| e.to_string()));
            }
            Some((id, res)) = d.shared_binds.next(), if !d.shared_binds.is_empty() => {
                let now = Instant::now();
                match res {
                    Ok(()) => d.session.handle_shared_subscribed(now, &id),
                    Err(reason) => d.session.handle_shared_failed(now, &id, &reason),
                }
            }
            res = poll_connect(&mut d.connecting), if d.connecting.is_some() => {
                d.connecting = None;
                d.on_broker_connected(res);
            }
            _ = wake.notified() => {
                if d.client_queue.has_failed() {
                    d.session.handle_client_closed(Instant::now());
                }
                d.check_outlet();
                if d.broker.as_ref().is_some_and(|b| b.queue.has_failed()) {
                    d.broker = None;
                    d.broker_pending.clear();
                    d.pending_timing = None;
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
        d.resume_decoding();
        d.run_actions();
        d.flush_broker();
        let on_shared = d.session.shared_subscription_count();
        subscriptions.set(d.session.subscription_count().saturating_sub(on_shared));
        shared_subscriptions.set(on_shared);
    }
    d.flush_broker();
    drop(subscriptions);
    drop(shared_subscriptions);
    if let (Some(fanout), Some(key)) = (&shared.fanout, d.fanout_key.take()) {
        fanout.detach(key);
    }

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
    linger(&mut stream, client_writer).await;
    for w in writers {
        let _ = tokio::time::timeout(FLUSH_TIMEOUT, w).await;
    }
    drop(slot);
    let reason = session
        .close_reason()
        .cloned()
        .unwrap_or(CloseReason::ClientGone);
    if let CloseReason::AccessDenied(denial) = &reason {
        shared.metrics.denied(denial.command);
        warn!(
            pod = %shared.pod,
            session = %id,
            %peer,
            user = session.user().unwrap_or("-"),
            command = denial.command.as_str(),
            destination = %denial.destination,
            reason = %denial.reason,
            "access denied"
        );
    }
    shared.metrics.session_closed(&reason);
    if let Some(limit) = session.limit_hit() {
        shared.metrics.limit_hit(limit);
    }
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
    connecting: Option<OpenLeg>,
    connect_frame: Option<Frame>,
    closing_brokers: Vec<tokio::task::JoinHandle<()>>,
    broker_address: Option<String>,
    /// Application publishes awaiting their confirm.
    publishes: FuturesUnordered<PublishFuture>,
    /// Client bytes wait in the decoder for the relay leg (see
    /// [`Driver::decode`]).
    decode_paused: bool,
    /// This session in the shared fan-out, once it subscribed there.
    fanout_key: Option<SessionKey>,
    /// Picks this session's AMQP publish channel, and the previous
    /// publish's hand-off: its SENDs reach RabbitMQ in order.
    publish_key: u64,
    last_publish: Option<tokio::sync::oneshot::Receiver<()>>,
    /// Shared subscriptions waiting for their upstream binding.
    shared_binds: FuturesUnordered<BindFuture>,
    /// Whether the slow-consumer / upstream-loss verdicts were handled.
    slow_seen: bool,
    lost_seen: bool,
    /// Bytes for the broker queued during this loop turn.
    broker_pending: BytesMut,
    /// When the first client frame in `broker_pending` was read, and how
    /// many client frames it holds (relay latency).
    pending_timing: Option<(Instant, u32)>,
    /// When the client input being handled now was read.
    client_read_at: Option<Instant>,
    /// When the broker frame being handled now was read.
    broker_read_at: Option<Instant>,
    /// When the client's CONNECT was read (CONNECT-to-CONNECTED time).
    connect_read_at: Option<Instant>,
    /// When the session's broker connection attempt started.
    broker_connect_started: Option<Instant>,
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
                match websocket_violation(&e, self.shared.config.server.max_ws_message_size) {
                    Some((code, message, details, limit)) => self
                        .session
                        .handle_client_websocket_error(now, code, message, details, limit),
                    None => self.session.handle_client_closed(now),
                }
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
        self.client_read_at = Some(now);
        self.decode(now);
    }

    /// Decodes and handles what the client sent, until a frame has to wait
    /// for the relay leg to connect: the frames after it wait as bytes in
    /// the decoder (no more than the WebSocket message they came in, as the
    /// client is not read meanwhile) and [`Driver::resume_decoding`] goes on
    /// once the leg is up. So a burst sent right after CONNECTED never runs
    /// into `session.max_pending_frames`, and order is kept.
    fn decode(&mut self, now: Instant) {
        self.decode_paused = false;
        loop {
            if self.session.holds_relay_frames() {
                self.decode_paused = self.decoder.buffered() > 0;
                break;
            }
            match self.decoder.decode() {
                Ok(Some(Item::Frame(frame))) => {
                    self.shared.metrics.frames_received.inc(frame.command);
                    if matches!(frame.command, Command::Connect | Command::Stomp) {
                        self.connect_read_at.get_or_insert(now);
                        self.session
                            .set_broker_unavailable(self.broker_unavailable());
                    }
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
        // A half-sent frame starts the frame-completion clock (bytes held
        // back for the relay leg are whole frames, or were sent with them).
        self.session
            .handle_client_partial(now, !self.decode_paused && self.decoder.buffered() > 0);
    }

    /// Why RabbitMQ cannot be reached now, when the shared path serves this
    /// gateway and its upstream is down (a CONNECT then gets an ERROR at
    /// once, as when the relay leg opened at CONNECT cannot connect).
    fn broker_unavailable(&self) -> Option<String> {
        let fanout = self.shared.fanout.as_ref()?;
        let status = fanout.upstream();
        (!status.up).then(|| {
            status
                .last_error
                .unwrap_or_else(|| "the shared upstream is not connected to RabbitMQ yet".into())
        })
    }

    /// Goes on decoding what [`Driver::decode`] held back, once nothing
    /// waits for the relay leg any more.
    fn resume_decoding(&mut self) {
        if self.decode_paused && !self.session.holds_relay_frames() && !self.session.is_closed() {
            self.decode(Instant::now());
        }
    }

    fn on_broker_item(&mut self, item: Result<Item, BrokerError>) {
        let now = Instant::now();
        self.broker_read_at = Some(now);
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
                self.pending_timing = None;
                match e {
                    BrokerError::Decode(relay_core::DecodeError::FrameTooLarge { limit }) => {
                        self.session.handle_broker_frame_too_large(now, limit)
                    }
                    e => self.session.handle_broker_failed(now, &e.to_string()),
                }
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
                let writer = tokio::spawn(write_broker(
                    write,
                    rx,
                    queue.clone(),
                    self.shared.metrics.relay_client_to_broker_seconds.clone(),
                ));
                let mut reader = FrameReader::new(read, self.shared.broker_limits);
                reader.set_version(self.session.broker_version());
                debug!(session = %self.session.id(), broker = %address, "broker connection open");
                if let Some(started) = self.broker_connect_started.take() {
                    let took = started.elapsed();
                    self.shared.metrics.broker_connected(
                        crate::metrics::Link::Session,
                        took,
                        false,
                    );
                }
                self.broker_address = Some(address.clone());
                self.broker = Some(BrokerLeg {
                    reader,
                    tx,
                    queue,
                    writer,
                    address,
                    _up: GaugeGuard::new(self.shared.metrics.session_links_up.clone()),
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

    /// Hands each action the session emitted to the one that carries it out.
    fn run_actions(&mut self) {
        while let Some(action) = self.session.poll_action() {
            match action {
                Action::Client(a) => self.on_client_action(a),
                Action::Relay(a) => self.on_relay_action(a),
                Action::App(publish) => self.publish(publish),
                Action::Shared(a) => self.on_shared_action(a),
            }
        }
        // What the next actions answer was read later.
        self.client_read_at = None;
        self.broker_read_at = None;
    }

    fn on_client_action(&mut self, action: ToClient) {
        match action {
            ToClient::Frame(frame) => {
                self.shared.metrics.frames_sent.inc(frame.command);
                if frame.command == Command::Connected {
                    if let Some(read) = self.connect_read_at {
                        self.shared
                            .metrics
                            .stomp_connect_seconds
                            .observe(read.elapsed().as_secs_f64());
                    }
                }
                let bytes = encode_to_bytes(&frame, self.session.client_version());
                self.shared.metrics.frames_broker_to_client.inc();
                self.shared
                    .metrics
                    .bytes_broker_to_client
                    .inc_by(bytes.len() as u64);
                let read = self.broker_read_at;
                self.send_client_timed(bytes, read);
            }
            ToClient::Heartbeat => self.send_client(Bytes::from_static(HEARTBEAT)),
            ToClient::Close(reason) => {
                let _ = self
                    .client_tx
                    .send(ClientOut::Close(reason.ws_code(), close_text(&reason)));
            }
        }
    }

    fn on_relay_action(&mut self, action: ToRelay) {
        match action {
            ToRelay::Open(connect) => {
                self.connect_frame = Some(connect);
                self.broker_connect_started = Some(Instant::now());
                self.connecting = Some(self.shared.broker_side.open());
            }
            ToRelay::Frame(frame) => {
                if self.broker.is_some() {
                    // Encoded straight into the pending write.
                    let before = self.broker_pending.len();
                    relay_core::encode(
                        &frame,
                        self.session.broker_version(),
                        &mut self.broker_pending,
                    );
                    let len = self.broker_pending.len() - before;
                    if let Some(read) = self.client_read_at {
                        let t = self.pending_timing.get_or_insert((read, 0));
                        t.1 += 1;
                    }
                    self.shared.metrics.frames_client_to_broker.inc();
                    self.shared
                        .metrics
                        .bytes_client_to_broker
                        .inc_by(len as u64);
                }
            }
            ToRelay::Heartbeat => self.send_broker(HEARTBEAT),
            ToRelay::Close => {
                self.connecting = None;
                self.connect_frame = None;
                self.broker_connect_started = None;
                // What this turn queued (a DISCONNECT) goes first.
                self.flush_broker();
                if let Some(b) = self.broker.take() {
                    let _ = b.tx.send(BrokerOut::Close);
                    debug!(session = %self.session.id(), broker = %b.address, "closing broker connection");
                    self.closing_brokers.push(b.writer);
                }
            }
        }
    }

    /// Hands a shared subscription change to the pod's fan-out.
    fn on_shared_action(&mut self, action: ToShared) {
        let Some(fanout) = self.shared.fanout.clone() else {
            // The session core only emits these when the shared path is on.
            if let ToShared::Subscribe { id, .. } = action {
                let now = Instant::now();
                self.session.handle_shared_failed(
                    now,
                    &id,
                    "the shared path is off on this gateway",
                );
            }
            return;
        };
        match action {
            ToShared::Subscribe {
                id,
                key,
                destination,
            } => {
                let session = match self.fanout_key {
                    Some(k) => k,
                    None => {
                        let outlet = Outlet::new(
                            self.client_tx.clone(),
                            self.client_queue.clone(),
                            self.session.client_version(),
                            self.shared.message_type,
                        );
                        let k = fanout.attach(outlet);
                        self.fanout_key = Some(k);
                        k
                    }
                };
                self.shared_binds.push(Box::pin(async move {
                    let res = fanout.subscribe(session, &id, &key, &destination).await;
                    (id, res)
                }));
            }
            ToShared::Unsubscribe { id } => {
                if let Some(k) = self.fanout_key {
                    fanout.unsubscribe(k, &id);
                }
            }
        }
    }

    /// Acts on what the shared fan-out marked on this session's outlet: a
    /// slow consumer, or messages lost with the upstream.
    fn check_outlet(&mut self) {
        let now = Instant::now();
        if !self.slow_seen && self.client_queue.is_slow() {
            self.slow_seen = true;
            let hub = &self.shared.config.hub;
            let details = format!(
                "this session did not read its messages fast enough (more than {} bytes queued, \
                 or none written for {} ms: hub.max_queued_bytes, hub.max_queued_ms); \
                 reconnect and resubscribe",
                hub.max_queued_bytes, hub.max_queued_ms
            );
            if let (Some(fanout), Some(key)) = (&self.shared.fanout, self.fanout_key.take()) {
                fanout.detach(key);
            }
            self.session.handle_slow_consumer(now, &details);
        }
        if !self.lost_seen && self.client_queue.is_lost() {
            self.lost_seen = true;
            self.session.handle_shared_lost(
                now,
                "the gateway lost its connection to RabbitMQ: messages published meanwhile \
                 were not delivered (fanout.on_upstream_loss = \"close\"); reconnect and resubscribe",
            );
        }
    }

    /// Publishes a client SEND over AMQP: an application SEND to the
    /// application exchange, or a relayed SEND of a session with no relay
    /// leg to its exchange, mapped as RabbitMQ's STOMP plugin maps it. The
    /// session hears the confirm (or the refusal) through
    /// `handle_publish_result`.
    fn publish(&mut self, p: AppPublish) {
        let id = p.id;
        // Only `/app` SENDs are timed (`app_publish_confirm_duration_seconds`).
        let (msg, confirm) = match p.exchange {
            Some(exchange) => {
                let mut headers = p.headers;
                if let Some(ct) = p.content_type {
                    headers.insert(0, ("content-type".into(), ct));
                }
                let properties = match mapping::send_properties(&headers) {
                    Ok(props) => props,
                    Err(e) => {
                        let err = PublishError::Rejected(e.to_string());
                        self.publishes.push(Box::pin(async move { (id, Err(err)) }));
                        return;
                    }
                };
                let msg = OutboundMessage {
                    exchange,
                    routing_key: p.routing_key,
                    headers: Vec::new(),
                    content_type: None,
                    message_id: None,
                    body: p.body,
                    // A SEND to a topic nobody listens on is dropped, as the
                    // STOMP plugin does.
                    mandatory: false,
                    persistent: false,
                    properties: Some(properties),
                };
                (msg, None)
            }
            None => {
                // STOMP's `persistent:true` (RabbitMQ's own convention)
                // becomes AMQP delivery mode 2, so a durable backend queue
                // keeps the message.
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
                    properties: None,
                };
                (msg, Some(self.shared.metrics.app_confirm_seconds.clone()))
            }
        };
        let control = self.shared.control.clone();
        let seq = Sequence::next(self.publish_key, &mut self.last_publish);
        self.publishes.push(Box::pin(async move {
            let started = Instant::now();
            let result = control.publish_in(msg, seq).await;
            if let Some(confirm) = confirm {
                confirm.observe(started.elapsed().as_secs_f64());
            }
            (id, result)
        }));
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
        let timing = self.pending_timing.take();
        if let Some(b) = &self.broker {
            b.queue.add(bytes.len());
            if b.tx.send(BrokerOut::Data(bytes, timing)).is_err() {
                b.queue.fail();
            }
        }
    }

    fn send_client(&mut self, bytes: Bytes) {
        self.send_client_timed(bytes, None);
    }

    /// [`Driver::send_client`] for a frame caused by a broker frame read at
    /// `read` (its relay latency is observed once it is written).
    fn send_client_timed(&mut self, bytes: Bytes, read: Option<Instant>) {
        let len = bytes.len();
        let msg = ws_message(bytes, self.shared.message_type);
        self.client_queue.add(len);
        if self
            .client_tx
            .send(ClientOut::Message(msg, len, read))
            .is_err()
        {
            self.client_queue.fail();
        }
    }
}

/// A close reason fits in a control frame (123 bytes of UTF-8).
/// How long the gateway keeps reading (and dropping) what a client still
/// sends after its session ended, once the last frames are written.
const LINGER: Duration = Duration::from_secs(1);

/// Waits for the client writer to flush the last frames and the close frame
/// (at most [`FLUSH_TIMEOUT`]) while reading and dropping whatever the client
/// still sends, then keeps reading for up to [`LINGER`] or until the client
/// closes. Closing a socket with unread data makes the kernel send a reset,
/// which can destroy the ERROR and the close frame before the client reads
/// them; reading first lets the close handshake finish.
async fn linger<S>(stream: &mut S, writer: tokio::task::JoinHandle<()>)
where
    S: futures_util::Stream<Item = Result<Message, WsError>> + Unpin,
{
    let flush_deadline = tokio::time::Instant::now() + FLUSH_TIMEOUT;
    let mut writer = writer;
    let mut writer_done = false;
    let mut reading = true;
    let mut until = flush_deadline;
    loop {
        tokio::select! {
            _ = &mut writer, if !writer_done => {
                writer_done = true;
                until = tokio::time::Instant::now() + LINGER;
                if !reading {
                    return;
                }
            }
            m = stream.next(), if reading => {
                if !matches!(m, Some(Ok(_))) {
                    reading = false;
                    if writer_done {
                        return;
                    }
                }
            }
            () = tokio::time::sleep_until(until) => return,
        }
    }
}

/// The RFC 6455 close code, STOMP ERROR `message`, explanation and broken
/// setting for a WebSocket violation after which the gateway can still
/// write; `None` when the connection itself is gone.
fn websocket_violation(
    e: &WsError,
    max_message: usize,
) -> Option<(u16, &'static str, String, Option<&'static str>)> {
    use tokio_tungstenite::tungstenite::error::{CapacityError, ProtocolError};
    match e {
        WsError::Capacity(CapacityError::MessageTooLong { size, .. }) => Some((
            1009,
            "Limit exceeded: server.max_ws_message_size",
            format!(
                "a WebSocket message of {size} bytes or more is over the limit of {max_message} bytes"
            ),
            Some("server.max_ws_message_size"),
        )),
        WsError::Capacity(c) => Some((1009, "Message too big", c.to_string(), None)),
        WsError::Utf8(_) => Some((
            1007,
            "Invalid frame",
            "a text WebSocket message was not valid UTF-8 (send binary messages for other bytes)"
                .to_owned(),
            None,
        )),
        WsError::Protocol(
            p @ (ProtocolError::NonZeroReservedBits
            | ProtocolError::UnmaskedFrameFromClient
            | ProtocolError::FragmentedControlFrame
            | ProtocolError::ControlFrameTooBig
            | ProtocolError::UnknownControlFrameType(_)
            | ProtocolError::UnknownDataFrameType(_)
            | ProtocolError::UnexpectedContinueFrame
            | ProtocolError::ExpectedFragment(_)
            | ProtocolError::InvalidOpcode(_)
            | ProtocolError::InvalidCloseSequence),
        ) => Some((
            1002,
            "Invalid frame",
            format!("WebSocket protocol error: {p}"),
            None,
        )),
        _ => None,
    }
}

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

async fn next_broker_item(broker: &mut Option<BrokerLeg>) -> Result<Item, BrokerError> {
    match broker.as_mut() {
        Some(b) => b.reader.next().await,
        None => std::future::pending().await,
    }
}

async fn poll_connect(
    connecting: &mut Option<OpenLeg>,
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
    latency: prometheus::Histogram,
) {
    // When the broker frames in this batch were read (reused across batches).
    let mut read_times: Vec<Instant> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut batch = 0usize;
        let mut next = Some(first);
        while let Some(out) = next.take() {
            if !queue.keep(&out) {
                next = rx.try_recv().ok();
                continue;
            }
            match out {
                ClientOut::Message(msg, len, read) => {
                    batch += len;
                    read_times.extend(read);
                    if sink.feed(msg).await.is_err() {
                        queue.fail();
                        return;
                    }
                }
                ClientOut::Shared(msg, len) => {
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
        for read in read_times.drain(..) {
            latency.observe(read.elapsed().as_secs_f64());
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
    latency: prometheus::Histogram,
) {
    let mut buf = BytesMut::new();
    // When the client frames in this write were read, and how many.
    let mut read_times: Vec<(Instant, u32)> = Vec::new();
    while let Some(first) = rx.recv().await {
        let mut close = false;
        let mut next = Some(first);
        while let Some(out) = next.take() {
            match out {
                BrokerOut::Data(b, timing) => {
                    buf.extend_from_slice(&b);
                    read_times.extend(timing);
                }
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
            for (read, frames) in read_times.drain(..) {
                let seconds = read.elapsed().as_secs_f64();
                for _ in 0..frames {
                    latency.observe(seconds);
                }
            }
            queue.done(n);
        }
        if close {
            break;
        }
    }
    let _ = w.shutdown().await;
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    //! The driver against the embedded broker behind the broker seam: no
    //! RabbitMQ for the relay leg. (The AMQP control plane points at a port
    //! where nothing listens: it starts down and is not used.)
    use super::*;
    use crate::admission::Admission;
    use crate::broker_side::{BrokerSide, EmbeddedBrokerSide, TcpBrokerSide};
    use crate::config::Config;
    use crate::embedded::EmbeddedBroker;
    use crate::health::Health;
    use crate::metrics::Metrics;
    use crate::outlet::OutletLimits;
    use crate::settings::Settings;
    use relay_core::{Command, Limits};
    use tokio::io::DuplexStream;
    use tokio::sync::watch;
    use tokio::task::JoinHandle;
    use tokio_tungstenite::tungstenite::protocol::Role;
    use tokio_tungstenite::WebSocketStream;

    const WAIT: Duration = Duration::from_secs(10);

    struct Harness {
        client: WebSocketStream<DuplexStream>,
        decoder: Decoder,
        session: JoinHandle<()>,
        shared: Arc<Shared>,
        permits: Arc<Admission>,
        stop: watch::Sender<bool>,
    }

    fn embedded_broker() -> Arc<EmbeddedBroker> {
        EmbeddedBroker::new(
            OutletLimits {
                max_bytes: 1 << 20,
                max_wait: Duration::from_secs(10),
            },
            Limits::default(),
            prometheus::IntCounter::new("slow", "slow consumers").unwrap(),
        )
    }

    fn embedded() -> Arc<dyn BrokerSide> {
        Arc::new(EmbeddedBrokerSide(embedded_broker()))
    }

    /// One session of the driver with `broker_side` behind it, and a
    /// WebSocket client connected to it.
    async fn start(broker_side: Arc<dyn BrokerSide>) -> Harness {
        let mut config = Config::default();
        config.amqp.url = "amqp://guest:guest@127.0.0.1:1/%2f".into();
        config.amqp.connect_timeout_ms = 200;
        config.server.drain_period_ms = 0;
        let settings = Settings::build(Arc::new(config)).unwrap();
        let health = Arc::new(Health::new());
        let (stop, stopped) = watch::channel(false);
        let (_control_stop, control_stopped) = watch::channel(false);
        let metrics = Arc::new(Metrics::new("test").unwrap());
        let control = crate::amqp::ControlPlane::start(
            &settings,
            health.clone(),
            metrics.clone(),
            control_stopped,
        )
        .await
        .unwrap();
        let mut shared = Shared::new(
            &settings,
            health,
            control,
            metrics,
            stopped.clone(),
            stopped,
        );
        shared.broker_side = broker_side;
        let shared = Arc::new(shared);
        let permits = Admission::new(1, 0, 0, &[]);
        let permit = permits.admit_session().unwrap();
        let (ours, theirs) = tokio::io::duplex(64 * 1024);
        let server = WebSocketStream::from_raw_socket(ours, Role::Server, None).await;
        let client = WebSocketStream::from_raw_socket(theirs, Role::Client, None).await;
        let session = tokio::spawn(run(
            server,
            shared.clone(),
            "t1".into(),
            "127.0.0.1:9".parse().unwrap(),
            Some(Version::V1_2),
            permit,
            "websocket",
        ));
        Harness {
            client,
            decoder: Decoder::new(Limits::default()),
            session,
            shared,
            permits,
            stop,
        }
    }

    impl Harness {
        async fn send(&mut self, frame: Frame) {
            let bytes = encode_to_bytes(&frame, Version::V1_2);
            let text = String::from_utf8(bytes.to_vec()).unwrap();
            self.client.send(Message::text(text)).await.unwrap();
        }

        /// The next frame from the gateway (heart-beats skipped), or the
        /// close code when the connection closes instead.
        async fn next(&mut self) -> Result<Frame, Option<u16>> {
            loop {
                if let Some(item) = self.decoder.decode().unwrap() {
                    match item {
                        Item::Frame(f) => return Ok(f),
                        Item::Heartbeat => continue,
                    }
                }
                let msg = tokio::time::timeout(WAIT, self.client.next())
                    .await
                    .expect("the gateway answers in time");
                match msg {
                    Some(Ok(Message::Text(t))) => self.decoder.extend(t.as_bytes()),
                    Some(Ok(Message::Binary(b))) => self.decoder.extend(&b),
                    Some(Ok(Message::Close(c))) => return Err(c.map(|c| u16::from(c.code))),
                    Some(Ok(_)) => {}
                    Some(Err(_)) | None => return Err(None),
                }
            }
        }

        async fn frame(&mut self) -> Frame {
            self.next().await.expect("a frame")
        }

        async fn connect(&mut self) -> Frame {
            self.send(
                Frame::new(Command::Connect)
                    .with_header("accept-version", "1.2")
                    .with_header("host", "/")
                    .with_header("heart-beat", "0,0"),
            )
            .await;
            self.frame().await
        }

        /// Waits for the session task, then checks that it gave back its
        /// connection permit and its active-session count.
        async fn ended(self) {
            tokio::time::timeout(WAIT, self.session)
                .await
                .expect("the session ends")
                .unwrap();
            assert!(self.permits.admit_session().is_some(), "the slot is back");
            assert_eq!(self.shared.health.active_sessions(), 0);
        }
    }

    fn subscribe(id: &str, dest: &str) -> Frame {
        Frame::new(Command::Subscribe)
            .with_header("id", id)
            .with_header("destination", dest)
    }

    fn send_to(dest: &str, body: &str) -> Frame {
        Frame::new(Command::Send)
            .with_header("destination", dest)
            .with_body(body.as_bytes().to_vec())
    }

    #[tokio::test]
    async fn relays_through_an_in_memory_broker_with_receipts() {
        let mut h = start(embedded()).await;
        let connected = h.connect().await;
        assert_eq!(connected.command, Command::Connected, "{connected:?}");
        assert_eq!(connected.header("session"), Some("t1"));

        h.send(subscribe("s1", "/topic/driver").with_header("receipt", "sub"))
            .await;
        let r = h.frame().await;
        assert_eq!(r.header("receipt-id"), Some("sub"), "{r:?}");
        h.send(send_to("/topic/driver", "hello").with_header("receipt", "sent"))
            .await;
        let mut got = vec![h.frame().await, h.frame().await];
        got.sort_by_key(|f| f.command != Command::Message);
        assert_eq!(got[0].command, Command::Message, "{got:?}");
        assert_eq!(got[0].header("subscription"), Some("s1"));
        assert_eq!(&got[0].body[..], b"hello");
        assert_eq!(got[1].header("receipt-id"), Some("sent"), "{got:?}");

        h.send(Frame::new(Command::Disconnect).with_header("receipt", "bye"))
            .await;
        let r = h.frame().await;
        assert_eq!(r.command, Command::Receipt);
        assert_eq!(r.header("receipt-id"), Some("bye"));
        assert_eq!(h.next().await.err(), Some(Some(1000)));
        h.ended().await;
    }

    #[tokio::test]
    async fn a_broker_side_that_cannot_open_a_leg_gives_an_error() {
        // Nothing listens on port 1: the TCP broker side fails at once.
        let tcp = TcpBrokerSide::new(vec!["127.0.0.1:1".into()], Duration::from_secs(2), None);
        let mut h = start(Arc::new(tcp)).await;
        let err = h.connect().await;
        assert_eq!(err.command, Command::Error, "{err:?}");
        assert_eq!(err.header("message"), Some("broker unavailable"));
        assert_eq!(h.next().await.err(), Some(Some(1011)));
        h.ended().await;
    }

    #[tokio::test]
    async fn drain_answers_what_is_owed_then_closes_with_1001() {
        let mut h = start(embedded()).await;
        assert_eq!(h.connect().await.command, Command::Connected);
        h.send(subscribe("s1", "/queue/driver-drain")).await;
        h.send(send_to("/queue/driver-drain", "x").with_header("receipt", "owed"))
            .await;
        // The receipt is owed once the SEND is out; the drain starts now.
        h.stop.send(true).unwrap();
        let mut receipts = Vec::new();
        let error = loop {
            let f = h.frame().await;
            match f.command {
                Command::Receipt => receipts.push(f.header("receipt-id").unwrap().to_owned()),
                Command::Message => {}
                Command::Error => break f,
                other => panic!("unexpected {other}: {f:?}"),
            }
        };
        assert_eq!(receipts, ["owed"]);
        assert_eq!(error.header("message"), Some("server shutting down"));
        assert_eq!(h.next().await.err(), Some(Some(1001)));
        h.ended().await;
    }

    #[tokio::test]
    async fn the_client_going_away_closes_the_leg_and_frees_the_slot() {
        let broker = embedded_broker();
        let mut h = start(Arc::new(EmbeddedBrokerSide(broker.clone()))).await;
        assert_eq!(h.connect().await.command, Command::Connected);
        h.send(subscribe("s1", "/topic/driver-gone").with_header("receipt", "r"))
            .await;
        assert_eq!(h.frame().await.command, Command::Receipt);
        assert_eq!(broker.stats().subscriptions, 1);
        drop(h.client);
        tokio::time::timeout(WAIT, h.session)
            .await
            .unwrap()
            .unwrap();
        assert!(h.permits.admit_session().is_some(), "the slot is back");
        assert_eq!(h.shared.health.active_sessions(), 0);
        // The broker saw the leg close and forgot the subscription.
        let deadline = tokio::time::Instant::now() + WAIT;
        while broker.stats().subscriptions > 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "{:?}",
                broker.stats()
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }
}
