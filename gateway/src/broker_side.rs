//! The broker side of a session: what stands behind its relay leg.
//!
//! The client driver ([`crate::client`]) opens a session's relay leg through
//! [`BrokerSide::open`] and then speaks STOMP over the [`BrokerStream`] it
//! gets: it sends the session's CONNECT first, reads CONNECTED and every
//! frame after it with [`crate::broker::FrameReader`], and closes the stream
//! when the session core says so. It does not know what answers:
//!
//! - [`TcpBrokerSide`]: RabbitMQ's STOMP plugin over TCP or TLS, trying
//!   `broker.addresses` in order (the relay, the default);
//! - [`EmbeddedBrokerSide`]: the embedded broker of this process
//!   ([`crate::embedded`]) over an in-memory stream; the driver's own tests
//!   use it too;
//! - later, a shared fan-out hub: anything that can hand out a stream that
//!   speaks STOMP as a broker does (answers CONNECT with CONNECTED, honours
//!   `receipt`, sends MESSAGE for SUBSCRIBE) fits behind this trait.
//!
//! To add one: implement [`BrokerSide::open`] to return a future that yields
//! the connected stream (an in-memory one is a [`tokio::io::duplex`] end
//! wrapped in [`BrokerStream::Memory`]) and a short label for logs (an
//! address, or a name such as `embedded`). The future must not wait for the
//! STOMP handshake (the session core does that, with its own timeout), and
//! should fail with a [`BrokerError`] saying why when no leg can be had.

use crate::broker::{self, BrokerError, BrokerStream};
use crate::embedded::EmbeddedBroker;
use crate::tls::BrokerTls;
use std::fmt;
use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::time::Duration;

/// A relay leg being opened: the stream and a label for logs.
pub type OpenLeg =
    Pin<Box<dyn Future<Output = Result<(BrokerStream, String), BrokerError>> + Send + 'static>>;

/// Where a session's relay leg goes. See the module documentation.
pub trait BrokerSide: Send + Sync + fmt::Debug {
    /// Opens one relay leg for one session.
    fn open(&self) -> OpenLeg;
}

/// RabbitMQ's STOMP plugin over TCP (or TLS with `[broker.tls]`): the first
/// of `broker.addresses` that answers within `broker.connect_timeout_ms`.
#[derive(Debug, Clone)]
pub struct TcpBrokerSide {
    addresses: Arc<[String]>,
    timeout: Duration,
    tls: Option<Arc<BrokerTls>>,
}

impl TcpBrokerSide {
    pub fn new(addresses: Vec<String>, timeout: Duration, tls: Option<Arc<BrokerTls>>) -> Self {
        TcpBrokerSide {
            addresses: addresses.into(),
            timeout,
            tls,
        }
    }
}

impl BrokerSide for TcpBrokerSide {
    fn open(&self) -> OpenLeg {
        let this = self.clone();
        Box::pin(async move {
            broker::connect(&this.addresses, this.timeout, this.tls.as_deref()).await
        })
    }
}

/// The embedded broker of this process, over an in-memory stream.
#[derive(Debug, Clone)]
pub struct EmbeddedBrokerSide(pub Arc<EmbeddedBroker>);

impl BrokerSide for EmbeddedBrokerSide {
    fn open(&self) -> OpenLeg {
        let stream = self.0.connect();
        Box::pin(async move { Ok((BrokerStream::Memory(stream), "embedded".to_owned())) })
    }
}
