//! Broker TLS and AMQP failover, end to end: the real gateway binary talks
//! TLS to an in-test TLS terminator (certificates from a per-test CA made with
//! rcgen) that forwards plain text to the local RabbitMQ's STOMP (61613) or
//! AMQP (5672) port.
#![allow(clippy::unwrap_used)]

use anyhow::{ensure, Context, Result};
use e2e::amqp::{self, Amqp};
use e2e::gateway::toml_str;
use e2e::tls::{Pki, TlsTerminator};
use e2e::{
    body_text, error_text, send, show, unique, Command, Gateway, GatewayBuilder, Topology, WAIT,
};
use serde_json::Value;
use std::time::Duration;

/// `GET /readyz` as (status, JSON body).
async fn readyz(gw: &Gateway) -> Result<(u16, Value)> {
    let r = gw.admin_get("/readyz").await?;
    let body: Value =
        serde_json::from_str(&r.body).with_context(|| format!("/readyz body {:?}", r.body))?;
    Ok((r.status, body))
}

/// A gateway builder with its own application exchange (deleted by `topo`).
fn builder(name: &str, topo: &mut Topology) -> (GatewayBuilder, String) {
    let app = unique("tls.app");
    topo.track_exchange(&app);
    (Gateway::builder(name).set_str("app", "exchange", &app), app)
}

/// `[broker.tls]` enabled, trusting `ca_file`, brokers at `addresses`.
fn with_broker_tls(b: GatewayBuilder, addresses: &[String], ca_file: &str) -> GatewayBuilder {
    b.broker_addresses(addresses)
        .set("broker.tls", "enabled", "true")
        .set_str("broker.tls", "ca_file", ca_file)
}

/// Sends to an application destination with a receipt (so RabbitMQ
/// confirmed it) and checks a backend queue bound to `app` got it.
async fn app_send_is_confirmed(gw: &Gateway, app: &str) -> Result<()> {
    let backend = Amqp::connect().await?;
    let q = backend.bound_queue(app, &["#"]).await?;
    let mut c = gw.client().await?;
    let body = unique("app-body");
    let receipt = c
        .send_with_receipt(send("/app/tls.check", &body))
        .await
        .context("the /app SEND is confirmed with a RECEIPT")?;
    ensure!(
        receipt.command == Command::Receipt,
        "RECEIPT: {}",
        show(&receipt)
    );
    let m = backend.next(&q, WAIT).await?;
    ensure!(
        String::from_utf8_lossy(&m.delivery.data) == body,
        "the backend got the message"
    );
    ensure!(
        amqp::header(&m.delivery.properties, "stomp-destination").as_deref()
            == Some("/app/tls.check"),
        "stomp-destination header"
    );
    c.disconnect().await?;
    backend.close().await;
    Ok(())
}

#[tokio::test]
async fn relay_through_broker_tls() -> Result<()> {
    let pki = Pki::generate("relay")?;
    let term = TlsTerminator::start(&pki, "127.0.0.1:61613").await?;
    let gw = with_broker_tls(
        Gateway::builder("tls_relay")
            // Each session's own STOMP connection, opened at CONNECT.
            .per_session(),
        &[term.address()],
        &pki.ca_path(),
    )
    .start()
    .await;

    let (status, ready) = readyz(&gw).await?;
    ensure!(status == 200, "/readyz {status} {ready}");
    ensure!(
        ready["system_link"]["tls"] == true,
        "readiness says TLS: {ready}"
    );
    ensure!(
        ready["system_link"]["address"] == term.address().as_str(),
        "readiness names the broker address: {ready}"
    );
    let system_only = term.handshakes();
    ensure!(system_only >= 1, "the system link came through TLS");

    let dest = format!("/topic/{}", unique("tls"));
    let mut sub = gw.client().await?;
    sub.subscribe(&dest, "s1", &[]).await?;
    let mut publisher = gw.client().await?;
    publisher
        .send_with_receipt(send(&dest, "over TLS"))
        .await
        .context("SEND through TLS")?;
    let m = sub.expect(Command::Message, WAIT).await?;
    ensure!(body_text(&m) == "over TLS", "MESSAGE: {}", show(&m));
    ensure!(
        term.handshakes() >= system_only + 2,
        "each session's broker connection is TLS ({} handshakes)",
        term.handshakes()
    );
    // A bigger frame than one TLS record.
    let big = "x".repeat(40_000);
    publisher.send_with_receipt(send(&dest, &big)).await?;
    let m = sub.expect(Command::Message, WAIT).await?;
    ensure!(m.body.len() == big.len(), "40 kB body through TLS");
    sub.disconnect().await?;
    publisher.disconnect().await?;
    Ok(())
}

