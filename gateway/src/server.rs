//! The client listener: hyper 1 HTTP/1.1 with the WebSocket upgrade on the
//! configured endpoint paths, STOMP subprotocol negotiation, origin check and
//! the connection limits ([`crate::admission`], taken at accept). A
//! connection must finish its upgrade request within
//! `server.handshake_timeout_ms` or gets `408` (slowloris); one that does not
//! upgrade is closed after its one response (no keep-alive). Each upgraded
//! connection becomes a [`crate::client`] task.

use crate::admission::{Refusal, Ticket};
use crate::amqp::{ControlPlane, ControlPlaneError};
use crate::config::BrokerMode;
use crate::health::Health;
use crate::metrics::{Metrics, Rejection};
use crate::settings::Settings;
use crate::state::Shared;
use crate::upgrade::{self, UpgradeRefusal};
use bytes::Bytes;
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use relay_core::Version;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use tokio::io::AsyncWriteExt;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::watch;
use tokio_tungstenite::tungstenite::protocol::Role;
use tokio_tungstenite::WebSocketStream;
use tracing::{debug, info, warn};

/// Why the server could not run.
#[derive(Debug, thiserror::Error)]
pub enum ServerError {
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: String,
        source: std::io::Error,
    },
    #[error("AMQP control plane: {0}")]
    ControlPlane(#[from] ControlPlaneError),
    #[error("metrics registry: {0}")]
    Metrics(#[from] prometheus::Error),
}

/// Binds both listeners, starts the admin server and the system link, and
/// serves clients until `shutdown` turns true. Then it stops accepting,
/// closes every session (ERROR, WebSocket close 1001) and returns.
pub async fn run(settings: Settings, shutdown: watch::Receiver<bool>) -> Result<(), ServerError> {
    let config = settings.config.clone();
    let health = Arc::new(Health::default());
    let pod = settings.pod.clone();
    let metrics = Arc::new(Metrics::new(&pod)?);
    let listener = bind_backlog(
        &config.server.listen,
        config.server.listen_backlog,
        "client listener",
    )?;
    let admin = bind(&config.server.admin_listen, "admin listener").await?;
    let embedded = config.broker.mode == BrokerMode::Embedded;
    if embedded {
        health.set_embedded();
        info!(
            "broker.mode = \"embedded\": the gateway is its own broker (/topic/ pub-sub, /queue/ round-robin, ack:auto only); \
             single node: sessions on other gateway processes do not see these messages; set broker.mode = \"relay\" to use RabbitMQ"
        );
    }
    // Declares the topology first: a conflict stops start-up here.
    // The control plane closes after the sessions drained (they may still
    // publish and wait for confirms), not on the shutdown signal itself.
    let (control_stop, control_stopped) = watch::channel(false);
    // The shared fan-out's upstream stops with the control plane, after the
    // drain: draining sessions keep receiving their shared subscriptions.
    let upstream_stopped = control_stopped.clone();
    let control = if config.control_plane_enabled() {
        ControlPlane::start(&settings, health.clone(), metrics.clone(), control_stopped).await?
    } else {
        ControlPlane::off(&settings, health.clone(), metrics.clone())?
    };
    let shared = Arc::new(Shared::new(
        &settings,
        health.clone(),
        control.clone(),
        metrics.clone(),
        shutdown.clone(),
        upstream_stopped,
    ));
    let routes = Arc::new(crate::endpoints::Routes::new(&shared)?);
    info!(
        %pod,
        listen = %local(&listener),
        admin = %local(&admin),
        endpoints = ?config.server.endpoints.iter().filter(|e| !e.sockjs).map(|e| e.path.as_str()).collect::<Vec<_>>(),
        sockjs = ?routes.sockjs_paths(),
        mode = config.broker.mode.as_str(),
        brokers = ?config.broker.addresses,
        "stomp-gateway listening"
    );
    // The admin listener outlives the drain: /readyz must answer 503 (not
    // refuse connections) while sessions close, and /healthz stay 200.
    let (admin_stop, admin_stopped) = watch::channel(false);
    tokio::spawn({
        let (health, config) = (health.clone(), config.clone());
        async move {
            if let Err(e) =
                crate::admin::serve_all(admin, health, control, config, metrics, admin_stopped)
                    .await
            {
                warn!(error = %e, "admin listener stopped");
            }
        }
    });
    tokio::spawn(crate::telemetry::log_stats(
        shared.metrics.clone(),
        health.clone(),
        Duration::from_millis(config.log.stats_interval_ms),
        config.log.format == crate::config::LogFormat::Json,
        shutdown.clone(),
    ));
    // The system link watches RabbitMQ's STOMP plugin: relay mode only.
    let system = tokio::spawn({
        let run = (!embedded).then(|| {
            crate::system::run(
                config.clone(),
                health.clone(),
                shared.metrics.clone(),
                shared.broker_tls.clone(),
                shutdown.clone(),
            )
        });
        async move {
            if let Some(run) = run {
                run.await;
            }
        }
    });
    let mut stop = shutdown.clone();
    loop {
        tokio::select! {
            changed = stop.changed() => {
                if changed.is_err() || *stop.borrow() {
                    break;
                }
            }
            accepted = listener.accept() => match accepted {
                Ok((stream, peer)) => {
                    let _ = stream.set_nodelay(true);
                    match shared.admission.admit(peer.ip()) {
                        Ok(ticket) => {
                            tokio::spawn(serve_connection(
                                stream,
                                peer,
                                shared.clone(),
                                routes.clone(),
                                ticket,
                            ));
                        }
                        Err(why) => {
                            refused(&shared, peer, why);
                            tokio::spawn(refuse(stream, why));
                        }
                    }
                }
                Err(e) => {
                    // EMFILE and friends: back off instead of spinning.
                    warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            }
        }
    }
    health.set_shutting_down();
    drop(listener);
    let active = health.active_sessions();
    let period = Duration::from_millis(shared.config.server.drain_period_ms);
    info!(
        active_sessions = active,
        drain_period_ms = period.as_millis() as u64,
        "draining: listener closed, not ready; closing sessions at jittered moments"
    );
    // Each session closes within the period, plus the time its broker may
    // take to confirm what the client is owed.
    let deadline = tokio::time::Instant::now()
        + period
        + shared.session.broker_timeout
        + Duration::from_secs(1);
    shared.sessions.close();
    let _ = tokio::time::timeout_at(deadline, shared.sessions.wait()).await;
    let _ = tokio::time::timeout(Duration::from_secs(2), system).await;
    // Waits for in-flight confirms, then closes the AMQP connections.
    let _ = control_stop.send(true);
    let _ = tokio::time::timeout(Duration::from_secs(2), shared.control.closed()).await;
    info!(
        remaining_sessions = health.active_sessions(),
        "shutdown complete"
    );
    let _ = admin_stop.send(true);
    Ok(())
}

async fn bind(addr: &str, what: &'static str) -> Result<TcpListener, ServerError> {
    TcpListener::bind(addr)
        .await
        .map_err(|source| ServerError::Bind {
            what,
            addr: addr.to_owned(),
            source,
        })
}

/// Binds the client listener with `backlog` (tokio's own bind uses 1024).
fn bind_backlog(addr: &str, backlog: u32, what: &'static str) -> Result<TcpListener, ServerError> {
    let err = |source| ServerError::Bind {
        what,
        addr: addr.to_owned(),
        source,
    };
    let sa: SocketAddr = addr.parse().map_err(|_| {
        err(std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            "not an ip:port address",
        ))
    })?;
    let socket = socket2::Socket::new(
        socket2::Domain::for_address(sa),
        socket2::Type::STREAM,
        Some(socket2::Protocol::TCP),
    )
    .map_err(err)?;
    socket.set_reuse_address(true).map_err(err)?;
    socket.set_nonblocking(true).map_err(err)?;
    socket.bind(&sa.into()).map_err(err)?;
    socket
        .listen(i32::try_from(backlog).unwrap_or(i32::MAX))
        .map_err(err)?;
    TcpListener::from_std(socket.into()).map_err(err)
}

/// Logs and counts a refused connection.
fn refused(shared: &Shared, peer: SocketAddr, why: Refusal) {
    if why == Refusal::ConnectionLimit {
        shared.metrics.rejected(Rejection::ConnectionLimit);
    }
    shared.metrics.limit_hit(why.limit());
    debug!(%peer, limit = why.limit(), "connection refused");
}

/// Answers a connection refused at accept with a short HTTP response and
/// closes it (without reading the request: the limits exist to spend
/// nothing on such connections).
async fn refuse(mut stream: TcpStream, why: Refusal) {
    let (status, text) = match why.status() {
        503 => ("503 Service Unavailable", "connection limit reached"),
        _ => (
            "429 Too Many Requests",
            "too many connections from this address",
        ),
    };
    let body = format!("{text} ({})\n", why.limit());
    let resp = format!(
        "HTTP/1.1 {status}\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tokio::time::timeout(Duration::from_secs(1), async {
        let _ = stream.write_all(resp.as_bytes()).await;
        let _ = stream.shutdown().await;
    })
    .await;
}

