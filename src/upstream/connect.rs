//! Owns how kaproxy connects to a backend: the TCP dial (connect timeout, TCP_NODELAY,
//! keepalive), TLS on top when the group says `tls = true` ([`UpstreamStream`]), and
//! [`Http1`], the pool's real connector: [`Http1Conn`], kaproxy's own HTTP/1.1 client
//! connection ([`crate::upstream::wire`]), used by the task of the request that has it (no
//! task or channel hop per request), and checked without blocking before it is reused.
//! hyper's client handshake ([`http1_handshake`]) serves the connections that are not pooled:
//! a tunnel's, a health check's, `kaproxy probe`'s.

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::sync::Arc;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use hyper::client::conn::http1::{Connection as HyperConn, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use crate::config::PoolConfig;
use crate::error::RequestError;
use crate::metrics::BackendMetrics;
use crate::upstream::delivery::{Delivery, Tracked};
use crate::upstream::stream::UpstreamStream;
use crate::upstream::tls::UpstreamTls;
use crate::upstream::wire::{Outgoing, Wire};

/// What the pool needs of a live connection: whether its peer has closed it, checked without
/// blocking (as hyper-util's pool needs `is_open`). Everything else the pool decides from its
/// own clock.
pub trait Connection: Send + 'static {
    /// True when the peer closed the connection or sent something no response was asked for
    /// (README, "How the upstream pool keeps the promise": checked at checkout and release).
    fn is_closed(&mut self) -> bool;
    /// True when the connection would take a new request now (its last exchange is done).
    fn is_idle(&mut self) -> bool {
        true
    }
    /// Finishes what the connection still does for the last exchange (see [`Http1Conn`]);
    /// true when it is then idle.
    fn settle(&mut self) -> impl Future<Output = bool> + Send {
        std::future::ready(true)
    }
    /// Called as the pool closes it, just before it is dropped (which closes the socket).
    fn close(&mut self) {}
    /// Called as it goes back to the pool idle (the task that used it has moved on) and as
    /// the sweep looks at it: what happens on it from now on (a FIN) wakes `sweep`.
    fn detach(&mut self, _sweep: &Waker) {}
}

/// How a pool opens a connection to its backend: [`Http1`] for real traffic; the pool's unit
/// tests use fakes, so its deadlines run under paused time.
pub trait Connector: Send + Sync + Sized + 'static {
    type Conn: Connection;
    /// Opens connection `id` to `addr` with the pool's settings.
    fn connect(
        &self,
        addr: SocketAddr,
        cfg: &PoolConfig,
        id: u64,
    ) -> impl Future<Output = Result<Self::Conn, RequestError>> + Send;
}

/// A new TCP connection to the backend at `addr`, bounded by `connect_timeout`, with
/// TCP_NODELAY and the configured TCP keepalive.
async fn dial(addr: SocketAddr, cfg: &PoolConfig) -> Result<TcpStream, RequestError> {
    let stream = tokio::time::timeout(cfg.connect_timeout, TcpStream::connect(addr))
        .await
        .map_err(|_| RequestError::ConnectTimeout {
            addr,
            timeout: cfg.connect_timeout,
        })?
        .map_err(|source| RequestError::Connect { addr, source })?;
    set_socket_options(&stream, cfg.tcp_keepalive);
    Ok(stream)
}

/// The real connector: TCP (`connect_timeout`, TCP_NODELAY, keepalive), TLS when the group
/// has it, and hyper's HTTP/1.1 client handshake.
pub struct Http1 {
    /// The group's TLS client side; swapped on reload, so that changed certificate files
    /// apply to new connections while warm ones stay.
    tls: ArcSwapOption<UpstreamTls>,
    /// Where TLS handshakes and resumptions are counted.
    metrics: Arc<BackendMetrics>,
}

impl Http1 {
    pub fn new(tls: Option<UpstreamTls>, metrics: Arc<BackendMetrics>) -> Http1 {
        Http1 {
            tls: ArcSwapOption::from(tls.map(Arc::new)),
            metrics,
        }
    }

    /// Uses `tls` for connections opened from now on (reload).
    pub fn set_tls(&self, tls: Option<UpstreamTls>) {
        self.tls.store(tls.map(Arc::new));
    }

