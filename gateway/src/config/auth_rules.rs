//! `[auth] default` and `[[auth.rules]]`: the authorization rules' shape in
//! the file, and their compilation into the session core's
//! [`relay_core::router::Router`] (see `docs/security.md`).
//!
//! [`Config::router`] is the one place a configuration becomes a router:
//! prefixes, the gateway's own exchanges and the queues bound to them,
//! `user.client_send_enabled`, and the compiled policy. Validation compiles
//! it too, so `--check-config` names a broken rule (`auth.rules[2].allow_if`).

use super::{Config, ConfigError};
use relay_core::policy::{Effect, Policy, Rule};
use relay_core::router::Router;
use serde::{Deserialize, Serialize};

/// `auth.default`: what happens when no rule matches.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum AuthDefault {
    /// As Spring's relay: everything not denied by a rule is allowed.
    #[default]
    Allow,
    Deny,
}

/// One `[[auth.rules]]` entry, as written in the file.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct AuthRule {
    /// `SEND`, `SUBSCRIBE`; empty means both.
    pub commands: Vec<String>,
    /// Destination pattern (`*`, `**`, `{capture}`).
    pub destination: String,
    pub allow: bool,
    pub deny: bool,
    /// A condition: `"authenticated"` or a one-key table.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub allow_if: Option<serde_json::Value>,
}

impl AuthRule {
    /// The element the configuration schema checks unknown keys and value
    /// types against. `allow_if` is `null` there: any value passes the
    /// schema, and the condition is checked when the rule is compiled, with
    /// a message that names the condition.
    pub(super) fn schema_sample() -> AuthRule {
        AuthRule {
            allow_if: Some(serde_json::Value::Null),
            ..AuthRule::default()
        }
    }
}

impl Config {
    /// Routing without the configured rules: prefixes, the gateway's
    /// exchanges and the queues bound to them, `user.client_send_enabled`.
    /// Enough for the trusted publish API ([`Router::resolve`]).
    pub fn routes(&self) -> Router {
        let own = [&self.app.exchange, &self.user.exchange];
        let internal_queues = self
            .topology
            .bindings
            .iter()
            .filter(|b| own.contains(&&b.exchange))
            .map(|b| b.queue.clone())
            .collect();
        Router::new(
            self.broker.relay_prefixes.clone(),
            self.app.prefixes.clone(),
            Some(self.user.prefix.clone()),
        )
        .with_exchanges(self.app.exchange.clone(), self.user.exchange.clone())
        .with_internal_queues(internal_queues)
        .with_control_plane(self.control_plane_enabled())
        .with_user_send(self.user.client_send_enabled)
    }

    /// `[auth] default` and `[[auth.rules]]` compiled; an error names the rule.
    pub fn policy(&self) -> Result<Policy, ConfigError> {
        let rules = self
            .auth
            .rules
            .iter()
            .enumerate()
            .map(|(i, r)| {
                Rule::new(
                    &r.commands,
                    &r.destination,
                    r.allow,
                    r.deny,
                    r.allow_if.as_ref(),
                )
                .map_err(|e| ConfigError::invalid(format!("auth.rules[{i}].{}", e.field), e.reason))
            })
            .collect::<Result<Vec<_>, _>>()?;
        let default = match self.auth.default {
            AuthDefault::Allow => Effect::Allow,
            AuthDefault::Deny => Effect::Deny,
        };
        Ok(Policy::new(default, rules))
    }

