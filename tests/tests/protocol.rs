//! STOMP protocol behaviour of the gateway: versions and subprotocols,
//! heart-beats, credentials, CONNECT handling, malformed input and limits.
#![allow(clippy::unwrap_used)]

use anyhow::{bail, Result};
use e2e::stomp::ALL_SUBPROTOCOLS;
use e2e::{
    body_text, error_text, ms, send, show, unique, Command, Frame, Gateway, StompClient, Version,
    WAIT,
};
use std::time::{Duration, Instant};

/// A gateway offering and expecting client heart-beats every second.
async fn heartbeat_gateway(name: &str) -> Gateway {
    Gateway::builder(name)
        .set("session", "heartbeat_send_ms", "1000")
        .set("session", "heartbeat_receive_ms", "1000")
        .start()
        .await
}

#[tokio::test]
async fn each_subprotocol_negotiates_its_stomp_version() -> Result<()> {
    let gw = Gateway::start("subprotocol_negotiation").await;
    let dest = format!("/topic/{}", unique("ver"));
    for version in Version::ALL {
        let mut c = StompClient::connect_ws(&gw.ws_url(), &[version.subprotocol()]).await?;
        assert_eq!(c.subprotocol(), Some(version.subprotocol()));
        let connected = c.connect_stomp(version, None, None, (0, 0)).await?;
        assert_eq!(
            connected.header("version"),
            Some(version.as_str()),
            "{}",
            show(&connected)
        );
        assert!(
            connected.header("server").is_some(),
            "CONNECTED names the server: {}",
            show(&connected)
        );
        c.subscribe(&dest, "s", &[]).await?;
        c.send_text_to(&dest, version.as_str()).await?;
        assert_eq!(
            body_text(&c.expect(Command::Message, WAIT).await?),
            version.as_str()
        );
        c.disconnect().await?;
    }
    // Offering all three: the gateway picks one of them.
    let c = StompClient::connect_ws(&gw.ws_url(), &ALL_SUBPROTOCOLS).await?;
    assert!(
        c.subprotocol()
            .is_some_and(|p| ALL_SUBPROTOCOLS.contains(&p)),
        "picked {:?}",
        c.subprotocol()
    );
    Ok(())
}

#[tokio::test]
async fn escaped_header_values_round_trip() -> Result<()> {
    let gw = Gateway::start("escaped_headers").await;
    for (version, value) in [
        (Version::V1_1, "colon:back\\slash\nnewline"),
        (Version::V1_2, "colon:back\\slash\nnewline\rreturn"),
    ] {
        let dest = format!("/topic/{}", unique("esc"));
        let mut c = StompClient::connect_ws(&gw.ws_url(), &[version.subprotocol()]).await?;
        c.connect_stomp(version, None, None, (0, 0)).await?;
        c.subscribe(&dest, "s", &[]).await?;
        c.send_frame(&send(&dest, "esc").with_header("x-tricky", value))
            .await?;
        let m = c.expect(Command::Message, WAIT).await?;
        assert_eq!(
            m.header("x-tricky"),
            Some(value),
            "STOMP {version}: {}",
            show(&m)
        );
    }
    Ok(())
}

#[tokio::test]
async fn heartbeats_negotiated_and_sent() -> Result<()> {
    let gw = heartbeat_gateway("heartbeats_negotiated").await;
    let mut c = StompClient::connect_ws(&gw.ws_url(), &ALL_SUBPROTOCOLS).await?;
    let connected = c
        .connect_stomp(Version::V1_2, None, None, (1000, 1000))
        .await?;
    assert_eq!(
        connected.header("heart-beat"),
        Some("1000,1000"),
        "{}",
        show(&connected)
    );

    // Keep our side alive and wait for the gateway's heart-beats.
    let deadline = Instant::now() + Duration::from_secs(8);
    while c.heartbeats() < 3 {
        if Instant::now() >= deadline {
            bail!(
                "only {} heart-beats from the gateway in 8 s",
                c.heartbeats()
            );
        }
        c.send_heartbeat().await?;
        if let Some(r) = c.recv_opt(ms(400)).await? {
            bail!("unexpected frame: {}", show(&r.frame));
        }
    }
    // Still connected and usable after several intervals.
    let dest = format!("/topic/{}", unique("hb"));
    c.subscribe(&dest, "s", &[]).await?;
    Ok(())
}

