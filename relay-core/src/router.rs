//! The one place that decides which path serves a client frame, and whether
//! this client may use it.
//!
//! [`Router::route`] takes who is asking ([`Principal`]) and a SEND or
//! SUBSCRIBE frame and answers with a [`Route`] (relay leg, application
//! publish, user destination) or a [`Refusal`]. Checks, in order:
//!
//! 1. the destination prefix picks the path (relay, application, user);
//!    none is [`Refusal::Invalid`];
//! 2. built-in protections, always on ([`DenyReason`]): a relay destination
//!    never reaches the gateway's own exchanges or the queues behind them
//!    (its `[topology]` queues bound to them, the per-subscription
//!    `stomp-subscription-*` queues RabbitMQ creates for every session,
//!    user queues included), a SUBSCRIBE cannot name such a queue in
//!    `x-queue-name`, a `user-id` header must be the authenticated user (as
//!    RabbitMQ checks it), `user.client_send_enabled` holds on every path;
//! 3. the configured [`Policy`] (first matching rule, then the default).
//!
//! Whatever the route, [`strip_identity_headers`] removes the headers only
//! the gateway may set from a relayed SEND. [`Router::resolve`] maps a
//! destination to an exchange and routing key for the trusted publish API,
//! and [`amqp_target`] reads a relay destination the way RabbitMQ's STOMP
//! plugin reads a SEND's, for relay SENDs the session publishes over AMQP.
//! Whether the shared path (the local hub) serves an allowed relay or user
//! destination is the session's choice on top of [`Route`].

use crate::frame::{Command, Frame};
use crate::policy::{Policy, Principal, Verdict};
use std::fmt;

/// Headers the gateway sets on application messages; clients cannot supply them.
pub const RESERVED_HEADER_PREFIX: &str = "stomp-";

/// The AMQP `user-id` property header, validated by RabbitMQ against the
/// connection's user; here against the authenticated user.
pub const USER_ID_HEADER: &str = "user-id";

/// The prefix RabbitMQ's STOMP plugin gives the queue of every
/// `/topic/` and `/exchange/` subscription (a hash of destination and
/// subscription id, so guessable): other sessions' queues, user queues
/// included.
pub const SUBSCRIPTION_QUEUE_PREFIX: &str = "stomp-subscription-";

/// Every gateway pod's shared fan-out queue is named with this prefix
/// (exclusive to the pod's upstream connection); no client reaches one.
pub const SHARED_QUEUE_PREFIX: &str = "stomp-gateway-shared-";

/// The path that serves an allowed frame.
#[derive(Debug, Clone, PartialEq, Eq)]
#[non_exhaustive]
pub enum Route {
    /// Relayed on the session's broker leg as is.
    Relay,
    /// Published to the application exchange with this routing key.
    App { routing_key: String },
    /// Relayed on the broker leg to the user exchange: `destination` is
    /// `/exchange/<user.exchange>/<escaped user>.<rest>`.
    User { destination: String },
}

/// Why a frame is refused.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Refusal {
    /// Not an authorization matter: no path serves the destination, or its
    /// form is wrong. `message` and `details` go into the ERROR frame.
    Invalid { message: String, details: String },
    /// Authorization refused it (counted and logged).
    Denied(Denial),
}

/// An authorization refusal: who asked is the caller's to log.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Denial {
    pub command: Command,
    pub destination: String,
    pub reason: DenyReason,
}

impl Denial {
    /// The ERROR frame's `message`: names the command and destination.
    pub fn message(&self) -> String {
        format!(
            "{} to {:?} is not allowed",
            self.command.as_str(),
            self.destination
        )
    }
}

impl fmt::Display for Denial {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.message(), self.reason)
    }
}

/// Which protection or rule refused a frame.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DenyReason {
    /// The destination reaches the gateway's own application or user exchange.
    InternalExchange(String),
    /// The destination (or `x-queue-name`) names a queue the gateway uses.
    InternalQueue(String),
    /// The destination (or `x-queue-name`) names another subscription's queue.
    SubscriptionQueue(String),
    /// The destination (or `x-queue-name`) names a gateway pod's shared
    /// fan-out queue.
    SharedQueue(String),
    /// `user.client_send_enabled = false` and this is a SEND to a user.
    UserSendDisabled,
    /// A `user-id` header that is not the authenticated user.
    UserId(String),
    /// `auth.rules[i]` denied it.
    Rule(usize),
    /// No rule matched and `auth.default = "deny"`.
    Default,
}

