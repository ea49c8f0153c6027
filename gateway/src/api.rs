//! The HTTP publish API on the admin listener (see `docs/configuration.md`,
//! `[api]`):
//!
//! - `POST /api/v1/messages` `{"destination": "/topic/x", "headers": {..},
//!   "body": "text" | "body_base64": "..", "content_type": "..", "persistent": false}`
//! - `POST /api/v1/users/{user}/messages` `{"destination": "/queue/notifications", ..}`:
//!   to every session of `{user}` subscribed to `/user/queue/notifications`.
//!
//! `202 {"status":"accepted","message_id":..}` once RabbitMQ confirmed the
//! message; errors are `{"error": ".."}` with 400, 401, 404, 405, 408, 413,
//! 422 or 503.

use crate::amqp::{ControlPlane, OutboundMessage, PublishError};
use crate::config::Config;
use base64::Engine;
use bytes::Bytes;
use http_body_util::{BodyExt, Full, Limited};
use hyper::body::Incoming;
use hyper::header::{
    HeaderValue, ALLOW, AUTHORIZATION, CONTENT_LENGTH, CONTENT_TYPE, RETRY_AFTER, WWW_AUTHENTICATE,
};
use hyper::{Method, Request, Response, StatusCode};
use relay_core::router::{user_routing_key, DestinationKind, RESERVED_HEADER_PREFIX};
use serde::Deserialize;
use std::collections::BTreeMap;
use std::time::Duration;
use tracing::debug;

/// Prefix of every API path.
pub const API_PREFIX: &str = "/api/";
/// How long a client may take to send the request body.
const BODY_READ_TIMEOUT: Duration = Duration::from_secs(30);
/// Most headers in one message.
const MAX_HEADERS: usize = 64;
/// JSON and base64 overhead allowed on top of `api.max_body_bytes` when
/// reading the request (escaped JSON text may be up to 6 times longer).
const REQUEST_OVERHEAD: usize = 64 * 1024;
/// Header names the STOMP plugin uses for frame or message properties; a
/// message header with one of these names would clash with them.
const PROTOCOL_HEADERS: [&str; 16] = [
    "destination",
    "message-id",
    "subscription",
    "ack",
    "receipt",
    "transaction",
    "content-length",
    "content-type",
    "content-encoding",
    "persistent",
    "reply-to",
    "expires",
    "priority",
    "correlation-id",
    "redelivered",
    "amqp-message-id",
];

type Resp = Response<Full<Bytes>>;

/// The JSON body of both endpoints.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PublishRequest {
    destination: String,
    #[serde(default)]
    headers: BTreeMap<String, String>,
    body: Option<String>,
    body_base64: Option<String>,
    content_type: Option<String>,
    #[serde(default)]
    persistent: bool,
}

/// Whether `path` belongs to the API.
pub fn is_api_path(path: &str) -> bool {
    path.starts_with(API_PREFIX)
}

