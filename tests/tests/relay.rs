//! The relay path end to end: browser-style WebSocket clients, the real
//! gateway binary and RabbitMQ's STOMP plugin, one destination type at a time.
#![allow(clippy::unwrap_used)]

use anyhow::{ensure, Result};
use bytes::Bytes;
use e2e::{body_text, error_text, ms, send, show, unique, Command, Frame, Gateway, Topology, WAIT};
use std::collections::BTreeSet;

#[tokio::test]
async fn topic_pubsub_between_two_clients() -> Result<()> {
    let gw = Gateway::start("topic_pubsub_between_two_clients").await;
    let dest = format!("/topic/{}", unique("topic"));
    let mut a = gw.client().await?;
    let mut b = gw.client().await?;
    a.subscribe(&dest, "sub-a", &[]).await?;
    b.subscribe(&dest, "sub-b", &[]).await?;

    a.send_frame(&send(&dest, "hello from a").with_header("x-custom", "42"))
        .await?;
    for (client, sub) in [(&mut a, "sub-a"), (&mut b, "sub-b")] {
        let m = client.expect(Command::Message, WAIT).await?;
        assert_eq!(body_text(&m), "hello from a", "{}", show(&m));
        assert_eq!(m.header("destination"), Some(dest.as_str()));
        assert_eq!(m.header("subscription"), Some(sub));
        assert_eq!(
            m.header("x-custom"),
            Some("42"),
            "custom headers pass through"
        );
        assert!(m.header("message-id").is_some_and(|v| !v.is_empty()));
    }

    b.send_text_to(&dest, "hello from b").await?;
    assert_eq!(
        body_text(&a.expect(Command::Message, WAIT).await?),
        "hello from b"
    );
    assert_eq!(
        body_text(&b.expect(Command::Message, WAIT).await?),
        "hello from b"
    );
    Ok(())
}

#[tokio::test]
async fn queue_competing_consumers_each_message_once() -> Result<()> {
    let gw = Gateway::start("queue_competing_consumers").await;
    let name = unique("work");
    let mut topo = Topology::new();
    topo.track_queue(&name);
    let dest = format!("/queue/{name}");
    let mut a = gw.client().await?;
    let mut b = gw.client().await?;
    let mut producer = gw.client().await?;
    a.subscribe(&dest, "w", &[("ack", "auto")]).await?;
    b.subscribe(&dest, "w", &[("ack", "auto")]).await?;

    const N: usize = 20;
    for i in 0..N {
        producer.send_text_to(&dest, &format!("job-{i}")).await?;
    }
    producer.send_with_receipt(send(&dest, "job-last")).await?;

    let mut got_a = Vec::new();
    let mut got_b = Vec::new();
    let deadline = tokio::time::Instant::now() + WAIT;
    while got_a.len() + got_b.len() < N + 1 {
        ensure!(
            tokio::time::Instant::now() < deadline,
            "only {} + {} of {} messages arrived",
            got_a.len(),
            got_b.len(),
            N + 1
        );
        for (c, got) in [(&mut a, &mut got_a), (&mut b, &mut got_b)] {
            if let Some(r) = c.recv_opt(ms(50)).await? {
                assert_eq!(r.frame.command, Command::Message, "{}", show(&r.frame));
                got.push(body_text(&r.frame));
            }
        }
    }
    let all: Vec<&String> = got_a.iter().chain(got_b.iter()).collect();
    let distinct: BTreeSet<&String> = all.iter().copied().collect();
    assert_eq!(
        distinct.len(),
        all.len(),
        "a message was delivered twice: a={got_a:?} b={got_b:?}"
    );
    let mut expected: BTreeSet<String> = (0..N).map(|i| format!("job-{i}")).collect();
    expected.insert("job-last".into());
    assert_eq!(
        distinct.into_iter().cloned().collect::<BTreeSet<_>>(),
        expected
    );
    assert!(
        !got_a.is_empty() && !got_b.is_empty(),
        "both consumers get work: a={got_a:?} b={got_b:?}"
    );

    // Nothing else is in flight: the next frame on each is the UNSUBSCRIBE receipt.
    for c in [&mut a, &mut b] {
        c.send_frame(
            &Frame::new(Command::Unsubscribe)
                .with_header("id", "w")
                .with_header("receipt", "unsub-w"),
        )
        .await?;
        let f = c.expect(Command::Receipt, WAIT).await?;
        assert_eq!(f.header("receipt-id"), Some("unsub-w"));
    }
    Ok(())
}