impl fmt::Display for DenyReason {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            DenyReason::InternalExchange(x) => {
                write!(f, "exchange {x:?} is the gateway's own; clients cannot reach it")
            }
            DenyReason::InternalQueue(q) => {
                write!(f, "queue {q:?} is behind the gateway's own exchanges; clients cannot reach it")
            }
            DenyReason::SharedQueue(q) => write!(
                f,
                "queue {q:?} is a gateway's shared fan-out queue; clients cannot reach {SHARED_QUEUE_PREFIX}* queues"
            ),
            DenyReason::SubscriptionQueue(q) => write!(
                f,
                "queue {q:?} belongs to another subscription; clients cannot reach {SUBSCRIPTION_QUEUE_PREFIX}* queues"
            ),
            DenyReason::UserSendDisabled => f.write_str(
                "clients may not send to other users' destinations (user.client_send_enabled = false)",
            ),
            DenyReason::UserId(claimed) => write!(
                f,
                "the user-id header {claimed:?} is not the authenticated user"
            ),
            DenyReason::Rule(i) => write!(f, "denied by auth.rules[{i}]"),
            DenyReason::Default => f.write_str("no auth.rules entry allows it and auth.default = \"deny\""),
        }
    }
}

/// How the publish API serves a destination.
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

/// Prefix tables, the gateway's own names, the switches and the policy.
#[derive(Debug, Clone, PartialEq)]
pub struct Router {
    relay: Vec<String>,
    app: Vec<String>,
    user: Option<String>,
    app_exchange: String,
    user_exchange: String,
    internal_queues: Vec<String>,
    control_plane: bool,
    user_send_enabled: bool,
    policy: Policy,
}

impl Default for Router {
    /// Spring's defaults for a RabbitMQ relay, the gateway's default
    /// exchanges, no control plane, allow-all policy.
    fn default() -> Self {
        Router::new(
            [
                "/topic/",
                "/queue/",
                "/exchange/",
                "/amq/queue/",
                "/temp-queue/",
                "/reply-queue/",
            ]
            .iter()
            .map(|s| s.to_string())
            .collect(),
            vec!["/app/".into()],
            Some("/user/".into()),
        )
    }
}

impl Router {
    pub fn new(relay: Vec<String>, app: Vec<String>, user: Option<String>) -> Router {
        Router {
            relay,
            app,
            user: user.filter(|u| !u.is_empty()),
            app_exchange: "stomp.app".into(),
            user_exchange: "stomp.user".into(),
            internal_queues: Vec::new(),
            control_plane: false,
            user_send_enabled: false,
            policy: Policy::allow_all(),
        }
    }

    /// The gateway's application and user exchanges.
    pub fn with_exchanges(mut self, app: impl Into<String>, user: impl Into<String>) -> Router {
        self.app_exchange = app.into();
        self.user_exchange = user.into();
        self
    }

    /// Queues bound to the gateway's exchanges (relay destinations may not
    /// name them).
    pub fn with_internal_queues(mut self, queues: Vec<String>) -> Router {
        self.internal_queues = queues;
        self
    }

    /// Whether application and user destinations are served (needs the
    /// AMQP control plane).
    pub fn with_control_plane(mut self, on: bool) -> Router {
        self.control_plane = on;
        self
    }

    /// `user.client_send_enabled`.
    pub fn with_user_send(mut self, enabled: bool) -> Router {
        self.user_send_enabled = enabled;
        self
    }

    pub fn with_policy(mut self, policy: Policy) -> Router {
        self.policy = policy;
        self
    }

    /// The relay prefixes, for error messages.
    pub fn relay_prefixes(&self) -> &[String] {
        &self.relay
    }

    /// Every prefix a client may use, for the unknown-destination error:
    /// the relay prefixes, then (with the control plane) the application
    /// prefixes and the user prefix.
    pub fn served_prefixes(&self) -> Vec<&str> {
        let mut all: Vec<&str> = self.relay.iter().map(String::as_str).collect();
        if self.control_plane {
            all.extend(self.app.iter().map(String::as_str));
            all.extend(self.user.as_deref());
        }
        all
    }

    /// The user exchange.
    pub fn user_exchange(&self) -> &str {
        &self.user_exchange
    }

    /// Whether application and user destinations are served.
    pub fn control_plane(&self) -> bool {
        self.control_plane
    }

    /// The routing key of an application destination (`/app/chat/send` →
    /// `chat.send`), `None` when no application prefix serves it.
    pub fn app_routing_key(&self, destination: &str) -> Option<String> {
        match self.path(destination) {
            Path::App(len) => Some(app_key(&destination[len..])),
            _ => None,
        }
    }

    fn path(&self, destination: &str) -> Path {
        let matches =
            |p: &String| destination.len() > p.len() && destination.starts_with(p.as_str());
        if self.relay.iter().any(matches) {
            Path::Relay
        } else if let Some(p) = self.app.iter().find(|p| matches(p)) {
            Path::App(p.len())
        } else if let Some(p) = self.user.as_ref().filter(|p| matches(p)) {
            Path::User(p.len())
        } else {
            Path::None
        }
    }

