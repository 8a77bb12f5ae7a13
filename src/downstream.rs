//! Owns one downstream (client) connection once it is accepted: HTTP/1.1 or HTTP/2 with hyper,
//! the idle and request-head timers, `Keep-Alive`/`Connection: close` on responses, and the
//! graceful close that never turns a racing request into an RST.
//!
//! hyper's own `header_read_timeout` starts when the server waits for the next request, so it
//! would close idle keep-alive connections after `header_timeout` without a 408. kaproxy runs
//! the two timers itself: [`ConnState`] records when a request head starts arriving (by
//! [`HeadWatch`], a read wrapper) and when requests begin and end (by the service), and the
//! driver loop in [`serve`] wakes at the next deadline (see [`ConnState::next_check`]).

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use arc_swap::ArcSwap;

use http::header::{self, HeaderValue};
use http::{Request, StatusCode};
use http_body::{Body, Frame, SizeHint};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::TcpStream;
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::debug;

use crate::config::DownstreamConfig;
use crate::proxy::DownstreamInfo;
use crate::server::Generation;

/// How long a closing connection keeps reading (and discarding) what the client still sends,
/// so that a request racing the close gets a FIN rather than an RST (Apache's lingering close
/// uses 2 s).
const LINGER_TIME: Duration = Duration::from_secs(2);
/// At most this much is drained while lingering.
const LINGER_MAX_BYTES: usize = 256 * 1024;

const NONE: u64 = u64::MAX;

const ACTION_NONE: u8 = 0;
const ACTION_408: u8 = 1;
const ACTION_SILENT_CLOSE: u8 = 2;

const RESPONSE_408: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";

/// What the timers need to know about a connection, shared by the service, the read wrapper
/// and the driver loop. Times are nanoseconds since `origin`.
pub struct ConnState {
    origin: Instant,
    in_flight: AtomicU32,
    served: AtomicU64,
    /// Since when the connection waits for a request (accept, or the last response's end).
    waiting_since: AtomicU64,
    /// When the first byte of the current request head arrived (NONE: no partial head).
    head_started: AtomicU64,
    /// Set by the driver when the head timer fires; acted on by [`HeadWatch`].
    action: AtomicU8,
    /// An HTTP/2 connection reached `max_requests_per_connection`: the driver sends GOAWAY.
    goaway: tokio::sync::Notify,
}

enum Timer {
    /// A request head is incomplete past `header_timeout`: answer 408.
    Head,
    /// A new connection sent nothing within `header_timeout`: close without a word.
    FirstRequest,
    /// A keep-alive connection idle past `idle_timeout`: close gracefully.
    Idle,
}

impl ConnState {
    fn new() -> Arc<Self> {
        Arc::new(ConnState {
            origin: Instant::now(),
            in_flight: AtomicU32::new(0),
            served: AtomicU64::new(0),
            waiting_since: AtomicU64::new(0),
            head_started: AtomicU64::new(NONE),
            action: AtomicU8::new(ACTION_NONE),
            goaway: tokio::sync::Notify::new(),
        })
    }

    fn now(&self) -> u64 {
        self.origin.elapsed().as_nanos() as u64
    }

    fn at(&self, nanos: u64) -> Instant {
        self.origin + Duration::from_nanos(nanos)
    }

    fn head_bytes_arrived(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0
            && self.head_started.load(Ordering::Acquire) == NONE
        {
            self.head_started.store(self.now(), Ordering::Release);
        }
    }

