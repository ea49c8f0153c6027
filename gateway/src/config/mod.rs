//! Gateway configuration: defaults, then a TOML file (`--config FILE`), then
//! `GATEWAY__SECTION__KEY` environment variables.
//!
//! Every key here is documented in `docs/configuration.md`; keep them in step.
//!
//! [`load`] merges the three sources and rejects unknown keys and values of
//! the wrong type, naming the key; [`Config::validate`] then checks the values
//! themselves (addresses parse, limits are positive, prefixes do not overlap).
//!
//! - [`types`]: the configuration's shape, one struct per section, with defaults.
//! - [`load`]: defaults, then the TOML file, then the environment.
//! - [`strict`]: value types checked before the sources are merged.
//! - [`validate`]: the value rules, each error naming its key.
//! - [`auth_rules`]: `[[auth.rules]]`, compiled into the session core's router.
//!
//! [`crate::settings`] turns a validated configuration into the typed
//! runtime settings (TLS client configs, JWT keys) the rest of the gateway takes.

mod auth_rules;
mod load;
mod strict;
#[cfg(test)]
mod tests;
mod types;
mod validate;

pub use auth_rules::{AuthDefault, AuthRule};
#[cfg(test)]
pub(crate) use load::load_from;
pub use load::{env_var_for, load};
pub use types::*;
pub use validate::mask_url_password;

use std::path::PathBuf;

/// Prefix of the environment variables that override configuration keys.
pub const ENV_PREFIX: &str = "GATEWAY";
/// Separator between the prefix, the section and the key in environment
/// variable names: `GATEWAY__BROKER__ADDRESSES`.
pub const ENV_SEPARATOR: &str = "__";
/// Value that [`Config::masked`] puts in place of secrets.
pub const MASK: &str = "******";

/// Why the configuration could not be loaded or is not valid.
///
/// Every variant that concerns one key names it the way the TOML file spells
/// it (`broker.addresses[1]`, `server.endpoints[0].path`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The `--config` file is missing, unreadable or not valid TOML.
    #[error("cannot load config file {}: {reason}", path.display())]
    File { path: PathBuf, reason: String },
    /// A key that no section defines (a typo, or a removed key).
    #[error("invalid config: {key}: unknown key{origin}")]
    UnknownKey {
        key: String,
        /// ` (set by GATEWAY__...)` when it came from the environment, else empty.
        origin: String,
    },
    /// A key whose value has the wrong type or breaks a rule.
    #[error("invalid config: {key}: {reason}")]
    Invalid { key: String, reason: String },
    /// Anything the configuration library reports without a key.
    #[error("invalid config: {0}")]
    Other(String),
}

impl ConfigError {
    /// The key the error is about, if it is about one key.
    pub fn key(&self) -> Option<&str> {
        match self {
            ConfigError::UnknownKey { key, .. } | ConfigError::Invalid { key, .. } => Some(key),
            ConfigError::File { .. } | ConfigError::Other(_) => None,
        }
    }

    fn invalid(key: impl Into<String>, reason: impl Into<String>) -> ConfigError {
        ConfigError::Invalid {
            key: key.into(),
            reason: reason.into(),
        }
    }
}
