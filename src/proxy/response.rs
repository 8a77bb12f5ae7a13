//! Owns the response phase: the response filter (framing per RFC 9112 §6.3, hop-by-hop
//! headers, a small body read ahead, a larger one handed to a relay, an event stream passed
//! through), kaproxy's own answers' form ([`super::answer::local_response`]; when each is
//! given is the request context's, [`super::context`]), and [`ProxyBody`], the body of every
//! response sent downstream.

use std::sync::Arc;

use http::header::{self, HeaderName, HeaderValue};
use http::{HeaderMap, Response, StatusCode, Version};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use tracing::warn;

use crate::body::relay::{relay, RelayError, RelayLimits};
use crate::body::{Buffering, Collected};
use crate::error::{RequestError, WireError};
use crate::metrics::CloseReason;
use crate::upstream::backend::Backend;
use crate::upstream::exchange::{PooledBody, ResponseBody};
use crate::upstream::pool::PooledConn;

use super::answer::{Inner, ProxyBody};
use super::context::{RequestContext, ResponseDeadline};
use super::forwarded::strip_hop_by_hop_and;
use super::Proxy;

impl Proxy {
    /// Response filter: framing checked, hop-by-hop headers out, a small body read ahead (so
    /// the upstream connection is free however slowly the client reads), metrics, the body
    /// tied to its pooled connection.
    pub(super) async fn respond(
        &self,
        mut ctx: RequestContext<'_>,
        sent: Sent,
    ) -> Response<ProxyBody> {
        let Sent {
            backend,
            response: resp,
            mut conn,
        } = sent;
        let pool = backend.pool();
        let upstream = ctx.group;
        if resp.status() == StatusCode::SWITCHING_PROTOCOLS {
            // A plain request offered no upgrade (tunnel.rs takes those that do): the backend
            // must not switch (RFC 9110 §15.2.2). Dropping `conn` closes it (reason `error`).
            let err = RequestError::UnexpectedUpgrade { addr: pool.addr() };
            return ctx.server_failed(pool, &err);
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
            deadline: ResponseDeadline {
                addr: pool.addr(),
                limit: upstream.config.response_timeout,
            },
            buffering: &self.buffering,
            relay: relay_limits,
        };
        let inner = match ahead.take(body).await {
            Ok(inner) => inner,
            Err(err) => {
                err.count_in(pool.metrics());
                return ctx.server_failed(pool, &err);
            }
        };
        pool.metrics().request(parts.status.as_u16());
        pool.metrics()
            .observe_duration(ctx.start.elapsed().as_secs_f64());
        if let Some(log) = ctx.log.as_mut() {
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
                log: ctx.log,
            },
        )
    }
}

/// A response head from `backend`, with the connection its body comes on.
pub(super) struct Sent {
    pub(super) backend: Arc<Backend>,
    pub(super) response: Response<ResponseBody>,
    pub(super) conn: PooledConn,
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
    deadline: ResponseDeadline,
    buffering: &'a Buffering,
    /// Relay any other body ([`crate::body::relay`]); None: it streams.
    relay: Option<RelayLimits>,
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
        let read = self
            .deadline
            .bound(async {
                let mut read = Collected::default();
                while let Some(frame) = body.frame().await {
                    if let Ok(data) = frame?.into_data() {
                        read.push(data);
                    }
                }
                Ok::<_, WireError>(read.into_bytes())
            })
            .await;
        match read {
            Ok(Ok(bytes)) => Ok(Inner::ReadAhead {
                body: Full::new(bytes),
                _held: held,
            }),
            Ok(Err(e)) => Err(self.broken(e)),
            Err(elapsed) => Err(elapsed),
        }
    }

    /// The body failed after its head: a malformed body (e.g. an oversized chunk extension)
    /// is the backend's broken response, not a closed connection; a reset or close mid-body
    /// is sorted as usual ([`RequestError::from_wire`]).
    fn broken(&self, e: WireError) -> RequestError {
        RequestError::from_wire(self.deadline.addr, e)
    }

    fn failed(&self, e: RelayError) -> RequestError {
        match e {
            RelayError::ReadTimeout(_) => self.deadline.elapsed(),
            RelayError::Upstream(e) => match e.downcast::<WireError>() {
                Ok(e) => self.broken(*e),
                Err(source) => RequestError::BrokenResponse {
                    addr: self.deadline.addr,
                    source,
                },
            },
            RelayError::Read(e) => RequestError::BrokenResponse {
                addr: self.deadline.addr,
                source: Box::new(e),
            },
        }
    }
}