#[tokio::test]
async fn untrusted_broker_certificate_is_reported() -> Result<()> {
    let pki = Pki::generate("server")?;
    let other = Pki::generate("other-ca")?;
    let term = TlsTerminator::start(&pki, "127.0.0.1:61613").await?;
    // The gateway trusts a different CA than the one that signed the
    // terminator's certificate.
    let mut gw = with_broker_tls(
        Gateway::builder("tls_untrusted")
            // Each session's own STOMP connection, opened at CONNECT.
            .per_session(),
        &[term.address()],
        &other.ca_path(),
    )
    .start_unready()
    .await;

    let err = gw.connect_refused(&[]).await?;
    let text = error_text(&err);
    ensure!(
        text.contains("certificate"),
        "the ERROR says the certificate was not trusted: {}",
        show(&err)
    );

    let mut last = Value::Null;
    for _ in 0..100 {
        let (status, ready) = readyz(&gw).await?;
        ensure!(status == 503, "not ready: {status} {ready}");
        if ready["system_link"]["last_error"]
            .as_str()
            .is_some_and(|e| e.contains("certificate"))
        {
            last = ready;
            break;
        }
        last = ready;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let last_error = last["system_link"]["last_error"].as_str().unwrap_or("");
    ensure!(
        last_error.contains("certificate was not trusted"),
        "readiness explains: {last}"
    );
    ensure!(last["system_link"]["tls"] == true, "{last}");
    let health = gw.admin_get("/healthz").await?;
    ensure!(health.status == 200, "/healthz {}", health.status);
    ensure!(!gw.exited(), "the process keeps running");
    Ok(())
}

#[tokio::test]
async fn amqp_over_tls() -> Result<()> {
    let mut topo = Topology::new();
    let pki = Pki::generate("amqp")?;
    let term = TlsTerminator::start(&pki, "127.0.0.1:5672").await?;
    let url = format!("amqps://guest:guest@127.0.0.1:{}/%2f", term.port());
    let (b, app) = builder("tls_amqp", &mut topo);
    let gw = b
        .set_str("amqp", "url", &url)
        .set("amqp", "pool_size", "1")
        .set_str("amqp.tls", "ca_file", &pki.ca_path())
        .start()
        .await;

    let (status, ready) = readyz(&gw).await?;
    ensure!(status == 200, "/readyz {status} {ready}");
    let node = ready["amqp"]["node"].as_str().unwrap_or("");
    ensure!(
        node == format!("amqps://guest:******@127.0.0.1:{}/%2f", term.port()),
        "readiness names the AMQP node, password masked: {ready}"
    );
    ensure!(
        term.handshakes() >= 1,
        "the control connection came through TLS"
    );
    app_send_is_confirmed(&gw, &app).await?;
    ensure!(
        term.handshakes() >= 2,
        "the publish connection is TLS too ({} handshakes)",
        term.handshakes()
    );
    ensure!(
        !gw.log().contains("guest:guest"),
        "the log never shows the password"
    );
    Ok(())
}

#[tokio::test]
async fn amqp_fails_over_to_the_next_url() -> Result<()> {
    let mut topo = Topology::new();
    let down = amqp::unreachable_url();
    let (b, app) = builder("amqp_failover", &mut topo);
    let gw = b
        .set_str("amqp", "url", &down)
        .set(
            "amqp",
            "failover_urls",
            &format!("[{}]", toml_str(amqp::AMQP_URL)),
        )
        .start()
        .await;

    let (status, ready) = readyz(&gw).await?;
    ensure!(status == 200, "/readyz {status} {ready}");
    ensure!(
        ready["amqp"]["node"] == "amqp://guest:******@127.0.0.1:5672/%2f",
        "readiness names the failover node: {ready}"
    );
    app_send_is_confirmed(&gw, &app).await?;
    let log = gw.log();
    ensure!(
        log.contains("amqp.failover_urls[0]"),
        "the log names the node connected to"
    );
    Ok(())
}

#[tokio::test]
async fn check_config_rejects_bad_tls_files() -> Result<()> {
    let pki = Pki::generate("check")?;
    let not_pem = pki.dir().join("not.pem");
    std::fs::write(&not_pem, "hello\n")?;
    let out = e2e::check_config(
        "tls_check_bad",
        &format!(
            "[broker.tls]\nenabled = true\nca_file = {}\n",
            toml_str(&not_pem.display().to_string())
        ),
        &[],
    )?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    ensure!(out.status.code() == Some(64), "exit 64: {stderr}");
    ensure!(
        stderr.contains("broker.tls.ca_file") && stderr.contains("not a PEM file"),
        "{stderr}"
    );

    let ca = pki.ca_path();
    let out = e2e::check_config(
        "tls_check_good",
        "[amqp]\nfailover_urls = [\"amqp://guest:secret@rabbit-1:5672/%2f\"]\n",
        &[
            ("GATEWAY__BROKER__TLS__ENABLED", "true"),
            ("GATEWAY__BROKER__TLS__CA_FILE", ca.as_str()),
        ],
    )?;
    let stdout = String::from_utf8_lossy(&out.stdout);
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(stdout.contains("[broker.tls]"), "{stdout}");
    ensure!(stdout.contains("enabled = true"), "{stdout}");
    ensure!(
        stdout.contains("amqp://guest:******@rabbit-1:5672/%2f"),
        "{stdout}"
    );
    ensure!(!stdout.contains("guest:secret"), "{stdout}");
    Ok(())
}
