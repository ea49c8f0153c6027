//! The value rules of a loaded configuration ([`Config::validate`]): addresses
//! parse, limits are positive, prefixes do not overlap, names fit AMQP.

use super::*;
use std::collections::BTreeSet;
use std::net::SocketAddr;

impl Config {
    /// Checks every value rule; the first broken rule is returned, naming
    /// its key. See `docs/configuration.md` for the rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate(&self.session)?;
        self.session.validate()?;
        self.broker.validate()?;
        positive("hub.max_queued_bytes", self.hub.max_queued_bytes as u64)?;
        positive("hub.max_queued_ms", self.hub.max_queued_ms)?;
        self.amqp.validate()?;
        self.validate_prefixes()?;
        self.validate_exchanges()?;
        self.api.validate()?;
        self.auth.validate()?;
        self.policy()?;
        self.validate_topology()?;
        self.sockjs.validate()?;
        self.demo.validate()?;
        self.log.validate()
    }

    /// A copy with the secrets replaced by [`MASK`], for printing: the broker
    /// passcodes, the passwords in `amqp.url` and `amqp.failover_urls`, and `api.token` and
    /// `auth.jwt_secret` when set.
    pub fn masked(&self) -> Config {
        let mut c = self.clone();
        c.broker.client_passcode = MASK.into();
        c.broker.system_passcode = MASK.into();
        c.amqp.url = mask_url_password(&self.amqp.url);
        c.amqp.failover_urls = self
            .amqp
            .failover_urls
            .iter()
            .map(|u| mask_url_password(u))
            .collect();
        if !c.api.token.is_empty() {
            c.api.token = MASK.into();
        }
        if !c.auth.jwt_secret.is_empty() {
            c.auth.jwt_secret = MASK.into();
        }
        c
    }

    /// This process's name: `server.pod_id` when set, else `POD_NAME`, else
    /// the host name (`/etc/hostname`, then `HOSTNAME`), else
    /// `stomp-gateway`. At most 100 bytes, no control characters. Used in
    /// logs, readiness and as the AMQP `app_id`.
    pub fn pod_id(&self) -> String {
        let candidates = [
            Some(self.server.pod_id.clone()),
            std::env::var("POD_NAME").ok(),
            std::fs::read_to_string("/etc/hostname").ok(),
            std::env::var("HOSTNAME").ok(),
        ];
        let name = candidates
            .into_iter()
            .flatten()
            .map(|s| s.trim().to_owned())
            .find(|s| !s.is_empty() && !s.chars().any(char::is_control))
            .unwrap_or_else(|| "stomp-gateway".to_owned());
        let mut end = name.len().min(MAX_POD_ID_BYTES);
        while !name.is_char_boundary(end) {
            end -= 1;
        }
        name[..end].to_owned()
    }

    /// Whether `name` is an exchange that exists without being declared in
    /// `topology.exchanges`: RabbitMQ's built-in `amq.*` exchanges and the
    /// application and user exchanges the control plane declares.
    pub fn is_implicit_exchange(&self, name: &str) -> bool {
        BUILTIN_EXCHANGES.contains(&name) || name == self.app.exchange || name == self.user.exchange
    }

    /// `app.exchange` and `user.exchange`.
    fn validate_exchanges(&self) -> Result<(), ConfigError> {
        entity_name("app.exchange", &self.app.exchange)?;
        entity_name("user.exchange", &self.user.exchange)?;
        if self.app.exchange == self.user.exchange {
            return Err(ConfigError::invalid(
                "user.exchange",
                format!(
                    "{:?} is also app.exchange: the user exchange is a direct exchange of its own",
                    self.user.exchange
                ),
            ));
        }
        positive(
            "app.max_inflight_per_session",
            self.app.max_inflight_per_session as u64,
        )?;
        // Declaring the app or user exchange in the topology too is allowed
        // (to give it arguments) if it agrees with what the gateway declares.
        for (i, x) in self.topology.exchanges.iter().enumerate() {
            let (what, kind) = if x.name == self.app.exchange {
                ("app.exchange", self.app.exchange_type)
            } else if x.name == self.user.exchange {
                ("user.exchange", ExchangeType::Direct)
            } else {
                continue;
            };
            if x.kind != kind || !x.durable || x.auto_delete || x.internal {
                return Err(ConfigError::invalid(
                    format!("topology.exchanges[{i}]"),
                    format!(
                        "{:?} is {what}, which the gateway declares as a durable {kind} exchange: declare it the same way (type = \"{kind}\", durable = true, auto_delete = false, internal = false) or not at all",
                        x.name
                    ),
                ));
            }
        }
        Ok(())
    }

    fn validate_topology(&self) -> Result<(), ConfigError> {
        let t = &self.topology;
        let mut exchanges = BTreeSet::new();
        for (i, x) in t.exchanges.iter().enumerate() {
            let key = format!("topology.exchanges[{i}]");
            entity_name(&format!("{key}.name"), &x.name)?;
            if !exchanges.insert(x.name.as_str()) {
                return Err(ConfigError::invalid(
                    format!("{key}.name"),
                    format!("{:?} is declared more than once", x.name),
                ));
            }
            validate_arguments(&format!("{key}.arguments"), &x.arguments, &[])?;
        }
        let mut queues = BTreeSet::new();
        for (i, q) in t.queues.iter().enumerate() {
            let key = format!("topology.queues[{i}]");
            entity_name(&format!("{key}.name"), &q.name)?;
            if !queues.insert(q.name.as_str()) {
                return Err(ConfigError::invalid(
                    format!("{key}.name"),
                    format!("{:?} is declared more than once", q.name),
                ));
            }
            validate_arguments(&format!("{key}.arguments"), &q.arguments, QUEUE_ARGUMENTS)?;
            if let Some(ArgValue::String(kind)) = q.arguments.get("x-queue-type") {
                if kind != "classic" && (!q.durable || q.exclusive || q.auto_delete) {
                    let (field, why) = if !q.durable {
                        ("durable", "must be durable")
                    } else if q.exclusive {
                        ("exclusive", "cannot be exclusive")
                    } else {
                        ("auto_delete", "cannot be auto_delete")
                    };
                    return Err(ConfigError::invalid(
                        format!("{key}.{field}"),
                        format!("{:?} is a {kind} queue, and {kind} queues {why}", q.name),
                    ));
                }
            }
        }
        let declared_or_builtin =
            |name: &str| exchanges.contains(name) || self.is_implicit_exchange(name);
        for (i, b) in t.bindings.iter().enumerate() {
            let key = format!("topology.bindings[{i}]");
            entity_name(&format!("{key}.exchange"), &b.exchange)?;
            if !declared_or_builtin(&b.exchange) {
                return Err(ConfigError::invalid(
                    format!("{key}.exchange"),
                    format!(
                        "{:?} is not declared in topology.exchanges (nor a built-in exchange: {}, app.exchange, user.exchange)",
                        b.exchange,
                        BUILTIN_EXCHANGES.join(", ")
                    ),
                ));
            }
            match (b.queue.is_empty(), b.destination_exchange.is_empty()) {
                (true, true) | (false, false) => {
                    return Err(ConfigError::invalid(
                        key,
                        "a binding needs exactly one of queue and destination_exchange",
                    ))
                }
                (false, true) => {
                    if !queues.contains(b.queue.as_str()) {
                        return Err(ConfigError::invalid(
                            format!("{key}.queue"),
                            format!("{:?} is not declared in topology.queues", b.queue),
                        ));
                    }
                }
                (true, false) => {
                    if !declared_or_builtin(&b.destination_exchange) {
                        return Err(ConfigError::invalid(
                            format!("{key}.destination_exchange"),
                            format!(
                                "{:?} is not declared in topology.exchanges (nor a built-in exchange)",
                                b.destination_exchange
                            ),
                        ));
                    }
                }
            }
            if b.routing_key.len() > MAX_NAME_BYTES {
                return Err(ConfigError::invalid(
                    format!("{key}.routing_key"),
                    format!("is longer than {MAX_NAME_BYTES} bytes"),
                ));
            }
            validate_arguments(&format!("{key}.arguments"), &b.arguments, BINDING_ARGUMENTS)?;
        }
        Ok(())
    }

    /// The configuration as a TOML document (what `--check-config` prints;
    /// call it on [`Config::masked`]).
    pub fn to_toml(&self) -> String {
        match toml::to_string(self) {
            Ok(s) => s,
            // Only possible if a future field had a type TOML cannot hold.
            Err(e) => format!("# cannot render the configuration as TOML: {e}\n"),
        }
    }

    fn validate_prefixes(&self) -> Result<(), ConfigError> {
        let mut all: Vec<(String, &str)> = Vec::new();
        for (i, p) in self.broker.relay_prefixes.iter().enumerate() {
            all.push((format!("broker.relay_prefixes[{i}]"), p));
        }
        for (i, p) in self.app.prefixes.iter().enumerate() {
            all.push((format!("app.prefixes[{i}]"), p));
        }
        all.push(("user.prefix".into(), &self.user.prefix));

        for (key, p) in &all {
            if p.is_empty() {
                return Err(ConfigError::invalid(key, "must not be empty"));
            }
            if !p.starts_with('/') {
                return Err(ConfigError::invalid(
                    key,
                    format!("{p:?} must start with '/'"),
                ));
            }
        }
        // A destination must belong to one set only: no prefix of one set may
        // equal or contain a prefix of another.
        let set = |key: &str| key.split('[').next().unwrap_or_default().to_owned();
        for (i, (key_a, a)) in all.iter().enumerate() {
            for (key_b, b) in &all[..i] {
                if set(key_a) != set(key_b) && (a.starts_with(*b) || b.starts_with(*a)) {
                    return Err(ConfigError::invalid(
                        key_a,
                        format!(
                            "{a:?} overlaps {key_b} {b:?}: a destination prefix may belong to only one of broker.relay_prefixes, app.prefixes and user.prefix"
                        ),
                    ));
                }
            }
        }
        Ok(())
    }
}

