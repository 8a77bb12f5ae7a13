//! Owns serving one downstream (client) connection once it is accepted (its socket is
//! [`super::socket`], its timers [`super::timers`], each request's answer
//! [`super::requests`]): HTTP/1.1 ([`serve_h1`]: kaproxy's own loop, [`super::h1`], and hyper
//! for the requests it hands over) or HTTP/2 ([`serve_h2`], hyper), and the graceful close
//! that never turns a racing request into an RST.
//!
//! An HTTP/1 connection idle for [`PARK_AFTER`](super::timers::PARK_AFTER) between requests is
//! *parked*: its buffers are dropped (hyper's two 8 KiB ones, when hyper served it last) and it
//! waits on the bare socket until the next request's first bytes arrive, as nginx does with its
//! idle connections. A new connection waits the same way for its first request.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;

use bytes::Bytes;
use futures_util::future::Either;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use prometheus_client::metrics::gauge::Gauge;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tracing::debug;

use crate::config::DownstreamConfig;
use crate::downstream::h1::{self, Next};
use crate::downstream::h2_head::H2HeadWatch;
use crate::downstream::limit::ListenerLimit;
use crate::downstream::requests::Requests;
use crate::downstream::socket::{WaitReadable, LINGER_TIME};
use crate::downstream::timers::{ConnState, HeadWatch, Timer};
use crate::downstream::ConnContext;

use crate::shutdown::Shutdown;

/// Serves one downstream connection until it closes, with HTTP/2 when ALPN said `h2`
/// (`http2`), else HTTP/1.1. Not an async fn: one would keep a copy of `io` and `ctx` beside
/// the future it awaits, for the whole connection.
pub fn serve<I>(io: I, http2: bool, ctx: ConnContext) -> impl std::future::Future<Output = ()>
where
    I: AsyncRead + AsyncWrite + WaitReadable + Unpin + Send + 'static,
{
    let state = ConnState::new();
    // What the requests need goes to them; the connection keeps its own handles only.
    let requests = Requests::new(ctx.info, ctx.current, &ctx.cfg, state.clone(), http2);
    let requests = Arc::new(requests);
    let handles = Handles {
        cfg: ctx.cfg,
        shutdown: ctx.shutdown,
        waiting: ctx.waiting,
        limit: ctx.limit,
    };
    if http2 {
        // Boxed: an HTTP/1 connection's future (kept for the whole connection, parked or
        // not) is not made the size of HTTP/2's.
        Either::Left(Box::pin(serve_h2(io, state, requests, handles)))
    } else {
        Either::Right(serve_h1(io, state, requests, handles))
    }
}

/// What serving a connection holds of its [`ConnContext`] (the rest is its requests').
struct Handles {
    cfg: Arc<DownstreamConfig>,
    shutdown: Shutdown,
    waiting: Gauge,
    limit: ListenerLimit,
}

/// HTTP/2 on `io` until the connection ends: one hyper connection for its whole life.
async fn serve_h2<I>(io: I, state: Arc<ConnState>, requests: Arc<Requests>, ctx: Handles)
where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let (cfg, mut shutdown) = (ctx.cfg, ctx.shutdown);
    // Boxed, like the HTTP/1 rounds: the HTTP/2 state would otherwise make every
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
                requests.service(),
            ),
    );
    drive(conn.as_mut(), &state, &cfg, false, &mut shutdown, |c| {
        c.graceful_shutdown()
    })
    .await;
}

