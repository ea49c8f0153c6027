//! The embedded broker (`broker.mode = "embedded"`, the default): the
//! gateway is its own broker, with RabbitMQ's addresses pointed at a closed
//! port so nothing can reach it.
#![allow(clippy::unwrap_used)]

use anyhow::{ensure, Context, Result};
use e2e::gateway::free_port;
use e2e::{body_text, error_text, send, Command, Frame, Gateway, GatewayBuilder, WAIT};
use std::time::Duration;

/// A gateway in embedded mode whose broker and AMQP addresses lead nowhere.
fn embedded(name: &str) -> GatewayBuilder {
    let closed = format!("127.0.0.1:{}", free_port());
    Gateway::builder(name)
        .set_str("broker", "mode", "embedded")
        .broker_addresses(&[closed])
}

#[tokio::test]
async fn topic_pub_sub_and_receipts_without_rabbitmq() -> Result<()> {
    let gw = embedded("embedded_topic_pub_sub").start().await;
    let ready = gw.admin_get("/readyz").await?;
    ensure!(ready.status == 200, "not ready: {}", ready.body);
    let v: serde_json::Value = serde_json::from_str(&ready.body)?;
    assert_eq!(v["mode"], "embedded");
    assert_eq!(v["amqp"]["enabled"], false, "no AMQP control plane: {v}");
    assert!(
        gw.log().contains("single node"),
        "the start-up line says it is single-node"
    );

    let mut a = gw.client().await?;
    let mut b = gw.client().await?;
    a.subscribe("/topic/room.1", "sa", &[]).await?;
    b.subscribe("/topic/room.1", "sb", &[("ack", "auto")])
        .await?;
    b.subscribe("/topic/room.2", "other", &[]).await?;
    let mut publisher = gw.client().await?;
    for i in 0..20 {
        publisher
            .send_frame(&send("/topic/room.1", &format!("m{i}")).with_header("x-trace", "t:1"))
            .await?;
    }
    let r = publisher
        .send_with_receipt(send("/topic/room.2", "other room"))
        .await?;
    assert_eq!(r.command, Command::Receipt);
    for (client, sub) in [(&mut a, "sa"), (&mut b, "sb")] {
        let got = client.recv_messages(20, WAIT).await?;
        for (i, m) in got.iter().enumerate() {
            assert_eq!(body_text(m), format!("m{i}"), "in order");
            assert_eq!(m.header("subscription"), Some(sub));
            assert_eq!(m.header("destination"), Some("/topic/room.1"));
            assert_eq!(m.header("x-trace"), Some("t:1"));
            assert!(m.header("message-id").is_some());
        }
    }
    let other = b.expect(Command::Message, WAIT).await?;
    assert_eq!(body_text(&other), "other room");
    assert_eq!(other.header("subscription"), Some("other"));

    // After UNSUBSCRIBE nothing more arrives for that subscription.
    a.send_with_receipt(Frame::new(Command::Unsubscribe).with_header("id", "sa"))
        .await?;
    publisher
        .send_with_receipt(send("/topic/room.1", "after"))
        .await?;
    let m = b.expect(Command::Message, WAIT).await?;
    assert_eq!(body_text(&m), "after");
    assert!(a.recv_opt(Duration::from_millis(300)).await?.is_none());
    a.disconnect().await?;
    b.disconnect().await?;
    publisher.disconnect().await?;
    Ok(())
}

#[tokio::test]
async fn queue_is_point_to_point_round_robin() -> Result<()> {
    let gw = embedded("embedded_queue_round_robin").start().await;
    let mut w1 = gw.client().await?;
    let mut w2 = gw.client().await?;
    w1.subscribe("/queue/jobs", "w", &[]).await?;
    w2.subscribe("/queue/jobs", "w", &[]).await?;
    let mut p = gw.client().await?;
    for i in 0..10 {
        p.send_frame(&send("/queue/jobs", &format!("{i}"))).await?;
    }
    p.send_with_receipt(send("/topic/flush", "-")).await?;
    let one: Vec<String> = w1
        .recv_messages(5, WAIT)
        .await?
        .iter()
        .map(body_text)
        .collect();
    let two: Vec<String> = w2
        .recv_messages(5, WAIT)
        .await?
        .iter()
        .map(body_text)
        .collect();
    assert_eq!(one, ["0", "2", "4", "6", "8"]);
    assert_eq!(two, ["1", "3", "5", "7", "9"]);
    assert!(w1.recv_opt(Duration::from_millis(200)).await?.is_none());
    Ok(())
}

