//! `/metrics` during real traffic: the series move as the traffic says, and
//! the exposition parses with a Prometheus text-format parser
//! (`prometheus-parse`), every line of it.
#![allow(clippy::unwrap_used)]

use anyhow::{bail, ensure, Context, Result};
use e2e::gateway::free_port;
use e2e::stomp::ALL_SUBPROTOCOLS;
use e2e::{jwt, send, unique, Command, Frame, Gateway, Proxy, StompClient, Version, WAIT};
use futures_util::StreamExt;
use prometheus_parse::{LineInfo, Scrape, Value};
use std::time::{Duration, Instant};

/// One parsed scrape of a gateway's `/metrics`.
struct Metrics(Scrape);

impl Metrics {
    async fn scrape(gw: &Gateway) -> Result<Metrics> {
        let r = gw.admin_get("/metrics").await?;
        ensure!(r.status == 200, "GET /metrics: {}", r.status);
        // Every line is a comment, a sample with a number, or empty: nothing
        // the parser would skip silently.
        for line in r.body.lines() {
            match LineInfo::parse(line) {
                LineInfo::Doc { .. } | LineInfo::Type { .. } | LineInfo::Empty => {}
                LineInfo::Sample { value, .. } => {
                    ensure!(
                        value.parse::<f64>().is_ok() || value == "+Inf",
                        "bad value in {line:?}"
                    )
                }
                _ => bail!("line the parser does not understand: {line:?}"),
            }
        }
        let scrape = Scrape::parse(r.body.lines().map(|l| Ok(l.to_owned())))?;
        ensure!(
            scrape
                .samples
                .iter()
                .all(|s| s.metric.starts_with("stomp_gateway_")),
            "a series without the stomp_gateway_ prefix"
        );
        Ok(Metrics(scrape))
    }

    /// The value of the one series `name` whose labels include `labels`
    /// (counter, gauge or untyped; a histogram's `_count` is untyped).
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        let mut found = self.0.samples.iter().filter(|s| {
            s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v))
        });
        let s = found
            .next()
            .with_context(|| format!("no series {name}{labels:?}"))?;
        ensure!(found.next().is_none(), "several series {name}{labels:?}");
        match s.value {
            Value::Counter(v) | Value::Gauge(v) | Value::Untyped(v) => Ok(v),
            _ => bail!("{name} is a histogram or summary"),
        }
    }

    /// The `_count` of histogram `name` (the number of observations).
    fn observations(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        let count = self.value(&format!("{name}_count"), labels)?;
        // The buckets are there too, and the last one (+Inf) holds them all.
        let h = self
            .0
            .samples
            .iter()
            .find(|s| s.metric == name && labels.iter().all(|(k, v)| s.labels.get(k) == Some(*v)))
            .with_context(|| format!("no histogram {name}{labels:?}"))?;
        let Value::Histogram(buckets) = &h.value else {
            bail!("{name} is not a histogram");
        };
        let inf = buckets
            .iter()
            .find(|b| b.less_than.is_infinite())
            .context("no +Inf bucket")?;
        ensure!(
            inf.count == count,
            "{name}: +Inf bucket {} != _count {count}",
            inf.count
        );
        Ok(count)
    }

    fn frames_in(&self, command: &str) -> Result<f64> {
        self.value(
            "stomp_gateway_frames_received_total",
            &[("command", command)],
        )
    }

    fn frames_out(&self, command: &str) -> Result<f64> {
        self.value("stomp_gateway_frames_sent_total", &[("command", command)])
    }

    fn closed(&self, reason: &str) -> Result<f64> {
        self.value("stomp_gateway_sessions_closed_total", &[("reason", reason)])
    }
}

