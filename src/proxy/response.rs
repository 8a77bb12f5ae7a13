//! Owns the response phase: the response filter (framing per RFC 9112 §6.3, hop-by-hop
//! headers, a small body read ahead, a larger one handed to a relay, an event stream passed
//! through), kaproxy's own answers (client faults 400/408/413, upstream failures
//! 502/503/504), and [`ProxyBody`], the body of every response sent downstream.

use std::net::IpAddr;
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Response, StatusCode, Version};
use http_body::{Body, Frame, SizeHint};
use http_body_util::{BodyExt, Full};
use hyper::body::Incoming;
use tokio::time::Instant;
use tracing::{info, warn};

use crate::body::relay::{relay, RelayBody, RelayError, RelayLimits};
use crate::body::{BodyError, Buffering, Collected, Memory};
use crate::error::RequestError;
use crate::metrics::CloseReason;
use crate::upstream::exchange::PooledBody;
use crate::upstream::pool::{Pool, PooledConn};

use super::forwarded::strip_hop_by_hop_and;
use super::log::AccessRecord;
use super::{Proxy, UpstreamGroup};

impl Proxy {
    /// Response filter: framing checked, hop-by-hop headers out, a small body read ahead (so
    /// the upstream connection is free however slowly the client reads), metrics, the body
    /// tied to its pooled connection.
    pub(super) async fn respond(
        &self,
        resp: Response<Incoming>,
        mut conn: PooledConn,
        upstream: &UpstreamGroup,
        pool: &Pool,
        mut log: Option<Box<AccessRecord>>,
        start: Instant,
    ) -> Response<ProxyBody> {
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            // A plain request offered no upgrade (tunnel.rs takes those that do): the backend
            // must not switch (RFC 9110 §15.2.2). Dropping `conn` closes it (reason `error`).
            let err = RequestError::UnexpectedUpgrade { addr: pool.addr() };
            return server_failed(upstream, pool, &err, log);
        }
        let (mut parts, body) = resp.into_parts();
        // RFC 9112 §6.3: with Transfer-Encoding, Content-Length is ignored and must not be
        // forwarded; a backend that sends both is not trusted with the connection afterwards.
        if parts.headers.contains_key(header::TRANSFER_ENCODING)
            && parts.headers.remove(header::CONTENT_LENGTH).is_some()
        {
            warn!(upstream = %upstream.name, server = %pool.addr(),
                "response has both Transfer-Encoding and Content-Length; Content-Length removed, upstream connection closed after it (RFC 9112 §6.3)");
            conn.retire_after(CloseReason::Error);
        }
        // `X-Accel-Buffering` goes too (nginx does not forward it), found in the same pass.
        let accel = strip_hop_by_hop_and(&mut parts.headers, Some(&X_ACCEL_BUFFERING)).also;
        let buffers = &upstream.config.buffers;
        // A stream that must not be held back passes through as it arrives.
        let passthrough = !buffers.response_buffering || must_stream(&parts.headers, accel);
        let relay_limits = (!passthrough).then_some(RelayLimits {
            memory: buffers.response_buffer_bytes,
            spill: buffers.max_response_spill_bytes,
            read_timeout: upstream.config.response_timeout,
        });
        let (age, requests) = conn.age_and_requests();
        let reused = conn.is_reused();
        let body = conn.attach(body);
        let ahead = ReadAhead {
            limit: buffers.response_buffer_bytes,
            timeout: upstream.config.response_timeout,
            buffering: &self.buffering,
            relay: relay_limits,
            addr: pool.addr(),
        };
        let inner = match ahead.take(body).await {
            Ok(inner) => inner,
            Err(err) => {
                err.count_in(pool.metrics());
                return server_failed(upstream, pool, &err, log);
            }
        };
        pool.metrics().request(parts.status.as_u16());
        pool.metrics()
            .observe_duration(start.elapsed().as_secs_f64());
        if let Some(log) = log.as_mut() {
            log.status = parts.status.as_u16();
            log.server = Some(pool.addr());
            log.reused = reused;
            log.conn_age = age;
            log.conn_requests = requests;
        }
        parts.version = Version::HTTP_11;
        Response::from_parts(
            parts,
            ProxyBody {
                inner,
                bytes: 0,
                log,
            },
        )
    }
}

