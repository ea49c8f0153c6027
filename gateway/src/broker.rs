//! Connections to the RabbitMQ STOMP plugin, plain TCP or TLS, and the
//! in-memory streams of brokers that live in this process.
//!
//! [`connect`] walks the configured address list in order and returns the
//! first connection that answers (with [`BrokerTls`], the TLS handshake is
//! part of each address's attempt); [`FrameReader`] turns the read half into
//! [`Item`]s with the core codec. The STOMP handshake itself (CONNECT /
//! CONNECTED) belongs to whoever owns the connection: the session core for
//! client sessions, [`crate::system`] for the system link.

use crate::tls::BrokerTls;
use relay_core::{DecodeError, Decoder, Item, Limits, Version};
use std::fmt;
use std::io;
use std::pin::Pin;

use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, DuplexStream, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;

/// Why no broker connection could be made or kept.
#[derive(Debug, thiserror::Error)]
pub enum BrokerError {
    #[error("no broker address configured")]
    NoAddresses,
    #[error("no broker answered ({0})")]
    Unreachable(String),
    /// The TLS handshake with `address` failed; for a certificate the
    /// gateway does not trust, `reason` says so and why.
    #[error("TLS with broker {address} failed: {reason}")]
    Tls { address: String, reason: String },
    #[error("broker connection closed")]
    Closed,
    #[error("broker connection failed: {0}")]
    Io(#[from] io::Error),
    #[error("broker sent a malformed frame: {0}")]
    Decode(#[from] DecodeError),
}

/// A connection to the broker: plain TCP, TLS, or an in-memory stream to a
/// broker in this process (the embedded broker, tests).
pub enum BrokerStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
    Memory(DuplexStream),
}

impl fmt::Debug for BrokerStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BrokerStream::Plain(s) => f.debug_tuple("Plain").field(s).finish(),
            BrokerStream::Tls(s) => f.debug_tuple("Tls").field(s.get_ref().0).finish(),
            BrokerStream::Memory(_) => f.write_str("Memory"),
        }
    }
}

impl BrokerStream {
    /// Whether this connection is TLS.
    pub fn is_tls(&self) -> bool {
        matches!(self, BrokerStream::Tls(_))
    }

    /// Read and write halves that can be used from different tasks.
    pub fn into_split(self) -> (BrokerReadHalf, BrokerWriteHalf) {
        match self {
            BrokerStream::Plain(s) => {
                let (r, w) = s.into_split();
                (
                    BrokerReadHalf(ReadInner::Plain(r)),
                    BrokerWriteHalf(WriteInner::Plain(w)),
                )
            }
            BrokerStream::Tls(s) => {
                let (r, w) = tokio::io::split(s);
                (
                    BrokerReadHalf(ReadInner::Tls(r)),
                    BrokerWriteHalf(WriteInner::Tls(w)),
                )
            }
            BrokerStream::Memory(s) => {
                let (r, w) = tokio::io::split(s);
                (
                    BrokerReadHalf(ReadInner::Memory(r)),
                    BrokerWriteHalf(WriteInner::Memory(w)),
                )
            }
        }
    }
}

type TlsBox = Box<tokio_rustls::client::TlsStream<TcpStream>>;

/// The read half of a [`BrokerStream`]; read it with [`FrameReader`].
pub struct BrokerReadHalf(ReadInner);

enum ReadInner {
    Plain(OwnedReadHalf),
    Tls(ReadHalf<TlsBox>),
    Memory(ReadHalf<DuplexStream>),
}

impl fmt::Debug for BrokerReadHalf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            ReadInner::Plain(r) => f.debug_tuple("BrokerReadHalf::Plain").field(r).finish(),
            ReadInner::Tls(_) => f.write_str("BrokerReadHalf::Tls"),
            ReadInner::Memory(_) => f.write_str("BrokerReadHalf::Memory"),
        }
    }
}

/// The write half of a [`BrokerStream`].
///
/// Call `flush` after writing (for example `write_all` then `flush`): for
/// TLS it sends the encrypted records still buffered; for plain TCP it does
/// nothing.
pub struct BrokerWriteHalf(WriteInner);

enum WriteInner {
    Plain(OwnedWriteHalf),
    Tls(WriteHalf<TlsBox>),
    Memory(WriteHalf<DuplexStream>),
}

