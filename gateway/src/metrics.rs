//! Prometheus metrics, served as `GET /metrics` on the admin listener.
//!
//! Every series carries the constant label `pod` (see `server.pod_id`), so a
//! dashboard can tell the pods of a deployment apart. Counters for the hot
//! path (frames, bytes) are resolved once at start-up, so counting a frame is
//! one atomic add. Every label takes values from a fixed set (commands,
//! reasons, transports, link kinds): no series per destination or per user.
//! Every metric is described in `docs/operations.md`.

use crate::health::Health;
use prometheus::{
    Encoder, Histogram, HistogramOpts, HistogramVec, IntCounter, IntCounterVec, IntGauge,
    IntGaugeVec, Opts, Registry, TextEncoder,
};
use relay_core::session::CloseReason;
use relay_core::Command;
use std::collections::HashMap;
use std::time::Duration;

/// The gateway's metrics.
#[derive(Debug, Clone)]
pub struct Metrics {
    registry: Registry,
    pub sessions_opened: IntCounter,
    closed: IntCounterVec,
    pub frames_client_to_broker: IntCounter,
    pub frames_broker_to_client: IntCounter,
    pub bytes_client_to_broker: IntCounter,
    pub bytes_broker_to_client: IntCounter,
    pub broker_connect_failures: IntCounter,
    pub app_published: IntCounter,
    pub app_failed: IntCounter,
    pub backpressure_pauses: IntCounter,
    /// Sessions dropped by the local hub for not reading their messages.
    pub slow_consumers: IntCounter,
    /// Messages the shared upstream received from RabbitMQ.
    pub shared_messages: IntCounter,
    /// MESSAGE frames the shared fan-out queued for subscribers.
    pub shared_deliveries: IntCounter,
    /// Times the shared upstream came back after a loss (messages published
    /// in between were lost for this pod's shared subscribers).
    pub shared_gaps: IntCounter,
    /// Sessions closed because of such a gap (`fanout.on_upstream_loss = "close"`).
    pub shared_gap_closes: IntCounter,
    /// Bindings the shared upstream's queue has (or will re-make).
    pub shared_bindings: IntGauge,
    /// 1 while the shared upstream is connected.
    pub shared_up: IntGauge,
    rejected: IntCounterVec,
    limit_hits: IntCounterVec,
    /// Frames refused by authorization, by command (`auth_denials_total`).
    denials: IntCounterVec,
    sessions_active: IntGauge,
    system_link_up: IntGauge,
    amqp_up: IntGauge,
    ready: IntGauge,
    /// Frames read from clients, by command.
    pub frames_received: CommandCounters,
    /// Frames written to clients, by command.
    pub frames_sent: CommandCounters,
    sessions_open: IntGaugeVec,
    subscriptions_open: IntGaugeVec,
    links_up: IntGaugeVec,
    /// Broker connections of client sessions open now.
    pub session_links_up: IntGauge,
    reconnects: IntCounterVec,
    broker_connect_seconds: HistogramVec,
    /// Client CONNECT (or STOMP) read to CONNECTED written.
    pub stomp_connect_seconds: Histogram,
    /// A frame read from the client to the same frame written to the broker.
    pub relay_client_to_broker_seconds: Histogram,
    /// A frame read from the broker to the frame(s) it caused written to the client.
    pub relay_broker_to_client_seconds: Histogram,
    /// An application publish handed to the control plane to its confirm (or failure).
    pub app_confirm_seconds: Histogram,
    auth_failures: IntCounterVec,
    draining: IntGauge,
    topology: IntCounterVec,
}

/// One counter per STOMP command, resolved at start-up.
#[derive(Debug, Clone)]
pub struct CommandCounters([IntCounter; COMMANDS.len()]);

impl CommandCounters {
    fn new(vec: &IntCounterVec) -> CommandCounters {
        CommandCounters(COMMANDS.map(|c| vec.with_label_values(&[c.as_str()])))
    }

    /// Counts one frame of `command`.
    pub fn inc(&self, command: Command) {
        let i = COMMANDS.iter().position(|c| *c == command).unwrap_or(0);
        self.0[i].inc();
    }

