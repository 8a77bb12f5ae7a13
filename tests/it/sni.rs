//! SNI: the certificate kaproxy presents is chosen by the server name the client asks for
//! (`[[tls.sni]]`), the default one otherwise; a reload swaps certificates for new connections.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use kaproxy::upstream::tls::AnyCertificate;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};

use crate::support::config_file::ConfigFile;

/// Bound on one TLS handshake.
const HANDSHAKE_BOUND: Duration = Duration::from_secs(5);

/// The leaf certificate kaproxy presents to a client that asks for `name` (an IP address:
/// no SNI extension at all). Any certificate is accepted: the tests compare it byte for byte.
async fn presented_cert(addr: SocketAddr, name: &str) -> Vec<u8> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()
        .expect("protocol versions")
        .dangerous()
        .with_custom_certificate_verifier(Arc::new(AnyCertificate::new(provider)))
        .with_no_client_auth();
    let server_name = ServerName::try_from(name.to_string()).expect("server name");
    let tcp = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let tls = tokio::time::timeout(
        HANDSHAKE_BOUND,
        tokio_rustls::TlsConnector::from(Arc::new(config)).connect(server_name, tcp),
    )
    .await
    .unwrap_or_else(|_| panic!("TLS handshake for {name} timed out"))
    .unwrap_or_else(|e| panic!("TLS handshake for {name}: {e}"));
    let certs = tls
        .get_ref()
        .1
        .peer_certificates()
        .expect("the server presented certificates");
    certs[0].as_ref().to_vec()
}

/// Writes a new self-signed certificate for `name` to `cert`/`key`; returns its DER.
fn write_cert(name: &str, cert: &Path, key: &Path) -> Vec<u8> {
    let generated =
        rcgen::generate_simple_self_signed(vec![name.to_string()]).expect("generate certificate");
    std::fs::write(cert, generated.cert.pem()).expect("write certificate");
    std::fs::write(key, generated.key_pair.serialize_pem()).expect("write key");
    generated.cert.der().as_ref().to_vec()
}

fn first_der(pem: &Path) -> Vec<u8> {
    CertificateDer::pem_file_iter(pem)
        .expect("read pem")
        .next()
        .expect("a certificate")
        .expect("parse pem")
        .as_ref()
        .to_vec()
}

fn sni_toml(file: &ConfigFile, names: &[&str]) -> String {
    let entries: Vec<String> = names
        .iter()
        .map(|n| {
            format!(
                "[[tls.sni]]\nserver_name = \"{n}\"\ncert = {:?}\nkey = {:?}\n",
                file.file(&format!("{n}.pem")).display().to_string(),
                file.file(&format!("{n}.key")).display().to_string()
            )
        })
        .collect();
    file.text(
        "https = \"127.0.0.1:0\"",
        &format!(
            "{}\n[upstreams.web]\nservers = [\"127.0.0.1:9\"]\n",
            entries.join("\n")
        ),
    )
}

async fn shutdown(server: kaproxy::Server) {
    let done = tokio::time::timeout(Duration::from_secs(10), server.shutdown()).await;
    assert!(done.is_ok(), "kaproxy shutdown took longer than 10 s");
}

#[tokio::test]
async fn sni_picks_the_certificate_for_the_server_name_and_the_default_otherwise() {
    let file = ConfigFile::new();
    let a = write_cert(
        "a.example.test",
        &file.file("a.example.test.pem"),
        &file.file("a.example.test.key"),
    );
    let b = write_cert(
        "b.example.test",
        &file.file("b.example.test.pem"),
        &file.file("b.example.test.key"),
    );
    file.write(&sni_toml(&file, &["a.example.test", "b.example.test"]));
    let server = file.start().await;
    let addr = server.https_addr().expect("https listener");
    let default = first_der(&file.cert_path());
    assert!(
        a != b && a != default && b != default,
        "three distinct certs"
    );

    let (got_a, got_b, got_other, got_ip) = tokio::join!(
        presented_cert(addr, "a.example.test"),
        presented_cert(addr, "b.example.test"),
        presented_cert(addr, "c.example.test"),
        presented_cert(addr, "127.0.0.1"),
    );
    assert!(got_a == a, "SNI a.example.test did not get certificate A");
    assert!(got_b == b, "SNI b.example.test did not get certificate B");
    assert!(
        got_other == default,
        "an unknown name did not get the default certificate"
    );
    assert!(
        got_ip == default,
        "no SNI did not get the default certificate"
    );
    shutdown(server).await;
}

#[tokio::test]
async fn reload_swaps_the_sni_certificate_for_new_connections() {
    let file = ConfigFile::new();
    let name = "a.example.test";
    let (cert, key) = (
        file.file("a.example.test.pem"),
        file.file("a.example.test.key"),
    );
    let old = write_cert(name, &cert, &key);
    file.write(&sni_toml(&file, &[name]));
    let server = file.start().await;
    let addr = server.https_addr().expect("https listener");
    assert!(presented_cert(addr, name).await == old, "certificate A");

    let new = write_cert(name, &cert, &key);
    assert!(new != old);
    server
        .reload()
        .await
        .unwrap_or_else(|e| panic!("reload: {e}"));
    assert!(
        presented_cert(addr, name).await == new,
        "a new connection after the reload did not get the renewed certificate"
    );
    shutdown(server).await;
}
