//! Destination parsing for the publish API and application sends: a STOMP
//! destination mapped to an exchange and routing key.

use super::*;

/// How a destination is served by the publish API.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DestinationKind {
    /// `/topic/...`
    Topic,
    /// `/exchange/...`
    Exchange,
    /// `/queue/...` or `/amq/queue/...`
    Queue,
    /// An application prefix.
    App,
    /// The user prefix.
    User,
}

impl DestinationKind {
    /// Whether a publish to it should be mandatory: a missing queue is an
    /// error for queues and application destinations; pub/sub and user
    /// destinations without subscribers are normal.
    pub fn mandatory(self) -> bool {
        matches!(self, DestinationKind::Queue | DestinationKind::App)
    }
}

/// A destination resolved to an exchange and routing key.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    pub exchange: String,
    pub routing_key: String,
    pub kind: DestinationKind,
}

/// Maps a STOMP destination to (exchange, routing_key) the way RabbitMQ's
/// STOMP plugin does, for the publish API:
/// `/topic/x` → `("amq.topic", "x")`; `/exchange/e/rk` → `("e", "rk")`;
/// `/exchange/e` → `("e", "")`; `/queue/q` and `/amq/queue/q` → `("", "q")`;
/// application prefixes → (`app.exchange`, `app_routing_key`);
/// `/user/<name>/<rest>` → (`user.exchange`, `user_routing_key(name, rest)`);
/// anything else (including `/temp-queue/`) → `None`.
pub fn resolve_destination(config: &Config, destination: &str) -> Option<(String, String)> {
    resolve(config, destination).map(|r| (r.exchange, r.routing_key))
}

/// [`resolve_destination`] with the kind of destination.
pub fn resolve(config: &Config, destination: &str) -> Option<Resolved> {
    let resolved = |exchange: &str, routing_key: &str, kind| {
        Some(Resolved {
            exchange: exchange.to_owned(),
            routing_key: routing_key.to_owned(),
            kind,
        })
    };
    for prefix in &config.app.prefixes {
        if destination.starts_with(prefix.as_str()) {
            let key = app_routing_key(prefix, destination)?;
            return resolved(&config.app.exchange, &key, DestinationKind::App);
        }
    }
    if !config.user.prefix.is_empty() && destination.starts_with(config.user.prefix.as_str()) {
        let (user, rest) = split_user_send(&config.user.prefix, destination)?;
        let key = user_routing_key(&user, &rest);
        return resolved(&config.user.exchange, &key, DestinationKind::User);
    }
    let non_empty = |s: &str| (!s.is_empty()).then_some(());
    if let Some(name) = destination.strip_prefix("/topic/") {
        non_empty(name)?;
        return resolved("amq.topic", name, DestinationKind::Topic);
    }
    if let Some(rest) = destination.strip_prefix("/exchange/") {
        let (exchange, key) = rest.split_once('/').unwrap_or((rest, ""));
        non_empty(exchange)?;
        return resolved(exchange, key, DestinationKind::Exchange);
    }
    if let Some(queue) = destination
        .strip_prefix("/queue/")
        .or_else(|| destination.strip_prefix("/amq/queue/"))
    {
        non_empty(queue)?;
        return resolved("", queue, DestinationKind::Queue);
    }
    None
}