    /// `COMMAND n` for every command counted at least once, in protocol order.
    fn summary(&self) -> String {
        let parts: Vec<String> = COMMANDS
            .iter()
            .zip(&self.0)
            .filter(|(_, c)| c.get() > 0)
            .map(|(cmd, c)| format!("{} {}", cmd.as_str(), c.get()))
            .collect();
        if parts.is_empty() {
            "none".into()
        } else {
            parts.join(", ")
        }
    }
}

/// A one-line summary of the counters, for the periodic stats log (like
/// Spring's `WebSocketMessageBrokerStats`). Totals are since start.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Stats {
    pub sessions_open: u64,
    /// `transport n` for each transport with open sessions.
    pub transports: String,
    pub sessions_opened: u64,
    pub sessions_closed: u64,
    /// Sessions that ended other than by DISCONNECT, a client going away or
    /// the drain.
    pub closed_abnormally: u64,
    pub subscriptions_open: u64,
    pub frames_in: String,
    pub frames_out: String,
    pub system_link_up: bool,
    pub amqp_up: bool,
    pub session_links_up: u64,
    pub reconnects: u64,
    pub app_confirmed: u64,
    pub app_failed: u64,
    pub auth_failures: u64,
    pub rejected_upgrades: u64,
    pub draining: bool,
}

impl std::fmt::Display for Stats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let up = |b: bool| if b { "up" } else { "down" };
        write!(
            f,
            "sessions[{} open ({}), {} opened, {} closed, {} abnormally], subscriptions[{} open], \
             frames in[{}], frames out[{}], broker[system {}, amqp {}, {} session links, {} reconnects], \
             app publishes[{} confirmed, {} failed], refused[{} authentication, {} upgrades]{}",
            self.sessions_open,
            self.transports,
            self.sessions_opened,
            self.sessions_closed,
            self.closed_abnormally,
            self.subscriptions_open,
            self.frames_in,
            self.frames_out,
            up(self.system_link_up),
            up(self.amqp_up),
            self.session_links_up,
            self.reconnects,
            self.app_confirmed,
            self.app_failed,
            self.auth_failures,
            self.rejected_upgrades,
            if self.draining { ", draining" } else { "" },
        )
    }
}

/// Every STOMP command, the `command` label's values.
const COMMANDS: [Command; 15] = [
    Command::Connect,
    Command::Stomp,
    Command::Connected,
    Command::Send,
    Command::Subscribe,
    Command::Unsubscribe,
    Command::Ack,
    Command::Nack,
    Command::Begin,
    Command::Commit,
    Command::Abort,
    Command::Disconnect,
    Command::Message,
    Command::Receipt,
    Command::Error,
];

/// A connection to RabbitMQ, the `link` label.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Link {
    /// The shared system STOMP connection.
    System,
    /// A client session's own STOMP connection.
    Session,
    /// The AMQP control plane.
    Amqp,
    /// The pod's shared fan-out upstream (AMQP).
    Shared,
}

impl Link {
    fn as_str(self) -> &'static str {
        match self {
            Link::System => "system",
            Link::Session => "session",
            Link::Amqp => "amqp",
            Link::Shared => "shared",
        }
    }
}

/// Why a client could not authenticate, the `reason` label of
/// `auth_failures_total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthFailure {
    /// No token in the CONNECT frame.
    NoToken,
    /// The token expired (`exp`) or is not valid yet (`nbf`).
    Expired,
    /// Bad signature, algorithm, issuer, audience or a malformed token.
    Invalid,
    /// The token has no usable user claim.
    NoUser,
}

impl AuthFailure {
    fn as_str(self) -> &'static str {
        match self {
            AuthFailure::NoToken => "no_token",
            AuthFailure::Expired => "expired",
            AuthFailure::Invalid => "invalid",
            AuthFailure::NoUser => "no_user",
        }
    }
}

const AUTH_FAILURES: [AuthFailure; 4] = [
    AuthFailure::NoToken,
    AuthFailure::Expired,
    AuthFailure::Invalid,
    AuthFailure::NoUser,
];

/// Transports a session can arrive by, the `transport` label: a plain
/// WebSocket endpoint, or a SockJS endpoint's transport (`sockjs-` and the
/// SockJS name).
pub const TRANSPORTS: [&str; 9] = [
    "websocket",
    "sockjs-websocket",
    "sockjs-websocket-raw",
    "sockjs-xhr-streaming",
    "sockjs-xhr-polling",
    "sockjs-eventsource",
    "sockjs-htmlfile",
    "sockjs-jsonp-polling",
    "other",
];

