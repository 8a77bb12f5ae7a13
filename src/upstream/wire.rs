//! Owns the bytes on one connection to a backend, kaproxy's own HTTP/1.1 client over
//! [`crate::http1`]: the socket and its read buffer ([`Wire`]), the request on its way out
//! ([`Outgoing`]: its head as the request filter wrote it, [`OutgoingHead`], its body framed
//! as RFC 9112 §6 says), the response head read ([`read_head`], kept as bytes: [`Received`])
//! and its body taken off the read buffer ([`Wire::poll_body`], by [`BodyState`]).
//!
//! The connection has no task of its own: whichever task uses it polls it, the request's while
//! it is checked out, the pool's sweep while it idles. Every poll of the socket goes through a
//! waker of the connection's own ([`ConnWake`]) that records the wake-up and passes it on to
//! that task, so the check before reuse ([`Wire::closed_if_woken`]) costs one atomic load
//! unless something (a FIN, a stray byte) arrived since the socket was last found quiet.

use std::fmt::Write as _;
use std::io::{self, IoSlice};
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::task::{ready, Context, Poll, Wake, Waker};

use bytes::{Buf, Bytes, BytesMut};
use futures_util::task::AtomicWaker;
use http::header::{HeaderName, HeaderValue};
use http::{HeaderMap, Method, StatusCode};
use http_body::{Body, Frame};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};

use crate::body::{BodyError, UpstreamBody};
use crate::error::WireError;
use crate::headers::field_tokens;
use crate::http1::body::BodyState;
use crate::http1::buffers::{self, Class};
use crate::http1::chunked::{self, Chunk};
use crate::http1::framing::{self, Framing};
use crate::http1::head::{self, HeadError, Name, ResponseHead, Version};
use crate::upstream::stream::UpstreamStream;

/// The longest response head read from a backend: 64 KiB, the bound hyper's read buffer put
/// on it before (README, "Framing from backends").
pub const RESPONSE_HEAD_LIMIT: usize = 64 * 1024;

/// The room a read asks for: at most this much is read at once.
const READ_CHUNK: usize = Class::Data.bytes();

/// The waker the socket is polled with: sets `woken`, then wakes the task that uses the
/// connection now, if any.
struct ConnWake {
    woken: AtomicBool,
    task: AtomicWaker,
}

impl Wake for ConnWake {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::Release);
        self.task.wake();
    }
}

/// A backend connection's socket and what it read that nobody has taken yet.
pub struct Wire {
    stream: UpstreamStream,
    read: BytesMut,
    wake: Arc<ConnWake>,
    /// `wake` as a [`Waker`], made once.
    waker: Waker,
}

impl Drop for Wire {
    /// A connection closed gives its read buffer back to the worker's pool, as one that idles
    /// does ([`Wire::detach`]); what is left unread in it is dropped with the connection.
    fn drop(&mut self) {
        buffers::give(Class::Data, std::mem::take(&mut self.read));
    }
}

impl Wire {
    pub fn new(stream: UpstreamStream) -> Wire {
        // Woken from the start: nothing has armed the socket's readiness yet.
        let wake = Arc::new(ConnWake {
            woken: AtomicBool::new(true),
            task: AtomicWaker::new(),
        });
        Wire {
            stream,
            read: BytesMut::new(),
            waker: Waker::from(wake.clone()),
            wake,
        }
    }

    pub fn stream_mut(&mut self) -> &mut UpstreamStream {
        &mut self.stream
    }

