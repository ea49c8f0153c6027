//! The client listener's routes besides the plain WebSocket endpoints:
//! SockJS endpoints (`{ path = "...", sockjs = true }`) whose sessions run
//! the STOMP driver ([`crate::client`]) over a [`crate::sockjs::Conn`], the
//! SockJS test services (`sockjs.test_services`) and the demo page.
//!
//! Origin checks and the connection limit apply to SockJS sessions exactly
//! as to WebSocket upgrades: one permit per session, for its whole life.

use crate::config::Config;
use crate::metrics::Rejection;
use crate::sockjs::{self, Body, Counters, Handler, OpenInfo, Refused, Service};
use crate::state::Shared;
use bytes::Bytes;
use http_body_util::combinators::BoxBody;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{self, HeaderValue};
use hyper::{Method, Request, Response, StatusCode};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tracing::{info, warn};

/// Runs a STOMP session over each SockJS session.
#[derive(Debug)]
pub struct StompHandler {
    shared: Arc<Shared>,
}

impl Handler for StompHandler {
    fn origin_allowed(&self, origin: &str) -> bool {
        let ok = self.shared.origin_allowed(origin);
        if !ok {
            info!(origin, "rejected SockJS request: origin not allowed");
            self.shared.metrics.rejected(Rejection::Origin);
        }
        ok
    }

    fn open(&self, conn: sockjs::Conn, info: OpenInfo) -> Result<(), Refused> {
        let shared = &self.shared;
        if *shared.shutdown.borrow() {
            shared.metrics.rejected(Rejection::ShuttingDown);
            return Err(Refused("server shutting down".into()));
        }
        let Some(permit) = shared.try_admit() else {
            warn!(peer = %info.peer, limit = shared.config.server.max_connections, transport = info.transport.name(), "rejected SockJS session: connection limit reached");
            shared.metrics.rejected(Rejection::ConnectionLimit);
            shared.metrics.limit_hit("server.max_connections");
            return Err(Refused("connection limit reached".into()));
        };
        let id = shared.next_session_id();
        info!(session = %id, peer = %info.peer, transport = info.transport.name(), "SockJS session");
        // Tracked with the WebSocket sessions: the drain waits for it.
        shared.sessions.spawn(crate::client::run(
            conn,
            shared.clone(),
            id,
            info.peer,
            None,
            permit,
            crate::metrics::sockjs_transport(info.transport.name()),
        ));
        Ok(())
    }
}

/// The SockJS services, the demo page and its assets.
#[derive(Debug)]
pub struct Routes {
    /// Endpoint prefix and service, longest prefix first.
    sockjs: Vec<(String, Arc<Service>)>,
    demo: Option<Bytes>,
    assets: bool,
}

impl Routes {
    /// Builds the routes from the configuration; SockJS counters go into
    /// the gateway's metrics registry.
    pub fn new(shared: &Arc<Shared>) -> Result<Routes, prometheus::Error> {
        let config = &shared.config;
        let counters = Counters::new(Some(shared.metrics.registry()))?;
        let settings = sockjs_settings(config);
        let handler: Arc<dyn Handler> = Arc::new(StompHandler {
            shared: shared.clone(),
        });
        let mut services: Vec<(String, Arc<Service>)> = config
            .server
            .endpoints
            .iter()
            .filter(|e| e.sockjs)
            .map(|e| {
                let svc = Service::new(
                    settings.clone(),
                    handler.clone(),
                    counters.clone(),
                    shared.ws_config,
                );
                (e.path.clone(), svc)
            })
            .collect();
        if config.sockjs.test_services {
            for (path, h, s) in sockjs::services::all(&settings) {
                services.push((
                    path.to_owned(),
                    Service::new(s, h, counters.clone(), shared.ws_config),
                ));
            }
        }
        services.sort_by_key(|(p, _)| std::cmp::Reverse(p.len()));
        Ok(Routes {
            assets: config.demo.enabled || !services.is_empty(),
            sockjs: services,
            demo: config.demo.enabled.then(|| crate::demo::page(config)),
        })
    }

    /// The SockJS endpoint paths.
    pub fn sockjs_paths(&self) -> Vec<&str> {
        self.sockjs.iter().map(|(p, _)| p.as_str()).collect()
    }

    /// Serves `req` if one of these routes owns its path, else gives it back.
    pub async fn serve(
        &self,
        req: Request<Incoming>,
        peer: SocketAddr,
    ) -> Result<Response<Body>, Request<Incoming>> {
        let path = req.uri().path().to_owned();
        for (prefix, svc) in &self.sockjs {
            if let Some(rest) = path.strip_prefix(prefix.as_str()) {
                if rest.is_empty() || rest.starts_with('/') {
                    return Ok(svc.handle(req, peer, rest).await);
                }
            }
        }
        let get = req.method() == Method::GET || req.method() == Method::HEAD;
        if path == "/" && get {
            if let Some(page) = &self.demo {
                return Ok(static_response(
                    "text/html;charset=UTF-8",
                    page.clone(),
                    false,
                ));
            }
        }
        if self.assets && get {
            if let Some((ct, bytes)) = crate::demo::asset(&path) {
                return Ok(static_response(ct, Bytes::from_static(bytes), true));
            }
        }
        Err(req)
    }
}

/// The SockJS settings of the configuration (`[sockjs]`, with the message
/// size and per-session buffer of the WebSocket endpoints).
pub fn sockjs_settings(config: &Config) -> sockjs::Settings {
    let c = &config.sockjs;
    sockjs::Settings {
        heartbeat: Duration::from_millis(c.heartbeat_time_ms),
        disconnect_delay: Duration::from_millis(c.disconnect_delay_ms),
        stream_bytes_limit: c.stream_bytes_limit,
        session_cookie_needed: c.session_cookie_needed,
        websocket_enabled: c.websocket_enabled,
        client_library_url: c.client_library_url.clone(),
        max_message_size: config.server.max_ws_message_size,
        session_buffer_bytes: config.session.outbound_buffer_bytes,
    }
}

fn static_response(content_type: &'static str, body: Bytes, cacheable: bool) -> Response<Body> {
    let mut r = Response::new(BoxBody::new(Full::new(body)));
    *r.status_mut() = StatusCode::OK;
    let h = r.headers_mut();
    h.insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    h.insert(
        header::CACHE_CONTROL,
        HeaderValue::from_static(if cacheable {
            "public, max-age=3600"
        } else {
            "no-cache"
        }),
    );
    r
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sockjs_defaults_are_springs() {
        let s = sockjs_settings(&Config::default());
        assert_eq!(s.heartbeat, Duration::from_secs(25));
        assert_eq!(s.disconnect_delay, Duration::from_secs(5));
        assert_eq!(s.stream_bytes_limit, 128 * 1024);
        assert!(!s.session_cookie_needed);
        assert!(s.websocket_enabled);
        assert_eq!(s.client_library_url, "/assets/sockjs.min.js");
        assert!(crate::demo::asset(&s.client_library_url).is_some());
    }
}
