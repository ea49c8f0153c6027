//! The AMQP control plane end to end: declared topology, application
//! destinations (`/app/**` published to backends), JWT on CONNECT, user
//! destinations across gateways, the publish API, and the seed chat with the
//! example backend. Real gateway processes, real RabbitMQ, lapin for what a
//! backend sees.
//!
//! Every test gives its gateways their own application and user exchanges
//! (`[app] exchange`, `[user] exchange`) and topology names, and deletes them
//! afterwards (a `Topology` guard declared before the gateways, so it drops
//! after them).
#![allow(clippy::unwrap_used)]

use anyhow::{anyhow, ensure, Context, Result};
use e2e::amqp::{self, Amqp};
use e2e::backend::ChatBackend;
use e2e::gateway::toml_str;
use e2e::rabbit::{management_get, management_status};
use e2e::{
    body_text, check_config, error_text, jwt, send, show, unique, Command, Frame, Gateway,
    GatewayBuilder, Proxy, StompClient, Topology, WAIT,
};
use relay_core::router::user_routing_key;
use serde_json::{json, Value};
use std::time::Duration;
use tokio::time::Instant;

/// How long a client must stay silent to count as "did not receive it".
const QUIET: Duration = Duration::from_millis(1500);

/// A gateway builder with its own app and user exchanges, which `topo`
/// deletes on drop. Returns the builder, the app exchange and the user
/// exchange.
fn builder(name: &str, topo: &mut Topology) -> (GatewayBuilder, String, String) {
    let app = unique("app");
    let user = unique("user");
    topo.track_exchange(&app);
    topo.track_exchange(&user);
    let b = Gateway::builder(name)
        .set_str("app", "exchange", &app)
        .set_str("user", "exchange", &user);
    (b, app, user)
}

