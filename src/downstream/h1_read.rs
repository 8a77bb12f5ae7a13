//! Owns what kaproxy's own HTTP/1.1 loop ([`super::h1`]) reads besides request heads: room in
//! the connection's read buffer, and a request body still to come, fed to the proxy as it
//! reads it ([`Feed`]: its framing, `Expect: 100-continue`), or read and dropped after an
//! answer that came first ([`drain`]).

use std::pin::Pin;
use std::task::{ready, Context, Poll};

use bytes::BytesMut;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite};
use tracing::debug;

use crate::body::fed::Feeder;
use crate::body::ReadError;
use crate::http1::body::BodyState;
use crate::http1::buffers::Class;
use crate::http1::chunked::Chunk;

/// The read buffer of a connection this loop serves starts at this size (hyper's too) and
/// grows up to `max_header_bytes` for a long head.
pub(super) const READ_BUF: usize = Class::Read.bytes();

/// Makes room in `buf` for a read of a quarter of [`READ_BUF`] at least.
pub(super) fn room_to_read(buf: &mut BytesMut) {
    if buf.capacity() - buf.len() < READ_BUF / 4 {
        buf.reserve(READ_BUF);
    }
}

/// A request body the loop reads from the connection while the proxy answers: where it is in
/// its framing, and the [`FedBody`](crate::body::fed::FedBody) the proxy reads it from.
pub struct Feed {
    body: BodyState,
    feeder: Feeder,
    continuing: Continue,
    failed: bool,
}

/// `Expect: 100-continue`: the interim response is written when the body is first wanted
/// (as hyper's server does), so a client whose request is refused first (413 by its length,
/// 404, an error) need not send the body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Continue {
    /// Due, this many bytes of it written.
    Due(usize),
    /// Written; to be flushed.
    Flushing,
    /// Sent, or not asked for.
    Sent,
}

const CONTINUE: &[u8] = b"HTTP/1.1 100 Continue\r\n\r\n";

/// What [`Feed::fill`] did.
#[derive(Debug, PartialEq, Eq)]
pub enum Fill {
    /// Put a piece of the body (and maybe its end) in the body's slot.
    Pushed,
    /// The body ended, or failed (a broken chunk).
    Ended,
    /// `buf` holds no more of the body.
    Empty,
    /// The slot still holds a piece.
    Full,
}

impl Feed {
    pub(super) fn new(body: BodyState, feeder: Feeder, expects_continue: bool) -> Feed {
        Feed {
            body,
            feeder,
            continuing: if expects_continue {
                Continue::Due(0)
            } else {
                Continue::Sent
            },
            failed: false,
        }
    }

    #[cfg(test)]
    /// `100 Continue` is still to be written (the client asked, the body was not wanted yet).
    pub(super) fn continue_due(&self) -> bool {
        matches!(self.continuing, Continue::Due(_))
    }

    /// The body is still being read: not ended or failed, and the proxy still holds it.
    pub(super) fn reading(&self) -> bool {
        !self.body.is_done() && !self.failed && !self.feeder.is_abandoned()
    }

    /// The body was read to its end: what follows in the buffer is the next request.
    pub(super) fn is_done(&self) -> bool {
        self.body.is_done() && !self.failed
    }

    /// The rest of the body may be read and dropped after the response ([`drain`]): it did
    /// not fail, the client was not left waiting for a `100 Continue` (it may never send the
    /// body), and what its length says is left is at most [`DRAIN_LIMIT`].
    pub(super) fn drainable(&self) -> bool {
        self.is_done()
            || (!self.failed
                && self.continuing == Continue::Sent
                && self.body.remaining().is_none_or(|n| n <= DRAIN_LIMIT))
    }

    /// Moves the next piece of the body from `buf` into the body's slot, if it is empty.
    /// `cx`: the task polling the proxy, which is not woken (its caller polls again).
    pub fn fill(&mut self, buf: &mut BytesMut, cx: Option<&Context<'_>>) -> Fill {
        if self.body.is_done() || self.failed {
            return Fill::Ended;
        }
        if !self.feeder.has_room() {
            return Fill::Full;
        }
        match self.body.decode(buf) {
            Ok(Some(Chunk::Data(data))) => {
                self.feeder.push(data, cx);
                if self.body.is_done() {
                    self.feeder.end(Ok(()), cx);
                }
                Fill::Pushed
            }
            // Trailers of a request body are not forwarded (hop-by-hop framing; hyper's
            // client wrote none either).
            Ok(Some(Chunk::End { .. })) => {
                self.feeder.end(Ok(()), cx);
                Fill::Ended
            }
            Ok(None) => Fill::Empty,
            Err(e) => {
                debug!(error = %e, "request body: bad chunk; the body fails");
                self.fail(ReadError::Chunk(e), cx);
                Fill::Ended
            }
        }
    }

