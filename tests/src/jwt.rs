//! JSON Web Tokens for gateways started with `[auth] mode = "jwt"`.

use jsonwebtoken::{encode, Algorithm, EncodingKey, Header};

/// A random HS256 secret.
pub fn secret() -> String {
    format!("e2e-secret-{:032x}", rand::random::<u128>())
}

/// An HS256 token for `sub`, valid for ten minutes.
pub fn token(secret: &str, sub: &str) -> String {
    token_with_claims(
        secret,
        serde_json::json!({ "sub": sub, "exp": now() + 600, "iat": now() }),
    )
}

/// An HS256 token with exactly these claims.
pub fn token_with_claims(secret: &str, claims: serde_json::Value) -> String {
    encode(
        &Header::new(Algorithm::HS256),
        &claims,
        &EncodingKey::from_secret(secret.as_bytes()),
    )
    .expect("encoding a JWT")
}

/// Seconds since the epoch.
pub fn now() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or_default()
}