/// `X-Accel-Buffering` (nginx's header: a backend's `no` turns buffering off for its response).
const X_ACCEL_BUFFERING: HeaderName = HeaderName::from_static("x-accel-buffering");

/// Whether a response must reach the client as it arrives, never held in a buffer: server-sent
/// events (`text/event-stream`), or a backend's `X-Accel-Buffering: no` (nginx's header).
fn must_stream(headers: &HeaderMap, accel: Option<HeaderValue>) -> bool {
    let accel_no = accel.is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"no"));
    let events = headers.get(header::CONTENT_TYPE).is_some_and(|v| {
        let v = v.as_bytes();
        v.len() >= 17 && v[..17].eq_ignore_ascii_case(b"text/event-stream")
    });
    accel_no || events
}

/// How a response body is taken off the backend's hands (nginx's proxy buffering).
pub(super) struct ReadAhead<'a> {
    /// `response_buffer_bytes`: a body whose Content-Length is at most this is read whole.
    limit: usize,
    /// `response_timeout`: for reading it, or for the first byte of a relayed body.
    timeout: Duration,
    buffering: &'a Buffering,
    /// Relay any other body ([`crate::body::relay`]); None: it streams.
    relay: Option<RelayLimits>,
    addr: std::net::SocketAddr,
}

impl ReadAhead<'_> {
    /// A body whose Content-Length is at most `limit` (and fits in the memory budget) is read
    /// whole here, so its upstream connection goes back to the pool before the client has read
    /// a byte; any other goes to a relay when one is configured, else streams (and
    /// `send_timeout` bounds a client that stops reading it). Either way the head goes on
    /// with the first body byte, so that a body the backend breaks before any byte (an
    /// oversized chunk extension, a timeout) is still answered 502/504.
    pub(super) async fn take(self, mut body: PooledBody) -> Result<Inner, RequestError> {
        if body.is_end_stream() {
            return Ok(Inner::Upstream(body));
        }
        let held = match body.size_hint().exact() {
            Some(n) if n <= self.limit as u64 => self.buffering.try_reserve(n as usize),
            _ => None,
        };
        let Some(held) = held else {
            let Some(limits) = self.relay else {
                return Ok(Inner::Upstream(body));
            };
            let mut relayed = relay(body, self.buffering, limits);
            return match relayed.started().await {
                Ok(()) => Ok(Inner::Relay(relayed)),
                Err(e) => Err(self.failed(e)),
            };
        };
        let read = tokio::time::timeout(self.timeout, async {
            let mut read = Collected::default();
            while let Some(frame) = body.frame().await {
                if let Ok(data) = frame?.into_data() {
                    read.push(data);
                }
            }
            Ok::<_, hyper::Error>(read.into_bytes())
        })
        .await;
        match read {
            Ok(Ok(bytes)) => Ok(Inner::ReadAhead {
                body: Full::new(bytes),
                _held: held,
            }),
            Ok(Err(e)) => Err(self.broken(e)),
            Err(_) => Err(self.timed_out()),
        }
    }

    /// The body failed after its head: a malformed body (hyper could not parse it, e.g. an
    /// oversized chunk extension) is the backend's broken response, not a closed connection;
    /// a reset or close mid-body is sorted as usual.
    fn broken(&self, e: hyper::Error) -> RequestError {
        // hyper's body decoder reports bad framing (a chunk size or line, an extension or
        // trailers over its limits) as an I/O error of kind InvalidData or InvalidInput.
        let bad_framing = std::error::Error::source(&e)
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .is_some_and(|io| {
                matches!(
                    io.kind(),
                    std::io::ErrorKind::InvalidData | std::io::ErrorKind::InvalidInput
                )
            });
        if e.is_parse() || e.is_parse_too_large() || bad_framing {
            RequestError::BrokenResponse {
                addr: self.addr,
                source: Box::new(e),
            }
        } else {
            RequestError::from_send(self.addr, e)
        }
    }

    fn timed_out(&self) -> RequestError {
        RequestError::ResponseTimeout {
            addr: self.addr,
            timeout: self.timeout,
        }
    }

    fn failed(&self, e: RelayError) -> RequestError {
        match e {
            RelayError::ReadTimeout(_) => self.timed_out(),
            RelayError::Upstream(e) => match e.downcast::<hyper::Error>() {
                Ok(e) => self.broken(*e),
                Err(source) => RequestError::BrokenResponse {
                    addr: self.addr,
                    source,
                },
            },
            RelayError::Read(e) => RequestError::BrokenResponse {
                addr: self.addr,
                source: Box::new(e),
            },
        }
    }
}

