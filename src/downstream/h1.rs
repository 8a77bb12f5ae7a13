//! Owns kaproxy's own HTTP/1.1 connection loop: a request head read into the connection's
//! buffer and parsed by [`crate::http1::head`], answered by the proxy, its response written by
//! [`crate::http1::encode`], then the next request, pipelined ones from the same buffer.
//!
//! It takes the request a proxy serves most: HTTP/1.1 without `Upgrade` or `Expect`, whose
//! head httparse and the `http` types accept, with no body or a `Content-Length` body of at
//! most [`WHOLE_BODY`] bytes already in the buffer with it. Any other, and any head that does
//! not parse, goes with the bytes read so far to a round of hyper ([`super::conn`]), which
//! answers it as before (a body still to come under `body_timeout`, chunked bodies, its
//! framing rules, 400/431, `Expect: 100-continue`, the upgrade to a tunnel); the README, "HTTP/1.1 data path", says which requests take which path. The
//! timers are the connection's ([`super::timers`]): 408 for a head not complete within
//! `header_timeout`, the idle and first-request closes, and parking after
//! [`PARK_AFTER`](super::timers::PARK_AFTER) idle, when the buffers are dropped.

use std::future::Future;
use std::pin::Pin;
use std::task::Poll;

use bytes::{Buf, Bytes, BytesMut};
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, Uri, Version};
use http_body::Body;
use http_body_util::Full;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tracing::debug;

use crate::body::ClientBody;
use crate::config::DownstreamConfig;
use crate::downstream::requests::{Requests, ResponseBody};
use crate::downstream::timers::{ConnState, Timer, RESPONSE_408};
use crate::http1::encode::{self, BodySize};
use crate::http1::framing::{self, Framing};
use crate::http1::head::{self, RequestHead, Version as Version1};
use crate::proxy::ForwardedHead;
use crate::shutdown::Shutdown;

/// The read buffer of a connection this loop serves starts at this size (hyper's too) and
/// grows up to `max_header_bytes` for a long head.
const READ_BUF: usize = 8 * 1024;

/// The largest request body the loop takes, and only when all of it came with the head (a
/// small POST's body usually does): it is then the request's whole body, read already, and
/// no `body_timeout` can apply. A body still to come is hyper's, whose reads the proxy bounds.
pub const WHOLE_BODY: usize = 16 * 1024;

/// Response bytes gathered before they are written: a head and a small body go in one write;
/// a larger body frame is written beside what is gathered, not copied into it.
const GATHER: usize = 16 * 1024;

/// How the loop let go of its connection.
pub(super) enum Next {
    /// Idle past `PARK_AFTER` with nothing buffered: park it.
    Park,
    /// Finished: the client closed, a timer closed it, or the last response went.
    Close,
    /// A request this loop does not take, or a head that does not parse: these bytes, read
    /// from the connection, are hyper's to answer.
    Hyper(Bytes),
}

/// A request head the loop takes, as the proxy reads it.
pub struct Taken {
    pub req: Request<ClientBody>,
    /// The client said `Connection: close`.
    pub close: bool,
    /// A HEAD request: its response has no body.
    pub head: bool,
}

