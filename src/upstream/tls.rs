//! Owns TLS to the backends (`tls = true` in `[upstreams.NAME]`; README, "TLS to the
//! backends"): the rustls client configuration of one upstream group built from its
//! [`UpstreamTlsConfig`] (CA roots, client certificate, verification, session resumption,
//! ALPN `http/1.1`), the handshake on a socket the connector has dialed
//! ([`UpstreamTls::connect`]), the accept-any verifier of `tls_verify = false` and
//! `kaproxy probe --tls` ([`AnyCertificate`]), and the startup warning for unverified groups
//! ([`warn_unverified`]). No dialing, no pooling, no metrics: the connector counts what
//! `connect` reports.

use std::collections::HashMap;
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};

use rustls::client::danger::{HandshakeSignatureValid, ServerCertVerified, ServerCertVerifier};
use rustls::client::Resumption;
use rustls::{CertificateError, ClientConfig, DigitallySignedStruct, HandshakeKind};
use rustls::{RootCertStore, SignatureScheme};
use rustls_pki_types::{CertificateDer, ServerName, UnixTime};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_rustls::client::TlsStream;
use tokio_rustls::TlsConnector;

use crate::config::pem;
use crate::config::{UpstreamConfig, UpstreamTlsConfig};
pub use crate::error::UpstreamTlsError;

/// Server names each server's session store remembers. A store serves one server, which is
/// verified under one name; the rest is room for a name changed by a reload.
const SESSION_NAMES_PER_SERVER: usize = 4;

/// The TLS client side of one upstream group. Cheap to clone (one `Arc`); build it again on
/// reload, since the files it was built from may have changed.
#[derive(Debug, Clone)]
pub struct UpstreamTls(Arc<Inner>);

#[derive(Debug)]
struct Inner {
    /// The group's rustls configuration; with resumption on, each server gets a copy of it
    /// with a session store of its own (see [`UpstreamTls::client_config_for`]).
    config: Arc<ClientConfig>,
    /// `tls_server_name`; None: each server's IP.
    server_name: Option<ServerName<'static>>,
    session_resumption: bool,
    /// The roots in use, for the unknown-CA message.
    roots: String,
    per_server: Mutex<HashMap<SocketAddr, Arc<ClientConfig>>>,
}

impl UpstreamTls {
    /// Builds the group's rustls client configuration (ring provider, TLS 1.2 and 1.3, ALPN
    /// `http/1.1`) from `cfg`, reading its files.
    pub fn new(cfg: &UpstreamTlsConfig) -> Result<UpstreamTls, UpstreamTlsError> {
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let builder = ClientConfig::builder_with_provider(provider.clone())
            .with_safe_default_protocol_versions()
            .map_err(UpstreamTlsError::Config)?;
        let (roots, roots_name) = match &cfg.ca {
            Some(path) => (pem::read_roots(path)?, format!("tls_ca {}", path.display())),
            None => (
                RootCertStore {
                    roots: webpki_roots::TLS_SERVER_ROOTS.to_vec(),
                },
                "the built-in webpki-roots; set tls_ca for a private CA".to_string(),
            ),
        };
        let builder = if cfg.verify {
            builder.with_root_certificates(roots)
        } else {
            builder
                .dangerous()
                .with_custom_certificate_verifier(Arc::new(AnyCertificate::new(provider)))
        };
        let mut config = match (&cfg.client_cert, &cfg.client_key) {
            (Some(cert), Some(key)) => {
                let (chain, key) = pem::read_client_identity(cert, key)?;
                builder
                    .with_client_auth_cert(chain, key)
                    .map_err(UpstreamTlsError::Config)?
            }
            (None, None) => builder.with_no_client_auth(),
            _ => return Err(UpstreamTlsError::IncompleteClientIdentity),
        };
        // kaproxy speaks HTTP/1.1 to backends; saying so lets a backend that also offers h2
        // pick the protocol kaproxy will use.
        config.alpn_protocols = vec![b"http/1.1".to_vec()];
        config.resumption = if cfg.session_resumption {
            Resumption::in_memory_sessions(SESSION_NAMES_PER_SERVER)
        } else {
            Resumption::disabled()
        };
        Ok(UpstreamTls(Arc::new(Inner {
            config: Arc::new(config),
            server_name: cfg.server_name.clone(),
            session_resumption: cfg.session_resumption,
            roots: roots_name,
            per_server: Mutex::default(),
        })))
    }

