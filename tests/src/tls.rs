//! Broker TLS for the tests: certificates made with rcgen in a temporary
//! directory, and a TLS terminator that forwards plain text to RabbitMQ.
//!
//! ```text
//!  gateway ──TLS──▶ TlsTerminator (127.0.0.1:0, test CA) ──TCP──▶ RabbitMQ 61613 / 5672
//! ```

use anyhow::{Context, Result};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::{self, ServerConfig};
use tokio_rustls::TlsAcceptor;

/// A test CA and a server certificate it signed for `127.0.0.1` and
/// `localhost`, written as PEM files to a temporary directory that is
/// removed on drop.
#[derive(Debug)]
pub struct Pki {
    dir: PathBuf,
    /// The CA certificate (what the gateway trusts).
    pub ca_file: PathBuf,
    /// The server certificate (what the terminator presents).
    pub cert_file: PathBuf,
    /// The server certificate's private key (PKCS#8).
    pub key_file: PathBuf,
    cert_pem: String,
    key_pem: String,
}

impl Pki {
    /// A fresh CA and server certificate; `name` names the directory.
    pub fn generate(name: &str) -> Result<Pki> {
        let dir = std::env::temp_dir().join(crate::unique(&format!("e2e-tls-{name}")));
        std::fs::create_dir_all(&dir).with_context(|| format!("create {}", dir.display()))?;

        let ca_key = rcgen::KeyPair::generate()?;
        let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new())?;
        ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
        ca_params
            .distinguished_name
            .push(rcgen::DnType::CommonName, format!("e2e test CA {name}"));
        let ca = ca_params.self_signed(&ca_key)?;

        let key = rcgen::KeyPair::generate()?;
        let mut params =
            rcgen::CertificateParams::new(vec!["127.0.0.1".to_owned(), "localhost".to_owned()])?;
        params
            .distinguished_name
            .push(rcgen::DnType::CommonName, "localhost");
        let cert = params.signed_by(&key, &ca, &ca_key)?;

        let pki = Pki {
            ca_file: dir.join("ca.pem"),
            cert_file: dir.join("server.pem"),
            key_file: dir.join("server.key"),
            cert_pem: cert.pem(),
            key_pem: key.serialize_pem(),
            dir,
        };
        write(&pki.ca_file, &ca.pem())?;
        write(&pki.cert_file, &pki.cert_pem)?;
        write(&pki.key_file, &pki.key_pem)?;
        Ok(pki)
    }

    /// [`Pki::ca_file`] as a string, for a config value.
    pub fn ca_path(&self) -> String {
        self.ca_file.display().to_string()
    }

    /// The temporary directory holding the files.
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    fn acceptor(&self) -> Result<TlsAcceptor> {
        let certs = CertificateDer::pem_slice_iter(self.cert_pem.as_bytes())
            .collect::<Result<Vec<_>, _>>()
            .context("server certificate PEM")?;
        let key =
            PrivateKeyDer::from_pem_slice(self.key_pem.as_bytes()).context("server key PEM")?;
        let config =
            ServerConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
                .with_safe_default_protocol_versions()?
                .with_no_client_auth()
                .with_single_cert(certs, key)?;
        Ok(TlsAcceptor::from(Arc::new(config)))
    }
}

impl Drop for Pki {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn write(path: &Path, contents: &str) -> Result<()> {
    std::fs::write(path, contents).with_context(|| format!("write {}", path.display()))
}

/// A TLS server on `127.0.0.1:0` presenting the [`Pki`] server certificate,
/// forwarding every connection in plain text to an upstream (RabbitMQ's
/// STOMP or AMQP port). Stops on drop.
#[derive(Debug)]
pub struct TlsTerminator {
    addr: String,
    handshakes: Arc<AtomicUsize>,
    accept: JoinHandle<()>,
}

impl TlsTerminator {
    /// Listens and forwards to `upstream` (`host:port`).
    pub async fn start(pki: &Pki, upstream: &str) -> Result<TlsTerminator> {
        let acceptor = pki.acceptor()?;
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?.to_string();
        let handshakes = Arc::new(AtomicUsize::new(0));
        let upstream = upstream.to_owned();
        let done = Arc::clone(&handshakes);
        let accept = tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let (acceptor, upstream, done) =
                    (acceptor.clone(), upstream.clone(), Arc::clone(&done));
                tokio::spawn(async move {
                    let _ = tcp.set_nodelay(true);
                    // A client that does not trust us fails the handshake.
                    let Ok(mut tls) = acceptor.accept(tcp).await else {
                        return;
                    };
                    done.fetch_add(1, Ordering::SeqCst);
                    let Ok(mut up) = TcpStream::connect(upstream.as_str()).await else {
                        return;
                    };
                    let _ = up.set_nodelay(true);
                    let _ = tokio::io::copy_bidirectional(&mut tls, &mut up).await;
                });
            }
        });
        Ok(TlsTerminator {
            addr,
            handshakes,
            accept,
        })
    }

    /// `127.0.0.1:<port>`.
    pub fn address(&self) -> String {
        self.addr.clone()
    }

    /// The port it listens on.
    pub fn port(&self) -> u16 {
        self.addr
            .rsplit_once(':')
            .and_then(|(_, p)| p.parse().ok())
            .unwrap_or_default()
    }

    /// Completed TLS handshakes so far.
    pub fn handshakes(&self) -> usize {
        self.handshakes.load(Ordering::SeqCst)
    }
}

impl Drop for TlsTerminator {
    fn drop(&mut self) {
        self.accept.abort();
    }
}
