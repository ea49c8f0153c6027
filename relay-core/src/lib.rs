//! Sans-IO core of stomp-gateway.
#![forbid(unsafe_code)]

pub mod codec;
pub mod frame;

pub use codec::{encode, DecodeError, Decoder, Item, Limits};
pub use frame::{Command, Frame, Version};