    /// Reads more of what the backend sends, for the task of `cx`: `Ok(0)` at its end.
    fn poll_read_more(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<usize>> {
        self.wake.task.register(cx.waker());
        if self.read.capacity() == 0 {
            self.read = buffers::take(Class::Data);
        } else if self.read.capacity() - self.read.len() < READ_CHUNK / 4 {
            self.read.reserve(READ_CHUNK);
        }
        let res = tokio_util::io::poll_read_buf(
            Pin::new(&mut self.stream),
            &mut Context::from_waker(&self.waker),
            &mut self.read,
        );
        if res.is_ready() {
            // The socket's readiness is not armed now: the next check must look.
            self.wake.woken.store(true, Ordering::Release);
        }
        res
    }

    fn poll_write(
        &mut self,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        self.wake.task.register(cx.waker());
        Pin::new(&mut self.stream).poll_write_vectored(&mut Context::from_waker(&self.waker), bufs)
    }

    fn poll_flush(&mut self, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        self.wake.task.register(cx.waker());
        Pin::new(&mut self.stream).poll_flush(&mut Context::from_waker(&self.waker))
    }

    /// Whether the backend closed the connection or sent something no request asked for,
    /// checked without blocking: one atomic load unless something woke the connection since
    /// its socket was last found with nothing to read. Finding it quiet arms the socket, so
    /// that what comes next wakes the connection's task (see [`Self::detach`]).
    pub fn closed_if_woken(&mut self) -> bool {
        if !self.read.is_empty() {
            return true;
        }
        if !self.wake.woken.swap(false, Ordering::AcqRel) {
            return false;
        }
        let mut byte = [0u8; 1];
        let mut buf = ReadBuf::new(&mut byte);
        // Ready is an end, an error, or a byte: the connection is done for either way.
        Pin::new(&mut self.stream)
            .poll_read(&mut Context::from_waker(&self.waker), &mut buf)
            .is_ready()
    }

    /// From now on, what happens on the socket wakes `task` (the pool's sweep, while the
    /// connection idles). An idle connection keeps no read buffer: it goes back to the worker's
    /// pool.
    pub fn detach(&mut self, task: &Waker) {
        if self.read.is_empty() {
            buffers::give(Class::Data, std::mem::take(&mut self.read));
        }
        self.wake.task.register(task);
    }
}

/// A request on its way to the backend: framed bytes not yet written, and the body they
/// continue with.
pub struct Outgoing {
    /// In order: the head, its framing field and empty line, and the body held whole; or a
    /// chunk's size line, data and CRLF (empty when unused). Written with one vectored write:
    /// the head's bytes are not copied.
    pending: [Bytes; 4],
    /// The body still to be read and framed; None once its end is framed.
    body: Option<UpstreamBody>,
    /// The body's bytes are already in `pending` (a body held whole in memory).
    framed_whole: bool,
    chunked: bool,
    /// Some byte went to the socket: the request can no longer be given back unsent.
    wrote: bool,
}

/// Why a request could not be written.
pub enum WriteError {
    /// The client's body broke (kaproxy's reading of it): never the backend's fault.
    Body(BodyError),
    Io(io::Error),
}

/// A request head as it goes to a backend: its request line and fields as bytes, written once
/// (by the request filter, `src/proxy/forwarded.rs`) and sent as they are on every attempt;
/// the framing field is the body's ([`Outgoing::new`]).
#[derive(Debug, Clone)]
pub struct OutgoingHead {
    method: Method,
    /// `method SP target SP HTTP/1.1 CRLF`, then each field line.
    bytes: Bytes,
    /// A `Content-Length` is among the fields (the client's, kept by the filter).
    declared_length: bool,
}

impl OutgoingHead {
    pub fn method(&self) -> &Method {
        &self.method
    }

    /// The request line and field lines, without the framing field and the empty line.
    pub fn as_bytes(&self) -> &Bytes {
        &self.bytes
    }

    /// The head parsed back as a backend reads it (for tests and fuzz targets, which compare
    /// it with the policy's header map); None if it did not parse, which would be a bug.
    pub fn parse(&self) -> Option<head::RequestHead> {
        let mut buf = BytesMut::with_capacity(self.bytes.len() + 2);
        buf.extend_from_slice(&self.bytes);
        buf.extend_from_slice(b"\r\n");
        head::parse_request(&mut buf, usize::MAX).ok().flatten()
    }

