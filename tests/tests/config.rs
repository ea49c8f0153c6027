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