#[tokio::test]
async fn silent_client_with_heartbeats_is_dropped() -> Result<()> {
    let gw = heartbeat_gateway("silent_client_dropped").await;
    let mut c = StompClient::connect_ws(&gw.ws_url(), &ALL_SUBPROTOCOLS).await?;
    let connected = c
        .connect_stomp(Version::V1_2, None, None, (1000, 1000))
        .await?;
    assert_eq!(connected.header("heart-beat"), Some("1000,1000"));
    let start = Instant::now();
    // Send nothing at all from here on.
    let closed = c.expect_close(Duration::from_secs(10)).await?;
    let elapsed = start.elapsed();
    eprintln!("silent client closed after {elapsed:?}: {closed:?}");
    assert!(
        elapsed >= ms(1000),
        "dropped after {elapsed:?}, before even one receive interval passed"
    );
    assert!(
        closed.frames.iter().all(|f| f.command == Command::Error),
        "only an ERROR may precede the close: {:?}",
        closed.frames
    );
    Ok(())
}

#[tokio::test]
async fn client_without_heartbeats_stays_connected() -> Result<()> {
    let gw = heartbeat_gateway("no_heartbeat_client").await;
    let mut c = StompClient::connect_ws(&gw.ws_url(), &ALL_SUBPROTOCOLS).await?;
    let connected = c.connect_stomp(Version::V1_2, None, None, (0, 0)).await?;
    // The server's CONNECTED heart-beat states what it can send and wants
    // (STOMP 1.2 "Heart-beating"); with a client offering 0,0 the effective
    // rates are zero both ways whatever it says, which is what we check.
    assert!(
        connected.header("heart-beat").is_some(),
        "{}",
        show(&connected)
    );
    // Well past twice the gateway's 1 s receive interval: no frame, no close.
    // (An EOL right after a frame is allowed, so count only from here.)
    let before = c.heartbeats();
    if let Some(r) = c.recv_opt(ms(3500)).await? {
        bail!("unexpected frame: {}", show(&r.frame));
    }
    assert_eq!(
        c.heartbeats(),
        before,
        "no heart-beats to a client that asked for none"
    );
    let dest = format!("/topic/{}", unique("nohb"));
    c.subscribe(&dest, "s", &[]).await?;
    c.send_text_to(&dest, "alive").await?;
    assert_eq!(body_text(&c.expect(Command::Message, WAIT).await?), "alive");
    Ok(())
}

#[tokio::test]
async fn browser_credentials_are_replaced_by_configured_ones() -> Result<()> {
    let gw = Gateway::start("browser_credentials_replaced").await;
    let mut c = StompClient::connect_ws(&gw.ws_url(), &ALL_SUBPROTOCOLS).await?;
    let connected = c
        .connect_stomp(Version::V1_2, Some("evil"), Some("wrong"), (0, 0))
        .await?;
    assert_eq!(connected.header("version"), Some("1.2"));
    let dest = format!("/topic/{}", unique("cred"));
    c.subscribe(&dest, "s", &[]).await?;
    c.send_text_to(&dest, "in").await?;
    assert_eq!(body_text(&c.expect(Command::Message, WAIT).await?), "in");
    Ok(())
}

#[tokio::test]
async fn wrong_configured_client_passcode_relays_broker_error() -> Result<()> {
    let gw = Gateway::builder("wrong_client_passcode")
        // About the session's own STOMP connection: opened at CONNECT.
        .per_session()
        .set_str("broker", "client_passcode", "definitely-not-the-passcode")
        .start()
        .await;
    let mut c = StompClient::connect_ws(&gw.ws_url(), &ALL_SUBPROTOCOLS).await?;
    c.send_frame(&StompClient::connect_frame(
        Version::V1_2,
        Some("guest"),
        Some("guest"),
        (0, 0),
    ))
    .await?;
    let err = c.expect(Command::Error, WAIT).await?;
    let text = error_text(&err);
    assert!(
        text.contains("access refused") || text.contains("bad connect") || text.contains("login"),
        "RabbitMQ's refusal is relayed: {}",
        show(&err)
    );
    c.expect_close(WAIT).await?;
    Ok(())
}

