//! How shared destinations map to AMQP and back, the way RabbitMQ's STOMP
//! plugin maps them, so a client cannot tell the shared path from its own
//! STOMP connection:
//!
//! - [`binding_of`]: `/topic/<key>` is a binding of `amq.topic` with
//!   `<key>`, `/exchange/<x>/<pattern>` of `<x>` with `<pattern>`;
//! - [`message_headers`]: the MESSAGE headers the plugin writes for an AMQP
//!   delivery (destination from the delivery's exchange and routing key,
//!   `redelivered`, string and integer AMQP headers, then the properties);
//! - [`send_properties`]: the AMQP properties and headers the plugin makes of
//!   a SEND (content-type, persistent, reply-to, correlation-id, expiration,
//!   priority, custom headers as AMQP headers);
//! - [`KeyIndex`]: which subscribed destinations an (exchange, routing key)
//!   reaches, with AMQP topic matching (`*` one word, `#` zero or more).

use lapin::types::{AMQPValue, FieldTable, LongString, ShortString};
use lapin::BasicProperties;
use std::collections::HashMap;
use std::sync::Arc;

/// The exchange `/topic/` destinations use.
pub const TOPIC_EXCHANGE: &str = "amq.topic";

/// The (exchange, routing pattern) a shared destination is bound with;
/// `None` if it is not a shared destination. The session core decided the
/// destination is shared with the same reading
/// ([`relay_core::router::amqp_target`], the STOMP plugin's: `%2F` is `/`).
pub fn binding_of(destination: &str) -> Option<(String, String)> {
    relay_core::router::amqp_target(destination)
}

/// The `destination` header of a delivery, as the STOMP plugin writes it:
/// `/topic/<rk>` from `amq.topic`, `/queue/<rk>` from the default exchange,
/// `/exchange/<x>/<rk>` otherwise.
pub fn destination_of(exchange: &str, routing_key: &str) -> String {
    match exchange {
        TOPIC_EXCHANGE => format!("/topic/{routing_key}"),
        "" => format!("/queue/{routing_key}"),
        x => format!("/exchange/{x}/{routing_key}"),
    }
}

/// Whether an AMQP topic `pattern` matches `key` (words split on `.`; `*`
/// is one word, `#` zero or more).
pub fn topic_matches(pattern: &str, key: &str) -> bool {
    fn go(p: &[&str], k: &[&str]) -> bool {
        match p.split_first() {
            None => k.is_empty(),
            Some((&"#", rest)) => (0..=k.len()).any(|i| go(rest, &k[i..])),
            Some((&w, rest)) => match k.split_first() {
                Some((&kw, krest)) => (w == "*" || w == kw) && go(rest, krest),
                None => false,
            },
        }
    }
    let p: Vec<&str> = pattern.split('.').collect();
    let k: Vec<&str> = key.split('.').collect();
    go(&p, &k)
}

/// Destinations the plugin keeps as is in `reply-to`; anything else is an
/// AMQP queue name, written as `/reply-queue/<name>`.
const REPLY_TO_PREFIXES: [&str; 5] = [
    "/exchange/",
    "/queue/",
    "/topic/",
    "/amq/queue/",
    "/reply-queue/",
];

/// The MESSAGE headers (other than `subscription`, `message-id` and `ack`)
/// for an AMQP delivery, in the plugin's order.
pub fn message_headers(
    exchange: &str,
    routing_key: &str,
    redelivered: bool,
    properties: &BasicProperties,
) -> Vec<(String, String)> {
    let mut h: Vec<(String, String)> = Vec::with_capacity(8);
    h.push(("destination".into(), destination_of(exchange, routing_key)));
    h.push(("redelivered".into(), redelivered.to_string()));
    if let Some(table) = properties.headers() {
        // The plugin writes them in reverse order of the table.
        let mut custom: Vec<(String, String)> = table
            .inner()
            .iter()
            .filter_map(|(k, v)| header_text(v).map(|v| (k.to_string(), v)))
            .collect();
        custom.reverse();
        h.extend(custom);
    }
    let mut put = |name: &str, value: Option<String>| {
        if let Some(v) = value {
            h.push((name.to_owned(), v));
        }
    };
    let s = |v: &Option<ShortString>| v.as_ref().map(|s| s.to_string());
    put("user-id", s(properties.user_id()));
    put("app-id", s(properties.app_id()));
    put("type", s(properties.kind()));
    put("timestamp", properties.timestamp().map(|t| t.to_string()));
    put("amqp-message-id", s(properties.message_id()));
    put("expiration", s(properties.expiration()));
    put(
        "reply-to",
        properties.reply_to().as_ref().map(|r| {
            let r = r.to_string();
            if REPLY_TO_PREFIXES.iter().any(|p| r.starts_with(p)) {
                r
            } else {
                format!("/reply-queue/{r}")
            }
        }),
    );
    put("correlation-id", s(properties.correlation_id()));
    put("priority", properties.priority().map(|p| p.to_string()));
    put(
        "persistent",
        properties.delivery_mode().map(|m| match m {
            2 => "true".to_owned(),
            m => m.to_string(),
        }),
    );
    put("content-encoding", s(properties.content_encoding()));
    put("content-type", s(properties.content_type()));
    h
}

