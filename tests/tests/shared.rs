//! The shared fan-out upstream (`stomp_gateway::fanout`) against the real
//! RabbitMQ: one pod queue, bindings that follow references, re-binding
//! after the connection is closed, and MESSAGE frames identical to what the
//! STOMP plugin sends for the same AMQP message.
//!
//! These drive the upstream module directly; the same paths through a
//! running gateway come with the session broker seam.

use anyhow::{bail, Context, Result};
use bytes::BytesMut;
use e2e::amqp::{Amqp, AMQP_URL};
use e2e::rabbit::management_get;
use e2e::{unique, Command, StompClient, Version, WAIT};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::{BasicProperties, Connection, ConnectionProperties};
use relay_core::hub::SharedMessage;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;
use stomp_gateway::fanout::upstream::{Connect, PodUpstream, Sink, UpstreamSettings};
use tokio::sync::{mpsc, watch};

/// What the upstream handed to the hub.
#[derive(Debug)]
enum Event {
    Message(String, String, Arc<SharedMessage>),
    Lost,
    Restored,
}

#[derive(Debug)]
struct Collect(Mutex<mpsc::UnboundedSender<Event>>);

impl Sink for Collect {
    fn deliver(&self, exchange: &str, routing_key: &str, message: Arc<SharedMessage>) {
        let _ = self.0.lock().expect("lock").send(Event::Message(
            exchange.into(),
            routing_key.into(),
            message,
        ));
    }
    fn upstream_lost(&self, _reason: &str) {
        let _ = self.0.lock().expect("lock").send(Event::Lost);
    }
    fn upstream_restored(&self, _gap: Duration) {
        let _ = self.0.lock().expect("lock").send(Event::Restored);
    }
}

struct Pod {
    upstream: PodUpstream,
    events: mpsc::UnboundedReceiver<Event>,
    name: String,
    _stop: watch::Sender<bool>,
}

fn start(unbind_delay: Duration) -> Pod {
    let name = unique("shared-upstream");
    let (tx, events) = mpsc::unbounded_channel();
    let (stop, shutdown) = watch::channel(false);
    let conn_name = name.clone();
    let connect: Connect = Arc::new(move || {
        let props = ConnectionProperties::default().with_connection_name(conn_name.clone().into());
        Box::pin(async move {
            Connection::connect(AMQP_URL, props)
                .await
                .map_err(|e| e.to_string())
        })
    });
    let upstream = PodUpstream::start(
        UpstreamSettings {
            name: name.clone(),
            queue_prefix: format!("{}{name}-", relay_core::router::SHARED_QUEUE_PREFIX),
            unbind_delay,
            reconnect_initial: Duration::from_millis(100),
            reconnect_max: Duration::from_secs(1),
        },
        connect,
        Arc::new(Collect(Mutex::new(tx))),
        shutdown,
    );
    Pod {
        upstream,
        events,
        name,
        _stop: stop,
    }
}

impl Pod {
    async fn next(&mut self) -> Result<Event> {
        tokio::time::timeout(WAIT, self.events.recv())
            .await
            .context("no upstream event within the wait")?
            .context("upstream stopped")
    }

    async fn next_message(&mut self) -> Result<(String, String, Arc<SharedMessage>)> {
        loop {
            if let Event::Message(x, k, m) = self.next().await? {
                return Ok((x, k, m));
            }
        }
    }

    async fn bind_ok(&self, exchange: &str, pattern: &str) -> Result<()> {
        tokio::time::timeout(WAIT, self.upstream.bind(exchange, pattern))
            .await
            .context("bind timed out")?
            .with_context(|| format!("bind {exchange} {pattern}"))
    }