    /// The head of `parts` with every field as it is (names as the map has them: lower case),
    /// the target in origin form.
    pub fn from_parts(parts: &http::request::Parts) -> OutgoingHead {
        let target = parts.uri.path_and_query().map_or("/", |p| p.as_str());
        let mut head = HeadWriter::new(&parts.method, target, parts.headers.len());
        for (name, value) in &parts.headers {
            head.field(name.as_str().as_bytes(), value.as_bytes());
        }
        head.finish()
    }
}

/// Writes an [`OutgoingHead`]: the request line, then one field at a time.
pub struct HeadWriter {
    method: Method,
    out: BytesMut,
    declared_length: bool,
}

impl HeadWriter {
    /// Starts the head of a `method` request for `target`, with room for about `fields` fields.
    pub fn new(method: &Method, target: &str, fields: usize) -> HeadWriter {
        let mut out =
            BytesMut::with_capacity(method.as_str().len() + target.len() + 32 * fields + 64);
        out.extend_from_slice(method.as_str().as_bytes());
        out.extend_from_slice(b" ");
        out.extend_from_slice(target.as_bytes());
        out.extend_from_slice(b" HTTP/1.1\r\n");
        HeadWriter {
            method: method.clone(),
            out,
            declared_length: false,
        }
    }

    /// Appends the field line `name: value`.
    pub fn field(&mut self, name: &[u8], value: &[u8]) {
        self.declared_length |= name.eq_ignore_ascii_case(b"content-length");
        self.out.extend_from_slice(name);
        self.out.extend_from_slice(b": ");
        self.out.extend_from_slice(value);
        self.out.extend_from_slice(b"\r\n");
    }

    pub fn finish(self) -> OutgoingHead {
        OutgoingHead {
            method: self.method,
            bytes: self.out.freeze(),
            declared_length: self.declared_length,
        }
    }
}

impl Outgoing {
    /// `head` and `body` as bytes to write. The body is framed as hyper's client frames it
    /// (its `Client::set_length`): by the request's own `Content-Length` when it has one (the
    /// client's, kept by the request filter), else by the body's exact size when known, else
    /// chunked — for every method (hyper sent an unknown-length GET body as none at all);
    /// an empty body gets no field. `Transfer-Encoding` and `Trailer` never arrive here
    /// (hop-by-hop), so a chunked body ends without trailers.
    pub fn new(head: &OutgoingHead, body: UpstreamBody) -> Outgoing {
        let exact = body.size_hint().exact();
        let (length, chunked) = match (body.is_end_stream(), head.declared_length, exact) {
            (true, _, _) | (false, true, _) => (None, false),
            (false, false, Some(n)) => (Some(n), false),
            (false, false, None) => (None, true),
        };
        let framing = match length {
            Some(n) => {
                let mut out = BytesMut::with_capacity(40);
                let _ = write!(out, "content-length: {n}\r\n\r\n");
                out.freeze()
            }
            None if chunked => Bytes::from_static(b"transfer-encoding: chunked\r\n\r\n"),
            None => Bytes::from_static(b"\r\n"),
        };
        let whole = match &body {
            UpstreamBody::Full { data: Some(d), .. } if !chunked => Some(d.clone()),
            _ => None,
        };
        Outgoing {
            framed_whole: whole.is_some(),
            pending: [
                head.bytes.clone(),
                framing,
                whole.unwrap_or_default(),
                Bytes::new(),
            ],
            body: Some(body),
            chunked,
            wrote: false,
        }
    }

    /// Whether some byte of the request went to the socket.
    pub fn wrote_any(&self) -> bool {
        self.wrote
    }

    /// The body, when not a byte of the request was written: safe to send again anywhere.
    pub fn into_unsent(self) -> Option<UpstreamBody> {
        if self.wrote {
            None
        } else {
            self.body
        }
    }

