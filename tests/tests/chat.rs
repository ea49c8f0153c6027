//! The seed scenario: a chat where rooms are routing keys on a topic
//! exchange (`adme.exchange` in the seed write-up), as a Spring
//! `enableStompBrokerRelay` application would use it.
#![allow(clippy::unwrap_used)]

use anyhow::Result;
use e2e::{body_text, send, show, Command, Gateway, Topology, WAIT};
use serde_json::json;

#[tokio::test]
async fn chat_room_members_see_each_other_and_other_rooms_see_nothing() -> Result<()> {
    let gw = Gateway::start("chat_room").await;
    let ex = format!("adme.exchange.{:08x}", rand::random::<u32>());
    let mut topo = Topology::new();
    topo.exchange(&ex, "topic").await?;
    let room42 = format!("/exchange/{ex}/room.42");
    let room7 = format!("/exchange/{ex}/room.7");

    let mut alice = gw.client().await?;
    let mut bob = gw.client().await?;
    let mut carol = gw.client().await?;
    alice.subscribe(&room42, "room-42", &[]).await?;
    bob.subscribe(&room42, "room-42", &[]).await?;
    carol.subscribe(&room7, "room-7", &[]).await?;

    let hello = json!({ "type": "CHAT", "sender": "alice", "content": "hi bob", "roomId": 42 });
    alice
        .send_frame(
            &send(&room42, &hello.to_string()).with_header("content-type", "application/json"),
        )
        .await?;
    for (who, c) in [("alice", &mut alice), ("bob", &mut bob)] {
        let m = c.expect(Command::Message, WAIT).await?;
        let v: serde_json::Value = serde_json::from_str(&body_text(&m))?;
        assert_eq!(v, hello, "{who} sees alice's message: {}", show(&m));
        assert_eq!(m.header("destination"), Some(room42.as_str()));
    }

    let reply = json!({ "type": "CHAT", "sender": "bob", "content": "hi alice", "roomId": 42 });
    bob.send_frame(&send(&room42, &reply.to_string())).await?;
    for c in [&mut alice, &mut bob] {
        let m = c.expect(Command::Message, WAIT).await?;
        assert_eq!(
            serde_json::from_str::<serde_json::Value>(&body_text(&m))?,
            reply
        );
    }

    // Room 7 saw none of it: the first thing carol gets is room 7's own message.
    let other = json!({ "type": "CHAT", "sender": "dave", "content": "room 7 only", "roomId": 7 });
    bob.send_frame(&send(&room7, &other.to_string())).await?;
    let m = carol.expect(Command::Message, WAIT).await?;
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&body_text(&m))?,
        other,
        "carol (room 7) must not see room 42: {}",
        show(&m)
    );
    Ok(())
}
