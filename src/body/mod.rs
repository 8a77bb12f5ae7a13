//! Owns the bodies on their way through kaproxy: the downstream request body with its
//! `body_timeout`, the buffering of a small request body before an upstream connection is
//! taken (`request_buffer_bytes`), the read-ahead of a small response so its upstream
//! connection goes back to the pool at once (`response_buffer_bytes`), and [`BodyError`],
//! which says that a broken request body is the client's fault, never the backend's.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use http_body::{Body, Frame, SizeHint};
use http_body_util::BodyExt;
use hyper::body::Incoming;
use tokio::time::{Instant, Sleep};

/// What a request body's reader drops when the body has been read to its end (or abandoned):
/// it tells the downstream connection that its request has been read in full.
pub type BodyDone = Arc<dyn Send + Sync>;

/// Why a downstream request body could not be read. Always the client's fault: answered
/// 400/408 and never counted against a backend (see README, "Hostile clients").
#[derive(Debug, thiserror::Error)]
pub enum BodyError {
    /// No byte of the body arrived for `body_timeout` (nginx's client_body_timeout): 408.
    #[error("request body: no data for {0:?} (body_timeout)")]
    Timeout(Duration),
    /// Bad framing (a broken chunk size or line), or the client went away mid-body: 400.
    #[error("request body: {0}")]
    Malformed(#[source] hyper::Error),
}

impl BodyError {
    /// The status the client gets when no response has started yet.
    pub fn status(&self) -> http::StatusCode {
        match self {
            BodyError::Timeout(_) => http::StatusCode::REQUEST_TIMEOUT,
            BodyError::Malformed(_) => http::StatusCode::BAD_REQUEST,
        }
    }

    /// The [`BodyError`] somewhere in `err`'s source chain: how a body that failed inside
    /// hyper's client (while being written upstream) is told apart from a backend failure.
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

/// A downstream request body on its way upstream: fails with [`BodyError::Timeout`] when the
/// client sends nothing for `body_timeout`, and drops its `done` guard at its end.
pub struct RequestBody {
    inner: Incoming,
    done: Option<BodyDone>,
    timeout: Duration,
    /// Armed at the first read that finds nothing; boxed because most bodies never wait.
    deadline: Option<Pin<Box<Sleep>>>,
    /// Data arrived since the deadline was last set: the next wait starts a new gap.
    progressed: bool,
}

impl RequestBody {
    pub fn new(inner: Incoming, done: Option<BodyDone>, timeout: Duration) -> Self {
        RequestBody {
            inner,
            done,
            timeout,
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

/// The body kaproxy sends upstream: nothing, a buffered body (which a retry can send again),
/// or a body streaming from the client after the part already buffered.
pub enum UpstreamBody {
    Empty,
    Full(Option<Bytes>),
    Stream {
        prefix: Option<Bytes>,
        rest: RequestBody,
    },
}

impl UpstreamBody {
    /// A body that can be built again for a retry: empty or wholly buffered.
    pub fn replay(&self) -> Option<UpstreamBody> {
        match self {
            UpstreamBody::Empty => Some(UpstreamBody::Empty),
            UpstreamBody::Full(b) => Some(UpstreamBody::Full(b.clone())),
            UpstreamBody::Stream { .. } => None,
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
            UpstreamBody::Full(b) => Poll::Ready(b.take().map(|b| Ok(Frame::data(b)))),
            UpstreamBody::Stream { prefix, rest } => match prefix.take() {
                Some(b) => Poll::Ready(Some(Ok(Frame::data(b)))),
                None => Pin::new(rest).poll_frame(cx),
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        match self {
            UpstreamBody::Empty => true,
            UpstreamBody::Full(b) => b.is_none(),
            UpstreamBody::Stream { prefix, rest } => prefix.is_none() && rest.is_end_stream(),
        }
    }

    fn size_hint(&self) -> SizeHint {
        match self {
            UpstreamBody::Empty => SizeHint::with_exact(0),
            UpstreamBody::Full(b) => SizeHint::with_exact(b.as_ref().map_or(0, |b| b.len() as u64)),
            UpstreamBody::Stream { prefix, rest } => {
                let extra = prefix.as_ref().map_or(0, |b| b.len() as u64);
                let inner = rest.size_hint();
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

/// Reads a request body whole when it fits in `limit` bytes, so that a slow upload is
/// received by kaproxy before any backend is involved (nginx's request buffering). A body
/// announced larger than `limit`, or found larger while reading, streams after what was read.
pub async fn buffer_request(
    mut body: RequestBody,
    limit: usize,
) -> Result<UpstreamBody, BodyError> {
    if body.size_hint().lower() > limit as u64 {
        return Ok(UpstreamBody::Stream {
            prefix: None,
            rest: body,
        });
    }
    let mut read = Collected::default();
    while !body.is_end_stream() {
        match body.frame().await {
            None => break,
            Some(frame) => {
                // Trailers of a buffered body are dropped (nginx drops them too).
                if let Ok(data) = frame?.into_data() {
                    read.push(data);
                }
            }
        }
        if read.len > limit {
            return Ok(UpstreamBody::Stream {
                prefix: Some(read.into_bytes()),
                rest: body,
            });
        }
    }
    Ok(UpstreamBody::Full(Some(read.into_bytes())))
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
