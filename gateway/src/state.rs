//! The process-wide state every connection task shares ([`Shared`]): the
//! settings, health, metrics, the AMQP control plane, the per-session
//! configuration of the session core and the connection permits. Built once
//! by [`crate::server::run`]; the listener, the client driver and the admin
//! server only read it.

use crate::admission::{Admission, Ticket};
use crate::amqp::ControlPlane;
use crate::broker_side::{BrokerSide, EmbeddedBrokerSide, TcpBrokerSide};
use crate::config::{BrokerMode, Config, MessageType};
use crate::embedded::EmbeddedBroker;
use crate::fanout::shared::SharedFanout;
use crate::fanout::upstream::{PodUpstream, UpstreamSettings};
use crate::health::Health;
use crate::metrics::Metrics;
use crate::outlet::OutletLimits;
use crate::settings::Settings;
use relay_core::heartbeat::HeartBeat;
use relay_core::session::{SessionConfig, SharedPaths};
use relay_core::Limits;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::protocol::WebSocketConfig;
use tokio_util::task::TaskTracker;

/// Everything a connection task needs, shared by all of them.
#[derive(Debug)]
pub struct Shared {
    pub config: Arc<Config>,
    pub health: Arc<Health>,
    pub session: Arc<SessionConfig>,
    /// Codec limits for client frames.
    pub client_limits: Limits,
    /// Codec limits for broker frames (`broker.max_frame_size`; header
    /// limits are the client's plus headroom for the headers the broker adds).
    pub broker_limits: Limits,
    pub ws_config: WebSocketConfig,
    pub message_type: MessageType,
    pub shutdown: watch::Receiver<bool>,
    /// This process's identity (`server.pod_id`), in logs and metrics.
    pub pod: String,
    pub metrics: Arc<Metrics>,
    /// Publishes application messages (`/app/**`).
    pub control: ControlPlane,
    /// Where each session's relay leg goes (RabbitMQ over TCP by default).
    pub broker_side: Arc<dyn BrokerSide>,
    /// TLS to the broker (`[broker.tls]`), `None` for plain TCP; shared by
    /// every session and the system link.
    pub broker_tls: Option<Arc<crate::tls::BrokerTls>>,
    /// Connection limits (`server.max_connections`, per IP), taken at accept.
    pub admission: Arc<Admission>,
    /// Every session task; the drain waits on it (no polling of counters).
    pub sessions: TaskTracker,
    /// The embedded broker (`broker.mode = "embedded"`): sessions connect to
    /// it instead of RabbitMQ's STOMP plugin.
    pub embedded: Option<Arc<EmbeddedBroker>>,
    /// The pod's shared fan-out (relay mode with any `[fanout]` prefix
    /// `shared`): ack:auto subscriptions served from one upstream queue.
    pub fanout: Option<SharedFanout>,
    id_prefix: u32,
    next_id: AtomicU64,
}

