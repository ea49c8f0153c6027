//! The per-client relay session as a sans-IO state machine.
//!
//! The I/O driver feeds it what happened (a client frame, a broker frame, a
//! connection lost) together with the current time, and drains
//! [`Session::poll_action`] for what to do next, grouped by who does it
//! ([`Action`]): the client connection, the relay leg (open it, send this
//! frame, close it), the application publisher, the local hub. Timers are
//! exposed through [`Session::poll_timeout`] and fired with
//! [`Session::handle_timeout`], so tests drive everything on a fake clock.
//!
//! Life of a session:
//!
//! ```text
//! AwaitingConnect --CONNECT--> ConnectingBroker --relay CONNECTED--> Connected --DISCONNECT/drain--> Closing
//!        |            |              |  (client frames held, bounded)    |                              |
//!        |            +--(no relay leg at CONNECT)---------------------->+                              |
//!        +---------------------------+-----------------------------------+------------------------------+--> Closed
//! ```
//!
//! Legs: the client, the relay leg (this session's own broker connection),
//! the application publisher (AMQP with confirms) and the hub leg (the
//! process's local fan-out hub, fed by one shared AMQP upstream per pod). A
//! session can be CONNECTED with no relay leg
//! ([`SessionConfig::open_relay_at_connect`] false): the leg is opened when
//! the first frame that needs it arrives, and frames for it wait (bounded)
//! until it is connected. By default it is opened at CONNECT and CONNECTED
//! waits for it, as the relay always did.
//!
//! The hub leg ([`SessionConfig::shared`], [`Action::Shared`]) serves the
//! subscriptions that need no broker state of their own: `ack:auto`
//! SUBSCRIBEs to `/topic/…`, `/exchange/…` and user destinations without
//! per-session queue headers become hub subscriptions (their receipt comes
//! when the driver reports the upstream binding with
//! [`Session::handle_shared_subscribed`]), and while the relay leg was never
//! opened, SENDs to those destinations are published over AMQP like
//! application SENDs (with `AppPublish::exchange` set). Everything else
//! (client acks, queues, transactions, durable subscriptions) takes the
//! relay leg, opened lazily. A session that only publishes and subscribes
//! to topics then never opens a broker connection of its own.
//!
//! What the session still owes the client is kept across legs (`Owed`):
//! the confirms of AMQP SENDs (each answered with its receipt), the hub's
//! answers to pending shared SUBSCRIBEs (each answered with its receipt)
//! and, while closing, the relay leg's flush (a DISCONNECT with a receipt:
//! when its RECEIPT arrives, every earlier relayed frame was handled and its
//! receipt relayed). A DISCONNECT with a receipt, or a drain, completes
//! when nothing is owed on any leg, in whatever order the legs answer.
//!
//! The decision "which path serves this frame, and may this client use it"
//! is made in one place, [`crate::router::Router::route`], asked by
//! [`Session::route_client_frame`] for every SEND and SUBSCRIBE.

use crate::barrier::{ReceiptFor, SubscribeBarrier};
use crate::frame::{Command, Frame, Version};
use crate::heartbeat::{self, HeartBeat};
use crate::policy::Principal;
use crate::router::{self, Denial, Refusal, Route, Router};
use crate::DecodeError;
use bytes::Bytes;
use std::collections::{HashMap, HashSet, VecDeque};
use std::fmt;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Decides who a client is from its CONNECT frame.
pub trait Authenticate: Send + Sync + fmt::Debug {
    /// `Ok(Some(principal))`: authenticated as `principal.user`, with the
    /// claims authorization rules can test; `Ok(None)`: anonymous is
    /// allowed; `Err(reason)`: refused (the client gets an ERROR).
    fn authenticate(&self, connect: &Frame) -> Result<Option<Principal>, String>;
}

/// A client SEND to be published over AMQP with a confirm by the driver:
/// to an application destination, or to a relay destination served without
/// a relay leg (see [`AppPublish::exchange`]).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AppPublish {
    /// Correlates [`Session::handle_publish_result`].
    pub id: u64,
    /// `None`: the application exchange (an `/app` SEND; `routing_key` is
    /// the destination without its prefix, `/` turned into `.`).
    /// `Some(x)`: a relay SEND served without a relay leg, published to
    /// exchange `x` with `routing_key` (`/topic/k` → `amq.topic`, `k`;
    /// `/exchange/x/k` → `x`, `k`), mapped the way RabbitMQ's STOMP plugin
    /// maps a SEND ([`router::amqp_target`]).
    pub exchange: Option<String>,
    /// The routing key (see [`AppPublish::exchange`]).
    pub routing_key: String,
    /// The destination as the client sent it (for a user destination, the
    /// router's `/exchange/<user exchange>/<escaped user>.<rest>`).
    pub destination: String,
    /// `content-type` of the SEND, if any.
    pub content_type: Option<String>,
    /// The client's own headers (STOMP protocol headers and anything that
    /// could pass for identity, `stomp-*` and `user-id`, removed).
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

/// Which relay destinations the shared path (the local hub and the pod's
/// shared AMQP upstream) serves; all false = none, every subscription on
/// the session's relay leg.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SharedPaths {
    /// `/topic/…`
    pub topic: bool,
    /// `/exchange/<x>/<pattern>`
    pub exchange: bool,
    /// User destinations (`/user/…`, on the user exchange).
    pub user: bool,
}

/// Settings of one session; shared by all sessions of a process.
#[derive(Debug, Clone)]
pub struct SessionConfig {
    /// Heart-beats offered on the client leg (gateway → client send, and
    /// wanted from the client). A side that is 0 mirrors the client's wish,
    /// as RabbitMQ does (see [`heartbeat::mirror`]); the default is `0,0`.
    pub client_heartbeat: HeartBeat,
    /// Lower bound of every non-zero client-leg heart-beat interval (ms).
    pub client_heartbeat_min_ms: u64,
    /// A frame the client started must be complete within this time (the
    /// only thing that bounds a half-sent frame when heart-beats are off).
    pub frame_timeout: Duration,
    /// Open transactions per session (`session.max_transactions`).
    pub max_transactions: usize,
    /// Bytes of SEND bodies and headers inside one open transaction, which
    /// RabbitMQ holds in memory until COMMIT (`session.max_transaction_bytes`).
    pub max_transaction_bytes: usize,
    /// Sustained SENDs per second per session (token bucket refill rate;
    /// 0 = unlimited) (`session.max_sends_per_sec`).
    pub max_sends_per_sec: u32,
    /// Token bucket size: SENDs a session may make in a burst
    /// (`session.send_burst`).
    pub send_burst: u32,
    /// Heart-beats asked for on the broker leg.
    pub broker_heartbeat: HeartBeat,
    /// The client must send CONNECT within this time.
    pub connect_timeout: Duration,
    /// The broker must answer CONNECT (or a DISCONNECT receipt) within this time.
    pub broker_timeout: Duration,
    /// Active subscriptions per session.
    pub max_subscriptions: usize,
    /// Client frames held while the broker connection opens.
    pub max_pending_frames: usize,
    /// Login and passcode sent to the broker instead of the client's.
    pub broker_login: String,
    pub broker_passcode: String,
    /// Sent as the broker CONNECT `host` header.
    pub virtual_host: String,
    /// Which path serves a destination, and who may use it (also holds
    /// whether the control plane serves application and user destinations,
    /// the user exchange and `user.client_send_enabled`).
    pub router: Router,
    /// The `server` header of CONNECTED.
    pub server_name: String,
    /// Application publishes awaiting a broker confirm, per session.
    pub max_inflight_publishes: usize,
    /// Open the relay leg at CONNECT and answer CONNECTED once it is
    /// connected (true, the default), or answer CONNECTED at once and open
    /// the relay leg when the first frame needs it (false).
    pub open_relay_at_connect: bool,
    /// Which `ack:auto` subscriptions the local hub serves instead of the
    /// relay leg (and which SENDs go over AMQP while there is no relay
    /// leg); the default serves none.
    pub shared: SharedPaths,
    /// Decides who the client is; `None` means everyone is anonymous.
    pub authenticator: Option<Arc<dyn Authenticate>>,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            client_heartbeat: HeartBeat::new(0, 0),
            client_heartbeat_min_ms: 1_000,
            frame_timeout: Duration::from_secs(30),
            max_transactions: 8,
            max_transaction_bytes: 1024 * 1024,
            max_sends_per_sec: 50_000,
            send_burst: 50_000,
            broker_heartbeat: HeartBeat::new(10_000, 10_000),
            connect_timeout: Duration::from_secs(10),
            broker_timeout: Duration::from_secs(10),
            max_subscriptions: 1_000,
            max_pending_frames: 64,
            broker_login: "guest".into(),
            broker_passcode: "guest".into(),
            virtual_host: "/".into(),
            router: Router::default(),
            server_name: concat!("stomp-gateway/", env!("CARGO_PKG_VERSION")).into(),
            max_inflight_publishes: 256,
            open_relay_at_connect: true,
            shared: SharedPaths::default(),
            authenticator: None,
        }
    }
}

/// What the driver must do, grouped by who carries it out: the client
/// connection, the relay leg (this session's own broker connection), the
/// application publisher or the local hub; the driver hands each group to
/// the one that carries it out.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// For the client connection.
    Client(ToClient),
    /// For the relay leg.
    Relay(ToRelay),
    /// For the application publisher: publish (to the application exchange,
    /// or to [`AppPublish::exchange`]) with a publisher confirm, then call
    /// [`Session::handle_publish_result`].
    App(AppPublish),
    /// For the local hub (the shared path).
    Shared(ToShared),
}

/// What the local hub must do for this session.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToShared {
    /// Add subscription `id` on hub key `key` (the resolved destination:
    /// `/topic/x`, `/exchange/x/p`, or for a user destination the router's
    /// `/exchange/<user exchange>/<escaped user>.<rest>`). `destination` is
    /// what the client subscribed to (MESSAGE frames carry it for a user
    /// destination). When the upstream binding is in place the driver calls
    /// [`Session::handle_shared_subscribed`]; when it cannot be made,
    /// [`Session::handle_shared_failed`].
    Subscribe {
        id: String,
        key: String,
        destination: String,
    },
    /// Remove subscription `id` from the hub (synchronous; nothing comes back).
    Unsubscribe { id: String },
}

/// What the client connection must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToClient {
    /// Send a frame (encode with [`Session::client_version`]).
    Frame(Frame),
    /// Send a heart-beat EOL.
    Heartbeat,
    /// Close once what was queued before is written.
    Close(CloseReason),
}

/// What the relay leg must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ToRelay {
    /// Open the leg (see the gateway's broker side) and send this CONNECT
    /// on it first; its CONNECTED comes back through
    /// [`Session::handle_broker_frame`].
    Open(Frame),
    /// Send a frame (encode with [`Session::broker_version`]).
    Frame(Frame),
    /// Send a heart-beat EOL.
    Heartbeat,
    /// Close once what was queued before is written.
    Close,
}

/// Why a session ended; one line in the log, and the WebSocket close code.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum CloseReason {
    /// The client sent DISCONNECT.
    ClientDisconnect,
    /// The client's connection went away.
    ClientGone,
    /// The client broke the protocol.
    ClientError(String),
    /// The client broke a configured limit (WebSocket close 1008, policy).
    Policy(String),
    /// The client broke the WebSocket protocol itself; `code` is the close
    /// code RFC 6455 gives the condition (1002, 1007, 1009).
    WebSocket { code: u16, message: String },
    /// Authorization refused a frame (see [`crate::router`]).
    AccessDenied(Denial),
    /// No CONNECT in time.
    ConnectTimeout,
    /// The client stopped sending heart-beats.
    ClientHeartbeatTimeout,
    /// The broker sent an ERROR frame.
    BrokerError(String),
    /// The broker connection failed, was refused or went silent.
    BrokerLost(String),
    /// The client did not read its messages fast enough (WebSocket close
    /// 1008); see [`Session::handle_slow_consumer`].
    SlowConsumer(String),
    /// The gateway is shutting down.
    Shutdown,
}

impl CloseReason {
    /// The WebSocket close code for this reason (RFC 6455, 7.4.1).
    pub fn ws_code(&self) -> u16 {
        match self {
            CloseReason::ClientDisconnect | CloseReason::ClientGone => 1000,
            CloseReason::Shutdown => 1001,
            CloseReason::AccessDenied(_) => 1008,
            CloseReason::ClientError(_)
            | CloseReason::ConnectTimeout
            | CloseReason::ClientHeartbeatTimeout => 1002,
            CloseReason::BrokerError(_) | CloseReason::BrokerLost(_) => 1011,
            CloseReason::Policy(_) | CloseReason::SlowConsumer(_) => 1008,
            CloseReason::WebSocket { code, .. } => *code,
        }
    }
}

impl fmt::Display for CloseReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            CloseReason::ClientDisconnect => f.write_str("client sent DISCONNECT"),
            CloseReason::ClientGone => f.write_str("client connection closed"),
            CloseReason::ClientError(m) => write!(f, "client error: {m}"),
            CloseReason::Policy(m) => write!(f, "client refused: {m}"),
            CloseReason::WebSocket { code, message } => {
                write!(f, "client WebSocket error {code}: {message}")
            }
            CloseReason::AccessDenied(d) => write!(f, "access denied: {d}"),
            CloseReason::ConnectTimeout => f.write_str("no CONNECT frame in time"),
            CloseReason::ClientHeartbeatTimeout => f.write_str("client heart-beat timeout"),
            CloseReason::BrokerError(m) => write!(f, "broker error: {m}"),
            CloseReason::BrokerLost(m) => write!(f, "broker connection lost: {m}"),
            CloseReason::SlowConsumer(m) => write!(f, "slow consumer: {m}"),
            CloseReason::Shutdown => f.write_str("gateway shutting down"),
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum State {
    AwaitingConnect,
    /// CONNECT received, the relay leg opened with it: CONNECTED waits for
    /// the leg's CONNECTED.
    ConnectingBroker,
    Connected,
    /// DISCONNECT or drain: waiting until nothing is owed to the client,
    /// then the client gets what the closing promised and is closed.
    Closing(Closing),
    Closed,
}

/// Why the session is closing.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Closing {
    /// The client sent DISCONNECT (with this receipt, if any).
    Disconnect { receipt: Option<String> },
    /// The gateway is draining: ERROR `server shutting down`, close 1001.
    Drain,
}

/// The relay leg: this session's own broker connection.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Relay {
    /// None open (not yet needed, or closed after its flush).
    Absent,
    /// Opened; its CONNECTED has not come yet.
    Opening,
    Open,
}

/// What the session still owes the client, across its legs.
#[derive(Debug, Default)]
struct Owed {
    /// AMQP publishes awaiting a confirm: id → receipt to send.
    publishes: HashMap<u64, Option<String>>,
    /// Shared SUBSCRIBEs awaiting the hub's answer: subscription id → its
    /// receipts.
    shared_subscribes: HashMap<String, SharedReceipt>,
    /// The receipt of the DISCONNECT that flushes the relay leg, until its
    /// RECEIPT arrives.
    relay_flush: Option<String>,
}

impl Owed {
    fn settled(&self) -> bool {
        self.publishes.is_empty() && self.shared_subscribes.is_empty() && self.relay_flush.is_none()
    }
}

/// The receipts of a shared SUBSCRIBE awaiting its binding.
#[derive(Debug)]
struct SharedReceipt {
    /// The receipt the barrier waits for (the client's, or the gateway's own).
    barrier: String,
    /// The client's receipt, if it asked for one.
    client: Option<String>,
}

/// One client session. See the module docs.
#[derive(Debug)]
pub struct Session {
    config: std::sync::Arc<SessionConfig>,
    id: String,
    state: State,
    /// Version negotiated with the client (escaping rules on the client leg).
    client_version: Version,
    /// Version the broker answered with.
    broker_version: Version,
    actions: VecDeque<Action>,
    pending: VecDeque<Frame>,
    /// See [`Session::set_broker_unavailable`].
    broker_unavailable: Option<String>,
    subscriptions: HashSet<String>,
    close_reason: Option<CloseReason>,
    /// Timer base for CONNECT / broker answer deadlines.
    phase_started: Instant,
    client_send: Option<Duration>,
    client_receive: Option<Duration>,
    broker_send: Option<Duration>,
    broker_receive: Option<Duration>,
    last_client_rx: Instant,
    last_client_tx: Instant,
    last_broker_rx: Instant,
    last_broker_tx: Instant,
    client_heartbeat: HeartBeat,
    /// Who the client is (no user when anonymous).
    principal: Principal,
    /// Subscription id → destination the client asked for, for user
    /// destinations on the relay leg (rewritten back on MESSAGE).
    user_subscriptions: HashMap<String, String>,
    /// Subscriptions on the shared path: id → destination the client asked
    /// for (the rest of `subscriptions` is on the relay leg).
    shared: HashMap<String, String>,
    /// What the session still owes the client, across legs.
    owed: Owed,
    next_publish_id: u64,
    /// The relay leg.
    relay: Relay,
    /// When the relay leg was opened (its CONNECTED deadline).
    relay_since: Instant,
    /// The CONNECT for the relay leg, built at CONNECT, until the leg opens.
    relay_connect: Option<Frame>,
    /// Frames for the relay leg while it opens after CONNECTED (bounded by
    /// `max_pending_frames`).
    relay_queue: VecDeque<Frame>,
    /// Open transactions: name → bytes sent inside it so far.
    transactions: HashMap<String, usize>,
    /// SEND token bucket: tokens left at `tokens_at`.
    tokens: f64,
    tokens_at: Instant,
    /// Since when the client has a partly received frame.
    partial_since: Option<Instant>,
    /// The limit that ended the session, if one did (for the metric).
    limit_hit: Option<&'static str>,
    /// Application SENDs held until the SUBSCRIBEs before them took effect.
    barrier: SubscribeBarrier<Frame>,
}

impl Session {
    /// A new session whose client connection opened at `now`.
    pub fn new(
        config: std::sync::Arc<SessionConfig>,
        id: impl Into<String>,
        now: Instant,
    ) -> Session {
        let burst = f64::from(config.send_burst);
        let barrier = SubscribeBarrier::new(config.broker_timeout);
        Session {
            config,
            id: id.into(),
            state: State::AwaitingConnect,
            client_version: Version::V1_2,
            broker_version: Version::V1_2,
            actions: VecDeque::new(),
            pending: VecDeque::new(),
            broker_unavailable: None,
            subscriptions: HashSet::new(),
            close_reason: None,
            phase_started: now,
            client_send: None,
            client_receive: None,
            broker_send: None,
            broker_receive: None,
            last_client_rx: now,
            last_client_tx: now,
            last_broker_rx: now,
            last_broker_tx: now,
            client_heartbeat: HeartBeat::default(),
            principal: Principal::default(),
            user_subscriptions: HashMap::new(),
            shared: HashMap::new(),
            owed: Owed::default(),
            next_publish_id: 1,
            relay: Relay::Absent,
            relay_since: now,
            relay_connect: None,
            relay_queue: VecDeque::new(),
            transactions: HashMap::new(),
            tokens: burst,
            tokens_at: now,
            partial_since: None,
            limit_hit: None,
            barrier,
        }
    }