/// The `transport` label of a SockJS session whose transport is `name`
/// (`xhr-streaming`, ...): one of [`TRANSPORTS`].
pub fn sockjs_transport(name: &str) -> &'static str {
    TRANSPORTS
        .iter()
        .find(|t| t.strip_prefix("sockjs-") == Some(name))
        .copied()
        .unwrap_or("other")
}

/// Where a subscription is served, the `path` label.
pub const SUBSCRIPTION_PATHS: [&str; 3] = ["relay", "shared", "embedded"];

/// What the control plane declares, the `kind` label of
/// `topology_declarations_total`.
pub const TOPOLOGY_KINDS: [&str; 3] = ["exchange", "queue", "binding"];

/// Limits exported at 0 from the start in `limit_hits_total` (others, by
/// setting name too, appear when first hit).
const GATEWAY_LIMITS: [&str; 3] = [
    "server.max_connections",
    "server.max_ws_message_size",
    "amqp.max_inflight_publishes",
];

/// Buckets for the relay and confirm latencies (seconds): 100 µs to 2.5 s.
const LATENCY_BUCKETS: [f64; 14] = [
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
];
/// Buckets for connection set-up (seconds): 1 ms to 10 s.
const CONNECT_BUCKETS: [f64; 13] = [
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// Every `reason` label of `sessions_closed_total`.
const CLOSE_REASONS: [&str; 12] = [
    "client_disconnect",
    "client_gone",
    "client_error",
    "access_denied",
    "client_limit",
    "client_websocket_error",
    "connect_timeout",
    "client_heartbeat_timeout",
    "broker_error",
    "broker_lost",
    "slow_consumer",
    "shutdown",
];

/// Every `reason` label of `connections_rejected_total`.
const REJECTIONS: [&str; 3] = ["connection_limit", "origin", "shutting_down"];

/// Why an upgrade request was turned away.
#[derive(Debug, Clone, Copy)]
pub enum Rejection {
    ConnectionLimit,
    Origin,
    ShuttingDown,
}

impl Metrics {
    /// The registry, for series other modules own (SockJS counters).
    pub fn registry(&self) -> &Registry {
        &self.registry
    }

    /// Creates and registers every series with the constant label `pod`.
    pub fn new(pod: &str) -> Result<Metrics, prometheus::Error> {
        let labels: HashMap<String, String> = [("pod".to_owned(), pod.to_owned())].into();
        let registry = Registry::new_custom(Some("stomp_gateway".into()), Some(labels))?;
        let counter = |name: &str, help: &str| -> Result<IntCounter, prometheus::Error> {
            let c = IntCounter::new(name, help)?;
            registry.register(Box::new(c.clone()))?;
            Ok(c)
        };
        let gauge = |name: &str, help: &str| -> Result<IntGauge, prometheus::Error> {
            let g = IntGauge::new(name, help)?;
            registry.register(Box::new(g.clone()))?;
            Ok(g)
        };
        let frames = IntCounterVec::new(
            Opts::new("frames_total", "STOMP frames relayed, by direction"),
            &["direction"],
        )?;
        let bytes = IntCounterVec::new(
            Opts::new("bytes_total", "Encoded STOMP bytes relayed, by direction"),
            &["direction"],
        )?;
        let app = IntCounterVec::new(
            Opts::new(
                "app_publishes_total",
                "Client SENDs to application destinations published over AMQP, by result",
            ),
            &["result"],
        )?;
        let closed = IntCounterVec::new(
            Opts::new("sessions_closed_total", "Client sessions ended, by reason"),
            &["reason"],
        )?;
        let rejected = IntCounterVec::new(
            Opts::new(
                "connections_rejected_total",
                "WebSocket upgrades refused, by reason",
            ),
            &["reason"],
        )?;
        let limit_hits = IntCounterVec::new(
            Opts::new(
                "limit_hits_total",
                "Times a configured limit refused a client, by setting name",
            ),
            &["limit"],
        )?;
        let denials = IntCounterVec::new(
            Opts::new(
                "auth_denials_total",
                "SEND and SUBSCRIBE frames refused by authorization (built-in protections and auth.rules), by command",
            ),
            &["command"],
        )?;
        for v in [
            &frames,
            &bytes,
            &app,
            &closed,
            &rejected,
            &limit_hits,
            &denials,
        ] {
            registry.register(Box::new(v.clone()))?;
        }
        let counter_vec = |name: &str, help: &str, labels: &[&str]| {
            let v = IntCounterVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(v.clone()))?;
            Ok::<_, prometheus::Error>(v)
        };
        let gauge_vec = |name: &str, help: &str, labels: &[&str]| {
            let v = IntGaugeVec::new(Opts::new(name, help), labels)?;
            registry.register(Box::new(v.clone()))?;
            Ok::<_, prometheus::Error>(v)
        };
        let histogram = |name: &str, help: &str, buckets: &[f64]| {
            let h = Histogram::with_opts(HistogramOpts::new(name, help).buckets(buckets.to_vec()))?;
            registry.register(Box::new(h.clone()))?;
            Ok::<_, prometheus::Error>(h)
        };
        let received = counter_vec(
            "frames_received_total",
            "STOMP frames read from clients, by command",
            &["command"],
        )?;
        let sent = counter_vec(
            "frames_sent_total",
            "STOMP frames written to clients, by command",
            &["command"],
        )?;
        let sessions_open = gauge_vec(
            "sessions_open",
            "Client sessions open now, by transport",
            &["transport"],
        )?;
        let subscriptions_open = gauge_vec(
            "subscriptions_open",
            "Client subscriptions open now, by path (relay: the session's own broker connection; shared: the pod's shared upstream; embedded: the embedded broker)",
            &["path"],
        )?;
        let links_up = gauge_vec(
            "broker_links_up",
            "Connections to RabbitMQ up now: system (0/1), session (one per client session with its own STOMP connection), amqp (0/1), shared (0/1, the pod's shared fan-out upstream)",
            &["link"],
        )?;
        let reconnects = counter_vec(
            "broker_reconnects_total",
            "Connections to RabbitMQ re-established after a loss or a failed attempt, by link",
            &["link"],
        )?;
        let broker_connect_seconds = HistogramVec::new(
            HistogramOpts::new(
                "broker_connect_duration_seconds",
                "Time to open a connection to RabbitMQ (TCP, TLS and the protocol handshake), successful attempts, by link",
            )
            .buckets(CONNECT_BUCKETS.to_vec()),
            &["link"],
        )?;
        registry.register(Box::new(broker_connect_seconds.clone()))?;
        let relay = HistogramVec::new(
            HistogramOpts::new(
                "relay_latency_seconds",
                "Time from reading a frame to writing it on the other leg, by direction",
            )
            .buckets(LATENCY_BUCKETS.to_vec()),
            &["direction"],
        )?;
        registry.register(Box::new(relay.clone()))?;
        let auth_failures = counter_vec(
            "auth_failures_total",
            "CONNECTs refused because the client could not authenticate, by reason",
            &["reason"],
        )?;
        let topology = counter_vec(
            "topology_declarations_total",
            "Exchanges, queues and bindings declared by the control plane (at start and after every reconnect), by kind and result",
            &["kind", "result"],
        )?;
        let build_info = gauge_vec(
            "build_info",
            "Always 1; the label says which version of the gateway runs",
            &["version"],
        )?;
        build_info
            .with_label_values(&[env!("CARGO_PKG_VERSION")])
            .set(1);
        // Every known label value is exported from the start (at 0), so a
        // rate() or an alert sees the series before the first event.
        for t in TRANSPORTS {
            sessions_open.with_label_values(&[t]);
        }
        for p in SUBSCRIPTION_PATHS {
            subscriptions_open.with_label_values(&[p]);
        }
        for l in [Link::System, Link::Session, Link::Amqp, Link::Shared] {
            links_up.with_label_values(&[l.as_str()]);
            reconnects.with_label_values(&[l.as_str()]);
            broker_connect_seconds.with_label_values(&[l.as_str()]);
        }
        for r in AUTH_FAILURES {
            auth_failures.with_label_values(&[r.as_str()]);
        }
        for l in GATEWAY_LIMITS {
            limit_hits.with_label_values(&[l]);
        }
        for k in TOPOLOGY_KINDS {
            for r in ["ok", "failed"] {
                topology.with_label_values(&[k, r]);
            }
        }
        // Every known label value is exported from the start (at 0), so a
        // rate() or an alert sees the series before the first event.
        for reason in CLOSE_REASONS {
            closed.with_label_values(&[reason]);
        }
        for reason in REJECTIONS {
            rejected.with_label_values(&[reason]);
        }
        for command in relay_core::policy::RULE_COMMANDS {
            denials.with_label_values(&[command.as_str()]);
        }
        Ok(Metrics {
            sessions_opened: counter("sessions_opened_total", "Client sessions opened")?,
            frames_client_to_broker: frames.with_label_values(&["client_to_broker"]),
            frames_broker_to_client: frames.with_label_values(&["broker_to_client"]),
            bytes_client_to_broker: bytes.with_label_values(&["client_to_broker"]),
            bytes_broker_to_client: bytes.with_label_values(&["broker_to_client"]),
            broker_connect_failures: counter(
                "broker_connect_failures_total",
                "Session broker connections that could not be opened",
            )?,
            app_published: app.with_label_values(&["confirmed"]),
            app_failed: app.with_label_values(&["failed"]),
            backpressure_pauses: counter(
                "backpressure_pauses_total",
                "Times a session stopped reading its broker connection because its client was slow",
            )?,
            slow_consumers: counter(
                "slow_consumers_total",
                "Sessions closed with ERROR 'slow consumer': their queue of hub messages went over hub.max_queued_bytes or hub.max_queued_ms",
            )?,
            shared_messages: counter(
                "shared_messages_total",
                "Messages the shared fan-out upstream received from RabbitMQ",
            )?,
            shared_deliveries: counter(
                "shared_deliveries_total",
                "MESSAGE frames the shared fan-out queued for local subscribers",
            )?,
            shared_gaps: counter(
                "shared_upstream_gaps_total",
                "Times the shared upstream reconnected after a loss; messages published meanwhile were lost for this pod's shared subscribers",
            )?,
            shared_gap_closes: counter(
                "shared_gap_closes_total",
                "Sessions closed because the shared upstream was lost (fanout.on_upstream_loss = \"close\")",
            )?,
            shared_bindings: gauge(
                "shared_bindings",
                "Bindings of the pod's shared upstream queue (live keys, re-made after a reconnect)",
            )?,
            shared_up: links_up.with_label_values(&[Link::Shared.as_str()]),
            sessions_active: gauge("sessions_active", "Client sessions open now")?,
            system_link_up: gauge(
                "system_link_up",
                "1 while the system broker connection is up",
            )?,
            amqp_up: gauge("amqp_up", "1 while the AMQP control plane is connected")?,
            ready: gauge("ready", "1 while /readyz answers 200")?,
            frames_received: CommandCounters::new(&received),
            frames_sent: CommandCounters::new(&sent),
            session_links_up: links_up.with_label_values(&[Link::Session.as_str()]),
            stomp_connect_seconds: histogram(
                "stomp_connect_duration_seconds",
                "Time from a client's CONNECT read to its CONNECTED written (authentication and the broker handshake)",
                &CONNECT_BUCKETS,
            )?,
            relay_client_to_broker_seconds: relay.with_label_values(&["client_to_broker"]),
            relay_broker_to_client_seconds: relay.with_label_values(&["broker_to_client"]),
            app_confirm_seconds: histogram(
                "app_publish_confirm_duration_seconds",
                "Time from a client SEND to an application destination to RabbitMQ's confirm (or the failure)",
                &LATENCY_BUCKETS,
            )?,
            draining: gauge(
                "draining",
                "1 once a SIGTERM started the drain (sessions are being closed over server.drain_period_ms)",
            )?,
            sessions_open,
            subscriptions_open,
            links_up,
            reconnects,
            broker_connect_seconds,
            auth_failures,
            topology,
            closed,
            rejected,
            limit_hits,
            denials,
            registry,
        })
    }

    /// Counts a session end.
    pub fn session_closed(&self, reason: &CloseReason) {
        let label = match reason {
            CloseReason::ClientDisconnect => "client_disconnect",
            CloseReason::ClientGone => "client_gone",
            CloseReason::ClientError(_) => "client_error",
            CloseReason::Policy(_) => "client_limit",
            CloseReason::WebSocket { .. } => "client_websocket_error",
            CloseReason::AccessDenied(_) => "access_denied",
            CloseReason::ConnectTimeout => "connect_timeout",
            CloseReason::ClientHeartbeatTimeout => "client_heartbeat_timeout",
            CloseReason::BrokerError(_) => "broker_error",
            CloseReason::BrokerLost(_) => "broker_lost",
            CloseReason::SlowConsumer(_) => "slow_consumer",
            CloseReason::Shutdown => "shutdown",
        };
        self.closed.with_label_values(&[label]).inc();
    }

    /// Counts a limit that refused a client (`limit` is the setting name,
    /// e.g. `session.max_transactions`).
    pub fn limit_hit(&self, limit: &str) {
        self.limit_hits.with_label_values(&[limit]).inc();
    }

    /// Counts a frame refused by authorization.
    pub fn denied(&self, command: relay_core::Command) {
        self.denials.with_label_values(&[command.as_str()]).inc();
    }

    /// Counts a refused upgrade.
    pub fn rejected(&self, why: Rejection) {
        let label = match why {
            Rejection::ConnectionLimit => "connection_limit",
            Rejection::Origin => "origin",
            Rejection::ShuttingDown => "shutting_down",
        };
        self.rejected.with_label_values(&[label]).inc();
    }

    /// The gauge of sessions open by `transport` (one of [`TRANSPORTS`]).
    /// Increment it when the session opens and decrement it when it ends,
    /// for example with [`GaugeGuard`].
    pub fn sessions_open(&self, transport: &str) -> IntGauge {
        self.sessions_open.with_label_values(&[transport])
    }

    /// The gauge of subscriptions open on `path` (one of [`SUBSCRIPTION_PATHS`]).
    pub fn subscriptions_open(&self, path: &str) -> IntGauge {
        self.subscriptions_open.with_label_values(&[path])
    }

    /// Records a successful connection of `link` that took `took`;
    /// `reconnect` when it follows a loss or a failed attempt.
    pub fn broker_connected(&self, link: Link, took: Duration, reconnect: bool) {
        self.broker_connect_seconds
            .with_label_values(&[link.as_str()])
            .observe(took.as_secs_f64());
        if reconnect {
            self.reconnects.with_label_values(&[link.as_str()]).inc();
        }
    }

    /// Counts a CONNECT refused by authentication.
    pub fn auth_failed(&self, why: AuthFailure) {
        self.auth_failures.with_label_values(&[why.as_str()]).inc();
    }

    /// Counts one declaration of the control plane's topology (`kind` is one
    /// of [`TOPOLOGY_KINDS`]).
    pub fn topology_declared(&self, kind: &str, ok: bool) {
        let result = if ok { "ok" } else { "failed" };
        self.topology.with_label_values(&[kind, result]).inc();
    }

    /// The counters now, for the periodic stats log.
    pub fn stats(&self, health: &Health) -> Stats {
        let count = |v: &IntCounterVec, labels: &[&str]| v.with_label_values(labels).get();
        let gauge = |v: &IntGaugeVec, label: &str| {
            u64::try_from(v.with_label_values(&[label]).get()).unwrap_or(0)
        };
        let transports: Vec<String> = TRANSPORTS
            .iter()
            .map(|t| (t, gauge(&self.sessions_open, t)))
            .filter(|(_, n)| *n > 0)
            .map(|(t, n)| format!("{t} {n}"))
            .collect();
        let normal = ["client_disconnect", "client_gone", "shutdown"];
        Stats {
            sessions_open: health.active_sessions() as u64,
            transports: if transports.is_empty() {
                "none".into()
            } else {
                transports.join(", ")
            },
            sessions_opened: self.sessions_opened.get(),
            sessions_closed: CLOSE_REASONS
                .iter()
                .map(|r| count(&self.closed, &[r]))
                .sum(),
            closed_abnormally: CLOSE_REASONS
                .iter()
                .filter(|r| !normal.contains(r))
                .map(|r| count(&self.closed, &[r]))
                .sum(),
            subscriptions_open: SUBSCRIPTION_PATHS
                .iter()
                .map(|p| gauge(&self.subscriptions_open, p))
                .sum(),
            frames_in: self.frames_received.summary(),
            frames_out: self.frames_sent.summary(),
            system_link_up: health.system_link_up(),
            amqp_up: health.amqp_up(),
            session_links_up: u64::try_from(self.session_links_up.get()).unwrap_or(0),
            reconnects: [Link::System, Link::Session, Link::Amqp]
                .iter()
                .map(|l| count(&self.reconnects, &[l.as_str()]))
                .sum(),
            app_confirmed: self.app_published.get(),
            app_failed: self.app_failed.get(),
            auth_failures: AUTH_FAILURES
                .iter()
                .map(|r| count(&self.auth_failures, &[r.as_str()]))
                .sum(),
            rejected_upgrades: REJECTIONS.iter().map(|r| count(&self.rejected, &[r])).sum(),
            draining: health.is_shutting_down(),
        }
    }

    /// The text exposition, with the gauges read from `health` now.
    pub fn render(&self, health: &Health) -> String {
        self.sessions_active.set(health.active_sessions() as i64);
        self.system_link_up.set(i64::from(health.system_link_up()));
        self.amqp_up.set(i64::from(health.amqp_up()));
        self.ready.set(i64::from(health.is_ready()));
        self.links_up
            .with_label_values(&[Link::System.as_str()])
            .set(i64::from(health.system_link_up()));
        self.links_up
            .with_label_values(&[Link::Amqp.as_str()])
            .set(i64::from(health.amqp_up()));
        self.draining.set(i64::from(health.is_shutting_down()));
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
    }
}

