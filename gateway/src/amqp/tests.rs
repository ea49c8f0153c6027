//! Control plane tests against the local RabbitMQ.
#![allow(clippy::unwrap_used)]

use super::*;
use crate::config::{BindingDecl, ExchangeDecl, QueueDecl};
use lapin::options::{BasicGetOptions, ExchangeDeleteOptions, QueueDeleteOptions};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

pub(crate) const AMQP_URL: &str = "amqp://guest:guest@127.0.0.1:5672/%2f";

/// Starts a control plane on `config` (already valid).
pub(crate) async fn start(
    config: Arc<Config>,
    health: Arc<Health>,
    shutdown: watch::Receiver<bool>,
) -> Result<ControlPlane, ControlPlaneError> {
    let settings = Settings::build(config).expect("usable settings");
    let metrics = Arc::new(crate::metrics::Metrics::new("test").expect("metrics"));
    ControlPlane::start(&settings, health, metrics, shutdown).await
}

/// [`start`] with an explicit pod id (several gateways in one process).
async fn start_as(
    config: Arc<Config>,
    health: Arc<Health>,
    shutdown: watch::Receiver<bool>,
    pod: String,
) -> Result<ControlPlane, ControlPlaneError> {
    let mut settings = Settings::build(config).expect("usable settings");
    settings.pod = pod;
    let metrics = Arc::new(crate::metrics::Metrics::new("test").expect("metrics"));
    ControlPlane::start(&settings, health, metrics, shutdown).await
}

/// A name no other test (or engineer) uses.
pub(crate) fn unique(what: &str) -> String {
    format!("sg-test-{what}-{:016x}", rand::random::<u64>())
}

/// A config pointing at the local RabbitMQ with unique app/user exchanges.
pub(crate) fn test_config() -> Config {
    let mut c = Config::default();
    c.amqp.url = AMQP_URL.into();
    c.amqp.pool_size = 2;
    c.amqp.publish_timeout_ms = 5_000;
    c.app.exchange = unique("app");
    c.user.exchange = unique("user");
    c
}

pub(crate) async fn admin_connection() -> Connection {
    Connection::connect(AMQP_URL, ConnectionProperties::default())
        .await
        .expect("test connection to RabbitMQ")
}

/// Deletes exchanges and queues (ignoring missing ones), each on its own
/// channel since a failure closes the channel.
pub(crate) async fn cleanup(exchanges: &[String], queues: &[String]) {
    let conn = admin_connection().await;
    for q in queues {
        let ch = conn.create_channel().await.unwrap();
        let _ = ch
            .queue_delete(q.as_str().into(), QueueDeleteOptions::default())
            .await;
    }
    for x in exchanges {
        let ch = conn.create_channel().await.unwrap();
        let _ = ch
            .exchange_delete(x.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
    let _ = conn.close(200, "OK".into()).await;
}

/// Runs `test` (at most 90 s), then deletes `exchanges` and `queues`
/// whether it passed or not, then reports its outcome.
pub(crate) async fn with_cleanup<F>(exchanges: Vec<String>, queues: Vec<String>, test: F)
where
    F: std::future::Future<Output = ()> + Send + 'static,
{
    let outcome = tokio::time::timeout(Duration::from_secs(90), tokio::spawn(test)).await;
    cleanup(&exchanges, &queues).await;
    match outcome {
        Ok(Ok(())) => {}
        Ok(Err(e)) => std::panic::resume_unwind(e.into_panic()),
        Err(_) => panic!("test timed out"),
    }
}

async fn exchange_exists(conn: &Connection, name: &str) -> bool {
    let ch = conn.create_channel().await.unwrap();
    ch.exchange_declare(
        name.into(),
        ExchangeKind::Direct,
        ExchangeDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .is_ok()
}

async fn queue_exists(conn: &Connection, name: &str) -> bool {
    let ch = conn.create_channel().await.unwrap();
    ch.queue_declare(
        name.into(),
        QueueDeclareOptions {
            passive: true,
            ..Default::default()
        },
        FieldTable::default(),
    )
    .await
    .is_ok()
}

/// GET on the management API with guest:guest; (status, body).
pub(crate) async fn management_get(path: &str) -> (u16, String) {
    management("GET", path).await
}

/// A body-less request to the management API with guest:guest.
pub(crate) async fn management(method: &str, path: &str) -> (u16, String) {
    let mut s = tokio::net::TcpStream::connect("127.0.0.1:15672")
        .await
        .expect("management API");
    // guest:guest
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: 127.0.0.1:15672\r\nAuthorization: Basic Z3Vlc3Q6Z3Vlc3Q=\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
    );
    s.write_all(req.as_bytes()).await.unwrap();
    let mut raw = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), s.read_to_end(&mut raw))
        .await
        .unwrap()
        .unwrap();
    let text = String::from_utf8_lossy(&raw).into_owned();
    let status = text
        .split(' ')
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(0);
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_owned())
        .unwrap_or_default();
    (status, body)
}

