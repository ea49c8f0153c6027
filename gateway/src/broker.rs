//! Connections to the RabbitMQ STOMP plugin, plain TCP or TLS.
//!
//! [`connect`] walks the configured address list in order and returns the
//! first connection that answers (with [`BrokerTls`], the TLS handshake is
//! part of each address's attempt); [`FrameReader`] turns the read half into
//! [`Item`]s with the core codec. The STOMP handshake itself (CONNECT /
//! CONNECTED) belongs to whoever owns the connection: the session core for
//! client sessions, [`crate::system`] for the system link.

use crate::config::TlsConfig;
use relay_core::{DecodeError, Decoder, Item, Limits, Version};
use std::fmt;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf, ReadHalf, WriteHalf};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

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

/// Why TLS settings (`[broker.tls]`, `[amqp.tls]`) cannot be used. Every
/// variant names the configuration key, and the file where there is one.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum TlsError {
    /// A required key is empty.
    #[error("{key}: must be set {why}")]
    Missing { key: String, why: String },
    /// The file cannot be read.
    #[error("{key}: cannot read {path:?}: {reason}")]
    Read {
        key: String,
        path: String,
        reason: String,
    },
    /// The file is not PEM of the expected kind.
    #[error("{key}: {path:?} {reason}")]
    Pem {
        key: String,
        path: String,
        reason: String,
    },
    /// The value is unusable for another reason (a server name that is no
    /// DNS name or IP address, a key that does not match its certificate).
    #[error("{key}: {reason}")]
    Invalid { key: String, reason: String },
}

impl TlsError {
    /// The configuration key the error is about (`broker.tls.ca_file`).
    pub fn key(&self) -> &str {
        match self {
            TlsError::Missing { key, .. }
            | TlsError::Read { key, .. }
            | TlsError::Pem { key, .. }
            | TlsError::Invalid { key, .. } => key,
        }
    }

    /// The message without the key (for `invalid config: <key>: <reason>`).
    pub fn reason(&self) -> String {
        match self {
            TlsError::Missing { why, .. } => format!("must be set {why}"),
            TlsError::Read { path, reason, .. } => format!("cannot read {path:?}: {reason}"),
            TlsError::Pem { path, reason, .. } => format!("{path:?} {reason}"),
            TlsError::Invalid { reason, .. } => reason.clone(),
        }
    }
}

fn read_pem_file(key: &str, path: &str) -> Result<Vec<u8>, TlsError> {
    let bytes = std::fs::read(path).map_err(|e| TlsError::Read {
        key: key.to_owned(),
        path: path.to_owned(),
        reason: e.to_string(),
    })?;
    if !bytes.windows(11).any(|w| w == b"-----BEGIN ") {
        return Err(TlsError::Pem {
            key: key.to_owned(),
            path: path.to_owned(),
            reason: "is not a PEM file (no -----BEGIN line)".into(),
        });
    }
    Ok(bytes)
}

fn pem_certificates(key: &str, path: &str) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let bytes = read_pem_file(key, path)?;
    let pem_error = |reason: String| TlsError::Pem {
        key: key.to_owned(),
        path: path.to_owned(),
        reason,
    };
    let certs = CertificateDer::pem_slice_iter(&bytes)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|e| pem_error(format!("is not valid PEM: {e}")))?;
    if certs.is_empty() {
        return Err(pem_error(
            "contains no certificate (-----BEGIN CERTIFICATE-----)".into(),
        ));
    }
    Ok(certs)
}

/// The CA certificates of the PEM bundle at `path` (config key `key`), each
/// checked to be usable as a trust anchor.
pub fn load_ca_certificates(
    key: &str,
    path: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let certs = pem_certificates(key, path)?;
    let mut store = RootCertStore::empty();
    for (i, cert) in certs.iter().enumerate() {
        store.add(cert.clone()).map_err(|e| TlsError::Pem {
            key: key.to_owned(),
            path: path.to_owned(),
            reason: format!(
                "certificate {} cannot be used as a CA certificate: {e}",
                i + 1
            ),
        })?;
    }
    Ok(certs)
}

/// The certificate chain (leaf first) of the PEM file at `path`.
pub fn load_certificate_chain(
    key: &str,
    path: &str,
) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    pem_certificates(key, path)
}

