//! Authorization end to end: the attacks of issue 8 are refused by the real
//! gateway in front of the real RabbitMQ, the owner still gets her messages,
//! and `[[auth.rules]]` (the seed chat's room membership from a `rooms`
//! claim) allow a member and deny everyone else.
//!
//! Every test gives its gateway its own application and user exchanges and
//! deletes what it declared (a `Topology` guard declared first, so it drops
//! last).
#![allow(clippy::unwrap_used)]

use anyhow::{anyhow, ensure, Context, Result};
use e2e::amqp::{self, Amqp};
use e2e::gateway::toml_str;
use e2e::rabbit::management_get;
use e2e::{
    body_text, check_config, error_text, jwt, send, show, unique, Command, Frame, Gateway,
    GatewayBuilder, StompClient, Topology, WAIT,
};
use relay_core::router::user_routing_key;
use serde_json::{json, Value};
use std::time::Duration;

/// How long a client must stay silent to count as "did not receive it".
const QUIET: Duration = Duration::from_millis(1500);

/// A JWT gateway with its own app and user exchanges (deleted by `topo`).
fn builder(name: &str, secret: &str, topo: &mut Topology) -> (GatewayBuilder, String, String) {
    let app = unique("sec.app");
    let user = unique("sec.user");
    topo.track_exchange(&app);
    topo.track_exchange(&user);
    let b = Gateway::builder(name)
        .set_str("app", "exchange", &app)
        .set_str("user", "exchange", &user)
        .set_str("auth", "mode", "jwt")
        .set_str("auth", "jwt_secret", secret);
    (b, app, user)
}

async fn connect_with_claims(gw: &Gateway, secret: &str, claims: Value) -> Result<StompClient> {
    let token = jwt::token_with_claims(secret, claims);
    let (c, _) = gw
        .client_with(&[("Authorization", &format!("Bearer {token}"))])
        .await?;
    Ok(c)
}

async fn connect_as(gw: &Gateway, secret: &str, user: &str) -> Result<StompClient> {
    connect_with_claims(
        gw,
        secret,
        json!({ "sub": user, "exp": jwt::now() + 600, "iat": jwt::now() }),
    )
    .await
}

fn subscribe(destination: &str, id: &str) -> Frame {
    Frame::new(Command::Subscribe)
        .with_header("id", id)
        .with_header("destination", destination)
}