    /// Returns the request's sequence number on this connection (1-based).
    fn request_started(self: &Arc<Self>) -> (InFlight, u64) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_started.store(NONE, Ordering::Release);
        let n = self.served.fetch_add(1, Ordering::AcqRel) + 1;
        (InFlight(self.clone()), n)
    }

    /// When the driver should look again, and which timer fires then (None: just a check).
    ///
    /// Nothing on the request path wakes the driver (that would cost a wake-up and a timer
    /// re-registration per request). Instead, while a connection is busy or idle the driver
    /// checks at least every `header_timeout`: a request head that started after a check is
    /// seen at the next one, which is never later than its own deadline.
    fn next_check(
        &self,
        cfg: &DownstreamConfig,
        http1: bool,
        now: Instant,
    ) -> (Instant, Option<Timer>) {
        let check = now + cfg.header_timeout;
        if self.in_flight.load(Ordering::Acquire) > 0 {
            return (check, None);
        }
        let head = self.head_started.load(Ordering::Acquire);
        if http1 && head != NONE {
            return (self.at(head) + cfg.header_timeout, Some(Timer::Head));
        }
        let since = self.at(self.waiting_since.load(Ordering::Acquire));
        let (at, timer) = if http1 && self.served.load(Ordering::Acquire) == 0 {
            (
                since + cfg.header_timeout.min(cfg.idle_timeout),
                Timer::FirstRequest,
            )
        } else {
            (since + cfg.idle_timeout, Timer::Idle)
        };
        if http1 && check < at {
            (check, None)
        } else {
            (at, Some(timer))
        }
    }
}

/// Held while a request is being answered; its drop (end of the response body) restarts the
/// idle clock.
pub struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let state = &self.0;
        if state.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            state.waiting_since.store(state.now(), Ordering::Release);
        }
    }
}

/// The response body downstream: kaproxy's body plus the in-flight guard.
pub struct TrackedBody<B> {
    inner: B,
    _guard: InFlight,
}

impl<B: Body + Unpin> Body for TrackedBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<B::Data>, B::Error>>> {
        Pin::new(&mut self.inner).poll_frame(cx)
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

pin_project_lite::pin_project! {
    /// Read wrapper for HTTP/1 connections (above TLS): tells [`ConnState`] when a request head
    /// starts, and carries out the head timer's verdict (write a 408, then end the stream).
    pub struct HeadWatch<T> {
        #[pin]
        inner: T,
        state: Arc<ConnState>,
        written: usize,
    }
}

impl<T: AsyncRead + AsyncWrite> AsyncRead for HeadWatch<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let mut this = self.project();
        match this.state.action.load(Ordering::Acquire) {
            ACTION_NONE => {}
            ACTION_408 => {
                while *this.written < RESPONSE_408.len() {
                    match this
                        .inner
                        .as_mut()
                        .poll_write(cx, &RESPONSE_408[*this.written..])
                    {
                        Poll::Ready(Ok(n)) if n > 0 => *this.written += n,
                        Poll::Ready(_) => return Poll::Ready(Ok(())),
                        Poll::Pending => return Poll::Pending,
                    }
                }
                let _ = futures_util::ready!(this.inner.as_mut().poll_flush(cx));
                // End of stream: hyper drops the half-read head and closes.
                return Poll::Ready(Ok(()));
            }
            _ => return Poll::Ready(Ok(())),
        }
        let before = buf.filled().len();
        let res = this.inner.poll_read(cx, buf);
        if matches!(res, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            this.state.head_bytes_arrived();
        }
        res
    }
}

impl<T: AsyncWrite> AsyncWrite for HeadWatch<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.project().inner.poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// The accepted TCP socket. When dropped it is not closed at once: a task shuts down the
/// write side and drains what the client still sends for up to [`LINGER_TIME`], so the
/// kernel never answers late request bytes with an RST.
pub struct LingeringTcp {
    inner: Option<TcpStream>,
}