/// Serves requests on `io` (`prefix` read first) until the connection parks, closes, or a
/// request is hyper's.
pub(super) async fn serve<I>(
    io: &mut I,
    prefix: Bytes,
    state: &ConnState,
    requests: &Requests,
    cfg: &DownstreamConfig,
    shutdown: &mut Shutdown,
) -> Next
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    let mut buf = if prefix.is_empty() {
        BytesMut::with_capacity(READ_BUF)
    } else {
        BytesMut::from(&prefix[..])
    };
    let mut out = BytesMut::new();
    // Made once, not per request: waiting for the shutdown registers with its channel.
    let mut watch = shutdown.clone();
    let begun = watch.begun();
    tokio::pin!(begun);
    // Timers as in hyper's rounds: checked when this wakes, never re-armed per request.
    let (first, _) = state.next_check(cfg, true, Instant::now());
    let sleep = tokio::time::sleep_until(first);
    tokio::pin!(sleep);
    loop {
        let head = loop {
            if !buf.is_empty() {
                match head::parse_request(&mut buf, cfg.max_header_bytes) {
                    Ok(Some(head)) => break head,
                    Ok(None) => state.head_bytes_arrived(),
                    Err(_) => return Next::Hyper(buf.freeze()),
                }
            }
            if buf.capacity() - buf.len() < READ_BUF / 4 {
                buf.reserve(READ_BUF);
            }
            state.at_rest();
            tokio::select! {
                biased;
                read = io.read_buf(&mut buf) => match read {
                    Ok(0) | Err(_) => return Next::Close,
                    Ok(_) => {}
                },
                () = &mut sleep => {
                    let now = Instant::now();
                    match state.next_check(cfg, true, now) {
                        (at, Some(timer)) if at <= now => return fired(io, timer).await,
                        (at, _) => sleep.as_mut().reset(at),
                    }
                }
                () = &mut begun => return Next::Close,
            }
        };
        let Some(taken) = take(&head, &mut buf) else {
            let mut rest = BytesMut::with_capacity(head.as_bytes().len() + buf.len());
            rest.extend_from_slice(head.as_bytes());
            rest.extend_from_slice(&buf);
            return Next::Hyper(rest.freeze());
        };
        drop(head);
        // The answer, unless the client goes away first: dropping it then stops the exchange
        // (and frees its upstream connection) at once, as hyper did.
        let answer = requests.answer(taken.req, true);
        tokio::pin!(answer);
        let answered = std::future::poll_fn(|cx| match answer.as_mut().poll(cx) {
            Poll::Ready(done) => Poll::Ready(Some(done)),
            Poll::Pending => match poll_gone(io, &mut buf, cx) {
                Poll::Ready(true) => Poll::Ready(None),
                _ => Poll::Pending,
            },
        })
        .await;
        let Some((resp, forwarded)) = answered else {
            debug!("client went away before its response; closing");
            return Next::Close;
        };
        let keep_alive = !taken.close && !shutdown.is_begun();
        let resp = Answer {
            resp,
            forwarded,
            head: taken.head,
        };
        if !write_response(io, resp, keep_alive, &mut out, &mut buf).await {
            return Next::Close;
        }
    }
}

/// Watches the client while its response is pending, as hyper's server did (without
/// half-close): with nothing buffered, a read that ends the stream or fails means the client
/// went away (`Ready(true)`); bytes that come are kept, the next request's (`Ready(false)`,
/// and no more watching while they wait). `Pending` otherwise.
fn poll_gone<I: AsyncRead + Unpin>(
    io: &mut I,
    buf: &mut BytesMut,
    cx: &mut std::task::Context<'_>,
) -> Poll<bool> {
    if !buf.is_empty() {
        return Poll::Pending;
    }
    if buf.capacity() < READ_BUF / 4 {
        buf.reserve(READ_BUF);
    }
    match tokio_util::io::poll_read_buf(Pin::new(io), cx, buf) {
        Poll::Ready(Ok(0)) | Poll::Ready(Err(_)) => Poll::Ready(true),
        Poll::Ready(Ok(_)) => Poll::Ready(false),
        Poll::Pending => Poll::Pending,
    }
}

/// What waiting for the next body frame gave.
enum Step<F> {
    Frame(F),
    /// Nothing ready yet, and bytes gathered: write them first.
    Flush,
    /// The client went away.
    Gone,
}

/// Carries out a timer that fired while the loop waited for a head.
async fn fired<I: AsyncWrite + Unpin>(io: &mut I, timer: Timer) -> Next {
    match timer {
        Timer::Head => {
            debug!("request head not complete within header_timeout; 408");
            let _ = io.write_all(RESPONSE_408).await;
            let _ = io.flush().await;
            Next::Close
        }
        Timer::FirstRequest => Next::Close,
        Timer::Idle => {
            debug!("downstream connection idle; closing");
            Next::Close
        }
        Timer::Park => Next::Park,
    }
}

