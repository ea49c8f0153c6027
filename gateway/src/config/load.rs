//! Loading: built-in defaults, then the TOML file, then `GATEWAY__SECTION__KEY`
//! environment variables; unknown keys and wrong types are reported naming the key.

use super::strict;
use super::*;
use std::collections::HashMap;
use std::path::Path;

/// `server.endpoints` is a list of tables; from the environment it is given
/// as comma-separated paths (`GATEWAY__SERVER__ENDPOINTS=/ws,/stomp`).
const ENV_ENDPOINTS_KEY: &str = "server.endpoints";

/// [`Config::validate`] for the value rules.
/// Loads the configuration: built-in defaults, then the TOML file at `path`
/// (when given; a missing or unreadable file is an error), then
/// `GATEWAY__SECTION__KEY` environment variables.
///
/// Unknown keys and values of the wrong type are rejected here; call
/// [`Config::validate`] for the value rules.
pub fn load(path: Option<&Path>) -> Result<Config, ConfigError> {
    let mut env = HashMap::new();
    for (name, value) in std::env::vars_os() {
        let Ok(name) = name.into_string() else {
            continue; // not ours: ours are ASCII
        };
        if !is_gateway_var(&name) {
            continue;
        }
        match value.into_string() {
            Ok(value) => {
                env.insert(name, value);
            }
            Err(_) => {
                return Err(ConfigError::invalid(
                    env_var_to_key(&name),
                    format!("environment variable {name} is not valid UTF-8"),
                ))
            }
        }
    }
    load_from(path, env)
}

/// [`load`] with the environment given as a map (all variables; those
/// without the `GATEWAY__` prefix are ignored). Used by tests.
pub(crate) fn load_from(
    path: Option<&Path>,
    env: HashMap<String, String>,
) -> Result<Config, ConfigError> {
    let defaults = config::Config::try_from(&Config::default()).map_err(from_library)?;
    let mut builder = config::Config::builder().add_source(defaults);
    let known = schema()?;
    let mut amqp_url_set = env.contains_key(&env_var_for("amqp.url"));

    if let Some(path) = path {
        let text = std::fs::read_to_string(path).map_err(|e| ConfigError::File {
            path: path.to_owned(),
            reason: e.to_string(),
        })?;
        // Parse once here so a syntax error names the file, and check the
        // types strictly before the library could coerce them.
        match text.parse::<toml::Table>() {
            Ok(table) => {
                strict::check_file(&table, &known)?;
                amqp_url_set |= table
                    .get("amqp")
                    .and_then(|a| a.as_table())
                    .is_some_and(|a| a.contains_key("url"));
            }
            Err(e) => {
                return Err(ConfigError::File {
                    path: path.to_owned(),
                    reason: e.to_string().trim_end().to_owned(),
                })
            }
        }
        builder = builder.add_source(config::File::from_str(&text, config::FileFormat::Toml));
    }

    // The environment. Values of string keys are taken verbatim (so a
    // passcode like `0123` stays a string), lists are comma-separated and
    // set exactly, everything else (numbers, booleans, enums) is checked
    // strictly, then parsed.
    let mut strings: config::Map<String, String> = config::Map::new();
    let mut typed: config::Map<String, String> = config::Map::new();
    let mut names: Vec<&String> = env.keys().filter(|n| is_gateway_var(n)).collect();
    names.sort();
    for name in names {
        let value = env.get(name).map(String::as_str).unwrap_or_default();
        let key = env_var_to_key(name);
        if key == "topology" || key.starts_with("topology.") {
            return Err(ConfigError::invalid(
                key,
                format!(
                    "the topology can only be set in the config file (not by environment variable {name})"
                ),
            ));
        }
        if key == "auth.rules" || key.starts_with("auth.rules.") {
            return Err(ConfigError::invalid(
                key,
                format!(
                    "auth.rules can only be set in the config file (not by environment variable {name})"
                ),
            ));
        }
        strict::check_env(name, &key, value, &known)?;
        match lookup(&known, &key) {
            Some(serde_json::Value::String(_)) => {
                strings.insert(name.clone(), value.to_owned());
            }
            Some(serde_json::Value::Array(_)) if key == ENV_ENDPOINTS_KEY => {
                let list: Vec<config::Map<String, String>> = split_list(value)
                    .map(|p| config::Map::from([("path".to_owned(), p.to_owned())]))
                    .collect();
                builder = builder.set_override(&key, list).map_err(from_library)?;
            }
            Some(serde_json::Value::Array(_)) => {
                let list: Vec<String> = split_list(value).map(str::to_owned).collect();
                builder = builder.set_override(&key, list).map_err(from_library)?;
            }
            _ => {
                typed.insert(name.clone(), value.to_owned());
            }
        }
    }
    let environment = || {
        config::Environment::with_prefix(ENV_PREFIX)
            .prefix_separator(ENV_SEPARATOR)
            .separator(ENV_SEPARATOR)
    };
    builder = builder
        .add_source(environment().source(Some(strings)))
        .add_source(environment().try_parsing(true).source(Some(typed)));

    let merged = builder.build().map_err(from_library)?;

    // Unknown keys first, so a typo is reported as such and not as a
    // confusing serde message.
    let tree: serde_json::Value = merged.clone().try_deserialize().map_err(from_library)?;
    if let Some(key) = find_unknown_key(&tree, &known, "") {
        let origin = env
            .keys()
            .filter(|name| is_gateway_var(name))
            .find(|name| {
                let k = env_var_to_key(name);
                k == key || key.starts_with(&format!("{k}.")) || k.starts_with(&format!("{key}."))
            })
            .map(|name| format!(" (set by environment variable {name})"))
            .unwrap_or_default();
        return Err(ConfigError::UnknownKey { key, origin });
    }

    let mut config: Config = merged
        .try_deserialize()
        .map_err(from_library)
        .map_err(with_enum_hint)?;
    config.amqp.url_set = amqp_url_set;
    Ok(config)
}

