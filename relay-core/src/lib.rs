//! Sans-IO core of stomp-gateway.
//!
//! Nothing here touches a socket, a clock or a runtime: the [`codec`] turns
//! bytes into [`Frame`]s and back, [`router`] decides which path serves a
//! frame and whether the client may use it ([`policy`] holds the configured
//! rules), [`heartbeat`] negotiates heart-beats, [`hub`] is the local fan-out table
//! (who subscribed to what, one encoding per message), and
//! [`session::Session`] is the per-client relay state machine (inputs plus
//! the current time in, actions out), with [`barrier`] keeping a session's
//! application publishes behind its earlier SUBSCRIBEs. The `gateway` crate
//! does the I/O.
#![forbid(unsafe_code)]

pub mod barrier;
pub mod codec;
pub mod frame;
pub mod heartbeat;
pub mod hub;
pub mod policy;
pub mod router;
pub mod session;

pub use codec::{encode, DecodeError, Decoder, Item, Limits};
pub use frame::{Command, Frame, Version};
