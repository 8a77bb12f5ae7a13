//! Owns kaproxy's own HTTP/1.1 connection loop: a request head read into the connection's
//! buffer and parsed by [`crate::http1::head`], answered by the proxy, its response written by
//! [`crate::http1::encode`], then the next request, pipelined ones from the same buffer.
//!
//! It takes every HTTP/1.1 request whose head httparse and the `http` types accept but an
//! `Upgrade` with a body, an `Expect` other than `100-continue`, and CONNECT; an upgrade the
//! backend accepts ends the loop with its `101` written ([`Next::Tunnel`]). A body of at most
//! [`WHOLE_BODY`] bytes that came with the head is taken whole; any other is read from the
//! socket as the proxy reads it ([`Feed`], under the proxy's `body_timeout`), `100 Continue`
//! written when it is first wanted, and what is left of it when the answer came first read and
//! dropped ([`drain`]) or the connection closed. Any other request, and any head that does not
//! parse, goes with the bytes read so far to a round of hyper ([`super::conn`]), which answers
//! it as before (HTTP/1.0, its framing rules, 400/431); the README,
//! "HTTP/1.1 data path", says which requests take which path. The timers are the
//! connection's ([`super::timers`]): 408 for a head not complete within `header_timeout`, the
//! idle and first-request closes, and parking after
//! [`PARK_AFTER`](super::timers::PARK_AFTER) idle, when the buffers are dropped.

use std::future::Future;
use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::{Buf, Bytes, BytesMut};
use http::header::HeaderValue;
use http::{Method, Request, Response, Uri, Version};
use http_body::Body;
use http_body_util::Full;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::time::Instant;
use tracing::debug;

use crate::body::fed;
use crate::body::ClientBody;
use crate::config::DownstreamConfig;
use crate::downstream::h1_read::{drain, poll_feed, room_to_read};
pub use crate::downstream::h1_read::{Feed, Fill};
use crate::downstream::requests::{Answered, Requests, ResponseBody};
use crate::downstream::timers::{ConnState, Timer, RESPONSE_408};
use crate::http1::body::BodyState;
use crate::http1::buffers::{self, Class};
use crate::http1::encode::{self, BodySize};
use crate::http1::framing::{self, Framing};
use crate::http1::head::{self, Line, Name, RequestHead, Version as Version1};
use crate::proxy::{ForwardedHead, Switched};
use crate::shutdown::Shutdown;

/// The largest request body the loop takes whole, when all of it came with the head (a small
/// POST's body usually does): it is then read already, and no `body_timeout` can apply. Any
/// other body is fed from the socket ([`Feed`]).
pub const WHOLE_BODY: usize = 16 * 1024;

/// Response bytes gathered before they are written: a head and a small body go in one write;
/// a larger body frame is written beside what is gathered, not copied into it.
const GATHER: usize = Class::Data.bytes();

/// How the loop let go of its connection.
pub(super) enum Next {
    /// Idle past `PARK_AFTER` with nothing buffered: park it.
    Park,
    /// Finished: the client closed, a timer closed it, or the last response went.
    Close,
    /// A request this loop does not take, or a head that does not parse: these bytes, read
    /// from the connection, are hyper's to answer.
    Hyper(Bytes),
    /// An upgrade the backend accepted, its `101` written: the connection is the tunnel's,
    /// these bytes (sent after the request) first.
    Tunnel(Box<Switched>, Bytes),
}

/// A request head the loop takes, as the proxy reads it.
pub struct Taken {
    pub req: Request<ClientBody>,
    /// The client said `Connection: close`.
    pub close: bool,
    /// A HEAD request: its response has no body.
    pub head: bool,
    /// The body still to come, which the loop reads as the proxy takes it.
    pub feed: Option<Feed>,
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
        buffers::take(Class::Read)
    } else {
        BytesMut::from(&prefix[..])
    };
    let next = rounds(io, &mut buf, state, requests, cfg, shutdown).await;
    // Idle from here (parked or gone): the read buffer goes back to the worker's pool unless
    // its bytes went on (to hyper or the tunnel).
    buffers::give(Class::Read, buf);
    next
}

