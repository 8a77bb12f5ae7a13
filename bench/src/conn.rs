//! Owns the client side of one load-generator connection: the target URL, TCP connect from a
//! chosen loopback source address, TLS (rustls, ring), the HTTP/1.1 or HTTP/2 handshake, and one
//! request/response exchange with the body read to its end.

use std::net::{IpAddr, SocketAddr};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use bytes::Bytes;
use http::header::{HeaderMap, HeaderName, HeaderValue, HOST};
use http::{Method, Request, Uri};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::{http1, http2};
use hyper_util::rt::{TokioExecutor, TokioIo};
use kaproxy::upstream::tls::AnyCertificate;
use kaproxy_testkit::client::connect_from;
use rustls::client::Resumption;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls_pki_types::pem::PemObject;

use crate::args::SourceIps;

pub type BoxError = Box<dyn std::error::Error + Send + Sync>;

/// The CA bundle used for `https://` targets when neither `--cacert` nor `--insecure` is given.
const SYSTEM_CA_BUNDLE: &str = "/etc/ssl/certs/ca-certificates.crt";

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HttpVersion {
    Http1,
    Http2,
}

impl HttpVersion {
    pub fn label(self) -> &'static str {
        match self {
            HttpVersion::Http1 => "HTTP/1.1",
            HttpVersion::Http2 => "HTTP/2",
        }
    }
}

/// A parsed `http://` or `https://` URL.
#[derive(Debug, Clone)]
pub struct Target {
    pub tls: bool,
    pub host: String,
    pub port: u16,
    /// `host[:port]` as written, for `Host` / `:authority`.
    pub authority: String,
    pub path_and_query: String,
}

impl Target {
    pub fn parse(url: &str) -> anyhow::Result<Target> {
        let uri: Uri = url.parse().with_context(|| format!("bad URL {url:?}"))?;
        let tls = match uri.scheme_str() {
            Some("http") => false,
            Some("https") => true,
            _ => bail!("URL {url:?} must start with http:// or https://"),
        };
        let authority = uri
            .authority()
            .ok_or_else(|| anyhow!("URL {url:?} has no host"))?;
        let host = authority.host().trim_matches(|c| c == '[' || c == ']');
        Ok(Target {
            tls,
            host: host.to_string(),
            port: authority.port_u16().unwrap_or(if tls { 443 } else { 80 }),
            authority: authority.as_str().to_string(),
            path_and_query: uri
                .path_and_query()
                .map(|p| p.as_str().to_string())
                .unwrap_or_else(|| "/".to_string()),
        })
    }

    pub fn url(&self) -> String {
        format!(
            "{}://{}{}",
            if self.tls { "https" } else { "http" },
            self.authority,
            self.path_and_query
        )
    }
}

/// How TLS targets are verified and whether sessions are resumed.
#[derive(Debug, Clone, Default)]
pub struct TlsOptions {
    /// Accept any certificate (the development certificate, self-signed test certificates).
    pub insecure: bool,
    /// Trust these PEM certificates instead of the system bundle.
    pub cacert: Option<PathBuf>,
    /// Turn off TLS session resumption, so every new connection is a full handshake.
    pub no_resume: bool,
}

/// Opens connections to one target; shared by every worker of a run.
pub struct Connector {
    addr: SocketAddr,
    tls: Option<(tokio_rustls::TlsConnector, ServerName<'static>)>,
    version: HttpVersion,
    source_ips: Option<SourceIps>,
    next_source: AtomicU64,
}

impl Connector {
    pub async fn new(
        target: &Target,
        version: HttpVersion,
        tls: &TlsOptions,
        source_ips: Option<SourceIps>,
    ) -> anyhow::Result<Connector> {
        let addr = tokio::net::lookup_host((target.host.as_str(), target.port))
            .await
            .with_context(|| format!("resolving {}", target.host))?
            .find(|a| source_ips.is_none() || a.is_ipv4())
            .ok_or_else(|| anyhow!("{} resolves to no usable address", target.host))?;
        let tls = match target.tls {
            false => None,
            true => {
                let config = client_tls_config(version, tls)?;
                let name = ServerName::try_from(target.host.clone())
                    .with_context(|| format!("bad TLS server name {:?}", target.host))?;
                Some((tokio_rustls::TlsConnector::from(Arc::new(config)), name))
            }
        };
        Ok(Connector {
            addr,
            tls,
            version,
            source_ips,
            next_source: AtomicU64::new(0),
        })
    }

    pub fn version(&self) -> HttpVersion {
        self.version
    }

