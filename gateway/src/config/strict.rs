//! Strict value types: a value of the wrong type is refused, naming the key
//! and the type `docs/configuration.md` gives, before the configuration
//! library could coerce it (`"yes"` to `true`, `"70000"` to 70000, `5` to
//! `"5"`, `1.5` to 2).
//!
//! The expected types come from the defaults ([`super::load`]'s schema): a
//! boolean default wants a boolean, a number an integer of 0 or more, a
//! string a string, a list a list of the same kind of element. Keys whose
//! value is one of a fixed set of words ([`ENUM_KEYS`]) must be one of them.
//! In the environment, where every value is text, booleans are `true` or
//! `false` and integers are digits only.

use super::ConfigError;
use serde_json::Value as Schema;

/// Keys whose values are one of a fixed set of words (list indices written
/// as `[]`).
pub(super) const ENUM_KEYS: [(&str, &[&str]); 12] = [
    ("server.message_type", &["auto", "text", "binary"]),
    ("broker.mode", &["embedded", "relay"]),
    ("fanout.topic", &["shared", "per-session"]),
    ("fanout.exchange", &["shared", "per-session"]),
    ("fanout.user", &["shared", "per-session"]),
    ("fanout.on_upstream_loss", &["keep", "close"]),
    ("log.format", &["text", "json"]),
    (
        "app.exchange_type",
        &["topic", "direct", "fanout", "headers"],
    ),
    (
        "topology.exchanges[].type",
        &["topic", "direct", "fanout", "headers"],
    ),
    ("auth.mode", &["none", "jwt"]),
    ("auth.default", &["allow", "deny"]),
    (
        "auth.jwt_algorithm",
        &[
            "HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "ES256", "ES384",
        ],
    ),
];

/// The words `key` accepts, when it is one of [`ENUM_KEYS`].
pub(super) fn enum_words(key: &str) -> Option<&'static [&'static str]> {
    let key = without_indices(key);
    ENUM_KEYS
        .iter()
        .find(|(k, _)| *k == key)
        .map(|(_, words)| *words)
}

/// `topology.exchanges[3].type` -> `topology.exchanges[].type`.
pub(super) fn without_indices(key: &str) -> String {
    let mut out = String::with_capacity(key.len());
    let mut in_index = false;
    for c in key.chars() {
        match c {
            '[' => {
                in_index = true;
                out.push('[');
            }
            ']' => {
                in_index = false;
                out.push(']');
            }
            _ if in_index => {}
            c => out.push(c),
        }
    }
    out
}

/// Checks every value of the TOML file against the schema. Keys the schema
/// does not have are left to the unknown-key check.
pub(super) fn check_file(table: &toml::Table, schema: &Schema) -> Result<(), ConfigError> {
    check_table(table, schema, "")
}

/// Checks one `GATEWAY__...` variable (`name`, setting `key`) whose value is
/// a boolean, an integer or one of a set of words. Strings and lists are
/// taken as written; unknown keys are left to the unknown-key check.
pub(super) fn check_env(
    name: &str,
    key: &str,
    value: &str,
    schema: &Schema,
) -> Result<(), ConfigError> {
    let Some(leaf) = key.split('.').try_fold(schema, |v, k| v.get(k)) else {
        return Ok(());
    };
    let from = format!("(from environment variable {name})");
    if let Some(words) = enum_words(key) {
        if words.contains(&value) {
            return Ok(());
        }
        return Err(ConfigError::invalid(
            key,
            format!(
                "expected one of: {}, got {value:?} {from}",
                words.join(", ")
            ),
        ));
    }
    let ok = match leaf {
        Schema::Bool(_) => value == "true" || value == "false",
        Schema::Number(_) => {
            !value.is_empty()
                && value.bytes().all(|b| b.is_ascii_digit())
                && value.parse::<u64>().is_ok()
        }
        _ => true,
    };
    if ok {
        Ok(())
    } else {
        Err(ConfigError::invalid(
            key,
            format!("expected {}, got {value:?} {from}", expected(leaf, key)),
        ))
    }
}

fn join(path: &str, key: &str) -> String {
    if path.is_empty() {
        key.to_owned()
    } else {
        format!("{path}.{key}")
    }
}

