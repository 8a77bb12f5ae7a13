//! A downstream test client: pooled-style keep-alive HTTP/1.1 connections (plain or TLS, from a
//! chosen 127.0.0.x source) that pause between requests and tally what an application would see.

use std::collections::{BTreeMap, BTreeSet};
use std::net::{IpAddr, SocketAddr};
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use futures_util::FutureExt;
use http::{HeaderMap, Method, StatusCode, Version};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::{TokioExecutor, TokioIo};
pub use kaproxy_testkit::client::connect_from;
use kaproxy_testkit::client::ErrorClass;
use rustls_pki_types::pem::PemObject;
use rustls_pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::task::JoinHandle;
use tokio::time::Instant;

/// The name the test client asks for in TLS (the dev certificate's SAN).
pub const TLS_SERVER_NAME: &str = "localhost";
/// Default bound on one request, from sending its head to the end of its response body.
pub const DEFAULT_REQUEST_TIMEOUT: Duration = Duration::from_secs(10);
/// How many error messages a tally keeps verbatim for failure reports.
const ERROR_SAMPLES: usize = 20;

/// Any byte stream hyper can drive (plain TCP or TLS).
pub trait Io: AsyncRead + AsyncWrite + Unpin + Send + 'static {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send + 'static> Io for T {}

/// Where the client connects: kaproxy's plain or TLS listener.
#[derive(Clone)]
pub struct Endpoint {
    pub addr: SocketAddr,
    pub tls: Option<Arc<rustls::ClientConfig>>,
}

impl Endpoint {
    pub fn plain(addr: SocketAddr) -> Self {
        Endpoint { addr, tls: None }
    }

    pub fn tls(addr: SocketAddr, config: Arc<rustls::ClientConfig>) -> Self {
        Endpoint {
            addr,
            tls: Some(config),
        }
    }

    fn scheme(&self) -> &'static str {
        if self.tls.is_some() {
            "https"
        } else {
            "http"
        }
    }
}

/// A rustls client config that trusts exactly the PEM certificate(s) in `cert_pem` and offers
/// the given ALPN protocols (none: no ALPN extension).
pub fn tls_config(cert_pem: &Path, alpn: &[&str]) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert_pem)
        .unwrap_or_else(|e| panic!("read {}: {e}", cert_pem.display()))
        .collect::<Result<_, _>>()
        .unwrap_or_else(|e| panic!("parse {}: {e}", cert_pem.display()));
    assert!(
        !certs.is_empty(),
        "no certificate in {}",
        cert_pem.display()
    );
    for cert in certs {
        roots.add(cert).expect("trust the dev certificate");
    }
    let mut config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .expect("rustls protocol versions")
    .with_root_certificates(roots)
    .with_no_client_auth();
    config.alpn_protocols = alpn.iter().map(|p| p.as_bytes().to_vec()).collect();
    Arc::new(config)
}

/// A TLS connection to the endpoint; returns the stream and the negotiated ALPN protocol.
pub async fn tls_connect(
    addr: SocketAddr,
    config: Arc<rustls::ClientConfig>,
    source: Option<IpAddr>,
) -> std::io::Result<(tokio_rustls::client::TlsStream<TcpStream>, Option<Vec<u8>>)> {
    let tcp = connect_from(addr, source).await?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let name = ServerName::try_from(TLS_SERVER_NAME).expect("server name");
    let tls = connector.connect(name, tcp).await?;
    let alpn = tls.get_ref().1.alpn_protocol().map(|p| p.to_vec());
    Ok((tls, alpn))
}

/// Connects to the endpoint (TCP, then TLS when configured).
pub async fn connect(endpoint: &Endpoint, source: Option<IpAddr>) -> std::io::Result<Box<dyn Io>> {
    match &endpoint.tls {
        None => Ok(Box::new(connect_from(endpoint.addr, source).await?)),
        Some(config) => {
            let (tls, _) = tls_connect(endpoint.addr, config.clone(), source).await?;
            Ok(Box::new(tls))
        }
    }
}

/// What went wrong with a request, in the words of the field reports: a transport failure
/// (kaproxy-testkit's classes, the bench's too) or a 5xx answer (502 from a proxy that lost the
/// race, 503, 504, ...).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum ErrorKind {
    Transport(ErrorClass),
    Status5xx,
}

/// A failed request.
#[derive(Debug, Clone)]
pub struct RequestError {
    pub kind: ErrorKind,
    pub message: String,
}