/// The private key of the PEM file at `path`: PKCS#8 (`PRIVATE KEY`),
/// PKCS#1 (`RSA PRIVATE KEY`) or SEC1 (`EC PRIVATE KEY`), not encrypted.
pub fn load_private_key(key: &str, path: &str) -> Result<PrivateKeyDer<'static>, TlsError> {
    let bytes = read_pem_file(key, path)?;
    let pem_error = |reason: &str| TlsError::Pem {
        key: key.to_owned(),
        path: path.to_owned(),
        reason: reason.to_owned(),
    };
    match PrivateKeyDer::from_pem_slice(&bytes) {
        Ok(k) => Ok(k),
        Err(_) if bytes.windows(9).any(|w| w == b"ENCRYPTED") => Err(pem_error(
            "holds an encrypted private key: give the key unencrypted (PKCS#8, PKCS#1 or SEC1)",
        )),
        Err(rustls::pki_types::pem::Error::NoItemsFound) => Err(pem_error(
            "contains no private key (-----BEGIN PRIVATE KEY-----, RSA PRIVATE KEY or EC PRIVATE KEY)",
        )),
        Err(e) => Err(pem_error(&format!("is not a valid PEM private key: {e}"))),
    }
}

/// The rustls crypto provider of every TLS connection the gateway makes
/// itself (ring; aws-lc is not built).
fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

/// A client certificate chain and its key, checked to match. `prefix` is
/// the configuration section (`broker.tls`).
pub(crate) fn load_client_identity(
    prefix: &str,
    cert_file: &str,
    key_file: &str,
) -> Result<Option<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>)>, TlsError> {
    let cert_key = format!("{prefix}.cert_file");
    let key_key = format!("{prefix}.key_file");
    match (cert_file.is_empty(), key_file.is_empty()) {
        (true, true) => return Ok(None),
        (false, true) => {
            return Err(TlsError::Missing {
                key: key_key,
                why: format!("when {cert_key} is set (the private key of the client certificate)"),
            })
        }
        (true, false) => {
            return Err(TlsError::Missing {
                key: cert_key,
                why: format!("when {key_key} is set (the client certificate of that key)"),
            })
        }
        (false, false) => {}
    }
    let chain = load_certificate_chain(&cert_key, cert_file)?;
    let private_key = load_private_key(&key_key, key_file)?;
    rustls::sign::CertifiedKey::from_der(chain.clone(), private_key.clone_key(), &provider())
        .map_err(|e| TlsError::Invalid {
            key: key_key.clone(),
            reason: format!(
                "{key_file:?} cannot be used with the certificate in {cert_file:?}: {e}"
            ),
        })?;
    Ok(Some((chain, private_key)))
}

/// The TLS client side of the broker connections, built once from
/// `[broker.tls]` and shared by every session and the system link.
pub struct BrokerTls {
    connector: TlsConnector,
    /// `broker.tls.server_name`, when set.
    server_name: Option<ServerName<'static>>,
    client_auth: bool,
}

impl fmt::Debug for BrokerTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BrokerTls")
            .field("server_name", &self.server_name)
            .field("client_auth", &self.client_auth)
            .finish_non_exhaustive()
    }
}

impl BrokerTls {
    /// `Ok(None)` when `tls.enabled` is false. Otherwise reads and checks the
    /// CA bundle (required), the optional client certificate and key, and
    /// the server name; errors name the key and the file.
    pub fn from_config(tls: &TlsConfig) -> Result<Option<Arc<BrokerTls>>, TlsError> {
        if !tls.enabled {
            return Ok(None);
        }
        if tls.ca_file.is_empty() {
            return Err(TlsError::Missing {
                key: "broker.tls.ca_file".into(),
                why:
                    "when broker.tls.enabled = true (a PEM file with the CA certificates to trust)"
                        .into(),
            });
        }
        let mut roots = RootCertStore::empty();
        for cert in load_ca_certificates("broker.tls.ca_file", &tls.ca_file)? {
            // Checked by load_ca_certificates.
            let _ = roots.add(cert);
        }
        let server_name = if tls.server_name.is_empty() {
            None
        } else {
            Some(
                ServerName::try_from(tls.server_name.clone()).map_err(|_| TlsError::Invalid {
                    key: "broker.tls.server_name".into(),
                    reason: format!("{:?} is not a DNS name or IP address", tls.server_name),
                })?,
            )
        };
        let identity = load_client_identity("broker.tls", &tls.cert_file, &tls.key_file)?;
        let builder = ClientConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .map_err(|e| TlsError::Invalid {
                key: "broker.tls".into(),
                reason: format!("cannot set up TLS: {e}"),
            })?
            .with_root_certificates(roots);
        let client_auth = identity.is_some();
        let config = match identity {
            Some((chain, key)) => {
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(|e| TlsError::Invalid {
                        key: "broker.tls.key_file".into(),
                        reason: format!("cannot be used as the client key: {e}"),
                    })?
            }
            None => builder.with_no_client_auth(),
        };
        Ok(Some(Arc::new(BrokerTls {
            connector: TlsConnector::from(Arc::new(config)),
            server_name,
            client_auth,
        })))
    }

