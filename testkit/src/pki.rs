//! Owns the test PKI of the TLS tests: a CA made with rcgen, a server certificate it signs
//! (IP SAN 127.0.0.1, DNS SANs `localhost` and [`SERVER_DNS_NAME`]), a client certificate it
//! signs (for mutual TLS), and a second, unrelated CA (an "unknown CA"), written as PEM files
//! into a temporary directory that lives as long as the [`TestPki`].

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, Certificate, CertificateParams, DistinguishedName, DnType,
    ExtendedKeyUsagePurpose, IsCa, KeyPair, KeyUsagePurpose,
};

/// The DNS name, besides `localhost`, that the server certificate is valid for.
pub const SERVER_DNS_NAME: &str = "backend.test";

#[derive(Debug, thiserror::Error)]
pub enum PkiError {
    #[error("cannot generate a test certificate: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("cannot write {}: {source}", path.display())]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The PEM files of a test PKI (ECDSA P-256 keys, PKCS#8).
pub struct TestPki {
    dir: tempfile::TempDir,
    /// The CA that signs the server and client certificates.
    pub ca_cert: PathBuf,
    /// Valid for 127.0.0.1 (IP SAN), `localhost` and [`SERVER_DNS_NAME`]; serverAuth.
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    /// CN `kaproxy-test-client`; clientAuth.
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
    /// A CA that signed nothing here: trusting it alone, the server certificate is unknown.
    pub other_ca_cert: PathBuf,
}

impl TestPki {
    /// Generates every key and certificate and writes them as PEM into a new temp dir.
    pub fn generate() -> Result<TestPki, PkiError> {
        let dir = tempfile::Builder::new()
            .prefix("kaproxy-pki-")
            .tempdir()
            .map_err(|source| PkiError::Write {
                path: std::env::temp_dir(),
                source,
            })?;
        let (ca, ca_key) = new_ca("kaproxy test CA")?;
        let (other_ca, _) = new_ca("kaproxy unrelated test CA")?;
        let mut server = CertificateParams::new(vec![
            "127.0.0.1".to_string(),
            "localhost".to_string(),
            SERVER_DNS_NAME.to_string(),
        ])?;
        server.distinguished_name = name("kaproxy test backend");
        server.extended_key_usages = vec![ExtendedKeyUsagePurpose::ServerAuth];
        let server_key = KeyPair::generate()?;
        let server = server.signed_by(&server_key, &ca, &ca_key)?;
        let mut client = CertificateParams::new(Vec::<String>::new())?;
        client.distinguished_name = name("kaproxy-test-client");
        client.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
        let client_key = KeyPair::generate()?;
        let client = client.signed_by(&client_key, &ca, &ca_key)?;
        let root = dir.path();
        let pki = TestPki {
            ca_cert: write(root, "ca.pem", &ca.pem())?,
            server_cert: write(root, "server.pem", &server.pem())?,
            server_key: write(root, "server-key.pem", &server_key.serialize_pem())?,
            client_cert: write(root, "client.pem", &client.pem())?,
            client_key: write(root, "client-key.pem", &client_key.serialize_pem())?,
            other_ca_cert: write(root, "other-ca.pem", &other_ca.pem())?,
            dir,
        };
        Ok(pki)
    }

    /// The directory holding the files.
    pub fn dir(&self) -> &Path {
        self.dir.path()
    }
}

fn name(common_name: &str) -> DistinguishedName {
    let mut dn = DistinguishedName::new();
    dn.push(DnType::CommonName, common_name);
    dn
}

fn new_ca(common_name: &str) -> Result<(Certificate, KeyPair), PkiError> {
    let mut params = CertificateParams::new(Vec::<String>::new())?;
    params.distinguished_name = name(common_name);
    params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    let key = KeyPair::generate()?;
    let cert = params.self_signed(&key)?;
    Ok((cert, key))
}

fn write(dir: &Path, file: &str, pem: &str) -> Result<PathBuf, PkiError> {
    let path = dir.join(file);
    std::fs::write(&path, pem).map_err(|source| PkiError::Write {
        path: path.clone(),
        source,
    })?;
    Ok(path)
}