impl fmt::Debug for BrokerWriteHalf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            WriteInner::Plain(w) => f.debug_tuple("BrokerWriteHalf::Plain").field(w).finish(),
            WriteInner::Tls(_) => f.write_str("BrokerWriteHalf::Tls"),
            WriteInner::Memory(_) => f.write_str("BrokerWriteHalf::Memory"),
        }
    }
}

impl BrokerWriteHalf {
    /// Whether this is the write half of a TLS connection.
    pub fn is_tls(&self) -> bool {
        matches!(self.0, WriteInner::Tls(_))
    }
}

impl AsyncWrite for BrokerWriteHalf {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().0 {
            WriteInner::Plain(w) => Pin::new(w).poll_write(cx, buf),
            WriteInner::Tls(w) => Pin::new(w).poll_write(cx, buf),
            WriteInner::Memory(w) => Pin::new(w).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match &mut self.get_mut().0 {
            WriteInner::Plain(w) => Pin::new(w).poll_write_vectored(cx, bufs),
            WriteInner::Tls(w) => Pin::new(w).poll_write_vectored(cx, bufs),
            WriteInner::Memory(w) => Pin::new(w).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.0 {
            WriteInner::Plain(w) => w.is_write_vectored(),
            WriteInner::Tls(w) => w.is_write_vectored(),
            WriteInner::Memory(w) => w.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().0 {
            WriteInner::Plain(w) => Pin::new(w).poll_flush(cx),
            WriteInner::Tls(w) => Pin::new(w).poll_flush(cx),
            WriteInner::Memory(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().0 {
            WriteInner::Plain(w) => Pin::new(w).poll_shutdown(cx),
            // Sends close_notify, then shuts down the TCP write side.
            WriteInner::Tls(w) => Pin::new(w).poll_shutdown(cx),
            WriteInner::Memory(w) => Pin::new(w).poll_shutdown(cx),
        }
    }
}

/// One address's failure in [`connect`].
enum Attempt {
    Tcp(io::Error),
    Tls(String),
}

/// Connects to the first address that accepts a connection within
/// `timeout` (per address; with `tls`, the TLS handshake counts in it).
/// Returns the stream and the address it reached.
///
/// When every address fails and one of them failed the TLS handshake (for
/// example its certificate is not trusted), the error is
/// [`BrokerError::Tls`] for the first such address, with the other
/// addresses' failures appended; otherwise [`BrokerError::Unreachable`].
pub async fn connect(
    addresses: &[String],
    timeout: Duration,
    tls: Option<&BrokerTls>,
) -> Result<(BrokerStream, String), BrokerError> {
    if addresses.is_empty() {
        return Err(BrokerError::NoAddresses);
    }
    let mut failures = Vec::with_capacity(addresses.len());
    let mut tls_failure: Option<(usize, String, String)> = None;
    for addr in addresses {
        let attempt = async {
            let stream = TcpStream::connect(addr.as_str())
                .await
                .map_err(Attempt::Tcp)?;
            // Frames are small and latency matters more than packet count.
            let _ = stream.set_nodelay(true);
            match tls {
                None => Ok(BrokerStream::Plain(stream)),
                Some(tls) => tls
                    .handshake(stream, addr)
                    .await
                    .map(|s| BrokerStream::Tls(Box::new(s)))
                    .map_err(Attempt::Tls),
            }
        };
        match tokio::time::timeout(timeout, attempt).await {
            Ok(Ok(stream)) => return Ok((stream, addr.clone())),
            Ok(Err(Attempt::Tcp(e))) => failures.push(format!("{addr}: {e}")),
            Ok(Err(Attempt::Tls(reason))) => {
                if tls_failure.is_none() {
                    tls_failure = Some((failures.len(), addr.clone(), reason.clone()));
                }
                failures.push(format!("{addr}: {reason}"));
            }
            Err(_) if tls.is_some() => failures.push(format!(
                "{addr}: no TCP connection and TLS handshake within {timeout:?}"
            )),
            Err(_) => failures.push(format!("{addr}: timed out after {timeout:?}")),
        }
    }
    if let Some((index, address, reason)) = tls_failure {
        let others: Vec<&str> = failures
            .iter()
            .enumerate()
            .filter(|(i, _)| *i != index)
            .map(|(_, f)| f.as_str())
            .collect();
        let reason = if others.is_empty() {
            reason
        } else {
            format!("{reason} (other addresses: {})", others.join("; "))
        };
        return Err(BrokerError::Tls { address, reason });
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

/// Largest single read of decrypted data from a TLS connection (one TLS
/// record holds at most 16 KiB). Like [`READ_CHUNK`], on the stack of one
/// poll only.
const TLS_READ_CHUNK: usize = 16 * 1024;

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

impl FrameReader<BrokerReadHalf> {
    /// The next frame or heart-beat; `Err(Closed)` on EOF.
    ///
    /// Cancel-safe, and holds no read buffer between reads (an idle session
    /// costs no buffer). Plain TCP waits for readability, then reads without
    /// awaiting. TLS polls the stream with a buffer that lives only during
    /// one poll: when the poll is pending nothing was read (decrypted data
    /// stays inside the TLS stream), when it is ready the data goes into the
    /// decoder in that same poll. So dropping the future (for example in
    /// `select!`) loses nothing.
    pub async fn next(&mut self) -> Result<Item, BrokerError> {
        loop {
            if let Some(item) = self.decoder.decode()? {
                return Ok(item);
            }
            match &mut self.inner.0 {
                ReadInner::Plain(r) => {
                    r.readable().await?;
                    let mut chunk = [0u8; READ_CHUNK];
                    match r.try_read(&mut chunk) {
                        Ok(0) => return Err(BrokerError::Closed),
                        Ok(n) => self.decoder.extend(&chunk[..n]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                        Err(e) => return Err(e.into()),
                    }
                }
                ReadInner::Tls(r) => {
                    if poll_into(r, &mut self.decoder).await? == 0 {
                        return Err(BrokerError::Closed);
                    }
                }
                ReadInner::Memory(r) => {
                    if poll_into(r, &mut self.decoder).await? == 0 {
                        return Err(BrokerError::Closed);
                    }
                }
            }
        }
    }
}

/// One read from `r` straight into `decoder`, with a buffer that lives only
/// during one poll (see [`FrameReader::next`]); the number of bytes read.
async fn poll_into<R: AsyncRead + Unpin>(r: &mut R, decoder: &mut Decoder) -> io::Result<usize> {
    std::future::poll_fn(|cx| {
        let mut chunk = [0u8; TLS_READ_CHUNK];
        let mut buf = ReadBuf::new(&mut chunk);
        match Pin::new(&mut *r).poll_read(cx, &mut buf) {
            Poll::Ready(Ok(())) => {
                let filled = buf.filled();
                decoder.extend(filled);
                Poll::Ready(Ok(filled.len()))
            }
            Poll::Ready(Err(e)) => Poll::Ready(Err(e)),
            Poll::Pending => Poll::Pending,
        }
    })
    .await
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;
    use crate::config::TlsConfig;
    use crate::tls::tests::{acceptor, test_pki, tls_config, Dir, TestPki};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A TLS server on 127.0.0.1 with the certificate of `pki`; echoes
    /// what it reads, upper-cased, until EOF.
    async fn tls_echo_server(pki: &TestPki) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let acceptor = acceptor(pki);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let mut buf = [0u8; 1024];
                    loop {
                        match tls.read(&mut buf).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => {
                                let up = buf[..n].to_ascii_uppercase();
                                if tls.write_all(&up).await.is_err() || tls.flush().await.is_err() {
                                    return;
                                }
                            }
                        }
                    }
                });
            }
        });
        addr
    }

