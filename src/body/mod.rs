//! Owns the bodies on their way through kaproxy (README, "Buffering"): the downstream request
//! body with its `body_timeout` and `max_request_body_bytes`, a request body read whole before
//! an upstream connection is taken (in memory up to `request_buffer_bytes`, then in a
//! temporary file: [`read_whole`]), or its first part when it streams ([`buffer_request`]),
//! and [`BodyError`], which says that a broken request body is never the backend's fault.
//!
//! Beside it: [`budget`] (the memory every body buffer of the process shares), [`spill`] (the
//! temporary files) and [`relay`] (a response read as fast as the backend sends it).

pub mod budget;
pub mod fed;
pub mod relay;
pub mod spill;

pub use budget::{Buffering, Memory};
pub use spill::{SpillError, SpillFile};

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

use crate::http1::chunked::ChunkError;

/// What a request body's reader drops when the body has been read to its end (or abandoned):
/// it tells the downstream connection that its request has been read in full.
pub type BodyDone = Arc<dyn Send + Sync>;

/// Why a downstream request body could not be read or held. Never the backend's fault:
/// answered 400/408/413/500 and never counted against a backend (README, "Hostile clients").
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// No byte of the body arrived for `body_timeout` (nginx's client_body_timeout): 408.
    #[error("request body: no data for {0:?} (body_timeout)")]
    Timeout(Duration),
    /// Bad framing (a broken chunk size or line), or the client went away mid-body: 400.
    #[error("request body: {0}")]
    Malformed(#[source] ReadError),
    /// More than `max_request_body_bytes` (nginx's client_max_body_size): 413.
    #[error("request body larger than max_request_body_bytes ({0} bytes)")]
    TooLarge(u64),
    /// kaproxy could not keep the body in a temporary file (disk full, directory gone): 500,
    /// as nginx answers when it cannot write its client_body_temp_path.
    #[error("request body: {0}")]
    Spill(#[from] SpillError),
}

impl BodyError {
    /// The status the client gets when no response has started yet.
    pub fn status(&self) -> http::StatusCode {
        match self {
            BodyError::Timeout(_) => http::StatusCode::REQUEST_TIMEOUT,
            BodyError::Malformed(_) => http::StatusCode::BAD_REQUEST,
            BodyError::TooLarge(_) => http::StatusCode::PAYLOAD_TOO_LARGE,
            BodyError::Spill(_) => http::StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The [`BodyError`] somewhere in `err`'s source chain: how a body that failed
    /// while being written upstream is told apart from a backend failure.
    pub fn in_chain<'a>(err: &'a (dyn std::error::Error + 'static)) -> Option<&'a BodyError> {
        let mut source: Option<&(dyn std::error::Error + 'static)> = Some(err);
        while let Some(e) = source {
            if let Some(body) = e.downcast_ref::<BodyError>() {
                return Some(body);
            }
            source = e.source();
        }
        None
    }
}

/// Why reading a request body from the client failed (as [`BodyError::Malformed`], a 400).
#[derive(Debug, thiserror::Error)]
pub enum ReadError {
    /// From hyper's server.
    #[error(transparent)]
    Hyper(#[from] hyper::Error),
    /// A chunked body kaproxy's own loop refused.
    #[error("chunked body: {0}")]
    Chunk(#[from] ChunkError),
    /// The client closed the connection, or it failed, before the body's end.
    #[error("the client's connection ended within the body")]
    Closed,
}

/// A request body as the downstream connection gives it: none, a small body kaproxy's own
/// HTTP/1.1 loop (`src/downstream/h1.rs`) found whole in its buffer with the head, one that
/// loop feeds as it reads it ([`fed`]), or hyper's (HTTP/2, and the HTTP/1.1 requests that
/// loop hands to hyper).
pub enum ClientBody {
    Empty,
    /// The whole body.
    Whole(Full<Bytes>),
    Fed(fed::FedBody),
    Hyper(Incoming),
}

impl Body for ClientBody {
    type Data = Bytes;
    type Error = ReadError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, ReadError>>> {
        match self.get_mut() {
            ClientBody::Empty => Poll::Ready(None),
            ClientBody::Whole(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
            ClientBody::Fed(b) => b.poll_frame(cx),
            ClientBody::Hyper(b) => Pin::new(b).poll_frame(cx).map_err(ReadError::Hyper),
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            ClientBody::Empty => true,
            ClientBody::Whole(b) => b.is_end_stream(),
            ClientBody::Fed(b) => b.is_end_stream(),
            ClientBody::Hyper(b) => b.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            ClientBody::Empty => SizeHint::with_exact(0),
            ClientBody::Whole(b) => b.size_hint(),
            ClientBody::Fed(b) => b.size_hint(),
            ClientBody::Hyper(b) => b.size_hint(),
        }
    }
}

/// A downstream request body on its way upstream: fails with [`BodyError::Timeout`] when the
/// client sends nothing for `body_timeout`, with [`BodyError::TooLarge`] past `max` bytes,
/// and drops its `done` guard at its end.
pub struct RequestBody {
    inner: ClientBody,
    done: Option<BodyDone>,
    timeout: Duration,
    /// `max_request_body_bytes`, and how much has arrived.
    max: Option<u64>,
    read: u64,
    /// Armed at the first read that finds nothing; boxed because most bodies never wait.
    deadline: Option<Pin<Box<Sleep>>>,
    /// Data arrived since the deadline was last set: the next wait starts a new gap.
    progressed: bool,
}

impl RequestBody {
    pub fn new(
        inner: ClientBody,
        done: Option<BodyDone>,
        timeout: Duration,
        max: Option<u64>,
    ) -> Self {
        RequestBody {
            inner,
            done,
            timeout,
            max,
            read: 0,
            deadline: None,
            progressed: false,
        }
    }

    /// Checks the gap since the last data; `Ready` means `body_timeout` has passed.
    fn poll_gap(&mut self, cx: &mut Context<'_>) -> Poll<()> {
        match &mut self.deadline {
            None => self.deadline = Some(Box::pin(tokio::time::sleep(self.timeout))),
            Some(d) if self.progressed => d.as_mut().reset(Instant::now() + self.timeout),
            Some(_) => {}
        }
        self.progressed = false;
        self.deadline
            .as_mut()
            .expect("armed above")
            .as_mut()
            .poll(cx)
    }
}

impl Body for RequestBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Pending => {
                if this.poll_gap(cx).is_ready() {
                    this.done = None;
                    return Poll::Ready(Some(Err(BodyError::Timeout(this.timeout))));
                }
                Poll::Pending
            }
            Poll::Ready(Some(Ok(frame))) => {
                this.progressed = true;
                if let (Some(max), Some(data)) = (this.max, frame.data_ref()) {
                    this.read += data.len() as u64;
                    if this.read > max {
                        this.done = None;
                        return Poll::Ready(Some(Err(BodyError::TooLarge(max))));
                    }
                }
                if this.inner.is_end_stream() {
                    this.done = None;
                }
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => {
                this.done = None;
                Poll::Ready(Some(Err(BodyError::Malformed(e))))
            }
            Poll::Ready(None) => {
                this.done = None;
                Poll::Ready(None)
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// The body kaproxy sends upstream: nothing, a body read whole (in memory or in a temporary
/// file; a retry can send it again), or a body streaming from the client after the part
/// already read.
pub enum UpstreamBody {
    Empty,
    /// Whole, in memory; its share of the budget is held while any copy of it lives.
    Full {
        data: Option<Bytes>,
        held: Arc<Memory>,
    },
    /// Whole, in a temporary file, read back a chunk at a time. Boxed, like `Stream`: the
    /// body moves with its request several times on the way out, and most bodies are empty
    /// or small.
    File(Box<spill::FileReader>),
    Stream(Box<Streamed>),
}

/// A request body streaming from the client.
pub struct Streamed {
    /// What was read before it had to stream, with its share of the budget.
    pub prefix: Option<(Bytes, Memory)>,
    pub rest: RequestBody,
    /// Told when the body has been read to its end (so all of it has gone upstream).
    pub sent: SentWhole,
}

impl Streamed {
    pub fn new(prefix: Option<(Bytes, Memory)>, rest: RequestBody) -> Streamed {
        Streamed {
            prefix,
            rest,
            sent: SentWhole::default(),
        }
    }
}

/// Whether a streamed request body has been sent whole: the time to the response starts then
/// (`response_timeout` counts from the end of the request, not from its head, or a slow
/// upload would time out waiting for the response it has not finished asking for).
#[derive(Clone, Default)]
pub struct SentWhole(Arc<SentState>);

#[derive(Default)]
struct SentState {
    done: std::sync::atomic::AtomicBool,
    notify: tokio::sync::Notify,
}

impl SentWhole {
    fn mark(&self) {
        if !self.0.done.swap(true, std::sync::atomic::Ordering::AcqRel) {
            self.0.notify.notify_waiters();
        }
    }

    /// Waits until the body has been sent whole.
    pub async fn wait(&self) {
        loop {
            let notified = self.0.notify.notified();
            if self.0.done.load(std::sync::atomic::Ordering::Acquire) {
                return;
            }
            notified.await;
        }
    }
}

impl UpstreamBody {
    /// A body that can be built again for a retry: empty or read whole.
    pub fn replay(&self) -> Option<UpstreamBody> {
        match self {
            UpstreamBody::Empty => Some(UpstreamBody::Empty),
            UpstreamBody::Full { data, held } => Some(UpstreamBody::Full {
                data: data.clone(),
                held: held.clone(),
            }),
            UpstreamBody::File(reader) => Some(UpstreamBody::File(Box::new(reader.replay()))),
            UpstreamBody::Stream(_) => None,
        }
    }

    /// For a body streaming from the client: what tells when it has been sent whole.
    pub fn streaming_sent(&self) -> Option<SentWhole> {
        match self {
            UpstreamBody::Stream(s) => Some(s.sent.clone()),
            _ => None,
        }
    }

    fn full(data: Bytes, held: Memory) -> UpstreamBody {
        UpstreamBody::Full {
            data: Some(data),
            held: Arc::new(held),
        }
    }
}

impl Body for UpstreamBody {
    type Data = Bytes;
    type Error = BodyError;

    fn poll_frame(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, BodyError>>> {
        match self.get_mut() {
            UpstreamBody::Empty => Poll::Ready(None),
            UpstreamBody::Full { data, .. } => Poll::Ready(data.take().map(|b| Ok(Frame::data(b)))),
            UpstreamBody::File(reader) => Pin::new(&mut **reader).poll_frame(cx),
            UpstreamBody::Stream(s) => {
                let res = match s.prefix.take() {
                    Some((b, _held)) => Poll::Ready(Some(Ok(Frame::data(b)))),
                    None => Pin::new(&mut s.rest).poll_frame(cx),
                };
                if matches!(res, Poll::Ready(None)) || s.prefix.is_none() && s.rest.is_end_stream()
                {
                    s.sent.mark();
                }
                res
            }
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Empty => true,
            UpstreamBody::Full { data, .. } => data.is_none(),
            UpstreamBody::File(reader) => reader.is_end_stream(),
            UpstreamBody::Stream(s) => s.prefix.is_none() && s.rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Empty => SizeHint::with_exact(0),
            UpstreamBody::Full { data, .. } => {
                SizeHint::with_exact(data.as_ref().map_or(0, |b| b.len() as u64))
            }
            UpstreamBody::File(reader) => reader.size_hint(),
            UpstreamBody::Stream(s) => {
                let extra = s.prefix.as_ref().map_or(0, |(b, _)| b.len() as u64);
                let inner = s.rest.size_hint();
                let mut hint = SizeHint::new();
                hint.set_lower(inner.lower() + extra);
                if let Some(upper) = inner.upper() {
                    hint.set_upper(upper + extra);
                }
                hint
            }
        }
    }
}

/// Reads a request body whole before any backend is involved (`request_buffering`, nginx's
/// `proxy_request_buffering on`): in memory up to `memory_max` bytes while the budget has
/// them, else — or once it grows past that — in a temporary file, until its end. A slow upload
/// then never holds an upstream connection, and the body can be sent again on a retry.
/// Trailers of a buffered body are dropped (nginx drops them too).
pub async fn read_whole(
    mut body: RequestBody,
    memory_max: usize,
    buffering: &Buffering,
) -> Result<UpstreamBody, BodyError> {
    let mut held = buffering.memory();
    let mut read = Collected::default();
    let mut file: Option<SpillFile> = None;
    // A body announced larger than its memory share goes to disk from its first byte.
    if body.size_hint().lower() > memory_max as u64 {
        file = Some(SpillFile::create(buffering, spill::Direction::Request).await?);
    }
    while !body.is_end_stream() {
        let Some(frame) = body.frame().await else {
            break;
        };
        let Ok(data) = frame?.into_data() else {
            continue;
        };
        if let Some(file) = &mut file {
            file.append(data).await?;
            continue;
        }
        if read.len + data.len() <= memory_max && held.try_grow(data.len()) {
            read.push(data);
            continue;
        }
        // Past its memory share, or the budget is spent: what was read goes to the file
        // first, and its memory is given back.
        let mut spill = SpillFile::create(buffering, spill::Direction::Request).await?;
        let so_far = std::mem::take(&mut read).into_bytes();
        if !so_far.is_empty() {
            spill.append(so_far).await?;
        }
        held.shrink(held.bytes());
        spill.append(data).await?;
        file = Some(spill);
    }
    Ok(match file {
        Some(file) => UpstreamBody::File(Box::new(spill::FileReader::whole(Arc::new(file)))),
        None if read.len == 0 => UpstreamBody::Empty,
        None => UpstreamBody::full(read.into_bytes(), held),
    })
}

/// Reads the first part of a request body that streams (`request_buffering = false`): whole
/// when it fits in `limit` bytes (and the budget has them), so a small slow upload still never
/// holds an upstream connection; a body announced larger, or found larger while reading,
/// streams after what was read.
pub async fn buffer_request(
    mut body: RequestBody,
    limit: usize,
    buffering: &Buffering,
) -> Result<UpstreamBody, BodyError> {
    let stream = |prefix, rest| UpstreamBody::Stream(Box::new(Streamed::new(prefix, rest)));
    if body.size_hint().lower() > limit as u64 {
        return Ok(stream(None, body));
    }
    let mut held = buffering.memory();
    let mut read = Collected::default();
    while !body.is_end_stream() {
        match body.frame().await {
            None => break,
            Some(frame) => {
                if let Ok(data) = frame?.into_data() {
                    let fits = read.len + data.len() <= limit && held.try_grow(data.len());
                    if !fits {
                        held.force_grow(data.len());
                    }
                    read.push(data);
                    if !fits {
                        return Ok(stream(Some((read.into_bytes(), held)), body));
                    }
                }
            }
        }
    }
    Ok(UpstreamBody::full(read.into_bytes(), held))
}

/// Data frames read so far, kept without copying while there is only one.
#[derive(Default)]
pub struct Collected {
    first: Option<Bytes>,
    more: Option<BytesMut>,
    pub len: usize,
}

impl Collected {
    pub fn push(&mut self, data: Bytes) {
        if data.is_empty() {
            return;
        }
        self.len += data.len();
        match (&mut self.first, &mut self.more) {
            (None, _) => self.first = Some(data),
            (Some(_), Some(more)) => more.extend_from_slice(&data),
            (Some(first), None) => {
                let mut more = BytesMut::with_capacity(first.len() + data.len());
                more.extend_from_slice(first);
                more.extend_from_slice(&data);
                self.more = Some(more);
            }
        }
    }

    pub fn into_bytes(self) -> Bytes {
        match (self.first, self.more) {
            (_, Some(more)) => more.freeze(),
            (Some(first), None) => first,
            (None, None) => Bytes::new(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn collected_keeps_one_frame_and_joins_more() {
        let mut c = Collected::default();
        c.push(Bytes::from_static(b"ab"));
        assert_eq!(c.len, 2);
        c.push(Bytes::new());
        c.push(Bytes::from_static(b"cd"));
        c.push(Bytes::from_static(b"e"));
        assert_eq!(c.len, 5);
        assert_eq!(c.into_bytes(), Bytes::from_static(b"abcde"));
        assert_eq!(Collected::default().into_bytes(), Bytes::new());
    }

    #[test]
    fn a_body_error_is_found_in_a_source_chain() {
        #[derive(Debug, thiserror::Error)]
        #[error("outer")]
        struct Outer(#[source] BodyError);
        let err = Outer(BodyError::Timeout(Duration::from_secs(1)));
        let found = BodyError::in_chain(&err).expect("found");
        assert_eq!(found.status(), http::StatusCode::REQUEST_TIMEOUT);
        let plain = std::io::Error::other("backend reset");
        assert!(BodyError::in_chain(&plain).is_none());
    }
}