#[tokio::test]
async fn frames_sent_before_connected_are_held() -> Result<()> {
    let gw = Gateway::start("frames_before_connected").await;
    let dest = format!("/topic/{}", unique("early"));
    let mut c = StompClient::connect_ws(&gw.ws_url(), &["v12.stomp"]).await?;
    c.send_frames_in_one_message(&[
        StompClient::connect_frame(Version::V1_2, None, None, (0, 0)),
        Frame::new(Command::Subscribe)
            .with_header("id", "early")
            .with_header("destination", dest.as_str())
            .with_header("receipt", "r-early-sub"),
        send(&dest, "sent before CONNECTED").with_header("receipt", "r-early-send"),
    ])
    .await?;
    c.read_connected().await?;
    c.await_receipt("r-early-sub").await?;
    let m = c
        .recv_where("the early MESSAGE", WAIT, |f| f.command == Command::Message)
        .await?
        .frame;
    assert_eq!(body_text(&m), "sent before CONNECTED");
    assert_eq!(m.header("subscription"), Some("early"));
    c.await_receipt("r-early-send").await?;
    Ok(())
}

#[tokio::test]
async fn malformed_frame_gets_error_then_close() -> Result<()> {
    let gw = Gateway::start("malformed_frame").await;
    let mut c = gw.client().await?;
    c.send_text("NOT-A-COMMAND\nfoo:bar\n\n\0").await?;
    let closed = c.expect_close(WAIT).await?;
    assert!(
        closed
            .frames
            .iter()
            .any(|f| f.command == Command::Error
                && f.header("message").is_some_and(|m| !m.is_empty())),
        "ERROR with a message before the close: {:?}",
        closed.frames
    );
    // Before CONNECT too.
    let mut c = StompClient::connect_ws(&gw.ws_url(), &ALL_SUBPROTOCOLS).await?;
    c.send_text("garbage\n\n\0").await?;
    let closed = c.expect_close(WAIT).await?;
    assert!(
        closed.frames.iter().any(|f| f.command == Command::Error),
        "{:?}",
        closed.frames
    );
    gw.client().await?.disconnect().await?;
    Ok(())
}

#[tokio::test]
async fn oversized_frame_gets_error_then_close() -> Result<()> {
    let gw = Gateway::builder("oversized_frame")
        .set("session", "max_frame_size", "16384")
        .start()
        .await;
    let dest = format!("/topic/{}", unique("huge"));
    let mut c = gw.client().await?;
    c.send_text_to(&dest, &"z".repeat(20 * 1024)).await?;
    let closed = c.expect_close(WAIT).await?;
    let err = closed.frames.iter().find(|f| f.command == Command::Error);
    assert!(err.is_some(), "ERROR before the close: {:?}", closed.frames);
    gw.client().await?.disconnect().await?;
    Ok(())
}

#[tokio::test]
async fn websocket_without_connect_is_closed_after_connect_timeout() -> Result<()> {
    let gw = Gateway::builder("connect_timeout")
        .set("session", "connect_timeout_ms", "1000")
        .start()
        .await;
    let mut c = StompClient::connect_ws(&gw.ws_url(), &ALL_SUBPROTOCOLS).await?;
    let closed = c.expect_close(WAIT).await?;
    assert!(
        closed.frames.iter().all(|f| f.command == Command::Error),
        "{:?}",
        closed.frames
    );
    Ok(())
}