    async fn queue(&self) -> Result<String> {
        let deadline = tokio::time::Instant::now() + WAIT;
        loop {
            if let Some(q) = self.upstream.status().queue {
                return Ok(q);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("upstream not up: {:?}", self.upstream.status());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

/// Routing keys bound to `queue` from `exchange`, via the management API.
async fn bound_keys(queue: &str, exchange: &str) -> Result<Vec<String>> {
    let v = management_get(&format!("/api/queues/%2F/{queue}/bindings")).await?;
    let mut keys: Vec<String> = v
        .as_array()
        .context("bindings array")?
        .iter()
        .filter(|b| b["source"] == exchange)
        .filter_map(|b| b["routing_key"].as_str().map(str::to_owned))
        .collect();
    keys.sort();
    Ok(keys)
}

async fn wait_bound_keys(queue: &str, exchange: &str, want: &[&str]) -> Result<()> {
    let deadline = tokio::time::Instant::now() + WAIT;
    loop {
        let keys = bound_keys(queue, exchange).await?;
        if keys == want {
            return Ok(());
        }
        if tokio::time::Instant::now() > deadline {
            bail!("bindings of {queue} from {exchange}: {keys:?}, wanted {want:?}");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn message_fields_match_the_stomp_plugin() -> Result<()> {
    let mut pod = start(Duration::from_millis(200));
    let prefix = unique("fields");
    let destination = format!("/topic/{prefix}.*");
    pod.bind_ok("amq.topic", &format!("{prefix}.*")).await?;

    // The same subscription through the STOMP plugin (Web-STOMP listener).
    let mut direct = StompClient::connect_ws("ws://127.0.0.1:15674/ws", &["v12.stomp"]).await?;
    direct
        .connect_stomp(Version::V1_2, Some("guest"), Some("guest"), (0, 0))
        .await?;
    direct.subscribe(&destination, "sub-1", &[]).await?;

    let mut table = FieldTable::default();
    table.insert(
        "x-str".into(),
        AMQPValue::LongString(LongString::from("a:b\\c\nd")),
    );
    table.insert("x-int".into(), AMQPValue::LongInt(42));
    table.insert("x-float".into(), AMQPValue::Double(1.5));
    table.insert("x-bool".into(), AMQPValue::Boolean(true));
    let props = BasicProperties::default()
        .with_content_type("text/plain".into())
        .with_content_encoding("identity".into())
        .with_delivery_mode(2)
        .with_priority(3)
        .with_correlation_id("corr-1".into())
        .with_reply_to("amq.gen-reply".into())
        .with_expiration("60000".into())
        .with_message_id("amqp-id-1".into())
        .with_timestamp(1_700_000_000)
        .with_type("kind-1".into())
        .with_app_id("app-1".into())
        .with_headers(table);
    let amqp = Amqp::connect().await?;
    amqp.publish(
        "amq.topic",
        &format!("{prefix}.one"),
        b"hello \0 world",
        props,
    )
    .await?;

    let plugin = direct.expect(Command::Message, WAIT).await?;
    let (exchange, key, shared) = pod.next_message().await?;
    assert_eq!(
        (exchange.as_str(), key.as_str()),
        ("amq.topic", &*format!("{prefix}.one"))
    );
    let mut out = BytesMut::new();
    shared.write(Version::V1_2, "sub-1", "gw-1", None, &mut out);
    let mut decoder = relay_core::Decoder::default();
    decoder.extend(&out);
    let ours = match decoder.decode()? {
        Some(relay_core::Item::Frame(f)) => f,
        other => bail!("not a frame: {other:?}"),
    };

    let fields = |f: &relay_core::Frame| -> BTreeMap<String, String> {
        f.headers
            .iter()
            .filter(|(k, _)| k != "message-id")
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect()
    };
    let (theirs, mine) = (fields(&plugin), fields(&ours));
    for (k, v) in &theirs {
        assert_eq!(
            mine.get(k),
            Some(v),
            "header {k}: plugin {v:?}, ours {:?}",
            mine.get(k)
        );
    }
    for (k, v) in &mine {
        assert_eq!(
            theirs.get(k),
            Some(v),
            "header {k}: ours {v:?}, plugin {:?}",
            theirs.get(k)
        );
    }
    assert!(ours.header("message-id").is_some() && plugin.header("message-id").is_some());
    assert_eq!(ours.body, plugin.body);
    // The checks above would pass on two empty frames: make sure they were not.
    for name in [
        "destination",
        "subscription",
        "content-type",
        "content-length",
        "redelivered",
        "persistent",
        "x-str",
        "x-int",
        "reply-to",
    ] {
        assert!(
            theirs.contains_key(name),
            "the plugin sent no {name}: {plugin:?}"
        );
    }
    direct.close().await;
    amqp.close().await;
    Ok(())
}

#[tokio::test]
async fn bindings_follow_references_and_go_after_the_last() -> Result<()> {
    let pod = start(Duration::from_millis(300));
    let p = unique("bindings");
    let (a, b) = (format!("{p}.a"), format!("{p}.#"));
    pod.bind_ok("amq.topic", &a).await?;
    pod.bind_ok("amq.topic", &a).await?;
    pod.bind_ok("amq.topic", &b).await?;
    let queue = pod.queue().await?;
    let mut both = vec![a.as_str(), b.as_str()];
    both.sort();
    wait_bound_keys(&queue, "amq.topic", &both).await?;
    // One of two references to `a` goes: still bound.
    pod.upstream.unbind("amq.topic", &a);
    pod.upstream.unbind("amq.topic", &b);
    tokio::time::sleep(Duration::from_millis(800)).await;
    wait_bound_keys(&queue, "amq.topic", &[a.as_str()]).await?;
    assert_eq!(pod.upstream.status().bindings, 1);
    // Leaving and coming back within the delay costs RabbitMQ nothing.
    pod.upstream.unbind("amq.topic", &a);
    pod.bind_ok("amq.topic", &a).await?;
    tokio::time::sleep(Duration::from_millis(800)).await;
    wait_bound_keys(&queue, "amq.topic", &[a.as_str()]).await?;
    pod.upstream.unbind("amq.topic", &a);
    wait_bound_keys(&queue, "amq.topic", &[]).await?;
    assert_eq!(pod.upstream.status().bindings, 0);
    // A binding RabbitMQ refuses is an error for that bind only.
    let missing = unique("no-such-exchange");
    assert!(pod.upstream.bind(&missing, "x").await.is_err());
    pod.bind_ok("amq.topic", &a).await?;
    wait_bound_keys(&queue, "amq.topic", &[a.as_str()]).await?;
    Ok(())
}

#[tokio::test]
async fn rebinds_after_its_connection_is_closed() -> Result<()> {
    let mut pod = start(Duration::from_millis(100));
    let p = unique("rebind");
    let key = format!("{p}.x");
    pod.bind_ok("amq.topic", &key).await?;
    let first_queue = pod.queue().await?;
    let amqp = Amqp::connect().await?;
    amqp.publish("amq.topic", &key, b"before", BasicProperties::default())
        .await?;
    let (_, _, m) = pod.next_message().await?;
    assert_eq!(&m.body()[..], b"before");

    // Close the pod's connection the way an operator (or a node restart) would.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(20);
    let conn_name = loop {
        let conns = management_get("/api/connections").await?;
        let found = conns.as_array().and_then(|a| {
            a.iter()
                .find(|c| c["client_properties"]["connection_name"] == pod.name.as_str())
                .and_then(|c| c["name"].as_str().map(str::to_owned))
        });
        if let Some(n) = found {
            break n;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("connection {} not listed by the management API", pod.name);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    };
    let path = format!(
        "/api/connections/{}",
        conn_name.replace(' ', "%20").replace('>', "%3E")
    );
    e2e::http::request_async(
        "DELETE",
        e2e::rabbit::MANAGEMENT.to_owned(),
        path,
        Some(("guest", "guest")),
        None,
    )
    .await?;
    loop {
        match pod.next().await? {
            Event::Lost => break,
            Event::Message(..) => {}
            Event::Restored => bail!("restored before lost"),
        }
    }
    loop {
        match pod.next().await? {
            Event::Restored => break,
            Event::Message(..) => {}
            Event::Lost => {}
        }
    }
    let second_queue = pod.queue().await?;
    assert_ne!(first_queue, second_queue, "a new server-named queue");
    wait_bound_keys(&second_queue, "amq.topic", &[key.as_str()]).await?;
    amqp.publish("amq.topic", &key, b"after", BasicProperties::default())
        .await?;
    let (_, _, m) = pod.next_message().await?;
    assert_eq!(&m.body()[..], b"after");
    amqp.close().await;
    Ok(())
}