    /// The name a connection to `addr` is verified against: `tls_server_name`, else the
    /// server's IP (checked against an IP SAN; rustls sends no SNI for an IP, RFC 6066 §3).
    pub fn server_name_for(&self, addr: SocketAddr) -> ServerName<'static> {
        match &self.0.server_name {
            Some(name) => name.clone(),
            None => ServerName::IpAddress(addr.ip().into()),
        }
    }

    /// The rustls configuration used for `addr`. With resumption on, every server has its own
    /// session store: rustls keys its store by server name, and the servers of a group often
    /// share one (`tls_server_name`), so one store would offer a ticket of one Apache to
    /// another, which cannot resume it (unless they share ticket keys) and the ticket is lost.
    pub fn client_config_for(&self, addr: SocketAddr) -> Arc<ClientConfig> {
        if !self.0.session_resumption {
            return self.0.config.clone();
        }
        let mut per_server = crate::sync::lock(&self.0.per_server);
        per_server
            .entry(addr)
            .or_insert_with(|| {
                let mut config = (*self.0.config).clone();
                config.resumption = Resumption::in_memory_sessions(SESSION_NAMES_PER_SERVER);
                Arc::new(config)
            })
            .clone()
    }

    /// TLS over `io`, a connection the connector has just opened to `addr`: the handshake
    /// with the name of [`Self::server_name_for`]. Returns the stream and whether the session
    /// was resumed (for `kaproxy_upstream_tls_resumptions_total`). Not bounded in time: the
    /// caller bounds dialing and handshake together (`connect_timeout`).
    ///
    /// Under TLS 1.3 a backend that requires a client certificate and got none rejects it
    /// after the client's side of the handshake is done: that alert arrives with the first
    /// read, as an error whose chain holds rustls' `AlertReceived(CertificateRequired)` (see
    /// [`rustls_error_in`]).
    pub async fn connect<IO>(
        &self,
        io: IO,
        addr: SocketAddr,
    ) -> Result<(TlsStream<IO>, bool), UpstreamTlsError>
    where
        IO: AsyncRead + AsyncWrite + Unpin,
    {
        let name = self.server_name_for(addr);
        let connector = TlsConnector::from(self.client_config_for(addr));
        let stream = connector
            .connect(name.clone(), io)
            .await
            .map_err(|err| self.handshake_error(&name, err))?;
        let resumed = stream.get_ref().1.handshake_kind() == Some(HandshakeKind::Resumed);
        Ok((stream, resumed))
    }

    /// Sorts a failed handshake: an unknown CA, a name mismatch, another TLS failure, or the
    /// connection failing under it.
    fn handshake_error(&self, name: &ServerName<'_>, err: io::Error) -> UpstreamTlsError {
        let name = name.to_str().into_owned();
        let Some(source) = err
            .get_ref()
            .and_then(|e| e.downcast_ref::<rustls::Error>())
            .cloned()
        else {
            return UpstreamTlsError::Io { name, source: err };
        };
        match &source {
            rustls::Error::InvalidCertificate(CertificateError::UnknownIssuer) => {
                UpstreamTlsError::UnknownCa {
                    roots: self.0.roots.clone(),
                    source,
                }
            }
            rustls::Error::InvalidCertificate(
                CertificateError::NotValidForName | CertificateError::NotValidForNameContext { .. },
            ) => UpstreamTlsError::NameMismatch { name, source },
            _ => UpstreamTlsError::Handshake { name, source },
        }
    }
}

pub use crate::error::rustls_error_in;

/// Logs a loud warning for every upstream group with `tls_verify = false` (start and reload
/// call it; `check` shows the same as a WARN row). Returns the names of those groups.
pub fn warn_unverified(upstreams: &[UpstreamConfig]) -> Vec<&str> {
    let unverified: Vec<&str> = upstreams
        .iter()
        .filter(|u| u.tls.as_ref().is_some_and(|tls| !tls.verify))
        .map(|u| u.name.as_str())
        .collect();
    for name in &unverified {
        tracing::warn!(upstream = %name,
            "tls_verify = false: backend certificates are NOT verified; anyone on the path to these backends can impersonate them. Set tls_verify = true and tls_ca");
    }
    unverified
}