/// The requests of [`serve`], read into `buf`.
async fn rounds<I>(
    io: &mut I,
    buf: &mut BytesMut,
    state: &ConnState,
    requests: &Requests,
    cfg: &DownstreamConfig,
    shutdown: &mut Shutdown,
) -> Next
where
    I: AsyncRead + AsyncWrite + Unpin,
{
    // Made once, not per request: waiting for the shutdown registers with its channel.
    let mut out = BytesMut::new();
    let mut watch = shutdown.clone();
    let begun = watch.begun();
    tokio::pin!(begun);
    // Timers as in hyper's rounds: checked when this wakes, never re-armed per request.
    let (first, _) = state.next_check(cfg, true, Instant::now());
    let sleep = tokio::time::sleep_until(first);
    tokio::pin!(sleep);
    loop {
        let parsed = loop {
            if !buf.is_empty() {
                match head::parse_request(buf, cfg.max_header_bytes) {
                    Ok(Some(head)) => break head,
                    Ok(None) => state.head_bytes_arrived(),
                    Err(_) => return Next::Hyper(buf.split().freeze()),
                }
            }
            room_to_read(buf);
            state.at_rest();
            tokio::select! {
                biased;
                read = io.read_buf(buf) => match read {
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
        let Some(taken) = take(&parsed, buf) else {
            let mut rest = BytesMut::with_capacity(parsed.as_bytes().len() + buf.len());
            rest.extend_from_slice(parsed.as_bytes());
            rest.extend_from_slice(buf);
            return Next::Hyper(rest.freeze());
        };
        let Taken {
            req,
            close,
            head,
            mut feed,
        } = taken;
        // The answer, its body fed as the proxy reads it, unless the client goes away first:
        // dropping the answer then stops the exchange (and frees its upstream connection) at
        // once, as hyper did.
        // The proxy reads the request's fields in the parsed head (the request's map is
        // empty), kept until the answer is made.
        let answered = {
            let answer = requests.answer(req, Some(&parsed.fields));
            tokio::pin!(answer);
            std::future::poll_fn(|cx| {
                for _ in 0..FEED_TURNS {
                    if let Poll::Ready(done) = answer.as_mut().poll(cx) {
                        return Poll::Ready(Some(done));
                    }
                    match poll_client(io, buf, &mut feed, cx) {
                        Poll::Ready(true) => return Poll::Ready(None),
                        Poll::Ready(false) => {}
                        Poll::Pending => return Poll::Pending,
                    }
                }
                cx.waker().wake_by_ref();
                Poll::Pending
            })
            .await
        };
        let Some(Answered {
            resp,
            forwarded,
            switched,
            keep_alive: advertised,
        }) = answered
        else {
            debug!("client went away before its response; closing");
            return Next::Close;
        };
        drop(parsed);
        if let Some(switched) = switched {
            // The backend switched protocols: the 101 goes down, then the connection is the
            // tunnel's, with whatever the client sent after its request.
            let resp = Answer {
                resp,
                forwarded,
                advertised,
                head,
            };
            if !write_response(io, resp, true, &mut out, buf, &mut feed).await {
                return Next::Close;
            }
            return Next::Tunnel(switched, buf.split().freeze());
        }
        // A body not read to its end (refused, or answered early) is read and dropped after
        // the response when that is short; else the connection closes after the response.
        let drainable = feed.as_ref().is_none_or(Feed::drainable);
        let keep_alive = !close && !shutdown.is_begun() && drainable;
        let resp = Answer {
            resp,
            forwarded,
            advertised,
            head,
        };
        let went_on = write_response(io, resp, keep_alive, &mut out, buf, &mut feed).await;
        if !went_on {
            return Next::Close;
        }
        if let Some(mut feed) = feed.filter(|f| !f.is_done()) {
            if !drain(io, buf, &mut feed, cfg.body_timeout).await {
                return Next::Close;
            }
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
    room_to_read(buf);
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

/// The request `head` as the proxy takes it, with its body: taken off the front of `rest`
/// (what followed the head) when it is there whole and small ([`WHOLE_BODY`]), else fed from
/// the connection as the proxy reads it ([`Feed`], its first piece from `rest`). None when the
/// request is hyper's (and `rest` is untouched): not HTTP/1.1, framing hyper or kaproxy
/// refuses, `Upgrade` with a body, an `Expect` other than `100-continue`, CONNECT, or a method, target,
/// name or value the `http` types refuse (hyper answers those 400). The request's map is left
/// empty: the proxy reads the fields in `head` ([`crate::proxy::RequestFields`]). The
/// `http1_request` fuzz target holds every request taken, its fields as a map, to what hyper's
/// server reads from the same bytes.
/// The longest field name the `http` types take.
const MAX_NAME: usize = u16::MAX as usize;

pub fn take(head: &RequestHead, rest: &mut BytesMut) -> Option<Taken> {
    if head.version != Version1::Http11 {
        return None;
    }
    let framing = framing::request(Version1::Http11, head.fields.framing()).ok()?;
    let method = Method::from_bytes(head.method()).ok()?;
    if method == Method::CONNECT {
        return None;
    }
    let bytes = head.as_bytes();
    let uri = Uri::from_maybe_shared(bytes.slice_ref(head.target())).ok()?;
    let mut expects_continue = false;
    let mut upgrade = false;
    for (known, name, value) in head.fields.entries() {
        // httparse takes the names and values the `http` types take (a token; tabs, visible
        // bytes and obs-text), but for names longer than theirs.
        if name.len() > MAX_NAME {
            return None;
        }
        upgrade |= known == Name::Upgrade;
        if name.eq_ignore_ascii_case(b"expect") {
            // hyper's server answers `100-continue` and passes other expectations on.
            if !value.eq_ignore_ascii_case(b"100-continue") {
                return None;
            }
            expects_continue = true;
        }
    }
    if upgrade && framing != Framing::Empty {
        // An upgrade with a body: hyper's, rare.
        return None;
    }
    let close = head
        .fields
        .named(Name::Connection)
        .flat_map(crate::headers::field_tokens)
        .any(|t| t.eq_ignore_ascii_case("close"));
    let head = method == Method::HEAD;
    let (body, feed) = match framing {
        Framing::Empty | Framing::Length(0) => (ClientBody::Empty, None),
        Framing::Length(n) if n <= WHOLE_BODY as u64 && n <= rest.len() as u64 => {
            let whole = rest.split_to(n as usize).freeze();
            (ClientBody::Whole(Full::new(whole)), None)
        }
        Framing::Length(_) | Framing::Chunked => {
            let length = match framing {
                Framing::Length(n) => Some(n),
                _ => None,
            };
            let (body, feeder) = fed::channel(length);
            let mut feed = Feed::new(BodyState::new(framing), feeder, expects_continue);
            feed.fill(rest, None);
            (ClientBody::Fed(body), Some(feed))
        }
        // Not a request's framing (RFC 9112 §6.3).
        Framing::UntilClose => return None,
    };
    let mut req = Request::new(body);
    *req.method_mut() = method;
    *req.uri_mut() = uri;
    *req.version_mut() = Version::HTTP_11;
    Some(Taken {
        req,
        close,
        head,
        feed,
    })
}

/// While the proxy works on a request: feeds its body when the body wants more, else watches
/// for the client going away ([`poll_gone`]). `Ready(true)`: the client went away;
/// `Ready(false)`: a piece of the body went in, poll the proxy again.
fn poll_client<I: AsyncRead + AsyncWrite + Unpin>(
    io: &mut I,
    buf: &mut BytesMut,
    feed: &mut Option<Feed>,
    cx: &mut Context<'_>,
) -> Poll<bool> {
    match feed {
        Some(feed) if feed.reading() => poll_feed(io, buf, feed, cx).map(|()| false),
        _ => match poll_gone(io, buf, cx) {
            Poll::Ready(true) => Poll::Ready(true),
            _ => Poll::Pending,
        },
    }
}

/// How many times one poll of the connection goes between the proxy and the body it reads
/// before it lets other tasks run.
const FEED_TURNS: usize = 16;

/// A response to write.
struct Answer {
    resp: Response<ResponseBody>,
    /// A backend's head, written from its bytes before the fields of `resp`'s map.
    forwarded: Option<Box<ForwardedHead>>,
    /// The `Keep-Alive` field, written after the fields of `resp`'s map.
    advertised: Option<HeaderValue>,
    /// The request was HEAD: no body follows the head.
    head: bool,
}

/// Writes `answer` and returns whether the connection goes on: `keep_alive`, no
/// `Connection: close` in the response, the body sent whole and every write done (a client
/// that does not read for `send_timeout` fails the write: the socket's deadline,
/// [`super::socket`]), and the client still there while the body had nothing to send
/// ([`poll_gone`], reading into `buf`). A request body still to come goes on being fed
/// meanwhile: the backend may answer before it has read all of it. The bytes are gathered in
/// `out`, a buffer of the worker's pool given back once the response is written: a connection
/// waiting for its next request holds none.
async fn write_response<I: AsyncRead + AsyncWrite + Unpin>(
    io: &mut I,
    answer: Answer,
    keep_alive: bool,
    out: &mut BytesMut,
    buf: &mut BytesMut,
    feed: &mut Option<Feed>,
) -> bool {
    let Answer {
        resp,
        forwarded,
        advertised,
        head,
    } = answer;
    let (parts, mut body) = resp.into_parts();
    if out.capacity() == 0 {
        *out = buffers::take(Class::Data);
    }
    let size = if body.is_end_stream() {
        BodySize::Empty
    } else {
        body.size_hint()
            .exact()
            .map_or(BodySize::Unknown, BodySize::Exact)
    };
    let mut keep_alive = keep_alive;
    let fields = forwarded
        .iter()
        .flat_map(|f| f.fields())
        .chain(
            parts
                .headers
                .iter()
                .map(|(name, value)| Line::new(name.as_str().as_bytes(), value.as_bytes())),
        )
        .chain(advertised.iter().map(|v| Line {
            known: Name::KeepAlive,
            name: b"keep-alive",
            value: v.as_bytes(),
            raw: None,
        }));
    let mut encoder = encode::response_head(parts.status, fields, head, size, &mut keep_alive, out);
    drop((parts, forwarded));
    let mut whole = true;
    if !encoder.is_done() {
        whole = loop {
            // What is gathered is written while the body has nothing ready.
            let step = std::future::poll_fn(|cx| {
                for _ in 0..FEED_TURNS {
                    match Pin::new(&mut body).poll_frame(cx) {
                        Poll::Ready(frame) => return Poll::Ready(Step::Frame(frame)),
                        Poll::Pending if !out.is_empty() => return Poll::Ready(Step::Flush),
                        Poll::Pending => {}
                    }
                    match poll_client(io, buf, feed, cx) {
                        Poll::Ready(true) => return Poll::Ready(Step::Gone),
                        Poll::Ready(false) => {}
                        Poll::Pending => return Poll::Pending,
                    }
                }
                cx.waker().wake_by_ref();
                Poll::Pending
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
    buffers::give(Class::Data, std::mem::take(out));
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
    use crate::body::ReadError;

    /// `take` on `bytes`: the request and what is left after it.
    fn taken(bytes: &[u8]) -> (Option<Taken>, BytesMut) {
        let mut buf = BytesMut::from(bytes);
        let head = head::parse_request(&mut buf, 1 << 16).unwrap().unwrap();
        (take(&head, &mut buf), buf)
    }

    /// The fields of the head of `bytes` as the proxy reads them, as a map.
    fn map_of(bytes: &[u8]) -> http::HeaderMap {
        let head = head::parse_request(&mut BytesMut::from(bytes), 1 << 16)
            .unwrap()
            .unwrap();
        crate::proxy::RequestFields::parsed(&head.fields).to_map()
    }

    #[test]
    fn a_body_that_came_whole_is_taken_with_one_length() {
        let request =
            b"POST /p HTTP/1.1\r\nHost: a\r\nContent-Length: 3\r\nContent-Length: 3\r\n\r\nabcGET";
        let (t, rest) = taken(request);
        let t = t.expect("taken");
        let map = map_of(request);
        assert_eq!(map.get_all("content-length").iter().count(), 1);
        assert_eq!(t.req.body().size_hint().exact(), Some(3));
        assert_eq!(&rest[..], b"GET", "the next request's bytes stay");
    }

    /// The body of `t`, fed from `rest` then ended there (the client closed).
    fn fed_body(t: Taken, rest: &mut BytesMut) -> Result<Vec<u8>, ReadError> {
        let mut feed = t.feed.expect("a body to feed");
        let mut body = t.req.into_body();
        let mut cx = Context::from_waker(std::task::Waker::noop());
        let mut got = Vec::new();
        loop {
            match Pin::new(&mut body).poll_frame(&mut cx) {
                Poll::Ready(Some(Ok(frame))) => got.extend_from_slice(&frame.into_data().unwrap()),
                Poll::Ready(Some(Err(e))) => return Err(e),
                Poll::Ready(None) => return Ok(got),
                Poll::Pending => {
                    if feed.fill(rest, Some(&cx)) == Fill::Empty {
                        feed.cut_short(Some(&cx));
                    }
                }
            }
        }
    }

    #[test]
    fn a_body_still_to_come_is_fed_and_what_follows_stays() {
        let (t, mut rest) = taken(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nab");
        let t = t.expect("taken");
        assert_eq!(t.req.body().size_hint().exact(), Some(5));
        rest.extend_from_slice(b"cdeGET");
        assert_eq!(fed_body(t, &mut rest).unwrap(), b"abcde");
        assert_eq!(&rest[..], b"GET", "the next request's bytes stay");

        let chunked =
            b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\nGET";
        let (t, mut rest) = taken(chunked);
        let t = t.expect("chunked is taken");
        assert!(
            map_of(chunked).contains_key("transfer-encoding"),
            "as hyper keeps it"
        );
        assert_eq!(fed_body(t, &mut rest).unwrap(), b"abc");
        assert_eq!(&rest[..], b"GET");
    }

    #[test]
    fn a_body_cut_short_or_badly_chunked_fails() {
        let (t, mut rest) = taken(b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 5\r\n\r\nab");
        assert!(matches!(
            fed_body(t.unwrap(), &mut rest),
            Err(ReadError::Closed)
        ));
        let (t, mut rest) =
            taken(b"POST / HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n");
        assert!(matches!(
            fed_body(t.unwrap(), &mut rest),
            Err(ReadError::Chunk(_))
        ));
    }

    #[test]
    fn expect_100_continue_is_taken_and_answered_when_the_body_is_wanted() {
        let (t, _) = taken(
            b"POST / HTTP/1.1\r\nHost: a\r\nExpect: 100-Continue\r\nContent-Length: 2\r\n\r\n",
        );
        let feed = t.expect("taken").feed.expect("fed");
        assert!(feed.continue_due());
        let (t, _) =
            taken(b"POST / HTTP/1.1\r\nHost: a\r\nExpect: other\r\nContent-Length: 2\r\n\r\n");
        assert!(t.is_none(), "another expectation is hyper's");
    }

    #[test]
    fn an_upgrade_without_a_body_is_taken() {
        let upgrade =
            b"GET / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\n\r\n";
        assert!(taken(upgrade).0.is_some(), "taken");
        assert_eq!(map_of(upgrade)["upgrade"], "websocket");
        let with_body = b"POST / HTTP/1.1\r\nHost: a\r\nUpgrade: websocket\r\nConnection: upgrade\r\nContent-Length: 1\r\n\r\nx";
        assert!(taken(with_body).0.is_none(), "hyper's");
    }

    #[test]
    fn old_versions_and_refused_framing_are_hyper_s() {
        let signed = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: +1\r\n\r\nx";
        let (t, rest) = taken(signed);
        assert!(t.is_none(), "hyper answers the 400");
        assert_eq!(&rest[..], b"x", "untouched for hyper");
        let both = b"POST / HTTP/1.1\r\nHost: a\r\nContent-Length: 1\r\nTransfer-Encoding: chunked\r\n\r\n";
        assert!(taken(both).0.is_none());
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
