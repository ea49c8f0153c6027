//! Authentication on CONNECT: JSON Web Tokens.
//!
//! The token travels in a CONNECT header (`auth.token_header`, by default
//! `Authorization`, as `Bearer <jwt>` or the bare token), or in `passcode`
//! when that header is absent, which is what @stomp/stompjs users put in
//! `connectHeaders`. The user name comes from a claim (`auth.user_claim`,
//! default `sub`); it is what user destinations resolve with and what
//! application messages carry in `stomp-user`.
//!
//! Times: `exp` (expiry) is required unless `auth.jwt_require_exp` is
//! false, and checked when present; `nbf` (not before) is checked when
//! present; both with `auth.jwt_leeway_secs` of tolerance for clock skew.
//! [`check_times`] does this with the time passed in.

use crate::config::JwtAlgorithm;
use crate::metrics::{AuthFailure, Metrics};
use jsonwebtoken::{Algorithm, DecodingKey, Validation};
use relay_core::policy::Principal;
use relay_core::session::Authenticate;
use relay_core::Frame;
use std::sync::Arc;

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
    /// Clock-skew tolerance for `exp` and `nbf`, in seconds.
    pub leeway_secs: u64,
    /// Refuse tokens without `exp`.
    pub require_exp: bool,
}

/// Checks a token's `exp` and `nbf` claims at `now` (seconds since the
/// epoch): `exp` must be present when `require_exp`, and a present one must
/// not be more than `leeway` seconds in the past; a present `nbf` must not
/// be more than `leeway` seconds in the future. Both must be numbers
/// (NumericDate). The error is the reason given to the client.
pub fn check_times(
    claims: &serde_json::Value,
    now: u64,
    leeway: u64,
    require_exp: bool,
) -> Result<(), String> {
    let numeric = |name: &str| -> Result<Option<u64>, String> {
        match claims.get(name) {
            None => Ok(None),
            Some(v) => v
                .as_u64()
                .or_else(|| v.as_f64().filter(|f| *f >= 0.0).map(|f| f as u64))
                .map(Some)
                .ok_or_else(|| format!("invalid token: the {name:?} claim is not a NumericDate")),
        }
    };
    match numeric("exp")? {
        None if require_exp => {
            return Err("invalid token: no \"exp\" claim (tokens must expire)".into())
        }
        Some(exp) if exp.saturating_add(leeway) < now => {
            return Err(format!(
                "invalid token: expired {} s ago (leeway {leeway} s)",
                now - exp
            ))
        }
        _ => {}
    }
    if let Some(nbf) = numeric("nbf")? {
        if nbf > now.saturating_add(leeway) {
            return Err(format!(
                "invalid token: not valid for another {} s (nbf; leeway {leeway} s)",
                nbf - now
            ));
        }
    }
    Ok(())
}

