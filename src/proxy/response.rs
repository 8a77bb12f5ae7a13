//! Owns the response phase: the response filter (framing per RFC 9112 §6.3, hop-by-hop
//! headers, a small body read ahead, a larger one handed to a relay, an event stream passed
//! through), kaproxy's own answers' form ([`super::answer::local_response`]; when each is
//! given is the request context's, [`super::context`]), and [`ProxyBody`], the body of every
//! response sent downstream.

use std::sync::Arc;

use http::{Response, StatusCode};
use http_body::Body;
use http_body_util::{BodyExt, Full};
use tracing::warn;

use crate::body::relay::{relay, RelayError, RelayLimits};
use crate::body::{Buffering, Collected};
use crate::error::{RequestError, WireError};
use crate::http1::head::{Name, ResponseHead};
use crate::metrics::CloseReason;
use crate::upstream::backend::Backend;
use crate::upstream::exchange::{PooledBody, ResponseBody};
use crate::upstream::pool::PooledConn;
use crate::upstream::wire::Received;

use super::answer::{ForwardedHead, Inner, ProxyBody};
use super::context::{RequestContext, ResponseDeadline};
use super::forwarded::connection_named_list;
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
        if resp.status == StatusCode::SWITCHING_PROTOCOLS {
            // A plain request offered no upgrade (tunnel.rs takes those that do): the backend
            // must not switch (RFC 9110 §15.2.2). Dropping `conn` closes it (reason `error`).
            let err = RequestError::UnexpectedUpgrade { addr: pool.addr() };
            return ctx.server_failed(pool, &err);
        }
        let Received { status, head, body } = resp;
        let filtered = Filtered::of(&head);
        if filtered.length_overridden {
            warn!(upstream = %upstream.name, server = %pool.addr(),
                "response has both Transfer-Encoding and Content-Length; Content-Length removed, upstream connection closed after it (RFC 9112 §6.3)");
            conn.retire_after(CloseReason::Error);
        }
        let buffers = &upstream.config.buffers;
        // A stream that must not be held back passes through as it arrives.
        let passthrough = !buffers.response_buffering || filtered.must_stream;
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
        pool.metrics().request(status.as_u16());
        pool.metrics()
            .observe_duration(ctx.start.elapsed().as_secs_f64());
        if let Some(log) = ctx.log.as_mut() {
            log.status = status.as_u16();
            log.server = Some(pool.addr());
            log.reused = reused;
            log.conn_age = age;
            log.conn_requests = requests;
        }
        let mut resp = Response::new(ProxyBody {
            inner,
            bytes: 0,
            log: ctx.log,
            forwarded: Some(Box::new(ForwardedHead::new(head, filtered.dropped))),
        });
        *resp.status_mut() = status;
        resp
    }
}

/// A response head from `backend`, with the connection its body comes on.
pub(super) struct Sent {
    pub(super) backend: Arc<Backend>,
    pub(super) response: Received<ResponseBody>,
    pub(super) conn: PooledConn,
}

/// What the response filter makes of a backend's head as received.
struct Filtered {
    /// Bit `i` set: field `i` is not forwarded (see [`ForwardedHead`]). Hop-by-hop fields
    /// (RFC 9110 §7.6.1: the standard ones and those `Connection` names), `X-Accel-Buffering`
    /// (nginx's header; nginx does not forward it), and a `Content-Length` that came with
    /// `Transfer-Encoding` (RFC 9112 §6.3: ignored, and must not be forwarded).
    dropped: u128,
    /// A `Content-Length` was dropped for a `Transfer-Encoding`: the backend is not trusted
    /// with the connection afterwards.
    length_overridden: bool,
    /// The response must reach the client as it arrives, never held in a buffer: server-sent
    /// events (`text/event-stream`), or a backend's `X-Accel-Buffering: no`.
    must_stream: bool,
}

impl Filtered {
    fn of(head: &ResponseHead) -> Filtered {
        let fields = &head.fields;
        let chunked = fields.named(Name::TransferEncoding).next().is_some();
        // The common `Connection: keep-alive` and `close` name no other field: nothing is
        // allocated for none.
        let named = connection_named_list(|| fields.named(Name::Connection));
        let mut filtered = Filtered {
            dropped: 0,
            length_overridden: false,
            must_stream: false,
        };
        for (i, (known, name, value)) in fields.entries().enumerate() {
            let drop = match known {
                _ if known.is_hop_by_hop() => true,
                _ if named.iter().any(|n| n.eq_ignore_ascii_case(name)) => true,
                Name::XAccelBuffering => {
                    filtered.must_stream |= value.eq_ignore_ascii_case(b"no");
                    true
                }
                Name::ContentLength if chunked => {
                    filtered.length_overridden = true;
                    true
                }
                Name::ContentType => {
                    filtered.must_stream |=
                        value.len() >= 17 && value[..17].eq_ignore_ascii_case(b"text/event-stream");
                    false
                }
                _ => false,
            };
            if drop {
                filtered.dropped |= 1 << i;
            }
        }
        filtered
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    fn filtered(head: &str) -> (Filtered, Vec<String>) {
        let mut buf = bytes::BytesMut::from(head);
        let head = crate::http1::head::parse_response(&mut buf, 1 << 16)
            .unwrap()
            .unwrap();
        let filtered = Filtered::of(&head);
        let kept = ForwardedHead::new(head, filtered.dropped)
            .fields()
            .map(|line| {
                format!(
                    "{}: {}",
                    String::from_utf8_lossy(line.name),
                    String::from_utf8_lossy(line.value)
                )
            })
            .collect();
        (filtered, kept)
    }

    #[test]
    fn hop_by_hop_fields_and_those_connection_names_are_not_forwarded() {
        let (f, kept) = filtered(
            "HTTP/1.1 200 OK\r\nConnection: close, X-Private\r\nKeep-Alive: timeout=5\r\n\
             X-Private: 1\r\nServer: a\r\nUpgrade: h2c\r\nContent-Length: 2\r\n\r\n",
        );
        assert_eq!(kept, vec!["Server: a", "Content-Length: 2"]);
        assert!(!f.length_overridden && !f.must_stream);
    }

    #[test]
    fn a_length_beside_transfer_encoding_goes_and_the_connection_with_it() {
        let (f, kept) = filtered(
            "HTTP/1.1 200 OK\r\nContent-Length: 9\r\nTransfer-Encoding: chunked\r\nA: b\r\n\r\n",
        );
        assert_eq!(kept, vec!["A: b"]);
        assert!(f.length_overridden);
    }

    #[test]
    fn event_streams_and_x_accel_buffering_no_must_stream() {
        let (f, kept) =
            filtered("HTTP/1.1 200 OK\r\nContent-Type: Text/Event-Stream; charset=utf-8\r\n\r\n");
        assert!(f.must_stream);
        assert_eq!(kept.len(), 1);
        let (f, kept) = filtered("HTTP/1.1 200 OK\r\nX-Accel-Buffering: no\r\nA: b\r\n\r\n");
        assert!(f.must_stream);
        assert_eq!(
            kept,
            vec!["A: b"],
            "X-Accel-Buffering is nginx's, not forwarded"
        );
        let (f, _) = filtered(
            "HTTP/1.1 200 OK\r\nX-Accel-Buffering: yes\r\nContent-Type: text/html\r\n\r\n",
        );
        assert!(!f.must_stream);
    }
}