/// An AMQP header value as the plugin writes it: strings and integers;
/// other types (floats, booleans, tables, ...) are left out.
fn header_text(v: &AMQPValue) -> Option<String> {
    Some(match v {
        AMQPValue::LongString(s) => String::from_utf8_lossy(s.as_bytes()).into_owned(),
        AMQPValue::ShortString(s) => s.to_string(),
        AMQPValue::ShortShortInt(i) => i.to_string(),
        AMQPValue::ShortShortUInt(i) => i.to_string(),
        AMQPValue::ShortInt(i) => i.to_string(),
        AMQPValue::ShortUInt(i) => i.to_string(),
        AMQPValue::LongInt(i) => i.to_string(),
        AMQPValue::LongUInt(i) => i.to_string(),
        AMQPValue::LongLongInt(i) => i.to_string(),
        _ => return None,
    })
}

/// SEND headers that are STOMP protocol, not message headers. (`receipt`
/// is not among them: the plugin keeps it as a message header.)
const PROTOCOL_HEADERS: [&str; 5] = [
    "destination",
    "content-length",
    "transaction",
    "message-id",
    "subscription",
];

/// Why a SEND cannot be published.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SendMappingError {
    #[error("header {name} has an invalid value {value:?}: {reason}")]
    InvalidHeader {
        name: String,
        value: String,
        reason: &'static str,
    },
}

/// The AMQP properties (with the custom headers in `headers`) the STOMP
/// plugin makes of a SEND's headers. Reserved identity headers are the
/// router's business (removed before this is called).
pub fn send_properties(headers: &[(String, String)]) -> Result<BasicProperties, SendMappingError> {
    let mut p = BasicProperties::default();
    let mut table = FieldTable::default();
    let mut seen: Vec<&str> = Vec::new();
    let invalid = |name: &str, value: &str, reason| SendMappingError::InvalidHeader {
        name: name.to_owned(),
        value: value.to_owned(),
        reason,
    };
    let short = |name: &str, value: &str| {
        ShortString::try_new(value).map_err(|_| invalid(name, value, "longer than 255 bytes"))
    };
    for (name, value) in headers {
        // Only the first of a repeated header counts (STOMP 1.2).
        if seen.contains(&name.as_str()) || PROTOCOL_HEADERS.contains(&name.as_str()) {
            continue;
        }
        seen.push(name);
        p = match name.as_str() {
            "content-type" => p.with_content_type(short(name, value)?),
            "content-encoding" => p.with_content_encoding(short(name, value)?),
            "persistent" => {
                if value.eq_ignore_ascii_case("true") {
                    p.with_delivery_mode(2)
                } else {
                    p
                }
            }
            "priority" => p.with_priority(
                value
                    .parse()
                    .map_err(|_| invalid(name, value, "not a number from 0 to 255"))?,
            ),
            "correlation-id" => p.with_correlation_id(short(name, value)?),
            "reply-to" => p.with_reply_to(short(name, value)?),
            "expiration" => p.with_expiration(short(name, value)?),
            "amqp-message-id" => p.with_message_id(short(name, value)?),
            "type" => p.with_type(short(name, value)?),
            "app-id" => p.with_app_id(short(name, value)?),
            "timestamp" => p.with_timestamp(
                value
                    .parse()
                    .map_err(|_| invalid(name, value, "not a number"))?,
            ),
            _ => {
                let Ok(key) = ShortString::try_new(name.as_str()) else {
                    return Err(invalid(name, value, "header name longer than 255 bytes"));
                };
                table.insert(
                    key,
                    AMQPValue::LongString(LongString::from(value.as_bytes())),
                );
                p
            }
        };
    }
    if !table.inner().is_empty() {
        p = p.with_headers(table);
    }
    Ok(p)
}

