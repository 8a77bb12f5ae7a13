//! Owns the byte stream to a backend: plain TCP or TLS over it ([`UpstreamStream`]), the
//! socket under either tracked for what the backend acknowledged
//! ([`crate::upstream::delivery`]).

use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::TcpStream;
use tokio_rustls::client::TlsStream;

use crate::upstream::delivery::{Delivery, Tracked};

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
    pub fn send_close_notify(&mut self) {
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
