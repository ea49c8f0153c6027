//! Backpressure: a client that does not read slows its own broker leg
//! instead of making the gateway buffer without bound, loses nothing, and
//! does not slow anyone else.
#![allow(clippy::unwrap_used)]

use anyhow::{ensure, Context, Result};
use e2e::{body_text, send, unique, Command, Frame, Gateway, Topology, WAIT};
use std::time::Duration;

/// Resident memory of a process, from /proc.
fn rss_bytes(pid: u32) -> Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let line = status
        .lines()
        .find(|l| l.starts_with("VmRSS:"))
        .context("no VmRSS line")?;
    let kb: u64 = line
        .split_whitespace()
        .nth(1)
        .context("no VmRSS value")?
        .parse()?;
    Ok(kb * 1024)
}

const MESSAGES: usize = 3_000;
const BODY: usize = 16 * 1024;

#[tokio::test]
async fn slow_reader_is_backpressured_not_buffered() -> Result<()> {
    let gw = Gateway::builder("slow_reader_is_backpressured_not_buffered")
        .set("session", "outbound_buffer_bytes", "65536")
        .start()
        .await;
    let queue = unique("slow");
    let mut topo = Topology::new();
    topo.track_queue(&queue);
    let dest = format!("/queue/{queue}");

    // The slow client subscribes, then stops reading its WebSocket.
    let mut slow = gw.client().await?;
    slow.subscribe(&dest, "s", &[("ack", "auto")]).await?;
    let before = rss_bytes(gw.pid())?;

    // Far more than every buffer on the way: 3,000 x 16 KiB = 48 MiB.
    let mut publisher = gw.client().await?;
    let filler = "x".repeat(BODY - 16);
    let mut frames: Vec<Frame> = Vec::with_capacity(MESSAGES);
    for i in 0..MESSAGES {
        frames.push(send(&dest, &format!("{i:>10}:{filler}")));
    }
    // 10 x 16 KiB stays under the 256 KiB WebSocket message limit.
    for chunk in frames.chunks(10) {
        publisher.send_frames_in_one_message(chunk).await?;
    }
    let receipt = publisher
        .send_with_receipt(send(&dest, "end"))
        .await
        .context("publisher receipt")?;
    ensure!(receipt.command == Command::Receipt);

    // Someone else on the same gateway is served meanwhile.
    let topic = format!("/topic/{}", unique("other"));
    let mut fast = gw.client().await?;
    fast.subscribe(&topic, "f", &[]).await?;
    publisher.send_text_to(&topic, "still served").await?;
    let m = fast.expect(Command::Message, WAIT).await?;
    assert_eq!(body_text(&m), "still served");

    // The gateway did not take the 48 MiB in.
    let after = rss_bytes(gw.pid())?;
    let grown = after.saturating_sub(before);
    ensure!(
        grown < 24 * 1024 * 1024,
        "gateway RSS grew by {} KiB while a client did not read 48 MiB ({} -> {} KiB)",
        grown / 1024,
        before / 1024,
        after / 1024
    );

    // Nothing was lost: the slow client now gets every message, in order.
    let got = slow
        .recv_messages(MESSAGES + 1, Duration::from_secs(120))
        .await?;
    for (i, m) in got.iter().take(MESSAGES).enumerate() {
        let body = body_text(m);
        let seq: usize = body[..10].trim().parse()?;
        ensure!(seq == i, "message {i} carried sequence {seq}");
        ensure!(
            body.len() == BODY - 5,
            "message {i} has {} bytes",
            body.len()
        );
    }
    assert_eq!(body_text(&got[MESSAGES]), "end");
    Ok(())
}