    /// The session core's router: [`Config::routes`] with [`Config::policy`].
    pub fn router(&self) -> Result<Router, ConfigError> {
        Ok(self.routes().with_policy(self.policy()?))
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::super::load_from;
    use super::*;
    use relay_core::policy::Principal;
    use relay_core::router::{DenyReason, Refusal, Route};
    use relay_core::{Command, Frame};
    use std::collections::HashMap;

    /// Loads `toml` (written to a temporary file) with `env`.
    fn load(toml: &str, env: &[(&str, &str)]) -> Result<Config, ConfigError> {
        let path = std::env::temp_dir().join(format!(
            "stomp-gateway-auth-rules-{}-{:016x}.toml",
            std::process::id(),
            rand::random::<u64>()
        ));
        std::fs::write(&path, toml).unwrap();
        let env: HashMap<String, String> = env
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        let r = load_from(Some(&path), env);
        let _ = std::fs::remove_file(&path);
        r
    }

    const SEED: &str = r##"
[auth]
default = "deny"

[[auth.rules]]
commands = ["SUBSCRIBE"]
destination = "/exchange/adme.exchange/room.{id}"
allow_if = { claim_contains = { claim = "rooms", value = "{id}" } }

[[auth.rules]]
commands = ["SEND"]
destination = "/app/**"
allow_if = "authenticated"

[[auth.rules]]
destination = "/amq/queue/**"
deny = true

[topology]
queues = [ { name = "backend.q" } ]
bindings = [ { exchange = "stomp.app", queue = "backend.q", routing_key = "#" } ]
"##;

    #[test]
    fn rules_load_compile_and_decide() {
        let c = load(SEED, &[]).unwrap();
        c.validate().unwrap();
        assert_eq!(c.auth.default, AuthDefault::Deny);
        assert_eq!(c.auth.rules.len(), 3);
        let router = c.router().unwrap();
        let mut alice = Principal::user("alice");
        alice
            .claims
            .insert("rooms".into(), serde_json::json!(["42"]));
        let sub = |d: &str| {
            Frame::new(Command::Subscribe)
                .with_header("id", "1")
                .with_header("destination", d)
        };
        assert_eq!(
            router.route(&alice, "alice", &sub("/exchange/adme.exchange/room.42")),
            Ok(Route::Relay)
        );
        let denied = |r: Result<Route, Refusal>| match r {
            Err(Refusal::Denied(d)) => d.reason,
            other => panic!("{other:?}"),
        };
        assert_eq!(
            denied(router.route(&alice, "alice", &sub("/exchange/adme.exchange/room.7"))),
            DenyReason::Rule(0)
        );
        assert_eq!(
            denied(router.route(&alice, "alice", &sub("/topic/x"))),
            DenyReason::Default
        );
        // [topology] queues bound to the app exchange are the gateway's own.
        assert_eq!(
            denied(router.route(&alice, "alice", &sub("/queue/backend.q"))),
            DenyReason::InternalQueue("backend.q".into())
        );
        // Round trip through --check-config's TOML.
        let again: Config = toml::from_str(&c.to_toml()).unwrap();
        assert_eq!(again.auth.rules, c.auth.rules);
    }

    #[test]
    fn broken_rules_are_named() {
        let err = |rule: &str| {
            let toml = format!(
                "[[auth.rules]]\ndestination = \"/app/**\"\nallow = true\n\n[[auth.rules]]\n{rule}\n"
            );
            let c = load(&toml, &[]).unwrap();
            c.validate().unwrap_err()
        };
        let cases = [
            (
                "destination = \"app/x\"\ndeny = true",
                "auth.rules[1].destination",
                "must start with '/'",
            ),
            (
                "destination = \"/a/{id\"\ndeny = true",
                "auth.rules[1].destination",
                "unmatched",
            ),
            (
                "destination = \"/a/{id}\"\nallow_if = { user_equals = \"{who}\" }",
                "auth.rules[1].allow_if",
                "{who} is not a capture",
            ),
            (
                "destination = \"/a\"\nallow_if = \"admin\"",
                "auth.rules[1].allow_if",
                "unknown condition",
            ),
            (
                "destination = \"/a\"\nallow_if = { is_admin = true }",
                "auth.rules[1].allow_if",
                "unknown condition \"is_admin\"",
            ),
            (
                "commands = [\"ACK\"]\ndestination = \"/a\"\ndeny = true",
                "auth.rules[1].commands",
                "unknown command",
            ),
            (
                "destination = \"/a\"",
                "auth.rules[1].allow_if",
                "needs one of",
            ),
        ];
        for (rule, key, reason) in cases {
            let e = err(rule);
            assert_eq!(e.key(), Some(key), "{rule}: {e}");
            assert!(e.to_string().contains(reason), "{rule}: {e}");
        }
        // Unknown keys and enum values are caught while loading.
        let e = load(
            "[[auth.rules]]\ndestination = \"/a\"\ndeny = true\ncolour = 1\n",
            &[],
        )
        .unwrap_err();
        assert_eq!(e.key(), Some("auth.rules[0].colour"), "{e}");
        let e = load("[auth]\ndefault = \"maybe\"\n", &[]).unwrap_err();
        assert_eq!(e.key(), Some("auth.default"), "{e}");
        assert!(e.to_string().contains("allow, deny"), "{e}");
        // Rules are file-only.
        let e = load("", &[("GATEWAY__AUTH__RULES", "x")]).unwrap_err();
        assert_eq!(e.key(), Some("auth.rules"), "{e}");
        // The default can come from the environment.
        let c = load("", &[("GATEWAY__AUTH__DEFAULT", "deny")]).unwrap();
        assert_eq!(c.auth.default, AuthDefault::Deny);
    }
}