    /// The limit whose breach ended this session (its setting name, e.g.
    /// `session.max_transactions`), if one did. The driver counts it in
    /// `stomp_gateway_limit_hits_total`.
    pub fn limit_hit(&self) -> Option<&'static str> {
        self.limit_hit
    }

    /// Open transactions.
    pub fn transaction_count(&self) -> usize {
        self.transactions.len()
    }

    /// The driver says whether the client's decoder holds a partly received
    /// frame after the last input; one that stays incomplete longer than
    /// `frame_timeout` ends the session.
    pub fn handle_client_partial(&mut self, now: Instant, partial: bool) {
        match (partial, self.partial_since) {
            (true, None) => self.partial_since = Some(now),
            (false, _) => self.partial_since = None,
            (true, Some(_)) => {}
        }
    }

    /// The authenticated user, if the client authenticated.
    pub fn user(&self) -> Option<&str> {
        self.principal.user.as_deref()
    }

    /// The name user destinations resolve with: the authenticated user, or
    /// a per-session identity for anonymous clients (as in Spring).
    pub fn principal(&self) -> String {
        match &self.principal.user {
            Some(u) => u.clone(),
            None => format!("session-{}", self.id),
        }
    }

    /// Application publishes awaiting a broker confirm.
    pub fn inflight_publishes(&self) -> usize {
        self.owed.publishes.len()
    }

    /// The broker confirmed (`Ok`) or refused (`Err(reason)`) publish `id`.
    pub fn handle_publish_result(&mut self, now: Instant, id: u64, result: Result<(), String>) {
        let Some(receipt) = self.owed.publishes.remove(&id) else {
            return;
        };
        if self.state == State::Closed {
            return;
        }
        match result {
            Ok(()) => {
                if let Some(r) = receipt {
                    self.emit_client(
                        now,
                        Frame::new(Command::Receipt).with_header("receipt-id", r),
                    );
                }
                self.close_if_settled(now);
            }
            Err(reason) => self.client_error(now, "message not delivered", reason),
        }
    }

    /// The session id (sent to the client in CONNECTED `session`).
    pub fn id(&self) -> &str {
        &self.id
    }

    /// Escaping rules for frames to and from the client.
    pub fn client_version(&self) -> Version {
        self.client_version
    }

    /// Escaping rules for frames to and from the broker.
    pub fn broker_version(&self) -> Version {
        self.broker_version
    }

    /// True once CONNECTED was sent to the client and the session is relaying.
    pub fn is_connected(&self) -> bool {
        matches!(self.state, State::Connected | State::Closing(_))
    }

    /// True once the session has ended; the driver stops after flushing.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// Why the session ended, once it has.
    pub fn close_reason(&self) -> Option<&CloseReason> {
        self.close_reason.as_ref()
    }

    /// Active subscriptions, on both paths.
    pub fn subscription_count(&self) -> usize {
        self.subscriptions.len()
    }

    /// Whether client frames wait for the relay leg to connect (at most
    /// `max_pending_frames`): the driver stops reading the client until it
    /// has, so a burst sent right after CONNECTED waits in the socket, not
    /// against that limit.
    pub fn holds_relay_frames(&self) -> bool {
        !self.relay_queue.is_empty() || !self.pending.is_empty()
    }

    /// Number of this session's subscriptions on the shared path (the rest
    /// of [`Session::subscription_count`] is on the relay leg).
    pub fn shared_subscription_count(&self) -> usize {
        self.shared.len()
    }

    // ----- inputs from the hub ------------------------------------------

    /// The hub answered: subscription `id`'s binding is in place. Sends its
    /// receipt (the client's, or releases the barrier's hold as a broker
    /// RECEIPT for it would). Ignored for an unknown or already
    /// unsubscribed id.
    pub fn handle_shared_subscribed(&mut self, now: Instant, id: &str) {
        if matches!(self.state, State::Closed | State::AwaitingConnect) {
            return;
        }
        let Some(pending) = self.owed.shared_subscribes.remove(id) else {
            return;
        };
        self.shared_receipt(now, pending);
        self.close_if_settled(now);
    }

    /// The binding for subscription `id` cannot be made (RabbitMQ refused
    /// it, e.g. no such exchange, or the upstream is down): ERROR
    /// `shared subscription failed` naming the destination and the reason,
    /// then close as [`CloseReason::BrokerError`] (1011), also while
    /// closing. Ignored for an unknown or already unsubscribed id.
    pub fn handle_shared_failed(&mut self, now: Instant, id: &str, reason: &str) {
        if matches!(self.state, State::Closed | State::AwaitingConnect) {
            return;
        }
        let Some(destination) = self.shared.get(id) else {
            return;
        };
        let details =
            format!("the subscription {id:?} to {destination} could not be set up: {reason}");
        self.shared_failure(now, details, reason);
    }

    /// The session did not read its messages fast enough: ERROR with
    /// `message:slow consumer` and body `details`, then close with
    /// [`CloseReason::SlowConsumer`] (1008). Closes the relay leg too if any.
    pub fn handle_slow_consumer(&mut self, now: Instant, details: &str) {
        if self.state == State::Closed {
            return;
        }
        self.emit_client(now, Frame::error("slow consumer", details));
        self.close_broker_leg();
        self.finish(CloseReason::SlowConsumer(details.to_owned()), true);
    }

    /// The shared upstream lost messages for this session's subscriptions
    /// and the configured gap policy is "close": ERROR `shared subscription
    /// interrupted` (body `details`, telling the client to reconnect and
    /// resubscribe), close as [`CloseReason::BrokerLost`] (1011). No-op if
    /// the session has no shared subscription.
    pub fn handle_shared_lost(&mut self, now: Instant, details: &str) {
        if self.state == State::Closed || self.shared.is_empty() {
            return;
        }
        self.emit_client(
            now,
            Frame::error("shared subscription interrupted", details),
        );
        self.close_broker_leg();
        self.finish(
            CloseReason::BrokerLost(format!("shared subscription interrupted: {details}")),
            true,
        );
    }

    /// Negotiated client-leg heart-beats (send, receive).
    pub fn client_heartbeats(&self) -> (Option<Duration>, Option<Duration>) {
        (self.client_send, self.client_receive)
    }

    /// Negotiated broker-leg heart-beats (send, receive).
    pub fn broker_heartbeats(&self) -> (Option<Duration>, Option<Duration>) {
        (self.broker_send, self.broker_receive)
    }

    /// The next thing to do, if any.
    pub fn poll_action(&mut self) -> Option<Action> {
        self.actions.pop_front()
    }

    // ----- inputs from the client ---------------------------------------

    /// Bytes (a frame or a heart-beat) arrived from the client.
    pub fn handle_client_activity(&mut self, now: Instant) {
        self.last_client_rx = now;
    }

    /// A complete frame arrived from the client.
    pub fn handle_client_frame(&mut self, now: Instant, frame: Frame) {
        self.last_client_rx = now;
        match self.state {
            State::AwaitingConnect => self.on_connect(now, frame),
            State::ConnectingBroker => {
                if matches!(frame.command, Command::Connect | Command::Stomp) {
                    return self.client_error(
                        now,
                        "Illegal command",
                        "already connected: CONNECT may be sent only once",
                    );
                }
                if self.pending.len() >= self.config.max_pending_frames {
                    return self.too_many_held_frames(now);
                }
                self.pending.push_back(frame);
            }
            State::Connected => self.route_client_frame(now, frame),
            State::Closing(_) | State::Closed => {}
        }
    }

    /// The client's bytes could not be decoded.
    pub fn handle_client_decode_error(&mut self, now: Instant, error: &DecodeError) {
        if self.state == State::Closed {
            return;
        }
        let limit = match error {
            DecodeError::FrameTooLarge { .. } => Some("session.max_frame_size"),
            DecodeError::TooManyHeaders { .. } => Some("session.max_header_count"),
            DecodeError::HeaderLineTooLong { .. } => Some("session.max_header_line"),
            _ => None,
        };
        if let Some(limit) = limit {
            return self.limit_error(now, limit, error.to_string());
        }
        // RabbitMQ's words for the condition, ours in the body.
        let message = match error {
            DecodeError::UnknownCommand(_) => "Bad command",
            DecodeError::MissingNul => "Invalid frame",
            _ => "Invalid header",
        };
        self.client_error(now, message, error.to_string());
    }

    /// The client broke the WebSocket protocol (`code`: 1002, 1007 or 1009)
    /// in a way that still lets the gateway write: the client gets an ERROR
    /// (`message`, `details`), then a close frame with `code`. `limit` names
    /// the setting when a size limit was broken.
    pub fn handle_client_websocket_error(
        &mut self,
        now: Instant,
        code: u16,
        message: &str,
        details: impl Into<String>,
        limit: Option<&'static str>,
    ) {
        if self.state == State::Closed {
            return;
        }
        if limit.is_some() {
            self.limit_hit = limit;
        }
        self.emit_client(now, Frame::error(message, details));
        self.close_broker_leg();
        self.finish(
            CloseReason::WebSocket {
                code,
                message: message.to_owned(),
            },
            true,
        );
    }

    /// The client connection went away (closed, reset or failed).
    pub fn handle_client_closed(&mut self, _now: Instant) {
        if self.state != State::Closed {
            self.close_broker_leg();
            self.finish(CloseReason::ClientGone, false);
        }
    }

    /// The gateway is shutting down: tell the client and close both legs.
    pub fn handle_shutdown(&mut self, now: Instant) {
        if self.state == State::Closed {
            return;
        }
        self.emit_client(
            now,
            Frame::error(
                "server shutting down",
                "the gateway is restarting; reconnect to continue",
            ),
        );
        self.close_broker_leg();
        self.finish(CloseReason::Shutdown, true);
    }

    /// The gateway is draining (SIGTERM): finish what the client is owed
    /// (confirms of application publishes, receipts of relayed frames), then
    /// send an ERROR saying the server is restarting and close with 1001 so
    /// the client reconnects elsewhere. Client frames that arrive once the
    /// drain started are dropped unanswered (no receipt).
    pub fn handle_drain(&mut self, now: Instant) {
        match self.state {
            State::Closed | State::Closing(_) => {}
            State::AwaitingConnect | State::ConnectingBroker => self.handle_shutdown(now),
            State::Connected => {
                let flush = format!("stomp-gateway-drain-{}", self.id);
                self.start_closing(now, Closing::Drain, Some(flush));
            }
        }
    }

    /// Enters `Closing`: with `flush`, a relay leg gets a DISCONNECT with
    /// that receipt (what it owes is settled when the RECEIPT comes back);
    /// then the session closes as soon as nothing is owed on any leg.
    fn start_closing(&mut self, now: Instant, closing: Closing, flush: Option<String>) {
        self.state = State::Closing(closing);
        self.phase_started = now;
        if let Some(receipt) = flush {
            if self.relay != Relay::Absent {
                self.emit_broker(
                    now,
                    Frame::new(Command::Disconnect).with_header("receipt", receipt.clone()),
                );
                self.owed.relay_flush = Some(receipt);
            }
        }
        self.close_if_settled(now);
    }

    /// Completes a closing once nothing is owed to the client on any leg.
    fn close_if_settled(&mut self, now: Instant) {
        let State::Closing(closing) = &self.state else {
            return;
        };
        // Held application SENDs are owed too: they go out first.
        if !self.owed.settled() || self.barrier.held() > 0 {
            return;
        }
        match closing.clone() {
            Closing::Disconnect { receipt } => {
                self.close_broker_leg();
                if let Some(r) = receipt {
                    self.emit_client(
                        now,
                        Frame::new(Command::Receipt).with_header("receipt-id", r),
                    );
                }
                self.finish(CloseReason::ClientDisconnect, true);
            }
            Closing::Drain => self.handle_shutdown(now),
        }
    }

    // ----- inputs from the broker ---------------------------------------

    /// Bytes arrived from the broker.
    pub fn handle_broker_activity(&mut self, now: Instant) {
        self.last_broker_rx = now;
    }

    /// A frame arrived from the broker.
    pub fn handle_broker_frame(&mut self, now: Instant, frame: Frame) {
        self.last_broker_rx = now;
        let live = !matches!(self.state, State::Closed | State::AwaitingConnect);
        if live && frame.command == Command::Receipt && self.subscribe_receipt(now, &frame) {
            return;
        }
        match (&self.state, frame.command) {
            (State::Closed, _) | (State::AwaitingConnect, _) => {}
            (_, Command::Connected) if self.relay == Relay::Opening => {
                self.on_relay_connected(now, frame)
            }
            (_, Command::Error) if self.is_late_unsubscribe_error(&frame) => {
                // RabbitMQ's STOMP plugin reports a delivery that crossed an
                // UNSUBSCRIBE this way and keeps the connection open: not
                // the client's business, and no reason to end the session.
            }
            (_, Command::Error) => {
                let message = frame.header("message").unwrap_or("(no message)").to_owned();
                self.emit_client(now, frame);
                self.relay = Relay::Absent;
                self.actions.push_back(Action::Relay(ToRelay::Close));
                self.finish(CloseReason::BrokerError(message), true);
            }
            (State::Connected | State::Closing(_), Command::Message) => {
                let frame = self.rewrite_user_message(frame);
                self.emit_client(now, frame)
            }
            (State::Connected | State::Closing(_), Command::Receipt) => {
                let id = frame.header("receipt-id");
                if id.is_some() && id == self.owed.relay_flush.as_deref() {
                    // The relay leg handled everything: it owes nothing more.
                    self.owed.relay_flush = None;
                    self.relay = Relay::Absent;
                    self.actions.push_back(Action::Relay(ToRelay::Close));
                    self.close_if_settled(now);
                } else {
                    self.emit_client(now, frame);
                }
            }
            // Anything else from the broker (a second CONNECTED, a client
            // command) has no meaning for the client; drop it.
            _ => {}
        }
    }

    /// The broker sent a frame larger than the gateway's broker-side frame
    /// limit (`broker.max_frame_size`, `limit` bytes). The broker is fine;
    /// the client is told exactly that, and the session ends (the frame
    /// cannot be skipped without reading it).
    pub fn handle_broker_frame_too_large(&mut self, now: Instant, limit: usize) {
        if matches!(self.state, State::Closed | State::AwaitingConnect) {
            return;
        }
        self.limit_hit = Some("broker.max_frame_size");
        let message = "Limit exceeded: broker.max_frame_size";
        self.emit_client(
            now,
            Frame::error(
                message,
                format!(
                    "the broker delivered a frame larger than {limit} bytes \
                     (broker.max_frame_size), which this gateway does not relay; the broker \
                     connection is healthy, the message is too large for this gateway"
                ),
            ),
        );
        self.relay = Relay::Absent;
        self.actions.push_back(Action::Relay(ToRelay::Close));
        self.finish(CloseReason::BrokerError(message.to_owned()), true);
    }

    /// The broker connection could not be opened, or was lost.
    /// Whether the driver knows the broker cannot be reached now (`Some`
    /// with why): a CONNECT that would not open the relay leg at once (the
    /// shared path) is then answered as a failed relay leg would be, with
    /// ERROR `broker unavailable` and a close, instead of a CONNECTED the
    /// session could do nothing with. Set it before handing over CONNECT.
    pub fn set_broker_unavailable(&mut self, why: Option<String>) {
        self.broker_unavailable = why;
    }

    pub fn handle_broker_failed(&mut self, now: Instant, reason: &str) {
        if self.relay == Relay::Absent {
            // No leg (or one closed after its flush): nothing to lose.
            return;
        }
        match self.state {
            State::Closed => {}
            State::AwaitingConnect => {}
            _ => {
                self.emit_client(
                    now,
                    Frame::error(
                        "broker unavailable",
                        format!("the connection to the message broker failed: {reason}"),
                    ),
                );
                self.relay = Relay::Absent;
                self.actions.push_back(Action::Relay(ToRelay::Close));
                self.finish(CloseReason::BrokerLost(reason.to_owned()), true);
            }
        }
    }

    // ----- time ---------------------------------------------------------

    /// The earliest time [`Session::handle_timeout`] must be called.
    pub fn poll_timeout(&self) -> Option<Instant> {
        let mut next: Option<Instant> = None;
        let mut consider = |t: Instant| {
            next = Some(match next {
                Some(n) if n <= t => n,
                _ => t,
            })
        };
        match self.state {
            State::Closed => return None,
            State::AwaitingConnect => consider(self.phase_started + self.config.connect_timeout),
            State::ConnectingBroker => consider(self.phase_started + self.config.broker_timeout),
            State::Closing(_) if self.closing_deadline_applies() => {
                consider(self.phase_started + self.config.broker_timeout)
            }
            State::Closing(_) | State::Connected => {}
        }
        if self.is_connected() {
            if let Some(t) = self.barrier.deadline() {
                consider(t);
            }
        }
        if self.relay == Relay::Opening && self.state != State::ConnectingBroker {
            consider(self.relay_since + self.config.broker_timeout);
        }
        if let Some(t) = self.partial_since {
            consider(t + self.config.frame_timeout);
        }
        if self.is_connected() {
            if let Some(i) = self.client_send {
                consider(self.last_client_tx + i);
            }
            if let Some(i) = self.client_receive.filter(|_| !self.holds_relay_frames()) {
                consider(self.last_client_rx + heartbeat::receive_deadline(i));
            }
        }
        if self.is_connected() && self.relay == Relay::Open {
            if let Some(i) = self.broker_send {
                consider(self.last_broker_tx + i);
            }
            if let Some(i) = self.broker_receive {
                consider(self.last_broker_rx + heartbeat::receive_deadline(i));
            }
        }
        next
    }

    /// Fires every timer due at `now`.
    pub fn handle_timeout(&mut self, now: Instant) {
        if self.state == State::Closed {
            return;
        }
        if let Some(t) = self.partial_since {
            if now >= t + self.config.frame_timeout {
                let ms = self.config.frame_timeout.as_millis();
                return self.limit_error(
                    now,
                    "session.frame_timeout_ms",
                    format!("a frame was started and not completed within {ms} ms"),
                );
            }
        }
        match self.state {
            State::Closed => return,
            State::AwaitingConnect => {
                if now >= self.phase_started + self.config.connect_timeout {
                    let ms = self.config.connect_timeout.as_millis();
                    self.emit_client(
                        now,
                        Frame::error(
                            "no CONNECT frame received",
                            format!("a CONNECT frame must arrive within {ms} ms"),
                        ),
                    );
                    self.finish(CloseReason::ConnectTimeout, true);
                }
                return;
            }
            State::ConnectingBroker => {
                if now >= self.phase_started + self.config.broker_timeout {
                    let ms = self.config.broker_timeout.as_millis();
                    self.handle_broker_failed(
                        now,
                        &format!("no CONNECTED from the broker within {ms} ms"),
                    );
                }
                return;
            }
            State::Closing(_) => {
                if self.closing_deadline_applies()
                    && now >= self.phase_started + self.config.broker_timeout
                {
                    let ms = self.config.broker_timeout.as_millis();
                    if self.state == State::Closing(Closing::Drain) {
                        // Not confirmed in time: close anyway; the client
                        // resends what it has no receipt for.
                        self.handle_shutdown(now);
                    } else if self.owed.relay_flush.is_some() {
                        self.handle_broker_failed(
                            now,
                            &format!("no RECEIPT for DISCONNECT within {ms} ms"),
                        );
                    } else {
                        // Only the hub still owes: a binding never answered.
                        let mut ids: Vec<&String> = self.owed.shared_subscribes.keys().collect();
                        ids.sort_unstable();
                        let ids = ids
                            .iter()
                            .map(|id| format!("{id:?}"))
                            .collect::<Vec<_>>()
                            .join(", ");
                        let reason = format!("no answer from the shared upstream within {ms} ms");
                        let details = format!("the subscriptions {ids} were not set up: {reason}");
                        self.shared_failure(now, details, &reason);
                    }
                    return;
                }
            }
            State::Connected => {}
        }
        if self.is_connected() && self.barrier.deadline().is_some_and(|t| now >= t) {
            // The broker is slow to confirm a SUBSCRIBE: stop holding the
            // SENDs behind it.
            self.barrier.expire(now);
            self.release_held(now);
            if !self.is_connected() {
                return;
            }
        }
        if self.relay == Relay::Opening
            && self.state != State::ConnectingBroker
            && now >= self.relay_since + self.config.broker_timeout
        {
            let ms = self.config.broker_timeout.as_millis();
            self.handle_broker_failed(now, &format!("no CONNECTED from the broker within {ms} ms"));
            return;
        }
        // While frames wait for the relay leg the driver does not read the
        // client (see `holds_relay_frames`): its silence is ours.
        if let Some(i) = self.client_receive.filter(|_| !self.holds_relay_frames()) {
            if now >= self.last_client_rx + heartbeat::receive_deadline(i) {
                let ms = i.as_millis();
                self.emit_client(
                    now,
                    Frame::error(
                        "heart-beat timeout",
                        format!(
                            "nothing received from the client for over {} ms (negotiated {ms} ms)",
                            ms * 2
                        ),
                    ),
                );
                self.close_broker_leg();
                self.finish(CloseReason::ClientHeartbeatTimeout, true);
                return;
            }
        }
        let relay_open = self.relay == Relay::Open;
        if let Some(i) = self.broker_receive.filter(|_| relay_open) {
            if now >= self.last_broker_rx + heartbeat::receive_deadline(i) {
                let ms = i.as_millis() * 2;
                self.handle_broker_failed(
                    now,
                    &format!("no heart-beat from the broker for over {ms} ms"),
                );
                return;
            }
        }
        if let Some(i) = self.client_send {
            if now >= self.last_client_tx + i {
                self.actions.push_back(Action::Client(ToClient::Heartbeat));
                self.last_client_tx = now;
            }
        }
        if let Some(i) = self.broker_send.filter(|_| relay_open) {
            if now >= self.last_broker_tx + i {
                self.actions.push_back(Action::Relay(ToRelay::Heartbeat));
                self.last_broker_tx = now;
            }
        }
    }

    // ----- internals ----------------------------------------------------

    fn on_connect(&mut self, now: Instant, frame: Frame) {
        if !matches!(frame.command, Command::Connect | Command::Stomp) {
            let cmd = frame.command;
            return self.client_error(
                now,
                "Illegal command",
                format!("You must log in using CONNECT first: expected a CONNECT frame, the first frame must be CONNECT or STOMP, not {cmd}"),
            );
        }
        let version = match negotiate_version(frame.header("accept-version")) {
            Some(v) => v,
            None => {
                let asked = frame.header("accept-version").unwrap_or("").to_owned();
                self.emit_client(
                    now,
                    Frame::error(
                        "Version mismatch",
                        format!(
                            "Supported versions are 1.0,1.1,1.2 (unsupported STOMP version: the client accepts {asked:?})"
                        ),
                    )
                    .with_header("version", "1.0,1.1,1.2"),
                );
                return self.finish(CloseReason::ClientError("Version mismatch".into()), true);
            }
        };
        self.client_version = version;
        self.broker_version = version;
        let client_hb = match HeartBeat::parse(frame.header("heart-beat")) {
            Ok(hb) => hb,
            Err(e) => return self.client_error(now, "Invalid header", e.to_string()),
        };
        self.client_heartbeat = client_hb;
        if let Some(auth) = self.config.authenticator.clone() {
            match auth.authenticate(&frame) {
                Ok(principal) => self.principal = principal.unwrap_or_default(),
                Err(reason) => return self.client_error(now, "authentication failed", reason),
            }
        }
        let connect = Frame::new(Command::Connect)
            .with_header("accept-version", version.as_str())
            .with_header("host", self.config.virtual_host.clone())
            .with_header("login", self.config.broker_login.clone())
            .with_header("passcode", self.config.broker_passcode.clone())
            .with_header("heart-beat", self.config.broker_heartbeat.header_value());
        self.relay_connect = Some(connect);
        if self.config.open_relay_at_connect {
            self.state = State::ConnectingBroker;
            self.phase_started = now;
            self.open_relay(now);
        } else if let Some(why) = self.broker_unavailable.take() {
            self.emit_client(
                now,
                Frame::error(
                    "broker unavailable",
                    format!("the connection to the message broker failed: {why}"),
                ),
            );
            self.finish(CloseReason::BrokerLost(why), true);
        } else {
            self.answer_connected(now);
        }
    }

    /// Opens the relay leg with the CONNECT built at CONNECT.
    fn open_relay(&mut self, now: Instant) {
        let Some(connect) = self.relay_connect.take() else {
            return;
        };
        self.relay = Relay::Opening;
        self.relay_since = now;
        self.last_broker_tx = now;
        self.last_broker_rx = now;
        self.actions
            .push_back(Action::Relay(ToRelay::Open(connect)));
    }

    fn on_relay_connected(&mut self, now: Instant, frame: Frame) {
        if let Some(v) = frame.header("version").and_then(Version::parse) {
            self.broker_version = v;
        } else {
            // A broker that omits `version` speaks 1.0.
            self.broker_version = Version::V1_0;
        }
        let broker_hb = HeartBeat::parse(frame.header("heart-beat")).unwrap_or_default();
        let b = heartbeat::negotiate(self.config.broker_heartbeat, broker_hb);
        self.broker_send = b.send;
        self.broker_receive = b.receive;
        self.relay = Relay::Open;
        if self.state == State::ConnectingBroker {
            self.answer_connected(now);
        } else if !self.relay_queue.is_empty() {
            // The client was not read while its frames waited for the leg.
            self.last_client_rx = now;
        }
        while let Some(f) = self.relay_queue.pop_front() {
            if self.relay != Relay::Open {
                break;
            }
            self.emit_broker(now, f);
        }
        self.relay_queue.clear();
    }

    /// CONNECTED to the client, then the frames held until it.
    fn answer_connected(&mut self, now: Instant) {
        // 1.0 has no heart-beats; RabbitMQ still says `heart-beat:0,0`.
        let mut ours = HeartBeat::default();
        if self.client_version >= Version::V1_1 {
            ours = heartbeat::mirror(
                self.config.client_heartbeat,
                self.client_heartbeat,
                self.config.client_heartbeat_min_ms,
            );
            let c = heartbeat::negotiate(ours, self.client_heartbeat);
            self.client_send = c.send;
            self.client_receive = c.receive;
        }
        self.state = State::Connected;
        self.last_client_rx = now;
        // RabbitMQ's header order, for tools that expect it.
        let mut connected = Frame::new(Command::Connected)
            .with_header("server", self.config.server_name.clone())
            .with_header("session", self.id.clone())
            .with_header("heart-beat", ours.header_value())
            .with_header("version", self.client_version.as_str());
        if let Some(user) = &self.principal.user {
            connected = connected.with_header("user-name", user.clone());
        }
        self.emit_client(now, connected);
        while let Some(f) = self.pending.pop_front() {
            if self.state != State::Connected {
                break;
            }
            self.route_client_frame(now, f);
        }
        self.pending.clear();
    }

    /// The single place that decides which path serves a client frame.
    fn route_client_frame(&mut self, now: Instant, frame: Frame) {
        match frame.command {
            Command::Send => {
                if frame.header("destination").is_none() {
                    return self.client_error(
                        now,
                        "Missing destination",
                        "\"SEND\" must include a 'destination' header (SEND frame has no destination header)",
                    );
                }
                if !self.take_send_token(now) {
                    let rate = self.config.max_sends_per_sec;
                    let burst = self.config.send_burst;
                    return self.limit_error(
                        now,
                        "session.max_sends_per_sec",
                        format!(
                            "more than {rate} SENDs per second (bursts of {burst}) on one session"
                        ),
                    );
                }
                if let Some(tx) = frame.header("transaction") {
                    let size = frame_size(&frame);
                    if let Some(used) = self.transactions.get_mut(tx) {
                        *used = used.saturating_add(size);
                        if *used > self.config.max_transaction_bytes {
                            let limit = self.config.max_transaction_bytes;
                            return self.limit_error(
                                now,
                                "session.max_transaction_bytes",
                                format!(
                                    "transaction {tx:?} holds more than {limit} bytes of SENDs; COMMIT or ABORT sooner"
                                ),
                            );
                        }
                    }
                }
                match self
                    .config
                    .router
                    .route(&self.principal, &self.principal(), &frame)
                {
                    Ok(Route::App { .. }) => self.hold_or_publish(now, frame),
                    Ok(route) => {
                        let mut frame = frame;
                        if let Route::User { destination } = &route {
                            frame.set_header("destination", destination.clone());
                        }
                        router::strip_identity_headers(&mut frame);
                        if self.sends_without_relay(&route, &frame) {
                            // Over AMQP like an application SEND; the
                            // resolved destination picks the target again.
                            self.hold_or_publish(now, frame)
                        } else {
                            self.emit_broker(now, frame)
                        }
                    }
                    Err(refusal) => self.refuse(now, refusal),
                }
            }
            Command::Subscribe => self.on_subscribe(now, frame),
            Command::Unsubscribe => self.on_unsubscribe(now, frame),
            Command::Begin => self.on_begin(now, frame),
            Command::Commit | Command::Abort => {
                if let Some(tx) = frame.header("transaction") {
                    self.transactions.remove(tx);
                }
                self.emit_broker(now, frame)
            }
            Command::Ack | Command::Nack => self.emit_broker(now, frame),
            Command::Disconnect => {
                // With a receipt the relay leg is flushed with it, so the
                // RECEIPT comes once every leg settled what it owes.
                let receipt = frame.header("receipt").map(str::to_owned);
                let closing = Closing::Disconnect {
                    receipt: receipt.clone(),
                };
                self.start_closing(now, closing, receipt);
            }
            Command::Connect | Command::Stomp => self.client_error(
                now,
                "Illegal command",
                "already connected: CONNECT may be sent only once",
            ),
            Command::Connected | Command::Message | Command::Receipt | Command::Error => {
                let cmd = frame.command;
                self.client_error(
                    now,
                    "Bad command",
                    format!("clients may not send {cmd} frames"),
                )
            }
        }
    }

    fn on_subscribe(&mut self, now: Instant, mut frame: Frame) {
        let Some(dest) = frame.header("destination").map(str::to_owned) else {
            return self.client_error(
                now,
                "Missing destination",
                "\"SUBSCRIBE\" must include a 'destination' header (SUBSCRIBE frame has no destination header)",
            );
        };
        let key = match (frame.header("id"), self.client_version) {
            (Some(id), _) => id.to_owned(),
            // STOMP 1.0 makes `id` optional; the destination names the subscription.
            (None, Version::V1_0) => dest.clone(),
            (None, _) => {
                return self.client_error(
                    now,
                    "Missing header",
                    "SUBSCRIBE frame has no id header (required since STOMP 1.1)",
                )
            }
        };
        if self.subscriptions.contains(&key) {
            return self.client_error(
                now,
                "Duplicated subscription identifier",
                format!("A subscription identified by '{key}' already exists (subscription id {key:?} is already in use)."),
            );
        }
        if self.subscriptions.len() >= self.config.max_subscriptions {
            let limit = self.config.max_subscriptions;
            return self.limit_error(
                now,
                "session.max_subscriptions",
                format!("too many subscriptions (limit {limit} per session)"),
            );
        }
        let route = match self
            .config
            .router
            .route(&self.principal, &self.principal(), &frame)
        {
            Ok(route) => route,
            Err(refusal) => return self.refuse(now, refusal),
        };
        let resolved = match &route {
            Route::User { destination } => destination.clone(),
            _ => dest.clone(),
        };
        if self.shared_serves(&route, &resolved) && subscribes_without_own_queue(&frame) {
            let receipt = frame.header("receipt").map(str::to_owned);
            return self.subscribe_shared(now, key, resolved, dest, receipt);
        }
        if let Route::User { destination } = route {
            // `/user/queue/x` becomes this session's own auto-delete
            // queue bound to the user exchange with the user's key.
            frame.set_header("destination", destination);
            self.user_subscriptions.insert(key.clone(), dest);
        }
        self.subscriptions.insert(key);
        if self.config.router.control_plane() {
            // Application SENDs after this wait for its receipt.
            let receipt = self.barrier.subscribe(now, frame.header("receipt"));
            frame.set_header("receipt", receipt);
        }
        self.emit_broker(now, frame);
    }

    /// Whether the shared path is configured to serve the (resolved)
    /// `destination` of an allowed frame on `route`, and can (the STOMP
    /// plugin's reading of it names an exchange).
    fn shared_serves(&self, route: &Route, destination: &str) -> bool {
        let paths = self.config.shared;
        let on = match route {
            Route::Relay => {
                (paths.topic && destination.starts_with("/topic/"))
                    || (paths.exchange && destination.starts_with("/exchange/"))
            }
            Route::User { .. } => paths.user && destination.starts_with("/exchange/"),
            _ => false,
        };
        on && router::amqp_target(destination).is_some()
    }

    /// Whether a relay SEND (destination resolved, identity headers
    /// stripped) is published over AMQP instead: the shared path serves its
    /// destination, it is outside a transaction, and this session never
    /// opened a relay leg (so nothing sent on one could be overtaken).
    fn sends_without_relay(&self, route: &Route, frame: &Frame) -> bool {
        frame.header("transaction").is_none()
            && self.relay == Relay::Absent
            && self.relay_connect.is_some()
            && self.relay_queue.is_empty()
            && self.shared_serves(route, frame.header("destination").unwrap_or_default())
    }

    /// A SUBSCRIBE the hub serves: the hub gets subscription `id` on `key`;
    /// its receipt waits for the binding (and application SENDs after it
    /// wait too, as behind a relayed SUBSCRIBE).
    fn subscribe_shared(
        &mut self,
        now: Instant,
        id: String,
        key: String,
        destination: String,
        client_receipt: Option<String>,
    ) {
        self.subscriptions.insert(id.clone());
        self.shared.insert(id.clone(), destination.clone());
        // Taken whatever the control plane: a SEND published over AMQP
        // without a relay leg must not overtake the binding either.
        let barrier = self.barrier.subscribe(now, client_receipt.as_deref());
        self.owed.shared_subscribes.insert(
            id.clone(),
            SharedReceipt {
                barrier,
                client: client_receipt,
            },
        );
        self.actions.push_back(Action::Shared(ToShared::Subscribe {
            id,
            key,
            destination,
        }));
    }

    /// A shared SUBSCRIBE is settled: its receipt goes through the barrier
    /// as a broker RECEIPT would (releasing the SENDs it held), or straight
    /// to the client when the barrier stopped waiting for it.
    fn shared_receipt(&mut self, now: Instant, pending: SharedReceipt) {
        let receipt = Frame::new(Command::Receipt).with_header("receipt-id", pending.barrier);
        if !self.subscribe_receipt(now, &receipt) {
            if let Some(r) = pending.client {
                self.emit_client(
                    now,
                    Frame::new(Command::Receipt).with_header("receipt-id", r),
                );
            }
        }
    }

    /// ERROR `shared subscription failed` (body `details`), close both legs
    /// as [`CloseReason::BrokerError`].
    fn shared_failure(&mut self, now: Instant, details: String, reason: &str) {
        self.emit_client(now, Frame::error("shared subscription failed", details));
        self.close_broker_leg();
        self.finish(
            CloseReason::BrokerError(format!("shared subscription failed: {reason}")),
            true,
        );
    }

    /// An application SEND goes out now, or waits behind the SUBSCRIBEs
    /// sent before it (see [`crate::barrier`]), at most
    /// `max_pending_frames` of them.
    fn hold_or_publish(&mut self, now: Instant, frame: Frame) {
        if !self.barrier.must_hold() {
            return self.on_app_send(now, frame);
        }
        if self.barrier.held() >= self.config.max_pending_frames {
            let limit = self.config.max_pending_frames;
            return self.client_error(
                now,
                "too many application messages waiting for a subscription",
                format!(
                    "at most {limit} SENDs are held until the broker confirms the SUBSCRIBEs before them"
                ),
            );
        }
        self.barrier.hold(frame);
    }

    /// A RECEIPT from the broker: true when it was for a SUBSCRIBE the
    /// barrier waited for and the gateway's own (not relayed). Releases the
    /// application SENDs it held back.
    fn subscribe_receipt(&mut self, now: Instant, frame: &Frame) -> bool {
        let kind = match frame.header("receipt-id") {
            Some(id) => self.barrier.on_receipt(id),
            None => ReceiptFor::Other,
        };
        if kind == ReceiptFor::Other {
            return false;
        }
        if kind == ReceiptFor::ClientSubscribe {
            self.emit_client(now, frame.clone());
        }
        self.release_held(now);
        true
    }

    /// Publishes the held application SENDs that may go now.
    fn release_held(&mut self, now: Instant) {
        while matches!(self.state, State::Connected | State::Closing(_)) {
            let Some(frame) = self.barrier.release() else {
                break;
            };
            self.on_app_send(now, frame);
        }
        self.close_if_settled(now);
    }

    fn on_unsubscribe(&mut self, now: Instant, frame: Frame) {
        let key = match (
            frame.header("id"),
            frame.header("destination"),
            self.client_version,
        ) {
            (Some(id), _, _) => id.to_owned(),
            (None, Some(dest), Version::V1_0) => dest.to_owned(),
            _ => {
                return self.client_error(
                    now,
                    "Missing header",
                    "UNSUBSCRIBE frame has no id header",
                )
            }
        };
        if self.subscriptions.remove(&key) {
            if self.shared.remove(&key).is_some() {
                // Never to the relay leg: the hub removes it at once. A
                // binding still pending owes nothing more: its SUBSCRIBE is
                // answered first.
                if let Some(pending) = self.owed.shared_subscribes.remove(&key) {
                    self.shared_receipt(now, pending);
                    if self.state != State::Connected {
                        return;
                    }
                }
                self.actions
                    .push_back(Action::Shared(ToShared::Unsubscribe { id: key }));
                if let Some(receipt) = frame.header("receipt") {
                    let r = Frame::new(Command::Receipt).with_header("receipt-id", receipt);
                    self.emit_client(now, r);
                }
                return;
            }
            self.user_subscriptions.remove(&key);
            self.emit_broker(now, frame);
        } else if let Some(receipt) = frame.header("receipt") {
            // Never forwarded: RabbitMQ closes the connection on an unknown
            // id. The client still gets its receipt; there is nothing to undo.
            let r = Frame::new(Command::Receipt).with_header("receipt-id", receipt);
            self.emit_client(now, r);
        }
    }

    /// Publishes a SEND over AMQP: an application SEND, or a relay SEND
    /// served without a relay leg (its destination already resolved).
    fn on_app_send(&mut self, now: Instant, frame: Frame) {
        let dest = frame.header("destination").unwrap_or_default().to_owned();
        // Routed (and allowed) by the router before it was held; the
        // destination alone says which kind it is.
        let (exchange, routing_key) = match self.config.router.app_routing_key(&dest) {
            Some(key) => (None, key),
            None => match router::amqp_target(&dest) {
                Some((exchange, key)) => (Some(exchange), key),
                None => (None, String::new()),
            },
        };
        if exchange.is_none() && frame.header("transaction").is_some() {
            return self.client_error(
                now,
                "transactions are not supported for application destinations",
                format!("SEND to {dest} carried a transaction header"),
            );
        }
        if self.owed.publishes.len() >= self.config.max_inflight_publishes {
            let limit = self.config.max_inflight_publishes;
            return self.limit_error(
                now,
                "app.max_inflight_per_session",
                format!("too many unconfirmed application messages (limit {limit}); wait for receipts before sending more"),
            );
        }
        let id = self.next_publish_id;
        self.next_publish_id += 1;
        let receipt = frame.header("receipt").map(str::to_owned);
        let content_type = frame.header("content-type").map(str::to_owned);
        let mut headers = client_headers(&frame.headers);
        if let (Some(_), Some(r)) = (&exchange, &receipt) {
            // RabbitMQ's STOMP plugin keeps a SEND's `receipt` among the
            // message's headers; subscribers see the same as on its path.
            headers.push(("receipt".to_owned(), r.clone()));
        }
        self.owed.publishes.insert(id, receipt);
        self.actions.push_back(Action::App(AppPublish {
            id,
            exchange,
            routing_key,
            destination: dest,
            content_type,
            headers,
            body: frame.body,
        }));
    }

    /// Whether a broker ERROR is the STOMP plugin's `Subscription not found`
    /// for a subscription this session no longer has (a message that was on
    /// its way when the client unsubscribed): `There is no current
    /// subscription with tag 'T_<id>'.`
    fn is_late_unsubscribe_error(&self, frame: &Frame) -> bool {
        if frame.header("message") != Some("Subscription not found") {
            return false;
        }
        let body = String::from_utf8_lossy(&frame.body);
        let Some(rest) = body.split("'T_").nth(1) else {
            return false;
        };
        let Some((id, _)) = rest.rsplit_once('\'') else {
            return false;
        };
        !self.subscriptions.contains(id)
    }

    /// Gives a MESSAGE of a user-destination subscription the destination
    /// the client subscribed to.
    fn rewrite_user_message(&self, mut frame: Frame) -> Frame {
        if self.user_subscriptions.is_empty() {
            return frame;
        }
        let original = frame
            .header("subscription")
            .and_then(|id| self.user_subscriptions.get(id))
            .cloned();
        if let Some(original) = original {
            frame.set_header("destination", original);
        }
        frame
    }

    /// ERROR and close for a refused frame; a denial closes with
    /// [`CloseReason::AccessDenied`] so the driver counts and logs it.
    fn refuse(&mut self, now: Instant, refusal: Refusal) {
        match refusal {
            Refusal::Invalid { message, details } => self.client_error(now, &message, details),
            Refusal::Denied(denial) => {
                let error = Frame::error(denial.message(), denial.reason.to_string());
                self.emit_client(now, error);
                self.close_broker_leg();
                self.finish(CloseReason::AccessDenied(denial), true);
            }
        }
    }

    fn emit_client(&mut self, now: Instant, frame: Frame) {
        self.last_client_tx = now;
        self.actions
            .push_back(Action::Client(ToClient::Frame(frame)));
    }

    /// A frame for the relay leg: sent when the leg is open, held while it
    /// opens, and the leg opened when there is none yet.
    fn emit_broker(&mut self, now: Instant, frame: Frame) {
        match self.relay {
            Relay::Open => {
                self.last_broker_tx = now;
                self.actions.push_back(Action::Relay(ToRelay::Frame(frame)));
            }
            // The leg was closed after its flush: nothing more goes out.
            Relay::Absent if self.relay_connect.is_none() => {}
            Relay::Absent | Relay::Opening => {
                if self.relay_queue.len() >= self.config.max_pending_frames {
                    return self.too_many_held_frames(now);
                }
                self.relay_queue.push_back(frame);
                if self.relay == Relay::Absent {
                    self.open_relay(now);
                }
            }
        }
    }

    fn on_begin(&mut self, now: Instant, frame: Frame) {
        let Some(tx) = frame.header("transaction").map(str::to_owned) else {
            // RabbitMQ's answer; nothing to relay.
            return self.client_error(
                now,
                "Missing transaction",
                "\"BEGIN\" must include a 'transaction' header",
            );
        };
        if !self.transactions.contains_key(&tx)
            && self.transactions.len() >= self.config.max_transactions
        {
            let limit = self.config.max_transactions;
            return self.limit_error(
                now,
                "session.max_transactions",
                format!(
                    "more than {limit} open transactions on one session; COMMIT or ABORT first"
                ),
            );
        }
        self.transactions.entry(tx).or_insert(0);
        self.emit_broker(now, frame);
    }

    /// Takes one SEND token from the bucket; false if it is empty.
    fn take_send_token(&mut self, now: Instant) -> bool {
        let rate = self.config.max_sends_per_sec;
        if rate == 0 {
            return true;
        }
        let elapsed = now.saturating_duration_since(self.tokens_at).as_secs_f64();
        self.tokens_at = now;
        let burst = f64::from(self.config.send_burst.max(1));
        self.tokens = (self.tokens + elapsed * f64::from(rate)).min(burst);
        if self.tokens >= 1.0 {
            self.tokens -= 1.0;
            true
        } else {
            false
        }
    }

    /// ERROR naming the limit (its setting), then close both legs.
    fn limit_error(&mut self, now: Instant, limit: &'static str, details: impl Into<String>) {
        self.limit_hit = Some(limit);
        let message = format!("Limit exceeded: {limit}");
        self.emit_client(now, Frame::error(&message, details));
        self.close_broker_leg();
        self.finish(CloseReason::Policy(message), true);
    }

    /// ERROR to the client, then close both legs.
    fn client_error(&mut self, now: Instant, message: &str, details: impl Into<String>) {
        self.emit_client(now, Frame::error(message, details));
        self.close_broker_leg();
        self.finish(CloseReason::ClientError(message.to_owned()), true);
    }

    /// Closes the relay leg, if there is one: an open leg gets a
    /// DISCONNECT first (unless it already has one, its flush).
    fn close_broker_leg(&mut self) {
        match self.relay {
            Relay::Open => {
                if self.owed.relay_flush.is_none() {
                    let disconnect = Frame::new(Command::Disconnect);
                    self.actions
                        .push_back(Action::Relay(ToRelay::Frame(disconnect)));
                }
                self.actions.push_back(Action::Relay(ToRelay::Close));
            }
            Relay::Opening => self.actions.push_back(Action::Relay(ToRelay::Close)),
            Relay::Absent => {}
        }
        self.relay = Relay::Absent;
        self.relay_queue.clear();
    }

    /// ERROR for a frame past `max_pending_frames` held for a relay leg
    /// that is not connected yet.
    fn too_many_held_frames(&mut self, now: Instant) {
        let limit = self.config.max_pending_frames;
        self.limit_error(
            now,
            "session.max_pending_frames",
            format!(
                "too many frames before the broker connection was ready: at most {limit} frames are held while the broker connection opens"
            ),
        );
    }

    /// A closing waits for the relay leg's flush and the hub's answers to
    /// shared SUBSCRIBEs within the broker timeout, and a drain within it in
    /// any case (publishes have their own timeout).
    fn closing_deadline_applies(&self) -> bool {
        self.owed.relay_flush.is_some()
            || !self.owed.shared_subscribes.is_empty()
            || self.state == State::Closing(Closing::Drain)
    }

    fn finish(&mut self, reason: CloseReason, close_client: bool) {
        if close_client {
            self.actions
                .push_back(Action::Client(ToClient::Close(reason.clone())));
        }
        self.close_reason = Some(reason);
        self.state = State::Closed;
        self.pending.clear();
        self.relay_queue.clear();
    }
}

