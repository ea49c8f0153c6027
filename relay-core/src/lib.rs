//! Sans-IO core of stomp-gateway.
#![forbid(unsafe_code)]

pub mod frame;

pub use frame::{Command, Frame, Version};