#[tokio::test]
async fn exchange_destination_with_topic_routing() -> Result<()> {
    let gw = Gateway::start("exchange_destination_with_topic_routing").await;
    let ex = unique("ex");
    let mut topo = Topology::new();
    topo.exchange(&ex, "topic").await?;
    let mut rooms = gw.client().await?;
    let mut lobby = gw.client().await?;
    let mut sender = gw.client().await?;
    rooms
        .subscribe(&format!("/exchange/{ex}/room.*"), "rooms", &[])
        .await?;
    lobby
        .subscribe(&format!("/exchange/{ex}/lobby.*"), "lobby", &[])
        .await?;

    sender
        .send_text_to(&format!("/exchange/{ex}/room.42"), "r42")
        .await?;
    sender
        .send_text_to(&format!("/exchange/{ex}/lobby.1"), "l1")
        .await?;
    sender
        .send_text_to(&format!("/exchange/{ex}/room.43"), "r43")
        .await?;
    sender
        .send_text_to(
            &format!("/exchange/{ex}/room.1.deep"),
            "not matched by room.*",
        )
        .await?;
    sender
        .send_text_to(&format!("/exchange/{ex}/lobby.2"), "l2")
        .await?;
    sender
        .send_text_to(&format!("/exchange/{ex}/room.end"), "r-end")
        .await?;

    let got: Vec<String> = rooms
        .recv_messages(3, WAIT)
        .await?
        .iter()
        .map(body_text)
        .collect();
    assert_eq!(got, ["r42", "r43", "r-end"]);
    let got: Vec<Frame> = lobby.recv_messages(2, WAIT).await?;
    assert_eq!(got.iter().map(body_text).collect::<Vec<_>>(), ["l1", "l2"]);
    assert_eq!(
        got[0].header("destination"),
        Some(format!("/exchange/{ex}/lobby.1").as_str())
    );
    assert_eq!(got[0].header("subscription"), Some("lobby"));
    Ok(())
}

#[tokio::test]
async fn amq_queue_destination_to_a_declared_queue() -> Result<()> {
    let gw = Gateway::start("amq_queue_destination").await;
    let q = unique("amqq");
    let mut topo = Topology::new();
    topo.queue(&q).await?;
    let dest = format!("/amq/queue/{q}");
    let mut c = gw.client().await?;
    // Sent before anyone subscribes: the queue holds it.
    c.send_with_receipt(send(&dest, "queued before subscribe"))
        .await?;
    c.subscribe(&dest, "q", &[]).await?;
    let m = c.expect(Command::Message, WAIT).await?;
    assert_eq!(body_text(&m), "queued before subscribe");
    assert_eq!(m.header("subscription"), Some("q"));
    c.send_text_to(&dest, "after").await?;
    assert_eq!(body_text(&c.expect(Command::Message, WAIT).await?), "after");
    Ok(())
}

#[tokio::test]
async fn temp_queue_request_reply() -> Result<()> {
    let gw = Gateway::start("temp_queue_request_reply").await;
    let service = unique("svc");
    let mut topo = Topology::new();
    topo.track_queue(&service);
    let mut responder = gw.client().await?;
    let mut requester = gw.client().await?;
    responder
        .subscribe(&format!("/queue/{service}"), "svc", &[])
        .await?;

    requester
        .send_frame(
            &send(&format!("/queue/{service}"), "ping-1")
                .with_header("reply-to", "/temp-queue/foo"),
        )
        .await?;
    let req = responder.expect(Command::Message, WAIT).await?;
    assert_eq!(body_text(&req), "ping-1");
    let reply_to = req.header("reply-to").unwrap_or_default().to_owned();
    assert!(
        reply_to.starts_with("/reply-queue/"),
        "RabbitMQ rewrites reply-to: {}",
        show(&req)
    );
    responder.send_text_to(&reply_to, "pong-1").await?;

    let reply = requester.expect(Command::Message, WAIT).await?;
    assert_eq!(body_text(&reply), "pong-1", "{}", show(&reply));
    assert_eq!(
        reply.header("subscription"),
        Some("/temp-queue/foo"),
        "{}",
        show(&reply)
    );
    Ok(())
}