/// Whether a SUBSCRIBE needs nothing of its own on the broker, so the hub
/// can serve it: `ack` absent or `auto`, and none of the headers that ask
/// for a queue of its own (`durable`, `persistent`, `auto-delete`,
/// `exclusive`, `x-queue-name`, `selector`, any `x-` argument).
fn subscribes_without_own_queue(frame: &Frame) -> bool {
    matches!(frame.header("ack"), None | Some("auto"))
        && !frame.headers.iter().any(|(k, _)| {
            matches!(
                k.as_str(),
                "durable"
                    | "persistent"
                    | "auto-delete"
                    | "exclusive"
                    | "x-queue-name"
                    | "selector"
            ) || k.get(..2).is_some_and(|p| p.eq_ignore_ascii_case("x-"))
        })
}

/// Approximate wire size of a frame: body plus header text.
fn frame_size(frame: &Frame) -> usize {
    frame
        .headers
        .iter()
        .map(|(k, v)| k.len() + v.len() + 2)
        .sum::<usize>()
        + frame.body.len()
}

/// The headers of a client SEND that travel to backends: everything but
/// the STOMP protocol headers and the identity headers only the gateway sets
/// (`stomp-*`, `user-id`).
fn client_headers(headers: &[(String, String)]) -> Vec<(String, String)> {
    let mut seen = HashSet::new();
    headers
        .iter()
        .filter(|(k, _)| {
            !matches!(
                k.as_str(),
                "destination" | "receipt" | "content-length" | "content-type" | "transaction"
            ) && !router::is_identity_header(k)
        })
        .filter(|(k, _)| seen.insert(k.clone()))
        .cloned()
        .collect()
}