impl Shared {
    /// Derives the per-session settings from the configuration and starts
    /// the shared fan-out's upstream (relay mode), which stops when
    /// `upstream_stop` turns true.
    pub fn new(
        settings: &Settings,
        health: Arc<Health>,
        control: ControlPlane,
        metrics: Arc<Metrics>,
        shutdown: watch::Receiver<bool>,
        upstream_stop: watch::Receiver<bool>,
    ) -> Shared {
        let config = settings.config.clone();
        let s = &config.session;
        let b = &config.broker;
        let addresses = u32::try_from(b.addresses.len()).unwrap_or(u32::MAX);
        let authenticator = settings
            .authenticator
            .clone()
            .map(|a| crate::auth::Counted::wrap(a, metrics.clone()));
        // The shared path serves relay mode only (the embedded broker is a
        // hub of its own).
        let relay = b.mode == BrokerMode::Relay;
        let f = &config.fanout;
        let shared = SharedPaths {
            topic: relay && f.topic.is_shared(),
            exchange: relay && f.exchange.is_shared(),
            user: relay && f.user.is_shared(),
        };
        let any_shared = shared.topic || shared.exchange || shared.user;
        let session = SessionConfig {
            client_heartbeat: HeartBeat::new(s.heartbeat_send_ms, s.heartbeat_receive_ms),
            client_heartbeat_min_ms: s.heartbeat_min_ms,
            frame_timeout: Duration::from_millis(s.frame_timeout_ms),
            max_transactions: s.max_transactions,
            max_transaction_bytes: s.max_transaction_bytes,
            max_sends_per_sec: s.max_sends_per_sec,
            send_burst: s.send_burst,
            broker_heartbeat: HeartBeat::new(
                b.client_heartbeat_send_ms,
                b.client_heartbeat_receive_ms,
            ),
            connect_timeout: Duration::from_millis(s.connect_timeout_ms),
            // Every address may take the whole connect timeout, then CONNECTED.
            broker_timeout: Duration::from_millis(b.connect_timeout_ms)
                .saturating_mul(addresses.saturating_add(1)),
            max_subscriptions: s.max_subscriptions,
            max_pending_frames: s.max_pending_frames,
            broker_login: b.client_login.clone(),
            broker_passcode: b.client_passcode.clone(),
            virtual_host: b.virtual_host.clone(),
            router: settings.router.clone(),
            server_name: concat!("stomp-gateway/", env!("CARGO_PKG_VERSION")).into(),
            max_inflight_publishes: config.app.max_inflight_per_session,
            shared,
            // With the shared path the relay leg opens only when a frame
            // needs it (a pure pub/sub browser costs RabbitMQ nothing);
            // without it, with the session, as the relay always did.
            open_relay_at_connect: !any_shared,
            authenticator,
        };
        let client_limits = Limits {
            max_frame_size: s.max_frame_size,
            max_headers: s.max_header_count,
            max_header_line: s.max_header_line,
        };
        // Frames from the broker: RabbitMQ's own frame limit, so anything it
        // accepted from a producer reaches the subscriber.
        let broker_limits = Limits {
            max_frame_size: b.max_frame_size,
            max_headers: s.max_header_count.saturating_add(32),
            max_header_line: s.max_header_line.saturating_add(1024),
        };
        let ws_config = WebSocketConfig::default()
            // The default 128 KiB read buffer is zero-filled per connection;
            // STOMP frames are small, the buffer grows when needed.
            .read_buffer_size(4 * 1024)
            // Frames fed in one batch leave in one write (the writer task
            // flushes per batch); 0 would write every frame on its own.
            .write_buffer_size(8 * 1024)
            .max_message_size(Some(config.server.max_ws_message_size))
            .max_frame_size(Some(config.server.max_ws_message_size));
        let outlet_limits = OutletLimits {
            max_bytes: config.hub.max_queued_bytes,
            max_wait: Duration::from_millis(config.hub.max_queued_ms),
        };
        let embedded = (config.broker.mode == BrokerMode::Embedded).then(|| {
            EmbeddedBroker::new(outlet_limits, broker_limits, metrics.slow_consumers.clone())
        });
        let fanout = any_shared.then(|| {
            let sink = SharedFanout::sink(
                outlet_limits,
                config.fanout.on_upstream_loss,
                metrics.clone(),
                health.clone(),
                &settings.pod,
            );
            let amqp = &config.amqp;
            let upstream = PodUpstream::start(
                UpstreamSettings {
                    name: format!("stomp-gateway {} shared", settings.pod),
                    queue_prefix: format!(
                        "{}{}-",
                        relay_core::router::SHARED_QUEUE_PREFIX,
                        settings.pod
                    ),
                    unbind_delay: Duration::from_millis(config.fanout.unbind_delay_ms),
                    reconnect_initial: Duration::from_millis(amqp.reconnect_initial_ms),
                    reconnect_max: Duration::from_millis(amqp.reconnect_max_ms),
                },
                control.upstream_connect(),
                sink.clone(),
                upstream_stop,
            );
            SharedFanout::new(&sink, upstream)
        });
        Shared {
            fanout,
            broker_side: match &embedded {
                Some(e) => Arc::new(EmbeddedBrokerSide(e.clone())),
                None => Arc::new(TcpBrokerSide::new(
                    b.addresses.clone(),
                    Duration::from_millis(b.connect_timeout_ms),
                    settings.broker_tls.clone(),
                )),
            },
            embedded,
            broker_tls: settings.broker_tls.clone(),
            pod: settings.pod.clone(),
            metrics,
            control,
            admission: Admission::new(
                config.server.max_connections,
                config.server.max_connections_per_ip,
                config.server.max_new_connections_per_ip_per_sec,
                &config.server.trusted_proxies,
            ),
            message_type: config.server.message_type,
            session: Arc::new(session),
            client_limits,
            broker_limits,
            ws_config,
            config,
            health,
            shutdown,
            id_prefix: rand::random(),
            next_id: AtomicU64::new(1),
            sessions: TaskTracker::new(),
        }
    }

    /// Whether a browser page from `origin` may connect
    /// (`server.allowed_origins`).
    pub fn origin_allowed(&self, origin: &str) -> bool {
        self.config
            .server
            .allowed_origins
            .iter()
            .any(|a| a == "*" || a.eq_ignore_ascii_case(origin))
    }

    /// A connection slot (`server.max_connections`) for a SockJS session,
    /// held for its whole life (besides the slots its HTTP connections hold
    /// while open); `None` at the limit.
    pub fn try_admit(&self) -> Option<Ticket> {
        self.admission.admit_session()
    }

    /// A new session id: a random per-process prefix and a counter.
    pub fn next_session_id(&self) -> String {
        let n = self.next_id.fetch_add(1, Ordering::Relaxed);
        format!("{:08x}-{n}", self.id_prefix)
    }
}

/// A session's claim on the process-wide counters: its connection permit and
/// its place in the active-session count (health, `/readyz`, metrics).
/// Released on drop, so a session that ends any way, a panic included,
/// never leaks its slot or leaves the drain waiting for it.
#[derive(Debug)]
pub struct SessionSlot {
    health: Arc<Health>,
    _permit: Ticket,
}

impl SessionSlot {
    /// Counts the session as active for as long as the slot lives.
    pub fn open(health: Arc<Health>, permit: Ticket) -> SessionSlot {
        health.session_opened();
        SessionSlot {
            health,
            _permit: permit,
        }
    }
}

impl Drop for SessionSlot {
    fn drop(&mut self) {
        self.health.session_closed();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_panicking_session_releases_its_slot_and_the_drain_ends() {
        let health = Arc::new(Health::new());
        let admission = Admission::new(1, 0, 0, &[]);
        let sessions = TaskTracker::new();
        let permit = admission.admit_session().expect("a free permit");
        let task = sessions.spawn({
            let health = health.clone();
            async move {
                let _slot = SessionSlot::open(health, permit);
                tokio::task::yield_now().await;
                panic!("a session bug");
            }
        });
        assert!(task.await.is_err_and(|e| e.is_panic()));
        assert_eq!(health.active_sessions(), 0);
        assert!(admission.admit_session().is_some(), "the permit is back");
        sessions.close();
        tokio::time::timeout(Duration::from_secs(5), sessions.wait())
            .await
            .expect("the drain does not wait for the panicked session");
    }
}
