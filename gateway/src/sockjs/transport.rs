//! The SockJS URL scheme under one endpoint prefix, and every transport.
//!
//! ```text
//!  <prefix>                      greeting          GET
//!  <prefix>/info                 server info       GET, OPTIONS
//!  <prefix>/iframe[-x].html      iframe page       GET (ETag, 304)
//!  <prefix>/websocket            raw WebSocket     GET upgrade
//!  <prefix>/<srv>/<sid>/<t>      session transports
//! ```
//!
//! Receiving transports attach to the session for the life of one HTTP
//! request and write one SockJS frame per HTTP chunk (the preludes are their
//! own chunks). Streaming responses end once `stream_bytes_limit` bytes of
//! frames went out; polling responses end after one frame.

use super::frame::{self, PayloadError};
use super::session::{Outgoing, Session, Table, ANOTHER_CONNECTION, INTERRUPTED};
use super::{Counters, Event, Handler, OpenInfo, Refused, Settings, Transport};
use crate::upgrade::{self, UpgradeRefusal};
use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::{Frame, Incoming};
use hyper::header::{self, HeaderMap, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, Weak};
use std::task::{Context, Poll};
use std::time::{Duration, Instant, SystemTime};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tracing::debug;

/// Response bodies: whole (`Full`) or streamed frame by frame.
pub type Body = BoxBody<Bytes, Infallible>;

const TEXT: &str = "text/plain;charset=UTF-8";
const JSON: &str = "application/json;charset=UTF-8";
const JAVASCRIPT: &str = "application/javascript;charset=UTF-8";
const HTML: &str = "text/html;charset=UTF-8";
const EVENT_STREAM: &str = "text/event-stream";
const NO_CACHE: &str = "no-store, no-cache, no-transform, must-revalidate, max-age=0";
const ONE_YEAR: u64 = 31_536_000;

/// One SockJS endpoint: its settings, handler and live sessions.
#[derive(Debug)]
pub struct Service {
    settings: Settings,
    handler: Arc<dyn Handler>,
    table: Table,
    counters: Counters,
    ws_config: WebSocketConfig,
    iframe: String,
    etag: String,
}

/// How a receiving transport frames what it sends.
#[derive(Debug, Clone)]
enum Format {
    Xhr,
    EventSource,
    HtmlFile(String),
    Jsonp(String),
}

impl Format {
    fn wrap(&self, f: &str) -> Bytes {
        Bytes::from(match self {
            Format::Xhr => format!("{f}\n"),
            Format::EventSource => format!("data: {f}\r\n\r\n"),
            Format::HtmlFile(_) => {
                format!("<script>\np({});\n</script>\r\n", frame::json_string(f))
            }
            Format::Jsonp(cb) => format!("/**/{cb}({});\r\n", frame::json_string(f)),
        })
    }
}

impl Service {
    /// A service for `handler`; spawns the sweeper that times out idle
    /// sessions (it stops when the service is dropped).
    pub fn new(
        settings: Settings,
        handler: Arc<dyn Handler>,
        counters: Counters,
        ws_config: WebSocketConfig,
    ) -> Arc<Service> {
        let iframe = iframe_page(&settings.client_library_url);
        let etag = {
            use std::hash::{Hash, Hasher};
            let mut h = std::collections::hash_map::DefaultHasher::new();
            iframe.hash(&mut h);
            format!("\"{:016x}\"", h.finish())
        };
        let svc = Arc::new(Service {
            settings,
            handler,
            table: Table::default(),
            counters,
            ws_config,
            iframe,
            etag,
        });
        let weak = Arc::downgrade(&svc);
        let period = (svc.settings.disconnect_delay / 4)
            .clamp(Duration::from_millis(50), Duration::from_secs(1));
        tokio::spawn(sweep(weak, period));
        svc
    }

