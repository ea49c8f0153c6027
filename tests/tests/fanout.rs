//! The shared fan-out path through a running gateway (relay mode): `ack:auto`
//! subscriptions to `/topic`, `/exchange` and `/user` served by the pod's one
//! AMQP upstream ("stomp-gateway <pod_id> shared"), SENDs from sessions
//! without a STOMP leg published over AMQP, and the per-session leg opened
//! only when a frame needs it.
//!
//! Against the real binary and the local RabbitMQ: MESSAGE frames equal to
//! the STOMP plugin's field by field, per-destination order with no loss or
//! duplicates while subscribers churn, bindings that go after the last
//! subscriber (management API), 1,500 subscribers at the cost of the pod's
//! own connections, the documented behaviour when the upstream connection is
//! closed, slow consumers and refused bindings.
//!
//! With `E2E_FANOUT=per-session` (the second run in `scripts/test.sh`) the
//! tests that only make sense on the shared path return early with a note;
//! the equality and ordering tests run on the per-session path too.
#![allow(clippy::unwrap_used)]

use anyhow::{bail, ensure, Context, Result};
use e2e::amqp::Amqp;
use e2e::gateway::per_session_mode;
use e2e::rabbit::{
    close_connection, connection_count, management_get, wait_connection_count,
    wait_named_connection,
};
use e2e::{
    body_text, error_text, send, show, unique, Command, Frame, Gateway, GatewayBuilder,
    StompClient, Topology, Version, WAIT,
};
use futures_util::{stream, StreamExt, TryStreamExt};
use lapin::types::{AMQPValue, FieldTable, LongString};
use lapin::BasicProperties;
use prometheus_parse::{Scrape, Value};
use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::time::Instant;

/// RabbitMQ's Web-STOMP listener: the STOMP plugin's frames over a WebSocket.
const PLUGIN_WS: &str = "ws://127.0.0.1:15674/ws";

/// `true` (after a note) when this run uses the per-session path, where a
/// shared-path-only test has nothing to check.
fn skip_unless_shared(test: &str) -> bool {
    if per_session_mode() {
        eprintln!("{test}: skipped with E2E_FANOUT=per-session (shared path only)");
        return true;
    }
    false
}

/// A gateway with a unique `server.pod_id` (to find its shared connection)
/// and a short unbind delay; returns the builder and the pod id.
fn pod_gateway(name: &str) -> (GatewayBuilder, String) {
    let pod = unique("pod");
    let builder = Gateway::builder(name)
        .set_str("server", "pod_id", &pod)
        .set("fanout", "unbind_delay_ms", "200");
    (builder, pod)
}

/// The client-side connection name of a pod's shared upstream.
fn shared_connection_name(pod: &str) -> String {
    format!("stomp-gateway {pod} shared")
}

/// A STOMP 1.2 session straight to RabbitMQ's STOMP plugin.
async fn plugin_client() -> Result<StompClient> {
    let mut c = StompClient::connect_ws(PLUGIN_WS, &["v12.stomp"]).await?;
    c.connect_stomp(Version::V1_2, Some("guest"), Some("guest"), (0, 0))
        .await
        .context("CONNECT to the STOMP plugin")?;
    Ok(c)
}

/// The headers of `frame` by name (the first of repeated ones, which STOMP
/// says wins), without `message-id` and `subscription`, which differ by
/// design.
fn comparable(frame: &Frame) -> BTreeMap<String, String> {
    let mut out = BTreeMap::new();
    for (k, v) in &frame.headers {
        if k != "message-id" && k != "subscription" {
            out.entry(k.clone()).or_insert_with(|| v.clone());
        }
    }
    out
}

/// How `ours` (through the gateway) differs from the frame the plugin sent
/// (`theirs`), `message-id` aside, with `subscription` each side's own id;
/// one line per difference, appended to `diffs`.
fn diff_message(
    diffs: &mut Vec<String>,
    what: &str,
    theirs: &Frame,
    their_sub: &str,
    ours: &Frame,
    our_sub: &str,
) {
    let before = diffs.len();
    for (side, f, sub) in [("plugin", theirs, their_sub), ("gateway", ours, our_sub)] {
        if f.command != Command::Message {
            diffs.push(format!("{what}: {side} sent {}", show(f)));
        }
        if f.header("subscription") != Some(sub) {
            diffs.push(format!(
                "{what}: {side} subscription {:?}",
                f.header("subscription")
            ));
        }
        if f.header("message-id").is_none_or(|v| v.is_empty()) {
            diffs.push(format!("{what}: no message-id from the {side}"));
        }
    }
    let (t, o) = (comparable(theirs), comparable(ours));
    let mut keys: Vec<&String> = t.keys().chain(o.keys()).collect();
    keys.sort();
    keys.dedup();
    for k in keys {
        if t.get(k) != o.get(k) {
            diffs.push(format!(
                "{what}: header {k}: plugin {:?}, gateway {:?}",
                t.get(k),
                o.get(k)
            ));
        }
    }
    if theirs.body != ours.body {
        diffs.push(format!("{what}: bodies differ"));
    }
    if diffs.len() > before {
        diffs.push(format!(
            "  plugin:  {}\n  gateway: {}",
            show(theirs),
            show(ours)
        ));
    }
}

/// The AMQP properties of a message with everything set.
fn rich_properties() -> BasicProperties {
    let mut table = FieldTable::default();
    table.insert(
        "x-str".into(),
        AMQPValue::LongString(LongString::from("a:b\\c")),
    );
    table.insert("x-int".into(), AMQPValue::LongInt(42));
    table.insert("x-long".into(), AMQPValue::LongLongInt(-7_000_000_000));
    BasicProperties::default()
        .with_content_type("application/json".into())
        .with_content_encoding("utf-8".into())
        .with_delivery_mode(2)
        .with_priority(4)
        .with_correlation_id("corr-7".into())
        .with_reply_to("amq.rabbitmq.reply-to-nowhere".into())
        .with_expiration("3600000".into())
        .with_message_id("amqp-id-7".into())
        .with_timestamp(1_700_000_000)
        .with_type("kind-7".into())
        .with_app_id("app-7".into())
        .with_headers(table)
}

