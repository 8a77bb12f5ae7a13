//! Owns the timers of one downstream connection: the request-head timer (408), the idle and
//! first-request timers, and when an idle HTTP/1 connection is parked ([`PARK_AFTER`]).
//!
//! hyper's own `header_read_timeout` starts when the server waits for the next request, so it
//! would close idle keep-alive connections after `header_timeout` without a 408. kaproxy runs
//! the timers itself: [`ConnState`] records when a request head starts arriving (kaproxy's own
//! loop, [`super::h1`], as it reads; [`HeadWatch`], a read wrapper, under hyper) and when
//! requests begin and end ([`super::requests`]), and the loop serving the connection wakes at
//! the next deadline (see [`ConnState::next_check`]).

use std::io;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, AtomicU8, Ordering};
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Buf, Bytes};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::time::Instant;

use crate::config::DownstreamConfig;

/// An HTTP/1 connection idle this long between requests gives hyper's state back and waits
/// on the bare socket (see the module doc). Long enough that a busy connection never pays
/// for setting hyper up again; short enough that idle keep-alive clients soon cost a few KiB
/// each instead of ~20.
pub const PARK_AFTER: Duration = Duration::from_secs(1);

const NONE: u64 = u64::MAX;

const ACTION_NONE: u8 = 0;
const ACTION_408: u8 = 1;
const ACTION_SILENT_CLOSE: u8 = 2;

pub(super) const RESPONSE_408: &[u8] =
    b"HTTP/1.1 408 Request Timeout\r\nConnection: close\r\nContent-Length: 0\r\n\r\n";

/// What the timers need to know about a connection, shared by the service, the read wrapper
/// and the driver loop. Times are nanoseconds since `origin`.
pub(super) struct ConnState {
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

pub(super) enum Timer {
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
    pub(super) fn new() -> Arc<Self> {
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

    pub(super) fn at(&self, nanos: u64) -> Instant {
        self.origin + Duration::from_nanos(nanos)
    }

    /// Bytes of a request head arrived: the head timer runs from the first of them.
    pub(super) fn head_bytes_arrived(&self) {
        if self.in_flight.load(Ordering::Acquire) == 0
            && self.head_started.load(Ordering::Acquire) == NONE
        {
            self.head_started.store(self.now(), Ordering::Release);
        }
    }

    /// Returns the request's sequence number on this connection (1-based).
    pub(super) fn request_started(self: &Arc<Self>) -> (InFlight, u64) {
        self.in_flight.fetch_add(1, Ordering::AcqRel);
        self.head_started.store(NONE, Ordering::Release);
        let n = self.served.fetch_add(1, Ordering::AcqRel) + 1;
        (InFlight(self.clone()), n)
    }

    /// A request body is still to be read: the connection is busy until it ends (hyper may be
    /// reading it after the response has gone, so the response's end alone is not enough).
    pub(super) fn body_started(self: &Arc<Self>) -> InFlight {
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
    pub(super) fn close_deadline(&self, cfg: &DownstreamConfig) -> Instant {
        let since = self.at(self.waiting_since.load(Ordering::Acquire));
        if self.served.load(Ordering::Acquire) == 0 {
            since + cfg.header_timeout.min(cfg.idle_timeout)
        } else {
            since + cfg.idle_timeout
        }
    }

    /// Since when the connection waits for a request (accept, or the last response's end).
    pub(super) fn waiting_since(&self) -> Instant {
        self.at(self.waiting_since.load(Ordering::Acquire))
    }

    /// kaproxy's own loop ([`super::h1`]) waits for a read with everything written: at rest,
    /// as hyper is when its read finds nothing.
    pub(super) fn at_rest(&self) {
        self.read_blocked.store(true, Ordering::Release);
        self.unflushed.store(false, Ordering::Release);
    }

    /// A new round of hyper on the socket: nothing read or written yet.
    pub(super) fn round_started(&self) {
        self.read_blocked.store(false, Ordering::Release);
        self.unflushed.store(false, Ordering::Release);
    }

    /// Carries out a fired [`Timer::Head`] or [`Timer::FirstRequest`] at hyper's next read
    /// ([`HeadWatch`]): a 408, or a close without a word.
    pub(super) fn order(&self, timer: &Timer) {
        let action = match timer {
            Timer::Head => ACTION_408,
            Timer::FirstRequest => ACTION_SILENT_CLOSE,
            Timer::Idle | Timer::Park => return,
        };
        self.action.store(action, Ordering::Release);
    }

    /// Notified when an HTTP/2 connection reached `max_requests_per_connection`.
    pub(super) fn goaway(&self) -> &tokio::sync::Notify {
        &self.goaway
    }

    /// Notified when an HTTP/2 stream was cut off by `send_timeout`.
    pub(super) fn stalled(&self) -> &Arc<tokio::sync::Notify> {
        &self.stalled
    }

    /// When the driver should look again, and which timer fires then (None: just a check).
    ///
    /// Nothing on the request path wakes the driver (that would cost a wake-up and a timer
    /// re-registration per request). Instead, while a connection is busy or idle the driver
    /// checks at least every `header_timeout`: a request head that started after a check is
    /// seen at the next one, which is never later than its own deadline. HTTP/1 connections
    /// are checked at least every [`PARK_AFTER`], to be parked soon after they go idle.
    pub(super) fn next_check(
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
pub(super) struct InFlight(Arc<ConnState>);

impl Drop for InFlight {
    fn drop(&mut self) {
        let state = &self.0;
        if state.in_flight.fetch_sub(1, Ordering::AcqRel) == 1 {
            state.waiting_since.store(state.now(), Ordering::Release);
        }
    }
}

pin_project_lite::pin_project! {
    /// Read wrapper for HTTP/1 connections (above TLS): tells [`ConnState`] when a request head
    /// starts and whether hyper is at rest, and carries out the head timer's verdict (write a
    /// 408, then end the stream). `prefix` is what an earlier hyper read but did not parse.
    pub(super) struct HeadWatch<T> {
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
    /// Wraps `inner` for one round of hyper; `prefix` is read first.
    pub(super) fn new(inner: T, state: Arc<ConnState>, prefix: Bytes) -> Self {
        HeadWatch {
            inner,
            state,
            written: 0,
            prefix,
        }
    }

    /// The socket back, with what of `prefix` hyper has not read.
    pub(super) fn into_parts(self) -> (T, Bytes) {
        (self.inner, self.prefix)
    }
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
