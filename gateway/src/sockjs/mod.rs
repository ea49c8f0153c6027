//! A SockJS server (protocol 0.3, what sockjs-client 1.x speaks), generic
//! over a session [`Handler`]: STOMP is one handler, the SockJS test
//! services ([`services`]) are others.
//!
//! - [`frame`]: the frames (`o`, `h`, `a[...]`, `c[...]`), JSON escaping,
//!   payload parsing.
//! - [`session`]: one session (bounded inbox and outbox, the handler's
//!   [`Conn`]) and the table of live sessions with its time-out.
//! - [`transport`]: the URL scheme and every transport: websocket (framed),
//!   raw `/websocket`, xhr-streaming, xhr-polling + xhr_send, eventsource,
//!   htmlfile, jsonp + jsonp_send; `/info`, the greeting, `iframe.html`,
//!   `OPTIONS`/CORS.
//!
//! A [`Service`] serves one endpoint prefix (for example `/portfolio`); the
//! client listener hands it every request under that prefix.

pub mod frame;
pub mod services;
pub mod session;
pub mod transport;

pub use session::Conn;
pub use transport::{Body, Service};

use prometheus::{IntCounterVec, Opts, Registry};
use std::net::SocketAddr;
use std::time::Duration;

/// The SockJS knobs, named as Spring names them (`heartbeatTime`,
/// `disconnectDelay`, `streamBytesLimit`, `sessionCookieNeeded`, ...).
#[derive(Debug, Clone)]
pub struct Settings {
    /// A heart-beat frame `h` goes out after this long without other frames.
    pub heartbeat: Duration,
    /// A session with no receiving request for this long is closed.
    pub disconnect_delay: Duration,
    /// A streaming response ends after this many bytes of frames (the
    /// client opens a new one), so browsers can free what they received.
    pub stream_bytes_limit: usize,
    /// Set `JSESSIONID` on HTTP transports (load balancers that stick on it).
    pub session_cookie_needed: bool,
    /// Offer the websocket transport (`/info` says so; off: 404).
    pub websocket_enabled: bool,
    /// The sockjs-client script `iframe.html` loads.
    pub client_library_url: String,
    /// Largest accepted client message body (`xhr_send`, WebSocket message).
    pub max_message_size: usize,
    /// Bytes a session buffers each way before the sender waits.
    pub session_buffer_bytes: usize,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            heartbeat: Duration::from_secs(25),
            disconnect_delay: Duration::from_secs(5),
            stream_bytes_limit: 128 * 1024,
            session_cookie_needed: false,
            websocket_enabled: true,
            client_library_url: "/sockjs-client.min.js".into(),
            max_message_size: 256 * 1024,
            session_buffer_bytes: 1024 * 1024,
        }
    }
}

/// The transport a session was opened on.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    WebSocket,
    RawWebSocket,
    XhrStreaming,
    XhrPolling,
    EventSource,
    HtmlFile,
    Jsonp,
}

impl Transport {
    /// The name sockjs-client uses (`xhr-streaming`, ...).
    pub fn name(self) -> &'static str {
        match self {
            Transport::WebSocket => "websocket",
            Transport::RawWebSocket => "websocket-raw",
            Transport::XhrStreaming => "xhr-streaming",
            Transport::XhrPolling => "xhr-polling",
            Transport::EventSource => "eventsource",
            Transport::HtmlFile => "htmlfile",
            Transport::Jsonp => "jsonp-polling",
        }
    }
}

/// About a session being opened.
#[derive(Debug, Clone)]
pub struct OpenInfo {
    pub peer: SocketAddr,
    pub transport: Transport,
    /// The SockJS session id (random, chosen by the client).
    pub session_id: String,
}

/// Why a handler refused a new session (answered with a 503).
#[derive(Debug, Clone, thiserror::Error)]
#[error("{0}")]
pub struct Refused(pub String);

/// What runs a SockJS session: the handler gets the session's [`Conn`]
/// (client messages in, messages out, close with code and reason).
pub trait Handler: Send + Sync + std::fmt::Debug + 'static {
    /// Whether a page from `origin` may use this endpoint.
    fn origin_allowed(&self, origin: &str) -> bool {
        let _ = origin;
        true
    }

    /// A new session: start serving `conn` (spawn a task) and return at
    /// once, or refuse it (the connection limit, shutting down).
    fn open(&self, conn: Conn, info: OpenInfo) -> Result<(), Refused>;
}

/// SockJS counters (`stomp_gateway_sockjs_*`).
#[derive(Debug, Clone)]
pub struct Counters {
    sessions: IntCounterVec,
    events: IntCounterVec,
}

/// Counted SockJS events: limits hit and sessions cut.
#[derive(Debug, Clone, Copy)]
pub enum Event {
    /// A streaming response ended at `stream_bytes_limit`.
    StreamBytesLimit,
    /// A session timed out after `disconnect_delay`.
    DisconnectDelay,
    /// A second receiving request was refused (2010).
    AnotherConnection,
    /// A receiving request was cut by the network (1002).
    Interrupted,
    /// A client payload was refused (broken JSON, too large).
    BadPayload,
    /// A session was refused by its handler (connection limit, origin).
    Refused,
}

impl Event {
    fn label(self) -> &'static str {
        match self {
            Event::StreamBytesLimit => "stream_bytes_limit",
            Event::DisconnectDelay => "disconnect_delay",
            Event::AnotherConnection => "another_connection",
            Event::Interrupted => "interrupted",
            Event::BadPayload => "bad_payload",
            Event::Refused => "refused",
        }
    }
}

impl Counters {
    /// Creates the counters, registered in `registry` when given.
    pub fn new(registry: Option<&Registry>) -> Result<Counters, prometheus::Error> {
        let sessions = IntCounterVec::new(
            Opts::new(
                "sockjs_sessions_total",
                "SockJS sessions opened, by transport",
            ),
            &["transport"],
        )?;
        let events = IntCounterVec::new(
            Opts::new(
                "sockjs_events_total",
                "SockJS limits hit and sessions cut, by event",
            ),
            &["event"],
        )?;
        if let Some(r) = registry {
            r.register(Box::new(sessions.clone()))?;
            r.register(Box::new(events.clone()))?;
        }
        Ok(Counters { sessions, events })
    }

    fn opened(&self, t: Transport) {
        self.sessions.with_label_values(&[t.name()]).inc();
    }

    fn event(&self, e: Event) {
        self.events.with_label_values(&[e.label()]).inc();
    }
}
