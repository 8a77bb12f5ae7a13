//! Owns serving one downstream (client) connection once it is accepted (its socket is
//! [`super::socket`]): HTTP/1.1 or HTTP/2 with hyper,
//! the idle and request-head timers, `Keep-Alive`/`Connection: close` on responses, and the
//! graceful close that never turns a racing request into an RST.
//!
//! hyper's own `header_read_timeout` starts when the server waits for the next request, so it
//! would close idle keep-alive connections after `header_timeout` without a 408. kaproxy runs
//! the two timers itself: [`ConnState`] records when a request head starts arriving (by
//! [`HeadWatch`], a read wrapper) and when requests begin and end (by the service), and the
//! driver loop in [`serve`] wakes at the next deadline (see [`ConnState::next_check`]).
//!
//! An HTTP/1 connection idle for [`PARK_AFTER`] between requests is *parked*: kaproxy takes
//! the socket back from hyper (dropping its two 8 KiB buffers) and waits on the bare socket
//! until the next request's first bytes arrive, as nginx does with its idle connections. A new
//! connection waits the same way for its first request.

use std::convert::Infallible;
use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use http::header::{self, HeaderValue};
use http::{Request, StatusCode};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Either;
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::sync::watch;
use tokio::time::Instant;
use tracing::debug;

use crate::body::BodyDone;
use crate::config::DownstreamConfig;
use crate::downstream::h2_head::H2HeadWatch;
use crate::downstream::send_watch::SendWatch;
use crate::downstream::socket::{WaitReadable, LINGER_TIME};
use crate::downstream::ConnContext;

/// An HTTP/1 connection idle this long between requests gives hyper's state back and waits
/// on the bare socket (see the module doc). Long enough that a busy connection never pays
/// for setting hyper up again; short enough that idle keep-alive clients soon cost a few KiB
/// each instead of ~20.
pub const PARK_AFTER: Duration = Duration::from_secs(1);

/// The most header fields a request may have, on either protocol: hyper's HTTP/1 parser
/// answers 431 past 100 fields, and Apache's `LimitRequestFields` is 100 too; HTTP/2 requests
/// are held to the same (their bytes are bounded by `max_header_bytes` in both).
pub const MAX_HEADER_FIELDS: usize = 100;

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
    /// An HTTP/2 stream was cut off by `send_timeout` (see [`crate::downstream::send_watch`]): the driver
    /// closes the connection, since hyper cannot reset a stream it no longer polls.
    stalled: Arc<tokio::sync::Notify>,
    /// hyper's last read found nothing to read (set by [`HeadWatch`]).
    read_blocked: AtomicBool,
    /// hyper wrote bytes it has not flushed yet (set by [`HeadWatch`]).
    unflushed: AtomicBool,
}

enum Timer {
    /// A request head is incomplete past `header_timeout`: answer 408.
    Head,
    /// A new connection sent nothing within `header_timeout`: close without a word.
    FirstRequest,
    /// A keep-alive connection idle past `idle_timeout`: close gracefully.
    Idle,
    /// An HTTP/1 connection idle past [`PARK_AFTER`]: take the socket back from hyper.
    Park,
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
            stalled: Arc::new(tokio::sync::Notify::new()),
            read_blocked: AtomicBool::new(false),
            unflushed: AtomicBool::new(false),
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

    /// A request body is still to be read: the connection is busy until it ends (hyper may be
    /// reading it after the response has gone, so the response's end alone is not enough).
    fn body_started(self: &Arc<Self>) -> InFlight {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        InFlight(self.clone())
    }

    /// hyper waits for the next request with everything written: its state can be dropped.
    fn io_idle(&self) -> bool {
        self.read_blocked.load(Ordering::Acquire) && !self.unflushed.load(Ordering::Acquire)
    }

    /// When a parked connection (no request in flight, no head started) is closed: after
    /// `header_timeout` (or `idle_timeout` if shorter) for a new one, `idle_timeout` after its
    /// last response for one that has served.
    fn close_deadline(&self, cfg: &DownstreamConfig) -> Instant {
        let since = self.at(self.waiting_since.load(Ordering::Acquire));
        if self.served.load(Ordering::Acquire) == 0 {
            since + cfg.header_timeout.min(cfg.idle_timeout)
        } else {
            since + cfg.idle_timeout
        }
    }