fn local(l: &TcpListener) -> String {
    l.local_addr().map(|a| a.to_string()).unwrap_or_default()
}

/// The admission ticket of a connection, handed to its session on upgrade.
type TicketSlot = Arc<Mutex<Option<Ticket>>>;

async fn serve_connection(
    stream: TcpStream,
    peer: SocketAddr,
    shared: Arc<Shared>,
    routes: Arc<crate::endpoints::Routes>,
    ticket: Ticket,
) {
    // A second handle on the socket, to answer 408 if the request does not
    // arrive in time (hyper owns the stream and would only close it).
    let spare = stream
        .into_std()
        .and_then(|s| Ok((s.try_clone()?, s)))
        .and_then(|(spare, s)| Ok((spare, TcpStream::from_std(s)?)));
    let (spare, stream) = match spare {
        Ok(pair) => pair,
        Err(e) => {
            debug!(%peer, error = %e, "connection lost before it was served");
            return;
        }
    };
    let timeout = Duration::from_millis(shared.config.server.handshake_timeout_ms);
    let slot: TicketSlot = Arc::new(Mutex::new(Some(ticket)));
    let got_request = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let io = TokioIo::new(stream);
    let svc = service_fn({
        let (shared, slot, got_request) = (shared.clone(), slot.clone(), got_request.clone());
        move |req: Request<Incoming>| {
            got_request.store(true, Ordering::Relaxed);
            // Only a WebSocket upgrade carries the connection's slot on into
            // its session. Any other request has now arrived in full: the
            // slot is released (a SockJS session takes its own), so a
            // kept-alive connection holds none (its later requests are
            // bounded by the header read timeout).
            let path = req.uri().path();
            let upgrade_endpoint = shared
                .config
                .server
                .endpoints
                .iter()
                .any(|e| !e.sockjs && e.path == path);
            if !upgrade_endpoint {
                drop(slot.lock().unwrap_or_else(|e| e.into_inner()).take());
            }
            let (shared, routes, slot) = (shared.clone(), routes.clone(), slot.clone());
            async move {
                Ok::<_, Infallible>(match routes.serve(req, peer).await {
                    Ok(r) => r,
                    Err(req) => handle(req, peer, shared, slot).map(BodyExt::boxed),
                })
            }
        }
    });
    let conn = hyper::server::conn::http1::Builder::new()
        // Later requests on a kept-alive connection (SockJS polling) get
        // about the same time for their headers; hyper closes the connection
        // then. (A second more, so that for the first request the 408 below
        // comes first.)
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(timeout + Duration::from_secs(1))
        .serve_connection(io, svc)
        .with_upgrades();
    let mut conn = Box::pin(conn);
    let result = tokio::select! {
        r = conn.as_mut() => Some(r),
        () = tokio::time::sleep(timeout) => None,
    };
    let result = match result {
        Some(r) => r,
        None if got_request.load(Ordering::Relaxed) => {
            drop(spare);
            conn.await
        }
        None => {
            // Slowloris: no complete request in time. Answer as Web-STOMP
            // does, then close.
            drop(conn);
            shared.metrics.limit_hit("server.handshake_timeout_ms");
            debug!(%peer, "no complete upgrade request in time: 408");
            let ms = timeout.as_millis();
            let body =
                format!("no complete request within {ms} ms (server.handshake_timeout_ms)\n");
            let resp = format!(
                "HTTP/1.1 408 Request Timeout\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
                body.len()
            );
            if let Ok(mut s) = TcpStream::from_std(spare) {
                let _ = tokio::time::timeout(Duration::from_secs(1), async {
                    let _ = s.write_all(resp.as_bytes()).await;
                    let _ = s.shutdown().await;
                })
                .await;
            }
            return;
        }
    };
    if let Err(e) = result {
        debug!(%peer, error = %e, "http connection ended with an error");
    }
}