fn check_table(table: &toml::Table, schema: &Schema, path: &str) -> Result<(), ConfigError> {
    let Some(fields) = schema.as_object() else {
        return Ok(());
    };
    if fields.is_empty() {
        // A free-form table (AMQP `arguments`): scalar values only.
        for (k, v) in table {
            if matches!(
                v,
                toml::Value::Array(_) | toml::Value::Table(_) | toml::Value::Datetime(_)
            ) {
                return Err(ConfigError::invalid(
                    join(path, k),
                    format!(
                        "expected a boolean, an integer, a number or a string, got {}",
                        describe(v)
                    ),
                ));
            }
        }
        return Ok(());
    }
    for (k, v) in table {
        if let Some(s) = fields.get(k) {
            check_value(v, s, &join(path, k))?;
        }
    }
    Ok(())
}

fn check_value(v: &toml::Value, s: &Schema, key: &str) -> Result<(), ConfigError> {
    if let Some(words) = enum_words(key) {
        return match v {
            toml::Value::String(x) if words.contains(&x.as_str()) => Ok(()),
            other => Err(ConfigError::invalid(
                key,
                format!(
                    "expected one of: {}, got {}",
                    words.join(", "),
                    describe(other)
                ),
            )),
        };
    }
    match (s, v) {
        (Schema::Null, _)
        | (Schema::Bool(_), toml::Value::Boolean(_))
        | (Schema::String(_), toml::Value::String(_)) => Ok(()),
        (Schema::Number(_), toml::Value::Integer(i)) if *i >= 0 => Ok(()),
        (Schema::Object(_), toml::Value::Table(t)) => check_table(t, s, key),
        (Schema::Array(items), toml::Value::Array(values)) => {
            for (i, x) in values.iter().enumerate() {
                let k = format!("{key}[{i}]");
                match items.first() {
                    Some(item) => check_value(x, item, &k)?,
                    // An empty default: scalar elements are strings (every
                    // list of scalars is), tables are left to the library.
                    None if !matches!(x, toml::Value::Table(_) | toml::Value::String(_)) => {
                        return Err(ConfigError::invalid(
                            k,
                            format!("expected a string, got {}", describe(x)),
                        ))
                    }
                    None => {}
                }
            }
            Ok(())
        }
        (s, v) => {
            let mut reason = format!("expected {}, got {}", expected(s, key), describe(v));
            if let (Schema::String(_), toml::Value::Integer(_) | toml::Value::Float(_)) = (s, v) {
                reason.push_str(&format!(" (write it in quotes: \"{v}\")"));
            }
            Err(ConfigError::invalid(key, reason))
        }
    }
}

/// The expected type in the words of `docs/configuration.md`.
fn expected(s: &Schema, key: &str) -> String {
    match s {
        Schema::Bool(_) => "a boolean (true or false)".into(),
        Schema::Number(_) => "an integer (0 or more)".into(),
        Schema::String(_) => "a string".into(),
        Schema::Array(items) => match items.first() {
            Some(Schema::Object(o)) if key.ends_with("endpoints") && o.contains_key("path") => {
                "a list of tables like { path = \"/ws\" }".into()
            }
            Some(Schema::Object(_)) => "a list of tables".into(),
            _ => "a list of strings".into(),
        },
        Schema::Object(o)
            if without_indices(key) == "server.endpoints[]" && o.contains_key("path") =>
        {
            "a table like { path = \"/ws\" }".into()
        }
        Schema::Object(_) => "a table".into(),
        Schema::Null => "a value".into(),
    }
}

/// What a TOML value is, for an error message.
fn describe(v: &toml::Value) -> String {
    match v {
        toml::Value::String(s) => format!("the string {s:?}"),
        toml::Value::Integer(i) => format!("the integer {i}"),
        toml::Value::Float(f) => format!("the number {f}"),
        toml::Value::Boolean(b) => format!("the boolean {b}"),
        toml::Value::Datetime(d) => format!("the date-time {d}"),
        toml::Value::Array(_) => "a list".into(),
        toml::Value::Table(_) => "a table".into(),
    }
}
