//! `stomp-gateway --check-config`: bad values are refused with exit code 64
//! and the key named; secrets are masked; environment overrides apply.
#![allow(clippy::unwrap_used)]

use e2e::check_config;
use std::process::Output;

fn text(out: &Output) -> String {
    format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

#[test]
fn bad_value_exits_64_and_names_the_key() {
    let out = check_config(
        "bad_value",
        "[session]\nheartbeat_send_ms = \"soon\"\n",
        &[],
    )
    .unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(text(&out).contains("heartbeat_send_ms"), "{}", text(&out));
}

#[test]
fn unknown_key_exits_64_and_names_it() {
    let out = check_config("unknown_key", "[broker]\nclient_pasword = \"x\"\n", &[]).unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(text(&out).contains("client_pasword"), "{}", text(&out));
}

#[test]
fn bad_environment_override_exits_64_and_names_the_key() {
    let out = check_config("bad_env", "", &[("GATEWAY__SERVER__MESSAGE_TYPE", "morse")]).unwrap();
    assert_eq!(out.status.code(), Some(64), "{}", text(&out));
    assert!(text(&out).contains("message_type"), "{}", text(&out));
}

#[test]
fn check_config_masks_passcodes_and_applies_overrides() {
    let out = check_config(
        "masks_passcodes",
        "[broker]\nclient_login = \"e2e-client-user\"\nclient_passcode = \"s3cret-client-pw\"\nsystem_passcode = \"s3cret-system-pw\"\n",
        &[
            ("GATEWAY__BROKER__VIRTUAL_HOST", "e2e-vhost-from-env"),
            ("GATEWAY__BROKER__SYSTEM_LOGIN", "e2e-system-user"),
        ],
    )
    .unwrap();
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(
        !all.contains("s3cret-client-pw"),
        "client passcode leaked: {all}"
    );
    assert!(
        !all.contains("s3cret-system-pw"),
        "system passcode leaked: {all}"
    );
    assert!(
        all.contains("******"),
        "masked values shown as ******: {all}"
    );
    assert!(
        all.contains("e2e-client-user"),
        "logins are not secret: {all}"
    );
    assert!(
        all.contains("e2e-vhost-from-env"),
        "env override applied: {all}"
    );
    assert!(
        all.contains("e2e-system-user"),
        "env override applied: {all}"
    );
}

#[test]
fn passcode_from_environment_is_masked_too() {
    let out = check_config(
        "env_passcode_masked",
        "",
        &[("GATEWAY__BROKER__CLIENT_PASSCODE", "env-secret-pw")],
    )
    .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out));
    assert!(!text(&out).contains("env-secret-pw"), "{}", text(&out));
}

/// Words that would mean a Rust type or library internals reached the user.
const RUST_INTERNALS: [&str; 9] = [
    "enum ",
    "struct ",
    "variant",
    "64-bit",
    "u64",
    "usize",
    "i64",
    "sequence",
    "AMQPError",
];