    /// Serves one request; `rest` is the path after the endpoint prefix.
    pub async fn handle(
        self: &Arc<Self>,
        req: Request<Incoming>,
        peer: SocketAddr,
        rest: &str,
    ) -> Response<Body> {
        match rest {
            "" | "/" => {
                return if req.method() == Method::GET || req.method() == Method::HEAD {
                    text(StatusCode::OK, "Welcome to SockJS!\n")
                } else {
                    not_found()
                }
            }
            "/info" => return self.info(&req),
            "/websocket" => return self.websocket(req, peer, true, "raw".into()),
            r if is_iframe(r) => return self.iframe(&req),
            _ => {}
        }
        let parts: Vec<&str> = rest.split('/').collect();
        let [_, server, session, transport] = parts[..] else {
            return not_found();
        };
        if [server, session]
            .iter()
            .any(|p| p.is_empty() || p.contains('.'))
        {
            return not_found();
        }
        let session = session.to_owned();
        let m = req.method().clone();
        match (transport, &m) {
            ("websocket", _) => self.websocket(req, peer, false, session),
            ("xhr" | "xhr_streaming" | "xhr_send", &Method::OPTIONS) => {
                self.options(&req, "OPTIONS, POST")
            }
            ("xhr", &Method::POST) => {
                self.receive(&req, peer, session, Transport::XhrPolling, Format::Xhr)
            }
            ("xhr_streaming", &Method::POST) => {
                self.receive(&req, peer, session, Transport::XhrStreaming, Format::Xhr)
            }
            ("eventsource", &Method::GET) => self.receive(
                &req,
                peer,
                session,
                Transport::EventSource,
                Format::EventSource,
            ),
            ("htmlfile" | "jsonp", &Method::GET) => match callback(&req) {
                Ok(cb) => {
                    let (t, f) = if transport == "jsonp" {
                        (Transport::Jsonp, Format::Jsonp(cb))
                    } else {
                        (Transport::HtmlFile, Format::HtmlFile(cb))
                    };
                    self.receive(&req, peer, session, t, f)
                }
                Err(r) => r,
            },
            ("xhr_send", &Method::POST) => self.send(req, session, false).await,
            ("jsonp_send", &Method::POST) => self.send(req, session, true).await,
            _ => not_found(),
        }
    }

    fn origin_refused(&self, req: &Request<Incoming>) -> Option<Response<Body>> {
        let origin = req.headers().get(header::ORIGIN)?.to_str().unwrap_or("");
        if self.handler.origin_allowed(origin) {
            return None;
        }
        self.counters.event(Event::Refused);
        Some(text(StatusCode::FORBIDDEN, "origin not allowed\n"))
    }

    fn info(&self, req: &Request<Incoming>) -> Response<Body> {
        if let Some(r) = self.origin_refused(req) {
            return r;
        }
        match *req.method() {
            Method::OPTIONS => return self.options(req, "OPTIONS, GET"),
            Method::GET => {}
            _ => return not_found(),
        }
        let body = serde_json::json!({
            "websocket": self.settings.websocket_enabled,
            "cookie_needed": self.settings.session_cookie_needed,
            "origins": ["*:*"],
            "entropy": rand::random::<u32>(),
        })
        .to_string();
        let mut r = full(StatusCode::OK, JSON, body);
        no_cache(r.headers_mut());
        cors(r.headers_mut(), req.headers());
        r
    }

    fn options(&self, req: &Request<Incoming>, methods: &'static str) -> Response<Body> {
        if let Some(r) = self.origin_refused(req) {
            return r;
        }
        let mut r = Response::new(empty());
        *r.status_mut() = StatusCode::NO_CONTENT;
        let h = r.headers_mut();
        cache_for_a_year(h);
        h.insert(
            header::ACCESS_CONTROL_MAX_AGE,
            HeaderValue::from_static("31536000"),
        );
        h.insert(
            header::ACCESS_CONTROL_ALLOW_METHODS,
            HeaderValue::from_static(methods),
        );
        cors(h, req.headers());
        self.cookie(h, req.headers());
        r
    }