impl std::fmt::Display for RequestError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:?}: {}", self.kind, self.message)
    }
}

/// Classifies a hyper error the way an application's HTTP client would report it.
pub fn classify(e: &hyper::Error) -> ErrorKind {
    ErrorKind::Transport(kaproxy_testkit::client::classify(e))
}

/// One request to send.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: Method,
    pub path: String,
    pub headers: Vec<(String, String)>,
    pub body: Bytes,
}

impl Request {
    pub fn get(path: &str) -> Self {
        Request {
            method: Method::GET,
            path: path.to_string(),
            headers: Vec::new(),
            body: Bytes::new(),
        }
    }

    pub fn post(path: &str, body: impl Into<Bytes>) -> Self {
        Request {
            method: Method::POST,
            path: path.to_string(),
            headers: Vec::new(),
            body: body.into(),
        }
    }

    pub fn header(mut self, name: &str, value: &str) -> Self {
        self.headers.push((name.to_string(), value.to_string()));
        self
    }

    fn to_hyper(&self, endpoint: &Endpoint, absolute: bool) -> http::Request<Full<Bytes>> {
        let uri = if absolute {
            format!(
                "{}://{}{}",
                endpoint.scheme(),
                TLS_SERVER_NAME,
                if self.path.is_empty() {
                    "/"
                } else {
                    &self.path
                }
            )
        } else {
            self.path.clone()
        };
        let mut builder = http::Request::builder()
            .method(self.method.clone())
            .uri(uri);
        let has_host = self
            .headers
            .iter()
            .any(|(k, _)| k.eq_ignore_ascii_case("host"));
        if !has_host && !absolute {
            builder = builder.header(http::header::HOST, TLS_SERVER_NAME);
        }
        for (k, v) in &self.headers {
            builder = builder.header(k.as_str(), v.as_str());
        }
        builder
            .body(Full::new(self.body.clone()))
            .expect("valid test request")
    }
}

/// A complete response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: StatusCode,
    pub version: Version,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Response {
    /// A header as a string ("" when absent).
    pub fn header(&self, name: &str) -> String {
        self.headers
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("")
            .to_string()
    }

    /// The `X-Backend` that answered.
    pub fn backend(&self) -> Option<String> {
        self.headers
            .get("x-backend")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string)
    }

    pub fn body_text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }
}

/// One HTTP/1.1 connection to kaproxy.
struct Http1Conn {
    sender: SendRequest<Full<Bytes>>,
    task: JoinHandle<()>,
    /// The last response said `Connection: close`: a pool drops it before reuse.
    close_after: bool,
}

impl Http1Conn {
    /// True when a connection pool would see this connection as usable right now: the server's
    /// FIN (or `Connection: close`) has not been observed.
    fn looks_usable(&mut self) -> bool {
        if self.close_after || self.sender.is_closed() || self.task.is_finished() {
            return false;
        }
        !matches!(
            futures_util::future::poll_fn(|cx| self.sender.poll_ready(cx)).now_or_never(),
            Some(Err(_))
        )
    }
}

impl Drop for Http1Conn {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// Sends one request on a fresh HTTP/1.1 handshake over `io`, waiting for the whole response.
async fn http1_handshake(io: Box<dyn Io>) -> Result<Http1Conn, RequestError> {
    let (sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(io))
        .await
        .map_err(|e| RequestError {
            kind: classify(&e),
            message: format!("handshake: {e}"),
        })?;
    let task = tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok(Http1Conn {
        sender,
        task,
        close_after: false,
    })
}

/// A single keep-alive connection that behaves like one slot of an application's connection
/// pool: reuses the connection while it looks open, reconnects when kaproxy closed it
/// gracefully (FIN seen or `Connection: close`), and reports every other failure.
pub struct KeepAliveClient {
    endpoint: Endpoint,
    source: Option<IpAddr>,
    conn: Option<Http1Conn>,
    timeout: Duration,
    /// Connections opened.
    pub connects: usize,
    /// Connections found closed by kaproxy before reuse (not errors).
    pub graceful_closes: usize,
}

impl KeepAliveClient {
    pub fn new(endpoint: Endpoint, source: Option<IpAddr>) -> Self {
        KeepAliveClient {
            endpoint,
            source,
            conn: None,
            timeout: DEFAULT_REQUEST_TIMEOUT,
            connects: 0,
            graceful_closes: 0,
        }
    }

    pub fn with_timeout(mut self, timeout: Duration) -> Self {
        self.timeout = timeout;
        self
    }

