//! The WebSocket upgrade request checks shared by the plain endpoints
//! ([`crate::server`]) and SockJS's websocket transports
//! ([`crate::sockjs`]); each caller words its own refusals.

use hyper::header::{self, HeaderMap, HeaderName};
use tokio_tungstenite::tungstenite::handshake::derive_accept_key;

/// Whether a (possibly repeated, comma-separated) header lists `token`,
/// compared without regard to ASCII case.
pub fn has_token(headers: &HeaderMap, name: HeaderName, token: &str) -> bool {
    headers.get_all(name).iter().any(|v| {
        v.to_str()
            .map(|s| s.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
            .unwrap_or(false)
    })
}

/// Why an upgrade request cannot be accepted, after its `Upgrade` and
/// `Connection` headers were checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum UpgradeRefusal {
    /// `Sec-WebSocket-Version` is not 13 (answer with a 400 naming 13).
    UnsupportedVersion,
    /// No `Sec-WebSocket-Key`.
    MissingKey,
}

/// The `Sec-WebSocket-Accept` value for a version-13 request.
pub fn accept_key(headers: &HeaderMap) -> Result<String, UpgradeRefusal> {
    if headers
        .get(header::SEC_WEBSOCKET_VERSION)
        .map(|v| v.as_bytes())
        != Some(b"13")
    {
        return Err(UpgradeRefusal::UnsupportedVersion);
    }
    headers
        .get(header::SEC_WEBSOCKET_KEY)
        .map(|k| derive_accept_key(k.as_bytes()))
        .ok_or(UpgradeRefusal::MissingKey)
}

#[cfg(test)]
mod tests {
    use super::*;
    use hyper::header::HeaderValue;

    #[test]
    fn tokens_and_accept_key() {
        let mut h = HeaderMap::new();
        h.append(
            header::CONNECTION,
            HeaderValue::from_static("keep-alive, Upgrade"),
        );
        assert!(has_token(&h, header::CONNECTION, "upgrade"));
        assert!(!has_token(&h, header::UPGRADE, "websocket"));
        assert_eq!(accept_key(&h), Err(UpgradeRefusal::UnsupportedVersion));
        h.insert(
            header::SEC_WEBSOCKET_VERSION,
            HeaderValue::from_static("13"),
        );
        assert_eq!(accept_key(&h), Err(UpgradeRefusal::MissingKey));
        // RFC 6455's example key and answer.
        h.insert(
            header::SEC_WEBSOCKET_KEY,
            HeaderValue::from_static("dGhlIHNhbXBsZSBub25jZQ=="),
        );
        assert_eq!(
            accept_key(&h).as_deref(),
            Ok("s3pPLMBiTxaQ9kYGzzhZRbK+xOo=")
        );
    }
}
