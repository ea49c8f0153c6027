//! Logging: `tracing` to stderr, as text or JSON lines, and the periodic
//! one-line stats log (`log.stats_interval_ms`).

use crate::config::{LogConfig, LogFormat};
use crate::health::Health;
use crate::metrics::Metrics;
use std::io::IsTerminal;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tracing_subscriber::EnvFilter;

/// Logs [`Metrics::stats`] every `every` (like Spring's
/// `WebSocketMessageBrokerStats`), target `stomp_gateway::stats`, until
/// shutdown. A zero interval logs nothing. With `fields` (JSON logs) the
/// main counts are event fields too.
pub async fn log_stats(
    metrics: Arc<Metrics>,
    health: Arc<Health>,
    every: Duration,
    fields: bool,
    mut shutdown: watch::Receiver<bool>,
) {
    if every.is_zero() {
        return;
    }
    let mut ticks = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
    ticks.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = ticks.tick() => log_once(&metrics, &health, fields),
            _ = shutdown.wait_for(|stop| *stop) => break,
        }
    }
}

fn log_once(metrics: &Metrics, health: &Health, fields: bool) {
    let s = metrics.stats(health);
    if !fields {
        tracing::info!(target: "stomp_gateway::stats", "stats: {s}");
        return;
    }
    tracing::info!(
        target: "stomp_gateway::stats",
        sessions_open = s.sessions_open,
        sessions_opened = s.sessions_opened,
        sessions_closed = s.sessions_closed,
        closed_abnormally = s.closed_abnormally,
        subscriptions_open = s.subscriptions_open,
        session_links_up = s.session_links_up,
        reconnects = s.reconnects,
        app_failed = s.app_failed,
        auth_failures = s.auth_failures,
        draining = s.draining,
        "stats: {s}"
    );
}

/// Installs the global subscriber. The filter is `RUST_LOG` when set and
/// valid, else `log.filter`. Safe to call more than once: later calls (and
/// calls after another subscriber was installed, as in tests) do nothing.
/// Returns whether this call installed the subscriber.
pub fn init(cfg: &LogConfig) -> bool {
    let (filter, rust_log_error) = filter(cfg, std::env::var("RUST_LOG").ok().as_deref());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(true);
    let installed = match cfg.format {
        LogFormat::Json => builder.json().try_init().is_ok(),
        LogFormat::Text => builder
            .with_ansi(std::io::stderr().is_terminal())
            .try_init()
            .is_ok(),
    };
    if let Some(e) = rust_log_error {
        tracing::warn!("ignoring RUST_LOG: {e}; using log.filter {:?}", cfg.filter);
    }
    installed
}

/// Directives added to `log.filter` (not to `RUST_LOG`): lapin warns with
/// the whole message body for every mandatory return, and logs every
/// channel the broker closes as a raw `AMQPError` dump (a topology conflict,
/// a refused publish); the gateway reports each of those itself, in one line.
const QUIET_LAPIN: [&str; 2] = ["lapin::returned_messages=error", "lapin::channel=off"];

/// The filter to use, and why `RUST_LOG` was ignored if it was.
fn filter(cfg: &LogConfig, rust_log: Option<&str>) -> (EnvFilter, Option<String>) {
    let from_config = || {
        QUIET_LAPIN.iter().fold(
            EnvFilter::builder()
                .parse(&cfg.filter)
                // Validated at startup; fall back rather than fail here.
                .unwrap_or_else(|_| EnvFilter::new("info")),
            |f, d| f.add_directive(d.parse().unwrap_or_default()),
        )
    };
    match rust_log.map(str::trim) {
        Some(s) if !s.is_empty() => match EnvFilter::builder().parse(s) {
            Ok(f) => (f, None),
            Err(e) => (from_config(), Some(e.to_string())),
        },
        _ => (from_config(), None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn rust_log_wins_when_valid() {
        let cfg = LogConfig {
            filter: "warn".into(),
            format: LogFormat::Text,
            ..LogConfig::default()
        };
        let (f, err) = filter(&cfg, Some("debug"));
        assert_eq!(f.to_string(), "debug");
        assert!(err.is_none());
        let from_config = format!("{},warn", QUIET_LAPIN.join(","));
        let (f, err) = filter(&cfg, None);
        assert_eq!(f.to_string(), from_config);
        assert!(err.is_none());
        let (f, _) = filter(&cfg, Some("  "));
        assert_eq!(f.to_string(), from_config);
        let (f, err) = filter(&cfg, Some("info,["));
        assert_eq!(f.to_string(), from_config);
        assert!(err.is_some());
    }

    #[test]
    fn init_is_idempotent() {
        // Whatever ran first, a global subscriber exists after this (a silent
        // one if it is ours), so init must do nothing and not panic.
        use tracing_subscriber::util::SubscriberInitExt;
        let _ = tracing_subscriber::registry().try_init();
        assert!(!init(&LogConfig::default()));
        assert!(!init(&LogConfig {
            filter: "debug".into(),
            format: LogFormat::Json,
            ..LogConfig::default()
        }));
    }
}
