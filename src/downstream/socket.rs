//! Owns the accepted TCP socket of a downstream connection: [`LingeringTcp`], its write
//! deadline (`send_timeout`) and its lingering close, which drains what a client still sends
//! so that a request racing the close gets a FIN, not an RST; and [`WaitReadable`], how a
//! parked connection waits on its socket holding no HTTP state.

use std::io;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::time::Instant;
use tracing::debug;

/// How long a closing connection keeps reading (and discarding) what the client still sends,
/// so that a request racing the close gets a FIN rather than an RST (Apache's lingering close
/// uses 2 s).
pub(super) const LINGER_TIME: Duration = Duration::from_secs(2);
/// At most this much is drained while lingering.
const LINGER_MAX_BYTES: usize = 256 * 1024;
/// A downstream stream whose socket can be waited on without reading from it: how a parked
/// HTTP/1 connection waits for its next request while holding no HTTP state.
pub trait WaitReadable {
    /// Whether a new connection can wait this way before hyper first reads from it.
    const WAIT_BEFORE_FIRST_READ: bool;
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>>;
}

impl WaitReadable for LingeringTcp {
    const WAIT_BEFORE_FIRST_READ: bool = true;

    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.inner
            .as_ref()
            .expect("stream present until drop")
            .poll_read_ready(cx)
    }
}

/// Once hyper's read came back empty, rustls holds no unread plaintext and no whole record,
/// so waiting on the TCP socket is enough. Not so right after the handshake: the client's
/// first request may have come in with its last handshake message.
impl<T: WaitReadable> WaitReadable for tokio_rustls::server::TlsStream<T> {
    const WAIT_BEFORE_FIRST_READ: bool = false;
    fn poll_read_ready(&self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        if !self.get_ref().1.wants_read() {
            return Poll::Ready(Ok(()));
        }
        self.get_ref().0.poll_read_ready(cx)
    }
}

/// The accepted TCP socket. When dropped it is not closed at once: a task shuts down the
/// write side and drains what the client still sends for up to [`LINGER_TIME`], so the
/// kernel never answers late request bytes with an RST.
pub struct LingeringTcp {
    inner: Option<TcpStream>,
    /// `send_timeout`: how long a write may find the socket full before it fails.
    send_timeout: Duration,
    /// The send deadline, armed when a write finds the socket full (boxed: most connections
    /// never fill their socket buffer).
    stall: Option<Pin<Box<tokio::time::Sleep>>>,
    /// A write is waiting for room since the deadline was armed.
    waiting: bool,
}

impl LingeringTcp {
    pub fn new(stream: TcpStream) -> Self {
        LingeringTcp {
            inner: Some(stream),
            send_timeout: crate::config::DownstreamConfig::default().send_timeout,
            stall: None,
            waiting: false,
        }
    }

    /// Sets `send_timeout`: a write (of a response, a TLS record, an HTTP/2 frame) that finds
    /// the socket full for this long fails with `TimedOut`, which ends the connection and
    /// closes the upstream connection of the response in flight (nginx's send_timeout).
    pub fn with_send_timeout(mut self, send_timeout: Duration) -> Self {
        self.send_timeout = send_timeout;
        self
    }

    /// Passes a write's outcome through, failing it once the socket has had no room for
    /// `send_timeout`.
    fn progress<T>(
        &mut self,
        res: Poll<io::Result<T>>,
        cx: &mut Context<'_>,
    ) -> Poll<io::Result<T>> {
        if res.is_ready() {
            self.waiting = false;
            return res;
        }
        if !self.waiting {
            self.waiting = true;
            let at = Instant::now() + self.send_timeout;
            match &mut self.stall {
                Some(stall) => stall.as_mut().reset(at),
                None => self.stall = Some(Box::pin(tokio::time::sleep_until(at))),
            }
        }
        let stall = self.stall.as_mut().expect("armed above");
        if std::future::Future::poll(stall.as_mut(), cx).is_ready() {
            debug!(send_timeout = ?self.send_timeout, "downstream write made no progress; closing");
            return Poll::Ready(Err(io::Error::new(
                io::ErrorKind::TimedOut,
                "send_timeout: the client read nothing",
            )));
        }
        Poll::Pending
    }

    fn stream(self: Pin<&mut Self>) -> Pin<&mut TcpStream> {
        Pin::new(
            self.get_mut()
                .inner
                .as_mut()
                .expect("stream present until drop"),
        )
    }
}

impl AsyncRead for LingeringTcp {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.stream().poll_read(cx, buf)
    }
}

impl AsyncWrite for LingeringTcp {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = self.as_mut().stream().poll_write(cx, buf);
        self.get_mut().progress(res, cx)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = self.as_mut().stream().poll_write_vectored(cx, bufs);
        self.get_mut().progress(res, cx)
    }
    fn is_write_vectored(&self) -> bool {
        true
    }
}

impl Drop for LingeringTcp {
    fn drop(&mut self) {
        let Some(mut stream) = self.inner.take() else {
            return;
        };
        let Ok(rt) = tokio::runtime::Handle::try_current() else {
            return;
        };
        rt.spawn(async move {
            let _ = stream.shutdown().await;
            let mut buf = [0u8; 4096];
            let mut drained = 0;
            let _ = tokio::time::timeout(LINGER_TIME, async {
                loop {
                    match stream.read(&mut buf).await {
                        Ok(0) | Err(_) => break,
                        Ok(n) => {
                            drained += n;
                            if drained > LINGER_MAX_BYTES {
                                break;
                            }
                        }
                    }
                }
            })
            .await;
        });
    }
}
