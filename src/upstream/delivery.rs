//! Owns what a backend's TCP stack acknowledged of what kaproxy wrote on a connection: the
//! bytes written, counted at the socket under TLS ([`Tracked`]), the bytes acknowledged, read
//! from Linux `TCP_INFO` (`tcpi_bytes_acked`) as the socket closes, and the verdict the retry
//! rule asks for (README, "When a request is sent again"): whether a request provably never
//! reached the backend.
//!
//! The proof: a backend whose socket is closed answers data with a reset and acknowledges none
//! of it (RFC 9293 §3.10.7.1 for a closed connection; Linux does the same for data after
//! `close()`), while a backend that received the bytes acknowledges them — a FIN after a
//! read carries the acknowledgement with it. So a connection that was **reset** with **none**
//! of a request's bytes acknowledged never gave that request to the backend's application,
//! whatever its method, and sending it again cannot process it twice. Anything less (bytes
//! acknowledged, or an end of stream whose reset has not come yet, within a short wait) is no
//! proof, and the request is not sent again on its account.

use std::io;
use std::os::fd::AsRawFd;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncWrite, Interest, ReadBuf};
use tokio::net::TcpStream;

/// How long a verdict waits for the reset (or an acknowledgement) that settles it, at most: the
/// backend answers data on a closed socket within one round trip, so this is many round trips
/// on any network a pool spans, and the wait is paid only by a request that failed anyway.
const SETTLE_WAIT: Duration = Duration::from_millis(100);

/// What one connection's socket wrote and had acknowledged, shared between the socket (inside
/// hyper's connection) and the pooled connection that asks for a verdict.
#[derive(Debug, Default)]
pub struct Delivery {
    /// Bytes written to the socket so far (one writer: the socket's own poll_write).
    written: AtomicU64,
    /// The socket as it closed, when no verdict could be read off it then: kept open so that a
    /// verdict can wait for the backend's reset or acknowledgement.
    parked: Mutex<Option<TcpStream>>,
    /// `TCP_INFO` read as the socket closed, if it was.
    at_close: Mutex<Option<TcpState>>,
    /// `tcpi_bytes_acked` before kaproxy wrote anything: Linux counts the SYN of a connection
    /// it opened as one acknowledged byte.
    acked_before: u64,
}

/// What `TCP_INFO` said of a socket.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TcpState {
    /// Payload bytes the peer acknowledged (`tcpi_bytes_acked`, Linux 4.1+).
    pub bytes_acked: u64,
    /// The connection was reset or is fully closed (`TCP_CLOSE`).
    pub closed: bool,
}

/// Whether a request reached the backend, as far as its TCP stack shows.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Verdict {
    /// Reset with none of the request's bytes acknowledged: the backend never received it.
    NeverReceived,
    /// Some byte of it was acknowledged, or nothing settled it: it may have been processed.
    MaybeReceived,
}

impl Delivery {
    /// Bytes written so far: the mark a request's bytes start after.
    pub fn written(&self) -> u64 {
        self.written.load(Ordering::Relaxed)
    }

    /// Whether the bytes written after `mark` (one request) provably never reached the
    /// backend. Call it once the connection has been dropped (its socket closed or parked);
    /// waits up to [`SETTLE_WAIT`] for the reset when the backend's FIN came before it.
    pub async fn verdict(&self, mark: u64) -> Verdict {
        if self.written() <= mark {
            // Nothing of this request was written (hyper gives such a request back unsent).
            return Verdict::MaybeReceived;
        }
        let mark = mark + self.acked_before;
        let parked = crate::sync::lock(&self.parked).take();
        let state = match parked {
            Some(tcp) => settle(&tcp, mark).await,
            None => *crate::sync::lock(&self.at_close),
        };
        match state {
            Some(s) if s.closed && s.bytes_acked <= mark => Verdict::NeverReceived,
            _ => Verdict::MaybeReceived,
        }
    }

    /// Records the socket as it closes: its state when that settles a verdict, else the socket
    /// itself, parked until the verdict is asked for or the connection is forgotten.
    fn closing(&self, tcp: TcpStream) {
        let state = tcp_state(&tcp);
        let settled = match state {
            Some(s) => s.closed || s.bytes_acked >= self.written() + self.acked_before,
            None => true,
        };
        if settled {
            *crate::sync::lock(&self.at_close) = state;
        } else {
            *crate::sync::lock(&self.parked) = Some(tcp);
        }
    }
}

