//! Loading and validation tests.

use super::load::{env_var_to_key, is_gateway_var};
use super::validate::{MAX_DRAIN_PERIOD_MS, MAX_POD_ID_BYTES};
use super::*;
use std::collections::HashMap;
use std::io::Write;
use std::path::Path;

fn env(vars: &[(&str, &str)]) -> HashMap<String, String> {
    vars.iter()
        .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
        .collect()
}

/// A TOML file that lives as long as the returned guard.
struct TempFile(PathBuf);

impl TempFile {
    fn new(name: &str, contents: &str) -> TempFile {
        let path = std::env::temp_dir().join(format!(
            "stomp-gateway-config-test-{}-{name}.toml",
            std::process::id()
        ));
        let mut f = std::fs::File::create(&path).expect("create temp file");
        f.write_all(contents.as_bytes()).expect("write temp file");
        TempFile(path)
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn load_err(path: Option<&Path>, vars: &[(&str, &str)]) -> ConfigError {
    match load_from(path, env(vars)) {
        Ok(c) => panic!("expected an error, loaded {c:?}"),
        Err(e) => e,
    }
}

#[test]
fn defaults_load_and_validate() {
    let c = load_from(None, HashMap::new()).expect("defaults load");
    c.validate().expect("defaults validate");
    assert_eq!(c.server.listen, "0.0.0.0:8080");
    assert_eq!(c.broker.addresses, vec!["127.0.0.1:61613".to_owned()]);
    Config::default().validate().expect("Default validates");
}

#[test]
fn broker_mode_defaults_to_embedded_and_amqp_follows_an_explicit_url() {
    let c = load_from(None, HashMap::new()).expect("defaults load");
    assert_eq!(c.broker.mode, BrokerMode::Embedded);
    assert!(!c.amqp.url_set);
    assert!(!c.control_plane_enabled(), "embedded: no AMQP by default");

    let relay = TempFile::new("mode-relay", "[broker]\nmode = \"relay\"\n");
    let c = load_from(Some(&relay.0), HashMap::new()).expect("relay loads");
    assert_eq!(c.broker.mode, BrokerMode::Relay);
    assert!(c.control_plane_enabled(), "relay: always AMQP");

    // Set to the default value, still explicit.
    let url = TempFile::new(
        "mode-url",
        "[amqp]\nurl = \"amqp://guest:guest@127.0.0.1:5672/%2f\"\n",
    );
    let c = load_from(Some(&url.0), HashMap::new()).expect("loads");
    assert!(c.amqp.url_set && c.control_plane_enabled());
    let c = load_from(
        None,
        env(&[("GATEWAY__AMQP__URL", "amqp://x:y@h:5672/%2f")]),
    )
    .expect("loads");
    assert!(c.amqp.url_set && c.control_plane_enabled());
    let c = load_from(None, env(&[("GATEWAY__BROKER__MODE", "relay")])).expect("loads");
    assert_eq!(c.broker.mode, BrokerMode::Relay);

    let e = load_err(None, &[("GATEWAY__BROKER__MODE", "rabbit")]);
    assert_eq!(e.key(), Some("broker.mode"), "{e}");
    assert!(e.to_string().contains("embedded, relay"), "{e}");
    let c = load_from(None, env(&[("GATEWAY__HUB__MAX_QUEUED_BYTES", "0")])).expect("loads");
    let e = c.validate().expect_err("zero bytes refused");
    assert_eq!(e.key(), Some("hub.max_queued_bytes"), "{e}");
    let c = load_from(None, env(&[("GATEWAY__HUB__MAX_QUEUED_MS", "0")])).expect("loads");
    let e = c.validate().expect_err("zero wait refused");
    assert_eq!(e.key(), Some("hub.max_queued_ms"), "{e}");
}

#[test]
fn fanout_defaults_to_shared_and_takes_per_session_from_file_and_env() {
    let c = load_from(None, HashMap::new()).expect("defaults load");
    assert_eq!(c.fanout.topic, FanoutPath::Shared);
    assert_eq!(c.fanout.exchange, FanoutPath::Shared);
    assert_eq!(c.fanout.user, FanoutPath::Shared);
    assert_eq!(c.fanout.on_upstream_loss, UpstreamLoss::Keep);
    assert!(c.fanout.any_shared());

    let f = TempFile::new(
        "fanout",
        "[fanout]\ntopic = \"per-session\"\non_upstream_loss = \"close\"\nunbind_delay_ms = 0\n",
    );
    let c = load_from(
        Some(&f.0),
        env(&[
            ("GATEWAY__FANOUT__EXCHANGE", "per-session"),
            ("GATEWAY__FANOUT__USER", "per-session"),
        ]),
    )
    .expect("loads");
    assert_eq!(c.fanout.topic, FanoutPath::PerSession);
    assert_eq!(c.fanout.exchange, FanoutPath::PerSession);
    assert_eq!(c.fanout.user, FanoutPath::PerSession);
    assert_eq!(c.fanout.on_upstream_loss, UpstreamLoss::Close);
    assert_eq!(c.fanout.unbind_delay_ms, 0);
    assert!(!c.fanout.any_shared());

    let e = load_err(None, &[("GATEWAY__FANOUT__TOPIC", "per_session")]);
    assert_eq!(e.key(), Some("fanout.topic"), "{e}");
    assert!(e.to_string().contains("shared, per-session"), "{e}");
    let e = load_err(None, &[("GATEWAY__FANOUT__ON_UPSTREAM_LOSS", "drop")]);
    assert_eq!(e.key(), Some("fanout.on_upstream_loss"), "{e}");
}

#[test]
fn file_then_env_precedence() {
    let file = TempFile::new(
        "precedence",
        r#"
[server]
listen = "127.0.0.1:8181"
endpoints = [ { path = "/stomp" }, { path = "/ws2" } ]
message_type = "binary"

[broker]
addresses = ["a:61613", "b:61613"]
client_passcode = "from-file"
connect_timeout_ms = 1234

[log]
format = "json"
"#,
    );
    // File only: file beats defaults, untouched keys keep defaults.
    let c = load_from(Some(&file.0), HashMap::new()).expect("file loads");
    assert_eq!(c.server.listen, "127.0.0.1:8181");
    assert_eq!(c.server.admin_listen, "0.0.0.0:9090");
    assert_eq!(
        c.server.endpoints,
        vec![
            Endpoint {
                path: "/stomp".into(),
                sockjs: false,
            },
            Endpoint {
                path: "/ws2".into(),
                sockjs: false,
            }
        ]
    );
    assert_eq!(c.server.message_type, MessageType::Binary);
    assert_eq!(c.broker.addresses, vec!["a:61613", "b:61613"]);
    assert_eq!(c.broker.client_passcode, "from-file");
    assert_eq!(c.broker.connect_timeout_ms, 1234);
    assert_eq!(c.log.format, LogFormat::Json);
    c.validate().expect("file config validates");

    // Env beats file; unrelated variables are ignored.
    let c = load_from(
        Some(&file.0),
        env(&[
            ("GATEWAY__SERVER__LISTEN", "127.0.0.1:8282"),
            ("GATEWAY__BROKER__ADDRESSES", "c:61613, d:61614"),
            ("GATEWAY__BROKER__CLIENT_PASSCODE", "0123"),
            ("GATEWAY__BROKER__SYSTEM_LOGIN", "true"),
            ("GATEWAY__BROKER__CONNECT_TIMEOUT_MS", "4321"),
            ("gateway__session__max_frame_size", "2048"),
            ("GATEWAY__SERVER__ENDPOINTS", "/a,/b"),
            ("GATEWAY__SERVER__ALLOWED_ORIGINS", "https://x.example"),
            ("GATEWAY__SERVER__MESSAGE_TYPE", "text"),
            ("GATEWAY__APP__PREFIXES", ""),
            ("GATEWAY_CONFIG", "/not/used"),
            ("PATH", "/usr/bin"),
        ]),
    )
    .expect("file + env loads");
    assert_eq!(c.server.listen, "127.0.0.1:8282");
    assert_eq!(c.broker.addresses, vec!["c:61613", "d:61614"]);
    assert_eq!(c.broker.client_passcode, "0123");
    assert_eq!(c.broker.system_login, "true");
    assert_eq!(c.broker.connect_timeout_ms, 4321);
    assert_eq!(c.session.max_frame_size, 2048);
    assert_eq!(
        c.server.endpoints,
        vec![
            Endpoint {
                path: "/a".into(),
                sockjs: false
            },
            Endpoint {
                path: "/b".into(),
                sockjs: false
            }
        ]
    );
    assert_eq!(c.server.allowed_origins, vec!["https://x.example"]);
    assert_eq!(c.server.message_type, MessageType::Text);
    assert!(c.app.prefixes.is_empty());
    assert_eq!(c.log.format, LogFormat::Json, "file value kept");
    c.validate().expect("file + env config validates");
}

#[test]
fn missing_or_malformed_file_names_the_path() {
    let missing = std::env::temp_dir().join("stomp-gateway-no-such-config.toml");
    let e = load_err(Some(&missing), &[]);
    assert!(matches!(&e, ConfigError::File { path, .. } if *path == missing));
    assert!(
        e.to_string().contains("stomp-gateway-no-such-config.toml"),
        "{e}"
    );

    let bad = TempFile::new("syntax", "[server\nlisten = 1\n");
    let e = load_err(Some(&bad.0), &[]);
    assert!(
        matches!(&e, ConfigError::File { path, .. } if *path == bad.0),
        "{e}"
    );
}

#[test]
fn unknown_keys_are_rejected_by_name() {
    let f = TempFile::new("unknown-section", "[nope]\nx = 1\n");
    let e = load_err(Some(&f.0), &[]);
    assert_eq!(e.key(), Some("nope"), "{e}");

    let f = TempFile::new("unknown-key", "[broker]\nadresses = [\"a:1\"]\n");
    let e = load_err(Some(&f.0), &[]);
    assert_eq!(e.key(), Some("broker.adresses"), "{e}");
    assert_eq!(
        e.to_string(),
        "invalid config: broker.adresses: unknown key"
    );

    let f = TempFile::new(
        "unknown-endpoint-key",
        "[server]\nendpoints = [ { path = \"/ws\" }, { path = \"/x\", sockjss = true } ]\n",
    );
    let e = load_err(Some(&f.0), &[]);
    assert_eq!(e.key(), Some("server.endpoints[1].sockjss"), "{e}");

    let e = load_err(None, &[("GATEWAY__BROKER__PASSWORD", "x")]);
    assert_eq!(e.key(), Some("broker.password"), "{e}");
    assert!(
        e.to_string()
            .contains("set by environment variable GATEWAY__BROKER__PASSWORD"),
        "{e}"
    );
}

#[test]
fn wrong_types_name_the_key() {
    let f = TempFile::new("bad-type", "[session]\nmax_frame_size = \"big\"\n");
    let e = load_err(Some(&f.0), &[]);
    assert_eq!(e.key(), Some("session.max_frame_size"), "{e}");

    let f = TempFile::new("bad-enum", "[server]\nmessage_type = \"morse\"\n");
    let e = load_err(Some(&f.0), &[]);
    assert_eq!(e.key(), Some("server.message_type"), "{e}");
    assert!(
        e.to_string()
            .contains("expected one of: auto, text, binary"),
        "{e}"
    );

    let f = TempFile::new("negative", "[server]\nmax_connections = -1\n");
    let e = load_err(Some(&f.0), &[]);
    assert_eq!(e.key(), Some("server.max_connections"), "{e}");

    let e = load_err(None, &[("GATEWAY__BROKER__RECONNECT_MAX_MS", "soon")]);
    assert_eq!(e.key(), Some("broker.reconnect_max_ms"), "{e}");
    assert!(e.to_string().contains("environment"), "{e}");
}

fn invalid_key(mutate: impl FnOnce(&mut Config)) -> String {
    let mut c = Config::default();
    mutate(&mut c);
    match c.validate() {
        Ok(()) => panic!("expected a validation error"),
        Err(e) => {
            assert!(e.to_string().starts_with("invalid config: "), "{e}");
            e.key().expect("error names a key").to_owned()
        }
    }
}

type Mutation = Box<dyn FnOnce(&mut Config)>;

#[test]
fn validation_rules_name_the_key() {
    let cases: Vec<(&str, Mutation)> = vec![
        (
            "server.listen",
            Box::new(|c| c.server.listen = "localhost".into()),
        ),
        (
            "server.admin_listen",
            Box::new(|c| c.server.admin_listen = "1.2.3.4".into()),
        ),
        (
            "server.admin_listen",
            Box::new(|c| c.server.admin_listen = c.server.listen.clone()),
        ),
        ("server.endpoints", Box::new(|c| c.server.endpoints.clear())),
        (
            "server.endpoints[0].path",
            Box::new(|c| c.server.endpoints[0].path = "ws".into()),
        ),
        (
            "server.endpoints[1].path",
            Box::new(|c| {
                c.server.endpoints.push(Endpoint {
                    path: "/ws".into(),
                    sockjs: false,
                });
            }),
        ),
        (
            "server.allowed_origins[0]",
            Box::new(|c| c.server.allowed_origins = vec![String::new()]),
        ),
        (
            "server.max_connections",
            Box::new(|c| c.server.max_connections = 0),
        ),
        (
            "server.max_ws_message_size",
            Box::new(|c| c.server.max_ws_message_size = c.session.max_frame_size - 1),
        ),
        (
            "session.max_frame_size",
            Box::new(|c| c.session.max_frame_size = 1023),
        ),
        (
            "session.max_header_count",
            Box::new(|c| c.session.max_header_count = 0),
        ),
        (
            "session.max_header_line",
            Box::new(|c| c.session.max_header_line = 0),
        ),
        (
            "session.max_subscriptions",
            Box::new(|c| c.session.max_subscriptions = 0),
        ),
        (
            "session.max_pending_frames",
            Box::new(|c| c.session.max_pending_frames = 0),
        ),
        (
            "session.outbound_buffer_bytes",
            Box::new(|c| c.session.outbound_buffer_bytes = c.session.max_frame_size - 1),
        ),
        (
            "session.connect_timeout_ms",
            Box::new(|c| c.session.connect_timeout_ms = 0),
        ),
        ("broker.addresses", Box::new(|c| c.broker.addresses.clear())),
        (
            "broker.addresses[1]",
            Box::new(|c| c.broker.addresses.push("foo".into())),
        ),
        (
            "broker.addresses[0]",
            Box::new(|c| c.broker.addresses[0] = "host:0".into()),
        ),
        (
            "broker.addresses[0]",
            Box::new(|c| c.broker.addresses[0] = "host:65536".into()),
        ),
        (
            "broker.addresses[0]",
            Box::new(|c| c.broker.addresses[0] = ":61613".into()),
        ),
        (
            "broker.virtual_host",
            Box::new(|c| c.broker.virtual_host = "a\nb".into()),
        ),
        (
            "broker.system_passcode",
            Box::new(|c| c.broker.system_passcode = "x\0".into()),
        ),
        (
            "broker.connect_timeout_ms",
            Box::new(|c| c.broker.connect_timeout_ms = 0),
        ),
        (
            "broker.reconnect_initial_ms",
            Box::new(|c| c.broker.reconnect_initial_ms = 0),
        ),
        (
            "broker.reconnect_initial_ms",
            Box::new(|c| {
                c.broker.reconnect_initial_ms = 10;
                c.broker.reconnect_max_ms = 9;
            }),
        ),
        (
            "broker.relay_prefixes[0]",
            Box::new(|c| c.broker.relay_prefixes[0] = "topic/".into()),
        ),
        (
            "broker.relay_prefixes[0]",
            Box::new(|c| c.broker.relay_prefixes[0] = String::new()),
        ),
        (
            "app.prefixes[0]",
            Box::new(|c| c.app.prefixes[0] = "app/".into()),
        ),
        ("user.prefix", Box::new(|c| c.user.prefix = "user".into())),
        (
            "app.prefixes[0]",
            Box::new(|c| c.app.prefixes[0] = "/topic/".into()),
        ),
        ("user.prefix", Box::new(|c| c.user.prefix = "/app/".into())),
        (
            "app.prefixes[0]",
            Box::new(|c| c.app.prefixes[0] = "/queue/app/".into()),
        ),
        ("log.filter", Box::new(|c| c.log.filter = "info,[".into())),
    ];
    for (expected, mutate) in cases {
        assert_eq!(invalid_key(mutate), expected);
    }
}

#[test]
fn accepted_edge_values() {
    let mut c = Config::default();
    c.broker.addresses = vec![
        "rabbit-0.rabbit.svc:61613".into(),
        "[::1]:61613".into(),
        "10.0.0.1:1".into(),
    ];
    c.server.listen = "127.0.0.1:0".into();
    c.server.admin_listen = "127.0.0.1:0".into();
    c.session.max_frame_size = 1024;
    c.session.outbound_buffer_bytes = 1024;
    c.broker.reconnect_initial_ms = 100;
    c.broker.reconnect_max_ms = 100;
    c.app.prefixes.clear();
    c.log.filter = "warn,stomp_gateway=debug".into();
    c.validate().expect("edge values validate");
}

#[test]
fn error_display_names_key_and_reason() {
    let mut c = Config::default();
    c.broker.addresses.push("foo".into());
    let e = c.validate().expect_err("invalid address");
    assert_eq!(
        e.to_string(),
        r#"invalid config: broker.addresses[1]: "foo" is not host:port"#
    );
}

#[test]
fn masked_toml_hides_secrets_and_round_trips() {
    let mut c = Config::default();
    c.broker.client_passcode = "client-secret".into();
    c.broker.system_passcode = "system-secret".into();
    c.amqp.url = "amqp://gw:amqp-secret@rabbit:5672/%2f?heartbeat=10".into();
    c.api.token = "api-secret-token".into();
    c.auth.jwt_secret = "jwt-secret-value".into();
    let text = c.masked().to_toml();
    for secret in [
        "client-secret",
        "system-secret",
        "amqp-secret",
        "api-secret-token",
        "jwt-secret-value",
    ] {
        assert!(!text.contains(secret), "{secret} in {text}");
    }
    assert!(text.contains(r#"client_passcode = "******""#), "{text}");
    assert!(
        text.contains(r#"url = "amqp://gw:******@rabbit:5672/%2f?heartbeat=10""#),
        "{text}"
    );
    assert!(text.contains(r#"token = "******""#), "{text}");
    assert!(text.contains(r#"jwt_secret = "******""#), "{text}");
    assert!(text.contains("[broker]"), "{text}");
    // Unset secrets stay visibly unset.
    let text = Config::default().masked().to_toml();
    assert!(text.contains(r#"token = """#), "{text}");
    assert!(text.contains(r#"jwt_secret = """#), "{text}");
    // The printed document loads back as a config file.
    let f = TempFile::new("round-trip", &c.to_toml());
    let back = load_from(Some(&f.0), HashMap::new()).expect("printed config loads");
    assert_eq!(back.broker.client_passcode, "client-secret");
    assert_eq!(back.amqp.url, c.amqp.url);
    assert_eq!(back.api.token, "api-secret-token");
    assert_eq!(back.server.endpoints, c.server.endpoints);
}

#[test]
fn url_password_masking() {
    let m = mask_url_password;
    assert_eq!(
        m("amqp://guest:guest@127.0.0.1:5672/%2f"),
        "amqp://guest:******@127.0.0.1:5672/%2f"
    );
    assert_eq!(m("amqps://u:p%40ss@h/v"), "amqps://u:******@h/v");
    assert_eq!(m("amqp://u:p@ss@h"), "amqp://u:******@h");
    assert_eq!(m("amqp://user@h/v"), "amqp://user@h/v");
    assert_eq!(m("amqp://h:5672/v"), "amqp://h:5672/v");
    assert_eq!(m("amqp://h/v?x=a:b@c"), "amqp://h/v?x=a:b@c");
    assert_eq!(m("not a url"), "not a url");
}

/// The chat example of docs/configuration.md.
const CHAT_TOPOLOGY: &str = r#"
[amqp]
url = "amqp://guest:guest@127.0.0.1:5672/%2f"
pool_size = 2

[app]
exchange = "chat.app"
exchange_type = "direct"

[api]
token = "s3cret"

[[topology.exchanges]]
name = "adme.exchange"
type = "topic"

[[topology.exchanges]]
name = "dlx"
type = "fanout"
arguments = { "alternate-exchange" = "amq.fanout" }

[[topology.exchanges]]
name = "alerts"
type = "headers"
durable = false
auto_delete = true

[[topology.queues]]
name = "adme.queue"
arguments = { "x-message-ttl" = 60000, "x-queue-type" = "quorum", "x-dead-letter-exchange" = "dlx", "x-max-length" = 1000 }

[[topology.queues]]
name = "dead.letters"
arguments = { "x-max-priority" = 10, "x-custom.dotted" = 1.5, "x-flag" = true }

[[topology.bindings]]
exchange = "adme.exchange"
queue = "adme.queue"
routing_key = "room.*"

[[topology.bindings]]
exchange = "dlx"
queue = "dead.letters"

[[topology.bindings]]
exchange = "adme.exchange"
destination_exchange = "alerts"
routing_key = "alert.#"

[[topology.bindings]]
exchange = "alerts"
queue = "dead.letters"
arguments = { "x-match" = "any", "Severity" = "high" }
"#;

#[test]
fn topology_loads_from_the_file() {
    let f = TempFile::new("topology", CHAT_TOPOLOGY);
    let c = load_from(Some(&f.0), HashMap::new()).expect("topology loads");
    c.validate().expect("topology validates");
    let t = &c.topology;
    assert_eq!(t.exchanges.len(), 3);
    assert_eq!(t.exchanges[0].name, "adme.exchange");
    assert_eq!(t.exchanges[0].kind, ExchangeType::Topic);
    assert!(t.exchanges[0].durable && !t.exchanges[0].auto_delete && !t.exchanges[0].internal);
    assert_eq!(t.exchanges[1].kind, ExchangeType::Fanout);
    assert_eq!(
        t.exchanges[1].arguments.get("alternate-exchange"),
        Some(&ArgValue::String("amq.fanout".into()))
    );
    assert_eq!(t.exchanges[2].kind, ExchangeType::Headers);
    assert!(!t.exchanges[2].durable && t.exchanges[2].auto_delete);
    let q = &t.queues[0];
    assert!(q.durable && !q.exclusive && !q.auto_delete);
    assert_eq!(
        q.arguments.get("x-message-ttl"),
        Some(&ArgValue::Int(60_000))
    );
    assert_eq!(
        q.arguments.get("x-queue-type"),
        Some(&ArgValue::String("quorum".into()))
    );
    assert_eq!(q.arguments.get("x-max-length"), Some(&ArgValue::Int(1000)));
    let q = &t.queues[1];
    assert_eq!(
        q.arguments.get("x-custom.dotted"),
        Some(&ArgValue::Float(1.5))
    );
    assert_eq!(q.arguments.get("x-flag"), Some(&ArgValue::Bool(true)));
    assert_eq!(t.bindings.len(), 4);
    assert_eq!(t.bindings[0].routing_key, "room.*");
    assert_eq!(t.bindings[1].routing_key, "");
    assert_eq!(t.bindings[2].destination_exchange, "alerts");
    assert!(t.bindings[2].queue.is_empty());
    assert_eq!(
        t.bindings[3].arguments.get("Severity"),
        Some(&ArgValue::String("high".into())),
        "argument keys keep their case"
    );
    assert_eq!(c.app.exchange_type, ExchangeType::Direct);
    assert_eq!(c.amqp.pool_size, 2);

    // Printed and loaded back: the same topology.
    let f2 = TempFile::new("topology-round-trip", &c.masked().to_toml());
    let back = load_from(Some(&f2.0), HashMap::new()).expect("printed topology loads");
    assert_eq!(back.topology.exchanges, t.exchanges);
    assert_eq!(back.topology.queues, t.queues);
    assert_eq!(back.topology.bindings, t.bindings);
}

#[test]
fn topology_unknown_keys_enums_and_env() {
    let f = TempFile::new(
        "topology-typo",
        "[[topology.queues]]\nname = \"q\"\nduarble = true\n",
    );
    let e = load_err(Some(&f.0), &[]);
    assert_eq!(e.key(), Some("topology.queues[0].duarble"), "{e}");

    let f = TempFile::new(
        "topology-typo2",
        "[[topology.bindings]]\nexchange = \"amq.topic\"\nqueue = \"q\"\nrouting = \"x\"\n",
    );
    let e = load_err(Some(&f.0), &[]);
    assert_eq!(e.key(), Some("topology.bindings[0].routing"), "{e}");

    let f = TempFile::new(
        "topology-type",
        "[[topology.exchanges]]\nname = \"a\"\n[[topology.exchanges]]\nname = \"b\"\ntype = \"x-delayed\"\n",
    );
    let e = load_err(Some(&f.0), &[]);
    assert_eq!(e.key(), Some("topology.exchanges[1].type"), "{e}");
    assert!(
        e.to_string()
            .contains("expected one of: topic, direct, fanout, headers"),
        "{e}"
    );

    let f = TempFile::new("auth-alg", "[auth]\njwt_algorithm = \"none\"\n");
    let e = load_err(Some(&f.0), &[]);
    assert_eq!(e.key(), Some("auth.jwt_algorithm"), "{e}");
    assert!(e.to_string().contains("HS256, HS384"), "{e}");

    let e = load_err(None, &[("GATEWAY__APP__EXCHANGE_TYPE", "bogus")]);
    assert_eq!(e.key(), Some("app.exchange_type"), "{e}");

    let e = load_err(None, &[("GATEWAY__TOPOLOGY__QUEUES", "a,b")]);
    assert_eq!(e.key(), Some("topology.queues"), "{e}");
    assert!(
        e.to_string().contains("only be set in the config file"),
        "{e}"
    );

    // New keys from the environment.
    let c = load_from(
        None,
        env(&[
            ("GATEWAY__AMQP__URL", "amqp://u:p@rabbit:5672/%2f"),
            ("GATEWAY__AMQP__POOL_SIZE", "8"),
            ("GATEWAY__API__TOKEN", "0123"),
            ("GATEWAY__USER__CLIENT_SEND_ENABLED", "true"),
            ("GATEWAY__AUTH__MODE", "jwt"),
            ("GATEWAY__AUTH__JWT_ALGORITHM", "HS512"),
            ("GATEWAY__AUTH__JWT_SECRET", "k"),
        ]),
    )
    .expect("env loads");
    assert_eq!(c.amqp.url, "amqp://u:p@rabbit:5672/%2f");
    assert_eq!(c.amqp.pool_size, 8);
    assert_eq!(c.api.token, "0123");
    assert!(c.user.client_send_enabled);
    assert_eq!(c.auth.mode, AuthMode::Jwt);
    assert_eq!(c.auth.jwt_algorithm, JwtAlgorithm::Hs512);
    c.validate().expect("env config validates");
}

fn queue(name: &str, args: &[(&str, ArgValue)]) -> QueueDecl {
    QueueDecl {
        name: name.into(),
        arguments: args
            .iter()
            .map(|(k, v)| ((*k).to_owned(), v.clone()))
            .collect(),
        ..QueueDecl::default()
    }
}

fn exchange(name: &str) -> ExchangeDecl {
    ExchangeDecl {
        name: name.into(),
        ..ExchangeDecl::default()
    }
}

fn binding(exchange: &str, queue: &str) -> BindingDecl {
    BindingDecl {
        exchange: exchange.into(),
        queue: queue.into(),
        ..BindingDecl::default()
    }
}

/// A valid topology the cases below break.
fn with_topology(c: &mut Config) {
    c.topology = TopologyConfig {
        exchanges: vec![exchange("adme.exchange")],
        queues: vec![queue("adme.queue", &[])],
        bindings: vec![binding("adme.exchange", "adme.queue")],
    };
}

#[test]
fn control_plane_validation_rules_name_the_key() {
    use ArgValue::{Float, Int, String as Str};
    let pem = TempFile::new("not-pem", "just text\n");
    let not_pem = pem.0.display().to_string();
    let cases: Vec<(&str, &str, Mutation)> = vec![
        (
            "amqp.url",
            "amqp:// or amqps://",
            Box::new(|c| c.amqp.url = "http://rabbit".into()),
        ),
        (
            "amqp.url",
            "not a valid AMQP URL",
            Box::new(|c| c.amqp.url = "amqp://h:notaport/".into()),
        ),
        (
            "amqp.pool_size",
            "greater than 0",
            Box::new(|c| c.amqp.pool_size = 0),
        ),
        (
            "amqp.connect_timeout_ms",
            "greater than 0",
            Box::new(|c| c.amqp.connect_timeout_ms = 0),
        ),
        (
            "amqp.reconnect_initial_ms",
            "greater than 0",
            Box::new(|c| c.amqp.reconnect_initial_ms = 0),
        ),
        (
            "amqp.reconnect_initial_ms",
            "greater than amqp.reconnect_max_ms",
            Box::new(|c| c.amqp.reconnect_max_ms = 10),
        ),
        (
            "amqp.max_inflight_publishes",
            "greater than 0",
            Box::new(|c| c.amqp.max_inflight_publishes = 0),
        ),
        (
            "amqp.publish_timeout_ms",
            "greater than 0",
            Box::new(|c| c.amqp.publish_timeout_ms = 0),
        ),
        (
            "app.exchange",
            "must not be empty",
            Box::new(|c| c.app.exchange.clear()),
        ),
        (
            "app.exchange",
            "reserved",
            Box::new(|c| c.app.exchange = "amq.gateway".into()),
        ),
        (
            "user.exchange",
            "longer than 255",
            Box::new(|c| c.user.exchange = "u".repeat(256)),
        ),
        (
            "user.exchange",
            "also app.exchange",
            Box::new(|c| c.user.exchange = c.app.exchange.clone()),
        ),
        (
            "app.max_inflight_per_session",
            "greater than 0",
            Box::new(|c| c.app.max_inflight_per_session = 0),
        ),
        (
            "api.max_body_bytes",
            "greater than 0",
            Box::new(|c| c.api.max_body_bytes = 0),
        ),
        (
            "api.token",
            "visible ASCII",
            Box::new(|c| c.api.token = "two words".into()),
        ),
        (
            "auth.jwt_secret",
            "must be set",
            Box::new(|c| c.auth.mode = AuthMode::Jwt),
        ),
        (
            "auth.jwt_public_key_file",
            "must be set",
            Box::new(|c| {
                c.auth.mode = AuthMode::Jwt;
                c.auth.jwt_algorithm = JwtAlgorithm::Rs256;
                c.auth.jwt_secret = "unused".into();
            }),
        ),
        (
            "auth.jwt_public_key_file",
            "cannot read",
            Box::new(|c| {
                c.auth.mode = AuthMode::Jwt;
                c.auth.jwt_algorithm = JwtAlgorithm::Es256;
                c.auth.jwt_public_key_file = "/nonexistent/key.pem".into();
            }),
        ),
        (
            "auth.jwt_public_key_file",
            "not a PEM file",
            Box::new(move |c| {
                c.auth.mode = AuthMode::Jwt;
                c.auth.jwt_algorithm = JwtAlgorithm::Rs512;
                c.auth.jwt_public_key_file = not_pem;
            }),
        ),
        (
            "auth.user_claim",
            "must not be empty",
            Box::new(|c| c.auth.user_claim.clear()),
        ),
        (
            "auth.token_header",
            "not a STOMP header name",
            Box::new(|c| c.auth.token_header = "a:b".into()),
        ),
        (
            "topology.exchanges[0].name",
            "must not be empty",
            Box::new(|c| {
                with_topology(c);
                c.topology.exchanges[0].name.clear();
            }),
        ),
        (
            "topology.exchanges[1].name",
            "more than once",
            Box::new(|c| {
                with_topology(c);
                c.topology.exchanges.push(exchange("adme.exchange"));
            }),
        ),
        (
            "topology.exchanges[0].name",
            "reserved",
            Box::new(|c| {
                with_topology(c);
                c.topology.exchanges[0].name = "amq.custom".into();
            }),
        ),
        (
            "topology.exchanges[1]",
            "declare it the same way",
            Box::new(|c| {
                with_topology(c);
                let mut x = exchange(&c.user.exchange);
                x.kind = ExchangeType::Topic;
                c.topology.exchanges.push(x);
            }),
        ),
        (
            "topology.queues[0].name",
            "longer than 255",
            Box::new(|c| {
                with_topology(c);
                c.topology.queues[0].name = "q".repeat(256);
            }),
        ),
        (
            "topology.queues[1].name",
            "more than once",
            Box::new(|c| {
                with_topology(c);
                c.topology.queues.push(queue("adme.queue", &[]));
            }),
        ),
        (
            "topology.queues[0].arguments.x-message-ttl",
            "non-negative",
            Box::new(|c| {
                with_topology(c);
                c.topology.queues[0] = queue("adme.queue", &[("x-message-ttl", Int(-1))]);
            }),
        ),
        (
            "topology.queues[0].arguments.x-max-length",
            "must be an integer",
            Box::new(|c| {
                with_topology(c);
                c.topology.queues[0] = queue("adme.queue", &[("x-max-length", Str("10".into()))]);
            }),
        ),
        (
            "topology.queues[0].arguments.x-max-length-bytes",
            "must be an integer",
            Box::new(|c| {
                with_topology(c);
                c.topology.queues[0] = queue("adme.queue", &[("x-max-length-bytes", Float(1.0))]);
            }),
        ),
        (
            "topology.queues[0].arguments.x-expires",
            "at least 1",
            Box::new(|c| {
                with_topology(c);
                c.topology.queues[0] = queue("adme.queue", &[("x-expires", Int(0))]);
            }),
        ),
        (
            "topology.queues[0].arguments.x-max-priority",
            "between 0 and 255",
            Box::new(|c| {
                with_topology(c);
                c.topology.queues[0] = queue("adme.queue", &[("x-max-priority", Int(256))]);
            }),
        ),
        (
            "topology.queues[0].arguments.x-dead-letter-exchange",
            "must be a string",
            Box::new(|c| {
                with_topology(c);
                c.topology.queues[0] = queue("adme.queue", &[("x-dead-letter-exchange", Int(1))]);
            }),
        ),
        (
            "topology.queues[0].arguments.x-dead-letter-routing-key",
            "must be a string",
            Box::new(|c| {
                with_topology(c);
                c.topology.queues[0] = queue(
                    "adme.queue",
                    &[("x-dead-letter-routing-key", ArgValue::Bool(true))],
                );
            }),
        ),
        (
            "topology.queues[0].arguments.x-queue-type",
            "classic, quorum, stream",
            Box::new(|c| {
                with_topology(c);
                c.topology.queues[0] = queue("adme.queue", &[("x-queue-type", Str("lazy".into()))]);
            }),
        ),
        (
            "topology.queues[0].arguments.x-overflow",
            "reject-publish",
            Box::new(|c| {
                with_topology(c);
                c.topology.queues[0] = queue("adme.queue", &[("x-overflow", Str("drop".into()))]);
            }),
        ),
        (
            "topology.queues[0].arguments.x-queue-mode",
            "must be a string",
            Box::new(|c| {
                with_topology(c);
                c.topology.queues[0] = queue("adme.queue", &[("x-queue-mode", Int(1))]);
            }),
        ),
        (
            "topology.queues[0].durable",
            "quorum queues must be durable",
            Box::new(|c| {
                with_topology(c);
                c.topology.queues[0] =
                    queue("adme.queue", &[("x-queue-type", Str("quorum".into()))]);
                c.topology.queues[0].durable = false;
            }),
        ),
        (
            "topology.queues[0].exclusive",
            "cannot be exclusive",
            Box::new(|c| {
                with_topology(c);
                c.topology.queues[0] =
                    queue("adme.queue", &[("x-queue-type", Str("quorum".into()))]);
                c.topology.queues[0].exclusive = true;
            }),
        ),
        (
            "topology.queues[0].auto_delete",
            "cannot be auto_delete",
            Box::new(|c| {
                with_topology(c);
                c.topology.queues[0] =
                    queue("adme.queue", &[("x-queue-type", Str("stream".into()))]);
                c.topology.queues[0].auto_delete = true;
            }),
        ),
        (
            "topology.bindings[0].exchange",
            "must not be empty",
            Box::new(|c| {
                with_topology(c);
                c.topology.bindings[0].exchange.clear();
            }),
        ),
        (
            "topology.bindings[0].exchange",
            "is not declared in topology.exchanges",
            Box::new(|c| {
                with_topology(c);
                c.topology.bindings[0].exchange = "nope".into();
            }),
        ),
        (
            "topology.bindings[0]",
            "exactly one of queue and destination_exchange",
            Box::new(|c| {
                with_topology(c);
                c.topology.bindings[0].destination_exchange = "amq.fanout".into();
            }),
        ),
        (
            "topology.bindings[0]",
            "exactly one of queue and destination_exchange",
            Box::new(|c| {
                with_topology(c);
                c.topology.bindings[0].queue.clear();
            }),
        ),
        (
            "topology.bindings[0].queue",
            r#""x" is not declared in topology.queues"#,
            Box::new(|c| {
                with_topology(c);
                c.topology.bindings[0].queue = "x".into();
            }),
        ),
        (
            "topology.bindings[0].destination_exchange",
            "is not declared",
            Box::new(|c| {
                with_topology(c);
                c.topology.bindings[0].queue.clear();
                c.topology.bindings[0].destination_exchange = "nope".into();
            }),
        ),
        (
            "topology.bindings[0].routing_key",
            "longer than 255",
            Box::new(|c| {
                with_topology(c);
                c.topology.bindings[0].routing_key = "k".repeat(256);
            }),
        ),
        (
            "topology.bindings[0].arguments.x-match",
            "all, any",
            Box::new(|c| {
                with_topology(c);
                c.topology.bindings[0]
                    .arguments
                    .insert("x-match".into(), Str("some".into()));
            }),
        ),
    ];
    for (key, reason, mutate) in cases {
        let mut c = Config::default();
        mutate(&mut c);
        let e = c.validate().expect_err(key);
        assert_eq!(e.key(), Some(key), "{e}");
        assert!(e.to_string().contains(reason), "{key}: {e}");
    }
}

#[test]
fn control_plane_accepted_values() {
    let key = TempFile::new(
        "pub-key",
        "-----BEGIN PUBLIC KEY-----\nMFkw\n-----END PUBLIC KEY-----\n",
    );
    let mut c = Config::default();
    with_topology(&mut c);
    c.amqp.url = "amqps://u:p@rabbit.example:5671/prod".into();
    c.amqp.reconnect_initial_ms = 30_000;
    // Built-in, app and user exchanges need no declaration.
    for (i, source) in [
        "amq.topic",
        "amq.direct",
        "amq.fanout",
        "amq.headers",
        "amq.match",
    ]
    .into_iter()
    .enumerate()
    {
        let mut b = binding(source, "adme.queue");
        b.routing_key = format!("k{i}");
        c.topology.bindings.push(b);
    }
    c.topology.bindings.push(binding("stomp.app", "adme.queue"));
    c.topology.bindings.push(BindingDecl {
        exchange: "adme.exchange".into(),
        destination_exchange: "stomp.user".into(),
        ..BindingDecl::default()
    });
    // The app exchange may be declared in the topology when it agrees.
    c.topology.exchanges.push(exchange("stomp.app"));
    c.topology.queues.push(queue(
        "q2",
        &[
            ("x-message-ttl", ArgValue::Int(0)),
            ("x-queue-type", ArgValue::String("quorum".into())),
            ("x-overflow", ArgValue::String("reject-publish".into())),
            ("x-custom", ArgValue::Float(0.5)),
        ],
    ));
    c.auth.mode = AuthMode::Jwt;
    c.auth.jwt_algorithm = JwtAlgorithm::Es384;
    c.auth.jwt_public_key_file = key.0.display().to_string();
    c.api.token = "abc.DEF-123_~".into();
    c.validate().expect("accepted");
    assert!(c.is_implicit_exchange("amq.match"));
    assert!(c.is_implicit_exchange("stomp.user"));
    assert!(!c.is_implicit_exchange("adme.exchange"));
}

#[test]
fn env_var_names() {
    assert_eq!(env_var_for("server.listen"), "GATEWAY__SERVER__LISTEN");
    assert_eq!(
        env_var_for("broker.client_passcode"),
        "GATEWAY__BROKER__CLIENT_PASSCODE"
    );
    assert_eq!(
        env_var_to_key("GATEWAY__BROKER__CLIENT_PASSCODE"),
        "broker.client_passcode"
    );
    assert!(!is_gateway_var("GATEWAY_CONFIG"));
    assert!(!is_gateway_var("GATEWAY__"));
}

#[test]
fn server_identity_and_drain_keys() {
    let c = Config::default();
    assert_eq!(c.server.pod_id, "");
    assert_eq!(c.server.drain_period_ms, 20_000);
    let id = c.pod_id();
    assert!(!id.is_empty() && id.len() <= MAX_POD_ID_BYTES, "{id:?}");

    let mut c = Config::default();
    c.server.pod_id = "  gw-7  ".into();
    assert_eq!(c.pod_id(), "gw-7");
    c.server.drain_period_ms = 0;
    c.validate().expect("drain 0 is valid");
    c.server.drain_period_ms = MAX_DRAIN_PERIOD_MS;
    c.validate().expect("drain 600000 is valid");

    let cases: Vec<(&str, &str, Mutation)> = vec![
        (
            "server.pod_id",
            "longer than 100",
            Box::new(|c| c.server.pod_id = "p".repeat(101)),
        ),
        (
            "server.pod_id",
            "control characters",
            Box::new(|c| c.server.pod_id = "a\tb".into()),
        ),
        (
            "server.drain_period_ms",
            "maximum of 600000",
            Box::new(|c| c.server.drain_period_ms = 600_001),
        ),
    ];
    for (key, reason, mutate) in cases {
        let mut c = Config::default();
        mutate(&mut c);
        let e = c.validate().expect_err(key);
        assert_eq!(e.key(), Some(key), "{e}");
        assert!(e.to_string().contains(reason), "{key}: {e}");
    }

    let c = load_from(
        None,
        env(&[
            ("GATEWAY__SERVER__POD_ID", "gw-env"),
            ("GATEWAY__SERVER__DRAIN_PERIOD_MS", "1500"),
        ]),
    )
    .expect("env loads");
    assert_eq!(c.pod_id(), "gw-env");
    assert_eq!(c.server.drain_period_ms, 1500);
}

#[test]
fn tls_and_failover_keys() {
    let pki = crate::tls::tests::test_pki(&["localhost", "127.0.0.1"]);
    let ca = TempFile::new("tls-ca", &pki.ca_pem);
    let cert = TempFile::new("tls-cert", &pki.cert_pem);
    let key = TempFile::new("tls-key", &pki.key_pem);
    let text = TempFile::new("tls-text", "no pem here\n");
    let ca_path = ca.0.display().to_string();
    let cert_path = cert.0.display().to_string();
    let key_path = key.0.display().to_string();
    let text_path = text.0.display().to_string();

    // Defaults: TLS off, no failover URLs.
    let c = Config::default();
    assert!(!c.broker.tls.enabled);
    assert_eq!(c.broker.tls, TlsConfig::default());
    assert!(c.amqp.failover_urls.is_empty());
    assert_eq!(c.amqp.tls, AmqpTlsConfig::default());
    assert_eq!(
        c.amqp.urls().collect::<Vec<_>>(),
        vec!["amqp://guest:guest@127.0.0.1:5672/%2f"]
    );

    // From a file.
    let file = TempFile::new(
        "tls-file",
        &format!(
            r#"
[broker]
addresses = ["rabbit:61614"]

[broker.tls]
enabled = true
ca_file = {ca:?}
cert_file = {cert:?}
key_file = {key:?}
server_name = "rabbit.internal"

[amqp]
url = "amqps://gw:secret1@rabbit-0:5671/%2f"
failover_urls = ["amqps://gw:secret2@rabbit-1:5671/%2f", "amqp://gw:secret3@rabbit-2:5672/%2f"]

[amqp.tls]
ca_file = {ca:?}
"#,
            ca = ca_path,
            cert = cert_path,
            key = key_path
        ),
    );
    let c = load_from(Some(&file.0), HashMap::new()).expect("tls file loads");
    c.validate().expect("tls file validates");
    assert!(c.broker.tls.enabled);
    assert_eq!(c.broker.tls.server_name, "rabbit.internal");
    assert_eq!(c.amqp.failover_urls.len(), 2);
    assert_eq!(c.amqp.urls().count(), 3);
    assert_eq!(c.amqp.tls.ca_file, ca_path);
    // Masked output hides every password and loads back.
    let text_out = c.masked().to_toml();
    for secret in ["secret1", "secret2", "secret3"] {
        assert!(!text_out.contains(secret), "{secret} in {text_out}");
    }
    assert!(
        text_out.contains("amqps://gw:******@rabbit-1:5671/%2f"),
        "{text_out}"
    );
    assert!(text_out.contains("[broker.tls]"), "{text_out}");
    let back = TempFile::new("tls-round-trip", &c.to_toml());
    let back = load_from(Some(&back.0), HashMap::new()).expect("printed config loads");
    assert_eq!(back.broker.tls, c.broker.tls);
    assert_eq!(back.amqp.failover_urls, c.amqp.failover_urls);
    assert_eq!(back.amqp.tls, c.amqp.tls);

    // From the environment.
    let c = load_from(
        None,
        env(&[
            ("GATEWAY__BROKER__TLS__ENABLED", "true"),
            ("GATEWAY__BROKER__TLS__CA_FILE", ca_path.as_str()),
            ("GATEWAY__BROKER__TLS__SERVER_NAME", "localhost"),
            (
                "GATEWAY__AMQP__FAILOVER_URLS",
                "amqp://u:p@a:5672/%2f, amqps://u:p@b:5671/%2f",
            ),
            ("GATEWAY__AMQP__TLS__CA_FILE", ca_path.as_str()),
            ("GATEWAY__AMQP__TLS__CERT_FILE", cert_path.as_str()),
            ("GATEWAY__AMQP__TLS__KEY_FILE", key_path.as_str()),
        ]),
    )
    .expect("env loads");
    assert!(c.broker.tls.enabled);
    assert_eq!(c.broker.tls.ca_file, ca_path);
    assert_eq!(c.broker.tls.server_name, "localhost");
    assert_eq!(
        c.amqp.failover_urls,
        vec!["amqp://u:p@a:5672/%2f", "amqps://u:p@b:5671/%2f"]
    );
    assert_eq!(c.amqp.tls.key_file, key_path);
    c.validate().expect("env tls validates");

    // Typos in the nested tables are unknown keys.
    let f = TempFile::new("tls-typo", "[broker.tls]\ncafile = \"x\"\n");
    let e = load_err(Some(&f.0), &[]);
    assert_eq!(e.key(), Some("broker.tls.cafile"), "{e}");
    let e = load_err(None, &[("GATEWAY__AMQP__TLS__CA", "x")]);
    assert_eq!(e.key(), Some("amqp.tls.ca"), "{e}");
    let e = load_err(None, &[("GATEWAY__BROKER__TLS__ENABLED", "maybe")]);
    assert_eq!(e.key(), Some("broker.tls.enabled"), "{e}");

    // Disabled TLS does not look at the files.
    let mut c = Config::default();
    c.broker.tls.ca_file = "/nonexistent/ca.pem".into();
    c.validate().expect("disabled TLS ignores its files");

    let (ca2, cert2, key2, text2) = (
        ca_path.clone(),
        cert_path.clone(),
        key_path.clone(),
        text_path.clone(),
    );
    let cases: Vec<(&str, &str, Mutation)> = vec![
        (
            "broker.tls.ca_file",
            "must be set when broker.tls.enabled = true",
            Box::new(|c| c.broker.tls.enabled = true),
        ),
        (
            "broker.tls.ca_file",
            "cannot read",
            Box::new(|c| {
                c.broker.tls.enabled = true;
                c.broker.tls.ca_file = "/nonexistent/ca.pem".into();
            }),
        ),
        (
            "broker.tls.ca_file",
            "not a PEM file",
            Box::new(move |c| {
                c.broker.tls.enabled = true;
                c.broker.tls.ca_file = text2;
            }),
        ),
        (
            "broker.tls.key_file",
            "must be set when broker.tls.cert_file is set",
            Box::new(move |c| {
                c.broker.tls.enabled = true;
                c.broker.tls.ca_file = ca2;
                c.broker.tls.cert_file = cert2;
            }),
        ),
        (
            "broker.tls.cert_file",
            "contains no certificate",
            Box::new(move |c| {
                c.broker.tls.enabled = true;
                c.broker.tls.ca_file = ca_path.clone();
                c.broker.tls.cert_file = key2.clone();
                c.broker.tls.key_file = key2;
            }),
        ),
        (
            "broker.tls.server_name",
            "not a DNS name or IP address",
            Box::new({
                let ca = ca.0.display().to_string();
                move |c| {
                    c.broker.tls.enabled = true;
                    c.broker.tls.ca_file = ca;
                    c.broker.tls.server_name = "bad name".into();
                }
            }),
        ),
        (
            "amqp.failover_urls[1]",
            "must start with amqp:// or amqps://",
            Box::new(|c| {
                c.amqp.failover_urls = vec![
                    "amqp://u:p@a:5672/%2f".into(),
                    "http://u:secret@b:5672/".into(),
                ]
            }),
        ),
        (
            "amqp.failover_urls[0]",
            "not a valid AMQP URL",
            Box::new(|c| c.amqp.failover_urls = vec!["amqp://h:notaport/".into()]),
        ),
        (
            "amqp.tls.ca_file",
            "not a PEM file",
            Box::new({
                let text = text_path.clone();
                move |c| c.amqp.tls.ca_file = text
            }),
        ),
        (
            "amqp.tls.key_file",
            "must be set when amqp.tls.cert_file is set",
            Box::new({
                let cert = cert_path.clone();
                move |c| c.amqp.tls.cert_file = cert
            }),
        ),
        (
            "amqp.tls.key_file",
            "contains no private key",
            Box::new({
                let cert = cert_path.clone();
                move |c| {
                    c.amqp.tls.cert_file = cert.clone();
                    c.amqp.tls.key_file = cert;
                }
            }),
        ),
    ];
    for (key, reason, mutate) in cases {
        let mut c = Config::default();
        mutate(&mut c);
        // The TLS files are read when the settings are built, as at start.
        let e = crate::settings::Settings::new(c).expect_err(key);
        assert_eq!(e.key(), Some(key), "{e}");
        assert!(e.to_string().contains(reason), "{key}: {e}");
        assert!(!e.to_string().contains("secret"), "{key}: {e}");
    }
}