/// Longest exchange, queue or routing key name AMQP allows (a short string).
const MAX_NAME_BYTES: usize = 255;
/// Longest `server.pod_id` (it goes into AMQP short strings with more).
pub(super) const MAX_POD_ID_BYTES: usize = 100;
/// Largest `server.drain_period_ms`: 10 minutes.
pub(super) const MAX_DRAIN_PERIOD_MS: u64 = 600_000;

/// What a known argument must hold.
#[derive(Debug, Clone, Copy)]
enum ArgRule {
    /// An integer >= the minimum (and <= the maximum, if any).
    Int(i64, Option<i64>),
    /// A string; if the list is not empty, one of its words.
    Str(&'static [&'static str]),
}

const QUEUE_ARGUMENTS: &[(&str, ArgRule)] = &[
    ("x-message-ttl", ArgRule::Int(0, None)),
    ("x-expires", ArgRule::Int(1, None)),
    ("x-max-length", ArgRule::Int(0, None)),
    ("x-max-length-bytes", ArgRule::Int(0, None)),
    ("x-max-priority", ArgRule::Int(0, Some(255))),
    ("x-dead-letter-exchange", ArgRule::Str(&[])),
    ("x-dead-letter-routing-key", ArgRule::Str(&[])),
    (
        "x-queue-type",
        ArgRule::Str(&["classic", "quorum", "stream"]),
    ),
    (
        "x-overflow",
        ArgRule::Str(&["drop-head", "reject-publish", "reject-publish-dlx"]),
    ),
    ("x-queue-mode", ArgRule::Str(&["default", "lazy"])),
];

