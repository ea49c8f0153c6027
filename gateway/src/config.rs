//! Gateway configuration: defaults, then a TOML file (`--config FILE`), then
//! `GATEWAY__SECTION__KEY` environment variables.
//!
//! Every key here is documented in `docs/configuration.md`; keep them in step.
//!
//! [`load`] merges the three sources and rejects unknown keys and values of
//! the wrong type, naming the key; [`Config::validate`] then checks the values
//! themselves (addresses parse, limits are positive, prefixes do not overlap).

use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub session: SessionConfig,
    pub broker: BrokerConfig,
    pub amqp: AmqpConfig,
    pub app: AppConfig,
    pub user: UserConfig,
    pub api: ApiConfig,
    pub auth: AuthConfig,
    pub log: LogConfig,
    pub topology: TopologyConfig,
}

/// How outbound frames are put into WebSocket messages.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum MessageType {
    /// Text when the encoded frame is valid UTF-8, binary otherwise.
    #[default]
    Auto,
    /// Always text (a non-UTF-8 frame is sent as binary anyway: a text
    /// message must be UTF-8 by RFC 6455).
    Text,
    /// Always binary.
    Binary,
}

/// One WebSocket endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// Request path, for example `/ws`.
    pub path: String,
}

/// `[server]`: the client-facing listener and the admin listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ServerConfig {
    /// Client WebSocket listener.
    pub listen: String,
    /// Admin listener: `/healthz`, `/readyz`.
    pub admin_listen: String,
    /// WebSocket endpoint paths.
    pub endpoints: Vec<Endpoint>,
    /// Allowed `Origin` values; `*` allows any. Requests without an
    /// `Origin` header (non-browser clients) are always allowed.
    pub allowed_origins: Vec<String>,
    /// Maximum concurrent client connections on this process.
    pub max_connections: usize,
    /// Outbound WebSocket message type: `auto`, `text` or `binary`.
    pub message_type: MessageType,
    /// Maximum size of one inbound WebSocket message (bytes).
    pub max_ws_message_size: usize,
    /// This process's name in logs, readiness and the AMQP `app_id`; empty:
    /// `POD_NAME`, else the host name, else `stomp-gateway` (see
    /// [`Config::pod_id`]).
    pub pod_id: String,
    /// On SIGTERM, sessions are closed at jittered moments spread over this
    /// period (ms); 0 closes them all at once.
    pub drain_period_ms: u64,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "0.0.0.0:8080".into(),
            admin_listen: "0.0.0.0:9090".into(),
            endpoints: vec![Endpoint { path: "/ws".into() }],
            allowed_origins: vec!["*".into()],
            max_connections: 10_000,
            message_type: MessageType::Auto,
            max_ws_message_size: 256 * 1024,
            pod_id: String::new(),
            drain_period_ms: 20_000,
        }
    }
}

/// `[session]`: per client session limits and client-leg heart-beats.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    /// How often the gateway offers to send heart-beats to the client (ms, 0 = never).
    pub heartbeat_send_ms: u64,
    /// How often the gateway wants heart-beats from the client (ms, 0 = never).
    pub heartbeat_receive_ms: u64,
    /// The client must send CONNECT within this time after the WebSocket opens (ms).
    pub connect_timeout_ms: u64,
    /// Maximum STOMP frame size, headers and body (bytes).
    pub max_frame_size: usize,
    /// Maximum number of headers in one frame.
    pub max_header_count: usize,
    /// Maximum length of one header line (bytes).
    pub max_header_line: usize,
    /// Maximum active subscriptions per session.
    pub max_subscriptions: usize,
    /// Frames held while the broker connection is being opened.
    pub max_pending_frames: usize,
    /// Outbound bytes queued for one client before the gateway stops reading
    /// that client's broker connection (backpressure).
    pub outbound_buffer_bytes: usize,
}

impl Default for SessionConfig {
    fn default() -> Self {
        SessionConfig {
            heartbeat_send_ms: 10_000,
            heartbeat_receive_ms: 10_000,
            connect_timeout_ms: 10_000,
            max_frame_size: 64 * 1024,
            max_header_count: 64,
            max_header_line: 8 * 1024,
            max_subscriptions: 1_000,
            max_pending_frames: 64,
            outbound_buffer_bytes: 1024 * 1024,
        }
    }
}

/// `[broker]`: the RabbitMQ STOMP plugin.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// STOMP addresses, `host:port`, tried in order.
    pub addresses: Vec<String>,
    /// Sent as the CONNECT `host` header (RabbitMQ virtual host).
    pub virtual_host: String,
    /// Login used for every client session (the browser's is never forwarded).
    pub client_login: String,
    /// Passcode for `client_login`. Masked by [`Config::masked`].
    pub client_passcode: String,
    /// Login of the shared system connection.
    pub system_login: String,
    /// Passcode for `system_login`. Masked by [`Config::masked`].
    pub system_passcode: String,
    /// How often the system connection offers to send heart-beats (ms, 0 = never).
    pub system_heartbeat_send_ms: u64,
    /// How often the system connection wants heart-beats from the broker (ms, 0 = never).
    pub system_heartbeat_receive_ms: u64,
    /// How often each client session's broker connection offers to send heart-beats (ms).
    pub client_heartbeat_send_ms: u64,
    /// How often each client session's broker connection wants heart-beats (ms).
    pub client_heartbeat_receive_ms: u64,
    /// TCP connect plus STOMP CONNECTED timeout, per address (ms).
    pub connect_timeout_ms: u64,
    /// System link reconnect backoff: first delay cap (ms); doubles per
    /// failed attempt, full jitter.
    pub reconnect_initial_ms: u64,
    /// System link reconnect backoff: largest delay cap (ms).
    pub reconnect_max_ms: u64,
    /// Destination prefixes relayed to the broker.
    pub relay_prefixes: Vec<String>,
    /// `[broker.tls]`: TLS to the STOMP plugin (client sessions and the
    /// system link).
    pub tls: TlsConfig,
}

/// `[broker.tls]`: TLS for the STOMP connections to the broker.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TlsConfig {
    /// Connect to every broker address with TLS.
    pub enabled: bool,
    /// PEM bundle of the CA certificates to trust; required when enabled.
    pub ca_file: String,
    /// PEM client certificate chain for mutual TLS (optional).
    pub cert_file: String,
    /// PEM private key of `cert_file` (PKCS#8, PKCS#1 or SEC1).
    pub key_file: String,
    /// Name verified in the broker's certificate and sent as SNI; empty: the
    /// host part of each broker address.
    pub server_name: String,
}

/// `[amqp.tls]`: certificates for `amqps://` URLs.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpTlsConfig {
    /// PEM bundle of CA certificates to trust (besides the bundled public
    /// roots).
    pub ca_file: String,
    /// PEM client certificate chain for mutual TLS (optional).
    pub cert_file: String,
    /// PEM private key of `cert_file` (PKCS#8, PKCS#1 or SEC1).
    pub key_file: String,
}

impl Default for BrokerConfig {
    fn default() -> Self {
        BrokerConfig {
            addresses: vec!["127.0.0.1:61613".into()],
            virtual_host: "/".into(),
            client_login: "guest".into(),
            client_passcode: "guest".into(),
            system_login: "guest".into(),
            system_passcode: "guest".into(),
            system_heartbeat_send_ms: 10_000,
            system_heartbeat_receive_ms: 10_000,
            client_heartbeat_send_ms: 10_000,
            client_heartbeat_receive_ms: 10_000,
            connect_timeout_ms: 5_000,
            reconnect_initial_ms: 500,
            reconnect_max_ms: 30_000,
            relay_prefixes: [
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
            tls: TlsConfig::default(),
        }
    }
}

/// `[amqp]`: the AMQP 0-9-1 control plane (topology, application and user
/// publishes, the publish API).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AmqpConfig {
    /// `amqp://user:password@host:port/vhost` (the vhost percent-encoded:
    /// `%2f` is `/`). The password is masked by [`Config::masked`].
    pub url: String,
    /// AMQP connections used for publishing (each with one confirm-mode
    /// channel), besides the one control connection.
    pub pool_size: usize,
    /// TCP connect plus AMQP handshake timeout (ms).
    pub connect_timeout_ms: u64,
    /// Reconnect backoff: first delay cap (ms); doubles per failed attempt,
    /// full jitter.
    pub reconnect_initial_ms: u64,
    /// Reconnect backoff: largest delay cap (ms).
    pub reconnect_max_ms: u64,
    /// Process-wide limit of publishes awaiting a broker confirm
    /// (application and API publishes together).
    pub max_inflight_publishes: usize,
    /// How long a publish waits for the broker's confirm (ms).
    pub publish_timeout_ms: u64,
    /// More URLs tried in order after `url`, at start and on every reconnect
    /// (other nodes of the cluster). Passwords are masked by
    /// [`Config::masked`].
    pub failover_urls: Vec<String>,
    /// `[amqp.tls]`: certificates for `amqps://` URLs.
    pub tls: AmqpTlsConfig,
}

impl AmqpConfig {
    /// `url`, then `failover_urls`, in the order they are tried.
    pub fn urls(&self) -> impl Iterator<Item = &str> {
        std::iter::once(self.url.as_str()).chain(self.failover_urls.iter().map(String::as_str))
    }
}

impl Default for AmqpConfig {
    fn default() -> Self {
        AmqpConfig {
            url: "amqp://guest:guest@127.0.0.1:5672/%2f".into(),
            pool_size: 4,
            connect_timeout_ms: 5_000,
            reconnect_initial_ms: 500,
            reconnect_max_ms: 30_000,
            max_inflight_publishes: 1024,
            publish_timeout_ms: 10_000,
            failover_urls: Vec::new(),
            tls: AmqpTlsConfig::default(),
        }
    }
}