/// Answers one API request.
pub async fn handle(req: Request<Incoming>, control: &ControlPlane, config: &Config) -> Resp {
    if config.api.token.is_empty() {
        return error(StatusCode::NOT_FOUND, "publish API disabled: set api.token");
    }
    let path = req.uri().path().to_owned();
    let user = match route(&path) {
        Some(Route::Messages) => None,
        Some(Route::UserMessages(raw)) => match percent_decode(raw) {
            Some(user) if !user.is_empty() => Some(user),
            _ => {
                return error(
                    StatusCode::BAD_REQUEST,
                    "the user in the path must be a non-empty, percent-encoded UTF-8 name",
                )
            }
        },
        None => return error(StatusCode::NOT_FOUND, "not found"),
    };
    if req.method() != Method::POST {
        let mut resp = error(
            StatusCode::METHOD_NOT_ALLOWED,
            "method not allowed: use POST",
        );
        resp.headers_mut()
            .insert(ALLOW, HeaderValue::from_static("POST"));
        return resp;
    }
    if !authorized(&req, &config.api.token) {
        let mut resp = error(
            StatusCode::UNAUTHORIZED,
            "missing or wrong token: send Authorization: Bearer <api.token>",
        );
        resp.headers_mut()
            .insert(WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        return resp;
    }

    let max_body = config.api.max_body_bytes;
    let limit = max_body.saturating_mul(6).saturating_add(REQUEST_OVERHEAD);
    let declared = req
        .headers()
        .get(CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return too_large(max_body);
    }
    let raw = match tokio::time::timeout(
        BODY_READ_TIMEOUT,
        Limited::new(req.into_body(), limit).collect(),
    )
    .await
    {
        Err(_) => {
            return error(
                StatusCode::REQUEST_TIMEOUT,
                "request body not received in time",
            )
        }
        Ok(Err(e)) => {
            if e.is::<http_body_util::LengthLimitError>() {
                return too_large(max_body);
            }
            return error(
                StatusCode::BAD_REQUEST,
                &format!("cannot read the request body: {e}"),
            );
        }
        Ok(Ok(collected)) => collected.to_bytes(),
    };
    let request: PublishRequest = match serde_json::from_slice(&raw) {
        Ok(r) => r,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                &format!("invalid JSON request: {e}"),
            )
        }
    };
    let message = match build(request, user.as_deref(), config, control) {
        Ok(m) => m,
        Err((status, text)) => return error(status, &text),
    };
    let message_id = message.message_id.clone().unwrap_or_default();
    let (exchange, routing_key) = (message.exchange.clone(), message.routing_key.clone());
    match control.publish(message).await {
        Ok(()) => {
            debug!(%exchange, %routing_key, %message_id, "publish API: message accepted");
            json(
                StatusCode::ACCEPTED,
                &serde_json::json!({
                    "status": "accepted",
                    "message_id": message_id,
                    "exchange": exchange,
                    "routing_key": routing_key,
                }),
            )
        }
        Err(e) => {
            debug!(%exchange, %routing_key, error = %e, "publish API: message not accepted");
            let status = publish_status(&e);
            let mut resp = error(status, &e.to_string());
            if status == StatusCode::SERVICE_UNAVAILABLE {
                resp.headers_mut()
                    .insert(RETRY_AFTER, HeaderValue::from_static("1"));
            }
            resp
        }
    }
}