    /// A new connection to `addr`: TCP, then TLS when configured, both within
    /// `connect_timeout`. A failed handshake is [`RequestError::Tls`], never a fallback to
    /// plain text.
    pub async fn open(
        &self,
        addr: SocketAddr,
        cfg: &PoolConfig,
    ) -> Result<UpstreamStream, RequestError> {
        let tls = self.tls.load_full();
        let open = async {
            let tcp = Tracked::new(dial(addr, cfg).await?);
            let Some(tls) = tls else {
                return Ok(UpstreamStream::Plain(tcp));
            };
            let (stream, resumed) = tls
                .connect(tcp, addr)
                .await
                .map_err(|source| RequestError::Tls { addr, source })?;
            self.metrics.tls_handshake(resumed);
            Ok(UpstreamStream::Tls(Box::new(stream)))
        };
        tokio::time::timeout(cfg.connect_timeout, open)
            .await
            .map_err(|_| RequestError::ConnectTimeout {
                addr,
                timeout: cfg.connect_timeout,
            })?
    }
}

/// A live HTTP/1.1 connection to a backend: its bytes ([`Wire`]), the rest of a request still
/// being written after its response head came, and what its socket wrote and had acknowledged
/// (the retry rule's proof).
pub struct Http1Conn {
    pub(crate) wire: Wire,
    /// The request being written; after its head arrived, the rest of a request the backend
    /// answered early. Boxed: the connection moves in and out of the pool with every request.
    pub(crate) outgoing: Option<Box<Outgoing>>,
    pub(crate) delivery: Arc<Delivery>,
}

impl Http1Conn {
    pub fn new(stream: UpstreamStream) -> Http1Conn {
        Http1Conn {
            delivery: stream.delivery(),
            wire: Wire::new(stream),
            outgoing: None,
        }
    }

    /// Writes what it can of the rest of the last request; `Ready(true)` once it is all
    /// written, `Ready(false)` when it cannot be.
    pub(crate) fn poll_outgoing(&mut self, cx: &mut Context<'_>) -> Poll<bool> {
        let Some(out) = self.outgoing.as_mut() else {
            return Poll::Ready(true);
        };
        let done = std::task::ready!(out.poll_write(&mut self.wire, cx));
        self.outgoing = None;
        Poll::Ready(done.is_ok())
    }
}

impl Connection for Http1Conn {
    /// A backend's FIN, TLS `close_notify`, or a stray byte, seen without blocking (see
    /// [`Wire::closed_if_woken`]).
    fn is_closed(&mut self) -> bool {
        self.wire.closed_if_woken()
    }

    /// False while the rest of an earlier request is still being written (a backend that
    /// answered early).
    fn is_idle(&mut self) -> bool {
        self.outgoing.is_none()
    }

    fn detach(&mut self, sweep: &Waker) {
        self.wire.detach(sweep);
    }

    fn close(&mut self) {
        self.wire.stream_mut().send_close_notify();
    }

    /// A backend may answer before it has read the whole request body (RFC 9112 §9.5 lets it);
    /// the rest is still written, and the connection is idle only after.
    async fn settle(&mut self) -> bool {
        poll_fn(|cx| self.poll_outgoing(cx)).await
    }
}

impl Connector for Http1 {
    type Conn = Http1Conn;

    async fn connect(
        &self,
        addr: SocketAddr,
        cfg: &PoolConfig,
        _id: u64,
    ) -> Result<Http1Conn, RequestError> {
        Ok(Http1Conn::new(self.open(addr, cfg).await?))
    }
}

/// hyper's HTTP/1.1 client handshake over `io`, as every connection to a backend makes it
/// (the pool's, a tunnel's, a health probe's, `kaproxy probe`'s): its read buffer capped at
/// [`UPSTREAM_READ_BUFFER`].
pub async fn http1_handshake<IO, B>(
    io: IO,
) -> hyper::Result<(SendRequest<B>, HyperConn<TokioIo<IO>, B>)>
where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    B: http_body::Body + 'static,
    B::Data: Send,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    hyper::client::conn::http1::Builder::new()
        .max_buf_size(UPSTREAM_READ_BUFFER)
        .handshake(TokioIo::new(io))
        .await
}