/// Fetches one message from `queue`, waiting up to 5 s.
pub(crate) async fn get_one(conn: &Connection, queue: &str) -> lapin::message::Delivery {
    let ch = conn.create_channel().await.unwrap();
    for _ in 0..100 {
        if let Some(m) = ch
            .basic_get(queue.into(), BasicGetOptions { no_ack: true })
            .await
            .unwrap()
        {
            return m.delivery;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("no message on {queue}");
}

fn args(pairs: &[(&str, ArgValue)]) -> Arguments {
    pairs
        .iter()
        .map(|(k, v)| ((*k).to_owned(), v.clone()))
        .collect()
}

#[test]
fn pod_id_comes_from_the_config() {
    let mut c = Config::default();
    let id = c.pod_id();
    assert!(!id.is_empty() && id.len() <= 100);
    c.server.pod_id = "gw-1".into();
    assert_eq!(c.pod_id(), "gw-1");
}

#[tokio::test]
async fn topology_is_declared_idempotently_and_conflicts_are_fatal() {
    let mut c = test_config();
    let exchange = unique("ex");
    let exchange2 = unique("ex2");
    let headers = unique("hdr");
    let queue = unique("q");
    let hqueue = unique("hq");
    c.topology.exchanges = vec![
        ExchangeDecl {
            name: exchange.clone(),
            ..Default::default()
        },
        ExchangeDecl {
            name: exchange2.clone(),
            kind: ExchangeType::Fanout,
            ..Default::default()
        },
        ExchangeDecl {
            name: headers.clone(),
            kind: ExchangeType::Headers,
            ..Default::default()
        },
    ];
    c.topology.queues = vec![
        QueueDecl {
            name: queue.clone(),
            arguments: args(&[
                ("x-queue-type", ArgValue::String("quorum".into())),
                ("x-message-ttl", ArgValue::Int(60_000)),
            ]),
            ..Default::default()
        },
        QueueDecl {
            name: hqueue.clone(),
            auto_delete: true,
            durable: false,
            ..Default::default()
        },
    ];
    c.topology.bindings = vec![
        BindingDecl {
            exchange: exchange.clone(),
            queue: queue.clone(),
            routing_key: "room.*".into(),
            ..Default::default()
        },
        BindingDecl {
            exchange: exchange.clone(),
            destination_exchange: exchange2.clone(),
            routing_key: "audit.#".into(),
            ..Default::default()
        },
        BindingDecl {
            exchange: headers.clone(),
            queue: hqueue.clone(),
            arguments: args(&[
                ("x-match", ArgValue::String("any".into())),
                ("kind", ArgValue::String("alert".into())),
            ]),
            ..Default::default()
        },
    ];
    c.validate().expect("test topology is valid");
    let all_exchanges = vec![
        exchange.clone(),
        exchange2.clone(),
        headers.clone(),
        c.app.exchange.clone(),
        c.user.exchange.clone(),
    ];
    let all_queues = vec![queue.clone(), hqueue.clone()];
    let (xs, qs) = (all_exchanges.clone(), all_queues.clone());

    with_cleanup(all_exchanges, all_queues, async move {
        let health = Arc::new(Health::new());
        let (_tx, rx) = watch::channel(false);
        let config = Arc::new(c.clone());
        let cp = start(config.clone(), health.clone(), rx.clone())
            .await
            .expect("first start declares");
        assert!(cp.is_up());
        assert!(health.amqp_up());

        let conn = admin_connection().await;
        for x in &xs {
            assert!(exchange_exists(&conn, x).await, "exchange {x}");
        }
        for q in &qs {
            assert!(queue_exists(&conn, q).await, "queue {q}");
        }
        let (status, body) =
            management_get(&format!("/api/bindings/%2f/e/{exchange}/q/{queue}")).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("room.*"), "{body}");
        let (status, body) =
            management_get(&format!("/api/bindings/%2f/e/{exchange}/e/{exchange2}")).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("audit.#"), "{body}");
        let (status, body) =
            management_get(&format!("/api/bindings/%2f/e/{headers}/q/{hqueue}")).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"x-match\":\"any\""), "{body}");
        let (status, body) = management_get(&format!("/api/queues/%2f/{queue}")).await;
        assert_eq!(status, 200, "{body}");
        assert!(body.contains("\"x-queue-type\":\"quorum\""), "{body}");
        assert!(body.contains("\"x-message-ttl\":60000"), "{body}");

        // Same config again: a no-op.
        let cp2 = start(config.clone(), Arc::new(Health::new()), rx.clone())
            .await
            .expect("second start is a no-op");
        assert!(cp2.is_up());

        // A queue's durable flag flipped: a conflict naming the queue.
        for (i, name) in [(0, &queue), (1, &hqueue)] {
            let mut flipped = c.clone();
            flipped.topology.queues[i].durable = !flipped.topology.queues[i].durable;
            let e = start(Arc::new(flipped), Arc::new(Health::new()), rx.clone())
                .await
                .expect_err("conflict");
            let text = e.to_string();
            assert!(matches!(e, ControlPlaneError::Conflict { .. }), "{e:?}");
            assert!(text.contains(&format!("queue '{name}'")), "{text}");
            assert!(text.contains("durable"), "{text}");
        }
        // A different argument is a conflict too.
        let mut ttl = c.clone();
        ttl.topology.queues[0]
            .arguments
            .insert("x-message-ttl".into(), ArgValue::Int(1_000));
        let e = start(Arc::new(ttl), Arc::new(Health::new()), rx.clone())
            .await
            .expect_err("conflict");
        assert!(e.to_string().contains("x-message-ttl"), "{e}");

        // A binding to a missing exchange: a declaration error.
        let mut missing = c.clone();
        missing.topology.bindings[0].exchange = unique("missing");
        let e = start(Arc::new(missing), Arc::new(Health::new()), rx.clone())
            .await
            .expect_err("missing exchange");
        assert!(matches!(e, ControlPlaneError::Declare { .. }), "{e:?}");
        assert!(e.to_string().contains("NOT_FOUND"), "{e}");
        let _ = conn.close(200, "OK".into()).await;
    })
    .await;
}