    /// The connection's stream ended (or failed) before the body did.
    pub fn cut_short(&mut self, cx: Option<&Context<'_>>) {
        self.fail(ReadError::Closed, cx);
    }

    fn fail(&mut self, e: ReadError, cx: Option<&Context<'_>>) {
        self.failed = true;
        self.feeder.end(Err(e), cx);
    }
}

/// Reads the request body from `io` into `buf` and on into its slot while the proxy wants
/// more, writing `100 Continue` first when the client asked for it. `Ready` when a piece (or
/// the end) went in: poll the proxy again.
pub(super) fn poll_feed<I: AsyncRead + AsyncWrite + Unpin>(
    io: &mut I,
    buf: &mut BytesMut,
    feed: &mut Feed,
    cx: &mut Context<'_>,
) -> Poll<()> {
    if !feed.feeder.wants() {
        // The proxy has not asked since the last piece; when it does, it is polled on this
        // task, and this runs again after it.
        return Poll::Pending;
    }
    loop {
        match feed.fill(buf, Some(cx)) {
            Fill::Pushed | Fill::Ended => return Poll::Ready(()),
            Fill::Full => return Poll::Pending,
            Fill::Empty => {}
        }
        if let Err(()) = ready!(poll_continue(io, &mut feed.continuing, cx)) {
            feed.cut_short(Some(cx));
            return Poll::Ready(());
        }
        room_to_read(buf);
        match ready!(tokio_util::io::poll_read_buf(Pin::new(&mut *io), cx, buf)) {
            Ok(0) | Err(_) => {
                debug!("client closed within its request body");
                feed.cut_short(Some(cx));
                return Poll::Ready(());
            }
            Ok(_) => {}
        }
    }
}

/// Writes and flushes the `100 Continue` that is due, if one is.
fn poll_continue<I: AsyncWrite + Unpin>(
    io: &mut I,
    continuing: &mut Continue,
    cx: &mut Context<'_>,
) -> Poll<Result<(), ()>> {
    loop {
        match *continuing {
            Continue::Sent => return Poll::Ready(Ok(())),
            Continue::Due(n) if n == CONTINUE.len() => *continuing = Continue::Flushing,
            Continue::Due(n) => match ready!(Pin::new(&mut *io).poll_write(cx, &CONTINUE[n..])) {
                Ok(0) | Err(_) => return Poll::Ready(Err(())),
                Ok(m) => *continuing = Continue::Due(n + m),
            },
            Continue::Flushing => {
                ready!(Pin::new(&mut *io).poll_flush(cx)).map_err(|_| ())?;
                *continuing = Continue::Sent;
            }
        }
    }
}

/// The most of a request body the loop reads and drops after its response to keep the
/// connection (hyper drained what had arrived; nginx discards a whole body it did not read);
/// past it the connection closes.
const DRAIN_LIMIT: u64 = 256 * 1024;

/// Reads the rest of a request body nobody reads any more from `io` and drops it, the whole of
/// it within one `body_timeout` (a total, as nginx's `lingering_time`: a client dribbling bytes
/// does not keep the slot for a gap per byte): true when it ended within [`DRAIN_LIMIT`] bytes
/// and in time, and what follows in `buf` is the next request.
pub(super) async fn drain<I: AsyncRead + Unpin>(
    io: &mut I,
    buf: &mut BytesMut,
    feed: &mut Feed,
    body_timeout: std::time::Duration,
) -> bool {
    let to_end = async {
        let mut dropped = 0u64;
        loop {
            match feed.body.decode(buf) {
                Ok(Some(Chunk::Data(data))) => {
                    dropped += data.len() as u64;
                    if dropped > DRAIN_LIMIT {
                        debug!(
                            "request body past its response larger than the drain limit; closing"
                        );
                        return false;
                    }
                }
                Ok(Some(Chunk::End { .. })) => return true,
                Ok(None) => {
                    room_to_read(buf);
                    match io.read_buf(buf).await {
                        Ok(n) if n > 0 => {}
                        _ => return false,
                    }
                }
                Err(_) => return false,
            }
        }
    };
    tokio::time::timeout(body_timeout, to_end)
        .await
        .unwrap_or_else(|_| {
            debug!("request body past its response not read within body_timeout; closing");
            false
        })
}
