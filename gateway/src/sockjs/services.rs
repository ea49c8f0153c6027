//! The SockJS protocol's test services, mounted beside the real endpoints
//! when `sockjs.test_services` is on, so any SockJS conformance client
//! (sockjs-protocol's test suite) can be pointed at the gateway:
//! `/echo` (stream bytes limit 4096), `/close` (closes at once with
//! `3000 "Go away!"`), `/disabled_websocket_echo`, `/cookie_needed_echo`.

use super::{Conn, Handler, OpenInfo, Refused, Settings};
use futures_util::{SinkExt, StreamExt};
use std::sync::Arc;

/// Sends every message back.
#[derive(Debug, Default)]
pub struct Echo;

impl Handler for Echo {
    fn open(&self, mut conn: Conn, _info: OpenInfo) -> Result<(), Refused> {
        tokio::spawn(async move {
            while let Some(Ok(msg)) = conn.next().await {
                if conn.send(msg).await.is_err() {
                    break;
                }
            }
        });
        Ok(())
    }
}

/// Closes every session at once with `3000 "Go away!"`.
#[derive(Debug, Default)]
pub struct Close;

impl Handler for Close {
    fn open(&self, mut conn: Conn, _info: OpenInfo) -> Result<(), Refused> {
        conn.close(3000, "Go away!");
        Ok(())
    }
}

/// The test services with their settings, derived from `base`: their
/// paths, handlers and settings.
pub fn all(base: &Settings) -> Vec<(&'static str, Arc<dyn Handler>, Settings)> {
    let echo = Settings {
        stream_bytes_limit: 4096,
        ..base.clone()
    };
    vec![
        ("/echo", Arc::new(Echo) as Arc<dyn Handler>, echo.clone()),
        ("/close", Arc::new(Close), echo.clone()),
        (
            "/disabled_websocket_echo",
            Arc::new(Echo),
            Settings {
                websocket_enabled: false,
                ..echo.clone()
            },
        ),
        (
            "/cookie_needed_echo",
            Arc::new(Echo),
            Settings {
                session_cookie_needed: true,
                ..echo
            },
        ),
    ]
}