/// Verifies a JWT from the CONNECT frame.
pub struct JwtAuthenticator {
    key: DecodingKey,
    validation: Validation,
    user_claim: String,
    token_header: String,
    leeway_secs: u64,
    require_exp: bool,
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
        // exp and nbf: check_times, with the time and the policy explicit.
        validation.validate_exp = false;
        validation.validate_nbf = false;
        validation.required_spec_claims.clear();
        // A configured issuer or audience must be present, not only match
        // when present (jsonwebtoken skips the check for a missing claim).
        if !s.issuer.is_empty() {
            validation.set_issuer(&[&s.issuer]);
            validation.required_spec_claims.insert("iss".into());
        }
        if s.audience.is_empty() {
            validation.validate_aud = false;
        } else {
            validation.set_audience(&[&s.audience]);
            validation.required_spec_claims.insert("aud".into());
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
            leeway_secs: s.leeway_secs,
            require_exp: s.require_exp,
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
    fn authenticate(&self, connect: &Frame) -> Result<Option<Principal>, String> {
        let Some(token) = self.token(connect) else {
            return Err(format!(
                "no token: send a JWT in the {:?} CONNECT header (\"Bearer <token>\") or as the passcode",
                self.token_header
            ));
        };
        let data = jsonwebtoken::decode::<serde_json::Value>(token, &self.key, &self.validation)
            .map_err(|e| format!("invalid token: {e}"))?;
        check_times(
            &data.claims,
            jsonwebtoken::get_current_timestamp(),
            self.leeway_secs,
            self.require_exp,
        )?;
        let user = match data.claims.get(&self.user_claim) {
            Some(serde_json::Value::String(u)) if !u.is_empty() => u.clone(),
            Some(serde_json::Value::Number(n)) => n.to_string(),
            _ => {
                return Err(format!(
                    "token has no {:?} claim naming the user",
                    self.user_claim
                ))
            }
        };
        // The verified claims, for `[[auth.rules]]` conditions.
        let claims = match data.claims {
            serde_json::Value::Object(map) => map,
            _ => serde_json::Map::new(),
        };
        Ok(Some(Principal {
            user: Some(user),
            claims,
        }))
    }
}

/// Why [`JwtAuthenticator::authenticate`] refused a CONNECT, from its
/// message (for the `auth_failures_total` metric).
pub fn failure_kind(message: &str) -> AuthFailure {
    if message.starts_with("no token") {
        AuthFailure::NoToken
    } else if message.starts_with("token has no") {
        AuthFailure::NoUser
    } else if message.starts_with("invalid token: expired")
        || message.starts_with("invalid token: not valid for another")
        || message.contains("ExpiredSignature")
        || message.contains("ImmatureSignature")
    {
        AuthFailure::Expired
    } else {
        AuthFailure::Invalid
    }
}

/// An authenticator that counts its refusals in `auth_failures_total`.
#[derive(Debug)]
pub struct Counted {
    inner: Arc<dyn Authenticate>,
    metrics: Arc<Metrics>,
}

impl Counted {
    pub fn wrap(inner: Arc<dyn Authenticate>, metrics: Arc<Metrics>) -> Arc<dyn Authenticate> {
        Arc::new(Counted { inner, metrics })
    }
}

impl Authenticate for Counted {
    fn authenticate(&self, connect: &Frame) -> Result<Option<Principal>, String> {
        let result = self.inner.authenticate(connect);
        if let Err(message) = &result {
            self.metrics.auth_failed(failure_kind(message));
        }
        result
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
            leeway_secs: 60,
            require_exp: true,
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
        let user = |r: Result<Option<Principal>, String>| r.unwrap().and_then(|p| p.user);
        assert_eq!(
            user(a.authenticate(&connect("Authorization", &format!("Bearer {t}")))),
            Some("alice".into())
        );
        assert_eq!(
            user(a.authenticate(&connect("authorization", &t))),
            Some("alice".into())
        );
        assert_eq!(
            user(a.authenticate(&connect("passcode", &t))),
            Some("alice".into())
        );
    }