/// Sends `frame` (which must be refused) and reads until the gateway closes
/// the connection: returns the ERROR, after checking that its `message`
/// names the command and the destination and that no MESSAGE came first.
async fn expect_denied(c: &mut StompClient, frame: Frame) -> Result<Frame> {
    let what = format!(
        "{} {}",
        frame.command.as_str(),
        frame.header("destination").unwrap_or_default()
    );
    c.send_frame(&frame).await?;
    let closed = c
        .expect_close(WAIT)
        .await
        .with_context(|| format!("{what} must be refused with an ERROR and a close"))?;
    if let Some(m) = closed.frames.iter().find(|f| f.command == Command::Message) {
        return Err(anyhow!("{what}: received a MESSAGE: {}", show(m)));
    }
    let err = closed
        .frames
        .iter()
        .find(|f| f.command == Command::Error)
        .ok_or_else(|| {
            anyhow!(
                "{what}: closed without an ERROR; frames: [{}]",
                closed
                    .frames
                    .iter()
                    .map(show)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })?;
    let message = err.header("message").unwrap_or_default();
    ensure!(
        message.contains(frame.command.as_str())
            && message.contains(frame.header("destination").unwrap_or_default())
            && message.contains("not allowed"),
        "{what}: the ERROR message names the command and destination: {}",
        show(err)
    );
    Ok(err.clone())
}

/// Asserts `c` receives nothing for [`QUIET`].
async fn assert_quiet(c: &mut StompClient, who: &str) -> Result<()> {
    if let Some(r) = c.recv_opt(QUIET).await? {
        return Err(anyhow!(
            "{who} must not receive anything, got {}",
            show(&r.frame)
        ));
    }
    Ok(())
}

/// The queues bound to `exchange` with `key` (the sessions' user queues).
async fn queues_bound(exchange: &str, key: &str) -> Result<Vec<String>> {
    let v = management_get(&format!("/api/exchanges/%2F/{exchange}/bindings/source")).await?;
    Ok(v.as_array()
        .ok_or_else(|| anyhow!("bindings of {exchange}: {v}"))?
        .iter()
        .filter(|b| b["routing_key"].as_str() == Some(key))
        .filter_map(|b| b["destination"].as_str().map(str::to_owned))
        .collect())
}

#[tokio::test]
async fn mallory_cannot_read_alices_user_destination() -> Result<()> {
    let secret = jwt::secret();
    let mut topo = Topology::new();
    let (b, _app, user_ex) = builder("sec_read_user", &secret, &mut topo);
    let gw = b.start().await;

    let mut alice = connect_as(&gw, &secret, "alice").await?;
    alice
        .subscribe("/user/queue/notifications", "n", &[])
        .await?;
    let key = user_routing_key("alice", "queue/notifications");
    let alice_queues = queues_bound(&user_ex, &key).await?;
    ensure!(alice_queues.len() == 1, "alice's queue: {alice_queues:?}");
    let alice_queue = &alice_queues[0];

    // Straight at the user exchange, at alice's queue by name (RabbitMQ's
    // subscription queue names are a hash of destination and id, so an
    // attacker can compute them), and through x-queue-name.
    let attacks = [
        subscribe(&format!("/exchange/{user_ex}/{key}"), "steal"),
        subscribe(&format!("/exchange/{user_ex}"), "steal"),
        subscribe(&format!("/amq/queue/{alice_queue}"), "steal"),
        subscribe(&format!("/queue/{alice_queue}"), "steal"),
        subscribe(&format!("/topic/{}", unique("sec.decoy")), "steal")
            .with_header("x-queue-name", alice_queue.as_str()),
    ];
    let amqp = Amqp::connect().await?;
    for (i, attack) in attacks.into_iter().enumerate() {
        let mut mallory = connect_as(&gw, &secret, "mallory").await?;
        let what = show(&attack);
        // With a receipt: were the subscription made, the message below
        // would be published after it and reach mallory.
        mallory
            .send_frame(&attack.with_header("receipt", "steal"))
            .await?;
        let mut frames = vec![mallory.recv(WAIT).await.context(what.clone())?.frame];
        let body = format!("secret {i}");
        amqp.publish(&user_ex, &key, body.as_bytes(), amqp::props(None, &[]))
            .await?;
        while let Ok(Some(r)) = mallory.recv_opt(QUIET).await {
            frames.push(r.frame);
        }
        for f in &frames {
            ensure!(
                f.command != Command::Message,
                "mallory read alice's message with {what}: {}",
                show(f)
            );
        }
        let err = frames
            .iter()
            .find(|f| f.command == Command::Error)
            .ok_or_else(|| {
                anyhow!(
                    "{what}: no ERROR; frames: [{}]",
                    frames.iter().map(show).collect::<Vec<_>>().join(", ")
                )
            })?;
        let message = err.header("message").unwrap_or_default();
        ensure!(
            message.contains("SUBSCRIBE") && message.contains("not allowed"),
            "{what}: {}",
            show(err)
        );
        // Alice still gets every message of hers.
        let m = alice.expect(Command::Message, WAIT).await.context(what)?;
        assert_eq!(body_text(&m), body);
        assert_eq!(m.header("destination"), Some("/user/queue/notifications"));
    }
    ensure!(
        queues_bound(&user_ex, &key).await? == alice_queues,
        "nothing but alice's own queue is bound with her key"
    );

    // The denials are counted by command and logged with who and what.
    let metrics = gw.admin_get("/metrics").await?.body;
    ensure!(
        metrics
            .lines()
            .any(|l| l.starts_with("stomp_gateway_auth_denials_total")
                && l.contains("command=\"SUBSCRIBE\"")
                && l.ends_with(" 5")),
        "denials counted: {}",
        metrics
            .lines()
            .filter(|l| l.contains("denials"))
            .collect::<Vec<_>>()
            .join("\n")
    );
    let log = gw.log();
    ensure!(
        log.lines()
            .any(|l| l.contains("access denied") && l.contains("mallory") && l.contains(&key)),
        "one log line says mallory was denied alice's destination"
    );
    alice.disconnect().await?;
    amqp.close().await;
    Ok(())
}

#[tokio::test]
async fn forged_identity_headers_never_reach_a_backend() -> Result<()> {
    let secret = jwt::secret();
    let mut topo = Topology::new();
    let (b, app_ex, _user) = builder("sec_forged_identity", &secret, &mut topo);
    let gw = b.start().await;
    let amqp = Amqp::connect().await?;
    let app_queue = amqp.bound_queue(&app_ex, &["chat.*"]).await?;
    let topic_key = unique("sec.topic");
    let topic_queue = amqp.bound_queue("amq.topic", &[&topic_key]).await?;

    // Through the relay, straight into the backends' exchange.
    let mut mallory = connect_as(&gw, &secret, "mallory").await?;
    expect_denied(
        &mut mallory,
        send(&format!("/exchange/{app_ex}/chat.x"), "as alice").with_header("stomp-user", "alice"),
    )
    .await?;
    // A user-id that is not hers (RabbitMQ's own check, made by the gateway).
    let mut mallory = connect_as(&gw, &secret, "mallory").await?;
    expect_denied(
        &mut mallory,
        send(&format!("/topic/{topic_key}"), "as alice").with_header("user-id", "alice"),
    )
    .await?;

    // Allowed routes carry no forged identity: stripped on the relay, and
    // replaced by the authenticated user on /app.
    let mut mallory = connect_as(&gw, &secret, "mallory").await?;
    mallory
        .send_with_receipt(
            send(&format!("/topic/{topic_key}"), "relayed")
                .with_header("stomp-user", "alice")
                .with_header("Stomp-Session", "forged")
                .with_header("x-trace", "t"),
        )
        .await?;
    mallory
        .send_with_receipt(send("/app/chat.send", "app").with_header("stomp-user", "alice"))
        .await?;
    mallory.disconnect().await?;

    let relayed = amqp.next(&topic_queue, WAIT).await?;
    let p = &relayed.delivery.properties;
    let names = amqp::header_names(p);
    ensure!(
        !names
            .iter()
            .any(|n| n.to_ascii_lowercase().starts_with("stomp-")),
        "no stomp-* header relayed: {names:?}"
    );
    assert_eq!(amqp::header(p, "x-trace").as_deref(), Some("t"));

    let app = amqp.next(&app_queue, WAIT).await?;
    assert_eq!(String::from_utf8_lossy(&app.delivery.data), "app");
    assert_eq!(
        amqp::header(&app.delivery.properties, "stomp-user").as_deref(),
        Some("mallory")
    );
    // Nothing else reached the backends' queue (the denied SEND above).
    ensure!(
        amqp.get(&app_queue).await?.is_none(),
        "only mallory's own /app message reached the backends"
    );
    amqp.close().await;
    Ok(())
}

#[tokio::test]
async fn client_send_enabled_false_holds_on_every_path() -> Result<()> {
    let secret = jwt::secret();
    let mut topo = Topology::new();
    let (b, _app, user_ex) = builder("sec_user_send", &secret, &mut topo);
    let gw = b.start().await; // user.client_send_enabled = false (default)

    let mut alice = connect_as(&gw, &secret, "alice").await?;
    alice
        .subscribe("/user/queue/notifications", "n", &[])
        .await?;
    let key = user_routing_key("alice", "queue/notifications");
    let alice_queue = queues_bound(&user_ex, &key)
        .await?
        .pop()
        .ok_or_else(|| anyhow!("alice's queue is bound"))?;

    for dest in [
        format!("/exchange/{user_ex}/{key}"),
        format!("/amq/queue/{alice_queue}"),
        format!("/queue/{alice_queue}"),
        "/user/alice/queue/notifications".to_owned(),
    ] {
        let mut mallory = connect_as(&gw, &secret, "mallory").await?;
        expect_denied(&mut mallory, send(&dest, "forged notification")).await?;
    }
    assert_quiet(&mut alice, "alice (no forged notification)").await?;

    // Her own notifications still arrive.
    let amqp = Amqp::connect().await?;
    amqp.publish(&user_ex, &key, b"real", amqp::props(None, &[]))
        .await?;
    let m = alice.expect(Command::Message, WAIT).await?;
    assert_eq!(body_text(&m), "real");
    alice.disconnect().await?;
    amqp.close().await;
    Ok(())
}

#[tokio::test]
async fn seed_chat_rule_lets_room_members_in_and_keeps_others_out() -> Result<()> {
    let secret = jwt::secret();
    let mut topo = Topology::new();
    let chat = unique("sec.adme.exchange");
    topo.exchange(&chat, "topic").await?;
    let (b, _app, _user) = builder("sec_chat_rule", &secret, &mut topo);
    let rules = format!(
        r#"[
  {{ commands = ["SUBSCRIBE"], destination = {room}, allow_if = {{ claim_contains = {{ claim = "rooms", value = "{{id}}" }} }} }},
  {{ destination = {all}, deny = true }},
  {{ commands = ["SEND"], destination = "/app/**", allow_if = "authenticated" }},
]"#,
        room = toml_str(&format!("/exchange/{chat}/room.{{id}}")),
        all = toml_str(&format!("/exchange/{chat}/**")),
    );
    let gw = b.set("auth", "rules", &rules).start().await;
    let claims = |sub: &str, rooms: Value| json!({ "sub": sub, "rooms": rooms, "exp": jwt::now() + 600, "iat": jwt::now() });

    let room = format!("/exchange/{chat}/room.42");
    let mut alice = connect_with_claims(&gw, &secret, claims("alice", json!(["42", "7"]))).await?;
    alice.subscribe(&room, "r", &[]).await?;

    for (dest, sub_claims) in [
        (room.clone(), json!(["7"])),
        (room.clone(), json!([])),
        (format!("/exchange/{chat}/room.*"), json!(["7"])),
        (format!("/exchange/{chat}/#"), json!(["42"])),
    ] {
        let mut mallory =
            connect_with_claims(&gw, &secret, claims("mallory", sub_claims.clone())).await?;
        let err = expect_denied(&mut mallory, subscribe(&dest, "r")).await?;
        ensure!(
            error_text(&err).contains("auth.rules["),
            "the ERROR says which rule: {}",
            show(&err)
        );
    }
    // A member may not publish into the room directly (second rule).
    let mut alice_send = connect_with_claims(&gw, &secret, claims("alice", json!(["42"]))).await?;
    expect_denied(&mut alice_send, send(&room, "direct")).await?;

    let amqp = Amqp::connect().await?;
    amqp.publish(&chat, "room.42", b"hello room", amqp::props(None, &[]))
        .await?;
    let m = alice.expect(Command::Message, WAIT).await?;
    assert_eq!(body_text(&m), "hello room");
    alice.disconnect().await?;
    amqp.close().await;
    Ok(())
}