    /// When the driver should look again, and which timer fires then (None: just a check).
    ///
    /// Nothing on the request path wakes the driver (that would cost a wake-up and a timer
    /// re-registration per request). Instead, while a connection is busy or idle the driver
    /// checks at least every `header_timeout`: a request head that started after a check is
    /// seen at the next one, which is never later than its own deadline. HTTP/1 connections
    /// are checked at least every [`PARK_AFTER`], to be parked soon after they go idle.
    fn next_check(
        &self,
        cfg: &DownstreamConfig,
        http1: bool,
        now: Instant,
    ) -> (Instant, Option<Timer>) {
        let check = if http1 {
            now + cfg.header_timeout.min(PARK_AFTER)
        } else {
            now + cfg.header_timeout
        };
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
        let mut next = (at, Some(timer));
        if http1 && check < at {
            next = (check, None);
        }
        // Park once idle long enough, if hyper is at rest by then (else look again later).
        let park = since + PARK_AFTER;
        if http1 && park < next.0 && (park > now || self.io_idle()) {
            next = (park, Some(Timer::Park));
        }
        next
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
    /// starts and whether hyper is at rest, and carries out the head timer's verdict (write a
    /// 408, then end the stream). `prefix` is what an earlier hyper read but did not parse.
    pub struct HeadWatch<T> {
        #[pin]
        inner: T,
        state: Arc<ConnState>,
        written: usize,
        prefix: Bytes,
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
        if !this.prefix.is_empty() {
            let n = this.prefix.len().min(buf.remaining());
            buf.put_slice(&this.prefix[..n]);
            this.prefix.advance(n);
            this.state.head_bytes_arrived();
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let res = this.inner.poll_read(cx, buf);
        match res {
            Poll::Ready(Ok(())) => {
                this.state.read_blocked.store(false, Ordering::Release);
                if buf.filled().len() > before {
                    this.state.head_bytes_arrived();
                }
            }
            Poll::Pending => this.state.read_blocked.store(true, Ordering::Release),
            Poll::Ready(Err(_)) => {}
        }
        res
    }
}

impl<T> HeadWatch<T> {
    fn wrote(&self, res: &Poll<io::Result<usize>>) {
        if matches!(res, Poll::Ready(Ok(n)) if *n > 0) {
            self.state.unflushed.store(true, Ordering::Release);
        }
    }
}

impl<T: AsyncWrite> AsyncWrite for HeadWatch<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let res = self.as_mut().project().inner.poll_write(cx, buf);
        self.wrote(&res);
        res
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        let this = self.project();
        let res = this.inner.poll_flush(cx);
        if matches!(res, Poll::Ready(Ok(()))) {
            this.state.unflushed.store(false, Ordering::Release);
        }
        res
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.project().inner.poll_shutdown(cx)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let res = self.as_mut().project().inner.poll_write_vectored(cx, bufs);
        self.wrote(&res);
        res
    }
    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }
}