#[tokio::test]
async fn publish_confirms_returns_and_rejections() {
    let mut c = test_config();
    let exchange = unique("pubex");
    let queue = unique("pubq");
    c.topology.exchanges = vec![ExchangeDecl {
        name: exchange.clone(),
        durable: false,
        auto_delete: false,
        ..Default::default()
    }];
    c.topology.queues = vec![QueueDecl {
        name: queue.clone(),
        durable: false,
        ..Default::default()
    }];
    c.topology.bindings = vec![BindingDecl {
        exchange: exchange.clone(),
        queue: queue.clone(),
        routing_key: "room.*".into(),
        ..Default::default()
    }];
    let all_exchanges = vec![
        exchange.clone(),
        c.app.exchange.clone(),
        c.user.exchange.clone(),
    ];
    let all_queues = vec![queue.clone()];
    with_cleanup(all_exchanges, all_queues, async move {
        let (_tx, rx) = watch::channel(false);
        let cp = start(Arc::new(c), Arc::new(Health::new()), rx)
            .await
            .expect("start");
        let msg = |rk: &str, mandatory: bool| OutboundMessage {
            exchange: exchange.clone(),
            routing_key: rk.into(),
            headers: vec![
                ("x-custom".into(), "v1".into()),
                ("k2".into(), "v 2".into()),
            ],
            content_type: Some("application/json".into()),
            message_id: None,
            body: Bytes::from_static(br#"{"text":"hi"}"#),
            mandatory,
            persistent: true,
            properties: None,
        };
        // Ack, then read it back.
        cp.publish(msg("room.1", true)).await.expect("acked");
        let conn = admin_connection().await;
        let d = get_one(&conn, &queue).await;
        assert_eq!(d.data, br#"{"text":"hi"}"#);
        let p = &d.properties;
        assert_eq!(
            p.content_type().as_ref().map(|s| s.as_str()),
            Some("application/json")
        );
        assert_eq!(p.app_id().as_ref().map(|s| s.as_str()), Some(cp.pod_id()));
        let id = p
            .message_id()
            .as_ref()
            .map(|s| s.as_str().to_owned())
            .unwrap();
        assert!(id.starts_with(cp.pod_id()), "{id}");
        assert_eq!(*p.delivery_mode(), Some(2));
        assert!(p.timestamp().unwrap() > 1_600_000_000);
        let headers = p.headers().as_ref().unwrap();
        assert_eq!(
            headers.inner().get("x-custom"),
            Some(&AMQPValue::LongString("v1".into()))
        );
        assert_eq!(
            headers.inner().get("k2"),
            Some(&AMQPValue::LongString("v 2".into()))
        );

        // An explicit message id is kept.
        let mut m = msg("room.2", true);
        m.message_id = Some("fixed-id-1".into());
        m.persistent = false;
        cp.publish(m).await.expect("acked");
        let d = get_one(&conn, &queue).await;
        assert_eq!(
            d.properties.message_id().as_ref().map(|s| s.as_str()),
            Some("fixed-id-1")
        );
        assert_eq!(*d.properties.delivery_mode(), None);

        // Mandatory and unbound: unroutable. Not mandatory: fine.
        let e = cp
            .publish(msg("nobody.home", true))
            .await
            .expect_err("returned");
        assert_eq!(
            e,
            PublishError::Unroutable {
                exchange: exchange.clone(),
                routing_key: "nobody.home".into()
            }
        );
        assert!(e.to_string().contains("no queue is bound"), "{e}");
        cp.publish(msg("nobody.home", false))
            .await
            .expect("dropped quietly");

        // A missing exchange: rejected, and publishing goes on.
        let mut m = msg("x", false);
        m.exchange = unique("no-such-exchange");
        for _ in 0..3 {
            let e = cp.publish(m.clone()).await.expect_err("no exchange");
            assert!(matches!(e, PublishError::Rejected(_)), "{e:?}");
            assert!(e.to_string().contains("NOT_FOUND"), "{e}");
        }
        for i in 0..4 {
            cp.publish(msg(&format!("room.after{i}"), true))
                .await
                .expect("channel still works");
        }
        // Over-long names are rejected, not a panic.
        let mut m = msg("x", false);
        m.routing_key = "k".repeat(300);
        assert!(matches!(
            cp.publish(m).await,
            Err(PublishError::Rejected(_))
        ));
        let mut m = msg("room.1", false);
        m.headers = vec![("h".repeat(256), "v".into())];
        assert!(matches!(
            cp.publish(m).await,
            Err(PublishError::Rejected(_))
        ));
        let _ = conn.close(200, "OK".into()).await;
    })
    .await;
}

#[tokio::test]
async fn channel_closed_by_the_broker_is_replaced() {
    let mut c = test_config();
    c.amqp.pool_size = 1;
    let exchange = unique("gone");
    let queue = unique("goneq");
    c.topology.exchanges = vec![ExchangeDecl {
        name: exchange.clone(),
        durable: false,
        ..Default::default()
    }];
    c.topology.queues = vec![QueueDecl {
        name: queue.clone(),
        durable: false,
        ..Default::default()
    }];
    let xs = vec![
        exchange.clone(),
        c.app.exchange.clone(),
        c.user.exchange.clone(),
    ];
    with_cleanup(xs, vec![queue.clone()], async move {
        let (_tx, rx) = watch::channel(false);
        let cp = start(Arc::new(c), Arc::new(Health::new()), rx)
            .await
            .expect("start");
        let msg = |exchange: &str, rk: &str| OutboundMessage {
            exchange: exchange.into(),
            routing_key: rk.into(),
            headers: vec![],
            content_type: None,
            message_id: None,
            body: Bytes::from_static(b"x"),
            mandatory: false,
            persistent: false,
            properties: None,
        };
        cp.publish(msg(&exchange, "a"))
            .await
            .expect("exchange exists");
        // Deleted behind the gateway's back: no check happens for a
        // declared exchange, so the broker closes the shared channel.
        cleanup(std::slice::from_ref(&exchange), &[]).await;
        let e = cp.publish(msg(&exchange, "a")).await.expect_err("gone");
        assert!(matches!(e, PublishError::Rejected(_)), "{e:?}");
        assert!(e.to_string().contains("NOT_FOUND"), "{e}");
        // The channel is replaced on the next publish.
        let mut m = msg("", &queue);
        m.mandatory = true;
        cp.publish(m).await.expect("new channel");
    })
    .await;
}

/// The management API's name of the connection whose client-provided
/// name is `connection_name` (waits for it to show up).
async fn connection_named(connection_name: &str) -> String {
    for _ in 0..100 {
        let (_, body) =
            management_get("/api/connections?columns=name,client_properties.connection_name").await;
        let list: serde_json::Value = serde_json::from_str(&body).unwrap_or_default();
        if let Some(found) =
            list.as_array().into_iter().flatten().find(|c| {
                c["client_properties"]["connection_name"].as_str() == Some(connection_name)
            })
        {
            return found["name"].as_str().unwrap().to_owned();
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    panic!("no connection named {connection_name:?}");
}

fn url_encode(s: &str) -> String {
    use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
    const UNRESERVED: &percent_encoding::AsciiSet = &NON_ALPHANUMERIC
        .remove(b'-')
        .remove(b'.')
        .remove(b'_')
        .remove(b'~');
    utf8_percent_encode(s, UNRESERVED).to_string()
}

#[tokio::test]
async fn reconnects_and_declares_again_after_the_connection_is_lost() {
    let mut c = test_config();
    c.amqp.reconnect_initial_ms = 50;
    c.amqp.reconnect_max_ms = 200;
    let queue = unique("reconq");
    c.topology.queues = vec![QueueDecl {
        name: queue.clone(),
        durable: false,
        ..Default::default()
    }];
    let app_exchange = c.app.exchange.clone();
    let xs = vec![c.app.exchange.clone(), c.user.exchange.clone()];
    with_cleanup(xs, vec![queue.clone()], async move {
        let pod = unique("pod");
        let health = Arc::new(Health::new());
        let (tx, rx) = watch::channel(false);
        let cp = start_as(Arc::new(c), health.clone(), rx, pod.clone())
            .await
            .expect("start");
        assert!(cp.is_up());
        let name = connection_named(&format!("stomp-gateway {pod} control")).await;
        // Someone deletes the app exchange; then the connection drops.
        cleanup(std::slice::from_ref(&app_exchange), &[]).await;
        let (status, body) =
            management("DELETE", &format!("/api/connections/{}", url_encode(&name))).await;
        assert!(status == 204 || status == 200, "{status} {body}");
        let mut saw_down = false;
        for _ in 0..200 {
            if !cp.is_up() {
                saw_down = true;
            }
            if saw_down && cp.is_up() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        assert!(saw_down, "the loss was noticed");
        assert!(cp.is_up(), "reconnected");
        assert!(health.amqp_up());
        assert!(
            health
                .amqp_last_error()
                .unwrap()
                .contains("connection lost"),
            "{:?}",
            health.amqp_last_error()
        );
        let conn = admin_connection().await;
        assert!(
            exchange_exists(&conn, &app_exchange).await,
            "declared again"
        );
        let _ = conn.close(200, "OK".into()).await;
        // Publishing works on fresh channels.
        cp.publish(OutboundMessage {
            exchange: String::new(),
            routing_key: queue.clone(),
            headers: vec![],
            content_type: None,
            message_id: None,
            body: Bytes::from_static(b"again"),
            mandatory: true,
            persistent: false,
            properties: None,
        })
        .await
        .expect("publish after reconnect");
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(15), cp.closed())
            .await
            .expect("closed");
        assert!(!cp.is_up());
    })
    .await;
}

#[tokio::test]
async fn overloaded_when_inflight_limit_is_reached() {
    let mut c = test_config();
    c.amqp.max_inflight_publishes = 1;
    let queue = unique("ovq");
    c.topology.queues = vec![QueueDecl {
        name: queue.clone(),
        durable: false,
        ..Default::default()
    }];
    let xs = vec![c.app.exchange.clone(), c.user.exchange.clone()];
    let q2 = queue.clone();
    with_cleanup(xs, vec![queue], async move {
        let (_tx, rx) = watch::channel(false);
        let cp = start(Arc::new(c), Arc::new(Health::new()), rx)
            .await
            .expect("start");
        let msg = OutboundMessage {
            exchange: String::new(),
            routing_key: q2,
            headers: vec![],
            content_type: None,
            message_id: None,
            body: Bytes::from_static(b"x"),
            mandatory: true,
            persistent: false,
            properties: None,
        };
        let (a, b) = tokio::join!(cp.publish(msg.clone()), cp.publish(msg.clone()));
        let results = [a, b];
        assert!(results.iter().any(|r| r.is_ok()), "{results:?}");
        assert!(
            results.contains(&Err(PublishError::Overloaded)),
            "{results:?}"
        );
        cp.publish(msg)
            .await
            .expect("permit released after the confirm");
    })
    .await;
}

#[tokio::test]
async fn fails_over_to_the_next_url_and_names_the_node() {
    let mut c = test_config();
    c.amqp.url = "amqp://guest:guest@127.0.0.1:1/%2f".into();
    c.amqp.failover_urls = vec![AMQP_URL.into()];
    c.amqp.pool_size = 1;
    let xs = vec![c.app.exchange.clone(), c.user.exchange.clone()];
    with_cleanup(xs, vec![], async move {
        let health = Arc::new(Health::new());
        let (tx, rx) = watch::channel(false);
        let cp = start(Arc::new(c), health.clone(), rx).await.expect("start");
        assert!(cp.is_up());
        assert_eq!(
            health.amqp_node().as_deref(),
            Some("amqp://guest:******@127.0.0.1:5672/%2f")
        );
        assert_eq!(
            health.details()["amqp"]["node"],
            "amqp://guest:******@127.0.0.1:5672/%2f"
        );
        assert_eq!(health.pod_id().as_deref(), Some(cp.pod_id()));
        // The publish pool fails over too.
        cp.publish(OutboundMessage {
            exchange: "amq.topic".into(),
            routing_key: "sg-test.failover".into(),
            headers: vec![],
            content_type: None,
            message_id: None,
            body: Bytes::from_static(b"x"),
            mandatory: false,
            persistent: false,
            properties: None,
        })
        .await
        .expect("published through the failover node");
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(15), cp.closed())
            .await
            .expect("closed");
    })
    .await;
}

/// Needs RabbitMQ's AMQP port 5672, reached through an in-process TLS
/// terminator.
#[tokio::test]
async fn connects_over_tls_with_the_configured_ca() {
    use crate::tls::tests::{test_pki, tls_terminator, Dir};
    let dir = Dir::new("amqps");
    let pki = test_pki(&["127.0.0.1"]);
    let addr = tls_terminator(&pki, "127.0.0.1:5672").await;
    let mut c = test_config();
    c.amqp.url = format!("amqps://guest:guest@{addr}/%2f");
    c.amqp.pool_size = 1;
    c.amqp.tls.ca_file = dir.write("ca.pem", &pki.ca_pem);
    let untrusted = {
        let mut u = c.clone();
        let other = test_pki(&["127.0.0.1"]);
        u.amqp.tls.ca_file = dir.write("other.pem", &other.ca_pem);
        u.amqp.reconnect_initial_ms = 50;
        u.amqp.reconnect_max_ms = 100;
        u
    };
    let xs = vec![c.app.exchange.clone(), c.user.exchange.clone()];
    with_cleanup(xs, vec![], async move {
        let health = Arc::new(Health::new());
        let (tx, rx) = watch::channel(false);
        let cp = start(Arc::new(c), health.clone(), rx).await.expect("start");
        assert!(cp.is_up(), "{}", health.details());
        assert_eq!(
            health.amqp_node(),
            Some(format!("amqps://guest:******@{addr}/%2f"))
        );
        cp.publish(OutboundMessage {
            exchange: "amq.topic".into(),
            routing_key: "sg-test.tls".into(),
            headers: vec![],
            content_type: None,
            message_id: None,
            body: Bytes::from_static(b"x"),
            mandatory: false,
            persistent: false,
            properties: None,
        })
        .await
        .expect("published over TLS");
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(15), cp.closed())
            .await
            .expect("closed");

        // Another CA: not up, and the reason is the certificate.
        let health = Arc::new(Health::new());
        let (tx, rx) = watch::channel(false);
        let cp = start(Arc::new(untrusted), health.clone(), rx)
            .await
            .expect("an untrusted certificate is not fatal");
        assert!(!cp.is_up());
        let e = health.amqp_last_error().unwrap_or_default();
        assert!(e.to_lowercase().contains("certificate"), "{e}");
        assert!(!e.contains("guest:guest"), "{e}");
        tx.send(true).unwrap();
        tokio::time::timeout(Duration::from_secs(15), cp.closed())
            .await
            .expect("closed");
    })
    .await;
}

#[tokio::test]
async fn unreachable_broker_starts_down_and_publishes_fail_fast() {
    let mut c = test_config();
    // Nothing listens here (port 1 is tcpmux, not served).
    c.amqp.url = "amqp://guest:guest@127.0.0.1:1/%2f".into();
    c.amqp.reconnect_initial_ms = 50;
    c.amqp.reconnect_max_ms = 100;
    let health = Arc::new(Health::new());
    health.set_system_link_up("127.0.0.1:61613");
    let (tx, rx) = watch::channel(false);
    let started = Instant::now();
    let cp = start(Arc::new(c), health.clone(), rx)
        .await
        .expect("unreachable is not fatal");
    assert!(started.elapsed() < Duration::from_secs(3));
    assert!(!cp.is_up());
    assert!(!health.is_ready());
    assert!(health.amqp_last_error().is_some());
    let e = cp
        .publish(OutboundMessage {
            exchange: "amq.topic".into(),
            routing_key: "x".into(),
            headers: vec![],
            content_type: None,
            message_id: None,
            body: Bytes::new(),
            mandatory: false,
            persistent: false,
            properties: None,
        })
        .await
        .expect_err("down");
    assert!(matches!(e, PublishError::Unavailable(_)), "{e:?}");
    // Still retrying; shutdown stops it.
    tokio::time::sleep(Duration::from_millis(300)).await;
    tx.send(true).unwrap();
    tokio::time::timeout(Duration::from_secs(5), cp.closed())
        .await
        .expect("closed after shutdown");
}
