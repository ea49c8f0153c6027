//! The admin listener: `GET /healthz` (liveness), `GET /readyz`
//! (readiness, with details) and, with [`serve_with_api`], the publish API
//! under `/api/` ([`crate::api`]). Not meant for browsers.

use crate::amqp::ControlPlane;
use crate::config::Config;
use crate::health::Health;
use crate::metrics::Metrics;
use bytes::Bytes;
use http_body_util::Full;
use hyper::body::Incoming;
use hyper::header::{HeaderValue, ALLOW, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use std::convert::Infallible;
use std::sync::Arc;
use std::time::Duration;
use tokio::net::TcpListener;
use tokio::sync::watch;
use tracing::{debug, info, warn};

/// How long an admin connection may take to send its request headers.
const HEADER_READ_TIMEOUT: Duration = Duration::from_secs(10);

/// Serves the admin endpoints on `listener` until `shutdown` becomes `true`
/// (or its sender is dropped). Open keep-alive connections are then asked to
/// close after their current request.
///
/// Errors accepting one connection (for example too many open files) are
/// logged and do not stop the listener, so this only returns `Ok`.
pub async fn serve(
    listener: TcpListener,
    health: Arc<Health>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    serve_inner(listener, health, None, None, shutdown).await
}

/// [`serve`] plus the publish API (`POST /api/v1/...`, see [`crate::api`])
/// publishing through `control`.
pub async fn serve_with_api(
    listener: TcpListener,
    health: Arc<Health>,
    control: ControlPlane,
    config: Arc<Config>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    serve_inner(
        listener,
        health,
        Some(Arc::new((control, config))),
        None,
        shutdown,
    )
    .await
}

/// Everything: health, the publish API and `GET /metrics` (Prometheus).
pub async fn serve_all(
    listener: TcpListener,
    health: Arc<Health>,
    control: ControlPlane,
    config: Arc<Config>,
    metrics: Arc<Metrics>,
    shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    serve_inner(
        listener,
        health,
        Some(Arc::new((control, config))),
        Some(metrics),
        shutdown,
    )
    .await
}

async fn serve_inner(
    listener: TcpListener,
    health: Arc<Health>,
    api: Option<Arc<(ControlPlane, Arc<Config>)>>,
    metrics: Option<Arc<Metrics>>,
    mut shutdown: watch::Receiver<bool>,
) -> std::io::Result<()> {
    if let Ok(addr) = listener.local_addr() {
        let api_state = match &api {
            Some(a) if a.1.api.token.is_empty() => ", publish API disabled (api.token not set)",
            Some(_) => ", /api/v1/messages",
            None => "",
        };
        info!("admin listener on {addr} (/healthz, /readyz{api_state})");
    }
    loop {
        if *shutdown.borrow_and_update() {
            break;
        }
        let accepted = tokio::select! {
            changed = shutdown.changed() => {
                if changed.is_err() {
                    break;
                }
                continue;
            }
            accepted = listener.accept() => accepted,
        };
        let (stream, peer) = match accepted {
            Ok(a) => a,
            Err(e) => {
                warn!("admin listener: accept failed: {e}");
                tokio::time::sleep(Duration::from_millis(100)).await;
                continue;
            }
        };
        let health = health.clone();
        let api = api.clone();
        let metrics = metrics.clone();
        let mut conn_shutdown = shutdown.clone();
        tokio::spawn(async move {
            let service = service_fn(move |req: Request<Incoming>| {
                let health = health.clone();
                let api = api.clone();
                let metrics = metrics.clone();
                async move {
                    let resp = match (api, metrics) {
                        (Some(api), _) if crate::api::is_api_path(req.uri().path()) => {
                            crate::api::handle(req, &api.0, &api.1).await
                        }
                        (_, Some(m))
                            if req.uri().path() == "/metrics" && req.method() == Method::GET =>
                        {
                            let mut resp = Response::new(Full::new(Bytes::from(m.render(&health))));
                            resp.headers_mut().insert(
                                CONTENT_TYPE,
                                HeaderValue::from_static("text/plain; version=0.0.4"),
                            );
                            resp
                        }
                        _ => route(&req, &health),
                    };
                    Ok::<_, Infallible>(resp)
                }
            });
            let mut builder = http1::Builder::new();
            builder
                .timer(hyper_util::rt::TokioTimer::new())
                .header_read_timeout(HEADER_READ_TIMEOUT);
            let conn = builder.serve_connection(TokioIo::new(stream), service);
            tokio::pin!(conn);
            let result = tokio::select! {
                r = conn.as_mut() => r,
                () = stopped(&mut conn_shutdown) => {
                    conn.as_mut().graceful_shutdown();
                    conn.await
                }
            };
            if let Err(e) = result {
                debug!("admin connection from {peer}: {e}");
            }
        });
    }
    info!("admin listener stopped");
    Ok(())
}

/// Resolves once shutdown is requested (or its sender is gone).
async fn stopped(shutdown: &mut watch::Receiver<bool>) {
    // Drop the watch guard here: it must not live across an await.
    let _ = shutdown.wait_for(|stop| *stop).await.map(|_| ());
}

/// Answers one request.
fn route(req: &Request<Incoming>, health: &Health) -> Response<Full<Bytes>> {
    let path = req.uri().path();
    if !matches!(path, "/healthz" | "/readyz") {
        return json_response(
            StatusCode::NOT_FOUND,
            &serde_json::json!({"error": "not found"}),
        );
    }
    if req.method() != Method::GET && req.method() != Method::HEAD {
        let mut resp = json_response(
            StatusCode::METHOD_NOT_ALLOWED,
            &serde_json::json!({"error": "method not allowed"}),
        );
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("GET, HEAD"));
        return resp;
    }
    match path {
        "/healthz" => json_response(StatusCode::OK, &serde_json::json!({"status": "ok"})),
        _ => {
            let status = if health.is_ready() {
                StatusCode::OK
            } else {
                StatusCode::SERVICE_UNAVAILABLE
            };
            json_response(status, &health.details())
        }
    }
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response<Full<Bytes>> {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::SocketAddr;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpStream;

    /// Sends one request with `Connection: close`; returns (status, body).
    async fn request(addr: SocketAddr, method: &str, path: &str) -> (u16, String) {
        let mut s = TcpStream::connect(addr).await.expect("connect");
        let req = format!("{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n\r\n");
        s.write_all(req.as_bytes()).await.expect("write");
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(5), s.read_to_end(&mut raw))
            .await
            .expect("response in time")
            .expect("read");
        let text = String::from_utf8(raw).expect("utf-8 response");
        let status = text
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status line");
        let body = text
            .split_once("\r\n\r\n")
            .map(|(_, b)| b.to_owned())
            .unwrap_or_default();
        (status, body)
    }

    #[tokio::test]
    async fn healthz_readyz_404_405_and_shutdown() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let health = Arc::new(Health::new());
        let (tx, rx) = watch::channel(false);
        let task = tokio::spawn(serve(listener, health.clone(), rx));

        let (status, body) = request(addr, "GET", "/healthz").await;
        assert_eq!(status, 200);
        assert_eq!(body, r#"{"status":"ok"}"#);

        health.set_system_link_down("connection refused");
        let (status, body) = request(addr, "GET", "/readyz").await;
        assert_eq!(status, 503);
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["ready"], false);
        assert_eq!(v["system_link"]["last_error"], "connection refused");

        health.set_system_link_up("127.0.0.1:61613");
        let (status, body) = request(addr, "GET", "/readyz").await;
        assert_eq!(status, 200);
        let v: serde_json::Value = serde_json::from_str(&body).expect("json");
        assert_eq!(v["ready"], true);
        assert_eq!(v["system_link"]["address"], "127.0.0.1:61613");

        assert_eq!(request(addr, "GET", "/metricz").await.0, 404);
        assert_eq!(request(addr, "POST", "/healthz").await.0, 405);

        health.set_shutting_down();
        assert_eq!(request(addr, "GET", "/readyz").await.0, 503);

        tx.send(true).expect("send shutdown");
        tokio::time::timeout(Duration::from_secs(5), task)
            .await
            .expect("serve returns after shutdown")
            .expect("task")
            .expect("serve ok");
        assert!(
            TcpStream::connect(addr).await.is_err(),
            "listener closed after shutdown"
        );
    }
}
