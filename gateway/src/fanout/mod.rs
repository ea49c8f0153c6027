//! Shared fan-out (relay mode): one upstream per pod instead of one broker
//! connection per browser.
//!
//! [`upstream::PodUpstream`] holds the pod's AMQP consumer and its
//! bindings; [`mapping`] turns destinations, deliveries and SENDs into what
//! RabbitMQ's STOMP plugin would have made of them. Local subscribers and
//! the per-session outboxes are the hub's (`relay_core::hub`,
//! `crate::embedded`).

pub mod mapping;
pub mod upstream;