type Resp = Response<Full<Bytes>>;

fn text(status: StatusCode, body: impl Into<String>) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from(body.into())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    // One request per connection: a plain HTTP client gets its answer and
    // the connection closes, so none sits idle holding a slot.
    r.headers_mut()
        .insert(header::CONNECTION, HeaderValue::from_static("close"));
    r
}

/// Picks the highest STOMP version the client offers as a subprotocol.
pub fn choose_subprotocol<'a>(offered: impl Iterator<Item = &'a str>) -> Option<Version> {
    offered.filter_map(Version::from_subprotocol).max()
}

fn handle(
    mut req: Request<Incoming>,
    peer: SocketAddr,
    shared: Arc<Shared>,
    slot: TicketSlot,
) -> Resp {
    let path = req.uri().path().to_owned();
    let is_endpoint = shared
        .config
        .server
        .endpoints
        .iter()
        .any(|e| !e.sockjs && e.path == path);
    if !is_endpoint {
        return if path == "/" {
            let paths: Vec<&str> = shared
                .config
                .server
                .endpoints
                .iter()
                .map(|e| e.path.as_str())
                .collect();
            text(
                StatusCode::OK,
                format!(
                    "stomp-gateway: STOMP over WebSocket at {}\n",
                    paths.join(", ")
                ),
            )
        } else {
            text(StatusCode::NOT_FOUND, "not found\n")
        };
    }
    if req.method() != Method::GET
        || !upgrade::has_token(req.headers(), header::CONNECTION, "upgrade")
        || !upgrade::has_token(req.headers(), header::UPGRADE, "websocket")
    {
        return text(
            StatusCode::UPGRADE_REQUIRED,
            "this endpoint speaks STOMP over WebSocket: send a WebSocket upgrade request\n",
        );
    }
    let key = match upgrade::accept_key(req.headers()) {
        Ok(key) => key,
        Err(UpgradeRefusal::UnsupportedVersion) => {
            let mut r = text(
                StatusCode::BAD_REQUEST,
                "unsupported WebSocket version (13 required)\n",
            );
            r.headers_mut().insert(
                header::SEC_WEBSOCKET_VERSION,
                HeaderValue::from_static("13"),
            );
            return r;
        }
        Err(UpgradeRefusal::MissingKey) => {
            return text(StatusCode::BAD_REQUEST, "missing Sec-WebSocket-Key\n")
        }
    };
    if let Some(origin) = req.headers().get(header::ORIGIN) {
        let origin = origin.to_str().unwrap_or("");
        if !shared.origin_allowed(origin) {
            info!(%peer, origin, "rejected WebSocket upgrade: origin not allowed");
            shared.metrics.rejected(Rejection::Origin);
            return text(StatusCode::FORBIDDEN, "origin not allowed\n");
        }
    }
    if *shared.shutdown.borrow() {
        shared.metrics.rejected(Rejection::ShuttingDown);
        return text(StatusCode::SERVICE_UNAVAILABLE, "server shutting down\n");
    }
    // The connection's admission ticket goes with the session.
    let Some(mut permit) = slot.lock().unwrap_or_else(|e| e.into_inner()).take() else {
        return text(StatusCode::BAD_REQUEST, "one upgrade per connection\n");
    };
    if shared.admission.is_trusted(peer.ip()) {
        let xff = req
            .headers()
            .get("x-forwarded-for")
            .and_then(|v| v.to_str().ok());
        let client = shared.admission.forwarded_client(peer.ip(), xff);
        if let Err(why) = shared.admission.admit_forwarded(&mut permit, client) {
            refused(&shared, peer, why);
            warn!(%peer, %client, limit = why.limit(), "rejected WebSocket upgrade");
            return text(
                StatusCode::TOO_MANY_REQUESTS,
                format!("too many connections from this address ({})\n", why.limit()),
            );
        }
    }
    let offered: Vec<String> = req
        .headers()
        .get_all(header::SEC_WEBSOCKET_PROTOCOL)
        .iter()
        .filter_map(|v| v.to_str().ok())
        .flat_map(|s| s.split(',').map(|p| p.trim().to_owned()))
        .collect();
    let protocol = choose_subprotocol(offered.iter().map(String::as_str));

    let on_upgrade = hyper::upgrade::on(&mut req);
    let id = shared.next_session_id();
    let sessions = shared.sessions.clone();
    sessions.spawn(async move {
        match on_upgrade.await {
            Ok(upgraded) => {
                let ws = WebSocketStream::from_raw_socket(
                    TokioIo::new(upgraded),
                    Role::Server,
                    Some(shared.ws_config),
                )
                .await;
                crate::client::run(ws, shared, id, peer, protocol, permit, "websocket").await;
            }
            Err(e) => debug!(%peer, error = %e, "WebSocket upgrade failed"),
        }
    });

    let mut r = Response::new(Full::new(Bytes::new()));
    *r.status_mut() = StatusCode::SWITCHING_PROTOCOLS;
    let h = r.headers_mut();
    h.insert(header::CONNECTION, HeaderValue::from_static("Upgrade"));
    h.insert(header::UPGRADE, HeaderValue::from_static("websocket"));
    if let Ok(v) = HeaderValue::from_str(&key) {
        h.insert(header::SEC_WEBSOCKET_ACCEPT, v);
    }
    if let Some(p) = protocol {
        h.insert(
            header::SEC_WEBSOCKET_PROTOCOL,
            HeaderValue::from_static(p.subprotocol()),
        );
    }
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subprotocol_prefers_the_newest_version() {
        assert_eq!(
            choose_subprotocol(["v10.stomp", "v12.stomp", "v11.stomp"].into_iter()),
            Some(Version::V1_2)
        );
        assert_eq!(
            choose_subprotocol(["v10.stomp"].into_iter()),
            Some(Version::V1_0)
        );
        assert_eq!(choose_subprotocol(["mqtt"].into_iter()), None);
        assert_eq!(choose_subprotocol(std::iter::empty()), None);
    }
}