/// The request `head` as the proxy takes it, its body taken off the front of `rest` (what
/// followed the head), or None when it is hyper's (and `rest` is untouched): not HTTP/1.1, a
/// body that is chunked, larger than [`WHOLE_BODY`] or not all in `rest`, framing hyper or
/// kaproxy refuses, `Upgrade`, `Expect`, CONNECT, or a method, target, name or value the `http`
/// types refuse (hyper answers those 400). The `http1_request` fuzz target holds every request
/// taken to what hyper's server reads from the same bytes.
pub fn take(head: &RequestHead, rest: &mut BytesMut) -> Option<Taken> {
    if head.version != Version1::Http11 {
        return None;
    }
    let length = match framing::request(Version1::Http11, head.fields.iter()).ok()? {
        Framing::Empty => 0,
        Framing::Length(n) if n <= WHOLE_BODY as u64 && n <= rest.len() as u64 => n as usize,
        _ => return None,
    };
    let method = Method::from_bytes(head.method()).ok()?;
    if method == Method::CONNECT {
        return None;
    }
    let bytes = head.as_bytes();
    let uri = Uri::from_maybe_shared(bytes.slice_ref(head.target())).ok()?;
    let mut headers = HeaderMap::with_capacity(head.fields.len());
    for (name, value) in head.fields.iter() {
        let name = HeaderName::from_bytes(name).ok()?;
        if name == header::TRANSFER_ENCODING || name == header::UPGRADE || name == header::EXPECT {
            return None;
        }
        let value = HeaderValue::from_maybe_shared(bytes.slice_ref(value)).ok()?;
        // Repeated lengths (equal: the framing above refused others) go on as one, the first,
        // as hyper keeps them.
        if name == header::CONTENT_LENGTH && headers.contains_key(header::CONTENT_LENGTH) {
            continue;
        }
        headers.append(name, value);
    }
    let close = crate::headers::connection_has(&headers, "close");
    let head = method == Method::HEAD;
    let body = match length {
        0 => ClientBody::Empty,
        n => ClientBody::Whole(Full::new(rest.split_to(n).freeze())),
    };
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    *req.headers_mut() = headers;
    Some(Taken { req, close, head })
}

/// A response to write.
struct Answer {
    resp: Response<ResponseBody>,
    /// A backend's head, written from its bytes before the fields of `resp`'s map.
    forwarded: Option<Box<ForwardedHead>>,
    /// The request was HEAD: no body follows the head.
    head: bool,
}