/// Serves one downstream connection until it closes. `http2` is the ALPN verdict; `waiting`
/// counts connections parked between requests; `limit` is where a parked connection
/// registers as one that may be closed to make room at `max_connections` (HTTP/2 connections
/// never are).
#[allow(clippy::too_many_arguments)]
pub async fn serve<I>(io: I, http2: bool, ctx: ConnContext)
where
    I: AsyncRead + AsyncWrite + WaitReadable + Unpin + Send + 'static,
{
    let ConnContext {
        info,
        current,
        cfg,
        mut shutdown,
        waiting,
        limit,
    } = ctx;
    let state = ConnState::new();
    let svc_state = state.clone();
    let svc_cfg = cfg.clone();
    let keep_alive_value =
        HeaderValue::from_str(&format!("timeout={}", cfg.idle_timeout.as_secs()))
            .expect("digits are a valid header value");
    let service = service_fn(move |mut req: Request<Incoming>| {
        // Each request uses the configuration current when it arrives (reload).
        let proxy = current.load().proxy.clone();
        let state = svc_state.clone();
        let cfg = svc_cfg.clone();
        let info = info.clone();
        let keep_alive_value = keep_alive_value.clone();
        async move {
            let (guard, n) = state.request_started();
            if !req.body().is_end_stream() {
                let done: BodyDone = Arc::new(state.body_started());
                req.extensions_mut().insert(done);
            }
            let mut resp = if http2 && req.headers().len() > MAX_HEADER_FIELDS {
                // The limit HTTP/1 requests meet in hyper's parser, for HTTP/2 too.
                debug!(
                    fields = req.headers().len(),
                    "HTTP/2 request with too many header fields; 431"
                );
                crate::proxy::local_response(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    "too many header fields\n",
                )
            } else {
                proxy.handle(req, &info).await
            };
            let last = n >= cfg.max_requests_per_connection;
            if http2 && n == cfg.max_requests_per_connection {
                state.goaway.notify_one();
            }
            if !http2 && resp.status() != StatusCode::SWITCHING_PROTOCOLS {
                let headers = resp.headers_mut();
                if last {
                    headers.insert(header::CONNECTION, HeaderValue::from_static("close"));
                } else if cfg.advertise_keep_alive && !headers.contains_key(header::CONNECTION) {
                    headers.insert(crate::headers::KEEP_ALIVE, keep_alive_value);
                }
            }
            // A body streaming from a pooled upstream connection goes under send_timeout on
            // an HTTP/2 stream, whose closed window the socket's write deadline cannot see.
            let watch = http2 && resp.body().streams_from_upstream();
            Ok::<_, Infallible>(resp.map(|body| TrackedBody {
                inner: if watch {
                    Either::Right(SendWatch::new(
                        body,
                        cfg.send_timeout,
                        Some(state.stalled.clone()),
                    ))
                } else {
                    Either::Left(body)
                },
                _guard: guard,
            }))
        }
    });

    if http2 {
        // Boxed, like the HTTP/1 rounds below: the HTTP/2 state would otherwise make every
        // connection's task 2 KiB larger.
        let mut conn = Box::pin(
            hyper::server::conn::http2::Builder::new(TokioExecutor::new())
                .timer(TokioTimer::new())
                // A PING after send_timeout without a frame from the client, answered within
                // send_timeout, finds a dead client's connection.
                .keep_alive_interval(Some(cfg.send_timeout))
                .keep_alive_timeout(cfg.send_timeout)
                .max_header_list_size(cfg.max_header_bytes as u32)
                .serve_connection(
                    TokioIo::new(H2HeadWatch::new(io, cfg.header_timeout)),
                    service,
                ),
        );
        drive(conn.as_mut(), &state, &cfg, false, &mut shutdown, |c| {
            c.graceful_shutdown()
        })
        .await;
        return;
    }

    let mut builder = hyper::server::conn::http1::Builder::new();
    builder
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(cfg.max_header_bytes)
        .max_header_size(cfg.max_header_bytes);
    let mut io = io;
    let mut prefix = Bytes::new();
    let mut parked = I::WAIT_BEFORE_FIRST_READ;
    loop {
        if parked && prefix.is_empty() {
            waiting.inc();
            let woken = wait_for_request(&io, &state, &cfg, &mut shutdown, &limit).await;
            waiting.dec();
            if !woken {
                let _ = tokio::time::timeout(LINGER_TIME, io.shutdown()).await;
                return;
            }
        }
        state.read_blocked.store(false, Ordering::Release);
        state.unflushed.store(false, Ordering::Release);
        // Boxed: hyper's connection lives on the heap only while it serves, so a parked
        // connection's task stays small.
        let round = Box::pin(async {
            let watched = HeadWatch {
                inner: io,
                state: state.clone(),
                written: 0,
                prefix: std::mem::take(&mut prefix),
            };
            let mut conn = builder
                .serve_connection(TokioIo::new(watched), service.clone())
                .with_upgrades();
            let outcome = drive(
                Pin::new(&mut conn),
                &state,
                &cfg,
                true,
                &mut shutdown,
                |c| c.graceful_shutdown(),
            )
            .await;
            if outcome == Outcome::Ended {
                return None;
            }
            // No request in flight and everything written: hyper holds at most the start of
            // a pipelined request, which the next round reads first.
            let parts = conn.into_parts()?;
            let watched = parts.io.into_inner();
            // Copied out: hyper's `read_buf` shares (and would keep alive) its whole buffer.
            let rest = if parts.read_buf.is_empty() && watched.prefix.is_empty() {
                Bytes::new()
            } else {
                [parts.read_buf, watched.prefix].concat().into()
            };
            Some((watched.inner, rest))
        });
        let Some((back, rest)) = round.await else {
            return;
        };
        io = back;
        prefix = rest;
        parked = true;
    }
}

/// Waits, holding only the socket, until the client sends (or closes). False: close instead,
/// because the connection idled past its timeout, a new one sent nothing in time, or the
/// server shuts down, or the limiter needs its slot (`max_connections` reached, or out of
/// descriptors) and it is the longest idle.
async fn wait_for_request<I: WaitReadable>(
    io: &I,
    state: &ConnState,
    cfg: &DownstreamConfig,
    shutdown: &mut watch::Receiver<bool>,
    limit: &crate::downstream::limit::ListenerLimit,
) -> bool {
    if *shutdown.borrow() {
        return false;
    }
    let parked = limit.park(state.at(state.waiting_since.load(Ordering::Acquire)));
    tokio::select! {
        // Biased: a request that arrives as the limiter asks wins, and is served.
        biased;
        res = std::future::poll_fn(|cx| io.poll_read_ready(cx)) => res.is_ok(),
        _ = parked.shed_requested() => {
            debug!("closing an idle connection to make room (max_connections)");
            false
        }
        _ = tokio::time::sleep_until(state.close_deadline(cfg)) => {
            debug!("downstream connection idle; closing");
            false
        }
        _ = shutdown.changed() => false,
    }
}