    /// Writes what it can; `Ready(Ok)` once the whole request is written and flushed.
    pub fn poll_write(
        &mut self,
        wire: &mut Wire,
        cx: &mut Context<'_>,
    ) -> Poll<Result<(), WriteError>> {
        loop {
            if self.pending.iter().any(|p| !p.is_empty()) {
                let [a, b, c, d] = &self.pending;
                let slices = [
                    IoSlice::new(a),
                    IoSlice::new(b),
                    IoSlice::new(c),
                    IoSlice::new(d),
                ];
                let n = match ready!(wire.poll_write(cx, &slices)) {
                    Ok(0) => {
                        return Poll::Ready(Err(WriteError::Io(io::ErrorKind::WriteZero.into())))
                    }
                    Ok(n) => n,
                    Err(e) => return Poll::Ready(Err(WriteError::Io(e))),
                };
                self.wrote = true;
                let mut left = n;
                for part in &mut self.pending {
                    let k = left.min(part.len());
                    part.advance(k);
                    left -= k;
                }
                continue;
            }
            let Some(body) = self.body.as_mut() else {
                return wire.poll_flush(cx).map_err(WriteError::Io);
            };
            if self.framed_whole {
                self.body = None;
                continue;
            }
            match ready!(Pin::new(body).poll_frame(cx)) {
                Some(Ok(frame)) => {
                    // Trailers are dropped: no `Trailer` field announced them (see `new`).
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    if self.chunked {
                        let mut start = BytesMut::with_capacity(20);
                        chunked::chunk_start(data.len(), &mut start);
                        self.pending = [
                            start.freeze(),
                            data,
                            Bytes::from_static(chunked::CHUNK_END),
                            Bytes::new(),
                        ];
                    } else {
                        self.pending[0] = data;
                    }
                }
                Some(Err(e)) => return Poll::Ready(Err(WriteError::Body(e))),
                None => {
                    self.body = None;
                    if self.chunked {
                        self.pending[0] = Bytes::from_static(chunked::LAST_CHUNK);
                    }
                }
            }
        }
    }
}

/// Reads the response head off `wire`, past interim (1xx) responses but `101`, which the
/// caller refuses or takes (RFC 9110 §15.2).
pub fn poll_head(wire: &mut Wire, cx: &mut Context<'_>) -> Poll<Result<ResponseHead, WireError>> {
    loop {
        match head::parse_response(&mut wire.read, RESPONSE_HEAD_LIMIT) {
            Ok(Some(head)) if (100..200).contains(&head.status) && head.status != 101 => continue,
            Ok(Some(head)) => return Poll::Ready(Ok(head)),
            Ok(None) => {}
            Err(e) => return Poll::Ready(Err(e.into())),
        }
        match ready!(wire.poll_read_more(cx)) {
            Ok(0) if wire.read.is_empty() => {
                return Poll::Ready(Err(WireError::Closed("before the response")))
            }
            Ok(0) => return Poll::Ready(Err(WireError::Closed("within the response head"))),
            Ok(_) => {}
            Err(e) => return Poll::Ready(Err(e.into())),
        }
    }
}

/// A response from a backend: its status, its head as received (the fields in order, as
/// bytes: the response filter reads them there and kaproxy's HTTP/1.1 loop writes them from
/// there, no header map built on the way), and its body.
#[derive(Debug)]
pub struct Received<B> {
    pub status: StatusCode,
    pub head: ResponseHead,
    pub body: B,
}

impl<B> Received<B> {
    pub fn map<C>(self, f: impl FnOnce(B) -> C) -> Received<C> {
        Received {
            status: self.status,
            head: self.head,
            body: f(self.body),
        }
    }
}

/// A response head read: its status, the body's framing, and whether the connection ends with
/// this response (`Connection: close`, an HTTP/1.0 response without `keep-alive`, or a body
/// delimited by the close).
pub fn read_head(
    head: ResponseHead,
    to_head: bool,
) -> Result<(Received<BodyState>, bool), WireError> {
    let framing = framing::response(head.status, to_head, head.fields.framing())?.framing;
    let status = StatusCode::from_u16(head.status)
        .map_err(|_| WireError::Head(HeadError::Malformed(httparse::Error::Status)))?;
    // One pass over the `Connection` fields for both tokens.
    let (mut close, mut keep) = (false, false);
    for value in head.fields.named(Name::Connection) {
        for token in field_tokens(value) {
            close |= token.eq_ignore_ascii_case("close");
            keep |= token.eq_ignore_ascii_case("keep-alive");
        }
    }
    let keep_alive = match head.version {
        Version::Http11 => !close,
        Version::Http10 => keep && !close,
    };
    let ends = !keep_alive || framing == Framing::UntilClose;
    let body = BodyState::new(framing);
    Ok((Received { status, head, body }, ends))
}

impl Wire {
    /// The next frame of a response body (`body`, where it is in its framing) from this
    /// connection: data as it arrives, the trailers of a chunked body, `None` at its end.
    pub fn poll_body(
        &mut self,
        body: &mut BodyState,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, WireError>>> {
        loop {
            match body.decode(&mut self.read) {
                Ok(Some(Chunk::Data(data))) => return Poll::Ready(Some(Ok(Frame::data(data)))),
                Ok(Some(Chunk::End { trailers })) => {
                    return Poll::Ready(trailers.map(|raw| Ok(Frame::trailers(trailer_map(&raw)))))
                }
                Ok(None) => {}
                Err(e) => return Poll::Ready(Some(Err(e.into()))),
            }
            match ready!(self.poll_read_more(cx)) {
                Ok(0) if body.at_end_of_stream() => return Poll::Ready(None),
                Ok(0) => {
                    return Poll::Ready(Some(Err(WireError::Closed("within the response body"))))
                }
                Ok(_) => {}
                Err(e) => return Poll::Ready(Some(Err(e.into()))),
            }
        }
    }
}

/// A trailer section as the chunked decoder took it (each line a field with its CRLF, checked
/// by it) as a header map.
fn trailer_map(raw: &[u8]) -> HeaderMap {
    let mut map = HeaderMap::new();
    for line in raw.split(|&b| b == b'\n') {
        let line = line.strip_suffix(b"\r").unwrap_or(line);
        let Some(colon) = line.iter().position(|&b| b == b':') else {
            continue;
        };
        let value = line[colon + 1..].trim_ascii();
        if let (Ok(name), Ok(value)) = (
            HeaderName::from_bytes(&line[..colon]),
            HeaderValue::from_bytes(value),
        ) {
            map.append(name, value);
        }
    }
    map
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::upstream::delivery::Tracked;
    use std::future::poll_fn;
    use std::sync::atomic::AtomicUsize;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    use tokio::net::{TcpListener, TcpStream};

    /// A wire to a backend socket the test plays.
    async fn pair() -> (Wire, TcpStream) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (client, accepted) = tokio::join!(TcpStream::connect(addr), listener.accept());
        let stream = UpstreamStream::Plain(Tracked::new(client.unwrap()));
        (Wire::new(stream), accepted.unwrap().0)
    }

