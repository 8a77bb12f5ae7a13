//! Owns what every response sent downstream is made of: [`ProxyBody`] (a body streamed from
//! a pooled connection, read ahead, relayed, tunnelled, or kaproxy's own), which writes the
//! access log line when it ends and carries a backend's head as received ([`ForwardedHead`]),
//! and the form of kaproxy's own answers ([`local_response`],
//! [`closing`]); when each answer is given is the request context's ([`super::context`]).

use std::pin::Pin;
use std::task::{Context, Poll};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::Full;
use hyper::body::Incoming;

use crate::body::relay::RelayBody;
use crate::body::Memory;
use crate::http1::head::{Line, ResponseHead};
use crate::upstream::exchange::PooledBody;

use super::log::AccessRecord;
use super::switched::Switched;

/// Marks kaproxy's own answer to a broken request as the last on an HTTP/1 connection.
pub(super) fn closing(mut resp: Response<ProxyBody>, version: Version) -> Response<ProxyBody> {
    if matches!(version, Version::HTTP_10 | Version::HTTP_11) {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// A backend's response head on its way downstream: its fields as the backend sent them, less
/// those the response filter drops (`src/proxy/response.rs`: hop-by-hop, `X-Accel-Buffering`,
/// a `Content-Length` beside `Transfer-Encoding`). kaproxy's HTTP/1.1 loop writes them from
/// these bytes, names in the backend's case (as nginx does); HTTP/2 and hyper's HTTP/1.1 get
/// them in the response's header map ([`forwarded_into_map`]).
pub struct ForwardedHead {
    head: ResponseHead,
    /// Bit `i` set: the head's field `i` is dropped (a head has at most
    /// [`crate::http1::head::MAX_FIELDS`] fields).
    dropped: u128,
}

impl ForwardedHead {
    pub(super) fn new(head: ResponseHead, dropped: u128) -> Self {
        ForwardedHead { head, dropped }
    }

    /// The fields that go on, in the order received.
    pub fn fields(&self) -> impl Iterator<Item = Line<'_>> + '_ {
        self.head
            .fields
            .lines()
            .enumerate()
            .filter(|(i, _)| self.dropped & (1 << i) == 0)
            .map(|(_, field)| field)
    }

    /// The head's fields as `http` types, shared with its bytes (a name or value the `http`
    /// types refuse, which httparse has already refused, is left out).
    fn append_to(&self, headers: &mut HeaderMap) {
        let bytes = self.head.as_bytes();
        headers.reserve(self.head.fields.len());
        for line in self.fields() {
            let (Ok(name), Ok(value)) = (
                HeaderName::from_bytes(line.name),
                HeaderValue::from_maybe_shared(bytes.slice_ref(line.value)),
            ) else {
                continue;
            };
            headers.append(name, value);
        }
    }
}

/// Moves the forwarded head of `resp`, if any, into its header map, for a connection that
/// writes responses from the map (HTTP/2, hyper's HTTP/1.1).
pub fn forwarded_into_map(resp: &mut Response<ProxyBody>) {
    if let Some(head) = resp.body_mut().forwarded.take() {
        head.append_to(resp.headers_mut());
    }
}

/// A response kaproxy makes itself (errors).
pub fn local_response(status: StatusCode, text: &'static str) -> Response<ProxyBody> {
    let mut resp = Response::new(ProxyBody {
        inner: Inner::Local(Full::new(Bytes::from_static(text.as_bytes()))),
        bytes: 0,
        log: None,
        forwarded: None,
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
    /// The `101` of a tunnel whose client side the downstream connection hands over
    /// ([`ProxyBody::take_switched`]); no body.
    Switched(Box<Switched>),
    Local(Full<Bytes>),
    Empty,
}

/// The body of every response kaproxy sends downstream.
pub struct ProxyBody {
    pub(super) inner: Inner,
    pub(super) bytes: u64,
    pub(super) log: Option<Box<AccessRecord>>,
    /// A backend's head, its fields not in the response's header map (see [`ForwardedHead`]).
    pub(super) forwarded: Option<Box<ForwardedHead>>,
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
            forwarded: None,
        }
    }

    /// Takes the backend's head this body carries, for a connection that writes it from its
    /// bytes (kaproxy's HTTP/1.1 loop); its fields are in no header map.
    pub fn take_forwarded(&mut self) -> Option<Box<ForwardedHead>> {
        self.forwarded.take()
    }

    /// Takes the tunnel a `101` opened, for a connection that hands its client side over
    /// itself (kaproxy's HTTP/1.1 loop, once the `101` is written).
    pub fn take_switched(&mut self) -> Option<Box<Switched>> {
        // Looked at first: moving `inner` out and back costs two copies of it per response.
        if !matches!(self.inner, Inner::Switched(_)) {
            return None;
        }
        match std::mem::replace(&mut self.inner, Inner::Empty) {
            Inner::Switched(s) => Some(s),
            _ => unreachable!("matched above"),
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
            Inner::Switched(_) | Inner::Empty => Poll::Ready(None),
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
            Inner::Switched(_) | Inner::Empty => true,
        }
    }

    fn size_hint(&self) -> SizeHint {
        match &self.inner {
            Inner::Upstream(b) => b.size_hint(),
            Inner::ReadAhead { body: b, .. } => b.size_hint(),
            Inner::Relay(b) => b.size_hint(),
            Inner::Tunnel(b) => b.size_hint(),
            Inner::Local(b) => b.size_hint(),
            Inner::Switched(_) | Inner::Empty => SizeHint::with_exact(0),
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_forwarded_head_moves_into_the_map_less_its_dropped_fields() {
        let mut buf = bytes::BytesMut::from(
            "HTTP/1.1 200 OK\r\nX-A: 1\r\nConnection: close\r\nSet-Cookie: a\r\nX-B: 2\r\nSet-Cookie: b\r\n\r\n",
        );
        let head = crate::http1::head::parse_response(&mut buf, 1 << 16)
            .unwrap()
            .unwrap();
        let mut resp = local_response(StatusCode::OK, "");
        resp.headers_mut().clear();
        resp.body_mut().forwarded = Some(Box::new(ForwardedHead::new(head, 1 << 1)));
        forwarded_into_map(&mut resp);
        assert!(
            resp.body_mut().take_forwarded().is_none(),
            "moved, not copied"
        );
        let fields: Vec<(String, String)> = resp
            .headers()
            .iter()
            .map(|(n, v)| (n.to_string(), v.to_str().unwrap().to_string()))
            .collect();
        let want = [
            ("x-a", "1"),
            ("set-cookie", "a"),
            ("set-cookie", "b"),
            ("x-b", "2"),
        ];
        assert_eq!(
            fields,
            want.map(|(n, v)| (n.to_string(), v.to_string())),
            "lower-case names (the map's), the dropped Connection gone"
        );
    }
}