    #[test]
    fn exposes_the_verified_claims() {
        let a = JwtAuthenticator::new(&settings()).unwrap();
        let t = token(
            "s3cret",
            serde_json::json!({"sub": "alice", "iss": "https://issuer.example", "exp": exp(), "rooms": ["42"]}),
        );
        let p = a
            .authenticate(&connect("Authorization", &t))
            .unwrap()
            .unwrap();
        assert_eq!(p.claim("rooms"), Some(&serde_json::json!(["42"])));
        assert_eq!(p.claim("sub"), Some(&serde_json::json!("alice")));
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
    fn a_configured_issuer_or_audience_must_be_present() {
        let mut s = settings();
        s.audience = "chat".into();
        let a = JwtAuthenticator::new(&s).unwrap();
        let ok = token(
            "s3cret",
            serde_json::json!({"sub": "alice", "iss": "https://issuer.example", "aud": "chat", "exp": exp()}),
        );
        assert_eq!(
            a.authenticate(&connect("Authorization", &ok))
                .map(|p| p.and_then(|p| p.user)),
            Ok(Some("alice".into()))
        );
        for claims in [
            serde_json::json!({"sub": "alice", "aud": "chat", "exp": exp()}),
            serde_json::json!({"sub": "alice", "iss": "https://issuer.example", "exp": exp()}),
        ] {
            let t = token("s3cret", claims.clone());
            let e = a.authenticate(&connect("Authorization", &t)).unwrap_err();
            assert!(e.contains("invalid token"), "{claims}: {e}");
        }
    }

    const NOW: u64 = 1_800_000_000;
    const LEEWAY: u64 = 60;

    fn at(claims: serde_json::Value, require_exp: bool) -> Result<(), String> {
        check_times(&claims, NOW, LEEWAY, require_exp)
    }

    #[test]
    fn exp_is_honoured_to_the_edge_of_the_leeway() {
        assert_eq!(at(serde_json::json!({"exp": NOW + 600}), true), Ok(()));
        assert_eq!(at(serde_json::json!({"exp": NOW}), true), Ok(()));
        assert_eq!(at(serde_json::json!({"exp": NOW - LEEWAY}), true), Ok(()));
        let e = at(serde_json::json!({"exp": NOW - LEEWAY - 1}), true).unwrap_err();
        assert_eq!(e, "invalid token: expired 61 s ago (leeway 60 s)");
        assert!(check_times(&serde_json::json!({"exp": NOW - 1}), NOW, 0, true).is_err());
        assert_eq!(
            check_times(&serde_json::json!({"exp": NOW}), NOW, 0, true),
            Ok(())
        );
    }

    #[test]
    fn nbf_in_the_future_is_refused_past_the_leeway() {
        let exp = NOW + 600;
        assert_eq!(
            at(serde_json::json!({"exp": exp, "nbf": NOW}), true),
            Ok(())
        );
        assert_eq!(
            at(serde_json::json!({"exp": exp, "nbf": NOW + LEEWAY}), true),
            Ok(())
        );
        let e = at(
            serde_json::json!({"exp": exp, "nbf": NOW + LEEWAY + 1}),
            true,
        )
        .unwrap_err();
        assert_eq!(
            e,
            "invalid token: not valid for another 61 s (nbf; leeway 60 s)"
        );
        assert!(check_times(
            &serde_json::json!({"exp": exp, "nbf": NOW + 1}),
            NOW,
            0,
            true
        )
        .is_err());
    }

    #[test]
    fn missing_exp_follows_the_policy_and_bad_types_are_refused() {
        let e = at(serde_json::json!({"sub": "alice"}), true).unwrap_err();
        assert!(e.contains("no \"exp\" claim"), "{e}");
        assert_eq!(at(serde_json::json!({"sub": "alice"}), false), Ok(()));
        // Without the requirement a present exp is still checked.
        assert!(at(serde_json::json!({"exp": NOW - LEEWAY - 1}), false).is_err());
        for claims in [
            serde_json::json!({"exp": "tomorrow"}),
            serde_json::json!({"exp": -5}),
            serde_json::json!({"exp": NOW + 600, "nbf": "now"}),
        ] {
            let e = at(claims.clone(), true).unwrap_err();
            assert!(e.contains("is not a NumericDate"), "{claims}: {e}");
        }
    }

    #[test]
    fn the_authenticator_applies_nbf_and_the_exp_policy() {
        let now = jsonwebtoken::get_current_timestamp();
        let a = JwtAuthenticator::new(&settings()).unwrap();
        let future = token(
            "s3cret",
            serde_json::json!({"sub": "alice", "iss": "https://issuer.example", "exp": now + 7200, "nbf": now + 3600}),
        );
        let e = a
            .authenticate(&connect("Authorization", &future))
            .unwrap_err();
        assert!(e.contains("nbf"), "{e}");
        let forever = token(
            "s3cret",
            serde_json::json!({"sub": "alice", "iss": "https://issuer.example"}),
        );
        let e = a
            .authenticate(&connect("Authorization", &forever))
            .unwrap_err();
        assert!(e.contains("exp"), "{e}");
        let mut s = settings();
        s.require_exp = false;
        let lenient = JwtAuthenticator::new(&s).unwrap();
        assert_eq!(
            lenient
                .authenticate(&connect("Authorization", &forever))
                .map(|p| p.and_then(|p| p.user)),
            Ok(Some("alice".into()))
        );
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

    #[test]
    fn refusals_are_classified_for_the_metric() {
        let a = JwtAuthenticator::new(&settings()).unwrap();
        let kind = |f: &Frame| failure_kind(&a.authenticate(f).unwrap_err());
        let claims = |exp: u64| serde_json::json!({"sub": "alice", "iss": "https://issuer.example", "exp": exp});
        assert_eq!(kind(&Frame::new(Command::Connect)), AuthFailure::NoToken);
        let expired = token(
            "s3cret",
            claims(jsonwebtoken::get_current_timestamp() - 3600),
        );
        assert_eq!(kind(&connect("passcode", &expired)), AuthFailure::Expired);
        let early = token(
            "s3cret",
            serde_json::json!({"sub": "alice", "iss": "https://issuer.example", "exp": exp(),
                "nbf": jsonwebtoken::get_current_timestamp() + 3600}),
        );
        assert_eq!(kind(&connect("passcode", &early)), AuthFailure::Expired);
        let forged = token("other", claims(exp()));
        assert_eq!(kind(&connect("passcode", &forged)), AuthFailure::Invalid);
        assert_eq!(
            kind(&connect("passcode", "not-a-jwt")),
            AuthFailure::Invalid
        );
        let anonymous = token(
            "s3cret",
            serde_json::json!({"iss": "https://issuer.example", "exp": exp()}),
        );
        assert_eq!(kind(&connect("passcode", &anonymous)), AuthFailure::NoUser);
    }
}