/// Which subscribed destinations an (exchange, routing key) reaches.
#[derive(Debug, Default)]
pub struct KeyIndex {
    by_exchange: HashMap<String, Patterns>,
}

#[derive(Debug, Default)]
struct Patterns {
    /// Patterns without wildcards: found by lookup.
    exact: HashMap<String, Vec<Arc<str>>>,
    /// Patterns with `*` or `#`: matched one by one.
    wild: Vec<(String, Arc<str>)>,
}

impl KeyIndex {
    /// Indexes `destination` under its binding; false if it has none.
    pub fn insert(&mut self, destination: &Arc<str>) -> bool {
        let Some((exchange, pattern)) = binding_of(destination) else {
            return false;
        };
        let p = self.by_exchange.entry(exchange).or_default();
        if pattern.split('.').any(|w| w == "*" || w == "#") {
            p.wild.push((pattern, destination.clone()));
        } else {
            p.exact
                .entry(pattern)
                .or_default()
                .push(destination.clone());
        }
        true
    }

    /// Forgets `destination`.
    pub fn remove(&mut self, destination: &str) {
        let Some((exchange, pattern)) = binding_of(destination) else {
            return;
        };
        let Some(p) = self.by_exchange.get_mut(&exchange) else {
            return;
        };
        p.wild.retain(|(_, d)| &**d != destination);
        if let Some(v) = p.exact.get_mut(&pattern) {
            v.retain(|d| &**d != destination);
            if v.is_empty() {
                p.exact.remove(&pattern);
            }
        }
        if p.exact.is_empty() && p.wild.is_empty() {
            self.by_exchange.remove(&exchange);
        }
    }

    /// Calls `f` for each indexed destination the delivery reaches.
    /// Patterns match the way a topic exchange matches them (a direct
    /// exchange the same, for patterns without `*` or `#`).
    pub fn matching(&self, exchange: &str, routing_key: &str, mut f: impl FnMut(&Arc<str>)) {
        let Some(p) = self.by_exchange.get(exchange) else {
            return;
        };
        if let Some(v) = p.exact.get(routing_key) {
            v.iter().for_each(&mut f);
        }
        for (pattern, d) in &p.wild {
            if topic_matches(pattern, routing_key) {
                f(d);
            }
        }
    }