    /// Writes `req` whole and returns what the backend read of it.
    async fn written(
        wire: &mut Wire,
        backend: &mut TcpStream,
        req: http::Request<UpstreamBody>,
    ) -> String {
        let (parts, body) = req.into_parts();
        let mut out = Outgoing::new(&OutgoingHead::from_parts(&parts), body);
        assert!(!out.wrote_any());
        poll_fn(|cx| out.poll_write(wire, cx))
            .await
            .ok()
            .expect("written");
        assert!(
            out.wrote_any() && out.into_unsent().is_none(),
            "a written request is not unsent"
        );
        let mut got = vec![0u8; 4096];
        let n = backend.read(&mut got).await.unwrap();
        String::from_utf8(got[..n].to_vec()).unwrap()
    }

    fn full(data: &'static str) -> UpstreamBody {
        let cfg = crate::config::BufferingConfig {
            memory_limit: 1 << 20,
            temp_dir: None,
        };
        let budget =
            crate::body::budget::Buffering::new(&cfg, crate::metrics::Metrics::new().buffering());
        UpstreamBody::Full {
            data: Some(Bytes::from_static(data.as_bytes())),
            held: Arc::new(budget.memory()),
        }
    }

    /// Reads a response off `wire` as `read_head` and `BodyState` give it: status, whether
    /// the connection ends, the body, the trailers, or the first error.
    async fn response(
        wire: &mut Wire,
        to_head: bool,
    ) -> Result<(u16, bool, String, HeaderMap), WireError> {
        let head = poll_fn(|cx| poll_head(wire, cx)).await?;
        let (resp, ends) = read_head(head, to_head)?;
        let status = resp.status.as_u16();
        let mut body = resp.body;
        let (mut data, mut trailers) = (String::new(), HeaderMap::new());
        while let Some(frame) = poll_fn(|cx| wire.poll_body(&mut body, cx)).await {
            match frame?.into_data() {
                Ok(d) => data.push_str(std::str::from_utf8(&d).unwrap()),
                Err(frame) => trailers = frame.into_trailers().unwrap(),
            }
        }
        assert!(body.is_done());
        Ok((status, ends, data, trailers))
    }