#[tokio::test]
async fn allowed_origins_are_enforced() -> Result<()> {
    let gw = Gateway::builder("allowed_origins")
        .set("server", "allowed_origins", r#"["http://app.test"]"#)
        .start()
        .await;
    let url = gw.ws_url();
    let refused = StompClient::connect_ws_with_headers(
        &url,
        &ALL_SUBPROTOCOLS,
        &[("Origin", "http://evil.test")],
    )
    .await;
    let err = match refused {
        Ok(_) => bail!("a WebSocket from a disallowed Origin was accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("403"), "refused with 403 Forbidden: {err}");

    let mut ok = StompClient::connect_ws_with_headers(
        &url,
        &ALL_SUBPROTOCOLS,
        &[("Origin", "http://app.test")],
    )
    .await?;
    ok.connect_stomp(Version::V1_2, None, None, (0, 0)).await?;
    // Non-browser clients send no Origin and are always allowed.
    gw.client().await?.disconnect().await?;
    Ok(())
}

#[tokio::test]
async fn max_connections_is_enforced() -> Result<()> {
    let gw = Gateway::builder("max_connections")
        .set("server", "max_connections", "2")
        .start()
        .await;
    let a = gw.client().await?;
    let _b = gw.client().await?;
    // The third is refused: at the handshake, or with an ERROR / close
    // instead of CONNECTED.
    match StompClient::connect_ws(&gw.ws_url(), &ALL_SUBPROTOCOLS).await {
        Err(_) => {}
        Ok(mut c) => {
            let _ = c
                .send_frame(&StompClient::connect_frame(
                    Version::V1_2,
                    None,
                    None,
                    (0, 0),
                ))
                .await;
            match c.recv_opt(WAIT).await {
                Ok(Some(r)) if r.frame.command == Command::Connected => {
                    bail!("a third connection was accepted with max_connections = 2")
                }
                Ok(None) => bail!("a third connection neither served nor refused"),
                Ok(Some(_)) | Err(_) => {}
            }
        }
    }
    // A slot frees up when a client leaves.
    a.disconnect().await?;
    let deadline = Instant::now() + WAIT;
    loop {
        match gw.client().await {
            Ok(c) => {
                c.disconnect().await?;
                break;
            }
            Err(e) if Instant::now() >= deadline => {
                bail!("no slot after a client left: {e:#}")
            }
            Err(_) => tokio::time::sleep(ms(100)).await,
        }
    }
    Ok(())
}

#[tokio::test]
async fn max_subscriptions_is_enforced() -> Result<()> {
    let gw = Gateway::builder("max_subscriptions")
        .set("session", "max_subscriptions", "2")
        .start()
        .await;
    let dest = format!("/topic/{}", unique("subs"));
    let mut c = gw.client().await?;
    c.subscribe(&dest, "s1", &[]).await?;
    c.subscribe(&dest, "s2", &[]).await?;
    c.send_frame(
        &Frame::new(Command::Subscribe)
            .with_header("id", "s3")
            .with_header("destination", dest.as_str()),
    )
    .await?;
    let closed = c.expect_close(WAIT).await?;
    assert!(
        closed.frames.iter().any(|f| f.command == Command::Error),
        "ERROR before the close: {:?}",
        closed.frames
    );
    Ok(())
}

#[tokio::test]
async fn message_type_binary_sends_every_frame_as_binary() -> Result<()> {
    let gw = Gateway::builder("message_type_binary")
        .set_str("server", "message_type", "binary")
        .start()
        .await;
    let dest = format!("/topic/{}", unique("asbin"));
    let mut c = StompClient::connect_ws(&gw.ws_url(), &ALL_SUBPROTOCOLS).await?;
    c.send_frame(&StompClient::connect_frame(
        Version::V1_2,
        None,
        None,
        (0, 0),
    ))
    .await?;
    let r = c.recv(WAIT).await?;
    assert_eq!(r.frame.command, Command::Connected, "{}", show(&r.frame));
    assert!(r.binary, "CONNECTED in a binary message");
    c.set_version(Version::V1_2);
    c.subscribe(&dest, "s", &[]).await?;
    c.send_text_to(&dest, "text body").await?;
    let r = c.recv(WAIT).await?;
    assert_eq!(body_text(&r.frame), "text body");
    assert!(r.binary, "MESSAGE in a binary message");
    Ok(())
}