/// An AMQP exchange type.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ExchangeType {
    /// Routing-key patterns with `*` and `#`.
    #[default]
    Topic,
    /// Exact routing-key match.
    Direct,
    /// Every bound queue.
    Fanout,
    /// Header matching (`x-match`).
    Headers,
}

impl ExchangeType {
    /// The AMQP name: `topic`, `direct`, `fanout` or `headers`.
    pub fn as_str(self) -> &'static str {
        match self {
            ExchangeType::Topic => "topic",
            ExchangeType::Direct => "direct",
            ExchangeType::Fanout => "fanout",
            ExchangeType::Headers => "headers",
        }
    }
}

impl std::fmt::Display for ExchangeType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// `[app]`: application destinations, published over AMQP to backends.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AppConfig {
    /// Application destination prefixes.
    pub prefixes: Vec<String>,
    /// Exchange that client SENDs to application destinations are published
    /// to (declared durable by the control plane).
    pub exchange: String,
    /// Type of [`AppConfig::exchange`].
    pub exchange_type: ExchangeType,
    /// Application publishes awaiting a broker confirm, per session.
    pub max_inflight_per_session: usize,
}

impl Default for AppConfig {
    fn default() -> Self {
        AppConfig {
            prefixes: vec!["/app/".into()],
            exchange: "stomp.app".into(),
            exchange_type: ExchangeType::Topic,
            max_inflight_per_session: 256,
        }
    }
}

/// `[user]`: user destinations.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct UserConfig {
    /// User destination prefix.
    pub prefix: String,
    /// Direct exchange that user destinations are bound to (declared durable
    /// by the control plane).
    pub exchange: String,
    /// Whether clients may SEND to `/user/<name>/...`.
    pub client_send_enabled: bool,
}

impl Default for UserConfig {
    fn default() -> Self {
        UserConfig {
            prefix: "/user/".into(),
            exchange: "stomp.user".into(),
            client_send_enabled: false,
        }
    }
}

/// `[api]`: the HTTP publish API on the admin listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ApiConfig {
    /// Bearer token the API requires; empty disables the API. Masked by
    /// [`Config::masked`].
    pub token: String,
    /// Largest message body the API accepts (bytes, after base64 decoding).
    pub max_body_bytes: usize,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            token: String::new(),
            max_body_bytes: 64 * 1024,
        }
    }
}

/// `auth.mode`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthMode {
    /// Every client is anonymous.
    #[default]
    None,
    /// Clients present a JWT on CONNECT.
    Jwt,
}

/// `auth.jwt_algorithm`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub enum JwtAlgorithm {
    #[default]
    #[serde(rename = "HS256")]
    Hs256,
    #[serde(rename = "HS384")]
    Hs384,
    #[serde(rename = "HS512")]
    Hs512,
    #[serde(rename = "RS256")]
    Rs256,
    #[serde(rename = "RS384")]
    Rs384,
    #[serde(rename = "RS512")]
    Rs512,
    #[serde(rename = "ES256")]
    Es256,
    #[serde(rename = "ES384")]
    Es384,
}

impl JwtAlgorithm {
    /// The JOSE name, for example `HS256`.
    pub fn as_str(self) -> &'static str {
        match self {
            JwtAlgorithm::Hs256 => "HS256",
            JwtAlgorithm::Hs384 => "HS384",
            JwtAlgorithm::Hs512 => "HS512",
            JwtAlgorithm::Rs256 => "RS256",
            JwtAlgorithm::Rs384 => "RS384",
            JwtAlgorithm::Rs512 => "RS512",
            JwtAlgorithm::Es256 => "ES256",
            JwtAlgorithm::Es384 => "ES384",
        }
    }

    /// HMAC algorithms (`HS*`) use `auth.jwt_secret`; the others
    /// `auth.jwt_public_key_file`.
    pub fn is_hmac(self) -> bool {
        matches!(
            self,
            JwtAlgorithm::Hs256 | JwtAlgorithm::Hs384 | JwtAlgorithm::Hs512
        )
    }
}

/// `[auth]`: client authentication on CONNECT.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthConfig {
    /// `none` or `jwt`.
    pub mode: AuthMode,
    /// Secret of the HMAC algorithms. Masked by [`Config::masked`].
    pub jwt_secret: String,
    /// PEM file with the public key of the RSA/ECDSA algorithms.
    pub jwt_public_key_file: String,
    /// Accepted signature algorithm.
    pub jwt_algorithm: JwtAlgorithm,
    /// Required `iss` claim; empty = not checked.
    pub jwt_issuer: String,
    /// Required `aud` claim; empty = not checked.
    pub jwt_audience: String,
    /// Claim holding the user name.
    pub user_claim: String,
    /// CONNECT header carrying `Bearer <jwt>` (or the bare token); the
    /// `passcode` header is the fallback.
    pub token_header: String,
}

impl Default for AuthConfig {
    fn default() -> Self {
        AuthConfig {
            mode: AuthMode::None,
            jwt_secret: String::new(),
            jwt_public_key_file: String::new(),
            jwt_algorithm: JwtAlgorithm::Hs256,
            jwt_issuer: String::new(),
            jwt_audience: String::new(),
            user_claim: "sub".into(),
            token_header: "Authorization".into(),
        }
    }
}

/// A value in an AMQP arguments table (`x-message-ttl = 60000`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum ArgValue {
    Bool(bool),
    Int(i64),
    Float(f64),
    String(String),
}

impl ArgValue {
    fn type_name(&self) -> &'static str {
        match self {
            ArgValue::Bool(_) => "a boolean",
            ArgValue::Int(_) => "an integer",
            ArgValue::Float(_) => "a float",
            ArgValue::String(_) => "a string",
        }
    }
}

/// An AMQP arguments table.
pub type Arguments = BTreeMap<String, ArgValue>;

/// `[topology]`: exchanges, queues and bindings the control plane declares
/// on start and after every reconnect.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TopologyConfig {
    pub exchanges: Vec<ExchangeDecl>,
    pub queues: Vec<QueueDecl>,
    pub bindings: Vec<BindingDecl>,
}

/// `[[topology.exchanges]]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ExchangeDecl {
    pub name: String,
    #[serde(rename = "type")]
    pub kind: ExchangeType,
    pub durable: bool,
    pub auto_delete: bool,
    pub internal: bool,
    pub arguments: Arguments,
}

impl Default for ExchangeDecl {
    fn default() -> Self {
        ExchangeDecl {
            name: String::new(),
            kind: ExchangeType::Topic,
            durable: true,
            auto_delete: false,
            internal: false,
            arguments: Arguments::new(),
        }
    }
}

/// `[[topology.queues]]`.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct QueueDecl {
    pub name: String,
    pub durable: bool,
    pub exclusive: bool,
    pub auto_delete: bool,
    pub arguments: Arguments,
}

impl Default for QueueDecl {
    fn default() -> Self {
        QueueDecl {
            name: String::new(),
            durable: true,
            exclusive: false,
            auto_delete: false,
            arguments: Arguments::new(),
        }
    }
}

/// `[[topology.bindings]]`: `exchange` (the source) to exactly one of
/// `queue` or `destination_exchange`.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BindingDecl {
    /// Source exchange.
    pub exchange: String,
    /// Destination queue (empty when `destination_exchange` is set).
    pub queue: String,
    /// Destination exchange (empty when `queue` is set).
    pub destination_exchange: String,
    pub routing_key: String,
    /// Binding arguments (for headers exchanges: `x-match` and the headers).
    pub arguments: Arguments,
}

/// The exchanges every RabbitMQ virtual host has.
pub const BUILTIN_EXCHANGES: [&str; 5] = [
    "amq.topic",
    "amq.direct",
    "amq.fanout",
    "amq.headers",
    "amq.match",
];

/// `[log]`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct LogConfig {
    /// tracing env-filter directive; `RUST_LOG` wins when set.
    pub filter: String,
    /// `text` or `json`.
    pub format: LogFormat,
}

/// `log.format`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LogFormat {
    /// Human-readable lines.
    #[default]
    Text,
    /// One JSON object per line.
    Json,
}

impl Default for LogConfig {
    fn default() -> Self {
        LogConfig {
            filter: "info".into(),
            format: LogFormat::Text,
        }
    }
}

/// Prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "GATEWAY";
/// Separator between the prefix, the section and the key in environment
/// variable names: `GATEWAY__BROKER__ADDRESSES`.
pub const ENV_SEPARATOR: &str = "__";
/// Value that [`Config::masked`] puts in place of secrets.
pub const MASK: &str = "******";

/// `server.endpoints` is a list of tables; from the environment it is given
/// as comma-separated paths (`GATEWAY__SERVER__ENDPOINTS=/ws,/stomp`).
const ENV_ENDPOINTS_KEY: &str = "server.endpoints";

/// Why the configuration could not be loaded or is not valid.
///
/// Every variant that concerns one key names it the way the TOML file spells
/// it (`broker.addresses[1]`, `server.endpoints[0].path`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The `--config` file is missing, unreadable or not valid TOML.
    #[error("cannot load config file {}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    /// A key that no section defines (a typo, or a removed key).
    #[error("invalid config: {key}: unknown key{origin}")]
    UnknownKey {
        key: String,
        /// ` (set by GATEWAY__...)` when it came from the environment, else empty.
        origin: String,
    },
    /// A key whose value has the wrong type or breaks a rule.
    #[error("invalid config: {key}: {reason}")]
    Invalid { key: String, reason: String },
    /// Anything the configuration library reports without a key.
    #[error("invalid config: {0}")]
    Other(String),
}

impl ConfigError {
    /// The key the error is about, if it is about one key.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::UnknownKey { key, .. } | ConfigError::Invalid { key, .. } => Some(key),
            ConfigError::File { .. } | ConfigError::Other(_) => None,
        }
    }

    fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }
}