const BINDING_ARGUMENTS: &[(&str, ArgRule)] = &[(
    "x-match",
    ArgRule::Str(&["all", "any", "all-with-x", "any-with-x"]),
)];

/// Checks the type of the known arguments in `args`; others pass as they are.
fn validate_arguments(
    key: &str,
    args: &Arguments,
    rules: &[(&str, ArgRule)],
) -> Result<(), ConfigError> {
    for (name, value) in args {
        if name.is_empty() || name.len() > MAX_NAME_BYTES {
            return Err(ConfigError::invalid(
                key,
                format!("argument name {name:?} must be 1 to {MAX_NAME_BYTES} bytes"),
            ));
        }
        let Some((_, rule)) = rules.iter().find(|(n, _)| n == name) else {
            continue;
        };
        let key = format!("{key}.{name}");
        match (rule, value) {
            (ArgRule::Int(min, max), ArgValue::Int(n)) => {
                if n < min || max.is_some_and(|max| *n > max) {
                    let range = match max {
                        Some(max) => format!("between {min} and {max}"),
                        None if *min == 0 => "non-negative".to_owned(),
                        None => format!("at least {min}"),
                    };
                    return Err(ConfigError::invalid(key, format!("{n} must be {range}")));
                }
            }
            (ArgRule::Int(..), other) => {
                return Err(ConfigError::invalid(
                    key,
                    format!("must be an integer, not {}", other.type_name()),
                ))
            }
            (ArgRule::Str(words), ArgValue::String(s)) => {
                if !words.is_empty() && !words.contains(&s.as_str()) {
                    return Err(ConfigError::invalid(
                        key,
                        format!("{s:?} is not one of: {}", words.join(", ")),
                    ));
                }
            }
            (ArgRule::Str(_), other) => {
                return Err(ConfigError::invalid(
                    key,
                    format!("must be a string, not {}", other.type_name()),
                ))
            }
        }
    }
    Ok(())
}

