//! Authentication on CONNECT: JSON Web Tokens.
//!
//! The token travels in a CONNECT header (`auth.token_header`, by default
//! `Authorization`, as `Bearer <jwt>` or the bare token), or in `passcode`
//! when that header is absent, which is what @stomp/stompjs users put in
//! `connectHeaders`. The user name comes from a claim (`auth.user_claim`,
//! default `sub`); it is what user destinations resolve with and what
//! application messages carry in `stomp-user`.

use crate::config::JwtAlgorithm;
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use relay_core::session::Authenticate;
use relay_core::Frame;

/// A JWT setting that cannot work.
#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("auth.jwt_secret: an HMAC algorithm needs a non-empty secret")]
    MissingSecret,
    #[error("auth.jwt_public_key_file: cannot read {path}: {reason}")]
    KeyFile { path: String, reason: String },
    #[error("auth.jwt_public_key_file: {path} is not a usable public key: {reason}")]
    Key { path: String, reason: String },
}

impl AuthError {
    /// The configuration key the error is about.
    pub fn key(&self) -> &'static str {
        match self {
            AuthError::MissingSecret => "auth.jwt_secret",
            AuthError::KeyFile { .. } | AuthError::Key { .. } => "auth.jwt_public_key_file",
        }
    }

    /// The message without the key (for `invalid config: <key>: <reason>`).
    pub fn reason(&self) -> String {
        let text = self.to_string();
        text.strip_prefix(self.key())
            .and_then(|r| r.strip_prefix(": "))
            .map_or_else(|| text.clone(), str::to_owned)
    }
}

impl From<JwtAlgorithm> for Algorithm {
    fn from(a: JwtAlgorithm) -> Algorithm {
        match a {
            JwtAlgorithm::Hs256 => Algorithm::HS256,
            JwtAlgorithm::Hs384 => Algorithm::HS384,
            JwtAlgorithm::Hs512 => Algorithm::HS512,
            JwtAlgorithm::Rs256 => Algorithm::RS256,
            JwtAlgorithm::Rs384 => Algorithm::RS384,
            JwtAlgorithm::Rs512 => Algorithm::RS512,
            JwtAlgorithm::Es256 => Algorithm::ES256,
            JwtAlgorithm::Es384 => Algorithm::ES384,
        }
    }
}

/// Settings for [`JwtAuthenticator::new`].
#[derive(Debug, Clone)]
pub struct JwtSettings {
    pub algorithm: Algorithm,
    pub secret: String,
    pub public_key_file: String,
    pub issuer: String,
    pub audience: String,
    pub user_claim: String,
    pub token_header: String,
}

/// Verifies a JWT from the CONNECT frame.
pub struct JwtAuthenticator {
    key: DecodingKey,
    validation: Validation,
    user_claim: String,
    token_header: String,
}

impl std::fmt::Debug for JwtAuthenticator {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("JwtAuthenticator")
            .field("algorithms", &self.validation.algorithms)
            .field("user_claim", &self.user_claim)
            .field("token_header", &self.token_header)
            .finish_non_exhaustive()
    }
}

impl JwtAuthenticator {
    pub fn new(s: &JwtSettings) -> Result<JwtAuthenticator, AuthError> {
        let algorithm = s.algorithm;
        let key = match algorithm {
            Algorithm::HS256 | Algorithm::HS384 | Algorithm::HS512 => {
                if s.secret.is_empty() {
                    return Err(AuthError::MissingSecret);
                }
                DecodingKey::from_secret(s.secret.as_bytes())
            }
            _ => {
                let pem = std::fs::read(&s.public_key_file).map_err(|e| AuthError::KeyFile {
                    path: s.public_key_file.clone(),
                    reason: e.to_string(),
                })?;
                let key = match algorithm {
                    Algorithm::ES256 | Algorithm::ES384 => DecodingKey::from_ec_pem(&pem),
                    Algorithm::EdDSA => DecodingKey::from_ed_pem(&pem),
                    _ => DecodingKey::from_rsa_pem(&pem),
                };
                key.map_err(|e| AuthError::Key {
                    path: s.public_key_file.clone(),
                    reason: e.to_string(),
                })?
            }
        };
        let mut validation = Validation::new(algorithm);
        if !s.issuer.is_empty() {
            validation.set_issuer(&[&s.issuer]);
        }
        if s.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&[&s.audience]);
        }
        Ok(JwtAuthenticator {
            key,
            validation,
            user_claim: if s.user_claim.is_empty() {
                "sub".into()
            } else {
                s.user_claim.clone()
            },
            token_header: if s.token_header.is_empty() {
                "Authorization".into()
            } else {
                s.token_header.clone()
            },
        })
    }

    fn token<'a>(&self, connect: &'a Frame) -> Option<&'a str> {
        let lower = self.token_header.to_ascii_lowercase();
        let raw = connect
            .header(&self.token_header)
            .or_else(|| connect.header(&lower))
            .or_else(|| connect.header("passcode"))?
            .trim();
        let token = match raw.get(..7) {
            Some(p) if p.eq_ignore_ascii_case("bearer ") => raw[7..].trim(),
            _ => raw,
        };
        (!token.is_empty()).then_some(token)
    }
}

