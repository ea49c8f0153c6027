//! The configuration's shape: one struct per section, every field with its
//! default. Unknown keys are rejected (`deny_unknown_fields`).

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// The whole configuration.
#[derive(Debug, Clone, Default, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub server: ServerConfig,
    pub session: SessionConfig,
    pub broker: BrokerConfig,
    pub hub: HubConfig,
    pub fanout: FanoutConfig,
    pub amqp: AmqpConfig,
    pub app: AppConfig,
    pub user: UserConfig,
    pub api: ApiConfig,
    pub auth: AuthConfig,
    pub log: LogConfig,
    pub topology: TopologyConfig,
    pub sockjs: SockJsConfig,
    pub demo: DemoConfig,
}

impl Config {
    /// Whether the AMQP control plane runs: always in relay mode; in
    /// embedded mode only when `amqp.url` was set explicitly (then `/app`
    /// SENDs and the publish API go over it).
    pub fn control_plane_enabled(&self) -> bool {
        self.broker.mode == BrokerMode::Relay || self.amqp.url_set
    }
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
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Endpoint {
    /// Request path, for example `/ws`.
    pub path: String,
    /// Serve SockJS under this path (Spring's `.withSockJS()`) instead of a
    /// plain WebSocket at it.
    #[serde(default)]
    pub sockjs: bool,
}

/// `[sockjs]`: the SockJS endpoints' settings (Spring's names and defaults).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SockJsConfig {
    /// Heart-beat frame after this long without other frames (ms).
    pub heartbeat_time_ms: u64,
    /// A session with no receiving request for this long is closed (ms).
    pub disconnect_delay_ms: u64,
    /// Bytes of frames after which a streaming response ends (the client
    /// opens a new one).
    pub stream_bytes_limit: usize,
    /// Set a `JSESSIONID` cookie on the HTTP transports.
    pub session_cookie_needed: bool,
    /// Offer the websocket transport.
    pub websocket_enabled: bool,
    /// The sockjs-client script `iframe.html` loads.
    pub client_library_url: String,
    /// Mount the SockJS protocol's test services (`/echo`, `/close`,
    /// `/disabled_websocket_echo`, `/cookie_needed_echo`).
    pub test_services: bool,
}

impl Default for SockJsConfig {
    fn default() -> Self {
        SockJsConfig {
            heartbeat_time_ms: 25_000,
            disconnect_delay_ms: 5_000,
            stream_bytes_limit: 128 * 1024,
            session_cookie_needed: false,
            websocket_enabled: true,
            client_library_url: "/assets/sockjs.min.js".into(),
            test_services: false,
        }
    }
}

/// `[demo]`: the demo chat page at `/` on the client listener.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct DemoConfig {
    /// Serve the demo page at `/` (and its scripts under `/assets/`).
    pub enabled: bool,
    /// The destination a room is, `{room}` standing for its name.
    pub room_destination: String,
    /// Where the page SENDs messages (an application destination such as
    /// `/app/chat.sendMessage`); empty: straight to the room.
    pub send_destination: String,
}

impl Default for DemoConfig {
    fn default() -> Self {
        DemoConfig {
            enabled: true,
            room_destination: "/topic/chat.{room}".into(),
            send_destination: String::new(),
        }
    }
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
    /// A connection must complete its HTTP upgrade request within this time
    /// (ms), or it gets 408 and is closed (slowloris).
    pub handshake_timeout_ms: u64,
    /// Concurrent connections from one client IP, counted from accept
    /// (0 = unlimited).
    pub max_connections_per_ip: usize,
    /// New connections per second from one client IP (token bucket, bursts of
    /// the same size; 0 = unlimited).
    pub max_new_connections_per_ip_per_sec: u32,
    /// Peers whose `X-Forwarded-For` is believed: the client IP is then the
    /// right-most address not in this list. Exact IP addresses.
    pub trusted_proxies: Vec<String>,
    /// Listen backlog of the client listener (the kernel caps it at
    /// `net.core.somaxconn`).
    pub listen_backlog: u32,
}

impl Default for ServerConfig {
    fn default() -> Self {
        ServerConfig {
            listen: "0.0.0.0:8080".into(),
            admin_listen: "0.0.0.0:9090".into(),
            endpoints: vec![Endpoint {
                path: "/ws".into(),
                sockjs: false,
            }],
            allowed_origins: vec!["*".into()],
            max_connections: 10_000,
            message_type: MessageType::Auto,
            max_ws_message_size: 256 * 1024,
            pod_id: String::new(),
            drain_period_ms: 20_000,
            handshake_timeout_ms: 5_000,
            max_connections_per_ip: 1_000,
            max_new_connections_per_ip_per_sec: 200,
            trusted_proxies: Vec::new(),
            listen_backlog: 4_096,
        }
    }
}

/// `[session]`: per client session limits and client-leg heart-beats.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SessionConfig {
    /// A fixed interval at which the gateway offers to send heart-beats to
    /// the client (ms); 0 (the default) mirrors the client's wish, as
    /// RabbitMQ does.
    pub heartbeat_send_ms: u64,
    /// A fixed interval at which the gateway wants heart-beats from the
    /// client (ms); 0 (the default) mirrors what the client offers.
    pub heartbeat_receive_ms: u64,
    /// Lower bound of every non-zero client heart-beat interval (ms).
    pub heartbeat_min_ms: u64,
    /// A frame the client started must be complete within this time (ms).
    pub frame_timeout_ms: u64,
    /// Open transactions per session.
    pub max_transactions: usize,
    /// Bytes of SENDs inside one open transaction (RabbitMQ holds them in
    /// memory until COMMIT).
    pub max_transaction_bytes: usize,
    /// Sustained SENDs per second per session (0 = unlimited).
    pub max_sends_per_sec: u32,
    /// SENDs a session may make in a burst above the sustained rate.
    pub send_burst: u32,
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
            heartbeat_send_ms: 0,
            heartbeat_receive_ms: 0,
            heartbeat_min_ms: 1_000,
            frame_timeout_ms: 30_000,
            max_transactions: 8,
            max_transaction_bytes: 1024 * 1024,
            max_sends_per_sec: 50_000,
            send_burst: 50_000,
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