#[tokio::test]
async fn receipts_for_send_subscribe_and_unsubscribe() -> Result<()> {
    let gw = Gateway::start("receipts").await;
    let dest = format!("/topic/{}", unique("rcpt"));
    let mut c = gw.client().await?;
    c.send_frame(
        &Frame::new(Command::Subscribe)
            .with_header("id", "s1")
            .with_header("destination", dest.as_str())
            .with_header("receipt", "r-sub"),
    )
    .await?;
    let r = c.expect(Command::Receipt, WAIT).await?;
    assert_eq!(r.header("receipt-id"), Some("r-sub"));

    c.send_frame(&send(&dest, "x").with_header("receipt", "r-send"))
        .await?;
    // The MESSAGE and the RECEIPT may come in either order.
    let mut seen = Vec::new();
    for _ in 0..2 {
        seen.push(c.recv(WAIT).await?.frame);
    }
    let receipt = seen.iter().find(|f| f.command == Command::Receipt).cloned();
    let message = seen.iter().find(|f| f.command == Command::Message).cloned();
    assert_eq!(
        receipt.as_ref().and_then(|f| f.header("receipt-id")),
        Some("r-send"),
        "{seen:?}"
    );
    assert_eq!(message.map(|f| body_text(&f)).as_deref(), Some("x"));

    c.send_frame(
        &Frame::new(Command::Unsubscribe)
            .with_header("id", "s1")
            .with_header("receipt", "r-unsub"),
    )
    .await?;
    let r = c.expect(Command::Receipt, WAIT).await?;
    assert_eq!(r.header("receipt-id"), Some("r-unsub"));
    // Unsubscribed: a new SEND (with receipt) produces only its RECEIPT.
    c.send_frame(&send(&dest, "y").with_header("receipt", "r-send-2"))
        .await?;
    let r = c.expect(Command::Receipt, WAIT).await?;
    assert_eq!(r.header("receipt-id"), Some("r-send-2"));
    assert!(
        c.recv_opt(ms(300)).await?.is_none(),
        "no MESSAGE after UNSUBSCRIBE"
    );
    Ok(())
}

#[tokio::test]
async fn client_individual_nack_redelivers_then_ack() -> Result<()> {
    let gw = Gateway::start("client_individual_nack").await;
    let name = unique("nack");
    let mut topo = Topology::new();
    topo.track_queue(&name);
    let dest = format!("/queue/{name}");
    let mut c = gw.client().await?;
    c.subscribe(&dest, "s", &[("ack", "client-individual")])
        .await?;
    c.send_text_to(&dest, "job").await?;

    let first = c.expect(Command::Message, WAIT).await?;
    assert_eq!(body_text(&first), "job");
    assert_eq!(
        first.header("redelivered"),
        Some("false"),
        "{}",
        show(&first)
    );
    let ack_id = first
        .header("ack")
        .expect("STOMP 1.2 MESSAGE has an ack header")
        .to_owned();
    c.send_with_receipt(Frame::new(Command::Nack).with_header("id", ack_id.as_str()))
        .await?;

    let again = c.expect(Command::Message, WAIT).await?;
    assert_eq!(body_text(&again), "job", "NACKed message redelivered");
    assert_eq!(
        again.header("redelivered"),
        Some("true"),
        "{}",
        show(&again)
    );
    let ack_id = again.header("ack").unwrap_or_default().to_owned();
    c.send_with_receipt(Frame::new(Command::Ack).with_header("id", ack_id.as_str()))
        .await?;

    // ACKed for good: the next delivery is the next message, not "job" again.
    c.send_text_to(&dest, "next").await?;
    let next = c.expect(Command::Message, WAIT).await?;
    assert_eq!(body_text(&next), "next");
    let ack_id = next.header("ack").unwrap_or_default().to_owned();
    c.send_with_receipt(Frame::new(Command::Ack).with_header("id", ack_id.as_str()))
        .await?;
    Ok(())
}

