//! The chat logic without any I/O: what the seed write-up's
//! `@MessageMapping("chat.sendMessage")` / `@MessageMapping("chat.addUser")`
//! controller did before calling `rabbitTemplate.convertAndSend(exchange,
//! "room." + roomId, message)`.

use serde_json::{Map, Value};

/// Longest room id accepted (bytes). Routing keys are at most 255 bytes.
pub const MAX_ROOM_ID_BYTES: usize = 128;

/// A chat message ready to be published to the chat exchange.
#[derive(Debug, Clone, PartialEq)]
pub struct Outgoing {
    /// `room.<roomId>`.
    pub routing_key: String,
    /// The JSON document to publish.
    pub body: Vec<u8>,
    /// The room id as it went into the routing key.
    pub room_id: String,
    /// The `sender` the client claimed, when the authenticated user replaced it.
    pub replaced_sender: Option<String>,
}

/// Why a message cannot be handled (it is rejected without requeue).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Malformed(pub String);

impl std::fmt::Display for Malformed {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.0)
    }
}

/// Turns one application message into a room message.
///
/// - `app_routing_key` is the routing key the gateway published with
///   (`chat.sendMessage` for a SEND to `/app/chat.sendMessage`);
///   `chat.addUser` marks the message as a `JOIN`, as in the seed.
/// - `body` must be a JSON object with `roomId` (or `room_id`): a string or
///   an integer, one routing-key word (no `.`, `*`, `#`, spaces or control
///   characters).
/// - `user` is the gateway's `stomp-user` header (the authenticated user).
///   When present it is the `sender`, whatever the client wrote there.
pub fn chat_message(
    app_routing_key: &str,
    body: &[u8],
    user: Option<&str>,
) -> Result<Outgoing, Malformed> {
    let value: Value =
        serde_json::from_slice(body).map_err(|e| Malformed(format!("body is not JSON: {e}")))?;
    let Value::Object(mut object) = value else {
        return Err(Malformed("body is not a JSON object".into()));
    };
    let room_id = room_id(&object)?;

    let mut replaced_sender = None;
    if let Some(user) = user {
        match object.get("sender") {
            Some(Value::String(s)) if s == user => {}
            Some(Value::Null) | None => {}
            Some(other) => {
                replaced_sender = Some(match other {
                    Value::String(s) => s.clone(),
                    other => other.to_string(),
                });
            }
        }
        object.insert("sender".into(), Value::String(user.to_owned()));
    }

    let action = app_routing_key.rsplit('.').next().unwrap_or_default();
    if action == "addUser" {
        object.insert("type".into(), Value::String("JOIN".into()));
    } else if !object.contains_key("type") {
        object.insert("type".into(), Value::String("CHAT".into()));
    }

    let body = serde_json::to_vec(&Value::Object(object))
        .map_err(|e| Malformed(format!("cannot encode the message: {e}")))?;
    Ok(Outgoing {
        routing_key: format!("room.{room_id}"),
        body,
        room_id,
        replaced_sender,
    })
}

fn room_id(object: &Map<String, Value>) -> Result<String, Malformed> {
    let raw = object
        .get("roomId")
        .filter(|v| !v.is_null())
        .or_else(|| object.get("room_id").filter(|v| !v.is_null()))
        .ok_or_else(|| Malformed("no roomId (or room_id) field".into()))?;
    let id = match raw {
        Value::String(s) => s.clone(),
        Value::Number(n) if n.is_i64() || n.is_u64() => n.to_string(),
        other => {
            return Err(Malformed(format!(
                "roomId must be a string or an integer, not {other}"
            )))
        }
    };
    if id.is_empty() {
        return Err(Malformed("roomId is empty".into()));
    }
    if id.len() > MAX_ROOM_ID_BYTES {
        return Err(Malformed(format!(
            "roomId is longer than {MAX_ROOM_ID_BYTES} bytes"
        )));
    }
    if let Some(c) = id
        .chars()
        .find(|c| matches!(c, '.' | '*' | '#') || c.is_whitespace() || c.is_control())
    {
        return Err(Malformed(format!(
            "roomId {id:?} contains {c:?}: a room id is one routing-key word"
        )));
    }
    Ok(id)
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use serde_json::json;

    fn parse(out: &Outgoing) -> Value {
        serde_json::from_slice(&out.body).unwrap()
    }

    #[test]
    fn routes_by_room_and_keeps_the_message() {
        let body = json!({"roomId": "42", "sender": "alice", "content": "hi", "type": "CHAT"});
        let out = chat_message("chat.sendMessage", body.to_string().as_bytes(), None).unwrap();
        assert_eq!(out.routing_key, "room.42");
        assert_eq!(out.room_id, "42");
        assert_eq!(parse(&out), body);
        assert_eq!(out.replaced_sender, None);
    }

    #[test]
    fn accepts_room_id_snake_case_and_numbers() {
        let out =
            chat_message("chat.sendMessage", br#"{"room_id":7,"content":"x"}"#, None).unwrap();
        assert_eq!(out.routing_key, "room.7");
        assert_eq!(parse(&out)["type"], "CHAT", "type defaults to CHAT");
        let out = chat_message(
            "chat.sendMessage",
            br#"{"roomId":"a-b_c","room_id":"x"}"#,
            None,
        )
        .unwrap();
        assert_eq!(out.routing_key, "room.a-b_c", "roomId wins");
    }

    #[test]
    fn the_authenticated_user_is_the_sender() {
        let body = br#"{"roomId":"42","sender":"mallory","content":"hi"}"#;
        let out = chat_message("chat.sendMessage", body, Some("alice")).unwrap();
        assert_eq!(parse(&out)["sender"], "alice");
        assert_eq!(out.replaced_sender.as_deref(), Some("mallory"));

        let out = chat_message("chat.sendMessage", br#"{"roomId":"42"}"#, Some("alice")).unwrap();
        assert_eq!(parse(&out)["sender"], "alice");
        assert_eq!(out.replaced_sender, None);

        let out = chat_message(
            "chat.sendMessage",
            br#"{"roomId":"42","sender":"alice"}"#,
            Some("alice"),
        )
        .unwrap();
        assert_eq!(out.replaced_sender, None);
    }

    #[test]
    fn add_user_is_a_join() {
        let out = chat_message("chat.addUser", br#"{"roomId":"42","type":"CHAT"}"#, None).unwrap();
        assert_eq!(parse(&out)["type"], "JOIN");
    }

    #[test]
    fn malformed_messages_say_why() {
        let cases: [(&[u8], &str); 9] = [
            (b"not json", "not JSON"),
            (b"[1,2]", "not a JSON object"),
            (br#"{"content":"x"}"#, "no roomId"),
            (br#"{"roomId":null}"#, "no roomId"),
            (br#"{"roomId":""}"#, "empty"),
            (br#"{"roomId":1.5}"#, "string or an integer"),
            (br#"{"roomId":"42.x"}"#, "one routing-key word"),
            (br#"{"roomId":"*"}"#, "one routing-key word"),
            (br#"{"roomId":"a b"}"#, "one routing-key word"),
        ];
        for (body, why) in cases {
            let e = chat_message("chat.sendMessage", body, None).unwrap_err();
            assert!(
                e.0.contains(why),
                "{:?}: {e}",
                String::from_utf8_lossy(body)
            );
        }
        let long = format!(r#"{{"roomId":"{}"}}"#, "x".repeat(MAX_ROOM_ID_BYTES + 1));
        assert!(chat_message("chat.sendMessage", long.as_bytes(), None).is_err());
    }
}