impl LingeringTcp {
    pub fn new(stream: TcpStream) -> Self {
        LingeringTcp {
            inner: Some(stream),
        }
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
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.stream().poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.stream().poll_shutdown(cx)
    }
    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.stream().poll_write_vectored(cx, bufs)
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

/// Serves one downstream connection until it closes. `http2` is the ALPN verdict.
pub async fn serve<I>(
    io: I,
    http2: bool,
    info: DownstreamInfo,
    current: Arc<ArcSwap<Generation>>,
    cfg: Arc<DownstreamConfig>,
    mut shutdown: watch::Receiver<bool>,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let state = ConnState::new();
    let svc_state = state.clone();
    let svc_cfg = cfg.clone();
    let keep_alive_value =
        HeaderValue::from_str(&format!("timeout={}", cfg.idle_timeout.as_secs()))
            .expect("digits are a valid header value");
    let service = service_fn(move |req: Request<Incoming>| {
        // Each request uses the configuration current when it arrives (reload).
        let proxy = current.load().proxy.clone();
        let state = svc_state.clone();
        let cfg = svc_cfg.clone();
        let info = info.clone();
        let keep_alive_value = keep_alive_value.clone();
        async move {
            let (guard, n) = state.request_started();
            let mut resp = proxy.handle(req, &info).await;
            let last = n >= cfg.max_requests_per_connection;
            if http2 && n == cfg.max_requests_per_connection {
                state.goaway.notify_one();
            }
            if !http2 && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                let headers = resp.headers_mut();
                if last {
                    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
                } else if cfg.advertise_keep_alive {
                    headers.insert(crate::pool::KEEP_ALIVE, keep_alive_value);
                }
            }
            Ok::<_, Infallible>(resp.map(|inner| TrackedBody {
                inner,
                _guard: guard,
            }))
        }
    });

    if http2 {
        let conn = hyper::server::conn::http2::Builder::new(TokioExecutor::new())
            .timer(TokioTimer::new())
            .max_header_list_size(cfg.max_header_bytes as u32)
            .serve_connection(TokioIo::new(io), service);
        drive(conn, &state, &cfg, false, &mut shutdown, |c| {
            c.graceful_shutdown()
        })
        .await;
    } else {
        let io = HeadWatch {
            inner: io,
            state: state.clone(),
            written: 0,
        };
        let conn = hyper::server::conn::http1::Builder::new()
            .timer(TokioTimer::new())
            .header_read_timeout(None)
            .max_buf_size(cfg.max_header_bytes)
            .max_header_size(cfg.max_header_bytes)
            .serve_connection(TokioIo::new(io), service)
            .with_upgrades();
        drive(conn, &state, &cfg, true, &mut shutdown, |c| {
            c.graceful_shutdown()
        })
        .await;
    }
}

/// Runs a hyper connection to completion while firing the head/idle timers and honouring
/// server shutdown.
async fn drive<C, E>(
    conn: C,
    state: &Arc<ConnState>,
    cfg: &DownstreamConfig,
    http1: bool,
    shutdown: &mut watch::Receiver<bool>,
    graceful: impl Fn(Pin<&mut C>),
) where
    C: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
    tokio::pin!(conn);
    let mut closing = false;
    let (first, _) = state.next_check(cfg, http1, Instant::now());
    let sleep = tokio::time::sleep_until(first);
    tokio::pin!(sleep);
    loop {
        tokio::select! {
            res = conn.as_mut() => {
                if let Err(e) = res {
                    debug!(error = %e, "downstream connection ended with error");
                }
                return;
            }
            _ = shutdown.changed(), if !closing => {
                closing = true;
                graceful(conn.as_mut());
            }
            _ = state.goaway.notified(), if !closing && !http1 => {
                debug!("max_requests_per_connection reached; GOAWAY");
                closing = true;
                graceful(conn.as_mut());
            }
            _ = sleep.as_mut(), if !closing => {
                let now = Instant::now();
                match state.next_check(cfg, http1, now) {
                    (at, Some(timer)) if at <= now => {
                        closing = true;
                        // The next turn of the loop polls the connection, whose read then
                        // sees the verdict (HeadWatch) or hyper closes (graceful).
                        match timer {
                            Timer::Head => {
                                debug!("request head not complete within header_timeout; 408");
                                state.action.store(ACTION_408, Ordering::Release);
                            }
                            Timer::FirstRequest => {
                                state.action.store(ACTION_SILENT_CLOSE, Ordering::Release);
                            }
                            Timer::Idle => {
                                debug!("downstream connection idle; closing gracefully");
                                graceful(conn.as_mut());
                            }
                        }
                    }
                    (at, _) => sleep.as_mut().reset(at),
                }
            }
        }
    }
}