#[tokio::test]
async fn transaction_commit_delivers_abort_does_not() -> Result<()> {
    let gw = Gateway::start("transactions").await;
    let dest = format!("/topic/{}", unique("tx"));
    let mut sub = gw.client().await?;
    let mut tx = gw.client().await?;
    sub.subscribe(&dest, "s", &[]).await?;

    tx.send_frame(&Frame::new(Command::Begin).with_header("transaction", "t1"))
        .await?;
    tx.send_frame(&send(&dest, "committed").with_header("transaction", "t1"))
        .await?;
    tx.send_with_receipt(send(&dest, "outside")).await?;
    // The transactional SEND is held until COMMIT.
    assert_eq!(
        body_text(&sub.expect(Command::Message, WAIT).await?),
        "outside"
    );
    tx.send_with_receipt(Frame::new(Command::Commit).with_header("transaction", "t1"))
        .await?;
    assert_eq!(
        body_text(&sub.expect(Command::Message, WAIT).await?),
        "committed"
    );

    tx.send_frame(&Frame::new(Command::Begin).with_header("transaction", "t2"))
        .await?;
    tx.send_frame(&send(&dest, "aborted").with_header("transaction", "t2"))
        .await?;
    tx.send_with_receipt(Frame::new(Command::Abort).with_header("transaction", "t2"))
        .await?;
    tx.send_text_to(&dest, "after-abort").await?;
    let m = sub.expect(Command::Message, WAIT).await?;
    assert_eq!(
        body_text(&m),
        "after-abort",
        "the aborted SEND was delivered: {}",
        show(&m)
    );
    Ok(())
}

#[tokio::test]
async fn binary_body_with_nul_bytes_round_trips_in_a_binary_message() -> Result<()> {
    let gw = Gateway::start("binary_body").await;
    let dest = format!("/topic/{}", unique("bin"));
    let mut a = gw.client().await?;
    let mut b = gw.client().await?;
    b.subscribe(&dest, "s", &[]).await?;

    let mut body: Vec<u8> = vec![0x00, 0x01, 0xff, 0x00, 0xfe, b'\n', 0x00, 0x80, 0xc3];
    body.extend((0..4096u32).map(|i| (i.wrapping_mul(2_654_435_761) >> 24) as u8));
    body.push(0);
    let frame = Frame::new(Command::Send)
        .with_header("destination", dest.as_str())
        .with_header("content-type", "application/octet-stream")
        .with_header("content-length", body.len().to_string())
        .with_body(Bytes::from(body.clone()));
    a.send_frame_binary(&frame).await?;

    let r = b.recv(WAIT).await?;
    assert_eq!(r.frame.command, Command::Message, "{}", show(&r.frame));
    assert_eq!(r.frame.body.len(), body.len());
    assert!(r.frame.body.as_ref() == body.as_slice(), "body differs");
    assert_eq!(
        r.frame.header("content-length"),
        Some(body.len().to_string().as_str())
    );
    assert!(
        r.binary,
        "a non-UTF-8 frame must arrive in a binary WebSocket message"
    );

    // A text frame still arrives as text.
    a.send_text_to(&dest, "plain").await?;
    let r = b.recv(WAIT).await?;
    assert_eq!(body_text(&r.frame), "plain");
    assert!(
        !r.binary,
        "a UTF-8 frame arrives in a text message (message_type = auto)"
    );
    Ok(())
}