/// A client-side verifier that accepts any server certificate (the handshake signatures are
/// still checked, so the peer holds the key of the certificate it sent). For
/// `tls_verify = false` (warned about at start and by `check`) and for tools that measure
/// timing and do not authenticate: `kaproxy probe --tls` and `kaproxy-bench --insecure`.
#[derive(Debug)]
pub struct AnyCertificate(Arc<rustls::crypto::CryptoProvider>);

impl AnyCertificate {
    pub fn new(provider: Arc<rustls::crypto::CryptoProvider>) -> Self {
        AnyCertificate(provider)
    }
}

impl ServerCertVerifier for AnyCertificate {
    fn verify_server_cert(
        &self,
        _: &CertificateDer<'_>,
        _: &[CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: UnixTime,
    ) -> Result<ServerCertVerified, rustls::Error> {
        Ok(ServerCertVerified::assertion())
    }

    fn verify_tls12_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn verify_tls13_signature(
        &self,
        message: &[u8],
        cert: &CertificateDer<'_>,
        dss: &DigitallySignedStruct,
    ) -> Result<HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(
            message,
            cert,
            dss,
            &self.0.signature_verification_algorithms,
        )
    }

    fn supported_verify_schemes(&self) -> Vec<SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use kaproxy_testkit::pki::{TestPki, SERVER_DNS_NAME};
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::PrivateKeyDer;
    use rustls::server::WebPkiClientVerifier;
    use rustls::{AlertDescription, ServerConfig};
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};
    use tokio::task::JoinHandle;

    /// What the test server sends right after a handshake; reading it on the client also
    /// takes in the session tickets sent before it, and any post-handshake alert.
    const GREETING: &[u8] = b"ok";

    /// A tokio-rustls server on 127.0.0.1:0 with the test PKI's server certificate; stops
    /// when dropped.
    struct TestServer {
        addr: SocketAddr,
        task: JoinHandle<()>,
    }

    impl Drop for TestServer {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    impl TestServer {
        /// `client_ca`: require a client certificate signed by it. `tickets`: TLS 1.3 session
        /// tickets sent after each handshake.
        async fn start(pki: &TestPki, client_ca: Option<&std::path::Path>, tickets: usize) -> Self {
            let provider = Arc::new(rustls::crypto::ring::default_provider());
            let builder = ServerConfig::builder_with_provider(provider.clone())
                .with_safe_default_protocol_versions()
                .unwrap();
            let builder = match client_ca {
                Some(ca) => {
                    let roots = Arc::new(pem::read_roots(ca).unwrap());
                    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider)
                        .build()
                        .unwrap();
                    builder.with_client_cert_verifier(verifier)
                }
                None => builder.with_no_client_auth(),
            };
            let chain = pem::read_certificates(&pki.server_cert).unwrap();
            let key = PrivateKeyDer::from_pem_file(&pki.server_key).unwrap();
            let mut config = builder.with_single_cert(chain, key).unwrap();
            config.send_tls13_tickets = tickets;
            let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
            let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap();
            let task = tokio::spawn(async move {
                loop {
                    let Ok((tcp, _)) = listener.accept().await else {
                        return;
                    };
                    let acceptor = acceptor.clone();
                    tokio::spawn(async move {
                        if let Ok(mut tls) = acceptor.accept(tcp).await {
                            let _ = tls.write_all(GREETING).await;
                            let _ = tls.flush().await;
                            let mut rest = Vec::new();
                            let _ = tls.read_to_end(&mut rest).await;
                        }
                    });
                }
            });
            TestServer { addr, task }
        }
    }

    fn verified_by(pki: &TestPki) -> UpstreamTlsConfig {
        UpstreamTlsConfig {
            ca: Some(pki.ca_cert.clone()),
            ..UpstreamTlsConfig::new()
        }
    }

    /// Connects, reads the greeting; returns whether the session was resumed, or the error
    /// of the handshake or (a post-handshake alert) of the read.
    async fn exchange(tls: &UpstreamTls, addr: SocketAddr) -> Result<bool, String> {
        let tcp = TcpStream::connect(addr).await.unwrap();
        let (mut stream, resumed) = tls.connect(tcp, addr).await.map_err(|e| e.to_string())?;
        let mut greeting = [0; GREETING.len()];
        match stream.read_exact(&mut greeting).await {
            Ok(_) if greeting == GREETING => Ok(resumed),
            Ok(_) => Err(format!("unexpected greeting {greeting:?}")),
            Err(e) => Err(match rustls_error_in(&e) {
                Some(tls) => format!("rustls after the handshake: {tls}"),
                None => format!("not a TLS error after the handshake: {e}"),
            }),
        }
    }

    #[tokio::test]
    async fn verifies_the_backend_by_its_ip_or_its_dns_name_against_tls_ca() {
        let pki = TestPki::generate().unwrap();
        let server = TestServer::start(&pki, None, 2).await;
        let by_ip = UpstreamTls::new(&verified_by(&pki)).unwrap();
        assert_eq!(
            by_ip.server_name_for(server.addr).to_str(),
            "127.0.0.1",
            "the default name is the server's IP"
        );
        assert_eq!(exchange(&by_ip, server.addr).await, Ok(false));
        let by_name = UpstreamTls::new(&UpstreamTlsConfig {
            server_name: Some(ServerName::try_from(SERVER_DNS_NAME).unwrap()),
            ..verified_by(&pki)
        })
        .unwrap();
        assert_eq!(exchange(&by_name, server.addr).await, Ok(false));
    }

    #[tokio::test]
    async fn a_wrong_server_name_fails_and_the_error_names_it() {
        let pki = TestPki::generate().unwrap();
        let server = TestServer::start(&pki, None, 2).await;
        let tls = UpstreamTls::new(&UpstreamTlsConfig {
            server_name: Some(ServerName::try_from("wrong.example").unwrap()),
            ..verified_by(&pki)
        })
        .unwrap();
        let tcp = TcpStream::connect(server.addr).await.unwrap();
        let err = tls.connect(tcp, server.addr).await.unwrap_err();
        assert!(
            matches!(&err, UpstreamTlsError::NameMismatch { name, .. } if name == "wrong.example"),
            "{err:?}"
        );
        assert!(err.to_string().contains("wrong.example"), "{err}");
    }

    #[tokio::test]
    async fn an_unknown_ca_fails_with_tls_ca_or_the_built_in_roots() {
        let pki = TestPki::generate().unwrap();
        let server = TestServer::start(&pki, None, 2).await;
        let other = UpstreamTls::new(&UpstreamTlsConfig {
            ca: Some(pki.other_ca_cert.clone()),
            ..UpstreamTlsConfig::new()
        })
        .unwrap();
        let built_in = UpstreamTls::new(&UpstreamTlsConfig::new()).unwrap();
        for (tls, roots) in [(other, "other-ca.pem"), (built_in, "webpki-roots")] {
            let tcp = TcpStream::connect(server.addr).await.unwrap();
            let err = tls.connect(tcp, server.addr).await.unwrap_err();
            assert!(
                matches!(&err, UpstreamTlsError::UnknownCa { .. }),
                "{err:?}"
            );
            assert!(err.to_string().contains(roots), "{err}");
        }
    }

    #[tokio::test]
    async fn verify_false_accepts_a_certificate_of_an_unknown_ca() {
        let pki = TestPki::generate().unwrap();
        let server = TestServer::start(&pki, None, 2).await;
        let tls = UpstreamTls::new(&UpstreamTlsConfig {
            verify: false,
            server_name: Some(ServerName::try_from("any.example").unwrap()),
            ..UpstreamTlsConfig::new()
        })
        .unwrap();
        assert_eq!(exchange(&tls, server.addr).await, Ok(false));
    }

    #[tokio::test]
    async fn mutual_tls_works_with_the_client_certificate_and_is_refused_without() {
        let pki = TestPki::generate().unwrap();
        let server = TestServer::start(&pki, Some(&pki.ca_cert), 2).await;
        let with_cert = UpstreamTls::new(&UpstreamTlsConfig {
            client_cert: Some(pki.client_cert.clone()),
            client_key: Some(pki.client_key.clone()),
            ..verified_by(&pki)
        })
        .unwrap();
        assert_eq!(exchange(&with_cert, server.addr).await, Ok(false));
        let without = UpstreamTls::new(&verified_by(&pki)).unwrap();
        let refused = exchange(&without, server.addr).await.unwrap_err();
        // TLS 1.3: the server's alert comes after the client's side of the handshake.
        let alert = rustls::Error::AlertReceived(AlertDescription::CertificateRequired);
        assert_eq!(refused, format!("rustls after the handshake: {alert}"));
    }

    #[tokio::test]
    async fn the_second_connect_resumes_unless_resumption_is_off() {
        let pki = TestPki::generate().unwrap();
        let server = TestServer::start(&pki, None, 2).await;
        let tls = UpstreamTls::new(&verified_by(&pki)).unwrap();
        assert_eq!(exchange(&tls, server.addr).await, Ok(false), "first: full");
        assert_eq!(
            exchange(&tls, server.addr).await,
            Ok(true),
            "second: resumed"
        );
        // A clone shares the sessions.
        assert_eq!(exchange(&tls.clone(), server.addr).await, Ok(true));
        let off = UpstreamTls::new(&UpstreamTlsConfig {
            session_resumption: false,
            ..verified_by(&pki)
        })
        .unwrap();
        assert_eq!(exchange(&off, server.addr).await, Ok(false));
        assert_eq!(exchange(&off, server.addr).await, Ok(false));
    }

    #[tokio::test]
    async fn servers_that_share_a_name_keep_their_own_sessions() {
        // One ticket per handshake: had the two servers one session store (rustls keys it by
        // name), b would use up a's only ticket and a's next handshake could not resume.
        let pki = TestPki::generate().unwrap();
        let (a, b) = (
            TestServer::start(&pki, None, 1).await,
            TestServer::start(&pki, None, 1).await,
        );
        let tls = UpstreamTls::new(&UpstreamTlsConfig {
            server_name: Some(ServerName::try_from(SERVER_DNS_NAME).unwrap()),
            ..verified_by(&pki)
        })
        .unwrap();
        assert_eq!(exchange(&tls, a.addr).await, Ok(false));
        assert_eq!(exchange(&tls, b.addr).await, Ok(false));
        assert_eq!(exchange(&tls, a.addr).await, Ok(true), "a resumes its own");
        assert_eq!(exchange(&tls, b.addr).await, Ok(true), "b resumes its own");
    }

    #[tokio::test]
    async fn a_backend_that_does_not_speak_tls_is_a_handshake_error() {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let plain = tokio::spawn(async move {
            let (mut tcp, _) = listener.accept().await.unwrap();
            let _ = tcp
                .write_all(b"HTTP/1.1 400 Bad Request\r\nContent-Length: 0\r\n\r\n")
                .await;
        });
        let tls = UpstreamTls::new(&UpstreamTlsConfig::new()).unwrap();
        let tcp = TcpStream::connect(addr).await.unwrap();
        let err = tls.connect(tcp, addr).await.unwrap_err();
        assert!(matches!(err, UpstreamTlsError::Handshake { .. }), "{err:?}");
        plain.await.unwrap();
    }

    #[test]
    fn bad_files_and_half_a_client_identity_are_refused_by_new() {
        let pki = TestPki::generate().unwrap();
        let missing = pki.dir().join("missing-ca.pem");
        let err = UpstreamTls::new(&UpstreamTlsConfig {
            ca: Some(missing.clone()),
            ..UpstreamTlsConfig::new()
        })
        .unwrap_err();
        assert!(
            err.to_string().starts_with(&missing.display().to_string()),
            "{err}"
        );
        let err = UpstreamTls::new(&UpstreamTlsConfig {
            client_cert: Some(pki.client_cert.clone()),
            ..verified_by(&pki)
        })
        .unwrap_err();
        assert!(
            matches!(err, UpstreamTlsError::IncompleteClientIdentity),
            "{err:?}"
        );
        let err = UpstreamTls::new(&UpstreamTlsConfig {
            client_cert: Some(pki.client_cert.clone()),
            client_key: Some(pki.server_key.clone()),
            ..verified_by(&pki)
        })
        .unwrap_err();
        assert!(err.to_string().contains("does not match"), "{err}");
    }

    #[test]
    fn only_groups_with_tls_verify_false_are_warned_about() {
        let src = r#"
[listen]
http = "127.0.0.1:8080"
[upstreams.plain]
servers = ["127.0.0.1:8081"]
[upstreams.checked]
servers = ["127.0.0.1:8443"]
tls = true
[upstreams.unchecked]
servers = ["127.0.0.1:8444"]
tls = true
tls_verify = false
[[routes]]
upstream = "plain"
"#;
        let config =
            crate::config::Config::from_toml_str(src, std::path::Path::new("t.toml")).unwrap();
        assert_eq!(warn_unverified(&config.upstreams), ["unchecked"]);
    }
}