/// Scrapes until `check` passes (sessions end asynchronously), or fails
/// with its last error.
async fn eventually<F>(gw: &Gateway, what: &str, check: F) -> Result<Metrics>
where
    F: Fn(&Metrics) -> Result<()>,
{
    let deadline = Instant::now() + WAIT;
    loop {
        let m = Metrics::scrape(gw).await?;
        match check(&m) {
            Ok(()) => return Ok(m),
            Err(e) if Instant::now() > deadline => {
                return Err(e.context(format!("{what}: not within {WAIT:?}")))
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(50)).await,
        }
    }
}

#[tokio::test]
async fn relay_traffic_moves_sessions_frames_and_latencies() -> Result<()> {
    let gw = Gateway::builder("metrics_relay_traffic")
        // About the session's own STOMP connection: opened at CONNECT.
        .per_session()
        .set_str("server", "pod_id", "pod-metrics")
        .set("log", "stats_interval_ms", "100")
        .start()
        .await;
    let m = Metrics::scrape(&gw).await?;
    ensure!(m.value("stomp_gateway_sessions_opened_total", &[])? == 0.0);
    ensure!(
        m.value(
            "stomp_gateway_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        )? == 1.0
    );
    ensure!(m.value("stomp_gateway_broker_links_up", &[("link", "system")])? == 1.0);
    ensure!(m.value("stomp_gateway_draining", &[])? == 0.0);
    ensure!(
        m.0.samples
            .iter()
            .all(|s| s.labels.get("pod") == Some("pod-metrics")),
        "every series has the pod label"
    );

    let dest = format!("/topic/{}", unique("metrics"));
    let mut sub = gw.client().await?;
    sub.subscribe(&dest, "s1", &[]).await?;
    let mut publisher = gw.client().await?;
    for i in 0..3 {
        publisher
            .send_with_receipt(send(&dest, &format!("m{i}")))
            .await?;
    }
    sub.recv_messages(3, WAIT).await?;

    let m = Metrics::scrape(&gw).await?;
    ensure!(m.value("stomp_gateway_sessions_open", &[("transport", "websocket")])? == 2.0);
    ensure!(m.value("stomp_gateway_sessions_opened_total", &[])? == 2.0);
    ensure!(m.value("stomp_gateway_broker_links_up", &[("link", "session")])? == 2.0);
    ensure!(m.value("stomp_gateway_subscriptions_open", &[("path", "relay")])? == 1.0);
    ensure!(m.frames_in("CONNECT")? == 2.0);
    ensure!(m.frames_in("SUBSCRIBE")? == 1.0);
    ensure!(m.frames_in("SEND")? == 3.0);
    ensure!(m.frames_out("CONNECTED")? == 2.0);
    ensure!(m.frames_out("MESSAGE")? == 3.0);
    // The SUBSCRIBE's and the three SENDs' receipts.
    ensure!(m.frames_out("RECEIPT")? == 4.0);
    ensure!(m.frames_out("ERROR")? == 0.0);
    ensure!(m.observations("stomp_gateway_stomp_connect_duration_seconds", &[])? == 2.0);
    ensure!(
        m.observations(
            "stomp_gateway_broker_connect_duration_seconds",
            &[("link", "session")]
        )? == 2.0
    );
    // Every frame that crossed was timed: SUBSCRIBE + 3 SEND one way (a
    // CONNECT waits for the broker connection: stomp_connect_duration times
    // it); 2 CONNECTED + 4 RECEIPT + 3 MESSAGE the other.
    let c2b = m.observations(
        "stomp_gateway_relay_latency_seconds",
        &[("direction", "client_to_broker")],
    )?;
    ensure!(c2b == 4.0, "client_to_broker observations: {c2b}");
    let b2c = m.observations(
        "stomp_gateway_relay_latency_seconds",
        &[("direction", "broker_to_client")],
    )?;
    ensure!(b2c == 9.0, "broker_to_client observations: {b2c}");

    publisher.disconnect().await?;
    sub.send_frame(&Frame::new(Command::Unsubscribe).with_header("id", "s1"))
        .await?;
    let m = eventually(&gw, "publisher's close counted", |m| {
        ensure!(m.closed("client_disconnect")? == 1.0);
        ensure!(m.value("stomp_gateway_sessions_open", &[("transport", "websocket")])? == 1.0);
        ensure!(m.value("stomp_gateway_broker_links_up", &[("link", "session")])? == 1.0);
        ensure!(m.value("stomp_gateway_subscriptions_open", &[("path", "relay")])? == 0.0);
        Ok(())
    })
    .await?;
    ensure!(m.frames_in("DISCONNECT")? == 1.0);
    ensure!(m.frames_in("UNSUBSCRIBE")? == 1.0);
    ensure!(m.closed("client_error")? == 0.0);
    drop(sub);
    eventually(&gw, "subscriber gone", |m| {
        ensure!(m.closed("client_gone")? == 1.0);
        ensure!(m.value("stomp_gateway_sessions_open", &[("transport", "websocket")])? == 0.0);
        ensure!(m.value("stomp_gateway_broker_links_up", &[("link", "session")])? == 0.0);
        Ok(())
    })
    .await?;

    // The periodic stats line (log.stats_interval_ms) says the same.
    let deadline = Instant::now() + WAIT;
    let want =
        "stats: sessions[0 open (none), 2 opened, 2 closed, 0 abnormally], subscriptions[0 open], \
                frames in[CONNECT 2, SEND 3, SUBSCRIBE 1, UNSUBSCRIBE 1, DISCONNECT 1], \
                frames out[CONNECTED 2, MESSAGE 3, RECEIPT 5]";
    while !gw.log().contains(want) {
        ensure!(Instant::now() < deadline, "no stats line with {want:?}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    Ok(())
}

#[tokio::test]
async fn refusals_count_auth_failures_limits_and_client_errors() -> Result<()> {
    let secret = jwt::secret();
    let gw = Gateway::builder("metrics_refusals")
        .set_str("auth", "mode", "jwt")
        .set_str("auth", "jwt_secret", &secret)
        .set("server", "max_connections", "2")
        .set("server", "max_ws_message_size", "4096")
        .set("session", "max_frame_size", "4096")
        .start()
        .await;

    // No token, then an expired one.
    gw.connect_refused(&[]).await?;
    let expired = jwt::token_with_claims(
        &secret,
        serde_json::json!({"sub": "alice", "exp": jwt::now() - 3600}),
    );
    gw.connect_refused(&[("passcode", &expired)]).await?;
    // A WebSocket message over server.max_ws_message_size: an ERROR and the
    // close (1009).
    let (mut c, _) = gw
        .client_with(&[("passcode", &jwt::token(&secret, "alice"))])
        .await?;
    c.send_frame(&send("/topic/x", &"x".repeat(8000))).await?;
    c.expect_close(WAIT).await?;

    // Two connections held open, the third upgrade is refused.
    let _a = StompClient::connect_ws(&gw.ws_url(), &ALL_SUBPROTOCOLS).await?;
    let _b = StompClient::connect_ws(&gw.ws_url(), &ALL_SUBPROTOCOLS).await?;
    eventually(&gw, "two sessions open", |m| {
        ensure!(m.value("stomp_gateway_sessions_open", &[("transport", "websocket")])? == 2.0);
        Ok(())
    })
    .await?;
    ensure!(
        StompClient::connect_ws(&gw.ws_url(), &ALL_SUBPROTOCOLS)
            .await
            .is_err(),
        "the third upgrade is refused"
    );

    let m = eventually(&gw, "refusals counted", |m| {
        let (errors, ws) = (
            m.closed("client_error")?,
            m.closed("client_websocket_error")?,
        );
        ensure!(
            errors == 2.0 && ws == 1.0,
            "client_error {errors}, client_websocket_error {ws}"
        );
        Ok(())
    })
    .await?;
    ensure!(
        m.value(
            "stomp_gateway_auth_failures_total",
            &[("reason", "no_token")]
        )? == 1.0
    );
    ensure!(
        m.value(
            "stomp_gateway_auth_failures_total",
            &[("reason", "expired")]
        )? == 1.0
    );
    ensure!(
        m.value(
            "stomp_gateway_auth_failures_total",
            &[("reason", "invalid")]
        )? == 0.0
    );
    ensure!(
        m.value(
            "stomp_gateway_connections_rejected_total",
            &[("reason", "connection_limit")]
        )? == 1.0
    );
    ensure!(
        m.value(
            "stomp_gateway_limit_hits_total",
            &[("limit", "server.max_connections")]
        )? == 1.0
    );
    ensure!(
        m.value(
            "stomp_gateway_limit_hits_total",
            &[("limit", "server.max_ws_message_size")]
        )? == 1.0
    );
    // Three ERRORs written: two authentication failures and the message size.
    ensure!(m.frames_out("ERROR")? == 3.0);
    ensure!(m.frames_out("CONNECTED")? == 1.0);
    // Refused CONNECTs never completed: only the accepted one was timed.
    ensure!(m.observations("stomp_gateway_stomp_connect_duration_seconds", &[])? == 1.0);
    Ok(())
}

#[tokio::test]
async fn broker_loss_counts_link_losses_and_reconnects() -> Result<()> {
    let proxy = Proxy::to_rabbitmq().await?;
    let gw = Gateway::builder("metrics_broker_loss")
        // About the session's own STOMP connection: opened at CONNECT.
        .per_session()
        .broker_addresses(&[proxy.address()])
        .start()
        .await;
    let mut c = gw.client().await?;
    c.subscribe(&format!("/topic/{}", unique("loss")), "s", &[])
        .await?;
    let m = Metrics::scrape(&gw).await?;
    ensure!(
        m.value(
            "stomp_gateway_broker_reconnects_total",
            &[("link", "system")]
        )? == 0.0
    );
    ensure!(
        m.observations(
            "stomp_gateway_broker_connect_duration_seconds",
            &[("link", "system")]
        )? == 1.0
    );

    proxy.cut();
    c.expect(Command::Error, WAIT).await?;
    c.expect_close(WAIT).await?;
    let m = eventually(&gw, "system link back", |m| {
        ensure!(
            m.value(
                "stomp_gateway_broker_reconnects_total",
                &[("link", "system")]
            )? >= 1.0
        );
        ensure!(m.value("stomp_gateway_broker_links_up", &[("link", "system")])? == 1.0);
        ensure!(m.closed("broker_lost")? == 1.0);
        Ok(())
    })
    .await?;
    ensure!(m.value("stomp_gateway_broker_links_up", &[("link", "session")])? == 0.0);
    ensure!(m.value("stomp_gateway_subscriptions_open", &[("path", "relay")])? == 0.0);
    ensure!(
        m.observations(
            "stomp_gateway_broker_connect_duration_seconds",
            &[("link", "system")]
        )? >= 2.0
    );

    // A broker that is not there at all: session connect attempts fail.
    let dead = format!("127.0.0.1:{}", free_port());
    let gw = Gateway::builder("metrics_broker_down")
        // Session broker connects happen at CONNECT only per-session.
        .per_session()
        .broker_addresses(&[dead])
        .set("broker", "connect_timeout_ms", "1000")
        .start_unready()
        .await;
    let mut c = StompClient::connect_ws(&gw.ws_url(), &ALL_SUBPROTOCOLS).await?;
    c.send_frame(&StompClient::connect_frame(
        Version::V1_2,
        None,
        None,
        (0, 0),
    ))
    .await?;
    c.expect(Command::Error, WAIT).await?;
    let m = eventually(&gw, "failed broker connect counted", |m| {
        ensure!(m.value("stomp_gateway_broker_links_up", &[("link", "system")])? == 0.0);
        ensure!(m.value("stomp_gateway_ready", &[])? == 0.0);
        ensure!(m.closed("broker_error")? + m.closed("broker_lost")? == 1.0);
        Ok(())
    })
    .await?;
    ensure!(m.frames_out("ERROR")? == 1.0);
    Ok(())
}

#[tokio::test]
async fn sockjs_sessions_are_counted_by_transport() -> Result<()> {
    let gw = Gateway::builder("metrics_sockjs")
        .set(
            "server",
            "endpoints",
            r#"[ { path = "/ws" }, { path = "/stomp", sockjs = true } ]"#,
        )
        .start()
        .await;
    let addr = gw
        .ws_url()
        .trim_start_matches("ws://")
        .trim_end_matches("/ws")
        .to_owned();
    let sid = || unique("m").replace('.', "-");

    // SockJS over WebSocket: the open frame, then a STOMP session.
    let url = format!("ws://{addr}/stomp/000/{}/websocket", sid());
    let (mut ws, _) = tokio_tungstenite::connect_async(url).await?;
    let open = tokio::time::timeout(WAIT, ws.next()).await?;
    ensure!(
        matches!(&open, Some(Ok(m)) if m.to_text().ok() == Some("o")),
        "SockJS open frame: {open:?}"
    );
    // xhr-polling: the first poll opens the session, which lives on between
    // polls (until sockjs.disconnect_delay_ms).
    let r = e2e::http::request_async(
        "POST",
        addr.clone(),
        format!("/stomp/000/{}/xhr", sid()),
        None,
        None,
    )
    .await?;
    ensure!(
        r.status == 200 && r.body == "o\n",
        "xhr poll: {} {:?}",
        r.status,
        r.body
    );

    let m = eventually(&gw, "SockJS sessions open", |m| {
        ensure!(
            m.value(
                "stomp_gateway_sessions_open",
                &[("transport", "sockjs-websocket")]
            )? == 1.0
        );
        ensure!(
            m.value(
                "stomp_gateway_sessions_open",
                &[("transport", "sockjs-xhr-polling")]
            )? == 1.0
        );
        Ok(())
    })
    .await?;
    ensure!(m.value("stomp_gateway_sessions_open", &[("transport", "websocket")])? == 0.0);
    ensure!(m.value("stomp_gateway_sessions_opened_total", &[])? == 2.0);
    drop(ws);
    eventually(&gw, "SockJS WebSocket session closed", |m| {
        ensure!(
            m.value(
                "stomp_gateway_sessions_open",
                &[("transport", "sockjs-websocket")]
            )? == 0.0
        );
        Ok(())
    })
    .await?;
    Ok(())
}

#[tokio::test]
async fn embedded_subscriptions_are_counted_on_their_own_path() -> Result<()> {
    let closed = format!("127.0.0.1:{}", free_port());
    let gw = Gateway::builder("metrics_embedded")
        .set_str("broker", "mode", "embedded")
        .broker_addresses(&[closed])
        .start()
        .await;
    let dest = format!("/topic/{}", unique("metrics-embedded"));
    let mut sub = gw.client().await?;
    sub.subscribe(&dest, "s1", &[]).await?;
    let mut publisher = gw.client().await?;
    publisher.send_with_receipt(send(&dest, "hello")).await?;
    sub.recv_messages(1, WAIT).await?;

    let m = Metrics::scrape(&gw).await?;
    ensure!(m.value("stomp_gateway_subscriptions_open", &[("path", "embedded")])? == 1.0);
    ensure!(m.value("stomp_gateway_subscriptions_open", &[("path", "relay")])? == 0.0);
    ensure!(m.frames_out("MESSAGE")? == 1.0);

    sub.send_frame(&Frame::new(Command::Unsubscribe).with_header("id", "s1"))
        .await?;
    eventually(&gw, "the embedded subscription's end counted", |m| {
        ensure!(m.value("stomp_gateway_subscriptions_open", &[("path", "embedded")])? == 0.0);
        Ok(())
    })
    .await?;
    Ok(())
}