/// The defaults as a JSON tree, with one default element in each list of
/// tables that is empty by default (`topology.*`), so unknown keys inside
/// those tables are found too. An empty default table (`arguments`)
/// accepts any key.
fn schema() -> Result<serde_json::Value, ConfigError> {
    let sample = Config {
        topology: TopologyConfig {
            exchanges: vec![ExchangeDecl::default()],
            queues: vec![QueueDecl::default()],
            bindings: vec![BindingDecl::default()],
        },
        auth: AuthConfig {
            rules: vec![AuthRule::schema_sample()],
            ..AuthConfig::default()
        },
        ..Config::default()
    };
    serde_json::to_value(sample)
        .map_err(|e| ConfigError::Other(format!("cannot describe the defaults: {e}")))
}

/// Adds the allowed words to an error about an enum-valued key.
fn with_enum_hint(e: ConfigError) -> ConfigError {
    match e {
        ConfigError::Invalid { key, reason } => match strict::enum_words(&key) {
            Some(allowed) => ConfigError::Invalid {
                reason: format!("{reason} (expected one of: {})", allowed.join(", ")),
                key,
            },
            None => ConfigError::Invalid { key, reason },
        },
        other => other,
    }
}

pub(super) fn is_gateway_var(name: &str) -> bool {
    let prefix = format!("{ENV_PREFIX}{ENV_SEPARATOR}");
    name.len() > prefix.len()
        && name.is_char_boundary(prefix.len())
        && name[..prefix.len()].eq_ignore_ascii_case(&prefix)
}

/// `GATEWAY__BROKER__CLIENT_PASSCODE` -> `broker.client_passcode`.
pub(super) fn env_var_to_key(name: &str) -> String {
    let prefix_len = ENV_PREFIX.len() + ENV_SEPARATOR.len();
    name.get(prefix_len..)
        .unwrap_or_default()
        .to_lowercase()
        .replace(ENV_SEPARATOR, ".")
}

/// The environment variable that sets `key` (`server.listen` ->
/// `GATEWAY__SERVER__LISTEN`).
pub fn env_var_for(key: &str) -> String {
    format!(
        "{ENV_PREFIX}{ENV_SEPARATOR}{}",
        key.to_uppercase().replace('.', ENV_SEPARATOR)
    )
}

fn split_list(value: &str) -> impl Iterator<Item = &str> {
    value.split(',').map(str::trim).filter(|s| !s.is_empty())
}

/// The default value at a dotted key, if the key exists.
fn lookup<'a>(known: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    key.split('.').try_fold(known, |v, segment| v.get(segment))
}