    /// Sends `req` and reads the whole response. A 5xx is returned as a response, not an error.
    pub async fn send(&mut self, req: &Request) -> Result<Response, RequestError> {
        if let Some(conn) = self.conn.as_mut() {
            if !conn.looks_usable() {
                self.conn = None;
                self.graceful_closes += 1;
            }
        }
        if self.conn.is_none() {
            let io = tokio::time::timeout(self.timeout, connect(&self.endpoint, self.source))
                .await
                .map_err(|_| RequestError {
                    kind: ErrorKind::Transport(ErrorClass::Timeout),
                    message: format!("connect to {} timed out", self.endpoint.addr),
                })?
                .map_err(|e| RequestError {
                    kind: ErrorKind::Transport(kaproxy_testkit::client::classify(&e)),
                    message: format!("connect to {}: {e}", self.endpoint.addr),
                })?;
            self.conn = Some(http1_handshake(io).await?);
            self.connects += 1;
        }
        let conn = self.conn.as_mut().expect("connected");
        let request = req.to_hyper(&self.endpoint, false);
        let exchange = async {
            // hyper needs the previous exchange fully processed before the next request.
            conn.sender.ready().await?;
            let response = conn.sender.send_request(request).await?;
            let (parts, body) = response.into_parts();
            let body = body.collect().await?.to_bytes();
            Ok::<_, hyper::Error>((parts, body))
        };
        let result = tokio::time::timeout(self.timeout, exchange).await;
        match result {
            Err(_) => {
                self.conn = None;
                Err(RequestError {
                    kind: ErrorKind::Transport(ErrorClass::Timeout),
                    message: format!("no complete response within {:?}", self.timeout),
                })
            }
            Ok(Err(e)) => {
                self.conn = None;
                Err(RequestError {
                    kind: classify(&e),
                    message: format!("{e} ({e:?})"),
                })
            }
            Ok(Ok((parts, body))) => {
                let close = parts
                    .headers
                    .get_all(http::header::CONNECTION)
                    .iter()
                    .filter_map(|v| v.to_str().ok())
                    .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")));
                if close {
                    conn.close_after = true;
                }
                Ok(Response {
                    status: parts.status,
                    version: parts.version,
                    headers: parts.headers,
                    body,
                })
            }
        }
    }
}

/// Sends one request over HTTP/2 on a fresh TLS connection (ALPN must select h2); returns the
/// response and the negotiated ALPN protocol.
pub async fn h2_send(
    endpoint: &Endpoint,
    req: &Request,
) -> Result<(Response, Option<Vec<u8>>), RequestError> {
    let config = endpoint.tls.clone().expect("h2 test needs a TLS endpoint");
    let exchange = async {
        let (tls, alpn) = tls_connect(endpoint.addr, config, None)
            .await
            .map_err(|e| RequestError {
                kind: ErrorKind::Transport(kaproxy_testkit::client::classify(&e)),
                message: format!("tls connect: {e}"),
            })?;
        let hyper_err = |e: hyper::Error| RequestError {
            kind: classify(&e),
            message: format!("{e} ({e:?})"),
        };
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(hyper_err)?;
        let task = tokio::spawn(async move {
            let _ = conn.await;
        });
        let response = sender
            .send_request(req.to_hyper(endpoint, true))
            .await
            .map_err(hyper_err)?;
        let (parts, body) = response.into_parts();
        let body = body.collect().await.map_err(hyper_err)?.to_bytes();
        task.abort();
        Ok((
            Response {
                status: parts.status,
                version: parts.version,
                headers: parts.headers,
                body,
            },
            alpn,
        ))
    };
    tokio::time::timeout(DEFAULT_REQUEST_TIMEOUT, exchange)
        .await
        .unwrap_or_else(|_| {
            Err(RequestError {
                kind: ErrorKind::Transport(ErrorClass::Timeout),
                message: "h2 request timed out".into(),
            })
        })
}

/// One request's outcome in a load run.
#[derive(Debug, Clone)]
pub struct Record {
    /// Index of the client connection slot that sent it.
    pub slot: usize,
    pub source: Option<IpAddr>,
    pub result: Result<Response, RequestError>,
}

/// What a load run saw, in the terms of the field reports.
#[derive(Debug, Default)]
pub struct Tally {
    /// Requests answered with a status below 500.
    pub ok: usize,
    /// Failed requests (including 5xx answers) by kind.
    pub errors: BTreeMap<ErrorKind, usize>,
    /// Every status received.
    pub statuses: BTreeMap<u16, usize>,
    /// `X-Backend` values seen.
    pub backends: BTreeMap<String, usize>,
    /// Connections opened by the client.
    pub connects: usize,
    /// Connections kaproxy closed gracefully that the client noticed before reuse.
    pub graceful_closes: usize,
    /// The first few error messages.
    pub error_samples: Vec<String>,
    /// Every request, in completion order.
    pub records: Vec<Record>,
}

impl Tally {
    /// Total client-visible failures.
    pub fn error_count(&self) -> usize {
        self.errors.values().sum()
    }