/// Waits (at most [`SETTLE_WAIT`]) until the socket is reset or its peer acknowledged a byte
/// past `mark`; the state then, or at the end of the wait.
async fn settle(tcp: &TcpStream, mark: u64) -> Option<TcpState> {
    let deadline = tokio::time::Instant::now() + SETTLE_WAIT;
    loop {
        let state = tcp_state(tcp)?;
        if state.closed || state.bytes_acked > mark {
            return Some(state);
        }
        // A reset makes the socket readable (with an error); an acknowledgement does not, so
        // the state is read again every few milliseconds as well.
        let step = (tokio::time::Instant::now() + Duration::from_millis(5)).min(deadline);
        let woke = tokio::time::timeout_at(step, tcp.ready(Interest::READABLE)).await;
        if tokio::time::Instant::now() >= deadline {
            return tcp_state(tcp);
        }
        if let Ok(Ok(ready)) = woke {
            if ready.is_read_closed() || ready.is_error() {
                // Drain the readiness so the next wait blocks until something new happens.
                let mut buf = [0u8; 1];
                let _ = tcp.try_read(&mut buf);
            }
        }
    }
}

/// Linux's `TCP_CLOSE` state (include/net/tcp_states.h), which the libc crate does not name.
const TCP_CLOSE: u8 = 7;

/// `TCP_INFO` of a socket (Linux): the crate's one `unsafe` (lib.rs).
#[allow(unsafe_code)]
pub fn tcp_state(tcp: &TcpStream) -> Option<TcpState> {
    // SAFETY: tcp_info is plain integers, for which all-zero bytes are a valid value.
    let mut info: libc::tcp_info = unsafe { std::mem::zeroed() };
    let mut len = std::mem::size_of::<libc::tcp_info>() as libc::socklen_t;
    // SAFETY: `info` is a writable tcp_info of `len` bytes, and the fd is the live socket
    // `tcp` owns; the kernel writes at most `len` bytes and updates `len`.
    let rc = unsafe {
        libc::getsockopt(
            tcp.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            (&mut info as *mut libc::tcp_info).cast(),
            &mut len,
        )
    };
    if rc != 0 {
        return None;
    }
    Some(TcpState {
        bytes_acked: info.tcpi_bytes_acked,
        closed: info.tcpi_state == TCP_CLOSE,
    })
}

/// The bytes of one request: what the socket had written before it (the mark), to ask once
/// the connection is dropped whether the backend ever received any of it.
pub struct Written {
    delivery: Arc<Delivery>,
    mark: u64,
}

impl Written {
    /// Marks where the next request's bytes start on this connection.
    pub fn from_now(delivery: &Arc<Delivery>) -> Written {
        Written {
            delivery: delivery.clone(),
            mark: delivery.written(),
        }
    }

    /// True when the backend's TCP stack reset the connection and acknowledged none of the
    /// request's bytes (module doc).
    pub async fn never_received(&self) -> bool {
        self.delivery.verdict(self.mark).await == Verdict::NeverReceived
    }
}

/// A backend's TCP socket that counts what it writes into its [`Delivery`], and hands itself
/// to it when dropped.
#[derive(Debug)]
pub struct Tracked {
    tcp: Option<TcpStream>,
    delivery: Arc<Delivery>,
}

impl Tracked {
    /// Tracks a connected socket that has written nothing yet.
    pub fn new(tcp: TcpStream) -> Tracked {
        let acked_before = tcp_state(&tcp).map_or(0, |s| s.bytes_acked);
        Tracked {
            tcp: Some(tcp),
            delivery: Arc::new(Delivery {
                acked_before,
                ..Delivery::default()
            }),
        }
    }

    /// What this socket wrote and had acknowledged.
    pub fn delivery(&self) -> &Arc<Delivery> {
        &self.delivery
    }

    /// The socket, for what sets its options or reads its addresses.
    pub fn get_ref(&self) -> &TcpStream {
        self.tcp.as_ref().expect("socket present until drop")
    }

    fn tcp(self: Pin<&mut Self>) -> Pin<&mut TcpStream> {
        Pin::new(
            self.get_mut()
                .tcp
                .as_mut()
                .expect("socket present until drop"),
        )
    }

