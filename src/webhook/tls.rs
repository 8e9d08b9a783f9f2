//! The served certificate: a rustls resolver whose certificate is swapped in
//! place when the Secret changes, so a rotation needs no restart and drops
//! no connection (established ones keep their session).

use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;

use super::Error;

/// Serves whatever certificate was loaded last (none: handshakes fail,
/// which the API server treats as the webhook being down).
#[derive(Debug, Default)]
pub struct ReloadingResolver {
    current: RwLock<Option<Arc<CertifiedKey>>>,
}

impl ReloadingResolver {
    /// Swaps in a new certificate.
    pub fn set(&self, key: Arc<CertifiedKey>) {
        if let Ok(mut current) = self.current.write() {
            *current = Some(key);
        }
    }
}

impl ResolvesServerCert for ReloadingResolver {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        self.current.read().ok().and_then(|c| c.clone())
    }
}

/// The process's crypto provider: aws-lc-rs, always (never ring).
pub fn provider() -> Arc<CryptoProvider> {
    Arc::new(rustls::crypto::aws_lc_rs::default_provider())
}

/// A certified key from PEM: the certificate chain (leaf first) and its
/// private key.
pub fn certified_key(cert_pem: &[u8], key_pem: &[u8]) -> Result<CertifiedKey, Error> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(cert_pem)
        .collect::<Result<_, _>>()
        .map_err(|e| Error::certificate("reading tls.crt", e))?;
    if chain.is_empty() {
        return Err(Error::Certificate {
            reason: "tls.crt holds no certificate".into(),
            source: None,
        });
    }
    let key = PrivateKeyDer::from_pem_slice(key_pem)
        .map_err(|e| Error::certificate("reading tls.key", e))?;
    let signing = provider()
        .key_provider
        .load_private_key(key)
        .map_err(|e| Error::certificate("loading tls.key", e))?;
    let certified = CertifiedKey::new(chain, signing);
    certified
        .keys_match()
        .map_err(|e| Error::certificate("tls.key does not match tls.crt", e))?;
    Ok(certified)
}

/// The server configuration: TLS 1.2+ with aws-lc-rs, the certificate from
/// `resolver`, and HTTP/1.1 only. The API server keeps its connections to a
/// webhook alive either way; over HTTP/2 its Go client took longer per call
/// (`make bench`, 1,000 Pod creations: p50 6.95 ms with h2 offered, 6.3–6.9 ms
/// without, side by side with Google's operator, whose controller-runtime also
/// serves HTTP/1.1 only), and HTTP/2 adds attack surface (rapid reset) for
/// nothing a webhook needs.
pub fn server_config(resolver: Arc<ReloadingResolver>) -> Result<rustls::ServerConfig, Error> {
    let mut config = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .map_err(|e| Error::certificate("TLS configuration", e))?
        .with_no_client_auth()
        .with_cert_resolver(resolver);
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Ok(config)
}