#[tokio::test]
async fn sixty_kib_frame_is_relayed() -> Result<()> {
    let gw = Gateway::start("sixty_kib_frame").await;
    let dest = format!("/topic/{}", unique("big"));
    let mut a = gw.client().await?;
    let mut b = gw.client().await?;
    b.subscribe(&dest, "s", &[]).await?;
    let body: String = (0..60 * 1024)
        .map(|i| char::from(b'a' + (i % 26) as u8))
        .collect();
    a.send_with_receipt(send(&dest, &body)).await?;
    let m = b.expect(Command::Message, WAIT).await?;
    assert_eq!(m.body.len(), body.len());
    assert!(body_text(&m) == body, "60 KiB body differs");
    Ok(())
}

#[tokio::test]
async fn many_frames_in_one_websocket_message() -> Result<()> {
    let gw = Gateway::start("many_frames_in_one_message").await;
    let dest = format!("/topic/{}", unique("batch"));
    let mut a = gw.client().await?;
    let mut b = gw.client().await?;
    b.subscribe(&dest, "s", &[]).await?;
    let mut frames: Vec<Frame> = (0..10)
        .map(|i| send(&dest, &format!("batch-{i}")))
        .collect();
    frames.push(send(&dest, "batch-last").with_header("receipt", "batch-receipt"));
    a.send_frames_in_one_message(&frames).await?;
    let r = a.expect(Command::Receipt, WAIT).await?;
    assert_eq!(r.header("receipt-id"), Some("batch-receipt"));
    let got: Vec<String> = b
        .recv_messages(11, WAIT)
        .await?
        .iter()
        .map(body_text)
        .collect();
    let mut want: Vec<String> = (0..10).map(|i| format!("batch-{i}")).collect();
    want.push("batch-last".into());
    assert_eq!(got, want);
    Ok(())
}

#[tokio::test]
async fn frame_split_across_websocket_messages() -> Result<()> {
    let gw = Gateway::start("frame_split_across_messages").await;
    let dest = format!("/topic/{}", unique("split"));
    let mut a = gw.client().await?;
    let mut b = gw.client().await?;
    b.subscribe(&dest, "s", &[]).await?;
    for (i, label) in ["in-headers", "in-body", "before-nul"].iter().enumerate() {
        let body = format!("split-{label}-{}", "x".repeat(100));
        let wire = a.encode(&send(&dest, &body));
        let at = match i {
            0 => 12,              // inside "destination:..."
            1 => wire.len() - 50, // inside the body
            _ => wire.len() - 1,  // everything but the NUL
        };
        a.send_binary(wire.slice(..at)).await?;
        a.send_binary(wire.slice(at..)).await?;
        let m = b.expect(Command::Message, WAIT).await?;
        assert_eq!(body_text(&m), body, "split {label}");
    }
    // Three messages for one frame, text this time.
    let wire = a.encode(&send(&dest, "three-parts"));
    let text = String::from_utf8(wire.to_vec())?;
    let (p1, rest) = text.split_at(5);
    let (p2, p3) = rest.split_at(rest.len() / 2);
    for part in [p1, p2, p3] {
        a.send_text(part).await?;
    }
    assert_eq!(
        body_text(&b.expect(Command::Message, WAIT).await?),
        "three-parts"
    );
    Ok(())
}

#[tokio::test]
async fn send_to_unserved_destination_gets_error_then_close() -> Result<()> {
    let gw = Gateway::start("unserved_destination").await;
    let mut c = gw.client().await?;
    c.send_frame(&send("/nowhere/x", "lost")).await?;
    let closed = c.expect_close(WAIT).await?;
    let errors: Vec<&Frame> = closed
        .frames
        .iter()
        .filter(|f| f.command == Command::Error)
        .collect();
    assert_eq!(
        errors.len(),
        1,
        "one ERROR before the close: {:?}",
        closed.frames
    );
    assert!(
        errors[0].header("message").is_some_and(|m| !m.is_empty()),
        "ERROR has a message header: {}",
        show(errors[0])
    );
    assert!(
        error_text(errors[0]).contains("/nowhere/x"),
        "names the destination: {}",
        show(errors[0])
    );

    let mut c = gw.client().await?;
    c.send_frame(
        &Frame::new(Command::Subscribe)
            .with_header("id", "s")
            .with_header("destination", "/nowhere/x"),
    )
    .await?;
    let closed = c.expect_close(WAIT).await?;
    assert!(
        closed
            .frames
            .iter()
            .any(|f| f.command == Command::Error && f.header("message").is_some()),
        "SUBSCRIBE to an unserved destination gets an ERROR: {:?}",
        closed.frames
    );
    // The gateway keeps serving others.
    gw.client().await?.disconnect().await?;
    Ok(())
}