    /// TCP connect (from the next source address, if any), TLS, then the HTTP handshake.
    pub async fn connect(&self) -> Result<Sender, BoxError> {
        let source = self.source_ips.as_ref().map(|ips| {
            let i = self.next_source.fetch_add(1, Ordering::Relaxed);
            IpAddr::V4(ips.nth(i))
        });
        let stream = connect_from(self.addr, source).await?;
        match &self.tls {
            None => handshake(TokioIo::new(stream), self.version).await,
            Some((connector, name)) => {
                let tls = connector.connect(name.clone(), stream).await?;
                if self.version == HttpVersion::Http2
                    && tls.get_ref().1.alpn_protocol() != Some(b"h2")
                {
                    return Err("server did not negotiate h2 over ALPN".into());
                }
                handshake(TokioIo::new(tls), self.version).await
            }
        }
    }
}

pub(crate) fn client_tls_config(
    version: HttpVersion,
    opts: &TlsOptions,
) -> anyhow::Result<rustls::ClientConfig> {
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let builder = rustls::ClientConfig::builder_with_provider(provider.clone())
        .with_safe_default_protocol_versions()?;
    let mut config = if opts.insecure {
        builder
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyCertificate::new(provider)))
            .with_no_client_auth()
    } else {
        let path = opts
            .cacert
            .clone()
            .unwrap_or_else(|| PathBuf::from(SYSTEM_CA_BUNDLE));
        let mut roots = rustls::RootCertStore::empty();
        for cert in CertificateDer::pem_file_iter(&path)
            .with_context(|| format!("reading CA certificates from {}", path.display()))?
        {
            let cert = cert.with_context(|| format!("parsing {}", path.display()))?;
            roots
                .add(cert)
                .with_context(|| format!("adding a CA certificate from {}", path.display()))?;
        }
        builder.with_root_certificates(roots).with_no_client_auth()
    };
    config.alpn_protocols = match version {
        HttpVersion::Http1 => vec![b"http/1.1".to_vec()],
        HttpVersion::Http2 => vec![b"h2".to_vec()],
    };
    if opts.no_resume {
        config.resumption = Resumption::disabled();
    }
    Ok(config)
}

async fn handshake<I>(io: I, version: HttpVersion) -> Result<Sender, BoxError>
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    match version {
        HttpVersion::Http1 => {
            let (sender, conn) = http1::handshake(io).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(Sender::H1(sender))
        }
        HttpVersion::Http2 => {
            let (sender, conn) = http2::handshake(TokioExecutor::new(), io).await?;
            tokio::spawn(async move {
                let _ = conn.await;
            });
            Ok(Sender::H2(sender))
        }
    }
}

/// The sending half of one open connection. Dropping it (and every clone, for HTTP/2) closes
/// the connection.
pub enum Sender {
    H1(http1::SendRequest<Full<Bytes>>),
    H2(http2::SendRequest<Full<Bytes>>),
}

impl Sender {
    /// Waits until the connection can take a request; false once it is closed (the peer
    /// closed an idle connection, or sent `Connection: close`): the caller reconnects.
    pub async fn ready(&mut self) -> bool {
        match self {
            Sender::H1(s) => s.ready().await.is_ok(),
            Sender::H2(s) => s.ready().await.is_ok(),
        }
    }

    pub fn is_closed(&self) -> bool {
        match self {
            Sender::H1(s) => s.is_closed(),
            Sender::H2(s) => s.is_closed(),
        }
    }

    /// Another handle on the same HTTP/2 connection; None for HTTP/1.1.
    pub fn clone_h2(&self) -> Option<Sender> {
        match self {
            Sender::H1(_) => None,
            Sender::H2(s) => Some(Sender::H2(s.clone())),
        }
    }

    /// Sends one request and reads the response body to its end.
    pub async fn exchange(&mut self, template: &RequestTemplate) -> Result<Outcome, BoxError> {
        let request = template.build();
        let response = match self {
            Sender::H1(s) => s.send_request(request).await?,
            Sender::H2(s) => s.send_request(request).await?,
        };
        let status = response.status().as_u16();
        let mut body = response.into_body();
        let mut body_bytes = 0u64;
        while let Some(frame) = body.frame().await {
            if let Ok(data) = frame?.into_data() {
                body_bytes += data.len() as u64;
            }
        }
        Ok(Outcome { status, body_bytes })
    }
}

/// A complete response.
#[derive(Debug, Clone, Copy)]
pub struct Outcome {
    pub status: u16,
    pub body_bytes: u64,
}

/// The request every worker sends, built once.
#[derive(Debug, Clone)]
pub struct RequestTemplate {
    method: Method,
    uri: Uri,
    headers: HeaderMap,
    body: Bytes,
}