    /// Total requests sent.
    pub fn total(&self) -> usize {
        self.ok + self.error_count()
    }

    /// Adds one outcome.
    pub fn add(&mut self, record: Record) {
        match &record.result {
            Ok(resp) => {
                *self.statuses.entry(resp.status.as_u16()).or_default() += 1;
                if let Some(b) = resp.backend() {
                    *self.backends.entry(b).or_default() += 1;
                }
                if resp.status.is_server_error() {
                    *self.errors.entry(ErrorKind::Status5xx).or_default() += 1;
                    if self.error_samples.len() < ERROR_SAMPLES {
                        self.error_samples.push(format!(
                            "slot {}: status {} body {:?}",
                            record.slot,
                            resp.status,
                            resp.body_text()
                        ));
                    }
                } else {
                    self.ok += 1;
                }
            }
            Err(e) => {
                *self.errors.entry(e.kind).or_default() += 1;
                if self.error_samples.len() < ERROR_SAMPLES {
                    self.error_samples
                        .push(format!("slot {}: {e}", record.slot));
                }
            }
        }
        self.records.push(record);
    }

    /// Merges another tally into this one.
    pub fn merge(&mut self, other: Tally) {
        self.connects += other.connects;
        self.graceful_closes += other.graceful_closes;
        for r in other.records {
            self.add(r);
        }
    }

    /// The set of backends each source IP landed on.
    pub fn backends_by_source(&self) -> BTreeMap<IpAddr, BTreeSet<String>> {
        let mut map: BTreeMap<IpAddr, BTreeSet<String>> = BTreeMap::new();
        for r in &self.records {
            if let (Some(ip), Ok(resp)) = (r.source, &r.result) {
                if let Some(b) = resp.backend() {
                    map.entry(ip).or_default().insert(b);
                }
            }
        }
        map
    }

    /// One paragraph for assertion messages.
    pub fn summary(&self) -> String {
        format!(
            "total {} ok {} errors {:?} statuses {:?} backends {:?} connects {} graceful_closes {} samples {:#?}",
            self.total(),
            self.ok,
            self.errors,
            self.statuses,
            self.backends,
            self.connects,
            self.graceful_closes,
            self.error_samples
        )
    }
}

/// How the slots of a load are spread in time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pacing {
    /// Every slot runs on its own clock: a random start, then a random pause after each
    /// response (a steady service with many independent callers).
    Independent,
    /// All slots fire together in rounds (within a few ms of each other): when every slot has
    /// its response, all pause the same random time and fire again — a periodic batch job.
    /// With requests that overlap (e.g. `/slow`), every upstream connection then sits idle for
    /// about the pause, whatever order the pool hands connections out in.
    Rounds,
}

/// Spread of slot start times within one round of [`Pacing::Rounds`].
const ROUND_JITTER: Duration = Duration::from_millis(20);

/// A load: `connections` client slots, each sending `requests_per_connection` copies of
/// `request` on its keep-alive connection with a random pause in `pause` between them.
#[derive(Clone)]
pub struct Load {
    pub endpoint: Endpoint,
    pub connections: usize,
    pub requests_per_connection: usize,
    pub request: Request,
    /// Inclusive range of the pause between two requests of one slot.
    pub pause: (Duration, Duration),
    pub pacing: Pacing,
    /// Slot i binds `source_ips[i % len]`; empty: the default source.
    pub source_ips: Vec<IpAddr>,
    pub timeout: Duration,
}

impl Load {
    pub fn new(endpoint: Endpoint, request: Request) -> Self {
        Load {
            endpoint,
            connections: 1,
            requests_per_connection: 1,
            request,
            pause: (Duration::ZERO, Duration::ZERO),
            pacing: Pacing::Independent,
            source_ips: Vec::new(),
            timeout: DEFAULT_REQUEST_TIMEOUT,
        }
    }