    #[tokio::test]
    async fn request_bodies_are_framed_as_hyper_framed_them() {
        let (mut wire, mut backend) = pair().await;
        let get = http::Request::get("http://b/a?q=1")
            .header("host", "b")
            .body(UpstreamBody::Empty)
            .unwrap();
        assert_eq!(
            written(&mut wire, &mut backend, get).await,
            "GET /a?q=1 HTTP/1.1\r\nhost: b\r\n\r\n",
            "origin form, no framing field for no body"
        );
        let post = http::Request::post("/p")
            .header("host", "b")
            .body(full("hello"))
            .unwrap();
        assert_eq!(
            written(&mut wire, &mut backend, post).await,
            "POST /p HTTP/1.1\r\nhost: b\r\ncontent-length: 5\r\n\r\nhello"
        );
        let declared = http::Request::put("/p")
            .header("host", "b")
            .header("content-length", "5")
            .body(full("hello"))
            .unwrap();
        assert_eq!(
            written(&mut wire, &mut backend, declared).await,
            "PUT /p HTTP/1.1\r\nhost: b\r\ncontent-length: 5\r\n\r\nhello",
            "the client's own Content-Length is the one field"
        );
    }

    #[tokio::test]
    async fn interim_heads_are_skipped_and_chunked_trailers_come_through() {
        let (mut wire, mut backend) = pair().await;
        backend
            .write_all(
                b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n\
                  3;ext=1\r\nabc\r\n2\r\nde\r\n0\r\nX-Sum: 5\r\n\r\n",
            )
            .await
            .unwrap();
        let (status, ends, data, trailers) = response(&mut wire, false).await.unwrap();
        assert_eq!((status, ends, data.as_str()), (200, false, "abcde"));
        assert_eq!(trailers.get("x-sum").unwrap(), "5");
        assert!(!wire.closed_if_woken(), "nothing more arrived: reusable");
        let count = Arc::new(Count(AtomicUsize::new(0)));
        wire.detach(&Waker::from(count.clone()));
        drop(backend);
        woken(&count).await;
        assert!(
            wire.closed_if_woken(),
            "the backend's FIN is seen before reuse"
        );
    }

