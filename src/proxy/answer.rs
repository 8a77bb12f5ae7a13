//! Owns what every response sent downstream is made of: [`ProxyBody`] (a body streamed from
//! a pooled connection, read ahead, relayed, tunnelled, or kaproxy's own), which writes the
//! access log line when it ends, and the form of kaproxy's own answers ([`local_response`],
//! [`closing`]); when each answer is given is the request context's ([`super::context`]).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::body::relay::RelayBody;
use crate::body::Memory;
use crate::upstream::exchange::PooledBody;

use super::log::AccessRecord;

/// Marks kaproxy's own answer to a broken request as the last on an HTTP/1 connection.
pub(super) fn closing(mut resp: Response<ProxyBody>, version: Version) -> Response<ProxyBody> {
    if matches!(version, Version::HTTP_10 | Version::HTTP_11) {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// A response kaproxy makes itself (errors).
pub fn local_response(status: StatusCode, text: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody {
        inner: Inner::Local(Full::new(Bytes::from_static(text.as_bytes()))),
        bytes: 0,
        log: None,
    });
    *resp.status_mut() = status;
    resp.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    resp
}

pub(super) enum Inner {
    /// Streaming from its pooled upstream connection.
    Upstream(PooledBody),
    /// Read whole from the backend, holding its share of the memory budget until sent.
    ReadAhead {
        body: Full<Bytes>,
        _held: Memory,
    },
    /// Read from the backend by a relay, as fast as the backend sends it.
    Relay(RelayBody),
    Tunnel(Incoming),
    Local(Full<Bytes>),
    Empty,
}

/// The body of every response kaproxy sends downstream.
pub struct ProxyBody {
    pub(super) inner: Inner,
    pub(super) bytes: u64,
    pub(super) log: Option<Box<AccessRecord>>,
}

impl ProxyBody {
    /// Whether this body streams from a pooled upstream connection or a relay (which a client
    /// that stops reading would hold, with its buffer and temporary file): the downstream
    /// puts such bodies under `send_timeout`.
    pub fn streams_from_upstream(&self) -> bool {
        match &self.inner {
            Inner::Upstream(b) => !b.is_end_stream(),
            Inner::Relay(b) => !b.is_end_stream(),
            _ => false,
        }
    }

    pub(super) fn empty(log: Option<Box<AccessRecord>>) -> Self {
        ProxyBody {
            inner: Inner::Empty,
            bytes: 0,
            log,
        }
    }
}

impl Body for ProxyBody {
    type Data = Bytes;
    type Error = Box<dyn std::error::Error + Send + Sync>;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        let res = match &mut this.inner {
            Inner::Upstream(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Inner::ReadAhead { body: b, .. } => {
                Pin::new(b).poll_frame(cx).map_err(|never| match never {})
            }
            Inner::Relay(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Inner::Tunnel(b) => Pin::new(b).poll_frame(cx).map_err(Into::into),
            Inner::Local(b) => Pin::new(b).poll_frame(cx).map_err(|never| match never {}),
            Inner::Empty => Poll::Ready(None),
        };
        if let Poll::Ready(Some(Ok(frame))) = &res {
            if let Some(data) = frame.data_ref() {
                this.bytes += data.len() as u64;
            }
        }
        res
    }

    fn is_end_stream(&self) -> bool {
        match &self.inner {
            Inner::Upstream(b) => b.is_end_stream(),
            Inner::ReadAhead { body: b, .. } => b.is_end_stream(),
            Inner::Relay(b) => b.is_end_stream(),
            Inner::Tunnel(b) => b.is_end_stream(),
            Inner::Local(b) => b.is_end_stream(),
            Inner::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Upstream(b) => b.size_hint(),
            Inner::ReadAhead { body: b, .. } => b.size_hint(),
            Inner::Relay(b) => b.size_hint(),
            Inner::Tunnel(b) => b.size_hint(),
            Inner::Local(b) => b.size_hint(),
            Inner::Empty => SizeHint::with_exact(0),
        }
    }
}

impl Drop for ProxyBody {
    fn drop(&mut self) {
        if let Some(record) = self.log.take() {
            record.write(self.bytes);
        }
    }
}