/// Which broker serves the clients' destinations (`broker.mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum BrokerMode {
    /// The gateway's own in-process broker: `/topic/` and `/queue/` between
    /// the sessions of this one process, no RabbitMQ (like Spring's simple
    /// broker). Single node.
    #[default]
    Embedded,
    /// RabbitMQ: relayed destinations go to its STOMP plugin, `/app` and
    /// `/user` over AMQP.
    Relay,
}

impl BrokerMode {
    pub fn as_str(self) -> &'static str {
        match self {
            BrokerMode::Embedded => "embedded",
            BrokerMode::Relay => "relay",
        }
    }
}

/// Which path serves a prefix's `ack:auto` subscriptions in relay mode.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum FanoutPath {
    /// The pod's shared upstream: one AMQP queue per pod, local fan-out.
    #[default]
    Shared,
    /// The session's own STOMP connection to RabbitMQ (one per browser).
    PerSession,
}

impl FanoutPath {
    pub fn is_shared(self) -> bool {
        self == FanoutPath::Shared
    }
}

/// What happens to shared subscriptions when the pod's upstream AMQP
/// connection is lost (`fanout.on_upstream_loss`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum UpstreamLoss {
    /// Keep the sessions; messages published until the upstream is back
    /// are lost for them (counted and logged).
    #[default]
    Keep,
    /// Close every session with a shared subscription (ERROR, then 1011),
    /// so clients reconnect and resubscribe.
    Close,
}

/// `[fanout]`: shared fan-out in relay mode: which subscriptions the pod's
/// one upstream queue serves instead of each session's own STOMP connection.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct FanoutConfig {
    /// `ack:auto` subscriptions to `/topic/…`.
    pub topic: FanoutPath,
    /// `ack:auto` subscriptions to `/exchange/<x>/<pattern>`.
    pub exchange: FanoutPath,
    /// `ack:auto` subscriptions to `/user/…`.
    pub user: FanoutPath,
    /// `keep` or `close`.
    pub on_upstream_loss: UpstreamLoss,
    /// How long a binding stays after its last subscriber left (ms), so
    /// churn does not hammer RabbitMQ.
    pub unbind_delay_ms: u64,
}

impl Default for FanoutConfig {
    fn default() -> Self {
        FanoutConfig {
            topic: FanoutPath::Shared,
            exchange: FanoutPath::Shared,
            user: FanoutPath::Shared,
            on_upstream_loss: UpstreamLoss::Keep,
            unbind_delay_ms: 2_000,
        }
    }
}

impl UpstreamLoss {
    pub fn as_str(self) -> &'static str {
        match self {
            UpstreamLoss::Keep => "keep",
            UpstreamLoss::Close => "close",
        }
    }
}

impl FanoutConfig {
    /// Whether any prefix is served by the shared path.
    pub fn any_shared(&self) -> bool {
        self.topic.is_shared() || self.exchange.is_shared() || self.user.is_shared()
    }
}

/// `[hub]`: the local fan-out hub (the embedded broker's sessions and the
/// shared path's): each session's queue of messages not yet written to its
/// client.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HubConfig {
    /// Bytes queued for one session before it is dropped as a slow consumer.
    pub max_queued_bytes: usize,
    /// How long a queued message may wait before its session is dropped as
    /// a slow consumer (ms).
    pub max_queued_ms: u64,
}

impl Default for HubConfig {
    fn default() -> Self {
        HubConfig {
            max_queued_bytes: 4 * 1024 * 1024,
            max_queued_ms: 30_000,
        }
    }
}

/// `[broker]`: the RabbitMQ STOMP plugin.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct BrokerConfig {
    /// `embedded` (the default: no RabbitMQ) or `relay` (RabbitMQ).
    pub mode: BrokerMode,
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
    /// Largest frame accepted from the broker (bytes); RabbitMQ's own
    /// `stomp.max_frame_size` default. A bigger message ends the session
    /// with an ERROR that says so.
    pub max_frame_size: usize,
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
            mode: BrokerMode::Embedded,
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
            max_frame_size: 4 * 1024 * 1024,
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
    /// Whether the configuration file or the environment set `url` (in
    /// embedded mode the control plane runs only then). Not a key.
    #[serde(skip)]
    pub url_set: bool,
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
            url_set: false,
            pool_size: 1,
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
    /// Clock-skew tolerance for the `exp` and `nbf` claims (seconds).
    pub jwt_leeway_secs: u64,
    /// Refuse tokens without an `exp` claim.
    pub jwt_require_exp: bool,
    /// What happens to a SEND/SUBSCRIBE no rule matches.
    pub default: super::AuthDefault,
    /// Authorization rules, first match wins (file only).
    pub rules: Vec<super::AuthRule>,
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
            jwt_leeway_secs: 60,
            jwt_require_exp: true,
            default: super::AuthDefault::Allow,
            rules: Vec::new(),
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
    pub(crate) fn type_name(&self) -> &'static str {
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
    /// How often the one-line stats summary is logged (ms, 0 = never), like
    /// Spring's `WebSocketMessageBrokerStats`.
    pub stats_interval_ms: u64,
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
            stats_interval_ms: 1_800_000,
        }
    }
}