/// Increments a gauge now and decrements it when dropped: a session or a
/// connection counted for exactly as long as it lives.
#[derive(Debug)]
pub struct GaugeGuard(IntGauge);

impl GaugeGuard {
    pub fn new(gauge: IntGauge) -> GaugeGuard {
        gauge.inc();
        GaugeGuard(gauge)
    }
}

impl Drop for GaugeGuard {
    fn drop(&mut self) {
        self.0.dec();
    }
}

/// Follows a count that changes in steps (a session's subscriptions) on a
/// gauge shared by all sessions; gives the remainder back when dropped.
#[derive(Debug)]
pub struct GaugeShare {
    gauge: IntGauge,
    held: i64,
}

impl GaugeShare {
    pub fn new(gauge: IntGauge) -> GaugeShare {
        GaugeShare { gauge, held: 0 }
    }

    /// Sets this holder's part of the gauge to `n`.
    pub fn set(&mut self, n: usize) {
        let n = i64::try_from(n).unwrap_or(i64::MAX);
        if n != self.held {
            self.gauge.add(n - self.held);
            self.held = n;
        }
    }
}

impl Drop for GaugeShare {
    fn drop(&mut self) {
        self.gauge.sub(self.held);
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    #[test]
    fn series_carry_the_pod_label() {
        let m = Metrics::new("pod-a").unwrap();
        m.sessions_opened.inc();
        m.frames_client_to_broker.inc_by(3);
        m.session_closed(&CloseReason::Shutdown);
        m.rejected(Rejection::Origin);
        m.limit_hit("session.max_transactions");
        let health = Health::default();
        health.session_opened();
        let text = m.render(&health);
        assert!(
            text.contains(r#"stomp_gateway_sessions_opened_total{pod="pod-a"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(
                r#"stomp_gateway_frames_total{direction="client_to_broker",pod="pod-a"} 3"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"stomp_gateway_sessions_closed_total{reason="shutdown",pod="pod-a"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"stomp_gateway_connections_rejected_total{reason="origin",pod="pod-a"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(
                r#"stomp_gateway_limit_hits_total{limit="session.max_transactions",pod="pod-a"} 1"#
            ),
            "{text}"
        );
        assert!(
            text.contains(r#"stomp_gateway_sessions_active{pod="pod-a"} 1"#),
            "{text}"
        );
        assert!(
            text.contains(r#"stomp_gateway_ready{pod="pod-a"} 0"#),
            "{text}"
        );
    }

    #[test]
    fn new_series_are_exported_from_the_start() {
        let m = Metrics::new("p").unwrap();
        let text = m.render(&Health::default());
        for series in [
            r#"stomp_gateway_build_info{version=""#,
            r#"stomp_gateway_sessions_open{transport="websocket",pod="p"} 0"#,
            r#"stomp_gateway_subscriptions_open{path="relay",pod="p"} 0"#,
            r#"stomp_gateway_frames_received_total{command="SEND",pod="p"} 0"#,
            r#"stomp_gateway_frames_sent_total{command="MESSAGE",pod="p"} 0"#,
            r#"stomp_gateway_broker_links_up{link="session",pod="p"} 0"#,
            r#"stomp_gateway_broker_reconnects_total{link="amqp",pod="p"} 0"#,
            r#"stomp_gateway_broker_connect_duration_seconds_count{link="system",pod="p"} 0"#,
            r#"stomp_gateway_stomp_connect_duration_seconds_count{pod="p"} 0"#,
            r#"stomp_gateway_relay_latency_seconds_count{direction="broker_to_client",pod="p"} 0"#,
            r#"stomp_gateway_app_publish_confirm_duration_seconds_count{pod="p"} 0"#,
            r#"stomp_gateway_auth_failures_total{reason="expired",pod="p"} 0"#,
            r#"stomp_gateway_topology_declarations_total{kind="queue",result="ok",pod="p"} 0"#,
            r#"stomp_gateway_draining{pod="p"} 0"#,
        ] {
            assert!(text.contains(series), "{series} missing from\n{text}");
        }
    }

    #[test]
    fn sockjs_transports_map_to_bounded_labels() {
        for (name, label) in [
            ("websocket", "sockjs-websocket"),
            ("websocket-raw", "sockjs-websocket-raw"),
            ("xhr-streaming", "sockjs-xhr-streaming"),
            ("xhr-polling", "sockjs-xhr-polling"),
            ("eventsource", "sockjs-eventsource"),
            ("htmlfile", "sockjs-htmlfile"),
            ("jsonp-polling", "sockjs-jsonp-polling"),
            ("carrier-pigeon", "other"),
        ] {
            assert_eq!(sockjs_transport(name), label);
        }
    }

    #[test]
    fn guards_follow_what_they_count() {
        let m = Metrics::new("p").unwrap();
        let g = m.sessions_open("xhr_streaming");
        let a = GaugeGuard::new(g.clone());
        let b = GaugeGuard::new(g.clone());
        assert_eq!(g.get(), 2);
        drop(a);
        assert_eq!(g.get(), 1);
        drop(b);
        assert_eq!(g.get(), 0);

        let subs = m.subscriptions_open("relay");
        let mut one = GaugeShare::new(subs.clone());
        let mut two = GaugeShare::new(subs.clone());
        one.set(3);
        two.set(2);
        one.set(1);
        assert_eq!(subs.get(), 3);
        drop(one);
        assert_eq!(subs.get(), 2);
        drop(two);
        assert_eq!(subs.get(), 0);
    }

    #[test]
    fn stats_line_sums_the_counters() {
        let m = Metrics::new("p").unwrap();
        let health = Health::default();
        health.session_opened();
        m.sessions_opened.inc_by(3);
        m.session_closed(&CloseReason::ClientDisconnect);
        m.session_closed(&CloseReason::BrokerLost("gone".into()));
        m.frames_received.inc(Command::Connect);
        m.frames_received.inc(Command::Send);
        m.frames_received.inc(Command::Send);
        m.frames_sent.inc(Command::Connected);
        let _ws = GaugeGuard::new(m.sessions_open("websocket"));
        m.broker_connected(Link::System, Duration::from_millis(3), true);
        m.auth_failed(AuthFailure::NoToken);
        let s = m.stats(&health);
        assert_eq!(s.sessions_opened, 3);
        assert_eq!(s.sessions_closed, 2);
        assert_eq!(s.closed_abnormally, 1);
        assert_eq!(s.reconnects, 1);
        assert_eq!(s.auth_failures, 1);
        let line = s.to_string();
        assert!(
            line.starts_with("sessions[1 open (websocket 1), 3 opened, 2 closed, 1 abnormally]"),
            "{line}"
        );
        assert!(line.contains("frames in[CONNECT 1, SEND 2]"), "{line}");
        assert!(line.contains("frames out[CONNECTED 1]"), "{line}");
        assert!(
            line.contains("refused[1 authentication, 0 upgrades]"),
            "{line}"
        );
        assert!(!line.contains("draining"), "{line}");
    }
}
