//! Owns how kaproxy connects to a backend: the TCP dial (connect timeout, TCP_NODELAY,
//! keepalive) and [`Http1`], the pool's real connector (hyper's HTTP/1.1 handshake and the task
//! that keeps reading while the connection idles, so a backend's FIN is seen at once).

use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Weak};
use std::time::Duration;

use hyper::client::conn::http1::SendRequest;
use hyper_util::rt::TokioIo;
use tokio::net::TcpStream;
use tokio::sync::Notify;
use tracing::debug;

use crate::body::UpstreamBody;
use crate::config::PoolConfig;
use crate::error::RequestError;

/// What the pool needs of a live connection: whether its peer has closed it (as hyper-util's
/// pool needs `is_open`). Everything else the pool decides from its own clock.
pub trait Connection: Send + Sync + 'static {
    fn is_closed(&self) -> bool;
}

/// How a pool opens a connection to its backend: [`Http1`] for real traffic; the pool's unit
/// tests use fakes, so its deadlines run under paused time.
pub trait Connector: Send + Sync + Sized + 'static {
    type Conn: Connection;
    /// Opens connection `id` to `addr` with the pool's settings; a connector that watches the
    /// connection notifies `ended` when it ends, so the pool's sweep drops it before anyone
    /// takes it.
    fn connect(
        &self,
        addr: SocketAddr,
        cfg: &PoolConfig,
        id: u64,
        ended: Weak<Notify>,
    ) -> impl std::future::Future<Output = Result<Self::Conn, RequestError>> + Send;
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
/// client handshake; the connection's task keeps reading while it idles, so a backend's FIN
/// is seen at once.
pub struct Http1;

/// A live HTTP/1.1 connection: hyper's sender, and whether its task has ended.
pub struct Http1Conn {
    pub(crate) sender: SendRequest<UpstreamBody>,
    /// Set by the connection task when hyper's connection ends (peer EOF, error, or our close).
    ended: Arc<AtomicBool>,
}

impl Connection for Http1Conn {
    fn is_closed(&self) -> bool {
        self.ended.load(Ordering::Acquire) || self.sender.is_closed()
    }
}

impl Connector for Http1 {
    type Conn = Http1Conn;

    async fn connect(
        &self,
        addr: SocketAddr,
        cfg: &PoolConfig,
        id: u64,
        ended_notify: Weak<Notify>,
    ) -> Result<Http1Conn, RequestError> {
        let stream = dial(addr, cfg).await?;
        let (sender, connection) = hyper::client::conn::http1::Builder::new()
            .handshake::<_, UpstreamBody>(TokioIo::new(stream))
            .await
            .map_err(|source| RequestError::Handshake { addr, source })?;
        let ended = Arc::new(AtomicBool::new(false));
        let watch = ended.clone();
        let weak = ended_notify;
        // The connection task reads while the connection is idle, so a backend's FIN ends it
        // at once; the sweep then drops the dead connection before anyone can take it.
        tokio::spawn(async move {
            if let Err(e) = connection.await {
                debug!(server = %addr, conn = id, error = %e, "pool: upstream connection ended with error");
            }
            watch.store(true, Ordering::Release);
            if let Some(sweep) = weak.upgrade() {
                sweep.notify_one();
            }
        });
        Ok(Http1Conn { sender, ended })
    }
}

fn set_socket_options(stream: &TcpStream, keepalive: Option<Duration>) {
    let _ = stream.set_nodelay(true);
    if let Some(idle) = keepalive {
        let sock = socket2::SockRef::from(stream);
        let _ = sock.set_tcp_keepalive(&socket2::TcpKeepalive::new().with_time(idle));
    }
}
