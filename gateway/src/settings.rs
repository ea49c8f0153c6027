//! A validated [`Config`] turned once, at start, into the typed settings the
//! running gateway takes: the broker and AMQP TLS client configurations (files
//! read and checked), the JWT verifier (algorithm and key parsed) and this
//! process's pod id. Nothing after start re-reads files or re-parses strings.
//!
//! `--check-config` builds the same [`Settings`], so a file that cannot be
//! used fails there with exit 64, naming its key.

use crate::auth::{AuthError, JwtAuthenticator, JwtSettings};
use crate::config::{AuthMode, Config, ConfigError};
use crate::tls::{amqp_tls_config, BrokerTls, TlsError};
use lapin::tcp::OwnedTLSConfig;
use relay_core::router::Router;
use std::sync::Arc;

/// Everything derived from the configuration at start.
#[derive(Debug, Clone)]
pub struct Settings {
    /// The configuration these settings were built from.
    pub config: Arc<Config>,
    /// This process's name (`server.pod_id`, else `POD_NAME`, else the host
    /// name), resolved once: logs, `/readyz`, AMQP `app_id`, metrics.
    pub pod: String,
    /// TLS to the STOMP broker (`[broker.tls]`), `None` for plain TCP;
    /// shared by every session and the system link.
    pub broker_tls: Option<Arc<BrokerTls>>,
    /// lapin's TLS settings for `amqps://` URLs (`[amqp.tls]`).
    pub amqp_tls: OwnedTLSConfig,
    /// The CONNECT authenticator (`auth.mode = "jwt"`), `None` when off.
    pub authenticator: Option<Arc<JwtAuthenticator>>,
    /// Which path serves a frame and who may use it, with `[[auth.rules]]`
    /// compiled.
    pub router: Router,
}

impl Settings {
    /// Validates `config` ([`Config::validate`]) and builds the settings.
    pub fn new(config: Config) -> Result<Settings, ConfigError> {
        config.validate()?;
        Settings::build(Arc::new(config))
    }

    /// Builds the settings of a configuration already validated: reads the
    /// TLS files and the JWT key. Errors name the key.
    pub fn build(config: Arc<Config>) -> Result<Settings, ConfigError> {
        let broker_tls = BrokerTls::from_config(&config.broker.tls).map_err(tls_error)?;
        let amqp_tls = amqp_tls_config(&config.amqp.tls).map_err(tls_error)?;
        let authenticator = match config.auth.mode {
            AuthMode::None => None,
            AuthMode::Jwt => {
                let a = &config.auth;
                let jwt = JwtAuthenticator::new(&JwtSettings {
                    algorithm: a.jwt_algorithm.into(),
                    secret: a.jwt_secret.clone(),
                    public_key_file: a.jwt_public_key_file.clone(),
                    issuer: a.jwt_issuer.clone(),
                    audience: a.jwt_audience.clone(),
                    user_claim: a.user_claim.clone(),
                    token_header: a.token_header.clone(),
                    leeway_secs: a.jwt_leeway_secs,
                    require_exp: a.jwt_require_exp,
                })
                .map_err(auth_error)?;
                Some(Arc::new(jwt))
            }
        };
        Ok(Settings {
            router: config.router()?,
            pod: config.pod_id(),
            config,
            broker_tls,
            amqp_tls,
            authenticator,
        })
    }
}

/// A TLS settings error as a configuration error about the same key.
fn tls_error(e: TlsError) -> ConfigError {
    ConfigError::Invalid {
        key: e.key().to_owned(),
        reason: e.reason(),
    }
}

fn auth_error(e: AuthError) -> ConfigError {
    ConfigError::Invalid {
        key: e.key().to_owned(),
        reason: e.reason(),
    }
}