    /// Calls `f` for every indexed destination on `exchange` (for an
    /// exchange that does not route by key: fanout, headers).
    pub fn on_exchange(&self, exchange: &str, mut f: impl FnMut(&Arc<str>)) {
        let Some(p) = self.by_exchange.get(exchange) else {
            return;
        };
        p.exact.values().flatten().for_each(&mut f);
        p.wild.iter().for_each(|(_, d)| f(d));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bindings_of_shared_destinations() {
        let b = |d: &str| binding_of(d).map(|(x, p)| format!("{x} {p}"));
        assert_eq!(b("/topic/a.b").as_deref(), Some("amq.topic a.b"));
        assert_eq!(b("/exchange/x/a.*").as_deref(), Some("x a.*"));
        // The plugin refuses a second `/`; `%2F` stands for one.
        assert_eq!(b("/exchange/x/a/b"), None);
        assert_eq!(b("/exchange/x/a%2Fb").as_deref(), Some("x a/b"));
        assert_eq!(b("/exchange/x").as_deref(), Some("x "));
        assert_eq!(b("/topic/"), None);
        assert_eq!(b("/exchange/"), None);
        assert_eq!(b("/queue/q"), None);
    }

    #[test]
    fn topic_matching() {
        for (p, k, m) in [
            ("a.b", "a.b", true),
            ("a.*", "a.b", true),
            ("a.*", "a.b.c", false),
            ("a.#", "a", true),
            ("a.#", "a.b.c", true),
            ("#", "", true),
            ("#.c", "a.b.c", true),
            ("*.b.#", "a.b", true),
            ("*", "a.b", false),
            ("a.b", "a.c", false),
        ] {
            assert_eq!(topic_matches(p, k), m, "{p} vs {k}");
        }
    }

    #[test]
    fn index_finds_exact_and_wildcard_destinations() {
        let mut ix = KeyIndex::default();
        let d = |s: &str| Arc::<str>::from(s);
        for s in [
            "/topic/a.b",
            "/exchange/amq.topic/a.*",
            "/topic/#",
            "/exchange/x/a.b",
        ] {
            assert!(ix.insert(&d(s)));
        }
        assert!(!ix.insert(&d("/queue/q")));
        let hits = |ix: &KeyIndex, x: &str, k: &str| {
            let mut v = Vec::new();
            ix.matching(x, k, |d| v.push(d.to_string()));
            v.sort();
            v
        };
        assert_eq!(
            hits(&ix, "amq.topic", "a.b"),
            vec!["/exchange/amq.topic/a.*", "/topic/#", "/topic/a.b"]
        );
        assert_eq!(hits(&ix, "x", "a.b"), vec!["/exchange/x/a.b"]);
        assert!(hits(&ix, "x", "other").is_empty());
        let mut all = Vec::new();
        ix.on_exchange("x", |d| all.push(d.to_string()));
        assert_eq!(all, vec!["/exchange/x/a.b"]);
        ix.remove("/topic/#");
        ix.remove("/topic/a.b");
        assert_eq!(
            hits(&ix, "amq.topic", "a.b"),
            vec!["/exchange/amq.topic/a.*"]
        );
        ix.remove("/exchange/amq.topic/a.*");
        ix.remove("/exchange/x/a.b");
        assert!(ix.by_exchange.is_empty());
    }

    #[test]
    fn send_headers_become_amqp_properties() {
        let h = |k: &str, v: &str| (k.to_owned(), v.to_owned());
        let p = send_properties(&[
            h("destination", "/topic/x"),
            h("receipt", "r1"),
            h("content-type", "text/plain"),
            h("persistent", "true"),
            h("priority", "5"),
            h("reply-to", "/temp-queue/r"),
            h("correlation-id", "c"),
            h("expiration", "1000"),
            h("x-custom", "v"),
            h("x-custom", "second is ignored"),
        ])
        .expect("valid");
        assert_eq!(
            p.content_type().as_ref().map(|s| s.as_str()),
            Some("text/plain")
        );
        assert_eq!(*p.delivery_mode(), Some(2));
        assert_eq!(*p.priority(), Some(5));
        assert_eq!(
            p.reply_to().as_ref().map(|s| s.as_str()),
            Some("/temp-queue/r")
        );
        assert_eq!(p.correlation_id().as_ref().map(|s| s.as_str()), Some("c"));
        assert_eq!(p.expiration().as_ref().map(|s| s.as_str()), Some("1000"));
        let table = p.headers().as_ref().expect("custom headers");
        assert_eq!(table.inner().len(), 2);
        assert_eq!(
            header_text(table.inner().get("receipt").expect("receipt")).as_deref(),
            Some("r1")
        );
        assert_eq!(
            header_text(table.inner().get("x-custom").expect("x-custom")).as_deref(),
            Some("v")
        );
        assert!(send_properties(&[h("priority", "high")]).is_err());
    }

    #[test]
    fn delivery_headers_like_the_plugin() {
        let mut table = FieldTable::default();
        table.insert("x-a".into(), AMQPValue::LongString("1".into()));
        table.insert("x-n".into(), AMQPValue::LongInt(42));
        table.insert("x-f".into(), AMQPValue::Double(1.5));
        let p = BasicProperties::default()
            .with_headers(table)
            .with_delivery_mode(2)
            .with_reply_to("amq.gen-1".into())
            .with_content_type("text/plain".into());
        let h = message_headers("amq.topic", "a.b", false, &p);
        let get = |n: &str| h.iter().find(|(k, _)| k == n).map(|(_, v)| v.as_str());
        assert_eq!(get("destination"), Some("/topic/a.b"));
        assert_eq!(get("redelivered"), Some("false"));
        assert_eq!(get("x-n"), Some("42"));
        assert_eq!(get("x-f"), None, "floats are left out");
        assert_eq!(get("reply-to"), Some("/reply-queue/amq.gen-1"));
        assert_eq!(get("persistent"), Some("true"));
        assert_eq!(get("content-type"), Some("text/plain"));
        assert_eq!(destination_of("x", "k"), "/exchange/x/k");
        assert_eq!(destination_of("", "q"), "/queue/q");
    }
}