/// Every coercion the configuration library used to do silently is refused
/// with exit 64, naming the key and the expected type in the docs' words.
#[test]
fn wrong_types_are_refused_in_plain_words_not_coerced() {
    let files: [(&str, &str, &str); 9] = [
        (
            "[[topology.exchanges]]\nname = \"x\"\ntype = \"topic\"\ndurable = \"yes\"\n",
            "topology.exchanges[0].durable",
            "expected a boolean (true or false)",
        ),
        (
            "[session]\nmax_frame_size = \"70000\"\n",
            "session.max_frame_size",
            "expected an integer",
        ),
        (
            "[broker]\nvirtual_host = 5\n",
            "broker.virtual_host",
            "expected a string",
        ),
        (
            "[session]\nmax_frame_size = 1.5\n",
            "session.max_frame_size",
            "expected an integer",
        ),
        (
            "[session]\nmax_frame_size = -5\n",
            "session.max_frame_size",
            "expected an integer (0 or more), got the integer -5",
        ),
        (
            "[auth]\nmode = \"JWT\"\n",
            "auth.mode",
            "expected one of: none, jwt",
        ),
        (
            "[server]\nendpoints = [\"/ws\"]\n",
            "server.endpoints[0]",
            "expected a table like { path = \"/ws\" }",
        ),
        (
            "[server]\nendpoints = \"/ws\"\n",
            "server.endpoints",
            "expected a list of tables",
        ),
        (
            "[broker]\naddresses = [61613]\n",
            "broker.addresses[0]",
            "expected a string",
        ),
    ];
    let envs: [(&str, &str, &str, &str); 8] = [
        (
            "GATEWAY__USER__CLIENT_SEND_ENABLED",
            "yes",
            "user.client_send_enabled",
            "expected a boolean (true or false)",
        ),
        (
            "GATEWAY__USER__CLIENT_SEND_ENABLED",
            "on",
            "user.client_send_enabled",
            "expected a boolean",
        ),
        (
            "GATEWAY__USER__CLIENT_SEND_ENABLED",
            "1",
            "user.client_send_enabled",
            "expected a boolean",
        ),
        (
            "GATEWAY__USER__CLIENT_SEND_ENABLED",
            "TRUE",
            "user.client_send_enabled",
            "expected a boolean",
        ),
        (
            "GATEWAY__SESSION__MAX_FRAME_SIZE",
            "1.5",
            "session.max_frame_size",
            "expected an integer",
        ),
        (
            "GATEWAY__SESSION__MAX_FRAME_SIZE",
            "-5",
            "session.max_frame_size",
            "expected an integer",
        ),
        (
            "GATEWAY__SESSION__MAX_FRAME_SIZE",
            "64k",
            "session.max_frame_size",
            "expected an integer",
        ),
        (
            "GATEWAY__AUTH__MODE",
            "JWT",
            "auth.mode",
            "expected one of: none, jwt",
        ),
    ];
    let mut cases: Vec<(String, Output, &str, &str)> = Vec::new();
    for (i, (toml, key, expected)) in files.iter().enumerate() {
        let out = check_config(&format!("strict_file_{i}"), toml, &[]).unwrap();
        cases.push((format!("file {toml:?}"), out, key, expected));
    }
    for (i, (var, value, key, expected)) in envs.iter().enumerate() {
        let out = check_config(&format!("strict_env_{i}"), "", &[(var, value)]).unwrap();
        cases.push((format!("{var}={value}"), out, key, expected));
    }
    for (what, out, key, expected) in cases {
        let all = text(&out);
        assert_eq!(out.status.code(), Some(64), "{what}: {all}");
        assert!(
            all.contains(&format!("invalid config: {key}: {expected}")),
            "{what}: the message names {key} and says {expected:?}: {all}"
        );
        for word in RUST_INTERNALS {
            assert!(!all.contains(word), "{what}: {word:?} leaked: {all}");
        }
    }
}

/// What the strict check must not refuse: booleans and integers written as
/// such in the environment, and the words of an enum.
#[test]
fn well_typed_environment_values_are_accepted() {
    let out = check_config(
        "strict_env_ok",
        "",
        &[
            ("GATEWAY__USER__CLIENT_SEND_ENABLED", "true"),
            ("GATEWAY__BROKER__TLS__ENABLED", "false"),
            ("GATEWAY__SESSION__MAX_FRAME_SIZE", "70000"),
            ("GATEWAY__AUTH__MODE", "none"),
            ("GATEWAY__BROKER__VIRTUAL_HOST", "5"),
        ],
    )
    .unwrap();
    let all = text(&out);
    assert_eq!(out.status.code(), Some(0), "{all}");
    assert!(all.contains("client_send_enabled = true"), "{all}");
    assert!(all.contains("max_frame_size = 70000"), "{all}");
    assert!(all.contains("virtual_host = \"5\""), "{all}");
}
