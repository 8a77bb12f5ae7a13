//! Owns TLS for the downstream listeners: loading certificates, SNI selection, session
//! resumption settings, and the self-signed development certificate.

use std::collections::HashMap;
use std::fmt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::server::{
    ClientHello, NoServerSessionStorage, ResolvesServerCert, ServerSessionMemoryCache,
};
use rustls::sign::CertifiedKey;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

use crate::config::TlsConfig;

/// TLS 1.2 session-cache entries kept for resumption (about 4 MiB at most).
const SESSION_CACHE_ENTRIES: usize = 16 * 1024;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("{path}: cannot read: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}: no PEM certificate found")]
    NoCertificate { path: PathBuf },
    #[error("{path}: no usable PEM private key (PKCS#8, RSA or EC): {reason}")]
    BadKey { path: PathBuf, reason: String },
    #[error("{cert}: certificate and key do not match or are unsupported: {reason}")]
    Mismatch { cert: PathBuf, reason: String },
    #[error("cannot write development certificate to {path}: {source}")]
    WriteDevCert {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot generate development certificate: {0}")]
    Generate(#[source] rcgen::Error),
    #[error("TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
}

/// Builds the rustls server configuration (ALPN h2 + http/1.1) from `[tls]`, generating the
/// development certificate first when neither the certificate nor the key file exists.
pub fn server_config(cfg: &TlsConfig) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    ensure_dev_cert(&cfg.cert, &cfg.key)?;
    let default = load_certified_key(&cfg.cert, &cfg.key)?;
    let mut by_name = HashMap::new();
    for sni in &cfg.sni {
        by_name.insert(
            sni.server_name.to_ascii_lowercase(),
            load_certified_key(&sni.cert, &sni.key)?,
        );
    }
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let mut config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()?
        .with_no_client_auth()
        .with_cert_resolver(Arc::new(SniResolver { default, by_name }));
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    // The server's cipher-suite order wins (testssl.sh: "no server cipher order"): kaproxy's
    // first suite the client offers (rustls' order: AES-256-GCM, AES-128-GCM, ChaCha20),
    // not the client's favourite. Every suite offered is strong either way.
    config.ignore_client_order = true;
    if cfg.session_resumption {
        config.session_storage = ServerSessionMemoryCache::new(SESSION_CACHE_ENTRIES);
        config.ticketer = rustls::crypto::ring::Ticketer::new()?;
    } else {
        config.session_storage = Arc::new(NoServerSessionStorage {});
        config.send_tls13_tickets = 0;
    }
    Ok(Arc::new(config))
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read {
        path: path.to_path_buf(),
        source,
    })
}

fn load_certified_key(cert: &Path, key: &Path) -> Result<Arc<CertifiedKey>, TlsError> {
    let pem = read(cert)?;
    let chain: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|_| TlsError::NoCertificate {
            path: cert.to_path_buf(),
        })?;
    if chain.is_empty() {
        return Err(TlsError::NoCertificate {
            path: cert.to_path_buf(),
        });
    }
    let key_pem = read(key)?;
    let key_der = PrivateKeyDer::from_pem_slice(&key_pem).map_err(|e| TlsError::BadKey {
        path: key.to_path_buf(),
        reason: e.to_string(),
    })?;
    let provider = rustls::crypto::ring::default_provider();
    let certified =
        CertifiedKey::from_der(chain, key_der, &provider).map_err(|e| TlsError::Mismatch {
            cert: cert.to_path_buf(),
            reason: e.to_string(),
        })?;
    Ok(Arc::new(certified))
}

/// Writes a self-signed ECDSA P-256 certificate for localhost/127.0.0.1 when neither file
/// exists. Never for production; logged loudly.
pub fn ensure_dev_cert(cert: &Path, key: &Path) -> Result<(), TlsError> {
    if cert.exists() || key.exists() {
        return Ok(());
    }
    let generated = rcgen::generate_simple_self_signed(vec![
        "localhost".to_string(),
        "127.0.0.1".to_string(),
        "::1".to_string(),
    ])
    .map_err(TlsError::Generate)?;
    for (path, contents) in [
        (cert, generated.cert.pem()),
        (key, generated.key_pair.serialize_pem()),
    ] {
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(|source| TlsError::WriteDevCert {
                path: path.to_path_buf(),
                source,
            })?;
        }
        std::fs::write(path, contents).map_err(|source| TlsError::WriteDevCert {
            path: path.to_path_buf(),
            source,
        })?;
    }
    tracing::warn!(cert = %cert.display(), key = %key.display(),
        "generated a SELF-SIGNED DEVELOPMENT certificate for localhost; never use it in production");
    Ok(())
}

/// Chooses a certificate by SNI server name, falling back to the default one.
struct SniResolver {
    default: Arc<CertifiedKey>,
    by_name: HashMap<String, Arc<CertifiedKey>>,
}

impl fmt::Debug for SniResolver {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("SniResolver")
            .field("names", &self.by_name.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl ResolvesServerCert for SniResolver {
    fn resolve(&self, hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        if let Some(name) = hello.server_name() {
            if let Some(key) = self.by_name.get(&name.to_ascii_lowercase()) {
                return Some(key.clone());
            }
        }
        Some(self.default.clone())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tls_config(dir: &Path) -> TlsConfig {
        TlsConfig {
            cert: dir.join("cert.pem"),
            key: dir.join("key.pem"),
            session_resumption: true,
            sni: Vec::new(),
        }
    }

    #[test]
    fn the_server_cipher_suite_order_wins() {
        let dir = tempfile::tempdir().unwrap();
        for resumption in [true, false] {
            let mut cfg = tls_config(dir.path());
            cfg.session_resumption = resumption;
            let config = server_config(&cfg).unwrap();
            assert!(config.ignore_client_order, "resumption {resumption}");
            assert_eq!(config.alpn_protocols, [&b"h2"[..], b"http/1.1"]);
        }
    }
}