/// The first key in `tree` that `known` (the defaults) does not have, as a
/// dotted path. Lists of tables are checked against their first default
/// element; an empty default table accepts any key.
fn find_unknown_key(
    tree: &serde_json::Value,
    known: &serde_json::Value,
    path: &str,
) -> Option<String> {
    use serde_json::Value;
    match (tree, known) {
        (Value::Object(tree), Value::Object(known)) if !known.is_empty() => {
            let mut entries: Vec<(&String, &Value)> = tree.iter().collect();
            entries.sort_by(|a, b| a.0.cmp(b.0));
            for (key, value) in entries {
                let sub = if path.is_empty() {
                    key.clone()
                } else {
                    format!("{path}.{key}")
                };
                match known.get(key) {
                    None => return Some(sub),
                    Some(k) => {
                        if let Some(found) = find_unknown_key(value, k, &sub) {
                            return Some(found);
                        }
                    }
                }
            }
            None
        }
        (Value::Array(items), Value::Array(known)) => {
            let schema = known.first()?;
            items
                .iter()
                .enumerate()
                .find_map(|(i, item)| find_unknown_key(item, schema, &format!("{path}[{i}]")))
        }
        _ => None,
    }
}

/// The configuration library writes a key inside a list of tables as
/// `topology.exchanges[1]type`; ours is `topology.exchanges[1].type`.
fn dotted_key(key: String) -> String {
    let mut out = String::with_capacity(key.len() + 2);
    let mut after_index = false;
    for c in key.chars() {
        if after_index && c != '.' && c != '[' {
            out.push('.');
        }
        after_index = c == ']';
        out.push(c);
    }
    out
}

/// The library's words for types, in the docs' words: what the strict
/// check ([`strict`]) did not catch first must not leak Rust names either.
fn plain_words(reason: &str) -> String {
    let mut out = reason.to_owned();
    // "enum AuthMode does not have variant constructor JWT"
    if let Some(i) = out.find("enum ") {
        if let Some(j) = out[i..].find(" does not have variant constructor ") {
            let value = out[i + j + " does not have variant constructor ".len()..].to_owned();
            out = format!("{}{value:?} is not an accepted value", &out[..i]);
        }
    }
    // "expected struct Endpoint", "expected a sequence", "u64", ...
    if let Some(i) = out.find("struct ") {
        let end = out[i + 7..]
            .find(|c: char| !c.is_alphanumeric() && c != '_')
            .map_or(out.len(), |n| i + 7 + n);
        out.replace_range(i..end, "a table");
    }
    for (rust, plain) in [
        ("128-bit unsigned integer", "integer"),
        ("64-bit unsigned integer", "integer"),
        ("128-bit integer", "integer"),
        ("64-bit integer", "integer"),
        ("floating point", "number"),
        ("a sequence", "a list"),
        ("got sequence", "got a list"),
        ("a map", "a table"),
        ("got map", "got a table"),
        ("unit value", "nothing"),
    ] {
        out = out.replace(rust, plain);
    }
    out
}

/// Maps the configuration library's errors to ours, keeping the key.
fn from_library(e: config::ConfigError) -> ConfigError {
    let e = match e {
        config::ConfigError::Type {
            origin,
            unexpected,
            expected,
            key,
        } => config::ConfigError::Type {
            origin,
            unexpected,
            expected,
            key: key.map(dotted_key),
        },
        config::ConfigError::At { error, origin, key } => config::ConfigError::At {
            error,
            origin,
            key: key.map(dotted_key),
        },
        other => other,
    };
    match e {
        config::ConfigError::Type {
            origin,
            unexpected,
            expected,
            key,
        } => {
            let mut reason = plain_words(&format!("expected {expected}, got {unexpected}"));
            if let Some(origin) = origin {
                reason.push_str(&format!(" (from {origin})"));
            }
            match key {
                Some(key) => ConfigError::Invalid { key, reason },
                None => ConfigError::Other(reason),
            }
        }
        config::ConfigError::At { error, origin, key } => {
            let mut reason = plain_words(&error.to_string());
            if let Some(origin) = origin {
                reason.push_str(&format!(" (from {origin})"));
            }
            match key {
                Some(key) => ConfigError::Invalid { key, reason },
                None => ConfigError::Other(reason),
            }
        }
        config::ConfigError::NotFound(key) => ConfigError::invalid(key, "missing"),
        other => ConfigError::Other(plain_words(&other.to_string())),
    }
}

#[cfg(test)]
mod plain_words_tests {
    use super::plain_words;

    #[test]
    fn library_messages_lose_their_rust_names() {
        assert_eq!(
            plain_words("enum AuthMode does not have variant constructor JWT"),
            "\"JWT\" is not an accepted value"
        );
        assert_eq!(
            plain_words("expected struct Endpoint, got string \"/ws\""),
            "expected a table, got string \"/ws\""
        );
        assert_eq!(
            plain_words("expected an unsigned integer, got 64-bit integer `-5`"),
            "expected an unsigned integer, got integer `-5`"
        );
        assert_eq!(
            plain_words("expected a string, got map"),
            "expected a string, got a table"
        );
    }
}
