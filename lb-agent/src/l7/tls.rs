//! TLS termination: certificates from PEM files, the one for the client's SNI name (the first
//! certificate when the name is missing or unknown), ALPN h2 and http/1.1, TLS 1.2 and 1.3
//! with the ring provider. A reload builds a new config for new handshakes; connections
//! already open keep theirs.
use std::sync::Arc;

use anyhow::{anyhow, bail, Context as _, Result};
use rustls::{
    server::{ClientHello, ResolvesServerCert},
    sign::CertifiedKey,
    ServerConfig,
};
use rustls_pki_types::{pem::PemObject as _, CertificateDer, PrivateKeyDer, ServerName};

use crate::config::l7::CertConfig;

#[derive(Debug)]
struct BySni {
    certs: Vec<Arc<CertifiedKey>>,
}

impl ResolvesServerCert for BySni {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        let wanted = hello.server_name().and_then(|n| ServerName::try_from(n).ok());
        let matching = wanted.and_then(|name| {
            self.certs.iter().find(|ck| {
                ck.end_entity_cert()
                    .ok()
                    .and_then(|der| webpki::EndEntityCert::try_from(der).ok())
                    .is_some_and(|ee| ee.verify_is_valid_for_subject_name(&name).is_ok())
            })
        });
        matching.or(self.certs.first()).cloned()
    }
}

fn load(cert: &CertConfig, provider: &rustls::crypto::CryptoProvider) -> Result<Arc<CertifiedKey>> {
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(&cert.cert)
        .with_context(|| format!("cannot read certificates from {}", cert.cert.display()))?
        .collect::<Result<_, _>>()
        .with_context(|| format!("bad PEM in {}", cert.cert.display()))?;
    if chain.is_empty() {
        bail!("{} holds no certificate", cert.cert.display());
    }
    let key = PrivateKeyDer::from_pem_file(&cert.key)
        .with_context(|| format!("cannot read a private key from {}", cert.key.display()))?;
    let key = provider
        .key_provider
        .load_private_key(key)
        .map_err(|e| anyhow!("unusable private key in {}: {e}", cert.key.display()))?;
    let ck = CertifiedKey::new(chain, key);
    ck.keys_match().map_err(|e| anyhow!("{} does not belong to {}: {e}", cert.key.display(), cert.cert.display()))?;
    Ok(Arc::new(ck))
}

/// The server config of an https service; fails with the file and the reason.
pub fn server_config(certs: &[CertConfig]) -> Result<Arc<ServerConfig>> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let certs = certs.iter().map(|c| load(c, &provider)).collect::<Result<Vec<_>>>()?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13, &rustls::version::TLS12])
        .map_err(|e| anyhow!("TLS versions: {e}"))?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(BySni { certs }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}