/// Marks kaproxy's own answer to a broken request as the last on an HTTP/1 connection.
pub(super) fn closing(mut resp: Response<ProxyBody>, version: Version) -> Response<ProxyBody> {
    if matches!(version, Version::HTTP_10 | Version::HTTP_11) {
        resp.headers_mut()
            .insert(header::CONNECTION, HeaderValue::from_static("close"));
    }
    resp
}

/// kaproxy's answer when the client's request body failed (timeout, bad framing, gone, too
/// large: counted as a 413 of `upstream`) or could not be kept (no temporary file): never the
/// backend's fault, so no backend is counted or blamed for it (README, "Hostile clients").
pub(super) fn client_failed(
    upstream: &UpstreamGroup,
    err: &BodyError,
    client: IpAddr,
    version: Version,
    log: Option<Box<AccessRecord>>,
) -> Response<ProxyBody> {
    if matches!(err, BodyError::TooLarge(_)) {
        upstream.too_large.inc();
    }
    let status = err.status();
    let text = match err {
        BodyError::Timeout(_) => "request body timed out\n",
        BodyError::Malformed(_) => "malformed request body\n",
        BodyError::TooLarge(_) => "request body too large\n",
        BodyError::Spill(_) => "the request body could not be buffered\n",
    };
    match err {
        BodyError::Spill(e) => {
            warn!(client = %client, dir = %e.dir.display(), error = %e.source, status = status.as_u16(),
                "cannot buffer a request body in [buffering] temp_dir; no backend contacted")
        }
        _ => info!(client = %client, error = %err, status = status.as_u16(), "request body failed"),
    }
    with_log(closing(local_response(status, text), version), log)
}

/// kaproxy's answer when the picked server failed the request (the caller has counted the
/// error): counted as an answer of that server, logged with its cause, access-logged.
pub(super) fn server_failed(
    upstream: &UpstreamGroup,
    pool: &Pool,
    err: &RequestError,
    log: Option<Box<AccessRecord>>,
) -> Response<ProxyBody> {
    let status = err.status();
    pool.metrics().request(status.as_u16());
    warn!(upstream = %upstream.name, server = %pool.addr(), error = %err, status = status.as_u16(), "upstream failed");
    let text = match err {
        RequestError::ResponseTimeout { .. } => "upstream timed out\n",
        _ => "upstream failed\n",
    };
    with_log(local_response(status, text), log)
}

/// Attaches the access log record to a response kaproxy made itself, so errors are logged too.
pub(super) fn with_log(
    mut resp: Response<ProxyBody>,
    log: Option<Box<AccessRecord>>,
) -> Response<ProxyBody> {
    if let Some(mut log) = log {
        log.status = resp.status().as_u16();
        resp.body_mut().log = Some(log);
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
