//! Owns how kaproxy connects to a backend: the TCP dial (connect timeout, TCP_NODELAY,
//! keepalive), TLS on top when the group says `tls = true` ([`UpstreamStream`]), and
//! [`Http1`], the pool's real connector — hyper's HTTP/1.1 client connection, driven by the
//! task of the request that uses it (no task or channel hop per request), and checked without
//! blocking before it is reused.

use std::future::{poll_fn, Future};
use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll, Wake, Waker};
use std::time::Duration;

use arc_swap::ArcSwapOption;
use futures_util::task::AtomicWaker;
use hyper::client::conn::http1::{Connection as HyperConn, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;
use tracing::debug;

use crate::body::UpstreamBody;
use crate::config::PoolConfig;
use crate::error::RequestError;
use crate::metrics::BackendMetrics;
use crate::upstream::delivery::{Delivery, Tracked};
use crate::upstream::tls::UpstreamTls;

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

/// A connection to a backend: plain TCP, or TLS over it (`tls = true`).
pub enum UpstreamStream {
    Plain(Tracked),
    Tls(Box<TlsStream<Tracked>>),
}

impl UpstreamStream {
    /// What the socket under it wrote and had acknowledged.
    pub fn delivery(&self) -> Arc<Delivery> {
        match self {
            UpstreamStream::Plain(s) => s.delivery().clone(),
            UpstreamStream::Tls(s) => s.get_ref().0.delivery().clone(),
        }
    }

    /// Queues TLS `close_notify` (RFC 8446 §6.1) and writes it if the socket takes it now,
    /// without waiting: the connection is being dropped, and a FIN follows either way.
    fn send_close_notify(&mut self) {
        let UpstreamStream::Tls(tls) = self else {
            return;
        };
        let (tcp, conn) = tls.get_mut();
        let tcp = tcp.get_ref();
        conn.send_close_notify();
        struct NonBlocking<'a>(&'a TcpStream);
        impl io::Write for NonBlocking<'_> {
            fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
                self.0.try_write(buf)
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        while conn.wants_write() {
            if conn.write_tls(&mut NonBlocking(tcp)).is_err() {
                break;
            }
        }
    }
}

impl AsyncRead for UpstreamStream {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_read(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_read(cx, buf),
        }
    }
}

impl AsyncWrite for UpstreamStream {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write(cx, buf),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write(cx, buf),
        }
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_write_vectored(cx, bufs),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_write_vectored(cx, bufs),
        }
    }

    fn is_write_vectored(&self) -> bool {
        match self {
            UpstreamStream::Plain(s) => s.is_write_vectored(),
            UpstreamStream::Tls(s) => s.is_write_vectored(),
        }
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_flush(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_flush(cx),
        }
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        match self.get_mut() {
            UpstreamStream::Plain(s) => Pin::new(s).poll_shutdown(cx),
            UpstreamStream::Tls(s) => Pin::new(s.as_mut()).poll_shutdown(cx),
        }
    }
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

/// A live HTTP/1.1 connection: hyper's sender and its connection state machine, which the
/// request's own task polls (see [`Driver`]).
pub struct Http1Conn {
    pub(crate) sender: SendRequest<UpstreamBody>,
    pub(crate) driver: Driver,
    /// What its socket wrote and had acknowledged (the retry rule's proof).
    pub(crate) delivery: Arc<Delivery>,
}

impl Connection for Http1Conn {
    fn is_closed(&mut self) -> bool {
        // An idle hyper connection reads; a backend's FIN (or a stray byte, which hyper treats
        // as an error) wakes it, and running it now ends it.
        self.driver.poll_if_woken().is_ready() || self.sender.is_closed()
    }

    /// hyper's dispatcher is idle: false while it is still writing an earlier request's body
    /// (a backend that answered early), for example.
    fn is_idle(&mut self) -> bool {
        !self.driver.poll_if_woken().is_ready() && self.sender.is_ready()
    }

    fn detach(&mut self, sweep: &Waker) {
        self.driver.detach(sweep);
    }

    fn close(&mut self) {
        if let Some(conn) = self.driver.conn.take() {
            // Pin<Box<_>> of an Unpin connection: its parts can be taken back.
            let mut io = Pin::into_inner(conn).into_parts().io.into_inner();
            io.send_close_notify();
        }
    }

    /// A backend may answer before it has read the whole request body (RFC 9112 §9.5 lets it);
    /// hyper then still writes the rest of the body, and the connection is idle only after.
    async fn settle(&mut self) -> bool {
        let Http1Conn { sender, driver, .. } = self;
        driver
            .drive(poll_fn(|cx| sender.poll_ready(cx)))
            .await
            .is_ok()
    }
}