/// How [`drive`] let go of a connection.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// The connection is finished (closed, upgraded, or failed).
    Ended,
    /// An idle HTTP/1 connection to be parked: hyper is at rest, with nothing in flight.
    Park,
}

/// Runs a hyper connection while firing the head/idle/park timers and honouring server
/// shutdown, until it ends or is to be parked.
async fn drive<C, E>(
    mut conn: Pin<&mut C>,
    state: &Arc<ConnState>,
    cfg: &DownstreamConfig,
    http1: bool,
    shutdown: &mut watch::Receiver<bool>,
    graceful: impl Fn(Pin<&mut C>),
) -> Outcome
where
    C: std::future::Future<Output = Result<(), E>>,
    E: std::fmt::Display,
{
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
                return Outcome::Ended;
            }
            _ = shutdown.changed(), if !closing => {
                closing = true;
                graceful(conn.as_mut());
            }
            _ = state.stalled.notified(), if !http1 => {
                debug!("an HTTP/2 stream made no progress for send_timeout; closing the connection");
                return Outcome::Ended;
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
                            Timer::Park => return Outcome::Park,
                        }
                        closing = true;
                    }
                    (at, _) => sleep.as_mut().reset(at),
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DownstreamConfig {
        DownstreamConfig {
            header_timeout: Duration::from_secs(10),
            idle_timeout: Duration::from_secs(75),
            ..DownstreamConfig::default()
        }
    }

    fn timer_name(t: &Option<Timer>) -> &'static str {
        match t {
            None => "check",
            Some(Timer::Head) => "head",
            Some(Timer::FirstRequest) => "first_request",
            Some(Timer::Idle) => "idle",
            Some(Timer::Park) => "park",
        }
    }

    /// `next_check` at `now` as (seconds from the connection's start, timer).
    fn next(state: &ConnState, http1: bool) -> (f64, &'static str) {
        let (at, timer) = state.next_check(&cfg(), http1, Instant::now());
        let secs = at.duration_since(state.origin).as_secs_f64();
        (secs, timer_name(&timer))
    }

    #[tokio::test(start_paused = true)]
    async fn a_new_http1_connection_is_checked_every_park_after_then_closed_silently() {
        let state = ConnState::new();
        // hyper has not read yet: look again after PARK_AFTER, no timer fires.
        assert_eq!(next(&state, true), (1.0, "check"));
        tokio::time::advance(Duration::from_millis(9500)).await;
        assert_eq!(next(&state, true), (10.0, "first_request"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_partial_head_gets_its_408_at_header_timeout_after_its_first_byte() {
        let state = ConnState::new();
        tokio::time::advance(Duration::from_secs(3)).await;
        state.head_bytes_arrived();
        tokio::time::advance(Duration::from_secs(1)).await;
        state.head_bytes_arrived(); // later bytes do not move the deadline
        assert_eq!(next(&state, true), (13.0, "head"));
    }

    #[tokio::test(start_paused = true)]
    async fn a_request_in_flight_only_gets_checks() {
        let state = ConnState::new();
        let (guard, n) = state.request_started();
        assert_eq!(n, 1);
        tokio::time::advance(Duration::from_secs(100)).await;
        assert_eq!(next(&state, true), (101.0, "check"));
        assert_eq!(next(&state, false), (110.0, "check"));
        drop(guard);
        // Idle from the end of the response on.
        assert_eq!(next(&state, false), (175.0, "idle"));
    }

    #[tokio::test(start_paused = true)]
    async fn an_idle_http1_connection_parks_once_hyper_is_at_rest() {
        let state = ConnState::new();
        let (guard, _) = state.request_started();
        tokio::time::advance(Duration::from_secs(2)).await;
        drop(guard);
        // hyper still busy (its last read found data): look again, do not park yet.
        tokio::time::advance(Duration::from_secs(1)).await;
        assert_eq!(next(&state, true), (4.0, "check"));
        // hyper's read came back empty and everything is flushed: park now.
        state.read_blocked.store(true, Ordering::Release);
        assert_eq!(next(&state, true), (3.0, "park"));
        state.unflushed.store(true, Ordering::Release);
        assert_eq!(
            next(&state, true),
            (4.0, "check"),
            "unflushed bytes keep hyper"
        );
    }

    #[tokio::test(start_paused = true)]
    async fn a_parked_connection_closes_at_idle_timeout_after_its_last_response() {
        let state = ConnState::new();
        let fresh = state.close_deadline(&cfg());
        assert_eq!(fresh.duration_since(state.origin), Duration::from_secs(10));
        let (guard, _) = state.request_started();
        tokio::time::advance(Duration::from_secs(5)).await;
        drop(guard);
        let served = state.close_deadline(&cfg());
        assert_eq!(served.duration_since(state.origin), Duration::from_secs(80));
    }
}
