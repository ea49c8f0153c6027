//! TCP connections to the RabbitMQ STOMP plugin.
//!
//! [`connect_tcp`] walks the configured address list in order and returns the
//! first connection that answers; [`FrameReader`] turns the read half into
//! [`Item`]s with the core codec. The STOMP handshake itself (CONNECT /
//! CONNECTED) belongs to whoever owns the connection: the session core for
//! client sessions, [`crate::system`] for the system link.

use relay_core::{DecodeError, Decoder, Item, Limits, Version};
use std::io;
use std::time::Duration;
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::TcpStream;

/// Why no broker connection could be made or kept.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("no broker address configured")]
    NoAddresses,
    #[error("no broker answered ({0})")]
    Unreachable(String),
    #[error("broker connection closed")]
    Closed,
    #[error("broker connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("broker sent a malformed frame: {0}")]
    Decode(#[from] DecodeError),
}

/// Connects to the first address that accepts a TCP connection within
/// `timeout`. Returns the stream and the address it reached.
pub async fn connect_tcp(
    addresses: &[String],
    timeout: Duration,
) -> Result<(TcpStream, String), BrokerError> {
    if addresses.is_empty() {
        return Err(BrokerError::NoAddresses);
    }
    let mut failures = Vec::with_capacity(addresses.len());
    for addr in addresses {
        match tokio::time::timeout(timeout, TcpStream::connect(addr.as_str())).await {
            Ok(Ok(stream)) => {
                // Frames are small and latency matters more than packet count.
                let _ = stream.set_nodelay(true);
                return Ok((stream, addr.clone()));
            }
            Ok(Err(e)) => failures.push(format!("{addr}: {e}")),
            Err(_) => failures.push(format!("{addr}: timed out after {timeout:?}")),
        }
    }
    Err(BrokerError::Unreachable(failures.join("; ")))
}

/// Reads frames from a broker connection.
#[derive(Debug)]
pub struct FrameReader<R> {
    inner: R,
    decoder: Decoder,
}

/// Largest single read from the broker socket. The buffer lives on the
/// stack only while a read is in progress, so an idle session holds none.
const READ_CHUNK: usize = 16 * 1024;

impl<R> FrameReader<R> {
    /// Wraps `inner`. Broker frames may be larger than client frames by the
    /// headers RabbitMQ adds, so the limits are the client's plus headroom.
    pub fn new(inner: R, limits: Limits) -> Self {
        FrameReader {
            inner,
            decoder: Decoder::new(limits),
        }
    }

    /// Sets the escaping rules once the version is known.
    pub fn set_version(&mut self, version: Version) {
        self.decoder.set_version(version);
    }
}

impl FrameReader<OwnedReadHalf> {
    /// The next frame or heart-beat; `Err(Closed)` on EOF.
    ///
    /// Cancel-safe: it waits for readability, then reads without awaiting,
    /// so dropping the future (for example in `select!`) loses nothing.
    pub async fn next(&mut self) -> Result<Item, BrokerError> {
        loop {
            if let Some(item) = self.decoder.decode()? {
                return Ok(item);
            }
            self.inner.readable().await?;
            let mut chunk = [0u8; READ_CHUNK];
            match self.inner.try_read(&mut chunk) {
                Ok(0) => return Err(BrokerError::Closed),
                Ok(n) => self.decoder.extend(&chunk[..n]),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e.into()),
            }
        }
    }
}