/// An exchange or queue name: 1 to 255 bytes, not in RabbitMQ's reserved
/// `amq.` namespace.
fn entity_name(key: &str, name: &str) -> Result<(), ConfigError> {
    if name.is_empty() {
        return Err(ConfigError::invalid(key, "must not be empty"));
    }
    if name.len() > MAX_NAME_BYTES {
        return Err(ConfigError::invalid(
            key,
            format!("is longer than {MAX_NAME_BYTES} bytes"),
        ));
    }
    if name.starts_with("amq.") && !BUILTIN_EXCHANGES.contains(&name) {
        return Err(ConfigError::invalid(
            key,
            format!("{name:?}: names starting with \"amq.\" are reserved by RabbitMQ"),
        ));
    }
    Ok(())
}

/// `amqp://user:secret@host/vhost` -> `amqp://user:******@host/vhost`.
/// Anything without a password is returned as is.
pub fn mask_url_password(url: &str) -> String {
    let Some((scheme, rest)) = url.split_once("://") else {
        return url.to_owned();
    };
    let authority_end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, path) = rest.split_at(authority_end);
    let Some((userinfo, host)) = authority.rsplit_once('@') else {
        return url.to_owned();
    };
    match userinfo.split_once(':') {
        Some((user, _password)) => format!("{scheme}://{user}:{MASK}@{host}{path}"),
        None => url.to_owned(),
    }
}

fn parse_socket_addr(key: &str, value: &str) -> Result<SocketAddr, ConfigError> {
    value.parse::<SocketAddr>().map_err(|_| {
        ConfigError::invalid(
            key,
            format!("{value:?} is not a socket address (ip:port, for example 0.0.0.0:8080)"),
        )
    })
}

fn positive(key: &str, value: u64) -> Result<(), ConfigError> {
    if value == 0 {
        Err(ConfigError::invalid(key, "must be greater than 0"))
    } else {
        Ok(())
    }
}

/// Values that go into CONNECT headers, which are never escaped.
fn header_safe(key: &str, value: &str) -> Result<(), ConfigError> {
    if value.contains(['\r', '\n', '\0']) {
        Err(ConfigError::invalid(
            key,
            "must not contain CR, LF or NUL characters",
        ))
    } else {
        Ok(())
    }
}