/// `[topology]` with one durable topic exchange, one durable queue and a
/// binding between them, as inline TOML tables.
fn with_topology(b: GatewayBuilder, exchange: &str, queue: &str, key: &str) -> GatewayBuilder {
    b.set(
        "topology",
        "exchanges",
        &format!(
            r#"[ {{ name = {}, type = "topic", durable = true }} ]"#,
            toml_str(exchange)
        ),
    )
    .set(
        "topology",
        "queues",
        &format!(r#"[ {{ name = {}, durable = true }} ]"#, toml_str(queue)),
    )
    .set(
        "topology",
        "bindings",
        &format!(
            r#"[ {{ exchange = {}, queue = {}, routing_key = {} }} ]"#,
            toml_str(exchange),
            toml_str(queue),
            toml_str(key)
        ),
    )
}

/// A SEND with a JSON body (`content-type: application/json`).
fn json_send(destination: &str, body: &str) -> Frame {
    let mut f = send(destination, body);
    f.set_header("content-type", "application/json");
    f
}

fn bearer(token: &str) -> String {
    format!("Bearer {token}")
}

/// Connects with a JWT for `user`; checks CONNECTED names the user.
async fn connect_as(gw: &Gateway, secret: &str, user: &str) -> Result<StompClient> {
    let auth = bearer(&jwt::token(secret, user));
    let (c, connected) = gw.client_with(&[("Authorization", &auth)]).await?;
    ensure!(
        connected.header("user-name") == Some(user),
        "CONNECTED names the user {user:?}: {}",
        show(&connected)
    );
    Ok(c)
}

/// Asserts `c` receives nothing (no frame at all) for [`QUIET`].
async fn assert_quiet(c: &mut StompClient, who: &str) -> Result<()> {
    if let Some(r) = c.recv_opt(QUIET).await? {
        return Err(anyhow!(
            "{who} must not receive anything, got {}",
            show(&r.frame)
        ));
    }
    Ok(())
}

/// The ERROR among the frames a closed connection left behind.
fn error_frame(frames: &[Frame]) -> Result<&Frame> {
    frames
        .iter()
        .find(|f| f.command == Command::Error)
        .ok_or_else(|| {
            anyhow!(
                "no ERROR before the close; frames: [{}]",
                frames.iter().map(show).collect::<Vec<_>>().join(", ")
            )
        })
}

/// `GET /api/exchanges/%2F/<exchange>/bindings/source`.
async fn bindings_from(exchange: &str) -> Result<Vec<Value>> {
    let v = management_get(&format!("/api/exchanges/%2F/{exchange}/bindings/source")).await?;
    v.as_array()
        .cloned()
        .ok_or_else(|| anyhow!("bindings of {exchange} are not a list: {v}"))
}

// ---------------------------------------------------------------------------
// Topology
// ---------------------------------------------------------------------------

#[tokio::test]
async fn topology_is_declared_idempotently_and_a_conflict_stops_start_up() -> Result<()> {
    let mut topo = Topology::new();
    let (b, app, user) = builder("topology_declared", &mut topo);
    let ex = unique("adme.exchange");
    let q = unique("adme.queue");
    topo.track_exchange(&ex);
    topo.track_queue(&q);
    let b = with_topology(b, &ex, &q, "room.*");

    let gw1 = b.clone().start().await;
    let amqp = Amqp::connect().await?;
    for name in [&ex, &app, &user] {
        ensure!(
            amqp.exchange_exists(name).await?,
            "exchange {name} declared"
        );
    }
    ensure!(amqp.queue_exists(&q).await?, "queue {q} declared");

    let x = management_get(&format!("/api/exchanges/%2F/{ex}")).await?;
    assert_eq!(
        (x["type"].as_str(), x["durable"].as_bool()),
        (Some("topic"), Some(true)),
        "{x}"
    );
    let x = management_get(&format!("/api/exchanges/%2F/{app}")).await?;
    assert_eq!(
        (x["type"].as_str(), x["durable"].as_bool()),
        (Some("topic"), Some(true)),
        "app exchange: {x}"
    );
    let x = management_get(&format!("/api/exchanges/%2F/{user}")).await?;
    assert_eq!(
        (x["type"].as_str(), x["durable"].as_bool()),
        (Some("direct"), Some(true)),
        "user exchange: {x}"
    );
    let qv = management_get(&format!("/api/queues/%2F/{q}")).await?;
    assert_eq!(qv["durable"].as_bool(), Some(true), "{qv}");
    assert_eq!(qv["auto_delete"].as_bool(), Some(false), "{qv}");
    assert_eq!(qv["exclusive"].as_bool(), Some(false), "{qv}");

    let bindings_path = format!("/api/bindings/%2F/e/{ex}/q/{q}");
    let bindings = management_get(&bindings_path).await?;
    let keys: Vec<&str> = bindings
        .as_array()
        .into_iter()
        .flatten()
        .filter_map(|b| b["routing_key"].as_str())
        .collect();
    assert_eq!(keys, vec!["room.*"], "{bindings}");

    // The same topology again is a no-op: the second gateway starts ready,
    // the first stays ready, nothing is duplicated.
    let gw2 = b.clone().start().await;
    assert_eq!(gw1.admin_get("/readyz").await?.status, 200);
    assert_eq!(gw2.admin_get("/readyz").await?.status, 200);
    let again = management_get(&bindings_path).await?;
    assert_eq!(again.as_array().map(Vec::len), Some(1), "{again}");

    // The same queue name with `durable` flipped: RabbitMQ refuses with
    // PRECONDITION_FAILED and the gateway does not start.
    let conflicting = b.set(
        "topology",
        "queues",
        &format!(r#"[ {{ name = {}, durable = false }} ]"#, toml_str(&q)),
    );
    let (code, log) = conflicting.start_expect_exit(Duration::from_secs(30)).await;
    assert!(
        matches!(code, Some(c) if c != 0),
        "a conflicting declaration makes the gateway exit non-zero (exit {code:?}); log:\n{log}"
    );
    assert!(
        log.contains(&q) && log.contains("durable"),
        "the log names the queue {q} and the property (durable):\n{log}"
    );
    // Said once, in one line: no raw lapin AMQPError dump, no repeats.
    assert_eq!(
        log.matches("inequivalent arg 'durable'").count(),
        1,
        "the conflict is logged once:\n{log}"
    );
    assert!(!log.contains("AMQPError"), "no raw lapin error:\n{log}");
    // Nothing was changed by the refused declaration.
    let qv = management_get(&format!("/api/queues/%2F/{q}")).await?;
    assert_eq!(qv["durable"].as_bool(), Some(true), "{qv}");
    assert_eq!(gw1.admin_get("/readyz").await?.status, 200);
    amqp.close().await;
    Ok(())
}

// ---------------------------------------------------------------------------
// Application destinations
// ---------------------------------------------------------------------------

#[tokio::test]
async fn app_send_reaches_a_backend_with_the_session_identity() -> Result<()> {
    let mut topo = Topology::new();
    let (b, app, _user) = builder("app_send", &mut topo);
    let pod = format!("e2e-pod-{:08x}", rand::random::<u32>());
    let gw = b.env("POD_NAME", &pod).start().await;
    let amqp = Amqp::connect().await?;
    let q = amqp.bound_queue(&app, &["chat.*"]).await?;

    let (mut c, connected) = gw.client_with(&[]).await?;
    let session = connected
        .header("session")
        .ok_or_else(|| anyhow!("CONNECTED has a session: {}", show(&connected)))?
        .to_owned();
    assert_eq!(
        connected.header("user-name"),
        None,
        "anonymous: {}",
        show(&connected)
    );

    let body = r#"{"roomId":"42","content":"hi"}"#;
    let frame = json_send("/app/chat.sendMessage", body)
        .with_header("x-trace", "t-1")
        .with_header("stomp-user", "admin")
        .with_header("stomp-session", "forged")
        .with_header("Stomp-Destination", "/app/forged");
    c.send_with_receipt(frame).await?;

    // The RECEIPT comes after the broker's confirm: the message is in the
    // queue already (no waiting).
    let m = amqp
        .get(&q)
        .await?
        .ok_or_else(|| anyhow!("RECEIPT arrived but the message is not in the queue yet"))?;
    assert_eq!(m.delivery.exchange.as_str(), app);
    assert_eq!(m.delivery.routing_key.as_str(), "chat.sendMessage");
    assert_eq!(String::from_utf8_lossy(&m.delivery.data), body);
    let p = &m.delivery.properties;
    assert_eq!(
        p.content_type().as_ref().map(|s| s.as_str()),
        Some("application/json")
    );
    assert_eq!(p.app_id().as_ref().map(|s| s.as_str()), Some(pod.as_str()));
    assert!(
        p.message_id()
            .as_ref()
            .is_some_and(|s| !s.as_str().is_empty()),
        "message_id set: {p:?}"
    );
    assert!(p.timestamp().is_some(), "timestamp set: {p:?}");
    assert_eq!(
        amqp::header(p, "stomp-session").as_deref(),
        Some(session.as_str())
    );
    assert_eq!(
        amqp::header(p, "stomp-destination").as_deref(),
        Some("/app/chat.sendMessage")
    );
    assert_eq!(amqp::header(p, "x-trace").as_deref(), Some("t-1"));
    let names = amqp::header_names(p);
    assert!(
        !names.iter().any(|n| n.eq_ignore_ascii_case("stomp-user")),
        "an anonymous session's spoofed stomp-user is not passed on: {names:?}"
    );
    for n in &names {
        let lower = n.to_ascii_lowercase();
        assert!(
            !matches!(
                lower.as_str(),
                "destination" | "receipt" | "content-length" | "content-type" | "transaction"
            ),
            "STOMP protocol header {n} copied: {names:?}"
        );
        if lower.starts_with("stomp-") {
            assert!(
                n == "stomp-session" || n == "stomp-destination",
                "only the gateway's own stomp-* headers: {names:?}"
            );
        }
    }
    assert!(amqp.get(&q).await?.is_none(), "exactly one message");

    // No queue bound for this routing key: ERROR (not delivered, unroutable)
    // instead of a RECEIPT, then the close.
    c.send_frame(&json_send("/app/unbound.key", "{}").with_header("receipt", "r-unroutable"))
        .await?;
    let closed = c.expect_close(WAIT).await?;
    assert!(
        !closed.frames.iter().any(|f| f.command == Command::Receipt),
        "no RECEIPT for an unroutable message: {:?}",
        closed.frames
    );
    let err = error_frame(&closed.frames)?;
    assert!(
        err.header("message")
            .is_some_and(|m| m.contains("not delivered")),
        "{}",
        show(err)
    );
    assert!(error_text(err).contains("unroutable"), "{}", show(err));

    // A transaction on an application destination is refused.
    let mut c2 = gw.client().await?;
    c2.send_frame(&json_send("/app/chat.sendMessage", "{}").with_header("transaction", "tx1"))
        .await?;
    let closed = c2.expect_close(WAIT).await?;
    let err = error_frame(&closed.frames)?;
    assert!(error_text(err).contains("transaction"), "{}", show(err));
    assert!(
        amqp.get(&q).await?.is_none(),
        "the transactional SEND was not published"
    );
    amqp.close().await;
    Ok(())
}

// ---------------------------------------------------------------------------
// JWT on CONNECT
// ---------------------------------------------------------------------------

#[tokio::test]
async fn jwt_on_connect_names_the_user_and_app_messages_carry_it() -> Result<()> {
    let secret = jwt::secret();
    let mut topo = Topology::new();
    let (b, app, _user) = builder("jwt_auth", &mut topo);
    let gw = b
        .set_str("auth", "mode", "jwt")
        .set_str("auth", "jwt_secret", &secret)
        .start()
        .await;
    let amqp = Amqp::connect().await?;
    let q = amqp.bound_queue(&app, &["#"]).await?;

    let mut alice = connect_as(&gw, &secret, "alice").await?;

    // The token as the passcode (what @stomp/stompjs users put in connectHeaders).
    let token = jwt::token(&secret, "alice");
    let (c, connected) = gw.client_with(&[("passcode", &token)]).await?;
    assert_eq!(
        connected.header("user-name"),
        Some("alice"),
        "{}",
        show(&connected)
    );
    c.disconnect().await?;

    // Forged (other secret), expired, or no token at all: refused.
    let forged = jwt::token(&jwt::secret(), "alice");
    let expired =
        jwt::token_with_claims(&secret, json!({ "sub": "alice", "exp": jwt::now() - 3600 }));
    // Valid only an hour from now (nbf), or never expiring (no exp, which
    // auth.jwt_require_exp refuses by default).
    let future = jwt::token_with_claims(
        &secret,
        json!({ "sub": "alice", "nbf": jwt::now() + 3600, "exp": jwt::now() + 7200 }),
    );
    let eternal = jwt::token_with_claims(&secret, json!({ "sub": "alice" }));
    for (what, headers) in [
        ("forged", vec![("Authorization", bearer(&forged))]),
        ("expired", vec![("Authorization", bearer(&expired))]),
        ("not yet valid", vec![("Authorization", bearer(&future))]),
        ("without exp", vec![("Authorization", bearer(&eternal))]),
        ("missing", vec![]),
    ] {
        let headers: Vec<(&str, &str)> = headers.iter().map(|(k, v)| (*k, v.as_str())).collect();
        let err = gw
            .connect_refused(&headers)
            .await
            .with_context(|| format!("{what} token"))?;
        assert!(
            err.header("message")
                .is_some_and(|m| m.contains("authentication failed")),
            "{what} token: {}",
            show(&err)
        );
    }

    // The authenticated user travels with application messages, and a
    // client cannot override it.
    alice
        .send_with_receipt(
            json_send("/app/chat.sendMessage", r#"{"roomId":"1"}"#)
                .with_header("stomp-user", "admin"),
        )
        .await?;
    let m = amqp
        .get(&q)
        .await?
        .ok_or_else(|| anyhow!("message not in the queue after its RECEIPT"))?;
    assert_eq!(
        amqp::header(&m.delivery.properties, "stomp-user").as_deref(),
        Some("alice"),
        "{:?}",
        m.delivery.properties
    );
    alice.disconnect().await?;
    amqp.close().await;
    Ok(())
}

/// `auth.jwt_leeway_secs` and `auth.jwt_require_exp` change what is
/// accepted: with no leeway a token expired 5 s ago is refused (the default
/// 60 s would take it), and without the exp requirement a token that never
/// expires is accepted while an expired one still is not.
#[tokio::test]
async fn jwt_leeway_and_exp_policy_are_settings() -> Result<()> {
    let secret = jwt::secret();
    let mut topo = Topology::new();
    let (b, _app, _user) = builder("jwt_policy", &mut topo);
    let gw = b
        .set_str("auth", "mode", "jwt")
        .set_str("auth", "jwt_secret", &secret)
        .set("auth", "jwt_leeway_secs", "0")
        .set("auth", "jwt_require_exp", "false")
        .start()
        .await;
    let eternal = jwt::token_with_claims(&secret, json!({ "sub": "alice" }));
    let (c, connected) = gw
        .client_with(&[("Authorization", &bearer(&eternal))])
        .await?;
    assert_eq!(
        connected.header("user-name"),
        Some("alice"),
        "{}",
        show(&connected)
    );
    c.disconnect().await?;

    let just_expired =
        jwt::token_with_claims(&secret, json!({ "sub": "alice", "exp": jwt::now() - 5 }));
    let err = gw
        .connect_refused(&[("Authorization", &bearer(&just_expired))])
        .await?;
    assert!(
        err.header("message")
            .is_some_and(|m| m.contains("authentication failed"))
            && body_text(&err).contains("expired"),
        "{}",
        show(&err)
    );
    Ok(())
}

// ---------------------------------------------------------------------------
// The seed chat: /app/chat.sendMessage -> backend -> adme.exchange room.<id>
// ---------------------------------------------------------------------------

#[tokio::test]
async fn seed_chat_goes_through_the_backend_to_room_members_on_both_gateways() -> Result<()> {
    let mut topo = Topology::new();
    let (b, app, _user) = builder("seed_chat", &mut topo);
    let ex = format!("adme.exchange.{:08x}", rand::random::<u32>());
    let seed_q = format!("adme.queue.{:08x}", rand::random::<u32>());
    let backend_q = unique("chat.backend");
    topo.track_exchange(&ex);
    topo.track_queue(&seed_q);
    topo.track_queue(&backend_q);
    let b = with_topology(b, &ex, &seed_q, "room.*");
    let gw1 = b.clone().start().await;
    let gw2 = b.start().await;
    let _backend = ChatBackend::start(
        "seed_chat",
        &[
            "--app-exchange",
            &app,
            "--queue",
            &backend_q,
            "--chat-exchange",
            &ex,
        ],
    )
    .await?;

    let room42 = format!("/exchange/{ex}/room.42");
    let room7 = format!("/exchange/{ex}/room.7");
    let mut a = gw1.client().await?;
    let mut b = gw2.client().await?;
    let mut c = gw2.client().await?;
    a.subscribe(&room42, "room", &[]).await?;
    b.subscribe(&room42, "room", &[]).await?;
    c.subscribe(&room7, "room", &[]).await?;

    let msg = json!({ "roomId": "42", "sender": "alice", "content": "hi", "type": "CHAT" });
    a.send_with_receipt(json_send("/app/chat.sendMessage", &msg.to_string()))
        .await?;
    for (who, client) in [("A (gateway 1)", &mut a), ("B (gateway 2)", &mut b)] {
        let m = client
            .expect(Command::Message, WAIT)
            .await
            .with_context(|| format!("{who} waits for the room 42 message"))?;
        assert_eq!(
            m.header("destination"),
            Some(room42.as_str()),
            "{who}: {}",
            show(&m)
        );
        assert_eq!(
            m.header("content-type"),
            Some("application/json"),
            "{who}: {}",
            show(&m)
        );
        let v: Value = serde_json::from_str(&body_text(&m))
            .with_context(|| format!("{who}: body is JSON: {}", show(&m)))?;
        assert_eq!(v, msg, "{who}: {}", show(&m));
    }
    assert_quiet(&mut c, "C (room 7)").await?;

    // The seed's adme.queue (bound with room.*) got its copy too.
    let amqp = Amqp::connect().await?;
    amqp.wait_message_count(&seed_q, 1, WAIT).await?;
    amqp.close().await;
    Ok(())
}

#[tokio::test]
async fn chat_backend_trusts_the_authenticated_sender_and_drops_malformed_messages() -> Result<()> {
    let secret = jwt::secret();
    let mut topo = Topology::new();
    let (b, app, _user) = builder("backend_sender", &mut topo);
    let ex = format!("adme.exchange.{:08x}", rand::random::<u32>());
    let seed_q = format!("adme.queue.{:08x}", rand::random::<u32>());
    let backend_q = unique("chat.backend");
    topo.track_exchange(&ex);
    topo.track_queue(&seed_q);
    topo.track_queue(&backend_q);
    let gw = with_topology(b, &ex, &seed_q, "room.*")
        .set_str("auth", "mode", "jwt")
        .set_str("auth", "jwt_secret", &secret)
        .start()
        .await;
    let mut backend = ChatBackend::start(
        "backend_sender",
        &[
            "--app-exchange",
            &app,
            "--queue",
            &backend_q,
            "--chat-exchange",
            &ex,
        ],
    )
    .await?;
    let room = format!("/exchange/{ex}/room.9");
    let mut alice = connect_as(&gw, &secret, "alice").await?;
    alice.subscribe(&room, "room", &[]).await?;

    // Alice claims to be bob: the room sees alice.
    alice
        .send_with_receipt(json_send(
            "/app/chat.sendMessage",
            r#"{"roomId":"9","sender":"bob","content":"hi"}"#,
        ))
        .await?;
    let m = alice.expect(Command::Message, WAIT).await?;
    let v: Value = serde_json::from_str(&body_text(&m))?;
    assert_eq!(v["sender"], "alice", "{}", show(&m));
    assert_eq!(v["content"], "hi", "{}", show(&m));

    // No roomId: logged, rejected without requeue, nothing reaches the room.
    alice
        .send_with_receipt(json_send(
            "/app/chat.sendMessage",
            r#"{"content":"where?"}"#,
        ))
        .await?;
    backend
        .wait_for_log("rejecting malformed message", WAIT)
        .await?;
    let amqp = Amqp::connect().await?;
    amqp.wait_message_count(&backend_q, 0, WAIT).await?;
    assert_quiet(&mut alice, "the room").await?;
    amqp.close().await;
    alice.disconnect().await?;
    Ok(())
}

#[tokio::test]
async fn chat_backend_reconnects_and_handles_what_was_sent_meanwhile() -> Result<()> {
    let mut topo = Topology::new();
    let (b, app, _user) = builder("backend_reconnect", &mut topo);
    let ex = format!("adme.exchange.{:08x}", rand::random::<u32>());
    let seed_q = format!("adme.queue.{:08x}", rand::random::<u32>());
    let backend_q = unique("chat.backend");
    topo.track_exchange(&ex);
    topo.track_queue(&seed_q);
    topo.track_queue(&backend_q);
    let gw = with_topology(b, &ex, &seed_q, "room.*").start().await;
    // Only the backend's AMQP connection goes through the proxy.
    let proxy = Proxy::start("127.0.0.1:5672").await?;
    let url = format!("amqp://guest:guest@{}/%2f", proxy.address());
    let mut backend = ChatBackend::start(
        "backend_reconnect",
        &[
            "--amqp-url",
            &url,
            "--app-exchange",
            &app,
            "--queue",
            &backend_q,
            "--chat-exchange",
            &ex,
        ],
    )
    .await?;

    let room = format!("/exchange/{ex}/room.1");
    let mut c = gw.client().await?;
    c.subscribe(&room, "room", &[]).await?;
    c.send_with_receipt(json_send(
        "/app/chat.sendMessage",
        r#"{"roomId":1,"content":"before"}"#,
    ))
    .await?;
    let m = c.expect(Command::Message, WAIT).await?;
    assert_eq!(
        serde_json::from_str::<Value>(&body_text(&m))?["content"],
        "before"
    );

    // Cut the backend's connection; what is sent meanwhile waits in its
    // durable queue and is handled after the reconnect.
    ensure!(
        proxy.cut() >= 1,
        "the backend's connection went through the proxy"
    );
    c.send_with_receipt(json_send(
        "/app/chat.sendMessage",
        r#"{"roomId":1,"content":"during"}"#,
    ))
    .await?;
    backend
        .wait_for_log("reconnecting", WAIT)
        .await
        .context("the backend notices the lost connection")?;
    backend
        .wait_for_log_count("consuming", 2, Duration::from_secs(30))
        .await
        .context("the backend consumes again")?;
    // At least once: "before" comes again if its ack was lost in the cut.
    loop {
        let m = c.expect(Command::Message, Duration::from_secs(30)).await?;
        let content = serde_json::from_str::<Value>(&body_text(&m))?["content"].clone();
        if content == "during" {
            break;
        }
        assert_eq!(
            content,
            "before",
            "only a redelivery may come first: {}",
            show(&m)
        );
    }

    c.send_with_receipt(json_send(
        "/app/chat.sendMessage",
        r#"{"roomId":1,"content":"after"}"#,
    ))
    .await?;
    let m = c.expect(Command::Message, WAIT).await?;
    assert_eq!(
        serde_json::from_str::<Value>(&body_text(&m))?["content"],
        "after"
    );
    c.disconnect().await?;
    Ok(())
}

// ---------------------------------------------------------------------------
// User destinations
// ---------------------------------------------------------------------------

#[tokio::test]
async fn user_destinations_reach_every_session_of_the_user_on_every_gateway() -> Result<()> {
    let secret = jwt::secret();
    let api_token = format!("e2e-api-{:016x}", rand::random::<u64>());
    let mut topo = Topology::new();
    let (b, _app, user_ex) = builder("user_destinations", &mut topo);
    let b = b
        .set_str("auth", "mode", "jwt")
        .set_str("auth", "jwt_secret", &secret)
        .set_str("api", "token", &api_token);
    let gw1 = b.clone().start().await;
    let gw2 = b.start().await;
    let dest = "/user/queue/notifications";

    let mut alice1 = connect_as(&gw1, &secret, "alice").await?;
    let mut alice2 = connect_as(&gw2, &secret, "alice").await?;
    let mut bob = connect_as(&gw1, &secret, "bob").await?;
    for c in [&mut alice1, &mut alice2, &mut bob] {
        c.subscribe(dest, "n", &[]).await?;
    }

    // Each alice session has its own queue, bound with alice's key; none is
    // durable.
    let alice_key = user_routing_key("alice", "queue/notifications");
    let bindings = bindings_from(&user_ex).await?;
    let alice_queues: Vec<String> = bindings
        .iter()
        .filter(|b| b["routing_key"].as_str() == Some(alice_key.as_str()))
        .filter_map(|b| b["destination"].as_str().map(str::to_owned))
        .collect();
    assert_eq!(
        alice_queues.len(),
        2,
        "one queue per alice session: {bindings:?}"
    );
    for q in &alice_queues {
        let qv = management_get(&format!("/api/queues/%2F/{q}")).await?;
        assert_eq!(qv["durable"].as_bool(), Some(false), "{qv}");
        assert!(
            qv["auto_delete"].as_bool() == Some(true) || qv["exclusive"].as_bool() == Some(true),
            "a session's user queue goes away with the session: {qv}"
        );
    }

    // A backend publishes to the user exchange with alice's routing key.
    let amqp = Amqp::connect().await?;
    amqp.publish(
        &user_ex,
        &alice_key,
        b"for alice",
        amqp::props(Some("text/plain"), &[]),
    )
    .await?;
    for (who, c) in [
        ("alice on gateway 1", &mut alice1),
        ("alice on gateway 2", &mut alice2),
    ] {
        let m = c
            .expect(Command::Message, WAIT)
            .await
            .with_context(|| who.to_owned())?;
        assert_eq!(m.header("destination"), Some(dest), "{who}: {}", show(&m));
        assert_eq!(m.header("subscription"), Some("n"), "{who}: {}", show(&m));
        assert_eq!(body_text(&m), "for alice", "{who}");
    }
    assert_quiet(&mut bob, "bob").await?;

    // The same through the publish API (of the other gateway).
    let r = gw2
        .api_post(
            "/api/v1/users/alice/messages",
            Some(&api_token),
            &json!({ "destination": "/queue/notifications", "body": "via api" }).to_string(),
        )
        .await?;
    assert_eq!(r.status, 202, "{}", r.body);
    for (who, c) in [
        ("alice on gateway 1", &mut alice1),
        ("alice on gateway 2", &mut alice2),
    ] {
        let m = c
            .expect(Command::Message, WAIT)
            .await
            .with_context(|| who.to_owned())?;
        assert_eq!(m.header("destination"), Some(dest), "{who}: {}", show(&m));
        assert_eq!(body_text(&m), "via api", "{who}");
    }
    assert_quiet(&mut bob, "bob").await?;

    // Bob's own messages reach bob only.
    amqp.publish(
        &user_ex,
        &user_routing_key("bob", "queue/notifications"),
        b"for bob",
        amqp::props(None, &[]),
    )
    .await?;
    assert_eq!(
        body_text(&bob.expect(Command::Message, WAIT).await?),
        "for bob"
    );
    assert_quiet(&mut alice1, "alice on gateway 1").await?;

    alice1.disconnect().await?;
    alice2.disconnect().await?;
    bob.disconnect().await?;
    amqp.close().await;

    // Nothing of alice's stays bound to the user exchange, and her queues
    // are gone.
    let deadline = Instant::now() + WAIT;
    loop {
        let left: Vec<Value> = bindings_from(&user_ex)
            .await?
            .into_iter()
            .filter(|b| b["routing_key"].as_str() == Some(alice_key.as_str()))
            .collect();
        if left.is_empty() {
            break;
        }
        ensure!(
            Instant::now() < deadline,
            "alice's bindings remain after all sessions closed: {left:?}"
        );
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
    // On the shared path her messages came through each gateway's own
    // upstream queue, which lives as long as the gateway.
    let mut upstream_queues = Vec::new();
    for gw in [&gw1, &gw2] {
        let ready: Value = serde_json::from_str(&gw.admin_get("/readyz").await?.body)?;
        if let Some(q) = ready["shared"]["queue"].as_str() {
            upstream_queues.push(q.to_owned());
        }
    }
    for q in alice_queues.iter().filter(|q| !upstream_queues.contains(q)) {
        assert_eq!(
            management_status(&format!("/api/queues/%2F/{q}")).await?,
            404,
            "queue {q} deleted"
        );
    }
    Ok(())
}

#[tokio::test]
async fn a_user_name_with_a_dot_cannot_reach_another_users_destinations() -> Result<()> {
    let secret = jwt::secret();
    let mut topo = Topology::new();
    let (b, _app, user_ex) = builder("user_name_escaping", &mut topo);
    let gw = b
        .set_str("auth", "mode", "jwt")
        .set_str("auth", "jwt_secret", &secret)
        .start()
        .await;
    let mut a = connect_as(&gw, &secret, "a").await?;
    let mut ab = connect_as(&gw, &secret, "a.b").await?;
    a.subscribe("/user/queue/notifications", "n", &[]).await?;
    // Without escaping, user "a" on /user/b/queue/notifications and user
    // "a.b" on /user/queue/notifications would share a routing key.
    a.subscribe("/user/b/queue/notifications", "trick", &[])
        .await?;
    ab.subscribe("/user/queue/notifications", "n", &[]).await?;

    let amqp = Amqp::connect().await?;
    amqp.publish(
        &user_ex,
        &user_routing_key("a", "queue/notifications"),
        b"for a",
        amqp::props(None, &[]),
    )
    .await?;
    let m = a.expect(Command::Message, WAIT).await?;
    assert_eq!(body_text(&m), "for a");
    assert_eq!(m.header("subscription"), Some("n"), "{}", show(&m));
    assert_quiet(&mut ab, "a.b").await?;

    amqp.publish(
        &user_ex,
        &user_routing_key("a.b", "queue/notifications"),
        b"for a.b",
        amqp::props(None, &[]),
    )
    .await?;
    let m = ab.expect(Command::Message, WAIT).await?;
    assert_eq!(body_text(&m), "for a.b");
    assert_eq!(m.header("destination"), Some("/user/queue/notifications"));
    assert_quiet(&mut a, "a").await?;

    a.disconnect().await?;
    ab.disconnect().await?;
    amqp.close().await;
    Ok(())
}

// ---------------------------------------------------------------------------
// Publish API
// ---------------------------------------------------------------------------

#[tokio::test]
async fn publish_api_delivers_and_refuses_bad_requests() -> Result<()> {
    let token = format!("e2e-api-{:016x}", rand::random::<u64>());
    let mut topo = Topology::new();
    let (b, _app, _user) = builder("publish_api", &mut topo);
    let gw = b
        .set_str("api", "token", &token)
        .set("api", "max_body_bytes", "1024")
        .start()
        .await;
    let topic = format!("/topic/{}", unique("api"));
    let mut c = gw.client().await?;
    c.subscribe(&topic, "s", &[]).await?;
    let path = "/api/v1/messages";

    let r = gw
        .api_post(
            path,
            Some(&token),
            &json!({
                "destination": topic,
                "body": "hello api",
                "headers": { "x-k": "v" },
                "content_type": "text/plain",
            })
            .to_string(),
        )
        .await?;
    assert_eq!(r.status, 202, "{}", r.body);
    let m = c.expect(Command::Message, WAIT).await?;
    assert_eq!(body_text(&m), "hello api", "{}", show(&m));
    assert_eq!(m.header("x-k"), Some("v"), "{}", show(&m));
    assert_eq!(
        m.header("destination"),
        Some(topic.as_str()),
        "{}",
        show(&m)
    );

    let r = gw
        .api_post(
            path,
            Some(&token),
            &json!({ "destination": topic, "body_base64": "aGk=" }).to_string(),
        )
        .await?;
    assert_eq!(r.status, 202, "{}", r.body);
    assert_eq!(body_text(&c.expect(Command::Message, WAIT).await?), "hi");

    // 400: not JSON; a destination the gateway does not serve.
    let r = gw.api_post(path, Some(&token), "{not json").await?;
    assert_eq!(r.status, 400, "bad JSON: {}", r.body);
    let r = gw
        .api_post(
            path,
            Some(&token),
            &json!({ "destination": "/nowhere/x", "body": "x" }).to_string(),
        )
        .await?;
    assert_eq!(r.status, 400, "unserved destination: {}", r.body);

    // 401: no token, wrong token.
    let ok = json!({ "destination": topic, "body": "x" }).to_string();
    let r = gw.api_post(path, None, &ok).await?;
    assert_eq!(r.status, 401, "no token: {}", r.body);
    let r = gw.api_post(path, Some("wrong-token"), &ok).await?;
    assert_eq!(r.status, 401, "wrong token: {}", r.body);

    // 413: body above api.max_body_bytes.
    let big = json!({ "destination": topic, "body": "x".repeat(2000) }).to_string();
    let r = gw.api_post(path, Some(&token), &big).await?;
    assert_eq!(r.status, 413, "too large: {}", r.body);

    // 422: a queue nobody declared (published mandatory, returned unroutable).
    let r = gw
        .api_post(
            path,
            Some(&token),
            &json!({ "destination": format!("/queue/{}", unique("nobody")), "body": "x" })
                .to_string(),
        )
        .await?;
    assert_eq!(r.status, 422, "unroutable: {}", r.body);

    // None of the refused requests reached the subscriber.
    assert_quiet(&mut c, "the /topic subscriber").await?;
    c.disconnect().await?;
    Ok(())
}

#[tokio::test]
async fn publish_api_is_404_when_no_token_is_configured() -> Result<()> {
    let mut topo = Topology::new();
    let (b, _app, _user) = builder("publish_api_disabled", &mut topo);
    let gw = b.start().await;
    let body = json!({ "destination": "/topic/x", "body": "x" }).to_string();
    let r = gw
        .api_post("/api/v1/messages", Some("anything"), &body)
        .await?;
    assert_eq!(r.status, 404, "{}", r.body);
    let r = gw.api_post("/api/v1/messages", None, &body).await?;
    assert_eq!(r.status, 404, "{}", r.body);
    Ok(())
}

#[tokio::test]
async fn publish_api_is_503_and_not_ready_while_amqp_is_down() -> Result<()> {
    let token = format!("e2e-api-{:016x}", rand::random::<u64>());
    let mut topo = Topology::new();
    let (b, _app, _user) = builder("publish_api_amqp_down", &mut topo);
    let gw = b
        .set_str("amqp", "url", &amqp::unreachable_url())
        .set_str("api", "token", &token)
        .start_unready()
        .await;
    let body = json!({ "destination": "/topic/x", "body": "x" }).to_string();
    let r = gw.api_post("/api/v1/messages", Some(&token), &body).await?;
    assert_eq!(r.status, 503, "{}", r.body);
    let ready = gw.admin_get("/readyz").await?;
    assert_eq!(ready.status, 503, "not ready without AMQP: {}", ready.body);
    Ok(())
}

// ---------------------------------------------------------------------------
// deploy/examples/chat.toml
// ---------------------------------------------------------------------------

#[test]
fn chat_example_config_passes_check_config() {
    let path =
        std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/examples/chat.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let out = check_config("chat_example", &text, &[]).unwrap();
    let all = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(out.status.code(), Some(0), "{}: {all}", path.display());
    for expected in [
        "adme.exchange",
        "adme.queue",
        "room.*",
        "stomp.app",
        "chat.*",
    ] {
        assert!(
            all.contains(expected),
            "{expected} in the effective config: {all}"
        );
    }
    assert!(
        !all.contains("guest@"),
        "the AMQP password is masked: {all}"
    );
}

// ---------------------------------------------------------------------------
// Sending to another user's destination
// ---------------------------------------------------------------------------

#[tokio::test]
async fn client_send_to_another_user_needs_client_send_enabled() -> Result<()> {
    let secret = jwt::secret();
    let mut topo = Topology::new();
    let (b, _app, _user) = builder("user_send", &mut topo);
    let b = b
        .set_str("auth", "mode", "jwt")
        .set_str("auth", "jwt_secret", &secret);

    // Off by default: ERROR, then the close.
    let gw = b.clone().start().await;
    let mut alice = connect_as(&gw, &secret, "alice").await?;
    alice
        .send_frame(&send("/user/bob/queue/notifications", "hi bob"))
        .await?;
    let closed = alice.expect_close(WAIT).await?;
    let err = error_frame(&closed.frames)?;
    assert!(error_text(err).contains("not allowed"), "{}", show(err));
    drop(gw);

    // Enabled: relayed to bob's sessions.
    let gw = b.set("user", "client_send_enabled", "true").start().await;
    let mut bob = connect_as(&gw, &secret, "bob").await?;
    bob.subscribe("/user/queue/notifications", "n", &[]).await?;
    let mut alice = connect_as(&gw, &secret, "alice").await?;
    alice
        .send_with_receipt(send("/user/bob/queue/notifications", "hi bob"))
        .await?;
    let m = bob.expect(Command::Message, WAIT).await?;
    assert_eq!(body_text(&m), "hi bob", "{}", show(&m));
    assert_eq!(m.header("destination"), Some("/user/queue/notifications"));
    alice.disconnect().await?;
    bob.disconnect().await?;
    Ok(())
}

#[tokio::test]
async fn subscribe_to_an_application_destination_is_refused() -> Result<()> {
    let mut topo = Topology::new();
    let (b, _app, _user) = builder("app_subscribe", &mut topo);
    let gw = b.start().await;
    let mut c = gw.client().await?;
    c.send_frame(
        &Frame::new(Command::Subscribe)
            .with_header("id", "s")
            .with_header("destination", "/app/chat.history"),
    )
    .await?;
    let closed = c.expect_close(WAIT).await?;
    let err = error_frame(&closed.frames)?;
    // Application destinations take SENDs only (no @SubscribeMapping); the
    // ERROR must say so, not that this build lacks the control plane.
    // RabbitMQ's word for the condition in `message`, ours in the body.
    assert_eq!(
        err.header("message"),
        Some("Invalid destination"),
        "{}",
        show(err)
    );
    assert!(
        error_text(err).contains("/app/chat.history"),
        "{}",
        show(err)
    );
    assert!(
        !error_text(err).contains("does not provide"),
        "the ERROR must not claim the control plane is missing: {}",
        show(err)
    );
    Ok(())
}