    #[tokio::test]
    async fn a_close_delimited_or_http_1_0_response_ends_the_connection() {
        let (mut wire, mut backend) = pair().await;
        backend
            .write_all(b"HTTP/1.0 200 OK\r\n\r\nhello")
            .await
            .unwrap();
        drop(backend);
        let (status, ends, data, _) = response(&mut wire, false).await.unwrap();
        assert_eq!((status, ends, data.as_str()), (200, true, "hello"));

        let (mut wire, mut backend) = pair().await;
        backend
            .write_all(b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 2\r\n\r\nok")
            .await
            .unwrap();
        let (_, ends, data, _) = response(&mut wire, false).await.unwrap();
        assert_eq!(
            (ends, data.as_str()),
            (false, "ok"),
            "HTTP/1.0 that asked to stay open"
        );

        let (mut wire, mut backend) = pair().await;
        backend
            .write_all(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")
            .await
            .unwrap();
        let (_, ends, _, _) = response(&mut wire, false).await.unwrap();
        assert!(ends, "Connection: close");
    }

    #[tokio::test]
    async fn bodiless_responses_read_no_body_whatever_they_declare() {
        let (mut wire, mut backend) = pair().await;
        backend
            .write_all(
                b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\n\
                  HTTP/1.1 304 Not Modified\r\nContent-Length: 10\r\n\r\n\
                  HTTP/1.1 204 No Content\r\n\r\n\
                  HTTP/1.1 200 OK\r\nContent-Length: 1\r\n\r\nx",
            )
            .await
            .unwrap();
        let head = response(&mut wire, true).await.unwrap();
        assert_eq!((head.0, head.2.as_str()), (200, ""), "a response to HEAD");
        assert_eq!(response(&mut wire, false).await.unwrap().0, 304);
        assert_eq!(response(&mut wire, false).await.unwrap().0, 204);
        let last = response(&mut wire, false).await.unwrap();
        assert_eq!(
            (last.0, last.2.as_str()),
            (200, "x"),
            "each ended where its framing said"
        );
    }

    #[tokio::test]
    async fn responses_cut_short_or_malformed_are_errors() {
        let cases: [(&[u8], &str); 4] = [
            (b"", "before the response"),
            (b"HTTP/1.1 200 OK\r\nContent-", "within the response head"),
            (
                b"HTTP/1.1 200 OK\r\nContent-Length: 10\r\n\r\nabc",
                "within the response body",
            ),
            (
                b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nab",
                "within the response body",
            ),
        ];
        for (sent, expect) in cases {
            let (mut wire, mut backend) = pair().await;
            backend.write_all(sent).await.unwrap();
            drop(backend);
            match response(&mut wire, false).await {
                Err(WireError::Closed(at)) => assert_eq!(at, expect, "{sent:?}"),
                other => panic!("{sent:?}: {:?}", other.map(|r| r.0)),
            }
        }
        let lying: [&[u8]; 3] = [
            b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nab",
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
            b"HTTP/1.1 2000 OK\r\n\r\n",
        ];
        for sent in lying {
            let (mut wire, mut backend) = pair().await;
            backend.write_all(sent).await.unwrap();
            drop(backend);
            match response(&mut wire, false).await {
                Err(e) => assert!(e.is_malformed(), "{sent:?}: {e}"),
                Ok(r) => panic!("{sent:?} accepted: {}", r.0),
            }
        }
    }

    /// Counts its wake-ups.
    struct Count(AtomicUsize);
    impl Wake for Count {
        fn wake(self: Arc<Self>) {
            self.0.fetch_add(1, Ordering::SeqCst);
        }
    }

    /// Returns once `count` saw a wake-up (the runtime's reactor runs between the yields).
    async fn woken(count: &Count) {
        let deadline = tokio::time::Instant::now() + std::time::Duration::from_secs(5);
        while count.0.load(Ordering::SeqCst) == 0 {
            assert!(
                tokio::time::Instant::now() < deadline,
                "the socket woke the connection's task"
            );
            tokio::task::yield_now().await;
        }
    }

    /// A connection that has read one empty response, and its backend's end.
    async fn answered_once() -> (Wire, TcpStream) {
        let (mut wire, mut backend) = pair().await;
        backend
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\n\r\n")
            .await
            .unwrap();
        response(&mut wire, false).await.unwrap();
        (wire, backend)
    }

    #[tokio::test]
    async fn an_idle_connection_is_checked_by_one_load_and_a_stray_byte_wakes_its_task() {
        let (mut wire, mut backend) = answered_once().await;
        assert!(
            wire.wake.woken.load(Ordering::Acquire),
            "reading left the socket unarmed"
        );
        assert!(!wire.closed_if_woken(), "quiet: reusable");
        assert!(
            !wire.wake.woken.load(Ordering::Acquire),
            "the look armed it"
        );
        assert!(
            !wire.closed_if_woken(),
            "the second check is the load alone"
        );

        let count = Arc::new(Count(AtomicUsize::new(0)));
        wire.detach(&Waker::from(count.clone()));
        assert_eq!(
            wire.read.capacity(),
            0,
            "an idle connection keeps no read buffer"
        );
        backend.write_all(b"x").await.unwrap();
        woken(&count).await;
        assert!(
            wire.closed_if_woken(),
            "a byte no request asked for ends it"
        );
    }

    #[tokio::test(flavor = "current_thread")]
    async fn a_connection_dropped_gives_its_read_buffer_back_to_the_workers_pool() {
        let (wire, _backend) = answered_once().await;
        assert!(wire.read.capacity() > 0, "reading took a buffer");
        let kept = buffers::kept(Class::Data);
        drop(wire);
        assert_eq!(buffers::kept(Class::Data), kept + 1);
    }
}