impl RequestTemplate {
    pub fn new(
        target: &Target,
        version: HttpVersion,
        method: Method,
        extra_headers: &[(HeaderName, HeaderValue)],
        body: Bytes,
    ) -> anyhow::Result<RequestTemplate> {
        let mut headers = HeaderMap::new();
        // HTTP/1.1 needs Host; HTTP/2 takes the authority from the absolute URI.
        let uri: Uri = match version {
            HttpVersion::Http1 => {
                headers.insert(HOST, HeaderValue::from_str(&target.authority)?);
                target.path_and_query.parse()?
            }
            HttpVersion::Http2 => target.url().parse()?,
        };
        for (name, value) in extra_headers {
            if version == HttpVersion::Http2 && name == HOST {
                continue;
            }
            headers.insert(name.clone(), value.clone());
        }
        Ok(RequestTemplate {
            method,
            uri,
            headers,
            body,
        })
    }

    pub fn get(target: &Target, version: HttpVersion) -> RequestTemplate {
        RequestTemplate::new(target, version, Method::GET, &[], Bytes::new())
            .expect("a parsed target builds a request")
    }

    pub fn build(&self) -> Request<Full<Bytes>> {
        let mut request = Request::new(Full::new(self.body.clone()));
        *request.method_mut() = self.method.clone();
        *request.uri_mut() = self.uri.clone();
        *request.headers_mut() = self.headers.clone();
        request
    }
}

/// Turns our own deadline into the I/O error the classifier calls a timeout.
pub fn timed_out(after: Duration) -> BoxError {
    Box::new(std::io::Error::new(
        std::io::ErrorKind::TimedOut,
        format!("no complete response within {after:?}"),
    ))
}

/// Opens a connection, sends one request and reads the response, all within `timeout`.
#[cfg(test)]
pub async fn request_once(
    connector: &Connector,
    template: &RequestTemplate,
    timeout: Duration,
) -> Result<Outcome, BoxError> {
    let exchange = async {
        let mut sender = connector.connect().await?;
        sender.exchange(template).await
    };
    match tokio::time::timeout(timeout, exchange).await {
        Ok(result) => result,
        Err(_) => Err(timed_out(timeout)),
    }
}

#[cfg(test)]
mod tests {
    use kaproxy_testkit::client::{classify, one_request_server, ErrorClass};

    use super::*;

    /// One request through the load generator's own connector to a server that reads the
    /// request head and then runs `then` on the socket; the error's class.
    async fn failed_request<F>(then: F, timeout: Duration) -> ErrorClass
    where
        F: FnOnce(tokio::net::TcpStream) + Send + 'static,
    {
        let (addr, _) = one_request_server(then).await.unwrap();
        let target = Target::parse(&format!("http://{addr}/")).unwrap();
        let connector = Connector::new(&target, HttpVersion::Http1, &TlsOptions::default(), None)
            .await
            .unwrap();
        let template = RequestTemplate::get(&target, HttpVersion::Http1);
        match request_once(&connector, &template, timeout).await {
            Ok(r) => panic!("expected an error, got status {}", r.status),
            Err(e) => classify(e.as_ref()),
        }
    }

    #[tokio::test]
    async fn a_close_before_the_response_is_classed_so() {
        let class = failed_request(drop, Duration::from_secs(5)).await;
        assert_eq!(class, ErrorClass::ClosedBeforeResponse);
    }

    #[tokio::test]
    async fn our_own_deadline_is_classed_a_timeout() {
        let (keep_tx, keep_rx) = std::sync::mpsc::channel();
        // Never answers; the socket is kept open until the test ends.
        let class = failed_request(
            move |s| keep_tx.send(s).unwrap(),
            Duration::from_millis(200),
        );
        assert_eq!(class.await, ErrorClass::Timeout);
        drop(keep_rx);
    }

    #[test]
    fn targets() {
        let t = Target::parse("https://localhost:8443/a?b=1").unwrap();
        assert!(t.tls);
        assert_eq!((t.host.as_str(), t.port), ("localhost", 8443));
        assert_eq!(t.path_and_query, "/a?b=1");
        let t = Target::parse("http://127.0.0.1").unwrap();
        assert_eq!((t.port, t.path_and_query.as_str()), (80, "/"));
        assert!(Target::parse("ftp://x/").is_err());
    }

    #[test]
    fn http1_requests_carry_host_and_http2_an_absolute_uri() {
        let t = Target::parse("http://127.0.0.1:8080/x").unwrap();
        let r = RequestTemplate::get(&t, HttpVersion::Http1).build();
        assert_eq!(r.uri(), "/x");
        assert_eq!(r.headers()[HOST], "127.0.0.1:8080");
        let r = RequestTemplate::get(&t, HttpVersion::Http2).build();
        assert_eq!(r.uri(), "http://127.0.0.1:8080/x");
        assert!(r.headers().get(HOST).is_none());
    }
}