    fn count(&self, written: &Poll<io::Result<usize>>) {
        if let Poll::Ready(Ok(n)) = written {
            // One writer: a load and a store, no read-modify-write.
            let d = &self.delivery.written;
            d.store(d.load(Ordering::Relaxed) + *n as u64, Ordering::Relaxed);
        }
    }
}

impl Drop for Tracked {
    fn drop(&mut self) {
        if let Some(tcp) = self.tcp.take() {
            self.delivery.closing(tcp);
        }
    }
}

impl AsyncRead for Tracked {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        self.tcp().poll_read(cx, buf)
    }
}

impl AsyncWrite for Tracked {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let written = self.as_mut().tcp().poll_write(cx, buf);
        self.count(&written);
        written
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let written = self.as_mut().tcp().poll_write_vectored(cx, bufs);
        self.count(&written);
        written
    }

    fn is_write_vectored(&self) -> bool {
        true
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.tcp().poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.tcp().poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::TcpListener;

    async fn pair() -> (Tracked, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        (Tracked::new(client.unwrap()), accepted.unwrap().0)
    }

    /// Reads until the peer closes; what it read.
    async fn read_to_end(s: &mut Tracked) -> Vec<u8> {
        let mut out = Vec::new();
        let _ = s.read_to_end(&mut out).await;
        out
    }

    #[tokio::test]
    async fn a_request_written_after_the_backend_closed_never_reached_it() {
        let (mut ours, backend) = pair().await;
        ours.write_all(b"first request").await.unwrap();
        let mut backend = backend;
        let mut buf = [0u8; 13];
        backend.read_exact(&mut buf).await.unwrap();
        backend.write_all(b"response").await.unwrap();
        let mut got = [0u8; 8];
        ours.read_exact(&mut got).await.unwrap();
        // The backend's idle timer fires: it closes. Our write races its FIN, as a pool's
        // reuse does; the backend's kernel answers with a reset and acknowledges nothing.
        drop(backend);
        let delivery = ours.delivery().clone();
        let mark = delivery.written();
        let _ = ours.write_all(b"POST /pay HTTP/1.1\r\n\r\n").await;
        assert!(read_to_end(&mut ours).await.is_empty());
        drop(ours);
        assert_eq!(delivery.verdict(mark).await, Verdict::NeverReceived);
    }

    #[tokio::test]
    async fn a_request_the_backend_read_before_closing_may_have_been_processed() {
        let (mut ours, mut backend) = pair().await;
        let delivery = ours.delivery().clone();
        let mark = delivery.written();
        ours.write_all(b"POST /pay HTTP/1.1\r\n\r\n").await.unwrap();
        // The backend reads the request, then closes without answering (a crash, or a drop
        // on reuse): its FIN acknowledges the request.
        let mut buf = [0u8; 22];
        backend.read_exact(&mut buf).await.unwrap();
        drop(backend);
        assert!(read_to_end(&mut ours).await.is_empty());
        drop(ours);
        assert_eq!(delivery.verdict(mark).await, Verdict::MaybeReceived);
    }

    #[tokio::test]
    async fn a_request_acknowledged_but_unread_is_no_proof() {
        let (mut ours, backend) = pair().await;
        let delivery = ours.delivery().clone();
        let mark = delivery.written();
        ours.write_all(b"POST /pay HTTP/1.1\r\n\r\n").await.unwrap();
        // Wait until the backend's kernel acknowledged it (polled, bounded).
        let acked = async {
            while tcp_state(ours.get_ref()).unwrap().bytes_acked <= mark + 1 {
                tokio::time::sleep(Duration::from_millis(1)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), acked)
            .await
            .expect("loopback acknowledges at once");
        // Closing with the request unread resets the connection: a reset, but after an
        // acknowledgement, which proves nothing about the application.
        drop(backend);
        let _ = read_to_end(&mut ours).await;
        drop(ours);
        assert_eq!(delivery.verdict(mark).await, Verdict::MaybeReceived);
    }

    #[tokio::test]
    async fn nothing_written_is_no_verdict_of_ours() {
        let (ours, backend) = pair().await;
        let delivery = ours.delivery().clone();
        let mark = delivery.written();
        drop(backend);
        drop(ours);
        assert_eq!(delivery.verdict(mark).await, Verdict::MaybeReceived);
    }
}
