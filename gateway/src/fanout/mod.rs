//! Shared fan-out (relay mode): one upstream per pod instead of one broker
//! connection per browser.
//!
//! [`upstream::PodUpstream`] holds the pod's AMQP consumer and its
//! bindings; [`shared::SharedFanout`] holds the pod's shared subscriptions
//! (the hub, `relay_core::hub`) and pushes each delivery to the sessions'
//! outlets ([`crate::outlet`]); [`mapping`] turns destinations, deliveries
//! and SENDs into what RabbitMQ's STOMP plugin would have made of them.

pub mod mapping;
pub mod shared;
pub mod upstream;