/// Loads the configuration: built-in defaults, then the TOML file at `path`
/// (when given; a missing or unreadable file is an error), then
/// `GATEWAY__SECTION__KEY` environment variables.
///
/// Unknown keys and values of the wrong type are rejected here; call
/// [`Config::validate`] for the value rules.
pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
    let mut env = HashMap::new();
    for (name, value) in std::env::vars_os() {
        let Ok(name) = name.into_string() else {
            continue; // not ours: ours are ASCII
        };
        if !is_gateway_var(&name) {
            continue;
        }
        match value.into_string() {
            Ok(value) => {
                env.insert(name, value);
            }
            Err(_) => {
                return Err(ConfigError::invalid(
                    env_var_to_key(&name),
                    format!("environment variable {name} is not valid UTF-8"),
                ))
            }
        }
    }
    load_from(path, env)
}

/// [`load`] with the environment given as a map (all variables; those
/// without the `GATEWAY__` prefix are ignored). Used by tests.
pub(crate) fn load_from(
    path: Option<&Path>,
    env: HashMap<String, String>,
) -> Result<Config, ConfigError> {
    let defaults = config::Config::try_from(&Config::default()).map_err(from_library)?;
    let mut builder = config::Config::builder().add_source(defaults);

    if let Some(path) = path {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        // Parse once here so a syntax error names the file.
        if let Err(e) = text.parse::<toml::Table>() {
            return Err(ConfigError::File {
                path: path.to_owned(),
                reason: e.to_string().trim_end().to_owned(),
            });
        }
        builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
    }

    // The environment. Values of string keys are taken verbatim (so a
    // passcode like `0123` stays a string), lists are comma-separated and
    // set exactly, everything else (numbers, booleans, enums) is parsed.
    let known = schema()?;
    let mut strings: config::Map<String, String> = config::Map::new();
    let mut typed: config::Map<String, String> = config::Map::new();
    let mut names: Vec<&String> = env.keys().filter(|n| is_gateway_var(n)).collect();
    names.sort();
    for name in names {
        let value = env.get(name).map(String::as_str).unwrap_or_default();
        let key = env_var_to_key(name);
        if key == "topology" || key.starts_with("topology.") {
            return Err(ConfigError::invalid(
                key,
                format!(
                    "the topology can only be set in the config file (not by environment variable {name})"
                ),
            ));
        }
        match lookup(&known, &key) {
            Some(serde_json::Value::String(_)) => {
                strings.insert(name.clone(), value.to_owned());
            }
            Some(serde_json::Value::Array(_)) if key == ENV_ENDPOINTS_KEY => {
                let list: Vec<config::Map<String, String>> = split_list(value)
                    .map(|p| config::Map::from([("path".to_owned(), p.to_owned())]))
                    .collect();
                builder = builder.set_override(&key, list).map_err(from_library)?;
            }
            Some(serde_json::Value::Array(_)) => {
                let list: Vec<String> = split_list(value).map(str::to_owned).collect();
                builder = builder.set_override(&key, list).map_err(from_library)?;
            }
            _ => {
                typed.insert(name.clone(), value.to_owned());
            }
        }
    }
    let environment = || {
        config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator(ENV_SEPARATOR)
            .separator(ENV_SEPARATOR)
    };
    builder = builder
        .add_source(environment().source(Some(strings)))
        .add_source(environment().try_parsing(true).source(Some(typed)));

    let merged = builder.build().map_err(from_library)?;

    // Unknown keys first, so a typo is reported as such and not as a
    // confusing serde message.
    let tree: serde_json::Value = merged.clone().try_deserialize().map_err(from_library)?;
    if let Some(key) = find_unknown_key(&tree, &known, "") {
        let origin = env
            .keys()
            .filter(|name| is_gateway_var(name))
            .find(|name| {
                let k = env_var_to_key(name);
                k == key || key.starts_with(&format!("{k}.")) || k.starts_with(&format!("{key}."))
            })
            .map(|name| format!(" (set by environment variable {name})"))
            .unwrap_or_default();
        return Err(ConfigError::UnknownKey { key, origin });
    }

    merged
        .try_deserialize()
        .map_err(from_library)
        .map_err(with_enum_hint)
}

/// The defaults as a JSON tree, with one default element in each list of
/// tables that is empty by default (`topology.*`), so unknown keys inside
/// those tables are found too. An empty default table (`arguments`)
/// accepts any key.
fn schema() -> Result<serde_json::Value, ConfigError> {
    let sample = Config {
        topology: TopologyConfig {
            exchanges: vec![ExchangeDecl::default()],
            queues: vec![QueueDecl::default()],
            bindings: vec![BindingDecl::default()],
        },
        ..Config::default()
    };
    serde_json::to_value(sample)
        .map_err(|e| ConfigError::Other(format!("cannot describe the defaults: {e}")))
}

/// Keys whose values are one of a fixed set of words (list indices written
/// as `[]`).
const ENUM_KEYS: [(&str, &str); 6] = [
    ("server.message_type", "auto, text, binary"),
    ("log.format", "text, json"),
    ("app.exchange_type", "topic, direct, fanout, headers"),
    (
        "topology.exchanges[].type",
        "topic, direct, fanout, headers",
    ),
    ("auth.mode", "none, jwt"),
    (
        "auth.jwt_algorithm",
        "HS256, HS384, HS512, RS256, RS384, RS512, ES256, ES384",
    ),
];

/// `topology.exchanges[3].type` -> `topology.exchanges[].type`.
fn without_indices(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    let mut in_index = false;
    for c in key.chars() {
        match c {
            '[' => {
                in_index = true;
                out.push('[');
            }
            ']' => {
                in_index = false;
                out.push(']');
            }
            _ if in_index => {}
            c => out.push(c),
        }
    }
    out
}

/// Adds the allowed words to an error about an enum-valued key.
fn with_enum_hint(e: ConfigError) -> ConfigError {
    match e {
        ConfigError::Invalid { key, reason } => {
            match ENUM_KEYS.iter().find(|(k, _)| *k == without_indices(&key)) {
                Some((_, allowed)) => ConfigError::Invalid {
                    reason: format!("{reason} (expected one of: {allowed})"),
                    key,
                },
                None => ConfigError::Invalid { key, reason },
            }
        }
        other => other,
    }
}

fn is_gateway_var(name: &str) -> bool {
    let prefix = format!("{ENV_PREFIX}{ENV_SEPARATOR}");
    name.len() > prefix.len()
        && name.is_char_boundary(prefix.len())
        && name[..prefix.len()].eq_ignore_ascii_case(&prefix)
}

/// `GATEWAY__BROKER__CLIENT_PASSCODE` -> `broker.client_passcode`.
fn env_var_to_key(name: &str) -> String {
    let prefix_len = ENV_PREFIX.len() + ENV_SEPARATOR.len();
    name.get(prefix_len..)
        .unwrap_or_default()
        .to_lowercase()
        .replace(ENV_SEPARATOR, ".")
}

/// The environment variable that sets `key` (`server.listen` ->
/// `GATEWAY__SERVER__LISTEN`).
pub fn env_var_for(key: &str) -> String {
    format!(
        "{ENV_PREFIX}{ENV_SEPARATOR}{}",
        key.to_uppercase().replace('.', ENV_SEPARATOR)
    )
}

fn split_list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// The default value at a dotted key, if the key exists.
fn lookup<'a>(known: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    key.split('.').try_fold(known, |v, segment| v.get(segment))
}

/// The first key in `tree` that `known` (the defaults) does not have, as a
/// dotted path. Lists of tables are checked against their first default
/// element; an empty default table accepts any key.
fn find_unknown_key(
    tree: &serde_json::Value,
    known: &serde_json::Value,
    path: &str,
) -> Option<String> {
    use serde_json::Value;
    match (tree, known) {
        (Value::Object(tree), Value::Object(known)) if !known.is_empty() => {
            let mut entries: Vec<(&String, &Value)> = tree.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            for (key, value) in entries {
                let sub = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match known.get(key) {
                    None => return Some(sub),
                    Some(k) => {
                        if let Some(found) = find_unknown_key(value, k, &sub) {
                            return Some(found);
                        }
                    }
                }
            }
            None
        }
        (Value::Array(items), Value::Array(known)) => {
            let schema = known.first()?;
            items
                .iter()
                .enumerate()
                .find_map(|(i, item)| find_unknown_key(item, schema, &format!("{path}[{i}]")))
        }
        _ => None,
    }
}

/// The configuration library writes a key inside a list of tables as
/// `topology.exchanges[1]type`; ours is `topology.exchanges[1].type`.
fn dotted_key(key: String) -> String {
    let mut out = String::with_capacity(key.len() + 2);
    let mut after_index = false;
    for c in key.chars() {
        if after_index && c != '.' && c != '[' {
            out.push('.');
        }
        after_index = c == ']';
        out.push(c);
    }
    out
}

/// Maps the configuration library's errors to ours, keeping the key.
fn from_library(e: config::ConfigError) -> ConfigError {
    let e = match e {
        config::ConfigError::Type {
            origin,
            unexpected,
            expected,
            key,
        } => config::ConfigError::Type {
            origin,
            unexpected,
            expected,
            key: key.map(dotted_key),
        },
        config::ConfigError::At { error, origin, key } => config::ConfigError::At {
            error,
            origin,
            key: key.map(dotted_key),
        },
        other => other,
    };
    match e {
        config::ConfigError::Type {
            origin,
            unexpected,
            expected,
            key,
        } => {
            let mut reason = format!("invalid type: {unexpected}, expected {expected}");
            if let Some(origin) = origin {
                reason.push_str(&format!(" (from {origin})"));
            }
            match key {
                Some(key) => ConfigError::Invalid { key, reason },
                None => ConfigError::Other(reason),
            }
        }
        config::ConfigError::At { error, origin, key } => {
            let mut reason = error.to_string();
            if let Some(origin) = origin {
                reason.push_str(&format!(" (from {origin})"));
            }
            match key {
                Some(key) => ConfigError::Invalid { key, reason },
                None => ConfigError::Other(reason),
            }
        }
        config::ConfigError::NotFound(key) => ConfigError::invalid(key, "missing"),
        other => ConfigError::Other(other.to_string()),
    }
}