/// Writes `answer` and returns whether the connection goes on: `keep_alive`, no
/// `Connection: close` in the response, the body sent whole and every write done (a client
/// that does not read for `send_timeout` fails the write: the socket's deadline,
/// [`super::socket`]), and the client still there while the body had nothing to send
/// ([`poll_gone`], reading into `buf`).
async fn write_response<I: AsyncRead + AsyncWrite + Unpin>(
    io: &mut I,
    answer: Answer,
    keep_alive: bool,
    out: &mut BytesMut,
    buf: &mut BytesMut,
) -> bool {
    let Answer {
        resp,
        forwarded,
        head,
    } = answer;
    let (parts, mut body) = resp.into_parts();
    let size = if body.is_end_stream() {
        BodySize::Empty
    } else {
        body.size_hint()
            .exact()
            .map_or(BodySize::Unknown, BodySize::Exact)
    };
    let mut keep_alive = keep_alive;
    let fields = forwarded.iter().flat_map(|f| f.fields()).chain(
        parts
            .headers
            .iter()
            .map(|(name, value)| (name.as_str().as_bytes(), value.as_bytes())),
    );
    let mut encoder = encode::response_head(parts.status, fields, head, size, &mut keep_alive, out);
    drop((parts, forwarded));
    let mut whole = true;
    if !encoder.is_done() {
        whole = loop {
            // What is gathered is written while the body has nothing ready.
            let step = std::future::poll_fn(|cx| match Pin::new(&mut body).poll_frame(cx) {
                Poll::Ready(frame) => Poll::Ready(Step::Frame(frame)),
                Poll::Pending if !out.is_empty() => Poll::Ready(Step::Flush),
                Poll::Pending => match poll_gone(io, buf, cx) {
                    Poll::Ready(true) => Poll::Ready(Step::Gone),
                    _ => Poll::Pending,
                },
            })
            .await;
            let data = match step {
                Step::Flush => {
                    if !write_out(io, out).await {
                        return false;
                    }
                    continue;
                }
                Step::Gone => {
                    debug!("client went away during its response; closing");
                    return false;
                }
                Step::Frame(None) => break encoder.finish(out),
                Step::Frame(Some(Err(e))) => {
                    debug!(error = %e, "response body failed; closing the connection");
                    break false;
                }
                Step::Frame(Some(Ok(frame))) => match frame.into_data() {
                    Ok(data) => data,
                    // Trailers: not forwarded on HTTP/1.1 (as hyper did).
                    Err(_) => continue,
                },
            };
            let n = encoder.start_frame(data.len(), out);
            if out.len() + n <= GATHER {
                out.extend_from_slice(&data[..n]);
            } else {
                let mut both = (&mut *out).chain(data.slice(..n));
                if io.write_all_buf(&mut both).await.is_err() {
                    return false;
                }
                out.clear();
            }
            encoder.end_frame(n, out);
            if n < data.len() {
                // More than its Content-Length: the rest cannot be sent on this connection.
                break false;
            }
            if out.len() >= GATHER && !write_out(io, out).await {
                return false;
            }
        };
    }
    let sent = write_out(io, out).await && io.flush().await.is_ok();
    // The end of the response: the connection is idle from here (the in-flight guard).
    drop(body);
    sent && whole && keep_alive
}

/// Writes what is gathered in `out`; false when the write fails.
async fn write_out<I: AsyncWrite + Unpin>(io: &mut I, out: &mut BytesMut) -> bool {
    if out.is_empty() {
        return true;
    }
    let ok = io.write_all(out).await.is_ok();
    out.clear();
    ok
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `take` on `bytes`: the request and what is left after it.
    fn taken(bytes: &[u8]) -> (Option<Taken>, BytesMut) {
        let mut buf = BytesMut::from(bytes);
        let head = head::parse_request(&mut buf, 1 << 16).unwrap().unwrap();
        (take(&head, &mut buf), buf)
    }

    #[test]
    fn a_body_that_came_whole_is_taken_with_one_length() {
        let (t, rest) = taken(
            b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabcGET",
        );
        let t = t.expect("taken");
        assert_eq!(t.req.headers().get_all("content-length").iter().count(), 1);
        assert_eq!(t.req.body().size_hint().exact(), Some(3));
        assert_eq!(&rest[..], b"GET", "the next request's bytes stay");
    }

    #[test]
    fn bodies_still_to_come_or_too_large_or_chunked_are_hyper_s() {
        let (t, rest) = taken(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nab");
        assert!(t.is_none());
        assert_eq!(&rest[..], b"ab", "untouched for hyper");
        let big = format!(
            "POST / HTTP/1.1\r\nHost: a\r\nContent-Length: {}\r\n\r\n{}",
            WHOLE_BODY + 1,
            "x".repeat(WHOLE_BODY + 1)
        );
        assert!(taken(big.as_bytes()).0.is_none());
        let chunked = b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n0\r\n\r\n";
        assert!(taken(chunked).0.is_none());
        let signed = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\nx";
        assert!(taken(signed).0.is_none(), "hyper answers the 400");
        let upgrade =
            b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n";
        assert!(taken(upgrade).0.is_none());
        let old = b"GET / HTTP/1.0\r\nHost: a\r\n\r\n";
        assert!(taken(old).0.is_none());
    }

    #[test]
    fn connection_close_and_head_are_seen() {
        let (t, _) = taken(b"HEAD / HTTP/1.1\r\nHost: a\r\nConnection: Close\r\n\r\n");
        let t = t.unwrap();
        assert!(t.close && t.head);
        assert!(t.req.body().is_end_stream());
    }
}
