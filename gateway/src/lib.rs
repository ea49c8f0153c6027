//! stomp-gateway: the I/O around `relay-core`.
//!
//! - [`server`]: the client listener (hyper 1, WebSocket upgrade).
//! - [`admission`]: connection limits from accept on (global, per IP).
//! - [`client`]: one task per client session driving `relay_core::session::Session`.
//! - [`broker`]: TCP connections to the RabbitMQ STOMP plugin (address failover).
//! - [`system`]: the shared system link (heart-beats, reconnect with backoff).
//! - [`admin`]: `/healthz` and `/readyz` on the admin listener.
//! - [`config`]: defaults, TOML file, `GATEWAY__...` environment overrides.
//! - [`sockjs`]: the SockJS server, generic over a session handler.
//! - [`upgrade`]: the WebSocket upgrade checks both kinds of endpoint share.
//! - [`endpoints`]: SockJS endpoints running STOMP, the demo page ([`demo`]).
#![forbid(unsafe_code)]

pub mod admin;
pub mod admission;
pub mod amqp;
pub mod api;
pub mod auth;
pub mod backoff;
pub mod broker;
pub mod broker_side;
pub mod client;
pub mod config;
pub mod demo;
pub mod embedded;
pub mod endpoints;
pub mod fanout;
pub mod health;
pub mod metrics;
pub mod outlet;
pub mod server;
pub mod settings;
pub mod sockjs;
pub mod state;
pub mod system;
pub mod telemetry;
pub mod tls;
pub mod upgrade;
