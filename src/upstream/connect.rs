//! Owns how kaproxy connects to a backend: the TCP dial (connect timeout, TCP_NODELAY,
//! keepalive) and [`Http1`], the pool's real connector — hyper's HTTP/1.1 client connection,
//! driven by the task of the request that uses it (no task or channel hop per request), and
//! checked without blocking before it is reused.

use std::future::{poll_fn, Future};
use std::net::SocketAddr;
use std::pin::Pin;
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use hyper::client::conn::http1::{Connection as HyperConn, SendRequest};
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tracing::debug;

use crate::body::UpstreamBody;
use crate::config::PoolConfig;
use crate::error::RequestError;

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
pub async fn dial(addr: SocketAddr, cfg: &PoolConfig) -> Result<TcpStream, RequestError> {
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

/// The real connector: TCP (`connect_timeout`, TCP_NODELAY, keepalive) and hyper's HTTP/1.1
/// client handshake.
pub struct Http1;

/// A live HTTP/1.1 connection: hyper's sender and its connection state machine, which the
/// request's own task polls (see [`Driver`]).
pub struct Http1Conn {
    pub(crate) sender: SendRequest<UpstreamBody>,
    pub(crate) driver: Driver,
}

impl Connection for Http1Conn {
    fn is_closed(&mut self) -> bool {
        // One poll with a waker nobody listens to: an idle hyper connection reads, so a
        // backend's FIN (or a stray byte, which hyper treats as an error) ends it now.
        let mut cx = Context::from_waker(Waker::noop());
        self.driver.poll(&mut cx).is_ready() || self.sender.is_closed()
    }

    /// hyper's dispatcher is idle: false while it is still writing an earlier request's body
    /// (a backend that answered early), for example.
    fn is_idle(&mut self) -> bool {
        let mut cx = Context::from_waker(Waker::noop());
        !self.driver.poll(&mut cx).is_ready() && self.sender.is_ready()
    }

    /// A backend may answer before it has read the whole request body (RFC 9112 §9.5 lets it);
    /// hyper then still writes the rest of the body, and the connection is idle only after.
    async fn settle(&mut self) -> bool {
        let Http1Conn { sender, driver } = self;
        driver
            .drive(poll_fn(|cx| sender.poll_ready(cx)))
            .await
            .is_ok()
    }
}

/// hyper's client connection state machine (it reads and writes the socket), polled inline by
/// whichever task uses the connection: the request's while it is checked out, nobody while it
/// idles in the pool (the pool polls it once, without blocking, before reuse).
pub struct Driver {
    conn: Option<Pin<Box<HyperConn<TokioIo<TcpStream>, UpstreamBody>>>>,
    addr: SocketAddr,
    id: u64,
}

impl Driver {
    /// Makes progress on the connection; `Ready` once it has ended (peer close, error, or
    /// `Connection: close` done), after which the connection is gone.
    pub(crate) fn poll(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        let Some(conn) = self.conn.as_mut() else {
            return Poll::Ready(());
        };
        match conn.as_mut().poll(cx) {
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
        let stream = dial(addr, cfg).await?;
        let (sender, conn) = hyper::client::conn::http1::Builder::new()
            .handshake::<_, UpstreamBody>(TokioIo::new(stream))
            .await
            .map_err(|source| RequestError::Handshake { addr, source })?;
        Ok(Http1Conn {
            sender,
            driver: Driver {
                conn: Some(Box::pin(conn)),
                addr,
                id,
            },
        })
    }
}

fn set_socket_options(stream: &TcpStream, keepalive: Option<Duration>) {
    let _ = stream.set_nodelay(true);
    if let Some(idle) = keepalive {
        let sock = socket2::SockRef::from(stream);
        let _ = sock.set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(idle));
    }
}