impl Authenticate for JwtAuthenticator {
    fn authenticate(&self, connect: &Frame) -> Result<Option<String>, String> {
        let Some(token) = self.token(connect) else {
            return Err(format!(
                "no token: send a JWT in the {:?} CONNECT header (\"Bearer <token>\") or as the passcode",
                self.token_header
            ));
        };
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &self.key, &self.validation)
            .map_err(|e| format!("invalid token: {e}"))?;
        match data.claims.get(&self.user_claim) {
            Some(serde_json::Value::String(u)) if !u.is_empty() => Ok(Some(u.clone())),
            Some(serde_json::Value::Number(n)) => Ok(Some(n.to_string())),
            _ => Err(format!(
                "token has no {:?} claim naming the user",
                self.user_claim
            )),
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;
    use jsonwebtoken::{encode, EncodingKey, Header};
    use relay_core::Command;

    fn settings() -> JwtSettings {
        JwtSettings {
            algorithm: Algorithm::HS256,
            secret: "s3cret".into(),
            public_key_file: String::new(),
            issuer: "https://issuer.example".into(),
            audience: String::new(),
            user_claim: "sub".into(),
            token_header: "Authorization".into(),
        }
    }

    fn token(secret: &str, claims: serde_json::Value) -> String {
        encode(
            &Header::new(Algorithm::HS256),
            &claims,
            &EncodingKey::from_secret(secret.as_bytes()),
        )
        .unwrap()
    }

    fn exp() -> u64 {
        jsonwebtoken::get_current_timestamp() + 600
    }

    fn connect(h: &str, v: &str) -> Frame {
        Frame::new(Command::Connect).with_header(h, v)
    }

    #[test]
    fn accepts_a_valid_token_in_header_or_passcode() {
        let a = JwtAuthenticator::new(&settings()).unwrap();
        let t = token(
            "s3cret",
            serde_json::json!({"sub": "alice", "iss": "https://issuer.example", "exp": exp()}),
        );
        assert_eq!(
            a.authenticate(&connect("Authorization", &format!("Bearer {t}"))),
            Ok(Some("alice".into()))
        );
        assert_eq!(
            a.authenticate(&connect("authorization", &t)),
            Ok(Some("alice".into()))
        );
        assert_eq!(
            a.authenticate(&connect("passcode", &t)),
            Ok(Some("alice".into()))
        );
    }

    #[test]
    fn refuses_bad_tokens() {
        let a = JwtAuthenticator::new(&settings()).unwrap();
        let forged = token(
            "other",
            serde_json::json!({"sub": "alice", "iss": "https://issuer.example", "exp": exp()}),
        );
        assert!(a
            .authenticate(&connect("Authorization", &forged))
            .unwrap_err()
            .contains("invalid token"));
        let expired = token(
            "s3cret",
            serde_json::json!({"sub": "alice", "iss": "https://issuer.example", "exp": 1000}),
        );
        assert!(a
            .authenticate(&connect("Authorization", &expired))
            .unwrap_err()
            .contains("invalid token"));
        let wrong_iss = token(
            "s3cret",
            serde_json::json!({"sub": "alice", "iss": "evil", "exp": exp()}),
        );
        assert!(a
            .authenticate(&connect("Authorization", &wrong_iss))
            .is_err());
        let no_sub = token(
            "s3cret",
            serde_json::json!({"iss": "https://issuer.example", "exp": exp()}),
        );
        assert!(a
            .authenticate(&connect("Authorization", &no_sub))
            .unwrap_err()
            .contains("\"sub\""));
        assert!(a
            .authenticate(&Frame::new(Command::Connect))
            .unwrap_err()
            .contains("no token"));
        assert!(a
            .authenticate(&connect("Authorization", "Bearer garbage"))
            .is_err());
    }

    #[test]
    fn settings_errors_name_the_key() {
        let mut s = settings();
        s.secret.clear();
        assert!(JwtAuthenticator::new(&s)
            .unwrap_err()
            .to_string()
            .starts_with("auth.jwt_secret"));
        s.algorithm = Algorithm::RS256;
        s.public_key_file = "/nonexistent/key.pem".into();
        assert!(JwtAuthenticator::new(&s)
            .unwrap_err()
            .to_string()
            .starts_with("auth.jwt_public_key_file"));
    }
}