    fn iframe(&self, req: &Request<Incoming>) -> Response<Body> {
        if req.method() != Method::GET {
            return not_found();
        }
        let h = req.headers();
        if h.get(header::IF_NONE_MATCH).and_then(|v| v.to_str().ok()) == Some(&self.etag) {
            let mut r = Response::new(empty());
            *r.status_mut() = StatusCode::NOT_MODIFIED;
            insert(r.headers_mut(), header::ETAG, &self.etag);
            return r;
        }
        let mut r = full(StatusCode::OK, HTML, self.iframe.clone());
        let h = r.headers_mut();
        cache_for_a_year(h);
        insert(h, header::ETAG, &self.etag);
        r
    }

    fn cookie(&self, h: &mut HeaderMap, req: &HeaderMap) {
        if !self.settings.session_cookie_needed {
            return;
        }
        let value = req
            .get_all(header::COOKIE)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(';'))
            .filter_map(|c| c.trim().strip_prefix("JSESSIONID="))
            .find(|v| !v.is_empty() && v.bytes().all(|b| b.is_ascii_graphic() && b != b';'))
            .unwrap_or("dummy");
        insert(
            h,
            header::SET_COOKIE,
            &format!("JSESSIONID={value}; path=/"),
        );
    }

    /// Opens the session `id` if it is new: the handler gets its `Conn`.
    fn session(
        &self,
        id: &str,
        peer: SocketAddr,
        transport: Transport,
    ) -> Result<(Arc<Session>, bool), Refused> {
        let limit = self.settings.session_buffer_bytes;
        self.table.get_or_create(id, || {
            let s = Session::new(id.to_owned(), limit, Instant::now());
            let info = OpenInfo {
                peer,
                transport,
                session_id: id.to_owned(),
            };
            match self.handler.open(s.conn(), info) {
                Ok(()) => {
                    self.counters.opened(transport);
                    Ok(s)
                }
                Err(e) => {
                    self.counters.event(Event::Refused);
                    Err(e)
                }
            }
        })
    }

    fn receive(
        self: &Arc<Self>,
        req: &Request<Incoming>,
        peer: SocketAddr,
        id: String,
        transport: Transport,
        format: Format,
    ) -> Response<Body> {
        if let Some(r) = self.origin_refused(req) {
            return r;
        }
        let (session, new) = match self.session(&id, peer, transport) {
            Ok(s) => s,
            Err(e) => return text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n")),
        };
        let (content_type, prelude, streaming) = match &format {
            Format::Xhr if transport == Transport::XhrStreaming => {
                let mut p = "h".repeat(2048);
                p.push('\n');
                (JAVASCRIPT, Some(Bytes::from(p)), true)
            }
            Format::Xhr => (JAVASCRIPT, None, false),
            Format::EventSource => (EVENT_STREAM, Some(Bytes::from_static(b"\r\n")), true),
            Format::HtmlFile(cb) => (HTML, Some(Bytes::from(htmlfile_head(cb))), true),
            Format::Jsonp(_) => (JAVASCRIPT, None, false),
        };
        let (tx, rx) = mpsc::channel::<Bytes>(8);
        if let Some(p) = prelude {
            // The channel is empty: this cannot fail for lack of room.
            let _ = tx.try_send(p);
        }
        // Attached before the response head goes out, so a request that
        // arrives after this one saw its head is the second receiver.
        let attached = session.attach();
        let svc = self.clone();
        tokio::spawn(async move {
            svc.run_receiver(session, attached, new, streaming, format, tx)
                .await;
        });
        let mut r = Response::new(BoxBody::new(ChannelBody { rx }));
        let h = r.headers_mut();
        h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
        no_cache(h);
        if matches!(transport, Transport::XhrPolling | Transport::XhrStreaming) {
            cors(h, req.headers());
        }
        self.cookie(h, req.headers());
        r
    }

    /// Writes frames for one receiving request until it is done (or, when
    /// another request is `attached` already, refuses it with 2010).
    async fn run_receiver(
        &self,
        session: Arc<Session>,
        attached: bool,
        new: bool,
        streaming: bool,
        format: Format,
        tx: mpsc::Sender<Bytes>,
    ) {
        if !attached {
            self.counters.event(Event::AnotherConnection);
            let f = frame::close(ANOTHER_CONNECTION.0, ANOTHER_CONNECTION.1);
            let _ = tx.send(format.wrap(&f)).await;
            return;
        }
        let limit = self.settings.stream_bytes_limit;
        let mut sent = 0usize;
        let mut write = |f: &str| {
            let b = format.wrap(f);
            sent += b.len();
            (b, sent)
        };
        if new {
            let (b, _) = write(frame::OPEN);
            if tx.send(b).await.is_err() {
                self.interrupted(&session);
                return;
            }
            if !streaming {
                session.detach(Instant::now());
                return;
            }
        }
        let heartbeat = tokio::time::sleep(self.settings.heartbeat);
        tokio::pin!(heartbeat);
        loop {
            let ready = session.ready();
            tokio::pin!(ready);
            ready.as_mut().enable();
            let (b, total, end) = match session.take() {
                Outgoing::Messages(m) => {
                    let (b, total) = write(&frame::messages(&m));
                    (b, total, !streaming)
                }
                Outgoing::Close(code, reason) => {
                    let (b, total) = write(&frame::close(code, &reason));
                    (b, total, true)
                }
                Outgoing::Nothing => {
                    tokio::select! {
                        () = &mut ready => continue,
                        () = &mut heartbeat => {
                            let (b, total) = write(frame::HEARTBEAT);
                            (b, total, !streaming)
                        }
                        () = tx.closed() => {
                            self.interrupted(&session);
                            return;
                        }
                    }
                }
            };
            if tx.send(b).await.is_err() {
                self.interrupted(&session);
                return;
            }
            heartbeat
                .as_mut()
                .reset(tokio::time::Instant::now() + self.settings.heartbeat);
            if streaming && total >= limit && !end {
                self.counters.event(Event::StreamBytesLimit);
                break;
            }
            if end {
                break;
            }
        }
        session.detach(Instant::now());
    }

    fn interrupted(&self, session: &Session) {
        self.counters.event(Event::Interrupted);
        session.interrupt(Instant::now());
    }

    /// `xhr_send` (a JSON array body) and `jsonp_send` (form field `d` or
    /// the raw body).
    async fn send(&self, req: Request<Incoming>, id: String, jsonp: bool) -> Response<Body> {
        if let Some(r) = self.origin_refused(&req) {
            return r;
        }
        let Some(session) = self.table.get(&id) else {
            return not_found();
        };
        let form = req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|v| v.starts_with("application/x-www-form-urlencoded"));
        let req_headers = req.headers().clone();
        let body = match Limited::new(req.into_body(), self.settings.max_message_size)
            .collect()
            .await
        {
            Ok(b) => b.to_bytes(),
            Err(_) => {
                self.counters.event(Event::BadPayload);
                return text(
                    StatusCode::PAYLOAD_TOO_LARGE,
                    "Payload too large or unreadable.\n",
                );
            }
        };
        let payload = if jsonp && form {
            form_field(&body, "d").unwrap_or_default()
        } else {
            body.to_vec()
        };
        let messages = match frame::parse_array(&payload) {
            Ok(m) => m,
            Err(e) => {
                self.counters.event(Event::BadPayload);
                let mut r = text(StatusCode::INTERNAL_SERVER_ERROR, e.to_string());
                if e == PayloadError::Empty || e == PayloadError::Broken {
                    cors(r.headers_mut(), &req_headers);
                }
                return r;
            }
        };
        if !session.deliver(messages).await {
            return not_found();
        }
        let mut r = if jsonp {
            full(StatusCode::OK, TEXT, "ok")
        } else {
            let mut r = Response::new(empty());
            *r.status_mut() = StatusCode::NO_CONTENT;
            r.headers_mut()
                .insert(header::CONTENT_TYPE, HeaderValue::from_static(TEXT));
            r
        };
        let h = r.headers_mut();
        no_cache(h);
        cors(h, &req_headers);
        self.cookie(h, &req_headers);
        r
    }

    /// The websocket transports: SockJS-framed at `/<srv>/<sid>/websocket`
    /// and raw at `/websocket`.
    fn websocket(
        self: &Arc<Self>,
        mut req: Request<Incoming>,
        peer: SocketAddr,
        raw: bool,
        id: String,
    ) -> Response<Body> {
        if !self.settings.websocket_enabled {
            return not_found();
        }
        if req.method() != Method::GET {
            let mut r = Response::new(empty());
            *r.status_mut() = StatusCode::METHOD_NOT_ALLOWED;
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET"));
            return r;
        }
        if !upgrade::has_token(req.headers(), header::UPGRADE, "websocket") {
            return text(
                StatusCode::BAD_REQUEST,
                "Can \"Upgrade\" only to \"WebSocket\".",
            );
        }
        if !upgrade::has_token(req.headers(), header::CONNECTION, "upgrade") {
            return text(
                StatusCode::BAD_REQUEST,
                "\"Connection\" must be \"Upgrade\".",
            );
        }
        let accept = match upgrade::accept_key(req.headers()) {
            Ok(accept) => accept,
            Err(UpgradeRefusal::UnsupportedVersion) => {
                let mut r = text(
                    StatusCode::BAD_REQUEST,
                    "Unsupported WebSocket version (13 required).",
                );
                r.headers_mut().insert(
                    header::SEC_WEBSOCKET_VERSION,
                    HeaderValue::from_static("13"),
                );
                return r;
            }
            Err(UpgradeRefusal::MissingKey) => {
                return text(StatusCode::BAD_REQUEST, "Missing Sec-WebSocket-Key.")
            }
        };
        if let Some(r) = self.origin_refused(&req) {
            return r;
        }
        // WebSocket sessions are not in the table: their life is the
        // connection's, and their id may be reused.
        let transport = if raw {
            Transport::RawWebSocket
        } else {
            Transport::WebSocket
        };
        let session = Session::new(
            id.clone(),
            self.settings.session_buffer_bytes,
            Instant::now(),
        );
        let info = OpenInfo {
            peer,
            transport,
            session_id: id,
        };
        if let Err(e) = self.handler.open(session.conn(), info) {
            self.counters.event(Event::Refused);
            return text(StatusCode::SERVICE_UNAVAILABLE, format!("{e}\n"));
        }
        self.counters.opened(transport);
        let on_upgrade = hyper::upgrade::on(&mut req);
        let svc = self.clone();
        tokio::spawn(async move {
            match on_upgrade.await {
                Ok(upgraded) => {
                    let ws = WebSocketStream::from_raw_socket(
                        TokioIo::new(upgraded),
                        Role::Server,
                        Some(svc.ws_config),
                    )
                    .await;
                    svc.pump(ws, &session, raw).await;
                }
                Err(e) => debug!(%peer, error = %e, "SockJS WebSocket upgrade failed"),
            }
            session.end(INTERRUPTED.0, INTERRUPTED.1);
        });
        let mut r = Response::new(empty());
        *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
        let h = r.headers_mut();
        h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
        h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
        insert(h, header::SEC_WEBSOCKET_ACCEPT, &accept);
        r
    }

    /// Moves messages between a WebSocket and its session until either ends.
    async fn pump<S>(&self, ws: WebSocketStream<S>, session: &Arc<Session>, raw: bool)
    where
        S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
    {
        let (mut sink, mut stream) = ws.split();
        if !raw && sink.send(Message::text(frame::OPEN)).await.is_err() {
            return;
        }
        let heartbeat = tokio::time::sleep(self.settings.heartbeat);
        tokio::pin!(heartbeat);
        // Client messages not yet in the session's inbox (it was full).
        let mut pending: std::collections::VecDeque<String> = Default::default();
        loop {
            let ready = session.ready();
            tokio::pin!(ready);
            ready.as_mut().enable();
            match session.take() {
                Outgoing::Messages(m) => {
                    let out: Vec<Message> = if raw {
                        m.into_iter().map(Message::text).collect()
                    } else {
                        vec![Message::text(frame::messages(&m))]
                    };
                    for msg in out {
                        if sink.feed(msg).await.is_err() {
                            return;
                        }
                    }
                    if sink.flush().await.is_err() {
                        return;
                    }
                    heartbeat
                        .as_mut()
                        .reset(tokio::time::Instant::now() + self.settings.heartbeat);
                    continue;
                }
                Outgoing::Close(code, reason) => {
                    if raw {
                        let _ = sink
                            .send(Message::Close(Some(CloseFrame {
                                code: code.into(),
                                reason: reason.into(),
                            })))
                            .await;
                    } else {
                        let _ = sink.send(Message::text(frame::close(code, &reason))).await;
                        let _ = sink.send(Message::Close(None)).await;
                    }
                    let _ = sink.close().await;
                    return;
                }
                Outgoing::Nothing => {}
            }
            tokio::select! {
                () = &mut ready => {}
                () = &mut heartbeat, if !raw => {
                    if sink.send(Message::text(frame::HEARTBEAT)).await.is_err() {
                        return;
                    }
                    heartbeat.as_mut().reset(tokio::time::Instant::now() + self.settings.heartbeat);
                }
                gone = session.offer_wait(&mut pending), if !pending.is_empty() => {
                    if gone {
                        return;
                    }
                }
                msg = stream.next(), if pending.is_empty() => match msg {
                    Some(Ok(Message::Text(t))) => {
                        if raw {
                            pending.push_back(t.as_str().to_owned());
                        } else {
                            match frame::parse_ws(t.as_str()) {
                                Ok(m) => pending.extend(m),
                                Err(_) => {
                                    // Broken JSON: drop the connection.
                                    self.counters.event(Event::BadPayload);
                                    return;
                                }
                            }
                        }
                        if session.offer(&mut pending) {
                            return;
                        }
                    }
                    Some(Ok(Message::Binary(b))) if raw => {
                        pending.push_back(String::from_utf8_lossy(&b).into_owned());
                        if session.offer(&mut pending) {
                            return;
                        }
                    }
                    Some(Ok(Message::Ping(_) | Message::Pong(_) | Message::Frame(_))) => {}
                    Some(Ok(Message::Binary(_))) => {
                        self.counters.event(Event::BadPayload);
                        return;
                    }
                    Some(Ok(Message::Close(_))) | None | Some(Err(_)) => return,
                },
            }
        }
    }
}