    /// Decides the path of a SEND or SUBSCRIBE frame from `who`; `own_name`
    /// is the name user destinations resolve with for this session (the
    /// user, or a per-session identity when anonymous).
    pub fn route(&self, who: &Principal, own_name: &str, frame: &Frame) -> Result<Route, Refusal> {
        let command = frame.command;
        let Some(dest) = frame.header("destination") else {
            let c = command.as_str();
            return Err(invalid(
                "Missing destination",
                format!("\"{c}\" must include a 'destination' header ({c} frame has no destination header)"),
            ));
        };
        let deny = |reason| {
            Err(Refusal::Denied(Denial {
                command,
                destination: dest.to_owned(),
                reason,
            }))
        };
        let path = self.path(dest);
        match path {
            Path::None => {
                // `/queue` or `/queue/`: a known kind with an empty name.
                let empty_name = self
                    .relay
                    .iter()
                    .any(|p| p == dest || p.trim_end_matches('/') == dest);
                return Err(invalid(
                    if empty_name {
                        "Invalid destination"
                    } else {
                        "Unknown destination"
                    },
                    format!(
                        "no route for destination {dest:?}: destinations must start with one of: {} and name something after it",
                        self.served_prefixes().join(", ")
                    ),
                ));
            }
            Path::App(_) if !self.control_plane => {
                return Err(invalid(
                    "Unknown destination",
                    format!(
                        "application destination {dest:?} is not served: application destinations \
                         need the AMQP control plane, which is disabled"
                    ),
                ))
            }
            Path::User(_) if !self.control_plane => {
                return Err(invalid(
                    "Unknown destination",
                    format!(
                        "user destination {dest:?} is not served: user destinations need the AMQP \
                         control plane, which is disabled"
                    ),
                ))
            }
            Path::App(_) if command == Command::Subscribe => {
                return Err(invalid(
                    "Invalid destination",
                    format!(
                        "cannot subscribe to application destination {dest:?}: application \
                         destinations only take SEND; subscribe to the broker destination \
                         (/topic/..., /exchange/...) that backends publish to"
                    ),
                ))
            }
            _ => {}
        }

        // Built-in protections.
        if command == Command::Send {
            if let Some(claimed) = frame.header(USER_ID_HEADER) {
                if who.user.as_deref() != Some(claimed) {
                    return deny(DenyReason::UserId(claimed.to_owned()));
                }
            }
        }
        if path == Path::Relay {
            if let Some(reason) = self.internal_target(dest) {
                return deny(reason);
            }
        }
        if command == Command::Subscribe {
            if let Some(q) = frame.header("x-queue-name") {
                if let Some(reason) = self.internal_queue(&unescape(q)) {
                    return deny(reason);
                }
            }
        }
        if matches!(path, Path::User(_)) && command == Command::Send && !self.user_send_enabled {
            return deny(DenyReason::UserSendDisabled);
        }

        // Configured rules.
        match self.policy.check(who, command, dest) {
            Verdict::Allow => {}
            Verdict::DeniedByRule(i) => return deny(DenyReason::Rule(i)),
            Verdict::DeniedByDefault => return deny(DenyReason::Default),
        }

        match (path, command) {
            (Path::App(len), _) => Ok(Route::App {
                routing_key: app_key(&dest[len..]),
            }),
            (Path::User(len), Command::Subscribe) => {
                // `/user/queue/x` becomes this session's own queue bound to
                // the user exchange with the user's key.
                let key = user_routing_key(own_name, &dest[len..]);
                Ok(Route::User {
                    destination: format!("/exchange/{}/{key}", self.user_exchange),
                })
            }
            (Path::User(len), _) => match split_user(&dest[len..]) {
                Some((user, rest)) => Ok(Route::User {
                    destination: format!(
                        "/exchange/{}/{}",
                        self.user_exchange,
                        user_routing_key(user, rest)
                    ),
                }),
                None => Err(invalid(
                    format!("invalid user destination {dest:?}"),
                    "SEND to a user destination needs the form /user/<name>/<destination>",
                )),
            },
            _ => Ok(Route::Relay),
        }
    }

    /// The built-in protection for a relayed destination, read the way
    /// RabbitMQ's STOMP plugin reads it (`%2F` in a name is `/`).
    fn internal_target(&self, dest: &str) -> Option<DenyReason> {
        if let Some(rest) = dest.strip_prefix("/exchange/") {
            let (exchange, key) = rest.split_once('/').unwrap_or((rest, ""));
            let exchange = unescape(exchange);
            if exchange == self.app_exchange || exchange == self.user_exchange {
                return Some(DenyReason::InternalExchange(exchange));
            }
            // The default exchange routes by queue name.
            if exchange.is_empty() || exchange == "amq.default" {
                return self.internal_queue(&unescape(key));
            }
            return None;
        }
        let queue = dest
            .strip_prefix("/amq/queue/")
            .or_else(|| dest.strip_prefix("/queue/"))?;
        self.internal_queue(&unescape(queue))
    }

    fn internal_queue(&self, queue: &str) -> Option<DenyReason> {
        if self.internal_queues.iter().any(|q| q == queue) {
            Some(DenyReason::InternalQueue(queue.to_owned()))
        } else if queue.starts_with(SUBSCRIPTION_QUEUE_PREFIX) {
            Some(DenyReason::SubscriptionQueue(queue.to_owned()))
        } else if queue.starts_with(SHARED_QUEUE_PREFIX) {
            Some(DenyReason::SharedQueue(queue.to_owned()))
        } else {
            None
        }
    }