#[tokio::test]
async fn app_and_user_destinations_are_served_by_the_control_plane() -> Result<()> {
    // Exchanges of this test's own, deleted afterwards.
    let (app, user) = (unique("app"), unique("user"));
    let queue = unique("app-queue");
    let mut topo = Topology::new();
    topo.track_exchange(&app);
    topo.track_exchange(&user);
    let gw = Gateway::builder("app_and_user_destinations")
        .set_str("app", "exchange", &app)
        .set_str("user", "exchange", &user)
        .start()
        .await;
    topo.queue(&queue).await?;
    topo.bind(&app, &queue, "chat.sendMessage").await?;
    let (mut c, connected) = gw.client_with(&[]).await?;
    let session = connected.header("session").unwrap_or_default().to_owned();

    // /app: published to the application exchange with routing key
    // chat.sendMessage; the RECEIPT comes once the broker confirmed it.
    c.send_with_receipt(send("/app/chat.sendMessage", "{}"))
        .await?;
    let amqp = e2e::amqp::Amqp::connect().await?;
    amqp.wait_message_count(&queue, 1, WAIT).await?;

    // /user: the session's own queue on the user exchange; an anonymous
    // session's user name is `session-<session id>`.
    c.subscribe("/user/queue/notifications", "u", &[]).await?;
    let key =
        relay_core::router::user_routing_key(&format!("session-{session}"), "queue/notifications");
    amqp.publish(
        &user,
        &key,
        b"for this session",
        e2e::amqp::props(None, &[]),
    )
    .await?;
    let m = c.expect(Command::Message, WAIT).await?;
    assert_eq!(body_text(&m), "for this session", "{}", show(&m));
    assert_eq!(m.header("destination"), Some("/user/queue/notifications"));
    c.disconnect().await?;
    amqp.close().await;
    Ok(())
}

#[tokio::test]
async fn unsubscribe_unknown_id_with_receipt_keeps_connection_usable() -> Result<()> {
    let gw = Gateway::start("unsubscribe_unknown_id").await;
    let dest = format!("/topic/{}", unique("unsub"));
    let mut c = gw.client().await?;
    c.send_frame(
        &Frame::new(Command::Unsubscribe)
            .with_header("id", "never-subscribed")
            .with_header("receipt", "r-unknown"),
    )
    .await?;
    let r = c.expect(Command::Receipt, WAIT).await?;
    assert_eq!(r.header("receipt-id"), Some("r-unknown"));
    c.subscribe(&dest, "s", &[]).await?;
    c.send_text_to(&dest, "still works").await?;
    assert_eq!(
        body_text(&c.expect(Command::Message, WAIT).await?),
        "still works"
    );
    c.disconnect().await?;
    Ok(())
}

#[tokio::test]
async fn broker_error_is_relayed_then_client_closed() -> Result<()> {
    let gw = Gateway::start("broker_error_relayed").await;
    let missing = unique("missing");
    let mut c = gw.client().await?;
    // RabbitMQ answers a SUBSCRIBE to a queue that does not exist with ERROR.
    c.send_frame(
        &Frame::new(Command::Subscribe)
            .with_header("id", "s")
            .with_header("destination", format!("/amq/queue/{missing}")),
    )
    .await?;
    let closed = c.expect_close(WAIT).await?;
    let err = closed
        .frames
        .iter()
        .find(|f| f.command == Command::Error)
        .unwrap_or_else(|| panic!("no ERROR relayed before close: {:?}", closed.frames));
    let text = error_text(err);
    assert!(
        text.contains("not_found") || text.contains(&missing.to_lowercase()),
        "the broker's ERROR is relayed: {}",
        show(err)
    );
    // Everyone else is unaffected.
    gw.client().await?.disconnect().await?;
    Ok(())
}