    #[tokio::test]
    async fn tls_round_trip_and_untrusted_certificate() {
        let dir = Dir::new("round-trip");
        let pki = test_pki(&["localhost", "127.0.0.1"]);
        let addr = tls_echo_server(&pki).await;
        let tls = BrokerTls::from_config(&tls_config(&dir, &pki))
            .unwrap()
            .unwrap();
        let (stream, reached) = connect(
            &["127.0.0.1:1".to_owned(), addr.clone()],
            Duration::from_secs(5),
            Some(&tls),
        )
        .await
        .unwrap();
        assert_eq!(reached, addr);
        assert!(stream.is_tls());
        let (read, mut write) = stream.into_split();
        assert!(write.is_tls());
        let mut reader = FrameReader::new(read, Limits::default());
        write
            .write_all(b"message\ndestination:/topic/x\n\nhi\0\n")
            .await
            .unwrap();
        write.flush().await.unwrap();
        // Dropping a pending read loses nothing.
        let mut early = match tokio::time::timeout(Duration::ZERO, reader.next()).await {
            Ok(item) => Some(item.unwrap()),
            Err(_) => None,
        };
        let mut frames = 0;
        let mut beats = 0;
        while frames == 0 || beats == 0 {
            let item = match early.take() {
                Some(item) => item,
                None => tokio::time::timeout(Duration::from_secs(5), reader.next())
                    .await
                    .unwrap()
                    .unwrap(),
            };
            match item {
                Item::Frame(f) => {
                    assert_eq!(f.command, relay_core::Command::Message);
                    assert_eq!(f.header("DESTINATION"), Some("/TOPIC/X"));
                    assert_eq!(&f.body[..], b"HI");
                    frames += 1;
                }
                Item::Heartbeat => beats += 1,
            }
        }
        write.shutdown().await.unwrap();
        assert!(matches!(
            tokio::time::timeout(Duration::from_secs(5), reader.next())
                .await
                .unwrap(),
            Err(BrokerError::Closed | BrokerError::Io(_))
        ));

        // A gateway trusting another CA: a clear certificate error.
        let other = test_pki(&["localhost"]);
        let untrusted = BrokerTls::from_config(&TlsConfig {
            enabled: true,
            ca_file: dir.write("other-ca.pem", &other.ca_pem),
            ..TlsConfig::default()
        })
        .unwrap()
        .unwrap();
        let e = connect(
            std::slice::from_ref(&addr),
            Duration::from_secs(5),
            Some(&untrusted),
        )
        .await
        .expect_err("untrusted");
        let text = e.to_string();
        assert!(matches!(e, BrokerError::Tls { .. }), "{e:?}");
        assert!(text.contains("certificate was not trusted"), "{text}");
        assert!(text.contains("broker.tls.ca_file"), "{text}");
        assert!(text.contains(&addr), "{text}");

        // The right CA but the wrong name.
        let wrong_name = BrokerTls::from_config(&TlsConfig {
            server_name: "rabbit.example".into(),
            ..tls_config(&dir, &pki)
        })
        .unwrap()
        .unwrap();
        let e = connect(
            &[addr.clone(), "127.0.0.1:1".to_owned()],
            Duration::from_secs(5),
            Some(&wrong_name),
        )
        .await
        .expect_err("wrong name");
        let text = e.to_string();
        assert!(text.contains("certificate was not trusted"), "{text}");
        assert!(text.contains("rabbit.example"), "{text}");
        assert!(text.contains("other addresses: 127.0.0.1:1"), "{text}");
    }