/// Times out idle sessions until the service is dropped.
async fn sweep(svc: Weak<Service>, period: Duration) {
    let mut tick = tokio::time::interval(period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(svc) = svc.upgrade() else {
            return;
        };
        let n = svc
            .table
            .sweep(Instant::now(), svc.settings.disconnect_delay);
        for _ in 0..n {
            svc.counters.event(Event::DisconnectDelay);
        }
    }
}

/// A response body fed frame by frame through a channel: one send, one
/// HTTP chunk. The sender learns that the client went away when the body
/// is dropped (`Sender::closed`).
#[derive(Debug)]
struct ChannelBody {
    rx: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for ChannelBody {
    type Data = Bytes;
    type Error = Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Infallible>>> {
        self.rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

fn empty() -> Body {
    BoxBody::new(Full::new(Bytes::new()))
}

fn full(status: StatusCode, content_type: &'static str, body: impl Into<Bytes>) -> Response<Body> {
    let mut r = Response::new(BoxBody::new(Full::new(body.into())));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn text(status: StatusCode, body: impl Into<String>) -> Response<Body> {
    full(status, TEXT, body.into())
}

fn not_found() -> Response<Body> {
    text(StatusCode::NOT_FOUND, "Not found\n")
}

fn insert(h: &mut HeaderMap, name: header::HeaderName, value: &str) {
    if let Ok(v) = HeaderValue::from_str(value) {
        h.insert(name, v);
    }
}

/// `Cache-Control: public` for a year, with `Expires`.
fn cache_for_a_year(h: &mut HeaderMap) {
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static("public, max-age=31536000"),
    );
    insert(
        h,
        header::EXPIRES,
        &http_date(SystemTime::now() + Duration::from_secs(ONE_YEAR)),
    );
}

fn no_cache(h: &mut HeaderMap) {
    h.insert(header::CACHE_CONTROL, HeaderValue::from_static(NO_CACHE));
}

/// CORS: echo `Origin` (also `null`) with credentials, else `*`; echo
/// requested headers.
fn cors(h: &mut HeaderMap, req: &HeaderMap) {
    match req.get(header::ORIGIN) {
        Some(o) => {
            h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, o.clone());
            h.insert(
                header::ACCESS_CONTROL_ALLOW_CREDENTIALS,
                HeaderValue::from_static("true"),
            );
            h.insert(header::VARY, HeaderValue::from_static("Origin"));
        }
        None => {
            h.insert(
                header::ACCESS_CONTROL_ALLOW_ORIGIN,
                HeaderValue::from_static("*"),
            );
        }
    }
    if let Some(v) = req.get(header::ACCESS_CONTROL_REQUEST_HEADERS) {
        if !v.is_empty() {
            h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, v.clone());
        }
    }
}

/// `/iframe.html` and `/iframe-<version>.html`.
fn is_iframe(rest: &str) -> bool {
    let Some(mid) = rest
        .strip_prefix("/iframe")
        .and_then(|r| r.strip_suffix(".html"))
    else {
        return false;
    };
    (mid.is_empty() || mid.starts_with('-'))
        && mid
            .bytes()
            .all(|b| b.is_ascii_digit() || b.is_ascii_lowercase() || b"-._".contains(&b))
}

fn iframe_page(sockjs_url: &str) -> String {
    let url = sockjs_url.replace('"', "%22");
    format!(
        r#"<!DOCTYPE html>
<html>
<head>
  <meta http-equiv="X-UA-Compatible" content="IE=edge" />
  <meta http-equiv="Content-Type" content="text/html; charset=UTF-8" />
  <script src="{url}"></script>
  <script>
    document.domain = document.domain;
    SockJS.bootstrap_iframe();
  </script>
</head>
<body>
  <h2>Don't panic!</h2>
  <p>This is a SockJS hidden iframe. It's used for cross domain magic.</p>
</body>
</html>"#
    )
}

fn htmlfile_head(callback: &str) -> String {
    let mut head = format!(
        r#"<!doctype html>
<html><head>
  <meta http-equiv="X-UA-Compatible" content="IE=edge" />
  <meta http-equiv="Content-Type" content="text/html; charset=UTF-8" />
</head><body><h2>Don't panic!</h2>
  <script>
    document.domain = document.domain;
    var c = parent.{callback};
    c.start();
    function p(d) {{c.message(d);}};
    window.onload = function() {{c.stop();}};
  </script>"#
    );
    // Browsers render nothing of a streamed page before 1 KiB.
    let pad = 1025usize.saturating_sub(head.len());
    head.push_str(&" ".repeat(pad));
    head.push_str("\r\n\r\n");
    head
}

/// The jsonp/htmlfile `c` parameter: required, `[a-zA-Z0-9-_.]` only.
#[allow(clippy::result_large_err)]
fn callback(req: &Request<Incoming>) -> Result<String, Response<Body>> {
    let cb = req
        .uri()
        .query()
        .and_then(|q| form_field(q.as_bytes(), "c"))
        .unwrap_or_default();
    if cb.is_empty() {
        return Err(text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "\"callback\" parameter required",
        ));
    }
    if !cb
        .iter()
        .all(|b| b.is_ascii_alphanumeric() || b"-_.".contains(b))
    {
        return Err(text(
            StatusCode::INTERNAL_SERVER_ERROR,
            "invalid \"callback\" parameter",
        ));
    }
    Ok(String::from_utf8_lossy(&cb).into_owned())
}