/// HTTP/1.1 on `io` until the connection ends, in rounds: kaproxy's own loop serves requests
/// until it parks, closes, or hands a request over; hyper then serves from that request on,
/// until the connection idles past [`PARK_AFTER`](super::timers::PARK_AFTER). Parked, the
/// socket alone waits for the next request (or its close), counted in `waiting`, registered
/// with `limit` as one that may be closed to make room at `max_connections`.
///
/// An async block rather than an async fn: it uses what it captures where it is, where an
/// async fn's future would hold each argument twice (as received and as bound).
// An async block on purpose: its future holds each argument once (see above).
#[allow(clippy::manual_async_fn)]
fn serve_h1<I>(
    mut io: I,
    state: Arc<ConnState>,
    requests: Arc<Requests>,
    mut ctx: Handles,
) -> impl std::future::Future<Output = ()>
where
    I: AsyncRead + AsyncWrite + WaitReadable + Unpin + Send + 'static,
{
    async move {
        let (cfg, shutdown) = (&ctx.cfg, &mut ctx.shutdown);
        let mut prefix = Bytes::new();
        let mut parked = I::WAIT_BEFORE_FIRST_READ;
        loop {
            if parked && prefix.is_empty() {
                ctx.waiting.inc();
                let woken = wait_for_request(&io, &state, cfg, shutdown, &ctx.limit).await;
                ctx.waiting.dec();
                if !woken {
                    let _ = tokio::time::timeout(LINGER_TIME, io.shutdown()).await;
                    return;
                }
            }
            // kaproxy's own loop first; hyper answers what it does not take (h1.rs).
            let own = Box::pin(h1::serve(
                &mut io,
                std::mem::take(&mut prefix),
                &state,
                &requests,
                cfg,
                shutdown,
            ));
            match own.await {
                Next::Park => {
                    parked = true;
                    continue;
                }
                Next::Close => {
                    let _ = tokio::time::timeout(LINGER_TIME, io.shutdown()).await;
                    return;
                }
                Next::Hyper(bytes) => prefix = bytes,
                Next::Tunnel(switched, rest) => {
                    // Its own task, as hyper's upgrades are: the tunnel outlives the connection's
                    // HTTP serving (and its slot with the limiter), and shutdown does not wait
                    // for it.
                    tokio::spawn(switched.run(Rewind { io, rest }));
                    return;
                }
            }
            state.round_started();
            // Boxed: hyper's connection lives on the heap only while it serves, so a parked
            // connection's task stays small.
            let round = Box::pin(async {
                // Made for the round, not kept by the connection: most connections never get one.
                let mut builder = hyper::server::conn::http1::Builder::new();
                builder
                    .timer(TokioTimer::new())
                    .header_read_timeout(None)
                    .max_buf_size(cfg.max_header_bytes)
                    .max_header_size(cfg.max_header_bytes);
                let watched = HeadWatch::new(io, state.clone(), std::mem::take(&mut prefix));
                let mut conn = builder
                    .serve_connection(TokioIo::new(watched), requests.clone().service())
                    .with_upgrades();
                let outcome = drive(Pin::new(&mut conn), &state, cfg, true, shutdown, |c| {
                    c.graceful_shutdown()
                })
                .await;
                if outcome == Outcome::Ended {
                    return None;
                }
                // No request in flight and everything written: hyper holds at most the start of
                // a pipelined request, which the next round reads first.
                let parts = conn.into_parts()?;
                let (socket, unread) = parts.io.into_inner().into_parts();
                // Copied out: hyper's `read_buf` shares (and would keep alive) its whole buffer.
                let rest = if parts.read_buf.is_empty() && unread.is_empty() {
                    Bytes::new()
                } else {
                    [parts.read_buf, unread].concat().into()
                };
                Some((socket, rest))
            });
            let Some((back, rest)) = round.await else {
                return;
            };
            io = back;
            prefix = rest;
            parked = true;
        }
    }
}

/// The client's side of a tunnel: what the loop read past the upgrade request, then the
/// connection.
struct Rewind<I> {
    io: I,
    rest: Bytes,
}

impl<I: AsyncRead + Unpin> AsyncRead for Rewind<I> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        buf: &mut tokio::io::ReadBuf<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        if !self.rest.is_empty() {
            let n = self.rest.len().min(buf.remaining());
            buf.put_slice(&self.rest.split_to(n));
            return std::task::Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl<I: AsyncWrite + Unpin> AsyncWrite for Rewind<I> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
        data: &[u8],
    ) -> std::task::Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, data)
    }

    fn poll_flush(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(
        mut self: Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

/// Waits, holding only the socket, until the client sends (or closes). False: close instead,
/// because the connection idled past its timeout, a new one sent nothing in time, or the
/// server shuts down, or the limiter needs its slot (`max_connections` reached, or out of
/// descriptors) and it is the longest idle.
///
/// Written out rather than a `select!` of futures: a parked connection keeps this state for as
/// long as it waits, and the futures of the shed request and the shutdown were two thirds of
/// it. The limiter's registration is woken for both ([`Limiter::wake_parked`]).
///
/// [`Limiter::wake_parked`]: crate::downstream::limit::Limiter::wake_parked
async fn wait_for_request<I: WaitReadable>(
    io: &I,
    state: &ConnState,
    cfg: &DownstreamConfig,
    shutdown: &Shutdown,
    limit: &ListenerLimit,
) -> bool {
    let parked = limit.park(state.waiting_since());
    // Looked at after registering: a shutdown begun later wakes the registration.
    if shutdown.is_begun() {
        return false;
    }
    let deadline = tokio::time::sleep_until(state.close_deadline(cfg));
    tokio::pin!(deadline);
    std::future::poll_fn(|cx| {
        // A request that arrives as the limiter asks wins, and is served.
        if let std::task::Poll::Ready(res) = io.poll_read_ready(cx) {
            return std::task::Poll::Ready(res.is_ok());
        }
        if parked.poll_shed(cx).is_ready() {
            debug!("closing an idle connection to make room (max_connections)");
            return std::task::Poll::Ready(false);
        }
        if shutdown.is_begun() {
            return std::task::Poll::Ready(false);
        }
        if deadline.as_mut().poll(cx).is_ready() {
            debug!("downstream connection idle; closing");
            return std::task::Poll::Ready(false);
        }
        std::task::Poll::Pending
    })
    .await
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
    shutdown: &mut Shutdown,
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
            _ = shutdown.begun(), if !closing => {
                closing = true;
                graceful(conn.as_mut());
            }
            _ = state.stalled().notified(), if !http1 => {
                debug!("an HTTP/2 stream made no progress for send_timeout; closing the connection");
                return Outcome::Ended;
            }
            _ = state.goaway().notified(), if !closing && !http1 => {
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
                                state.order(&timer);
                            }
                            Timer::FirstRequest => state.order(&timer),
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