    /// The name verified in the certificate of the broker at `address`:
    /// `broker.tls.server_name`, else the host part of `address`.
    pub fn server_name_for(&self, address: &str) -> Result<ServerName<'static>, String> {
        if let Some(name) = &self.server_name {
            return Ok(name.clone());
        }
        let host = address
            .rsplit_once(':')
            .map_or(address, |(host, _port)| host);
        let host = host
            .strip_prefix('[')
            .and_then(|h| h.strip_suffix(']'))
            .unwrap_or(host);
        ServerName::try_from(host.to_owned()).map_err(|_| {
            format!("{host:?} is not a valid TLS server name (set broker.tls.server_name)")
        })
    }

    /// TLS handshake on `tcp`, connected to `address`. The error is the
    /// reason (see [`BrokerError::Tls`]).
    async fn handshake(
        &self,
        tcp: TcpStream,
        address: &str,
    ) -> Result<tokio_rustls::client::TlsStream<TcpStream>, String> {
        let name = self.server_name_for(address)?;
        let shown = name.to_str().into_owned();
        self.connector
            .connect(name, tcp)
            .await
            .map_err(|e| self.explain(&e, &shown))
    }

    /// A TLS failure in words; certificate problems say so first.
    fn explain(&self, e: &io::Error, server_name: &str) -> String {
        let tls = e
            .get_ref()
            .and_then(|inner| inner.downcast_ref::<rustls::Error>());
        match tls {
            Some(rustls::Error::InvalidCertificate(cert)) => {
                let hint = match cert {
                    rustls::CertificateError::UnknownIssuer
                    | rustls::CertificateError::BadSignature => {
                        " (it is not signed by a CA in broker.tls.ca_file)".to_owned()
                    }
                    rustls::CertificateError::NotValidForName
                    | rustls::CertificateError::NotValidForNameContext { .. } => format!(
                        " (it is not valid for the name {server_name:?}; see broker.tls.server_name)"
                    ),
                    _ => String::new(),
                };
                format!("the broker's certificate was not trusted: {e}{hint}")
            }
            Some(rustls::Error::AlertReceived(alert)) if self.client_auth => format!(
                "the broker refused the TLS handshake ({alert:?}); does it trust the gateway's client certificate (broker.tls.cert_file)?"
            ),
            Some(rustls::Error::AlertReceived(alert)) => format!(
                "the broker refused the TLS handshake ({alert:?}); does it require a client certificate (broker.tls.cert_file)?"
            ),
            _ if e.kind() == io::ErrorKind::UnexpectedEof => format!(
                "TLS handshake failed: the broker closed the connection ({e}); is this a TLS port?"
            ),
            _ => format!("TLS handshake failed: {e}"),
        }
    }
}

/// A connection to the broker: plain TCP or TLS.
pub enum BrokerStream {
    Plain(TcpStream),
    Tls(Box<tokio_rustls::client::TlsStream<TcpStream>>),
}

impl fmt::Debug for BrokerStream {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            BrokerStream::Plain(s) => f.debug_tuple("Plain").field(s).finish(),
            BrokerStream::Tls(s) => f.debug_tuple("Tls").field(s.get_ref().0).finish(),
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
        }
    }
}

type TlsBox = Box<tokio_rustls::client::TlsStream<TcpStream>>;

/// The read half of a [`BrokerStream`]; read it with [`FrameReader`].
pub struct BrokerReadHalf(ReadInner);

enum ReadInner {
    Plain(OwnedReadHalf),
    Tls(ReadHalf<TlsBox>),
}

impl fmt::Debug for BrokerReadHalf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            ReadInner::Plain(r) => f.debug_tuple("BrokerReadHalf::Plain").field(r).finish(),
            ReadInner::Tls(_) => f.write_str("BrokerReadHalf::Tls"),
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
}

