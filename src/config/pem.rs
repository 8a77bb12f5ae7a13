//! Owns reading the PEM files that upstream TLS names (`tls_ca`, `tls_client_cert`,
//! `tls_client_key`): validation reads them at load time, so that a missing or bad file is a
//! problem with its file, line and key (and a bad reload keeps the old config), and
//! `upstream::tls` builds its rustls configuration with the same functions, so both accept
//! exactly the same files.

use std::io::{self, Read};
use std::path::{Path, PathBuf};

use rustls::sign::CertifiedKey;
use rustls::RootCertStore;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, PrivateKeyDer};

/// The largest PEM file read: Mozilla's whole root set is about 250 KB as PEM. The limit, and
/// reading regular files only, keep a path such as `/dev/zero` or a FIFO from hanging a load.
pub const MAX_PEM_BYTES: u64 = 4 << 20;

/// Why a PEM file cannot be used; every message starts with the file's path.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("{}: cannot read: {source}", path.display())]
    Read { path: PathBuf, source: io::Error },
    #[error("{}: not a regular file", path.display())]
    NotAFile { path: PathBuf },
    #[error("{}: larger than {MAX_PEM_BYTES} bytes; not a PEM file", path.display())]
    TooLarge { path: PathBuf },
    #[error("{}: not a PEM certificate file: {source}", path.display())]
    BadPem {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{}: no PEM certificate found", path.display())]
    NoCertificate { path: PathBuf },
    #[error("{}: certificate #{index} is not usable as a CA: {source}", path.display())]
    BadCa {
        path: PathBuf,
        /// 1-based, in file order.
        index: usize,
        source: rustls::Error,
    },
    #[error("{}: no usable PEM private key (PKCS#8, RSA or EC): {source}", path.display())]
    BadKey {
        path: PathBuf,
        source: rustls_pki_types::pem::Error,
    },
    #[error("{}: does not match the certificate in {} (or its type is unsupported): {source}", key.display(), cert.display())]
    KeyMismatch {
        cert: PathBuf,
        key: PathBuf,
        source: rustls::Error,
    },
}

fn read(path: &Path) -> Result<Vec<u8>, PemError> {
    let io_error = |source| PemError::Read {
        path: path.to_path_buf(),
        source,
    };
    if !std::fs::metadata(path).map_err(io_error)?.is_file() {
        return Err(PemError::NotAFile {
            path: path.to_path_buf(),
        });
    }
    let mut bytes = Vec::new();
    std::fs::File::open(path)
        .and_then(|file| file.take(MAX_PEM_BYTES + 1).read_to_end(&mut bytes))
        .map_err(io_error)?;
    if bytes.len() as u64 > MAX_PEM_BYTES {
        return Err(PemError::TooLarge {
            path: path.to_path_buf(),
        });
    }
    Ok(bytes)
}

/// Every certificate of a PEM file, in order; at least one.
pub fn read_certificates(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let pem = read(path)?;
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<_, _>>()
        .map_err(|source| PemError::BadPem {
            path: path.to_path_buf(),
            source,
        })?;
    if certs.is_empty() {
        return Err(PemError::NoCertificate {
            path: path.to_path_buf(),
        });
    }
    Ok(certs)
}

/// A CA bundle as trust anchors: every certificate of the file must be one.
pub fn read_roots(path: &Path) -> Result<RootCertStore, PemError> {
    let mut roots = RootCertStore::empty();
    for (i, cert) in read_certificates(path)?.into_iter().enumerate() {
        roots.add(cert).map_err(|source| PemError::BadCa {
            path: path.to_path_buf(),
            index: i + 1,
            source,
        })?;
    }
    Ok(roots)
}

/// The first private key of a PEM file (PKCS#8, PKCS#1 RSA or SEC1 EC).
pub fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    let pem = read(path)?;
    PrivateKeyDer::from_pem_slice(&pem).map_err(|source| PemError::BadKey {
        path: path.to_path_buf(),
        source,
    })
}

/// A client certificate chain and its key, checked to belong together (the key's public key
/// is the leaf certificate's) and to be of a type the ring provider can sign with.
pub fn read_client_identity(
    cert: &Path,
    key: &Path,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), PemError> {
    let chain = read_certificates(cert)?;
    let key_der = read_private_key(key)?;
    let provider = rustls::crypto::ring::default_provider();
    CertifiedKey::from_der(chain.clone(), key_der.clone_key(), &provider).map_err(|source| {
        PemError::KeyMismatch {
            cert: cert.to_path_buf(),
            key: key.to_path_buf(),
            source,
        }
    })?;
    Ok((chain, key_der))
}
