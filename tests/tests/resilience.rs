//! Losing the broker, and not leaking broker connections.
#![allow(clippy::unwrap_used)]

use anyhow::{anyhow, ensure, Result};
use e2e::gateway::free_port;
use e2e::rabbit::{connection_count, wait_connection_count};
use e2e::stomp::ALL_SUBPROTOCOLS;
use e2e::{
    body_text, error_text, show, unique, Command, Gateway, Proxy, StompClient, Topology, Version,
    WAIT,
};
use futures_util::{stream, StreamExt, TryStreamExt};
use std::time::{Duration, Instant};

#[tokio::test]
async fn broker_leg_cut_gives_error_and_gateway_keeps_serving() -> Result<()> {
    let proxy = Proxy::to_rabbitmq().await?;
    let gw = Gateway::builder("broker_leg_cut")
        // About the session's own STOMP connection: opened at CONNECT.
        .per_session()
        .broker_addresses(&[proxy.address()])
        .start()
        .await;
    let dest = format!("/topic/{}", unique("cut"));
    let mut c = gw.client().await?;
    c.subscribe(&dest, "s", &[]).await?;
    // System link + this client's broker connection.
    ensure!(
        proxy.connections() >= 2,
        "proxy sees {} connections",
        proxy.connections()
    );

    let accepted = proxy.accepted();
    let cut = proxy.cut();
    assert!(cut >= 2, "cut {cut} connections");

    let err = c.expect(Command::Error, WAIT).await?;
    assert!(
        error_text(&err).contains("broker"),
        "the ERROR says the broker went away: {}",
        show(&err)
    );
    c.expect_close(WAIT).await?;

    // The system link reconnects through the proxy; readiness comes back.
    proxy
        .wait_connections("system link back", WAIT, |_| proxy.accepted() > accepted)
        .await?;
    let mut gw = gw;
    gw.wait_for("/readyz", Duration::from_secs(20)).await?;
    assert!(!gw.exited(), "the gateway survives losing the broker");

    let mut a = gw.client().await?;
    let mut b = gw.client().await?;
    b.subscribe(&dest, "s", &[]).await?;
    a.send_text_to(&dest, "after the cut").await?;
    assert_eq!(
        body_text(&b.expect(Command::Message, WAIT).await?),
        "after the cut"
    );
    Ok(())
}

#[tokio::test]
async fn broker_down_at_connect_gives_prompt_error() -> Result<()> {
    let dead = format!("127.0.0.1:{}", free_port());
    let gw = Gateway::builder("broker_down_at_connect")
        // About the session's own STOMP connection: opened at CONNECT.
        .per_session()
        .broker_addresses(&[dead])
        .set("broker", "connect_timeout_ms", "2000")
        .start_unready()
        .await;
    let ready = gw.admin_get("/readyz").await?;
    assert_eq!(
        ready.status, 503,
        "not ready without a broker: {}",
        ready.body
    );

    let mut c = StompClient::connect_ws(&gw.ws_url(), &ALL_SUBPROTOCOLS).await?;
    let start = Instant::now();
    c.send_frame(&StompClient::connect_frame(
        Version::V1_2,
        None,
        None,
        (0, 0),
    ))
    .await?;
    let err = c.expect(Command::Error, WAIT).await?;
    eprintln!("ERROR after {:?}: {}", start.elapsed(), show(&err));
    assert!(
        start.elapsed() < Duration::from_secs(8),
        "ERROR took {:?}",
        start.elapsed()
    );
    assert!(
        error_text(&err).contains("broker"),
        "the ERROR mentions the broker: {}",
        show(&err)
    );
    c.expect_close(WAIT).await?;
    assert_eq!(gw.admin_get("/healthz").await?.status, 200, "still alive");
    Ok(())
}

#[tokio::test]
async fn broker_connections_return_to_baseline_after_200_clients() -> Result<()> {
    const CLIENTS: usize = 200;
    const CONCURRENCY: usize = 20;
    // A vhost of our own, so other tests (and other users of the node) do
    // not disturb the count.
    let vhost = unique("count");
    let mut topo = Topology::new();
    topo.vhost(&vhost).await?;
    let gw = Gateway::builder("connections_back_to_baseline")
        // About the session's own STOMP connection: opened at CONNECT.
        .per_session()
        .set_str("broker", "virtual_host", &vhost)
        .start()
        .await;
    let baseline = connection_count(&vhost).await?;
    assert!(baseline <= 1, "only the system link at most: {baseline}");

    let url = gw.ws_url();
    let dest = format!("/topic/{}", unique("many"));
    let clients: Vec<StompClient> = stream::iter(0..CLIENTS)
        .map(|i| {
            let (url, dest) = (url.clone(), dest.clone());
            async move {
                let mut c = StompClient::open(&url)
                    .await
                    .map_err(|e| anyhow!("client {i}: {e:#}"))?;
                c.subscribe(&format!("{dest}.{i}"), "s", &[]).await?;
                Ok::<_, anyhow::Error>(c)
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect()
        .await?;
    assert_eq!(clients.len(), CLIENTS);
    let peak = wait_connection_count(
        &vhost,
        "one broker connection per client",
        Duration::from_secs(15),
        |n| n == baseline + CLIENTS,
    )
    .await?;
    eprintln!("vhost {vhost}: baseline {baseline}, with {CLIENTS} clients {peak}");

    // Half leave politely, half just vanish.
    stream::iter(clients.into_iter().enumerate())
        .map(|(i, c)| async move {
            if i % 2 == 0 {
                c.disconnect()
                    .await
                    .map_err(|e| anyhow!("client {i} DISCONNECT: {e:#}"))
            } else {
                drop(c);
                Ok(())
            }
        })
        .buffer_unordered(CONCURRENCY)
        .try_collect::<Vec<()>>()
        .await?;

    let start = Instant::now();
    let end = wait_connection_count(&vhost, "back to baseline", Duration::from_secs(15), |n| {
        n == baseline
    })
    .await?;
    eprintln!("vhost {vhost}: back to {end} after {:?}", start.elapsed());

    // And the gateway still works.
    let mut c = gw.client().await?;
    c.subscribe(&dest, "s", &[]).await?;
    c.disconnect().await?;
    Ok(())
}