/// The highest version both sides speak. No `accept-version` means 1.0.
pub fn negotiate_version(accept_version: Option<&str>) -> Option<Version> {
    match accept_version {
        None => Some(Version::V1_0),
        Some(list) => list.split(',').filter_map(Version::parse).max(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use std::sync::Arc;

    const MS: Duration = Duration::from_millis(1);

    fn config() -> Arc<SessionConfig> {
        Arc::new(SessionConfig {
            client_heartbeat: HeartBeat::new(1_000, 1_000),
            broker_heartbeat: HeartBeat::new(5_000, 5_000),
            connect_timeout: Duration::from_secs(3),
            broker_timeout: Duration::from_secs(4),
            max_subscriptions: 2,
            max_pending_frames: 2,
            broker_login: "relay".into(),
            broker_passcode: "secret".into(),
            virtual_host: "vh".into(),
            ..SessionConfig::default()
        })
    }

    fn drain(s: &mut Session) -> Vec<Action> {
        std::iter::from_fn(|| s.poll_action()).collect()
    }

    fn connect_frame(hb: &str) -> Frame {
        Frame::new(Command::Connect)
            .with_header("accept-version", "1.1,1.2")
            .with_header("host", "whatever")
            .with_header("login", "evil")
            .with_header("passcode", "wrong")
            .with_header("heart-beat", hb)
    }

    /// A session through CONNECT and the broker's CONNECTED at `t0`.
    fn connected(t0: Instant, hb: &str) -> Session {
        let mut s = Session::new(config(), "s1", t0);
        s.handle_client_frame(t0, connect_frame(hb));
        let acts = drain(&mut s);
        assert!(
            matches!(acts.as_slice(), [Action::Relay(ToRelay::Open(_))]),
            "{acts:?}"
        );
        s.handle_broker_frame(
            t0,
            Frame::new(Command::Connected)
                .with_header("version", "1.2")
                .with_header("heart-beat", "5000,5000"),
        );
        let acts = drain(&mut s);
        match acts.as_slice() {
            [Action::Client(ToClient::Frame(f))] => assert_eq!(f.command, Command::Connected),
            other => panic!("{other:?}"),
        }
        s
    }

    /// The ERROR's `message` and body.
    fn error_parts(acts: &[Action]) -> (String, String) {
        acts.iter()
            .find_map(|a| match a {
                Action::Client(ToClient::Frame(f)) if f.command == Command::Error => Some((
                    f.header("message").unwrap_or_default().to_owned(),
                    String::from_utf8_lossy(&f.body).into_owned(),
                )),
                _ => None,
            })
            .expect("an ERROR frame")
    }

    fn error_then_close(acts: &[Action]) -> (String, CloseReason) {
        let msg = acts
            .iter()
            .find_map(|a| match a {
                Action::Client(ToClient::Frame(f)) if f.command == Command::Error => {
                    f.header("message").map(str::to_owned)
                }
                _ => None,
            })
            .expect("an ERROR frame");
        let reason = match acts.last() {
            Some(Action::Client(ToClient::Close(r))) => r.clone(),
            other => panic!("last action should close the client: {other:?}"),
        };
        (msg, reason)
    }

    #[test]
    fn connect_replaces_credentials_and_negotiates() {
        let t0 = Instant::now();
        let mut s = Session::new(config(), "s1", t0);
        s.handle_client_frame(t0, connect_frame("2000,500"));
        let acts = drain(&mut s);
        let Action::Relay(ToRelay::Open(c)) = &acts[0] else {
            panic!("{acts:?}")
        };
        assert_eq!(c.header("login"), Some("relay"));
        assert_eq!(c.header("passcode"), Some("secret"));
        assert_eq!(c.header("host"), Some("vh"));
        assert_eq!(c.header("accept-version"), Some("1.2"));
        assert_eq!(c.header("heart-beat"), Some("5000,5000"));
        assert_eq!(s.client_version(), Version::V1_2);

        s.handle_broker_frame(
            t0,
            Frame::new(Command::Connected)
                .with_header("version", "1.2")
                .with_header("heart-beat", "0,10000"),
        );
        let acts = drain(&mut s);
        let Action::Client(ToClient::Frame(c)) = &acts[0] else {
            panic!("{acts:?}")
        };
        assert_eq!(c.header("version"), Some("1.2"));
        assert_eq!(c.header("heart-beat"), Some("1000,1000"));
        assert_eq!(c.header("session"), Some("s1"));
        assert!(s.is_connected());
        // client offers to send every 2000, wants every 500: we send every
        // max(1000, 500), expect every max(1000, 2000).
        assert_eq!(s.client_heartbeats(), (Some(1_000 * MS), Some(2_000 * MS)));
        // broker: cannot send, wants every 10 s.
        assert_eq!(s.broker_heartbeats(), (Some(10_000 * MS), None));
    }

    #[test]
    fn version_negotiation() {
        assert_eq!(negotiate_version(None), Some(Version::V1_0));
        assert_eq!(negotiate_version(Some("1.0,1.1")), Some(Version::V1_1));
        assert_eq!(negotiate_version(Some("1.2,1.0")), Some(Version::V1_2));
        assert_eq!(negotiate_version(Some("2.0")), None);

        let t0 = Instant::now();
        let mut s = Session::new(config(), "s", t0);
        s.handle_client_frame(
            t0,
            Frame::new(Command::Connect).with_header("accept-version", "2.0"),
        );
        let acts = drain(&mut s);
        let (msg, reason) = error_then_close(&acts);
        assert_eq!(msg, "Version mismatch");
        assert!(error_parts(&acts)
            .1
            .starts_with("Supported versions are 1.0,1.1,1.2"));
        assert!(matches!(reason, CloseReason::ClientError(_)));
        assert!(s.is_closed());
    }

    #[test]
    fn first_frame_must_be_connect() {
        let t0 = Instant::now();
        let mut s = Session::new(config(), "s", t0);
        s.handle_client_frame(
            t0,
            Frame::new(Command::Send).with_header("destination", "/topic/a"),
        );
        let (msg, body) = error_parts(&drain(&mut s));
        assert_eq!(msg, "Illegal command");
        assert!(body.contains("expected a CONNECT frame"), "{body}");
    }

    #[test]
    fn frames_before_connected_are_held_then_relayed_in_order() {
        let t0 = Instant::now();
        let mut s = Session::new(config(), "s", t0);
        s.handle_client_frame(t0, connect_frame("0,0"));
        drain(&mut s);
        let sub = Frame::new(Command::Subscribe)
            .with_header("id", "0")
            .with_header("destination", "/topic/a");
        let send = Frame::new(Command::Send)
            .with_header("destination", "/topic/a")
            .with_body("hi");
        s.handle_client_frame(t0, sub.clone());
        s.handle_client_frame(t0, send.clone());
        assert!(drain(&mut s).is_empty());
        s.handle_broker_frame(
            t0,
            Frame::new(Command::Connected).with_header("version", "1.2"),
        );
        let acts = drain(&mut s);
        assert!(
            matches!(&acts[0], Action::Client(ToClient::Frame(f)) if f.command == Command::Connected)
        );
        assert_eq!(acts[1], Action::Relay(ToRelay::Frame(sub)));
        assert_eq!(acts[2], Action::Relay(ToRelay::Frame(send)));
        assert_eq!(acts.len(), 3);
    }

    #[test]
    fn held_frames_are_bounded() {
        let t0 = Instant::now();
        let mut s = Session::new(config(), "s", t0);
        s.handle_client_frame(t0, connect_frame("0,0"));
        drain(&mut s);
        for _ in 0..3 {
            s.handle_client_frame(
                t0,
                Frame::new(Command::Begin).with_header("transaction", "t"),
            );
        }
        let acts = drain(&mut s);
        let (msg, body) = error_parts(&acts);
        assert_eq!(msg, "Limit exceeded: session.max_pending_frames");
        assert!(body.contains("too many frames"), "{body}");
        assert!(acts.contains(&Action::Relay(ToRelay::Close)));
    }

    #[test]
    fn unroutable_app_and_user_destinations_are_rejected() {
        let t0 = Instant::now();
        for (dest, want) in [
            ("/nowhere/x", "no route for destination \"/nowhere/x\""),
            (
                "/app/chat.send",
                "application destination \"/app/chat.send\" is not served",
            ),
            (
                "/user/queue/n",
                "user destination \"/user/queue/n\" is not served",
            ),
        ] {
            let mut s = connected(t0, "0,0");
            s.handle_client_frame(
                t0,
                Frame::new(Command::Send).with_header("destination", dest),
            );
            let acts = drain(&mut s);
            let (msg, body) = error_parts(&acts);
            assert!(
                msg == "Unknown destination" || msg == "Invalid destination",
                "{msg}"
            );
            assert!(body.starts_with(want), "{body} / {want}");
            // The broker leg is closed cleanly, and nothing was relayed.
            assert_eq!(
                acts[1],
                Action::Relay(ToRelay::Frame(Frame::new(Command::Disconnect)))
            );
            assert_eq!(acts[2], Action::Relay(ToRelay::Close));
        }
    }

    #[test]
    fn the_unknown_destination_error_lists_every_served_prefix() {
        let t0 = Instant::now();
        let send = Frame::new(Command::Send).with_header("destination", "/nowhere/x");
        // With the control plane: relay prefixes, /app/ and /user/.
        let (mut s, _) = connected_with(cp_config(None, false), t0, connect_frame("0,0"));
        s.handle_client_frame(t0, send.clone());
        let (msg, body) = error_parts(&drain(&mut s));
        assert_eq!(msg, "Unknown destination");
        assert!(
            body.contains("/topic/, /queue/, /exchange/, /amq/queue/, /temp-queue/, /reply-queue/, /app/, /user/"),
            "{body}"
        );
        // Without it, only what is served.
        let mut s = connected(t0, "0,0");
        s.handle_client_frame(t0, send);
        let (_, body) = error_parts(&drain(&mut s));
        assert!(body.contains("/reply-queue/ and"), "{body}");
        assert!(!body.contains("/app/"), "{body}");
    }

    #[test]
    fn send_without_destination_is_an_error() {
        let t0 = Instant::now();
        let mut s = connected(t0, "0,0");
        s.handle_client_frame(t0, Frame::new(Command::Send));
        let (msg, body) = error_parts(&drain(&mut s));
        assert_eq!(msg, "Missing destination");
        assert!(body.contains("SEND frame has no destination header"));
    }

    #[test]
    fn subscriptions_are_tracked_and_unknown_unsubscribe_is_not_forwarded() {
        let t0 = Instant::now();
        let mut s = connected(t0, "0,0");
        let sub = |id: &str| {
            Frame::new(Command::Subscribe)
                .with_header("id", id)
                .with_header("destination", "/queue/q")
        };
        s.handle_client_frame(t0, sub("a"));
        assert_eq!(drain(&mut s), vec![Action::Relay(ToRelay::Frame(sub("a")))]);
        assert_eq!(s.subscription_count(), 1);

        let unsub_unknown = Frame::new(Command::Unsubscribe)
            .with_header("id", "zzz")
            .with_header("receipt", "r1");
        s.handle_client_frame(t0, unsub_unknown);
        assert_eq!(
            drain(&mut s),
            vec![Action::Client(ToClient::Frame(
                Frame::new(Command::Receipt).with_header("receipt-id", "r1")
            ))]
        );
        s.handle_client_frame(
            t0,
            Frame::new(Command::Unsubscribe).with_header("id", "nope"),
        );
        assert!(drain(&mut s).is_empty());

        let unsub = Frame::new(Command::Unsubscribe).with_header("id", "a");
        s.handle_client_frame(t0, unsub.clone());
        assert_eq!(
            drain(&mut s),
            vec![Action::Relay(ToRelay::Frame(unsub.clone()))]
        );
        // A second UNSUBSCRIBE of the same id is not forwarded either.
        s.handle_client_frame(t0, unsub);
        assert!(drain(&mut s).is_empty());
        assert!(!s.is_closed());
    }

    #[test]
    fn duplicate_id_and_subscription_limit() {
        let t0 = Instant::now();
        let sub = |id: &str| {
            Frame::new(Command::Subscribe)
                .with_header("id", id)
                .with_header("destination", "/topic/t")
        };
        let mut s = connected(t0, "0,0");
        s.handle_client_frame(t0, sub("a"));
        s.handle_client_frame(t0, sub("a"));
        let (msg, body) = error_parts(&drain(&mut s));
        assert_eq!(msg, "Duplicated subscription identifier");
        assert!(body.starts_with("A subscription identified by 'a' already exists"));

        let mut s = connected(t0, "0,0");
        s.handle_client_frame(t0, sub("a"));
        s.handle_client_frame(t0, sub("b"));
        s.handle_client_frame(t0, sub("c"));
        let (msg, body) = error_parts(&drain(&mut s));
        assert_eq!(msg, "Limit exceeded: session.max_subscriptions");
        assert_eq!(body, "too many subscriptions (limit 2 per session)");
        assert_eq!(s.limit_hit(), Some("session.max_subscriptions"));

        let mut s = connected(t0, "0,0");
        s.handle_client_frame(
            t0,
            Frame::new(Command::Subscribe).with_header("destination", "/topic/t"),
        );
        let (msg, _) = error_then_close(&drain(&mut s));
        assert_eq!(msg, "Missing header");
    }

    #[test]
    fn broker_frames_are_relayed_and_broker_error_closes() {
        let t0 = Instant::now();
        let mut s = connected(t0, "0,0");
        let msg = Frame::new(Command::Message)
            .with_header("subscription", "a")
            .with_body("x");
        s.handle_broker_frame(t0, msg.clone());
        assert_eq!(drain(&mut s), vec![Action::Client(ToClient::Frame(msg))]);
        let err = Frame::error("not_found", "no exchange 'nope'");
        s.handle_broker_frame(t0, err.clone());
        let acts = drain(&mut s);
        assert_eq!(acts[0], Action::Client(ToClient::Frame(err)));
        assert_eq!(acts[1], Action::Relay(ToRelay::Close));
        assert_eq!(
            acts[2],
            Action::Client(ToClient::Close(CloseReason::BrokerError(
                "not_found".into()
            )))
        );
        assert!(s.is_closed());
    }

    #[test]
    fn broker_error_during_connect_is_relayed() {
        let t0 = Instant::now();
        let mut s = Session::new(config(), "s", t0);
        s.handle_client_frame(t0, connect_frame("0,0"));
        drain(&mut s);
        s.handle_broker_frame(t0, Frame::error("Access refused for user 'relay'", ""));
        let (msg, reason) = error_then_close(&drain(&mut s));
        assert_eq!(msg, "Access refused for user 'relay'");
        assert_eq!(reason.ws_code(), 1011);
    }

    #[test]
    fn broker_failure_gives_the_client_an_error() {
        let t0 = Instant::now();
        let mut s = connected(t0, "0,0");
        s.handle_broker_failed(t0, "connection reset");
        let (msg, reason) = error_then_close(&drain(&mut s));
        assert_eq!(msg, "broker unavailable");
        assert_eq!(reason, CloseReason::BrokerLost("connection reset".into()));
    }

    #[test]
    fn disconnect_with_receipt_waits_for_the_broker() {
        let t0 = Instant::now();
        let mut s = connected(t0, "0,0");
        let d = Frame::new(Command::Disconnect).with_header("receipt", "bye");
        s.handle_client_frame(t0, d.clone());
        assert_eq!(drain(&mut s), vec![Action::Relay(ToRelay::Frame(d))]);
        assert!(!s.is_closed());
        let r = Frame::new(Command::Receipt).with_header("receipt-id", "bye");
        s.handle_broker_frame(t0, r.clone());
        assert_eq!(
            drain(&mut s),
            vec![
                Action::Relay(ToRelay::Close),
                Action::Client(ToClient::Frame(r)),
                Action::Client(ToClient::Close(CloseReason::ClientDisconnect))
            ]
        );
    }

    #[test]
    fn disconnect_receipt_times_out() {
        let t0 = Instant::now();
        let mut s = connected(t0, "0,0");
        s.handle_client_frame(
            t0,
            Frame::new(Command::Disconnect).with_header("receipt", "bye"),
        );
        drain(&mut s);
        assert_eq!(s.poll_timeout(), Some(t0 + 4_000 * MS));
        s.handle_timeout(t0 + 3_999 * MS);
        assert!(drain(&mut s).is_empty());
        s.handle_timeout(t0 + 4_000 * MS);
        let (msg, _) = error_then_close(&drain(&mut s));
        assert_eq!(msg, "broker unavailable");
    }

    #[test]
    fn disconnect_without_receipt_closes_at_once() {
        let t0 = Instant::now();
        let mut s = connected(t0, "0,0");
        s.handle_client_frame(t0, Frame::new(Command::Disconnect));
        assert_eq!(
            drain(&mut s),
            vec![
                Action::Relay(ToRelay::Frame(Frame::new(Command::Disconnect))),
                Action::Relay(ToRelay::Close),
                Action::Client(ToClient::Close(CloseReason::ClientDisconnect))
            ]
        );
    }

    #[test]
    fn client_gone_disconnects_the_broker_leg() {
        let t0 = Instant::now();
        let mut s = connected(t0, "0,0");
        s.handle_client_closed(t0);
        assert_eq!(
            drain(&mut s),
            vec![
                Action::Relay(ToRelay::Frame(Frame::new(Command::Disconnect))),
                Action::Relay(ToRelay::Close)
            ]
        );
        assert_eq!(s.close_reason(), Some(&CloseReason::ClientGone));

        let mut s = Session::new(config(), "s", t0);
        s.handle_client_frame(t0, connect_frame("0,0"));
        drain(&mut s);
        s.handle_client_closed(t0);
        assert_eq!(drain(&mut s), vec![Action::Relay(ToRelay::Close)]);
    }

    #[test]
    fn connect_timeout() {
        let t0 = Instant::now();
        let mut s = Session::new(config(), "s", t0);
        assert_eq!(s.poll_timeout(), Some(t0 + 3_000 * MS));
        s.handle_timeout(t0 + 2_999 * MS);
        assert!(drain(&mut s).is_empty());
        s.handle_timeout(t0 + 3_000 * MS);
        let (msg, reason) = error_then_close(&drain(&mut s));
        assert_eq!(msg, "no CONNECT frame received");
        assert_eq!(reason, CloseReason::ConnectTimeout);
        assert_eq!(s.poll_timeout(), None);
    }

    #[test]
    fn broker_connect_timeout() {
        let t0 = Instant::now();
        let mut s = Session::new(config(), "s", t0);
        let t1 = t0 + 100 * MS;
        s.handle_client_frame(t1, connect_frame("0,0"));
        drain(&mut s);
        assert_eq!(s.poll_timeout(), Some(t1 + 4_000 * MS));
        s.handle_timeout(t1 + 4_000 * MS);
        let (msg, reason) = error_then_close(&drain(&mut s));
        assert_eq!(msg, "broker unavailable");
        assert!(matches!(reason, CloseReason::BrokerLost(m) if m.contains("no CONNECTED")));
    }

    #[test]
    fn heartbeats_on_both_legs_on_a_fake_clock() {
        let t0 = Instant::now();
        // Client: sends every 1000, wants every 1000 → both legs 1 s.
        let mut s = connected(t0, "1000,1000");
        assert_eq!(s.client_heartbeats(), (Some(1_000 * MS), Some(1_000 * MS)));
        assert_eq!(s.broker_heartbeats(), (Some(5_000 * MS), Some(5_000 * MS)));
        assert_eq!(s.poll_timeout(), Some(t0 + 1_000 * MS));

        // The client keeps talking; the gateway heart-beats the client every
        // second and the broker every 5 s, even with no relayed traffic.
        let mut client_beats = 0;
        let mut broker_beats = 0;
        let mut now = t0;
        for step in 1..=60 {
            now = t0 + step * 100 * MS;
            s.handle_client_activity(now);
            s.handle_broker_activity(now);
            while let Some(t) = s.poll_timeout() {
                if t > now {
                    break;
                }
                s.handle_timeout(now);
            }
            for a in drain(&mut s) {
                match a {
                    Action::Client(ToClient::Heartbeat) => client_beats += 1,
                    Action::Relay(ToRelay::Heartbeat) => broker_beats += 1,
                    other => panic!("unexpected {other:?}"),
                }
            }
        }
        assert_eq!(now, t0 + 6_000 * MS);
        assert_eq!(client_beats, 6);
        assert_eq!(broker_beats, 1);
        assert!(s.is_connected());

        // Relayed traffic counts as a heart-beat: no extra EOL is needed.
        let m = Frame::new(Command::Message).with_header("subscription", "a");
        s.handle_broker_frame(now + 900 * MS, m);
        drain(&mut s);
        s.handle_timeout(now + 1_000 * MS);
        assert!(!drain(&mut s).contains(&Action::Client(ToClient::Heartbeat)));
    }

    #[test]
    fn silent_client_is_dropped_after_twice_the_interval() {
        let t0 = Instant::now();
        let mut s = connected(t0, "1000,1000");
        s.handle_broker_activity(t0 + 1_900 * MS);
        s.handle_timeout(t0 + 1_999 * MS);
        assert!(!s.is_closed());
        drain(&mut s);
        s.handle_timeout(t0 + 2_000 * MS);
        let acts = drain(&mut s);
        let (msg, reason) = error_then_close(&acts);
        assert_eq!(msg, "heart-beat timeout");
        assert_eq!(reason, CloseReason::ClientHeartbeatTimeout);
        assert!(acts.contains(&Action::Relay(ToRelay::Close)));
    }

    #[test]
    fn silent_broker_counts_as_lost() {
        let t0 = Instant::now();
        let mut s = connected(t0, "0,0");
        s.handle_timeout(t0 + 9_999 * MS);
        assert!(!s.is_closed());
        drain(&mut s);
        s.handle_timeout(t0 + 10_000 * MS);
        let (msg, reason) = error_then_close(&drain(&mut s));
        assert_eq!(msg, "broker unavailable");
        assert!(matches!(reason, CloseReason::BrokerLost(m) if m.contains("heart-beat")));
    }

    #[test]
    fn stomp_1_0_client_gets_no_heartbeats_and_may_omit_ids() {
        let t0 = Instant::now();
        let mut s = Session::new(config(), "s", t0);
        s.handle_client_frame(
            t0,
            Frame::new(Command::Connect).with_header("heart-beat", "1000,1000"),
        );
        drain(&mut s);
        assert_eq!(s.client_version(), Version::V1_0);
        s.handle_broker_frame(
            t0,
            Frame::new(Command::Connected).with_header("version", "1.0"),
        );
        let acts = drain(&mut s);
        let Action::Client(ToClient::Frame(c)) = &acts[0] else {
            panic!()
        };
        assert_eq!(c.header("version"), Some("1.0"));
        assert_eq!(c.header("heart-beat"), Some("0,0"));
        assert_eq!(s.client_heartbeats(), (None, None));
        let sub = Frame::new(Command::Subscribe).with_header("destination", "/topic/x");
        s.handle_client_frame(t0, sub.clone());
        assert_eq!(drain(&mut s), vec![Action::Relay(ToRelay::Frame(sub))]);
        let unsub = Frame::new(Command::Unsubscribe).with_header("destination", "/topic/x");
        s.handle_client_frame(t0, unsub.clone());
        assert_eq!(drain(&mut s), vec![Action::Relay(ToRelay::Frame(unsub))]);
    }

    #[test]
    fn decode_errors_and_client_sent_server_frames_close_with_error() {
        let t0 = Instant::now();
        let mut s = connected(t0, "0,0");
        s.handle_client_decode_error(t0, &DecodeError::FrameTooLarge { limit: 65536 });
        let acts = drain(&mut s);
        let (msg, body) = error_parts(&acts);
        assert_eq!(msg, "Limit exceeded: session.max_frame_size");
        assert!(body.contains("65536"), "{body}");
        assert_eq!(s.limit_hit(), Some("session.max_frame_size"));

        let mut s = connected(t0, "0,0");
        s.handle_client_decode_error(t0, &DecodeError::NulInHeader("x:a\0b".into()));
        assert_eq!(error_parts(&drain(&mut s)).0, "Invalid header");
        assert_eq!(s.limit_hit(), None);

        let mut s = connected(t0, "0,0");
        s.handle_client_decode_error(t0, &DecodeError::UnknownCommand("FOO".into()));
        assert_eq!(error_parts(&drain(&mut s)).0, "Bad command");

        let mut s = connected(t0, "0,0");
        s.handle_client_frame(t0, Frame::new(Command::Message));
        let (msg, body) = error_parts(&drain(&mut s));
        assert_eq!(msg, "Bad command");
        assert_eq!(body, "clients may not send MESSAGE frames");

        let mut s = connected(t0, "0,0");
        s.handle_client_frame(t0, connect_frame("0,0"));
        let (msg, body) = error_parts(&drain(&mut s));
        assert_eq!(msg, "Illegal command");
        assert!(body.contains("already connected"), "{body}");
    }

    #[test]
    fn shutdown_tells_the_client() {
        let t0 = Instant::now();
        let mut s = connected(t0, "0,0");
        s.handle_shutdown(t0);
        let (msg, reason) = error_then_close(&drain(&mut s));
        assert_eq!(msg, "server shutting down");
        assert_eq!(reason.ws_code(), 1001);
    }

    fn cp_config(auth: Option<Arc<dyn Authenticate>>, user_send: bool) -> Arc<SessionConfig> {
        let mut c = (*config()).clone();
        c.router = c
            .router
            .clone()
            .with_control_plane(true)
            .with_user_send(user_send);
        c.max_inflight_publishes = 2;
        c.authenticator = auth;
        Arc::new(c)
    }

    fn connected_with(
        cfg: Arc<SessionConfig>,
        t0: Instant,
        connect: Frame,
    ) -> (Session, Vec<Action>) {
        let mut s = Session::new(cfg, "s9", t0);
        s.handle_client_frame(t0, connect);
        let acts = drain(&mut s);
        if s.is_closed() {
            return (s, acts);
        }
        s.handle_broker_frame(
            t0,
            Frame::new(Command::Connected).with_header("version", "1.2"),
        );
        let acts = drain(&mut s);
        (s, acts)
    }

    #[derive(Debug)]
    struct TokenAuth;
    impl Authenticate for TokenAuth {
        fn authenticate(&self, connect: &Frame) -> Result<Option<Principal>, String> {
            match connect.header("token") {
                Some("alice-token") => Ok(Some(Principal::user("alice"))),
                Some(_) => Err("invalid token".into()),
                None => Ok(None),
            }
        }
    }

    #[test]
    fn app_send_is_published_and_receipted_after_confirm() {
        let t0 = Instant::now();
        let (mut s, _) = connected_with(cp_config(None, false), t0, connect_frame("0,0"));
        let send = Frame::new(Command::Send)
            .with_header("destination", "/app/chat/sendMessage")
            .with_header("receipt", "r1")
            .with_header("content-type", "application/json")
            .with_header("room", "42")
            .with_header("stomp-user", "admin")
            .with_header("Stomp-Session", "x")
            .with_body("{}");
        s.handle_client_frame(t0, send);
        let acts = drain(&mut s);
        let [Action::App(p)] = acts.as_slice() else {
            panic!("{acts:?}")
        };
        assert_eq!(p.routing_key, "chat.sendMessage");
        assert_eq!(p.destination, "/app/chat/sendMessage");
        assert_eq!(p.content_type.as_deref(), Some("application/json"));
        // Identity headers cannot be spoofed; protocol headers are not copied.
        assert_eq!(p.headers, vec![("room".to_string(), "42".to_string())]);
        assert_eq!(&p.body[..], b"{}");
        assert_eq!(s.inflight_publishes(), 1);
        // No receipt before the confirm.
        s.handle_publish_result(t0, p.id, Ok(()));
        assert_eq!(
            drain(&mut s),
            vec![Action::Client(ToClient::Frame(
                Frame::new(Command::Receipt).with_header("receipt-id", "r1")
            ))]
        );
        assert_eq!(s.inflight_publishes(), 0);
        assert_eq!(s.principal(), "session-s9");
    }

    fn subscribe(id: &str) -> Frame {
        Frame::new(Command::Subscribe)
            .with_header("id", id)
            .with_header("destination", "/exchange/adme.exchange/room.42")
    }

    fn app_send(body: &str) -> Frame {
        Frame::new(Command::Send)
            .with_header("destination", "/app/chat.sendMessage")
            .with_body(body.to_owned())
    }

    fn receipt(id: &str) -> Frame {
        Frame::new(Command::Receipt).with_header("receipt-id", id)
    }

    #[test]
    fn app_sends_wait_for_the_subscribe_before_them() {
        let t0 = Instant::now();
        let (mut s, _) = connected_with(cp_config(None, false), t0, connect_frame("0,0"));
        // SUBSCRIBE without a receipt gets one of the gateway's own.
        s.handle_client_frame(t0, subscribe("sub-0"));
        let acts = drain(&mut s);
        let [Action::Relay(ToRelay::Frame(sub))] = acts.as_slice() else {
            panic!("{acts:?}")
        };
        let own = sub.header("receipt").unwrap().to_owned();
        assert!(own.starts_with("stomp-gateway-sub-"), "{own}");
        // The SENDs right after it are held...
        s.handle_client_frame(t0, app_send("hello"));
        s.handle_client_frame(t0, app_send("again"));
        assert_eq!(drain(&mut s), vec![]);
        // ...a DISCONNECT waits behind them...
        s.handle_client_frame(t0, Frame::new(Command::Disconnect));
        assert_eq!(drain(&mut s), vec![]);
        // ...until RabbitMQ confirms the SUBSCRIBE; the client never sees
        // the gateway's receipt, and the SENDs go out in order.
        s.handle_broker_frame(t0, receipt(&own));
        let acts = drain(&mut s);
        let bodies: Vec<&[u8]> = acts
            .iter()
            .map(|a| match a {
                Action::App(p) => &p.body[..],
                other => panic!("only publishes: {other:?}"),
            })
            .collect();
        assert_eq!(bodies, [&b"hello"[..], &b"again"[..]]);
        // The DISCONNECT follows the confirms.
        s.handle_publish_result(t0, 1, Ok(()));
        s.handle_publish_result(t0, 2, Ok(()));
        assert!(
            drain(&mut s).contains(&Action::Relay(ToRelay::Frame(Frame::new(
                Command::Disconnect
            ))))
        );
    }

    #[test]
    fn a_clients_subscribe_receipt_is_relayed_and_releases_the_sends() {
        let t0 = Instant::now();
        let (mut s, _) = connected_with(cp_config(None, false), t0, connect_frame("0,0"));
        s.handle_client_frame(t0, subscribe("sub-0").with_header("receipt", "mine"));
        let acts = drain(&mut s);
        let [Action::Relay(ToRelay::Frame(sub))] = acts.as_slice() else {
            panic!("{acts:?}")
        };
        assert_eq!(sub.header("receipt"), Some("mine"));
        s.handle_client_frame(t0, app_send("hello"));
        assert_eq!(drain(&mut s), vec![]);
        s.handle_broker_frame(t0, receipt("mine"));
        let acts = drain(&mut s);
        assert_eq!(
            acts[0],
            Action::Client(ToClient::Frame(receipt("mine"))),
            "{acts:?}"
        );
        assert!(matches!(acts[1], Action::App(_)), "{acts:?}");
        // With nothing awaited, SENDs go out at once; relay SENDs never wait.
        s.handle_client_frame(t0, app_send("now"));
        assert!(matches!(drain(&mut s).as_slice(), [Action::App(_)]));
    }

    #[test]
    fn the_hold_is_bounded_by_the_broker_timeout_and_the_pending_limit() {
        let t0 = Instant::now();
        let cfg = cp_config(None, false);
        let timeout = cfg.broker_timeout;
        let limit = cfg.max_pending_frames;
        let (mut s, _) = connected_with(cfg.clone(), t0, connect_frame("0,0"));
        s.handle_client_frame(t0, subscribe("sub-0"));
        let own = match drain(&mut s).as_slice() {
            [Action::Relay(ToRelay::Frame(f))] => f.header("receipt").unwrap().to_owned(),
            other => panic!("{other:?}"),
        };
        s.handle_client_frame(t0, app_send("hello"));
        assert_eq!(s.poll_timeout(), Some(t0 + timeout));
        s.handle_timeout(t0 + timeout - Duration::from_millis(1));
        assert_eq!(drain(&mut s), vec![]);
        // No receipt in time: the SEND goes out anyway.
        s.handle_timeout(t0 + timeout);
        assert!(matches!(drain(&mut s).as_slice(), [Action::App(_)]));
        // The late receipt is the gateway's: swallowed.
        s.handle_broker_frame(t0 + timeout, receipt(&own));
        assert_eq!(drain(&mut s), vec![]);

        // More held SENDs than the limit: an ERROR naming it.
        let (mut s, _) = connected_with(cfg, t0, connect_frame("0,0"));
        s.handle_client_frame(t0, subscribe("sub-0"));
        for _ in 0..=limit {
            s.handle_client_frame(t0, app_send("x"));
        }
        let acts = drain(&mut s);
        let (msg, _) = error_then_close(&acts[1..]);
        assert_eq!(
            msg,
            "too many application messages waiting for a subscription"
        );
    }

    #[test]
    fn app_publish_failure_and_limits() {
        let t0 = Instant::now();
        let (mut s, _) = connected_with(cp_config(None, false), t0, connect_frame("0,0"));
        let send = || Frame::new(Command::Send).with_header("destination", "/app/x");
        s.handle_client_frame(t0, send());
        let acts = drain(&mut s);
        let [Action::App(p)] = acts.as_slice() else {
            panic!("{acts:?}")
        };
        s.handle_publish_result(
            t0,
            p.id,
            Err("unroutable: no queue is bound to routing key x".into()),
        );
        let acts = drain(&mut s);
        let (msg, _) = error_then_close(&acts);
        assert_eq!(msg, "message not delivered");
        let Action::Client(ToClient::Frame(err)) = &acts[0] else {
            panic!()
        };
        assert!(std::str::from_utf8(&err.body)
            .unwrap()
            .contains("unroutable"));

        let (mut s, _) = connected_with(cp_config(None, false), t0, connect_frame("0,0"));
        for _ in 0..3 {
            s.handle_client_frame(t0, send());
        }
        let (msg, body) = error_parts(&drain(&mut s));
        assert_eq!(msg, "Limit exceeded: app.max_inflight_per_session");
        assert!(body.starts_with("too many unconfirmed application messages (limit 2)"));

        let (mut s, _) = connected_with(cp_config(None, false), t0, connect_frame("0,0"));
        s.handle_client_frame(t0, send().with_header("transaction", "tx1"));
        let (msg, _) = error_then_close(&drain(&mut s));
        assert_eq!(
            msg,
            "transactions are not supported for application destinations"
        );
    }

    #[test]
    fn user_destination_subscriptions_are_rewritten_both_ways() {
        let t0 = Instant::now();
        let connect = connect_frame("0,0").with_header("token", "alice-token");
        let (mut s, acts) =
            connected_with(cp_config(Some(Arc::new(TokenAuth)), false), t0, connect);
        let Action::Client(ToClient::Frame(c)) = &acts[0] else {
            panic!("{acts:?}")
        };
        assert_eq!(c.header("user-name"), Some("alice"));
        assert_eq!(s.user(), Some("alice"));
        s.handle_client_frame(
            t0,
            Frame::new(Command::Subscribe)
                .with_header("id", "n")
                .with_header("destination", "/user/queue/notifications"),
        );
        let acts = drain(&mut s);
        let [Action::Relay(ToRelay::Frame(sub))] = acts.as_slice() else {
            panic!("{acts:?}")
        };
        assert_eq!(
            sub.header("destination"),
            Some("/exchange/stomp.user/alice.queue.notifications")
        );
        s.handle_broker_frame(
            t0,
            Frame::new(Command::Message)
                .with_header("subscription", "n")
                .with_header(
                    "destination",
                    "/exchange/stomp.user/alice.queue.notifications",
                ),
        );
        let acts = drain(&mut s);
        let [Action::Client(ToClient::Frame(m))] = acts.as_slice() else {
            panic!("{acts:?}")
        };
        assert_eq!(m.header("destination"), Some("/user/queue/notifications"));
        // Other subscriptions are left alone.
        s.handle_broker_frame(
            t0,
            Frame::new(Command::Message)
                .with_header("subscription", "other")
                .with_header("destination", "/topic/a"),
        );
        let acts = drain(&mut s);
        let [Action::Client(ToClient::Frame(m))] = acts.as_slice() else {
            panic!("{acts:?}")
        };
        assert_eq!(m.header("destination"), Some("/topic/a"));
    }

    #[test]
    fn authentication_refused() {
        let t0 = Instant::now();
        let connect = connect_frame("0,0").with_header("token", "forged");
        let (s, acts) = connected_with(cp_config(Some(Arc::new(TokenAuth)), false), t0, connect);
        let (msg, _) = error_then_close(&acts);
        assert_eq!(msg, "authentication failed");
        assert!(s.is_closed());
        // Nothing reached the broker.
        assert!(!acts
            .iter()
            .any(|a| matches!(a, Action::Relay(ToRelay::Open(_)))));
    }

    #[test]
    fn a_denied_frame_gets_an_error_then_a_policy_close() {
        let t0 = Instant::now();
        let (mut s, _) = connected_with(cp_config(None, false), t0, connect_frame("0,0"));
        s.handle_client_frame(
            t0,
            Frame::new(Command::Subscribe)
                .with_header("id", "x")
                .with_header("destination", "/exchange/stomp.user/alice.queue.n"),
        );
        let acts = drain(&mut s);
        let Action::Client(ToClient::Frame(err)) = &acts[0] else {
            panic!("{acts:?}")
        };
        assert_eq!(
            err.header("message"),
            Some("SUBSCRIBE to \"/exchange/stomp.user/alice.queue.n\" is not allowed")
        );
        assert!(acts.contains(&Action::Relay(ToRelay::Close)), "{acts:?}");
        assert!(!acts.iter().any(
            |a| matches!(a, Action::Relay(ToRelay::Frame(f)) if f.command == Command::Subscribe)
        ));
        let Some(Action::Client(ToClient::Close(reason))) = acts.last() else {
            panic!("{acts:?}")
        };
        assert_eq!(reason.ws_code(), 1008);
        assert!(matches!(reason, CloseReason::AccessDenied(d) if d.command == Command::Subscribe));
    }

    #[test]
    fn relayed_sends_lose_identity_headers() {
        let t0 = Instant::now();
        let connect = connect_frame("0,0").with_header("token", "alice-token");
        let (mut s, _) = connected_with(cp_config(Some(Arc::new(TokenAuth)), false), t0, connect);
        s.handle_client_frame(
            t0,
            Frame::new(Command::Send)
                .with_header("destination", "/topic/t")
                .with_header("stomp-user", "bob")
                .with_header("user-id", "alice")
                .with_header("x", "1"),
        );
        let acts = drain(&mut s);
        let [Action::Relay(ToRelay::Frame(f))] = acts.as_slice() else {
            panic!("{acts:?}")
        };
        let names: Vec<&str> = f.headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["destination", "x"]);
        // A user-id that is not the user is refused.
        s.handle_client_frame(
            t0,
            Frame::new(Command::Send)
                .with_header("destination", "/topic/t")
                .with_header("user-id", "bob"),
        );
        let (msg, _) = error_then_close(&drain(&mut s));
        assert_eq!(msg, "SEND to \"/topic/t\" is not allowed");
    }

    #[test]
    fn sending_to_users() {
        let t0 = Instant::now();
        let send = Frame::new(Command::Send).with_header("destination", "/user/b.o*b/queue/x");
        let (mut s, _) = connected_with(cp_config(None, false), t0, connect_frame("0,0"));
        s.handle_client_frame(t0, send.clone());
        let (msg, _) = error_then_close(&drain(&mut s));
        assert_eq!(msg, "SEND to \"/user/b.o*b/queue/x\" is not allowed");
        assert!(matches!(
            s.close_reason(),
            Some(CloseReason::AccessDenied(d)) if d.reason == crate::router::DenyReason::UserSendDisabled
        ));

        let (mut s, _) = connected_with(cp_config(None, true), t0, connect_frame("0,0"));
        s.handle_client_frame(t0, send);
        let acts = drain(&mut s);
        let [Action::Relay(ToRelay::Frame(f))] = acts.as_slice() else {
            panic!("{acts:?}")
        };
        assert_eq!(
            f.header("destination"),
            Some("/exchange/stomp.user/b%2Eo%2Ab.queue.x")
        );
    }

    #[test]
    fn subscribing_to_an_application_destination_is_refused() {
        let t0 = Instant::now();
        let (mut s, _) = connected_with(cp_config(None, false), t0, connect_frame("0,0"));
        s.handle_client_frame(
            t0,
            Frame::new(Command::Subscribe)
                .with_header("id", "h")
                .with_header("destination", "/app/chat.history"),
        );
        let (msg, body) = error_parts(&drain(&mut s));
        assert_eq!(msg, "Invalid destination");
        assert!(
            body.starts_with("cannot subscribe to application destination \"/app/chat.history\""),
            "{body}"
        );
    }

    #[test]
    fn drain_completes_receipts_before_closing_with_1001() {
        let t0 = Instant::now();
        let mut s = connected(t0, "0,0");
        let send = Frame::new(Command::Send)
            .with_header("destination", "/queue/q")
            .with_header("receipt", "r1");
        s.handle_client_frame(t0, send.clone());
        assert_eq!(drain(&mut s), vec![Action::Relay(ToRelay::Frame(send))]);
        s.handle_drain(t0);
        let drain_disconnect =
            Frame::new(Command::Disconnect).with_header("receipt", "stomp-gateway-drain-s1");
        assert_eq!(
            drain(&mut s),
            vec![Action::Relay(ToRelay::Frame(drain_disconnect))]
        );
        // Frames the client sends now are not relayed (and not receipted).
        s.handle_client_frame(
            t0,
            Frame::new(Command::Send).with_header("destination", "/queue/q"),
        );
        assert!(drain(&mut s).is_empty());
        // The client's receipt still arrives, then the drain receipt ends it.
        let r1 = Frame::new(Command::Receipt).with_header("receipt-id", "r1");
        s.handle_broker_frame(t0, r1.clone());
        assert_eq!(drain(&mut s), vec![Action::Client(ToClient::Frame(r1))]);
        s.handle_broker_frame(
            t0,
            Frame::new(Command::Receipt).with_header("receipt-id", "stomp-gateway-drain-s1"),
        );
        let acts = drain(&mut s);
        let (msg, reason) = error_then_close(&acts);
        assert_eq!(msg, "server shutting down");
        assert_eq!(reason, CloseReason::Shutdown);
        assert_eq!(reason.ws_code(), 1001);
        assert!(acts.contains(&Action::Relay(ToRelay::Close)));
        // The drain DISCONNECT is the broker leg's last frame: no second one.
        assert!(!acts
            .iter()
            .any(|a| matches!(a, Action::Relay(ToRelay::Frame(_)))));
    }

    #[test]
    fn drain_gives_up_on_a_silent_broker_and_closes_anyway() {
        let t0 = Instant::now();
        let mut s = connected(t0, "0,0");
        let t1 = t0 + 100 * MS;
        s.handle_drain(t1);
        drain(&mut s);
        assert_eq!(s.poll_timeout(), Some(t1 + 4_000 * MS));
        s.handle_timeout(t1 + 4_000 * MS);
        let (msg, reason) = error_then_close(&drain(&mut s));
        assert_eq!(msg, "server shutting down");
        assert_eq!(reason, CloseReason::Shutdown);
    }

    #[test]
    fn drain_before_connected_closes_at_once() {
        let t0 = Instant::now();
        let mut s = Session::new(config(), "s", t0);
        s.handle_drain(t0);
        let (msg, reason) = error_then_close(&drain(&mut s));
        assert_eq!(msg, "server shutting down");
        assert_eq!(reason.ws_code(), 1001);
    }

    /// A session whose config is `config()` changed by `f`, through CONNECT
    /// (with `hb`) and the broker's CONNECTED; returns it and CONNECTED.
    fn connected_cfg(
        t0: Instant,
        hb: &str,
        f: impl FnOnce(&mut SessionConfig),
    ) -> (Session, Frame) {
        let mut cfg = (*config()).clone();
        f(&mut cfg);
        let mut s = Session::new(Arc::new(cfg), "s1", t0);
        s.handle_client_frame(t0, connect_frame(hb));
        drain(&mut s);
        s.handle_broker_frame(
            t0,
            Frame::new(Command::Connected).with_header("version", "1.2"),
        );
        let acts = drain(&mut s);
        let Some(Action::Client(ToClient::Frame(c))) = acts.first() else {
            panic!("{acts:?}")
        };
        (s, c.clone())
    }

    /// Issue 10's table: the client's wish mirrored (RabbitMQ's way),
    /// clamped to `client_heartbeat_min_ms`, on the fake clock.
    #[test]
    fn heartbeat_negotiation_table() {
        let t0 = Instant::now();
        for (hb, answer, interval) in [
            ("0,0", "0,0", None),
            ("1,1", "1000,1000", Some(1_000)),
            ("1000,1000", "1000,1000", Some(1_000)),
            ("30000,30000", "30000,30000", Some(30_000)),
        ] {
            let (mut s, c) = connected_cfg(t0, hb, |c| {
                c.client_heartbeat = HeartBeat::new(0, 0);
                c.client_heartbeat_min_ms = 1_000;
            });
            assert_eq!(c.header("heart-beat"), Some(answer), "client {hb}");
            let i = interval.map(|ms| ms * MS);
            assert_eq!(s.client_heartbeats(), (i, i), "client {hb}");
            let Some(i) = i else {
                // No client-leg timer at all (the broker leg keeps its own).
                assert!(s.poll_timeout().is_none_or(|t| t >= t0 + 5_000 * MS));
                continue;
            };
            // We beat at the interval...
            s.handle_timeout(t0 + i);
            assert!(
                drain(&mut s).contains(&Action::Client(ToClient::Heartbeat)),
                "{hb}"
            );
            // ...and a client silent for twice the interval is dead.
            s.handle_timeout(t0 + i * 2 - MS);
            assert!(!s.is_closed(), "{hb}");
            s.handle_timeout(t0 + i * 2);
            let (msg, reason) = error_then_close(&drain(&mut s));
            assert_eq!(msg, "heart-beat timeout");
            assert_eq!(reason, CloseReason::ClientHeartbeatTimeout);
        }
    }

    #[test]
    fn connected_headers_in_rabbitmq_order() {
        let t0 = Instant::now();
        let (_, c) = connected_cfg(t0, "1000,1000", |_| {});
        let names: Vec<&str> = c.headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["server", "session", "heart-beat", "version"]);
    }

    #[test]
    fn empty_destination_name_is_invalid() {
        let t0 = Instant::now();
        for dest in ["/queue", "/queue/", "/topic"] {
            let mut s = connected(t0, "0,0");
            s.handle_client_frame(
                t0,
                Frame::new(Command::Send).with_header("destination", dest),
            );
            assert_eq!(
                error_parts(&drain(&mut s)).0,
                "Invalid destination",
                "{dest}"
            );
        }
    }

    fn begin(tx: &str) -> Frame {
        Frame::new(Command::Begin).with_header("transaction", tx)
    }

    #[test]
    fn open_transactions_are_limited() {
        let t0 = Instant::now();
        let (mut s, _) = connected_cfg(t0, "0,0", |c| c.max_transactions = 2);
        s.handle_client_frame(t0, begin("a"));
        s.handle_client_frame(t0, begin("b"));
        s.handle_client_frame(
            t0,
            Frame::new(Command::Commit).with_header("transaction", "a"),
        );
        s.handle_client_frame(t0, begin("c"));
        assert_eq!(s.transaction_count(), 2);
        assert!(!s.is_closed());
        drain(&mut s);
        s.handle_client_frame(t0, begin("d"));
        let acts = drain(&mut s);
        let (msg, body) = error_parts(&acts);
        assert_eq!(msg, "Limit exceeded: session.max_transactions");
        assert!(body.contains("more than 2 open transactions"), "{body}");
        assert_eq!(s.limit_hit(), Some("session.max_transactions"));
        // The refused BEGIN never reached the broker.
        assert!(!acts.contains(&Action::Relay(ToRelay::Frame(begin("d")))));

        // BEGIN without a name: RabbitMQ's words.
        let mut s = connected(t0, "0,0");
        s.handle_client_frame(t0, Frame::new(Command::Begin));
        assert_eq!(error_parts(&drain(&mut s)).0, "Missing transaction");
    }

    #[test]
    fn bytes_per_transaction_are_limited() {
        let t0 = Instant::now();
        let (mut s, _) = connected_cfg(t0, "0,0", |c| c.max_transaction_bytes = 1000);
        let send = |tx: &str, n: usize| {
            Frame::new(Command::Send)
                .with_header("destination", "/queue/q")
                .with_header("transaction", tx)
                .with_body(vec![b'x'; n])
        };
        s.handle_client_frame(t0, begin("t"));
        s.handle_client_frame(t0, send("t", 400));
        s.handle_client_frame(t0, send("t", 400));
        // ABORT frees the budget; a new transaction starts at zero.
        s.handle_client_frame(
            t0,
            Frame::new(Command::Abort).with_header("transaction", "t"),
        );
        s.handle_client_frame(t0, begin("t"));
        s.handle_client_frame(t0, send("t", 400));
        s.handle_client_frame(t0, send("t", 400));
        assert!(!s.is_closed());
        drain(&mut s);
        s.handle_client_frame(t0, send("t", 400));
        let acts = drain(&mut s);
        assert_eq!(
            error_parts(&acts).0,
            "Limit exceeded: session.max_transaction_bytes"
        );
        assert!(!acts
            .iter()
            .any(|a| matches!(a, Action::Relay(ToRelay::Frame(f)) if f.command == Command::Send)));
    }

    #[test]
    fn sends_per_second_token_bucket() {
        let t0 = Instant::now();
        let (mut s, _) = connected_cfg(t0, "0,0", |c| {
            c.max_sends_per_sec = 10;
            c.send_burst = 5;
        });
        let send = Frame::new(Command::Send).with_header("destination", "/queue/q");
        // A burst of 5, then 10 per second.
        for _ in 0..5 {
            s.handle_client_frame(t0, send.clone());
        }
        for i in 1..=20u32 {
            s.handle_client_frame(t0 + 100 * MS * i, send.clone());
        }
        assert!(!s.is_closed());
        drain(&mut s);
        // Idle for a long time refills only up to the burst.
        let t1 = t0 + 60_000 * MS;
        for _ in 0..5 {
            s.handle_client_frame(t1, send.clone());
        }
        assert!(!s.is_closed());
        drain(&mut s);
        s.handle_client_frame(t1, send.clone());
        let (msg, body) = error_parts(&drain(&mut s));
        assert_eq!(msg, "Limit exceeded: session.max_sends_per_sec");
        assert!(body.contains("more than 10 SENDs per second"), "{body}");
    }

    #[test]
    fn a_half_sent_frame_times_out() {
        let t0 = Instant::now();
        let (mut s, _) = connected_cfg(t0, "0,0", |c| c.frame_timeout = 2_000 * MS);
        assert_eq!(s.poll_timeout(), None);
        s.handle_client_partial(t0 + MS, true);
        // More bytes of the same frame do not restart the clock.
        s.handle_client_partial(t0 + 1_500 * MS, true);
        assert_eq!(s.poll_timeout(), Some(t0 + 2_001 * MS));
        // A completed frame clears it.
        s.handle_client_partial(t0 + 1_600 * MS, false);
        assert_eq!(s.poll_timeout(), None);
        s.handle_client_partial(t0 + 1_700 * MS, true);
        s.handle_timeout(t0 + 3_699 * MS);
        assert!(!s.is_closed());
        s.handle_timeout(t0 + 3_700 * MS);
        let (msg, body) = error_parts(&drain(&mut s));
        assert_eq!(msg, "Limit exceeded: session.frame_timeout_ms");
        assert!(body.contains("2000 ms"), "{body}");
        // Also before CONNECT.
        let mut s = Session::new(config(), "s", t0);
        s.handle_client_partial(t0, true);
        assert_eq!(s.poll_timeout(), Some(t0 + Duration::from_secs(3)));
    }

    // ----- legs: no relay leg at CONNECT, what is owed across legs -------

    /// A session configured to open its relay leg only when a frame needs
    /// it, through CONNECT (answered at once, no leg opened).
    fn connected_without_relay(t0: Instant, control_plane: bool) -> Session {
        let mut cfg = if control_plane {
            (*cp_config(None, false)).clone()
        } else {
            (*config()).clone()
        };
        cfg.open_relay_at_connect = false;
        let mut s = Session::new(Arc::new(cfg), "s7", t0);
        s.handle_client_frame(t0, connect_frame("0,0"));
        let acts = drain(&mut s);
        match acts.as_slice() {
            [Action::Client(ToClient::Frame(f))] => {
                assert_eq!(f.command, Command::Connected);
                assert_eq!(f.header("session"), Some("s7"));
            }
            other => panic!("CONNECTED at once and no relay leg: {other:?}"),
        }
        assert!(s.is_connected());
        s
    }

    fn relay_connected(s: &mut Session, now: Instant) {
        s.handle_broker_frame(
            now,
            Frame::new(Command::Connected).with_header("version", "1.2"),
        );
    }

    fn client_frames(acts: &[Action]) -> Vec<&Frame> {
        acts.iter()
            .filter_map(|a| match a {
                Action::Client(ToClient::Frame(f)) => Some(f),
                _ => None,
            })
            .collect()
    }

    #[test]
    fn connected_with_no_relay_leg_opens_it_on_the_first_relayed_frame() {
        let t0 = Instant::now();
        let mut s = connected_without_relay(t0, false);
        // No leg, so no broker deadline and no broker heart-beat.
        assert_eq!(s.poll_timeout(), None);
        let sub = Frame::new(Command::Subscribe)
            .with_header("id", "0")
            .with_header("destination", "/topic/a");
        s.handle_client_frame(t0 + MS, sub.clone());
        let acts = drain(&mut s);
        let [Action::Relay(ToRelay::Open(c))] = acts.as_slice() else {
            panic!("the leg opens, the frame waits: {acts:?}")
        };
        assert_eq!(c.header("login"), Some("relay"));
        assert_eq!(s.poll_timeout(), Some(t0 + MS + 4_000 * MS));
        let send = Frame::new(Command::Send).with_header("destination", "/topic/a");
        s.handle_client_frame(t0 + 2 * MS, send.clone());
        assert!(drain(&mut s).is_empty(), "held while the leg opens");
        relay_connected(&mut s, t0 + 3 * MS);
        assert_eq!(
            drain(&mut s),
            vec![
                Action::Relay(ToRelay::Frame(sub)),
                Action::Relay(ToRelay::Frame(send))
            ],
            "in order, once the leg is connected; no second CONNECTED"
        );
        // Later frames go straight out.
        let ack = Frame::new(Command::Ack).with_header("id", "1");
        s.handle_client_frame(t0 + 4 * MS, ack.clone());
        assert_eq!(drain(&mut s), vec![Action::Relay(ToRelay::Frame(ack))]);
    }

    #[test]
    fn a_relay_leg_opened_later_that_never_answers_fails_the_session() {
        let t0 = Instant::now();
        let mut s = connected_without_relay(t0, false);
        s.handle_client_frame(
            t0,
            Frame::new(Command::Send).with_header("destination", "/queue/q"),
        );
        drain(&mut s);
        s.handle_timeout(t0 + 4_000 * MS);
        let acts = drain(&mut s);
        assert!(acts.contains(&Action::Relay(ToRelay::Close)), "{acts:?}");
        let (msg, reason) = error_then_close(&acts);
        assert_eq!(msg, "broker unavailable");
        assert!(matches!(reason, CloseReason::BrokerLost(_)), "{reason:?}");
    }

    #[test]
    fn frames_held_for_a_relay_leg_opened_later_are_bounded() {
        let t0 = Instant::now();
        let mut s = connected_without_relay(t0, false);
        let send = Frame::new(Command::Send).with_header("destination", "/queue/q");
        for _ in 0..2 {
            s.handle_client_frame(t0, send.clone());
        }
        drain(&mut s);
        s.handle_client_frame(t0, send);
        let (msg, _) = error_then_close(&drain(&mut s));
        assert_eq!(msg, "Limit exceeded: session.max_pending_frames");
    }

    #[test]
    fn with_no_relay_leg_disconnect_and_drain_answer_at_once() {
        let t0 = Instant::now();
        let mut s = connected_without_relay(t0, false);
        s.handle_client_frame(
            t0,
            Frame::new(Command::Disconnect).with_header("receipt", "bye"),
        );
        assert_eq!(
            drain(&mut s),
            vec![
                Action::Client(ToClient::Frame(receipt("bye"))),
                Action::Client(ToClient::Close(CloseReason::ClientDisconnect))
            ]
        );

        let mut s = connected_without_relay(t0, false);
        s.handle_drain(t0);
        let acts = drain(&mut s);
        assert!(
            !acts.iter().any(|a| matches!(a, Action::Relay(_))),
            "{acts:?}"
        );
        assert_eq!(error_then_close(&acts).1, CloseReason::Shutdown);
    }

    /// An application SEND and a relayed SEND, each with a receipt: the
    /// session owes one confirm (application leg) and one receipt (relay leg).
    fn owing_on_two_legs(t0: Instant) -> (Session, u64) {
        let mut s = connected_without_relay(t0, true);
        s.handle_client_frame(
            t0,
            Frame::new(Command::Send)
                .with_header("destination", "/app/x")
                .with_header("receipt", "app-1"),
        );
        s.handle_client_frame(
            t0,
            Frame::new(Command::Send)
                .with_header("destination", "/topic/t")
                .with_header("receipt", "relay-1"),
        );
        let acts = drain(&mut s);
        let Some(id) = acts.iter().find_map(|a| match a {
            Action::App(p) => Some(p.id),
            _ => None,
        }) else {
            panic!("{acts:?}")
        };
        assert!(acts
            .iter()
            .any(|a| matches!(a, Action::Relay(ToRelay::Open(_)))));
        relay_connected(&mut s, t0);
        let acts = drain(&mut s);
        assert!(
            matches!(acts.as_slice(), [Action::Relay(ToRelay::Frame(f))] if f.header("receipt") == Some("relay-1")),
            "{acts:?}"
        );
        (s, id)
    }

    #[test]
    fn drain_with_receipts_owed_on_two_legs_waits_for_both_in_any_order() {
        let t0 = Instant::now();
        let flush = "stomp-gateway-drain-s7";
        for confirm_first in [true, false] {
            let (mut s, id) = owing_on_two_legs(t0);
            s.handle_drain(t0);
            let acts = drain(&mut s);
            assert!(
                matches!(acts.as_slice(), [Action::Relay(ToRelay::Frame(f))]
                    if f.command == Command::Disconnect && f.header("receipt") == Some(flush)),
                "the relay leg is flushed at once: {acts:?}"
            );
            // Client frames after the drain started are not served.
            s.handle_client_frame(
                t0,
                Frame::new(Command::Send)
                    .with_header("destination", "/topic/t")
                    .with_header("receipt", "late"),
            );
            assert!(drain(&mut s).is_empty());

            let mut seen = Vec::new();
            let steps: [&dyn Fn(&mut Session); 2] = [
                &|s: &mut Session| s.handle_publish_result(t0, id, Ok(())),
                &|s: &mut Session| {
                    s.handle_broker_frame(t0, receipt("relay-1"));
                    s.handle_broker_frame(t0, receipt(flush));
                },
            ];
            let order: [usize; 2] = if confirm_first { [0, 1] } else { [1, 0] };
            for (n, step) in order.into_iter().enumerate() {
                steps[step](&mut s);
                let acts = drain(&mut s);
                seen.extend(client_frames(&acts).into_iter().cloned());
                if n == 0 {
                    assert!(!s.is_closed(), "one leg still owes: {acts:?}");
                } else {
                    assert_eq!(error_then_close(&acts).1, CloseReason::Shutdown);
                }
            }
            let receipts: Vec<&str> = seen.iter().filter_map(|f| f.header("receipt-id")).collect();
            let mut sorted = receipts.clone();
            sorted.sort_unstable();
            assert_eq!(sorted, ["app-1", "relay-1"], "{receipts:?}");
            assert!(!receipts.contains(&flush), "the flush receipt is ours");
            let last = seen.last().expect("frames");
            assert_eq!(last.header("message"), Some("server shutting down"));
        }
    }

    #[test]
    fn disconnect_receipt_comes_once_every_leg_settled() {
        let t0 = Instant::now();
        let (mut s, id) = owing_on_two_legs(t0);
        let d = Frame::new(Command::Disconnect).with_header("receipt", "bye");
        s.handle_client_frame(t0, d.clone());
        assert_eq!(drain(&mut s), vec![Action::Relay(ToRelay::Frame(d))]);
        s.handle_broker_frame(t0, receipt("relay-1"));
        s.handle_broker_frame(t0, receipt("bye"));
        let acts = drain(&mut s);
        assert_eq!(
            acts,
            vec![
                Action::Client(ToClient::Frame(receipt("relay-1"))),
                Action::Relay(ToRelay::Close)
            ],
            "the relay leg is done, the application leg still owes"
        );
        assert!(!s.is_closed());
        s.handle_publish_result(t0, id, Ok(()));
        assert_eq!(
            drain(&mut s),
            vec![
                Action::Client(ToClient::Frame(receipt("app-1"))),
                Action::Client(ToClient::Frame(receipt("bye"))),
                Action::Client(ToClient::Close(CloseReason::ClientDisconnect))
            ]
        );
    }

    #[test]
    fn disconnect_without_receipt_waits_for_confirms_only() {
        let t0 = Instant::now();
        let (mut s, id) = owing_on_two_legs(t0);
        s.handle_client_frame(t0, Frame::new(Command::Disconnect));
        assert!(drain(&mut s).is_empty(), "a confirm is owed");
        s.handle_publish_result(t0, id, Ok(()));
        assert_eq!(
            drain(&mut s),
            vec![
                Action::Client(ToClient::Frame(receipt("app-1"))),
                Action::Relay(ToRelay::Frame(Frame::new(Command::Disconnect))),
                Action::Relay(ToRelay::Close),
                Action::Client(ToClient::Close(CloseReason::ClientDisconnect))
            ]
        );
    }

    // ----- the shared path ----------------------------------------------

    const ALL_SHARED: SharedPaths = SharedPaths {
        topic: true,
        exchange: true,
        user: true,
    };

    /// No relay leg at CONNECT, the shared path on `paths`; with the control
    /// plane, alice authenticates and may send to users.
    fn shared_cfg(paths: SharedPaths, control_plane: bool) -> Arc<SessionConfig> {
        let mut c = if control_plane {
            (*cp_config(Some(Arc::new(TokenAuth)), true)).clone()
        } else {
            (*config()).clone()
        };
        c.open_relay_at_connect = false;
        c.shared = paths;
        Arc::new(c)
    }

    fn shared_session(t0: Instant, paths: SharedPaths, control_plane: bool) -> Session {
        let mut s = Session::new(shared_cfg(paths, control_plane), "s5", t0);
        let connect = connect_frame("0,0").with_header("token", "alice-token");
        s.handle_client_frame(t0, connect);
        let acts = drain(&mut s);
        assert!(
            matches!(acts.as_slice(), [Action::Client(ToClient::Frame(f))] if f.command == Command::Connected),
            "{acts:?}"
        );
        s
    }

    fn sub_to(id: &str, destination: &str) -> Frame {
        Frame::new(Command::Subscribe)
            .with_header("id", id)
            .with_header("destination", destination)
    }

    fn hub_subscribe(id: &str, key: &str, destination: &str) -> Action {
        Action::Shared(ToShared::Subscribe {
            id: id.into(),
            key: key.into(),
            destination: destination.into(),
        })
    }

    fn client_receipt(id: &str) -> Action {
        Action::Client(ToClient::Frame(receipt(id)))
    }

    #[test]
    fn a_shared_subscribe_goes_to_the_hub_and_is_receipted_once_bound() {
        let t0 = Instant::now();
        let mut s = shared_session(t0, ALL_SHARED, false);
        s.handle_client_frame(t0, sub_to("0", "/topic/a").with_header("receipt", "r0"));
        assert_eq!(
            drain(&mut s),
            vec![hub_subscribe("0", "/topic/a", "/topic/a")],
            "no relay leg, no receipt yet"
        );
        assert_eq!(s.subscription_count(), 1);
        assert_eq!(s.shared_subscription_count(), 1);
        assert_eq!(s.poll_timeout(), None, "no leg, nothing held");
        s.handle_shared_subscribed(t0, "nope");
        assert!(drain(&mut s).is_empty(), "unknown id ignored");
        s.handle_shared_subscribed(t0 + MS, "0");
        assert_eq!(drain(&mut s), vec![client_receipt("r0")]);
        s.handle_shared_subscribed(t0 + MS, "0");
        assert!(drain(&mut s).is_empty(), "answered once");

        // `ack:auto` said out loud, `/exchange/` with and without a pattern;
        // without a receipt nothing reaches the client.
        s.handle_client_frame(
            t0,
            sub_to("1", "/exchange/adme.exchange/room.*").with_header("ack", "auto"),
        );
        assert_eq!(
            drain(&mut s),
            vec![hub_subscribe(
                "1",
                "/exchange/adme.exchange/room.*",
                "/exchange/adme.exchange/room.*"
            )]
        );
        s.handle_shared_subscribed(t0, "1");
        assert!(drain(&mut s).is_empty());
        assert_eq!(s.shared_subscription_count(), 2);
        assert!(!s.is_closed());
    }

    #[test]
    fn subscriptions_that_need_broker_state_take_the_relay_leg() {
        let t0 = Instant::now();
        let topic_with = |k: &str, v: &str| sub_to("0", "/topic/a").with_header(k, v);
        let cases = [
            topic_with("ack", "client"),
            topic_with("ack", "client-individual"),
            topic_with("durable", "true"),
            topic_with("persistent", "true"),
            topic_with("auto-delete", "false"),
            topic_with("exclusive", "true"),
            topic_with("x-queue-name", "mine"),
            topic_with("selector", "a = 1"),
            topic_with("x-max-length", "10"),
            topic_with("X-Message-TTL", "10"),
            sub_to("0", "/queue/q"),
            sub_to("0", "/amq/queue/q"),
            sub_to("0", "/temp-queue/t"),
            sub_to("0", "/reply-queue/r"),
            // Forms RabbitMQ refuses keep getting its own answer.
            sub_to("0", "/topic/a/b"),
            sub_to("0", "/exchange//k"),
            sub_to("0", "/exchange/x/a/b"),
        ];
        for sub in cases {
            let mut s = shared_session(t0, ALL_SHARED, false);
            s.handle_client_frame(t0, sub.clone());
            let acts = drain(&mut s);
            assert!(
                matches!(acts.as_slice(), [Action::Relay(ToRelay::Open(_))]),
                "{sub:?}: {acts:?}"
            );
            assert_eq!(s.subscription_count(), 1);
            assert_eq!(s.shared_subscription_count(), 0);
            relay_connected(&mut s, t0);
            assert_eq!(drain(&mut s), vec![Action::Relay(ToRelay::Frame(sub))]);
        }
    }

    #[test]
    fn each_shared_path_flag_serves_its_own_prefix_only() {
        let t0 = Instant::now();
        let flags = [
            SharedPaths {
                topic: true,
                ..SharedPaths::default()
            },
            SharedPaths {
                exchange: true,
                ..SharedPaths::default()
            },
            SharedPaths {
                user: true,
                ..SharedPaths::default()
            },
            SharedPaths::default(),
        ];
        for paths in flags {
            for (dest, served) in [
                ("/topic/a", paths.topic),
                ("/exchange/x/p", paths.exchange),
                ("/user/queue/n", paths.user),
            ] {
                let mut s = shared_session(t0, paths, true);
                s.handle_client_frame(t0, sub_to("0", dest));
                let acts = drain(&mut s);
                if served {
                    assert!(
                        matches!(
                            acts.as_slice(),
                            [Action::Shared(ToShared::Subscribe { .. })]
                        ),
                        "{paths:?} {dest}: {acts:?}"
                    );
                } else {
                    assert!(
                        matches!(acts.as_slice(), [Action::Relay(ToRelay::Open(_))]),
                        "{paths:?} {dest}: {acts:?}"
                    );
                }
                assert_eq!(s.shared_subscription_count(), usize::from(served));
            }
        }
    }

    #[test]
    fn a_shared_user_subscription_is_keyed_by_the_users_routing_key() {
        let t0 = Instant::now();
        let mut s = shared_session(t0, ALL_SHARED, true);
        s.handle_client_frame(t0, sub_to("n", "/user/queue/notifications"));
        assert_eq!(
            drain(&mut s),
            vec![hub_subscribe(
                "n",
                "/exchange/stomp.user/alice.queue.notifications",
                "/user/queue/notifications"
            )]
        );
    }

    #[test]
    fn unsubscribing_a_shared_subscription_answers_at_once() {
        let t0 = Instant::now();
        let mut s = shared_session(t0, ALL_SHARED, false);
        s.handle_client_frame(t0, sub_to("0", "/topic/a"));
        s.handle_shared_subscribed(t0, "0");
        drain(&mut s);
        let unsub = Frame::new(Command::Unsubscribe)
            .with_header("id", "0")
            .with_header("receipt", "u0");
        s.handle_client_frame(t0, unsub.clone());
        assert_eq!(
            drain(&mut s),
            vec![
                Action::Shared(ToShared::Unsubscribe { id: "0".into() }),
                client_receipt("u0")
            ],
            "never to a relay leg"
        );
        assert_eq!(s.subscription_count(), 0);
        assert_eq!(s.shared_subscription_count(), 0);
        // Late answers for it are ignored; so is losing what it no longer has.
        s.handle_shared_subscribed(t0, "0");
        s.handle_shared_failed(t0, "0", "gone");
        s.handle_shared_lost(t0, "gap");
        assert!(drain(&mut s).is_empty());
        assert!(!s.is_closed());

        // Unsubscribed before it was bound: its SUBSCRIBE is answered first.
        s.handle_client_frame(t0, sub_to("1", "/topic/b").with_header("receipt", "r1"));
        drain(&mut s);
        let mut unsub = unsub;
        unsub.set_header("id", "1");
        s.handle_client_frame(t0, unsub);
        assert_eq!(
            drain(&mut s),
            vec![
                client_receipt("r1"),
                Action::Shared(ToShared::Unsubscribe { id: "1".into() }),
                client_receipt("u0")
            ]
        );
        s.handle_shared_subscribed(t0, "1");
        assert!(drain(&mut s).is_empty());
        // The id may be used again.
        s.handle_client_frame(t0, sub_to("1", "/topic/b"));
        assert_eq!(
            drain(&mut s),
            vec![hub_subscribe("1", "/topic/b", "/topic/b")]
        );
    }

    #[test]
    fn subscription_ids_and_the_limit_are_shared_by_both_paths() {
        let t0 = Instant::now();
        let mut s = shared_session(t0, ALL_SHARED, false);
        s.handle_client_frame(t0, sub_to("a", "/topic/a"));
        drain(&mut s);
        s.handle_client_frame(t0, sub_to("a", "/queue/q"));
        let (msg, _) = error_then_close(&drain(&mut s));
        assert_eq!(msg, "Duplicated subscription identifier");

        let mut s = shared_session(t0, ALL_SHARED, false);
        s.handle_client_frame(t0, sub_to("b", "/queue/q"));
        drain(&mut s);
        s.handle_client_frame(t0, sub_to("b", "/topic/a"));
        let (msg, _) = error_then_close(&drain(&mut s));
        assert_eq!(msg, "Duplicated subscription identifier");

        // max_subscriptions is 2 in the test configuration.
        let mut s = shared_session(t0, ALL_SHARED, false);
        s.handle_client_frame(t0, sub_to("a", "/topic/a"));
        s.handle_client_frame(t0, sub_to("b", "/queue/q"));
        drain(&mut s);
        assert_eq!(s.subscription_count(), 2);
        s.handle_client_frame(t0, sub_to("c", "/topic/c"));
        let (msg, _) = error_then_close(&drain(&mut s));
        assert_eq!(msg, "Limit exceeded: session.max_subscriptions");
    }

    fn app_publish(acts: &[Action]) -> &AppPublish {
        match acts {
            [Action::App(p)] => p,
            other => panic!("one AMQP publish: {other:?}"),
        }
    }

    #[test]
    fn a_send_without_a_relay_leg_is_published_over_amqp() {
        let t0 = Instant::now();
        let mut s = shared_session(t0, ALL_SHARED, true);
        let send = Frame::new(Command::Send)
            .with_header("destination", "/topic/room.42")
            .with_header("receipt", "s1")
            .with_header("content-type", "text/plain")
            .with_header("persistent", "true")
            .with_header("user-id", "alice")
            .with_header("stomp-user", "admin")
            .with_body("hi");
        s.handle_client_frame(t0, send);
        let acts = drain(&mut s);
        let p = app_publish(&acts).clone();
        assert_eq!(p.exchange.as_deref(), Some("amq.topic"));
        assert_eq!(p.routing_key, "room.42");
        assert_eq!(p.destination, "/topic/room.42");
        assert_eq!(p.content_type.as_deref(), Some("text/plain"));
        // The plugin keeps `receipt` among a SEND's message headers.
        assert_eq!(
            p.headers,
            vec![
                ("persistent".into(), "true".into()),
                ("receipt".into(), "s1".into())
            ]
        );
        assert_eq!(&p.body[..], b"hi");
        assert_eq!(s.inflight_publishes(), 1);
        s.handle_publish_result(t0, p.id, Ok(()));
        assert_eq!(drain(&mut s), vec![client_receipt("s1")]);

        let send = |d: &str| Frame::new(Command::Send).with_header("destination", d);
        s.handle_client_frame(t0, send("/exchange/adme.exchange/room.42"));
        let acts = drain(&mut s);
        let p = app_publish(&acts);
        assert_eq!(
            (p.exchange.as_deref(), p.routing_key.as_str()),
            (Some("adme.exchange"), "room.42")
        );
        s.handle_client_frame(t0, send("/user/bob/queue/x"));
        let acts = drain(&mut s);
        let p = app_publish(&acts);
        assert_eq!(p.exchange.as_deref(), Some("stomp.user"));
        assert_eq!(p.routing_key, "bob.queue.x");
        assert_eq!(p.destination, "/exchange/stomp.user/bob.queue.x");
        // The same in-flight limit as application SENDs (2 here).
        s.handle_client_frame(t0, send("/topic/a"));
        let (msg, _) = error_then_close(&drain(&mut s));
        assert_eq!(msg, "Limit exceeded: app.max_inflight_per_session");
    }

    #[test]
    fn sends_take_the_relay_leg_once_it_is_opened_or_in_a_transaction() {
        let t0 = Instant::now();
        let send = Frame::new(Command::Send).with_header("destination", "/topic/a");
        // A transaction needs the relay leg even before it is opened.
        let mut s = shared_session(t0, ALL_SHARED, false);
        let in_tx = send.clone().with_header("transaction", "t1");
        s.handle_client_frame(t0, in_tx.clone());
        let acts = drain(&mut s);
        assert!(
            matches!(acts.as_slice(), [Action::Relay(ToRelay::Open(_))]),
            "{acts:?}"
        );
        // Opening, then open: relayed, in order with what came before.
        s.handle_client_frame(t0, send.clone());
        assert!(drain(&mut s).is_empty(), "held while the leg opens");
        relay_connected(&mut s, t0);
        assert_eq!(
            drain(&mut s),
            vec![
                Action::Relay(ToRelay::Frame(in_tx)),
                Action::Relay(ToRelay::Frame(send.clone()))
            ]
        );
        s.handle_client_frame(t0, send.clone());
        assert_eq!(
            drain(&mut s),
            vec![Action::Relay(ToRelay::Frame(send.clone()))]
        );
        // Shared SUBSCRIBEs still go to the hub.
        s.handle_client_frame(t0, sub_to("0", "/topic/a"));
        assert_eq!(
            drain(&mut s),
            vec![hub_subscribe("0", "/topic/a", "/topic/a")]
        );

        // With the leg opened at CONNECT, every SEND is relayed.
        let mut cfg = (*config()).clone();
        cfg.shared = ALL_SHARED;
        let mut s = Session::new(Arc::new(cfg), "s6", t0);
        s.handle_client_frame(t0, connect_frame("0,0"));
        relay_connected(&mut s, t0);
        drain(&mut s);
        s.handle_client_frame(t0, send.clone());
        assert_eq!(drain(&mut s), vec![Action::Relay(ToRelay::Frame(send))]);
        // Without the shared path on a prefix, as before.
        let mut s = shared_session(t0, SharedPaths::default(), false);
        s.handle_client_frame(
            t0,
            Frame::new(Command::Send).with_header("destination", "/topic/a"),
        );
        let acts = drain(&mut s);
        assert!(
            matches!(acts.as_slice(), [Action::Relay(ToRelay::Open(_))]),
            "{acts:?}"
        );
    }

    #[test]
    fn amqp_sends_wait_for_the_shared_subscribes_before_them() {
        let t0 = Instant::now();
        for control_plane in [true, false] {
            let mut s = shared_session(t0, ALL_SHARED, control_plane);
            s.handle_client_frame(t0, sub_to("0", "/topic/a"));
            drain(&mut s);
            if control_plane {
                s.handle_client_frame(t0, app_send("app"));
            }
            s.handle_client_frame(
                t0,
                Frame::new(Command::Send)
                    .with_header("destination", "/topic/a")
                    .with_body("topic"),
            );
            assert!(drain(&mut s).is_empty(), "held behind the binding");
            assert_eq!(s.poll_timeout(), Some(t0 + 4_000 * MS));
            s.handle_shared_subscribed(t0 + MS, "0");
            let acts = drain(&mut s);
            let published: Vec<(Option<&str>, &[u8])> = acts
                .iter()
                .map(|a| match a {
                    Action::App(p) => (p.exchange.as_deref(), &p.body[..]),
                    other => panic!("{other:?}"),
                })
                .collect();
            if control_plane {
                assert_eq!(
                    published,
                    [(None, &b"app"[..]), (Some("amq.topic"), &b"topic"[..])]
                );
            } else {
                assert_eq!(published, [(Some("amq.topic"), &b"topic"[..])]);
            }
        }

        // The client's receipt comes first; a binding slower than the
        // broker timeout stops holding, and its receipt still comes later.
        let mut s = shared_session(t0, ALL_SHARED, true);
        s.handle_client_frame(t0, sub_to("0", "/topic/a").with_header("receipt", "r0"));
        s.handle_client_frame(t0, sub_to("1", "/topic/b").with_header("receipt", "r1"));
        s.handle_client_frame(t0, app_send("x"));
        drain(&mut s);
        s.handle_shared_subscribed(t0, "0");
        assert_eq!(drain(&mut s), vec![client_receipt("r0")], "r1 still holds");
        s.handle_timeout(t0 + 4_000 * MS);
        let acts = drain(&mut s);
        assert!(app_publish(&acts).exchange.is_none(), "{acts:?}");
        s.handle_shared_subscribed(t0 + 5_000 * MS, "1");
        assert_eq!(drain(&mut s), vec![client_receipt("r1")]);
    }

    #[test]
    fn the_plugins_late_subscription_not_found_error_does_not_end_the_session() {
        let t0 = Instant::now();
        let mut s = Session::new(Arc::new(SessionConfig::default()), "late", t0);
        s.handle_client_frame(
            t0,
            Frame::new(Command::Connect).with_header("accept-version", "1.2"),
        );
        s.handle_broker_frame(
            t0,
            Frame::new(Command::Connected).with_header("version", "1.2"),
        );
        let sub = |id: &str| {
            Frame::new(Command::Subscribe)
                .with_header("id", id)
                .with_header("destination", "/topic/t")
        };
        s.handle_client_frame(t0, sub("a"));
        s.handle_client_frame(t0, sub("b"));
        s.handle_client_frame(t0, Frame::new(Command::Unsubscribe).with_header("id", "a"));
        while s.poll_action().is_some() {}
        let late = |id: &str| {
            Frame::new(Command::Error)
                .with_header("message", "Subscription not found")
                .with_body(format!(
                    "There is no current subscription with tag 'T_{id}'."
                ))
        };
        s.handle_broker_frame(t0, late("a"));
        assert!(s.poll_action().is_none(), "dropped");
        assert!(s.is_connected());
        // For a subscription the session still has, it is a real error.
        s.handle_broker_frame(t0, late("b"));
        assert!(s.is_closed());
    }

    #[test]
    fn connect_without_a_relay_leg_is_refused_while_the_broker_is_unavailable() {
        let t0 = Instant::now();
        let config = Arc::new(SessionConfig {
            open_relay_at_connect: false,
            ..SessionConfig::default()
        });
        let connect = Frame::new(Command::Connect).with_header("accept-version", "1.2");
        let mut s = Session::new(config.clone(), "down", t0);
        s.set_broker_unavailable(Some("shared upstream: connection refused".into()));
        s.handle_client_frame(t0, connect.clone());
        let acts: Vec<Action> = std::iter::from_fn(|| s.poll_action()).collect();
        assert!(
            matches!(&acts[0], Action::Client(ToClient::Frame(f)) if f.command == Command::Error
                && f.header("message") == Some("broker unavailable")),
            "{acts:?}"
        );
        assert!(s.is_closed());
        assert_eq!(s.close_reason().map(CloseReason::ws_code), Some(1011));
        let mut s = Session::new(config, "up", t0);
        s.set_broker_unavailable(None);
        s.handle_client_frame(t0, connect);
        assert!(s.is_connected());
    }

    #[test]
    fn client_silence_while_frames_wait_for_a_lazy_leg_is_not_a_heartbeat_timeout() {
        let t0 = Instant::now();
        let config = SessionConfig {
            client_heartbeat: HeartBeat::new(0, 1_000),
            open_relay_at_connect: false,
            broker_timeout: Duration::from_secs(10),
            ..SessionConfig::default()
        };
        let mut s = Session::new(Arc::new(config), "hb", t0);
        s.handle_client_frame(
            t0,
            Frame::new(Command::Connect)
                .with_header("accept-version", "1.2")
                .with_header("heart-beat", "1000,0"),
        );
        while s.poll_action().is_some() {}
        s.handle_client_frame(
            t0,
            Frame::new(Command::Begin).with_header("transaction", "t"),
        );
        assert!(s.holds_relay_frames());
        // Twice the interval passes while the leg opens: no timeout.
        let t = t0 + Duration::from_secs(5);
        s.handle_timeout(t);
        assert!(!s.is_closed());
        s.handle_broker_frame(
            t,
            Frame::new(Command::Connected).with_header("version", "1.2"),
        );
        assert!(!s.holds_relay_frames());
        // The client's clock restarts when the leg is up.
        s.handle_timeout(t + Duration::from_millis(1_500));
        assert!(!s.is_closed());
        s.handle_timeout(t + Duration::from_millis(2_500));
        assert!(s.is_closed());
    }

    #[test]
    fn disconnect_and_drain_wait_for_pending_shared_subscribes() {
        let t0 = Instant::now();
        let mut s = shared_session(t0, ALL_SHARED, false);
        s.handle_client_frame(t0, sub_to("0", "/topic/a").with_header("receipt", "r0"));
        drain(&mut s);
        s.handle_client_frame(
            t0 + MS,
            Frame::new(Command::Disconnect).with_header("receipt", "bye"),
        );
        assert!(drain(&mut s).is_empty(), "the binding is owed");
        assert_eq!(s.poll_timeout(), Some(t0 + MS + 4_000 * MS));
        s.handle_shared_subscribed(t0 + 2 * MS, "0");
        assert_eq!(
            drain(&mut s),
            vec![
                client_receipt("r0"),
                client_receipt("bye"),
                Action::Client(ToClient::Close(CloseReason::ClientDisconnect))
            ]
        );

        // A binding that never answers: the closing gives up after the
        // broker timeout, with an ERROR instead of the DISCONNECT receipt.
        let mut s = shared_session(t0, ALL_SHARED, false);
        s.handle_client_frame(t0, sub_to("0", "/topic/a"));
        s.handle_client_frame(
            t0,
            Frame::new(Command::Disconnect).with_header("receipt", "bye"),
        );
        drain(&mut s);
        s.handle_timeout(t0 + 4_000 * MS);
        let acts = drain(&mut s);
        assert!(!acts.contains(&client_receipt("bye")), "{acts:?}");
        let (msg, reason) = error_then_close(&acts);
        assert_eq!(msg, "shared subscription failed");
        assert_eq!(reason.ws_code(), 1011);

        // Also without a receipt and with a relay leg open (which owes no
        // flush then): the leg is closed with the session.
        let mut s = shared_session(t0, ALL_SHARED, false);
        s.handle_client_frame(t0, sub_to("q", "/queue/q"));
        relay_connected(&mut s, t0);
        s.handle_client_frame(t0, sub_to("0", "/topic/a"));
        s.handle_client_frame(t0, Frame::new(Command::Disconnect));
        drain(&mut s);
        assert_eq!(s.poll_timeout(), Some(t0 + 4_000 * MS));
        s.handle_timeout(t0 + 4_000 * MS);
        let acts = drain(&mut s);
        assert!(acts.contains(&Action::Relay(ToRelay::Close)), "{acts:?}");
        let (msg, body) = error_parts(&acts);
        assert_eq!(msg, "shared subscription failed");
        assert!(body.contains("\"0\""), "{body}");

        // A drain too, then its usual ERROR.
        let mut s = shared_session(t0, ALL_SHARED, false);
        s.handle_client_frame(t0, sub_to("0", "/topic/a").with_header("receipt", "r0"));
        drain(&mut s);
        s.handle_drain(t0);
        assert!(drain(&mut s).is_empty());
        s.handle_shared_subscribed(t0, "0");
        let acts = drain(&mut s);
        assert_eq!(acts[0], client_receipt("r0"));
        assert_eq!(error_then_close(&acts).1, CloseReason::Shutdown);
    }

    #[test]
    fn a_failed_shared_subscription_ends_the_session_with_1011() {
        let t0 = Instant::now();
        let mut s = shared_session(t0, ALL_SHARED, false);
        s.handle_client_frame(t0, sub_to("0", "/exchange/nope/k"));
        s.handle_client_frame(t0, sub_to("1", "/queue/q"));
        relay_connected(&mut s, t0);
        drain(&mut s);
        s.handle_shared_failed(t0, "1", "not mine");
        assert!(
            drain(&mut s).is_empty(),
            "a relay subscription is not the hub's"
        );
        s.handle_shared_failed(t0, "0", "NOT_FOUND - no exchange 'nope' in vhost '/'");
        let acts = drain(&mut s);
        assert!(
            acts.contains(&Action::Relay(ToRelay::Close)),
            "the relay leg closes too: {acts:?}"
        );
        let (msg, body) = error_parts(&acts);
        assert_eq!(msg, "shared subscription failed");
        assert!(body.contains("/exchange/nope/k"), "{body}");
        assert!(body.contains("no exchange 'nope'"), "{body}");
        let (_, reason) = error_then_close(&acts);
        assert!(matches!(reason, CloseReason::BrokerError(_)), "{reason:?}");
        assert_eq!(reason.ws_code(), 1011);
        assert!(s.is_closed());
        s.handle_shared_failed(t0, "0", "again");
        assert!(drain(&mut s).is_empty());

        // While closing it finishes the close the same way.
        let mut s = shared_session(t0, ALL_SHARED, false);
        s.handle_client_frame(t0, sub_to("0", "/topic/a"));
        s.handle_client_frame(
            t0,
            Frame::new(Command::Disconnect).with_header("receipt", "bye"),
        );
        drain(&mut s);
        s.handle_shared_failed(t0, "0", "upstream down");
        let (msg, reason) = error_then_close(&drain(&mut s));
        assert_eq!(msg, "shared subscription failed");
        assert_eq!(reason.ws_code(), 1011);
    }

    #[test]
    fn a_slow_consumer_is_closed_with_1008() {
        let t0 = Instant::now();
        let mut s = shared_session(t0, ALL_SHARED, false);
        s.handle_client_frame(t0, sub_to("q", "/queue/q"));
        relay_connected(&mut s, t0);
        drain(&mut s);
        s.handle_slow_consumer(t0, "more than 1048576 bytes queued");
        let acts = drain(&mut s);
        assert!(acts.contains(&Action::Relay(ToRelay::Close)), "{acts:?}");
        let (msg, body) = error_parts(&acts);
        assert_eq!(msg, "slow consumer");
        assert_eq!(body, "more than 1048576 bytes queued");
        let (_, reason) = error_then_close(&acts);
        assert_eq!(
            reason,
            CloseReason::SlowConsumer("more than 1048576 bytes queued".into())
        );
        assert_eq!(reason.ws_code(), 1008);
        assert_eq!(
            reason.to_string(),
            "slow consumer: more than 1048576 bytes queued"
        );
        s.handle_slow_consumer(t0, "again");
        assert!(drain(&mut s).is_empty());
    }

    #[test]
    fn a_shared_gap_closes_only_sessions_with_shared_subscriptions() {
        let t0 = Instant::now();
        let mut s = shared_session(t0, ALL_SHARED, false);
        s.handle_shared_lost(t0, "reconnect and resubscribe");
        assert!(drain(&mut s).is_empty());
        s.handle_client_frame(t0, sub_to("q", "/queue/q"));
        drain(&mut s);
        s.handle_shared_lost(t0, "reconnect and resubscribe");
        assert!(drain(&mut s).is_empty(), "relay subscriptions lose nothing");
        assert!(!s.is_closed());

        let mut s = shared_session(t0, ALL_SHARED, false);
        s.handle_client_frame(t0, sub_to("0", "/topic/a"));
        s.handle_shared_subscribed(t0, "0");
        drain(&mut s);
        s.handle_shared_lost(t0, "messages were lost; reconnect and resubscribe");
        let acts = drain(&mut s);
        let (msg, body) = error_parts(&acts);
        assert_eq!(msg, "shared subscription interrupted");
        assert_eq!(body, "messages were lost; reconnect and resubscribe");
        let (_, reason) = error_then_close(&acts);
        assert!(matches!(reason, CloseReason::BrokerLost(_)), "{reason:?}");
        assert_eq!(reason.ws_code(), 1011);
    }
}
