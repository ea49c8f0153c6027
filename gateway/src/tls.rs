//! Certificate loading and the TLS client settings built from it: the CA
//! bundles, client certificates and keys of `[broker.tls]` and `[amqp.tls]`,
//! read and checked once at start (every error names its key and file).
//!
//! [`BrokerTls`] is the rustls client side of the STOMP broker connections;
//! [`amqp_tls_config`] the lapin settings for `amqps://` URLs.

use crate::config::{AmqpTlsConfig, TlsConfig};
use lapin::tcp::{OwnedIdentity, OwnedTLSConfig};
use std::fmt;
use std::io;
use std::sync::Arc;
use tokio::net::TcpStream;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{self, ClientConfig, RootCertStore};
use tokio_rustls::TlsConnector;

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
    /// reason (see [`crate::broker::BrokerError::Tls`]).
    pub(crate) async fn handshake(
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

/// The lapin TLS settings for `amqps://` URLs from `[amqp.tls]`: the CA
/// bundle (trusted on top of the public roots built into the binary) and
/// the client certificate and key, each read and checked. Plain `amqp://`
/// URLs ignore it.
pub fn amqp_tls_config(tls: &AmqpTlsConfig) -> Result<OwnedTLSConfig, TlsError> {
    let cert_chain = if tls.ca_file.is_empty() {
        None
    } else {
        load_ca_certificates("amqp.tls.ca_file", &tls.ca_file)?;
        Some(read_text("amqp.tls.ca_file", &tls.ca_file)?)
    };
    let identity = match load_client_identity("amqp.tls", &tls.cert_file, &tls.key_file)? {
        None => None,
        Some(_) => Some(OwnedIdentity::PKCS8 {
            pem: read_text("amqp.tls.cert_file", &tls.cert_file)?.into_bytes(),
            key: read_text("amqp.tls.key_file", &tls.key_file)?.into_bytes(),
        }),
    };
    Ok(OwnedTLSConfig {
        identity,
        cert_chain,
    })
}

fn read_text(key: &str, path: &str) -> Result<String, TlsError> {
    std::fs::read_to_string(path).map_err(|e| TlsError::Read {
        key: key.to_owned(),
        path: path.to_owned(),
        reason: e.to_string(),
    })
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
pub(crate) mod tests {
    use super::*;
    use std::io::Write as _;
    use std::path::PathBuf;
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

    /// A TLS acceptor with the certificate of `pki`.
    pub(crate) fn acceptor(pki: &TestPki) -> tokio_rustls::TlsAcceptor {
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

    pub(crate) fn tls_config(dir: &Dir, pki: &TestPki) -> TlsConfig {
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

    #[test]
    fn tls_config_reads_and_checks_the_files() {
        let dir = Dir::new("amqp-tls");
        let pki = test_pki(&["127.0.0.1"]);
        let ca = dir.write("ca.pem", &pki.ca_pem);
        let cert = dir.write("cert.pem", &pki.cert_pem);
        let key = dir.write("key.pem", &pki.key_pem);
        assert_eq!(
            amqp_tls_config(&AmqpTlsConfig::default()).unwrap(),
            OwnedTLSConfig::default()
        );
        let t = amqp_tls_config(&AmqpTlsConfig {
            ca_file: ca.clone(),
            cert_file: cert.clone(),
            key_file: key.clone(),
        })
        .unwrap();
        assert_eq!(t.cert_chain.as_deref(), Some(pki.ca_pem.as_str()));
        assert_eq!(
            t.identity,
            Some(OwnedIdentity::PKCS8 {
                pem: pki.cert_pem.clone().into_bytes(),
                key: pki.key_pem.clone().into_bytes(),
            })
        );
        let e = amqp_tls_config(&AmqpTlsConfig {
            ca_file: key.clone(),
            ..AmqpTlsConfig::default()
        })
        .unwrap_err();
        assert_eq!(e.key(), "amqp.tls.ca_file", "{e}");
        let e = amqp_tls_config(&AmqpTlsConfig {
            key_file: key,
            ..AmqpTlsConfig::default()
        })
        .unwrap_err();
        assert_eq!(e.key(), "amqp.tls.cert_file", "{e}");
    }
}