impl ServerConfig {
    fn validate(&self, session: &SessionConfig) -> Result<(), ConfigError> {
        let listen = parse_socket_addr("server.listen", &self.listen)?;
        let admin = parse_socket_addr("server.admin_listen", &self.admin_listen)?;
        if listen == admin && listen.port() != 0 {
            return Err(ConfigError::invalid(
                "server.admin_listen",
                format!(
                    "{:?} is the same address as server.listen",
                    self.admin_listen
                ),
            ));
        }
        if self.endpoints.is_empty() {
            return Err(ConfigError::invalid(
                "server.endpoints",
                "must list at least one endpoint",
            ));
        }
        let mut seen = BTreeSet::new();
        for (i, ep) in self.endpoints.iter().enumerate() {
            let key = format!("server.endpoints[{i}].path");
            if !ep.path.starts_with('/') {
                return Err(ConfigError::invalid(
                    key,
                    format!("{:?} must start with '/'", ep.path),
                ));
            }
            if ep.sockjs && (ep.path.ends_with('/') || ep.path == "/assets") {
                return Err(ConfigError::invalid(
                    key,
                    format!(
                        "{:?}: a SockJS endpoint path must not end with '/' nor be /assets",
                        ep.path
                    ),
                ));
            }
            if !seen.insert(ep.path.as_str()) {
                return Err(ConfigError::invalid(
                    key,
                    format!("{:?} is listed more than once", ep.path),
                ));
            }
        }
        for (i, origin) in self.allowed_origins.iter().enumerate() {
            if origin.trim().is_empty() {
                return Err(ConfigError::invalid(
                    format!("server.allowed_origins[{i}]"),
                    "must not be empty",
                ));
            }
        }
        positive("server.max_connections", self.max_connections as u64)?;
        if self.pod_id.len() > MAX_POD_ID_BYTES {
            return Err(ConfigError::invalid(
                "server.pod_id",
                format!("is longer than {MAX_POD_ID_BYTES} bytes"),
            ));
        }
        if self.pod_id.chars().any(char::is_control) {
            return Err(ConfigError::invalid(
                "server.pod_id",
                "must not contain control characters",
            ));
        }
        if self.drain_period_ms > MAX_DRAIN_PERIOD_MS {
            return Err(ConfigError::invalid(
                "server.drain_period_ms",
                format!(
                    "{} is greater than the maximum of {MAX_DRAIN_PERIOD_MS} (10 minutes)",
                    self.drain_period_ms
                ),
            ));
        }
        positive("server.handshake_timeout_ms", self.handshake_timeout_ms)?;
        positive("server.listen_backlog", u64::from(self.listen_backlog))?;
        for (i, p) in self.trusted_proxies.iter().enumerate() {
            if p.trim().parse::<std::net::IpAddr>().is_err() {
                return Err(ConfigError::invalid(
                    format!("server.trusted_proxies[{i}]"),
                    format!("{p:?} is not an IP address"),
                ));
            }
        }
        if self.max_ws_message_size < session.max_frame_size {
            return Err(ConfigError::invalid(
                "server.max_ws_message_size",
                format!(
                    "{} is smaller than session.max_frame_size ({})",
                    self.max_ws_message_size, session.max_frame_size
                ),
            ));
        }
        Ok(())
    }
}

impl SockJsConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        positive("sockjs.heartbeat_time_ms", self.heartbeat_time_ms)?;
        positive("sockjs.disconnect_delay_ms", self.disconnect_delay_ms)?;
        positive("sockjs.stream_bytes_limit", self.stream_bytes_limit as u64)?;
        if self.client_library_url.trim().is_empty() {
            return Err(ConfigError::invalid(
                "sockjs.client_library_url",
                "must not be empty",
            ));
        }
        Ok(())
    }
}

impl DemoConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !self.room_destination.starts_with('/') || !self.room_destination.contains("{room}") {
            return Err(ConfigError::invalid(
                "demo.room_destination",
                format!(
                    "{:?} must start with '/' and contain {{room}}",
                    self.room_destination
                ),
            ));
        }
        if !self.send_destination.is_empty() && !self.send_destination.starts_with('/') {
            return Err(ConfigError::invalid(
                "demo.send_destination",
                format!("{:?} must start with '/'", self.send_destination),
            ));
        }
        Ok(())
    }
}