/// The HTTP status for a failed publish.
pub fn publish_status(e: &PublishError) -> StatusCode {
    match e {
        PublishError::Unavailable(_)
        | PublishError::Overloaded
        | PublishError::Timeout
        | PublishError::Nacked => StatusCode::SERVICE_UNAVAILABLE,
        PublishError::Unroutable { .. } | PublishError::Rejected(_) => {
            StatusCode::UNPROCESSABLE_ENTITY
        }
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Route<'a> {
    Messages,
    /// The raw (still percent-encoded) user segment.
    UserMessages(&'a str),
}

fn route(path: &str) -> Option<Route<'_>> {
    if path == "/api/v1/messages" {
        return Some(Route::Messages);
    }
    let user = path
        .strip_prefix("/api/v1/users/")?
        .strip_suffix("/messages")?;
    (!user.contains('/')).then_some(Route::UserMessages(user))
}

/// Turns a request into a message, or says why it cannot be one.
fn build(
    request: PublishRequest,
    user: Option<&str>,
    config: &Config,
    control: &ControlPlane,
) -> Result<OutboundMessage, (StatusCode, String)> {
    let bad = |text: String| (StatusCode::BAD_REQUEST, text);
    let (exchange, routing_key, mandatory) = match user {
        None => {
            let Some(r) = config.routes().resolve(&request.destination) else {
                return Err(bad(format!(
                    "destination {:?} is not served: use /topic/<key>, /exchange/<name>[/<key>], /queue/<name>, /amq/queue/<name>, {}<...> or {}<user>/<...>",
                    request.destination,
                    config
                        .app
                        .prefixes
                        .first()
                        .map(String::as_str)
                        .unwrap_or("/app/"),
                    config.user.prefix
                )));
            };
            let mandatory = r.kind.mandatory();
            (r.exchange, r.routing_key, mandatory)
        }
        Some(user) => {
            // "/queue/x", or the subscription form "/user/queue/x".
            let dest = request.destination.as_str();
            let inner = dest
                .strip_prefix(config.user.prefix.as_str())
                .filter(|_| !config.user.prefix.is_empty())
                .unwrap_or(dest);
            let rest = inner.trim_start_matches('/');
            if !dest.starts_with('/') || rest.is_empty() {
                return Err(bad(format!(
                    "destination {dest:?} must be a path like /queue/notifications (what the user's sessions subscribe to under {})",
                    config.user.prefix
                )));
            }
            (
                config.user.exchange.clone(),
                user_routing_key(user, rest),
                DestinationKind::User.mandatory(),
            )
        }
    };
    let body = match (request.body, request.body_base64) {
        (Some(_), Some(_)) => {
            return Err(bad("give either body or body_base64, not both".into()));
        }
        (Some(text), None) => Bytes::from(text),
        (None, Some(b64)) => match base64::engine::general_purpose::STANDARD.decode(b64.trim()) {
            Ok(bytes) => Bytes::from(bytes),
            Err(e) => return Err(bad(format!("body_base64 is not valid base64: {e}"))),
        },
        (None, None) => Bytes::new(),
    };
    if body.len() > config.api.max_body_bytes {
        return Err((
            StatusCode::PAYLOAD_TOO_LARGE,
            format!(
                "the message body is {} bytes, more than api.max_body_bytes ({})",
                body.len(),
                config.api.max_body_bytes
            ),
        ));
    }
    if request.headers.len() > MAX_HEADERS {
        return Err(bad(format!("more than {MAX_HEADERS} headers")));
    }
    for name in request.headers.keys() {
        check_header_name(name).map_err(bad)?;
    }
    if let Some(ct) = &request.content_type {
        if ct.is_empty() || ct.len() > 255 || ct.chars().any(char::is_control) {
            return Err(bad(
                "content_type must be 1 to 255 bytes without control characters".into(),
            ));
        }
    }
    Ok(OutboundMessage {
        exchange,
        routing_key,
        headers: request.headers.into_iter().collect(),
        content_type: request.content_type,
        message_id: Some(control.new_message_id()),
        body,
        mandatory,
        persistent: request.persistent,
        properties: None,
    })
}

fn check_header_name(name: &str) -> Result<(), String> {
    if name.is_empty() || name.len() > 255 {
        return Err(format!("header name {name:?} must be 1 to 255 bytes"));
    }
    if name.contains(':') || name.chars().any(char::is_control) {
        return Err(format!(
            "header name {name:?} must not contain ':' or control characters"
        ));
    }
    let lower = name.to_ascii_lowercase();
    if lower.starts_with(RESERVED_HEADER_PREFIX) {
        return Err(format!(
            "header {name:?}: the {RESERVED_HEADER_PREFIX}* headers are set by the gateway only"
        ));
    }
    if PROTOCOL_HEADERS.contains(&lower.as_str()) {
        return Err(format!(
            "header {name:?} is a STOMP/AMQP protocol header: use the request fields (content_type, persistent) instead"
        ));
    }
    Ok(())
}

/// `Authorization: Bearer <token>`, compared in constant time.
fn authorized(req: &Request<Incoming>, token: &str) -> bool {
    let Some(value) = req
        .headers()
        .get(AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
    else {
        return false;
    };
    let Some((scheme, given)) = value.trim().split_once(' ') else {
        return false;
    };
    scheme.eq_ignore_ascii_case("bearer")
        && constant_time_eq(given.trim().as_bytes(), token.as_bytes())
}

/// Compares without stopping at the first difference (`subtle`; the time
/// depends on the lengths only).
fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    use subtle::ConstantTimeEq;
    bool::from(a.ct_eq(b))
}

/// Decodes `%XX` escapes (`percent-encoding`); `None` for a broken escape
/// (which the crate would pass through) or invalid UTF-8.
fn percent_decode(s: &str) -> Option<String> {
    let bytes = s.as_bytes();
    let well_formed = bytes.iter().enumerate().all(|(i, &b)| {
        b != b'%'
            || bytes
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    });
    if !well_formed {
        return None;
    }
    percent_encoding::percent_decode_str(s)
        .decode_utf8()
        .ok()
        .map(|c| c.into_owned())
}

fn too_large(max_body: usize) -> Resp {
    error(
        StatusCode::PAYLOAD_TOO_LARGE,
        &format!("request too large: message bodies are limited to api.max_body_bytes ({max_body} bytes)"),
    )
}

fn error(status: StatusCode, text: &str) -> Resp {
    json(status, &serde_json::json!({ "error": text }))
}

fn json(status: StatusCode, body: &serde_json::Value) -> Resp {
    let mut resp = Response::new(Full::new(Bytes::from(body.to_string())));
    *resp.status_mut() = status;
    resp.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    resp
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use crate::amqp::tests::{admin_connection, get_one, start, test_config, unique, with_cleanup};
    use crate::config::{BindingDecl, QueueDecl};
    use crate::health::Health;
    use std::net::SocketAddr;
    use std::sync::Arc;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::sync::watch;

    /// Starts `serve_with_api` on a free port.
    async fn serve(config: Config) -> (SocketAddr, ControlPlane, watch::Sender<bool>) {
        let config = Arc::new(config);
        let health = Arc::new(Health::new());
        let (tx, rx) = watch::channel(false);
        let control = start(config.clone(), health.clone(), rx.clone())
            .await
            .expect("control plane starts");
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(crate::admin::serve_with_api(
            listener,
            health,
            control.clone(),
            config,
            rx,
        ));
        (addr, control, tx)
    }

    /// One request; (status, JSON body).
    async fn call(
        addr: SocketAddr,
        method: &str,
        path: &str,
        token: Option<&str>,
        body: &str,
    ) -> (u16, serde_json::Value) {
        let mut s = TcpStream::connect(addr).await.unwrap();
        let auth = token
            .map(|t| format!("Authorization: Bearer {t}\r\n"))
            .unwrap_or_default();
        let req = format!(
            "{method} {path} HTTP/1.1\r\nHost: test\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        );
        s.write_all(req.as_bytes()).await.unwrap();
        let mut raw = Vec::new();
        tokio::time::timeout(Duration::from_secs(15), s.read_to_end(&mut raw))
            .await
            .expect("response in time")
            .unwrap();
        let text = String::from_utf8(raw).unwrap();
        let status = text.split(' ').nth(1).and_then(|s| s.parse().ok()).unwrap();
        let body = text.split_once("\r\n\r\n").map(|(_, b)| b).unwrap_or("");
        let json = serde_json::from_str(body).unwrap_or(serde_json::Value::Null);
        (status, json)
    }

    #[tokio::test]
    async fn api_disabled_without_token() {
        let mut c = test_config();
        c.api.token = String::new();
        let xs = vec![c.app.exchange.clone(), c.user.exchange.clone()];
        with_cleanup(xs, vec![], async move {
            let (addr, _cp, tx) = serve(c).await;
            let (status, body) = call(addr, "POST", "/api/v1/messages", Some("x"), "{}").await;
            assert_eq!(status, 404);
            assert_eq!(body["error"], "publish API disabled: set api.token");
            // Health endpoints are unaffected.
            assert_eq!(call(addr, "GET", "/healthz", None, "").await.0, 200);
            tx.send(true).unwrap();
        })
        .await;
    }

    #[tokio::test]
    async fn api_publishes_and_reports_errors() {
        let mut c = test_config();
        let token = format!("tok-{}", unique("api"));
        c.api.token = token.clone();
        c.api.max_body_bytes = 64;
        let queue = unique("apiq");
        let user_queue = unique("apiuq");
        c.topology.queues = vec![
            QueueDecl {
                name: queue.clone(),
                durable: false,
                ..Default::default()
            },
            QueueDecl {
                name: user_queue.clone(),
                durable: false,
                ..Default::default()
            },
        ];
        c.topology.bindings = vec![BindingDecl {
            exchange: c.user.exchange.clone(),
            queue: user_queue.clone(),
            routing_key: user_routing_key("al ice", "queue/notifications"),
            ..Default::default()
        }];
        c.validate().expect("valid");
        let xs = vec![c.app.exchange.clone(), c.user.exchange.clone()];
        let qs = vec![queue.clone(), user_queue.clone()];
        with_cleanup(xs, qs, async move {
            let (addr, cp, tx) = serve(c).await;
            let t = Some(token.as_str());
            let post = |path: &'static str, token: Option<&str>, body: String| {
                let token = token.map(str::to_owned);
                async move { call(addr, "POST", path, token.as_deref(), &body).await }
            };

            // 202, then the message is on the queue.
            let req = serde_json::json!({
                "destination": format!("/queue/{queue}"),
                "headers": {"x-trace": "abc"},
                "body": "hello",
                "content_type": "text/plain",
                "persistent": true,
            });
            let (status, body) = post("/api/v1/messages", t, req.to_string()).await;
            assert_eq!(status, 202, "{body}");
            assert_eq!(body["status"], "accepted");
            let id = body["message_id"].as_str().unwrap().to_owned();
            let conn = admin_connection().await;
            let d = get_one(&conn, &queue).await;
            assert_eq!(d.data, b"hello");
            assert_eq!(
                d.properties.message_id().as_ref().map(|s| s.as_str()),
                Some(id.as_str())
            );
            assert_eq!(
                d.properties.content_type().as_ref().map(|s| s.as_str()),
                Some("text/plain")
            );
            assert_eq!(*d.properties.delivery_mode(), Some(2));
            let headers = d.properties.headers().as_ref().unwrap();
            assert!(headers.contains_key("x-trace"));

            // A user destination, user name percent-encoded, body in base64.
            let req = serde_json::json!({
                "destination": "/queue/notifications",
                "body_base64": "AAEC/w==",
            });
            let (status, body) =
                post("/api/v1/users/al%20ice/messages", t, req.to_string()).await;
            assert_eq!(status, 202, "{body}");
            let d = get_one(&conn, &user_queue).await;
            assert_eq!(d.data, [0u8, 1, 2, 255]);
            // The subscription form of the destination works too.
            let req = serde_json::json!({"destination": "/user/queue/notifications"});
            let (status, _) = post("/api/v1/users/al%20ice/messages", t, req.to_string()).await;
            assert_eq!(status, 202);
            assert!(get_one(&conn, &user_queue).await.data.is_empty());
            let _ = conn.close(200, "OK".into()).await;

            // 401.
            let ok = serde_json::json!({"destination": "/topic/x", "body": "b"}).to_string();
            let (status, body) = post("/api/v1/messages", None, ok.clone()).await;
            assert_eq!(status, 401, "{body}");
            assert!(body["error"].as_str().unwrap().contains("Bearer"));
            assert_eq!(post("/api/v1/messages", Some("wrong"), ok.clone()).await.0, 401);
            let longer = format!("{token}x");
            assert_eq!(post("/api/v1/messages", Some(&longer), ok.clone()).await.0, 401);

            // 400s.
            for (bad, why) in [
                ("{not json".to_owned(), "invalid JSON"),
                (
                    serde_json::json!({"destination": "/nowhere/x"}).to_string(),
                    "is not served",
                ),
                (
                    serde_json::json!({"destination": "/temp-queue/x"}).to_string(),
                    "is not served",
                ),
                (
                    serde_json::json!({"destination": "/topic/x", "body": "a", "body_base64": "YQ=="}).to_string(),
                    "not both",
                ),
                (
                    serde_json::json!({"destination": "/topic/x", "body_base64": "%%%"}).to_string(),
                    "base64",
                ),
                (
                    serde_json::json!({"destination": "/topic/x", "headers": {"stomp-user": "eve"}}).to_string(),
                    "set by the gateway",
                ),
                (
                    serde_json::json!({"destination": "/topic/x", "headers": {"n": 1}}).to_string(),
                    "invalid JSON",
                ),
                (
                    serde_json::json!({"destination": "/topic/x", "bodyy": "typo"}).to_string(),
                    "unknown field",
                ),
            ] {
                let (status, body) = post("/api/v1/messages", t, bad.clone()).await;
                assert_eq!(status, 400, "{bad}: {body}");
                assert!(body["error"].as_str().unwrap().contains(why), "{bad}: {body}");
            }
            let (status, _) = post(
                "/api/v1/users/%ZZ/messages",
                t,
                serde_json::json!({"destination": "/queue/x"}).to_string(),
            )
            .await;
            assert_eq!(status, 400);

            // 413: over api.max_body_bytes (64).
            let big = serde_json::json!({"destination": "/topic/x", "body": "b".repeat(65)});
            let (status, body) = post("/api/v1/messages", t, big.to_string()).await;
            assert_eq!(status, 413, "{body}");
            // A request far over the limit is refused before its body is sent.
            let mut s = TcpStream::connect(addr).await.unwrap();
            let head = format!(
                "POST /api/v1/messages HTTP/1.1\r\nHost: t\r\nAuthorization: Bearer {token}\r\nContent-Length: 10000000\r\n\r\n"
            );
            s.write_all(head.as_bytes()).await.unwrap();
            let mut buf = vec![0u8; 4096];
            let n = tokio::time::timeout(Duration::from_secs(5), s.read(&mut buf))
                .await
                .unwrap()
                .unwrap();
            let text = String::from_utf8_lossy(&buf[..n]);
            assert!(text.starts_with("HTTP/1.1 413"), "{text}");
            assert!(text.contains("api.max_body_bytes"), "{text}");

            // 422: nothing bound to the queue name, or no such exchange.
            let missing = serde_json::json!({"destination": format!("/queue/{}", unique("nope"))});
            let (status, body) = post("/api/v1/messages", t, missing.to_string()).await;
            assert_eq!(status, 422, "{body}");
            assert!(body["error"].as_str().unwrap().contains("no queue is bound"), "{body}");
            let missing = serde_json::json!({"destination": format!("/exchange/{}/k", unique("nox"))});
            let (status, body) = post("/api/v1/messages", t, missing.to_string()).await;
            assert_eq!(status, 422, "{body}");
            assert!(body["error"].as_str().unwrap().contains("NOT_FOUND"), "{body}");
            // A topic without subscribers is fine.
            assert_eq!(post("/api/v1/messages", t, ok.clone()).await.0, 202);

            // 404 and 405.
            assert_eq!(post("/api/v1/nothing", t, ok.clone()).await.0, 404);
            assert_eq!(call(addr, "GET", "/api/v1/messages", t, "").await.0, 405);
            assert!(cp.is_up());
            tx.send(true).unwrap();
        })
        .await;
    }

    #[tokio::test]
    async fn api_answers_503_while_rabbitmq_is_unreachable() {
        let mut c = test_config();
        c.amqp.url = "amqp://guest:guest@127.0.0.1:1/%2f".into();
        c.api.token = "t".into();
        let started = std::time::Instant::now();
        let (addr, cp, tx) = serve(c).await;
        assert!(started.elapsed() < Duration::from_secs(3));
        assert!(!cp.is_up());
        let ok = serde_json::json!({"destination": "/topic/x", "body": "b"}).to_string();
        let (status, body) = call(addr, "POST", "/api/v1/messages", Some("t"), &ok).await;
        assert_eq!(status, 503, "{body}");
        assert!(
            body["error"].as_str().unwrap().contains("unavailable"),
            "{body}"
        );
        let (status, body) = call(addr, "GET", "/readyz", None, "").await;
        assert_eq!(status, 503);
        assert_eq!(body["amqp"]["up"], false);
        tx.send(true).unwrap();
    }

    #[test]
    fn routes() {
        assert_eq!(route("/api/v1/messages"), Some(Route::Messages));
        assert_eq!(
            route("/api/v1/users/al%20ice/messages"),
            Some(Route::UserMessages("al%20ice"))
        );
        assert_eq!(route("/api/v1/users/a/b/messages"), None);
        assert_eq!(route("/api/v1/users/messages"), None);
        assert_eq!(route("/api/v2/messages"), None);
    }

    #[test]
    fn percent_decoding() {
        assert_eq!(percent_decode("alice").as_deref(), Some("alice"));
        assert_eq!(percent_decode("a%2Fb%20c").as_deref(), Some("a/b c"));
        assert_eq!(percent_decode("%C3%A9").as_deref(), Some("é"));
        assert_eq!(percent_decode("%"), None);
        assert_eq!(percent_decode("%zz"), None);
        assert_eq!(percent_decode("%FF"), None);
    }

    #[test]
    fn token_comparison() {
        assert!(constant_time_eq(b"secret", b"secret"));
        assert!(!constant_time_eq(b"secret", b"secreT"));
        assert!(!constant_time_eq(b"secret", b"secret2"));
        assert!(!constant_time_eq(b"", b"x"));
    }

    #[test]
    fn header_names() {
        assert!(check_header_name("x-trace").is_ok());
        assert!(check_header_name("").is_err());
        assert!(check_header_name("a:b").is_err());
        assert!(check_header_name("a\nb").is_err());
        assert!(check_header_name("stomp-user").is_err());
        assert!(check_header_name("Destination").is_err());
        assert!(check_header_name(&"h".repeat(256)).is_err());
    }

    #[test]
    fn status_mapping() {
        assert_eq!(
            publish_status(&PublishError::Unavailable("x".into())),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            publish_status(&PublishError::Overloaded),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            publish_status(&PublishError::Timeout),
            StatusCode::SERVICE_UNAVAILABLE
        );
        assert_eq!(
            publish_status(&PublishError::Unroutable {
                exchange: String::new(),
                routing_key: "q".into()
            }),
            StatusCode::UNPROCESSABLE_ENTITY
        );
        assert_eq!(
            publish_status(&PublishError::Rejected("NOT_FOUND".into())),
            StatusCode::UNPROCESSABLE_ENTITY
        );
    }
}