/// The first value of `name` in a URL-encoded form or query string.
fn form_field(form: &[u8], name: &str) -> Option<Vec<u8>> {
    form.split(|b| *b == b'&').find_map(|pair| {
        let (k, v) = match pair.iter().position(|b| *b == b'=') {
            Some(i) => (&pair[..i], &pair[i + 1..]),
            None => (pair, &b""[..]),
        };
        (percent_decode(k) == name.as_bytes()).then(|| percent_decode(v))
    })
}

/// Form/query decoding: `+` is a space, then percent escapes (a broken
/// escape stays as it is).
fn percent_decode(s: &[u8]) -> Vec<u8> {
    let plus: Vec<u8> = s
        .iter()
        .map(|&b| if b == b'+' { b' ' } else { b })
        .collect();
    percent_encoding::percent_decode(&plus).collect()
}

/// An RFC 7231 date (`Thu, 01 Jan 1970 00:00:00 GMT`).
pub fn http_date(t: SystemTime) -> String {
    httpdate::fmt_http_date(t)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::UNIX_EPOCH;

    #[test]
    fn iframe_urls() {
        for ok in [
            "/iframe.html",
            "/iframe-a.html",
            "/iframe-.html",
            "/iframe-0.1.2.html",
            "/iframe-0.1.2abc-dirty.2144.html",
        ] {
            assert!(is_iframe(ok), "{ok}");
        }
        for bad in [
            "/iframe.htm",
            "/iframe",
            "/IFRAME.HTML",
            "/IFRAME",
            "/iframe.HTML",
            "/iframe.xml",
            "/iframe-/.html",
            "/iframea.html",
        ] {
            assert!(!is_iframe(bad), "{bad}");
        }
    }

    #[test]
    fn forms_and_callbacks() {
        assert_eq!(
            form_field(b"d=%5B%22x%22%5D", "d"),
            Some(b"[\"x\"]".to_vec())
        );
        assert_eq!(form_field(b"p=p", "d"), None);
        assert_eq!(form_field(b"d=", "d"), Some(vec![]));
        assert_eq!(
            form_field(b"c=%63allback&t=1", "c"),
            Some(b"callback".to_vec())
        );
        assert_eq!(percent_decode(b"a%2"), b"a%2".to_vec());
        assert_eq!(percent_decode(b"a+b%zz"), b"a b%zz".to_vec());
    }

    #[test]
    fn dates() {
        assert_eq!(http_date(UNIX_EPOCH), "Thu, 01 Jan 1970 00:00:00 GMT");
        assert_eq!(
            http_date(UNIX_EPOCH + Duration::from_secs(1_700_000_000)),
            "Tue, 14 Nov 2023 22:13:20 GMT"
        );
        assert_eq!(
            http_date(UNIX_EPOCH + Duration::from_secs(951_782_400)),
            "Tue, 29 Feb 2000 00:00:00 GMT"
        );
    }

    #[test]
    fn htmlfile_head_is_over_1k() {
        let h = htmlfile_head("cb");
        assert!(h.len() > 1024);
        assert!(h.contains("var c = parent.cb;"));
    }

    #[test]
    fn frames_per_transport() {
        assert_eq!(&Format::Xhr.wrap("o")[..], b"o\n");
        assert_eq!(&Format::EventSource.wrap("o")[..], b"data: o\r\n\r\n");
        assert_eq!(
            &Format::HtmlFile("c".into()).wrap("a[\"x\"]")[..],
            b"<script>\np(\"a[\\\"x\\\"]\");\n</script>\r\n"
        );
        assert_eq!(
            &Format::Jsonp("x".into()).wrap("o")[..],
            b"/**/x(\"o\");\r\n"
        );
    }
}