#[tokio::test]
async fn unsupported_frames_get_a_clear_error() -> Result<()> {
    let gw = embedded("embedded_unsupported").start().await;
    let cases: Vec<(Frame, &str)> = vec![
        (
            Frame::new(Command::Subscribe)
                .with_header("id", "1")
                .with_header("destination", "/topic/x")
                .with_header("ack", "client-individual"),
            "acknowledgements are not supported by the embedded broker",
        ),
        (
            Frame::new(Command::Begin).with_header("transaction", "tx1"),
            "transactions are not supported by the embedded broker",
        ),
        (
            Frame::new(Command::Subscribe)
                .with_header("id", "1")
                .with_header("destination", "/amq/queue/q"),
            "is not served by the embedded broker",
        ),
    ];
    for (frame, message) in cases {
        let mut c = gw.client().await?;
        c.send_frame(&frame).await?;
        let closed = c.expect_close(WAIT).await?;
        let error = closed
            .frames
            .iter()
            .find(|f| f.command == Command::Error)
            .with_context(|| format!("no ERROR for {frame:?}"))?;
        let text = error_text(error);
        assert!(text.contains(message), "{text}");
        assert!(
            text.contains("broker.mode = \"relay\""),
            "says how to switch: {text}"
        );
    }
    // /app needs the AMQP control plane, off in embedded mode by default.
    let mut c = gw.client().await?;
    c.send_frame(&send("/app/chat.send", "hi")).await?;
    let closed = c.expect_close(WAIT).await?;
    let error = closed
        .frames
        .iter()
        .find(|f| f.command == Command::Error)
        .context("no ERROR for an /app SEND")?;
    assert!(!error_text(error).is_empty());
    // The gateway keeps serving everyone else.
    let mut ok = gw.client().await?;
    ok.subscribe("/topic/still", "s", &[]).await?;
    Ok(())
}

#[tokio::test]
async fn slow_consumer_is_dropped_while_others_keep_receiving() -> Result<()> {
    let gw = embedded("embedded_slow_consumer")
        .set("session", "outbound_buffer_bytes", "65536")
        .set("hub", "max_queued_bytes", "262144")
        .start()
        .await;
    let mut slow = gw.client().await?;
    slow.subscribe("/topic/firehose", "slow", &[]).await?;
    let mut fast = gw.client().await?;
    fast.subscribe("/topic/firehose", "fast", &[]).await?;

    // The fast one reads everything, concurrently, and says how far it got:
    // the publisher never runs more than one batch ahead of it.
    const N: usize = 2_000;
    const BATCH: usize = 10;
    let (progress, mut seen) = tokio::sync::watch::channel(0usize);
    let reader = tokio::spawn(async move {
        for i in 0..N {
            let m = fast.recv(Duration::from_secs(30)).await?.frame;
            ensure!(m.command == Command::Message, "got {m:?}");
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
    // 2,000 x 16 KiB = 32 MiB: far more than the socket buffers, the
    // session's 64 KiB and the hub's 256 KiB for a client that reads nothing.
    let filler = "x".repeat(16 * 1024 - 16);
    let mut publisher = gw.client().await?;
    let frames: Vec<Frame> = (0..N)
        .map(|i| send("/topic/firehose", &format!("{i:>10}:{filler}")))
        .collect();
    for (k, chunk) in frames.chunks(BATCH).enumerate() {
        publisher.send_frames_in_one_message(chunk).await?;
        let sent = (k + 1) * BATCH;
        tokio::time::timeout(WAIT, seen.wait_for(|n| *n >= sent))
            .await
            .context("the fast subscriber stalled")??;
    }
    assert_eq!(
        reader.await??,
        N,
        "the fast subscriber got everything, in order"
    );

    // The slow one finds its ERROR after whatever was already on its way.
    let closed = slow.expect_close(Duration::from_secs(30)).await?;
    let error = closed
        .frames
        .iter()
        .find(|f| f.command == Command::Error)
        .with_context(|| format!("no ERROR; close {:?} {}", closed.code, closed.reason))?;
    assert_eq!(error.header("message"), Some("slow consumer"));
    let metrics = gw.admin_get("/metrics").await?.body;
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("stomp_gateway_slow_consumers_total") && l.ends_with(" 1")),
        "slow_consumers_total is 1"
    );
    Ok(())
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

#[tokio::test]
async fn fifteen_hundred_subscribers_on_one_topic_get_every_message() -> Result<()> {
    const SUBSCRIBERS: usize = 1_500;
    const MESSAGES: usize = 20;
    // 1,500 client sockets here and 1,500 in the gateway: more than the
    // usual soft limit of 1,024 descriptors per process.
    let limit = raise_nofile(8_192);
    ensure!(
        limit >= 4_096,
        "open-file limit {limit} is too low for this test"
    );
    // All from 127.0.0.1: lift the per-IP limits meant for hostile clients.
    let gw = embedded("embedded_1500_subscribers")
        .set("server", "max_connections_per_ip", "5000")
        .set("server", "max_new_connections_per_ip_per_sec", "0")
        .start()
        .await;
    let mut subscribers = Vec::with_capacity(SUBSCRIBERS);
    for i in 0..SUBSCRIBERS {
        let mut c = gw
            .client()
            .await
            .with_context(|| format!("subscriber {i}"))?;
        c.subscribe("/topic/crowd", &format!("s{i}"), &[]).await?;
        subscribers.push(c);
    }
    let mut publisher = gw.client().await?;
    for m in 0..MESSAGES {
        publisher
            .send_frame(&send("/topic/crowd", &format!("{m}")))
            .await?;
    }
    let mut readers = Vec::with_capacity(SUBSCRIBERS);
    for (i, mut c) in subscribers.into_iter().enumerate() {
        readers.push(tokio::spawn(async move {
            let got = c.recv_messages(MESSAGES, Duration::from_secs(60)).await?;
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
    let ready: serde_json::Value = serde_json::from_str(&gw.admin_get("/readyz").await?.body)?;
    assert_eq!(ready["mode"], "embedded");
    assert_eq!(
        ready["system_link"]["up"], false,
        "no broker connection at all"
    );
    Ok(())
}