    /// Maps a destination to (exchange, routing key) the way RabbitMQ's
    /// STOMP plugin does, for the (trusted) publish API:
    /// `/topic/x` → `("amq.topic", "x")`; `/exchange/e/rk` → `("e", "rk")`;
    /// `/exchange/e` → `("e", "")`; `/queue/q` and `/amq/queue/q` → `("", "q")`;
    /// application prefixes → (`app.exchange`, the rest with `/` → `.`);
    /// `/user/<name>/<rest>` → (`user.exchange`, [`user_routing_key`]);
    /// anything else (including `/temp-queue/`) → `None`.
    pub fn resolve(&self, destination: &str) -> Option<Resolved> {
        let resolved = |exchange: &str, routing_key: &str, kind| {
            Some(Resolved {
                exchange: exchange.to_owned(),
                routing_key: routing_key.to_owned(),
                kind,
            })
        };
        for prefix in &self.app {
            if let Some(rest) = destination.strip_prefix(prefix.as_str()) {
                if rest.is_empty() {
                    return None;
                }
                return resolved(&self.app_exchange, &app_key(rest), DestinationKind::App);
            }
        }
        if let Some(rest) = self
            .user
            .as_ref()
            .and_then(|p| destination.strip_prefix(p.as_str()))
        {
            let (user, rest) = split_user(rest)?;
            let key = user_routing_key(user, rest);
            return resolved(&self.user_exchange, &key, DestinationKind::User);
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
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Path {
    Relay,
    /// With the length of the matched prefix.
    App(usize),
    User(usize),
    None,
}

fn invalid(message: impl Into<String>, details: impl Into<String>) -> Refusal {
    Refusal::Invalid {
        message: message.into(),
        details: details.into(),
    }
}

/// RabbitMQ's STOMP plugin reads `%2F` in a destination name as `/`; so do
/// we (in either case, to refuse more, never less).
fn unescape(name: &str) -> String {
    name.replace("%2F", "/").replace("%2f", "/")
}

/// The AMQP (exchange, routing key) a relay destination publishes to, read
/// the way RabbitMQ's STOMP plugin reads a SEND's destination: `/topic/k` →
/// `("amq.topic", "k")`; `/exchange/x/k` → `("x", "k")`; `/exchange/x` →
/// `("x", "")`; `%2F` in a name is `/`. `None` for anything else, and for
/// the forms the plugin refuses (an empty name, more `/`-separated parts),
/// so those keep getting RabbitMQ's own answer on the relay leg.
pub fn amqp_target(destination: &str) -> Option<(String, String)> {
    let plugin_unescape = |s: &str| s.replace("%2F", "/");
    if let Some(name) = destination.strip_prefix("/topic/") {
        if name.is_empty() || name.contains('/') {
            return None;
        }
        return Some(("amq.topic".to_owned(), plugin_unescape(name)));
    }
    let rest = destination.strip_prefix("/exchange/")?;
    let (exchange, key) = rest.split_once('/').unwrap_or((rest, ""));
    if exchange.is_empty() || key.contains('/') {
        return None;
    }
    Some((plugin_unescape(exchange), plugin_unescape(key)))
}

/// Removes the headers only the gateway may set from a client SEND: every
/// `stomp-*` header, and `user-id` (already checked by [`Router::route`];
/// the relay leg's login is the gateway's, so RabbitMQ would refuse it).
pub fn strip_identity_headers(frame: &mut Frame) {
    frame.headers.retain(|(k, _)| !is_identity_header(k));
}

/// Whether a header name is one only the gateway may set.
pub fn is_identity_header(name: &str) -> bool {
    name.eq_ignore_ascii_case(USER_ID_HEADER)
        || name
            .get(..RESERVED_HEADER_PREFIX.len())
            .is_some_and(|p| p.eq_ignore_ascii_case(RESERVED_HEADER_PREFIX))
}

/// Escapes a user name for use as one word of an AMQP routing key: `%`, `.`,
/// `*`, `#`, `/` and control or space characters are percent-encoded, so a
/// name can neither add routing-key words nor act as a wildcard.
pub fn escape_user(user: &str) -> String {
    let mut out = String::with_capacity(user.len());
    for c in user.chars() {
        match c {
            '%' | '.' | '*' | '#' | '/' => out.push_str(&format!("%{:02X}", c as u32)),
            c if c.is_control() || c == ' ' => {
                let mut buf = [0u8; 4];
                for b in c.encode_utf8(&mut buf).bytes() {
                    out.push_str(&format!("%{b:02X}"));
                }
            }
            c => out.push(c),
        }
    }
    out
}

/// The routing key that reaches every session of `user` subscribed to
/// `/user/<rest>` (for example `rest = "queue/notifications"`): the escaped
/// user name, then `rest` with `/` turned into `.`.
pub fn user_routing_key(user: &str, rest: &str) -> String {
    let rest = rest.trim_start_matches('/').replace('/', ".");
    format!("{}.{rest}", escape_user(user))
}

/// The routing key of an application destination without its prefix:
/// `/` turned into `.` (`chat/send` → `chat.send`).
fn app_key(rest: &str) -> String {
    rest.trim_matches('/').replace('/', ".")
}

/// Splits `<name>/<rest>` (a user SEND without its prefix).
fn split_user(rest: &str) -> Option<(&str, &str)> {
    let (user, rest) = rest.split_once('/')?;
    (!user.is_empty() && !rest.is_empty()).then_some((user, rest))
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::policy::{Effect, Rule};
    use serde_json::json;

    /// A rule from its configuration form.
    fn rule(commands: &[&str], destination: &str, effect: serde_json::Value) -> Rule {
        let commands: Vec<String> = commands.iter().map(|s| (*s).to_owned()).collect();
        match effect {
            serde_json::Value::String(s) if s == "allow" => {
                Rule::new(&commands, destination, true, false, None)
            }
            serde_json::Value::String(s) if s == "deny" => {
                Rule::new(&commands, destination, false, true, None)
            }
            cond => Rule::new(&commands, destination, false, false, Some(&cond)),
        }
        .unwrap()
    }

    /// The seed's chat (`/exchange/adme.exchange/room.{id}` for members),
    /// an application rule, a queue ban, an inbox per user, a role check.
    fn seed_rules() -> Vec<Rule> {
        vec![
            rule(
                &["SUBSCRIBE"],
                "/exchange/adme.exchange/room.{id}",
                json!({"claim_contains": {"claim": "rooms", "value": "{id}"}}),
            ),
            rule(&[], "/exchange/adme.exchange/**", json!("deny")),
            rule(&["SEND"], "/app/**", json!("authenticated")),
            rule(&[], "/amq/queue/**", json!("deny")),
            rule(&[], "/topic/inbox.{user}", json!({"user_equals": "{user}"})),
            rule(
                &[],
                "/topic/admin.*",
                json!({"any": [
                    {"claim_equals": {"claim": "role", "value": "admin"}},
                    {"claim_contains": {"claim": "realm_access.roles", "value": "ops"}},
                ]}),
            ),
            rule(&["SEND"], "/topic/ro.*", json!("deny")),
            rule(&[], "/topic/ro.*", json!("allow")),
        ]
    }

    fn router(default: Effect) -> Router {
        Router::default()
            .with_exchanges("stomp.app", "stomp.user")
            .with_internal_queues(vec!["adme.queue".into()])
            .with_control_plane(true)
            .with_policy(Policy::new(default, seed_rules()))
    }

    fn who(user: Option<&str>, claims: serde_json::Value) -> Principal {
        Principal {
            user: user.map(str::to_owned),
            claims: claims.as_object().cloned().unwrap_or_default(),
        }
    }

    /// What the table expects.
    #[derive(Debug, PartialEq)]
    enum Want {
        Relay,
        App(&'static str),
        User(&'static str),
        Invalid(&'static str),
        Denied(DenyReason),
    }

    fn outcome(r: Result<Route, Refusal>) -> String {
        format!("{r:?}")
    }

    #[test]
    fn route_and_policy_table() {
        use Want::*;
        let alice = who(
            Some("alice"),
            json!({"rooms": ["7", 42], "role": "user", "realm_access": {"roles": ["ops"]}}),
        );
        let mallory = who(Some("mallory"), json!({"rooms": ["8"], "role": "admin"}));
        let anon = who(None, json!({}));
        let s = Command::Subscribe;
        let p = Command::Send;
        let q = |n: &str| DenyReason::SubscriptionQueue(n.into());
        let ix = |n: &str| DenyReason::InternalExchange(n.into());
        #[rustfmt::skip]
        type Case<'a> = (&'a Principal, Command, &'a str, &'a [(&'a str, &'a str)], Want);
        let table: Vec<Case> = vec![
            // Every relay prefix, default allow.
            (&alice, s, "/topic/room.42", &[], Relay),
            (&alice, p, "/topic/room.42", &[], Relay),
            (&alice, s, "/queue/work", &[], Relay),
            (&alice, s, "/exchange/amq.fanout", &[], Relay),
            (&alice, s, "/temp-queue/r", &[], Relay),
            (&alice, p, "/reply-queue/r", &[], Relay),
            (&anon, s, "/topic/x", &[], Relay),
            // Unrouted and malformed.
            (
                &alice,
                s,
                "/nowhere/x",
                &[],
                Invalid("no route for destination \"/nowhere/x\""),
            ),
            (
                &alice,
                s,
                "/topic/",
                &[],
                Invalid("no route for destination \"/topic/\""),
            ),
            (&alice, s, "topic/x", &[], Invalid("no route")),
            (
                &alice,
                s,
                "/app/chat",
                &[],
                Invalid("cannot subscribe to application destination"),
            ),
            (
                &alice,
                p,
                "/user/bob",
                &[],
                Denied(DenyReason::UserSendDisabled),
            ),
            // Application and user paths.
            (&alice, p, "/app/chat/send", &[], App("chat.send")),
            (
                &alice,
                p,
                "/app/chat.sendMessage",
                &[],
                App("chat.sendMessage"),
            ),
            (
                &alice,
                s,
                "/user/queue/notifications",
                &[],
                User("/exchange/stomp.user/alice.queue.notifications"),
            ),
            (&anon, p, "/app/chat", &[], Denied(DenyReason::Rule(2))),
            // The gateway's own exchanges and the queues behind them.
            (
                &mallory,
                s,
                "/exchange/stomp.user/alice.queue.notifications",
                &[],
                Denied(ix("stomp.user")),
            ),
            (
                &mallory,
                p,
                "/exchange/stomp.user/alice.queue.x",
                &[],
                Denied(ix("stomp.user")),
            ),
            (
                &mallory,
                p,
                "/exchange/stomp.app/chat.x",
                &[("stomp-user", "alice")],
                Denied(ix("stomp.app")),
            ),
            (
                &mallory,
                s,
                "/exchange/stomp.app",
                &[],
                Denied(ix("stomp.app")),
            ),
            (&mallory, s, "/exchange/stomp%2Fuser/x", &[], Relay),
            (
                &mallory,
                s,
                "/queue/adme.queue",
                &[],
                Denied(DenyReason::InternalQueue("adme.queue".into())),
            ),
            (
                &mallory,
                p,
                "/exchange/amq.default/adme.queue",
                &[],
                Denied(DenyReason::InternalQueue("adme.queue".into())),
            ),
            (
                &mallory,
                s,
                "/queue/stomp-subscription-AbC",
                &[],
                Denied(q("stomp-subscription-AbC")),
            ),
            (
                &mallory,
                s,
                "/amq/queue/stomp-gateway-shared-pod-1-ab",
                &[],
                Denied(DenyReason::SharedQueue(
                    "stomp-gateway-shared-pod-1-ab".into(),
                )),
            ),
            (
                &mallory,
                p,
                "/exchange/amq.default/stomp-gateway-shared-pod-1-ab",
                &[],
                Denied(DenyReason::SharedQueue(
                    "stomp-gateway-shared-pod-1-ab".into(),
                )),
            ),
            (
                &mallory,
                p,
                "/queue/stomp-subscription-AbC",
                &[],
                Denied(q("stomp-subscription-AbC")),
            ),
            (
                &mallory,
                s,
                "/topic/x",
                &[("x-queue-name", "stomp-subscription-AbC")],
                Denied(q("stomp-subscription-AbC")),
            ),
            (
                &mallory,
                s,
                "/topic/x",
                &[("x-queue-name", "adme.queue")],
                Denied(DenyReason::InternalQueue("adme.queue".into())),
            ),
            (
                &mallory,
                s,
                "/topic/x",
                &[("x-queue-name", "my-durable-queue")],
                Relay,
            ),
            // Identity: user-id must be the authenticated user; user SENDs are off.
            (
                &mallory,
                p,
                "/topic/x",
                &[("user-id", "alice")],
                Denied(DenyReason::UserId("alice".into())),
            ),
            (
                &anon,
                p,
                "/topic/x",
                &[("user-id", "guest")],
                Denied(DenyReason::UserId("guest".into())),
            ),
            (&alice, p, "/topic/x", &[("user-id", "alice")], Relay),
            (
                &alice,
                p,
                "/user/bob/queue/x",
                &[],
                Denied(DenyReason::UserSendDisabled),
            ),
            // Rules: captures, claims, first match, default.
            (&alice, s, "/exchange/adme.exchange/room.42", &[], Relay),
            (&alice, s, "/exchange/adme.exchange/room.7", &[], Relay),
            (
                &mallory,
                s,
                "/exchange/adme.exchange/room.42",
                &[],
                Denied(DenyReason::Rule(0)),
            ),
            (
                &mallory,
                s,
                "/exchange/adme.exchange/room.*",
                &[],
                Denied(DenyReason::Rule(0)),
            ),
            (
                &mallory,
                s,
                "/exchange/adme.exchange/#",
                &[],
                Denied(DenyReason::Rule(1)),
            ),
            (
                &alice,
                p,
                "/exchange/adme.exchange/room.42",
                &[],
                Denied(DenyReason::Rule(1)),
            ),
            (
                &alice,
                s,
                "/amq/queue/anything",
                &[],
                Denied(DenyReason::Rule(3)),
            ),
            (&alice, s, "/topic/inbox.alice", &[], Relay),
            (
                &mallory,
                s,
                "/topic/inbox.alice",
                &[],
                Denied(DenyReason::Rule(4)),
            ),
            (
                &anon,
                s,
                "/topic/inbox.alice",
                &[],
                Denied(DenyReason::Rule(4)),
            ),
            (&mallory, s, "/topic/admin.logs", &[], Relay),
            (&alice, s, "/topic/admin.logs", &[], Relay),
            (
                &anon,
                s,
                "/topic/admin.logs",
                &[],
                Denied(DenyReason::Rule(5)),
            ),
            (
                &alice,
                p,
                "/topic/ro.news",
                &[],
                Denied(DenyReason::Rule(6)),
            ),
            (&alice, s, "/topic/ro.news", &[], Relay),
        ];
        for (who, cmd, dest, headers, want) in table {
            let mut f = Frame::new(cmd).with_header("destination", dest);
            for (k, v) in headers {
                f = f.with_header(*k, *v);
            }
            let own = who.user.clone().unwrap_or_else(|| "session-1".into());
            let got = router(Effect::Allow).route(who, &own, &f);
            let ok = match (&want, &got) {
                (Relay, Ok(Route::Relay)) => true,
                (App(k), Ok(Route::App { routing_key })) => routing_key == k,
                (User(d), Ok(Route::User { destination })) => destination == d,
                (Invalid(m), Err(Refusal::Invalid { message, details })) => {
                    message.contains(m) || details.contains(m)
                }
                (Denied(r), Err(Refusal::Denied(d))) => {
                    d.reason == *r && d.command == cmd && d.destination == dest
                }
                _ => false,
            };
            assert!(
                ok,
                "{who:?} {cmd:?} {dest} {headers:?}: want {want:?}, got {}",
                outcome(got)
            );
        }
    }

    #[test]
    fn default_deny_and_default_allow() {
        let alice = who(Some("alice"), json!({"rooms": ["42"]}));
        let send = |d: &str| Frame::new(Command::Send).with_header("destination", d);
        let allow = router(Effect::Allow);
        let deny = router(Effect::Deny);
        // No rule matches /topic/news.
        assert_eq!(
            allow.route(&alice, "alice", &send("/topic/news")),
            Ok(Route::Relay)
        );
        let Err(Refusal::Denied(d)) = deny.route(&alice, "alice", &send("/topic/news")) else {
            panic!("default deny must deny");
        };
        assert_eq!(d.reason, DenyReason::Default);
        assert_eq!(d.message(), "SEND to \"/topic/news\" is not allowed");
        // A matching rule still allows under default deny.
        let sub = Frame::new(Command::Subscribe)
            .with_header("destination", "/exchange/adme.exchange/room.42");
        assert_eq!(deny.route(&alice, "alice", &sub), Ok(Route::Relay));
        // Built-in protections hold whatever the rules say.
        let open = Router::default()
            .with_control_plane(true)
            .with_policy(Policy::new(
                Effect::Allow,
                vec![rule(&[], "/**", json!("allow"))],
            ));
        let Err(Refusal::Denied(d)) =
            open.route(&alice, "alice", &send("/exchange/stomp.user/bob.queue.x"))
        else {
            panic!("internal exchange must be denied");
        };
        assert_eq!(d.reason, DenyReason::InternalExchange("stomp.user".into()));
        // And client_send_enabled = true lets user SENDs through.
        let open = open.with_user_send(true);
        assert_eq!(
            open.route(&alice, "alice", &send("/user/a.b/queue/x")),
            Ok(Route::User {
                destination: "/exchange/stomp.user/a%2Eb.queue.x".into()
            })
        );
        let Err(Refusal::Invalid { message, .. }) = open.route(&alice, "alice", &send("/user/bob"))
        else {
            panic!("a user SEND needs a user and a destination");
        };
        assert_eq!(message, "invalid user destination \"/user/bob\"");
    }

    #[test]
    fn the_unknown_destination_error_lists_every_served_prefix() {
        let alice = Principal::user("alice");
        let f = Frame::new(Command::Send).with_header("destination", "/nowhere/x");
        let details = |r: &Router| match r.route(&alice, "alice", &f) {
            Err(Refusal::Invalid { details, .. }) => details,
            other => panic!("{other:?}"),
        };
        let on = details(&Router::default().with_control_plane(true));
        assert!(
            on.contains("/temp-queue/, /reply-queue/, /app/, /user/ and"),
            "{on}"
        );
        let off = details(&Router::default());
        assert!(off.contains("/temp-queue/, /reply-queue/ and"), "{off}");
    }

    #[test]
    fn control_plane_off_serves_only_the_relay() {
        let r = Router::default();
        let alice = Principal::user("alice");
        for (dest, msg) in [
            (
                "/app/chat.send",
                "application destination \"/app/chat.send\" is not served",
            ),
            (
                "/user/queue/n",
                "user destination \"/user/queue/n\" is not served",
            ),
        ] {
            let f = Frame::new(Command::Send).with_header("destination", dest);
            let Err(Refusal::Invalid { message, details }) = r.route(&alice, "alice", &f) else {
                panic!("{dest}");
            };
            assert_eq!(message, "Unknown destination");
            assert!(details.starts_with(msg), "{details}");
        }
        let empty_user = Router::new(vec!["/topic/".into()], vec![], Some(String::new()))
            .with_control_plane(true);
        let f = Frame::new(Command::Subscribe).with_header("destination", "/user/x");
        assert!(matches!(
            empty_user.route(&alice, "alice", &f),
            Err(Refusal::Invalid { .. })
        ));
    }

    #[test]
    fn identity_headers_are_stripped() {
        let mut f = Frame::new(Command::Send)
            .with_header("destination", "/topic/x")
            .with_header("stomp-user", "alice")
            .with_header("Stomp-Session", "s")
            .with_header("user-id", "alice")
            .with_header("x-app", "1");
        strip_identity_headers(&mut f);
        let names: Vec<&str> = f.headers.iter().map(|(k, _)| k.as_str()).collect();
        assert_eq!(names, ["destination", "x-app"]);
    }

    #[test]
    fn user_names_cannot_widen_routing() {
        assert_eq!(escape_user("alice"), "alice");
        assert_eq!(escape_user("a.b*#/%"), "a%2Eb%2A%23%2F%25");
        assert_eq!(escape_user("x y\n"), "x%20y%0A");
        assert_eq!(
            user_routing_key("alice", "queue/notifications"),
            "alice.queue.notifications"
        );
        assert_eq!(user_routing_key("a.b", "queue/x"), "a%2Eb.queue.x");
        assert_ne!(
            user_routing_key("alice.queue", "queue/x"),
            user_routing_key("alice", "queue/queue/x")
        );
    }

    #[test]
    fn resolve_table() {
        let r = Router::default().with_exchanges("app.x", "user.x");
        let res = |d: &str| r.resolve(d).map(|r| (r.exchange, r.routing_key));
        let some = |e: &str, k: &str| Some((e.to_owned(), k.to_owned()));
        assert_eq!(res("/topic/room.42"), some("amq.topic", "room.42"));
        assert_eq!(
            res("/exchange/adme.exchange/room.42"),
            some("adme.exchange", "room.42")
        );
        assert_eq!(res("/exchange/e/a/b"), some("e", "a/b"));
        assert_eq!(res("/exchange/e"), some("e", ""));
        assert_eq!(res("/exchange/e/"), some("e", ""));
        assert_eq!(res("/queue/q1"), some("", "q1"));
        assert_eq!(res("/amq/queue/q2"), some("", "q2"));
        assert_eq!(
            res("/app/chat.sendMessage"),
            some("app.x", "chat.sendMessage")
        );
        assert_eq!(res("/app/chat/send"), some("app.x", "chat.send"));
        assert_eq!(
            res("/user/alice/queue/notifications"),
            some("user.x", "alice.queue.notifications")
        );
        assert_eq!(res("/user/a.b/queue/x"), some("user.x", "a%2Eb.queue.x"));
        for none in [
            "/temp-queue/x",
            "/reply-queue/x",
            "/topic/",
            "/exchange/",
            "/exchange//rk",
            "/queue/",
            "/amq/queue/",
            "/app/",
            "/user/alice",
            "/user//queue/x",
            "/nowhere/x",
            "topic/x",
            "",
        ] {
            assert_eq!(res(none), None, "{none:?}");
        }
        assert_eq!(r.resolve("/topic/x").unwrap().kind, DestinationKind::Topic);
        assert!(!DestinationKind::Topic.mandatory());
        assert!(!DestinationKind::Exchange.mandatory());
        assert!(!DestinationKind::User.mandatory());
        assert!(DestinationKind::Queue.mandatory());
        assert!(DestinationKind::App.mandatory());
        // Configured prefixes win.
        let r = Router::new(vec![], vec!["/backend/".into()], Some("/u/".into()))
            .with_exchanges("app.x", "user.x");
        let res = |d: &str| r.resolve(d).map(|r| (r.exchange, r.routing_key));
        assert_eq!(res("/backend/a/b"), some("app.x", "a.b"));
        assert_eq!(res("/app/x"), None);
        assert_eq!(res("/u/bob/queue/x"), some("user.x", "bob.queue.x"));
    }

    #[test]
    fn amqp_target_reads_a_send_as_the_stomp_plugin_does() {
        let some = |e: &str, k: &str| Some((e.to_owned(), k.to_owned()));
        assert_eq!(amqp_target("/topic/room.42"), some("amq.topic", "room.42"));
        assert_eq!(amqp_target("/topic/a%2Fb"), some("amq.topic", "a/b"));
        assert_eq!(
            amqp_target("/exchange/adme.exchange/room.*"),
            some("adme.exchange", "room.*")
        );
        assert_eq!(amqp_target("/exchange/e"), some("e", ""));
        assert_eq!(amqp_target("/exchange/e/"), some("e", ""));
        assert_eq!(amqp_target("/exchange/a%2Fb/k%2Fl"), some("a/b", "k/l"));
        // Only the plugin's own escape: `%2f` and `%25` stay as they are.
        assert_eq!(
            amqp_target("/topic/a%2fb%25"),
            some("amq.topic", "a%2fb%25")
        );
        for none in [
            "/topic/",
            "/topic/a/b",
            "/exchange/",
            "/exchange//rk",
            "/exchange/e/a/b",
            "/queue/q",
            "/amq/queue/q",
            "/temp-queue/t",
            "/app/x",
            "/user/queue/x",
            "",
        ] {
            assert_eq!(amqp_target(none), None, "{none:?}");
        }
    }
}