/// A SEND with the headers the STOMP plugin maps onto AMQP properties, and
/// custom ones.
fn rich_send(destination: &str, body: &str) -> Frame {
    Frame::new(Command::Send)
        .with_header("destination", destination)
        .with_header("content-type", "application/json")
        .with_header("persistent", "true")
        .with_header("reply-to", "/queue/e2e-replies")
        .with_header("correlation-id", "corr-9")
        .with_header("expiration", "3600000")
        .with_header("priority", "5")
        .with_header("x-custom", "a:b\\c")
        .with_header("x-number", "17")
        .with_body(bytes::Bytes::from(body.to_owned()))
}

/// The value of series `name` (with `labels`) on the gateway's `/metrics`.
async fn metric(gw: &Gateway, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
    let r = gw.admin_get("/metrics").await?;
    ensure!(r.status == 200, "GET /metrics: {}", r.status);
    let scrape = Scrape::parse(r.body.lines().map(|l| Ok(l.to_owned())))?;
    let s = scrape
        .samples
        .iter()
        .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
        .with_context(|| format!("no series {name}{labels:?}"))?;
    match s.value {
        Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Ok(v),
        _ => bail!("{name} is a histogram or summary"),
    }
}

/// Polls [`metric`] until it equals `want`.
async fn wait_metric(
    gw: &Gateway,
    name: &str,
    labels: &[(&str, &str)],
    want: f64,
    timeout: Duration,
) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        let v = metric(gw, name, labels).await?;
        if v == want {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!("{name}{labels:?} is {v}, expected {want} (waited {timeout:?})");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// The server-named queue of a pod's shared upstream: the queue consumed on
/// a channel of the connection named "stomp-gateway <pod> shared" (the
/// management API's consumer list). Returns the queue and the management
/// API's name of that connection.
async fn shared_queue(pod: &str) -> Result<(String, String)> {
    let conn = wait_named_connection(&shared_connection_name(pod), Duration::from_secs(20)).await?;
    let conn_name = conn["name"]
        .as_str()
        .context("connection without a name")?
        .to_owned();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let consumers = management_get("/api/consumers").await?;
        let found = consumers.as_array().and_then(|a| {
            a.iter()
                .find(|c| c["channel_details"]["connection_name"] == conn_name.as_str())
                .and_then(|c| c["queue"]["name"].as_str().map(str::to_owned))
        });
        if let Some(q) = found {
            return Ok((q, conn_name));
        }
        if Instant::now() >= deadline {
            bail!("no queue consumed by connection {conn_name:?} (pod {pod})");
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Routing keys bound to `queue` (in `/`) from `exchange`, sorted.
async fn bound_keys(queue: &str, exchange: &str) -> Result<Vec<String>> {
    let v = management_get(&format!(
        "/api/queues/%2F/{}/bindings",
        e2e::rabbit::path_segment(queue)
    ))
    .await?;
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

/// Polls [`bound_keys`] until they are `want`; returns how long it took.
async fn wait_bound_keys(queue: &str, exchange: &str, want: &[&str]) -> Result<Duration> {
    let start = Instant::now();
    let mut want: Vec<String> = want.iter().map(|s| (*s).to_owned()).collect();
    want.sort();
    loop {
        let keys = bound_keys(queue, exchange).await?;
        if keys == want {
            return Ok(start.elapsed());
        }
        if start.elapsed() > WAIT {
            bail!("bindings of {queue} from {exchange}: {keys:?}, wanted {want:?}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// The first ERROR among `frames`.
fn first_error(frames: &[Frame]) -> Option<&Frame> {
    frames.iter().find(|f| f.command == Command::Error)
}

/// Raises this process's open-file soft limit to `want` (or the hard limit);
/// the gateway it spawns inherits it.
fn raise_nofile(want: u64) -> u64 {
    use nix::sys::resource::{getrlimit, setrlimit, Resource};
    let Ok((soft, hard)) = getrlimit(Resource::RLIMIT_NOFILE) else {
        return 0;
    };
    let target = want.min(hard);
    if soft < target && setrlimit(Resource::RLIMIT_NOFILE, target, hard).is_ok() {
        return target;
    }
    soft
}

/// A gateway whose STOMP and AMQP connections all go to a vhost of its own
/// (`vhost`, created and deleted by `topo`), so RabbitMQ's connection count
/// there is exactly the gateway's.
async fn gateway_in_own_vhost(
    name: &str,
    topo: &mut Topology,
) -> Result<(GatewayBuilder, String, String)> {
    let vhost = unique("fanout-vh");
    topo.vhost(&vhost).await?;
    let (builder, pod) = pod_gateway(name);
    let builder = builder.set_str("broker", "virtual_host", &vhost).set_str(
        "amqp",
        "url",
        &format!("amqp://guest:guest@127.0.0.1:5672/{vhost}"),
    );
    Ok((builder, pod, vhost))
}

/// Names and protocols of RabbitMQ's connections in `vhost`, for the test's
/// report: the management API's list, which lags behind the node's own
/// count, so polled (a few seconds at most) until it holds `expect`.
async fn connections_in(vhost: &str, expect: usize) -> Result<Vec<String>> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let v = management_get(&format!("/api/vhosts/{vhost}/connections")).await?;
        let list: Vec<String> = v
            .as_array()
            .map(|a| {
                a.iter()
                    .map(|c| {
                        format!(
                            "{} ({})",
                            c["client_properties"]["connection_name"]
                                .as_str()
                                .unwrap_or("-"),
                            c["protocol"].as_str().unwrap_or("?")
                        )
                    })
                    .collect()
            })
            .unwrap_or_default();
        if list.len() >= expect || Instant::now() >= deadline {
            return Ok(list);
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

#[tokio::test]
async fn message_frames_match_the_stomp_plugin_field_by_field() -> Result<()> {
    let gw = Gateway::start("fanout_fields_match_plugin").await;
    let amqp = Amqp::connect().await?;
    let mut ours = gw.client().await?;
    let mut theirs = plugin_client().await?;
    let mut diffs: Vec<String> = Vec::new();

    // 1. /topic/<key>, published over AMQP with every property set.
    let key = unique("fields");
    let topic = format!("/topic/{key}");
    ours.subscribe(&topic, "gw-topic", &[]).await?;
    theirs.subscribe(&topic, "plugin-topic", &[]).await?;
    amqp.publish("amq.topic", &key, b"{\"n\":1}", rich_properties())
        .await?;
    let t = theirs.expect(Command::Message, WAIT).await?;
    let o = ours.expect(Command::Message, WAIT).await?;
    diff_message(
        &mut diffs,
        "AMQP publish to /topic",
        &t,
        "plugin-topic",
        &o,
        "gw-topic",
    );
    for name in [
        "destination",
        "content-type",
        "content-length",
        "persistent",
        "priority",
        "correlation-id",
        "reply-to",
        "x-str",
        "x-int",
    ] {
        assert!(
            t.header(name).is_some(),
            "the plugin sent no {name} (the comparison would be empty): {}",
            show(&t)
        );
    }

    // 2. A SEND through the plugin with custom headers: what both see. (The
    // plugin copies a SEND's `receipt` header into the message too: both
    // SENDs below use the same receipt id.)
    theirs
        .send_frame(&rich_send(&topic, "from the plugin").with_header("receipt", "same-receipt"))
        .await?;
    theirs.await_receipt("same-receipt").await?;
    let t = theirs.expect(Command::Message, WAIT).await?;
    let o = ours.expect(Command::Message, WAIT).await?;
    diff_message(
        &mut diffs,
        "plugin SEND to /topic",
        &t,
        "plugin-topic",
        &o,
        "gw-topic",
    );
    assert_eq!(t.header("x-custom"), Some("a:b\\c"), "{}", show(&t));

    // 3. The same SEND through a gateway session with no broker leg of its
    // own (the pod publishes it over AMQP): the plugin's subscriber must
    // get what it got for the plugin's SEND, and so must ours.
    let from_plugin = (t, o);
    let mut sender = gw.client().await?;
    sender
        .send_frame(&rich_send(&topic, "from the plugin").with_header("receipt", "same-receipt"))
        .await?;
    sender.await_receipt("same-receipt").await?;
    let t = theirs.expect(Command::Message, WAIT).await?;
    let o = ours.expect(Command::Message, WAIT).await?;
    diff_message(
        &mut diffs,
        "gateway SEND vs plugin SEND, at the plugin subscriber",
        &from_plugin.0,
        "plugin-topic",
        &t,
        "plugin-topic",
    );
    diff_message(
        &mut diffs,
        "gateway SEND vs plugin SEND, at the gateway subscriber",
        &from_plugin.1,
        "gw-topic",
        &o,
        "gw-topic",
    );
    diff_message(
        &mut diffs,
        "gateway SEND to /topic",
        &t,
        "plugin-topic",
        &o,
        "gw-topic",
    );

    // 4. A wildcard /exchange subscription: destination is the message's.
    let prefix = unique("fields-x");
    let pattern = format!("/exchange/amq.topic/{prefix}.*");
    ours.subscribe(&pattern, "gw-x", &[]).await?;
    theirs.subscribe(&pattern, "plugin-x", &[]).await?;
    amqp.publish(
        "amq.topic",
        &format!("{prefix}.one"),
        b"wild",
        rich_properties(),
    )
    .await?;
    let t = theirs.expect(Command::Message, WAIT).await?;
    let o = ours.expect(Command::Message, WAIT).await?;
    diff_message(
        &mut diffs,
        "AMQP publish to /exchange wildcard",
        &t,
        "plugin-x",
        &o,
        "gw-x",
    );
    // The message's own routing key, not the pattern (the plugin renders
    // amq.topic deliveries as /topic/<routing key>).
    assert!(
        o.header("destination")
            .is_some_and(|d| d.ends_with(&format!("/{prefix}.one"))),
        "{}",
        show(&o)
    );

    ensure!(
        diffs.is_empty(),
        "MESSAGE frames differ from the STOMP plugin's:\n{}",
        diffs.join("\n")
    );
    sender.disconnect().await?;
    ours.disconnect().await?;
    theirs.close().await;
    amqp.close().await;
    Ok(())
}

/// Whether `f` is the RECEIPT for `id`.
fn is_receipt(f: &Frame, id: &str) -> bool {
    f.command == Command::Receipt && f.header("receipt-id") == Some(id)
}

/// A frame a churner reads while subscription `id` is current: a MESSAGE of
/// `id` gives its sequence number. In per-session mode only, the STOMP
/// plugin's ERROR "Subscription not found" for an earlier, cancelled
/// subscription is counted in `late` (RabbitMQ's STOMP plugin sends it when
/// a delivery crosses the UNSUBSCRIBE inside the broker; the relay drops it,
/// so the count must stay 0; the shared path never has it). Anything else
/// is an error.
fn churn_frame(f: &Frame, id: &str, late: &mut usize) -> Result<Option<u64>> {
    if f.command == Command::Message && f.header("subscription") == Some(id) {
        return Ok(Some(body_text(f).trim().parse()?));
    }
    if per_session_mode()
        && f.command == Command::Error
        && f.header("message") == Some("Subscription not found")
        && !body_text(f).contains(&format!("'T_{id}'"))
    {
        *late += 1;
        return Ok(None);
    }
    bail!("subscription {id}: unexpected {}", show(f))
}

/// Whether `e` is the per-session relay closing the session (1011) on the
/// STOMP plugin's late "Subscription not found" ERROR (see [`churn_frame`]);
/// only ever tolerated with `E2E_FANOUT=per-session`.
fn plugin_closed(e: &anyhow::Error) -> bool {
    per_session_mode() && format!("{e:#}").contains("Subscription not found")
}

/// One churn round on `client`: SUBSCRIBE `id` to `topic` (with a receipt),
/// read for `listen`, UNSUBSCRIBE (with a receipt); every MESSAGE of `id`
/// seen on the way, in order.
async fn churn_round(
    client: &mut StompClient,
    topic: &str,
    id: &str,
    listen: Duration,
    started: &AtomicU64,
    late: &mut usize,
) -> Result<Run> {
    let mut run = Run {
        started_before_receipt: 0,
        seqs: Vec::new(),
    };
    let receipt = format!("sub-{id}");
    client
        .send_frame(
            &Frame::new(Command::Subscribe)
                .with_header("id", id)
                .with_header("destination", topic)
                .with_header("receipt", receipt.as_str()),
        )
        .await?;
    // Messages may come before the RECEIPT: they count.
    loop {
        let f = client.recv(WAIT).await?.frame;
        if is_receipt(&f, &receipt) {
            break;
        }
        if let Some(seq) = churn_frame(&f, id, late)? {
            run.seqs.push(seq);
        }
    }
    run.started_before_receipt = started.load(Ordering::SeqCst);
    let until = Instant::now() + listen;
    while let Some(r) = client
        .recv_opt(until.saturating_duration_since(Instant::now()))
        .await?
    {
        if let Some(seq) = churn_frame(&r.frame, id, late)? {
            run.seqs.push(seq);
        }
    }
    let receipt = format!("unsub-{id}");
    client
        .send_frame(
            &Frame::new(Command::Unsubscribe)
                .with_header("id", id)
                .with_header("receipt", receipt.as_str()),
        )
        .await?;
    // Messages already on their way before the RECEIPT still count.
    loop {
        let f = client.recv(WAIT).await?.frame;
        if is_receipt(&f, &receipt) {
            break;
        }
        if let Some(seq) = churn_frame(&f, id, late)? {
            run.seqs.push(seq);
        }
    }
    Ok(run)
}

/// What one churning subscriber saw during one subscription.
#[derive(Debug)]
struct Run {
    /// Messages published (started) before its SUBSCRIBE receipt arrived.
    started_before_receipt: u64,
    seqs: Vec<u64>,
}

#[tokio::test]
async fn order_and_no_loss_or_duplicates_while_subscribers_churn() -> Result<()> {
    const RATE_PER_SEC: u64 = 200;
    const N: u64 = 1_000; // 5 s at 200 msg/s
    const CHURNERS: usize = 4;
    let gw = Gateway::start("fanout_order_under_churn").await;
    let key = unique("order");
    let topic = format!("/topic/{key}");
    let mut stable = gw.client().await?;
    stable.subscribe(&topic, "stable", &[]).await?;

    let started = Arc::new(AtomicU64::new(0));
    let done = Arc::new(AtomicBool::new(false));
    let mut churners = Vec::new();
    for c in 0..CHURNERS {
        let mut client = gw.client().await?;
        let url = gw.ws_url();
        let (topic, started, done) = (topic.clone(), started.clone(), done.clone());
        churners.push(tokio::spawn(async move {
            let mut runs: Vec<Run> = Vec::new();
            let (mut iter, mut late, mut plugin_closes) = (0u32, 0usize, 0usize);
            while !done.load(Ordering::SeqCst) {
                iter += 1;
                let id = format!("churn-{c}-{iter}");
                // Listen for 100..400 ms, varying per churner and round.
                let listen =
                    Duration::from_millis(100 + (u64::from(iter) * 37 + c as u64 * 71) % 300);
                match churn_round(&mut client, &topic, &id, listen, &started, &mut late).await {
                    Ok(run) => runs.push(run),
                    Err(e) if plugin_closed(&e) => {
                        plugin_closes += 1;
                        client = StompClient::open(&url).await?;
                    }
                    Err(e) => return Err(e),
                }
            }
            // Nothing arrives for a subscription after its UNSUBSCRIBE receipt.
            let tail = async {
                while let Some(r) = client.recv_opt(Duration::from_millis(300)).await? {
                    churn_frame(&r.frame, "(none)", &mut late)?;
                }
                client.disconnect().await
            };
            match tail.await {
                Err(e) if plugin_closed(&e) => plugin_closes += 1,
                other => other?,
            }
            // The relay drops the plugin's late ERROR for a subscription the
            // session no longer has, so the per-session path sees none either.
            ensure!(
                late + plugin_closes == 0,
                "churner {c}: {late} late \"Subscription not found\" ERRORs from the STOMP \
                 plugin reached the client, {plugin_closes} sessions closed by them"
            );
            anyhow::Ok(runs)
        }));
    }

    let amqp = Amqp::connect().await?;
    let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / RATE_PER_SEC));
    let t0 = Instant::now();
    for seq in 0..N {
        tick.tick().await;
        started.fetch_add(1, Ordering::SeqCst);
        amqp.publish(
            "amq.topic",
            &key,
            seq.to_string().as_bytes(),
            BasicProperties::default(),
        )
        .await?;
    }
    let publish_time = t0.elapsed();
    done.store(true, Ordering::SeqCst);

    let got = stable
        .recv_messages(N as usize, Duration::from_secs(30))
        .await?;
    let seqs: Vec<u64> = got
        .iter()
        .map(|f| body_text(f).parse())
        .collect::<Result<_, _>>()?;
    let want: Vec<u64> = (0..N).collect();
    if seqs != want {
        let first_bad = seqs.iter().zip(&want).position(|(a, b)| a != b);
        bail!("the stable subscriber's sequence breaks at index {first_bad:?}");
    }
    assert!(
        stable.recv_opt(Duration::from_millis(300)).await?.is_none(),
        "nothing after the last message (no duplicates)"
    );

    let (mut rounds, mut delivered, mut empty) = (0usize, 0usize, 0usize);
    for (c, h) in churners.into_iter().enumerate() {
        for run in h.await?? {
            rounds += 1;
            delivered += run.seqs.len();
            let Some(&first) = run.seqs.first() else {
                empty += 1;
                continue;
            };
            for w in run.seqs.windows(2) {
                ensure!(
                    w[1] == w[0] + 1,
                    "churner {c}: not contiguous and increasing: {:?}",
                    run.seqs
                );
            }
            // The message whose publish started after the SUBSCRIBE receipt
            // must have been delivered: the run starts at or before it.
            ensure!(
                first <= run.started_before_receipt,
                "churner {c}: run starts at {first}, but {} was published after the receipt",
                run.started_before_receipt
            );
        }
    }
    eprintln!(
        "published {N} in {publish_time:?}; {CHURNERS} churners: {rounds} subscriptions, \
         {delivered} deliveries, {empty} empty runs"
    );
    ensure!(rounds >= CHURNERS * 5, "only {rounds} churn rounds");
    amqp.close().await;
    Ok(())
}

#[tokio::test]
async fn bindings_are_gone_after_the_last_unsubscribe() -> Result<()> {
    if skip_unless_shared("bindings_are_gone_after_the_last_unsubscribe") {
        return Ok(());
    }
    let (builder, pod) = pod_gateway("fanout_bindings_gone");
    let gw = builder.start().await;
    let ready: serde_json::Value = serde_json::from_str(&gw.admin_get("/readyz").await?.body)?;
    assert_eq!(ready["shared"]["enabled"], true, "{ready}");
    assert_eq!(ready["shared"]["up"], true, "{ready}");

    let key = unique("bind");
    let prefix = unique("bind-x");
    let wildcard = format!("{prefix}.*");
    let mut a = gw.client().await?;
    let mut b = gw.client().await?;
    a.subscribe(&format!("/topic/{key}"), "a", &[]).await?;
    b.subscribe(&format!("/topic/{key}"), "b-topic", &[])
        .await?;
    b.subscribe(&format!("/exchange/amq.topic/{wildcard}"), "b-x", &[])
        .await?;
    let (queue, _) = shared_queue(&pod).await?;
    assert_eq!(
        ready["shared"]["queue"], queue,
        "/readyz names the queue the management API shows: {ready}"
    );
    wait_bound_keys(&queue, "amq.topic", &[&key, &wildcard]).await?;
    wait_metric(&gw, "stomp_gateway_shared_bindings", &[], 2.0, WAIT).await?;

    // One of two subscribers of `key` leaves: still bound.
    a.send_with_receipt(Frame::new(Command::Unsubscribe).with_header("id", "a"))
        .await?;
    tokio::time::sleep(Duration::from_millis(800)).await;
    assert_eq!(bound_keys(&queue, "amq.topic").await?, {
        let mut v = vec![key.clone(), wildcard.clone()];
        v.sort();
        v
    });
    // The last subscriber of the wildcard leaves: unbound after the delay.
    b.send_with_receipt(Frame::new(Command::Unsubscribe).with_header("id", "b-x"))
        .await?;
    let took = wait_bound_keys(&queue, "amq.topic", &[&key]).await?;
    eprintln!("wildcard unbound {took:?} after its UNSUBSCRIBE receipt (delay 200 ms)");
    // The last subscriber of `key` goes away with its session.
    b.disconnect().await?;
    let took = wait_bound_keys(&queue, "amq.topic", &[]).await?;
    eprintln!("topic unbound {took:?} after its session ended");
    wait_metric(&gw, "stomp_gateway_shared_bindings", &[], 0.0, WAIT).await?;
    // The pod queue itself stays (one per pod, whatever the subscribers).
    let (queue_after, _) = shared_queue(&pod).await?;
    assert_eq!(queue_after, queue);
    a.disconnect().await?;
    Ok(())
}

#[tokio::test]
async fn fifteen_hundred_subscribers_cost_rabbitmq_only_the_pods_connections() -> Result<()> {
    if skip_unless_shared("fifteen_hundred_subscribers_cost_rabbitmq_only_the_pods_connections") {
        return Ok(());
    }
    const SUBSCRIBERS: usize = 1_500;
    const MESSAGES: usize = 20;
    let limit = raise_nofile(8_192);
    ensure!(
        limit >= 4_096,
        "open-file limit {limit} is too low for this test"
    );
    let t0 = Instant::now();
    let mut topo = Topology::new();
    let (builder, _pod, vhost) = gateway_in_own_vhost("fanout_1500_subscribers", &mut topo).await?;
    let gw = builder
        .set("server", "max_connections_per_ip", "5000")
        .set("server", "max_new_connections_per_ip_per_sec", "0")
        .start()
        .await;
    let baseline = connection_count(&vhost).await?;
    eprintln!(
        "vhost {vhost}: {baseline} connections from the pod: {:?}",
        connections_in(&vhost, baseline).await?
    );
    ensure!(
        (2..=10).contains(&baseline),
        "the pod's own connections (system link, AMQP control/publish, shared): {baseline}"
    );

    let topic = format!("/topic/{}", unique("crowd"));
    let url = gw.ws_url();
    let subscribers: Vec<StompClient> = stream::iter(0..SUBSCRIBERS)
        .map(|i| {
            let (url, topic) = (url.clone(), topic.clone());
            async move {
                let mut c = StompClient::open(&url)
                    .await
                    .with_context(|| format!("subscriber {i}"))?;
                c.subscribe(&topic, &format!("s{i}"), &[]).await?;
                anyhow::Ok(c)
            }
        })
        .buffer_unordered(64)
        .try_collect()
        .await?;
    let subscribed = t0.elapsed();
    let during = connection_count(&vhost).await?;
    ensure!(
        during == baseline,
        "{SUBSCRIBERS} subscribers changed RabbitMQ's connections: {baseline} -> {during}: {:?}",
        connections_in(&vhost, during).await?
    );
    wait_metric(
        &gw,
        "stomp_gateway_subscriptions_open",
        &[("path", "shared")],
        SUBSCRIBERS as f64,
        WAIT,
    )
    .await?;

    // Published through a gateway session without a leg of its own.
    let mut publisher = gw.client().await?;
    for m in 0..MESSAGES {
        let frame = send(&topic, &m.to_string());
        if m + 1 == MESSAGES {
            publisher.send_with_receipt(frame).await?;
        } else {
            publisher.send_frame(&frame).await?;
        }
    }
    let mut readers = Vec::with_capacity(SUBSCRIBERS);
    for (i, mut c) in subscribers.into_iter().enumerate() {
        readers.push(tokio::spawn(async move {
            let got = c.recv_messages(MESSAGES, Duration::from_secs(30)).await?;
            let bodies: Vec<String> = got.iter().map(body_text).collect();
            let want: Vec<String> = (0..MESSAGES).map(|m| m.to_string()).collect();
            ensure!(bodies == want, "subscriber {i} got {bodies:?}");
            c.close().await;
            anyhow::Ok(())
        }));
    }
    for r in readers {
        r.await??;
    }
    let after = connection_count(&vhost).await?;
    ensure!(
        after == baseline,
        "publishing changed RabbitMQ's connections: {baseline} -> {after}"
    );
    let deliveries = metric(&gw, "stomp_gateway_shared_deliveries_total", &[]).await?;
    ensure!(
        deliveries >= (SUBSCRIBERS * MESSAGES) as f64,
        "shared_deliveries_total {deliveries}"
    );
    eprintln!(
        "{SUBSCRIBERS} subscribers in {subscribed:?}, {MESSAGES} messages each, all delivered \
         in {:?} in total; RabbitMQ connections in the vhost: {baseline} throughout",
        t0.elapsed()
    );
    drop(publisher);
    drop(gw);
    Ok(())
}

/// Publishes `seq` 0, 1, ... to `amq.topic` with `key` every `period` until
/// `stop`; returns how many it published.
fn spawn_publisher(
    key: String,
    period: Duration,
    stop: Arc<AtomicBool>,
) -> tokio::task::JoinHandle<Result<u64>> {
    tokio::spawn(async move {
        let amqp = Amqp::connect().await?;
        let mut seq = 0u64;
        while !stop.load(Ordering::SeqCst) {
            amqp.publish(
                "amq.topic",
                &key,
                seq.to_string().as_bytes(),
                BasicProperties::default(),
            )
            .await?;
            seq += 1;
            tokio::time::sleep(period).await;
        }
        amqp.close().await;
        Ok(seq)
    })
}

#[tokio::test]
async fn upstream_closed_under_traffic_keep_rebinds_and_counts_the_gap() -> Result<()> {
    if skip_unless_shared("upstream_closed_under_traffic_keep_rebinds_and_counts_the_gap") {
        return Ok(());
    }
    let (builder, pod) = pod_gateway("fanout_upstream_loss_keep");
    let gw = builder
        .set_str("fanout", "on_upstream_loss", "keep")
        .start()
        .await;
    let key = unique("loss-keep");
    let mut sub = gw.client().await?;
    sub.subscribe(&format!("/topic/{key}"), "s", &[]).await?;
    let (first_queue, conn) = shared_queue(&pod).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let publisher = spawn_publisher(key.clone(), Duration::from_millis(10), stop.clone());
    let mut seqs: Vec<u64> = Vec::new();
    while seqs.len() < 20 {
        let m = sub.expect(Command::Message, WAIT).await?;
        seqs.push(body_text(&m).parse()?);
    }
    close_connection(&conn).await?;
    let closed_at = Instant::now();
    // Keep reading while the upstream is away and comes back.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if metric(&gw, "stomp_gateway_shared_upstream_gaps_total", &[]).await? >= 1.0 {
            break;
        }
        ensure!(Instant::now() < deadline, "no gap counted within 20 s");
        let round = Instant::now() + Duration::from_millis(200);
        while let Some(r) = sub
            .recv_opt(round.saturating_duration_since(Instant::now()))
            .await?
        {
            ensure!(
                r.frame.command == Command::Message,
                "got {}",
                show(&r.frame)
            );
            seqs.push(body_text(&r.frame).parse()?);
        }
    }
    let restored_after = closed_at.elapsed();
    let (second_queue, second_conn) = shared_queue(&pod).await?;
    assert_ne!(second_conn, conn, "a new upstream connection");
    assert_ne!(second_queue, first_queue, "a new server-named queue");
    wait_bound_keys(&second_queue, "amq.topic", &[&key]).await?;
    let ready: serde_json::Value = serde_json::from_str(&gw.admin_get("/readyz").await?.body)?;
    assert_eq!(ready["shared"]["up"], true, "{ready}");
    assert_eq!(ready["shared"]["queue"], second_queue, "{ready}");

    // Published after the re-bind: delivered.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.store(true, Ordering::SeqCst);
    let published = publisher.await??;
    loop {
        let m = sub.expect(Command::Message, WAIT).await.with_context(|| {
            format!(
                "waiting for message {} (published {published}; last seen {:?})",
                published - 1,
                seqs.last()
            )
        })?;
        let seq: u64 = body_text(&m).parse()?;
        seqs.push(seq);
        if seq + 1 == published {
            break;
        }
    }
    for w in seqs.windows(2) {
        ensure!(
            w[1] > w[0],
            "out of order or duplicated: {} then {}",
            w[0],
            w[1]
        );
    }
    let lost = published as usize - seqs.len();
    eprintln!(
        "upstream back after {restored_after:?}; {published} published, {} delivered, {lost} lost in the gap",
        seqs.len()
    );
    sub.send_with_receipt(Frame::new(Command::Unsubscribe).with_header("id", "s"))
        .await?;
    assert_eq!(
        metric(&gw, "stomp_gateway_shared_upstream_gaps_total", &[]).await?,
        1.0
    );
    assert_eq!(
        metric(&gw, "stomp_gateway_shared_gap_closes_total", &[]).await?,
        0.0
    );
    sub.disconnect().await?;
    Ok(())
}

#[tokio::test]
async fn upstream_closed_under_traffic_close_ends_shared_sessions_with_1011() -> Result<()> {
    if skip_unless_shared("upstream_closed_under_traffic_close_ends_shared_sessions_with_1011") {
        return Ok(());
    }
    let (builder, pod) = pod_gateway("fanout_upstream_loss_close");
    let gw = builder
        .set_str("fanout", "on_upstream_loss", "close")
        .start()
        .await;
    let key = unique("loss-close");
    let mut sub = gw.client().await?;
    sub.subscribe(&format!("/topic/{key}"), "s", &[]).await?;
    // A session without shared subscriptions is not affected.
    let mut bystander = gw.client().await?;
    let (_, conn) = shared_queue(&pod).await?;

    let stop = Arc::new(AtomicBool::new(false));
    let publisher = spawn_publisher(key.clone(), Duration::from_millis(10), stop.clone());
    for _ in 0..10 {
        sub.expect(Command::Message, WAIT).await?;
    }
    close_connection(&conn).await?;
    let closed = sub.expect_close(Duration::from_secs(20)).await?;
    stop.store(true, Ordering::SeqCst);
    publisher.await??;
    let error = first_error(&closed.frames).with_context(|| {
        format!(
            "no ERROR before the close ({:?} {:?})",
            closed.code, closed.reason
        )
    })?;
    assert!(
        error_text(error).contains("shared subscription interrupted"),
        "{}",
        show(error)
    );
    assert_eq!(
        closed.code,
        Some(1011),
        "close code; reason {:?}",
        closed.reason
    );
    wait_metric(&gw, "stomp_gateway_shared_gap_closes_total", &[], 1.0, WAIT).await?;

    bystander
        .send_with_receipt(send(&format!("/topic/{key}"), "still here"))
        .await
        .context("the session without shared subscriptions stays open")?;
    // And new shared subscriptions work once the upstream is back.
    wait_ready(&gw).await?;
    let mut again = gw.client().await?;
    again.subscribe(&format!("/topic/{key}"), "s2", &[]).await?;
    bystander
        .send_with_receipt(send(&format!("/topic/{key}"), "after"))
        .await?;
    let m = again.expect(Command::Message, WAIT).await?;
    assert_eq!(body_text(&m), "after");
    again.disconnect().await?;
    bystander.disconnect().await?;
    Ok(())
}

/// Waits until `/readyz` answers 200 (again).
async fn wait_ready(gw: &Gateway) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let r = gw.admin_get("/readyz").await?;
        if r.status == 200 {
            return Ok(());
        }
        ensure!(Instant::now() < deadline, "not ready again: {}", r.body);
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test]
async fn pure_pub_sub_session_opens_no_stomp_connection_until_it_needs_one() -> Result<()> {
    if skip_unless_shared("pure_pub_sub_session_opens_no_stomp_connection_until_it_needs_one") {
        return Ok(());
    }
    let mut topo = Topology::new();
    let (builder, _pod, vhost) = gateway_in_own_vhost("fanout_lazy_leg", &mut topo).await?;
    let gw = builder.start().await;
    let baseline = connection_count(&vhost).await?;

    let topic = format!("/topic/{}", unique("lazy"));
    let mut c = gw.client().await?;
    c.subscribe(&topic, "t", &[]).await?;
    let mut p = gw.client().await?;
    p.send_with_receipt(send(&topic, "pub-sub").with_header("x-k", "v"))
        .await?;
    let m = c.expect(Command::Message, WAIT).await?;
    assert_eq!(body_text(&m), "pub-sub");
    assert_eq!(m.header("x-k"), Some("v"));
    // Give a lazily opened leg time to show up before saying there is none.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let now = connection_count(&vhost).await?;
    ensure!(
        now == baseline,
        "a subscribe and a SEND changed RabbitMQ's connections {baseline} -> {now}: {:?}",
        connections_in(&vhost, now).await?
    );
    assert_eq!(
        metric(&gw, "stomp_gateway_broker_links_up", &[("link", "session")]).await?,
        0.0
    );

    // An ack:client subscription needs the session's own leg: opened now.
    let q = unique("lazy-q");
    let queue = format!("/queue/{q}");
    c.subscribe(&queue, "work", &[("ack", "client")]).await?;
    wait_connection_count(&vhost, "one more (the leg)", WAIT, |n| n == baseline + 1).await?;
    c.send_with_receipt(send(&queue, "job-1")).await?;
    let m = c
        .recv_where("the queued MESSAGE", WAIT, |f| {
            f.command == Command::Message && f.header("subscription") == Some("work")
        })
        .await?
        .frame;
    assert_eq!(body_text(&m), "job-1");
    let ack = m
        .header("ack")
        .context("no ack header on an ack:client MESSAGE")?;
    c.send_with_receipt(Frame::new(Command::Ack).with_header("id", ack))
        .await?;
    c.send_with_receipt(Frame::new(Command::Unsubscribe).with_header("id", "work"))
        .await?;
    // Acknowledged: not redelivered to the next subscription.
    c.subscribe(&queue, "again", &[]).await?;
    c.send_with_receipt(send(&queue, "job-2")).await?;
    let m = c
        .recv_where("the next queued MESSAGE", WAIT, |f| {
            f.command == Command::Message && f.header("subscription") == Some("again")
        })
        .await?
        .frame;
    assert_eq!(body_text(&m), "job-2", "job-1 was acknowledged");
    let legs = connection_count(&vhost).await?;
    ensure!(legs == baseline + 1, "one leg only: {baseline} -> {legs}");
    eprintln!(
        "vhost {vhost}: {baseline} connections for pub/sub sessions, {legs} once one needed a leg"
    );
    c.disconnect().await?;
    p.disconnect().await?;
    Ok(())
}

#[tokio::test]
async fn slow_consumer_on_the_shared_path_is_dropped_while_others_keep_receiving() -> Result<()> {
    if skip_unless_shared("slow_consumer_on_the_shared_path_is_dropped_while_others_keep_receiving")
    {
        return Ok(());
    }
    let gw = Gateway::builder("fanout_slow_consumer")
        .set("session", "outbound_buffer_bytes", "65536")
        // Well above the 2 x 10 x 16 KiB the fast subscriber may have in
        // flight (the publisher waits for it every 10 messages), even on a
        // loaded machine.
        .set("hub", "max_queued_bytes", "1048576")
        .start()
        .await;
    let key = unique("firehose");
    let topic = format!("/topic/{key}");
    // Subscribes, then never reads again.
    let mut slow = gw.client().await?;
    slow.subscribe(&topic, "slow", &[]).await?;
    let mut fast = gw.client().await?;
    fast.subscribe(&topic, "fast", &[]).await?;

    const N: usize = 1_500;
    const BATCH: usize = 10;
    let (progress, mut seen) = tokio::sync::watch::channel(0usize);
    let reader = tokio::spawn(async move {
        for i in 0..N {
            let m = fast.recv(Duration::from_secs(30)).await?.frame;
            ensure!(m.command == Command::Message, "got {}", show(&m));
            let n: usize = body_text(&m)
                .split(':')
                .next()
                .unwrap_or("")
                .trim()
                .parse()?;
            ensure!(n == i, "message {i} arrived as {n}");
            let _ = progress.send(i + 1);
        }
        anyhow::Ok(N)
    });
    // 1,500 x 16 KiB = 24 MiB, far more than socket buffers, the session's
    // 64 KiB and the hub's 1 MiB hold for a client that reads nothing.
    let filler = "x".repeat(16 * 1024 - 16);
    let amqp = Amqp::connect().await?;
    for i in 0..N {
        amqp.publish(
            "amq.topic",
            &key,
            format!("{i:>10}:{filler}").as_bytes(),
            BasicProperties::default(),
        )
        .await?;
        if (i + 1) % BATCH == 0 {
            let waited = tokio::time::timeout(WAIT, seen.wait_for(|n| *n + BATCH > i))
                .await
                .map(|r| r.is_ok());
            match waited {
                Ok(true) => {}
                // The reader ended early: its error says why.
                Ok(false) => break,
                Err(_) => bail!(
                    "the fast subscriber stalled at {} of {}",
                    *seen.borrow(),
                    i + 1
                ),
            }
        }
    }
    assert_eq!(
        reader.await??,
        N,
        "the fast subscriber got everything, in order"
    );

    let closed = slow.expect_close(Duration::from_secs(30)).await?;
    let error = first_error(&closed.frames)
        .with_context(|| format!("no ERROR; close {:?} {}", closed.code, closed.reason))?;
    assert_eq!(
        error.header("message"),
        Some("slow consumer"),
        "{}",
        show(error)
    );
    assert_eq!(
        closed.code,
        Some(1008),
        "close code; reason {:?}",
        closed.reason
    );
    wait_metric(&gw, "stomp_gateway_slow_consumers_total", &[], 1.0, WAIT).await?;
    amqp.close().await;
    Ok(())
}

#[tokio::test]
async fn refused_binding_ends_that_session_only() -> Result<()> {
    if skip_unless_shared("refused_binding_ends_that_session_only") {
        return Ok(());
    }
    let gw = Gateway::start("fanout_refused_binding").await;
    let topic = format!("/topic/{}", unique("survivor"));
    let mut ok = gw.client().await?;
    ok.subscribe(&topic, "ok", &[]).await?;

    let missing = unique("no-such-exchange");
    let mut bad = gw.client().await?;
    bad.send_frame(
        &Frame::new(Command::Subscribe)
            .with_header("id", "bad")
            .with_header("destination", format!("/exchange/{missing}/x"))
            .with_header("receipt", "sub-bad"),
    )
    .await?;
    let closed = bad.expect_close(WAIT).await?;
    let error = first_error(&closed.frames).with_context(|| {
        format!(
            "no ERROR; frames {:?}, close {:?}",
            closed.frames.iter().map(show).collect::<Vec<_>>(),
            closed.code
        )
    })?;
    assert!(
        error_text(error).contains("shared subscription failed"),
        "{}",
        show(error)
    );
    assert_eq!(
        closed.code,
        Some(1011),
        "close code; reason {:?}",
        closed.reason
    );
    assert!(
        !closed.frames.iter().any(|f| f.command == Command::Receipt),
        "no RECEIPT for a refused SUBSCRIBE"
    );

    // Everyone else is still served, old and new subscriptions alike.
    let mut newcomer = gw.client().await?;
    newcomer.subscribe(&topic, "new", &[]).await?;
    let mut p = gw.client().await?;
    p.send_with_receipt(send(&topic, "still served")).await?;
    for c in [&mut ok, &mut newcomer] {
        let m = c.expect(Command::Message, WAIT).await?;
        assert_eq!(body_text(&m), "still served");
    }
    assert_eq!(gw.admin_get("/readyz").await?.status, 200);
    ok.disconnect().await?;
    newcomer.disconnect().await?;
    p.disconnect().await?;
    Ok(())
}