#[test]
fn check_config_names_the_broken_rule() -> Result<()> {
    let cases = [
        (
            r#"{ destination = "topic/x", deny = true }"#,
            "auth.rules[1].destination",
            "must start with '/'",
        ),
        (
            r#"{ destination = "/topic/{id}", allow_if = { user_equals = "{user}" } }"#,
            "auth.rules[1].allow_if",
            "{user} is not a capture",
        ),
        (
            r#"{ destination = "/topic/x", allow_if = "admin" }"#,
            "auth.rules[1].allow_if",
            "unknown condition \"admin\"",
        ),
        (
            r#"{ destination = "/topic/x", allow_if = { has_role = "admin" } }"#,
            "auth.rules[1].allow_if",
            "unknown condition \"has_role\"",
        ),
        (
            r#"{ commands = ["PUBLISH"], destination = "/topic/x", deny = true }"#,
            "auth.rules[1].commands",
            "unknown command",
        ),
        (
            r#"{ destination = "/topic/x", deny = true, colour = "red" }"#,
            "auth.rules[1].colour",
            "unknown key",
        ),
    ];
    for (rule, key, reason) in cases {
        let toml = format!(
            "[auth]\ndefault = \"deny\"\nrules = [\n  {{ destination = \"/app/**\", allow = true }},\n  {rule},\n]\n"
        );
        let out = check_config("sec_check_rules", &toml, &[])?;
        let stderr = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(64), "{rule}: {stderr}");
        assert!(
            stderr.contains(key) && stderr.contains(reason),
            "{rule}: expected {key} and {reason:?} in: {stderr}"
        );
    }
    let out = check_config("sec_check_default", "[auth]\ndefault = \"maybe\"\n", &[])?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(64), "{stderr}");
    assert!(stderr.contains("auth.default"), "{stderr}");
    let ok = check_config(
        "sec_check_ok",
        "[auth]\ndefault = \"deny\"\n[[auth.rules]]\ncommands = [\"SUBSCRIBE\"]\ndestination = \"/exchange/chat/room.{id}\"\nallow_if = { claim_contains = { claim = \"rooms\", value = \"{id}\" } }\n",
        &[],
    )?;
    assert_eq!(
        ok.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&ok.stderr)
    );
    Ok(())
}