impl SessionConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        positive("session.connect_timeout_ms", self.connect_timeout_ms)?;
        if self.max_frame_size < 1024 {
            return Err(ConfigError::invalid(
                "session.max_frame_size",
                format!("{} is below the minimum of 1024", self.max_frame_size),
            ));
        }
        positive("session.max_header_count", self.max_header_count as u64)?;
        positive("session.max_header_line", self.max_header_line as u64)?;
        positive("session.max_subscriptions", self.max_subscriptions as u64)?;
        positive("session.max_pending_frames", self.max_pending_frames as u64)?;
        positive("session.heartbeat_min_ms", self.heartbeat_min_ms)?;
        positive("session.frame_timeout_ms", self.frame_timeout_ms)?;
        positive("session.max_transactions", self.max_transactions as u64)?;
        positive(
            "session.max_transaction_bytes",
            self.max_transaction_bytes as u64,
        )?;
        if self.max_sends_per_sec > 0 && self.send_burst == 0 {
            return Err(ConfigError::invalid(
                "session.send_burst",
                "must be greater than 0 when session.max_sends_per_sec is set",
            ));
        }
        if self.outbound_buffer_bytes < self.max_frame_size {
            return Err(ConfigError::invalid(
                "session.outbound_buffer_bytes",
                format!(
                    "{} is smaller than session.max_frame_size ({})",
                    self.outbound_buffer_bytes, self.max_frame_size
                ),
            ));
        }
        Ok(())
    }
}

impl BrokerConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.addresses.is_empty() {
            return Err(ConfigError::invalid(
                "broker.addresses",
                "must list at least one host:port",
            ));
        }
        for (i, addr) in self.addresses.iter().enumerate() {
            if !is_host_port(addr) {
                return Err(ConfigError::invalid(
                    format!("broker.addresses[{i}]"),
                    format!("{addr:?} is not host:port"),
                ));
            }
        }
        header_safe("broker.virtual_host", &self.virtual_host)?;
        header_safe("broker.client_login", &self.client_login)?;
        header_safe("broker.client_passcode", &self.client_passcode)?;
        header_safe("broker.system_login", &self.system_login)?;
        header_safe("broker.system_passcode", &self.system_passcode)?;
        positive("broker.connect_timeout_ms", self.connect_timeout_ms)?;
        if self.max_frame_size < 1024 {
            return Err(ConfigError::invalid(
                "broker.max_frame_size",
                format!("{} is below the minimum of 1024", self.max_frame_size),
            ));
        }
        positive("broker.reconnect_initial_ms", self.reconnect_initial_ms)?;
        if self.reconnect_initial_ms > self.reconnect_max_ms {
            return Err(ConfigError::invalid(
                "broker.reconnect_initial_ms",
                format!(
                    "{} is greater than broker.reconnect_max_ms ({})",
                    self.reconnect_initial_ms, self.reconnect_max_ms
                ),
            ));
        }
        // The files are read by crate::settings::Settings::build.
        Ok(())
    }
}

/// `host:port` with a non-empty host (an IPv6 address in brackets) and a
/// port in 1..=65535.
fn is_host_port(s: &str) -> bool {
    let Some((host, port)) = s.rsplit_once(':') else {
        return false;
    };
    let host_ok = if let Some(inner) = host.strip_prefix('[') {
        inner
            .strip_suffix(']')
            .is_some_and(|ip| ip.parse::<std::net::Ipv6Addr>().is_ok())
    } else {
        !host.is_empty()
            && !host.contains(':')
            && host
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'))
    };
    host_ok && matches!(port.parse::<u16>(), Ok(p) if p != 0)
}

/// An `amqp://` or `amqps://` URL that lapin can parse.
fn amqp_url(key: &str, url: &str) -> Result<(), ConfigError> {
    if !(url.starts_with("amqp://") || url.starts_with("amqps://")) {
        return Err(ConfigError::invalid(
            key,
            format!(
                "{:?} must start with amqp:// or amqps://",
                mask_url_password(url)
            ),
        ));
    }
    if let Err(e) = url.parse::<lapin::uri::AMQPUri>() {
        return Err(ConfigError::invalid(
            key,
            format!("{:?} is not a valid AMQP URL: {e}", mask_url_password(url)),
        ));
    }
    Ok(())
}