    #[tokio::test]
    async fn tls_to_a_plain_port_fails_clearly() {
        let dir = Dir::new("plain-port");
        let pki = test_pki(&["127.0.0.1"]);
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            // Answers like a STOMP server would to garbage: closes.
            if let Ok((mut s, _)) = listener.accept().await {
                let mut buf = [0u8; 16];
                let _ = s.read(&mut buf).await;
                let _ = s.write_all(b"ERROR\n\n\0").await;
            }
        });
        let tls = BrokerTls::from_config(&tls_config(&dir, &pki))
            .unwrap()
            .unwrap();
        let e = connect(
            std::slice::from_ref(&addr),
            Duration::from_secs(5),
            Some(&tls),
        )
        .await
        .expect_err("not TLS");
        assert!(matches!(e, BrokerError::Tls { .. }), "{e:?}");
    }

    #[tokio::test]
    async fn plain_connect_reads_frames() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            s.write_all(b"\nRECEIPT\nreceipt-id:1\n\n\0").await.unwrap();
        });
        let (stream, reached) = connect(std::slice::from_ref(&addr), Duration::from_secs(5), None)
            .await
            .unwrap();
        assert_eq!(reached, addr);
        assert!(!stream.is_tls());
        let (read, write) = stream.into_split();
        assert!(!write.is_tls());
        let mut reader = FrameReader::new(read, Limits::default());
        assert!(matches!(reader.next().await.unwrap(), Item::Heartbeat));
        match reader.next().await.unwrap() {
            Item::Frame(f) => assert_eq!(f.header("receipt-id"), Some("1")),
            other => panic!("{other:?}"),
        }
        assert!(matches!(reader.next().await, Err(BrokerError::Closed)));

        let e = connect(&["127.0.0.1:1".to_owned()], Duration::from_secs(5), None)
            .await
            .expect_err("refused");
        assert!(matches!(e, BrokerError::Unreachable(_)), "{e:?}");
        assert!(matches!(
            connect(&[], Duration::from_secs(1), None).await,
            Err(BrokerError::NoAddresses)
        ));
    }
}
