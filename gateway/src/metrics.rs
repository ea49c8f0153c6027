//! Prometheus metrics, served as `GET /metrics` on the admin listener.
//!
//! Every series carries the constant label `pod` (see `server.pod_id`), so a
//! dashboard can tell the pods of a deployment apart. Counters for the hot
//! path (frames, bytes) are resolved once at start-up, so counting a frame is
//! one atomic add.

use crate::health::Health;
use prometheus::{Encoder, IntCounter, IntCounterVec, IntGauge, Opts, Registry, TextEncoder};
use relay_core::session::CloseReason;
use std::collections::HashMap;

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
    rejected: IntCounterVec,
    limit_hits: IntCounterVec,
    /// Frames refused by authorization, by command (`auth_denials_total`).
    denials: IntCounterVec,
    sessions_active: IntGauge,
    system_link_up: IntGauge,
    amqp_up: IntGauge,
    ready: IntGauge,
}

/// Every `reason` label of `sessions_closed_total`.
const CLOSE_REASONS: [&str; 9] = [
    "client_disconnect",
    "client_gone",
    "client_error",
    "access_denied",
    "connect_timeout",
    "client_heartbeat_timeout",
    "broker_error",
    "broker_lost",
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
            sessions_active: gauge("sessions_active", "Client sessions open now")?,
            system_link_up: gauge(
                "system_link_up",
                "1 while the system broker connection is up",
            )?,
            amqp_up: gauge("amqp_up", "1 while the AMQP control plane is connected")?,
            ready: gauge("ready", "1 while /readyz answers 200")?,
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

    /// The text exposition, with the gauges read from `health` now.
    pub fn render(&self, health: &Health) -> String {
        self.sessions_active.set(health.active_sessions() as i64);
        self.system_link_up.set(i64::from(health.system_link_up()));
        self.amqp_up.set(i64::from(health.amqp_up()));
        self.ready.set(i64::from(health.is_ready()));
        let mut out = Vec::new();
        // Encoding into a Vec cannot fail for the text format.
        let _ = TextEncoder::new().encode(&self.registry.gather(), &mut out);
        String::from_utf8(out).unwrap_or_default()
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
}