    pub fn connections(mut self, n: usize) -> Self {
        self.connections = n;
        self
    }

    pub fn requests_per_connection(mut self, n: usize) -> Self {
        self.requests_per_connection = n;
        self
    }

    pub fn pause(mut self, min: Duration, max: Duration) -> Self {
        self.pause = (min, max);
        self
    }

    pub fn pacing(mut self, pacing: Pacing) -> Self {
        self.pacing = pacing;
        self
    }

    pub fn source_ips(mut self, ips: Vec<IpAddr>) -> Self {
        self.source_ips = ips;
        self
    }

    /// Runs every slot concurrently and merges their tallies.
    pub async fn run(&self) -> Tally {
        let started = Instant::now();
        // One pause per round, shared by all slots of a `Rounds` load.
        let mut rng = Rng::new(u64::MAX);
        let pauses: Arc<Vec<Duration>> = Arc::new(
            (0..self.requests_per_connection)
                .map(|_| rng.duration(self.pause.0, self.pause.1))
                .collect(),
        );
        let barrier = Arc::new(tokio::sync::Barrier::new(self.connections));
        let mut tasks = Vec::with_capacity(self.connections);
        for slot in 0..self.connections {
            let load = self.clone();
            let pauses = pauses.clone();
            let barrier = barrier.clone();
            tasks.push(tokio::spawn(async move {
                load.run_slot(slot, &pauses, &barrier).await
            }));
        }
        let mut tally = Tally::default();
        for task in tasks {
            tally.merge(task.await.expect("load slot panicked"));
        }
        eprintln!(
            "load {} {} x{} ({:?}): {} requests in {:.1?}: {}",
            self.request.method,
            self.request.path,
            self.connections,
            self.pacing,
            tally.total(),
            started.elapsed(),
            if tally.error_count() == 0 {
                "no errors".to_string()
            } else {
                format!("errors {:?}", tally.errors)
            }
        );
        tally
    }

    async fn run_slot(
        &self,
        slot: usize,
        pauses: &[Duration],
        barrier: &tokio::sync::Barrier,
    ) -> Tally {
        let source = if self.source_ips.is_empty() {
            None
        } else {
            Some(self.source_ips[slot % self.source_ips.len()])
        };
        let mut rng = Rng::new(slot as u64);
        let mut client =
            KeepAliveClient::new(self.endpoint.clone(), source).with_timeout(self.timeout);
        let mut tally = Tally::default();
        let jitter = rng.duration(Duration::ZERO, ROUND_JITTER);
        if self.pacing == Pacing::Independent && self.pause.1 > Duration::ZERO {
            tokio::time::sleep(rng.duration(Duration::ZERO, self.pause.1)).await;
        }
        for (i, pause) in pauses.iter().enumerate().take(self.requests_per_connection) {
            match self.pacing {
                Pacing::Rounds => {
                    if i > 0 {
                        // Every slot reaches the barrier: each request is bounded by its timeout.
                        barrier.wait().await;
                        tokio::time::sleep(*pause + jitter).await;
                    } else {
                        tokio::time::sleep(jitter).await;
                    }
                }
                Pacing::Independent => {
                    if i > 0 && self.pause.1 > Duration::ZERO {
                        tokio::time::sleep(rng.duration(self.pause.0, self.pause.1)).await;
                    }
                }
            }
            let result = client.send(&self.request).await;
            tally.add(Record {
                slot,
                source,
                result,
            });
        }
        tally.connects = client.connects;
        tally.graceful_closes = client.graceful_closes;
        tally
    }
}

/// A small xorshift generator: the tests need spread, not quality, and no extra crate.
pub struct Rng(u64);

impl Rng {
    pub fn new(salt: u64) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos() as u64)
            .unwrap_or(0);
        Rng((nanos ^ salt.wrapping_mul(0x9E37_79B9_7F4A_7C15)) | 1)
    }

    pub fn next_u64(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }

    /// Uniform in [min, max].
    pub fn duration(&mut self, min: Duration, max: Duration) -> Duration {
        if max <= min {
            return min;
        }
        let span = (max - min).as_micros() as u64;
        min + Duration::from_micros(self.next_u64() % (span + 1))
    }
}

/// 127.0.0.`first`..=127.0.0.`last` as source addresses.
pub fn loopback_range(first: u8, last: u8) -> Vec<IpAddr> {
    (first..=last)
        .map(|i| IpAddr::V4(std::net::Ipv4Addr::new(127, 0, 0, i)))
        .collect()
}
