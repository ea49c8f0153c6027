//! Harness for the end-to-end tests: the real `stomp-gateway` binary, the
//! local RabbitMQ (STOMP plugin on 61613, management API on 15672) and a
//! WebSocket STOMP client built on the `relay-core` codec.
//!
//! - [`gateway`]: spawn the binary with a generated config, wait for
//!   `/readyz` (or `/healthz`), kill it on drop, keep its log.
//! - [`stomp`]: a STOMP-over-WebSocket test client.
//! - [`proxy`]: a TCP proxy to put between the gateway and RabbitMQ, so a
//!   test can cut the broker leg.
//! - [`rabbit`]: RabbitMQ topology and connection counting, with cleanup
//!   guards.
//! - [`http`]: a minimal blocking HTTP/1.1 client (admin and management APIs).
//! - [`amqp`]: an AMQP 0-9-1 client (lapin) for what backends see of the
//!   control plane.
//! - [`jwt`]: tokens for gateways with `[auth] mode = "jwt"`.
//! - [`backend`]: the example backend `chat-backend`, killed on drop.
//! - [`cluster`]: gateway processes with signals and restarts, the RabbitMQ
//!   test cluster (`scripts/rabbitmq-test-cluster.sh`) and reconnecting
//!   publishers/consumers that account for every message.

pub mod amqp;
pub mod backend;
pub mod cluster;
pub mod gateway;
pub mod http;
pub mod jwt;
pub mod proxy;
pub mod rabbit;
pub mod stomp;
pub mod tls;

pub use gateway::{check_config, Gateway, GatewayBuilder};
pub use proxy::Proxy;
pub use rabbit::{unique, Topology};
pub use relay_core::{Command, Frame, Version};
pub use stomp::{body_text, error_text, send, show, Closed, Received, StompClient};

use std::time::Duration;

/// Generous upper bound for anything that should happen "now" (a RECEIPT, a
/// MESSAGE after its SEND). Only ever a timeout, never a sleep.
pub const WAIT: Duration = Duration::from_secs(10);

/// Shorthand for [`Duration::from_millis`].
pub fn ms(n: u64) -> Duration {
    Duration::from_millis(n)
}