impl fmt::Debug for BrokerWriteHalf {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.0 {
            WriteInner::Plain(w) => f.debug_tuple("BrokerWriteHalf::Plain").field(w).finish(),
            WriteInner::Tls(_) => f.write_str("BrokerWriteHalf::Tls"),
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
        }
    }

    fn is_write_vectored(&self) -> bool {
        match &self.0 {
            WriteInner::Plain(w) => w.is_write_vectored(),
            WriteInner::Tls(w) => w.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().0 {
            WriteInner::Plain(w) => Pin::new(w).poll_flush(cx),
            WriteInner::Tls(w) => Pin::new(w).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match &mut self.get_mut().0 {
            WriteInner::Plain(w) => Pin::new(w).poll_shutdown(cx),
            // Sends close_notify, then shuts down the TCP write side.
            WriteInner::Tls(w) => Pin::new(w).poll_shutdown(cx),
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
                    let decoder = &mut self.decoder;
                    let n = std::future::poll_fn(|cx| {
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
                    .await?;
                    if n == 0 {
                        return Err(BrokerError::Closed);
                    }
                }
            }
        }
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write as _;
    use std::path::PathBuf;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    /// A directory of PEM files, removed on drop.
    pub(crate) struct Dir(PathBuf);

    impl Dir {
        pub(crate) fn new(name: &str) -> Dir {
            let dir = std::env::temp_dir().join(format!(
                "stomp-gateway-broker-test-{}-{name}-{:08x}",
                std::process::id(),
                rand::random::<u32>()
            ));
            std::fs::create_dir_all(&dir).unwrap();
            Dir(dir)
        }

        pub(crate) fn write(&self, name: &str, contents: &str) -> String {
            let path = self.0.join(name);
            let mut f = std::fs::File::create(&path).unwrap();
            f.write_all(contents.as_bytes()).unwrap();
            path.display().to_string()
        }
    }

    impl Drop for Dir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }

    /// A CA and a certificate it signed for `names`.
    pub(crate) struct TestPki {
        pub ca_pem: String,
        pub cert_pem: String,
        pub key_pem: String,
    }

    pub(crate) fn test_pki(names: &[&str]) -> TestPki {
        let ca_key = rcgen::KeyPair::generate().unwrap();
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params.distinguished_name.push(
            rcgen::DnType::CommonName,
            format!("stomp-gateway test CA {:08x}", rand::random::<u32>()),
        );
        let ca = ca_params.self_signed(&ca_key).unwrap();
        let key = rcgen::KeyPair::generate().unwrap();
        let params =
            rcgen::CertificateParams::new(names.iter().map(|s| s.to_string()).collect::<Vec<_>>())
                .unwrap();
        let cert = params.signed_by(&key, &ca, &ca_key).unwrap();
        TestPki {
            ca_pem: ca.pem(),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
        }
    }

    fn tls_config(dir: &Dir, pki: &TestPki) -> TlsConfig {
        TlsConfig {
            enabled: true,
            ca_file: dir.write("ca.pem", &pki.ca_pem),
            ..TlsConfig::default()
        }
    }

    #[test]
    fn disabled_is_none() {
        assert!(BrokerTls::from_config(&TlsConfig::default())
            .unwrap()
            .is_none());
    }

    #[test]
    fn builds_from_good_files() {
        let dir = Dir::new("good");
        let pki = test_pki(&["localhost", "127.0.0.1"]);
        let mut c = tls_config(&dir, &pki);
        let tls = BrokerTls::from_config(&c).unwrap().unwrap();
        assert!(!tls.client_auth);
        assert_eq!(
            tls.server_name_for("rabbit-0.rabbit:61614").unwrap(),
            ServerName::try_from("rabbit-0.rabbit").unwrap()
        );
        assert_eq!(
            tls.server_name_for("127.0.0.1:61614").unwrap(),
            ServerName::try_from("127.0.0.1").unwrap()
        );
        assert_eq!(
            tls.server_name_for("[::1]:61614").unwrap(),
            ServerName::try_from("::1").unwrap()
        );

        // Mutual TLS, and a fixed server name.
        let client = test_pki(&["gateway"]);
        c.cert_file = dir.write("client.pem", &client.cert_pem);
        c.key_file = dir.write("client.key", &client.key_pem);
        c.server_name = "rabbit.internal".into();
        let tls = BrokerTls::from_config(&c).unwrap().unwrap();
        assert!(tls.client_auth);
        assert_eq!(
            tls.server_name_for("10.0.0.1:61614").unwrap(),
            ServerName::try_from("rabbit.internal").unwrap()
        );
    }

    #[test]
    fn bad_files_name_the_key_and_file() {
        let dir = Dir::new("bad");
        let pki = test_pki(&["localhost"]);
        let other = test_pki(&["gateway"]);
        let good = tls_config(&dir, &pki);
        let not_pem = dir.write("not.pem", "hello\n");
        let key_only = dir.write("key-only.pem", &pki.key_pem);
        let cert_only = dir.write("cert-only.pem", &other.cert_pem);
        let garbage_cert = dir.write(
            "garbage.pem",
            "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n",
        );
        let encrypted = dir.write(
            "enc.pem",
            "-----BEGIN ENCRYPTED PRIVATE KEY-----\nAAAA\n-----END ENCRYPTED PRIVATE KEY-----\n",
        );
        let cases: Vec<(&str, &str, TlsConfig)> = vec![
            (
                "broker.tls.ca_file",
                "must be set",
                TlsConfig {
                    ca_file: String::new(),
                    ..good.clone()
                },
            ),
            (
                "broker.tls.ca_file",
                "cannot read",
                TlsConfig {
                    ca_file: "/nonexistent/ca.pem".into(),
                    ..good.clone()
                },
            ),
            (
                "broker.tls.ca_file",
                "not a PEM file",
                TlsConfig {
                    ca_file: not_pem.clone(),
                    ..good.clone()
                },
            ),
            (
                "broker.tls.ca_file",
                "contains no certificate",
                TlsConfig {
                    ca_file: key_only.clone(),
                    ..good.clone()
                },
            ),
            (
                "broker.tls.ca_file",
                "cannot be used as a CA certificate",
                TlsConfig {
                    ca_file: garbage_cert.clone(),
                    ..good.clone()
                },
            ),
            (
                "broker.tls.key_file",
                "must be set when broker.tls.cert_file is set",
                TlsConfig {
                    cert_file: cert_only.clone(),
                    ..good.clone()
                },
            ),
            (
                "broker.tls.cert_file",
                "must be set when broker.tls.key_file is set",
                TlsConfig {
                    key_file: key_only.clone(),
                    ..good.clone()
                },
            ),
            (
                "broker.tls.cert_file",
                "contains no certificate",
                TlsConfig {
                    cert_file: key_only.clone(),
                    key_file: key_only.clone(),
                    ..good.clone()
                },
            ),
            (
                "broker.tls.key_file",
                "contains no private key",
                TlsConfig {
                    cert_file: cert_only.clone(),
                    key_file: cert_only.clone(),
                    ..good.clone()
                },
            ),
            (
                "broker.tls.key_file",
                "encrypted",
                TlsConfig {
                    cert_file: cert_only.clone(),
                    key_file: encrypted.clone(),
                    ..good.clone()
                },
            ),
            (
                "broker.tls.key_file",
                "cannot be used with the certificate",
                TlsConfig {
                    // pki's key does not belong to other's certificate.
                    cert_file: cert_only.clone(),
                    key_file: key_only.clone(),
                    ..good.clone()
                },
            ),
            (
                "broker.tls.server_name",
                "not a DNS name or IP address",
                TlsConfig {
                    server_name: "not a name!".into(),
                    ..good.clone()
                },
            ),
        ];
        for (key, reason, config) in cases {
            let e = BrokerTls::from_config(&config).expect_err(key);
            assert_eq!(e.key(), key, "{e}");
            assert!(e.to_string().contains(reason), "{key}: {e}");
            assert!(e.reason().contains(reason), "{key}: {e}");
        }
    }

    /// A TLS acceptor with the certificate of `pki`.
    fn acceptor(pki: &TestPki) -> tokio_rustls::TlsAcceptor {
        let certs = CertificateDer::pem_slice_iter(pki.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .unwrap();
        let key = PrivateKeyDer::from_pem_slice(pki.key_pem.as_bytes()).unwrap();
        let config = rustls::ServerConfig::builder_with_provider(provider())
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(certs, key)
            .unwrap();
        tokio_rustls::TlsAcceptor::from(Arc::new(config))
    }

    /// A TLS terminator on 127.0.0.1 with the certificate of `pki`,
    /// forwarding each connection in plain text to `upstream`. Returns its
    /// address; runs until the test's runtime ends.
    pub(crate) async fn tls_terminator(pki: &TestPki, upstream: &str) -> String {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let acceptor = acceptor(pki);
        let upstream = upstream.to_owned();
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let acceptor = acceptor.clone();
                let upstream = upstream.clone();
                tokio::spawn(async move {
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let Ok(mut up) = TcpStream::connect(upstream.as_str()).await else {
                        return;
                    };
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                });
            }
        });
        addr
    }

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