impl AmqpConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        amqp_url("amqp.url", &self.url)?;
        for (i, url) in self.failover_urls.iter().enumerate() {
            amqp_url(&format!("amqp.failover_urls[{i}]"), url)?;
        }
        positive("amqp.pool_size", self.pool_size as u64)?;
        positive("amqp.connect_timeout_ms", self.connect_timeout_ms)?;
        positive("amqp.reconnect_initial_ms", self.reconnect_initial_ms)?;
        if self.reconnect_initial_ms > self.reconnect_max_ms {
            return Err(ConfigError::invalid(
                "amqp.reconnect_initial_ms",
                format!(
                    "{} is greater than amqp.reconnect_max_ms ({})",
                    self.reconnect_initial_ms, self.reconnect_max_ms
                ),
            ));
        }
        positive(
            "amqp.max_inflight_publishes",
            self.max_inflight_publishes as u64,
        )?;
        positive("amqp.publish_timeout_ms", self.publish_timeout_ms)?;
        Ok(())
    }
}

impl ApiConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if !self.token.chars().all(|c| c.is_ascii_graphic()) {
            return Err(ConfigError::invalid(
                "api.token",
                "must consist of visible ASCII characters (no spaces)",
            ));
        }
        positive("api.max_body_bytes", self.max_body_bytes as u64)
    }
}

/// Largest `auth.jwt_leeway_secs`: more would make `exp` meaningless.
const MAX_JWT_LEEWAY_SECS: u64 = 3600;

impl AuthConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        if self.user_claim.is_empty() {
            return Err(ConfigError::invalid("auth.user_claim", "must not be empty"));
        }
        if self.token_header.is_empty() || self.token_header.contains([':', '\r', '\n', '\0']) {
            return Err(ConfigError::invalid(
                "auth.token_header",
                format!(
                    "{:?} is not a STOMP header name (non-empty, without ':', CR, LF or NUL)",
                    self.token_header
                ),
            ));
        }
        if self.jwt_leeway_secs > MAX_JWT_LEEWAY_SECS {
            return Err(ConfigError::invalid(
                "auth.jwt_leeway_secs",
                format!("must be at most {MAX_JWT_LEEWAY_SECS} (1 hour)"),
            ));
        }
        if self.mode != AuthMode::Jwt {
            return Ok(());
        }
        let alg = self.jwt_algorithm.as_str();
        if self.jwt_algorithm.is_hmac() {
            if self.jwt_secret.is_empty() {
                return Err(ConfigError::invalid(
                    "auth.jwt_secret",
                    format!(
                        "must be set when auth.mode = \"jwt\" and auth.jwt_algorithm = \"{alg}\""
                    ),
                ));
            }
        } else {
            if self.jwt_public_key_file.is_empty() {
                return Err(ConfigError::invalid(
                    "auth.jwt_public_key_file",
                    format!(
                        "must be set when auth.mode = \"jwt\" and auth.jwt_algorithm = \"{alg}\""
                    ),
                ));
            }
            match std::fs::read_to_string(&self.jwt_public_key_file) {
                Ok(pem) if pem.contains("-----BEGIN") => {}
                Ok(_) => {
                    return Err(ConfigError::invalid(
                        "auth.jwt_public_key_file",
                        format!("{:?} is not a PEM file", self.jwt_public_key_file),
                    ))
                }
                Err(e) => {
                    return Err(ConfigError::invalid(
                        "auth.jwt_public_key_file",
                        format!("cannot read {:?}: {e}", self.jwt_public_key_file),
                    ))
                }
            }
        }
        Ok(())
    }
}

impl LogConfig {
    fn validate(&self) -> Result<(), ConfigError> {
        tracing_subscriber::EnvFilter::builder()
            .parse(&self.filter)
            .map(|_| ())
            .map_err(|e| {
                ConfigError::invalid(
                    "log.filter",
                    format!("{:?} is not a valid filter: {e}", self.filter),
                )
            })
    }
}