/// hyper's client connection state machine (it reads and writes the socket), polled inline by
/// whichever task uses the connection: the request's while it is checked out, nobody while it
/// idles in the pool.
///
/// hyper is polled only when something woke it (its socket became readable or writable, a
/// request or a body was handed to it), as an executor polls a task: it gets a waker of its
/// own ([`DriverWake`]) that records the wake-up and passes it on to the task using the
/// connection. So the request's task, woken for anything else, does not run hyper's machine
/// for nothing, and the check before reuse costs one atomic load unless an event (a FIN, a
/// stray byte) came in while the connection idled.
pub struct Driver {
    conn: Option<Pin<Box<HyperHttp1>>>,
    wake: Arc<DriverWake>,
    /// `wake` as a [`Waker`], made once.
    waker: Waker,
    addr: SocketAddr,
    id: u64,
}

/// hyper's HTTP/1.1 client connection over a backend stream.
type HyperHttp1 = HyperConn<TokioIo<UpstreamStream>, UpstreamBody>;

/// The waker hyper's connection is polled with: sets `woken`, then wakes the task that uses
/// the connection now, if any.
struct DriverWake {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for DriverWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

impl Driver {
    fn new(
        conn: HyperConn<TokioIo<UpstreamStream>, UpstreamBody>,
        addr: SocketAddr,
        id: u64,
    ) -> Self {
        // Woken from the start: the first poll must run.
        let wake = Arc::new(DriverWake {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        Driver {
            conn: Some(Box::pin(conn)),
            waker: Waker::from(wake.clone()),
            wake,
            addr,
            id,
        }
    }

    /// Makes progress on the connection for the task of `cx`; `Ready` once it has ended (peer
    /// close, error, or `Connection: close` done), after which the connection is gone.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        // Registered before the flag is read: a wake-up in between is seen either way.
        self.wake.task.register(cx.waker());
        self.poll_if_woken()
    }

    /// Runs hyper's machine if something woke it since it last ran.
    fn poll_if_woken(&mut self) -> Poll<()> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(());
        };
        if !self.wake.woken.swap(false, Ordering::AcqRel) {
            return Poll::Pending;
        }
        match conn.as_mut().poll(&mut Context::from_waker(&self.waker)) {
            Poll::Pending => Poll::Pending,
            Poll::Ready(result) => {
                if let Err(e) = result {
                    debug!(server = %self.addr, conn = self.id, error = %e, "pool: upstream connection ended with error");
                }
                // Dropping hyper's connection fails what still waits on it (a response head,
                // a body), as when its task ended.
                self.conn = None;
                Poll::Ready(())
            }
        }
    }

    /// The connection goes back to the pool: what happens on it wakes the pool's sweep
    /// instead of the task that used it.
    pub(crate) fn detach(&mut self, sweep: &Waker) {
        self.wake.task.register(sweep);
    }

    /// Runs `fut` (a send or a wait for readiness) while driving the connection.
    pub(crate) async fn drive<F: Future>(&mut self, fut: F) -> F::Output {
        let mut fut = std::pin::pin!(fut);
        poll_fn(|cx| {
            // The connection first: it writes the request and reads what answers it, so that
            // the send below finds its response in the same poll when it is there.
            let _ = self.poll(cx);
            fut.as_mut().poll(cx)
        })
        .await
    }
}

impl Connector for Http1 {
    type Conn = Http1Conn;

    async fn connect(
        &self,
        addr: SocketAddr,
        cfg: &PoolConfig,
        id: u64,
    ) -> Result<Http1Conn, RequestError> {
        let stream = self.open(addr, cfg).await?;
        let delivery = stream.delivery();
        let (sender, conn) = http1_handshake::<_, UpstreamBody>(stream)
            .await
            .map_err(|source| RequestError::Handshake { addr, source })?;
        Ok(Http1Conn {
            sender,
            driver: Driver::new(conn, addr, id),
            delivery,
        })
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
        let mut req = http::Request::new(UpstreamBody::Empty);
        req.headers_mut()
            .insert(http::header::HOST, http::HeaderValue::from_static("b"));
        let Http1Conn { sender, driver, .. } = &mut conn;
        driver
            .drive(poll_fn(|cx| sender.poll_ready(cx)))
            .await
            .unwrap();
        let resp = driver.drive(sender.send_request(req)).await.unwrap();
        assert_eq!(resp.status(), 200);
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
