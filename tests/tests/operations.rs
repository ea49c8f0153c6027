//! Operations: Prometheus metrics on the admin listener, labelled with the pod.
#![allow(clippy::unwrap_used)]

use anyhow::{ensure, Context, Result};
use e2e::{send, unique, Command, Gateway, WAIT};

/// The value of the first series line starting with `prefix`.
fn series(text: &str, prefix: &str) -> Result<f64> {
    let line = text
        .lines()
        .find(|l| l.starts_with(prefix))
        .with_context(|| format!("no series {prefix} in:\n{text}"))?;
    Ok(line.rsplit(' ').next().unwrap_or("").parse()?)
}

#[tokio::test]
async fn metrics_count_sessions_and_frames_per_pod() -> Result<()> {
    let gw = Gateway::builder("metrics_count_sessions_and_frames_per_pod")
        // About the session's own STOMP connection: opened at CONNECT.
        .per_session()
        .set_str("server", "pod_id", "pod-e2e")
        .start()
        .await;
    let dest = format!("/topic/{}", unique("metrics"));
    let mut c = gw.client().await?;
    c.subscribe(&dest, "m", &[]).await?;
    c.send_frame(&send(&dest, "one")).await?;
    c.expect(Command::Message, WAIT).await?;
    c.disconnect().await?;

    let r = gw.admin_get("/metrics").await?;
    ensure!(r.status == 200, "GET /metrics: {}", r.status);
    let text = &r.body;
    ensure!(
        series(
            text,
            r#"stomp_gateway_sessions_opened_total{pod="pod-e2e"}"#
        )? >= 1.0
    );
    // SUBSCRIBE, SEND, DISCONNECT went to the broker; RECEIPTs and the
    // MESSAGE came back.
    ensure!(
        series(
            text,
            r#"stomp_gateway_frames_total{direction="client_to_broker",pod="pod-e2e"}"#
        )? >= 3.0
    );
    ensure!(
        series(
            text,
            r#"stomp_gateway_frames_total{direction="broker_to_client",pod="pod-e2e"}"#
        )? >= 2.0
    );
    ensure!(series(text, r#"stomp_gateway_ready{pod="pod-e2e"}"#)? == 1.0);
    // The session's end is counted once it is fully closed.
    let deadline = std::time::Instant::now() + WAIT;
    loop {
        let text = gw.admin_get("/metrics").await?.body;
        let closed = series(
            &text,
            r#"stomp_gateway_sessions_closed_total{reason="client_disconnect",pod="pod-e2e"}"#,
        );
        if matches!(closed, Ok(v) if v >= 1.0) {
            ensure!(series(&text, r#"stomp_gateway_sessions_active{pod="pod-e2e"}"#)? == 0.0);
            break;
        }
        ensure!(
            std::time::Instant::now() < deadline,
            "session close not counted:\n{text}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(50)).await;
    }
    Ok(())
}