/// How large hyper lets its read buffer for a backend grow (reads of up to this much at once):
/// 64 KiB. hyper's 400 KiB default let every pooled connection that once carried a large body
/// keep a 400 KiB buffer while idle: 12 slow readers of 48 MiB files grew kaproxy's RSS by
/// 34 MiB, now 11 MiB; a 48 MiB relay takes as long as before (~80 ms on loopback).
const UPSTREAM_READ_BUFFER: usize = 64 * 1024;

fn set_socket_options(stream: &TcpStream, keepalive: Option<Duration>) {
    let _ = stream.set_nodelay(true);
    if let Some(idle) = keepalive {
        let sock = socket2::SockRef::from(stream);
        let _ = sock.set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(idle));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::UpstreamTlsConfig;
    use kaproxy_testkit::pki::TestPki;
    use rustls_pki_types::pem::PemObject;
    use std::io;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    /// A TLS backend on 127.0.0.1:0 that answers one request and then reports how its client
    /// ended the connection: `Ok` for a clean `close_notify`, else the read error.
    async fn tls_backend(pki: &TestPki) -> (SocketAddr, oneshot::Receiver<io::Result<()>>) {
        let chain: Vec<_> = rustls_pki_types::CertificateDer::pem_file_iter(&pki.server_cert)
            .unwrap()
            .map(Result::unwrap)
            .collect();
        let key = rustls_pki_types::PrivateKeyDer::from_pem_file(&pki.server_key).unwrap();
        let provider = Arc::new(rustls::crypto::ring::default_provider());
        let config = rustls::ServerConfig::builder_with_provider(provider)
            .with_safe_default_protocol_versions()
            .unwrap()
            .with_no_client_auth()
            .with_single_cert(chain, key)
            .unwrap();
        let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (ended, ended_rx) = oneshot::channel();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(tcp).await.unwrap();
            let mut head = Vec::new();
            let mut buf = [0u8; 1024];
            while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                let n = tls.read(&mut buf).await.unwrap();
                assert!(n > 0, "request head");
                head.extend_from_slice(&buf[..n]);
            }
            tls.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
                .await
                .unwrap();
            tls.flush().await.unwrap();
            // tokio-rustls reads a TCP FIN without close_notify as UnexpectedEof.
            let mut rest = Vec::new();
            let _ = ended.send(tls.read_to_end(&mut rest).await.map(|_| ()));
        });
        (addr, ended_rx)
    }

    use tokio::sync::oneshot;

    #[tokio::test]
    async fn a_tls_connection_closed_by_the_pool_sends_close_notify() {
        let pki = TestPki::generate().unwrap();
        let (addr, ended) = tls_backend(&pki).await;
        let tls = UpstreamTls::new(&UpstreamTlsConfig {
            ca: Some(pki.ca_cert.clone()),
            ..UpstreamTlsConfig::new()
        })
        .unwrap();
        let metrics = crate::metrics::Metrics::new();
        let connector = Http1::new(Some(tls), metrics.server("web", addr));
        let mut conn = connector
            .connect(addr, &PoolConfig::default(), 1)
            .await
            .expect("TLS connection");
        let mut req = http::Request::new(crate::body::UpstreamBody::Empty);
        req.headers_mut()
            .insert(http::header::HOST, http::HeaderValue::from_static("b"));
        let (parts, body) = req.into_parts();
        conn.outgoing = Some(Box::new(Outgoing::new(
            &crate::upstream::wire::OutgoingHead::from_parts(&parts),
            body,
        )));
        assert!(poll_fn(|cx| conn.poll_outgoing(cx)).await, "written");
        let head = poll_fn(|cx| crate::upstream::wire::poll_head(&mut conn.wire, cx))
            .await
            .unwrap();
        let (resp, ends) = crate::upstream::wire::read_head(head, false).unwrap();
        assert_eq!((resp.status.as_u16(), ends), (200, false));
        let mut body = resp.body;
        let data = poll_fn(|cx| conn.wire.poll_body(&mut body, cx)).await;
        assert_eq!(data.unwrap().unwrap().into_data().unwrap(), "ok");
        assert!(body.is_done());
        assert!(!conn.is_closed());
        conn.close();
        drop(conn);
        let how = tokio::time::timeout(Duration::from_secs(5), ended)
            .await
            .expect("the backend saw the end")
            .unwrap();
        assert!(
            how.is_ok(),
            "the backend got close_notify, not a bare FIN: {how:?}"
        );
    }
}