impl Config {
    /// Checks every value rule; the first broken rule is returned, naming
    /// its key. See `docs/configuration.md` for the rules.
    pub fn validate(&self) -> Result<(), ConfigError> {
        self.server.validate(&self.session)?;
        self.session.validate()?;
        self.broker.validate()?;
        self.amqp.validate()?;
        self.validate_prefixes()?;
        self.validate_exchanges()?;
        self.api.validate()?;
        self.auth.validate()?;
        self.validate_topology()?;
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
const MAX_POD_ID_BYTES: usize = 100;
/// Largest `server.drain_period_ms`: 10 minutes.
const MAX_DRAIN_PERIOD_MS: u64 = 600_000;

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
        // Reads and parses the files, as the gateway does at start.
        crate::broker::BrokerTls::from_config(&self.tls).map_err(tls_error)?;
        Ok(())
    }
}

/// A TLS settings error as a configuration error about the same key.
fn tls_error(e: crate::broker::TlsError) -> ConfigError {
    ConfigError::invalid(e.key(), e.reason())
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
        // Reads and parses the files, as the gateway does at start.
        crate::amqp::tls_config(&self.tls).map_err(tls_error)?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn env(vars: &[(&str, &str)]) -> HashMap<String, String> {
        vars.iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect()
    }

    /// A TOML file that lives as long as the returned guard.
    struct TempFile(PathBuf);

    impl TempFile {
        fn new(name: &str, contents: &str) -> TempFile {
            let path = std::env::temp_dir().join(format!(
                "stomp-gateway-config-test-{}-{name}.toml",
                std::process::id()
            ));
            let mut f = std::fs::File::create(&path).expect("create temp file");
            f.write_all(contents.as_bytes()).expect("write temp file");
            TempFile(path)
        }
    }

    impl Drop for TempFile {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }

    fn load_err(path: Option<&Path>, vars: &[(&str, &str)]) -> ConfigError {
        match load_from(path, env(vars)) {
            Ok(c) => panic!("expected an error, loaded {c:?}"),
            Err(e) => e,
        }
    }

    #[test]
    fn defaults_load_and_validate() {
        let c = load_from(None, HashMap::new()).expect("defaults load");
        c.validate().expect("defaults validate");
        assert_eq!(c.server.listen, "0.0.0.0:8080");
        assert_eq!(c.broker.addresses, vec!["127.0.0.1:61613".to_owned()]);
        Config::default().validate().expect("Default validates");
    }

    #[test]
    fn file_then_env_precedence() {
        let file = TempFile::new(
            "precedence",
            r#"
[server]
listen = "127.0.0.1:8181"
endpoints = [ { path = "/stomp" }, { path = "/ws2" } ]
message_type = "binary"

[broker]
addresses = ["a:61613", "b:61613"]
client_passcode = "from-file"
connect_timeout_ms = 1234

[log]
format = "json"
"#,
        );
        // File only: file beats defaults, untouched keys keep defaults.
        let c = load_from(Some(&file.0), HashMap::new()).expect("file loads");
        assert_eq!(c.server.listen, "127.0.0.1:8181");
        assert_eq!(c.server.admin_listen, "0.0.0.0:9090");
        assert_eq!(
            c.server.endpoints,
            vec![
                Endpoint {
                    path: "/stomp".into()
                },
                Endpoint {
                    path: "/ws2".into()
                }
            ]
        );
        assert_eq!(c.server.message_type, MessageType::Binary);
        assert_eq!(c.broker.addresses, vec!["a:61613", "b:61613"]);
        assert_eq!(c.broker.client_passcode, "from-file");
        assert_eq!(c.broker.connect_timeout_ms, 1234);
        assert_eq!(c.log.format, LogFormat::Json);
        c.validate().expect("file config validates");

        // Env beats file; unrelated variables are ignored.
        let c = load_from(
            Some(&file.0),
            env(&[
                ("GATEWAY__SERVER__LISTEN", "127.0.0.1:8282"),
                ("GATEWAY__BROKER__ADDRESSES", "c:61613, d:61614"),
                ("GATEWAY__BROKER__CLIENT_PASSCODE", "0123"),
                ("GATEWAY__BROKER__SYSTEM_LOGIN", "true"),
                ("GATEWAY__BROKER__CONNECT_TIMEOUT_MS", "4321"),
                ("gateway__session__max_frame_size", "2048"),
                ("GATEWAY__SERVER__ENDPOINTS", "/a,/b"),
                ("GATEWAY__SERVER__ALLOWED_ORIGINS", "https://x.example"),
                ("GATEWAY__SERVER__MESSAGE_TYPE", "text"),
                ("GATEWAY__APP__PREFIXES", ""),
                ("GATEWAY_CONFIG", "/not/used"),
                ("PATH", "/usr/bin"),
            ]),
        )
        .expect("file + env loads");
        assert_eq!(c.server.listen, "127.0.0.1:8282");
        assert_eq!(c.broker.addresses, vec!["c:61613", "d:61614"]);
        assert_eq!(c.broker.client_passcode, "0123");
        assert_eq!(c.broker.system_login, "true");
        assert_eq!(c.broker.connect_timeout_ms, 4321);
        assert_eq!(c.session.max_frame_size, 2048);
        assert_eq!(
            c.server.endpoints,
            vec![
                Endpoint { path: "/a".into() },
                Endpoint { path: "/b".into() }
            ]
        );
        assert_eq!(c.server.allowed_origins, vec!["https://x.example"]);
        assert_eq!(c.server.message_type, MessageType::Text);
        assert!(c.app.prefixes.is_empty());
        assert_eq!(c.log.format, LogFormat::Json, "file value kept");
        c.validate().expect("file + env config validates");
    }

    #[test]
    fn missing_or_malformed_file_names_the_path() {
        let missing = std::env::temp_dir().join("stomp-gateway-no-such-config.toml");
        let e = load_err(Some(&missing), &[]);
        assert!(matches!(&e, ConfigError::File { path, .. } if *path == missing));
        assert!(
            e.to_string().contains("stomp-gateway-no-such-config.toml"),
            "{e}"
        );

        let bad = TempFile::new("syntax", "[server\nlisten = 1\n");
        let e = load_err(Some(&bad.0), &[]);
        assert!(
            matches!(&e, ConfigError::File { path, .. } if *path == bad.0),
            "{e}"
        );
    }

    #[test]
    fn unknown_keys_are_rejected_by_name() {
        let f = TempFile::new("unknown-section", "[nope]\nx = 1\n");
        let e = load_err(Some(&f.0), &[]);
        assert_eq!(e.key(), Some("nope"), "{e}");

        let f = TempFile::new("unknown-key", "[broker]\nadresses = [\"a:1\"]\n");
        let e = load_err(Some(&f.0), &[]);
        assert_eq!(e.key(), Some("broker.adresses"), "{e}");
        assert_eq!(
            e.to_string(),
            "invalid config: broker.adresses: unknown key"
        );

        let f = TempFile::new(
            "unknown-endpoint-key",
            "[server]\nendpoints = [ { path = \"/ws\" }, { path = \"/x\", sockjss = true } ]\n",
        );
        let e = load_err(Some(&f.0), &[]);
        assert_eq!(e.key(), Some("server.endpoints[1].sockjss"), "{e}");

        let e = load_err(None, &[("GATEWAY__BROKER__PASSWORD", "x")]);
        assert_eq!(e.key(), Some("broker.password"), "{e}");
        assert!(
            e.to_string()
                .contains("set by environment variable GATEWAY__BROKER__PASSWORD"),
            "{e}"
        );
    }

    #[test]
    fn wrong_types_name_the_key() {
        let f = TempFile::new("bad-type", "[session]\nmax_frame_size = \"big\"\n");
        let e = load_err(Some(&f.0), &[]);
        assert_eq!(e.key(), Some("session.max_frame_size"), "{e}");

        let f = TempFile::new("bad-enum", "[server]\nmessage_type = \"morse\"\n");
        let e = load_err(Some(&f.0), &[]);
        assert_eq!(e.key(), Some("server.message_type"), "{e}");
        assert!(
            e.to_string()
                .contains("expected one of: auto, text, binary"),
            "{e}"
        );

        let f = TempFile::new("negative", "[server]\nmax_connections = -1\n");
        let e = load_err(Some(&f.0), &[]);
        assert_eq!(e.key(), Some("server.max_connections"), "{e}");

        let e = load_err(None, &[("GATEWAY__BROKER__RECONNECT_MAX_MS", "soon")]);
        assert_eq!(e.key(), Some("broker.reconnect_max_ms"), "{e}");
        assert!(e.to_string().contains("environment"), "{e}");
    }

    fn invalid_key(mutate: impl FnOnce(&mut Config)) -> String {
        let mut c = Config::default();
        mutate(&mut c);
        match c.validate() {
            Ok(()) => panic!("expected a validation error"),
            Err(e) => {
                assert!(e.to_string().starts_with("invalid config: "), "{e}");
                e.key().expect("error names a key").to_owned()
            }
        }
    }

    type Mutation = Box<dyn FnOnce(&mut Config)>;

    #[test]
    fn validation_rules_name_the_key() {
        let cases: Vec<(&str, Mutation)> = vec![
            (
                "server.listen",
                Box::new(|c| c.server.listen = "localhost".into()),
            ),
            (
                "server.admin_listen",
                Box::new(|c| c.server.admin_listen = "1.2.3.4".into()),
            ),
            (
                "server.admin_listen",
                Box::new(|c| c.server.admin_listen = c.server.listen.clone()),
            ),
            ("server.endpoints", Box::new(|c| c.server.endpoints.clear())),
            (
                "server.endpoints[0].path",
                Box::new(|c| c.server.endpoints[0].path = "ws".into()),
            ),
            (
                "server.endpoints[1].path",
                Box::new(|c| {
                    c.server.endpoints.push(Endpoint { path: "/ws".into() });
                }),
            ),
            (
                "server.allowed_origins[0]",
                Box::new(|c| c.server.allowed_origins = vec![String::new()]),
            ),
            (
                "server.max_connections",
                Box::new(|c| c.server.max_connections = 0),
            ),
            (
                "server.max_ws_message_size",
                Box::new(|c| c.server.max_ws_message_size = c.session.max_frame_size - 1),
            ),
            (
                "session.max_frame_size",
                Box::new(|c| c.session.max_frame_size = 1023),
            ),
            (
                "session.max_header_count",
                Box::new(|c| c.session.max_header_count = 0),
            ),
            (
                "session.max_header_line",
                Box::new(|c| c.session.max_header_line = 0),
            ),
            (
                "session.max_subscriptions",
                Box::new(|c| c.session.max_subscriptions = 0),
            ),
            (
                "session.max_pending_frames",
                Box::new(|c| c.session.max_pending_frames = 0),
            ),
            (
                "session.outbound_buffer_bytes",
                Box::new(|c| c.session.outbound_buffer_bytes = c.session.max_frame_size - 1),
            ),
            (
                "session.connect_timeout_ms",
                Box::new(|c| c.session.connect_timeout_ms = 0),
            ),
            ("broker.addresses", Box::new(|c| c.broker.addresses.clear())),
            (
                "broker.addresses[1]",
                Box::new(|c| c.broker.addresses.push("foo".into())),
            ),
            (
                "broker.addresses[0]",
                Box::new(|c| c.broker.addresses[0] = "host:0".into()),
            ),
            (
                "broker.addresses[0]",
                Box::new(|c| c.broker.addresses[0] = "host:65536".into()),
            ),
            (
                "broker.addresses[0]",
                Box::new(|c| c.broker.addresses[0] = ":61613".into()),
            ),
            (
                "broker.virtual_host",
                Box::new(|c| c.broker.virtual_host = "a\nb".into()),
            ),
            (
                "broker.system_passcode",
                Box::new(|c| c.broker.system_passcode = "x\0".into()),
            ),
            (
                "broker.connect_timeout_ms",
                Box::new(|c| c.broker.connect_timeout_ms = 0),
            ),
            (
                "broker.reconnect_initial_ms",
                Box::new(|c| c.broker.reconnect_initial_ms = 0),
            ),
            (
                "broker.reconnect_initial_ms",
                Box::new(|c| {
                    c.broker.reconnect_initial_ms = 10;
                    c.broker.reconnect_max_ms = 9;
                }),
            ),
            (
                "broker.relay_prefixes[0]",
                Box::new(|c| c.broker.relay_prefixes[0] = "topic/".into()),
            ),
            (
                "broker.relay_prefixes[0]",
                Box::new(|c| c.broker.relay_prefixes[0] = String::new()),
            ),
            (
                "app.prefixes[0]",
                Box::new(|c| c.app.prefixes[0] = "app/".into()),
            ),
            ("user.prefix", Box::new(|c| c.user.prefix = "user".into())),
            (
                "app.prefixes[0]",
                Box::new(|c| c.app.prefixes[0] = "/topic/".into()),
            ),
            ("user.prefix", Box::new(|c| c.user.prefix = "/app/".into())),
            (
                "app.prefixes[0]",
                Box::new(|c| c.app.prefixes[0] = "/queue/app/".into()),
            ),
            ("log.filter", Box::new(|c| c.log.filter = "info,[".into())),
        ];
        for (expected, mutate) in cases {
            assert_eq!(invalid_key(mutate), expected);
        }
    }

    #[test]
    fn accepted_edge_values() {
        let mut c = Config::default();
        c.broker.addresses = vec![
            "rabbit-0.rabbit.svc:61613".into(),
            "[::1]:61613".into(),
            "10.0.0.1:1".into(),
        ];
        c.server.listen = "127.0.0.1:0".into();
        c.server.admin_listen = "127.0.0.1:0".into();
        c.session.max_frame_size = 1024;
        c.session.outbound_buffer_bytes = 1024;
        c.broker.reconnect_initial_ms = 100;
        c.broker.reconnect_max_ms = 100;
        c.app.prefixes.clear();
        c.log.filter = "warn,stomp_gateway=debug".into();
        c.validate().expect("edge values validate");
    }

    #[test]
    fn error_display_names_key_and_reason() {
        let mut c = Config::default();
        c.broker.addresses.push("foo".into());
        let e = c.validate().expect_err("invalid address");
        assert_eq!(
            e.to_string(),
            r#"invalid config: broker.addresses[1]: "foo" is not host:port"#
        );
    }

    #[test]
    fn masked_toml_hides_secrets_and_round_trips() {
        let mut c = Config::default();
        c.broker.client_passcode = "client-secret".into();
        c.broker.system_passcode = "system-secret".into();
        c.amqp.url = "amqp://gw:amqp-secret@rabbit:5672/%2f?heartbeat=10".into();
        c.api.token = "api-secret-token".into();
        c.auth.jwt_secret = "jwt-secret-value".into();
        let text = c.masked().to_toml();
        for secret in [
            "client-secret",
            "system-secret",
            "amqp-secret",
            "api-secret-token",
            "jwt-secret-value",
        ] {
            assert!(!text.contains(secret), "{secret} in {text}");
        }
        assert!(text.contains(r#"client_passcode = "******""#), "{text}");
        assert!(
            text.contains(r#"url = "amqp://gw:******@rabbit:5672/%2f?heartbeat=10""#),
            "{text}"
        );
        assert!(text.contains(r#"token = "******""#), "{text}");
        assert!(text.contains(r#"jwt_secret = "******""#), "{text}");
        assert!(text.contains("[broker]"), "{text}");
        // Unset secrets stay visibly unset.
        let text = Config::default().masked().to_toml();
        assert!(text.contains(r#"token = """#), "{text}");
        assert!(text.contains(r#"jwt_secret = """#), "{text}");
        // The printed document loads back as a config file.
        let f = TempFile::new("round-trip", &c.to_toml());
        let back = load_from(Some(&f.0), HashMap::new()).expect("printed config loads");
        assert_eq!(back.broker.client_passcode, "client-secret");
        assert_eq!(back.amqp.url, c.amqp.url);
        assert_eq!(back.api.token, "api-secret-token");
        assert_eq!(back.server.endpoints, c.server.endpoints);
    }

    #[test]
    fn url_password_masking() {
        let m = mask_url_password;
        assert_eq!(
            m("amqp://guest:guest@127.0.0.1:5672/%2f"),
            "amqp://guest:******@127.0.0.1:5672/%2f"
        );
        assert_eq!(m("amqps://u:p%40ss@h/v"), "amqps://u:******@h/v");
        assert_eq!(m("amqp://u:p@ss@h"), "amqp://u:******@h");
        assert_eq!(m("amqp://user@h/v"), "amqp://user@h/v");
        assert_eq!(m("amqp://h:5672/v"), "amqp://h:5672/v");
        assert_eq!(m("amqp://h/v?x=a:b@c"), "amqp://h/v?x=a:b@c");
        assert_eq!(m("not a url"), "not a url");
    }

    /// The chat example of docs/configuration.md.
    const CHAT_TOPOLOGY: &str = r#"
[amqp]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
pool_size = 2

[app]
exchange = "chat.app"
exchange_type = "direct"

[api]
token = "s3cret"

[[topology.exchanges]]
name = "adme.exchange"
type = "topic"

[[topology.exchanges]]
name = "dlx"
type = "fanout"
arguments = { "alternate-exchange" = "amq.fanout" }

[[topology.exchanges]]
name = "alerts"
type = "headers"
durable = false
auto_delete = true

[[topology.queues]]
name = "adme.queue"
arguments = { "x-message-ttl" = 60000, "x-queue-type" = "quorum", "x-dead-letter-exchange" = "dlx", "x-max-length" = 1000 }

[[topology.queues]]
name = "dead.letters"
arguments = { "x-max-priority" = 10, "x-custom.dotted" = 1.5, "x-flag" = true }

[[topology.bindings]]
exchange = "adme.exchange"
queue = "adme.queue"
routing_key = "room.*"

[[topology.bindings]]
exchange = "dlx"
queue = "dead.letters"

[[topology.bindings]]
exchange = "adme.exchange"
destination_exchange = "alerts"
routing_key = "alert.#"

[[topology.bindings]]
exchange = "alerts"
queue = "dead.letters"
arguments = { "x-match" = "any", "Severity" = "high" }
"#;

    #[test]
    fn topology_loads_from_the_file() {
        let f = TempFile::new("topology", CHAT_TOPOLOGY);
        let c = load_from(Some(&f.0), HashMap::new()).expect("topology loads");
        c.validate().expect("topology validates");
        let t = &c.topology;
        assert_eq!(t.exchanges.len(), 3);
        assert_eq!(t.exchanges[0].name, "adme.exchange");
        assert_eq!(t.exchanges[0].kind, ExchangeType::Topic);
        assert!(t.exchanges[0].durable && !t.exchanges[0].auto_delete && !t.exchanges[0].internal);
        assert_eq!(t.exchanges[1].kind, ExchangeType::Fanout);
        assert_eq!(
            t.exchanges[1].arguments.get("alternate-exchange"),
            Some(&ArgValue::String("amq.fanout".into()))
        );
        assert_eq!(t.exchanges[2].kind, ExchangeType::Headers);
        assert!(!t.exchanges[2].durable && t.exchanges[2].auto_delete);
        let q = &t.queues[0];
        assert!(q.durable && !q.exclusive && !q.auto_delete);
        assert_eq!(
            q.arguments.get("x-message-ttl"),
            Some(&ArgValue::Int(60_000))
        );
        assert_eq!(
            q.arguments.get("x-queue-type"),
            Some(&ArgValue::String("quorum".into()))
        );
        assert_eq!(q.arguments.get("x-max-length"), Some(&ArgValue::Int(1000)));
        let q = &t.queues[1];
        assert_eq!(
            q.arguments.get("x-custom.dotted"),
            Some(&ArgValue::Float(1.5))
        );
        assert_eq!(q.arguments.get("x-flag"), Some(&ArgValue::Bool(true)));
        assert_eq!(t.bindings.len(), 4);
        assert_eq!(t.bindings[0].routing_key, "room.*");
        assert_eq!(t.bindings[1].routing_key, "");
        assert_eq!(t.bindings[2].destination_exchange, "alerts");
        assert!(t.bindings[2].queue.is_empty());
        assert_eq!(
            t.bindings[3].arguments.get("Severity"),
            Some(&ArgValue::String("high".into())),
            "argument keys keep their case"
        );
        assert_eq!(c.app.exchange_type, ExchangeType::Direct);
        assert_eq!(c.amqp.pool_size, 2);

        // Printed and loaded back: the same topology.
        let f2 = TempFile::new("topology-round-trip", &c.masked().to_toml());
        let back = load_from(Some(&f2.0), HashMap::new()).expect("printed topology loads");
        assert_eq!(back.topology.exchanges, t.exchanges);
        assert_eq!(back.topology.queues, t.queues);
        assert_eq!(back.topology.bindings, t.bindings);
    }

    #[test]
    fn topology_unknown_keys_enums_and_env() {
        let f = TempFile::new(
            "topology-typo",
            "[[topology.queues]]\nname = \"q\"\nduarble = true\n",
        );
        let e = load_err(Some(&f.0), &[]);
        assert_eq!(e.key(), Some("topology.queues[0].duarble"), "{e}");

        let f = TempFile::new(
            "topology-typo2",
            "[[topology.bindings]]\nexchange = \"amq.topic\"\nqueue = \"q\"\nrouting = \"x\"\n",
        );
        let e = load_err(Some(&f.0), &[]);
        assert_eq!(e.key(), Some("topology.bindings[0].routing"), "{e}");

        let f = TempFile::new(
            "topology-type",
            "[[topology.exchanges]]\nname = \"a\"\n[[topology.exchanges]]\nname = \"b\"\ntype = \"x-delayed\"\n",
        );
        let e = load_err(Some(&f.0), &[]);
        assert_eq!(e.key(), Some("topology.exchanges[1].type"), "{e}");
        assert!(
            e.to_string()
                .contains("expected one of: topic, direct, fanout, headers"),
            "{e}"
        );

        let f = TempFile::new("auth-alg", "[auth]\njwt_algorithm = \"none\"\n");
        let e = load_err(Some(&f.0), &[]);
        assert_eq!(e.key(), Some("auth.jwt_algorithm"), "{e}");
        assert!(e.to_string().contains("HS256, HS384"), "{e}");

        let e = load_err(None, &[("GATEWAY__APP__EXCHANGE_TYPE", "bogus")]);
        assert_eq!(e.key(), Some("app.exchange_type"), "{e}");

        let e = load_err(None, &[("GATEWAY__TOPOLOGY__QUEUES", "a,b")]);
        assert_eq!(e.key(), Some("topology.queues"), "{e}");
        assert!(
            e.to_string().contains("only be set in the config file"),
            "{e}"
        );

        // New keys from the environment.
        let c = load_from(
            None,
            env(&[
                ("GATEWAY__AMQP__URL", "amqp://u:p@rabbit:5672/%2f"),
                ("GATEWAY__AMQP__POOL_SIZE", "8"),
                ("GATEWAY__API__TOKEN", "0123"),
                ("GATEWAY__USER__CLIENT_SEND_ENABLED", "true"),
                ("GATEWAY__AUTH__MODE", "jwt"),
                ("GATEWAY__AUTH__JWT_ALGORITHM", "HS512"),
                ("GATEWAY__AUTH__JWT_SECRET", "k"),
            ]),
        )
        .expect("env loads");
        assert_eq!(c.amqp.url, "amqp://u:p@rabbit:5672/%2f");
        assert_eq!(c.amqp.pool_size, 8);
        assert_eq!(c.api.token, "0123");
        assert!(c.user.client_send_enabled);
        assert_eq!(c.auth.mode, AuthMode::Jwt);
        assert_eq!(c.auth.jwt_algorithm, JwtAlgorithm::Hs512);
        c.validate().expect("env config validates");
    }

    fn queue(name: &str, args: &[(&str, ArgValue)]) -> QueueDecl {
        QueueDecl {
            name: name.into(),
            arguments: args
                .iter()
                .map(|(k, v)| ((*k).to_owned(), v.clone()))
                .collect(),
            ..QueueDecl::default()
        }
    }

    fn exchange(name: &str) -> ExchangeDecl {
        ExchangeDecl {
            name: name.into(),
            ..ExchangeDecl::default()
        }
    }

    fn binding(exchange: &str, queue: &str) -> BindingDecl {
        BindingDecl {
            exchange: exchange.into(),
            queue: queue.into(),
            ..BindingDecl::default()
        }
    }

    /// A valid topology the cases below break.
    fn with_topology(c: &mut Config) {
        c.topology = TopologyConfig {
            exchanges: vec![exchange("adme.exchange")],
            queues: vec![queue("adme.queue", &[])],
            bindings: vec![binding("adme.exchange", "adme.queue")],
        };
    }

    #[test]
    fn control_plane_validation_rules_name_the_key() {
        use ArgValue::{Float, Int, String as Str};
        let pem = TempFile::new("not-pem", "just text\n");
        let not_pem = pem.0.display().to_string();
        let cases: Vec<(&str, &str, Mutation)> = vec![
            (
                "amqp.url",
                "amqp:// or amqps://",
                Box::new(|c| c.amqp.url = "http://rabbit".into()),
            ),
            (
                "amqp.url",
                "not a valid AMQP URL",
                Box::new(|c| c.amqp.url = "amqp://h:notaport/".into()),
            ),
            (
                "amqp.pool_size",
                "greater than 0",
                Box::new(|c| c.amqp.pool_size = 0),
            ),
            (
                "amqp.connect_timeout_ms",
                "greater than 0",
                Box::new(|c| c.amqp.connect_timeout_ms = 0),
            ),
            (
                "amqp.reconnect_initial_ms",
                "greater than 0",
                Box::new(|c| c.amqp.reconnect_initial_ms = 0),
            ),
            (
                "amqp.reconnect_initial_ms",
                "greater than amqp.reconnect_max_ms",
                Box::new(|c| c.amqp.reconnect_max_ms = 10),
            ),
            (
                "amqp.max_inflight_publishes",
                "greater than 0",
                Box::new(|c| c.amqp.max_inflight_publishes = 0),
            ),
            (
                "amqp.publish_timeout_ms",
                "greater than 0",
                Box::new(|c| c.amqp.publish_timeout_ms = 0),
            ),
            (
                "app.exchange",
                "must not be empty",
                Box::new(|c| c.app.exchange.clear()),
            ),
            (
                "app.exchange",
                "reserved",
                Box::new(|c| c.app.exchange = "amq.gateway".into()),
            ),
            (
                "user.exchange",
                "longer than 255",
                Box::new(|c| c.user.exchange = "u".repeat(256)),
            ),
            (
                "user.exchange",
                "also app.exchange",
                Box::new(|c| c.user.exchange = c.app.exchange.clone()),
            ),
            (
                "app.max_inflight_per_session",
                "greater than 0",
                Box::new(|c| c.app.max_inflight_per_session = 0),
            ),
            (
                "api.max_body_bytes",
                "greater than 0",
                Box::new(|c| c.api.max_body_bytes = 0),
            ),
            (
                "api.token",
                "visible ASCII",
                Box::new(|c| c.api.token = "two words".into()),
            ),
            (
                "auth.jwt_secret",
                "must be set",
                Box::new(|c| c.auth.mode = AuthMode::Jwt),
            ),
            (
                "auth.jwt_public_key_file",
                "must be set",
                Box::new(|c| {
                    c.auth.mode = AuthMode::Jwt;
                    c.auth.jwt_algorithm = JwtAlgorithm::Rs256;
                    c.auth.jwt_secret = "unused".into();
                }),
            ),
            (
                "auth.jwt_public_key_file",
                "cannot read",
                Box::new(|c| {
                    c.auth.mode = AuthMode::Jwt;
                    c.auth.jwt_algorithm = JwtAlgorithm::Es256;
                    c.auth.jwt_public_key_file = "/nonexistent/key.pem".into();
                }),
            ),
            (
                "auth.jwt_public_key_file",
                "not a PEM file",
                Box::new(move |c| {
                    c.auth.mode = AuthMode::Jwt;
                    c.auth.jwt_algorithm = JwtAlgorithm::Rs512;
                    c.auth.jwt_public_key_file = not_pem;
                }),
            ),
            (
                "auth.user_claim",
                "must not be empty",
                Box::new(|c| c.auth.user_claim.clear()),
            ),
            (
                "auth.token_header",
                "not a STOMP header name",
                Box::new(|c| c.auth.token_header = "a:b".into()),
            ),
            (
                "topology.exchanges[0].name",
                "must not be empty",
                Box::new(|c| {
                    with_topology(c);
                    c.topology.exchanges[0].name.clear();
                }),
            ),
            (
                "topology.exchanges[1].name",
                "more than once",
                Box::new(|c| {
                    with_topology(c);
                    c.topology.exchanges.push(exchange("adme.exchange"));
                }),
            ),
            (
                "topology.exchanges[0].name",
                "reserved",
                Box::new(|c| {
                    with_topology(c);
                    c.topology.exchanges[0].name = "amq.custom".into();
                }),
            ),
            (
                "topology.exchanges[1]",
                "declare it the same way",
                Box::new(|c| {
                    with_topology(c);
                    let mut x = exchange(&c.user.exchange);
                    x.kind = ExchangeType::Topic;
                    c.topology.exchanges.push(x);
                }),
            ),
            (
                "topology.queues[0].name",
                "longer than 255",
                Box::new(|c| {
                    with_topology(c);
                    c.topology.queues[0].name = "q".repeat(256);
                }),
            ),
            (
                "topology.queues[1].name",
                "more than once",
                Box::new(|c| {
                    with_topology(c);
                    c.topology.queues.push(queue("adme.queue", &[]));
                }),
            ),
            (
                "topology.queues[0].arguments.x-message-ttl",
                "non-negative",
                Box::new(|c| {
                    with_topology(c);
                    c.topology.queues[0] = queue("adme.queue", &[("x-message-ttl", Int(-1))]);
                }),
            ),
            (
                "topology.queues[0].arguments.x-max-length",
                "must be an integer",
                Box::new(|c| {
                    with_topology(c);
                    c.topology.queues[0] =
                        queue("adme.queue", &[("x-max-length", Str("10".into()))]);
                }),
            ),
            (
                "topology.queues[0].arguments.x-max-length-bytes",
                "must be an integer",
                Box::new(|c| {
                    with_topology(c);
                    c.topology.queues[0] =
                        queue("adme.queue", &[("x-max-length-bytes", Float(1.0))]);
                }),
            ),
            (
                "topology.queues[0].arguments.x-expires",
                "at least 1",
                Box::new(|c| {
                    with_topology(c);
                    c.topology.queues[0] = queue("adme.queue", &[("x-expires", Int(0))]);
                }),
            ),
            (
                "topology.queues[0].arguments.x-max-priority",
                "between 0 and 255",
                Box::new(|c| {
                    with_topology(c);
                    c.topology.queues[0] = queue("adme.queue", &[("x-max-priority", Int(256))]);
                }),
            ),
            (
                "topology.queues[0].arguments.x-dead-letter-exchange",
                "must be a string",
                Box::new(|c| {
                    with_topology(c);
                    c.topology.queues[0] =
                        queue("adme.queue", &[("x-dead-letter-exchange", Int(1))]);
                }),
            ),
            (
                "topology.queues[0].arguments.x-dead-letter-routing-key",
                "must be a string",
                Box::new(|c| {
                    with_topology(c);
                    c.topology.queues[0] = queue(
                        "adme.queue",
                        &[("x-dead-letter-routing-key", ArgValue::Bool(true))],
                    );
                }),
            ),
            (
                "topology.queues[0].arguments.x-queue-type",
                "classic, quorum, stream",
                Box::new(|c| {
                    with_topology(c);
                    c.topology.queues[0] =
                        queue("adme.queue", &[("x-queue-type", Str("lazy".into()))]);
                }),
            ),
            (
                "topology.queues[0].arguments.x-overflow",
                "reject-publish",
                Box::new(|c| {
                    with_topology(c);
                    c.topology.queues[0] =
                        queue("adme.queue", &[("x-overflow", Str("drop".into()))]);
                }),
            ),
            (
                "topology.queues[0].arguments.x-queue-mode",
                "must be a string",
                Box::new(|c| {
                    with_topology(c);
                    c.topology.queues[0] = queue("adme.queue", &[("x-queue-mode", Int(1))]);
                }),
            ),
            (
                "topology.queues[0].durable",
                "quorum queues must be durable",
                Box::new(|c| {
                    with_topology(c);
                    c.topology.queues[0] =
                        queue("adme.queue", &[("x-queue-type", Str("quorum".into()))]);
                    c.topology.queues[0].durable = false;
                }),
            ),
            (
                "topology.queues[0].exclusive",
                "cannot be exclusive",
                Box::new(|c| {
                    with_topology(c);
                    c.topology.queues[0] =
                        queue("adme.queue", &[("x-queue-type", Str("quorum".into()))]);
                    c.topology.queues[0].exclusive = true;
                }),
            ),
            (
                "topology.queues[0].auto_delete",
                "cannot be auto_delete",
                Box::new(|c| {
                    with_topology(c);
                    c.topology.queues[0] =
                        queue("adme.queue", &[("x-queue-type", Str("stream".into()))]);
                    c.topology.queues[0].auto_delete = true;
                }),
            ),
            (
                "topology.bindings[0].exchange",
                "must not be empty",
                Box::new(|c| {
                    with_topology(c);
                    c.topology.bindings[0].exchange.clear();
                }),
            ),
            (
                "topology.bindings[0].exchange",
                "is not declared in topology.exchanges",
                Box::new(|c| {
                    with_topology(c);
                    c.topology.bindings[0].exchange = "nope".into();
                }),
            ),
            (
                "topology.bindings[0]",
                "exactly one of queue and destination_exchange",
                Box::new(|c| {
                    with_topology(c);
                    c.topology.bindings[0].destination_exchange = "amq.fanout".into();
                }),
            ),
            (
                "topology.bindings[0]",
                "exactly one of queue and destination_exchange",
                Box::new(|c| {
                    with_topology(c);
                    c.topology.bindings[0].queue.clear();
                }),
            ),
            (
                "topology.bindings[0].queue",
                r#""x" is not declared in topology.queues"#,
                Box::new(|c| {
                    with_topology(c);
                    c.topology.bindings[0].queue = "x".into();
                }),
            ),
            (
                "topology.bindings[0].destination_exchange",
                "is not declared",
                Box::new(|c| {
                    with_topology(c);
                    c.topology.bindings[0].queue.clear();
                    c.topology.bindings[0].destination_exchange = "nope".into();
                }),
            ),
            (
                "topology.bindings[0].routing_key",
                "longer than 255",
                Box::new(|c| {
                    with_topology(c);
                    c.topology.bindings[0].routing_key = "k".repeat(256);
                }),
            ),
            (
                "topology.bindings[0].arguments.x-match",
                "all, any",
                Box::new(|c| {
                    with_topology(c);
                    c.topology.bindings[0]
                        .arguments
                        .insert("x-match".into(), Str("some".into()));
                }),
            ),
        ];
        for (key, reason, mutate) in cases {
            let mut c = Config::default();
            mutate(&mut c);
            let e = c.validate().expect_err(key);
            assert_eq!(e.key(), Some(key), "{e}");
            assert!(e.to_string().contains(reason), "{key}: {e}");
        }
    }

    #[test]
    fn control_plane_accepted_values() {
        let key = TempFile::new(
            "pub-key",
            "-----BEGIN PUBLIC KEY-----\nMFkw\n-----END PUBLIC KEY-----\n",
        );
        let mut c = Config::default();
        with_topology(&mut c);
        c.amqp.url = "amqps://u:p@rabbit.example:5671/prod".into();
        c.amqp.reconnect_initial_ms = 30_000;
        // Built-in, app and user exchanges need no declaration.
        for (i, source) in [
            "amq.topic",
            "amq.direct",
            "amq.fanout",
            "amq.headers",
            "amq.match",
        ]
        .into_iter()
        .enumerate()
        {
            let mut b = binding(source, "adme.queue");
            b.routing_key = format!("k{i}");
            c.topology.bindings.push(b);
        }
        c.topology.bindings.push(binding("stomp.app", "adme.queue"));
        c.topology.bindings.push(BindingDecl {
            exchange: "adme.exchange".into(),
            destination_exchange: "stomp.user".into(),
            ..BindingDecl::default()
        });
        // The app exchange may be declared in the topology when it agrees.
        c.topology.exchanges.push(exchange("stomp.app"));
        c.topology.queues.push(queue(
            "q2",
            &[
                ("x-message-ttl", ArgValue::Int(0)),
                ("x-queue-type", ArgValue::String("quorum".into())),
                ("x-overflow", ArgValue::String("reject-publish".into())),
                ("x-custom", ArgValue::Float(0.5)),
            ],
        ));
        c.auth.mode = AuthMode::Jwt;
        c.auth.jwt_algorithm = JwtAlgorithm::Es384;
        c.auth.jwt_public_key_file = key.0.display().to_string();
        c.api.token = "abc.DEF-123_~".into();
        c.validate().expect("accepted");
        assert!(c.is_implicit_exchange("amq.match"));
        assert!(c.is_implicit_exchange("stomp.user"));
        assert!(!c.is_implicit_exchange("adme.exchange"));
    }

    #[test]
    fn env_var_names() {
        assert_eq!(env_var_for("server.listen"), "GATEWAY__SERVER__LISTEN");
        assert_eq!(
            env_var_for("broker.client_passcode"),
            "GATEWAY__BROKER__CLIENT_PASSCODE"
        );
        assert_eq!(
            env_var_to_key("GATEWAY__BROKER__CLIENT_PASSCODE"),
            "broker.client_passcode"
        );
        assert!(!is_gateway_var("GATEWAY_CONFIG"));
        assert!(!is_gateway_var("GATEWAY__"));
    }

    #[test]
    fn server_identity_and_drain_keys() {
        let c = Config::default();
        assert_eq!(c.server.pod_id, "");
        assert_eq!(c.server.drain_period_ms, 20_000);
        let id = c.pod_id();
        assert!(!id.is_empty() && id.len() <= MAX_POD_ID_BYTES, "{id:?}");

        let mut c = Config::default();
        c.server.pod_id = "  gw-7  ".into();
        assert_eq!(c.pod_id(), "gw-7");
        c.server.drain_period_ms = 0;
        c.validate().expect("drain 0 is valid");
        c.server.drain_period_ms = MAX_DRAIN_PERIOD_MS;
        c.validate().expect("drain 600000 is valid");

        let cases: Vec<(&str, &str, Mutation)> = vec![
            (
                "server.pod_id",
                "longer than 100",
                Box::new(|c| c.server.pod_id = "p".repeat(101)),
            ),
            (
                "server.pod_id",
                "control characters",
                Box::new(|c| c.server.pod_id = "a\tb".into()),
            ),
            (
                "server.drain_period_ms",
                "maximum of 600000",
                Box::new(|c| c.server.drain_period_ms = 600_001),
            ),
        ];
        for (key, reason, mutate) in cases {
            let mut c = Config::default();
            mutate(&mut c);
            let e = c.validate().expect_err(key);
            assert_eq!(e.key(), Some(key), "{e}");
            assert!(e.to_string().contains(reason), "{key}: {e}");
        }

        let c = load_from(
            None,
            env(&[
                ("GATEWAY__SERVER__POD_ID", "gw-env"),
                ("GATEWAY__SERVER__DRAIN_PERIOD_MS", "1500"),
            ]),
        )
        .expect("env loads");
        assert_eq!(c.pod_id(), "gw-env");
        assert_eq!(c.server.drain_period_ms, 1500);
    }

    #[test]
    fn tls_and_failover_keys() {
        let pki = crate::broker::tests::test_pki(&["localhost", "127.0.0.1"]);
        let ca = TempFile::new("tls-ca", &pki.ca_pem);
        let cert = TempFile::new("tls-cert", &pki.cert_pem);
        let key = TempFile::new("tls-key", &pki.key_pem);
        let text = TempFile::new("tls-text", "no pem here\n");
        let ca_path = ca.0.display().to_string();
        let cert_path = cert.0.display().to_string();
        let key_path = key.0.display().to_string();
        let text_path = text.0.display().to_string();

        // Defaults: TLS off, no failover URLs.
        let c = Config::default();
        assert!(!c.broker.tls.enabled);
        assert_eq!(c.broker.tls, TlsConfig::default());
        assert!(c.amqp.failover_urls.is_empty());
        assert_eq!(c.amqp.tls, AmqpTlsConfig::default());
        assert_eq!(
            c.amqp.urls().collect::<Vec<_>>(),
            vec!["amqp://guest:guest@127.0.0.1:5672/%2f"]
        );

        // From a file.
        let file = TempFile::new(
            "tls-file",
            &format!(
                r#"
[broker]
addresses = ["rabbit:61614"]

[broker.tls]
enabled = true
ca_file = {ca:?}
cert_file = {cert:?}
key_file = {key:?}
server_name = "rabbit.internal"

[amqp]
url = "amqps://gw:secret1@rabbit-0:5671/%2f"
failover_urls = ["amqps://gw:secret2@rabbit-1:5671/%2f", "amqp://gw:secret3@rabbit-2:5672/%2f"]

[amqp.tls]
ca_file = {ca:?}
"#,
                ca = ca_path,
                cert = cert_path,
                key = key_path
            ),
        );
        let c = load_from(Some(&file.0), HashMap::new()).expect("tls file loads");
        c.validate().expect("tls file validates");
        assert!(c.broker.tls.enabled);
        assert_eq!(c.broker.tls.server_name, "rabbit.internal");
        assert_eq!(c.amqp.failover_urls.len(), 2);
        assert_eq!(c.amqp.urls().count(), 3);
        assert_eq!(c.amqp.tls.ca_file, ca_path);
        // Masked output hides every password and loads back.
        let text_out = c.masked().to_toml();
        for secret in ["secret1", "secret2", "secret3"] {
            assert!(!text_out.contains(secret), "{secret} in {text_out}");
        }
        assert!(
            text_out.contains("amqps://gw:******@rabbit-1:5671/%2f"),
            "{text_out}"
        );
        assert!(text_out.contains("[broker.tls]"), "{text_out}");
        let back = TempFile::new("tls-round-trip", &c.to_toml());
        let back = load_from(Some(&back.0), HashMap::new()).expect("printed config loads");
        assert_eq!(back.broker.tls, c.broker.tls);
        assert_eq!(back.amqp.failover_urls, c.amqp.failover_urls);
        assert_eq!(back.amqp.tls, c.amqp.tls);

        // From the environment.
        let c = load_from(
            None,
            env(&[
                ("GATEWAY__BROKER__TLS__ENABLED", "true"),
                ("GATEWAY__BROKER__TLS__CA_FILE", ca_path.as_str()),
                ("GATEWAY__BROKER__TLS__SERVER_NAME", "localhost"),
                (
                    "GATEWAY__AMQP__FAILOVER_URLS",
                    "amqp://u:p@a:5672/%2f, amqps://u:p@b:5671/%2f",
                ),
                ("GATEWAY__AMQP__TLS__CA_FILE", ca_path.as_str()),
                ("GATEWAY__AMQP__TLS__CERT_FILE", cert_path.as_str()),
                ("GATEWAY__AMQP__TLS__KEY_FILE", key_path.as_str()),
            ]),
        )
        .expect("env loads");
        assert!(c.broker.tls.enabled);
        assert_eq!(c.broker.tls.ca_file, ca_path);
        assert_eq!(c.broker.tls.server_name, "localhost");
        assert_eq!(
            c.amqp.failover_urls,
            vec!["amqp://u:p@a:5672/%2f", "amqps://u:p@b:5671/%2f"]
        );
        assert_eq!(c.amqp.tls.key_file, key_path);
        c.validate().expect("env tls validates");

        // Typos in the nested tables are unknown keys.
        let f = TempFile::new("tls-typo", "[broker.tls]\ncafile = \"x\"\n");
        let e = load_err(Some(&f.0), &[]);
        assert_eq!(e.key(), Some("broker.tls.cafile"), "{e}");
        let e = load_err(None, &[("GATEWAY__AMQP__TLS__CA", "x")]);
        assert_eq!(e.key(), Some("amqp.tls.ca"), "{e}");
        let e = load_err(None, &[("GATEWAY__BROKER__TLS__ENABLED", "maybe")]);
        assert_eq!(e.key(), Some("broker.tls.enabled"), "{e}");

        // Disabled TLS does not look at the files.
        let mut c = Config::default();
        c.broker.tls.ca_file = "/nonexistent/ca.pem".into();
        c.validate().expect("disabled TLS ignores its files");

        let (ca2, cert2, key2, text2) = (
            ca_path.clone(),
            cert_path.clone(),
            key_path.clone(),
            text_path.clone(),
        );
        let cases: Vec<(&str, &str, Mutation)> = vec![
            (
                "broker.tls.ca_file",
                "must be set when broker.tls.enabled = true",
                Box::new(|c| c.broker.tls.enabled = true),
            ),
            (
                "broker.tls.ca_file",
                "cannot read",
                Box::new(|c| {
                    c.broker.tls.enabled = true;
                    c.broker.tls.ca_file = "/nonexistent/ca.pem".into();
                }),
            ),
            (
                "broker.tls.ca_file",
                "not a PEM file",
                Box::new(move |c| {
                    c.broker.tls.enabled = true;
                    c.broker.tls.ca_file = text2;
                }),
            ),
            (
                "broker.tls.key_file",
                "must be set when broker.tls.cert_file is set",
                Box::new(move |c| {
                    c.broker.tls.enabled = true;
                    c.broker.tls.ca_file = ca2;
                    c.broker.tls.cert_file = cert2;
                }),
            ),
            (
                "broker.tls.cert_file",
                "contains no certificate",
                Box::new(move |c| {
                    c.broker.tls.enabled = true;
                    c.broker.tls.ca_file = ca_path.clone();
                    c.broker.tls.cert_file = key2.clone();
                    c.broker.tls.key_file = key2;
                }),
            ),
            (
                "broker.tls.server_name",
                "not a DNS name or IP address",
                Box::new({
                    let ca = ca.0.display().to_string();
                    move |c| {
                        c.broker.tls.enabled = true;
                        c.broker.tls.ca_file = ca;
                        c.broker.tls.server_name = "bad name".into();
                    }
                }),
            ),
            (
                "amqp.failover_urls[1]",
                "must start with amqp:// or amqps://",
                Box::new(|c| {
                    c.amqp.failover_urls = vec![
                        "amqp://u:p@a:5672/%2f".into(),
                        "http://u:secret@b:5672/".into(),
                    ]
                }),
            ),
            (
                "amqp.failover_urls[0]",
                "not a valid AMQP URL",
                Box::new(|c| c.amqp.failover_urls = vec!["amqp://h:notaport/".into()]),
            ),
            (
                "amqp.tls.ca_file",
                "not a PEM file",
                Box::new({
                    let text = text_path.clone();
                    move |c| c.amqp.tls.ca_file = text
                }),
            ),
            (
                "amqp.tls.key_file",
                "must be set when amqp.tls.cert_file is set",
                Box::new({
                    let cert = cert_path.clone();
                    move |c| c.amqp.tls.cert_file = cert
                }),
            ),
            (
                "amqp.tls.key_file",
                "contains no private key",
                Box::new({
                    let cert = cert_path.clone();
                    move |c| {
                        c.amqp.tls.cert_file = cert.clone();
                        c.amqp.tls.key_file = cert;
                    }
                }),
            ),
        ];
        for (key, reason, mutate) in cases {
            let mut c = Config::default();
            mutate(&mut c);
            let e = c.validate().expect_err(key);
            assert_eq!(e.key(), Some(key), "{e}");
            assert!(e.to_string().contains(reason), "{key}: {e}");
            assert!(!e.to_string().contains("secret"), "{key}: {e}");
        }
    }
}
