//! The demo chat page at `/` on the client listener (`[demo]`), and the
//! browser scripts it loads from `/assets/` (sockjs-client and
//! @stomp/stompjs, vendored in `gateway/assets/`, compiled in: no CDN).

use crate::config::Config;
use bytes::Bytes;

const PAGE: &str = include_str!("../assets/demo.html");
const SOCKJS_CLIENT: &[u8] = include_bytes!("../assets/sockjs.min.js");
const STOMPJS: &[u8] = include_bytes!("../assets/stomp.umd.min.js");
const MARK: &str = "/*DEMO_CONFIG*/";

/// The script served at `path` under `/assets/`: content type and bytes.
pub fn asset(path: &str) -> Option<(&'static str, &'static [u8])> {
    const JS: &str = "application/javascript;charset=UTF-8";
    match path {
        "/assets/sockjs.min.js" => Some((JS, SOCKJS_CLIENT)),
        "/assets/stomp.umd.min.js" => Some((JS, STOMPJS)),
        _ => None,
    }
}

/// The page with the gateway's endpoints and `[demo]` destinations filled in.
pub fn page(config: &Config) -> Bytes {
    let eps = &config.server.endpoints;
    let settings = serde_json::json!({
        "websocket": eps.iter().find(|e| !e.sockjs).map(|e| e.path.as_str()),
        "sockjs": eps.iter().find(|e| e.sockjs).map(|e| e.path.as_str()),
        "room_destination": config.demo.room_destination,
        "send_destination": config.demo.send_destination,
    })
    .to_string()
    // Inside <script>: no `</script>` can be smuggled in.
    .replace('<', "\\u003c");
    let Some(start) = PAGE.find(MARK) else {
        return Bytes::from_static(PAGE.as_bytes());
    };
    let from = start + MARK.len();
    let end = PAGE[from..].find(";\n").map_or(from, |i| from + i);
    Bytes::from(format!(
        "{}{MARK}{settings}{}",
        &PAGE[..start],
        &PAGE[end..]
    ))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Endpoint;

    #[test]
    fn page_carries_the_configuration() {
        let mut c = Config::default();
        c.server.endpoints.push(Endpoint {
            path: "/portfolio".into(),
            sockjs: true,
        });
        c.demo.room_destination = "/exchange/adme.exchange/room.{room}".into();
        c.demo.send_destination = "/app/chat.sendMessage</script>".into();
        let p = page(&c);
        let p = std::str::from_utf8(&p).expect("utf-8");
        assert!(p.contains(
            r#"const CONFIG = /*DEMO_CONFIG*/{"room_destination":"/exchange/adme.exchange/room.{room}","send_destination":"/app/chat.sendMessage\u003c/script>","sockjs":"/portfolio","websocket":"/ws"};"#
        ), "{p}");
        assert!(asset("/assets/sockjs.min.js").is_some_and(|(_, b)| b.len() > 10_000));
        assert!(asset("/assets/stomp.umd.min.js").is_some());
        assert!(asset("/assets/other.js").is_none());
    }
}
